#include "hsm/pkcs11.hpp"

#include <dlfcn.h>

#include <cstdio>

namespace kmsd::hsm::p11 {

std::string rv_name(CK_RV rv) {
  switch (rv) {
#include "hsm/ckr_names.inc"
    default:
      break;
  }
  char buf[64];
  if (rv >= CKR_VENDOR_DEFINED) {
    std::snprintf(buf, sizeof buf, "CKR_VENDOR_DEFINED+0x%lx", rv - CKR_VENDOR_DEFINED);
  } else {
    std::snprintf(buf, sizeof buf, "CKR_0x%lx", rv);
  }
  return buf;
}

Fault classify(CK_RV rv) noexcept {
  switch (rv) {
    case CKR_OK:
      return Fault::kNone;
    case CKR_SESSION_HANDLE_INVALID:
    case CKR_SESSION_CLOSED:
    case CKR_USER_NOT_LOGGED_IN:
    // Our object handles come only from our own lookups: one the token no longer knows means
    // the token changed under us (SoftHSM answers these, not CKR_USER_NOT_LOGGED_IN, for a
    // private key after a logout behind our back). Re-login and re-resolve, never "bad data".
    case CKR_OBJECT_HANDLE_INVALID:
    case CKR_KEY_HANDLE_INVALID:
    case CKR_WRAPPING_KEY_HANDLE_INVALID:
    case CKR_UNWRAPPING_KEY_HANDLE_INVALID:
      return Fault::kSessionLost;
    case CKR_DEVICE_REMOVED:
    case CKR_DEVICE_ERROR:
    case CKR_TOKEN_NOT_PRESENT:
    case CKR_TOKEN_NOT_RECOGNIZED:
    case CKR_SLOT_ID_INVALID:
    case CKR_CRYPTOKI_NOT_INITIALIZED:  // someone called C_Finalize: re-initialize
      return Fault::kTokenGone;
    case CKR_PIN_INCORRECT:
    case CKR_PIN_INVALID:
    case CKR_PIN_LEN_RANGE:
      return Fault::kPinIncorrect;
    case CKR_PIN_LOCKED:
    case CKR_PIN_EXPIRED:
      return Fault::kPinLocked;
    default:
      return Fault::kCallerError;
  }
}

bool token_gone(CK_RV rv) noexcept {
  switch (rv) {
    case CKR_DEVICE_REMOVED:
    case CKR_TOKEN_NOT_PRESENT:
    case CKR_TOKEN_NOT_RECOGNIZED:
    case CKR_SLOT_ID_INVALID:
    case CKR_CRYPTOKI_NOT_INITIALIZED:
      return true;
    default:
      return false;
  }
}

bool session_gone(CK_RV rv) noexcept {
  return token_gone(rv) || rv == CKR_SESSION_HANDLE_INVALID || rv == CKR_SESSION_CLOSED;
}

void fail(ErrorCode code, std::string message) {
  throw TokenError(Error{code, std::move(message)}, Fault::kCallerError);
}

void check_rv(CK_RV rv, std::string_view function) {
  if (rv == CKR_OK) return;
  char hex[32];
  std::snprintf(hex, sizeof hex, " (0x%lx)", rv);
  Fault fault = classify(rv);
  ErrorCode code = ErrorCode::kCrypto;
  switch (fault) {
    case Fault::kSessionLost:
    case Fault::kTokenGone:
      code = ErrorCode::kUnavailable;
      break;
    case Fault::kPinIncorrect:
      code = ErrorCode::kUnauthenticated;
      break;
    case Fault::kPinLocked:
      code = ErrorCode::kPinLocked;
      break;
    default:
      if (rv == CKR_ARGUMENTS_BAD || rv == CKR_TEMPLATE_INCONSISTENT ||
          rv == CKR_TEMPLATE_INCOMPLETE || rv == CKR_ATTRIBUTE_VALUE_INVALID ||
          rv == CKR_DATA_LEN_RANGE) {
        code = ErrorCode::kInvalidArgument;
      } else if (rv == CKR_MECHANISM_INVALID || rv == CKR_FUNCTION_NOT_SUPPORTED ||
                 rv == CKR_KEY_FUNCTION_NOT_PERMITTED || rv == CKR_CURVE_NOT_SUPPORTED) {
        code = ErrorCode::kFailedPrecondition;
      }
      break;
  }
  throw TokenError(Error{code, std::string(function) + " failed: " + rv_name(rv) + hex}, fault, rv);
}

Result<std::shared_ptr<Module>> Module::load(const std::string& path) {
  if (path.empty()) {
    return make_error(ErrorCode::kConfig,
                      "no PKCS#11 module configured; set token.module in kmsd.toml (e.g. "
                      "/usr/lib/softhsm/libsofthsm2.so)");
  }
  // RTLD_LOCAL: the module's symbols stay out of our namespace; another Token dlopening the
  // same path gets the same instance.
  void* handle = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* why = ::dlerror();
    return make_error(ErrorCode::kConfig, "PKCS#11 module " + path + " could not be loaded: " +
                                              (why ? why : "unknown dlopen error") +
                                              "; check token.module in kmsd.toml");
  }
  using GetFunctionList = CK_RV (*)(CK_FUNCTION_LIST_PTR_PTR);
  auto get = reinterpret_cast<GetFunctionList>(::dlsym(handle, "C_GetFunctionList"));
  if (get == nullptr) {
    ::dlclose(handle);
    return make_error(ErrorCode::kConfig, path +
                                              " is not a PKCS#11 module (no C_GetFunctionList); "
                                              "check token.module in kmsd.toml");
  }
  CK_FUNCTION_LIST* f = nullptr;
  CK_RV rv = get(&f);
  if (rv != CKR_OK || f == nullptr) {
    ::dlclose(handle);
    return make_error(ErrorCode::kConfig,
                      "C_GetFunctionList of " + path + " failed: " + rv_name(rv));
  }
  std::shared_ptr<Module> m(new Module(path, handle, f));
  rv = m->initialize();
  if (rv != CKR_OK) {
    // Deliberately no dlclose: another Token may hold the same instance.
    return make_error(ErrorCode::kUnavailable, "C_Initialize of PKCS#11 module " + path +
                                                   " failed: " + rv_name(rv) +
                                                   "; check the module's own configuration "
                                                   "(e.g. SOFTHSM2_CONF) and its logs");
  }
  return m;
}

CK_RV Module::initialize() const noexcept {
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  CK_RV rv = f_->C_Initialize(&args);
  return rv == CKR_CRYPTOKI_ALREADY_INITIALIZED ? CKR_OK : rv;
}

Session Session::open(std::shared_ptr<const Module> module, CK_SLOT_ID slot) {
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
  check_rv(
      module->f()->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &h),
      "C_OpenSession");
  return Session(std::move(module), h);
}

void Session::close() noexcept {
  if (h_ != CK_INVALID_HANDLE && module_) module_->f()->C_CloseSession(h_);
  h_ = CK_INVALID_HANDLE;
}

std::vector<CK_OBJECT_HANDLE> Session::find(CK_ATTRIBUTE* tmpl, CK_ULONG n) const {
  check_rv(f()->C_FindObjectsInit(h_, tmpl, n), "C_FindObjectsInit");
  std::vector<CK_OBJECT_HANDLE> out;
  CK_OBJECT_HANDLE batch[32];
  CK_RV rv = CKR_OK;
  for (;;) {
    CK_ULONG got = 0;
    rv = f()->C_FindObjects(h_, batch, 32, &got);
    if (rv != CKR_OK || got == 0) break;
    out.insert(out.end(), batch, batch + got);
  }
  CK_RV frv = f()->C_FindObjectsFinal(h_);
  check_rv(rv, "C_FindObjects");
  check_rv(frv, "C_FindObjectsFinal");
  return out;
}

std::vector<std::uint8_t> Session::attribute(CK_OBJECT_HANDLE obj, CK_ATTRIBUTE_TYPE type) const {
  CK_ATTRIBUTE a{type, nullptr, 0};
  check_rv(f()->C_GetAttributeValue(h_, obj, &a, 1), "C_GetAttributeValue");
  std::vector<std::uint8_t> v(a.ulValueLen);
  a.pValue = v.data();
  check_rv(f()->C_GetAttributeValue(h_, obj, &a, 1), "C_GetAttributeValue");
  v.resize(a.ulValueLen);
  return v;
}

SecretBytes Session::secret_attribute(CK_OBJECT_HANDLE obj, CK_ATTRIBUTE_TYPE type) const {
  CK_ATTRIBUTE a{type, nullptr, 0};
  check_rv(f()->C_GetAttributeValue(h_, obj, &a, 1), "C_GetAttributeValue");
  SecretBytes v(a.ulValueLen);
  a.pValue = v.data();
  check_rv(f()->C_GetAttributeValue(h_, obj, &a, 1), "C_GetAttributeValue");
  v.resize(a.ulValueLen);
  return v;
}

bool Session::bool_attribute(CK_OBJECT_HANDLE obj, CK_ATTRIBUTE_TYPE type) const {
  CK_BBOOL b = CK_FALSE;
  CK_ATTRIBUTE a{type, &b, sizeof b};
  check_rv(f()->C_GetAttributeValue(h_, obj, &a, 1), "C_GetAttributeValue");
  return b == CK_TRUE;
}

void Session::destroy(CK_OBJECT_HANDLE obj) const noexcept {
  f()->C_DestroyObject(h_, obj);
}

std::string trimmed(const unsigned char* p, std::size_t n) {
  std::string s(reinterpret_cast<const char*>(p), n);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\0')) s.pop_back();
  return s;
}

std::vector<SlotInfo> slots_with_tokens(const Module& m) {
  CK_ULONG n = 0;
  check_rv(m.f()->C_GetSlotList(CK_TRUE, nullptr, &n), "C_GetSlotList");
  std::vector<CK_SLOT_ID> ids(n);
  if (n > 0) check_rv(m.f()->C_GetSlotList(CK_TRUE, ids.data(), &n), "C_GetSlotList");
  ids.resize(n);
  std::vector<SlotInfo> out;
  for (CK_SLOT_ID id : ids) {
    CK_TOKEN_INFO ti{};
    CK_RV rv = m.f()->C_GetTokenInfo(id, &ti);
    if (rv == CKR_TOKEN_NOT_PRESENT || rv == CKR_TOKEN_NOT_RECOGNIZED) continue;
    check_rv(rv, "C_GetTokenInfo");
    SlotInfo s;
    s.slot_id = id;
    s.token_label = trimmed(ti.label, sizeof ti.label);
    s.token_serial = trimmed(ti.serialNumber, sizeof ti.serialNumber);
    s.manufacturer = trimmed(ti.manufacturerID, sizeof ti.manufacturerID);
    s.model = trimmed(ti.model, sizeof ti.model);
    s.initialized = (ti.flags & CKF_TOKEN_INITIALIZED) != 0;
    out.push_back(std::move(s));
  }
  return out;
}

}  // namespace kmsd::hsm::p11

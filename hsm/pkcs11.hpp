// Internal to hsm/: the thin raw PKCS#11 layer under Token (module, session, return codes).
// Only hsm/*.cpp and the hsm tests include this; raw CK_* types never leave the module.
#pragma once

#include <p11-kit/pkcs11.h>

#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "common/result.hpp"
#include "common/secret.hpp"
#include "hsm/token.hpp"

namespace kmsd::hsm::p11 {

// "CKR_PIN_INCORRECT" for a return value, "CKR_VENDOR_DEFINED+0x.." or "CKR_0x.." otherwise.
std::string rv_name(CK_RV rv);

// What a return value means for the caller: the one place that decides which failures are
// worth a reopen + re-login + retry.
Fault classify(CK_RV rv) noexcept;

// Whether a session that got RV is gone on the token (closed, or the device went away), so
// its handle must be forgotten, never closed (a stale number may be a fresh session by now).
// USER_NOT_LOGGED_IN, DEVICE_ERROR and the *_HANDLE_INVALID of objects leave the session
// open: close it, or every such fault leaks a session on the token.
bool session_gone(CK_RV rv) noexcept;
// Whether RV means every session of the token is gone (removed, not present, finalized):
// forget them all. Otherwise the other sessions are still open and are closed.
bool token_gone(CK_RV rv) noexcept;

// Failures inside hsm/ travel as this exception (STYLE: exceptions inside a module, results
// across modules); Token catches it at its public boundary and returns the Error.
struct TokenError : std::exception {
  Error error;
  Fault fault = Fault::kCallerError;
  CK_RV rv = CKR_OK;
  TokenError(Error e, Fault f, CK_RV r = CKR_OK) : error(std::move(e)), fault(f), rv(r) {}
  const char* what() const noexcept override { return error.message.c_str(); }
};

[[noreturn]] void fail(ErrorCode code, std::string message);

// The single return-code check: throws TokenError("<function> failed: CKR_X (0x..)") with the
// classified fault unless RV is CKR_OK.
void check_rv(CK_RV rv, std::string_view function);

// A dlopen'ed PKCS#11 module with its function list, C_Initialize'd with CKF_OS_LOCKING_OK.
// Never finalized and never dlclose'd: other Tokens in this process (an operator card, the key
// token) may load the same module, and a C_Finalize would pull the rug from under them
// (dlopen's refcount keeps one instance).
class Module {
 public:
  static Result<std::shared_ptr<Module>> load(const std::string& path);
  CK_FUNCTION_LIST* f() const noexcept { return f_; }
  const std::string& path() const noexcept { return path_; }
  // C_Initialize again (after someone else's C_Finalize); ALREADY_INITIALIZED is success.
  CK_RV initialize() const noexcept;

 private:
  Module(std::string path, void* handle, CK_FUNCTION_LIST* f)
      : path_(std::move(path)), handle_(handle), f_(f) {}
  std::string path_;
  void* handle_ = nullptr;
  CK_FUNCTION_LIST* f_ = nullptr;
};

// An open session. Move-only; the destructor closes it (never throws). forget() drops the
// handle without closing, for sessions the token already closed (a stale handle number
// might be reused by a fresh session on some tokens).
class Session {
 public:
  Session() = default;
  Session(std::shared_ptr<const Module> module, CK_SESSION_HANDLE h) noexcept
      : module_(std::move(module)), h_(h) {}
  Session(Session&& o) noexcept : module_(std::move(o.module_)), h_(o.h_) {
    o.h_ = CK_INVALID_HANDLE;
  }
  Session& operator=(Session&& o) noexcept {
    if (this != &o) {
      close();
      module_ = std::move(o.module_);
      h_ = o.h_;
      o.h_ = CK_INVALID_HANDLE;
    }
    return *this;
  }
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;
  ~Session() { close(); }

  static Session open(std::shared_ptr<const Module> module, CK_SLOT_ID slot);  // throws
  CK_SESSION_HANDLE handle() const noexcept { return h_; }
  CK_FUNCTION_LIST* f() const noexcept { return module_->f(); }
  bool valid() const noexcept { return h_ != CK_INVALID_HANDLE; }
  void forget() noexcept { h_ = CK_INVALID_HANDLE; }

  // Helpers that throw TokenError through check_rv.
  std::vector<CK_OBJECT_HANDLE> find(CK_ATTRIBUTE* tmpl, CK_ULONG n) const;
  std::vector<std::uint8_t> attribute(CK_OBJECT_HANDLE obj, CK_ATTRIBUTE_TYPE type) const;
  SecretBytes secret_attribute(CK_OBJECT_HANDLE obj, CK_ATTRIBUTE_TYPE type) const;
  bool bool_attribute(CK_OBJECT_HANDLE obj, CK_ATTRIBUTE_TYPE type) const;
  void destroy(CK_OBJECT_HANDLE obj) const noexcept;

 private:
  void close() noexcept;
  std::shared_ptr<const Module> module_;
  CK_SESSION_HANDLE h_ = CK_INVALID_HANDLE;
};

// Destroys a session object (a transient data key) when it goes out of scope.
// MU, if given, is held around the destroy (SoftHSM wants object changes serialized).
class ObjectGuard {
 public:
  ObjectGuard(const Session& s, CK_OBJECT_HANDLE h, std::mutex* mu = nullptr) noexcept
      : s_(s), h_(h), mu_(mu) {}
  ~ObjectGuard() {
    if (h_ == CK_INVALID_HANDLE) return;
    if (mu_ != nullptr) {
      std::lock_guard lock(*mu_);
      s_.destroy(h_);
    } else {
      s_.destroy(h_);
    }
  }
  ObjectGuard(const ObjectGuard&) = delete;
  ObjectGuard& operator=(const ObjectGuard&) = delete;

 private:
  const Session& s_;
  CK_OBJECT_HANDLE h_;
  std::mutex* mu_;
};

// Space-padded CK_TOKEN_INFO text fields without the padding.
std::string trimmed(const unsigned char* p, std::size_t n);

// Token info of every slot with a token present.
std::vector<SlotInfo> slots_with_tokens(const Module& m);  // throws

}  // namespace kmsd::hsm::p11

#include "daemon/dr/custody.hpp"

#include <dlfcn.h>
#include <openssl/err.h>
#include <p11-kit/pkcs11.h>

#include <array>

#include "common/files.hpp"
#include "daemon/dr/keyring.hpp"
#include "hsm/uri.hpp"

namespace kmsd::dr {

bool is_pkcs11_uri(std::string_view s) {
  return s.rfind("pkcs11:", 0) == 0;
}

namespace {
bool same_public_key(X509* cert, EVP_PKEY* key) {
  const bool eq = EVP_PKEY_eq(X509_get0_pubkey(cert), key) == 1;
  ERR_clear_error();
  return eq;
}
}  // namespace

Result<CustodyKey> open_custody_key_on_token(const std::string& uri, const std::string& module,
                                             const SecretBytes& pin, X509* cert,
                                             std::size_t sessions) {
  // hsm::TokenUri names a token only; the object= attribute names the key on it.
  std::string token_uri = "pkcs11:";
  std::string object;
  std::string_view rest = std::string_view(uri).substr(7);
  while (!rest.empty()) {
    auto semi = rest.find(';');
    std::string_view attr = rest.substr(0, semi);
    rest = semi == std::string_view::npos ? std::string_view() : rest.substr(semi + 1);
    if (attr.rfind("object=", 0) == 0) {
      object = std::string(attr.substr(7));
    } else if (attr.rfind("type=", 0) == 0) {
      continue;
    } else if (!attr.empty()) {
      if (token_uri.size() > 7) token_uri += ';';
      token_uri += attr;
    }
  }
  if (object.empty() || object.find('%') != std::string::npos)
    return make_error(ErrorCode::kInvalidArgument,
                      "the custody key URI " + uri +
                          " must name the key with object=LABEL (plain characters), e.g. "
                          "pkcs11:token=kmsd-new;object=kms-dr-custody");
  hsm::TokenOptions opts;
  opts.module_path = module;
  opts.token_uri = token_uri;
  opts.pool_size = std::max<std::size_t>(1, sessions);
  opts.labels.ca = object;  // the token layer fetches a libp11 key by this label
  CustodyKey out;
  KMSD_ASSIGN_OR_RETURN(out.token, hsm::Token::open(opts));
  KMSD_TRY(out.token->login(pin));
  auto key = out.token->ca_private_key();
  if (!key.ok()) return key.error().context("the custody key '" + object + "'");
  out.key = std::move(*key);
  if (!same_public_key(cert, out.key.get()))
    return make_error(ErrorCode::kInvalidArgument,
                      "the custody key '" + object + "' on " + token_uri +
                          " is not the key of the custody certificate");
  return out;
}

namespace {
Error p11_error(const char* call, CK_RV rv) {
  char hex[32];
  std::snprintf(hex, sizeof hex, "0x%08lx", static_cast<unsigned long>(rv));
  if (rv == CKR_PIN_INCORRECT)
    return make_error(ErrorCode::kUnauthenticated, std::string(call) + ": wrong PIN");
  if (rv == CKR_PIN_LOCKED)
    return make_error(ErrorCode::kPinLocked, std::string(call) + ": the PIN is locked");
  return make_error(ErrorCode::kCrypto, std::string(call) + " failed with CK_RV " + hex);
}
}  // namespace

Status generate_custody_key(const std::string& module, const std::string& token_uri,
                            const std::string& label, const SecretBytes& pin) {
  KMSD_ASSIGN_OR_RETURN(auto uri, hsm::TokenUri::parse(token_uri));
  KMSD_ASSIGN_OR_RETURN(auto slots, hsm::Token::list_slots(module));
  std::optional<CK_SLOT_ID> slot;
  for (const auto& s : slots)
    if (uri.matches(s)) slot = s.slot_id;
  if (!slot)
    return make_error(ErrorCode::kNotFound, "no token matches " + token_uri + " on " + module);
  // The same path the token layer loaded: dlopen returns that instance. Never dlclose'd or
  // finalized here: the token layer and libp11 keep using the module.
  void* lib = ::dlopen(module.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr)
    return make_error(ErrorCode::kConfig, "cannot load the PKCS#11 module " + module);
  auto get_list = reinterpret_cast<CK_C_GetFunctionList>(::dlsym(lib, "C_GetFunctionList"));
  CK_FUNCTION_LIST_PTR f = nullptr;
  if (get_list == nullptr || get_list(&f) != CKR_OK || f == nullptr)
    return make_error(ErrorCode::kConfig, module + " is not a PKCS#11 module");
  CK_RV rv = f->C_Initialize(nullptr);
  if (rv != CKR_OK && rv != CKR_CRYPTOKI_ALREADY_INITIALIZED) return p11_error("C_Initialize", rv);
  CK_SESSION_HANDLE s = 0;
  rv = f->C_OpenSession(*slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &s);
  if (rv != CKR_OK) return p11_error("C_OpenSession", rv);
  struct Close {
    CK_FUNCTION_LIST_PTR f;
    CK_SESSION_HANDLE s;
    ~Close() { f->C_CloseSession(s); }
  } close{f, s};
  rv = f->C_Login(s, CKU_USER, const_cast<CK_UTF8CHAR_PTR>(pin.data()),
                  static_cast<CK_ULONG>(pin.size()));
  if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) return p11_error("C_Login", rv);

  CK_OBJECT_CLASS priv_class = CKO_PRIVATE_KEY;
  std::string lab = label;
  CK_ATTRIBUTE find[] = {{CKA_CLASS, &priv_class, sizeof priv_class},
                         {CKA_LABEL, lab.data(), static_cast<CK_ULONG>(lab.size())}};
  CK_OBJECT_HANDLE found = 0;
  CK_ULONG count = 0;
  if ((rv = f->C_FindObjectsInit(s, find, 2)) != CKR_OK) return p11_error("C_FindObjectsInit", rv);
  rv = f->C_FindObjects(s, &found, 1, &count);
  f->C_FindObjectsFinal(s);
  if (rv != CKR_OK) return p11_error("C_FindObjects", rv);
  if (count != 0)
    return make_error(ErrorCode::kAlreadyExists,
                      "a key labelled '" + label + "' is already on " + token_uri);

  CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
  CK_ULONG bits = 3072;
  std::array<CK_BYTE, 3> exponent{0x01, 0x00, 0x01};
  std::string id = "kms-dr-custody";
  CK_ATTRIBUTE pub[] = {{CKA_TOKEN, &yes, sizeof yes},
                        {CKA_PRIVATE, &no, sizeof no},
                        {CKA_ENCRYPT, &yes, sizeof yes},
                        {CKA_VERIFY, &no, sizeof no},
                        {CKA_WRAP, &no, sizeof no},
                        {CKA_MODULUS_BITS, &bits, sizeof bits},
                        {CKA_PUBLIC_EXPONENT, exponent.data(), exponent.size()},
                        {CKA_LABEL, lab.data(), static_cast<CK_ULONG>(lab.size())},
                        {CKA_ID, id.data(), static_cast<CK_ULONG>(id.size())}};
  CK_ATTRIBUTE priv[] = {{CKA_TOKEN, &yes, sizeof yes},
                         {CKA_PRIVATE, &yes, sizeof yes},
                         {CKA_SENSITIVE, &yes, sizeof yes},
                         {CKA_EXTRACTABLE, &no, sizeof no},
                         {CKA_DECRYPT, &yes, sizeof yes},
                         {CKA_SIGN, &no, sizeof no},
                         {CKA_UNWRAP, &no, sizeof no},
                         {CKA_LABEL, lab.data(), static_cast<CK_ULONG>(lab.size())},
                         {CKA_ID, id.data(), static_cast<CK_ULONG>(id.size())}};
  CK_MECHANISM mech{CKM_RSA_PKCS_KEY_PAIR_GEN, nullptr, 0};
  CK_OBJECT_HANDLE hpub = 0, hpriv = 0;
  rv = f->C_GenerateKeyPair(s, &mech, pub, sizeof pub / sizeof pub[0], priv,
                            sizeof priv / sizeof priv[0], &hpub, &hpriv);
  if (rv != CKR_OK) return p11_error("C_GenerateKeyPair (RSA-3072 custody key)", rv);
  return {};
}

Result<CustodyKey> open_custody_key_p12(const std::filesystem::path& p12,
                                        const SecretBytes& passphrase, X509* cert) {
  KMSD_ASSIGN_OR_RETURN(auto text, files::read_text(p12));
  auto pairs = read_pkcs12_keys({reinterpret_cast<const std::uint8_t*>(text.data()), text.size()},
                                passphrase);
  if (!pairs.ok()) return pairs.error().context("cannot open " + p12.string());
  for (auto& p : *pairs) {
    if (same_public_key(cert, p.key.get())) return CustodyKey{nullptr, std::move(p.key)};
  }
  return make_error(ErrorCode::kInvalidArgument,
                    p12.string() + " holds no key for the custody certificate");
}

}  // namespace kmsd::dr

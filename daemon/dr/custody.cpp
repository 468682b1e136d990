#include "daemon/dr/custody.hpp"

#include <openssl/err.h>

#include "common/files.hpp"
#include "daemon/dr/keyring.hpp"

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
  opts.labels.ca = object;  // the token layer fetches the token key by this label
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

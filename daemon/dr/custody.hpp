// The DR custody key: the key pre-decryption encrypts every message to while users have no
// keys. In production its private half is an RSA-3072 key on the new key token, used through
// the token's session pool (hsm::Token); for drills a PKCS#12 file will do.
#pragma once

#include <filesystem>
#include <memory>
#include <string>

#include "common/ossl.hpp"
#include "common/result.hpp"
#include "common/secret.hpp"
#include "hsm/token.hpp"

namespace kmsd::dr {

// Owns the token session behind a token key: KEY is released before TOKEN.
struct CustodyKey {
  std::unique_ptr<hsm::Token> token;  // null for a PKCS#12 key
  ossl::EvpPkeyPtr key;
};

// True for "pkcs11:..." (a token key) rather than a file.
bool is_pkcs11_uri(std::string_view s);

// "pkcs11:token=LABEL;object=KEY-LABEL" on MODULE, logged in with PIN. The key must be the
// private half of CERT's public key (checked) and allowed to decrypt.
Result<CustodyKey> open_custody_key_on_token(const std::string& uri, const std::string& module,
                                             const SecretBytes& pin, X509* cert,
                                             std::size_t sessions);

// The key of CERT in a PKCS#12 file (drills).
Result<CustodyKey> open_custody_key_p12(const std::filesystem::path& p12,
                                        const SecretBytes& passphrase, X509* cert);

}  // namespace kmsd::dr

// Certificate issuance: the CA's own certificate, administrator TLS client certificates and
// the admin listener's server certificate. Every signature is made with an EVP_PKEY whose
// private half lives on the token (hsm::Token::ca_private_key); this module never sees it.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "common/ossl.hpp"
#include "common/result.hpp"
#include "common/secret.hpp"
#include "hsm/token.hpp"

namespace kmsd::ca {

// Parses the one-line form "/O=Example/OU=Unit/CN=Name" ('\/' escapes a slash).
Result<ossl::X509NamePtr> parse_subject(std::string_view one_line);
// RFC 2253 text of a name, for records and logs.
std::string name_to_string(const X509_NAME* name);

// Software key pair (administrator TLS keys, the ephemeral TLS server key).
Result<ossl::EvpPkeyPtr> generate_key(hsm::KeyType type);

const EVP_MD* digest_by_name(std::string_view name);  // sha256|sha384|sha512, else nullptr

enum class Profile {
  kCa,           // basicConstraints CA:TRUE critical, keyCertSign|cRLSign
  kAdminClient,  // digitalSignature, extendedKeyUsage clientAuth
  kTlsServer,    // digitalSignature|keyEncipherment, serverAuth, subjectAltName from names
  kUser,         // S/MIME signing or encryption: the usages given, subjectAltName e-mail
};

using X509PubkeyPtr = std::unique_ptr<X509_PUBKEY, ossl::Deleter<X509_PUBKEY_free>>;

// KEY's SubjectPublicKeyInfo. EC keys are read from their parameters, with nothing encoded or
// decoded (OpenSSL 3.0's encoders and decoders cost far more than the signature on the token);
// other key types go through X509_PUBKEY_set.
Result<X509PubkeyPtr> subject_public_key_info(EVP_PKEY* key);

struct IssueRequest {
  Profile profile = Profile::kAdminClient;
  const X509_NAME* subject = nullptr;
  EVP_PKEY* public_key = nullptr;  // the subject's key (public half used)
  // When set, certified as it is (algorithm and key bits copied; a CSR's own, or
  // subject_public_key_info()) instead of PUBLIC_KEY, which is then not read: the key is not
  // encoded again (X509_set_pubkey encodes it and decodes the result).
  const X509_PUBKEY* public_key_info = nullptr;
  // With PUBLIC_KEY_INFO: whether the returned certificate carries its decoded public key, which
  // OpenSSL needs to verify with it or to pair it with its private key (X509_verify_cert, TLS,
  // PKCS12_create). It is read back from the certificate's DER, which costs OpenSSL 3.0 a
  // decoder context: about a quarter of an issuance. False suits a caller that only stores,
  // encodes or hashes the certificate (X509_get0_pubkey then returns null).
  bool decode_public_key = true;
  std::chrono::seconds validity{86400};
  std::vector<std::string> dns_or_ip;  // kTlsServer only: SAN entries
  std::vector<std::uint8_t> serial;    // 16 random bytes from the token; high bit cleared
  // kUser only: 1 or 3 (the policy check decides which may be issued). A v1 certificate has
  // no extensions at all, so the usages, e-mail and URLs below must then be empty.
  int x509_version = 3;
  std::vector<std::string> key_usage;           // kUser: RFC 5280 names, marked critical
  std::vector<std::string> extended_key_usage;  // kUser: OpenSSL short names
  std::string email;                            // kUser: subjectAltName rfc822Name if not empty
  // End-entity certificates (not kCa): CRL distribution point and OCSP AIA, when not empty.
  std::string crl_url;
  std::string ocsp_url;
};

// Signs REQ with the CA: ISSUER_CERT may be null only for Profile::kCa (self-signed).
// The result is always X.509 v3 with SKI and AKI.
Result<ossl::X509Ptr> issue(const IssueRequest& req, X509* issuer_cert, EVP_PKEY* ca_signing_key,
                            const EVP_MD* md);

// issue() with the CA key taken from TOKEN for this signature; an empty REQ.serial is drawn
// from the token's RNG (new_serial). Token keys (hsm::Token::ca_private_key) do not
// survive a lost session, so never keep one: if the first signature fails, a fresh key is
// fetched (the token layer recovers its sessions on the way) and the signature retried once.
Result<ossl::X509Ptr> issue_on_token(const IssueRequest& req, X509* issuer_cert, hsm::Token& token,
                                     const EVP_MD* md);

// CSR for the CA key, for signature by an external root (`kmsctl init --csr`).
Result<ossl::X509ReqPtr> make_ca_request(const X509_NAME* subject, EVP_PKEY* ca_public_key,
                                         EVP_PKEY* ca_signing_key, const EVP_MD* md);

// 16 bytes from the token's RNG as a positive serial number (RFC 5280: at most 20 octets).
Result<std::vector<std::uint8_t>> new_serial(hsm::Token& token);
std::string serial_hex(const X509* cert);

// True when CERT's public key is KEY (compares the public halves).
bool public_key_matches(X509* cert, EVP_PKEY* key);

// Checks that CERT was signed by ISSUER's key.
bool signed_by(X509* cert, X509* issuer);

// PKCS#12 with KEY, CERT and the CA chain, AES-256-CBC + PBKDF2 (OpenSSL 3 defaults), with
// FRIENDLY_NAME, protected by PASSPHRASE. Readable by `openssl pkcs12` and mail clients.
Result<std::vector<std::uint8_t>> make_pkcs12(EVP_PKEY* key, X509* cert, X509* ca,
                                              const std::string& friendly_name,
                                              const SecretBytes& passphrase);

// One key with its certificate in a PKCS#12 bundle.
struct Pkcs12Entry {
  EVP_PKEY* key = nullptr;
  X509* cert = nullptr;
  std::string friendly_name;
};

// PKCS#12 with several keys (a user's signing key and every escrowed encryption key), each
// key bag paired with its certificate by localKeyId, plus the CA. Keys are PKCS#8-shrouded
// with PBES2/AES-256-CBC, certificates in an AES-256-CBC encrypted safe, MAC SHA-256: the same
// algorithms OpenSSL 3 uses by default. The first entry is what single-key readers
// (PKCS12_parse, TLS clients) take: put the signing pair first.
Result<std::vector<std::uint8_t>> make_pkcs12_bundle(const std::vector<Pkcs12Entry>& entries,
                                                     X509* ca, const SecretBytes& passphrase);

std::int64_t not_after_unix(const X509* cert);
std::int64_t not_before_unix(const X509* cert);

}  // namespace kmsd::ca

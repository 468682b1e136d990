// One RAII owner per OpenSSL handle, and the one place that turns OpenSSL's error
// queue into text an administrator can read.
#pragma once

#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/ocsp.h>
#include <openssl/pkcs12.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/result.hpp"
#include "common/secret.hpp"

namespace kmsd::ossl {

template <auto Free>
struct Deleter {
  template <typename T>
  void operator()(T* p) const noexcept {
    Free(p);
  }
};

using EvpPkeyPtr = std::unique_ptr<EVP_PKEY, Deleter<EVP_PKEY_free>>;
using EvpPkeyCtxPtr = std::unique_ptr<EVP_PKEY_CTX, Deleter<EVP_PKEY_CTX_free>>;
using EvpCipherCtxPtr = std::unique_ptr<EVP_CIPHER_CTX, Deleter<EVP_CIPHER_CTX_free>>;
using EvpMdCtxPtr = std::unique_ptr<EVP_MD_CTX, Deleter<EVP_MD_CTX_free>>;
using X509Ptr = std::unique_ptr<X509, Deleter<X509_free>>;
using X509ReqPtr = std::unique_ptr<X509_REQ, Deleter<X509_REQ_free>>;
using X509NamePtr = std::unique_ptr<X509_NAME, Deleter<X509_NAME_free>>;
using X509ExtPtr = std::unique_ptr<X509_EXTENSION, Deleter<X509_EXTENSION_free>>;
using X509StorePtr = std::unique_ptr<X509_STORE, Deleter<X509_STORE_free>>;
using X509StoreCtxPtr = std::unique_ptr<X509_STORE_CTX, Deleter<X509_STORE_CTX_free>>;
using BioPtr = std::unique_ptr<BIO, Deleter<BIO_free_all>>;
using Pkcs12Ptr = std::unique_ptr<PKCS12, Deleter<PKCS12_free>>;
using BignumPtr = std::unique_ptr<BIGNUM, Deleter<BN_free>>;
using Asn1IntegerPtr = std::unique_ptr<ASN1_INTEGER, Deleter<ASN1_INTEGER_free>>;
using OcspRequestPtr = std::unique_ptr<OCSP_REQUEST, Deleter<OCSP_REQUEST_free>>;
using OcspResponsePtr = std::unique_ptr<OCSP_RESPONSE, Deleter<OCSP_RESPONSE_free>>;
using OcspBasicRespPtr = std::unique_ptr<OCSP_BASICRESP, Deleter<OCSP_BASICRESP_free>>;
using OcspCertIdPtr = std::unique_ptr<OCSP_CERTID, Deleter<OCSP_CERTID_free>>;
// Owns the stack and the certificates in it.
struct X509StackDeleter {
  void operator()(STACK_OF(X509) * s) const noexcept { sk_X509_pop_free(s, X509_free); }
};
using X509StackPtr = std::unique_ptr<STACK_OF(X509), X509StackDeleter>;

using Bytes = std::vector<std::uint8_t>;

// Drains the thread's OpenSSL error queue into one line ("" if empty).
std::string drain_errors();

// Error{kCrypto, "<what>: <openssl errors>"}; drains the queue.
Error crypto_error(std::string_view what);

// PEM/DER conversions.
Result<X509Ptr> x509_from_pem(std::string_view pem);
Result<X509Ptr> x509_from_der(std::span<const std::uint8_t> der);
Result<std::string> x509_to_pem(X509* cert);
Result<Bytes> x509_to_der(X509* cert);
Result<std::string> pubkey_to_pem(EVP_PKEY* key);
// Private key as unencrypted PKCS#8 PEM — secret, hence SecretBytes.
Result<SecretBytes> privkey_to_pem(EVP_PKEY* key);
Result<EvpPkeyPtr> pubkey_from_der(std::span<const std::uint8_t> spki_der);
// A PKCS#10 request for KEY with subject CN=CN, signed with KEY (SHA-256), as PEM: what a
// client sends to be certified (the server decides the subject it certifies).
Result<std::string> csr_pem(EVP_PKEY* key, const std::string& cn);

// Hex of bytes, lower case (for serials, fingerprints, digests — never secrets).
std::string hex(std::span<const std::uint8_t> bytes);
// The SHA-256 fingerprint of CERT, "ab:cd:...": openssl x509 -fingerprint -sha256, lower case.
std::string sha256_fingerprint(X509* cert);
// The bytes of lower-case hex as hex() writes it; kInvalidArgument for anything else.
Result<Bytes> from_hex(std::string_view hex);
// SHA-256 of bytes.
Bytes sha256(std::span<const std::uint8_t> bytes);

}  // namespace kmsd::ossl

#include "common/ossl.hpp"

#include <openssl/err.h>
#include <openssl/pem.h>

namespace kmsd::ossl {

std::string drain_errors() {
  std::string out;
  unsigned long e;
  char buf[256];
  while ((e = ERR_get_error()) != 0) {
    ERR_error_string_n(e, buf, sizeof buf);
    if (!out.empty()) out += "; ";
    out += buf;
  }
  return out;
}

Error crypto_error(std::string_view what) {
  std::string detail = drain_errors();
  std::string msg(what);
  if (!detail.empty()) msg += " (" + detail + ")";
  return Error{ErrorCode::kCrypto, std::move(msg)};
}

namespace {
BioPtr mem_bio(std::string_view s) {
  return BioPtr(BIO_new_mem_buf(s.data(), static_cast<int>(s.size())));
}
std::string bio_string(BIO* b) {
  char* p = nullptr;
  long n = BIO_get_mem_data(b, &p);
  return std::string(p, static_cast<std::size_t>(n));
}
}  // namespace

Result<X509Ptr> x509_from_pem(std::string_view pem) {
  auto bio = mem_bio(pem);
  X509Ptr cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  if (!cert) return crypto_error("not a PEM certificate");
  return cert;
}

Result<X509Ptr> x509_from_der(std::span<const std::uint8_t> der) {
  const unsigned char* p = der.data();
  X509Ptr cert(d2i_X509(nullptr, &p, static_cast<long>(der.size())));
  if (!cert) return crypto_error("not a DER certificate");
  return cert;
}

Result<std::string> x509_to_pem(X509* cert) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio || PEM_write_bio_X509(bio.get(), cert) != 1) return crypto_error("writing PEM");
  return bio_string(bio.get());
}

Result<Bytes> x509_to_der(X509* cert) {
  int n = i2d_X509(cert, nullptr);
  if (n <= 0) return crypto_error("encoding certificate");
  Bytes out(static_cast<std::size_t>(n));
  unsigned char* p = out.data();
  i2d_X509(cert, &p);
  return out;
}

Result<std::string> pubkey_to_pem(EVP_PKEY* key) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio || PEM_write_bio_PUBKEY(bio.get(), key) != 1) return crypto_error("writing public key");
  return bio_string(bio.get());
}

Result<SecretBytes> privkey_to_pem(EVP_PKEY* key) {
  BioPtr bio(BIO_new(BIO_s_secmem()));
  if (!bio || PEM_write_bio_PrivateKey(bio.get(), key, nullptr, nullptr, 0, nullptr, nullptr) != 1)
    return crypto_error("writing private key");
  char* p = nullptr;
  long n = BIO_get_mem_data(bio.get(), &p);
  return SecretBytes(reinterpret_cast<const std::uint8_t*>(p), static_cast<std::size_t>(n));
}

Result<EvpPkeyPtr> pubkey_from_der(std::span<const std::uint8_t> spki_der) {
  const unsigned char* p = spki_der.data();
  EvpPkeyPtr key(d2i_PUBKEY(nullptr, &p, static_cast<long>(spki_der.size())));
  if (!key) return crypto_error("not a DER SubjectPublicKeyInfo");
  return key;
}

Result<std::string> csr_pem(EVP_PKEY* key, const std::string& cn) {
  X509ReqPtr req(X509_REQ_new());
  X509NamePtr name(X509_NAME_new());
  if (!req || !name ||
      X509_NAME_add_entry_by_NID(name.get(), NID_commonName, MBSTRING_UTF8,
                                 reinterpret_cast<const unsigned char*>(cn.data()),
                                 static_cast<int>(cn.size()), -1, 0) != 1 ||
      X509_REQ_set_version(req.get(), X509_REQ_VERSION_1) != 1 ||
      X509_REQ_set_subject_name(req.get(), name.get()) != 1 ||
      X509_REQ_set_pubkey(req.get(), key) != 1 || X509_REQ_sign(req.get(), key, EVP_sha256()) <= 0)
    return crypto_error("making the certificate request");
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio || PEM_write_bio_X509_REQ(bio.get(), req.get()) != 1)
    return crypto_error("writing the certificate request");
  char* p = nullptr;
  long n = BIO_get_mem_data(bio.get(), &p);
  return std::string(p, static_cast<std::size_t>(n));
}

std::string sha256_fingerprint(X509* cert) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  X509_digest(cert, EVP_sha256(), md, &n);
  const std::string digits = hex({md, n});
  std::string out;
  for (std::size_t i = 0; i < digits.size(); i += 2) {
    if (!out.empty()) out += ':';
    out += digits.substr(i, 2);
  }
  return out;
}

std::string hex(std::span<const std::uint8_t> bytes) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size() * 2);
  for (auto b : bytes) {
    out.push_back(digits[b >> 4]);
    out.push_back(digits[b & 0xf]);
  }
  return out;
}

Result<Bytes> from_hex(std::string_view hex) {
  if (hex.size() % 2 != 0)
    return make_error(ErrorCode::kInvalidArgument, "hex text has an odd number of digits");
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  Bytes out;
  out.reserve(hex.size() / 2);
  for (std::size_t i = 0; i < hex.size(); i += 2) {
    int hi = nibble(hex[i]), lo = nibble(hex[i + 1]);
    if (hi < 0 || lo < 0)
      return make_error(ErrorCode::kInvalidArgument,
                        "not lower-case hex: '" + std::string(hex) + "'");
    out.push_back(static_cast<std::uint8_t>(hi << 4 | lo));
  }
  return out;
}

Bytes sha256(std::span<const std::uint8_t> bytes) {
  Bytes out(32);
  unsigned int n = 0;
  EVP_Digest(bytes.data(), bytes.size(), out.data(), &n, EVP_sha256(), nullptr);
  return out;
}

}  // namespace kmsd::ossl

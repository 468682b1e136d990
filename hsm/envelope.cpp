#include "hsm/envelope.hpp"

#include <openssl/evp.h>

#include <limits>

#include "common/ossl.hpp"

namespace kmsd::hsm::envelope {

namespace {

void put_be(std::vector<std::uint8_t>& out, std::uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; --i) out.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
}

std::uint64_t get_be(std::span<const std::uint8_t> s) {
  std::uint64_t v = 0;
  for (std::uint8_t b : s) v = (v << 8) | b;
  return v;
}

Error open_failed() {
  return make_error(ErrorCode::kCrypto, kOpenFailed);
}

}  // namespace

std::optional<Parsed> parse(std::span<const std::uint8_t> blob) {
  if (blob.size() < kFixedHeaderLen) return std::nullopt;
  Parsed p;
  p.version = blob[0];
  if (p.version != kVersion && p.version != kVersion1) return std::nullopt;
  p.mechanism = blob[1];
  p.master_version = static_cast<std::uint32_t>(get_be(blob.subspan(2, 4)));
  std::size_t w = static_cast<std::size_t>(get_be(blob.subspan(6, 2)));
  if (w == 0 || w > kMaxWrappedLen) return std::nullopt;
  std::size_t rest = blob.size() - kFixedHeaderLen;
  if (rest < w) return std::nullopt;
  rest -= w;
  if (rest < kNonceLen) return std::nullopt;
  rest -= kNonceLen;
  if (rest < kTagLen) return std::nullopt;
  p.key_header = blob.subspan(0, kKeyHeaderLen);
  p.wrapped = blob.subspan(kFixedHeaderLen, w);
  p.nonce = blob.subspan(kFixedHeaderLen + w, kNonceLen);
  p.authenticated = blob.subspan(0, kFixedHeaderLen + w + kNonceLen);
  p.ciphertext = blob.subspan(kFixedHeaderLen + w + kNonceLen);
  return p;
}

std::vector<std::uint8_t> key_header(WrapMechanism m, std::uint32_t master_version) {
  std::vector<std::uint8_t> out;
  out.push_back(kVersion);
  out.push_back(static_cast<std::uint8_t>(m));
  put_be(out, master_version, 4);
  return out;
}

std::vector<std::uint8_t> key_binding(std::span<const std::uint8_t> key_header,
                                      std::span<const std::uint8_t> nonce) {
  std::vector<std::uint8_t> out(key_header.begin(), key_header.end());
  out.insert(out.end(), nonce.begin(), nonce.end());
  return out;
}

std::vector<std::uint8_t> payload_aad(std::span<const std::uint8_t> nonce,
                                      std::span<const std::uint8_t> aad) {
  std::vector<std::uint8_t> out{kVersion};
  out.insert(out.end(), nonce.begin(), nonce.end());
  put_be(out, aad.size(), 8);
  out.insert(out.end(), aad.begin(), aad.end());
  return out;
}

std::vector<std::uint8_t> bind(std::span<const std::uint8_t> prefix,
                               std::span<const std::uint8_t> aad) {
  std::vector<std::uint8_t> out(prefix.begin(), prefix.end());
  put_be(out, aad.size(), 8);
  out.insert(out.end(), aad.begin(), aad.end());
  return out;
}

std::vector<std::uint8_t> prefix(WrapMechanism m, std::uint32_t master_version,
                                 std::span<const std::uint8_t> wrapped,
                                 std::span<const std::uint8_t> nonce) {
  std::vector<std::uint8_t> out = key_header(m, master_version);
  put_be(out, wrapped.size(), 2);
  out.insert(out.end(), wrapped.begin(), wrapped.end());
  out.insert(out.end(), nonce.begin(), nonce.end());
  return out;
}

Result<std::vector<std::uint8_t>> gcm_seal(const SecretBytes& key,
                                           std::span<const std::uint8_t> nonce,
                                           std::span<const std::uint8_t> plaintext,
                                           std::span<const std::uint8_t> aad) {
  if (key.size() != kDataKeyLen || nonce.size() != kNonceLen ||
      plaintext.size() > static_cast<std::size_t>(std::numeric_limits<int>::max() - 64) ||
      aad.size() > static_cast<std::size_t>(std::numeric_limits<int>::max())) {
    return make_error(ErrorCode::kInvalidArgument, "payload too large to seal");
  }
  ossl::EvpCipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  if (!ctx) return ossl::crypto_error("allocating a cipher context");
  std::vector<std::uint8_t> out(plaintext.size() + kTagLen);
  int len = 0;
  int total = 0;
  if (EVP_EncryptInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, nullptr, nullptr) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_IVLEN, static_cast<int>(kNonceLen),
                          nullptr) != 1 ||
      EVP_EncryptInit_ex(ctx.get(), nullptr, nullptr, key.data(), nonce.data()) != 1 ||
      EVP_EncryptUpdate(ctx.get(), nullptr, &len, aad.data(), static_cast<int>(aad.size())) != 1 ||
      EVP_EncryptUpdate(ctx.get(), out.data(), &len, plaintext.data(),
                        static_cast<int>(plaintext.size())) != 1) {
    return ossl::crypto_error("sealing the payload (AES-256-GCM)");
  }
  total = len;
  if (EVP_EncryptFinal_ex(ctx.get(), out.data() + total, &len) != 1) {
    return ossl::crypto_error("sealing the payload (AES-256-GCM)");
  }
  total += len;
  if (EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_GET_TAG, static_cast<int>(kTagLen),
                          out.data() + total) != 1) {
    return ossl::crypto_error("sealing the payload (AES-256-GCM tag)");
  }
  out.resize(static_cast<std::size_t>(total) + kTagLen);
  return out;
}

Result<SecretBytes> gcm_open(const SecretBytes& key, std::span<const std::uint8_t> nonce,
                             std::span<const std::uint8_t> ciphertext_and_tag,
                             std::span<const std::uint8_t> aad) {
  if (key.size() != kDataKeyLen || nonce.size() != kNonceLen ||
      ciphertext_and_tag.size() < kTagLen ||
      ciphertext_and_tag.size() > static_cast<std::size_t>(std::numeric_limits<int>::max()) ||
      aad.size() > static_cast<std::size_t>(std::numeric_limits<int>::max())) {
    return open_failed();
  }
  std::size_t n = ciphertext_and_tag.size() - kTagLen;
  ossl::EvpCipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  if (!ctx) return ossl::crypto_error("allocating a cipher context");
  SecretBytes out(n + 16);
  int len = 0;
  // The tag is copied out: EVP_CTRL_GCM_SET_TAG takes a non-const pointer.
  std::uint8_t tag[kTagLen];
  std::copy(ciphertext_and_tag.begin() + static_cast<std::ptrdiff_t>(n), ciphertext_and_tag.end(),
            tag);
  bool ok =
      EVP_DecryptInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, nullptr, nullptr) == 1 &&
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_IVLEN, static_cast<int>(kNonceLen),
                          nullptr) == 1 &&
      EVP_DecryptInit_ex(ctx.get(), nullptr, nullptr, key.data(), nonce.data()) == 1 &&
      EVP_DecryptUpdate(ctx.get(), nullptr, &len, aad.data(), static_cast<int>(aad.size())) == 1 &&
      EVP_DecryptUpdate(ctx.get(), out.data(), &len, ciphertext_and_tag.data(),
                        static_cast<int>(n)) == 1;
  int total = len;
  ok = ok &&
       EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_TAG, static_cast<int>(kTagLen), tag) == 1 &&
       EVP_DecryptFinal_ex(ctx.get(), out.data() + total, &len) == 1;
  if (!ok) {
    ossl::drain_errors();  // the uniform message says all there is to say
    return open_failed();
  }
  out.resize(static_cast<std::size_t>(total + len));
  return out;
}

}  // namespace kmsd::hsm::envelope

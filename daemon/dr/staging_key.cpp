#include "daemon/dr/staging_key.hpp"

#include <fcntl.h>
#include <openssl/err.h>
#include <openssl/rand.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "common/fd.hpp"
#include "common/files.hpp"

namespace kmsd::dr {

namespace fs = std::filesystem;

namespace {

constexpr std::size_t kKekBytes = 32;  // AES-256: id-aes256-wrap
constexpr std::size_t kMaxKekFile = 64 * 1024;

using files::io_error;
using files::sync_dir;

bool plain_run_id(std::string_view id) {
  if (id.empty() || id.size() > 128) return false;
  for (char c : id)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '-'))
      return false;
  return true;
}

// OPENSSL_malloc'ed bytes handed to CMS_add0_recipient_key, which takes ownership on success
// (the KEKRecipientInfo frees the key with OPENSSL_clear_free and the id with the structure).
struct OsslClearFree {
  std::size_t n = 0;
  void operator()(unsigned char* p) const noexcept { OPENSSL_clear_free(p, n); }
};
using OsslBytes = std::unique_ptr<unsigned char, OsslClearFree>;

OsslBytes ossl_copy(const std::uint8_t* p, std::size_t n) {
  OsslBytes out(static_cast<unsigned char*>(OPENSSL_malloc(n)), OsslClearFree{n});
  if (out) std::memcpy(out.get(), p, n);
  return out;
}

std::string where(const fs::path& staging, std::string_view run_id) {
  return "keys/" + std::string(run_id) + ".kek.der in " + staging.string();
}

// What an operator does about a KEK file that cannot be used.
std::string remedy(std::string_view run_id) {
  return ". The messages staged by run " + std::string(run_id) +
         " cannot be opened without it and stay staged (nothing is lost): restore the file "
         "from a backup of the staging directory and run reencrypt again, or, while the old "
         "keys are still at hand, stage those messages again with predecrypt into a new "
         "staging directory";
}

}  // namespace

fs::path keys_dir(const fs::path& staging) {
  return staging / "keys";
}

fs::path kek_file(const fs::path& staging, std::string_view run_id) {
  return keys_dir(staging) / (std::string(run_id) + ".kek.der");
}

std::string run_of_pack(std::string_view pack) {
  constexpr std::string_view kExt = ".pack";
  if (pack.size() <= kExt.size() || pack.substr(pack.size() - kExt.size()) != kExt) return {};
  const std::string_view stem = pack.substr(0, pack.size() - kExt.size());
  const auto w = stem.rfind("-w");
  if (w == std::string_view::npos || w == 0 || w + 2 == stem.size()) return {};
  for (char c : stem.substr(w + 2))
    if (c < '0' || c > '9') return {};
  const std::string_view run = stem.substr(0, w);
  return plain_run_id(run) ? std::string(run) : std::string();
}

bool sealed_under_kek(CMS_ContentInfo* cms) {
  STACK_OF(CMS_RecipientInfo)* ris = CMS_get0_RecipientInfos(cms);
  for (int i = 0; i < sk_CMS_RecipientInfo_num(ris); ++i)
    if (CMS_RecipientInfo_type(sk_CMS_RecipientInfo_value(ris, i)) == CMS_RECIPINFO_KEK)
      return true;
  ERR_clear_error();
  return false;
}

Result<StagingKey> StagingKey::generate(std::string run_id) {
  if (!plain_run_id(run_id))
    return make_error(ErrorCode::kInternal, "a run id must be letters, digits and '-'");
  SecretBytes kek(kKekBytes);
  if (RAND_priv_bytes(kek.data(), static_cast<int>(kek.size())) != 1)
    return ossl::crypto_error("generating the run's staging key");
  return StagingKey(std::move(run_id), std::move(kek));
}

Status StagingKey::store(const fs::path& staging, X509* custody_cert) const {
  ossl::BioPtr content(BIO_new_mem_buf(kek_.data(), static_cast<int>(kek_.size())));
  if (!content) return ossl::crypto_error("allocating the staging key's buffer");
  auto cms = encrypt(content.get(), {custody_cert});
  if (!cms.ok())
    return cms.error().context("encrypting the run's staging key to the custody certificate");
  auto der = encode(cms->get(), Format::kDer, {}, false);
  if (!der.ok()) return der.error();

  const fs::path dir = keys_dir(staging);
  std::error_code ec;
  const bool fresh_dir = !fs::is_directory(dir, ec);
  if (fresh_dir) {
    if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST)
      return io_error(dir, "cannot create", errno);
    KMSD_TRY(sync_dir(staging));  // keys/ stays once a KEK file is in it
  }
  // Written whole under a temporary name, fsync'd, renamed to its own name without replacing an
  // existing file, and keys/ fsync'd: a KEK file is either complete or absent, even after a kill.
  if (auto st = files::write_atomic(kek_file(staging, run_id_), *der, 0600, /*overwrite=*/false);
      !st.ok())
    return st.error().context("writing the run's staging key file");
  return {};
}

void remove_staging_key_leftovers(const fs::path& staging) {
  std::error_code ec;
  const fs::path dir = keys_dir(staging);
  if (!fs::is_directory(dir, ec)) return;
  std::vector<fs::path> gone;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.ends_with(".kek.der.tmp"))  // files::write_atomic's temporary name
      gone.push_back(e.path());
  }
  for (const auto& p : gone) fs::remove(p, ec);
}

Result<StagingKey> StagingKey::load(const fs::path& staging, const std::string& run_id,
                                    EVP_PKEY* custody_key, X509* custody_cert) {
  if (!plain_run_id(run_id))
    return make_error(ErrorCode::kInvalidArgument,
                      "the run id '" + run_id + "' (from a pack name) is not a run id");
  const fs::path file = kek_file(staging, run_id);
  const std::string name = where(staging, run_id);
  UniqueFd fd(::open(file.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  if (!fd.valid()) {
    const int err = errno;
    return make_error(err == ENOENT ? ErrorCode::kNotFound : ErrorCode::kIo,
                      "the run's staging key file " + name + " cannot be opened (" +
                          std::strerror(err) + ")" + remedy(run_id));
  }
  ossl::Bytes der(kMaxKekFile);
  std::size_t have = 0;
  for (;;) {
    const ssize_t n = ::read(fd.get(), der.data() + have, der.size() - have);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      return make_error(ErrorCode::kIo, "cannot read the run's staging key file " + name + " (" +
                                            std::strerror(err) + ")" + remedy(run_id));
    }
    if (n == 0 || have + static_cast<std::size_t>(n) == der.size()) {
      have += static_cast<std::size_t>(n);
      break;
    }
    have += static_cast<std::size_t>(n);
  }
  der.resize(have);
  ERR_clear_error();
  ParsedMessage parsed = parse_message(der, Format::kDer);
  if (parsed.kind != Kind::kEncrypted || sealed_under_kek(parsed.cms.get()))
    return make_error(ErrorCode::kCrypto, "the run's staging key file " + name +
                                              " is damaged: it is not a CMS EnvelopedData to "
                                              "the custody certificate" +
                                              remedy(run_id));
  auto content = decrypt(parsed.cms.get(), custody_key, custody_cert);
  if (!content.ok())
    return make_error(ErrorCode::kCrypto,
                      "the run's staging key file " + name +
                          " does not open with the custody key (" + content.error().message +
                          "): it is damaged or was made for another custody certificate" +
                          remedy(run_id));
  char* p = nullptr;
  const long n = BIO_get_mem_data(content->get(), &p);
  if (n != static_cast<long>(kKekBytes))
    return make_error(ErrorCode::kCrypto,
                      "the run's staging key file " + name + " opens to " + std::to_string(n) +
                          " bytes, not a 32-byte AES-256 key: it is damaged" + remedy(run_id));
  return StagingKey(run_id, SecretBytes(reinterpret_cast<const std::uint8_t*>(p), kKekBytes));
}

Result<CmsPtr> StagingKey::seal(BIO* content) const {
  ERR_clear_error();
  CmsPtr cms(CMS_encrypt(nullptr, content, EVP_aes_256_cbc(), CMS_BINARY | CMS_PARTIAL));
  if (!cms) return ossl::crypto_error("starting the staged record");
  OsslBytes key = ossl_copy(kek_.data(), kek_.size());
  OsslBytes id = ossl_copy(reinterpret_cast<const std::uint8_t*>(run_id_.data()), run_id_.size());
  if (!key || !id) return ossl::crypto_error("allocating the staged record's recipient");
  if (CMS_add0_recipient_key(cms.get(), NID_id_aes256_wrap, key.get(), kek_.size(), id.get(),
                             run_id_.size(), nullptr, nullptr, nullptr) == nullptr)
    return ossl::crypto_error("adding the run's staging key as the record's recipient");
  (void)key.release();  // owned by the KEKRecipientInfo now
  (void)id.release();
  if (CMS_final(cms.get(), content, nullptr, CMS_BINARY) != 1)
    return ossl::crypto_error("sealing the staged record under the run's staging key");
  return cms;
}

Result<ossl::BioPtr> StagingKey::open(CMS_ContentInfo* cms) const {
  ERR_clear_error();
  // The key is only borrowed: OpenSSL sets it on the matching KEKRecipientInfo, unwraps the
  // content key and clears it again.
  if (CMS_decrypt_set1_key(cms, const_cast<std::uint8_t*>(kek_.data()), kek_.size(),
                           reinterpret_cast<const unsigned char*>(run_id_.data()),
                           run_id_.size()) != 1)
    return ossl::crypto_error("the record has no KEK recipient of run " + run_id_ +
                              " that its staging key opens");
  ossl::BioPtr out(BIO_new(BIO_s_secmem()));
  if (!out) return ossl::crypto_error("allocating memory for a decrypted message");
  if (CMS_decrypt(cms, nullptr, nullptr, nullptr, out.get(), CMS_BINARY) != 1)
    return ossl::crypto_error("decrypting the record with run " + run_id_ + "'s staging key");
  return out;
}

Result<std::shared_ptr<const StagingKey>> StagingKeyCache::get(const std::string& run_id) {
  std::lock_guard lock(mu_);
  auto it = runs_.find(run_id);
  if (it != runs_.end()) return it->second;
  auto key = StagingKey::load(staging_, run_id, key_, cert_);
  Result<std::shared_ptr<const StagingKey>> entry =
      key.ok() ? Result<std::shared_ptr<const StagingKey>>(
                     std::make_shared<const StagingKey>(std::move(*key)))
               : Result<std::shared_ptr<const StagingKey>>(key.error());
  return runs_.emplace(run_id, std::move(entry)).first->second;
}

std::size_t StagingKeyCache::loaded() const {
  std::lock_guard lock(mu_);
  std::size_t n = 0;
  for (const auto& [run, r] : runs_) n += r.ok();
  return n;
}

std::size_t StagingKeyCache::failed() const {
  std::lock_guard lock(mu_);
  std::size_t n = 0;
  for (const auto& [run, r] : runs_) n += !r.ok();
  return n;
}

}  // namespace kmsd::dr

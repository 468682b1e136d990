// Disaster recovery staging keys: a predecrypt run that opens messages in this process (the
// PKCS#12 key source) seals its staged records under a random AES-256 key-encryption key of its
// own (the run's KEK) instead of encrypting each one to the RSA-3072 custody certificate: one
// AES key wrap per message instead of one RSA-3072 public-key operation. The KEK itself is
// stored once per run, encrypted to the custody certificate, so what opens the staging area is
// still the custody key and only the custody key.
//
// Files (all CMS through OpenSSL's CMS API, DER, version 1 of this layout):
//   <staging>/keys/<run>.kek.der   the run's KEK file: CMS EnvelopedData with one
//       KeyTransRecipientInfo to the custody certificate, AES-256-CBC content = the 32 bytes of
//       the KEK. Written 0600 (files::write_atomic), fsync'd with its directory before the run's
//       first pack is created, so a record sealed under a KEK always has its KEK file on disk.
//   a staged record of such a run   CMS EnvelopedData with exactly one KEKRecipientInfo
//       (RFC 5652 §6.2.3; id-aes256-wrap, kekid.keyIdentifier = the run id's ASCII bytes) and
//       AES-256-CBC content. `openssl cms -decrypt -secretkey HEX -secretkeyid HEX` opens it.
// Records of earlier versions and of the running-daemon key source are EnvelopedData with a
// KeyTransRecipientInfo to the custody certificate; reencrypt reads both.
//
// The KEK lives in cleansing memory (SecretBytes) only; it never reaches a file, a log, an
// error or the manifest.
#pragma once

#include <openssl/cms.h>

#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>

#include "common/ossl.hpp"
#include "common/result.hpp"
#include "common/secret.hpp"
#include "daemon/dr/message.hpp"

namespace kmsd::dr {

// <staging>/keys, and the KEK file of RUN_ID in it.
std::filesystem::path keys_dir(const std::filesystem::path& staging);
std::filesystem::path kek_file(const std::filesystem::path& staging, std::string_view run_id);

// Removes temporary KEK files a killed run left in <staging>/keys/ (never a key in the clear:
// only the encrypted KEK file being written).
void remove_staging_key_leftovers(const std::filesystem::path& staging);

// The run id of a pack name "<run>-w<N>.pack" (pack.hpp), or "" when the name is not of that
// form.
std::string run_of_pack(std::string_view pack);

// True when CMS is EnvelopedData with a KEKRecipientInfo: a record sealed under a run's KEK.
bool sealed_under_kek(CMS_ContentInfo* cms);

// One run's KEK. Move-only; the key is cleansed when it is freed.
// Thread-safety: seal() and open() may run on many threads at once (the key is only read).
class StagingKey {
 public:
  // A fresh random KEK for RUN_ID (letters, digits and '-' only: it names a file).
  static Result<StagingKey> generate(std::string run_id);
  // Opens <staging>/keys/<run>.kek.der with the custody key (a software key or a token key
  // whose private operation is C_Decrypt). Errors name the file and say what to do.
  static Result<StagingKey> load(const std::filesystem::path& staging, const std::string& run_id,
                                 EVP_PKEY* custody_key, X509* custody_cert);

  // Writes the KEK, encrypted to CUSTODY_CERT, to <staging>/keys/<run>.kek.der: mode 0600,
  // written whole under a temporary name and fsync'd, then renamed to its name without
  // replacing an existing file (files::write_atomic), keys/ fsync'd (and <staging> when keys/ is
  // new). A kill leaves the file complete or absent (and perhaps a temporary file).
  Status store(const std::filesystem::path& staging, X509* custody_cert) const;

  // EnvelopedData (AES-256-CBC) of CONTENT's bytes (consumed) with one KEKRecipientInfo under
  // this key, identified by the run id.
  Result<CmsPtr> seal(BIO* content) const;
  // The content of a record seal() made, in a cleansing memory BIO. kCrypto when CMS has no
  // KEKRecipientInfo for this run or does not open with this key.
  Result<ossl::BioPtr> open(CMS_ContentInfo* cms) const;

  const std::string& run_id() const noexcept { return run_id_; }

 private:
  StagingKey(std::string run_id, SecretBytes kek)
      : run_id_(std::move(run_id)), kek_(std::move(kek)) {}
  std::string run_id_;
  SecretBytes kek_;
};

// The KEKs reencrypt meets, each run's loaded with the custody key once (one private-key
// operation per run, not per message) and kept for the life of this object. A run whose KEK
// file is missing or does not open is remembered as such: its messages fail with that reason
// (and stay staged), the other runs' go on.
// Thread-safety: get() from every worker at once; loads are serialized.
class StagingKeyCache {
 public:
  StagingKeyCache(std::filesystem::path staging, EVP_PKEY* custody_key, X509* custody_cert)
      : staging_(std::move(staging)), key_(custody_key), cert_(custody_cert) {}
  Result<std::shared_ptr<const StagingKey>> get(const std::string& run_id);
  // How many runs' KEK files were opened, and how many could not be.
  std::size_t loaded() const;
  std::size_t failed() const;

 private:
  std::filesystem::path staging_;
  EVP_PKEY* key_;
  X509* cert_;
  mutable std::mutex mu_;
  std::map<std::string, Result<std::shared_ptr<const StagingKey>>> runs_;
};

}  // namespace kmsd::dr

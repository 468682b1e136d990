// Disaster recovery pipeline: pre-decryption (old keys -> DR custody certificate) and
// re-encryption (custody key -> users' new encryption certificates), parallel on a bounded
// pool of threads, resumable from the manifest in the staging directory.
//
// Staging directory layout:
//   manifest.db          the manifest (daemon/dr/manifest.hpp)
//   packs/<run>-w<N>.pack  append-only packs of staged messages (daemon/dr/pack.hpp), one per
//                        worker per run; its manifest row gives the pack, offset, length and
//                        SHA-256 of each record
//   keys/<run>.kek.der   the run's staging key (KEK), encrypted to the custody certificate
//                        (daemon/dr/staging_key.hpp): runs with the PKCS#12 key source seal each
//                        record under it (a KEKRecipientInfo); runs with the running daemon's
//                        key source encrypt each record to the custody certificate itself (a
//                        KeyTransRecipientInfo), as every run did before staging keys
// Re-encryption writes <out>/<path>, in the original format, encrypted to the users' new
// certificates. Plaintext exists only in memory, one message per worker at a time, in
// cleansing buffers; no file ever holds it.
#pragma once

#include <chrono>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "common/ossl.hpp"
#include "common/result.hpp"
#include "daemon/dr/keyring.hpp"
#include "daemon/dr/manifest.hpp"
#include "daemon/dr/message.hpp"
#include "daemon/dr/staging_key.hpp"

namespace kmsd::dr {

struct Progress {
  std::size_t done = 0;   // handled or found done, this run
  std::size_t total = 0;  // to look at in this run
  double seconds = 0;     // since the run started
};
using ProgressFn = std::function<void(const Progress&)>;

struct RunSummary {
  std::size_t total = 0;         // messages considered (store for predecrypt, staged for reencrypt)
  std::size_t already_done = 0;  // recorded by an earlier run: not touched again
  std::size_t processed = 0;     // handled by this run
  std::map<std::string, std::size_t> this_run;  // status -> count, this run
  std::map<std::string, std::size_t> overall;   // status -> count in the manifest after the run
  // This run: not staged / not re-encrypted, why (the first kProblemsKept; the manifest has
  // them all: kmsctl dr status -o json). Waiting messages are counted by reason instead.
  std::vector<ManifestRow> problems;
  std::size_t problems_omitted = 0;
  std::map<std::string, std::size_t> waiting;  // reason -> messages, this run (reencrypt)
  double seconds = 0;
  bool stopped_early = false;  // stop_after reached
};

// At most this many problem rows are kept in a summary, so memory does not grow with the store.
inline constexpr std::size_t kProblemsKept = 1000;

// What a key source made of one encrypted message.
struct Rewrapped {
  std::string status;  // kStaged, kUnknownRecipient or kFailed
  std::string reason;  // for every status but kStaged
  std::string users;   // users whose old key opens it, ","-separated
  CmsPtr cms;          // kStaged: the content encrypted to the custody certificate only, or sealed
                       // under the run's staging key only
};

// Where the old keys are. Opens an encrypted message and encrypts its content to the custody
// certificate; the plaintext never leaves the source.
// Thread-safety: rewrap() is called from every worker at once.
class KeySource {
 public:
  virtual ~KeySource() = default;
  // RECIPIENTS: the message's recipient identifiers (ParsedMessage::recipients).
  virtual Rewrapped rewrap(CMS_ContentInfo* cms, const std::vector<std::string>& recipients,
                           X509* custody_cert) const = 0;
  // A source that opens messages in this process can seal the content under the run's staging
  // key instead (one AES key wrap per message instead of an RSA-3072 encryption). Sources that
  // cannot (the running daemon's: the content never leaves kmsd) say false, and predecrypt
  // calls rewrap() with the custody certificate.
  virtual bool can_seal() const { return false; }
  virtual Rewrapped rewrap_sealed(CMS_ContentInfo* cms, const std::vector<std::string>& recipients,
                                  const StagingKey& key) const;
};

// With the keys FIND gives for recipient identifiers, in this process (the PKCS#12 source, and
// the daemon's side of its source): the first recipient with a key opens the message.
using FindKey = std::function<const KeyRing::Entry*(const std::string& recipient_id)>;
Rewrapped rewrap_with(const FindKey& find, CMS_ContentInfo* cms,
                      const std::vector<std::string>& recipients, X509* custody_cert);
// The same, the content sealed under the run's staging key KEY instead.
Rewrapped rewrap_with(const FindKey& find, CMS_ContentInfo* cms,
                      const std::vector<std::string>& recipients, const StagingKey& key);

class KeyRingSource final : public KeySource {
 public:
  explicit KeyRingSource(const KeyRing& ring) : ring_(ring) {}
  Rewrapped rewrap(CMS_ContentInfo* cms, const std::vector<std::string>& recipients,
                   X509* custody_cert) const override {
    return rewrap_with([this](const std::string& id) { return ring_.find(id); }, cms, recipients,
                       custody_cert);
  }
  bool can_seal() const override { return true; }
  Rewrapped rewrap_sealed(CMS_ContentInfo* cms, const std::vector<std::string>& recipients,
                          const StagingKey& key) const override {
    return rewrap_with([this](const std::string& id) { return ring_.find(id); }, cms, recipients,
                       key);
  }

 private:
  const KeyRing& ring_;
};

struct PredecryptOptions {
  std::filesystem::path store;
  std::filesystem::path staging;
  const KeyRing* keys = nullptr;      // the PKCS#12 source, or:
  const KeySource* source = nullptr;  // any source (the running daemon's)
  X509* custody_cert = nullptr;
  // Encrypt every record to the custody certificate even when the source could seal under a
  // staging key: the layout before staging keys, kept so that tests can write it (reencrypt
  // must go on reading staging directories made by earlier versions).
  bool per_message_custody = false;
  unsigned threads = 0;  // 0: one per core
  ProgressFn progress;
  // For crash tests: commit this many messages, then stop as a killed run would (the bytes of
  // messages in flight may be in a pack without their rows). 0: run to the end.
  std::size_t stop_after = 0;
};

// Classifies every message of the store and stages every one it can open. Messages recorded by
// an earlier run with the same digest are skipped; "failed" and "unknown-recipient" ones are
// tried again (a key may have been added). Errors: the run cannot go on (staging not writable,
// manifest unusable, the staging directory made for another store or custody certificate).
Result<RunSummary> predecrypt(const PredecryptOptions& options);

// Status words of re-encryption (this_run keys).
inline constexpr const char* kReencrypted = "reencrypted";
inline constexpr const char* kWaiting = "waiting";  // a user has no new certificate yet

struct ReencryptOptions {
  std::filesystem::path staging;
  std::filesystem::path out;
  EVP_PKEY* custody_key = nullptr;  // software (drills) or a token key (hsm::Token)
  X509* custody_cert = nullptr;
  std::map<std::string, X509*> new_certs;  // user -> new encryption certificate
  unsigned threads = 0;
  ProgressFn progress;
  std::size_t stop_after = 0;
};

// Re-encrypts every staged message whose users all have a new certificate; the others stay
// staged ("waiting") for a later run. Already re-encrypted messages are skipped. A record sealed
// under a staging key is opened with its run's KEK (keys/<run>.kek.der, opened once per run with
// the custody key); a record encrypted to the custody certificate with the custody key. A run
// whose KEK file is missing or damaged fails only its own messages (they stay staged).
Result<RunSummary> reencrypt(const ReencryptOptions& options);

}  // namespace kmsd::dr

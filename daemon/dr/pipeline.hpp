// Disaster recovery pipeline: pre-decryption (old keys -> DR custody certificate) and
// re-encryption (custody key -> users' new encryption certificates), parallel on a bounded
// pool of threads, resumable from the manifest in the staging directory.
//
// Staging directory layout:
//   manifest.db          the manifest (daemon/dr/manifest.hpp)
//   messages/<path>      each staged message at its store path, in its own format, encrypted to
//                        the custody certificate only
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
  std::vector<ManifestRow> problems;            // this run: not staged / not re-encrypted, why
  double seconds = 0;
  bool stopped_early = false;  // stop_after reached
};

struct PredecryptOptions {
  std::filesystem::path store;
  std::filesystem::path staging;
  const KeyRing* keys = nullptr;
  X509* custody_cert = nullptr;
  unsigned threads = 0;  // 0: one per core
  ProgressFn progress;
  // For crash tests: commit this many messages, then stop as a killed run would (the files of
  // messages in flight may be on disk without their rows). 0: run to the end.
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
  EVP_PKEY* custody_key = nullptr;  // software (drills) or a token key through libp11
  X509* custody_cert = nullptr;
  std::map<std::string, X509*> new_certs;  // user -> new encryption certificate
  unsigned threads = 0;
  ProgressFn progress;
  std::size_t stop_after = 0;
};

// Re-encrypts every staged message whose users all have a new certificate; the others stay
// staged ("waiting") for a later run. Already re-encrypted messages are skipped.
Result<RunSummary> reencrypt(const ReencryptOptions& options);

}  // namespace kmsd::dr

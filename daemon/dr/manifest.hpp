// Disaster recovery manifest: one SQLite file in the staging directory that says, for every
// message of the store, what pre-decryption and re-encryption did with it. A killed run resumes
// from it: a message recorded here is never processed again.
//
// Crash order: a staged message is appended to its run's pack (daemon/dr/pack.hpp) and a
// re-encrypted file is written to a temporary name and renamed into place; the pack is
// fdatasync'd (the file system synced, for re-encrypted files), and only then is the row
// committed. A row therefore always names durable bytes; bytes without a row (a kill between the
// write and the commit) are dead space in a pack, or a file written again, atomically, on the
// next run.
//
// Layout: a manifest made before staging packs (one file per staged message under messages/) is
// refused with a message saying to start a new staging directory.
//
// Thread-safety: none; the pipeline's collector thread is the only user.
#pragma once

#include <sqlite3.h>

#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "common/result.hpp"
#include "daemon/dr/pack.hpp"

namespace kmsd::dr {

// Status words of pre-decryption (the manifest's "status" column and the summary's keys).
inline constexpr const char* kStaged = "staged";
inline constexpr const char* kNotEncrypted = "not-encrypted";
inline constexpr const char* kUnknownRecipient = "unknown-recipient";
inline constexpr const char* kDamaged = "damaged";
inline constexpr const char* kFailed = "failed";

struct ManifestRow {
  std::string path;        // relative to the store root
  std::string format;      // "mime" | "der"
  std::string digest;      // SHA-256 hex of the source file as read
  std::string status;      // one of the words above
  std::string recipients;  // recipient identifiers named by the message, "\n"-separated
  std::string users;       // users whose old key opened it / who must get it back, ","-separated
  std::string reason;      // for every status but staged: what was found, in words
  StagedCopy copy;         // staged: where its bytes are
};

struct ReencryptRow {
  std::string path;
  std::string users;
  std::string out_digest;  // SHA-256 hex of the file written to --out
};

class Manifest {
 public:
  static Result<std::unique_ptr<Manifest>> open(const std::filesystem::path& file);
  ~Manifest();

  // Records KEY=VALUE the first time; later runs must give the same VALUE (the same store, the
  // same custody certificate), else kFailedPrecondition with both values named.
  Status bind(const std::string& key, const std::string& value, const std::string& what);
  Result<std::string> setting(const std::string& key);

  // path -> (digest, status) of every recorded message.
  Result<std::map<std::string, std::pair<std::string, std::string>>> recorded();
  // Every row with status "staged".
  Result<std::vector<ManifestRow>> staged();
  // All rows, in path order.
  Result<std::vector<ManifestRow>> rows();
  // Inserts or replaces ROWS in one transaction.
  Status record(const std::vector<ManifestRow>& rows);

  // Paths already re-encrypted, and their rows.
  Result<std::map<std::string, ReencryptRow>> reencrypted();
  Status record_reencrypted(const std::vector<ReencryptRow>& rows);

  // status -> count.
  Result<std::map<std::string, std::size_t>> counts();
  // How many messages are re-encrypted.
  Result<std::size_t> reencrypted_count();

 private:
  explicit Manifest(sqlite3* db) : db_(db) {}
  Status exec(const char* sql, const char* what);
  sqlite3* db_;
};

// A second connection to the manifest for the threads that feed and run the pipeline's
// workers: per-message lookups and paged reads, so that no run holds the whole manifest in
// memory. WAL mode: these reads never block the collector's commits.
// Thread-safety: safe to share (calls serialize on a mutex).
class ManifestReader {
 public:
  static Result<std::unique_ptr<ManifestReader>> open(const std::filesystem::path& file);
  ~ManifestReader();

  // (digest, status) recorded for PATH, or nullopt.
  Result<std::optional<std::pair<std::string, std::string>>> lookup(const std::string& path);

  struct StagedRow {
    ManifestRow row;
    bool reencrypted = false;
  };
  // Up to LIMIT staged rows whose path sorts after AFTER, in path order.
  Result<std::vector<StagedRow>> staged_after(const std::string& after, std::size_t limit);

 private:
  explicit ManifestReader(sqlite3* db) : db_(db) {}
  sqlite3* db_;
  sqlite3_stmt* lookup_ = nullptr;
  sqlite3_stmt* page_ = nullptr;
  std::mutex mu_;
};

}  // namespace kmsd::dr

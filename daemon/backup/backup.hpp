// Online backup and verified restore of the store (issue 7).
//
// A backup is one file:
//
//   offset  size  field
//   0       8     magic "KMSDBAK1"
//   8       4     N, length of the signed manifest (u32, big endian)
//   12      N     the manifest: CMS SignedData (DER), content attached, signed on the key
//                 token with the CA key (signer certificate = the CA certificate)
//   12+N    8     M, length of the database image (u64, big endian)
//   20+N    M     the database image: a SQLite file (rollback-journal mode, self-contained)
//
// The manifest is JSON (nlohmann): format version, created_at, the kmsd schema version, the
// CA certificate's SHA-256 fingerprint, page size and count, the image's SHA-256, the SHA-256
// of every page (so a changed byte is located to its page), which table or index owns each
// page (SQLite's dbstat, as runs), and the row count of every table.
//
// The image is a consistent snapshot taken while kmsd serves: SQLite's online backup API
// reads the live database through a second, read-only connection inside one read
// transaction (WAL: the writer is never blocked), in steps. Like the store, it holds only
// public or sealed material: escrowed keys and enrollment tokens stay sealed under the
// token's master key, so a backup is useless without the token.
//
// Checking a backup (check(), restore()) needs the key token logged in: the signer must be
// the token's CA key; then the image digest and every page; then, on a private copy, every
// escrowed key opens on the token (enroll::open_escrowed) and matches the
// encryption certificate recorded for it, every sealed enrollment token opens, the CA
// certificate in the image is the token's, the row counts match, and the audit chain
// verifies (audit::AuditLog::verify).
#pragma once

#include <openssl/x509.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/ossl.hpp"
#include "common/result.hpp"
#include "daemon/audit/audit_log.hpp"
#include "daemon/store/store.hpp"
#include "hsm/token.hpp"

namespace kmsd::backup {

inline constexpr std::string_view kMagic = "KMSDBAK1";
inline constexpr int kFormatVersion = 1;
// Pages copied per sqlite3_backup_step while the daemon serves.
inline constexpr int kPagesPerStep = 256;

struct Created {
  std::string file;         // the whole backup file (format above)
  nlohmann::json manifest;  // what was signed
  double seconds = 0;       // snapshot + manifest + signature
};

// Takes the snapshot of STORE (a temp file beside the database, removed afterwards), builds
// the manifest and signs it on TOKEN with the CA key and CA_CERT. Safe while the store
// serves other threads.
Result<Created> create(store::Store& store, hsm::Token& token, X509* ca_cert);

// What a check found. A damaged or foreign backup is a report with problems, never an Error;
// Errors are for faults of the environment (token unavailable, disk).
struct CheckReport {
  std::vector<std::string> problems;  // each says where: byte offset, page, table, record
  nlohmann::json manifest;            // when the signature verified
  bool signature_ok = false;
  bool image_ok = false;
  std::uint64_t users = 0;
  std::uint64_t certificates = 0;
  std::uint64_t keys_opened = 0;    // escrowed keys that opened and matched their certificate
  std::uint64_t tokens_opened = 0;  // sealed enrollment tokens that opened
  std::uint64_t audit_records = 0;  // audit records verified
  bool ok() const { return problems.empty(); }
  nlohmann::json to_json() const;
};

// The manifest without checking anything (for kmsctl to describe a file it just received).
Result<nlohmann::json> read_manifest_unverified(std::string_view file);

// Verifies FILE against TOKEN (logged in) without restoring: a private copy of the image is
// made under WORK_DIR (a fresh 0700 directory inside it, removed afterwards).
Result<CheckReport> check(std::string_view file, hsm::Token& token,
                          const std::filesystem::path& work_dir);

// Whether the database at PATH is absent or holds no user and no certificate (read-only;
// nothing is created or changed).
Result<bool> store_is_empty(const std::filesystem::path& path);

struct Restored {
  CheckReport report;
  bool restored = false;  // false: the check failed, nothing was written
};

// Restores FILE into STORE_PATH (kmsd stopped): refuses with kAlreadyExists when STORE_PATH
// holds a user or a certificate; checks the backup exactly like check(), on a copy written
// beside STORE_PATH; if it passes, appends a "backup.restore" audit record (by ACTOR) to that
// copy and renames it into place (0600, fsync, stale -wal/-shm removed).
Result<Restored> restore(std::string_view file, hsm::Token& token,
                         const std::filesystem::path& store_path, const std::string& actor);

// The daemon's side: POST /v1/backup, audited as backup.create.
class BackupService {
 public:
  BackupService(store::Store& store, hsm::Token& token, audit::AuditLog& audit,
                std::function<ossl::X509Ptr()> ca_certificate)
      : store_(store), token_(token), audit_(audit), ca_certificate_(std::move(ca_certificate)) {}

  Result<Created> create(const std::string& actor);
  // POST /v1/backup/check: check() on a copy under the store's directory, audited as
  // backup.check with the verdict.
  Result<CheckReport> check(std::string_view file, const std::string& actor);

 private:
  store::Store& store_;
  hsm::Token& token_;
  audit::AuditLog& audit_;
  std::function<ossl::X509Ptr()> ca_certificate_;
};

}  // namespace kmsd::backup

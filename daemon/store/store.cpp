#include "daemon/store/store.hpp"

#include "common/clock.hpp"

#include <fcntl.h>
#include <sqlite3.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <unordered_map>
#include <utility>

namespace kmsd::store {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------
// Enum names.

const char* to_string(CertKind k) noexcept {
  switch (k) {
    case CertKind::kCa:
      return "ca";
    case CertKind::kAdmin:
      return "admin";
    case CertKind::kServer:
      return "server";
    case CertKind::kSigning:
      return "signing";
    case CertKind::kEncryption:
      return "encryption";
  }
  return "unknown";
}

std::optional<CertKind> parse_cert_kind(std::string_view s) noexcept {
  if (s == "ca") return CertKind::kCa;
  if (s == "admin") return CertKind::kAdmin;
  if (s == "server") return CertKind::kServer;
  if (s == "signing") return CertKind::kSigning;
  if (s == "encryption") return CertKind::kEncryption;
  return std::nullopt;
}

const char* to_string(AdminRole r) noexcept {
  switch (r) {
    case AdminRole::kAdmin:
      return "admin";
    case AdminRole::kAuditor:
      return "auditor";
    case AdminRole::kApprover:
      return "approver";
    case AdminRole::kRecovery:
      return "recovery";
  }
  return "unknown";
}

std::optional<AdminRole> parse_admin_role(std::string_view s) noexcept {
  if (s == "admin") return AdminRole::kAdmin;
  if (s == "auditor") return AdminRole::kAuditor;
  if (s == "approver") return AdminRole::kApprover;
  if (s == "recovery") return AdminRole::kRecovery;
  return std::nullopt;
}

const char* to_string(UserState s) noexcept {
  switch (s) {
    case UserState::kEnabled:
      return "enabled";
    case UserState::kActive:
      return "active";
    case UserState::kRevoked:
      return "revoked";
    case UserState::kRecovery:
      return "recovery";
  }
  return "unknown";
}

std::optional<UserState> parse_user_state(std::string_view s) noexcept {
  if (s == "enabled") return UserState::kEnabled;
  if (s == "active") return UserState::kActive;
  if (s == "revoked") return UserState::kRevoked;
  if (s == "recovery") return UserState::kRecovery;
  return std::nullopt;
}

const char* to_string(TokenPurpose p) noexcept {
  switch (p) {
    case TokenPurpose::kEnroll:
      return "enroll";
    case TokenPurpose::kRecover:
      return "recover";
  }
  return "unknown";
}

const char* to_string(RequestState s) noexcept {
  switch (s) {
    case RequestState::kPending:
      return "pending";
    case RequestState::kExecuted:
      return "executed";
    case RequestState::kDenied:
      return "denied";
    case RequestState::kExpired:
      return "expired";
    case RequestState::kFailed:
      return "failed";
  }
  return "unknown";
}

std::optional<RequestState> parse_request_state(std::string_view s) noexcept {
  if (s == "pending") return RequestState::kPending;
  if (s == "executed") return RequestState::kExecuted;
  if (s == "denied") return RequestState::kDenied;
  if (s == "expired") return RequestState::kExpired;
  if (s == "failed") return RequestState::kFailed;
  return std::nullopt;
}

namespace {

std::optional<TokenPurpose> parse_token_purpose(std::string_view s) noexcept {
  if (s == "enroll") return TokenPurpose::kEnroll;
  if (s == "recover") return TokenPurpose::kRecover;
  return std::nullopt;
}

// ---------------------------------------------------------------------------------------
// Migrations. Append only: never edit a migration that has shipped; add a new one.

struct Migration {
  int version;
  const char* sql;
  // The migration rebuilds an existing table (SQLite's 12-step procedure: create X_new,
  // copy, drop X, rename X_new to X). apply() then turns foreign keys off around the
  // transaction (a DROP TABLE with foreign keys on would delete-check every row, and the
  // pragma is a no-op inside a transaction), runs PRAGMA foreign_key_check before COMMIT
  // and turns foreign keys back on afterwards, whatever happened.
  bool rebuilds_tables = false;
};

constexpr const char* kCreateSchemaVersion = R"sql(
CREATE TABLE IF NOT EXISTS schema_version (
  id         INTEGER PRIMARY KEY CHECK (id = 1),  -- exactly one row
  version    INTEGER NOT NULL,
  applied_at INTEGER NOT NULL
);
)sql";

constexpr std::array<Migration, 4> kMigrations = {{
    {1, R"sql(
CREATE TABLE settings (
  key   TEXT PRIMARY KEY,
  value TEXT NOT NULL
);
CREATE TABLE certificates (
  serial     TEXT PRIMARY KEY,
  kind       TEXT NOT NULL CHECK (kind IN ('ca', 'admin', 'server')),
  subject    TEXT NOT NULL,
  not_before INTEGER,
  not_after  INTEGER,
  der        BLOB NOT NULL,
  issued_at  INTEGER NOT NULL,
  revoked_at INTEGER
);
CREATE INDEX certificates_by_kind ON certificates (kind, issued_at);
CREATE TABLE administrators (
  name        TEXT PRIMARY KEY,
  role        TEXT NOT NULL CHECK (role IN ('admin', 'auditor', 'approver')),
  cert_serial TEXT NOT NULL REFERENCES certificates (serial),
  created_at  INTEGER NOT NULL,
  removed_at  INTEGER
);
CREATE UNIQUE INDEX administrators_by_cert_serial ON administrators (cert_serial);
)sql"},
    // Users, enrollment tokens, key history, approvals and the audit chain. certificates
    // gains the signing/encryption kinds (a CHECK cannot be altered: the table is rebuilt,
    // and administrators' REFERENCES certificates keeps pointing at it by name), a
    // revocation reason and an owner.
    {2, R"sql(
CREATE TABLE users (
  id               TEXT PRIMARY KEY CHECK (id <> ''),
  email            TEXT NOT NULL,
  display_name     TEXT NOT NULL,
  dn               TEXT,
  state            TEXT NOT NULL CHECK (state IN ('enabled', 'active', 'revoked', 'recovery')),
  created_at       INTEGER NOT NULL,
  updated_at       INTEGER NOT NULL,
  last_enrolled_at INTEGER
);
CREATE INDEX users_by_state ON users (state, id);

CREATE TABLE certificates_new (
  serial            TEXT PRIMARY KEY,
  kind              TEXT NOT NULL
                    CHECK (kind IN ('ca', 'admin', 'server', 'signing', 'encryption')),
  subject           TEXT NOT NULL,
  not_before        INTEGER,
  not_after         INTEGER,
  der               BLOB NOT NULL,
  issued_at         INTEGER NOT NULL,
  revoked_at        INTEGER,
  revocation_reason INTEGER CHECK (revocation_reason BETWEEN 0 AND 10),
  user_id           TEXT REFERENCES users (id)
);
INSERT INTO certificates_new (serial, kind, subject, not_before, not_after, der, issued_at,
                              revoked_at)
  SELECT serial, kind, subject, not_before, not_after, der, issued_at, revoked_at
  FROM certificates;
DROP TABLE certificates;
ALTER TABLE certificates_new RENAME TO certificates;
CREATE INDEX certificates_by_kind ON certificates (kind, issued_at);
CREATE INDEX certificates_by_user ON certificates (user_id, kind, issued_at);

CREATE TABLE enrollment_tokens (
  user_id         TEXT PRIMARY KEY REFERENCES users (id),
  purpose         TEXT NOT NULL CHECK (purpose IN ('enroll', 'recover')),
  sealed          BLOB NOT NULL,
  issued_at       INTEGER NOT NULL,
  issued_by       TEXT NOT NULL,
  expires_at      INTEGER NOT NULL,
  failed_attempts INTEGER NOT NULL DEFAULT 0 CHECK (failed_attempts >= 0),
  used_at         INTEGER
);

CREATE TABLE key_history (
  user_id        TEXT NOT NULL REFERENCES users (id),
  version        INTEGER NOT NULL CHECK (version >= 1),
  key_id         TEXT NOT NULL UNIQUE,
  algorithm      TEXT NOT NULL,
  master_version INTEGER NOT NULL,
  sealed_key     BLOB NOT NULL,
  cert_serial    TEXT REFERENCES certificates (serial),
  created_at     INTEGER NOT NULL,
  PRIMARY KEY (user_id, version)
);
-- Append-only: rows are never deleted and their identity never changes. Only sealed_key
-- and master_version may be rewritten (master-key rotation re-wraps the keys). The insert
-- trigger also closes INSERT OR REPLACE, whose implicit delete fires no delete trigger.
CREATE TRIGGER key_history_no_delete BEFORE DELETE ON key_history
BEGIN
  SELECT RAISE(ABORT, 'key history is append-only');
END;
CREATE TRIGGER key_history_identity_is_fixed
BEFORE UPDATE OF user_id, version, key_id, algorithm, cert_serial, created_at ON key_history
BEGIN
  SELECT RAISE(ABORT, 'key history is append-only');
END;
CREATE TRIGGER key_history_appends_only BEFORE INSERT ON key_history
WHEN NEW.version IS NOT (SELECT coalesce(max(version), 0) + 1 FROM key_history
                         WHERE user_id = NEW.user_id)
  OR EXISTS (SELECT 1 FROM key_history WHERE key_id = NEW.key_id)
BEGIN
  SELECT RAISE(ABORT, 'key history is append-only');
END;

CREATE TABLE approval_requests (
  id           TEXT PRIMARY KEY CHECK (id <> ''),
  operation    TEXT NOT NULL,
  params       TEXT NOT NULL,
  requested_by TEXT NOT NULL,
  required     INTEGER NOT NULL CHECK (required >= 1),
  state        TEXT NOT NULL
               CHECK (state IN ('pending', 'executed', 'denied', 'expired', 'failed')),
  created_at   INTEGER NOT NULL,
  expires_at   INTEGER NOT NULL,
  decided_at   INTEGER,
  result       TEXT
);
CREATE INDEX approval_requests_by_state ON approval_requests (state, created_at);
CREATE TABLE approvals (
  request_id TEXT NOT NULL REFERENCES approval_requests (id),
  approver   TEXT NOT NULL,
  decision   TEXT NOT NULL CHECK (decision IN ('approve', 'deny')),
  at         INTEGER NOT NULL,
  PRIMARY KEY (request_id, approver)
);

CREATE TABLE audit_log (
  seq       INTEGER PRIMARY KEY CHECK (seq >= 1),
  at        INTEGER NOT NULL,
  actor     TEXT NOT NULL,
  action    TEXT NOT NULL,
  record    TEXT NOT NULL,
  prev_hash BLOB NOT NULL,
  hash      BLOB NOT NULL,
  mac       BLOB NOT NULL
);
)sql",
     true},
    // v3 (enrollment): which escrowed keys the holder of a user's current signing certificate
    // may fetch (the versions from keys_from_version on: the key of the last enrollment, or
    // the whole history after a recovery), and an index for the CRL's walk over revocations.
    {3, R"sql(
ALTER TABLE users ADD COLUMN keys_from_version INTEGER CHECK (keys_from_version >= 1);
CREATE INDEX certificates_revoked ON certificates (revoked_at) WHERE revoked_at IS NOT NULL;
)sql",
     false},
    // v4: the recovery role (an administrator who may export a user's key history once the
    // export is approved). A CHECK cannot be altered: administrators is rebuilt.
    {4, R"sql(
CREATE TABLE administrators_new (
  name        TEXT PRIMARY KEY,
  role        TEXT NOT NULL CHECK (role IN ('admin', 'auditor', 'approver', 'recovery')),
  cert_serial TEXT NOT NULL REFERENCES certificates (serial),
  created_at  INTEGER NOT NULL,
  removed_at  INTEGER
);
INSERT INTO administrators_new (name, role, cert_serial, created_at, removed_at)
  SELECT name, role, cert_serial, created_at, removed_at FROM administrators;
DROP TABLE administrators;
ALTER TABLE administrators_new RENAME TO administrators;
CREATE UNIQUE INDEX administrators_by_cert_serial ON administrators (cert_serial);
)sql",
     true},
}};

// Versions are 1, 2, 3, ... in order, and the last one is what this binary writes.
constexpr bool migrations_are_consecutive() {
  for (std::size_t i = 0; i < kMigrations.size(); ++i) {
    if (kMigrations[i].version != static_cast<int>(i) + 1) return false;
  }
  return true;
}
static_assert(migrations_are_consecutive());
static_assert(kMigrations.back().version == Store::kSchemaVersion,
              "add a migration for the new schema version");

// ---------------------------------------------------------------------------------------
// SQLite RAII and helpers.

struct DbCloser {
  void operator()(sqlite3* db) const noexcept { sqlite3_close_v2(db); }
};
struct StmtFinalizer {
  void operator()(sqlite3_stmt* st) const noexcept { sqlite3_finalize(st); }
};
using DbPtr = std::unique_ptr<sqlite3, DbCloser>;
using StmtPtr = std::unique_ptr<sqlite3_stmt, StmtFinalizer>;

Error store_error(std::string_view what, std::string_view detail) {
  return make_error(ErrorCode::kStore, std::string(what) + ": " + std::string(detail));
}

Error sqlite_error(sqlite3* db, int rc, std::string_view what) {
  // sqlite3_errmsg describes the most recent failure on this connection; fall back to the
  // generic text for the code when the connection has nothing more specific.
  const char* msg = db != nullptr ? sqlite3_errmsg(db) : nullptr;
  if (msg == nullptr || std::strcmp(msg, "not an error") == 0) msg = sqlite3_errstr(rc);
  return store_error(what, msg);
}

// One prepared statement. Binding errors are remembered and reported by step(), so call
// sites can chain binds without checking each one.
class Statement {
 public:
  static Result<std::unique_ptr<Statement>> prepare(sqlite3* db, std::string_view sql) {
    sqlite3_stmt* raw = nullptr;
    int rc = sqlite3_prepare_v3(db, sql.data(), static_cast<int>(sql.size()),
                                SQLITE_PREPARE_PERSISTENT, &raw, nullptr);
    StmtPtr st(raw);
    if (rc != SQLITE_OK)
      return sqlite_error(db, rc, "preparing statement '" + std::string(sql) + "'");
    if (!st) return store_error("preparing statement", "empty SQL");
    return std::unique_ptr<Statement>(new Statement(db, std::move(st)));
  }

  Statement& bind(int idx, std::int64_t v) {
    note(sqlite3_bind_int64(st_.get(), idx, v));
    return *this;
  }
  Statement& bind(int idx, std::optional<std::int64_t> v) {
    if (v) return bind(idx, *v);
    return bind_null(idx);
  }
  Statement& bind(int idx, std::string_view v) {
    // A null data pointer would bind SQL NULL; an empty string must stay an empty string.
    note(sqlite3_bind_text(st_.get(), idx, v.data() != nullptr ? v.data() : "",
                           static_cast<int>(v.size()), SQLITE_TRANSIENT));
    return *this;
  }
  Statement& bind(int idx, const std::string& v) { return bind(idx, std::string_view(v)); }
  Statement& bind(int idx, const char* v) { return bind(idx, std::string_view(v)); }
  Statement& bind(int idx, const Bytes& v) {
    if (v.empty()) {
      note(sqlite3_bind_zeroblob(st_.get(), idx, 0));
    } else {
      note(sqlite3_bind_blob(st_.get(), idx, v.data(), static_cast<int>(v.size()),
                             SQLITE_TRANSIENT));
    }
    return *this;
  }
  Statement& bind_null(int idx) {
    note(sqlite3_bind_null(st_.get(), idx));
    return *this;
  }

  // true: a row is available; false: done. WHAT names the operation for error messages.
  Result<bool> step(std::string_view what) {
    if (bind_rc_ != SQLITE_OK) {
      last_rc_ = bind_rc_;
      return store_error(what, std::string("binding parameters: ") + sqlite3_errstr(bind_rc_));
    }
    int rc = sqlite3_step(st_.get());
    last_rc_ = rc;
    if (rc == SQLITE_ROW) return true;
    if (rc == SQLITE_DONE) return false;
    return sqlite_error(db_, rc, what);
  }

  // Steps to completion, for statements that return no rows.
  Status run(std::string_view what) {
    KMSD_ASSIGN_OR_RETURN(bool row, step(what));
    while (row) {
      KMSD_ASSIGN_OR_RETURN(row, step(what));
    }
    return {};
  }

  // Extended result code of the last step() (SQLITE_CONSTRAINT_PRIMARYKEY, ...).
  int last_rc() const { return last_rc_; }

  bool is_null(int col) const { return sqlite3_column_type(st_.get(), col) == SQLITE_NULL; }
  std::int64_t int64(int col) const { return sqlite3_column_int64(st_.get(), col); }
  std::optional<std::int64_t> opt_int64(int col) const {
    if (is_null(col)) return std::nullopt;
    return int64(col);
  }
  std::string text(int col) const {
    const auto* p = sqlite3_column_text(st_.get(), col);
    int n = sqlite3_column_bytes(st_.get(), col);
    if (p == nullptr) return {};
    return std::string(reinterpret_cast<const char*>(p), static_cast<std::size_t>(n));
  }
  Bytes blob(int col) const {
    const auto* p = static_cast<const std::uint8_t*>(sqlite3_column_blob(st_.get(), col));
    int n = sqlite3_column_bytes(st_.get(), col);
    if (p == nullptr || n <= 0) return {};
    return Bytes(p, p + n);
  }

  // Ready for reuse: ends any read it still holds and clears the bindings.
  void reset() noexcept {
    sqlite3_reset(st_.get());
    sqlite3_clear_bindings(st_.get());
    bind_rc_ = SQLITE_OK;
    last_rc_ = SQLITE_OK;
  }

 private:
  Statement(sqlite3* db, StmtPtr st) : db_(db), st_(std::move(st)) {}
  void note(int rc) {
    if (rc != SQLITE_OK && bind_rc_ == SQLITE_OK) bind_rc_ = rc;
  }

  sqlite3* db_;
  StmtPtr st_;
  int bind_rc_ = SQLITE_OK;
  int last_rc_ = SQLITE_OK;
};

// Borrowed use of a cached statement; resets it when the use ends, so no statement keeps
// a read snapshot open between calls.
class Lease {
 public:
  explicit Lease(Statement* st) : st_(st) {}
  Lease(Lease&& o) noexcept : st_(std::exchange(o.st_, nullptr)) {}
  Lease& operator=(Lease&&) = delete;
  Lease(const Lease&) = delete;
  ~Lease() {
    if (st_ != nullptr) st_->reset();
  }
  Statement* operator->() const { return st_; }
  Statement& operator*() const { return *st_; }

 private:
  Statement* st_;
};

// Runs one or more SQL statements without results.
Status exec(sqlite3* db, const std::string& sql, std::string_view what) {
  char* err = nullptr;
  int rc = sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &err);
  if (rc == SQLITE_OK) return {};
  std::string msg = err != nullptr ? err : sqlite3_errstr(rc);
  sqlite3_free(err);
  return store_error(what, msg);
}

bool is_unique_violation(int rc) {
  return rc == SQLITE_CONSTRAINT_PRIMARYKEY || rc == SQLITE_CONSTRAINT_UNIQUE;
}

Status check_serial(const std::string& serial) {
  if (serial.empty())
    return make_error(ErrorCode::kInvalidArgument, "a certificate serial must not be empty");
  for (char c : serial) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')))
      return make_error(ErrorCode::kInvalidArgument,
                        "certificate serial '" + serial + "' is not lower-case hex");
  }
  return {};
}

// RFC 5280 CRLReason: 0..10, 7 is not used.
Status check_revocation_reason(int reason) {
  if (reason < 0 || reason > 10 || reason == 7)
    return make_error(ErrorCode::kInvalidArgument,
                      "revocation reason " + std::to_string(reason) +
                          " is not an RFC 5280 CRLReason code (0-6 or 8-10)");
  return {};
}

// Creates PATH with mode 0600 unless it exists (an existing file keeps its mode).
Status create_if_missing(const fs::path& path) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) {
    if (errno == EEXIST) return {};
    return make_error(ErrorCode::kIo,
                      "creating database file " + path.string() + ": " + std::strerror(errno));
  }
  ::fchmod(fd, 0600);  // exact, whatever the umask
  ::close(fd);
  return {};
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Store::Impl

struct Store::Impl {
  // Held for every public call, and for the whole of a transaction, so the thread that
  // holds it is the only one that can see or change `depth`.
  mutable std::recursive_mutex mu;
  fs::path path;
  DbPtr db;  // declared before the cache: statements are finalized first
  std::unordered_map<std::string, std::unique_ptr<Statement>> cache;
  int version = 0;
  int depth = 0;  // 0: no transaction; 1: BEGIN IMMEDIATE; >1: nested savepoints

  // Group commit (grouped_transaction): callers waiting for the next group, and whether a
  // thread is running one. Guarded by group_mu, which is never held while `mu` is taken.
  struct Grouped {
    const std::function<Status()>* fn = nullptr;
    Status status;
    std::exception_ptr thrown;
    bool done = false;
  };
  std::mutex group_mu;
  std::condition_variable group_cv;
  std::vector<Grouped*> waiting;
  bool group_running = false;
  std::uint64_t groups = 0, grouped = 0;  // group_commit_stats(), under group_mu
  static constexpr std::size_t kMaxGroup = 64;

  // Runs GROUP in one transaction (the caller holds no lock).
  void run_group(const std::vector<Grouped*>& group) {
    std::lock_guard lock(mu);
    Status begin = exec("BEGIN IMMEDIATE", "starting transaction");
    if (!begin.ok()) {
      for (Grouped* g : group) g->status = begin;
      return;
    }
    depth = 1;
    static const std::string kSavepoint = "kmsd_group";
    bool lost = false;  // SQLite rolled the whole transaction back by itself (disk full, I/O)
    for (Grouped* g : group) {
      if (!in_sqlite_transaction()) {
        lost = true;
        break;
      }
      if (Status sp = exec("SAVEPOINT " + kSavepoint, "starting a grouped transaction"); !sp.ok()) {
        g->status = sp;
        continue;
      }
      try {
        g->status = (*g->fn)();
      } catch (...) {
        g->thrown = std::current_exception();
      }
      depth = 1;  // whatever a nested call that threw left behind
      if (g->thrown || !g->status.ok()) {
        rollback_to(kSavepoint);
      } else if (Status rel = exec("RELEASE " + kSavepoint, "finishing a grouped transaction");
                 !rel.ok()) {
        g->status = rel;
      }
    }
    depth = 0;
    if (lost || !in_sqlite_transaction()) {
      // Nothing of the group is in the database: every caller not already refused is told so,
      // including those whose function did not run.
      const Error gone{ErrorCode::kStore,
                       "the store's transaction was rolled back by SQLite (disk full or an I/O "
                       "error; see the log) and nothing of this change was kept; fix the disk "
                       "and try again"};
      for (Grouped* g : group)
        if (!g->thrown && g->status.ok()) g->status = gone;
      return;
    }
    Status commit = exec("COMMIT", "committing transaction");
    if (!commit.ok()) {
      rollback();
      for (Grouped* g : group)
        if (!g->thrown && g->status.ok()) g->status = commit;
    }
  }

  Result<Lease> stmt(const std::string& sql) {
    auto it = cache.find(sql);
    if (it == cache.end()) {
      KMSD_ASSIGN_OR_RETURN(auto st, Statement::prepare(db.get(), sql));
      it = cache.emplace(sql, std::move(st)).first;
    }
    it->second->reset();
    return Lease(it->second.get());
  }

  Status exec(const std::string& sql, std::string_view what) {
    return ::kmsd::store::exec(db.get(), sql, what);
  }

  bool in_sqlite_transaction() const { return sqlite3_get_autocommit(db.get()) == 0; }

  void rollback() noexcept {
    // SQLite rolls back by itself after some errors (disk full, I/O); only roll back a
    // transaction that is still open.
    if (in_sqlite_transaction()) (void)exec("ROLLBACK", "rolling back transaction");
  }

  void rollback_to(const std::string& savepoint) noexcept {
    if (!in_sqlite_transaction()) return;
    (void)exec("ROLLBACK TO " + savepoint, "rolling back nested transaction");
    (void)exec("RELEASE " + savepoint, "releasing nested transaction");
  }

  // Reads schema_version; 0 when the table does not exist yet. Refuses databases that
  // hold other tables but no schema_version: they were not made by kmsd.
  Result<int> read_version() {
    std::string what = "reading the schema version of " + path.string();
    int tables = 0;
    bool has_version_table = false;
    {
      KMSD_ASSIGN_OR_RETURN(
          Lease st, stmt("SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE "
                         "'sqlite\\_%' ESCAPE '\\'"));
      while (true) {
        KMSD_ASSIGN_OR_RETURN(bool row, st->step(what));
        if (!row) break;
        ++tables;
        if (st->text(0) == "schema_version") has_version_table = true;
      }
    }
    if (!has_version_table) {
      if (tables > 0)
        return make_error(ErrorCode::kFailedPrecondition,
                          "database " + path.string() +
                              " contains tables but no schema_version table; it was not "
                              "created by kmsd, refusing to change it");
      return 0;
    }
    KMSD_ASSIGN_OR_RETURN(Lease st, stmt("SELECT version FROM schema_version"));
    KMSD_ASSIGN_OR_RETURN(bool row, st->step(what));
    if (!row || st->is_null(0))
      return make_error(ErrorCode::kStore, "database " + path.string() +
                                               " has an empty schema_version table; restore a "
                                               "backup");
    auto v = st->int64(0);
    KMSD_ASSIGN_OR_RETURN(bool more, st->step(what));
    if (more || v < 0 || v > 1'000'000)
      return make_error(ErrorCode::kStore, "database " + path.string() +
                                               " has a damaged schema_version table; restore a "
                                               "backup");
    return static_cast<int>(v);
  }

  Error too_new(int found) const {
    return make_error(ErrorCode::kFailedPrecondition,
                      "database " + path.string() + " has schema version " + std::to_string(found) +
                          " but this kmsd understands up to " + std::to_string(kSchemaVersion) +
                          "; upgrade kmsd or restore a backup made by this version");
  }

  // Sets PRAGMA foreign_keys and reads it back: the pragma silently does nothing inside a
  // transaction or on a build without foreign key support.
  Status set_foreign_keys(bool on, std::string_view what) {
    KMSD_TRY(exec(on ? "PRAGMA foreign_keys=ON" : "PRAGMA foreign_keys=OFF", what));
    KMSD_ASSIGN_OR_RETURN(Lease st, stmt("PRAGMA foreign_keys"));
    KMSD_ASSIGN_OR_RETURN(bool row, st->step(what));
    if (!row || st->int64(0) != (on ? 1 : 0))
      return store_error(
          what, std::string("could not turn foreign key enforcement ") + (on ? "on" : "off"));
    return {};
  }

  // After a migration, before COMMIT: every REFERENCES clause names a table that exists
  // (a rebuild that renamed the wrong way would leave administrators pointing at a
  // dropped table), and, for rebuilds, no row breaks a foreign key.
  Status check_foreign_keys(const Migration& m, std::string_view what) {
    {
      KMSD_ASSIGN_OR_RETURN(Lease st,
                            stmt("SELECT m.name, f.\"table\" FROM sqlite_schema AS m, "
                                 "pragma_foreign_key_list(m.name) AS f WHERE m.type = 'table' AND "
                                 "f.\"table\" NOT IN (SELECT name FROM sqlite_schema WHERE type = "
                                 "'table')"));
      KMSD_ASSIGN_OR_RETURN(bool row, st->step(what));
      if (row)
        return store_error(what, "table " + st->text(0) + " references table " + st->text(1) +
                                     ", which does not exist");
    }
    if (!m.rebuilds_tables) return {};
    KMSD_ASSIGN_OR_RETURN(Lease st, stmt("PRAGMA foreign_key_check"));
    std::string problems;
    int count = 0;
    while (true) {
      KMSD_ASSIGN_OR_RETURN(bool row, st->step(what));
      if (!row) break;
      if (++count <= 5) {
        if (!problems.empty()) problems += "; ";
        problems += "row " + (st->is_null(1) ? std::string("?") : std::to_string(st->int64(1))) +
                    " of " + st->text(0) + " references a missing row of " + st->text(2);
      }
    }
    if (count == 0) return {};
    return store_error(what, std::to_string(count) +
                                 " row(s) break a foreign key, so the database was left at "
                                 "schema version " +
                                 std::to_string(m.version - 1) + ": " + problems +
                                 (count > 5 ? "; ..." : ""));
  }

  // Applies one migration in its own transaction (re-checking the version under the write
  // lock, in case another process migrated meanwhile).
  Status apply(const Migration& m) {
    std::string what =
        "migrating " + path.string() + " to schema version " + std::to_string(m.version);
    if (!m.rebuilds_tables) return apply_in_transaction(m, what);

    // The rename at the end of a rebuild must rewrite references the modern way.
    KMSD_TRY(exec("PRAGMA legacy_alter_table=OFF", what));
    KMSD_TRY(set_foreign_keys(false, what));
    Status st = apply_in_transaction(m, what);
    Status on = set_foreign_keys(true, what);
    if (!st.ok()) return st;
    return on;
  }

  Status apply_in_transaction(const Migration& m, const std::string& what) {
    KMSD_TRY(exec("BEGIN IMMEDIATE", what));
    auto body = [&]() -> Status {
      KMSD_TRY(exec(kCreateSchemaVersion, what));
      {
        KMSD_ASSIGN_OR_RETURN(Lease st,
                              stmt("INSERT OR IGNORE INTO schema_version (id, version, applied_at) "
                                   "VALUES (1, 0, ?1)"));
        st->bind(1, unix_now());
        KMSD_TRY(st->run(what));
      }
      KMSD_ASSIGN_OR_RETURN(int current, read_version());
      if (current > kSchemaVersion) return too_new(current);
      if (current >= m.version) return {};
      if (current != m.version - 1)
        return store_error(what, "the database is at version " + std::to_string(current) +
                                     ", expected " + std::to_string(m.version - 1));
      KMSD_TRY(exec(m.sql, what));
      KMSD_TRY(check_foreign_keys(m, what));
      KMSD_ASSIGN_OR_RETURN(Lease st, stmt("UPDATE schema_version SET version = ?1, "
                                           "applied_at = ?2 WHERE id = 1"));
      st->bind(1, static_cast<std::int64_t>(m.version)).bind(2, unix_now());
      return st->run(what);
    };
    Status st = body();
    if (!st.ok()) {
      rollback();
      return st;
    }
    Status c = exec("COMMIT", what);
    if (!c.ok()) rollback();
    return c;
  }

  // Rows changed by the last INSERT/UPDATE/DELETE on this connection (call with mu held).
  std::int64_t changes() const { return sqlite3_changes64(db.get()); }
};

// ---------------------------------------------------------------------------------------
// Store

Store::Store(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Store::~Store() = default;

Result<std::unique_ptr<Store>> Store::open(const fs::path& path) {
  auto impl = std::make_unique<Impl>();
  impl->path = path;
  const std::string p = path.string();

  KMSD_TRY(create_if_missing(path));
  std::error_code ec;
  auto status = fs::status(path, ec);
  if (ec || !fs::is_regular_file(status))
    return make_error(ErrorCode::kStore, "database " + p + " is not a regular file");

  sqlite3* raw = nullptr;
  int rc = sqlite3_open_v2(p.c_str(), &raw, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, nullptr);
  impl->db.reset(raw);  // a handle is returned even on failure and must be closed
  if (rc != SQLITE_OK) return sqlite_error(raw, rc, "opening database " + p);
  sqlite3* db = impl->db.get();
  sqlite3_extended_result_codes(db, 1);
  if (sqlite3_db_readonly(db, "main") == 1)
    return make_error(ErrorCode::kPermissionDenied,
                      "database " + p + " is read-only for this process; kmsd needs to write it");
  sqlite3_busy_timeout(db, 5000);
  sqlite3_db_config(db, SQLITE_DBCONFIG_DEFENSIVE, 1, nullptr);

  // Nothing above or here writes to the file: a database we refuse is left as it was.
  rc = sqlite3_exec(db, "SELECT count(*) FROM sqlite_schema", nullptr, nullptr, nullptr);
  if ((rc & 0xff) == SQLITE_NOTADB)
    return make_error(ErrorCode::kStore, p + " is not a SQLite database (" + sqlite3_errmsg(db) +
                                             "); check the store path in the configuration");
  if (rc != SQLITE_OK) return sqlite_error(db, rc, "reading database " + p);
  KMSD_ASSIGN_OR_RETURN(int found, impl->read_version());
  if (found > kSchemaVersion) return impl->too_new(found);

  // Connection settings. journal_mode=WAL changes the file, so it comes after the checks.
  std::string what = "configuring database " + p;
  {
    KMSD_ASSIGN_OR_RETURN(Lease st, impl->stmt("PRAGMA journal_mode=WAL"));
    KMSD_ASSIGN_OR_RETURN(bool row, st->step(what));
    std::string mode = row ? st->text(0) : std::string();
    if (sqlite3_stricmp(mode.c_str(), "wal") != 0)
      return store_error(what, "could not switch to WAL journal mode (still '" + mode +
                                   "'); is the file system local?");
  }
  KMSD_TRY(impl->exec("PRAGMA foreign_keys=ON", what));
  {
    KMSD_ASSIGN_OR_RETURN(Lease st, impl->stmt("PRAGMA foreign_keys"));
    KMSD_ASSIGN_OR_RETURN(bool row, st->step(what));
    if (!row || st->int64(0) != 1)
      return store_error(what, "this SQLite cannot enforce foreign keys");
  }
  KMSD_TRY(impl->exec("PRAGMA synchronous=FULL", what));

  for (const auto& m : kMigrations) {
    if (m.version > found) KMSD_TRY(impl->apply(m));
  }
  KMSD_ASSIGN_OR_RETURN(int version, impl->read_version());
  if (version != kSchemaVersion) {
    if (version > kSchemaVersion) return impl->too_new(version);
    return store_error("migrating " + p, "ended at schema version " + std::to_string(version) +
                                             " instead of " + std::to_string(kSchemaVersion));
  }
  impl->version = version;
  return std::unique_ptr<Store>(new Store(std::move(impl)));
}

int Store::schema_version() const {
  std::lock_guard lock(impl_->mu);
  return impl_->version;
}

// --- backup (daemon/backup) ------------------------------------------------------------

const fs::path& Store::path() const {
  return impl_->path;
}

Status Store::transaction(const std::function<Status()>& fn) {
  std::lock_guard lock(impl_->mu);
  Impl& d = *impl_;

  if (d.depth > 0) {
    // Nested: join the outer transaction. A savepoint keeps the inner call all-or-nothing;
    // its changes are committed (or rolled back) with the outer transaction.
    const std::string sp = "kmsd_nested_" + std::to_string(d.depth);
    KMSD_TRY(d.exec("SAVEPOINT " + sp, "starting nested transaction"));
    ++d.depth;
    Status st;
    try {
      st = fn();
    } catch (...) {
      --d.depth;
      d.rollback_to(sp);
      throw;
    }
    --d.depth;
    if (!st.ok()) {
      d.rollback_to(sp);
      return st;
    }
    return d.exec("RELEASE " + sp, "finishing nested transaction");
  }

  KMSD_TRY(d.exec("BEGIN IMMEDIATE", "starting transaction"));
  d.depth = 1;
  Status st;
  try {
    st = fn();
  } catch (...) {
    d.depth = 0;
    d.rollback();
    throw;
  }
  d.depth = 0;
  if (!st.ok()) {
    d.rollback();
    return st;
  }
  Status c = d.exec("COMMIT", "committing transaction");
  if (!c.ok()) d.rollback();
  return c;
}

Status Store::grouped_transaction(const std::function<Status()>& fn) {
  Impl& d = *impl_;
  // Inside a transaction of this thread (which then holds `mu`): join it.
  if (d.mu.try_lock()) {
    const bool nested = d.depth > 0;
    Status st;
    if (nested) {
      try {
        st = transaction(fn);
      } catch (...) {
        d.mu.unlock();
        throw;
      }
    }
    d.mu.unlock();
    if (nested) return st;
  }
  Impl::Grouped me;
  me.fn = &fn;
  std::unique_lock wait(d.group_mu);
  d.waiting.push_back(&me);
  while (!me.done) {
    if (d.group_running) {
      d.group_cv.wait(wait);
      continue;
    }
    // Lead the next group: everything waiting now (this call among it), up to kMaxGroup.
    d.group_running = true;
    const std::size_t n = std::min(d.waiting.size(), Impl::kMaxGroup);
    std::vector<Impl::Grouped*> group(d.waiting.begin(),
                                      d.waiting.begin() + static_cast<std::ptrdiff_t>(n));
    d.waiting.erase(d.waiting.begin(), d.waiting.begin() + static_cast<std::ptrdiff_t>(n));
    wait.unlock();
    d.run_group(group);
    wait.lock();
    for (Impl::Grouped* g : group) g->done = true;
    ++d.groups;
    d.grouped += group.size();
    d.group_running = false;
    d.group_cv.notify_all();
  }
  if (me.thrown) std::rethrow_exception(me.thrown);
  return me.status;
}

Store::GroupCommitStats Store::group_commit_stats() const {
  std::lock_guard lock(impl_->group_mu);
  return {impl_->groups, impl_->grouped};
}

// --- settings ----------------------------------------------------------------------------

Result<std::optional<std::string>> Store::get_setting(const std::string& key) {
  std::lock_guard lock(impl_->mu);
  KMSD_ASSIGN_OR_RETURN(Lease st, impl_->stmt("SELECT value FROM settings WHERE key = ?1"));
  st->bind(1, key);
  KMSD_ASSIGN_OR_RETURN(bool row, st->step("reading setting " + key));
  if (!row) return std::optional<std::string>();
  return std::optional<std::string>(st->text(0));
}

Status Store::put_setting(const std::string& key, const std::string& value) {
  if (key.empty())
    return make_error(ErrorCode::kInvalidArgument, "a setting name must not be empty");
  std::lock_guard lock(impl_->mu);
  KMSD_ASSIGN_OR_RETURN(Lease st, impl_->stmt("INSERT INTO settings (key, value) VALUES (?1, ?2) "
                                              "ON CONFLICT (key) DO UPDATE SET value = "
                                              "excluded.value"));
  st->bind(1, key).bind(2, value);
  return st->run("writing setting " + key);
}

// --- certificates ------------------------------------------------------------------------

namespace {

constexpr const char* kCertColumns =
    "serial, kind, subject, not_before, not_after, der, issued_at, revoked_at, "
    "revocation_reason, user_id";

Result<CertificateRecord> read_certificate(const Statement& st) {
  CertificateRecord rec;
  rec.serial = st.text(0);
  std::string kind = st.text(1);
  auto k = parse_cert_kind(kind);
  if (!k)
    return make_error(ErrorCode::kStore,
                      "certificate " + rec.serial + " has unknown kind '" + kind + "'");
  rec.kind = *k;
  rec.subject = st.text(2);
  rec.not_before = st.opt_int64(3).value_or(0);
  rec.not_after = st.opt_int64(4).value_or(0);
  rec.der = st.blob(5);
  rec.issued_at = st.int64(6);
  rec.revoked_at = st.opt_int64(7);
  if (auto reason = st.opt_int64(8)) rec.revocation_reason = static_cast<int>(*reason);
  if (!st.is_null(9)) rec.user_id = st.text(9);
  return rec;
}

constexpr const char* kAdminColumns = "name, role, cert_serial, created_at, removed_at";

Result<AdminRecord> read_admin(const Statement& st) {
  AdminRecord rec;
  rec.name = st.text(0);
  std::string role = st.text(1);
  auto r = parse_admin_role(role);
  if (!r)
    return make_error(ErrorCode::kStore,
                      "administrator " + rec.name + " has unknown role '" + role + "'");
  rec.role = *r;
  rec.cert_serial = st.text(2);
  rec.created_at = st.int64(3);
  rec.removed_at = st.opt_int64(4);
  return rec;
}

}  // namespace

Status Store::insert_certificate(const CertificateRecord& rec) {
  KMSD_TRY(check_serial(rec.serial));
  if (rec.revocation_reason) KMSD_TRY(check_revocation_reason(*rec.revocation_reason));
  std::lock_guard lock(impl_->mu);
  KMSD_ASSIGN_OR_RETURN(Lease st,
                        impl_->stmt(std::string("INSERT INTO certificates (") + kCertColumns +
                                    ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"));
  st->bind(1, rec.serial)
      .bind(2, to_string(rec.kind))
      .bind(3, rec.subject)
      .bind(4, rec.not_before)
      .bind(5, rec.not_after)
      .bind(6, rec.der)
      .bind(7, rec.issued_at)
      .bind(8, rec.revoked_at);
  if (rec.revocation_reason) {
    st->bind(9, static_cast<std::int64_t>(*rec.revocation_reason));
  } else {
    st->bind_null(9);
  }
  if (rec.user_id) {
    st->bind(10, *rec.user_id);
  } else {
    st->bind_null(10);
  }
  Status s = st->run("inserting certificate " + rec.serial);
  if (s.ok()) return s;
  if (is_unique_violation(st->last_rc()))
    return make_error(ErrorCode::kAlreadyExists,
                      "a certificate with serial " + rec.serial + " is already recorded");
  if (st->last_rc() == SQLITE_CONSTRAINT_FOREIGNKEY)
    return make_error(ErrorCode::kNotFound, "inserting certificate " + rec.serial + ": no user " +
                                                rec.user_id.value_or("") +
                                                " is recorded; enable the user first");
  return s;
}

Result<std::optional<CertificateRecord>> Store::find_certificate(const std::string& serial) {
  std::lock_guard lock(impl_->mu);
  KMSD_ASSIGN_OR_RETURN(Lease st, impl_->stmt(std::string("SELECT ") + kCertColumns +
                                              " FROM certificates WHERE serial = ?1"));
  st->bind(1, serial);
  KMSD_ASSIGN_OR_RETURN(bool row, st->step("looking up certificate " + serial));
  if (!row) return std::optional<CertificateRecord>();
  KMSD_ASSIGN_OR_RETURN(auto rec, read_certificate(*st));
  return std::optional<CertificateRecord>(std::move(rec));
}

Result<std::vector<CertificateRecord>> Store::certificates(CertKind kind) {
  std::lock_guard lock(impl_->mu);
  KMSD_ASSIGN_OR_RETURN(Lease st,
                        impl_->stmt(std::string("SELECT ") + kCertColumns +
                                    " FROM certificates WHERE kind = ?1 ORDER BY issued_at, "
                                    "serial"));
  st->bind(1, to_string(kind));
  std::string what = std::string("listing ") + to_string(kind) + " certificates";
  std::vector<CertificateRecord> out;
  while (true) {
    KMSD_ASSIGN_OR_RETURN(bool row, st->step(what));
    if (!row) break;
    KMSD_ASSIGN_OR_RETURN(auto rec, read_certificate(*st));
    out.push_back(std::move(rec));
  }
  return out;
}

// --- administrators ----------------------------------------------------------------------

Status Store::insert_admin(const AdminRecord& rec) {
  if (rec.name.empty())
    return make_error(ErrorCode::kInvalidArgument, "an administrator name must not be empty");
  std::lock_guard lock(impl_->mu);
  KMSD_ASSIGN_OR_RETURN(Lease st, impl_->stmt(std::string("INSERT INTO administrators (") +
                                              kAdminColumns + ") VALUES (?1, ?2, ?3, ?4, ?5)"));
  st->bind(1, rec.name)
      .bind(2, to_string(rec.role))
      .bind(3, rec.cert_serial)
      .bind(4, rec.created_at)
      .bind(5, rec.removed_at);
  Status s = st->run("inserting administrator " + rec.name);
  if (s.ok()) return s;
  int rc = st->last_rc();
  if (is_unique_violation(rc)) {
    // Either the name or the certificate is taken (SQLite reports whichever index it checks
    // first); name the name when it is taken, since that is what people type.
    auto existing = find_admin(rec.name);
    if (!existing.ok() || existing->has_value())
      return make_error(ErrorCode::kAlreadyExists,
                        "an administrator named " + rec.name + " is already recorded");
    return make_error(ErrorCode::kAlreadyExists, "an administrator with certificate serial " +
                                                     rec.cert_serial + " is already recorded");
  }
  if (rc == SQLITE_CONSTRAINT_FOREIGNKEY)
    return make_error(ErrorCode::kNotFound, "inserting administrator " + rec.name +
                                                ": no certificate with serial " + rec.cert_serial +
                                                " is recorded; record the certificate first");
  return s;
}

Result<std::optional<AdminRecord>> Store::find_admin(const std::string& name) {
  std::lock_guard lock(impl_->mu);
  KMSD_ASSIGN_OR_RETURN(Lease st, impl_->stmt(std::string("SELECT ") + kAdminColumns +
                                              " FROM administrators WHERE name = ?1"));
  st->bind(1, name);
  KMSD_ASSIGN_OR_RETURN(bool row, st->step("looking up administrator " + name));
  if (!row) return std::optional<AdminRecord>();
  KMSD_ASSIGN_OR_RETURN(auto rec, read_admin(*st));
  return std::optional<AdminRecord>(std::move(rec));
}

Result<std::optional<AdminRecord>> Store::find_admin_by_serial(const std::string& cert_serial) {
  std::lock_guard lock(impl_->mu);
  KMSD_ASSIGN_OR_RETURN(Lease st, impl_->stmt(std::string("SELECT ") + kAdminColumns +
                                              " FROM administrators WHERE cert_serial = ?1"));
  st->bind(1, cert_serial);
  KMSD_ASSIGN_OR_RETURN(bool row,
                        st->step("looking up the administrator with certificate " + cert_serial));
  if (!row) return std::optional<AdminRecord>();
  KMSD_ASSIGN_OR_RETURN(auto rec, read_admin(*st));
  return std::optional<AdminRecord>(std::move(rec));
}

Result<std::vector<AdminRecord>> Store::admins() {
  std::lock_guard lock(impl_->mu);
  KMSD_ASSIGN_OR_RETURN(Lease st, impl_->stmt(std::string("SELECT ") + kAdminColumns +
                                              " FROM administrators ORDER BY name"));
  std::vector<AdminRecord> out;
  while (true) {
    KMSD_ASSIGN_OR_RETURN(bool row, st->step("listing administrators"));
    if (!row) break;
    KMSD_ASSIGN_OR_RETURN(auto rec, read_admin(*st));
    out.push_back(std::move(rec));
  }
  return out;
}

Status Store::remove_admin(const std::string& name, std::int64_t at) {
  std::lock_guard lock(impl_->mu);
  {
    KMSD_ASSIGN_OR_RETURN(Lease st, impl_->stmt("UPDATE administrators SET removed_at = ?2 "
                                                "WHERE name = ?1 AND removed_at IS NULL"));
    st->bind(1, name).bind(2, at);
    KMSD_TRY(st->run("removing administrator " + name));
  }
  if (impl_->changes() > 0) return {};
  KMSD_ASSIGN_OR_RETURN(auto existing, find_admin(name));
  if (!existing)
    return make_error(ErrorCode::kNotFound, "no administrator named " + name + " is recorded");
  return {};  // already removed: keep the first removal time
}

// --- certificates: revocation and owners -----------------------------------------------

Status Store::revoke_certificate(const std::string& serial, std::int64_t at, int reason) {
  KMSD_TRY(check_serial(serial));
  KMSD_TRY(check_revocation_reason(reason));
  std::lock_guard lock(impl_->mu);
  {
    KMSD_ASSIGN_OR_RETURN(Lease st, impl_->stmt("UPDATE certificates SET revoked_at = ?2, "
                                                "revocation_reason = ?3 WHERE serial = ?1 AND "
                                                "revoked_at IS NULL"));
    st->bind(1, serial).bind(2, at).bind(3, static_cast<std::int64_t>(reason));
    KMSD_TRY(st->run("revoking certificate " + serial));
  }
  if (impl_->changes() > 0) return {};
  KMSD_ASSIGN_OR_RETURN(auto existing, find_certificate(serial));
  if (!existing)
    return make_error(ErrorCode::kNotFound,
                      "no certificate with serial " + serial + " is recorded");
  // Already revoked: the first revocation (time and reason) stands, as it does on the CRL.
  return {};
}

Result<std::vector<CertificateRecord>> Store::certificates_of_user(const std::string& user_id) {
  std::lock_guard lock(impl_->mu);
  KMSD_ASSIGN_OR_RETURN(Lease st, impl_->stmt(std::string("SELECT ") + kCertColumns +
                                              " FROM certificates WHERE user_id = ?1 "
                                              "ORDER BY issued_at, serial"));
  st->bind(1, user_id);
  std::string what = "listing the certificates of user " + user_id;
  std::vector<CertificateRecord> out;
  while (true) {
    KMSD_ASSIGN_OR_RETURN(bool row, st->step(what));
    if (!row) break;
    KMSD_ASSIGN_OR_RETURN(auto rec, read_certificate(*st));
    out.push_back(std::move(rec));
  }
  return out;
}

Status Store::for_each_revoked_certificate(
    const std::function<Status(const CertificateRecord&)>& fn) {
  std::lock_guard lock(impl_->mu);
  KMSD_ASSIGN_OR_RETURN(
      auto st, Statement::prepare(impl_->db.get(), std::string("SELECT ") + kCertColumns +
                                                       " FROM certificates WHERE revoked_at IS "
                                                       "NOT NULL ORDER BY revoked_at, serial"));
  while (true) {
    KMSD_ASSIGN_OR_RETURN(bool row, st->step("listing revoked certificates"));
    if (!row) break;
    KMSD_ASSIGN_OR_RETURN(auto rec, read_certificate(*st));
    KMSD_TRY(fn(rec));
  }
  return {};
}

// --- users -------------------------------------------------------------------------------

namespace {

constexpr const char* kUserColumns =
    "id, email, display_name, dn, state, created_at, updated_at, last_enrolled_at, "
    "keys_from_version";

Result<UserRecord> read_user(const Statement& st) {
  UserRecord rec;
  rec.id = st.text(0);
  rec.email = st.text(1);
  rec.display_name = st.text(2);
  if (!st.is_null(3)) rec.dn = st.text(3);
  std::string state = st.text(4);
  auto s = parse_user_state(state);
  if (!s)
    return make_error(ErrorCode::kStore, "user " + rec.id + " has unknown state '" + state + "'");
  rec.state = *s;
  rec.created_at = st.int64(5);
  rec.updated_at = st.int64(6);
  rec.last_enrolled_at = st.opt_int64(7);
  if (auto v = st.opt_int64(8)) rec.keys_from_version = static_cast<int>(*v);
  return rec;
}

void bind_opt_text(Statement& st, int idx, const std::optional<std::string>& v) {
  if (v) {
    st.bind(idx, *v);
  } else {
    st.bind_null(idx);
  }
}

std::optional<std::int64_t> opt_int64(std::optional<int> v) {
  return v ? std::optional<std::int64_t>(*v) : std::nullopt;
}

// LIMIT for SQLite: a size_t larger than int64 means "no limit".
std::int64_t sql_limit(std::size_t limit) {
  constexpr auto kMax = static_cast<std::size_t>(std::numeric_limits<std::int64_t>::max());
  return static_cast<std::int64_t>(std::min(limit, kMax));
}

}  // namespace

Status Store::insert_user(const UserRecord& rec) {
  if (rec.id.empty()) return make_error(ErrorCode::kInvalidArgument, "a user id must not be empty");
  std::lock_guard lock(impl_->mu);
  KMSD_ASSIGN_OR_RETURN(Lease st, impl_->stmt(std::string("INSERT INTO users (") + kUserColumns +
                                              ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"));
  st->bind(1, rec.id).bind(2, rec.email).bind(3, rec.display_name);
  bind_opt_text(*st, 4, rec.dn);
  st->bind(5, to_string(rec.state))
      .bind(6, rec.created_at)
      .bind(7, rec.updated_at)
      .bind(8, rec.last_enrolled_at)
      .bind(9, opt_int64(rec.keys_from_version));
  Status s = st->run("inserting user " + rec.id);
  if (!s.ok() && is_unique_violation(st->last_rc()))
    return make_error(ErrorCode::kAlreadyExists,
                      "a user with id " + rec.id + " is already recorded");
  return s;
}

Result<std::optional<UserRecord>> Store::find_user(const std::string& id) {
  std::lock_guard lock(impl_->mu);
  KMSD_ASSIGN_OR_RETURN(
      Lease st, impl_->stmt(std::string("SELECT ") + kUserColumns + " FROM users WHERE id = ?1"));
  st->bind(1, id);
  KMSD_ASSIGN_OR_RETURN(bool row, st->step("looking up user " + id));
  if (!row) return std::optional<UserRecord>();
  KMSD_ASSIGN_OR_RETURN(auto rec, read_user(*st));
  return std::optional<UserRecord>(std::move(rec));
}

Status Store::update_user(const UserRecord& rec) {
  std::lock_guard lock(impl_->mu);
  {
    KMSD_ASSIGN_OR_RETURN(Lease st,
                          impl_->stmt("UPDATE users SET email = ?2, display_name = ?3, dn = ?4, "
                                      "state = ?5, updated_at = ?6, last_enrolled_at = ?7, "
                                      "keys_from_version = ?8 WHERE id = ?1"));
    st->bind(1, rec.id).bind(2, rec.email).bind(3, rec.display_name);
    bind_opt_text(*st, 4, rec.dn);
    st->bind(5, to_string(rec.state)).bind(6, rec.updated_at).bind(7, rec.last_enrolled_at);
    st->bind(8, opt_int64(rec.keys_from_version));
    KMSD_TRY(st->run("updating user " + rec.id));
  }
  if (impl_->changes() == 0)
    return make_error(ErrorCode::kNotFound, "no user " + rec.id + " is recorded");
  return {};
}

Result<std::size_t> Store::for_each_user(const std::string& after_id, std::size_t limit,
                                         const std::function<Status(const UserRecord&)>& fn) {
  if (limit == 0)
    return make_error(ErrorCode::kInvalidArgument,
                      "listing users: the page size must be at least 1");
  std::lock_guard lock(impl_->mu);
  // A statement of its own, not the cache: FN may call back into the store, even into
  // for_each_user, without resetting the statement this loop is stepping.
  KMSD_ASSIGN_OR_RETURN(
      auto st,
      Statement::prepare(impl_->db.get(), std::string("SELECT ") + kUserColumns +
                                              " FROM users WHERE id > ?1 ORDER BY id LIMIT ?2"));
  st->bind(1, after_id).bind(2, sql_limit(limit));
  const std::string what = "listing users after '" + after_id + "'";
  std::size_t visited = 0;
  while (true) {
    KMSD_ASSIGN_OR_RETURN(bool row, st->step(what));
    if (!row) break;
    KMSD_ASSIGN_OR_RETURN(auto rec, read_user(*st));
    ++visited;
    KMSD_TRY(fn(rec));
  }
  return visited;
}

Result<std::size_t> Store::count_users() {
  std::lock_guard lock(impl_->mu);
  KMSD_ASSIGN_OR_RETURN(Lease st, impl_->stmt("SELECT count(*) FROM users"));
  KMSD_ASSIGN_OR_RETURN(bool row, st->step("counting users"));
  if (!row) return store_error("counting users", "no result");
  return static_cast<std::size_t>(st->int64(0));
}

Result<std::size_t> Store::count_revoked_certificates() {
  std::lock_guard lock(impl_->mu);
  KMSD_ASSIGN_OR_RETURN(
      Lease st, impl_->stmt("SELECT count(*) FROM certificates WHERE revoked_at IS NOT NULL"));
  KMSD_ASSIGN_OR_RETURN(bool row, st->step("counting revoked certificates"));
  if (!row) return store_error("counting revoked certificates", "no result");
  return static_cast<std::size_t>(st->int64(0));
}

// --- enrollment tokens -------------------------------------------------------------------

namespace {

constexpr const char* kTokenColumns =
    "user_id, purpose, sealed, issued_at, issued_by, expires_at, failed_attempts, used_at";

Result<EnrollmentTokenRecord> read_token(const Statement& st) {
  EnrollmentTokenRecord rec;
  rec.user_id = st.text(0);
  std::string purpose = st.text(1);
  auto p = parse_token_purpose(purpose);
  if (!p)
    return make_error(ErrorCode::kStore, "the enrollment token of user " + rec.user_id +
                                             " has unknown purpose '" + purpose + "'");
  rec.purpose = *p;
  rec.sealed = st.blob(2);
  rec.issued_at = st.int64(3);
  rec.issued_by = st.text(4);
  rec.expires_at = st.int64(5);
  rec.failed_attempts = static_cast<int>(st.int64(6));
  rec.used_at = st.opt_int64(7);
  return rec;
}

}  // namespace

Status Store::put_enrollment_token(const EnrollmentTokenRecord& rec) {
  if (rec.failed_attempts < 0)
    return make_error(ErrorCode::kInvalidArgument,
                      "an enrollment token cannot have a negative number of failed attempts");
  std::lock_guard lock(impl_->mu);
  // An upsert rather than INSERT OR REPLACE: the row is updated in place, never deleted.
  KMSD_ASSIGN_OR_RETURN(
      Lease st, impl_->stmt(std::string("INSERT INTO enrollment_tokens (") + kTokenColumns +
                            ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (user_id) DO "
                            "UPDATE SET purpose = excluded.purpose, sealed = excluded.sealed, "
                            "issued_at = excluded.issued_at, issued_by = excluded.issued_by, "
                            "expires_at = excluded.expires_at, failed_attempts = "
                            "excluded.failed_attempts, used_at = excluded.used_at"));
  st->bind(1, rec.user_id)
      .bind(2, to_string(rec.purpose))
      .bind(3, rec.sealed)
      .bind(4, rec.issued_at)
      .bind(5, rec.issued_by)
      .bind(6, rec.expires_at)
      .bind(7, static_cast<std::int64_t>(rec.failed_attempts))
      .bind(8, rec.used_at);
  Status s = st->run("storing the enrollment token of user " + rec.user_id);
  if (!s.ok() && st->last_rc() == SQLITE_CONSTRAINT_FOREIGNKEY)
    return make_error(ErrorCode::kNotFound,
                      "storing an enrollment token: no user " + rec.user_id + " is recorded");
  return s;
}

Result<std::optional<EnrollmentTokenRecord>> Store::find_enrollment_token(
    const std::string& user_id) {
  std::lock_guard lock(impl_->mu);
  KMSD_ASSIGN_OR_RETURN(Lease st, impl_->stmt(std::string("SELECT ") + kTokenColumns +
                                              " FROM enrollment_tokens WHERE user_id = ?1"));
  st->bind(1, user_id);
  KMSD_ASSIGN_OR_RETURN(bool row, st->step("looking up the enrollment token of user " + user_id));
  if (!row) return std::optional<EnrollmentTokenRecord>();
  KMSD_ASSIGN_OR_RETURN(auto rec, read_token(*st));
  return std::optional<EnrollmentTokenRecord>(std::move(rec));
}

Result<int> Store::record_token_failure(const std::string& user_id) {
  std::lock_guard lock(impl_->mu);
  KMSD_ASSIGN_OR_RETURN(Lease st, impl_->stmt("UPDATE enrollment_tokens SET failed_attempts = "
                                              "failed_attempts + 1 WHERE user_id = ?1 RETURNING "
                                              "failed_attempts"));
  st->bind(1, user_id);
  const std::string what = "counting a failed attempt on the enrollment token of user " + user_id;
  KMSD_ASSIGN_OR_RETURN(bool row, st->step(what));
  if (!row) return make_error(ErrorCode::kNotFound, "user " + user_id + " has no enrollment token");
  int count = static_cast<int>(st->int64(0));
  KMSD_TRY(st->run(what));  // finish the statement so the change is complete
  return count;
}

Status Store::mark_token_used(const std::string& user_id, std::int64_t at) {
  std::lock_guard lock(impl_->mu);
  {
    KMSD_ASSIGN_OR_RETURN(Lease st, impl_->stmt("UPDATE enrollment_tokens SET used_at = ?2 "
                                                "WHERE user_id = ?1 AND used_at IS NULL"));
    st->bind(1, user_id).bind(2, at);
    KMSD_TRY(st->run("marking the enrollment token of user " + user_id + " used"));
  }
  if (impl_->changes() > 0) return {};
  KMSD_ASSIGN_OR_RETURN(auto existing, find_enrollment_token(user_id));
  if (!existing)
    return make_error(ErrorCode::kNotFound, "user " + user_id + " has no enrollment token");
  // Single use: a second use is refused, never recorded over the first.
  return make_error(ErrorCode::kFailedPrecondition,
                    "the enrollment token of user " + user_id + " was already used at " +
                        std::to_string(existing->used_at.value_or(0)));
}

Status Store::delete_enrollment_token(const std::string& user_id) {
  std::lock_guard lock(impl_->mu);
  {
    KMSD_ASSIGN_OR_RETURN(Lease st,
                          impl_->stmt("DELETE FROM enrollment_tokens WHERE user_id = ?1"));
    st->bind(1, user_id);
    KMSD_TRY(st->run("deleting the enrollment token of user " + user_id));
  }
  if (impl_->changes() == 0)
    return make_error(ErrorCode::kNotFound, "user " + user_id + " has no enrollment token");
  return {};
}

// --- key history -------------------------------------------------------------------------

namespace {

constexpr const char* kKeyHistoryColumns =
    "user_id, version, key_id, algorithm, master_version, sealed_key, cert_serial, created_at";

KeyHistoryRecord read_key_history(const Statement& st) {
  KeyHistoryRecord rec;
  rec.user_id = st.text(0);
  rec.version = static_cast<int>(st.int64(1));
  rec.key_id = st.text(2);
  rec.algorithm = st.text(3);
  rec.master_version = static_cast<std::uint32_t>(st.int64(4));
  rec.sealed_key = st.blob(5);
  if (!st.is_null(6)) rec.cert_serial = st.text(6);
  rec.created_at = st.int64(7);
  return rec;
}

}  // namespace

Status Store::append_key_history(const KeyHistoryRecord& rec) {
  if (rec.key_id.empty())
    return make_error(ErrorCode::kInvalidArgument, "a key id must not be empty");
  if (rec.version < 1)
    return make_error(ErrorCode::kInvalidArgument,
                      "key history versions start at 1, not " + std::to_string(rec.version));
  const std::string what =
      "appending key " + rec.key_id + " to the key history of user " + rec.user_id;
  // One transaction: the depth read and the insert see the same history, also against
  // another process writing the same file.
  return transaction([&]() -> Status {
    KMSD_ASSIGN_OR_RETURN(int depth, key_history_depth(rec.user_id));
    if (rec.version != depth + 1)
      return make_error(ErrorCode::kFailedPrecondition,
                        "the key history of user " + rec.user_id + " holds " +
                            std::to_string(depth) + " key(s), so the next version is " +
                            std::to_string(depth + 1) + ", not " + std::to_string(rec.version));
    {
      KMSD_ASSIGN_OR_RETURN(Lease st,
                            impl_->stmt("SELECT user_id FROM key_history WHERE key_id = ?1"));
      st->bind(1, rec.key_id);
      KMSD_ASSIGN_OR_RETURN(bool row, st->step(what));
      if (row)
        return make_error(ErrorCode::kAlreadyExists, "a key with id " + rec.key_id +
                                                         " is already in the key history of "
                                                         "user " +
                                                         st->text(0));
    }
    KMSD_ASSIGN_OR_RETURN(
        Lease st, impl_->stmt(std::string("INSERT INTO key_history (") + kKeyHistoryColumns +
                              ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"));
    st->bind(1, rec.user_id)
        .bind(2, static_cast<std::int64_t>(rec.version))
        .bind(3, rec.key_id)
        .bind(4, rec.algorithm)
        .bind(5, static_cast<std::int64_t>(rec.master_version))
        .bind(6, rec.sealed_key);
    bind_opt_text(*st, 7, rec.cert_serial);
    st->bind(8, rec.created_at);
    Status s = st->run(what);
    if (s.ok() || st->last_rc() != SQLITE_CONSTRAINT_FOREIGNKEY) return s;
    // Either the user or the certificate is missing; name the one that is.
    KMSD_ASSIGN_OR_RETURN(auto user, find_user(rec.user_id));
    if (!user)
      return make_error(ErrorCode::kNotFound, what + ": no user " + rec.user_id + " is recorded");
    return make_error(ErrorCode::kNotFound, what + ": no certificate with serial " +
                                                rec.cert_serial.value_or("") + " is recorded");
  });
}

Result<std::vector<KeyHistoryRecord>> Store::key_history(const std::string& user_id) {
  std::lock_guard lock(impl_->mu);
  KMSD_ASSIGN_OR_RETURN(Lease st, impl_->stmt(std::string("SELECT ") + kKeyHistoryColumns +
                                              " FROM key_history WHERE user_id = ?1 ORDER BY "
                                              "version"));
  st->bind(1, user_id);
  std::vector<KeyHistoryRecord> out;
  while (true) {
    KMSD_ASSIGN_OR_RETURN(bool row, st->step("reading the key history of user " + user_id));
    if (!row) break;
    out.push_back(read_key_history(*st));
  }
  return out;
}

Result<std::vector<KeyHistoryRecord>> Store::key_history_not_under(std::uint32_t master_version,
                                                                   const std::string& after_user,
                                                                   int after_version,
                                                                   std::size_t limit) {
  std::lock_guard lock(impl_->mu);
  KMSD_ASSIGN_OR_RETURN(
      Lease st, impl_->stmt(std::string("SELECT ") + kKeyHistoryColumns +
                            " FROM key_history WHERE master_version <> ?1 AND (user_id, version) "
                            "> (?2, ?3) ORDER BY user_id, version LIMIT ?4"));
  st->bind(1, static_cast<std::int64_t>(master_version))
      .bind(2, after_user)
      .bind(3, static_cast<std::int64_t>(after_version))
      .bind(4, static_cast<std::int64_t>(limit));
  std::vector<KeyHistoryRecord> out;
  while (true) {
    KMSD_ASSIGN_OR_RETURN(bool row, st->step("reading key history to re-wrap"));
    if (!row) break;
    out.push_back(read_key_history(*st));
  }
  return out;
}

Result<bool> Store::rewrap_key_history(const std::string& user_id, int version,
                                       const Bytes& old_sealed, std::uint32_t master_version,
                                       const Bytes& sealed_key) {
  std::lock_guard lock(impl_->mu);
  {
    KMSD_ASSIGN_OR_RETURN(Lease st, impl_->stmt("UPDATE key_history SET sealed_key = ?4, "
                                                "master_version = ?5 WHERE user_id = ?1 AND "
                                                "version = ?2 AND sealed_key = ?3"));
    st->bind(1, user_id)
        .bind(2, static_cast<std::int64_t>(version))
        .bind(3, old_sealed)
        .bind(4, sealed_key)
        .bind(5, static_cast<std::int64_t>(master_version));
    KMSD_TRY(st->run("re-wrapping key " + std::to_string(version) + " of user " + user_id));
  }
  return impl_->changes() > 0;
}

Result<std::vector<std::pair<std::uint32_t, std::size_t>>> Store::key_history_master_versions() {
  std::lock_guard lock(impl_->mu);
  KMSD_ASSIGN_OR_RETURN(Lease st, impl_->stmt("SELECT master_version, count(*) FROM key_history "
                                              "GROUP BY master_version ORDER BY master_version"));
  std::vector<std::pair<std::uint32_t, std::size_t>> out;
  while (true) {
    KMSD_ASSIGN_OR_RETURN(bool row, st->step("counting key history by master key version"));
    if (!row) break;
    out.emplace_back(static_cast<std::uint32_t>(st->int64(0)),
                     static_cast<std::size_t>(st->int64(1)));
  }
  return out;
}

Result<std::vector<EnrollmentTokenRecord>> Store::enrollment_tokens_after(
    const std::string& after_user, std::size_t limit) {
  std::lock_guard lock(impl_->mu);
  KMSD_ASSIGN_OR_RETURN(Lease st, impl_->stmt(std::string("SELECT ") + kTokenColumns +
                                              " FROM enrollment_tokens WHERE user_id > ?1 "
                                              "ORDER BY user_id LIMIT ?2"));
  st->bind(1, after_user).bind(2, static_cast<std::int64_t>(limit));
  std::vector<EnrollmentTokenRecord> out;
  while (true) {
    KMSD_ASSIGN_OR_RETURN(bool row, st->step("reading enrollment tokens to re-wrap"));
    if (!row) break;
    KMSD_ASSIGN_OR_RETURN(auto rec, read_token(*st));
    out.push_back(std::move(rec));
  }
  return out;
}

Result<bool> Store::replace_token_sealed(const std::string& user_id, const Bytes& old_sealed,
                                         const Bytes& sealed) {
  std::lock_guard lock(impl_->mu);
  {
    KMSD_ASSIGN_OR_RETURN(Lease st, impl_->stmt("UPDATE enrollment_tokens SET sealed = ?3 WHERE "
                                                "user_id = ?1 AND sealed = ?2"));
    st->bind(1, user_id).bind(2, old_sealed).bind(3, sealed);
    KMSD_TRY(st->run("re-wrapping the enrollment token of user " + user_id));
  }
  return impl_->changes() > 0;
}

Result<int> Store::key_history_depth(const std::string& user_id) {
  std::lock_guard lock(impl_->mu);
  KMSD_ASSIGN_OR_RETURN(Lease st, impl_->stmt("SELECT coalesce(max(version), 0) FROM "
                                              "key_history WHERE user_id = ?1"));
  st->bind(1, user_id);
  const std::string what = "reading the key history depth of user " + user_id;
  KMSD_ASSIGN_OR_RETURN(bool row, st->step(what));
  if (!row) return store_error(what, "no result");
  return static_cast<int>(st->int64(0));
}

// --- approvals ---------------------------------------------------------------------------

namespace {

constexpr const char* kRequestColumns =
    "id, operation, params, requested_by, required, state, created_at, expires_at, "
    "decided_at, result";

Result<ApprovalRequestRecord> read_request(const Statement& st) {
  ApprovalRequestRecord rec;
  rec.id = st.text(0);
  rec.operation = st.text(1);
  rec.params = st.text(2);
  rec.requested_by = st.text(3);
  rec.required = static_cast<int>(st.int64(4));
  std::string state = st.text(5);
  auto s = parse_request_state(state);
  if (!s)
    return make_error(ErrorCode::kStore,
                      "approval request " + rec.id + " has unknown state '" + state + "'");
  rec.state = *s;
  rec.created_at = st.int64(6);
  rec.expires_at = st.int64(7);
  rec.decided_at = st.opt_int64(8);
  if (!st.is_null(9)) rec.result = st.text(9);
  return rec;
}

}  // namespace

Status Store::insert_approval_request(const ApprovalRequestRecord& rec) {
  if (rec.id.empty())
    return make_error(ErrorCode::kInvalidArgument, "an approval request id must not be empty");
  if (rec.required < 1)
    return make_error(ErrorCode::kInvalidArgument, "approval request " + rec.id +
                                                       " must require at least 1 approval, not " +
                                                       std::to_string(rec.required));
  std::lock_guard lock(impl_->mu);
  KMSD_ASSIGN_OR_RETURN(
      Lease st, impl_->stmt(std::string("INSERT INTO approval_requests (") + kRequestColumns +
                            ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"));
  st->bind(1, rec.id)
      .bind(2, rec.operation)
      .bind(3, rec.params)
      .bind(4, rec.requested_by)
      .bind(5, static_cast<std::int64_t>(rec.required))
      .bind(6, to_string(rec.state))
      .bind(7, rec.created_at)
      .bind(8, rec.expires_at)
      .bind(9, rec.decided_at);
  bind_opt_text(*st, 10, rec.result);
  Status s = st->run("inserting approval request " + rec.id);
  if (!s.ok() && is_unique_violation(st->last_rc()))
    return make_error(ErrorCode::kAlreadyExists,
                      "an approval request with id " + rec.id + " is already recorded");
  return s;
}

Result<std::optional<ApprovalRequestRecord>> Store::find_approval_request(const std::string& id) {
  std::lock_guard lock(impl_->mu);
  KMSD_ASSIGN_OR_RETURN(Lease st, impl_->stmt(std::string("SELECT ") + kRequestColumns +
                                              " FROM approval_requests WHERE id = ?1"));
  st->bind(1, id);
  KMSD_ASSIGN_OR_RETURN(bool row, st->step("looking up approval request " + id));
  if (!row) return std::optional<ApprovalRequestRecord>();
  KMSD_ASSIGN_OR_RETURN(auto rec, read_request(*st));
  return std::optional<ApprovalRequestRecord>(std::move(rec));
}

Result<std::vector<ApprovalRequestRecord>> Store::approval_requests(
    std::optional<RequestState> state) {
  std::lock_guard lock(impl_->mu);
  // ?1 NULL: every state.
  KMSD_ASSIGN_OR_RETURN(Lease st, impl_->stmt(std::string("SELECT ") + kRequestColumns +
                                              " FROM approval_requests WHERE ?1 IS NULL OR "
                                              "state = ?1 ORDER BY created_at, id"));
  if (state) {
    st->bind(1, to_string(*state));
  } else {
    st->bind_null(1);
  }
  std::string what = state ? std::string("listing ") + to_string(*state) + " approval requests"
                           : std::string("listing approval requests");
  std::vector<ApprovalRequestRecord> out;
  while (true) {
    KMSD_ASSIGN_OR_RETURN(bool row, st->step(what));
    if (!row) break;
    KMSD_ASSIGN_OR_RETURN(auto rec, read_request(*st));
    out.push_back(std::move(rec));
  }
  return out;
}

Status Store::update_approval_request(const ApprovalRequestRecord& rec) {
  std::lock_guard lock(impl_->mu);
  {
    KMSD_ASSIGN_OR_RETURN(Lease st, impl_->stmt("UPDATE approval_requests SET state = ?2, "
                                                "decided_at = ?3, result = ?4 WHERE id = ?1"));
    st->bind(1, rec.id).bind(2, to_string(rec.state)).bind(3, rec.decided_at);
    bind_opt_text(*st, 4, rec.result);
    KMSD_TRY(st->run("updating approval request " + rec.id));
  }
  if (impl_->changes() == 0)
    return make_error(ErrorCode::kNotFound, "no approval request " + rec.id + " is recorded");
  return {};
}

Status Store::add_approval(const ApprovalRecord& rec) {
  if (rec.approver.empty())
    return make_error(ErrorCode::kInvalidArgument, "an approver name must not be empty");
  std::lock_guard lock(impl_->mu);
  KMSD_ASSIGN_OR_RETURN(Lease st, impl_->stmt("INSERT INTO approvals (request_id, approver, "
                                              "decision, at) VALUES (?1, ?2, ?3, ?4)"));
  st->bind(1, rec.request_id)
      .bind(2, rec.approver)
      .bind(3, rec.approve ? "approve" : "deny")
      .bind(4, rec.at);
  Status s = st->run("recording the decision of " + rec.approver + " on request " + rec.request_id);
  if (s.ok()) return s;
  if (is_unique_violation(st->last_rc()))
    return make_error(
        ErrorCode::kAlreadyExists,
        "administrator " + rec.approver + " has already decided on request " + rec.request_id);
  if (st->last_rc() == SQLITE_CONSTRAINT_FOREIGNKEY)
    return make_error(ErrorCode::kNotFound,
                      "no approval request " + rec.request_id + " is recorded");
  return s;
}

Result<std::vector<ApprovalRecord>> Store::approvals(const std::string& request_id) {
  std::lock_guard lock(impl_->mu);
  KMSD_ASSIGN_OR_RETURN(Lease st, impl_->stmt("SELECT request_id, approver, decision, at FROM "
                                              "approvals WHERE request_id = ?1 ORDER BY at, "
                                              "approver"));
  st->bind(1, request_id);
  std::vector<ApprovalRecord> out;
  while (true) {
    KMSD_ASSIGN_OR_RETURN(bool row, st->step("listing the decisions on request " + request_id));
    if (!row) break;
    ApprovalRecord rec;
    rec.request_id = st->text(0);
    rec.approver = st->text(1);
    std::string decision = st->text(2);
    if (decision != "approve" && decision != "deny")
      return make_error(ErrorCode::kStore, "the decision of " + rec.approver + " on request " +
                                               request_id + " is unknown: '" + decision + "'");
    rec.approve = decision == "approve";
    rec.at = st->int64(3);
    out.push_back(std::move(rec));
  }
  return out;
}

// --- audit -------------------------------------------------------------------------------

namespace {

constexpr const char* kAuditColumns = "seq, at, actor, action, record, prev_hash, hash, mac";

AuditRecord read_audit(const Statement& st) {
  AuditRecord rec;
  rec.seq = st.int64(0);
  rec.at = st.int64(1);
  rec.actor = st.text(2);
  rec.action = st.text(3);
  rec.record = st.text(4);
  rec.prev_hash = st.blob(5);
  rec.hash = st.blob(6);
  rec.mac = st.blob(7);
  return rec;
}

}  // namespace

Status Store::append_audit(const AuditRecord& rec) {
  const std::string what = "appending audit record " + std::to_string(rec.seq);
  // The check and the insert in one transaction, so a concurrent writer cannot slip a
  // record in between.
  return transaction([&]() -> Status {
    std::int64_t last = 0;
    {
      KMSD_ASSIGN_OR_RETURN(Lease st, impl_->stmt("SELECT coalesce(max(seq), 0) FROM audit_log"));
      KMSD_ASSIGN_OR_RETURN(bool row, st->step(what));
      if (row) last = st->int64(0);
    }
    if (rec.seq != last + 1)
      return make_error(ErrorCode::kFailedPrecondition,
                        what + ": the audit chain ends at record " + std::to_string(last) +
                            ", so the next record must be " + std::to_string(last + 1));
    KMSD_ASSIGN_OR_RETURN(Lease st,
                          impl_->stmt(std::string("INSERT INTO audit_log (") + kAuditColumns +
                                      ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"));
    st->bind(1, rec.seq)
        .bind(2, rec.at)
        .bind(3, rec.actor)
        .bind(4, rec.action)
        .bind(5, rec.record)
        .bind(6, rec.prev_hash)
        .bind(7, rec.hash)
        .bind(8, rec.mac);
    return st->run(what);
  });
}

Result<std::optional<AuditRecord>> Store::last_audit() {
  std::lock_guard lock(impl_->mu);
  KMSD_ASSIGN_OR_RETURN(Lease st, impl_->stmt(std::string("SELECT ") + kAuditColumns +
                                              " FROM audit_log ORDER BY seq DESC LIMIT 1"));
  KMSD_ASSIGN_OR_RETURN(bool row, st->step("reading the last audit record"));
  if (!row) return std::optional<AuditRecord>();
  return std::optional<AuditRecord>(read_audit(*st));
}

Status Store::for_each_audit(const std::function<Status(const AuditRecord&)>& fn) {
  std::lock_guard lock(impl_->mu);
  // A statement of its own (see for_each_user). The walk reads one snapshot: records
  // other connections commit meanwhile are not visited; whether records FN itself appends
  // are visited is up to SQLite, so FN should not append.
  KMSD_ASSIGN_OR_RETURN(auto st,
                        Statement::prepare(impl_->db.get(), std::string("SELECT ") + kAuditColumns +
                                                                " FROM audit_log ORDER BY seq"));
  while (true) {
    KMSD_ASSIGN_OR_RETURN(bool row, st->step("reading the audit chain"));
    if (!row) break;
    KMSD_TRY(fn(read_audit(*st)));
  }
  return {};
}

}  // namespace kmsd::store

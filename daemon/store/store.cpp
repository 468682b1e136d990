#include "daemon/store/store.hpp"

#include <fcntl.h>
#include <sqlite3.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <chrono>
#include <cstring>
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
  }
  return "unknown";
}

std::optional<AdminRole> parse_admin_role(std::string_view s) noexcept {
  if (s == "admin") return AdminRole::kAdmin;
  if (s == "auditor") return AdminRole::kAuditor;
  if (s == "approver") return AdminRole::kApprover;
  return std::nullopt;
}

namespace {

// ---------------------------------------------------------------------------------------
// Migrations. Append only: never edit a migration that has shipped; add a new one.

struct Migration {
  int version;
  const char* sql;
};

constexpr const char* kCreateSchemaVersion = R"sql(
CREATE TABLE IF NOT EXISTS schema_version (
  id         INTEGER PRIMARY KEY CHECK (id = 1),  -- exactly one row
  version    INTEGER NOT NULL,
  applied_at INTEGER NOT NULL
);
)sql";

constexpr std::array<Migration, 1> kMigrations = {{
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

std::int64_t now_seconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
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

  // Applies one migration in its own transaction (re-checking the version under the write
  // lock, in case another process migrated meanwhile).
  Status apply(const Migration& m) {
    std::string what =
        "migrating " + path.string() + " to schema version " + std::to_string(m.version);
    KMSD_TRY(exec("BEGIN IMMEDIATE", what));
    auto body = [&]() -> Status {
      KMSD_TRY(exec(kCreateSchemaVersion, what));
      {
        KMSD_ASSIGN_OR_RETURN(Lease st,
                              stmt("INSERT OR IGNORE INTO schema_version (id, version, applied_at) "
                                   "VALUES (1, 0, ?1)"));
        st->bind(1, now_seconds());
        KMSD_TRY(st->run(what));
      }
      KMSD_ASSIGN_OR_RETURN(int current, read_version());
      if (current > kSchemaVersion) return too_new(current);
      if (current >= m.version) return {};
      if (current != m.version - 1)
        return store_error(what, "the database is at version " + std::to_string(current) +
                                     ", expected " + std::to_string(m.version - 1));
      KMSD_TRY(exec(m.sql, what));
      KMSD_ASSIGN_OR_RETURN(Lease st, stmt("UPDATE schema_version SET version = ?1, "
                                           "applied_at = ?2 WHERE id = 1"));
      st->bind(1, static_cast<std::int64_t>(m.version)).bind(2, now_seconds());
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
    "serial, kind, subject, not_before, not_after, der, issued_at, revoked_at";

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
  std::lock_guard lock(impl_->mu);
  KMSD_ASSIGN_OR_RETURN(Lease st,
                        impl_->stmt(std::string("INSERT INTO certificates (") + kCertColumns +
                                    ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"));
  st->bind(1, rec.serial)
      .bind(2, to_string(rec.kind))
      .bind(3, rec.subject)
      .bind(4, rec.not_before)
      .bind(5, rec.not_after)
      .bind(6, rec.der)
      .bind(7, rec.issued_at)
      .bind(8, rec.revoked_at);
  Status s = st->run("inserting certificate " + rec.serial);
  if (!s.ok() && is_unique_violation(st->last_rc()))
    return make_error(ErrorCode::kAlreadyExists,
                      "a certificate with serial " + rec.serial + " is already recorded");
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

}  // namespace kmsd::store

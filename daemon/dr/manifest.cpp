#include "daemon/dr/manifest.hpp"

#include <ctime>

namespace kmsd::dr {

namespace {

struct StmtFree {
  void operator()(sqlite3_stmt* s) const noexcept { sqlite3_finalize(s); }
};
using Stmt = std::unique_ptr<sqlite3_stmt, StmtFree>;

Error db_error(sqlite3* db, const std::string& what) {
  return make_error(ErrorCode::kStore,
                    "manifest: " + what + ": " + sqlite3_errmsg(db) +
                        " (is another kmsctl dr run using this staging directory?)");
}

Result<Stmt> prepare(sqlite3* db, const char* sql) {
  sqlite3_stmt* raw = nullptr;
  if (sqlite3_prepare_v2(db, sql, -1, &raw, nullptr) != SQLITE_OK)
    return db_error(db, std::string("preparing ") + sql);
  return Stmt(raw);
}

void bind_text(sqlite3_stmt* s, int i, const std::string& v) {
  sqlite3_bind_text(s, i, v.c_str(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
}

std::string column(sqlite3_stmt* s, int i) {
  const unsigned char* p = sqlite3_column_text(s, i);
  return p == nullptr ? std::string() : std::string(reinterpret_cast<const char*>(p));
}

const char* kSchema = R"sql(
CREATE TABLE IF NOT EXISTS settings(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages(
  path TEXT PRIMARY KEY,
  format TEXT NOT NULL,
  digest TEXT NOT NULL,
  status TEXT NOT NULL,
  recipients TEXT NOT NULL,
  users TEXT NOT NULL,
  reason TEXT NOT NULL,
  recorded_at INTEGER NOT NULL,
  pack TEXT NOT NULL DEFAULT '',
  pack_offset INTEGER NOT NULL DEFAULT 0,
  pack_length INTEGER NOT NULL DEFAULT 0,
  header_length INTEGER NOT NULL DEFAULT 0,
  crlf INTEGER NOT NULL DEFAULT 0,
  staged_sha256 TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS reencrypted(
  path TEXT PRIMARY KEY REFERENCES messages(path),
  users TEXT NOT NULL,
  out_digest TEXT NOT NULL,
  recorded_at INTEGER NOT NULL);
)sql";

// The columns of a message row, in the order read_row() reads them.
const std::string kRowColumns =
    "path, format, digest, status, recipients, users, reason, pack, pack_offset, pack_length, "
    "header_length, crlf, staged_sha256";

std::uint64_t column_u64(sqlite3_stmt* s, int i) {
  return static_cast<std::uint64_t>(sqlite3_column_int64(s, i));
}

// Columns FIRST.. of S, as kRowColumns lists them.
ManifestRow read_row(sqlite3_stmt* s, int first = 0) {
  ManifestRow r;
  r.path = column(s, first + 0);
  r.format = column(s, first + 1);
  r.digest = column(s, first + 2);
  r.status = column(s, first + 3);
  r.recipients = column(s, first + 4);
  r.users = column(s, first + 5);
  r.reason = column(s, first + 6);
  r.copy.pack = column(s, first + 7);
  r.copy.offset = column_u64(s, first + 8);
  r.copy.length = column_u64(s, first + 9);
  r.copy.header_length = column_u64(s, first + 10);
  r.copy.crlf = sqlite3_column_int(s, first + 11) != 0;
  r.copy.sha256 = column(s, first + 12);
  return r;
}

}  // namespace

Result<std::unique_ptr<Manifest>> Manifest::open(const std::filesystem::path& file) {
  sqlite3* raw = nullptr;
  int rc =
      sqlite3_open_v2(file.c_str(), &raw,
                      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, nullptr);
  std::unique_ptr<Manifest> m(new Manifest(raw));
  if (rc != SQLITE_OK) return db_error(raw, "cannot open " + file.string());
  sqlite3_busy_timeout(raw, 5000);
  // WAL with synchronous=NORMAL: a commit survives a killed process; the files a row names
  // are synced before the row is committed (see the header).
  KMSD_TRY(m->exec("PRAGMA journal_mode=WAL", "setting the journal mode"));
  KMSD_TRY(m->exec("PRAGMA synchronous=NORMAL", "setting synchronous"));
  // A fixed page cache (1 MiB; SQLite's default is 2 MiB per connection): with the reader's,
  // the manifest's share of memory stays the same whatever the store's size.
  KMSD_TRY(m->exec("PRAGMA cache_size=-1024", "setting the cache size"));
  // A manifest of the layout before packs has a messages table without the pack column (its
  // staged messages are files under messages/): refused, before anything is created in it.
  auto compiles = [raw](const char* sql) {
    sqlite3_stmt* probe = nullptr;
    const bool ok = sqlite3_prepare_v2(raw, sql, -1, &probe, nullptr) == SQLITE_OK;
    sqlite3_finalize(probe);
    return ok;
  };
  if (compiles("SELECT path FROM messages LIMIT 0") &&
      !compiles("SELECT pack FROM messages LIMIT 0"))
    return make_error(ErrorCode::kFailedPrecondition,
                      file.string() +
                          " was made by an older kmsctl that staged one file per message (under "
                          "messages/); this kmsctl stages into pack files and cannot use it. "
                          "Finish that recovery with the kmsctl that started it, or start again "
                          "with a new, empty --staging directory (predecrypt stages every "
                          "message again).");
  KMSD_TRY(m->exec(kSchema, "creating the schema"));
  return m;
}

Manifest::~Manifest() {
  sqlite3_close_v2(db_);
}

Status Manifest::exec(const char* sql, const char* what) {
  char* err = nullptr;
  if (sqlite3_exec(db_, sql, nullptr, nullptr, &err) != SQLITE_OK) {
    std::string msg = err != nullptr ? err : "unknown error";
    sqlite3_free(err);
    return make_error(ErrorCode::kStore, std::string("manifest: ") + what + ": " + msg);
  }
  return {};
}

Result<std::string> Manifest::setting(const std::string& key) {
  KMSD_ASSIGN_OR_RETURN(Stmt s, prepare(db_, "SELECT value FROM settings WHERE key = ?"));
  bind_text(s.get(), 1, key);
  if (sqlite3_step(s.get()) == SQLITE_ROW) return column(s.get(), 0);
  return make_error(ErrorCode::kNotFound, "manifest has no " + key);
}

Status Manifest::bind(const std::string& key, const std::string& value, const std::string& what) {
  auto have = setting(key);
  if (have.ok()) {
    if (*have != value)
      return make_error(ErrorCode::kFailedPrecondition,
                        "this staging directory belongs to " + what + " " + *have + ", not " +
                            value + "; use a new staging directory for a different one");
    return {};
  }
  KMSD_ASSIGN_OR_RETURN(Stmt s, prepare(db_, "INSERT INTO settings(key, value) VALUES(?, ?)"));
  bind_text(s.get(), 1, key);
  bind_text(s.get(), 2, value);
  if (sqlite3_step(s.get()) != SQLITE_DONE) return db_error(db_, "recording " + key);
  return {};
}

Result<std::map<std::string, std::pair<std::string, std::string>>> Manifest::recorded() {
  KMSD_ASSIGN_OR_RETURN(Stmt s, prepare(db_, "SELECT path, digest, status FROM messages"));
  std::map<std::string, std::pair<std::string, std::string>> out;
  int rc;
  while ((rc = sqlite3_step(s.get())) == SQLITE_ROW)
    out.emplace(column(s.get(), 0), std::make_pair(column(s.get(), 1), column(s.get(), 2)));
  if (rc != SQLITE_DONE) return db_error(db_, "reading the recorded messages");
  return out;
}

namespace {
// The message rows matching the SQL clauses AFTER (WHERE ..., ORDER BY ...).
Result<std::vector<ManifestRow>> select_rows(sqlite3* db, const std::string& after) {
  const std::string sql = "SELECT " + kRowColumns + " FROM messages " + after;
  KMSD_ASSIGN_OR_RETURN(Stmt s, prepare(db, sql.c_str()));
  std::vector<ManifestRow> out;
  int rc;
  while ((rc = sqlite3_step(s.get())) == SQLITE_ROW) out.push_back(read_row(s.get()));
  if (rc != SQLITE_DONE) return db_error(db, "reading the manifest");
  return out;
}
}  // namespace

Result<std::vector<ManifestRow>> Manifest::staged() {
  return select_rows(db_, "WHERE status = 'staged' ORDER BY path");
}

Result<std::vector<ManifestRow>> Manifest::rows() {
  return select_rows(db_, "ORDER BY path");
}

Status Manifest::record(const std::vector<ManifestRow>& rows) {
  if (rows.empty()) return {};
  KMSD_TRY(exec("BEGIN IMMEDIATE", "starting a transaction"));
  const std::string insert = "INSERT OR REPLACE INTO messages(" + kRowColumns +
                             ", recorded_at) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";
  auto st = prepare(db_, insert.c_str());
  if (!st.ok()) {
    (void)exec("ROLLBACK", "rolling back");
    return st.error();
  }
  // A message recorded again (new, changed since, or tried again) has no valid re-encrypted
  // copy: the next reencrypt must do it.
  auto forget = prepare(db_, "DELETE FROM reencrypted WHERE path = ?");
  if (!forget.ok()) {
    (void)exec("ROLLBACK", "rolling back");
    return forget.error();
  }
  const auto now = static_cast<sqlite3_int64>(std::time(nullptr));
  for (const auto& r : rows) {
    sqlite3_reset(forget->get());
    bind_text(forget->get(), 1, r.path);
    if (sqlite3_step(forget->get()) != SQLITE_DONE) {
      auto err = db_error(db_, "forgetting the old re-encryption of " + r.path);
      (void)exec("ROLLBACK", "rolling back");
      return err;
    }
    sqlite3_stmt* s = st->get();
    sqlite3_reset(s);
    bind_text(s, 1, r.path);
    bind_text(s, 2, r.format);
    bind_text(s, 3, r.digest);
    bind_text(s, 4, r.status);
    bind_text(s, 5, r.recipients);
    bind_text(s, 6, r.users);
    bind_text(s, 7, r.reason);
    bind_text(s, 8, r.copy.pack);
    sqlite3_bind_int64(s, 9, static_cast<sqlite3_int64>(r.copy.offset));
    sqlite3_bind_int64(s, 10, static_cast<sqlite3_int64>(r.copy.length));
    sqlite3_bind_int64(s, 11, static_cast<sqlite3_int64>(r.copy.header_length));
    sqlite3_bind_int(s, 12, r.copy.crlf ? 1 : 0);
    bind_text(s, 13, r.copy.sha256);
    sqlite3_bind_int64(s, 14, now);
    if (sqlite3_step(s) != SQLITE_DONE) {
      auto err = db_error(db_, "recording " + r.path);
      (void)exec("ROLLBACK", "rolling back");
      return err;
    }
  }
  return exec("COMMIT", "committing");
}

Result<std::map<std::string, ReencryptRow>> Manifest::reencrypted() {
  KMSD_ASSIGN_OR_RETURN(Stmt s, prepare(db_, "SELECT path, users, out_digest FROM reencrypted"));
  std::map<std::string, ReencryptRow> out;
  int rc;
  while ((rc = sqlite3_step(s.get())) == SQLITE_ROW) {
    ReencryptRow r{column(s.get(), 0), column(s.get(), 1), column(s.get(), 2)};
    out.emplace(r.path, std::move(r));
  }
  if (rc != SQLITE_DONE) return db_error(db_, "reading the re-encrypted messages");
  return out;
}

Status Manifest::record_reencrypted(const std::vector<ReencryptRow>& rows) {
  if (rows.empty()) return {};
  KMSD_TRY(exec("BEGIN IMMEDIATE", "starting a transaction"));
  auto st = prepare(db_,
                    "INSERT OR REPLACE INTO reencrypted(path, users, out_digest, recorded_at) "
                    "VALUES(?, ?, ?, ?)");
  if (!st.ok()) {
    (void)exec("ROLLBACK", "rolling back");
    return st.error();
  }
  const auto now = static_cast<sqlite3_int64>(std::time(nullptr));
  for (const auto& r : rows) {
    sqlite3_stmt* s = st->get();
    sqlite3_reset(s);
    bind_text(s, 1, r.path);
    bind_text(s, 2, r.users);
    bind_text(s, 3, r.out_digest);
    sqlite3_bind_int64(s, 4, now);
    if (sqlite3_step(s) != SQLITE_DONE) {
      auto err = db_error(db_, "recording " + r.path);
      (void)exec("ROLLBACK", "rolling back");
      return err;
    }
  }
  return exec("COMMIT", "committing");
}

Result<std::map<std::string, std::size_t>> Manifest::counts() {
  KMSD_ASSIGN_OR_RETURN(Stmt s,
                        prepare(db_, "SELECT status, COUNT(*) FROM messages GROUP BY status"));
  std::map<std::string, std::size_t> out;
  int rc;
  while ((rc = sqlite3_step(s.get())) == SQLITE_ROW)
    out[column(s.get(), 0)] = static_cast<std::size_t>(sqlite3_column_int64(s.get(), 1));
  if (rc != SQLITE_DONE) return db_error(db_, "counting");
  return out;
}

Result<std::size_t> Manifest::reencrypted_count() {
  KMSD_ASSIGN_OR_RETURN(Stmt s, prepare(db_, "SELECT COUNT(*) FROM reencrypted"));
  if (sqlite3_step(s.get()) != SQLITE_ROW) return db_error(db_, "counting");
  return static_cast<std::size_t>(sqlite3_column_int64(s.get(), 0));
}

Result<std::unique_ptr<ManifestReader>> ManifestReader::open(const std::filesystem::path& file) {
  sqlite3* raw = nullptr;
  int rc = sqlite3_open_v2(file.c_str(), &raw, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX, nullptr);
  std::unique_ptr<ManifestReader> r(new ManifestReader(raw));
  if (rc != SQLITE_OK) return db_error(raw, "cannot open " + file.string());
  sqlite3_busy_timeout(raw, 5000);
  // Point lookups and a forward page walk: a small cache is enough (the OS caches the file).
  if (sqlite3_exec(raw, "PRAGMA cache_size=-256", nullptr, nullptr, nullptr) != SQLITE_OK)
    return db_error(raw, "setting the cache size");
  if (sqlite3_prepare_v2(raw, "SELECT digest, status FROM messages WHERE path = ?", -1, &r->lookup_,
                         nullptr) != SQLITE_OK)
    return db_error(raw, "preparing the lookup");
  if (sqlite3_prepare_v2(raw,
                         "SELECT r.path IS NOT NULL, m.path, m.format, m.digest, m.status, "
                         "m.recipients, m.users, m.reason, m.pack, m.pack_offset, m.pack_length, "
                         "m.header_length, m.crlf, m.staged_sha256 FROM messages m LEFT JOIN "
                         "reencrypted r ON r.path = m.path WHERE m.status = 'staged' AND "
                         "m.path > ? ORDER BY m.path LIMIT ?",
                         -1, &r->page_, nullptr) != SQLITE_OK)
    return db_error(raw, "preparing the staged rows");
  return r;
}

ManifestReader::~ManifestReader() {
  sqlite3_finalize(lookup_);
  sqlite3_finalize(page_);
  sqlite3_close_v2(db_);
}

Result<std::optional<std::pair<std::string, std::string>>> ManifestReader::lookup(
    const std::string& path) {
  std::lock_guard lock(mu_);
  sqlite3_reset(lookup_);
  bind_text(lookup_, 1, path);
  const int rc = sqlite3_step(lookup_);
  std::optional<std::pair<std::string, std::string>> out;
  if (rc == SQLITE_ROW)
    out.emplace(column(lookup_, 0), column(lookup_, 1));
  else if (rc != SQLITE_DONE)
    return db_error(db_, "looking up " + path);
  sqlite3_reset(lookup_);
  return out;
}

Result<std::vector<ManifestReader::StagedRow>> ManifestReader::staged_after(
    const std::string& after, std::size_t limit) {
  std::lock_guard lock(mu_);
  sqlite3_reset(page_);
  bind_text(page_, 1, after);
  sqlite3_bind_int64(page_, 2, static_cast<sqlite3_int64>(limit));
  std::vector<StagedRow> out;
  int rc;
  while ((rc = sqlite3_step(page_)) == SQLITE_ROW) {
    StagedRow r;
    r.reencrypted = sqlite3_column_int(page_, 0) != 0;
    r.row = read_row(page_, 1);
    out.push_back(std::move(r));
  }
  sqlite3_reset(page_);
  if (rc != SQLITE_DONE) return db_error(db_, "reading the staged messages");
  return out;
}

}  // namespace kmsd::dr

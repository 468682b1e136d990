#include "daemon/backup/backup.hpp"

#include <fcntl.h>
#include <openssl/bio.h>
#include <openssl/cms.h>
#include <openssl/evp.h>
#include <openssl/x509.h>
#include <sqlite3.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <thread>

#include "common/clock.hpp"
#include "daemon/ca/issuer.hpp"
#include "daemon/enroll/enrollment.hpp"
#include "daemon/lifecycle/enrollment_token.hpp"
#include "daemon/provision/initializer.hpp"

namespace kmsd::backup {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// ---- SQLite handles ---------------------------------------------------------------------

struct DbClose {
  void operator()(sqlite3* db) const noexcept { sqlite3_close_v2(db); }
};
using Db = std::unique_ptr<sqlite3, DbClose>;
struct StmtFinalize {
  void operator()(sqlite3_stmt* st) const noexcept { sqlite3_finalize(st); }
};
using Stmt = std::unique_ptr<sqlite3_stmt, StmtFinalize>;
struct BackupFinish {
  void operator()(sqlite3_backup* b) const noexcept { sqlite3_backup_finish(b); }
};
using BackupHandle = std::unique_ptr<sqlite3_backup, BackupFinish>;
using CmsPtr = std::unique_ptr<CMS_ContentInfo, ossl::Deleter<CMS_ContentInfo_free>>;

Error sql_error(sqlite3* db, const std::string& what) {
  return make_error(ErrorCode::kStore,
                    what + ": " + (db != nullptr ? sqlite3_errmsg(db) : "out of memory"));
}

Result<Db> open_db(const fs::path& path, int flags, const std::string& what) {
  sqlite3* raw = nullptr;
  int rc = sqlite3_open_v2(path.c_str(), &raw, flags | SQLITE_OPEN_NOMUTEX, nullptr);
  Db db(raw);
  if (rc != SQLITE_OK) return sql_error(raw, what + " " + path.string());
  sqlite3_extended_result_codes(raw, 1);
  sqlite3_busy_timeout(raw, 5000);
  return db;
}

Status exec(sqlite3* db, const std::string& sql, const std::string& what) {
  if (sqlite3_exec(db, sql.c_str(), nullptr, nullptr, nullptr) != SQLITE_OK)
    return sql_error(db, what);
  return {};
}

Result<Stmt> prepare(sqlite3* db, const std::string& sql, const std::string& what) {
  sqlite3_stmt* raw = nullptr;
  if (sqlite3_prepare_v2(db, sql.c_str(), -1, &raw, nullptr) != SQLITE_OK)
    return sql_error(db, what);
  return Stmt(raw);
}

std::string column_text(sqlite3_stmt* st, int i) {
  const auto* p = sqlite3_column_text(st, i);
  return p == nullptr ? std::string() : std::string(reinterpret_cast<const char*>(p));
}

Result<std::int64_t> single_int(sqlite3* db, const std::string& sql, const std::string& what) {
  KMSD_ASSIGN_OR_RETURN(Stmt st, prepare(db, sql, what));
  if (sqlite3_step(st.get()) != SQLITE_ROW) return sql_error(db, what);
  return sqlite3_column_int64(st.get(), 0);
}

// Tables (not sqlite_*) and their row counts.
Result<std::map<std::string, std::int64_t>> row_counts(sqlite3* db) {
  const std::string what = "counting rows";
  std::vector<std::string> tables;
  {
    KMSD_ASSIGN_OR_RETURN(Stmt st, prepare(db,
                                           "SELECT name FROM sqlite_schema WHERE type = 'table' "
                                           "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' "
                                           "ORDER BY name",
                                           what));
    int rc;
    while ((rc = sqlite3_step(st.get())) == SQLITE_ROW) tables.push_back(column_text(st.get(), 0));
    if (rc != SQLITE_DONE) return sql_error(db, what);
  }
  std::map<std::string, std::int64_t> out;
  for (const auto& t : tables) {
    std::string quoted = "\"";
    for (char c : t) quoted += c == '"' ? std::string("\"\"") : std::string(1, c);
    quoted += "\"";
    KMSD_ASSIGN_OR_RETURN(out[t], single_int(db, "SELECT count(*) FROM " + quoted, what));
  }
  return out;
}

// ---- files ------------------------------------------------------------------------------

// Removes a path (and the SQLite side files of a database) when it goes out of scope.
class TempPath {
 public:
  TempPath() = default;
  explicit TempPath(fs::path p, bool dir = false) : p_(std::move(p)), dir_(dir) {}
  TempPath(const TempPath&) = delete;
  TempPath& operator=(const TempPath&) = delete;
  ~TempPath() {
    if (p_.empty()) return;
    std::error_code ec;
    if (dir_) {
      fs::remove_all(p_, ec);
      return;
    }
    for (const char* suffix : {"", "-journal", "-wal", "-shm"})
      fs::remove(fs::path(p_.string() + suffix), ec);
  }
  const fs::path& path() const { return p_; }
  void release() { p_.clear(); }

 private:
  fs::path p_;
  bool dir_ = false;
};

Error io_error(const std::string& what) {
  return make_error(ErrorCode::kIo, what + ": " + std::strerror(errno));
}

// A new empty file DIR/PREFIXXXXXXX with mode 0600.
Result<fs::path> make_temp_file(const fs::path& dir, const std::string& prefix) {
  std::string tmpl = (dir / (prefix + "XXXXXX")).string();
  int fd = ::mkstemp(tmpl.data());
  if (fd < 0) return io_error("creating a temporary file in " + dir.string());
  ::fchmod(fd, 0600);
  ::close(fd);
  return fs::path(tmpl);
}

Status fsync_path(const fs::path& p, bool directory) {
  int fd = ::open(p.c_str(), (directory ? O_RDONLY | O_DIRECTORY : O_RDWR) | O_CLOEXEC);
  if (fd < 0) return io_error("opening " + p.string() + " to sync it");
  int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) return io_error("syncing " + p.string());
  return {};
}

Status write_file(const fs::path& p, std::span<const std::uint8_t> data) {
  int fd = ::open(p.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return io_error("writing " + p.string());
  ::fchmod(fd, 0600);
  std::size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      Error e = io_error("writing " + p.string());
      ::close(fd);
      return e;
    }
    done += static_cast<std::size_t>(n);
  }
  if (::fsync(fd) != 0) {
    Error e = io_error("syncing " + p.string());
    ::close(fd);
    return e;
  }
  ::close(fd);
  return {};
}

Result<std::string> read_whole(const fs::path& p) {
  int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return io_error("reading " + p.string());
  std::string out;
  char buf[1 << 16];
  while (true) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      Error e = io_error("reading " + p.string());
      ::close(fd);
      return e;
    }
    if (n == 0) break;
    out.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fd);
  return out;
}

// ---- framing ----------------------------------------------------------------------------

void put_be(std::string& out, std::uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; --i) out += static_cast<char>((v >> (8 * i)) & 0xff);
}
std::uint64_t get_be(std::string_view in, std::size_t at, int bytes) {
  std::uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v = (v << 8) | static_cast<unsigned char>(in[at + i]);
  return v;
}

std::span<const std::uint8_t> bytes_of(std::string_view s) {
  return {reinterpret_cast<const std::uint8_t*>(s.data()), s.size()};
}

std::string range(std::uint64_t first, std::uint64_t last) {
  return "bytes " + std::to_string(first) + "-" + std::to_string(last);
}

struct Framed {
  std::string_view cms;
  std::string_view image;
  std::uint64_t cms_offset = 0;
  std::uint64_t image_offset = 0;
};

// The two parts of FILE, or a problem that says where the framing is wrong.
std::variant<Framed, std::string> unframe(std::string_view file) {
  if (file.size() < kMagic.size() + 4 || file.substr(0, kMagic.size()) != kMagic)
    return range(0, kMagic.size() - 1) +
           " of the file: not a kmsd backup (it must start with \"KMSDBAK1\")";
  const std::uint64_t n = get_be(file, 8, 4);
  if (n == 0) return range(8, 11) + ": the signed manifest's length is 0; this field was changed";
  const std::uint64_t after_cms = 12 + n;
  if (after_cms + 8 > file.size())
    return range(8, 11) + ": the signed manifest's length (" + std::to_string(n) +
           ") runs past the end of the file (" + std::to_string(file.size()) +
           " bytes); the file is truncated or this length field was changed";
  const std::uint64_t m = get_be(file, after_cms, 8);
  if (after_cms + 8 + m != file.size())
    return "the framing's lengths do not add up to the file's " + std::to_string(file.size()) +
           " bytes: signed manifest " + std::to_string(n) + " bytes (length at " + range(8, 11) +
           "), database image " + std::to_string(m) + " bytes (length at " +
           range(after_cms, after_cms + 7) +
           "); one of these length fields was changed, or the file was truncated or extended";
  if (m == 0)
    return range(after_cms, after_cms + 7) +
           ": the database image's length is 0; this field was changed";
  Framed f;
  f.cms_offset = 12;
  f.cms = file.substr(12, n);
  f.image_offset = after_cms + 8;
  f.image = file.substr(after_cms + 8);
  return f;
}

// ---- snapshot ---------------------------------------------------------------------------

struct Snapshot {
  std::string image;
  std::int64_t page_size = 0;
  std::int64_t page_count = 0;
  std::int64_t schema_version = 0;
  std::map<std::string, std::int64_t> tables;
  json page_owners = json::array();  // [[first, last, "name"], ...]
};

Result<Snapshot> take_snapshot(const fs::path& db_path) {
  fs::path dir = db_path.parent_path();
  if (dir.empty()) dir = ".";
  KMSD_ASSIGN_OR_RETURN(fs::path tmp_path, make_temp_file(dir, ".kmsd-backup-"));
  TempPath tmp(tmp_path);
  const std::string what = "taking a snapshot of " + db_path.string();

  KMSD_ASSIGN_OR_RETURN(Db src, open_db(db_path, SQLITE_OPEN_READONLY, what));
  // One read transaction for the whole copy: WAL gives it a fixed snapshot while the daemon's
  // own connection keeps writing (readers never block the writer), so the copy never restarts.
  KMSD_TRY(exec(src.get(), "BEGIN", what));
  KMSD_TRY(single_int(src.get(), "SELECT count(*) FROM sqlite_schema", what));
  KMSD_ASSIGN_OR_RETURN(Db dst,
                        open_db(tmp.path(), SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, what));
  {
    BackupHandle b(sqlite3_backup_init(dst.get(), "main", src.get(), "main"));
    if (!b) return sql_error(dst.get(), what);
    int busy = 0;
    while (true) {
      int rc = sqlite3_backup_step(b.get(), kPagesPerStep);
      if (rc == SQLITE_DONE) break;
      if (rc == SQLITE_OK) continue;
      if ((rc & 0xff) == SQLITE_BUSY || (rc & 0xff) == SQLITE_LOCKED) {
        if (++busy > 1000) return sql_error(dst.get(), what + " (the database stayed locked)");
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
        continue;
      }
      return make_error(ErrorCode::kStore, what + ": " + sqlite3_errstr(rc));
    }
    int rc = sqlite3_backup_finish(b.release());
    if (rc != SQLITE_OK) return make_error(ErrorCode::kStore, what + ": " + sqlite3_errstr(rc));
  }
  KMSD_TRY(exec(src.get(), "COMMIT", what));
  src.reset();

  // The copy carries the live file's WAL flag: make it one self-contained file.
  {
    KMSD_ASSIGN_OR_RETURN(Stmt st, prepare(dst.get(), "PRAGMA journal_mode=DELETE", what));
    if (sqlite3_step(st.get()) != SQLITE_ROW || column_text(st.get(), 0) != "delete")
      return sql_error(dst.get(), what + " (could not leave WAL mode)");
  }
  Snapshot s;
  KMSD_ASSIGN_OR_RETURN(s.page_size, single_int(dst.get(), "PRAGMA page_size", what));
  KMSD_ASSIGN_OR_RETURN(s.page_count, single_int(dst.get(), "PRAGMA page_count", what));
  KMSD_ASSIGN_OR_RETURN(s.schema_version,
                        single_int(dst.get(), "SELECT version FROM schema_version", what));
  KMSD_ASSIGN_OR_RETURN(s.tables, row_counts(dst.get()));
  {
    // Which table or index owns each page (dbstat), as runs; pages no b-tree owns are free.
    std::vector<std::string> owner(static_cast<std::size_t>(s.page_count) + 1, "(free page)");
    KMSD_ASSIGN_OR_RETURN(Stmt st, prepare(dst.get(), "SELECT name, pageno FROM dbstat", what));
    int rc;
    while ((rc = sqlite3_step(st.get())) == SQLITE_ROW) {
      auto page = sqlite3_column_int64(st.get(), 1);
      if (page >= 1 && page <= s.page_count)
        owner[static_cast<std::size_t>(page)] = column_text(st.get(), 0);
    }
    if (rc != SQLITE_DONE) return sql_error(dst.get(), what + " (dbstat)");
    for (std::int64_t p = 1; p <= s.page_count; ++p) {
      const auto& name = owner[static_cast<std::size_t>(p)];
      if (!s.page_owners.empty() && s.page_owners.back()[2] == name &&
          s.page_owners.back()[1].get<std::int64_t>() == p - 1) {
        s.page_owners.back()[1] = p;
      } else {
        s.page_owners.push_back(json::array({p, p, name}));
      }
    }
  }
  if (sqlite3_close(dst.release()) != SQLITE_OK)
    return make_error(ErrorCode::kStore, what + ": could not close the copy");
  KMSD_ASSIGN_OR_RETURN(s.image, read_whole(tmp.path()));
  if (static_cast<std::int64_t>(s.image.size()) != s.page_size * s.page_count)
    return make_error(ErrorCode::kStore, what + ": the copy has " + std::to_string(s.image.size()) +
                                             " bytes, expected " +
                                             std::to_string(s.page_size * s.page_count));
  return s;
}

std::string page_digest(std::string_view image, std::int64_t page_size, std::int64_t page) {
  const auto at = static_cast<std::size_t>((page - 1) * page_size);
  return ossl::hex(ossl::sha256(bytes_of(image.substr(at, static_cast<std::size_t>(page_size)))));
}

// ---- CMS --------------------------------------------------------------------------------

Result<std::string> sign_manifest(const std::string& manifest, hsm::Token& token, X509* ca_cert) {
  for (int attempt = 0; attempt < 2; ++attempt) {
    KMSD_ASSIGN_OR_RETURN(auto key, token.ca_private_key());
    ossl::BioPtr in(BIO_new_mem_buf(manifest.data(), static_cast<int>(manifest.size())));
    if (!in) return ossl::crypto_error("signing the backup manifest");
    CmsPtr cms(CMS_sign(ca_cert, key.get(), nullptr, in.get(), CMS_BINARY));
    if (!cms) {
      // A key fetched before a token recovery fails cleanly: fetch again once.
      if (attempt == 0) {
        (void)ossl::drain_errors();
        continue;
      }
      return ossl::crypto_error("signing the backup manifest on the token");
    }
    ossl::BioPtr out(BIO_new(BIO_s_mem()));
    if (!out || i2d_CMS_bio(out.get(), cms.get()) != 1)
      return ossl::crypto_error("encoding the signed backup manifest");
    char* p = nullptr;
    long n = BIO_get_mem_data(out.get(), &p);
    return std::string(p, static_cast<std::size_t>(n));
  }
  return ossl::crypto_error("signing the backup manifest on the token");
}

// The manifest signed in CMS_DER, provided the signature verifies and the signer is the
// token's CA key; else a problem sentence.
std::variant<json, std::string> open_manifest(std::string_view cms_der, std::uint64_t offset,
                                              EVP_PKEY* token_ca_key) {
  const std::string where = range(offset, offset + cms_der.size() - 1) + " (the signed manifest)";
  ossl::BioPtr in(BIO_new_mem_buf(cms_der.data(), static_cast<int>(cms_der.size())));
  CmsPtr cms(in ? d2i_CMS_bio(in.get(), nullptr) : nullptr);
  if (!cms) {
    (void)ossl::drain_errors();
    return where +
           ": not a readable CMS SignedData structure; the manifest or its signature "
           "was changed or truncated";
  }
  ossl::BioPtr out(BIO_new(BIO_s_mem()));
  // The signature is checked with the certificate inside; the trust anchor is the token's CA
  // key, compared below (no chain to build: the CA certificate is self-signed or external).
  if (!out || CMS_verify(cms.get(), nullptr, nullptr, nullptr, out.get(),
                         CMS_BINARY | CMS_NO_SIGNER_CERT_VERIFY) != 1) {
    std::string why = ossl::drain_errors();
    return where + ": the signature does not verify (" + why +
           "); the manifest or its signature was changed";
  }
  STACK_OF(X509)* signers = CMS_get0_signers(cms.get());
  const int count = signers != nullptr ? sk_X509_num(signers) : 0;
  bool by_token = count > 0;
  std::string who;
  for (int i = 0; i < count; ++i) {
    X509* s = sk_X509_value(signers, i);
    if (EVP_PKEY_eq(X509_get0_pubkey(s), token_ca_key) != 1) {
      by_token = false;
      char* name = X509_NAME_oneline(X509_get_subject_name(s), nullptr, 0);
      who = name != nullptr ? name : "?";
      OPENSSL_free(name);
    }
  }
  sk_X509_free(signers);
  if (!by_token)
    return where + ": signed by " + (who.empty() ? std::string("nobody") : who) +
           ", not by this token's CA key; this backup belongs to another KMS (or the token is "
           "not the one the backup was made with)";
  char* p = nullptr;
  long n = BIO_get_mem_data(out.get(), &p);
  json j = json::parse(std::string_view(p, static_cast<std::size_t>(n)), nullptr, false);
  if (!j.is_object() || j.value("format", 0) != kFormatVersion || !j.contains("image_sha256") ||
      !j.contains("page_sha256") || !j["page_sha256"].is_array() || !j.contains("page_size") ||
      !j["page_size"].is_number_integer() || !j.contains("tables") || !j["tables"].is_object())
    return where + ": the signed manifest is not a format-" + std::to_string(kFormatVersion) +
           " kmsd backup manifest";
  return j;
}

std::string owner_of_page(const json& manifest, std::int64_t page) {
  if (!manifest.contains("page_owners") || !manifest["page_owners"].is_array()) return "";
  for (const auto& run : manifest["page_owners"]) {
    if (!run.is_array() || run.size() != 3) continue;
    if (run[0].get<std::int64_t>() <= page && page <= run[1].get<std::int64_t>())
      return run[2].get<std::string>();
  }
  return "";
}

// The signature and the image, in REP; the image when both are intact.
Result<std::optional<std::string_view>> verify_outer(std::string_view file, hsm::Token& token,
                                                     CheckReport& rep) {
  auto framed = unframe(file);
  if (auto* problem = std::get_if<std::string>(&framed)) {
    rep.problems.push_back(*problem);
    return std::optional<std::string_view>();
  }
  const Framed& f = std::get<Framed>(framed);
  KMSD_ASSIGN_OR_RETURN(auto ca_key, token.ca_public_key());
  auto opened = open_manifest(f.cms, f.cms_offset, ca_key.get());
  if (auto* problem = std::get_if<std::string>(&opened)) {
    rep.problems.push_back(*problem);
    return std::optional<std::string_view>();
  }
  rep.manifest = std::move(std::get<json>(opened));
  rep.signature_ok = true;
  const json& m = rep.manifest;

  const auto page_size = m["page_size"].get<std::int64_t>();
  const auto& pages = m["page_sha256"];
  const std::string where_image =
      range(f.image_offset, f.image_offset + f.image.size() - 1) + " (the database image)";
  if (page_size <= 0 || static_cast<std::uint64_t>(page_size) * pages.size() != f.image.size() ||
      m.value("image_size", std::uint64_t{0}) != f.image.size()) {
    rep.problems.push_back(where_image + ": " + std::to_string(f.image.size()) +
                           " bytes, but the signed manifest says " +
                           std::to_string(m.value("image_size", std::uint64_t{0})) +
                           "; the image was truncated or extended");
    return std::optional<std::string_view>();
  }
  if (ossl::hex(ossl::sha256(bytes_of(f.image))) == m["image_sha256"].get<std::string>()) {
    rep.image_ok = true;
    return std::optional<std::string_view>(f.image);
  }
  std::size_t bad = 0;
  for (std::size_t i = 0; i < pages.size(); ++i) {
    const auto page = static_cast<std::int64_t>(i + 1);
    if (page_digest(f.image, page_size, page) == pages[i].get<std::string>()) continue;
    if (++bad > 10) continue;
    const std::uint64_t first = f.image_offset + i * static_cast<std::uint64_t>(page_size);
    std::string owner = owner_of_page(m, page);
    rep.problems.push_back(
        range(first, first + static_cast<std::uint64_t>(page_size) - 1) +
        " of the file: SQLite page " + std::to_string(page) +
        (owner.empty() ? std::string() : " (" + owner + ")") +
        " differs from the signed manifest (its SHA-256 does not match); the database image "
        "was changed after the backup was made");
  }
  if (bad > 10)
    rep.problems.push_back("... and " + std::to_string(bad - 10) + " more changed pages");
  if (bad == 0)
    rep.problems.push_back(where_image +
                           ": its SHA-256 differs from the signed manifest's although every page "
                           "matches; the manifest is inconsistent");
  return std::optional<std::string_view>();
}

// The checks on an opened copy of an intact image.
Status check_contents(store::Store& store, hsm::Token& token, CheckReport& rep) {
  const json& m = rep.manifest;
  KMSD_ASSIGN_OR_RETURN(auto token_ca, token.ca_public_key());
  auto ca = provision::load_ca_certificate(store);
  if (!ca.ok()) {
    rep.problems.push_back("the CA certificate in the image: " + ca.error().message);
  } else {
    if (EVP_PKEY_eq(X509_get0_pubkey(ca->get()), token_ca.get()) != 1)
      rep.problems.push_back(
          "the CA certificate in the image does not belong to this token's CA key");
    if (ossl::sha256_fingerprint(ca->get()) != m.value("ca_sha256", std::string()))
      rep.problems.push_back(
          "the CA certificate in the image is not the one the signed manifest names");
  }

  std::vector<std::string> users;
  KMSD_TRY(store.for_each_user("", std::numeric_limits<std::size_t>::max(),
                               [&](const store::UserRecord& u) {
                                 users.push_back(u.id);
                                 return Status{};
                               }));
  rep.users = users.size();
  lifecycle::EnrollmentTokens tokens(token);
  auto fatal = [](const Error& e) {
    return e.code == ErrorCode::kUnavailable || e.code == ErrorCode::kPinLocked ||
           e.code == ErrorCode::kUnauthenticated;
  };
  for (const auto& id : users) {
    KMSD_ASSIGN_OR_RETURN(auto history, store.key_history(id));
    for (const auto& rec : history) {
      const std::string where = "key_history row of user " + id + " version " +
                                std::to_string(rec.version) + " (key id " + rec.key_id + ")";
      // The enrollment module's own opener (AAD per envelope format, master version checked).
      auto der = enroll::open_escrowed(token, rec);
      if (!der.ok()) {
        if (fatal(der.error())) return der.error();
        rep.problems.push_back(where + ": the sealed key does not open on this token (" +
                               der.error().message + ")");
        continue;
      }
      const unsigned char* p = der->data();
      ossl::EvpPkeyPtr key(d2i_AutoPrivateKey(nullptr, &p, static_cast<long>(der->size())));
      if (!key) {
        (void)ossl::drain_errors();
        rep.problems.push_back(where + ": the opened key is not a PKCS#8 private key");
        continue;
      }
      bool matched = false;
      if (rec.cert_serial) {
        KMSD_ASSIGN_OR_RETURN(auto cert, store.find_certificate(*rec.cert_serial));
        if (cert) {
          auto x = ossl::x509_from_der(cert->der);
          matched = x.ok() && ca::public_key_matches(x->get(), key.get());
        }
        if (!matched)
          rep.problems.push_back(where + ": the key does not match its encryption certificate " +
                                 *rec.cert_serial);
      } else {
        KMSD_ASSIGN_OR_RETURN(auto certs, store.certificates_of_user(id));
        for (const auto& c : certs) {
          if (c.kind != store::CertKind::kEncryption) continue;
          auto x = ossl::x509_from_der(c.der);
          if (x.ok() && ca::public_key_matches(x->get(), key.get())) matched = true;
        }
        if (!matched)
          rep.problems.push_back(where + ": no encryption certificate of the user matches it");
      }
      if (matched) ++rep.keys_opened;
    }
    KMSD_ASSIGN_OR_RETURN(auto tok, store.find_enrollment_token(id));
    if (tok) {
      lifecycle::SealedToken sealed{
          tok->sealed, std::chrono::sys_seconds(std::chrono::seconds(tok->expires_at))};
      auto text = tokens.reveal(sealed, id);
      if (!text.ok()) {
        if (fatal(text.error())) return text.error();
        rep.problems.push_back("enrollment_tokens row of user " + id +
                               ": the sealed token does not open on this token (" +
                               text.error().message + ")");
      } else {
        ++rep.tokens_opened;
      }
    }
  }
  for (auto kind : {store::CertKind::kCa, store::CertKind::kAdmin, store::CertKind::kServer,
                    store::CertKind::kSigning, store::CertKind::kEncryption}) {
    KMSD_ASSIGN_OR_RETURN(auto certs, store.certificates(kind));
    rep.certificates += certs.size();
  }
  audit::AuditLog log(store, token);
  KMSD_ASSIGN_OR_RETURN(auto v, log.verify());
  rep.audit_records = v.records;
  if (!v.ok())
    rep.problems.push_back(
        "audit chain" +
        (v.first_bad ? " at record " + std::to_string(*v.first_bad) : std::string()) + ": " +
        v.problem);
  return {};
}

// Row counts of the copy at PATH against the manifest.
Status check_row_counts(const fs::path& path, CheckReport& rep) {
  KMSD_ASSIGN_OR_RETURN(Db db, open_db(path, SQLITE_OPEN_READONLY, "opening the image copy"));
  KMSD_ASSIGN_OR_RETURN(auto counts, row_counts(db.get()));
  const json& want = rep.manifest["tables"];
  for (const auto& [name, n] : counts) {
    if (!want.contains(name)) {
      rep.problems.push_back("table " + name + " is in the image but not in the signed manifest");
    } else if (want[name] != n) {
      rep.problems.push_back("table " + name + " has " + std::to_string(n) +
                             " rows, the signed manifest says " + want[name].dump());
    }
  }
  for (const auto& [name, n] : want.items())
    if (!counts.contains(name))
      rep.problems.push_back("table " + name + " of the signed manifest is missing");
  return {};
}

}  // namespace

json CheckReport::to_json() const {
  json j{{"ok", ok()},
         {"signature_ok", signature_ok},
         {"image_ok", image_ok},
         {"problems", problems},
         {"users", users},
         {"certificates", certificates},
         {"keys_opened", keys_opened},
         {"tokens_opened", tokens_opened},
         {"audit_records", audit_records}};
  if (signature_ok) {
    j["created_at"] = manifest.value("created_at", std::int64_t{0});
    j["image_sha256"] = manifest.value("image_sha256", std::string());
    j["schema_version"] = manifest.value("schema_version", 0);
  }
  return j;
}

Result<Created> create(store::Store& store, hsm::Token& token, X509* ca_cert) {
  if (ca_cert == nullptr)
    return make_error(ErrorCode::kFailedPrecondition,
                      "kmsd is sealed (no CA certificate in use); unseal it, then back up");
  const auto t0 = std::chrono::steady_clock::now();
  KMSD_ASSIGN_OR_RETURN(Snapshot s, take_snapshot(store.path()));
  json pages = json::array();
  for (std::int64_t p = 1; p <= s.page_count; ++p)
    pages.push_back(page_digest(s.image, s.page_size, p));
  json tables = json::object();
  for (const auto& [name, n] : s.tables) tables[name] = n;
  json manifest{{"format", kFormatVersion},
                {"created_at", unix_now()},
                {"schema_version", s.schema_version},
                {"ca_sha256", ossl::sha256_fingerprint(ca_cert)},
                {"page_size", s.page_size},
                {"page_count", s.page_count},
                {"image_size", s.image.size()},
                {"image_sha256", ossl::hex(ossl::sha256(bytes_of(s.image)))},
                {"tables", tables},
                {"page_owners", s.page_owners},
                {"page_sha256", pages}};
  KMSD_ASSIGN_OR_RETURN(std::string cms, sign_manifest(manifest.dump(), token, ca_cert));
  Created out;
  out.file.reserve(kMagic.size() + 12 + cms.size() + s.image.size());
  out.file.append(kMagic);
  put_be(out.file, cms.size(), 4);
  out.file += cms;
  put_be(out.file, s.image.size(), 8);
  out.file += s.image;
  out.manifest = std::move(manifest);
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return out;
}

Result<json> read_manifest_unverified(std::string_view file) {
  auto framed = unframe(file);
  if (auto* problem = std::get_if<std::string>(&framed))
    return make_error(ErrorCode::kInvalidArgument, *problem);
  const auto& cms_der = std::get<Framed>(framed).cms;
  ossl::BioPtr in(BIO_new_mem_buf(cms_der.data(), static_cast<int>(cms_der.size())));
  CmsPtr cms(in ? d2i_CMS_bio(in.get(), nullptr) : nullptr);
  if (!cms) return ossl::crypto_error("reading the backup manifest");
  ASN1_OCTET_STRING** content = CMS_get0_content(cms.get());
  if (content == nullptr || *content == nullptr)
    return make_error(ErrorCode::kInvalidArgument, "the backup manifest has no content");
  json j = json::parse(std::string_view(reinterpret_cast<const char*>((*content)->data),
                                        static_cast<std::size_t>((*content)->length)),
                       nullptr, false);
  if (!j.is_object())
    return make_error(ErrorCode::kInvalidArgument, "the backup manifest is not JSON");
  return j;
}

Result<CheckReport> check(std::string_view file, hsm::Token& token, const fs::path& work_dir) {
  CheckReport rep;
  KMSD_ASSIGN_OR_RETURN(auto image, verify_outer(file, token, rep));
  if (!image) return rep;
  std::string tmpl = (work_dir / "kmsd-backup-check-XXXXXX").string();
  if (::mkdtemp(tmpl.data()) == nullptr)
    return io_error("creating a private directory in " + work_dir.string());
  TempPath dir(tmpl, true);
  const fs::path copy = dir.path() / "kmsd.db";
  KMSD_TRY(write_file(copy, bytes_of(*image)));
  KMSD_TRY(check_row_counts(copy, rep));
  KMSD_ASSIGN_OR_RETURN(auto store, store::Store::open(copy));
  KMSD_TRY(check_contents(*store, token, rep));
  return rep;
}

Result<bool> store_is_empty(const fs::path& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) return true;
  KMSD_ASSIGN_OR_RETURN(Db db, open_db(path, SQLITE_OPEN_READONLY, "opening the store"));
  for (const char* table : {"users", "certificates"}) {
    auto has = single_int(db.get(),
                          std::string("SELECT count(*) FROM sqlite_schema WHERE type = 'table' "
                                      "AND name = '") +
                              table + "'",
                          "reading " + path.string());
    if (!has.ok())
      return make_error(ErrorCode::kFailedPrecondition,
                        path.string() + " is not a SQLite database (" + has.error().message +
                            "); move it aside or fix [store] path");
    if (*has == 0) continue;
    KMSD_ASSIGN_OR_RETURN(auto n, single_int(db.get(), std::string("SELECT count(*) FROM ") + table,
                                             "reading " + path.string()));
    if (n > 0) return false;
  }
  return true;
}

Result<Restored> restore(std::string_view file, hsm::Token& token, const fs::path& store_path,
                         const std::string& actor) {
  KMSD_ASSIGN_OR_RETURN(bool empty, store_is_empty(store_path));
  if (!empty)
    return make_error(ErrorCode::kAlreadyExists,
                      "the store " + store_path.string() +
                          " holds users or certificates; a backup is restored only into an empty "
                          "store. Nothing was changed. Stop kmsd, move that database (and its "
                          "-wal and -shm files) aside, then restore again");
  Restored out;
  KMSD_ASSIGN_OR_RETURN(auto image, verify_outer(file, token, out.report));
  if (!image) return out;
  fs::path dir = store_path.parent_path();
  if (dir.empty()) dir = ".";
  KMSD_ASSIGN_OR_RETURN(fs::path tmp_path,
                        make_temp_file(dir, "." + store_path.filename().string() + ".restore-"));
  TempPath tmp(tmp_path);
  KMSD_TRY(write_file(tmp.path(), bytes_of(*image)));
  KMSD_TRY(check_row_counts(tmp.path(), out.report));
  {
    KMSD_ASSIGN_OR_RETURN(auto store, store::Store::open(tmp.path()));
    KMSD_TRY(check_contents(*store, token, out.report));
    if (!out.report.ok()) return out;
    audit::AuditLog log(*store, token);
    const json& m = out.report.manifest;
    KMSD_TRY(store->transaction([&]() -> Status {
      return log.append(actor, "backup.restore",
                        {{"image_sha256", m.value("image_sha256", std::string())},
                         {"backup_created_at", m.value("created_at", std::int64_t{0})},
                         {"users", out.report.users},
                         {"keys_opened", out.report.keys_opened},
                         {"tokens_opened", out.report.tokens_opened},
                         {"audit_records", out.report.audit_records}});
    }));
  }
  // Back to one self-contained file (the WAL checkpointed into it), then into place.
  {
    KMSD_ASSIGN_OR_RETURN(Db db, open_db(tmp.path(), SQLITE_OPEN_READWRITE, "finishing the copy"));
    KMSD_TRY(exec(db.get(), "PRAGMA journal_mode=DELETE", "finishing the copy"));
    if (sqlite3_close(db.release()) != SQLITE_OK)
      return make_error(ErrorCode::kStore, "finishing the copy: could not close it");
  }
  KMSD_TRY(fsync_path(tmp.path(), false));
  std::error_code ec;
  for (const char* suffix : {"-wal", "-shm", "-journal"}) {
    fs::path side(store_path.string() + suffix);
    if (fs::exists(side, ec) && !fs::remove(side, ec))
      return make_error(ErrorCode::kIo,
                        "removing the stale " + side.string() + ": " + ec.message());
  }
  if (::rename(tmp.path().c_str(), store_path.c_str()) != 0)
    return io_error("renaming the restored database to " + store_path.string());
  tmp.release();
  KMSD_TRY(fsync_path(dir, true));
  out.restored = true;
  return out;
}

Result<Created> BackupService::create(const std::string& actor) {
  auto ca = ca_certificate_();
  KMSD_ASSIGN_OR_RETURN(Created c, backup::create(store_, token_, ca.get()));
  KMSD_TRY(store_.transaction([&]() -> Status {
    return audit_.append(actor, "backup.create",
                         {{"image_sha256", c.manifest["image_sha256"]},
                          {"image_size", c.manifest["image_size"]},
                          {"schema_version", c.manifest["schema_version"]},
                          {"tables", c.manifest["tables"]},
                          {"bytes", c.file.size()}});
  }));
  return c;
}

Result<CheckReport> BackupService::check(std::string_view file, const std::string& actor) {
  fs::path dir = store_.path().parent_path();
  if (dir.empty()) dir = ".";
  KMSD_ASSIGN_OR_RETURN(CheckReport rep, backup::check(file, token_, dir));
  json details{{"ok", rep.ok()}, {"bytes", file.size()}, {"problems", rep.problems.size()}};
  if (rep.signature_ok) details["image_sha256"] = rep.manifest.value("image_sha256", "");
  if (!rep.problems.empty()) details["first_problem"] = rep.problems.front();
  KMSD_TRY(store_.transaction(
      [&]() -> Status { return audit_.append(actor, "backup.check", details); }));
  return rep;
}

}  // namespace kmsd::backup

#include "daemon/store/store.hpp"

#include <sqlite3.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "tests/support/sandbox.hpp"

namespace kmsd::store {
namespace {

namespace fs = std::filesystem;

// A second, independent SQLite connection for looking at (or tampering with) the file.
class RawDb {
 public:
  explicit RawDb(const fs::path& path) {
    sqlite3* raw = nullptr;
    int rc =
        sqlite3_open_v2(path.c_str(), &raw, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, nullptr);
    db_.reset(raw);
    if (rc != SQLITE_OK) throw std::runtime_error("cannot open " + path.string());
    sqlite3_busy_timeout(raw, 5000);
  }
  void exec(const std::string& sql) {
    char* err = nullptr;
    if (sqlite3_exec(db_.get(), sql.c_str(), nullptr, nullptr, &err) != SQLITE_OK) {
      std::string msg = err != nullptr ? err : "?";
      sqlite3_free(err);
      throw std::runtime_error(sql + ": " + msg);
    }
  }
  // First column of the first row, as text ("" when there is no row or it is NULL).
  std::string query(const std::string& sql) {
    sqlite3_stmt* raw = nullptr;
    if (sqlite3_prepare_v2(db_.get(), sql.c_str(), -1, &raw, nullptr) != SQLITE_OK)
      throw std::runtime_error(sql + ": " + sqlite3_errmsg(db_.get()));
    std::unique_ptr<sqlite3_stmt, decltype(&sqlite3_finalize)> st(raw, &sqlite3_finalize);
    int rc = sqlite3_step(st.get());
    if (rc == SQLITE_DONE) return "";
    if (rc != SQLITE_ROW) throw std::runtime_error(sql + ": " + sqlite3_errmsg(db_.get()));
    const auto* text = sqlite3_column_text(st.get(), 0);
    return text != nullptr ? reinterpret_cast<const char*>(text) : "";
  }

 private:
  struct Closer {
    void operator()(sqlite3* db) const { sqlite3_close_v2(db); }
  };
  std::unique_ptr<sqlite3, Closer> db_;
};

std::string read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

CertificateRecord cert(const std::string& serial, CertKind kind, std::int64_t issued_at = 1000) {
  CertificateRecord rec;
  rec.serial = serial;
  rec.kind = kind;
  rec.subject = "CN=" + serial + ",O=Example";
  rec.not_before = 1'700'000'000;
  rec.not_after = 1'800'000'000;
  rec.der = {0x30, 0x82, 0x01, 0x00, static_cast<std::uint8_t>(serial.size())};
  rec.issued_at = issued_at;
  return rec;
}

AdminRecord admin(const std::string& name, const std::string& serial,
                  AdminRole role = AdminRole::kAdmin) {
  AdminRecord rec;
  rec.name = name;
  rec.role = role;
  rec.cert_serial = serial;
  rec.created_at = 2000;
  return rec;
}

// The schema exactly as version 1 of kmsd wrote it (migration 1 and the schema_version
// table), kept here so the migration test starts from a real v1 file even after the store's
// own migrations move on.
constexpr const char* kV1Schema = R"sql(
CREATE TABLE schema_version (
  id         INTEGER PRIMARY KEY CHECK (id = 1),  -- exactly one row
  version    INTEGER NOT NULL,
  applied_at INTEGER NOT NULL
);
INSERT INTO schema_version (id, version, applied_at) VALUES (1, 1, 1600000000);
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
)sql";

UserRecord user(const std::string& id, UserState state = UserState::kEnabled) {
  UserRecord rec;
  rec.id = id;
  rec.email = id + "@example.org";
  rec.display_name = "User " + id;
  rec.state = state;
  rec.created_at = 5000;
  rec.updated_at = 5000;
  return rec;
}

EnrollmentTokenRecord token(const std::string& user_id, std::uint8_t fill = 0x11) {
  EnrollmentTokenRecord rec;
  rec.user_id = user_id;
  rec.purpose = TokenPurpose::kEnroll;
  rec.sealed = Bytes(48, fill);
  rec.issued_at = 6000;
  rec.issued_by = "alice";
  rec.expires_at = 6000 + 7 * 86400;
  return rec;
}

KeyHistoryRecord key(const std::string& user_id, int version, const std::string& key_id) {
  KeyHistoryRecord rec;
  rec.user_id = user_id;
  rec.version = version;
  rec.key_id = key_id;
  rec.algorithm = "ec-p256";
  rec.master_version = 1;
  rec.sealed_key = Bytes(64, static_cast<std::uint8_t>(version));
  rec.created_at = 7000 + version;
  return rec;
}

ApprovalRequestRecord request(const std::string& id, std::int64_t created_at = 8000) {
  ApprovalRequestRecord rec;
  rec.id = id;
  rec.operation = "revoke";
  rec.params = R"({"user":"u1"})";
  rec.requested_by = "alice";
  rec.required = 2;
  rec.created_at = created_at;
  rec.expires_at = created_at + 86400;
  return rec;
}

AuditRecord audit(std::int64_t seq) {
  AuditRecord rec;
  rec.seq = seq;
  rec.at = 9000 + seq;
  rec.actor = "alice";
  rec.action = "user.enable";
  rec.record = R"({"seq":)" + std::to_string(seq) + "}";
  rec.prev_hash = Bytes(32, static_cast<std::uint8_t>(seq - 1));
  rec.hash = Bytes(32, static_cast<std::uint8_t>(seq));
  rec.mac = Bytes(32, static_cast<std::uint8_t>(0x80 + seq));
  return rec;
}

// The message of the exception FN throws ("" if it does not throw).
template <typename Fn>
std::string thrown(Fn&& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

class StoreTest : public ::testing::Test {
 protected:
  fs::path db_path() const { return tmp_.path() / "kmsd.db"; }

  std::unique_ptr<Store> open_store() {
    auto r = Store::open(db_path());
    if (!r.ok()) {
      ADD_FAILURE() << "open failed: " << r.error().message;
      return nullptr;
    }
    return std::move(r).value();
  }

  std::size_t count_certs(Store& s, CertKind kind) {
    auto r = s.certificates(kind);
    EXPECT_TRUE(r.ok()) << (r.ok() ? "" : r.error().message);
    return r.ok() ? r->size() : 0;
  }

  kmsd::testing::TempDir tmp_;
};

TEST_F(StoreTest, FreshDatabaseIsAtCurrentSchemaVersionInWalModeWithForeignKeysOn) {
  auto s = open_store();
  ASSERT_TRUE(s);
  EXPECT_EQ(s->schema_version(), Store::kSchemaVersion);

  RawDb raw(db_path());
  EXPECT_EQ(raw.query("PRAGMA journal_mode"), "wal");
  EXPECT_EQ(raw.query("SELECT version FROM schema_version"), std::to_string(Store::kSchemaVersion));
  EXPECT_EQ(raw.query("SELECT count(*) FROM schema_version"), "1");
  EXPECT_NE(raw.query("SELECT applied_at FROM schema_version"), "");
  for (const char* table :
       {"settings", "certificates", "administrators", "users", "enrollment_tokens", "key_history",
        "approval_requests", "approvals", "audit_log"}) {
    EXPECT_EQ(raw.query(std::string("SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND "
                                    "name = '") +
                        table + "'"),
              "1")
        << table;
  }
  // foreign_keys is a per-connection setting: show the store's connection enforces it.
  auto st = s->insert_admin(admin("alice", "ffff"));
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.error().code, ErrorCode::kNotFound);
}

TEST_F(StoreTest, NewDatabaseFileHasMode0600WhateverTheUmask) {
  mode_t old = ::umask(0);
  auto s = open_store();
  ::umask(old);
  ASSERT_TRUE(s);
  struct stat sb {};
  ASSERT_EQ(::stat(db_path().c_str(), &sb), 0);
  EXPECT_EQ(sb.st_mode & 0777, 0600u);
}

TEST_F(StoreTest, ReopeningKeepsDataAndDoesNotRerunMigrations) {
  {
    auto s = open_store();
    ASSERT_TRUE(s);
    ASSERT_TRUE(s->put_setting("ca_serial", "0a1b").ok());
    ASSERT_TRUE(s->insert_certificate(cert("0a1b", CertKind::kCa)).ok());
  }
  {
    RawDb raw(db_path());
    raw.exec("UPDATE schema_version SET applied_at = 12345");
  }
  auto s = open_store();
  ASSERT_TRUE(s);
  EXPECT_EQ(s->schema_version(), Store::kSchemaVersion);
  auto v = s->get_setting("ca_serial");
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->value_or(""), "0a1b");
  auto c = s->find_certificate("0a1b");
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->has_value());

  RawDb raw(db_path());
  EXPECT_EQ(raw.query("SELECT applied_at FROM schema_version"), "12345");
  EXPECT_EQ(raw.query("SELECT version FROM schema_version"), std::to_string(Store::kSchemaVersion));
}

TEST_F(StoreTest, NewerSchemaVersionIsRefusedAndFileLeftByteIdentical) {
  {
    auto s = open_store();
    ASSERT_TRUE(s);
    ASSERT_TRUE(s->put_setting("k", "v").ok());
  }
  static_assert(Store::kSchemaVersion == 4);
  const int newer = Store::kSchemaVersion + 1;
  {
    RawDb raw(db_path());
    raw.exec("UPDATE schema_version SET version = " + std::to_string(newer));
  }  // last connection closed: the WAL is checkpointed into the main file and removed
  ASSERT_FALSE(fs::exists(db_path().string() + "-wal"));
  const std::string before = read_bytes(db_path());
  ASSERT_FALSE(before.empty());

  auto r = Store::open(db_path());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kFailedPrecondition);
  EXPECT_EQ(r.error().message, "database " + db_path().string() + " has schema version " +
                                   std::to_string(newer) + " but this kmsd understands up to " +
                                   std::to_string(Store::kSchemaVersion) +
                                   "; upgrade kmsd or restore a backup made by this version");
  EXPECT_EQ(read_bytes(db_path()), before);
  EXPECT_FALSE(fs::exists(db_path().string() + "-wal"));
}

TEST_F(StoreTest, NonDatabaseFileIsRefusedNamingThePath) {
  std::string junk;
  for (int i = 0; i < 200; ++i) junk += "this is a configuration file, not a database\n";
  std::ofstream(db_path(), std::ios::binary) << junk;

  auto r = Store::open(db_path());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kStore);
  EXPECT_NE(r.error().message.find(db_path().string()), std::string::npos) << r.error().message;
  EXPECT_NE(r.error().message.find("is not a SQLite database"), std::string::npos)
      << r.error().message;
  EXPECT_EQ(read_bytes(db_path()), junk);
}

TEST_F(StoreTest, ShortNonDatabaseFileIsRefused) {
  std::ofstream(db_path(), std::ios::binary) << "hello\n";
  auto r = Store::open(db_path());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kStore);
  EXPECT_NE(r.error().message.find(db_path().string()), std::string::npos) << r.error().message;
  EXPECT_EQ(read_bytes(db_path()), "hello\n");
}

TEST_F(StoreTest, DatabaseOfAnotherApplicationIsRefusedUntouched) {
  {
    RawDb raw(db_path());
    raw.exec("CREATE TABLE mail (id INTEGER PRIMARY KEY, body TEXT)");
  }
  const std::string before = read_bytes(db_path());
  auto r = Store::open(db_path());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kFailedPrecondition);
  EXPECT_NE(r.error().message.find("not created by kmsd"), std::string::npos) << r.error().message;
  EXPECT_EQ(read_bytes(db_path()), before);
}

TEST_F(StoreTest, MissingDirectoryIsAnIoErrorNamingThePath) {
  fs::path p = tmp_.path() / "no-such-dir" / "kmsd.db";
  auto r = Store::open(p);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kIo);
  EXPECT_NE(r.error().message.find(p.string()), std::string::npos) << r.error().message;
}

TEST_F(StoreTest, SettingsPutGetAndOverwrite) {
  auto s = open_store();
  ASSERT_TRUE(s);
  auto missing = s->get_setting("initialized_at");
  ASSERT_TRUE(missing.ok());
  EXPECT_FALSE(missing->has_value());

  ASSERT_TRUE(s->put_setting("initialized_at", "1700000000").ok());
  auto v = s->get_setting("initialized_at");
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->value_or("?"), "1700000000");

  ASSERT_TRUE(s->put_setting("initialized_at", "1800000000").ok());
  v = s->get_setting("initialized_at");
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->value_or("?"), "1800000000");

  ASSERT_TRUE(s->put_setting("empty", "").ok());
  v = s->get_setting("empty");
  ASSERT_TRUE(v.ok());
  ASSERT_TRUE(v->has_value());
  EXPECT_EQ(**v, "");

  auto bad = s->put_setting("", "x");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.error().code, ErrorCode::kInvalidArgument);
}

TEST_F(StoreTest, CertificatesInsertFindAndListByKind) {
  auto s = open_store();
  ASSERT_TRUE(s);
  auto ca = cert("01", CertKind::kCa, 10);
  ca.der.clear();  // an empty BLOB stays an empty BLOB, not NULL
  auto a1 = cert("0a1b", CertKind::kAdmin, 30);
  a1.revoked_at = 4242;
  auto a2 = cert("0a1c", CertKind::kAdmin, 20);
  auto srv = cert("ff", CertKind::kServer, 40);
  for (const auto& c : {ca, a1, a2, srv}) ASSERT_TRUE(s->insert_certificate(c).ok()) << c.serial;

  auto found = s->find_certificate("0a1b");
  ASSERT_TRUE(found.ok());
  ASSERT_TRUE(found->has_value());
  const auto& f = **found;
  EXPECT_EQ(f.serial, a1.serial);
  EXPECT_EQ(f.kind, CertKind::kAdmin);
  EXPECT_EQ(f.subject, a1.subject);
  EXPECT_EQ(f.not_before, a1.not_before);
  EXPECT_EQ(f.not_after, a1.not_after);
  EXPECT_EQ(f.der, a1.der);
  EXPECT_EQ(f.issued_at, a1.issued_at);
  EXPECT_EQ(f.revoked_at, std::optional<std::int64_t>(4242));

  auto ca_found = s->find_certificate("01");
  ASSERT_TRUE(ca_found.ok());
  ASSERT_TRUE(ca_found->has_value());
  EXPECT_TRUE((*ca_found)->der.empty());
  EXPECT_FALSE((*ca_found)->revoked_at.has_value());

  auto none = s->find_certificate("abcdef");
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());

  auto admins = s->certificates(CertKind::kAdmin);
  ASSERT_TRUE(admins.ok());
  ASSERT_EQ(admins->size(), 2u);
  EXPECT_EQ((*admins)[0].serial, "0a1c");  // ordered by issue time
  EXPECT_EQ((*admins)[1].serial, "0a1b");
  EXPECT_EQ(count_certs(*s, CertKind::kCa), 1u);
  EXPECT_EQ(count_certs(*s, CertKind::kServer), 1u);
}

TEST_F(StoreTest, DuplicateCertificateSerialIsAlreadyExists) {
  auto s = open_store();
  ASSERT_TRUE(s);
  ASSERT_TRUE(s->insert_certificate(cert("0a1b", CertKind::kAdmin)).ok());
  auto again = s->insert_certificate(cert("0a1b", CertKind::kServer));
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.error().code, ErrorCode::kAlreadyExists);
  EXPECT_EQ(again.error().message, "a certificate with serial 0a1b is already recorded");
  auto f = s->find_certificate("0a1b");
  ASSERT_TRUE(f.ok() && f->has_value());
  EXPECT_EQ((*f)->kind, CertKind::kAdmin);
}

TEST_F(StoreTest, CertificateSerialMustBeLowerCaseHex) {
  auto s = open_store();
  ASSERT_TRUE(s);
  for (const char* bad : {"", "0A1B", "0x1b", "12 34"}) {
    auto st = s->insert_certificate(cert(bad, CertKind::kAdmin));
    ASSERT_FALSE(st.ok()) << bad;
    EXPECT_EQ(st.error().code, ErrorCode::kInvalidArgument) << bad;
  }
}

TEST_F(StoreTest, AdminWithUnknownCertificateSerialIsRejectedByForeignKey) {
  auto s = open_store();
  ASSERT_TRUE(s);
  auto st = s->insert_admin(admin("alice", "0a1b"));
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.error().code, ErrorCode::kNotFound);
  EXPECT_NE(st.error().message.find("0a1b"), std::string::npos) << st.error().message;
  auto f = s->find_admin("alice");
  ASSERT_TRUE(f.ok());
  EXPECT_FALSE(f->has_value());
}

TEST_F(StoreTest, RecoveryRoleIsStoredAndReadBack) {
  auto s = open_store();
  ASSERT_TRUE(s);
  ASSERT_TRUE(s->insert_certificate(cert("0c", CertKind::kAdmin)).ok());
  ASSERT_TRUE(s->insert_admin(admin("rita", "0c", AdminRole::kRecovery)).ok());
  auto r = s->find_admin("rita");
  ASSERT_TRUE(r.ok() && r->has_value());
  EXPECT_EQ((*r)->role, AdminRole::kRecovery);
}

TEST_F(StoreTest, AdminsInsertFindByNameAndSerialAndList) {
  auto s = open_store();
  ASSERT_TRUE(s);
  ASSERT_TRUE(s->insert_certificate(cert("0a", CertKind::kAdmin)).ok());
  ASSERT_TRUE(s->insert_certificate(cert("0b", CertKind::kAdmin)).ok());
  auto bob = admin("bob", "0b", AdminRole::kAuditor);
  bob.removed_at = 3000;
  ASSERT_TRUE(s->insert_admin(bob).ok());
  ASSERT_TRUE(s->insert_admin(admin("alice", "0a", AdminRole::kApprover)).ok());
  auto a = s->find_admin("alice");
  ASSERT_TRUE(a.ok() && a->has_value());
  EXPECT_EQ((*a)->role, AdminRole::kApprover);
  EXPECT_EQ((*a)->cert_serial, "0a");
  EXPECT_EQ((*a)->created_at, 2000);
  EXPECT_FALSE((*a)->removed_at.has_value());

  auto b = s->find_admin_by_serial("0b");
  ASSERT_TRUE(b.ok() && b->has_value());
  EXPECT_EQ((*b)->name, "bob");
  EXPECT_EQ((*b)->removed_at, std::optional<std::int64_t>(3000));

  auto none = s->find_admin_by_serial("0c");
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());

  auto all = s->admins();
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->size(), 2u);  // removed ones included
  EXPECT_EQ((*all)[0].name, "alice");
  EXPECT_EQ((*all)[1].name, "bob");

  auto dup = s->insert_admin(admin("alice", "0b"));
  ASSERT_FALSE(dup.ok());
  EXPECT_EQ(dup.error().code, ErrorCode::kAlreadyExists);
  EXPECT_EQ(dup.error().message, "an administrator named alice is already recorded");

  auto dup_serial = s->insert_admin(admin("carol", "0a"));
  ASSERT_FALSE(dup_serial.ok());
  EXPECT_EQ(dup_serial.error().code, ErrorCode::kAlreadyExists);
  EXPECT_EQ(dup_serial.error().message,
            "an administrator with certificate serial 0a is already recorded");
}

TEST_F(StoreTest, TransactionThatReturnsAnErrorRollsBackAllItsRows) {
  auto s = open_store();
  ASSERT_TRUE(s);
  auto st = s->transaction([&]() -> Status {
    KMSD_TRY(s->insert_certificate(cert("0a", CertKind::kAdmin)));
    KMSD_TRY(s->insert_admin(admin("alice", "0a")));
    KMSD_TRY(s->put_setting("initialized_at", "1"));
    return make_error(ErrorCode::kCrypto, "signing failed");
  });
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.error().code, ErrorCode::kCrypto);
  EXPECT_EQ(st.error().message, "signing failed");

  EXPECT_EQ(count_certs(*s, CertKind::kAdmin), 0u);
  auto a = s->admins();
  ASSERT_TRUE(a.ok());
  EXPECT_TRUE(a->empty());
  auto v = s->get_setting("initialized_at");
  ASSERT_TRUE(v.ok());
  EXPECT_FALSE(v->has_value());

  // The store is usable afterwards and a successful transaction commits.
  ASSERT_TRUE(s->transaction([&]() -> Status {
                 KMSD_TRY(s->insert_certificate(cert("0a", CertKind::kAdmin)));
                 return s->insert_admin(admin("alice", "0a"));
               }).ok());
  EXPECT_EQ(count_certs(*s, CertKind::kAdmin), 1u);
}

TEST_F(StoreTest, TransactionThatThrowsRollsBackAndRethrows) {
  auto s = open_store();
  ASSERT_TRUE(s);
  EXPECT_THROW((void)s->transaction([&]() -> Status {
    EXPECT_TRUE(s->insert_certificate(cert("0a", CertKind::kAdmin)).ok());
    throw std::runtime_error("boom");
  }),
               std::runtime_error);
  EXPECT_EQ(count_certs(*s, CertKind::kAdmin), 0u);
  ASSERT_TRUE(s->insert_certificate(cert("0a", CertKind::kAdmin)).ok());
  EXPECT_EQ(count_certs(*s, CertKind::kAdmin), 1u);
}

TEST_F(StoreTest, NestedTransactionJoinsTheOuterOne) {
  auto s = open_store();
  ASSERT_TRUE(s);

  // Inner work is rolled back with a failing outer transaction.
  auto st = s->transaction([&]() -> Status {
    KMSD_TRY(s->transaction(
        [&]() -> Status { return s->insert_certificate(cert("0a", CertKind::kAdmin)); }));
    auto seen = s->find_certificate("0a");  // visible inside the outer transaction
    EXPECT_TRUE(seen.ok() && seen->has_value());
    return make_error(ErrorCode::kInternal, "outer fails");
  });
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(count_certs(*s, CertKind::kAdmin), 0u);

  // A failing inner call is undone on its own; the outer one still commits its rows.
  st = s->transaction([&]() -> Status {
    KMSD_TRY(s->insert_certificate(cert("0b", CertKind::kAdmin)));
    auto inner = s->transaction([&]() -> Status {
      KMSD_TRY(s->insert_certificate(cert("0c", CertKind::kAdmin)));
      return make_error(ErrorCode::kInvalidArgument, "inner fails");
    });
    EXPECT_FALSE(inner.ok());
    EXPECT_THROW((void)s->transaction([&]() -> Status {
      EXPECT_TRUE(s->insert_certificate(cert("0d", CertKind::kAdmin)).ok());
      throw std::logic_error("inner throws");
    }),
                 std::logic_error);
    return s->transaction(
        [&]() -> Status { return s->insert_certificate(cert("0e", CertKind::kAdmin)); });
  });
  ASSERT_TRUE(st.ok()) << st.error().message;
  auto certs = s->certificates(CertKind::kAdmin);
  ASSERT_TRUE(certs.ok());
  std::vector<std::string> serials;
  for (const auto& c : *certs) serials.push_back(c.serial);
  EXPECT_EQ(serials, (std::vector<std::string>{"0b", "0e"}));
}

TEST_F(StoreTest, GroupedTransactionsShareACommitAndKeepEachCallersOwnResult) {
  auto s = open_store();
  ASSERT_TRUE(s);
  // The first caller's function holds its group open until the three others have called and
  // had time to queue: they then commit together, in a second group.
  std::atomic<int> entered{0};
  std::atomic<bool> first_running{false};
  auto first = std::thread([&] {
    Status st = s->grouped_transaction([&]() -> Status {
      first_running = true;
      while (entered.load() < 3) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      return s->insert_certificate(cert("a0", CertKind::kAdmin));
    });
    EXPECT_TRUE(st.ok()) << st.error().message;
  });
  while (!first_running) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  Status ok_result, failed_result;
  bool threw = false;
  std::vector<std::thread> others;
  others.emplace_back([&] {
    ++entered;
    ok_result = s->grouped_transaction([&]() -> Status {
      KMSD_TRY(s->insert_certificate(cert("b0", CertKind::kAdmin)));
      return s->put_setting("b", "kept");
    });
  });
  others.emplace_back([&] {
    ++entered;
    failed_result = s->grouped_transaction([&]() -> Status {
      KMSD_TRY(s->insert_certificate(cert("c0", CertKind::kAdmin)));
      KMSD_TRY(s->put_setting("c", "rolled back"));
      return make_error(ErrorCode::kFailedPrecondition, "c refuses");
    });
  });
  others.emplace_back([&] {
    ++entered;
    try {
      (void)s->grouped_transaction([&]() -> Status {
        EXPECT_TRUE(s->insert_certificate(cert("d0", CertKind::kAdmin)).ok());
        throw std::runtime_error("d throws");
      });
    } catch (const std::runtime_error& e) {
      threw = std::string(e.what()) == "d throws";
    }
  });
  first.join();
  for (auto& t : others) t.join();

  EXPECT_TRUE(ok_result.ok()) << ok_result.error().message;
  ASSERT_FALSE(failed_result.ok());
  EXPECT_EQ(failed_result.error().message, "c refuses");
  EXPECT_TRUE(threw);
  // Each caller's own changes: kept, or undone without touching the others'.
  auto certs = s->certificates(CertKind::kAdmin);
  ASSERT_TRUE(certs.ok());
  std::vector<std::string> serials;
  for (const auto& c : *certs) serials.push_back(c.serial);
  std::sort(serials.begin(), serials.end());
  EXPECT_EQ(serials, (std::vector<std::string>{"a0", "b0"}));
  EXPECT_EQ(s->get_setting("b").value(), std::optional<std::string>("kept"));
  EXPECT_FALSE(s->get_setting("c").value().has_value());
  // Four transactions, and fewer COMMITs: the three that waited shared one.
  const auto stats = s->group_commit_stats();
  EXPECT_EQ(stats.transactions, 4u);
  EXPECT_EQ(stats.groups, 2u);
  // Committed for good: a second connection sees exactly the kept rows.
  RawDb raw(db_path());
  EXPECT_EQ(raw.query("SELECT group_concat(serial) FROM (SELECT serial FROM certificates "
                      "ORDER BY serial)"),
            "a0,b0");
}

TEST_F(StoreTest, GroupedTransactionInsideATransactionJoinsIt) {
  auto s = open_store();
  ASSERT_TRUE(s);
  auto st = s->transaction([&]() -> Status {
    KMSD_TRY(s->grouped_transaction(
        [&]() -> Status { return s->insert_certificate(cert("0a", CertKind::kAdmin)); }));
    return make_error(ErrorCode::kInternal, "outer fails");
  });
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(count_certs(*s, CertKind::kAdmin), 0u);
  EXPECT_EQ(s->group_commit_stats().transactions, 0u);

  // Under load from eight threads every grouped transaction lands exactly once.
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < 25; ++i) {
        char serial[16];
        std::snprintf(serial, sizeof serial, "%02x%04x", t, i);
        Status r = s->grouped_transaction([&]() -> Status {
          KMSD_TRY(s->insert_certificate(cert(serial, CertKind::kServer, i)));
          return s->put_setting(std::string("g_") + serial, serial);
        });
        if (!r.ok()) ++failures;
      }
    });
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(count_certs(*s, CertKind::kServer), 200u);
  const auto stats = s->group_commit_stats();
  EXPECT_EQ(stats.transactions, 200u);
  EXPECT_LE(stats.groups, 200u);
  RawDb raw(db_path());
  EXPECT_EQ(raw.query("SELECT count(*) FROM settings WHERE key LIKE 'g_%'"), "200");
}

TEST_F(StoreTest, ConcurrentInsertsFromFourThreadsAllLand) {
  auto s = open_store();
  ASSERT_TRUE(s);
  constexpr int kThreads = 4;
  constexpr int kPerThread = 50;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        char serial[16];
        std::snprintf(serial, sizeof serial, "%02x%04x", t, i);
        Status st;
        if (i % 2 == 0) {
          st = s->insert_certificate(cert(serial, CertKind::kServer, i));
        } else {
          // A transaction with two rows, interleaved with other threads' single inserts.
          st = s->transaction([&]() -> Status {
            KMSD_TRY(s->insert_certificate(cert(serial, CertKind::kAdmin, i)));
            return s->put_setting(std::string("last_") + serial, serial);
          });
        }
        if (!st.ok()) ++failures;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(count_certs(*s, CertKind::kServer) + count_certs(*s, CertKind::kAdmin),
            static_cast<std::size_t>(kThreads * kPerThread));
  RawDb raw(db_path());
  EXPECT_EQ(raw.query("SELECT count(*) FROM settings"), std::to_string(kThreads * kPerThread / 2));
}

TEST_F(StoreTest, SecondStoreOnTheSameFileSeesCommittedRows) {
  auto a = open_store();
  auto b = open_store();
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(a->insert_certificate(cert("0a", CertKind::kCa)).ok());
  auto f = b->find_certificate("0a");
  ASSERT_TRUE(f.ok());
  EXPECT_TRUE(f->has_value());
}

// ---- migration 1 -> 2 --------------------------------------------------------------------

class MigrationTest : public StoreTest {
 protected:
  // A version 1 database as kmsd 1 left it: certificates (one revoked), administrators (one
  // removed) and a setting, in the rollback journal mode of a fresh SQLite file.
  void write_v1_database(bool dangling_admin = false) {
    RawDb raw(db_path());
    raw.exec(kV1Schema);
    raw.exec(
        "INSERT INTO certificates VALUES ('01', 'ca', 'CN=Root,O=Example', 1600000000, "
        "1900000000, x'3082010a', 1600000001, NULL);"
        "INSERT INTO certificates VALUES ('0a1b', 'admin', 'CN=alice,O=Example', 1600000000, "
        "1700000000, x'30820101', 1600000002, NULL);"
        "INSERT INTO certificates VALUES ('0a1c', 'admin', 'CN=bob,O=Example', 1600000000, "
        "1700000000, x'30820102', 1600000003, 1650000000);"
        "INSERT INTO certificates VALUES ('ff', 'server', 'CN=kms.example.org', NULL, NULL, "
        "x'', 1600000004, NULL);"
        "INSERT INTO administrators VALUES ('alice', 'admin', '0a1b', 1600000002, NULL);"
        "INSERT INTO administrators VALUES ('bob', 'auditor', '0a1c', 1600000003, 1650000000);"
        "INSERT INTO settings VALUES ('ca_serial', '01');");
    if (dangling_admin)  // possible only because this connection has foreign keys off
      raw.exec("INSERT INTO administrators VALUES ('mallory', 'admin', 'dead', 1, NULL)");
  }
};

TEST_F(MigrationTest, V1DatabaseMigratesToV2KeepingEveryCertificateAndAdministrator) {
  write_v1_database();
  auto s = open_store();
  ASSERT_TRUE(s);
  EXPECT_EQ(s->schema_version(), Store::kSchemaVersion);  // v1 -> v2 -> v3 -> v4 in one open

  auto ca = s->find_certificate("01");
  ASSERT_TRUE(ca.ok() && ca->has_value());
  EXPECT_EQ((*ca)->kind, CertKind::kCa);
  EXPECT_EQ((*ca)->subject, "CN=Root,O=Example");
  EXPECT_EQ((*ca)->not_before, 1600000000);
  EXPECT_EQ((*ca)->not_after, 1900000000);
  EXPECT_EQ((*ca)->der, (Bytes{0x30, 0x82, 0x01, 0x0a}));
  EXPECT_EQ((*ca)->issued_at, 1600000001);
  EXPECT_FALSE((*ca)->revoked_at.has_value());
  EXPECT_FALSE((*ca)->revocation_reason.has_value());
  EXPECT_FALSE((*ca)->user_id.has_value());

  auto bob_cert = s->find_certificate("0a1c");
  ASSERT_TRUE(bob_cert.ok() && bob_cert->has_value());
  EXPECT_EQ((*bob_cert)->revoked_at, std::optional<std::int64_t>(1650000000));
  auto srv = s->find_certificate("ff");
  ASSERT_TRUE(srv.ok() && srv->has_value());
  EXPECT_EQ((*srv)->not_before, 0);  // NULL in v1, read as 0 as before
  EXPECT_TRUE((*srv)->der.empty());
  EXPECT_EQ(count_certs(*s, CertKind::kAdmin), 2u);
  EXPECT_EQ(count_certs(*s, CertKind::kServer), 1u);

  auto admins = s->admins();
  ASSERT_TRUE(admins.ok());
  ASSERT_EQ(admins->size(), 2u);
  EXPECT_EQ((*admins)[0].name, "alice");
  EXPECT_EQ((*admins)[0].role, AdminRole::kAdmin);
  EXPECT_EQ((*admins)[0].cert_serial, "0a1b");
  EXPECT_EQ((*admins)[0].created_at, 1600000002);
  EXPECT_FALSE((*admins)[0].removed_at.has_value());
  EXPECT_EQ((*admins)[1].name, "bob");
  EXPECT_EQ((*admins)[1].role, AdminRole::kAuditor);
  EXPECT_EQ((*admins)[1].removed_at, std::optional<std::int64_t>(1650000000));
  auto by_serial = s->find_admin_by_serial("0a1b");
  ASSERT_TRUE(by_serial.ok() && by_serial->has_value());
  EXPECT_EQ((*by_serial)->name, "alice");
  auto setting = s->get_setting("ca_serial");
  ASSERT_TRUE(setting.ok());
  EXPECT_EQ(setting->value_or(""), "01");

  // administrators still references the (rebuilt) certificates table by name, and the
  // rebuild left nothing behind.
  RawDb raw(db_path());
  EXPECT_EQ(raw.query("SELECT \"table\" || '.' || \"to\" FROM "
                      "pragma_foreign_key_list('administrators')"),
            "certificates.serial");
  EXPECT_NE(raw.query("SELECT sql FROM sqlite_schema WHERE name = 'administrators'")
                .find("REFERENCES certificates (serial)"),
            std::string::npos);
  EXPECT_EQ(raw.query("SELECT count(*) FROM sqlite_schema WHERE sql LIKE '%certificates_new%' "
                      "OR name LIKE '%_new'"),
            "0");
  EXPECT_EQ(raw.query("SELECT count(*) FROM pragma_foreign_key_check"), "0");
  for (const char* index : {"certificates_by_kind", "certificates_by_user",
                            "administrators_by_cert_serial", "users_by_state"}) {
    EXPECT_EQ(raw.query(std::string("SELECT count(*) FROM sqlite_schema WHERE type = 'index' "
                                    "AND name = '") +
                        index + "'"),
              "1")
        << index;
  }
  EXPECT_EQ(raw.query("SELECT version FROM schema_version"), std::to_string(Store::kSchemaVersion));
  // v3: users gained keys_from_version; revoked certificates are indexed for the CRL.
  EXPECT_EQ(raw.query("SELECT count(*) FROM pragma_table_info('users') "
                      "WHERE name = 'keys_from_version'"),
            "1");
  EXPECT_EQ(raw.query("SELECT count(*) FROM sqlite_master WHERE type = 'index' "
                      "AND name = 'certificates_revoked'"),
            "1");
  EXPECT_EQ(raw.query("PRAGMA journal_mode"), "wal");

  // Foreign keys still hold on the store's connection: an administrator with a bogus
  // certificate serial is rejected, and the new certificate columns are enforced too.
  auto bogus = s->insert_admin(admin("carol", "0bad"));
  ASSERT_FALSE(bogus.ok());
  EXPECT_EQ(bogus.error().code, ErrorCode::kNotFound);
  auto orphan = cert("0e", CertKind::kEncryption);
  orphan.user_id = "nobody";
  auto st = s->insert_certificate(orphan);
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.error().code, ErrorCode::kNotFound);
  EXPECT_NE(st.error().message.find("no user nobody"), std::string::npos) << st.error().message;

  // The new kinds are accepted; nonsense kinds still are not.
  ASSERT_TRUE(s->insert_certificate(cert("05", CertKind::kSigning)).ok());
  EXPECT_NE(thrown([&] {
              raw.exec(
                  "INSERT INTO certificates (serial, kind, subject, der, issued_at) "
                  "VALUES ('06', 'bogus', 'CN=x', x'', 1)");
            }).find("CHECK constraint failed"),
            std::string::npos);

  // Reopening a migrated database does not migrate again.
  s.reset();
  auto again = open_store();
  ASSERT_TRUE(again);
  EXPECT_EQ(count_certs(*again, CertKind::kAdmin), 2u);
}

TEST_F(MigrationTest, V1DatabaseWithABrokenForeignKeyIsNotMigratedAndStaysAtV1) {
  write_v1_database(/*dangling_admin=*/true);
  auto r = Store::open(db_path());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kStore);
  EXPECT_NE(r.error().message.find("break a foreign key"), std::string::npos) << r.error().message;
  EXPECT_NE(r.error().message.find("administrators"), std::string::npos) << r.error().message;
  EXPECT_NE(r.error().message.find("schema version 1"), std::string::npos) << r.error().message;

  {
    RawDb raw(db_path());
    EXPECT_EQ(raw.query("SELECT version FROM schema_version"), "1");
    EXPECT_EQ(raw.query("SELECT count(*) FROM sqlite_schema WHERE name = 'users'"), "0");
    EXPECT_NE(raw.query("SELECT sql FROM sqlite_schema WHERE name = 'certificates'")
                  .find("'ca', 'admin', 'server')"),
              std::string::npos);
    EXPECT_EQ(raw.query("SELECT count(*) FROM certificates"), "4");
    // Repair what the message named; the migration then goes through.
    raw.exec("DELETE FROM administrators WHERE name = 'mallory'");
  }
  auto s = open_store();
  ASSERT_TRUE(s);
  EXPECT_EQ(s->schema_version(), Store::kSchemaVersion);
  auto bogus = s->insert_admin(admin("carol", "0bad"));  // foreign keys are back on
  ASSERT_FALSE(bogus.ok());
  EXPECT_EQ(bogus.error().code, ErrorCode::kNotFound);
}

// ---- certificates: new kinds, owners, revocation, removal of administrators -------------

TEST_F(StoreTest, SigningAndEncryptionCertificatesRoundTripWithTheirOwner) {
  auto s = open_store();
  ASSERT_TRUE(s);
  ASSERT_TRUE(s->insert_user(user("u1")).ok());
  auto sig = cert("51", CertKind::kSigning, 100);
  sig.user_id = "u1";
  auto enc = cert("e1", CertKind::kEncryption, 100);
  enc.user_id = "u1";
  enc.revoked_at = 200;
  enc.revocation_reason = 1;
  ASSERT_TRUE(s->insert_certificate(sig).ok());
  ASSERT_TRUE(s->insert_certificate(enc).ok());

  auto f = s->find_certificate("e1");
  ASSERT_TRUE(f.ok() && f->has_value());
  EXPECT_EQ((*f)->kind, CertKind::kEncryption);
  EXPECT_EQ((*f)->user_id, std::optional<std::string>("u1"));
  EXPECT_EQ((*f)->revoked_at, std::optional<std::int64_t>(200));
  EXPECT_EQ((*f)->revocation_reason, std::optional<int>(1));
  auto signing = s->certificates(CertKind::kSigning);
  ASSERT_TRUE(signing.ok());
  ASSERT_EQ(signing->size(), 1u);
  EXPECT_EQ((*signing)[0].serial, "51");
  EXPECT_EQ((*signing)[0].user_id, std::optional<std::string>("u1"));
  EXPECT_EQ(count_certs(*s, CertKind::kEncryption), 1u);

  auto bad = cert("e2", CertKind::kEncryption);
  bad.revocation_reason = 7;  // not used by RFC 5280
  auto st = s->insert_certificate(bad);
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.error().code, ErrorCode::kInvalidArgument);
}

TEST_F(StoreTest, CertificatesOfUserListsOnlyThatUsersCertificatesInIssueOrder) {
  auto s = open_store();
  ASSERT_TRUE(s);
  ASSERT_TRUE(s->insert_user(user("u1")).ok());
  ASSERT_TRUE(s->insert_user(user("u2")).ok());
  auto add = [&](const std::string& serial, CertKind kind, const std::string& owner,
                 std::int64_t at) {
    auto c = cert(serial, kind, at);
    c.user_id = owner;
    ASSERT_TRUE(s->insert_certificate(c).ok()) << serial;
  };
  add("a3", CertKind::kEncryption, "u1", 30);
  add("a1", CertKind::kSigning, "u1", 10);
  add("b1", CertKind::kSigning, "u2", 5);
  add("a2", CertKind::kEncryption, "u1", 20);
  ASSERT_TRUE(s->insert_certificate(cert("c0", CertKind::kAdmin)).ok());

  auto mine = s->certificates_of_user("u1");
  ASSERT_TRUE(mine.ok());
  std::vector<std::string> serials;
  for (const auto& c : *mine) serials.push_back(c.serial);
  EXPECT_EQ(serials, (std::vector<std::string>{"a1", "a2", "a3"}));
  auto none = s->certificates_of_user("nobody");
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());
}

TEST_F(StoreTest, RevokeCertificateRecordsTimeAndReasonOnce) {
  auto s = open_store();
  ASSERT_TRUE(s);
  ASSERT_TRUE(s->insert_certificate(cert("0a", CertKind::kAdmin)).ok());
  ASSERT_TRUE(s->revoke_certificate("0a", 4000, 4).ok());
  auto f = s->find_certificate("0a");
  ASSERT_TRUE(f.ok() && f->has_value());
  EXPECT_EQ((*f)->revoked_at, std::optional<std::int64_t>(4000));
  EXPECT_EQ((*f)->revocation_reason, std::optional<int>(4));

  // Revoking again changes nothing: the first time and reason stand.
  ASSERT_TRUE(s->revoke_certificate("0a", 5000, 1).ok());
  f = s->find_certificate("0a");
  ASSERT_TRUE(f.ok() && f->has_value());
  EXPECT_EQ((*f)->revoked_at, std::optional<std::int64_t>(4000));
  EXPECT_EQ((*f)->revocation_reason, std::optional<int>(4));

  auto missing = s->revoke_certificate("0b", 4000, 0);
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.error().code, ErrorCode::kNotFound);
  EXPECT_EQ(missing.error().message, "no certificate with serial 0b is recorded");
  for (int bad : {-1, 7, 11}) {
    auto st = s->revoke_certificate("0a", 4000, bad);
    ASSERT_FALSE(st.ok()) << bad;
    EXPECT_EQ(st.error().code, ErrorCode::kInvalidArgument) << bad;
  }
}

TEST_F(StoreTest, ForEachRevokedCertificateWalksOnlyRevokedOnesInRevocationOrder) {
  auto s = open_store();
  ASSERT_TRUE(s);
  for (const char* serial : {"0a", "0b", "0c", "0d"})
    ASSERT_TRUE(s->insert_certificate(cert(serial, CertKind::kAdmin)).ok());
  ASSERT_TRUE(s->revoke_certificate("0c", 4000, 1).ok());
  ASSERT_TRUE(s->revoke_certificate("0a", 4100, 0).ok());
  std::vector<std::pair<std::string, int>> seen;
  ASSERT_TRUE(s->for_each_revoked_certificate([&](const CertificateRecord& c) -> Status {
                 seen.emplace_back(c.serial, c.revocation_reason.value_or(-1));
                 return {};
               }).ok());
  EXPECT_EQ(seen, (std::vector<std::pair<std::string, int>>{{"0c", 1}, {"0a", 0}}));
  auto count = s->count_revoked_certificates();
  ASSERT_TRUE(count.ok());
  EXPECT_EQ(*count, 2u);
  auto stop = s->for_each_revoked_certificate(
      [](const CertificateRecord&) -> Status { return make_error(ErrorCode::kIo, "stop"); });
  ASSERT_FALSE(stop.ok());
  EXPECT_EQ(stop.error().message, "stop");
}

TEST_F(StoreTest, RemoveAdminMarksTheAdministratorRemovedOnce) {
  auto s = open_store();
  ASSERT_TRUE(s);
  ASSERT_TRUE(s->insert_certificate(cert("0a", CertKind::kAdmin)).ok());
  ASSERT_TRUE(s->insert_admin(admin("alice", "0a")).ok());
  ASSERT_TRUE(s->remove_admin("alice", 3000).ok());
  ASSERT_TRUE(s->remove_admin("alice", 3500).ok());  // no change
  auto a = s->find_admin("alice");
  ASSERT_TRUE(a.ok() && a->has_value());
  EXPECT_EQ((*a)->removed_at, std::optional<std::int64_t>(3000));
  auto missing = s->remove_admin("bob", 3000);
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.error().code, ErrorCode::kNotFound);
  EXPECT_EQ(missing.error().message, "no administrator named bob is recorded");
}

// ---- users ------------------------------------------------------------------------------

TEST_F(StoreTest, UsersInsertFindUpdateAndRefuseDuplicates) {
  auto s = open_store();
  ASSERT_TRUE(s);
  auto u = user("jdoe");
  u.dn = "CN=John Doe\\, Jr.,O=Example";
  ASSERT_TRUE(s->insert_user(u).ok());
  ASSERT_TRUE(s->insert_user(user("asmith")).ok());

  auto f = s->find_user("jdoe");
  ASSERT_TRUE(f.ok() && f->has_value());
  EXPECT_EQ((*f)->email, "jdoe@example.org");
  EXPECT_EQ((*f)->display_name, "User jdoe");
  EXPECT_EQ((*f)->dn, u.dn);
  EXPECT_EQ((*f)->state, UserState::kEnabled);
  EXPECT_EQ((*f)->created_at, 5000);
  EXPECT_FALSE((*f)->last_enrolled_at.has_value());
  EXPECT_FALSE((*f)->keys_from_version.has_value());
  auto other = s->find_user("asmith");
  ASSERT_TRUE(other.ok() && other->has_value());
  EXPECT_FALSE((*other)->dn.has_value());
  auto none = s->find_user("nobody");
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());

  auto dup = s->insert_user(user("jdoe"));
  ASSERT_FALSE(dup.ok());
  EXPECT_EQ(dup.error().code, ErrorCode::kAlreadyExists);
  EXPECT_EQ(dup.error().message, "a user with id jdoe is already recorded");
  auto empty = s->insert_user(user(""));
  ASSERT_FALSE(empty.ok());
  EXPECT_EQ(empty.error().code, ErrorCode::kInvalidArgument);

  UserRecord changed = **f;
  changed.state = UserState::kActive;
  changed.email = "john.doe@example.org";
  changed.dn.reset();
  changed.updated_at = 6000;
  changed.last_enrolled_at = 6000;
  changed.keys_from_version = 2;
  changed.created_at = 1;  // not updatable
  ASSERT_TRUE(s->update_user(changed).ok());
  f = s->find_user("jdoe");
  ASSERT_TRUE(f.ok() && f->has_value());
  EXPECT_EQ((*f)->state, UserState::kActive);
  EXPECT_EQ((*f)->email, "john.doe@example.org");
  EXPECT_FALSE((*f)->dn.has_value());
  EXPECT_EQ((*f)->updated_at, 6000);
  EXPECT_EQ((*f)->last_enrolled_at, std::optional<std::int64_t>(6000));
  EXPECT_EQ((*f)->keys_from_version, std::optional<int>(2));
  EXPECT_EQ((*f)->created_at, 5000);

  auto missing = s->update_user(user("nobody"));
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.error().code, ErrorCode::kNotFound);
  EXPECT_EQ(missing.error().message, "no user nobody is recorded");

  auto count = s->count_users();
  ASSERT_TRUE(count.ok());
  EXPECT_EQ(*count, 2u);
}

TEST_F(StoreTest, ForEachUserVisitsTenThousandUsersInIdOrderInPagesOfAThousand) {
  auto s = open_store();
  ASSERT_TRUE(s);
  constexpr int kUsers = 10'000;
  // Inserted in a scrambled order (7919 is prime, so i*7919 mod n is a permutation).
  auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(s->transaction([&]() -> Status {
                 for (int i = 0; i < kUsers; ++i) {
                   char id[16];
                   std::snprintf(id, sizeof id, "u%05d", (i * 7919) % kUsers);
                   KMSD_TRY(s->insert_user(user(id)));
                 }
                 return {};
               }).ok());
  auto insert_ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0)
          .count();
  EXPECT_LT(insert_ms, 30'000) << "10,000 users in one transaction took " << insert_ms << " ms";
  auto count = s->count_users();
  ASSERT_TRUE(count.ok());
  EXPECT_EQ(*count, static_cast<std::size_t>(kUsers));

  std::vector<std::string> seen;
  std::string after;
  int pages = 0;
  while (true) {
    auto n = s->for_each_user(after, 1000, [&](const UserRecord& u) -> Status {
      seen.push_back(u.id);
      after = u.id;
      // The callback may use the store (its cached statements) while the walk goes on.
      auto again = s->find_user(u.id);
      if (!again.ok() || !again->has_value())
        return make_error(ErrorCode::kInternal, "lost " + u.id);
      return {};
    });
    ASSERT_TRUE(n.ok()) << n.error().message;
    if (*n == 0) break;
    ++pages;
    ASSERT_LE(*n, 1000u);
  }
  EXPECT_EQ(pages, 10);
  ASSERT_EQ(seen.size(), static_cast<std::size_t>(kUsers));
  for (int i = 0; i < kUsers; ++i) {
    char id[16];
    std::snprintf(id, sizeof id, "u%05d", i);
    ASSERT_EQ(seen[static_cast<std::size_t>(i)], id) << "position " << i;
  }
}

TEST_F(StoreTest, ForEachUserStopsAtTheCallbacksFirstErrorAndRefusesAnEmptyPage) {
  auto s = open_store();
  ASSERT_TRUE(s);
  for (const char* id : {"a", "b", "c", "d"}) ASSERT_TRUE(s->insert_user(user(id)).ok());
  std::vector<std::string> seen;
  auto r = s->for_each_user("a", 10, [&](const UserRecord& u) -> Status {
    seen.push_back(u.id);
    if (u.id == "c") return make_error(ErrorCode::kIo, "report disk full");
    return {};
  });
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kIo);
  EXPECT_EQ(r.error().message, "report disk full");
  EXPECT_EQ(seen, (std::vector<std::string>{"b", "c"}));  // AFTER_ID is exclusive

  // A nested walk from inside the callback uses its own statement.
  std::vector<std::string> pairs;
  auto outer = s->for_each_user("", 2, [&](const UserRecord& u) -> Status {
    auto inner = s->for_each_user(u.id, 1, [&](const UserRecord& v) -> Status {
      pairs.push_back(u.id + v.id);
      return {};
    });
    if (!inner.ok()) return inner.error();
    return {};
  });
  ASSERT_TRUE(outer.ok()) << outer.error().message;
  EXPECT_EQ(*outer, 2u);
  EXPECT_EQ(pairs, (std::vector<std::string>{"ab", "bc"}));

  auto zero = s->for_each_user("", 0, [](const UserRecord&) -> Status { return {}; });
  ASSERT_FALSE(zero.ok());
  EXPECT_EQ(zero.error().code, ErrorCode::kInvalidArgument);
}

// ---- enrollment tokens ------------------------------------------------------------------

TEST_F(StoreTest, EnrollmentTokenPutReplaceCountFailuresMarkUsedAndDelete) {
  auto s = open_store();
  ASSERT_TRUE(s);
  ASSERT_TRUE(s->insert_user(user("u1")).ok());
  auto none = s->find_enrollment_token("u1");
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());

  ASSERT_TRUE(s->put_enrollment_token(token("u1", 0x11)).ok());
  auto n = s->record_token_failure("u1");
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 1);
  n = s->record_token_failure("u1");
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 2);
  auto f = s->find_enrollment_token("u1");
  ASSERT_TRUE(f.ok() && f->has_value());
  EXPECT_EQ((*f)->failed_attempts, 2);
  EXPECT_EQ((*f)->sealed, Bytes(48, 0x11));
  EXPECT_EQ((*f)->issued_by, "alice");
  EXPECT_EQ((*f)->expires_at, 6000 + 7 * 86400);
  EXPECT_EQ((*f)->purpose, TokenPurpose::kEnroll);

  // Reissuing replaces the one token, attempt counter included.
  auto reissued = token("u1", 0x22);
  reissued.purpose = TokenPurpose::kRecover;
  reissued.issued_by = "bulk:job-7";
  reissued.issued_at = 6500;
  ASSERT_TRUE(s->put_enrollment_token(reissued).ok());
  f = s->find_enrollment_token("u1");
  ASSERT_TRUE(f.ok() && f->has_value());
  EXPECT_EQ((*f)->sealed, Bytes(48, 0x22));
  EXPECT_EQ((*f)->purpose, TokenPurpose::kRecover);
  EXPECT_EQ((*f)->issued_by, "bulk:job-7");
  EXPECT_EQ((*f)->issued_at, 6500);
  EXPECT_EQ((*f)->failed_attempts, 0);
  RawDb raw(db_path());
  EXPECT_EQ(raw.query("SELECT count(*) FROM enrollment_tokens"), "1");

  ASSERT_TRUE(s->mark_token_used("u1", 7000).ok());
  f = s->find_enrollment_token("u1");
  ASSERT_TRUE(f.ok() && f->has_value());
  EXPECT_EQ((*f)->used_at, std::optional<std::int64_t>(7000));
  auto twice = s->mark_token_used("u1", 7100);
  ASSERT_FALSE(twice.ok());
  EXPECT_EQ(twice.error().code, ErrorCode::kFailedPrecondition);
  EXPECT_EQ(twice.error().message, "the enrollment token of user u1 was already used at 7000");

  ASSERT_TRUE(s->delete_enrollment_token("u1").ok());
  none = s->find_enrollment_token("u1");
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());
  auto failure = s->record_token_failure("u1");
  for (const Error& e : {s->delete_enrollment_token("u1").error(),
                         s->mark_token_used("u1", 1).error(), failure.error()}) {
    EXPECT_EQ(e.code, ErrorCode::kNotFound);
    EXPECT_EQ(e.message, "user u1 has no enrollment token");
  }
  auto orphan = s->put_enrollment_token(token("nobody"));
  ASSERT_FALSE(orphan.ok());
  EXPECT_EQ(orphan.error().code, ErrorCode::kNotFound);
}

// ---- key history ------------------------------------------------------------------------

class KeyHistoryTest : public StoreTest {
 protected:
  void SetUp() override {
    s_ = open_store();
    ASSERT_TRUE(s_);
    ASSERT_TRUE(s_->insert_user(user("u1")).ok());
    ASSERT_TRUE(s_->insert_user(user("u2")).ok());
  }
  std::unique_ptr<Store> s_;
};

TEST_F(KeyHistoryTest, AppendsVersionsOneTwoThreeAndReadsThemBackInOrder) {
  auto c = cert("e2", CertKind::kEncryption);
  c.user_id = "u1";
  ASSERT_TRUE(s_->insert_certificate(c).ok());
  auto k2 = key("u1", 2, "k2");
  k2.cert_serial = "e2";
  k2.master_version = 3;
  k2.algorithm = "rsa-2048";
  ASSERT_TRUE(s_->append_key_history(key("u1", 1, "k1")).ok());
  ASSERT_TRUE(s_->append_key_history(k2).ok());
  ASSERT_TRUE(s_->append_key_history(key("u1", 3, "k3")).ok());
  ASSERT_TRUE(s_->append_key_history(key("u2", 1, "k4")).ok());

  auto depth = s_->key_history_depth("u1");
  ASSERT_TRUE(depth.ok());
  EXPECT_EQ(*depth, 3);
  depth = s_->key_history_depth("nobody");
  ASSERT_TRUE(depth.ok());
  EXPECT_EQ(*depth, 0);

  auto h = s_->key_history("u1");
  ASSERT_TRUE(h.ok());
  ASSERT_EQ(h->size(), 3u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ((*h)[static_cast<std::size_t>(i)].version, i + 1);
    EXPECT_EQ((*h)[static_cast<std::size_t>(i)].key_id, "k" + std::to_string(i + 1));
    EXPECT_EQ((*h)[static_cast<std::size_t>(i)].user_id, "u1");
  }
  EXPECT_EQ((*h)[1].cert_serial, std::optional<std::string>("e2"));
  EXPECT_EQ((*h)[1].master_version, 3u);
  EXPECT_EQ((*h)[1].algorithm, "rsa-2048");
  EXPECT_EQ((*h)[1].sealed_key, Bytes(64, 2));
  EXPECT_EQ((*h)[1].created_at, 7002);
  EXPECT_FALSE((*h)[0].cert_serial.has_value());
}

TEST_F(KeyHistoryTest, VersionGapRepeatDuplicateKeyIdAndUnknownOwnersAreRefused) {
  ASSERT_TRUE(s_->append_key_history(key("u1", 1, "k1")).ok());

  auto gap = s_->append_key_history(key("u1", 3, "k3"));
  ASSERT_FALSE(gap.ok());
  EXPECT_EQ(gap.error().code, ErrorCode::kFailedPrecondition);
  EXPECT_EQ(gap.error().message,
            "the key history of user u1 holds 1 key(s), so the next version is 2, not 3");
  auto repeat = s_->append_key_history(key("u1", 1, "k1b"));
  ASSERT_FALSE(repeat.ok());
  EXPECT_EQ(repeat.error().code, ErrorCode::kFailedPrecondition);
  auto first = s_->append_key_history(key("u2", 2, "k2"));
  ASSERT_FALSE(first.ok());
  EXPECT_EQ(first.error().code, ErrorCode::kFailedPrecondition);

  auto dup = s_->append_key_history(key("u2", 1, "k1"));
  ASSERT_FALSE(dup.ok());
  EXPECT_EQ(dup.error().code, ErrorCode::kAlreadyExists);
  EXPECT_EQ(dup.error().message, "a key with id k1 is already in the key history of user u1");

  auto no_user = s_->append_key_history(key("nobody", 1, "k9"));
  ASSERT_FALSE(no_user.ok());
  EXPECT_EQ(no_user.error().code, ErrorCode::kNotFound);
  EXPECT_NE(no_user.error().message.find("no user nobody"), std::string::npos)
      << no_user.error().message;
  auto k = key("u1", 2, "k2");
  k.cert_serial = "0bad";
  auto no_cert = s_->append_key_history(k);
  ASSERT_FALSE(no_cert.ok());
  EXPECT_EQ(no_cert.error().code, ErrorCode::kNotFound);
  EXPECT_NE(no_cert.error().message.find("no certificate with serial 0bad"), std::string::npos)
      << no_cert.error().message;

  auto depth = s_->key_history_depth("u1");
  ASSERT_TRUE(depth.ok());
  EXPECT_EQ(*depth, 1);
  auto other = s_->key_history("u2");
  ASSERT_TRUE(other.ok());
  EXPECT_TRUE(other->empty());
}

TEST_F(KeyHistoryTest, TriggersRefuseDeleteIdentityUpdatesAndReplaceFromAnyConnection) {
  auto c = cert("e1", CertKind::kEncryption);
  c.user_id = "u1";
  ASSERT_TRUE(s_->insert_certificate(c).ok());
  auto k1 = key("u1", 1, "k1");
  k1.cert_serial = "e1";
  ASSERT_TRUE(s_->append_key_history(k1).ok());
  ASSERT_TRUE(s_->append_key_history(key("u1", 2, "k2")).ok());
  ASSERT_TRUE(s_->append_key_history(key("u2", 1, "k3")).ok());

  RawDb raw(db_path());
  const std::string kRefused = "key history is append-only";
  for (const char* sql : {
           "DELETE FROM key_history WHERE key_id = 'k2'",
           "DELETE FROM key_history",
           "UPDATE key_history SET user_id = 'u2' WHERE key_id = 'k2'",
           "UPDATE key_history SET version = 5 WHERE key_id = 'k2'",
           "UPDATE key_history SET key_id = 'other' WHERE key_id = 'k2'",
           "UPDATE key_history SET algorithm = 'rsa-1024' WHERE key_id = 'k2'",
           "UPDATE key_history SET cert_serial = NULL WHERE key_id = 'k1'",
           "UPDATE key_history SET created_at = 0 WHERE key_id = 'k2'",
           // REPLACE deletes the old row without firing the delete trigger: the insert
           // trigger catches it.
           "INSERT OR REPLACE INTO key_history VALUES ('u1', 1, 'k9', 'ec-p256', 1, x'00', "
           "NULL, 1)",
           "REPLACE INTO key_history VALUES ('u2', 2, 'k1', 'ec-p256', 1, x'00', NULL, 1)",
           "INSERT INTO key_history VALUES ('u1', 4, 'k9', 'ec-p256', 1, x'00', NULL, 1)",
       }) {
    EXPECT_NE(thrown([&] { raw.exec(sql); }).find(kRefused), std::string::npos) << sql;
  }
  EXPECT_EQ(raw.query("SELECT count(*) FROM key_history"), "3");
  EXPECT_EQ(raw.query("SELECT group_concat(key_id || ':' || user_id || ':' || version) FROM "
                      "(SELECT * FROM key_history ORDER BY key_id)"),
            "k1:u1:1,k2:u1:2,k3:u2:1");

  // Master-key rotation may re-wrap: sealed_key and master_version can change.
  raw.exec(
      "UPDATE key_history SET sealed_key = x'c0ffee', master_version = 2 WHERE key_id = "
      "'k2'");
  auto h = s_->key_history("u1");
  ASSERT_TRUE(h.ok());
  ASSERT_EQ(h->size(), 2u);
  EXPECT_EQ((*h)[1].sealed_key, (Bytes{0xc0, 0xff, 0xee}));
  EXPECT_EQ((*h)[1].master_version, 2u);
}

// ---- approvals --------------------------------------------------------------------------

TEST_F(StoreTest, ApprovalRequestsListByStateUpdateAndRefuseASecondDecision) {
  auto s = open_store();
  ASSERT_TRUE(s);
  ASSERT_TRUE(s->insert_approval_request(request("r2", 8200)).ok());
  ASSERT_TRUE(s->insert_approval_request(request("r1", 8100)).ok());
  auto r3 = request("r3", 8300);
  r3.state = RequestState::kDenied;
  r3.decided_at = 8400;
  r3.result = "denied by bob";
  ASSERT_TRUE(s->insert_approval_request(r3).ok());

  auto dup = s->insert_approval_request(request("r1"));
  ASSERT_FALSE(dup.ok());
  EXPECT_EQ(dup.error().code, ErrorCode::kAlreadyExists);
  auto zero = request("r4");
  zero.required = 0;
  auto st = s->insert_approval_request(zero);
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.error().code, ErrorCode::kInvalidArgument);

  auto f = s->find_approval_request("r1");
  ASSERT_TRUE(f.ok() && f->has_value());
  EXPECT_EQ((*f)->operation, "revoke");
  EXPECT_EQ((*f)->params, R"({"user":"u1"})");
  EXPECT_EQ((*f)->requested_by, "alice");
  EXPECT_EQ((*f)->required, 2);
  EXPECT_EQ((*f)->state, RequestState::kPending);
  EXPECT_EQ((*f)->expires_at, 8100 + 86400);
  EXPECT_FALSE((*f)->decided_at.has_value());
  EXPECT_FALSE((*f)->result.has_value());

  auto ids = [&](std::optional<RequestState> state) {
    std::vector<std::string> out;
    auto list = s->approval_requests(state);
    EXPECT_TRUE(list.ok());
    if (list.ok())
      for (const auto& r : *list) out.push_back(r.id);
    return out;
  };
  EXPECT_EQ(ids(RequestState::kPending), (std::vector<std::string>{"r1", "r2"}));
  EXPECT_EQ(ids(RequestState::kDenied), (std::vector<std::string>{"r3"}));
  EXPECT_EQ(ids(RequestState::kExecuted), (std::vector<std::string>{}));
  EXPECT_EQ(ids(std::nullopt), (std::vector<std::string>{"r1", "r2", "r3"}));

  ASSERT_TRUE(s->add_approval({"r1", "bob", true, 8150}).ok());
  ASSERT_TRUE(s->add_approval({"r1", "carol", false, 8160}).ok());
  ASSERT_TRUE(s->add_approval({"r2", "bob", true, 8250}).ok());
  auto again = s->add_approval({"r1", "bob", false, 8170});
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.error().code, ErrorCode::kAlreadyExists);
  EXPECT_EQ(again.error().message, "administrator bob has already decided on request r1");
  auto unknown = s->add_approval({"r9", "bob", true, 8170});
  ASSERT_FALSE(unknown.ok());
  EXPECT_EQ(unknown.error().code, ErrorCode::kNotFound);
  EXPECT_EQ(unknown.error().message, "no approval request r9 is recorded");

  auto decisions = s->approvals("r1");
  ASSERT_TRUE(decisions.ok());
  ASSERT_EQ(decisions->size(), 2u);
  EXPECT_EQ((*decisions)[0].approver, "bob");
  EXPECT_TRUE((*decisions)[0].approve);
  EXPECT_EQ((*decisions)[0].at, 8150);
  EXPECT_EQ((*decisions)[1].approver, "carol");
  EXPECT_FALSE((*decisions)[1].approve);

  auto done = **f;
  done.state = RequestState::kExecuted;
  done.decided_at = 8500;
  done.result = "revoked 2 certificates";
  done.required = 5;  // not updatable
  ASSERT_TRUE(s->update_approval_request(done).ok());
  f = s->find_approval_request("r1");
  ASSERT_TRUE(f.ok() && f->has_value());
  EXPECT_EQ((*f)->state, RequestState::kExecuted);
  EXPECT_EQ((*f)->decided_at, std::optional<std::int64_t>(8500));
  EXPECT_EQ((*f)->result, std::optional<std::string>("revoked 2 certificates"));
  EXPECT_EQ((*f)->required, 2);
  EXPECT_EQ(ids(RequestState::kPending), (std::vector<std::string>{"r2"}));
  auto missing = s->update_approval_request(request("r9"));
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.error().code, ErrorCode::kNotFound);
}

// ---- audit ------------------------------------------------------------------------------

TEST_F(StoreTest, AuditAppendLastAndForEachInSeqOrder) {
  auto s = open_store();
  ASSERT_TRUE(s);
  auto last = s->last_audit();
  ASSERT_TRUE(last.ok());
  EXPECT_FALSE(last->has_value());
  for (int i = 1; i <= 50; ++i) ASSERT_TRUE(s->append_audit(audit(i)).ok()) << i;

  last = s->last_audit();
  ASSERT_TRUE(last.ok() && last->has_value());
  EXPECT_EQ((*last)->seq, 50);
  EXPECT_EQ((*last)->at, 9050);
  EXPECT_EQ((*last)->actor, "alice");
  EXPECT_EQ((*last)->action, "user.enable");
  EXPECT_EQ((*last)->record, R"({"seq":50})");
  EXPECT_EQ((*last)->prev_hash, Bytes(32, 49));
  EXPECT_EQ((*last)->hash, Bytes(32, 50));
  EXPECT_EQ((*last)->mac, Bytes(32, 0x80 + 50));

  std::int64_t expected = 1;
  auto st = s->for_each_audit([&](const AuditRecord& r) -> Status {
    EXPECT_EQ(r.seq, expected);
    EXPECT_EQ(r.hash, Bytes(32, static_cast<std::uint8_t>(expected)));
    ++expected;
    // The callback may read the store meanwhile.
    auto l = s->last_audit();
    if (!l.ok() || !l->has_value() || (*l)->seq != 50)
      return make_error(ErrorCode::kInternal, "last_audit inside the walk failed");
    return {};
  });
  ASSERT_TRUE(st.ok()) << st.error().message;
  EXPECT_EQ(expected, 51);

  int visited = 0;
  st = s->for_each_audit([&](const AuditRecord& r) -> Status {
    ++visited;
    if (r.seq == 3) return make_error(ErrorCode::kCrypto, "record 3 was edited");
    return {};
  });
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.error().message, "record 3 was edited");
  EXPECT_EQ(visited, 3);
}

TEST_F(StoreTest, AuditSeqGapOrRepeatIsRefused) {
  auto s = open_store();
  ASSERT_TRUE(s);
  auto first = s->append_audit(audit(2));
  ASSERT_FALSE(first.ok());
  EXPECT_EQ(first.error().code, ErrorCode::kFailedPrecondition);
  EXPECT_EQ(first.error().message,
            "appending audit record 2: the audit chain ends at record 0, so the next record "
            "must be 1");
  ASSERT_TRUE(s->append_audit(audit(1)).ok());
  ASSERT_TRUE(s->append_audit(audit(2)).ok());
  for (std::int64_t bad : {1, 2, 4, 0, -1}) {
    auto st = s->append_audit(audit(bad));
    ASSERT_FALSE(st.ok()) << bad;
    EXPECT_EQ(st.error().code, ErrorCode::kFailedPrecondition) << bad;
  }
  // A refused append inside a transaction leaves the outer transaction usable.
  ASSERT_TRUE(s->transaction([&]() -> Status {
                 EXPECT_FALSE(s->append_audit(audit(5)).ok());
                 return s->append_audit(audit(3));
               }).ok());
  auto last = s->last_audit();
  ASSERT_TRUE(last.ok() && last->has_value());
  EXPECT_EQ((*last)->seq, 3);
  RawDb raw(db_path());
  EXPECT_EQ(raw.query("SELECT group_concat(seq) FROM (SELECT seq FROM audit_log ORDER BY seq)"),
            "1,2,3");
}

TEST(StoreEnums, NamesRoundTrip) {
  for (auto k : {CertKind::kCa, CertKind::kAdmin, CertKind::kServer, CertKind::kSigning,
                 CertKind::kEncryption})
    EXPECT_EQ(parse_cert_kind(to_string(k)), k);
  for (auto u :
       {UserState::kEnabled, UserState::kActive, UserState::kRevoked, UserState::kRecovery})
    EXPECT_EQ(parse_user_state(to_string(u)), u);
  for (auto r : {RequestState::kPending, RequestState::kExecuted, RequestState::kDenied,
                 RequestState::kExpired, RequestState::kFailed})
    EXPECT_EQ(parse_request_state(to_string(r)), r);
  EXPECT_STREQ(to_string(CertKind::kEncryption), "encryption");
  EXPECT_STREQ(to_string(UserState::kRecovery), "recovery");
  EXPECT_STREQ(to_string(TokenPurpose::kRecover), "recover");
  EXPECT_STREQ(to_string(RequestState::kExpired), "expired");
  EXPECT_FALSE(parse_user_state("Active").has_value());
  EXPECT_FALSE(parse_request_state("").has_value());
  for (auto r :
       {AdminRole::kAdmin, AdminRole::kAuditor, AdminRole::kApprover, AdminRole::kRecovery})
    EXPECT_EQ(parse_admin_role(to_string(r)), r);
  EXPECT_STREQ(to_string(CertKind::kServer), "server");
  EXPECT_STREQ(to_string(AdminRole::kApprover), "approver");
  EXPECT_FALSE(parse_admin_role("Admin").has_value());
  EXPECT_FALSE(parse_cert_kind("").has_value());
}

}  // namespace
}  // namespace kmsd::store

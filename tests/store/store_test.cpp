#include "daemon/store/store.hpp"

#include <sqlite3.h>
#include <sys/stat.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
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
  for (const char* table : {"settings", "certificates", "administrators"}) {
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

TEST(StoreEnums, NamesRoundTrip) {
  for (auto k : {CertKind::kCa, CertKind::kAdmin, CertKind::kServer})
    EXPECT_EQ(parse_cert_kind(to_string(k)), k);
  for (auto r : {AdminRole::kAdmin, AdminRole::kAuditor, AdminRole::kApprover})
    EXPECT_EQ(parse_admin_role(to_string(r)), r);
  EXPECT_STREQ(to_string(CertKind::kServer), "server");
  EXPECT_STREQ(to_string(AdminRole::kApprover), "approver");
  EXPECT_FALSE(parse_admin_role("Admin").has_value());
  EXPECT_FALSE(parse_cert_kind("").has_value());
}

}  // namespace
}  // namespace kmsd::store

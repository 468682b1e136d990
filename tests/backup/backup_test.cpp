// daemon/backup in-process on a throw-away SoftHSM token with an initialized KMS: snapshots
// taken while another thread keeps writing are consistent (each passes the check, the audit
// chain included, and holds a prefix of the writes); a manifest signed by another key is
// refused; a validly signed backup of a store whose sealed token record was moved to another
// user, or whose audit record was edited, fails the deep check and names the row.
#include <openssl/cms.h>
#include <openssl/x509.h>
#include <sqlite3.h>

#include <atomic>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/clock.hpp"
#include "daemon/backup/backup.hpp"
#include "daemon/ca/issuer.hpp"
#include "daemon/lifecycle/enrollment_token.hpp"
#include "daemon/provision/initializer.hpp"
#include "tests/support/initialized_kms.hpp"

namespace kmsd {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using json = nlohmann::json;

class BackupTest : public testing::InitializedKmsTest {
 protected:
  void SetUp() override {
    InitializedKmsTest::SetUp();
    ASSERT_NO_FATAL_FAILURE(initialize_kms("/O=kmsd test/CN=Backup Test CA"));
    audit = std::make_unique<audit::AuditLog>(*store, *tok);
    service = std::make_unique<backup::BackupService>(*store, *tok, *audit, [this] {
      X509_up_ref(ca_cert.get());
      return ossl::X509Ptr(ca_cert.get());
    });
  }

  // A user with a sealed enrollment token, and an audit record, in one transaction.
  void add_user(const std::string& id) {
    auto st = store->transaction([&]() -> Status {
      store::UserRecord u;
      u.id = id;
      u.email = id + "@example.com";
      u.display_name = "User " + id;
      u.created_at = u.updated_at = unix_now();
      KMSD_TRY(store->insert_user(u));
      lifecycle::EnrollmentTokens tokens(*tok);
      KMSD_ASSIGN_OR_RETURN(auto issued, tokens.issue(id, clock_now()));
      store::EnrollmentTokenRecord t;
      t.user_id = id;
      t.sealed = issued.sealed.record;
      t.issued_at = unix_now();
      t.issued_by = "test";
      t.expires_at = issued.sealed.expires_at.time_since_epoch().count();
      KMSD_TRY(store->put_enrollment_token(t));
      return audit->append("test", "user.enable", {{"user", id}});
    });
    ASSERT_TRUE(st.ok()) << st.error().message;
  }

  static std::chrono::sys_seconds clock_now() {
    return std::chrono::sys_seconds(std::chrono::seconds(unix_now()));
  }

  backup::CheckReport check(const std::string& file) {
    auto rep = backup::check(file, *tok, dir());
    EXPECT_TRUE(rep.ok()) << rep.error().message;
    return rep.ok() ? std::move(*rep) : backup::CheckReport{};
  }

  void sql(const std::string& statement) {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(cfg.store.path.c_str(), &db), SQLITE_OK);
    char* err = nullptr;
    int rc = sqlite3_exec(db, statement.c_str(), nullptr, nullptr, &err);
    std::string why = err != nullptr ? err : "";
    sqlite3_free(err);
    sqlite3_close(db);
    ASSERT_EQ(rc, SQLITE_OK) << why;
  }

  std::unique_ptr<audit::AuditLog> audit;
  std::unique_ptr<backup::BackupService> service;
};

TEST_F(BackupTest, SnapshotsTakenWhileAnotherThreadWritesAreConsistent) {
  for (int i = 0; i < 5; ++i) add_user("seed" + std::to_string(i));
  std::atomic<bool> stop{false};
  std::atomic<int> written{0};
  std::thread writer([&] {
    for (int i = 0; !stop && i < 5000; ++i) {
      add_user("w" + std::to_string(i));
      ++written;
    }
  });
  while (written < 20) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  std::vector<std::pair<std::string, int>> backups;  // file, users written before it started
  for (int i = 0; i < 6; ++i) {
    const int before = written.load();
    auto made = service->create("tester");
    ASSERT_TRUE(made.ok()) << made.error().message;
    backups.emplace_back(std::move(made->file), before);
  }
  stop = true;
  writer.join();
  const int total = 5 + written.load();
  int previous = 0;
  for (const auto& [file, before] : backups) {
    auto rep = check(file);
    ASSERT_TRUE(rep.ok()) << ::testing::PrintToString(rep.problems);
    // Every user of the snapshot with its sealed token and its audit record: a prefix.
    EXPECT_EQ(rep.tokens_opened, rep.users);
    EXPECT_GE(static_cast<int>(rep.users), 5 + before);
    EXPECT_LE(static_cast<int>(rep.users), total);
    EXPECT_GE(static_cast<int>(rep.users), previous);
    previous = static_cast<int>(rep.users);
    EXPECT_EQ(rep.manifest["tables"]["users"].get<int>(), static_cast<int>(rep.users));
    std::cout << "snapshot: " << rep.users << " users (" << 5 + before
              << " written when it started), " << rep.audit_records << " audit records\n";
  }
  EXPECT_LT(previous, total + 1);
  // Each backup is audited (after its snapshot).
  auto v = audit->verify();
  ASSERT_TRUE(v.ok());
  EXPECT_TRUE(v->ok()) << v->problem;
}

TEST_F(BackupTest, AManifestSignedByAnotherKeyIsRefused) {
  add_user("alice");
  auto made = service->create("tester");
  ASSERT_TRUE(made.ok()) << made.error().message;
  // The same manifest and image, signed by a stranger's self-signed certificate.
  auto key = ca::generate_key(hsm::KeyType::kEcP256);
  ASSERT_TRUE(key.ok());
  ossl::X509Ptr cert(X509_new());
  X509_set_version(cert.get(), 2);
  ASN1_INTEGER_set(X509_get_serialNumber(cert.get()), 7);
  X509_NAME* name = X509_get_subject_name(cert.get());
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>("stranger"), -1, -1, 0);
  X509_set_issuer_name(cert.get(), name);
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), 0);
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), 3600);
  X509_set_pubkey(cert.get(), key->get());
  ASSERT_GT(X509_sign(cert.get(), key->get(), EVP_sha256()), 0);
  const std::string manifest = made->manifest.dump();
  ossl::BioPtr in(BIO_new_mem_buf(manifest.data(), static_cast<int>(manifest.size())));
  CMS_ContentInfo* cms = CMS_sign(cert.get(), key->get(), nullptr, in.get(), CMS_BINARY);
  ASSERT_NE(cms, nullptr);
  ossl::BioPtr out(BIO_new(BIO_s_mem()));
  ASSERT_EQ(i2d_CMS_bio(out.get(), cms), 1);
  CMS_ContentInfo_free(cms);
  char* p = nullptr;
  long n = BIO_get_mem_data(out.get(), &p);
  const std::string& f = made->file;
  std::size_t old_n = 0;
  for (int i = 8; i < 12; ++i) old_n = (old_n << 8) | static_cast<unsigned char>(f[i]);
  std::string forged = "KMSDBAK1";
  for (int i = 3; i >= 0; --i) forged += static_cast<char>((n >> (8 * i)) & 0xff);
  forged.append(p, static_cast<std::size_t>(n));
  forged += f.substr(12 + old_n);
  auto rep = check(forged);
  EXPECT_FALSE(rep.ok());
  ASSERT_EQ(rep.problems.size(), 1u);
  EXPECT_THAT(rep.problems[0], HasSubstr("signed by /CN=stranger, not by this token's CA key"));
  EXPECT_FALSE(rep.signature_ok);
  // The genuine one passes.
  EXPECT_TRUE(check(made->file).ok());
}

TEST_F(BackupTest, AMovedSealedTokenAndAnEditedAuditRecordFailTheDeepCheckByName) {
  add_user("alice");
  add_user("bob");
  // A validly signed backup of a store in which alice's sealed token was copied to bob's row
  // and one audit record was edited: the image and the signature are intact, the contents not.
  sql("UPDATE enrollment_tokens SET sealed = (SELECT sealed FROM enrollment_tokens WHERE "
      "user_id = 'alice') WHERE user_id = 'bob'");
  sql("UPDATE audit_log SET actor = 'mallory' WHERE seq = 2");
  auto made = service->create("tester");
  ASSERT_TRUE(made.ok()) << made.error().message;
  auto rep = check(made->file);
  EXPECT_TRUE(rep.signature_ok);
  EXPECT_TRUE(rep.image_ok);
  EXPECT_FALSE(rep.ok());
  EXPECT_EQ(rep.tokens_opened, 1u);
  EXPECT_THAT(::testing::PrintToString(rep.problems),
              HasSubstr("enrollment_tokens row of user bob: the sealed token does not open"));
  EXPECT_THAT(::testing::PrintToString(rep.problems), HasSubstr("audit chain at record 2"));
}

TEST_F(BackupTest, RestoreRefusesANonEmptyStoreAndRestoresIntoAMissingOne) {
  add_user("alice");
  auto made = service->create("tester");
  ASSERT_TRUE(made.ok()) << made.error().message;
  auto refused = backup::restore(made->file, *tok, cfg.store.path, "op");
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().code, ErrorCode::kAlreadyExists);
  const fs::path target = dir() / "restored" / "kms.db";
  fs::create_directories(target.parent_path());
  auto done = backup::restore(made->file, *tok, target, "op");
  ASSERT_TRUE(done.ok()) << done.error().message;
  EXPECT_TRUE(done->restored) << ::testing::PrintToString(done->report.problems);
  EXPECT_FALSE(fs::exists(target.string() + "-wal"));
  auto restored = store::Store::open(target);
  ASSERT_TRUE(restored.ok());
  auto alice = (*restored)->find_user("alice");
  ASSERT_TRUE(alice.ok());
  EXPECT_TRUE(alice->has_value());
  audit::AuditLog log(**restored, *tok);
  auto v = log.verify();
  ASSERT_TRUE(v.ok());
  EXPECT_TRUE(v->ok()) << v->problem;
  auto last = (*restored)->last_audit();
  ASSERT_TRUE(last.ok() && last->has_value());
  EXPECT_EQ((*last)->action, "backup.restore");
}

}  // namespace
}  // namespace kmsd

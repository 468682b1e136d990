// The audit chain: records verify; editing, deleting or reordering one record, or cutting
// the end of the chain, is detected and named; an append that cannot be MAC'd on the token
// rolls back the change it describes.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sqlite3.h>

#include "daemon/audit/audit_log.hpp"
#include "tests/support/logged_in_token.hpp"

namespace kmsd {
namespace {

using ::testing::HasSubstr;
using json = nlohmann::json;

class AuditTest : public testing::TokenSandbox {
 protected:
  void SetUp() override {
    TokenSandbox::SetUp();
    token_ = testing::open_logged_in_token(token());
    ASSERT_NE(token_, nullptr);
    ASSERT_TRUE(token_->generate_audit_key().ok());
    db_path_ = dir() / "kmsd.db";
    store_ = std::move(store::Store::open(db_path_).value());
    log_ = std::make_unique<audit::AuditLog>(*store_, *token_);
    for (int i = 1; i <= 5; ++i)
      ASSERT_TRUE(log_->append("alice", "user.enable", {{"user", "u" + std::to_string(i)}}).ok());
  }

  // Raw SQL on the database, as an attacker with file access would do.
  void sql(const std::string& statement) {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(db_path_.c_str(), &db), SQLITE_OK);
    char* err = nullptr;
    int rc = sqlite3_exec(db, statement.c_str(), nullptr, nullptr, &err);
    std::string msg = err ? err : "";
    sqlite3_free(err);
    sqlite3_close(db);
    ASSERT_EQ(rc, SQLITE_OK) << msg;
  }

  audit::VerifyReport verify() {
    auto r = log_->verify();
    EXPECT_TRUE(r.ok()) << (r.ok() ? "" : r.error().message);
    return r.ok() ? *r : audit::VerifyReport{};
  }

  std::unique_ptr<hsm::Token> token_;
  std::filesystem::path db_path_;
  std::unique_ptr<store::Store> store_;
  std::unique_ptr<audit::AuditLog> log_;
};

TEST_F(AuditTest, AnUntouchedChainVerifies) {
  auto rep = verify();
  EXPECT_TRUE(rep.ok()) << rep.problem;
  EXPECT_EQ(rep.records, 5u);
  std::vector<json> exported;
  ASSERT_TRUE(log_->export_records([&](const json& j) {
                    exported.push_back(j);
                    return Status{};
                  })
                  .ok());
  ASSERT_EQ(exported.size(), 5u);
  EXPECT_EQ(exported[2]["seq"], 3);
  EXPECT_EQ(exported[2]["details"]["user"], "u3");
  EXPECT_EQ(exported[2]["hash"].get<std::string>().size(), 64u);
}

TEST_F(AuditTest, EditingARecordsContentIsNamed) {
  sql("UPDATE audit_log SET record = replace(record, '\"u3\"', '\"mallory\"') WHERE seq = 3");
  auto rep = verify();
  EXPECT_EQ(rep.first_bad, 3);
  EXPECT_THAT(rep.problem, HasSubstr("record 3 was edited"));
}

TEST_F(AuditTest, EditingARecordsColumnIsNamed) {
  sql("UPDATE audit_log SET actor = 'mallory' WHERE seq = 2");
  auto rep = verify();
  EXPECT_EQ(rep.first_bad, 2);
  EXPECT_THAT(rep.problem, HasSubstr("edited"));
}

TEST_F(AuditTest, DeletingARecordIsNamed) {
  sql("DELETE FROM audit_log WHERE seq = 3");
  auto rep = verify();
  EXPECT_EQ(rep.first_bad, 4);
  EXPECT_THAT(rep.problem, HasSubstr("record 3 was deleted"));
}

TEST_F(AuditTest, ReorderingRecordsIsNamed) {
  // Swap the contents of records 2 and 3, keeping the sequence numbers in place.
  sql("CREATE TEMP TABLE swap AS SELECT * FROM audit_log WHERE seq IN (2, 3);"
      "UPDATE audit_log SET (at, actor, action, record, prev_hash, hash, mac) = "
      "  (SELECT at, actor, action, record, prev_hash, hash, mac FROM swap "
      "   WHERE swap.seq = 5 - audit_log.seq) WHERE seq IN (2, 3);");
  auto rep = verify();
  EXPECT_EQ(rep.first_bad, 2);
  EXPECT_FALSE(rep.problem.empty());
}

TEST_F(AuditTest, DeletingTheNewestRecordsIsDetected) {
  sql("DELETE FROM audit_log WHERE seq >= 4");
  auto rep = verify();
  ASSERT_TRUE(rep.first_bad.has_value());
  EXPECT_EQ(*rep.first_bad, 4);
  EXPECT_THAT(rep.problem, HasSubstr("newest records were deleted"));
}

TEST_F(AuditTest, AChainRewrittenWithoutTheTokenIsDetected) {
  // The attacker edits record 2 and recomputes every hash after it, but cannot make MACs.
  std::vector<store::AuditRecord> recs;
  ASSERT_TRUE(store_
                  ->for_each_audit([&](const store::AuditRecord& r) {
                    recs.push_back(r);
                    return Status{};
                  })
                  .ok());
  recs[1].record = json::parse(recs[1].record).dump();
  auto forged = json::parse(recs[1].record);
  forged["details"]["user"] = "mallory";
  recs[1].record = forged.dump();
  ossl::Bytes prev = recs[0].hash;
  for (std::size_t i = 1; i < recs.size(); ++i) {
    ossl::Bytes buf = prev;
    buf.insert(buf.end(), recs[i].record.begin(), recs[i].record.end());
    recs[i].prev_hash = prev;
    recs[i].hash = ossl::sha256(buf);
    prev = recs[i].hash;
    sql("UPDATE audit_log SET record = '" + recs[i].record + "', prev_hash = x'" +
        ossl::hex(recs[i].prev_hash) + "', hash = x'" + ossl::hex(recs[i].hash) +
        "' WHERE seq = " + std::to_string(recs[i].seq));
  }
  auto rep = verify();
  EXPECT_EQ(rep.first_bad, 2);
  EXPECT_THAT(rep.problem, HasSubstr("MAC"));
}

TEST_F(AuditTest, AnActionWhoseRecordCannotBeWrittenDoesNotHappen) {
  token_->logout();  // the audit key can no longer MAC
  auto st = store_->transaction([&]() -> Status {
    KMSD_TRY(store_->put_setting("changed-by-action", "yes"));
    return log_->append("alice", "settings.change", json::object());
  });
  ASSERT_FALSE(st.ok());
  auto setting = store_->get_setting("changed-by-action");
  ASSERT_TRUE(setting.ok());
  EXPECT_FALSE(setting->has_value());
  ASSERT_TRUE(token_->login(SecretBytes::from_string(testing::kUserPin)).ok());
  EXPECT_TRUE(verify().ok());
}

TEST_F(AuditTest, DetailsMustBeAnObject) {
  EXPECT_FALSE(log_->append("alice", "x", json::array()).ok());
}

}  // namespace
}  // namespace kmsd

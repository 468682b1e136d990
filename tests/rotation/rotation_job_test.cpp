// The rotation job (daemon/rotation) against a real store and a throw-away SoftHSM2 token:
// escrowed keys (format 1 and 2) and enrollment tokens are all moved to the new master key,
// the job resumes from its persisted cursor in a new instance (as after a crash), retire is
// refused while anything needs the old key and destroys it afterwards; the escrow helpers
// check the row's master version against the blob.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <map>
#include <thread>

#include "common/clock.hpp"
#include "daemon/approvals/approvals.hpp"
#include "daemon/audit/audit_log.hpp"
#include "daemon/enroll/enrollment.hpp"
#include "daemon/lifecycle/enrollment_token.hpp"
#include "daemon/provision/initializer.hpp"
#include "daemon/rotation/rotation.hpp"
#include "daemon/store/store.hpp"
#include "hsm/envelope.hpp"
#include "hsm/token.hpp"
#include "tests/support/sandbox.hpp"

namespace kmsd::rotation {
namespace {

using json = nlohmann::json;
using namespace std::chrono_literals;
using kmsd::testing::kSoftHsmModule;
using kmsd::testing::kUserPin;

std::span<const std::uint8_t> bytes(const std::string& s) {
  return {reinterpret_cast<const std::uint8_t*>(s.data()), s.size()};
}

class RotationJobTest : public kmsd::testing::TokenSandbox {
 protected:
  void SetUp() override {
    TokenSandbox::SetUp();
    hsm::TokenOptions o;
    o.module_path = kSoftHsmModule;
    o.token_uri = token().uri();
    auto t = hsm::Token::open(o);
    ASSERT_TRUE(t.ok()) << t.error().message;
    token_ = std::move(t).value();
    ASSERT_TRUE(token_->login(SecretBytes::from_string(kUserPin)).ok());
    ASSERT_TRUE(token_->generate_master_key(1).ok());
    ASSERT_TRUE(token_->generate_audit_key().ok());
    auto s = store::Store::open(dir() / "kmsd.db");
    ASSERT_TRUE(s.ok()) << s.error().message;
    store_ = std::move(s).value();
    ASSERT_TRUE(store_->put_setting(provision::kSettingMasterVersion, "1").ok());
    audit_ = std::make_unique<audit::AuditLog>(*store_, *token_);
    approvals_ = std::make_unique<approvals::Approvals>(*store_, *audit_);
  }
  void TearDown() override {
    approvals_.reset();
    audit_.reset();
    store_.reset();
    token_.reset();
    TokenSandbox::TearDown();
  }

  // User ID with one escrowed key (format 1 when OLD) and an enrollment token.
  void add_user(const std::string& id, bool old) {
    store::UserRecord u;
    u.id = id;
    u.email = id + "@example.com";
    u.display_name = id;
    ASSERT_TRUE(store_->insert_user(u).ok());
    store::KeyHistoryRecord k;
    k.user_id = id;
    k.version = 1;
    k.key_id = "key-" + id;
    k.algorithm = "ec-p256";
    k.master_version = 1;
    const std::string pt = "pkcs8 of " + id;
    auto blob = old ? token_->seal_format1_for_test(
                          bytes(pt), bytes(enroll::escrow_aad(id, k.key_id, 1, 1)), 1)
                    : token_->seal(bytes(pt), bytes(enroll::escrow_aad(id, k.key_id, 1)), 1);
    ASSERT_TRUE(blob.ok()) << blob.error().message;
    k.sealed_key = *blob;
    ASSERT_TRUE(store_->append_key_history(k).ok());
    lifecycle::EnrollmentTokens tokens(*token_);
    auto issued = tokens.issue(id, std::chrono::sys_seconds(std::chrono::seconds(unix_now())));
    ASSERT_TRUE(issued.ok()) << issued.error().message;
    tokens_[id] = std::string(issued->text.view());
    store::EnrollmentTokenRecord t;
    t.user_id = id;
    t.sealed = issued->sealed.record;
    t.issued_at = unix_now();
    t.issued_by = "test";
    t.expires_at = issued->sealed.expires_at.time_since_epoch().count();
    ASSERT_TRUE(store_->put_enrollment_token(t).ok());
  }

  json wait_finished(Rotation& r) {
    json s;
    for (int i = 0; i < 600; ++i) {
      auto st = r.status();
      EXPECT_TRUE(st.ok());
      if (st.ok()) s = *st;
      if (s.value("state", "") == "finished") break;
      std::this_thread::sleep_for(20ms);
    }
    return s;
  }

  // Every user's escrowed key and token open, whichever version protects them now.
  void expect_all_open_under_either() {
    lifecycle::EnrollmentTokens tokens(*token_);
    for (const auto& [id, text] : tokens_) {
      auto h = store_->key_history(id);
      ASSERT_TRUE(h.ok());
      auto der = enroll::open_escrowed(*token_, h->front());
      ASSERT_TRUE(der.ok()) << id << ": " << der.error().message;
      auto t = store_->find_enrollment_token(id);
      ASSERT_TRUE(t.ok() && t->has_value());
      lifecycle::SealedToken sealed{(*t)->sealed, {}};
      auto shown = tokens.reveal(sealed, id);
      ASSERT_TRUE(shown.ok()) << id << ": " << shown.error().message;
      EXPECT_EQ(std::string(shown->view()), text);
    }
  }

  void expect_all_open_under(std::uint32_t v, int users) {
    lifecycle::EnrollmentTokens tokens(*token_);
    for (int i = 0; i < users; ++i) {
      const std::string id = "u" + std::to_string(10 + i);
      auto h = store_->key_history(id);
      ASSERT_TRUE(h.ok());
      ASSERT_EQ(h->size(), 1u);
      EXPECT_EQ(h->front().master_version, v) << id;
      auto p = hsm::envelope::parse(h->front().sealed_key);
      ASSERT_TRUE(p.has_value());
      EXPECT_EQ(p->version, hsm::envelope::kVersion) << id;
      auto der = enroll::open_escrowed(*token_, h->front());
      ASSERT_TRUE(der.ok()) << id << ": " << der.error().message;
      EXPECT_EQ(std::string(der->view()), "pkcs8 of " + id);
      auto t = store_->find_enrollment_token(id);
      ASSERT_TRUE(t.ok() && t->has_value());
      EXPECT_EQ(lifecycle::EnrollmentTokens::master_version_of((*t)->sealed), v) << id;
      lifecycle::SealedToken sealed{(*t)->sealed, {}};
      auto shown = tokens.reveal(sealed, id);
      ASSERT_TRUE(shown.ok()) << id << ": " << shown.error().message;
      EXPECT_EQ(std::string(shown->view()), tokens_[id]);
    }
  }

  std::unique_ptr<hsm::Token> token_;
  std::unique_ptr<store::Store> store_;
  std::unique_ptr<audit::AuditLog> audit_;
  std::unique_ptr<approvals::Approvals> approvals_;
  std::map<std::string, std::string> tokens_;
};

TEST_F(RotationJobTest, EscrowHelpersCheckTheRowsMasterVersionAndMoveBothFormats) {
  add_user("u10", true);
  add_user("u11", false);
  ASSERT_TRUE(token_->generate_master_key(2).ok());
  for (const char* id : {"u10", "u11"}) {
    auto rec = store_->key_history(id).value().front();
    ASSERT_TRUE(enroll::open_escrowed(*token_, rec).ok()) << id;
    // The column says another version than the blob: refused, uniformly.
    auto wrong = rec;
    wrong.master_version = 2;
    auto r = enroll::open_escrowed(*token_, wrong);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code, ErrorCode::kCrypto);
    auto moved = enroll::rewrap_escrowed(*token_, rec, 2);
    ASSERT_TRUE(moved.ok()) << moved.error().message;
    auto changed = store_->rewrap_key_history(id, 1, rec.sealed_key, 2, *moved);
    ASSERT_TRUE(changed.ok());
    EXPECT_TRUE(*changed);
    // Compare-and-swap: the old blob is no longer there, so a second swap changes nothing.
    auto again = store_->rewrap_key_history(id, 1, rec.sealed_key, 2, *moved);
    ASSERT_TRUE(again.ok());
    EXPECT_FALSE(*again);
    auto now = store_->key_history(id).value().front();
    EXPECT_EQ(now.master_version, 2u);
    auto der = enroll::open_escrowed(*token_, now);
    ASSERT_TRUE(der.ok()) << der.error().message;
    EXPECT_EQ(std::string(der->view()), std::string("pkcs8 of ") + id);
  }
  auto counts = store_->key_history_master_versions();
  ASSERT_TRUE(counts.ok());
  EXPECT_EQ(*counts, (std::vector<std::pair<std::uint32_t, std::size_t>>{{2, 2}}));
}

TEST_F(RotationJobTest, RotatesEverythingResumesInANewInstanceAndRetiresTheOldKey) {
  constexpr int kUsers = 13;
  for (int i = 0; i < kUsers; ++i) add_user("u" + std::to_string(10 + i), i % 3 == 0);
  bool serving = true;
  Pace pace;
  pace.batch = 2;
  pace.pause = 150ms;
  {
    Rotation first(*store_, *token_, *audit_, *approvals_, [&] { return serving; });
    // Nothing to retire: v1 is current.
    auto refused = first.check_retire(1);
    ASSERT_FALSE(refused.ok());
    EXPECT_EQ(refused.error().code, ErrorCode::kFailedPrecondition);
    first.start();
    auto out = first.request_rotate(pace, "alice");
    ASSERT_TRUE(out.ok()) << out.error().message;
    EXPECT_EQ(out->state, store::RequestState::kExecuted) << out->message;
    EXPECT_EQ(out->result.value("target", 0), 2);
    EXPECT_EQ(store_->get_setting(provision::kSettingMasterVersion).value(), "2");
    // A few batches, then the job stops in the middle (a crash loses no more than this).
    json s;
    for (int i = 0; i < 200; ++i) {
      s = first.status().value();
      if (s.value("done", 0) >= 4) break;
      std::this_thread::sleep_for(20ms);
    }
    first.stop();
    s = first.status().value();
    EXPECT_EQ(s.value("state", ""), "running");
    EXPECT_GE(s.value("done", 0), 4);
    EXPECT_LT(s.value("done", 0), 2 * kUsers);
    EXPECT_EQ(s.value("total", 0), 2 * kUsers);
    // Retire refused while it runs, naming the job.
    auto busy = first.check_retire(1);
    ASSERT_FALSE(busy.ok());
    EXPECT_THAT(busy.error().message, ::testing::HasSubstr("still running"));
    // Reads work with either version meanwhile.
    expect_all_open_under_either();
  }
  {
    serving = false;  // sealed: the job waits
    Rotation second(*store_, *token_, *audit_, *approvals_, [&] { return serving; });
    second.start();
    std::this_thread::sleep_for(300ms);
    EXPECT_EQ(second.status().value().value("state", ""), "running");
    serving = true;
    json s = wait_finished(second);
    ASSERT_EQ(s.value("state", ""), "finished") << s.dump();
    EXPECT_EQ(s.value("remaining", -1), 0);
    EXPECT_EQ(s.value("done", 0), 2 * kUsers);
    expect_all_open_under(2, kUsers);

    auto current = second.check_retire(2);
    ASSERT_FALSE(current.ok());
    EXPECT_EQ(current.error().code, ErrorCode::kFailedPrecondition);
    auto out = second.request_retire(1, "alice");
    ASSERT_TRUE(out.ok()) << out.error().message;
    EXPECT_EQ(out->state, store::RequestState::kExecuted) << out->message;
    EXPECT_EQ(token_->master_key_versions().value(), std::vector<std::uint32_t>{2});
    expect_all_open_under(2, kUsers);
    auto gone = second.check_retire(1);
    ASSERT_FALSE(gone.ok());
    EXPECT_EQ(gone.error().code, ErrorCode::kNotFound);
  }
  std::vector<std::string> actions;
  ASSERT_TRUE(store_
                  ->for_each_audit([&](const store::AuditRecord& r) {
                    actions.push_back(r.action);
                    return Status{};
                  })
                  .ok());
  EXPECT_THAT(actions,
              ::testing::IsSupersetOf({"master_key.rotate.started", "master_key.rotate.resumed",
                                       "master_key.rotate.finished", "master_key.retire"}));
  auto verify = audit_->verify();
  ASSERT_TRUE(verify.ok());
  EXPECT_TRUE(verify->ok()) << verify->problem;
}

TEST_F(RotationJobTest, ATokenThatStopsServingPausesTheJobWithoutSkippingRecords) {
  constexpr int kUsers = 6;
  for (int i = 0; i < kUsers; ++i) add_user("u" + std::to_string(10 + i), false);
  Rotation r(*store_, *token_, *audit_, *approvals_, [] { return true; });
  r.start();
  Pace pace;
  pace.batch = 1;
  pace.pause = 100ms;
  auto out = r.request_rotate(pace, "alice");
  ASSERT_TRUE(out.ok()) << out.error().message;
  json s;
  for (int i = 0; i < 200; ++i) {
    s = r.status().value();
    if (s.value("done", 0) >= 2) break;
    std::this_thread::sleep_for(20ms);
  }
  // The token forgets its login (as when its PIN is refused at a re-login): the job pauses.
  token_->logout();
  for (int i = 0; i < 200; ++i) {
    s = r.status().value();
    if (s.value("state", "") == "paused") break;
    std::this_thread::sleep_for(20ms);
  }
  ASSERT_EQ(s.value("state", ""), "paused") << s.dump();
  EXPECT_FALSE(s.value("paused_because", "").empty());
  const int done_while_out = s.value("done", 0);
  std::this_thread::sleep_for(400ms);
  EXPECT_EQ(r.status().value().value("done", 0), done_while_out);
  // Back: it goes on, and nothing was skipped as unreadable.
  ASSERT_TRUE(token_->login(SecretBytes::from_string(kUserPin)).ok());
  s = wait_finished(r);
  ASSERT_EQ(s.value("state", ""), "finished") << s.dump();
  EXPECT_EQ(s.value("remaining", -1), 0);
  EXPECT_EQ(s.value("skipped", -1), 0);
  expect_all_open_under(2, kUsers);
}

// Both phases: a record whose data key does not unwrap (here: a byte of the protected data
// key flipped) is skipped, counted and left as it is; every other record is moved.
TEST_F(RotationJobTest, RecordsThatDoNotOpenAreSkippedCountedAndLeftAsTheyAre) {
  constexpr int kUsers = 5;
  for (int i = 0; i < kUsers; ++i) add_user("u" + std::to_string(10 + i), false);
  auto key = store_->key_history("u11");
  ASSERT_TRUE(key.ok() && key->size() == 1u);
  store::Bytes bad_key = key->front().sealed_key;
  bad_key[hsm::envelope::kFixedHeaderLen] ^= 0x01;
  ASSERT_TRUE(store_->rewrap_key_history("u11", 1, key->front().sealed_key, 1, bad_key).value());
  auto tok = store_->find_enrollment_token("u13");
  ASSERT_TRUE(tok.ok() && tok->has_value());
  store::Bytes bad_token = (*tok)->sealed;
  bad_token[lifecycle::kSealedTokenHeaderLen + hsm::envelope::kFixedHeaderLen] ^= 0x01;
  ASSERT_TRUE(store_->replace_token_sealed("u13", (*tok)->sealed, bad_token).value());

  Rotation r(*store_, *token_, *audit_, *approvals_, [] { return true; });
  r.start();
  Pace pace;
  pace.batch = 2;  // the bad records fall in the middle of a batch
  auto out = r.request_rotate(pace, "alice");
  ASSERT_TRUE(out.ok()) << out.error().message;
  json s = wait_finished(r);
  ASSERT_EQ(s.value("state", ""), "finished") << s.dump();
  EXPECT_EQ(s.value("done", -1), 2 * kUsers - 2) << s.dump();
  EXPECT_EQ(s.value("skipped", -1), 2) << s.dump();
  EXPECT_EQ(s.value("remaining", -1), 2) << s.dump();
  EXPECT_EQ(s.value("pass", 0), 1) << s.dump();  // nothing another pass could move

  // Left as they were, under v1; everything else under v2.
  auto kept_key = store_->key_history("u11");
  ASSERT_TRUE(kept_key.ok());
  EXPECT_EQ(kept_key->front().sealed_key, bad_key);
  EXPECT_EQ(kept_key->front().master_version, 1u);
  auto kept_token = store_->find_enrollment_token("u13");
  ASSERT_TRUE(kept_token.ok() && kept_token->has_value());
  EXPECT_EQ((*kept_token)->sealed, bad_token);
  for (int i = 0; i < kUsers; ++i) {
    const std::string id = "u" + std::to_string(10 + i);
    auto h = store_->key_history(id);
    ASSERT_TRUE(h.ok());
    EXPECT_EQ(h->front().master_version, id == "u11" ? 1u : 2u) << id;
    auto t = store_->find_enrollment_token(id);
    ASSERT_TRUE(t.ok() && t->has_value());
    EXPECT_EQ(lifecycle::EnrollmentTokens::master_version_of((*t)->sealed), id == "u13" ? 1u : 2u)
        << id;
  }
  // And v1 still protects them: retire is refused, naming both.
  auto refused = r.check_retire(1);
  ASSERT_FALSE(refused.ok());
  EXPECT_THAT(refused.error().message,
              ::testing::HasSubstr("still protects 1 escrowed key(s) and 1 enrollment token(s)"));
}

TEST_F(RotationJobTest, RetireIsRefusedNamingWhatStillNeedsTheKey) {
  add_user("u10", false);
  ASSERT_TRUE(token_->generate_master_key(2).ok());
  ASSERT_TRUE(store_->put_setting(provision::kSettingMasterVersion, "2").ok());
  Rotation r(*store_, *token_, *audit_, *approvals_, [] { return true; });
  auto refused = r.request_retire(1, "alice");
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().code, ErrorCode::kFailedPrecondition);
  EXPECT_THAT(refused.error().message,
              ::testing::HasSubstr("still protects 1 escrowed key(s) and 1 enrollment token(s)"));
  EXPECT_EQ(token_->master_key_versions().value(), (std::vector<std::uint32_t>{1, 2}));
}

}  // namespace
}  // namespace kmsd::rotation

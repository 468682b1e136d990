// k-of-n approvals: nothing runs with k-1, it runs at k, once; nobody approves twice; denial
// and expiry end a request; a failing operation leaves no partial change; every step audited.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "daemon/approvals/approvals.hpp"
#include "tests/support/logged_in_token.hpp"

namespace kmsd {
namespace {

using ::testing::HasSubstr;
using json = nlohmann::json;
using store::RequestState;

class ApprovalsTest : public testing::TokenSandbox {
 protected:
  void SetUp() override {
    TokenSandbox::SetUp();
    token_ = testing::open_logged_in_token(token());
    ASSERT_NE(token_, nullptr);
    ASSERT_TRUE(token_->generate_audit_key().ok());
    store_ = std::move(store::Store::open(dir() / "kmsd.db").value());
    audit_ = std::make_unique<audit::AuditLog>(*store_, *token_);
    approvals_ = std::make_unique<approvals::Approvals>(*store_, *audit_);
    approvals_->register_operation(
        "revoke", [this](const json& p, const std::string& by) -> Result<json> {
          ++runs_;
          KMSD_TRY(store_->put_setting("revoked:" + p.at("user").get<std::string>(), by));
          return json{{"revoked", p.at("user")}};
        });
    approvals_->register_operation(
        "explode", [this](const json&, const std::string&) -> Result<json> {
          KMSD_TRY(store_->put_setting("partial", "change"));
          return make_error(ErrorCode::kFailedPrecondition, "the user is not active");
        });
    approvals::Rules rules;
    rules.required = {{"revoke", 3}, {"explode", 2}};
    approvals_->set_rules(rules);
  }

  std::optional<std::string> setting(const std::string& key) {
    auto r = store_->get_setting(key);
    return r.ok() ? *r : std::nullopt;
  }

  std::unique_ptr<hsm::Token> token_;
  std::unique_ptr<store::Store> store_;
  std::unique_ptr<audit::AuditLog> audit_;
  std::unique_ptr<approvals::Approvals> approvals_;
  int runs_ = 0;
};

TEST_F(ApprovalsTest, OperationNeedingOneAdministratorRunsAtOnce) {
  approvals_->set_rules({});
  auto out = approvals_->submit("revoke", {{"user", "bob"}}, "alice");
  ASSERT_TRUE(out.ok()) << out.error().message;
  EXPECT_EQ(out->state, RequestState::kExecuted);
  EXPECT_TRUE(out->request_id.empty());
  EXPECT_EQ(runs_, 1);
  EXPECT_EQ(setting("revoked:bob"), "alice");
}

TEST_F(ApprovalsTest, DoesNotRunWithKMinusOneAndRunsOnceAtK) {
  auto out = approvals_->submit("revoke", {{"user", "bob"}}, "alice");
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(out->state, RequestState::kPending);
  EXPECT_EQ(out->approvals, 1);  // the requester counts
  EXPECT_THAT(out->message, HasSubstr("2 more approval"));
  const std::string id = out->request_id;

  auto second = approvals_->approve(id, "carol");
  ASSERT_TRUE(second.ok());
  EXPECT_EQ(second->state, RequestState::kPending);
  EXPECT_EQ(runs_, 0);  // k-1 approvals: nothing happened
  EXPECT_FALSE(setting("revoked:bob").has_value());

  auto third = approvals_->approve(id, "dave");
  ASSERT_TRUE(third.ok()) << third.error().message;
  EXPECT_EQ(third->state, RequestState::kExecuted);
  EXPECT_EQ(runs_, 1);
  EXPECT_EQ(third->result["revoked"], "bob");
  EXPECT_EQ(setting("revoked:bob"), "alice");  // runs on behalf of the requester

  auto late = approvals_->approve(id, "erin");
  ASSERT_FALSE(late.ok());
  EXPECT_THAT(late.error().message, HasSubstr("is executed"));
  EXPECT_EQ(runs_, 1);
}

TEST_F(ApprovalsTest, NoAdministratorApprovesTwice) {
  auto out = approvals_->submit("revoke", {{"user", "bob"}}, "alice");
  ASSERT_TRUE(out.ok());
  auto self = approvals_->approve(out->request_id, "alice");
  ASSERT_FALSE(self.ok());
  EXPECT_EQ(self.error().code, ErrorCode::kAlreadyExists);
  EXPECT_THAT(self.error().message, HasSubstr("already approved"));
  ASSERT_TRUE(approvals_->approve(out->request_id, "carol").ok());
  auto again = approvals_->approve(out->request_id, "carol");
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.error().code, ErrorCode::kAlreadyExists);
  EXPECT_EQ(runs_, 0);
}

TEST_F(ApprovalsTest, OneDenialEndsTheRequest) {
  auto out = approvals_->submit("revoke", {{"user", "bob"}}, "alice");
  ASSERT_TRUE(out.ok());
  ASSERT_TRUE(approvals_->deny(out->request_id, "carol").ok());
  auto after = approvals_->approve(out->request_id, "dave");
  ASSERT_FALSE(after.ok());
  EXPECT_THAT(after.error().message, HasSubstr("denied"));
  EXPECT_EQ(runs_, 0);
}

TEST_F(ApprovalsTest, ExpiredRequestsCannotBeApproved) {
  approvals::Rules rules;
  rules.required = {{"revoke", 2}};
  rules.ttl = std::chrono::seconds(0);
  approvals_->set_rules(rules);
  auto out = approvals_->submit("revoke", {{"user", "bob"}}, "alice");
  ASSERT_TRUE(out.ok());
  auto late = approvals_->approve(out->request_id, "carol");
  ASSERT_FALSE(late.ok());
  EXPECT_THAT(late.error().message, HasSubstr("expired"));
  auto expired = approvals_->list(RequestState::kExpired);
  ASSERT_TRUE(expired.ok());
  EXPECT_EQ(expired->size(), 1u);
  EXPECT_EQ(runs_, 0);
}

TEST_F(ApprovalsTest, AFailingOperationLeavesNoPartialChange) {
  auto out = approvals_->submit("explode", json::object(), "alice");
  ASSERT_TRUE(out.ok());
  auto done = approvals_->approve(out->request_id, "carol");
  ASSERT_TRUE(done.ok()) << done.error().message;
  EXPECT_EQ(done->state, RequestState::kFailed);
  EXPECT_THAT(done->message, HasSubstr("the user is not active"));
  EXPECT_FALSE(setting("partial").has_value());
  auto failed = approvals_->list(RequestState::kFailed);
  ASSERT_TRUE(failed.ok());
  ASSERT_EQ(failed->size(), 1u);
}

TEST_F(ApprovalsTest, EveryStepIsAuditedAndTheChainVerifies) {
  auto out = approvals_->submit("revoke", {{"user", "bob"}}, "alice");
  ASSERT_TRUE(approvals_->approve(out->request_id, "carol").ok());
  ASSERT_TRUE(approvals_->approve(out->request_id, "dave").ok());
  std::vector<std::string> actions;
  ASSERT_TRUE(audit_
                  ->export_records([&](const json& j) {
                    actions.push_back(j["actor"].get<std::string>() + ":" +
                                      j["action"].get<std::string>());
                    return Status{};
                  })
                  .ok());
  EXPECT_EQ(actions, (std::vector<std::string>{"alice:request.create", "carol:request.approve",
                                               "dave:request.approve", "dave:request.execute"}));
  auto rep = audit_->verify();
  ASSERT_TRUE(rep.ok());
  EXPECT_TRUE(rep->ok()) << rep->problem;
}

TEST_F(ApprovalsTest, UnknownOperationsAreRefused) {
  auto out = approvals_->submit("format-disk", json::object(), "alice");
  ASSERT_FALSE(out.ok());
  EXPECT_THAT(out.error().message, HasSubstr("unknown operation"));
}

}  // namespace
}  // namespace kmsd

// "Change approval policy" is gated: the rules in force live in the store; a configuration
// that asks for other rules waits for k administrators (the operator is not one of them),
// unless the rules in force need one for policy_change. Real token, store and audit chain.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "daemon/approvals/policy_gate.hpp"
#include "tests/support/logged_in_token.hpp"

namespace kmsd {
namespace {

using ::testing::HasSubstr;
using json = nlohmann::json;
using approvals::GateOutcome;
using approvals::Rules;
using store::RequestState;

Rules rules(std::map<std::string, int> required,
            std::chrono::seconds ttl = std::chrono::hours(72)) {
  Rules r;
  r.required = std::move(required);
  r.ttl = ttl;
  return r;
}

class PolicyGateTest : public testing::TokenSandbox {
 protected:
  void SetUp() override {
    TokenSandbox::SetUp();
    token_ = testing::open_logged_in_token(token());
    ASSERT_NE(token_, nullptr);
    ASSERT_TRUE(token_->generate_audit_key().ok());
    store_ = std::move(store::Store::open(dir() / "kmsd.db").value());
    audit_ = std::make_unique<audit::AuditLog>(*store_, *token_);
    restart();
  }

  // A new daemon on the same store: fresh Approvals and PolicyGate, nothing in memory kept.
  void restart() {
    gate_.reset();
    approvals_ = std::make_unique<approvals::Approvals>(*store_, *audit_);
    approvals_->register_operation("revoke", [](const json& p, const std::string&) {
      return Result<json>(json{{"revoked", p.value("user", "")}});
    });
    gate_ = std::make_unique<approvals::PolicyGate>(*store_, *audit_, *approvals_);
  }

  std::vector<json> audit_records(const std::string& action) {
    std::vector<json> out;
    EXPECT_TRUE(audit_
                    ->export_records([&](const json& j) {
                      if (j["action"] == action) out.push_back(j);
                      return Status{};
                    })
                    .ok());
    return out;
  }

  std::unique_ptr<hsm::Token> token_;
  std::unique_ptr<store::Store> store_;
  std::unique_ptr<audit::AuditLog> audit_;
  std::unique_ptr<approvals::Approvals> approvals_;
  std::unique_ptr<approvals::PolicyGate> gate_;
};

TEST(RulesJsonTest, RoundTripsAndIgnoresOperationsNeedingOne) {
  const Rules r =
      rules({{"revoke", 2}, {"recover", 1}, {"policy_change", 3}}, std::chrono::hours(24));
  const json j = approvals::rules_to_json(r);
  EXPECT_EQ(j, json::parse(R"({"v":1,"required":{"policy_change":3,"revoke":2},)"
                           R"("ttl_seconds":86400})"));
  auto back = approvals::rules_from_json(j);
  ASSERT_TRUE(back.ok());
  EXPECT_TRUE(approvals::same_rules(*back, r));
  EXPECT_TRUE(approvals::same_rules(rules({{"revoke", 1}}), rules({})));
  EXPECT_FALSE(approvals::same_rules(rules({}), rules({}, std::chrono::hours(1))));
  EXPECT_FALSE(
      approvals::rules_from_json(json::parse(R"({"v":2,"required":{},"ttl_seconds":1})")).ok());
  EXPECT_FALSE(
      approvals::rules_from_json(json::parse(R"({"v":1,"required":{"x":0},"ttl_seconds":1})"))
          .ok());
  EXPECT_FALSE(
      approvals::rules_from_json(json::parse(R"({"v":1,"required":{},"ttl_seconds":0})")).ok());
}

TEST_F(PolicyGateTest, FirstStartAdoptsTheConfiguredRules) {
  const Rules configured = rules({{"revoke", 2}, {"policy_change", 2}});
  ASSERT_TRUE(gate_->load(configured).ok());
  EXPECT_TRUE(approvals::same_rules(approvals_->rules(), configured));
  auto in_force = gate_->in_force();
  ASSERT_TRUE(in_force.ok() && in_force->has_value());
  EXPECT_TRUE(approvals::same_rules(**in_force, configured));
  auto settled = gate_->settle();
  ASSERT_TRUE(settled.ok()) << settled.error().message;
  EXPECT_EQ(settled->kind, GateOutcome::Kind::kUnchanged);
  // Nothing offered since: a second settle has nothing to do.
  EXPECT_EQ(gate_->settle()->kind, GateOutcome::Kind::kNothingOffered);
}

TEST_F(PolicyGateTest, ChangedRulesWaitForKAdministratorsAndTheOperatorIsNotOne) {
  const Rules original = rules({{"revoke", 2}, {"policy_change", 2}});
  ASSERT_TRUE(gate_->load(original).ok());
  // SIGHUP with a configuration that lowers revoke to 1 and raises recover to 3.
  const Rules wanted = rules({{"recover", 3}, {"policy_change", 2}});
  gate_->offer(wanted);
  auto settled = gate_->settle();
  ASSERT_TRUE(settled.ok()) << settled.error().message;
  ASSERT_EQ(settled->kind, GateOutcome::Kind::kPending);
  EXPECT_EQ(settled->required, 2);
  EXPECT_THAT(settled->message, HasSubstr("kmsctl request approve " + settled->request_id));
  const std::string id = settled->request_id;
  auto req = store_->find_approval_request(id).value();
  ASSERT_TRUE(req.has_value());
  EXPECT_EQ(req->operation, "policy_change");
  EXPECT_EQ(req->requested_by, "operator");
  EXPECT_TRUE(store_->approvals(id).value().empty());  // the operator's request is no approval
  // Still the old rules: a revoke still needs 2.
  EXPECT_TRUE(approvals::same_rules(approvals_->rules(), original));
  EXPECT_EQ(approvals_->submit("revoke", {{"user", "u"}}, "alice")->state, RequestState::kPending);

  // k - 1 = one administrator: nothing changes.
  auto one = approvals_->approve(id, "alice");
  ASSERT_TRUE(one.ok()) << one.error().message;
  EXPECT_EQ(one->state, RequestState::kPending);
  EXPECT_EQ(one->approvals, 1);
  EXPECT_TRUE(approvals::same_rules(approvals_->rules(), original));
  // Nobody approves twice.
  auto twice = approvals_->approve(id, "alice");
  ASSERT_FALSE(twice.ok());
  EXPECT_EQ(twice.error().code, ErrorCode::kAlreadyExists);
  EXPECT_TRUE(approvals::same_rules(approvals_->rules(), original));
  // The k-th distinct administrator: the new rules are in force, in memory and in the store.
  auto two = approvals_->approve(id, "bob");
  ASSERT_TRUE(two.ok()) << two.error().message;
  ASSERT_EQ(two->state, RequestState::kExecuted) << two->message;
  EXPECT_TRUE(approvals::same_rules(approvals_->rules(), wanted));
  EXPECT_TRUE(approvals::same_rules(gate_->in_force().value().value(), wanted));
  EXPECT_EQ(approvals_->submit("revoke", {{"user", "u"}}, "alice")->state, RequestState::kExecuted);
  auto changes = audit_records("approvals.rules.change");
  ASSERT_EQ(changes.size(), 1u);
  EXPECT_EQ(changes[0]["actor"], "operator");
  EXPECT_EQ(changes[0]["details"]["to"], approvals::rules_to_json(wanted));
  EXPECT_EQ(changes[0]["details"]["from"], approvals::rules_to_json(original));
  EXPECT_TRUE(audit_->verify().value().ok());

  // A restart with the same configuration finds the approved rules in force.
  restart();
  ASSERT_TRUE(gate_->load(wanted).ok());
  EXPECT_TRUE(approvals::same_rules(approvals_->rules(), wanted));
  EXPECT_EQ(gate_->settle()->kind, GateOutcome::Kind::kUnchanged);
}

TEST_F(PolicyGateTest, TheSameWaitingChangeIsNotRequestedTwiceAndARestartKeepsTheOldRules) {
  const Rules original = rules({{"policy_change", 3}});
  ASSERT_TRUE(gate_->load(original).ok());
  const Rules wanted = rules({{"policy_change", 3}, {"dr", 2}});
  gate_->offer(wanted);
  auto first = gate_->settle();
  ASSERT_TRUE(first.ok());
  ASSERT_EQ(first->kind, GateOutcome::Kind::kPending);
  EXPECT_EQ(first->required, 3);
  gate_->offer(wanted);
  auto again = gate_->settle();
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->kind, GateOutcome::Kind::kAlreadyPending);
  EXPECT_EQ(again->request_id, first->request_id);
  // kmsd restarted with the edited file: the rules in force stay, the request is found again.
  restart();
  ASSERT_TRUE(gate_->load(wanted).ok());
  EXPECT_TRUE(approvals::same_rules(approvals_->rules(), original));
  auto after_restart = gate_->settle();
  ASSERT_TRUE(after_restart.ok());
  EXPECT_EQ(after_restart->kind, GateOutcome::Kind::kAlreadyPending);
  EXPECT_EQ(after_restart->request_id, first->request_id);
  EXPECT_EQ(store_->approval_requests(RequestState::kPending).value().size(), 1u);
  // A denial ends it; the rules in force never changed.
  ASSERT_TRUE(approvals_->deny(first->request_id, "alice").ok());
  EXPECT_TRUE(approvals::same_rules(gate_->in_force().value().value(), original));
}

TEST_F(PolicyGateTest, AppliesAtOnceWhenTheRulesInForceNeedOneForPolicyChange) {
  ASSERT_TRUE(gate_->load(rules({{"revoke", 2}})).ok());
  const Rules wanted = rules({{"revoke", 3}, {"policy_change", 2}});
  gate_->offer(wanted);
  auto settled = gate_->settle();
  ASSERT_TRUE(settled.ok()) << settled.error().message;
  EXPECT_EQ(settled->kind, GateOutcome::Kind::kApplied);
  EXPECT_TRUE(approvals::same_rules(approvals_->rules(), wanted));
  EXPECT_TRUE(approvals::same_rules(gate_->in_force().value().value(), wanted));
  EXPECT_TRUE(store_->approval_requests(std::nullopt).value().empty());
  auto changes = audit_records("approvals.rules.change");
  ASSERT_EQ(changes.size(), 1u);
  EXPECT_EQ(changes[0]["actor"], "operator");
  // From now on, policy_change itself needs 2: lowering it back is a request.
  gate_->offer(rules({}));
  EXPECT_EQ(gate_->settle()->kind, GateOutcome::Kind::kPending);
  EXPECT_TRUE(approvals::same_rules(approvals_->rules(), wanted));
}

TEST_F(PolicyGateTest, SettlingNeedsTheTokenAndKeepsTheOfferUntilItCanBeAudited) {
  ASSERT_TRUE(gate_->load(rules({})).ok());
  const Rules wanted = rules({{"revoke", 2}});
  gate_->offer(wanted);
  token_->logout();  // sealed: no audit MAC, so no change
  auto sealed = gate_->settle();
  ASSERT_FALSE(sealed.ok());
  EXPECT_TRUE(approvals::same_rules(approvals_->rules(), rules({})));
  EXPECT_TRUE(approvals::same_rules(gate_->in_force().value().value(), rules({})));
  ASSERT_TRUE(token_->login(SecretBytes::from_string(testing::kUserPin)).ok());
  auto unsealed = gate_->settle();
  ASSERT_TRUE(unsealed.ok()) << unsealed.error().message;
  EXPECT_EQ(unsealed->kind, GateOutcome::Kind::kApplied);
  EXPECT_TRUE(approvals::same_rules(approvals_->rules(), wanted));
}

TEST_F(PolicyGateTest, UnreadableRulesInTheStoreStopTheStart) {
  ASSERT_TRUE(store_->put_setting(approvals::kSettingRulesInForce, "{\"v\":1}").ok());
  auto st = gate_->load(rules({}));
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.error().code, ErrorCode::kStore);
  EXPECT_THAT(st.error().message, HasSubstr("cannot be read"));
}

}  // namespace
}  // namespace kmsd

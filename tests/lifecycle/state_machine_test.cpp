// The user lifecycle: every (state, action) pair, with and without key history, gives the
// transition DESIGN.md draws or one precise named error; Q198709 cannot happen.
#include "daemon/lifecycle/state_machine.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <ostream>

namespace kmsd::lifecycle {

// gtest printers, so a failing comparison says which state, effect or error it was.
void PrintTo(UserState s, std::ostream* os) {
  *os << to_string(s);
}
void PrintTo(Action a, std::ostream* os) {
  *os << to_string(a);
}
void PrintTo(TransitionError e, std::ostream* os) {
  *os << to_string(e);
}
void PrintTo(const Transition& t, std::ostream* os) {
  *os << "{to=" << to_string(t.to) << (t.issue_token ? " issue_token" : "")
      << (t.consume_token ? " consume_token" : "")
      << (t.discard_pending_token ? " discard_pending_token" : "")
      << (t.issue_certificates ? " issue_certificates" : "")
      << (t.append_key_history ? " append_key_history" : "")
      << (t.deliver_key_history ? " deliver_key_history" : "")
      << (t.revoke_certificates ? " revoke_certificates" : "")
      << (t.keep_history ? " keep_history" : " NO-keep_history") << "}";
}

namespace {

using std::chrono::sys_seconds;
using ::testing::HasSubstr;

constexpr sys_seconds kTokenIssuedAt{std::chrono::seconds(1'700'000'000)};  // 2023-11-14T22:13:20Z

// The facts a real record in FROM would have: a pending token exactly in ENABLED and RECOVERY.
UserFacts facts_for(UserState from, bool has_key_history) {
  UserFacts f;
  f.has_key_history = has_key_history;
  f.has_pending_token = from == UserState::kEnabled || from == UserState::kRecovery;
  if (f.has_pending_token) f.pending_token_issued_at = kTokenIssuedAt;
  return f;
}

// ---- the whole table ----

struct Row {
  UserState from;
  Action action;
  bool history;
  std::optional<Transition> allowed;     // set: this transition, effects and all
  std::optional<TransitionError> error;  // set: refused with this name
};

Row ok(UserState from, Action action, bool history, Transition t) {
  return Row{from, action, history, t, std::nullopt};
}
Row no(UserState from, Action action, bool history, TransitionError e) {
  return Row{from, action, history, std::nullopt, e};
}

using enum UserState;
using enum Action;
using E = TransitionError;

const Transition kIssue{.issue_token = true};

Transition to(UserState s, Transition t) {
  t.to = s;
  return t;
}

const Transition kFirstEnroll = {
    .to = kActive, .consume_token = true, .issue_certificates = true, .append_key_history = true};
const Transition kRenewal = {.to = kActive, .issue_certificates = true, .append_key_history = true};
const Transition kRevokeNeverEnrolled = {.to = kRevoked, .discard_pending_token = true};
const Transition kRevokeWithCerts = {
    .to = kRevoked, .discard_pending_token = true, .revoke_certificates = true};
Transition recovery_enroll(bool history) {
  return {.to = kActive,
          .consume_token = true,
          .issue_certificates = true,
          .append_key_history = true,
          .deliver_key_history = history,
          .revoke_certificates = true};
}

std::vector<Row> table() {
  std::vector<Row> rows;
  for (bool h : {false, true}) {
    // (none): only enable.
    rows.push_back(ok(kNone, kEnable, h, to(kEnabled, kIssue)));
    rows.push_back(no(kNone, kReissue, h, E::kUnknownUser));
    rows.push_back(no(kNone, kEnroll, h, E::kUnknownUser));
    rows.push_back(no(kNone, kRevoke, h, E::kUnknownUser));
    rows.push_back(no(kNone, kRecover, h, E::kUnknownUser));
    rows.push_back(no(kNone, kRenew, h, E::kUnknownUser));
    // ENABLED
    rows.push_back(no(kEnabled, kEnable, h, E::kAlreadyEnabled));
    rows.push_back(ok(kEnabled, kReissue, h, to(kEnabled, kIssue)));
    rows.push_back(ok(kEnabled, kEnroll, h, kFirstEnroll));
    rows.push_back(ok(kEnabled, kRevoke, h, kRevokeNeverEnrolled));
    rows.push_back(no(kEnabled, kRecover, h, E::kNotEnrolledYet));
    rows.push_back(no(kEnabled, kRenew, h, E::kNotEnrolledYet));
    // ACTIVE
    rows.push_back(no(kActive, kEnable, h, E::kAlreadyActive));
    rows.push_back(no(kActive, kReissue, h, E::kAlreadyActive));
    rows.push_back(no(kActive, kEnroll, h, E::kAlreadyActive));
    rows.push_back(ok(kActive, kRevoke, h, kRevokeWithCerts));
    rows.push_back(h ? ok(kActive, kRecover, h, to(kRecovery, kIssue))
                     : no(kActive, kRecover, h, E::kNoKeyHistory));
    rows.push_back(ok(kActive, kRenew, h, kRenewal));
    // REVOKED
    rows.push_back(ok(kRevoked, kEnable, h, to(kEnabled, kIssue)));
    rows.push_back(no(kRevoked, kReissue, h, E::kUserRevoked));
    rows.push_back(no(kRevoked, kEnroll, h, E::kUserRevoked));
    rows.push_back(no(kRevoked, kRevoke, h, E::kAlreadyRevoked));
    rows.push_back(h ? ok(kRevoked, kRecover, h, to(kRecovery, kIssue))
                     : no(kRevoked, kRecover, h, E::kNoKeyHistory));
    rows.push_back(no(kRevoked, kRenew, h, E::kUserRevoked));
    // RECOVERY
    rows.push_back(no(kRecovery, kEnable, h, E::kRecoveryPending));
    rows.push_back(ok(kRecovery, kReissue, h, to(kRecovery, kIssue)));
    rows.push_back(ok(kRecovery, kEnroll, h, recovery_enroll(h)));
    rows.push_back(ok(kRecovery, kRevoke, h, kRevokeWithCerts));
    rows.push_back(no(kRecovery, kRecover, h, E::kRecoveryPending));
    rows.push_back(no(kRecovery, kRenew, h, E::kRecoveryPending));
  }
  return rows;
}

// Short, so the ctest names stay readable: "revoked recover no-history".
void PrintTo(const Row& r, std::ostream* os) {
  *os << to_string(r.from) << " " << to_string(r.action)
      << (r.history ? " history" : " no-history");
}

std::string row_name(const ::testing::TestParamInfo<Row>& info) {
  auto word = [](std::string s) {
    s[0] = static_cast<char>(s[0] - 'a' + 'A');
    return s;
  };
  const Row& r = info.param;
  return word(to_string(r.from)) + "_" + word(to_string(r.action)) + "_" +
         (r.history ? "WithKeyHistory" : "WithoutKeyHistory");
}

class EveryStateAndAction : public ::testing::TestWithParam<Row> {};

TEST_P(EveryStateAndAction, GivesTheDrawnTransitionOrTheNamedError) {
  const Row& r = GetParam();
  Decision d = transition(r.from, r.action, facts_for(r.from, r.history));
  if (r.allowed) {
    ASSERT_TRUE(d.ok()) << to_string(d.refusal().reason) << ": " << d.refusal().message;
    EXPECT_EQ(d.value(), *r.allowed);
    EXPECT_TRUE(d->keep_history);
  } else {
    ASSERT_FALSE(d.ok()) << "unexpectedly allowed, to " << to_string(d->to);
    EXPECT_EQ(d.refusal().reason, *r.error);
    EXPECT_FALSE(d.refusal().message.empty());
    Error e = d.error();
    EXPECT_EQ(e.code,
              *r.error == E::kUnknownUser ? ErrorCode::kNotFound : ErrorCode::kFailedPrecondition);
    EXPECT_EQ(e.message, std::string(to_string(*r.error)) + ": " + d.refusal().message);
  }
}

INSTANTIATE_TEST_SUITE_P(Lifecycle, EveryStateAndAction, ::testing::ValuesIn(table()), row_name);

TEST(LifecycleTable, CoversEveryPairExactlyOnce) {
  auto rows = table();
  EXPECT_EQ(rows.size(), std::size(kAllUserStates) * std::size(kAllActions) * 2);
  for (bool h : {false, true}) {
    for (UserState s : kAllUserStates) {
      for (Action a : kAllActions) {
        auto n = std::count_if(rows.begin(), rows.end(), [&](const Row& r) {
          return r.from == s && r.action == a && r.history == h;
        });
        EXPECT_EQ(n, 1) << to_string(s) << " " << to_string(a) << " history=" << h;
      }
    }
  }
}

// ---- the record, replayed through the machine ----

// A user record as the store would keep it, changed only through transition() effects.
struct Record {
  UserState state = kNone;
  int key_history = 0;  // escrowed encryption keys
  bool pending_token = false;
  int valid_certificates = 0;
  int history_deliveries = 0;

  UserFacts facts() const {
    UserFacts f;
    f.has_key_history = key_history > 0;
    f.has_pending_token = pending_token;
    return f;
  }
  // Applies ACTION; returns the decision so a test can look at a refusal.
  Decision apply(Action action) {
    Decision d = transition(state, action, facts());
    if (!d.ok()) return d;
    const Transition& t = d.value();
    EXPECT_TRUE(t.keep_history);
    if (t.revoke_certificates) valid_certificates = 0;
    if (t.issue_certificates) valid_certificates = 2;
    if (t.append_key_history) ++key_history;
    if (t.deliver_key_history) ++history_deliveries;
    if (t.consume_token || t.discard_pending_token) pending_token = false;
    if (t.issue_token) pending_token = true;
    state = t.to;
    return d;
  }
};

// Q198709: enabled, revoked before enrolling, and then never able to enroll again.
TEST(Q198709, RevokedBeforeEnrollCanBeEnabledAgainAndEnroll) {
  Record r;
  ASSERT_TRUE(r.apply(kEnable).ok());
  EXPECT_EQ(r.state, kEnabled);
  ASSERT_TRUE(r.apply(kRevoke).ok());
  EXPECT_EQ(r.state, kRevoked);
  EXPECT_FALSE(r.pending_token) << "revoke must void the enrollment token";
  ASSERT_TRUE(r.apply(kEnable).ok());
  EXPECT_EQ(r.state, kEnabled);
  EXPECT_TRUE(r.pending_token);
  ASSERT_TRUE(r.apply(kEnroll).ok());
  EXPECT_EQ(r.state, kActive);
  EXPECT_EQ(r.key_history, 1);
  EXPECT_EQ(r.valid_certificates, 2);
}

TEST(Q198709, RevokedBeforeEnrollCannotBeRecovered) {
  Record r;
  ASSERT_TRUE(r.apply(kEnable).ok());
  ASSERT_TRUE(r.apply(kRevoke).ok());
  Decision d = r.apply(kRecover);
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.refusal().reason, E::kNoKeyHistory);
  EXPECT_THAT(d.refusal().message, HasSubstr("use enable"));
  EXPECT_EQ(r.state, kRevoked) << "a refused recover must leave the record where it was";
  // And the way out the sentence names works.
  ASSERT_TRUE(r.apply(kEnable).ok());
  ASSERT_TRUE(r.apply(kEnroll).ok());
  EXPECT_EQ(r.state, kActive);
}

TEST(Q198709, NoSequenceReachesRecoveryWithoutKeyHistory) {
  // Breadth-first over every action sequence up to length 6 from (none): RECOVERY is only
  // ever entered by a record that has escrowed keys.
  std::vector<Record> frontier{Record{}};
  for (int depth = 0; depth < 6; ++depth) {
    std::vector<Record> next;
    for (const Record& r : frontier) {
      for (Action a : kAllActions) {
        Record copy = r;
        if (!copy.apply(a).ok()) continue;
        if (copy.state == kRecovery) {
          EXPECT_GT(copy.key_history, 0) << "reached recovery without key history";
        }
        next.push_back(copy);
      }
    }
    frontier = std::move(next);
  }
  EXPECT_FALSE(frontier.empty());
}

TEST(KeyHistory, IsKeptAcrossRevokeAndReEnable) {
  Record r;
  ASSERT_TRUE(r.apply(kEnable).ok());
  ASSERT_TRUE(r.apply(kEnroll).ok());
  ASSERT_TRUE(r.apply(kRenew).ok());
  EXPECT_EQ(r.key_history, 2);

  Decision revoke = r.apply(kRevoke);
  ASSERT_TRUE(revoke.ok());
  EXPECT_TRUE(revoke->keep_history);
  EXPECT_TRUE(revoke->revoke_certificates);
  EXPECT_EQ(r.key_history, 2);
  EXPECT_EQ(r.valid_certificates, 0);

  Decision enable = r.apply(kEnable);
  ASSERT_TRUE(enable.ok());
  EXPECT_TRUE(enable->keep_history);
  EXPECT_EQ(r.key_history, 2);

  ASSERT_TRUE(r.apply(kEnroll).ok());
  EXPECT_EQ(r.key_history, 3) << "re-enrolling appends, never replaces";
}

TEST(KeyHistory, RecoveryEnrollmentDeliversTheHistory) {
  Record r;
  ASSERT_TRUE(r.apply(kEnable).ok());
  ASSERT_TRUE(r.apply(kEnroll).ok());
  ASSERT_TRUE(r.apply(kRevoke).ok());
  ASSERT_TRUE(r.apply(kRecover).ok());
  EXPECT_EQ(r.state, kRecovery);
  EXPECT_TRUE(r.pending_token);
  ASSERT_TRUE(r.apply(kEnroll).ok());
  EXPECT_EQ(r.state, kActive);
  EXPECT_EQ(r.history_deliveries, 1);
  EXPECT_EQ(r.key_history, 2);
}

TEST(KeyHistory, NoAllowedTransitionDropsKeepHistory) {
  for (bool h : {false, true}) {
    for (UserState s : kAllUserStates) {
      for (Action a : kAllActions) {
        Decision d = transition(s, a, facts_for(s, h));
        if (d.ok()) {
          EXPECT_TRUE(d->keep_history) << to_string(s) << " " << to_string(a);
        }
      }
    }
  }
}

// ---- refusals that depend on facts ----

TEST(Refusals, EnableOfAnEnabledUserSaysSinceWhenAndToReissue) {
  Decision d = transition(kEnabled, kEnable, facts_for(kEnabled, false));
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.refusal().reason, E::kAlreadyEnabled);
  EXPECT_THAT(d.refusal().message, HasSubstr("2023-11-14T22:13:20Z"));
  EXPECT_THAT(d.refusal().message, HasSubstr("reissue"));
}

TEST(Refusals, EnrollWithoutAPendingTokenIsRefusedInEnabledAndRecovery) {
  for (UserState s : {kEnabled, kRecovery}) {
    UserFacts f = facts_for(s, true);
    f.has_pending_token = false;
    f.pending_token_issued_at.reset();
    Decision d = transition(s, kEnroll, f);
    ASSERT_FALSE(d.ok()) << to_string(s);
    EXPECT_EQ(d.refusal().reason, E::kNoPendingToken);
    EXPECT_THAT(d.refusal().message, HasSubstr("reissue"));
  }
}

TEST(Refusals, RecoverOfAReEnabledUserOffersEnrollOrRevokeFirst) {
  Decision d = transition(kEnabled, kRecover, facts_for(kEnabled, true));
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.refusal().reason, E::kNotEnrolledYet);
  EXPECT_THAT(d.refusal().message, HasSubstr("revoke and then recover"));
}

TEST(Refusals, WorkWithTheResultMacros) {
  auto renew_then_fail = []() -> Result<UserState> {
    KMSD_ASSIGN_OR_RETURN(Transition t, transition(kActive, kRenew, UserFacts{}));
    KMSD_TRY(transition(t.to, kEnable, UserFacts{}));
    return t.to;
  };
  auto r = renew_then_fail();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kFailedPrecondition);
  EXPECT_THAT(r.error().message, ::testing::StartsWith("already-active: "));
}

// ---- names ----

TEST(Names, StatesActionsAndErrorsRoundTripAsLowerCaseWords) {
  for (UserState s : kAllUserStates) EXPECT_EQ(parse_user_state(to_string(s)), s);
  for (Action a : kAllActions) EXPECT_EQ(parse_action(to_string(a)), a);
  EXPECT_STREQ(to_string(kEnabled), "enabled");
  EXPECT_STREQ(to_string(kRecovery), "recovery");
  EXPECT_STREQ(to_string(kReissue), "reissue");
  EXPECT_EQ(parse_user_state("Enabled"), std::nullopt);
  EXPECT_EQ(parse_user_state("suspended"), std::nullopt);
  EXPECT_EQ(parse_action(""), std::nullopt);
  for (auto e : {E::kUnknownUser, E::kAlreadyEnabled, E::kNotEnrolledYet, E::kNoPendingToken,
                 E::kAlreadyActive, E::kAlreadyRevoked, E::kUserRevoked, E::kNoKeyHistory,
                 E::kRecoveryPending}) {
    EXPECT_EQ(parse_transition_error(to_string(e)), e);
  }
  EXPECT_STREQ(to_string(E::kNoKeyHistory), "no-key-history");
}

}  // namespace
}  // namespace kmsd::lifecycle

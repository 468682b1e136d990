#include "daemon/lifecycle/state_machine.hpp"

#include "common/clock.hpp"

namespace kmsd::lifecycle {

namespace {

Refusal refuse(TransitionError reason, std::string message) {
  return Refusal{reason, std::move(message)};
}

// " (pending since 2025-03-01T09:30:00Z)" or "".
std::string pending_since(const UserFacts& f) {
  if (!f.pending_token_issued_at) return "";
  return " (pending since " + utc_text(*f.pending_token_issued_at) + ")";
}

Decision from_none(Action action) {
  if (action == Action::kEnable) return Transition{.to = UserState::kEnabled, .issue_token = true};
  return refuse(TransitionError::kUnknownUser,
                std::string("there is no record for this user, so '") + to_string(action) +
                    "' has nothing to act on; enable the user first");
}

Decision from_enabled(Action action, const UserFacts& f) {
  switch (action) {
    case Action::kEnable:
      if (f.has_pending_token) {
        return refuse(TransitionError::kAlreadyEnabled,
                      "the user is already enabled and an enrollment token is outstanding" +
                          pending_since(f) +
                          "; use reissue to replace the token, or wait for the user to enroll");
      }
      return refuse(TransitionError::kAlreadyEnabled,
                    "the user is already enabled but has no usable enrollment token; use "
                    "reissue to give the user a new one");
    case Action::kReissue:
      return Transition{.to = UserState::kEnabled, .issue_token = true};
    case Action::kEnroll:
      if (!f.has_pending_token) {
        return refuse(TransitionError::kNoPendingToken,
                      "the user is enabled but no enrollment token is outstanding; use reissue "
                      "to issue a new one");
      }
      return Transition{.to = UserState::kActive,
                        .consume_token = true,
                        .issue_certificates = true,
                        .append_key_history = true};
    case Action::kRevoke:
      // Never enrolled since being enabled: no certificates to revoke, only the token to void.
      return Transition{.to = UserState::kRevoked, .discard_pending_token = true};
    case Action::kRecover:
      if (f.has_key_history) {
        return refuse(TransitionError::kNotEnrolledYet,
                      "the user was re-enabled and has not enrolled since, so recovery does not "
                      "apply yet; let the user enroll and then recover, or revoke and then "
                      "recover to hand out the key history with a single token");
      }
      return refuse(TransitionError::kNotEnrolledYet,
                    "the user was enabled but never enrolled, so no key was escrowed and there "
                    "is nothing to recover; the user enrolls with the outstanding token, or use "
                    "reissue for a new one");
    case Action::kRenew:
      return refuse(TransitionError::kNotEnrolledYet,
                    "the user has not enrolled yet, so there are no certificates to renew; the "
                    "user enrolls with the outstanding token, or use reissue for a new one");
  }
  return refuse(TransitionError::kUnknownUser, "the action is not one kmsd knows");
}

Decision from_active(Action action, const UserFacts& f) {
  switch (action) {
    case Action::kEnable:
      return refuse(TransitionError::kAlreadyActive,
                    "the user is already enrolled; use renew for new certificates or recover to "
                    "give the user their key history again");
    case Action::kReissue:
      return refuse(TransitionError::kAlreadyActive,
                    "the user is enrolled and has no enrollment pending, so there is no token to "
                    "reissue; use recover to issue a recovery token");
    case Action::kEnroll:
      return refuse(TransitionError::kAlreadyActive,
                    "the user is already enrolled; use renew for new certificates or recover to "
                    "enroll again with the key history");
    case Action::kRevoke:
      return Transition{
          .to = UserState::kRevoked, .discard_pending_token = true, .revoke_certificates = true};
    case Action::kRecover:
      if (!f.has_key_history) {
        return refuse(TransitionError::kNoKeyHistory,
                      "no encryption key was ever escrowed for this user, so there is nothing to "
                      "recover; use renew for new certificates, or revoke and enable to start "
                      "over");
      }
      return Transition{.to = UserState::kRecovery, .issue_token = true};
    case Action::kRenew:
      return Transition{
          .to = UserState::kActive, .issue_certificates = true, .append_key_history = true};
  }
  return refuse(TransitionError::kUnknownUser, "the action is not one kmsd knows");
}

Decision from_revoked(Action action, const UserFacts& f) {
  switch (action) {
    case Action::kEnable:
      // Always allowed: this is the way out for a user revoked before enrolling (Q198709).
      return Transition{.to = UserState::kEnabled, .issue_token = true};
    case Action::kReissue:
      return refuse(TransitionError::kUserRevoked,
                    "the user is revoked and has no enrollment pending, so there is no token to "
                    "reissue; use enable to let the user enroll again, or recover to restore the "
                    "key history");
    case Action::kEnroll:
      return refuse(TransitionError::kUserRevoked,
                    "the user is revoked and any token issued before the revocation is void; "
                    "use enable to issue a new enrollment token");
    case Action::kRevoke:
      return refuse(TransitionError::kAlreadyRevoked,
                    "the user is already revoked; nothing was changed");
    case Action::kRecover:
      if (!f.has_key_history) {
        return refuse(TransitionError::kNoKeyHistory,
                      "the user never enrolled, so no encryption key was escrowed and there is "
                      "nothing to recover; use enable to let the user enroll");
      }
      return Transition{.to = UserState::kRecovery, .issue_token = true};
    case Action::kRenew:
      return refuse(TransitionError::kUserRevoked,
                    "the certificates of a revoked user cannot be renewed; use enable to let the "
                    "user enroll again");
  }
  return refuse(TransitionError::kUnknownUser, "the action is not one kmsd knows");
}

Decision from_recovery(Action action, const UserFacts& f) {
  switch (action) {
    case Action::kEnable:
      return refuse(TransitionError::kRecoveryPending,
                    "the user is in recovery with a recovery token outstanding" + pending_since(f) +
                        "; the user enrolls with that token, use reissue for a new one, or "
                        "revoke to cancel the recovery");
    case Action::kReissue:
      return Transition{.to = UserState::kRecovery, .issue_token = true};
    case Action::kEnroll:
      if (!f.has_pending_token) {
        return refuse(TransitionError::kNoPendingToken,
                      "the user is in recovery but no recovery token is outstanding; use "
                      "reissue to issue a new one");
      }
      // The certificates from before the recovery are superseded by the new ones.
      return Transition{.to = UserState::kActive,
                        .consume_token = true,
                        .issue_certificates = true,
                        .append_key_history = true,
                        .deliver_key_history = f.has_key_history,
                        .revoke_certificates = true};
    case Action::kRevoke:
      return Transition{
          .to = UserState::kRevoked, .discard_pending_token = true, .revoke_certificates = true};
    case Action::kRecover:
      return refuse(TransitionError::kRecoveryPending,
                    "a recovery is already under way with a token outstanding" + pending_since(f) +
                        "; use reissue for a new recovery token");
    case Action::kRenew:
      return refuse(TransitionError::kRecoveryPending,
                    "the user is in recovery; certificates are renewed after the user has "
                    "enrolled with the recovery token, or use revoke to cancel the recovery");
  }
  return refuse(TransitionError::kUnknownUser, "the action is not one kmsd knows");
}

}  // namespace

const char* to_string(UserState s) noexcept {
  switch (s) {
    case UserState::kNone:
      return "none";
    case UserState::kEnabled:
      return "enabled";
    case UserState::kActive:
      return "active";
    case UserState::kRevoked:
      return "revoked";
    case UserState::kRecovery:
      return "recovery";
  }
  return "unknown";
}

std::optional<UserState> parse_user_state(std::string_view s) noexcept {
  for (UserState v : kAllUserStates) {
    if (s == to_string(v)) return v;
  }
  return std::nullopt;
}

const char* to_string(Action a) noexcept {
  switch (a) {
    case Action::kEnable:
      return "enable";
    case Action::kReissue:
      return "reissue";
    case Action::kEnroll:
      return "enroll";
    case Action::kRevoke:
      return "revoke";
    case Action::kRecover:
      return "recover";
    case Action::kRenew:
      return "renew";
  }
  return "unknown";
}

std::optional<Action> parse_action(std::string_view s) noexcept {
  for (Action v : kAllActions) {
    if (s == to_string(v)) return v;
  }
  return std::nullopt;
}

const char* to_string(TransitionError e) noexcept {
  switch (e) {
    case TransitionError::kUnknownUser:
      return "unknown-user";
    case TransitionError::kAlreadyEnabled:
      return "already-enabled";
    case TransitionError::kNotEnrolledYet:
      return "not-enrolled-yet";
    case TransitionError::kNoPendingToken:
      return "no-pending-token";
    case TransitionError::kAlreadyActive:
      return "already-active";
    case TransitionError::kAlreadyRevoked:
      return "already-revoked";
    case TransitionError::kUserRevoked:
      return "user-revoked";
    case TransitionError::kNoKeyHistory:
      return "no-key-history";
    case TransitionError::kRecoveryPending:
      return "recovery-pending";
  }
  return "unknown";
}

std::optional<TransitionError> parse_transition_error(std::string_view s) noexcept {
  for (auto e : {TransitionError::kUnknownUser, TransitionError::kAlreadyEnabled,
                 TransitionError::kNotEnrolledYet, TransitionError::kNoPendingToken,
                 TransitionError::kAlreadyActive, TransitionError::kAlreadyRevoked,
                 TransitionError::kUserRevoked, TransitionError::kNoKeyHistory,
                 TransitionError::kRecoveryPending}) {
    if (s == to_string(e)) return e;
  }
  return std::nullopt;
}

Error Decision::error() const {
  const Refusal& r = refusal();
  ErrorCode code = r.reason == TransitionError::kUnknownUser ? ErrorCode::kNotFound
                                                             : ErrorCode::kFailedPrecondition;
  return make_error(code, std::string(to_string(r.reason)) + ": " + r.message);
}

Decision transition(UserState from, Action action, const UserFacts& facts) {
  switch (from) {
    case UserState::kNone:
      return from_none(action);
    case UserState::kEnabled:
      return from_enabled(action, facts);
    case UserState::kActive:
      return from_active(action, facts);
    case UserState::kRevoked:
      return from_revoked(action, facts);
    case UserState::kRecovery:
      return from_recovery(action, facts);
  }
  return Refusal{TransitionError::kUnknownUser, "the record's state is not one kmsd knows"};
}

}  // namespace kmsd::lifecycle

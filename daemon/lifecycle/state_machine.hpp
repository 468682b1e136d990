// The user lifecycle as one pure function: given a user's state, an administrator's or
// client's action and the facts the decision needs, the new state and the effects to apply.
//
// States and the legal transitions (DESIGN.md, "Users, tokens and the state machine"):
//
//    (none) --enable--> ENABLED --enroll(token)--> ACTIVE --revoke--> REVOKED
//               ENABLED  --reissue-->  ENABLED            (new enrollment token)
//               ENABLED  --revoke-->   REVOKED            (never enrolled: no keys)
//               ACTIVE   --recover-->  RECOVERY --enroll(token)--> ACTIVE (+history)
//               REVOKED  --enable-->   ENABLED            (re-enable; history kept)
//               REVOKED  --recover-->  RECOVERY           (only with key history)
//               ACTIVE   --renew-->    ACTIVE             (new certs, same identity)
//
// Pairs DESIGN.md leaves open, decided here:
//
//  * RECOVERY --revoke--> REVOKED. An administrator who started a recovery and must then cut
//    the user off (left the organisation, key compromise) must not have to wait for the user
//    to enroll first; the recovery token is discarded and the certificates revoked.
//  * RECOVERY --reissue--> RECOVERY. Recovery tokens expire and lock like enrollment tokens;
//    without a reissue a lost recovery token would leave the record stuck, which is the very
//    shape of Q198709. The new token replaces the old one.
//  * RECOVERY --enroll--> ACTIVE even without key history. Entry into RECOVERY requires key
//    history, so this cannot happen through this function; but a record imported or repaired
//    by hand might be in that shape, and refusing would strand it exactly as Exchange 5.0 did.
//    It enrolls like a fresh user (deliver_key_history is false: there is nothing to deliver).
//  * ACTIVE --recover-- needs key history like REVOKED --recover--: recovery exists to hand
//    escrowed keys back; with none, the named error says to revoke and enable instead.
//  * ENABLED --enable-- and RECOVERY --enable-- are errors, not silent no-ops or silent token
//    replacement: Q237909's bulk enable printed "****Error****" for exactly this case. The
//    sentence says a token is pending (and since when) and that reissue replaces it.
//  * ENABLED --recover-- is refused as not-enrolled-yet even for a re-enabled user who has key
//    history: the sentence offers "let the user enroll, then recover" or "revoke, then
//    recover" (one token instead of two).
//  * Enroll with no pending token (ENABLED or RECOVERY) is refused as no-pending-token;
//    reissue is the way out. The enrollment token itself is checked before this function is
//    called (see enrollment_token.hpp); this function only knows whether one exists.
//  * Revoke of a REVOKED user is refused (already-revoked) rather than repeated, so an audit
//    trail never shows two revocations of the same certificates.
//
// Q198709 (a user revoked before enrolling, then stuck in "Recovery") is impossible by
// construction: REVOKED --recover-- requires key history, REVOKED --enable-- always works, and
// no effect ever resets key history (keep_history is true on every transition).
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

#include "common/result.hpp"

namespace kmsd::lifecycle {

enum class UserState : std::uint8_t {
  kNone,      // no record for this user
  kEnabled,   // enrollment token issued, not yet enrolled
  kActive,    // enrolled: holds a signing and an encryption certificate
  kRevoked,   // certificates revoked; record and key history kept
  kRecovery,  // recovery token issued; enrolling hands the key history back
};
inline constexpr UserState kAllUserStates[] = {UserState::kNone, UserState::kEnabled,
                                               UserState::kActive, UserState::kRevoked,
                                               UserState::kRecovery};
const char* to_string(UserState s) noexcept;  // "none", "enabled", "active", "revoked", "recovery"
std::optional<UserState> parse_user_state(std::string_view s) noexcept;

enum class Action : std::uint8_t {
  kEnable,   // admin: create (or re-enable) the record and issue an enrollment token
  kReissue,  // admin: replace the pending enrollment or recovery token
  kEnroll,   // client: a token was presented and accepted
  kRevoke,   // admin: revoke the user's certificates
  kRecover,  // admin: issue a recovery token that gives the key history back
  kRenew,    // client or admin: new certificates for the same identity
};
inline constexpr Action kAllActions[] = {Action::kEnable, Action::kReissue, Action::kEnroll,
                                         Action::kRevoke, Action::kRecover, Action::kRenew};
const char* to_string(Action a) noexcept;  // "enable", "reissue", "enroll", "revoke", ...
std::optional<Action> parse_action(std::string_view s) noexcept;

// What the decision needs to know beyond the state, read from the store by the caller.
struct UserFacts {
  bool has_key_history = false;    // any encryption key ever escrowed for this user
  bool has_pending_token = false;  // an unconsumed enrollment or recovery token exists
  // When the pending token was issued; only used to make refusals precise.
  std::optional<std::chrono::sys_seconds> pending_token_issued_at;
};

// What the caller must do, in one store transaction, to carry out an allowed transition.
struct Transition {
  UserState to = UserState::kNone;
  bool issue_token = false;            // issue a new token; it replaces any pending one
  bool consume_token = false;          // the presented token is spent (single use)
  bool discard_pending_token = false;  // any pending token becomes void
  bool issue_certificates = false;     // new signing and encryption certificates
  bool append_key_history = false;     // the new escrowed encryption key is appended
  bool deliver_key_history = false;    // the escrowed key history goes to the user
  bool revoke_certificates = false;    // the user's current certificates are revoked
  // Key history is never overwritten or reset. There is no effect that removes it: this is
  // true on every transition, stated so callers and tests can rely on it.
  bool keep_history = true;

  friend bool operator==(const Transition&, const Transition&) = default;
};

// Why a (state, action) pair is refused. Every refused pair maps to one of these.
enum class TransitionError : std::uint8_t {
  kUnknownUser,      // no record: only enable works
  kAlreadyEnabled,   // enable on ENABLED: a token is pending, use reissue
  kNotEnrolledYet,   // recover / renew before the user ever enrolled
  kNoPendingToken,   // enroll with no outstanding token
  kAlreadyActive,    // enable / reissue / enroll on ACTIVE
  kAlreadyRevoked,   // revoke on REVOKED
  kUserRevoked,      // reissue / enroll / renew on REVOKED: enable first
  kNoKeyHistory,     // recover with nothing escrowed (Q198709)
  kRecoveryPending,  // enable / recover / renew while a recovery is under way
};
// Stable machine names: "unknown-user", "already-enabled", "not-enrolled-yet",
// "no-pending-token", "already-active", "already-revoked", "user-revoked", "no-key-history",
// "recovery-pending". Safe to put in API responses and to match on in scripts.
const char* to_string(TransitionError e) noexcept;
std::optional<TransitionError> parse_transition_error(std::string_view s) noexcept;

struct Refusal {
  TransitionError reason = TransitionError::kUnknownUser;
  std::string message;  // what happened and what the administrator can do instead
};

// Either a Transition or a Refusal. Shaped like Result<Transition> (ok(), value(), error()),
// so KMSD_TRY and KMSD_ASSIGN_OR_RETURN work on it; refusal() keeps the named reason.
class [[nodiscard]] Decision {
 public:
  Decision(Transition t) : v_(std::move(t)) {}  // NOLINT(implicit)
  Decision(Refusal r) : v_(std::move(r)) {}     // NOLINT(implicit)

  bool ok() const noexcept { return v_.index() == 0; }
  explicit operator bool() const noexcept { return ok(); }
  const Transition& value() const& { return std::get<0>(v_); }
  Transition value() && { return std::get<0>(std::move(v_)); }
  const Transition* operator->() const { return &value(); }
  const Refusal& refusal() const { return std::get<1>(v_); }
  // For crossing module borders: kNotFound for unknown-user, kFailedPrecondition otherwise;
  // the message is "<machine name>: <sentence>".
  Error error() const;

 private:
  std::variant<Transition, Refusal> v_;
};

// The lifecycle. Pure: no I/O, no clock, no token; the same inputs give the same answer.
// Thread-safety: safe from any thread.
Decision transition(UserState from, Action action, const UserFacts& facts);

}  // namespace kmsd::lifecycle

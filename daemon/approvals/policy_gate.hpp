// "Change approval policy" is itself a gated operation: the approval rules in force are kept
// in the store, and a configuration (at start or on SIGHUP) whose [approvals] section differs
// does not take effect by itself; it becomes a "policy_change" request that k administrators
// approve (k from the rules in force), unless those rules need only one for policy_change.
#pragma once

#include <mutex>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "common/result.hpp"
#include "daemon/approvals/approvals.hpp"
#include "daemon/audit/audit_log.hpp"
#include "daemon/store/store.hpp"

namespace kmsd::approvals {

// The store setting that holds the rules in force, as rules_to_json() writes them.
inline constexpr const char* kSettingRulesInForce = "approvals.rules_in_force";
// The gated operation; its k is approvals.required.policy_change.
inline constexpr const char* kPolicyChange = "policy_change";
// Who asks for a change that came with a configuration file: not an administrator, so never
// an approval (an administrator cannot be named this; see admins::AdminService).
inline constexpr const char* kOperator = "operator";

// Rules as JSON, version 1: {"v":1,"required":{"revoke":2,...},"ttl_seconds":259200}.
// Operations needing 1 are left out (1 is what an unlisted operation needs), so two rule sets
// that require the same of every operation have the same JSON.
nlohmann::json rules_to_json(const Rules& rules);
// kInvalidArgument for anything rules_to_json() would not write (k < 1, ttl <= 0, ...).
Result<Rules> rules_from_json(const nlohmann::json& j);
bool same_rules(const Rules& a, const Rules& b);

// What settle() did with the configuration's rules.
struct GateOutcome {
  enum class Kind {
    kNothingOffered,  // no configuration offered since the last settle
    kUnchanged,       // the configuration asks for the rules in force
    kApplied,         // applied at once (the rules in force need one for policy_change)
    kPending,         // a policy_change request now waits for administrators
    kAlreadyPending,  // a request for exactly these rules is already waiting
  };
  Kind kind = Kind::kNothingOffered;
  std::string request_id;  // kPending, kAlreadyPending
  int required = 0;        // kPending, kAlreadyPending: k
  std::string message;     // a sentence for the log
};

// Thread-safety: safe to share; offer/settle serialize on an internal mutex and on the
// store's transactions. The constructor registers the "policy_change" executor with
// APPROVALS, which applies the approved rules (store setting, Approvals::set_rules, audit).
class PolicyGate {
 public:
  PolicyGate(store::Store& store, audit::AuditLog& audit, Approvals& approvals);

  // At start, before the token is usable: puts the rules in force (from the store) into
  // APPROVALS and remembers CONFIGURED as offered (settle() judges it once unsealed). On a
  // first start (no rules in force recorded) CONFIGURED is adopted here: recorded in the store
  // and applied, without an audit record (the token is not usable yet; the rules are those the
  // KMS was set up with). A recorded value that cannot be read is a kStore error: kmsd must
  // not start with rules it cannot vouch for.
  Status load(const Rules& configured);
  // Remembers RULES (from a configuration just read) for the next settle(); touches nothing.
  void offer(const Rules& configured);
  // Judges the rules offered last against the rules in force: adopts, applies, or submits a
  // policy_change request by "operator", each audited. Needs the token (audit MAC), so call it
  // when unsealed (after unseal, and after offer() on SIGHUP when unsealed). On an error the
  // offer is kept, so a later settle() tries again.
  Result<GateOutcome> settle();

  // The rules in force as recorded in the store (nullopt before the first settle).
  Result<std::optional<Rules>> in_force();

  // The policy_change executor (registered by the constructor): PARAMS {"rules": {...}}.
  Result<nlohmann::json> execute(const nlohmann::json& params, const std::string& requested_by);

 private:
  Status apply(const Rules& rules, const std::string& actor, const std::string& action,
               const std::optional<Rules>& previous);

  store::Store& store_;
  audit::AuditLog& audit_;
  Approvals& approvals_;
  std::mutex mu_;
  std::optional<Rules> offered_;
};

}  // namespace kmsd::approvals

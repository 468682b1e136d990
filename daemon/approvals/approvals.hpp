// k-of-n approvals (Exchange's "multiple password policy", Dogtag's required agents): a
// sensitive operation is submitted as a request, approved by distinct administrators, and
// runs when the k-th approval arrives. The requester counts as the first approval; nobody
// approves twice; one denial ends the request; requests expire. Every step is audited in the
// same transaction as the change it records.
#pragma once

#include <chrono>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "common/result.hpp"
#include "daemon/audit/audit_log.hpp"
#include "daemon/store/store.hpp"

namespace kmsd::approvals {

// How many distinct administrators each operation needs (k), from the configuration.
struct Rules {
  std::map<std::string, int> required;  // operation -> k; operations not listed need 1
  std::chrono::seconds ttl{std::chrono::hours(72)};
  int required_for(const std::string& operation) const {
    auto it = required.find(operation);
    return it == required.end() ? 1 : it->second;
  }
};

// What a submit/approve call did.
struct Outcome {
  std::string request_id;  // "" when the operation ran at once (k = 1)
  store::RequestState state = store::RequestState::kPending;
  int approvals = 0;  // approvals so far (requester included)
  int required = 1;
  nlohmann::json result;  // the operation's result once executed
  std::string message;    // a sentence for the administrator
};

// Runs an approved operation. Called inside the store transaction that marks the request
// executed, so a failed operation leaves the request pending-able state consistent: the
// request becomes "failed" with the error in its result.
using Executor = std::function<Result<nlohmann::json>(const nlohmann::json& params,
                                                      const std::string& requested_by)>;

// Thread-safety: safe to share; state changes serialize on store transactions.
class Approvals {
 public:
  Approvals(store::Store& store, audit::AuditLog& audit) : store_(store), audit_(audit) {}

  // Operations must be registered before requests for them can run.
  void register_operation(const std::string& operation, Executor executor);
  // Replaces the rules (SIGHUP). Pending requests keep the k they were created with.
  void set_rules(Rules rules);

  // REQUESTER_APPROVES false: the requester is not an administrator (the operator whose
  // configuration asks for a policy change), so no approval is recorded for it, all k come
  // from administrators, and even k = 1 makes a pending request.
  Result<Outcome> submit(const std::string& operation, const nlohmann::json& params,
                         const std::string& requester, bool requester_approves = true);
  // The rules submit() applies now.
  Rules rules() const;
  Result<Outcome> approve(const std::string& request_id, const std::string& approver);
  Result<Outcome> deny(const std::string& request_id, const std::string& approver);
  // Marks expired requests as such (also done lazily on approve/list).
  Result<std::vector<store::ApprovalRequestRecord>> list(std::optional<store::RequestState> state);

 private:
  Result<Outcome> run(store::ApprovalRequestRecord& req, const std::string& executed_by,
                      int approvals);
  Status expire_due(std::int64_t now);
  // Records ADMINISTRATOR's decision on a pending request (at most one per administrator).
  Result<store::ApprovalRequestRecord> decide(const std::string& request_id,
                                              const std::string& administrator, bool approve,
                                              std::int64_t now);

  store::Store& store_;
  audit::AuditLog& audit_;
  mutable std::mutex mu_;
  std::map<std::string, Executor> executors_;
  Rules rules_;
};

}  // namespace kmsd::approvals

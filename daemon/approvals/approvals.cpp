#include "daemon/approvals/approvals.hpp"

#include <openssl/rand.h>

#include <ctime>

#include "common/clock.hpp"
#include "common/ossl.hpp"

namespace kmsd::approvals {

using json = nlohmann::json;
using store::RequestState;

namespace {

Result<std::string> new_request_id() {
  std::uint8_t b[8];
  if (RAND_bytes(b, sizeof b) != 1) return ossl::crypto_error("drawing a request id");
  return ossl::hex(b);
}

int count_approvals(const std::vector<store::ApprovalRecord>& decisions) {
  int n = 0;
  for (const auto& d : decisions) n += d.approve ? 1 : 0;
  return n;
}

}  // namespace

void Approvals::register_operation(const std::string& operation, Executor executor) {
  std::lock_guard lk(mu_);
  executors_[operation] = std::move(executor);
}

void Approvals::set_rules(Rules rules) {
  std::lock_guard lk(mu_);
  rules_ = std::move(rules);
}

Status Approvals::expire_due(std::int64_t now) {
  KMSD_ASSIGN_OR_RETURN(auto pending, store_.approval_requests(RequestState::kPending));
  for (auto& r : pending) {
    if (r.expires_at > now) continue;
    r.state = RequestState::kExpired;
    r.decided_at = now;
    r.result = json{{"message", "expired before enough administrators approved"}}.dump();
    KMSD_TRY(store_.update_approval_request(r));
    KMSD_TRY(
        audit_.append("kmsd", "request.expire", {{"request", r.id}, {"operation", r.operation}}));
  }
  return {};
}

Result<Outcome> Approvals::run(store::ApprovalRequestRecord& req, const std::string& executed_by,
                               int approvals) {
  Executor executor;
  {
    std::lock_guard lk(mu_);
    auto it = executors_.find(req.operation);
    if (it != executors_.end()) executor = it->second;
  }
  Outcome out{req.id, RequestState::kExecuted, approvals, req.required, json::object(), ""};
  json params = json::parse(req.params, nullptr, false);
  Result<json> result = Error{ErrorCode::kInternal, "no executor"};
  if (!executor) {
    result = make_error(ErrorCode::kFailedPrecondition,
                        "operation '" + req.operation + "' is not known to this kmsd");
  } else {
    // The executor's changes form a nested transaction: if it fails, only they roll back.
    json value;
    Status st = store_.transaction([&]() -> Status {
      auto r = executor(params, req.requested_by);
      if (!r.ok()) return r.error();
      value = std::move(*r);
      return {};
    });
    result = st.ok() ? Result<json>(std::move(value)) : Result<json>(st.error());
  }
  req.decided_at = unix_now();
  if (result.ok()) {
    req.state = RequestState::kExecuted;
    out.result = *result;
    req.result = out.result.dump();
    out.message = "request " + req.id + " approved by " + std::to_string(approvals) + " of " +
                  std::to_string(req.required) + " administrators and executed";
  } else {
    req.state = RequestState::kFailed;
    out.state = RequestState::kFailed;
    req.result = json{{"error", result.error().message}}.dump();
    out.message = "request " + req.id + " was approved but failed: " + result.error().message;
  }
  KMSD_TRY(store_.update_approval_request(req));
  KMSD_TRY(audit_.append(executed_by, result.ok() ? "request.execute" : "request.fail",
                         {{"request", req.id},
                          {"operation", req.operation},
                          {"requested_by", req.requested_by},
                          {"approvals", approvals},
                          {"result", json::parse(*req.result, nullptr, false)}}));
  return out;
}

Rules Approvals::rules() const {
  std::lock_guard lk(mu_);
  return rules_;
}

Result<Outcome> Approvals::submit(const std::string& operation, const json& params,
                                  const std::string& requester, bool requester_approves) {
  Executor executor;
  Rules rules;
  {
    std::lock_guard lk(mu_);
    auto it = executors_.find(operation);
    if (it == executors_.end())
      return make_error(ErrorCode::kInvalidArgument, "unknown operation '" + operation + "'");
    executor = it->second;
    rules = rules_;
  }
  const int k = rules.required_for(operation);
  Outcome out;
  Status st = store_.transaction([&]() -> Status {
    const std::int64_t now = unix_now();
    if (k <= 1 && requester_approves) {
      KMSD_ASSIGN_OR_RETURN(out.result, executor(params, requester));
      KMSD_TRY(audit_.append(requester, operation, {{"params", params}, {"result", out.result}}));
      out.state = RequestState::kExecuted;
      out.approvals = out.required = 1;
      out.message = "done";
      return {};
    }
    store::ApprovalRequestRecord req;
    KMSD_ASSIGN_OR_RETURN(req.id, new_request_id());
    req.operation = operation;
    req.params = params.dump();
    req.requested_by = requester;
    req.required = k;
    req.state = RequestState::kPending;
    req.created_at = now;
    req.expires_at = now + rules.ttl.count();
    KMSD_TRY(store_.insert_approval_request(req));
    if (requester_approves) KMSD_TRY(store_.add_approval({req.id, requester, true, now}));
    KMSD_TRY(audit_.append(requester, "request.create",
                           {{"request", req.id},
                            {"operation", operation},
                            {"params", params},
                            {"required", k},
                            {"requester_approves", requester_approves}}));
    const int have = requester_approves ? 1 : 0;
    out.request_id = req.id;
    out.state = RequestState::kPending;
    out.approvals = have;
    out.required = k;
    out.message = "'" + operation + "' needs " + std::to_string(k) + " administrator(s): request " +
                  req.id + " is waiting for " + std::to_string(k - have) +
                  " more approval(s) (kmsctl request approve " + req.id + ")";
    return {};
  });
  if (!st.ok()) return st.error();
  return out;
}

Result<store::ApprovalRequestRecord> Approvals::decide(const std::string& request_id,
                                                       const std::string& administrator,
                                                       bool approve, std::int64_t now) {
  KMSD_TRY(expire_due(now));
  KMSD_ASSIGN_OR_RETURN(auto found, store_.find_approval_request(request_id));
  if (!found) return make_error(ErrorCode::kNotFound, "no request " + request_id);
  if (found->state != RequestState::kPending)
    return make_error(ErrorCode::kFailedPrecondition,
                      "request " + request_id + " is " + store::to_string(found->state) +
                          "; only pending requests can be " + (approve ? "approved" : "denied"));
  auto added = store_.add_approval({request_id, administrator, approve, now});
  if (!added.ok()) {
    if (added.error().code == ErrorCode::kAlreadyExists)
      return make_error(ErrorCode::kAlreadyExists,
                        "administrator '" + administrator + "' has already " +
                            (approve ? "approved" : "decided on") + " request " + request_id +
                            (approve ? "; another administrator must approve it" : ""));
    return added.error();
  }
  return *found;
}

Result<Outcome> Approvals::approve(const std::string& request_id, const std::string& approver) {
  Outcome out;
  Status st = store_.transaction([&]() -> Status {
    const std::int64_t now = unix_now();
    KMSD_ASSIGN_OR_RETURN(auto req, decide(request_id, approver, true, now));
    KMSD_ASSIGN_OR_RETURN(auto decisions, store_.approvals(request_id));
    const int n = count_approvals(decisions);
    KMSD_TRY(audit_.append(approver, "request.approve",
                           {{"request", request_id},
                            {"operation", req.operation},
                            {"approvals", n},
                            {"required", req.required}}));
    if (n >= req.required) {
      KMSD_ASSIGN_OR_RETURN(out, run(req, approver, n));
      return {};
    }
    out = Outcome{request_id,
                  RequestState::kPending,
                  n,
                  req.required,
                  json::object(),
                  "request " + request_id + " has " + std::to_string(n) + " of " +
                      std::to_string(req.required) + " approvals"};
    return {};
  });
  if (!st.ok()) return st.error();
  return out;
}

Result<Outcome> Approvals::deny(const std::string& request_id, const std::string& approver) {
  Outcome out;
  Status st = store_.transaction([&]() -> Status {
    const std::int64_t now = unix_now();
    KMSD_ASSIGN_OR_RETURN(auto req, decide(request_id, approver, false, now));
    req.state = RequestState::kDenied;
    req.decided_at = now;
    req.result = json{{"denied_by", approver}}.dump();
    KMSD_TRY(store_.update_approval_request(req));
    KMSD_TRY(audit_.append(approver, "request.deny",
                           {{"request", request_id}, {"operation", req.operation}}));
    out = Outcome{
        request_id,   RequestState::kDenied, 0,
        req.required, json::object(),        "request " + request_id + " denied by " + approver};
    return {};
  });
  if (!st.ok()) return st.error();
  return out;
}

Result<std::vector<store::ApprovalRequestRecord>> Approvals::list(
    std::optional<store::RequestState> state) {
  KMSD_TRY(store_.transaction([&] { return expire_due(unix_now()); }));
  return store_.approval_requests(state);
}

}  // namespace kmsd::approvals

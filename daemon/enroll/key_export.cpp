#include "daemon/enroll/key_export.hpp"

#include "common/clock.hpp"

namespace kmsd::enroll {

using json = nlohmann::json;

KeyExport::KeyExport(store::Store& store, audit::AuditLog& audit, approvals::Approvals& approvals,
                     EnrollmentService& enrollment, std::chrono::seconds collect_window)
    : store_(store),
      audit_(audit),
      approvals_(approvals),
      enrollment_(enrollment),
      window_(collect_window) {
  approvals_.register_operation(
      kKeyExport, [this](const json& p, const std::string& by) { return execute(p, by); });
}

namespace {

Result<int> escrowed_depth(store::Store& store, const std::string& user_id) {
  KMSD_ASSIGN_OR_RETURN(auto user, store.find_user(user_id));
  if (!user) return make_error(ErrorCode::kNotFound, "no user " + user_id + " is enabled");
  KMSD_ASSIGN_OR_RETURN(int depth, store.key_history_depth(user_id));
  if (depth == 0)
    return make_error(ErrorCode::kFailedPrecondition,
                      "user " + user_id +
                          " has no escrowed key yet (never enrolled): nothing to "
                          "export");
  return depth;
}

}  // namespace

Result<approvals::Outcome> KeyExport::request(const std::string& user_id,
                                              const std::string& requester) {
  // Refused before a request exists, so approvers are never asked about an export that
  // cannot run.
  if (auto depth = escrowed_depth(store_, user_id); !depth.ok()) return depth.error();
  return approvals_.submit(kKeyExport, {{"user", user_id}}, requester);
}

// Runs inside the transaction that marks the request executed: records what may be
// collected, by whom and until when. No key is opened or stored here.
Result<json> KeyExport::execute(const json& params, const std::string& requested_by) {
  const std::string user_id = params.value("user", std::string());
  KMSD_ASSIGN_OR_RETURN(int depth, escrowed_depth(store_, user_id));
  return json{
      {"user", user_id},
      {"keys", depth},
      {"collect_by", requested_by},
      {"collect_before", unix_now() + window_.count()},
      {"message", "approved: " + requested_by + " may collect " + std::to_string(depth) +
                      " escrowed key(s) of " + user_id + " once, with kmsctl user collect-keys"}};
}

namespace {

// Why request REQ cannot be collected by WHO at NOW, or nothing.
Status collectable(const store::ApprovalRequestRecord& req, const json& result,
                   const std::string& who, std::int64_t now) {
  auto refused = [&](const std::string& why) {
    return make_error(ErrorCode::kFailedPrecondition, "export " + req.id + " " + why);
  };
  if (req.requested_by != who)
    return make_error(ErrorCode::kPermissionDenied, "export " + req.id + " was asked for by " +
                                                        req.requested_by +
                                                        "; only the requester may collect it");
  switch (req.state) {
    case store::RequestState::kExecuted:
      break;
    case store::RequestState::kPending:
      return refused("still waits for approvals; see kmsctl request list");
    default:
      return refused(std::string("is ") + store::to_string(req.state) + "; ask for a new export");
  }
  if (result.contains("collected_at"))
    return refused("was already collected; ask for a new export");
  if (now >= result.value("collect_before", std::int64_t{0}))
    return refused("was approved but not collected in time; ask for a new export");
  return {};
}

}  // namespace

Result<ExportedKeys> KeyExport::collect(const std::string& request_id, const std::string& who) {
  auto load = [&]() -> Result<std::pair<store::ApprovalRequestRecord, json>> {
    KMSD_ASSIGN_OR_RETURN(auto req, store_.find_approval_request(request_id));
    if (!req || req->operation != kKeyExport)
      return make_error(ErrorCode::kNotFound, "no key export request " + request_id);
    json result = req->result ? json::parse(*req->result, nullptr, false) : json::object();
    if (!result.is_object()) result = json::object();
    return std::pair{std::move(*req), std::move(result)};
  };
  KMSD_ASSIGN_OR_RETURN(auto first, load());
  KMSD_TRY(collectable(first.first, first.second, who, unix_now()));

  ExportedKeys out;
  out.user_id = first.second.value("user", std::string());
  out.request_id = request_id;
  // Token work outside the store lock; the transaction below re-checks that nobody collected
  // meanwhile, so two concurrent collections hand the keys out once.
  KMSD_ASSIGN_OR_RETURN(out.keys, enrollment_.escrowed_keys(out.user_id));
  Status st = store_.transaction([&]() -> Status {
    KMSD_ASSIGN_OR_RETURN(auto again, load());
    auto& [req, result] = again;
    const std::int64_t now = unix_now();
    KMSD_TRY(collectable(req, result, who, now));
    result["collected_at"] = now;
    req.result = result.dump();
    KMSD_TRY(store_.update_approval_request(req));
    json versions = json::array();
    for (const auto& k : out.keys) versions.push_back(k.version);
    return audit_.append(
        who, "user.keys.export",
        {{"user", out.user_id}, {"request", request_id}, {"key_versions", versions}});
  });
  if (!st.ok()) return st.error();
  return out;
}

}  // namespace kmsd::enroll

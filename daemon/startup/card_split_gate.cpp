#include "daemon/startup/card_split_gate.hpp"

#include "common/clock.hpp"

namespace kmsd::startup {

using json = nlohmann::json;

json SplitPlan::to_json() const {
  return json{
      {"k", k}, {"cards", cards}, {"n", cards.size()}, {"module", module}, {"label", label}};
}

Result<SplitPlan> SplitPlan::from_json(const json& j) {
  auto bad = [](const std::string& why) {
    return make_error(ErrorCode::kInvalidArgument, "card split plan: " + why);
  };
  if (!j.is_object()) return bad("not a JSON object");
  SplitPlan p;
  if (!j.contains("k") || !j["k"].is_number_unsigned()) return bad("\"k\" must be a number");
  p.k = j["k"].get<unsigned>();
  if (!j.contains("cards") || !j["cards"].is_array()) return bad("\"cards\" must be a list");
  for (const auto& c : j["cards"]) {
    if (!c.is_string() || c.get<std::string>().rfind("pkcs11:", 0) != 0)
      return bad("every card must be a pkcs11: URI");
    p.cards.push_back(c.get<std::string>());
  }
  for (const char* key : {"module", "label"}) {
    if (!j.contains(key) || !j[key].is_string() || j[key].get<std::string>().empty())
      return bad(std::string("\"") + key + "\" must be a non-empty string");
  }
  p.module = j["module"];
  p.label = j["label"];
  if (p.k < 2 || p.k > p.cards.size() || p.cards.size() > 255)
    return bad("needs 2 <= k <= number of cards <= 255");
  return p;
}

CardSplitGate::CardSplitGate(store::Store& store, audit::AuditLog& audit,
                             approvals::Approvals& approvals, std::chrono::seconds start_window)
    : store_(store), audit_(audit), approvals_(approvals), window_(start_window) {
  approvals_.register_operation(kCardSplit,
                                [this](const json& p, const std::string&) { return execute(p); });
}

Result<approvals::Outcome> CardSplitGate::request(const SplitPlan& plan,
                                                  const std::string& requester) {
  return approvals_.submit(kCardSplit, plan.to_json(), requester, /*requester_approves=*/false);
}

// Runs in the transaction that marks the request executed: records until when the operator
// may start. No card is touched here.
Result<json> CardSplitGate::execute(const json& params) {
  KMSD_ASSIGN_OR_RETURN(auto plan, SplitPlan::from_json(params));
  const auto hours = std::chrono::duration_cast<std::chrono::hours>(window_).count();
  return json{
      {"start_before", unix_now() + window_.count()},
      {"message", "approved: the operator may now write the " + std::to_string(plan.cards.size()) +
                      " new cards once, with `kmsctl "
                      "card split ... --request` and this request's id, within " +
                      std::to_string(hours) + " hour(s)"}};
}

namespace {

struct Loaded {
  store::ApprovalRequestRecord req;
  json result;
};

Result<Loaded> load(store::Store& store, const std::string& id) {
  KMSD_ASSIGN_OR_RETURN(auto req, store.find_approval_request(id));
  if (!req || req->operation != kCardSplit)
    return make_error(ErrorCode::kNotFound,
                      "no card split request " + id + " (kmsctl request list shows them)");
  json result = req->result ? json::parse(*req->result, nullptr, false) : json::object();
  if (!result.is_object()) result = json::object();
  return Loaded{std::move(*req), std::move(result)};
}

std::string describe(const SplitPlan& p) {
  std::string cards;
  for (const auto& c : p.cards) cards += (cards.empty() ? "" : ", ") + c;
  return std::to_string(p.k) + " of " + std::to_string(p.cards.size()) + " cards (" + cards +
         "), label '" + p.label + "' on " + p.module;
}

}  // namespace

Status CardSplitGate::begin(const std::string& id, const SplitPlan& plan, const std::string& who) {
  return store_.transaction([&]() -> Status {
    KMSD_ASSIGN_OR_RETURN(auto l, load(store_, id));
    const std::int64_t now = unix_now();
    auto refused = [&](const std::string& why) {
      return make_error(ErrorCode::kFailedPrecondition, "card split request " + id + " " + why);
    };
    if (l.req.state == store::RequestState::kPending && now < l.req.expires_at) {
      KMSD_ASSIGN_OR_RETURN(auto decisions, store_.approvals(id));
      int approvals = 0;
      for (const auto& d : decisions) approvals += d.approve ? 1 : 0;
      return make_error(ErrorCode::kPermissionDenied,
                        "card split request " + id + " still waits for approvals (" +
                            std::to_string(approvals) + " of " + std::to_string(l.req.required) +
                            "): administrators approve it with `kmsctl request approve " + id +
                            "`; no card was written");
    }
    if (l.req.state != store::RequestState::kExecuted)
      return refused(std::string("is ") +
                     (l.req.state == store::RequestState::kPending
                          ? "expired"
                          : store::to_string(l.req.state)) +
                     "; ask for a new one (run kmsctl card split without --request)");
    json params = json::parse(l.req.params, nullptr, false);
    auto approved = SplitPlan::from_json(params);
    if (!approved.ok() || !(*approved == plan))
      return refused("approved another split: " +
                     (approved.ok() ? describe(*approved) : approved.error().message) +
                     "; this one is " + describe(plan) +
                     ". Run exactly the approved split, or ask for a new request");
    if (l.result.contains("started_at"))
      return refused(
          "was already used; ask for a new one (run kmsctl card split without "
          "--request)");
    if (now >= l.result.value("start_before", std::int64_t{0}))
      return refused("was approved but not used in time; ask for a new one");
    l.result["started_at"] = now;
    l.result["started_by"] = who;
    l.req.result = l.result.dump();
    KMSD_TRY(store_.update_approval_request(l.req));
    json details = plan.to_json();
    details["request"] = id;
    return audit_.append(who, "card.split.start", details);
  });
}

Status CardSplitGate::finish(const std::string& id, bool ok, const std::string& quorum_id,
                             const std::string& why, const std::string& who) {
  return store_.transaction([&]() -> Status {
    KMSD_ASSIGN_OR_RETURN(auto l, load(store_, id));
    if (!l.result.contains("started_at"))
      return make_error(ErrorCode::kFailedPrecondition,
                        "card split request " + id + " was never started; nothing to finish");
    if (l.result.contains("finished_at"))
      return make_error(ErrorCode::kFailedPrecondition,
                        "card split request " + id + " is already finished");
    l.result["finished_at"] = unix_now();
    l.result["ok"] = ok;
    json details{{"request", id}};
    if (ok) {
      l.result["quorum"] = quorum_id;
      details["quorum"] = quorum_id;
    } else {
      l.result["error"] = why;
      details["error"] = why;
    }
    l.req.result = l.result.dump();
    KMSD_TRY(store_.update_approval_request(l.req));
    return audit_.append(who, ok ? "card.split" : "card.split.failed", details);
  });
}

}  // namespace kmsd::startup

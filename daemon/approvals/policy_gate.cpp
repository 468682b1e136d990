#include "daemon/approvals/policy_gate.hpp"

#include <spdlog/spdlog.h>

namespace kmsd::approvals {

using json = nlohmann::json;

json rules_to_json(const Rules& rules) {
  json required = json::object();
  for (const auto& [op, k] : rules.required)
    if (k != 1) required[op] = k;
  return json{{"v", 1}, {"required", required}, {"ttl_seconds", rules.ttl.count()}};
}

Result<Rules> rules_from_json(const json& j) {
  auto bad = [](const std::string& what) {
    return make_error(ErrorCode::kInvalidArgument, "approval rules: " + what);
  };
  if (!j.is_object()) return bad("expected a JSON object");
  if (!j.contains("v") || !j["v"].is_number_integer() || j["v"].get<int>() != 1)
    return bad("unknown format version (this kmsd reads version 1)");
  if (!j.contains("required") || !j["required"].is_object())
    return bad("\"required\" (an object) is missing");
  if (!j.contains("ttl_seconds") || !j["ttl_seconds"].is_number_integer() ||
      j["ttl_seconds"].get<std::int64_t>() <= 0)
    return bad("\"ttl_seconds\" must be a positive integer");
  Rules r;
  r.ttl = std::chrono::seconds(j["ttl_seconds"].get<std::int64_t>());
  for (const auto& [op, k] : j["required"].items()) {
    if (!k.is_number_integer() || k.get<std::int64_t>() < 1 || k.get<std::int64_t>() > 1000)
      return bad("\"" + op + "\" must need 1 to 1000 administrators");
    r.required[op] = k.get<int>();
  }
  return r;
}

bool same_rules(const Rules& a, const Rules& b) {
  return rules_to_json(a) == rules_to_json(b);
}

namespace {

std::string describe(const Rules& r) {
  std::string out;
  for (const auto& [op, k] : r.required)
    if (k != 1) out += (out.empty() ? "" : ", ") + op + "=" + std::to_string(k);
  if (out.empty()) out = "every operation needs 1";
  return out + "; requests expire after " + std::to_string(r.ttl.count() / 3600) + " h";
}

}  // namespace

PolicyGate::PolicyGate(store::Store& store, audit::AuditLog& audit, Approvals& approvals)
    : store_(store), audit_(audit), approvals_(approvals) {
  approvals_.register_operation(kPolicyChange, [this](const json& params, const std::string& by) {
    return execute(params, by);
  });
}

Result<std::optional<Rules>> PolicyGate::in_force() {
  KMSD_ASSIGN_OR_RETURN(auto text, store_.get_setting(kSettingRulesInForce));
  if (!text) return std::optional<Rules>();
  auto j = json::parse(*text, nullptr, false);
  auto rules = rules_from_json(j);
  if (!rules.ok())
    return make_error(ErrorCode::kStore,
                      std::string("the approval rules in force (store setting ") +
                          kSettingRulesInForce + ") cannot be read: " + rules.error().message +
                          "; restore the store from a backup");
  return std::optional<Rules>(std::move(*rules));
}

Status PolicyGate::load(const Rules& configured) {
  std::lock_guard lk(mu_);
  offered_ = configured;
  KMSD_ASSIGN_OR_RETURN(auto current, in_force());
  if (current) {
    approvals_.set_rules(*current);
    return {};
  }
  KMSD_TRY(store_.put_setting(kSettingRulesInForce, rules_to_json(configured).dump()));
  approvals_.set_rules(configured);
  spdlog::info("approval rules adopted from the configuration on first start: {}",
               describe(configured));
  return {};
}

void PolicyGate::offer(const Rules& configured) {
  std::lock_guard lk(mu_);
  offered_ = configured;
}

Status PolicyGate::apply(const Rules& rules, const std::string& actor, const std::string& action,
                         const std::optional<Rules>& previous) {
  KMSD_TRY(store_.transaction([&]() -> Status {
    KMSD_TRY(store_.put_setting(kSettingRulesInForce, rules_to_json(rules).dump()));
    return audit_.append(actor, action,
                         {{"from", previous ? rules_to_json(*previous) : json(nullptr)},
                          {"to", rules_to_json(rules)}});
  }));
  approvals_.set_rules(rules);
  return {};
}

Result<GateOutcome> PolicyGate::settle() {
  std::lock_guard lk(mu_);
  GateOutcome out;
  if (!offered_) return out;
  const Rules offered = *offered_;
  KMSD_ASSIGN_OR_RETURN(auto current, in_force());
  if (!current) {
    // load() was not called (or the setting vanished): nothing to compare with; record these.
    KMSD_TRY(apply(offered, kOperator, "approvals.rules.change", std::nullopt));
    out.kind = GateOutcome::Kind::kApplied;
    out.message = "approval rules recorded: " + describe(offered);
    offered_.reset();
    return out;
  }
  if (same_rules(offered, *current)) {
    approvals_.set_rules(*current);
    out.kind = GateOutcome::Kind::kUnchanged;
    out.message = "approval rules unchanged: " + describe(*current);
    offered_.reset();
    return out;
  }
  const int k = current->required_for(kPolicyChange);
  if (k <= 1) {
    KMSD_TRY(apply(offered, kOperator, "approvals.rules.change", current));
    out.kind = GateOutcome::Kind::kApplied;
    out.message =
        "approval rules changed by the configuration (the rules in force needed 1 "
        "approval for policy_change): " +
        describe(offered);
    offered_.reset();
    return out;
  }
  const json wanted = rules_to_json(offered);
  KMSD_ASSIGN_OR_RETURN(auto pending, approvals_.list(store::RequestState::kPending));
  for (const auto& r : pending) {
    if (r.operation != kPolicyChange) continue;
    auto params = json::parse(r.params, nullptr, false);
    if (!params.is_object() || !params.contains("rules") || params["rules"] != wanted) continue;
    out.kind = GateOutcome::Kind::kAlreadyPending;
    out.request_id = r.id;
    out.required = r.required;
    out.message = "the configuration's approval rules (" + describe(offered) +
                  ") still wait for administrators: request " + r.id + " (kmsctl request approve " +
                  r.id + "); the rules in force stay: " + describe(*current);
    offered_.reset();
    return out;
  }
  KMSD_ASSIGN_OR_RETURN(
      auto submitted,
      approvals_.submit(kPolicyChange, {{"rules", wanted}, {"previous", rules_to_json(*current)}},
                        kOperator, /*requester_approves=*/false));
  out.kind = GateOutcome::Kind::kPending;
  out.request_id = submitted.request_id;
  out.required = submitted.required;
  out.message = "the configuration asks for other approval rules (" + describe(offered) +
                "); changing them needs " + std::to_string(submitted.required) +
                " administrator approval(s): request " + submitted.request_id +
                " (kmsctl request approve " + submitted.request_id +
                "); until then the rules in force stay: " + describe(*current);
  offered_.reset();
  return out;
}

Result<json> PolicyGate::execute(const json& params, const std::string& requested_by) {
  if (!params.is_object() || !params.contains("rules"))
    return make_error(ErrorCode::kInvalidArgument, "a policy_change request needs \"rules\"");
  KMSD_ASSIGN_OR_RETURN(auto rules, rules_from_json(params["rules"]));
  KMSD_ASSIGN_OR_RETURN(auto current, in_force());
  KMSD_TRY(apply(rules, requested_by, "approvals.rules.change", current));
  return json{{"rules", rules_to_json(rules)},
              {"message", "approval rules in force now: " + describe(rules)}};
}

}  // namespace kmsd::approvals

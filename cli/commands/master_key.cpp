// kmsctl master-key rotate | status | retire: master-key rotation (README "Master-key rotation").
// Rotate creates the next master-key version on the token and re-wraps every sealed record in the
// background (may need approvals); status shows its progress; retire destroys an old version
// once no record needs it (refused with exit 3 otherwise).
#include <iostream>

#include "cli/commands/common.hpp"

namespace kmsd::cli {

namespace {

using json = nlohmann::json;

struct MasterKeyArgs : AdminArgs {
  std::size_t batch = 100;
  std::int64_t pause_ms = 0;
  std::uint32_t version = 0;
};

int run_rotate(const MasterKeyArgs& a) {
  return run_outcome(a, "/v1/master-key/rotate",
                     json{{"batch", a.batch}, {"pause_ms", a.pause_ms}});
}

int run_retire(const MasterKeyArgs& a) {
  return run_outcome(a, "/v1/master-key/retire", json{{"version", a.version}});
}

std::string text_of(const json& v) {
  return v.is_string() ? v.get<std::string>() : v.dump();
}

int run_status(const MasterKeyArgs& a) {
  auto reply = call_json(a, "/v1/master-key", std::nullopt);
  if (auto* rc = std::get_if<int>(&reply)) return *rc;
  const json& j = std::get<json>(reply);
  if (a.output == "json") {
    std::cout << j.dump(2) << "\n";
    return kOk;
  }
  std::cout << "current version:  v" << text_of(j.value("current_version", json(0))) << "\n";
  std::cout << "rotation:         " << text_of(j.value("state", json("idle")));
  if (j.contains("target")) std::cout << " (to v" << text_of(j["target"]) << ")";
  std::cout << "\n";
  if (j.contains("total"))
    std::cout << "re-wrapped:       " << text_of(j.value("done", json(0))) << " of "
              << text_of(j["total"]) << " (phase " << text_of(j.value("phase", json("")))
              << ", pass " << text_of(j.value("pass", json(1))) << ")\n";
  if (j.contains("rate_per_second"))
    std::cout << "rate:             " << j["rate_per_second"].get<double>()
              << " re-wraps/s in this kmsd process\n";
  if (j.contains("paused_because"))
    std::cout << "paused because:   " << text_of(j["paused_because"]) << "\n";
  if (j.contains("remaining") && j["remaining"] != 0)
    std::cout << "still under older versions: " << text_of(j["remaining"]) << "\n";
  if (j.contains("token_versions")) {
    std::cout << "on the token:    ";
    for (const auto& v : j["token_versions"]) std::cout << " v" << text_of(v);
    std::cout << "\n";
  }
  if (j.contains("escrowed_keys_by_version"))
    for (const auto& [v, n] : j["escrowed_keys_by_version"].items())
      std::cout << "escrowed keys under v" << v << ": " << text_of(n) << "\n";
  return kOk;
}

}  // namespace

void add_master_key_commands(CLI::App& app, Commands& commands) {
  auto* mk = app.add_subcommand("master-key", "rotate and retire the master key (re-wraps escrow)");
  mk->require_subcommand(1);

  auto* rotate = mk->add_subcommand(
      "rotate",
      "create the next master-key version and re-wrap every sealed record in the background "
      "(may need approvals)");
  auto& r = commands.add<MasterKeyArgs>(rotate, run_rotate);
  rotate->add_option("--batch", r.batch, "records re-wrapped per store transaction (default 100)")
      ->check(CLI::Range(1, 10000));
  rotate->add_option("--pause-ms", r.pause_ms, "pause between batches in milliseconds (default 0)")
      ->check(CLI::Range(0, 60000));
  add_admin_options(rotate, r);

  auto* status = mk->add_subcommand("status", "the rotation's progress and the master keys");
  auto& s = commands.add<MasterKeyArgs>(status, run_status);
  add_admin_options(status, s);

  auto* retire = mk->add_subcommand(
      "retire",
      "destroy master key VERSION on the token once no record needs it (may need approvals; "
      "exit 3 while records still need it)");
  auto& t = commands.add<MasterKeyArgs>(retire, run_retire);
  retire->add_option("VERSION", t.version, "the master-key version to destroy")
      ->required()
      ->check(CLI::Range(1u, 0xffffffffu));
  add_admin_options(retire, t);
}

}  // namespace kmsd::cli

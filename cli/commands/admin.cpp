// kmsctl whoami, request list | approve | deny, audit verify | export, report users.
#include <iostream>

#include "cli/commands/common.hpp"
#include "cli/render.hpp"

namespace kmsd::cli {

namespace {

struct AdminCommandArgs : AdminArgs {
  std::string id;     // request id
  std::string state;  // request list filter
  std::string out;    // file for exports and reports
  std::string format = "csv";
};

int run_whoami(const AdminCommandArgs& a) {
  auto reply = call_json(a, "/v1/whoami", std::nullopt);
  if (auto* rc = std::get_if<int>(&reply)) return *rc;
  const auto& j = std::get<nlohmann::json>(reply);
  if (a.output == "json")
    std::cout << j.dump(2) << "\n";
  else
    std::cout << render::text(j, "name") << " (" << render::text(j, "role") << ", certificate "
              << render::text(j, "certificate_serial") << ")\n";
  return kOk;
}

int run_request_list(const AdminCommandArgs& a) {
  std::string target = "/v1/requests";
  if (!a.state.empty()) target += "?state=" + render::url_encode(a.state);
  auto reply = call_json(a, target, std::nullopt);
  if (auto* rc = std::get_if<int>(&reply)) return *rc;
  const auto& j = std::get<nlohmann::json>(reply);
  if (a.output == "json")
    std::cout << j.dump(2) << "\n";
  else if (a.output == "csv")
    std::cout << render::requests_csv(j);
  else
    std::cout << render::requests_table(j);
  return kOk;
}

int run_request_approve(const AdminCommandArgs& a) {
  return run_outcome(a, "/v1/requests/" + render::url_encode(a.id) + "/approve",
                     nlohmann::json::object());
}

int run_request_deny(const AdminCommandArgs& a) {
  return run_outcome(a, "/v1/requests/" + render::url_encode(a.id) + "/deny",
                     nlohmann::json::object(), /*denial_wanted=*/true);
}

int run_audit_verify(const AdminCommandArgs& a) {
  auto reply = call_json(a, "/v1/audit/verify", std::nullopt);
  if (auto* rc = std::get_if<int>(&reply)) return *rc;
  const auto& j = std::get<nlohmann::json>(reply);
  return show_verdict(a, j, render::audit_verify(j));
}

// GETs TARGET and writes the body as it came to stdout or --out.
int fetch(const AdminCommandArgs& a, const std::string& target) {
  auto c = connect_admin(a);
  if (!c.ok()) return fail(c.error());
  auto r = (*c)->get(target);
  if (!r.ok()) return fail(r.error());
  if (int rc = exit_for_reply(*r); rc != kOk) return rc;
  return write_output(a.out, r->body);
}

int run_audit_export(const AdminCommandArgs& a) {
  return fetch(a, "/v1/audit/export");
}

int run_report_users(const AdminCommandArgs& a) {
  return fetch(a, "/v1/reports/users?format=" + render::url_encode(a.format));
}

AdminCommandArgs& add_command(CLI::App* parent, Commands& commands, const char* name,
                              const char* help, int (*run)(const AdminCommandArgs&),
                              std::vector<std::string> outputs = {"table", "json"}) {
  auto* cmd = parent->add_subcommand(name, help);
  auto& a = commands.add<AdminCommandArgs>(cmd, run);
  add_admin_options(cmd, a, std::move(outputs));
  return a;
}

void add_out_option(CLI::App* cmd, AdminCommandArgs& a) {
  cmd->add_option("--out", a.out, "write to FILE (mode 0600, never overwritten; default stdout)");
}

}  // namespace

void add_admin_commands(CLI::App& app, Commands& commands) {
  add_command(&app, commands, "whoami", "the administrator your certificate stands for",
              run_whoami);

  auto* request = app.add_subcommand("request", "list, approve and deny k-of-n requests");
  request->require_subcommand(1);
  auto& list = add_command(request, commands, "list", "approval requests", run_request_list,
                           {"table", "json", "csv"});
  request->get_subcommand("list")
      ->add_option("--state", list.state, "only requests in this state")
      ->check(CLI::IsMember({"pending", "executed", "denied", "expired", "failed"}));
  auto add_decision = [&](const char* name, const char* help, int (*run)(const AdminCommandArgs&)) {
    auto& a = add_command(request, commands, name, help, run);
    request->get_subcommand(name)->add_option("ID", a.id, "the request id")->required();
  };
  add_decision("approve", "approve a request (it runs once it has enough approvals)",
               run_request_approve);
  add_decision("deny", "deny a request (one denial ends it)", run_request_deny);

  auto* audit = app.add_subcommand("audit", "check and export the audit log");
  audit->require_subcommand(1);
  add_command(audit, commands, "verify",
              "recompute the audit chain; exit 1 naming the first bad "
              "record",
              run_audit_verify);
  auto& exp = add_command(audit, commands, "export", "every audit record, one JSON object a line",
                          run_audit_export, {});
  add_out_option(audit->get_subcommand("export"), exp);

  auto* report = app.add_subcommand("report", "reports");
  report->require_subcommand(1);
  auto& users =
      add_command(report, commands, "users", "which users use the KMS: state, certificates, tokens",
                  run_report_users, {});
  auto* users_cmd = report->get_subcommand("users");
  users_cmd->add_option("--format", users.format, "csv, json or ldif")
      ->check(CLI::IsMember({"csv", "json", "ldif"}))
      ->capture_default_str();
  add_out_option(users_cmd, users);
}

}  // namespace kmsd::cli

// kmsctl user enable | show | reissue | revoke | recover | export-keys | collect-keys: one user
// at a time.
#include <filesystem>
#include <iostream>

#include "cli/commands/common.hpp"
#include "cli/render.hpp"

namespace kmsd::cli {

namespace {

struct UserArgs : AdminArgs {
  std::string id;
  std::string email;
  std::string name;
  std::string dn;
  std::optional<int> reason;
  // collect-keys
  std::string out;
  std::string new_passphrase_file;
};

std::string user_path(const std::string& id, const std::string& action = "") {
  return "/v1/users/" + render::url_encode(id) + (action.empty() ? "" : "/" + action);
}

// Shows a reply as JSON, or as text made by RENDER; the exit code.
int show(const AdminArgs& a, const std::string& target, const std::optional<nlohmann::json>& body,
         std::string (*render)(const nlohmann::json&)) {
  auto reply = call_json(a, target, body);
  if (auto* rc = std::get_if<int>(&reply)) return *rc;
  const auto& j = std::get<nlohmann::json>(reply);
  std::cout << (a.output == "json" ? j.dump(2) + "\n" : render(j));
  return kOk;
}

int run_enable(const UserArgs& a) {
  nlohmann::json body = {{"id", a.id}, {"email", a.email}, {"display_name", a.name}};
  if (!a.dn.empty()) body["dn"] = a.dn;
  return show(a, "/v1/users", body, render::issued);
}

int run_show(const UserArgs& a) {
  return show(a, user_path(a.id), std::nullopt, render::user);
}

int run_reissue(const UserArgs& a) {
  return show(a, user_path(a.id, "reissue"), nlohmann::json::object(), render::issued);
}

int run_revoke(const UserArgs& a) {
  auto body = nlohmann::json::object();
  if (a.reason) body["reason"] = *a.reason;
  return run_outcome(a, user_path(a.id, "revoke"), body);
}

int run_recover(const UserArgs& a) {
  return run_outcome(a, user_path(a.id, "recover"), nlohmann::json::object());
}

// A recovery administrator asks for the user's whole escrowed key history.
int run_export_keys(const UserArgs& a) {
  return run_outcome(a, user_path(a.id, "export"), nlohmann::json::object());
}

// ... and, once approved, collects it (once) into a PKCS#12 of their own passphrase.
int run_collect_keys(const UserArgs& a) {
  if (std::filesystem::exists(a.out)) {
    std::cerr << "kmsctl: " << a.out << " exists; choose another --out (never overwritten)\n";
    return kExists;
  }
  auto reply = call_json(a, "/v1/requests/" + render::url_encode(a.id) + "/collect",
                         nlohmann::json::object());
  if (auto* rc = std::get_if<int>(&reply)) return *rc;
  const auto& j = std::get<nlohmann::json>(reply);
  const std::string user = j.value("user", std::string());
  if (int rc = write_key_bundle(a.out, a.ca, a.new_passphrase_file, nullptr, nullptr,
                                j.value("keys", nlohmann::json::array()), user);
      rc != kOk)
    return rc;
  std::cout << "wrote " << j.value("keys", nlohmann::json::array()).size() << " escrowed key(s) of "
            << user << " to " << a.out << "; the export is spent: ask again for another copy\n";
  return kOk;
}

UserArgs& add_user_command(CLI::App* user, Commands& commands, const char* name, const char* help,
                           int (*run)(const UserArgs&)) {
  auto* cmd = user->add_subcommand(name, help);
  auto& a = commands.add<UserArgs>(cmd, run);
  cmd->add_option("ID", a.id, "the user's id (uid or mailbox DN)")->required();
  add_admin_options(cmd, a);
  return a;
}

}  // namespace

void add_user_commands(CLI::App& app, Commands& commands) {
  auto* user = app.add_subcommand("user", "enable, look up, reissue, revoke and recover users");
  user->require_subcommand(1);

  auto& enable = add_user_command(user, commands, "enable",
                                  "enable a user and show the enrollment token (once)", run_enable);
  auto* cmd = user->get_subcommand("enable");
  cmd->add_option("--email", enable.email, "the user's e-mail address")->required();
  cmd->add_option("--name", enable.name, "the user's display name")->required();
  cmd->add_option("--dn", enable.dn, "explicit subject DN for the user's certificates");

  add_user_command(user, commands, "show", "the user, token status, key history, certificates",
                   run_show);
  add_user_command(user, commands, "reissue",
                   "a new enrollment token (enabled) or recovery token (recovery)", run_reissue);
  auto& revoke = add_user_command(
      user, commands, "revoke", "revoke the user's certificates (may need approvals)", run_revoke);
  user->get_subcommand("revoke")
      ->add_option("--reason", revoke.reason, "RFC 5280 reason code (default 0, unspecified)")
      ->check(CLI::Range(0, 10));
  add_user_command(user, commands, "recover",
                   "put the user into recovery (may need approvals); then reissue", run_recover);

  add_user_command(user, commands, "export-keys",
                   "recovery role: ask for the user's escrowed key history (needs approvals)",
                   run_export_keys);
  auto& collect = add_user_command(
      user, commands, "collect-keys",
      "recovery role: collect an approved export (ID is the request id) into a PKCS#12",
      run_collect_keys);
  cmd = user->get_subcommand("collect-keys");
  cmd->add_option("--out", collect.out, "the PKCS#12 file to write (0600; never overwritten)")
      ->required();
  cmd->add_option("--new-passphrase-file", collect.new_passphrase_file,
                  "0600 file with the passphrase for the PKCS#12 (default: asked twice)");

  add_bulk_command(user, commands);
}

}  // namespace kmsd::cli

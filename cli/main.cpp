// kmsctl: the administrator's and operator's client. A thin main over the command groups in
// cli/commands/ (exit codes: cli/commands/common.hpp).
#include <CLI/CLI.hpp>

#include "cli/commands/common.hpp"

int main(int argc, char** argv) {
  using namespace kmsd::cli;
  CLI::App app{"kmsctl — administer kmsd"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("kmsctl ") + KMSD_VERSION);

  Commands commands;
  add_local_commands(app, commands);
  add_admin_commands(app, commands);
  add_admins_commands(app, commands);
  add_user_commands(app, commands);
  add_enroll_commands(app, commands);
  add_dr_commands(app, commands);
  add_card_commands(app, commands);
  add_backup_commands(app, commands);
  add_master_key_commands(app, commands);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);
    return rc == 0 ? 0 : kUsage;
  }
  return commands.run();
}

// What every kmsctl command shares: exit codes, error printing, secrets, the admin API
// connection options, and the table of commands main() runs.
//
// Exit codes (stable, for scripts):
//   0 success                  1 the operation failed       2 bad usage or configuration
//   3 refused: state exists    4 wrong secret / PIN locked  5 kmsd not reachable
#pragma once

#include <openssl/types.h>
#include <CLI/CLI.hpp>
#include <chrono>
#include <nlohmann/json.hpp>

#include <chrono>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "cli/client/admin_client.hpp"
#include "cli/render.hpp"
#include "common/result.hpp"
#include "common/secret.hpp"
#include "config/config.hpp"
#include "hsm/token.hpp"

namespace kmsd::cli {

enum Exit { kOk = 0, kFailed = 1, kUsage = 2, kExists = 3, kAuth = 4, kUnreachable = 5 };

int exit_for(const Error& e);
// Prints "kmsctl: <message>" on stderr and returns the exit code for E.
int fail(const Error& e);

std::optional<config::Config> load_config(const std::string& path);
// The secret in FILE, else asked for on the terminal with PROMPT.
Result<SecretBytes> secret_from(const std::string& file, const std::string& prompt);

// The subcommands main() offers, each with the function that runs it once parsed.
class Commands {
 public:
  // Adds RUN for CMD; ARGS is kept alive as long as the command table (CLI11 binds options to
  // its members).
  template <typename Args>
  Args& add(CLI::App* cmd, std::function<int(const Args&)> run) {
    auto args = std::make_shared<Args>();
    entries_.push_back({cmd, [args, run] { return run(*args); }, args});
    return *args;
  }
  // Runs the command that was parsed; kUsage when none was.
  int run() const;

 private:
  struct Entry {
    CLI::App* cmd;
    std::function<int()> run;
    std::shared_ptr<void> args;
  };
  std::vector<Entry> entries_;
};

// How kmsctl reaches the admin API: flags, else environment (KMSCTL_SERVER, KMSCTL_P12,
// KMSCTL_CA, KMSCTL_PASSPHRASE_FILE).
struct AdminArgs {
  std::string server;
  std::string p12;
  std::string ca;
  std::string passphrase_file;
  std::string output = "table";
};

// Adds the connection options and -o/--output with the given choices (none: no -o at all).
void add_admin_options(CLI::App* cmd, AdminArgs& a,
                       std::vector<std::string> outputs = {"table", "json"});
// TIMEOUT bounds each request (long administrator calls such as a backup take longer).
Result<std::unique_ptr<client::AdminClient>> connect_admin(
    const AdminArgs& a, std::chrono::seconds timeout = std::chrono::seconds(30));

// The exit code for an HTTP status (0 for 2xx).
int exit_for_status(int status);
// Maps an HTTP reply to kmsctl's exit codes, printing the server's sentence on failure.
int exit_for_reply(const client::Reply& r);

// The JSON of a successful reply, or the exit code after saying it is unreadable.
std::variant<nlohmann::json, int> reply_json(const client::Reply& r);

// Connects, sends one request and checks the reply: the reply's JSON, or the exit code
// (the problem already printed). BODY null means GET.
std::variant<nlohmann::json, int> call_json(const AdminArgs& a, const std::string& target,
                                            const std::optional<nlohmann::json>& body);

// Shows J as JSON (-o json), or SHOWN's text on stdout when it is a success and on stderr
// otherwise; kOk or kFailed by SHOWN.
int show_verdict(const AdminArgs& a, const nlohmann::json& j, const render::Outcome& shown);

// Sends a request whose answer is an approval outcome (revoke, recover, approve, deny) and
// shows it: 0 when it executed or waits for approvals (200/202), else the failure's code.
int run_outcome(const AdminArgs& a, const std::string& target, const nlohmann::json& body,
                bool denial_wanted = false);

// Opens the key token CFG names and logs in with the PIN from PIN_FILE, else from the
// configured startup file (source "file"), else asked with PROMPT (no echo).
Result<std::unique_ptr<hsm::Token>> open_key_token(const config::Config& cfg,
                                                   const std::string& pin_file,
                                                   const std::string& prompt);

// The key token CFG names, opened and logged in with the PIN from PIN_FILE, else from the
// configured startup file (source "file"), else asked with PROMPT (no echo), together with
// that PIN (for callers that log in again, e.g. a second handle with other labels).
struct KeyTokenLogin {
  hsm::TokenOptions options;
  std::unique_ptr<hsm::Token> token;
  SecretBytes pin;
};
Result<KeyTokenLogin> login_key_token(const config::Config& cfg, const std::string& pin_file,
                                      const std::string& prompt);

// Writes DATA to stdout, or to FILE (mode 0600, never over an existing file).
int write_output(const std::string& file, std::string_view data);

// Writes the escrowed keys of KEYS (the server's JSON array: version, certificate and
// private_key in PEM), the signing pair when given and the CA certificate of CA_FILE into one
// PKCS#12 at OUT (0600, never overwritten), protected by the passphrase in
// NEW_PASSPHRASE_FILE, or asked twice. The exit code.
int write_key_bundle(const std::string& out, const std::string& ca_file,
                     const std::string& new_passphrase_file, EVP_PKEY* signing_key,
                     X509* signing_cert, const nlohmann::json& keys, const std::string& user);

// The startup secret written to operator cards (cli/commands/card.cpp; `kmsctl card
// provision|split` and `kmsctl dr prepare --cards`). One card holds the secret itself; several
// hold k-of-n Shamir shares under a fresh quorum id.
struct CardWritePlan {
  std::string module;                  // the cards' PKCS#11 module
  std::string label;                   // the data object's label on each card
  std::vector<std::string> cards;      // pkcs11: URIs, in share order
  std::vector<std::string> pin_files;  // one 0600 file per card, in order; empty: prompt
  unsigned k = 0;                      // 0 (or 1) with one card; 2..n for a quorum
  bool force = false;                  // replace what the cards already hold
  // A card that already holds an object: if every card already holds exactly this secret
  // (one card) or a complete quorum of it with this k and n in this order, nothing is
  // written and `already` is reported (a rerun after a crash).
  bool accept_existing = false;
};
struct CardsWritten {
  std::string quorum_id;  // hex; "" for one card
  bool already = false;   // the cards held it already; nothing was written
};
// kInvalidArgument when the plan cannot work (k, number of cards, PIN files).
Status check_card_plan(const CardWritePlan& plan);
// Writes SECRET as PLAN says, printing one line per card written.
Result<CardsWritten> write_secret_to_cards(const CardWritePlan& plan, const SecretBytes& secret);

// Registration of each command group.
void add_local_commands(CLI::App& app, Commands& commands);
void add_user_commands(CLI::App& app, Commands& commands);
void add_bulk_command(CLI::App* user, Commands& commands);
void add_admin_commands(CLI::App& app, Commands& commands);
void add_enroll_commands(CLI::App& app, Commands& commands);
void add_admins_commands(CLI::App& app, Commands& commands);
void add_dr_commands(CLI::App& app, Commands& commands);
void add_card_commands(CLI::App& app, Commands& commands);
void add_backup_commands(CLI::App& app, Commands& commands);
void add_master_key_commands(CLI::App& app, Commands& commands);

}  // namespace kmsd::cli

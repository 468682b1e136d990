// kmsctl: the administrator's and operator's client. A thin main over the daemon libraries.
//
// Exit codes (stable, for scripts):
//   0 success                  1 the operation failed       2 bad usage or configuration
//   3 refused: state exists    4 wrong secret / PIN locked  5 kmsd not reachable
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <iostream>

#include "cli/client/admin_client.hpp"
#include "config/config.hpp"
#include "daemon/provision/initializer.hpp"
#include "daemon/startup/secret_source.hpp"
#include "daemon/startup/unseal_socket.hpp"
#include "daemon/store/store.hpp"
#include "hsm/token.hpp"

namespace {

using namespace kmsd;

enum Exit { kOk = 0, kFailed = 1, kUsage = 2, kExists = 3, kAuth = 4, kUnreachable = 5 };

int exit_for(const Error& e) {
  switch (e.code) {
    case ErrorCode::kAlreadyExists:
      return kExists;
    case ErrorCode::kUnauthenticated:
    case ErrorCode::kPinLocked:
      return kAuth;
    case ErrorCode::kConfig:
    case ErrorCode::kInvalidArgument:
      return kUsage;
    case ErrorCode::kUnavailable:
      return kUnreachable;
    default:
      return kFailed;
  }
}

int fail(const Error& e) {
  std::cerr << "kmsctl: " << e.message << "\n";
  return exit_for(e);
}

std::optional<config::Config> load_config(const std::string& path) {
  auto loaded = config::load(path);
  if (!loaded.ok()) {
    for (const auto& p : loaded.problems) std::cerr << p.to_string(path) << "\n";
    return std::nullopt;
  }
  return std::move(loaded.config);
}

Result<SecretBytes> secret_from(const std::string& file, const std::string& prompt) {
  if (!file.empty()) return startup::read_secret_from_file(file);
  return startup::read_secret_from_terminal(prompt);
}

Result<SecretBytes> new_passphrase(const std::string& file) {
  if (!file.empty()) return startup::read_secret_from_file(file);
  KMSD_ASSIGN_OR_RETURN(auto a, startup::read_secret_from_terminal("New PKCS#12 passphrase: "));
  KMSD_ASSIGN_OR_RETURN(auto b, startup::read_secret_from_terminal("Repeat the passphrase: "));
  if (!constant_time_equal(a.span(), b.span()))
    return make_error(ErrorCode::kInvalidArgument, "the passphrases differ; nothing was written");
  return a;
}

struct InitArgs {
  std::string config = "/etc/kmsd/kmsd.toml";
  std::string admin = "admin";
  std::string admin_p12;
  std::string passphrase_file;
  std::string pin_file;
  std::string csr;
  std::string ca_cert;
};

int run_init(const InitArgs& a) {
  auto cfg = load_config(a.config);
  if (!cfg) return kUsage;
  const bool csr_only = !a.csr.empty();
  if (!csr_only && a.admin_p12.empty()) {
    std::cerr << "kmsctl: --admin-p12 FILE is required (where the first administrator's "
                 "certificate and key are written)\n";
    return kUsage;
  }
  hsm::TokenOptions topts;
  topts.module_path = cfg->token.module.string();
  topts.token_uri = cfg->token.uri;
  topts.pool_size = 2;
  topts.wrap = cfg->token.wrap;
  topts.labels = cfg->token.labels;
  auto token = hsm::Token::open(topts);
  if (!token.ok()) return fail(token.error());
  std::string pin_file = a.pin_file;
  if (pin_file.empty() && cfg->startup.source == config::StartupSource::kFile)
    pin_file = cfg->startup.file.string();
  auto pin = secret_from(pin_file, "Key token user PIN (the startup secret): ");
  if (!pin.ok()) return fail(pin.error());
  if (auto st = (*token)->login(*pin); !st.ok()) return fail(st.error());
  auto store = store::Store::open(cfg->store.path);
  if (!store.ok()) return fail(store.error());

  Result<provision::InitReport> rep = Error{};
  if (csr_only) {
    rep = provision::initialize_with_csr(*cfg, **token, **store, a.csr);
  } else {
    if (a.ca_cert.empty()) {
      // Refuse before asking for a passphrase when there is nothing to do.
      auto existing = provision::existing_state(**token, **store);
      if (!existing.empty()) {
        std::string list;
        for (const auto& e : existing) list += "\n  - " + e;
        return fail(make_error(ErrorCode::kAlreadyExists,
                               "refusing to initialize: this KMS already has state; nothing was "
                               "changed." +
                                   list));
      }
    }
    auto pass = new_passphrase(a.passphrase_file);
    if (!pass.ok()) return fail(pass.error());
    provision::AdminOptions admin{a.admin, a.admin_p12, std::move(*pass)};
    rep = a.ca_cert.empty()
              ? provision::initialize(*cfg, **token, **store, admin)
              : provision::install_ca_certificate(*cfg, **token, **store, a.ca_cert, admin);
  }
  (*token)->logout();
  if (!rep.ok()) return fail(rep.error());
  if (rep->awaiting_ca_certificate) {
    std::cout << "Keys generated on the token. CA certificate request written to " << a.csr
              << "\nHave your root CA sign it, then run:\n  kmsctl init --config " << a.config
              << " --ca-cert SIGNED.pem --admin NAME --admin-p12 FILE\n";
    return kOk;
  }
  std::cout << "KMS initialized.\n"
            << "  CA subject:      " << rep->ca_subject << "\n"
            << "  CA serial:       " << rep->ca_serial << "\n"
            << "  CA SHA-256:      " << rep->ca_sha256_fingerprint << "\n"
            << "  administrator:   " << a.admin << " (serial " << rep->admin_serial << ")\n"
            << "  admin PKCS#12:   " << a.admin_p12 << " (mode 0600)\n";
  return kOk;
}

struct SocketArgs {
  std::string config;
  std::string socket;
  std::string secret_file;
  std::string output = "table";
};

Result<std::filesystem::path> socket_path(const SocketArgs& a) {
  if (!a.socket.empty()) return std::filesystem::path(a.socket);
  auto cfg = load_config(a.config.empty() ? "/etc/kmsd/kmsd.toml" : a.config);
  if (!cfg)
    return make_error(ErrorCode::kConfig,
                      "cannot read the configuration to find the unseal socket");
  return cfg->server.unseal_socket;
}

int print_reply(const std::string& line, const std::string& output) {
  auto j = nlohmann::json::parse(line, nullptr, false);
  if (!j.is_object()) {
    std::cerr << "kmsctl: kmsd sent an unreadable reply\n";
    return kFailed;
  }
  bool ok = j.value("ok", false);
  if (output == "json") {
    std::cout << j.dump(2) << "\n";
  } else {
    std::cout << "state:                  " << j.value("state", "?") << "\n"
              << "failed unseal attempts: " << j.value("failed_unseal_attempts", 0) << "\n";
    if (j.contains("token") && j["token"].is_object()) {
      const auto& t = j["token"];
      std::cout << "token:                  " << t.value("label", "") << " (serial "
                << t.value("serial", "") << ")"
                << (t.value("pin_locked", false) ? ", PIN LOCKED" : "")
                << (t.value("pin_final_try", false) ? ", final PIN try" : "")
                << (t.value("pin_count_low", false) ? ", PIN count low" : "") << "\n";
    }
  }
  if (!ok) {
    std::cerr << "kmsctl: " << j.value("error", "request failed") << "\n";
    std::string err = j.value("error", "");
    if (err.find("rejected") != std::string::npos || err.find("locked") != std::string::npos)
      return kAuth;
    return kFailed;
  }
  return kOk;
}

int run_socket_op(const SocketArgs& a, const std::string& op) {
  auto path = socket_path(a);
  if (!path.ok()) return fail(path.error());
  std::optional<SecretBytes> secret;
  if (op == "unseal") {
    auto s = secret_from(a.secret_file, "kmsd startup secret: ");
    if (!s.ok()) return fail(s.error());
    secret = std::move(*s);
  }
  auto reply = startup::unseal_request(*path, op, secret ? &*secret : nullptr);
  if (!reply.ok()) return fail(reply.error());
  return print_reply(*reply, a.output);
}

// How kmsctl reaches the admin API: flags, else environment (KMSCTL_SERVER, KMSCTL_P12,
// KMSCTL_CA, KMSCTL_PASSPHRASE_FILE).
struct AdminArgs {
  std::string server;
  std::string p12;
  std::string ca;
  std::string passphrase_file;
  std::string output = "table";
};

void add_admin_options(CLI::App* cmd, AdminArgs& a) {
  cmd->add_option("--server", a.server, "admin API URL, https://HOST:PORT")
      ->envname("KMSCTL_SERVER");
  cmd->add_option("--p12", a.p12, "your administrator PKCS#12")->envname("KMSCTL_P12");
  cmd->add_option("--ca", a.ca, "PEM file of the KMS CA (or its root) to verify the server")
      ->envname("KMSCTL_CA");
  cmd->add_option("--passphrase-file", a.passphrase_file,
                  "0600 file with the PKCS#12 passphrase (default: prompt)")
      ->envname("KMSCTL_PASSPHRASE_FILE");
  cmd->add_option("-o,--output", a.output, "table or json")
      ->check(CLI::IsMember({"table", "json"}))
      ->capture_default_str();
}

Result<std::unique_ptr<client::AdminClient>> connect_admin(const AdminArgs& a) {
  if (a.server.empty() || a.p12.empty() || a.ca.empty())
    return make_error(ErrorCode::kInvalidArgument,
                      "the admin API needs --server, --p12 and --ca (or KMSCTL_SERVER, KMSCTL_P12, "
                      "KMSCTL_CA)");
  KMSD_ASSIGN_OR_RETURN(auto pass,
                        secret_from(a.passphrase_file, "Passphrase for " + a.p12 + ": "));
  return client::AdminClient::connect({a.server, a.p12, std::move(pass), a.ca});
}

// Maps an HTTP reply to kmsctl's exit codes, printing the server's sentence on failure.
int exit_for_reply(const client::Reply& r) {
  if (r.status >= 200 && r.status < 300) return kOk;
  std::cerr << "kmsctl: " << r.error_text() << "\n";
  if (r.status == 401 || r.status == 403) return kAuth;
  if (r.status == 409) return kExists;
  if (r.status == 503) return kUnreachable;
  if (r.status >= 400 && r.status < 500) return kUsage;
  return kFailed;
}

int run_whoami(const AdminArgs& a) {
  auto c = connect_admin(a);
  if (!c.ok()) return fail(c.error());
  auto r = (*c)->get("/v1/whoami");
  if (!r.ok()) return fail(r.error());
  if (int rc = exit_for_reply(*r); rc != kOk) return rc;
  auto j = r->json();
  if (a.output == "json")
    std::cout << j.dump(2) << "\n";
  else
    std::cout << j.value("name", "?") << " (" << j.value("role", "?") << ", certificate "
              << j.value("certificate_serial", "?") << ")\n";
  return kOk;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"kmsctl — administer kmsd"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("kmsctl ") + KMSD_VERSION);

  InitArgs init;
  auto* init_cmd = app.add_subcommand(
      "init", "initialize an empty token and store: master key, CA, first administrator");
  init_cmd->add_option("-c,--config", init.config, "kmsd configuration file")
      ->capture_default_str();
  init_cmd->add_option("--admin", init.admin, "name (CN) of the first administrator")
      ->capture_default_str();
  init_cmd->add_option("--admin-p12", init.admin_p12,
                       "where to write the administrator's PKCS#12 (never overwritten)");
  init_cmd->add_option("--passphrase-file", init.passphrase_file,
                       "0600 file holding the PKCS#12 passphrase (default: prompt twice)");
  init_cmd->add_option("--pin-file", init.pin_file,
                       "0600 file holding the token user PIN (default: the configured startup "
                       "file, else prompt)");
  auto* csr_opt = init_cmd->add_option("--csr", init.csr,
                                       "write a CSR for an external root instead of self-signing");
  init_cmd
      ->add_option("--ca-cert", init.ca_cert,
                   "install the CA certificate signed by the external root (after --csr)")
      ->excludes(csr_opt);

  SocketArgs sock;
  auto add_socket_opts = [&sock](CLI::App* cmd) {
    cmd->add_option("-c,--config", sock.config, "kmsd configuration file (to find the socket)");
    cmd->add_option("--socket", sock.socket, "the unseal socket path (overrides --config)");
    cmd->add_option("-o,--output", sock.output, "table or json")
        ->check(CLI::IsMember({"table", "json"}))
        ->capture_default_str();
  };
  auto* unseal_cmd = app.add_subcommand("unseal", "present the startup secret to a running kmsd");
  add_socket_opts(unseal_cmd);
  unseal_cmd->add_option("--secret-file", sock.secret_file,
                         "0600 file holding the startup secret (default: prompt without echo)");
  auto* seal_cmd = app.add_subcommand("seal", "make a running kmsd forget its token login now");
  add_socket_opts(seal_cmd);
  auto* status_cmd = app.add_subcommand("status", "seal state and token state of a running kmsd");
  add_socket_opts(status_cmd);

  AdminArgs admin;
  auto* whoami_cmd = app.add_subcommand("whoami", "the administrator your certificate stands for");
  add_admin_options(whoami_cmd, admin);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);
    return rc == 0 ? 0 : kUsage;
  }
  if (*init_cmd) return run_init(init);
  if (*unseal_cmd) return run_socket_op(sock, "unseal");
  if (*seal_cmd) return run_socket_op(sock, "seal");
  if (*status_cmd) return run_socket_op(sock, "status");
  if (*whoami_cmd) return run_whoami(admin);
  return kUsage;
}

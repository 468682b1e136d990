// Commands that work on this machine without the admin API: init (token and store), and
// unseal / seal / status over the daemon's local unseal socket.
#include <iostream>

#include "cli/commands/common.hpp"
#include "daemon/provision/initializer.hpp"
#include "daemon/startup/secret_source.hpp"
#include "daemon/startup/unseal_socket.hpp"
#include "daemon/store/store.hpp"
#include "hsm/token.hpp"

namespace kmsd::cli {

namespace {

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
  auto token = open_key_token(*cfg, a.pin_file, "Key token user PIN (the startup secret): ");
  if (!token.ok()) return fail(token.error());
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
  std::string card;      // unseal: the operator card's URI (card and quorum sources)
  std::string pin_file;  // unseal: the operator card's PIN (default: prompt)
  bool cancel = false;   // unseal: drop pending quorum shares instead
  std::string output = "table";
};

// The error kinds the daemon names in "code" (to_string(ErrorCode)), back to exit codes.
int exit_for_code(const std::string& code) {
  for (ErrorCode c :
       {ErrorCode::kInvalidArgument, ErrorCode::kNotFound, ErrorCode::kAlreadyExists,
        ErrorCode::kPermissionDenied, ErrorCode::kUnauthenticated, ErrorCode::kFailedPrecondition,
        ErrorCode::kUnavailable, ErrorCode::kPinLocked, ErrorCode::kConfig, ErrorCode::kIo,
        ErrorCode::kCrypto, ErrorCode::kStore, ErrorCode::kInternal}) {
    if (code == to_string(c)) return exit_for(Error{c, ""});
  }
  return -1;
}

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
    if (j.contains("source"))
      std::cout << "startup source:         " << j.value("source", "") << "\n";
    if (j.contains("quorum") && j["quorum"].is_object()) {
      const auto& q = j["quorum"];
      std::cout << "quorum shares:          " << q.value("progress", "") << ", pending shares "
                << "expire in " << q.value("expires_in_seconds", 0) << " s\n";
    }
    if (j.contains("card") && j["card"].is_object()) {
      const auto& c = j["card"];
      std::cout << "last operator card:     " << c.value("label", "") << " (serial "
                << c.value("serial", "") << "): " << c.value("pin_state", "") << "\n";
    }
    if (j.contains("message")) std::cout << j.value("message", "") << "\n";
  }
  if (!ok) {
    std::cerr << "kmsctl: " << j.value("error", "request failed") << "\n";
    if (int rc = exit_for_code(j.value("code", "")); rc > 0) return rc;
    std::string err = j.value("error", "");
    if (err.find("rejected") != std::string::npos || err.find("locked") != std::string::npos)
      return kAuth;
    return kFailed;
  }
  return kOk;
}

int run_socket_op(const SocketArgs& a, std::string op) {
  auto path = socket_path(a);
  if (!path.ok()) return fail(path.error());
  if (op == "unseal" && a.cancel) op = "cancel";
  std::optional<SecretBytes> secret;
  nlohmann::json extra = nlohmann::json::object();
  if (op == "unseal") {
    // Ask first what the daemon unseals with: its startup secret, or an operator card's PIN.
    auto status = startup::unseal_request(*path, "status");
    if (!status.ok()) return fail(status.error());
    auto sj = nlohmann::json::parse(*status, nullptr, false);
    const std::string source = sj.is_object() ? sj.value("source", "") : "";
    const bool cards = source == "card" || source == "quorum";
    if (cards) {
      if (!a.secret_file.empty())
        return fail(make_error(ErrorCode::kInvalidArgument,
                               "kmsd unseals with operator cards (startup.source = \"" + source +
                                   "\"): give the card's PIN (--pin-file or the prompt), not "
                                   "the startup secret"));
      if (sj.value("state", "") != "sealed")
        return print_reply(*status, a.output);  // nothing to do: no card PIN asked for
      std::string prompt = "PIN of the operator card " +
                           (a.card.empty() ? std::string("(the configured card)") : a.card);
      if (sj.contains("quorum") && sj["quorum"].is_object())
        prompt += " [" + sj["quorum"].value("progress", "") + "]";
      auto pin = secret_from(a.pin_file, prompt + ": ");
      if (!pin.ok()) return fail(pin.error());
      secret = std::move(*pin);
      if (!a.card.empty()) extra["card"] = a.card;
    } else {
      if (!a.card.empty() || !a.pin_file.empty())
        return fail(make_error(ErrorCode::kInvalidArgument,
                               "kmsd does not unseal with operator cards (startup.source = \"" +
                                   (source.empty() ? std::string("prompt") : source) +
                                   "\"); give the startup secret (--secret-file or the "
                                   "prompt)"));
      auto s = secret_from(a.secret_file, "kmsd startup secret: ");
      if (!s.ok()) return fail(s.error());
      secret = std::move(*s);
    }
  }
  auto reply = startup::unseal_request(*path, op, secret ? &*secret : nullptr,
                                       extra.empty() ? std::string() : extra.dump());
  if (!reply.ok()) return fail(reply.error());
  return print_reply(*reply, a.output);
}

}  // namespace

void add_local_commands(CLI::App& app, Commands& commands) {
  auto* init_cmd = app.add_subcommand(
      "init", "initialize an empty token and store: master key, CA, first administrator");
  auto& init = commands.add<InitArgs>(init_cmd, run_init);
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

  auto add_socket_command = [&](const char* name, const char* help) {
    auto* cmd = app.add_subcommand(name, help);
    auto& sock = commands.add<SocketArgs>(
        cmd, [op = std::string(name)](const SocketArgs& a) { return run_socket_op(a, op); });
    cmd->add_option("-c,--config", sock.config, "kmsd configuration file (to find the socket)");
    cmd->add_option("--socket", sock.socket, "the unseal socket path (overrides --config)");
    cmd->add_option("-o,--output", sock.output, "table or json")
        ->check(CLI::IsMember({"table", "json"}))
        ->capture_default_str();
    return &sock;
  };
  auto* unseal = add_socket_command(
      "unseal", "present the startup secret, or an operator card, to a running kmsd");
  auto* unseal_cmd = app.get_subcommand("unseal");
  unseal_cmd->add_option("--secret-file", unseal->secret_file,
                         "0600 file holding the startup secret (default: prompt without echo)");
  unseal_cmd->add_option("--card", unseal->card,
                         "card and quorum sources: the operator card to read, as a pkcs11: URI "
                         "on the configured card module (default: startup.card_uri)");
  unseal_cmd->add_option("--pin-file", unseal->pin_file,
                         "card and quorum sources: 0600 file holding the card's PIN (default: "
                         "prompt without echo)");
  unseal_cmd->add_flag("--cancel", unseal->cancel,
                       "quorum source: drop the shares presented so far instead");
  add_socket_command("seal", "make a running kmsd forget its token login now");
  add_socket_command("status", "seal state and token state of a running kmsd");
}

}  // namespace kmsd::cli

#include "cli/commands/common.hpp"

#include <iostream>

#include "common/files.hpp"
#include "daemon/startup/secret_source.hpp"

namespace kmsd::cli {

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

int Commands::run() const {
  for (const auto& e : entries_) {
    if (!*e.cmd) continue;
    try {
      return e.run();
    } catch (const nlohmann::json::exception& ex) {
      std::cerr << "kmsctl: kmsd sent a reply kmsctl cannot read (" << ex.what() << ")\n";
      return kFailed;
    }
  }
  return kUsage;
}

void add_admin_options(CLI::App* cmd, AdminArgs& a, std::vector<std::string> outputs) {
  cmd->add_option("--server", a.server, "admin API URL, https://HOST:PORT")
      ->envname("KMSCTL_SERVER");
  cmd->add_option("--p12", a.p12, "your administrator PKCS#12")->envname("KMSCTL_P12");
  cmd->add_option("--ca", a.ca, "PEM file of the KMS CA (or its root) to verify the server")
      ->envname("KMSCTL_CA");
  cmd->add_option("--passphrase-file", a.passphrase_file,
                  "0600 file with the PKCS#12 passphrase (default: prompt)")
      ->envname("KMSCTL_PASSPHRASE_FILE");
  if (outputs.empty()) return;
  std::string names;
  for (const auto& o : outputs) names += (names.empty() ? "" : ", ") + o;
  cmd->add_option("-o,--output", a.output, names)
      ->check(CLI::IsMember(outputs))
      ->capture_default_str();
}

Result<std::unique_ptr<client::AdminClient>> connect_admin(const AdminArgs& a,
                                                           std::chrono::seconds timeout) {
  if (a.server.empty() || a.p12.empty() || a.ca.empty())
    return make_error(ErrorCode::kInvalidArgument,
                      "the admin API needs --server, --p12 and --ca (or KMSCTL_SERVER, KMSCTL_P12, "
                      "KMSCTL_CA)");
  KMSD_ASSIGN_OR_RETURN(auto pass,
                        secret_from(a.passphrase_file, "Passphrase for " + a.p12 + ": "));
  return client::AdminClient::connect({a.server, a.p12, std::move(pass), a.ca, timeout});
}

int exit_for_status(int status) {
  if (status >= 200 && status < 300) return kOk;
  if (status == 401 || status == 403) return kAuth;
  if (status == 409) return kExists;
  if (status == 503) return kUnreachable;
  if (status >= 400 && status < 500) return kUsage;
  return kFailed;
}

int exit_for_reply(const client::Reply& r) {
  const int rc = exit_for_status(r.status);
  if (rc != kOk) std::cerr << "kmsctl: " << r.error_text() << "\n";
  return rc;
}

std::variant<nlohmann::json, int> reply_json(const client::Reply& r) {
  if (int rc = exit_for_reply(r); rc != kOk) return rc;
  auto j = r.json();
  if (j.is_discarded()) {
    std::cerr << "kmsctl: kmsd sent an unreadable reply (HTTP " << r.status << ")\n";
    return kFailed;
  }
  return j;
}

std::variant<nlohmann::json, int> call_json(const AdminArgs& a, const std::string& target,
                                            const std::optional<nlohmann::json>& body) {
  auto c = connect_admin(a);
  if (!c.ok()) return fail(c.error());
  auto r = body ? (*c)->post(target, *body) : (*c)->get(target);
  if (!r.ok()) return fail(r.error());
  return reply_json(*r);
}

int show_verdict(const AdminArgs& a, const nlohmann::json& j, const render::Outcome& shown) {
  if (a.output == "json")
    std::cout << j.dump(2) << "\n";
  else if (shown.ok)
    std::cout << shown.text;
  else
    std::cerr << "kmsctl: " << shown.text;
  return shown.ok ? kOk : kFailed;
}

int run_outcome(const AdminArgs& a, const std::string& target, const nlohmann::json& body,
                bool denial_wanted) {
  auto c = connect_admin(a);
  if (!c.ok()) return fail(c.error());
  auto r = (*c)->post(target, body);
  if (!r.ok()) return fail(r.error());
  auto j = r->json();
  if (!j.is_object() || !j.contains("state")) {
    if (int rc = exit_for_reply(*r); rc != kOk) return rc;
    std::cerr << "kmsctl: kmsd's reply (HTTP " << r->status << ") is not an approval outcome\n";
    return kFailed;
  }
  const int shown = show_verdict(a, j, render::outcome(j, denial_wanted));
  const int rc = exit_for_status(r->status);
  return rc == kOk ? shown : rc;
}

int write_output(const std::string& file, std::string_view data) {
  if (file.empty() || file == "-") {
    std::cout << data;
    std::cout.flush();
    return std::cout ? kOk : fail(make_error(ErrorCode::kIo, "cannot write to standard output"));
  }
  if (auto st = files::write_atomic(file, data, 0600, false); !st.ok()) return fail(st.error());
  return kOk;
}

Result<std::unique_ptr<hsm::Token>> open_key_token(const config::Config& cfg,
                                                   const std::string& pin_file,
                                                   const std::string& prompt) {
  KMSD_ASSIGN_OR_RETURN(auto login, login_key_token(cfg, pin_file, prompt));
  return std::move(login.token);
}

Result<KeyTokenLogin> login_key_token(const config::Config& cfg, const std::string& pin_file,
                                      const std::string& prompt) {
  KeyTokenLogin out;
  out.options.module_path = cfg.token.module.string();
  out.options.token_uri = cfg.token.uri;
  out.options.pool_size = 2;
  out.options.wrap = cfg.token.wrap;
  out.options.labels = cfg.token.labels;
  KMSD_ASSIGN_OR_RETURN(out.token, hsm::Token::open(out.options));
  std::string file = pin_file;
  if (file.empty() && cfg.startup.source == config::StartupSource::kFile)
    file = cfg.startup.file.string();
  KMSD_ASSIGN_OR_RETURN(out.pin, secret_from(file, prompt));
  KMSD_TRY(out.token->login(out.pin));
  return out;
}

}  // namespace kmsd::cli

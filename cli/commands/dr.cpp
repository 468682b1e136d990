// kmsctl dr: disaster recovery when the startup secret (or the old token) is lost.
//   predecrypt  every encrypted message of a store, opened with the old keys, re-encrypted to
//               the DR custody certificate in a staging directory (resumable)
//   reencrypt   staged messages opened with the custody key and encrypted to each user's new
//               encryption certificate, written back in the store's own format (rerunnable)
//   status      what the manifest of a staging directory says
//   prepare     the new token: what `kmsctl init` makes (master, CA and audit keys, the CA
//               certificate, the first administrator), plus the RSA-3072 custody key pair and
//               its certificate from the new CA
// The runbook is in README.md, "Disaster recovery".
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <map>
#include <set>
#include <thread>

#include "cli/commands/common.hpp"
#include "common/files.hpp"
#include "daemon/ca/issuer.hpp"
#include "daemon/dr/custody.hpp"
#include "daemon/dr/keyring.hpp"
#include "daemon/dr/pipeline.hpp"
#include "daemon/provision/initializer.hpp"
#include "daemon/store/store.hpp"
#include "hsm/token.hpp"

namespace kmsd::cli {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

struct DrArgs {
  std::string store;
  std::string staging;
  std::string keys;
  std::string passphrase_file;
  std::string custody_cert;
  std::string custody_key;
  std::string module = "/usr/lib/softhsm/libsofthsm2.so";
  std::string pin_file;
  std::string custody_passphrase_file;
  std::string recipients;
  std::string out;
  unsigned threads = 0;
  bool progress = true;
  std::string output = "table";
  // prepare
  std::string config;
  std::string admin = "admin";
  std::string admin_p12;
  std::string custody_label = "kms-dr-custody";
  std::string custody_cert_out;
  int custody_days = 3 * 365;
};

Result<ossl::X509Ptr> read_cert(const std::string& file) {
  KMSD_ASSIGN_OR_RETURN(auto pem, files::read_text(file));
  auto cert = ossl::x509_from_pem(pem);
  if (!cert.ok()) return cert.error().context(file);
  return cert;
}

// A one-line progress bar with rate and ETA on stderr, when stderr is a terminal.
class ProgressBar {
 public:
  ProgressBar(bool enabled, std::string verb)
      : on_(enabled && ::isatty(STDERR_FILENO) == 1), verb_(std::move(verb)) {}
  ~ProgressBar() {
    if (on_ && drawn_) std::fprintf(stderr, "\n");
  }
  void operator()(const dr::Progress& p) {
    if (!on_) return;
    drawn_ = true;
    const double rate = p.seconds > 0 ? static_cast<double>(p.done) / p.seconds : 0;
    const double frac =
        p.total == 0 ? 1 : static_cast<double>(p.done) / static_cast<double>(p.total);
    const int width = 30;
    const int filled = static_cast<int>(std::lround(frac * width));
    std::string bar(static_cast<std::size_t>(filled), '#');
    bar.append(static_cast<std::size_t>(width - filled), '.');
    std::string eta = "--:--";
    if (rate > 0 && p.total >= p.done) {
      const long left = std::lround(static_cast<double>(p.total - p.done) / rate);
      char b[32];
      std::snprintf(b, sizeof b, "%ld:%02ld", left / 60, left % 60);
      eta = b;
    }
    std::fprintf(stderr, "\r%s [%s] %zu/%zu %3.0f%%  %.0f msg/s  ETA %s   ", verb_.c_str(),
                 bar.c_str(), p.done, p.total, frac * 100, rate, eta.c_str());
    std::fflush(stderr);
  }

 private:
  bool on_;
  bool drawn_ = false;
  std::string verb_;
};

json summary_json(const std::string& command, const dr::RunSummary& s) {
  json problems = json::array();
  for (const auto& p : s.problems)
    problems.push_back({{"path", p.path}, {"status", p.status}, {"reason", p.reason}});
  return {{"command", command},
          {"total", s.total},
          {"already_done", s.already_done},
          {"processed", s.processed},
          {"this_run", s.this_run},
          {"overall", s.overall},
          {"seconds", s.seconds},
          {"messages_per_second", s.seconds > 0 ? static_cast<double>(s.processed) / s.seconds : 0},
          {"stopped_early", s.stopped_early},
          {"problems", problems}};
}

int show_summary(const DrArgs& a, const std::string& command, const dr::RunSummary& s) {
  const bool failed = s.this_run.count(dr::kFailed) != 0;
  if (a.output == "json") {
    std::cout << summary_json(command, s).dump(2) << "\n";
    return failed ? kFailed : kOk;
  }
  std::cout << command << ": " << s.total << " message(s); " << s.already_done
            << " done by an earlier run; " << s.processed << " handled now in " << s.seconds
            << " s";
  if (s.seconds > 0) std::cout << " (" << std::lround(s.processed / s.seconds) << " msg/s)";
  std::cout << "\n  this run:";
  if (s.this_run.empty()) std::cout << " nothing to do";
  for (const auto& [status, n] : s.this_run) std::cout << "  " << status << " " << n;
  std::cout << "\n  in the manifest:";
  for (const auto& [status, n] : s.overall) std::cout << "  " << status << " " << n;
  std::cout << "\n";
  // Waiting messages are expected until every user has enrolled: counted by reason, not listed.
  std::map<std::string, std::size_t> waiting;
  std::vector<const dr::ManifestRow*> listed;
  for (const auto& p : s.problems) {
    if (p.status == dr::kWaiting)
      ++waiting[p.reason];
    else
      listed.push_back(&p);
  }
  for (const auto& [reason, n] : waiting)
    std::cout << "  waiting  " << n << " message(s): " << reason << "\n";
  const std::size_t shown = std::min<std::size_t>(listed.size(), 20);
  for (std::size_t i = 0; i < shown; ++i)
    std::cout << "  " << listed[i]->status << "  " << listed[i]->path << ": " << listed[i]->reason
              << "\n";
  if (listed.size() > shown)
    std::cout << "  ... and " << listed.size() - shown << " more (-o json lists them all)\n";
  return failed ? kFailed : kOk;
}

int run_predecrypt(const DrArgs& a) {
  auto custody = read_cert(a.custody_cert);
  if (!custody.ok()) return fail(custody.error());
  SecretBytes default_pass;
  dr::KeyDirOptions ko;
  ko.dir = a.keys;
  if (!a.passphrase_file.empty()) {
    auto p = files::read_secret_file(a.passphrase_file);
    if (!p.ok()) return fail(p.error());
    default_pass = std::move(*p);
    ko.default_passphrase = &default_pass;
  }
  ko.ask = [](const fs::path& p12) {
    return secret_from("", "Passphrase for " + p12.string() + ": ");
  };
  auto ring = dr::load_key_dir(ko);
  if (!ring.ok()) return fail(ring.error());
  if (a.output != "json")
    std::cerr << "keys: " << ring->key_count() << " key(s) of " << ring->users().size()
              << " user(s)\n";
  ProgressBar bar(a.progress, "predecrypt");
  dr::PredecryptOptions o;
  o.store = a.store;
  o.staging = a.staging;
  o.keys = &*ring;
  o.custody_cert = custody->get();
  o.threads = a.threads;
  o.progress = [&bar](const dr::Progress& p) { bar(p); };
  auto s = dr::predecrypt(o);
  if (!s.ok()) return fail(s.error());
  return show_summary(a, "predecrypt", *s);
}

Result<std::map<std::string, ossl::X509Ptr>> read_recipients(const std::string& dir) {
  if (dir.rfind("https://", 0) == 0 || dir.rfind("http://", 0) == 0)
    return make_error(ErrorCode::kInvalidArgument,
                      "reading the new certificates from kmsd is not available yet: export "
                      "each user's new encryption certificate to DIR/<user>.pem and give "
                      "--recipients DIR");
  std::error_code ec;
  if (!fs::is_directory(dir, ec))
    return make_error(ErrorCode::kInvalidArgument,
                      "--recipients " + dir + " is not a directory of <user>.pem certificates");
  std::map<std::string, ossl::X509Ptr> out;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string ext = e.path().extension().string();
    if (!e.is_regular_file() || (ext != ".pem" && ext != ".crt")) continue;
    KMSD_ASSIGN_OR_RETURN(auto cert, read_cert(e.path().string()));
    out[e.path().stem().string()] = std::move(cert);
  }
  return out;
}

int run_reencrypt(const DrArgs& a) {
  auto custody = read_cert(a.custody_cert);
  if (!custody.ok()) return fail(custody.error());
  auto recipients = read_recipients(a.recipients);
  if (!recipients.ok()) return fail(recipients.error());
  const unsigned threads =
      a.threads != 0 ? a.threads : std::max(1u, std::thread::hardware_concurrency());
  Result<dr::CustodyKey> key = make_error(ErrorCode::kInternal, "no custody key");
  if (dr::is_pkcs11_uri(a.custody_key)) {
    auto pin = secret_from(a.pin_file, "PIN of the token holding the custody key: ");
    if (!pin.ok()) return fail(pin.error());
    key = dr::open_custody_key_on_token(a.custody_key, a.module, *pin, custody->get(), threads);
  } else {
    auto pass = secret_from(a.custody_passphrase_file, "Passphrase for " + a.custody_key + ": ");
    if (!pass.ok()) return fail(pass.error());
    key = dr::open_custody_key_p12(a.custody_key, *pass, custody->get());
  }
  if (!key.ok()) return fail(key.error());
  ProgressBar bar(a.progress, "reencrypt");
  dr::ReencryptOptions o;
  o.staging = a.staging;
  o.out = a.out;
  o.custody_key = key->key.get();
  o.custody_cert = custody->get();
  for (const auto& [user, cert] : *recipients) o.new_certs[user] = cert.get();
  o.threads = threads;
  o.progress = [&bar](const dr::Progress& p) { bar(p); };
  auto s = dr::reencrypt(o);
  if (!s.ok()) return fail(s.error());
  return show_summary(a, "reencrypt", *s);
}

int run_status(const DrArgs& a) {
  if (!fs::exists(fs::path(a.staging) / "manifest.db"))
    return fail(make_error(ErrorCode::kInvalidArgument,
                           a.staging + " has no manifest.db: not a staging directory"));
  auto m = dr::Manifest::open(fs::path(a.staging) / "manifest.db");
  if (!m.ok()) return fail(m.error());
  auto counts = (*m)->counts();
  auto rows = (*m)->rows();
  auto done = (*m)->reencrypted();
  if (!counts.ok()) return fail(counts.error());
  if (!rows.ok()) return fail(rows.error());
  if (!done.ok()) return fail(done.error());
  if (a.output == "json") {
    json messages = json::array();
    for (const auto& r : *rows)
      messages.push_back({{"path", r.path},
                          {"format", r.format},
                          {"sha256", r.digest},
                          {"status", r.status},
                          {"users", r.users},
                          {"reencrypted", done->count(r.path) != 0},
                          {"reason", r.reason}});
    std::cout
        << json{{"counts", *counts}, {"reencrypted", done->size()}, {"messages", messages}}.dump(2)
        << "\n";
    return kOk;
  }
  for (const auto& [status, n] : *counts) std::cout << status << " " << n << "\n";
  std::cout << "reencrypted " << done->size() << "\n";
  return kOk;
}

int run_prepare(const DrArgs& a) {
  auto cfg = load_config(a.config);
  if (!cfg) return kUsage;
  if (fs::exists(a.custody_cert_out))
    return fail(make_error(ErrorCode::kAlreadyExists,
                           a.custody_cert_out + " exists; choose another --custody-cert-out"));
  auto login =
      login_key_token(*cfg, a.pin_file, "New key token user PIN (the new startup secret): ");
  if (!login.ok()) return fail(login.error());
  const hsm::TokenOptions& topts = login->options;
  auto* token = &login->token;
  auto store = store::Store::open(cfg->store.path);
  if (!store.ok()) return fail(store.error());

  // 1. What `kmsctl init` makes, unless an earlier prepare (or init) already made it.
  auto ca_cert = provision::load_ca_certificate(**store);
  if (!ca_cert.ok()) {
    auto existing = provision::existing_state(**token, **store);
    if (!existing.empty()) {
      std::string list;
      for (const auto& e : existing) list += "\n  - " + e;
      return fail(make_error(ErrorCode::kAlreadyExists,
                             "the new token or store holds state from something else; nothing "
                             "was changed:" +
                                 list));
    }
    if (a.admin_p12.empty())
      return fail(make_error(ErrorCode::kInvalidArgument,
                             "--admin-p12 FILE is required: the new KMS's first administrator"));
    SecretBytes pass;
    if (!a.passphrase_file.empty()) {
      auto p = files::read_secret_file(a.passphrase_file);
      if (!p.ok()) return fail(p.error());
      pass = std::move(*p);
    } else {
      auto p = secret_from("", "New administrator PKCS#12 passphrase: ");
      if (!p.ok()) return fail(p.error());
      pass = std::move(*p);
    }
    auto rep =
        provision::initialize(*cfg, **token, **store, {a.admin, a.admin_p12, std::move(pass)});
    if (!rep.ok()) return fail(rep.error());
    std::cout << "new KMS: master, CA and audit keys on " << cfg->token.uri << "; CA "
              << rep->ca_subject << " (SHA-256 " << rep->ca_sha256_fingerprint
              << "); administrator " << a.admin << " in " << a.admin_p12 << "\n";
    ca_cert = provision::load_ca_certificate(**store);
    if (!ca_cert.ok()) return fail(ca_cert.error());
  } else {
    std::cout << "new KMS already initialized (CA SHA-256 "
              << ossl::sha256_fingerprint(ca_cert->get()) << "); keeping it\n";
  }

  // 2. The custody key pair on the same token.
  hsm::TokenOptions copts = topts;
  copts.labels.ca = a.custody_label;  // the token layer reads a key pair by this label
  auto custody = hsm::Token::open(copts);
  if (!custody.ok()) return fail(custody.error());
  if (!(*custody)->has_ca_key()) {
    if (auto st = (*token)->generate_decryption_key(a.custody_label, hsm::KeyType::kRsa3072);
        !st.ok())
      return fail(st.error());
    std::cout << "custody key: RSA-3072 '" << a.custody_label << "' generated on the token\n";
  } else {
    std::cout << "custody key '" << a.custody_label << "' already on the token; keeping it\n";
  }
  auto pub = (*custody)->ca_public_key();
  if (!pub.ok()) return fail(pub.error());

  // 3. Its certificate, signed by the new CA on the token.
  auto subject = ca::parse_subject("/CN=kmsd DR custody");
  if (!subject.ok()) return fail(subject.error());
  ca::IssueRequest req;
  req.profile = ca::Profile::kUser;
  req.subject = subject->get();
  req.public_key = pub->get();
  req.validity = std::chrono::hours(24) * a.custody_days;
  req.key_usage = {"keyEncipherment"};
  auto cert = ca::issue_on_token(req, ca_cert->get(), **token, EVP_sha256());
  if (!cert.ok()) return fail(cert.error());
  auto pem = ossl::x509_to_pem(cert->get());
  if (!pem.ok()) return fail(pem.error());
  if (auto st = files::write_atomic(a.custody_cert_out, *pem, 0644); !st.ok())
    return fail(st.error());
  (*custody)->logout();
  (*token)->logout();
  std::cout << "custody certificate: " << a.custody_cert_out << " (serial "
            << ca::serial_hex(cert->get()) << ", SHA-256 " << ossl::sha256_fingerprint(cert->get())
            << ")\n"
            << "custody key for reencrypt: --custody-key '" << cfg->token.uri
            << ";object=" << a.custody_label << "' --module " << topts.module_path << "\n";
  return kOk;
}

void add_common(CLI::App* cmd, DrArgs& a) {
  cmd->add_option("--threads", a.threads, "worker threads (default: one per core)");
  cmd->add_flag("!--no-progress", a.progress, "no progress bar");
  cmd->add_option("-o,--output", a.output, "table or json")
      ->check(CLI::IsMember({"table", "json"}));
}

}  // namespace

void add_dr_commands(CLI::App& app, Commands& commands) {
  auto* dr = app.add_subcommand(
      "dr", "disaster recovery: prepare, pre-decrypt, re-encrypt (README: Disaster recovery)");
  dr->require_subcommand(1);

  auto* pre = dr->add_subcommand(
      "predecrypt",
      "open every encrypted message of a store with the old keys and re-encrypt it to the DR "
      "custody certificate in a staging directory; resumable");
  auto& p = commands.add<DrArgs>(pre, run_predecrypt);
  pre->add_option("--store", p.store, "the message store: a Maildir, .eml tree or .p7m/.der tree")
      ->required();
  pre->add_option("--staging", p.staging, "staging directory (created; holds the manifest)")
      ->required();
  pre->add_option("--keys", p.keys,
                  "directory of users' PKCS#12 files, USER.p12 (passphrase in USER.pass, 0600, "
                  "else --passphrase-file, else asked)")
      ->required();
  pre->add_option("--passphrase-file", p.passphrase_file,
                  "0600 file with the passphrase of the PKCS#12 files that have no USER.pass");
  pre->add_option("--custody-cert", p.custody_cert, "the DR custody certificate (PEM)")->required();
  add_common(pre, p);

  auto* re = dr->add_subcommand(
      "reencrypt",
      "open staged messages with the custody key and encrypt them to each user's new "
      "encryption certificate, in the store's own format; rerun as more users enroll");
  auto& r = commands.add<DrArgs>(re, run_reencrypt);
  re->add_option("--staging", r.staging, "the staging directory of predecrypt")->required();
  re->add_option("--out", r.out, "where the re-encrypted messages go, at their store paths")
      ->required();
  re->add_option("--custody-cert", r.custody_cert, "the DR custody certificate (PEM)")->required();
  re->add_option("--custody-key", r.custody_key,
                 "pkcs11:token=LABEL;object=KEY-LABEL (production), or a PKCS#12 file (drills)")
      ->required();
  re->add_option("--module", r.module, "PKCS#11 module of the custody token")
      ->capture_default_str();
  re->add_option("--pin-file", r.pin_file,
                 "0600 file with the custody token's PIN (default: prompt)");
  re->add_option("--custody-passphrase-file", r.custody_passphrase_file,
                 "0600 file with the custody PKCS#12 passphrase (default: prompt)");
  re->add_option("--recipients", r.recipients,
                 "directory of the users' new encryption certificates, USER.pem")
      ->required();
  add_common(re, r);

  auto* prep = dr->add_subcommand(
      "prepare",
      "the new key token: master, CA and audit keys and the first administrator (as kmsctl "
      "init), plus the RSA-3072 DR custody key pair and its certificate; resumable");
  auto& pr = commands.add<DrArgs>(prep, run_prepare);
  prep->add_option("--config", pr.config, "the NEW kmsd.toml (new token, new store)")->required();
  prep->add_option("--admin", pr.admin, "the new KMS's first administrator")->capture_default_str();
  prep->add_option("--admin-p12", pr.admin_p12, "where that administrator's PKCS#12 is written");
  prep->add_option("--passphrase-file", pr.passphrase_file,
                   "0600 file with the new administrator PKCS#12 passphrase (default: prompt)");
  prep->add_option("--pin-file", pr.pin_file,
                   "0600 file with the new token's PIN (default: the configured startup file, "
                   "else prompt)");
  prep->add_option("--custody-label", pr.custody_label, "label of the custody key on the token")
      ->capture_default_str();
  prep->add_option("--custody-cert-out", pr.custody_cert_out,
                   "where the custody certificate (PEM) is written; never overwritten")
      ->required();
  prep->add_option("--custody-days", pr.custody_days, "validity of the custody certificate")
      ->capture_default_str();

  auto* st = dr->add_subcommand("status", "what the manifest of a staging directory records");
  auto& s = commands.add<DrArgs>(st, run_status);
  st->add_option("--staging", s.staging, "the staging directory")->required();
  st->add_option("-o,--output", s.output, "table or json")->check(CLI::IsMember({"table", "json"}));
}

}  // namespace kmsd::cli

// kmsctl dr: disaster recovery when the startup secret (or the old token) is lost.
//   predecrypt  every encrypted message of a store, opened with the old keys, re-encrypted to
//               the DR custody certificate in a staging directory (resumable)
//   reencrypt   staged messages opened with the custody key and encrypted to each user's new
//               encryption certificate, written back in the store's own format (rerunnable)
//   status      what the manifest of a staging directory says
//   prepare     the new token: what `kmsctl init` makes (master, CA and audit keys, the CA
//               certificate, the first administrator), plus the RSA-3072 custody key pair and
//               its certificate from the new CA; with --cards, the new startup secret (the new
//               token's PIN) on new operator cards or a new k-of-n quorum (as card split)
//   reinstall   offline, kmsd stopped: every user of the old database to ENABLED on the new KMS
//               with a fresh enrollment token (bulk-enable result file), the old keys retired,
//               approved by k new administrators (daemon/dr/reinstall.hpp says why offline)
//   finish      offline: the retired material destroyed once everything is re-encrypted
//   drill       all of it on copies and a scratch SoftHSM token, verified, with a report
// The runbook is in README.md, "Disaster recovery".
#include <fcntl.h>
#include <openssl/cms.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <sqlite3.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include "cli/bulk_file.hpp"
#include "cli/commands/common.hpp"
#include "common/clock.hpp"
#include "common/fd.hpp"
#include "common/files.hpp"
#include "daemon/audit/audit_log.hpp"
#include "daemon/ca/issuer.hpp"
#include "daemon/dr/custody.hpp"
#include "daemon/dr/keyring.hpp"
#include "daemon/dr/message.hpp"
#include "daemon/dr/pipeline.hpp"
#include "daemon/dr/reinstall.hpp"
#include "daemon/enroll/enrollment.hpp"
#include "daemon/policy/policy_check.hpp"
#include "daemon/provision/initializer.hpp"
#include "daemon/startup/operator_card.hpp"
#include "daemon/store/store.hpp"
#include "daemon/users/user_service.hpp"
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
  // prepare --cards: the new startup secret onto new operator cards (as kmsctl card split)
  std::vector<std::string> cards;
  unsigned quorum_k = 0;
  std::string card_module;
  std::string card_label;
  std::vector<std::string> card_pin_files;
  bool card_force = false;
  std::string old_config;
  // reinstall / finish
  std::string old_store;
  std::vector<std::string> approver_p12;
  bool include_revoked = false;
  std::string install_config;
  bool force = false;
  // drill
  std::string db;
  std::string token_dir;
  std::string report;
  std::string work;
  bool keep = false;
  // predecrypt with the running daemon as the key source
  std::string server;
  std::string ca;
  std::string request;
  std::string admin_passphrase_file;
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

// Where a run's record is: kmsd's audit chain (the daemon source), else only the manifest.
constexpr const char* kAuditedByKmsd =
    "kmsd audited the session (dr.predecrypt.session.open / .close with these counts)";
constexpr const char* kNotAudited =
    "not in the KMS audit chain: this command has no access to the key token that MACs it; the "
    "manifest in the staging directory is the record (kmsctl dr status)";

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
          {"waiting", s.waiting},
          {"problems", problems},
          {"problems_omitted", s.problems_omitted}};
}

int show_summary(const DrArgs& a, const std::string& command, const dr::RunSummary& s,
                 const char* audit) {
  const bool failed = s.this_run.count(dr::kFailed) != 0;
  if (a.output == "json") {
    auto j = summary_json(command, s);
    j["audit"] = audit;
    std::cout << j.dump(2) << "\n";
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
  std::vector<const dr::ManifestRow*> listed;
  for (const auto& p : s.problems) listed.push_back(&p);
  for (const auto& [reason, n] : s.waiting)
    std::cout << "  waiting  " << n << " message(s): " << reason << "\n";
  const std::size_t shown = std::min<std::size_t>(listed.size(), 20);
  for (std::size_t i = 0; i < shown; ++i)
    std::cout << "  " << listed[i]->status << "  " << listed[i]->path << ": " << listed[i]->reason
              << "\n";
  if (listed.size() + s.problems_omitted > shown)
    std::cout << "  ... and " << listed.size() + s.problems_omitted - shown
              << " more (kmsctl dr status --staging DIR -o json lists them all)\n";
  std::cout << "  audit: " << audit << "\n";
  return failed ? kFailed : kOk;
}

// The old keys: the users' PKCS#12 files in --keys, each opened with USER.pass, else the
// --passphrase-file passphrase, else one asked for on the terminal.
Result<dr::KeyRing> load_keys(const DrArgs& a) {
  SecretBytes default_pass;
  dr::KeyDirOptions ko;
  ko.dir = a.keys;
  if (!a.passphrase_file.empty()) {
    KMSD_ASSIGN_OR_RETURN(default_pass, files::read_secret_file(a.passphrase_file));
    ko.default_passphrase = &default_pass;
  }
  ko.ask = [](const fs::path& p12) {
    return secret_from("", "Passphrase for " + p12.string() + ": ");
  };
  return dr::load_key_dir(ko);
}

// The running daemon as the key source: every encrypted message goes to kmsd, which opens it
// with the escrowed key (the session of an approved "dr" request) and answers with the content
// encrypted to the approved custody certificate. One connection per worker.
class DaemonSource final : public dr::KeySource {
 public:
  DaemonSource(client::ClientOptions base, std::string request, X509* custody)
      : base_(std::move(base)), request_(std::move(request)) {
    custody_ids_ = dr::recipient_ids_of_cert(custody);
  }

  dr::Rewrapped rewrap(CMS_ContentInfo* cms, const std::vector<std::string>&,
                       X509*) const override {
    dr::Rewrapped out;
    out.status = dr::kFailed;
    ossl::BioPtr bio(BIO_new(BIO_s_mem()));
    if (!bio || i2d_CMS_bio(bio.get(), cms) != 1) {
      out.reason = "cannot encode the message for kmsd";
      return out;
    }
    char* p = nullptr;
    const long n = BIO_get_mem_data(bio.get(), &p);
    auto conn = take();
    if (!conn.ok()) {
      out.reason = conn.error().message;
      return out;
    }
    auto r =
        (*conn)->post_bytes("/v1/dr/predecrypt/" + request_ + "/message",
                            std::string(p, static_cast<std::size_t>(n)), "application/pkcs7-mime");
    if (!r.ok()) {
      out.reason = "kmsd: " + r.error().message;
      return out;  // the connection is dropped
    }
    give(std::move(*conn));
    if (r->status != 200) {
      out.reason = "kmsd refused (HTTP " + std::to_string(r->status) + "): " + r->error_text();
      return out;
    }
    auto j = r->json();
    if (!j.is_object() || !j.contains("status") || !j["status"].is_string()) {
      out.reason = "kmsd sent an unreadable answer";
      return out;
    }
    out.status = j["status"].get<std::string>();
    out.users = j.value("users", std::string());
    out.reason = j.value("reason", std::string());
    if (out.status != dr::kStaged) return out;
    // The answer must be a message to the custody certificate, and to nothing else.
    const std::string b64 = j.value("cms", std::string());
    ossl::Bytes der(b64.size() / 4 * 3 + 3);
    const int len = EVP_DecodeBlock(der.data(), reinterpret_cast<const unsigned char*>(b64.data()),
                                    static_cast<int>(b64.size()));
    std::size_t pad = 0;
    for (auto it = b64.rbegin(); it != b64.rend() && *it == '=' && pad < 2; ++it) ++pad;
    out.status = dr::kFailed;
    if (len < 0 || b64.empty()) {
      out.reason = "kmsd's re-encrypted message is not base64";
      return out;
    }
    der.resize(static_cast<std::size_t>(len) - pad);
    dr::ParsedMessage back = dr::parse_message(der, dr::Format::kDer);
    if (back.kind != dr::Kind::kEncrypted || back.recipients.empty()) {
      out.reason = "kmsd's answer is not an encrypted message";
      return out;
    }
    for (const auto& id : back.recipients)
      if (std::find(custody_ids_.begin(), custody_ids_.end(), id) == custody_ids_.end()) {
        out.reason =
            "kmsd's answer is encrypted to " + id + ", not only to the custody certificate";
        return out;
      }
    out.status = dr::kStaged;
    out.cms = std::move(back.cms);
    return out;
  }

 private:
  Result<std::unique_ptr<client::AdminClient>> take() const {
    {
      std::lock_guard lock(mu_);
      if (!idle_.empty()) {
        auto c = std::move(idle_.back());
        idle_.pop_back();
        return c;
      }
    }
    client::ClientOptions o;
    o.server = base_.server;
    o.p12 = base_.p12;
    o.p12_passphrase = base_.p12_passphrase.clone();
    o.ca_file = base_.ca_file;
    return client::AdminClient::connect(std::move(o));
  }
  void give(std::unique_ptr<client::AdminClient> c) const {
    std::lock_guard lock(mu_);
    idle_.push_back(std::move(c));
  }

  client::ClientOptions base_;
  std::string request_;
  std::vector<std::string> custody_ids_;
  mutable std::mutex mu_;
  mutable std::vector<std::unique_ptr<client::AdminClient>> idle_;
};

int run_predecrypt_daemon(const DrArgs& a, X509* custody) {
  if (a.ca.empty() || a.admin_p12.empty())
    return fail(make_error(ErrorCode::kInvalidArgument,
                           "the daemon key source needs --server, --admin-p12 and --ca"));
  auto pem = files::read_text(a.custody_cert);
  if (!pem.ok()) return fail(pem.error());
  auto pass = secret_from(a.admin_passphrase_file, "Passphrase for " + a.admin_p12 + ": ");
  if (!pass.ok()) return fail(pass.error());
  client::ClientOptions base;
  base.server = a.server;
  base.p12 = a.admin_p12;
  base.p12_passphrase = std::move(*pass);
  base.ca_file = a.ca;
  client::ClientOptions first_opts;
  first_opts.server = base.server;
  first_opts.p12 = base.p12;
  first_opts.p12_passphrase = base.p12_passphrase.clone();
  first_opts.ca_file = base.ca_file;
  auto conn = client::AdminClient::connect(std::move(first_opts));
  if (!conn.ok()) return fail(conn.error());
  const json cert_body{{"custody_certificate", *pem}};
  std::string request = a.request;
  if (request.empty()) {
    // No request yet: ask for one; it runs now only when one approval is enough.
    auto r = (*conn)->post("/v1/dr/predecrypt", cert_body);
    if (!r.ok()) return fail(r.error());
    auto j = reply_json(*r);
    if (auto* rc = std::get_if<int>(&j)) return *rc;
    const json& out = std::get<json>(j);
    request = out.value("request_id", std::string());
    if (out.value("state", std::string()) != "executed") {
      if (a.output == "json") {
        std::cout << out.dump(2) << "\n";
      } else {
        std::cout << "request " << request << " (dr predecrypt to the custody certificate "
                  << ossl::sha256_fingerprint(custody)
                  << ") waits for approvals: " << out.value("approvals", 0) << " of "
                  << out.value("required", 0) << ". Once approved (kmsctl request approve "
                  << request << "), run this command again with --request " << request << "\n";
      }
      return kOk;
    }
  }
  auto opened = (*conn)->post("/v1/dr/predecrypt/" + request + "/open", cert_body);
  if (!opened.ok()) return fail(opened.error());
  if (auto j = reply_json(*opened); std::holds_alternative<int>(j)) return std::get<int>(j);
  if (a.output != "json")
    std::cerr << "keys: kmsd's escrowed key histories (session of request " << request << ")\n";
  DaemonSource source(std::move(base), request, custody);
  ProgressBar bar(a.progress, "predecrypt");
  dr::PredecryptOptions o;
  o.store = a.store;
  o.staging = a.staging;
  o.source = &source;
  o.custody_cert = custody;
  o.threads = a.threads;
  o.progress = [&bar](const dr::Progress& p) { bar(p); };
  auto s = dr::predecrypt(o);
  // The session ends whatever happened: kmsd drops the keys and audits the counts.
  auto closed = (*conn)->post("/v1/dr/predecrypt/" + request + "/close", json::object());
  if (!s.ok()) return fail(s.error());
  if (!closed.ok() || closed->status != 200)
    std::cerr << "kmsctl: the kmsd session of request " << request << " did not close ("
              << (closed.ok() ? closed->error_text() : closed.error().message)
              << "); kmsd ends it after "
              << "15 idle minutes\n";
  else if (a.output != "json")
    std::cerr << "kmsd session closed: " << closed->json().value("counts", json::object()).dump()
              << "\n";
  return show_summary(a, "predecrypt", *s, kAuditedByKmsd);
}

int run_predecrypt(const DrArgs& a) {
  auto custody = read_cert(a.custody_cert);
  if (!custody.ok()) return fail(custody.error());
  if (!a.server.empty()) {
    if (!a.keys.empty())
      return fail(make_error(ErrorCode::kInvalidArgument,
                             "give one key source: --keys DIR or --server URL"));
    return run_predecrypt_daemon(a, custody->get());
  }
  if (a.keys.empty())
    return fail(make_error(ErrorCode::kInvalidArgument,
                           "give a key source: --keys DIR (users' PKCS#12 files) or --server URL "
                           "(the running daemon, with --admin-p12, --ca and --request)"));
  auto ring = load_keys(a);
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
  return show_summary(a, "predecrypt", *s, kNotAudited);
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
  return show_summary(a, "reencrypt", *s, kNotAudited);
}

int run_dr_status(const DrArgs& a) {
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
  // The packs: their size on disk beside the bytes rows name (the rest is dead space that
  // killed runs or messages staged again left).
  std::map<std::string, std::uintmax_t> pack_bytes;
  std::uintmax_t staged_bytes = 0;
  std::error_code ec;
  const fs::path packs = dr::packs_dir(a.staging);
  if (fs::is_directory(packs, ec))
    for (const auto& e : fs::directory_iterator(packs, ec))
      if (e.is_regular_file()) pack_bytes[e.path().filename().string()] = e.file_size(ec);
  for (const auto& r : *rows) staged_bytes += r.status == dr::kStaged ? r.copy.length : 0;
  // The runs' staging keys (encrypted to the custody certificate): reencrypt needs the one of
  // every run whose packs hold staged messages.
  std::vector<std::string> staging_keys;
  const fs::path keks = dr::keys_dir(a.staging);
  if (fs::is_directory(keks, ec))
    for (const auto& e : fs::directory_iterator(keks, ec))
      if (e.is_regular_file()) staging_keys.push_back(e.path().filename().string());
  std::sort(staging_keys.begin(), staging_keys.end());
  // The runs whose staged messages still wait for reencrypt, and whether what opens them is
  // there: one record of each run is read to see how the run sealed them, and a run that sealed
  // them under its staging key needs keys/<run>.kek.der.
  struct WaitingRun {
    std::size_t waiting = 0;
    const dr::ManifestRow* sample = nullptr;
  };
  std::map<std::string, WaitingRun> waiting_runs;
  for (const auto& r : *rows) {
    if (r.status != dr::kStaged || done->count(r.path) != 0) continue;
    auto& w = waiting_runs[dr::run_of_pack(r.copy.pack)];
    ++w.waiting;
    if (w.sample == nullptr) w.sample = &r;
  }
  dr::PackReader pack_reader(a.staging);
  json runs = json::object();
  std::vector<std::string> keys_missing;
  for (const auto& [run, w] : waiting_runs) {
    std::string sealed;
    auto bytes = pack_reader.read(*w.sample);
    if (!bytes.ok()) {
      sealed = "unreadable: " + bytes.error().message;
    } else {
      const std::size_t headers = static_cast<std::size_t>(
          std::min<std::uint64_t>(w.sample->copy.header_length, bytes->size()));
      auto parsed = dr::parse_message(std::span<const std::uint8_t>(*bytes).subspan(headers),
                                      dr::Format::kDer);
      sealed = parsed.kind != dr::Kind::kEncrypted      ? "unreadable: " + parsed.what
               : dr::sealed_under_kek(parsed.cms.get()) ? "staging-key"
                                                        : "custody-certificate";
    }
    const bool has_file = !run.empty() && fs::exists(dr::kek_file(a.staging, run), ec);
    if (sealed == "staging-key" && !has_file) keys_missing.push_back(run);
    runs[run.empty() ? std::string("(no run id)") : run] = {
        {"waiting", w.waiting}, {"sealed", sealed}, {"staging_key_file", has_file}};
  }
  std::uintmax_t total_bytes = 0;
  for (const auto& [name, n] : pack_bytes) total_bytes += n;
  if (a.output == "json") {
    json messages = json::array();
    for (const auto& r : *rows) {
      json m = {{"path", r.path},     {"format", r.format},
                {"sha256", r.digest}, {"status", r.status},
                {"users", r.users},   {"reencrypted", done->count(r.path) != 0},
                {"reason", r.reason}};
      if (r.status == dr::kStaged)
        m["staged"] = {{"pack", r.copy.pack},
                       {"offset", r.copy.offset},
                       {"length", r.copy.length},
                       {"sha256", r.copy.sha256}};
      messages.push_back(std::move(m));
    }
    std::cout << json{{"counts", *counts},
                      {"reencrypted", done->size()},
                      {"packs", pack_bytes},
                      {"pack_bytes", total_bytes},
                      {"staged_bytes", staged_bytes},
                      {"staging_keys", staging_keys},
                      {"waiting_runs", runs},
                      {"staging_keys_missing", keys_missing},
                      {"messages", messages}}
                     .dump(2)
              << "\n";
    return kOk;
  }
  for (const auto& [status, n] : *counts) std::cout << status << " " << n << "\n";
  std::cout << "reencrypted " << done->size() << "\n";
  std::cout << "packs " << pack_bytes.size() << " file(s), " << total_bytes << " bytes, "
            << staged_bytes << " of them staged messages\n";
  std::cout << "staging keys " << staging_keys.size() << " file(s) in keys/ (one per run)\n";
  for (const auto& run : keys_missing)
    std::cout << "MISSING keys/" << run << ".kek.der: " << waiting_runs.at(run).waiting
              << " staged message(s) of run " << run
              << " are sealed under its staging key and wait for reencrypt, which cannot open "
                 "them without it. Restore the file from a backup of the staging directory.\n";
  return kOk;
}

// What `kmsctl dr prepare` makes on the new token and store (TOKEN logged in). Resumable.
Status prepare_kms(const DrArgs& a, const config::Config& cfg, KeyTokenLogin& login,
                   store::Store& store) {
  const hsm::TokenOptions& topts = login.options;
  // 1. What `kmsctl init` makes, unless an earlier prepare (or init) already made it.
  auto ca_cert = provision::load_ca_certificate(store);
  if (!ca_cert.ok()) {
    auto existing = provision::existing_state(*login.token, store);
    if (!existing.empty()) {
      std::string list;
      for (const auto& e : existing) list += "\n  - " + e;
      return (make_error(ErrorCode::kAlreadyExists,
                         "the new token or store holds state from something else; nothing "
                         "was changed:" +
                             list));
    }
    if (a.admin_p12.empty())
      return (make_error(ErrorCode::kInvalidArgument,
                         "--admin-p12 FILE is required: the new KMS's first administrator"));
    SecretBytes pass;
    if (!a.passphrase_file.empty()) {
      auto p = files::read_secret_file(a.passphrase_file);
      if (!p.ok()) return p.error();
      pass = std::move(*p);
    } else {
      auto p = secret_from("", "New administrator PKCS#12 passphrase: ");
      if (!p.ok()) return p.error();
      pass = std::move(*p);
    }
    auto rep =
        provision::initialize(cfg, *login.token, store, {a.admin, a.admin_p12, std::move(pass)});
    if (!rep.ok()) return rep.error();
    std::cout << "new KMS: master, CA and audit keys on " << cfg.token.uri << "; CA "
              << rep->ca_subject << " (SHA-256 " << rep->ca_sha256_fingerprint
              << "); administrator " << a.admin << " in " << a.admin_p12 << "\n";
    ca_cert = provision::load_ca_certificate(store);
    if (!ca_cert.ok()) return ca_cert.error();
  } else {
    std::cout << "new KMS already initialized (CA SHA-256 "
              << ossl::sha256_fingerprint(ca_cert->get()) << "); keeping it\n";
  }

  // 2. The custody key pair on the same token.
  hsm::TokenOptions copts = topts;
  copts.labels.ca = a.custody_label;  // the token layer reads a key pair by this label
  auto custody = hsm::Token::open(copts);
  if (!custody.ok()) return custody.error();
  if (!(*custody)->has_ca_key()) {
    if (auto st = login.token->generate_decryption_key(a.custody_label, hsm::KeyType::kRsa3072);
        !st.ok())
      return st.error();
    std::cout << "custody key: RSA-3072 '" << a.custody_label << "' generated on the token\n";
  } else {
    std::cout << "custody key '" << a.custody_label << "' already on the token; keeping it\n";
  }
  auto pub = (*custody)->ca_public_key();
  if (!pub.ok()) return pub.error();

  // 3. Its certificate, signed by the new CA on the token.
  auto subject = ca::parse_subject("/CN=kmsd DR custody");
  if (!subject.ok()) return subject.error();
  ca::IssueRequest req;
  req.profile = ca::Profile::kUser;
  req.subject = subject->get();
  req.public_key = pub->get();
  req.validity = std::chrono::hours(24) * a.custody_days;
  req.key_usage = {"keyEncipherment"};
  auto cert = ca::issue_on_token(req, ca_cert->get(), *login.token, EVP_sha256());
  if (!cert.ok()) return cert.error();
  auto pem = ossl::x509_to_pem(cert->get());
  if (!pem.ok()) return pem.error();
  if (auto st = files::write_atomic(a.custody_cert_out, *pem, 0644); !st.ok()) return st.error();
  audit::AuditLog audit(store, *login.token);
  KMSD_TRY(store.transaction([&] {
    return audit.append(a.admin, "dr.prepare",
                        {{"ca_sha256", ossl::sha256_fingerprint(ca_cert->get())},
                         {"custody_label", a.custody_label},
                         {"custody_serial", ca::serial_hex(cert->get())},
                         {"custody_sha256", ossl::sha256_fingerprint(cert->get())}});
  }));
  (*custody)->logout();
  login.token->logout();
  std::cout << "custody certificate: " << a.custody_cert_out << " (serial "
            << ca::serial_hex(cert->get()) << ", SHA-256 " << ossl::sha256_fingerprint(cert->get())
            << ")\n"
            << "custody key for reencrypt: --custody-key '" << cfg.token.uri
            << ";object=" << a.custody_label << "' --module " << topts.module_path << "\n";
  return {};
}

// The label and serial of the token URI names on MODULE (opened, never logged in to).
Result<startup::ForbiddenToken> token_identity(const std::string& module, const std::string& uri) {
  hsm::TokenOptions o;
  o.module_path = module;
  o.token_uri = uri;
  o.pool_size = 1;
  KMSD_ASSIGN_OR_RETURN(auto t, hsm::Token::open(o));
  auto s = t->status();
  return startup::ForbiddenToken{s.token_label, s.token_serial};
}

// prepare --cards: none of the cards may be the new key token, nor the old token or one of the
// old cards (--old-config); checked before anything is made or written.
Status check_new_cards(const DrArgs& a, const config::Config& cfg, const CardWritePlan& plan,
                       const hsm::Token& key_token) {
  struct Known {
    startup::ForbiddenToken id;
    std::string what;
  };
  std::vector<Known> refused;
  const auto ks = key_token.status();
  refused.push_back(
      {{ks.token_label, ks.token_serial}, "the new key token (" + cfg.token.uri + ")"});
  std::vector<std::string> old_uris;
  if (!a.old_config.empty()) {
    auto old = load_config(a.old_config);
    if (!old) return make_error(ErrorCode::kConfig, "cannot read --old-config " + a.old_config);
    old_uris.push_back(old->token.uri);
    if (auto id = token_identity(old->token.module.string(), old->token.uri); id.ok())
      refused.push_back({*id, "the old key token (" + old->token.uri + ")"});
    else
      std::cerr << "kmsctl: note: the old key token " << old->token.uri
                << " cannot be opened; only a card URI equal to it is refused\n";
    if (!old->startup.card_uri.empty()) {
      old_uris.push_back(old->startup.card_uri);
      const auto m =
          old->startup.card_module.empty() ? plan.module : old->startup.card_module.string();
      if (auto id = token_identity(m, old->startup.card_uri); id.ok())
        refused.push_back({*id, "the old operator card (" + old->startup.card_uri + ")"});
    }
  }
  for (const auto& uri : plan.cards) {
    for (const auto& o : old_uris)
      if (uri == o)
        return make_error(ErrorCode::kInvalidArgument,
                          "--cards " + uri +
                              " names the old KMS's token or card, which dr "
                              "prepare never touches; nothing was made or written. "
                              "Name new operator cards");
    auto id = token_identity(plan.module, uri);
    if (!id.ok())
      return id.error().context("operator card " + uri + " (nothing was made or written)");
    for (const auto& r : refused)
      if (id->label == r.id.label && id->serial == r.id.serial)
        return make_error(ErrorCode::kInvalidArgument,
                          "--cards " + uri + " names " + r.what +
                              ", not a new operator card; nothing was made or written. Name "
                              "new operator cards (pkcs11:token=CARD-LABEL)");
  }
  return {};
}

// The new startup secret (the new key token's PIN) onto the new cards, recorded in the new
// store's audit chain (k, n, quorum id; never the secret), and the [startup] lines printed.
int prepare_cards(const DrArgs& a, const config::Config& cfg, const CardWritePlan& plan,
                  KeyTokenLogin& login, store::Store& store) {
  auto written = write_secret_to_cards(plan, login.pin);
  if (!written.ok()) return fail(written.error());
  const bool quorum = plan.k >= 2;
  if (auto st = login.token->login(login.pin); !st.ok()) return fail(st.error());
  audit::AuditLog audit(store, *login.token);
  auto st = store.transaction([&] {
    return audit.append(a.admin, "dr.prepare.cards",
                        {{"source", quorum ? "quorum" : "card"},
                         {"k", quorum ? plan.k : 1},
                         {"n", plan.cards.size()},
                         {"quorum_id", written->quorum_id},
                         {"cards", plan.cards},
                         {"already_written", written->already}});
  });
  login.token->logout();
  if (!st.ok()) return fail(st.error());
  std::cout << "\nThe new startup secret is on the new cards. In the NEW kmsd.toml (" << a.config
            << "), set:\n"
            << "[startup]\n"
            << "source = \"" << (quorum ? "quorum" : "card") << "\"\n"
            << "card_module = " << json(plan.module).dump() << "\n"
            << "card_label = " << json(plan.label).dump() << "\n";
  if (quorum) {
    std::cout << "# quorum " << written->quorum_id << ": any " << plan.k << " of";
    for (const auto& c : plan.cards) std::cout << " " << c;
    std::cout << "\n";
  } else {
    std::cout << "card_uri = " << json(plan.cards.front()).dump() << "\n";
  }
  if (cfg.startup.source == config::StartupSource::kFile)
    std::cout << "and remove startup.file (" << cfg.startup.file.string()
              << ") once kmsd unseals with the cards.\n";
  return kOk;
}

int run_prepare(const DrArgs& a) {
  auto cfg = load_config(a.config);
  if (!cfg) return kUsage;
  if (fs::exists(a.custody_cert_out))
    return fail(make_error(ErrorCode::kAlreadyExists,
                           a.custody_cert_out + " exists; choose another --custody-cert-out"));
  CardWritePlan plan;
  if (!a.cards.empty()) {
    plan.module = a.card_module.empty() ? cfg->startup.card_module.string() : a.card_module;
    plan.label = a.card_label.empty() ? cfg->startup.card_label : a.card_label;
    plan.cards = a.cards;
    plan.pin_files = a.card_pin_files;
    plan.k = a.quorum_k;
    plan.force = a.card_force;
    plan.accept_existing = true;
    if (plan.module.empty())
      return fail(make_error(ErrorCode::kInvalidArgument,
                             "name the cards' PKCS#11 module with --card-module PATH (or "
                             "startup.card_module in --config)"));
    if (auto st = check_card_plan(plan); !st.ok()) return fail(st.error());
  } else if (a.quorum_k != 0 || !a.card_pin_files.empty()) {
    return fail(make_error(ErrorCode::kInvalidArgument,
                           "--quorum-k and --card-pin-files need --cards URI ..."));
  }
  auto login =
      login_key_token(*cfg, a.pin_file, "New key token user PIN (the new startup secret): ");
  if (!login.ok()) return fail(login.error());
  if (!plan.cards.empty())
    if (auto st = check_new_cards(a, *cfg, plan, *login->token); !st.ok()) return fail(st.error());
  auto store = store::Store::open(cfg->store.path);
  if (!store.ok()) return fail(store.error());
  auto st = prepare_kms(a, *cfg, *login, **store);
  if (!st.ok()) return fail(st.error());
  if (!plan.cards.empty()) return prepare_cards(a, *cfg, plan, *login, **store);
  return kOk;
}

// The new KMS as `kmsctl dr prepare` left it: configuration, token (logged in), store, CA.
struct NewKms {
  config::Config cfg;
  KeyTokenLogin login;
  std::unique_ptr<store::Store> store;
  ossl::X509Ptr ca;
};

Result<NewKms> open_new_kms(const DrArgs& a) {
  auto cfg = load_config(a.config);
  if (!cfg)
    return make_error(ErrorCode::kConfig, "cannot use --config " + a.config + " (see above)");
  NewKms k{*cfg, {}, nullptr, nullptr};
  KMSD_ASSIGN_OR_RETURN(k.login, login_key_token(k.cfg, a.pin_file,
                                                 "New key token user PIN (the new startup "
                                                 "secret): "));
  KMSD_ASSIGN_OR_RETURN(k.store, store::Store::open(k.cfg.store.path));
  auto ca = provision::load_ca_certificate(*k.store);
  if (!ca.ok())
    return ca.error().context("the new KMS is not prepared (run kmsctl dr prepare --config " +
                              a.config + " first)");
  k.ca = std::move(*ca);
  return k;
}

// Every administrator PKCS#12 given: its certificate and key, for verify_administrators.
Result<std::vector<dr::KeyPair>> read_admin_p12s(const std::vector<std::string>& files,
                                                 const std::string& passphrase_file) {
  std::optional<SecretBytes> shared;
  if (!passphrase_file.empty()) {
    KMSD_ASSIGN_OR_RETURN(auto p, files::read_secret_file(passphrase_file));
    shared = std::move(p);
  }
  std::vector<dr::KeyPair> out;
  for (const auto& f : files) {
    KMSD_ASSIGN_OR_RETURN(auto der, files::read_text(f));
    SecretBytes pass;
    if (shared) {
      pass = SecretBytes(shared->span());
    } else {
      KMSD_ASSIGN_OR_RETURN(pass, secret_from("", "Passphrase for " + f + ": "));
    }
    auto pairs =
        dr::read_pkcs12_keys({reinterpret_cast<const std::uint8_t*>(der.data()), der.size()}, pass);
    if (!pairs.ok()) return pairs.error().context(f);
    if (pairs->empty())
      return make_error(ErrorCode::kInvalidArgument, f + " holds no key with its certificate");
    out.push_back(std::move(pairs->front()));
  }
  return out;
}

int run_reinstall(const DrArgs& a) {
  auto kms = open_new_kms(a);
  if (!kms.ok()) return fail(kms.error());
  std::vector<std::string> p12s = a.approver_p12;
  if (!a.admin_p12.empty()) p12s.insert(p12s.begin(), a.admin_p12);
  if (p12s.empty())
    return fail(make_error(ErrorCode::kInvalidArgument,
                           "--admin-p12 FILE is required: the new KMS administrator who runs "
                           "the reinstall (kmsctl dr prepare wrote it)"));
  auto pairs = read_admin_p12s(p12s, a.passphrase_file);
  if (!pairs.ok()) return fail(pairs.error());
  std::vector<dr::Presented> presented;
  for (const auto& p : *pairs) presented.push_back({p.cert.get(), p.key.get()});
  auto approvers = dr::verify_administrators(*kms->store, kms->ca.get(), presented);
  if (!approvers.ok()) return fail(approvers.error());
  auto required = dr::required_approvals(*kms->store, kms->cfg.approvals.required);
  if (!required.ok()) return fail(required.error());
  auto old = dr::read_old_kms(a.old_store);
  if (!old.ok()) return fail(old.error());
  const std::string job = dr::reinstall_job(*old);
  auto file = bulk::ResultFile::open(a.out, job, a.old_store);
  if (!file.ok()) return fail(file.error());

  audit::AuditLog audit(*kms->store, *kms->login.token);
  auto check = policy::PolicyCheck::create(kms->cfg.policy);
  if (!check.ok()) return fail(check.error());
  policy::PolicyInForce policy(std::make_shared<const policy::PolicyCheck>(std::move(*check)));
  const auto enrollment = kms->cfg.enrollment;
  users::UserService users(*kms->store, *kms->login.token, audit, policy, [enrollment] {
    return users::TokenSettings{std::chrono::days(enrollment.token_ttl_days),
                                enrollment.max_failed_attempts};
  });
  dr::ReinstallOptions o;
  o.approvers = *approvers;
  o.required = *required;
  o.include_revoked = a.include_revoked;
  o.already_written = file->written();
  o.sink = [&file](const std::vector<users::BulkLine>& lines) {
    std::vector<bulk::ResultLine> out;
    for (const auto& l : lines)
      out.push_back({l.id, users::to_string(l.status), l.message,
                     l.status == users::BulkStatus::kIssued ? std::string(l.token.view()) : "",
                     l.expires_at != 0 ? utc_text(l.expires_at) : ""});
    return file->append(out);
  };
  auto sum = dr::reinstall(*kms->store, audit, users, *old, kms->ca.get(), o);
  if (!sum.ok()) return fail(sum.error());

  std::string switched;
  if (!a.install_config.empty()) {
    // The switch: the configuration kmsd starts with names the new token, store and CA. The
    // old one is kept beside it.
    auto text = files::read_text(a.config);
    if (!text.ok()) return fail(text.error());
    const fs::path live = a.install_config;
    std::error_code ec;
    if (fs::exists(live, ec)) {
      const fs::path kept = live.string() + ".pre-dr";
      fs::copy_file(live, kept, fs::copy_options::overwrite_existing, ec);
      if (ec)
        return fail(make_error(ErrorCode::kIo, "cannot keep " + live.string() + " as " +
                                                   kept.string() + ": " + ec.message()));
    }
    if (auto st = files::write_atomic(live, *text, 0640); !st.ok()) return fail(st.error());
    auto st = kms->store->transaction([&] {
      return audit.append(o.approvers.front(), "dr.reinstall.switch",
                          {{"config", live.string()}, {"from", a.config}});
    });
    if (!st.ok()) return fail(st.error());
    switched = live.string();
  }
  kms->login.token->logout();

  std::map<std::string, std::size_t> total = file->resumed_statuses();
  for (const auto& [s, n] : sum->statuses) total[s] += n;
  if (a.output == "json") {
    std::cout << json{{"job", sum->job},
                      {"request_id", sum->request_id},
                      {"approvers", o.approvers},
                      {"required", o.required},
                      {"users", sum->users},
                      {"statuses", total},
                      {"this_run", sum->statuses},
                      {"retired_keys", sum->retired_keys},
                      {"old_ca_sha256", sum->old_ca_sha256},
                      {"new_ca_sha256", sum->new_ca_sha256},
                      {"out", a.out},
                      {"installed_config", switched}}
                     .dump(2)
              << "\n";
    return kOk;
  }
  std::cout << "dr reinstall (approved by";
  for (const auto& n : o.approvers) std::cout << " " << n;
  std::cout << ", " << o.required << " required): " << sum->users
            << " user(s) of the old KMS; tokens in " << a.out << " (mode 0600)\n";
  for (const auto& [s, n] : total) std::cout << "  " << s << " " << n << "\n";
  std::cout << "old CA SHA-256 " << sum->old_ca_sha256 << "\nnew CA SHA-256 " << sum->new_ca_sha256
            << "\n"
            << sum->retired_keys
            << " old key(s) retired: kept only for predecrypt, destroyed by kmsctl dr finish\n";
  if (!switched.empty())
    std::cout << switched << " now names the new token and store (the old one is " << switched
              << ".pre-dr): start kmsd\n";
  else
    std::cout << "Start kmsd with " << a.config << " (or rerun with --install-config PATH)\n";
  std::cout << "Hand each token to its user over a trusted channel, then delete " << a.out << ".\n";
  return kOk;
}

int run_finish(const DrArgs& a) {
  auto kms = open_new_kms(a);
  if (!kms.ok()) return fail(kms.error());
  auto pairs = read_admin_p12s({a.admin_p12}, a.passphrase_file);
  if (!pairs.ok()) return fail(pairs.error());
  auto who = dr::verify_administrators(*kms->store, kms->ca.get(),
                                       {{pairs->front().cert.get(), pairs->front().key.get()}});
  if (!who.ok()) return fail(who.error());
  audit::AuditLog audit(*kms->store, *kms->login.token);
  dr::FinishOptions o;
  o.staging = a.staging;
  if (!a.keys.empty()) o.keys = fs::path(a.keys);
  if (!a.old_store.empty()) o.old_db = fs::path(a.old_store);
  o.custody_label = a.custody_label;
  o.force = a.force;
  o.actor = who->front();
  auto sum = dr::finish(*kms->store, *kms->login.token, audit, o);
  kms->login.token->logout();
  if (!sum.ok()) {
    if (sum.error().code == ErrorCode::kFailedPrecondition) {
      std::cerr << "kmsctl: " << sum.error().message << "\n";
      return kExists;
    }
    return fail(sum.error());
  }
  if (a.output == "json") {
    std::cout << json{{"staged_waiting", sum->staged_waiting},
                      {"forced", a.force},
                      {"custody_objects_destroyed", sum->custody_objects_destroyed},
                      {"staged_files_removed", sum->staged_files_removed},
                      {"staging_keys_removed", sum->staging_keys_removed},
                      {"key_files_destroyed", sum->key_files_destroyed},
                      {"old_keys_wiped", sum->old_keys_wiped}}
                     .dump(2)
              << "\n";
    return kOk;
  }
  std::cout << "dr finish: custody key '" << a.custody_label << "' destroyed ("
            << sum->custody_objects_destroyed << " object(s)); " << sum->staged_files_removed
            << " staged pack file(s) and " << sum->staging_keys_removed
            << " run staging key file(s) removed; " << sum->key_files_destroyed
            << " PKCS#12 file(s) overwritten and removed; " << sum->old_keys_wiped
            << " sealed old key(s) wiped from the old database";
  if (sum->staged_waiting > 0)
    std::cout << "; FORCED with " << sum->staged_waiting << " message(s) never re-encrypted";
  std::cout << "\n" << a.staging << "/manifest.db is kept as the record.\n";
  return kOk;
}

// ---- kmsctl dr drill ----
// The whole sequence on copies and a scratch SoftHSM token; the production store, database
// and token directory are only read, and checksummed before and after.

using SteadyClock = std::chrono::steady_clock;

// SHA-256 over files: each one's path (relative to its root) and content, in path order.
struct TreeSum {
  std::string sha256;
  std::size_t files = 0;
  std::uintmax_t bytes = 0;
};

Result<TreeSum> tree_sha256(const std::vector<fs::path>& roots) {
  ossl::EvpMdCtxPtr all(EVP_MD_CTX_new());
  EVP_DigestInit_ex(all.get(), EVP_sha256(), nullptr);
  TreeSum sum;
  std::vector<char> buf(1 << 16);
  for (const auto& root : roots) {
    std::error_code ec;
    std::vector<fs::path> files;
    if (fs::is_regular_file(root, ec)) {
      files.push_back(root);
    } else if (fs::is_directory(root, ec)) {
      for (auto it = fs::recursive_directory_iterator(root, ec);
           !ec && it != fs::recursive_directory_iterator(); it.increment(ec))
        if (it->is_regular_file() && !it->is_symlink()) files.push_back(it->path());
      if (ec)
        return make_error(ErrorCode::kIo, "cannot list " + root.string() + ": " + ec.message());
      std::sort(files.begin(), files.end());
    } else {
      continue;  // absent (e.g. no -wal file): nothing to sum
    }
    for (const auto& f : files) {
      const std::string rel = f == root ? f.filename().string() : fs::relative(f, root).string();
      EVP_DigestUpdate(all.get(), rel.data(), rel.size() + 1);
      ossl::EvpMdCtxPtr one(EVP_MD_CTX_new());
      EVP_DigestInit_ex(one.get(), EVP_sha256(), nullptr);
      UniqueFd fd(::open(f.c_str(), O_RDONLY | O_CLOEXEC));
      if (!fd.valid()) return make_error(ErrorCode::kIo, "cannot read " + f.string());
      ssize_t n;
      while ((n = ::read(fd.get(), buf.data(), buf.size())) > 0) {
        EVP_DigestUpdate(one.get(), buf.data(), static_cast<std::size_t>(n));
        sum.bytes += static_cast<std::uintmax_t>(n);
      }
      if (n < 0) return make_error(ErrorCode::kIo, "cannot read " + f.string());
      unsigned char md[EVP_MAX_MD_SIZE];
      unsigned len = 0;
      EVP_DigestFinal_ex(one.get(), md, &len);
      EVP_DigestUpdate(all.get(), md, len);
      ++sum.files;
    }
  }
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned len = 0;
  EVP_DigestFinal_ex(all.get(), md, &len);
  sum.sha256 = ossl::hex({md, len});
  return sum;
}

std::string random_hex(std::size_t bytes) {
  std::vector<std::uint8_t> b(bytes);
  RAND_bytes(b.data(), static_cast<int>(b.size()));
  return ossl::hex(b);
}

// Runs ARGV (no shell) with SOFTHSM2_CONF=CONF, its output discarded; the exit status.
int run_tool(const std::vector<std::string>& argv, const std::string& conf) {
  const pid_t pid = ::fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    ::setenv("SOFTHSM2_CONF", conf.c_str(), 1);
    const int null = ::open("/dev/null", O_WRONLY);
    if (null >= 0) {
      ::dup2(null, STDOUT_FILENO);
      ::dup2(null, STDERR_FILENO);
    }
    std::vector<char*> args;
    for (const auto& s : argv) args.push_back(const_cast<char*>(s.c_str()));
    args.push_back(nullptr);
    ::execvp(args[0], args.data());
    ::_exit(127);
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

Result<std::string> read_file(const fs::path& p) {
  return files::read_text(p);
}

// The content of CMS opened with KEY/CERT, in a cleansing buffer.
Result<SecretBytes> open_content(CMS_ContentInfo* cms, EVP_PKEY* key, X509* cert) {
  KMSD_ASSIGN_OR_RETURN(auto bio, dr::decrypt(cms, key, cert));
  char* p = nullptr;
  const long n = BIO_get_mem_data(bio.get(), &p);
  return SecretBytes(reinterpret_cast<const std::uint8_t*>(p), static_cast<std::size_t>(n));
}

struct Phase {
  std::string name;
  double seconds = 0;
  std::size_t items = 0;
  std::string unit;
};

struct DrillFailure {
  std::string phase;
  std::string what;
  std::string reason;
};

std::string html_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '<')
      o += "&lt;";
    else if (c == '>')
      o += "&gt;";
    else if (c == '&')
      o += "&amp;";
    else
      o += c;
  }
  return o;
}

Status write_reports(const fs::path& dir, const json& r) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return make_error(ErrorCode::kIo, "cannot create " + dir.string() + ": " + ec.message());
  KMSD_TRY(files::write_atomic(dir / "drill.json", r.dump(2) + "\n", 0600, true));

  std::ostringstream md;
  md << "# kmsd disaster-recovery drill: " << r["result"].get<std::string>() << "\n\n"
     << "Started " << r["started_at"].get<std::string>() << ", " << r["total_seconds"].get<double>()
     << " s in all. Work directory: `" << r["work"].get<std::string>() << "`.\n\n"
     << "## Production untouched\n\n| what | path | SHA-256 before | SHA-256 after | files |\n"
     << "|---|---|---|---|---|\n";
  for (const auto& c : r["checksums"]["items"])
    md << "| " << c["what"].get<std::string>() << " | `" << c["path"].get<std::string>() << "` | `"
       << c["before"].get<std::string>() << "` | `" << c["after"].get<std::string>() << "` | "
       << c["files"] << " |\n";
  md << "\nUnchanged: **" << (r["checksums"]["unchanged"].get<bool>() ? "yes" : "NO") << "**\n\n"
     << "## CA\n\n- old CA SHA-256: `" << r["ca"]["old_sha256"].get<std::string>()
     << "`\n- new CA SHA-256: `" << r["ca"]["new_sha256"].get<std::string>()
     << "`\n- custody certificate SHA-256: `" << r["ca"]["custody_sha256"].get<std::string>()
     << "`\n\n## Phases\n\n| phase | seconds | items | rate |\n|---|---|---|---|\n";
  for (const auto& p : r["phases"]) {
    const double s = p["seconds"].get<double>();
    const auto n = p["items"].get<std::size_t>();
    char rate[64] = "";
    if (n > 0 && s > 0)
      std::snprintf(rate, sizeof rate, "%.1f %s/s", static_cast<double>(n) / s,
                    p["unit"].get<std::string>().c_str());
    char secs[32];
    std::snprintf(secs, sizeof secs, "%.3f", s);
    md << "| " << p["name"].get<std::string>() << " | " << secs << " | " << n << " "
       << p["unit"].get<std::string>() << " | " << rate << " |\n";
  }
  md << "\n## Messages by status (manifest)\n\n| status | messages |\n|---|---|\n";
  for (const auto& [k, v] : r["messages"]["by_status"].items())
    md << "| " << k << " | " << v << " |\n";
  md << "\nRe-encrypted: " << r["messages"]["reencrypted"] << ". Verified byte-identical after "
     << "re-encryption: " << r["verify"]["identical"] << " of " << r["verify"]["checked"]
     << " messages that decrypted before.\n\n## Users\n\n"
     << "- in the old KMS: " << r["users"]["old"]
     << "\n- enabled with a fresh token: " << r["users"]["issued"]
     << "\n- re-enrolled: " << r["users"]["enrolled"]
     << "\n\n## Audit records written (new KMS)\n\n| action | records |\n|---|---|\n";
  for (const auto& [k, v] : r["audit"]["by_action"].items())
    md << "| " << k << " | " << v << " |\n";
  md << "\nChain verified: " << (r["audit"]["chain_verified"].get<bool>() ? "yes" : "NO") << " ("
     << r["audit"]["records"] << " records)\n\n## Failures\n\n";
  if (r["failures"].empty()) md << "None.\n";
  for (const auto& f : r["failures"])
    md << "- **" << f["phase"].get<std::string>() << "** " << f["what"].get<std::string>() << ": "
       << f["reason"].get<std::string>() << "\n";
  KMSD_TRY(files::write_atomic(dir / "drill.md", md.str(), 0600, true));

  double longest = 0;
  for (const auto& p : r["phases"]) longest = std::max(longest, p["seconds"].get<double>());
  std::ostringstream h;
  h << "<!doctype html><meta charset=utf-8><title>kmsd DR drill</title><style>body{font:14px "
       "sans-serif;margin:2em}td,th{padding:2px 8px;text-align:left}.bar{background:#36c;"
       "height:14px}</style><h1>kmsd disaster-recovery drill: "
    << html_escape(r["result"].get<std::string>()) << "</h1><h2>Time per phase</h2><table>";
  for (const auto& p : r["phases"]) {
    const double s = p["seconds"].get<double>();
    const int width = longest > 0 ? static_cast<int>(400.0 * s / longest) + 1 : 1;
    char secs[32];
    std::snprintf(secs, sizeof secs, "%.3f s", s);
    h << "<tr><th>" << html_escape(p["name"].get<std::string>()) << "</th><td><div class=bar "
      << "style='width:" << width << "px'></div></td><td>" << secs << "</td><td>" << p["items"]
      << " " << html_escape(p["unit"].get<std::string>()) << "</td></tr>";
  }
  h << "</table><h2>Messages</h2><table>";
  for (const auto& [k, v] : r["messages"]["by_status"].items())
    h << "<tr><th>" << html_escape(k) << "</th><td>" << v << "</td></tr>";
  h << "</table><p>Verified identical: " << r["verify"]["identical"] << " of "
    << r["verify"]["checked"]
    << "; production unchanged: " << (r["checksums"]["unchanged"].get<bool>() ? "yes" : "NO")
    << "</p><p>Full report: drill.md, drill.json</p>";
  return files::write_atomic(dir / "drill.html", h.str(), 0600, true);
}

int run_drill(const DrArgs& a) {
  const auto t_start = SteadyClock::now();
  std::vector<Phase> phases;
  std::vector<DrillFailure> failures;
  auto phase_done = [&](const std::string& name, SteadyClock::time_point t0, std::size_t items,
                        const std::string& unit) {
    phases.push_back(
        {name, std::chrono::duration<double>(SteadyClock::now() - t0).count(), items, unit});
    if (a.output != "json") std::cerr << "drill: " << name << " done\n";
  };
  std::error_code ec;
  for (const auto& [what, p] : std::vector<std::pair<std::string, std::string>>{
           {"--store", a.store}, {"--db", a.db}, {"--keys", a.keys}})
    if (!fs::exists(p, ec))
      return fail(make_error(ErrorCode::kInvalidArgument, what + " " + p + " does not exist"));
  const fs::path work =
      fs::absolute(a.work.empty() ? fs::temp_directory_path() / ("kmsd-dr-drill-" + random_hex(6))
                                  : fs::path(a.work));
  if (fs::exists(work, ec) && !fs::is_empty(work, ec))
    return fail(
        make_error(ErrorCode::kAlreadyExists,
                   work.string() + " is not empty: the drill needs a fresh work directory"));
  fs::create_directories(work, ec);
  fs::permissions(work, fs::perms::owner_all, ec);
  const fs::path report_dir = a.report.empty()
                                  ? fs::current_path() / ("dr-drill-report-" + random_hex(4))
                                  : fs::path(a.report);
  struct Cleanup {
    fs::path dir;
    bool keep;
    ~Cleanup() {
      std::error_code e;
      if (!keep) fs::remove_all(dir, e);
    }
  } cleanup{work, a.keep};

  // 0. Checksums of production.
  struct Item {
    std::string what;
    std::vector<fs::path> paths;
    std::string shown;
    TreeSum before, after;
  };
  std::vector<Item> items = {{"message store", {a.store}, a.store, {}, {}},
                             {"database", {a.db, a.db + "-wal"}, a.db, {}, {}}};
  if (!a.token_dir.empty())
    items.push_back({"token directory", {a.token_dir}, a.token_dir, {}, {}});
  auto t0 = SteadyClock::now();
  for (auto& it : items) {
    auto s = tree_sha256(it.paths);
    if (!s.ok()) return fail(s.error());
    it.before = *s;
  }
  phase_done("checksum-before", t0, items.size(), "trees");

  // 1. Copies and the scratch token.
  t0 = SteadyClock::now();
  fs::copy(a.store, work / "store", fs::copy_options::recursive | fs::copy_options::copy_symlinks,
           ec);
  if (ec) return fail(make_error(ErrorCode::kIo, "cannot copy the store: " + ec.message()));
  fs::copy_file(a.db, work / "old.db", ec);
  if (!ec && fs::exists(a.db + "-wal")) fs::copy_file(a.db + "-wal", work / "old.db-wal", ec);
  if (ec) return fail(make_error(ErrorCode::kIo, "cannot copy the database: " + ec.message()));
  {
    // Fold a copied write-ahead log into the copy, so that it reads like a cleanly closed one.
    sqlite3* db = nullptr;
    const bool ok =
        sqlite3_open_v2((work / "old.db").c_str(), &db, SQLITE_OPEN_READWRITE, nullptr) ==
            SQLITE_OK &&
        sqlite3_exec(db, "PRAGMA wal_checkpoint(TRUNCATE)", nullptr, nullptr, nullptr) == SQLITE_OK;
    sqlite3_close(db);
    if (!ok)
      return fail(make_error(ErrorCode::kStore,
                             "the copy of " + a.db + " is not a readable SQLite database"));
  }
  fs::create_directories(work / "hsm" / "tokens", ec);
  const std::string conf = (work / "hsm" / "softhsm2.conf").string();
  if (auto st = files::write_atomic(conf,
                                    "directories.tokendir = " + (work / "hsm" / "tokens").string() +
                                        "\nobjectstore.backend = file\nlog.level = ERROR\n",
                                    0600);
      !st.ok())
    return fail(st.error());
  ::setenv("SOFTHSM2_CONF", conf.c_str(), 1);  // before the module is loaded in this process
  const std::string label = "kmsd-drill-" + random_hex(4);
  const std::string pin = random_hex(12);
  if (auto st = files::write_atomic(work / "pin", pin, 0600); !st.ok()) return fail(st.error());
  if (auto st = files::write_atomic(work / "admin.pass", random_hex(12), 0600); !st.ok())
    return fail(st.error());
  if (run_tool({"softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin",
                random_hex(8), "--pin", pin},
               conf) != 0)
    return fail(make_error(ErrorCode::kConfig,
                           "softhsm2-util --init-token failed: the drill's scratch token is a "
                           "SoftHSM token (install softhsm2)"));
  const std::string toml =
      "[server]\npublic_listen = \"127.0.0.1:18080\"\nadmin_listen = "
      "\"127.0.0.1:18443\"\nunseal_socket = \"" +
      (work / "unseal.sock").string() + "\"\n[token]\nmodule = \"" + a.module +
      "\"\nuri = \"pkcs11:token=" + label +
      "\"\n[ca]\nsubject = \"/O=kmsd DR drill/CN=New KMS CA\"\n[store]\n"
      "path = \"" +
      (work / "kmsd-new.db").string() + "\"\n[startup]\nsource = \"file\"\nfile = \"" +
      (work / "pin").string() + "\"\n";
  if (auto st = files::write_atomic(work / "kmsd-new.toml", toml, 0600); !st.ok())
    return fail(st.error());
  phase_done("copy", t0, 2, "copies");

  // 2. prepare
  t0 = SteadyClock::now();
  auto cfg = load_config((work / "kmsd-new.toml").string());
  if (!cfg) return kUsage;
  DrArgs pa = a;
  pa.config = (work / "kmsd-new.toml").string();
  pa.admin = "drill-admin";
  pa.admin_p12 = (work / "admin.p12").string();
  pa.passphrase_file = (work / "admin.pass").string();
  pa.custody_cert_out = (work / "custody.pem").string();
  pa.pin_file = (work / "pin").string();
  auto login = login_key_token(*cfg, pa.pin_file, "");
  if (!login.ok()) return fail(login.error());
  auto store = store::Store::open(cfg->store.path);
  if (!store.ok()) return fail(store.error());
  if (auto st = prepare_kms(pa, *cfg, *login, **store); !st.ok()) return fail(st.error());
  if (auto st = login->token->login(login->pin); !st.ok()) return fail(st.error());
  auto new_ca = provision::load_ca_certificate(**store);
  if (!new_ca.ok()) return fail(new_ca.error());
  auto custody_cert = read_cert(pa.custody_cert_out);
  if (!custody_cert.ok()) return fail(custody_cert.error());
  phase_done("prepare", t0, 1, "token");

  // 3. predecrypt (the PKCS#12 key source)
  t0 = SteadyClock::now();
  auto ring = load_keys(a);
  if (!ring.ok()) return fail(ring.error());
  dr::PredecryptOptions po;
  po.store = work / "store";
  po.staging = work / "staging";
  po.keys = &*ring;
  po.custody_cert = custody_cert->get();
  po.threads = a.threads;
  auto pre = dr::predecrypt(po);
  if (!pre.ok()) return fail(pre.error());
  for (const auto& p : pre->problems)
    if (p.status == dr::kFailed) failures.push_back({"predecrypt", p.path, p.reason});
  phase_done("predecrypt", t0, pre->processed, "msg");

  // 4. reinstall
  t0 = SteadyClock::now();
  auto old = dr::read_old_kms(work / "old.db");
  if (!old.ok()) return fail(old.error());
  auto admin_pairs = read_admin_p12s({pa.admin_p12}, pa.passphrase_file);
  if (!admin_pairs.ok()) return fail(admin_pairs.error());
  auto approvers = dr::verify_administrators(
      **store, new_ca->get(), {{admin_pairs->front().cert.get(), admin_pairs->front().key.get()}});
  if (!approvers.ok()) return fail(approvers.error());
  auto result_file = bulk::ResultFile::open(work / "tokens.csv", dr::reinstall_job(*old),
                                            (work / "old.db").string());
  if (!result_file.ok()) return fail(result_file.error());
  audit::AuditLog audit(**store, *login->token);
  auto check = policy::PolicyCheck::create(cfg->policy);
  if (!check.ok()) return fail(check.error());
  policy::PolicyInForce policy(std::make_shared<const policy::PolicyCheck>(std::move(*check)));
  const auto enrollment_cfg = cfg->enrollment;
  users::UserService user_service(**store, *login->token, audit, policy, [enrollment_cfg] {
    return users::TokenSettings{std::chrono::days(enrollment_cfg.token_ttl_days),
                                enrollment_cfg.max_failed_attempts};
  });
  std::map<std::string, SecretBytes> tokens;
  dr::ReinstallOptions ro;
  ro.approvers = *approvers;
  ro.required = 1;  // the drill's new KMS has one administrator
  ro.sink = [&](const std::vector<users::BulkLine>& lines) {
    std::vector<bulk::ResultLine> out;
    for (const auto& l : lines) {
      const bool issued = l.status == users::BulkStatus::kIssued;
      out.push_back({l.id, users::to_string(l.status), l.message,
                     issued ? std::string(l.token.view()) : "",
                     l.expires_at != 0 ? utc_text(l.expires_at) : ""});
      if (issued)
        tokens.emplace(l.id, SecretBytes(l.token.span()));
      else
        failures.push_back(
            {"reinstall", l.id, std::string(users::to_string(l.status)) + ": " + l.message});
    }
    return result_file->append(out);
  };
  auto re_sum = dr::reinstall(**store, audit, user_service, *old, new_ca->get(), ro);
  if (!re_sum.ok()) return fail(re_sum.error());
  phase_done("reinstall", t0, old->users.size(), "users");

  // 5. every user enrolls with the token just issued (the enrollment service kmsd's REST and
  //    CMP routes call: token check, certificates signed on the token, key escrowed).
  t0 = SteadyClock::now();
  const config::Config new_cfg = *cfg;
  X509* ca_raw = new_ca->get();
  enroll::EnrollmentService enrollment(
      **store, *login->token, audit, policy,
      [new_cfg] {
        enroll::Settings s;
        s.validity = std::chrono::days(new_cfg.enrollment.cert_validity_days);
        s.encryption_key_type = new_cfg.enrollment.encryption_key_type;
        s.max_failed_attempts = new_cfg.enrollment.max_failed_attempts;
        s.digest = new_cfg.ca.digest;
        return s;
      },
      [ca_raw] {
        X509_up_ref(ca_raw);
        return ossl::X509Ptr(ca_raw);
      });
  std::map<std::string, ossl::X509Ptr> new_certs;
  std::map<std::string, ossl::EvpPkeyPtr> new_keys;
  for (const auto& [user, token] : tokens) {
    auto signing = ca::generate_key(hsm::KeyType::kEcP256);
    if (!signing.ok()) return fail(signing.error());
    enroll::SigningRequest req;
    req.public_key = signing->get();
    req.channel = "rest";
    auto e = enrollment.enroll(user, token, req);
    if (!e.ok()) {
      failures.push_back({"enroll", user, e.error().message});
      continue;
    }
    const auto& der = e->keys.back().pkcs8_der;
    const unsigned char* p = der.data();
    ossl::EvpPkeyPtr key(d2i_AutoPrivateKey(nullptr, &p, static_cast<long>(der.size())));
    if (!key) {
      failures.push_back({"enroll", user, "the delivered encryption key does not parse"});
      continue;
    }
    // An enrollment's certificates carry no decoded public key (enroll::Enrollment): read back
    // from DER, as a user's mail client gets it, so that CMS can encrypt to it.
    auto cert_der = ossl::x509_to_der(e->encryption_certificate.get());
    auto cert =
        cert_der.ok() ? ossl::x509_from_der(*cert_der) : Result<ossl::X509Ptr>(cert_der.error());
    if (!cert.ok()) {
      failures.push_back(
          {"enroll", user, "the encryption certificate does not parse: " + cert.error().message});
      continue;
    }
    new_keys[user] = std::move(key);
    new_certs[user] = std::move(*cert);
  }
  phase_done("enroll", t0, new_certs.size(), "users");

  // 6. reencrypt with the custody key on the (scratch) token
  t0 = SteadyClock::now();
  const unsigned threads =
      a.threads != 0 ? a.threads : std::max(1u, std::thread::hardware_concurrency());
  auto custody = dr::open_custody_key_on_token(cfg->token.uri + ";object=" + a.custody_label,
                                               a.module, login->pin, custody_cert->get(), threads);
  if (!custody.ok()) return fail(custody.error());
  dr::ReencryptOptions reo;
  reo.staging = work / "staging";
  reo.out = work / "out";
  reo.custody_key = custody->key.get();
  reo.custody_cert = custody_cert->get();
  for (const auto& [u, c] : new_certs) reo.new_certs[u] = c.get();
  reo.threads = threads;
  auto reenc = dr::reencrypt(reo);
  if (!reenc.ok()) return fail(reenc.error());
  for (const auto& p : reenc->problems)
    failures.push_back({"reencrypt", p.path, p.status + ": " + p.reason});
  for (const auto& [reason, count] : reenc->waiting)
    failures.push_back({"reencrypt", std::to_string(count) + " message(s)",
                        std::string(dr::kWaiting) + ": " + reason});
  if (reenc->problems_omitted > 0)
    failures.push_back({"reencrypt", std::to_string(reenc->problems_omitted) + " more message(s)",
                        "not listed here: see kmsctl dr status -o json"});
  phase_done("reencrypt", t0, reenc->processed, "msg");
  // The drill's pipeline steps in the new KMS's audit chain, as its reinstall and enrollments.
  if (auto st = (*store)->transaction([&]() -> Status {
        KMSD_TRY(audit.append("drill-admin", "dr.predecrypt",
                              {{"this_run", pre->this_run}, {"overall", pre->overall}}));
        return audit.append("drill-admin", "dr.reencrypt",
                            {{"this_run", reenc->this_run}, {"overall", reenc->overall}});
      });
      !st.ok())
    return fail(st.error());

  // 7. verify: what opened with an old key opens with the user's new key to the same bytes.
  t0 = SteadyClock::now();
  std::size_t checked = 0, identical = 0;
  std::map<std::string, std::size_t> by_status;
  std::size_t reencrypted_count = 0;
  {
    auto manifest = dr::Manifest::open(work / "staging" / "manifest.db");
    if (!manifest.ok()) return fail(manifest.error());
    auto rows = (*manifest)->rows();
    if (!rows.ok()) return fail(rows.error());
    auto done = (*manifest)->reencrypted();
    if (!done.ok()) return fail(done.error());
    reencrypted_count = done->size();
    for (const auto& row : *rows) {
      ++by_status[row.status];
      if (row.status != dr::kStaged) continue;
      ++checked;
      auto fmt = dr::parse_format(row.format);
      auto before_bytes = read_file(work / "store" / row.path);
      auto after_bytes = read_file(work / "out" / row.path);
      if (!fmt.ok() || !before_bytes.ok() || !after_bytes.ok()) {
        failures.push_back({"verify", row.path, "not re-encrypted (no file in out/)"});
        continue;
      }
      auto span_of = [](const std::string& s) {
        return std::span<const std::uint8_t>(reinterpret_cast<const std::uint8_t*>(s.data()),
                                             s.size());
      };
      auto before = dr::parse_message(span_of(*before_bytes), *fmt);
      auto after = dr::parse_message(span_of(*after_bytes), *fmt);
      const dr::KeyRing::Entry* old_key = nullptr;
      for (const auto& id : before.recipients)
        if ((old_key = ring->find(id)) != nullptr) break;
      if (before.kind != dr::Kind::kEncrypted || old_key == nullptr) {
        failures.push_back({"verify", row.path, "the original no longer opens with an old key"});
        continue;
      }
      auto plain_before =
          open_content(before.cms.get(), old_key->pair.key.get(), old_key->pair.cert.get());
      if (!plain_before.ok() || after.kind != dr::Kind::kEncrypted) {
        failures.push_back({"verify", row.path, "the re-encrypted file is not encrypted"});
        continue;
      }
      bool all_same = true;
      std::string why;
      std::istringstream users_in(row.users);
      for (std::string u; std::getline(users_in, u, ',');) {
        auto k = new_keys.find(u);
        if (k == new_keys.end()) {
          all_same = false;
          why = u + " has no new key";
          break;
        }
        auto plain_after = open_content(after.cms.get(), k->second.get(), new_certs[u].get());
        if (!plain_after.ok()) {
          all_same = false;
          why = u + "'s new key does not open it: " + plain_after.error().message;
          break;
        }
        if (plain_after->size() != plain_before->size() ||
            CRYPTO_memcmp(plain_after->data(), plain_before->data(), plain_before->size()) != 0) {
          all_same = false;
          why = "the content opened with " + u + "'s new key differs from the original";
          break;
        }
      }
      if (all_same)
        ++identical;
      else
        failures.push_back({"verify", row.path, why});
    }
  }
  phase_done("verify", t0, checked, "msg");

  // 8. Checksums of production again; the audit chain of the new KMS.
  t0 = SteadyClock::now();
  bool unchanged = true;
  json sums = json::array();
  for (auto& it : items) {
    auto s = tree_sha256(it.paths);
    if (!s.ok()) return fail(s.error());
    it.after = *s;
    if (it.after.sha256 != it.before.sha256) {
      unchanged = false;
      failures.push_back({"checksum", it.shown, "changed during the drill"});
    }
    sums.push_back({{"what", it.what},
                    {"path", it.shown},
                    {"before", it.before.sha256},
                    {"after", it.after.sha256},
                    {"files", it.before.files},
                    {"bytes", it.before.bytes}});
  }
  phase_done("checksum-after", t0, items.size(), "trees");
  std::map<std::string, std::size_t> by_action;
  std::size_t records = 0;
  (void)(*store)->for_each_audit([&](const store::AuditRecord& r) -> Status {
    ++by_action[r.action];
    ++records;
    return {};
  });
  auto verified = audit.verify();
  const bool chain_ok = verified.ok() && verified->ok();
  if (!chain_ok)
    failures.push_back({"audit", "chain", "the new KMS's audit chain does not verify"});
  custody->key.reset();
  custody->token.reset();
  login->token->logout();

  const bool passed = failures.empty() && unchanged && checked > 0 && identical == checked;
  json phases_j = json::array();
  for (const auto& p : phases)
    phases_j.push_back({{"name", p.name},
                        {"seconds", p.seconds},
                        {"items", p.items},
                        {"unit", p.unit},
                        {"rate", p.seconds > 0 ? static_cast<double>(p.items) / p.seconds : 0}});
  json failures_j = json::array();
  for (const auto& f : failures)
    failures_j.push_back({{"phase", f.phase}, {"what", f.what}, {"reason", f.reason}});
  const auto started = std::chrono::system_clock::now() - (SteadyClock::now() - t_start);
  json report = {
      {"result", passed ? "PASSED" : "FAILED"},
      {"started_at",
       utc_text(
           std::chrono::duration_cast<std::chrono::seconds>(started.time_since_epoch()).count())},
      {"total_seconds", std::chrono::duration<double>(SteadyClock::now() - t_start).count()},
      {"work", work.string() + (a.keep ? " (kept)" : " (removed)")},
      {"phases", phases_j},
      {"predecrypt", summary_json("predecrypt", *pre)},
      {"reencrypt", summary_json("reencrypt", *reenc)},
      {"messages", {{"by_status", by_status}, {"reencrypted", reencrypted_count}}},
      {"verify", {{"checked", checked}, {"identical", identical}}},
      {"users",
       {{"old", old->users.size()},
        {"issued", tokens.size()},
        {"enrolled", new_certs.size()},
        {"reinstall_statuses", re_sum->statuses}}},
      {"ca",
       {{"old_sha256", old->ca_sha256},
        {"old_subject", old->ca_subject},
        {"new_sha256", ossl::sha256_fingerprint(new_ca->get())},
        {"custody_sha256", ossl::sha256_fingerprint(custody_cert->get())}}},
      {"retired_keys", old->keys.size()},
      {"checksums", {{"items", sums}, {"unchanged", unchanged}}},
      {"audit", {{"records", records}, {"by_action", by_action}, {"chain_verified", chain_ok}}},
      {"failures", failures_j}};
  if (auto st = write_reports(report_dir, report); !st.ok()) return fail(st.error());
  if (a.output == "json") {
    std::cout << report.dump(2) << "\n";
  } else {
    std::cout << "DR drill " << (passed ? "PASSED" : "FAILED") << ": " << identical << " of "
              << checked << " messages byte-identical under the new keys; " << new_certs.size()
              << " of " << old->users.size() << " users re-enrolled; production "
              << (unchanged ? "unchanged" : "CHANGED") << "; " << failures.size()
              << " failure(s)\nreport: " << (report_dir / "drill.md").string() << ", drill.json, "
              << "drill.html\n";
  }
  return passed ? kOk : kFailed;
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
      "dr",
      "disaster recovery: prepare, predecrypt, reinstall, reencrypt, finish, status, drill "
      "(README: Disaster recovery)");
  dr->require_subcommand(1);

  auto* pre = dr->add_subcommand(
      "predecrypt",
      "open every encrypted message of a store with the old keys and re-encrypt it to the DR "
      "custody certificate in a staging directory; resumable");
  auto& p = commands.add<DrArgs>(pre, run_predecrypt);
  pre->add_option("--store", p.store, "the message store: a Maildir, .eml tree or .p7m/.der tree")
      ->required();
  pre->add_option(
         "--staging", p.staging,
         "staging directory (created; holds the manifest, packs/ (the staged messages) and "
         "keys/ (each run's staging key, encrypted to the custody certificate))")
      ->required();
  pre->add_option("--keys", p.keys,
                  "key source: directory of users' PKCS#12 files, USER.p12 (passphrase in "
                  "USER.pass, 0600, else --passphrase-file, else asked)");
  pre->add_option("--server", p.server,
                  "key source: the running, unsealed kmsd (https://host:port): its escrowed "
                  "keys, through an approved dr request");
  pre->add_option("--admin-p12", p.admin_p12, "with --server: your administrator PKCS#12")
      ->envname("KMSCTL_P12");
  pre->add_option("--admin-passphrase-file", p.admin_passphrase_file,
                  "with --server: 0600 file with that PKCS#12's passphrase (default: prompt)")
      ->envname("KMSCTL_PASSPHRASE_FILE");
  pre->add_option("--ca", p.ca, "with --server: the KMS CA certificate (PEM)")
      ->envname("KMSCTL_CA");
  pre->add_option("--request", p.request,
                  "with --server: the approved dr request (without it, one is asked for)");
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
  prep->add_option("--cards", pr.cards,
                   "write the new startup secret (the new token's PIN) to these NEW operator "
                   "cards, one pkcs11: URI each: one card holds the secret (startup.source = "
                   "\"card\"), several hold k-of-n shares (\"quorum\"), as kmsctl card split");
  prep->add_option("--quorum-k,-k", pr.quorum_k,
                   "with several --cards: shares needed to unseal (2..number of cards)");
  prep->add_option("--card-module", pr.card_module,
                   "PKCS#11 module of the cards (default: startup.card_module of --config)");
  prep->add_option("--card-label", pr.card_label,
                   "label of the data object on the cards (default: startup.card_label of "
                   "--config, else kms-startup-secret)");
  prep->add_option("--card-pin-files", pr.card_pin_files,
                   "0600 files holding each card's PIN, in the order of --cards (default: "
                   "prompt per card)");
  prep->add_flag("--force", pr.card_force,
                 "replace secrets or shares already on the new cards (an incomplete earlier "
                 "write)");
  prep->add_option("--old-config", pr.old_config,
                   "the OLD kmsd.toml: its key token and operator card are refused as --cards");

  auto* ri = dr->add_subcommand(
      "reinstall",
      "offline, kmsd stopped: every user of the old KMS to ENABLED on the new one with a fresh "
      "enrollment token (bulk-enable result file), the old keys retired; approval-gated (dr)");
  auto& rr = commands.add<DrArgs>(ri, run_reinstall);
  ri->add_option("--config", rr.config, "the NEW kmsd.toml (prepared by kmsctl dr prepare)")
      ->required();
  ri->add_option("--old-store", rr.old_store,
                 "the old kmsd's database (read only): its users and key history")
      ->required();
  ri->add_option("--out", rr.out,
                 "the result file: id,status,message,token,expires_at (0600; a rerun resumes it)")
      ->required();
  ri->add_option("--admin-p12", rr.admin_p12, "PKCS#12 of the new KMS administrator who runs it")
      ->required();
  ri->add_option("--approver-p12", rr.approver_p12,
                 "PKCS#12 of another administrator approving ([approvals.required] dr > 1); "
                 "repeat");
  ri->add_option("--passphrase-file", rr.passphrase_file,
                 "0600 file with the passphrase of the PKCS#12 files (default: prompt each)");
  ri->add_option("--pin-file", rr.pin_file,
                 "0600 file with the new token's PIN (default: the configured startup file)");
  ri->add_flag("--include-revoked", rr.include_revoked, "enable users revoked in the old KMS too");
  ri->add_option("--install-config", rr.install_config,
                 "the configuration kmsd starts with (e.g. /etc/kmsd/kmsd.toml): replaced by "
                 "--config, the old one kept as PATH.pre-dr");
  ri->add_option("-o,--output", rr.output, "table or json")
      ->check(CLI::IsMember({"table", "json"}));

  auto* fi = dr->add_subcommand(
      "finish",
      "offline: destroy the retired material once reencrypt is done (custody key, staged "
      "copies, PKCS#12 key files, the old database's sealed keys); audited");
  auto& f = commands.add<DrArgs>(fi, run_finish);
  fi->add_option("--config", f.config, "the NEW kmsd.toml")->required();
  fi->add_option("--staging", f.staging, "the staging directory of predecrypt")->required();
  fi->add_option("--admin-p12", f.admin_p12, "PKCS#12 of a new KMS administrator")->required();
  fi->add_option("--passphrase-file", f.passphrase_file, "0600 file with its passphrase");
  fi->add_option("--pin-file", f.pin_file, "0600 file with the new token's PIN");
  fi->add_option("--keys", f.keys, "the PKCS#12 key directory given to predecrypt: destroyed");
  fi->add_option("--old-store", f.old_store, "the old kmsd's database: its sealed keys are wiped");
  fi->add_option("--custody-label", f.custody_label, "label of the custody key on the token")
      ->capture_default_str();
  fi->add_flag("--force", f.force, "destroy even though staged messages were never re-encrypted");
  fi->add_option("-o,--output", f.output, "table or json")->check(CLI::IsMember({"table", "json"}));

  auto* dd = dr->add_subcommand(
      "drill",
      "rehearse the whole recovery on copies and a scratch SoftHSM token (prepare, predecrypt, "
      "reinstall, re-enroll, reencrypt, verify); production checksummed before and after");
  auto& d = commands.add<DrArgs>(dd, run_drill);
  dd->add_option("--store", d.store, "the production message store (only read)")->required();
  dd->add_option("--db", d.db, "the production kmsd database (only read; copied)")->required();
  dd->add_option("--keys", d.keys, "directory of the users' PKCS#12 files, as for predecrypt")
      ->required();
  dd->add_option("--passphrase-file", d.passphrase_file,
                 "0600 file with the passphrase of the PKCS#12 files without USER.pass");
  dd->add_option("--token-dir", d.token_dir,
                 "the production token's directory, checksummed before and after (optional)");
  dd->add_option("--report", d.report,
                 "where drill.md, drill.json and drill.html go (default: ./dr-drill-report-*)");
  dd->add_option("--work", d.work, "an empty work directory (default: a new one in $TMPDIR)");
  dd->add_flag("--keep", d.keep, "keep the work directory (it holds the scratch token and PIN)");
  dd->add_option("--module", d.module, "SoftHSM module for the scratch token")
      ->capture_default_str();
  add_common(dd, d);

  auto* st = dr->add_subcommand("status", "what the manifest of a staging directory records");
  auto& s = commands.add<DrArgs>(st, run_dr_status);
  st->add_option("--staging", s.staging, "the staging directory")->required();
  st->add_option("-o,--output", s.output, "table or json")->check(CLI::IsMember({"table", "json"}));
}

}  // namespace kmsd::cli

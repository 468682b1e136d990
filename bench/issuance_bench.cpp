// Issuance throughput of a real kmsd over its HTTPS API, printed next to the raw token signing
// rate and the scripted alternative (`openssl ca` with the pkcs11 engine), all measured in the
// same run on the same throw-away SoftHSM2 token.
//
//   issuance_bench [--users N] [--clients C] [--seconds S] [--workers W] [--quick]
//                  [--build-dir DIR] [--keep-log FILE]
//
// One run:
//   1. a sandbox token, a kmsd.toml (P-256 CA, wrap_mechanism "aes-gcm", W worker threads),
//      `kmsctl init`, the real kmsd started with a startup-secret file, /readyz = 200;
//   2. N users enabled over the admin API (POST /v1/users/bulk, 1000 per call), their one-time
//      tokens kept; N P-256 key pairs and CSRs made before any timing;
//   3. the raw token rate: ECDSA P-256 signatures with the CA key through hsm::Token (its
//      EVP_PKEY, one per thread, as token_bench), C threads, from this process with its own
//      session pool while kmsd idles; measured before and after the API phase. Two breakdown
//      figures go with it: a fresh Token::ca_private_key() per signature, and a whole user
//      certificate through ca::issue_on_token, which is what kmsd does for each certificate;
//   4. API issuance: C client threads, each with one kept-alive HTTPS connection, enroll the N
//      users through POST /enroll/v1/enroll; each enrollment issues two certificates (signing
//      and encryption), generates the encryption key and escrows it. Enrollments/s,
//      certificates/s, p50/p99 latency;
//   5. the scripted alternative, kmsd stopped: `openssl ca` with the pkcs11 engine signing with
//      the same CA key on the token, one process per certificate, for S seconds: one process at
//      a time (an administrator's loop), then C at a time (each loop with its own CA database).
//      Failed processes are counted: SoftHSM2 2.6.1 rewrites token.object at every C_Login, and
//      a process reading it at that moment finds no token.
// Every certificate issued is checked against the CA after the timing. kmsd is stopped and the
// sandbox removed on every exit path (and kmsd dies with this process if it is killed). No
// assertion on speed: it prints, people judge.
//
// --seconds is the length of each raw and scripted measurement; the API phase enrolls all N
// users. --quick (the ctest smoke run): 6 users, 2 clients, 0.3 s per measurement.
#include <errno.h>
#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "bench/bench_kmsd.hpp"
#include "bench/bench_sandbox.hpp"
#include "cli/client/admin_client.hpp"
#include "common/ossl.hpp"
#include "daemon/ca/issuer.hpp"
#include "hsm/token.hpp"

extern char** environ;

namespace {

using namespace kmsd;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

using bench::g_stop;
using bench::kModule;
using bench::kPin;
using bench::percentile;
using bench::read_text;
using bench::run;
using bench::since;
using bench::tail_lines;
using bench::write_private;

constexpr const char* kCaLabel = "kms-ca";  // kmsd's default [token.labels] ca

struct Options {
  long users = 2000;
  int clients = 4;
  double seconds = 3.0;
  int workers = 4;
  bool quick = false;
  fs::path build_dir;
  fs::path keep_log;
};

// Runs OP(thread index) on THREADS threads for SECONDS; operations per second, or -1 when an
// operation failed. CPU_PER_OP, when given: this process's CPU seconds per operation.
double rate(int threads, double seconds, const std::function<bool(int)>& op,
            double* cpu_per_op = nullptr) {
  std::atomic<long> count{0};
  std::atomic<bool> failed{false};
  const double cpu0 = bench::process_cpu_seconds();
  const auto t0 = Clock::now();
  const auto end =
      t0 + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  std::vector<std::thread> ts;
  for (int i = 0; i < threads; ++i)
    ts.emplace_back([&, i] {
      long n = 0;
      while (Clock::now() < end && !failed && !g_stop) {
        if (!op(i)) failed = true;
        ++n;
      }
      count += n;
    });
  for (auto& t : ts) t.join();
  const double elapsed = since(t0);
  if (cpu_per_op != nullptr && count > 0)
    *cpu_per_op = (bench::process_cpu_seconds() - cpu0) / static_cast<double>(count);
  return failed || g_stop ? -1 : static_cast<double>(count) / elapsed;
}

bool sign_once(EVP_PKEY* key) {
  static const unsigned char data[64] = {1, 2, 3};
  ossl::EvpMdCtxPtr ctx(EVP_MD_CTX_new());
  unsigned char sig[512];
  size_t len = sizeof sig;
  return EVP_DigestSignInit(ctx.get(), nullptr, EVP_sha256(), nullptr, key) == 1 &&
         EVP_DigestSign(ctx.get(), sig, &len, data, sizeof data) == 1;
}

bool signed_by_ca(const std::string& pem, EVP_PKEY* ca_pub, EVP_PKEY* subject_key = nullptr) {
  auto cert = ossl::x509_from_pem(pem);
  if (!cert.ok() || X509_verify(cert->get(), ca_pub) != 1) return false;
  return subject_key == nullptr || EVP_PKEY_eq(X509_get0_pubkey(cert->get()), subject_key) == 1;
}

struct User {
  std::string id;
  std::string token;
  ossl::EvpPkeyPtr key;
  std::string csr;
};

// ---- the scripted alternative ------------------------------------------------------------------

struct Scripted {
  int runners = 1;
  bool skipped = false;
  std::string why;        // skipped, or nothing succeeded: the reason
  double per_second = 0;  // certificates written
  long certificates = 0;
  long failed = 0;            // processes that exited non-zero
  std::string first_failure;  // the first one's exit status and output
  bool verified = false;
};

// Where the pkcs11 engine is, or "" when libengine-pkcs11-openssl is not installed. The engines
// directory is $OPENSSL_ENGINES when set (as for the openssl command), else OpenSSL's own.
fs::path pkcs11_engine() {
  const char* engines = std::getenv("OPENSSL_ENGINES");
  if (engines == nullptr) engines = OPENSSL_info(OPENSSL_INFO_ENGINES_DIR);
  if (engines == nullptr) return {};
  fs::path p = fs::path(engines) / "pkcs11.so";
  return fs::exists(p) ? p : fs::path();
}

// `openssl ca` with the pkcs11 engine, one process per certificate, RUNNERS at a time (each
// runner with its own CA database under DIR, as parallel shell loops would be), for SECONDS.
// A process that fails is counted and the loop goes on, as a script would.
Scripted run_scripted(const fs::path& dir, const fs::path& ca_pem, const std::vector<User>& users,
                      int runners, double seconds, EVP_PKEY* ca_pub) {
  Scripted out;
  out.runners = runners;
  const fs::path engine = pkcs11_engine();
  if (engine.empty()) {
    out.skipped = true;
    out.why = "libengine-pkcs11-openssl not installed";
    return out;
  }
  fs::create_directories(dir);
  // The engine's configuration an administrator would keep: the module loaded directly (not
  // the p11-kit proxy), the PIN in a 0600 file rather than on the command line.
  write_private(dir / "engine.cnf",
                "openssl_conf = openssl_init\n"
                "[openssl_init]\nengines = engine_section\n"
                "[engine_section]\npkcs11 = pkcs11_section\n"
                "[pkcs11_section]\nengine_id = pkcs11\n"
                "dynamic_path = " +
                    engine.string() + "\nMODULE_PATH = " + kModule + "\nPIN = " + kPin +
                    "\ninit = 0\n");
  std::vector<std::string> csrs;
  for (std::size_t i = 0; i < std::min<std::size_t>(users.size(), 32); ++i) {
    csrs.push_back((dir / ("csr-" + std::to_string(i) + ".pem")).string());
    std::ofstream(csrs.back()) << users[i].csr;
  }
  for (int r = 0; r < runners; ++r) {
    const fs::path rd = dir / ("runner-" + std::to_string(r));
    fs::create_directories(rd / "newcerts");
    std::ofstream(rd / "index.txt").flush();
    // The same profile as kmsd's signing certificate: usages, e-mail protection, CRL and OCSP.
    std::ofstream(rd / "ca.cnf")
        << "[ca]\ndefault_ca = kms\n[kms]\ndir = " << rd.string()
        << "\ndatabase = $dir/index.txt\nnew_certs_dir = $dir/newcerts\ncertificate = "
        << ca_pem.string()
        << "\nrand_serial = yes\ndefault_md = sha256\ndefault_days = 365\n"
           "policy = anything\nx509_extensions = user_sign\nunique_subject = no\n"
           "[anything]\ncommonName = supplied\n"
           "[user_sign]\nbasicConstraints = critical,CA:FALSE\n"
           "keyUsage = critical,digitalSignature,nonRepudiation\n"
           "extendedKeyUsage = emailProtection\nsubjectKeyIdentifier = hash\n"
           "authorityKeyIdentifier = keyid\n"
           "crlDistributionPoints = URI:http://127.0.0.1/crl\n"
           "authorityInfoAccess = OCSP;URI:http://127.0.0.1/ocsp\n";
  }
  // This process's environment with OPENSSL_CONF pointing at the engine configuration.
  std::vector<std::string> env_text;
  for (char** e = environ; *e != nullptr; ++e)
    if (std::string_view(*e).rfind("OPENSSL_CONF=", 0) != 0) env_text.emplace_back(*e);
  env_text.push_back("OPENSSL_CONF=" + (dir / "engine.cnf").string());
  std::vector<char*> env;
  for (auto& e : env_text) env.push_back(e.data());
  env.push_back(nullptr);

  const std::string key_uri =
      std::string("pkcs11:token=bench;object=") + kCaLabel + ";type=private";
  std::mutex mu;
  std::atomic<long> next{0}, done{0}, failed{0};
  const auto t0 = Clock::now();
  rate(runners, seconds, [&](int t) {
    const fs::path rd = dir / ("runner-" + std::to_string(t));
    const std::string csr = csrs[static_cast<std::size_t>(next++) % csrs.size()];
    int rc = run({"openssl", "ca", "-batch", "-config", (rd / "ca.cnf").string(), "-engine",
                  "pkcs11", "-keyform", "engine", "-keyfile", key_uri, "-in", csr, "-out",
                  (rd / "cert.pem").string(), "-notext"},
                 rd / "openssl.out", env.data());
    if (rc == 0) {
      ++done;
      return true;
    }
    ++failed;
    std::lock_guard lock(mu);
    if (out.first_failure.empty())
      out.first_failure =
          "exit status " + std::to_string(rc) + ": " + tail_lines(read_text(rd / "openssl.out"), 4);
    return true;
  });
  out.certificates = done;
  out.failed = failed;
  out.per_second = static_cast<double>(done) / since(t0);
  if (g_stop) {
    out.why = "interrupted";
  } else if (done == 0) {
    out.why = "no certificate was written; " + out.first_failure;
  } else {
    for (int r = 0; r < runners && !out.verified; ++r)
      out.verified =
          signed_by_ca(read_text(dir / ("runner-" + std::to_string(r)) / "cert.pem"), ca_pub);
    if (!out.verified) out.why = "the certificates openssl ca wrote do not verify against the CA";
  }
  return out;
}

// ---- the run -----------------------------------------------------------------------------------

int fail(const std::string& what) {
  std::fprintf(stderr, "issuance_bench: %s\n", what.c_str());
  return 1;
}

int run_bench(const Options& opt) {
  bench::Sandbox sandbox;
  const fs::path& dir = sandbox.dir;
  bench::LogKeeper keep{dir / "kmsd.log", opt.keep_log};

  double load[1] = {0};
  ::getloadavg(load, 1);
  std::printf(
      "kmsd issuance_bench: %ld users, %d clients, kmsd worker_threads=%d, P-256 CA, SoftHSM2 "
      "(aes-gcm); %u cores, load average %.2f at start\n",
      opt.users, opt.clients, opt.workers, std::thread::hardware_concurrency(), load[0]);
  std::fflush(stdout);

  // 1. Configuration, kmsctl init, kmsd. Declared last: kmsd is stopped first, before the log
  // is kept and the sandbox goes.
  bench::Kmsd k;
  k.dir = dir;
  k.build_dir = opt.build_dir;
  auto t_setup = Clock::now();
  if (auto st = k.configure(opt.workers); !st.ok()) return fail(st.error().message);
  const std::uint16_t public_port = k.public_port;
  const std::uint16_t admin_port = k.admin_port;
  // This process's own session pool on the token, for the raw rate, logged in before kmsd
  // starts: SoftHSM2 2.6.1 rewrites token.object at every C_Login, so no login may happen
  // while the other process is busy on the token.
  hsm::TokenOptions to;
  to.module_path = kModule;
  to.token_uri = bench::kTokenUri;
  to.pool_size = static_cast<std::size_t>(std::max(2, opt.clients));
  to.wrap = hsm::WrapMechanism::kAesGcm;
  auto token = hsm::Token::open(to);
  if (!token.ok()) return fail("opening the token: " + token.error().message);
  if (auto st = (*token)->login(SecretBytes::from_string(kPin)); !st.ok())
    return fail("logging in to the token: " + st.error().message);
  if (auto st = k.start(); !st.ok()) return fail(st.error().message);
  auto ca_cert = ossl::x509_from_pem(k.ca_pem);
  if (!ca_cert.ok()) return fail("GET /ca.pem gave no CA certificate");
  EVP_PKEY* ca_pub = X509_get0_pubkey(ca_cert->get());
  std::printf("  setup: kmsctl init + kmsd ready in %.1f s\n", since(t_setup));
  std::fflush(stdout);

  // 2. Users enabled in bulk; their CSRs made before any timing.
  std::vector<User> users(static_cast<std::size_t>(opt.users));
  {
    client::ClientOptions co;
    co.server = "https://localhost:" + std::to_string(admin_port);
    co.p12 = dir / "admin.p12";
    co.p12_passphrase = SecretBytes::from_string(bench::Kmsd::kAdminPassphrase);
    co.ca_file = dir / "ca.pem";
    co.timeout = std::chrono::seconds(300);
    auto admin = client::AdminClient::connect(std::move(co));
    if (!admin.ok()) return fail("admin client: " + admin.error().message);
    std::map<std::string, std::size_t> index;
    for (std::size_t i = 0; i < users.size(); ++i) {
      char id[32];
      std::snprintf(id, sizeof id, "bench-user-%06zu", i);
      users[i].id = id;
      index[id] = i;
    }
    const auto t0 = Clock::now();
    for (std::size_t from = 0; from < users.size() && !g_stop; from += 1000) {
      json batch = json::array();
      for (std::size_t i = from; i < std::min(users.size(), from + 1000); ++i)
        batch.push_back({{"id", users[i].id},
                         {"email", users[i].id + "@example.com"},
                         {"display_name", "Bench User " + std::to_string(i)}});
      auto reply = (*admin)->post("/v1/users/bulk", json{{"users", batch}, {"job", "bench"}});
      if (!reply.ok()) return fail("POST /v1/users/bulk: " + reply.error().message);
      if (reply->status != 200)
        return fail("POST /v1/users/bulk answered " + std::to_string(reply->status) + ": " +
                    reply->error_text());
      for (const auto& r : reply->json().value("results", json::array())) {
        auto it = index.find(r.value("id", std::string()));
        if (it != index.end() && r.contains("token"))
          users[it->second].token = r["token"].get<std::string>();
      }
    }
    if (g_stop) return fail("interrupted");
    for (const auto& u : users)
      if (u.token.empty()) return fail("no enrollment token was issued for " + u.id);
    std::printf("  enabled %zu users over POST /v1/users/bulk in %.1f s\n", users.size(),
                since(t0));
    const auto t1 = Clock::now();
    for (auto& u : users) {
      auto key = ca::generate_key(hsm::KeyType::kEcP256);
      if (!key.ok()) return fail("generating a user key: " + key.error().message);
      u.key = std::move(*key);
      auto csr = ossl::csr_pem(u.key.get(), u.id);
      if (!csr.ok()) return fail(csr.error().message);
      u.csr = std::move(*csr);
    }
    std::printf("  made %zu P-256 key pairs and CSRs in %.1f s (not timed below)\n", users.size(),
                since(t1));
    std::fflush(stdout);
  }

  // 3. The raw token rate, from this process with its own session pool, kmsd idle.
  std::vector<ossl::EvpPkeyPtr> held;
  for (int i = 0; i < opt.clients; ++i) {
    auto k = (*token)->ca_private_key();
    if (!k.ok()) return fail("the CA key on the token: " + k.error().message);
    held.push_back(std::move(*k));
  }
  // CPU per signature: this process signs (SoftHSM2 runs in it) while kmsd idles.
  double raw_cpu_before = 0, raw_cpu_after = 0;
  auto raw_held = [&](double* cpu_per_op) {
    return rate(
        opt.clients, opt.seconds,
        [&](int t) { return sign_once(held[static_cast<std::size_t>(t)].get()); }, cpu_per_op);
  };
  const double raw_before = raw_held(&raw_cpu_before);
  const double raw_fresh = rate(opt.clients, opt.seconds, [&](int) {
    auto k = (*token)->ca_private_key();
    return k.ok() && sign_once(k->get());
  });
  // A user signing certificate as kmsd makes it: serial from the token RNG, a fresh CA key,
  // the profile's extensions, X509_sign on the token.
  ossl::X509NamePtr subject(X509_NAME_new());
  X509_NAME_add_entry_by_txt(subject.get(), "CN", MBSTRING_UTF8,
                             reinterpret_cast<const unsigned char*>("Bench User"), -1, -1, 0);
  ca::IssueRequest ireq;
  ireq.profile = ca::Profile::kUser;
  ireq.subject = subject.get();
  ireq.public_key = users.front().key.get();
  ireq.validity = std::chrono::days(365);
  ireq.key_usage = {"digitalSignature", "nonRepudiation"};
  ireq.extended_key_usage = {"emailProtection"};
  ireq.email = "bench@example.com";
  ireq.crl_url = "http://127.0.0.1:" + std::to_string(public_port) + "/crl";
  ireq.ocsp_url = "http://127.0.0.1:" + std::to_string(public_port) + "/ocsp";
  const double issue_rate = rate(opt.clients, opt.seconds, [&](int) {
    return ca::issue_on_token(ireq, ca_cert->get(), **token, EVP_sha256()).ok();
  });
  if (raw_before < 0 || raw_fresh < 0 || issue_rate < 0)
    return fail(g_stop ? "interrupted" : "signing with the CA key on the token failed");
  std::printf("  raw token rate measured (%.1f s per figure)\n", opt.seconds);
  std::fflush(stdout);

  // 4. API issuance.
  std::vector<std::unique_ptr<client::AdminClient>> clients;
  for (int c = 0; c < opt.clients; ++c) {
    client::ClientOptions co;
    co.server = "https://localhost:" + std::to_string(admin_port);
    co.ca_file = dir / "ca.pem";
    co.timeout = std::chrono::seconds(60);
    auto cl = client::AdminClient::connect(std::move(co));
    if (!cl.ok()) return fail("enrollment client: " + cl.error().message);
    // Opens the kept-alive connection (TLS handshake) before the timing: 401, no certificate.
    auto warm = (*cl)->get("/enroll/v1/keys");
    if (!warm.ok()) return fail("connecting to the TLS listener: " + warm.error().message);
    clients.push_back(std::move(*cl));
  }
  const std::size_t n = users.size();
  std::vector<int> status(n, 0);
  std::vector<double> latency_ms(n, 0);
  std::vector<std::string> bodies(n);
  std::atomic<std::size_t> next{0};
  const double kmsd_cpu0 = bench::pid_cpu_seconds(k.daemon.pid());
  const double client_cpu0 = bench::process_cpu_seconds();
  const auto t_api = Clock::now();
  {
    std::vector<std::thread> ts;
    for (int c = 0; c < opt.clients; ++c)
      ts.emplace_back([&, c] {
        auto& cl = *clients[static_cast<std::size_t>(c)];
        for (std::size_t i = next++; i < n && !g_stop; i = next++) {
          const auto t0 = Clock::now();
          auto reply = cl.post(
              "/enroll/v1/enroll",
              json{{"user", users[i].id}, {"token", users[i].token}, {"csr", users[i].csr}});
          latency_ms[i] = since(t0) * 1000.0;
          if (reply.ok()) {
            status[i] = reply->status;
            bodies[i] = std::move(reply->body);
          } else {
            status[i] = -1;
            bodies[i] = reply.error().message;
          }
        }
      });
    for (auto& t : ts) t.join();
  }
  const double api_seconds = since(t_api);
  const double kmsd_cpu = bench::pid_cpu_seconds(k.daemon.pid()) - kmsd_cpu0;
  const double client_cpu = bench::process_cpu_seconds() - client_cpu0;
  const double raw_after = raw_held(&raw_cpu_after);
  clients.clear();
  // How the enrollments' commits were grouped: kmsd's own counters, from /metrics.
  std::string group_commits;
  {
    client::ClientOptions co;
    co.server = "https://localhost:" + std::to_string(admin_port);
    co.p12 = dir / "admin.p12";
    co.p12_passphrase = SecretBytes::from_string(bench::Kmsd::kAdminPassphrase);
    co.ca_file = dir / "ca.pem";
    auto admin = client::AdminClient::connect(std::move(co));
    auto page = admin.ok() ? (*admin)->get("/metrics") : Result<client::Reply>(admin.error());
    if (page.ok() && page->status == 200) {
      auto counter = [&](const std::string& name) {
        const auto at = page->body.find("\n" + name + " ");
        return at == std::string::npos ? -1.0
                                       : std::atof(page->body.c_str() + at + name.size() + 2);
      };
      const double groups = counter("kmsd_store_group_commits_total");
      const double grouped = counter("kmsd_store_grouped_transactions_total");
      if (groups > 0 && grouped >= 0) {
        char text[128];
        std::snprintf(text, sizeof text, "%.0f in %.0f COMMITs (mean group %.2f)", grouped, groups,
                      grouped / groups);
        group_commits = text;
      }
    }
  }
  if (g_stop) return fail("interrupted");

  // Every answer checked: both certificates signed by the CA, the signing one for the user's
  // own key, one escrowed key delivered.
  long enrolled = 0, verified = 0;
  std::string first_error;
  std::vector<double> ok_latency;
  for (std::size_t i = 0; i < n; ++i) {
    if (status[i] != 200) {
      if (first_error.empty() && status[i] != 0)
        first_error = users[i].id + ": " + std::to_string(status[i]) + " " + bodies[i];
      continue;
    }
    ++enrolled;
    ok_latency.push_back(latency_ms[i]);
    auto j = json::parse(bodies[i], nullptr, false);
    if (j.is_object() &&
        signed_by_ca(j.value("signing_certificate", std::string()), ca_pub, users[i].key.get()) &&
        signed_by_ca(j.value("encryption_certificate", std::string()), ca_pub) &&
        j.value("keys", json::array()).size() == 1)
      ++verified;
  }
  std::sort(ok_latency.begin(), ok_latency.end());
  std::printf("  API phase: %ld of %zu users enrolled in %.2f s; %ld answers verified\n", enrolled,
              n, api_seconds, verified);
  std::fflush(stdout);

  // 5. The scripted alternative, kmsd stopped: each openssl process logs in to the token, and
  // SoftHSM2 2.6.1 rewrites token.object at every login.
  k.daemon.stop();
  std::vector<Scripted> scripted;
  std::vector<int> widths{1};  // an administrator's loop, and as many loops as API clients
  if (opt.clients > 1) widths.push_back(opt.clients);
  for (int runners : widths) {
    if (g_stop) break;
    scripted.push_back(run_scripted(dir / ("scripted-" + std::to_string(runners)), dir / "ca.pem",
                                    users, runners, opt.seconds, ca_pub));
    if (scripted.back().skipped) break;
  }

  if (g_stop) return fail("interrupted");

  // The table.
  const double raw = (raw_before + raw_after) / 2;
  const double enroll_rate = static_cast<double>(enrolled) / api_seconds;
  const double cert_rate = 2 * enroll_rate;
  std::printf("\n%-58s %12s\n", "figure", "value");
  std::printf("%-58s %10.0f/s   (before API %.0f, after %.0f)\n",
              "raw token: ECDSA P-256 C_Sign, CA key, key held per thread", raw, raw_before,
              raw_after);
  std::printf("%-58s %10.0f/s\n", "  breakdown: fresh ca_private_key() per signature", raw_fresh);
  std::printf("%-58s %10.0f/s\n", "  breakdown: ca::issue_on_token, user certificate", issue_rate);
  std::printf("%-58s %10.0f/s\n", "API: certificates (2 per enrollment)", cert_rate);
  std::printf("%-58s %10.3f     target >= 0.40: %s\n", "API certificates / raw token signatures",
              raw > 0 ? cert_rate / raw : 0.0,
              raw > 0 && cert_rate / raw >= 0.40 ? "met" : "NOT met");
  std::printf("%-58s %10.1f/s\n", "API: enrollments (key generated + escrowed)", enroll_rate);
  std::printf("%-58s %8.1f ms / %.1f ms (max %.1f ms)\n", "API: latency per enrollment p50 / p99",
              percentile(ok_latency, 0.50), percentile(ok_latency, 0.99),
              ok_latency.empty() ? 0.0 : ok_latency.back());
  // The same comparison per CPU second, which does not depend on what else the machine runs:
  // kmsd's CPU time (and the clients', all in this process) per certificate against this
  // process's CPU time per raw signature.
  const double raw_cpu = (raw_cpu_before + raw_cpu_after) / 2;
  const double certs = 2.0 * static_cast<double>(enrolled);
  if (kmsd_cpu0 >= 0 && kmsd_cpu >= 0 && certs > 0 && raw_cpu > 0) {
    const double kmsd_per_cert = kmsd_cpu / certs;
    std::printf("%-58s %8.3f ms\n", "CPU per raw token signature", raw_cpu * 1000);
    std::printf("%-58s %8.3f ms   (kmsd used %.2f cores)\n", "CPU per API certificate, kmsd",
                kmsd_per_cert * 1000, kmsd_cpu / api_seconds);
    std::printf("%-58s %8.3f ms\n", "CPU per API certificate, the clients (TLS, JSON)",
                client_cpu / certs * 1000);
    if (!group_commits.empty())
      std::printf("%-58s %s\n", "kmsd group commit: enrollment transactions",
                  group_commits.c_str());
    std::printf("%-58s %10.3f     (load-independent; target >= 0.40: %s)\n",
                "per CPU second: API certificates (kmsd) / raw signatures", raw_cpu / kmsd_per_cert,
                raw_cpu / kmsd_per_cert >= 0.40 ? "met" : "NOT met");
  }
  bool scripted_ok = true;
  for (const auto& sc : scripted) {
    if (sc.skipped) {
      std::printf("scripted alternative: skipped (%s)\n", sc.why.c_str());
      continue;
    }
    char what[96];
    std::snprintf(what, sizeof what, "scripted: openssl ca + pkcs11 engine, %d process%s at a time",
                  sc.runners, sc.runners == 1 ? "" : "es");
    if (!sc.why.empty()) {
      std::printf("%-58s failed: %s\n", what, sc.why.c_str());
      scripted_ok = false;
      continue;
    }
    std::printf("%-58s %10.1f/s   (%ld certificates, %ld processes failed)\n", what, sc.per_second,
                sc.certificates, sc.failed);
    std::printf("%-58s %10.1f\n", "  API certificates / these", cert_rate / sc.per_second);
  }
  for (const auto& sc : scripted)
    if (sc.failed > 0 && sc.why.empty())
      std::printf("  first failed openssl ca (%d at a time): %s\n", sc.runners,
                  sc.first_failure.c_str());
  std::fflush(stdout);

  if (enrolled != static_cast<long>(n) || verified != enrolled)
    return fail("not every enrollment succeeded and verified" +
                (first_error.empty() ? std::string() : "; first failure: " + first_error));
  if (!scripted_ok) return 1;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  CLI::App app{"enrollment throughput over kmsd's real API beside the raw token signing rate"};
  auto* users =
      app.add_option("--users", opt.users, "users to enroll")->check(CLI::Range(1L, 10000000L));
  auto* clients =
      app.add_option("--clients", opt.clients, "concurrent API clients")->check(CLI::Range(1, 64));
  auto* seconds =
      app.add_option("--seconds", opt.seconds, "length of each raw/scripted measurement")
          ->check(CLI::PositiveNumber);
  app.add_option("--workers", opt.workers, "kmsd worker_threads")->check(CLI::Range(1, 64));
  app.add_flag("--quick", opt.quick, "the ctest smoke run: 6 users, 2 clients, 0.3 s");
  app.add_option("--build-dir", opt.build_dir, "build tree holding daemon/kmsd and cli/kmsctl");
  app.add_option("--keep-log", opt.keep_log, "copy kmsd's log here at the end");
  CLI11_PARSE(app, argc, argv);
  if (opt.quick) {
    if (users->count() == 0) opt.users = 6;
    if (clients->count() == 0) opt.clients = 2;
    if (seconds->count() == 0) opt.seconds = 0.3;
  }
  if (!opt.keep_log.empty()) opt.keep_log = fs::absolute(opt.keep_log);
  // The build tree: --build-dir, else the one this executable was built in (BUILD/bench/).
  if (opt.build_dir.empty()) {
    std::error_code ec;
    opt.build_dir = fs::read_symlink("/proc/self/exe", ec).parent_path().parent_path();
  }
  bench::install_stop_signals();
  try {
    return run_bench(opt);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "issuance_bench: %s\n", e.what());
    return 1;
  }
}

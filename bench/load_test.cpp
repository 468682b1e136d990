// Load test of a real kmsd on loopback: C concurrent clients (default 64) for S seconds
// (default 60), each looping over the three things kmsd is asked all day:
//   - enroll a user (POST /enroll/v1/enroll over TLS with a one-time token and a CSR): the
//     answer must carry a signing certificate for the client's key and an encryption
//     certificate, both verifying against the CA, and one escrowed key;
//   - ask the OCSP responder (POST /ocsp, plain HTTP, a fresh connection as `openssl ocsp`
//     does) about a certificate enrolled earlier: the answer must verify against the CA, echo
//     the nonce and say "good";
//   - read a report as an administrator (mutual TLS): GET /v1/users/ID for a user enrolled
//     earlier (must say "active"), and one time in eight (--whole-report-every) the usage report
//     GET /v1/reports/users?format=json (must list at least the users enrolled so far).
// Every answer is checked; a wrong answer or an error is counted and the first few are
// printed. kmsd's resident memory (VmRSS) is sampled every 5 s; its value after the warm-up
// and at the end are printed with the peak (VmHWM). Exits 1 on any error or wrong answer.
//
//   load_test [--clients C] [--seconds S] [--workers W] [--whole-report-every N] [--quick]
//             [--build-dir DIR]
//
// --whole-report-every N: one report read in N is the whole usage report (default 8; 0:
// only GET /v1/users/ID).
//
// --quick (the ctest smoke run): 8 clients, 3 s. The rate limits per source and per identity
// are off in this kmsd's configuration (bench_kmsd.hpp): every client is 127.0.0.1. No
// assertion on speed: it prints, people judge.
#include <openssl/err.h>
#include <openssl/ocsp.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "bench/bench_kmsd.hpp"
#include "bench/bench_sandbox.hpp"
#include "cli/client/admin_client.hpp"
#include "common/ossl.hpp"

namespace {

using namespace kmsd;
namespace fs = std::filesystem;
using bench::Clock;
using bench::g_stop;
using bench::since;
using json = nlohmann::json;

struct Options {
  int whole_report_every = 8;  // one report read in N is the whole usage report (0: never)
  int clients = 64;
  double seconds = 60;
  int workers = 4;
  fs::path build_dir;
};

int fail(const std::string& what) {
  std::fprintf(stderr, "load_test: %s\n", what.c_str());
  return 1;
}

// kmsd's VmRSS or VmHWM in KiB from /proc/PID/status (0 when unreadable).
long proc_kib(pid_t pid, const std::string& field) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind(field + ":", 0) == 0) return std::atol(line.c_str() + field.size() + 1);
  return 0;
}

struct User {
  std::string id;
  std::string token;
  ossl::EvpPkeyPtr key;
  std::string csr;
};

// An enrolled user's signing certificate, for OCSP and report reads.
struct Enrolled {
  std::string id;
  ossl::X509Ptr cert;
};

enum Op { kEnroll, kOcsp, kReport, kOps };
constexpr const char* kOpNames[kOps] = {"enroll", "ocsp", "report"};

// What every client adds to.
struct Tally {
  std::mutex mu;
  std::vector<double> latency_ms[kOps];
  long errors[kOps] = {};  // no answer, or an error status
  long wrong[kOps] = {};   // an answer that does not check out
  std::vector<std::string> first_problems;
  void problem(Op op, bool is_wrong, const std::string& what) {
    std::lock_guard lk(mu);
    (is_wrong ? wrong : errors)[op]++;
    if (first_problems.size() < 8)
      first_problems.push_back(std::string(kOpNames[op]) + ": " + what);
  }
  void ok(Op op, double ms) {
    std::lock_guard lk(mu);
    latency_ms[op].push_back(ms);
  }
};

bool verifies(X509* cert, EVP_PKEY* ca_pub, EVP_PKEY* subject_key = nullptr) {
  return cert != nullptr && X509_verify(cert, ca_pub) == 1 &&
         (subject_key == nullptr || EVP_PKEY_eq(X509_get0_pubkey(cert), subject_key) == 1);
}

// One OCSP exchange about CERT: "" when the answer is a verified "good" with our nonce, else
// what was wrong (ERROR set when nothing usable came back).
std::string ocsp_check(std::uint16_t port, X509* cert, X509* ca, X509_STORE* store, bool* error) {
  *error = false;
  ossl::OcspRequestPtr req(OCSP_REQUEST_new());
  OCSP_CERTID* id = OCSP_cert_to_id(EVP_sha1(), cert, ca);
  if (!req || id == nullptr || OCSP_request_add0_id(req.get(), id) == nullptr) {
    OCSP_CERTID_free(id);
    *error = true;
    return "cannot build the request";
  }
  ossl::OcspCertIdPtr wanted(OCSP_cert_to_id(EVP_sha1(), cert, ca));
  OCSP_request_add1_nonce(req.get(), nullptr, -1);
  unsigned char* der = nullptr;
  const int n = i2d_OCSP_REQUEST(req.get(), &der);
  std::string body(reinterpret_cast<char*>(der), static_cast<std::size_t>(n));
  OPENSSL_free(der);
  auto [status, reply] = bench::http_post(port, "/ocsp", "application/ocsp-request", body);
  if (status != 200) {
    *error = true;
    return "HTTP " + std::to_string(status);
  }
  const unsigned char* p = reinterpret_cast<const unsigned char*>(reply.data());
  ossl::OcspResponsePtr resp(d2i_OCSP_RESPONSE(nullptr, &p, static_cast<long>(reply.size())));
  if (!resp || OCSP_response_status(resp.get()) != OCSP_RESPONSE_STATUS_SUCCESSFUL)
    return "not a successful OCSP response";
  ossl::OcspBasicRespPtr basic(OCSP_response_get1_basic(resp.get()));
  if (!basic) return "no basic response";
  if (OCSP_check_nonce(req.get(), basic.get()) != 1) return "nonce not echoed";
  // kmsd signs OCSP answers with the CA key itself and sends no certificate along: the signer
  // is looked for among the CA certificate given here, as `openssl ocsp -issuer` does.
  ossl::X509StackPtr signers(sk_X509_new_null());
  X509_up_ref(ca);
  sk_X509_push(signers.get(), ca);
  if (OCSP_basic_verify(basic.get(), signers.get(), store, 0) != 1)
    return "signature does not verify against the CA: " + ossl::drain_errors();
  int cert_status = -1, reason = 0;
  ASN1_GENERALIZEDTIME *rev = nullptr, *thisupd = nullptr, *nextupd = nullptr;
  if (OCSP_resp_find_status(basic.get(), wanted.get(), &cert_status, &reason, &rev, &thisupd,
                            &nextupd) != 1)
    return "the certificate asked about is not in the answer";
  if (cert_status != V_OCSP_CERTSTATUS_GOOD)
    return std::string("status ") + OCSP_cert_status_str(cert_status) + " for a good certificate";
  return "";
}

int run_load(const Options& opt) {
  bench::Sandbox sandbox;
  bench::Kmsd k;
  k.dir = sandbox.dir;
  k.build_dir = opt.build_dir;
  double load[1] = {0};
  ::getloadavg(load, 1);
  std::printf(
      "kmsd load_test: %d clients for %.0f s, kmsd worker_threads=%d, P-256 CA, SoftHSM2; "
      "%u cores, load average %.2f at start\n",
      opt.clients, opt.seconds, opt.workers, std::thread::hardware_concurrency(), load[0]);
  std::fflush(stdout);
  if (auto st = k.configure(opt.workers); !st.ok()) return fail(st.error().message);
  if (auto st = k.start(); !st.ok()) return fail(st.error().message);
  auto ca = ossl::x509_from_pem(k.ca_pem);
  if (!ca.ok()) return fail("GET /ca.pem gave no CA certificate");
  EVP_PKEY* ca_pub = X509_get0_pubkey(ca->get());
  ossl::X509StorePtr store(X509_STORE_new());
  X509_STORE_add_cert(store.get(), ca->get());

  auto connect = [&](bool as_admin) -> std::unique_ptr<client::AdminClient> {
    client::ClientOptions co;
    co.server = "https://localhost:" + std::to_string(k.admin_port);
    co.ca_file = k.ca_file();
    co.timeout = std::chrono::seconds(120);
    if (as_admin) {
      co.p12 = k.admin_p12();
      co.p12_passphrase = SecretBytes::from_string(bench::Kmsd::kAdminPassphrase);
    }
    auto c = client::AdminClient::connect(std::move(co));
    return c.ok() ? std::move(*c) : nullptr;
  };

  // Users for the whole run, enabled in bulk; keys and CSRs made before the load.
  const std::size_t n_users =
      static_cast<std::size_t>(std::max(200.0, opt.seconds * opt.clients * 3));
  std::vector<User> users(n_users);
  {
    auto admin = connect(true);
    if (!admin) return fail("cannot connect as the administrator");
    std::map<std::string, std::size_t> index;
    for (std::size_t i = 0; i < users.size(); ++i) {
      users[i].id = "load-" + std::to_string(i);
      index[users[i].id] = i;
    }
    for (std::size_t from = 0; from < users.size() && !g_stop; from += 1000) {
      json batch = json::array();
      for (std::size_t i = from; i < std::min(users.size(), from + 1000); ++i)
        batch.push_back({{"id", users[i].id},
                         {"email", users[i].id + "@example.com"},
                         {"display_name", "Load User " + std::to_string(i)}});
      auto reply = admin->post("/v1/users/bulk", json{{"users", batch}, {"job", "load"}});
      if (!reply.ok() || reply->status != 200)
        return fail("POST /v1/users/bulk: " +
                    (reply.ok() ? reply->error_text() : reply.error().message));
      for (const auto& r : reply->json().value("results", json::array())) {
        auto it = index.find(r.value("id", std::string()));
        if (it != index.end() && r.contains("token"))
          users[it->second].token = r["token"].get<std::string>();
      }
    }
    for (auto& u : users) {
      if (u.token.empty()) return fail("no enrollment token was issued for " + u.id);
      u.key.reset(EVP_EC_gen("P-256"));
      auto csr = ossl::csr_pem(u.key.get(), u.id);
      if (!u.key || !csr.ok()) return fail("making a key and CSR");
      u.csr = std::move(*csr);
    }
  }
  std::printf("  %zu users enabled with their tokens, keys and CSRs made\n", users.size());
  std::fflush(stdout);

  Tally tally;
  std::atomic<std::size_t> next_user{0};
  std::mutex enrolled_mu;
  std::vector<Enrolled> enrolled;
  std::atomic<bool> running{true};
  const auto t0 = Clock::now();
  const auto end = t0 + std::chrono::milliseconds(static_cast<long>(opt.seconds * 1000));

  auto client_loop = [&](int c) {
    auto enroller = connect(false);
    auto admin = connect(true);
    if (!enroller || !admin) {
      tally.problem(kEnroll, false, "client " + std::to_string(c) + " cannot connect");
      return;
    }
    std::mt19937 rng(static_cast<unsigned>(c) * 7919u + 1);
    for (long i = c; Clock::now() < end && !g_stop; ++i) {
      Op op = static_cast<Op>(i % kOps);
      Enrolled pick;
      {
        std::lock_guard lk(enrolled_mu);
        if (enrolled.empty()) {
          op = kEnroll;
        } else if (op != kEnroll) {
          const auto& e =
              enrolled[std::uniform_int_distribution<std::size_t>(0, enrolled.size() - 1)(rng)];
          X509_up_ref(e.cert.get());
          pick = {e.id, ossl::X509Ptr(e.cert.get())};
        }
      }
      const auto t = Clock::now();
      if (op == kEnroll) {
        const std::size_t u = next_user++;
        if (u >= users.size()) continue;  // all enrolled: the other two go on
        auto reply = enroller->post(
            "/enroll/v1/enroll",
            json{{"user", users[u].id}, {"token", users[u].token}, {"csr", users[u].csr}});
        if (!reply.ok() || reply->status != 200) {
          tally.problem(kEnroll, false,
                        users[u].id + ": " +
                            (reply.ok() ? std::to_string(reply->status) + " " + reply->body
                                        : reply.error().message));
          continue;
        }
        const double ms = since(t) * 1000;
        auto j = reply->json();
        auto sign = ossl::x509_from_pem(j.value("signing_certificate", ""));
        auto enc = ossl::x509_from_pem(j.value("encryption_certificate", ""));
        if (!sign.ok() || !enc.ok() || !verifies(sign->get(), ca_pub, users[u].key.get()) ||
            !verifies(enc->get(), ca_pub) || j.value("keys", json::array()).size() != 1 ||
            j.value("user", "") != users[u].id) {
          tally.problem(kEnroll, true, users[u].id + ": the certificates do not check out");
          continue;
        }
        tally.ok(kEnroll, ms);
        std::lock_guard lk(enrolled_mu);
        enrolled.push_back({users[u].id, std::move(*sign)});
      } else if (op == kOcsp) {
        bool error = false;
        auto why = ocsp_check(k.public_port, pick.cert.get(), ca->get(), store.get(), &error);
        if (!why.empty())
          tally.problem(kOcsp, !error, pick.id + ": " + why);
        else
          tally.ok(kOcsp, since(t) * 1000);
      } else {
        const bool whole = opt.whole_report_every > 0 && (i / kOps) % opt.whole_report_every == 0;
        std::size_t at_least = 0;
        if (whole) {
          std::lock_guard lk(enrolled_mu);
          at_least = enrolled.size();
        }
        auto reply = admin->get(whole ? "/v1/reports/users?format=json" : "/v1/users/" + pick.id);
        if (!reply.ok() || reply->status != 200) {
          tally.problem(kReport, false,
                        reply.ok() ? std::to_string(reply->status) + " " + reply->error_text()
                                   : reply.error().message);
          continue;
        }
        const double ms = since(t) * 1000;
        auto j = reply->json();
        bool right;
        if (whole) {
          std::size_t active = 0;
          const auto& list = j.is_object() ? j.value("users", json::array()) : j;
          for (const auto& r : list)
            if (r.is_object() && r.value("state", "") == "active") ++active;
          right = active >= at_least;
        } else {
          right = j.is_object() && j.contains("user") && j["user"].value("state", "") == "active" &&
                  j["user"].value("id", "") == pick.id;
        }
        if (!right)
          tally.problem(
              kReport, true,
              (whole ? "usage report" : pick.id) + std::string(": ") + reply->body.substr(0, 200));
        else
          tally.ok(kReport, ms);
      }
    }
  };

  // Memory: after a warm-up of a quarter of the run (at most 15 s: threads, TLS sessions and
  // SQLite's cache settle), then every 5 s.
  const pid_t pid = k.daemon.pid();
  const long rss_start = proc_kib(pid, "VmRSS");
  long rss_warm = 0;
  std::vector<long> samples;
  std::thread sampler([&] {
    const auto warm =
        t0 + std::chrono::milliseconds(static_cast<long>(std::min(15.0, opt.seconds / 4) * 1000));
    auto next_sample = warm;
    while (running && Clock::now() < end && !g_stop) {
      if (Clock::now() >= next_sample) {
        const long v = proc_kib(pid, "VmRSS");
        if (rss_warm == 0) rss_warm = v;
        samples.push_back(v);
        next_sample += std::chrono::seconds(5);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  });
  std::vector<std::thread> clients;
  for (int c = 0; c < opt.clients; ++c) clients.emplace_back(client_loop, c);
  for (auto& t : clients) t.join();
  running = false;
  sampler.join();
  const double elapsed = since(t0);
  const long rss_end = proc_kib(pid, "VmRSS");
  const long hwm = proc_kib(pid, "VmHWM");
  if (g_stop) return fail("interrupted");
  if (!k.daemon.alive()) return fail("kmsd died during the load");

  long total_ok = 0, total_errors = 0, total_wrong = 0;
  std::printf("\n%-8s %10s %10s %10s %10s %8s %8s\n", "request", "answered", "per s", "p50 ms",
              "p99 ms", "errors", "wrong");
  for (int op = 0; op < kOps; ++op) {
    auto& l = tally.latency_ms[op];
    std::sort(l.begin(), l.end());
    total_ok += static_cast<long>(l.size());
    total_errors += tally.errors[op];
    total_wrong += tally.wrong[op];
    std::printf("%-8s %10zu %10.1f %10.1f %10.1f %8ld %8ld\n", kOpNames[op], l.size(),
                static_cast<double>(l.size()) / elapsed, bench::percentile(l, 0.5),
                bench::percentile(l, 0.99), tally.errors[op], tally.wrong[op]);
  }
  std::printf("%-8s %10ld %10.1f %21s %8ld %8ld\n", "all", total_ok,
              static_cast<double>(total_ok) / elapsed, "", total_errors, total_wrong);
  std::printf(
      "kmsd memory (VmRSS): %ld KiB at start, %ld KiB after warm-up, %ld KiB at the end "
      "(%+.1f%% since warm-up); peak %ld KiB; samples every 5 s:",
      rss_start, rss_warm, rss_end,
      rss_warm > 0 ? 100.0 * static_cast<double>(rss_end - rss_warm) / static_cast<double>(rss_warm)
                   : 0.0,
      hwm);
  for (long s : samples) std::printf(" %ld", s);
  std::printf("\n");
  for (const auto& p : tally.first_problems) std::printf("  problem: %s\n", p.c_str());
  std::fflush(stdout);
  if (total_errors + total_wrong > 0) return 1;
  if (tally.latency_ms[kEnroll].empty()) return fail("no enrollment succeeded");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  bool quick = false;
  CLI::App app{"concurrent clients enrolling, asking OCSP and reading reports against kmsd"};
  auto* clients =
      app.add_option("--clients", opt.clients, "concurrent clients")->check(CLI::Range(1, 512));
  auto* seconds = app.add_option("--seconds", opt.seconds, "length of the load")
                      ->check(CLI::Range(0.1, 3600.0));
  app.add_option("--workers", opt.workers, "kmsd worker_threads")->check(CLI::Range(1, 64));
  app.add_option("--whole-report-every", opt.whole_report_every,
                 "one report read in N is the whole usage report (0: never)")
      ->check(CLI::NonNegativeNumber);
  app.add_flag("--quick", quick, "the ctest smoke run: 8 clients, 3 s");
  app.add_option("--build-dir", opt.build_dir, "build tree holding daemon/kmsd and cli/kmsctl");
  CLI11_PARSE(app, argc, argv);
  if (quick) {
    if (clients->count() == 0) opt.clients = 8;
    if (seconds->count() == 0) opt.seconds = 3;
  }
  if (opt.build_dir.empty()) {
    std::error_code ec;
    opt.build_dir = fs::read_symlink("/proc/self/exe", ec).parent_path().parent_path();
  }
  bench::install_stop_signals();
  try {
    return run_load(opt);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "load_test: %s\n", e.what());
    return 1;
  }
}

// Master-key rotation throughput on a throw-away SoftHSM2 token:
//
//   rotation_bench [--records N] [--batch B] [--mechanism
//   aes-key-wrap-pad|aes-gcm|aes-cbc-pad-hmac]
//
// Figures (re-wraps per second):
//   token    Token::rewrap alone (unwrap the data key under v1, wrap it under v2)
//   reseal   open + seal again, what a format-1 record costs (payload re-encrypted)
//   job      the daemon's rotation job (daemon/rotation): N escrowed keys in a real store,
//            batches of B per transaction, from the gated request to "finished"
// No assertions: it prints, people judge.
#include <CLI/CLI.hpp>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_sandbox.hpp"
#include "daemon/approvals/approvals.hpp"
#include "daemon/audit/audit_log.hpp"
#include "daemon/enroll/enrollment.hpp"
#include "daemon/rotation/rotation.hpp"
#include "daemon/store/store.hpp"
#include "hsm/token.hpp"

namespace {

using namespace kmsd;
using Clock = std::chrono::steady_clock;

int fail(const std::string& what, const Error& e) {
  std::fprintf(stderr, "rotation_bench: %s: %s\n", what.c_str(), e.message.c_str());
  return 1;
}

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::span<const std::uint8_t> bytes(const std::string& s) {
  return {reinterpret_cast<const std::uint8_t*>(s.data()), s.size()};
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"master-key rotation throughput on a throw-away SoftHSM2 token"};
  std::size_t records = 2000;
  std::size_t batch = 100;
  std::string mechanism = "aes-key-wrap-pad";
  app.add_option("--records", records, "escrowed keys to re-wrap (default 2000)")
      ->check(CLI::Range(1, 1000000));
  app.add_option("--batch", batch, "records per store transaction in the job (default 100)")
      ->check(CLI::Range(1, 10000));
  app.add_option("--mechanism", mechanism,
                 "wrap mechanism of the token (default aes-key-wrap-pad)");
  CLI11_PARSE(app, argc, argv);
  auto mech = hsm::parse_wrap_mechanism(mechanism);
  if (!mech) {
    std::fprintf(stderr, "rotation_bench: unknown --mechanism %s\n", mechanism.c_str());
    return 2;
  }

  bench::Sandbox sandbox;
  hsm::TokenOptions to;
  to.module_path = bench::kModule;
  to.token_uri = bench::kTokenUri;
  to.wrap = *mech;
  auto token = hsm::Token::open(to);
  if (!token.ok()) return fail("opening the token", token.error());
  hsm::Token& t = **token;
  if (auto st = t.login(SecretBytes::from_string(bench::kPin)); !st.ok())
    return fail("login", st.error());
  if (auto st = t.generate_master_key(1); !st.ok()) return fail("master key", st.error());
  if (auto st = t.generate_audit_key(); !st.ok()) return fail("audit key", st.error());

  auto store = store::Store::open(sandbox.dir / "bench.db");
  if (!store.ok()) return fail("opening the store", store.error());
  store::Store& s = **store;
  // A PKCS#8-sized payload per record (an EC P-256 key is ~138 bytes of DER).
  const std::string payload(138, 'k');
  std::vector<hsm::Bytes> blobs;
  auto t_fill = Clock::now();
  auto st = s.transaction([&]() -> Status {
    for (std::size_t i = 0; i < records; ++i) {
      store::UserRecord u;
      u.id = "user" + std::to_string(100000 + i);
      u.email = u.id + "@example.com";
      u.display_name = u.id;
      KMSD_TRY(s.insert_user(u));
      store::KeyHistoryRecord k;
      k.user_id = u.id;
      k.version = 1;
      k.key_id = "k" + std::to_string(i);
      k.algorithm = "ec-p256";
      k.master_version = 1;
      KMSD_ASSIGN_OR_RETURN(
          k.sealed_key, t.seal(bytes(payload), bytes(enroll::escrow_aad(u.id, k.key_id, 1)), 1));
      blobs.push_back(k.sealed_key);
      KMSD_TRY(s.append_key_history(k));
    }
    return Status{};
  });
  if (!st.ok()) return fail("filling the store", st.error());
  const double seal_s = seconds_since(t_fill);
  if (auto g = t.generate_master_key(2); !g.ok()) return fail("master key v2", g.error());

  // token: rewrap alone.
  auto t0 = Clock::now();
  for (const auto& b : blobs)
    if (auto r = t.rewrap(b, 2); !r.ok()) return fail("rewrap", r.error());
  const double token_s = seconds_since(t0);
  // reseal: open + seal (what a format-1 record costs).
  t0 = Clock::now();
  for (std::size_t i = 0; i < blobs.size(); ++i) {
    const std::string id = "user" + std::to_string(100000 + i);
    const std::string aad = enroll::escrow_aad(id, "k" + std::to_string(i), 1);
    auto pt = t.open(blobs[i], bytes(aad));
    if (!pt.ok()) return fail("open", pt.error());
    if (auto r = t.seal(pt->span(), bytes(aad), 2); !r.ok()) return fail("seal", r.error());
  }
  const double reseal_s = seconds_since(t0);

  // job: the daemon's rotation job to v3 over the store.
  audit::AuditLog audit(s, t);
  approvals::Approvals approvals(s, audit);
  rotation::Rotation job(s, t, audit, approvals, [] { return true; });
  job.start();
  t0 = Clock::now();
  rotation::Pace pace;
  pace.batch = batch;
  auto out = job.request_rotate(pace, "bench");
  if (!out.ok()) return fail("rotate", out.error());
  nlohmann::json status;
  while (true) {
    auto js = job.status();
    if (!js.ok()) return fail("status", js.error());
    status = *js;
    if (status.value("state", "") == "finished") break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  const double job_s = seconds_since(t0);
  job.stop();
  const auto n = static_cast<double>(records);
  std::printf("rotation_bench: %zu records, mechanism %s, SoftHSM2\n", records, mechanism.c_str());
  std::printf("  seal (filling the store) %10.0f /s\n", n / seal_s);
  std::printf("  token rewrap             %10.0f re-wraps/s\n", n / token_s);
  std::printf("  format-1 open + seal     %10.0f re-seals/s\n", n / reseal_s);
  std::printf(
      "  rotation job (batch %zu) %8.0f re-wraps/s (%zu re-wrapped, %s remaining, %.2f s)\n", batch,
      status.value("done", std::size_t{0}) / job_s, status.value("done", std::size_t{0}),
      status["remaining"].dump().c_str(), job_s);
  return status.value("remaining", 1) == 0 ? 0 : 1;
}

// Bulk enable throughput: UserService::bulk_enable in batches of 1000 (the API's batch limit)
// against a throw-away SoftHSM2 token and store, as kmsd runs it behind POST /v1/users/bulk.
// Prints users per second and peak resident memory after each tenth of the run, so that a
// memory curve that grows with the number of users shows.
//
//   bulk_enable_bench [--users N] [--wrap aes-key-wrap-pad|aes-gcm|aes-cbc-pad-hmac]
#include <stdlib.h>
#include <sys/resource.h>
#include <CLI/CLI.hpp>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "bench/bench_sandbox.hpp"
#include "daemon/audit/audit_log.hpp"
#include "daemon/policy/policy_check.hpp"
#include "daemon/users/user_service.hpp"

namespace {

using namespace kmsd;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

using bench::kModule;
using bench::kPin;

long peak_rss_kib() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss;
}

}  // namespace

int main(int argc, char** argv) {
  long users = 100000;
  std::string wrap = "aes-key-wrap-pad";
  CLI::App app{"bulk enable throughput and peak memory against a throw-away token and store"};
  app.add_option("--users", users, "users to enable")->check(CLI::Range(1L, 100000000L));
  app.add_option("--wrap", wrap, "data-key protection on the token")
      ->check(CLI::IsMember({"aes-key-wrap-pad", "aes-gcm", "aes-cbc-pad-hmac"}));
  CLI11_PARSE(app, argc, argv);
  bench::Sandbox sandbox;
  const fs::path& dir = sandbox.dir;

  hsm::TokenOptions o;
  o.module_path = kModule;
  o.token_uri = "pkcs11:token=bench";
  auto mech = hsm::parse_wrap_mechanism(wrap);
  if (!mech) {
    std::fprintf(stderr, "unknown --wrap %s\n", wrap.c_str());
    return 2;
  }
  o.wrap = *mech;
  auto token = hsm::Token::open(o);
  if (!token.ok() || !(*token)->login(SecretBytes::from_string(kPin)).ok() ||
      !(*token)->generate_master_key(1).ok() || !(*token)->generate_audit_key().ok()) {
    std::fprintf(stderr, "token setup failed\n");
    return 1;
  }
  auto store = store::Store::open(dir / "kmsd.db");
  if (!store.ok()) return 1;
  audit::AuditLog audit(**store, **token);
  policy::PolicyInForce policy(
      std::make_shared<const policy::PolicyCheck>(policy::PolicyCheck::create({}).value()));
  users::UserService service(**store, **token, audit, policy,
                             [] { return users::TokenSettings{}; });

  std::printf("kmsd bulk_enable_bench: %ld users, batches of 1000, wrap %s, SoftHSM2\n", users,
              wrap.c_str());
  const long rss_start = peak_rss_kib();
  const auto t0 = Clock::now();
  long done = 0, issued = 0;
  long next_report = users / 10;
  while (done < users) {
    std::vector<users::UserInput> batch;
    for (long i = done; i < std::min(done + 1000, users); ++i) {
      std::string id = "user" + std::to_string(i);
      batch.push_back({id, id + "@example.com", "User " + std::to_string(i), std::nullopt});
    }
    auto lines = service.bulk_enable(batch, {"bench", false, false}, "bench");
    if (!lines.ok()) {
      std::fprintf(stderr, "bulk_enable failed: %s\n", lines.error().message.c_str());
      return 1;
    }
    for (const auto& l : *lines) issued += l.status == users::BulkStatus::kIssued ? 1 : 0;
    done += static_cast<long>(batch.size());
    if (done >= next_report || done == users) {
      double s = std::chrono::duration<double>(Clock::now() - t0).count();
      std::printf("  %7ld users  %8.0f users/s  peak RSS %6ld KiB (+%ld since start)\n", done,
                  done / s, peak_rss_kib(), peak_rss_kib() - rss_start);
      next_report += users / 10;
    }
  }
  double s = std::chrono::duration<double>(Clock::now() - t0).count();
  std::printf(
      "total: %ld users (%ld tokens issued) in %.1f s = %.0f users/s; target 10000/s "
      "ratio %.2f\n",
      users, issued, s, users / s, users / s / 10000.0);
  return issued == users ? 0 : 1;
}

// /metrics end to end: the real kmsd on a throw-away token, scraped with curl over the admin
// listener (mutual TLS) and the optional plain metrics listener; the whole exposition checked
// against the text-format grammar, counters monotonic across scrapes, values moving with
// traffic, nothing naming a user. And systemd's notify protocol: READY=1 on a socket the test
// binds arrives only once kmsd is unsealed.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <regex>
#include <thread>

#include "tests/e2e/harness.hpp"
#include "tests/metrics/exposition_check.hpp"

namespace kmsd::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

std::string problems_of(const ParsedExposition& p) {
  std::string out;
  for (const auto& s : p.problems) out += s + "\n";
  return out;
}

class MetricsE2eTest : public KmsdTest {
 protected:
  // write_config with keys added to [server].
  void write_config_with_server(const std::string& source, const std::string& server_keys) {
    write_config(source);
    std::string text = read_file(conf_path());
    auto pos = text.find("[server]\n");
    ASSERT_NE(pos, std::string::npos);
    text.insert(pos + 9, server_keys);
    std::ofstream(conf_path()) << text;
  }
  ApiReply scrape_admin() { return api("GET", "/metrics"); }
  ParsedExposition scrape_valid() {
    auto r = scrape_admin();
    EXPECT_EQ(r.status, 200) << r.body;
    auto p = parse_exposition(r.body);
    EXPECT_TRUE(p.ok()) << problems_of(p) << r.body;
    return p;
  }
  std::uint16_t metrics_port_ = free_port();
};

TEST_F(MetricsE2eTest, ScrapeIsValidMonotonicAndMovesWithTraffic) {
  write_config_with_server(
      "file", "metrics_listen = \"127.0.0.1:" + std::to_string(metrics_port_) + "\"\n");
  launch();
  // The CRL is made by the maintenance tick within seconds of unsealing.
  for (int i = 0; i < 100 && get_public("/crl").output.find("\n200") == std::string::npos; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));

  auto first = scrape_valid();
  EXPECT_EQ(first.series[R"(kmsd_seal_state{state="unsealed"})"], 1);
  EXPECT_EQ(first.series[R"(kmsd_seal_state{state="sealed"})"], 0);
  EXPECT_EQ(first.series["kmsd_token_logged_in{}"], 1);
  EXPECT_EQ(first.series["kmsd_store_up{}"], 1);
  EXPECT_GE(first.series[R"(kmsd_certificates_issued_total{kind="admin"})"], 1);
  EXPECT_GE(first.series[R"(kmsd_certificates_issued_total{kind="server"})"], 1);
  EXPECT_EQ(first.series["kmsd_approvals_pending{}"], 0);
  EXPECT_GE(first.series[R"(kmsd_token_sessions{state="open"})"], 1);
  EXPECT_GE(first.series["kmsd_token_sessions_max{}"], 1);
  ASSERT_TRUE(first.series.count("kmsd_crl_age_seconds{}")) << "no CRL age";
  EXPECT_GE(first.series["kmsd_crl_age_seconds{}"], 0);
  EXPECT_LT(first.series["kmsd_crl_age_seconds{}"], 3600);
  EXPECT_GT(first.series["kmsd_crl_next_update_seconds{}"], 0);
  EXPECT_GT(first.series[R"(kmsd_secure_heap_bytes{kind="size"})"], 0);
  EXPECT_GT(first.series["process_resident_memory_bytes{}"], 0);
  EXPECT_EQ(first.types["kmsd_http_request_duration_seconds"], "histogram");
  EXPECT_EQ(first.types["kmsd_token_operation_duration_seconds"], "histogram");

  // Traffic: health checks, a user enabled (the token seals the enrollment token), a user
  // looked up by id, a path nobody serves, a revocation waiting for approval is not needed.
  for (int i = 0; i < 3; ++i) EXPECT_EQ(http_code("/healthz"), "200");
  auto en = enable("metrics-user-7f3a");
  ASSERT_EQ(en.status, 201) << en.body;
  EXPECT_EQ(api("GET", "/v1/users/metrics-user-7f3a").status, 200);
  EXPECT_EQ(http_code("/no/such/path/metrics-user-7f3a"), "404");

  auto second = scrape_valid();
  EXPECT_THAT(kmsd::testing::monotonic_problems(first, second), ::testing::IsEmpty());
  auto delta = [&](const std::string& key) { return second.series[key] - first.series[key]; };
  EXPECT_GE(
      delta(
          R"(kmsd_http_requests_total{code="200",listener="public",method="GET",route="/healthz"})"),
      3);
  EXPECT_EQ(
      delta(
          R"(kmsd_http_requests_total{code="201",listener="tls",method="POST",route="/v1/users"})"),
      1);
  EXPECT_EQ(
      delta(
          R"(kmsd_http_requests_total{code="200",listener="tls",method="GET",route="/v1/users/{id}"})"),
      1);
  EXPECT_GE(
      delta(R"(kmsd_http_requests_total{code="404",listener="public",method="GET",route="other"})"),
      1);
  EXPECT_GE(delta(R"(kmsd_http_request_duration_seconds_count{listener="tls",route="/v1/users"})"),
            1);
  EXPECT_GE(delta(R"(kmsd_token_operations_total{op="seal",result="ok"})"), 1);
  EXPECT_GE(delta(R"(kmsd_token_operations_total{op="hmac",result="ok"})"), 1);  // audit record
  EXPECT_GE(delta(R"(kmsd_token_operation_duration_seconds_count{op="seal"})"), 1);
  // The first scrape itself was counted by the second.
  EXPECT_GE(
      second.series
          [R"(kmsd_http_requests_total{code="200",listener="tls",method="GET",route="/metrics"})"],
      1);
  // The store counts are cached for 5 s: the new user shows within that.
  for (int i = 0; i < 80 && scrape_valid().series[R"(kmsd_users{state="enabled"})"] < 1; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(scrape_valid().series[R"(kmsd_users{state="enabled"})"], 1);

  // Nothing that names a user, a path as sent, a subject or a serial.
  const std::string text = scrape_admin().body;
  EXPECT_THAT(text, Not(HasSubstr("metrics-user-7f3a")));
  EXPECT_THAT(text, Not(HasSubstr("/no/such")));
  EXPECT_THAT(text, Not(HasSubstr("kmsd test CA")));
  EXPECT_THAT(text, Not(HasSubstr("alice")));

  // The plain metrics listener: same exposition, no certificate needed, and nothing else.
  const std::string murl = "http://127.0.0.1:" + std::to_string(metrics_port_);
  auto plain = sh("curl -s -m 10 " + shell_quote(murl + "/metrics"));
  ASSERT_EQ(plain.status, 0);
  auto pp = parse_exposition(plain.output);
  EXPECT_TRUE(pp.ok()) << problems_of(pp);
  EXPECT_EQ(pp.series[R"(kmsd_seal_state{state="unsealed"})"], 1);
  EXPECT_THAT(sh("curl -s -m 10 -w '\\n%{http_code}' " + shell_quote(murl + "/v1/status")).output,
              HasSubstr("\n404"));
  // The public listener does not serve it.
  EXPECT_EQ(http_code("/metrics"), "404");
}

TEST_F(MetricsE2eTest, AdminListenerMetricsNeedAnAdministratorCertificate) {
  boot();
  auto r = sh("curl -s -m 10 --cacert " + shell_quote(dir() / "ca.pem") + " -w '\\n%{http_code}' " +
              shell_quote("https://localhost:" + std::to_string(admin_port_) + "/metrics"));
  EXPECT_THAT(r.output, HasSubstr("\n401"));
  EXPECT_THAT(r.output, HasSubstr("administrator"));
  EXPECT_THAT(r.output, Not(HasSubstr("kmsd_http_requests_total")));
  EXPECT_EQ(api("POST", "/metrics", nlohmann::json::object()).status, 405);
}

TEST_F(MetricsE2eTest, SealedDaemonReportsSealedOnTheMetricsListener) {
  write_config_with_server(
      "prompt", "metrics_listen = \"127.0.0.1:" + std::to_string(metrics_port_) + "\"\n");
  ASSERT_EQ(init().status, 0);
  start();
  auto r = sh("curl -s -m 10 " +
              shell_quote("http://127.0.0.1:" + std::to_string(metrics_port_) + "/metrics"));
  auto p = parse_exposition(r.output);
  ASSERT_TRUE(p.ok()) << problems_of(p) << r.output;
  EXPECT_EQ(p.series[R"(kmsd_seal_state{state="sealed"})"], 1);
  EXPECT_EQ(p.series["kmsd_token_logged_in{}"], 0);
  EXPECT_FALSE(p.series.count("kmsd_crl_age_seconds{}"));
}

// systemd's side of Type=notify, played by the test: a datagram socket in NOTIFY_SOCKET.
class NotifySocket {
 public:
  explicit NotifySocket(const std::filesystem::path& path) {
    fd_ = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::snprintf(a.sun_path, sizeof a.sun_path, "%s", path.c_str());
    bound_ = ::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
    timeval tv{0, 200 * 1000};
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  }
  ~NotifySocket() { ::close(fd_); }
  bool bound() const { return bound_; }
  // Every datagram received within WITHIN, joined by "|".
  std::string drain(std::chrono::milliseconds within) {
    std::string out;
    const auto end = std::chrono::steady_clock::now() + within;
    while (std::chrono::steady_clock::now() < end) {
      char buf[4096];
      ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
      if (n > 0) out += std::string(buf, static_cast<std::size_t>(n)) + "|";
    }
    return out;
  }
  // Waits up to WITHIN for a datagram containing WHAT; everything seen goes to SEEN.
  bool wait_for(const std::string& what, std::chrono::milliseconds within, std::string* seen) {
    const auto end = std::chrono::steady_clock::now() + within;
    while (std::chrono::steady_clock::now() < end) {
      char buf[4096];
      ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
      if (n <= 0) continue;
      std::string d(buf, static_cast<std::size_t>(n));
      *seen += d + "|";
      if (d.find(what) != std::string::npos) return true;
    }
    return false;
  }

 private:
  int fd_ = -1;
  bool bound_ = false;
};

TEST_F(MetricsE2eTest, ReadyIsSentOnlyAfterUnseal) {
  NotifySocket sock(dir() / "notify.sock");
  ASSERT_TRUE(sock.bound());
  ::setenv("NOTIFY_SOCKET", (dir() / "notify.sock").c_str(), 1);
  write_config("prompt");
  ASSERT_EQ(init().status, 0);
  start();
  ::unsetenv("NOTIFY_SOCKET");
  // Sealed: a STATUS line saying so, and no READY=1 however long we wait (2 s here).
  std::string seen;
  ASSERT_TRUE(sock.wait_for("STATUS=sealed", std::chrono::seconds(10), &seen)) << seen;
  seen += sock.drain(std::chrono::seconds(2));
  EXPECT_THAT(seen, Not(HasSubstr("READY=1"))) << seen;
  EXPECT_THAT(log_text(), HasSubstr("READY=1 will be sent once kmsd is unsealed"));

  auto good = kmsctl("unseal --socket " + shell_quote(socket_path()) + " --secret-file " +
                     shell_quote(secret_path()));
  ASSERT_EQ(good.status, 0) << good.output;
  std::string after;
  EXPECT_TRUE(sock.wait_for("READY=1", std::chrono::seconds(10), &after)) << after;
  EXPECT_THAT(after, HasSubstr("STATUS=unsealed"));
  EXPECT_EQ(http_code("/readyz"), "200");
  EXPECT_EQ(stop(), 0);
  std::string bye;
  EXPECT_TRUE(sock.wait_for("STOPPING=1", std::chrono::seconds(5), &bye)) << bye;
}

TEST_F(MetricsE2eTest, DaemonIsNotDumpableAndHoldsItsSecretsInTheLockedHeap) {
  boot();
  const std::string status = read_file("/proc/" + std::to_string(pid_) + "/status");
  // Non-dumpable: /proc/PID belongs to root; the limits show no core files.
  const std::string limits = read_file("/proc/" + std::to_string(pid_) + "/limits");
  EXPECT_THAT(limits, ::testing::ContainsRegex("Max core file size +0 +0"));
  EXPECT_THAT(log_text(), ::testing::AnyOf(HasSubstr("locked in RAM and excluded from core dumps"),
                                           HasSubstr("could not be locked in RAM")));
  auto p = parse_exposition(api("GET", "/metrics").body);
  ASSERT_TRUE(p.ok());
  EXPECT_GT(p.series[R"(kmsd_secure_heap_bytes{kind="used"})"], 0);  // the retained PIN at least
}

}  // namespace
}  // namespace kmsd::testing

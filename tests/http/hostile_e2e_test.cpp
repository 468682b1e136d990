// Hostile clients against the real kmsd: enrollment and CMP rate limits per client address and
// per user (429 with Retry-After and a sentence naming the key to change), oversized headers
// and bodies (431, 413) and a slow client on the TLS listener, which is dropped while others
// are served.
#include <arpa/inet.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fstream>
#include <thread>

#include "tests/e2e/harness.hpp"

namespace kmsd::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

class HostileE2eTest : public KmsdTest {
 protected:
  void boot_with_server(const std::string& server_keys) {
    write_config("file");
    std::string text = read_file(conf_path());
    auto pos = text.find("[server]\n");
    ASSERT_NE(pos, std::string::npos);
    text.insert(pos + 9, server_keys);
    std::ofstream(conf_path()) << text;
    launch();
  }
  // POST /enroll/v1/enroll without a client certificate; "HEADERS\nBODY\nCODE".
  CommandResult enroll_attempt(const std::string& user) {
    nlohmann::json body{
        {"user", user}, {"token", "0000-0000-0000-0000-0000-0000"}, {"csr", "not a CSR"}};
    return sh(
        "curl -s -m 10 -D - --cacert " + shell_quote(dir() / "ca.pem") +
        " -H 'Content-Type: application/json' --data-binary " + shell_quote(body.dump()) +
        " -w '\\n%{http_code}' " +
        shell_quote("https://localhost:" + std::to_string(admin_port_) + "/enroll/v1/enroll"));
  }
  static std::string code_of(const CommandResult& r) {
    auto nl = r.output.rfind('\n');
    return nl == std::string::npos ? "" : r.output.substr(nl + 1);
  }
};

TEST_F(HostileE2eTest, EnrollmentAttemptsPerUserAreRateLimited) {
  boot_with_server("enroll_rate_per_identity = 2\nenroll_rate_per_source = 100\n");
  EXPECT_EQ(code_of(enroll_attempt("mallory")), "400");
  EXPECT_EQ(code_of(enroll_attempt("mallory")), "400");
  auto third = enroll_attempt("mallory");
  EXPECT_EQ(code_of(third), "429") << third.output;
  EXPECT_THAT(third.output, ::testing::ContainsRegex("[Rr]etry-[Aa]fter: [1-9][0-9]*"));
  EXPECT_THAT(third.output, HasSubstr("server.enroll_rate_per_identity"));
  EXPECT_THAT(third.output, Not(HasSubstr("mallory")));
  // Another user is not held back by mallory's attempts.
  EXPECT_EQ(code_of(enroll_attempt("trent")), "400");
  // Health and the admin API are not rate limited.
  EXPECT_EQ(http_code("/healthz"), "200");
  EXPECT_EQ(api("GET", "/v1/status").status, 200);
  EXPECT_THAT(log_text(), Not(HasSubstr("mallory")));  // no user id in the log either
  // Counted: by route pattern and status, and as a refusal.
  auto m = api("GET", "/metrics");
  EXPECT_THAT(m.body,
              HasSubstr(R"(kmsd_http_refusals_total{listener="tls",reason="rate_limited"} 1)"));
  EXPECT_THAT(
      m.body,
      HasSubstr(
          R"(kmsd_http_requests_total{listener="tls",method="POST",route="/enroll/v1/enroll",code="429"} 1)"));
}

TEST_F(HostileE2eTest, EnrollmentAndCmpPerAddressAreRateLimited) {
  boot_with_server("enroll_rate_per_source = 3\nenroll_rate_per_identity = 100\n");
  EXPECT_EQ(code_of(enroll_attempt("u1")), "400");
  // CMP shares the budget: garbage DER is still a request from this address.
  auto cmp =
      sh("printf 'garbage' | curl -s -m 10 -H 'Content-Type: application/pkixcmp' "
         "--data-binary @- -w '\\n%{http_code}' " +
         shell_quote(public_url() + "/cmp"));
  EXPECT_EQ(code_of(cmp), "400") << cmp.output;
  EXPECT_EQ(code_of(enroll_attempt("u2")), "400");
  auto fourth = enroll_attempt("u3");
  EXPECT_EQ(code_of(fourth), "429") << fourth.output;
  EXPECT_THAT(fourth.output, HasSubstr("from 127.0.0.1"));
  EXPECT_THAT(fourth.output, HasSubstr("server.enroll_rate_per_source"));
  auto cmp2 =
      sh("printf 'garbage' | curl -s -m 10 -D - -H 'Content-Type: application/pkixcmp' "
         "--data-binary @- -w '\\n%{http_code}' " +
         shell_quote(public_url() + "/cmp"));
  EXPECT_EQ(code_of(cmp2), "429") << cmp2.output;
  EXPECT_THAT(cmp2.output, ::testing::ContainsRegex("[Rr]etry-[Aa]fter: [1-9]"));
  // OCSP and the CRL stay available to relying parties.
  EXPECT_THAT(get_public("/crl").output, Not(HasSubstr("\n429")));
}

TEST_F(HostileE2eTest, OversizedHeadersAndBodiesAreRefusedInWords) {
  boot_with_server("max_header_bytes = 2048\n");
  auto big_header = sh("curl -s -m 10 -H 'X-Junk: " + std::string(4000, 'j') +
                       "' -w '\\n%{http_code}' " + shell_quote(public_url() + "/healthz"));
  EXPECT_EQ(code_of(big_header), "431") << big_header.output;
  EXPECT_THAT(big_header.output, HasSubstr("server.max_header_bytes"));
  // max_body_bytes defaults to 1 MiB.
  std::ofstream(dir() / "big.bin") << std::string((1 << 20) + 10, 'x');
  auto big_body = sh("curl -s -m 10 -H 'Content-Type: application/ocsp-request' --data-binary @" +
                     shell_quote(dir() / "big.bin") + " -w '\\n%{http_code}' " +
                     shell_quote(public_url() + "/ocsp"));
  EXPECT_EQ(code_of(big_body), "413") << big_body.output.substr(0, 300);
  EXPECT_EQ(http_code("/healthz"), "200");
}

TEST_F(HostileE2eTest, SlowClientsOnBothListenersAreDroppedWhileOthersAreServed) {
  boot_with_server("header_timeout_seconds = 2\n");
  auto connect_to = [](std::uint16_t port) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
    return fd;
  };
  std::vector<int> slow;
  for (int i = 0; i < 10; ++i) {
    int fd = connect_to(public_port_);
    const char partial[] = "GET /healthz HTTP/1.1\r\nHost: x\r\n";
    EXPECT_GT(::send(fd, partial, sizeof partial - 1, MSG_NOSIGNAL), 0);
    slow.push_back(fd);
  }
  for (int i = 0; i < 5; ++i) slow.push_back(connect_to(admin_port_));  // no TLS hello at all
  // Served meanwhile, on both listeners.
  EXPECT_EQ(http_code("/healthz"), "200");
  EXPECT_EQ(api("GET", "/v1/status").status, 200);
  // Each slow connection is closed by kmsd (generous bound: 30 s for a 2 s deadline).
  for (int fd : slow) {
    timeval tv{30, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char buf[256];
    ssize_t n;
    while ((n = ::recv(fd, buf, sizeof buf, 0)) > 0) {
    }
    EXPECT_TRUE(n == 0 || errno == ECONNRESET) << "still open after 30 s";
    ::close(fd);
  }
  EXPECT_THAT(log_text(), HasSubstr("did not arrive within 2 s"));
}

}  // namespace
}  // namespace kmsd::testing

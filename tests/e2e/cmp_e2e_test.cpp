// CMP end to end: kmsd on a throw-away token, its public listener's POST /cmp driven by the
// stock `openssl cmp` client — enrollment with the one-time token, refusals, renewal (kur) and
// revocation (rr) signed with the current signing certificate.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <fstream>

#include "tests/e2e/harness.hpp"

namespace kmsd::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

class CmpE2eTest : public KmsdTest {
 protected:
  void SetUp() override {
    KmsdTest::SetUp();
    boot();
    for (const char* k : {"sign.key", "new.key"})
      ASSERT_EQ(sh("openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out " + path(k))
                    .status,
                0);
  }

  std::string path(const std::string& name) const { return shell_quote(dir() / name); }

  // The stock client against POST /cmp, trusting the KMS CA for the server's responses.
  CommandResult cmp(const std::string& args) {
    return sh("openssl cmp -server " +
              shell_quote("127.0.0.1:" + std::to_string(public_port_) + "/cmp") + " -trusted " +
              path("ca.pem") + " -msg_timeout 30 -total_timeout 60 " + args + " 2>&1");
  }
  CommandResult ir(const std::string& user, const std::string& secret, const std::string& out) {
    return cmp("-cmd ir -ref " + shell_quote(user) + " -secret " + shell_quote("pass:" + secret) +
               " -newkey " + path("sign.key") + " -subject " + shell_quote("/CN=" + user) +
               " -certout " + path(out));
  }
  std::string token_for(const std::string& user) {
    auto r = enable(user);
    EXPECT_EQ(r.status, 201) << r.body;
    return r.j().value("token", "");
  }
  bool verifies(const std::string& pem) {
    return sh("openssl verify -CAfile " + path("ca.pem") + " " + path(pem)).status == 0;
  }
  // Lower-case hex serial, as kmsd records it.
  std::string serial_of(const std::string& pem) {
    auto r = sh("openssl x509 -noout -serial -in " + path(pem));
    std::string s = r.output.substr(r.output.find('=') + 1);
    s.erase(std::remove_if(s.begin(), s.end(), [](unsigned char c) { return std::isspace(c); }),
            s.end());
    std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
    return s;
  }
  std::string subject_of(const std::string& pem) {
    return sh("openssl x509 -noout -subject -in " + path(pem)).output;
  }
  nlohmann::json show(const std::string& user) {
    auto r = api("GET", "/v1/users/" + user);
    EXPECT_EQ(r.status, 200) << r.body;
    return r.j();
  }
  nlohmann::json certificate(const nlohmann::json& shown, const std::string& serial) {
    for (const auto& c : shown["certificates"])
      if (c["serial"] == serial) return c;
    return nullptr;
  }
};

TEST_F(CmpE2eTest, StockOpensslCmpEnrollsRenewsAndRevokes) {
  const std::string token = token_for("jdoe");
  ASSERT_FALSE(token.empty());

  auto enrolled = ir("jdoe", token, "sign.pem");
  ASSERT_EQ(enrolled.status, 0) << enrolled.output << log_text();
  EXPECT_TRUE(verifies("sign.pem"));
  auto shown = show("jdoe");
  EXPECT_EQ(shown["user"]["state"], "active");
  EXPECT_FALSE(shown["token_status"]["used_at"].is_null());
  const std::string first = serial_of("sign.pem");
  EXPECT_EQ(certificate(shown, first)["kind"], "signing");

  // The token is single use.
  auto again = ir("jdoe", token, "again.pem");
  EXPECT_NE(again.status, 0);
  EXPECT_THAT(again.output, HasSubstr("rejection"));
  EXPECT_THAT(again.output, HasSubstr("not valid"));

  // kur: signed with the current certificate, a new certificate for a new key.
  auto renewed = cmp("-cmd kur -cert " + path("sign.pem") + " -key " + path("sign.key") +
                     " -newkey " + path("new.key") + " -certout " + path("new.pem"));
  ASSERT_EQ(renewed.status, 0) << renewed.output << log_text();
  EXPECT_TRUE(verifies("new.pem"));
  const std::string second = serial_of("new.pem");
  EXPECT_NE(second, first);
  EXPECT_EQ(subject_of("new.pem"), subject_of("sign.pem"));
  EXPECT_EQ(show("jdoe")["user"]["state"], "active");

  // rr: the holder revokes the new certificate (OpenSSL 3.0's app needs -oldcert for rr).
  auto revoked = cmp("-cmd rr -cert " + path("new.pem") + " -key " + path("new.key") +
                     " -oldcert " + path("new.pem") + " -revreason 1");
  ASSERT_EQ(revoked.status, 0) << revoked.output << log_text();
  shown = show("jdoe");
  auto rec = certificate(shown, second);
  ASSERT_FALSE(rec.is_null()) << shown.dump();
  EXPECT_FALSE(rec["revoked_at"].is_null());
  EXPECT_TRUE(certificate(shown, first)["revoked_at"].is_null());
  // A revoked certificate renews nothing.
  auto late = cmp("-cmd kur -cert " + path("new.pem") + " -key " + path("new.key") + " -newkey " +
                  path("sign.key") + " -certout " + path("late.pem"));
  EXPECT_NE(late.status, 0);
  EXPECT_THAT(late.output, HasSubstr("revoked"));
}

TEST_F(CmpE2eTest, AWrongTokenIsRefusedAndCountedAndTheTokenTypedLooselyEnrolls) {
  const std::string token = token_for("jdoe");
  ASSERT_FALSE(token.empty());
  std::string wrong = token;
  wrong[0] = wrong[0] == 'A' ? 'B' : 'A';
  auto refused = ir("jdoe", wrong, "sign.pem");
  EXPECT_NE(refused.status, 0);
  EXPECT_THAT(refused.output, HasSubstr("badMessageCheck"));
  EXPECT_THAT(refused.output, HasSubstr("not valid"));
  EXPECT_THAT(refused.output, Not(HasSubstr(token)));
  auto shown = show("jdoe");
  EXPECT_EQ(shown["token_status"]["failed_attempts"], 1);
  EXPECT_EQ(shown["user"]["state"], "enabled");
  EXPECT_EQ(log_text().find(token), std::string::npos);

  // Lower case without hyphens is the same token.
  std::string typed;
  for (char c : token)
    if (c != '-') typed += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  auto enrolled = ir("jdoe", typed, "sign.pem");
  ASSERT_EQ(enrolled.status, 0) << enrolled.output << log_text();
  EXPECT_TRUE(verifies("sign.pem"));
  EXPECT_EQ(show("jdoe")["user"]["state"], "active");
}

TEST_F(CmpE2eTest, ABodyThatIsNotCmpGetsHttp400) {
  std::ofstream(dir() / "junk.bin") << "this is not DER";
  auto r =
      sh("curl -s -m 10 -o /dev/null -w '%{http_code}' -H 'Content-Type: application/pkixcmp' "
         "--data-binary @" +
         path("junk.bin") + " " + shell_quote(public_url() + "/cmp"));
  EXPECT_EQ(r.output, "400");
}

}  // namespace
}  // namespace kmsd::testing

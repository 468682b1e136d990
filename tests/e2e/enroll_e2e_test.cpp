// The user's side end to end: kmsd on a throw-away token, users enrolled with `kmsctl enroll`
// over HTTPS, and everything checked with the stock clients: openssl pkcs12/x509/verify/cms
// read the results, openssl ocsp and openssl crl see revocations.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <signal.h>

#include <chrono>
#include <fstream>
#include <regex>
#include <sstream>
#include <thread>

#include "tests/e2e/harness.hpp"

namespace kmsd::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using json = nlohmann::json;
namespace fs = std::filesystem;

class EnrollTest : public KmsdTest {
 protected:
  void SetUp() override { KmsdTest::SetUp(); }

  // Writes the configuration (EXTRA appended), initializes, starts and fetches ca.pem.
  void boot(const std::string& extra = "") {
    KmsdTest::boot(extra);
    write_private(dir() / "user.pass", "user pass phrase\n");
  }

  // Enables ID and returns the token shown once.
  std::string enable_token(const std::string& id) {
    auto r = enable(id, "User " + id);
    EXPECT_EQ(r.status, 201) << r.body;
    return r.j().value("token", std::string());
  }

  std::string user_options() const {
    return " --server https://localhost:" + std::to_string(admin_port_) + " --ca " +
           shell_quote(dir() / "ca.pem") + " --new-passphrase-file " +
           shell_quote(dir() / "user.pass") + " -o json";
  }

  // kmsctl enroll; on success writes sign-OUT.pem and enc-OUT.pem from the JSON summary.
  CommandResult enroll(const std::string& id, const std::string& token, const std::string& out,
                       const std::string& more = "") {
    write_private(dir() / "token.txt", token + "\n");
    auto r = kmsctl("enroll --user " + shell_quote(id) + " --token-file " +
                    shell_quote(dir() / "token.txt") + " --out " + shell_quote(dir() / out) +
                    user_options() + more);
    if (r.status == 0) save_certs(r.output, out);
    return r;
  }

  void save_certs(const std::string& output, const std::string& out) {
    auto j = json::parse(output.substr(output.find('{')), nullptr, false);
    ASSERT_TRUE(j.is_object()) << output;
    write_private(dir() / ("sign-" + out + ".pem"), j["signing_certificate"].get<std::string>());
    write_private(dir() / ("enc-" + out + ".pem"), j["encryption_certificate"].get<std::string>());
  }

  // The private keys in P12, one PEM file each: key1.pem, key2.pem, ... in P12's order.
  int split_keys(const std::string& p12, const std::string& prefix) {
    auto r = sh("openssl pkcs12 -in " + shell_quote(dir() / p12) +
                " -passin file:" + shell_quote(dir() / "user.pass") + " -nocerts -nodes -out " +
                shell_quote(dir() / (prefix + "-all.pem")));
    EXPECT_EQ(r.status, 0) << r.output;
    const std::string all = read_file(dir() / (prefix + "-all.pem"));
    std::regex block("-----BEGIN PRIVATE KEY-----[^-]+-----END PRIVATE KEY-----");
    int n = 0;
    for (auto it = std::sregex_iterator(all.begin(), all.end(), block);
         it != std::sregex_iterator(); ++it)
      write_private(dir() / (prefix + "-key" + std::to_string(++n) + ".pem"), it->str() + "\n");
    return n;
  }

  // Encrypts TEXT to the certificate in CERT_PEM with the stock openssl cms.
  void encrypt_to(const std::string& cert_pem, const std::string& text, const std::string& out) {
    write_private(dir() / "plain.txt", text);
    auto r = sh("openssl cms -encrypt -binary -aes256 -in " + shell_quote(dir() / "plain.txt") +
                " -out " + shell_quote(dir() / out) + " " + shell_quote(dir() / cert_pem));
    ASSERT_EQ(r.status, 0) << r.output;
  }

  // Decrypts MSG with any of the keys PREFIX-key1..N; the plaintext, or "" if none opened it.
  std::string decrypt_with_any(const std::string& msg, const std::string& prefix, int n) {
    for (int i = 1; i <= n; ++i) {
      auto r =
          sh("openssl cms -decrypt -binary -in " + shell_quote(dir() / msg) + " -inkey " +
             shell_quote(dir() / (prefix + "-key" + std::to_string(i) + ".pem")) + " 2>/dev/null");
      if (r.status == 0) return r.output;
    }
    return "";
  }

  std::string serial_of(const std::string& cert_pem) {
    auto r = sh("openssl x509 -in " + shell_quote(dir() / cert_pem) + " -noout -serial");
    std::string s = r.output.substr(r.output.find('=') + 1);
    s.erase(s.find_last_not_of("\r\n") + 1);
    return s;
  }

  std::string ocsp_status(const std::string& cert_pem) {
    return sh("openssl ocsp -issuer " + shell_quote(dir() / "ca.pem") + " -cert " +
              shell_quote(dir() / cert_pem) + " -url " + shell_quote(public_url() + "/ocsp") +
              " -CAfile " + shell_quote(dir() / "ca.pem") + " 2>&1")
        .output;
  }
};

TEST_F(EnrollTest, RestEnrollmentWritesAPkcs12ThatOpenSslAndCmsRead) {
  boot();
  const std::string token = enable_token("ann");
  auto r = enroll("ann", token, "ann.p12");
  ASSERT_EQ(r.status, 0) << r.output << log_text();
  EXPECT_EQ(fs::status(dir() / "ann.p12").permissions() & fs::perms::all,
            fs::perms::owner_read | fs::perms::owner_write);

  // One file: the signing key, the escrowed encryption key, both certificates and the CA.
  ASSERT_EQ(split_keys("ann.p12", "ann"), 2);
  auto certs = sh("openssl pkcs12 -in " + shell_quote(dir() / "ann.p12") +
                  " -passin file:" + shell_quote(dir() / "user.pass") + " -nokeys");
  ASSERT_EQ(certs.status, 0) << certs.output;
  EXPECT_THAT(certs.output, HasSubstr("friendlyName: ann (signing)"));
  EXPECT_THAT(certs.output, HasSubstr("friendlyName: ann (encryption, key 1)"));
  EXPECT_THAT(certs.output, HasSubstr("subject=O = kmsd test, CN = kmsd test CA"));

  // Both certificates are v3, chain to the CA and carry their profile's usages.
  auto verify =
      sh("openssl verify -CAfile " + shell_quote(dir() / "ca.pem") + " " +
         shell_quote(dir() / "sign-ann.p12.pem") + " " + shell_quote(dir() / "enc-ann.p12.pem"));
  EXPECT_EQ(verify.status, 0) << verify.output;
  auto sign = sh("openssl x509 -in " + shell_quote(dir() / "sign-ann.p12.pem") + " -noout -text");
  EXPECT_THAT(sign.output, HasSubstr("Version: 3 (0x2)"));
  EXPECT_THAT(sign.output, HasSubstr("Digital Signature, Non Repudiation"));
  EXPECT_THAT(sign.output, HasSubstr("E-mail Protection"));
  EXPECT_THAT(sign.output, HasSubstr("email:ann@example.com"));
  EXPECT_THAT(sign.output, HasSubstr("URI:" + public_url() + "/crl"));
  EXPECT_THAT(sign.output, HasSubstr("OCSP - URI:" + public_url() + "/ocsp"));
  EXPECT_THAT(sign.output, HasSubstr("CN = User ann"));
  auto enc = sh("openssl x509 -in " + shell_quote(dir() / "enc-ann.p12.pem") + " -noout -text");
  EXPECT_THAT(enc.output, HasSubstr("Version: 3 (0x2)"));
  EXPECT_THAT(enc.output, HasSubstr("Key Agreement"));
  EXPECT_THAT(enc.output, Not(HasSubstr("Digital Signature")));
  EXPECT_THAT(enc.output, HasSubstr("E-mail Protection"));

  // Mail encrypted to the encryption certificate opens with the key from the PKCS#12.
  encrypt_to("enc-ann.p12.pem", "the quarterly figures\n", "msg.p7m");
  EXPECT_EQ(decrypt_with_any("msg.p7m", "ann", 2), "the quarterly figures\n");

  // The token was spent: a second enrollment with it is refused and writes nothing.
  auto again = enroll("ann", token, "ann-again.p12");
  EXPECT_NE(again.status, 0);
  EXPECT_THAT(again.output, HasSubstr("used"));
  EXPECT_FALSE(fs::exists(dir() / "ann-again.p12"));
  auto show = api("GET", "/v1/users/ann");
  EXPECT_EQ(show.j()["user"]["state"], "active") << show.body;
  EXPECT_EQ(show.j()["key_history_depth"], 1);
}

TEST_F(EnrollTest, AWrongTokenIsRefusedAndCountedAndTheRightOneStillWorks) {
  boot();
  const std::string token = enable_token("bob");
  auto wrong = enroll("bob", "0000-0000-0000-0000-0000-0000", "bob-wrong.p12");
  EXPECT_EQ(wrong.status, 4) << wrong.output;  // refused: wrong secret
  EXPECT_THAT(wrong.output, HasSubstr("not valid"));
  EXPECT_FALSE(fs::exists(dir() / "bob-wrong.p12"));
  // An unknown user gets the very same sentence: user ids cannot be probed.
  auto unknown = enroll("nobody", "0000-0000-0000-0000-0000-0000", "nobody.p12");
  EXPECT_EQ(unknown.status, 4);
  EXPECT_EQ(unknown.output, wrong.output);
  auto show = api("GET", "/v1/users/bob");
  EXPECT_EQ(show.j()["token_status"]["failed_attempts"], 1) << show.body;
  EXPECT_EQ(show.j()["user"]["state"], "enabled");
  // Typed in lower case without hyphens, the right token is still the token.
  std::string typed;
  for (char c : token)
    if (c != '-') typed += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  auto ok = enroll("bob", typed, "bob.p12");
  EXPECT_EQ(ok.status, 0) << ok.output;
}

// Q198709: a user revoked before ever enrolling is not stuck; enabled again, they enroll.
TEST_F(EnrollTest, Q198709RevokedBeforeEnrollingIsEnabledAgainAndEnrolls) {
  boot();
  const std::string first = enable_token("carl");
  auto revoke = api("POST", "/v1/users/carl/revoke", json::object());
  ASSERT_EQ(revoke.status, 200) << revoke.body;
  EXPECT_EQ(api("GET", "/v1/users/carl").j()["user"]["state"], "revoked");
  // The voided token no longer enrolls.
  EXPECT_NE(enroll("carl", first, "carl-old.p12").status, 0);
  const std::string second = enable_token("carl");
  EXPECT_NE(second, first);
  auto r = enroll("carl", second, "carl.p12");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(api("GET", "/v1/users/carl").j()["user"]["state"], "active");
}

TEST_F(EnrollTest, V1IsRefusedWhileThePolicyIsV3OnlyAndIssuedAfterItAllowsV1AndSighup) {
  boot();
  const std::string token = enable_token("dora");
  auto refused = enroll("dora", token, "dora-v1.p12", " --x509-version 1");
  EXPECT_EQ(refused.status, 2) << refused.output;  // 400: the request is not acceptable
  EXPECT_THAT(refused.output, HasSubstr("X.509 v1 certificates are disabled by policy"));
  EXPECT_FALSE(fs::exists(dir() / "dora-v1.p12"));
  // Refused by policy before the token was spent or counted.
  auto show = api("GET", "/v1/users/dora");
  EXPECT_EQ(show.j()["token_status"]["status"], "pending") << show.body;
  EXPECT_EQ(show.j()["token_status"]["failed_attempts"], 0);

  // The administrator allows v1 (a v1 certificate has no extensions, so the profiles' usage
  // lists must be empty) and reloads.
  write_config("file",
               "[policy]\nx509_versions = [1, 3]\n"
               "[policy.signing]\nkey_usage = []\nextended_key_usage = []\n"
               "[policy.encryption]\nkey_usage = []\nextended_key_usage = []\n");
  ASSERT_EQ(::kill(pid_, SIGHUP), 0);
  for (int i = 0; i < 100 && log_text().find("configuration reloaded") == std::string::npos; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  ASSERT_THAT(log_text(), HasSubstr("configuration reloaded"));
  auto issued = enroll("dora", token, "dora.p12", " --x509-version 1");
  ASSERT_EQ(issued.status, 0) << issued.output;
  for (const char* which : {"sign-dora.p12.pem", "enc-dora.p12.pem"}) {
    auto text = sh("openssl x509 -in " + shell_quote(dir() / which) + " -noout -text");
    EXPECT_THAT(text.output, HasSubstr("Version: 1 (0x0)")) << which;
    EXPECT_THAT(text.output, Not(HasSubstr("X509v3 extensions"))) << which;
  }
}

TEST_F(EnrollTest, RenewalRollsTheKeyAndRecoveryHandsBackTheWholeHistory) {
  boot();
  ASSERT_EQ(enroll("erin", enable_token("erin"), "erin1.p12").status, 0);
  encrypt_to("enc-erin1.p12.pem", "from the first year\n", "old.p7m");

  // Renewal with mutual TLS as the holder of the current signing certificate: a new key.
  auto renew = kmsctl("renew --p12 " + shell_quote(dir() / "erin1.p12") + " --passphrase-file " +
                      shell_quote(dir() / "user.pass") + " --out " +
                      shell_quote(dir() / "erin2.p12") + user_options());
  ASSERT_EQ(renew.status, 0) << renew.output << log_text();
  save_certs(renew.output, "erin2.p12");
  EXPECT_NE(serial_of("enc-erin1.p12.pem"), serial_of("enc-erin2.p12.pem"));
  encrypt_to("enc-erin2.p12.pem", "from the second year\n", "new.p7m");
  ASSERT_EQ(split_keys("erin2.p12", "erin2"), 2);
  EXPECT_EQ(decrypt_with_any("new.p7m", "erin2", 2), "from the second year\n");
  EXPECT_EQ(decrypt_with_any("old.p7m", "erin2", 2), "");  // the renewal gave the new key only
  EXPECT_EQ(api("GET", "/v1/users/erin").j()["key_history_depth"], 2);

  // The user loses everything; the administrator recovers and hands out a recovery token.
  auto recover = api("POST", "/v1/users/erin/recover", json::object());
  ASSERT_EQ(recover.status, 200) << recover.body;
  auto reissue = api("POST", "/v1/users/erin/reissue", json::object());
  ASSERT_EQ(reissue.status, 200) << reissue.body;
  auto r = enroll("erin", reissue.j()["token"], "erin3.p12");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("\"recovered\": true"));
  // Signing key + three escrowed keys (year one, year two, and the new one).
  ASSERT_EQ(split_keys("erin3.p12", "erin3"), 4);
  EXPECT_EQ(decrypt_with_any("old.p7m", "erin3", 4), "from the first year\n");
  EXPECT_EQ(decrypt_with_any("new.p7m", "erin3", 4), "from the second year\n");
}

// The certificate-services model: an administrator with the recovery role exports a user's
// whole key history to a PKCS#12, only after a second administrator approves, only once, and
// nobody else (not even an admin) can ask for or collect it.
TEST_F(EnrollTest, ARecoveryAdministratorExportsTheHistoryOnlyWhenApprovedAndOnlyOnce) {
  boot();
  ASSERT_EQ(enroll("gina", enable_token("gina"), "gina1.p12").status, 0);
  encrypt_to("enc-gina1.p12.pem", "first key\n", "old.p7m");
  auto renew = kmsctl("renew --p12 " + shell_quote(dir() / "gina1.p12") + " --passphrase-file " +
                      shell_quote(dir() / "user.pass") + " --out " +
                      shell_quote(dir() / "gina2.p12") + user_options());
  ASSERT_EQ(renew.status, 0) << renew.output;
  save_certs(renew.output, "gina2.p12");
  encrypt_to("enc-gina2.p12.pem", "second key\n", "new.p7m");

  auto add =
      kmsctl("admin add rita --role recovery --out " + shell_quote(dir() / "rita.p12") +
             " --new-passphrase-file " + shell_quote(dir() / "user.pass") + kmsctl_admin_options());
  ASSERT_EQ(add.status, 0) << add.output;
  const std::string rita = " --server https://localhost:" + std::to_string(admin_port_) +
                           " --p12 " + shell_quote(dir() / "rita.p12") + " --ca " +
                           shell_quote(dir() / "ca.pem") + " --passphrase-file " +
                           shell_quote(dir() / "user.pass");

  // An administrator may do much to users, but not take their keys.
  auto by_admin = api("POST", "/v1/users/gina/export", json::object());
  EXPECT_EQ(by_admin.status, 403) << by_admin.body;
  // The recovery role can do nothing else.
  EXPECT_EQ(kmsctl("user enable zed --email zed@example.com --name Zed" + rita).status, 4);
  // Nothing to export for a user who never enrolled; no request is made.
  ASSERT_EQ(enable("hal", "Hal").status, 201);
  auto nothing = kmsctl("user export-keys hal" + rita);
  EXPECT_NE(nothing.status, 0);
  EXPECT_THAT(nothing.output, HasSubstr("no escrowed key"));

  auto asked = kmsctl("user export-keys gina -o json" + rita);
  ASSERT_EQ(asked.status, 0) << asked.output;
  auto j = json::parse(asked.output.substr(asked.output.find('{')), nullptr, false);
  ASSERT_TRUE(j.is_object()) << asked.output;
  EXPECT_EQ(j["state"], "pending");
  EXPECT_EQ(j["required"], 2);  // the default for key_export
  const std::string id = j["request_id"];
  const std::string collect = "user collect-keys " + id + " --out " +
                              shell_quote(dir() / "gina-export.p12") + " --new-passphrase-file " +
                              shell_quote(dir() / "user.pass") + rita;

  auto early = kmsctl(collect);
  EXPECT_EQ(early.status, 3) << early.output;
  EXPECT_THAT(early.output, HasSubstr("still waits for approvals"));
  EXPECT_FALSE(fs::exists(dir() / "gina-export.p12"));

  auto approve = api("POST", "/v1/requests/" + id + "/approve", json::object());
  ASSERT_EQ(approve.status, 200) << approve.body;
  EXPECT_EQ(approve.j()["state"], "executed");
  EXPECT_EQ(api("POST", "/v1/requests/" + id + "/collect", json::object()).status, 403);

  auto got = kmsctl(collect);
  ASSERT_EQ(got.status, 0) << got.output << log_text();
  EXPECT_THAT(got.output, HasSubstr("2 escrowed key(s) of gina"));
  EXPECT_EQ(fs::status(dir() / "gina-export.p12").permissions() & fs::perms::all,
            fs::perms::owner_read | fs::perms::owner_write);
  ASSERT_EQ(split_keys("gina-export.p12", "exp"), 2);
  EXPECT_EQ(decrypt_with_any("old.p7m", "exp", 2), "first key\n");
  EXPECT_EQ(decrypt_with_any("new.p7m", "exp", 2), "second key\n");

  // Once only; the collection is audited, and the request's record holds no key.
  fs::remove(dir() / "gina-export.p12");
  auto again = kmsctl(collect);
  EXPECT_EQ(again.status, 3) << again.output;
  EXPECT_THAT(again.output, HasSubstr("already collected"));
  EXPECT_FALSE(fs::exists(dir() / "gina-export.p12"));
  auto sql = [&](const std::string& q) {
    return sh("sqlite3 " + shell_quote(db_path()) + " " + shell_quote(q)).output;
  };
  EXPECT_EQ(sql("SELECT count(*) FROM audit_log WHERE action = 'user.keys.export'"), "1\n");
  EXPECT_THAT(sql("SELECT result FROM approval_requests WHERE id = '" + id + "'"),
              HasSubstr("collected_at"));
  EXPECT_EQ(sh("grep -c 'PRIVATE KEY' " + shell_quote(db_path())).output, "0\n");
}

TEST_F(EnrollTest, WithoutTheApprovalsNoKeyLeavesTheDaemon) {
  boot("[approvals.required]\nrecover = 2\n");
  ASSERT_EQ(enroll("finn", enable_token("finn"), "finn.p12").status, 0);
  auto recover = api("POST", "/v1/users/finn/recover", json::object());
  ASSERT_EQ(recover.status, 202) << recover.body;
  EXPECT_EQ(recover.j()["approvals"], 1);
  EXPECT_EQ(recover.j()["required"], 2);
  // Still active: no recovery token can be issued, so no key history can be delivered.
  EXPECT_EQ(api("GET", "/v1/users/finn").j()["user"]["state"], "active");
  auto reissue = api("POST", "/v1/users/finn/reissue", json::object());
  EXPECT_EQ(reissue.status, 409) << reissue.body;
  EXPECT_FALSE(reissue.j().contains("token"));
  // The administrator approving their own request again does not reach k.
  auto self =
      api("POST", "/v1/requests/" + recover.j()["request_id"].get<std::string>() + "/approve",
          json::object());
  EXPECT_NE(self.status, 200) << self.body;
  EXPECT_EQ(api("GET", "/v1/users/finn").j()["user"]["state"], "active");
}

TEST_F(EnrollTest, RevocationIsVisibleAtOnceInOcspAndWithinSecondsInTheCrl) {
  boot();
  ASSERT_EQ(enroll("gus", enable_token("gus"), "gus.p12").status, 0);
  EXPECT_THAT(ocsp_status("sign-gus.p12.pem"), HasSubstr("sign-gus.p12.pem: good"));
  EXPECT_THAT(ocsp_status("sign-gus.p12.pem"), HasSubstr("Response verify OK"));

  auto revoke = api("POST", "/v1/users/gus/revoke", json{{"reason", 1}});
  ASSERT_EQ(revoke.status, 200) << revoke.body;
  auto status = ocsp_status("sign-gus.p12.pem");
  EXPECT_THAT(status, HasSubstr("sign-gus.p12.pem: revoked"));
  EXPECT_THAT(status, HasSubstr("Reason: keyCompromise"));
  EXPECT_THAT(ocsp_status("enc-gus.p12.pem"), HasSubstr("enc-gus.p12.pem: revoked"));

  const std::string serial = serial_of("sign-gus.p12.pem");
  std::string crl_text;
  for (int i = 0; i < 50; ++i) {
    auto r = sh("curl -s -m 5 -o " + shell_quote(dir() / "crl.der") + " " +
                shell_quote(public_url() + "/crl") + " && openssl crl -inform DER -in " +
                shell_quote(dir() / "crl.der") + " -noout -text -CAfile " +
                shell_quote(dir() / "ca.pem") + " 2>&1");
    crl_text = r.output;
    if (crl_text.find("Serial Number: " + serial) != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  EXPECT_THAT(crl_text, HasSubstr("verify OK")) << read_file(dir() / "crl.der") << log_text();
  EXPECT_THAT(crl_text, HasSubstr("Serial Number: " + serial));
  EXPECT_THAT(crl_text, HasSubstr("Key Compromise"));
}

// Every generated secret, in every form it is handled in, is absent from the database files
// and the (debug-level) log.
TEST_F(EnrollTest, NoKeyTokenOrPinReachesTheDatabaseOrTheLog) {
  boot();
  const std::string token = enable_token("hal");
  const std::string pending = enable_token("ivy");  // enabled, never enrolled
  ASSERT_EQ(enroll("hal", token, "hal.p12").status, 0);
  ASSERT_EQ(split_keys("hal.p12", "hal"), 2);
  std::vector<std::pair<std::string, std::string>> secrets;
  for (const auto& t : {token, pending}) {
    secrets.emplace_back("token", t);
    std::string bare;
    for (char c : t)
      if (c != '-') bare += c;
    secrets.emplace_back("token without hyphens", bare);
  }
  secrets.emplace_back("PIN", kUserPin);
  for (int i = 1; i <= 2; ++i) {
    const fs::path pem = dir() / ("hal-key" + std::to_string(i) + ".pem");
    auto der =
        sh("openssl pkey -in " + shell_quote(pem) + " -outform DER | od -An -tx1 | tr -d ' \\n'");
    ASSERT_EQ(der.status, 0);
    secrets.emplace_back("private key DER (hex)", der.output);
    // Every base64 line of the PEM body.
    std::istringstream lines(read_file(pem));
    for (std::string line; std::getline(lines, line);)
      if (line.size() > 40 && line.find("-----") == std::string::npos)
        secrets.emplace_back("private key PEM line", line);
    auto raw = sh("openssl pkey -in " + shell_quote(pem) + " -outform DER");
    secrets.emplace_back("private key DER", raw.output);
  }
  ASSERT_EQ(stop(), 0);  // checkpoints the WAL into the database file
  std::string haystack;
  for (const auto& entry : fs::directory_iterator(dir())) {
    const std::string name = entry.path().filename();
    if (name.rfind("kmsd.db", 0) == 0 || name == "kmsd.log") {
      std::string bytes = read_file(entry.path());
      haystack += bytes;
      // Hex too, so a key stored as hex text would be found as well.
      static const char* kHex = "0123456789abcdef";
      for (unsigned char c : bytes) {
        haystack += kHex[c >> 4];
        haystack += kHex[c & 15];
      }
    }
  }
  ASSERT_GT(haystack.size(), 10000u);
  for (const auto& [what, value] : secrets) {
    ASSERT_GE(value.size(), 8u) << what;
    EXPECT_EQ(haystack.find(value), std::string::npos) << what << " found in the database or log";
  }
}

}  // namespace
}  // namespace kmsd::testing

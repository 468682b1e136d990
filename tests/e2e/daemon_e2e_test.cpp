// kmsd end to end: init, the token's contents as pkcs11-tool sees them, sealed/unsealed over
// real HTTP, the unseal socket, the admin listener's mutual TLS, signals.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <chrono>
#include <fstream>
#include <iterator>
#include <regex>
#include <set>
#include <sstream>
#include <thread>

#include "tests/e2e/harness.hpp"

namespace kmsd::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

// Parses `pkcs11-tool --list-objects` into (type line, label, access flags) triples.
struct P11Object {
  std::string type;
  std::string label;
  std::set<std::string> access;
};

std::vector<P11Object> list_token_objects(const SoftHsmToken& token) {
  auto r = sh("pkcs11-tool --module " + std::string(kSoftHsmModule) + " --token-label " +
              shell_quote(token.label()) + " --login --pin " + kUserPin + " --list-objects");
  EXPECT_EQ(r.status, 0) << r.output;
  std::vector<P11Object> out;
  std::istringstream in(r.output);
  std::string line;
  while (std::getline(in, line)) {
    if (line.find(" Object;") != std::string::npos || line.rfind("Data object", 0) == 0) {
      out.push_back({line, "", {}});
    } else if (!out.empty()) {
      std::smatch m;
      if (std::regex_search(line, m, std::regex(R"(^\s+label:\s+(.*)$)"))) out.back().label = m[1];
      if (std::regex_search(line, m, std::regex(R"(^\s+Access:\s+(.*)$)"))) {
        std::string flags = m[1];
        std::regex sep(",\\s*");
        for (std::sregex_token_iterator it(flags.begin(), flags.end(), sep, -1), end; it != end;
             ++it)
          out.back().access.insert(*it);
      }
    }
  }
  return out;
}

TEST_F(KmsdTest, InitLeavesOnlyIntendedNonExtractableKeysOnTheToken) {
  write_config();
  auto r = init();
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("KMS initialized"));

  auto objects = list_token_objects(token());
  std::multiset<std::string> seen;
  for (const auto& o : objects) {
    seen.insert(o.label + "|" + o.type.substr(0, o.type.find(';')));
    if (o.type.rfind("Secret Key", 0) == 0 || o.type.rfind("Private Key", 0) == 0) {
      EXPECT_TRUE(o.access.count("sensitive")) << o.label;
      EXPECT_TRUE(o.access.count("always sensitive")) << o.label;
      EXPECT_TRUE(o.access.count("never extractable")) << o.label;
      EXPECT_FALSE(o.access.count("extractable")) << o.label << " is extractable";
    }
  }
  std::multiset<std::string> expected = {"kms-master-v1|Secret Key Object",
                                         "kms-ca|Private Key Object", "kms-ca|Public Key Object",
                                         "kms-audit|Secret Key Object"};
  EXPECT_EQ(seen, expected);

  // The admin PKCS#12 opens with the stock openssl client and holds a v3 client certificate.
  auto p12 = sh("openssl pkcs12 -in " + shell_quote(admin_p12()) + " -passin file:" +
                shell_quote(pass_path()) + " -nokeys -clcerts | openssl x509 -noout -text");
  ASSERT_EQ(p12.status, 0) << p12.output;
  EXPECT_THAT(p12.output, HasSubstr("Version: 3"));
  EXPECT_THAT(p12.output, HasSubstr("CN = alice"));
  EXPECT_THAT(p12.output, HasSubstr("TLS Web Client Authentication"));
  struct stat st {};
  ASSERT_EQ(::stat(admin_p12().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

TEST_F(KmsdTest, InitTwiceRefusesAndChangesNothing) {
  write_config();
  ASSERT_EQ(init().status, 0);
  auto before_db = sh("sqlite3 " + shell_quote(db_path()) + " .dump");
  auto before_objects = list_token_objects(token()).size();
  std::filesystem::remove(admin_p12());
  auto again = init();
  EXPECT_EQ(again.status, 3) << again.output;
  EXPECT_THAT(again.output, HasSubstr("refusing to initialize"));
  EXPECT_THAT(again.output, HasSubstr("nothing was changed"));
  EXPECT_FALSE(std::filesystem::exists(admin_p12()));
  EXPECT_EQ(sh("sqlite3 " + shell_quote(db_path()) + " .dump").output, before_db.output);
  EXPECT_EQ(list_token_objects(token()).size(), before_objects);
}

TEST_F(KmsdTest, StartsSealedAndUnsealsOverTheSocket) {
  write_config("prompt");
  ASSERT_EQ(init().status, 0);
  start();
  EXPECT_EQ(http_code("/healthz"), "200");
  auto ready = get_public("/readyz");
  EXPECT_THAT(ready.output, HasSubstr("\"state\":\"sealed\""));
  EXPECT_THAT(ready.output, HasSubstr("\n503"));

  // A wrong secret: refused, counted, logged, still sealed.
  std::ofstream(dir() / "wrong.secret") << "00000000\n";
  ::chmod((dir() / "wrong.secret").c_str(), 0600);
  auto bad = kmsctl("unseal --socket " + shell_quote(socket_path()) + " --secret-file " +
                    shell_quote(dir() / "wrong.secret"));
  EXPECT_EQ(bad.status, 4) << bad.output;
  EXPECT_THAT(bad.output, HasSubstr("rejected by the token"));
  EXPECT_EQ(http_code("/readyz"), "503");
  EXPECT_THAT(get_public("/readyz").output, HasSubstr("\"failed_unseal_attempts\":1"));
  EXPECT_THAT(log_text(), HasSubstr("unseal failed (attempt 1 since start)"));

  auto good = kmsctl("unseal --socket " + shell_quote(socket_path()) + " --secret-file " +
                     shell_quote(secret_path()));
  EXPECT_EQ(good.status, 0) << good.output;
  EXPECT_THAT(good.output, HasSubstr("unsealed"));
  EXPECT_EQ(http_code("/readyz"), "200");

  // The CA certificate: X.509 v3, a CA, and its self-signature verifies.
  auto pem = sh("curl -s -m 5 " + shell_quote(public_url() + "/ca.pem") + " -o " +
                shell_quote(dir() / "ca.pem"));
  ASSERT_EQ(pem.status, 0);
  auto text = sh("openssl x509 -in " + shell_quote(dir() / "ca.pem") + " -noout -text");
  EXPECT_THAT(text.output, HasSubstr("Version: 3 (0x2)"));
  EXPECT_THAT(text.output, HasSubstr("CA:TRUE"));
  EXPECT_THAT(text.output, HasSubstr("Certificate Sign, CRL Sign"));
  auto verify = sh("openssl verify -CAfile " + shell_quote(dir() / "ca.pem") + " " +
                   shell_quote(dir() / "ca.pem"));
  EXPECT_EQ(verify.status, 0) << verify.output;

  // Secrets never reach the log.
  EXPECT_THAT(log_text(), Not(HasSubstr(kUserPin)));
  // kmsctl seal: the daemon forgets its login at once.
  auto sealed = kmsctl("seal --socket " + shell_quote(socket_path()));
  EXPECT_EQ(sealed.status, 0) << sealed.output;
  EXPECT_EQ(http_code("/readyz"), "503");
  EXPECT_EQ(stop(), 0);
  EXPECT_FALSE(std::filesystem::exists(socket_path()));
}

TEST_F(KmsdTest, FileSourceUnsealsAtStart) {
  write_config("file");
  ASSERT_EQ(init().status, 0);
  start();
  EXPECT_TRUE(wait_ready(200)) << log_text();
  EXPECT_THAT(log_text(), HasSubstr("development-only"));
}

TEST_F(KmsdTest, PromptSourceUnsealsFromTheTerminalWithoutEcho) {
  write_config("prompt");
  ASSERT_EQ(init().status, 0);
  start_on_terminal(kUserPin);
  EXPECT_TRUE(wait_ready(200)) << log_text();
  std::ifstream t(transcript_path());
  std::string transcript((std::istreambuf_iterator<char>(t)), std::istreambuf_iterator<char>());
  EXPECT_THAT(transcript, HasSubstr("kmsd startup secret:"));
  EXPECT_THAT(transcript, Not(HasSubstr(kUserPin)));  // typed without echo
}

TEST_F(KmsdTest, OneLogLinePerRequestWithoutTheQueryString) {
  write_config("file");
  ASSERT_EQ(init().status, 0);
  start();
  ASSERT_TRUE(wait_ready(200));
  EXPECT_EQ(http_code("/readyz?token=SHOULD-NOT-APPEAR"), "200");
  EXPECT_EQ(http_code("/missing"), "404");
  EXPECT_THAT(log_text(), HasSubstr("public GET /readyz 200"));
  EXPECT_THAT(log_text(), HasSubstr("public GET /missing 404"));
  EXPECT_THAT(log_text(), Not(HasSubstr("SHOULD-NOT-APPEAR")));
}

TEST_F(KmsdTest, RefusesAStoreNewerThanItUnderstands) {
  write_config("file");
  ASSERT_EQ(init().status, 0);
  ASSERT_EQ(
      sh("sqlite3 " + shell_quote(db_path()) + " 'UPDATE schema_version SET version = 99'").status,
      0);
  auto r = sh(shell_quote(kmsd_bin()) + " --config " + shell_quote(conf_path()));
  EXPECT_EQ(r.status, 1);
  EXPECT_THAT(log_text(), HasSubstr("schema version 99"));
  EXPECT_THAT(log_text(), HasSubstr("upgrade kmsd"));
}

TEST_F(KmsdTest, FileSourceRefusesAFileReadableByOthers) {
  write_config("file");
  ASSERT_EQ(init().status, 0);
  write_secret_file(kUserPin, 0640);
  start();
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  EXPECT_EQ(http_code("/readyz"), "503");
  EXPECT_THAT(log_text(), HasSubstr("has mode 0640"));
  EXPECT_THAT(log_text(), HasSubstr("chmod 600"));
}

TEST_F(KmsdTest, AdminListenerRequiresAnAdministratorCertificate) {
  boot();
  std::string curl =
      "curl -s -m 10 --cacert " + shell_quote(dir() / "ca.pem") + " -w '\\n%{http_code}' ";
  auto ok = sh(curl + "--cert-type P12 --cert " +
               shell_quote(admin_p12().string() + ":correct horse battery staple") + " " +
               shell_quote(admin_url() + "/v1/whoami"));
  EXPECT_THAT(ok.output, HasSubstr("\"name\":\"alice\""));
  EXPECT_THAT(ok.output, HasSubstr("\n200"));
  auto none = sh(curl + shell_quote(admin_url() + "/v1/whoami"));
  EXPECT_THAT(none.output, HasSubstr("\n401"));
  // A certificate from another CA is not an administrator.
  ASSERT_EQ(
      sh("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=mallory "
         "-keyout " +
         shell_quote(dir() / "m.key") + " -out " + shell_quote(dir() / "m.pem") + " -days 1")
          .status,
      0);
  auto other = sh(curl + "--cert " + shell_quote(dir() / "m.pem") + " --key " +
                  shell_quote(dir() / "m.key") + " " + shell_quote(admin_url() + "/v1/whoami"));
  EXPECT_THAT(other.output, HasSubstr("\n401"));
  EXPECT_THAT(other.output, HasSubstr("not accepted"));
  // kmsctl speaks the same mutual TLS.
  auto who = kmsctl("whoami" + kmsctl_admin_options());
  EXPECT_EQ(who.status, 0) << who.output;
  EXPECT_THAT(who.output, HasSubstr("alice (admin"));
  std::ofstream(dir() / "wrong.pass") << "nope\n";
  ::chmod((dir() / "wrong.pass").c_str(), 0600);
  auto wrong = kmsctl("whoami" + kmsctl_admin_options(dir() / "wrong.pass"));
  EXPECT_EQ(wrong.status, 4) << wrong.output;
  EXPECT_THAT(wrong.output, HasSubstr("wrong passphrase"));
  // The server certificate verifies against the KMS CA for the configured name.
  auto strict = sh("curl -s -m 10 --cacert " + shell_quote(dir() / "ca.pem") +
                   " -o /dev/null -w '%{ssl_verify_result}' https://localhost:" +
                   std::to_string(admin_port_) + "/v1/whoami");
  EXPECT_EQ(strict.output, "0");
}

TEST_F(KmsdTest, CheckConfigNamesLineAndKeyAndExitsNonZero) {
  write_config("file", "[bogus]\nkey = 1\n");
  auto r = sh(shell_quote(kmsd_bin()) + " --check-config " + shell_quote(conf_path()));
  EXPECT_EQ(r.status, 2);
  EXPECT_THAT(r.output, HasSubstr(conf_path().string() + ":"));
  EXPECT_THAT(r.output, HasSubstr("bogus"));
  // And the daemon refuses to start on it.
  auto d = sh(shell_quote(kmsd_bin()) + " --config " + shell_quote(conf_path()));
  EXPECT_EQ(d.status, 2);
  EXPECT_THAT(d.output, HasSubstr("will not start"));
}

TEST_F(KmsdTest, SighupWithABadFileKeepsTheConfigurationInForce) {
  write_config("file");
  ASSERT_EQ(init().status, 0);
  start();
  ASSERT_TRUE(wait_ready(200));
  { std::ofstream(conf_path(), std::ios::app) << "[server2]\nnope = true\n"; }
  ::kill(pid_, SIGHUP);
  // The problems are logged after the summary line: wait for the problem itself.
  for (int i = 0; i < 100 && log_text().find("server2") == std::string::npos; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_THAT(log_text(), HasSubstr("keeping the configuration in force"));
  EXPECT_THAT(log_text(), HasSubstr("server2"));
  EXPECT_EQ(http_code("/readyz"), "200");
  write_config("file");  // a good file is taken
  ::kill(pid_, SIGHUP);
  for (int i = 0; i < 100 && log_text().find("configuration reloaded") == std::string::npos; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_THAT(log_text(), HasSubstr("configuration reloaded"));
  EXPECT_EQ(stop(), 0);
}

TEST_F(KmsdTest, ExternalRootSignsTheCaRequestAndTheKmsServesUnderIt) {
  write_config("file");
  write_secret_file(kUserPin);
  auto d = [this](const char* f) { return shell_quote(dir() / f); };
  auto csr = kmsctl("init --config " + shell_quote(conf_path()) + " --csr " + d("ca.csr") +
                    " --pin-file " + shell_quote(secret_path()));
  ASSERT_EQ(csr.status, 0) << csr.output;
  EXPECT_THAT(csr.output, HasSubstr("--ca-cert"));
  auto req = sh("openssl req -in " + d("ca.csr") + " -noout -verify -text");
  ASSERT_EQ(req.status, 0) << req.output;
  EXPECT_THAT(req.output, HasSubstr("CA:TRUE"));

  // The external root, made with the stock openssl tool.
  ASSERT_EQ(
      sh("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
         "-subj '/CN=External Root' -days 30 -keyout " +
         d("root.key") + " -out " + d("root.pem") +
         " -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign")
          .status,
      0);
  ASSERT_EQ(
      sh("openssl x509 -req -in " + d("ca.csr") + " -CA " + d("root.pem") + " -CAkey " +
         d("root.key") + " -CAcreateserial -days 30 -copy_extensions copy -out " + d("kmsca.pem"))
          .status,
      0);

  // Not finished yet: the daemon says what is missing.
  auto early = sh(shell_quote(kmsd_bin()) + " --config " + shell_quote(conf_path()));
  EXPECT_EQ(early.status, 1);
  EXPECT_THAT(log_text(), HasSubstr("kmsctl init --ca-cert"));
  // A certificate for another key is refused.
  std::string finish = "init --config " + shell_quote(conf_path()) + " --pin-file " +
                       shell_quote(secret_path()) + " --admin alice --admin-p12 " +
                       shell_quote(admin_p12()) + " --passphrase-file " + shell_quote(pass_path());
  auto wrong = kmsctl(finish + " --ca-cert " + d("root.pem"));
  EXPECT_EQ(wrong.status, 2) << wrong.output;
  EXPECT_THAT(wrong.output, HasSubstr("does not certify the CA key on this token"));
  auto done = kmsctl(finish + " --ca-cert " + d("kmsca.pem"));
  ASSERT_EQ(done.status, 0) << done.output;

  start();
  ASSERT_TRUE(wait_ready(200)) << log_text();
  ASSERT_EQ(
      sh("curl -s -m 5 -o " + d("served.pem") + " " + shell_quote(public_url() + "/ca.pem")).status,
      0);
  EXPECT_EQ(sh("cmp " + d("served.pem") + " " + d("kmsca.pem")).status, 0);
  // A client trusting only the external root reaches the admin API, and the admin's
  // certificate (issued by the intermediate KMS CA) is accepted.
  auto who = sh("curl -s -m 10 --cacert " + d("root.pem") + " --cert-type P12 --cert " +
                shell_quote(admin_p12().string() + ":correct horse battery staple") + " " +
                shell_quote(admin_url() + "/v1/whoami"));
  EXPECT_THAT(who.output, HasSubstr("\"name\":\"alice\""));
}

TEST_F(KmsdTest, RefusesToStartOnAnUninitializedStore) {
  write_config("file");
  write_secret_file(kUserPin);
  auto r = sh(shell_quote(kmsd_bin()) + " --config " + shell_quote(conf_path()));
  EXPECT_EQ(r.status, 1);
  EXPECT_THAT(r.output + log_text(), HasSubstr("kmsctl init"));
}

}  // namespace
}  // namespace kmsd::testing

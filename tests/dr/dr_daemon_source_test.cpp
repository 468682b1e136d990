// kmsctl dr predecrypt with the running daemon as the key source, end to end: a kmsd on a
// SoftHSM token with users enrolled through the real API (RSA and P-256 keys, one renewal), a
// Maildir of messages to their current and past certificates plus plain, foreign and corrupted
// ones. The session needs an approved "dr" request (k = 2): before the approval nothing is
// decrypted; a custody certificate other than the approved one is refused; once approved the
// messages are staged through kmsd (no key leaves it), then reencrypt (PKCS#12 custody key)
// writes them to the users' new certificates, byte-identical; foreign/plain/corrupt ones stay
// untouched; no file written holds any plaintext; kmsd audited the session with its counts.
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/e2e/harness.hpp"

namespace kmsd::testing {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using ::testing::HasSubstr;

std::map<std::string, std::string> files_under(const fs::path& root) {
  std::map<std::string, std::string> out;
  std::error_code ec;
  for (const auto& e : fs::recursive_directory_iterator(root, ec))
    if (e.is_regular_file()) out[fs::relative(e.path(), root).string()] = read_file(e.path());
  return out;
}

json json_of(const std::string& output) {
  const auto brace = output.find('{');
  if (brace == std::string::npos) return json();
  return json::parse(output.substr(brace), nullptr, false);
}

class DrDaemonSourceTest : public KmsdTest {
 protected:
  fs::path keys() const { return dir() / "keys"; }
  fs::path store() const { return dir() / "mail"; }
  fs::path certs() const { return dir() / "certs"; }
  fs::path staging() const { return dir() / "staging"; }

  std::string user_options() const {
    return " --server https://localhost:" + std::to_string(admin_port_) + " --ca " +
           shell_quote(dir() / "ca.pem") + " --new-passphrase-file " +
           shell_quote(dir() / "user.pass") + " -o json";
  }

  void save_enc(const std::string& output, const fs::path& cert) {
    auto j = json_of(output);
    ASSERT_TRUE(j.is_object()) << output;
    write_private(cert, j["encryption_certificate"].get<std::string>());
  }

  // A self-signed RSA certificate and key (the custody pair, a stranger, a user's new key).
  void make_pair(const std::string& cn, const fs::path& key, const fs::path& cert) {
    ASSERT_EQ(
        sh("openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj " + shell_quote("/CN=" + cn) +
           " -keyout " + shell_quote(key) + " -out " + shell_quote(cert) + " 2>/dev/null")
            .status,
        0);
  }

  // The body of message N, and a message with it to CERT (openssl cms, S/MIME); with KEYID the
  // recipient is named by its subject key identifier only (-keyid), not issuer and serial.
  std::string body(int n) const {
    return "Content-Type: text/plain\r\n\r\nBoard minutes DAEMON-SRC-PLAINTEXT-" +
           std::to_string(n) + "-QZX\r\n";
  }
  std::string marker(int n) const { return "DAEMON-SRC-PLAINTEXT-" + std::to_string(n) + "-QZX"; }
  void encrypt_to(const fs::path& cert, const fs::path& out, int n, bool keyid = false) {
    write_private(dir() / "body.txt", body(n));
    auto r =
        sh("openssl cms -encrypt -binary -aes256 -in " + shell_quote(dir() / "body.txt") +
           " -out " + shell_quote(out) + " -recip " + shell_quote(cert) + (keyid ? " -keyid" : ""));
    ASSERT_EQ(r.status, 0) << r.output;
  }

  std::string predecrypt(const fs::path& custody, const std::string& request) {
    return "dr predecrypt --store " + shell_quote(store()) + " --staging " +
           shell_quote(staging()) + " --custody-cert " + shell_quote(custody) + " --server " +
           admin_url() + " --admin-p12 " + shell_quote(admin_p12()) + " --admin-passphrase-file " +
           shell_quote(pass_path()) + " --ca " + shell_quote(dir() / "ca.pem") +
           (request.empty() ? "" : " --request " + request) + " --threads 2 --no-progress -o json";
  }
};

TEST_F(DrDaemonSourceTest, ApprovedSessionStagesThroughKmsdToTheApprovedCustodyCertificateOnly) {
  const std::string approvals = "[approvals.required]\ndr = 2\n";
  boot(approvals + "[enrollment]\nencryption_key_type = \"rsa-2048\"\n");
  write_private(dir() / "user.pass", "user pass phrase\n");
  fs::create_directories(keys());
  fs::create_directories(certs());

  // Users 1-2 with RSA-2048 keys, 3-4 with P-256; user4 renews (a past key).
  std::vector<std::pair<std::string, fs::path>> to;  // user, certificate messages go to
  for (int i = 1; i <= 4; ++i) {
    const std::string id = "user" + std::to_string(i);
    if (i == 3) {
      ASSERT_EQ(stop(), 0);
      write_config("file", approvals + "[enrollment]\nencryption_key_type = \"ec-p256\"\n");
      start();
      ASSERT_TRUE(wait_ready(200)) << log_text();
    }
    auto en = enable(id, "User " + std::to_string(i));
    ASSERT_EQ(en.status, 201) << en.body;
    write_private(dir() / "token.txt", en.j().value("token", std::string()) + "\n");
    auto r = kmsctl("enroll --user " + id + " --token-file " + shell_quote(dir() / "token.txt") +
                    " --out " + shell_quote(keys() / (id + ".p12")) + user_options());
    ASSERT_EQ(r.status, 0) << r.output;
    save_enc(r.output, certs() / (id + ".1.pem"));
    to.emplace_back(id, certs() / (id + ".1.pem"));
    if (i == 4) {
      auto rn = kmsctl("renew --p12 " + shell_quote(keys() / (id + ".p12")) +
                       " --passphrase-file " + shell_quote(dir() / "user.pass") + " --out " +
                       shell_quote(keys() / (id + ".2.p12")) + user_options());
      ASSERT_EQ(rn.status, 0) << rn.output;
      save_enc(rn.output, certs() / (id + ".2.pem"));
      to.emplace_back(id, certs() / (id + ".2.pem"));
    }
  }
  // A second administrator who can approve.
  write_private(dir() / "pat.pass", "pat pass phrase\n");
  auto pat =
      kmsctl("admin add pat --role approver --out " + shell_quote(dir() / "pat.p12") +
             " --new-passphrase-file " + shell_quote(dir() / "pat.pass") + kmsctl_admin_options());
  ASSERT_EQ(pat.status, 0) << pat.output;

  // The Maildir: two messages per certificate, plus plain, corrupt and foreign ones.
  fs::create_directories(store() / "cur");
  fs::create_directories(store() / "new");
  fs::create_directories(store() / "tmp");
  std::map<std::string, std::pair<std::string, int>> sent;  // path -> user, message number
  int n = 0;
  for (const auto& [user, cert] : to)
    for (int k = 0; k < 2; ++k) {
      ++n;
      const std::string rel =
          std::string(n % 2 ? "cur" : "new") + "/" + std::to_string(n) + ".daemon:2,S";
      encrypt_to(cert, store() / rel, n, /*keyid=*/k == 1);  // each user's second: SKI only
      sent[rel] = {user, n};
    }
  const int encrypted = n;
  write_private(store() / "cur" / "plain:2,S", "From: a@example.org\nSubject: hi\n\nplain\n");
  write_private(store() / "cur" / "corrupt:2,S",
                "Content-Type: application/pkcs7-mime; smime-type=enveloped-data\n\n!!garbage\n");
  make_pair("stranger", dir() / "stranger.key", dir() / "stranger.pem");
  encrypt_to(dir() / "stranger.pem", store() / "new" / "foreign:2,S", 999);
  const auto store_before = files_under(store());

  make_pair("DR custody", dir() / "custody.key", dir() / "custody.pem");
  make_pair("Mallory custody", dir() / "mallory.key", dir() / "mallory.pem");

  // 1. Without --request: a request is made, and waits for the second approval.
  auto asked = kmsctl(predecrypt(dir() / "custody.pem", ""));
  ASSERT_EQ(asked.status, 0) << asked.output;
  auto aj = json_of(asked.output);
  ASSERT_TRUE(aj.is_object()) << asked.output;
  EXPECT_EQ(aj["state"], "pending");
  const std::string id = aj.value("request_id", std::string());
  ASSERT_FALSE(id.empty()) << asked.output;

  // 2. Not approved yet: the session does not open, nothing is decrypted.
  auto early = kmsctl(predecrypt(dir() / "custody.pem", id));
  EXPECT_EQ(early.status, 3) << early.output;
  EXPECT_THAT(early.output, HasSubstr("waits for approvals"));
  EXPECT_TRUE(!fs::exists(staging() / "packs") || files_under(staging() / "packs").empty());
  EXPECT_EQ(sql("SELECT count(*) FROM audit_log WHERE action LIKE 'dr.predecrypt.session%'"),
            "0\n");
  // Nor can the message route be used around kmsctl.
  auto direct = api("POST", "/v1/dr/predecrypt/" + id + "/close");
  EXPECT_EQ(direct.status, 409) << direct.body;

  // 3. The approver approves: executed.
  auto ok = kmsctl("request approve " + id + " --server " + admin_url() + " --p12 " +
                   shell_quote(dir() / "pat.p12") + " --ca " + shell_quote(dir() / "ca.pem") +
                   " --passphrase-file " + shell_quote(dir() / "pat.pass"));
  ASSERT_EQ(ok.status, 0) << ok.output;
  EXPECT_THAT(ok.output, HasSubstr("executed"));

  // 4. Another custody certificate than the approved one is refused.
  auto mallory = kmsctl(predecrypt(dir() / "mallory.pem", id));
  EXPECT_EQ(mallory.status, 4) << mallory.output;
  EXPECT_THAT(mallory.output, HasSubstr("is not the one request " + id + " was approved for"));
  EXPECT_TRUE(!fs::exists(staging() / "packs") || files_under(staging() / "packs").empty());
  // The approver may not use the requester's session either.
  auto by_pat = api(
      "POST", "/v1/dr/predecrypt/" + id + "/open",
      json{{"custody_certificate", read_file(dir() / "custody.pem")}},
      "--cert-type P12 --cert " + shell_quote((dir() / "pat.p12").string() + ":pat pass phrase"));
  EXPECT_EQ(by_pat.status, 403) << by_pat.body;

  // 5. The approved session: every encrypted message staged through kmsd.
  auto run = kmsctl(predecrypt(dir() / "custody.pem", id));
  ASSERT_EQ(run.status, 0) << run.output;
  auto rj = json_of(run.output);
  ASSERT_TRUE(rj.is_object()) << run.output;
  EXPECT_EQ(rj["total"], encrypted + 3);
  EXPECT_EQ(rj["this_run"]["staged"], encrypted) << run.output;
  EXPECT_EQ(rj["this_run"]["not-encrypted"], 1);
  EXPECT_EQ(rj["this_run"]["damaged"], 1);
  EXPECT_EQ(rj["this_run"]["unknown-recipient"], 1);
  EXPECT_EQ(rj["this_run"].count("failed"), 0u) << run.output;
  EXPECT_THAT(rj["audit"].get<std::string>(), HasSubstr("kmsd audited the session"));
  // Staged copies are to the custody certificate: its key opens them, a user's does not
  // matter here; the manifest names the right user for each.
  // Each staged record is cut from its pack at the offset its manifest row gives (after the
  // message's own header lines) and opened by `openssl cms -decrypt -inform DER`.
  auto where = sh("sqlite3 -separator ' ' " + shell_quote(staging() / "manifest.db") +
                  " \"SELECT path, pack, pack_offset, pack_length, header_length FROM messages "
                  "WHERE status = 'staged'\"");
  ASSERT_EQ(where.status, 0) << where.output;
  std::map<std::string, std::string> staged_der;  // path -> DER of its staged record
  {
    std::istringstream lines(where.output);
    std::string rel, pack;
    std::size_t offset = 0, length = 0, headers = 0;
    while (lines >> rel >> pack >> offset >> length >> headers) {
      const std::string bytes = read_file(staging() / "packs" / pack);
      ASSERT_LE(offset + length, bytes.size()) << rel;
      staged_der[rel] = bytes.substr(offset + headers, length - headers);
    }
  }
  EXPECT_EQ(staged_der.size(), sent.size()) << where.output;
  for (const auto& [rel, who] : sent) {
    write_private(dir() / "staged.der", staged_der[rel]);
    auto d =
        sh("openssl cms -decrypt -binary -inform DER -in " + shell_quote(dir() / "staged.der") +
           " -recip " + shell_quote(dir() / "custody.pem") + " -inkey " +
           shell_quote(dir() / "custody.key"));
    EXPECT_EQ(d.status, 0) << rel << d.output;
    EXPECT_EQ(d.output, body(who.second)) << rel;
  }
  fs::remove(dir() / "staged.der");
  auto users = sh("sqlite3 " + shell_quote(staging() / "manifest.db") +
                  " \"SELECT path || '=' || users FROM messages WHERE status = 'staged'\"");
  for (const auto& [rel, who] : sent)
    EXPECT_THAT(users.output, HasSubstr(rel + "=" + who.first + "\n"));

  // 6. A rerun (resume) rejoins the session and redoes nothing.
  auto again = kmsctl(predecrypt(dir() / "custody.pem", id));
  ASSERT_EQ(again.status, 0) << again.output;
  auto gj = json_of(again.output);
  EXPECT_EQ(gj["already_done"], encrypted + 2) << again.output;  // + not-encrypted, damaged
  EXPECT_EQ(gj["this_run"]["unknown-recipient"], 1);             // tried again, still unknown

  // 7. reencrypt to each user's new certificate: byte-identical content.
  fs::create_directories(dir() / "new");
  for (int i = 1; i <= 4; ++i) {
    const std::string u = "user" + std::to_string(i);
    make_pair(u, dir() / "new" / (u + ".key"), dir() / "new" / (u + ".pem"));
  }
  write_private(dir() / "custody.pass", "custody pass\n");
  ASSERT_EQ(sh("openssl pkcs12 -export -inkey " + shell_quote(dir() / "custody.key") + " -in " +
               shell_quote(dir() / "custody.pem") + " -out " + shell_quote(dir() / "custody.p12") +
               " -passout pass:'custody pass'")
                .status,
            0);
  fs::create_directories(dir() / "recipients");
  for (int i = 1; i <= 4; ++i) {
    const std::string u = "user" + std::to_string(i);
    fs::copy_file(dir() / "new" / (u + ".pem"), dir() / "recipients" / (u + ".pem"));
  }
  auto re =
      kmsctl("dr reencrypt --staging " + shell_quote(staging()) + " --out " +
             shell_quote(dir() / "out") + " --custody-cert " + shell_quote(dir() / "custody.pem") +
             " --custody-key " + shell_quote(dir() / "custody.p12") +
             " --custody-passphrase-file " + shell_quote(dir() / "custody.pass") +
             " --recipients " + shell_quote(dir() / "recipients") + " --no-progress -o json");
  ASSERT_EQ(re.status, 0) << re.output;
  auto ej = json_of(re.output);
  EXPECT_EQ(ej["this_run"]["reencrypted"], encrypted) << re.output;
  EXPECT_THAT(ej["audit"].get<std::string>(), HasSubstr("not in the KMS audit chain"));
  for (const auto& [rel, who] : sent) {
    auto d = sh("openssl cms -decrypt -binary -in " + shell_quote(dir() / "out" / rel) +
                " -recip " + shell_quote(dir() / "new" / (who.first + ".pem")) + " -inkey " +
                shell_quote(dir() / "new" / (who.first + ".key")));
    EXPECT_EQ(d.status, 0) << rel << d.output;
    EXPECT_EQ(d.output, body(who.second)) << rel;
  }
  // Foreign, plain and corrupt messages: untouched in the store, not staged, not written out.
  EXPECT_EQ(files_under(store()), store_before);
  for (const char* rel : {"cur/plain:2,S", "cur/corrupt:2,S", "new/foreign:2,S"}) {
    EXPECT_EQ(staged_der.count(rel), 0u) << rel;
    EXPECT_FALSE(fs::exists(dir() / "out" / rel)) << rel;
  }

  // 8. No plaintext in any file the pipeline wrote (staging, manifest, temporary files, out).
  for (const fs::path& scanned : {staging(), dir() / "out"})
    for (const auto& e : fs::recursive_directory_iterator(scanned)) {
      if (!e.is_regular_file()) continue;
      const std::string bytes = read_file(e.path());
      for (int m = 1; m <= encrypted; ++m)
        ASSERT_EQ(bytes.find(marker(m)), std::string::npos) << marker(m) << " in " << e.path();
      ASSERT_EQ(bytes.find(marker(999)), std::string::npos) << e.path();
    }

  // 9. kmsd's audit chain: the sessions opened and closed with their counts, and it verifies.
  EXPECT_EQ(sql("SELECT count(*) FROM audit_log WHERE action = 'dr.predecrypt.session.open'"),
            "2\n");
  EXPECT_EQ(sql("SELECT count(*) FROM audit_log WHERE action = 'dr.predecrypt.session.close'"),
            "2\n");
  EXPECT_THAT(sql("SELECT record FROM audit_log WHERE action = 'dr.predecrypt.session.close' "
                  "ORDER BY seq LIMIT 1"),
              HasSubstr("\"staged\":" + std::to_string(encrypted)));
  auto verify = api("GET", "/v1/audit/verify");
  EXPECT_EQ(verify.j()["ok"], true) << verify.body;
  // Closed: the session's keys are gone; a message now is refused.
  auto closed = api("POST", "/v1/dr/predecrypt/" + id + "/close");
  EXPECT_EQ(closed.status, 409) << closed.body;

  // 10. Throughput of the daemon source (printed, not asserted): 300 copies each of an RSA and
  // a P-256 message, in a store of their own.
  const fs::path bulk = dir() / "bulk";
  fs::create_directories(bulk / "cur");
  const std::string rsa_msg = read_file(store() / "cur" / "1.daemon:2,S");  // user1, RSA
  const std::string ec_msg = read_file(store() / "cur" / "5.daemon:2,S");   // user3, P-256
  const int kCopies = 300;
  for (int i = 0; i < kCopies; ++i) {
    write_private(bulk / "cur" / ("r" + std::to_string(i) + ":2,S"), rsa_msg);
    write_private(bulk / "cur" / ("e" + std::to_string(i) + ":2,S"), ec_msg);
  }
  std::string cmd = predecrypt(dir() / "custody.pem", id);
  cmd.replace(cmd.find(shell_quote(store())), shell_quote(store()).size(), shell_quote(bulk));
  cmd.replace(cmd.find(shell_quote(staging())), shell_quote(staging()).size(),
              shell_quote(dir() / "bulk-staging"));
  auto timed = kmsctl(cmd);
  ASSERT_EQ(timed.status, 0) << timed.output;
  auto tj = json_of(timed.output);
  EXPECT_EQ(tj["this_run"]["staged"], 2 * kCopies) << timed.output;
  std::cout << "daemon key source: " << tj["processed"] << " messages in " << tj["seconds"]
            << " s = " << tj["messages_per_second"] << " msg/s (half RSA-2048, half P-256)\n";
}

}  // namespace
}  // namespace kmsd::testing

// kmsctl dr drill end to end: a production kmsd on a SoftHSM token with 20 users enrolled
// through the real API (kmsctl enroll; some renewed, so they have a past encryption key), a
// Maildir of messages made by `openssl smime -encrypt` / `openssl cms -encrypt` to their current
// and past encryption certificates plus plain, foreign and corrupted ones; then the drill with
// the users' PKCS#12 files as the key source (the SECTOOL path: the old token is never opened).
// Checks: every message reported with the right status, byte-identical content under the new
// keys, production checksums unchanged (and recomputed here), no plaintext in any file the
// drill wrote, the audit records; then kmsctl dr finish refuses while a message waits and
// destroys the retired material when none does.
#include <sqlite3.h>

#include <fstream>
#include <map>
#include <regex>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/e2e/harness.hpp"

namespace kmsd::testing {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using ::testing::HasSubstr;

// Digest of every file under ROOT (path + bytes), as a map, for before/after comparisons.
std::map<std::string, std::string> files_under(const fs::path& root) {
  std::map<std::string, std::string> out;
  std::error_code ec;
  if (fs::is_regular_file(root, ec)) {
    out[root.filename().string()] = read_file(root);
    return out;
  }
  for (const auto& e : fs::recursive_directory_iterator(root, ec))
    if (e.is_regular_file()) out[fs::relative(e.path(), root).string()] = read_file(e.path());
  return out;
}

class DrillE2eTest : public KmsdTest {
 protected:
  fs::path keys() const { return dir() / "keys"; }
  fs::path store() const { return dir() / "mail"; }
  fs::path certs() const { return dir() / "certs"; }
  int smime_made = 0;  // messages made by openssl smime (the others by openssl cms)

  std::string user_options() const {
    return " --server https://localhost:" + std::to_string(admin_port_) + " --ca " +
           shell_quote(dir() / "ca.pem") + " --new-passphrase-file " +
           shell_quote(dir() / "user.pass") + " -o json";
  }

  // Saves the encryption certificate of a kmsctl enroll/renew JSON summary to CERT.
  void save_enc(const std::string& output, const fs::path& cert) {
    auto j = json::parse(output.substr(output.find('{')), nullptr, false);
    ASSERT_TRUE(j.is_object()) << output;
    write_private(cert, j["encryption_certificate"].get<std::string>());
  }

  // A message to CERT (openssl smime for an RSA certificate when SMIME, else openssl cms; both
  // S/MIME), with a unique plaintext marker.
  std::string encrypt_to(const fs::path& cert, const fs::path& out, int n, bool smime) {
    smime = smime &&
            sh("openssl x509 -noout -text -in " + shell_quote(cert) + " | grep -q rsaEncryption")
                    .status == 0;
    smime_made += smime ? 1 : 0;
    const std::string marker = "DRILL-E2E-PLAINTEXT-" + std::to_string(n) + "-QZX";
    write_private(dir() / "body.txt",
                  "Content-Type: text/plain\r\n\r\nQuarterly figures " + marker + "\r\n");
    const std::string cmd =
        smime ? "openssl smime -encrypt -binary -aes256 -in " + shell_quote(dir() / "body.txt") +
                    " -out " + shell_quote(out) + " -subject 'm" + std::to_string(n) + "' " +
                    shell_quote(cert)
              : "openssl cms -encrypt -binary -aes256 -in " + shell_quote(dir() / "body.txt") +
                    " -out " + shell_quote(out) + " -recip " + shell_quote(cert);
    auto r = sh(cmd);
    EXPECT_EQ(r.status, 0) << r.output;
    return marker;
  }
};

TEST_F(DrillE2eTest, TwentyUsersDrillReadsBackEveryMessageAndLeavesProductionUntouched) {
  // Users 1-10 get RSA-2048 encryption keys (openssl smime can encrypt to those), then kmsd is
  // restarted with P-256 keys for users 11-20 and every renewal.
  const std::string rsa = "[enrollment]\nencryption_key_type = \"rsa-2048\"\n";
  const std::string ec = "[enrollment]\nencryption_key_type = \"ec-p256\"\n";
  boot(rsa);
  write_private(dir() / "user.pass", "user pass phrase\n");
  fs::create_directories(keys());
  fs::create_directories(certs());

  // 20 users enabled and enrolled through the API; every fourth renews (a past key).
  const int kUsers = 20;
  std::vector<std::string> users;
  for (int i = 1; i <= kUsers; ++i) {
    const std::string id = "user" + std::to_string(i);
    users.push_back(id);
    if (i == kUsers / 2 + 1) {
      ASSERT_EQ(stop(), 0);
      write_config("file", ec);
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
    if (i % 4 == 0) {
      auto rn = kmsctl("renew --p12 " + shell_quote(keys() / (id + ".p12")) +
                       " --passphrase-file " + shell_quote(dir() / "user.pass") + " --out " +
                       shell_quote(keys() / (id + ".2.p12")) + user_options());
      ASSERT_EQ(rn.status, 0) << rn.output;
      save_enc(rn.output, certs() / (id + ".2.pem"));
    }
  }
  ASSERT_EQ(stop(), 0);

  // The Maildir: to current and past certificates, S/MIME by smime and by cms.
  fs::create_directories(store() / "cur");
  fs::create_directories(store() / "new");
  fs::create_directories(store() / "tmp");
  std::vector<std::string> markers;
  int n = 0;
  for (int i = 1; i <= kUsers; ++i) {
    const std::string id = users[static_cast<std::size_t>(i - 1)];
    for (int k = 1; k <= (i % 4 == 0 ? 2 : 1); ++k) {
      ++n;
      markers.push_back(encrypt_to(
          certs() / (id + "." + std::to_string(k) + ".pem"),
          store() / (n % 2 ? "cur" : "new") / (std::to_string(n) + ".drill:2,S"), n, n % 2 == 0));
    }
  }
  const int encrypted = n;
  EXPECT_GE(smime_made, 3);
  EXPECT_GE(encrypted - smime_made, 10);
  write_private(store() / "cur" / "plain:2,S", "From: a@example.org\nSubject: hi\n\nplain\n");
  write_private(store() / "cur" / "corrupt:2,S",
                "Content-Type: application/pkcs7-mime; smime-type=enveloped-data\n\n!!garbage\n");
  ASSERT_EQ(sh("openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=stranger -keyout " +
               shell_quote(dir() / "stranger.key") + " -out " +
               shell_quote(dir() / "stranger.pem") + " 2>/dev/null")
                .status,
            0);
  markers.push_back(encrypt_to(dir() / "stranger.pem", store() / "new" / "foreign:2,S", 999, true));

  const auto store_before = files_under(store());
  const auto db_before = files_under(db_path());
  const auto token_before = files_under(token().token_dir());

  // The drill, with the token directory checksummed too, and the work directory kept to scan.
  const fs::path work = dir() / "drill-work";
  const fs::path report = dir() / "report";
  auto r = kmsctl("dr drill --store " + shell_quote(store()) + " --db " + shell_quote(db_path()) +
                  " --keys " + shell_quote(keys()) + " --passphrase-file " +
                  shell_quote(dir() / "user.pass") + " --token-dir " +
                  shell_quote(token().token_dir()) + " --report " + shell_quote(report) +
                  " --work " + shell_quote(work) + " --keep --no-progress");
  ASSERT_EQ(r.status, 0) << r.output << read_file(report / "drill.md");
  EXPECT_THAT(r.output, HasSubstr("DR drill PASSED"));
  auto j = json::parse(read_file(report / "drill.json"), nullptr, false);
  ASSERT_TRUE(j.is_object()) << read_file(report / "drill.json");

  EXPECT_EQ(j["result"], "PASSED");
  EXPECT_EQ(j["messages"]["by_status"]["staged"], encrypted);
  EXPECT_EQ(j["messages"]["by_status"]["not-encrypted"], 1);
  EXPECT_EQ(j["messages"]["by_status"]["damaged"], 1);
  EXPECT_EQ(j["messages"]["by_status"]["unknown-recipient"], 1);
  EXPECT_EQ(j["messages"]["reencrypted"], encrypted);
  EXPECT_EQ(j["verify"]["checked"], encrypted);
  EXPECT_EQ(j["verify"]["identical"], encrypted);
  EXPECT_EQ(j["users"]["old"], kUsers);
  EXPECT_EQ(j["users"]["issued"], kUsers);
  EXPECT_EQ(j["users"]["enrolled"], kUsers);
  EXPECT_EQ(j["retired_keys"], kUsers + kUsers / 4);
  EXPECT_TRUE(j["failures"].empty()) << j["failures"].dump();
  // Old and new CA: the old one is the production kmsd's (ca.pem), the new one differs.
  auto fp =
      sh("openssl x509 -in " + shell_quote(dir() / "ca.pem") + " -noout -fingerprint -sha256");
  std::string old_fp = fp.output.substr(fp.output.find('=') + 1);
  old_fp.erase(old_fp.find_last_not_of("\n") + 1);
  std::transform(old_fp.begin(), old_fp.end(), old_fp.begin(), ::tolower);
  EXPECT_EQ(j["ca"]["old_sha256"], old_fp);
  EXPECT_NE(j["ca"]["new_sha256"], old_fp);
  // Production: the report's checksums agree, and so does a byte comparison done here.
  EXPECT_TRUE(j["checksums"]["unchanged"].get<bool>());
  ASSERT_EQ(j["checksums"]["items"].size(), 3u);
  for (const auto& c : j["checksums"]["items"]) EXPECT_EQ(c["before"], c["after"]) << c.dump();
  EXPECT_EQ(files_under(store()), store_before);
  EXPECT_EQ(files_under(db_path()), db_before);
  EXPECT_EQ(files_under(token().token_dir()), token_before);
  // Audit: each DR step, every batch and every enrollment is in the new KMS's chain.
  EXPECT_TRUE(j["audit"]["chain_verified"].get<bool>());
  EXPECT_EQ(j["audit"]["by_action"]["dr.reinstall.approved"], 1);
  EXPECT_EQ(j["audit"]["by_action"]["dr.reinstall"], 1);
  EXPECT_EQ(j["audit"]["by_action"]["user.enroll"], kUsers);
  EXPECT_GE(j["audit"]["by_action"]["user.bulk_enable"], 1);
  for (const char* f : {"drill.md", "drill.html"}) EXPECT_FALSE(read_file(report / f).empty()) << f;
  EXPECT_THAT(read_file(report / "drill.md"), HasSubstr("Unchanged: **yes**"));
  // The bulk-enable result file of reinstall: mode 0600, one issued line per user.
  EXPECT_EQ(fs::status(work / "tokens.csv").permissions() & fs::perms::all,
            fs::perms::owner_read | fs::perms::owner_write);
  EXPECT_EQ(sh("grep -c ',issued,' " + shell_quote(work / "tokens.csv")).output, "20\n");

  // No plaintext anywhere the drill wrote: staging, out, temporary files, the report.
  for (const fs::path& scanned : {work, report}) {
    for (const auto& e : fs::recursive_directory_iterator(scanned)) {
      if (!e.is_regular_file()) continue;
      const std::string bytes = read_file(e.path());
      for (const auto& m : markers)
        ASSERT_EQ(bytes.find(m), std::string::npos) << m << " in " << e.path();
    }
  }

  // finish: refused while a staged message waits (one re-encryption forgotten), then done.
  const std::string softhsm = "SOFTHSM2_CONF=" + shell_quote(work / "hsm" / "softhsm2.conf") + " ";
  const std::string finish = softhsm + shell_quote(kmsctl_bin().string()) + " dr finish --config " +
                             shell_quote(work / "kmsd-new.toml") + " --staging " +
                             shell_quote(work / "staging") + " --admin-p12 " +
                             shell_quote(work / "admin.p12") + " --passphrase-file " +
                             shell_quote(work / "admin.pass") + " --old-store " +
                             shell_quote(work / "old.db") + " -o json";
  {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open((work / "staging" / "manifest.db").c_str(), &db), SQLITE_OK);
    ASSERT_EQ(sqlite3_exec(db,
                           "DELETE FROM reencrypted WHERE rowid = (SELECT min(rowid) FROM "
                           "reencrypted)",
                           nullptr, nullptr, nullptr),
              SQLITE_OK);
    sqlite3_close(db);
  }
  auto refused = sh(finish);
  EXPECT_EQ(refused.status, 3) << refused.output;
  EXPECT_THAT(refused.output, HasSubstr("1 staged message(s) are not re-encrypted yet"));
  // The staged messages are in the drill's pack files (mode 0600), one per predecrypt worker at
  // most, and no longer one file per message.
  EXPECT_FALSE(fs::exists(work / "staging" / "messages"));
  std::size_t packs = 0;
  for (const auto& e : fs::directory_iterator(work / "staging" / "packs")) {
    ++packs;
    EXPECT_EQ(e.status().permissions() & fs::perms::all,
              fs::perms::owner_read | fs::perms::owner_write)
        << e.path();
  }
  EXPECT_GE(packs, 1u);
  EXPECT_LT(packs, static_cast<std::size_t>(encrypted));
  // The drill's predecrypt run sealed its records under one staging key, stored in keys/.
  std::size_t kek_files = 0;
  for (const auto& e : fs::directory_iterator(work / "staging" / "keys")) {
    ++kek_files;
    EXPECT_EQ(e.path().extension(), ".der") << e.path();
    EXPECT_EQ(e.status().permissions() & fs::perms::all,
              fs::perms::owner_read | fs::perms::owner_write)
        << e.path();
  }
  EXPECT_EQ(kek_files, 1u);
  auto forced = sh(finish + " --force");
  ASSERT_EQ(forced.status, 0) << forced.output;
  auto fj = json::parse(forced.output.substr(forced.output.find('{')), nullptr, false);
  EXPECT_EQ(fj["custody_objects_destroyed"], 2);
  EXPECT_EQ(fj["staged_files_removed"], packs);
  EXPECT_EQ(fj["staging_keys_removed"], kek_files);
  EXPECT_FALSE(fs::exists(work / "staging" / "keys"));
  EXPECT_EQ(fj["old_keys_wiped"], kUsers + kUsers / 4);
  EXPECT_FALSE(fs::exists(work / "staging" / "packs"));
  auto left = sh("sqlite3 " + shell_quote(work / "old.db") +
                 " 'SELECT count(*) FROM key_history WHERE length(sealed_key) > 0'");
  EXPECT_EQ(left.output, "0\n") << left.output;
  // The custody key is gone from the token: reencrypt can no longer open it.
  auto again = sh(finish);
  ASSERT_EQ(again.status, 0) << again.output;
  EXPECT_THAT(again.output, HasSubstr("\"custody_objects_destroyed\": 0"));
}

}  // namespace
}  // namespace kmsd::testing

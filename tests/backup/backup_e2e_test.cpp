// kmsctl backup / restore end to end: a real kmsd on a SoftHSM token, users enrolled through
// the API (kmsctl enroll) while a backup is taken (concurrent enrollment load); the backup
// passes `restore --check` through kmsd and offline; one changed byte in the database image,
// in the signed manifest and in the framing each fails the check, which says where; a restore
// into a non-empty store is refused and changes nothing; a restore into an empty store starts
// kmsd with the users, certificates and escrowed keys (fetched again with `kmsctl keys`, the
// same private keys), and the audit chain verifies with the restore recorded. The backup holds
// no private key and no enrollment token in the clear.
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <thread>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/e2e/harness.hpp"

namespace kmsd::testing {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using ::testing::HasSubstr;

class BackupE2eTest : public KmsdTest {
 protected:
  fs::path keys() const { return dir() / "keys"; }

  std::string user_options() const {
    return " --server https://localhost:" + std::to_string(admin_port_) + " --ca " +
           shell_quote(dir() / "ca.pem") + " --new-passphrase-file " +
           shell_quote(dir() / "user.pass") + " -o json";
  }

  // Enables ID and enrolls it with kmsctl; the one-time token is returned (for the scan).
  std::string enroll_user(const std::string& id, const std::string& token_file) {
    auto en = enable(id, "User " + id);
    EXPECT_EQ(en.status, 201) << en.body;
    const std::string token = en.j().value("token", std::string());
    write_private(token_file, token + "\n");
    auto r = kmsctl("enroll --user " + id + " --token-file " + shell_quote(token_file) + " --out " +
                    shell_quote(keys() / (id + ".p12")) + user_options());
    EXPECT_EQ(r.status, 0) << r.output;
    return token;
  }

  // The private keys in a PKCS#12, each as DER (hex), via openssl.
  std::vector<std::string> private_keys_hex(const fs::path& p12) {
    auto r = sh("openssl pkcs12 -in " + shell_quote(p12) + " -nocerts -nodes -passin file:" +
                shell_quote(dir() / "user.pass") + " 2>/dev/null");
    EXPECT_EQ(r.status, 0) << r.output;
    std::vector<std::string> out;
    std::size_t at = 0;
    const std::string begin = "-----BEGIN PRIVATE KEY-----";
    const std::string end = "-----END PRIVATE KEY-----";
    while ((at = r.output.find(begin, at)) != std::string::npos) {
      auto stop = r.output.find(end, at);
      if (stop == std::string::npos) break;
      write_private(dir() / "one.pem", r.output.substr(at, stop + end.size() - at) + "\n");
      auto der = sh("openssl pkey -in " + shell_quote(dir() / "one.pem") +
                    " -outform DER | od -An -v -tx1 | tr -d ' \\n'");
      EXPECT_EQ(der.status, 0) << der.output;
      out.push_back(der.output);
      at = stop;
    }
    return out;
  }

  static std::string flip_byte(const std::string& data, std::size_t at) {
    std::string out = data;
    out[at] = static_cast<char>(out[at] ^ 0x5a);
    return out;
  }

  // Offset of the database image in a backup file (format in daemon/backup/backup.hpp).
  static std::size_t image_offset(const std::string& file) {
    std::size_t n = 0;
    for (int i = 8; i < 12; ++i) n = (n << 8) | static_cast<unsigned char>(file[i]);
    return 12 + n + 8;
  }

  std::string offline(const std::string& args) {
    return "restore " + args + " --config " + shell_quote(conf_path());
  }
};

TEST_F(BackupE2eTest, BackupUnderLoadChecksLocatesChangesAndRestoresIntoAnEmptyStore) {
  boot();
  write_private(dir() / "user.pass", "user pass phrase\n");
  fs::create_directories(keys());

  // Users enrolled before the backup.
  std::vector<std::string> tokens;
  for (int i = 1; i <= 4; ++i)
    tokens.push_back(enroll_user("before" + std::to_string(i), dir() / "token-before.txt"));

  // Concurrent enrollment load while backups are taken.
  std::atomic<int> enrolled_during{0};
  std::atomic<bool> load_done{false};
  std::vector<std::string> load_tokens(8);
  std::thread load([&] {
    for (int i = 1; i <= 8; ++i) {
      load_tokens[static_cast<std::size_t>(i - 1)] =
          enroll_user("during" + std::to_string(i), dir() / "token-during.txt");
      ++enrolled_during;
    }
    load_done = true;
  });
  while (enrolled_during < 2) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const int at_start = enrolled_during.load();
  const fs::path bk = dir() / "kms.backup";
  auto t0 = std::chrono::steady_clock::now();
  auto b = kmsctl("backup --out " + shell_quote(bk) + kmsctl_admin_options());
  const double backup_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // More backups, back to back, for as long as the load runs: each must succeed and pass.
  std::vector<fs::path> more;
  while (!load_done) {
    more.push_back(dir() / ("kms-" + std::to_string(more.size() + 2) + ".backup"));
    auto bn =
        kmsctl("backup --out " + shell_quote(more.back()) + " -o json" + kmsctl_admin_options());
    EXPECT_EQ(bn.status, 0) << bn.output;
  }
  load.join();
  ASSERT_EQ(b.status, 0) << b.output << log_text();
  EXPECT_THAT(b.output, HasSubstr("Backup written to"));
  ASSERT_GE(more.size(), 2u);
  std::cout << "backup under load: " << backup_seconds << " s (kmsctl, TLS included), "
            << fs::file_size(bk) << " bytes; " << more.size()
            << " more backups while the other users enrolled\n";
  for (const auto& p : {more.front(), more.back()}) {
    auto c = kmsctl("restore --check " + shell_quote(p) + kmsctl_admin_options());
    EXPECT_EQ(c.status, 0) << c.output;
  }
  EXPECT_EQ((fs::status(bk).permissions() & fs::perms::all),
            fs::perms::owner_read | fs::perms::owner_write);
  // Never overwritten.
  auto again = kmsctl("backup --out " + shell_quote(bk) + kmsctl_admin_options());
  EXPECT_EQ(again.status, 3) << again.output;

  const std::string file = read_file(bk);
  ASSERT_GT(file.size(), 4096u);
  ASSERT_EQ(file.substr(0, 8), "KMSDBAK1");

  // No secret in the clear: no enrollment token (with or without hyphens), no PEM private key,
  // no escrowed or signing private key's DER.
  std::string hexfile;
  {
    auto r = sh("od -An -v -tx1 " + shell_quote(bk) + " | tr -d ' \\n'");
    ASSERT_EQ(r.status, 0);
    hexfile = r.output;
  }
  std::vector<std::string> all_tokens = tokens;
  all_tokens.insert(all_tokens.end(), load_tokens.begin(), load_tokens.end());
  for (auto t : all_tokens) {
    ASSERT_FALSE(t.empty());
    EXPECT_EQ(file.find(t), std::string::npos);
    t.erase(std::remove(t.begin(), t.end(), '-'), t.end());
    EXPECT_EQ(file.find(t), std::string::npos);
  }
  EXPECT_EQ(file.find("PRIVATE KEY"), std::string::npos);
  std::size_t scanned = 0;
  for (int i = 1; i <= 4; ++i) {
    for (const auto& der : private_keys_hex(keys() / ("before" + std::to_string(i) + ".p12"))) {
      ASSERT_GT(der.size(), 64u);
      // Byte-aligned: the hex of the file at even offsets.
      std::size_t at = 0;
      bool found = false;
      while ((at = hexfile.find(der, at)) != std::string::npos) {
        if (at % 2 == 0) found = true;
        ++at;
      }
      EXPECT_FALSE(found) << "a private key of before" << i << " is in the backup in the clear";
      ++scanned;
    }
  }
  EXPECT_EQ(scanned, 8u);  // signing + escrowed encryption key of each

  // restore --check through kmsd.
  auto chk = kmsctl("restore --check " + shell_quote(bk) + kmsctl_admin_options());
  ASSERT_EQ(chk.status, 0) << chk.output;
  EXPECT_THAT(chk.output, HasSubstr("passes the check"));
  auto chkj = kmsctl("restore --check " + shell_quote(bk) + " -o json" + kmsctl_admin_options());
  ASSERT_EQ(chkj.status, 0) << chkj.output;
  auto rep = json::parse(chkj.output, nullptr, false);
  ASSERT_TRUE(rep.is_object()) << chkj.output;
  EXPECT_TRUE(rep["ok"].get<bool>());
  const auto users_in_backup = rep["users"].get<int>();
  EXPECT_GE(users_in_backup, 4 + at_start);
  EXPECT_LE(users_in_backup, 4 + 8);
  // Every enrolled user has one escrowed key; enabled-but-not-enrolled users have a token.
  EXPECT_GE(rep["keys_opened"].get<int>(), 4 + at_start);
  EXPECT_GT(rep["audit_records"].get<int>(), 0);
  EXPECT_GE(rep["certificates"].get<int>(), 2 * (4 + at_start));

  // One changed byte in the image: the check fails and names the page, the byte range and the
  // table that owns it.
  const std::size_t img = image_offset(file);
  const std::size_t page_size = 4096;
  const std::size_t target_page = (file.size() - img) / page_size / 2 + 1;  // 1-based
  const std::size_t flipped_at = img + (target_page - 1) * page_size + 1000;
  write_private(dir() / "image-changed.backup", flip_byte(file, flipped_at));
  auto bad = kmsctl("restore --check " + shell_quote(dir() / "image-changed.backup") +
                    kmsctl_admin_options());
  EXPECT_EQ(bad.status, 1) << bad.output;
  EXPECT_THAT(bad.output, HasSubstr("FAILS the check"));
  EXPECT_THAT(bad.output, HasSubstr("SQLite page " + std::to_string(target_page)));
  const std::size_t first = img + (target_page - 1) * page_size;
  EXPECT_THAT(bad.output, HasSubstr("bytes " + std::to_string(first) + "-" +
                                    std::to_string(first + page_size - 1)));
  std::cout << "one byte changed at " << flipped_at << ":\n" << bad.output;

  // One changed byte in the signed manifest (the middle of the CMS structure).
  write_private(dir() / "manifest-changed.backup", flip_byte(file, 12 + (img - 20) / 2));
  auto badm = kmsctl("restore --check " + shell_quote(dir() / "manifest-changed.backup") +
                     kmsctl_admin_options());
  EXPECT_EQ(badm.status, 1) << badm.output;
  EXPECT_THAT(badm.output, HasSubstr("(the signed manifest)"));
  std::cout << "one byte changed in the manifest:\n" << badm.output;

  // One changed byte in the length of the manifest.
  write_private(dir() / "length-changed.backup", flip_byte(file, 10));
  auto badl = kmsctl("restore --check " + shell_quote(dir() / "length-changed.backup") +
                     kmsctl_admin_options());
  EXPECT_EQ(badl.status, 1) << badl.output;
  EXPECT_THAT(badl.output, HasSubstr("bytes 8-11"));
  EXPECT_THAT(badl.output, HasSubstr("length fields was changed"));

  // The checks and the backups are audited.
  auto exported = kmsctl("audit export" + kmsctl_admin_options());
  ASSERT_EQ(exported.status, 0) << exported.output;
  EXPECT_THAT(exported.output, HasSubstr("\"backup.create\""));
  EXPECT_THAT(exported.output, HasSubstr("\"backup.check\""));

  // Offline commands refuse while kmsd runs (two processes must not use the token at once).
  auto busy = kmsctl(offline("--check " + shell_quote(bk)));
  EXPECT_EQ(busy.status, 3) << busy.output;
  EXPECT_THAT(busy.output, HasSubstr("kmsd is running"));

  // Offline, kmsd stopped.
  ASSERT_EQ(stop(), 0);
  auto off = kmsctl(offline("--check " + shell_quote(bk)));
  ASSERT_EQ(off.status, 0) << off.output;
  EXPECT_THAT(off.output, HasSubstr("passes the check"));
  auto offbad = kmsctl(offline("--check " + shell_quote(dir() / "image-changed.backup")));
  EXPECT_EQ(offbad.status, 1) << offbad.output;
  EXPECT_THAT(offbad.output, HasSubstr("SQLite page " + std::to_string(target_page)));

  // Restore into the store in use: refused, nothing changed.
  const std::string db_before = read_file(db_path());
  auto refused = kmsctl(offline(shell_quote(bk)));
  EXPECT_EQ(refused.status, 3) << refused.output;
  EXPECT_THAT(refused.output, HasSubstr("only into an empty store"));
  EXPECT_EQ(read_file(db_path()), db_before);

  // A damaged backup is not restored into an empty store either.
  fs::create_directories(dir() / "old-store");
  for (const char* suffix : {"", "-wal", "-shm"}) {
    fs::path p(db_path().string() + suffix);
    if (fs::exists(p)) fs::rename(p, dir() / "old-store" / (std::string("kmsd.db") + suffix));
  }
  auto damaged = kmsctl(offline(shell_quote(dir() / "image-changed.backup")));
  EXPECT_EQ(damaged.status, 1) << damaged.output;
  EXPECT_FALSE(fs::exists(db_path()));

  // Restore into the empty store, then kmsd starts on it.
  t0 = std::chrono::steady_clock::now();
  auto restored = kmsctl(offline(shell_quote(bk)));
  const double restore_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_EQ(restored.status, 0) << restored.output;
  EXPECT_THAT(restored.output, HasSubstr("Restored into"));
  std::cout << "offline restore (check included): " << restore_seconds << " s\n";
  EXPECT_EQ((fs::status(db_path()).permissions() & fs::perms::all),
            fs::perms::owner_read | fs::perms::owner_write);
  for (const auto& e : fs::directory_iterator(dir()))
    EXPECT_EQ(e.path().filename().string().find(".restore-"), std::string::npos) << e.path();

  start();
  ASSERT_TRUE(wait_ready(200)) << log_text();
  for (int i = 1; i <= 4; ++i) {
    const std::string id = "before" + std::to_string(i);
    auto shown = api("GET", "/v1/users/" + id);
    ASSERT_EQ(shown.status, 200) << shown.body;
    EXPECT_EQ(shown.j()["user"].value("state", std::string()), "active") << shown.body;
    // The escrowed key comes back from the restored store (key delivery to the holder of the
    // signing certificate, mutual TLS with the user's PKCS#12): the same private key.
    auto k =
        sh("curl -s -m 60 --cacert " + shell_quote(dir() / "ca.pem") + " --cert-type P12 --cert " +
           shell_quote((keys() / (id + ".p12")).string() + ":user pass phrase") +
           " https://localhost:" + std::to_string(admin_port_) + "/enroll/v1/keys");
    ASSERT_EQ(k.status, 0) << k.output;
    auto kj = json::parse(k.output, nullptr, false);
    ASSERT_TRUE(kj.is_object() && kj.contains("keys")) << k.output;
    auto original = private_keys_hex(keys() / (id + ".p12"));
    ASSERT_EQ(kj["keys"].size(), 1u) << k.output;
    for (const auto& key : kj["keys"]) {
      write_private(dir() / "fetched.pem", key.value("private_key", std::string()));
      auto der = sh("openssl pkey -in " + shell_quote(dir() / "fetched.pem") +
                    " -outform DER | od -An -v -tx1 | tr -d ' \\n'");
      ASSERT_EQ(der.status, 0) << der.output;
      EXPECT_NE(std::find(original.begin(), original.end(), der.output), original.end())
          << "the escrowed key of " << id << " is not the one it was enrolled with";
    }
  }
  auto verify = kmsctl("audit verify" + kmsctl_admin_options());
  EXPECT_EQ(verify.status, 0) << verify.output;
  auto after = kmsctl("audit export" + kmsctl_admin_options());
  ASSERT_EQ(after.status, 0);
  EXPECT_THAT(after.output, HasSubstr("\"backup.restore\""));
  // A restored KMS keeps working: a new user enrolls.
  enroll_user("after1", dir() / "token-after.txt");
  ASSERT_EQ(stop(), 0);
}

// Figures for the README: backup size and time, and check time, for N bulk-enabled users (each
// with a sealed enrollment token that the check opens on the token); the backup and the check
// must pass, and the counts must be exact.
TEST_F(BackupE2eTest, TwoThousandUsersBackUpAndCheckWithEveryTokenOpened) {
  boot();
  // KMSD_BACKUP_USERS (a multiple of 1000) for larger figures by hand; 2000 in the suite.
  const char* env = std::getenv("KMSD_BACKUP_USERS");
  const int kUsers = env != nullptr && std::atoi(env) >= 1000 ? std::atoi(env) / 1000 * 1000 : 2000;
  for (int batch = 0; batch < kUsers / 1000; ++batch) {
    json list = json::array();
    for (int i = 1; i <= 1000; ++i) {
      const std::string id = "bulk" + std::to_string(batch * 1000 + i);
      list.push_back({{"id", id}, {"email", id + "@example.com"}, {"display_name", "User " + id}});
    }
    auto r =
        api("POST", "/v1/users/bulk", json{{"users", list}, {"job", "b" + std::to_string(batch)}});
    ASSERT_EQ(r.status, 200) << r.body.substr(0, 400);
  }
  const fs::path bk = dir() / "big.backup";
  auto t0 = std::chrono::steady_clock::now();
  auto b = kmsctl("backup --out " + shell_quote(bk) + kmsctl_admin_options());
  const double backup_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_EQ(b.status, 0) << b.output;
  ASSERT_EQ(stop(), 0);
  t0 = std::chrono::steady_clock::now();
  auto c = kmsctl("restore --check " + shell_quote(bk) + " -o json --config " +
                  shell_quote(conf_path()));
  const double check_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_EQ(c.status, 0) << c.output;
  auto j = json::parse(c.output, nullptr, false);
  ASSERT_TRUE(j.is_object()) << c.output;
  EXPECT_EQ(j["users"].get<int>(), kUsers);
  EXPECT_EQ(j["tokens_opened"].get<int>(), kUsers);
  EXPECT_EQ(j["keys_opened"].get<int>(), 0);
  std::cout << "FIGURES users=" << kUsers << " backup_bytes=" << fs::file_size(bk)
            << " backup_seconds=" << backup_seconds << " (kmsctl backup, TLS included)"
            << " offline_check_seconds=" << check_seconds << " (token login included)\n";
}

}  // namespace
}  // namespace kmsd::testing

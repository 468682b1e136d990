// kmsctl dr: the commands over the library, as an operator runs them; a predecrypt killed with
// SIGKILL in the middle resumes with nothing redone or lost.
#include <fcntl.h>
#include <signal.h>
#include <sqlite3.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <nlohmann/json.hpp>

#include "tests/dr/dr_fixture.hpp"

namespace kmsd::dr::fixture {
namespace {

// kmsctl itself: a predecrypt killed with SIGKILL in the middle, then resumed.
TEST_F(DrTest, KmsctlPredecryptKilledWithSigkillResumes) {
  const char* build = std::getenv("KMSD_BUILD_DIR");
  ASSERT_NE(build, nullptr);
  const fs::path kmsctl = fs::path(build) / "cli" / "kmsctl";
  add_encrypted(100);  // 600 messages
  add_others();
  const std::string pass_file = (tmp.path() / "keys.pass").string();
  std::vector<std::string> args = {kmsctl.string(),
                                   "dr",
                                   "predecrypt",
                                   "--store",
                                   store.string(),
                                   "--staging",
                                   staging.string(),
                                   "--keys",
                                   keys.string(),
                                   "--passphrase-file",
                                   pass_file,
                                   "--custody-cert",
                                   (work / "custody.pem").string(),
                                   "--threads",
                                   "2",
                                   "-o",
                                   "json"};
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    int devnull = ::open("/dev/null", O_WRONLY);
    ::dup2(devnull, 1);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  // Kill it once some rows are committed and before it ends.
  std::size_t seen = 0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < deadline) {
    sqlite3* db = nullptr;
    if (sqlite3_open_v2((staging / "manifest.db").c_str(), &db, SQLITE_OPEN_READONLY, nullptr) ==
        SQLITE_OK) {
      sqlite3_stmt* st = nullptr;
      if (sqlite3_prepare_v2(db, "SELECT COUNT(*) FROM messages", -1, &st, nullptr) == SQLITE_OK &&
          sqlite3_step(st) == SQLITE_ROW)
        seen = static_cast<std::size_t>(sqlite3_column_int64(st, 0));
      sqlite3_finalize(st);
    }
    sqlite3_close(db);
    if (seen >= 50) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  ::kill(pid, SIGKILL);
  int status = 0;
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFSIGNALED(status))
      << "kmsctl finished before it could be killed (" << seen << " rows seen)";
  auto killed = manifest_rows();
  ASSERT_GT(killed.size(), 0u);
  ASSERT_LT(killed.size(), expected.size());
  for (const auto& [path, r] : killed)
    if (r.status == kStaged) {
      EXPECT_EQ(open_staged(r), expected[path].plaintext) << path;
    }

  std::string log;
  std::string cmd;
  for (auto& a : args) cmd += "'" + a + "' ";
  ASSERT_EQ(run_command(cmd + " 2>/dev/null", &log), 0) << log;
  auto j = nlohmann::json::parse(log);
  const std::size_t retried = killed.count("Maildir/new/foreign.2") ? 1 : 0;
  EXPECT_EQ(j["already_done"].get<std::size_t>(), killed.size() - retried);
  EXPECT_EQ(j["already_done"].get<std::size_t>() + j["processed"].get<std::size_t>(),
            expected.size());
  auto rows = manifest_rows();
  ASSERT_EQ(rows.size(), expected.size());
  for (const auto& [path, e] : expected) EXPECT_EQ(rows[path].status, e.status) << path;
  for (const auto& [path, r] : killed) {  // recorded before the kill: not staged again
    if (r.status != kStaged) continue;
    EXPECT_EQ(rows[path].copy.pack, r.copy.pack) << path;
    EXPECT_EQ(rows[path].copy.offset, r.copy.offset) << path;
  }
  for (const auto& [path, r] : rows)
    if (r.status == kStaged) {
      EXPECT_EQ(open_staged(r), expected[path].plaintext) << path;
    }
  std::printf("killed after %zu of %zu messages were recorded; the rerun did the other %zu\n",
              killed.size(), expected.size(), j["processed"].get<std::size_t>());
  for (const auto& f : fs::recursive_directory_iterator(staging))
    EXPECT_EQ(f.path().filename().string().find(".dr-tmp-"), std::string::npos) << f.path();
  expect_no_plaintext_on_disk();
}

// The whole operator path with kmsctl: predecrypt, reencrypt for two users of three (exit 0, the
// third waits), then for all; json and table summaries; openssl reads every result.
TEST_F(DrTest, KmsctlReencryptsAsUsersEnroll) {
  const fs::path kmsctl = fs::path(std::getenv("KMSD_BUILD_DIR")) / "cli" / "kmsctl";
  add_encrypted(2);
  add_others();
  add_openssl_cli();
  const std::string k = "'" + kmsctl.string() + "' dr ";
  std::string log;
  ASSERT_EQ(run_command(k + "predecrypt --store '" + store.string() + "' --staging '" +
                            staging.string() + "' --keys '" + keys.string() +
                            "' --passphrase-file '" + (tmp.path() / "keys.pass").string() +
                            "' --custody-cert '" + (work / "custody.pem").string() + "'",
                        &log),
            0)
      << log;
  EXPECT_NE(log.find("staged 14"), std::string::npos) << log;
  EXPECT_NE(log.find("unknown-recipient  Maildir/new/foreign.2"), std::string::npos) << log;
  // The openssl command line alone opens the staging area: `openssl cms -decrypt` opens the
  // run's KEK file (keys/<run>.kek.der) with the custody key (the KEK goes to a pipe, never to a
  // file), and each staged record (its DER part, cut from the pack at the row's offset) with
  // that KEK (-secretkey, -secretkeyid = the run id).
  write_all(work / "custody.key", pem_key(custody_key.get()));
  const auto runs = kek_runs();
  ASSERT_EQ(runs.size(), 1u);
  const std::string run = *runs.begin();
  std::string kek_hex;
  ASSERT_EQ(run_command("openssl cms -decrypt -binary -inform DER -in '" +
                            (staging / "keys" / (run + ".kek.der")).string() + "' -recip '" +
                            (work / "custody.pem").string() + "' -inkey '" +
                            (work / "custody.key").string() + "' | od -An -v -tx1 | tr -d ' \\n'",
                        &kek_hex),
            0)
      << kek_hex;
  ASSERT_EQ(kek_hex, ossl::hex(kek_of_run(run).span()));
  const std::string run_hex =
      ossl::hex({reinterpret_cast<const std::uint8_t*>(run.data()), run.size()});
  for (const auto& [path, r] : manifest_rows()) {
    if (r.status != kStaged) continue;
    write_all(work / "staged.der", staged_der(r));
    const fs::path result = work / "staged.out";
    std::string ossl_log;
    ASSERT_EQ(run_command("openssl cms -decrypt -binary -inform DER -in '" +
                              (work / "staged.der").string() + "' -secretkey " + kek_hex +
                              " -secretkeyid " + run_hex + " -out '" + result.string() + "'",
                          &ossl_log),
              0)
        << path << ": " << ossl_log;
    EXPECT_EQ(read_all(result), expected[path].plaintext) << path;
    fs::remove(result);
    // The custody key alone opens no record: it opens the KEK file.
    ossl_log.clear();
    EXPECT_NE(
        run_command("openssl cms -decrypt -binary -inform DER -in '" +
                        (work / "staged.der").string() + "' -recip '" +
                        (work / "custody.pem").string() + "' -inkey '" +
                        (work / "custody.key").string() + "' -out '" + result.string() + "' 2>&1",
                    &ossl_log),
        0)
        << path;
    fs::remove(result);
  }

  fs::create_directories(recipients);
  fs::copy_file(work / "alice-new.pem", recipients / "alice.pem");
  fs::copy_file(work / "bob-new.pem", recipients / "bob.pem");
  const std::string re = k + "reencrypt --staging '" + staging.string() + "' --out '" +
                         out.string() + "' --custody-cert '" + (work / "custody.pem").string() +
                         "' --custody-key '" + (work / "custody.p12").string() +
                         "' --custody-passphrase-file '" + (work / "custody.pass").string() +
                         "' --recipients '" + recipients.string() + "'";
  log.clear();
  ASSERT_EQ(run_command(re, &log), 0) << log;
  std::size_t carol = 0, staged = 0;
  for (const auto& [path, e] : expected) {
    staged += e.status == kStaged ? 1 : 0;
    carol += e.status == kStaged && e.user == "carol" ? 1 : 0;
  }
  EXPECT_NE(log.find("waiting  " + std::to_string(carol) +
                     " message(s): no new encryption certificate yet for carol"),
            std::string::npos)
      << log;
  // Status names the run carol's messages wait in, sealed under its staging key, and whether
  // its KEK file is there; with the file moved away it says MISSING and what to do.
  const std::string status = k + "status --staging '" + staging.string() + "'";
  log.clear();
  ASSERT_EQ(run_command(status + " -o json 2>/dev/null", &log), 0) << log;
  auto waiting = nlohmann::json::parse(log);
  ASSERT_EQ(waiting["waiting_runs"].size(), 1u) << log;
  EXPECT_EQ(waiting["waiting_runs"][run]["waiting"].get<std::size_t>(), carol);
  EXPECT_EQ(waiting["waiting_runs"][run]["sealed"], "staging-key");
  EXPECT_EQ(waiting["waiting_runs"][run]["staging_key_file"], true);
  EXPECT_TRUE(waiting["staging_keys_missing"].empty());
  const fs::path kek = staging / "keys" / (run + ".kek.der");
  fs::rename(kek, work / "kek.der.aside");
  log.clear();
  ASSERT_EQ(run_command(status + " 2>&1", &log), 0) << log;
  EXPECT_NE(
      log.find("MISSING keys/" + run + ".kek.der: " + std::to_string(carol) + " staged message(s)"),
      std::string::npos)
      << log;
  EXPECT_NE(log.find("Restore the file from a backup"), std::string::npos) << log;
  log.clear();
  ASSERT_EQ(run_command(status + " -o json 2>/dev/null", &log), 0) << log;
  EXPECT_EQ(nlohmann::json::parse(log)["staging_keys_missing"], nlohmann::json::array({run}));
  fs::rename(work / "kek.der.aside", kek);
  fs::copy_file(work / "carol-new.pem", recipients / "carol.pem");
  log.clear();
  ASSERT_EQ(run_command(re + " -o json 2>/dev/null", &log), 0) << log;
  auto j = nlohmann::json::parse(log);
  EXPECT_EQ(j["this_run"]["reencrypted"].get<std::size_t>(), carol);
  EXPECT_EQ(j["already_done"].get<std::size_t>(), staged - carol);
  for (const auto& [path, e] : expected) {
    if (e.status == kStaged) {
      EXPECT_EQ(openssl_decrypt(path, e.user, e.format == "der"), e.plaintext) << path;
    }
  }
  log.clear();
  ASSERT_EQ(
      run_command(k + "status --staging '" + staging.string() + "' -o json 2>/dev/null", &log), 0);
  auto st = nlohmann::json::parse(log);
  EXPECT_EQ(st["reencrypted"].get<std::size_t>(), staged);
  EXPECT_EQ(st["messages"].size(), expected.size());
  // Status names each staged message's pack, offset, length and record digest.
  const auto rows = manifest_rows();
  for (const auto& m : st["messages"]) {
    const auto& r = rows.at(m["path"].get<std::string>());
    if (r.status != kStaged) {
      EXPECT_FALSE(m.contains("staged")) << m.dump();
      continue;
    }
    EXPECT_EQ(m["staged"]["pack"], r.copy.pack);
    EXPECT_EQ(m["staged"]["offset"].get<std::uint64_t>(), r.copy.offset);
    EXPECT_EQ(m["staged"]["length"].get<std::uint64_t>(), r.copy.length);
    EXPECT_EQ(m["staged"]["sha256"], r.copy.sha256);
    EXPECT_TRUE(st["packs"].contains(r.copy.pack)) << st["packs"].dump();
  }
  EXPECT_EQ(st["staged_bytes"], st["pack_bytes"]);  // nothing killed: no dead space
  // A wrong custody passphrase is an authentication error (exit 4), nothing written.
  write_all(work / "wrong.pass", "wrong");
  log.clear();
  EXPECT_EQ(run_command(k + "reencrypt --staging '" + staging.string() + "' --out '" +
                            (tmp.path() / "out2").string() + "' --custody-cert '" +
                            (work / "custody.pem").string() + "' --custody-key '" +
                            (work / "custody.p12").string() + "' --custody-passphrase-file '" +
                            (work / "wrong.pass").string() + "' --recipients '" +
                            recipients.string() + "'",
                        &log),
            4)
      << log;
  EXPECT_FALSE(fs::exists(tmp.path() / "out2"));
  expect_no_plaintext_on_disk();
}

// dr prepare on a fresh SoftHSM token: the new KMS (as kmsctl init) and an RSA-3072 custody key
// on the token with its certificate from the new CA; a second run keeps both; predecrypt to that
// certificate and reencrypt with the token key (pkcs11: URI) give what openssl reads.
TEST_F(DrTest, KmsctlPrepareMakesATokenCustodyKeyThatReencryptWithTheTokenUses) {
  const fs::path kmsctl = fs::path(std::getenv("KMSD_BUILD_DIR")) / "cli" / "kmsctl";
  kmsd::testing::SoftHsmToken token(tmp.path() / "hsm", "kmsd-new");
  const fs::path pin = tmp.path() / "pin";
  write_all(pin, kmsd::testing::kUserPin);
  const fs::path cfg = tmp.path() / "kmsd-new.toml";
  write_all(cfg,
            "[server]\npublic_listen = \"127.0.0.1:18080\"\nadmin_listen = "
            "\"127.0.0.1:18443\"\nunseal_socket = \"" +
                (tmp.path() / "unseal.sock").string() + "\"\n[token]\nmodule = \"" +
                kmsd::testing::kSoftHsmModule +
                "\"\nuri = \"pkcs11:token=kmsd-new\"\n[ca]\nsubject = \"/O=Drill/CN=New "
                "KMS CA\"\n[store]\npath = \"" +
                (tmp.path() / "new.db").string() + "\"\n[startup]\nsource = \"file\"\nfile = \"" +
                pin.string() + "\"\n");
  const std::string k = "'" + kmsctl.string() + "' dr ";
  const std::string prepare = k + "prepare --config '" + cfg.string() + "' --admin drill " +
                              "--admin-p12 '" + (tmp.path() / "admin.p12").string() +
                              "' --passphrase-file '" + (tmp.path() / "keys.pass").string() + "'";
  const fs::path token_cert = tmp.path() / "custody-token.pem";
  std::string log;
  ASSERT_EQ(run_command(prepare + " --custody-cert-out '" + token_cert.string() + "'", &log), 0)
      << log;
  EXPECT_NE(log.find("RSA-3072 'kms-dr-custody' generated"), std::string::npos) << log;
  EXPECT_NE(log.find("pkcs11:token=kmsd-new;object=kms-dr-custody"), std::string::npos) << log;
  // The custody certificate chains to the new CA and carries an RSA-3072 key.
  log.clear();
  ASSERT_EQ(run_command("openssl x509 -in '" + token_cert.string() + "' -noout -text", &log), 0);
  EXPECT_NE(log.find("(3072 bit)"), std::string::npos) << log;
  EXPECT_NE(log.find("Key Encipherment"), std::string::npos) << log;
  // The same file again is refused; another run keeps the KMS and the key.
  log.clear();
  EXPECT_EQ(run_command(prepare + " --custody-cert-out '" + token_cert.string() + "'", &log), 3)
      << log;
  log.clear();
  ASSERT_EQ(
      run_command(prepare + " --custody-cert-out '" + (tmp.path() / "again.pem").string() + "'",
                  &log),
      0)
      << log;
  EXPECT_NE(log.find("already initialized"), std::string::npos) << log;
  EXPECT_NE(log.find("already on the token; keeping it"), std::string::npos) << log;

  add_encrypted(1);
  add_openssl_cli();
  log.clear();
  ASSERT_EQ(run_command(k + "predecrypt --store '" + store.string() + "' --staging '" +
                            staging.string() + "' --keys '" + keys.string() +
                            "' --passphrase-file '" + (tmp.path() / "keys.pass").string() +
                            "' --custody-cert '" + token_cert.string() + "'",
                        &log),
            0)
      << log;
  fs::create_directories(recipients);
  for (const char* u : {"alice", "bob", "carol"})
    fs::copy_file(work / (std::string(u) + "-new.pem"), recipients / (std::string(u) + ".pem"));
  log.clear();
  ASSERT_EQ(run_command(k + "reencrypt --staging '" + staging.string() + "' --out '" +
                            out.string() + "' --custody-cert '" + token_cert.string() +
                            "' --custody-key 'pkcs11:token=kmsd-new;object=kms-dr-custody' "
                            "--module " +
                            kmsd::testing::kSoftHsmModule + " --pin-file '" + pin.string() +
                            "' --recipients '" + recipients.string() + "' -o json 2>/dev/null",
                        &log),
            0)
      << log;
  auto j = nlohmann::json::parse(log);
  EXPECT_EQ(j["this_run"]["reencrypted"].get<std::size_t>(), expected.size());
  expect_every_message_opens();
  // The run's KEK file opens with the token's custody key (kmsctl has exited: one process on
  // the token at a time).
  auto token_cert_x509 = ossl::x509_from_pem(read_all(token_cert));
  ASSERT_TRUE(token_cert_x509.ok());
  auto custody_on_token = open_custody_key_on_token(
      "pkcs11:token=kmsd-new;object=kms-dr-custody", kmsd::testing::kSoftHsmModule,
      SecretBytes::from_string(kmsd::testing::kUserPin), token_cert_x509->get(), 1);
  ASSERT_TRUE(custody_on_token.ok()) << custody_on_token.error().message;
  kek_opener = custody_on_token->key.get();
  kek_opener_cert = token_cert_x509->get();
  ASSERT_EQ(kek_runs().size(), 1u);
  expect_no_plaintext_on_disk();
}

}  // namespace
}  // namespace kmsd::dr::fixture

// Disaster recovery library: predecrypt classifies every message and stages each one it can open
// for the custody key only (sealed under the run's staging key, which is encrypted to the custody
// certificate: dr_kek_test), a stopped run resumes, reencrypt writes the original formats
// that `openssl cms -decrypt` opens with the users' new keys, the custody key may live on a
// token, and no plaintext reaches a file.
#include "tests/dr/dr_fixture.hpp"

namespace kmsd::dr::fixture {
namespace {

TEST_F(DrTest, ReadsEveryKeyOfAKmsdPkcs12Bundle) {
  KeyRing ring = load_keys();
  EXPECT_EQ(ring.key_count(), 6u);
  EXPECT_EQ(ring.users(), (std::vector<std::string>{"alice", "bob", "carol"}));
  for (auto& u : users)
    for (auto& c : u.old_certs)
      for (const auto& id : recipient_ids_of_cert(c.get())) {
        const auto* e = ring.find(id);
        ASSERT_NE(e, nullptr) << id;
        EXPECT_EQ(e->user, u.name);
      }
  // A wrong passphrase names the file and is an authentication error.
  SecretBytes wrong = SecretBytes::from_string("wrong");
  KeyDirOptions o;
  o.dir = keys;
  o.default_passphrase = &wrong;
  auto bad = load_key_dir(o);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.error().code, ErrorCode::kUnauthenticated);
  EXPECT_NE(bad.error().message.find("alice.p12"), std::string::npos);
}

TEST_F(DrTest, PredecryptClassifiesEveryMessageAndStagesOnlyToTheCustodyKey) {
  add_encrypted(2);
  add_others();
  add_openssl_cli();
  KeyRing ring = load_keys();
  auto s = run_predecrypt(ring);
  ASSERT_TRUE(s.ok()) << s.error().message;
  EXPECT_EQ(s->total, expected.size());
  EXPECT_EQ(s->processed, expected.size());
  auto rows = manifest_rows();
  ASSERT_EQ(rows.size(), expected.size());
  std::map<std::string, std::size_t> want;
  for (const auto& [path, e] : expected) {
    ++want[e.status];
    ASSERT_TRUE(rows.count(path)) << path;
    const auto& r = rows[path];
    EXPECT_EQ(r.status, e.status) << path << ": " << r.reason;
    EXPECT_EQ(r.format, e.format) << path;
    EXPECT_EQ(r.digest, ossl::hex(ossl::sha256([&] {
                std::string d = read_all(store / path);
                return std::vector<std::uint8_t>(d.begin(), d.end());
              }())))
        << path;
    if (e.status == kStaged) {
      EXPECT_EQ(r.users, e.user) << path;
      // The staged copy, read from its pack at the row's offset (0600, SHA-256 as recorded), is
      // DER sealed under the run's staging key only (whose file opens with the custody key) and
      // opens to exactly the original content; a MIME message's own header lines come first.
      EXPECT_EQ(open_staged(r), e.plaintext) << path;
      const std::string staged = staged_record(r);
      if (e.format == "mime" && path.find("cli-") == std::string::npos) {
        EXPECT_EQ(staged.rfind("From: sender@example.org\nTo: " + e.user, 0), 0u) << staged;
        // All of the message's own header lines, none of its MIME ones.
        const std::string own = staged.substr(0, r.copy.header_length);
        EXPECT_NE(own.find("\nDate: "), std::string::npos) << own;
        EXPECT_EQ(own.find("Content-"), std::string::npos) << own;
        EXPECT_EQ(own.find("MIME-Version"), std::string::npos) << own;
      } else if (e.format == "der") {
        EXPECT_EQ(r.copy.header_length, 0u) << path;
      }
      EXPECT_EQ(static_cast<unsigned char>(staged.at(r.copy.header_length)), 0x30) << path;
    } else {
      EXPECT_FALSE(r.reason.empty()) << path;
      EXPECT_TRUE(r.copy.pack.empty()) << path;
    }
  }
  EXPECT_EQ(s->this_run, want);
  EXPECT_EQ(s->overall, want);
  EXPECT_EQ(want[kStaged], 3u * 2u * 2u + 2u);
  EXPECT_NE(rows["Maildir/new/foreign.2"].reason.find("CN=Old KMS CA"), std::string::npos);
  // Packs only, one per worker of the run at most, 0700 directory; no file per message.
  EXPECT_FALSE(fs::exists(staging / "messages"));
  struct stat dir_st {};
  ASSERT_EQ(::stat((staging / "packs").c_str(), &dir_st), 0);
  EXPECT_EQ(dir_st.st_mode & 0777, 0700u);
  const auto packs = pack_files();
  EXPECT_GE(packs.size(), 1u);
  EXPECT_LE(packs.size(), 2u);
  // The packs hold the staged records and nothing else: no run was killed.
  std::uint64_t recorded = 0, on_disk = 0;
  for (const auto& [path, r] : rows) recorded += r.copy.length;
  for (const auto& p : packs) on_disk += fs::file_size(staging / "packs" / p);
  EXPECT_EQ(recorded, on_disk);
  // The store is untouched.
  for (const auto& [path, e] : expected) EXPECT_TRUE(fs::exists(store / path));
  expect_no_plaintext_on_disk();

  // A second run finds everything done.
  auto again = run_predecrypt(ring);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->processed, want[kUnknownRecipient]);  // tried again: a key may have come
  EXPECT_EQ(again->already_done, expected.size() - want[kUnknownRecipient]);
}

TEST_F(DrTest, StoppedRunResumesWithoutRedoingOrLosingAMessage) {
  add_encrypted(10);  // 60 messages
  add_others();
  KeyRing ring = load_keys();
  auto first = run_predecrypt(ring, 25);
  ASSERT_TRUE(first.ok()) << first.error().message;
  EXPECT_TRUE(first->stopped_early);
  auto before = manifest_rows();
  ASSERT_EQ(before.size(), 25u);
  const auto first_packs = pack_files();
  ASSERT_FALSE(first_packs.empty());
  for (const auto& [path, r] : before)
    if (r.status == kStaged) {
      EXPECT_FALSE(open_staged(r).empty()) << path;
    }
  auto second = run_predecrypt(ring);
  ASSERT_TRUE(second.ok()) << second.error().message;
  EXPECT_FALSE(second->stopped_early);
  EXPECT_EQ(second->already_done, 25u - (before.count("Maildir/new/foreign.2") ? 1u : 0u));
  EXPECT_EQ(second->already_done + second->processed, expected.size());
  auto after = manifest_rows();
  ASSERT_EQ(after.size(), expected.size());
  for (const auto& [path, e] : expected) EXPECT_EQ(after[path].status, e.status) << path;
  // What the stopped run recorded is not staged again: same pack, offset and digest.
  for (const auto& [path, r] : before) {
    if (r.status != kStaged) continue;
    EXPECT_EQ(after[path].copy.pack, r.copy.pack) << path << " was staged again";
    EXPECT_EQ(after[path].copy.offset, r.copy.offset) << path;
    EXPECT_EQ(after[path].copy.sha256, r.copy.sha256) << path;
  }
  // The second run appended to packs of its own, never to the first run's.
  std::set<std::string> second_run_packs;
  for (const auto& [path, r] : after)
    if (r.status == kStaged && !before.count(path)) second_run_packs.insert(r.copy.pack);
  EXPECT_FALSE(second_run_packs.empty());
  for (const auto& p : second_run_packs) EXPECT_FALSE(first_packs.count(p)) << p;
  for (const auto& [path, r] : after)
    if (r.status == kStaged) {
      EXPECT_EQ(open_staged(r), expected[path].plaintext) << path;
    }
}

TEST_F(DrTest, ReencryptWritesTheOriginalFormatsForEnrolledUsersAndWaitsForTheOthers) {
  add_encrypted(2);
  add_others();
  add_openssl_cli();
  KeyRing ring = load_keys();
  ASSERT_TRUE(run_predecrypt(ring).ok());

  // alice and bob have enrolled again; carol has not.
  auto s = run_reencrypt({"alice", "bob"}, custody_key.get());
  ASSERT_TRUE(s.ok()) << s.error().message;
  std::size_t carol = 0, others = 0;
  for (const auto& [path, e] : expected) {
    if (e.status != kStaged) continue;
    (e.user == "carol" ? carol : others)++;
  }
  EXPECT_EQ(s->this_run[kReencrypted], others);
  EXPECT_EQ(s->this_run[kWaiting], carol);
  for (const auto& [path, e] : expected) {
    if (e.status != kStaged) {
      EXPECT_FALSE(fs::exists(out / path)) << path;
      continue;
    }
    if (e.user == "carol") {
      EXPECT_FALSE(fs::exists(out / path)) << path;
      continue;
    }
    const std::string written = read_all(out / path);
    if (e.format == "der") {
      EXPECT_EQ(static_cast<unsigned char>(written[0]), 0x30) << path;  // DER SEQUENCE
    } else {
      EXPECT_NE(written.find("application/pkcs7-mime"), std::string::npos) << path;
      if (path.find("cli-") == std::string::npos)
        EXPECT_EQ(written.rfind(headers(e.user, 0).substr(0, 30), 0), 0u) << written;
      else
        EXPECT_NE(written.find("Subject: made by openssl cms"), std::string::npos);
    }
    EXPECT_EQ(openssl_decrypt(path, e.user, e.format == "der"), e.plaintext) << path;
  }
  expect_no_plaintext_on_disk();

  // carol enrolls: the rerun does her messages only.
  auto rerun = run_reencrypt({"alice", "bob", "carol"}, custody_key.get());
  ASSERT_TRUE(rerun.ok()) << rerun.error().message;
  EXPECT_EQ(rerun->already_done, others);
  EXPECT_EQ(rerun->this_run[kReencrypted], carol);
  EXPECT_EQ(rerun->this_run.count(kWaiting), 0u);
  for (const auto& [path, e] : expected) {
    if (e.status == kStaged && e.user == "carol") {
      EXPECT_EQ(openssl_decrypt(path, "carol", e.format == "der"), e.plaintext) << path;
    }
  }
  expect_no_plaintext_on_disk();
}

TEST_F(DrTest, AnotherCustodyCertificateIsRefusedForAStartedStaging) {
  add_encrypted(1);
  KeyRing ring = load_keys();
  ASSERT_TRUE(run_predecrypt(ring).ok());
  auto other_key = make_key(hsm::KeyType::kRsa2048);
  custody_cert = new_ca.issue(other_key.get(), "another custody");
  auto s = run_predecrypt(ring);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.error().code, ErrorCode::kFailedPrecondition);
  auto r = run_reencrypt({"alice"}, other_key.get());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kFailedPrecondition);
}

// The production shape: the custody key is an RSA-3072 key on a (SoftHSM) token, used through
// the token's session pool by CMS_decrypt.
class DrTokenTest : public DrTest {
 protected:
  std::unique_ptr<kmsd::testing::SoftHsmToken> token;
  void SetUp() override {
    DrTest::SetUp();
    token = std::make_unique<kmsd::testing::SoftHsmToken>(tmp.path() / "hsm", "kmsd-new");
    std::string log;
    ASSERT_EQ(run_command(std::string("pkcs11-tool --module ") + kmsd::testing::kSoftHsmModule +
                              " --token-label kmsd-new --login --pin " + kmsd::testing::kUserPin +
                              " --keypairgen --key-type rsa:3072 --label kms-dr-custody --id 0d "
                              "--usage-decrypt",
                          &log),
              0)
        << log;
  }
};

TEST_F(DrTokenTest, ReencryptsWithTheCustodyKeyOnAToken) {
  // The custody certificate is for the token's key.
  hsm::TokenOptions to;
  to.module_path = kmsd::testing::kSoftHsmModule;
  to.token_uri = "pkcs11:token=kmsd-new";
  to.labels.ca = "kms-dr-custody";
  {
    auto t = hsm::Token::open(to);
    ASSERT_TRUE(t.ok()) << t.error().message;
    auto pub = (*t)->ca_public_key();
    ASSERT_TRUE(pub.ok()) << pub.error().message;
    custody_cert = new_ca.issue(pub->get(), "DR custody on token");
  }
  add_encrypted(2);
  add_openssl_cli();
  KeyRing ring = load_keys();
  ASSERT_TRUE(run_predecrypt(ring).ok());

  auto wrong = open_custody_key_on_token("pkcs11:token=kmsd-new", kmsd::testing::kSoftHsmModule,
                                         SecretBytes::from_string(kmsd::testing::kUserPin),
                                         custody_cert.get(), 2);
  EXPECT_FALSE(wrong.ok());  // no object=
  auto key = open_custody_key_on_token(
      "pkcs11:token=kmsd-new;object=kms-dr-custody", kmsd::testing::kSoftHsmModule,
      SecretBytes::from_string(kmsd::testing::kUserPin), custody_cert.get(), 2);
  ASSERT_TRUE(key.ok()) << key.error().message;
  auto s = run_reencrypt({"alice", "bob", "carol"}, key->key.get());
  ASSERT_TRUE(s.ok()) << s.error().message;
  EXPECT_EQ(s->this_run[kReencrypted], expected.size());
  EXPECT_EQ(s->this_run.count(kFailed), 0u);
  expect_every_message_opens();
  // The run's KEK file opens with the token key (C_Decrypt behind CMS_decrypt).
  kek_opener = key->key.get();
  ASSERT_EQ(kek_runs().size(), 1u);
  expect_no_plaintext_on_disk();
}

}  // namespace
}  // namespace kmsd::dr::fixture

namespace kmsd::dr::fixture {
namespace {

// Throughput on a generated store of 2,000 messages (half RSA-2048 key transport, half P-256
// key agreement), beside `openssl cms -decrypt` run once per message on a sample. Prints the
// figures; asserts only that every message was staged.
TEST_F(DrTest, PredecryptThroughputOnTwoThousandMessages) {
  add_encrypted(333);  // 3 users x 2 keys x 333 = 1,998
  add_openssl_cli();   // + 2
  KeyRing ring = load_keys();
  auto s = run_predecrypt(ring);
  ASSERT_TRUE(s.ok()) << s.error().message;
  EXPECT_EQ(s->this_run[kStaged], expected.size());
  const double rate = static_cast<double>(s->processed) / s->seconds;

  const int sample = 20;
  int done = 0;
  const auto start = std::chrono::steady_clock::now();
  for (const auto& [path, e] : expected) {
    if (done == sample) break;
    if (e.user != "alice" || e.format != "mime" || path.find("cli-") != std::string::npos) continue;
    // alice's first old key (RSA-2048) opens her messages made to it; try it like SECTOOL would
    std::string log;
    run_command("openssl cms -decrypt -binary -in '" + (store / path).string() + "' -inkey '" +
                    (work / "alice-old1.key").string() + "' -out /dev/null",
                &log);
    ++done;
  }
  const double shell =
      done / std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf(
      "predecrypt: %zu messages in %.2f s = %.0f msg/s on %u threads; "
      "openssl cms -decrypt shell loop: %.1f msg/s (sample of %d)\n",
      s->processed, s->seconds, rate, 2u, shell, done);
  RecordProperty("predecrypt_msgs_per_s", static_cast<int>(rate));
  RecordProperty("openssl_shell_loop_msgs_per_s", static_cast<int>(shell));
}

}  // namespace
}  // namespace kmsd::dr::fixture

namespace kmsd::dr::fixture {
namespace {

// A message to two users waits until both have new certificates and then opens for each; a
// message that is only signed (openssl cms -sign, multipart/signed) is not-encrypted.
TEST_F(DrTest, MessageToTwoUsersWaitsForBothAndSignedOnlyIsNotEncrypted) {
  const std::string pt = content(marker());
  write_all(store / "Maildir/cur/both.1:2,S",
            encrypt_mime(pt, {users[0].old_certs[1].get(), users[1].old_certs[0].get()},
                         headers("alice", 1), false));
  expected["Maildir/cur/both.1:2,S"] = {kStaged, pt, "alice,bob", "mime"};
  write_all(work / "signed.in", "Content-Type: text/plain\r\n\r\nsigned, not secret\r\n");
  fs::create_directories(store / "eml");
  std::string log;
  ASSERT_EQ(run_command("openssl cms -sign -in '" + (work / "signed.in").string() + "' -signer '" +
                            (work / "alice-old1.pem").string() + "' -inkey '" +
                            (work / "alice-old1.key").string() + "' -out '" +
                            (store / "eml/signed.eml").string() + "'",
                        &log),
            0)
      << log;
  KeyRing ring = load_keys();
  auto s = run_predecrypt(ring);
  ASSERT_TRUE(s.ok()) << s.error().message;
  auto rows = manifest_rows();
  EXPECT_EQ(rows["Maildir/cur/both.1:2,S"].status, kStaged);
  EXPECT_EQ(rows["Maildir/cur/both.1:2,S"].users, "alice,bob");
  EXPECT_EQ(rows["eml/signed.eml"].status, kNotEncrypted) << rows["eml/signed.eml"].reason;
  EXPECT_NE(rows["eml/signed.eml"].reason.find("signed"), std::string::npos);

  auto only_alice = run_reencrypt({"alice"}, custody_key.get());
  ASSERT_TRUE(only_alice.ok());
  EXPECT_EQ(only_alice->this_run[kWaiting], 1u);
  EXPECT_FALSE(fs::exists(out / "Maildir/cur/both.1:2,S"));
  auto both = run_reencrypt({"alice", "bob"}, custody_key.get());
  ASSERT_TRUE(both.ok());
  EXPECT_EQ(both->this_run[kReencrypted], 1u);
  EXPECT_EQ(openssl_decrypt("Maildir/cur/both.1:2,S", "alice", false), pt);
  EXPECT_EQ(openssl_decrypt("Maildir/cur/both.1:2,S", "bob", false), pt);
  expect_no_plaintext_on_disk();
}

}  // namespace
}  // namespace kmsd::dr::fixture

namespace kmsd::dr::fixture {
namespace {

// A message that changed in the store since it was staged (its SHA-256 differs) is staged again
// and re-encrypted again; the others are not touched.
TEST_F(DrTest, ChangedMessageIsStagedAndReencryptedAgain) {
  add_encrypted(1);
  KeyRing ring = load_keys();
  ASSERT_TRUE(run_predecrypt(ring).ok());
  auto first = run_reencrypt({"alice", "bob", "carol"}, custody_key.get());
  ASSERT_TRUE(first.ok());
  ASSERT_EQ(first->this_run[kReencrypted], expected.size());
  auto& [path, e] = *expected.begin();
  e.plaintext = content(marker());
  write_all(store / path,
            encrypt_mime(e.plaintext, {users[0].old_certs[0].get()},
                         e.format == "der" ? "" : headers("alice", 99), e.format == "der"));
  e.user = "alice";
  auto again = run_predecrypt(ring);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->processed, 1u);
  EXPECT_EQ(again->already_done, expected.size() - 1);
  auto re = run_reencrypt({"alice", "bob", "carol"}, custody_key.get());
  ASSERT_TRUE(re.ok());
  EXPECT_EQ(re->this_run[kReencrypted], 1u);
  EXPECT_EQ(re->already_done, expected.size() - 1);
  EXPECT_EQ(openssl_decrypt(path, "alice", e.format == "der"), e.plaintext);
}

}  // namespace
}  // namespace kmsd::dr::fixture

namespace kmsd::dr::fixture {
namespace {

// One flipped byte in a pack: reencrypt checks each staged record's SHA-256 before it decrypts,
// reports that message as failed naming the pack and the offset, and re-encrypts all the others.
TEST_F(DrTest, AFlippedByteInAPackFailsOnlyThatMessageNamingThePackAndOffset) {
  add_encrypted(2);
  add_openssl_cli();
  KeyRing ring = load_keys();
  ASSERT_TRUE(run_predecrypt(ring).ok());
  auto rows = manifest_rows();
  // The victim: a staged record in the middle of its pack (not the first one).
  const ManifestRow* victim = nullptr;
  for (const auto& [path, r] : rows)
    if (r.status == kStaged && r.copy.offset > 0) victim = &r;
  ASSERT_NE(victim, nullptr);
  const fs::path pack = staging / "packs" / victim->copy.pack;
  {
    std::fstream f(pack, std::ios::in | std::ios::out | std::ios::binary);
    const auto at = static_cast<std::streamoff>(victim->copy.offset + victim->copy.length / 2);
    f.seekg(at);
    char c = 0;
    f.read(&c, 1);
    c = static_cast<char>(c ^ 0x01);
    f.seekp(at);
    f.write(&c, 1);
    ASSERT_TRUE(f.good());
  }
  auto s = run_reencrypt({"alice", "bob", "carol"}, custody_key.get());
  ASSERT_TRUE(s.ok()) << s.error().message;
  EXPECT_EQ(s->this_run[kFailed], 1u);
  EXPECT_EQ(s->this_run[kReencrypted], expected.size() - 1);
  ASSERT_EQ(s->problems.size(), 1u);
  EXPECT_EQ(s->problems[0].path, victim->path);
  const std::string& why = s->problems[0].reason;
  EXPECT_NE(
      why.find("packs/" + victim->copy.pack + " at offset " + std::to_string(victim->copy.offset)),
      std::string::npos)
      << why;
  EXPECT_NE(why.find("is damaged"), std::string::npos) << why;
  EXPECT_NE(why.find(victim->copy.sha256), std::string::npos) << why;
  EXPECT_FALSE(fs::exists(out / victim->path));
  for (const auto& [path, e] : expected)
    if (path != victim->path) {
      EXPECT_EQ(openssl_decrypt(path, e.user, e.format == "der"), e.plaintext) << path;
    }
  // Not recorded as re-encrypted: a rerun meets it again, and fails it again.
  auto again = run_reencrypt({"alice", "bob", "carol"}, custody_key.get());
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->already_done, expected.size() - 1);
  EXPECT_EQ(again->this_run[kFailed], 1u);
  expect_no_plaintext_on_disk();
}

// A staging directory made before packs (one file per staged message under messages/, no pack
// columns in its manifest) is refused by every command that opens it, saying what to do.
TEST_F(DrTest, AManifestOfTheOneFilePerMessageLayoutIsRefused) {
  fs::create_directories(staging / "messages");
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open((staging / "manifest.db").c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db,
                         "CREATE TABLE settings(key TEXT PRIMARY KEY, value TEXT NOT NULL);"
                         "CREATE TABLE messages(path TEXT PRIMARY KEY, format TEXT NOT NULL, "
                         "digest TEXT NOT NULL, status TEXT NOT NULL, recipients TEXT NOT NULL, "
                         "users TEXT NOT NULL, reason TEXT NOT NULL, recorded_at INTEGER NOT NULL);"
                         "INSERT INTO messages VALUES('Maildir/cur/1:2,S', 'mime', 'ab', 'staged', "
                         "'', 'alice', '', 0);",
                         nullptr, nullptr, nullptr),
            SQLITE_OK);
  sqlite3_close(db);
  add_encrypted(1);
  KeyRing ring = load_keys();
  auto pre = run_predecrypt(ring);
  ASSERT_FALSE(pre.ok());
  EXPECT_EQ(pre.error().code, ErrorCode::kFailedPrecondition);
  EXPECT_NE(pre.error().message.find("one file per message"), std::string::npos)
      << pre.error().message;
  EXPECT_NE(pre.error().message.find("new, empty --staging directory"), std::string::npos)
      << pre.error().message;
  auto re = run_reencrypt({"alice"}, custody_key.get());
  ASSERT_FALSE(re.ok());
  EXPECT_EQ(re.error().code, ErrorCode::kFailedPrecondition);
  EXPECT_FALSE(fs::exists(staging / "packs"));
  EXPECT_FALSE(fs::exists(out));
  // The old manifest is left as it was: its row, and no table of the new schema added.
  std::string tables;
  ASSERT_EQ(
      run_command("sqlite3 '" + (staging / "manifest.db").string() +
                      "' \"SELECT (SELECT count(*) FROM messages) || ' ' || group_concat(name) "
                      "FROM sqlite_master WHERE type = 'table'\"",
                  &tables),
      0);
  EXPECT_EQ(tables, "1 settings,messages\n");
}

}  // namespace
}  // namespace kmsd::dr::fixture

namespace kmsd::dr::fixture {
namespace {

// A staging directory resumed many times: every stopped run leaves packs of its own (and dead
// space in them); reencrypt reads from more packs than it keeps open at once, and every message
// comes out once, whole.
TEST_F(DrTest, ManyStoppedRunsLeaveManyPacksThatReencryptReadsAll) {
  add_encrypted(12);  // 72 messages
  KeyRing ring = load_keys();
  int runs = 0;
  std::size_t recorded = 0;
  do {
    // Stops once one message more than before is recorded (the ones found done count too).
    auto s = run_predecrypt(ring, recorded + 1);
    ASSERT_TRUE(s.ok()) << s.error().message;
    ++runs;
    recorded = manifest_rows().size();
  } while (recorded < expected.size() && runs < 200);
  ASSERT_EQ(manifest_rows().size(), expected.size());
  const auto packs = pack_files();
  EXPECT_GT(packs.size(), 64u) << runs << " runs";
  std::set<std::string> named;
  for (const auto& [path, r] : manifest_rows()) named.insert(r.copy.pack);
  EXPECT_GT(named.size(), 64u);
  auto s = run_reencrypt({"alice", "bob", "carol"}, custody_key.get());
  ASSERT_TRUE(s.ok()) << s.error().message;
  EXPECT_EQ(s->this_run[kReencrypted], expected.size());
  EXPECT_EQ(s->this_run.count(kFailed), 0u) << (s->problems.empty() ? "" : s->problems[0].reason);
  expect_every_message_opens();
}

}  // namespace
}  // namespace kmsd::dr::fixture

// Staging keys (daemon/dr/staging_key.hpp): a predecrypt run with the PKCS#12 key source seals
// every record under its own AES-256 KEK (one KEKRecipientInfo, no certificate recipient), whose
// file keys/<run>.kek.der opens with the custody key and with nothing else; reencrypt reads runs
// of both layouts (KEK records, and records encrypted to the custody certificate as earlier
// versions wrote them) in one staging directory; a missing or damaged KEK file fails only its
// run's messages, which stay staged; the KEK's bytes are on no disk.
#include "tests/dr/dr_fixture.hpp"

namespace kmsd::dr::fixture {
namespace {

// A staged record: (recipient-info types, key identifier of the KEK recipient).
struct RecordShape {
  int recipients = 0;
  int kek = 0;
  int ktri = 0;
  std::string kek_id;
};

RecordShape shape_of(const std::string& der) {
  RecordShape s;
  const unsigned char* p = reinterpret_cast<const unsigned char*>(der.data());
  CmsPtr cms(d2i_CMS_ContentInfo(nullptr, &p, static_cast<long>(der.size())));
  EXPECT_TRUE(cms);
  if (!cms) return s;
  EXPECT_EQ(OBJ_obj2nid(CMS_get0_type(cms.get())), NID_pkcs7_enveloped);
  STACK_OF(CMS_RecipientInfo)* ris = CMS_get0_RecipientInfos(cms.get());
  s.recipients = sk_CMS_RecipientInfo_num(ris);
  for (int i = 0; i < s.recipients; ++i) {
    CMS_RecipientInfo* ri = sk_CMS_RecipientInfo_value(ris, i);
    if (CMS_RecipientInfo_type(ri) == CMS_RECIPINFO_TRANS) ++s.ktri;
    if (CMS_RecipientInfo_type(ri) == CMS_RECIPINFO_KEK) {
      ++s.kek;
      ASN1_OCTET_STRING* id = nullptr;
      X509_ALGOR* alg = nullptr;
      EXPECT_EQ(CMS_RecipientInfo_kekri_get0_id(ri, &alg, &id, nullptr, nullptr, nullptr), 1);
      EXPECT_EQ(OBJ_obj2nid(alg->algorithm), NID_id_aes256_wrap);
      s.kek_id.assign(reinterpret_cast<const char*>(ASN1_STRING_get0_data(id)),
                      static_cast<std::size_t>(ASN1_STRING_length(id)));
    }
  }
  return s;
}

TEST_F(DrTest, AStagedRecordHasExactlyOneKekRecipientAndNoKeyTransport) {
  add_encrypted(2);
  add_openssl_cli();
  KeyRing ring = load_keys();
  ASSERT_TRUE(run_predecrypt(ring).ok());
  const auto runs = kek_runs();
  ASSERT_EQ(runs.size(), 1u);
  const std::string run = *runs.begin();
  // Every pack of the run was created after its KEK file (which was fsync'd first).
  struct stat kst {};
  ASSERT_EQ(::stat((staging / "keys" / (run + ".kek.der")).c_str(), &kst), 0);
  std::size_t staged = 0;
  for (const auto& [path, r] : manifest_rows()) {
    if (r.status != kStaged) continue;
    ++staged;
    EXPECT_EQ(run_of_pack(r.copy.pack), run) << r.copy.pack;
    const RecordShape s = shape_of(staged_der(r));
    EXPECT_EQ(s.recipients, 1) << path;
    EXPECT_EQ(s.kek, 1) << path;
    EXPECT_EQ(s.ktri, 0) << path;
    EXPECT_EQ(s.kek_id, run) << path;
    EXPECT_EQ(open_staged(r), expected[path].plaintext) << path;
  }
  EXPECT_EQ(staged, expected.size());
  for (const auto& p : pack_files()) {
    struct stat pst {};
    ASSERT_EQ(::stat((staging / "packs" / p).c_str(), &pst), 0);
    EXPECT_LE(kst.st_mtim.tv_sec, pst.st_mtim.tv_sec) << p;
  }
  expect_no_plaintext_on_disk();
}

TEST_F(DrTest, TheKekFileOpensWithTheCustodyKeyAndWithNothingElse) {
  add_encrypted(1);
  KeyRing ring = load_keys();
  ASSERT_TRUE(run_predecrypt(ring).ok());
  const auto runs = kek_runs();
  ASSERT_EQ(runs.size(), 1u);
  const std::string run = *runs.begin();
  // The file: one KeyTransRecipientInfo to the custody certificate, nothing else.
  const RecordShape file = shape_of(read_all(staging / "keys" / (run + ".kek.der")));
  EXPECT_EQ(file.recipients, 1);
  EXPECT_EQ(file.ktri, 1);
  EXPECT_EQ(file.kek, 0);
  auto kek = StagingKey::load(staging, run, custody_key.get(), custody_cert.get());
  ASSERT_TRUE(kek.ok()) << kek.error().message;
  EXPECT_EQ(kek->run_id(), run);
  EXPECT_EQ(kek_of_run(run).size(), 32u);

  // Another RSA-3072 key, with the custody certificate or with its own, is refused; so is a
  // user's key. The errors name the file and say what to do; the KEK is not in them.
  auto other = make_key(hsm::KeyType::kRsa3072);
  auto other_cert = new_ca.issue(other.get(), "not the custody key");
  const std::string kek_hex = ossl::hex(kek_of_run(run).span());
  for (auto [key, cert] : std::vector<std::pair<EVP_PKEY*, X509*>>{
           {other.get(), custody_cert.get()},
           {other.get(), other_cert.get()},
           {users[0].new_key.get(), users[0].new_cert.get()}}) {
    auto wrong = StagingKey::load(staging, run, key, cert);
    ASSERT_FALSE(wrong.ok());
    EXPECT_EQ(wrong.error().code, ErrorCode::kCrypto);
    EXPECT_NE(wrong.error().message.find("keys/" + run + ".kek.der"), std::string::npos)
        << wrong.error().message;
    EXPECT_NE(wrong.error().message.find("restore the file"), std::string::npos);
    EXPECT_EQ(wrong.error().message.find(kek_hex), std::string::npos);
  }
  // A record does not open under another run's KEK, nor with the custody key directly.
  auto stranger = StagingKey::generate(run);
  ASSERT_TRUE(stranger.ok());
  for (const auto& [path, r] : manifest_rows()) {
    if (r.status != kStaged) continue;
    const std::string der = staged_der(r);
    ParsedMessage pm = parse_message(
        {reinterpret_cast<const std::uint8_t*>(der.data()), der.size()}, Format::kDer);
    ASSERT_EQ(pm.kind, Kind::kEncrypted);
    EXPECT_FALSE(stranger->open(pm.cms.get()).ok()) << path;
    EXPECT_FALSE(decrypt(pm.cms.get(), custody_key.get(), custody_cert.get()).ok()) << path;
    EXPECT_TRUE(kek->open(pm.cms.get()).ok()) << path;
  }
}

// A staging directory with a run of each layout: the first run staged the way earlier versions
// did (every record encrypted to the custody certificate), the second under its KEK. One
// reencrypt opens both and every message comes out byte-identical.
TEST_F(DrTest, ReencryptOpensOldCustodyRecordsAndKekRecordsOfOneStagingDirectory) {
  add_encrypted(3);  // 18 messages
  add_openssl_cli();
  KeyRing ring = load_keys();
  auto old_run = run_predecrypt(ring, 8, /*per_message_custody=*/true);
  ASSERT_TRUE(old_run.ok()) << old_run.error().message;
  EXPECT_TRUE(old_run->stopped_early);
  EXPECT_TRUE(kek_runs().empty());  // the old layout has no staging key
  ASSERT_TRUE(run_predecrypt(ring).ok());
  ASSERT_EQ(kek_runs().size(), 1u);
  const std::string new_run = *kek_runs().begin();

  std::size_t old_records = 0, new_records = 0;
  expect_kek_records = false;
  for (const auto& [path, r] : manifest_rows()) {
    ASSERT_EQ(r.status, kStaged) << path;
    const RecordShape s = shape_of(staged_der(r));
    EXPECT_EQ(s.recipients, 1) << path;
    if (run_of_pack(r.copy.pack) == new_run) {
      EXPECT_EQ(s.kek, 1) << path;
      ++new_records;
    } else {
      EXPECT_EQ(s.ktri, 1) << path;
      ++old_records;
    }
    EXPECT_EQ(open_staged(r), expected[path].plaintext) << path;
  }
  EXPECT_GE(old_records, 8u);
  EXPECT_GE(new_records, 1u);
  EXPECT_EQ(old_records + new_records, expected.size());

  auto s = run_reencrypt({"alice", "bob", "carol"}, custody_key.get());
  ASSERT_TRUE(s.ok()) << s.error().message;
  EXPECT_EQ(s->this_run[kReencrypted], expected.size());
  EXPECT_EQ(s->this_run.count(kFailed), 0u) << (s->problems.empty() ? "" : s->problems[0].reason);
  expect_every_message_opens();
  expect_no_plaintext_on_disk();
}

// Two KEK runs; the first run's KEK file is removed, then damaged: only that run's messages fail
// (naming the file and what to do), they stay staged, the other run's are re-encrypted; with the
// file restored, a rerun re-encrypts the rest.
TEST_F(DrTest, AMissingOrDamagedKekFileFailsOnlyThatRunsMessagesAndLosesNothing) {
  add_encrypted(3);  // 18 messages
  KeyRing ring = load_keys();
  auto first = run_predecrypt(ring, 7);
  ASSERT_TRUE(first.ok()) << first.error().message;
  const auto first_runs = kek_runs();
  ASSERT_EQ(first_runs.size(), 1u);
  const std::string victim = *first_runs.begin();
  ASSERT_TRUE(run_predecrypt(ring).ok());
  ASSERT_EQ(kek_runs().size(), 2u);
  std::set<std::string> victims;
  for (const auto& [path, r] : manifest_rows())
    if (run_of_pack(r.copy.pack) == victim) victims.insert(path);
  ASSERT_GE(victims.size(), 7u);
  ASSERT_LT(victims.size(), expected.size());

  const fs::path file = staging / "keys" / (victim + ".kek.der");
  const std::string saved = read_all(file);
  const std::string kek_hex = ossl::hex(kek_of_run(victim).span());
  fs::remove(file);
  auto s = run_reencrypt({"alice", "bob", "carol"}, custody_key.get());
  ASSERT_TRUE(s.ok()) << s.error().message;
  EXPECT_EQ(s->this_run[kFailed], victims.size());
  EXPECT_EQ(s->this_run[kReencrypted], expected.size() - victims.size());
  ASSERT_EQ(s->problems.size(), victims.size());
  for (const auto& p : s->problems) {
    EXPECT_TRUE(victims.count(p.path)) << p.path;
    EXPECT_NE(p.reason.find("keys/" + victim + ".kek.der"), std::string::npos) << p.reason;
    EXPECT_NE(p.reason.find("No such file"), std::string::npos) << p.reason;
    EXPECT_NE(p.reason.find("stay staged"), std::string::npos) << p.reason;
    EXPECT_NE(p.reason.find("restore the file"), std::string::npos) << p.reason;
    EXPECT_FALSE(fs::exists(out / p.path)) << p.path;
  }
  expect_every_message_opens(victims);

  // Damaged: a byte of the encrypted key flipped near the end of the file.
  std::string damaged = saved;
  damaged[damaged.size() - 5] = static_cast<char>(damaged[damaged.size() - 5] ^ 0x40);
  write_all(file, damaged);
  auto again = run_reencrypt({"alice", "bob", "carol"}, custody_key.get());
  ASSERT_TRUE(again.ok()) << again.error().message;
  EXPECT_EQ(again->already_done, expected.size() - victims.size());
  EXPECT_EQ(again->this_run[kFailed], victims.size());
  ASSERT_FALSE(again->problems.empty());
  for (const auto& p : again->problems) {
    EXPECT_NE(p.reason.find("keys/" + victim + ".kek.der"), std::string::npos) << p.reason;
    EXPECT_NE(p.reason.find("damaged"), std::string::npos) << p.reason;
    EXPECT_EQ(p.reason.find(kek_hex), std::string::npos);
  }

  // Restored from a backup: the rest comes out, byte-identical.
  write_all(file, saved);
  auto last = run_reencrypt({"alice", "bob", "carol"}, custody_key.get());
  ASSERT_TRUE(last.ok()) << last.error().message;
  EXPECT_EQ(last->this_run[kReencrypted], victims.size());
  EXPECT_EQ(last->this_run.count(kFailed), 0u);
  expect_every_message_opens();
  expect_no_plaintext_on_disk();
}

}  // namespace
}  // namespace kmsd::dr::fixture

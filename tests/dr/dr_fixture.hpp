// The disaster-recovery test fixture: a temporary directory with a store of real S/MIME and CMS
// messages (made by OpenSSL in process and by the `openssl cms` command) to three users with key
// histories of two keys each, plus plain, damaged and foreign messages, the users' PKCS#12
// files, their new certificates and keys, and a DR custody certificate and key.
#pragma once

#include <fcntl.h>
#include <openssl/cms.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <signal.h>
#include <sqlite3.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cctype>
#include <chrono>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <thread>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "common/files.hpp"
#include "daemon/ca/issuer.hpp"
#include "daemon/dr/custody.hpp"
#include "daemon/dr/keyring.hpp"
#include "daemon/dr/manifest.hpp"
#include "daemon/dr/message.hpp"
#include "daemon/dr/pipeline.hpp"
#include "daemon/dr/staging_key.hpp"
#include "tests/support/sandbox.hpp"

namespace kmsd::dr::fixture {

namespace fs = std::filesystem;
using kmsd::testing::run_command;
using kmsd::testing::TempDir;

inline constexpr const char* kPass = "drill-passphrase";

inline std::string read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline void write_all(const fs::path& p, std::string_view data, unsigned mode = 0600) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary) << data;
  ::chmod(p.c_str(), mode);
}

inline std::vector<std::uint8_t> random_serial() {
  std::vector<std::uint8_t> s(16);
  RAND_bytes(s.data(), 16);
  s[0] &= 0x7f;
  s[0] |= 0x01;
  return s;
}

inline ossl::EvpPkeyPtr make_key(hsm::KeyType t) {
  auto k = ca::generate_key(t);
  EXPECT_TRUE(k.ok());
  return std::move(*k);
}

inline std::string pem_key(EVP_PKEY* k) {
  auto p = ossl::privkey_to_pem(k);
  return std::string(p->view());
}

// A software CA standing in for the old (and new) KMS CA.
struct TestCa {
  ossl::EvpPkeyPtr key = make_key(hsm::KeyType::kEcP256);
  ossl::X509Ptr cert;
  explicit TestCa(const std::string& cn) {
    auto name = ca::parse_subject("/O=Drill/CN=" + cn);
    ca::IssueRequest r;
    r.profile = ca::Profile::kCa;
    r.subject = name->get();
    r.public_key = key.get();
    r.validity = std::chrono::hours(24 * 30);
    r.serial = random_serial();
    auto c = ca::issue(r, nullptr, key.get(), EVP_sha256());
    EXPECT_TRUE(c.ok()) << (c.ok() ? "" : c.error().message);
    cert = std::move(*c);
  }
  ossl::X509Ptr issue(EVP_PKEY* subject_key, const std::string& cn) {
    auto name = ca::parse_subject("/O=Drill/CN=" + cn);
    ca::IssueRequest r;
    r.profile = ca::Profile::kUser;
    r.subject = name->get();
    r.public_key = subject_key;
    r.validity = std::chrono::hours(24 * 30);
    r.serial = random_serial();
    r.key_usage = {EVP_PKEY_base_id(subject_key) == EVP_PKEY_EC ? "keyAgreement"
                                                                : "keyEncipherment"};
    auto c = ca::issue(r, cert.get(), key.get(), EVP_sha256());
    EXPECT_TRUE(c.ok()) << (c.ok() ? "" : c.error().message);
    return std::move(*c);
  }
};

struct User {
  std::string name;
  std::vector<ossl::EvpPkeyPtr> old_keys;  // the key history: RSA-2048, then EC P-256
  std::vector<ossl::X509Ptr> old_certs;
  ossl::EvpPkeyPtr new_key;
  ossl::X509Ptr new_cert;
};

struct Expected {
  std::string status;
  std::string plaintext;  // the encrypted content, for encrypted messages
  std::string user;       // who can read it
  std::string format;
};

inline std::string encrypt_mime(const std::string& content, std::vector<X509*> to,
                                const std::string& headers, bool der) {
  ossl::BioPtr in(BIO_new_mem_buf(content.data(), static_cast<int>(content.size())));
  ossl::X509StackPtr certs(sk_X509_new_null());
  for (auto* c : to) {
    X509_up_ref(c);
    sk_X509_push(certs.get(), c);
  }
  CmsPtr cms(CMS_encrypt(certs.get(), in.get(), EVP_aes_256_cbc(), CMS_BINARY));
  EXPECT_TRUE(cms);
  ossl::BioPtr out(BIO_new(BIO_s_mem()));
  if (der)
    i2d_CMS_bio(out.get(), cms.get());
  else
    SMIME_write_CMS(out.get(), cms.get(), nullptr, 0);
  char* p = nullptr;
  long n = BIO_get_mem_data(out.get(), &p);
  return headers + std::string(p, static_cast<std::size_t>(n));
}

class DrTest : public ::testing::Test {
 protected:
  TempDir tmp;
  fs::path store = tmp.path() / "store";
  fs::path staging = tmp.path() / "staging";
  fs::path keys = tmp.path() / "keys";
  fs::path out = tmp.path() / "out";
  fs::path recipients = tmp.path() / "recipients";
  fs::path work = tmp.path() / "work";  // certificates and keys for the openssl CLI
  TestCa old_ca{"Old KMS CA"};
  TestCa new_ca{"New KMS CA"};
  std::vector<User> users;
  ossl::EvpPkeyPtr custody_key = make_key(hsm::KeyType::kRsa3072);
  ossl::X509Ptr custody_cert;
  std::map<std::string, Expected> expected;  // store path -> what must happen
  int counter = 0;
  // Staged records must be sealed under their run's staging key (a KEKRecipientInfo); false
  // where a test stages some the way earlier versions did (to the custody certificate).
  bool expect_kek_records = true;
  std::map<std::string, SecretBytes> keks;  // run -> KEK, as kek_of_run() opened it
  // The custody key and certificate the KEK files are opened with, when they are not
  // custody_key / custody_cert (a custody key on a token).
  EVP_PKEY* kek_opener = nullptr;
  X509* kek_opener_cert = nullptr;

  void SetUp() override {
    fs::create_directories(work);
    custody_cert = new_ca.issue(custody_key.get(), "DR custody");
    write_all(work / "custody.pem", *ossl::x509_to_pem(custody_cert.get()));
    auto p12 = ca::make_pkcs12(custody_key.get(), custody_cert.get(), new_ca.cert.get(),
                               "DR custody", SecretBytes::from_string(kPass));
    ASSERT_TRUE(p12.ok());
    write_all(work / "custody.p12", std::string(p12->begin(), p12->end()));
    write_all(work / "custody.pass", kPass);
    for (const char* name : {"alice", "bob", "carol"}) {
      User u;
      u.name = name;
      u.old_keys.push_back(make_key(hsm::KeyType::kRsa2048));
      u.old_keys.push_back(make_key(hsm::KeyType::kEcP256));
      std::vector<ca::Pkcs12Entry> entries;
      for (std::size_t i = 0; i < u.old_keys.size(); ++i) {
        u.old_certs.push_back(old_ca.issue(u.old_keys[i].get(), name));
        entries.push_back({u.old_keys[i].get(), u.old_certs[i].get(),
                           std::string(name) + " (encryption, key " + std::to_string(i + 1) + ")"});
      }
      auto bundle =
          ca::make_pkcs12_bundle(entries, old_ca.cert.get(), SecretBytes::from_string(kPass));
      ASSERT_TRUE(bundle.ok());
      write_all(keys / (u.name + ".p12"), std::string(bundle->begin(), bundle->end()));
      u.new_key = make_key(users.size() == 1 ? hsm::KeyType::kEcP256 : hsm::KeyType::kRsa2048);
      u.new_cert = new_ca.issue(u.new_key.get(), name);
      write_all(work / (u.name + "-new.pem"), *ossl::x509_to_pem(u.new_cert.get()));
      write_all(work / (u.name + "-new.key"), pem_key(u.new_key.get()));
      write_all(work / (u.name + "-old1.pem"), *ossl::x509_to_pem(u.old_certs[0].get()));
      write_all(work / (u.name + "-old1.key"), pem_key(u.old_keys[0].get()));
      users.push_back(std::move(u));
    }
    write_all(tmp.path() / "keys.pass", kPass);
  }

  std::string marker() { return "SECRET-PLAINTEXT-" + std::to_string(++counter) + "-ZQX"; }

  // The content of an encrypted message: a MIME entity with a unique marker.
  std::string content(const std::string& m) {
    return "Content-Type: text/plain; charset=utf-8\r\n\r\nThe quarterly numbers: " + m +
           "\r\nbinary tail \x01\x02\xff end\r\n";
  }

  std::string headers(const std::string& to, int n) {
    return "From: sender@example.org\nTo: " + to + "@example.org\nSubject: message " +
           std::to_string(n) + "\nDate: Tue, 1 Dec 2026 10:00:00 +0000\n";
  }

  // Encrypted messages to every user, under each old key, in all three layouts.
  void add_encrypted(int per_user_and_key) {
    for (auto& u : users) {
      for (std::size_t k = 0; k < u.old_keys.size(); ++k) {
        for (int i = 0; i < per_user_and_key; ++i) {
          const std::string m = marker();
          const std::string pt = content(m);
          const int n = counter;
          std::string rel;
          std::string format = "mime";
          std::string data;
          switch (n % 3) {
            case 0:
              rel = "Maildir/" + std::string(n % 2 ? "cur/" : "new/") + std::to_string(n) +
                    ".M1P2.host:2,S";
              data = encrypt_mime(pt, {u.old_certs[k].get()}, headers(u.name, n), false);
              break;
            case 1:
              rel = "eml/" + u.name + "/" + std::to_string(n) + ".eml";
              data = encrypt_mime(pt, {u.old_certs[k].get()}, headers(u.name, n), false);
              break;
            default:
              rel = "p7m/" + u.name + "/" + std::to_string(n) + ".p7m";
              format = "der";
              data = encrypt_mime(pt, {u.old_certs[k].get()}, "", true);
          }
          write_all(store / rel, data, 0644);
          expected[rel] = {kStaged, pt, u.name, format};
        }
      }
    }
  }

  void add_others() {
    // plain mail
    write_all(store / "Maildir/cur/plain.1:2,S", headers("alice", 0) + "\nhello, not secret\n");
    expected["Maildir/cur/plain.1:2,S"] = {kNotEncrypted, "", "", "mime"};
    // damaged S/MIME (garbage base64) and a truncated DER file
    std::string good = encrypt_mime(content("x"), {users[0].old_certs[0].get()}, "", false);
    std::string broken = good.substr(0, good.find("\n\n") + 2) + "!!!! not base64 at all !!!!\n";
    write_all(store / "eml/damaged.eml", broken);
    expected["eml/damaged.eml"] = {kDamaged, "", "", "mime"};
    std::string der = encrypt_mime(content("y"), {users[0].old_certs[0].get()}, "", true);
    write_all(store / "p7m/truncated.p7m", der.substr(0, der.size() / 2));
    expected["p7m/truncated.p7m"] = {kDamaged, "", "", "der"};
    // encrypted to someone whose key nobody has
    auto stranger_key = make_key(hsm::KeyType::kRsa2048);
    auto stranger = old_ca.issue(stranger_key.get(), "stranger");
    write_all(store / "Maildir/new/foreign.2",
              encrypt_mime(content("foreign"), {stranger.get()}, headers("stranger", 0), false));
    expected["Maildir/new/foreign.2"] = {kUnknownRecipient, "", "", "mime"};
    // a Maildir delivery in progress is not a message yet
    write_all(store / "Maildir/tmp/inflight.3", "partial");
  }

  // One message made by the openssl command line, MIME and DER, to alice's first old key.
  void add_openssl_cli() {
    for (const char* form : {"SMIME", "DER"}) {
      const std::string m = marker();
      const std::string pt = content(m);
      const fs::path in = work / "pt.tmp";
      write_all(in, pt);
      const std::string rel = std::string(form) == "DER"
                                  ? "p7m/cli-" + std::to_string(counter) + ".der"
                                  : "eml/cli-" + std::to_string(counter) + ".eml";
      std::string log;
      const std::string cmd = "openssl cms -encrypt -binary -aes256 -in '" + in.string() +
                              "' -outform " + form + " -out '" + (store / rel).string() +
                              "' -recip '" + (work / "alice-old1.pem").string() +
                              "' -subject 'made by openssl cms'";
      fs::create_directories((store / rel).parent_path());
      ASSERT_EQ(run_command(cmd, &log), 0) << log;
      fs::remove(in);  // the plaintext input must not stay on disk
      expected[rel] = {kStaged, pt, "alice", std::string(form) == "DER" ? "der" : "mime"};
    }
  }

  KeyRing load_keys() {
    SecretBytes pass = SecretBytes::from_string(kPass);
    KeyDirOptions o;
    o.dir = keys;
    o.default_passphrase = &pass;
    auto r = load_key_dir(o);
    EXPECT_TRUE(r.ok()) << (r.ok() ? "" : r.error().message);
    return std::move(*r);
  }

  // PER_MESSAGE_CUSTODY: stage as earlier versions did (every record to the custody certificate).
  Result<RunSummary> run_predecrypt(const KeyRing& ring, std::size_t stop_after = 0,
                                    bool per_message_custody = false) {
    PredecryptOptions o;
    o.store = store;
    o.staging = staging;
    o.keys = &ring;
    o.custody_cert = custody_cert.get();
    o.threads = 2;
    o.stop_after = stop_after;
    o.per_message_custody = per_message_custody;
    return predecrypt(o);
  }

  Result<RunSummary> run_reencrypt(const std::set<std::string>& enrolled, EVP_PKEY* key,
                                   std::size_t stop_after = 0) {
    ReencryptOptions o;
    o.staging = staging;
    o.out = out;
    o.custody_key = key;
    o.custody_cert = custody_cert.get();
    for (auto& u : users)
      if (enrolled.count(u.name)) o.new_certs[u.name] = u.new_cert.get();
    o.threads = 2;
    o.stop_after = stop_after;
    return reencrypt(o);
  }

  std::map<std::string, ManifestRow> manifest_rows() {
    auto m = Manifest::open(staging / "manifest.db");
    EXPECT_TRUE(m.ok());
    auto rows = (*m)->rows();
    EXPECT_TRUE(rows.ok());
    std::map<std::string, ManifestRow> out_rows;
    for (auto& r : *rows) out_rows[r.path] = r;
    return out_rows;
  }

  // The staged record of ROW, read from its pack with pread at the row's offset (independently
  // of PackReader), and checked: the pack is 0600 and the bytes have the SHA-256 recorded.
  std::string staged_record(const ManifestRow& row) {
    EXPECT_EQ(row.status, kStaged) << row.path;
    EXPECT_FALSE(row.copy.pack.empty()) << row.path;
    const fs::path pack = staging / "packs" / row.copy.pack;
    struct stat st {};
    EXPECT_EQ(::stat(pack.c_str(), &st), 0) << pack;
    EXPECT_EQ(st.st_mode & 0777, 0600u) << pack;
    EXPECT_LE(row.copy.offset + row.copy.length, static_cast<std::uint64_t>(st.st_size)) << pack;
    std::string bytes(row.copy.length, '\0');
    const int fd = ::open(pack.c_str(), O_RDONLY | O_CLOEXEC);
    EXPECT_GE(fd, 0) << pack;
    const ssize_t n = ::pread(fd, bytes.data(), bytes.size(), static_cast<off_t>(row.copy.offset));
    ::close(fd);
    EXPECT_EQ(n, static_cast<ssize_t>(bytes.size())) << row.path;
    EXPECT_EQ(ossl::hex(ossl::sha256(
                  {reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size()})),
              row.copy.sha256)
        << row.path;
    return bytes;
  }

  // The DER CMS of ROW's staged record (after the message's own header lines).
  std::string staged_der(const ManifestRow& row) {
    return staged_record(row).substr(row.copy.header_length);
  }

  // The KEK of RUN: <staging>/keys/<run>.kek.der (checked: mode 0600, in a 0700 keys/, CMS
  // EnvelopedData with exactly one recipient, a KeyTransRecipientInfo to the custody
  // certificate) opened with the custody key by OpenSSL's CMS_decrypt, 32 bytes.
  const SecretBytes& kek_of_run(const std::string& run) {
    auto known = keks.find(run);
    if (known != keks.end()) return known->second;
    const fs::path file = staging / "keys" / (run + ".kek.der");
    struct stat st {};
    EXPECT_EQ(::stat(file.c_str(), &st), 0) << file;
    EXPECT_EQ(st.st_mode & 0777, 0600u) << file;
    EXPECT_EQ(::stat((staging / "keys").c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0700u);
    const std::string der = read_all(file);
    const unsigned char* p = reinterpret_cast<const unsigned char*>(der.data());
    CmsPtr cms(d2i_CMS_ContentInfo(nullptr, &p, static_cast<long>(der.size())));
    EVP_PKEY* key = kek_opener != nullptr ? kek_opener : custody_key.get();
    X509* cert = kek_opener_cert != nullptr ? kek_opener_cert : custody_cert.get();
    SecretBytes kek;
    EXPECT_TRUE(cms) << file;
    if (cms) {
      STACK_OF(CMS_RecipientInfo)* ris = CMS_get0_RecipientInfos(cms.get());
      EXPECT_EQ(sk_CMS_RecipientInfo_num(ris), 1) << file;
      if (sk_CMS_RecipientInfo_num(ris) == 1) {
        CMS_RecipientInfo* ri = sk_CMS_RecipientInfo_value(ris, 0);
        EXPECT_EQ(CMS_RecipientInfo_type(ri), CMS_RECIPINFO_TRANS) << file;
        EXPECT_EQ(CMS_RecipientInfo_ktri_cert_cmp(ri, cert), 0) << file;
      }
      ossl::BioPtr out(BIO_new(BIO_s_secmem()));
      EXPECT_EQ(CMS_decrypt(cms.get(), key, cert, nullptr, out.get(), CMS_BINARY), 1)
          << file << ": " << ossl::drain_errors();
      char* data = nullptr;
      const long n = BIO_get_mem_data(out.get(), &data);
      EXPECT_EQ(n, 32) << file;
      if (n > 0)
        kek = SecretBytes(reinterpret_cast<const std::uint8_t*>(data), static_cast<std::size_t>(n));
    }
    return keks.emplace(run, std::move(kek)).first->second;
  }

  // The content of ROW's staged copy. A record sealed under a staging key must have exactly one
  // recipient, a KEKRecipientInfo whose key identifier is its pack's run id, and opens with that
  // run's KEK (CMS_decrypt_set1_key); otherwise (only when !expect_kek_records) it must be
  // EnvelopedData to the custody certificate only, opened with the custody key.
  std::string open_staged(const ManifestRow& row) {
    const std::string der = staged_der(row);
    ParsedMessage pm = parse_message(
        {reinterpret_cast<const std::uint8_t*>(der.data()), der.size()}, Format::kDer);
    EXPECT_EQ(pm.kind, Kind::kEncrypted) << row.path;
    if (pm.kind != Kind::kEncrypted) return {};
    STACK_OF(CMS_RecipientInfo)* ris = CMS_get0_RecipientInfos(pm.cms.get());
    EXPECT_EQ(sk_CMS_RecipientInfo_num(ris), 1) << row.path;
    if (sk_CMS_RecipientInfo_num(ris) != 1) return {};
    CMS_RecipientInfo* ri = sk_CMS_RecipientInfo_value(ris, 0);
    const int type = CMS_RecipientInfo_type(ri);
    if (expect_kek_records) {
      EXPECT_EQ(type, CMS_RECIPINFO_KEK) << row.path;
    }
    ossl::BioPtr pt;
    if (type == CMS_RECIPINFO_KEK) {
      EXPECT_TRUE(pm.recipients.empty()) << row.path;  // no certificate opens it
      ASN1_OCTET_STRING* id = nullptr;
      EXPECT_EQ(CMS_RecipientInfo_kekri_get0_id(ri, nullptr, &id, nullptr, nullptr, nullptr), 1);
      const std::string run = run_of_pack(row.copy.pack);
      EXPECT_FALSE(run.empty()) << row.copy.pack;
      EXPECT_EQ(std::string(reinterpret_cast<const char*>(ASN1_STRING_get0_data(id)),
                            static_cast<std::size_t>(ASN1_STRING_length(id))),
                run)
          << row.path;
      const SecretBytes& kek = kek_of_run(run);
      EXPECT_EQ(
          CMS_decrypt_set1_key(pm.cms.get(), const_cast<std::uint8_t*>(kek.data()), kek.size(),
                               reinterpret_cast<const unsigned char*>(run.data()), run.size()),
          1)
          << row.path << ": " << ossl::drain_errors();
      pt.reset(BIO_new(BIO_s_secmem()));
      EXPECT_EQ(CMS_decrypt(pm.cms.get(), nullptr, nullptr, nullptr, pt.get(), CMS_BINARY), 1)
          << row.path << ": " << ossl::drain_errors();
    } else {
      EXPECT_EQ(type, CMS_RECIPINFO_TRANS) << row.path;
      EXPECT_EQ(pm.recipients.size(), 1u) << row.path;
      if (pm.recipients.size() != 1) return {};
      EXPECT_EQ(pm.recipients.at(0), recipient_ids_of_cert(custody_cert.get())[0]) << row.path;
      auto opened = decrypt(pm.cms.get(), custody_key.get(), custody_cert.get());
      EXPECT_TRUE(opened.ok()) << row.path << ": " << (opened.ok() ? "" : opened.error().message);
      if (!opened.ok()) return {};
      pt = std::move(*opened);
    }
    char* p = nullptr;
    const long n = BIO_get_mem_data(pt.get(), &p);
    return std::string(p, static_cast<std::size_t>(std::max(0L, n)));
  }

  // The run ids that have a KEK file in the staging directory.
  std::set<std::string> kek_runs() {
    std::set<std::string> runs;
    if (fs::exists(staging / "keys"))
      for (const auto& f : fs::directory_iterator(staging / "keys")) {
        const std::string name = f.path().filename().string();
        if (name.ends_with(".tmp")) continue;  // a killed run's temporary file
        const auto ext = name.rfind(".kek.der");
        EXPECT_NE(ext, std::string::npos) << name;
        if (ext != std::string::npos) runs.insert(name.substr(0, ext));
      }
    return runs;
  }

  // The pack files in the staging directory.
  std::set<std::string> pack_files() {
    std::set<std::string> names;
    if (fs::exists(staging / "packs"))
      for (const auto& f : fs::directory_iterator(staging / "packs"))
        names.insert(f.path().filename().string());
    return names;
  }

  // Every file under the temporary directory, searched for every encrypted message's marker,
  // and for every run's staging key (from its KEK file, opened with the custody key): its raw
  // 32 bytes and its hex in either case.
  void expect_no_plaintext_on_disk() {
    std::vector<std::string> markers;
    for (const auto& [path, e] : expected)
      if (!e.plaintext.empty()) markers.push_back(e.plaintext.substr(e.plaintext.find("SECRET")));
    std::vector<std::string> kek_needles;  // test memory only; never written anywhere
    for (const auto& run : kek_runs()) {
      const SecretBytes& kek = kek_of_run(run);
      ASSERT_EQ(kek.size(), 32u) << run;
      kek_needles.emplace_back(kek.view());
      std::string hex = ossl::hex(kek.span());
      kek_needles.push_back(hex);
      for (auto& c : hex) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
      kek_needles.push_back(hex);
    }
    std::size_t scanned = 0;
    for (const auto& f : fs::recursive_directory_iterator(tmp.path())) {
      if (!f.is_regular_file()) continue;
      const std::string data = read_all(f.path());
      ++scanned;
      for (const auto& m : markers) {
        const std::string needle = m.substr(0, m.find("-ZQX") + 4);
        ASSERT_EQ(data.find(needle), std::string::npos) << needle << " found in " << f.path();
      }
      for (const auto& k : kek_needles)
        ASSERT_EQ(data.find(k), std::string::npos) << "a run's staging key found in " << f.path();
    }
    EXPECT_GT(scanned, expected.size());
  }

  // `openssl cms -decrypt -binary` of OUT/REL with USER's new key.
  std::string openssl_decrypt(const std::string& rel, const std::string& user, bool der) {
    const fs::path result = work / "decrypted.tmp";
    std::string log;
    const std::string cmd =
        "openssl cms -decrypt -binary -in '" + (out / rel).string() + "' -inform " +
        (der ? "DER" : "SMIME") + " -recip '" + (work / (user + "-new.pem")).string() +
        "' -inkey '" + (work / (user + "-new.key")).string() + "' -out '" + result.string() + "'";
    EXPECT_EQ(run_command(cmd, &log), 0) << cmd << "\n" << log;
    std::string got = read_all(result);
    fs::remove(result);
    return got;
  }

  // Every message of EXPECTED in OUT opens with `openssl cms -decrypt` and its user's new key,
  // byte-identical to what was encrypted (EXCEPT: store paths left out).
  void expect_every_message_opens(const std::set<std::string>& except = {}) {
    for (const auto& [path, e] : expected) {
      if (except.count(path)) continue;
      EXPECT_EQ(openssl_decrypt(path, e.user, e.format == "der"), e.plaintext) << path;
    }
  }
};

}  // namespace kmsd::dr::fixture

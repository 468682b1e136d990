// EnrollmentService against the whole stack on a throw-away SoftHSM token: a CA made by
// provision::initialize, the SQLite store, the audit chain, the policy in force and the
// UserService that hands out tokens. No mocks: every certificate is signed on the token and
// every escrowed key sealed by it.
#include <openssl/evp.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>
#include <sqlite3.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <fstream>
#include <iterator>
#include <latch>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/clock.hpp"
#include "daemon/ca/issuer.hpp"
#include "daemon/enroll/enrollment.hpp"
#include "daemon/lifecycle/enrollment_token.hpp"
#include "daemon/provision/initializer.hpp"
#include "daemon/users/user_service.hpp"
#include "tests/support/logged_in_token.hpp"

namespace kmsd {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;
using json = nlohmann::json;
using store::CertKind;
using store::UserState;

constexpr const char* kCrlUrl = "http://kms.example.test/crl";
constexpr const char* kOcspUrl = "http://kms.example.test/ocsp";
constexpr const char* kAdmin = "root";
constexpr int kKeyCompromise = 1;
constexpr int kSuperseded = 4;

using GeneralNamesPtr = std::unique_ptr<GENERAL_NAMES, ossl::Deleter<GENERAL_NAMES_free>>;

ossl::X509Ptr ref(X509* c) {
  if (c == nullptr) return nullptr;
  X509_up_ref(c);
  return ossl::X509Ptr(c);
}

ossl::EvpPkeyPtr generate(hsm::KeyType type) {
  auto k = ca::generate_key(type);
  EXPECT_TRUE(k.ok()) << k.error().message;
  return k.ok() ? std::move(*k) : nullptr;
}

// Keys the policy never allows (hsm::KeyType cannot even name them).
ossl::EvpPkeyPtr ec_p521_key() {
  return ossl::EvpPkeyPtr(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-521"));
}
ossl::EvpPkeyPtr rsa_1024_key() {
  return ossl::EvpPkeyPtr(EVP_PKEY_Q_keygen(nullptr, nullptr, "RSA", static_cast<size_t>(1024)));
}

ossl::EvpPkeyPtr key_from_pkcs8(const SecretBytes& der) {
  const unsigned char* p = der.data();
  return ossl::EvpPkeyPtr(d2i_AutoPrivateKey(nullptr, &p, static_cast<long>(der.size())));
}

// True when DER is a PKCS#8 PrivateKeyInfo (not a bare SEC1 / PKCS#1 key).
bool is_pkcs8(const SecretBytes& der) {
  const unsigned char* p = der.data();
  std::unique_ptr<PKCS8_PRIV_KEY_INFO, ossl::Deleter<PKCS8_PRIV_KEY_INFO_free>> info(
      d2i_PKCS8_PRIV_KEY_INFO(nullptr, &p, static_cast<long>(der.size())));
  return info != nullptr && p == der.data() + der.size();
}

std::span<const std::uint8_t> bytes_of(const std::string& s) {
  return {reinterpret_cast<const std::uint8_t*>(s.data()), s.size()};
}

bool contains(const std::vector<std::uint8_t>& hay, std::span<const std::uint8_t> needle) {
  return !needle.empty() &&
         std::search(hay.begin(), hay.end(), needle.begin(), needle.end()) != hay.end();
}

std::vector<std::string> san_emails(X509* cert) {
  std::vector<std::string> out;
  GeneralNamesPtr names(
      static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr)));
  if (!names) return out;
  for (int i = 0; i < sk_GENERAL_NAME_num(names.get()); ++i) {
    const GENERAL_NAME* n = sk_GENERAL_NAME_value(names.get(), i);
    if (n->type != GEN_EMAIL) continue;
    out.emplace_back(reinterpret_cast<const char*>(ASN1_STRING_get0_data(n->d.rfc822Name)),
                     static_cast<std::size_t>(ASN1_STRING_length(n->d.rfc822Name)));
  }
  return out;
}

// The extension NID of CERT as `openssl x509 -text` prints it; "" when absent.
std::string ext_text(X509* cert, int nid) {
  const int idx = X509_get_ext_by_NID(cert, nid, -1);
  if (idx < 0) return "";
  ossl::BioPtr bio(BIO_new(BIO_s_mem()));
  if (X509V3_EXT_print(bio.get(), X509_get_ext(cert, idx), 0, 0) != 1) return "";
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<std::size_t>(n));
}

bool ext_critical(X509* cert, int nid) {
  const int idx = X509_get_ext_by_NID(cert, nid, -1);
  return idx >= 0 && X509_EXTENSION_get_critical(X509_get_ext(cert, idx)) == 1;
}

constexpr std::uint32_t kAnyUsage = UINT32_MAX;  // X509_get_key_usage without the extension

class EnrollmentTest : public testing::TokenSandbox {
 protected:
  void SetUp() override {
    TokenSandbox::SetUp();
    token_ = testing::open_logged_in_token(token());
    ASSERT_NE(token_, nullptr);
    db_ = dir() / "kmsd.db";
    auto st = store::Store::open(db_);
    ASSERT_TRUE(st.ok()) << st.error().message;
    store_ = std::move(*st);
    config::Config cfg;
    cfg.token.module = testing::kSoftHsmModule;
    cfg.token.uri = token().uri();
    cfg.store.path = db_;
    provision::AdminOptions admin{kAdmin, dir() / "admin.p12",
                                  SecretBytes::from_string("passphrase")};
    auto init = provision::initialize(cfg, *token_, *store_, admin);
    ASSERT_TRUE(init.ok()) << init.error().message;
    auto ca = provision::load_ca_certificate(*store_);
    ASSERT_TRUE(ca.ok()) << ca.error().message;
    ca_ = std::move(*ca);
    policy_ = std::make_unique<policy::PolicyInForce>(
        std::make_shared<const policy::PolicyCheck>(policy::PolicyCheck::create({}).value()));
    audit_ = std::make_unique<audit::AuditLog>(*store_, *token_);
    users_ = std::make_unique<users::UserService>(*store_, *token_, *audit_, *policy_,
                                                  [this] { return token_settings_; });
    settings_.crl_url = kCrlUrl;
    settings_.ocsp_url = kOcspUrl;
    enroll_ = std::make_unique<enroll::EnrollmentService>(
        *store_, *token_, *audit_, *policy_, [this] { return settings_; },
        [this] { return ref(ca_.get()); });
    enroll_->on_revocation([this] { ++revocations_; });
  }

  // The services and the store closed, so that the SQLite file is complete on disk.
  void close_store() {
    enroll_.reset();
    users_.reset();
    audit_.reset();
    store_.reset();
  }

  users::UserInput input(const std::string& user, const std::string& name = "Ann Example") {
    return {user, user + "@example.com", name, std::nullopt};
  }

  // Enables USER and returns the token as the administrator hands it out.
  SecretBytes enable(const std::string& user, const std::string& name = "Ann Example") {
    auto issued = users_->enable(input(user, name), kAdmin);
    EXPECT_TRUE(issued.ok()) << issued.error().message;
    return issued.ok() ? std::move(issued->token) : SecretBytes();
  }

  static enroll::SigningRequest request(EVP_PKEY* key, int version = 3) {
    enroll::SigningRequest req;
    req.public_key = key;
    req.x509_version = version;
    req.requested_subject = "/CN=Mallory/O=Not The Administrator's Choice";
    return req;
  }

  // A well-formed token that is not TOKEN (its first character changed).
  static SecretBytes wrong(const SecretBytes& token) {
    SecretBytes w = token.clone();
    w.data()[0] = w.data()[0] == '0' ? '1' : '0';
    return w;
  }

  // As a client verifies it: from its DER (the service's certificates carry no decoded key).
  bool verifies_against_ca(X509* issued) {
    auto cert = ossl::x509_from_der(ossl::x509_to_der(issued).value()).value();
    ossl::X509StorePtr store(X509_STORE_new());
    X509_STORE_add_cert(store.get(), ca_.get());
    ossl::X509StoreCtxPtr vctx(X509_STORE_CTX_new());
    X509_STORE_CTX_init(vctx.get(), store.get(), cert.get(), nullptr);
    return X509_verify_cert(vctx.get()) == 1;
  }

  ossl::X509NamePtr enabled_subject(const std::string& user, const std::string& name) {
    policy::UserIdentity id{user, user + "@example.com", name, ""};
    return std::move(policy_->current()->subject_for(id).value());
  }

  store::UserRecord user(const std::string& id) { return store_->find_user(id).value().value(); }
  store::EnrollmentTokenRecord token_record(const std::string& id) {
    return store_->find_enrollment_token(id).value().value();
  }
  int depth(const std::string& id) { return store_->key_history_depth(id).value(); }
  std::vector<store::CertificateRecord> certs_of(const std::string& id) {
    return store_->certificates_of_user(id).value();
  }
  store::CertificateRecord cert_record(X509* cert) {
    return store_->find_certificate(ca::serial_hex(cert)).value().value();
  }

  // Every audit record with ACTION, oldest first.
  std::vector<json> audited(const std::string& action) {
    std::vector<json> out;
    auto st = audit_->export_records([&](const json& j) -> Status {
      if (j.value("action", "") == action) out.push_back(j);
      return {};
    });
    EXPECT_TRUE(st.ok()) << st.error().message;
    return out;
  }

  void expect_audit_chain_intact() {
    auto rep = audit_->verify();
    ASSERT_TRUE(rep.ok()) << rep.error().message;
    EXPECT_TRUE(rep->ok()) << "record " << rep->first_bad.value_or(0) << ": " << rep->problem;
  }

  // Nothing of USER's was issued, escrowed or spent.
  void expect_nothing_recorded(const std::string& id) {
    EXPECT_TRUE(certs_of(id).empty());
    EXPECT_EQ(depth(id), 0);
    EXPECT_EQ(user(id).state, UserState::kEnabled);
    EXPECT_FALSE(token_record(id).used_at.has_value());
    EXPECT_EQ(token_record(id).failed_attempts, 0);
    EXPECT_TRUE(audited("user.enroll").empty());
  }

  std::filesystem::path db_;
  std::unique_ptr<hsm::Token> token_;
  std::unique_ptr<store::Store> store_;
  ossl::X509Ptr ca_;
  std::unique_ptr<policy::PolicyInForce> policy_;
  std::unique_ptr<audit::AuditLog> audit_;
  users::TokenSettings token_settings_;
  enroll::Settings settings_;
  std::unique_ptr<users::UserService> users_;
  std::unique_ptr<enroll::EnrollmentService> enroll_;
  std::atomic<int> revocations_{0};
};

// ---- enrollment with the right token ------------------------------------------------------------

TEST_F(EnrollmentTest, TheRightTokenMakesTheUserActiveWithTwoCertificatesAndAnEscrowedKey) {
  const SecretBytes tok = enable("ann");
  auto signing_key = generate(hsm::KeyType::kEcP256);
  const std::int64_t before = unix_now();
  auto e = enroll_->enroll("ann", tok, request(signing_key.get()));
  const std::int64_t after = unix_now();
  ASSERT_TRUE(e.ok()) << e.error().message;
  EXPECT_EQ(e->user_id, "ann");
  EXPECT_FALSE(e->recovered);

  // The user and the token.
  const auto u = user("ann");
  EXPECT_EQ(u.state, UserState::kActive);
  ASSERT_TRUE(u.last_enrolled_at.has_value());
  EXPECT_GE(*u.last_enrolled_at, before);
  EXPECT_LE(*u.last_enrolled_at, after);
  EXPECT_EQ(u.keys_from_version, 1);
  const auto t = token_record("ann");
  ASSERT_TRUE(t.used_at.has_value());
  EXPECT_EQ(t.failed_attempts, 0);

  // Two certificates recorded for the user, one of each kind, both as returned.
  X509* sign = e->signing_certificate.get();
  X509* enc = e->encryption_certificate.get();
  ASSERT_NE(sign, nullptr);
  ASSERT_NE(enc, nullptr);
  const auto certs = certs_of("ann");
  ASSERT_EQ(certs.size(), 2u);
  const auto sign_rec = cert_record(sign);
  const auto enc_rec = cert_record(enc);
  EXPECT_EQ(sign_rec.kind, CertKind::kSigning);
  EXPECT_EQ(enc_rec.kind, CertKind::kEncryption);
  EXPECT_EQ(sign_rec.user_id, "ann");
  EXPECT_EQ(enc_rec.user_id, "ann");
  EXPECT_EQ(sign_rec.der, ossl::x509_to_der(sign).value());
  EXPECT_EQ(enc_rec.der, ossl::x509_to_der(enc).value());
  EXPECT_FALSE(sign_rec.revoked_at.has_value());

  for (X509* c : {sign, enc}) {
    SCOPED_TRACE(ca::serial_hex(c));
    EXPECT_TRUE(verifies_against_ca(c));
    EXPECT_EQ(X509_get_version(c), X509_VERSION_3);
    // The identity the administrator enabled, not the subject the client asked for.
    EXPECT_EQ(X509_NAME_cmp(X509_get_subject_name(c), enabled_subject("ann", "Ann Example").get()),
              0)
        << ca::name_to_string(X509_get_subject_name(c));
    EXPECT_THAT(ca::name_to_string(X509_get_subject_name(c)), Not(HasSubstr("Mallory")));
    EXPECT_THAT(san_emails(c), ElementsAre("ann@example.com"));
    EXPECT_THAT(ext_text(c, NID_crl_distribution_points), HasSubstr(std::string("URI:") + kCrlUrl));
    EXPECT_THAT(ext_text(c, NID_info_access), HasSubstr(std::string("OCSP - URI:") + kOcspUrl));
    EXPECT_TRUE(ext_critical(c, NID_key_usage));
    EXPECT_EQ(X509_get_extended_key_usage(c), static_cast<std::uint32_t>(XKU_SMIME));
  }
  // [policy.signing] key_usage = [digitalSignature, nonRepudiation]; [policy.encryption] =
  // [keyEncipherment, keyAgreement], of which an EC key gets keyAgreement only.
  EXPECT_EQ(X509_get_key_usage(sign),
            static_cast<std::uint32_t>(KU_DIGITAL_SIGNATURE | KU_NON_REPUDIATION));
  EXPECT_EQ(X509_get_key_usage(enc), static_cast<std::uint32_t>(KU_KEY_AGREEMENT));
  EXPECT_TRUE(ca::public_key_matches(sign, signing_key.get()));

  // The delivered key: version 1, PKCS#8, the encryption certificate's key.
  ASSERT_EQ(e->keys.size(), 1u);
  const auto& k = e->keys[0];
  EXPECT_EQ(k.version, 1);
  EXPECT_EQ(k.algorithm, "ec-p256");
  EXPECT_EQ(k.key_id.size(), 32u);
  // (That it is PKCS#8 PrivateKeyInfo: DeliveredAndEscrowedKeysArePkcs8PrivateKeyInfo.)
  auto priv = key_from_pkcs8(k.pkcs8_der);
  ASSERT_NE(priv, nullptr);
  EXPECT_TRUE(ca::public_key_matches(enc, priv.get()));
  EXPECT_FALSE(ca::public_key_matches(sign, priv.get()));
  ASSERT_NE(k.certificate, nullptr);
  EXPECT_EQ(X509_cmp(k.certificate.get(), enc), 0);

  // Key history: depth 1, the sealed blob of that key, bound to its place.
  auto history = store_->key_history("ann").value();
  ASSERT_EQ(history.size(), 1u);
  const auto& h = history[0];
  EXPECT_EQ(h.version, 1);
  EXPECT_EQ(h.key_id, k.key_id);
  EXPECT_EQ(h.algorithm, "ec-p256");
  EXPECT_EQ(h.master_version, 1u);
  EXPECT_EQ(h.cert_serial, ca::serial_hex(enc));
  EXPECT_FALSE(contains(h.sealed_key, k.pkcs8_der.span()));
  auto opened = token_->open(h.sealed_key, bytes_of(enroll::escrow_aad("ann", h.key_id, 1)));
  ASSERT_TRUE(opened.ok()) << opened.error().message;
  EXPECT_TRUE(std::ranges::equal(opened->span(), k.pkcs8_der.span()));

  // The audit record, and the chain still verifies.
  const auto recs = audited("user.enroll");
  ASSERT_EQ(recs.size(), 1u);
  EXPECT_EQ(recs[0]["actor"], "user:ann");
  const json& d = recs[0]["details"];
  EXPECT_EQ(d["user"], "ann");
  EXPECT_EQ(d["channel"], "rest");
  EXPECT_EQ(d["previous_state"], "enabled");
  EXPECT_EQ(d["token_purpose"], "enroll");
  EXPECT_EQ(d["signing_serial"], ca::serial_hex(sign));
  EXPECT_EQ(d["encryption_serial"], ca::serial_hex(enc));
  EXPECT_EQ(d["key_version"], 1);
  EXPECT_EQ(d["key_id"], k.key_id);
  expect_audit_chain_intact();
}

TEST_F(EnrollmentTest, AnEscrowedBlobOpensOnlyWithTheAadOfItsOwnUserKeyVersionAndMasterKey) {
  const SecretBytes ann_tok = enable("ann");
  const SecretBytes bob_tok = enable("bob", "Bob Example");
  auto ann_key = generate(hsm::KeyType::kEcP256);
  auto bob_key = generate(hsm::KeyType::kEcP256);
  auto ann = enroll_->enroll("ann", ann_tok, request(ann_key.get()));
  auto bob = enroll_->enroll("bob", bob_tok, request(bob_key.get()));
  ASSERT_TRUE(ann.ok()) << ann.error().message;
  ASSERT_TRUE(bob.ok()) << bob.error().message;
  const auto h = store_->key_history("ann").value().at(0);

  // The token refuses every AAD but the one that names the blob's place.
  auto opens = [&](const std::string& aad) { return token_->open(h.sealed_key, bytes_of(aad)); };
  // (Format 2: the master version is not in the AAD but checked against the row, and a
  // format-1 AAD naming it does not open a format-2 blob.)
  EXPECT_TRUE(opens(enroll::escrow_aad("ann", h.key_id, 1)).ok());
  for (const std::string& aad :
       {enroll::escrow_aad("bob", h.key_id, 1), enroll::escrow_aad("ann", bob->keys[0].key_id, 1),
        enroll::escrow_aad("ann", h.key_id, 2), enroll::escrow_aad("ann", h.key_id, 1, 1)}) {
    auto r = opens(aad);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code, ErrorCode::kCrypto);
  }
  // Length-prefixed fields: moving characters between fields changes the AAD.
  EXPECT_NE(enroll::escrow_aad("ann", "ab", 1), enroll::escrow_aad("anna", "b", 1));

  // Ann's blob copied into Bob's row (the column master-key rotation may rewrite) does not
  // open for Bob: his key fetch fails, and Ann's still works.
  {
    sqlite3* raw = nullptr;
    ASSERT_EQ(sqlite3_open_v2(db_.c_str(), &raw, SQLITE_OPEN_READWRITE, nullptr), SQLITE_OK);
    std::unique_ptr<sqlite3, ossl::Deleter<sqlite3_close_v2>> db(raw);
    sqlite3_busy_timeout(db.get(), 5000);
    char* err = nullptr;
    const int rc = sqlite3_exec(db.get(),
                                "UPDATE key_history SET sealed_key = (SELECT sealed_key FROM "
                                "key_history WHERE user_id = 'ann' AND version = 1) WHERE "
                                "user_id = 'bob' AND version = 1",
                                nullptr, nullptr, &err);
    std::string message = err != nullptr ? err : "";
    sqlite3_free(err);
    ASSERT_EQ(rc, SQLITE_OK) << message;
    ASSERT_EQ(sqlite3_changes(db.get()), 1);
  }
  auto bob_keys = enroll_->keys_for(bob->signing_certificate.get());
  ASSERT_FALSE(bob_keys.ok());
  EXPECT_EQ(bob_keys.error().code, ErrorCode::kCrypto);
  auto ann_keys = enroll_->keys_for(ann->signing_certificate.get());
  ASSERT_TRUE(ann_keys.ok()) << ann_keys.error().message;
  ASSERT_EQ(ann_keys->size(), 1u);
  EXPECT_TRUE(std::ranges::equal((*ann_keys)[0].pkcs8_der.span(), ann->keys[0].pkcs8_der.span()));
}

TEST_F(EnrollmentTest, AnRsaEncryptionKeyGetsKeyEnciphermentOnly) {
  settings_.encryption_key_type = hsm::KeyType::kRsa2048;
  const SecretBytes tok = enable("ann");
  auto signing_key = generate(hsm::KeyType::kEcP256);
  auto e = enroll_->enroll("ann", tok, request(signing_key.get()));
  ASSERT_TRUE(e.ok()) << e.error().message;
  X509* enc = e->encryption_certificate.get();
  EXPECT_EQ(X509_get_key_usage(enc), static_cast<std::uint32_t>(KU_KEY_ENCIPHERMENT));
  EXPECT_EQ(X509_get_key_usage(e->signing_certificate.get()),
            static_cast<std::uint32_t>(KU_DIGITAL_SIGNATURE | KU_NON_REPUDIATION));
  ASSERT_EQ(e->keys.size(), 1u);
  EXPECT_EQ(e->keys[0].algorithm, "rsa-2048");
  auto priv = key_from_pkcs8(e->keys[0].pkcs8_der);
  ASSERT_NE(priv, nullptr);
  EXPECT_TRUE(EVP_PKEY_is_a(priv.get(), "RSA"));
  EXPECT_EQ(EVP_PKEY_get_bits(priv.get()), 2048);
  EXPECT_TRUE(ca::public_key_matches(enc, priv.get()));
  EXPECT_EQ(store_->key_history("ann").value().at(0).algorithm, "rsa-2048");
  EXPECT_TRUE(verifies_against_ca(enc));
}

// DeliveredKey::pkcs8_der and the escrowed blobs are PKCS#8 PrivateKeyInfo (not SEC1 or
// PKCS#1, which i2d_PrivateKey would write), as enrollment.hpp, store.hpp and DESIGN.md say.
TEST_F(EnrollmentTest, DeliveredAndEscrowedKeysArePkcs8PrivateKeyInfo) {
  auto signing_key = generate(hsm::KeyType::kEcP256);
  const SecretBytes ann_tok = enable("ann");
  auto ann = enroll_->enroll("ann", ann_tok, request(signing_key.get()));
  ASSERT_TRUE(ann.ok()) << ann.error().message;
  settings_.encryption_key_type = hsm::KeyType::kRsa2048;
  const SecretBytes bob_tok = enable("bob", "Bob Example");
  auto bob = enroll_->enroll("bob", bob_tok, request(signing_key.get()));
  ASSERT_TRUE(bob.ok()) << bob.error().message;
  for (const auto* e : {&*ann, &*bob}) {
    SCOPED_TRACE(e->user_id);
    ASSERT_EQ(e->keys.size(), 1u);
    EXPECT_TRUE(is_pkcs8(e->keys[0].pkcs8_der));
    const auto h = store_->key_history(e->user_id).value().at(0);
    auto opened = enroll::open_escrowed(*token_, h);
    ASSERT_TRUE(opened.ok()) << opened.error().message;
    EXPECT_TRUE(is_pkcs8(*opened));
    auto fetched = enroll_->keys_for(e->signing_certificate.get());
    ASSERT_TRUE(fetched.ok()) << fetched.error().message;
    EXPECT_TRUE(is_pkcs8(fetched->at(0).pkcs8_der));
  }
}

TEST_F(EnrollmentTest, UsagesFollowThePolicyInForceAtTheTimeOfTheRequest) {
  config::PolicyConfig pc;
  pc.signing = {{"digitalSignature"}, {"emailProtection", "clientAuth"}};
  pc.encryption = {{"keyAgreement"}, {}};
  policy_->replace(
      std::make_shared<const policy::PolicyCheck>(policy::PolicyCheck::create(pc).value()));
  const SecretBytes tok = enable("ann");
  auto signing_key = generate(hsm::KeyType::kRsa2048);
  auto e = enroll_->enroll("ann", tok, request(signing_key.get()));
  ASSERT_TRUE(e.ok()) << e.error().message;
  EXPECT_EQ(X509_get_key_usage(e->signing_certificate.get()),
            static_cast<std::uint32_t>(KU_DIGITAL_SIGNATURE));
  EXPECT_EQ(X509_get_extended_key_usage(e->signing_certificate.get()),
            static_cast<std::uint32_t>(XKU_SMIME | XKU_SSL_CLIENT));
  EXPECT_EQ(X509_get_key_usage(e->encryption_certificate.get()),
            static_cast<std::uint32_t>(KU_KEY_AGREEMENT));
  EXPECT_EQ(X509_get_ext_by_NID(e->encryption_certificate.get(), NID_ext_key_usage, -1), -1);
}

// ---- wrong, unknown, locked, expired and malformed tokens --------------------------------------

TEST_F(EnrollmentTest, AWrongTokenIsCountedAndAuditedWithTheSameAnswerAsAnUnknownUser) {
  const SecretBytes tok = enable("ann");
  auto key = generate(hsm::KeyType::kEcP256);
  auto bad = enroll_->enroll("ann", wrong(tok), request(key.get()));
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.error().code, ErrorCode::kPermissionDenied);
  EXPECT_THAT(bad.error().message, HasSubstr("not valid"));
  EXPECT_EQ(token_record("ann").failed_attempts, 1);
  EXPECT_FALSE(token_record("ann").used_at.has_value());
  EXPECT_EQ(user("ann").state, UserState::kEnabled);
  EXPECT_TRUE(certs_of("ann").empty());

  const auto failed = audited("user.enroll.failed");
  ASSERT_EQ(failed.size(), 1u);
  EXPECT_EQ(failed[0]["actor"], "user:ann");
  EXPECT_EQ(failed[0]["details"]["user"], "ann");
  EXPECT_EQ(failed[0]["details"]["failed_attempts"], 1);
  EXPECT_THAT(failed[0].dump(), Not(HasSubstr(std::string(tok.view()))));

  // An unknown user gets the very same answer, and nothing is counted anywhere.
  auto unknown = enroll_->enroll("nobody", tok, request(key.get()));
  ASSERT_FALSE(unknown.ok());
  EXPECT_EQ(unknown.error().code, ErrorCode::kPermissionDenied);
  EXPECT_EQ(unknown.error().message, bad.error().message);
  EXPECT_EQ(audited("user.enroll.failed").size(), 1u);
  EXPECT_FALSE(store_->find_user("nobody").value().has_value());

  // A second wrong attempt counts again; the right token still works afterwards.
  ASSERT_FALSE(enroll_->enroll("ann", wrong(tok), request(key.get())).ok());
  EXPECT_EQ(token_record("ann").failed_attempts, 2);
  EXPECT_EQ(audited("user.enroll.failed").size(), 2u);
  auto good = enroll_->enroll("ann", tok, request(key.get()));
  ASSERT_TRUE(good.ok()) << good.error().message;
  EXPECT_EQ(user("ann").state, UserState::kActive);
  expect_audit_chain_intact();
}

TEST_F(EnrollmentTest, AfterMaxFailedAttemptsTheRightTokenIsRefusedAsLocked) {
  settings_.max_failed_attempts = 3;
  const SecretBytes tok = enable("ann");
  auto key = generate(hsm::KeyType::kEcP256);
  for (int i = 1; i <= 3; ++i) {
    auto bad = enroll_->enroll("ann", wrong(tok), request(key.get()));
    ASSERT_FALSE(bad.ok());
    EXPECT_EQ(bad.error().code, ErrorCode::kPermissionDenied);
    EXPECT_EQ(token_record("ann").failed_attempts, i);
  }
  auto locked = enroll_->enroll("ann", tok, request(key.get()));
  ASSERT_FALSE(locked.ok());
  EXPECT_EQ(locked.error().code, ErrorCode::kPermissionDenied);
  EXPECT_THAT(locked.error().message, HasSubstr("locked"));
  EXPECT_THAT(locked.error().message, HasSubstr("reissue"));
  EXPECT_EQ(token_record("ann").failed_attempts, 3);  // a refusal as locked is not counted
  EXPECT_EQ(audited("user.enroll.failed").size(), 3u);
  EXPECT_TRUE(certs_of("ann").empty());
  EXPECT_EQ(depth("ann"), 0);
  EXPECT_FALSE(token_record("ann").used_at.has_value());
  EXPECT_EQ(user("ann").state, UserState::kEnabled);

  // The CMP path agrees: no secret to key a MAC with.
  auto pending = enroll_->pending_token("ann");
  ASSERT_FALSE(pending.ok());
  EXPECT_THAT(pending.error().message, HasSubstr("locked"));

  // A reissued token works again.
  auto reissued = users_->reissue("ann", kAdmin);
  ASSERT_TRUE(reissued.ok()) << reissued.error().message;
  auto e = enroll_->enroll("ann", reissued->token, request(key.get()));
  ASSERT_TRUE(e.ok()) << e.error().message;
  EXPECT_EQ(user("ann").state, UserState::kActive);
}

TEST_F(EnrollmentTest, AnExpiredTokenIsRefusedAndNotCounted) {
  token_settings_.ttl = std::chrono::seconds(1);
  const SecretBytes tok = enable("ann");
  std::this_thread::sleep_for(std::chrono::milliseconds(2100));
  auto key = generate(hsm::KeyType::kEcP256);
  auto e = enroll_->enroll("ann", tok, request(key.get()));
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.error().code, ErrorCode::kPermissionDenied);
  EXPECT_THAT(e.error().message, HasSubstr("expired"));
  expect_nothing_recorded("ann");
  auto pending = enroll_->pending_token("ann");
  ASSERT_FALSE(pending.ok());
  EXPECT_THAT(pending.error().message, HasSubstr("expired"));
}

TEST_F(EnrollmentTest, AMalformedTokenIsAnInvalidArgumentAndNotCounted) {
  const SecretBytes tok = enable("ann");
  auto key = generate(hsm::KeyType::kEcP256);
  for (const char* typed : {"ABCD-EFGH", "", "ABCD-EFGH-JKMN-PQRS-TVWX-YZ01-2"}) {
    SCOPED_TRACE(typed);
    auto e = enroll_->enroll("ann", SecretBytes::from_string(typed), request(key.get()));
    ASSERT_FALSE(e.ok());
    EXPECT_EQ(e.error().code, ErrorCode::kInvalidArgument);
    EXPECT_THAT(e.error().message, HasSubstr("24"));
    EXPECT_THAT(e.error().message, HasSubstr("not counted"));
    if (*typed != '\0') {
      EXPECT_THAT(e.error().message, Not(HasSubstr(typed)));
    }
  }
  expect_nothing_recorded("ann");
  EXPECT_TRUE(audited("user.enroll.failed").empty());
  ASSERT_TRUE(enroll_->enroll("ann", tok, request(key.get())).ok());
}

// ---- single use ---------------------------------------------------------------------------------

TEST_F(EnrollmentTest, ATokenWorksOnce) {
  const SecretBytes tok = enable("ann");
  auto key = generate(hsm::KeyType::kEcP256);
  ASSERT_TRUE(enroll_->enroll("ann", tok, request(key.get())).ok());
  auto again = enroll_->enroll("ann", tok, request(key.get()));
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.error().code, ErrorCode::kPermissionDenied);
  EXPECT_THAT(again.error().message, HasSubstr("already been used"));
  EXPECT_EQ(certs_of("ann").size(), 2u);
  EXPECT_EQ(depth("ann"), 1);
  EXPECT_EQ(audited("user.enroll").size(), 1u);
}

TEST_F(EnrollmentTest, TwoThreadsWithTheSameTokenAtOnceEnrollExactlyOnce) {
  // Several rounds, each a fresh user, so every way of losing (the token already used when
  // checked, spent by the winner during the loser's certificate work, or spent between the
  // two) gets its chance.
  for (const std::string id : {"ann", "bob", "cem", "dee", "eve", "fay"}) {
    SCOPED_TRACE(id);
    const SecretBytes tok = enable(id);
    ossl::EvpPkeyPtr keys[2] = {generate(hsm::KeyType::kEcP256), generate(hsm::KeyType::kEcP256)};
    std::optional<Result<enroll::Enrollment>> results[2];
    std::latch start(2);
    std::vector<std::thread> threads;
    for (int i = 0; i < 2; ++i) {
      threads.emplace_back([&, i] {
        start.arrive_and_wait();
        results[i].emplace(enroll_->enroll(id, tok, request(keys[i].get())));
      });
    }
    for (auto& t : threads) t.join();
    ASSERT_TRUE(results[0].has_value() && results[1].has_value());
    const int winners = (results[0]->ok() ? 1 : 0) + (results[1]->ok() ? 1 : 0);
    ASSERT_EQ(winners, 1) << (results[0]->ok() ? "" : results[0]->error().message) << " / "
                          << (results[1]->ok() ? "" : results[1]->error().message);
    const int w = results[0]->ok() ? 0 : 1;
    const auto& loser = *results[1 - w];
    // However the two interleave, the loser is refused as holding a used token.
    EXPECT_EQ(loser.error().code, ErrorCode::kPermissionDenied) << loser.error().message;
    EXPECT_THAT(loser.error().message, HasSubstr("used"));

    // One set of certificates: the winner's. None for the loser's key.
    const auto certs = certs_of(id);
    ASSERT_EQ(certs.size(), 2u);
    int signing = 0;
    for (const auto& c : certs) {
      auto x = ossl::x509_from_der(c.der).value();
      EXPECT_FALSE(ca::public_key_matches(x.get(), keys[1 - w].get()));
      if (c.kind == CertKind::kSigning) {
        ++signing;
        EXPECT_TRUE(ca::public_key_matches(x.get(), keys[w].get()));
        EXPECT_EQ(c.serial, ca::serial_hex((*results[w])->signing_certificate.get()));
      }
    }
    EXPECT_EQ(signing, 1);
    EXPECT_EQ(depth(id), 1);
    EXPECT_EQ(user(id).state, UserState::kActive);
  }
  // Across the whole store: one signing and one encryption certificate per user.
  EXPECT_EQ(store_->certificates(CertKind::kSigning).value().size(), 6u);
  EXPECT_EQ(store_->certificates(CertKind::kEncryption).value().size(), 6u);
  EXPECT_EQ(audited("user.enroll").size(), 6u);
  expect_audit_chain_intact();
}

// ---- the policy ---------------------------------------------------------------------------------

TEST_F(EnrollmentTest, V1IsRefusedUnderTheDefaultPolicyAndIssuedWithoutExtensionsOnceAllowed) {
  const SecretBytes tok = enable("ann");
  auto key = generate(hsm::KeyType::kEcP256);
  auto refused = enroll_->enroll("ann", tok, request(key.get(), 1));
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().code, ErrorCode::kInvalidArgument);
  EXPECT_THAT(refused.error().message, HasSubstr("X.509 v1 certificates are disabled by policy"));
  EXPECT_THAT(refused.error().message, HasSubstr("policy.x509_versions"));
  expect_nothing_recorded("ann");
  EXPECT_TRUE(enroll_->pending_token("ann").ok());  // still live

  // A reload that allows v1 (and, as a v1 certificate needs, no usages) applies at once.
  config::PolicyConfig pc;
  pc.x509_versions = {1, 3};
  pc.signing = {};
  pc.encryption = {};
  policy_->replace(
      std::make_shared<const policy::PolicyCheck>(policy::PolicyCheck::create(pc).value()));
  auto e = enroll_->enroll("ann", tok, request(key.get(), 1));
  ASSERT_TRUE(e.ok()) << e.error().message;
  for (X509* c : {e->signing_certificate.get(), e->encryption_certificate.get()}) {
    SCOPED_TRACE(ca::serial_hex(c));
    EXPECT_EQ(X509_get_version(c), X509_VERSION_1);
    EXPECT_EQ(X509_get_ext_count(c), 0);
    EXPECT_TRUE(verifies_against_ca(c));
    EXPECT_EQ(X509_NAME_cmp(X509_get_subject_name(c), enabled_subject("ann", "Ann Example").get()),
              0);
  }
  EXPECT_TRUE(ca::public_key_matches(e->signing_certificate.get(), key.get()));
  ASSERT_EQ(e->keys.size(), 1u);
  auto priv = key_from_pkcs8(e->keys[0].pkcs8_der);
  EXPECT_TRUE(ca::public_key_matches(e->encryption_certificate.get(), priv.get()));
  EXPECT_EQ(user("ann").state, UserState::kActive);
  EXPECT_EQ(certs_of("ann").size(), 2u);
}

TEST_F(EnrollmentTest, KeysThePolicyDoesNotAllowAreRefused) {
  const SecretBytes tok = enable("ann");
  auto p521 = ec_p521_key();
  auto rsa1024 = rsa_1024_key();
  ASSERT_NE(p521, nullptr);
  ASSERT_NE(rsa1024, nullptr);
  struct Case {
    EVP_PKEY* key;
    const char* spelling;
  };
  for (const Case& c : {Case{p521.get(), "ec-p521"}, Case{rsa1024.get(), "rsa-1024"}}) {
    const char* spelling = c.spelling;
    SCOPED_TRACE(spelling);
    auto e = enroll_->enroll("ann", tok, request(c.key));
    ASSERT_FALSE(e.ok());
    EXPECT_EQ(e.error().code, ErrorCode::kInvalidArgument);
    EXPECT_THAT(e.error().message, HasSubstr(spelling));
    EXPECT_THAT(e.error().message, HasSubstr("policy.key_types"));
  }
  expect_nothing_recorded("ann");
}

TEST_F(EnrollmentTest, AValidityAboveThePolicyMaximumIsRefused) {
  const SecretBytes tok = enable("ann");
  auto key = generate(hsm::KeyType::kEcP256);
  auto req = request(key.get());
  req.validity = std::chrono::days(826);
  auto e = enroll_->enroll("ann", tok, req);
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.error().code, ErrorCode::kInvalidArgument);
  EXPECT_THAT(e.error().message, HasSubstr("max_validity_days (825)"));
  expect_nothing_recorded("ann");

  req.validity = std::chrono::days(825);
  auto ok = enroll_->enroll("ann", tok, req);
  ASSERT_TRUE(ok.ok()) << ok.error().message;
  const auto nb = ca::not_before_unix(ok->signing_certificate.get());
  const auto na = ca::not_after_unix(ok->signing_certificate.get());
  EXPECT_NEAR(static_cast<double>(na - nb), 825.0 * 86400 + 300, 5.0);  // 5 min back-dated
}

// ---- the CMP entry points -----------------------------------------------------------------------

TEST_F(EnrollmentTest, CmpEntryPointsRevealCountAndConsumeTheToken) {
  const SecretBytes tok = enable("ann");
  auto secret = enroll_->pending_token("ann");
  ASSERT_TRUE(secret.ok()) << secret.error().message;
  EXPECT_EQ(secret->view(), tok.view());
  EXPECT_EQ(token_record("ann").failed_attempts, 0);  // asking is not an attempt

  ASSERT_TRUE(enroll_->record_failed_attempt("ann").ok());
  EXPECT_EQ(token_record("ann").failed_attempts, 1);
  ASSERT_EQ(audited("user.enroll.failed").size(), 1u);
  // An unknown user is not an error (nothing to count) and leaves no record.
  EXPECT_TRUE(enroll_->record_failed_attempt("nobody").ok());
  EXPECT_EQ(audited("user.enroll.failed").size(), 1u);
  auto unknown = enroll_->pending_token("nobody");
  ASSERT_FALSE(unknown.ok());
  EXPECT_EQ(unknown.error().code, ErrorCode::kPermissionDenied);

  auto key = generate(hsm::KeyType::kEcP256);
  auto req = request(key.get());
  req.channel = "cmp";
  auto e = enroll_->enroll_verified("ann", req);
  ASSERT_TRUE(e.ok()) << e.error().message;
  EXPECT_EQ(user("ann").state, UserState::kActive);
  EXPECT_TRUE(token_record("ann").used_at.has_value());
  EXPECT_EQ(audited("user.enroll").at(0)["details"]["channel"], "cmp");
  auto spent = enroll_->pending_token("ann");
  ASSERT_FALSE(spent.ok());
  EXPECT_EQ(spent.error().code, ErrorCode::kPermissionDenied);
  auto twice = enroll_->enroll_verified("ann", req);
  ASSERT_FALSE(twice.ok());
  EXPECT_EQ(certs_of("ann").size(), 2u);
}

// ---- renewal ------------------------------------------------------------------------------------

TEST_F(EnrollmentTest, RenewalWithANewKeyAppendsVersionTwoAndDeliversOnlyIt) {
  const SecretBytes tok = enable("ann");
  auto key1 = generate(hsm::KeyType::kEcP256);
  auto e = enroll_->enroll("ann", tok, request(key1.get()));
  ASSERT_TRUE(e.ok()) << e.error().message;
  auto holder = enroll_->holder_of(e->signing_certificate.get());
  ASSERT_TRUE(holder.ok()) << holder.error().message;
  EXPECT_EQ(holder->user_id, "ann");
  EXPECT_EQ(holder->serial, ca::serial_hex(e->signing_certificate.get()));

  auto key2 = generate(hsm::KeyType::kEcP256);
  auto r = enroll_->renew(e->signing_certificate.get(), request(key2.get()));
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->user_id, "ann");
  EXPECT_TRUE(ca::public_key_matches(r->signing_certificate.get(), key2.get()));
  EXPECT_TRUE(verifies_against_ca(r->signing_certificate.get()));
  EXPECT_TRUE(verifies_against_ca(r->encryption_certificate.get()));
  ASSERT_EQ(r->keys.size(), 1u);
  EXPECT_EQ(r->keys[0].version, 2);
  EXPECT_NE(r->keys[0].key_id, e->keys[0].key_id);
  auto priv2 = key_from_pkcs8(r->keys[0].pkcs8_der);
  EXPECT_TRUE(ca::public_key_matches(r->encryption_certificate.get(), priv2.get()));
  EXPECT_FALSE(ca::public_key_matches(e->encryption_certificate.get(), priv2.get()));
  EXPECT_EQ(depth("ann"), 2);
  EXPECT_EQ(certs_of("ann").size(), 4u);
  EXPECT_EQ(user("ann").state, UserState::kActive);
  // The old certificates stay valid until they expire.
  EXPECT_FALSE(cert_record(e->signing_certificate.get()).revoked_at.has_value());
  EXPECT_TRUE(enroll_->holder_of(e->signing_certificate.get()).ok());

  const auto renewals = audited("user.renew");
  ASSERT_EQ(renewals.size(), 1u);
  EXPECT_EQ(renewals[0]["details"]["new_key"], true);
  EXPECT_EQ(renewals[0]["details"]["key_version"], 2);
  EXPECT_EQ(renewals[0]["details"]["previous_signing_serial"], holder->serial);

  // The holder may fetch the key of the enrollment and the one added by the renewal.
  auto keys = enroll_->keys_for(r->signing_certificate.get());
  ASSERT_TRUE(keys.ok()) << keys.error().message;
  ASSERT_EQ(keys->size(), 2u);
  EXPECT_EQ((*keys)[0].version, 1);
  EXPECT_EQ((*keys)[1].version, 2);
  EXPECT_TRUE(std::ranges::equal((*keys)[1].pkcs8_der.span(), r->keys[0].pkcs8_der.span()));
  expect_audit_chain_intact();
}

TEST_F(EnrollmentTest, RenewalWithTheSameKeyRecertifiesTheCurrentKey) {
  const SecretBytes tok = enable("ann");
  auto key1 = generate(hsm::KeyType::kEcP256);
  auto e = enroll_->enroll("ann", tok, request(key1.get()));
  ASSERT_TRUE(e.ok()) << e.error().message;
  settings_.renew_encryption_key = config::RenewKey::kSame;
  auto r = enroll_->renew(e->signing_certificate.get(), request(key1.get()));
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(depth("ann"), 1);
  ASSERT_EQ(r->keys.size(), 1u);
  EXPECT_EQ(r->keys[0].version, 1);
  EXPECT_EQ(r->keys[0].key_id, e->keys[0].key_id);
  EXPECT_TRUE(std::ranges::equal(r->keys[0].pkcs8_der.span(), e->keys[0].pkcs8_der.span()));
  // A new encryption certificate for the same public key.
  EXPECT_NE(ca::serial_hex(r->encryption_certificate.get()),
            ca::serial_hex(e->encryption_certificate.get()));
  auto priv = key_from_pkcs8(e->keys[0].pkcs8_der);
  EXPECT_TRUE(ca::public_key_matches(r->encryption_certificate.get(), priv.get()));
  EXPECT_EQ(cert_record(r->encryption_certificate.get()).kind, CertKind::kEncryption);
  EXPECT_EQ(certs_of("ann").size(), 4u);
  EXPECT_EQ(audited("user.renew").at(0)["details"]["new_key"], false);
}

TEST_F(EnrollmentTest, RenewalIsRefusedForARevokedAForeignOrAnEncryptionCertificate) {
  const SecretBytes tok = enable("ann");
  auto key = generate(hsm::KeyType::kEcP256);
  auto e = enroll_->enroll("ann", tok, request(key.get()));
  ASSERT_TRUE(e.ok()) << e.error().message;
  auto r = enroll_->renew(e->signing_certificate.get(), request(key.get()));
  ASSERT_TRUE(r.ok()) << r.error().message;
  // The holder revokes the old signing certificate; the new one keeps the user active.
  ASSERT_TRUE(enroll_->revoke_by_holder(e->signing_certificate.get(), kSuperseded).ok());
  EXPECT_EQ(user("ann").state, UserState::kActive);

  // A self-signed certificate for the same subject, made outside the KMS.
  auto foreign_key = generate(hsm::KeyType::kEcP256);
  ca::IssueRequest ireq;
  ireq.profile = ca::Profile::kCa;
  auto subject = enabled_subject("ann", "Ann Example");
  ireq.subject = subject.get();
  ireq.public_key = foreign_key.get();
  ireq.serial = ca::new_serial(*token_).value();
  auto foreign = ca::issue(ireq, nullptr, foreign_key.get(), EVP_sha256());
  ASSERT_TRUE(foreign.ok()) << foreign.error().message;

  const std::size_t certs_before = certs_of("ann").size();
  const int depth_before = depth("ann");
  struct Case {
    X509* cert;
    const char* why;
  };
  for (const Case& c : {Case{e->signing_certificate.get(), "has been revoked"},
                        Case{foreign->get(), "was not issued by this KMS"},
                        Case{ca_.get(), "is not a user certificate"},
                        Case{r->encryption_certificate.get(), "is an encryption certificate"},
                        Case{nullptr, "is missing"}}) {
    SCOPED_TRACE(c.why);
    auto refused = enroll_->renew(c.cert, request(key.get()));
    ASSERT_FALSE(refused.ok());
    EXPECT_EQ(refused.error().code, ErrorCode::kPermissionDenied);
    EXPECT_THAT(refused.error().message, HasSubstr(c.why));
    auto holder = enroll_->holder_of(c.cert);
    ASSERT_FALSE(holder.ok());
    EXPECT_EQ(holder.error().message, refused.error().message);
  }
  EXPECT_EQ(certs_of("ann").size(), certs_before);
  EXPECT_EQ(depth("ann"), depth_before);
  EXPECT_EQ(audited("user.renew").size(), 1u);
  // The current signing certificate still renews.
  EXPECT_TRUE(enroll_->renew(r->signing_certificate.get(), request(key.get())).ok());
}

// ---- key delivery -------------------------------------------------------------------------------

TEST_F(EnrollmentTest, KeysForReturnsTheEnrolledKeyAndIsAudited) {
  const SecretBytes tok = enable("ann");
  auto key = generate(hsm::KeyType::kEcP256);
  auto e = enroll_->enroll("ann", tok, request(key.get()));
  ASSERT_TRUE(e.ok()) << e.error().message;
  auto keys = enroll_->keys_for(e->signing_certificate.get());
  ASSERT_TRUE(keys.ok()) << keys.error().message;
  ASSERT_EQ(keys->size(), 1u);
  const auto& k = (*keys)[0];
  EXPECT_EQ(k.version, 1);
  EXPECT_EQ(k.key_id, e->keys[0].key_id);
  EXPECT_EQ(k.algorithm, "ec-p256");
  EXPECT_TRUE(std::ranges::equal(k.pkcs8_der.span(), e->keys[0].pkcs8_der.span()));
  ASSERT_NE(k.certificate, nullptr);
  EXPECT_EQ(X509_cmp(k.certificate.get(), e->encryption_certificate.get()), 0);

  const auto fetches = audited("user.keys.fetch");
  ASSERT_EQ(fetches.size(), 1u);
  EXPECT_EQ(fetches[0]["actor"], "user:ann");
  EXPECT_EQ(fetches[0]["details"]["signing_serial"], ca::serial_hex(e->signing_certificate.get()));
  EXPECT_EQ(fetches[0]["details"]["key_versions"], json::array({1}));

  // The encryption certificate is not a credential for fetching keys.
  auto by_enc = enroll_->keys_for(e->encryption_certificate.get());
  ASSERT_FALSE(by_enc.ok());
  EXPECT_EQ(by_enc.error().code, ErrorCode::kPermissionDenied);
  EXPECT_EQ(audited("user.keys.fetch").size(), 1u);
  expect_audit_chain_intact();
}

TEST_F(EnrollmentTest, RecoveryEnrollmentHandsBackTheWholeKeyHistory) {
  const SecretBytes tok = enable("ann");
  auto key = generate(hsm::KeyType::kEcP256);
  auto e = enroll_->enroll("ann", tok, request(key.get()));
  ASSERT_TRUE(e.ok()) << e.error().message;
  auto r = enroll_->renew(e->signing_certificate.get(), request(key.get()));  // key v2
  ASSERT_TRUE(r.ok()) << r.error().message;

  ASSERT_TRUE(users_->recover("ann", kAdmin).ok());
  EXPECT_EQ(user("ann").state, UserState::kRecovery);
  // While the recovery is under way the old certificate fetches nothing.
  auto during = enroll_->keys_for(r->signing_certificate.get());
  ASSERT_FALSE(during.ok());
  EXPECT_THAT(during.error().message, HasSubstr("not active"));
  auto recovery = users_->reissue("ann", kAdmin);
  ASSERT_TRUE(recovery.ok()) << recovery.error().message;
  EXPECT_EQ(token_record("ann").purpose, store::TokenPurpose::kRecover);

  auto new_key = generate(hsm::KeyType::kEcP256);
  auto rec = enroll_->enroll("ann", recovery->token, request(new_key.get()));
  ASSERT_TRUE(rec.ok()) << rec.error().message;
  EXPECT_TRUE(rec->recovered);
  EXPECT_EQ(user("ann").state, UserState::kActive);
  EXPECT_EQ(user("ann").keys_from_version, 1);
  EXPECT_EQ(depth("ann"), 3);  // v1 enrollment, v2 renewal, v3 this enrollment
  ASSERT_EQ(rec->keys.size(), 3u);
  const std::vector<SecretBytes*> earlier = {&e->keys[0].pkcs8_der, &r->keys[0].pkcs8_der};
  for (std::size_t i = 0; i < rec->keys.size(); ++i) {
    SCOPED_TRACE(i);
    const auto& k = rec->keys[i];
    EXPECT_EQ(k.version, static_cast<int>(i) + 1);
    auto priv = key_from_pkcs8(k.pkcs8_der);
    ASSERT_NE(priv, nullptr);
    ASSERT_NE(k.certificate, nullptr);
    EXPECT_TRUE(ca::public_key_matches(k.certificate.get(), priv.get()));
    if (i < earlier.size()) {
      EXPECT_TRUE(std::ranges::equal(k.pkcs8_der.span(), earlier[i]->span()));
    }
  }
  EXPECT_EQ(X509_cmp(rec->keys.back().certificate.get(), rec->encryption_certificate.get()), 0);
  const auto audit_rec = audited("user.recover.enroll");
  ASSERT_EQ(audit_rec.size(), 1u);
  EXPECT_EQ(audit_rec[0]["details"]["previous_state"], "recovery");
  EXPECT_EQ(audit_rec[0]["details"]["token_purpose"], "recover");

  // The signing certificates from before the recovery were revoked as superseded: they can
  // neither fetch the history just handed back nor renew.
  for (X509* old_cert : {e->signing_certificate.get(), r->signing_certificate.get()}) {
    auto old_rec = store_->find_certificate(ca::serial_hex(old_cert)).value();
    ASSERT_TRUE(old_rec.has_value());
    EXPECT_EQ(old_rec->revocation_reason, std::optional<int>(4));
    auto refused = enroll_->keys_for(old_cert);
    ASSERT_FALSE(refused.ok());
    EXPECT_THAT(refused.error().message, HasSubstr("revoked"));
    EXPECT_FALSE(enroll_->renew(old_cert, request(new_key.get())).ok());
  }
  auto keys = enroll_->keys_for(rec->signing_certificate.get());
  ASSERT_TRUE(keys.ok()) << keys.error().message;
  ASSERT_EQ(keys->size(), 3u);
  for (std::size_t i = 0; i < keys->size(); ++i)
    EXPECT_TRUE(std::ranges::equal((*keys)[i].pkcs8_der.span(), rec->keys[i].pkcs8_der.span()));
  EXPECT_EQ(audited("user.keys.fetch").back()["details"]["key_versions"], json::array({1, 2, 3}));
  expect_audit_chain_intact();
}

// ---- revocation by the holder -------------------------------------------------------------------

TEST_F(EnrollmentTest, RevokingTheLastSigningCertificateRevokesTheUser) {
  const SecretBytes tok = enable("ann");
  auto key = generate(hsm::KeyType::kEcP256);
  auto e = enroll_->enroll("ann", tok, request(key.get()));
  ASSERT_TRUE(e.ok()) << e.error().message;
  ASSERT_TRUE(enroll_->revoke_by_holder(e->signing_certificate.get(), kKeyCompromise).ok());
  EXPECT_EQ(revocations_.load(), 1);
  EXPECT_EQ(user("ann").state, UserState::kRevoked);
  for (const auto& c : certs_of("ann")) {
    SCOPED_TRACE(store::to_string(c.kind));
    ASSERT_TRUE(c.revoked_at.has_value());
    EXPECT_EQ(c.revocation_reason, kKeyCompromise);
  }
  const auto recs = audited("user.revoke.self");
  ASSERT_EQ(recs.size(), 1u);
  EXPECT_EQ(recs[0]["details"]["state"], "revoked");
  EXPECT_EQ(recs[0]["details"]["reason"], kKeyCompromise);
  EXPECT_EQ(recs[0]["details"]["revoked_certificates"].size(), 2u);
  // The certificate no longer identifies a holder; the key history is kept.
  auto holder = enroll_->holder_of(e->signing_certificate.get());
  ASSERT_FALSE(holder.ok());
  EXPECT_THAT(holder.error().message, HasSubstr("revoked"));
  auto twice = enroll_->revoke_by_holder(e->signing_certificate.get(), kKeyCompromise);
  ASSERT_FALSE(twice.ok());
  EXPECT_EQ(revocations_.load(), 1);
  EXPECT_EQ(depth("ann"), 1);
  expect_audit_chain_intact();
}

TEST_F(EnrollmentTest, RevokingOneOfTwoSigningCertificatesKeepsTheUserActive) {
  const SecretBytes tok = enable("ann");
  auto key = generate(hsm::KeyType::kEcP256);
  auto e = enroll_->enroll("ann", tok, request(key.get()));
  ASSERT_TRUE(e.ok()) << e.error().message;
  auto r = enroll_->renew(e->signing_certificate.get(), request(key.get()));
  ASSERT_TRUE(r.ok()) << r.error().message;
  ASSERT_TRUE(enroll_->revoke_by_holder(e->signing_certificate.get(), kSuperseded).ok());
  EXPECT_EQ(revocations_.load(), 1);
  EXPECT_EQ(user("ann").state, UserState::kActive);
  const auto old_rec = cert_record(e->signing_certificate.get());
  ASSERT_TRUE(old_rec.revoked_at.has_value());
  EXPECT_EQ(old_rec.revocation_reason, kSuperseded);
  EXPECT_FALSE(cert_record(e->encryption_certificate.get()).revoked_at.has_value());
  EXPECT_FALSE(cert_record(r->signing_certificate.get()).revoked_at.has_value());
  EXPECT_FALSE(cert_record(r->encryption_certificate.get()).revoked_at.has_value());
  EXPECT_EQ(audited("user.revoke.self").at(0)["details"]["state"], "active");
  EXPECT_TRUE(enroll_->holder_of(r->signing_certificate.get()).ok());

  // A reason RFC 5280 does not define changes nothing.
  auto bad = enroll_->revoke_by_holder(r->signing_certificate.get(), 7);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.error().code, ErrorCode::kInvalidArgument);
  EXPECT_FALSE(cert_record(r->signing_certificate.get()).revoked_at.has_value());
  EXPECT_EQ(user("ann").state, UserState::kActive);
  EXPECT_EQ(revocations_.load(), 1);
}

// ---- Q198709 ------------------------------------------------------------------------------------

TEST_F(EnrollmentTest, Q198709RevokedBeforeEnrollingIsEnabledAgainAndEnrolls) {
  const SecretBytes first = enable("ann");
  ASSERT_TRUE(users_->revoke("ann", 0, kAdmin).ok());
  EXPECT_EQ(user("ann").state, UserState::kRevoked);
  auto key = generate(hsm::KeyType::kEcP256);
  // The voided token does not work, and says no more than for an unknown user.
  auto voided = enroll_->enroll("ann", first, request(key.get()));
  ASSERT_FALSE(voided.ok());
  EXPECT_EQ(voided.error().code, ErrorCode::kPermissionDenied);
  EXPECT_EQ(voided.error().message,
            enroll_->enroll("nobody", first, request(key.get())).error().message);
  // Nothing was escrowed, so there is nothing to recover: no way into RECOVERY.
  auto recover = users_->recover("ann", kAdmin);
  ASSERT_FALSE(recover.ok());
  EXPECT_EQ(users::refusal_reason(recover.error()), "no-key-history");
  EXPECT_EQ(user("ann").state, UserState::kRevoked);

  const SecretBytes second = enable("ann");
  EXPECT_EQ(user("ann").state, UserState::kEnabled);
  auto e = enroll_->enroll("ann", second, request(key.get()));
  ASSERT_TRUE(e.ok()) << e.error().message;
  EXPECT_FALSE(e->recovered);
  EXPECT_EQ(user("ann").state, UserState::kActive);
  EXPECT_EQ(depth("ann"), 1);
  ASSERT_EQ(e->keys.size(), 1u);
  EXPECT_EQ(e->keys[0].version, 1);
  EXPECT_EQ(audited("user.enroll").at(0)["details"]["previous_state"], "enabled");
}

// ---- nothing secret at rest ---------------------------------------------------------------------

TEST_F(EnrollmentTest, NeitherTheDeliveredKeyNorTheTokenReachesTheDatabaseFile) {
  const SecretBytes tok = enable("ann");
  auto raw_token = lifecycle::decode_token(tok);
  ASSERT_TRUE(raw_token.ok()) << raw_token.error().message;
  ASSERT_EQ(raw_token->size(), lifecycle::kTokenBytes);
  SecretBytes compact;  // the 24 characters without hyphens
  for (std::uint8_t c : tok.span()) {
    if (c != '-') compact.append(std::span<const std::uint8_t>(&c, 1));
  }
  ASSERT_EQ(compact.size(), lifecycle::kTokenChars);

  auto key = generate(hsm::KeyType::kEcP256);
  auto e = enroll_->enroll("ann", tok, request(key.get()));
  ASSERT_TRUE(e.ok()) << e.error().message;
  ASSERT_TRUE(enroll_->keys_for(e->signing_certificate.get()).ok());
  const SecretBytes pkcs8 = e->keys[0].pkcs8_der.clone();
  auto priv = key_from_pkcs8(pkcs8);
  ASSERT_NE(priv, nullptr);
  auto pem = ossl::privkey_to_pem(priv.get());
  ASSERT_TRUE(pem.ok());
  const auto cert_der = ossl::x509_to_der(e->signing_certificate.get()).value();
  close_store();

  // Every file SQLite keeps for this database (the WAL is checkpointed on close).
  std::vector<std::uint8_t> bytes;
  int files = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir())) {
    if (entry.path().filename().string().rfind("kmsd.db", 0) != 0) continue;
    std::ifstream in(entry.path(), std::ios::binary);
    bytes.insert(bytes.end(), std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    ++files;
  }
  ASSERT_GE(files, 1);
  // The scan sees the database's contents: the signing certificate is there.
  ASSERT_TRUE(contains(bytes, cert_der));
  EXPECT_FALSE(contains(bytes, pkcs8.span())) << "the escrowed key's PKCS#8 DER is in the store";
  EXPECT_FALSE(contains(bytes, pem->span())) << "the escrowed key's PEM is in the store";
  EXPECT_FALSE(contains(bytes, tok.span())) << "the token's display text is in the store";
  EXPECT_FALSE(contains(bytes, compact.span())) << "the token's characters are in the store";
  EXPECT_FALSE(contains(bytes, raw_token->span())) << "the token's bytes are in the store";
}

}  // namespace
}  // namespace kmsd

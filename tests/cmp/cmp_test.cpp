// The CMP server driven in process by OpenSSL's own CMP client (OSSL_CMP_CTX, its transfer
// callback pointed at CmpServer::handle), against a real SoftHSM token, store, audit log,
// policy and enrollment service: enrollment with the token, refusals, renewal, revocation.
#include <openssl/cmp.h>
#include <openssl/crmf.h>
#include <openssl/err.h>
#include <openssl/x509_vfy.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <thread>

#include "daemon/ca/issuer.hpp"
#include "daemon/cmp/asn1.hpp"
#include "daemon/cmp/cmp_server.hpp"
#include "daemon/provision/initializer.hpp"
#include "daemon/users/user_service.hpp"
#include "tests/support/logged_in_token.hpp"

// A CertReqMsg as OSSL_CMP_CTX_setup_CRM() builds it for ir (certReq only: no POPO yet, no
// regInfo), so that a test can ask for a template version, which OpenSSL 3.0 has no setter for.
namespace kmsd::cmp::test_asn1 {
using asn1::CertTemplate_it;
struct CertRequest {
  ASN1_INTEGER* certReqId;
  asn1::CertTemplate* certTemplate;
  STACK_OF(ASN1_TYPE) * controls;
};
struct CertReqMsg {
  CertRequest* certReq;
};
ASN1_SEQUENCE(CertRequest) =
    {
        ASN1_SIMPLE(CertRequest, certReqId, ASN1_INTEGER),
        ASN1_SIMPLE(CertRequest, certTemplate, CertTemplate),
        ASN1_SEQUENCE_OF_OPT(CertRequest, controls, ASN1_ANY),
} ASN1_SEQUENCE_END(CertRequest) ASN1_SEQUENCE(CertReqMsg) = {
        ASN1_SIMPLE(CertReqMsg, certReq, CertRequest),
} ASN1_SEQUENCE_END(CertReqMsg)
}  // namespace kmsd::cmp::test_asn1

namespace kmsd {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

using CmpCtxPtr = std::unique_ptr<OSSL_CMP_CTX, ossl::Deleter<OSSL_CMP_CTX_free>>;
using CmpMsgPtr = std::unique_ptr<OSSL_CMP_MSG, ossl::Deleter<OSSL_CMP_MSG_free>>;
using CrmfMsgPtr = std::unique_ptr<OSSL_CRMF_MSG, ossl::Deleter<OSSL_CRMF_MSG_free>>;

// RFC 4210 body tags used below.
constexpr int kPkiConf = 19;
constexpr int kError = 23;
constexpr int kCertConf = 24;

int quiet(const char*, const char*, int, OSSL_CMP_severity, const char*) {
  return 1;
}

ossl::X509Ptr ref(X509* c) {
  if (c == nullptr) return nullptr;
  X509_up_ref(c);
  return ossl::X509Ptr(c);
}

ossl::EvpPkeyPtr new_key() {
  return std::move(ca::generate_key(hsm::KeyType::kEcP256).value());
}

class CmpTest : public testing::TokenSandbox {
 protected:
  void SetUp() override {
    TokenSandbox::SetUp();
    token_ = testing::open_logged_in_token(token());
    ASSERT_NE(token_, nullptr);
    store_ = std::move(store::Store::open(dir() / "kmsd.db").value());
    config::Config cfg;
    cfg.token.module = testing::kSoftHsmModule;
    cfg.token.uri = token().uri();
    cfg.store.path = dir() / "kmsd.db";
    provision::AdminOptions admin{"root", dir() / "admin.p12",
                                  SecretBytes::from_string("passphrase")};
    auto init = provision::initialize(cfg, *token_, *store_, admin);
    ASSERT_TRUE(init.ok()) << init.error().message;
    ca_ = std::move(provision::load_ca_certificate(*store_).value());
    policy_ = std::make_unique<policy::PolicyInForce>(
        std::make_shared<const policy::PolicyCheck>(policy::PolicyCheck::create({}).value()));
    audit_ = std::make_unique<audit::AuditLog>(*store_, *token_);
    users_ = std::make_unique<users::UserService>(*store_, *token_, *audit_, *policy_,
                                                  [] { return users::TokenSettings{}; });
    enroll_ = std::make_unique<enroll::EnrollmentService>(
        *store_, *token_, *audit_, *policy_, [] { return enroll::Settings{}; },
        [this] { return ref(ca_.get()); });
    make_server({});
  }

  void make_server(cmp::Options options) {
    server_ = std::make_unique<cmp::CmpServer>(
        *enroll_, *token_, *store_, [this] { return ref(ca_.get()); },
        [this] {
          std::lock_guard lk(mu_);
          return digest_;
        },
        options);
  }

  // Enables USER and returns the token as the administrator hands it out.
  std::string enable(const std::string& user, const std::string& name = "Ann Example") {
    auto issued = users_->enable({user, user + "@example.com", name, std::nullopt}, "root");
    EXPECT_TRUE(issued.ok()) << issued.error().message;
    return issued.ok() ? std::string(issued->token.view()) : std::string();
  }

  // OpenSSL's CMP client whose transport is CmpServer::handle, trusting the KMS CA.
  CmpCtxPtr client() {
    CmpCtxPtr ctx(OSSL_CMP_CTX_new(nullptr, nullptr));
    OSSL_CMP_CTX_set_log_cb(ctx.get(), quiet);
    OSSL_CMP_CTX_set_transfer_cb(ctx.get(), transfer);
    OSSL_CMP_CTX_set_transfer_cb_arg(ctx.get(), this);
    X509_STORE* trusted = X509_STORE_new();
    X509_STORE_add_cert(trusted, ca_.get());
    OSSL_CMP_CTX_set0_trustedStore(ctx.get(), trusted);
    return ctx;
  }

  // A client that enrolls USER with SECRET for KEY (ir, or cr / p10cr by TYPE).
  CmpCtxPtr enrolling_client(const std::string& user, const std::string& secret, EVP_PKEY* key,
                             const std::string& subject = "/CN=whatever I like") {
    auto ctx = client();
    OSSL_CMP_CTX_set1_referenceValue(ctx.get(), reinterpret_cast<const unsigned char*>(user.data()),
                                     static_cast<int>(user.size()));
    OSSL_CMP_CTX_set1_secretValue(ctx.get(), reinterpret_cast<const unsigned char*>(secret.data()),
                                  static_cast<int>(secret.size()));
    EVP_PKEY_up_ref(key);
    OSSL_CMP_CTX_set0_newPkey(ctx.get(), 1, key);
    auto name = ca::parse_subject(subject);
    OSSL_CMP_CTX_set1_subjectName(ctx.get(), name->get());
    return ctx;
  }

  // A client that signs with CERT and KEY (kur, rr).
  CmpCtxPtr holder_client(X509* cert, EVP_PKEY* key) {
    auto ctx = client();
    OSSL_CMP_CTX_set1_cert(ctx.get(), cert);
    OSSL_CMP_CTX_set1_pkey(ctx.get(), key);
    return ctx;
  }

  static OSSL_CMP_MSG* transfer(OSSL_CMP_CTX* ctx, const OSSL_CMP_MSG* req) {
    auto* self = static_cast<CmpTest*>(OSSL_CMP_CTX_get_transfer_cb_arg(ctx));
    unsigned char* der = nullptr;
    const int n = i2d_OSSL_CMP_MSG(req, &der);
    if (n <= 0) return nullptr;
    std::vector<std::uint8_t> body(der, der + n);
    OPENSSL_free(der);
    auto reply = self->server_->handle(body);
    {
      std::lock_guard lk(self->mu_);
      self->sent_.push_back(body);
      self->last_status_ = reply.http_status;
      self->last_body_ = reply.body;
    }
    if (reply.http_status != 200) return nullptr;
    const unsigned char* p = reply.body.data();
    return d2i_OSSL_CMP_MSG(nullptr, &p, static_cast<long>(reply.body.size()));
  }

  // ir with SECRET for USER; the new certificate, or null.
  ossl::X509Ptr ir(const std::string& user, const std::string& secret, EVP_PKEY* key,
                   CmpCtxPtr* keep = nullptr) {
    auto ctx = enrolling_client(user, secret, key);
    ossl::X509Ptr cert = ref(OSSL_CMP_exec_IR_ses(ctx.get()));
    ERR_clear_error();
    if (keep != nullptr) *keep = std::move(ctx);
    return cert;
  }

  static std::string status_text(OSSL_CMP_CTX* ctx) {
    char buf[OSSL_CMP_PKISI_BUFLEN];
    const char* s = OSSL_CMP_CTX_snprint_PKIStatus(ctx, buf, sizeof buf);
    return s != nullptr ? s : "";
  }
  static bool has_fail_bit(OSSL_CMP_CTX* ctx, int bit) {
    const int info = OSSL_CMP_CTX_get_failInfoCode(ctx);
    return info >= 0 && (info & (1 << bit)) != 0;
  }

  bool verifies_against_ca(X509* cert) {
    ossl::X509StorePtr store(X509_STORE_new());
    X509_STORE_add_cert(store.get(), ca_.get());
    ossl::X509StoreCtxPtr vctx(X509_STORE_CTX_new());
    X509_STORE_CTX_init(vctx.get(), store.get(), cert, nullptr);
    return X509_verify_cert(vctx.get()) == 1;
  }

  store::UserState state_of(const std::string& user) {
    return store_->find_user(user).value()->state;
  }
  int failed_attempts(const std::string& user) {
    return store_->find_enrollment_token(user).value()->failed_attempts;
  }
  bool token_used(const std::string& user) {
    return store_->find_enrollment_token(user).value()->used_at.has_value();
  }

  std::unique_ptr<hsm::Token> token_;
  std::unique_ptr<store::Store> store_;
  ossl::X509Ptr ca_;
  std::unique_ptr<policy::PolicyInForce> policy_;
  std::unique_ptr<audit::AuditLog> audit_;
  std::unique_ptr<users::UserService> users_;
  std::unique_ptr<enroll::EnrollmentService> enroll_;
  std::unique_ptr<cmp::CmpServer> server_;
  std::string digest_ = "sha256";  // [ca] digest as the server reads it (under mu_)
  std::mutex mu_;
  std::vector<std::vector<std::uint8_t>> sent_;  // every request body, in order
  int last_status_ = 0;
  std::vector<std::uint8_t> last_body_;
};

TEST_F(CmpTest, IrWithTheEnrollmentTokenIssuesACertificateThatVerifiesAgainstTheCa) {
  const std::string token = enable("ann");
  auto key = new_key();
  CmpCtxPtr ctx;
  auto cert = ir("ann", token, key.get(), &ctx);
  ASSERT_NE(cert, nullptr) << status_text(ctx.get());
  EXPECT_TRUE(verifies_against_ca(cert.get()));
  EXPECT_TRUE(ca::public_key_matches(cert.get(), key.get()));
  // The subject is the identity the administrator enabled, not the one the client asked for.
  EXPECT_THAT(ca::name_to_string(X509_get_subject_name(cert.get())), HasSubstr("CN=Ann Example"));
  EXPECT_EQ(X509_get_version(cert.get()), X509_VERSION_3);
  EXPECT_EQ(state_of("ann"), store::UserState::kActive);
  EXPECT_TRUE(token_used("ann"));
  auto rec = store_->find_certificate(ca::serial_hex(cert.get())).value();
  ASSERT_TRUE(rec.has_value());
  EXPECT_EQ(rec->kind, store::CertKind::kSigning);
  EXPECT_EQ(rec->user_id, "ann");
  // The CA certificate came back in caPubs.
  ossl::X509StackPtr ca_pubs(OSSL_CMP_CTX_get1_caPubs(ctx.get()));
  ASSERT_NE(ca_pubs, nullptr);
  ASSERT_EQ(sk_X509_num(ca_pubs.get()), 1);
  EXPECT_EQ(X509_cmp(sk_X509_value(ca_pubs.get(), 0), ca_.get()), 0);
  // ir, then certConf in the same transaction; nothing left open.
  ASSERT_EQ(sent_.size(), 2u);
  EXPECT_EQ(server_->open_transactions(), 0u);
}

TEST_F(CmpTest, ImplicitConfirmationIsGrantedAndEndsTheTransactionAtOnce) {
  const std::string token = enable("ann");
  auto key = new_key();
  auto ctx = enrolling_client("ann", token, key.get());
  OSSL_CMP_CTX_set_option(ctx.get(), OSSL_CMP_OPT_IMPLICIT_CONFIRM, 1);
  ASSERT_NE(OSSL_CMP_exec_IR_ses(ctx.get()), nullptr) << status_text(ctx.get());
  EXPECT_EQ(sent_.size(), 1u);  // no certConf
  EXPECT_EQ(server_->open_transactions(), 0u);
  EXPECT_EQ(state_of("ann"), store::UserState::kActive);
}

TEST_F(CmpTest, TheSameTokenAgainIsRefused) {
  const std::string token = enable("ann");
  auto key = new_key();
  ASSERT_NE(ir("ann", token, key.get()), nullptr);
  CmpCtxPtr ctx;
  auto again = ir("ann", token, key.get(), &ctx);
  EXPECT_EQ(again, nullptr);
  // The refusal was authenticated by the client (signed by the CA), so it shows its status.
  EXPECT_EQ(OSSL_CMP_CTX_get_status(ctx.get()), OSSL_CMP_PKISTATUS_rejection);
  EXPECT_TRUE(has_fail_bit(ctx.get(), OSSL_CMP_PKIFAILUREINFO_badMessageCheck));
  EXPECT_THAT(status_text(ctx.get()), HasSubstr(enroll::kTokenNotValid));
  EXPECT_EQ(store_->certificates_of_user("ann").value().size(), 2u);  // signing + encryption
}

TEST_F(CmpTest, AWrongTokenIsRefusedCountedAndNeverEchoed) {
  const std::string token = enable("ann");
  std::string wrong = token;
  wrong[0] = wrong[0] == 'A' ? 'B' : 'A';
  auto key = new_key();
  CmpCtxPtr ctx;
  EXPECT_EQ(ir("ann", wrong, key.get(), &ctx), nullptr);
  EXPECT_EQ(OSSL_CMP_CTX_get_status(ctx.get()), OSSL_CMP_PKISTATUS_rejection);
  EXPECT_TRUE(has_fail_bit(ctx.get(), OSSL_CMP_PKIFAILUREINFO_badMessageCheck));
  const std::string said = status_text(ctx.get());
  // Word for word what an unknown user or a spent token gets: user ids cannot be probed.
  EXPECT_THAT(said, HasSubstr(enroll::kTokenNotValid));
  EXPECT_THAT(said, Not(HasSubstr(wrong)));
  EXPECT_THAT(said, Not(HasSubstr(token)));
  EXPECT_EQ(failed_attempts("ann"), 1);
  EXPECT_EQ(state_of("ann"), store::UserState::kEnabled);
  EXPECT_FALSE(token_used("ann"));
  // One wrong try does not lock the token: the right one still enrolls.
  EXPECT_NE(ir("ann", token, key.get()), nullptr);
}

TEST_F(CmpTest, TheTokenTypedInLowerCaseWithoutHyphensIsAccepted) {
  std::string typed;
  for (char c : enable("ann"))
    if (c != '-') typed += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  auto key = new_key();
  CmpCtxPtr ctx;
  auto cert = ir("ann", typed, key.get(), &ctx);
  ASSERT_NE(cert, nullptr) << status_text(ctx.get());
  EXPECT_TRUE(verifies_against_ca(cert.get()));
  EXPECT_EQ(failed_attempts("ann"), 0);
}

TEST_F(CmpTest, AnUnknownUserIsRefusedWithoutCrashing) {
  auto key = new_key();
  CmpCtxPtr ctx;
  EXPECT_EQ(ir("nobody", "ABCD-EFGH-JKMN-PQRS-TVWX-YZ01", key.get(), &ctx), nullptr);
  EXPECT_EQ(OSSL_CMP_CTX_get_status(ctx.get()), OSSL_CMP_PKISTATUS_rejection);
  EXPECT_TRUE(has_fail_bit(ctx.get(), OSSL_CMP_PKIFAILUREINFO_badMessageCheck));
  EXPECT_THAT(status_text(ctx.get()), HasSubstr(enroll::kTokenNotValid));
}

TEST_F(CmpTest, CrAndP10crEnrollLikeIr) {
  const std::string t1 = enable("ann");
  auto k1 = new_key();
  auto c1 = enrolling_client("ann", t1, k1.get());
  ossl::X509Ptr cert1 = ref(OSSL_CMP_exec_CR_ses(c1.get()));
  ASSERT_NE(cert1, nullptr) << status_text(c1.get());
  EXPECT_TRUE(verifies_against_ca(cert1.get()));

  const std::string t2 = enable("bob", "Bob Example");
  auto k2 = new_key();
  auto c2 = enrolling_client("bob", t2, k2.get());
  ossl::X509ReqPtr csr(X509_REQ_new());
  X509_REQ_set_pubkey(csr.get(), k2.get());
  X509_REQ_set_subject_name(csr.get(), ca::parse_subject("/CN=bob")->get());
  ASSERT_GT(X509_REQ_sign(csr.get(), k2.get(), EVP_sha256()), 0);
  OSSL_CMP_CTX_set1_p10CSR(c2.get(), csr.get());
  ossl::X509Ptr cert2 = ref(OSSL_CMP_exec_P10CR_ses(c2.get()));
  ASSERT_NE(cert2, nullptr) << status_text(c2.get());
  EXPECT_TRUE(ca::public_key_matches(cert2.get(), k2.get()));
  EXPECT_EQ(state_of("bob"), store::UserState::kActive);
}

TEST_F(CmpTest, KurRenewsWithANewCertificateForTheSameSubject) {
  const std::string token = enable("ann");
  auto key = new_key();
  auto cert = ir("ann", token, key.get());
  ASSERT_NE(cert, nullptr);

  auto new_k = new_key();
  auto ctx = holder_client(cert.get(), key.get());
  EVP_PKEY_up_ref(new_k.get());
  OSSL_CMP_CTX_set0_newPkey(ctx.get(), 1, new_k.get());
  ossl::X509Ptr renewed = ref(OSSL_CMP_exec_KUR_ses(ctx.get()));
  ASSERT_NE(renewed, nullptr) << status_text(ctx.get());
  EXPECT_NE(ca::serial_hex(renewed.get()), ca::serial_hex(cert.get()));
  EXPECT_EQ(X509_NAME_cmp(X509_get_subject_name(renewed.get()), X509_get_subject_name(cert.get())),
            0);
  EXPECT_TRUE(ca::public_key_matches(renewed.get(), new_k.get()));
  EXPECT_TRUE(verifies_against_ca(renewed.get()));
  EXPECT_EQ(state_of("ann"), store::UserState::kActive);
  EXPECT_EQ(server_->open_transactions(), 0u);
  // The kup was signed by the CMP responder certificate, recorded as a server certificate.
  auto servers = store_->certificates(store::CertKind::kServer).value();
  ASSERT_EQ(servers.size(), 1u);
  EXPECT_THAT(servers.front().subject, HasSubstr("CMP responder"));
}

TEST_F(CmpTest, AReloadedDigestSignsTheNextResponsesWithoutARestart) {
  const std::string token = enable("ann");
  auto key = new_key();
  auto cert = ir("ann", token, key.get());
  ASSERT_NE(cert, nullptr);
  // ecdsa-with-SHA384 (1.2.840.10045.4.3.3), as DER, in a signed response's protectionAlg.
  const std::vector<std::uint8_t> sha384_oid{0x06, 0x08, 0x2a, 0x86, 0x48,
                                             0xce, 0x3d, 0x04, 0x03, 0x03};
  auto kur_reply = [&] {
    auto ctx = holder_client(cert.get(), key.get());
    auto new_k = new_key();
    EVP_PKEY_up_ref(new_k.get());
    OSSL_CMP_CTX_set0_newPkey(ctx.get(), 1, new_k.get());
    OSSL_CMP_CTX_set_option(ctx.get(), OSSL_CMP_OPT_IMPLICIT_CONFIRM, 1);
    ossl::X509Ptr renewed = ref(OSSL_CMP_exec_KUR_ses(ctx.get()));
    EXPECT_NE(renewed, nullptr) << status_text(ctx.get());
    if (renewed) {  // the next renewal is signed with the renewed pair
      cert = std::move(renewed);
      key = std::move(new_k);
    }
    std::lock_guard lk(mu_);
    return last_body_;
  };
  auto before = kur_reply();
  EXPECT_EQ(std::search(before.begin(), before.end(), sha384_oid.begin(), sha384_oid.end()),
            before.end());
  {
    std::lock_guard lk(mu_);
    digest_ = "sha384";  // what a SIGHUP with [ca] digest = "sha384" does
  }
  auto after = kur_reply();
  EXPECT_NE(std::search(after.begin(), after.end(), sha384_oid.begin(), sha384_oid.end()),
            after.end());
}

TEST_F(CmpTest, KurSignedByACertificateOfAnotherCaIsRefused) {
  // A look-alike user certificate under a CA of its own (same subject, not this KMS).
  auto key = new_key();
  auto name = ca::parse_subject("/CN=Ann Example").value();
  ca::IssueRequest root;
  root.profile = ca::Profile::kCa;
  root.subject = name.get();
  root.public_key = key.get();
  root.serial = {1, 2, 3};
  auto stranger_ca = ca::issue(root, nullptr, key.get(), EVP_sha256());
  ASSERT_TRUE(stranger_ca.ok()) << stranger_ca.error().message;
  ca::IssueRequest req;
  req.profile = ca::Profile::kUser;
  req.subject = name.get();
  req.public_key = key.get();
  req.key_usage = {"digitalSignature"};
  req.serial = {4, 5, 6};
  auto forged = ca::issue(req, stranger_ca->get(), key.get(), EVP_sha256());
  ASSERT_TRUE(forged.ok()) << forged.error().message;

  auto ctx = holder_client(forged->get(), key.get());
  auto new_k = new_key();
  EVP_PKEY_up_ref(new_k.get());
  OSSL_CMP_CTX_set0_newPkey(ctx.get(), 1, new_k.get());
  EXPECT_EQ(OSSL_CMP_exec_KUR_ses(ctx.get()), nullptr);
  EXPECT_EQ(OSSL_CMP_CTX_get_status(ctx.get()), OSSL_CMP_PKISTATUS_rejection);
  EXPECT_THAT(status_text(ctx.get()), HasSubstr("issued by this CA"));
}

TEST_F(CmpTest, RrRevokesTheHoldersCertificate) {
  const std::string token = enable("ann");
  auto key = new_key();
  auto cert = ir("ann", token, key.get());
  ASSERT_NE(cert, nullptr);

  auto ctx = holder_client(cert.get(), key.get());
  OSSL_CMP_CTX_set1_oldCert(ctx.get(), cert.get());
  OSSL_CMP_CTX_set_option(ctx.get(), OSSL_CMP_OPT_REVOCATION_REASON, 1);  // keyCompromise
  ASSERT_EQ(OSSL_CMP_exec_RR_ses(ctx.get()), 1) << status_text(ctx.get());
  EXPECT_EQ(OSSL_CMP_CTX_get_status(ctx.get()), OSSL_CMP_PKISTATUS_accepted);
  auto rec = store_->find_certificate(ca::serial_hex(cert.get())).value();
  ASSERT_TRUE(rec.has_value());
  EXPECT_TRUE(rec->revoked_at.has_value());
  EXPECT_EQ(rec->revocation_reason, 1);
  // It was the user's only signing certificate: the user is revoked like by an administrator.
  EXPECT_EQ(state_of("ann"), store::UserState::kRevoked);
  EXPECT_EQ(server_->open_transactions(), 0u);

  // A revoked certificate can neither renew nor revoke again.
  auto again = holder_client(cert.get(), key.get());
  OSSL_CMP_CTX_set1_oldCert(again.get(), cert.get());
  EXPECT_NE(OSSL_CMP_exec_RR_ses(again.get()), 1);
  EXPECT_EQ(OSSL_CMP_CTX_get_status(again.get()), OSSL_CMP_PKISTATUS_rejection);
  EXPECT_THAT(status_text(again.get()), HasSubstr("revoked"));
}

// Builds an ir CRMF message for CTX whose template asks for X.509 version VERSION (raw
// INTEGER: 0 = v1), re-encoded through OpenSSL's ASN.1, and signs its POPO with KEY.
CrmfMsgPtr crm_with_version(OSSL_CMP_CTX* ctx, EVP_PKEY* key, long version) {
  using namespace cmp;
  CrmfMsgPtr crm(OSSL_CMP_CTX_setup_CRM(ctx, 0, 0));
  if (!crm) return nullptr;
  unsigned char* der = nullptr;
  const int n = i2d_OSSL_CRMF_MSG(crm.get(), &der);
  auto* view = reinterpret_cast<test_asn1::CertReqMsg*>(
      asn1::decode(test_asn1::CertReqMsg_it(), {der, static_cast<std::size_t>(n)}));
  OPENSSL_free(der);
  if (view == nullptr) return nullptr;
  asn1::CertTemplate* tmpl = view->certReq->certTemplate;
  ASN1_INTEGER_free(tmpl->version);
  tmpl->version = ASN1_INTEGER_new();
  ASN1_INTEGER_set(tmpl->version, version);
  auto bytes = asn1::encode(test_asn1::CertReqMsg_it(), reinterpret_cast<ASN1_VALUE*>(view));
  ASN1_item_free(reinterpret_cast<ASN1_VALUE*>(view), test_asn1::CertReqMsg_it());
  const unsigned char* p = bytes.data();
  CrmfMsgPtr out(d2i_OSSL_CRMF_MSG(nullptr, &p, static_cast<long>(bytes.size())));
  if (!out || OSSL_CRMF_MSG_create_popo(OSSL_CRMF_POPO_SIGNATURE, out.get(), key, EVP_sha256(),
                                        nullptr, nullptr) != 1)
    return nullptr;
  return out;
}

TEST_F(CmpTest, AV1RequestIsRefusedWhileThePolicyIsV3Only) {
  const std::string token = enable("ann");
  auto key = new_key();
  auto ctx = enrolling_client("ann", token, key.get());
  auto crm = crm_with_version(ctx.get(), key.get(), 0);
  ASSERT_NE(crm, nullptr);
  EXPECT_EQ(OSSL_CMP_exec_certreq(ctx.get(), OSSL_CMP_IR, crm.get()), nullptr);
  EXPECT_EQ(OSSL_CMP_CTX_get_status(ctx.get()), OSSL_CMP_PKISTATUS_rejection);
  EXPECT_TRUE(has_fail_bit(ctx.get(), OSSL_CMP_PKIFAILUREINFO_badCertTemplate));
  EXPECT_THAT(status_text(ctx.get()), HasSubstr("v1"));
  // Nothing was spent: the user enrolls with the same token and a v3 request.
  EXPECT_FALSE(token_used("ann"));
  EXPECT_EQ(state_of("ann"), store::UserState::kEnabled);
  auto cert = ir("ann", token, key.get());
  ASSERT_NE(cert, nullptr);
  EXPECT_EQ(X509_get_version(cert.get()), X509_VERSION_3);
}

TEST_F(CmpTest, AV1RequestGetsAV1CertificateWhenThePolicyAllowsIt) {
  config::PolicyConfig allow_v1;
  allow_v1.x509_versions = {1, 3};
  allow_v1.signing = {};  // a v1 certificate carries no extensions, so no usages either
  allow_v1.encryption = {};
  policy_->replace(
      std::make_shared<const policy::PolicyCheck>(policy::PolicyCheck::create(allow_v1).value()));
  const std::string token = enable("ann");
  auto key = new_key();
  auto ctx = enrolling_client("ann", token, key.get());
  auto crm = crm_with_version(ctx.get(), key.get(), 0);
  ASSERT_NE(crm, nullptr);
  ossl::X509Ptr cert = ref(OSSL_CMP_exec_certreq(ctx.get(), OSSL_CMP_IR, crm.get()));
  ASSERT_NE(cert, nullptr) << status_text(ctx.get());
  EXPECT_EQ(X509_get_version(cert.get()), X509_VERSION_1);
}

TEST_F(CmpTest, AClientRejectingItsCertificateIsAnsweredAndTheCertificateStaysRecorded) {
  const std::string token = enable("ann");
  auto key = new_key();
  auto ctx = enrolling_client("ann", token, key.get());
  OSSL_CMP_CTX_set_certConf_cb(ctx.get(), [](OSSL_CMP_CTX*, X509*, int, const char** text) -> int {
    *text = "not the certificate I wanted";
    return 1 << OSSL_CMP_PKIFAILUREINFO_badCertTemplate;
  });
  EXPECT_EQ(OSSL_CMP_exec_IR_ses(ctx.get()), nullptr);
  ERR_clear_error();
  // The certConf was answered with pkiconf (HTTP 200), not an error.
  ASSERT_EQ(sent_.size(), 2u);
  ASSERT_EQ(last_status_, 200);
  const unsigned char* p = last_body_.data();
  CmpMsgPtr answer(d2i_OSSL_CMP_MSG(nullptr, &p, static_cast<long>(last_body_.size())));
  ASSERT_NE(answer, nullptr);
  EXPECT_EQ(OSSL_CMP_MSG_get_bodytype(answer.get()), kPkiConf);
  EXPECT_EQ(state_of("ann"), store::UserState::kActive);
  EXPECT_EQ(store_->certificates_of_user("ann").value().size(), 2u);
  EXPECT_EQ(server_->open_transactions(), 0u);
}

TEST_F(CmpTest, MalformedBodiesGetHttp400AndStrayMessagesACmpError) {
  const std::vector<std::uint8_t> garbage{0x30, 0x03, 0x02, 0x01};
  auto bad = server_->handle(garbage);
  EXPECT_EQ(bad.http_status, 400);
  EXPECT_THAT(std::string(bad.body.begin(), bad.body.end()), HasSubstr("not a DER-encoded CMP"));
  EXPECT_EQ(server_->handle({}).http_status, 400);

  // A certConf replayed after its transaction ended: a CMP error with a sentence, signed.
  const std::string token = enable("ann");
  auto key = new_key();
  ASSERT_NE(ir("ann", token, key.get()), nullptr);
  ASSERT_EQ(sent_.size(), 2u);
  const unsigned char* p = sent_[1].data();
  CmpMsgPtr conf(d2i_OSSL_CMP_MSG(nullptr, &p, static_cast<long>(sent_[1].size())));
  ASSERT_EQ(OSSL_CMP_MSG_get_bodytype(conf.get()), kCertConf);
  auto replay = server_->handle(sent_[1]);
  ASSERT_EQ(replay.http_status, 200);
  p = replay.body.data();
  CmpMsgPtr answer(d2i_OSSL_CMP_MSG(nullptr, &p, static_cast<long>(replay.body.size())));
  ASSERT_NE(answer, nullptr);
  EXPECT_EQ(OSSL_CMP_MSG_get_bodytype(answer.get()), kError);
  auto view = cmp::view_message(replay.body, kError);
  ASSERT_TRUE(view.ok());
  EXPECT_NE(view->protection_nid, NID_undef);
  std::string text(replay.body.begin(), replay.body.end());
  EXPECT_THAT(text, HasSubstr("no open transaction"));
}

TEST_F(CmpTest, GeneralMessagesAreRefusedWithASentence) {
  const std::string token = enable("ann");
  auto key = new_key();
  auto ctx = enrolling_client("ann", token, key.get());
  STACK_OF(OSSL_CMP_ITAV)* itavs = OSSL_CMP_exec_GENM_ses(ctx.get());
  EXPECT_EQ(itavs, nullptr);
  ERR_clear_error();
  EXPECT_EQ(last_status_, 200);
  EXPECT_EQ(OSSL_CMP_CTX_get_status(ctx.get()), OSSL_CMP_PKISTATUS_rejection);
  EXPECT_THAT(std::string(last_body_.begin(), last_body_.end()),
              HasSubstr("(genm) are not supported"));
  EXPECT_FALSE(token_used("ann"));
  EXPECT_EQ(failed_attempts("ann"), 0);
}

TEST_F(CmpTest, AnAbandonedTransactionIsForgottenAndItsCertConfRefused) {
  cmp::Options options;
  options.transaction_ttl = std::chrono::seconds(0);
  make_server(options);
  const std::string token = enable("ann");
  auto key = new_key();
  CmpCtxPtr ctx;
  EXPECT_EQ(ir("ann", token, key.get(), &ctx), nullptr);  // its certConf comes too late
  ASSERT_EQ(sent_.size(), 2u);
  EXPECT_EQ(server_->open_transactions(), 0u);
  // The certificate was issued and recorded when the ip was sent.
  EXPECT_EQ(state_of("ann"), store::UserState::kActive);
}

TEST_F(CmpTest, BeyondTheBoundNewTransactionsAreRefusedAndNothingIsSpent) {
  cmp::Options options;
  options.max_open_transactions = 0;
  make_server(options);
  const std::string token = enable("ann");
  auto key = new_key();
  CmpCtxPtr ctx;
  EXPECT_EQ(ir("ann", token, key.get(), &ctx), nullptr);
  EXPECT_EQ(OSSL_CMP_CTX_get_status(ctx.get()), OSSL_CMP_PKISTATUS_rejection);
  EXPECT_TRUE(has_fail_bit(ctx.get(), OSSL_CMP_PKIFAILUREINFO_systemUnavail));
  EXPECT_FALSE(token_used("ann"));
}

TEST_F(CmpTest, UsersEnrollConcurrently) {
  constexpr int kUsers = 4;
  std::vector<std::string> tokens;
  for (int i = 0; i < kUsers; ++i)
    tokens.push_back(enable("user" + std::to_string(i), "User " + std::to_string(i)));
  std::atomic<int> enrolled{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kUsers; ++i)
    threads.emplace_back([&, i] {
      auto key = new_key();
      if (ir("user" + std::to_string(i), tokens[i], key.get()) != nullptr) ++enrolled;
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(enrolled.load(), kUsers);
  for (int i = 0; i < kUsers; ++i)
    EXPECT_EQ(state_of("user" + std::to_string(i)), store::UserState::kActive);
  EXPECT_EQ(server_->open_transactions(), 0u);
}

}  // namespace
}  // namespace kmsd

// Administrators on a real token, store and CA: adding certifies the CSR's key with the role
// recorded; bad input changes nothing; removal revokes; the last admin stays; k = 2 runs only
// at the second distinct approval.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "common/clock.hpp"
#include "daemon/admins/admin_service.hpp"
#include "daemon/api/routes.hpp"
#include "daemon/ca/issuer.hpp"
#include "daemon/provision/initializer.hpp"
#include "tests/support/logged_in_token.hpp"

namespace kmsd {
namespace {

using ::testing::HasSubstr;
using json = nlohmann::json;
using store::RequestState;

std::string csr_for(EVP_PKEY* key, const std::string& cn = "ignored") {
  ossl::X509ReqPtr req(X509_REQ_new());
  ossl::X509NamePtr name(X509_NAME_new());
  X509_NAME_add_entry_by_txt(name.get(), "CN", MBSTRING_UTF8,
                             reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1, 0);
  X509_REQ_set_subject_name(req.get(), name.get());
  X509_REQ_set_pubkey(req.get(), key);
  EXPECT_GT(X509_REQ_sign(req.get(), key, EVP_sha256()), 0);
  ossl::BioPtr bio(BIO_new(BIO_s_mem()));
  PEM_write_bio_X509_REQ(bio.get(), req.get());
  char* p = nullptr;
  long n = BIO_get_mem_data(bio.get(), &p);
  return std::string(p, static_cast<std::size_t>(n));
}

ossl::EvpPkeyPtr new_key(hsm::KeyType type = hsm::KeyType::kEcP256) {
  return std::move(ca::generate_key(type).value());
}

class AdminServiceTest : public testing::TokenSandbox {
 protected:
  void SetUp() override {
    TokenSandbox::SetUp();
    token_ = testing::open_logged_in_token(token());
    ASSERT_NE(token_, nullptr);
    cfg_.token.module = testing::kSoftHsmModule;
    cfg_.token.uri = token().uri();
    cfg_.store.path = dir() / "kmsd.db";
    store_ = std::move(store::Store::open(cfg_.store.path).value());
    provision::AdminOptions first{"root", dir() / "root.p12", SecretBytes::from_string("pass")};
    auto rep = provision::initialize(cfg_, *token_, *store_, first);
    ASSERT_TRUE(rep.ok()) << rep.error().message;
    policy_ = std::make_unique<policy::PolicyInForce>(
        std::make_shared<const policy::PolicyCheck>(policy::PolicyCheck::create({}).value()));
    audit_ = std::make_unique<audit::AuditLog>(*store_, *token_);
    approvals_ = std::make_unique<approvals::Approvals>(*store_, *audit_);
    admins_ = std::make_unique<admins::AdminService>(
        *store_, *token_, *audit_, *approvals_, *policy_, [] {
          return admins::AdminSettings{std::chrono::days(30), "sha256"};
        });
    ca_ = std::move(provision::load_ca_certificate(*store_).value());
  }

  void require(int admin_add, int admin_remove) {
    approvals::Rules rules;
    rules.required = {{"admin_add", admin_add}, {"admin_remove", admin_remove}};
    approvals_->set_rules(rules);
  }

  // Adds NAME at once (k = 1) and returns the executed outcome's result.
  json add_now(const std::string& name, const std::string& role) {
    auto key = new_key();
    auto out = admins_->add(name, role, csr_for(key.get()), "root");
    EXPECT_TRUE(out.ok()) << (out.ok() ? "" : out.error().message);
    if (!out.ok()) return json();
    EXPECT_EQ(out->state, RequestState::kExecuted);
    return out->result;
  }

  // Everything an add or remove could change.
  struct Snapshot {
    std::size_t admins = 0, certificates = 0, requests = 0;
    std::int64_t audit_seq = 0;
    bool operator==(const Snapshot&) const = default;
  };
  Snapshot snapshot() {
    Snapshot s;
    s.admins = store_->admins().value().size();
    s.certificates = store_->certificates(store::CertKind::kAdmin).value().size();
    s.requests = store_->approval_requests(std::nullopt).value().size();
    auto last = store_->last_audit().value();
    s.audit_seq = last ? last->seq : 0;
    return s;
  }

  config::Config cfg_;
  std::unique_ptr<hsm::Token> token_;
  std::unique_ptr<store::Store> store_;
  std::unique_ptr<policy::PolicyInForce> policy_;
  std::unique_ptr<audit::AuditLog> audit_;
  std::unique_ptr<approvals::Approvals> approvals_;
  std::unique_ptr<admins::AdminService> admins_;
  ossl::X509Ptr ca_;
};

TEST_F(AdminServiceTest, AddWithOneApprovalCertifiesTheRequestKeyForClientAuthWithTheRole) {
  auto key = new_key();
  auto out = admins_->add("Ann Auditor", "auditor", csr_for(key.get(), "whatever"), "root");
  ASSERT_TRUE(out.ok()) << out.error().message;
  ASSERT_EQ(out->state, RequestState::kExecuted);
  EXPECT_TRUE(out->request_id.empty());
  const json& r = out->result;
  EXPECT_EQ(r["name"], "Ann Auditor");
  EXPECT_EQ(r["role"], "auditor");
  auto cert = ossl::x509_from_pem(r["certificate"].get<std::string>());
  ASSERT_TRUE(cert.ok());
  EXPECT_TRUE(ca::signed_by(cert->get(), ca_.get()));
  EXPECT_TRUE(ca::public_key_matches(cert->get(), key.get()));
  EXPECT_EQ(ca::serial_hex(cert->get()), r["serial"]);
  EXPECT_EQ(ca::not_after_unix(cert->get()), r["not_after"]);
  EXPECT_EQ(X509_check_purpose(cert->get(), X509_PURPOSE_SSL_CLIENT, 0), 1);
  EXPECT_EQ(X509_check_purpose(cert->get(), X509_PURPOSE_SSL_SERVER, 0), 0);
  // The subject is kmsd's, not the CSR's.
  EXPECT_EQ(ca::name_to_string(X509_get_subject_name(cert->get())),
            "CN=Ann Auditor,OU=kmsd administrators");
  // [admin] cert_validity_days from the settings in force (30 here).
  EXPECT_NEAR(ca::not_after_unix(cert->get()) - unix_now(), 30 * 86400, 10);
  // It chains to the CA for a TLS client, as the admin listener checks it.
  ossl::X509StorePtr trust(X509_STORE_new());
  X509_STORE_add_cert(trust.get(), ca_.get());
  ossl::X509StoreCtxPtr ctx(X509_STORE_CTX_new());
  X509_STORE_CTX_init(ctx.get(), trust.get(), cert->get(), nullptr);
  X509_STORE_CTX_set_purpose(ctx.get(), X509_PURPOSE_SSL_CLIENT);
  EXPECT_EQ(X509_verify_cert(ctx.get()), 1)
      << X509_verify_cert_error_string(X509_STORE_CTX_get_error(ctx.get()));

  auto rec = store_->find_admin("Ann Auditor").value();
  ASSERT_TRUE(rec.has_value());
  EXPECT_EQ(rec->role, store::AdminRole::kAuditor);
  EXPECT_EQ(rec->cert_serial, r["serial"]);
  auto by_serial = store_->find_admin_by_serial(r["serial"]).value();
  ASSERT_TRUE(by_serial.has_value());
  EXPECT_EQ(by_serial->name, "Ann Auditor");
  auto listed = admins_->list().value()["admins"];
  ASSERT_EQ(listed.size(), 2u);
  EXPECT_EQ(listed[0]["name"], "Ann Auditor");
  EXPECT_EQ(listed[0]["not_after"], r["not_after"]);
  EXPECT_TRUE(listed[0]["removed_at"].is_null());
  EXPECT_EQ(listed[1]["name"], "root");
  // Audited, and the chain still verifies.
  std::vector<std::string> actions;
  ASSERT_TRUE(audit_
                  ->export_records([&](const json& j) {
                    actions.push_back(j["action"]);
                    return Status{};
                  })
                  .ok());
  EXPECT_THAT(actions, ::testing::Contains("admin.add"));
  EXPECT_TRUE(audit_->verify().value().ok());
}

TEST_F(AdminServiceTest, BadRequestsAreRefusedAndChangeNothing) {
  const Snapshot before = snapshot();
  auto key = new_key();
  const std::string csr = csr_for(key.get());
  struct Case {
    std::string name, role, csr;
    ErrorCode code;
    std::string says;
  };
  // A CSR whose key was swapped after signing: its signature no longer verifies.
  ossl::X509ReqPtr altered;
  {
    ossl::BioPtr bio(BIO_new_mem_buf(csr.data(), static_cast<int>(csr.size())));
    altered.reset(PEM_read_bio_X509_REQ(bio.get(), nullptr, nullptr, nullptr));
    auto other = new_key();
    X509_REQ_set_pubkey(altered.get(), other.get());
  }
  ossl::BioPtr abio(BIO_new(BIO_s_mem()));
  PEM_write_bio_X509_REQ(abio.get(), altered.get());
  char* p = nullptr;
  const std::string altered_pem(p, static_cast<std::size_t>(BIO_get_mem_data(abio.get(), &p)));
  auto p384 = new_key(hsm::KeyType::kEcP384);
  // Only P-256 keys allowed: the P-384 CSR is refused by the policy.
  config::PolicyConfig only_p256;
  only_p256.key_types = {hsm::KeyType::kEcP256};
  policy_->replace(
      std::make_shared<const policy::PolicyCheck>(policy::PolicyCheck::create(only_p256).value()));
  const std::vector<Case> cases = {
      {"ann", "auditor", "not a csr", ErrorCode::kInvalidArgument, "PEM certificate request"},
      {"ann", "auditor",
       "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
       ErrorCode::kInvalidArgument, "cannot be read"},
      {"ann", "auditor", altered_pem, ErrorCode::kInvalidArgument, "does not verify"},
      {"ann", "auditor", csr_for(p384.get()), ErrorCode::kInvalidArgument, "ec-p384"},
      {"ann", "root", csr, ErrorCode::kInvalidArgument, "not one of admin, auditor, approver"},
      {"ann", "", csr, ErrorCode::kInvalidArgument, "not one of"},
      {"", "auditor", csr, ErrorCode::kInvalidArgument, "needs a name"},
      {std::string(65, 'a'), "auditor", csr, ErrorCode::kInvalidArgument, "at most 64"},
      {"a/b", "auditor", csr, ErrorCode::kInvalidArgument, "'/'"},
      {"bad\nname", "auditor", csr, ErrorCode::kInvalidArgument, "control character"},
      {"Operator", "auditor", csr, ErrorCode::kInvalidArgument, "operator"},
      {"root", "auditor", csr, ErrorCode::kAlreadyExists, "already an administrator"},
  };
  for (const auto& c : cases) {
    auto out = admins_->add(c.name, c.role, c.csr, "root");
    ASSERT_FALSE(out.ok()) << c.name << "/" << c.role;
    EXPECT_EQ(out.error().code, c.code) << c.name << "/" << c.role << ": " << out.error().message;
    EXPECT_THAT(out.error().message, HasSubstr(c.says)) << c.name << "/" << c.role;
  }
  EXPECT_EQ(snapshot(), before);
  EXPECT_FALSE(store_->find_admin("ann").value().has_value());
}

TEST_F(AdminServiceTest, RemovalRevokesTheCertificateAndTheApiRefusesItFromThenOn) {
  const json bob = add_now("bob", "approver");
  ASSERT_TRUE(bob.contains("serial"));
  auto cert = std::move(ossl::x509_from_pem(bob["certificate"].get<std::string>()).value());
  api::Peer peer;
  peer.tls = true;
  peer.client_cert = ossl::X509Ptr(X509_dup(cert.get()));
  peer.client_cert_verified = true;
  auto before = api::authenticate(peer, *store_);
  ASSERT_TRUE(std::holds_alternative<api::Identity>(before));
  EXPECT_EQ(std::get<api::Identity>(before).role, store::AdminRole::kApprover);

  auto out = admins_->remove("bob", "root");
  ASSERT_TRUE(out.ok()) << out.error().message;
  EXPECT_EQ(out->state, RequestState::kExecuted);
  EXPECT_EQ(out->result["revoked_certificate"], bob["serial"]);
  auto rec = store_->find_admin("bob").value();
  ASSERT_TRUE(rec && rec->removed_at.has_value());
  auto c = store_->find_certificate(bob["serial"]).value();
  ASSERT_TRUE(c && c->revoked_at.has_value());
  EXPECT_EQ(c->revocation_reason, admins::kCessationOfOperation);
  auto after = api::authenticate(peer, *store_);
  ASSERT_TRUE(std::holds_alternative<api::AuthFailure>(after));
  EXPECT_EQ(std::get<api::AuthFailure>(after).status, api::http::status::forbidden);
  // Listed as removed; not removable twice; the name is not handed out again.
  auto listed = admins_->list().value()["admins"];
  EXPECT_FALSE(listed[0]["removed_at"].is_null());
  EXPECT_FALSE(listed[0]["revoked_at"].is_null());
  auto twice = admins_->remove("bob", "root");
  ASSERT_FALSE(twice.ok());
  EXPECT_EQ(twice.error().code, ErrorCode::kFailedPrecondition);
  EXPECT_THAT(twice.error().message, HasSubstr("already removed"));
  auto key = new_key();
  auto again = admins_->add("bob", "approver", csr_for(key.get()), "root");
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.error().code, ErrorCode::kAlreadyExists);
  EXPECT_THAT(again.error().message, HasSubstr("never reused"));
  auto unknown = admins_->remove("nobody", "root");
  ASSERT_FALSE(unknown.ok());
  EXPECT_EQ(unknown.error().code, ErrorCode::kNotFound);
}

TEST_F(AdminServiceTest, TheLastAdministratorWithRoleAdminCannotBeRemoved) {
  add_now("ann", "auditor");
  add_now("pat", "approver");
  const Snapshot before = snapshot();
  auto last = admins_->remove("root", "root");
  ASSERT_FALSE(last.ok());
  EXPECT_EQ(last.error().code, ErrorCode::kFailedPrecondition);
  EXPECT_THAT(last.error().message, HasSubstr("last administrator with role admin"));
  EXPECT_THAT(last.error().message, HasSubstr("--role admin"));
  EXPECT_EQ(snapshot(), before);
  // Auditors and approvers do not count, but they can be removed.
  ASSERT_TRUE(admins_->remove("ann", "root").ok());
  // With another admin, removing yourself is allowed; then the other one is the last.
  add_now("eve", "admin");
  auto self = admins_->remove("root", "root");
  ASSERT_TRUE(self.ok()) << self.error().message;
  EXPECT_EQ(self->state, RequestState::kExecuted);
  auto eve = admins_->remove("eve", "eve");
  ASSERT_FALSE(eve.ok());
  EXPECT_THAT(eve.error().message, HasSubstr("last administrator"));
}

TEST_F(AdminServiceTest, WithKTwoAnAddRunsOnlyAtTheSecondDistinctAdministrator) {
  add_now("bob", "admin");
  require(2, 2);
  auto key = new_key();
  auto out = admins_->add("carol", "approver", csr_for(key.get()), "root");
  ASSERT_TRUE(out.ok()) << out.error().message;
  ASSERT_EQ(out->state, RequestState::kPending);
  EXPECT_EQ(out->approvals, 1);
  EXPECT_EQ(out->required, 2);
  const std::string id = out->request_id;
  EXPECT_FALSE(store_->find_admin("carol").value().has_value());  // k-1: nothing yet
  // The same name cannot be asked for twice while one request waits.
  auto dup = admins_->add("carol", "admin", csr_for(key.get()), "bob");
  ASSERT_FALSE(dup.ok());
  EXPECT_EQ(dup.error().code, ErrorCode::kAlreadyExists);
  EXPECT_THAT(dup.error().message, HasSubstr(id));
  // The requester cannot approve again.
  auto self = approvals_->approve(id, "root");
  ASSERT_FALSE(self.ok());
  EXPECT_EQ(self.error().code, ErrorCode::kAlreadyExists);
  EXPECT_FALSE(store_->find_admin("carol").value().has_value());
  // The second distinct administrator makes it run.
  auto done = approvals_->approve(id, "bob");
  ASSERT_TRUE(done.ok()) << done.error().message;
  ASSERT_EQ(done->state, RequestState::kExecuted) << done->message;
  auto rec = store_->find_admin("carol").value();
  ASSERT_TRUE(rec.has_value());
  EXPECT_EQ(rec->role, store::AdminRole::kApprover);
  // The requester fetches the certificate from the executed request.
  auto req = store_->find_approval_request(id).value();
  ASSERT_TRUE(req && req->result);
  auto result = json::parse(*req->result);
  auto cert = ossl::x509_from_pem(result["certificate"].get<std::string>());
  ASSERT_TRUE(cert.ok());
  EXPECT_TRUE(ca::public_key_matches(cert->get(), key.get()));
  EXPECT_EQ(rec->cert_serial, result["serial"]);
  auto late = approvals_->approve(id, "carol");
  ASSERT_FALSE(late.ok());
  EXPECT_EQ(store_->admins().value().size(), 3u);
}

TEST_F(AdminServiceTest, WithKTwoARemovalWaitsAndIsCheckedAgainWhenItRuns) {
  add_now("bob", "admin");
  require(1, 2);
  auto first = admins_->remove("bob", "root");
  ASSERT_TRUE(first.ok()) << first.error().message;
  ASSERT_EQ(first->state, RequestState::kPending);
  auto second = admins_->remove("root", "bob");
  ASSERT_TRUE(second.ok()) << second.error().message;  // each alone would leave an admin
  EXPECT_FALSE(store_->find_admin("bob").value()->removed_at.has_value());
  auto ran = approvals_->approve(first->request_id, "eve");
  ASSERT_TRUE(ran.ok());
  ASSERT_EQ(ran->state, RequestState::kExecuted);
  EXPECT_TRUE(store_->find_admin("bob").value()->removed_at.has_value());
  // Now root is the last admin: the second request fails when it runs and changes nothing.
  auto refused = approvals_->approve(second->request_id, "eve");
  ASSERT_TRUE(refused.ok());
  EXPECT_EQ(refused->state, RequestState::kFailed);
  EXPECT_THAT(refused->message, HasSubstr("last administrator"));
  EXPECT_FALSE(store_->find_admin("root").value()->removed_at.has_value());
  auto root_cert = store_->find_certificate(store_->find_admin("root").value()->cert_serial);
  EXPECT_FALSE(root_cert.value()->revoked_at.has_value());
}

TEST_F(AdminServiceTest, AnAddCannotRunWhileTheTokenIsLoggedOutAndLeavesNothing) {
  token_->logout();
  auto key = new_key();
  const Snapshot before = snapshot();
  auto out = admins_->add("ann", "auditor", csr_for(key.get()), "root");
  ASSERT_FALSE(out.ok());
  EXPECT_EQ(snapshot(), before);
}

TEST(AdminNameTest, NamesAreCertificateCommonNames) {
  EXPECT_TRUE(admins::check_name("Jane Doe").ok());
  EXPECT_TRUE(admins::check_name("jdoe@example.com").ok());
  EXPECT_TRUE(admins::check_name("Jürgen Müller").ok());
  EXPECT_TRUE(admins::check_name(std::string(64, 'x')).ok());
  EXPECT_FALSE(admins::check_name(std::string(65, 'x')).ok());
  EXPECT_FALSE(admins::check_name(" padded").ok());
  EXPECT_FALSE(admins::check_name("kmsd").ok());
  EXPECT_FALSE(admins::check_name("bulk:job").ok());
  EXPECT_FALSE(admins::check_name("\xff\xfe").ok());
  auto subject = admins::subject_for("Doe, Jane");
  ASSERT_TRUE(subject.ok());
  EXPECT_EQ(ca::name_to_string(subject->get()), "CN=Doe\\, Jane,OU=kmsd administrators");
}

}  // namespace
}  // namespace kmsd

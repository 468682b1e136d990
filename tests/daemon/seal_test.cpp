// The seal, the unseal socket and the HTTP handlers, against an initialized throw-away token.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <nlohmann/json.hpp>

#include "daemon/api/routes.hpp"
#include "daemon/ca/issuer.hpp"
#include "daemon/policy/policy_check.hpp"
#include "daemon/provision/initializer.hpp"
#include "daemon/startup/seal.hpp"
#include "daemon/startup/unseal_socket.hpp"
#include "hsm/pkcs11.hpp"
#include "tests/support/sandbox.hpp"

namespace kmsd {
namespace {

using ::testing::HasSubstr;
using json = nlohmann::json;

// An initialized KMS (token keys, CA, first admin) with the token logged out again.
struct Kms {
  config::Config cfg;
  std::unique_ptr<hsm::Token> token;
  std::unique_ptr<store::Store> store;
};

Kms make_kms(const std::filesystem::path& dir, const std::string& token_label) {
  Kms k;
  k.cfg.token.module = testing::kSoftHsmModule;
  k.cfg.token.uri = "pkcs11:token=" + token_label;
  k.cfg.store.path = dir / (token_label + ".db");
  hsm::TokenOptions o;
  o.module_path = testing::kSoftHsmModule;
  o.token_uri = k.cfg.token.uri;
  k.token = std::move(hsm::Token::open(o).value());
  k.store = std::move(store::Store::open(k.cfg.store.path).value());
  EXPECT_TRUE(k.token->login(SecretBytes::from_string(testing::kUserPin)).ok());
  provision::AdminOptions admin{"root", dir / (token_label + "-admin.p12"),
                                SecretBytes::from_string("passphrase")};
  auto rep = provision::initialize(k.cfg, *k.token, *k.store, admin);
  EXPECT_TRUE(rep.ok()) << rep.error().message;
  k.token->logout();
  return k;
}

// The services behind the admin API, as kmsd wires them, with the default policy.
struct AdminStack {
  AdminStack(startup::Seal& seal, Kms& kms)
      : policy(
            std::make_shared<const policy::PolicyCheck>(policy::PolicyCheck::create({}).value())),
        audit(*kms.store, *kms.token),
        approvals(*kms.store, audit),
        users(*kms.store, *kms.token, audit, policy, [] { return users::TokenSettings{}; }),
        routes({seal, *kms.store, users, approvals, audit}) {}
  policy::PolicyInForce policy;
  audit::AuditLog audit;
  approvals::Approvals approvals;
  users::UserService users;
  api::AdminRoutes routes;
};

class SealTest : public testing::TokenSandbox {
 protected:
  void SetUp() override {
    TokenSandbox::SetUp();
    kms = make_kms(dir(), token().label());
    seal = std::make_unique<startup::Seal>(*kms.token, *kms.store,
                                           startup::SealOptions{{"localhost", "127.0.0.1"}});
  }
  Kms kms;
  std::unique_ptr<startup::Seal> seal;
};

TEST_F(SealTest, StartsSealedWithThePublicCaCertificateAvailable) {
  EXPECT_EQ(seal->status().state, startup::State::kSealed);
  EXPECT_EQ(seal->material(), nullptr);
  EXPECT_THAT(seal->ca_pem(), HasSubstr("BEGIN CERTIFICATE"));
}

TEST_F(SealTest, WrongSecretIsCountedAndLeavesItSealed) {
  auto st = seal->unseal(SecretBytes::from_string("00000000"));
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.error().code, ErrorCode::kUnauthenticated);
  EXPECT_THAT(st.error().message, HasSubstr("rejected by the token"));
  auto s = seal->status();
  EXPECT_EQ(s.state, startup::State::kSealed);
  EXPECT_EQ(s.failed_unseal_attempts, 1u);
  EXPECT_THAT(s.last_failure, HasSubstr("rejected"));
}

TEST_F(SealTest, UnsealVerifiesTheCaKeyAndIssuesAnInMemoryTlsCertificate) {
  ASSERT_TRUE(seal->unseal(SecretBytes::from_string(testing::kUserPin)).ok());
  auto m = seal->material();
  ASSERT_NE(m, nullptr);
  EXPECT_EQ(seal->status().state, startup::State::kUnsealed);
  EXPECT_TRUE(ca::signed_by(m->tls_cert.get(), m->ca_cert.get()));
  EXPECT_EQ(X509_check_host(m->tls_cert.get(), "localhost", 0, 0, nullptr), 1);
  // Every certificate the CA signs is recorded, the TLS one included.
  auto servers = kms.store->certificates(store::CertKind::kServer);
  ASSERT_TRUE(servers.ok());
  ASSERT_EQ(servers->size(), 1u);
  EXPECT_EQ(servers->front().serial, ca::serial_hex(m->tls_cert.get()));
  // Unsealing again is a no-op, not a second certificate.
  ASSERT_TRUE(seal->unseal(SecretBytes::from_string(testing::kUserPin)).ok());
  EXPECT_EQ(kms.store->certificates(store::CertKind::kServer)->size(), 1u);
}

TEST_F(SealTest, APinChangedBehindItsBackSealsTheDaemon) {
  ASSERT_TRUE(seal->unseal(SecretBytes::from_string(testing::kUserPin)).ok());
  {
    // An operator changes the user PIN with another tool while kmsd runs.
    auto module = hsm::p11::Module::load(testing::kSoftHsmModule);
    ASSERT_TRUE(module.ok());
    auto s = hsm::p11::Session::open(*module, hsm::p11::slots_with_tokens(**module).at(0).slot_id);
    std::string old_pin = testing::kUserPin, new_pin = "11223344";
    ASSERT_EQ(
        s.f()->C_SetPIN(s.handle(), reinterpret_cast<CK_UTF8CHAR*>(old_pin.data()), old_pin.size(),
                        reinterpret_cast<CK_UTF8CHAR*>(new_pin.data()), new_pin.size()),
        CKR_OK);
  }
  kms.token->close_all_sessions_for_test();
  // The next token operation tries the retained PIN once, is refused, and logs out.
  EXPECT_FALSE(kms.token->seal(std::vector<std::uint8_t>{1}, std::vector<std::uint8_t>{2}).ok());
  EXPECT_EQ(seal->material(), nullptr);
  auto st = seal->status();
  EXPECT_EQ(st.state, startup::State::kSealed);
  EXPECT_THAT(st.last_failure, HasSubstr("no longer accepts the startup secret"));
  // The operator unseals with the new secret; nothing else is needed.
  ASSERT_TRUE(seal->unseal(SecretBytes::from_string("11223344")).ok());
  EXPECT_EQ(seal->status().state, startup::State::kUnsealed);
}

TEST_F(SealTest, SealForgetsTheMaterialAndTheLogin) {
  ASSERT_TRUE(seal->unseal(SecretBytes::from_string(testing::kUserPin)).ok());
  seal->seal();
  EXPECT_EQ(seal->material(), nullptr);
  EXPECT_FALSE(kms.token->logged_in());
  EXPECT_EQ(seal->status().state, startup::State::kSealed);
}

// SoftHSM reads its token directory once per process, so both tokens exist before either opens.
class TwoInstallationsTest : public testing::TokenSandbox {};

TEST_F(TwoInstallationsTest, TokenOfAnotherInstallationIsRefused) {
  token().add_token("other");
  Kms ours = make_kms(dir(), token().label());
  Kms other = make_kms(dir(), "other");
  startup::Seal mixed(*other.token, *ours.store, startup::SealOptions{{"localhost"}});
  auto st = mixed.unseal(SecretBytes::from_string(testing::kUserPin));
  ASSERT_FALSE(st.ok());
  EXPECT_THAT(st.error().message, HasSubstr("does not match the CA certificate in the store"));
  EXPECT_FALSE(other.token->logged_in());
  EXPECT_EQ(mixed.status().state, startup::State::kSealed);
}

TEST_F(SealTest, UnsealSocketServesStatusUnsealAndSealToTheOwnerOnly) {
  auto path = dir() / "run" / "unseal.sock";
  auto sock = startup::UnsealSocket::listen(path, *seal);
  ASSERT_TRUE(sock.ok()) << sock.error().message;
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);

  auto status = json::parse(*startup::unseal_request(path, "status"));
  EXPECT_EQ(status["state"], "sealed");
  EXPECT_TRUE(status["ok"]);

  auto wrong = SecretBytes::from_string("nope");
  auto bad = json::parse(*startup::unseal_request(path, "unseal", &wrong));
  EXPECT_FALSE(bad["ok"]);
  EXPECT_THAT(bad["error"].get<std::string>(), HasSubstr("rejected"));
  EXPECT_EQ(bad["failed_unseal_attempts"], 1);

  auto pin = SecretBytes::from_string(testing::kUserPin);
  auto good = json::parse(*startup::unseal_request(path, "unseal", &pin));
  EXPECT_TRUE(good["ok"]);
  EXPECT_EQ(good["state"], "unsealed");

  auto sealed = json::parse(*startup::unseal_request(path, "seal"));
  EXPECT_EQ(sealed["state"], "sealed");

  auto unknown = json::parse(*startup::unseal_request(path, "explode"));
  EXPECT_FALSE(unknown["ok"]);
  EXPECT_THAT(unknown["error"].get<std::string>(), HasSubstr("unknown op"));

  // A second daemon cannot take over a live socket.
  auto twice = startup::UnsealSocket::listen(path, *seal);
  ASSERT_FALSE(twice.ok());
  EXPECT_EQ(twice.error().code, ErrorCode::kAlreadyExists);
  sock->reset();
  EXPECT_FALSE(std::filesystem::exists(path));
  auto gone = startup::unseal_request(path, "status");
  ASSERT_FALSE(gone.ok());
  EXPECT_THAT(gone.error().message, HasSubstr("is kmsd running"));
}

TEST_F(SealTest, UnsealSocketAnswersGarbageWithAnErrorAndKeepsServing) {
  auto path = dir() / "unseal.sock";
  auto sock = startup::UnsealSocket::listen(path, *seal);
  ASSERT_TRUE(sock.ok());
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM, 0));
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::strcpy(a.sun_path, path.c_str());
  ASSERT_EQ(::connect(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  std::string junk = "this is not json\n";
  ASSERT_EQ(::write(fd.get(), junk.data(), junk.size()), static_cast<ssize_t>(junk.size()));
  char buf[512] = {};
  ASSERT_GT(::read(fd.get(), buf, sizeof buf - 1), 0);
  EXPECT_THAT(std::string(buf), HasSubstr("\"ok\":false"));
  EXPECT_TRUE(json::parse(*startup::unseal_request(path, "status"))["ok"]);
}

api::Request get(const std::string& target) {
  api::Request req{api::http::verb::get, target, 11};
  return req;
}

TEST_F(SealTest, PublicRoutesReportSealStateAndServeTheCa) {
  api::PublicRoutes routes(*seal);
  api::Peer peer;
  EXPECT_EQ(routes.handle(get("/healthz"), peer).result(), api::http::status::ok);
  auto sealed = routes.handle(get("/readyz"), peer);
  EXPECT_EQ(sealed.result(), api::http::status::service_unavailable);
  EXPECT_EQ(json::parse(sealed.body())["state"], "sealed");
  EXPECT_FALSE(sealed[api::http::field::retry_after].empty());
  ASSERT_TRUE(seal->unseal(SecretBytes::from_string(testing::kUserPin)).ok());
  EXPECT_EQ(routes.handle(get("/readyz"), peer).result(), api::http::status::ok);
  auto pem = routes.handle(get("/ca.pem"), peer);
  EXPECT_EQ(pem.result(), api::http::status::ok);
  EXPECT_EQ(pem[api::http::field::content_type], "application/x-pem-file");
  EXPECT_THAT(pem.body(), HasSubstr("BEGIN CERTIFICATE"));
  auto der = routes.handle(get("/ca.der"), peer);
  EXPECT_EQ(der.result(), api::http::status::ok);
  EXPECT_TRUE(ossl::x509_from_der(
                  {reinterpret_cast<const std::uint8_t*>(der.body().data()), der.body().size()})
                  .ok());
  EXPECT_EQ(routes.handle(get("/nope"), peer).result(), api::http::status::not_found);
  api::Request post{api::http::verb::post, "/readyz", 11};
  EXPECT_EQ(routes.handle(post, peer).result(), api::http::status::method_not_allowed);
}

TEST_F(SealTest, AdminRoutesNeedAVerifiedAdministratorCertificate) {
  AdminStack stack(*seal, kms);
  api::AdminRoutes& routes = stack.routes;
  api::Peer anonymous;
  anonymous.tls = true;
  EXPECT_EQ(routes.handle(get("/v1/whoami"), anonymous).result(), api::http::status::unauthorized);

  auto admins = kms.store->certificates(store::CertKind::kAdmin);
  ASSERT_TRUE(admins.ok());
  ASSERT_EQ(admins->size(), 1u);
  api::Peer admin;
  admin.tls = true;
  admin.client_cert = std::move(ossl::x509_from_der(admins->front().der).value());
  admin.client_cert_verified = false;
  admin.client_cert_error = "certificate has expired";
  auto expired = routes.handle(get("/v1/whoami"), admin);
  EXPECT_EQ(expired.result(), api::http::status::unauthorized);
  EXPECT_THAT(expired.body(), HasSubstr("certificate has expired"));
  admin.client_cert_verified = true;
  admin.client_cert_error.clear();
  auto ok = routes.handle(get("/v1/whoami"), admin);
  EXPECT_EQ(ok.result(), api::http::status::ok);
  EXPECT_EQ(json::parse(ok.body())["name"], "root");

  // A verified certificate that is not an administrator's (the TLS server one) is forbidden.
  ASSERT_TRUE(seal->unseal(SecretBytes::from_string(testing::kUserPin)).ok());
  api::Peer server;
  server.tls = true;
  server.client_cert.reset(X509_dup(seal->material()->tls_cert.get()));
  server.client_cert_verified = true;
  EXPECT_EQ(routes.handle(get("/v1/whoami"), server).result(), api::http::status::forbidden);
}

// Each role reaches only its endpoints; refused calls change nothing.
TEST_F(SealTest, EveryRoleIsLimitedToItsEndpoints) {
  ASSERT_TRUE(seal->unseal(SecretBytes::from_string(testing::kUserPin)).ok());
  AdminStack stack(*seal, kms);
  api::AdminRoutes& routes = stack.routes;
  audit::AuditLog& audit = stack.audit;

  // Certificates issued by the KMS CA for an auditor and an approver.
  auto peer_for = [&](const std::string& name, store::AdminRole role) {
    auto key = ca::generate_key(hsm::KeyType::kEcP256);
    auto subject = ca::parse_subject("/CN=" + name);
    ca::IssueRequest req;
    req.subject = subject->get();
    req.public_key = key->get();
    auto cert = ca::issue_on_token(req, seal->material()->ca_cert.get(), *kms.token, EVP_sha256());
    EXPECT_TRUE(cert.ok());
    EXPECT_TRUE(kms.store
                    ->insert_certificate(
                        provision::certificate_record(cert->get(), store::CertKind::kAdmin))
                    .ok());
    EXPECT_TRUE(
        kms.store->insert_admin({name, role, ca::serial_hex(cert->get()), 1, std::nullopt}).ok());
    api::Peer p;
    p.tls = true;
    p.client_cert = std::move(*cert);
    p.client_cert_verified = true;
    return p;
  };
  api::Peer auditor = peer_for("audrey", store::AdminRole::kAuditor);
  api::Peer approver = peer_for("apollo", store::AdminRole::kApprover);
  auto post = [](const std::string& target, const std::string& body) {
    api::Request r{api::http::verb::post, target, 11};
    r.body() = body;
    r.prepare_payload();
    return r;
  };
  const std::string user = R"({"id":"x","email":"x@example.com","display_name":"X"})";
  using api::http::status;
  EXPECT_EQ(routes.handle(post("/v1/users", user), auditor).result(), status::forbidden);
  EXPECT_EQ(routes.handle(post("/v1/users", user), approver).result(), status::forbidden);
  EXPECT_EQ(routes.handle(post("/v1/users/x/revoke", "{}"), auditor).result(), status::forbidden);
  EXPECT_EQ(routes.handle(get("/v1/users/x"), approver).result(), status::forbidden);
  EXPECT_EQ(routes.handle(get("/v1/audit/verify"), approver).result(), status::forbidden);
  // What each role may do gets past the role check (404: no such user/request).
  EXPECT_EQ(routes.handle(get("/v1/users/x"), auditor).result(), status::not_found);
  EXPECT_EQ(routes.handle(get("/v1/audit/verify"), auditor).result(), status::ok);
  EXPECT_EQ(routes.handle(get("/v1/requests"), approver).result(), status::ok);
  EXPECT_EQ(routes.handle(post("/v1/requests/nope/approve", ""), approver).result(),
            status::not_found);
  EXPECT_EQ(routes.handle(post("/v1/requests/nope/approve", ""), auditor).result(),
            status::forbidden);
  // Nothing was created or audited by the refused calls.
  EXPECT_FALSE(kms.store->find_user("x")->has_value());
  EXPECT_EQ(audit.verify()->records, 0u);
  // A removed administrator is refused even with a valid certificate.
  ASSERT_TRUE(kms.store->remove_admin("audrey", 2).ok());
  EXPECT_EQ(routes.handle(get("/v1/users/x"), auditor).result(), status::forbidden);
}

TEST_F(SealTest, UnsealAndSealAreAuditedAndAnUnauditableUnsealIsUndone) {
  audit::AuditLog audit(*kms.store, *kms.token);
  seal->set_audit_hook([&](const std::string& action, const std::string& detail) {
    return audit.append("operator", action, {{"detail", detail}});
  });
  ASSERT_TRUE(seal->unseal(SecretBytes::from_string(testing::kUserPin)).ok());
  seal->seal();
  std::vector<std::string> actions;
  ASSERT_TRUE(audit
                  .export_records([&](const nlohmann::json& j) {
                    actions.push_back(j["action"]);
                    return Status{};
                  })
                  .ok());
  EXPECT_EQ(actions, (std::vector<std::string>{"seal.unseal", "seal.seal"}));

  seal->set_audit_hook([](const std::string&, const std::string&) -> Status {
    return make_error(ErrorCode::kStore, "disk full");
  });
  auto st = seal->unseal(SecretBytes::from_string(testing::kUserPin));
  ASSERT_FALSE(st.ok());
  EXPECT_THAT(st.error().message, HasSubstr("could not be written to the audit log"));
  EXPECT_EQ(seal->status().state, startup::State::kSealed);
  EXPECT_FALSE(kms.token->logged_in());
}

}  // namespace
}  // namespace kmsd

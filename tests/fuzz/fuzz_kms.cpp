#include "tests/fuzz/fuzz_kms.hpp"

#include <openssl/pkcs12.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <system_error>

#include "config/config.hpp"
#include "daemon/provision/initializer.hpp"

namespace kmsd::fuzz {

namespace fs = std::filesystem;

namespace {

constexpr const char* kModule = "/usr/lib/softhsm/libsofthsm2.so";
constexpr const char* kUserPin = "87654321";
constexpr const char* kSoPin = "12345678";
constexpr const char* kLabel = "kmsd-fuzz";
constexpr const char* kP12Pass = "fuzz-passphrase";

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "fuzz setup: %s\n", what.c_str());
  std::abort();
}

template <class T>
T must(Result<T> r, const char* what) {
  if (!r.ok()) die(std::string(what) + ": " + r.error().message);
  return std::move(*r);
}

void must(const Status& st, const char* what) {
  if (!st.ok()) die(std::string(what) + ": " + st.error().message);
}

ossl::X509Ptr admin_certificate(const fs::path& p12_path) {
  std::ifstream in(p12_path, std::ios::binary);
  std::string der((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto* p = reinterpret_cast<const unsigned char*>(der.data());
  ossl::Pkcs12Ptr p12(d2i_PKCS12(nullptr, &p, static_cast<long>(der.size())));
  EVP_PKEY* key = nullptr;
  X509* cert = nullptr;
  if (!p12 || PKCS12_parse(p12.get(), kP12Pass, &key, &cert, nullptr) != 1)
    die("cannot read the first administrator's PKCS#12");
  EVP_PKEY_free(key);
  return ossl::X509Ptr(cert);
}

Kms* build() {
  quiet_logs();
  const fs::path dir = scratch_dir() / "kms";
  fs::create_directories(dir / "tokens");
  const fs::path conf = dir / "softhsm2.conf";
  std::ofstream(conf) << "directories.tokendir = " << (dir / "tokens").string() << "\n"
                      << "objectstore.backend = file\n"
                      << "log.level = ERROR\n"
                      << "slots.removable = false\n";
  ::setenv("SOFTHSM2_CONF", conf.c_str(), 1);
  const std::string cmd = std::string("softhsm2-util --init-token --free --label ") + kLabel +
                          " --so-pin " + kSoPin + " --pin " + kUserPin + " >/dev/null";
  if (std::system(cmd.c_str()) != 0) die("softhsm2-util --init-token failed");

  auto* k = new Kms;  // lives as long as the process
  config::Config cfg;
  cfg.token.module = kModule;
  cfg.token.uri = std::string("pkcs11:token=") + kLabel;
  cfg.store.path = dir / "kmsd.db";
  hsm::TokenOptions topts;
  topts.module_path = kModule;
  topts.token_uri = cfg.token.uri;
  k->token = must(hsm::Token::open(topts), "opening the token");
  k->store = must(store::Store::open(cfg.store.path), "opening the store");
  must(k->token->login(SecretBytes::from_string(kUserPin)), "logging in");
  provision::AdminOptions admin{"root", dir / "admin.p12", SecretBytes::from_string(kP12Pass)};
  must(provision::initialize(cfg, *k->token, *k->store, admin), "kmsctl init");
  k->token->logout();

  k->seal = std::make_unique<startup::Seal>(*k->token, *k->store,
                                            startup::SealOptions{{"localhost", "127.0.0.1"}});
  must(k->seal->unseal(SecretBytes::from_string(kUserPin)), "unsealing");
  k->policy = std::make_unique<policy::PolicyInForce>(std::make_shared<const policy::PolicyCheck>(
      must(policy::PolicyCheck::create(cfg.policy), "policy")));
  k->audit = std::make_unique<audit::AuditLog>(*k->store, *k->token);
  k->approvals = std::make_unique<approvals::Approvals>(*k->store, *k->audit);
  // Wrong tokens never lock the fuzz user: later inputs keep reaching the same code.
  k->users = std::make_unique<users::UserService>(*k->store, *k->token, *k->audit, *k->policy, [] {
    return users::TokenSettings{std::chrono::days(14), 1u << 30};
  });
  users::UserService& us = *k->users;
  k->approvals->register_operation(
      "revoke", [&us](const nlohmann::json& p, const std::string& by) -> Result<nlohmann::json> {
        return us.revoke(p.value("user", std::string()), p.value("reason", 0), by);
      });
  k->approvals->register_operation(
      "recover", [&us](const nlohmann::json& p, const std::string& by) -> Result<nlohmann::json> {
        return us.recover(p.value("user", std::string()), by);
      });
  k->enrollment = std::make_unique<enroll::EnrollmentService>(
      *k->store, *k->token, *k->audit, *k->policy,
      [] {
        enroll::Settings s;
        s.max_failed_attempts = 1u << 30;
        s.crl_url = "http://127.0.0.1:8080/crl";
        s.ocsp_url = "http://127.0.0.1:8080/ocsp";
        return s;
      },
      [k] { return k->ca_certificate(); });
  k->revocation = std::make_unique<revocation::Revocation>(
      *k->store, *k->token, [] { return revocation::Settings{}; },
      [k] { return k->ca_certificate(); });
  k->admins = std::make_unique<admins::AdminService>(
      *k->store, *k->token, *k->audit, *k->approvals, *k->policy, [] {
        return admins::AdminSettings{std::chrono::days(365), "sha256"};
      });
  k->key_export = std::make_unique<enroll::KeyExport>(*k->store, *k->audit, *k->approvals,
                                                      *k->enrollment, std::chrono::hours(72));
  k->cmp = std::make_unique<cmp::CmpServer>(
      *k->enrollment, *k->token, *k->store, [k] { return k->ca_certificate(); }, "sha256");

  api::PkiHandlers h;
  h.crl = [k] { return k->revocation->crl_der(); };
  h.ocsp = [k](std::span<const std::uint8_t> der) { return k->revocation->respond(der); };
  h.cmp = [k](std::span<const std::uint8_t> der) {
    auto r = k->cmp->handle(der);
    return api::PkiHandlers::CmpReply{r.http_status, std::move(r.body), std::move(r.content_type)};
  };
  k->public_routes = std::make_unique<api::PublicRoutes>(*k->seal);
  k->pki_routes = std::make_unique<api::PkiRoutes>(std::move(h));
  api::AdminServices services{*k->seal, *k->store, *k->users, *k->approvals, *k->audit};
  services.admins = k->admins.get();
  services.key_export = k->key_export.get();
  k->admin_routes = std::make_unique<api::AdminRoutes>(services);
  k->enroll_routes = std::make_unique<api::EnrollRoutes>(*k->enrollment);
  must(k->revocation->refresh_if_due(), "first CRL");

  k->anonymous.address = "127.0.0.1:40000";
  k->admin.address = "127.0.0.1:40001";
  k->admin.tls = true;
  k->admin.client_cert = admin_certificate(dir / "admin.p12");
  k->admin.client_cert_verified = true;
  k->renew_user_token();
  return k;
}

}  // namespace

ossl::X509Ptr Kms::ca_certificate() const {
  auto m = seal->material();
  if (!m || !m->ca_cert) return nullptr;
  X509_up_ref(m->ca_cert.get());
  return ossl::X509Ptr(m->ca_cert.get());
}

void Kms::renew_user_token() {
  auto rec = must(store->find_user(user), "looking up the fuzz user");
  if (rec && rec->state == store::UserState::kEnabled && !user_token.empty()) return;
  if (rec && rec->state == store::UserState::kActive) (void)users->revoke(user, 0, "root");
  Result<users::Issued> issued = make_error(ErrorCode::kInternal, "");
  if (rec &&
      (rec->state == store::UserState::kEnabled || rec->state == store::UserState::kRecovery))
    issued = users->reissue(user, "root");
  else
    issued = users->enable({user, user + "@example.com", "Fuzz User", std::nullopt}, "root");
  user_token = std::string(must(std::move(issued), "enabling the fuzz user").token.view());
}

Kms& kms() {
  static Kms* k = build();
  return *k;
}

api::Response public_listener(const api::Request& req, const api::Peer& peer) {
  Kms& k = kms();
  if (auto r = k.pki_routes->handle(req, peer)) return std::move(*r);
  return k.public_routes->handle(req, peer);
}

api::Response tls_listener(const api::Request& req, const api::Peer& peer) {
  Kms& k = kms();
  if (api::EnrollRoutes::owns(req)) return k.enroll_routes->handle(req, peer);
  return k.admin_routes->handle(req, peer);
}

void trace(const api::Request& req, const api::Response& res) {
  static const bool on = std::getenv("KMSD_FUZZ_TRACE") != nullptr;
  if (!on) return;
  std::fprintf(stderr, "  %s %s -> %u %.160s\n", std::string(req.method_string()).c_str(),
               std::string(req.target()).c_str(), res.result_int(), res.body().c_str());
}

}  // namespace kmsd::fuzz

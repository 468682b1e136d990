#include "daemon/startup/seal.hpp"

#include <spdlog/spdlog.h>

#include <chrono>

#include "daemon/ca/issuer.hpp"
#include "daemon/provision/initializer.hpp"

namespace kmsd::startup {

const char* to_string(State s) noexcept {
  switch (s) {
    case State::kSealed:
      return "sealed";
    case State::kUnsealed:
      return "unsealed";
    case State::kDegraded:
      return "degraded";
  }
  return "unknown";
}

Seal::Seal(hsm::Token& token, store::Store& store, SealOptions options)
    : token_(token), store_(store), options_(std::move(options)) {
  auto ca = provision::load_ca_certificate(store_);
  if (ca.ok()) {
    auto pem = ossl::x509_to_pem(ca->get());
    if (pem.ok()) ca_pem_ = *pem;
  }
}

namespace {
std::string pin_state(const hsm::TokenStatus& t) {
  if (t.pin_locked) return "the token reports the user PIN is LOCKED";
  if (t.pin_final_try) return "the token reports ONE attempt left before the PIN locks";
  if (t.pin_count_low) return "the token reports a low PIN retry count";
  return "the token reports no PIN lockout";
}
}  // namespace

Result<std::shared_ptr<const KeyMaterial>> Seal::build_material() {
  auto m = std::make_shared<KeyMaterial>();
  KMSD_ASSIGN_OR_RETURN(m->ca_cert, provision::load_ca_certificate(store_));
  KMSD_ASSIGN_OR_RETURN(auto ca_pub, token_.ca_public_key());
  if (!ca::public_key_matches(m->ca_cert.get(), ca_pub.get()))
    return make_error(ErrorCode::kFailedPrecondition,
                      "the CA key on this token does not match the CA certificate in the store: "
                      "the configured token or store belongs to another installation");

  // Self-test: the master key must seal and open before we call ourselves ready.
  static constexpr std::uint8_t kProbe[] = {'k', 'm', 's', 'd'};
  static constexpr std::uint8_t kAad[] = {'u', 'n', 's', 'e', 'a', 'l'};
  KMSD_ASSIGN_OR_RETURN(auto blob, token_.seal(kProbe, kAad));
  KMSD_ASSIGN_OR_RETURN(auto opened, token_.open(blob, kAad));
  if (!constant_time_equal(opened.span(), kProbe))
    return make_error(ErrorCode::kCrypto, "master-key self-test returned different bytes");

  // The admin listener's certificate: a fresh in-memory key each unseal, signed on the token.
  KMSD_ASSIGN_OR_RETURN(m->tls_key, ca::generate_key(hsm::KeyType::kEcP256));
  KMSD_ASSIGN_OR_RETURN(
      auto subject,
      ca::parse_subject("/OU=kmsd/CN=" + (options_.tls_names.empty() ? std::string("kmsd")
                                                                     : options_.tls_names[0])));
  ca::IssueRequest req;
  req.profile = ca::Profile::kTlsServer;
  req.subject = subject.get();
  req.public_key = m->tls_key.get();
  req.validity = std::chrono::hours(24) * options_.tls_validity_days;
  req.dns_or_ip = options_.tls_names;
  KMSD_ASSIGN_OR_RETURN(m->tls_cert, ca::issue_on_token(req, m->ca_cert.get(), token_,
                                                        ca::digest_by_name(options_.digest)));
  KMSD_TRY(store_.insert_certificate(
      provision::certificate_record(m->tls_cert.get(), store::CertKind::kServer)));
  KMSD_ASSIGN_OR_RETURN(m->ca_pem, ossl::x509_to_pem(m->ca_cert.get()));
  return std::shared_ptr<const KeyMaterial>(std::move(m));
}

Status Seal::unseal(const SecretBytes& secret) {
  std::lock_guard serial(unseal_mu_);
  if (material()) return {};
  auto login = token_.login(secret);
  if (!login.ok()) {
    auto ts = token_.status();
    std::string why;
    switch (login.error().code) {
      case ErrorCode::kUnauthenticated:
        why = "the startup secret was rejected by the token (" + pin_state(ts) + ")";
        break;
      case ErrorCode::kPinLocked:
        why =
            "the token's user PIN is locked; a security officer must unlock or reset it with "
            "the token vendor's tool before kmsd can unseal";
        break;
      default:
        why = login.error().message;
    }
    std::lock_guard lk(mu_);
    ++failures_;
    last_failure_ = why;
    spdlog::error("unseal failed (attempt {} since start): {}; kmsd stays sealed", failures_, why);
    return make_error(login.error().code, why);
  }
  auto built = build_material();
  if (built.ok() && audit_hook_) {
    auto audited = audit_hook_("seal.unseal", "token " + token_.status().token_label);
    if (!audited.ok())
      built = audited.error().context(
          "the unseal could not be written to the audit log, so it "
          "was undone");
  }
  if (!built.ok()) {
    token_.logout();
    std::lock_guard lk(mu_);
    ++failures_;
    last_failure_ = built.error().message;
    spdlog::error("unseal failed after login: {}; kmsd stays sealed", last_failure_);
    return built.error();
  }
  std::lock_guard lk(mu_);
  material_ = std::move(built).value();
  ca_pem_ = material_->ca_pem;
  last_failure_.clear();
  spdlog::info("unsealed: token logged in, CA key verified, master-key self-test passed");
  return {};
}

void Seal::set_audit_hook(AuditHook hook) {
  std::lock_guard serial(unseal_mu_);
  audit_hook_ = std::move(hook);
}

void Seal::set_status_hook(StatusHook hook) {
  std::lock_guard lk(mu_);
  status_hook_ = std::move(hook);
}

void Seal::record_failure(const std::string& why) {
  std::lock_guard lk(mu_);
  ++failures_;
  last_failure_ = why;
  spdlog::error("unseal failed (attempt {} since start): {}; kmsd stays sealed", failures_, why);
}

void Seal::seal() {
  std::lock_guard serial(unseal_mu_);
  if (audit_hook_ && material()) {
    // Sealing always happens; a failed audit record is logged, never a reason to stay open.
    if (auto st = audit_hook_("seal.seal", "requested"); !st.ok())
      spdlog::error("sealing: the audit record could not be written: {}", st.error().message);
  }
  {
    std::lock_guard lk(mu_);
    material_.reset();
  }
  token_.logout();
  spdlog::info("sealed: token logged out, key handles dropped");
}

std::shared_ptr<const KeyMaterial> Seal::material() const {
  std::lock_guard lk(mu_);
  if (material_ && !token_.logged_in()) {
    material_.reset();
    last_failure_ = "the key token no longer accepts the startup secret (PIN changed or locked)";
    spdlog::error("{}; kmsd is SEALED: unseal with the current secret", last_failure_);
  }
  return material_;
}

SealStatus Seal::status() const {
  SealStatus s;
  const bool unsealed = material() != nullptr;
  s.token = token_.status();
  StatusHook hook;
  {
    std::lock_guard lk(mu_);
    s.failed_unseal_attempts = failures_;
    s.last_failure = last_failure_;
    if (!unsealed)
      s.state = State::kSealed;
    else
      s.state = s.token.degraded ? State::kDegraded : State::kUnsealed;
    hook = status_hook_;
  }
  if (hook) hook(s);
  return s;
}

std::string Seal::ca_pem() const {
  std::lock_guard lk(mu_);
  return ca_pem_;
}

}  // namespace kmsd::startup

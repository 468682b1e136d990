#include "daemon/provision/initializer.hpp"

#include <openssl/pem.h>

#include <chrono>
#include <ctime>

#include "common/clock.hpp"
#include "common/files.hpp"
#include "daemon/ca/issuer.hpp"

namespace kmsd::provision {

Result<std::uint32_t> master_key_version(store::Store& store) {
  KMSD_ASSIGN_OR_RETURN(auto v, store.get_setting(kSettingMasterVersion));
  if (!v) return std::uint32_t{1};
  try {
    return static_cast<std::uint32_t>(std::stoul(*v));
  } catch (const std::exception&) {
    return make_error(ErrorCode::kStore,
                      "the store's master key version '" + *v + "' is not a number");
  }
}

namespace {

Status refuse_existing_p12(const std::filesystem::path& p12) {
  if (!std::filesystem::exists(p12)) return {};
  return make_error(ErrorCode::kAlreadyExists,
                    p12.string() + " already exists; choose another --admin-p12 path");
}

}  // namespace

store::CertificateRecord certificate_record(X509* cert, store::CertKind kind) {
  store::CertificateRecord rec;
  rec.serial = ca::serial_hex(cert);
  rec.kind = kind;
  rec.subject = ca::name_to_string(X509_get_subject_name(cert));
  rec.not_before = ca::not_before_unix(cert);
  rec.not_after = ca::not_after_unix(cert);
  auto der = ossl::x509_to_der(cert);
  if (der.ok()) rec.der = std::move(der).value();
  rec.issued_at = unix_now();
  return rec;
}

namespace {

Status refuse_if_not_empty(hsm::Token& token, store::Store& store) {
  auto existing = existing_state(token, store);
  if (existing.empty()) return {};
  std::string list;
  for (const auto& e : existing) list += "\n  - " + e;
  return make_error(ErrorCode::kAlreadyExists,
                    "refusing to initialize: this KMS already has state; nothing was changed." +
                        list +
                        "\nTo start over, use a freshly initialized token and an empty store.");
}

Status generate_token_keys(const config::Config& cfg, hsm::Token& token) {
  KMSD_TRY(token.generate_master_key(1));
  KMSD_TRY(token.generate_ca_key(cfg.ca.key_type));
  KMSD_TRY(token.generate_audit_key());
  return {};
}

// Issues the first administrator's certificate and writes the PKCS#12 (0600, never over an
// existing file). Returns the record to store.
Result<store::CertificateRecord> issue_first_admin(const config::Config& cfg, hsm::Token& token,
                                                   X509* ca_cert, const AdminOptions& admin) {
  if (admin.name.empty())
    return make_error(ErrorCode::kInvalidArgument,
                      "the first administrator needs a name (--admin)");
  KMSD_TRY(refuse_existing_p12(admin.p12_out));
  KMSD_ASSIGN_OR_RETURN(auto subject,
                        ca::parse_subject("/OU=kmsd administrators/CN=" + admin.name));
  KMSD_ASSIGN_OR_RETURN(auto key, ca::generate_key(cfg.admin.key_type));
  ca::IssueRequest req;
  req.profile = ca::Profile::kAdminClient;
  req.subject = subject.get();
  req.public_key = key.get();
  req.validity = std::chrono::hours(24) * cfg.admin.cert_validity_days;
  KMSD_ASSIGN_OR_RETURN(auto cert,
                        ca::issue_on_token(req, ca_cert, token, ca::digest_by_name(cfg.ca.digest)));
  KMSD_ASSIGN_OR_RETURN(
      auto p12, ca::make_pkcs12(key.get(), cert.get(), ca_cert, admin.name, admin.p12_passphrase));
  KMSD_TRY(files::write_atomic(
      admin.p12_out, std::string_view(reinterpret_cast<const char*>(p12.data()), p12.size()), 0600,
      /*overwrite=*/false));
  return certificate_record(cert.get(), store::CertKind::kAdmin);
}

Status record_initialized(store::Store& store, X509* ca_cert,
                          const store::CertificateRecord& admin_rec,
                          const std::string& admin_name) {
  return store.transaction([&]() -> Status {
    KMSD_TRY(store.insert_certificate(certificate_record(ca_cert, store::CertKind::kCa)));
    KMSD_TRY(store.insert_certificate(admin_rec));
    store::AdminRecord a;
    a.name = admin_name;
    a.role = store::AdminRole::kAdmin;
    a.cert_serial = admin_rec.serial;
    a.created_at = unix_now();
    KMSD_TRY(store.insert_admin(a));
    KMSD_TRY(store.put_setting(kSettingCaSerial, ca::serial_hex(ca_cert)));
    KMSD_TRY(store.put_setting(kSettingMasterVersion, "1"));
    KMSD_TRY(store.put_setting(kSettingInitializedAt, std::to_string(unix_now())));
    return store.put_setting(kSettingState, "initialized");
  });
}

// Issues the first administrator, records the CA and the administrator in one transaction and
// reports. On failure the PKCS#12 written a moment ago is removed again.
Result<InitReport> finish_with_first_admin(const config::Config& cfg, hsm::Token& token,
                                           store::Store& store, X509* ca_cert,
                                           const AdminOptions& admin) {
  KMSD_ASSIGN_OR_RETURN(auto admin_rec, issue_first_admin(cfg, token, ca_cert, admin));
  auto st = record_initialized(store, ca_cert, admin_rec, admin.name);
  if (!st.ok()) {
    std::filesystem::remove(admin.p12_out);
    return st.error().context(
        "recording the new CA in the store (the token keys exist now; re-initialize the token "
        "before trying again)");
  }
  InitReport rep;
  rep.ca_serial = ca::serial_hex(ca_cert);
  rep.ca_subject = ca::name_to_string(X509_get_subject_name(ca_cert));
  rep.ca_sha256_fingerprint = ossl::sha256_fingerprint(ca_cert);
  rep.admin_serial = admin_rec.serial;
  return rep;
}

}  // namespace

std::vector<std::string> existing_state(hsm::Token& token, store::Store& store) {
  std::vector<std::string> out;
  auto versions = token.master_key_versions();
  if (versions.ok() && !versions->empty())
    out.push_back("the token already holds master key version " + std::to_string(versions->back()));
  if (token.has_ca_key()) out.push_back("the token already holds a CA key");
  if (token.has_audit_key()) out.push_back("the token already holds an audit key");
  auto state = store.get_setting(kSettingState);
  if (state.ok() && state->has_value())
    out.push_back("the store is already in state '" + **state + "'");
  return out;
}

Result<InitReport> initialize(const config::Config& cfg, hsm::Token& token, store::Store& store,
                              const AdminOptions& admin) {
  KMSD_TRY(refuse_if_not_empty(token, store));
  KMSD_TRY(refuse_existing_p12(admin.p12_out));
  const EVP_MD* md = ca::digest_by_name(cfg.ca.digest);
  KMSD_ASSIGN_OR_RETURN(auto subject, ca::parse_subject(cfg.ca.subject));
  KMSD_TRY(generate_token_keys(cfg, token));
  KMSD_ASSIGN_OR_RETURN(auto ca_pub, token.ca_public_key());
  ca::IssueRequest req;
  req.profile = ca::Profile::kCa;
  req.subject = subject.get();
  req.public_key = ca_pub.get();
  req.validity = std::chrono::hours(24) * cfg.ca.validity_days;
  KMSD_ASSIGN_OR_RETURN(auto ca_cert, ca::issue_on_token(req, nullptr, token, md));
  if (!ca::signed_by(ca_cert.get(), ca_cert.get()))
    return make_error(ErrorCode::kCrypto,
                      "the CA certificate signed on the token does not verify; the token's CA key "
                      "is not usable for signing");
  return finish_with_first_admin(cfg, token, store, ca_cert.get(), admin);
}

Result<InitReport> initialize_with_csr(const config::Config& cfg, hsm::Token& token,
                                       store::Store& store, const std::filesystem::path& csr_out) {
  KMSD_TRY(refuse_if_not_empty(token, store));
  if (std::filesystem::exists(csr_out))
    return make_error(ErrorCode::kAlreadyExists, csr_out.string() + " already exists");
  KMSD_ASSIGN_OR_RETURN(auto subject, ca::parse_subject(cfg.ca.subject));
  KMSD_TRY(generate_token_keys(cfg, token));
  KMSD_ASSIGN_OR_RETURN(auto ca_pub, token.ca_public_key());
  KMSD_ASSIGN_OR_RETURN(auto ca_key, token.ca_private_key());
  KMSD_ASSIGN_OR_RETURN(auto csr, ca::make_ca_request(subject.get(), ca_pub.get(), ca_key.get(),
                                                      ca::digest_by_name(cfg.ca.digest)));
  ossl::BioPtr bio(BIO_new(BIO_s_mem()));
  if (PEM_write_bio_X509_REQ(bio.get(), csr.get()) != 1) return ossl::crypto_error("writing CSR");
  char* p = nullptr;
  long n = BIO_get_mem_data(bio.get(), &p);
  KMSD_TRY(files::write_atomic(csr_out, std::string_view(p, static_cast<std::size_t>(n)), 0644));
  KMSD_TRY(store.transaction([&]() -> Status {
    KMSD_TRY(store.put_setting(kSettingMasterVersion, "1"));
    return store.put_setting(kSettingState, "awaiting_ca_certificate");
  }));
  InitReport rep;
  rep.ca_subject = ca::name_to_string(subject.get());
  rep.awaiting_ca_certificate = true;
  return rep;
}

Result<InitReport> install_ca_certificate(const config::Config& cfg, hsm::Token& token,
                                          store::Store& store,
                                          const std::filesystem::path& ca_cert_pem,
                                          const AdminOptions& admin) {
  KMSD_ASSIGN_OR_RETURN(auto state, store.get_setting(kSettingState));
  if (!state.has_value() || *state != "awaiting_ca_certificate")
    return make_error(ErrorCode::kFailedPrecondition,
                      "no CA certificate is awaited: run `kmsctl init --csr FILE` first");
  KMSD_ASSIGN_OR_RETURN(auto pem, files::read_text(ca_cert_pem));
  KMSD_ASSIGN_OR_RETURN(auto ca_cert, ossl::x509_from_pem(pem));
  KMSD_ASSIGN_OR_RETURN(auto ca_pub, token.ca_public_key());
  if (!ca::public_key_matches(ca_cert.get(), ca_pub.get()))
    return make_error(ErrorCode::kInvalidArgument,
                      ca_cert_pem.string() +
                          " does not certify the CA key on this token; was it issued for the CSR "
                          "written by `kmsctl init --csr`?");
  if (X509_check_ca(ca_cert.get()) == 0)
    return make_error(ErrorCode::kInvalidArgument,
                      ca_cert_pem.string() + " is not a CA certificate (basicConstraints CA:TRUE)");
  if (X509_get_version(ca_cert.get()) != X509_VERSION_3)
    return make_error(ErrorCode::kInvalidArgument, "the CA certificate must be X.509 v3");
  return finish_with_first_admin(cfg, token, store, ca_cert.get(), admin);
}

Result<ossl::X509Ptr> load_ca_certificate(store::Store& store) {
  KMSD_ASSIGN_OR_RETURN(auto state, store.get_setting(kSettingState));
  if (!state.has_value())
    return make_error(ErrorCode::kFailedPrecondition,
                      "this KMS is not initialized: run `kmsctl init` first");
  if (*state != "initialized")
    return make_error(ErrorCode::kFailedPrecondition,
                      "initialization is not finished (state '" + *state +
                          "'): install the CA certificate with `kmsctl init --ca-cert FILE`");
  KMSD_ASSIGN_OR_RETURN(auto serial, store.get_setting(kSettingCaSerial));
  if (!serial.has_value())
    return make_error(ErrorCode::kStore, "the store records no CA serial; the store is damaged");
  KMSD_ASSIGN_OR_RETURN(auto rec, store.find_certificate(*serial));
  if (!rec.has_value())
    return make_error(ErrorCode::kStore, "the CA certificate " + *serial +
                                             " is missing from the store; restore a backup");
  return ossl::x509_from_der(rec->der);
}

}  // namespace kmsd::provision

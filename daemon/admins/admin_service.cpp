#include "daemon/admins/admin_service.hpp"

#include <openssl/pem.h>
#include <openssl/x509.h>

#include <cctype>

#include "common/clock.hpp"
#include "daemon/approvals/policy_gate.hpp"
#include "daemon/ca/issuer.hpp"
#include "daemon/provision/initializer.hpp"

namespace kmsd::admins {

using json = nlohmann::json;

namespace {

Error invalid(const std::string& message) {
  return Error{ErrorCode::kInvalidArgument, message};
}

std::string quoted(const std::string& s) {
  return "'" + s + "'";
}

// The certificate request in CSR_PEM, its signature checked with its own key (proof that
// whoever made the request holds the private key).
Result<ossl::X509ReqPtr> read_csr(const std::string& csr_pem) {
  if (csr_pem.find("-----BEGIN CERTIFICATE REQUEST-----") == std::string::npos)
    return invalid(
        "\"csr\" is not a PEM certificate request (-----BEGIN CERTIFICATE REQUEST-----); "
        "kmsctl admin add makes one");
  ossl::BioPtr bio(BIO_new_mem_buf(csr_pem.data(), static_cast<int>(csr_pem.size())));
  if (!bio) return ossl::crypto_error("reading the certificate request");
  ossl::X509ReqPtr req(PEM_read_bio_X509_REQ(bio.get(), nullptr, nullptr, nullptr));
  if (!req) {
    std::string why = ossl::drain_errors();
    return invalid("\"csr\" cannot be read as a certificate request" +
                   (why.empty() ? std::string() : " (" + why + ")") +
                   "; send the PEM request unchanged");
  }
  EVP_PKEY* key = X509_REQ_get0_pubkey(req.get());
  if (key == nullptr) {
    ossl::drain_errors();
    return invalid("the certificate request carries no usable public key");
  }
  if (X509_REQ_verify(req.get(), key) != 1) {
    ossl::drain_errors();
    return invalid(
        "the certificate request's signature does not verify with its own key: it was altered "
        "after it was made; make a new one");
  }
  return req;
}

Result<std::string> spki_hex(EVP_PKEY* key) {
  unsigned char* der = nullptr;
  const int n = i2d_PUBKEY(key, &der);
  if (n <= 0) return ossl::crypto_error("encoding the public key");
  std::string out = ossl::hex({der, static_cast<std::size_t>(n)});
  OPENSSL_free(der);
  return out;
}

std::string sha256_hex_of_hex(const std::string& hex) {
  auto bytes = ossl::from_hex(hex);
  return bytes.ok() ? ossl::hex(ossl::sha256(*bytes)) : "";
}

Result<store::AdminRole> parse_role(const std::string& role) {
  auto r = store::parse_admin_role(role);
  if (!r)
    return invalid("role " + quoted(role) +
                   " is not one of admin, auditor, approver, recovery (admin: everything but "
                   "key export; auditor: read only; approver: decides requests; recovery: "
                   "exports key histories once approved)");
  return *r;
}

std::string string_param(const json& params, const char* key) {
  return params.is_object() && params.contains(key) && params[key].is_string()
             ? params[key].get<std::string>()
             : std::string();
}

}  // namespace

Status check_name(const std::string& name) {
  if (name.empty()) return invalid("an administrator needs a name (it becomes the certificate CN)");
  auto chars = policy::utf8_length(name);
  if (!chars) return invalid("the administrator name is not valid UTF-8");
  if (*chars > kMaxNameLength)
    return invalid("the administrator name has " + std::to_string(*chars) +
                   " characters; a certificate CN holds at most " + std::to_string(kMaxNameLength));
  for (unsigned char c : name) {
    if (c < 0x20 || c == 0x7f)
      return invalid("the administrator name contains a control character");
    if (c == '/' || c == '\\')
      return invalid("the administrator name must not contain '/' or '\\'");
  }
  if (name.front() == ' ' || name.back() == ' ')
    return invalid("the administrator name must not begin or end with a space");
  std::string lower;
  for (unsigned char c : name) lower.push_back(static_cast<char>(std::tolower(c)));
  if (lower == approvals::kOperator || lower == "kmsd" || lower.rfind("bulk:", 0) == 0)
    return invalid("'" + name +
                   "' is a name kmsd writes in the audit log for itself or the operator; choose "
                   "another name");
  return {};
}

Result<ossl::X509NamePtr> subject_for(const std::string& name) {
  ossl::X509NamePtr n(X509_NAME_new());
  if (!n) return ossl::crypto_error("building a subject");
  const auto* ou = reinterpret_cast<const unsigned char*>("kmsd administrators");
  const auto* cn = reinterpret_cast<const unsigned char*>(name.c_str());
  if (X509_NAME_add_entry_by_NID(n.get(), NID_organizationalUnitName, MBSTRING_UTF8, ou, -1, -1,
                                 0) != 1 ||
      X509_NAME_add_entry_by_NID(n.get(), NID_commonName, MBSTRING_UTF8, cn, -1, -1, 0) != 1) {
    std::string why = ossl::drain_errors();
    return invalid("the administrator name " + quoted(name) + " cannot be a certificate CN" +
                   (why.empty() ? std::string() : " (" + why + ")"));
  }
  return n;
}

AdminService::AdminService(store::Store& store, hsm::Token& token, audit::AuditLog& audit,
                           approvals::Approvals& approvals, const policy::PolicyInForce& policy,
                           std::function<AdminSettings()> settings)
    : store_(store),
      token_(token),
      audit_(audit),
      approvals_(approvals),
      policy_(policy),
      settings_(std::move(settings)) {
  approvals_.register_operation(
      kAdminAdd, [this](const json& p, const std::string& by) { return execute_add(p, by); });
  approvals_.register_operation(
      kAdminRemove, [this](const json& p, const std::string& by) { return execute_remove(p, by); });
}

Result<ossl::EvpPkeyPtr> AdminService::admitted_key(const std::string& name,
                                                    const std::string& spki) {
  KMSD_ASSIGN_OR_RETURN(auto der, ossl::from_hex(spki));
  auto key = ossl::pubkey_from_der(der);
  if (!key.ok()) return invalid("the public key of the request cannot be read");
  KMSD_ASSIGN_OR_RETURN(auto subject, subject_for(name));
  policy::CertificateRequest req;
  req.profile = policy::RequestProfile::kAdminClient;
  req.x509_version = 3;
  req.public_key = key->get();
  req.validity = settings_().validity;
  req.subject = subject.get();
  KMSD_TRY(policy_.current()->admit(req));
  return std::move(*key);
}

Result<approvals::Outcome> AdminService::add(const std::string& name, const std::string& role,
                                             const std::string& csr_pem,
                                             const std::string& requester) {
  KMSD_TRY(check_name(name));
  KMSD_ASSIGN_OR_RETURN(auto r, parse_role(role));
  KMSD_ASSIGN_OR_RETURN(auto csr, read_csr(csr_pem));
  KMSD_ASSIGN_OR_RETURN(auto spki, spki_hex(X509_REQ_get0_pubkey(csr.get())));
  KMSD_TRY(admitted_key(name, spki));
  KMSD_ASSIGN_OR_RETURN(auto existing, store_.find_admin(name));
  if (existing) {
    if (existing->removed_at)
      return make_error(ErrorCode::kAlreadyExists,
                        "an administrator named " + quoted(name) + " existed until " +
                            utc_text(*existing->removed_at) +
                            "; names are never reused, because the audit log names "
                            "administrators: choose another name");
    return make_error(ErrorCode::kAlreadyExists, quoted(name) +
                                                     " is already an administrator (role " +
                                                     store::to_string(existing->role) + ")");
  }
  KMSD_ASSIGN_OR_RETURN(auto pending, approvals_.list(store::RequestState::kPending));
  for (const auto& p : pending) {
    if (p.operation != kAdminAdd) continue;
    if (string_param(json::parse(p.params, nullptr, false), "name") == name)
      return make_error(ErrorCode::kAlreadyExists,
                        "request " + p.id + " to add " + quoted(name) +
                            " is already waiting for approvals (kmsctl request list)");
  }
  json params{{"name", name},
              {"role", store::to_string(r)},
              {"public_key", spki},
              {"key_sha256", sha256_hex_of_hex(spki)}};
  return approvals_.submit(kAdminAdd, params, requester);
}

Result<json> AdminService::execute_add(const json& params, const std::string& requester) {
  const std::string name = string_param(params, "name");
  KMSD_TRY(check_name(name));
  KMSD_ASSIGN_OR_RETURN(auto role, parse_role(string_param(params, "role")));
  KMSD_ASSIGN_OR_RETURN(auto existing, store_.find_admin(name));
  if (existing)
    return make_error(ErrorCode::kAlreadyExists,
                      "an administrator named " + quoted(name) + " is already recorded");
  KMSD_ASSIGN_OR_RETURN(auto key, admitted_key(name, string_param(params, "public_key")));
  KMSD_ASSIGN_OR_RETURN(auto ca_cert, provision::load_ca_certificate(store_));
  KMSD_ASSIGN_OR_RETURN(auto subject, subject_for(name));
  const AdminSettings settings = settings_();
  const EVP_MD* md = ca::digest_by_name(settings.digest);
  if (md == nullptr)
    return make_error(ErrorCode::kConfig,
                      "ca.digest " + quoted(settings.digest) + " is not sha256, sha384 or sha512");
  ca::IssueRequest req;
  req.profile = ca::Profile::kAdminClient;
  req.subject = subject.get();
  req.public_key = key.get();
  req.validity = settings.validity;
  KMSD_ASSIGN_OR_RETURN(auto cert, ca::issue_on_token(req, ca_cert.get(), token_, md));
  KMSD_ASSIGN_OR_RETURN(auto pem, ossl::x509_to_pem(cert.get()));
  KMSD_ASSIGN_OR_RETURN(auto ca_pem, ossl::x509_to_pem(ca_cert.get()));
  store::CertificateRecord rec = provision::certificate_record(cert.get(), store::CertKind::kAdmin);
  store::AdminRecord admin;
  admin.name = name;
  admin.role = role;
  admin.cert_serial = rec.serial;
  admin.created_at = unix_now();
  KMSD_TRY(store_.transaction([&]() -> Status {
    KMSD_TRY(store_.insert_certificate(rec));
    KMSD_TRY(store_.insert_admin(admin));
    return audit_.append(requester, "admin.add",
                         {{"name", name},
                          {"role", store::to_string(role)},
                          {"certificate_serial", rec.serial},
                          {"not_after", rec.not_after},
                          {"key_sha256", string_param(params, "key_sha256")}});
  }));
  return json{
      {"name", name},
      {"role", store::to_string(role)},
      {"certificate", pem},
      {"ca", ca_pem},
      {"serial", rec.serial},
      {"not_after", rec.not_after},
      {"message", "administrator " + quoted(name) + " added with role " + store::to_string(role) +
                      "; certificate " + rec.serial + " valid until " + utc_text(rec.not_after)}};
}

Result<json> AdminService::list() {
  KMSD_ASSIGN_OR_RETURN(auto all, store_.admins());
  json arr = json::array();
  for (const auto& a : all) {
    KMSD_ASSIGN_OR_RETURN(auto cert, store_.find_certificate(a.cert_serial));
    arr.push_back(
        json{{"name", a.name},
             {"role", store::to_string(a.role)},
             {"certificate_serial", a.cert_serial},
             {"created_at", a.created_at},
             {"removed_at", a.removed_at ? json(*a.removed_at) : json(nullptr)},
             {"not_after", cert ? json(cert->not_after) : json(nullptr)},
             {"revoked_at", cert && cert->revoked_at ? json(*cert->revoked_at) : json(nullptr)}});
  }
  return json{{"admins", arr}};
}

Status AdminService::check_removable(const std::string& name) {
  KMSD_ASSIGN_OR_RETURN(auto admin, store_.find_admin(name));
  if (!admin) return make_error(ErrorCode::kNotFound, "no administrator named " + quoted(name));
  if (admin->removed_at)
    return make_error(ErrorCode::kFailedPrecondition,
                      quoted(name) + " was already removed on " + utc_text(*admin->removed_at));
  if (admin->role != store::AdminRole::kAdmin) return {};
  KMSD_ASSIGN_OR_RETURN(auto all, store_.admins());
  for (const auto& a : all)
    if (a.name != name && !a.removed_at && a.role == store::AdminRole::kAdmin) return {};
  return make_error(ErrorCode::kFailedPrecondition,
                    quoted(name) +
                        " is the last administrator with role admin, and without one nobody "
                        "could add administrators again; add another with `kmsctl admin add "
                        "NAME --role admin` first, then remove " +
                        quoted(name));
}

Result<approvals::Outcome> AdminService::remove(const std::string& name,
                                                const std::string& requester) {
  KMSD_TRY(check_removable(name));
  return approvals_.submit(kAdminRemove, {{"name", name}}, requester);
}

Result<json> AdminService::execute_remove(const json& params, const std::string& requester) {
  const std::string name = string_param(params, "name");
  json out;
  KMSD_TRY(store_.transaction([&]() -> Status {
    KMSD_TRY(check_removable(name));
    KMSD_ASSIGN_OR_RETURN(auto admin, store_.find_admin(name));
    const std::int64_t now = unix_now();
    KMSD_TRY(store_.remove_admin(name, now));
    KMSD_TRY(store_.revoke_certificate(admin->cert_serial, now, kCessationOfOperation));
    KMSD_TRY(audit_.append(requester, "admin.remove",
                           {{"name", name},
                            {"role", store::to_string(admin->role)},
                            {"certificate_serial", admin->cert_serial},
                            {"revocation_reason", kCessationOfOperation}}));
    out = json{{"name", name},
               {"role", store::to_string(admin->role)},
               {"removed_at", now},
               {"revoked_certificate", admin->cert_serial},
               {"message", "administrator " + quoted(name) + " removed; certificate " +
                               admin->cert_serial + " revoked (cessationOfOperation)"}};
    return {};
  }));
  return out;
}

}  // namespace kmsd::admins

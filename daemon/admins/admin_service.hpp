// Administrators: the people the admin API knows, each a TLS client certificate issued by the
// KMS CA with a role (admin, auditor, approver). Adding and removing one are approval-gated
// operations ("admin_add", "admin_remove"); the new administrator's private key never reaches
// kmsd: kmsctl makes it and sends a CSR, kmsd certifies the CSR's key on the token.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/result.hpp"
#include "daemon/approvals/approvals.hpp"
#include "daemon/audit/audit_log.hpp"
#include "daemon/policy/policy_check.hpp"
#include "daemon/store/store.hpp"
#include "hsm/token.hpp"

namespace kmsd::admins {

// Operation names in the approval rules (approvals.required.admin_add / .admin_remove).
inline constexpr const char* kAdminAdd = "admin_add";
inline constexpr const char* kAdminRemove = "admin_remove";
// The revocation reason of a removed administrator's certificate (RFC 5280).
inline constexpr int kCessationOfOperation = 5;
// At most this many characters in a name (X.520 ub-common-name: the name is the CN).
inline constexpr std::size_t kMaxNameLength = 64;

// From the configuration in force ([admin] cert_validity_days, [ca] digest).
struct AdminSettings {
  std::chrono::seconds validity = std::chrono::days(365);
  std::string digest = "sha256";
};

// Whether NAME can be an administrator's name: 1 to 64 characters of UTF-8, no control
// characters, no '/' or '\', no space at either end, not a name kmsd itself writes in the
// audit log as an actor ("operator", "kmsd", "bulk:..."). kInvalidArgument saying why not.
Status check_name(const std::string& name);

// The certificate subject of administrator NAME: OU=kmsd administrators, CN=NAME (as for the
// first administrator made by `kmsctl init`).
Result<ossl::X509NamePtr> subject_for(const std::string& name);

// Thread-safety: safe to share; changes serialize on store transactions.
class AdminService {
 public:
  // Registers the "admin_add" and "admin_remove" executors with APPROVALS. TOKEN must be
  // logged in (unsealed) when a request executes; the CA certificate is read from STORE.
  AdminService(store::Store& store, hsm::Token& token, audit::AuditLog& audit,
               approvals::Approvals& approvals, const policy::PolicyInForce& policy,
               std::function<AdminSettings()> settings);

  // Checks NAME (check_name; kAlreadyExists if an administrator of that name was ever recorded,
  // or an admin_add request for it is pending), ROLE ("admin", "auditor", "approver") and
  // CSR_PEM (one PEM certificate request whose signature verifies and whose key the policy
  // allows for administrator certificates), then submits "admin_add" on behalf of REQUESTER.
  // Refusals are kInvalidArgument/kAlreadyExists and change nothing. Once executed, the result
  // is {name, role, certificate (PEM), ca (PEM), serial, not_after, message}.
  Result<approvals::Outcome> add(const std::string& name, const std::string& role,
                                 const std::string& csr_pem, const std::string& requester);

  // Every administrator, removed ones included, by name: {admins:[{name, role,
  // certificate_serial, created_at, removed_at, not_after, revoked_at}]} (times: unix seconds
  // or null).
  Result<nlohmann::json> list();

  // Checks that NAME is an administrator who has not been removed (kNotFound /
  // kFailedPrecondition) and would not be the last remaining administrator with role admin
  // (kFailedPrecondition), then submits "admin_remove" on behalf of REQUESTER. Once executed
  // the administrator is marked removed and the certificate revoked (cessationOfOperation).
  Result<approvals::Outcome> remove(const std::string& name, const std::string& requester);

  // The executors (registered by the constructor): they check everything again, because
  // the world may have changed while the request waited for approvals.
  Result<nlohmann::json> execute_add(const nlohmann::json& params, const std::string& requester);
  Result<nlohmann::json> execute_remove(const nlohmann::json& params, const std::string& requester);

 private:
  // The public key of an admin_add request, checked against the policy in force.
  Result<ossl::EvpPkeyPtr> admitted_key(const std::string& name, const std::string& spki_hex);
  Status check_removable(const std::string& name);

  store::Store& store_;
  hsm::Token& token_;
  audit::AuditLog& audit_;
  approvals::Approvals& approvals_;
  const policy::PolicyInForce& policy_;
  std::function<AdminSettings()> settings_;
};

}  // namespace kmsd::admins

// What administrators do to users: enable (one by one or in bulk), reissue tokens, revoke,
// put into recovery, look up, and report. Every change goes through the one state machine
// (lifecycle::transition), every identity through the one policy check, and every change is
// audited in the same store transaction as the change itself.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/result.hpp"
#include "common/secret.hpp"
#include "daemon/audit/audit_log.hpp"
#include "daemon/lifecycle/enrollment_token.hpp"
#include "daemon/policy/policy_check.hpp"
#include "daemon/store/store.hpp"
#include "hsm/token.hpp"

namespace kmsd::users {

struct TokenSettings {
  std::chrono::seconds ttl = std::chrono::days(14);
  std::uint32_t max_attempts = 5;
};

struct UserInput {
  std::string id;
  std::string email;
  std::string display_name;
  std::optional<std::string> dn;
};

// A user together with a token issued just now. The token is shown once, to the caller.
struct Issued {
  store::UserRecord user;
  SecretBytes token;
  std::int64_t expires_at = 0;
  std::string message;
};

// A refusal by the state machine keeps its stable machine name for the API ("reason").
// Error messages of refusals have the form "<reason>: <sentence>".
std::string refusal_reason(const Error& e);

enum class BulkStatus {
  kIssued,
  kPending,
  kSkippedRevoked,
  kSkippedActive,
  kSkippedRecovery,
  kInvalid
};
const char* to_string(BulkStatus s) noexcept;  // "issued", "pending", "skipped-revoked", ...

struct BulkLine {
  std::string id;
  BulkStatus status = BulkStatus::kInvalid;
  std::string message;  // always a sentence, never a bare "Error"
  SecretBytes token;    // only for kIssued
  std::int64_t expires_at = 0;
};

struct BulkOptions {
  std::string job;               // the client's id for one input file (resumption)
  bool reissue_pending = false;  // replace tokens issued earlier and not used
  bool include_revoked = false;  // re-enable revoked users
};

enum class ReportFormat { kJson, kCsv, kLdif };

// Thread-safety: safe to share; changes serialize on store transactions.
class UserService {
 public:
  UserService(store::Store& store, hsm::Token& token, audit::AuditLog& audit,
              const policy::PolicyInForce& policy, std::function<TokenSettings()> settings);

  // (none|revoked) -> enabled, with a new enrollment token.
  Result<Issued> enable(const UserInput& in, const std::string& admin);
  // enabled -> enabled (new enrollment token) or recovery -> recovery (new recovery token).
  Result<Issued> reissue(const std::string& id, const std::string& admin);
  // Revokes the user's certificates and voids any pending token.
  Result<nlohmann::json> revoke(const std::string& id, int reason, const std::string& admin);
  // active|revoked (with key history) -> recovery. No token yet: the administrator gets the
  // recovery token from reissue(), so an approved request never stores a token anywhere.
  Result<nlohmann::json> recover(const std::string& id, const std::string& admin);
  // The user, its token status, key-history depth and certificates; kNotFound if unknown.
  Result<nlohmann::json> show(const std::string& id);

  // One batch of a bulk enable, in one transaction with one audit record.
  Result<std::vector<BulkLine>> bulk_enable(const std::vector<UserInput>& users,
                                            const BulkOptions& options, const std::string& admin);

  // "Which users use the KMS" (Q288268): streams every user through SINK in chunks.
  Status report(ReportFormat format, const std::function<Status(std::string_view)>& sink);

 private:
  Result<Issued> issue_token(store::UserRecord user, store::TokenPurpose purpose,
                             const std::string& issued_by, std::int64_t now);

  store::Store& store_;
  hsm::Token& token_;
  audit::AuditLog& audit_;
  const policy::PolicyInForce& policy_;
  std::function<TokenSettings()> settings_;
  lifecycle::EnrollmentTokens tokens_;
};

}  // namespace kmsd::users

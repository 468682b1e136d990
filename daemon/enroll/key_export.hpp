// Key-history export by a recovery administrator (the certificate-services model, beside the
// user-side recovery of lifecycle/enroll): an administrator with the recovery role asks for a
// user's escrowed key history; the request waits for the approvals the configuration names
// for "key_export"; once approved, the requester — and nobody else — collects the keys once,
// within a window, and kmsctl writes them into a PKCS#12 protected by a passphrase of the
// requester's choice. The keys are opened on the token at collection time and never stored
// in the clear, not even in the request's result; the request, every approval, the execution
// and the collection are audited.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/result.hpp"
#include "daemon/approvals/approvals.hpp"
#include "daemon/audit/audit_log.hpp"
#include "daemon/enroll/enrollment.hpp"
#include "daemon/store/store.hpp"

namespace kmsd::enroll {

inline constexpr const char* kKeyExport = "key_export";

struct ExportedKeys {
  std::string user_id;
  std::string request_id;
  std::vector<DeliveredKey> keys;  // oldest first; private keys cleansed on destruction
};

// Thread-safety: safe to share; collection serializes on a store transaction.
class KeyExport {
 public:
  // Registers the key_export operation with APPROVALS. COLLECT_WINDOW: how long after the
  // approval the requester may collect.
  KeyExport(store::Store& store, audit::AuditLog& audit, approvals::Approvals& approvals,
            EnrollmentService& enrollment, std::chrono::seconds collect_window);

  // Asks for USER_ID's key history on behalf of REQUESTER (a recovery administrator). The
  // user must exist and have escrowed keys; the outcome is pending until approved (or
  // executed at once when the rules ask for one approval).
  Result<approvals::Outcome> request(const std::string& user_id, const std::string& requester);

  // The keys of the executed export REQUEST_ID, for WHO, who must be its requester; once.
  // kNotFound: no such export; kPermissionDenied: somebody else's; kFailedPrecondition: not
  // approved yet, denied, expired, already collected, or the collection window has passed.
  Result<ExportedKeys> collect(const std::string& request_id, const std::string& who);

 private:
  Result<nlohmann::json> execute(const nlohmann::json& params, const std::string& requested_by);

  store::Store& store_;
  audit::AuditLog& audit_;
  approvals::Approvals& approvals_;
  EnrollmentService& enrollment_;
  std::chrono::seconds window_;
};

}  // namespace kmsd::enroll

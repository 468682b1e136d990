// Disaster recovery, the running daemon as the key source of pre-decryption (while the old
// token still opens): no private key and no plaintext leaves kmsd.
//
//   1. An administrator asks for a pre-decryption session bound to the DR custody certificate
//      (approval operation "dr", params {"step": "predecrypt", custody certificate and its
//      SHA-256 fingerprint}); it waits for the k approvals [approvals.required] dr names.
//   2. Once executed, the requester — nobody else — opens the session with the same custody
//      certificate (any other is refused: nobody can redirect the messages to a certificate of
//      his own), then sends the encrypted messages one by one. kmsd finds the recipient's
//      user by the certificate serial, opens that user's escrowed key history on the token
//      once per session (the private keys are OpenSSL keys whose secret numbers live in the
//      secure heap), decrypts in a cleansing buffer, and answers with the content encrypted to
//      the approved custody certificate only.
//   3. The session ends when kmsctl closes it, when it has been idle for kIdleTimeout, or when
//      the approval's window ends; its keys are dropped then. Opening and closing are audited
//      (counts by status at close). kmsctl keeps the manifest, the parallelism and the resume.
#pragma once

#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>

#include <nlohmann/json.hpp>

#include "common/result.hpp"
#include "daemon/approvals/approvals.hpp"
#include "daemon/audit/audit_log.hpp"
#include "daemon/dr/keyring.hpp"
#include "daemon/dr/pipeline.hpp"
#include "daemon/enroll/enrollment.hpp"
#include "daemon/store/store.hpp"

namespace kmsd::dr {

inline constexpr const char* kDrOperation = "dr";  // [approvals.required] dr
inline constexpr const char* kPredecryptStep = "predecrypt";

struct SessionInfo {
  std::string request_id;
  std::string custody_fingerprint;  // SHA-256 of the custody certificate's DER, hex
  std::int64_t expires_at = 0;      // the approval's window
};

struct SessionCounts {
  std::size_t staged = 0, unknown_recipient = 0, failed = 0, users_opened = 0;
  nlohmann::json to_json() const;
};

// Thread-safety: safe to share (the admin API's workers call it at once).
class PredecryptService {
 public:
  static constexpr std::chrono::minutes kIdleTimeout{15};

  // Registers the "dr" approval operation. WINDOW: how long after the approval the requester
  // may use the session.
  PredecryptService(store::Store& store, audit::AuditLog& audit, approvals::Approvals& approvals,
                    enroll::EnrollmentService& enrollment, std::chrono::seconds window);
  ~PredecryptService();

  // Asks for a session bound to CUSTODY_PEM (an approval request).
  Result<approvals::Outcome> request(const std::string& custody_pem, const std::string& requester);
  // Opens (or rejoins) the session of the executed request REQUEST_ID for WHO, its requester,
  // with the custody certificate CUSTODY_PEM, which must be the approved one.
  Result<SessionInfo> open(const std::string& request_id, const std::string& who,
                           const std::string& custody_pem);
  // One encrypted message (CMS DER) of an open session, re-encrypted to the custody certificate.
  Result<Rewrapped> rewrap(const std::string& request_id, const std::string& who,
                           std::string_view cms_der);
  // Ends the session: keys dropped, counts audited.
  Result<SessionCounts> close(const std::string& request_id, const std::string& who);

 private:
  struct Session;
  Result<nlohmann::json> execute(const nlohmann::json& params, const std::string& requested_by);
  Result<std::shared_ptr<Session>> active(const std::string& request_id, const std::string& who);
  void sweep();  // ends expired and idle sessions
  Status end(Session& s, const std::string& why);

  store::Store& store_;
  audit::AuditLog& audit_;
  approvals::Approvals& approvals_;
  enroll::EnrollmentService& enrollment_;
  std::chrono::seconds window_;
  std::mutex mu_;
  std::map<std::string, std::shared_ptr<Session>> sessions_;  // request id -> session
};

}  // namespace kmsd::dr

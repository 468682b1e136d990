// The persistent store: SQLite (WAL, foreign keys, synchronous=FULL) behind a narrow
// interface, with a schema_version table and forward migrations. Holds only public or
// sealed material: certificates, settings, users, sealed enrollment tokens, sealed key
// history, approval requests and the audit chain. Never a PIN, a token or a key in clear.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/result.hpp"

namespace kmsd::store {

using Bytes = std::vector<std::uint8_t>;

// Kinds of certificate the CA has issued.
enum class CertKind { kCa, kAdmin, kServer, kSigning, kEncryption };
// "ca", "admin", "server", "signing", "encryption"
const char* to_string(CertKind k) noexcept;
std::optional<CertKind> parse_cert_kind(std::string_view s) noexcept;

struct CertificateRecord {
  std::string serial;  // lower-case hex, no leading zeros stripped
  CertKind kind = CertKind::kAdmin;
  std::string subject;          // one-line RFC 2253 form
  std::int64_t not_before = 0;  // unix seconds
  std::int64_t not_after = 0;
  Bytes der;
  std::int64_t issued_at = 0;
  std::optional<std::int64_t> revoked_at;
  std::optional<int> revocation_reason;  // RFC 5280 CRLReason code
  std::optional<std::string> user_id;    // owner of signing/encryption certificates
};

// kRecovery (schema v4): may ask for a user's escrowed key history as a PKCS#12 and collect
// it once the request is approved; nothing else changes.
enum class AdminRole { kAdmin, kAuditor, kApprover, kRecovery };
const char* to_string(AdminRole r) noexcept;  // "admin", "auditor", "approver", "recovery"
std::optional<AdminRole> parse_admin_role(std::string_view s) noexcept;

struct AdminRecord {
  std::string name;  // unique; the certificate's CN
  AdminRole role = AdminRole::kAdmin;
  std::string cert_serial;  // references certificates.serial
  std::int64_t created_at = 0;
  std::optional<std::int64_t> removed_at;
};

// ---- users (schema v2) ----
enum class UserState { kEnabled, kActive, kRevoked, kRecovery };
const char* to_string(UserState s) noexcept;  // "enabled", "active", "revoked", "recovery"
std::optional<UserState> parse_user_state(std::string_view s) noexcept;

struct UserRecord {
  std::string id;  // uid or mailbox DN; unique
  std::string email;
  std::string display_name;
  std::optional<std::string> dn;  // explicit subject DN, if the administrator gave one
  UserState state = UserState::kEnabled;
  std::int64_t created_at = 0;
  std::int64_t updated_at = 0;
  std::optional<std::int64_t> last_enrolled_at;
  // The holder of the user's current signing certificate may fetch the escrowed keys from
  // this key-history version on: the new key after an enrollment, all of them after a
  // recovery. Empty: none (never enrolled).
  std::optional<int> keys_from_version;
};

// The one live enrollment (or recovery) token of a user. The token itself is sealed under
// the master key; the store never sees it in clear.
enum class TokenPurpose { kEnroll, kRecover };
const char* to_string(TokenPurpose p) noexcept;  // "enroll", "recover"

struct EnrollmentTokenRecord {
  std::string user_id;
  TokenPurpose purpose = TokenPurpose::kEnroll;
  Bytes sealed;
  std::int64_t issued_at = 0;
  std::string issued_by;  // administrator name, or "bulk:<job>" for bulk enable
  std::int64_t expires_at = 0;
  int failed_attempts = 0;
  std::optional<std::int64_t> used_at;
};

// One escrowed encryption key. Append-only: rows are never deleted and their identity never
// changes (enforced by triggers); only sealed_key/master_version change on master-key rotation.
struct KeyHistoryRecord {
  std::string user_id;
  int version = 1;        // 1, 2, 3... per user
  std::string key_id;     // globally unique (hex)
  std::string algorithm;  // "ec-p256", "rsa-2048", ...
  std::uint32_t master_version = 1;
  Bytes sealed_key;  // hsm envelope of the PKCS#8 DER
  std::optional<std::string> cert_serial;
  std::int64_t created_at = 0;
};

// ---- k-of-n approvals (schema v2) ----
enum class RequestState { kPending, kExecuted, kDenied, kExpired, kFailed };
// "pending", "executed", "denied", "expired", "failed"
const char* to_string(RequestState s) noexcept;
std::optional<RequestState> parse_request_state(std::string_view s) noexcept;

struct ApprovalRequestRecord {
  std::string id;            // random, hex
  std::string operation;     // "revoke", "recover", "admin.add", ...
  std::string params;        // JSON, never a secret
  std::string requested_by;  // administrator name; counts as the first approval
  int required = 1;          // k
  RequestState state = RequestState::kPending;
  std::int64_t created_at = 0;
  std::int64_t expires_at = 0;
  std::optional<std::int64_t> decided_at;
  std::optional<std::string> result;  // what happened when it ran (or why it failed)
};

struct ApprovalRecord {
  std::string request_id;
  std::string approver;
  bool approve = true;  // false: deny
  std::int64_t at = 0;
};

// ---- audit chain (schema v2) ----
// One link of the chain. RECORD is the canonical JSON that was hashed; HASH = SHA-256 over
// prev_hash || record; MAC = HMAC-SHA256 on the token over hash. See daemon/audit.
struct AuditRecord {
  std::int64_t seq = 0;  // 1, 2, 3, ... assigned by the caller (last + 1)
  std::int64_t at = 0;
  std::string actor;
  std::string action;
  std::string record;
  Bytes prev_hash;
  Bytes hash;
  Bytes mac;
};

// Thread-safety: one Store may be used from several threads; calls are serialized inside.
// Multi-row changes go through transaction().
class Store {
 public:
  // 2: users, tokens, key history, approvals, audit; 3: enrollment (keys_from_version)
  static constexpr int kSchemaVersion = 4;

  // Opens or creates the database at PATH (mode 0600), applies forward migrations up to
  // kSchemaVersion in one transaction each. A database whose schema is newer than this
  // binary is refused with kFailedPrecondition naming both versions.
  static Result<std::unique_ptr<Store>> open(const std::filesystem::path& path);
  ~Store();

  int schema_version() const;

  // ---- backup (daemon/backup) ----
  // The database file this store was opened on (daemon/backup reads a consistent snapshot of
  // it through a second, read-only connection).
  const std::filesystem::path& path() const;

  // Runs FN inside BEGIN IMMEDIATE ... COMMIT; rolls back if FN returns an error or throws.
  // Nested calls join the outer transaction.
  Status transaction(const std::function<Status()>& fn);

  // transaction() with group commit: the FNs of threads that call this while a commit is in
  // progress run one after another, each in its own savepoint, in one transaction with one
  // COMMIT (one fsync) for all of them. Each caller returns once that COMMIT returned, with
  // its own FN's result (or exception); a FN that fails rolls back only its own changes. If the
  // COMMIT fails, every caller of the group gets that error and nothing of the group is kept.
  // FN may run on another caller's thread, so it must not need a lock its own caller holds:
  // it may use this store, the token and the audit log (which only take the store's lock).
  // Called inside a transaction, it joins that transaction as transaction() does.
  Status grouped_transaction(const std::function<Status()>& fn);
  struct GroupCommitStats {
    std::uint64_t groups = 0;        // COMMITs of grouped transactions
    std::uint64_t transactions = 0;  // grouped transactions in them
  };
  GroupCommitStats group_commit_stats() const;

  // Small typed settings (e.g. "initialized_at", "ca_serial", "master_key_version").
  Result<std::optional<std::string>> get_setting(const std::string& key);
  Status put_setting(const std::string& key, const std::string& value);

  Status insert_certificate(const CertificateRecord& rec);  // kAlreadyExists on duplicate serial
  Result<std::optional<CertificateRecord>> find_certificate(const std::string& serial);
  Result<std::vector<CertificateRecord>> certificates(CertKind kind);

  Status insert_admin(const AdminRecord& rec);  // kAlreadyExists on duplicate name
  Result<std::optional<AdminRecord>> find_admin(const std::string& name);
  Result<std::optional<AdminRecord>> find_admin_by_serial(const std::string& cert_serial);
  Result<std::vector<AdminRecord>> admins();  // including removed ones
  // Marks the administrator removed at AT (kNotFound if unknown; already removed: no change).
  Status remove_admin(const std::string& name, std::int64_t at);
  // Certificates: revocation and per-user listing. REASON is an RFC 5280 CRLReason code
  // (kInvalidArgument otherwise); kNotFound if unknown; already revoked: no change (the first
  // revocation time and reason stand).
  Status revoke_certificate(const std::string& serial, std::int64_t at, int reason);
  Result<std::vector<CertificateRecord>> certificates_of_user(const std::string& user_id);
  // Every revoked certificate, in revocation order, streaming (for the CRL); same lock and
  // callback rules as for_each_user.
  Status for_each_revoked_certificate(const std::function<Status(const CertificateRecord&)>& fn);
  // How many certificates are revoked (an index lookup; the CRL's freshness check).
  Result<std::size_t> count_revoked_certificates();

  // ---- users ----
  Status insert_user(const UserRecord& rec);  // kAlreadyExists on duplicate id
  Result<std::optional<UserRecord>> find_user(const std::string& id);
  // Replaces state/email/display_name/dn/updated_at/last_enrolled_at of an existing user.
  Status update_user(const UserRecord& rec);
  // Calls FN for each user in id order, AFTER_ID exclusive ("" starts at the first user), at
  // most LIMIT users (0 is kInvalidArgument); returns the number visited. Streams: memory
  // does not grow with the number of users. Stops at, and returns, FN's first error.
  // The store's lock is held for the whole walk (other threads wait), so keep FN short;
  // FN may call other Store methods from the same thread.
  Result<std::size_t> for_each_user(const std::string& after_id, std::size_t limit,
                                    const std::function<Status(const UserRecord&)>& fn);
  Result<std::size_t> count_users();

  // ---- enrollment tokens: at most one per user ----
  Status put_enrollment_token(const EnrollmentTokenRecord& rec);  // insert or replace
  Result<std::optional<EnrollmentTokenRecord>> find_enrollment_token(const std::string& user_id);
  // Increments failed_attempts and returns the new count (kNotFound without a token).
  Result<int> record_token_failure(const std::string& user_id);
  // kNotFound without a token; kFailedPrecondition if it was already used (single use).
  Status mark_token_used(const std::string& user_id, std::int64_t at);
  Status delete_enrollment_token(const std::string& user_id);  // kNotFound without a token

  // ---- key history ----
  Status append_key_history(const KeyHistoryRecord& rec);  // version must be last + 1
  Result<std::vector<KeyHistoryRecord>> key_history(const std::string& user_id);
  Result<int> key_history_depth(const std::string& user_id);

  // ---- master-key rotation (daemon/rotation) ----
  // Up to LIMIT key-history rows whose master_version is not MASTER_VERSION, in (user_id,
  // version) order after (AFTER_USER, AFTER_VERSION) exclusive ("" and 0 start at the first).
  Result<std::vector<KeyHistoryRecord>> key_history_not_under(std::uint32_t master_version,
                                                              const std::string& after_user,
                                                              int after_version, std::size_t limit);
  // Sets the sealed key and master version of row (USER_ID, VERSION) if its sealed key is still
  // OLD_SEALED; false (nothing changed) when it is not.
  Result<bool> rewrap_key_history(const std::string& user_id, int version, const Bytes& old_sealed,
                                  std::uint32_t master_version, const Bytes& sealed_key);
  // How many key-history rows are sealed under each master version (versions with none absent).
  Result<std::vector<std::pair<std::uint32_t, std::size_t>>> key_history_master_versions();
  // Up to LIMIT enrollment tokens in user_id order after AFTER_USER exclusive.
  Result<std::vector<EnrollmentTokenRecord>> enrollment_tokens_after(const std::string& after_user,
                                                                     std::size_t limit);
  // Sets the sealed record of USER_ID's token if it is still OLD_SEALED; false otherwise.
  Result<bool> replace_token_sealed(const std::string& user_id, const Bytes& old_sealed,
                                    const Bytes& sealed);

  // ---- approvals ----
  Status insert_approval_request(const ApprovalRequestRecord& rec);
  Result<std::optional<ApprovalRequestRecord>> find_approval_request(const std::string& id);
  Result<std::vector<ApprovalRequestRecord>> approval_requests(std::optional<RequestState> state);
  Status update_approval_request(const ApprovalRequestRecord& rec);  // state/decided_at/result
  // kAlreadyExists when APPROVER already decided on this request.
  Status add_approval(const ApprovalRecord& rec);
  Result<std::vector<ApprovalRecord>> approvals(const std::string& request_id);

  // ---- audit ----
  Status append_audit(const AuditRecord& rec);  // seq must be last + 1
  Result<std::optional<AuditRecord>> last_audit();
  // In seq order, streaming, with the same lock and callback rules as for_each_user.
  Status for_each_audit(const std::function<Status(const AuditRecord&)>& fn);

 private:
  struct Impl;
  explicit Store(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kmsd::store

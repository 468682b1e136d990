// Disaster recovery, KMS side: `kmsctl dr reinstall` and `kmsctl dr finish`.
//
// Both run OFFLINE, with kmsd stopped, against the NEW store and the NEW key token that
// `kmsctl dr prepare` made — like `kmsctl init`, not through a daemon endpoint:
//   - the old daemon cannot serve: its startup secret is lost, so it stays sealed, and its
//     token (master key, CA key, audit key) cannot be opened;
//   - the new daemon must not run while its store is being filled and its configuration
//     switched: the switch itself is a restart (DESIGN.md, "Disaster recovery": reinstall is
//     "switch to the new token"), and SoftHSM-like tokens do not share a token between two
//     processes that log in;
//   - the operator holds exactly what these steps need: the new token's PIN (the new startup
//     secret) and the new administrators' PKCS#12 files.
// The `dr` approval rule ([approvals.required] dr = k, or the rules in force recorded in the
// new store) still gates reinstall: k distinct administrators of the new KMS must each
// present their PKCS#12 (certificate issued by the new CA, recorded as an administrator, not
// removed, the private key matching). The decision is recorded as an executed approval
// request of operation "dr" with one approval per administrator, and every step is in the
// new store's audit chain (MAC'd with the new token's audit key).
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/ossl.hpp"
#include "common/result.hpp"
#include "daemon/audit/audit_log.hpp"
#include "daemon/store/store.hpp"
#include "daemon/users/user_service.hpp"
#include "hsm/token.hpp"

namespace kmsd::dr {

// Store settings written by reinstall and finish (the new store).
inline constexpr const char* kSettingRetired = "dr.retired";  // JSON, see reinstall()
inline constexpr const char* kSettingReinstalledAt = "dr.reinstalled_at";
inline constexpr const char* kSettingFinishedAt = "dr.finished_at";
// The approval operation (its k is [approvals.required] dr).
inline constexpr const char* kDrOperation = "dr";

// What reinstall needs of the old KMS's database, read with SQLite read-only (the file is
// never written): its users and the identity of every escrowed key (never the sealed key).
struct OldUser {
  std::string id;
  std::string email;
  std::string display_name;
  std::optional<std::string> dn;
  std::string state;  // "enabled", "active", "revoked", "recovery"
};
struct OldKey {
  std::string user_id;
  int version = 0;
  std::string key_id;
  std::string algorithm;
  std::string cert_serial;
};
struct OldKms {
  std::filesystem::path db;
  std::vector<OldUser> users;  // in id order
  std::vector<OldKey> keys;
  std::string ca_sha256;  // fingerprint of the old CA certificate ("" if the store has none)
  std::string ca_subject;
};
Result<OldKms> read_old_kms(const std::filesystem::path& db);

// An administrator of the new KMS presenting its PKCS#12 (certificate and key).
struct Presented {
  X509* cert = nullptr;
  EVP_PKEY* key = nullptr;
};
// The names of the administrators behind PRESENTED, each checked: certificate issued by CA
// (signature and validity), recorded in STORE as an administrator (role admin), not removed,
// KEY its private half. kPermissionDenied naming what is wrong; kInvalidArgument when the
// same administrator is presented twice.
Result<std::vector<std::string>> verify_administrators(store::Store& store, X509* ca,
                                                       const std::vector<Presented>& presented);
// k for the dr operation: the rules in force recorded in STORE (approvals.rules_in_force),
// else CONFIGURED.
Result<int> required_approvals(store::Store& store, const std::map<std::string, int>& configured);

struct ReinstallOptions {
  std::vector<std::string> approvers;  // verified administrators; the first acts
  int required = 1;                    // k
  bool include_revoked = false;        // users revoked in the old KMS are enabled too
  std::size_t batch = 500;
  // Ids already in the result file (an earlier run of the same job): not enabled again.
  std::map<std::string, std::size_t> already_written;
  // Gets each batch's lines (in user order) before the next batch starts; an error stops.
  std::function<Status(const std::vector<users::BulkLine>&)> sink;
};

struct ReinstallSummary {
  std::string job;  // the bulk-enable job: "dr-" + 32 hex of the old database's identity
  std::string request_id;
  std::map<std::string, std::size_t> statuses;  // this run's lines by bulk status
  std::size_t retired_keys = 0;
  std::size_t users = 0;
  std::string old_ca_sha256;
  std::string new_ca_sha256;
};

// The bulk-enable job id of a reinstall from OLD: the same old database gives the same job,
// so a rerun resumes (kmsd's bulk enable answers the same tokens again).
std::string reinstall_job(const OldKms& old);

// Moves every user of OLD (revoked ones only with include_revoked) to ENABLED in STORE with a
// fresh one-time enrollment token, through users::UserService::bulk_enable (the lifecycle
// state machine, one audit record per batch), and records the old keys as retired in the
// setting dr.retired: {"v":1,"old_db","old_ca_sha256","retired_at","keys":[{user,version,
// key_id,algorithm,cert_serial}]} — kept only for the predecrypt stage, until finish. Audit:
// "dr.reinstall.approved" (approvers, k, counts), then the batches, then "dr.reinstall".
// Fails closed: kPermissionDenied with fewer than k approvers; nothing is changed then.
Result<ReinstallSummary> reinstall(store::Store& store, audit::AuditLog& audit,
                                   users::UserService& users, const OldKms& old, X509* new_ca,
                                   const ReinstallOptions& options);

struct FinishOptions {
  std::filesystem::path staging;                // the predecrypt staging directory
  std::optional<std::filesystem::path> keys;    // PKCS#12 key directory (the SECTOOL source)
  std::optional<std::filesystem::path> old_db;  // the old database: its sealed keys are wiped
  std::string custody_label = "kms-dr-custody";
  bool force = false;  // destroy even while staged messages wait for their users
  std::string actor;
};

struct FinishSummary {
  std::size_t staged_waiting = 0;  // staged and not re-encrypted when finish ran
  std::size_t custody_objects_destroyed = 0;
  std::size_t key_files_destroyed = 0;
  std::size_t old_keys_wiped = 0;
  std::size_t staged_files_removed = 0;  // pack files under <staging>/packs/
  std::size_t staging_keys_removed = 0;  // the runs' KEK files under <staging>/keys/
};

// Destroys the retired material once re-encryption is done: the custody key pair on TOKEN,
// the staged copies and the runs' staging keys (encrypted to it), the PKCS#12 files of the key
// directory (overwritten, synced, unlinked) and the sealed keys of the old database (emptied with
// secure_delete and vacuumed; the rows' identities stay, as the key history is append-only). The
// manifest stays as the record. kFailedPrecondition while staged messages wait and FORCE is false;
// nothing is destroyed then. Audit: "dr.finish.start" before anything is destroyed (fails closed),
// "dr.finish" with the counts after.
Result<FinishSummary> finish(store::Store& store, hsm::Token& token, audit::AuditLog& audit,
                             const FinishOptions& options);

}  // namespace kmsd::dr

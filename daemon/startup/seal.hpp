// The seal: kmsd starts sealed and holds no usable key until the startup secret (the key
// token's user PIN) is presented. Unsealing logs in to the token, checks that the token's CA
// key matches the CA certificate in the store, runs a seal/open self-test, and issues the
// admin listener's TLS server certificate with an in-memory key. Sealing forgets all of it.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "common/ossl.hpp"
#include "common/result.hpp"
#include "common/secret.hpp"
#include "daemon/startup/operator_card.hpp"
#include "daemon/startup/quorum.hpp"
#include "daemon/store/store.hpp"
#include "hsm/token.hpp"

namespace kmsd::startup {

// What an unsealed daemon can use. Immutable once built; replaced on every unseal.
struct KeyMaterial {
  // The CA private key is deliberately absent: fetch it from the token for each signature
  // (ca::issue_on_token), because a token key does not survive a lost session.
  ossl::X509Ptr ca_cert;
  ossl::X509Ptr tls_cert;    // admin listener certificate, issued at unseal
  ossl::EvpPkeyPtr tls_key;  // in memory only, never written anywhere
  std::string ca_pem;
};

enum class State { kSealed, kUnsealed, kDegraded };
const char* to_string(State s) noexcept;  // "sealed", "unsealed", "degraded"

struct SealStatus {
  State state = State::kSealed;
  std::uint64_t failed_unseal_attempts = 0;  // since the daemon started
  std::string last_failure;                  // why the last unseal failed, "" if none
  hsm::TokenStatus token;
  // Filled by the startup source (see Seal::set_status_hook): its name, the quorum shares
  // pending (never the shares), and the PIN state of the operator card presented last.
  std::string source;
  std::optional<QuorumProgress> quorum;
  std::optional<CardReport> last_card;
};

struct SealOptions {
  std::vector<std::string> tls_names;  // SANs of the admin server certificate
  std::string digest = "sha256";
  unsigned tls_validity_days = 30;
};

// Thread-safety: all methods may be called concurrently; unseal/seal are serialized.
class Seal {
 public:
  Seal(hsm::Token& token, store::Store& store, SealOptions options);

  // Records seal events in the audit chain: called with ("seal.unseal", ...) once the token is
  // logged in (an unseal that cannot be audited is undone: fail closed) and ("seal.seal", ...)
  // before the login is dropped.
  using AuditHook = std::function<Status(const std::string& action, const std::string& detail)>;
  void set_audit_hook(AuditHook hook);

  // Adds the startup source's part to status(). Called without the seal's locks held.
  using StatusHook = std::function<void(SealStatus&)>;
  void set_status_hook(StatusHook hook);

  // Counts and logs an unseal attempt that failed before the key token was tried (a wrong
  // operator-card PIN, a refused quorum share). WHY is operator text, never a secret.
  void record_failure(const std::string& why);

  // Presents the startup secret. Wrong secrets are counted and logged with the token's own
  // PIN state; the daemon stays sealed. Unsealing an unsealed daemon is a no-op.
  Status unseal(const SecretBytes& secret);
  // Logs out of the token and drops every key handle.
  void seal();

  // nullptr while sealed. A token that has dropped its login because it no longer accepts
  // the retained secret (PIN changed or locked behind kmsd's back) seals the daemon here.
  std::shared_ptr<const KeyMaterial> material() const;
  SealStatus status() const;
  // The CA certificate in PEM, available sealed or not (it is public).
  std::string ca_pem() const;

 private:
  Result<std::shared_ptr<const KeyMaterial>> build_material();

  hsm::Token& token_;
  store::Store& store_;
  SealOptions options_;
  std::mutex unseal_mu_;
  mutable std::mutex mu_;
  mutable std::shared_ptr<const KeyMaterial> material_;
  std::string ca_pem_;
  AuditHook audit_hook_;
  StatusHook status_hook_;
  std::uint64_t failures_ = 0;
  mutable std::string last_failure_;
};

}  // namespace kmsd::startup

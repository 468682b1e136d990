// Key-token outages in the audit chain. Every audit record is MAC'd on the token, so an outage
// cannot be audited while it lasts: it is logged at once (when it starts and when it ends),
// kept in the store's settings while pending (a restart does not lose it), and appended as one
// "token.outage" record as soon as the token answers again and is logged in. An outage that
// sealed kmsd (the token refused the retained startup secret) ends at the next unseal, and is
// written then, before the unseal's own record.
//
// Record details (action "token.outage", actor "kmsd"):
//   started, ended        UNIX seconds (ended null: kmsd stopped before the token answered)
//   duration_ms           measured on the steady clock
//   fault                 as classified: "token-gone", "session-lost", "pin-incorrect",
//                         "pin-locked", "none" (a stall)
//   code                  the first failure's CKR name, or "stalled"
//   cause                 the first failure as operator text
//   refused_operations    token operations refused while it lasted (each refused request
//                         counts one; kmsd's own background work counts too)
//   sealed                the retained startup secret was refused: kmsd sealed
//   note                  present for an outage a previous run of kmsd did not see end
#pragma once

#include <cstddef>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/result.hpp"
#include "daemon/audit/audit_log.hpp"
#include "daemon/store/store.hpp"
#include "hsm/token.hpp"

namespace kmsd::audit {

// Thread-safety: observe() may be called from any thread (it only logs and remembers);
// flush() serializes with itself.
class OutageLog {
 public:
  OutageLog(store::Store& store, AuditLog& audit) : store_(store), audit_(audit) {}

  // Loads the outages a previous run left pending; one that never ended is closed with a note.
  Status load();

  // From hsm::Token's health observer: logs at once and remembers. Never touches the token or
  // the store (the observer runs on token threads).
  void observe(const hsm::TokenOutage& outage);

  // Keeps the pending outages in the store (no token needed), then appends every ended one
  // to the audit chain in order (the token must be logged in). Stops at the first failure;
  // the rest stay pending for the next call. Returns how many records were appended.
  Result<std::size_t> flush();

  // Outages not yet in the audit chain (ongoing ones included).
  std::size_t pending() const;

 private:
  // With mu_ held: the pending list as JSON text if it changed since the last write.
  std::optional<std::string> take_dirty_locked();

  store::Store& store_;
  AuditLog& audit_;
  std::mutex flush_mu_;                  // one flush at a time; taken before mu_
  mutable std::mutex mu_;                // guards the fields below
  std::vector<nlohmann::json> pending_;  // details, plus "open": true while ongoing
  bool dirty_ = false;                   // pending_ differs from the store's copy
};

}  // namespace kmsd::audit

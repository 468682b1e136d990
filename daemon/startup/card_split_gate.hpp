// Re-splitting the startup secret to new operator cards while kmsd is unsealed needs the
// approval of administrators (operation "card_split" in [approvals.required]). The cards are
// written by `kmsctl card split` at the machine, never by kmsd, so the approval is a one-time
// permission for one plan (k, the cards, module and label): the operator asks for it over the
// unseal socket, administrators approve it over the admin API (`kmsctl request approve`), and
// kmsctl spends it just before it writes the first card, then reports the new quorum id.
// Every step is in the audit chain: request.create / request.approve (approvals),
// card.split.start, card.split (or card.split.failed).
//
// What it does not do: stop someone who holds the cards and their PINs from writing them
// with another tool. The gate makes a re-split a recorded, approved act of kmsd's operators.
#pragma once

#include <chrono>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/result.hpp"
#include "daemon/approvals/approvals.hpp"
#include "daemon/audit/audit_log.hpp"
#include "daemon/store/store.hpp"

namespace kmsd::startup {

inline constexpr const char* kCardSplit = "card_split";

// What an approval allows: exactly this split.
struct SplitPlan {
  unsigned k = 0;
  std::vector<std::string> cards;  // pkcs11: URIs of the new cards, in share order
  std::string module;              // the cards' PKCS#11 module
  std::string label;               // the data object's label on the cards

  nlohmann::json to_json() const;
  // kInvalidArgument naming the field when J is not a plan (2 <= k <= cards <= 255).
  static Result<SplitPlan> from_json(const nlohmann::json& j);
  bool operator==(const SplitPlan&) const = default;
};

// Thread-safety: safe to share; begin/finish serialize on store transactions.
class CardSplitGate {
 public:
  // START_WINDOW: how long after the approval the operator may start the split.
  CardSplitGate(store::Store& store, audit::AuditLog& audit, approvals::Approvals& approvals,
                std::chrono::seconds start_window);

  // Submits a "card_split" request for PLAN. REQUESTER is the operator at the machine, not an
  // administrator: every approval comes from administrators, even with k = 1.
  Result<approvals::Outcome> request(const SplitPlan& plan, const std::string& requester);

  // Spends request ID for PLAN before the first card is written: refused (kPermissionDenied)
  // while it waits for approvals, and (kFailedPrecondition) when it was denied, expired,
  // already spent, approved too long ago, or approved for another plan. Audited.
  Status begin(const std::string& id, const SplitPlan& plan, const std::string& who);

  // Records how the split of request ID ended: "card.split" with the new quorum id, or
  // "card.split.failed" with WHY (operator text). Only once, and only after begin().
  Status finish(const std::string& id, bool ok, const std::string& quorum_id,
                const std::string& why, const std::string& who);

 private:
  Result<nlohmann::json> execute(const nlohmann::json& params);

  store::Store& store_;
  audit::AuditLog& audit_;
  approvals::Approvals& approvals_;
  std::chrono::seconds window_;
};

}  // namespace kmsd::startup

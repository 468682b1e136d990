// The audit chain: every administrative action, approval, enrollment and seal/unseal appends
// one JSON record, hash-chained to the previous one and MAC'd with the audit key on the token.
// `kmsctl audit verify` recomputes the chain and names the first record that was edited,
// deleted or moved.
//
// Format, version 1. For record n (seq = n, starting at 1):
//   record_n = canonical JSON {"v":1,"seq":n,"at":UNIX,"actor":..,"action":..,"details":{..}}
//              (nlohmann::json dump: object keys sorted, no whitespace)
//   hash_n   = SHA-256(hash_{n-1} || record_n), hash_0 = 32 zero bytes
//   mac_n    = HMAC-SHA256(audit key on the token, "kmsd-audit-v1" || hash_n)
// The head of the chain (seq and hash of the newest record) is kept in the store's settings
// with its own token MAC over "kmsd-audit-head-v1" || seq (8 bytes, big endian) || hash, so
// deleting the newest records is detected too. Replaying an older head that an attacker saved
// earlier is not detectable from the database alone; keep exported copies (`audit export`).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "common/result.hpp"
#include "daemon/store/store.hpp"
#include "hsm/token.hpp"

namespace kmsd::audit {

struct VerifyReport {
  std::uint64_t records = 0;              // records checked
  std::optional<std::int64_t> first_bad;  // seq of the first bad record, if any
  std::string problem;                    // what is wrong with it, "" when the chain is intact
  bool ok() const { return !first_bad.has_value() && problem.empty(); }
};

// Thread-safety: safe to share; appends serialize on the store's transaction.
class AuditLog {
 public:
  AuditLog(store::Store& store, hsm::Token& token) : store_(store), token_(token) {}

  // Appends one record. Call it inside store.transaction() together with the change it
  // describes: if the record cannot be written (token unavailable, store error) the whole
  // transaction rolls back and the change does not happen. DETAILS must never hold a secret.
  Status append(const std::string& actor, const std::string& action, const nlohmann::json& details);

  // Recomputes the whole chain (streaming) and checks every MAC on the token.
  Result<VerifyReport> verify();

  // Calls FN with each record as one JSON object (the record plus its hash and MAC in hex),
  // in order; for `kmsctl audit export`.
  Status export_records(const std::function<Status(const nlohmann::json&)>& fn);

 private:
  Result<ossl::Bytes> mac_of(std::string_view domain, std::span<const std::uint8_t> data);

  store::Store& store_;
  hsm::Token& token_;
};

}  // namespace kmsd::audit

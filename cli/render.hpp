// How kmsctl shows the admin API's answers: text for people (table) and the server's JSON for
// scripts. Pure functions over the reply JSON, tolerant of missing or oddly typed fields: a
// reply kmsctl does not fully understand is shown as far as it goes, never a crash.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace kmsd::cli::render {

// Percent-encodes one URL path segment or query value (RFC 3986: unreserved characters pass).
std::string url_encode(std::string_view s);

// FIELD of J as text: a string as is, a number or bool as JSON, an object or array as compact
// JSON, missing or null as "".
std::string text(const nlohmann::json& j, std::string_view field);
// FIELD of J as an integer, if it is one.
std::optional<std::int64_t> integer(const nlohmann::json& j, std::string_view field);
// A time field: unix seconds shown as RFC 3339, a string as is, missing as "".
std::string time_text(const nlohmann::json& j, std::string_view field);

// Columns padded to their widest cell, two spaces apart; the header in capitals.
std::string table(const std::vector<std::string>& header,
                  const std::vector<std::vector<std::string>>& rows);

// POST /v1/users and /reissue: {user, token, expires_at, message}.
std::string issued(const nlohmann::json& j);
// GET /v1/users/{id}: {user, token_status, key_history_depth, certificates[]}.
std::string user(const nlohmann::json& j);

// An approval outcome: {state:"executed", result, message}, {state:"pending", request_id,
// approvals, required, message}, {state:"failed"|"denied", message}.
struct Outcome {
  std::string text;
  bool ok = false;  // executed or pending; denied only when a denial was asked for
};
Outcome outcome(const nlohmann::json& j, bool denial_wanted = false);

// GET /v1/requests: {requests:[{id, operation, params, requested_by, required, approvals,
// state, created_at, expires_at, result?}]}.
std::string requests_table(const nlohmann::json& j);
std::string requests_csv(const nlohmann::json& j);

// GET /v1/audit/verify: {ok, records, first_bad?, problem?}.
Outcome audit_verify(const nlohmann::json& j);

}  // namespace kmsd::cli::render

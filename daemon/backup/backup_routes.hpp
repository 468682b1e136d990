// The admin API's backup endpoints (administrators only, mutual TLS):
//   POST /v1/backup        -> 200 application/octet-stream: the backup file (backup.hpp)
//   POST /v1/backup/check  body: a backup file -> 200 {"ok":..,"problems":[..],...}
// Both are long calls (server.long_request_timeout_seconds, the long workers).
#pragma once

#include <functional>
#include <optional>

#include "daemon/api/routes.hpp"
#include "daemon/backup/backup.hpp"

namespace kmsd::backup {

// For api::AdminServices::more_routes: answers the backup paths, nullopt for any other.
std::function<std::optional<api::Response>(const api::Request&, const api::Identity&)> admin_routes(
    BackupService& service);

// Whether REQ is one of the backup calls (for ServerOptions::is_long).
bool is_long_call(const api::Request& req);

}  // namespace kmsd::backup

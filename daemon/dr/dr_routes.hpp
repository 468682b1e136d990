// The admin API's disaster-recovery endpoints (administrators only, mutual TLS), for the
// running-daemon key source of kmsctl dr predecrypt (daemon/dr/daemon_source.hpp):
//   POST /v1/dr/predecrypt              {"custody_certificate": PEM} -> an approval outcome
//                                       (202 pending, 200 executed), operation "dr"
//   POST /v1/dr/predecrypt/ID/open      {"custody_certificate": PEM} -> 200 {"request",
//                                       "custody_certificate_sha256","expires_at"}; 403 for a
//                                       certificate other than the approved one
//   POST /v1/dr/predecrypt/ID/message   body: one encrypted CMS message (DER,
//                                       application/pkcs7-mime) -> 200 {"status","users",
//                                       "reason"?,"cms"?: base64 DER to the custody certificate}
//   POST /v1/dr/predecrypt/ID/close     -> 200 {"counts": {...}}
#pragma once

#include <functional>
#include <optional>

#include "daemon/api/routes.hpp"
#include "daemon/dr/daemon_source.hpp"

namespace kmsd::dr {

// For api::AdminServices::more_routes: answers the /v1/dr/ paths, nullopt for any other.
std::function<std::optional<api::Response>(const api::Request&, const api::Identity&)> admin_routes(
    PredecryptService& service);

}  // namespace kmsd::dr

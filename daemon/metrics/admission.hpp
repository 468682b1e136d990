// Rate limits on enrollment and CMP, the two doors a stranger may knock on: per client address
// and per identity (user id of a REST enrollment, sender reference of a CMP message, serial of
// the client certificate for renewal and key delivery). Plugged into the TLS and public
// listeners' admission hook, so a refused request never takes a worker or touches the token.
// The identities live only in this process's memory; they are never logged or exported.
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "daemon/api/http_server.hpp"

namespace kmsd::metrics {

class EnrollmentAdmission {
 public:
  // Requests per minute (0: no limit); a minute's worth may come at once.
  EnrollmentAdmission(unsigned per_source_per_minute, unsigned per_identity_per_minute);

  // ServerOptions::admit: nullopt admits; a 429 with Retry-After refuses.
  std::optional<api::Response> admit(const api::Request& req, const api::Peer& peer);

  // Paths under the limits: /enroll/... and /cmp.
  static bool limited(std::string_view path);
  // "user:ID", "cert:SERIAL", or "" when the request names nobody (it is then limited by its
  // address only; the handler refuses it anyway).
  static std::string identity(const api::Request& req, const api::Peer& peer);

 private:
  api::RateLimiter per_source_;
  api::RateLimiter per_identity_;
};

}  // namespace kmsd::metrics

// Request handlers: plain functions from (request, peer) to response. No sockets here; the
// listeners in http_server.hpp call these on worker threads.
#pragma once

#include <optional>
#include <string>

#include "daemon/api/http_server.hpp"
#include "daemon/startup/seal.hpp"
#include "daemon/store/store.hpp"

namespace kmsd::api {

// An authenticated administrator.
struct Identity {
  std::string name;
  store::AdminRole role = store::AdminRole::kAdmin;
  std::string cert_serial;
};

// Maps a TLS peer to an administrator: 401 without a verified KMS certificate, 403 for a
// certificate that is not (or no longer) an administrator's.
struct AuthFailure {
  http::status status;
  std::string message;
};
std::variant<Identity, AuthFailure> authenticate(const Peer& peer, store::Store& store);

// /healthz, /readyz, /ca.pem, /ca.der.
class PublicRoutes {
 public:
  explicit PublicRoutes(startup::Seal& seal) : seal_(seal) {}
  Response handle(const Request& req, const Peer& peer) const;

 private:
  startup::Seal& seal_;
};

// /v1/...: mutual TLS only.
class AdminRoutes {
 public:
  AdminRoutes(startup::Seal& seal, store::Store& store) : seal_(seal), store_(store) {}
  Response handle(const Request& req, const Peer& peer) const;

 private:
  startup::Seal& seal_;
  store::Store& store_;
};

}  // namespace kmsd::api

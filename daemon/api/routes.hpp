// Request handlers: plain functions from (request, peer) to response. No sockets here; the
// listeners in http_server.hpp call these on worker threads.
#pragma once

#include <optional>
#include <vector>

#include <nlohmann/json_fwd.hpp>
#include <string>

#include "daemon/api/http_server.hpp"
#include "daemon/api/secret_json.hpp"
#include "daemon/approvals/approvals.hpp"
#include "daemon/audit/audit_log.hpp"
#include "daemon/enroll/enrollment.hpp"
#include "daemon/startup/seal.hpp"
#include "daemon/store/store.hpp"
#include "daemon/users/user_service.hpp"

namespace kmsd::admins {
class AdminService;
}
namespace kmsd::enroll {
class KeyExport;
}
namespace kmsd::rotation {
class Rotation;
}

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

// The services behind the admin API.
struct AdminServices {
  startup::Seal& seal;
  store::Store& store;
  users::UserService& users;
  approvals::Approvals& approvals;
  audit::AuditLog& audit;
  admins::AdminService* admins = nullptr;   // /v1/admins (404 while not wired)
  enroll::KeyExport* key_export = nullptr;  // /v1/users/ID/export, /v1/requests/ID/collect
  rotation::Rotation* rotation = nullptr;   // /v1/master-key (404 while not wired)
  // Routes owned by other modules (daemon/backup: /v1/backup), asked after the role check and
  // before the body is read as JSON: an answer, or nullopt for a path they do not own.
  std::function<std::optional<Response>(const Request&, const Identity&)> more_routes{};
};

// /v1/...: mutual TLS only; every endpoint checks the caller's role (docs/admin-api.md).
class AdminRoutes {
 public:
  explicit AdminRoutes(AdminServices services) : s_(services) {}
  Response handle(const Request& req, const Peer& peer) const;

 private:
  Response route(const Request& req, const Identity& who) const;
  AdminServices s_;
};

// Maps a service error to its HTTP status and {"error", "reason"} body.
Response error_from(const Request& req, const Error& e);

// Escrowed keys as kmsctl writes them into a PKCS#12 (enrollment, recovery, key export): per
// key its history version, id, algorithm, certificate PEM and PKCS#8 private key PEM.
// Wiping JSON (secret_json.hpp): the private keys leave no copy behind.
Result<SecretJson> delivered_keys_json(const std::vector<enroll::DeliveredKey>& keys);

}  // namespace kmsd::api

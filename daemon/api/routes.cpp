#include "daemon/api/routes.hpp"

#include <nlohmann/json.hpp>

#include "daemon/ca/issuer.hpp"
#include "daemon/startup/unseal_socket.hpp"

namespace kmsd::api {

using json = nlohmann::json;

namespace {

Response method_not_allowed(const Request& req, const char* allowed) {
  auto res = error_response(req, http::status::method_not_allowed,
                            std::string("method not allowed; use ") + allowed);
  res.set(http::field::allow, allowed);
  return res;
}

std::string path_of(const Request& req) {
  std::string target(req.target());
  auto q = target.find('?');
  return q == std::string::npos ? target : target.substr(0, q);
}

}  // namespace

std::variant<Identity, AuthFailure> authenticate(const Peer& peer, store::Store& store) {
  if (!peer.tls || !peer.client_cert)
    return AuthFailure{http::status::unauthorized,
                       "a client certificate issued by this KMS is required"};
  if (!peer.client_cert_verified)
    return AuthFailure{http::status::unauthorized,
                       "the client certificate was not accepted: " + peer.client_cert_error};
  std::string serial = ca::serial_hex(peer.client_cert.get());
  auto admin = store.find_admin_by_serial(serial);
  if (!admin.ok())
    return AuthFailure{http::status::service_unavailable, "the store is unavailable"};
  if (!admin->has_value())
    return AuthFailure{http::status::forbidden,
                       "certificate " + serial + " does not belong to an administrator"};
  if ((*admin)->removed_at.has_value())
    return AuthFailure{http::status::forbidden,
                       "administrator '" + (*admin)->name + "' has been removed"};
  return Identity{(*admin)->name, (*admin)->role, serial};
}

Response PublicRoutes::handle(const Request& req, const Peer&) const {
  const std::string path = path_of(req);
  const bool get = req.method() == http::verb::get || req.method() == http::verb::head;
  if (path == "/healthz") {
    if (!get) return method_not_allowed(req, "GET");
    return json_response(req, http::status::ok, R"({"status":"ok"})");
  }
  if (path == "/readyz") {
    if (!get) return method_not_allowed(req, "GET");
    auto st = seal_.status();
    auto res =
        json_response(req,
                      st.state == startup::State::kUnsealed ? http::status::ok
                                                            : http::status::service_unavailable,
                      startup::status_json(st));
    if (st.state != startup::State::kUnsealed) res.set(http::field::retry_after, "5");
    return res;
  }
  if (path == "/ca.pem" || path == "/ca.der" || path == "/ca.crt") {
    if (!get) return method_not_allowed(req, "GET");
    std::string pem = seal_.ca_pem();
    if (pem.empty())
      return error_response(req, http::status::service_unavailable,
                            "no CA certificate yet: run `kmsctl init`");
    if (path == "/ca.pem")
      return text_response(req, http::status::ok, pem, "application/x-pem-file");
    auto cert = ossl::x509_from_pem(pem);
    auto der = cert.ok() ? ossl::x509_to_der(cert->get()) : Result<ossl::Bytes>(cert.error());
    if (!der.ok())
      return error_response(req, http::status::internal_server_error, "CA encoding failed");
    return text_response(req, http::status::ok, std::string(der->begin(), der->end()),
                         "application/pkix-cert");
  }
  return error_response(req, http::status::not_found, "no such resource: " + path);
}

Response AdminRoutes::handle(const Request& req, const Peer& peer) const {
  auto auth = authenticate(peer, store_);
  if (auto* fail = std::get_if<AuthFailure>(&auth)) {
    auto res = error_response(req, fail->status, fail->message);
    if (fail->status == http::status::unauthorized)
      res.set(http::field::www_authenticate, "Mutual-TLS");
    return res;
  }
  const Identity& who = std::get<Identity>(auth);
  const std::string path = path_of(req);
  if (path == "/v1/whoami") {
    if (req.method() != http::verb::get) return method_not_allowed(req, "GET");
    return json_response(req, http::status::ok,
                         json{{"name", who.name},
                              {"role", store::to_string(who.role)},
                              {"certificate_serial", who.cert_serial}}
                             .dump());
  }
  if (path == "/v1/status") {
    if (req.method() != http::verb::get) return method_not_allowed(req, "GET");
    return json_response(req, http::status::ok, startup::status_json(seal_.status()));
  }
  return error_response(req, http::status::not_found, "no such resource: " + path);
}

}  // namespace kmsd::api

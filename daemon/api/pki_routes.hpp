// The users' and relying parties' side of the HTTP interface:
//
//   public listener (plain HTTP, PkiRoutes):
//     GET  /crl                the current CRL (DER, application/pkix-crl)
//     GET  /ocsp/{base64}      RFC 6960 A.1 GET; POST /ocsp with an application/ocsp-request
//     POST /cmp                RFC 4210 messages over HTTP (RFC 6712), application/pkixcmp
//   TLS listener (EnrollRoutes; no administrator certificate needed):
//     POST /enroll/v1/enroll   one-time token + CSR -> both certificates and the escrowed key(s)
//     POST /enroll/v1/renew    mutual TLS with the current signing certificate + CSR
//     GET  /enroll/v1/keys     mutual TLS with the signing certificate -> the escrowed key(s)
//
// docs/enroll-api.md documents the bodies. Handlers only parse and answer; the services
// (daemon/enroll, daemon/revocation, daemon/cmp) do the work.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "daemon/api/http_server.hpp"
#include "daemon/enroll/enrollment.hpp"

namespace kmsd::api {

// What the public PKI endpoints call; any may be empty (404 then).
struct PkiHandlers {
  std::function<Result<std::vector<std::uint8_t>>()> crl;                        // current CRL, DER
  std::function<std::vector<std::uint8_t>(std::span<const std::uint8_t>)> ocsp;  // DER in/out
  struct CmpReply {
    int http_status = 200;
    std::vector<std::uint8_t> body;
    std::string content_type = "application/pkixcmp";
  };
  std::function<CmpReply(std::span<const std::uint8_t>)> cmp;  // one PKIMessage in, one out
};

class PkiRoutes {
 public:
  explicit PkiRoutes(PkiHandlers handlers) : h_(std::move(handlers)) {}
  // nullopt: not a PKI path (the caller tries its other routes).
  std::optional<Response> handle(const Request& req, const Peer& peer) const;

 private:
  PkiHandlers h_;
};

class EnrollRoutes {
 public:
  explicit EnrollRoutes(enroll::EnrollmentService& service) : service_(service) {}
  static bool owns(const Request& req);  // the path is under /enroll/
  Response handle(const Request& req, const Peer& peer) const;

 private:
  enroll::EnrollmentService& service_;
};

}  // namespace kmsd::api

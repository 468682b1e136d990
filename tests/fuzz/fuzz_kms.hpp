// An initialized KMS for the fuzz targets that need one (CMP, CSRs, REST bodies, HTTP): a
// throw-away SoftHSM2 token in its own temporary directory, provisioned as `kmsctl init` does
// (master, CA and audit keys on the token, CA certificate, first administrator), unsealed, with
// the services wired as daemon/app.cpp wires them. Built once per process, on first use.
#pragma once

#include <filesystem>
#include <memory>
#include <string>

#include "daemon/admins/admin_service.hpp"
#include "daemon/api/http_server.hpp"
#include "daemon/api/pki_routes.hpp"
#include "daemon/api/routes.hpp"
#include "daemon/approvals/approvals.hpp"
#include "daemon/audit/audit_log.hpp"
#include "daemon/cmp/cmp_server.hpp"
#include "daemon/enroll/enrollment.hpp"
#include "daemon/enroll/key_export.hpp"
#include "daemon/policy/policy_check.hpp"
#include "daemon/revocation/revocation.hpp"
#include "daemon/startup/seal.hpp"
#include "daemon/store/store.hpp"
#include "daemon/users/user_service.hpp"
#include "hsm/token.hpp"
#include "tests/fuzz/fuzz_common.hpp"

namespace kmsd::fuzz {

struct Kms {
  std::unique_ptr<store::Store> store;
  std::unique_ptr<hsm::Token> token;
  std::unique_ptr<startup::Seal> seal;
  std::unique_ptr<policy::PolicyInForce> policy;
  std::unique_ptr<audit::AuditLog> audit;
  std::unique_ptr<approvals::Approvals> approvals;
  std::unique_ptr<users::UserService> users;
  std::unique_ptr<enroll::EnrollmentService> enrollment;
  std::unique_ptr<revocation::Revocation> revocation;
  std::unique_ptr<admins::AdminService> admins;
  std::unique_ptr<enroll::KeyExport> key_export;
  std::unique_ptr<cmp::CmpServer> cmp;
  std::unique_ptr<api::PublicRoutes> public_routes;
  std::unique_ptr<api::PkiRoutes> pki_routes;
  std::unique_ptr<api::AdminRoutes> admin_routes;
  std::unique_ptr<api::EnrollRoutes> enroll_routes;

  api::Peer anonymous;  // a plain-HTTP client
  api::Peer admin;      // the first administrator over mutual TLS (verified certificate)

  // The user "fuzz-user", enabled, and its one-time enrollment token as typed by the user.
  std::string user = "fuzz-user";
  std::string user_token;

  ossl::X509Ptr ca_certificate() const;
  // A new token for USER after an enrollment spent it (revoke + enable again): the next input
  // then reaches the same code.
  void renew_user_token();
};

// The process's KMS; aborts with a message if it cannot be built (the target is useless).
Kms& kms();

// The two listeners' handlers as Daemon::run composes them: the public one tries the PKI paths
// (/crl, /ocsp, /cmp) and then /healthz, /readyz, /ca.*; the TLS one sends /enroll/ to the
// enrollment routes and everything else to the administrator routes.
api::Response public_listener(const api::Request& req, const api::Peer& peer);
api::Response tls_listener(const api::Request& req, const api::Peer& peer);

// With KMSD_FUZZ_TRACE set: prints the request line, the status and the start of the body on
// stderr (to see which paths a corpus reaches).
void trace(const api::Request& req, const api::Response& res);

}  // namespace kmsd::fuzz

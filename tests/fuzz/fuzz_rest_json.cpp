// The JSON bodies of the REST routes, through the real route handlers of an initialized,
// unsealed KMS. The first byte picks the route (below), the rest is the body. The administrator
// routes are called as the first administrator (a verified mutual-TLS peer); the enrollment
// routes as a TLS client without a certificate. Handlers must not throw (Handler's contract:
// an exception would be a 500) and must never answer 500 to a body.
#include <cstddef>
#include <cstdint>
#include <string>

#include "tests/fuzz/fuzz_kms.hpp"

namespace {

namespace http = kmsd::api::http;

struct Route {
  http::verb verb;
  const char* target;
  bool admin;  // called by the administrator (else an anonymous TLS client)
};

// POST routes that read a body (docs/admin-api.md, docs/enroll-api.md).
const Route kRoutes[] = {
    {http::verb::post, "/v1/users", true},
    {http::verb::post, "/v1/users/bulk", true},
    {http::verb::post, "/v1/admins", true},
    {http::verb::post, "/v1/users/fuzz-user/revoke", true},
    {http::verb::post, "/enroll/v1/enroll", false},
    {http::verb::post, "/enroll/v1/renew", true},
    {http::verb::post, "/v1/users/fuzz-user/recover", true},
    {http::verb::post, "/v1/requests/1/approve", true},
};

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  kmsd::fuzz::kms();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0 || size > 256 * 1024) return 0;
  auto& k = kmsd::fuzz::kms();
  const Route& route = kRoutes[data[0] % (sizeof kRoutes / sizeof kRoutes[0])];
  kmsd::api::Request req{route.verb, route.target, 11};
  req.set(http::field::content_type, "application/json");
  req.body().assign(reinterpret_cast<const char*>(data + 1), size - 1);
  req.prepare_payload();
  kmsd::api::Peer anonymous_tls;
  anonymous_tls.address = "127.0.0.1:40003";
  anonymous_tls.tls = true;
  auto res = kmsd::fuzz::tls_listener(req, route.admin ? k.admin : anonymous_tls);
  kmsd::fuzz::trace(req, res);
  if (res.result_int() >= 500 && res.result_int() != 503) __builtin_trap();
  k.renew_user_token();
  return 0;
}

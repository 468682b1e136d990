#include "daemon/metrics/admission.hpp"

#include <openssl/cmp.h>
#include <openssl/err.h>

#include <nlohmann/json.hpp>

#include "daemon/ca/issuer.hpp"
#include "daemon/cmp/asn1.hpp"

namespace kmsd::metrics {

EnrollmentAdmission::EnrollmentAdmission(unsigned per_source, unsigned per_identity)
    : per_source_(per_source, per_source), per_identity_(per_identity, per_identity) {}

bool EnrollmentAdmission::limited(std::string_view path) {
  path = path.substr(0, path.find('?'));
  return path.rfind("/enroll/", 0) == 0 || path == "/cmp";
}

std::string EnrollmentAdmission::identity(const api::Request& req, const api::Peer& peer) {
  std::string_view path(req.target().data(), req.target().size());
  path = path.substr(0, path.find('?'));
  if (path == "/cmp") {
    const auto* p = reinterpret_cast<const std::uint8_t*>(req.body().data());
    auto view = cmp::view_message({p, req.body().size()}, -1);
    ERR_clear_error();
    if (view.ok() && view->sender_kid && !view->sender_kid->empty())
      return "user:" + *view->sender_kid;
    return "";
  }
  if (path == "/enroll/v1/enroll") {
    auto j = nlohmann::json::parse(req.body(), nullptr, false);
    if (j.is_object()) {
      auto it = j.find("user");
      if (it != j.end() && it->is_string() && !it->get_ref<const std::string&>().empty())
        return "user:" + it->get<std::string>();
    }
    return "";
  }
  if (peer.tls && peer.client_cert) return "cert:" + ca::serial_hex(peer.client_cert.get());
  return "";
}

std::optional<api::Response> EnrollmentAdmission::admit(const api::Request& req,
                                                        const api::Peer& peer) {
  if (!limited(std::string_view(req.target().data(), req.target().size()))) return std::nullopt;
  auto refuse = [&](unsigned wait, const std::string& what) {
    auto res =
        api::error_response(req, api::http::status::too_many_requests,
                            what + "; retry in " + std::to_string(wait) + " s (Retry-After)");
    res.set(api::http::field::retry_after, std::to_string(wait));
    return res;
  };
  const std::string address = api::address_of(peer.address);
  if (auto wait = per_source_.take(address))
    return refuse(*wait, "too many enrollment and CMP requests from " + address + ": at most " +
                             std::to_string(per_source_.rate_per_minute()) +
                             " a minute (server.enroll_rate_per_source)");
  const std::string who = identity(req, peer);
  if (!who.empty()) {
    if (auto wait = per_identity_.take(who))
      return refuse(*wait, "too many enrollment attempts for this user or certificate: at most " +
                               std::to_string(per_identity_.rate_per_minute()) +
                               " a minute (server.enroll_rate_per_identity)");
  }
  return std::nullopt;
}

}  // namespace kmsd::metrics

#include "daemon/dr/dr_routes.hpp"

#include <openssl/evp.h>

#include <string>
#include <vector>

namespace kmsd::dr {

namespace {

using json = nlohmann::json;

std::string path_of(const api::Request& req) {
  std::string target(req.target());
  return target.substr(0, target.find('?'));
}

std::vector<std::string> split_path(const std::string& path) {
  std::vector<std::string> out;
  std::size_t pos = 1;
  while (pos <= path.size()) {
    const auto slash = path.find('/', pos);
    out.push_back(path.substr(pos, slash == std::string::npos ? std::string::npos : slash - pos));
    if (slash == std::string::npos) break;
    pos = slash + 1;
  }
  return out;
}

std::string base64(const ossl::Bytes& der) {
  std::string out(4 * ((der.size() + 2) / 3) + 1, '\0');
  const int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()), der.data(),
                                static_cast<int>(der.size()));
  out.resize(static_cast<std::size_t>(n));
  return out;
}

api::Response reply(const api::Request& req, api::http::status st, const json& j) {
  return api::json_response(req, st,
                            j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
}

api::Response outcome(const api::Request& req, const approvals::Outcome& o) {
  json j{{"state", store::to_string(o.state)},
         {"message", o.message},
         {"approvals", o.approvals},
         {"required", o.required}};
  if (!o.request_id.empty()) j["request_id"] = o.request_id;
  switch (o.state) {
    case store::RequestState::kExecuted:
      j["result"] = o.result;
      return reply(req, api::http::status::ok, j);
    case store::RequestState::kPending:
      return reply(req, api::http::status::accepted, j);
    case store::RequestState::kFailed:
      j["error"] = o.message;
      return reply(req, api::http::status::conflict, j);
    default:
      return reply(req, api::http::status::ok, j);
  }
}

std::optional<std::string> custody_pem(const api::Request& req) {
  json body = json::parse(req.body(), nullptr, false);
  if (!body.is_object() || !body.contains("custody_certificate") ||
      !body["custody_certificate"].is_string())
    return std::nullopt;
  return body["custody_certificate"].get<std::string>();
}

}  // namespace

std::function<std::optional<api::Response>(const api::Request&, const api::Identity&)> admin_routes(
    PredecryptService& service) {
  return [&service](const api::Request& req,
                    const api::Identity& who) -> std::optional<api::Response> {
    const std::string path = path_of(req);
    if (path.rfind("/v1/dr/", 0) != 0) return std::nullopt;
    const auto seg = split_path(path);  // v1 dr predecrypt [ID ACTION]
    if (seg.size() < 3 || seg[2] != "predecrypt" || (seg.size() != 3 && seg.size() != 5))
      return api::error_response(req, api::http::status::not_found, "no such resource: " + path);
    if (req.method() != api::http::verb::post) {
      auto res = api::error_response(req, api::http::status::method_not_allowed,
                                     "method not allowed; use POST");
      res.set(api::http::field::allow, "POST");
      return res;
    }
    const auto missing_cert = [&] {
      return api::error_response(
          req, api::http::status::bad_request,
          "send {\"custody_certificate\": PEM}, the DR custody certificate messages go to");
    };
    if (seg.size() == 3) {
      auto pem = custody_pem(req);
      if (!pem) return missing_cert();
      auto out = service.request(*pem, who.name);
      if (!out.ok()) return api::error_from(req, out.error());
      return outcome(req, *out);
    }
    const std::string& id = seg[3];
    const std::string& action = seg[4];
    if (action == "open") {
      auto pem = custody_pem(req);
      if (!pem) return missing_cert();
      auto info = service.open(id, who.name, *pem);
      if (!info.ok()) return api::error_from(req, info.error());
      return reply(req, api::http::status::ok,
                   json{{"request", info->request_id},
                        {"custody_certificate_sha256", info->custody_fingerprint},
                        {"expires_at", info->expires_at}});
    }
    if (action == "message") {
      if (req.body().empty())
        return api::error_response(req, api::http::status::bad_request,
                                   "send one encrypted CMS message (DER) as the request body");
      auto out = service.rewrap(id, who.name, req.body());
      if (!out.ok()) return api::error_from(req, out.error());
      json j{{"status", out->status}, {"users", out->users}};
      if (!out->reason.empty()) j["reason"] = out->reason;
      if (out->cms) {
        auto der = [&]() -> Result<ossl::Bytes> {
          ossl::BioPtr bio(BIO_new(BIO_s_mem()));
          if (!bio || i2d_CMS_bio(bio.get(), out->cms.get()) != 1)
            return ossl::crypto_error("encoding the re-encrypted message");
          char* p = nullptr;
          const long n = BIO_get_mem_data(bio.get(), &p);
          return ossl::Bytes(p, p + n);
        }();
        if (!der.ok()) return api::error_from(req, der.error());
        j["cms"] = base64(*der);
      }
      auto res = reply(req, api::http::status::ok, j);
      res.set(api::http::field::cache_control, "no-store");
      return res;
    }
    if (action == "close") {
      auto counts = service.close(id, who.name);
      if (!counts.ok()) return api::error_from(req, counts.error());
      return reply(req, api::http::status::ok, json{{"counts", counts->to_json()}});
    }
    return api::error_response(req, api::http::status::not_found, "no such resource: " + path);
  };
}

}  // namespace kmsd::dr

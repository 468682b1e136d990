#include "daemon/backup/backup_routes.hpp"

#include <string>

namespace kmsd::backup {

namespace {

std::string path_of(const api::Request& req) {
  std::string target(req.target());
  return target.substr(0, target.find('?'));
}

}  // namespace

bool is_long_call(const api::Request& req) {
  const std::string path = path_of(req);
  return req.method() == api::http::verb::post &&
         (path == "/v1/backup" || path == "/v1/backup/check");
}

std::function<std::optional<api::Response>(const api::Request&, const api::Identity&)> admin_routes(
    BackupService& service) {
  return [&service](const api::Request& req,
                    const api::Identity& who) -> std::optional<api::Response> {
    const std::string path = path_of(req);
    if (path != "/v1/backup" && path != "/v1/backup/check") return std::nullopt;
    if (req.method() != api::http::verb::post) {
      auto res = api::error_response(req, api::http::status::method_not_allowed,
                                     "method not allowed; use POST");
      res.set(api::http::field::allow, "POST");
      return res;
    }
    if (path == "/v1/backup") {
      auto made = service.create(who.name);
      if (!made.ok()) return api::error_from(req, made.error());
      return api::text_response(req, api::http::status::ok, std::move(made->file),
                                "application/octet-stream");
    }
    if (req.body().empty())
      return api::error_response(req, api::http::status::bad_request,
                                 "send the backup file as the request body");
    auto rep = service.check(req.body(), who.name);
    if (!rep.ok()) return api::error_from(req, rep.error());
    return api::json_response(
        req, api::http::status::ok,
        rep->to_json().dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
  };
}

}  // namespace kmsd::backup

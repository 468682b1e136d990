#include "daemon/api/routes.hpp"

#include <openssl/crypto.h>
#include <openssl/pem.h>

#include <nlohmann/json.hpp>

#include "daemon/admins/admin_service.hpp"
#include "daemon/ca/issuer.hpp"
#include "daemon/enroll/key_export.hpp"
#include "daemon/rotation/rotation.hpp"
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

namespace {

// Splits "/v1/users/alice%2Fx/reissue" into decoded segments {"v1","users","alice/x","reissue"}.
std::optional<std::vector<std::string>> segments(const std::string& path) {
  std::vector<std::string> out;
  std::string cur;
  for (std::size_t i = 1; i <= path.size(); ++i) {
    if (i == path.size() || path[i] == '/') {
      out.push_back(cur);
      cur.clear();
      continue;
    }
    char c = path[i];
    if (c == '%') {
      auto hexval = [](char h) -> int {
        if (h >= '0' && h <= '9') return h - '0';
        if (h >= 'a' && h <= 'f') return h - 'a' + 10;
        if (h >= 'A' && h <= 'F') return h - 'A' + 10;
        return -1;
      };
      if (i + 2 >= path.size()) return std::nullopt;  // needs two hex digits
      int hi = hexval(path[i + 1]), lo = hexval(path[i + 2]);
      if (hi < 0 || lo < 0) return std::nullopt;
      cur.push_back(static_cast<char>(hi * 16 + lo));
      i += 2;
    } else {
      cur.push_back(c);
    }
  }
  return out;
}

std::string query_param(const Request& req, const std::string& name) {
  std::string target(req.target());
  auto q = target.find('?');
  if (q == std::string::npos) return "";
  std::string query = target.substr(q + 1);
  std::size_t pos = 0;
  while (pos <= query.size()) {
    auto amp = query.find('&', pos);
    std::string kv = query.substr(pos, amp == std::string::npos ? std::string::npos : amp - pos);
    auto eq = kv.find('=');
    if (kv.substr(0, eq) == name) return eq == std::string::npos ? "" : kv.substr(eq + 1);
    if (amp == std::string::npos) break;
    pos = amp + 1;
  }
  return "";
}

// EXPORT_CALL: asking for or collecting a key-history export, which only the recovery role may
// do (an administrator's power over users does not include taking their keys); the recovery
// role may otherwise only read the requests, to follow its own.
bool allowed(store::AdminRole role, http::verb verb, bool approval_call, bool export_call) {
  if (role == store::AdminRole::kRecovery)
    return export_call || (approval_call && verb == http::verb::get);
  if (export_call) return false;
  if (role == store::AdminRole::kAdmin) return true;
  if (role == store::AdminRole::kApprover) return approval_call;
  return verb == http::verb::get;  // auditor: read only
}

// An export: who, which request, and the keys (delivered_keys_json).
Result<SecretJson> exported_keys_json(const enroll::ExportedKeys& e) {
  KMSD_ASSIGN_OR_RETURN(auto keys, delivered_keys_json(e.keys));
  return SecretJson{{"user", e.user_id}, {"request_id", e.request_id}, {"keys", std::move(keys)}};
}

Response outcome_response(const Request& req, const approvals::Outcome& o) {
  using store::RequestState;
  json j{{"state", store::to_string(o.state)}, {"message", o.message}};
  if (!o.request_id.empty()) j["request_id"] = o.request_id;
  switch (o.state) {
    case RequestState::kExecuted:
      j["result"] = o.result;
      return json_response(req, http::status::ok,
                           j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
    case RequestState::kPending:
      j["approvals"] = o.approvals;
      j["required"] = o.required;
      return json_response(req, http::status::accepted,
                           j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
    case RequestState::kFailed:
      j["error"] = o.message;
      return json_response(req, http::status::conflict,
                           j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
    default:
      return json_response(req, http::status::ok,
                           j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
  }
}

json issued_json(const users::Issued& i) {
  return json{{"user", i.user.id},
              {"state", store::to_string(i.user.state)},
              {"token", std::string(i.token.view())},
              {"expires_at", i.expires_at},
              {"message", i.message}};
}

Result<users::UserInput> user_input(const json& j) {
  if (!j.is_object()) return make_error(ErrorCode::kInvalidArgument, "expected a JSON object");
  users::UserInput in;
  for (auto [key, field] : {std::pair<const char*, std::string*>{"id", &in.id},
                            {"email", &in.email},
                            {"display_name", &in.display_name}}) {
    if (!j.contains(key) || !j[key].is_string())
      return make_error(ErrorCode::kInvalidArgument,
                        std::string("\"") + key + "\" (a string) is required");
    *field = j[key].get<std::string>();
  }
  if (j.contains("dn") && !j["dn"].is_null()) {
    if (!j["dn"].is_string())
      return make_error(ErrorCode::kInvalidArgument, "\"dn\" must be a string");
    in.dn = j["dn"].get<std::string>();
  }
  return in;
}

}  // namespace

Response error_from(const Request& req, const Error& e) {
  http::status st = http::status::internal_server_error;
  switch (e.code) {
    case ErrorCode::kInvalidArgument:
    case ErrorCode::kConfig:
      st = http::status::bad_request;
      break;
    case ErrorCode::kNotFound:
      st = http::status::not_found;
      break;
    case ErrorCode::kAlreadyExists:
    case ErrorCode::kFailedPrecondition:
      st = http::status::conflict;
      break;
    case ErrorCode::kPermissionDenied:
      st = http::status::forbidden;
      break;
    case ErrorCode::kUnauthenticated:
      st = http::status::unauthorized;
      break;
    case ErrorCode::kUnavailable:
    case ErrorCode::kPinLocked:
      st = http::status::service_unavailable;
      break;
    default:
      break;
  }
  json j{{"error", e.message}};
  if (auto reason = users::refusal_reason(e); !reason.empty()) j["reason"] = reason;
  auto res =
      json_response(req, st, j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
  if (st == http::status::service_unavailable) res.set(http::field::retry_after, "5");
  return res;
}

Response AdminRoutes::handle(const Request& req, const Peer& peer) const {
  auto auth = authenticate(peer, s_.store);
  if (auto* fail = std::get_if<AuthFailure>(&auth)) {
    auto res = error_response(req, fail->status, fail->message);
    if (fail->status == http::status::unauthorized)
      res.set(http::field::www_authenticate, "Mutual-TLS");
    return res;
  }
  return route(req, std::get<Identity>(auth));
}

Response AdminRoutes::route(const Request& req, const Identity& who) const {
  const std::string path = path_of(req);
  auto seg_opt = segments(path);
  if (!seg_opt || seg_opt->empty() || (*seg_opt)[0] != "v1")
    return error_response(req, http::status::not_found, "no such resource: " + path);
  const auto& seg = *seg_opt;
  const http::verb verb = req.method();
  const bool approval_call = seg.size() >= 2 && seg[1] == "requests";
  const bool anyone = seg.size() == 2 && (seg[1] == "whoami" || seg[1] == "status");
  const bool export_call = seg.size() == 4 && ((seg[1] == "users" && seg[3] == "export") ||
                                               (seg[1] == "requests" && seg[3] == "collect"));
  if (!anyone && !allowed(who.role, verb, approval_call, export_call))
    return error_response(req, http::status::forbidden,
                          "administrator '" + who.name + "' has role " +
                              store::to_string(who.role) + ", which may not " +
                              std::string(req.method_string()) + " " + path);
  if (s_.more_routes)
    if (auto answer = s_.more_routes(req, who)) return std::move(*answer);
  json body = json::object();
  if (verb == http::verb::post && !req.body().empty()) {
    body = json::parse(req.body(), nullptr, false);
    if (body.is_discarded())
      return error_response(req, http::status::bad_request, "the request body is not JSON");
    if (!body.is_object())
      return error_response(req, http::status::bad_request,
                            "the request body must be a JSON object");
  }
  // BODY[KEY] when present, FALLBACK when absent or null; an answer naming the key when it has
  // another JSON type (nlohmann's value() would throw: a 500 for a client's mistake).
  auto optional_field = [&](const char* key, auto fallback, bool (json::*is_type)() const noexcept,
                            const char* type) -> std::variant<decltype(fallback), Response> {
    auto it = body.find(key);
    if (it == body.end() || it->is_null()) return fallback;
    if (!((*it).*is_type)())
      return error_response(req, http::status::bad_request,
                            std::string("\"") + key + "\" must be " + type);
    return it->template get<decltype(fallback)>();
  };
  auto respond = [&](const auto& result, http::status ok_status, auto to_json) -> Response {
    if (!result.ok()) return error_from(req, result.error());
    return json_response(
        req, ok_status,
        to_json(*result).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
  };

  if (seg.size() == 2 && seg[1] == "whoami" && verb == http::verb::get)
    return json_response(req, http::status::ok,
                         json{{"name", who.name},
                              {"role", store::to_string(who.role)},
                              {"certificate_serial", who.cert_serial}}
                             .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
  if (seg.size() == 2 && seg[1] == "status" && verb == http::verb::get)
    return json_response(req, http::status::ok, startup::status_json(s_.seal.status()));

  if (seg.size() >= 2 && seg[1] == "users") {
    if (seg.size() == 2 && verb == http::verb::post) {
      auto in = user_input(body);
      if (!in.ok()) return error_from(req, in.error());
      return respond(s_.users.enable(*in, who.name), http::status::created, issued_json);
    }
    if (seg.size() == 3 && seg[2] == "bulk" && verb == http::verb::post) {
      if (!body.contains("users") || !body["users"].is_array())
        return error_response(req, http::status::bad_request, "\"users\" (an array) is required");
      if (body["users"].size() > 1000)
        return error_response(req, http::status::payload_too_large,
                              "at most 1000 users per request; send the file in batches");
      users::BulkOptions opts;
      auto job = optional_field("job", std::string(), &json::is_string, "a string");
      if (auto* r = std::get_if<Response>(&job)) return std::move(*r);
      opts.job = std::get<std::string>(job);
      for (auto [key, flag] :
           {std::pair<const char*, bool*>{"reissue_pending", &opts.reissue_pending},
            {"include_revoked", &opts.include_revoked}}) {
        auto v = optional_field(key, false, &json::is_boolean, "true or false");
        if (auto* r = std::get_if<Response>(&v)) return std::move(*r);
        *flag = std::get<bool>(v);
      }
      std::vector<users::UserInput> list;
      std::vector<std::pair<std::size_t, std::string>> malformed;
      for (std::size_t i = 0; i < body["users"].size(); ++i) {
        auto in = user_input(body["users"][i]);
        if (!in.ok()) {
          malformed.emplace_back(i, in.error().message);
          continue;
        }
        list.push_back(std::move(*in));
      }
      if (!malformed.empty())
        return error_response(req, http::status::bad_request,
                              "user " + std::to_string(malformed.front().first) +
                                  " of the batch: " + malformed.front().second);
      auto lines = s_.users.bulk_enable(list, opts, who.name);
      if (!lines.ok()) return error_from(req, lines.error());
      json results = json::array();
      for (const auto& l : *lines) {
        json r{{"id", l.id}, {"status", users::to_string(l.status)}, {"message", l.message}};
        if (l.status == users::BulkStatus::kIssued) {
          r["token"] = std::string(l.token.view());
          r["expires_at"] = l.expires_at;
        }
        results.push_back(std::move(r));
      }
      return json_response(req, http::status::ok,
                           json{{"results", results}}.dump(
                               -1, ' ', false, nlohmann::json::error_handler_t::replace));
    }
    if (seg.size() == 3 && verb == http::verb::get)
      return respond(s_.users.show(seg[2]), http::status::ok, [](const json& j) { return j; });
    if (seg.size() == 4 && verb == http::verb::post) {
      const std::string& id = seg[2];
      if (seg[3] == "reissue")
        return respond(s_.users.reissue(id, who.name), http::status::ok, issued_json);
      if (seg[3] == "revoke") {
        auto r =
            optional_field("reason", 0, &json::is_number_integer, "a CRL reason code (an integer)");
        if (auto* answer = std::get_if<Response>(&r)) return std::move(*answer);
        const int reason = std::get<int>(r);
        auto out = s_.approvals.submit("revoke", {{"user", id}, {"reason", reason}}, who.name);
        if (!out.ok()) return error_from(req, out.error());
        return outcome_response(req, *out);
      }
      if (seg[3] == "recover") {
        auto out = s_.approvals.submit("recover", {{"user", id}}, who.name);
        if (!out.ok()) return error_from(req, out.error());
        return outcome_response(req, *out);
      }
      if (seg[3] == "export" && s_.key_export != nullptr) {
        auto out = s_.key_export->request(id, who.name);
        if (!out.ok()) return error_from(req, out.error());
        return outcome_response(req, *out);
      }
    }
  }
  if (s_.admins != nullptr && seg.size() >= 2 && seg[1] == "admins") {
    if (seg.size() == 2 && verb == http::verb::get)
      return respond(s_.admins->list(), http::status::ok, [](const json& j) { return j; });
    if (seg.size() == 2 && verb == http::verb::post) {
      for (const char* key : {"name", "role", "csr"})
        if (!body.contains(key) || !body[key].is_string())
          return error_response(req, http::status::bad_request,
                                std::string("\"") + key + "\" (a string) is required");
      auto out = s_.admins->add(body["name"].get<std::string>(), body["role"].get<std::string>(),
                                body["csr"].get<std::string>(), who.name);
      if (!out.ok()) return error_from(req, out.error());
      return outcome_response(req, *out);
    }
    if (seg.size() == 3 && verb == http::verb::delete_) {
      auto out = s_.admins->remove(seg[2], who.name);
      if (!out.ok()) return error_from(req, out.error());
      return outcome_response(req, *out);
    }
  }
  if (seg.size() == 3 && seg[1] == "reports" && seg[2] == "users" && verb == http::verb::get) {
    const std::string format =
        query_param(req, "format").empty() ? "json" : query_param(req, "format");
    users::ReportFormat f;
    std::string type;
    if (format == "json") {
      f = users::ReportFormat::kJson;
      type = "application/json";
    } else if (format == "csv") {
      f = users::ReportFormat::kCsv;
      type = "text/csv; charset=utf-8";
    } else if (format == "ldif") {
      f = users::ReportFormat::kLdif;
      type = "text/x-ldif; charset=utf-8";
    } else {
      return error_response(req, http::status::bad_request, "format must be json, csv or ldif");
    }
    std::string out;
    auto st = s_.users.report(f, [&](std::string_view chunk) {
      out.append(chunk);
      return Status{};
    });
    if (!st.ok()) return error_from(req, st.error());
    return text_response(req, http::status::ok, std::move(out), type);
  }
  if (seg.size() >= 2 && seg[1] == "requests") {
    if (seg.size() == 2 && verb == http::verb::get) {
      std::optional<store::RequestState> state;
      if (auto q = query_param(req, "state"); !q.empty()) {
        state = store::parse_request_state(q);
        if (!state)
          return error_response(req, http::status::bad_request,
                                "state must be pending, executed, denied, expired or failed");
      }
      auto list = s_.approvals.list(state);
      if (!list.ok()) return error_from(req, list.error());
      json arr = json::array();
      for (const auto& r : *list) {
        auto decisions = s_.store.approvals(r.id);
        int n = 0;
        if (decisions.ok())
          for (const auto& d : *decisions) n += d.approve ? 1 : 0;
        json j{{"id", r.id},
               {"operation", r.operation},
               {"params", json::parse(r.params, nullptr, false)},
               {"requested_by", r.requested_by},
               {"required", r.required},
               {"approvals", n},
               {"state", store::to_string(r.state)},
               {"created_at", r.created_at},
               {"expires_at", r.expires_at}};
        if (r.result) j["result"] = json::parse(*r.result, nullptr, false);
        arr.push_back(std::move(j));
      }
      return json_response(
          req, http::status::ok,
          json{{"requests", arr}}.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
    }
    if (seg.size() == 4 && verb == http::verb::post && seg[3] == "collect" &&
        s_.key_export != nullptr) {
      auto keys = s_.key_export->collect(seg[2], who.name);
      if (!keys.ok()) return error_from(req, keys.error());
      auto j = exported_keys_json(*keys);
      if (!j.ok()) return error_from(req, j.error());
      return secret_json_response(req, *j);
    }
    if (seg.size() == 4 && verb == http::verb::post && (seg[3] == "approve" || seg[3] == "deny")) {
      auto out = seg[3] == "approve" ? s_.approvals.approve(seg[2], who.name)
                                     : s_.approvals.deny(seg[2], who.name);
      if (!out.ok()) return error_from(req, out.error());
      return outcome_response(req, *out);
    }
  }
  if (s_.rotation != nullptr && seg.size() >= 2 && seg[1] == "master-key") {
    if (seg.size() == 2 && verb == http::verb::get)
      return respond(s_.rotation->status(), http::status::ok, [](const json& j) { return j; });
    if (seg.size() == 3 && seg[2] == "rotate" && verb == http::verb::post) {
      auto batch = optional_field("batch", static_cast<std::int64_t>(rotation::kDefaultBatch),
                                  &json::is_number_integer, "a number of records (an integer)");
      if (auto* r = std::get_if<Response>(&batch)) return std::move(*r);
      auto pause = optional_field("pause_ms", std::int64_t{0}, &json::is_number_integer,
                                  "milliseconds (an integer)");
      if (auto* r = std::get_if<Response>(&pause)) return std::move(*r);
      const std::int64_t b = std::get<std::int64_t>(batch);
      const std::int64_t p = std::get<std::int64_t>(pause);
      if (b < 1 || p < 0)
        return error_response(req, http::status::bad_request,
                              "\"batch\" must be at least 1 and \"pause_ms\" not negative");
      rotation::Pace pace;
      pace.batch = static_cast<std::size_t>(b);
      pace.pause = std::chrono::milliseconds(p);
      auto out = s_.rotation->request_rotate(pace, who.name);
      if (!out.ok()) return error_from(req, out.error());
      return outcome_response(req, *out);
    }
    if (seg.size() == 3 && seg[2] == "retire" && verb == http::verb::post) {
      auto v = optional_field("version", std::int64_t{0}, &json::is_number_integer,
                              "a master key version (an integer)");
      if (auto* r = std::get_if<Response>(&v)) return std::move(*r);
      const std::int64_t version = std::get<std::int64_t>(v);
      if (version < 1 || version > 0xffffffffLL)
        return error_response(req, http::status::bad_request,
                              "\"version\" (a master key version, 1 or more) is required");
      auto out = s_.rotation->request_retire(static_cast<std::uint32_t>(version), who.name);
      if (!out.ok()) return error_from(req, out.error());
      return outcome_response(req, *out);
    }
  }
  if (seg.size() == 3 && seg[1] == "audit" && verb == http::verb::get) {
    if (seg[2] == "verify") {
      auto rep = s_.audit.verify();
      if (!rep.ok()) return error_from(req, rep.error());
      json j{{"ok", rep->ok()}, {"records", rep->records}};
      if (rep->first_bad) j["first_bad"] = *rep->first_bad;
      if (!rep->problem.empty()) j["problem"] = rep->problem;
      return json_response(req, http::status::ok,
                           j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
    }
    if (seg[2] == "export") {
      std::string out;
      auto st = s_.audit.export_records([&](const json& j) {
        out += j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
        return Status{};
      });
      if (!st.ok()) return error_from(req, st.error());
      return text_response(req, http::status::ok, std::move(out), "application/x-ndjson");
    }
  }
  return error_response(req, http::status::not_found,
                        "no such resource: " + std::string(req.method_string()) + " " + path);
}

}  // namespace kmsd::api

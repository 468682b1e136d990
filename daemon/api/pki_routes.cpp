#include "daemon/api/pki_routes.hpp"

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <nlohmann/json.hpp>

#include "daemon/api/routes.hpp"
#include "daemon/ca/issuer.hpp"

namespace kmsd::api {

using json = nlohmann::json;

namespace {

std::string path_only(const Request& req) {
  std::string target(req.target());
  return target.substr(0, target.find('?'));
}

Response binary_response(const Request& req, http::status status, std::span<const std::uint8_t> b,
                         const std::string& type) {
  return text_response(req, status, std::string(b.begin(), b.end()), type);
}

std::span<const std::uint8_t> body_bytes(const Request& req) {
  return {reinterpret_cast<const std::uint8_t*>(req.body().data()), req.body().size()};
}

// Percent-decoding of one path segment; nullopt for a broken escape.
std::optional<std::string> percent_decode(std::string_view s) {
  std::string out;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '%') {
      out.push_back(s[i]);
      continue;
    }
    if (i + 2 >= s.size()) return std::nullopt;
    const std::string hex(s.substr(i + 1, 2));
    char* end = nullptr;
    long v = std::strtol(hex.c_str(), &end, 16);
    if (end != hex.c_str() + 2) return std::nullopt;
    out.push_back(static_cast<char>(v));
    i += 2;
  }
  return out;
}

// Standard base64 (RFC 4648 4) with padding, as RFC 6960 A.1 GET requests carry it.
std::optional<std::vector<std::uint8_t>> base64_decode(const std::string& text) {
  if (text.empty() || text.size() % 4 != 0) return std::nullopt;
  std::vector<std::uint8_t> out(text.size() / 4 * 3);
  int n = EVP_DecodeBlock(out.data(), reinterpret_cast<const unsigned char*>(text.data()),
                          static_cast<int>(text.size()));
  if (n < 0) return std::nullopt;
  std::size_t pad = 0;
  if (text.back() == '=') ++pad;
  if (text.size() > 1 && text[text.size() - 2] == '=') ++pad;
  out.resize(static_cast<std::size_t>(n) - pad);
  return out;
}

Response ocsp_answer(const Request& req, const std::vector<std::uint8_t>& der) {
  auto res = binary_response(req, http::status::ok, der, "application/ocsp-response");
  res.set(http::field::cache_control, "no-cache");
  return res;
}

}  // namespace

std::optional<Response> PkiRoutes::handle(const Request& req, const Peer&) const {
  const std::string path = path_only(req);
  const bool get = req.method() == http::verb::get || req.method() == http::verb::head;
  const bool post = req.method() == http::verb::post;
  if (path == "/crl" && h_.crl) {
    if (!get) return error_response(req, http::status::method_not_allowed, "use GET for /crl");
    auto crl = h_.crl();
    if (!crl.ok()) return error_from(req, crl.error());
    return binary_response(req, http::status::ok, *crl, "application/pkix-crl");
  }
  if ((path == "/ocsp" || path.rfind("/ocsp/", 0) == 0) && h_.ocsp) {
    if (post && path == "/ocsp") return ocsp_answer(req, h_.ocsp(body_bytes(req)));
    if (get && path.size() > 6) {
      auto text = percent_decode(std::string_view(path).substr(6));
      auto der = text ? base64_decode(*text) : std::nullopt;
      if (!der)
        return error_response(req, http::status::bad_request,
                              "the OCSP GET request is not base64 of a DER OCSPRequest (RFC 6960 "
                              "A.1); send it with POST instead");
      return ocsp_answer(req, h_.ocsp(*der));
    }
    return error_response(req, http::status::method_not_allowed,
                          "use POST /ocsp (application/ocsp-request) or GET /ocsp/BASE64");
  }
  if (path == "/cmp" && h_.cmp) {
    if (!post)
      return error_response(req, http::status::method_not_allowed,
                            "use POST /cmp with an application/pkixcmp body (RFC 6712)");
    auto reply = h_.cmp(body_bytes(req));
    return binary_response(req, static_cast<http::status>(reply.http_status), reply.body,
                           reply.content_type);
  }
  return std::nullopt;
}

// ---- enrollment over HTTPS ------------------------------------------------------------------

namespace {

Result<json> parse_body(const Request& req) {
  json j = json::parse(req.body(), nullptr, false);
  if (j.is_discarded() || !j.is_object())
    return make_error(ErrorCode::kInvalidArgument, "the request body must be a JSON object");
  return j;
}

Result<std::string> string_field(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_string() || it->get_ref<const std::string&>().empty())
    return make_error(ErrorCode::kInvalidArgument,
                      std::string("\"") + key + "\" (a non-empty string) is required");
  return it->get<std::string>();
}

// The CSR, once its self-signature has been checked with its own key (proof of possession).
// Parsed once: its key and its SubjectPublicKeyInfo go to the service as they are.
Result<ossl::X509ReqPtr> verified_csr(const std::string& pem, std::string* subject) {
  ossl::BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  ossl::X509ReqPtr csr(PEM_read_bio_X509_REQ(bio.get(), nullptr, nullptr, nullptr));
  if (!csr) {
    ossl::drain_errors();
    return make_error(ErrorCode::kInvalidArgument,
                      "\"csr\" is not a PEM certificate request (-----BEGIN CERTIFICATE "
                      "REQUEST-----)");
  }
  EVP_PKEY* key = X509_REQ_get0_pubkey(csr.get());
  if (key == nullptr || X509_REQ_verify(csr.get(), key) != 1) {
    ossl::drain_errors();
    return make_error(ErrorCode::kInvalidArgument,
                      "the certificate request's signature does not verify with its own key; "
                      "make the request again with the private key");
  }
  *subject = ca::name_to_string(X509_REQ_get_subject_name(csr.get()));
  return csr;
}

// CSR_OWNER keeps the request alive while the service uses its key.
Result<enroll::SigningRequest> signing_request(const json& j, ossl::X509ReqPtr& csr_owner) {
  KMSD_ASSIGN_OR_RETURN(auto pem, string_field(j, "csr"));
  enroll::SigningRequest r;
  KMSD_ASSIGN_OR_RETURN(csr_owner, verified_csr(pem, &r.requested_subject));
  r.public_key = X509_REQ_get0_pubkey(csr_owner.get());
  r.public_key_info = X509_REQ_get_X509_PUBKEY(csr_owner.get());
  if (auto it = j.find("x509_version"); it != j.end()) {
    if (!it->is_number_integer())
      return make_error(ErrorCode::kInvalidArgument, "\"x509_version\" must be 1 or 3");
    r.x509_version = it->get<int>();
  }
  if (auto it = j.find("validity_days"); it != j.end()) {
    if (!it->is_number_integer() || it->get<long long>() < 1 || it->get<long long>() > 36500)
      return make_error(ErrorCode::kInvalidArgument,
                        "\"validity_days\" must be a whole number of days from 1 to 36500");
    r.validity = std::chrono::days(it->get<long long>());
  }
  r.channel = "rest";
  return r;
}

// PKCS#8 PEM straight from the PKCS#8 DER the service holds: nothing decoded or re-encoded.
// In a cleansing memory BIO, and out as SecretBytes, as the key it is.
Result<SecretBytes> pkcs8_pem(const SecretBytes& der) {
  ossl::BioPtr bio(BIO_new(BIO_s_secmem()));
  if (!bio || PEM_write_bio(bio.get(), PEM_STRING_PKCS8INF, "", der.data(),
                            static_cast<long>(der.size())) <= 0)
    return ossl::crypto_error("writing an escrowed key as PEM");
  char* p = nullptr;
  long n = BIO_get_mem_data(bio.get(), &p);
  return SecretBytes(reinterpret_cast<const std::uint8_t*>(p), static_cast<std::size_t>(n));
}

}  // namespace

Result<SecretJson> delivered_keys_json(const std::vector<enroll::DeliveredKey>& keys) {
  SecretJson out = SecretJson::array();
  for (const auto& k : keys) {
    KMSD_ASSIGN_OR_RETURN(auto cert, ossl::x509_to_pem(k.certificate.get()));
    // PKCS#8 PEM of the escrowed key: the client puts it in the user's PKCS#12 at once.
    KMSD_ASSIGN_OR_RETURN(auto pem, pkcs8_pem(k.pkcs8_der));
    out.push_back(SecretJson{{"version", k.version},
                             {"key_id", k.key_id},
                             {"algorithm", k.algorithm},
                             {"certificate", cert},
                             {"private_key", SecretString(pem.view())}});
  }
  return out;
}

namespace {

Result<SecretJson> enrollment_json(const enroll::Enrollment& e) {
  SecretJson j{{"user", e.user_id}, {"recovered", e.recovered}};
  KMSD_ASSIGN_OR_RETURN(auto sign, ossl::x509_to_pem(e.signing_certificate.get()));
  KMSD_ASSIGN_OR_RETURN(auto enc, ossl::x509_to_pem(e.encryption_certificate.get()));
  j["signing_certificate"] = sign;
  j["encryption_certificate"] = enc;
  KMSD_ASSIGN_OR_RETURN(j["keys"], delivered_keys_json(e.keys));
  return j;
}

Response answer(const Request& req, const Result<SecretJson>& r) {
  if (!r.ok()) return error_from(req, r.error());
  return secret_json_response(req, *r);
}

}  // namespace

bool EnrollRoutes::owns(const Request& req) {
  return path_only(req).rfind("/enroll/", 0) == 0;
}

Response EnrollRoutes::handle(const Request& req, const Peer& peer) const {
  const std::string path = path_only(req);
  auto need = [&](http::verb v, const char* name) -> std::optional<Response> {
    if (req.method() == v) return std::nullopt;
    auto res = error_response(req, http::status::method_not_allowed,
                              std::string("method not allowed; use ") + name);
    res.set(http::field::allow, name);
    return res;
  };
  auto holder_cert = [&]() -> X509* { return peer.tls ? peer.client_cert.get() : nullptr; };
  auto no_cert = [&]() {
    auto res = error_response(req, http::status::unauthorized,
                              "present your signing certificate from kmsd as the TLS client "
                              "certificate (kmsctl: --cert and --key)");
    res.set(http::field::www_authenticate, "Mutual-TLS");
    return res;
  };

  if (path == "/enroll/v1/enroll") {
    if (auto r = need(http::verb::post, "POST")) return *r;
    auto body = parse_body(req);
    if (!body.ok()) return error_from(req, body.error());
    auto user = string_field(*body, "user");
    if (!user.ok()) return error_from(req, user.error());
    auto token_text = string_field(*body, "token");
    if (!token_text.ok()) return error_from(req, token_text.error());
    SecretBytes token = SecretBytes::from_string(*token_text);
    ossl::X509ReqPtr csr;
    auto sreq = signing_request(*body, csr);
    if (!sreq.ok()) return error_from(req, sreq.error());
    auto e = service_.enroll(*user, token, *sreq);
    if (!e.ok()) return error_from(req, e.error());
    return answer(req, enrollment_json(*e));
  }
  if (path == "/enroll/v1/renew") {
    if (auto r = need(http::verb::post, "POST")) return *r;
    if (holder_cert() == nullptr) return no_cert();
    auto body = parse_body(req);
    if (!body.ok()) return error_from(req, body.error());
    ossl::X509ReqPtr csr;
    auto sreq = signing_request(*body, csr);
    if (!sreq.ok()) return error_from(req, sreq.error());
    auto e = service_.renew(holder_cert(), *sreq);
    if (!e.ok()) return error_from(req, e.error());
    return answer(req, enrollment_json(*e));
  }
  if (path == "/enroll/v1/keys") {
    if (auto r = need(http::verb::get, "GET")) return *r;
    if (holder_cert() == nullptr) return no_cert();
    auto holder = service_.holder_of(holder_cert());
    if (!holder.ok()) return error_from(req, holder.error());
    auto keys = service_.keys_for(holder_cert());
    if (!keys.ok()) return error_from(req, keys.error());
    auto kj = delivered_keys_json(*keys);
    if (!kj.ok()) return error_from(req, kj.error());
    return answer(req, SecretJson{{"user", holder->user_id}, {"keys", std::move(*kj)}});
  }
  return error_response(req, http::status::not_found, "no such resource: " + path);
}

}  // namespace kmsd::api

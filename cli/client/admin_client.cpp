#include "cli/client/admin_client.hpp"

#include <poll.h>

#include <openssl/pem.h>
#include <openssl/pkcs12.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <chrono>
#include <optional>

#include "common/files.hpp"
#include "common/ossl.hpp"

namespace kmsd::client {

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
namespace ssl = net::ssl;
using tcp = net::ip::tcp;

std::string Reply::error_text() const {
  auto j = json();
  if (j.is_object() && j.contains("error") && j["error"].is_string())
    return j["error"].get<std::string>();
  return "HTTP " + std::to_string(status);
}

struct AdminClient::Impl {
  ClientOptions opts;
  std::string host, port;
  net::io_context ioc;
  ssl::context ctx{ssl::context::tls_client};
  std::optional<beast::ssl_stream<beast::tcp_stream>> stream;
  beast::flat_buffer buffer;

  Status open() {
    stream.emplace(ioc, ctx);
    if (!SSL_set_tlsext_host_name(stream->native_handle(), host.c_str()))
      return ossl::crypto_error("setting the TLS server name");
    stream->set_verify_callback(ssl::host_name_verification(host));
    beast::error_code ec;
    tcp::resolver resolver(ioc);
    auto results = resolver.resolve(host, port, ec);
    if (ec)
      return make_error(ErrorCode::kUnavailable, "cannot resolve " + host + ": " + ec.message());
    beast::get_lowest_layer(*stream).expires_after(opts.timeout);
    beast::get_lowest_layer(*stream).connect(results, ec);
    if (ec)
      return make_error(ErrorCode::kUnavailable, "cannot connect to " + opts.server + ": " +
                                                     ec.message() +
                                                     "; is kmsd running and unsealed?");
    stream->handshake(ssl::stream_base::client, ec);
    if (ec) {
      std::string why = ec.message();
      long v = SSL_get_verify_result(stream->native_handle());
      if (v != X509_V_OK) why = X509_verify_cert_error_string(v);
      return make_error(ErrorCode::kUnavailable,
                        "TLS with " + opts.server + " failed: " + why +
                            " (is --ca the KMS CA certificate, and the host name one of the "
                            "server's tls_names?)");
    }
    buffer.clear();
    return {};
  }

  // A kept-alive connection the server has closed while it sat idle (kmsd drops idle
  // connections after [server] header_timeout_seconds, at least 1 s) reads as readable: EOF
  // or a TLS close_notify. Such a connection is not reused: a request sent on it would be
  // lost before reaching kmsd, and a POST must not be retried blindly. Only a connection idle
  // for a second is looked at: TLS 1.3 session tickets may also wait unread on a fresh one.
  std::chrono::steady_clock::time_point last_used{};
  bool closed_by_server() {
    if (std::chrono::steady_clock::now() - last_used < std::chrono::seconds(1)) return false;
    pollfd p{beast::get_lowest_layer(*stream).socket().native_handle(), POLLIN, 0};
    return ::poll(&p, 1, 0) != 0;
  }

  Result<Reply> once(http::verb verb, const std::string& target, const std::string& body,
                     const std::string& content_type = "application/json") {
    if (stream && closed_by_server()) stream.reset();
    if (!stream) KMSD_TRY(open());
    http::request<http::string_body> req{verb, target, 11};
    req.set(http::field::host, host);
    req.set(http::field::user_agent, "kmsctl");
    req.keep_alive(true);
    if (!body.empty()) {
      req.set(http::field::content_type, content_type);
      req.body() = body;
    }
    req.prepare_payload();
    beast::error_code ec;
    beast::get_lowest_layer(*stream).expires_after(opts.timeout);
    http::write(*stream, req, ec);
    http::response_parser<http::string_body> parser;
    parser.body_limit(256u << 20);
    if (!ec) http::read(*stream, buffer, parser, ec);
    if (ec) {
      stream.reset();
      return make_error(ErrorCode::kUnavailable,
                        "request to " + opts.server + target + " failed: " + ec.message());
    }
    auto res = parser.release();
    last_used = std::chrono::steady_clock::now();
    if (!res.keep_alive()) stream.reset();
    return Reply{static_cast<int>(res.result_int()), std::move(res.body())};
  }

  Result<Reply> call(http::verb verb, const std::string& target, const std::string& body,
                     const std::string& content_type = "application/json") {
    const bool reused = stream.has_value();
    auto r = once(verb, target, body, content_type);
    // A kept-alive connection the server closed meanwhile: one fresh attempt, for GET only —
    // a POST may have reached the server, and changes must never be applied twice.
    if (!r.ok() && reused && verb == http::verb::get && r.error().code == ErrorCode::kUnavailable)
      return once(verb, target, body);
    return r;
  }
};

Result<std::pair<ossl::EvpPkeyPtr, ossl::X509Ptr>> read_pkcs12(const std::filesystem::path& file,
                                                               const SecretBytes& passphrase) {
  KMSD_ASSIGN_OR_RETURN(auto p12_text, files::read_text(file));
  const unsigned char* p = reinterpret_cast<const unsigned char*>(p12_text.data());
  ossl::Pkcs12Ptr p12(d2i_PKCS12(nullptr, &p, static_cast<long>(p12_text.size())));
  if (!p12) return ossl::crypto_error(file.string() + " is not a PKCS#12 file");
  std::string pass(passphrase.view());
  EVP_PKEY* key = nullptr;
  X509* cert = nullptr;
  STACK_OF(X509)* chain = nullptr;
  int parsed = PKCS12_parse(p12.get(), pass.c_str(), &key, &cert, &chain);
  secure_wipe(pass.data(), pass.size());
  ossl::EvpPkeyPtr key_owner(key);
  ossl::X509Ptr cert_owner(cert);
  ossl::X509StackPtr chain_owner(chain);
  if (parsed != 1 || !key || !cert) {
    ERR_clear_error();
    return make_error(ErrorCode::kUnauthenticated,
                      "cannot open " + file.string() + ": wrong passphrase or damaged file");
  }
  return std::make_pair(std::move(key_owner), std::move(cert_owner));
}

AdminClient::AdminClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
AdminClient::~AdminClient() = default;

Result<std::unique_ptr<AdminClient>> AdminClient::connect(ClientOptions options) {
  auto impl = std::make_unique<Impl>();
  const std::string prefix = "https://";
  if (options.server.rfind(prefix, 0) != 0)
    return make_error(
        ErrorCode::kInvalidArgument,
        "server '" + options.server + "' must be an https:// URL (the admin listener)");
  std::string rest = options.server.substr(prefix.size());
  if (auto slash = rest.find('/'); slash != std::string::npos) rest = rest.substr(0, slash);
  if (!rest.empty() && rest.front() == '[') {
    auto close = rest.find(']');
    if (close == std::string::npos)
      return make_error(ErrorCode::kInvalidArgument, "unterminated '[' in " + options.server);
    impl->host = rest.substr(1, close - 1);
    impl->port = close + 2 <= rest.size() ? rest.substr(close + 2) : "443";
  } else {
    auto colon = rest.rfind(':');
    impl->host = rest.substr(0, colon);
    impl->port = colon == std::string::npos ? "443" : rest.substr(colon + 1);
  }

  SSL_CTX* c = impl->ctx.native_handle();
  SSL_CTX_set_min_proto_version(c, TLS1_2_VERSION);
  KMSD_ASSIGN_OR_RETURN(auto ca_pem, files::read_text(options.ca_file));
  {
    ossl::BioPtr bio(BIO_new_mem_buf(ca_pem.data(), static_cast<int>(ca_pem.size())));
    int added = 0;
    while (X509* cert = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr)) {
      X509_STORE_add_cert(SSL_CTX_get_cert_store(c), cert);
      X509_free(cert);
      ++added;
    }
    ERR_clear_error();
    if (added == 0)
      return make_error(ErrorCode::kInvalidArgument,
                        options.ca_file.string() + " holds no PEM certificate");
  }
  // The KMS CA may be an intermediate: trusting it alone must be enough.
  X509_VERIFY_PARAM_set_flags(SSL_CTX_get0_param(c), X509_V_FLAG_PARTIAL_CHAIN);
  SSL_CTX_set_verify(c, SSL_VERIFY_PEER, nullptr);

  if (!options.p12.empty()) {
    KMSD_ASSIGN_OR_RETURN(auto pair, read_pkcs12(options.p12, options.p12_passphrase));
    options.client_key = std::move(pair.first);
    options.client_cert = std::move(pair.second);
  }
  if (options.client_cert && options.client_key &&
      (SSL_CTX_use_certificate(c, options.client_cert.get()) != 1 ||
       SSL_CTX_use_PrivateKey(c, options.client_key.get()) != 1))
    return ossl::crypto_error("using the client certificate");
  impl->opts = std::move(options);
  return std::unique_ptr<AdminClient>(new AdminClient(std::move(impl)));
}

Result<Reply> AdminClient::get(const std::string& target) {
  return impl_->call(http::verb::get, target, "");
}
Result<Reply> AdminClient::post(const std::string& target, const nlohmann::json& body) {
  return impl_->call(http::verb::post, target, body.dump());
}
Result<Reply> AdminClient::post_bytes(const std::string& target, const std::string& body,
                                      const std::string& content_type) {
  return impl_->call(http::verb::post, target, body, content_type);
}
Result<Reply> AdminClient::del(const std::string& target) {
  return impl_->call(http::verb::delete_, target, "");
}

}  // namespace kmsd::client

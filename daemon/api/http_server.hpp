// HTTP(S) listeners on Boost.Beast. Listeners and sessions only do I/O: every request is
// handed to the worker pool, where the handler (a plain function) runs, so no I/O thread
// ever waits on the token. Each read and write has a deadline; each parser a body limit;
// each request a deadline for its answer (a slow or hanging token never hangs a client).
#pragma once

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/beast/http.hpp>

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "common/ossl.hpp"
#include "common/result.hpp"

namespace kmsd::api {

namespace http = boost::beast::http;
using Request = http::request<http::string_body>;
using Response = http::response<http::string_body>;

// What the listener knows about the peer.
struct Peer {
  std::string address;  // "127.0.0.1:53211"
  bool tls = false;
  // TLS listeners ask for a client certificate but let the handshake finish without a valid
  // one, so that the handler can answer 401 in words instead of a bare handshake failure.
  ossl::X509Ptr client_cert;          // presented certificate, if any
  bool client_cert_verified = false;  // chains to the KMS CA and is within its validity
  std::string client_cert_error;      // why verification failed, "" if it did not
};

// Runs on a worker thread. Must not throw (exceptions become 500).
using Handler = std::function<Response(const Request&, const Peer&)>;

// Current TLS context, or nullptr to refuse connections (e.g. while sealed).
using TlsProvider = std::function<std::shared_ptr<boost::asio::ssl::context>()>;

struct ServerOptions {
  std::size_t max_body_bytes = 1 << 20;
  std::size_t max_header_bytes = 16 * 1024;
  std::chrono::seconds timeout{30};  // each read and write
  std::string name = "public";       // for logs
  // Answer deadline of each request, from the moment it was read; 0 means TIMEOUT. A request
  // still waiting for a worker then gets 503 and is never run; one whose handler is still
  // running gets 504 (its outcome is unknown) and the connection is closed. Both carry
  // Retry-After.
  std::chrono::milliseconds deadline{0};
};

class HttpServer {
 public:
  // Binds ENDPOINT ("host", port); TLS when TLS is set. Port 0 picks a free port.
  static Result<std::shared_ptr<HttpServer>> listen(boost::asio::io_context& ioc,
                                                    const std::string& host, std::uint16_t port,
                                                    Handler handler, ServerOptions options,
                                                    boost::asio::thread_pool& workers,
                                                    TlsProvider tls = nullptr);
  void start();
  void stop();
  std::uint16_t port() const;

  struct Impl;
  explicit HttpServer(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

 private:
  std::shared_ptr<Impl> impl_;
};

// Response helpers used by handlers.
Response json_response(const Request& req, http::status status, std::string body);
Response text_response(const Request& req, http::status status, std::string body,
                       const std::string& content_type = "text/plain; charset=utf-8");
// {"error": MESSAGE} with STATUS.
Response error_response(const Request& req, http::status status, const std::string& message);

// Builds a server TLS context: TLS 1.2+, the given certificate and key, client certificates
// required and verified against CA.
Result<std::shared_ptr<boost::asio::ssl::context>> make_mtls_context(X509* server_cert,
                                                                     EVP_PKEY* server_key,
                                                                     X509* ca_cert);

}  // namespace kmsd::api

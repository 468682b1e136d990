// HTTP(S) listeners on Boost.Beast. Listeners and sessions only do I/O: every request is
// handed to the worker pool, where the handler (a plain function) runs, so no I/O thread
// ever waits on the token. Each read and write has a deadline; each parser a body limit;
// each request a deadline for its answer (a slow or hanging token never hangs a client).
// Hostile clients: a header and a body size limit (431, 413), a deadline to send the header
// and one to send the body (a slowloris client is disconnected; it never holds a thread),
// connections per client address, and an admission hook (rate limits: 429 + Retry-After)
// that refuses a request before it takes a worker.
#pragma once

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/beast/http.hpp>

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
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

// Why a connection or request was refused without reaching a handler (metrics, logs).
enum class Refusal {
  kHeaderTooLarge,   // 431
  kBodyTooLarge,     // 413
  kHeaderTimeout,    // the header did not arrive within header_timeout: disconnected
  kIdleTimeout,      // no byte of a next request within header_timeout: closed
  kBodyTimeout,      // the body did not arrive within body_timeout: disconnected
  kConnectionLimit,  // max_connections_per_source reached: closed at accept
  kAdmission,        // the admit hook answered (rate limit: 429)
  kDeadlineQueued,   // 503: no worker before the deadline
  kDeadlineRunning,  // 504: the handler overran the deadline
};
const char* to_string(Refusal r) noexcept;  // "header_too_large", ...

struct ServerOptions {
  std::size_t max_body_bytes = 1 << 20;
  std::size_t max_header_bytes = 16 * 1024;
  std::chrono::seconds timeout{30};  // each write, and the TLS handshake
  std::string name = "public";       // for logs
  // Answer deadline of each request, from the moment it was read; 0 means TIMEOUT. A request
  // still waiting for a worker then gets 503 and is never run; one whose handler is still
  // running gets 504 (its outcome is unknown) and the connection is closed. Both carry
  // Retry-After.
  std::chrono::milliseconds deadline{0};
  // Long administrator calls (bulk enable, whole reports, audit verify): IS_LONG picks them;
  // they get LONG_DEADLINE (0 = DEADLINE) and, when LONG_WORKERS is set, run there instead of
  // on the shared workers, so a few administrators reading reports cannot hold every worker
  // while OCSP and enrollment wait.
  std::function<bool(const Request&)> is_long{};
  std::chrono::milliseconds long_deadline{0};
  boost::asio::thread_pool* long_workers = nullptr;
  // A larger body limit for some requests (administrators' uploads: a backup to check, a DR
  // message), decided from the header and the peer once the header is read: IS_UPLOAD picks
  // them, they may carry up to MAX_UPLOAD_BYTES (named UPLOAD_SETTING in the 413 message), and
  // their body gets LONG_DEADLINE (if longer) instead of BODY_TIMEOUT.
  std::function<bool(const Request& header, const struct Peer& peer)> is_upload{};
  std::size_t max_upload_bytes = 0;
  std::string upload_setting = "the upload limit";
  // Time to send the whole header, from the moment the server waits for it (after connecting
  // or after the previous answer), and then the body. A client slower than that is dropped.
  std::chrono::seconds header_timeout{10};
  std::chrono::seconds body_timeout{30};
  // Open connections per client address (0: any); more are closed at accept.
  std::size_t max_connections_per_source = 0;
  // Runs on the I/O thread once a request is read, before it takes a worker: nullopt admits
  // it, a response refuses it (sent as is; e.g. 429 with Retry-After). Must be quick.
  std::function<std::optional<Response>(const Request&, const struct Peer&)> admit{};
  // Told of every answer sent (REQ null when the request could not be parsed: 413/431), with
  // its status and seconds from the end of the read to the answer being queued for writing.
  std::function<void(const Request* req, unsigned status, double seconds)> on_answer{};
  // Told of every refusal (also those answered: they reach on_answer too).
  std::function<void(Refusal)> on_refusal{};
};

// Token buckets keyed by a string (a client address, a user id): RATE_PER_MINUTE requests a
// minute on average, bursts of up to BURST. Thread-safe. Memory is bounded: buckets that have
// refilled are forgotten when there are more than MAX_KEYS.
class RateLimiter {
 public:
  RateLimiter(unsigned rate_per_minute, unsigned burst, std::size_t max_keys = 100000);
  // Takes one request for KEY: nullopt when allowed, else the seconds until one is (>= 1).
  std::optional<unsigned> take(const std::string& key);
  unsigned rate_per_minute() const { return rate_; }

 private:
  struct Bucket {
    double tokens;
    std::chrono::steady_clock::time_point at;
  };
  unsigned rate_;
  double burst_;
  std::size_t max_keys_;
  std::mutex mu_;
  std::map<std::string, Bucket> buckets_;
};

// "127.0.0.1" of "127.0.0.1:5321", "::1" of "[::1]:5321" or "::1:5321".
std::string address_of(const std::string& peer_address);

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
  // Connections open now (metrics).
  std::size_t open_connections() const;

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

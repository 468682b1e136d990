#include "daemon/api/http_server.hpp"

#include "common/secret.hpp"

#include <spdlog/spdlog.h>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/ssl.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <limits>
#include <atomic>
#include <cmath>

namespace kmsd::api {

namespace beast = boost::beast;
namespace net = boost::asio;
using tcp = net::ip::tcp;

struct HttpServer::Impl : std::enable_shared_from_this<HttpServer::Impl> {
  Impl(net::io_context& io, Handler h, ServerOptions o, net::thread_pool& w, TlsProvider t)
      : ioc(io),
        acceptor(net::make_strand(io)),
        handler(std::move(h)),
        opts(std::move(o)),
        workers(w),
        tls(std::move(t)) {}

  net::io_context& ioc;
  tcp::acceptor acceptor;
  Handler handler;
  ServerOptions opts;
  net::thread_pool& workers;
  TlsProvider tls;

  // Open connections, per client address and in all.
  mutable std::mutex conn_mu;
  std::map<std::string, std::size_t> per_source;
  std::size_t open = 0;
  std::atomic<std::int64_t> last_limit_log{0};

  void do_accept();
  void on_accept(beast::error_code ec, tcp::socket socket);
  void refused(Refusal r) {
    if (opts.on_refusal) opts.on_refusal(r);
  }
};

namespace {

// One open connection, counted against its client address while it lives.
class ConnectionSlot {
 public:
  // Null when ADDRESS already holds the maximum.
  static std::unique_ptr<ConnectionSlot> take(std::shared_ptr<HttpServer::Impl> server,
                                              const std::string& address) {
    std::lock_guard lock(server->conn_mu);
    std::size_t& n = server->per_source[address];
    const std::size_t max = server->opts.max_connections_per_source;
    if (max != 0 && n >= max) {
      if (n == 0) server->per_source.erase(address);
      return nullptr;
    }
    ++n;
    ++server->open;
    return std::unique_ptr<ConnectionSlot>(new ConnectionSlot(std::move(server), address));
  }
  ~ConnectionSlot() {
    std::lock_guard lock(server_->conn_mu);
    --server_->open;
    auto it = server_->per_source.find(address_);
    if (it != server_->per_source.end() && --it->second == 0) server_->per_source.erase(it);
  }
  ConnectionSlot(const ConnectionSlot&) = delete;
  ConnectionSlot& operator=(const ConnectionSlot&) = delete;

 private:
  ConnectionSlot(std::shared_ptr<HttpServer::Impl> s, std::string a)
      : server_(std::move(s)), address_(std::move(a)) {}
  std::shared_ptr<HttpServer::Impl> server_;
  std::string address_;
};

}  // namespace

namespace {

std::string endpoint_text(const tcp::socket& s) {
  beast::error_code ec;
  auto ep = s.remote_endpoint(ec);
  if (ec) return "?";
  return ep.address().to_string() + ":" + std::to_string(ep.port());
}

Response run_handler(HttpServer::Impl& server, const Request& req, const Peer& peer) {
  try {
    return server.handler(req, peer);
  } catch (const std::exception& e) {
    spdlog::error("{} listener: handler for {} failed: {}", server.opts.name,
                  std::string(req.target()), e.what());
    return error_response(req, http::status::internal_server_error,
                          "internal error; the daemon log has details");
  }
}

// One request between its read and its answer: whoever moves it out of its current phase
// first (the worker starting or finishing it, or the deadline) decides what is sent.
class RequestClock {
 public:
  enum Phase : int { kQueued, kRunning, kAnswered };
  bool start() { return advance(kQueued, kRunning); }
  bool finish() { return advance(kRunning, kAnswered); }
  // At the deadline: the phase the request was in, and it is answered from now on.
  Phase expire() {
    int p = phase_.load();
    while (p != kAnswered && !phase_.compare_exchange_weak(p, kAnswered)) {
    }
    return static_cast<Phase>(p);
  }

 private:
  bool advance(int from, int to) { return phase_.compare_exchange_strong(from, to); }
  std::atomic<int> phase_{kQueued};
};

std::string seconds_text(std::chrono::milliseconds d) {
  auto ms = d.count();
  if (ms % 1000 == 0) return std::to_string(ms / 1000) + " s";
  return std::to_string(ms) + " ms";
}

// Shared read / dispatch / write loop of plain and TLS sessions.
template <class Derived>
class Session {
 public:
  Session(std::shared_ptr<HttpServer::Impl> server, std::unique_ptr<ConnectionSlot> slot)
      : server_(std::move(server)), slot_(std::move(slot)) {}
  ~Session() { wipe_response(); }

 protected:
  using Clock = std::chrono::steady_clock;
  Derived& derived() { return static_cast<Derived&>(*this); }

  // The header first, under header_timeout (counted from now: an idle keep-alive connection
  // and a slowloris client are the same to us), then the body under body_timeout.
  void do_read() {
    parser_.emplace();
    // No limit until the header says what the request is: on_header checks Content-Length
    // against the limit that applies and sets it for a chunked body.
    body_limit_ = server_->opts.max_body_bytes;
    parser_->body_limit(std::numeric_limits<std::uint64_t>::max());
    parser_->header_limit(static_cast<std::uint32_t>(server_->opts.max_header_bytes));
    beast::get_lowest_layer(derived().stream()).expires_after(server_->opts.header_timeout);
    http::async_read_header(
        derived().stream(), buffer_, *parser_,
        beast::bind_front_handler(&Session::on_header, derived().shared_from_this()));
  }

  void on_header(beast::error_code ec, std::size_t) {
    if (ec) return on_read_error(ec, true);
    auto body_timeout = server_->opts.body_timeout;
    if (server_->opts.is_upload && server_->opts.is_upload(parser_->get(), peer_)) {
      body_limit_ = server_->opts.max_upload_bytes;
      body_timeout = std::max<std::chrono::seconds>(
          body_timeout,
          std::chrono::duration_cast<std::chrono::seconds>(server_->opts.long_deadline));
    }
    if (auto length = parser_->content_length(); length && *length > body_limit_)
      return on_read_error(http::error::body_limit, false);
    if (parser_->is_done()) return on_request();
    parser_->body_limit(body_limit_);  // a chunked body is counted as it arrives
    beast::get_lowest_layer(derived().stream()).expires_after(body_timeout);
    http::async_read(derived().stream(), buffer_, *parser_,
                     beast::bind_front_handler(&Session::on_body, derived().shared_from_this()));
  }

  void on_body(beast::error_code ec, std::size_t) {
    if (ec) return on_read_error(ec, false);
    on_request();
  }

  void on_read_error(beast::error_code ec, bool in_header) {
    if (ec == http::error::end_of_stream) return derived().do_eof();
    if (ec == http::error::body_limit || ec == http::error::header_limit) {
      bool body = ec == http::error::body_limit;
      server_->refused(body ? Refusal::kBodyTooLarge : Refusal::kHeaderTooLarge);
      spdlog::warn("{} listener: {} refused: {} too large", server_->opts.name, peer_.address,
                   body ? "body" : "header");
      Request dummy;
      dummy.version(11);
      auto res = error_response(
          dummy,
          body ? http::status::payload_too_large : http::status::request_header_fields_too_large,
          body ? "the request body exceeds " + std::to_string(body_limit_) + " bytes (" +
                     (body_limit_ == server_->opts.max_body_bytes
                          ? std::string("server.max_body_bytes")
                          : server_->opts.upload_setting) +
                     "); send a smaller one"
               : "the request line and headers exceed " +
                     std::to_string(server_->opts.max_header_bytes) +
                     " bytes (server.max_header_bytes); send fewer or shorter headers");
      res.keep_alive(false);
      return send(std::move(res), nullptr, Clock::now());
    }
    if (ec == beast::error::timeout) {
      // A connection idle between requests is closed the same way, and is not news.
      const bool idle = in_header && !parser_->got_some() && buffer_.size() == 0;
      server_->refused(idle        ? Refusal::kIdleTimeout
                       : in_header ? Refusal::kHeaderTimeout
                                   : Refusal::kBodyTimeout);
      if (!idle)
        spdlog::info(
            "{} listener: {} disconnected: its request {} did not arrive within {} s",
            server_->opts.name, peer_.address, in_header ? "header" : "body",
            (in_header ? server_->opts.header_timeout : server_->opts.body_timeout).count());
    }
    // timeout, reset, garbage: drop the connection
  }

  void on_request() {
    auto self = derived().shared_from_this();
    auto clock = std::make_shared<RequestClock>();
    auto req = std::make_shared<Request>(parser_->release());
    const auto t0 = Clock::now();
    beast::get_lowest_layer(derived().stream()).expires_never();  // the deadline timer rules
    if (server_->opts.admit) {
      if (auto refusal = server_->opts.admit(*req, peer_)) {
        server_->refused(Refusal::kAdmission);
        refusal->keep_alive(req->keep_alive() && refusal->keep_alive());
        return send(std::move(*refusal), req, t0);
      }
    }
    auto deadline = server_->opts.deadline.count() > 0
                        ? server_->opts.deadline
                        : std::chrono::milliseconds(server_->opts.timeout);
    const bool is_long = server_->opts.is_long && server_->opts.is_long(*req);
    if (is_long && server_->opts.long_deadline.count() > 0) deadline = server_->opts.long_deadline;
    auto timer = std::make_shared<net::steady_timer>(derived().stream().get_executor());
    timer->expires_after(deadline);
    timer->async_wait([self, clock, req, deadline, t0](beast::error_code tec) {
      if (tec) return;  // cancelled: answered in time
      self->on_deadline(*clock, req, deadline, t0);
    });
    auto& workers =
        is_long && server_->opts.long_workers ? *server_->opts.long_workers : server_->workers;
    net::post(workers, [self, clock, req, timer, t0]() {
      if (!clock->start()) return;  // the deadline answered it while it waited: never run
      Response res = run_handler(*self->server_, *req, self->peer_);
      secure_wipe(req->body().data(), req->body().size());
      res.keep_alive(req->keep_alive() && res.keep_alive());
      if (!clock->finish()) {
        spdlog::warn(
            "{} listener: {} {} from {} finished after its deadline; its answer was "
            "504 and this result was discarded",
            self->server_->opts.name, std::string(req->method_string()), std::string(req->target()),
            self->peer_.address);
        return;
      }
      net::post(self->stream().get_executor(),
                [self, timer, req, t0, res = std::move(res)]() mutable {
                  timer->cancel();
                  self->send(std::move(res), req, t0);
                });
    });
  }

  // Runs on the session's strand when a request's deadline passes before its answer.
  void on_deadline(RequestClock& clock, const std::shared_ptr<Request>& req_ptr,
                   std::chrono::milliseconds deadline, Clock::time_point t0) {
    const RequestClock::Phase was = clock.expire();
    if (was == RequestClock::kAnswered) return;
    const Request& req = *req_ptr;
    const std::string what = std::string(req.method_string()) + " " + std::string(req.target());
    Response res;
    server_->refused(was == RequestClock::kQueued ? Refusal::kDeadlineQueued
                                                  : Refusal::kDeadlineRunning);
    if (was == RequestClock::kQueued) {
      spdlog::warn("{} listener: {} from {} waited {} for a worker; answered 503, not run",
                   server_->opts.name, what, peer_.address, seconds_text(deadline));
      res = error_response(req, http::status::service_unavailable,
                           "kmsd is busy (the key token may be slow or unavailable): the request "
                           "waited " +
                               seconds_text(deadline) +
                               " without being started and was not run; retry later");
    } else {
      spdlog::warn("{} listener: {} from {} still running after {}; answered 504",
                   server_->opts.name, what, peer_.address, seconds_text(deadline));
      res = error_response(req, http::status::gateway_timeout,
                           "the request did not finish within " + seconds_text(deadline) +
                               " (the key token may be slow or unavailable); it may still "
                               "complete: check its outcome before retrying");
    }
    res.set(http::field::retry_after, "5");
    res.keep_alive(false);  // the late handler must not race a next request on this stream
    send(std::move(res), req_ptr, t0);
  }

  void send(Response res, const std::shared_ptr<Request>& req, Clock::time_point t0) {
    if (server_->opts.on_answer)
      server_->opts.on_answer(req.get(), res.result_int(),
                              std::chrono::duration<double>(Clock::now() - t0).count());
    res_ = std::make_shared<Response>(std::move(res));
    res_->prepare_payload();
    beast::get_lowest_layer(derived().stream()).expires_after(server_->opts.timeout);
    http::async_write(derived().stream(), *res_,
                      beast::bind_front_handler(&Session::on_write, derived().shared_from_this(),
                                                res_->need_eof()));
  }

  // Bodies may carry secrets (escrowed keys on their way out, one-time tokens and
  // passphrases on their way in): both are wiped once they are no longer needed.
  void wipe_response() noexcept {
    if (res_) secure_wipe(res_->body().data(), res_->body().size());
    res_.reset();
  }

  void on_write(bool close, beast::error_code ec, std::size_t) {
    wipe_response();
    if (ec) return;
    if (close) return derived().do_eof();
    do_read();
  }

  std::shared_ptr<HttpServer::Impl> server_;
  std::unique_ptr<ConnectionSlot> slot_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  std::size_t body_limit_ = 0;  // of the request being read
  std::shared_ptr<Response> res_;
  Peer peer_;
};

class PlainSession : public Session<PlainSession>,
                     public std::enable_shared_from_this<PlainSession> {
 public:
  PlainSession(tcp::socket&& socket, std::shared_ptr<HttpServer::Impl> server,
               std::unique_ptr<ConnectionSlot> slot)
      : Session(std::move(server), std::move(slot)), stream_(std::move(socket)) {
    peer_.address = endpoint_text(stream_.socket());
  }
  beast::tcp_stream& stream() { return stream_; }
  void run() {
    net::dispatch(stream_.get_executor(),
                  beast::bind_front_handler(&PlainSession::do_read, shared_from_this()));
  }
  void do_eof() {
    beast::error_code ec;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ec);
  }

 private:
  friend class Session<PlainSession>;
  beast::tcp_stream stream_;
};

class TlsSession : public Session<TlsSession>, public std::enable_shared_from_this<TlsSession> {
 public:
  TlsSession(tcp::socket&& socket, std::shared_ptr<net::ssl::context> ctx,
             std::shared_ptr<HttpServer::Impl> server, std::unique_ptr<ConnectionSlot> slot)
      : Session(std::move(server), std::move(slot)),
        ctx_(std::move(ctx)),
        stream_(std::move(socket), *ctx_) {
    peer_.address = endpoint_text(beast::get_lowest_layer(stream_).socket());
    peer_.tls = true;
  }
  beast::ssl_stream<beast::tcp_stream>& stream() { return stream_; }
  void run() {
    net::dispatch(stream_.get_executor(),
                  beast::bind_front_handler(&TlsSession::do_handshake, shared_from_this()));
  }
  void do_handshake() {
    // A client that never finishes its handshake is a slowloris too.
    beast::get_lowest_layer(stream_).expires_after(server_->opts.header_timeout);
    stream_.async_handshake(
        net::ssl::stream_base::server,
        beast::bind_front_handler(&TlsSession::on_handshake, shared_from_this()));
  }
  void on_handshake(beast::error_code ec) {
    if (ec) {
      if (ec == beast::error::timeout) server_->refused(Refusal::kHeaderTimeout);
      spdlog::info("{} listener: TLS handshake with {} failed: {}", server_->opts.name,
                   peer_.address,
                   ec == beast::error::timeout
                       ? "it did not arrive within " +
                             std::to_string(server_->opts.header_timeout.count()) + " s"
                       : ec.message());
      return;
    }
    SSL* ssl = stream_.native_handle();
    peer_.client_cert.reset(SSL_get1_peer_certificate(ssl));
    if (peer_.client_cert) {
      long v = SSL_get_verify_result(ssl);
      peer_.client_cert_verified = v == X509_V_OK;
      if (v != X509_V_OK) peer_.client_cert_error = X509_verify_cert_error_string(v);
    }
    do_read();
  }
  void do_eof() {
    beast::get_lowest_layer(stream_).expires_after(std::chrono::seconds(5));
    stream_.async_shutdown([self = shared_from_this()](beast::error_code) {});
  }

 private:
  friend class Session<TlsSession>;
  std::shared_ptr<net::ssl::context> ctx_;
  beast::ssl_stream<beast::tcp_stream> stream_;
};

}  // namespace

void HttpServer::Impl::do_accept() {
  acceptor.async_accept(net::make_strand(ioc),
                        beast::bind_front_handler(&Impl::on_accept, shared_from_this()));
}

void HttpServer::Impl::on_accept(beast::error_code ec, tcp::socket socket) {
  if (ec == net::error::operation_aborted || !acceptor.is_open()) return;
  if (ec) {
    spdlog::warn("{} listener: accept failed: {}", opts.name, ec.message());
    return do_accept();
  }
  const std::string peer = endpoint_text(socket);
  auto slot = ConnectionSlot::take(shared_from_this(), address_of(peer));
  if (!slot) {
    refused(Refusal::kConnectionLimit);
    // At most one line every 10 s: a flood must not flood the log too.
    const auto now = std::chrono::duration_cast<std::chrono::seconds>(
                         std::chrono::steady_clock::now().time_since_epoch())
                         .count();
    auto last = last_limit_log.load();
    if (now - last >= 10 && last_limit_log.compare_exchange_strong(last, now))
      spdlog::warn(
          "{} listener: connection from {} closed: that address already holds {} connections "
          "(server.max_connections_per_source)",
          opts.name, peer, opts.max_connections_per_source);
    beast::error_code ignored;
    socket.close(ignored);
  } else if (tls) {
    auto ctx = tls();
    if (!ctx) {
      spdlog::info("{} listener: connection from {} closed: kmsd is sealed", opts.name, peer);
      beast::error_code ignored;
      socket.close(ignored);
    } else {
      std::make_shared<TlsSession>(std::move(socket), std::move(ctx), shared_from_this(),
                                   std::move(slot))
          ->run();
    }
  } else {
    std::make_shared<PlainSession>(std::move(socket), shared_from_this(), std::move(slot))->run();
  }
  do_accept();
}

Result<std::shared_ptr<HttpServer>> HttpServer::listen(net::io_context& ioc,
                                                       const std::string& host, std::uint16_t port,
                                                       Handler handler, ServerOptions options,
                                                       net::thread_pool& workers, TlsProvider tls) {
  auto impl =
      std::make_shared<Impl>(ioc, std::move(handler), std::move(options), workers, std::move(tls));
  beast::error_code ec;
  tcp::resolver resolver(ioc);
  auto results = resolver.resolve(host, std::to_string(port), ec);
  if (ec || results.empty())
    return make_error(ErrorCode::kConfig,
                      "cannot resolve listen address " + host + ": " + ec.message());
  tcp::endpoint ep = results.begin()->endpoint();
  impl->acceptor.open(ep.protocol(), ec);
  if (!ec) impl->acceptor.set_option(net::socket_base::reuse_address(true), ec);
  if (!ec) impl->acceptor.bind(ep, ec);
  if (!ec) impl->acceptor.listen(net::socket_base::max_listen_connections, ec);
  if (ec)
    return make_error(ErrorCode::kIo, "cannot listen on " + host + ":" + std::to_string(port) +
                                          " (" + impl->opts.name + " listener): " + ec.message());
  return std::make_shared<HttpServer>(impl);
}

void HttpServer::start() {
  impl_->do_accept();
}

void HttpServer::stop() {
  net::post(impl_->acceptor.get_executor(), [impl = impl_] {
    beast::error_code ec;
    impl->acceptor.close(ec);
  });
}

std::uint16_t HttpServer::port() const {
  beast::error_code ec;
  return impl_->acceptor.local_endpoint(ec).port();
}

std::size_t HttpServer::open_connections() const {
  std::lock_guard lock(impl_->conn_mu);
  return impl_->open;
}

const char* to_string(Refusal r) noexcept {
  switch (r) {
    case Refusal::kHeaderTooLarge:
      return "header_too_large";
    case Refusal::kBodyTooLarge:
      return "body_too_large";
    case Refusal::kHeaderTimeout:
      return "header_timeout";
    case Refusal::kBodyTimeout:
      return "body_timeout";
    case Refusal::kIdleTimeout:
      return "idle_timeout";
    case Refusal::kConnectionLimit:
      return "connection_limit";
    case Refusal::kAdmission:
      return "rate_limited";
    case Refusal::kDeadlineQueued:
      return "deadline_queued";
    case Refusal::kDeadlineRunning:
      return "deadline_running";
  }
  return "unknown";
}

std::string address_of(const std::string& peer_address) {
  if (!peer_address.empty() && peer_address.front() == '[') {
    auto end = peer_address.find(']');
    return end == std::string::npos ? peer_address : peer_address.substr(1, end - 1);
  }
  auto colon = peer_address.rfind(':');
  return colon == std::string::npos ? peer_address : peer_address.substr(0, colon);
}

RateLimiter::RateLimiter(unsigned rate_per_minute, unsigned burst, std::size_t max_keys)
    : rate_(rate_per_minute),
      burst_(std::max(1u, burst)),
      max_keys_(std::max<std::size_t>(16, max_keys)) {}

std::optional<unsigned> RateLimiter::take(const std::string& key) {
  if (rate_ == 0) return std::nullopt;
  const auto now = std::chrono::steady_clock::now();
  const double per_second = rate_ / 60.0;
  std::lock_guard lock(mu_);
  auto it = buckets_.find(key);
  if (it == buckets_.end()) {
    if (buckets_.size() >= max_keys_) {
      // Forget the buckets that have refilled: they hold nothing a new one would not.
      for (auto b = buckets_.begin(); b != buckets_.end();) {
        const double t = b->second.tokens +
                         std::chrono::duration<double>(now - b->second.at).count() * per_second;
        b = t >= burst_ ? buckets_.erase(b) : std::next(b);
      }
      // Still full (a flood of distinct keys): start afresh rather than grow without bound.
      if (buckets_.size() >= max_keys_) buckets_.clear();
    }
    it = buckets_.emplace(key, Bucket{burst_, now}).first;
  }
  Bucket& b = it->second;
  b.tokens =
      std::min(burst_, b.tokens + std::chrono::duration<double>(now - b.at).count() * per_second);
  b.at = now;
  if (b.tokens >= 1.0) {
    b.tokens -= 1.0;
    return std::nullopt;
  }
  return static_cast<unsigned>(std::ceil((1.0 - b.tokens) / per_second));
}

Response text_response(const Request& req, http::status status, std::string body,
                       const std::string& content_type) {
  Response res{status, req.version()};
  res.set(http::field::server, "kmsd");
  res.set(http::field::content_type, content_type);
  res.set(http::field::cache_control, "no-store");
  res.keep_alive(req.keep_alive());
  res.body() = std::move(body);
  res.prepare_payload();
  return res;
}

Response json_response(const Request& req, http::status status, std::string body) {
  return text_response(req, status, std::move(body), "application/json");
}

Response error_response(const Request& req, http::status status, const std::string& message) {
  return json_response(req, status,
                       nlohmann::json{{"error", message}}.dump(
                           -1, ' ', false, nlohmann::json::error_handler_t::replace));
}

Result<std::shared_ptr<net::ssl::context>> make_mtls_context(X509* server_cert,
                                                             EVP_PKEY* server_key, X509* ca_cert) {
  auto ctx = std::make_shared<net::ssl::context>(net::ssl::context::tls_server);
  SSL_CTX* c = ctx->native_handle();
  SSL_CTX_set_min_proto_version(c, TLS1_2_VERSION);
  SSL_CTX_set_options(c, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE);
  if (SSL_CTX_use_certificate(c, server_cert) != 1 || SSL_CTX_use_PrivateKey(c, server_key) != 1 ||
      SSL_CTX_check_private_key(c) != 1 || SSL_CTX_add1_chain_cert(c, ca_cert) != 1)
    return ossl::crypto_error("configuring the admin listener's certificate");
  if (X509_STORE_add_cert(SSL_CTX_get_cert_store(c), ca_cert) != 1 ||
      SSL_CTX_add_client_CA(c, ca_cert) != 1)
    return ossl::crypto_error("trusting the KMS CA for client certificates");
  // The KMS CA may be an intermediate under an external root: it alone is the trust anchor
  // for client certificates, so the chain may stop there.
  X509_VERIFY_PARAM_set_flags(SSL_CTX_get0_param(c), X509_V_FLAG_PARTIAL_CHAIN);
  // Ask for a client certificate, let the handshake complete either way, judge in the handler.
  SSL_CTX_set_verify(c, SSL_VERIFY_PEER, [](int, X509_STORE_CTX*) { return 1; });
  return ctx;
}

}  // namespace kmsd::api

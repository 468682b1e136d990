// The listeners against slow and hostile clients, in process over real sockets: header and
// body size limits (431, 413), slowloris clients dropped at the header and body deadlines while
// a normal client is served, connections per address, the admission hook (429), the long-call
// deadline, and the rate limiter.
#include <arpa/inet.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/thread_pool.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "daemon/api/http_server.hpp"
#include "daemon/api/secret_json.hpp"

namespace kmsd::api {
namespace {

using ::testing::HasSubstr;
using namespace std::chrono_literals;

// A raw TCP client: sends bytes as the test says, reads what comes back.
class RawClient {
 public:
  explicit RawClient(std::uint16_t port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connected_ = ::connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  }
  ~RawClient() {
    if (fd_ >= 0) ::close(fd_);
  }
  RawClient(const RawClient&) = delete;
  RawClient& operator=(const RawClient&) = delete;
  bool connected() const { return connected_; }
  bool send(const std::string& s) {
    return ::send(fd_, s.data(), s.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(s.size());
  }
  // Everything until the peer closes or WITHIN passes.
  std::string read_all(std::chrono::milliseconds within = 10s) {
    std::string out;
    const auto end = std::chrono::steady_clock::now() + within;
    while (std::chrono::steady_clock::now() < end) {
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      char buf[4096];
      ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
      if (n <= 0) {
        closed_ = true;
        break;
      }
      out.append(buf, static_cast<std::size_t>(n));
    }
    return out;
  }
  // One response (up to the end of its body by Content-Length).
  std::string read_response(std::chrono::milliseconds within = 10s) {
    std::string out;
    const auto end = std::chrono::steady_clock::now() + within;
    while (std::chrono::steady_clock::now() < end) {
      auto hdr_end = out.find("\r\n\r\n");
      if (hdr_end != std::string::npos) {
        auto cl = out.find("Content-Length: ");
        std::size_t len = cl == std::string::npos ? 0 : std::stoul(out.substr(cl + 16));
        if (out.size() >= hdr_end + 4 + len) return out;
      }
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      char buf[4096];
      ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
      if (n <= 0) {
        closed_ = true;
        break;
      }
      out.append(buf, static_cast<std::size_t>(n));
    }
    return out;
  }
  // True once the server has closed the connection (waits at most WITHIN).
  bool closed_by_server(std::chrono::milliseconds within) {
    read_all(within);
    return closed_;
  }

 private:
  int fd_ = -1;
  bool connected_ = false;
  bool closed_ = false;
};

class HttpServerTest : public ::testing::Test {
 protected:
  void start(ServerOptions opts) {
    opts.on_refusal = [this](Refusal r) {
      std::lock_guard lock(mu_);
      refusals_.push_back(r);
    };
    auto s = HttpServer::listen(
        ioc_, "127.0.0.1", 0,
        [this](const Request& req, const Peer&) {
          ++handled_;
          std::string target(req.target());
          if (target == "/sleep") std::this_thread::sleep_for(1500ms);
          return text_response(req, http::status::ok, "hello " + target);
        },
        std::move(opts), workers_);
    ASSERT_TRUE(s.ok()) << s.error().message;
    server_ = *s;
    server_->start();
    io_ = std::thread([this] { ioc_.run(); });
  }
  void TearDown() override {
    if (server_) server_->stop();
    ioc_.stop();
    if (io_.joinable()) io_.join();
    workers_.join();
    long_workers_.join();
  }
  std::uint16_t port() const { return server_->port(); }
  int count(Refusal r) {
    std::lock_guard lock(mu_);
    return static_cast<int>(std::count(refusals_.begin(), refusals_.end(), r));
  }
  // A timed-out read is counted by its handler, which runs just after the timer closed the
  // socket: a client can see the close first. Waits (up to 5 s) for N such refusals.
  int count_once_settled(Refusal r, int n) {
    for (int i = 0; i < 250 && count(r) < n; ++i) std::this_thread::sleep_for(20ms);
    return count(r);
  }
  static ServerOptions small_options() {
    ServerOptions o;
    o.max_header_bytes = 1024;
    o.max_body_bytes = 2048;
    o.header_timeout = 1s;
    o.body_timeout = 1s;
    o.timeout = 5s;
    o.name = "test";
    return o;
  }
  static std::string get(const std::string& path) {
    return "GET " + path + " HTTP/1.1\r\nHost: x\r\n\r\n";
  }

  boost::asio::io_context ioc_;
  boost::asio::thread_pool workers_{2};
  boost::asio::thread_pool long_workers_{1};
  std::shared_ptr<HttpServer> server_;
  std::thread io_;
  std::atomic<int> handled_{0};
  std::mutex mu_;
  std::vector<Refusal> refusals_;
};

TEST_F(HttpServerTest, HeaderTooLargeIs431WithTheKeyToChange) {
  start(small_options());
  RawClient c(port());
  ASSERT_TRUE(c.connected());
  c.send("GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + std::string(2000, 'a') + "\r\n\r\n");
  const std::string res = c.read_response();
  EXPECT_THAT(res, HasSubstr("HTTP/1.1 431"));
  EXPECT_THAT(res, HasSubstr("server.max_header_bytes"));
  EXPECT_EQ(handled_, 0);
  EXPECT_EQ(count(Refusal::kHeaderTooLarge), 1);
}

TEST_F(HttpServerTest, UploadRoutesGetTheirOwnBodyLimit) {
  auto o = small_options();  // max_body_bytes 2048
  o.is_upload = [](const Request& req, const Peer&) { return req.target() == "/upload"; };
  o.max_upload_bytes = 8192;
  o.upload_setting = "the test's upload limit";
  start(o);
  auto post = [&](const std::string& path, std::size_t n) {
    RawClient c(port());
    c.send("POST " + path + " HTTP/1.1\r\nHost: x\r\nContent-Length: " + std::to_string(n) +
           "\r\n\r\n" + std::string(n, 'u'));
    return c.read_response();
  };
  EXPECT_THAT(post("/upload", 6000), HasSubstr("hello /upload"));
  const std::string other = post("/x", 6000);  // other paths keep max_body_bytes
  EXPECT_THAT(other, HasSubstr("HTTP/1.1 413"));
  EXPECT_THAT(other, HasSubstr("2048 bytes (server.max_body_bytes)"));
  const std::string big = post("/upload", 9000);
  EXPECT_THAT(big, HasSubstr("HTTP/1.1 413"));
  EXPECT_THAT(big, HasSubstr("8192 bytes (the test's upload limit)"));
  EXPECT_EQ(handled_, 1);
}

TEST_F(HttpServerTest, BodyTooLargeIs413WithTheKeyToChange) {
  start(small_options());
  RawClient c(port());
  c.send("POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + std::string(5000, 'b'));
  const std::string res = c.read_response();
  EXPECT_THAT(res, HasSubstr("HTTP/1.1 413"));
  EXPECT_THAT(res, HasSubstr("server.max_body_bytes"));
  EXPECT_EQ(handled_, 0);
  // At the limit is fine.
  RawClient ok(port());
  ok.send("POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2048\r\n\r\n" + std::string(2048, 'b'));
  EXPECT_THAT(ok.read_response(), HasSubstr("HTTP/1.1 200"));
}

TEST_F(HttpServerTest, SlowlorisClientsAreDroppedWhileANormalClientIsServed) {
  start(small_options());
  // Twenty clients that never finish their header; some trickle a byte now and then, which
  // must not extend their deadline.
  std::vector<std::unique_ptr<RawClient>> slow;
  for (int i = 0; i < 20; ++i) {
    slow.push_back(std::make_unique<RawClient>(port()));
    ASSERT_TRUE(slow.back()->connected());
    slow.back()->send("GET / HTTP/1.1\r\nHost: x\r\n");
  }
  std::atomic<bool> stop{false};
  std::thread trickle([&] {
    for (int round = 0; round < 15 && !stop; ++round) {
      for (int i = 0; i < 5; ++i) slow[static_cast<std::size_t>(i)]->send("X");
      std::this_thread::sleep_for(100ms);
    }
  });
  // A normal client is answered while all twenty are holding their connections.
  {
    RawClient normal(port());
    ASSERT_TRUE(normal.send(get("/fine")));
    const auto t0 = std::chrono::steady_clock::now();
    EXPECT_THAT(normal.read_response(), HasSubstr("hello /fine"));
    EXPECT_LT(std::chrono::steady_clock::now() - t0, 900ms)  // generous: before any drop
        << "the normal request waited behind the slow ones";
  }
  // Every slow client is disconnected after the 1 s header deadline (10 s is generous).
  for (auto& c : slow) EXPECT_TRUE(c->closed_by_server(10s));
  stop = true;
  trickle.join();
  EXPECT_EQ(count_once_settled(Refusal::kHeaderTimeout, 20), 20);
  EXPECT_EQ(handled_, 1);
}

TEST_F(HttpServerTest, SlowBodyIsDroppedAtTheBodyDeadline) {
  start(small_options());
  RawClient c(port());
  c.send("POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789");
  EXPECT_TRUE(c.closed_by_server(10s));
  EXPECT_EQ(count_once_settled(Refusal::kBodyTimeout, 1), 1);
  EXPECT_EQ(handled_, 0);
}

TEST_F(HttpServerTest, KeepAliveServesSeveralRequestsThenIdlesOut) {
  start(small_options());
  RawClient c(port());
  c.send(get("/one"));
  EXPECT_THAT(c.read_response(), HasSubstr("hello /one"));
  c.send(get("/two"));
  EXPECT_THAT(c.read_response(), HasSubstr("hello /two"));
  EXPECT_TRUE(c.closed_by_server(10s));  // idle beyond the header deadline
}

TEST_F(HttpServerTest, ConnectionsPerAddressAreLimited) {
  auto o = small_options();
  o.max_connections_per_source = 3;
  o.header_timeout = 30s;
  start(o);
  std::vector<std::unique_ptr<RawClient>> held;
  for (int i = 0; i < 3; ++i) held.push_back(std::make_unique<RawClient>(port()));
  // Let the server accept the three first.
  held[0]->send(get("/a"));
  EXPECT_THAT(held[0]->read_response(), HasSubstr("hello /a"));
  RawClient fourth(port());
  EXPECT_TRUE(fourth.closed_by_server(5s));
  EXPECT_EQ(count_once_settled(Refusal::kConnectionLimit, 1), 1);
  EXPECT_EQ(server_->open_connections(), 3u);
  held.pop_back();  // one goes away: room for another
  std::this_thread::sleep_for(200ms);
  RawClient fifth(port());
  fifth.send(get("/b"));
  EXPECT_THAT(fifth.read_response(), HasSubstr("hello /b"));
}

TEST_F(HttpServerTest, AdmissionRefusesBeforeAWorkerIsTaken) {
  auto o = small_options();
  std::vector<unsigned> answered;
  o.admit = [](const Request& req, const Peer&) -> std::optional<Response> {
    if (req.target() != "/limited") return std::nullopt;
    auto res = error_response(req, http::status::too_many_requests, "slow down");
    res.set(http::field::retry_after, "7");
    return res;
  };
  o.on_answer = [&](const Request* req, unsigned status, double) {
    std::lock_guard lock(mu_);
    if (req != nullptr) answered.push_back(status);
  };
  start(o);
  RawClient c(port());
  c.send(get("/limited"));
  const std::string res = c.read_response();
  EXPECT_THAT(res, HasSubstr("HTTP/1.1 429"));
  EXPECT_THAT(res, HasSubstr("Retry-After: 7"));
  EXPECT_THAT(res, HasSubstr("slow down"));
  c.send(get("/free"));  // the connection stays usable
  EXPECT_THAT(c.read_response(), HasSubstr("hello /free"));
  EXPECT_EQ(handled_, 1);
  EXPECT_EQ(count(Refusal::kAdmission), 1);
  std::lock_guard lock(mu_);
  EXPECT_EQ(answered, (std::vector<unsigned>{429, 200}));
}

TEST_F(HttpServerTest, LongCallsGetTheirOwnDeadline) {
  auto o = small_options();
  o.deadline = 500ms;
  o.is_long = [](const Request& req) { return req[http::field::user_agent] == "long"; };
  o.long_deadline = 10000ms;
  start(o);
  RawClient short_call(port());
  short_call.send("GET /sleep HTTP/1.1\r\nHost: x\r\nUser-Agent: short\r\n\r\n");
  EXPECT_THAT(short_call.read_response(), HasSubstr("HTTP/1.1 504"));
  RawClient long_call(port());
  long_call.send("GET /sleep HTTP/1.1\r\nHost: x\r\nUser-Agent: long\r\n\r\n");
  EXPECT_THAT(long_call.read_response(), HasSubstr("hello /sleep"));
}

TEST_F(HttpServerTest, LongCallsRunOnTheirOwnWorkersAndCannotStarveOthers) {
  auto o = small_options();
  o.deadline = 500ms;  // a short call not started within 0.5 s is answered 503
  o.is_long = [](const Request& req) { return req[http::field::user_agent] == "long"; };
  o.long_deadline = 10000ms;
  o.long_workers = &long_workers_;
  start(o);
  // Two long calls of 1.5 s each: on the shared pool they would hold both workers.
  const std::string long_sleep = "GET /sleep HTTP/1.1\r\nHost: x\r\nUser-Agent: long\r\n\r\n";
  RawClient first(port()), second(port());
  first.send(long_sleep);
  second.send(long_sleep);
  std::this_thread::sleep_for(200ms);  // both read and queued on the long pool
  RawClient other(port());
  other.send(get("/free"));
  auto res = other.read_response();
  EXPECT_THAT(res, HasSubstr("HTTP/1.1 200"));
  EXPECT_THAT(res, HasSubstr("hello /free"));
  // The long pool has one worker: the calls ran one after the other, and both finished.
  EXPECT_THAT(first.read_response(), HasSubstr("hello /sleep"));
  EXPECT_THAT(second.read_response(), HasSubstr("hello /sleep"));
  EXPECT_EQ(count(Refusal::kDeadlineQueued), 0);
}

TEST(SecretJson, KeysAndTheirTextLiveInWipingMemoryAndReadAsPlainJson) {
  ASSERT_TRUE(init_secure_heap(1 << 20).ready);
  const std::string pem =
      "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END "
      "PRIVATE "
      "KEY-----\n";
  SecretJson j{{"user", "alice"}, {"keys", SecretJson::array()}};
  j["keys"].push_back(SecretJson{{"version", 1}, {"private_key", SecretString(pem)}});
  // The key's text is allocated by the wiping allocator (here: the secure heap).
  const auto& stored = j["keys"][0]["private_key"].get_ref<const SecretString&>();
  EXPECT_TRUE(in_secure_heap(stored.data()));

  http::request<http::string_body> req{http::verb::get, "/enroll/v1/keys", 11};
  Response res = secret_json_response(req, j);
  EXPECT_EQ(res.result(), http::status::ok);
  EXPECT_EQ(res[http::field::cache_control], "no-store");
  EXPECT_EQ(res[http::field::content_type], "application/json");
  // Clients read it as any JSON.
  auto parsed = nlohmann::json::parse(res.body());
  EXPECT_EQ(parsed["user"], "alice");
  EXPECT_EQ(parsed["keys"][0]["version"], 1);
  EXPECT_EQ(parsed["keys"][0]["private_key"], pem);
}

TEST(RateLimiter, BurstThenRefusedWithTheWaitPerKey) {
  RateLimiter r(60, 2);  // one a second, two at once
  EXPECT_FALSE(r.take("a").has_value());
  EXPECT_FALSE(r.take("a").has_value());
  auto wait = r.take("a");
  ASSERT_TRUE(wait.has_value());
  EXPECT_GE(*wait, 1u);
  EXPECT_LE(*wait, 1u);
  EXPECT_FALSE(r.take("b").has_value());  // keys are independent
  std::this_thread::sleep_for(1100ms);
  EXPECT_FALSE(r.take("a").has_value());  // refilled
  RateLimiter off(0, 0);
  for (int i = 0; i < 100; ++i) EXPECT_FALSE(off.take("x").has_value());
}

TEST(RateLimiter, ManyDistinctKeysStayBounded) {
  RateLimiter r(1, 1, 100);
  for (int i = 0; i < 10000; ++i) (void)r.take("k" + std::to_string(i));
  // A key refused a moment ago may be forgotten under a flood, never the other way round:
  // the limiter keeps working.
  EXPECT_FALSE(r.take("fresh").has_value());
  EXPECT_TRUE(r.take("fresh").has_value());
}

TEST(AddressOf, StripsThePort) {
  EXPECT_EQ(address_of("127.0.0.1:5321"), "127.0.0.1");
  EXPECT_EQ(address_of("::1:5321"), "::1");
  EXPECT_EQ(address_of("[::1]:5321"), "::1");
}

}  // namespace
}  // namespace kmsd::api

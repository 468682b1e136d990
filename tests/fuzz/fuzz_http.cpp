// Raw HTTP/1.x bytes through Boost.Beast's request parser, with the limits the listeners set
// (16 KiB of header, 1 MiB of body), into the handlers of both listeners as Daemon::run wires
// them: the public one (PKI paths, health, CA) as a plain-HTTP client and the TLS one
// (enrollment, administrators) as the first administrator. Pipelined requests are answered
// one after the other, as a session does. Each response is serialized as async_write would.
// A handler must not throw and must never answer 500.
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>

#include <cstddef>
#include <cstdint>
#include <sstream>
#include <string_view>

#include "tests/fuzz/fuzz_kms.hpp"

namespace {

namespace beast = boost::beast;
namespace http = kmsd::api::http;

constexpr std::size_t kMaxBody = 1 << 20;        // ServerConfig::max_body_bytes default
constexpr std::uint32_t kMaxHeader = 16 * 1024;  // Daemon::run's ServerOptions

void check(const kmsd::api::Request& req, kmsd::api::Response res) {
  kmsd::fuzz::trace(req, res);
  if (res.result_int() >= 500 && res.result_int() != 503) __builtin_trap();
  res.prepare_payload();
  std::ostringstream out;
  out << res;  // the serializer async_write uses
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  kmsd::fuzz::kms();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  auto& k = kmsd::fuzz::kms();
  std::string_view rest(reinterpret_cast<const char*>(data), size);
  for (int n = 0; n < 4 && !rest.empty(); ++n) {
    http::request_parser<http::string_body> parser;
    parser.body_limit(kMaxBody);
    parser.header_limit(kMaxHeader);
    parser.eager(true);
    beast::error_code ec;
    std::size_t used = 0;
    while (!parser.is_done()) {
      const std::size_t got =
          parser.put(boost::asio::buffer(rest.data() + used, rest.size() - used), ec);
      used += got;
      if (ec == http::error::need_more || (!ec && got == 0)) {
        ec = {};
        if (used < rest.size() && got > 0) continue;
        parser.put_eof(ec);  // the client closed the connection
        break;
      }
      if (ec) break;
    }
    if (ec || !parser.is_done()) return 0;  // the session drops or answers 413/431 unread
    rest.remove_prefix(used);
    kmsd::api::Request req = parser.release();
    check(req, kmsd::fuzz::public_listener(req, k.anonymous));
    check(req, kmsd::fuzz::tls_listener(req, k.admin));
    k.renew_user_token();
  }
  return 0;
}

#include "daemon/startup/unseal_socket.hpp"

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <spdlog/spdlog.h>
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>

namespace kmsd::startup {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr std::size_t kMaxHeader = 4096;
constexpr std::size_t kMaxSecret = 4096;
constexpr int kIoTimeoutMs = 10000;

Error sys_error(const std::string& what) {
  return make_error(ErrorCode::kIo, what + ": " + std::strerror(errno));
}

Result<sockaddr_un> address_of(const fs::path& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.native().size() >= sizeof addr.sun_path)
    return make_error(ErrorCode::kInvalidArgument,
                      "unseal socket path " + path.string() + " is too long for a Unix socket");
  std::memcpy(addr.sun_path, path.c_str(), path.native().size() + 1);
  return addr;
}

// Waits for FD to be readable (or writable) within the I/O timeout.
bool wait_fd(int fd, short events) {
  pollfd p{fd, events, 0};
  int r;
  do r = ::poll(&p, 1, kIoTimeoutMs);
  while (r < 0 && errno == EINTR);
  return r > 0;
}

bool read_exact(int fd, std::uint8_t* p, std::size_t n) {
  std::size_t got = 0;
  while (got < n) {
    if (!wait_fd(fd, POLLIN)) return false;
    ssize_t r = ::read(fd, p + got, n - got);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    got += static_cast<std::size_t>(r);
  }
  return true;
}

bool write_all(int fd, std::string_view s) {
  std::size_t done = 0;
  while (done < s.size()) {
    if (!wait_fd(fd, POLLOUT)) return false;
    ssize_t r = ::send(fd, s.data() + done, s.size() - done, MSG_NOSIGNAL);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    done += static_cast<std::size_t>(r);
  }
  return true;
}

// Reads up to '\n' one byte at a time, so no byte after the header is consumed.
std::optional<std::string> read_line(int fd) {
  std::string line;
  while (line.size() < kMaxHeader) {
    std::uint8_t c;
    if (!read_exact(fd, &c, 1)) return std::nullopt;
    if (c == '\n') return line;
    line.push_back(static_cast<char>(c));
  }
  return std::nullopt;
}

}  // namespace

std::string status_json(const SealStatus& s) {
  json j;
  j["state"] = to_string(s.state);
  j["failed_unseal_attempts"] = s.failed_unseal_attempts;
  if (!s.last_failure.empty()) j["last_failure"] = s.last_failure;
  j["token"] = {{"label", s.token.token_label},           {"serial", s.token.token_serial},
                {"logged_in", s.token.logged_in},         {"degraded", s.token.degraded},
                {"pin_count_low", s.token.pin_count_low}, {"pin_final_try", s.token.pin_final_try},
                {"pin_locked", s.token.pin_locked}};
  if (!s.token.last_error.empty()) j["token"]["last_error"] = s.token.last_error;
  if (!s.source.empty()) j["source"] = s.source;
  if (s.quorum) {
    j["quorum"] = {{"id", s.quorum->quorum_id},
                   {"k", s.quorum->k},
                   {"n", s.quorum->n},
                   {"held", s.quorum->held()},
                   {"shares", s.quorum->indexes},
                   {"expires_in_seconds", s.quorum->expires_in.count()},
                   {"progress", s.quorum->text()}};
  }
  if (s.last_card) {
    j["card"] = {{"label", s.last_card->label},
                 {"serial", s.last_card->serial},
                 {"pin_count_low", s.last_card->pin_count_low},
                 {"pin_final_try", s.last_card->pin_final_try},
                 {"pin_locked", s.last_card->pin_locked},
                 {"pin_state", s.last_card->pin_state()}};
  }
  return j.dump();
}

Result<std::unique_ptr<UnsealSocket>> UnsealSocket::listen(const fs::path& path, Seal& seal,
                                                           CardUnseal* cards,
                                                           CardSplitGate* split) {
  std::error_code ec;
  if (!path.parent_path().empty() && !fs::exists(path.parent_path())) {
    fs::create_directories(path.parent_path(), ec);
    if (ec)
      return make_error(ErrorCode::kIo,
                        "cannot create " + path.parent_path().string() + ": " + ec.message());
    ::chmod(path.parent_path().c_str(), 0700);
  }
  KMSD_ASSIGN_OR_RETURN(auto addr, address_of(path));
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return sys_error("creating the unseal socket");
  // A socket file left by a crashed daemon is stale if nobody answers on it.
  if (fs::exists(path)) {
    UniqueFd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (::connect(probe.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0)
      return make_error(ErrorCode::kAlreadyExists,
                        "another kmsd is listening on " + path.string() + "; stop it first");
    fs::remove(path, ec);
  }
  mode_t old = ::umask(0177);
  int r = ::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  ::umask(old);
  if (r != 0) return sys_error("binding the unseal socket " + path.string());
  ::chmod(path.c_str(), 0600);
  if (::listen(fd.get(), 8) != 0) return sys_error("listening on " + path.string());
  return std::unique_ptr<UnsealSocket>(new UnsealSocket(path, std::move(fd), seal, cards, split));
}

UnsealSocket::UnsealSocket(fs::path path, UniqueFd fd, Seal& seal, CardUnseal* cards,
                           CardSplitGate* split)
    : path_(std::move(path)), fd_(std::move(fd)), seal_(seal), cards_(cards), split_(split) {
  thread_ = std::thread([this] { serve(); });
}

UnsealSocket::~UnsealSocket() {
  stopping_ = true;
  ::shutdown(fd_.get(), SHUT_RDWR);
  if (thread_.joinable()) thread_.join();
  std::error_code ec;
  fs::remove(path_, ec);
}

void UnsealSocket::serve() {
  while (!stopping_) {
    pollfd p{fd_.get(), POLLIN, 0};
    int r = ::poll(&p, 1, 200);
    if (stopping_) break;
    if (cards_ != nullptr) cards_->tick();  // pending quorum shares expire on time
    if (r <= 0) continue;
    UniqueFd client(::accept4(fd_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!client.valid()) continue;
    handle(client.get());
  }
}

void UnsealSocket::handle(int client) {
  ucred cred{};
  socklen_t len = sizeof cred;
  if (::getsockopt(client, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 ||
      (cred.uid != ::geteuid() && cred.uid != 0)) {
    spdlog::warn("unseal socket: refused a connection from uid {}", cred.uid);
    write_all(client, R"({"ok":false,"error":"only the daemon's user or root may use this socket"})"
                      "\n");
    return;
  }
  auto reply = [&](bool ok, const std::string& error, const std::string& message = "",
                   std::optional<ErrorCode> code = std::nullopt, const json& extra = nullptr) {
    json j = json::parse(status_json(seal_.status()));
    if (extra.is_object())
      for (const auto& [k, v] : extra.items()) j[k] = v;
    j["ok"] = ok;
    if (!error.empty()) j["error"] = error;
    if (!message.empty()) j["message"] = message;
    if (code) j["code"] = to_string(*code);
    write_all(client, j.dump() + "\n");
  };
  auto line = read_line(client);
  if (!line) return reply(false, "request header missing, too long or too slow");
  json req = json::parse(*line, nullptr, /*allow_exceptions=*/false);
  if (!req.is_object() || !req.contains("op") || !req["op"].is_string())
    return reply(false, "request header is not a JSON object with an \"op\"");
  std::string op = req["op"];
  if (op == "status") return reply(true, "");
  if (op == "cancel") {
    if (cards_ == nullptr || !cards_->settings().quorum)
      return reply(false, "kmsd's startup source is not \"quorum\": there are no pending shares");
    bool had = cards_->cancel();
    return reply(true, "", had ? "pending shares dropped" : "no shares were pending");
  }
  if (op == "seal") {
    if (cards_ != nullptr) cards_->cancel();
    seal_.seal();
    spdlog::info("sealed on request over the unseal socket (uid {})", cred.uid);
    return reply(true, "");
  }
  if (op == "unseal") {
    if (!req.contains("secret_length") || !req["secret_length"].is_number_unsigned())
      return reply(false, "unseal needs \"secret_length\"");
    std::size_t n = req["secret_length"];
    if (n == 0 || n > kMaxSecret) return reply(false, "secret length out of range");
    SecretBytes secret(n);
    if (!read_exact(client, secret.data(), n)) return reply(false, "secret not received in time");
    spdlog::info("unseal requested over the unseal socket (uid {})", cred.uid);
    if (cards_ != nullptr) {
      std::string card;
      if (req.contains("card")) {
        if (!req["card"].is_string()) return reply(false, "\"card\" must be a pkcs11: URI");
        card = req["card"];
      }
      auto r = cards_->present(secret, card);
      if (!r.ok()) return reply(false, r.error().message, "", r.error().code);
      return reply(true, "", r->message);
    }
    if (req.contains("card"))
      return reply(false,
                   "kmsd's startup source is not \"card\" or \"quorum\": give the startup "
                   "secret, not a card",
                   "", ErrorCode::kInvalidArgument);
    auto st = seal_.unseal(secret);
    return reply(st.ok(), st.ok() ? "" : st.error().message, "",
                 st.ok() ? std::nullopt : std::optional<ErrorCode>(st.error().code));
  }
  if (op.rfind("card_split_", 0) == 0) {
    auto r = card_split(op, req, "operator (uid " + std::to_string(cred.uid) + ")");
    if (!r.ok()) return reply(false, r.error().message, "", r.error().code);
    return reply(true, "", r->value("message", std::string()), std::nullopt, *r);
  }
  reply(false, "unknown op '" + op + "'; expected status, seal, unseal, cancel or card_split_*");
}

Result<json> UnsealSocket::card_split(const std::string& op, const json& req,
                                      const std::string& who) {
  if (split_ == nullptr)
    return make_error(ErrorCode::kFailedPrecondition,
                      "this kmsd has no card split gate (an older version?)");
  if (!seal_.material())
    return make_error(ErrorCode::kFailedPrecondition,
                      "kmsd is sealed: a card split needs no approval now (the operators are at "
                      "the machine); run kmsctl card split without --request");
  auto plan = [&]() -> Result<SplitPlan> {
    if (!req.contains("plan")) return make_error(ErrorCode::kInvalidArgument, "no \"plan\"");
    return SplitPlan::from_json(req["plan"]);
  };
  auto id = [&]() -> Result<std::string> {
    if (!req.contains("request") || !req["request"].is_string())
      return make_error(ErrorCode::kInvalidArgument, "no \"request\" id");
    return req["request"].get<std::string>();
  };
  if (op == "card_split_request") {
    KMSD_ASSIGN_OR_RETURN(auto p, plan());
    KMSD_ASSIGN_OR_RETURN(auto out, split_->request(p, who));
    spdlog::info("card split requested over the unseal socket by {}: request {}", who,
                 out.request_id);
    return json{{"request", out.request_id},
                {"approvals", out.approvals},
                {"required", out.required},
                {"message", out.message}};
  }
  if (op == "card_split_begin") {
    KMSD_ASSIGN_OR_RETURN(auto p, plan());
    KMSD_ASSIGN_OR_RETURN(auto rid, id());
    KMSD_TRY(split_->begin(rid, p, who));
    spdlog::info("card split {} started by {}", rid, who);
    return json{{"request", rid}, {"message", "approved split started"}};
  }
  if (op == "card_split_done") {
    KMSD_ASSIGN_OR_RETURN(auto rid, id());
    const bool ok = req.value("ok", false);
    KMSD_TRY(split_->finish(rid, ok, req.value("quorum", std::string()),
                            req.value("error", std::string()), who));
    spdlog::info("card split {} {}", rid, ok ? "finished" : "failed");
    return json{{"request", rid}, {"message", ok ? "recorded" : "failure recorded"}};
  }
  return make_error(ErrorCode::kInvalidArgument, "unknown op '" + op + "'");
}

Result<std::string> unseal_request(const fs::path& socket, const std::string& op,
                                   const SecretBytes* secret, const std::string& extra_json) {
  KMSD_ASSIGN_OR_RETURN(auto addr, address_of(socket));
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return sys_error("creating a socket");
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0)
    return make_error(ErrorCode::kUnavailable,
                      "cannot reach kmsd at " + socket.string() + ": " + std::strerror(errno) +
                          "; is kmsd running, and is this the unseal_socket from its config?");
  json header = {{"v", 1}, {"op", op}};
  if (!extra_json.empty()) {
    json extra = json::parse(extra_json, nullptr, false);
    if (!extra.is_object())
      return make_error(ErrorCode::kInternal, "unseal_request: extra fields are not an object");
    for (auto& [k, v] : extra.items()) header[k] = v;
  }
  if (secret != nullptr) header["secret_length"] = secret->size();
  if (!write_all(fd.get(), header.dump() + "\n") ||
      (secret != nullptr && !write_all(fd.get(), secret->view())))
    return sys_error("sending the request to kmsd");
  std::string reply;
  char c;
  // Unsealing may take a while on a slow token: wait up to a minute for the reply.
  for (int waited = 0; reply.size() < 65536;) {
    pollfd p{fd.get(), POLLIN, 0};
    int r = ::poll(&p, 1, 1000);
    if (r == 0 && ++waited < 60) continue;
    if (r <= 0) break;
    ssize_t n = ::read(fd.get(), &c, 1);
    if (n <= 0 || c == '\n') break;
    reply.push_back(c);
  }
  if (reply.empty())
    return make_error(ErrorCode::kUnavailable, "kmsd closed the connection without a reply");
  return reply;
}

}  // namespace kmsd::startup

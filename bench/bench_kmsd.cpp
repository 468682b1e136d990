#include "bench/bench_kmsd.hpp"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <thread>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "bench/bench_sandbox.hpp"

extern char** environ;

namespace kmsd::bench {

namespace fs = std::filesystem;

std::atomic<bool> g_stop{false};

namespace {
extern "C" void on_stop_signal(int) {
  g_stop = true;
}
}  // namespace

void install_stop_signals() {
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);
  ::sigaction(SIGHUP, &sa, nullptr);
  ::signal(SIGPIPE, SIG_IGN);
}

double since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::string read_text(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void write_private(const fs::path& p, const std::string& text) {
  std::ofstream(p, std::ios::binary | std::ios::trunc) << text;
  fs::permissions(p, fs::perms::owner_read | fs::perms::owner_write);
}

std::string tail_lines(const std::string& text, int lines) {
  std::size_t pos = text.size();
  for (int i = 0; i <= lines && pos != std::string::npos && pos > 0; ++i)
    pos = text.rfind('\n', pos - 1);
  return pos == std::string::npos ? text : text.substr(pos + 1);
}

double percentile(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0;
  auto rank = static_cast<std::size_t>(std::ceil(p * static_cast<double>(sorted.size())));
  return sorted[std::clamp<std::size_t>(rank, 1, sorted.size()) - 1];
}

double process_cpu_seconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

double pid_cpu_seconds(pid_t pid) {
  // Fields 14 and 15 (utime, stime, clock ticks) follow the command name in parentheses, which
  // may itself hold spaces: counted from the last ')'.
  const std::string stat = read_text("/proc/" + std::to_string(pid) + "/stat");
  const auto close = stat.rfind(')');
  if (close == std::string::npos) return -1;
  std::istringstream in(stat.substr(close + 1));
  std::string field;
  unsigned long long utime = 0, stime = 0;
  for (int i = 3; i <= 15 && in >> field; ++i) {
    if (i == 14) utime = std::stoull(field);
    if (i == 15) stime = std::stoull(field);
  }
  if (!in) return -1;
  return static_cast<double>(utime + stime) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

std::uint16_t free_port() {
  namespace net = boost::asio;
  net::io_context ioc;
  net::ip::tcp::acceptor a(ioc, {net::ip::make_address("127.0.0.1"), 0});
  return a.local_endpoint().port();
}

namespace {
// One plain-HTTP exchange with 127.0.0.1:PORT; status 0 when nothing answered.
template <typename Body>
std::pair<int, std::string> exchange(std::uint16_t port, boost::beast::http::request<Body>& req) {
  namespace beast = boost::beast;
  namespace http = beast::http;
  namespace net = boost::asio;
  net::io_context ioc;
  beast::tcp_stream stream(ioc);
  beast::error_code ec;
  stream.expires_after(std::chrono::seconds(10));
  stream.connect(net::ip::tcp::endpoint(net::ip::make_address("127.0.0.1"), port), ec);
  if (ec) return {0, ""};
  req.set(http::field::host, "127.0.0.1");
  req.prepare_payload();
  http::write(stream, req, ec);
  if (ec) return {0, ""};
  beast::flat_buffer buf;
  http::response<http::string_body> res;
  http::read(stream, buf, res, ec);
  if (ec) return {0, ""};
  stream.socket().shutdown(net::ip::tcp::socket::shutdown_both, ec);
  return {static_cast<int>(res.result_int()), res.body()};
}
}  // namespace

std::pair<int, std::string> http_get(std::uint16_t port, const std::string& target) {
  boost::beast::http::request<boost::beast::http::empty_body> req{boost::beast::http::verb::get,
                                                                  target, 11};
  return exchange(port, req);
}

std::pair<int, std::string> http_post(std::uint16_t port, const std::string& target,
                                      const std::string& content_type, const std::string& body) {
  namespace http = boost::beast::http;
  http::request<http::string_body> req{http::verb::post, target, 11};
  req.set(http::field::content_type, content_type);
  req.body() = body;
  return exchange(port, req);
}

int run(const std::vector<std::string>& argv, const fs::path& out_file, char* const* env) {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, out_file.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0600);
  posix_spawn_file_actions_adddup2(&fa, STDOUT_FILENO, STDERR_FILENO);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = -1;
  int rc = posix_spawnp(&pid, args[0], &fa, nullptr, args.data(), env != nullptr ? env : environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) return -1;
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) return -1;
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

bool Daemon::start(const fs::path& bin, const fs::path& conf, const fs::path& out) {
  const std::string b = bin.string(), c = conf.string(), o = out.string();
  const pid_t parent = ::getpid();
  pid_ = ::fork();
  if (pid_ < 0) return false;
  if (pid_ == 0) {
    ::setpgid(0, 0);
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);
    int in = ::open("/dev/null", O_RDONLY);
    int err = ::open(o.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    ::dup2(in, STDIN_FILENO);
    ::dup2(err, STDOUT_FILENO);
    ::dup2(err, STDERR_FILENO);
    const char* argv[] = {b.c_str(), "--config", c.c_str(), nullptr};
    ::execv(argv[0], const_cast<char* const*>(argv));
    ::_exit(127);
  }
  ::setpgid(pid_, pid_);
  return true;
}

bool Daemon::alive() {
  if (pid_ <= 0) return false;
  int status = 0;
  if (::waitpid(pid_, &status, WNOHANG) == pid_) {
    pid_ = -1;
    return false;
  }
  return true;
}

void Daemon::stop() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGTERM);
  int status = 0;
  for (int i = 0; i < 200; ++i) {
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ::kill(-pid_, SIGKILL);
  ::waitpid(pid_, &status, 0);
  pid_ = -1;
}

LogKeeper::~LogKeeper() {
  if (to.empty()) return;
  std::error_code ec;
  fs::copy_file(from, to, fs::copy_options::overwrite_existing, ec);
  if (ec) std::fprintf(stderr, "bench: could not keep the kmsd log: %s\n", ec.message().c_str());
}

Status Kmsd::configure(int workers, const std::string& extra) {
  const fs::path kmsctl = build_dir / "cli" / "kmsctl";
  for (const auto& bin : {build_dir / "daemon" / "kmsd", kmsctl})
    if (::access(bin.c_str(), X_OK) != 0)
      return make_error(ErrorCode::kNotFound,
                        bin.string() +
                            " is not there; build it (cmake --build BUILD --target kmsd kmsctl) "
                            "or give --build-dir");
  public_port = free_port();
  admin_port = free_port();
  while (admin_port == public_port) admin_port = free_port();
  write_private(dir / "startup.secret", std::string(kPin) + "\n");
  write_private(dir / "p12.pass", std::string(kAdminPassphrase) + "\n");
  {
    std::ofstream f(dir / "kmsd.toml");
    f << "[server]\n"
      << "public_listen = \"127.0.0.1:" << public_port << "\"\n"
      << "admin_listen = \"127.0.0.1:" << admin_port << "\"\n"
      << "tls_names = [\"localhost\", \"127.0.0.1\"]\n"
      << "unseal_socket = \"" << (dir / "unseal.sock").string() << "\"\n"
      << "worker_threads = " << workers << "\n"
      << "enroll_rate_per_source = 0\n"
      << "enroll_rate_per_identity = 0\n"
      << "max_connections_per_source = 0\n"
      << "[token]\n"
      << "module = \"" << kModule << "\"\n"
      << "uri = \"" << kTokenUri << "\"\n"
      << "pool_size = " << std::max(4, workers) << "\n"
      << "wrap_mechanism = \"aes-gcm\"\n"  // SoftHSM2 2.6.1: see config/kmsd.toml
      << "[ca]\n"
      << "key_type = \"ec-p256\"\n"
      << "subject = \"/O=kmsd bench/CN=kmsd bench CA\"\n"
      << "[store]\n"
      << "path = \"" << (dir / "kmsd.db").string() << "\"\n"
      << "[startup]\n"
      << "source = \"file\"\n"
      << "file = \"" << (dir / "startup.secret").string() << "\"\n"
      << "[log]\n"
      << "level = \"info\"\n"
      << "file = \"" << log_file().string() << "\"\n"
      << extra;
  }
  int rc = run({kmsctl.string(), "init", "--config", (dir / "kmsd.toml").string(), "--admin",
                "bench-admin", "--admin-p12", admin_p12().string(), "--passphrase-file",
                (dir / "p12.pass").string(), "--pin-file", (dir / "startup.secret").string()},
               dir / "init.out");
  if (rc != 0)
    return make_error(ErrorCode::kFailedPrecondition, "kmsctl init failed (" + std::to_string(rc) +
                                                          "):\n" + read_text(dir / "init.out"));
  return {};
}

Status Kmsd::start() {
  if (!daemon.start(build_dir / "daemon" / "kmsd", dir / "kmsd.toml", dir / "kmsd.out"))
    return make_error(ErrorCode::kFailedPrecondition, "cannot fork kmsd");
  bool ready = false;
  for (int i = 0; i < 600 && !ready && !g_stop; ++i) {
    if (!daemon.alive())
      return make_error(ErrorCode::kFailedPrecondition, "kmsd exited during startup:\n" +
                                                            read_text(dir / "kmsd.out") +
                                                            tail_lines(read_text(log_file()), 20));
    ready = http_get(public_port, "/readyz").first == 200;
    if (!ready) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (!ready)
    return make_error(ErrorCode::kUnavailable,
                      "kmsd did not become ready (/readyz 200) within 30 s:\n" +
                          tail_lines(read_text(log_file()), 20));
  auto pem = http_get(public_port, "/ca.pem");
  if (pem.first != 200) return make_error(ErrorCode::kUnavailable, "GET /ca.pem failed");
  ca_pem = pem.second;
  write_private(ca_file(), ca_pem);
  return {};
}

}  // namespace kmsd::bench

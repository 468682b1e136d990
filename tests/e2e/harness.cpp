#include "tests/e2e/harness.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <sstream>
#include <thread>
#include <vector>

#include "cli/client/admin_client.hpp"

namespace kmsd::testing {

namespace fs = std::filesystem;

fs::path build_dir() {
  const char* b = std::getenv("KMSD_BUILD_DIR");
  return b != nullptr ? fs::path(b) : fs::current_path();
}
fs::path kmsd_bin() {
  return build_dir() / "daemon" / "kmsd";
}
fs::path kmsctl_bin() {
  return build_dir() / "cli" / "kmsctl";
}

std::uint16_t free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

CommandResult sh(const std::string& cmd) {
  CommandResult r;
  r.status = run_command(cmd, &r.output);
  return r;
}

std::string read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void write_private(const fs::path& p, const std::string& text) {
  std::ofstream(p, std::ios::binary) << text;
  fs::permissions(p, fs::perms::owner_read | fs::perms::owner_write);
}

void KmsdTest::SetUp() {
  TokenSandbox::SetUp();
  public_port_ = free_port();
  admin_port_ = free_port();
  while (admin_port_ == public_port_) admin_port_ = free_port();
  write_private(pass_path(), "correct horse battery staple\n");
}

namespace {
// Kills every process whose command line mentions NEEDLE (this test's private config path):
// `script` starts kmsd in a session of its own, out of reach of the process group.
void kill_processes_mentioning(const std::string& needle) {
  // Processes come and go while this walks /proc: every step is allowed to fail (a process
  // that exited meanwhile is simply skipped), so nothing here throws.
  std::error_code ec;
  for (fs::directory_iterator it("/proc", ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename();
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
    const int fd = ::open((it->path() / "cmdline").c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;
    std::string cmdline;
    char buf[4096];
    for (ssize_t n; (n = ::read(fd, buf, sizeof buf)) > 0;)
      cmdline.append(buf, static_cast<std::size_t>(n));
    ::close(fd);
    if (cmdline.find(needle) != std::string::npos) ::kill(std::stoi(name), SIGKILL);
  }
}
}  // namespace

void KmsdTest::TearDown() {
  if (pid_ > 0) {
    ::kill(-pid_, SIGKILL);  // the whole process group
    ::waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }
  kill_processes_mentioning(conf_path().string());  // and anything that left it
  TokenSandbox::TearDown();
}

void KmsdTest::write_config(const std::string& source, const std::string& extra) {
  std::ofstream f(conf_path());
  f << "[server]\n"
    << "public_listen = \"127.0.0.1:" << public_port_ << "\"\n"
    << "admin_listen = \"127.0.0.1:" << admin_port_ << "\"\n"
    << "tls_names = [\"localhost\", \"127.0.0.1\"]\n"
    << "unseal_socket = \"" << socket_path().string() << "\"\n"
    << "[token]\n"
    << "module = \"" << kSoftHsmModule << "\"\n"
    << "uri = \"" << token().uri() << "\"\n"
    << "[ca]\n"
    << "subject = \"/O=kmsd test/CN=kmsd test CA\"\n"
    << "[store]\n"
    << "path = \"" << db_path().string() << "\"\n"
    << "[startup]\n"
    << "source = \"" << source << "\"\n";
  if (source == "file") f << "file = \"" << secret_path().string() << "\"\n";
  f << "[log]\nlevel = \"debug\"\nfile = \"" << log_path().string() << "\"\n" << extra;
}

void KmsdTest::write_secret_file(const std::string& secret, unsigned mode) {
  std::ofstream(secret_path()) << secret << "\n";
  ::chmod(secret_path().c_str(), mode);
}

CommandResult KmsdTest::init() {
  write_secret_file(kUserPin);
  return kmsctl("init --config " + shell_quote(conf_path()) + " --admin alice --admin-p12 " +
                shell_quote(admin_p12()) + " --passphrase-file " + shell_quote(pass_path()) +
                " --pin-file " + shell_quote(secret_path()));
}

CommandResult KmsdTest::kmsctl(const std::string& args) {
  return sh(shell_quote(kmsctl_bin()) + " " + args + " </dev/null");
}

namespace {
// Forks a child in its own process group with stdin from /dev/null and output to ERR_FILE,
// running ARGV.
pid_t spawn(const std::vector<std::string>& argv, const fs::path& err_file) {
  pid_t pid = ::fork();
  if (pid == 0) {
    ::setpgid(0, 0);
    int devnull = ::open("/dev/null", O_RDONLY);
    ::dup2(devnull, STDIN_FILENO);  // no terminal: the prompt source must not block
    int err = ::open(err_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    ::dup2(err, STDERR_FILENO);
    ::dup2(err, STDOUT_FILENO);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  ::setpgid(pid, pid);
  return pid;
}
}  // namespace

void KmsdTest::start_on_terminal(const std::string& typed) {
  std::string kmsd = shell_quote(kmsd_bin()) + " --config " + shell_quote(conf_path());
  std::string script = "(sleep 1; printf '%s\\n' " + shell_quote(typed) +
                       "; sleep 600) | script -qfec " + shell_quote(kmsd) + " " +
                       shell_quote(transcript_path());
  pid_ = spawn({"/bin/sh", "-c", script}, dir() / "kmsd.stderr");
  for (int i = 0; i < 200; ++i) {
    if (http_code("/healthz") == "200") return;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  FAIL() << "kmsd on a terminal did not answer /healthz\nlog:\n" << log_text();
}

void KmsdTest::boot(const std::string& extra) {
  write_config("file", extra);
  launch();
}

void KmsdTest::launch() {
  auto in = init();
  ASSERT_EQ(in.status, 0) << in.output;
  start();
  ASSERT_TRUE(wait_ready(200)) << log_text();
  fetch_ca();
}

void KmsdTest::fetch_ca() {
  auto r = sh("curl -s -S -m 5 -o " + shell_quote(dir() / "ca.pem") + " " +
              shell_quote(public_url() + "/ca.pem"));
  ASSERT_EQ(r.status, 0) << r.output;
}

void KmsdTest::start() {
  pid_ = spawn({kmsd_bin().string(), "--config", conf_path().string()}, dir() / "kmsd.stderr");
  for (int i = 0; i < 200; ++i) {
    if (http_code("/healthz") == "200") return;
    int status;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      std::string err;
      std::ifstream e(dir() / "kmsd.stderr");
      std::getline(e, err, '\0');
      FAIL() << "kmsd exited during startup: " << err << "\nlog:\n" << log_text();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  FAIL() << "kmsd did not answer /healthz within 10 s\nlog:\n" << log_text();
}

int KmsdTest::stop() {
  if (pid_ <= 0) return -1;
  ::kill(pid_, SIGTERM);
  int status = 0;
  for (int i = 0; i < 200; ++i) {
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return -2;  // still running; TearDown kills it
}

bool KmsdTest::wait_ready(int code, int seconds) {
  for (int i = 0; i < seconds * 20; ++i) {
    if (http_code("/readyz") == std::to_string(code)) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

CommandResult KmsdTest::get_public(const std::string& path) {
  return sh("curl -s -m 10 -w '\\n%{http_code}' " + shell_quote(public_url() + path));
}

std::string KmsdTest::http_code(const std::string& path) {
  auto r = sh("curl -s -m 5 -o /dev/null -w '%{http_code}' " + shell_quote(public_url() + path));
  return r.output;
}

std::string KmsdTest::kmsctl_admin_options(const fs::path& passphrase_file) const {
  return " --server https://localhost:" + std::to_string(admin_port_) + " --p12 " +
         shell_quote(admin_p12()) + " --ca " + shell_quote(dir() / "ca.pem") +
         " --passphrase-file " +
         shell_quote(passphrase_file.empty() ? pass_path() : passphrase_file);
}

ApiReply KmsdTest::api(const std::string& method, const std::string& path,
                       const nlohmann::json& body, const std::string& cert_args) {
  std::string cmd = "curl -s -m 60 --cacert " + shell_quote(dir() / "ca.pem") + " -X " + method +
                    " -w '\\n%{http_code}' ";
  cmd += cert_args.empty() ? "--cert-type P12 --cert " +
                                 shell_quote(admin_p12().string() + ":correct horse battery staple")
                           : cert_args;
  if (!body.is_null())
    cmd += " -H 'Content-Type: application/json' --data-binary " + shell_quote(body.dump());
  cmd += " " + shell_quote("https://localhost:" + std::to_string(admin_port_) + path);
  auto r = sh(cmd);
  ApiReply out;
  auto nl = r.output.rfind('\n');
  if (nl != std::string::npos) {
    out.body = r.output.substr(0, nl);
    out.status = std::atoi(r.output.c_str() + nl + 1);
  }
  return out;
}

ApiReply KmsdTest::enable(const std::string& id, const std::string& name) {
  return api("POST", "/v1/users",
             {{"id", id}, {"email", id + "@example.com"}, {"display_name", name}});
}

std::string KmsdTest::log_text() const {
  return read_file(log_path());
}

std::vector<std::pair<std::string, std::string>> KmsdTest::enable_users(const std::string& prefix,
                                                                        int first, int count,
                                                                        const std::string& job) {
  nlohmann::json batch = nlohmann::json::array();
  for (int i = first; i < first + count; ++i) {
    const std::string id = prefix + std::to_string(i);
    batch.push_back({{"id", id}, {"email", id + "@example.com"}, {"display_name", "User " + id}});
  }
  std::vector<std::pair<std::string, std::string>> users;
  auto bulk = api("POST", "/v1/users/bulk", nlohmann::json{{"users", batch}, {"job", job}});
  EXPECT_EQ(bulk.status, 200) << bulk.body;
  for (const auto& r : bulk.j().value("results", nlohmann::json::array()))
    users.emplace_back(r.value("id", ""), r.value("token", ""));
  EXPECT_EQ(users.size(), static_cast<std::size_t>(count)) << bulk.body.substr(0, 400);
  return users;
}

std::unique_ptr<client::AdminClient> KmsdTest::enrollment_client() {
  client::ClientOptions co;
  co.server = "https://localhost:" + std::to_string(admin_port_);
  co.ca_file = dir() / "ca.pem";
  co.timeout = std::chrono::seconds(20);
  auto c = client::AdminClient::connect(std::move(co));
  EXPECT_TRUE(c.ok()) << c.error().message;
  return c.ok() ? std::move(*c) : nullptr;
}

std::string KmsdTest::sql(const std::string& query) {
  return sh("sqlite3 " + shell_quote(db_path()) + " " + shell_quote(query)).output;
}

void KmsdTest::kill_kmsd() {
  ASSERT_GT(pid_, 0);
  ::kill(pid_, SIGKILL);
  int status = 0;
  ::waitpid(pid_, &status, 0);
  pid_ = -1;
}

EnrollmentLoad::EnrollmentLoad(Connect connect, int first, int end, int clients,
                               std::chrono::milliseconds pace, Enroll enroll)
    : next_(first), end_(end) {
  for (int t = 0; t < clients; ++t) {
    threads_.emplace_back([this, connect, pace, enroll] {
      auto client = connect();
      if (!client) {
        ++unconnected_;
        return;
      }
      for (int i = next_++; i < end_ && !stop_; i = next_++) {
        enroll(*client, i);
        std::this_thread::sleep_for(pace);
      }
    });
  }
}

EnrollmentLoad::~EnrollmentLoad() {
  stop_ = true;
  join();
}

void EnrollmentLoad::join() {
  for (auto& t : threads_)
    if (t.joinable()) t.join();
}

}  // namespace kmsd::testing

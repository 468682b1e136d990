// End-to-end harness: a throw-away SoftHSM token, a config, `kmsctl init`, and a real kmsd
// process driven by real clients (curl, openssl, pkcs11-tool, kmsctl). Every process started
// here is stopped in TearDown.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "tests/support/sandbox.hpp"

namespace kmsd::client {
class AdminClient;  // cli/client/admin_client.hpp
}

namespace kmsd::testing {

std::filesystem::path build_dir();  // from $KMSD_BUILD_DIR
std::filesystem::path kmsd_bin();
std::filesystem::path kmsctl_bin();
std::uint16_t free_port();
std::string shell_quote(const std::string& s);

struct CommandResult {
  int status = -1;
  std::string output;  // stdout + stderr
};

// One HTTPS reply from curl.
struct ApiReply {
  int status = 0;
  std::string body;
  nlohmann::json j() const { return nlohmann::json::parse(body, nullptr, false); }
};
CommandResult sh(const std::string& cmd);
// The whole file (empty when it cannot be read).
std::string read_file(const std::filesystem::path& p);
// Writes TEXT to P with mode 0600 (passphrase and PIN files).
void write_private(const std::filesystem::path& p, const std::string& text);

class KmsdTest : public TokenSandbox {
 protected:
  void SetUp() override;
  void TearDown() override;

  // Writes kmsd.toml. SOURCE is "file" or "prompt". EXTRA is appended verbatim.
  void write_config(const std::string& source = "file", const std::string& extra = "");
  // Writes the startup secret file with MODE.
  void write_secret_file(const std::string& secret, unsigned mode = 0600);
  // kmsctl init with the admin PKCS#12 at admin_p12().
  CommandResult init();
  // The usual start of an end-to-end test: write_config("file", EXTRA), then launch().
  void boot(const std::string& extra = "");
  // kmsctl init, start, wait until ready, fetch the CA certificate to ca.pem (for a config
  // the test wrote itself).
  void launch();
  // GET /ca.pem from the public listener into dir()/ca.pem.
  void fetch_ca();
  // Starts kmsd and waits until /healthz answers.
  void start();
  // Starts kmsd on a pseudo-terminal (util-linux `script`) and types TYPED at its prompt;
  // the terminal transcript goes to transcript_path().
  void start_on_terminal(const std::string& typed);
  std::filesystem::path transcript_path() const { return dir() / "terminal.txt"; }
  // SIGTERM and wait; returns the exit status.
  int stop();
  // Waits until /readyz has HTTP status CODE (or times out, failing the test).
  bool wait_ready(int code, int seconds = 20);

  CommandResult kmsctl(const std::string& args);
  // curl against the public listener; returns "HTTPCODE\nBODY".
  CommandResult get_public(const std::string& path);
  std::string http_code(const std::string& path);
  std::string log_text() const;
  // curl against the TLS listener (https://localhost:PORT PATH), verifying the server against
  // ca.pem (fetched by the caller). CERT_ARGS: curl's client certificate options; empty means
  // the first administrator's PKCS#12.
  ApiReply api(const std::string& method, const std::string& path,
               const nlohmann::json& body = nullptr, const std::string& cert_args = "");
  // POST /v1/users as the first administrator.
  ApiReply enable(const std::string& id, const std::string& name = "Jane Doe");
  // kmsctl's admin-API options as the first administrator, with the CA fetched to ca.pem;
  // PASSPHRASE_FILE defaults to the right one.
  std::string kmsctl_admin_options(const std::filesystem::path& passphrase_file = {}) const;
  // POST /v1/users/bulk (job JOB) of the users PREFIX<FIRST> .. PREFIX<FIRST+COUNT-1>; their
  // ids and one-time enrollment tokens in that order. A refused request fails the test (and
  // returns what it got: check the size).
  std::vector<std::pair<std::string, std::string>> enable_users(const std::string& prefix,
                                                                int first, int count,
                                                                const std::string& job);
  // A client of the enrollment API (no client certificate) trusting ca.pem; nullptr (and a
  // test failure) when it cannot connect.
  std::unique_ptr<client::AdminClient> enrollment_client();
  // The output of the sqlite3 shell for QUERY on the store (kmsd may be running).
  std::string sql(const std::string& query);
  // SIGKILL to kmsd, and waits for it (pid_ is -1 afterwards).
  void kill_kmsd();

  std::filesystem::path conf_path() const { return dir() / "kmsd.toml"; }
  std::filesystem::path secret_path() const { return dir() / "startup.secret"; }
  std::filesystem::path admin_p12() const { return dir() / "admin.p12"; }
  std::filesystem::path pass_path() const { return dir() / "p12.pass"; }
  std::filesystem::path socket_path() const { return dir() / "unseal.sock"; }
  std::filesystem::path log_path() const { return dir() / "kmsd.log"; }
  std::filesystem::path db_path() const { return dir() / "kmsd.db"; }
  std::string public_url() const { return "http://127.0.0.1:" + std::to_string(public_port_); }
  std::string admin_url() const { return "https://127.0.0.1:" + std::to_string(admin_port_); }

  pid_t pid_ = -1;
  std::uint16_t public_port_ = 0;
  std::uint16_t admin_port_ = 0;
};

// Users enrolling over the real HTTPS API in the background while the test does something
// else to kmsd (rotates the master key, kills it): CLIENTS threads, each with its own client
// from CONNECT, take the indices FIRST .. END-1 in turn, call ENROLL(client, index) for each
// and sleep PACE after it. The destructor stops them taking more and joins them, so a test
// that fails half-way leaves no thread behind.
class EnrollmentLoad {
 public:
  using Connect = std::function<std::unique_ptr<client::AdminClient>()>;
  using Enroll = std::function<void(client::AdminClient&, int index)>;
  EnrollmentLoad(Connect connect, int first, int end, int clients, std::chrono::milliseconds pace,
                 Enroll enroll);
  ~EnrollmentLoad();
  EnrollmentLoad(const EnrollmentLoad&) = delete;
  EnrollmentLoad& operator=(const EnrollmentLoad&) = delete;

  // Waits until every index has been enrolled (or its thread could not connect).
  void join();
  // Some index has not been taken yet.
  bool busy() const { return next_.load() < end_; }
  // Threads that enrolled nobody because their client could not connect.
  int unconnected() const { return unconnected_.load(); }

 private:
  std::atomic<int> next_;
  const int end_;
  std::atomic<bool> stop_{false};
  std::atomic<int> unconnected_{0};
  std::vector<std::thread> threads_;
};

}  // namespace kmsd::testing

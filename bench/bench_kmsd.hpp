// What the benchmarks and the load test share: a real kmsd started from this build tree on a
// throw-away SoftHSM2 token (bench_sandbox.hpp), plain-HTTP calls to its public listener,
// child processes, and small figures helpers. Everything here reports failures by return
// value; nothing asserts on time.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "common/result.hpp"

namespace kmsd::bench {

using Clock = std::chrono::steady_clock;

// Set by SIGINT/SIGTERM/SIGHUP once install_stop_signals() ran; long loops poll it.
extern std::atomic<bool> g_stop;
void install_stop_signals();

double since(Clock::time_point t0);
std::string read_text(const std::filesystem::path& p);
void write_private(const std::filesystem::path& p, const std::string& text);
// The last LINES lines of TEXT, for failure reports.
std::string tail_lines(const std::string& text, int lines);
std::uint16_t free_port();
// Nearest-rank percentile P (0..1) of SORTED.
double percentile(const std::vector<double>& sorted, double p);
// CPU seconds (user + system) used so far by this process, all threads; by process PID (from
// /proc/PID/stat, -1 when it cannot be read). Differences of these give load-independent
// figures on a shared machine.
double process_cpu_seconds();
double pid_cpu_seconds(pid_t pid);

// GET / POST http://127.0.0.1:PORT TARGET over plain HTTP; status 0 when nothing answered.
std::pair<int, std::string> http_get(std::uint16_t port, const std::string& target);
std::pair<int, std::string> http_post(std::uint16_t port, const std::string& target,
                                      const std::string& content_type, const std::string& body);

// Runs ARGV (no shell; argv[0] looked up in PATH) with ENV (nullptr: this process's), stdin
// from /dev/null, stdout and stderr to OUT_FILE, and waits. The exit status; 128 + signal when
// killed; -1 when it could not be started. Safe to call from several threads.
int run(const std::vector<std::string>& argv, const std::filesystem::path& out_file,
        char* const* env = nullptr);

// The kmsd child process: its own process group, killed if this process dies, stopped
// (SIGTERM, then SIGKILL to the group) when this object goes.
class Daemon {
 public:
  Daemon() = default;
  Daemon(const Daemon&) = delete;
  Daemon& operator=(const Daemon&) = delete;
  ~Daemon() { stop(); }

  // Forks and execs BIN --config CONF with output to OUT. Call before any thread is started.
  bool start(const std::filesystem::path& bin, const std::filesystem::path& conf,
             const std::filesystem::path& out);
  bool alive();  // false once the process has exited
  void stop();
  pid_t pid() const { return pid_; }

 private:
  pid_t pid_ = -1;
};

// Copies the kmsd log out of the sandbox before it is removed, when TO is set.
struct LogKeeper {
  std::filesystem::path from, to;
  ~LogKeeper();
};

// A kmsd configured in DIR (a bench::Sandbox's), initialized with `kmsctl init`.
struct Kmsd {
  std::filesystem::path dir;
  std::filesystem::path build_dir;  // holds daemon/kmsd and cli/kmsctl
  std::uint16_t public_port = 0;
  std::uint16_t admin_port = 0;
  std::string ca_pem;  // after start()
  Daemon daemon;

  static constexpr const char* kAdminPassphrase = "bench admin pass phrase";
  std::filesystem::path admin_p12() const { return dir / "admin.p12"; }
  std::filesystem::path ca_file() const { return dir / "ca.pem"; }
  std::filesystem::path log_file() const { return dir / "kmsd.log"; }

  // kmsd.toml (P-256 CA, wrap_mechanism "aes-gcm", WORKERS worker threads; the rate limits
  // per source and per identity off, since every client of a bench is 127.0.0.1; EXTRA
  // appended), the startup secret and passphrase files, then `kmsctl init`.
  Status configure(int workers, const std::string& extra = "");
  // Starts kmsd and waits (up to 30 s) for /readyz = 200, then fetches ca.pem.
  Status start();
};

}  // namespace kmsd::bench

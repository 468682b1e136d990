// Service integration: the systemd unit verifies, the notify protocol (READY=1 once, STATUS=,
// STOPPING=1) on a socket the test binds, and the process hardening (non-dumpable, no core,
// secrets in the locked secure heap; what happens without the privilege to lock memory).
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <linux/capability.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "common/secret.hpp"
#include "daemon/metrics/service.hpp"
#include "tests/support/sandbox.hpp"

namespace kmsd::metrics {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
namespace fs = std::filesystem;

fs::path source_dir() {
  return fs::path(KMSD_SOURCE_DIR);
}
fs::path kmsd_binary() {
  const char* b = std::getenv("KMSD_BUILD_DIR");
  return fs::path(b != nullptr ? b : ".") / "daemon" / "kmsd";
}
std::string read_all(const fs::path& p) {
  std::ifstream f(p);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

TEST(SystemdUnit, PassesSystemdAnalyzeVerify) {
  std::string where;
  if (kmsd::testing::run_command("command -v systemd-analyze", &where) != 0)
    GTEST_SKIP() << "systemd-analyze is not installed (Debian package systemd); "
                    "scripts/install-deps.sh installs it";
  kmsd::testing::TempDir tmp;
  // The unit as installed, with ExecStart pointing at the kmsd just built (verify checks that
  // the command exists and is executable).
  std::string unit = read_all(source_dir() / "config" / "kmsd.service");
  ASSERT_FALSE(unit.empty());
  const std::string installed = "/usr/local/bin/kmsd";
  ASSERT_THAT(unit, HasSubstr(installed));
  for (auto pos = unit.find(installed); pos != std::string::npos; pos = unit.find(installed))
    unit.replace(pos, installed.size(), kmsd_binary().string());
  std::ofstream(tmp.path() / "kmsd.service") << unit;
  std::string out;
  const int rc = kmsd::testing::run_command(
      "cd " + tmp.path().string() +
          " && SYSTEMD_LOG_LEVEL=info systemd-analyze verify ./kmsd.service 2>&1",
      &out);
  EXPECT_EQ(rc, 0) << out;
  // Unknown keys and bad values are only warnings for systemd-analyze: none allowed.
  EXPECT_EQ(out, "") << out;
}

TEST(SystemdUnit, IsNotifyTypeAndHardened) {
  const std::string unit = read_all(source_dir() / "config" / "kmsd.service");
  for (const char* line :
       {"Type=notify", "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
        "PrivateTmp=yes", "MemoryDenyWriteExecute=yes", "CapabilityBoundingSet=\n",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "LockPersonality=yes",
        "ReadWritePaths=", "LimitMEMLOCK=", "LimitCORE=0", "TimeoutStartSec=infinity"})
    EXPECT_THAT(unit, HasSubstr(line));
}

// A datagram socket standing in for systemd's notify socket.
class NotifySocket {
 public:
  explicit NotifySocket(const fs::path& path) : path_(path) {
    fd_ = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::snprintf(a.sun_path, sizeof a.sun_path, "%s", path.c_str());
    if (::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) ADD_FAILURE() << "bind";
    timeval tv{0, 300 * 1000};
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  }
  ~NotifySocket() { ::close(fd_); }
  // The next datagram, or "" after 300 ms without one.
  std::string next() {
    char buf[4096];
    ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
    return n > 0 ? std::string(buf, static_cast<std::size_t>(n)) : std::string();
  }

 private:
  fs::path path_;
  int fd_ = -1;
};

TEST(ServiceNotifier, ReadyOnceWhenUnsealedStatusOnEveryChange) {
  kmsd::testing::TempDir tmp;
  NotifySocket sock(tmp.path() / "notify");
  ::setenv("NOTIFY_SOCKET", (tmp.path() / "notify").c_str(), 1);
  ASSERT_TRUE(ServiceNotifier::under_systemd());
  ServiceNotifier n;
  n.update(false, "sealed: waiting");
  EXPECT_EQ(sock.next(), "STATUS=sealed: waiting");
  n.update(false, "sealed: waiting");  // no change: nothing sent
  EXPECT_EQ(sock.next(), "");
  n.update(true, "unsealed: serving");
  EXPECT_EQ(sock.next(), "READY=1\nSTATUS=unsealed: serving");
  n.update(true, "unsealed: serving");
  EXPECT_EQ(sock.next(), "");
  n.update(false, "sealed: again");
  EXPECT_EQ(sock.next(), "STATUS=sealed: again");
  n.update(true, "unsealed: serving");
  EXPECT_EQ(sock.next(), "READY=1\nSTATUS=unsealed: serving");
  n.stopping();
  EXPECT_EQ(sock.next(), "STOPPING=1\nSTATUS=stopping");
}

TEST(ServiceNotifier, NoSocketNoNotificationsNoErrors) {
  ::unsetenv("NOTIFY_SOCKET");
  EXPECT_FALSE(ServiceNotifier::under_systemd());
  ServiceNotifier n;
  n.update(true, "unsealed");  // a no-op without systemd
  n.stopping();
}

TEST(Hardening, ProcessIsNotDumpableAndSecretsAreInTheLockedHeap) {
  SecretBytes before = SecretBytes::from_string("made before the secure heap");
  harden_process(1 << 20);
  EXPECT_EQ(prctl(PR_GET_DUMPABLE, 0, 0, 0, 0), 0);
  rlimit core{};
  ASSERT_EQ(getrlimit(RLIMIT_CORE, &core), 0);
  EXPECT_EQ(core.rlim_cur, 0u);
  const SecureHeapState heap = init_secure_heap(0);
  ASSERT_TRUE(heap.ready) << heap.detail;
  EXPECT_EQ(heap.bytes, 1u << 20);
  SecretBytes pin = SecretBytes::from_string("87654321");
  EXPECT_TRUE(in_secure_heap(pin.data()));
  EXPECT_FALSE(in_secure_heap(before.data()));  // from the heap, and still freed correctly
  EXPECT_GT(secure_heap_used(), 0u);
  // Locked when the limit allows (root, or RLIMIT_MEMLOCK above 1 MiB).
  rlimit ml{};
  getrlimit(RLIMIT_MEMLOCK, &ml);
  if (geteuid() == 0 || ml.rlim_cur == RLIM_INFINITY || ml.rlim_cur >= (1u << 20) + 65536) {
    EXPECT_TRUE(heap.locked) << heap.detail;
  }
  // The arena is in /proc/self/smaps as locked and not dumped ("dd" flag).
  const std::string smaps = read_all("/proc/self/smaps");
  if (heap.locked) {
    EXPECT_THAT(smaps, HasSubstr(" dd"));
  }
  // A full arena falls back to the ordinary heap; everything still wipes and frees.
  std::vector<SecretBytes> many;
  for (int i = 0; i < 40; ++i) many.emplace_back(std::size_t{64 * 1024});
  EXPECT_FALSE(in_secure_heap(many.back().data()));
  many.clear();
}

// Without CAP_IPC_LOCK and with RLIMIT_MEMLOCK below the arena: the heap is still used, not
// locked, and the detail says what to raise.
TEST(Hardening, WithoutThePrivilegeToLockTheHeapIsUsedUnlocked) {
  if (geteuid() == 0) {
    // Drop CAP_IPC_LOCK (root ignores RLIMIT_MEMLOCK with it). This process only.
    __user_cap_header_struct hdr{_LINUX_CAPABILITY_VERSION_3, 0};
    __user_cap_data_struct data[2]{};
    ASSERT_EQ(syscall(SYS_capget, &hdr, data), 0);
    data[CAP_TO_INDEX(CAP_IPC_LOCK)].effective &= ~CAP_TO_MASK(CAP_IPC_LOCK);
    data[CAP_TO_INDEX(CAP_IPC_LOCK)].permitted &= ~CAP_TO_MASK(CAP_IPC_LOCK);
    ASSERT_EQ(syscall(SYS_capset, &hdr, data), 0);
  }
  rlimit small{64 * 1024, 64 * 1024};
  ASSERT_EQ(setrlimit(RLIMIT_MEMLOCK, &small), 0);
  harden_process(4 << 20);
  const SecureHeapState heap = init_secure_heap(0);
  ASSERT_TRUE(heap.ready) << heap.detail;
  EXPECT_FALSE(heap.locked);
  EXPECT_THAT(heap.detail, HasSubstr("RLIMIT_MEMLOCK"));
  EXPECT_THAT(heap.detail, HasSubstr("LimitMEMLOCK"));
  SecretBytes key(32);
  EXPECT_TRUE(in_secure_heap(key.data()));
}

}  // namespace
}  // namespace kmsd::metrics

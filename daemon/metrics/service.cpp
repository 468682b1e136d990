#include "daemon/metrics/service.hpp"

#include <spdlog/spdlog.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <systemd/sd-daemon.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "common/secret.hpp"

namespace kmsd::metrics {

bool ServiceNotifier::under_systemd() {
  const char* s = std::getenv("NOTIFY_SOCKET");
  return s != nullptr && *s != '\0';
}

void ServiceNotifier::update(bool ready, const std::string& text) {
  std::lock_guard lock(mu_);
  if (ready == was_ready_ && text == last_text_) return;
  std::string msg;
  if (ready && !was_ready_) msg += "READY=1\n";
  msg += "STATUS=" + text;
  const int r = sd_notify(0, msg.c_str());
  if (r < 0)
    spdlog::warn("systemd notification failed: {} (NOTIFY_SOCKET {})", std::strerror(-r),
                 under_systemd() ? "set" : "unset");
  if (ready && !was_ready_) ready_sent_ = true;
  was_ready_ = ready;
  last_text_ = text;
}

void ServiceNotifier::stopping() {
  std::lock_guard lock(mu_);
  (void)sd_notify(0, "STOPPING=1\nSTATUS=stopping");
}

namespace {
std::mutex hardening_mu;
SecureHeapState hardened;
}  // namespace

SecureHeapState hardening_state() {
  std::lock_guard lock(hardening_mu);
  return hardened;
}

void harden_process(std::size_t secure_heap_bytes) {
  if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0)
    spdlog::warn(
        "cannot make kmsd non-dumpable (prctl PR_SET_DUMPABLE): {}; key memory may end "
        "up in a core file",
        std::strerror(errno));
  struct rlimit no_core {
    0, 0
  };
  if (setrlimit(RLIMIT_CORE, &no_core) != 0)
    spdlog::warn("cannot set RLIMIT_CORE to 0: {}", std::strerror(errno));
  const SecureHeapState heap = init_secure_heap(secure_heap_bytes);
  {
    std::lock_guard lock(hardening_mu);
    hardened = heap;
  }
  if (!heap.ready) {
    spdlog::warn("secure heap: {}", heap.detail);
  } else if (!heap.locked) {
    struct rlimit ml {};
    getrlimit(RLIMIT_MEMLOCK, &ml);
    spdlog::warn(
        "secure heap: {} (RLIMIT_MEMLOCK is {} bytes)", heap.detail,
        ml.rlim_cur == RLIM_INFINITY ? std::string("unlimited") : std::to_string(ml.rlim_cur));
  } else {
    spdlog::info(
        "secure heap: {} KiB locked in RAM and excluded from core dumps; kmsd is not "
        "dumpable",
        heap.bytes / 1024);
  }
}

}  // namespace kmsd::metrics

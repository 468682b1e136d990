// Service integration: systemd's notify protocol (Type=notify: READY=1 once kmsd is unsealed,
// STATUS= lines while it is sealed or degraded, STOPPING=1) and process hardening (no core
// dumps, not ptrace-attachable by other users, secrets in a locked heap).
// Without NOTIFY_SOCKET (not started by systemd) every notification is a no-op.
#pragma once

#include <cstddef>
#include <mutex>
#include <string>

#include "common/secret.hpp"

namespace kmsd::metrics {

// What systemd is told. Thread-safe.
class ServiceNotifier {
 public:
  // Tells systemd the current state when it changed since the last call: READY=1 the first
  // time kmsd is unsealed (and again after a re-seal and unseal), STATUS=TEXT always.
  // READY: unsealed (ready to serve).
  void update(bool ready, const std::string& text);
  void stopping();
  // Whether kmsd was started with a NOTIFY_SOCKET (logs say so once).
  static bool under_systemd();

 private:
  std::mutex mu_;
  bool ready_sent_ = false;
  bool was_ready_ = false;
  std::string last_text_;
};

// Makes the process non-dumpable (prctl PR_SET_DUMPABLE 0: no core file, no ptrace by
// non-root, /proc/PID owned by root), sets RLIMIT_CORE to 0, and creates the secure heap for
// secrets (common/secret.hpp) of SECURE_HEAP_BYTES. Never fails: what the OS refuses is
// logged as a warning with what to change, and kmsd goes on.
void harden_process(std::size_t secure_heap_bytes);
// The secure heap as harden_process() left it (not ready before it ran).
SecureHeapState hardening_state();

}  // namespace kmsd::metrics

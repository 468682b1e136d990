// Drives the fault-injecting PKCS#11 shim (tests/faultshim/faultshim.cpp) from a test: the
// control file it re-reads on every call, and the statistics file it writes.
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <thread>

namespace kmsd::testing {

inline constexpr const char* kFaultShimModule = KMSD_FAULTSHIM_PATH;

class ShimControl {
 public:
  // Exports the shim's environment for this process (and the processes it starts).
  explicit ShimControl(const std::filesystem::path& dir)
      : control_(dir / "faultshim.control"), stats_(dir / "faultshim.stats") {
    set("fault = none\n");
    ::setenv("KMSD_FAULTSHIM_CONTROL", control_.c_str(), 1);
    ::setenv("KMSD_FAULTSHIM_STATS", stats_.c_str(), 1);
    ::setenv("KMSD_FAULTSHIM_MODULE", "/usr/lib/softhsm/libsofthsm2.so", 1);
  }

  // Replaces the control file atomically (a new inode: the shim notices at its next call).
  void set(const std::string& text) const {
    auto tmp = control_;
    tmp += ".tmp";
    std::ofstream(tmp) << text;
    std::filesystem::rename(tmp, control_);
  }
  void fault(const std::string& kind, const std::string& extra = "") const {
    set("fault = " + kind + "\n" + extra);
  }
  void clear() const { set("fault = none\n"); }

  // Calls answered with an injected fault so far.
  unsigned long injected() const { return stat("injected"); }
  unsigned long delayed() const { return stat("delayed"); }
  // Sessions open on the real token that were opened through the shim (and not closed).
  unsigned long open_sessions() const { return stat("open_sessions"); }

 private:
  unsigned long stat(const std::string& key) const {
    std::ifstream in(stats_);
    std::string k;
    unsigned long v = 0;
    while (in >> k >> v) {
      if (k == key) return v;
    }
    return 0;
  }
  std::filesystem::path control_;
  std::filesystem::path stats_;
};

// The outages the shim injects, for INSTANTIATE_TEST_SUITE_P(..., kEveryOutage,
// outage_test_name): each test runs once per kind of fault.
inline const auto kEveryOutage =
    ::testing::Values("device-removed", "session-invalid", "device-error", "not-logged-in");
inline std::string outage_test_name(const ::testing::TestParamInfo<const char*>& info) {
  std::string s = info.param;
  std::erase(s, '-');
  return s;
}

// Polls PRED every 20 ms until it holds or LIMIT passes; returns whether it held.
inline bool eventually(const std::function<bool()>& pred, std::chrono::milliseconds limit) {
  auto end = std::chrono::steady_clock::now() + limit;
  for (;;) {
    if (pred()) return true;
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

}  // namespace kmsd::testing

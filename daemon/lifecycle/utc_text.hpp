// Timestamps in the sentences the lifecycle returns to administrators: one format,
// ISO 8601 UTC to the second ("2025-03-01T09:30:00Z"), whatever the daemon's time zone.
#pragma once

#include <chrono>
#include <ctime>
#include <string>

namespace kmsd::lifecycle {

inline std::string utc_text(std::chrono::sys_seconds t) {
  std::time_t tt = static_cast<std::time_t>(t.time_since_epoch().count());
  std::tm tm{};
  char buf[32];
  if (gmtime_r(&tt, &tm) == nullptr ||
      std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0) {
    return "@" + std::to_string(t.time_since_epoch().count());
  }
  return buf;
}

}  // namespace kmsd::lifecycle

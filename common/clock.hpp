// The daemon's one notion of "now" and its one text form of a time: unix seconds, and
// ISO 8601 / RFC 3339 UTC to the second ("2025-03-01T09:30:00Z") whatever the time zone.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace kmsd {

std::int64_t unix_now();
std::string utc_text(std::int64_t unix_seconds);
inline std::string utc_text(std::chrono::sys_seconds t) {
  return utc_text(static_cast<std::int64_t>(t.time_since_epoch().count()));
}

}  // namespace kmsd

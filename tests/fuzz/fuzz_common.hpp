// What every fuzz target shares: a private scratch directory and quiet logs.
#pragma once

#include <filesystem>

namespace kmsd::fuzz {

// A private directory (under $TMPDIR, else /dev/shm, else /tmp) removed at exit.
const std::filesystem::path& scratch_dir();

// Quiets spdlog: the daemon's log lines would drown libFuzzer's output and slow it down.
void quiet_logs();

}  // namespace kmsd::fuzz

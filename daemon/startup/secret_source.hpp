// Where the startup secret comes from: a terminal prompt (no echo) or a 0600 file.
#pragma once

#include <atomic>
#include <filesystem>
#include <string>

#include "common/result.hpp"
#include "common/secret.hpp"

namespace kmsd::startup {

// True when standard input is a terminal we can prompt on.
bool have_terminal();

// Prints PROMPT to the terminal and reads one line with echo off. When CANCEL is given and
// becomes true, gives up within a fraction of a second (kFailedPrecondition).
Result<SecretBytes> read_secret_from_terminal(const std::string& prompt,
                                              const std::atomic<bool>* cancel = nullptr);

// Reads the secret from FILE; refuses a file readable or writable by group or others.
Result<SecretBytes> read_secret_from_file(const std::filesystem::path& file);

}  // namespace kmsd::startup

// Small, careful file helpers: whole-file reads and atomic writes with a given mode.
#pragma once

#include <filesystem>
#include <string>

#include "common/result.hpp"
#include "common/secret.hpp"

namespace kmsd::files {

Result<std::string> read_text(const std::filesystem::path& path);
// Writes to PATH.tmp with MODE, fsyncs, renames over PATH. Refuses to overwrite when
// !overwrite and PATH exists.
Status write_atomic(const std::filesystem::path& path, std::string_view data, unsigned mode,
                    bool overwrite = false);
// Reads a secret from a file, refusing a file that group or others can read or write,
// and stripping one trailing newline.
Result<SecretBytes> read_secret_file(const std::filesystem::path& path);

}  // namespace kmsd::files

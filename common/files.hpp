// Small, careful file helpers: whole-file reads and atomic writes with a given mode.
#pragma once

#include <cerrno>
#include <filesystem>
#include <string>
#include <string_view>

#include "common/result.hpp"
#include "common/secret.hpp"

namespace kmsd::files {

// kIo: "WHAT PATH: <strerror(ERR)>", e.g. io_error(p, "cannot read") right after a failed call.
Error io_error(const std::filesystem::path& path, std::string_view what, int err = errno);
// fsync of the directory DIR, so that the entries made in it are durable.
Status sync_dir(const std::filesystem::path& dir);

Result<std::string> read_text(const std::filesystem::path& path);
// Writes to PATH.tmp with MODE, fsyncs, renames over PATH and fsyncs PATH's directory: PATH is
// whole or absent after a crash. Refuses to overwrite when !overwrite and PATH exists (also
// when it appears meanwhile: the rename does not replace it).
Status write_atomic(const std::filesystem::path& path, std::string_view data, unsigned mode,
                    bool overwrite = false);
// Reads a secret from a file, refusing a file that group or others can read or write,
// and stripping one trailing newline.
Result<SecretBytes> read_secret_file(const std::filesystem::path& path);

}  // namespace kmsd::files

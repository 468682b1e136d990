#include "common/files.hpp"

#include "common/fd.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

namespace kmsd::files {

namespace fs = std::filesystem;

Error io_error(const fs::path& path, std::string_view what, int err) {
  return make_error(ErrorCode::kIo,
                    std::string(what) + " " + path.string() + ": " + std::strerror(err));
}

Status sync_dir(const fs::path& dir) {
  UniqueFd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd.valid() || ::fsync(fd.get()) != 0) return io_error(dir, "cannot sync");
  return {};
}

Result<std::string> read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return io_error(path, "cannot read");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

Status write_atomic(const fs::path& path, std::string_view data, unsigned mode, bool overwrite) {
  if (!overwrite && fs::exists(path))
    return make_error(ErrorCode::kAlreadyExists,
                      path.string() + " already exists; refusing to overwrite it");
  fs::path tmp = path;
  tmp += ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
  if (fd < 0) return io_error(tmp, "cannot create");
  ::fchmod(fd, mode);  // umask must not widen or narrow what the caller asked for
  std::size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      auto err = io_error(tmp, "cannot write");
      ::close(fd);
      ::unlink(tmp.c_str());
      return err;
    }
    done += static_cast<std::size_t>(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    auto err = io_error(tmp, "cannot flush");
    ::unlink(tmp.c_str());
    return err;
  }
  // Without OVERWRITE the rename refuses an existing file (one made since the check above);
  // a file system without RENAME_NOREPLACE gets the plain rename after that check.
  int rc = overwrite ? ::rename(tmp.c_str(), path.c_str())
                     : ::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, path.c_str(), RENAME_NOREPLACE);
  if (rc != 0 && !overwrite && errno == EINVAL) rc = ::rename(tmp.c_str(), path.c_str());
  if (rc != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    if (err == EEXIST)
      return make_error(ErrorCode::kAlreadyExists,
                        path.string() + " already exists; refusing to overwrite it");
    return io_error(path, "cannot rename into place", err);
  }
  // The new name is durable too, not only the bytes.
  return sync_dir(path.has_parent_path() ? path.parent_path() : fs::path("."));
}

Result<SecretBytes> read_secret_file(const fs::path& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) return io_error(path, "cannot open secret file");
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    auto err = io_error(path, "cannot stat secret file");
    ::close(fd);
    return err;
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return make_error(ErrorCode::kPermissionDenied, path.string() + " is not a regular file");
  }
  if ((st.st_mode & (S_IRWXG | S_IRWXO)) != 0) {
    ::close(fd);
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
    return make_error(
        ErrorCode::kPermissionDenied,
        "secret file " + path.string() + " has mode " + mode +
            ", readable or writable by group or others; refusing it. Run: chmod 600 " +
            path.string());
  }
  SecretBytes out(static_cast<std::size_t>(st.st_size) + 1);
  std::size_t got = 0;
  while (got < out.size()) {
    ssize_t n = ::read(fd, out.data() + got, out.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    got += static_cast<std::size_t>(n);
  }
  ::close(fd);
  out.resize(got);
  if (!out.empty() && out.data()[out.size() - 1] == '\n') out.resize(out.size() - 1);
  if (!out.empty() && out.data()[out.size() - 1] == '\r') out.resize(out.size() - 1);
  if (out.empty())
    return make_error(ErrorCode::kInvalidArgument, "secret file " + path.string() + " is empty");
  return out;
}

}  // namespace kmsd::files

#include "daemon/startup/secret_source.hpp"

#include <fcntl.h>
#include <poll.h>
#include <termios.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "common/files.hpp"

namespace kmsd::startup {

bool have_terminal() {
  return ::isatty(STDIN_FILENO) == 1;
}

Result<SecretBytes> read_secret_from_terminal(const std::string& prompt,
                                              const std::atomic<bool>* cancel) {
  int fd = ::open("/dev/tty", O_RDWR | O_CLOEXEC);
  if (fd < 0) fd = ::dup(STDIN_FILENO);
  if (fd < 0 || ::isatty(fd) != 1) {
    if (fd >= 0) ::close(fd);
    return make_error(ErrorCode::kFailedPrecondition,
                      "no terminal to prompt on; use a secret file or `kmsctl unseal`");
  }
  struct termios old {};
  ::tcgetattr(fd, &old);
  struct termios quiet = old;
  quiet.c_lflag &= ~static_cast<tcflag_t>(ECHO);
  quiet.c_lflag |= ECHONL;
  ::tcsetattr(fd, TCSAFLUSH, &quiet);
  (void)!::write(fd, prompt.data(), prompt.size());
  SecretBytes line(1024);
  std::size_t n = 0;
  bool ok = true;
  while (n < line.size()) {
    if (cancel != nullptr) {
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, 200) == 0) {
        if (cancel->load()) {
          ok = false;
          break;
        }
        continue;
      }
    }
    char c;
    ssize_t r = ::read(fd, &c, 1);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      ok = n > 0;
      break;
    }
    if (c == '\n' || c == '\r') break;
    line.data()[n++] = static_cast<std::uint8_t>(c);
  }
  ::tcsetattr(fd, TCSAFLUSH, &old);
  ::close(fd);
  if (!ok) return make_error(ErrorCode::kIo, "the terminal closed before a secret was entered");
  line.resize(n);
  if (line.empty()) return make_error(ErrorCode::kInvalidArgument, "empty secret");
  return line;
}

Result<SecretBytes> read_secret_from_file(const std::filesystem::path& file) {
  return files::read_secret_file(file);
}

}  // namespace kmsd::startup

#include "tests/fuzz/fuzz_common.hpp"

#include <spdlog/spdlog.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <system_error>

namespace kmsd::fuzz {

namespace fs = std::filesystem;

namespace {

fs::path make_scratch() {
  fs::path base;
  if (const char* t = std::getenv("TMPDIR"); t != nullptr && *t != '\0')
    base = t;
  else if (::access("/dev/shm", W_OK) == 0)
    base = "/dev/shm";  // tmpfs: the store's fsyncs cost nothing
  else
    base = "/tmp";
  std::string tmpl = (base / "kmsd-fuzz.XXXXXX").string();
  if (::mkdtemp(tmpl.data()) == nullptr) {
    std::fprintf(stderr, "fuzz setup: cannot create a directory under %s\n", base.c_str());
    std::abort();
  }
  return tmpl;
}

// Removes the scratch directory at exit (libFuzzer leaves through exit()).
struct Scratch {
  fs::path path = make_scratch();
  ~Scratch() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

}  // namespace

const fs::path& scratch_dir() {
  static Scratch s;
  return s.path;
}

void quiet_logs() {
  spdlog::set_level(spdlog::level::off);
}

}  // namespace kmsd::fuzz

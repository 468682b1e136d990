// A throw-away SoftHSM2 token for the benchmarks: its own token directory and SOFTHSM2_CONF
// under a temporary directory, removed on destruction. Exits the program if it cannot be made.
#pragma once

#include <stdlib.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

namespace kmsd::bench {

inline constexpr const char* kModule = "/usr/lib/softhsm/libsofthsm2.so";
inline constexpr const char* kPin = "87654321";
inline constexpr const char* kTokenUri = "pkcs11:token=bench";

struct Sandbox {
  std::filesystem::path dir;
  Sandbox() {
    namespace fs = std::filesystem;
    std::string t = (fs::temp_directory_path() / "kmsd-bench-XXXXXX").string();
    if (::mkdtemp(t.data()) == nullptr) std::abort();
    dir = t;
    fs::create_directories(dir / "tokens");
    std::ofstream(dir / "softhsm2.conf") << "directories.tokendir = " << (dir / "tokens").string()
                                         << "\nobjectstore.backend = file\nlog.level = ERROR\n";
    ::setenv("SOFTHSM2_CONF", (dir / "softhsm2.conf").c_str(), 1);
    std::string cmd = "softhsm2-util --init-token --free --label bench --so-pin 12345678 --pin " +
                      std::string(kPin) + " >/dev/null";
    if (std::system(cmd.c_str()) != 0) {
      std::fprintf(stderr, "bench: softhsm2-util failed\n");
      std::exit(1);
    }
  }
  ~Sandbox() {
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
  Sandbox(const Sandbox&) = delete;
  Sandbox& operator=(const Sandbox&) = delete;
};

}  // namespace kmsd::bench

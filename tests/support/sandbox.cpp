#include "tests/support/sandbox.hpp"

#include <stdlib.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <fstream>
#include <stdexcept>

namespace kmsd::testing {

namespace fs = std::filesystem;

TempDir::TempDir() {
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base && *base ? base : "/tmp") + "/kmsd-test-XXXXXX";
  if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed for " + tmpl);
  path_ = tmpl;
}

TempDir::~TempDir() {
  std::error_code ec;
  fs::remove_all(path_, ec);
}

int run_command(const std::string& cmd, std::string* out) {
  std::string full = cmd + " 2>&1";
  FILE* p = ::popen(full.c_str(), "r");
  if (p == nullptr) return -1;
  std::array<char, 4096> buf{};
  std::size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) {
    if (out != nullptr) out->append(buf.data(), n);
  }
  int status = ::pclose(p);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

SoftHsmToken::SoftHsmToken(const fs::path& dir, const std::string& label) : label_(label) {
  token_dir_ = dir / "tokens";
  fs::create_directories(token_dir_);
  conf_ = dir / "softhsm2.conf";
  std::ofstream(conf_) << "directories.tokendir = " << token_dir_.string() << "\n"
                       << "objectstore.backend = file\n"
                       << "log.level = ERROR\n"
                       << "slots.removable = false\n";
  ::setenv("SOFTHSM2_CONF", conf_.c_str(), 1);
  add_token(label_);
}

void SoftHsmToken::add_token(const std::string& label, const std::string& user_pin) const {
  std::string out;
  std::string cmd = "SOFTHSM2_CONF='" + conf_.string() +
                    "' softhsm2-util --init-token --free --label '" + label + "' --so-pin " +
                    kSoPin + " --pin '" + user_pin + "'";
  if (run_command(cmd, &out) != 0) throw std::runtime_error("softhsm2-util failed: " + out);
}

void TokenSandbox::SetUp() {
  tmp_ = std::make_unique<TempDir>();
  token_ = std::make_unique<SoftHsmToken>(tmp_->path());
}

void TokenSandbox::TearDown() {
  token_.reset();
  tmp_.reset();
}

}  // namespace kmsd::testing

// Test sandbox: a private temporary directory per test, and a throw-away SoftHSM2 token
// configured through its own SOFTHSM2_CONF inside it. Every test runs in its own process
// (gtest_discover_tests), so the environment set here is the module's for the whole test.
#pragma once

#include <filesystem>
#include <string>

#include <gtest/gtest.h>

namespace kmsd::testing {

// A temporary directory removed (recursively) on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

// Runs a shell command, returns its exit status; output goes to OUT if non-null.
int run_command(const std::string& cmd, std::string* out = nullptr);

inline constexpr const char* kSoftHsmModule = "/usr/lib/softhsm/libsofthsm2.so";
inline constexpr const char* kUserPin = "87654321";
inline constexpr const char* kSoPin = "12345678";

// A fresh SoftHSM2 token labelled LABEL in its own token directory.
class SoftHsmToken {
 public:
  explicit SoftHsmToken(const std::filesystem::path& dir, const std::string& label = "kmsd-test");
  // Adds another token (e.g. an operator card) in the same token directory.
  void add_token(const std::string& label, const std::string& user_pin = kUserPin) const;
  const std::string& label() const { return label_; }
  std::string uri() const { return "pkcs11:token=" + label_; }
  const std::filesystem::path& conf() const { return conf_; }
  const std::filesystem::path& token_dir() const { return token_dir_; }

 private:
  std::string label_;
  std::filesystem::path conf_;
  std::filesystem::path token_dir_;
};

// Fixture: TempDir + SoftHsmToken, with SOFTHSM2_CONF exported for this process.
class TokenSandbox : public ::testing::Test {
 protected:
  void SetUp() override;
  void TearDown() override;
  std::filesystem::path dir() const { return tmp_->path(); }
  SoftHsmToken& token() { return *token_; }

 private:
  std::unique_ptr<TempDir> tmp_;
  std::unique_ptr<SoftHsmToken> token_;
};

}  // namespace kmsd::testing

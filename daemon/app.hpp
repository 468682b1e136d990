// The kmsd daemon: wires the store, the token, the seal, the listeners and the unseal
// socket together, handles SIGTERM (clean stop) and SIGHUP (re-read and re-validate the
// configuration; a bad file keeps the old one).
#pragma once

#include <memory>

#include "common/result.hpp"
#include "config/config.hpp"

namespace kmsd {

class Daemon {
 public:
  static Result<std::unique_ptr<Daemon>> create(config::Config cfg);
  ~Daemon();
  // Serves until SIGTERM/SIGINT. Returns the process exit code.
  int run();

  struct Impl;

 private:
  explicit Daemon(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Sets up spdlog from [log]: level, and a file or stderr.
Status configure_logging(const config::LogConfig& log);

}  // namespace kmsd

// kmsd: the key custody daemon. A thin main over daemon/app.
#include <spdlog/spdlog.h>
#include <CLI/CLI.hpp>

#include <iostream>

#include "config/config.hpp"
#include "daemon/app.hpp"

int main(int argc, char** argv) {
  CLI::App app{"kmsd — hardware-backed key custody daemon"};
  std::string config_path = "/etc/kmsd/kmsd.toml";
  std::string check_path;
  app.add_option("-c,--config", config_path, "configuration file")->capture_default_str();
  app.add_option("--check-config", check_path,
                 "validate FILE, print every problem with its line and key, and exit");
  app.set_version_flag("--version", std::string("kmsd ") + KMSD_VERSION);
  CLI11_PARSE(app, argc, argv);

  const std::string path = check_path.empty() ? config_path : check_path;
  auto loaded = kmsd::config::load(path);
  if (!loaded.ok()) {
    for (const auto& p : loaded.problems) std::cerr << p.to_string(path) << "\n";
    std::cerr << path << ": " << loaded.problems.size()
              << " problem(s); kmsd will not start with this configuration\n";
    return 2;
  }
  if (!check_path.empty()) {
    std::cout << path << ": configuration is valid\n";
    return 0;
  }
  if (auto st = kmsd::configure_logging(loaded.config.log); !st.ok()) {
    std::cerr << "kmsd: " << st.error().message << "\n";
    return 1;
  }
  auto daemon = kmsd::Daemon::create(std::move(loaded.config));
  if (!daemon.ok()) {
    spdlog::critical("kmsd cannot start: {}", daemon.error().message);
    return 1;
  }
  return (*daemon)->run();
}

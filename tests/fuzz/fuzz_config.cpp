// The TOML configuration loader (config/config.cpp) on any text: it must report problems,
// never crash, and every problem must name a key or a line.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "config/config.hpp"
#include "tests/fuzz/fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const auto file = kmsd::fuzz::scratch_dir() / "kmsd.toml";
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  auto r = kmsd::config::load_string(text, file);
  for (const auto& p : r.problems) {
    if (p.message.empty()) __builtin_trap();
    (void)p.to_string(file);
  }
  if (r.ok()) {
    (void)kmsd::config::crl_url_for(r.config);
    (void)kmsd::config::ocsp_url_for(r.config);
  }
  return 0;
}

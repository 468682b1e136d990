#include "hsm/uri.hpp"

#include <cctype>
#include <charconv>

namespace kmsd::hsm {

namespace {

Error bad(std::string_view uri, const std::string& why) {
  return make_error(ErrorCode::kInvalidArgument,
                    "token URI '" + std::string(uri) + "' is not usable: " + why +
                        " (expected e.g. pkcs11:token=kmsd or pkcs11:serial=0123abcd; check "
                        "token.uri in kmsd.toml)");
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// RFC 3986 percent-decoding; nullopt on a broken escape.
std::optional<std::string> percent_decode(std::string_view s) {
  std::string out;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '%') {
      out.push_back(s[i]);
      continue;
    }
    if (i + 2 >= s.size()) return std::nullopt;  // needs two hex digits after '%'
    int hi = hex_value(s[i + 1]);
    int lo = hex_value(s[i + 2]);
    if (hi < 0 || lo < 0) return std::nullopt;
    out.push_back(static_cast<char>(hi * 16 + lo));
    i += 2;
  }
  return out;
}

}  // namespace

Result<TokenUri> TokenUri::parse(std::string_view uri) {
  constexpr std::string_view kScheme = "pkcs11:";
  if (uri.size() < kScheme.size() || uri.substr(0, kScheme.size()) != kScheme) {
    return bad(uri, "it does not start with 'pkcs11:'");
  }
  TokenUri out;
  out.text = std::string(uri);
  std::string_view path = uri.substr(kScheme.size());
  // The query part (?pin-source=..., ?module-path=...) does not select a token.
  if (auto q = path.find('?'); q != std::string_view::npos) path = path.substr(0, q);
  if (path.empty()) return bad(uri, "it names no token attribute");

  while (!path.empty()) {
    std::size_t semi = path.find(';');
    std::string_view attr = path.substr(0, semi);
    path = semi == std::string_view::npos ? std::string_view{} : path.substr(semi + 1);
    if (attr.empty()) continue;
    std::size_t eq = attr.find('=');
    if (eq == std::string_view::npos) {
      return bad(uri, "attribute '" + std::string(attr) + "' has no '='");
    }
    std::string name(attr.substr(0, eq));
    auto value = percent_decode(attr.substr(eq + 1));
    if (!value) return bad(uri, "attribute '" + name + "' has a broken %-escape");

    auto set = [&](std::optional<std::string>& field) -> Status {
      if (field) return bad(uri, "attribute '" + name + "' appears twice");
      field = *value;
      return {};
    };
    if (name == "token") {
      KMSD_TRY(set(out.token));
    } else if (name == "serial") {
      KMSD_TRY(set(out.serial));
    } else if (name == "manufacturer") {
      KMSD_TRY(set(out.manufacturer));
    } else if (name == "model") {
      KMSD_TRY(set(out.model));
    } else if (name == "slot-id") {
      unsigned long id = 0;
      auto [p, ec] = std::from_chars(value->data(), value->data() + value->size(), id);
      if (ec != std::errc{} || p != value->data() + value->size() || out.slot_id) {
        return bad(uri, "slot-id must be one decimal number");
      }
      out.slot_id = id;
    } else if (name == "library-manufacturer" || name == "library-description" ||
               name == "library-version" || name == "slot-description" ||
               name == "slot-manufacturer") {
      // Describe the module/slot, not the token; the module comes from token.module.
    } else if (name == "object" || name == "id" || name == "type") {
      return bad(uri, "attribute '" + name +
                          "' names an object, not a token; kmsd finds its objects by the "
                          "labels in [token.labels]");
    } else {
      return bad(uri, "unknown attribute '" + name + "'");
    }
  }
  if (!out.token && !out.serial && !out.manufacturer && !out.model && !out.slot_id) {
    return bad(uri, "it names no token attribute (token=, serial=, manufacturer=, model=)");
  }
  return out;
}

bool TokenUri::matches(const SlotInfo& s) const {
  if (token && *token != s.token_label) return false;
  if (serial && *serial != s.token_serial) return false;
  if (manufacturer && *manufacturer != s.manufacturer) return false;
  if (model && *model != s.model) return false;
  if (slot_id && *slot_id != s.slot_id) return false;
  return true;
}

}  // namespace kmsd::hsm

// kmsd.toml loader and validator. One pass over the parsed table: every key is checked for
// type and range, every unknown key is reported (with a suggestion when one is close), every
// missing required key is reported, and the result is every problem in line order.
#include "config/config.hpp"

#include <arpa/inet.h>
#include <dlfcn.h>
#include <netinet/in.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string_view>
#include <utility>

#include <openssl/objects.h>
#include <toml++/toml.h>

#include "hsm/uri.hpp"

namespace kmsd::config {

namespace fs = std::filesystem;
using namespace std::string_view_literals;

// ---------------------------------------------------------------------------------------------
// Public helpers
// ---------------------------------------------------------------------------------------------

std::string Endpoint::to_string() const {
  if (host.find(':') != std::string::npos) return "[" + host + "]:" + std::to_string(port);
  return host + ":" + std::to_string(port);
}

namespace {
std::string public_url(const Config& cfg, const char* path) {
  const Endpoint& e = cfg.server.public_listen;
  if (e.host == "0.0.0.0" || e.host == "::") return "";
  return "http://" + e.to_string() + path;
}
}  // namespace

std::string crl_url_for(const Config& cfg) {
  return cfg.ca.crl_url.empty() ? public_url(cfg, "/crl") : cfg.ca.crl_url;
}
std::string ocsp_url_for(const Config& cfg) {
  return cfg.ca.ocsp_url.empty() ? public_url(cfg, "/ocsp") : cfg.ca.ocsp_url;
}

const char* to_string(StartupSource s) noexcept {
  switch (s) {
    case StartupSource::kPrompt:
      return "prompt";
    case StartupSource::kFile:
      return "file";
    case StartupSource::kCard:
      return "card";
    case StartupSource::kQuorum:
      return "quorum";
  }
  return "unknown";
}

std::string Problem::to_string(const fs::path& file) const {
  std::string out = file.string();
  if (line != 0) out += ":" + std::to_string(line);
  out += ": ";
  if (!key.empty()) out += key + ": ";
  out += message;
  return out;
}

namespace {

// ---------------------------------------------------------------------------------------------
// The TOML spelling of enumerations. Config owns these strings; hsm/ owns the enums.
// ---------------------------------------------------------------------------------------------

constexpr std::array<std::pair<std::string_view, hsm::WrapMechanism>, 3> kWrapMechanisms{{
    {"aes-key-wrap-pad", hsm::WrapMechanism::kAesKeyWrapPad},
    {"aes-gcm", hsm::WrapMechanism::kAesGcm},
    {"aes-cbc-pad-hmac", hsm::WrapMechanism::kAesCbcPadHmac},
}};

constexpr std::array<std::pair<std::string_view, hsm::KeyType>, 4> kKeyTypes{{
    {"ec-p256", hsm::KeyType::kEcP256},
    {"ec-p384", hsm::KeyType::kEcP384},
    {"rsa-2048", hsm::KeyType::kRsa2048},
    {"rsa-3072", hsm::KeyType::kRsa3072},
}};

constexpr std::array<std::pair<std::string_view, StartupSource>, 4> kStartupSources{{
    {"prompt", StartupSource::kPrompt},
    {"file", StartupSource::kFile},
    {"card", StartupSource::kCard},
    {"quorum", StartupSource::kQuorum},
}};

// Keys kmsd generates and escrows for encryption certificates: EC P-384 is left out because
// S/MIME clients that read P-256 (ECDH) and RSA widely do not all read P-384.
constexpr std::array<std::pair<std::string_view, hsm::KeyType>, 3> kEncryptionKeyTypes{{
    {"ec-p256", hsm::KeyType::kEcP256},
    {"rsa-2048", hsm::KeyType::kRsa2048},
    {"rsa-3072", hsm::KeyType::kRsa3072},
}};

constexpr std::array<std::pair<std::string_view, RenewKey>, 2> kRenewKey{{
    {"new", RenewKey::kNew},
    {"same", RenewKey::kSame},
}};

constexpr std::array<std::pair<std::string_view, std::string_view>, 3> kDigests{{
    {"sha256", "sha256"},
    {"sha384", "sha384"},
    {"sha512", "sha512"},
}};

constexpr std::array<std::pair<std::string_view, std::string_view>, 5> kLogLevels{{
    {"trace", "trace"},
    {"debug", "debug"},
    {"info", "info"},
    {"warn", "warn"},
    {"error", "error"},
}};

template <typename E, std::size_t N>
std::string_view spelling(const std::array<std::pair<std::string_view, E>, N>& table, E value) {
  for (const auto& [name, v] : table) {
    if (v == value) return name;
  }
  return "?";
}

// ---------------------------------------------------------------------------------------------
// The schema: which keys exist where. Used for unknown-key detection and suggestions.
// ---------------------------------------------------------------------------------------------

struct SectionSchema {
  std::string_view name;  // dotted
  std::vector<std::string_view> keys;
};

const std::vector<SectionSchema>& schema() {
  static const std::vector<SectionSchema> kSchema{
      {"server",
       {"public_listen", "admin_listen", "tls_names", "unseal_socket", "worker_threads",
        "io_threads", "max_body_bytes", "request_timeout_seconds", "max_header_bytes",
        "header_timeout_seconds", "body_timeout_seconds", "max_connections_per_source",
        "enroll_rate_per_source", "enroll_rate_per_identity", "long_request_timeout_seconds",
        "metrics_listen"}},
      {"token",
       {"module", "uri", "pool_size", "wrap_mechanism", "labels", "call_timeout_milliseconds",
        "probe_interval_milliseconds"}},
      {"token.labels", {"master_prefix", "master_mac_prefix", "ca", "audit"}},
      {"ca",
       {"key_type", "subject", "validity_days", "digest", "crl_url", "ocsp_url", "crl_path",
        "crl_next_update_hours", "ocsp_validity_minutes"}},
      {"admin", {"cert_validity_days", "key_type"}},
      {"store", {"path"}},
      {"startup",
       {"source", "file", "card_module", "card_uri", "card_label", "quorum_timeout_minutes"}},
      {"policy",
       {"x509_versions", "key_types", "max_validity_days", "max_subject_length",
        "max_user_id_length", "max_email_length", "max_display_name_length", "signing",
        "encryption"}},
      {"policy.signing", {"key_usage", "extended_key_usage"}},
      {"policy.encryption", {"key_usage", "extended_key_usage"}},
      {"enrollment",
       {"token_ttl_days", "max_failed_attempts", "cert_validity_days", "encryption_key_type",
        "renew_encryption_key"}},
      {"approvals", {"ttl_hours", "required"}},
      {"approvals.required",
       {"revoke", "recover", "admin_add", "admin_remove", "policy_change", "dr", "key_export",
        "card_split", "master_key_rotate", "master_key_retire"}},
      {"log", {"level", "file"}},
  };
  return kSchema;
}

const SectionSchema* find_schema(std::string_view name) {
  for (const auto& s : schema()) {
    if (s.name == name) return &s;
  }
  return nullptr;
}

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    if (c == '-') c = '_';
  }
  return out;
}

// Optimal string alignment distance (Levenshtein plus adjacent transpositions).
std::size_t edit_distance(std::string_view a, std::string_view b) {
  const std::size_t n = a.size(), m = b.size();
  std::vector<std::vector<std::size_t>> d(n + 1, std::vector<std::size_t>(m + 1));
  for (std::size_t i = 0; i <= n; ++i) d[i][0] = i;
  for (std::size_t j = 0; j <= m; ++j) d[0][j] = j;
  for (std::size_t i = 1; i <= n; ++i) {
    for (std::size_t j = 1; j <= m; ++j) {
      const std::size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1]) {
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
      }
    }
  }
  return d[n][m];
}

// The closest candidate to WORD, if it is close enough to be a plausible typo.
std::optional<std::string_view> nearest(std::string_view word,
                                        const std::vector<std::string_view>& candidates) {
  const std::string w = lower(word);
  std::optional<std::string_view> best;
  std::size_t best_d = std::numeric_limits<std::size_t>::max();
  for (std::string_view c : candidates) {
    const std::string lc = lower(c);
    std::size_t d = edit_distance(w, lc);
    // A truncated or extended key ("max_validity" for "max_validity_days") is a near miss too.
    const bool prefix =
        std::min(w.size(), lc.size()) >= 4 && (lc.starts_with(w) || w.starts_with(lc));
    if (prefix) d = std::min<std::size_t>(d, 1);
    if (d < best_d) {
      best_d = d;
      best = c;
    }
  }
  const std::size_t limit = std::clamp<std::size_t>(w.size() / 4, 1, 3);
  if (best && best_d <= limit) return best;
  return std::nullopt;
}

std::string in_quotes(std::string_view s) {
  return "\"" + std::string(s) + "\"";
}

std::string type_name(toml::node_type t) {
  switch (t) {
    case toml::node_type::none:
      return "nothing";
    case toml::node_type::table:
      return "a table";
    case toml::node_type::array:
      return "an array";
    case toml::node_type::string:
      return "a string";
    case toml::node_type::integer:
      return "an integer";
    case toml::node_type::floating_point:
      return "a floating-point number";
    case toml::node_type::boolean:
      return "a boolean";
    case toml::node_type::date:
      return "a date";
    case toml::node_type::time:
      return "a time";
    case toml::node_type::date_time:
      return "a date-time";
  }
  return "an unknown value";
}

std::uint32_t line_of(const toml::node& n) {
  return n.source().begin.line;
}

bool printable_ascii(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return c >= 0x20 && c <= 0x7e; });
}

bool is_digits(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

bool is_ipv4(const std::string& s) {
  in_addr a{};
  return ::inet_pton(AF_INET, s.c_str(), &a) == 1;
}

bool is_ipv6(const std::string& s) {
  in6_addr a{};
  return ::inet_pton(AF_INET6, s.c_str(), &a) == 1;
}

// RFC 1123 host name, optionally with a leading "*." wildcard label when WILDCARD.
bool is_dns_name(std::string_view s, bool wildcard) {
  if (wildcard && s.starts_with("*.")) s.remove_prefix(2);
  if (s.empty() || s.size() > 253) return false;
  if (s.back() == '.') s.remove_suffix(1);
  std::size_t start = 0;
  while (start <= s.size()) {
    std::size_t dot = s.find('.', start);
    if (dot == std::string_view::npos) dot = s.size();
    std::string_view label = s.substr(start, dot - start);
    if (label.empty() || label.size() > 63) return false;
    if (label.front() == '-' || label.back() == '-') return false;
    for (char c : label) {
      const bool ok =
          (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-';
      if (!ok) return false;
    }
    start = dot + 1;
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Value validators: return an error message, or nullopt when the value is fine.
// ---------------------------------------------------------------------------------------------

std::optional<std::string> parse_endpoint(std::string_view text, Endpoint& out) {
  const std::string example = " (for example \"127.0.0.1:8443\" or \"[::1]:8443\")";
  std::string host;
  std::string_view port;
  if (text.starts_with('[')) {
    const std::size_t close = text.find(']');
    if (close == std::string_view::npos) return "unterminated '[' in IPv6 address" + example;
    host = std::string(text.substr(1, close - 1));
    if (!is_ipv6(host)) return in_quotes(host) + " is not an IPv6 address" + example;
    std::string_view rest = text.substr(close + 1);
    if (!rest.starts_with(':')) return "expected \":PORT\" after \"]\"" + example;
    port = rest.substr(1);
  } else {
    const std::size_t colon = text.rfind(':');
    if (colon == std::string_view::npos) return "expected \"host:port\"" + example;
    host = std::string(text.substr(0, colon));
    port = text.substr(colon + 1);
    if (host.find(':') != std::string::npos) {
      return "IPv6 addresses must be written in brackets" + example;
    }
    if (host.empty()) return "the host is empty" + example;
    if (!is_ipv4(host) && !is_dns_name(host, false)) {
      return in_quotes(host) + " is neither an IP address nor a host name" + example;
    }
  }
  if (!is_digits(port) || port.size() > 5) {
    return "the port " + in_quotes(port) + " is not a number between 1 and 65535";
  }
  const unsigned long p = std::stoul(std::string(port));
  if (p < 1 || p > 65535) return "the port " + std::string(port) + " is not between 1 and 65535";
  out.host = host;
  out.port = static_cast<std::uint16_t>(p);
  return std::nullopt;
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// RFC 7512 pk11-pchar (path) or pk11-qchar (query, also allows '/' and '?').
bool uri_char_ok(char c, bool query) {
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) return true;
  constexpr std::string_view kUnreserved = "-._~";
  constexpr std::string_view kResAvail = ":[]@!$'()*+,=";
  if (kUnreserved.find(c) != std::string_view::npos) return true;
  if (kResAvail.find(c) != std::string_view::npos) return true;
  if (!query && c == '&') return true;
  if (query && (c == '/' || c == '?' || c == '|')) return true;
  return false;
}

std::string describe_char(char c) {
  if (c == ' ') return "a space";
  if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) return "a control character";
  if (static_cast<unsigned char>(c) >= 0x80) return "a non-ASCII byte";
  return std::string("'") + c + "'";
}

// Percent-decodes VALUE, or explains what is wrong with it.
std::optional<std::string> uri_decode(std::string_view attr, std::string_view value, bool query,
                                      std::string& decoded) {
  decoded.clear();
  for (std::size_t i = 0; i < value.size(); ++i) {
    const char c = value[i];
    if (c == '%') {
      if (i + 2 >= value.size() || hex_value(value[i + 1]) < 0 || hex_value(value[i + 2]) < 0) {
        return "attribute \"" + std::string(attr) +
               "\": '%' must be followed by two hexadecimal digits (e.g. %20 for a space)";
      }
      decoded += static_cast<char>(hex_value(value[i + 1]) * 16 + hex_value(value[i + 2]));
      i += 2;
      continue;
    }
    if (!uri_char_ok(c, query)) {
      return "attribute \"" + std::string(attr) + "\": " + describe_char(c) +
             " must be percent-encoded" + (c == ' ' ? " as %20" : "");
    }
    decoded += c;
  }
  return std::nullopt;
}

// Validates an RFC 7512 URI naming a token. Returns every problem found, in order.
std::vector<std::string> check_token_uri(std::string_view uri) {
  std::vector<std::string> errors;
  constexpr std::string_view kScheme = "pkcs11:";
  if (!uri.starts_with(kScheme)) {
    if (lower(uri.substr(0, kScheme.size())) == "pkcs11:") {
      errors.push_back("the scheme must be written in lower case: \"pkcs11:\"");
    } else {
      errors.push_back("a PKCS#11 URI starts with \"pkcs11:\" (for example \"pkcs11:token=kmsd\")");
    }
    return errors;
  }
  std::string_view rest = uri.substr(kScheme.size());
  std::string_view path = rest;
  std::string_view query;
  if (const std::size_t q = rest.find('?'); q != std::string_view::npos) {
    path = rest.substr(0, q);
    query = rest.substr(q + 1);
  }
  if (const std::size_t h = path.find('#'); h != std::string_view::npos) {
    errors.push_back("'#' is not allowed in a PKCS#11 URI");
    path = path.substr(0, h);
  }

  // Known path attributes and the longest decoded value each may have (0: no limit).
  static const std::map<std::string_view, std::size_t, std::less<>> kTokenAttrs{
      {"token", 32},
      {"serial", 16},
      {"manufacturer", 32},
      {"model", 16},
      {"slot-id", 0},
      {"slot-description", 64},
      {"slot-manufacturer", 32},
      {"library-manufacturer", 32},
      {"library-description", 32},
      {"library-version", 0},
  };
  static const std::set<std::string_view, std::less<>> kObjectAttrs{"object", "type", "id"};

  std::vector<std::string_view> known_names;
  for (const auto& [name, len] : kTokenAttrs) known_names.push_back(name);

  std::set<std::string, std::less<>> seen;
  bool has_token = false, has_serial = false;
  if (!path.empty()) {
    std::size_t start = 0;
    while (start <= path.size()) {
      std::size_t semi = path.find(';', start);
      if (semi == std::string_view::npos) semi = path.size();
      const std::string_view attr = path.substr(start, semi - start);
      start = semi + 1;
      if (attr.empty()) {
        errors.push_back("empty attribute (stray ';')");
        continue;
      }
      const std::size_t eq = attr.find('=');
      if (eq == std::string_view::npos) {
        errors.push_back("attribute \"" + std::string(attr) +
                         "\" has no '=' (expected NAME=VALUE)");
        continue;
      }
      const std::string_view name = attr.substr(0, eq);
      const std::string_view value = attr.substr(eq + 1);
      std::string decoded;
      if (auto e = uri_decode(name, value, false, decoded)) {
        errors.push_back(*e);
        continue;
      }
      const auto it = kTokenAttrs.find(name);
      if (it == kTokenAttrs.end()) {
        if (kObjectAttrs.contains(name)) {
          errors.push_back("attribute \"" + std::string(name) +
                           "\" selects an object; token.uri must name a token only");
        } else {
          std::string msg = "unknown path attribute \"" + std::string(name) + "\"";
          if (auto s = nearest(name, known_names))
            msg += "; did you mean \"" + std::string(*s) + "\"?";
          errors.push_back(msg);
        }
        continue;
      }
      if (!seen.insert(std::string(name)).second) {
        errors.push_back("attribute \"" + std::string(name) + "\" appears more than once");
        continue;
      }
      if (decoded.empty()) {
        errors.push_back("attribute \"" + std::string(name) + "\" has an empty value");
        continue;
      }
      if (it->second != 0 && decoded.size() > it->second) {
        errors.push_back("attribute \"" + std::string(name) + "\" is " +
                         std::to_string(decoded.size()) + " bytes long; PKCS#11 allows at most " +
                         std::to_string(it->second));
        continue;
      }
      if (name == "slot-id" && !is_digits(decoded)) {
        errors.push_back("attribute \"slot-id\" must be a decimal number");
        continue;
      }
      if (name == "library-version") {
        const std::size_t dot = decoded.find('.');
        const bool ok = dot == std::string::npos
                            ? is_digits(decoded)
                            : is_digits(std::string_view(decoded).substr(0, dot)) &&
                                  is_digits(std::string_view(decoded).substr(dot + 1));
        if (!ok) {
          errors.push_back("attribute \"library-version\" must be MAJOR or MAJOR.MINOR");
          continue;
        }
      }
      if (name == "token") has_token = true;
      if (name == "serial") has_serial = true;
    }
  }

  if (!query.empty()) {
    std::size_t start = 0;
    while (start <= query.size()) {
      std::size_t amp = query.find('&', start);
      if (amp == std::string_view::npos) amp = query.size();
      const std::string_view attr = query.substr(start, amp - start);
      start = amp + 1;
      const std::string_view name = attr.substr(0, attr.find('='));
      if (name == "pin-value" || name == "pin-source") {
        errors.push_back("query attribute \"" + std::string(name) +
                         "\": the PIN never goes in the URI; kmsd gets it through [startup]");
      } else if (name == "module-name" || name == "module-path") {
        errors.push_back("query attribute \"" + std::string(name) +
                         "\": the module is chosen by token.module");
      } else {
        errors.push_back("unknown query attribute \"" + std::string(name) + "\"");
      }
    }
  }

  if (!has_token && !has_serial && errors.empty()) {
    errors.push_back("the URI must select the token by \"token=LABEL\" or \"serial=SERIAL\"");
  }
  return errors;
}

// Validates the OpenSSL one-line subject form "/K=V/K=V".
std::optional<std::string> check_subject(std::string_view subject) {
  constexpr std::size_t kMaxLength = 1024;
  if (subject.empty()) return "the subject is empty";
  if (subject.size() > kMaxLength) {
    return "the subject is " + std::to_string(subject.size()) + " characters long; at most " +
           std::to_string(kMaxLength) + " are allowed";
  }
  if (subject.front() != '/') {
    return "the subject must start with '/' (for example \"/O=Example/CN=kmsd CA\")";
  }
  // Upper bounds from RFC 5280 appendix A (ub-*), in characters.
  static const std::map<std::string_view, std::size_t, std::less<>> kAttrs{
      {"C", 2},   {"ST", 128},           {"L", 128},           {"O", 64}, {"OU", 64}, {"CN", 64},
      {"DC", 63}, {"emailAddress", 255}, {"serialNumber", 64},
  };
  // Split on unescaped '/', unescaping "\x" to "x".
  std::vector<std::string> rdns;
  std::string cur;
  for (std::size_t i = 1; i < subject.size(); ++i) {
    const char c = subject[i];
    if (c == '\\') {
      if (i + 1 == subject.size()) return "the subject ends with a lone '\\'";
      cur += subject[++i];
    } else if (c == '/') {
      rdns.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  rdns.push_back(cur);
  bool any = false;
  for (std::size_t i = 0; i < rdns.size(); ++i) {
    const std::string& rdn = rdns[i];
    const std::string where = "component " + std::to_string(i + 1);
    if (rdn.empty()) {
      if (i + 1 == rdns.size() && i > 0) continue;  // a trailing '/' is harmless
      return where + " is empty (\"//\" or a lone \"/\")";
    }
    const std::size_t eq = rdn.find('=');
    if (eq == std::string::npos) return where + " \"" + rdn + "\" is not KEY=VALUE";
    const std::string key = rdn.substr(0, eq);
    const std::string value = rdn.substr(eq + 1);
    const auto it = kAttrs.find(key);
    if (it == kAttrs.end()) {
      std::vector<std::string_view> names;
      for (const auto& [k, n] : kAttrs) names.push_back(k);
      std::string msg = "unknown attribute \"" + key +
                        "\" (allowed: C ST L O OU CN emailAddress DC serialNumber)";
      if (auto s = nearest(key, names)) msg += "; did you mean \"" + std::string(*s) + "\"?";
      return msg;
    }
    if (value.empty()) return "attribute \"" + key + "\" has an empty value";
    for (char c : value) {
      if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
        return "attribute \"" + key + "\" contains a control character";
      }
    }
    if (key == "C") {
      const bool letters = value.size() == 2 && std::all_of(value.begin(), value.end(), [](char c) {
                             return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z');
                           });
      if (!letters)
        return "attribute \"C\" must be a two-letter country code, found \"" + value + "\"";
    } else if (value.size() > it->second) {
      return "attribute \"" + key + "\" is " + std::to_string(value.size()) +
             " characters long; at most " + std::to_string(it->second) + " are allowed";
    }
    if (key == "emailAddress" && value.find('@') == std::string::npos) {
      return "attribute \"emailAddress\" is not an e-mail address";
    }
    any = true;
  }
  if (!any) return "the subject has no attributes";
  return std::nullopt;
}

// Key usage names: the short names of OpenSSL's keyUsage bit table (RFC 5280 4.2.1.3).
constexpr std::array<std::string_view, 9> kKeyUsages{
    "digitalSignature", "nonRepudiation", "keyEncipherment", "dataEncipherment", "keyAgreement",
    "keyCertSign",      "cRLSign",        "encipherOnly",    "decipherOnly",
};

// Extended key usages a user certificate may sensibly carry, by OpenSSL NID; their names are
// OpenSSL's short names (OBJ_nid2sn), so config and certificates spell them alike.
constexpr std::array<int, 10> kExtendedKeyUsageNids{
    NID_email_protect, NID_client_auth,         NID_server_auth,        NID_code_sign,
    NID_time_stamp,    NID_OCSP_sign,           NID_ms_smartcard_login, NID_ms_efs,
    NID_ipsec_IKE,     NID_anyExtendedKeyUsage,
};

std::string list_names(const std::vector<std::string_view>& names) {
  std::string out;
  for (std::string_view n : names) out += (out.empty() ? "" : ", ") + std::string(n);
  return out;
}

std::optional<std::string> check_key_usage(std::string_view name) {
  const std::vector<std::string_view> known(kKeyUsages.begin(), kKeyUsages.end());
  if (name == "keyCertSign" || name == "cRLSign") {
    return in_quotes(name) + " is a CA usage; user certificates must not carry it";
  }
  if (std::find(known.begin(), known.end(), name) != known.end()) return std::nullopt;
  std::string msg = "unknown key usage " + in_quotes(name) + "; known: " + list_names(known);
  if (auto s = nearest(name, known)) msg += " (did you mean " + in_quotes(*s) + "?)";
  return msg;
}

std::optional<std::string> check_extended_key_usage(std::string_view name) {
  std::vector<std::string_view> known;
  for (int nid : kExtendedKeyUsageNids) known.emplace_back(OBJ_nid2sn(nid));
  const std::string n(name);
  const auto is_eku = [](int nid) {
    return nid != NID_undef && std::find(kExtendedKeyUsageNids.begin(), kExtendedKeyUsageNids.end(),
                                         nid) != kExtendedKeyUsageNids.end();
  };
  if (is_eku(OBJ_sn2nid(n.c_str()))) return std::nullopt;
  if (const int nid = OBJ_ln2nid(n.c_str()); is_eku(nid)) {
    return "write the short name " + in_quotes(OBJ_nid2sn(nid)) + " instead of " + in_quotes(name);
  }
  if (OBJ_sn2nid(n.c_str()) != NID_undef || OBJ_ln2nid(n.c_str()) != NID_undef) {
    return in_quotes(name) + " is not an extended key usage; known: " + list_names(known);
  }
  std::string msg =
      "unknown extended key usage " + in_quotes(name) + "; known: " + list_names(known);
  if (auto s = nearest(name, known)) msg += " (did you mean " + in_quotes(*s) + "?)";
  return msg;
}

// Opens the module the way the daemon will and checks it is a PKCS#11 module.
std::optional<std::string> check_module(const fs::path& module) {
  std::error_code ec;
  const fs::file_status st = fs::status(module, ec);
  if (ec || !fs::exists(st)) {
    return "the module " + module.string() + " does not exist";
  }
  if (!fs::is_regular_file(st)) {
    return "the module " + module.string() + " is not a regular file";
  }
  if (::access(module.c_str(), R_OK) != 0) {
    return "the module " + module.string() + " is not readable: " + std::strerror(errno);
  }
  ::dlerror();
  void* handle = ::dlopen(module.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* err = ::dlerror();
    return "the module " + module.string() +
           " cannot be loaded: " + (err != nullptr ? err : "unknown dlopen error");
  }
  ::dlerror();
  void* sym = ::dlsym(handle, "C_GetFunctionList");
  ::dlclose(handle);
  if (sym == nullptr) {
    return "the module " + module.string() +
           " is a shared library but not a PKCS#11 module (it does not export C_GetFunctionList)";
  }
  return std::nullopt;
}

// ---------------------------------------------------------------------------------------------
// The loader
// ---------------------------------------------------------------------------------------------

struct Section {
  std::string name;                    // dotted path
  const toml::table* table = nullptr;  // null when absent (or not a table)
  std::uint32_t line = 0;              // header line, 0 when absent
  bool wrong_type = false;             // present but not a table (reported once, as such)
};

class Loader {
 public:
  explicit Loader(fs::path base_dir) : base_dir_(std::move(base_dir)) {}

  std::vector<Problem> take_problems() {
    std::stable_sort(problems_.begin(), problems_.end(), [](const Problem& a, const Problem& b) {
      const auto ka = a.line == 0 ? std::numeric_limits<std::uint32_t>::max() : a.line;
      const auto kb = b.line == 0 ? std::numeric_limits<std::uint32_t>::max() : b.line;
      return ka < kb;
    });
    return std::move(problems_);
  }

  void problem(std::uint32_t line, std::string key, std::string message) {
    problems_.push_back(Problem{line, std::move(key), std::move(message)});
  }

  void run(const toml::table& root, Config& cfg) {
    check_unknown(root, "");
    load_server(section(root, "server"), cfg.server);
    load_token(root, cfg.token);
    load_ca(section(root, "ca"), cfg.ca);
    load_admin(section(root, "admin"), cfg.admin);
    load_store(section(root, "store"), cfg.store);
    load_startup(section(root, "startup"), cfg.startup);
    load_policy(section(root, "policy"), cfg.policy);
    load_enrollment(section(root, "enrollment"), cfg.enrollment);
    load_approvals(root, cfg.approvals);
    load_log(section(root, "log"), cfg.log);
    cross_checks(root, cfg);
  }

 private:
  // ---- structure ----

  // Every key of TABLE (at PATH) that the schema does not know is a problem.
  void check_unknown(const toml::table& table, const std::string& path) {
    std::vector<std::string_view> known;
    if (path.empty()) {
      for (const auto& s : schema()) {
        if (s.name.find('.') == std::string_view::npos) known.push_back(s.name);
      }
    } else if (const SectionSchema* s = find_schema(path)) {
      known = s->keys;
    }
    for (const auto& [k, v] : table) {
      const std::string name(k.str());
      const std::string full = path.empty() ? name : path + "." + name;
      if (std::find(known.begin(), known.end(), name) != known.end()) {
        if (const toml::table* sub = v.as_table(); sub != nullptr && find_schema(full) != nullptr) {
          check_unknown(*sub, full);
        }
        continue;
      }
      std::uint32_t line = k.source().begin.line;
      if (line == 0) line = line_of(v);
      std::string msg = "unknown key";
      if (auto s = nearest(name, known)) {
        msg += "; did you mean '" + std::string(*s) + "'?";
      } else if (auto home = home_of(name, path)) {
        msg += "; '" + name + "' belongs in [" + *home + "]";
      }
      problem(line, full, msg);
    }
  }

  // The section where a key named NAME lives, if any (other than CURRENT).
  static std::optional<std::string> home_of(const std::string& name, const std::string& current) {
    for (const auto& s : schema()) {
      if (s.name == current) continue;
      if (std::find(s.keys.begin(), s.keys.end(), name) != s.keys.end()) return std::string(s.name);
    }
    return std::nullopt;
  }

  Section section(const toml::table& parent, std::string_view name,
                  const std::string& prefix = "") {
    Section s;
    s.name = prefix.empty() ? std::string(name) : prefix + "." + std::string(name);
    const toml::node* n = parent.get(name);
    if (n == nullptr) return s;
    if (const toml::table* t = n->as_table()) {
      s.table = t;
      s.line = line_of(*t);
      return s;
    }
    problem(line_of(*n), s.name,
            "expected a table ([" + s.name + "]), found " + type_name(n->type()));
    s.line = line_of(*n);
    s.wrong_type = true;
    return s;
  }

  static std::string key_of(const Section& s, std::string_view key) {
    return s.name + "." + std::string(key);
  }

  const toml::node* get(const Section& s, std::string_view key, bool required) {
    const toml::node* n = s.table != nullptr ? s.table->get(key) : nullptr;
    if (n == nullptr && required && !s.wrong_type) {
      problem(s.line, key_of(s, key),
              "required key is missing" +
                  (s.table != nullptr ? " from [" + s.name + "]"
                                      : std::string("; add it to a [") + s.name + "] section"));
    }
    return n;
  }

  void type_error(const Section& s, std::string_view key, const toml::node& n,
                  std::string_view expected) {
    std::string msg = "expected " + std::string(expected) + ", found " + type_name(n.type());
    if (expected == "an integer" && n.is_string()) {
      const std::string v = n.as_string()->get();
      if (is_digits(v)) msg += " (write " + v + " without quotes)";
    }
    problem(line_of(n), key_of(s, key), msg);
  }

  std::optional<std::string> str(const Section& s, std::string_view key, bool required,
                                 std::uint32_t* line = nullptr) {
    const toml::node* n = get(s, key, required);
    if (n == nullptr) return std::nullopt;
    if (line != nullptr) *line = line_of(*n);
    if (!n->is_string()) {
      type_error(s, key, *n, "a string");
      return std::nullopt;
    }
    return n->as_string()->get();
  }

  std::optional<std::int64_t> integer(const Section& s, std::string_view key, std::int64_t lo,
                                      std::int64_t hi, bool required) {
    const toml::node* n = get(s, key, required);
    if (n == nullptr) return std::nullopt;
    if (!n->is_integer()) {
      type_error(s, key, *n, "an integer");
      return std::nullopt;
    }
    const std::int64_t v = n->as_integer()->get();
    if (v < lo || v > hi) {
      problem(line_of(*n), key_of(s, key),
              "must be between " + std::to_string(lo) + " and " + std::to_string(hi) + ", found " +
                  std::to_string(v));
      return std::nullopt;
    }
    return v;
  }

  template <typename T>
  void set_int(const Section& s, std::string_view key, std::int64_t lo, std::int64_t hi, T& out) {
    if (auto v = integer(s, key, lo, hi, false)) out = static_cast<T>(*v);
  }

  template <typename E, std::size_t N>
  std::optional<E> choice_value(const std::string& key, const toml::node& n,
                                const std::array<std::pair<std::string_view, E>, N>& table) {
    const std::string v = n.as_string()->get();
    std::vector<std::string_view> names;
    for (const auto& [name, e] : table) {
      if (name == v) return e;
      names.push_back(name);
    }
    std::string msg = "must be one of";
    for (std::size_t i = 0; i < names.size(); ++i) {
      msg += (i == 0 ? " " : ", ") + in_quotes(names[i]);
    }
    msg += "; found " + in_quotes(v);
    if (auto s = nearest(v, names)) msg += " (did you mean " + in_quotes(*s) + "?)";
    problem(line_of(n), key, msg);
    return std::nullopt;
  }

  template <typename E, std::size_t N>
  std::optional<E> choice(const Section& s, std::string_view key,
                          const std::array<std::pair<std::string_view, E>, N>& table,
                          bool required) {
    const toml::node* n = get(s, key, required);
    if (n == nullptr) return std::nullopt;
    if (!n->is_string()) {
      type_error(s, key, *n, "a string");
      return std::nullopt;
    }
    return choice_value(key_of(s, key), *n, table);
  }

  // A non-empty path string, resolved against the config file's directory.
  std::optional<fs::path> path(const Section& s, std::string_view key, bool required,
                               std::uint32_t* line = nullptr) {
    std::uint32_t l = 0;
    auto v = str(s, key, required, &l);
    if (line != nullptr) *line = l;
    if (!v) return std::nullopt;
    if (v->empty()) {
      problem(l, key_of(s, key), "the path is empty");
      return std::nullopt;
    }
    if (v->find('\0') != std::string::npos) {
      problem(l, key_of(s, key), "the path contains a NUL character");
      return std::nullopt;
    }
    fs::path p(*v);
    if (p.is_relative()) p = base_dir_ / p;
    return p.lexically_normal();
  }

  void require_parent_dir(const Section& s, std::string_view key, std::uint32_t line,
                          const fs::path& p) {
    std::error_code ec;
    const fs::path parent = p.parent_path();
    if (fs::is_directory(p, ec)) {
      problem(line, key_of(s, key), p.string() + " is a directory; expected a file path");
      return;
    }
    if (!fs::is_directory(parent, ec)) {
      problem(line, key_of(s, key), "the directory " + parent.string() + " does not exist");
    }
  }

  // ---- sections ----

  void endpoint(const Section& s, std::string_view key, Endpoint& out) {
    std::uint32_t line = 0;
    const toml::node* n = get(s, key, true);
    if (n == nullptr) return;
    line = line_of(*n);
    if (!n->is_string()) {
      type_error(s, key, *n, "a string \"host:port\"");
      return;
    }
    if (auto e = parse_endpoint(n->as_string()->get(), out)) problem(line, key_of(s, key), *e);
  }

  void load_server(const Section& s, ServerConfig& c) {
    endpoint(s, "public_listen", c.public_listen);
    endpoint(s, "admin_listen", c.admin_listen);
    if (const toml::node* n = get(s, "tls_names", false)) {
      if (const toml::array* a = n->as_array()) {
        std::vector<std::string> names;
        if (a->empty()) {
          problem(line_of(*n), key_of(s, "tls_names"),
                  "must list at least one DNS name or IP address for the admin certificate");
        }
        for (const toml::node& e : *a) {
          if (!e.is_string()) {
            problem(line_of(e), key_of(s, "tls_names"),
                    "each entry must be a string, found " + type_name(e.type()));
            continue;
          }
          const std::string v = e.as_string()->get();
          if (!is_ipv4(v) && !is_ipv6(v) && !is_dns_name(v, true)) {
            problem(line_of(e), key_of(s, "tls_names"),
                    in_quotes(v) + " is neither a DNS name nor an IP address");
            continue;
          }
          names.push_back(v);
        }
        c.tls_names = std::move(names);
      } else {
        type_error(s, "tls_names", *n, "an array of strings");
      }
    }
    std::uint32_t line = 0;
    if (auto p = path(s, "unseal_socket", true, &line)) {
      if (p->string().size() >= sizeof(sockaddr_un::sun_path)) {
        problem(line, key_of(s, "unseal_socket"),
                "the path is " + std::to_string(p->string().size()) +
                    " bytes long; a Unix socket path may have at most " +
                    std::to_string(sizeof(sockaddr_un::sun_path) - 1));
      } else {
        c.unseal_socket = *p;
      }
    }
    set_int(s, "worker_threads", 1, 64, c.worker_threads);
    set_int(s, "io_threads", 1, 16, c.io_threads);
    set_int(s, "max_body_bytes", 1024, 64 * 1024 * 1024, c.max_body_bytes);
    set_int(s, "request_timeout_seconds", 1, 600, c.request_timeout_seconds);
    set_int(s, "max_header_bytes", 1024, 1024 * 1024, c.max_header_bytes);
    set_int(s, "header_timeout_seconds", 1, 600, c.header_timeout_seconds);
    set_int(s, "body_timeout_seconds", 1, 3600, c.body_timeout_seconds);
    set_int(s, "max_connections_per_source", 0, 100000, c.max_connections_per_source);
    set_int(s, "enroll_rate_per_source", 0, 1000000, c.enroll_rate_per_source);
    set_int(s, "enroll_rate_per_identity", 0, 1000000, c.enroll_rate_per_identity);
    set_int(s, "long_request_timeout_seconds", 1, 86400, c.long_request_timeout_seconds);
    if (const toml::node* n = get(s, "metrics_listen", false)) {
      Endpoint m;
      const std::size_t before = problems_.size();
      endpoint(s, "metrics_listen", m);
      auto wildcard = [](const std::string& h) { return h == "0.0.0.0" || h == "::"; };
      for (const Endpoint* other : {&c.public_listen, &c.admin_listen}) {
        if (problems_.size() == before && m.port == other->port &&
            (m.host == other->host || wildcard(m.host) || wildcard(other->host)))
          problem(line_of(*n), key_of(s, "metrics_listen"),
                  "conflicts with " + other->to_string() +
                      " (public_listen or admin_listen): the metrics listener needs its own port");
      }
      if (problems_.size() == before) c.metrics_listen = m;
    }
  }

  void label(const Section& s, std::string_view key, std::string& out) {
    std::uint32_t line = 0;
    auto v = str(s, key, false, &line);
    if (!v) return;
    if (v->empty()) {
      problem(line, key_of(s, key), "the label is empty");
    } else if (!printable_ascii(*v)) {
      problem(line, key_of(s, key), "the label must be printable ASCII");
    } else {
      out = *v;
    }
  }

  void load_token(const toml::table& root, TokenConfig& c) {
    const Section s = section(root, "token");
    std::uint32_t line = 0;
    if (auto p = path(s, "module", true, &line)) {
      if (auto e = check_module(*p)) {
        problem(line, key_of(s, "module"), *e);
      } else {
        c.module = *p;
      }
    }
    if (auto v = str(s, "uri", true, &line)) {
      const auto errors = check_token_uri(*v);
      for (const std::string& e : errors) problem(line, key_of(s, "uri"), e);
      if (errors.empty()) c.uri = *v;
    }
    set_int(s, "pool_size", 1, 64, c.pool_size);
    if (auto m = choice(s, "wrap_mechanism", kWrapMechanisms, false)) c.wrap = *m;
    set_int(s, "call_timeout_milliseconds", 100, 600000, c.call_timeout_milliseconds);
    set_int(s, "probe_interval_milliseconds", 10, 60000, c.probe_interval_milliseconds);

    if (s.table == nullptr) return;
    const Section l = section(*s.table, "labels", s.name);
    label(l, "master_prefix", c.labels.master_prefix);
    label(l, "master_mac_prefix", c.labels.master_mac_prefix);
    label(l, "ca", c.labels.ca);
    label(l, "audit", c.labels.audit);
  }

  void load_ca(const Section& s, CaConfig& c) {
    if (auto k = choice(s, "key_type", kKeyTypes, false)) c.key_type = *k;
    std::uint32_t line = 0;
    if (auto v = str(s, "subject", true, &line)) {
      if (auto e = check_subject(*v)) {
        problem(line, key_of(s, "subject"), *e);
      } else {
        c.subject = *v;
      }
    }
    set_int(s, "validity_days", 1, 36500, c.validity_days);
    if (auto d = choice(s, "digest", kDigests, false)) c.digest = std::string(*d);
    http_url(s, "crl_url", c.crl_url);
    http_url(s, "ocsp_url", c.ocsp_url);
    if (auto p = path(s, "crl_path", false, &line)) {
      require_parent_dir(s, "crl_path", line, *p);
      c.crl_path = *p;
    }
    set_int(s, "crl_next_update_hours", 1, 24 * 365, c.crl_next_update_hours);
    set_int(s, "ocsp_validity_minutes", 1, 7 * 24 * 60, c.ocsp_validity_minutes);
  }

  // An absolute http:// or https:// URL without spaces or commas (it goes into a certificate
  // extension as written).
  void http_url(const Section& s, std::string_view key, std::string& out) {
    std::uint32_t line = 0;
    auto v = str(s, key, false, &line);
    if (!v) return;
    const bool scheme = v->rfind("http://", 0) == 0 || v->rfind("https://", 0) == 0;
    const bool clean =
        v->find_first_of(" ,\t\r\n\"") == std::string::npos && v->find('\0') == std::string::npos;
    const std::size_t host_at = v->find("://") + 3;
    if (!scheme || !clean || v->size() <= host_at) {
      problem(
          line, key_of(s, key),
          in_quotes(*v) + " is not an absolute http:// or https:// URL without spaces or commas");
      return;
    }
    out = *v;
  }

  void load_admin(const Section& s, AdminConfig& c) {
    set_int(s, "cert_validity_days", 1, 3650, c.cert_validity_days);
    if (auto k = choice(s, "key_type", kKeyTypes, false)) c.key_type = *k;
  }

  void load_enrollment(const Section& s, EnrollmentConfig& c) {
    set_int(s, "token_ttl_days", 1, 365, c.token_ttl_days);
    set_int(s, "max_failed_attempts", 1, 100, c.max_failed_attempts);
    set_int(s, "cert_validity_days", 1, 3650, c.cert_validity_days);
    if (auto k = choice(s, "encryption_key_type", kEncryptionKeyTypes, false))
      c.encryption_key_type = *k;
    if (auto r = choice(s, "renew_encryption_key", kRenewKey, false)) c.renew_encryption_key = *r;
  }

  void load_approvals(const toml::table& root, ApprovalsConfig& c) {
    Section s = section(root, "approvals");
    set_int(s, "ttl_hours", 1, 24 * 90, c.ttl_hours);
    if (s.table == nullptr) return;
    Section r = section(*s.table, "required", s.name);
    for (auto& [operation, k] : c.required) set_int(r, operation, 1, 16, k);
    // Operations not in the built-in table count only when configured (see config.hpp).
    for (const char* op : {"card_split", "master_key_rotate", "master_key_retire"}) {
      if (r.table == nullptr || r.table->get(op) == nullptr) continue;
      int k = 0;
      set_int(r, op, 1, 16, k);
      if (k > 0) c.required[op] = k;
    }
  }

  void load_store(const Section& s, StoreConfig& c) {
    std::uint32_t line = 0;
    if (auto p = path(s, "path", true, &line)) {
      require_parent_dir(s, "path", line, *p);
      c.path = *p;
    }
  }

  void load_startup(const Section& s, StartupConfig& c) {
    const toml::node* src = s.table != nullptr ? s.table->get("source") : nullptr;
    auto source = choice(s, "source", kStartupSources, true);
    if (source) c.source = *source;
    if (auto p = path(s, "file", false)) c.file = *p;
    if (source == StartupSource::kFile && (s.table == nullptr || s.table->get("file") == nullptr)) {
      problem(src != nullptr ? line_of(*src) : s.line, key_of(s, "file"),
              "required when startup.source = \"file\": the path of the 0600 file holding the "
              "startup secret");
    }
    const bool cards = source == StartupSource::kCard || source == StartupSource::kQuorum;
    const std::string why =
        cards ? std::string(" when startup.source = \"") + to_string(*source) + "\""
              : std::string();
    std::uint32_t line = 0;
    if (auto p = path(s, "card_module", false, &line)) {
      if (auto e = check_module(*p)) {
        problem(line, key_of(s, "card_module"), *e);
      } else {
        c.card_module = *p;
      }
    } else if (cards && (s.table == nullptr || s.table->get("card_module") == nullptr)) {
      problem(src != nullptr ? line_of(*src) : s.line, key_of(s, "card_module"),
              "required" + why +
                  ": the PKCS#11 module of the operator cards (e.g. "
                  "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so)");
    }
    if (auto v = str(s, "card_uri", false, &line)) {
      auto uri = hsm::TokenUri::parse(*v);
      if (!uri.ok()) {
        problem(line, key_of(s, "card_uri"), uri.error().message);
      } else {
        c.card_uri = *v;
      }
    } else if (source == StartupSource::kCard &&
               (s.table == nullptr || s.table->get("card_uri") == nullptr)) {
      problem(src != nullptr ? line_of(*src) : s.line, key_of(s, "card_uri"),
              "required" + why +
                  ": the RFC 7512 URI of the operator card, e.g. "
                  "\"pkcs11:token=operator1\"");
    }
    label(s, "card_label", c.card_label);
    set_int(s, "quorum_timeout_minutes", 1, 24 * 60, c.quorum_timeout_minutes);
  }

  void load_policy(const Section& s, PolicyConfig& c) {
    if (const toml::node* n = get(s, "x509_versions", false)) {
      if (const toml::array* a = n->as_array()) {
        std::vector<int> versions;
        if (a->empty()) problem(line_of(*n), key_of(s, "x509_versions"), "must not be empty");
        for (const toml::node& e : *a) {
          if (!e.is_integer()) {
            problem(line_of(e), key_of(s, "x509_versions"),
                    "each entry must be an integer, found " + type_name(e.type()));
            continue;
          }
          const std::int64_t v = e.as_integer()->get();
          if (v != 1 && v != 3) {
            problem(line_of(e), key_of(s, "x509_versions"),
                    "each entry must be 1 or 3, found " + std::to_string(v));
            continue;
          }
          versions.push_back(static_cast<int>(v));
        }
        c.x509_versions = std::move(versions);
      } else {
        type_error(s, "x509_versions", *n, "an array of integers");
      }
    }
    if (const toml::node* n = get(s, "key_types", false)) {
      if (const toml::array* a = n->as_array()) {
        std::vector<hsm::KeyType> types;
        if (a->empty()) problem(line_of(*n), key_of(s, "key_types"), "must not be empty");
        for (const toml::node& e : *a) {
          if (!e.is_string()) {
            problem(line_of(e), key_of(s, "key_types"),
                    "each entry must be a string, found " + type_name(e.type()));
            continue;
          }
          if (auto t = choice_value(key_of(s, "key_types"), e, kKeyTypes)) types.push_back(*t);
        }
        c.key_types = std::move(types);
      } else {
        type_error(s, "key_types", *n, "an array of strings");
      }
    }
    set_int(s, "max_validity_days", 1, 36500, c.max_validity_days);
    set_int(s, "max_subject_length", 16, 4096, c.max_subject_length);
    set_int(s, "max_user_id_length", 1, 255, c.max_user_id_length);
    set_int(s, "max_email_length", 6, 254, c.max_email_length);
    set_int(s, "max_display_name_length", 1, 64, c.max_display_name_length);
    if (s.table == nullptr) return;
    for (auto [name, usages] : {std::pair<std::string_view, ProfileUsages*>{"signing", &c.signing},
                                {"encryption", &c.encryption}}) {
      const Section p = section(*s.table, name, s.name);
      usage_list(p, "key_usage", false, usages->key_usage);
      usage_list(p, "extended_key_usage", true, usages->extended_key_usage);
    }
  }

  // An array of key usage (or, when EXTENDED, extended key usage) names; may be empty.
  void usage_list(const Section& s, std::string_view key, bool extended,
                  std::vector<std::string>& out) {
    const toml::node* n = get(s, key, false);
    if (n == nullptr) return;
    const toml::array* a = n->as_array();
    if (a == nullptr) {
      type_error(s, key, *n, "an array of strings");
      return;
    }
    std::vector<std::string> names;
    for (const toml::node& e : *a) {
      if (!e.is_string()) {
        problem(line_of(e), key_of(s, key),
                "each entry must be a string, found " + type_name(e.type()));
        continue;
      }
      const std::string v = e.as_string()->get();
      if (auto err = extended ? check_extended_key_usage(v) : check_key_usage(v)) {
        problem(line_of(e), key_of(s, key), *err);
        continue;
      }
      if (std::find(names.begin(), names.end(), v) != names.end()) {
        problem(line_of(e), key_of(s, key), in_quotes(v) + " is listed twice");
        continue;
      }
      names.push_back(v);
    }
    out = std::move(names);
  }

  void load_log(const Section& s, LogConfig& c) {
    if (auto l = choice(s, "level", kLogLevels, false)) c.level = std::string(*l);
    std::uint32_t line = 0;
    if (auto p = path(s, "file", false, &line)) {
      require_parent_dir(s, "file", line, *p);
      c.file = *p;
    }
  }

  // ---- relations between keys ----

  std::uint32_t line_of_key(const toml::table& root, std::string_view section,
                            std::string_view key) {
    const toml::table* t = root.get_as<toml::table>(section);
    if (t == nullptr) return 0;
    if (const toml::node* n = t->get(key)) return line_of(*n);
    return line_of(*t);
  }

  void cross_checks(const toml::table& root, const Config& cfg) {
    // Two listeners on one port.
    const Endpoint& pub = cfg.server.public_listen;
    const Endpoint& adm = cfg.server.admin_listen;
    auto wildcard = [](const std::string& h) { return h == "0.0.0.0" || h == "::"; };
    if (pub.port == adm.port &&
        (pub.host == adm.host || wildcard(pub.host) || wildcard(adm.host))) {
      problem(line_of_key(root, "server", "admin_listen"), "server.admin_listen",
              "conflicts with server.public_listen (" + pub.to_string() +
                  "): the two listeners need different ports");
    }
    // Token labels must be distinct so that every object is found by its own label.
    const hsm::Labels& lb = cfg.token.labels;
    const std::array<std::pair<std::string_view, const std::string*>, 4> labels{{
        {"master_prefix", &lb.master_prefix},
        {"master_mac_prefix", &lb.master_mac_prefix},
        {"ca", &lb.ca},
        {"audit", &lb.audit},
    }};
    for (std::size_t i = 0; i < labels.size(); ++i) {
      for (std::size_t j = 0; j < i; ++j) {
        if (*labels[i].second == *labels[j].second) {
          const toml::table* tok = root.get_as<toml::table>("token");
          const toml::table* lt = tok != nullptr ? tok->get_as<toml::table>("labels") : nullptr;
          const toml::node* n = lt != nullptr ? lt->get(labels[i].first) : nullptr;
          problem(n != nullptr ? line_of(*n) : 0, "token.labels." + std::string(labels[i].first),
                  "the same label as token.labels." + std::string(labels[j].first) + " (" +
                      in_quotes(*labels[i].second) + "); every object needs its own label");
        }
      }
    }
    // A stalled token must make requests fail fast (503) before their own deadline (504).
    const toml::table* token = root.get_as<toml::table>("token");
    if (token != nullptr && token->get("call_timeout_milliseconds") != nullptr &&
        cfg.token.call_timeout_milliseconds >= cfg.server.request_timeout_seconds * 1000ULL) {
      problem(line_of_key(root, "token", "call_timeout_milliseconds"),
              "token.call_timeout_milliseconds",
              std::to_string(cfg.token.call_timeout_milliseconds) +
                  " ms is not shorter than server.request_timeout_seconds (" +
                  std::to_string(cfg.server.request_timeout_seconds) +
                  " s): a stalled token would time requests out (504) instead of refusing "
                  "them at once (503); lower it or raise the request timeout");
    }
    // Admin certificates pass the same policy check as every other certificate.
    if (cfg.admin.cert_validity_days > cfg.policy.max_validity_days) {
      problem(line_of_key(root, "admin", "cert_validity_days"), "admin.cert_validity_days",
              std::to_string(cfg.admin.cert_validity_days) +
                  " days exceeds policy.max_validity_days (" +
                  std::to_string(cfg.policy.max_validity_days) +
                  "); administrator certificates could never be issued");
    }
    // Administrator and TLS server certificates are always v3 (ca::issue).
    const auto& vs = cfg.policy.x509_versions;
    if (!vs.empty() && std::find(vs.begin(), vs.end(), 3) == vs.end()) {
      problem(line_of_key(root, "policy", "x509_versions"), "policy.x509_versions",
              "does not allow 3; administrator and TLS server certificates are always v3 and "
              "could never be issued");
    }
    if (cfg.enrollment.cert_validity_days > cfg.policy.max_validity_days) {
      problem(line_of_key(root, "enrollment", "cert_validity_days"),
              "enrollment.cert_validity_days",
              std::to_string(cfg.enrollment.cert_validity_days) +
                  " days exceeds policy.max_validity_days (" +
                  std::to_string(cfg.policy.max_validity_days) +
                  "); user certificates could never be issued");
    }
    const auto& kt = cfg.policy.key_types;
    if (!kt.empty() &&
        std::find(kt.begin(), kt.end(), cfg.enrollment.encryption_key_type) == kt.end()) {
      problem(line_of_key(root, "enrollment", "encryption_key_type"),
              "enrollment.encryption_key_type",
              in_quotes(spelling(kEncryptionKeyTypes, cfg.enrollment.encryption_key_type)) +
                  " is not in policy.key_types; encryption certificates could never be issued");
    }
    if (!kt.empty() && std::find(kt.begin(), kt.end(), cfg.admin.key_type) == kt.end()) {
      problem(line_of_key(root, "admin", "key_type"), "admin.key_type",
              in_quotes(spelling(kKeyTypes, cfg.admin.key_type)) +
                  " is not in policy.key_types; administrator certificates could never be issued");
    }
  }

  fs::path base_dir_;
  std::vector<Problem> problems_;
};

fs::path absolute_or_same(const fs::path& p) {
  std::error_code ec;
  fs::path a = fs::absolute(p, ec);
  return ec ? p : a.lexically_normal();
}

}  // namespace

LoadResult load_string(std::string_view toml_text, const fs::path& file_for_paths) {
  LoadResult result;
  try {
    const fs::path source = absolute_or_same(file_for_paths);
    result.config.source_path = source;
    Loader loader(source.parent_path());
    toml::table root;
    try {
      root = toml::parse(toml_text, source.string());
    } catch (const toml::parse_error& e) {
      result.problems.push_back(
          Problem{e.source().begin.line, "", "TOML syntax error: " + std::string(e.description())});
      return result;
    }
    loader.run(root, result.config);
    result.problems = loader.take_problems();
  } catch (const std::exception& e) {
    result.problems.push_back(Problem{0, "", std::string("internal error: ") + e.what()});
  } catch (...) {
    result.problems.push_back(Problem{0, "", "internal error while loading the configuration"});
  }
  return result;
}

LoadResult load(const fs::path& file) {
  try {
    std::error_code ec;
    if (fs::is_directory(file, ec)) {
      LoadResult r;
      r.config.source_path = absolute_or_same(file);
      r.problems.push_back(Problem{0, "", "cannot read the configuration file: it is a directory"});
      return r;
    }
    errno = 0;
    std::ifstream in(file, std::ios::binary);
    if (!in) {
      const int err = errno;
      LoadResult r;
      r.config.source_path = absolute_or_same(file);
      r.problems.push_back(Problem{0, "",
                                   std::string("cannot read the configuration file: ") +
                                       (err != 0 ? std::strerror(err) : "cannot open")});
      return r;
    }
    std::ostringstream text;
    text << in.rdbuf();
    if (in.bad()) {
      LoadResult r;
      r.config.source_path = absolute_or_same(file);
      r.problems.push_back(Problem{0, "", "cannot read the configuration file: read error"});
      return r;
    }
    return load_string(text.str(), file);
  } catch (...) {
    LoadResult r;
    r.problems.push_back(Problem{0, "", "internal error while reading the configuration file"});
    return r;
  }
}

}  // namespace kmsd::config

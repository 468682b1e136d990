// kmsd.toml: the loaded, validated configuration. Everything the daemon and kmsctl read
// from the file lives in Config; load() reports every problem with its line and key.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "common/result.hpp"
#include "hsm/token.hpp"

namespace kmsd::config {

struct Endpoint {
  std::string host;  // "127.0.0.1", "::1", "localhost", "0.0.0.0"
  std::uint16_t port = 0;
  std::string to_string() const;  // "host:port" ("[::1]:port" for IPv6)
};

enum class StartupSource { kPrompt, kFile, kCard, kQuorum };
const char* to_string(StartupSource s) noexcept;

struct ServerConfig {
  Endpoint public_listen{"127.0.0.1", 8080};  // plain HTTP: /healthz /readyz /ca.pem
  Endpoint admin_listen{"127.0.0.1", 8443};   // HTTPS, mutual TLS, /v1/...
  // DNS names / IP addresses put in the admin listener's server certificate, which kmsd
  // issues itself at unseal with an in-memory key (no TLS key on disk).
  std::vector<std::string> tls_names{"localhost", "127.0.0.1"};
  std::filesystem::path unseal_socket = "/run/kmsd/unseal.sock";
  unsigned worker_threads = 2;  // token work runs here, never on I/O threads
  unsigned io_threads = 1;
  std::size_t max_body_bytes = 1 << 20;
  unsigned request_timeout_seconds = 30;
  // Slow and hostile clients (docs/operations.md). Each refusal is a status and a sentence.
  std::size_t max_header_bytes = 16 * 1024;   // request line + headers; 431 beyond
  unsigned header_timeout_seconds = 10;       // to send the whole header (slowloris); dropped
  unsigned body_timeout_seconds = 30;         // to send the body once the header is in; dropped
  unsigned max_connections_per_source = 256;  // open connections per client address; 0 = any
  // Enrollment (/enroll/...) and CMP (/cmp) requests per minute: per client address, and per
  // user id / enrollment token / certificate (429 with Retry-After beyond). 0 = no limit.
  unsigned enroll_rate_per_source = 600;
  unsigned enroll_rate_per_identity = 10;
  // Answer deadline of the long administrator calls (bulk enable, user reports, audit
  // verify/export), which request_timeout_seconds would cut on a large store or slow token.
  unsigned long_request_timeout_seconds = 600;
  // Optional plain-HTTP listener serving only /metrics (unset: /metrics only on the admin
  // listener, mutual TLS). For a local scraper; see docs/operations.md.
  std::optional<Endpoint> metrics_listen;
};

struct TokenConfig {
  std::filesystem::path module;  // PKCS#11 module path, loaded directly
  std::string uri;               // RFC 7512 token URI
  std::size_t pool_size = 4;
  hsm::WrapMechanism wrap = hsm::WrapMechanism::kAesKeyWrapPad;
  hsm::Labels labels;
  // hsm::TokenOptions::call_timeout / probe_interval.
  unsigned call_timeout_milliseconds = 5000;
  unsigned probe_interval_milliseconds = 200;
};

struct CaConfig {
  hsm::KeyType key_type = hsm::KeyType::kEcP256;
  std::string subject = "/O=kmsd/CN=kmsd CA";  // OpenSSL one-line form, "/K=V/K=V"
  unsigned validity_days = 3650;
  std::string digest = "sha256";  // sha256 | sha384 | sha512
  // Put in every end-entity certificate (CRL distribution point, OCSP authority information
  // access). Empty: derived from server.public_listen ("http://HOST:PORT/crl", ".../ocsp")
  // by crl_url_for()/ocsp_url_for(), or left out when that listens on a wildcard address.
  std::string crl_url;
  std::string ocsp_url;
  std::filesystem::path crl_path;       // empty: the CRL is only served at /crl
  unsigned crl_next_update_hours = 24;  // nextUpdate of every CRL
  unsigned ocsp_validity_minutes = 60;  // nextUpdate of OCSP responses
};

struct AdminConfig {
  unsigned cert_validity_days = 365;
  hsm::KeyType key_type = hsm::KeyType::kEcP256;
};

struct StoreConfig {
  std::filesystem::path path;  // SQLite file
};

struct StartupConfig {
  StartupSource source = StartupSource::kPrompt;
  std::filesystem::path file;  // for kFile: must be mode 0600 (or stricter)
  // kCard / kQuorum: operator cards, any PKCS#11 token on this module (OpenSC for smart cards).
  std::filesystem::path card_module;
  // RFC 7512 URI of the card to read when the operator names none (`kmsctl unseal --card`
  // overrides it). Required for kCard; optional for kQuorum, whose cards differ.
  std::string card_uri;
  std::string card_label = "kms-startup-secret";  // the private CKO_DATA object on each card
  unsigned quorum_timeout_minutes = 10;           // pending quorum shares are dropped after
};

// What a user certificate of one profile may carry ([policy.signing], [policy.encryption]).
// Names are spelt as OpenSSL spells them: key usages as in RFC 5280 ("digitalSignature"),
// extended key usages by their OpenSSL short name ("emailProtection"). An empty list means the
// certificate carries no such extension; a profile with both lists empty needs no extensions
// at all, which is the only kind a v1 certificate can serve.
struct ProfileUsages {
  std::vector<std::string> key_usage;
  std::vector<std::string> extended_key_usage;
};

struct PolicyConfig {
  std::vector<int> x509_versions{3};  // 1 and/or 3; v1 only when listed explicitly
  std::vector<hsm::KeyType> key_types{hsm::KeyType::kEcP256, hsm::KeyType::kEcP384,
                                      hsm::KeyType::kRsa2048, hsm::KeyType::kRsa3072};
  unsigned max_validity_days = 825;
  unsigned max_subject_length = 256;      // RFC 2253 text of the subject, in characters
  unsigned max_user_id_length = 64;       // bytes
  unsigned max_email_length = 254;        // RFC 5321 path limit; never more
  unsigned max_display_name_length = 64;  // characters; X.520 ub-common-name is 64
  ProfileUsages signing{{"digitalSignature", "nonRepudiation"}, {"emailProtection"}};
  ProfileUsages encryption{{"keyEncipherment", "keyAgreement"}, {"emailProtection"}};
};

// What renewal does with the escrowed encryption key.
enum class RenewKey { kNew, kSame };  // "new": a new key is appended to the history

// Enrollment: one-time tokens and the user certificates they buy.
struct EnrollmentConfig {
  unsigned token_ttl_days = 14;                              // a token not used by then expires
  unsigned max_failed_attempts = 5;                          // wrong tokens before the token locks
  unsigned cert_validity_days = 365;                         // signing and encryption certificates
  hsm::KeyType encryption_key_type = hsm::KeyType::kEcP256;  // generated and escrowed by kmsd
  RenewKey renew_encryption_key = RenewKey::kNew;
};

// k-of-n approvals: how many distinct administrators each sensitive operation needs.
// Operations: revoke, recover, admin_add, admin_remove, policy_change, dr, key_export,
// card_split (not in the map below unless configured: an operation not listed needs 1, and
// adding it to the defaults would make every existing store's rules "change" at upgrade).
struct ApprovalsConfig {
  unsigned ttl_hours = 72;  // a pending request expires after this
  // Default 1 everywhere: a fresh KMS has a single administrator, and k > 1 before a second
  // one exists would lock every gated operation. Raise k once enough administrators exist.
  // key_export is 2: its requester has the recovery role, which an administrator granted, so
  // two people exist, and a recovery officer alone never takes a user's keys.
  std::map<std::string, int> required{{"revoke", 1},       {"recover", 1},       {"admin_add", 1},
                                      {"admin_remove", 1}, {"policy_change", 1}, {"dr", 1},
                                      {"key_export", 2}};
};

struct LogConfig {
  std::string level = "info";  // trace debug info warn error
  std::filesystem::path file;  // empty: stderr
};

struct Config {
  std::filesystem::path source_path;  // the file this was loaded from (for SIGHUP)
  ServerConfig server;
  TokenConfig token;
  CaConfig ca;
  AdminConfig admin;
  StoreConfig store;
  StartupConfig startup;
  PolicyConfig policy;
  EnrollmentConfig enrollment;
  ApprovalsConfig approvals;
  LogConfig log;
};

// The effective CRL and OCSP URLs (see CaConfig).
std::string crl_url_for(const Config& cfg);
std::string ocsp_url_for(const Config& cfg);

// One problem found in the file: where, which key, what is wrong and what to do.
struct Problem {
  std::uint32_t line = 0;  // 1-based; 0 if the problem has no position (e.g. missing key)
  std::string key;         // dotted path, e.g. "token.module"
  std::string message;
  std::string to_string(const std::filesystem::path& file) const;  // "FILE:LINE: key: message"
};

struct LoadResult {
  Config config;                  // meaningful only when problems is empty
  std::vector<Problem> problems;  // every problem, in file order
  bool ok() const { return problems.empty(); }
};

// Parses and validates FILE. Relative paths in the file are resolved against the file's
// directory. Unknown keys, missing required keys, wrong types, bad URIs, an unreadable
// module, impossible values: each is one Problem. Never throws.
LoadResult load(const std::filesystem::path& file);
LoadResult load_string(std::string_view toml_text, const std::filesystem::path& file_for_paths);

}  // namespace kmsd::config

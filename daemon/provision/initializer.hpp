// `kmsctl init`: turns an empty token and an empty store into a KMS — master key, CA key and
// audit key on the token, the CA certificate signed on the token (or a CSR for an external
// root), and the first administrator's TLS client certificate. Never overwrites anything.
#pragma once

#include <filesystem>
#include <optional>
#include <string>

#include "common/result.hpp"
#include "common/secret.hpp"
#include "config/config.hpp"
#include "daemon/store/store.hpp"
#include "hsm/token.hpp"

namespace kmsd::provision {

// Store settings written by init.
inline constexpr const char* kSettingState =
    "init_state";  // "initialized" | "awaiting_ca_certificate"
inline constexpr const char* kSettingCaSerial = "ca_serial";
inline constexpr const char* kSettingInitializedAt = "initialized_at";
inline constexpr const char* kSettingMasterVersion = "master_key_version";

// The master-key version new records are sealed under (kSettingMasterVersion; 1 when unset).
Result<std::uint32_t> master_key_version(store::Store& store);

struct AdminOptions {
  std::string name;               // CN of the first administrator
  std::filesystem::path p12_out;  // written 0600; never overwritten
  SecretBytes p12_passphrase;
};

struct InitReport {
  std::string ca_serial;
  std::string ca_subject;
  std::string ca_sha256_fingerprint;
  std::string admin_serial;
  bool awaiting_ca_certificate = false;  // --csr: install the signed certificate next
};

// What init would collide with: empty when the token and store are both empty.
std::vector<std::string> existing_state(hsm::Token& token, store::Store& store);

// Self-signed path. TOKEN must be logged in.
Result<InitReport> initialize(const config::Config& cfg, hsm::Token& token, store::Store& store,
                              const AdminOptions& admin);

// External-root path, step 1: keys on the token and a CSR at CSR_OUT; nothing else.
Result<InitReport> initialize_with_csr(const config::Config& cfg, hsm::Token& token,
                                       store::Store& store, const std::filesystem::path& csr_out);

// External-root path, step 2: installs the CA certificate signed by the external root (it must
// carry the token's CA public key and CA:TRUE) and creates the first administrator.
Result<InitReport> install_ca_certificate(const config::Config& cfg, hsm::Token& token,
                                          store::Store& store,
                                          const std::filesystem::path& ca_cert_pem,
                                          const AdminOptions& admin);

// The store's record of an issued certificate.
store::CertificateRecord certificate_record(X509* cert, store::CertKind kind);

// Loads the CA certificate recorded by init. kFailedPrecondition when init has not finished.
Result<ossl::X509Ptr> load_ca_certificate(store::Store& store);

}  // namespace kmsd::provision

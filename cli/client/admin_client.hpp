// kmsctl's HTTPS client for the admin API: mutual TLS with the administrator's PKCS#12,
// the server verified against the KMS CA (or the root above it) for the host name in the URL.
// One kept-alive connection, re-opened when the server closes it.
#pragma once

#include <chrono>
#include <filesystem>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "common/ossl.hpp"
#include "common/result.hpp"
#include "common/secret.hpp"

namespace kmsd::client {

struct ClientOptions {
  std::string server;         // "https://host:port"
  std::filesystem::path p12;  // the administrator's PKCS#12 (or a user's: its first key)
  SecretBytes p12_passphrase;
  std::filesystem::path ca_file;  // PEM: the KMS CA or the root that issued it
  std::chrono::seconds timeout{30};
  // Instead of a PKCS#12: a certificate and key already in memory (a user's signing pair).
  // With neither, no client certificate is sent (enrollment with a one-time token).
  ossl::X509Ptr client_cert{};
  ossl::EvpPkeyPtr client_key{};
};

struct Reply {
  int status = 0;
  std::string body;
  nlohmann::json json() const { return nlohmann::json::parse(body, nullptr, false); }
  // The server's {"error": "..."} sentence, or the status line when there is none.
  std::string error_text() const;
};

// The first key of a PKCS#12 file and its certificate.
Result<std::pair<ossl::EvpPkeyPtr, ossl::X509Ptr>> read_pkcs12(const std::filesystem::path& file,
                                                               const SecretBytes& passphrase);

class AdminClient {
 public:
  static Result<std::unique_ptr<AdminClient>> connect(ClientOptions options);
  ~AdminClient();

  Result<Reply> get(const std::string& target);
  Result<Reply> post(const std::string& target, const nlohmann::json& body);
  Result<Reply> del(const std::string& target);
  // A POST whose body is not JSON (a backup file for /v1/backup/check).
  Result<Reply> post_bytes(const std::string& target, const std::string& body,
                           const std::string& content_type);

  struct Impl;

 private:
  explicit AdminClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kmsd::client

// The persistent store: SQLite (WAL, foreign keys, synchronous=FULL) behind a narrow
// interface, with a schema_version table and forward migrations. Holds only public or
// sealed material: certificates, settings, and (later) users and sealed key blobs.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/result.hpp"

namespace kmsd::store {

using Bytes = std::vector<std::uint8_t>;

// Kinds of certificate the CA has issued.
enum class CertKind { kCa, kAdmin, kServer };
const char* to_string(CertKind k) noexcept;  // "ca", "admin", "server"
std::optional<CertKind> parse_cert_kind(std::string_view s) noexcept;

struct CertificateRecord {
  std::string serial;  // lower-case hex, no leading zeros stripped
  CertKind kind = CertKind::kAdmin;
  std::string subject;          // one-line RFC 2253 form
  std::int64_t not_before = 0;  // unix seconds
  std::int64_t not_after = 0;
  Bytes der;
  std::int64_t issued_at = 0;
  std::optional<std::int64_t> revoked_at;
};

enum class AdminRole { kAdmin, kAuditor, kApprover };
const char* to_string(AdminRole r) noexcept;  // "admin", "auditor", "approver"
std::optional<AdminRole> parse_admin_role(std::string_view s) noexcept;

struct AdminRecord {
  std::string name;  // unique; the certificate's CN
  AdminRole role = AdminRole::kAdmin;
  std::string cert_serial;  // references certificates.serial
  std::int64_t created_at = 0;
  std::optional<std::int64_t> removed_at;
};

// Thread-safety: one Store may be used from several threads; calls are serialized inside.
// Multi-row changes go through transaction().
class Store {
 public:
  static constexpr int kSchemaVersion = 1;

  // Opens or creates the database at PATH (mode 0600), applies forward migrations up to
  // kSchemaVersion in one transaction each. A database whose schema is newer than this
  // binary is refused with kFailedPrecondition naming both versions.
  static Result<std::unique_ptr<Store>> open(const std::filesystem::path& path);
  ~Store();

  int schema_version() const;

  // Runs FN inside BEGIN IMMEDIATE ... COMMIT; rolls back if FN returns an error or throws.
  // Nested calls join the outer transaction.
  Status transaction(const std::function<Status()>& fn);

  // Small typed settings (e.g. "initialized_at", "ca_serial", "master_key_version").
  Result<std::optional<std::string>> get_setting(const std::string& key);
  Status put_setting(const std::string& key, const std::string& value);

  Status insert_certificate(const CertificateRecord& rec);  // kAlreadyExists on duplicate serial
  Result<std::optional<CertificateRecord>> find_certificate(const std::string& serial);
  Result<std::vector<CertificateRecord>> certificates(CertKind kind);

  Status insert_admin(const AdminRecord& rec);  // kAlreadyExists on duplicate name
  Result<std::optional<AdminRecord>> find_admin(const std::string& name);
  Result<std::optional<AdminRecord>> find_admin_by_serial(const std::string& cert_serial);
  Result<std::vector<AdminRecord>> admins();  // including removed ones

 private:
  struct Impl;
  explicit Store(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kmsd::store

#include "daemon/dr/reinstall.hpp"

#include <fcntl.h>
#include <openssl/err.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <sqlite3.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>

#include "daemon/approvals/policy_gate.hpp"
#include "daemon/ca/issuer.hpp"
#include "daemon/dr/manifest.hpp"
#include "daemon/dr/staging_key.hpp"

namespace kmsd::dr {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

std::int64_t now_seconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// One SQLite connection, closed once.
struct Db {
  sqlite3* db = nullptr;
  ~Db() {
    if (db != nullptr) sqlite3_close(db);
  }
};

std::string column_text(sqlite3_stmt* st, int i) {
  const unsigned char* t = sqlite3_column_text(st, i);
  return t == nullptr ? std::string() : std::string(reinterpret_cast<const char*>(t));
}

Error db_error(sqlite3* db, const fs::path& file, const std::string& what) {
  return make_error(ErrorCode::kStore, what + " in " + file.string() + ": " +
                                           (db != nullptr ? sqlite3_errmsg(db) : "cannot open"));
}

// Runs SQL over every row of a query, calling FN with the statement.
Status each_row(sqlite3* db, const fs::path& file, const char* sql,
                const std::function<void(sqlite3_stmt*)>& fn) {
  sqlite3_stmt* st = nullptr;
  if (sqlite3_prepare_v2(db, sql, -1, &st, nullptr) != SQLITE_OK)
    return db_error(db, file,
                    "reading the old KMS database (stop the old kmsd cleanly, or give a copy)");
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) fn(st);
  sqlite3_finalize(st);
  if (rc != SQLITE_DONE)
    return db_error(db, file,
                    "reading the old KMS database (stop the old kmsd cleanly, or give a copy)");
  return {};
}

std::string random_id() {
  std::uint8_t b[16];
  RAND_bytes(b, sizeof b);
  return ossl::hex(b);
}

}  // namespace

Result<OldKms> read_old_kms(const fs::path& db_file) {
  std::error_code ec;
  if (!fs::is_regular_file(db_file, ec))
    return make_error(ErrorCode::kInvalidArgument,
                      "--old-store " + db_file.string() +
                          " is not a file: give the old kmsd's database ([store] path of the old "
                          "kmsd.toml), or a copy of it");
  Db d;
  const std::string uri = "file:" + db_file.string() + "?mode=ro";
  if (sqlite3_open_v2(uri.c_str(), &d.db, SQLITE_OPEN_READONLY | SQLITE_OPEN_URI, nullptr) !=
      SQLITE_OK)
    return db_error(d.db, db_file, "opening the old KMS database read-only");
  OldKms out;
  out.db = fs::absolute(db_file, ec);
  KMSD_TRY(each_row(d.db, db_file,
                    "SELECT id, email, display_name, dn, state FROM users ORDER BY id",
                    [&](sqlite3_stmt* st) {
                      OldUser u;
                      u.id = column_text(st, 0);
                      u.email = column_text(st, 1);
                      u.display_name = column_text(st, 2);
                      if (sqlite3_column_type(st, 3) != SQLITE_NULL) u.dn = column_text(st, 3);
                      u.state = column_text(st, 4);
                      out.users.push_back(std::move(u));
                    }));
  KMSD_TRY(each_row(d.db, db_file,
                    "SELECT user_id, version, key_id, algorithm, coalesce(cert_serial, '') "
                    "FROM key_history ORDER BY user_id, version",
                    [&](sqlite3_stmt* st) {
                      OldKey k;
                      k.user_id = column_text(st, 0);
                      k.version = sqlite3_column_int(st, 1);
                      k.key_id = column_text(st, 2);
                      k.algorithm = column_text(st, 3);
                      k.cert_serial = column_text(st, 4);
                      out.keys.push_back(std::move(k));
                    }));
  std::vector<std::uint8_t> ca_der;
  KMSD_TRY(each_row(d.db, db_file,
                    "SELECT c.der FROM certificates c JOIN settings s ON s.key = 'ca_serial' "
                    "AND s.value = c.serial",
                    [&](sqlite3_stmt* st) {
                      const auto* p = static_cast<const std::uint8_t*>(sqlite3_column_blob(st, 0));
                      ca_der.assign(p, p + sqlite3_column_bytes(st, 0));
                    }));
  if (!ca_der.empty()) {
    const unsigned char* p = ca_der.data();
    ossl::X509Ptr ca(d2i_X509(nullptr, &p, static_cast<long>(ca_der.size())));
    if (ca) {
      out.ca_sha256 = ossl::sha256_fingerprint(ca.get());
      char buf[512];
      X509_NAME_oneline(X509_get_subject_name(ca.get()), buf, sizeof buf);
      out.ca_subject = buf;
    }
    ERR_clear_error();
  }
  return out;
}

Result<std::vector<std::string>> verify_administrators(store::Store& store, X509* ca,
                                                       const std::vector<Presented>& presented) {
  std::vector<std::string> names;
  for (const auto& p : presented) {
    const bool signed_by_ca = X509_verify(p.cert, X509_get0_pubkey(ca)) == 1;
    const bool current = X509_cmp_current_time(X509_get0_notBefore(p.cert)) < 0 &&
                         X509_cmp_current_time(X509_get0_notAfter(p.cert)) > 0;
    const bool key_matches = EVP_PKEY_eq(X509_get0_pubkey(p.cert), p.key) == 1;
    ERR_clear_error();
    const std::string serial = ca::serial_hex(p.cert);
    if (!signed_by_ca)
      return make_error(ErrorCode::kPermissionDenied,
                        "the administrator certificate " + serial +
                            " was not issued by the new KMS's CA: present the PKCS#12 of an "
                            "administrator of the new KMS (kmsctl dr prepare --admin-p12)");
    if (!current)
      return make_error(ErrorCode::kPermissionDenied,
                        "the administrator certificate " + serial + " is expired or not yet valid");
    if (!key_matches)
      return make_error(ErrorCode::kPermissionDenied, "the PKCS#12 of certificate " + serial +
                                                          " holds another key than the "
                                                          "certificate's");
    KMSD_ASSIGN_OR_RETURN(auto admin, store.find_admin_by_serial(serial));
    if (!admin || admin->removed_at || admin->role != store::AdminRole::kAdmin)
      return make_error(ErrorCode::kPermissionDenied,
                        "certificate " + serial +
                            " is not that of a current administrator (role admin) of the new KMS");
    if (std::find(names.begin(), names.end(), admin->name) != names.end())
      return make_error(ErrorCode::kInvalidArgument,
                        "administrator " + admin->name +
                            " was presented twice; each approval needs another administrator");
    names.push_back(admin->name);
  }
  return names;
}

Result<int> required_approvals(store::Store& store, const std::map<std::string, int>& configured) {
  KMSD_ASSIGN_OR_RETURN(auto in_force, store.get_setting(approvals::kSettingRulesInForce));
  if (in_force) {
    json j = json::parse(*in_force, nullptr, false);
    if (j.is_discarded())
      return make_error(ErrorCode::kStore, "the approval rules in force cannot be read");
    KMSD_ASSIGN_OR_RETURN(auto rules, approvals::rules_from_json(j));
    return rules.required_for(kDrOperation);
  }
  auto it = configured.find(kDrOperation);
  return it == configured.end() ? 1 : it->second;
}

std::string reinstall_job(const OldKms& old) {
  std::string identity = "kmsd-dr-reinstall-v1\n" + old.ca_sha256 + "\n";
  for (const auto& u : old.users) identity += u.id + "\n";
  auto digest =
      ossl::sha256({reinterpret_cast<const std::uint8_t*>(identity.data()), identity.size()});
  return "dr-" + ossl::hex(std::span<const std::uint8_t>(digest.data(), 16));
}

Result<ReinstallSummary> reinstall(store::Store& store, audit::AuditLog& audit,
                                   users::UserService& users, const OldKms& old, X509* new_ca,
                                   const ReinstallOptions& o) {
  if (static_cast<int>(o.approvers.size()) < o.required)
    return make_error(ErrorCode::kPermissionDenied,
                      "dr reinstall needs " + std::to_string(o.required) +
                          " administrators of the new KMS ([approvals.required] dr); " +
                          std::to_string(o.approvers.size()) +
                          " presented: give --approver-p12 once for each of the others");
  ReinstallSummary sum;
  sum.job = reinstall_job(old);
  sum.request_id = random_id();
  sum.users = old.users.size();
  sum.retired_keys = old.keys.size();
  sum.old_ca_sha256 = old.ca_sha256;
  sum.new_ca_sha256 = ossl::sha256_fingerprint(new_ca);
  const std::string& actor = o.approvers.front();
  const std::int64_t now = now_seconds();

  json keys = json::array();
  for (const auto& k : old.keys)
    keys.push_back({{"user", k.user_id},
                    {"version", k.version},
                    {"key_id", k.key_id},
                    {"algorithm", k.algorithm},
                    {"cert_serial", k.cert_serial}});
  json params = {{"step", "reinstall"},
                 {"old_db", old.db.string()},
                 {"old_ca_sha256", old.ca_sha256},
                 {"new_ca_sha256", sum.new_ca_sha256},
                 {"users", old.users.size()},
                 {"retired_keys", old.keys.size()},
                 {"job", sum.job}};
  KMSD_TRY(store.transaction([&]() -> Status {
    store::ApprovalRequestRecord req;
    req.id = sum.request_id;
    req.operation = kDrOperation;
    req.params = params.dump();
    req.requested_by = actor;
    req.required = o.required;
    req.state = store::RequestState::kExecuted;
    req.created_at = now;
    req.expires_at = now;
    req.decided_at = now;
    req.result = json{{"executed", "offline by kmsctl dr reinstall"}}.dump();
    KMSD_TRY(store.insert_approval_request(req));
    for (const auto& name : o.approvers)
      KMSD_TRY(store.add_approval({sum.request_id, name, true, now}));
    KMSD_ASSIGN_OR_RETURN(auto retired, store.get_setting(kSettingRetired));
    if (!retired) {
      KMSD_TRY(store.put_setting(kSettingRetired, json{{"v", 1},
                                                       {"old_db", old.db.string()},
                                                       {"old_ca_sha256", old.ca_sha256},
                                                       {"retired_at", now},
                                                       {"keys", keys}}
                                                      .dump()));
    }
    json details = params;
    details["request_id"] = sum.request_id;
    details["approvers"] = o.approvers;
    details["required"] = o.required;
    return audit.append(actor, "dr.reinstall.approved", details);
  }));

  auto already = o.already_written;
  std::vector<users::UserInput> batch;
  auto flush = [&]() -> Status {
    if (batch.empty()) return {};
    users::BulkOptions bo;
    bo.job = sum.job;
    bo.include_revoked = o.include_revoked;
    KMSD_ASSIGN_OR_RETURN(auto lines, users.bulk_enable(batch, bo, actor));
    batch.clear();
    for (const auto& l : lines) ++sum.statuses[users::to_string(l.status)];
    return o.sink ? o.sink(lines) : Status{};
  };
  for (const auto& u : old.users) {
    auto it = already.find(u.id);
    if (it != already.end() && it->second > 0) {
      --it->second;
      continue;
    }
    if (u.state == "revoked" && !o.include_revoked) {
      KMSD_TRY(flush());
      std::vector<users::BulkLine> one(1);
      one[0].id = u.id;
      one[0].status = users::BulkStatus::kSkippedRevoked;
      one[0].message =
          "the user was revoked in the old KMS and was not enabled; run kmsctl user enable " +
          u.id + " on the new KMS if that was a mistake.";
      ++sum.statuses[users::to_string(one[0].status)];
      if (o.sink) KMSD_TRY(o.sink(one));
      continue;
    }
    batch.push_back({u.id, u.email, u.display_name, u.dn});
    if (batch.size() >= o.batch) KMSD_TRY(flush());
  }
  KMSD_TRY(flush());

  KMSD_TRY(store.transaction([&]() -> Status {
    KMSD_TRY(store.put_setting(kSettingReinstalledAt, std::to_string(now)));
    return audit.append(actor, "dr.reinstall",
                        {{"request_id", sum.request_id},
                         {"job", sum.job},
                         {"users", old.users.size()},
                         {"this_run", sum.statuses},
                         {"retired_keys", old.keys.size()},
                         {"old_ca_sha256", old.ca_sha256},
                         {"new_ca_sha256", sum.new_ca_sha256}});
  }));
  return sum;
}

namespace {

// Overwrites FILE with zeros, syncs it and unlinks it.
Status shred(const fs::path& file) {
  std::error_code ec;
  const auto size = fs::file_size(file, ec);
  if (!ec) {
    const int fd = ::open(file.c_str(), O_WRONLY | O_CLOEXEC);
    if (fd < 0)
      return make_error(ErrorCode::kIo, "cannot open " + file.string() + " to overwrite it");
    std::vector<char> zeros(64 * 1024, 0);
    bool ok = true;
    for (std::uintmax_t done = 0; ok && done < size;) {
      const std::size_t n =
          static_cast<std::size_t>(std::min<std::uintmax_t>(zeros.size(), size - done));
      ok = ::write(fd, zeros.data(), n) == static_cast<ssize_t>(n);
      done += n;
    }
    ok = ok && ::fsync(fd) == 0;
    ::close(fd);
    if (!ok) return make_error(ErrorCode::kIo, "cannot overwrite " + file.string());
  }
  fs::remove(file, ec);
  if (ec) return make_error(ErrorCode::kIo, "cannot remove " + file.string() + ": " + ec.message());
  return {};
}

Result<std::size_t> wipe_old_keys(const fs::path& db_file) {
  Db d;
  if (sqlite3_open_v2(db_file.c_str(), &d.db, SQLITE_OPEN_READWRITE, nullptr) != SQLITE_OK)
    return db_error(d.db, db_file, "opening the old KMS database");
  sqlite3_busy_timeout(d.db, 5000);
  auto exec = [&](const char* sql) -> Status {
    if (sqlite3_exec(d.db, sql, nullptr, nullptr, nullptr) != SQLITE_OK)
      return db_error(d.db, db_file, "wiping the old sealed keys");
    return {};
  };
  KMSD_TRY(exec("PRAGMA secure_delete = ON"));
  KMSD_TRY(exec("UPDATE key_history SET sealed_key = X'' WHERE length(sealed_key) > 0"));
  const auto n = static_cast<std::size_t>(sqlite3_changes(d.db));
  KMSD_TRY(exec("VACUUM"));
  KMSD_TRY(exec("PRAGMA wal_checkpoint(TRUNCATE)"));
  return n;
}

}  // namespace

Result<FinishSummary> finish(store::Store& store, hsm::Token& token, audit::AuditLog& audit,
                             const FinishOptions& o) {
  FinishSummary sum;
  const fs::path manifest_file = o.staging / "manifest.db";
  std::error_code ec;
  if (!fs::exists(manifest_file, ec))
    return make_error(
        ErrorCode::kInvalidArgument,
        o.staging.string() + " has no manifest.db: not a predecrypt staging directory");
  {
    KMSD_ASSIGN_OR_RETURN(auto manifest, Manifest::open(manifest_file));
    KMSD_ASSIGN_OR_RETURN(auto staged, manifest->staged());
    KMSD_ASSIGN_OR_RETURN(auto done, manifest->reencrypted());
    for (const auto& r : staged)
      if (!done.contains(r.path)) ++sum.staged_waiting;
  }
  // After a finish (forced or not) the material is gone: running it again only reports that.
  KMSD_ASSIGN_OR_RETURN(auto finished_before, store.get_setting(kSettingFinishedAt));
  if (sum.staged_waiting > 0 && !o.force && !finished_before)
    return make_error(ErrorCode::kFailedPrecondition,
                      std::to_string(sum.staged_waiting) +
                          " staged message(s) are not re-encrypted yet (kmsctl dr status "
                          "lists them): their users must enroll and reencrypt must run first. "
                          "Nothing was destroyed. --force destroys them with the rest.");
  json what = {{"staging", o.staging.string()},
               {"custody_label", o.custody_label},
               {"staged_waiting", sum.staged_waiting},
               {"forced", o.force}};
  if (o.keys) what["keys"] = o.keys->string();
  if (o.old_db) what["old_db"] = o.old_db->string();
  KMSD_TRY(store.transaction([&] { return audit.append(o.actor, "dr.finish.start", what); }));

  KMSD_ASSIGN_OR_RETURN(sum.custody_objects_destroyed, token.destroy_key_pair(o.custody_label));
  const fs::path packs = packs_dir(o.staging);
  if (fs::exists(packs, ec)) {
    for (const auto& e : fs::directory_iterator(packs, ec))
      if (e.is_regular_file()) ++sum.staged_files_removed;
    fs::remove_all(packs, ec);
    if (ec)
      return make_error(ErrorCode::kIo, "cannot remove " + packs.string() + ": " + ec.message());
  }
  // The runs' staging keys (each encrypted to the custody key just destroyed): they open the
  // packs, so they go with them.
  const fs::path keks = keys_dir(o.staging);
  if (fs::exists(keks, ec)) {
    for (const auto& e : fs::directory_iterator(keks, ec))
      if (e.is_regular_file()) ++sum.staging_keys_removed;
    fs::remove_all(keks, ec);
    if (ec)
      return make_error(ErrorCode::kIo, "cannot remove " + keks.string() + ": " + ec.message());
  }
  if (o.keys) {
    std::vector<fs::path> files;
    for (const auto& e : fs::directory_iterator(*o.keys, ec)) {
      const std::string ext = e.path().extension().string();
      if (e.is_regular_file() && (ext == ".p12" || ext == ".pfx" || ext == ".pass"))
        files.push_back(e.path());
    }
    if (ec)
      return make_error(ErrorCode::kIo, "cannot list " + o.keys->string() + ": " + ec.message());
    for (const auto& f : files) {
      KMSD_TRY(shred(f));
      if (f.extension() != ".pass") ++sum.key_files_destroyed;
    }
  }
  if (o.old_db) {
    KMSD_ASSIGN_OR_RETURN(sum.old_keys_wiped, wipe_old_keys(*o.old_db));
  }

  KMSD_TRY(store.transaction([&]() -> Status {
    KMSD_TRY(store.put_setting(kSettingFinishedAt, std::to_string(now_seconds())));
    json details = what;
    details["custody_objects_destroyed"] = sum.custody_objects_destroyed;
    details["staged_files_removed"] = sum.staged_files_removed;
    details["staging_keys_removed"] = sum.staging_keys_removed;
    details["key_files_destroyed"] = sum.key_files_destroyed;
    details["old_keys_wiped"] = sum.old_keys_wiped;
    return audit.append(o.actor, "dr.finish", details);
  }));
  return sum;
}

}  // namespace kmsd::dr

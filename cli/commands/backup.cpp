// kmsctl backup / restore (README "Backup and restore"):
//   kmsctl backup --out FILE                 kmsd makes a consistent backup while it serves
//   kmsctl restore --check FILE              kmsd checks FILE against its token (admin API)
//   kmsctl restore --check FILE --config C   the same offline, with kmsd stopped
//   kmsctl restore FILE --config C           offline, kmsd stopped: into an empty store only
// Offline commands open the key token themselves: SoftHSM2 (and many HSMs) must not be used by
// two processes at once, so kmsd must be stopped first.
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <iostream>

#include "cli/commands/common.hpp"
#include "common/files.hpp"
#include "daemon/backup/backup.hpp"

namespace kmsd::cli {

namespace {

// A backup of a large store, or its check through kmsd (every record opened on the token),
// takes longer than an ordinary call: as long as kmsd's long-call deadline by default.
constexpr std::chrono::seconds kBackupTimeout{600};

namespace fs = std::filesystem;
using json = nlohmann::json;

struct BackupArgs : AdminArgs {
  std::string out;
};

struct RestoreArgs : AdminArgs {
  std::string file;
  bool check_only = false;
  std::string config;
  std::string pin_file;
  std::string actor = "operator";
};

std::string when(std::int64_t unix) {
  std::time_t t = static_cast<std::time_t>(unix);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

int run_backup(const BackupArgs& a) {
  if (a.out.empty() || a.out == "-") {
    std::cerr << "kmsctl: --out FILE is required (a backup is binary; it is written 0600)\n";
    return kUsage;
  }
  std::error_code ec;
  if (fs::exists(a.out, ec))
    return fail(
        make_error(ErrorCode::kAlreadyExists,
                   a.out + " exists; kmsctl never overwrites a backup, choose another name"));
  auto c = connect_admin(a, kBackupTimeout);
  if (!c.ok()) return fail(c.error());
  auto r = (*c)->post("/v1/backup", json::object());
  if (!r.ok()) return fail(r.error());
  if (int rc = exit_for_reply(*r); rc != kOk) return rc;
  auto manifest = backup::read_manifest_unverified(r->body);
  if (!manifest.ok())
    return fail(manifest.error().context("kmsd's reply is not a backup (nothing was written)"));
  if (auto st = files::write_atomic(a.out, r->body, 0600, false); !st.ok()) return fail(st.error());
  const json& m = *manifest;
  if (a.output == "json") {
    json j{{"file", a.out},
           {"bytes", r->body.size()},
           {"created_at", m.value("created_at", std::int64_t{0})},
           {"image_sha256", m.value("image_sha256", std::string())},
           {"image_size", m.value("image_size", std::uint64_t{0})},
           {"schema_version", m.value("schema_version", 0)},
           {"tables", m.value("tables", json::object())}};
    std::cout << j.dump(2) << "\n";
    return kOk;
  }
  const json tables = m.value("tables", json::object());
  std::cout << "Backup written to " << a.out << " (" << r->body.size() << " bytes, 0600)\n"
            << "  taken at        " << when(m.value("created_at", std::int64_t{0})) << "\n"
            << "  database image  " << m.value("image_size", std::uint64_t{0}) << " bytes, SHA-256 "
            << m.value("image_sha256", std::string()) << "\n"
            << "  users " << tables.value("users", 0) << ", certificates "
            << tables.value("certificates", 0) << ", escrowed keys "
            << tables.value("key_history", 0) << ", audit records " << tables.value("audit_log", 0)
            << "\n"
            << "Only sealed material is in it: it restores only with this KMS's key token.\n"
            << "Check it: kmsctl restore --check " << a.out << "\n";
  return kOk;
}

int show_report(const RestoreArgs& a, const json& j) {
  const bool ok = j.value("ok", false);
  if (a.output == "json") {
    std::cout << j.dump(2) << "\n";
    return ok ? kOk : kFailed;
  }
  if (ok) {
    std::cout << "Backup " << a.file << " passes the check:\n"
              << "  signed by this token's CA key, taken at "
              << when(j.value("created_at", std::int64_t{0})) << "\n"
              << "  database image intact (SHA-256 " << j.value("image_sha256", std::string())
              << ")\n"
              << "  " << j.value("users", 0) << " users, " << j.value("certificates", 0)
              << " certificates\n"
              << "  " << j.value("keys_opened", 0)
              << " escrowed keys open on the token and match their certificates\n"
              << "  " << j.value("tokens_opened", 0) << " sealed enrollment tokens open\n"
              << "  audit chain verifies (" << j.value("audit_records", 0) << " records)\n";
    return kOk;
  }
  std::cerr << "kmsctl: backup " << a.file << " FAILS the check:\n";
  for (const auto& p : j.value("problems", json::array()))
    std::cerr << "  - " << p.get<std::string>() << "\n";
  return kFailed;
}

// Whether a kmsd answers on CFG's unseal socket (then the token is in use: offline commands
// must not open it too).
bool daemon_answers(const config::Config& cfg) {
  const std::string path = cfg.server.unseal_socket.string();
  sockaddr_un addr{};
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) return false;
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  const bool up = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  ::close(fd);
  return up;
}

int run_restore(const RestoreArgs& a) {
  auto data = files::read_text(a.file);
  if (!data.ok()) return fail(data.error());
  if (a.config.empty()) {
    if (!a.check_only) {
      std::cerr << "kmsctl: restore FILE runs offline with kmsd stopped: give --config "
                   "kmsd.toml (to only check a backup through kmsd, use --check)\n";
      return kUsage;
    }
    auto c = connect_admin(a, kBackupTimeout);
    if (!c.ok()) return fail(c.error());
    auto r = (*c)->post_bytes("/v1/backup/check", *data, "application/octet-stream");
    if (!r.ok()) return fail(r.error());
    if (r->status == 413) {
      std::cerr << "kmsctl: the backup is larger than kmsd accepts from an administrator (512 "
                   "MiB); stop kmsd and check it offline: kmsctl restore --check "
                << a.file << " --config kmsd.toml\n";
      return kUsage;
    }
    auto j = reply_json(*r);
    if (auto* rc = std::get_if<int>(&j)) return *rc;
    return show_report(a, std::get<json>(j));
  }

  auto cfg = load_config(a.config);
  if (!cfg) return kUsage;
  if (daemon_answers(*cfg)) {
    // A conflict with state (exit 3), like a non-empty store.
    std::cerr << "kmsctl: kmsd is running (its unseal socket " << cfg->server.unseal_socket.string()
              << " answers) and uses the key token; stop it first"
              << (a.check_only ? ", or check through it: kmsctl restore --check FILE with the "
                                 "admin-API options"
                               : "")
              << ". Nothing was changed\n";
    return kExists;
  }
  if (!a.check_only) {
    // Refuse before asking for a PIN when there is nothing to do.
    auto empty = backup::store_is_empty(cfg->store.path);
    if (!empty.ok()) return fail(empty.error());
    if (!*empty)
      return fail(make_error(ErrorCode::kAlreadyExists,
                             "the store " + cfg->store.path.string() +
                                 " holds users or certificates; a backup is restored only into "
                                 "an empty store. Nothing was changed. Stop kmsd, move that "
                                 "database (and its -wal and -shm files) aside, then restore "
                                 "again"));
  }
  auto token = open_key_token(*cfg, a.pin_file,
                              "Key token user PIN (the startup secret; kmsd must be stopped): ");
  if (!token.ok()) return fail(token.error());
  int rc = kOk;
  if (a.check_only) {
    std::error_code ec;
    auto rep = backup::check(*data, **token, fs::temp_directory_path(ec));
    if (!rep.ok()) {
      rc = fail(rep.error());
    } else {
      rc = show_report(a, rep->to_json());
    }
  } else {
    auto out = backup::restore(*data, **token, cfg->store.path, a.actor);
    if (!out.ok()) {
      rc = fail(out.error());
    } else if (!out->restored) {
      rc = show_report(a, out->report.to_json());
      std::cerr << "Nothing was restored.\n";
    } else {
      if (a.output == "json") {
        json j = out->report.to_json();
        j["restored_to"] = cfg->store.path.string();
        std::cout << j.dump(2) << "\n";
      } else {
        (void)show_report(a, out->report.to_json());
        std::cout << "Restored into " << cfg->store.path.string()
                  << " (audited as backup.restore). Start kmsd on it.\n";
      }
    }
  }
  (*token)->logout();
  return rc;
}

}  // namespace

void add_backup_commands(CLI::App& app, Commands& commands) {
  auto* backup = app.add_subcommand(
      "backup", "a consistent backup of the store while kmsd serves (sealed material only)");
  auto& b = commands.add<BackupArgs>(backup, run_backup);
  backup->add_option("--out", b.out, "the backup file to write (0600, never overwritten)")
      ->required();
  add_admin_options(backup, b);

  auto* restore = app.add_subcommand(
      "restore",
      "check a backup against the key token (--check), or restore it into an empty store "
      "(offline, kmsd stopped)");
  auto& r = commands.add<RestoreArgs>(restore, run_restore);
  restore->add_option("file", r.file, "the backup file")->required();
  restore->add_flag("--check", r.check_only,
                    "only verify: signature, image, every sealed record, the audit chain");
  restore->add_option("--config", r.config,
                      "kmsd.toml: work offline on its token and store (kmsd must be stopped)");
  restore->add_option("--pin-file", r.pin_file,
                      "0600 file with the key token's user PIN (default: [startup] file, else "
                      "prompt)");
  restore->add_option("--actor", r.actor, "who restores, for the audit record")
      ->capture_default_str();
  add_admin_options(restore, r);
}

}  // namespace kmsd::cli

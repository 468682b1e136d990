// kmsctl admin add | collect | list | remove: administrators. The new administrator's key pair
// is made here and never leaves this machine unencrypted: kmsd gets a certificate request and
// returns the certificate, which goes with the key into a PKCS#12 (mode 0600, never over an
// existing file). While an add waits for approvals the key waits next to --out, encrypted.
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <cstring>
#include <iostream>

#include "cli/commands/common.hpp"
#include "cli/render.hpp"
#include "common/csv.hpp"
#include "common/files.hpp"
#include "common/ossl.hpp"
#include "daemon/ca/issuer.hpp"
#include "daemon/startup/secret_source.hpp"

namespace kmsd::cli {

namespace {

using json = nlohmann::json;

struct AdminsArgs : AdminArgs {
  std::string name;
  std::string role;
  std::string out;
  std::string new_passphrase_file;
  std::string key_type;
  std::string config;
  std::string request_id;
  std::string key_file;
};

std::string pending_key_path(const std::string& out) {
  return out + ".pending-key";
}

// The new administrator's passphrase: from FILE, else typed twice (TWICE) or once.
Result<SecretBytes> new_admin_passphrase(const std::string& file, bool twice) {
  if (!file.empty()) return startup::read_secret_from_file(file);
  KMSD_ASSIGN_OR_RETURN(
      auto a, startup::read_secret_from_terminal("Passphrase for the new administrator's key: "));
  if (!twice) return a;
  KMSD_ASSIGN_OR_RETURN(auto b, startup::read_secret_from_terminal("Repeat the passphrase: "));
  if (!constant_time_equal(a.span(), b.span()))
    return make_error(ErrorCode::kInvalidArgument, "the passphrases differ; nothing was done");
  return a;
}

Result<hsm::KeyType> key_type_of(const AdminsArgs& a) {
  if (!a.key_type.empty()) {
    auto t = hsm::parse_key_type(a.key_type);
    if (!t)
      return make_error(ErrorCode::kInvalidArgument,
                        "--key-type must be ec-p256, ec-p384, rsa-2048 or rsa-3072");
    return *t;
  }
  if (a.config.empty()) return hsm::KeyType::kEcP256;
  auto cfg = load_config(a.config);
  if (!cfg) return make_error(ErrorCode::kConfig, "cannot read " + a.config + " for [admin]");
  return cfg->admin.key_type;
}

int passphrase_callback(char* buf, int size, int, void* u) {
  const auto* pass = static_cast<const SecretBytes*>(u);
  if (pass->size() > static_cast<std::size_t>(size)) return -1;
  std::memcpy(buf, pass->data(), pass->size());
  return static_cast<int>(pass->size());
}

// KEY as PKCS#8 PEM encrypted with AES-256-CBC under PASS (PBKDF2, OpenSSL 3 defaults), to
// FILE with mode 0600, never over an existing file.
Status write_encrypted_key(const std::string& file, EVP_PKEY* key, const SecretBytes& pass) {
  ossl::BioPtr bio(BIO_new(BIO_s_secmem()));
  if (!bio) return ossl::crypto_error("encrypting the new key");
  if (PEM_write_bio_PKCS8PrivateKey(bio.get(), key, EVP_aes_256_cbc(), nullptr, 0,
                                    passphrase_callback,
                                    const_cast<SecretBytes*>(&pass)) != 1)  // read only
    return ossl::crypto_error("encrypting the new key");
  char* p = nullptr;
  long n = BIO_get_mem_data(bio.get(), &p);
  return files::write_atomic(file, std::string_view(p, static_cast<std::size_t>(n)), 0600, false);
}

Result<ossl::EvpPkeyPtr> read_encrypted_key(const std::string& file, const SecretBytes& pass) {
  KMSD_ASSIGN_OR_RETURN(auto pem, files::read_text(file));
  ossl::BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  ossl::EvpPkeyPtr key(PEM_read_bio_PrivateKey(bio.get(), nullptr, passphrase_callback,
                                               const_cast<SecretBytes*>(&pass)));
  OPENSSL_cleanse(pem.data(), pem.size());
  if (!key) {
    ossl::drain_errors();
    return make_error(ErrorCode::kUnauthenticated,
                      "cannot open the key in " + file +
                          ": wrong passphrase, or not a key written by `kmsctl admin add`");
  }
  return key;
}

// Checks the certificate in RESULT against KEY and writes KEY + certificate + CA to OUT.
Result<std::string> write_p12(const json& result, EVP_PKEY* key, const std::string& name,
                              const std::string& out, const SecretBytes& pass) {
  KMSD_ASSIGN_OR_RETURN(auto cert, ossl::x509_from_pem(render::text(result, "certificate")));
  KMSD_ASSIGN_OR_RETURN(auto ca, ossl::x509_from_pem(render::text(result, "ca")));
  if (!ca::public_key_matches(cert.get(), key))
    return make_error(ErrorCode::kCrypto,
                      "the certificate kmsd returned is not for the key made here; nothing was "
                      "written");
  if (!ca::signed_by(cert.get(), ca.get()))
    return make_error(ErrorCode::kCrypto,
                      "the certificate kmsd returned was not signed by the CA it names");
  KMSD_ASSIGN_OR_RETURN(auto p12, ca::make_pkcs12(key, cert.get(), ca.get(), name, pass));
  KMSD_TRY(files::write_atomic(
      out, std::string_view(reinterpret_cast<const char*>(p12.data()), p12.size()), 0600, false));
  return ca::serial_hex(cert.get());
}

std::string added_text(const json& result, const std::string& out) {
  return "administrator " + render::text(result, "name") + " added with role " +
         render::text(result, "role") + "\n  certificate:      " + render::text(result, "serial") +
         ", valid until " + render::time_text(result, "not_after") +
         "\n  PKCS#12:          " + out + " (mode 0600; give it to the new administrator)\n";
}

int refuse_existing(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return kOk;
  return fail(make_error(ErrorCode::kAlreadyExists,
                         path + " already exists; choose another --out (nothing was done)"));
}

int run_add(const AdminsArgs& a) {
  const std::string pending = pending_key_path(a.out);
  if (int rc = refuse_existing(a.out); rc != kOk) return rc;
  if (int rc = refuse_existing(pending); rc != kOk) return rc;
  auto type = key_type_of(a);
  if (!type.ok()) return fail(type.error());
  auto pass = new_admin_passphrase(a.new_passphrase_file, true);
  if (!pass.ok()) return fail(pass.error());
  auto client = connect_admin(a);
  if (!client.ok()) return fail(client.error());
  auto key = ca::generate_key(*type);
  if (!key.ok()) return fail(key.error());
  // The server checks the signature and takes only the key: the subject it certifies is its
  // own OU=kmsd administrators, CN=NAME.
  auto csr = ossl::csr_pem(key->get(), a.name);
  if (!csr.ok()) return fail(csr.error());
  // The key is saved (encrypted) before the request goes out, so that a request which ends up
  // waiting for approvals never lacks its key, whatever happens to this process.
  if (auto st = write_encrypted_key(pending, key->get(), *pass); !st.ok()) return fail(st.error());
  auto r = (*client)->post("/v1/admins", {{"name", a.name}, {"role", a.role}, {"csr", *csr}});
  if (!r.ok()) {
    std::cerr << "kmsctl: " << r.error().message << "\nkmsctl: whether kmsd received the request "
              << "is unknown; the new key stays in " << pending
              << " (check `kmsctl request list --state pending`)\n";
    return exit_for(r.error());
  }
  auto j = r->json();
  const std::string state = j.is_object() ? render::text(j, "state") : "";
  if (r->status == 202 && state == "pending") {
    const std::string id = render::text(j, "request_id");
    if (a.output == "json") {
      j["pending_key"] = pending;
      std::cout << j.dump(2) << "\n";
    } else {
      std::cout << render::outcome(j).text << "The new administrator's key waits in " << pending
                << " (mode 0600, encrypted with the new passphrase).\nOnce approved, run:\n  "
                << "kmsctl admin collect " << id << " --key " << pending << " --out " << a.out
                << "\n";
    }
    return kOk;
  }
  std::filesystem::remove(pending);
  if (r->status != 200 || state != "executed") {
    if (state.empty()) return exit_for_reply(*r);
    show_verdict(a, j, render::outcome(j));
    const int rc = exit_for_status(r->status);
    return rc == kOk ? kFailed : rc;
  }
  const json result = j.contains("result") ? j["result"] : json::object();
  auto written = write_p12(result, key->get(), a.name, a.out, *pass);
  if (!written.ok()) {
    std::cerr << "kmsctl: administrator " << a.name
              << " was added, but the PKCS#12 could not be written: " << written.error().message
              << "\nkmsctl: remove the administrator (kmsctl admin remove " << a.name
              << ") and add again\n";
    return kFailed;
  }
  if (a.output == "json") {
    j["p12"] = a.out;
    std::cout << j.dump(2) << "\n";
  } else {
    std::cout << added_text(result, a.out);
  }
  return kOk;
}

int run_collect(const AdminsArgs& a) {
  if (int rc = refuse_existing(a.out); rc != kOk) return rc;
  auto reply = call_json(a, "/v1/requests", std::nullopt);
  if (auto* rc = std::get_if<int>(&reply)) return *rc;
  const auto& list = std::get<json>(reply);
  const json* found = nullptr;
  if (list.contains("requests") && list["requests"].is_array())
    for (const auto& r : list["requests"])
      if (render::text(r, "id") == a.request_id) found = &r;
  if (found == nullptr)
    return fail(make_error(ErrorCode::kNotFound, "kmsd has no request " + a.request_id));
  const json& req = *found;
  if (render::text(req, "operation") != "admin_add")
    return fail(make_error(ErrorCode::kInvalidArgument, "request " + a.request_id + " is a " +
                                                            render::text(req, "operation") +
                                                            " request, not admin_add"));
  const std::string state = render::text(req, "state");
  if (state == "pending") {
    std::cerr << "kmsctl: request " << a.request_id << " has " << render::text(req, "approvals")
              << " of " << render::text(req, "required")
              << " approvals; another administrator must approve it (kmsctl request approve "
              << a.request_id << "), then run this again\n";
    return kFailed;
  }
  const json result = req.contains("result") ? req["result"] : json::object();
  if (state != "executed") {
    std::string why = render::text(result, "error");
    if (why.empty()) why = render::text(result, "message");
    std::cerr << "kmsctl: request " << a.request_id << " is " << state
              << (why.empty() ? "" : ": " + why) << "; there is no certificate to collect\n";
    return kFailed;
  }
  auto pass = new_admin_passphrase(a.new_passphrase_file, false);
  if (!pass.ok()) return fail(pass.error());
  auto key = read_encrypted_key(a.key_file, *pass);
  if (!key.ok()) return fail(key.error());
  auto written = write_p12(result, key->get(), render::text(result, "name"), a.out, *pass);
  if (!written.ok()) return fail(written.error());
  std::error_code ec;
  std::filesystem::remove(a.key_file, ec);  // the PKCS#12 holds the key now
  if (a.output == "json") {
    json j = req;
    j["p12"] = a.out;
    std::cout << j.dump(2) << "\n";
  } else {
    std::cout << added_text(result, a.out) << "  " << a.key_file << " removed\n";
  }
  return kOk;
}

int run_list(const AdminsArgs& a) {
  auto reply = call_json(a, "/v1/admins", std::nullopt);
  if (auto* rc = std::get_if<int>(&reply)) return *rc;
  const auto& j = std::get<json>(reply);
  if (a.output == "json") {
    std::cout << j.dump(2) << "\n";
    return kOk;
  }
  const json list = j.contains("admins") && j["admins"].is_array() ? j["admins"] : json::array();
  if (a.output == "csv") {
    const std::vector<std::string> columns = {"name",       "role",      "certificate_serial",
                                              "created_at", "not_after", "removed_at",
                                              "revoked_at"};
    std::string out = csv::format_record(columns);
    for (const auto& r : list) {
      std::vector<std::string> row;
      for (const auto& c : columns)
        row.push_back(c.ends_with("_at") || c == "not_after" ? render::time_text(r, c)
                                                             : render::text(r, c));
      out += csv::format_record(row);
    }
    std::cout << out;
    return kOk;
  }
  std::vector<std::vector<std::string>> rows;
  for (const auto& r : list)
    rows.push_back({render::text(r, "name"), render::text(r, "role"),
                    render::text(r, "certificate_serial"), render::time_text(r, "created_at"),
                    render::time_text(r, "not_after"), render::time_text(r, "removed_at")});
  std::cout << render::table({"name", "role", "certificate", "created", "expires", "removed"},
                             rows);
  return kOk;
}

int run_remove(const AdminsArgs& a) {
  auto c = connect_admin(a);
  if (!c.ok()) return fail(c.error());
  auto r = (*c)->del("/v1/admins/" + render::url_encode(a.name));
  if (!r.ok()) return fail(r.error());
  auto j = r->json();
  if (!j.is_object() || !j.contains("state")) return exit_for_reply(*r);
  const int shown = show_verdict(a, j, render::outcome(j));
  const int rc = exit_for_status(r->status);
  return rc == kOk ? shown : rc;
}

AdminsArgs& add_command(CLI::App* admin, Commands& commands, const char* name, const char* help,
                        int (*run)(const AdminsArgs&),
                        std::vector<std::string> outputs = {"table", "json"}) {
  auto* cmd = admin->add_subcommand(name, help);
  auto& a = commands.add<AdminsArgs>(cmd, run);
  add_admin_options(cmd, a, std::move(outputs));
  return a;
}

}  // namespace

void add_admins_commands(CLI::App& app, Commands& commands) {
  auto* admin = app.add_subcommand("admin", "add, list and remove administrators");
  admin->require_subcommand(1);

  auto& add = add_command(admin, commands, "add",
                          "make a key pair here and have kmsd certify it for a new administrator "
                          "(may need approvals)",
                          run_add);
  auto* add_cmd = admin->get_subcommand("add");
  add_cmd->add_option("NAME", add.name, "the new administrator's name (certificate CN)")
      ->required();
  add_cmd
      ->add_option("--role", add.role,
                   "admin, auditor, approver or recovery (may export key histories)")
      ->required()
      ->check(CLI::IsMember({"admin", "auditor", "approver", "recovery"}));
  add_cmd->add_option("--out", add.out, "the new administrator's PKCS#12 (0600, never overwritten)")
      ->required();
  add_cmd->add_option("--new-passphrase-file", add.new_passphrase_file,
                      "0600 file with the new administrator's passphrase (default: prompt twice)");
  add_cmd->add_option("--key-type", add.key_type,
                      "ec-p256, ec-p384, rsa-2048 or rsa-3072 (default: [admin] key_type of "
                      "--config, else ec-p256)");
  add_cmd->add_option("--config", add.config, "kmsd.toml to read [admin] key_type from");

  auto& collect = add_command(
      admin, commands, "collect",
      "after an approved add: fetch the certificate and write the PKCS#12 with the waiting key",
      run_collect);
  auto* collect_cmd = admin->get_subcommand("collect");
  collect_cmd->add_option("REQUEST_ID", collect.request_id, "the admin_add request")->required();
  collect_cmd->add_option("--key", collect.key_file, "the .pending-key file `admin add` wrote")
      ->required();
  collect_cmd->add_option("--out", collect.out, "the PKCS#12 to write (0600, never overwritten)")
      ->required();
  collect_cmd->add_option("--new-passphrase-file", collect.new_passphrase_file,
                          "0600 file with the new administrator's passphrase (default: prompt)");

  add_command(admin, commands, "list", "every administrator, removed ones included", run_list,
              {"table", "json", "csv"});

  auto& remove = add_command(
      admin, commands, "remove",
      "remove an administrator and revoke the certificate (may need approvals)", run_remove);
  admin->get_subcommand("remove")->add_option("NAME", remove.name, "the administrator")->required();
}

}  // namespace kmsd::cli

// kmsctl enroll | renew | keys: the user's side. The signing key pair is made here and never
// leaves this machine; the server returns both certificates and the escrowed encryption
// key(s), and everything goes into one PKCS#12 protected by a passphrase the user chooses.
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <iostream>

#include "cli/commands/common.hpp"
#include "common/clock.hpp"
#include "common/files.hpp"
#include "daemon/ca/issuer.hpp"
#include "daemon/startup/secret_source.hpp"

namespace kmsd::cli {

namespace {

using json = nlohmann::json;

struct UserSideArgs {
  std::string server;
  std::string ca;
  std::string out;
  std::string new_passphrase_file;
  std::string key_type = "ec-p256";
  int x509_version = 3;
  std::string output = "table";
  // enroll
  std::string user;
  std::string token;
  std::string token_file;
  // renew / keys: the current signing pair, as a PKCS#12 or as PEM files
  std::string p12;
  std::string passphrase_file;
  std::string cert;
  std::string key;
};

void add_server_options(CLI::App* cmd, UserSideArgs& a) {
  cmd->add_option("--server", a.server, "kmsd's HTTPS URL, e.g. https://kms.example.org:8443")
      ->envname("KMSCTL_SERVER")
      ->required();
  cmd->add_option("--ca", a.ca, "the KMS CA certificate (PEM) that the server must chain to")
      ->envname("KMSCTL_CA")
      ->required();
  cmd->add_option("--out", a.out, "the PKCS#12 file to write (0600; never overwritten)")
      ->required();
  cmd->add_option("--new-passphrase-file", a.new_passphrase_file,
                  "0600 file with the passphrase for the new PKCS#12 (default: asked twice)");
  cmd->add_option("-o,--output", a.output, "table or json")
      ->check(CLI::IsMember({"table", "json"}));
}

void add_signing_options(CLI::App* cmd, UserSideArgs& a) {
  cmd->add_option("--key-type", a.key_type, "the signing key made here")
      ->check(CLI::IsMember({"ec-p256", "ec-p384", "rsa-2048", "rsa-3072"}));
  cmd->add_option("--x509-version", a.x509_version,
                  "certificate version to ask for (3; 1 only where the policy allows it)")
      ->check(CLI::IsMember({1, 3}));
}

void add_holder_options(CLI::App* cmd, UserSideArgs& a) {
  cmd->add_option("--p12", a.p12, "your PKCS#12 from kmsd (its signing key authenticates you)");
  cmd->add_option("--passphrase-file", a.passphrase_file,
                  "0600 file with that PKCS#12's passphrase (default: prompt)");
  cmd->add_option("--cert", a.cert, "your signing certificate (PEM), e.g. from openssl cmp");
  cmd->add_option("--key", a.key, "its private key (PEM)");
}

Result<SecretBytes> new_passphrase(const std::string& out, const std::string& passphrase_file) {
  if (!passphrase_file.empty()) return startup::read_secret_from_file(passphrase_file);
  KMSD_ASSIGN_OR_RETURN(auto first,
                        startup::read_secret_from_terminal("Passphrase for " + out + ": "));
  KMSD_ASSIGN_OR_RETURN(auto again, startup::read_secret_from_terminal("Again: "));
  if (first.view() != again.view())
    return make_error(ErrorCode::kInvalidArgument, "the two passphrases differ; nothing written");
  if (first.empty())
    return make_error(ErrorCode::kInvalidArgument,
                      "an empty passphrase would not protect the keys");
  return first;
}

Result<ossl::EvpPkeyPtr> private_key_from_pem(const std::string& pem) {
  ossl::BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  ossl::EvpPkeyPtr key(PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
  if (!key) return ossl::crypto_error("reading a private key from the server's answer");
  return key;
}

// The signing pair, the escrowed keys of J["keys"] and the CA, in one PKCS#12 at A.out.
int write_bundle(const UserSideArgs& a, EVP_PKEY* signing_key, X509* signing_cert, const json& keys,
                 const std::string& user) {
  return write_key_bundle(a.out, a.ca, a.new_passphrase_file, signing_key, signing_cert, keys,
                          user);
}

}  // namespace

int write_key_bundle(const std::string& out, const std::string& ca_file,
                     const std::string& new_passphrase_file, EVP_PKEY* signing_key,
                     X509* signing_cert, const nlohmann::json& keys, const std::string& user) {
  auto ca_pem = files::read_text(ca_file);
  if (!ca_pem.ok()) return fail(ca_pem.error());
  auto ca = ossl::x509_from_pem(*ca_pem);
  if (!ca.ok()) return fail(ca.error());
  std::vector<ossl::EvpPkeyPtr> owned_keys;
  std::vector<ossl::X509Ptr> owned_certs;
  std::vector<ca::Pkcs12Entry> entries;
  if (signing_key != nullptr && signing_cert != nullptr)
    entries.push_back({signing_key, signing_cert, user + " (signing)"});
  if (!keys.is_array() || keys.empty()) {
    std::cerr << "kmsctl: the server returned no escrowed key; nothing written\n";
    return kFailed;
  }
  for (const auto& k : keys) {
    auto key = private_key_from_pem(k.value("private_key", std::string()));
    if (!key.ok()) return fail(key.error());
    auto cert = ossl::x509_from_pem(k.value("certificate", std::string()));
    if (!cert.ok()) return fail(cert.error());
    entries.push_back({key->get(), cert->get(),
                       user + " (encryption, key " + std::to_string(k.value("version", 0)) + ")"});
    owned_keys.push_back(std::move(*key));
    owned_certs.push_back(std::move(*cert));
  }
  if (std::filesystem::exists(out)) {
    std::cerr << "kmsctl: " << out << " exists; choose another --out (never overwritten)\n";
    return kExists;
  }
  auto pass = new_passphrase(out, new_passphrase_file);
  if (!pass.ok()) return fail(pass.error());
  auto p12 = ca::make_pkcs12_bundle(entries, ca->get(), *pass);
  if (!p12.ok()) return fail(p12.error());
  return write_output(out,
                      std::string_view(reinterpret_cast<const char*>(p12->data()), p12->size()));
}

namespace {

Result<std::unique_ptr<client::AdminClient>> connect(const UserSideArgs& a, ossl::X509Ptr cert,
                                                     ossl::EvpPkeyPtr key) {
  client::ClientOptions o;
  o.server = a.server;
  o.ca_file = a.ca;
  o.client_cert = std::move(cert);
  o.client_key = std::move(key);
  return client::AdminClient::connect(std::move(o));
}

// The current signing pair from --p12 or --cert/--key.
Result<std::pair<ossl::EvpPkeyPtr, ossl::X509Ptr>> holder_pair(const UserSideArgs& a) {
  if (!a.p12.empty()) {
    KMSD_ASSIGN_OR_RETURN(auto pass,
                          secret_from(a.passphrase_file, "Passphrase for " + a.p12 + ": "));
    return client::read_pkcs12(a.p12, pass);
  }
  if (a.cert.empty() || a.key.empty())
    return make_error(ErrorCode::kInvalidArgument,
                      "give your current signing certificate: --p12 FILE, or --cert and --key");
  KMSD_ASSIGN_OR_RETURN(auto cert_pem, files::read_text(a.cert));
  KMSD_ASSIGN_OR_RETURN(auto cert, ossl::x509_from_pem(cert_pem));
  KMSD_ASSIGN_OR_RETURN(auto key_pem, files::read_text(a.key));
  ossl::BioPtr bio(BIO_new_mem_buf(key_pem.data(), static_cast<int>(key_pem.size())));
  ossl::EvpPkeyPtr key(PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
  if (!key) return ossl::crypto_error(a.key + " is not a PEM private key (unencrypted)");
  return std::make_pair(std::move(key), std::move(cert));
}

int summarize(const UserSideArgs& a, const json& j, const std::string& verb) {
  if (a.output == "json") {
    json shown = j;
    if (shown.contains("keys"))
      for (auto& k : shown["keys"]) k.erase("private_key");  // the keys are in the file only
    shown["out"] = a.out;
    std::cout << shown.dump(2) << "\n";
    return kOk;
  }
  std::cout << verb << " " << j.value("user", std::string()) << " -> " << a.out << "\n";
  for (const char* which : {"signing_certificate", "encryption_certificate"}) {
    if (!j.contains(which)) continue;
    auto cert = ossl::x509_from_pem(j[which].get<std::string>());
    if (!cert.ok()) continue;
    std::cout << "  " << (std::string(which) == "signing_certificate" ? "signing   " : "encryption")
              << " certificate " << ca::serial_hex(cert->get()) << ", valid until "
              << utc_text(ca::not_after_unix(cert->get())) << "\n";
  }
  std::cout << "  escrowed encryption key(s) in the file: " << j["keys"].size()
            << (j.value("recovered", false) ? " (the whole key history, recovered)" : "") << "\n";
  return kOk;
}

int run_enroll(const UserSideArgs& a) {
  SecretBytes token;
  if (!a.token.empty()) {
    token = SecretBytes::from_string(a.token);
  } else {
    auto t = secret_from(a.token_file, "Enrollment token for " + a.user + ": ");
    if (!t.ok()) return fail(t.error());
    token = std::move(*t);
  }
  auto type = hsm::parse_key_type(a.key_type);
  auto key = ca::generate_key(*type);
  if (!key.ok()) return fail(key.error());
  auto csr = ossl::csr_pem(key->get(), a.user);
  if (!csr.ok()) return fail(csr.error());
  auto client = connect(a, nullptr, nullptr);
  if (!client.ok()) return fail(client.error());
  json body{{"user", a.user},
            {"token", std::string(token.view())},
            {"csr", *csr},
            {"x509_version", a.x509_version}};
  auto reply = (*client)->post("/enroll/v1/enroll", body);
  body["token"] = "";
  if (!reply.ok()) return fail(reply.error());
  auto j = reply_json(*reply);
  if (auto* rc = std::get_if<int>(&j)) return *rc;
  const auto& answer = std::get<json>(j);
  auto cert = ossl::x509_from_pem(answer.value("signing_certificate", std::string()));
  if (!cert.ok()) return fail(cert.error());
  if (int rc = write_bundle(a, key->get(), cert->get(), answer["keys"], a.user); rc != kOk) {
    std::cerr << "kmsctl: the certificates were issued and the token is spent; your escrowed "
                 "key can be fetched again with `kmsctl keys`, but the signing key made here is "
                 "lost: ask your administrator to revoke and re-enable you\n";
    return rc;
  }
  return summarize(a, answer, "enrolled");
}

int run_renew(const UserSideArgs& a) {
  auto holder = holder_pair(a);
  if (!holder.ok()) return fail(holder.error());
  auto type = hsm::parse_key_type(a.key_type);
  auto key = ca::generate_key(*type);
  if (!key.ok()) return fail(key.error());
  auto csr = ossl::csr_pem(key->get(), "renewal");
  if (!csr.ok()) return fail(csr.error());
  auto client = connect(a, std::move(holder->second), std::move(holder->first));
  if (!client.ok()) return fail(client.error());
  auto reply =
      (*client)->post("/enroll/v1/renew", json{{"csr", *csr}, {"x509_version", a.x509_version}});
  if (!reply.ok()) return fail(reply.error());
  auto j = reply_json(*reply);
  if (auto* rc = std::get_if<int>(&j)) return *rc;
  const auto& answer = std::get<json>(j);
  auto cert = ossl::x509_from_pem(answer.value("signing_certificate", std::string()));
  if (!cert.ok()) return fail(cert.error());
  const std::string user = answer.value("user", std::string());
  if (int rc = write_bundle(a, key->get(), cert->get(), answer["keys"], user); rc != kOk) return rc;
  return summarize(a, answer, "renewed");
}

int run_keys(const UserSideArgs& a) {
  auto holder = holder_pair(a);
  if (!holder.ok()) return fail(holder.error());
  ossl::EvpPkeyPtr key(holder->first.get());
  EVP_PKEY_up_ref(key.get());
  ossl::X509Ptr cert(holder->second.get());
  X509_up_ref(cert.get());
  auto client = connect(a, std::move(holder->second), std::move(holder->first));
  if (!client.ok()) return fail(client.error());
  auto reply = (*client)->get("/enroll/v1/keys");
  if (!reply.ok()) return fail(reply.error());
  auto j = reply_json(*reply);
  if (auto* rc = std::get_if<int>(&j)) return *rc;
  const auto& answer = std::get<json>(j);
  const std::string user = answer.value("user", std::string());
  if (int rc = write_bundle(a, key.get(), cert.get(), answer["keys"], user); rc != kOk) return rc;
  return summarize(a, answer, "fetched the escrowed keys of");
}

}  // namespace

void add_enroll_commands(CLI::App& app, Commands& commands) {
  auto* enroll = app.add_subcommand(
      "enroll",
      "enroll with a one-time token: make a signing key here, get both certificates "
      "and the escrowed encryption key in one PKCS#12");
  auto& e = commands.add<UserSideArgs>(enroll, run_enroll);
  add_server_options(enroll, e);
  add_signing_options(enroll, e);
  enroll->add_option("--user", e.user, "your user id, as your administrator enabled it")
      ->required();
  enroll->add_option("--token", e.token,
                     "the one-time token (visible to other local users in the process list: "
                     "prefer --token-file or the prompt)");
  enroll->add_option("--token-file", e.token_file, "0600 file holding the one-time token");

  auto* renew = app.add_subcommand(
      "renew",
      "new certificates before the current ones expire (mutual TLS with your current "
      "signing certificate); a new signing key is made here");
  auto& r = commands.add<UserSideArgs>(renew, run_renew);
  add_server_options(renew, r);
  add_signing_options(renew, r);
  add_holder_options(renew, r);

  auto* keys = app.add_subcommand(
      "keys",
      "fetch your escrowed encryption key(s) (after `openssl cmp` enrollment, or again) "
      "into a PKCS#12 with your signing pair");
  auto& k = commands.add<UserSideArgs>(keys, run_keys);
  add_server_options(keys, k);
  add_holder_options(keys, k);
}

}  // namespace kmsd::cli

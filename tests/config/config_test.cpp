// kmsd.toml loader: the reference file loads, defaults apply, and every kind of mistake is
// reported with the line and key an operator needs to fix it.
#include "config/config.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <initializer_list>
#include <sstream>
#include <string>
#include <vector>

#include <dlfcn.h>
#include <gtest/gtest.h>
#include <openssl/crypto.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tests/support/sandbox.hpp"

namespace kmsd::config {
namespace {

namespace fs = std::filesystem;
using ::kmsd::testing::kSoftHsmModule;
using ::kmsd::testing::TempDir;

std::string join_lines(std::initializer_list<std::string> lines) {
  std::string out;
  for (const auto& l : lines) out += l + "\n";
  return out;
}

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  for (std::size_t pos = s.find(from); pos != std::string::npos;
       pos = s.find(from, pos + to.size())) {
    s.replace(pos, from.size(), to);
  }
  return s;
}

// A complete, valid file; the line numbers below are relied upon by the tests.
//  1 [server]
//  2 public_listen
//  3 admin_listen
//  4 unseal_socket
//  5 [token]
//  6 module
//  7 uri
//  8 [ca]
//  9 subject
// 10 [store]
// 11 path
// 12 [startup]
// 13 source
struct Minimal {
  std::string public_listen = "\"127.0.0.1:8080\"";
  std::string admin_listen = "\"127.0.0.1:8443\"";
  std::string unseal_socket = "\"unseal.sock\"";
  std::string module = std::string("\"") + kSoftHsmModule + "\"";
  std::string uri = "\"pkcs11:token=kmsd\"";
  std::string subject = "\"/O=Example/CN=kmsd CA\"";
  std::string store = "\"kmsd.db\"";
  std::string source = "\"prompt\"";
  std::string extra;  // appended from line 14 on

  std::string text() const {
    return join_lines({"[server]", "public_listen = " + public_listen,
                       "admin_listen = " + admin_listen, "unseal_socket = " + unseal_socket,
                       "[token]", "module = " + module, "uri = " + uri, "[ca]",
                       "subject = " + subject, "[store]", "path = " + store, "[startup]",
                       "source = " + source}) +
           extra;
  }
};

std::string dump(const LoadResult& r, const fs::path& file) {
  std::string out;
  for (const auto& p : r.problems) out += "  " + p.to_string(file) + "\n";
  return out.empty() ? "  (no problems)\n" : out;
}

class ConfigTest : public ::testing::Test {
 protected:
  fs::path file() const { return tmp_.path() / "kmsd.toml"; }
  const fs::path& dir() const { return tmp_.path(); }

  fs::path write(const fs::path& path, const std::string& text) const {
    fs::create_directories(path.parent_path());
    std::ofstream(path) << text;
    return path;
  }

  LoadResult load_text(const std::string& text) {
    write(file(), text);
    return load(file());
  }

  // Exactly one problem, at LINE, for KEY, whose message contains NEEDLE.
  void expect_one(const LoadResult& r, std::uint32_t line, const std::string& key,
                  const std::string& needle) {
    ASSERT_EQ(r.problems.size(), 1u) << dump(r, file());
    expect_problem(r.problems[0], line, key, needle);
  }

  void expect_problem(const Problem& p, std::uint32_t line, const std::string& key,
                      const std::string& needle) {
    EXPECT_EQ(p.line, line) << p.to_string(file());
    EXPECT_EQ(p.key, key) << p.to_string(file());
    EXPECT_NE(p.message.find(needle), std::string::npos)
        << "expected \"" << needle << "\" in: " << p.to_string(file());
  }

  void expect_ok(const LoadResult& r) { EXPECT_TRUE(r.ok()) << dump(r, file()); }

 private:
  TempDir tmp_;
};

// ---- the reference file and defaults ----

TEST_F(ConfigTest, ReferenceFileLoadsCleanlyAndDocumentsTheDefaults) {
  std::ifstream in(fs::path(KMSD_SOURCE_DIR) / "config" / "kmsd.toml");
  ASSERT_TRUE(in) << "config/kmsd.toml is missing";
  std::stringstream text;
  text << in.rdbuf();
  // The store's directory must exist: point it into the sandbox.
  const std::string reference =
      replace_all(text.str(), "/var/lib/kmsd/", (dir() / "var").string() + "/");
  fs::create_directories(dir() / "var");
  const LoadResult r = load_text(reference);
  ASSERT_TRUE(r.ok()) << dump(r, file());

  // Every value the reference shows is the built-in default.
  const Config defaults;
  const Config& c = r.config;
  EXPECT_EQ(c.server.public_listen.to_string(), defaults.server.public_listen.to_string());
  EXPECT_EQ(c.server.admin_listen.to_string(), defaults.server.admin_listen.to_string());
  EXPECT_EQ(c.server.tls_names, defaults.server.tls_names);
  EXPECT_EQ(c.server.unseal_socket, defaults.server.unseal_socket);
  EXPECT_EQ(c.server.worker_threads, defaults.server.worker_threads);
  EXPECT_EQ(c.server.io_threads, defaults.server.io_threads);
  EXPECT_EQ(c.server.max_body_bytes, defaults.server.max_body_bytes);
  EXPECT_EQ(c.server.request_timeout_seconds, defaults.server.request_timeout_seconds);
  EXPECT_EQ(c.token.module, fs::path(kSoftHsmModule));
  EXPECT_EQ(c.token.uri, "pkcs11:token=kmsd");
  EXPECT_EQ(c.token.pool_size, defaults.token.pool_size);
  EXPECT_EQ(c.token.wrap, defaults.token.wrap);
  EXPECT_EQ(c.token.labels.master_prefix, defaults.token.labels.master_prefix);
  EXPECT_EQ(c.token.labels.master_mac_prefix, defaults.token.labels.master_mac_prefix);
  EXPECT_EQ(c.token.labels.ca, defaults.token.labels.ca);
  EXPECT_EQ(c.token.labels.audit, defaults.token.labels.audit);
  EXPECT_EQ(c.ca.key_type, defaults.ca.key_type);
  EXPECT_EQ(c.ca.subject, "/O=Example/CN=kmsd CA");
  EXPECT_EQ(c.ca.validity_days, defaults.ca.validity_days);
  EXPECT_EQ(c.ca.digest, defaults.ca.digest);
  EXPECT_EQ(c.admin.cert_validity_days, defaults.admin.cert_validity_days);
  EXPECT_EQ(c.admin.key_type, defaults.admin.key_type);
  EXPECT_EQ(c.store.path, dir() / "var" / "kmsd.db");
  EXPECT_EQ(c.startup.source, StartupSource::kPrompt);
  EXPECT_EQ(c.policy.x509_versions, defaults.policy.x509_versions);
  EXPECT_EQ(c.policy.key_types, defaults.policy.key_types);
  EXPECT_EQ(c.policy.max_validity_days, defaults.policy.max_validity_days);
  EXPECT_EQ(c.policy.max_subject_length, defaults.policy.max_subject_length);
  EXPECT_EQ(c.policy.max_user_id_length, defaults.policy.max_user_id_length);
  EXPECT_EQ(c.policy.max_email_length, defaults.policy.max_email_length);
  EXPECT_EQ(c.policy.max_display_name_length, defaults.policy.max_display_name_length);
  EXPECT_EQ(c.policy.signing.key_usage, defaults.policy.signing.key_usage);
  EXPECT_EQ(c.policy.signing.extended_key_usage, defaults.policy.signing.extended_key_usage);
  EXPECT_EQ(c.policy.encryption.key_usage, defaults.policy.encryption.key_usage);
  EXPECT_EQ(c.policy.encryption.extended_key_usage, defaults.policy.encryption.extended_key_usage);
  EXPECT_EQ(c.log.level, defaults.log.level);
  EXPECT_TRUE(c.log.file.empty());
  EXPECT_EQ(c.source_path, file());
}

TEST_F(ConfigTest, DefaultsApplyWhenOptionalKeysAreAbsent) {
  const LoadResult r = load_text(Minimal{}.text());
  ASSERT_TRUE(r.ok()) << dump(r, file());
  const Config& c = r.config;
  EXPECT_EQ(c.server.tls_names, (std::vector<std::string>{"localhost", "127.0.0.1"}));
  EXPECT_EQ(c.server.worker_threads, 2u);
  EXPECT_EQ(c.server.io_threads, 1u);
  EXPECT_EQ(c.server.max_body_bytes, 1u << 20);
  EXPECT_EQ(c.server.request_timeout_seconds, 30u);
  EXPECT_EQ(c.token.pool_size, 4u);
  EXPECT_EQ(c.token.wrap, hsm::WrapMechanism::kAesKeyWrapPad);
  EXPECT_EQ(c.token.labels.master_prefix, "kms-master");
  EXPECT_EQ(c.token.labels.ca, "kms-ca");
  EXPECT_EQ(c.ca.key_type, hsm::KeyType::kEcP256);
  EXPECT_EQ(c.ca.validity_days, 3650u);
  EXPECT_EQ(c.ca.digest, "sha256");
  EXPECT_EQ(c.admin.cert_validity_days, 365u);
  EXPECT_EQ(c.ca.crl_next_update_hours, 24u);
  EXPECT_EQ(c.ca.ocsp_validity_minutes, 60u);
  EXPECT_TRUE(c.ca.crl_path.empty());
  EXPECT_EQ(c.enrollment.cert_validity_days, 365u);
  EXPECT_EQ(c.enrollment.encryption_key_type, hsm::KeyType::kEcP256);
  EXPECT_EQ(c.enrollment.renew_encryption_key, RenewKey::kNew);
  // The URLs follow the public listener unless set.
  EXPECT_EQ(crl_url_for(c), "http://" + c.server.public_listen.to_string() + "/crl");
  EXPECT_EQ(ocsp_url_for(c), "http://" + c.server.public_listen.to_string() + "/ocsp");
  EXPECT_EQ(c.policy.x509_versions, std::vector<int>{3});
  EXPECT_EQ(c.policy.key_types.size(), 4u);
  EXPECT_EQ(c.policy.max_validity_days, 825u);
  EXPECT_EQ(c.policy.max_subject_length, 256u);
  EXPECT_EQ(c.policy.max_user_id_length, 64u);
  EXPECT_EQ(c.policy.max_email_length, 254u);
  EXPECT_EQ(c.policy.max_display_name_length, 64u);
  EXPECT_EQ(c.policy.signing.key_usage,
            (std::vector<std::string>{"digitalSignature", "nonRepudiation"}));
  EXPECT_EQ(c.policy.signing.extended_key_usage, std::vector<std::string>{"emailProtection"});
  EXPECT_EQ(c.policy.encryption.key_usage,
            (std::vector<std::string>{"keyEncipherment", "keyAgreement"}));
  EXPECT_EQ(c.policy.encryption.extended_key_usage, std::vector<std::string>{"emailProtection"});
  EXPECT_EQ(c.log.level, "info");
  EXPECT_TRUE(c.log.file.empty());
  EXPECT_EQ(c.startup.source, StartupSource::kPrompt);
}

TEST_F(ConfigTest, EveryOptionalKeyIsReadWhenPresent) {
  const std::string text = join_lines({
      "[server]",
      "public_listen = \"0.0.0.0:80\"",
      "admin_listen = \"[::1]:9443\"",
      "tls_names = [\"kms.example.org\", \"*.example.org\", \"10.0.0.1\", \"::1\"]",
      "unseal_socket = \"/run/kmsd/u.sock\"",
      "worker_threads = 8",
      "io_threads = 3",
      "max_body_bytes = 4096",
      "request_timeout_seconds = 5",
      "[token]",
      std::string("module = \"") + kSoftHsmModule + "\"",
      "uri = \"pkcs11:token=my%20token;serial=0123abcd;manufacturer=SoftHSM%20project\"",
      "pool_size = 16",
      "wrap_mechanism = \"aes-cbc-pad-hmac\"",
      "labels = { master_prefix = \"m\", master_mac_prefix = \"mm\", ca = \"c\", audit = \"a\" }",
      "[ca]",
      "key_type = \"rsa-3072\"",
      "subject = \"/C=DE/ST=Berlin/L=Berlin/O=Example\\\\/Sub/OU=PKI/CN=kmsd CA/DC=example\"",
      "validity_days = 7300",
      "digest = \"sha384\"",
      "crl_url = \"http://kms.example.org/pki/kmsd.crl\"",
      "ocsp_url = \"https://kms.example.org/ocsp\"",
      "crl_path = \"data/kmsd.crl\"",
      "crl_next_update_hours = 6",
      "ocsp_validity_minutes = 15",
      "[admin]",
      "cert_validity_days = 90",
      "key_type = \"ec-p384\"",
      "[store]",
      "path = \"data/kmsd.db\"",
      "[startup]",
      "source = \"file\"",
      "file = \"secret\"",
      "[policy]",
      "x509_versions = [1, 3]",
      "key_types = [\"ec-p384\", \"rsa-3072\"]",
      "max_validity_days = 400",
      "max_subject_length = 512",
      "max_user_id_length = 32",
      "max_email_length = 128",
      "max_display_name_length = 48",
      "signing = { key_usage = [\"digitalSignature\"], extended_key_usage = [] }",
      "[policy.encryption]",
      "key_usage = [\"keyAgreement\"]",
      "extended_key_usage = [\"emailProtection\", \"msEFS\"]",
      "[enrollment]",
      "cert_validity_days = 200",
      "encryption_key_type = \"rsa-3072\"",
      "renew_encryption_key = \"same\"",
      "[log]",
      "level = \"debug\"",
      "file = \"kmsd.log\"",
  });
  fs::create_directories(dir() / "data");
  const LoadResult r = load_text(text);
  ASSERT_TRUE(r.ok()) << dump(r, file());
  const Config& c = r.config;
  EXPECT_EQ(c.server.public_listen.host, "0.0.0.0");
  EXPECT_EQ(c.server.public_listen.port, 80);
  EXPECT_EQ(c.server.admin_listen.host, "::1");
  EXPECT_EQ(c.server.admin_listen.port, 9443);
  EXPECT_EQ(c.server.admin_listen.to_string(), "[::1]:9443");
  EXPECT_EQ(c.server.tls_names,
            (std::vector<std::string>{"kms.example.org", "*.example.org", "10.0.0.1", "::1"}));
  EXPECT_EQ(c.server.unseal_socket, fs::path("/run/kmsd/u.sock"));
  EXPECT_EQ(c.server.worker_threads, 8u);
  EXPECT_EQ(c.server.io_threads, 3u);
  EXPECT_EQ(c.server.max_body_bytes, 4096u);
  EXPECT_EQ(c.server.request_timeout_seconds, 5u);
  EXPECT_EQ(c.token.pool_size, 16u);
  EXPECT_EQ(c.token.wrap, hsm::WrapMechanism::kAesCbcPadHmac);
  EXPECT_EQ(c.token.labels.master_prefix, "m");
  EXPECT_EQ(c.token.labels.master_mac_prefix, "mm");
  EXPECT_EQ(c.token.labels.ca, "c");
  EXPECT_EQ(c.token.labels.audit, "a");
  EXPECT_EQ(c.ca.key_type, hsm::KeyType::kRsa3072);
  EXPECT_EQ(c.ca.subject, "/C=DE/ST=Berlin/L=Berlin/O=Example\\/Sub/OU=PKI/CN=kmsd CA/DC=example");
  EXPECT_EQ(c.ca.validity_days, 7300u);
  EXPECT_EQ(c.ca.digest, "sha384");
  EXPECT_EQ(c.ca.crl_url, "http://kms.example.org/pki/kmsd.crl");
  EXPECT_EQ(c.ca.ocsp_url, "https://kms.example.org/ocsp");
  EXPECT_EQ(crl_url_for(c), "http://kms.example.org/pki/kmsd.crl");
  EXPECT_EQ(ocsp_url_for(c), "https://kms.example.org/ocsp");
  EXPECT_EQ(c.ca.crl_path, dir() / "data" / "kmsd.crl");
  EXPECT_EQ(c.ca.crl_next_update_hours, 6u);
  EXPECT_EQ(c.ca.ocsp_validity_minutes, 15u);
  EXPECT_EQ(c.enrollment.cert_validity_days, 200u);
  EXPECT_EQ(c.enrollment.encryption_key_type, hsm::KeyType::kRsa3072);
  EXPECT_EQ(c.enrollment.renew_encryption_key, RenewKey::kSame);
  EXPECT_EQ(c.admin.cert_validity_days, 90u);
  EXPECT_EQ(c.admin.key_type, hsm::KeyType::kEcP384);
  EXPECT_EQ(c.startup.source, StartupSource::kFile);
  EXPECT_EQ(c.startup.file, dir() / "secret");
  EXPECT_EQ(c.policy.x509_versions, (std::vector<int>{1, 3}));
  EXPECT_EQ(c.policy.key_types,
            (std::vector<hsm::KeyType>{hsm::KeyType::kEcP384, hsm::KeyType::kRsa3072}));
  EXPECT_EQ(c.policy.max_validity_days, 400u);
  EXPECT_EQ(c.policy.max_subject_length, 512u);
  EXPECT_EQ(c.policy.max_user_id_length, 32u);
  EXPECT_EQ(c.policy.max_email_length, 128u);
  EXPECT_EQ(c.policy.max_display_name_length, 48u);
  EXPECT_EQ(c.policy.signing.key_usage, std::vector<std::string>{"digitalSignature"});
  EXPECT_TRUE(c.policy.signing.extended_key_usage.empty());
  EXPECT_EQ(c.policy.encryption.key_usage, std::vector<std::string>{"keyAgreement"});
  EXPECT_EQ(c.policy.encryption.extended_key_usage,
            (std::vector<std::string>{"emailProtection", "msEFS"}));
  EXPECT_EQ(c.log.level, "debug");
  EXPECT_EQ(c.log.file, dir() / "kmsd.log");
}

TEST_F(ConfigTest, EnumSpellingsMapToTheirValues) {
  const std::pair<const char*, hsm::WrapMechanism> wraps[] = {
      {"aes-key-wrap-pad", hsm::WrapMechanism::kAesKeyWrapPad},
      {"aes-gcm", hsm::WrapMechanism::kAesGcm},
      {"aes-cbc-pad-hmac", hsm::WrapMechanism::kAesCbcPadHmac},
  };
  for (const auto& [name, value] : wraps) {
    Minimal m;
    m.uri = "\"pkcs11:token=kmsd\"\nwrap_mechanism = \"" + std::string(name) + "\"";
    const LoadResult r = load_text(m.text());
    ASSERT_TRUE(r.ok()) << name << "\n" << dump(r, file());
    EXPECT_EQ(r.config.token.wrap, value) << name;
  }
  const std::pair<const char*, hsm::KeyType> types[] = {
      {"ec-p256", hsm::KeyType::kEcP256},
      {"ec-p384", hsm::KeyType::kEcP384},
      {"rsa-2048", hsm::KeyType::kRsa2048},
      {"rsa-3072", hsm::KeyType::kRsa3072},
  };
  for (const auto& [name, value] : types) {
    Minimal m;
    m.subject = "\"/CN=x\"\nkey_type = \"" + std::string(name) + "\"";
    const LoadResult r = load_text(m.text());
    ASSERT_TRUE(r.ok()) << name << "\n" << dump(r, file());
    EXPECT_EQ(r.config.ca.key_type, value) << name;
  }
}

// ---- missing and unknown keys ----

TEST_F(ConfigTest, MissingRequiredKeyIsReportedAtItsSectionLine) {
  std::string text = Minimal{}.text();
  text = replace_all(text, "unseal_socket = \"unseal.sock\"\n", "");
  const LoadResult r = load_text(text);
  expect_one(r, 1, "server.unseal_socket", "required key is missing from [server]");
  EXPECT_EQ(r.problems[0].to_string(file()),
            file().string() + ":1: server.unseal_socket: required key is missing from [server]");
}

TEST_F(ConfigTest, MissingSectionReportsEveryRequiredKeyWithoutALine) {
  Minimal m;
  std::string text = m.text();
  text = replace_all(text, "[token]\nmodule = " + m.module + "\nuri = " + m.uri + "\n", "");
  const LoadResult r = load_text(text);
  ASSERT_EQ(r.problems.size(), 2u) << dump(r, file());
  expect_problem(r.problems[0], 0, "token.module", "add it to a [token] section");
  expect_problem(r.problems[1], 0, "token.uri", "add it to a [token] section");
  EXPECT_EQ(
      r.problems[0].to_string(file()),
      file().string() + ": token.module: required key is missing; add it to a [token] section");
}

TEST_F(ConfigTest, EmptyFileReportsEveryRequiredKey) {
  const LoadResult r = load_text("");
  std::vector<std::string> keys;
  for (const auto& p : r.problems) {
    EXPECT_EQ(p.line, 0u);
    keys.push_back(p.key);
  }
  EXPECT_EQ(keys, (std::vector<std::string>{"server.public_listen", "server.admin_listen",
                                            "server.unseal_socket", "token.module", "token.uri",
                                            "ca.subject", "store.path", "startup.source"}));
}

TEST_F(ConfigTest, UnknownTopLevelKeysAreReportedWithSuggestions) {
  Minimal m;
  m.extra = join_lines({
      "[sever]",       // 15 (after the line prepended below): near miss of a section
      "x = 1",         // 16: inside the unknown section; not reported separately
      "[frobnicate]",  // 17: nothing close
  });
  const std::string text = "module = \"x.so\"\n" + m.text();  // line 1: belongs in [token]
  const LoadResult r = load_text(text);
  ASSERT_EQ(r.problems.size(), 3u) << dump(r, file());
  expect_problem(r.problems[0], 1, "module", "unknown key; 'module' belongs in [token]");
  expect_problem(r.problems[1], 15, "sever", "unknown key; did you mean 'server'?");
  expect_problem(r.problems[2], 17, "frobnicate", "unknown key");
  EXPECT_EQ(r.problems[2].message, "unknown key");
}

TEST_F(ConfigTest, UnknownNestedKeysAreReportedWithSuggestions) {
  Minimal m;
  m.public_listen = "\"127.0.0.1:8080\"\npubic_listen = \"127.0.0.1:9090\"";  // line 3
  m.extra = join_lines({
      "[token.labels]",     // 15
      "caa = \"kms-ca\"",   // 16
      "[server.tls]",       // 17
      "cert = \"x.pem\"",   // 18: inside the unknown table; not reported separately
      "[policy]",           // 19
      "pool_size = 2",      // 20: belongs in [token]
      "max_validity = 30",  // 21: near max_validity_days
  });
  const LoadResult r = load_text(m.text());
  ASSERT_EQ(r.problems.size(), 5u) << dump(r, file());
  expect_problem(r.problems[0], 3, "server.pubic_listen", "did you mean 'public_listen'?");
  expect_problem(r.problems[1], 16, "token.labels.caa", "did you mean 'ca'?");
  expect_problem(r.problems[2], 17, "server.tls", "unknown key");
  expect_problem(r.problems[3], 20, "policy.pool_size", "'pool_size' belongs in [token]");
  expect_problem(r.problems[4], 21, "policy.max_validity", "did you mean 'max_validity_days'?");
}

// ---- types and ranges ----

TEST_F(ConfigTest, WrongTypesNameTheExpectedAndFoundTypes) {
  Minimal m;
  m.public_listen = "8080";                                     // line 2
  m.unseal_socket = "\"unseal.sock\"\nworker_threads = \"4\"";  // line 5
  m.uri = "\"pkcs11:token=kmsd\"\npool_size = 2.5";             // line 9
  m.extra = join_lines({
      "[policy]",                 // 16
      "x509_versions = [\"3\"]",  // 17
      "key_types = \"ec-p256\"",  // 18
      "[log]",                    // 19
      "level = true",             // 20
  });
  const LoadResult r = load_text(m.text());
  ASSERT_EQ(r.problems.size(), 6u) << dump(r, file());
  expect_problem(r.problems[0], 2, "server.public_listen",
                 "expected a string \"host:port\", found an integer");
  expect_problem(r.problems[1], 5, "server.worker_threads",
                 "expected an integer, found a string (write 4 without quotes)");
  expect_problem(r.problems[2], 9, "token.pool_size",
                 "expected an integer, found a floating-point number");
  expect_problem(r.problems[3], 17, "policy.x509_versions",
                 "each entry must be an integer, found a string");
  expect_problem(r.problems[4], 18, "policy.key_types",
                 "expected an array of strings, found a string");
  expect_problem(r.problems[5], 20, "log.level", "expected a string, found a boolean");
}

TEST_F(ConfigTest, SectionThatIsNotATableIsATypeError) {
  const std::string text = "log = \"debug\"\n" + Minimal{}.text();
  const LoadResult r = load_text(text);
  expect_one(r, 1, "log", "expected a table ([log]), found a string");
}

TEST_F(ConfigTest, SectionOfTheWrongTypeIsNotAlsoReportedAsMissingItsKeys) {
  // [startup] as a key instead of a table; its required key is not reported again.
  std::string text = replace_all(Minimal{}.text(), "[startup]\nsource = \"prompt\"\n", "");
  text = "startup = \"prompt\"\n" + text;
  const LoadResult r = load_text(text);
  expect_one(r, 1, "startup", "expected a table ([startup]), found a string");
}

TEST_F(ConfigTest, OutOfRangeValuesNameTheRange) {
  Minimal m;
  m.unseal_socket = join_lines({"\"unseal.sock\"", "worker_threads = 0", "io_threads = 17",
                                "max_body_bytes = 1023", "request_timeout_seconds = 601"});
  m.unseal_socket.pop_back();                       // lines 4-8
  m.uri = "\"pkcs11:token=kmsd\"\npool_size = 65";  // uri 11, pool_size 12
  m.extra = join_lines({
      "[policy]",                   // 19
      "x509_versions = [3, 2]",     // 20
      "max_subject_length = 15",    // 21
      "max_validity_days = 36501",  // 22
  });
  const LoadResult r = load_text(m.text());
  ASSERT_EQ(r.problems.size(), 8u) << dump(r, file());
  expect_problem(r.problems[0], 5, "server.worker_threads", "must be between 1 and 64, found 0");
  expect_problem(r.problems[1], 6, "server.io_threads", "must be between 1 and 16, found 17");
  expect_problem(r.problems[2], 7, "server.max_body_bytes",
                 "must be between 1024 and 67108864, found 1023");
  expect_problem(r.problems[3], 8, "server.request_timeout_seconds",
                 "must be between 1 and 600, found 601");
  expect_problem(r.problems[4], 12, "token.pool_size", "must be between 1 and 64, found 65");
  expect_problem(r.problems[5], 20, "policy.x509_versions", "each entry must be 1 or 3, found 2");
  expect_problem(r.problems[6], 21, "policy.max_subject_length",
                 "must be between 16 and 4096, found 15");
  expect_problem(r.problems[7], 22, "policy.max_validity_days",
                 "must be between 1 and 36500, found 36501");
}

TEST_F(ConfigTest, UnknownEnumValuesListTheChoicesAndSuggest) {
  Minimal m;
  m.uri = "\"pkcs11:token=kmsd\"\nwrap_mechanism = \"aes-keywrap-pad\"";          // line 8
  m.subject = "\"/CN=x\"\ndigest = \"md5\"";                                      // line 11
  m.extra = join_lines({"[policy]", "key_types = [\"ec-p256\", \"rsa-1024\"]"});  // 17
  const LoadResult r = load_text(m.text());
  ASSERT_EQ(r.problems.size(), 3u) << dump(r, file());
  expect_problem(r.problems[0], 8, "token.wrap_mechanism",
                 "must be one of \"aes-key-wrap-pad\", \"aes-gcm\", \"aes-cbc-pad-hmac\"; found "
                 "\"aes-keywrap-pad\" (did you mean \"aes-key-wrap-pad\"?)");
  expect_problem(r.problems[1], 11, "ca.digest", "found \"md5\"");
  expect_problem(r.problems[2], 17, "policy.key_types", "found \"rsa-1024\"");
}

// ---- the token ----

TEST_F(ConfigTest, BadTokenUrisAreReportedInEveryForm) {
  const std::pair<const char*, const char*> cases[] = {
      {"token=kmsd", "starts with \"pkcs11:\""},
      {"PKCS11:token=kmsd", "lower case"},
      {"pkcs11:", "\"token=LABEL\" or \"serial=SERIAL\""},
      {"pkcs11:model=SoftHSM%20v2", "\"token=LABEL\" or \"serial=SERIAL\""},
      {"pkcs11:token=my token", "a space must be percent-encoded as %20"},
      {"pkcs11:token=kmsd%2", "'%' must be followed by two hexadecimal digits"},
      {"pkcs11:token=kmsd%zz", "'%' must be followed by two hexadecimal digits"},
      {"pkcs11:tokn=kmsd", "unknown path attribute \"tokn\"; did you mean \"token\"?"},
      {"pkcs11:token=a;token=b", "\"token\" appears more than once"},
      {"pkcs11:token=kmsd;object=kms-ca", "selects an object"},
      {"pkcs11:token=", "empty value"},
      {"pkcs11:token=kmsd;", "stray ';'"},
      {"pkcs11:token=kmsd;slot-id=abc", "slot-id\" must be a decimal number"},
      {"pkcs11:token=kmsd?pin-value=1234", "the PIN never goes in the URI"},
      {"pkcs11:token=kmsd?module-path=/x.so", "chosen by token.module"},
      {"pkcs11:token=0123456789012345678901234567890123", "PKCS#11 allows at most 32"},
      {"pkcs11:token/kmsd", "has no '='"},
  };
  for (const auto& [uri, needle] : cases) {
    SCOPED_TRACE(uri);
    Minimal m;
    m.uri = "\"" + std::string(uri) + "\"";
    const LoadResult r = load_text(m.text());
    expect_one(r, 7, "token.uri", needle);
  }
}

TEST_F(ConfigTest, ValidTokenUrisAreAccepted) {
  for (const char* uri :
       {"pkcs11:token=kmsd", "pkcs11:serial=8d3f2a",
        "pkcs11:token=my%20token;manufacturer=SoftHSM%20project;model=SoftHSM%20v2",
        "pkcs11:slot-id=0;token=a:b@c", "pkcs11:token=kmsd;library-version=2.6"}) {
    SCOPED_TRACE(uri);
    Minimal m;
    m.uri = "\"" + std::string(uri) + "\"";
    const LoadResult r = load_text(m.text());
    expect_ok(r);
    EXPECT_EQ(r.config.token.uri, uri);
  }
}

TEST_F(ConfigTest, MissingModuleFileIsReported) {
  Minimal m;
  m.module = "\"lib/nope.so\"";
  const LoadResult r = load_text(m.text());
  expect_one(r, 6, "token.module", (dir() / "lib" / "nope.so").string() + " does not exist");
}

TEST_F(ConfigTest, ModuleThatIsNotASharedLibraryIsReportedWithTheLoaderError) {
  write(dir() / "fake.so", "this is not an ELF file\n");
  Minimal m;
  m.module = "\"fake.so\"";
  const LoadResult r = load_text(m.text());
  expect_one(r, 6, "token.module", "cannot be loaded: ");
  // dlerror's own words are passed on.
  EXPECT_NE(r.problems[0].message.find("fake.so"), std::string::npos);
  EXPECT_TRUE(r.problems[0].message.find("ELF") != std::string::npos ||
              r.problems[0].message.find("too short") != std::string::npos)
      << r.problems[0].message;
}

TEST_F(ConfigTest, SharedLibraryWithoutCGetFunctionListIsReported) {
  // libcrypto is loaded into this very test: a real shared library that is no PKCS#11 module.
  Dl_info info{};
  ASSERT_NE(::dladdr(reinterpret_cast<void*>(&OPENSSL_init_crypto), &info), 0);
  const fs::path libcrypto = fs::canonical(info.dli_fname);
  Minimal m;
  m.module = "\"" + libcrypto.string() + "\"";
  const LoadResult r = load_text(m.text());
  expect_one(r, 6, "token.module", "does not export C_GetFunctionList");
}

TEST_F(ConfigTest, ModuleThatIsADirectoryIsReported) {
  fs::create_directories(dir() / "lib");
  Minimal m;
  m.module = "\"lib\"";
  const LoadResult r = load_text(m.text());
  expect_one(r, 6, "token.module", "is not a regular file");
}

TEST_F(ConfigTest, UnreadableModuleIsReported) {
  const fs::path lib = write(dir() / "locked.so", "x");
  ::chmod(lib.c_str(), 0);
  Minimal m;
  m.module = "\"locked.so\"";
  write(file(), m.text());
  if (::geteuid() != 0) {
    const LoadResult r = load(file());
    expect_one(r, 6, "token.module", "is not readable");
    return;
  }
  // Root reads everything: check as an unprivileged user in a child process.
  ::chmod(dir().c_str(), 0755);
  ::chmod(file().c_str(), 0644);
  // A plain fork, not a death test: the "threadsafe" style re-runs the fixture in a child
  // that never tears down, leaving its temporary directory behind.
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::close(fds[0]);
    if (::setgid(65534) != 0 || ::setuid(65534) != 0) ::_exit(2);
    const LoadResult r = load(file());
    for (const auto& p : r.problems) {
      const std::string line = p.to_string(file()) + "\n";
      (void)!::write(fds[1], line.data(), line.size());
    }
    ::_exit(r.problems.size() == 1 && r.problems[0].line == 6 && r.problems[0].key == "token.module"
                ? 0
                : 1);
  }
  ::close(fds[1]);
  std::string reported;
  char buf[512];
  for (ssize_t n; (n = ::read(fds[0], buf, sizeof buf)) > 0;)
    reported.append(buf, static_cast<std::size_t>(n));
  ::close(fds[0]);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << reported;
  EXPECT_NE(reported.find("kmsd.toml:6: token.module: the module "), std::string::npos) << reported;
  EXPECT_NE(reported.find("locked.so is not readable"), std::string::npos) << reported;
}

TEST_F(ConfigTest, TokenLabelsMustBeNonEmptyPrintableAndDistinct) {
  Minimal m;
  m.extra = join_lines({
      "[token.labels]",                // 14
      "master_prefix = \"\"",          // 15
      "master_mac_prefix = \"m\\t\"",  // 16
      "ca = \"same\"",                 // 17
      "audit = \"same\"",              // 18
  });
  const LoadResult r = load_text(m.text());
  ASSERT_EQ(r.problems.size(), 3u) << dump(r, file());
  expect_problem(r.problems[0], 15, "token.labels.master_prefix", "the label is empty");
  expect_problem(r.problems[1], 16, "token.labels.master_mac_prefix", "printable ASCII");
  expect_problem(r.problems[2], 18, "token.labels.audit", "the same label as token.labels.ca");
}

// ---- server ----

TEST_F(ConfigTest, BadListenAddressesAreReported) {
  const std::pair<const char*, const char*> cases[] = {
      {"localhost", "expected \"host:port\""},
      {"127.0.0.1:0", "not between 1 and 65535"},
      {"127.0.0.1:65536", "not between 1 and 65535"},
      {"127.0.0.1:http", "is not a number"},
      {"127.0.0.1:", "is not a number"},
      {":8080", "the host is empty"},
      {"::1:8080", "IPv6 addresses must be written in brackets"},
      {"[::1:8080", "unterminated '['"},
      {"[::g]:8080", "is not an IPv6 address"},
      {"[::1]8080", "expected \":PORT\""},
      {"bad_host!:8080", "neither an IP address nor a host name"},
  };
  for (const auto& [addr, needle] : cases) {
    SCOPED_TRACE(addr);
    Minimal m;
    m.admin_listen = "\"" + std::string(addr) + "\"";
    const LoadResult r = load_text(m.text());
    expect_one(r, 3, "server.admin_listen", needle);
  }
}

TEST_F(ConfigTest, ListenersOnTheSamePortConflict) {
  Minimal m;
  m.public_listen = "\"0.0.0.0:8443\"";
  const LoadResult r = load_text(m.text());
  expect_one(r, 3, "server.admin_listen", "conflicts with server.public_listen (0.0.0.0:8443)");
}

TEST_F(ConfigTest, BadTlsNamesAreReportedPerEntry) {
  Minimal m;
  m.admin_listen = "\"127.0.0.1:8443\"\ntls_names = [\n  \"ok.example\",\n  \"bad name\",\n  7,\n]";
  const LoadResult r = load_text(m.text());
  ASSERT_EQ(r.problems.size(), 2u) << dump(r, file());
  expect_problem(r.problems[0], 6, "server.tls_names", "neither a DNS name nor an IP address");
  expect_problem(r.problems[1], 7, "server.tls_names",
                 "each entry must be a string, found an integer");
}

TEST_F(ConfigTest, UnsealSocketPathLongerThanSunPathIsReported) {
  Minimal m;
  m.unseal_socket = "\"/run/" + std::string(120, 's') + "\"";
  const LoadResult r = load_text(m.text());
  expect_one(r, 4, "server.unseal_socket", "a Unix socket path may have at most 107");
}

// ---- CA subject ----

TEST_F(ConfigTest, BadSubjectsAreReported) {
  const std::pair<const char*, const char*> cases[] = {
      {"", "the subject is empty"},
      {"O=Example/CN=x", "must start with '/'"},
      {"/", "component 1 is empty"},
      {"/O=Example//CN=x", "component 2 is empty"},
      {"/O=Example/CN", "component 2 \"CN\" is not KEY=VALUE"},
      {"/O=Example/XX=y", "unknown attribute \"XX\""},
      {"/cn=x", "did you mean \"CN\"?"},
      {"/CN=", "attribute \"CN\" has an empty value"},
      {"/C=USA/CN=x", "two-letter country code, found \"USA\""},
      {"/C=1A/CN=x", "two-letter country code"},
      {"/emailAddress=nobody/CN=x", "not an e-mail address"},
      {"/CN=xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
       "is 65 characters long; at most 64"},
      {"/CN=x\\", "lone '\\'"},
  };
  for (const auto& [subject, needle] : cases) {
    SCOPED_TRACE(subject);
    Minimal m;
    std::string escaped = replace_all(subject, "\\", "\\\\");
    m.subject = "\"" + escaped + "\"";
    const LoadResult r = load_text(m.text());
    expect_one(r, 9, "ca.subject", needle);
  }
}

TEST_F(ConfigTest, OverlongSubjectIsReported) {
  std::string subject;
  for (int i = 0; i < 20; ++i) subject += "/OU=" + std::string(60, 'u');
  Minimal m;
  m.subject = "\"" + subject + "\"";
  const LoadResult r = load_text(m.text());
  expect_one(r, 9, "ca.subject", "at most 1024");
}

// ---- store, startup, log ----

TEST_F(ConfigTest, StoreDirectoryMustExist) {
  Minimal m;
  m.store = "\"missing/kmsd.db\"";
  const LoadResult r = load_text(m.text());
  expect_one(r, 11, "store.path",
             "the directory " + (dir() / "missing").string() + " does not exist");
}

TEST_F(ConfigTest, StorePathThatIsADirectoryIsReported) {
  Minimal m;
  m.store = "\".\"";
  const LoadResult r = load_text(m.text());
  expect_one(r, 11, "store.path", "is a directory");
}

TEST_F(ConfigTest, StartupFileIsRequiredWhenSourceIsFile) {
  Minimal m;
  m.source = "\"file\"";
  const LoadResult r = load_text(m.text());
  expect_one(r, 13, "startup.file", "required when startup.source = \"file\"");
}

TEST_F(ConfigTest, StartupFileNeedNotExistYet) {
  Minimal m;
  m.source = "\"file\"\nfile = \"secrets/startup\"";
  const LoadResult r = load_text(m.text());
  expect_ok(r);
  EXPECT_EQ(r.config.startup.source, StartupSource::kFile);
  EXPECT_EQ(r.config.startup.file, dir() / "secrets" / "startup");
}

TEST_F(ConfigTest, UnknownStartupSourceIsReported) {
  Minimal m;
  m.source = "\"promt\"";
  const LoadResult r = load_text(m.text());
  expect_one(r, 13, "startup.source", "(did you mean \"prompt\"?)");
}

TEST_F(ConfigTest, CardSourceNeedsTheCardModuleAndUri) {
  Minimal m;
  m.source = "\"card\"";
  const LoadResult r = load_text(m.text());
  ASSERT_EQ(r.problems.size(), 2u) << dump(r, file());
  expect_problem(r.problems[0], 13, "startup.card_module",
                 "required when startup.source = \"card\"");
  expect_problem(r.problems[1], 13, "startup.card_uri", "required when startup.source = \"card\"");
}

TEST_F(ConfigTest, CardSourceLoadsWithItsDefaults) {
  Minimal m;
  m.source = std::string("\"card\"\ncard_module = \"") + kSoftHsmModule +
             "\"\ncard_uri = \"pkcs11:token=operator1\"";
  const LoadResult r = load_text(m.text());
  expect_ok(r);
  EXPECT_EQ(r.config.startup.source, StartupSource::kCard);
  EXPECT_EQ(r.config.startup.card_module, fs::path(kSoftHsmModule));
  EXPECT_EQ(r.config.startup.card_uri, "pkcs11:token=operator1");
  EXPECT_EQ(r.config.startup.card_label, "kms-startup-secret");
  EXPECT_EQ(r.config.startup.quorum_timeout_minutes, 10u);
}

TEST_F(ConfigTest, QuorumSourceNeedsNoDefaultCardButAValidOne) {
  Minimal m;
  m.source = std::string("\"quorum\"\ncard_module = \"") + kSoftHsmModule +
             "\"\ncard_label = \"share\"\nquorum_timeout_minutes = 3";
  LoadResult r = load_text(m.text());
  expect_ok(r);
  EXPECT_EQ(r.config.startup.source, StartupSource::kQuorum);
  EXPECT_EQ(r.config.startup.card_label, "share");
  EXPECT_EQ(r.config.startup.quorum_timeout_minutes, 3u);

  m.source = std::string("\"quorum\"\ncard_module = \"/nonexistent/card.so\"\n") +
             "card_uri = \"pkcs11:object=x\"\nquorum_timeout_minutes = 0";
  r = load_text(m.text());
  ASSERT_EQ(r.problems.size(), 3u) << dump(r, file());
  expect_problem(r.problems[0], 14, "startup.card_module", "does not exist");
  expect_problem(r.problems[1], 15, "startup.card_uri", "names an object, not a token");
  expect_problem(r.problems[2], 16, "startup.quorum_timeout_minutes", "between 1 and 1440");
}

TEST_F(ConfigTest, EmptyPathIsReported) {
  Minimal m;
  m.extra = join_lines({"[log]", "file = \"\""});
  const LoadResult r = load_text(m.text());
  expect_one(r, 15, "log.file", "the path is empty");
}

// ---- relations between sections ----

TEST_F(ConfigTest, AdminCertificatesMustFitThePolicy) {
  Minimal m;
  m.extra = join_lines({
      "[admin]",                    // 14
      "cert_validity_days = 900",   // 15
      "key_type = \"rsa-2048\"",    // 16
      "[policy]",                   // 17
      "key_types = [\"ec-p256\"]",  // 18
  });
  const LoadResult r = load_text(m.text());
  ASSERT_EQ(r.problems.size(), 2u) << dump(r, file());
  expect_problem(r.problems[0], 15, "admin.cert_validity_days",
                 "900 days exceeds policy.max_validity_days (825)");
  expect_problem(r.problems[1], 16, "admin.key_type", "\"rsa-2048\" is not in policy.key_types");
}

TEST_F(ConfigTest, UserCertificatesMustFitThePolicy) {
  Minimal m;
  m.extra = join_lines({
      "[enrollment]",                        // 14
      "cert_validity_days = 900",            // 15
      "encryption_key_type = \"rsa-2048\"",  // 16
      "[policy]",                            // 17
      "key_types = [\"ec-p256\"]",           // 18
  });
  const LoadResult r = load_text(m.text());
  ASSERT_EQ(r.problems.size(), 2u) << dump(r, file());
  expect_problem(r.problems[0], 15, "enrollment.cert_validity_days",
                 "900 days exceeds policy.max_validity_days (825)");
  expect_problem(r.problems[1], 16, "enrollment.encryption_key_type",
                 "\"rsa-2048\" is not in policy.key_types");
}

TEST_F(ConfigTest, RevocationUrlsMustBeAbsoluteHttpUrls) {
  Minimal m;
  // [ca] is line 8 and its subject line 9: the URLs follow on lines 10 and 11.
  m.subject = join_lines({"\"/O=Example/CN=kmsd CA\"", "crl_url = \"kms.example.org/crl\"",
                          "ocsp_url = \"http://a,b/ocsp\""});
  const LoadResult r = load_text(m.text());
  ASSERT_EQ(r.problems.size(), 2u) << dump(r, file());
  expect_problem(r.problems[0], 10, "ca.crl_url", "is not an absolute http:// or https:// URL");
  expect_problem(r.problems[1], 11, "ca.ocsp_url", "is not an absolute http:// or https:// URL");
}

// ---- policy ----

TEST_F(ConfigTest, PolicyLengthLimitsNameTheirRanges) {
  Minimal m;
  m.extra = join_lines({
      "[policy]",                      // 14
      "max_user_id_length = 0",        // 15
      "max_email_length = 255",        // 16
      "max_display_name_length = 65",  // 17
  });
  const LoadResult r = load_text(m.text());
  ASSERT_EQ(r.problems.size(), 3u) << dump(r, file());
  expect_problem(r.problems[0], 15, "policy.max_user_id_length",
                 "must be between 1 and 255, found 0");
  expect_problem(r.problems[1], 16, "policy.max_email_length",
                 "must be between 6 and 254, found 255");
  expect_problem(r.problems[2], 17, "policy.max_display_name_length",
                 "must be between 1 and 64, found 65");
}

TEST_F(ConfigTest, MisspeltUsagesAreReportedWithASuggestion) {
  Minimal m;
  m.extra = join_lines({
      "[policy.signing]",                                       // 14
      "key_usage = [\"digitalSignatur\", \"nonRepudiation\"]",  // 15
      "extended_key_usage = [\"emailProtect\"]",                // 16
      "[policy.encryption]",                                    // 17
      "key_usage = [\"keyagreement\"]",                         // 18
      "extended_key_usage = [\"clientAuht\"]",                  // 19
  });
  const LoadResult r = load_text(m.text());
  ASSERT_EQ(r.problems.size(), 4u) << dump(r, file());
  expect_problem(r.problems[0], 15, "policy.signing.key_usage",
                 "unknown key usage \"digitalSignatur\"; known: digitalSignature, ");
  expect_problem(r.problems[0], 15, "policy.signing.key_usage",
                 "(did you mean \"digitalSignature\"?)");
  expect_problem(r.problems[1], 16, "policy.signing.extended_key_usage",
                 "unknown extended key usage \"emailProtect\"");
  expect_problem(r.problems[1], 16, "policy.signing.extended_key_usage",
                 "(did you mean \"emailProtection\"?)");
  expect_problem(r.problems[2], 18, "policy.encryption.key_usage",
                 "(did you mean \"keyAgreement\"?)");
  expect_problem(r.problems[3], 19, "policy.encryption.extended_key_usage",
                 "(did you mean \"clientAuth\"?)");
}

TEST_F(ConfigTest, UsagesThatAreNotForUserCertificatesAreReported) {
  Minimal m;
  m.extra = join_lines({
      "[policy.signing]",                                              // 14
      "key_usage = [\"digitalSignature\", \"keyCertSign\"]",           // 15
      "extended_key_usage = [\"E-mail Protection\", \"commonName\"]",  // 16
      "[policy.encryption]",                                           // 17
      "key_usage = [\"keyAgreement\", \"keyAgreement\"]",              // 18
      "extended_key_usage = \"emailProtection\"",                      // 19
  });
  const LoadResult r = load_text(m.text());
  ASSERT_EQ(r.problems.size(), 5u) << dump(r, file());
  expect_problem(r.problems[0], 15, "policy.signing.key_usage",
                 "\"keyCertSign\" is a CA usage; user certificates must not carry it");
  expect_problem(r.problems[1], 16, "policy.signing.extended_key_usage",
                 "write the short name \"emailProtection\" instead of \"E-mail Protection\"");
  expect_problem(r.problems[2], 16, "policy.signing.extended_key_usage",
                 "\"commonName\" is not an extended key usage");
  expect_problem(r.problems[3], 18, "policy.encryption.key_usage",
                 "\"keyAgreement\" is listed twice");
  expect_problem(r.problems[4], 19, "policy.encryption.extended_key_usage",
                 "expected an array of strings, found a string");
}

TEST_F(ConfigTest, EmptyUsageListsMeanNoSuchExtension) {
  Minimal m;
  m.extra = join_lines({
      "[policy]",
      "x509_versions = [1, 3]",
      "[policy.signing]",
      "key_usage = []",
      "extended_key_usage = []",
  });
  const LoadResult r = load_text(m.text());
  ASSERT_TRUE(r.ok()) << dump(r, file());
  EXPECT_TRUE(r.config.policy.signing.key_usage.empty());
  EXPECT_TRUE(r.config.policy.signing.extended_key_usage.empty());
  // The other profile keeps its defaults.
  EXPECT_EQ(r.config.policy.encryption.key_usage, PolicyConfig{}.encryption.key_usage);
}

TEST_F(ConfigTest, UnknownKeyInAProfileTableIsReported) {
  Minimal m;
  m.extra = join_lines({
      "[policy.signing]",                     // 14
      "key_usages = [\"digitalSignature\"]",  // 15
      "[policy.archive]",                     // 16
      "key_usage = []",                       // 17
  });
  const LoadResult r = load_text(m.text());
  ASSERT_EQ(r.problems.size(), 2u) << dump(r, file());
  expect_problem(r.problems[0], 15, "policy.signing.key_usages", "did you mean 'key_usage'?");
  expect_problem(r.problems[1], 16, "policy.archive", "unknown key");
}

TEST_F(ConfigTest, PolicyWithoutV3CouldNeverIssueAdministratorCertificates) {
  Minimal m;
  m.extra = join_lines({
      "[policy]",             // 14
      "x509_versions = [1]",  // 15
  });
  const LoadResult r = load_text(m.text());
  expect_one(r, 15, "policy.x509_versions",
             "does not allow 3; administrator and TLS server certificates are always v3");
}

// ---- paths ----

TEST_F(ConfigTest, RelativePathsResolveAgainstTheConfigDirectory) {
  const fs::path etc = dir() / "etc" / "kmsd";
  fs::create_directories(etc / "lib");
  fs::create_directories(dir() / "var");
  fs::create_symlink(kSoftHsmModule, etc / "lib" / "module.so");
  Minimal m;
  m.unseal_socket = "\"run/unseal.sock\"";
  m.module = "\"lib/module.so\"";
  m.store = "\"../../var/kmsd.db\"";
  m.source = "\"file\"\nfile = \"secret\"";
  m.extra = join_lines({"[log]", "file = \"kmsd.log\""});
  const fs::path conf = write(etc / "kmsd.toml", m.text());

  // The working directory is irrelevant.
  const fs::path old = fs::current_path();
  fs::current_path("/");
  const LoadResult r = load(conf);
  fs::current_path(old);

  ASSERT_TRUE(r.ok()) << dump(r, conf);
  EXPECT_EQ(r.config.source_path, conf);
  EXPECT_EQ(r.config.server.unseal_socket, etc / "run" / "unseal.sock");
  EXPECT_EQ(r.config.token.module, etc / "lib" / "module.so");
  EXPECT_EQ(r.config.store.path, dir() / "var" / "kmsd.db");
  EXPECT_EQ(r.config.startup.file, etc / "secret");
  EXPECT_EQ(r.config.log.file, etc / "kmsd.log");
}

TEST_F(ConfigTest, LoadStringResolvesPathsAgainstTheGivenFile) {
  fs::create_directories(dir() / "conf");
  const LoadResult r = load_string(Minimal{}.text(), dir() / "conf" / "kmsd.toml");
  ASSERT_TRUE(r.ok()) << dump(r, file());
  EXPECT_EQ(r.config.store.path, dir() / "conf" / "kmsd.db");
  EXPECT_EQ(r.config.source_path, dir() / "conf" / "kmsd.toml");
}

// ---- syntax errors, unreadable files, several problems ----

TEST_F(ConfigTest, TomlSyntaxErrorIsReportedWithItsLine) {
  Minimal m;
  m.subject = "\"/CN=unterminated";  // line 9
  const LoadResult r = load_text(m.text());
  ASSERT_EQ(r.problems.size(), 1u) << dump(r, file());
  EXPECT_EQ(r.problems[0].line, 9u) << dump(r, file());
  EXPECT_NE(r.problems[0].message.find("TOML syntax error"), std::string::npos);
  EXPECT_EQ(r.problems[0].to_string(file()).rfind(file().string() + ":9: TOML syntax error: ", 0),
            0u);
}

TEST_F(ConfigTest, DuplicateKeyIsASyntaxErrorAtTheSecondDefinition) {
  Minimal m;
  m.store = "\"kmsd.db\"\npath = \"other.db\"";  // line 12
  const LoadResult r = load_text(m.text());
  ASSERT_EQ(r.problems.size(), 1u) << dump(r, file());
  EXPECT_EQ(r.problems[0].line, 12u) << dump(r, file());
}

TEST_F(ConfigTest, MissingFileIsReported) {
  const LoadResult r = load(dir() / "absent.toml");
  ASSERT_EQ(r.problems.size(), 1u);
  EXPECT_EQ(r.problems[0].line, 0u);
  EXPECT_NE(r.problems[0].message.find("cannot read the configuration file"), std::string::npos);
  EXPECT_NE(r.problems[0].message.find("No such file"), std::string::npos);
}

TEST_F(ConfigTest, SeveralMistakesAreAllReportedInLineOrder) {
  Minimal m;
  // Line numbers after unseal_socket (line 4) is removed below.
  m.admin_listen = "\"127.0.0.1\"";             // 3: no port
  m.module = "\"nope.so\"";                     // 5: missing module
  m.uri = "\"pkcs11:tokn=kmsd\"";               // 6: bad attribute
  m.subject = "\"/CN=x\"\nvalidity_days = -1";  // 9: out of range
  m.source = "\"file\"";                        // 13: file missing
  m.extra = join_lines({
      "[log]",             // 14
      "levl = \"debug\"",  // 15: unknown
  });
  // And a required key missing from [server] (line 1).
  std::string text = replace_all(m.text(), "unseal_socket = \"unseal.sock\"\n", "");
  const LoadResult r = load_text(text);
  ASSERT_EQ(r.problems.size(), 7u) << dump(r, file());
  expect_problem(r.problems[0], 1, "server.unseal_socket", "required key is missing");
  expect_problem(r.problems[1], 3, "server.admin_listen", "expected \"host:port\"");
  expect_problem(r.problems[2], 5, "token.module", "does not exist");
  expect_problem(r.problems[3], 6, "token.uri", "did you mean \"token\"?");
  expect_problem(r.problems[4], 9, "ca.validity_days", "must be between 1 and 36500, found -1");
  expect_problem(r.problems[5], 13, "startup.file", "required when startup.source");
  expect_problem(r.problems[6], 15, "log.levl", "did you mean 'level'?");
}

// ---- small pieces of the interface ----

TEST(ConfigTypes, EndpointAndStartupSourceSpellings) {
  EXPECT_EQ((Endpoint{"127.0.0.1", 8080}).to_string(), "127.0.0.1:8080");
  EXPECT_EQ((Endpoint{"::1", 8443}).to_string(), "[::1]:8443");
  EXPECT_EQ((Endpoint{"localhost", 1}).to_string(), "localhost:1");
  EXPECT_STREQ(to_string(StartupSource::kPrompt), "prompt");
  EXPECT_STREQ(to_string(StartupSource::kFile), "file");
  EXPECT_STREQ(to_string(StartupSource::kCard), "card");
  EXPECT_STREQ(to_string(StartupSource::kQuorum), "quorum");
}

TEST(ConfigTypes, ProblemToStringOmitsAZeroLine) {
  EXPECT_EQ((Problem{12, "token.uri", "bad"}).to_string("/etc/kmsd.toml"),
            "/etc/kmsd.toml:12: token.uri: bad");
  EXPECT_EQ((Problem{0, "store.path", "missing"}).to_string("/etc/kmsd.toml"),
            "/etc/kmsd.toml: store.path: missing");
}

TEST_F(ConfigTest, ApprovalAndEnrollmentSettingsAreReadAndChecked) {
  Minimal m;
  m.extra = join_lines({
      "[enrollment]",             // 14
      "token_ttl_days = 7",       // 15
      "max_failed_attempts = 0",  // 16
      "[approvals]",              // 17
      "ttl_hours = 24",           // 18
      "[approvals.required]",     // 19
      "revoke = 2",               // 20
      "recover = 17",             // 21
      "recovr = 2",               // 22
  });
  const LoadResult r = load_text(m.text());
  ASSERT_EQ(r.problems.size(), 3u) << dump(r, file());
  expect_problem(r.problems[0], 16, "enrollment.max_failed_attempts",
                 "must be between 1 and 100, found 0");
  expect_problem(r.problems[1], 21, "approvals.required.recover",
                 "must be between 1 and 16, found 17");
  EXPECT_EQ(r.problems[2].line, 22u);
  EXPECT_EQ(r.problems[2].key, "approvals.required.recovr");
  EXPECT_NE(r.problems[2].message.find("did you mean 'recover'"), std::string::npos)
      << r.problems[2].message;

  Minimal good;
  good.extra = join_lines({"[enrollment]", "token_ttl_days = 7", "[approvals]", "ttl_hours = 24",
                           "[approvals.required]", "revoke = 2"});
  const LoadResult ok = load_text(good.text());
  ASSERT_TRUE(ok.ok()) << dump(ok, file());
  EXPECT_EQ(ok.config.enrollment.token_ttl_days, 7u);
  EXPECT_EQ(ok.config.enrollment.max_failed_attempts, 5u);
  EXPECT_EQ(ok.config.approvals.ttl_hours, 24u);
  EXPECT_EQ(ok.config.approvals.required.at("revoke"), 2);
  EXPECT_EQ(ok.config.approvals.required.at("recover"), 1);
}

}  // namespace
}  // namespace kmsd::config

namespace kmsd::config {
namespace {

TEST_F(ConfigTest, TokenCallTimeoutAndProbeIntervalAreReadRangeCheckedAndDefaulted) {
  // The reference file shows the built-in defaults, which are the token layer's own.
  std::ifstream in(fs::path(KMSD_SOURCE_DIR) / "config" / "kmsd.toml");
  std::stringstream text;
  text << in.rdbuf();
  fs::create_directories(dir() / "var");
  const LoadResult ref =
      load_text(replace_all(text.str(), "/var/lib/kmsd/", (dir() / "var").string() + "/"));
  ASSERT_TRUE(ref.ok()) << dump(ref, file());
  const Config defaults;
  const hsm::TokenOptions token_defaults;
  EXPECT_EQ(ref.config.token.call_timeout_milliseconds, defaults.token.call_timeout_milliseconds);
  EXPECT_EQ(ref.config.token.probe_interval_milliseconds,
            defaults.token.probe_interval_milliseconds);
  EXPECT_EQ(std::chrono::milliseconds(defaults.token.call_timeout_milliseconds),
            token_defaults.call_timeout);
  EXPECT_EQ(std::chrono::milliseconds(defaults.token.probe_interval_milliseconds),
            token_defaults.probe_interval);

  Minimal good;  // uri on line 7, the two keys on 8 and 9
  good.uri =
      "\"pkcs11:token=kmsd\"\ncall_timeout_milliseconds = 1500\n"
      "probe_interval_milliseconds = 50";
  const LoadResult ok = load_text(good.text());
  ASSERT_TRUE(ok.ok()) << dump(ok, file());
  EXPECT_EQ(ok.config.token.call_timeout_milliseconds, 1500u);
  EXPECT_EQ(ok.config.token.probe_interval_milliseconds, 50u);

  Minimal low;
  low.uri =
      "\"pkcs11:token=kmsd\"\ncall_timeout_milliseconds = 99\n"
      "probe_interval_milliseconds = 0";
  const LoadResult r = load_text(low.text());
  ASSERT_EQ(r.problems.size(), 2u) << dump(r, file());
  expect_problem(r.problems[0], 8, "token.call_timeout_milliseconds",
                 "must be between 100 and 600000, found 99");
  expect_problem(r.problems[1], 9, "token.probe_interval_milliseconds",
                 "must be between 10 and 60000, found 0");

  Minimal typed;
  typed.uri = "\"pkcs11:token=kmsd\"\ncall_timeout_milliseconds = \"5s\"";
  expect_one(load_text(typed.text()), 8, "token.call_timeout_milliseconds",
             "expected an integer, found a string");

  // Not shorter than the request deadline: a stalled token would give 504s, not fast 503s.
  Minimal slow;
  slow.unseal_socket = "\"unseal.sock\"\nrequest_timeout_seconds = 10";   // line 5
  slow.uri = "\"pkcs11:token=kmsd\"\ncall_timeout_milliseconds = 10000";  // line 9
  expect_one(load_text(slow.text()), 9, "token.call_timeout_milliseconds",
             "10000 ms is not shorter than server.request_timeout_seconds (10 s)");
  slow.uri = "\"pkcs11:token=kmsd\"\ncall_timeout_milliseconds = 9999";
  expect_ok(load_text(slow.text()));

  Minimal misspelt;
  misspelt.uri = "\"pkcs11:token=kmsd\"\nprobe_interval_millis = 50";
  expect_one(load_text(misspelt.text()), 8, "token.probe_interval_millis", "unknown key");
}

TEST_F(ConfigTest, CardSplitApprovalsAreConfigurableAndNotInTheDefaults) {
  EXPECT_EQ(Config{}.approvals.required.count("card_split"), 0u);  // upgrades see no change
  Minimal m;
  m.extra = join_lines({"[approvals.required]", "card_split = 2"});
  const LoadResult r = load_text(m.text());
  ASSERT_TRUE(r.ok()) << dump(r, file());
  EXPECT_EQ(r.config.approvals.required.at("card_split"), 2);
  m.extra = join_lines({"[approvals.required]", "card_split = 0"});  // line 15
  expect_one(load_text(m.text()), 15, "approvals.required.card_split",
             "must be between 1 and 16, found 0");
}

}  // namespace
}  // namespace kmsd::config

// Administrators end to end: kmsd on a throw-away token; kmsctl adds an auditor and an
// approver (keys made by kmsctl); every /v1/ endpoint refuses a missing certificate, a
// certificate from another CA and the wrong role without changing anything; k = 2 operations
// run only at the second distinct administrator; approval rules changed in the configuration
// wait for administrators.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/stat.h>

#include <chrono>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "tests/e2e/harness.hpp"

namespace kmsd::testing {
namespace {

using ::testing::HasSubstr;
using json = nlohmann::json;
namespace fs = std::filesystem;

constexpr const char* kNewPass = "new administrator passphrase";

class AdminsTest : public KmsdTest {
 protected:
  // Starts kmsd with EXTRA appended to the configuration (e.g. [approvals.required]).
  void boot(const std::string& extra = "") {
    KmsdTest::boot(extra);
    write_private(new_pass(), std::string(kNewPass) + "\n");
  }

  fs::path new_pass() const { return dir() / "new.pass"; }
  fs::path p12_of(const std::string& name) const { return dir() / (name + ".p12"); }

  // kmsctl's admin options for the first administrator (alice) or for NAME's PKCS#12.
  std::string as(const std::string& name = "alice") const {
    if (name == "alice") return kmsctl_admin_options();
    return " --server https://localhost:" + std::to_string(admin_port_) + " --p12 " +
           shell_quote(p12_of(name)) + " --ca " + shell_quote(dir() / "ca.pem") +
           " --passphrase-file " + shell_quote(new_pass());
  }

  CommandResult add_admin(const std::string& name, const std::string& role,
                          const std::string& by = "alice") {
    return kmsctl("admin add " + shell_quote(name) + " --role " + role + " --out " +
                  shell_quote(p12_of(name)) + " --new-passphrase-file " + shell_quote(new_pass()) +
                  as(by));
  }

  // curl as NAME (alice, or an administrator added with add_admin), or with CERT_ARGS.
  ApiReply call(const std::string& method, const std::string& path, const json& body = nullptr,
                const std::string& who = "alice", const std::string& cert_args = "") {
    if (cert_args.empty() && who != "alice")
      return api(method, path, body,
                 "--cert-type P12 --cert " + shell_quote(p12_of(who).string() + ":" + kNewPass));
    return api(method, path, body, cert_args);
  }

  // Every row an API call could change (settings aside: the CRL bookkeeping lives there).
  std::string state_digest() {
    return sh("sqlite3 " + shell_quote(db_path()) +
              " '.dump users administrators certificates approval_requests approvals audit_log "
              "enrollment_tokens key_history' | sha256sum")
        .output;
  }

  ApiReply enable_user(const std::string& id) {
    return call("POST", "/v1/users",
                {{"id", id}, {"email", id + "@example.com"}, {"display_name", "User " + id}});
  }

  // Waits until the audit log holds N records of ACTION.
  bool wait_audited(const std::string& action, int n) {
    for (int i = 0; i < 100; ++i) {
      if (sql("SELECT count(*) FROM audit_log WHERE action = '" + action + "'") ==
          std::to_string(n) + "\n")
        return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return false;
  }

  std::string user_state(const std::string& id) {
    return call("GET", "/v1/users/" + id).j()["user"].value("state", "");
  }

  // The first line of kmsctl's output that names a request id after "request ".
  static std::string request_id_in(const std::string& text) {
    auto at = text.find("request ");
    if (at == std::string::npos) return "";
    auto start = at + 8;
    auto end = text.find_first_not_of("0123456789abcdef", start);
    return text.substr(start, end - start);
  }
};

TEST_F(AdminsTest, KmsctlAddsAnAuditorAndAnApproverWhoseKeysNeverLeaveTheClient) {
  boot();
  auto auditor = add_admin("audrey", "auditor");
  ASSERT_EQ(auditor.status, 0) << auditor.output;
  EXPECT_THAT(auditor.output, HasSubstr("added with role auditor"));
  auto approver = add_admin("pat", "approver");
  ASSERT_EQ(approver.status, 0) << approver.output;
  for (const std::string name : {"audrey", "pat"}) {
    struct stat st {};
    ASSERT_EQ(::stat(p12_of(name).c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u);
    EXPECT_FALSE(fs::exists(p12_of(name).string() + ".pending-key"));
    // Key, certificate and the CA, under the new administrator's passphrase.
    auto dump = sh("openssl pkcs12 -in " + shell_quote(p12_of(name)) + " -passin " +
                   shell_quote("file:" + new_pass().string()) + " -nodes");
    ASSERT_EQ(dump.status, 0) << dump.output;
    EXPECT_THAT(dump.output, HasSubstr("PRIVATE KEY"));
    EXPECT_THAT(dump.output, HasSubstr("subject=OU = kmsd administrators, CN = " + name));
    EXPECT_THAT(dump.output, HasSubstr("subject=O = kmsd test, CN = kmsd test CA"));
  }
  auto whoami = kmsctl("whoami" + as("audrey"));
  ASSERT_EQ(whoami.status, 0) << whoami.output;
  EXPECT_THAT(whoami.output, HasSubstr("audrey (auditor"));
  EXPECT_THAT(kmsctl("whoami" + as("pat")).output, HasSubstr("pat (approver"));

  auto list = kmsctl("admin list -o json" + as("audrey"));  // auditors may read
  ASSERT_EQ(list.status, 0) << list.output;
  auto admins = json::parse(list.output)["admins"];
  ASSERT_EQ(admins.size(), 3u);
  EXPECT_EQ(admins[0]["name"], "alice");
  EXPECT_EQ(admins[0]["role"], "admin");
  EXPECT_EQ(admins[1]["name"], "audrey");
  EXPECT_EQ(admins[1]["role"], "auditor");
  EXPECT_EQ(admins[2]["role"], "approver");
  auto table = kmsctl("admin list" + as());
  EXPECT_THAT(table.output, HasSubstr("NAME"));
  EXPECT_THAT(table.output, HasSubstr("audrey"));
  auto csv = kmsctl("admin list -o csv" + as());
  EXPECT_THAT(csv.output, HasSubstr("name,role,certificate_serial,created_at,not_after"));
  // The new keys are nowhere on the server side.
  const std::string key_line = sh("openssl pkcs12 -in " + shell_quote(p12_of("pat")) + " -passin " +
                                  shell_quote("file:" + new_pass().string()) +
                                  " -nocerts -nodes | grep -v -- ----- | "
                                  "grep -v : | sed -n 2p")
                                   .output;
  ASSERT_GT(key_line.size(), 40u);
  EXPECT_EQ(sh("sqlite3 " + shell_quote(db_path()) + " .dump | grep -c -F " +
               shell_quote(key_line.substr(0, 40)))
                .output,
            "0\n");
  EXPECT_EQ(log_text().find(key_line.substr(0, 40)), std::string::npos);
  // Refusals, each with its exit code; no file is left behind.
  auto same_file = add_admin("pat", "admin");
  EXPECT_EQ(same_file.status, 3) << same_file.output;
  EXPECT_THAT(same_file.output, HasSubstr("already exists"));
  auto dup = kmsctl("admin add pat --role admin --out " + shell_quote(dir() / "pat2.p12") +
                    " --new-passphrase-file " + shell_quote(new_pass()) + as());
  EXPECT_EQ(dup.status, 3) << dup.output;
  EXPECT_THAT(dup.output, HasSubstr("already an administrator"));
  EXPECT_FALSE(fs::exists(dir() / "pat2.p12"));
  EXPECT_FALSE(fs::exists(dir() / "pat2.p12.pending-key"));
  auto bad_name = kmsctl("admin add operator --role admin --out " + shell_quote(dir() / "op.p12") +
                         " --new-passphrase-file " + shell_quote(new_pass()) + as());
  EXPECT_EQ(bad_name.status, 2) << bad_name.output;
  EXPECT_THAT(bad_name.output, HasSubstr("operator"));
  EXPECT_FALSE(fs::exists(dir() / "op.p12"));
  EXPECT_FALSE(fs::exists(dir() / "op.p12.pending-key"));
  auto by_auditor = kmsctl("admin add zed --role admin --out " + shell_quote(dir() / "z.p12") +
                           " --new-passphrase-file " + shell_quote(new_pass()) + as("audrey"));
  EXPECT_EQ(by_auditor.status, 4) << by_auditor.output;
  EXPECT_FALSE(fs::exists(dir() / "z.p12.pending-key"));
}

TEST_F(AdminsTest, EveryEndpointRefusesNoCertificateAForeignCaAndTheWrongRoleAndChangesNothing) {
  boot();
  ASSERT_EQ(add_admin("audrey", "auditor").status, 0);
  ASSERT_EQ(add_admin("pat", "approver").status, 0);
  ASSERT_EQ(enable_user("bob").status, 201);
  // Another CA issues a client certificate with the name of a real administrator.
  const fs::path f = dir() / "foreign";
  fs::create_directory(f);
  const std::string q = shell_quote(f.string());
  ASSERT_EQ(sh("cd " + q +
               " && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
               "-subj '/O=kmsd test/CN=kmsd test CA' -keyout ca.key -out ca.pem -days 2 "
               "&& openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
               "-subj '/OU=kmsd administrators/CN=alice' -keyout leaf.key -out leaf.csr "
               "&& printf 'extendedKeyUsage=clientAuth\\nkeyUsage=digitalSignature\\n' > ext "
               "&& openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial "
               "-extfile ext -days 1 -out leaf.pem")
                .status,
            0);
  const std::string foreign = "--cert " + shell_quote((f / "leaf.pem").string()) + " --key " +
                              shell_quote((f / "leaf.key").string());

  struct Endpoint {
    std::string method, path;
    bool auditor, approver;  // whether the role may call it
  };
  const std::vector<Endpoint> endpoints = {
      {"GET", "/v1/whoami", true, true},
      {"GET", "/v1/status", true, true},
      {"POST", "/v1/users", false, false},
      {"GET", "/v1/users/bob", true, false},
      {"POST", "/v1/users/bob/reissue", false, false},
      {"POST", "/v1/users/bob/revoke", false, false},
      {"POST", "/v1/users/bob/recover", false, false},
      {"POST", "/v1/users/bulk", false, false},
      {"GET", "/v1/reports/users", true, false},
      {"GET", "/v1/requests", true, true},
      {"POST", "/v1/requests/0123456789abcdef/approve", false, true},
      {"POST", "/v1/requests/0123456789abcdef/deny", false, true},
      {"GET", "/v1/audit/verify", true, false},
      {"GET", "/v1/audit/export", true, false},
      {"GET", "/v1/admins", true, false},
      {"POST", "/v1/admins", false, false},
      {"DELETE", "/v1/admins/pat", false, false},
  };
  const json body = {{"id", "eve"},         {"email", "eve@example.com"},
                     {"display_name", "E"}, {"users", json::array()},
                     {"name", "mallory"},   {"role", "admin"},
                     {"csr", "x"}};
  const std::string before = state_digest();
  const std::string users_before = sql("SELECT count(*) FROM users");
  const std::string audit_before = sql("SELECT count(*) FROM audit_log");
  for (const auto& e : endpoints) {
    const json b = e.method == "POST" ? body : json(nullptr);
    auto none = call(e.method, e.path, b, "", " ");
    EXPECT_EQ(none.status, 401) << e.method << " " << e.path << ": " << none.body;
    auto other = call(e.method, e.path, b, "", foreign);
    EXPECT_EQ(other.status, 401) << e.method << " " << e.path << ": " << other.body;
    if (!e.auditor) {
      auto r = call(e.method, e.path, b, "audrey");
      EXPECT_EQ(r.status, 403) << "auditor " << e.method << " " << e.path << ": " << r.body;
      EXPECT_THAT(r.body, HasSubstr("role auditor"));
    }
    if (!e.approver) {
      auto r = call(e.method, e.path, b, "pat");
      EXPECT_EQ(r.status, 403) << "approver " << e.method << " " << e.path << ": " << r.body;
      EXPECT_THAT(r.body, HasSubstr("role approver"));
    }
  }
  EXPECT_EQ(state_digest(), before);
  EXPECT_EQ(sql("SELECT count(*) FROM users"), users_before);
  EXPECT_EQ(sql("SELECT count(*) FROM audit_log"), audit_before);
  EXPECT_EQ(user_state("bob"), "enabled");
  EXPECT_EQ(call("GET", "/v1/admins").j()["admins"].size(), 3u);
  // The roles' own calls do work (so the 403s above were about the role, not a broken p12).
  EXPECT_EQ(call("GET", "/v1/audit/verify", nullptr, "audrey").j()["ok"], true);
  EXPECT_EQ(call("GET", "/v1/requests", nullptr, "pat").status, 200);
}

TEST_F(AdminsTest, ARevokeNeedingTwoRunsOnlyWhenTheApproverApprovesAndOnlyOnce) {
  boot("[approvals.required]\nrevoke = 2\n");
  ASSERT_EQ(add_admin("pat", "approver").status, 0);
  ASSERT_EQ(enable_user("bob").status, 201);
  auto revoke = kmsctl("user revoke bob" + as());
  ASSERT_EQ(revoke.status, 0) << revoke.output;
  EXPECT_THAT(revoke.output, HasSubstr("pending"));
  const std::string id = request_id_in(revoke.output);
  ASSERT_EQ(id.size(), 16u) << revoke.output;
  EXPECT_EQ(user_state("bob"), "enabled");  // k - 1 approvals: nothing happened
  // The requester already counts: approving again is refused and changes nothing.
  auto self = kmsctl("request approve " + id + as());
  EXPECT_EQ(self.status, 3) << self.output;
  EXPECT_THAT(self.output, HasSubstr("already approved"));
  EXPECT_EQ(user_state("bob"), "enabled");
  // The approver is the second administrator: it runs now.
  auto approved = kmsctl("request approve " + id + as("pat"));
  ASSERT_EQ(approved.status, 0) << approved.output;
  EXPECT_THAT(approved.output, HasSubstr("executed"));
  EXPECT_EQ(user_state("bob"), "revoked");
  // Once is enough: a second approval by the same approver is refused.
  auto again = kmsctl("request approve " + id + as("pat"));
  EXPECT_EQ(again.status, 3) << again.output;
  EXPECT_EQ(sql("SELECT count(*) FROM audit_log WHERE action = 'user.revoke'"), "1\n");
}

TEST_F(AdminsTest, AnAddNeedingTwoWaitsWithTheKeyEncryptedAndIsCollectedAfterTheSecondApproval) {
  // A fresh KMS with one administrator: admin_add = 1 until a second one exists, then 2 (on
  // SIGHUP; policy_change needs 1 here, so the new rules apply at once, audited).
  boot("[approvals.required]\nadmin_remove = 2\n");
  ASSERT_EQ(add_admin("pat", "approver").status, 0);
  write_config("file", "[approvals.required]\nadmin_add = 2\nadmin_remove = 2\n");
  ::kill(pid_, SIGHUP);
  ASSERT_TRUE(wait_audited("approvals.rules.change", 1)) << log_text();

  auto add = add_admin("carl", "admin");
  ASSERT_EQ(add.status, 0) << add.output;
  EXPECT_THAT(add.output, HasSubstr("kmsctl admin collect"));
  const std::string id = request_id_in(add.output);
  ASSERT_EQ(id.size(), 16u) << add.output;
  const fs::path pending = p12_of("carl").string() + ".pending-key";
  EXPECT_FALSE(fs::exists(p12_of("carl")));
  ASSERT_TRUE(fs::exists(pending));
  struct stat st {};
  ASSERT_EQ(::stat(pending.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  std::ifstream in(pending);
  std::string key_text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_THAT(key_text, HasSubstr("BEGIN ENCRYPTED PRIVATE KEY"));
  EXPECT_NE(sh("openssl pkey -in " + shell_quote(pending) + " -passin pass:wrong -noout").status,
            0);
  EXPECT_EQ(sh("openssl pkey -in " + shell_quote(pending) + " -passin " +
               shell_quote("file:" + new_pass().string()) + " -noout")
                .status,
            0);
  EXPECT_EQ(sql("SELECT count(*) FROM administrators WHERE name = 'carl'"), "0\n");

  const std::string collect_cmd = "admin collect " + id + " --key " + shell_quote(pending) +
                                  " --out " + shell_quote(p12_of("carl")) +
                                  " --new-passphrase-file " + shell_quote(new_pass());
  auto early = kmsctl(collect_cmd + as());
  EXPECT_EQ(early.status, 1) << early.output;
  EXPECT_THAT(early.output, HasSubstr("1 of 2"));
  EXPECT_FALSE(fs::exists(p12_of("carl")));

  auto approved = kmsctl("request approve " + id + as("pat"));
  ASSERT_EQ(approved.status, 0) << approved.output;
  auto collected = kmsctl(collect_cmd + as("pat"));  // approvers may read requests
  ASSERT_EQ(collected.status, 0) << collected.output;
  EXPECT_TRUE(fs::exists(p12_of("carl")));
  EXPECT_FALSE(fs::exists(pending));
  auto whoami = kmsctl("whoami" + as("carl"));
  ASSERT_EQ(whoami.status, 0) << whoami.output;
  EXPECT_THAT(whoami.output, HasSubstr("carl (admin"));

  // Removal also needs two: carl asks, alice approves; carl's own approval would not count.
  auto remove = kmsctl("admin remove pat" + as("carl"));
  ASSERT_EQ(remove.status, 0) << remove.output;
  const std::string rid = request_id_in(remove.output);
  EXPECT_EQ(kmsctl("request approve " + rid + as("carl")).status, 3);
  EXPECT_EQ(kmsctl("whoami" + as("pat")).status, 0);
  ASSERT_EQ(kmsctl("request approve " + rid + as()).status, 0);
  auto gone = kmsctl("whoami" + as("pat"));
  EXPECT_EQ(gone.status, 4) << gone.output;
  EXPECT_THAT(gone.output, HasSubstr("removed"));
  EXPECT_EQ(sql("SELECT revocation_reason FROM certificates c JOIN administrators a ON "
                "a.cert_serial = c.serial WHERE a.name = 'pat'"),
            "5\n");
}

TEST_F(AdminsTest, RemovingRevokesAndTheLastAdminStays) {
  boot();
  ASSERT_EQ(add_admin("audrey", "auditor").status, 0);
  auto last = kmsctl("admin remove alice" + as());
  EXPECT_EQ(last.status, 3) << last.output;
  EXPECT_THAT(last.output, HasSubstr("last administrator with role admin"));
  auto removed = kmsctl("admin remove audrey" + as());
  ASSERT_EQ(removed.status, 0) << removed.output;
  EXPECT_THAT(removed.output, HasSubstr("executed"));
  EXPECT_EQ(sql("SELECT revocation_reason FROM certificates c JOIN administrators a ON "
                "a.cert_serial = c.serial WHERE a.name = 'audrey'"),
            "5\n");
  auto refused = kmsctl("whoami" + as("audrey"));
  EXPECT_EQ(refused.status, 4) << refused.output;
  auto list = json::parse(kmsctl("admin list -o json" + as()).output)["admins"];
  ASSERT_EQ(list.size(), 2u);
  EXPECT_FALSE(list[1]["removed_at"].is_null());
  EXPECT_EQ(kmsctl("audit verify" + as()).status, 0);
}

TEST_F(AdminsTest, AConfigurationAskingForOtherApprovalRulesWaitsForTheAdministrators) {
  boot("[approvals.required]\npolicy_change = 2\n");
  ASSERT_EQ(add_admin("pat", "approver").status, 0);
  ASSERT_EQ(enable_user("bob").status, 201);
  ASSERT_EQ(enable_user("dan").status, 201);
  write_config("file", "[approvals.required]\npolicy_change = 2\nrevoke = 2\n");
  ::kill(pid_, SIGHUP);
  json pending;
  for (int i = 0; i < 100 && pending.is_null(); ++i) {
    const json list = call("GET", "/v1/requests?state=pending").j();  // a local: j() is temporary
    for (const auto& r : list["requests"])
      if (r["operation"] == "policy_change") pending = r;
    if (pending.is_null()) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_FALSE(pending.is_null()) << log_text();
  EXPECT_EQ(pending["requested_by"], "operator");
  EXPECT_EQ(pending["approvals"], 0);
  EXPECT_EQ(pending["required"], 2);
  const std::string id = pending["id"];
  // The rules in force are still the old ones: a revoke runs at once.
  EXPECT_EQ(call("POST", "/v1/users/bob/revoke", json::object()).status, 200);
  // One administrator is not enough; the second one applies the new rules.
  auto one = call("POST", "/v1/requests/" + id + "/approve", json::object());
  EXPECT_EQ(one.status, 202) << one.body;
  EXPECT_EQ(call("POST", "/v1/requests/" + id + "/approve", json::object()).status, 409);
  auto two = call("POST", "/v1/requests/" + id + "/approve", json::object(), "pat");
  ASSERT_EQ(two.status, 200) << two.body;
  auto revoke = call("POST", "/v1/users/dan/revoke", json::object());
  EXPECT_EQ(revoke.status, 202) << revoke.body;  // now revoke needs 2
  EXPECT_EQ(user_state("dan"), "enabled");
  EXPECT_TRUE(wait_audited("approvals.rules.change", 1));
  // A restart with the same file keeps them and asks for nothing new.
  ASSERT_EQ(stop(), 0);
  start();
  ASSERT_TRUE(wait_ready(200)) << log_text();
  ASSERT_EQ(enable_user("erin").status, 201);
  EXPECT_EQ(call("POST", "/v1/users/erin/revoke", json::object()).status, 202);
  EXPECT_EQ(sql("SELECT count(*) FROM approval_requests WHERE operation = 'policy_change'"), "1\n");
}

}  // namespace
}  // namespace kmsd::testing

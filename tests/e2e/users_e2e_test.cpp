// The administrator's side end to end: kmsd on a throw-away token, driven over mutual TLS
// with curl and the first administrator's PKCS#12.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <chrono>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <thread>

#include "tests/e2e/harness.hpp"

namespace kmsd::testing {
namespace {

using ::testing::HasSubstr;
using json = nlohmann::json;

class UsersTest : public KmsdTest {
 protected:
  void SetUp() override {
    KmsdTest::SetUp();
    boot();
  }
};

TEST_F(UsersTest, EnableShowsTheTokenOnceAndRecordsTheUser) {
  auto r = enable("jdoe", "Doe, Jane");
  ASSERT_EQ(r.status, 201) << r.body;
  const std::string token = r.j()["token"];
  EXPECT_THAT(token, ::testing::MatchesRegex("([0-9A-HJKMNP-TV-Z]{4}-){5}[0-9A-HJKMNP-TV-Z]{4}"));
  auto show = api("GET", "/v1/users/jdoe");
  ASSERT_EQ(show.status, 200) << show.body;
  EXPECT_EQ(show.j()["user"]["state"], "enabled");
  EXPECT_EQ(show.j()["user"]["display_name"], "Doe, Jane");
  EXPECT_EQ(show.j()["token_status"]["status"], "pending");
  EXPECT_EQ(show.body.find(token), std::string::npos);  // shown once, never again
  // The token is in no log and not in the database in clear.
  EXPECT_EQ(log_text().find(token), std::string::npos);
  EXPECT_EQ(
      sh("sqlite3 " + shell_quote(db_path()) + " .dump | grep -c " + shell_quote(token)).output,
      "0\n");
}

TEST_F(UsersTest, EnablingTwiceIsRefusedWithItsReasonAndChangesNothing) {
  ASSERT_EQ(enable("jdoe").status, 201);
  auto again = enable("jdoe");
  EXPECT_EQ(again.status, 409) << again.body;
  EXPECT_EQ(again.j()["reason"], "already-enabled");
  EXPECT_THAT(again.j()["error"].get<std::string>(), HasSubstr("reissue"));
  auto reissued = api("POST", "/v1/users/jdoe/reissue");
  ASSERT_EQ(reissued.status, 200) << reissued.body;
  EXPECT_THAT(reissued.j()["message"].get<std::string>(),
              HasSubstr("previous token no longer works"));
}

TEST_F(UsersTest, ANameThatCannotBeCertifiedIsRefusedBeforeAnyTokenIsSpent) {
  auto r = enable("longname", std::string(65, 'x'));
  EXPECT_EQ(r.status, 400) << r.body;
  EXPECT_THAT(r.j()["error"].get<std::string>(), HasSubstr("64"));
  EXPECT_EQ(api("GET", "/v1/users/longname").status, 404);
  auto bad_email =
      api("POST", "/v1/users", {{"id", "x"}, {"email", "not-an-address"}, {"display_name", "X"}});
  EXPECT_EQ(bad_email.status, 400) << bad_email.body;
}

TEST_F(UsersTest, RevokedBeforeEnrollingCanBeEnabledAgainButNeverRecovered) {
  // Q198709: enable -> revoke before enrolling -> enable again must work, and recovery must
  // be refused (nothing was ever escrowed) instead of leaving the record stuck.
  ASSERT_EQ(enable("early").status, 201);
  auto revoked = api("POST", "/v1/users/early/revoke", json::object());
  ASSERT_EQ(revoked.status, 200) << revoked.body;
  EXPECT_EQ(revoked.j()["state"], "executed");
  EXPECT_EQ(api("GET", "/v1/users/early").j()["user"]["state"], "revoked");
  auto recover = api("POST", "/v1/users/early/recover", json::object());
  EXPECT_EQ(recover.status, 409) << recover.body;
  EXPECT_EQ(recover.j()["reason"], "no-key-history");
  EXPECT_EQ(api("GET", "/v1/users/early").j()["user"]["state"], "revoked");
  auto again = enable("early");
  ASSERT_EQ(again.status, 201) << again.body;
  EXPECT_THAT(again.j()["message"].get<std::string>(), HasSubstr("re-enabled"));
  EXPECT_EQ(api("GET", "/v1/users/early").j()["token_status"]["status"], "pending");
}

TEST_F(UsersTest, BulkEnableSaysWhatHappenedToEveryUserAndResumesWithoutLosingTokens) {
  ASSERT_EQ(enable("pending1").status, 201);
  ASSERT_EQ(enable("revoked1").status, 201);
  ASSERT_EQ(api("POST", "/v1/users/revoked1/revoke", json::object()).status, 200);
  json batch = {{"job", "job-a"},
                {"users",
                 {{{"id", "new1"}, {"email", "new1@example.com"}, {"display_name", "New One"}},
                  {{"id", "pending1"}, {"email", "p@example.com"}, {"display_name", "P"}},
                  {{"id", "revoked1"}, {"email", "r@example.com"}, {"display_name", "R"}},
                  {{"id", "bad1"}, {"email", "no-at-sign"}, {"display_name", "B"}}}}};
  auto first = api("POST", "/v1/users/bulk", batch);
  ASSERT_EQ(first.status, 200) << first.body;
  ASSERT_EQ(first.j()["results"].size(), 4u) << first.body;
  std::map<std::string, json> by_id;
  const json first_results = first.j()["results"];  // a local: j() returns a temporary
  for (const auto& r : first_results) by_id[r["id"].get<std::string>()] = r;
  EXPECT_EQ(by_id["new1"]["status"], "issued");
  EXPECT_EQ(by_id["pending1"]["status"], "pending");
  EXPECT_THAT(by_id["pending1"]["message"].get<std::string>(), HasSubstr("has not been used"));
  EXPECT_EQ(by_id["revoked1"]["status"], "skipped-revoked");
  EXPECT_THAT(by_id["revoked1"]["message"].get<std::string>(), HasSubstr("--include-revoked"));
  EXPECT_EQ(by_id["bad1"]["status"], "invalid");
  for (const auto& [id, r] : by_id) {
    EXPECT_FALSE(r["message"].get<std::string>().empty()) << id;
    EXPECT_EQ(r["message"].get<std::string>().find("Error"), std::string::npos) << id;
  }
  // The same job again (a run killed before it wrote its results): the same token again,
  // nobody enabled twice.
  auto second = api("POST", "/v1/users/bulk", batch);
  ASSERT_EQ(second.status, 200) << second.body;
  EXPECT_EQ(second.j()["results"][0]["status"], "issued");
  EXPECT_EQ(second.j()["results"][0]["token"], by_id["new1"]["token"]);
  // Another job does not get that token: the user is pending.
  batch["job"] = "job-b";
  auto other = api("POST", "/v1/users/bulk", batch);
  EXPECT_EQ(other.j()["results"][0]["status"], "pending");
  EXPECT_FALSE(other.j()["results"][0].contains("token"));
  // Revoked users come back only when asked.
  batch["include_revoked"] = true;
  auto with_revoked = api("POST", "/v1/users/bulk", batch);
  EXPECT_EQ(with_revoked.j()["results"][2]["status"], "issued");
}

TEST_F(UsersTest, TheUsageReportListsEveryUserInEachFormat) {
  ASSERT_EQ(enable("alice").status, 201);
  ASSERT_EQ(enable("bob", "Bob, Jr.").status, 201);
  auto csv = api("GET", "/v1/reports/users?format=csv");
  ASSERT_EQ(csv.status, 200);
  EXPECT_THAT(csv.body, HasSubstr("id,email,display_name,state,signing_serial"));
  EXPECT_THAT(csv.body, HasSubstr("alice,alice@example.com,Jane Doe,enabled,"));
  EXPECT_THAT(csv.body, HasSubstr("bob,bob@example.com,\"Bob, Jr.\",enabled,"));
  auto js = api("GET", "/v1/reports/users?format=json");
  ASSERT_EQ(js.status, 200);
  ASSERT_TRUE(js.j().is_array()) << js.body;
  EXPECT_EQ(js.j().size(), 2u);
  EXPECT_EQ(js.j()[1]["token_status"], "pending");
  EXPECT_EQ(api("GET", "/v1/reports/users?format=ldif").status, 200);
  EXPECT_EQ(api("GET", "/v1/reports/users?format=xml").status, 400);
}

TEST_F(UsersTest, TheAuditChainVerifiesAndNamesARecordEditedInTheDatabase) {
  ASSERT_EQ(enable("alice").status, 201);
  ASSERT_EQ(enable("bob").status, 201);
  ASSERT_EQ(api("POST", "/v1/users/bob/revoke", json::object()).status, 200);
  auto ok = api("GET", "/v1/audit/verify");
  ASSERT_EQ(ok.status, 200) << ok.body;
  EXPECT_EQ(ok.j()["ok"], true);
  EXPECT_GE(ok.j()["records"].get<int>(), 4);
  auto exported = api("GET", "/v1/audit/export");
  EXPECT_THAT(exported.body, HasSubstr("\"action\":\"user.enable\""));
  auto seq = sh("sqlite3 " + shell_quote(db_path()) +
                " \"SELECT seq FROM audit_log WHERE action = 'user.enable' AND record LIKE "
                "'%bob%'\"");
  ASSERT_EQ(seq.status, 0);
  const int bob = std::atoi(seq.output.c_str());
  ASSERT_GT(bob, 1);
  ASSERT_EQ(sh("sqlite3 " + shell_quote(db_path()) +
               " \"UPDATE audit_log SET record = replace(record, 'bob', 'eve') WHERE seq = " +
               std::to_string(bob) + "\"")
                .status,
            0);
  auto bad = api("GET", "/v1/audit/verify");
  EXPECT_EQ(bad.j()["ok"], false);
  EXPECT_EQ(bad.j()["first_bad"], bob);
  EXPECT_THAT(bad.j()["problem"].get<std::string>(),
              HasSubstr("record " + std::to_string(bob) + " was edited"));
}

TEST_F(UsersTest, EveryEndpointRefusesMissingAndForeignCertificatesAndChangesNothing) {
  ASSERT_EQ(
      sh("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=alice "
         "-keyout " +
         shell_quote(dir() / "m.key") + " -out " + shell_quote(dir() / "m.pem") + " -days 1")
          .status,
      0);
  const std::string foreign =
      "--cert " + shell_quote(dir() / "m.pem") + " --key " + shell_quote(dir() / "m.key");
  const std::vector<std::pair<std::string, std::string>> endpoints = {
      {"GET", "/v1/whoami"},
      {"GET", "/v1/status"},
      {"POST", "/v1/users"},
      {"GET", "/v1/users/x"},
      {"POST", "/v1/users/x/reissue"},
      {"POST", "/v1/users/x/revoke"},
      {"POST", "/v1/users/x/recover"},
      {"POST", "/v1/users/bulk"},
      {"GET", "/v1/reports/users"},
      {"GET", "/v1/requests"},
      {"POST", "/v1/requests/x/approve"},
      {"POST", "/v1/requests/x/deny"},
      {"GET", "/v1/audit/verify"},
      {"GET", "/v1/audit/export"}};
  json body = {
      {"id", "x"}, {"email", "x@example.com"}, {"display_name", "X"}, {"users", json::array()}};
  for (const auto& [method, path] : endpoints) {
    EXPECT_EQ(api(method, path, method == "POST" ? body : json(nullptr), " ").status, 401) << path;
    EXPECT_EQ(api(method, path, method == "POST" ? body : json(nullptr), foreign).status, 401)
        << path;
  }
  EXPECT_EQ(api("GET", "/v1/users/x").status, 404);  // nothing was created
  // Only the unseal is in the audit chain: the refused calls left no trace and no change.
  EXPECT_EQ(api("GET", "/v1/audit/verify").j()["records"], 1);
}

}  // namespace
}  // namespace kmsd::testing

namespace kmsd::testing {
namespace {

class BulkEnableTest : public UsersTest {
 protected:
  std::string admin_opts() const { return kmsctl_admin_options(); }
  // Result lines by id (skipping the job line and the header).
  std::map<std::string, std::vector<std::string>> results(const std::filesystem::path& file) {
    std::map<std::string, std::vector<std::string>> out;
    std::ifstream in(file);
    std::string line;
    int n = 0;
    while (std::getline(in, line)) {
      if (n++ < 2) continue;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      out[line.substr(0, line.find(','))].push_back(line);
    }
    return out;
  }
};

TEST_F(BulkEnableTest, KilledMidFileAndStartedAgainLeavesExactlyOneTokenPerUser) {
  ASSERT_EQ(kmsctl("user enable pending1 --email p@example.com --name P" + admin_opts()).status, 0);
  ASSERT_EQ(kmsctl("user enable revoked1 --email r@example.com --name R" + admin_opts()).status, 0);
  ASSERT_EQ(kmsctl("user revoke revoked1" + admin_opts()).status, 0);
  const int kUsers = 3000;
  {
    std::ofstream csv(dir() / "users.csv");
    csv << "id,email,display_name\n";
    csv << "pending1,p@example.com,P\nrevoked1,r@example.com,R\nbad1,no-at-sign,Bad\n";
    csv << "comma1,c@example.com,\"Doe, Jane\"\n";
    for (int i = 0; i < kUsers; ++i)
      csv << "u" << i << ",u" << i << "@example.com,User " << i << "\n";
  }
  const auto out = dir() / "result.csv";
  const std::string cmd = shell_quote(kmsctl_bin()) + " user bulk-enable --input " +
                          shell_quote(dir() / "users.csv") + " --out " + shell_quote(out) +
                          " --batch 100" + admin_opts();
  // Start, let some batches land, then SIGKILL the client mid-file.
  pid_t pid = ::fork();
  if (pid == 0) {
    ::execl("/bin/sh", "sh", "-c", (cmd + " >/dev/null 2>&1").c_str(), nullptr);
    ::_exit(127);
  }
  for (int i = 0; i < 400 && results(out).size() < 300; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
  sh("pkill -KILL -f " + shell_quote(out.string()));  // the kmsctl under sh, if still alive
  const std::size_t partial = results(out).size();
  EXPECT_LT(partial, static_cast<std::size_t>(kUsers + 4)) << "the run finished before the kill";

  auto again = sh(cmd);
  ASSERT_EQ(again.status, 0) << again.output;
  auto lines = results(out);
  ASSERT_EQ(lines.size(), static_cast<std::size_t>(kUsers + 4));
  std::set<std::string> tokens;
  for (const auto& [id, ls] : lines) {
    ASSERT_EQ(ls.size(), 1u) << id << " appears " << ls.size() << " times";
    if (ls[0].find(",issued,") != std::string::npos) {
      std::smatch m;
      ASSERT_TRUE(std::regex_search(ls[0], m, std::regex("([0-9A-Z]{4}-){5}[0-9A-Z]{4}"))) << ls[0];
      EXPECT_TRUE(tokens.insert(m.str()).second) << "token repeated: " << ls[0];
    }
  }
  EXPECT_EQ(tokens.size(), static_cast<std::size_t>(kUsers + 1));  // u0..u2999 and comma1
  EXPECT_THAT(lines["pending1"][0], HasSubstr(",pending,"));
  EXPECT_THAT(lines["revoked1"][0], HasSubstr(",skipped-revoked,"));
  EXPECT_THAT(lines["bad1"][0], HasSubstr(",invalid,"));
  // Every token the file holds is the one the server holds: each user has exactly one
  // pending token, issued once by this job.
  auto rows = sh("sqlite3 " + shell_quote(db_path()) +
                 " \"SELECT count(*), count(DISTINCT user_id) FROM enrollment_tokens "
                 "WHERE issued_by LIKE 'bulk:%'\"");
  EXPECT_EQ(rows.output, std::to_string(kUsers + 1) + "|" + std::to_string(kUsers + 1) + "\n");
  struct stat st {};
  ASSERT_EQ(::stat(out.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);

  // A third run has nothing left to do and changes nothing.
  auto before =
      sh("sqlite3 " + shell_quote(db_path()) + " 'SELECT * FROM enrollment_tokens' | md5sum");
  auto third = sh(cmd);
  EXPECT_EQ(third.status, 0) << third.output;
  EXPECT_EQ(sh("sqlite3 " + shell_quote(db_path()) + " 'SELECT * FROM enrollment_tokens' | md5sum")
                .output,
            before.output);
  EXPECT_EQ(results(out).size(), static_cast<std::size_t>(kUsers + 4));
  EXPECT_EQ(kmsctl("audit verify" + admin_opts()).status, 0);
}

}  // namespace
}  // namespace kmsd::testing

#include "cli/render.hpp"
#include "common/clock.hpp"

#include <gtest/gtest.h>

namespace kmsd::cli::render {
namespace {

using nlohmann::json;

TEST(Render, PendingOutcomeSaysWhoMustApprove) {
  auto j = json::parse(R"({"state":"pending","request_id":"r-17","approvals":1,"required":3,
                           "message":"revoke of alice waits for approvals"})");
  auto o = outcome(j);
  EXPECT_TRUE(o.ok);
  EXPECT_EQ(o.text,
            "pending: request r-17 needs 2 more approvals (kmsctl request approve r-17)\n"
            "  revoke of alice waits for approvals\n");
  j["approvals"] = 2;
  j.erase("message");
  EXPECT_EQ(outcome(j).text,
            "pending: request r-17 needs 1 more approval (kmsctl request approve r-17)\n");
}

TEST(Render, ExecutedOutcomeShowsItsResult) {
  auto j = json::parse(R"({"state":"executed","message":"alice was revoked",
                           "result":{"user":"alice","revoked_certificates":2,"at":0}})");
  auto o = outcome(j);
  EXPECT_TRUE(o.ok);
  EXPECT_EQ(o.text,
            "executed: alice was revoked\n"
            "  at:              1970-01-01T00:00:00Z\n"
            "  revoked_certificates: 2\n"
            "  user:            alice\n");
  EXPECT_EQ(outcome(json::parse(R"({"state":"executed","result":"done"})")).text,
            "executed\n  result:          done\n");
}

TEST(Render, FailedAndDeniedOutcomes) {
  auto failed = outcome(json::parse(R"({"state":"failed","message":"alice has no key history"})"));
  EXPECT_FALSE(failed.ok);
  EXPECT_EQ(failed.text, "failed: alice has no key history\n");
  auto denied = json::parse(R"({"state":"denied","message":"denied by bob"})");
  EXPECT_FALSE(outcome(denied).ok);
  EXPECT_TRUE(outcome(denied, /*denial_wanted=*/true).ok);
  EXPECT_EQ(outcome(json::parse(R"({"state":"failed"})")).text, "failed: kmsd gave no reason\n");
}

TEST(Render, OddlyTypedFieldsDoNotThrow) {
  auto j = json::parse(R"({"state":"pending","request_id":5,"approvals":"one","required":null})");
  EXPECT_EQ(outcome(j).text,
            "pending: request 5 needs more approvals (kmsctl request approve 5)\n");
  EXPECT_NO_THROW(user(json::parse("[1,2]")));
  EXPECT_NO_THROW(issued(json::parse("null")));
  EXPECT_NO_THROW(requests_table(json::parse(R"({"requests":[1,"x",{"params":[1]}]})")));
}

TEST(Render, UserViewFromSampleJson) {
  auto j = json::parse(R"({
    "user": {"id":"jane","email":"jane@example.org","display_name":"Doe, Jane",
             "dn":"CN=Jane Doe,O=Example","state":"active","created_at":1700000000,
             "last_enrolled_at":1700003600},
    "token_status":"used",
    "key_history_depth":2,
    "certificates":[
      {"serial":"0a1b","usage":"signing","not_after":1731536000,"status":"valid"},
      {"serial":"0c2d","usage":"encryption","not_after":1731536000,"status":"valid"}]})");
  EXPECT_EQ(user(j),
            "id:                jane\n"
            "email:             jane@example.org\n"
            "display name:      Doe, Jane\n"
            "dn:                CN=Jane Doe,O=Example\n"
            "state:             active\n"
            "created:           2023-11-14T22:13:20Z\n"
            "last enrolled:     2023-11-14T23:13:20Z\n"
            "token:             used\n"
            "key history depth: 2\n"
            "certificates:      2\n"
            "  SERIAL  USAGE       NOT AFTER             STATUS\n"
            "  0a1b    signing     2024-11-13T22:13:20Z  valid\n"
            "  0c2d    encryption  2024-11-13T22:13:20Z  valid\n");
  j["certificates"] = json::array();
  j["user"].erase("last_enrolled_at");
  auto text = user(j);
  EXPECT_NE(text.find("last enrolled:     never\n"), std::string::npos) << text;
  EXPECT_NE(text.find("certificates:      none\n"), std::string::npos) << text;
}

TEST(Render, IssuedTokenWithExpiry) {
  auto j = json::parse(R"({"user":{"id":"jane","state":"enabled"},"token":"ABCD-EFGH",
                           "expires_at":1700000000,"message":"jane is enabled"})");
  EXPECT_EQ(issued(j),
            "user:              jane (enabled)\n"
            "token:             ABCD-EFGH\n"
            "expires:           2023-11-14T22:13:20Z\n"
            "jane is enabled\n");
}

TEST(Render, RequestsAsTableAndCsv) {
  auto j = json::parse(R"({"requests":[
    {"id":"r1","operation":"revoke","params":{"id":"jane","reason":1},"requested_by":"ann",
     "required":2,"approvals":1,"state":"pending","created_at":1700000000,
     "expires_at":1700259200}]})");
  EXPECT_EQ(requests_table(j),
            "ID  OPERATION  PARAMS            REQUESTED BY  APPROVALS  STATE    EXPIRES\n"
            "r1  revoke     id=jane reason=1  ann           1/2        pending  "
            "2023-11-17T22:13:20Z\n");
  EXPECT_EQ(requests_csv(j),
            "id,operation,params,requested_by,required,approvals,state,created_at,expires_at,"
            "result\r\n"
            "r1,revoke,\"{\"\"id\"\":\"\"jane\"\",\"\"reason\"\":1}\",ann,2,1,pending,"
            "2023-11-14T22:13:20Z,2023-11-17T22:13:20Z,\r\n");
  EXPECT_EQ(requests_table(json::parse(R"({"requests":[]})")), "no requests\n");
}

TEST(Render, AuditVerifyNamesTheFirstBadRecord) {
  auto ok = audit_verify(json::parse(R"({"ok":true,"records":40})"));
  EXPECT_TRUE(ok.ok);
  EXPECT_EQ(ok.text, "audit chain intact: 40 records verified\n");
  auto bad = audit_verify(
      json::parse(R"({"ok":false,"records":40,"first_bad":17,"problem":"record 17 was edited"})"));
  EXPECT_FALSE(bad.ok);
  EXPECT_EQ(bad.text,
            "audit chain broken at record 17 (40 records checked): record 17 was edited\n");
}

TEST(Render, UrlEncodeAndTimes) {
  EXPECT_EQ(url_encode("cn=Doe, Jane/o=x"), "cn%3DDoe%2C%20Jane%2Fo%3Dx");
  EXPECT_EQ(url_encode("a-b_c.d~e"), "a-b_c.d~e");
  EXPECT_EQ(utc_text(0), "1970-01-01T00:00:00Z");
  EXPECT_EQ(time_text(json::parse(R"({"t":"2024-01-01T00:00:00Z"})"), "t"), "2024-01-01T00:00:00Z");
  EXPECT_EQ(time_text(json::parse("{}"), "t"), "");
}

}  // namespace
}  // namespace kmsd::cli::render

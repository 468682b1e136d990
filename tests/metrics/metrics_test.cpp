// The metrics registry and its exposition, checked with the format validator; and the
// validator itself, on broken expositions (a validator that accepts anything proves nothing).
#include <gtest/gtest.h>

#include "daemon/metrics/metrics.hpp"
#include "tests/metrics/exposition_check.hpp"

namespace kmsd::metrics {
namespace {

using kmsd::testing::parse_exposition;

std::string problems_of(const kmsd::testing::ParsedExposition& p) {
  std::string out;
  for (const auto& s : p.problems) out += s + "\n";
  return out;
}

TEST(RoutePattern, PathsBecomePatternsNeverRawIds) {
  EXPECT_EQ(route_pattern("/v1/users/alice%2Fx/revoke"), "/v1/users/{id}/revoke");
  EXPECT_EQ(route_pattern("/v1/users/alice"), "/v1/users/{id}");
  EXPECT_EQ(route_pattern("/v1/users/bulk"), "/v1/users/bulk");
  EXPECT_EQ(route_pattern("/v1/users?x=1"), "/v1/users");
  EXPECT_EQ(route_pattern("/v1/requests/r-123/approve"), "/v1/requests/{id}/approve");
  EXPECT_EQ(route_pattern("/ocsp/MEQwQjBAMD4wPDAJBgUrDgMCGgUA"), "/ocsp/{request}");
  EXPECT_EQ(route_pattern("/healthz"), "/healthz");
  // A scanner's paths fold into one series.
  EXPECT_EQ(route_pattern("/etc/passwd"), "other");
  EXPECT_EQ(route_pattern("/v1/users/a/b/c/d"), "other");
  EXPECT_EQ(route_pattern("/v1/users//revoke"), "other");
  EXPECT_EQ(route_pattern(""), "other");
}

TEST(RoutePattern, LongAdminCalls) {
  EXPECT_TRUE(is_long_admin_call("POST", "/v1/users/bulk"));
  EXPECT_TRUE(is_long_admin_call("GET", "/v1/reports/users?format=csv"));
  EXPECT_TRUE(is_long_admin_call("GET", "/v1/audit/verify"));
  EXPECT_TRUE(is_long_admin_call("GET", "/v1/audit/export"));
  EXPECT_FALSE(is_long_admin_call("GET", "/v1/users/bulk"));
  EXPECT_FALSE(is_long_admin_call("POST", "/v1/users"));
  EXPECT_FALSE(is_long_admin_call("POST", "/enroll/v1/enroll"));
}

TEST(Registry, EmptyRegistryIsValid) {
  Registry r;
  auto p = parse_exposition(r.render());
  EXPECT_TRUE(p.ok()) << problems_of(p);
  EXPECT_EQ(p.types["kmsd_http_requests_total"], "counter");
  EXPECT_EQ(p.types["kmsd_http_request_duration_seconds"], "histogram");
}

TEST(Registry, RequestsHistogramsAndTokenOpsAreCountedAndValid) {
  Registry r;
  r.observe_request("tls", "POST", "/v1/users", 201, 0.004);
  r.observe_request("tls", "POST", "/v1/users", 201, 0.2);
  r.observe_request("tls", "POST", "/v1/users", 409, 100.0);  // beyond the last bound
  r.observe_request("public", "GET", "/healthz", 200, 0.0001);
  r.observe_refusal("public", "header_timeout");
  r.observe_token("seal", true, std::chrono::microseconds(700));
  r.observe_token("seal", false, std::chrono::milliseconds(3));
  const std::string text = r.render();
  auto p = parse_exposition(text);
  ASSERT_TRUE(p.ok()) << problems_of(p) << text;
  EXPECT_EQ(
      p.series
          [R"(kmsd_http_requests_total{code="201",listener="tls",method="POST",route="/v1/users"})"],
      2);
  EXPECT_EQ(
      p.series
          [R"(kmsd_http_requests_total{code="409",listener="tls",method="POST",route="/v1/users"})"],
      1);
  EXPECT_EQ(
      p.series[R"(kmsd_http_request_duration_seconds_count{listener="tls",route="/v1/users"})"], 3);
  EXPECT_EQ(
      p.series
          [R"(kmsd_http_request_duration_seconds_bucket{le="0.005",listener="tls",route="/v1/users"})"],
      1);
  EXPECT_EQ(
      p.series
          [R"(kmsd_http_request_duration_seconds_bucket{le="0.25",listener="tls",route="/v1/users"})"],
      2);
  EXPECT_EQ(
      p.series
          [R"(kmsd_http_request_duration_seconds_bucket{le="60",listener="tls",route="/v1/users"})"],
      2);
  EXPECT_EQ(
      p.series
          [R"(kmsd_http_request_duration_seconds_bucket{le="+Inf",listener="tls",route="/v1/users"})"],
      3);
  EXPECT_NEAR(
      p.series[R"(kmsd_http_request_duration_seconds_sum{listener="tls",route="/v1/users"})"],
      100.204, 1e-6);
  EXPECT_EQ(p.series[R"(kmsd_http_refusals_total{listener="public",reason="header_timeout"})"], 1);
  EXPECT_EQ(p.series[R"(kmsd_token_operations_total{op="seal",result="ok"})"], 1);
  EXPECT_EQ(p.series[R"(kmsd_token_operations_total{op="seal",result="error"})"], 1);
  EXPECT_EQ(p.series[R"(kmsd_token_operation_duration_seconds_bucket{le="0.001",op="seal"})"], 1);
  EXPECT_EQ(p.series[R"(kmsd_token_operation_duration_seconds_count{op="seal"})"], 2);
}

TEST(Registry, CollectorsAndEscapedLabelValuesStayValid) {
  Registry r;
  r.add_collector([](Exposition& out) {
    out.family("kmsd_test_gauge", "gauge", "A help text with a \\ backslash\nand a newline.");
    out.sample("kmsd_test_gauge", {{"v", "quote \" back \\ nl \n end"}}, 1.5);
    out.sample("kmsd_test_gauge", {{"v", "inf"}}, HUGE_VAL);
  });
  const std::string text = r.render();
  auto p = parse_exposition(text);
  ASSERT_TRUE(p.ok()) << problems_of(p) << text;
  ASSERT_EQ(p.samples.back().name, "kmsd_test_gauge");
  EXPECT_EQ(p.samples[p.samples.size() - 2].labels[0].second, "quote \" back \\ nl \n end");
  EXPECT_TRUE(std::isinf(p.samples.back().value));
}

TEST(Registry, CountersNeverGoDownAcrossScrapes) {
  Registry r;
  r.observe_request("tls", "GET", "/v1/status", 200, 0.01);
  auto a = parse_exposition(r.render());
  r.observe_request("tls", "GET", "/v1/status", 200, 0.02);
  r.observe_request("tls", "GET", "/v1/whoami", 200, 0.02);
  auto b = parse_exposition(r.render());
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_TRUE(kmsd::testing::monotonic_problems(a, b).empty());
  // And the check does catch a counter going down.
  EXPECT_FALSE(kmsd::testing::monotonic_problems(b, a).empty());
}

// The validator refuses what a Prometheus parser refuses.
TEST(ExpositionCheck, RefusesBrokenExpositions) {
  auto bad = [](const std::string& text) { return !parse_exposition(text).ok(); };
  EXPECT_FALSE(bad("# HELP a_total x\n# TYPE a_total counter\na_total 1\n"));
  EXPECT_TRUE(bad("a_total 1\n"));
  EXPECT_TRUE(bad("# HELP a x \\t\n# TYPE a gauge\na 1\n"));     // bad HELP escape // no TYPE
  EXPECT_TRUE(bad("# TYPE 1a counter\n1a 1\n"));                 // bad name
  EXPECT_TRUE(bad("# TYPE a counter\na{1x=\"v\"} 1\n"));         // bad label name
  EXPECT_TRUE(bad("# TYPE a counter\na{x=\"v\",x=\"w\"} 1\n"));  // repeated label
  EXPECT_TRUE(bad("# TYPE a counter\na{x=\"\\t\"} 1\n"));        // bad escape
  EXPECT_TRUE(bad("# TYPE a counter\na{x=\"v} 1\n"));            // unterminated
  EXPECT_TRUE(bad("# TYPE a counter\na one\n"));                 // bad value
  EXPECT_TRUE(bad("# TYPE a counter\na 1\na 2\n"));              // series twice
  EXPECT_TRUE(bad("# TYPE a foo\na 1\n"));                       // unknown type
  EXPECT_TRUE(bad("# TYPE a gauge\n# TYPE b gauge\na 1\nb 1\na{x=\"y\"} 1\n"));  // interleaved
  EXPECT_TRUE(bad("# TYPE a gauge\na 1"));                                       // no final newline
  const std::string h = "# TYPE h histogram\n";
  EXPECT_FALSE(bad(h + "h_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3\nh_count 2\n"));
  EXPECT_TRUE(bad(h + "h_bucket{le=\"1\"} 1\nh_sum 3\nh_count 1\n"));  // no +Inf
  EXPECT_TRUE(bad(h + "h_bucket{le=\"1\"} 3\nh_bucket{le=\"+Inf\"} 2\nh_sum 3\nh_count 2\n"));
  EXPECT_TRUE(bad(h + "h_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3\nh_count 5\n"));
  EXPECT_TRUE(bad(h + "h_bucket{le=\"2\"} 1\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 1\n"
                      "h_sum 1\nh_count 1\n"));                  // le order
  EXPECT_TRUE(bad(h + "h_bucket{le=\"+Inf\"} 2\nh_count 2\n"));  // no _sum
}

}  // namespace
}  // namespace kmsd::metrics

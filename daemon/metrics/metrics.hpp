// kmsd's metrics in the Prometheus text exposition format (version 0.0.4): counters and
// histograms fed by the listeners and the token, gauges read at scrape time.
//
// What never appears in a label: user ids, enrollment tokens, certificate subjects or serials,
// administrator names, raw request paths. Routes are patterns ("/v1/users/{id}/revoke"), so
// the number of series is fixed by the code, not by the traffic. docs/operations.md lists
// every metric.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace kmsd::metrics {

// The route pattern of a request path on a listener, for labels: "/v1/users/{id}",
// "/ocsp/{request}", ... and "other" for anything kmsd does not serve (a scanner's paths must
// not create series).
std::string route_pattern(std::string_view path);

// POST /v1/users/bulk, GET /v1/reports/..., GET /v1/audit/verify and /v1/audit/export: the
// administrator calls that may take long on a large store; they get their own deadline.
bool is_long_admin_call(std::string_view method, std::string_view path);

// Writes the exposition text. Families are written whole: HELP, TYPE, then samples.
class Exposition {
 public:
  using Labels = std::vector<std::pair<std::string, std::string>>;
  void family(std::string_view name, std::string_view type, std::string_view help);
  void sample(std::string_view name, const Labels& labels, double value);
  std::string take() { return std::move(out_); }

  // Label values escaped as the format wants (\\, \", \n).
  static std::string escape(std::string_view v);
  static std::string number(double v);

 private:
  std::string out_;
};

// Fixed-bucket histogram (seconds). Thread-safe.
class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void observe(double v);
  // BASE: the labels of the series; writes NAME_bucket (cumulative, le=..., +Inf),
  // NAME_sum and NAME_count.
  void write(Exposition& out, std::string_view name, const Exposition::Labels& base) const;

 private:
  std::vector<double> bounds_;
  mutable std::mutex mu_;
  std::vector<std::uint64_t> counts_;  // per bucket, not cumulative; last is +Inf
  double sum_ = 0;
  std::uint64_t count_ = 0;
};

// Everything kmsd counts. Thread-safe; the observe_* calls are cheap (one short lock).
class Registry {
 public:
  Registry();

  // An answer sent by a listener. ROUTE is a pattern (route_pattern); "unparsed" when the
  // request could not be read (413/431).
  void observe_request(std::string_view listener, std::string_view method, std::string_view route,
                       unsigned status, double seconds);
  // A refusal by a listener (http_server's Refusal names).
  void observe_refusal(std::string_view listener, std::string_view reason);
  // A token operation (hsm::Token's observer).
  void observe_token(std::string_view op, bool ok, std::chrono::nanoseconds elapsed);

  // Gauges and store counts read at scrape time.
  using Collector = std::function<void(Exposition&)>;
  void add_collector(Collector c);

  // The whole exposition.
  std::string render() const;

 private:
  struct RequestKey {
    std::string listener, method, route;
    unsigned status;
    auto operator<=>(const RequestKey&) const = default;
  };
  mutable std::mutex mu_;
  std::map<RequestKey, std::uint64_t> requests_;
  std::map<std::pair<std::string, std::string>, std::unique_ptr<Histogram>> latency_;
  std::map<std::pair<std::string, std::string>, std::uint64_t> refusals_;
  std::map<std::pair<std::string, bool>, std::uint64_t> token_ops_;
  std::map<std::string, std::unique_ptr<Histogram>> token_latency_;
  std::vector<Collector> collectors_;
};

// Counts read from the store's SQLite file on a read-only connection of its own (the store
// is in WAL mode: readers never block the daemon's writer). Cached for CACHE so that a busy
// scraper costs at most one query per CACHE.
class StoreCounts {
 public:
  StoreCounts(std::filesystem::path db, std::chrono::seconds cache = std::chrono::seconds(5));
  ~StoreCounts();
  struct Counts {
    std::map<std::string, std::uint64_t> certificates;  // by kind: ca admin server signing ...
    std::map<std::string, std::uint64_t> revoked;       // by kind
    std::map<std::string, std::uint64_t> users;         // by state
    std::uint64_t approvals_pending = 0;
    std::uint64_t audit_records = 0;
  };
  // nullopt (and ERROR set) when the store cannot be read.
  std::optional<Counts> read(std::string* error);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kmsd::metrics

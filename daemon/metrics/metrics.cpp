#include "daemon/metrics/metrics.hpp"

#include <sqlite3.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>

namespace kmsd::metrics {

namespace {

std::vector<std::string_view> split_path(std::string_view path) {
  std::vector<std::string_view> out;
  if (path.empty() || path.front() != '/') return out;
  path.remove_prefix(1);
  while (true) {
    auto slash = path.find('/');
    out.push_back(path.substr(0, slash));
    if (slash == std::string_view::npos) break;
    path.remove_prefix(slash + 1);
  }
  return out;
}

// Every path kmsd serves; "{x}" matches any one segment. Exact ones come first.
const std::vector<std::string_view>& patterns() {
  static const std::vector<std::string_view> kPatterns{
      "/healthz",
      "/readyz",
      "/metrics",
      "/ca.pem",
      "/ca.der",
      "/ca.crt",
      "/crl",
      "/ocsp",
      "/ocsp/{request}",
      "/cmp",
      "/enroll/v1/enroll",
      "/enroll/v1/renew",
      "/enroll/v1/keys",
      "/v1/whoami",
      "/v1/status",
      "/v1/users",
      "/v1/users/bulk",
      "/v1/users/{id}",
      "/v1/users/{id}/reissue",
      "/v1/users/{id}/revoke",
      "/v1/users/{id}/recover",
      "/v1/users/{id}/export",
      "/v1/admins",
      "/v1/admins/{name}",
      "/v1/reports/users",
      "/v1/requests",
      "/v1/requests/{id}/approve",
      "/v1/requests/{id}/deny",
      "/v1/requests/{id}/collect",
      "/v1/audit/verify",
      "/v1/audit/export",
      "/v1/backup",
      "/v1/master-key",
      "/v1/master-key/{action}",
  };
  return kPatterns;
}

bool matches(std::string_view pattern, const std::vector<std::string_view>& segs) {
  auto ps = split_path(pattern);
  if (ps.size() != segs.size()) return false;
  for (std::size_t i = 0; i < ps.size(); ++i) {
    const bool any = !ps[i].empty() && ps[i].front() == '{';
    if (any ? segs[i].empty() : ps[i] != segs[i]) return false;
  }
  return true;
}

const std::vector<double>& http_bounds() {
  static const std::vector<double> b{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                     0.5,   1,      2.5,   5,    10,    30,   60};
  return b;
}
const std::vector<double>& token_bounds() {
  static const std::vector<double> b{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                                     0.025,  0.05,    0.1,    0.25,  0.5,    1,     5};
  return b;
}

}  // namespace

std::string route_pattern(std::string_view path) {
  path = path.substr(0, path.find('?'));
  const auto segs = split_path(path);
  for (auto p : patterns())
    if (matches(p, segs)) return std::string(p);
  return "other";
}

bool is_long_admin_call(std::string_view method, std::string_view path) {
  path = path.substr(0, path.find('?'));
  if (method == "POST") return path == "/v1/users/bulk";
  if (method == "GET")
    return path == "/v1/reports/users" || path == "/v1/audit/verify" || path == "/v1/audit/export";
  return false;
}

// ---- exposition ----

std::string Exposition::escape(std::string_view v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

std::string Exposition::number(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (v == std::floor(v) && std::fabs(v) < 1e15) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.0f", v);
    return buf;
  }
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

void Exposition::family(std::string_view name, std::string_view type, std::string_view help) {
  out_ += "# HELP ";
  out_ += name;
  out_ += ' ';
  for (char c : help) {  // HELP escapes only backslash and newline
    if (c == '\\') {
      out_ += "\\\\";
    } else if (c == '\n') {
      out_ += "\\n";
    } else {
      out_ += c;
    }
  }
  out_ += "\n# TYPE ";
  out_ += name;
  out_ += ' ';
  out_ += type;
  out_ += '\n';
}

void Exposition::sample(std::string_view name, const Labels& labels, double value) {
  out_ += name;
  if (!labels.empty()) {
    out_ += '{';
    for (std::size_t i = 0; i < labels.size(); ++i) {
      if (i > 0) out_ += ',';
      out_ += labels[i].first;
      out_ += "=\"";
      out_ += escape(labels[i].second);
      out_ += '"';
    }
    out_ += '}';
  }
  out_ += ' ';
  out_ += number(value);
  out_ += '\n';
}

// ---- histogram ----

Histogram::Histogram(std::vector<double> bounds)
    : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::observe(double v) {
  const auto it = std::lower_bound(bounds_.begin(), bounds_.end(), v);  // le: v <= bound
  std::lock_guard lock(mu_);
  ++counts_[static_cast<std::size_t>(it - bounds_.begin())];
  sum_ += v;
  ++count_;
}

void Histogram::write(Exposition& out, std::string_view name,
                      const Exposition::Labels& base) const {
  std::vector<std::uint64_t> counts;
  double sum = 0;
  std::uint64_t count = 0;
  {
    std::lock_guard lock(mu_);
    counts = counts_;
    sum = sum_;
    count = count_;
  }
  const std::string bucket = std::string(name) + "_bucket";
  std::uint64_t cumulative = 0;
  for (std::size_t i = 0; i <= bounds_.size(); ++i) {
    cumulative += counts[i];
    Exposition::Labels l = base;
    l.emplace_back("le", i < bounds_.size() ? Exposition::number(bounds_[i]) : "+Inf");
    out.sample(bucket, l, static_cast<double>(cumulative));
  }
  out.sample(std::string(name) + "_sum", base, sum);
  out.sample(std::string(name) + "_count", base, static_cast<double>(count));
}

// ---- registry ----

Registry::Registry() = default;

void Registry::observe_request(std::string_view listener, std::string_view method,
                               std::string_view route, unsigned status, double seconds) {
  Histogram* h = nullptr;
  {
    std::lock_guard lock(mu_);
    ++requests_[RequestKey{std::string(listener), std::string(method), std::string(route), status}];
    auto& slot = latency_[{std::string(listener), std::string(route)}];
    if (!slot) slot = std::make_unique<Histogram>(http_bounds());
    h = slot.get();  // histograms are never removed: the pointer stays valid
  }
  h->observe(seconds);
}

void Registry::observe_refusal(std::string_view listener, std::string_view reason) {
  std::lock_guard lock(mu_);
  ++refusals_[{std::string(listener), std::string(reason)}];
}

void Registry::observe_token(std::string_view op, bool ok, std::chrono::nanoseconds elapsed) {
  Histogram* h = nullptr;
  {
    std::lock_guard lock(mu_);
    ++token_ops_[{std::string(op), ok}];
    auto& slot = token_latency_[std::string(op)];
    if (!slot) slot = std::make_unique<Histogram>(token_bounds());
    h = slot.get();
  }
  h->observe(std::chrono::duration<double>(elapsed).count());
}

void Registry::add_collector(Collector c) {
  std::lock_guard lock(mu_);
  collectors_.push_back(std::move(c));
}

std::string Registry::render() const {
  Exposition out;
  std::vector<Collector> collectors;
  {
    std::lock_guard lock(mu_);
    out.family("kmsd_http_requests_total", "counter",
               "HTTP requests answered, by listener, method, route pattern and status code.");
    for (const auto& [k, n] : requests_)
      out.sample("kmsd_http_requests_total",
                 {{"listener", k.listener},
                  {"method", k.method},
                  {"route", k.route},
                  {"code", std::to_string(k.status)}},
                 static_cast<double>(n));
    out.family("kmsd_http_request_duration_seconds", "histogram",
               "Seconds from a request being read to its answer being ready, by listener and "
               "route pattern.");
    for (const auto& [k, h] : latency_)
      h->write(out, "kmsd_http_request_duration_seconds",
               {{"listener", k.first}, {"route", k.second}});
    out.family("kmsd_http_refusals_total", "counter",
               "Requests and connections refused before a handler ran: header_too_large (431), "
               "body_too_large (413), header_timeout and body_timeout (slow client "
               "disconnected), idle_timeout (no next request on a kept-alive connection), "
               "connection_limit, rate_limited (429), deadline_queued (503), "
               "deadline_running (504).");
    for (const auto& [k, n] : refusals_)
      out.sample("kmsd_http_refusals_total", {{"listener", k.first}, {"reason", k.second}},
                 static_cast<double>(n));
    out.family("kmsd_token_operations_total", "counter",
               "Operations on the key token by kind (seal, open, hmac, random, ca_key) and "
               "result (ok, error).");
    for (const auto& [k, n] : token_ops_)
      out.sample("kmsd_token_operations_total",
                 {{"op", k.first}, {"result", k.second ? "ok" : "error"}}, static_cast<double>(n));
    out.family("kmsd_token_operation_duration_seconds", "histogram",
               "Wall time of key token operations, waiting for a session and any recovery "
               "included.");
    for (const auto& [op, h] : token_latency_)
      h->write(out, "kmsd_token_operation_duration_seconds", {{"op", op}});
    collectors = collectors_;
  }
  for (const auto& c : collectors) c(out);
  return out.take();
}

// ---- store counts ----

namespace {
struct DbCloser {
  void operator()(sqlite3* db) const noexcept { sqlite3_close_v2(db); }
};
struct StmtFinalizer {
  void operator()(sqlite3_stmt* s) const noexcept { sqlite3_finalize(s); }
};
using Db = std::unique_ptr<sqlite3, DbCloser>;
using Stmt = std::unique_ptr<sqlite3_stmt, StmtFinalizer>;
}  // namespace

struct StoreCounts::Impl {
  std::filesystem::path path;
  std::chrono::seconds cache;
  std::mutex mu;
  Db db;
  std::optional<Counts> last;
  std::chrono::steady_clock::time_point at;

  bool open(std::string* error) {
    if (db) return true;
    sqlite3* raw = nullptr;
    int rc =
        sqlite3_open_v2(path.c_str(), &raw, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX, nullptr);
    Db owned(raw);
    if (rc != SQLITE_OK) {
      *error = "cannot open the store " + path.string() +
               " read-only: " + (raw != nullptr ? sqlite3_errmsg(raw) : sqlite3_errstr(rc));
      return false;
    }
    sqlite3_busy_timeout(raw, 1000);
    db = std::move(owned);
    return true;
  }

  // Runs SQL; FN gets each row.
  bool query(const char* sql, const std::function<void(sqlite3_stmt*)>& fn, std::string* error) {
    sqlite3_stmt* raw = nullptr;
    if (sqlite3_prepare_v2(db.get(), sql, -1, &raw, nullptr) != SQLITE_OK) {
      *error = std::string("store query failed: ") + sqlite3_errmsg(db.get());
      return false;
    }
    Stmt st(raw);
    int rc;
    while ((rc = sqlite3_step(raw)) == SQLITE_ROW) fn(raw);
    if (rc != SQLITE_DONE) {
      *error = std::string("store query failed: ") + sqlite3_errmsg(db.get());
      return false;
    }
    return true;
  }
};

StoreCounts::StoreCounts(std::filesystem::path db, std::chrono::seconds cache)
    : impl_(std::make_unique<Impl>()) {
  impl_->path = std::move(db);
  impl_->cache = cache;
}
StoreCounts::~StoreCounts() = default;

std::optional<StoreCounts::Counts> StoreCounts::read(std::string* error) {
  Impl& d = *impl_;
  std::lock_guard lock(d.mu);
  const auto now = std::chrono::steady_clock::now();
  if (d.last && now - d.at < d.cache) return d.last;
  if (!d.open(error)) return std::nullopt;
  Counts c;
  auto text = [](sqlite3_stmt* s, int i) {
    const auto* p = sqlite3_column_text(s, i);
    return p != nullptr ? std::string(reinterpret_cast<const char*>(p)) : std::string();
  };
  auto u64 = [](sqlite3_stmt* s, int i) {
    return static_cast<std::uint64_t>(std::max<sqlite3_int64>(0, sqlite3_column_int64(s, i)));
  };
  bool ok = d.query(
      "SELECT kind, COUNT(*), COUNT(revoked_at) FROM certificates GROUP BY kind",
      [&](sqlite3_stmt* s) {
        c.certificates[text(s, 0)] = u64(s, 1);
        c.revoked[text(s, 0)] = u64(s, 2);
      },
      error);
  ok = ok && d.query(
                 "SELECT state, COUNT(*) FROM users GROUP BY state",
                 [&](sqlite3_stmt* s) { c.users[text(s, 0)] = u64(s, 1); }, error);
  ok = ok && d.query(
                 "SELECT COUNT(*) FROM approval_requests WHERE state = 'pending'",
                 [&](sqlite3_stmt* s) { c.approvals_pending = u64(s, 0); }, error);
  ok = ok && d.query(
                 "SELECT COALESCE(MAX(seq), 0) FROM audit_log",
                 [&](sqlite3_stmt* s) { c.audit_records = u64(s, 0); }, error);
  if (!ok) {
    d.db.reset();  // reopen next time (the file may have been replaced)
    return std::nullopt;
  }
  d.last = c;
  d.at = now;
  return c;
}

}  // namespace kmsd::metrics

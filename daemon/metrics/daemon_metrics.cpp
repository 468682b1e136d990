#include "daemon/metrics/daemon_metrics.hpp"

#include <openssl/x509.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "common/secret.hpp"
#include "daemon/api/routes.hpp"
#include "daemon/metrics/service.hpp"
#include "hsm/token.hpp"

namespace kmsd::metrics {

namespace {

void process_metrics(Exposition& out) {
  long pages = 0, resident = 0;
  std::ifstream statm("/proc/self/statm");
  if (statm >> pages >> resident) {
    out.family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.");
    out.sample("process_resident_memory_bytes", {},
               static_cast<double>(resident) * static_cast<double>(sysconf(_SC_PAGESIZE)));
  }
  std::error_code ec;
  std::size_t fds = 0;
  for (auto it = std::filesystem::directory_iterator("/proc/self/fd", ec);
       !ec && it != std::filesystem::directory_iterator(); it.increment(ec))
    ++fds;
  if (!ec) {
    out.family("process_open_fds", "gauge", "Number of open file descriptors.");
    out.sample("process_open_fds", {}, static_cast<double>(fds));
  }
}

void crl_metrics(Exposition& out, const std::vector<std::uint8_t>& der) {
  const unsigned char* p = der.data();
  std::unique_ptr<X509_CRL, decltype(&X509_CRL_free)> crl(
      d2i_X509_CRL(nullptr, &p, static_cast<long>(der.size())), &X509_CRL_free);
  if (!crl) return;
  auto seconds_from_now = [](const ASN1_TIME* t, double* out_s) {
    int days = 0, secs = 0;
    if (t == nullptr || ASN1_TIME_diff(&days, &secs, nullptr, t) != 1) return false;
    *out_s = static_cast<double>(days) * 86400.0 + secs;
    return true;
  };
  double s = 0;
  if (seconds_from_now(X509_CRL_get0_lastUpdate(crl.get()), &s)) {
    out.family("kmsd_crl_age_seconds", "gauge",
               "Seconds since the thisUpdate of the CRL kmsd serves.");
    out.sample("kmsd_crl_age_seconds", {}, -s);
  }
  if (seconds_from_now(X509_CRL_get0_nextUpdate(crl.get()), &s)) {
    out.family("kmsd_crl_next_update_seconds", "gauge",
               "Seconds until the nextUpdate of the CRL kmsd serves (negative: expired).");
    out.sample("kmsd_crl_next_update_seconds", {}, s);
  }
}

}  // namespace

void install(Registry& registry, DaemonSources src) {
  if (src.token != nullptr) {
    src.token->set_observer([&registry](const char* op, bool ok, std::chrono::nanoseconds d) {
      registry.observe_token(op, ok, d);
    });
  }
  auto counts = std::make_shared<StoreCounts>(src.store_path);
  registry.add_collector([src, counts](Exposition& out) {
    out.family("kmsd_build_info", "gauge", "Always 1; the version of the running kmsd.");
    out.sample("kmsd_build_info", {{"version", src.version}}, 1);

    if (src.seal != nullptr) {
      const auto st = src.seal->status();
      out.family("kmsd_seal_state", "gauge",
                 "1 for the state kmsd is in (sealed, unsealed, degraded), 0 for the others.");
      for (auto s : {startup::State::kSealed, startup::State::kUnsealed, startup::State::kDegraded})
        out.sample("kmsd_seal_state", {{"state", startup::to_string(s)}}, st.state == s ? 1 : 0);
      out.family("kmsd_unseal_failures_total", "counter",
                 "Unseal attempts that failed since kmsd started.");
      out.sample("kmsd_unseal_failures_total", {}, static_cast<double>(st.failed_unseal_attempts));
      out.family("kmsd_token_logged_in", "gauge", "1 while kmsd is logged in to the key token.");
      out.sample("kmsd_token_logged_in", {}, st.token.logged_in ? 1 : 0);
      out.family("kmsd_token_degraded", "gauge",
                 "1 while the key token is failing and kmsd retries in the background.");
      out.sample("kmsd_token_degraded", {}, st.token.degraded ? 1 : 0);
    }
    if (src.token != nullptr) {
      const auto pool = src.token->pool_usage();
      out.family("kmsd_token_sessions", "gauge",
                 "Key token sessions: open, and in_use (leased to an operation).");
      out.sample("kmsd_token_sessions", {{"state", "open"}}, static_cast<double>(pool.open));
      out.sample("kmsd_token_sessions", {{"state", "in_use"}}, static_cast<double>(pool.in_use));
      out.family("kmsd_token_sessions_max", "gauge", "Size of the token session pool.");
      out.sample("kmsd_token_sessions_max", {}, static_cast<double>(pool.size));
    }
    if (src.connections) {
      out.family("kmsd_http_connections_open", "gauge", "Open connections per listener.");
      for (const auto& [name, n] : src.connections())
        out.sample("kmsd_http_connections_open", {{"listener", name}}, static_cast<double>(n));
    }

    if (src.group_commits) {
      const auto [groups, transactions] = src.group_commits();
      out.family("kmsd_store_group_commits_total", "counter",
                 "COMMITs of grouped store transactions (enrollments and renewals that finished "
                 "together share one).");
      out.sample("kmsd_store_group_commits_total", {}, static_cast<double>(groups));
      out.family("kmsd_store_grouped_transactions_total", "counter",
                 "Grouped store transactions committed or refused; divided by "
                 "kmsd_store_group_commits_total, the mean group size.");
      out.sample("kmsd_store_grouped_transactions_total", {}, static_cast<double>(transactions));
    }

    std::string error;
    auto c = counts->read(&error);
    out.family("kmsd_store_up", "gauge", "1 when the store's counts below could be read.");
    out.sample("kmsd_store_up", {}, c ? 1 : 0);
    if (!c) {
      spdlog::warn("metrics: {}", error);
    } else {
      out.family("kmsd_certificates_issued_total", "counter",
                 "Certificates kmsd has issued, by kind (ca, admin, server, signing, "
                 "encryption); read from the store, so it survives restarts.");
      for (const auto& [kind, n] : c->certificates)
        out.sample("kmsd_certificates_issued_total", {{"kind", kind}}, static_cast<double>(n));
      out.family("kmsd_certificates_revoked_total", "counter",
                 "Certificates revoked, by kind; read from the store.");
      for (const auto& [kind, n] : c->revoked)
        out.sample("kmsd_certificates_revoked_total", {{"kind", kind}}, static_cast<double>(n));
      out.family("kmsd_users", "gauge", "Users by state (enabled, active, revoked, recovery).");
      for (const auto& [state, n] : c->users)
        out.sample("kmsd_users", {{"state", state}}, static_cast<double>(n));
      out.family("kmsd_approvals_pending", "gauge",
                 "Approval requests waiting for approvers (k-of-n).");
      out.sample("kmsd_approvals_pending", {}, static_cast<double>(c->approvals_pending));
      out.family("kmsd_audit_records_total", "counter", "Records in the audit chain.");
      out.sample("kmsd_audit_records_total", {}, static_cast<double>(c->audit_records));
    }
    if (src.crl) {
      auto der = src.crl();
      if (der.ok() && !der->empty()) crl_metrics(out, *der);
    }

    out.family("kmsd_secure_heap_bytes", "gauge",
               "The locked heap for secrets: size, and used now.");
    const SecureHeapState heap = hardening_state();
    out.sample("kmsd_secure_heap_bytes", {{"kind", "size"}},
               heap.ready ? static_cast<double>(heap.bytes) : 0);
    out.sample("kmsd_secure_heap_bytes", {{"kind", "used"}},
               static_cast<double>(secure_heap_used()));
    out.family("kmsd_secure_heap_locked", "gauge",
               "1 when the secure heap is locked in RAM and excluded from core dumps.");
    out.sample("kmsd_secure_heap_locked", {}, heap.locked ? 1 : 0);
    process_metrics(out);
  });
}

void observe_listener(Registry& registry, api::ServerOptions& options,
                      const std::string& listener) {
  auto prev_answer = options.on_answer;
  options.on_answer = [&registry, listener, prev_answer](const api::Request* req, unsigned status,
                                                         double seconds) {
    if (req != nullptr) {
      const std::string_view target(req->target().data(), req->target().size());
      registry.observe_request(listener, std::string(req->method_string()), route_pattern(target),
                               status, seconds);
    } else {
      registry.observe_request(listener, "unknown", "unparsed", status, seconds);
    }
    if (prev_answer) prev_answer(req, status, seconds);
  };
  auto prev_refusal = options.on_refusal;
  options.on_refusal = [&registry, listener, prev_refusal](api::Refusal r) {
    registry.observe_refusal(listener, api::to_string(r));
    if (prev_refusal) prev_refusal(r);
  };
}

bool MetricsEndpoint::owns(const api::Request& req) {
  std::string_view t(req.target().data(), req.target().size());
  return t.substr(0, t.find('?')) == "/metrics";
}

api::Response MetricsEndpoint::handle(const api::Request& req, const api::Peer& peer) const {
  if (req.method() != api::http::verb::get && req.method() != api::http::verb::head) {
    auto res = api::error_response(req, api::http::status::method_not_allowed,
                                   "method not allowed; use GET /metrics");
    res.set(api::http::field::allow, "GET");
    return res;
  }
  if (store_ != nullptr) {
    auto who = api::authenticate(peer, *store_);
    if (auto* fail = std::get_if<api::AuthFailure>(&who)) {
      auto res = api::error_response(req, fail->status,
                                     fail->message +
                                         " (/metrics on the admin listener needs an "
                                         "administrator's certificate; an auditor's "
                                         "is enough)");
      if (fail->status == api::http::status::unauthorized)
        res.set(api::http::field::www_authenticate, "Mutual-TLS");
      return res;
    }
  }
  return api::text_response(req, api::http::status::ok, registry_.render(),
                            "text/plain; version=0.0.4; charset=utf-8");
}

}  // namespace kmsd::metrics

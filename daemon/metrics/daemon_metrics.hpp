// kmsd's metrics wiring: what the daemon exposes on /metrics (see docs/operations.md) and who
// may read it. The admin listener serves /metrics to any administrator's client certificate
// (an auditor's is enough); server.metrics_listen, when set, serves it without
// authentication on its own plain-HTTP listener (meant for 127.0.0.1 and a local scraper).
// Neither exposes a user id, token, subject, serial or administrator name.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "common/result.hpp"
#include "daemon/api/http_server.hpp"
#include "daemon/metrics/metrics.hpp"
#include "daemon/startup/seal.hpp"

namespace kmsd::hsm {
class Token;
}
namespace kmsd::store {
class Store;
}

namespace kmsd::metrics {

struct DaemonSources {
  startup::Seal* seal = nullptr;
  hsm::Token* token = nullptr;
  std::filesystem::path store_path;
  std::function<Result<std::vector<std::uint8_t>>()> crl;  // current CRL, DER
  // Open connections per listener name.
  std::function<std::vector<std::pair<std::string, std::size_t>>()> connections;
  std::string version;
  // The store's group commit (store::Store::group_commit_stats): COMMITs of grouped
  // transactions, and the transactions they held.
  std::function<std::pair<std::uint64_t, std::uint64_t>()> group_commits;
};

// Registers the token observer and the scrape-time gauges on REGISTRY. The sources must
// outlive it.
void install(Registry& registry, DaemonSources sources);

// Feeds OPTIONS' on_answer and on_refusal into REGISTRY under LISTENER (keeps whatever hooks
// were there before).
void observe_listener(Registry& registry, api::ServerOptions& options, const std::string& listener);

// GET /metrics. STORE non-null: the caller must be an administrator (mutual TLS, any role).
class MetricsEndpoint {
 public:
  MetricsEndpoint(const Registry& registry, store::Store* store)
      : registry_(registry), store_(store) {}
  static bool owns(const api::Request& req);
  api::Response handle(const api::Request& req, const api::Peer& peer) const;

 private:
  const Registry& registry_;
  store::Store* store_;
};

}  // namespace kmsd::metrics

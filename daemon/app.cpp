#include "daemon/app.hpp"

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/thread_pool.hpp>

#include <bit>
#include <chrono>
#include <mutex>
#include <thread>

#include "daemon/admins/admin_service.hpp"
#include "daemon/api/http_server.hpp"
#include "daemon/api/pki_routes.hpp"
#include "daemon/api/routes.hpp"
#include "daemon/approvals/approvals.hpp"
#include "daemon/approvals/policy_gate.hpp"
#include "daemon/audit/audit_log.hpp"
#include "daemon/audit/outage_log.hpp"
#include "daemon/backup/backup_routes.hpp"
#include "daemon/cmp/cmp_server.hpp"
#include "daemon/dr/dr_routes.hpp"
#include "daemon/enroll/enrollment.hpp"
#include "daemon/enroll/key_export.hpp"
#include "daemon/metrics/admission.hpp"
#include "daemon/metrics/daemon_metrics.hpp"
#include "daemon/metrics/service.hpp"
#include "daemon/policy/policy_check.hpp"
#include "daemon/provision/initializer.hpp"
#include "daemon/revocation/revocation.hpp"
#include "daemon/rotation/rotation.hpp"
#include "daemon/startup/card_split_gate.hpp"
#include "daemon/startup/card_unseal.hpp"
#include "daemon/startup/seal.hpp"
#include "daemon/startup/secret_source.hpp"
#include "daemon/startup/unseal_socket.hpp"
#include "daemon/store/store.hpp"
#include "daemon/users/user_service.hpp"
#include "hsm/token.hpp"

namespace kmsd {

namespace net = boost::asio;

Status configure_logging(const config::LogConfig& log) {
  std::shared_ptr<spdlog::logger> logger;
  try {
    if (log.file.empty())
      logger = std::make_shared<spdlog::logger>("kmsd",
                                                std::make_shared<spdlog::sinks::stderr_sink_mt>());
    else
      logger = std::make_shared<spdlog::logger>(
          "kmsd", std::make_shared<spdlog::sinks::basic_file_sink_mt>(log.file.string()));
  } catch (const spdlog::spdlog_ex& e) {
    return make_error(ErrorCode::kIo, std::string("cannot open the log: ") + e.what());
  }
  logger->set_pattern("%Y-%m-%dT%H:%M:%S.%e%z %l %v");
  logger->set_level(spdlog::level::from_str(log.level));
  logger->flush_on(spdlog::level::info);
  spdlog::set_default_logger(logger);
  return {};
}

namespace {
approvals::Rules approval_rules(const config::ApprovalsConfig& c) {
  approvals::Rules r;
  r.required = c.required;
  r.ttl = std::chrono::hours(c.ttl_hours);
  return r;
}
}  // namespace

struct Daemon::Impl {
  std::shared_ptr<const config::Config> cfg;
  std::mutex cfg_mu;
  std::unique_ptr<store::Store> store;
  std::unique_ptr<hsm::Token> token;
  std::unique_ptr<startup::Seal> seal;
  std::unique_ptr<startup::CardUnseal> cards;  // startup.source "card" or "quorum"
  std::unique_ptr<policy::PolicyInForce> policy;
  std::unique_ptr<audit::AuditLog> audit;
  std::unique_ptr<approvals::Approvals> approvals;
  std::unique_ptr<users::UserService> users;
  std::unique_ptr<enroll::EnrollmentService> enrollment;
  std::unique_ptr<revocation::Revocation> revocation;
  std::unique_ptr<cmp::CmpServer> cmp;
  std::unique_ptr<approvals::PolicyGate> gate;
  std::unique_ptr<admins::AdminService> admins;
  std::unique_ptr<enroll::KeyExport> key_export;
  std::unique_ptr<dr::PredecryptService> dr_predecrypt;  // /v1/dr/: the daemon key source
  std::unique_ptr<backup::BackupService> backup;         // POST /v1/backup, /v1/backup/check
  std::unique_ptr<audit::OutageLog> outages;             // key-token outages until they are audited
  std::unique_ptr<startup::CardSplitGate> card_split;    // kmsctl card split while unsealed
  std::unique_ptr<rotation::Rotation> rotation;          // master-key rotation (its job thread)

  // The worker pool while run() runs (outage records are written there, not on token threads).
  std::mutex pool_mu;
  net::thread_pool* pool = nullptr;

  // TLS context for the admin listener, rebuilt whenever the key material changes.
  std::mutex tls_mu;
  std::shared_ptr<const startup::KeyMaterial> tls_for;
  std::shared_ptr<net::ssl::context> tls_ctx;

  std::atomic<bool> stopping{false};

  ~Impl() {
    if (token) token->set_health_observer(nullptr);  // it refers to outages, destroyed first
  }

  std::shared_ptr<const config::Config> config() {
    std::lock_guard lk(cfg_mu);
    return cfg;
  }

  // The CA certificate while unsealed; null while sealed.
  ossl::X509Ptr ca_certificate() {
    auto m = seal->material();
    if (!m || !m->ca_cert) return nullptr;
    X509_up_ref(m->ca_cert.get());
    return ossl::X509Ptr(m->ca_cert.get());
  }

  enroll::Settings enroll_settings() {
    auto c = config();
    enroll::Settings s;
    s.validity = std::chrono::days(c->enrollment.cert_validity_days);
    s.encryption_key_type = c->enrollment.encryption_key_type;
    s.renew_encryption_key = c->enrollment.renew_encryption_key;
    s.max_failed_attempts = c->enrollment.max_failed_attempts;
    s.digest = c->ca.digest;
    s.crl_url = config::crl_url_for(*c);
    s.ocsp_url = config::ocsp_url_for(*c);
    return s;
  }

  std::shared_ptr<net::ssl::context> admin_tls() {
    auto m = seal->material();
    if (!m) return nullptr;
    std::lock_guard lk(tls_mu);
    if (m != tls_for) {
      auto ctx = api::make_mtls_context(m->tls_cert.get(), m->tls_key.get(), m->ca_cert.get());
      if (!ctx.ok()) {
        spdlog::error("admin listener: {}", ctx.error().message);
        return nullptr;
      }
      tls_ctx = *ctx;
      tls_for = m;
    }
    return tls_ctx;
  }

  // The public PKI endpoints; filled in as the CRL/OCSP responder and CMP server exist.
  api::PkiHandlers pki_handlers() {
    api::PkiHandlers h;
    h.crl = [this] { return revocation->crl_der(); };
    h.ocsp = [this](std::span<const std::uint8_t> der) { return revocation->respond(der); };
    h.cmp = [this](std::span<const std::uint8_t> der) {
      auto r = cmp->handle(der);
      return api::PkiHandlers::CmpReply{r.http_status, std::move(r.body),
                                        std::move(r.content_type)};
    };
    return h;
  }

  // Keeps the CRL current: a new one within seconds of a revocation (the responder compares
  // the store's revocations with the CRL's) and before half its validity has passed.
  void refresh_crl() {
    if (!seal->material()) return;
    if (auto st = revocation->refresh_if_due(); !st.ok())
      spdlog::warn("CRL: {}; the previous CRL is still served", st.error().message);
  }

  // Judges approval rules offered by the configuration (at start, on SIGHUP) once the token
  // can write the audit record: applied, unchanged, or a policy_change request.
  void settle_approval_rules() {
    if (!seal->material()) return;
    auto out = gate->settle();
    if (!out.ok()) {
      spdlog::warn("approval rules: {}; will try again", out.error().message);
      return;
    }
    if (out->kind != approvals::GateOutcome::Kind::kNothingOffered &&
        out->kind != approvals::GateOutcome::Kind::kUnchanged)
      spdlog::info("approval rules: {}", out->message);
  }

  // Keeps pending token outages in the store and writes the ended ones to the audit chain
  // (that needs the token logged in; until then they stay pending).
  void flush_outages() {
    if (outages->pending() == 0) return;
    auto r = outages->flush();
    if (r.ok()) return;
    if (token->logged_in() && !token->status().degraded)
      spdlog::warn("{}; will try again", r.error().message);
  }
  void flush_outages_soon() {
    std::lock_guard lk(pool_mu);
    if (pool) net::post(*pool, [this] { flush_outages(); });
  }

  // Every two seconds on a worker.
  void maintain() {
    flush_outages();
    refresh_crl();
    settle_approval_rules();
  }

  void reload() {
    auto current = config();
    auto loaded = config::load(current->source_path);
    if (!loaded.ok()) {
      spdlog::error("SIGHUP: {} has {} problem(s); keeping the configuration in force",
                    current->source_path.string(), loaded.problems.size());
      for (const auto& p : loaded.problems)
        spdlog::error("  {}", p.to_string(current->source_path));
      return;
    }
    const auto& n = loaded.config;
    std::vector<std::string> restart;
    if (n.server.public_listen.to_string() != current->server.public_listen.to_string() ||
        n.server.admin_listen.to_string() != current->server.admin_listen.to_string())
      restart.push_back("server listeners");
    if (n.token.module != current->token.module || n.token.uri != current->token.uri)
      restart.push_back("token");
    if (n.store.path != current->store.path) restart.push_back("store.path");
    if (n.server.unseal_socket != current->server.unseal_socket) restart.push_back("unseal_socket");
    if (n.startup.source != current->startup.source ||
        n.startup.card_module != current->startup.card_module ||
        n.startup.card_uri != current->startup.card_uri ||
        n.startup.card_label != current->startup.card_label ||
        n.startup.quorum_timeout_minutes != current->startup.quorum_timeout_minutes)
      restart.push_back("[startup]");
    auto next_policy = policy::PolicyCheck::create(n.policy);
    if (!next_policy.ok()) {
      spdlog::error("SIGHUP: {}; keeping the configuration in force", next_policy.error().message);
      return;
    }
    spdlog::set_level(spdlog::level::from_str(n.log.level));
    policy->replace(std::make_shared<const policy::PolicyCheck>(std::move(*next_policy)));
    gate->offer(approval_rules(n.approvals));  // applied (or gated) by the next maintain()
    {
      std::lock_guard lk(cfg_mu);
      cfg = std::make_shared<const config::Config>(loaded.config);
    }
    spdlog::info("SIGHUP: configuration reloaded from {}", current->source_path.string());
    for (const auto& r : restart)
      spdlog::warn("SIGHUP: the change to {} takes effect only after a restart", r);
  }
};

Daemon::Daemon(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Daemon::~Daemon() = default;

Result<std::unique_ptr<Daemon>> Daemon::create(config::Config cfg) {
  auto impl = std::make_unique<Impl>();
  KMSD_ASSIGN_OR_RETURN(impl->store, store::Store::open(cfg.store.path));
  if (auto ca = provision::load_ca_certificate(*impl->store); !ca.ok())
    return ca.error().context("store " + cfg.store.path.string());
  hsm::TokenOptions topts;
  topts.module_path = cfg.token.module.string();
  topts.token_uri = cfg.token.uri;
  topts.pool_size = cfg.token.pool_size;
  topts.wrap = cfg.token.wrap;
  topts.labels = cfg.token.labels;
  topts.call_timeout = std::chrono::milliseconds(cfg.token.call_timeout_milliseconds);
  topts.probe_interval = std::chrono::milliseconds(cfg.token.probe_interval_milliseconds);
  KMSD_ASSIGN_OR_RETURN(impl->token, hsm::Token::open(topts));
  if (const auto& w = impl->token->wrap_choice(); !w.note.empty())
    spdlog::warn("token: {}", w.note);
  startup::SealOptions sopts;
  sopts.tls_names = cfg.server.tls_names;
  sopts.digest = cfg.ca.digest;
  impl->seal = std::make_unique<startup::Seal>(*impl->token, *impl->store, sopts);
  if (cfg.startup.source == config::StartupSource::kCard ||
      cfg.startup.source == config::StartupSource::kQuorum) {
    startup::CardUnsealSettings cs;
    cs.quorum = cfg.startup.source == config::StartupSource::kQuorum;
    cs.module = cfg.startup.card_module.string();
    cs.default_uri = cfg.startup.card_uri;
    cs.label = cfg.startup.card_label;
    cs.pending_ttl = std::chrono::minutes(cfg.startup.quorum_timeout_minutes);
    impl->cards = std::make_unique<startup::CardUnseal>(*impl->seal, std::move(cs));
  } else {
    impl->seal->set_status_hook([src = std::string(config::to_string(cfg.startup.source))](
                                    startup::SealStatus& s) { s.source = src; });
  }
  KMSD_ASSIGN_OR_RETURN(auto policy, policy::PolicyCheck::create(cfg.policy));
  impl->policy = std::make_unique<policy::PolicyInForce>(
      std::make_shared<const policy::PolicyCheck>(std::move(policy)));
  impl->audit = std::make_unique<audit::AuditLog>(*impl->store, *impl->token);
  impl->outages = std::make_unique<audit::OutageLog>(*impl->store, *impl->audit);
  KMSD_TRY(impl->outages->load());
  impl->token->set_health_observer([d = impl.get()](const hsm::TokenOutage& o) {
    d->outages->observe(o);
    if (o.ended) d->flush_outages_soon();
  });
  impl->seal->set_audit_hook(
      [d = impl.get()](const std::string& action, const std::string& detail) {
        // An outage that sealed kmsd (its PIN refused) ended with this unseal's login: its record
        // goes first.
        if (action == "seal.unseal") d->flush_outages();
        return d->audit->append("operator", action, {{"detail", detail}});
      });
  impl->approvals = std::make_unique<approvals::Approvals>(*impl->store, *impl->audit);
  impl->card_split = std::make_unique<startup::CardSplitGate>(
      *impl->store, *impl->audit, *impl->approvals, std::chrono::hours(cfg.approvals.ttl_hours));
  impl->gate =
      std::make_unique<approvals::PolicyGate>(*impl->store, *impl->audit, *impl->approvals);
  KMSD_TRY(impl->gate->load(approval_rules(cfg.approvals)));
  Impl* d = impl.get();
  impl->users = std::make_unique<users::UserService>(
      *impl->store, *impl->token, *impl->audit, *impl->policy, [d] {
        auto c = d->config();
        return users::TokenSettings{std::chrono::days(c->enrollment.token_ttl_days),
                                    c->enrollment.max_failed_attempts};
      });
  users::UserService& us = *impl->users;
  impl->approvals->register_operation(
      "revoke", [&us](const nlohmann::json& p, const std::string& by) -> Result<nlohmann::json> {
        return us.revoke(p.value("user", std::string()), p.value("reason", 0), by);
      });
  impl->approvals->register_operation(
      "recover", [&us](const nlohmann::json& p, const std::string& by) -> Result<nlohmann::json> {
        return us.recover(p.value("user", std::string()), by);
      });
  impl->enrollment = std::make_unique<enroll::EnrollmentService>(
      *impl->store, *impl->token, *impl->audit, *impl->policy, [d] { return d->enroll_settings(); },
      [d] { return d->ca_certificate(); });
  impl->revocation = std::make_unique<revocation::Revocation>(
      *impl->store, *impl->token,
      [d] {
        auto c = d->config();
        revocation::Settings s;
        s.digest = c->ca.digest;
        s.crl_next_update = std::chrono::hours(c->ca.crl_next_update_hours);
        s.crl_path = c->ca.crl_path;
        s.ocsp_validity = std::chrono::minutes(c->ca.ocsp_validity_minutes);
        return s;
      },
      [d] { return d->ca_certificate(); });
  impl->admins = std::make_unique<admins::AdminService>(
      *impl->store, *impl->token, *impl->audit, *impl->approvals, *impl->policy, [d] {
        auto c = d->config();
        return admins::AdminSettings{std::chrono::days(c->admin.cert_validity_days), c->ca.digest};
      });
  // An approved export may be collected within the approval requests' lifetime.
  impl->key_export = std::make_unique<enroll::KeyExport>(
      *impl->store, *impl->audit, *impl->approvals, *impl->enrollment,
      std::chrono::hours(cfg.approvals.ttl_hours));
  impl->dr_predecrypt = std::make_unique<dr::PredecryptService>(
      *impl->store, *impl->audit, *impl->approvals, *impl->enrollment,
      std::chrono::hours(cfg.approvals.ttl_hours));
  impl->rotation = std::make_unique<rotation::Rotation>(
      *impl->store, *impl->token, *impl->audit, *impl->approvals,
      [d] { return d->seal->material() != nullptr; });
  impl->backup = std::make_unique<backup::BackupService>(*impl->store, *impl->token, *impl->audit,
                                                         [d] { return d->ca_certificate(); });
  impl->cmp = std::make_unique<cmp::CmpServer>(
      *impl->enrollment, *impl->token, *impl->store, [d] { return d->ca_certificate(); },
      [d] { return d->config()->ca.digest; });
  impl->cfg = std::make_shared<const config::Config>(std::move(cfg));
  return std::unique_ptr<Daemon>(new Daemon(std::move(impl)));
}

int Daemon::run() {
  Impl& d = *impl_;
  auto cfg = d.config();
  // No core dumps, no ptrace by others, secrets in a locked heap (a few hundred KiB per worker
  // covers OpenSSL's secret BIGNUMs during key generation; 4 MiB at least).
  metrics::harden_process(std::bit_ceil(
      std::max<std::size_t>(4u << 20, std::size_t{cfg->server.worker_threads} * (256u << 10))));
  net::io_context ioc(static_cast<int>(cfg->server.io_threads));
  net::thread_pool workers(cfg->server.worker_threads);
  // Long administrator calls (whole reports, bulk enable, audit verify) run on their own few
  // workers: administrators reading reports queue behind each other, not OCSP and enrollment.
  net::thread_pool long_workers(std::max(1u, cfg->server.worker_threads / 2));
  metrics::Registry registry;
  metrics::ServiceNotifier notifier;
  {
    std::lock_guard lk(d.pool_mu);
    d.pool = &workers;
  }

  api::PublicRoutes public_routes(*d.seal);
  api::PkiRoutes pki_routes(d.pki_handlers());
  api::AdminServices admin_services{*d.seal, *d.store, *d.users, *d.approvals, *d.audit};
  admin_services.admins = d.admins.get();
  admin_services.key_export = d.key_export.get();
  admin_services.more_routes = [backup_routes = backup::admin_routes(*d.backup),
                                dr_routes = dr::admin_routes(*d.dr_predecrypt)](
                                   const api::Request& req,
                                   const api::Identity& who) -> std::optional<api::Response> {
    if (auto answer = dr_routes(req, who)) return answer;
    return backup_routes(req, who);
  };
  admin_services.rotation = d.rotation.get();
  api::AdminRoutes admin_routes(admin_services);
  api::EnrollRoutes enroll_routes(*d.enrollment);
  // One handler per listener: the public one serves the PKI paths and the health/CA paths;
  // the TLS one serves users' enrollment under /enroll/ and administrators under /v1/.
  struct PublicListener {
    const api::PkiRoutes& pki;
    const api::PublicRoutes& rest;
    api::Response handle(const api::Request& req, const api::Peer& peer) const {
      if (auto r = pki.handle(req, peer)) return std::move(*r);
      return rest.handle(req, peer);
    }
  };
  metrics::MetricsEndpoint admin_metrics(registry, d.store.get());  // administrators only
  metrics::MetricsEndpoint open_metrics(registry, nullptr);         // server.metrics_listen
  struct TlsListener {
    const api::EnrollRoutes& enroll;
    const api::AdminRoutes& admin;
    const metrics::MetricsEndpoint& metrics;
    api::Response handle(const api::Request& req, const api::Peer& peer) const {
      if (api::EnrollRoutes::owns(req)) return enroll.handle(req, peer);
      if (metrics::MetricsEndpoint::owns(req)) return metrics.handle(req, peer);
      return admin.handle(req, peer);
    }
  };
  struct MetricsListener {
    const metrics::MetricsEndpoint& metrics;
    api::Response handle(const api::Request& req, const api::Peer& peer) const {
      if (metrics::MetricsEndpoint::owns(req)) return metrics.handle(req, peer);
      return api::error_response(req, api::http::status::not_found,
                                 "this listener (server.metrics_listen) serves only /metrics");
    }
  };
  auto logged = [](const char* listener, auto routes) {
    return [listener, routes](const api::Request& req, const api::Peer& peer) {
      auto t0 = std::chrono::steady_clock::now();
      api::Response res = routes.handle(req, peer);
      auto ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0);
      std::string target(req.target());
      target = target.substr(0, target.find('?'));  // query strings are never logged
      spdlog::info("{} {} {} {} {:.1f}ms peer={}", listener, std::string(req.method_string()),
                   target, res.result_int(), ms.count(), peer.address);
      return res;
    };
  };
  api::ServerOptions popts{cfg->server.max_body_bytes, cfg->server.max_header_bytes,
                           std::chrono::seconds(cfg->server.request_timeout_seconds), "public"};
  popts.header_timeout = std::chrono::seconds(cfg->server.header_timeout_seconds);
  popts.body_timeout = std::chrono::seconds(cfg->server.body_timeout_seconds);
  popts.max_connections_per_source = cfg->server.max_connections_per_source;
  popts.is_long = [](const api::Request& req) {
    return metrics::is_long_admin_call(std::string(req.method_string()),
                                       std::string(req.target())) ||
           backup::is_long_call(req);
  };
  popts.long_deadline = std::chrono::seconds(cfg->server.long_request_timeout_seconds);
  popts.long_workers = &long_workers;
  auto admission = std::make_shared<metrics::EnrollmentAdmission>(
      cfg->server.enroll_rate_per_source, cfg->server.enroll_rate_per_identity);
  popts.admit = [admission](const api::Request& req, const api::Peer& peer) {
    return admission->admit(req, peer);
  };
  api::ServerOptions aopts = popts;
  aopts.name = "admin";
  // Administrators' uploads (a backup to check, a message for DR pre-decryption) may be far
  // larger than any other request: only from a verified administrator's certificate, and
  // only on those two routes; the body is held in memory, so the limit stays bounded.
  aopts.max_upload_bytes = std::size_t{512} << 20;
  aopts.is_upload = [](const api::Request& req, const api::Peer& peer) {
    if (!peer.client_cert_verified || req.method() != api::http::verb::post) return false;
    std::string_view path(req.target().data(), req.target().size());
    path = path.substr(0, path.find('?'));
    return path == "/v1/backup/check" ||
           (path.starts_with("/v1/dr/predecrypt/") && path.ends_with("/message"));
  };
  aopts.upload_setting = "the 512 MiB limit of administrators' uploads";
  api::ServerOptions mopts = popts;
  mopts.name = "metrics";
  mopts.admit = nullptr;
  metrics::observe_listener(registry, popts, "public");
  metrics::observe_listener(registry, aopts, "tls");
  metrics::observe_listener(registry, mopts, "metrics");
  auto pub = api::HttpServer::listen(
      ioc, cfg->server.public_listen.host, cfg->server.public_listen.port,
      logged("public", PublicListener{pki_routes, public_routes}), popts, workers);
  if (!pub.ok()) {
    spdlog::critical("{}", pub.error().message);
    return 1;
  }
  auto adm = api::HttpServer::listen(
      ioc, cfg->server.admin_listen.host, cfg->server.admin_listen.port,
      logged("tls", TlsListener{enroll_routes, admin_routes, admin_metrics}), aopts, workers,
      [&d] { return d.admin_tls(); });
  if (!adm.ok()) {
    spdlog::critical("{}", adm.error().message);
    return 1;
  }
  auto sock = startup::UnsealSocket::listen(cfg->server.unseal_socket, *d.seal, d.cards.get(),
                                            d.card_split.get());
  if (!sock.ok()) {
    spdlog::critical("{}", sock.error().message);
    return 1;
  }
  std::shared_ptr<api::HttpServer> met;
  if (cfg->server.metrics_listen) {
    auto m = api::HttpServer::listen(
        ioc, cfg->server.metrics_listen->host, cfg->server.metrics_listen->port,
        logged("metrics", MetricsListener{open_metrics}), mopts, workers);
    if (!m.ok()) {
      spdlog::critical("{}", m.error().message);
      return 1;
    }
    met = *m;
  }
  metrics::DaemonSources msrc;
  msrc.seal = d.seal.get();
  msrc.token = d.token.get();
  msrc.store_path = cfg->store.path;
  msrc.crl = [&d]() -> Result<std::vector<std::uint8_t>> {
    if (!d.seal->material()) return make_error(ErrorCode::kUnavailable, "sealed");
    return d.revocation->crl_der();
  };
  msrc.connections = [&pub, &adm, &met] {
    std::vector<std::pair<std::string, std::size_t>> v{{"public", (*pub)->open_connections()},
                                                       {"tls", (*adm)->open_connections()}};
    if (met) v.emplace_back("metrics", met->open_connections());
    return v;
  };
  msrc.version = KMSD_APP_VERSION;
  msrc.group_commits = [&d] {
    const auto s = d.store->group_commit_stats();
    return std::make_pair(s.groups, s.transactions);
  };
  metrics::install(registry, msrc);
  (*pub)->start();
  (*adm)->start();
  d.rotation->start();  // resumes an unfinished master-key rotation once unsealed
  if (met) {
    met->start();
    spdlog::info("kmsd metrics: http://{}/metrics (no authentication: keep it on loopback)",
                 cfg->server.metrics_listen->to_string());
  }
  spdlog::info("kmsd listening: public http://{} admin https://{} (mutual TLS) unseal socket {}",
               cfg->server.public_listen.to_string(), cfg->server.admin_listen.to_string(),
               cfg->server.unseal_socket.string());
  spdlog::info("kmsd is SEALED: present the startup secret ({} source) to unseal",
               config::to_string(cfg->startup.source));

  net::signal_set signals(ioc, SIGTERM, SIGINT, SIGHUP);
  std::function<void(const boost::system::error_code&, int)> on_signal =
      [&](const boost::system::error_code& ec, int sig) {
        if (ec) return;
        if (sig == SIGHUP) {
          net::post(workers, [&d] { d.reload(); });
          signals.async_wait(on_signal);
          return;
        }
        spdlog::info("received {}, stopping", sig == SIGTERM ? "SIGTERM" : "SIGINT");
        d.stopping = true;
        notifier.stopping();
        (*pub)->stop();
        (*adm)->stop();
        if (met) met->stop();
        ioc.stop();
      };
  signals.async_wait(on_signal);

  // Maintenance every 2 seconds on a worker: the CRL (a count query while nothing changed)
  // and approval rules offered by the configuration.
  net::steady_timer crl_timer(ioc);
  std::atomic<bool> crl_busy{false};
  std::function<void(const boost::system::error_code&)> on_crl_tick =
      [&](const boost::system::error_code& ec) {
        if (ec || d.stopping) return;
        if (!crl_busy.exchange(true))
          net::post(workers, [&d, &crl_busy] {
            d.maintain();
            crl_busy = false;
          });
        crl_timer.expires_after(std::chrono::seconds(2));
        crl_timer.async_wait(on_crl_tick);
      };
  crl_timer.expires_after(std::chrono::milliseconds(200));
  crl_timer.async_wait(on_crl_tick);

  // systemd (Type=notify): READY=1 once unsealed, STATUS= while sealed. Polled on a thread of
  // its own, from the seal alone: never a token call (Seal::status() may make one), which a
  // slow token would hold and which would count in the token's stall watchdog.
  std::thread notify_thread([&] {
    while (!d.stopping) {
      const bool unsealed = d.seal->material() != nullptr;
      const std::string text =
          unsealed ? std::string("unsealed: serving (GET /readyz for the token's health)")
                   : "sealed: waiting for the startup secret (kmsctl unseal --socket " +
                         cfg->server.unseal_socket.string() + ")";
      if (!d.stopping) notifier.update(unsealed, text);
      for (int i = 0; i < 5 && !d.stopping; ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  });
  if (metrics::ServiceNotifier::under_systemd())
    spdlog::info("systemd notify socket present: READY=1 will be sent once kmsd is unsealed");

  std::thread prompt_thread;
  if (cfg->startup.source == config::StartupSource::kFile) {
    net::post(workers, [&d, file = cfg->startup.file] {
      spdlog::warn(
          "startup secret read from file {}: a weak, development-only setting; use a "
          "card or quorum source in production",
          file.string());
      auto secret = startup::read_secret_from_file(file);
      if (!secret.ok()) {
        spdlog::error(
            "cannot unseal from the startup file: {}; kmsd stays sealed "
            "(`kmsctl unseal` still works)",
            secret.error().message);
        return;
      }
      (void)d.seal->unseal(*secret);
    });
  } else if (d.cards && startup::have_terminal() && !cfg->startup.card_uri.empty()) {
    // Operator cards at the terminal: the card PIN is asked for (no echo) and the configured
    // card read; a quorum asks again, card after card, until k shares are in.
    prompt_thread = std::thread([&d, uri = cfg->startup.card_uri] {
      while (!d.stopping && !d.seal->material()) {
        auto held = d.seal->status().quorum;
        std::string prompt = "PIN of the operator card " + uri;
        if (held) prompt += " (" + held->text() + ")";
        auto pin = startup::read_secret_from_terminal(prompt + ": ", &d.stopping);
        if (!pin.ok()) {
          if (!d.stopping) spdlog::warn("terminal prompt: {}", pin.error().message);
          return;
        }
        auto r = d.cards->present(*pin, "");
        if (r.ok()) spdlog::info("{}", r->message);
        if (!r.ok() && r.error().code == ErrorCode::kPinLocked) return;
      }
    });
  } else if (d.cards) {
    spdlog::info("unseal with an operator card: `kmsctl unseal --socket {}{}`",
                 cfg->server.unseal_socket.string(),
                 cfg->startup.card_uri.empty() ? " --card pkcs11:token=CARD" : "");
  } else if (startup::have_terminal()) {
    prompt_thread = std::thread([&d] {
      while (!d.stopping && !d.seal->material()) {
        auto secret = startup::read_secret_from_terminal("kmsd startup secret: ", &d.stopping);
        if (!secret.ok()) {
          if (!d.stopping) spdlog::warn("terminal prompt: {}", secret.error().message);
          return;
        }
        auto st = d.seal->unseal(*secret);
        if (!st.ok() && st.error().code == ErrorCode::kPinLocked) return;
      }
    });
  } else {
    spdlog::info("no terminal attached: unseal with `kmsctl unseal --socket {}`",
                 cfg->server.unseal_socket.string());
  }

  std::vector<std::thread> io;
  for (unsigned i = 1; i < cfg->server.io_threads; ++i) io.emplace_back([&ioc] { ioc.run(); });
  ioc.run();
  for (auto& t : io) t.join();
  d.stopping = true;
  d.rotation->stop();
  notify_thread.join();
  if (prompt_thread.joinable()) prompt_thread.join();
  {
    std::lock_guard lk(d.pool_mu);
    d.pool = nullptr;
  }
  workers.join();
  long_workers.join();
  d.token->set_observer(nullptr);  // the registry dies with this frame
  sock->reset();
  if (d.cards) d.cards->cancel();
  d.seal->seal();
  spdlog::info("kmsd stopped");
  return 0;
}

}  // namespace kmsd

#include "daemon/rotation/rotation.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>

#include "common/clock.hpp"
#include "daemon/enroll/enrollment.hpp"
#include "daemon/lifecycle/enrollment_token.hpp"
#include "daemon/provision/initializer.hpp"

namespace kmsd::rotation {

using json = nlohmann::json;

namespace {

// Pages when counting enrollment tokens (they are not indexed by master version).
constexpr std::size_t kTokenPage = 1000;

// Every enrollment token whose sealed record satisfies PRED, counted page by page.
Result<std::size_t> count_tokens(store::Store& store,
                                 const std::function<bool(std::optional<std::uint32_t>)>& pred) {
  std::size_t n = 0;
  std::string after;
  while (true) {
    KMSD_ASSIGN_OR_RETURN(auto page, store.enrollment_tokens_after(after, kTokenPage));
    for (const auto& t : page)
      if (pred(lifecycle::EnrollmentTokens::master_version_of(t.sealed))) ++n;
    if (page.size() < kTokenPage) return n;
    after = page.back().user_id;
  }
}

Result<std::size_t> keys_not_under(store::Store& store, std::uint32_t version) {
  KMSD_ASSIGN_OR_RETURN(auto counts, store.key_history_master_versions());
  std::size_t n = 0;
  for (const auto& [v, c] : counts)
    if (v != version) n += c;
  return n;
}

Result<std::size_t> keys_under(store::Store& store, std::uint32_t version) {
  KMSD_ASSIGN_OR_RETURN(auto counts, store.key_history_master_versions());
  for (const auto& [v, c] : counts)
    if (v == version) return c;
  return std::size_t{0};
}

// One re-wrap phase of the job ("keys": escrowed keys, "tokens": enrollment tokens), over
// records of type Row.
template <typename Row>
struct RewrapPhase {
  // At most BATCH records after the cursor of the job STATE, in cursor order.
  std::function<Result<std::vector<Row>>(const json& state, std::size_t batch)> read;
  // The record's new sealed blob; nullopt when it is under the target already (left alone);
  // kCrypto when it does not open (skipped and counted); any other error pauses the job.
  std::function<Result<std::optional<store::Bytes>>(const Row&)> rewrap;
  // The record as the log names it.
  std::function<std::string(const Row&)> name;
  // Swaps the new blob in (compare-and-swap on the old one): false when the row changed.
  std::function<Result<bool>(const Row&, const store::Bytes&)> swap;
  // Moves the cursor in the job state past the record.
  std::function<void(const Row&, json&)> past;
  // Moves the job state to the next phase once no record is left after the cursor.
  std::function<void(json&)> next_phase;
};

// One batch of PHASE for the job STATE (updated and stored): the records after the cursor are
// re-wrapped on the token outside the store's lock, then one store transaction swaps each row
// and moves the persisted cursor (a crash loses at most this batch). Returns how many rows it
// changed; with no record left it moves STATE to the next phase.
template <typename Row>
Result<std::size_t> rewrap_batch(store::Store& store, json& state, const RewrapPhase<Row>& phase) {
  KMSD_ASSIGN_OR_RETURN(auto rows, phase.read(state, state.value("batch", kDefaultBatch)));
  if (rows.empty()) {
    phase.next_phase(state);
    KMSD_TRY(store.put_setting(kSettingRotation, state.dump()));
    return std::size_t{0};
  }
  std::vector<std::pair<const Row*, store::Bytes>> moved;
  std::size_t skipped = 0;
  for (const Row& r : rows) {
    auto m = phase.rewrap(r);
    if (!m.ok() && m.error().code != ErrorCode::kCrypto) return m.error();
    if (!m.ok()) {
      ++skipped;  // it did not open before either; counted, left as it is
      spdlog::error("rotation: {} does not open; left as it is", phase.name(r));
      continue;
    }
    if (*m) moved.emplace_back(&r, std::move(**m));
  }
  std::size_t done = 0;
  KMSD_TRY(store.transaction([&]() -> Status {
    for (const auto& [r, blob] : moved) {
      KMSD_ASSIGN_OR_RETURN(bool changed, phase.swap(*r, blob));
      if (changed) ++done;
    }
    phase.past(rows.back(), state);
    state["done"] = state.value("done", std::size_t{0}) + done;
    state["skipped"] = state.value("skipped", std::size_t{0}) + skipped;
    return store.put_setting(kSettingRotation, state.dump());
  }));
  return done;
}

// Escrowed keys (key_history) not under master key TARGET.
RewrapPhase<store::KeyHistoryRecord> escrowed_keys_phase(store::Store& store, hsm::Token& token,
                                                         std::uint32_t target) {
  using Rec = store::KeyHistoryRecord;
  RewrapPhase<Rec> p;
  p.read = [&store, target](const json& state, std::size_t batch) {
    return store.key_history_not_under(target, state.value("after_user", ""),
                                       state.value("after_version", 0), batch);
  };
  p.rewrap = [&token, target](const Rec& r) -> Result<std::optional<store::Bytes>> {
    KMSD_ASSIGN_OR_RETURN(auto blob, enroll::rewrap_escrowed(token, r, target));
    return std::optional<store::Bytes>(std::move(blob));
  };
  p.name = [](const Rec& r) {
    return "key " + std::to_string(r.version) + " of user " + r.user_id + " (master key v" +
           std::to_string(r.master_version) + ")";
  };
  p.swap = [&store, target](const Rec& r, const store::Bytes& blob) {
    return store.rewrap_key_history(r.user_id, r.version, r.sealed_key, target, blob);
  };
  p.past = [](const Rec& r, json& state) {
    state["after_user"] = r.user_id;
    state["after_version"] = r.version;
  };
  p.next_phase = [](json& state) {
    state["phase"] = "tokens";
    state["after_user"] = "";
    state["after_version"] = 0;
  };
  return p;
}

// Enrollment tokens (not indexed by master version: every one is read, those under TARGET
// are left alone).
RewrapPhase<store::EnrollmentTokenRecord> enrollment_tokens_phase(store::Store& store,
                                                                  hsm::Token& token,
                                                                  std::uint32_t target) {
  using Rec = store::EnrollmentTokenRecord;
  RewrapPhase<Rec> p;
  p.read = [&store](const json& state, std::size_t batch) {
    return store.enrollment_tokens_after(state.value("after_user", ""), batch);
  };
  p.rewrap = [&token, target](const Rec& t) -> Result<std::optional<store::Bytes>> {
    auto v = lifecycle::EnrollmentTokens::master_version_of(t.sealed);
    if (v && *v == target) return std::optional<store::Bytes>();
    KMSD_ASSIGN_OR_RETURN(auto sealed,
                          lifecycle::EnrollmentTokens(token).rewrap(t.sealed, t.user_id, target));
    return std::optional<store::Bytes>(std::move(sealed));
  };
  p.name = [](const Rec& t) { return "the enrollment token of user " + t.user_id; };
  // A token re-issued meanwhile is sealed under the new key already: left alone.
  p.swap = [&store](const Rec& t, const store::Bytes& sealed) {
    return store.replace_token_sealed(t.user_id, t.sealed, sealed);
  };
  p.past = [](const Rec& t, json& state) { state["after_user"] = t.user_id; };
  p.next_phase = [](json& state) { state["phase"] = "check"; };
  return p;
}

Error sealed_error() {
  return make_error(ErrorCode::kUnavailable,
                    "kmsd is sealed: unseal it first (master keys live on the token)");
}

}  // namespace

Rotation::Rotation(store::Store& store, hsm::Token& token, audit::AuditLog& audit,
                   approvals::Approvals& approvals, std::function<bool()> serving)
    : store_(store),
      token_(token),
      audit_(audit),
      approvals_(approvals),
      serving_(std::move(serving)) {
  approvals_.register_operation(
      kRotateOperation, [this](const json& p, const std::string& by) { return begin(p, by); });
  approvals_.register_operation(
      kRetireOperation, [this](const json& p, const std::string& by) { return retire(p, by); });
}

Rotation::~Rotation() {
  stop();
}

void Rotation::start() {
  std::lock_guard lk(mu_);
  if (thread_.joinable()) return;
  stop_ = false;
  thread_ = std::thread([this] { run(); });
}

void Rotation::stop() {
  {
    std::lock_guard lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

Result<std::optional<json>> Rotation::load() {
  KMSD_ASSIGN_OR_RETURN(auto text, store_.get_setting(kSettingRotation));
  if (!text) return std::optional<json>();
  json j = json::parse(*text, nullptr, false);
  if (!j.is_object())
    return make_error(ErrorCode::kStore, std::string("the store setting ") + kSettingRotation +
                                             " is not a JSON object; the rotation job cannot "
                                             "resume (restore the store from a backup)");
  return std::optional<json>(std::move(j));
}

// ---- the gated operations ---------------------------------------------------------------

Result<approvals::Outcome> Rotation::request_rotate(const Pace& pace,
                                                    const std::string& requester) {
  if (pace.batch == 0 || pace.batch > kMaxBatch)
    return make_error(ErrorCode::kInvalidArgument,
                      "batch must be between 1 and " + std::to_string(kMaxBatch));
  if (pace.pause.count() < 0 || pace.pause > std::chrono::minutes(1))
    return make_error(ErrorCode::kInvalidArgument, "pause_ms must be between 0 and 60000");
  if (!serving_()) return sealed_error();
  KMSD_ASSIGN_OR_RETURN(auto st, load());
  if (st && st->value("state", "") == "running")
    return make_error(ErrorCode::kFailedPrecondition,
                      "a rotation to master key v" + std::to_string(st->value("target", 0)) +
                          " is still running; see `kmsctl master-key status`");
  return approvals_.submit(
      kRotateOperation,
      json{{"batch", pace.batch}, {"pause_ms", static_cast<std::int64_t>(pace.pause.count())}},
      requester);
}

Result<json> Rotation::begin(const json& params, const std::string& by) {
  if (!serving_()) return sealed_error();
  KMSD_ASSIGN_OR_RETURN(auto st, load());
  if (st && st->value("state", "") == "running")
    return make_error(ErrorCode::kFailedPrecondition, "a rotation to master key v" +
                                                          std::to_string(st->value("target", 0)) +
                                                          " is still running");
  KMSD_ASSIGN_OR_RETURN(auto versions, token_.master_key_versions());
  KMSD_ASSIGN_OR_RETURN(std::uint32_t current, provision::master_key_version(store_));
  const std::uint32_t newest = versions.empty() ? 0 : versions.back();
  const std::uint32_t target = std::max(newest, current) + 1;
  KMSD_TRY(token_.generate_master_key(target));
  KMSD_TRY(store_.put_setting(provision::kSettingMasterVersion, std::to_string(target)));
  KMSD_ASSIGN_OR_RETURN(std::size_t keys, keys_not_under(store_, target));
  KMSD_ASSIGN_OR_RETURN(std::size_t tokens, count_tokens(store_, [target](auto v) {
                          return v.value_or(target) != target;
                        }));
  json state{{"state", "running"},
             {"from", current},
             {"target", target},
             {"phase", "keys"},
             {"after_user", ""},
             {"after_version", 0},
             {"pass", 1},
             {"done", 0},
             {"skipped", 0},
             {"total", keys + tokens},
             {"batch", params.value("batch", kDefaultBatch)},
             {"pause_ms", params.value("pause_ms", 0)},
             {"requested_by", by},
             {"started_at", unix_now()}};
  KMSD_TRY(store_.put_setting(kSettingRotation, state.dump()));
  KMSD_TRY(audit_.append(by, "master_key.rotate.started",
                         {{"from", current},
                          {"target", target},
                          {"escrowed_keys", keys},
                          {"enrollment_tokens", tokens},
                          {"batch", state["batch"]}}));
  {
    std::lock_guard lk(mu_);
    kick_ = true;
    session_started_ = false;
    session_done_ = 0;
    resumed_logged_ = true;  // started here, not resumed
  }
  cv_.notify_all();
  spdlog::info(
      "master-key rotation to v{} started: {} escrowed keys and {} enrollment tokens to "
      "re-wrap",
      target, keys, tokens);
  return json{{"target", target},
              {"escrowed_keys", keys},
              {"enrollment_tokens", tokens},
              {"message", "master key v" + std::to_string(target) +
                              " created; re-wrapping in the background (kmsctl master-key "
                              "status)"}};
}

Status Rotation::check_retire(std::uint32_t version) {
  if (!serving_()) return sealed_error();
  KMSD_ASSIGN_OR_RETURN(auto versions, token_.master_key_versions());
  if (std::find(versions.begin(), versions.end(), version) == versions.end())
    return make_error(ErrorCode::kNotFound,
                      "master key v" + std::to_string(version) + " is not on the token");
  KMSD_ASSIGN_OR_RETURN(auto st, load());
  if (st && st->value("state", "") == "running")
    return make_error(ErrorCode::kFailedPrecondition,
                      "a rotation to master key v" + std::to_string(st->value("target", 0)) +
                          " is still running (" + std::to_string(st->value("done", 0)) + " of " +
                          std::to_string(st->value("total", 0)) +
                          " re-wrapped); retire the old version once it has finished");
  KMSD_ASSIGN_OR_RETURN(std::uint32_t current, provision::master_key_version(store_));
  if (version >= current)
    return make_error(ErrorCode::kFailedPrecondition,
                      "master key v" + std::to_string(version) +
                          " is the current version (new records are sealed under it); rotate "
                          "first (kmsctl master-key rotate)");
  KMSD_ASSIGN_OR_RETURN(std::size_t keys, keys_under(store_, version));
  KMSD_ASSIGN_OR_RETURN(std::size_t tokens,
                        count_tokens(store_, [version](auto v) { return v && *v == version; }));
  if (keys + tokens > 0)
    return make_error(ErrorCode::kFailedPrecondition,
                      "master key v" + std::to_string(version) + " still protects " +
                          std::to_string(keys) + " escrowed key(s) and " + std::to_string(tokens) +
                          " enrollment token(s); nothing was destroyed. Rotate (kmsctl "
                          "master-key rotate) and let it finish before retiring v" +
                          std::to_string(version));
  return {};
}

Result<approvals::Outcome> Rotation::request_retire(std::uint32_t version,
                                                    const std::string& requester) {
  KMSD_TRY(check_retire(version));
  return approvals_.submit(kRetireOperation, json{{"version", version}}, requester);
}

Result<json> Rotation::retire(const json& params, const std::string& by) {
  const auto version = params.value("version", std::uint32_t{0});
  // Checked again inside the approval's store transaction: no enrollment can record a key
  // between this check and the destruction.
  KMSD_TRY(check_retire(version));
  KMSD_ASSIGN_OR_RETURN(std::size_t objects, token_.destroy_master_key(version));
  KMSD_TRY(audit_.append(by, "master_key.retire", {{"version", version}, {"objects", objects}}));
  spdlog::warn("master key v{} retired: {} object(s) destroyed on the token", version, objects);
  return json{{"version", version},
              {"objects_destroyed", objects},
              {"message", "master key v" + std::to_string(version) + " destroyed on the token"}};
}

// ---- status -----------------------------------------------------------------------------

Result<json> Rotation::status() {
  KMSD_ASSIGN_OR_RETURN(auto st, load());
  KMSD_ASSIGN_OR_RETURN(std::uint32_t current, provision::master_key_version(store_));
  json out{{"current_version", current}, {"state", "idle"}};
  if (st) {
    out["state"] = st->value("state", "idle");
    for (const char* k : {"from", "target", "phase", "pass", "done", "skipped", "total", "batch",
                          "pause_ms", "requested_by", "started_at", "finished_at", "remaining"})
      if (st->contains(k)) out[k] = (*st)[k];
  }
  {
    std::lock_guard lk(mu_);
    if (out["state"] == "running" && !paused_.empty()) {
      out["state"] = "paused";
      out["paused_because"] = paused_;
    }
    if (session_started_) {
      const double secs =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - session_start_).count();
      out["rewrapped_since_start"] = session_done_;
      out["rate_per_second"] = secs > 0 ? static_cast<double>(session_done_) / secs : 0.0;
    }
  }
  KMSD_ASSIGN_OR_RETURN(auto counts, store_.key_history_master_versions());
  json by = json::object();
  for (const auto& [v, c] : counts) by[std::to_string(v)] = c;
  out["escrowed_keys_by_version"] = by;
  if (serving_()) {
    auto versions = token_.master_key_versions();
    if (versions.ok()) out["token_versions"] = *versions;
  }
  return out;
}

// ---- the job ----------------------------------------------------------------------------

Status Rotation::step(json& state) {
  const auto target = state.value("target", std::uint32_t{0});
  const std::string phase = state.value("phase", "keys");
  if (phase == "keys" || phase == "tokens") {
    auto done = phase == "keys"
                    ? rewrap_batch(store_, state, escrowed_keys_phase(store_, token_, target))
                    : rewrap_batch(store_, state, enrollment_tokens_phase(store_, token_, target));
    if (!done.ok()) return done.error();
    std::lock_guard lk(mu_);
    session_done_ += *done;
    return {};
  }
  // phase "check": records sealed under an older version while the pass ran (an enrollment
  // that read the master version before the rotation began) get another pass.
  KMSD_ASSIGN_OR_RETURN(std::size_t keys, keys_not_under(store_, target));
  KMSD_ASSIGN_OR_RETURN(std::size_t tokens, count_tokens(store_, [target](auto v) {
                          return v.value_or(target) != target;
                        }));
  const int pass = state.value("pass", 1);
  const std::size_t remaining = keys + tokens;
  const std::size_t skipped = state.value("skipped", std::size_t{0});
  if (remaining > skipped && pass < kMaxPasses) {
    state["pass"] = pass + 1;
    state["phase"] = "keys";
    state["after_user"] = "";
    state["after_version"] = 0;
    state["skipped"] = 0;
    state["total"] = state.value("done", std::size_t{0}) + remaining;
    spdlog::info("rotation: {} record(s) still under an older master key; pass {}", remaining,
                 pass + 1);
    return store_.put_setting(kSettingRotation, state.dump());
  }
  state["state"] = "finished";
  state["phase"] = "done";
  state["remaining"] = remaining;
  state["finished_at"] = unix_now();
  return store_.transaction([&]() -> Status {
    KMSD_TRY(store_.put_setting(kSettingRotation, state.dump()));
    return audit_.append("kmsd", "master_key.rotate.finished",
                         {{"target", target},
                          {"rewrapped", state.value("done", std::size_t{0})},
                          {"remaining", remaining},
                          {"passes", pass}});
  });
}

void Rotation::run() {
  auto wait = [this](std::chrono::milliseconds d) {
    std::unique_lock lk(mu_);
    cv_.wait_for(lk, d, [this] { return stop_ || kick_; });
    kick_ = false;
    return !stop_;
  };
  std::chrono::milliseconds next{200};
  while (wait(next)) {
    next = std::chrono::milliseconds(500);
    if (!serving_()) continue;
    auto loaded = load();
    if (!loaded.ok()) {
      std::lock_guard lk(mu_);
      if (paused_ != loaded.error().message) spdlog::error("rotation: {}", loaded.error().message);
      paused_ = loaded.error().message;
      continue;
    }
    if (!*loaded || (*loaded)->value("state", "") != "running") continue;
    json state = std::move(**loaded);
    bool resumed = false;
    {
      std::lock_guard lk(mu_);
      if (!session_started_) {
        session_started_ = true;
        session_start_ = std::chrono::steady_clock::now();
        session_done_ = 0;
      }
      resumed = !resumed_logged_;
      resumed_logged_ = true;
    }
    if (resumed) {
      spdlog::info("rotation to master key v{} resumes: {} of {} re-wrapped so far",
                   state.value("target", 0), state.value("done", 0), state.value("total", 0));
      (void)audit_.append("kmsd", "master_key.rotate.resumed",
                          {{"target", state.value("target", 0)}, {"done", state.value("done", 0)}});
    }
    auto st = step(state);
    if (!st.ok()) {
      std::lock_guard lk(mu_);
      if (paused_ != st.error().message)
        spdlog::warn("rotation paused: {}; retrying every second", st.error().message);
      paused_ = st.error().message;
      next = std::chrono::seconds(1);
      continue;
    }
    {
      std::lock_guard lk(mu_);
      if (!paused_.empty()) spdlog::info("rotation goes on");
      paused_.clear();
    }
    if (state.value("state", "") == "finished") {
      spdlog::info("master-key rotation to v{} finished: {} re-wrapped, {} still under older keys",
                   state.value("target", 0), state.value("done", 0), state.value("remaining", 0));
      continue;
    }
    next = std::chrono::milliseconds(state.value("pause_ms", 0));
  }
}

}  // namespace kmsd::rotation

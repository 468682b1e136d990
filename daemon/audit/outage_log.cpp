#include "daemon/audit/outage_log.hpp"

#include <spdlog/spdlog.h>

#include <chrono>

namespace kmsd::audit {

using json = nlohmann::json;

namespace {

constexpr const char* kPendingSetting = "audit_pending_outages";

std::int64_t unix_seconds(std::chrono::system_clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::seconds>(t.time_since_epoch()).count();
}

// The record's details: the pending entry without its bookkeeping.
json details_of(const json& entry) {
  json d = entry;
  d.erase("open");
  return d;
}

}  // namespace

Status OutageLog::load() {
  KMSD_ASSIGN_OR_RETURN(auto text, store_.get_setting(kPendingSetting));
  if (!text) return {};
  json list = json::parse(*text, nullptr, false);
  if (!list.is_array())
    return make_error(ErrorCode::kStore,
                      std::string("store setting ") + kPendingSetting +
                          " is not a JSON array; it holds token outages not yet audited: "
                          "inspect it (sqlite3 kmsd.db \"select value from settings\") and "
                          "delete the setting to start kmsd without them");
  std::lock_guard lock(mu_);
  for (auto& e : list) {
    if (!e.is_object()) continue;
    if (e.value("open", false)) {
      e.erase("open");
      e["ended"] = nullptr;
      e["note"] =
          "kmsd stopped before the token answered again; the outage lasted at least until then";
      dirty_ = true;
    }
    pending_.push_back(std::move(e));
  }
  if (!pending_.empty())
    spdlog::warn(
        "{} key-token outage(s) from an earlier run are not in the audit log yet; they "
        "are written once the token is logged in",
        pending_.size());
  return {};
}

void OutageLog::observe(const hsm::TokenOutage& o) {
  std::lock_guard lock(mu_);
  json* open =
      (!pending_.empty() && pending_.back().value("open", false)) ? &pending_.back() : nullptr;
  if (!open) {
    pending_.push_back(json{{"open", true}, {"started", unix_seconds(o.started)}});
    open = &pending_.back();
  }
  json& e = *open;
  e["fault"] = hsm::to_string(o.fault);
  e["code"] = o.code;
  e["cause"] = o.cause;
  e["sealed"] = o.sealed;
  e["refused_operations"] = o.refused;
  dirty_ = true;
  if (!o.ended) {
    if (o.sealed)
      spdlog::error(
          "key token outage: the token refused the retained startup secret ({}): kmsd is "
          "SEALED until it is unsealed with the current secret; the outage is audited then",
          o.code);
    else
      spdlog::error(
          "key token outage began ({}, {}): {}; requests that need the token get 503 until it "
          "answers; kmsd keeps retrying",
          hsm::to_string(o.fault), o.code, o.cause);
    return;
  }
  e.erase("open");
  e["ended"] = unix_seconds(*o.ended);
  e["duration_ms"] = o.duration.count();
  spdlog::warn(
      "key token outage ended after {} ms ({}, {}): {} token operation(s) refused meanwhile; "
      "its audit record is written now",
      o.duration.count(), hsm::to_string(o.fault), o.code, o.refused);
}

std::optional<std::string> OutageLog::take_dirty_locked() {
  if (!dirty_) return std::nullopt;
  json list = json::array();
  for (const auto& e : pending_) list.push_back(e);
  dirty_ = false;
  return list.dump();
}

Result<std::size_t> OutageLog::flush() {
  std::lock_guard serial(flush_mu_);
  // The store is written without mu_ held: a store transaction may be waiting on a hung token
  // call, and observe() (called on the token's threads while requests fail fast) must never
  // wait behind it.
  std::optional<std::string> snapshot;
  {
    std::lock_guard lock(mu_);
    snapshot = take_dirty_locked();
  }
  if (snapshot) {
    if (Status st = store_.put_setting(kPendingSetting, *snapshot); !st.ok()) {
      std::lock_guard lock(mu_);
      dirty_ = true;
      return st.error();
    }
  }
  std::size_t written = 0;
  for (;;) {
    json entry;
    {
      std::lock_guard lock(mu_);
      if (pending_.empty() || pending_.front().value("open", false)) break;
      entry = pending_.front();
    }
    // The record and the shorter pending list in one transaction: never both, never neither.
    // mu_ is not held while the token MACs (a failure there reaches observe()).
    Status st = store_.transaction([&]() -> Status {
      KMSD_TRY(audit_.append("kmsd", "token.outage", details_of(entry)));
      json rest = json::array();
      {
        std::lock_guard lock(mu_);
        for (std::size_t i = 1; i < pending_.size(); ++i) rest.push_back(pending_[i]);
      }
      return store_.put_setting(kPendingSetting, rest.dump());
    });
    if (!st.ok())
      return st.error().context("writing a key-token outage to the audit log (kept pending)");
    std::lock_guard lock(mu_);
    pending_.erase(pending_.begin());
    ++written;
  }
  return written;
}

std::size_t OutageLog::pending() const {
  std::lock_guard lock(mu_);
  return pending_.size();
}

}  // namespace kmsd::audit

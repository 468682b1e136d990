#include "daemon/users/user_service.hpp"

#include <openssl/evp.h>

#include <ctime>

#include "common/clock.hpp"
#include "common/csv.hpp"
#include "common/ossl.hpp"
#include "daemon/lifecycle/state_machine.hpp"
#include "daemon/lifecycle/store_state.hpp"

namespace kmsd::users {

using json = nlohmann::json;
using lifecycle::Action;

namespace {

policy::UserIdentity identity_of(const UserInput& in) {
  policy::UserIdentity u;
  u.user_id = in.id;
  u.email = in.email;
  u.display_name = in.display_name;
  u.dn = in.dn.value_or("");
  return u;
}

json user_json(const store::UserRecord& u) {
  json j{{"id", u.id},
         {"email", u.email},
         {"display_name", u.display_name},
         {"state", store::to_string(u.state)},
         {"created_at", u.created_at},
         {"updated_at", u.updated_at}};
  j["dn"] = u.dn ? json(*u.dn) : json(nullptr);
  j["last_enrolled_at"] = u.last_enrolled_at ? json(*u.last_enrolled_at) : json(nullptr);
  return j;
}

// "none", "pending", "expired", "locked" or "used".
std::string token_status(const std::optional<store::EnrollmentTokenRecord>& t, std::int64_t now,
                         std::uint32_t max_attempts) {
  if (!t) return "none";
  if (t->used_at) return "used";
  if (static_cast<std::uint32_t>(t->failed_attempts) >= max_attempts) return "locked";
  if (t->expires_at <= now) return "expired";
  return "pending";
}

}  // namespace

std::string refusal_reason(const Error& e) {
  if (e.code != ErrorCode::kFailedPrecondition && e.code != ErrorCode::kNotFound) return "";
  auto colon = e.message.find(": ");
  if (colon == std::string::npos) return "";
  std::string name = e.message.substr(0, colon);
  return lifecycle::parse_transition_error(name) ? name : "";
}

const char* to_string(BulkStatus s) noexcept {
  switch (s) {
    case BulkStatus::kIssued:
      return "issued";
    case BulkStatus::kPending:
      return "pending";
    case BulkStatus::kSkippedRevoked:
      return "skipped-revoked";
    case BulkStatus::kSkippedActive:
      return "skipped-active";
    case BulkStatus::kSkippedRecovery:
      return "skipped-recovery";
    case BulkStatus::kInvalid:
      return "invalid";
  }
  return "invalid";
}

namespace {

// What the store knows about a user, as the state machine needs it.
struct Prepared {
  std::optional<store::UserRecord> user;
  std::optional<store::EnrollmentTokenRecord> token;
  lifecycle::UserState from = lifecycle::UserState::kNone;
  lifecycle::UserFacts facts;
};

}  // namespace

UserService::UserService(store::Store& store, hsm::Token& token, audit::AuditLog& audit,
                         const policy::PolicyInForce& policy,
                         std::function<TokenSettings()> settings)
    : store_(store),
      token_(token),
      audit_(audit),
      policy_(policy),
      settings_(std::move(settings)),
      tokens_(token) {}

namespace {
Result<Prepared> prepare(store::Store& store, const std::string& id) {
  Prepared p;
  KMSD_ASSIGN_OR_RETURN(p.user, store.find_user(id));
  if (!p.user) return p;
  p.from = lifecycle::from_store(p.user->state);
  KMSD_ASSIGN_OR_RETURN(p.token, store.find_enrollment_token(id));
  KMSD_ASSIGN_OR_RETURN(int depth, store.key_history_depth(id));
  p.facts.has_key_history = depth > 0;
  p.facts.has_pending_token = p.token.has_value() && !p.token->used_at.has_value();
  if (p.facts.has_pending_token)
    p.facts.pending_token_issued_at =
        std::chrono::sys_seconds(std::chrono::seconds(p.token->issued_at));
  return p;
}
}  // namespace

Result<Issued> UserService::issue_token(store::UserRecord user, store::TokenPurpose purpose,
                                        const std::string& issued_by, std::int64_t now) {
  const TokenSettings s = settings_();
  KMSD_ASSIGN_OR_RETURN(
      auto it, tokens_.issue(user.id, std::chrono::sys_seconds(std::chrono::seconds(now)), s.ttl));
  store::EnrollmentTokenRecord rec;
  rec.user_id = user.id;
  rec.purpose = purpose;
  rec.sealed = it.sealed.record;
  rec.issued_at = now;
  rec.issued_by = issued_by;
  rec.expires_at = it.sealed.expires_at.time_since_epoch().count();
  KMSD_TRY(store_.put_enrollment_token(rec));
  Issued out;
  out.user = std::move(user);
  out.token = std::move(it.text);
  out.expires_at = rec.expires_at;
  return out;
}

Result<Issued> UserService::enable(const UserInput& in, const std::string& admin) {
  KMSD_TRY(policy_.current()->admit_identity(identity_of(in)));
  Result<Issued> out = Error{};
  Status st = store_.transaction([&]() -> Status {
    const std::int64_t now = unix_now();
    KMSD_ASSIGN_OR_RETURN(auto p, prepare(store_, in.id));
    auto d = lifecycle::transition(p.from, Action::kEnable, p.facts);
    if (!d.ok()) return d.error();
    store::UserRecord user = p.user.value_or(store::UserRecord{});
    user.id = in.id;
    user.email = in.email;
    user.display_name = in.display_name;
    user.dn = in.dn;
    user.state = lifecycle::to_store(d->to);
    user.updated_at = now;
    if (p.user) {
      KMSD_TRY(store_.update_user(user));
    } else {
      user.created_at = now;
      KMSD_TRY(store_.insert_user(user));
    }
    KMSD_ASSIGN_OR_RETURN(auto issued, issue_token(user, store::TokenPurpose::kEnroll, admin, now));
    KMSD_TRY(audit_.append(admin, "user.enable",
                           {{"user", in.id},
                            {"email", in.email},
                            {"previous_state", lifecycle::to_string(p.from)},
                            {"token_expires_at", issued.expires_at}}));
    issued.message =
        std::string(p.from == lifecycle::UserState::kRevoked ? "re-enabled" : "enabled") + " " +
        in.id + "; enrollment token valid until " + utc_text(issued.expires_at) +
        " (shown once: hand it to the user)";
    out = std::move(issued);
    return {};
  });
  if (!st.ok()) return st.error();
  return out;
}

Result<Issued> UserService::reissue(const std::string& id, const std::string& admin) {
  Result<Issued> out = Error{};
  Status st = store_.transaction([&]() -> Status {
    const std::int64_t now = unix_now();
    KMSD_ASSIGN_OR_RETURN(auto p, prepare(store_, id));
    auto d = lifecycle::transition(p.from, Action::kReissue, p.facts);
    if (!d.ok()) return d.error();
    store::UserRecord user = *p.user;
    user.updated_at = now;
    KMSD_TRY(store_.update_user(user));
    const auto purpose = d->to == lifecycle::UserState::kRecovery ? store::TokenPurpose::kRecover
                                                                  : store::TokenPurpose::kEnroll;
    KMSD_ASSIGN_OR_RETURN(auto issued, issue_token(user, purpose, admin, now));
    KMSD_TRY(audit_.append(admin, "user.reissue",
                           {{"user", id},
                            {"purpose", store::to_string(purpose)},
                            {"replaced_pending_token", p.facts.has_pending_token},
                            {"token_expires_at", issued.expires_at}}));
    issued.message = std::string("new ") + store::to_string(purpose) + " token for " + id +
                     ", valid until " + utc_text(issued.expires_at) +
                     (p.facts.has_pending_token ? "; the previous token no longer works" : "");
    out = std::move(issued);
    return {};
  });
  if (!st.ok()) return st.error();
  return out;
}

Result<json> UserService::revoke(const std::string& id, int reason, const std::string& admin) {
  json out;
  Status st = store_.transaction([&]() -> Status {
    const std::int64_t now = unix_now();
    KMSD_ASSIGN_OR_RETURN(auto p, prepare(store_, id));
    auto d = lifecycle::transition(p.from, Action::kRevoke, p.facts);
    if (!d.ok()) return d.error();
    json revoked = json::array();
    if (d->revoke_certificates) {
      KMSD_ASSIGN_OR_RETURN(auto certs, store_.certificates_of_user(id));
      for (const auto& c : certs) {
        if (c.revoked_at) continue;
        KMSD_TRY(store_.revoke_certificate(c.serial, now, reason));
        revoked.push_back(c.serial);
      }
    }
    if (d->discard_pending_token && p.facts.has_pending_token)
      KMSD_TRY(store_.delete_enrollment_token(id));
    store::UserRecord user = *p.user;
    user.state = lifecycle::to_store(d->to);
    user.updated_at = now;
    KMSD_TRY(store_.update_user(user));
    KMSD_TRY(audit_.append(admin, "user.revoke",
                           {{"user", id},
                            {"reason", reason},
                            {"previous_state", lifecycle::to_string(p.from)},
                            {"revoked_certificates", revoked}}));
    out = json{{"user", id},
               {"state", "revoked"},
               {"revoked_certificates", revoked},
               {"message", "revoked " + id + ": " + std::to_string(revoked.size()) +
                               " certificate(s) revoked" +
                               (p.facts.has_pending_token ? ", pending token voided" : "")}};
    return {};
  });
  if (!st.ok()) return st.error();
  return out;
}

Result<json> UserService::recover(const std::string& id, const std::string& admin) {
  json out;
  Status st = store_.transaction([&]() -> Status {
    const std::int64_t now = unix_now();
    KMSD_ASSIGN_OR_RETURN(auto p, prepare(store_, id));
    auto d = lifecycle::transition(p.from, Action::kRecover, p.facts);
    if (!d.ok()) return d.error();
    if (p.facts.has_pending_token) KMSD_TRY(store_.delete_enrollment_token(id));
    store::UserRecord user = *p.user;
    user.state = lifecycle::to_store(d->to);
    user.updated_at = now;
    KMSD_TRY(store_.update_user(user));
    KMSD_ASSIGN_OR_RETURN(int depth, store_.key_history_depth(id));
    KMSD_TRY(audit_.append(admin, "user.recover",
                           {{"user", id},
                            {"previous_state", lifecycle::to_string(p.from)},
                            {"key_history_depth", depth}}));
    out = json{{"user", id},
               {"state", "recovery"},
               {"key_history_depth", depth},
               {"message", id + " is in recovery (" + std::to_string(depth) +
                               " escrowed key(s) will be handed back at enrollment); issue the "
                               "recovery token with `kmsctl user reissue " +
                               id + "`"}};
    return {};
  });
  if (!st.ok()) return st.error();
  return out;
}

Result<json> UserService::show(const std::string& id) {
  KMSD_ASSIGN_OR_RETURN(auto p, prepare(store_, id));
  if (!p.user) return make_error(ErrorCode::kNotFound, "no user " + id);
  const std::int64_t now = unix_now();
  json j{{"user", user_json(*p.user)}};
  json token = nullptr;
  if (p.token) {
    token = json{{"purpose", store::to_string(p.token->purpose)},
                 {"status", token_status(p.token, now, settings_().max_attempts)},
                 {"issued_at", p.token->issued_at},
                 {"issued_by", p.token->issued_by},
                 {"expires_at", p.token->expires_at},
                 {"failed_attempts", p.token->failed_attempts}};
    token["used_at"] = p.token->used_at ? json(*p.token->used_at) : json(nullptr);
  }
  j["token_status"] = token;
  KMSD_ASSIGN_OR_RETURN(int depth, store_.key_history_depth(id));
  j["key_history_depth"] = depth;
  json certs = json::array();
  KMSD_ASSIGN_OR_RETURN(auto list, store_.certificates_of_user(id));
  for (const auto& c : list) {
    json cj{{"serial", c.serial},
            {"kind", store::to_string(c.kind)},
            {"not_after", c.not_after},
            {"issued_at", c.issued_at}};
    cj["revoked_at"] = c.revoked_at ? json(*c.revoked_at) : json(nullptr);
    certs.push_back(cj);
  }
  j["certificates"] = certs;
  return j;
}

Result<std::vector<BulkLine>> UserService::bulk_enable(const std::vector<UserInput>& users,
                                                       const BulkOptions& options,
                                                       const std::string& admin) {
  if (options.job.empty() || options.job.size() > 64)
    return make_error(ErrorCode::kInvalidArgument, "a bulk job needs an id of 1 to 64 characters");
  const std::string issued_by = "bulk:" + options.job + ":" + admin;
  auto policy = policy_.current();
  std::vector<BulkLine> lines;
  lines.reserve(users.size());
  json summary = json::array();
  Status st = store_.transaction([&]() -> Status {
    const std::int64_t now = unix_now();
    for (const auto& in : users) {
      BulkLine line;
      line.id = in.id;
      if (auto ok = policy->admit_identity(identity_of(in)); !ok.ok()) {
        line.status = BulkStatus::kInvalid;
        line.message = "not enabled: " + ok.error().message;
      } else {
        KMSD_ASSIGN_OR_RETURN(auto p, prepare(store_, in.id));
        const bool revoked = p.from == lifecycle::UserState::kRevoked;
        if (p.from == lifecycle::UserState::kActive) {
          line.status = BulkStatus::kSkippedActive;
          line.message = "already enrolled" +
                         (p.user->last_enrolled_at ? " since " + utc_text(*p.user->last_enrolled_at)
                                                   : std::string()) +
                         "; nothing to do";
        } else if (p.from == lifecycle::UserState::kRecovery) {
          line.status = BulkStatus::kSkippedRecovery;
          line.message = "a key recovery is under way; not re-enabled";
        } else if (revoked && !options.include_revoked) {
          line.status = BulkStatus::kSkippedRevoked;
          line.message = "revoked on " + utc_text(p.user->updated_at) +
                         "; not re-enabled (use --include-revoked to re-enable revoked users)";
        } else if (p.from == lifecycle::UserState::kEnabled && p.facts.has_pending_token &&
                   p.token->issued_by == issued_by && p.token->expires_at > now) {
          // The same job enabled this user before and its result never reached the file.
          KMSD_ASSIGN_OR_RETURN(
              line.token,
              tokens_.reveal({p.token->sealed,
                              std::chrono::sys_seconds(std::chrono::seconds(p.token->expires_at))},
                             in.id));
          line.status = BulkStatus::kIssued;
          line.expires_at = p.token->expires_at;
          line.message = "token issued by this job on " + utc_text(p.token->issued_at) +
                         ", delivered now; valid until " + utc_text(line.expires_at);
        } else if (p.from == lifecycle::UserState::kEnabled && !options.reissue_pending) {
          line.status = BulkStatus::kPending;
          line.message = p.facts.has_pending_token
                             ? "already enabled: a token was issued on " +
                                   utc_text(p.token->issued_at) + " by " + p.token->issued_by +
                                   " and has not been used; no new token (use "
                                   "--reissue-pending to replace it)"
                             : "already enabled without a usable token; use --reissue-pending "
                               "to issue one";
        } else {
          const Action action =
              p.from == lifecycle::UserState::kEnabled ? Action::kReissue : Action::kEnable;
          auto d = lifecycle::transition(p.from, action, p.facts);
          if (!d.ok()) {
            line.status = BulkStatus::kInvalid;
            line.message = "not enabled: " + d.refusal().message;
          } else {
            store::UserRecord user = p.user.value_or(store::UserRecord{});
            user.id = in.id;
            user.email = in.email;
            user.display_name = in.display_name;
            user.dn = in.dn;
            user.state = store::UserState::kEnabled;
            user.updated_at = now;
            if (p.user) {
              KMSD_TRY(store_.update_user(user));
            } else {
              user.created_at = now;
              KMSD_TRY(store_.insert_user(user));
            }
            KMSD_ASSIGN_OR_RETURN(auto issued,
                                  issue_token(user, store::TokenPurpose::kEnroll, issued_by, now));
            line.status = BulkStatus::kIssued;
            line.token = std::move(issued.token);
            line.expires_at = issued.expires_at;
            line.message =
                std::string(action == Action::kReissue ? "pending token replaced by a new one"
                                                       : (revoked ? "re-enabled; token issued"
                                                                  : "enabled; token issued")) +
                ", valid until " + utc_text(line.expires_at);
          }
        }
      }
      summary.push_back({{"user", line.id}, {"status", to_string(line.status)}});
      lines.push_back(std::move(line));
    }
    return audit_.append(admin, "user.bulk_enable",
                         {{"job", options.job},
                          {"reissue_pending", options.reissue_pending},
                          {"include_revoked", options.include_revoked},
                          {"results", summary}});
  });
  if (!st.ok()) return st.error();
  return lines;
}

namespace {

std::string base64(std::span<const std::uint8_t> data) {
  std::string out(4 * ((data.size() + 2) / 3) + 1, '\0');
  int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()), data.data(),
                          static_cast<int>(data.size()));
  out.resize(static_cast<std::size_t>(n));
  return out;
}

// RFC 2849: a value that is not a SAFE-STRING is written base64 ("attr:: ...").
std::string ldif_line(std::string_view attr, std::string_view value) {
  bool safe = !value.empty() && value.front() != ' ' && value.front() != ':' &&
              value.front() != '<' && value.back() != ' ';
  for (unsigned char c : value)
    if (c == 0 || c == '\n' || c == '\r' || c > 127) safe = false;
  if (value.empty()) safe = true;
  if (safe) return std::string(attr) + ": " + std::string(value) + "\n";
  return std::string(attr) +
         ":: " + base64({reinterpret_cast<const std::uint8_t*>(value.data()), value.size()}) + "\n";
}

std::string dn_escape(std::string_view v) {
  std::string out;
  for (std::size_t i = 0; i < v.size(); ++i) {
    char c = v[i];
    if (std::string_view(",+\"\\<>;=").find(c) != std::string_view::npos ||
        (i == 0 && (c == ' ' || c == '#')) || (i + 1 == v.size() && c == ' '))
      out += '\\';
    out += c;
  }
  return out;
}

}  // namespace

Status UserService::report(ReportFormat format,
                           const std::function<Status(std::string_view)>& sink) {
  const std::int64_t now = unix_now();
  const std::uint32_t max_attempts = settings_().max_attempts;
  if (format == ReportFormat::kCsv)
    KMSD_TRY(
        sink("id,email,display_name,state,signing_serial,signing_not_after,"
             "encryption_serial,encryption_not_after,key_history_depth,last_enrolled_at,"
             "token_status\r\n"));
  if (format == ReportFormat::kJson) KMSD_TRY(sink("["));
  bool first = true;
  std::string after;
  for (;;) {
    std::vector<store::UserRecord> page;
    KMSD_ASSIGN_OR_RETURN(std::size_t n,
                          store_.for_each_user(after, 500, [&](const store::UserRecord& u) {
                            page.push_back(u);
                            return Status{};
                          }));
    if (n == 0) break;
    after = page.back().id;
    std::string chunk;
    for (const auto& u : page) {
      KMSD_ASSIGN_OR_RETURN(auto certs, store_.certificates_of_user(u.id));
      const store::CertificateRecord* sign = nullptr;
      const store::CertificateRecord* enc = nullptr;
      for (const auto& c : certs) {  // issue order: the last valid one of each kind is current
        if (c.revoked_at) continue;
        if (c.kind == store::CertKind::kSigning) sign = &c;
        if (c.kind == store::CertKind::kEncryption) enc = &c;
      }
      KMSD_ASSIGN_OR_RETURN(int depth, store_.key_history_depth(u.id));
      KMSD_ASSIGN_OR_RETURN(auto tok, store_.find_enrollment_token(u.id));
      const std::string tstat = token_status(tok, now, max_attempts);
      if (format == ReportFormat::kJson) {
        json j = user_json(u);
        j["signing_serial"] = sign ? json(sign->serial) : json(nullptr);
        j["signing_not_after"] = sign ? json(sign->not_after) : json(nullptr);
        j["encryption_serial"] = enc ? json(enc->serial) : json(nullptr);
        j["encryption_not_after"] = enc ? json(enc->not_after) : json(nullptr);
        j["key_history_depth"] = depth;
        j["token_status"] = tstat;
        chunk += (first ? "\n" : ",\n") + j.dump();
      } else if (format == ReportFormat::kCsv) {
        chunk += csv::quote(u.id) + "," + csv::quote(u.email) + "," + csv::quote(u.display_name) +
                 "," + store::to_string(u.state) + "," + (sign ? sign->serial : "") + "," +
                 (sign ? utc_text(sign->not_after) : "") + "," + (enc ? enc->serial : "") + "," +
                 (enc ? utc_text(enc->not_after) : "") + "," + std::to_string(depth) + "," +
                 (u.last_enrolled_at ? utc_text(*u.last_enrolled_at) : "") + "," + tstat + "\r\n";
      } else if (sign || enc) {  // LDIF: only users with certificates to publish
        chunk += ldif_line("dn", u.dn ? *u.dn : "uid=" + dn_escape(u.id));
        chunk += ldif_line("changetype", "modify");
        chunk += "replace: userCertificate;binary\n";
        if (sign) chunk += "userCertificate;binary:: " + base64(sign->der) + "\n";
        if (enc) chunk += "userCertificate;binary:: " + base64(enc->der) + "\n";
        chunk += "-\nreplace: userSMIMECertificate\n";
        if (enc) chunk += "userSMIMECertificate:: " + base64(enc->der) + "\n";
        chunk += "-\n";
        chunk += ldif_line("replace", "mail") + ldif_line("mail", u.email) + "-\n\n";
      }
      first = false;
    }
    KMSD_TRY(sink(chunk));
  }
  if (format == ReportFormat::kJson) KMSD_TRY(sink(first ? "]\n" : "\n]\n"));
  return {};
}

}  // namespace kmsd::users

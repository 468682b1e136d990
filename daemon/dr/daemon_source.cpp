#include "daemon/dr/daemon_source.hpp"

#include <openssl/x509.h>

#include "common/clock.hpp"
#include "daemon/dr/message.hpp"

namespace kmsd::dr {

using json = nlohmann::json;

nlohmann::json SessionCounts::to_json() const {
  return json{{kStaged, staged},
              {kUnknownRecipient, unknown_recipient},
              {kFailed, failed},
              {"users_opened", users_opened}};
}

struct PredecryptService::Session {
  std::string request_id;
  std::string admin;
  std::string fingerprint;
  ossl::X509Ptr custody;
  std::int64_t expires_at = 0;
  std::atomic<std::int64_t> last_used{0};
  std::mutex keys_mu;  // guards ring and opened
  KeyRing ring;
  std::set<std::string> opened;  // users whose escrowed history is in RING
  // "ski:<hex>" -> serial of every encryption certificate this KMS issued; built on the first
  // recipient named only by its subject key identifier (openssl cms -keyid, some mail clients).
  std::optional<std::map<std::string, std::string>> ski_serials;
  std::atomic<std::size_t> staged{0}, unknown{0}, failed{0};

  SessionCounts counts() {
    SessionCounts c;
    c.staged = staged;
    c.unknown_recipient = unknown;
    c.failed = failed;
    std::lock_guard lock(keys_mu);
    c.users_opened = opened.size();
    return c;
  }
};

namespace {

struct Custody {
  ossl::X509Ptr cert;
  std::string fingerprint;
};

Result<Custody> read_custody(const std::string& pem) {
  if (pem.empty())
    return make_error(ErrorCode::kInvalidArgument,
                      "\"custody_certificate\" (the DR custody certificate, PEM) is required");
  auto cert = ossl::x509_from_pem(pem);
  if (!cert.ok()) return cert.error().context("the custody certificate");
  const int type = EVP_PKEY_base_id(X509_get0_pubkey(cert->get()));
  if (type != EVP_PKEY_RSA && type != EVP_PKEY_EC)
    return make_error(ErrorCode::kInvalidArgument,
                      "the custody certificate must carry an RSA or EC key (messages are "
                      "encrypted to it)");
  Custody c;
  c.fingerprint = ossl::sha256_fingerprint(cert->get());
  c.cert = std::move(*cert);
  return c;
}

std::string subject_of(X509* cert) {
  ossl::BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio || X509_NAME_print_ex(bio.get(), X509_get_subject_name(cert), 0, XN_FLAG_RFC2253) < 0)
    return {};
  char* p = nullptr;
  const long n = BIO_get_mem_data(bio.get(), &p);
  return std::string(p, static_cast<std::size_t>(n));
}

// "ski:<hex>" -> serial of every encryption certificate in STORE that has a subject key
// identifier. Loads the certificates once (a DR session's fallback for recipients named only by
// their key identifier; issuer-and-serial recipients are looked up one by one).
Result<std::map<std::string, std::string>> encryption_certificates_by_ski(store::Store& store) {
  KMSD_ASSIGN_OR_RETURN(auto certs, store.certificates(store::CertKind::kEncryption));
  std::map<std::string, std::string> out;
  for (const auto& c : certs) {
    const unsigned char* p = c.der.data();
    ossl::X509Ptr x(d2i_X509(nullptr, &p, static_cast<long>(c.der.size())));
    if (!x) continue;  // an unreadable row names no recipient; the message stays unknown
    if (const ASN1_OCTET_STRING* ski = X509_get0_subject_key_id(x.get()))
      out.emplace(ski_id(ski), c.serial);
  }
  return out;
}

}  // namespace

PredecryptService::PredecryptService(store::Store& store, audit::AuditLog& audit,
                                     approvals::Approvals& approvals,
                                     enroll::EnrollmentService& enrollment,
                                     std::chrono::seconds window)
    : store_(store),
      audit_(audit),
      approvals_(approvals),
      enrollment_(enrollment),
      window_(window) {
  approvals_.register_operation(
      kDrOperation, [this](const json& p, const std::string& by) { return execute(p, by); });
}

PredecryptService::~PredecryptService() = default;

Result<approvals::Outcome> PredecryptService::request(const std::string& custody_pem,
                                                      const std::string& requester) {
  KMSD_ASSIGN_OR_RETURN(auto custody, read_custody(custody_pem));
  return approvals_.submit(kDrOperation,
                           {{"step", kPredecryptStep},
                            {"custody_certificate_sha256", custody.fingerprint},
                            {"custody_subject", subject_of(custody.cert.get())},
                            {"custody_certificate", custody_pem}},
                           requester);
}

// Inside the transaction that marks the request executed: what the session may do, by whom,
// until when. No key is opened here.
Result<json> PredecryptService::execute(const json& params, const std::string& requested_by) {
  if (params.value("step", std::string()) != kPredecryptStep)
    return make_error(ErrorCode::kInvalidArgument,
                      "unknown disaster-recovery step '" + params.value("step", std::string()) +
                          "' (this kmsd runs \"predecrypt\" sessions only)");
  KMSD_ASSIGN_OR_RETURN(auto custody,
                        read_custody(params.value("custody_certificate", std::string())));
  if (custody.fingerprint != params.value("custody_certificate_sha256", std::string()))
    return make_error(ErrorCode::kInvalidArgument,
                      "the request's custody certificate does not match its fingerprint");
  return json{{"step", kPredecryptStep},
              {"custody_certificate_sha256", custody.fingerprint},
              {"session_by", requested_by},
              {"session_before", unix_now() + window_.count()},
              {"message", "approved: " + requested_by +
                              " may pre-decrypt through kmsd to the custody certificate " +
                              custody.fingerprint + " with kmsctl dr predecrypt --request"}};
}

Status PredecryptService::end(Session& s, const std::string& why) {
  const SessionCounts c = s.counts();
  // The keys go with the session object: it is out of the map already, so they are freed (their
  // secret numbers cleansed) as soon as the last request still using them returns.
  return store_.transaction([&] {
    return audit_.append(s.admin, "dr.predecrypt.session.close",
                         {{"request", s.request_id},
                          {"custody_certificate_sha256", s.fingerprint},
                          {"why", why},
                          {"counts", c.to_json()}});
  });
}

void PredecryptService::sweep() {
  std::vector<std::pair<std::shared_ptr<Session>, std::string>> gone;
  {
    std::lock_guard lock(mu_);
    const std::int64_t now = unix_now();
    for (auto it = sessions_.begin(); it != sessions_.end();) {
      auto& s = it->second;
      const char* why = nullptr;
      if (now >= s->expires_at)
        why = "the approval's window ended";
      else if (now - s->last_used.load() >
               std::chrono::duration_cast<std::chrono::seconds>(kIdleTimeout).count())
        why = "idle";
      if (why == nullptr) {
        ++it;
        continue;
      }
      gone.emplace_back(s, why);
      it = sessions_.erase(it);
    }
  }
  for (auto& [s, why] : gone) (void)end(*s, why);
}

Result<SessionInfo> PredecryptService::open(const std::string& request_id, const std::string& who,
                                            const std::string& custody_pem) {
  sweep();
  KMSD_ASSIGN_OR_RETURN(auto req, store_.find_approval_request(request_id));
  json params = req ? json::parse(req->params, nullptr, false) : json();
  if (!req || req->operation != kDrOperation || !params.is_object() ||
      params.value("step", std::string()) != kPredecryptStep)
    return make_error(ErrorCode::kNotFound, "no disaster-recovery pre-decryption request " +
                                                request_id +
                                                "; ask for one with kmsctl dr "
                                                "predecrypt --server without --request");
  if (req->requested_by != who)
    return make_error(ErrorCode::kPermissionDenied, "request " + request_id + " was asked for by " +
                                                        req->requested_by +
                                                        "; only the requester may use its session");
  if (req->state != store::RequestState::kExecuted)
    return make_error(ErrorCode::kFailedPrecondition,
                      "request " + request_id + " is " + store::to_string(req->state) +
                          (req->state == store::RequestState::kPending
                               ? ": it waits for approvals (kmsctl request list)"
                               : ": ask for a new one"));
  json result = req->result ? json::parse(*req->result, nullptr, false) : json::object();
  const std::int64_t before =
      result.is_object() ? result.value("session_before", std::int64_t{0}) : 0;
  if (unix_now() >= before)
    return make_error(ErrorCode::kFailedPrecondition,
                      "the window of request " + request_id + " has ended; ask for a new one");
  KMSD_ASSIGN_OR_RETURN(auto custody, read_custody(custody_pem));
  const std::string approved = params.value("custody_certificate_sha256", std::string());
  if (custody.fingerprint != approved)
    return make_error(ErrorCode::kPermissionDenied,
                      "the custody certificate " + custody.fingerprint +
                          " is not the one request " + request_id + " was approved for (" +
                          approved + "); messages are re-encrypted to the approved one only");
  std::shared_ptr<Session> s;
  bool fresh = false;
  {
    std::lock_guard lock(mu_);
    auto& slot = sessions_[request_id];
    if (!slot) {
      slot = std::make_shared<Session>();
      slot->request_id = request_id;
      slot->admin = who;
      slot->fingerprint = custody.fingerprint;
      slot->custody = std::move(custody.cert);
      slot->expires_at = before;
      fresh = true;
    }
    slot->last_used = unix_now();
    s = slot;
  }
  KMSD_TRY(store_.transaction([&] {
    return audit_.append(who, "dr.predecrypt.session.open",
                         {{"request", request_id},
                          {"custody_certificate_sha256", s->fingerprint},
                          {"rejoined", !fresh}});
  }));
  return SessionInfo{request_id, s->fingerprint, s->expires_at};
}

Result<std::shared_ptr<PredecryptService::Session>> PredecryptService::active(
    const std::string& request_id, const std::string& who) {
  std::lock_guard lock(mu_);
  auto it = sessions_.find(request_id);
  if (it == sessions_.end())
    return make_error(ErrorCode::kFailedPrecondition,
                      "no open pre-decryption session for request " + request_id +
                          " (never opened, closed, idle for " +
                          std::to_string(kIdleTimeout.count()) +
                          " minutes, or its window ended): open it again");
  if (it->second->admin != who)
    return make_error(ErrorCode::kPermissionDenied,
                      "the session of request " + request_id + " belongs to " + it->second->admin);
  it->second->last_used = unix_now();
  return it->second;
}

Result<Rewrapped> PredecryptService::rewrap(const std::string& request_id, const std::string& who,
                                            std::string_view cms_der) {
  sweep();
  KMSD_ASSIGN_OR_RETURN(auto s, active(request_id, who));
  ParsedMessage parsed = parse_message(
      {reinterpret_cast<const std::uint8_t*>(cms_der.data()), cms_der.size()}, Format::kDer);
  if (parsed.kind != Kind::kEncrypted)
    return make_error(ErrorCode::kInvalidArgument,
                      "the body is not an encrypted CMS message (DER): " + parsed.what);
  // Each recipient's key: in the session already, else its user's escrowed history is opened
  // (once per session) when the certificate is one this KMS issued for encryption.
  std::map<std::string, const KeyRing::Entry*> found;
  std::string load_error;
  {
    std::lock_guard lock(s->keys_mu);
    for (const auto& id : parsed.recipients) {
      const KeyRing::Entry* e = s->ring.find(id);
      std::string serial;
      if (e == nullptr && id.rfind("isn:", 0) == 0) {
        serial = id.substr(id.rfind('#') + 1);
      } else if (e == nullptr && id.rfind("ski:", 0) == 0) {
        if (!s->ski_serials) {
          auto index = encryption_certificates_by_ski(store_);
          if (!index.ok()) {
            load_error = index.error().message;
            continue;
          }
          s->ski_serials = std::move(*index);
        }
        if (auto it = s->ski_serials->find(id); it != s->ski_serials->end()) serial = it->second;
      }
      if (!serial.empty()) {
        auto cert = store_.find_certificate(serial);
        if (cert.ok() && cert->has_value() && (*cert)->user_id &&
            (*cert)->kind == store::CertKind::kEncryption &&
            s->opened.count(*(*cert)->user_id) == 0) {
          const std::string user = *(*cert)->user_id;
          auto keys = enrollment_.escrowed_keys(user);
          if (!keys.ok()) {
            load_error = "cannot open " + user + "'s escrowed keys: " + keys.error().message;
            continue;
          }
          std::vector<KeyPair> pairs;
          for (auto& k : *keys) {
            const unsigned char* p = k.pkcs8_der.data();
            ossl::EvpPkeyPtr key(
                d2i_AutoPrivateKey(nullptr, &p, static_cast<long>(k.pkcs8_der.size())));
            if (!key) {
              load_error = "escrowed key " + std::to_string(k.version) + " of " + user +
                           " does not read as a private key";
              continue;
            }
            pairs.push_back({std::move(key), std::move(k.certificate),
                             user + " key " + std::to_string(k.version)});
          }
          s->ring.add(user, std::move(pairs));
          s->opened.insert(user);
          e = s->ring.find(id);
        }
      }
      if (e != nullptr) found[id] = e;
    }
  }
  Rewrapped out;
  if (found.empty() && !load_error.empty()) {
    out.status = kFailed;
    out.reason = load_error;
  } else {
    // The entries stay valid while S lives (the ring only grows until the session ends, and
    // S is held here).
    out = rewrap_with(
        [&](const std::string& id) -> const KeyRing::Entry* {
          auto it = found.find(id);
          return it == found.end() ? nullptr : it->second;
        },
        parsed.cms.get(), parsed.recipients, s->custody.get());
  }
  if (out.status == kStaged)
    ++s->staged;
  else if (out.status == kUnknownRecipient)
    ++s->unknown;
  else
    ++s->failed;
  return out;
}

Result<SessionCounts> PredecryptService::close(const std::string& request_id,
                                               const std::string& who) {
  sweep();
  std::shared_ptr<Session> s;
  {
    std::lock_guard lock(mu_);
    auto it = sessions_.find(request_id);
    if (it == sessions_.end())
      return make_error(ErrorCode::kFailedPrecondition,
                        "no open pre-decryption session for request " + request_id);
    if (it->second->admin != who)
      return make_error(ErrorCode::kPermissionDenied, "the session of request " + request_id +
                                                          " belongs to " + it->second->admin);
    s = it->second;
    sessions_.erase(it);
  }
  const SessionCounts c = s->counts();
  KMSD_TRY(end(*s, "closed by " + who));
  return c;
}

}  // namespace kmsd::dr

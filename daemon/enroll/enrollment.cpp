#include "daemon/enroll/enrollment.hpp"

#include <openssl/evp.h>
#include <openssl/x509.h>

#include <algorithm>

#include <spdlog/spdlog.h>

#include "common/clock.hpp"
#include "daemon/ca/issuer.hpp"
#include "daemon/lifecycle/state_machine.hpp"
#include "daemon/lifecycle/store_state.hpp"
#include "daemon/provision/initializer.hpp"
#include "hsm/envelope.hpp"

namespace kmsd::enroll {

using lifecycle::Action;
using nlohmann::json;

namespace {

// One answer for an unknown user, a missing token and a wrong token: user ids cannot be probed.
constexpr const char* kNotValid =
    "the user id or the enrollment token is not valid; check both (the token is the 24-character "
    "code your administrator gave you), or ask your administrator for a new token";

constexpr int kSuperseded = 4;  // RFC 5280 CRLReason

constexpr const char* kUsedOrReplaced =
    "this enrollment token was used or replaced while the request was being processed; ask "
    "your administrator for a new token";

std::chrono::sys_seconds as_time(std::int64_t t) {
  return std::chrono::sys_seconds(std::chrono::seconds(t));
}

// What the store knows about a user and its token.
struct Facts {
  store::UserRecord user;
  std::optional<store::EnrollmentTokenRecord> token;
  lifecycle::UserState from = lifecycle::UserState::kNone;
  lifecycle::UserFacts facts;
  int depth = 0;
};

Result<std::optional<Facts>> read_facts(store::Store& store, const std::string& id) {
  KMSD_ASSIGN_OR_RETURN(auto user, store.find_user(id));
  if (!user) return std::optional<Facts>();
  Facts f;
  f.user = std::move(*user);
  f.from = lifecycle::from_store(f.user.state);
  KMSD_ASSIGN_OR_RETURN(f.token, store.find_enrollment_token(id));
  KMSD_ASSIGN_OR_RETURN(f.depth, store.key_history_depth(id));
  f.facts.has_key_history = f.depth > 0;
  f.facts.has_pending_token = f.token.has_value() && !f.token->used_at.has_value();
  if (f.facts.has_pending_token) f.facts.pending_token_issued_at = as_time(f.token->issued_at);
  return std::optional<Facts>(std::move(f));
}

policy::UserIdentity identity_of(const store::UserRecord& u) {
  policy::UserIdentity id;
  id.user_id = u.id;
  id.email = u.email;
  id.display_name = u.display_name;
  id.dn = u.dn.value_or("");
  return id;
}

// The usages of PROFILE's configuration that fit KEY: EC keys agree, RSA keys transport
// (RFC 5480, RFC 4055); signing usages fit both.
std::vector<std::string> usages_for(const std::vector<std::string>& allowed, EVP_PKEY* key) {
  const bool ec = EVP_PKEY_is_a(key, "EC");
  std::vector<std::string> out;
  for (const auto& u : allowed) {
    if (ec && (u == "keyEncipherment" || u == "dataEncipherment")) continue;
    if (!ec && u == "keyAgreement") continue;
    out.push_back(u);
  }
  return out;
}

std::string algorithm_name(EVP_PKEY* key) {
  if (EVP_PKEY_is_a(key, "EC")) {
    char group[64] = {0};
    std::size_t len = 0;
    if (EVP_PKEY_get_utf8_string_param(key, "group", group, sizeof group, &len) == 1) {
      std::string g(group, len);
      if (g == "prime256v1" || g == "P-256") return "ec-p256";
      if (g == "secp384r1" || g == "P-384") return "ec-p384";
      return "ec-" + g;
    }
    return "ec";
  }
  if (EVP_PKEY_is_a(key, "RSA")) return "rsa-" + std::to_string(EVP_PKEY_get_bits(key));
  return EVP_PKEY_get0_type_name(key) != nullptr ? EVP_PKEY_get0_type_name(key) : "unknown";
}

// PKCS#8 PrivateKeyInfo (i2d_PrivateKey would write SEC1 or PKCS#1, the type's own format).
Result<SecretBytes> pkcs8_der(EVP_PKEY* key) {
  std::unique_ptr<PKCS8_PRIV_KEY_INFO, decltype(&PKCS8_PRIV_KEY_INFO_free)> info(
      EVP_PKEY2PKCS8(key), &PKCS8_PRIV_KEY_INFO_free);
  if (!info) return ossl::crypto_error("encoding the encryption key as PKCS#8");
  unsigned char* buf = nullptr;
  int n = i2d_PKCS8_PRIV_KEY_INFO(info.get(), &buf);
  if (n <= 0) return ossl::crypto_error("encoding the encryption key as PKCS#8");
  SecretBytes out(std::span<const std::uint8_t>(buf, static_cast<std::size_t>(n)));
  OPENSSL_clear_free(buf, static_cast<std::size_t>(n));
  return out;
}

Result<ossl::EvpPkeyPtr> key_from_pkcs8(const SecretBytes& der) {
  const unsigned char* p = der.data();
  EVP_PKEY* key = d2i_AutoPrivateKey(nullptr, &p, static_cast<long>(der.size()));
  if (key == nullptr) return ossl::crypto_error("decoding an escrowed key");
  return ossl::EvpPkeyPtr(key);
}

bool same_certificate(X509* a, const store::CertificateRecord& rec) {
  auto der = ossl::x509_to_der(a);
  return der.ok() && *der == rec.der;
}

// The user's encryption certificate for KEY: the newest one whose public key is KEY.
Result<ossl::X509Ptr> certificate_for_key(store::Store& store, const std::string& user_id,
                                          EVP_PKEY* key) {
  KMSD_ASSIGN_OR_RETURN(auto certs, store.certificates_of_user(user_id));
  for (auto it = certs.rbegin(); it != certs.rend(); ++it) {
    if (it->kind != store::CertKind::kEncryption) continue;
    KMSD_ASSIGN_OR_RETURN(auto cert, ossl::x509_from_der(it->der));
    if (ca::public_key_matches(cert.get(), key)) return cert;
  }
  return make_error(ErrorCode::kNotFound,
                    "no encryption certificate of " + user_id + " matches an escrowed key");
}

}  // namespace

namespace {

// Length-prefixed fields, so no two different tuples give the same bytes.
void escrow_field(std::string& aad, const std::string& s) {
  aad += '\0';
  aad += std::to_string(s.size());
  aad += ':';
  aad += s;
}

std::span<const std::uint8_t> aad_bytes(const std::string& s) {
  return {reinterpret_cast<const std::uint8_t*>(s.data()), s.size()};
}

}  // namespace

std::string escrow_aad(const std::string& user_id, const std::string& key_id, int version) {
  std::string aad = "kmsd-escrow-v2";
  escrow_field(aad, user_id);
  escrow_field(aad, key_id);
  escrow_field(aad, std::to_string(version));
  return aad;
}

std::string escrow_aad(const std::string& user_id, const std::string& key_id, int version,
                       std::uint32_t master_version) {
  std::string aad = "kmsd-escrow-v1";
  escrow_field(aad, user_id);
  escrow_field(aad, key_id);
  escrow_field(aad, std::to_string(version));
  escrow_field(aad, std::to_string(master_version));
  return aad;
}

Result<SecretBytes> open_escrowed(hsm::Token& token, const store::KeyHistoryRecord& rec) {
  auto p = hsm::envelope::parse(rec.sealed_key);
  if (!p || p->master_version != rec.master_version)
    return make_error(ErrorCode::kCrypto, hsm::envelope::kOpenFailed);
  if (p->version == hsm::envelope::kVersion1)
    return token.open(rec.sealed_key, aad_bytes(escrow_aad(rec.user_id, rec.key_id, rec.version,
                                                           rec.master_version)));
  return token.open(rec.sealed_key, aad_bytes(escrow_aad(rec.user_id, rec.key_id, rec.version)));
}

Result<store::Bytes> rewrap_escrowed(hsm::Token& token, const store::KeyHistoryRecord& rec,
                                     std::uint32_t master_version) {
  auto p = hsm::envelope::parse(rec.sealed_key);
  if (!p || p->master_version != rec.master_version)
    return make_error(ErrorCode::kCrypto, hsm::envelope::kOpenFailed);
  if (p->version != hsm::envelope::kVersion1) return token.rewrap(rec.sealed_key, master_version);
  KMSD_ASSIGN_OR_RETURN(auto der, open_escrowed(token, rec));
  return token.seal(der.span(), aad_bytes(escrow_aad(rec.user_id, rec.key_id, rec.version)),
                    master_version);
}

EnrollmentService::EnrollmentService(store::Store& store, hsm::Token& token, audit::AuditLog& audit,
                                     const policy::PolicyInForce& policy,
                                     std::function<Settings()> settings,
                                     std::function<ossl::X509Ptr()> ca_certificate)
    : store_(store),
      token_(token),
      audit_(audit),
      policy_(policy),
      settings_(std::move(settings)),
      ca_certificate_(std::move(ca_certificate)),
      tokens_(token) {}

// ---- the work shared by enrollment and renewal -----------------------------------------------

namespace {

// Everything made before the store transaction: certificates signed and the new key sealed.
// Token work happens here, outside the store's lock, so that enrollments run in parallel.
struct Prepared {
  ossl::X509Ptr signing;
  ossl::X509Ptr encryption;
  ossl::EvpPkeyPtr encryption_key;  // the new key, or the current one re-certified
  SecretBytes encryption_pkcs8;     // ENCRYPTION_KEY as PKCS#8 DER, encoded once, delivered as is
  bool new_key = false;
  int key_version = 0;  // the new key's version (new_key), else the re-certified key's
  std::string key_id;
  std::string algorithm;
  std::uint32_t master_version = 1;
  store::Bytes sealed_key;
};

}  // namespace

namespace detail {

struct Issuing {
  store::Store& store;
  hsm::Token& token;
  const policy::PolicyCheck& policy;
  const Settings& settings;
  X509* ca;
  const EVP_MD* md;

  Result<std::uint32_t> master_version() { return provision::master_key_version(store); }

  // Policy check, then a certificate of PROFILE for KEY, signed on the token.
  // SPKI: KEY's SubjectPublicKeyInfo, certified as it is (no encoding of KEY).
  Result<ossl::X509Ptr> certify(policy::RequestProfile profile, const store::UserRecord& user,
                                const X509_NAME* subject, EVP_PKEY* key, const X509_PUBKEY* spki,
                                int version, std::chrono::seconds validity) {
    const auto& cfg = policy.config();
    policy::CertificateRequest creq;
    creq.profile = profile;
    creq.x509_version = version;
    creq.public_key = key;
    creq.validity = validity;
    creq.subject = subject;
    ca::IssueRequest ireq;
    ireq.profile = ca::Profile::kUser;
    ireq.subject = subject;
    ireq.public_key = key;
    ireq.public_key_info = spki;
    // The certificates are stored, sent (PEM, CMP) and hashed, never verified with here.
    ireq.decode_public_key = false;
    ireq.validity = validity;
    ireq.x509_version = version;
    if (version != 1) {
      const auto& usages =
          profile == policy::RequestProfile::kSigning ? cfg.signing : cfg.encryption;
      creq.email = user.email;
      creq.key_usage = usages_for(usages.key_usage, key);
      creq.extended_key_usage = usages.extended_key_usage;
      if (profile == policy::RequestProfile::kEncryption && creq.key_usage.empty() &&
          !usages.key_usage.empty())
        return make_error(ErrorCode::kInvalidArgument,
                          "policy.encryption.key_usage allows no usage for a " +
                              algorithm_name(key) +
                              " key (EC keys need keyAgreement, RSA keys keyEncipherment); "
                              "change enrollment.encryption_key_type or the policy");
      ireq.email = creq.email;
      ireq.key_usage = creq.key_usage;
      ireq.extended_key_usage = creq.extended_key_usage;
      ireq.crl_url = settings.crl_url;
      ireq.ocsp_url = settings.ocsp_url;
    }
    KMSD_TRY(policy.admit(creq));
    return ca::issue_on_token(ireq, ca, token, md);
  }

  // Certificates and (for a new key) the sealed key for USER. RENEW_SAME: re-certify the
  // newest escrowed key instead of generating one.
  Result<Prepared> prepare(const store::UserRecord& user, int depth, const SigningRequest& req,
                           bool reuse_current_key) {
    if (req.public_key == nullptr)
      return make_error(ErrorCode::kInvalidArgument, "the request carries no public key");
    const auto validity = req.validity.value_or(settings.validity);
    KMSD_ASSIGN_OR_RETURN(auto subject, policy.subject_for(identity_of(user)));
    KMSD_TRY(policy.admit_identity(identity_of(user)));
    Prepared p;
    const X509_PUBKEY* sign_spki = req.public_key_info;
    ca::X509PubkeyPtr sign_spki_owner;
    if (sign_spki == nullptr) {
      KMSD_ASSIGN_OR_RETURN(sign_spki_owner, ca::subject_public_key_info(req.public_key));
      sign_spki = sign_spki_owner.get();
    }
    KMSD_ASSIGN_OR_RETURN(
        p.signing, certify(policy::RequestProfile::kSigning, user, subject.get(), req.public_key,
                           sign_spki, req.x509_version, validity));
    KMSD_ASSIGN_OR_RETURN(p.master_version, master_version());
    if (reuse_current_key && depth > 0) {
      KMSD_ASSIGN_OR_RETURN(auto history, store.key_history(user.id));
      const auto& rec = history.back();
      KMSD_ASSIGN_OR_RETURN(auto der, open_escrowed(token, rec));
      KMSD_ASSIGN_OR_RETURN(p.encryption_key, key_from_pkcs8(der));
      p.encryption_pkcs8 = std::move(der);
      p.key_version = rec.version;
      p.key_id = rec.key_id;
      p.algorithm = rec.algorithm;
    } else {
      KMSD_ASSIGN_OR_RETURN(p.encryption_key, ca::generate_key(settings.encryption_key_type));
      p.new_key = true;
      p.key_version = depth + 1;
      KMSD_ASSIGN_OR_RETURN(auto id, token.random(16));
      p.key_id = ossl::hex(id.span());
      p.algorithm = hsm::to_string(settings.encryption_key_type);
      KMSD_ASSIGN_OR_RETURN(p.encryption_pkcs8, pkcs8_der(p.encryption_key.get()));
      KMSD_ASSIGN_OR_RETURN(
          p.sealed_key,
          token.seal(p.encryption_pkcs8.span(),
                     as_bytes(escrow_aad(user.id, p.key_id, p.key_version)), p.master_version));
    }
    KMSD_ASSIGN_OR_RETURN(auto enc_spki, ca::subject_public_key_info(p.encryption_key.get()));
    KMSD_ASSIGN_OR_RETURN(
        p.encryption, certify(policy::RequestProfile::kEncryption, user, subject.get(),
                              p.encryption_key.get(), enc_spki.get(), req.x509_version, validity));
    return p;
  }

  static std::span<const std::uint8_t> as_bytes(const std::string& s) {
    return {reinterpret_cast<const std::uint8_t*>(s.data()), s.size()};
  }

  // Records P for USER inside the caller's transaction.
  Status record(const store::UserRecord& user, Prepared& p, std::int64_t now) {
    auto sign_rec = provision::certificate_record(p.signing.get(), store::CertKind::kSigning);
    sign_rec.user_id = user.id;
    KMSD_TRY(store.insert_certificate(sign_rec));
    auto enc_rec = provision::certificate_record(p.encryption.get(), store::CertKind::kEncryption);
    enc_rec.user_id = user.id;
    KMSD_TRY(store.insert_certificate(enc_rec));
    if (p.new_key) {
      // A master-key rotation began while this enrollment ran: the key is recorded under the
      // current master key (re-wrapped here, in the transaction), so that no record recorded
      // after the switch needs the old key (kmsctl master-key retire relies on it).
      KMSD_ASSIGN_OR_RETURN(std::uint32_t current, master_version());
      if (current != p.master_version) {
        KMSD_ASSIGN_OR_RETURN(p.sealed_key, token.rewrap(p.sealed_key, current));
        p.master_version = current;
      }
      store::KeyHistoryRecord k;
      k.user_id = user.id;
      k.version = p.key_version;
      k.key_id = p.key_id;
      k.algorithm = p.algorithm;
      k.master_version = p.master_version;
      k.sealed_key = p.sealed_key;
      k.cert_serial = enc_rec.serial;
      k.created_at = now;
      KMSD_TRY(store.append_key_history(k));
    }
    return {};
  }

  // Opens the escrowed keys of USER from version FROM on, each with its certificate.
  Result<std::vector<DeliveredKey>> open_keys(const std::string& user_id, int from) {
    KMSD_ASSIGN_OR_RETURN(auto history, store.key_history(user_id));
    std::vector<DeliveredKey> out;
    for (const auto& rec : history) {
      if (rec.version < from) continue;
      DeliveredKey k;
      k.version = rec.version;
      k.key_id = rec.key_id;
      k.algorithm = rec.algorithm;
      KMSD_ASSIGN_OR_RETURN(k.pkcs8_der, open_escrowed(token, rec));
      KMSD_ASSIGN_OR_RETURN(auto key, key_from_pkcs8(k.pkcs8_der));
      KMSD_ASSIGN_OR_RETURN(k.certificate, certificate_for_key(store, user_id, key.get()));
      out.push_back(std::move(k));
    }
    return out;
  }
};

}  // namespace detail

namespace {

// The key delivered with P's encryption certificate (a fresh one; nothing to open).
Result<DeliveredKey> delivered(const Prepared& p) {
  DeliveredKey k;
  k.version = p.key_version;
  k.key_id = p.key_id;
  k.algorithm = p.algorithm;
  // The DER made when the key was generated (or opened), and the certificate shared: neither
  // is encoded or parsed again.
  k.pkcs8_der = SecretBytes(p.encryption_pkcs8.span());
  if (X509_up_ref(p.encryption.get()) != 1) return ossl::crypto_error("sharing a certificate");
  k.certificate.reset(p.encryption.get());
  return k;
}

}  // namespace

// ---- enrollment ---------------------------------------------------------------------------------

Result<Enrollment> EnrollmentService::enroll(const std::string& user_id, const SecretBytes& token,
                                             const SigningRequest& req) {
  const Settings s = settings_();
  const std::int64_t now = unix_now();
  KMSD_ASSIGN_OR_RETURN(auto facts, read_facts(store_, user_id));
  if (!facts || !facts->token) return make_error(ErrorCode::kPermissionDenied, kNotValid);
  const auto& t = *facts->token;
  lifecycle::SealedToken sealed{t.sealed, as_time(t.expires_at)};
  KMSD_ASSIGN_OR_RETURN(auto check, tokens_.check(token, sealed, user_id, as_time(now),
                                                  static_cast<std::uint32_t>(t.failed_attempts),
                                                  s.max_failed_attempts, t.used_at.has_value()));
  switch (check.verdict) {
    case lifecycle::Verdict::kAccepted:
      break;
    case lifecycle::Verdict::kMismatch: {
      KMSD_TRY(record_failed_attempt(user_id));
      return make_error(ErrorCode::kPermissionDenied, kNotValid);
    }
    case lifecycle::Verdict::kMalformed:
      return make_error(ErrorCode::kInvalidArgument, check.message);
    default:
      return make_error(ErrorCode::kPermissionDenied, check.message);
  }
  return enroll_locked(user_id, req, now, &t.sealed);
}

Result<SecretBytes> EnrollmentService::pending_token(const std::string& user_id) {
  const Settings s = settings_();
  const std::int64_t now = unix_now();
  KMSD_ASSIGN_OR_RETURN(auto t, store_.find_enrollment_token(user_id));
  if (!t || t->used_at) return make_error(ErrorCode::kPermissionDenied, kNotValid);
  if (static_cast<std::uint32_t>(t->failed_attempts) >= s.max_failed_attempts)
    return make_error(ErrorCode::kPermissionDenied,
                      "this enrollment token is locked after too many wrong attempts; ask your "
                      "administrator to reissue it");
  if (t->expires_at <= now)
    return make_error(ErrorCode::kPermissionDenied, "this enrollment token expired on " +
                                                        utc_text(t->expires_at) +
                                                        "; ask your administrator to reissue it");
  lifecycle::SealedToken sealed{t->sealed, as_time(t->expires_at)};
  return tokens_.reveal(sealed, user_id);
}

Status EnrollmentService::record_failed_attempt(const std::string& user_id) {
  Status st = store_.transaction([&]() -> Status {
    KMSD_ASSIGN_OR_RETURN(int failures, store_.record_token_failure(user_id));
    return audit_.append("user:" + user_id, "user.enroll.failed",
                         {{"user", user_id}, {"failed_attempts", failures}});
  });
  if (!st.ok() && st.error().code == ErrorCode::kNotFound) return {};
  return st;
}

Result<Enrollment> EnrollmentService::enroll_verified(const std::string& user_id,
                                                      const SigningRequest& req) {
  return enroll_locked(user_id, req, unix_now(), nullptr);
}

Result<Enrollment> EnrollmentService::enroll_locked(const std::string& user_id,
                                                    const SigningRequest& req, std::int64_t now,
                                                    const store::Bytes* checked) {
  const Settings s = settings_();
  auto policy = policy_.current();
  auto ca = ca_certificate_();
  const EVP_MD* md = ca::digest_by_name(s.digest);
  if (!ca || md == nullptr)
    return make_error(ErrorCode::kUnavailable, "the CA is not available (is kmsd unsealed?)");
  detail::Issuing issuing{store_, token_, *policy, s, ca.get(), md};

  // 1. Decide and do the token work outside the store's lock.
  KMSD_ASSIGN_OR_RETURN(auto before, read_facts(store_, user_id));
  if (!before || !before->token) return make_error(ErrorCode::kPermissionDenied, kNotValid);
  // The token checked by the caller must be the one still pending: a concurrent enrollment
  // may have spent it, or an administrator replaced it, since it was checked.
  const store::Bytes sealed = checked != nullptr ? *checked : before->token->sealed;
  if (before->token->used_at || before->token->sealed != sealed)
    return make_error(ErrorCode::kPermissionDenied, kUsedOrReplaced);
  {
    auto d = lifecycle::transition(before->from, Action::kEnroll, before->facts);
    if (!d.ok()) return d.error();
  }
  KMSD_ASSIGN_OR_RETURN(auto prepared, issuing.prepare(before->user, before->depth, req, false));

  // 2. Record everything and spend the token in one transaction.
  Enrollment out;
  out.user_id = user_id;
  bool revoked_any = false;
  // Grouped: enrollments that finish together share one COMMIT (the function below touches
  // only the store, the token and the audit log).
  Status st = store_.grouped_transaction([&]() -> Status {
    KMSD_ASSIGN_OR_RETURN(auto f, read_facts(store_, user_id));
    // The token checked in step 1 must be the one still pending: not used meanwhile by a
    // concurrent enrollment, not replaced by a reissue, and the history not grown.
    if (!f || !f->token || f->token->sealed != sealed || f->token->used_at ||
        f->depth != before->depth)
      return make_error(ErrorCode::kPermissionDenied, kUsedOrReplaced);
    auto d = lifecycle::transition(f->from, Action::kEnroll, f->facts);
    if (!d.ok()) return d.error();
    json superseded = json::array();
    if (d->deliver_key_history) {
      // A recovery hands the key history back because the user lost their keys: the signing
      // certificates from before it must not act for the user any more (fetch that history,
      // renew), so they are revoked as superseded.
      KMSD_ASSIGN_OR_RETURN(auto certs, store_.certificates_of_user(user_id));
      for (const auto& c : certs) {
        if (c.kind != store::CertKind::kSigning || c.revoked_at) continue;
        KMSD_TRY(store_.revoke_certificate(c.serial, now, kSuperseded));
        superseded.push_back(c.serial);
      }
    }
    revoked_any = !superseded.empty();
    KMSD_TRY(issuing.record(f->user, prepared, now));
    KMSD_TRY(store_.mark_token_used(user_id, now));
    store::UserRecord user = f->user;
    user.state = store::UserState::kActive;
    user.updated_at = now;
    user.last_enrolled_at = now;
    user.keys_from_version = d->deliver_key_history ? 1 : prepared.key_version;
    KMSD_TRY(store_.update_user(user));
    out.recovered = d->deliver_key_history;
    return audit_.append("user:" + user_id, out.recovered ? "user.recover.enroll" : "user.enroll",
                         {{"user", user_id},
                          {"channel", req.channel},
                          {"previous_state", lifecycle::to_string(f->from)},
                          {"token_purpose", store::to_string(f->token->purpose)},
                          {"signing_serial", ca::serial_hex(prepared.signing.get())},
                          {"encryption_serial", ca::serial_hex(prepared.encryption.get())},
                          {"key_version", prepared.key_version},
                          {"key_id", prepared.key_id},
                          {"superseded_signing_certificates", superseded},
                          {"requested_subject", req.requested_subject}});
  });
  if (!st.ok()) return st.error();
  if (revoked_any && on_revocation_) on_revocation_();

  if (out.recovered) {
    KMSD_ASSIGN_OR_RETURN(out.keys, issuing.open_keys(user_id, 1));
  } else {
    KMSD_ASSIGN_OR_RETURN(auto k, delivered(prepared));
    out.keys.push_back(std::move(k));
  }
  out.signing_certificate = std::move(prepared.signing);
  out.encryption_certificate = std::move(prepared.encryption);
  spdlog::info("enrolled {} over {}: signing {} encryption {} (key v{}{})", user_id, req.channel,
               ca::serial_hex(out.signing_certificate.get()),
               ca::serial_hex(out.encryption_certificate.get()), prepared.key_version,
               out.recovered ? ", key history delivered" : "");
  return out;
}

// ---- the certificate holder ---------------------------------------------------------------------

Result<Holder> EnrollmentService::holder_of(X509* cert) {
  auto refuse = [](const std::string& why) -> Error {
    return make_error(ErrorCode::kPermissionDenied,
                      "the certificate presented " + why +
                          "; use your current signing certificate from kmsd, or ask your "
                          "administrator");
  };
  if (cert == nullptr) return refuse("is missing");
  auto ca = ca_certificate_();
  if (!ca)
    return make_error(ErrorCode::kUnavailable, "the CA is not available (is kmsd unsealed?)");
  if (!ca::signed_by(cert, ca.get())) return refuse("was not issued by this KMS");
  const std::string serial = ca::serial_hex(cert);
  KMSD_ASSIGN_OR_RETURN(auto rec, store_.find_certificate(serial));
  if (!rec || !same_certificate(cert, *rec) || !rec->user_id)
    return refuse("(serial " + serial + ") is not a user certificate of this KMS");
  if (rec->kind != store::CertKind::kSigning)
    return refuse("(serial " + serial + ") is an encryption certificate, not a signing one");
  if (rec->revoked_at) return refuse("(serial " + serial + ") has been revoked");
  const std::int64_t now = unix_now();
  if (rec->not_after <= now) return refuse("(serial " + serial + ") has expired");
  KMSD_ASSIGN_OR_RETURN(auto user, store_.find_user(*rec->user_id));
  if (!user || user->state != store::UserState::kActive)
    return refuse("belongs to a user who is not active (state " +
                  std::string(user ? store::to_string(user->state) : "unknown") + ")");
  return Holder{user->id, serial};
}

Result<Enrollment> EnrollmentService::renew(X509* current, const SigningRequest& req) {
  KMSD_ASSIGN_OR_RETURN(auto holder, holder_of(current));
  const Settings s = settings_();
  auto policy = policy_.current();
  auto ca = ca_certificate_();
  const EVP_MD* md = ca::digest_by_name(s.digest);
  if (!ca || md == nullptr)
    return make_error(ErrorCode::kUnavailable, "the CA is not available (is kmsd unsealed?)");
  detail::Issuing issuing{store_, token_, *policy, s, ca.get(), md};
  const std::int64_t now = unix_now();

  KMSD_ASSIGN_OR_RETURN(auto before, read_facts(store_, holder.user_id));
  if (!before) return make_error(ErrorCode::kNotFound, "no user " + holder.user_id);
  {
    auto d = lifecycle::transition(before->from, Action::kRenew, before->facts);
    if (!d.ok()) return d.error();
  }
  const bool same = s.renew_encryption_key == config::RenewKey::kSame;
  KMSD_ASSIGN_OR_RETURN(auto prepared, issuing.prepare(before->user, before->depth, req, same));

  Status st = store_.grouped_transaction([&]() -> Status {
    KMSD_ASSIGN_OR_RETURN(auto f, read_facts(store_, holder.user_id));
    if (!f || f->depth != before->depth)
      return make_error(ErrorCode::kFailedPrecondition,
                        "the user's keys changed while the renewal was being processed; renew "
                        "again");
    auto d = lifecycle::transition(f->from, Action::kRenew, f->facts);
    if (!d.ok()) return d.error();
    KMSD_TRY(issuing.record(f->user, prepared, now));
    store::UserRecord user = f->user;
    user.updated_at = now;
    if (!user.keys_from_version) user.keys_from_version = prepared.key_version;
    KMSD_TRY(store_.update_user(user));
    return audit_.append("user:" + holder.user_id, "user.renew",
                         {{"user", holder.user_id},
                          {"channel", req.channel},
                          {"previous_signing_serial", holder.serial},
                          {"signing_serial", ca::serial_hex(prepared.signing.get())},
                          {"encryption_serial", ca::serial_hex(prepared.encryption.get())},
                          {"new_key", prepared.new_key},
                          {"key_version", prepared.key_version}});
  });
  if (!st.ok()) return st.error();
  Enrollment out;
  out.user_id = holder.user_id;
  KMSD_ASSIGN_OR_RETURN(auto k, delivered(prepared));
  out.keys.push_back(std::move(k));
  out.signing_certificate = std::move(prepared.signing);
  out.encryption_certificate = std::move(prepared.encryption);
  return out;
}

Result<std::vector<DeliveredKey>> EnrollmentService::escrowed_keys(const std::string& user_id) {
  const Settings s = settings_();
  auto policy = policy_.current();
  detail::Issuing issuing{store_, token_, *policy, s, nullptr, nullptr};
  return issuing.open_keys(user_id, 1);
}

Result<std::vector<DeliveredKey>> EnrollmentService::keys_for(X509* cert) {
  KMSD_ASSIGN_OR_RETURN(auto holder, holder_of(cert));
  KMSD_ASSIGN_OR_RETURN(auto user, store_.find_user(holder.user_id));
  if (!user || !user->keys_from_version)
    return make_error(ErrorCode::kNotFound, "no escrowed key is waiting for " + holder.user_id);
  const Settings s = settings_();
  auto policy = policy_.current();
  detail::Issuing issuing{store_, token_, *policy, s, nullptr, nullptr};
  KMSD_ASSIGN_OR_RETURN(auto keys, issuing.open_keys(holder.user_id, *user->keys_from_version));
  Status st = store_.transaction([&]() -> Status {
    json versions = json::array();
    for (const auto& k : keys) versions.push_back(k.version);
    return audit_.append(
        "user:" + holder.user_id, "user.keys.fetch",
        {{"user", holder.user_id}, {"signing_serial", holder.serial}, {"key_versions", versions}});
  });
  if (!st.ok()) return st.error();
  return keys;
}

Status EnrollmentService::revoke_by_holder(X509* cert, int reason) {
  KMSD_ASSIGN_OR_RETURN(auto holder, holder_of(cert));
  const std::int64_t now = unix_now();
  Status st = store_.transaction([&]() -> Status {
    KMSD_ASSIGN_OR_RETURN(auto f, read_facts(store_, holder.user_id));
    if (!f) return make_error(ErrorCode::kNotFound, "no user " + holder.user_id);
    KMSD_TRY(store_.revoke_certificate(holder.serial, now, reason));
    KMSD_ASSIGN_OR_RETURN(auto certs, store_.certificates_of_user(holder.user_id));
    const bool signing_left = std::any_of(certs.begin(), certs.end(), [&](const auto& c) {
      return c.kind == store::CertKind::kSigning && !c.revoked_at && c.not_after > now;
    });
    json revoked = json::array({holder.serial});
    std::string to = store::to_string(f->user.state);
    if (!signing_left) {
      // Without a signing certificate the user can no longer act: the state machine's revoke.
      auto d = lifecycle::transition(f->from, Action::kRevoke, f->facts);
      if (!d.ok()) return d.error();
      for (const auto& c : certs) {
        if (c.revoked_at) continue;
        KMSD_TRY(store_.revoke_certificate(c.serial, now, reason));
        revoked.push_back(c.serial);
      }
      store::UserRecord user = f->user;
      user.state = store::UserState::kRevoked;
      user.updated_at = now;
      KMSD_TRY(store_.update_user(user));
      to = "revoked";
    }
    return audit_.append("user:" + holder.user_id, "user.revoke.self",
                         {{"user", holder.user_id},
                          {"reason", reason},
                          {"revoked_certificates", revoked},
                          {"state", to}});
  });
  if (!st.ok()) return st;
  if (on_revocation_) on_revocation_();
  return {};
}

const char* const kTokenNotValid = kNotValid;

}  // namespace kmsd::enroll

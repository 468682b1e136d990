#include "daemon/revocation/revocation.hpp"

#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/ocsp.h>
#include <openssl/x509v3.h>
#include <spdlog/spdlog.h>

#include <charconv>
#include <ctime>

#include "common/clock.hpp"
#include "common/files.hpp"
#include "daemon/ca/issuer.hpp"

namespace kmsd::revocation {

namespace {

using ossl::crypto_error;
using ossl::Deleter;

using X509CrlPtr = std::unique_ptr<X509_CRL, Deleter<X509_CRL_free>>;
using X509RevokedPtr = std::unique_ptr<X509_REVOKED, Deleter<X509_REVOKED_free>>;
using Asn1TimePtr = std::unique_ptr<ASN1_TIME, Deleter<ASN1_TIME_free>>;
using Asn1EnumeratedPtr = std::unique_ptr<ASN1_ENUMERATED, Deleter<ASN1_ENUMERATED_free>>;
using AuthorityKeyIdPtr = std::unique_ptr<AUTHORITY_KEYID, Deleter<AUTHORITY_KEYID_free>>;
using ossl::OcspBasicRespPtr;
using ossl::OcspCertIdPtr;
using ossl::OcspRequestPtr;
using ossl::OcspResponsePtr;

constexpr int kReasonUnspecified = 0;

std::int64_t asn1_time_unix(const ASN1_TIME* t) {
  struct tm tm {};
  if (t == nullptr || ASN1_TIME_to_tm(t, &tm) != 1) return 0;
  return static_cast<std::int64_t>(timegm(&tm));
}

Asn1TimePtr asn1_time(std::int64_t unix_seconds) {
  return Asn1TimePtr(ASN1_TIME_set(nullptr, static_cast<time_t>(unix_seconds)));
}

// The AKI of CRLs: the CA's subject key identifier, or (a CA certificate without one) the
// SHA-1 of its public key, RFC 5280 4.2.1.2 method (1), which is what SKIs usually are.
Status add_authority_key_id(X509_CRL* crl, X509* ca) {
  AuthorityKeyIdPtr akid(AUTHORITY_KEYID_new());
  if (!akid) return crypto_error("building the CRL's authority key identifier");
  const ASN1_OCTET_STRING* ski = X509_get0_subject_key_id(ca);
  if (ski != nullptr) {
    akid->keyid = ASN1_OCTET_STRING_dup(ski);
  } else {
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    if (X509_pubkey_digest(ca, EVP_sha1(), digest, &len) == 1) {
      akid->keyid = ASN1_OCTET_STRING_new();
      if (akid->keyid != nullptr &&
          ASN1_OCTET_STRING_set(akid->keyid, digest, static_cast<int>(len)) != 1) {
        ASN1_OCTET_STRING_free(akid->keyid);
        akid->keyid = nullptr;
      }
    }
  }
  if (akid->keyid == nullptr ||
      X509_CRL_add1_ext_i2d(crl, NID_authority_key_identifier, akid.get(), 0, 0) != 1)
    return crypto_error("adding the authority key identifier to the CRL");
  return {};
}

Status add_entry(X509_CRL* crl, const store::CertificateRecord& rec) {
  BIGNUM* raw = nullptr;
  if (rec.serial.empty() ||
      BN_hex2bn(&raw, rec.serial.c_str()) != static_cast<int>(rec.serial.size())) {
    BN_free(raw);
    ERR_clear_error();
    return make_error(ErrorCode::kStore, "the store holds a certificate with serial '" +
                                             rec.serial + "', which is not hexadecimal");
  }
  ossl::BignumPtr bn(raw);
  ossl::Asn1IntegerPtr serial(BN_to_ASN1_INTEGER(bn.get(), nullptr));
  X509RevokedPtr entry(X509_REVOKED_new());
  Asn1TimePtr when = asn1_time(rec.revoked_at.value_or(0));
  if (!serial || !entry || !when || X509_REVOKED_set_serialNumber(entry.get(), serial.get()) != 1 ||
      X509_REVOKED_set_revocationDate(entry.get(), when.get()) != 1)
    return crypto_error("adding certificate " + rec.serial + " to the CRL");
  int reason = rec.revocation_reason.value_or(kReasonUnspecified);
  if (reason != kReasonUnspecified) {
    Asn1EnumeratedPtr code(ASN1_ENUMERATED_new());
    if (!code || ASN1_ENUMERATED_set(code.get(), reason) != 1 ||
        X509_REVOKED_add1_ext_i2d(entry.get(), NID_crl_reason, code.get(), 0, 0) != 1)
      return crypto_error("adding the revocation reason of certificate " + rec.serial +
                          " to the CRL");
  }
  if (X509_CRL_add0_revoked(crl, entry.get()) != 1)
    return crypto_error("adding certificate " + rec.serial + " to the CRL");
  entry.release();  // owned by the CRL now
  return {};
}

// ENTRIES: how many revoked certificates it lists.
Result<X509CrlPtr> build_crl(store::Store& store, X509* ca, std::uint64_t number,
                             std::int64_t this_update, std::int64_t next_update,
                             std::size_t& entries) {
  X509CrlPtr crl(X509_CRL_new());
  Asn1TimePtr last = asn1_time(this_update), next = asn1_time(next_update);
  ossl::Asn1IntegerPtr crl_number(ASN1_INTEGER_new());
  if (!crl || !last || !next || !crl_number ||
      X509_CRL_set_version(crl.get(), X509_CRL_VERSION_2) != 1 ||
      X509_CRL_set_issuer_name(crl.get(), X509_get_subject_name(ca)) != 1 ||
      X509_CRL_set1_lastUpdate(crl.get(), last.get()) != 1 ||
      X509_CRL_set1_nextUpdate(crl.get(), next.get()) != 1 ||
      ASN1_INTEGER_set_uint64(crl_number.get(), number) != 1 ||
      X509_CRL_add1_ext_i2d(crl.get(), NID_crl_number, crl_number.get(), 0, 0) != 1)
    return crypto_error("building the CRL");
  KMSD_TRY(add_authority_key_id(crl.get(), ca));
  KMSD_TRY(store.for_each_revoked_certificate([&](const store::CertificateRecord& rec) -> Status {
    KMSD_TRY(add_entry(crl.get(), rec));
    ++entries;
    return {};
  }));
  if (X509_CRL_sort(crl.get()) != 1) return crypto_error("sorting the CRL");
  return crl;
}

Result<std::vector<std::uint8_t>> crl_to_der(X509_CRL* crl) {
  int n = i2d_X509_CRL(crl, nullptr);
  if (n <= 0) return crypto_error("encoding the CRL");
  std::vector<std::uint8_t> der(static_cast<std::size_t>(n));
  unsigned char* p = der.data();
  i2d_X509_CRL(crl, &p);
  return der;
}

Status write_crl_file(const std::filesystem::path& path, const std::vector<std::uint8_t>& der) {
  std::string_view bytes(reinterpret_cast<const char*>(der.data()), der.size());
  auto st = files::write_atomic(path, bytes, 0644, /*overwrite=*/true);
  if (!st.ok())
    return st.error().context("the CRL is in the store, but writing the CRL file failed");
  return {};
}

// ---- OCSP ----

std::vector<std::uint8_t> encode(OCSP_RESPONSE* resp) {
  if (resp == nullptr) return {};
  int n = i2d_OCSP_RESPONSE(resp, nullptr);
  if (n <= 0) return {};
  std::vector<std::uint8_t> out(static_cast<std::size_t>(n));
  unsigned char* p = out.data();
  i2d_OCSP_RESPONSE(resp, &p);
  return out;
}

std::vector<std::uint8_t> status_only(int status) {
  ERR_clear_error();
  OcspResponsePtr resp(OCSP_response_create(status, nullptr));
  return encode(resp.get());
}

// True when CID names CA as issuer: issuerNameHash and issuerKeyHash computed with CID's own
// hash algorithm. An algorithm we do not know cannot match.
bool names_this_ca(OCSP_CERTID* cid, X509* ca) {
  ASN1_OBJECT* md_oid = nullptr;
  if (OCSP_id_get0_info(nullptr, &md_oid, nullptr, nullptr, cid) != 1 || md_oid == nullptr)
    return false;
  const EVP_MD* md = EVP_get_digestbyobj(md_oid);
  if (md == nullptr) return false;
  OcspCertIdPtr ours(OCSP_cert_to_id(md, nullptr, ca));
  bool match = ours && OCSP_id_issuer_cmp(ours.get(), cid) == 0;
  ERR_clear_error();
  return match;
}

// Lower-case hex as ca::serial_hex writes it; "" for a serial no certificate can have.
std::string serial_of(OCSP_CERTID* cid) {
  ASN1_INTEGER* serial = nullptr;
  if (OCSP_id_get0_info(nullptr, nullptr, nullptr, &serial, cid) != 1 || serial == nullptr)
    return {};
  ossl::BignumPtr bn(ASN1_INTEGER_to_BN(serial, nullptr));
  if (!bn || BN_is_negative(bn.get()) || BN_is_zero(bn.get())) {
    ERR_clear_error();
    return {};
  }
  std::vector<std::uint8_t> bytes(static_cast<std::size_t>(BN_num_bytes(bn.get())));
  BN_bn2bin(bn.get(), bytes.data());
  return ossl::hex(bytes);
}

struct SingleAnswer {
  OCSP_CERTID* cid = nullptr;  // owned by the request
  int status = V_OCSP_CERTSTATUS_UNKNOWN;
  int reason = OCSP_REVOKED_STATUS_NOSTATUS;
  std::int64_t revoked_at = 0;
};

// The unsigned BasicOCSPResponse. Built afresh for each signing attempt: OCSP_basic_sign
// replaces (and leaks) the responder id of a response signed before.
Result<OcspBasicRespPtr> build_basic(const std::vector<SingleAnswer>& answers, OCSP_REQUEST* req,
                                     std::int64_t now, std::chrono::minutes validity) {
  OcspBasicRespPtr bs(OCSP_BASICRESP_new());
  Asn1TimePtr this_update = asn1_time(now);
  Asn1TimePtr next_update;
  if (validity.count() > 0) next_update = asn1_time(now + validity.count() * 60);
  if (!bs || !this_update || (validity.count() > 0 && !next_update))
    return crypto_error("building the OCSP response");
  for (const auto& a : answers) {
    Asn1TimePtr revoked;
    if (a.status == V_OCSP_CERTSTATUS_REVOKED) {
      revoked = asn1_time(a.revoked_at);
      if (!revoked) return crypto_error("building the OCSP response");
    }
    if (OCSP_basic_add1_status(bs.get(), a.cid, a.status, a.reason, revoked.get(),
                               this_update.get(), next_update.get()) == nullptr)
      return crypto_error("adding a certificate status to the OCSP response");
  }
  if (OCSP_copy_nonce(bs.get(), req) <= 0)
    return crypto_error("copying the request's nonce into the OCSP response");
  return bs;
}

bool token_cannot_sign_now(ErrorCode code) {
  return code == ErrorCode::kFailedPrecondition || code == ErrorCode::kUnavailable ||
         code == ErrorCode::kUnauthenticated || code == ErrorCode::kPinLocked;
}

std::vector<std::uint8_t> try_later(const Error& why) {
  // Sealed is a normal state: do not fill the log with it.
  if (why.code == ErrorCode::kFailedPrecondition)
    spdlog::debug("OCSP: answered tryLater: {}", why.message);
  else
    spdlog::warn("OCSP: answered tryLater: {}", why.message);
  return status_only(OCSP_RESPONSE_STATUS_TRYLATER);
}

std::vector<std::uint8_t> internal_error(const Error& why) {
  spdlog::error("OCSP: answered internalError: {}", why.message);
  return status_only(OCSP_RESPONSE_STATUS_INTERNALERROR);
}

}  // namespace

Revocation::Revocation(store::Store& store, hsm::Token& token, std::function<Settings()> settings,
                       std::function<ossl::X509Ptr()> ca_certificate)
    : store_(store),
      token_(token),
      settings_(std::move(settings)),
      ca_certificate_(std::move(ca_certificate)) {}

Result<std::optional<Revocation::Current>> Revocation::current() {
  std::lock_guard lock(current_mu_);
  if (current_) return current_;
  KMSD_ASSIGN_OR_RETURN(auto text, store_.get_setting(kSettingCrlDer));
  if (!text) return std::optional<Current>{};
  auto der = ossl::from_hex(*text);
  if (!der.ok())
    return make_error(ErrorCode::kStore,
                      std::string("the store setting '") + kSettingCrlDer +
                          "' is damaged (not hex); the next CRL refresh replaces it");
  const unsigned char* p = der->data();
  X509CrlPtr crl(d2i_X509_CRL(nullptr, &p, static_cast<long>(der->size())));
  if (!crl) {
    ERR_clear_error();
    return make_error(ErrorCode::kStore,
                      std::string("the store setting '") + kSettingCrlDer +
                          "' is damaged (not a DER CRL); the next CRL refresh replaces it");
  }
  Current c;
  const STACK_OF(X509_REVOKED)* revoked = X509_CRL_get_REVOKED(crl.get());
  c.entries = revoked == nullptr ? 0 : static_cast<std::size_t>(sk_X509_REVOKED_num(revoked));
  c.this_update = asn1_time_unix(X509_CRL_get0_lastUpdate(crl.get()));
  c.next_update = asn1_time_unix(X509_CRL_get0_nextUpdate(crl.get()));
  c.der = std::move(*der);
  current_ = std::move(c);
  return current_;
}

Status Revocation::regenerate() {
  std::lock_guard lock(generate_mu_);
  return regenerate_locked();
}

Status Revocation::regenerate_locked() {
  const Settings settings = settings_();
  const EVP_MD* md = ca::digest_by_name(settings.digest);
  if (md == nullptr)
    return make_error(ErrorCode::kConfig,
                      "CRL digest '" + settings.digest + "' is not one of sha256, sha384, sha512");
  if (settings.crl_next_update.count() <= 0)
    return make_error(ErrorCode::kConfig,
                      "the CRL's next-update interval must be at least one hour");
  ossl::X509Ptr ca = ca_certificate_();
  if (!ca)
    return make_error(ErrorCode::kFailedPrecondition,
                      "the CA certificate is not known yet (initialization has not finished); "
                      "no CRL can be made");

  KMSD_ASSIGN_OR_RETURN(auto number_text, store_.get_setting(kSettingCrlNumber));
  std::uint64_t number = 1;
  if (number_text) {
    std::uint64_t last = 0;
    auto [end, ec] =
        std::from_chars(number_text->data(), number_text->data() + number_text->size(), last);
    if (ec != std::errc{} || end != number_text->data() + number_text->size())
      return make_error(ErrorCode::kStore, std::string("the store setting '") + kSettingCrlNumber +
                                               "' is not a number: '" + *number_text + "'");
    number = last + 1;
  }

  const std::int64_t this_update = unix_now();
  const std::int64_t next_update =
      this_update +
      std::chrono::duration_cast<std::chrono::seconds>(settings.crl_next_update).count();
  std::size_t entries = 0;
  KMSD_ASSIGN_OR_RETURN(auto crl,
                        build_crl(store_, ca.get(), number, this_update, next_update, entries));

  // A fresh token key per CRL; one retry with another fresh key (the token layer recovers
  // lost sessions on the way).
  {
    KMSD_ASSIGN_OR_RETURN(auto key, token_.ca_private_key());
    if (X509_CRL_sign(crl.get(), key.get(), md) <= 0) {
      Error first = crypto_error("signing the CRL with the CA key on the token");
      KMSD_ASSIGN_OR_RETURN(auto fresh, token_.ca_private_key());
      if (X509_CRL_sign(crl.get(), fresh.get(), md) <= 0) {
        spdlog::warn("CRL: first signature failed: {}", first.message);
        return crypto_error("signing the CRL with the CA key on the token (retried once)");
      }
    }
  }
  // Never publish a CRL that relying parties would reject: the CA certificate in use must
  // belong to the key on the token.
  if (X509_CRL_verify(crl.get(), X509_get0_pubkey(ca.get())) != 1) {
    ERR_clear_error();
    return make_error(ErrorCode::kCrypto,
                      "the CRL signed on the token does not verify with the CA certificate: the "
                      "CA certificate in use does not belong to the token's CA key");
  }
  KMSD_ASSIGN_OR_RETURN(auto der, crl_to_der(crl.get()));

  KMSD_TRY(store_.transaction([&]() -> Status {
    KMSD_TRY(store_.put_setting(kSettingCrlNumber, std::to_string(number)));
    return store_.put_setting(kSettingCrlDer, ossl::hex(der));
  }));
  {
    std::lock_guard lock(current_mu_);
    current_ = Current{der, this_update, next_update, entries};
  }
  if (!settings.crl_path.empty()) KMSD_TRY(write_crl_file(settings.crl_path, der));
  return {};
}

Status Revocation::refresh_if_due() {
  return refresh_if_due(
      std::chrono::time_point_cast<std::chrono::seconds>(std::chrono::system_clock::now()));
}

Status Revocation::refresh_if_due(std::chrono::sys_seconds now) {
  std::lock_guard lock(generate_mu_);
  auto loaded = current();
  if (!loaded.ok()) {
    // A damaged stored CRL is replaced (a store that cannot be read fails regenerate too).
    spdlog::warn("CRL: {}", loaded.error().message);
    return regenerate_locked();
  }
  const std::optional<Current>& cur = *loaded;
  if (!cur) return regenerate_locked();
  const std::int64_t t = now.time_since_epoch().count();
  if (t >= cur->this_update + (cur->next_update - cur->this_update) / 2) return regenerate_locked();
  KMSD_ASSIGN_OR_RETURN(std::size_t revoked, store_.count_revoked_certificates());
  if (revoked != cur->entries) return regenerate_locked();
  const Settings settings = settings_();
  std::error_code ec;
  if (!settings.crl_path.empty() && !std::filesystem::exists(settings.crl_path, ec))
    return write_crl_file(settings.crl_path, cur->der);
  return {};
}

Result<std::vector<std::uint8_t>> Revocation::crl_der() {
  KMSD_ASSIGN_OR_RETURN(auto cur, current());
  if (!cur)
    return make_error(ErrorCode::kUnavailable,
                      "no CRL has been made yet; it is made when kmsd is first unsealed");
  return std::move(cur->der);
}

std::vector<std::uint8_t> Revocation::respond(std::span<const std::uint8_t> request_der) {
  ERR_clear_error();
  const unsigned char* p = request_der.data();
  OcspRequestPtr req(d2i_OCSP_REQUEST(nullptr, &p, static_cast<long>(request_der.size())));
  if (!req || p != request_der.data() + request_der.size() ||
      OCSP_request_onereq_count(req.get()) <= 0)
    return status_only(OCSP_RESPONSE_STATUS_MALFORMEDREQUEST);

  ossl::X509Ptr ca = ca_certificate_();
  if (!ca)
    return try_later(make_error(ErrorCode::kUnavailable, "the CA certificate is not known yet"));
  const Settings settings = settings_();
  const EVP_MD* md = ca::digest_by_name(settings.digest);
  if (md == nullptr)
    return internal_error(make_error(ErrorCode::kConfig, "OCSP digest '" + settings.digest +
                                                             "' is not one of sha256, sha384, "
                                                             "sha512"));

  const int count = OCSP_request_onereq_count(req.get());
  std::vector<SingleAnswer> answers;
  answers.reserve(static_cast<std::size_t>(count));
  bool any_ours = false;
  for (int i = 0; i < count; ++i) {
    SingleAnswer a;
    a.cid = OCSP_onereq_get0_id(OCSP_request_onereq_get0(req.get(), i));
    if (a.cid == nullptr) return status_only(OCSP_RESPONSE_STATUS_MALFORMEDREQUEST);
    if (names_this_ca(a.cid, ca.get())) {
      any_ours = true;
      std::string serial = serial_of(a.cid);
      if (!serial.empty()) {
        auto rec = store_.find_certificate(serial);
        if (!rec.ok()) return internal_error(rec.error().context("looking up a certificate"));
        if (*rec) {
          const store::CertificateRecord& r = **rec;
          if (r.revoked_at) {
            a.status = V_OCSP_CERTSTATUS_REVOKED;
            a.revoked_at = *r.revoked_at;
            int reason = r.revocation_reason.value_or(kReasonUnspecified);
            if (reason != kReasonUnspecified) a.reason = reason;
          } else {
            a.status = V_OCSP_CERTSTATUS_GOOD;
          }
        }
      }
    }
    answers.push_back(a);
  }
  // Not authoritative for anything asked (RFC 5019 2.2.3).
  if (!any_ours) return status_only(OCSP_RESPONSE_STATUS_UNAUTHORIZED);

  const std::int64_t now = unix_now();
  auto sign_once = [&](EVP_PKEY* key) -> Result<OcspBasicRespPtr> {
    KMSD_ASSIGN_OR_RETURN(auto bs, build_basic(answers, req.get(), now, settings.ocsp_validity));
    if (OCSP_basic_sign(bs.get(), ca.get(), key, md, nullptr, OCSP_NOCERTS | OCSP_RESPID_KEY) <= 0)
      return crypto_error("signing the OCSP response with the CA key on the token");
    return bs;
  };

  auto key = token_.ca_private_key();
  if (!key.ok()) {
    if (token_cannot_sign_now(key.error().code)) return try_later(key.error());
    return internal_error(key.error());
  }
  if (X509_check_private_key(ca.get(), key->get()) != 1) {
    ERR_clear_error();
    return internal_error(make_error(ErrorCode::kCrypto,
                                     "the CA certificate in use does not belong to the token's "
                                     "CA key"));
  }
  auto signed_bs = sign_once(key->get());
  if (!signed_bs.ok()) {
    // A token key fetched before a lost session fails cleanly: fetch a fresh one, once.
    auto fresh = token_.ca_private_key();
    if (!fresh.ok()) {
      if (token_cannot_sign_now(fresh.error().code)) return try_later(fresh.error());
      return internal_error(fresh.error());
    }
    signed_bs = sign_once(fresh->get());
    if (!signed_bs.ok()) return try_later(signed_bs.error());
  }
  OcspResponsePtr resp(OCSP_response_create(OCSP_RESPONSE_STATUS_SUCCESSFUL, signed_bs->get()));
  if (!resp) return internal_error(crypto_error("encoding the OCSP response"));
  return encode(resp.get());
}

}  // namespace kmsd::revocation

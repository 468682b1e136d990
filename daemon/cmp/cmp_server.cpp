#include "daemon/cmp/cmp_server.hpp"

#include <openssl/cmp.h>
#include <openssl/cmp_util.h>
#include <openssl/cmperr.h>
#include <openssl/crmf.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>
#include <spdlog/spdlog.h>

#include <cctype>
#include <mutex>
#include <optional>
#include <unordered_map>

#include "common/clock.hpp"
#include "daemon/ca/issuer.hpp"
#include "daemon/cmp/asn1.hpp"
#include "daemon/provision/initializer.hpp"

namespace kmsd::cmp {
namespace {

// PKIBody CHOICE tags (RFC 4210 5.1.2), as OSSL_CMP_MSG_get_bodytype() returns them; OpenSSL
// 3.0 keeps its own names for them private.
constexpr int kIr = 0;
constexpr int kIp = 1;
constexpr int kCr = 2;
constexpr int kCp = 3;
constexpr int kP10cr = 4;
constexpr int kKur = 7;
constexpr int kKup = 8;
constexpr int kRr = 11;
constexpr int kGenm = 21;
constexpr int kError = 23;
constexpr int kCertConf = 24;
constexpr int kPollReq = 25;

std::string body_name(int type) {
  switch (type) {
    case kIr:
      return "ir";
    case kCr:
      return "cr";
    case kP10cr:
      return "p10cr";
    case kKur:
      return "kur";
    case kRr:
      return "rr";
    case kGenm:
      return "genm";
    case kError:
      return "error";
    case kCertConf:
      return "certConf";
    case kPollReq:
      return "pollReq";
    default:
      return "PKIBody " + std::to_string(type);
  }
}

using CmpCtxPtr = std::unique_ptr<OSSL_CMP_CTX, ossl::Deleter<OSSL_CMP_CTX_free>>;
using SrvCtxPtr = std::unique_ptr<OSSL_CMP_SRV_CTX, ossl::Deleter<OSSL_CMP_SRV_CTX_free>>;
using CmpMsgPtr = std::unique_ptr<OSSL_CMP_MSG, ossl::Deleter<OSSL_CMP_MSG_free>>;

// OpenSSL's CMP log lines go to the debug log; the server writes its own line per request.
int log_to_spdlog(const char*, const char*, int, OSSL_CMP_severity level, const char* msg) {
  if (level <= OSSL_CMP_LOG_INFO) spdlog::debug("cmp (openssl): {}", msg != nullptr ? msg : "");
  return 1;
}

CmpCtxPtr new_cmp_ctx() {
  CmpCtxPtr ctx(OSSL_CMP_CTX_new(nullptr, nullptr));
  if (ctx) OSSL_CMP_CTX_set_log_cb(ctx.get(), log_to_spdlog);
  return ctx;
}

SrvCtxPtr new_srv_ctx() {
  SrvCtxPtr srv(OSSL_CMP_SRV_CTX_new(nullptr, nullptr));
  if (srv) OSSL_CMP_CTX_set_log_cb(OSSL_CMP_SRV_CTX_get0_cmp_ctx(srv.get()), log_to_spdlog);
  return srv;
}

ossl::X509Ptr ref(X509* cert) {
  if (cert == nullptr || X509_up_ref(cert) != 1) return nullptr;
  return ossl::X509Ptr(cert);
}

// A new stack holding one more reference to CERT (for OpenSSL to free).
STACK_OF(X509) * stack_of(X509* cert) {
  STACK_OF(X509)* sk = sk_X509_new_null();
  if (sk == nullptr) return nullptr;
  if (X509_up_ref(cert) != 1 || sk_X509_push(sk, cert) <= 0) {
    sk_X509_pop_free(sk, X509_free);
    return nullptr;
  }
  return sk;
}

Reply text_reply(int status, std::string text) {
  Reply r;
  r.http_status = status;
  r.content_type = "text/plain; charset=utf-8";
  text += "\n";
  r.body.assign(text.begin(), text.end());
  return r;
}

Reply encode(const OSSL_CMP_MSG* msg) {
  unsigned char* der = nullptr;
  const int n = i2d_OSSL_CMP_MSG(msg, &der);
  if (n <= 0 || der == nullptr) {
    ERR_clear_error();
    return text_reply(500, "kmsd could not encode its CMP response; see the kmsd log");
  }
  Reply r;
  r.body.assign(der, der + n);
  OPENSSL_free(der);
  return r;
}

// A refusal: PKIStatus rejection with this failInfo bit and sentence.
struct Refusal {
  int fail_bit = OSSL_CMP_PKIFAILUREINFO_badRequest;
  std::string text;
};

OSSL_CMP_PKISI* status_info(int status, int fail_bit, const std::string& text) {
  return OSSL_CMP_STATUSINFO_new(status, fail_bit < 0 ? 0 : 1 << fail_bit,
                                 text.empty() ? nullptr : text.c_str());
}

// The refusal for an error of the enrollment service. Its messages are written for the person
// at the client; internal faults are not passed on (they go to the log).
Refusal refusal_for(const Error& e, std::string_view what) {
  switch (e.code) {
    case ErrorCode::kInvalidArgument:
      return {OSSL_CMP_PKIFAILUREINFO_badCertTemplate, e.message};
    case ErrorCode::kPermissionDenied:
    case ErrorCode::kUnauthenticated:
    case ErrorCode::kNotFound:
    case ErrorCode::kFailedPrecondition:
    case ErrorCode::kAlreadyExists:
      return {OSSL_CMP_PKIFAILUREINFO_notAuthorized, e.message};
    case ErrorCode::kUnavailable:
    case ErrorCode::kPinLocked:
      return {OSSL_CMP_PKIFAILUREINFO_systemUnavail,
              "the CA cannot complete the " + std::string(what) +
                  " right now because its key token is not available (kmsd may be sealed); "
                  "try again later"};
    default:
      return {OSSL_CMP_PKIFAILUREINFO_systemFailure,
              "the CA could not complete the " + std::string(what) +
                  " because of an internal error; the administrator finds the details in the "
                  "kmsd log"};
  }
}

// The enrollment token as users may type it: as shown, without hyphens, in lower case.
std::vector<SecretBytes> token_variants(const SecretBytes& display) {
  std::vector<SecretBytes> out;
  auto add = [&out](SecretBytes s) {
    for (const auto& o : out)
      if (constant_time_equal(o.span(), s.span())) return;
    out.push_back(std::move(s));
  };
  SecretBytes plain;
  for (std::uint8_t c : display.span())
    if (c != '-') plain.append({&c, 1});
  auto lower = [](const SecretBytes& s) {
    SecretBytes l = s.clone();
    for (std::size_t i = 0; i < l.size(); ++i)
      l.data()[i] = static_cast<std::uint8_t>(std::tolower(l.data()[i]));
    return l;
  };
  add(display.clone());
  add(plain.clone());
  add(lower(display));
  add(lower(plain));
  return out;
}

bool printable_id(std::string_view s) {
  if (s.empty() || s.size() > 256) return false;
  for (unsigned char c : s)
    if (c < 0x20 || c == 0x7f) return false;
  return true;
}

// Whether KEY can sign right now (a token key goes stale after a lost token session).
bool can_sign(EVP_PKEY* key, const EVP_MD* md) {
  static constexpr unsigned char kProbe[] = "kmsd CMP responder key check";
  ossl::EvpMdCtxPtr c(EVP_MD_CTX_new());
  std::size_t len = 0;
  bool ok = c && EVP_DigestSignInit(c.get(), nullptr, md, nullptr, key) == 1 &&
            EVP_DigestSign(c.get(), nullptr, &len, kProbe, sizeof kProbe) == 1;
  if (ok) {
    std::vector<unsigned char> sig(len);
    ok = EVP_DigestSign(c.get(), sig.data(), &len, kProbe, sizeof kProbe) == 1;
  }
  ERR_clear_error();
  return ok;
}

}  // namespace

struct CmpServer::Impl {
  Impl(enroll::EnrollmentService& s, hsm::Token& t, store::Store& st,
       std::function<ossl::X509Ptr()> ca, std::function<std::string()> d, Options o)
      : service(s),
        token(t),
        store(st),
        ca_certificate(std::move(ca)),
        digest(std::move(d)),
        options(o) {}

  enum class Auth { kMac, kSignature };

  // One CMP transaction (ir .. certConf, kur .. certConf, rr): its own OpenSSL server context,
  // which keeps the transactionID, the nonces and the secret or the pinned signer.
  struct Transaction {
    Impl* impl = nullptr;
    std::mutex mu;  // one message of a transaction at a time
    SrvCtxPtr srv;
    Auth auth = Auth::kMac;
    std::string user_id;
    ossl::X509Ptr holder;  // kSignature: the certificate that signs the requests
    std::optional<int> revocation_reason;
    ossl::X509Ptr issued;     // the certificate issued in this transaction
    bool issued_now = false;  // ... by the message being processed
    bool closed = false;
    std::chrono::steady_clock::time_point expires;
  };

  // Who sent a request that starts a transaction.
  struct Credentials {
    Auth auth = Auth::kMac;
    std::string user_id;
    SecretBytes secret;    // kMac: the token text exactly as the client keyed its MAC
    ossl::X509Ptr holder;  // kSignature
  };
  struct Authentication {
    std::optional<Refusal> refusal;
    Credentials credentials;
  };

  // What signs responses: the responder certificate and a fresh CA key from the token.
  struct Signer {
    ossl::X509Ptr ca;
    ossl::X509Ptr cert;
    ossl::EvpPkeyPtr key;
  };

  Reply handle(std::span<const std::uint8_t> der);
  Reply start(const OSSL_CMP_MSG* req, MessageView& view, const std::string& tid, int type);
  Reply resume(const OSSL_CMP_MSG* req, const std::string& tid, int type);
  Reply run(const std::shared_ptr<Transaction>& t, const OSSL_CMP_MSG* req);
  Reply refuse(const OSSL_CMP_MSG* req, const Refusal& r);
  Authentication authenticate(const OSSL_CMP_MSG* req, MessageView& view, int type);
  Result<ossl::X509Ptr> find_signer(const OSSL_CMP_MSG* req, const MessageView& view);
  void forget(const std::string& tid, const std::shared_ptr<Transaction>& t);

  const EVP_MD* md() const {
    const EVP_MD* m = ca::digest_by_name(digest());
    return m != nullptr ? m : EVP_sha256();
  }
  Result<ossl::EvpPkeyPtr> fresh_key();
  Result<ossl::X509Ptr> responder_certificate(X509* ca);
  Result<Signer> signer();
  bool install(OSSL_CMP_CTX* ctx, const Signer& s);
  void refresh_key(OSSL_CMP_CTX* ctx);

  OSSL_CMP_PKISI* certify(Transaction& t, OSSL_CMP_CTX* ctx, const OSSL_CMP_MSG* req,
                          const OSSL_CRMF_MSG* crm, const X509_REQ* p10cr, X509** cert_out,
                          STACK_OF(X509) * *chain_out, STACK_OF(X509) * *ca_pubs);
  OSSL_CMP_PKISI* revoke(Transaction& t, OSSL_CMP_CTX* ctx, const X509_NAME* issuer,
                         const ASN1_INTEGER* serial);
  int confirm(Transaction& t, const ASN1_OCTET_STRING* cert_hash, const OSSL_CMP_PKISI* si);

  // ---- OpenSSL server callbacks of a transaction (custom context: Transaction*) ----
  static OSSL_CMP_PKISI* on_cert_request(OSSL_CMP_SRV_CTX* srv, const OSSL_CMP_MSG* req, int,
                                         const OSSL_CRMF_MSG* crm, const X509_REQ* p10cr,
                                         X509** cert_out, STACK_OF(X509) * *chain_out,
                                         STACK_OF(X509) * *ca_pubs) noexcept;
  static OSSL_CMP_PKISI* on_rr(OSSL_CMP_SRV_CTX* srv, const OSSL_CMP_MSG* req,
                               const X509_NAME* issuer, const ASN1_INTEGER* serial) noexcept;
  static int on_cert_conf(OSSL_CMP_SRV_CTX* srv, const OSSL_CMP_MSG* req, int cert_req_id,
                          const ASN1_OCTET_STRING* cert_hash, const OSSL_CMP_PKISI* si) noexcept;
  static void on_error(OSSL_CMP_SRV_CTX* srv, const OSSL_CMP_MSG* req, const OSSL_CMP_PKISI* si,
                       const ASN1_INTEGER* code, const OSSL_CMP_PKIFREETEXT* details) noexcept;

  // ---- callbacks of a refusal (custom context: const Refusal*) ----
  static OSSL_CMP_PKISI* refuse_cert_request(OSSL_CMP_SRV_CTX* srv, const OSSL_CMP_MSG*, int,
                                             const OSSL_CRMF_MSG*, const X509_REQ*, X509**,
                                             STACK_OF(X509) **, STACK_OF(X509) **) noexcept;
  static OSSL_CMP_PKISI* refuse_rr(OSSL_CMP_SRV_CTX* srv, const OSSL_CMP_MSG*, const X509_NAME*,
                                   const ASN1_INTEGER*) noexcept;
  static int refuse_genm(OSSL_CMP_SRV_CTX* srv, const OSSL_CMP_MSG*,
                         const STACK_OF(OSSL_CMP_ITAV) *, STACK_OF(OSSL_CMP_ITAV) **) noexcept;
  static int refuse_cert_conf(OSSL_CMP_SRV_CTX* srv, const OSSL_CMP_MSG*, int,
                              const ASN1_OCTET_STRING*, const OSSL_CMP_PKISI*) noexcept;

  enroll::EnrollmentService& service;
  hsm::Token& token;
  store::Store& store;
  std::function<ossl::X509Ptr()> ca_certificate;
  std::function<std::string()> digest;
  Options options;

  std::mutex responder_mu;
  ossl::X509Ptr responder;     // the CMP responder certificate in use
  ossl::X509Ptr responder_ca;  // the CA certificate it was issued under

  mutable std::mutex table_mu;
  std::unordered_map<std::string, std::shared_ptr<Transaction>> open;  // by transactionID hex
};

// ---------------------------------------------------------------------------------------------
// Signing responses

Result<ossl::EvpPkeyPtr> CmpServer::Impl::fresh_key() {
  // A key fetched now may still fail once if the token lost its session since the last call
  // (the token layer recovers on the next call): fetch again and retry once.
  Error last{ErrorCode::kUnavailable, "the CA key on the token cannot sign"};
  for (int attempt = 0; attempt < 2; ++attempt) {
    auto key = token.ca_private_key();
    if (!key.ok()) {
      last = key.error();
      continue;
    }
    if (can_sign(key->get(), md())) return std::move(key).value();
  }
  return last;
}

Result<ossl::X509Ptr> CmpServer::Impl::responder_certificate(X509* ca) {
  std::lock_guard lk(responder_mu);
  const std::int64_t now = unix_now();
  const std::int64_t margin = std::min<std::int64_t>(86400, options.responder_validity.count() / 2);
  if (responder && responder_ca && X509_cmp(responder_ca.get(), ca) == 0 &&
      ca::not_after_unix(responder.get()) - now > margin)
    return ref(responder.get());

  KMSD_ASSIGN_OR_RETURN(auto pub, token.ca_public_key());
  if (!ca::public_key_matches(ca, pub.get()))
    return make_error(ErrorCode::kFailedPrecondition,
                      "the CA key on the token does not match the CA certificate");
  KMSD_ASSIGN_OR_RETURN(auto subject, ca::parse_subject("/OU=kmsd/CN=kmsd CMP responder"));
  ca::IssueRequest req;
  req.profile = ca::Profile::kUser;
  req.subject = subject.get();
  req.public_key = pub.get();
  req.validity = options.responder_validity;
  req.key_usage = {"digitalSignature"};
  KMSD_ASSIGN_OR_RETURN(auto cert, ca::issue_on_token(req, ca, token, md()));
  KMSD_TRY(store.insert_certificate(
      provision::certificate_record(cert.get(), store::CertKind::kServer)));
  spdlog::info("cmp: issued the CMP responder certificate {} (valid until {})",
               ca::serial_hex(cert.get()), utc_text(ca::not_after_unix(cert.get())));
  responder = ref(cert.get());
  responder_ca = ref(ca);
  return cert;
}

Result<CmpServer::Impl::Signer> CmpServer::Impl::signer() {
  Signer s;
  s.ca = ca_certificate();
  if (!s.ca)
    return make_error(ErrorCode::kUnavailable,
                      "the CA certificate is not available (kmsd is sealed)");
  KMSD_ASSIGN_OR_RETURN(s.cert, responder_certificate(s.ca.get()));
  KMSD_ASSIGN_OR_RETURN(s.key, fresh_key());
  return s;
}

bool CmpServer::Impl::install(OSSL_CMP_CTX* ctx, const Signer& s) {
  ossl::X509StackPtr extra(stack_of(s.ca.get()));
  const bool ok =
      extra && OSSL_CMP_CTX_set1_cert(ctx, s.cert.get()) == 1 &&
      OSSL_CMP_CTX_set1_pkey(ctx, s.key.get()) == 1 &&
      OSSL_CMP_CTX_set1_extraCertsOut(ctx, extra.get()) == 1 &&
      OSSL_CMP_CTX_set_option(ctx, OSSL_CMP_OPT_DIGEST_ALGNID, EVP_MD_get_type(md())) == 1;
  if (!ok) spdlog::warn("cmp: setting up the response signature: {}", ossl::drain_errors());
  return ok;
}

void CmpServer::Impl::refresh_key(OSSL_CMP_CTX* ctx) {
  // The service's token work may have recovered a lost session, which leaves a token key
  // fetched before it unusable: take a fresh one for the response signature.
  auto key = fresh_key();
  if (key.ok() && OSSL_CMP_CTX_set1_pkey(ctx, key->get()) == 1) return;
  spdlog::warn("cmp: no fresh CA key for the response signature: {}",
               key.ok() ? ossl::drain_errors() : key.error().message);
}

// ---------------------------------------------------------------------------------------------
// Requests

Reply CmpServer::Impl::handle(std::span<const std::uint8_t> der) {
  if (der.size() > options.max_request_bytes)
    return text_reply(413, "the CMP request is larger than kmsd accepts (" +
                               std::to_string(options.max_request_bytes) + " bytes)");
  const unsigned char* p = der.data();
  CmpMsgPtr req(der.empty() ? nullptr
                            : d2i_OSSL_CMP_MSG(nullptr, &p, static_cast<long>(der.size())));
  if (!req || p != der.data() + der.size()) {
    ERR_clear_error();
    return text_reply(400,
                      "the request body is not a DER-encoded CMP message (RFC 4210 PKIMessage "
                      "sent as application/pkixcmp, RFC 6712)");
  }
  const int type = OSSL_CMP_MSG_get_bodytype(req.get());
  auto view = view_message(der, type);
  if (!view.ok())
    return text_reply(400, "the CMP message header cannot be read: " + view.error().message);
  const ASN1_OCTET_STRING* tid_os =
      OSSL_CMP_HDR_get0_transactionID(OSSL_CMP_MSG_get0_header(req.get()));
  if (tid_os == nullptr || ASN1_STRING_length(tid_os) == 0)
    return refuse(req.get(), {OSSL_CMP_PKIFAILUREINFO_badRequest,
                              "the request has no transactionID (RFC 4210 5.1.1)"});
  const std::string tid = ossl::hex(
      {ASN1_STRING_get0_data(tid_os), static_cast<std::size_t>(ASN1_STRING_length(tid_os))});

  switch (type) {
    case kIr:
    case kCr:
    case kP10cr:
    case kKur:
    case kRr:
      return start(req.get(), *view, tid, type);
    case kGenm:
      return refuse(req.get(), {OSSL_CMP_PKIFAILUREINFO_badRequest,
                                "general messages (genm) are not supported by this server: "
                                "enroll with ir (or cr, p10cr), renew with kur, revoke with rr"});
    default:
      return resume(req.get(), tid, type);
  }
}

CmpServer::Impl::Authentication CmpServer::Impl::authenticate(const OSSL_CMP_MSG* req,
                                                              MessageView& view, int type) {
  Authentication a;
  if (view.protection_nid == NID_undef) {
    a.refusal = Refusal{OSSL_CMP_PKIFAILUREINFO_badMessageCheck,
                        "this server accepts only protected requests: enroll with your user id "
                        "and enrollment token (openssl cmp -ref USER -secret pass:TOKEN), renew "
                        "and revoke with your current signing certificate (-cert, -key)"};
    return a;
  }
  const bool enrolling = type == kIr || type == kCr || type == kP10cr;

  if (view.protection_nid == NID_id_PasswordBasedMAC) {
    if (!enrolling) {
      a.refusal = Refusal{OSSL_CMP_PKIFAILUREINFO_notAuthorized,
                          body_name(type) +
                              " must be signed with your current signing certificate (openssl "
                              "cmp -cert CERT -key KEY); the enrollment token only enrolls"};
      return a;
    }
    if (!view.sender_kid || view.sender_kid->empty()) {
      a.refusal = Refusal{OSSL_CMP_PKIFAILUREINFO_badRequest,
                          "the request does not say which user it is for: give your user id "
                          "with openssl cmp -ref USER"};
      return a;
    }
    const std::string& user = *view.sender_kid;
    if (!printable_id(user)) {
      a.refusal = Refusal{OSSL_CMP_PKIFAILUREINFO_badRequest,
                          "the sender reference (-ref) is not a user id"};
      return a;
    }
    // An unknown user, a spent token and a wrong token get one answer, so that user ids
    // cannot be probed.
    const Refusal not_valid{OSSL_CMP_PKIFAILUREINFO_badMessageCheck, enroll::kTokenNotValid};
    auto pending = service.pending_token(user);
    if (!pending.ok()) {
      spdlog::info("cmp: {} for user '{}' refused: {}", body_name(type), user,
                   pending.error().message);
      a.refusal = pending.error().message == enroll::kTokenNotValid
                      ? not_valid
                      : refusal_for(pending.error(), "enrollment");
      return a;
    }
    for (auto& candidate : token_variants(*pending)) {
      CmpCtxPtr check = new_cmp_ctx();
      if (!check) break;
      const bool verified =
          OSSL_CMP_CTX_set1_secretValue(check.get(), candidate.data(),
                                        static_cast<int>(candidate.size())) == 1 &&
          OSSL_CMP_validate_msg(check.get(), req) == 1;
      ERR_clear_error();
      if (verified) {
        a.credentials.auth = Auth::kMac;
        a.credentials.user_id = user;
        a.credentials.secret = std::move(candidate);
        return a;
      }
    }
    if (auto st = service.record_failed_attempt(user); !st.ok())
      spdlog::warn("cmp: recording a failed token attempt for user '{}': {}", user,
                   st.error().message);
    spdlog::info("cmp: {} for user '{}' refused: the enrollment token did not match",
                 body_name(type), user);
    a.refusal = not_valid;
    return a;
  }

  // Signature: kur and rr by the holder of a signing certificate of this CA.
  if (enrolling) {
    a.refusal = Refusal{OSSL_CMP_PKIFAILUREINFO_notAuthorized,
                        body_name(type) +
                            " must be protected with your enrollment token (openssl cmp -ref "
                            "USER -secret pass:TOKEN); to renew a certificate, use kur"};
    return a;
  }
  auto holder = find_signer(req, view);
  if (!holder.ok()) {
    spdlog::info("cmp: {} refused: {}", body_name(type), holder.error().message);
    a.refusal = Refusal{holder.error().code == ErrorCode::kUnavailable
                            ? OSSL_CMP_PKIFAILUREINFO_systemUnavail
                            : OSSL_CMP_PKIFAILUREINFO_badMessageCheck,
                        holder.error().message};
    return a;
  }
  auto who = service.holder_of(holder->get());
  if (!who.ok()) {
    spdlog::info("cmp: {} by certificate {} refused: {}", body_name(type),
                 ca::serial_hex(holder->get()), who.error().message);
    a.refusal = refusal_for(who.error(), body_name(type));
    return a;
  }
  a.credentials.auth = Auth::kSignature;
  a.credentials.user_id = who->user_id;
  a.credentials.holder = std::move(holder).value();
  return a;
}

Result<ossl::X509Ptr> CmpServer::Impl::find_signer(const OSSL_CMP_MSG* req,
                                                   const MessageView& view) {
  auto ca = ca_certificate();
  if (!ca)
    return make_error(ErrorCode::kUnavailable,
                      "the CA certificate is not available (kmsd is sealed); try again later");
  ossl::X509StorePtr trusted(X509_STORE_new());
  if (!trusted || X509_STORE_add_cert(trusted.get(), ca.get()) != 1)
    return ossl::crypto_error("building the trust store");
  // The client puts its certificate in extraCerts. Take the one whose key verifies the
  // message and that chains to this CA; a handful of candidates is plenty.
  const int n = std::min(sk_X509_num(view.extra_certs.get()), 8);
  for (int i = 0; i < n; ++i) {
    X509* candidate = sk_X509_value(view.extra_certs.get(), i);
    CmpCtxPtr check = new_cmp_ctx();
    const bool ok = check && OSSL_CMP_CTX_set1_srvCert(check.get(), candidate) == 1 &&
                    OSSL_CMP_validate_msg(check.get(), req) == 1 &&
                    OSSL_CMP_validate_cert_path(check.get(), trusted.get(), candidate) == 1;
    ERR_clear_error();
    if (ok) return ref(candidate);
  }
  return make_error(ErrorCode::kPermissionDenied,
                    "the request's signature does not verify with a certificate issued by this "
                    "CA: sign kur and rr with your current kmsd signing certificate and its key "
                    "(openssl cmp -cert CERT -key KEY)");
}

Reply CmpServer::Impl::start(const OSSL_CMP_MSG* req, MessageView& view, const std::string& tid,
                             int type) {
  auto a = authenticate(req, view, type);
  if (a.refusal) return refuse(req, *a.refusal);

  auto t = std::make_shared<Transaction>();
  t->impl = this;
  t->auth = a.credentials.auth;
  t->user_id = a.credentials.user_id;
  t->holder = std::move(a.credentials.holder);
  t->revocation_reason = view.revocation_reason;
  t->srv = new_srv_ctx();
  OSSL_CMP_CTX* ctx = t->srv ? OSSL_CMP_SRV_CTX_get0_cmp_ctx(t->srv.get()) : nullptr;
  bool ok = ctx != nullptr &&
            OSSL_CMP_SRV_CTX_init(t->srv.get(), t.get(), on_cert_request, on_rr, nullptr, on_error,
                                  on_cert_conf, nullptr) == 1 &&
            OSSL_CMP_SRV_CTX_set_grant_implicit_confirm(t->srv.get(), 1) == 1;
  if (ok && t->auth == Auth::kMac) {
    const auto& secret = a.credentials.secret;
    ok = OSSL_CMP_CTX_set1_secretValue(ctx, secret.data(), static_cast<int>(secret.size())) == 1 &&
         OSSL_CMP_CTX_set1_referenceValue(ctx,
                                          reinterpret_cast<const unsigned char*>(t->user_id.data()),
                                          static_cast<int>(t->user_id.size())) == 1;
  } else if (ok) {
    // Every later message of the transaction must be signed by the same certificate.
    ok = OSSL_CMP_CTX_set1_srvCert(ctx, t->holder.get()) == 1;
  }
  if (!ok) {
    spdlog::error("cmp: setting up a server context: {}", ossl::drain_errors());
    return refuse(req, {OSSL_CMP_PKIFAILUREINFO_systemFailure,
                        "the CA could not set up this transaction; try again later"});
  }

  bool full = false;
  {
    std::lock_guard lk(table_mu);
    const auto now = std::chrono::steady_clock::now();
    std::erase_if(open, [now](const auto& kv) { return kv.second->expires < now; });
    full = open.size() >= options.max_open_transactions && !open.contains(tid);
    if (!full) {
      t->expires = now + options.transaction_ttl;
      open[tid] = t;  // a transactionID used again starts over (the old one was abandoned)
    }
  }
  if (full) {
    spdlog::warn("cmp: {} open transactions: refusing a new one", options.max_open_transactions);
    return refuse(req, {OSSL_CMP_PKIFAILUREINFO_systemUnavail,
                        "too many enrollments are in progress; try again in a minute"});
  }
  Reply reply = run(t, req);
  if (t->closed) forget(tid, t);
  return reply;
}

Reply CmpServer::Impl::resume(const OSSL_CMP_MSG* req, const std::string& tid, int type) {
  std::shared_ptr<Transaction> t;
  {
    std::lock_guard lk(table_mu);
    // Abandoned transactions hold their secret until swept: sweep on every message.
    const auto now = std::chrono::steady_clock::now();
    std::erase_if(open, [now](const auto& kv) { return kv.second->expires < now; });
    auto it = open.find(tid);
    if (it != open.end()) t = it->second;
  }
  if (!t) {
    if (type == kPollReq)
      return refuse(req,
                    {OSSL_CMP_PKIFAILUREINFO_badRequest, "this server never asks clients to poll"});
    return refuse(req, {OSSL_CMP_PKIFAILUREINFO_badRequest,
                        "there is no open transaction with this transactionID for this " +
                            body_name(type) + ": it was completed, it was abandoned for " +
                            std::to_string(options.transaction_ttl.count()) +
                            " seconds, or it never started; start again with ir, kur or rr"});
  }
  Reply reply = run(t, req);
  if (t->closed) forget(tid, t);
  return reply;
}

void CmpServer::Impl::forget(const std::string& tid, const std::shared_ptr<Transaction>& t) {
  std::lock_guard lk(table_mu);
  auto it = open.find(tid);
  if (it != open.end() && it->second == t) open.erase(it);
}

Reply CmpServer::Impl::run(const std::shared_ptr<Transaction>& t, const OSSL_CMP_MSG* req) {
  std::lock_guard lk(t->mu);
  if (t->closed)
    return refuse(req, {OSSL_CMP_PKIFAILUREINFO_badRequest,
                        "this transaction has just been completed; start a new one"});
  OSSL_CMP_CTX* ctx = OSSL_CMP_SRV_CTX_get0_cmp_ctx(t->srv.get());
  if (t->auth == Auth::kSignature) {
    auto s = signer();
    if (!s.ok() || !install(ctx, *s)) {
      t->closed = true;
      if (!s.ok()) spdlog::warn("cmp: cannot sign responses: {}", s.error().message);
      return refuse(req, s.ok() ? Refusal{OSSL_CMP_PKIFAILUREINFO_systemFailure,
                                          "the CA could not sign its response; try again later"}
                                : refusal_for(s.error(), "request"));
    }
  }
  t->issued_now = false;
  CmpMsgPtr rsp(OSSL_CMP_SRV_process_request(t->srv.get(), req));
  ERR_clear_error();
  if (!rsp) {
    t->closed = true;
    spdlog::warn("cmp: no response could be built for a {} of user '{}'",
                 body_name(OSSL_CMP_MSG_get_bodytype(req)), t->user_id);
    return refuse(req, {OSSL_CMP_PKIFAILUREINFO_systemFailure,
                        "the CA could not build or protect its response; if a certificate was "
                        "issued, it is recorded and the administrator can see it"});
  }
  const int rt = OSSL_CMP_MSG_get_bodytype(rsp.get());
  const bool awaiting_confirmation =
      (rt == kIp || rt == kCp || rt == kKup) && t->issued_now &&
      OSSL_CMP_CTX_get_option(ctx, OSSL_CMP_OPT_IMPLICIT_CONFIRM) == 0;
  t->closed = !awaiting_confirmation;
  t->expires = std::chrono::steady_clock::now() + options.transaction_ttl;
  return encode(rsp.get());
}

Reply CmpServer::Impl::refuse(const OSSL_CMP_MSG* req, const Refusal& r) {
  // A throw-away server context answers with the refusal: it takes the request as it is (its
  // protection was already judged, or cannot be), and its callbacks only refuse. Signed with
  // the CA key when possible, else unprotected (openssl cmp -unprotected_errors shows those).
  for (const bool sign : {true, false}) {
    SrvCtxPtr srv = new_srv_ctx();
    if (!srv) break;
    OSSL_CMP_CTX* ctx = OSSL_CMP_SRV_CTX_get0_cmp_ctx(srv.get());
    if (OSSL_CMP_SRV_CTX_init(srv.get(), const_cast<Refusal*>(&r), refuse_cert_request, refuse_rr,
                              refuse_genm, on_error, refuse_cert_conf, nullptr) != 1 ||
        OSSL_CMP_SRV_CTX_set_accept_unprotected(srv.get(), 1) != 1 ||
        OSSL_CMP_SRV_CTX_set_send_unprotected_errors(srv.get(), sign ? 0 : 1) != 1)
      break;
    if (sign) {
      auto s = signer();
      if (!s.ok()) {
        spdlog::debug("cmp: refusal sent unprotected: {}", s.error().message);
        continue;
      }
      if (!install(ctx, *s)) continue;
    }
    // Where OpenSSL answers with an error message of its own making (a certConf outside a
    // transaction, say), it takes the text of the oldest queued error: make that ours.
    ERR_clear_error();
    ERR_raise_data(ERR_LIB_CMP, CMP_R_ERROR_PROCESSING_MESSAGE, "%s", r.text.c_str());
    CmpMsgPtr rsp(OSSL_CMP_SRV_process_request(srv.get(), req));
    ERR_clear_error();
    if (rsp) return encode(rsp.get());
  }
  return text_reply(500, "kmsd could not build a CMP response; it would have said: " + r.text);
}

// ---------------------------------------------------------------------------------------------
// What transactions do

OSSL_CMP_PKISI* CmpServer::Impl::certify(Transaction& t, OSSL_CMP_CTX* ctx, const OSSL_CMP_MSG* req,
                                         const OSSL_CRMF_MSG* crm, const X509_REQ* p10cr,
                                         X509** cert_out, STACK_OF(X509) * *chain_out,
                                         STACK_OF(X509) * *ca_pubs) {
  const int type = OSSL_CMP_MSG_get_bodytype(req);
  auto reject = [&](const Refusal& r) {
    spdlog::info("cmp: {} for user '{}' refused: {}", body_name(type), t.user_id, r.text);
    return status_info(OSSL_CMP_PKISTATUS_rejection, r.fail_bit, r.text);
  };

  // What is asked for: the client's public key (proof of possession already checked by
  // OpenSSL), the X.509 version, validity and subject of the template.
  ossl::EvpPkeyPtr key;
  enroll::SigningRequest sr;
  sr.channel = "cmp";
  if (crm != nullptr) {
    auto tmpl = read_template(OSSL_CRMF_MSG_get0_tmpl(crm));
    if (!tmpl.ok()) return reject({OSSL_CMP_PKIFAILUREINFO_badCertTemplate, tmpl.error().message});
    if (!tmpl->public_key)
      return reject({OSSL_CMP_PKIFAILUREINFO_badCertTemplate,
                     "the certificate template carries no public key: give the key to certify "
                     "(openssl cmp -newkey)"});
    key = std::move(tmpl->public_key);
    if (tmpl->version) {
      if (*tmpl->version == 0) {
        sr.x509_version = 1;
      } else if (*tmpl->version == 2) {
        sr.x509_version = 3;
      } else {
        return reject({OSSL_CMP_PKIFAILUREINFO_badCertTemplate,
                       "the certificate template asks for X.509 version value " +
                           std::to_string(*tmpl->version) +
                           "; only 2 (v3) or 0 (v1) can be asked for"});
      }
    }
    if (tmpl->not_after) {
      const std::int64_t from = tmpl->not_before.value_or(unix_now());
      if (*tmpl->not_after <= from)
        return reject({OSSL_CMP_PKIFAILUREINFO_badCertTemplate,
                       "the requested validity ends before it begins"});
      sr.validity = std::chrono::seconds(*tmpl->not_after - from);
    }
    sr.requested_subject = tmpl->subject;
  } else if (p10cr != nullptr) {
    EVP_PKEY* k = X509_REQ_get0_pubkey(const_cast<X509_REQ*>(p10cr));
    if (k == nullptr || EVP_PKEY_up_ref(k) != 1)
      return reject({OSSL_CMP_PKIFAILUREINFO_badCertTemplate,
                     "the PKCS#10 request carries no readable public key"});
    key.reset(k);
    sr.requested_subject = ca::name_to_string(X509_REQ_get_subject_name(p10cr));
  } else {
    return reject(
        {OSSL_CMP_PKIFAILUREINFO_badRequest, "the request carries no certificate request"});
  }
  sr.public_key = key.get();

  if (t.auth == Auth::kSignature) {
    if (type != kKur)
      return reject({OSSL_CMP_PKIFAILUREINFO_notAuthorized,
                     "a signed request can renew (kur) or revoke (rr), not " + body_name(type)});
    // OpenSSL's client names the certificate it updates; it must be the one that signs.
    if (const OSSL_CRMF_CERTID* old =
            crm != nullptr ? OSSL_CRMF_MSG_get0_regCtrl_oldCertID(crm) : nullptr) {
      const ASN1_INTEGER* serial = OSSL_CRMF_CERTID_get0_serialNumber(old);
      if (serial == nullptr ||
          ASN1_INTEGER_cmp(serial, X509_get0_serialNumber(t.holder.get())) != 0)
        return reject({OSSL_CMP_PKIFAILUREINFO_badCertId,
                       "kur renews the certificate that signs it: give the same certificate "
                       "to -oldcert and -cert (or leave out -oldcert)"});
    }
  }
  auto done = t.auth == Auth::kMac ? service.enroll_verified(t.user_id, sr)
                                   : service.renew(t.holder.get(), sr);
  if (t.auth == Auth::kSignature) refresh_key(ctx);
  if (!done.ok()) {
    if (done.error().code != ErrorCode::kInvalidArgument &&
        done.error().code != ErrorCode::kPermissionDenied &&
        done.error().code != ErrorCode::kFailedPrecondition)
      spdlog::error("cmp: {} for user '{}': {}", body_name(type), t.user_id, done.error().message);
    return reject(refusal_for(done.error(), type == kKur ? "renewal" : "enrollment"));
  }

  X509* cert = done->signing_certificate.get();
  t.issued = ref(cert);
  t.issued_now = true;
  spdlog::info("cmp: {} for user '{}': signing certificate {} issued", body_name(type), t.user_id,
               ca::serial_hex(cert));
  *cert_out = done->signing_certificate.release();
  if (auto ca = ca_certificate()) {
    *chain_out = stack_of(ca.get());
    if (type == kIr) *ca_pubs = stack_of(ca.get());
  }
  return status_info(OSSL_CMP_PKISTATUS_accepted, -1,
                     "signing certificate issued; your encryption certificate and its escrowed "
                     "key are ready to be fetched over mutual TLS with this signing certificate");
}

OSSL_CMP_PKISI* CmpServer::Impl::revoke(Transaction& t, OSSL_CMP_CTX* ctx, const X509_NAME* issuer,
                                        const ASN1_INTEGER* serial) {
  auto reject = [&](const Refusal& r) {
    spdlog::info("cmp: rr for user '{}' refused: {}", t.user_id, r.text);
    return status_info(OSSL_CMP_PKISTATUS_rejection, r.fail_bit, r.text);
  };
  if (t.auth != Auth::kSignature)
    return reject({OSSL_CMP_PKIFAILUREINFO_notAuthorized,
                   "rr must be signed with the certificate to revoke"});
  X509* holder = t.holder.get();
  if (serial == nullptr || ASN1_INTEGER_cmp(serial, X509_get0_serialNumber(holder)) != 0 ||
      (issuer != nullptr && X509_NAME_cmp(issuer, X509_get_issuer_name(holder)) != 0))
    return reject({OSSL_CMP_PKIFAILUREINFO_badCertId,
                   "you can revoke only the certificate that signs the request: give the same "
                   "certificate to -oldcert and -cert (or leave out -oldcert)"});
  const int reason = t.revocation_reason.value_or(0);  // RFC 5280: 0 = unspecified
  auto st = service.revoke_by_holder(holder, reason);
  refresh_key(ctx);
  if (!st.ok()) {
    if (st.error().code != ErrorCode::kInvalidArgument &&
        st.error().code != ErrorCode::kPermissionDenied &&
        st.error().code != ErrorCode::kFailedPrecondition)
      spdlog::error("cmp: rr for user '{}': {}", t.user_id, st.error().message);
    return reject(refusal_for(st.error(), "revocation"));
  }
  spdlog::info("cmp: rr for user '{}': certificate {} revoked (reason {})", t.user_id,
               ca::serial_hex(holder), reason);
  return status_info(OSSL_CMP_PKISTATUS_accepted, -1, "certificate revoked");
}

int CmpServer::Impl::confirm(Transaction& t, const ASN1_OCTET_STRING* cert_hash,
                             const OSSL_CMP_PKISI* si) {
  if (!t.issued) {
    ERR_raise_data(ERR_LIB_CMP, CMP_R_ERROR_PROCESSING_MESSAGE, "%s",
                   "no certificate was issued in this transaction, so there is none to confirm");
    return 0;
  }
  if (cert_hash != nullptr) {
    ASN1_OCTET_STRING* ours = X509_digest_sig(t.issued.get(), nullptr, nullptr);
    const bool same = ours != nullptr && ASN1_OCTET_STRING_cmp(ours, cert_hash) == 0;
    ASN1_OCTET_STRING_free(ours);
    if (!same) {
      ERR_clear_error();
      ERR_raise_data(ERR_LIB_CMP, CMP_R_CERTHASH_UNMATCHED, "%s",
                     "the certHash of this certConf is not that of the certificate issued in "
                     "this transaction");
      return 0;
    }
  }
  const std::string serial = ca::serial_hex(t.issued.get());
  const auto status = pki_status(si);
  if (si != nullptr && status != OSSL_CMP_PKISTATUS_accepted) {
    // The certificate was issued, recorded and audited when the request was answered; the
    // client not wanting it does not undo that. Answer pkiconf and leave the decision to an
    // administrator, who sees it here.
    char text[OSSL_CMP_PKISI_BUFLEN];
    const char* why = OSSL_CMP_snprint_PKIStatusInfo(si, text, sizeof text);
    spdlog::warn(
        "cmp: user '{}' rejected certificate {} in certConf ({}); it stays issued and recorded: "
        "revoke it if it must not be used",
        t.user_id, serial, why != nullptr ? why : "no reason given");
    ERR_clear_error();
    return 1;
  }
  spdlog::info("cmp: user '{}' confirmed certificate {}", t.user_id, serial);
  return 1;
}

// ---- callbacks ----

OSSL_CMP_PKISI* CmpServer::Impl::on_cert_request(OSSL_CMP_SRV_CTX* srv, const OSSL_CMP_MSG* req,
                                                 int, const OSSL_CRMF_MSG* crm,
                                                 const X509_REQ* p10cr, X509** cert_out,
                                                 STACK_OF(X509) * *chain_out,
                                                 STACK_OF(X509) * *ca_pubs) noexcept {
  auto* t = static_cast<Transaction*>(OSSL_CMP_SRV_CTX_get0_custom_ctx(srv));
  try {
    return t->impl->certify(*t, OSSL_CMP_SRV_CTX_get0_cmp_ctx(srv), req, crm, p10cr, cert_out,
                            chain_out, ca_pubs);
  } catch (const std::exception& e) {
    spdlog::error("cmp: certificate request of user '{}': {}", t->user_id, e.what());
    return status_info(OSSL_CMP_PKISTATUS_rejection, OSSL_CMP_PKIFAILUREINFO_systemFailure,
                       "internal error; the administrator finds the details in the kmsd log");
  }
}

OSSL_CMP_PKISI* CmpServer::Impl::on_rr(OSSL_CMP_SRV_CTX* srv, const OSSL_CMP_MSG*,
                                       const X509_NAME* issuer,
                                       const ASN1_INTEGER* serial) noexcept {
  auto* t = static_cast<Transaction*>(OSSL_CMP_SRV_CTX_get0_custom_ctx(srv));
  try {
    return t->impl->revoke(*t, OSSL_CMP_SRV_CTX_get0_cmp_ctx(srv), issuer, serial);
  } catch (const std::exception& e) {
    spdlog::error("cmp: revocation for user '{}': {}", t->user_id, e.what());
    return status_info(OSSL_CMP_PKISTATUS_rejection, OSSL_CMP_PKIFAILUREINFO_systemFailure,
                       "internal error; the administrator finds the details in the kmsd log");
  }
}

int CmpServer::Impl::on_cert_conf(OSSL_CMP_SRV_CTX* srv, const OSSL_CMP_MSG*, int,
                                  const ASN1_OCTET_STRING* cert_hash,
                                  const OSSL_CMP_PKISI* si) noexcept {
  auto* t = static_cast<Transaction*>(OSSL_CMP_SRV_CTX_get0_custom_ctx(srv));
  try {
    return t->impl->confirm(*t, cert_hash, si);
  } catch (const std::exception& e) {
    spdlog::error("cmp: certConf of user '{}': {}", t->user_id, e.what());
    return 0;
  }
}

void CmpServer::Impl::on_error(OSSL_CMP_SRV_CTX*, const OSSL_CMP_MSG*, const OSSL_CMP_PKISI* si,
                               const ASN1_INTEGER*, const OSSL_CMP_PKIFREETEXT*) noexcept {
  char text[OSSL_CMP_PKISI_BUFLEN];
  const char* s = si != nullptr ? OSSL_CMP_snprint_PKIStatusInfo(si, text, sizeof text) : nullptr;
  spdlog::info("cmp: the client reported an error: {}", s != nullptr ? s : "(no status)");
}

OSSL_CMP_PKISI* CmpServer::Impl::refuse_cert_request(OSSL_CMP_SRV_CTX* srv, const OSSL_CMP_MSG*,
                                                     int, const OSSL_CRMF_MSG*, const X509_REQ*,
                                                     X509**, STACK_OF(X509) **,
                                                     STACK_OF(X509) **) noexcept {
  const auto* r = static_cast<const Refusal*>(OSSL_CMP_SRV_CTX_get0_custom_ctx(srv));
  return status_info(OSSL_CMP_PKISTATUS_rejection, r->fail_bit, r->text);
}

OSSL_CMP_PKISI* CmpServer::Impl::refuse_rr(OSSL_CMP_SRV_CTX* srv, const OSSL_CMP_MSG*,
                                           const X509_NAME*, const ASN1_INTEGER*) noexcept {
  const auto* r = static_cast<const Refusal*>(OSSL_CMP_SRV_CTX_get0_custom_ctx(srv));
  return status_info(OSSL_CMP_PKISTATUS_rejection, r->fail_bit, r->text);
}

int CmpServer::Impl::refuse_genm(OSSL_CMP_SRV_CTX* srv, const OSSL_CMP_MSG*,
                                 const STACK_OF(OSSL_CMP_ITAV) *,
                                 STACK_OF(OSSL_CMP_ITAV) **) noexcept {
  const auto* r = static_cast<const Refusal*>(OSSL_CMP_SRV_CTX_get0_custom_ctx(srv));
  ERR_clear_error();
  ERR_raise_data(ERR_LIB_CMP, CMP_R_ERROR_PROCESSING_MESSAGE, "%s", r->text.c_str());
  return 0;
}

int CmpServer::Impl::refuse_cert_conf(OSSL_CMP_SRV_CTX* srv, const OSSL_CMP_MSG*, int,
                                      const ASN1_OCTET_STRING*, const OSSL_CMP_PKISI*) noexcept {
  const auto* r = static_cast<const Refusal*>(OSSL_CMP_SRV_CTX_get0_custom_ctx(srv));
  ERR_clear_error();
  ERR_raise_data(ERR_LIB_CMP, CMP_R_ERROR_PROCESSING_MESSAGE, "%s", r->text.c_str());
  return 0;
}

// ---------------------------------------------------------------------------------------------

CmpServer::CmpServer(enroll::EnrollmentService& service, hsm::Token& token, store::Store& store,
                     std::function<ossl::X509Ptr()> ca_certificate,
                     std::function<std::string()> digest, Options options)
    : impl_(std::make_unique<Impl>(service, token, store, std::move(ca_certificate),
                                   std::move(digest), options)) {}

CmpServer::CmpServer(enroll::EnrollmentService& service, hsm::Token& token, store::Store& store,
                     std::function<ossl::X509Ptr()> ca_certificate, std::string digest,
                     Options options)
    : CmpServer(
          service, token, store, std::move(ca_certificate), [d = std::move(digest)] { return d; },
          options) {}

CmpServer::~CmpServer() = default;

Reply CmpServer::handle(std::span<const std::uint8_t> request_der) {
  try {
    Reply r = impl_->handle(request_der);
    ERR_clear_error();
    return r;
  } catch (const std::exception& e) {
    ERR_clear_error();
    spdlog::error("cmp: {}", e.what());
    return text_reply(500, "kmsd could not process this CMP request; see the kmsd log");
  }
}

std::size_t CmpServer::open_transactions() const {
  std::lock_guard lk(impl_->table_mu);
  const auto now = std::chrono::steady_clock::now();
  std::size_t n = 0;
  for (const auto& kv : impl_->open)
    if (kv.second->expires >= now) ++n;
  return n;
}

}  // namespace kmsd::cmp

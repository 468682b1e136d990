// The user's side of the CA: enrollment with a one-time token, renewal, key delivery and
// revocation by the certificate holder. Transport-neutral: the REST routes (daemon/api) and
// the CMP server (daemon/cmp) both call this service, so both paths share one token check,
// one state machine (lifecycle::transition), one policy check (policy::PolicyCheck) and one
// escrow.
//
// Each enrollment, in ONE store transaction:
//   - the token is checked (constant time) and consumed;
//   - the signing certificate is issued for the client's key (the client keeps its private
//     key), the encryption key pair is generated here, its private key sealed with the
//     token's envelope (hsm::Token::seal, AAD binding user id, key id, key version and
//     master-key version) and appended to the user's key history, and its certificate
//     issued — both certificates signed by the CA key on the token, both after the policy
//     check;
//   - the user becomes ACTIVE, and an audit record is written.
// If any step fails, nothing is kept: no token is spent without its certificates.
#pragma once

#include <openssl/evp.h>
#include <openssl/x509.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "common/ossl.hpp"
#include "common/result.hpp"
#include "common/secret.hpp"
#include "config/config.hpp"
#include "daemon/audit/audit_log.hpp"
#include "daemon/lifecycle/enrollment_token.hpp"
#include "daemon/policy/policy_check.hpp"
#include "daemon/store/store.hpp"
#include "hsm/token.hpp"

namespace kmsd::enroll {

// What the daemon's configuration says about user certificates; read at each request, so a
// reload (SIGHUP) applies from the next request on.
struct Settings {
  std::chrono::seconds validity = std::chrono::days(365);
  hsm::KeyType encryption_key_type = hsm::KeyType::kEcP256;
  config::RenewKey renew_encryption_key = config::RenewKey::kNew;
  std::uint32_t max_failed_attempts = 5;
  std::string digest = "sha256";
  std::string crl_url;   // put in every certificate when not empty
  std::string ocsp_url;  // likewise
};

// The client's request for a signing certificate, from a CSR (REST) or a CMP certificate
// template. Nothing is owned.
struct SigningRequest {
  EVP_PKEY* public_key = nullptr;  // the client's signing key; only the public half is used
  // Optional: PUBLIC_KEY's SubjectPublicKeyInfo as the client sent it (a CSR's), certified as
  // it is, so the key is not encoded again (see ca::IssueRequest::public_key_info).
  const X509_PUBKEY* public_key_info = nullptr;
  // 1 or 3 as the request asks; the policy check refuses a version it does not allow.
  int x509_version = 3;
  // Requested validity; nullopt: Settings::validity. Longer than policy allows is refused.
  std::optional<std::chrono::seconds> validity;
  // The subject the client asked for, for the record only: certificates always carry the
  // identity the administrator enabled (policy::PolicyCheck::subject_for), never a subject
  // the client chose.
  std::string requested_subject;
  std::string channel = "rest";  // "rest" or "cmp", for the audit record
};

// One escrowed encryption key handed to its owner.
struct DeliveredKey {
  int version = 0;  // key-history version, 1, 2, ...
  std::string key_id;
  std::string algorithm;      // "ec-p256", "rsa-2048", ...
  ossl::X509Ptr certificate;  // its encryption certificate
  SecretBytes pkcs8_der;      // the private key, PKCS#8 DER; cleansed on destruction
};

// The certificates of an enrollment are as signed: built from the request's public key info,
// they carry no decoded public key (ca::IssueRequest::decode_public_key; decoding costs OpenSSL
// 3.0 a quarter of an issuance). They encode, hash and compare (ca::public_key_matches) as any
// certificate; to verify a chain with one or pair it with its key, read its DER back first.
struct Enrollment {
  std::string user_id;
  ossl::X509Ptr signing_certificate;
  ossl::X509Ptr encryption_certificate;
  // The keys the user receives: the new (or current) one; after a recovery, the whole key
  // history, oldest first. The last entry belongs to encryption_certificate.
  std::vector<DeliveredKey> keys;
  bool recovered = false;  // this enrollment ended a recovery
};

// The certificate holder behind a mutual-TLS connection or a signed CMP message.
struct Holder {
  std::string user_id;
  std::string serial;  // of the signing certificate presented
};

// Thread-safety: safe to share; changes serialize on store transactions.
class EnrollmentService {
 public:
  EnrollmentService(store::Store& store, hsm::Token& token, audit::AuditLog& audit,
                    const policy::PolicyInForce& policy, std::function<Settings()> settings,
                    std::function<ossl::X509Ptr()> ca_certificate);

  // Called after a transaction that revoked certificates has committed (CRL regeneration).
  void on_revocation(std::function<void()> fn) { on_revocation_ = std::move(fn); }

  // REST: checks TOKEN for USER_ID (constant time; a wrong token counts as a failed attempt
  // and the token locks after Settings::max_failed_attempts), then enrolls. Refusals:
  // kPermissionDenied for a wrong, expired, locked or used token (the sentence says which
  // and what to do), kFailedPrecondition from the state machine, kInvalidArgument from the
  // policy check. The same answer for an unknown user as for a wrong token, so user ids
  // cannot be probed.
  Result<Enrollment> enroll(const std::string& user_id, const SecretBytes& token,
                            const SigningRequest& req);

  // CMP: the secret the client's password-based MAC must be keyed with: the token's display
  // text as the user types it ("XXXX-XXXX-..."), provided the user has a live token (not
  // expired, not locked, not used). Does not count as an attempt.
  Result<SecretBytes> pending_token(const std::string& user_id);
  // CMP: a message whose MAC did not verify with pending_token() is one failed attempt.
  Status record_failed_attempt(const std::string& user_id);
  // CMP: enrolls USER_ID whose token the caller has just verified (the PBM); consumes it.
  Result<Enrollment> enroll_verified(const std::string& user_id, const SigningRequest& req);

  // The user whose signing certificate CERT is, provided CERT was issued by this CA, is
  // recorded as that user's signing certificate, is not revoked or expired, and the user is
  // ACTIVE. kPermissionDenied otherwise, with the reason.
  Result<Holder> holder_of(X509* cert);

  // Renewal by the holder of CURRENT: a new signing certificate for REQ's key, and a new
  // encryption key (appended to the history) or the current one re-certified, per
  // Settings::renew_encryption_key. The old certificates stay valid until they expire.
  Result<Enrollment> renew(X509* current, const SigningRequest& req);

  // The escrowed keys the holder of CERT may fetch: those delivered by the last enrollment
  // (the whole history after a recovery) and every key added by renewals since.
  Result<std::vector<DeliveredKey>> keys_for(X509* cert);

  // Every escrowed key of USER_ID's history, oldest first, opened on the token, each with its
  // certificate. No authorization and no audit here: for daemon/enroll/key_export.hpp, whose
  // caller has both (an approved export request).
  Result<std::vector<DeliveredKey>> escrowed_keys(const std::string& user_id);

  // Revocation asked for by the holder of CERT (CMP rr): revokes CERT with REASON (RFC 5280
  // CRLReason). The user stays ACTIVE with the other certificates unless the revoked one was
  // its current signing certificate, in which case the user is REVOKED like an
  // administrator's revoke.
  Status revoke_by_holder(X509* cert, int reason);

 private:
  // CHECKED: the sealed token record the caller verified (null: the one pending now).
  Result<Enrollment> enroll_locked(const std::string& user_id, const SigningRequest& req,
                                   std::int64_t now, const store::Bytes* checked);

  store::Store& store_;
  hsm::Token& token_;
  audit::AuditLog& audit_;
  const policy::PolicyInForce& policy_;
  std::function<Settings()> settings_;
  std::function<ossl::X509Ptr()> ca_certificate_;
  std::function<void()> on_revocation_;
  lifecycle::EnrollmentTokens tokens_;
};

// The one refusal for an unknown user, a spent token and a wrong token, on every channel, so
// that user ids cannot be probed.
extern const char* const kTokenNotValid;

// The AAD that binds an escrowed key to its place in the key history (DESIGN.md, "The
// token"): a blob moved to another user's row, version or key id fails to open.
// Envelope format 2 (every key sealed now): "kmsd-escrow-v2" with user, key id and version, no
// master version (master-key rotation changes it; the row's master_version is checked against
// the blob's header instead, see open_escrowed).
std::string escrow_aad(const std::string& user_id, const std::string& key_id, int version);
// Envelope format 1 (keys sealed before format 2): "kmsd-escrow-v1", the master version too.
std::string escrow_aad(const std::string& user_id, const std::string& key_id, int version,
                       std::uint32_t master_version);
// The PKCS#8 DER escrowed in REC: its master_version must be the blob's; opened with the AAD of
// the blob's envelope format. kCrypto (the uniform open failure) otherwise.
Result<SecretBytes> open_escrowed(hsm::Token& token, const store::KeyHistoryRecord& rec);
// REC's sealed key protected by master key MASTER_VERSION instead, as format 2: re-wrapped
// (payload untouched), or for a format-1 blob opened and sealed again once.
Result<store::Bytes> rewrap_escrowed(hsm::Token& token, const store::KeyHistoryRecord& rec,
                                     std::uint32_t master_version);

}  // namespace kmsd::enroll

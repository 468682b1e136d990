// The one policy check every certificate-producing path calls (REST/CMP enrollment, renewal,
// recovery, bulk enable, administrator certificates), against the [policy] configuration in force.
#pragma once

#include <openssl/evp.h>
#include <openssl/x509.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/ossl.hpp"
#include "common/result.hpp"
#include "config/config.hpp"

namespace kmsd::policy {

// The kind of certificate asked for. Signing and encryption are user (S/MIME) certificates
// whose allowed usages come from [policy.signing] / [policy.encryption]; administrator client
// and TLS server certificates carry the fixed usages ca::issue gives ca::Profile::kAdminClient
// and ca::Profile::kTlsServer.
enum class RequestProfile { kSigning, kEncryption, kAdminClient, kTlsServer };
const char* to_string(RequestProfile p) noexcept;  // "signing", "encryption", "admin-client", ...

// One request for a certificate, from whichever path: a CSR, a CMP certificate template, a
// renewal of an existing certificate, a recovery, a bulk enable. Nothing here is owned.
struct CertificateRequest {
  RequestProfile profile = RequestProfile::kSigning;
  int x509_version = 3;  // 1 or 3, as the CSR or CMP template asks; a renewal keeps the old one
  EVP_PKEY* public_key = nullptr;    // the subject's key (only the public half is looked at)
  std::chrono::seconds validity{0};  // notAfter - notBefore
  // From the CSR or template; callers holding the one-line form parse it with ca::parse_subject.
  const X509_NAME* subject = nullptr;
  std::string email;  // subjectAltName rfc822Name; empty: none
  // Usages the request asks for; empty: whatever the profile gives. Key usages by their RFC 5280
  // names ("digitalSignature"), extended key usages by OpenSSL short or long name or dotted OID.
  std::vector<std::string> key_usage;
  std::vector<std::string> extended_key_usage;
};

// A user as an administrator enables them. The certificate subject is built from it by
// subject_for(); admit_identity() checks that it can be, before any token work is spent.
struct UserIdentity {
  std::string user_id;       // required: non-empty, no control characters
  std::string email;         // required: ASCII local@domain
  std::string display_name;  // the CN; may be empty only when dn is given
  // Optional subject in OpenSSL's one-line form "/O=Example/CN=Ann" ('\/' escapes a slash), as
  // ca::parse_subject reads it. Empty: the subject is CN=display name, emailAddress=email.
  std::string dn;
};

// An immutable snapshot of [policy]. Thread-safe: every method is const and touches no shared
// state. The daemon builds a new PolicyCheck when it reloads the configuration (SIGHUP) and
// swaps it into a PolicyInForce; a request takes the current snapshot once, when it starts,
// and judges everything with that one, so a reload never applies half a policy to a request.
class PolicyCheck {
 public:
  // Checks that CONFIG is self-consistent (kConfig error otherwise); config::load() already
  // guarantees this for loaded files, so only hand-built configurations can fail.
  static Result<PolicyCheck> create(config::PolicyConfig config);

  // Whether a certificate for REQ may be issued. Refusals are kInvalidArgument with a sentence
  // naming what was found, what the policy allows, the setting, and what to do instead.
  Status admit(const CertificateRequest& req) const;

  // Whether USER may be enabled: user id, e-mail and display name rules, and that the subject
  // subject_for(USER) builds is encodable (X.520 upper bounds), round-trips through its RFC 2253
  // text exactly, and fits policy.max_subject_length. kInvalidArgument when not.
  Status admit_identity(const UserIdentity& user) const;

  // The certificate subject for USER: the parsed dn, or CN=display name, emailAddress=email.
  // Does not apply the identity rules; call admit_identity() for that.
  Result<ossl::X509NamePtr> subject_for(const UserIdentity& user) const;

  const config::PolicyConfig& config() const { return config_; }

 private:
  explicit PolicyCheck(config::PolicyConfig config) : config_(std::move(config)) {}

  Status admit_version(const CertificateRequest& req) const;
  Status admit_key(EVP_PKEY* key) const;
  Status admit_validity(std::chrono::seconds validity) const;
  Status admit_usages(const CertificateRequest& req) const;
  Status admit_subject(const X509_NAME* subject) const;
  Status admit_email(std::string_view email, std::string_view what) const;

  config::PolicyConfig config_;
};

// The snapshot in force. Thread-safe: current() and replace() may race freely; a reader keeps
// the snapshot it took alive for as long as it holds the pointer.
class PolicyInForce {
 public:
  explicit PolicyInForce(std::shared_ptr<const PolicyCheck> initial);
  std::shared_ptr<const PolicyCheck> current() const;
  void replace(std::shared_ptr<const PolicyCheck> next);

 private:
  std::atomic<std::shared_ptr<const PolicyCheck>> current_;
};

// Length of UTF-8 text in characters (code points), or nullopt if it is not valid UTF-8.
std::optional<std::size_t> utf8_length(std::string_view text);

// RFC 2253 text as X509_NAME_print_ex writes it (XN_FLAG_RFC2253, with or without non-ASCII
// escaped; ca::name_to_string), read back into a name whose values are UTF-8 strings, or an
// error saying why it cannot be. Text only: hex-encoded BER values ("#0403...") are refused.
Result<ossl::X509NamePtr> parse_rfc2253(std::string_view text);

}  // namespace kmsd::policy

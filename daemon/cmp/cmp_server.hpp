// CMP (RFC 4210) over HTTP (RFC 6712) for end users, so that the stock `openssl cmp` client
// enrolls (ir/cr/p10cr with the enrollment token as password-based MAC), renews (kur) and
// revokes (rr, both signed with the current signing certificate). OpenSSL's OSSL_CMP_SRV_CTX
// does the protocol; this module authenticates each request, keeps one server context per open
// transaction and turns requests into enroll::EnrollmentService calls. Transport only: the
// HTTP listener hands over the body of one POST and sends back what handle() returns.
//
// Responses are protected so that `openssl cmp ... -trusted ca.pem` accepts them:
//   - MAC-protected requests get a response MAC'd with the same secret (the enrollment token
//     in the form the user typed it);
//   - everything else is signed with the CA key on the token. OpenSSL's client refuses a
//     signer certificate without keyUsage digitalSignature, which the CA certificate does not
//     carry (keyCertSign|cRLSign), so the CA issues itself a short-lived "CMP responder"
//     certificate for the same key (digitalSignature only, recorded in the store as a server
//     certificate) and signs with that; it chains to the CA certificate.
//   - refusals of requests that cannot be authenticated (wrong token, unknown user, bad
//     signature) are signed likewise, so the client can trust the sentence it shows.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/ossl.hpp"
#include "daemon/enroll/enrollment.hpp"
#include "daemon/store/store.hpp"
#include "hsm/token.hpp"

namespace kmsd::cmp {

// What to send back for one HTTP POST.
struct Reply {
  int http_status = 200;
  std::vector<std::uint8_t> body;
  std::string content_type = "application/pkixcmp";
};

struct Options {
  // An open transaction (ip/kup sent, certConf not yet received) is forgotten this long after
  // its last message; the client's certConf then gets an error. The issued certificate stays
  // issued (it was recorded at ir/kur time).
  std::chrono::seconds transaction_ttl = std::chrono::minutes(5);
  // At most this many transactions are open at once; a new one beyond it is refused with
  // systemUnavail ("try again shortly").
  std::size_t max_open_transactions = 1024;
  // Larger bodies are answered 413 without parsing.
  std::size_t max_request_bytes = 256 * 1024;
  // Validity of the CMP responder certificate; a new one is issued when less than a day is left
  // or the CA certificate changed.
  std::chrono::seconds responder_validity = std::chrono::days(7);
};

// Thread-safety: handle() may be called from several threads at once. Messages of one
// transaction are processed one at a time; different transactions run in parallel.
class CmpServer {
 public:
  // DIGEST gives the digest ("sha256", "sha384", "sha512") for the signatures on responses,
  // asked for each response so that a reloaded configuration applies at once.
  // CA_CERTIFICATE gives the CA certificate in force (null while sealed).
  CmpServer(enroll::EnrollmentService& service, hsm::Token& token, store::Store& store,
            std::function<ossl::X509Ptr()> ca_certificate, std::function<std::string()> digest,
            Options options = {});
  // With a fixed digest.
  CmpServer(enroll::EnrollmentService& service, hsm::Token& token, store::Store& store,
            std::function<ossl::X509Ptr()> ca_certificate, std::string digest,
            Options options = {});
  ~CmpServer();
  CmpServer(const CmpServer&) = delete;
  CmpServer& operator=(const CmpServer&) = delete;

  // The body of one HTTP POST to /cmp. A body that is not a DER PKIMessage gets HTTP 400 with
  // a plain-text sentence (413 if larger than Options::max_request_bytes); every CMP-level
  // answer, refusals included, is HTTP 200 with a CMP message. Never throws.
  Reply handle(std::span<const std::uint8_t> request_der);

  // Transactions waiting for their certConf (for tests and metrics).
  std::size_t open_transactions() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kmsd::cmp

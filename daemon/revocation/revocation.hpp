// Revocation status published by the CA: the CRL (RFC 5280, DER) and an OCSP responder
// (RFC 6960). Both are signed by the CA key itself on the token; this module never sees it.
//
// Formats
// - CRL: X.509 v2 CRL, DER. Issuer = the CA certificate's subject; thisUpdate = when it was
//   made, nextUpdate = thisUpdate + Settings::crl_next_update. CRL extensions: cRLNumber
//   (monotonic across restarts) and authorityKeyIdentifier (the CA's subject key identifier).
//   One entry per revoked certificate in the store (expired ones are kept), each with its
//   revocation date and, unless the reason is 0 (unspecified), a reasonCode entry extension.
//   Signed with Settings::digest.
// - OCSP: a DER OCSPRequest in, a DER OCSPResponse out (application/ocsp-request and
//   application/ocsp-response over HTTP; RFC 6960 appendix A GET is base64 of the same DER).
//   Responses are signed by the CA key (no delegated responder), responderID byKey, no
//   certificates included (clients already hold the CA certificate).
//
// Store settings kept here (public data only):
//   "crl_number"  decimal cRLNumber of the current CRL
//   "crl_der"     hex of the current CRL's DER, so that /crl can be served after a restart
//                 while the daemon is still sealed
//
// How the daemon uses it
// - On unseal: refresh_if_due() (makes the first CRL, or catches up, see below).
// - After each committed revocation (the store transaction has returned): regenerate(). A
//   failure there (sealed, token fault) does not undo the revocation, and OCSP answers from
//   the store at once anyway; the next refresh_if_due() catches up.
// - Periodically (e.g. every few minutes, off the I/O threads): refresh_if_due(). It renews
//   the CRL from half its validity on, and at once when the store holds revocations the
//   current CRL lacks (revocations are never undone, so a count tells).
// - GET /crl: crl_der() (kUnavailable: answer 503 with its message); works while sealed once
//   a CRL has been made.
// - GET/POST /ocsp: respond(request body) on a worker thread (it signs on the token); always
//   HTTP 200 with the bytes returned, Content-Type application/ocsp-response.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/ossl.hpp"
#include "common/result.hpp"
#include "daemon/store/store.hpp"
#include "hsm/token.hpp"

namespace kmsd::revocation {

inline constexpr const char* kSettingCrlNumber = "crl_number";
inline constexpr const char* kSettingCrlDer = "crl_der";

// Read anew for every CRL and every OCSP response, so a configuration reload applies at once.
struct Settings {
  std::string digest = "sha256";           // sha256|sha384|sha512 (ca::digest_by_name)
  std::chrono::hours crl_next_update{24};  // nextUpdate = thisUpdate + this
  std::filesystem::path crl_path;          // empty: not written to a file
  std::chrono::minutes ocsp_validity{60};  // nextUpdate of OCSP single responses
};

// Thread-safety: every method may be called from several threads at once. CRL generation is
// serialized inside; OCSP responses are made concurrently (the token has a session pool).
class Revocation {
 public:
  // STORE and TOKEN must outlive this object. SETTINGS and CA_CERTIFICATE are called for each
  // CRL and each OCSP response, from any thread (they must be thread-safe); CA_CERTIFICATE may
  // return null while it is not known yet.
  Revocation(store::Store& store, hsm::Token& token, std::function<Settings()> settings,
             std::function<ossl::X509Ptr()> ca_certificate);

  // Makes a new CRL now from every revoked certificate in the store, signed on the token
  // (a fresh token key per CRL, one retry with another fresh key), verified against the CA
  // certificate before it is published. Keeps it in the store (cRLNumber and DER in one
  // transaction) and, when crl_path is set, writes it there atomically with mode 0644.
  // Errors: kFailedPrecondition (token not logged in: sealed), kUnavailable (token fault),
  // kCrypto, kStore, kIo (the CRL is then already in the store; only the file is stale).
  Status regenerate();

  // regenerate() when there is no CRL yet, when NOW is past half of the current CRL's validity
  // (thisUpdate + (nextUpdate - thisUpdate) / 2), when the number of revoked certificates in
  // the store is not the number the current CRL lists (a regenerate() that failed, a restart
  // in between), or when the stored CRL is damaged. Otherwise only writes crl_path when it is
  // set and the file is missing (e.g. after a configuration change). Without NOW: the system
  // clock.
  Status refresh_if_due();
  Status refresh_if_due(std::chrono::sys_seconds now);

  // The current CRL (DER), from memory or else from the store (no token needed). kUnavailable
  // with a sentence when none has been made yet; kStore when the stored one is damaged (the
  // next refresh_if_due() replaces it).
  Result<std::vector<std::uint8_t>> crl_der();

  // RFC 6960 responder. Always returns an encoded OCSPResponse (empty only if memory runs
  // out):
  // - malformedRequest: not a single DER OCSPRequest, or no CertID in it;
  // - unauthorized: none of the CertIDs names this CA (issuerNameHash and issuerKeyHash,
  //   computed with the CertID's own hash algorithm); in a request that mixes issuers the
  //   foreign CertIDs are answered "unknown";
  // - tryLater: the token cannot sign now (sealed, token fault) or the CA certificate is not
  //   known yet;
  // - internalError: anything else (store failure, ...), logged;
  // - successful: one SingleResponse per CertID in request order: good for a certificate
  //   this CA issued and has not revoked, revoked (time, and reason unless unspecified),
  //   unknown for a serial the store does not know. thisUpdate = now, nextUpdate = now +
  //   ocsp_validity (left out when that is 0: RFC 6960 "newer information is always
  //   available"); the request's nonce is copied when present. Request signatures are not
  //   required and not checked.
  std::vector<std::uint8_t> respond(std::span<const std::uint8_t> request_der);

 private:
  struct Current {
    std::vector<std::uint8_t> der;
    std::int64_t this_update = 0;
    std::int64_t next_update = 0;
    std::size_t entries = 0;  // revoked certificates listed
  };
  // The current CRL, loaded from the store on first use.
  Result<std::optional<Current>> current();
  Status regenerate_locked();  // caller holds generate_mu_

  store::Store& store_;
  hsm::Token& token_;
  std::function<Settings()> settings_;
  std::function<ossl::X509Ptr()> ca_certificate_;
  std::mutex generate_mu_;  // one CRL at a time (cRLNumber read, sign, store)
  std::mutex current_mu_;   // current_ only: crl_der() never waits for the token
  std::optional<Current> current_;
};

}  // namespace kmsd::revocation

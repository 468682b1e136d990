// Read-only views of CMP and CRMF structures that OpenSSL 3.0 parses but does not expose
// (the header's senderKID and protection algorithm, the extraCerts, the certificate template's
// public key and version, an rr's CRL entry details). Each is an ASN.1 template declared with
// OpenSSL's public macros (<openssl/asn1t.h>) after RFC 4210 / RFC 4211, and decoded by
// OpenSSL's own decoder from DER that OpenSSL produced (i2d) or already accepted (d2i): no DER
// is parsed by hand here.
#pragma once

#include <openssl/asn1.h>
#include <openssl/asn1t.h>
#include <openssl/cmp.h>
#include <openssl/crmf.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "common/ossl.hpp"
#include "common/result.hpp"

namespace kmsd::cmp {

namespace asn1 {

// RFC 4211 5: OptionalValidity ::= SEQUENCE { notBefore [0] Time OPTIONAL,
//                                             notAfter  [1] Time OPTIONAL }
struct OptionalValidity {
  ASN1_TIME* notBefore;
  ASN1_TIME* notAfter;
};
// RFC 4211 5: CertTemplate (IMPLICIT tags, except the CHOICE-typed names, which are explicit).
struct CertTemplate {
  ASN1_INTEGER* version;  // [0] Version: 0 = v1, 1 = v2, 2 = v3
  ASN1_INTEGER* serialNumber;
  X509_ALGOR* signingAlg;
  X509_NAME* issuer;
  OptionalValidity* validity;
  X509_NAME* subject;
  X509_PUBKEY* publicKey;
  ASN1_BIT_STRING* issuerUID;
  ASN1_BIT_STRING* subjectUID;
  STACK_OF(X509_EXTENSION) * extensions;
};
// RFC 4210 5.3.9: RevDetails ::= SEQUENCE { certDetails CertTemplate,
//                                           crlEntryDetails Extensions OPTIONAL }
struct RevDetails {
  CertTemplate* certDetails;
  STACK_OF(X509_EXTENSION) * crlEntryDetails;
};
// RFC 4210 5.2.3: PKIStatusInfo ::= SEQUENCE { status PKIStatus, statusString PKIFreeText
// OPTIONAL, failInfo PKIFailureInfo OPTIONAL }
struct PkiStatusInfo {
  ASN1_INTEGER* status;
  STACK_OF(ASN1_UTF8STRING) * statusString;
  ASN1_BIT_STRING* failInfo;
};
// RFC 4210 5.1.1: PKIHeader (EXPLICIT tags).
struct PkiHeader {
  ASN1_INTEGER* pvno;
  GENERAL_NAME* sender;
  GENERAL_NAME* recipient;
  ASN1_GENERALIZEDTIME* messageTime;
  X509_ALGOR* protectionAlg;
  ASN1_OCTET_STRING* senderKID;
  ASN1_OCTET_STRING* recipKID;
  ASN1_OCTET_STRING* transactionID;
  ASN1_OCTET_STRING* senderNonce;
  ASN1_OCTET_STRING* recipNonce;
  STACK_OF(ASN1_UTF8STRING) * freeText;
  STACK_OF(ASN1_TYPE) * generalInfo;
};
// RFC 4210 5.1: PKIMessage, the body kept as one undecoded element (its CHOICE tag and all).
struct PkiMessage {
  PkiHeader* header;
  ASN1_TYPE* body;
  ASN1_BIT_STRING* protection;
  STACK_OF(X509) * extraCerts;
};

DECLARE_ASN1_ITEM(OptionalValidity)
DECLARE_ASN1_ITEM(CertTemplate)
DECLARE_ASN1_ITEM(RevDetails)
// The rr body: [11] EXPLICIT SEQUENCE OF RevDetails; decodes to a STACK_OF(RevDetails).
DECLARE_ASN1_ITEM(RevReqBody)
DECLARE_ASN1_ITEM(PkiStatusInfo)
DECLARE_ASN1_ITEM(PkiHeader)
DECLARE_ASN1_ITEM(PkiMessage)

template <const ASN1_ITEM* (*Item)()>
struct ItemDeleter {
  void operator()(void* p) const noexcept { ASN1_item_free(static_cast<ASN1_VALUE*>(p), Item()); }
};
template <typename T, const ASN1_ITEM* (*Item)()>
using ItemPtr = std::unique_ptr<T, ItemDeleter<Item>>;

using CertTemplatePtr = ItemPtr<CertTemplate, CertTemplate_it>;
using PkiMessagePtr = ItemPtr<PkiMessage, PkiMessage_it>;

// Decodes all of DER as ITEM; null when it is not exactly one such value.
ASN1_VALUE* decode(const ASN1_ITEM* item, std::span<const std::uint8_t> der);
// DER of VALUE as ITEM; empty on failure.
ossl::Bytes encode(const ASN1_ITEM* item, const ASN1_VALUE* value);

}  // namespace asn1

// What a CRMF certificate template asks for.
struct RequestedCertificate {
  ossl::EvpPkeyPtr public_key;             // null when the template carries none
  std::optional<std::int64_t> version;     // raw Version INTEGER (0 = v1, 2 = v3) when present
  std::string subject;                     // RFC 2253 text; "" when absent
  std::optional<std::int64_t> not_before;  // unix seconds, when present
  std::optional<std::int64_t> not_after;
};

// Reads TMPL through asn1::CertTemplate (OpenSSL 3.0 has no getter for the public key or the
// version). kInvalidArgument when the template cannot be read.
Result<RequestedCertificate> read_template(const OSSL_CRMF_CERTTEMPLATE* tmpl);

// The PKIStatus (0 accepted, 2 rejection, ...) of SI; nullopt when it cannot be read.
std::optional<int> pki_status(const OSSL_CMP_PKISI* si);

// The pieces of a PKIMessage this server needs beyond OpenSSL 3.0's getters.
struct MessageView {
  std::optional<std::string> sender_kid;  // senderKID bytes, when present
  int protection_nid = NID_undef;         // NID_undef: unprotected
  ossl::X509StackPtr extra_certs;         // never null; possibly empty
  std::optional<int> revocation_reason;   // rr only: CRLReason of the first RevDetails
};
// Decodes DER (a PKIMessage that d2i_OSSL_CMP_MSG accepted). kInvalidArgument if it does not
// decode.
Result<MessageView> view_message(std::span<const std::uint8_t> der, int body_type);

}  // namespace kmsd::cmp

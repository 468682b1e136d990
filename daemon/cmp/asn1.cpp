#include "daemon/cmp/asn1.hpp"

#include <openssl/err.h>

#include <ctime>

#include "daemon/ca/issuer.hpp"

namespace kmsd::cmp {
namespace asn1 {

// The templates follow RFC 4211 appendix B (CRMF, IMPLICIT TAGS) and RFC 4210 appendix F
// (CMP, EXPLICIT TAGS), as OpenSSL's crypto/crmf/crmf_asn.c and crypto/cmp/cmp_asn.c do.

ASN1_SEQUENCE(OptionalValidity) =
    {
        ASN1_EXP_OPT(OptionalValidity, notBefore, ASN1_TIME, 0),
        ASN1_EXP_OPT(OptionalValidity, notAfter, ASN1_TIME, 1),
} ASN1_SEQUENCE_END(OptionalValidity)

        ASN1_SEQUENCE(CertTemplate) =
            {
                ASN1_IMP_OPT(CertTemplate, version, ASN1_INTEGER, 0),
                ASN1_IMP_OPT(CertTemplate, serialNumber, ASN1_INTEGER, 1),
                ASN1_IMP_OPT(CertTemplate, signingAlg, X509_ALGOR, 2),
                ASN1_EXP_OPT(CertTemplate, issuer, X509_NAME, 3),
                ASN1_IMP_OPT(CertTemplate, validity, OptionalValidity, 4),
                ASN1_EXP_OPT(CertTemplate, subject, X509_NAME, 5),
                ASN1_IMP_OPT(CertTemplate, publicKey, X509_PUBKEY, 6),
                ASN1_IMP_OPT(CertTemplate, issuerUID, ASN1_BIT_STRING, 7),
                ASN1_IMP_OPT(CertTemplate, subjectUID, ASN1_BIT_STRING, 8),
                ASN1_IMP_SEQUENCE_OF_OPT(CertTemplate, extensions, X509_EXTENSION, 9),
} ASN1_SEQUENCE_END(CertTemplate)

                ASN1_SEQUENCE(RevDetails) =
                    {
                        ASN1_SIMPLE(RevDetails, certDetails, CertTemplate),
                        ASN1_SEQUENCE_OF_OPT(RevDetails, crlEntryDetails, X509_EXTENSION),
} ASN1_SEQUENCE_END(RevDetails)

    // PKIBody ::= CHOICE { ..., rr [11] RevReqContent, ... }; RevReqContent ::= SEQUENCE OF
    // RevDetails.
    ASN1_ITEM_TEMPLATE(RevReqBody) = ASN1_EX_TEMPLATE_TYPE(ASN1_TFLG_EXPLICIT |
                                                               ASN1_TFLG_SEQUENCE_OF,
                                                           11, RevReqBody, RevDetails)
        ASN1_ITEM_TEMPLATE_END(RevReqBody)

            ASN1_SEQUENCE(PkiStatusInfo) =
                {
                    ASN1_SIMPLE(PkiStatusInfo, status, ASN1_INTEGER),
                    ASN1_SEQUENCE_OF_OPT(PkiStatusInfo, statusString, ASN1_UTF8STRING),
                    ASN1_OPT(PkiStatusInfo, failInfo, ASN1_BIT_STRING),
} ASN1_SEQUENCE_END(PkiStatusInfo)

                    ASN1_SEQUENCE(PkiHeader) =
                        {
                            ASN1_SIMPLE(PkiHeader, pvno, ASN1_INTEGER),
                            ASN1_SIMPLE(PkiHeader, sender, GENERAL_NAME),
                            ASN1_SIMPLE(PkiHeader, recipient, GENERAL_NAME),
                            ASN1_EXP_OPT(PkiHeader, messageTime, ASN1_GENERALIZEDTIME, 0),
                            ASN1_EXP_OPT(PkiHeader, protectionAlg, X509_ALGOR, 1),
                            ASN1_EXP_OPT(PkiHeader, senderKID, ASN1_OCTET_STRING, 2),
                            ASN1_EXP_OPT(PkiHeader, recipKID, ASN1_OCTET_STRING, 3),
                            ASN1_EXP_OPT(PkiHeader, transactionID, ASN1_OCTET_STRING, 4),
                            ASN1_EXP_OPT(PkiHeader, senderNonce, ASN1_OCTET_STRING, 5),
                            ASN1_EXP_OPT(PkiHeader, recipNonce, ASN1_OCTET_STRING, 6),
                            ASN1_EXP_SEQUENCE_OF_OPT(PkiHeader, freeText, ASN1_UTF8STRING, 7),
                            ASN1_EXP_SEQUENCE_OF_OPT(PkiHeader, generalInfo, ASN1_ANY, 8),
} ASN1_SEQUENCE_END(PkiHeader)

                            ASN1_SEQUENCE(PkiMessage) =
                                {
                                    ASN1_SIMPLE(PkiMessage, header, PkiHeader),
                                    ASN1_SIMPLE(PkiMessage, body, ASN1_ANY),
                                    ASN1_EXP_OPT(PkiMessage, protection, ASN1_BIT_STRING, 0),
                                    ASN1_EXP_SEQUENCE_OF_OPT(PkiMessage, extraCerts, X509, 1),
} ASN1_SEQUENCE_END(PkiMessage)

                                    ASN1_VALUE
                                * decode(const ASN1_ITEM* item, std::span<const std::uint8_t> der) {
  if (der.empty() || der.size() > static_cast<std::size_t>(LONG_MAX)) return nullptr;
  const unsigned char* p = der.data();
  ASN1_VALUE* v = ASN1_item_d2i(nullptr, &p, static_cast<long>(der.size()), item);
  if (v != nullptr && p != der.data() + der.size()) {
    ASN1_item_free(v, item);  // trailing bytes: not exactly one value
    return nullptr;
  }
  return v;
}

ossl::Bytes encode(const ASN1_ITEM* item, const ASN1_VALUE* value) {
  unsigned char* out = nullptr;
  const int n = ASN1_item_i2d(value, &out, item);
  if (n <= 0 || out == nullptr) return {};
  ossl::Bytes bytes(out, out + n);
  OPENSSL_free(out);
  return bytes;
}

}  // namespace asn1

namespace {

std::optional<std::int64_t> unix_time(const ASN1_TIME* t) {
  if (t == nullptr) return std::nullopt;
  struct tm tm {};
  if (ASN1_TIME_to_tm(t, &tm) != 1) return std::nullopt;
  return static_cast<std::int64_t>(timegm(&tm));
}

}  // namespace

Result<RequestedCertificate> read_template(const OSSL_CRMF_CERTTEMPLATE* tmpl) {
  if (tmpl == nullptr)
    return make_error(ErrorCode::kInvalidArgument, "the request carries no certificate template");
  unsigned char* der = nullptr;
  const int n = i2d_OSSL_CRMF_CERTTEMPLATE(tmpl, &der);
  if (n <= 0 || der == nullptr) return ossl::crypto_error("encoding the certificate template");
  asn1::CertTemplatePtr view(reinterpret_cast<asn1::CertTemplate*>(
      asn1::decode(asn1::CertTemplate_it(), {der, static_cast<std::size_t>(n)})));
  OPENSSL_free(der);
  if (!view) {
    ERR_clear_error();
    return make_error(ErrorCode::kInvalidArgument,
                      "the certificate template is not a valid RFC 4211 CertTemplate");
  }
  RequestedCertificate out;
  if (view->publicKey != nullptr) {
    out.public_key.reset(X509_PUBKEY_get(view->publicKey));
    if (!out.public_key) {
      ERR_clear_error();
      return make_error(ErrorCode::kInvalidArgument,
                        "the public key in the certificate template is of a kind this server "
                        "cannot read");
    }
  }
  if (view->version != nullptr) {
    std::int64_t v = 0;
    if (ASN1_INTEGER_get_int64(&v, view->version) != 1) {
      ERR_clear_error();
      return make_error(ErrorCode::kInvalidArgument,
                        "the certificate template's version is not a small integer");
    }
    out.version = v;
  }
  if (view->subject != nullptr) out.subject = ca::name_to_string(view->subject);
  if (view->validity != nullptr) {
    out.not_before = unix_time(view->validity->notBefore);
    out.not_after = unix_time(view->validity->notAfter);
  }
  return out;
}

std::optional<int> pki_status(const OSSL_CMP_PKISI* si) {
  if (si == nullptr) return std::nullopt;
  unsigned char* der = nullptr;
  const int n = i2d_OSSL_CMP_PKISI(si, &der);
  if (n <= 0 || der == nullptr) {
    ERR_clear_error();
    return std::nullopt;
  }
  asn1::ItemPtr<asn1::PkiStatusInfo, asn1::PkiStatusInfo_it> view(
      reinterpret_cast<asn1::PkiStatusInfo*>(
          asn1::decode(asn1::PkiStatusInfo_it(), {der, static_cast<std::size_t>(n)})));
  OPENSSL_free(der);
  std::int64_t status = -1;
  if (!view || ASN1_INTEGER_get_int64(&status, view->status) != 1) {
    ERR_clear_error();
    return std::nullopt;
  }
  return static_cast<int>(status);
}

Result<MessageView> view_message(std::span<const std::uint8_t> der, int body_type) {
  asn1::PkiMessagePtr msg(
      reinterpret_cast<asn1::PkiMessage*>(asn1::decode(asn1::PkiMessage_it(), der)));
  if (!msg || msg->header == nullptr) {
    ERR_clear_error();
    return make_error(ErrorCode::kInvalidArgument, "the request is not a PKIMessage");
  }
  MessageView out;
  const asn1::PkiHeader* h = msg->header;
  if (h->senderKID != nullptr)
    out.sender_kid = std::string(reinterpret_cast<const char*>(ASN1_STRING_get0_data(h->senderKID)),
                                 static_cast<std::size_t>(ASN1_STRING_length(h->senderKID)));
  if (h->protectionAlg != nullptr) {
    const ASN1_OBJECT* oid = nullptr;
    X509_ALGOR_get0(&oid, nullptr, nullptr, h->protectionAlg);
    out.protection_nid = oid != nullptr ? OBJ_obj2nid(oid) : NID_undef;
    if (out.protection_nid == NID_undef) out.protection_nid = -1;  // protected, but unknown
  }
  out.extra_certs.reset(sk_X509_new_null());
  if (!out.extra_certs) return ossl::crypto_error("allocating a certificate list");
  for (int i = 0; msg->extraCerts != nullptr && i < sk_X509_num(msg->extraCerts); ++i) {
    X509* c = sk_X509_value(msg->extraCerts, i);
    if (X509_up_ref(c) != 1 || sk_X509_push(out.extra_certs.get(), c) <= 0) {
      X509_free(c);
      return ossl::crypto_error("copying the request's extraCerts");
    }
  }
  // RFC 4210 5.1.2: body tag 11 is rr.
  static constexpr int kRr = 11;
  if (body_type == kRr && msg->body != nullptr && msg->body->type == V_ASN1_OTHER) {
    const ASN1_STRING* raw = msg->body->value.asn1_string;
    auto* revs = reinterpret_cast<OPENSSL_STACK*>(asn1::decode(
        asn1::RevReqBody_it(),
        {ASN1_STRING_get0_data(raw), static_cast<std::size_t>(ASN1_STRING_length(raw))}));
    if (revs != nullptr) {
      if (OPENSSL_sk_num(revs) > 0) {
        const auto* details = static_cast<const asn1::RevDetails*>(OPENSSL_sk_value(revs, 0));
        if (details != nullptr && details->crlEntryDetails != nullptr) {
          auto* reason = static_cast<ASN1_ENUMERATED*>(
              X509V3_get_d2i(details->crlEntryDetails, NID_crl_reason, nullptr, nullptr));
          if (reason != nullptr) {
            out.revocation_reason = static_cast<int>(ASN1_ENUMERATED_get(reason));
            ASN1_ENUMERATED_free(reason);
          }
        }
      }
      ASN1_item_free(reinterpret_cast<ASN1_VALUE*>(revs), asn1::RevReqBody_it());
    }
    ERR_clear_error();
  }
  return out;
}

}  // namespace kmsd::cmp

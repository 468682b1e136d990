// Certificate requests (PKCS#10, PEM or DER) along the paths kmsd takes with them:
//  - POST /enroll/v1/enroll through the real enrollment routes (PEM parse, proof of possession,
//    the policy check, issuance on the SoftHSM token) with the fuzz user's pending token;
//  - the policy check alone for every profile, with the request's key and subject whatever its
//    signature (a mutated request rarely keeps a valid one), the subject's RFC 2253 text read
//    back as admit_identity() does, and the certificate built from the request's own
//    SubjectPublicKeyInfo (ca::issue, signed by a software CA: no token round trip needed).
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <string>

#include "daemon/ca/issuer.hpp"
#include "tests/fuzz/fuzz_kms.hpp"

namespace {

struct SoftwareCa {
  kmsd::ossl::EvpPkeyPtr key;
  kmsd::ossl::X509Ptr cert;
};

SoftwareCa& software_ca() {
  static SoftwareCa ca = [] {
    SoftwareCa c;
    c.key = std::move(kmsd::ca::generate_key(kmsd::hsm::KeyType::kEcP256).value());
    auto subject = kmsd::ca::parse_subject("/O=fuzz/CN=fuzz CA").value();
    kmsd::ca::IssueRequest r;
    r.profile = kmsd::ca::Profile::kCa;
    r.subject = subject.get();
    r.public_key = c.key.get();
    r.serial = {0x01};
    c.cert = std::move(kmsd::ca::issue(r, nullptr, c.key.get(), EVP_sha256()).value());
    return c;
  }();
  return ca;
}

kmsd::ossl::X509ReqPtr parse(const std::uint8_t* data, std::size_t size) {
  kmsd::ossl::BioPtr bio(BIO_new_mem_buf(data, static_cast<int>(size)));
  kmsd::ossl::X509ReqPtr req(PEM_read_bio_X509_REQ(bio.get(), nullptr, nullptr, nullptr));
  if (!req) {
    const unsigned char* p = data;
    req.reset(d2i_X509_REQ(nullptr, &p, static_cast<long>(size)));
  }
  kmsd::ossl::drain_errors();
  return req;
}

std::string to_pem(X509_REQ* req) {
  kmsd::ossl::BioPtr bio(BIO_new(BIO_s_mem()));
  if (PEM_write_bio_X509_REQ(bio.get(), req) != 1) {
    kmsd::ossl::drain_errors();
    return {};
  }
  char* p = nullptr;
  long n = BIO_get_mem_data(bio.get(), &p);
  return std::string(p, static_cast<std::size_t>(n));
}

void enroll_over_rest(const std::string& csr_text) {
  auto& k = kmsd::fuzz::kms();
  nlohmann::json body{{"user", k.user}, {"token", k.user_token}, {"csr", csr_text}};
  kmsd::api::Request req{kmsd::api::http::verb::post, "/enroll/v1/enroll", 11};
  req.body() = body.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  req.prepare_payload();
  kmsd::api::Peer peer;
  peer.address = "127.0.0.1:40002";
  peer.tls = true;
  auto res = kmsd::fuzz::tls_listener(req, peer);
  kmsd::fuzz::trace(req, res);
  if (res.result_int() >= 500 && res.result_int() != 503) __builtin_trap();
  k.renew_user_token();
}

void judge_and_issue(X509_REQ* req) {
  EVP_PKEY* key = X509_REQ_get0_pubkey(req);
  const X509_NAME* subject = X509_REQ_get_subject_name(req);
  kmsd::ossl::drain_errors();
  if (key == nullptr) return;
  auto policy = kmsd::fuzz::kms().policy->current();
  const long version = X509_REQ_get_version(req);
  bool admitted = false;
  for (auto profile :
       {kmsd::policy::RequestProfile::kSigning, kmsd::policy::RequestProfile::kEncryption,
        kmsd::policy::RequestProfile::kAdminClient, kmsd::policy::RequestProfile::kTlsServer}) {
    kmsd::policy::CertificateRequest cr;
    cr.profile = profile;
    cr.x509_version = version == 0 ? 3 : 1;
    cr.public_key = key;
    cr.validity = std::chrono::days(365);
    cr.subject = subject;
    if (policy->admit(cr).ok() && profile == kmsd::policy::RequestProfile::kSigning)
      admitted = true;
  }
  const std::string text = kmsd::ca::name_to_string(subject);
  (void)kmsd::policy::parse_rfc2253(text);
  (void)kmsd::policy::utf8_length(text);
  if (!admitted) return;
  auto& ca = software_ca();
  kmsd::ca::IssueRequest ir;
  ir.profile = kmsd::ca::Profile::kUser;
  ir.subject = subject;
  ir.public_key = key;
  ir.public_key_info = X509_REQ_get_X509_PUBKEY(req);
  ir.serial = {0x12, 0x34};
  ir.key_usage = {"digitalSignature", "nonRepudiation"};
  ir.extended_key_usage = {"emailProtection"};
  ir.email = "fuzz@example.com";
  auto cert = kmsd::ca::issue(ir, ca.cert.get(), ca.key.get(), EVP_sha256());
  // A certificate made for an admitted key must carry that key and verify under the CA.
  if (cert.ok() && !kmsd::ca::signed_by(cert->get(), ca.cert.get())) __builtin_trap();
  kmsd::ossl::drain_errors();
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  kmsd::fuzz::kms();
  software_ca();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size > 64 * 1024) return 0;
  auto req = parse(data, size);
  if (req) {
    judge_and_issue(req.get());
    enroll_over_rest(to_pem(req.get()));
  } else {
    // What a client would send as "csr" when it is not a request: the refusal path.
    enroll_over_rest(std::string(reinterpret_cast<const char*>(data), size));
  }
  return 0;
}

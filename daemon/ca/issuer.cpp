#include "daemon/ca/issuer.hpp"

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/pkcs12.h>
#include <openssl/rsa.h>

#include <ctime>

namespace kmsd::ca {

using ossl::crypto_error;

Result<ossl::X509NamePtr> parse_subject(std::string_view s) {
  if (s.empty() || s.front() != '/')
    return make_error(ErrorCode::kInvalidArgument,
                      "subject '" + std::string(s) + "' must have the form /O=Org/CN=Name");
  ossl::X509NamePtr name(X509_NAME_new());
  std::size_t i = 1;
  while (i <= s.size()) {
    std::string part;
    while (i < s.size() && s[i] != '/') {
      if (s[i] == '\\' && i + 1 < s.size()) ++i;
      part.push_back(s[i++]);
    }
    ++i;  // skip '/'
    if (part.empty()) {
      if (i > s.size()) break;
      return make_error(ErrorCode::kInvalidArgument,
                        "subject '" + std::string(s) + "' has an empty component");
    }
    auto eq = part.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == part.size())
      return make_error(ErrorCode::kInvalidArgument,
                        "subject component '" + part + "' is not of the form KEY=VALUE");
    std::string key = part.substr(0, eq), value = part.substr(eq + 1);
    if (X509_NAME_add_entry_by_txt(name.get(), key.c_str(), MBSTRING_UTF8,
                                   reinterpret_cast<const unsigned char*>(value.data()),
                                   static_cast<int>(value.size()), -1, 0) != 1)
      return crypto_error("subject attribute '" + key + "' is not accepted");
  }
  if (X509_NAME_entry_count(name.get()) == 0)
    return make_error(ErrorCode::kInvalidArgument, "subject is empty");
  return name;
}

std::string name_to_string(const X509_NAME* name) {
  ossl::BioPtr bio(BIO_new(BIO_s_mem()));
  X509_NAME_print_ex(bio.get(), name, 0, XN_FLAG_RFC2253 & ~ASN1_STRFLGS_ESC_MSB);
  char* p = nullptr;
  long n = BIO_get_mem_data(bio.get(), &p);
  return std::string(p, static_cast<std::size_t>(n));
}

Result<ossl::EvpPkeyPtr> generate_key(hsm::KeyType type) {
  EVP_PKEY* key = nullptr;
  switch (type) {
    case hsm::KeyType::kEcP256:
      key = EVP_EC_gen("P-256");
      break;
    case hsm::KeyType::kEcP384:
      key = EVP_EC_gen("P-384");
      break;
    case hsm::KeyType::kRsa2048:
      key = EVP_RSA_gen(2048);
      break;
    case hsm::KeyType::kRsa3072:
      key = EVP_RSA_gen(3072);
      break;
  }
  if (key == nullptr) return crypto_error("generating a key pair");
  return ossl::EvpPkeyPtr(key);
}

const EVP_MD* digest_by_name(std::string_view name) {
  if (name == "sha256") return EVP_sha256();
  if (name == "sha384") return EVP_sha384();
  if (name == "sha512") return EVP_sha512();
  return nullptr;
}

namespace {

Status add_ext(X509* cert, X509* issuer, int nid, const char* value) {
  X509V3_CTX ctx;
  X509V3_set_ctx(&ctx, issuer != nullptr ? issuer : cert, cert, nullptr, nullptr, 0);
  ossl::X509ExtPtr ext(X509V3_EXT_conf_nid(nullptr, &ctx, nid, value));
  if (!ext || X509_add_ext(cert, ext.get(), -1) != 1)
    return crypto_error(std::string("adding extension ") + OBJ_nid2sn(nid) + "=" + value);
  return {};
}

std::string join(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ",") + n;
  return out;
}

bool is_ip_address(const std::string& s) {
  ASN1_OCTET_STRING* ip = a2i_IPADDRESS(s.c_str());
  if (ip == nullptr) {
    ERR_clear_error();
    return false;
  }
  ASN1_OCTET_STRING_free(ip);
  return true;
}

}  // namespace

Result<X509PubkeyPtr> subject_public_key_info(EVP_PKEY* key) {
  if (key == nullptr) return make_error(ErrorCode::kInvalidArgument, "no public key");
  if (EVP_PKEY_is_a(key, "EC")) {
    // What OpenSSL's own EC method writes: id-ecPublicKey, the named curve, the encoded point.
    char group[64] = {0};
    std::size_t glen = 0, len = 0;
    int curve = NID_undef;
    if (EVP_PKEY_get_utf8_string_param(key, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof group,
                                       &glen) == 1) {
      curve = OBJ_txt2nid(group);
      if (curve == NID_undef) curve = EC_curve_nist2nid(group);
    }
    if (curve != NID_undef &&
        EVP_PKEY_get_octet_string_param(key, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, nullptr, 0,
                                        &len) == 1 &&
        len > 0) {
      auto* point = static_cast<unsigned char*>(OPENSSL_malloc(len));
      X509PubkeyPtr spki(X509_PUBKEY_new());
      if (point != nullptr && spki &&
          EVP_PKEY_get_octet_string_param(key, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, point, len,
                                          &len) == 1 &&
          X509_PUBKEY_set0_param(spki.get(), OBJ_nid2obj(NID_X9_62_id_ecPublicKey), V_ASN1_OBJECT,
                                 OBJ_nid2obj(curve), point, static_cast<int>(len)) == 1)
        return spki;
      OPENSSL_free(point);
      return crypto_error("reading the EC public key");
    }
    ERR_clear_error();  // explicit curve parameters: the general way below
  }
  X509_PUBKEY* raw = nullptr;
  if (X509_PUBKEY_set(&raw, key) != 1) return crypto_error("encoding the public key");
  return X509PubkeyPtr(raw);
}

namespace {

// Copies SPKI's algorithm and key bits into CERT (no key encoded or decoded).
Status set_public_key_info(X509* cert, const X509_PUBKEY* spki) {
  ASN1_OBJECT* alg = nullptr;
  const unsigned char* bits = nullptr;
  int len = 0;
  X509_ALGOR* algor = nullptr;
  if (X509_PUBKEY_get0_param(&alg, &bits, &len, &algor, const_cast<X509_PUBKEY*>(spki)) != 1 ||
      algor == nullptr || len <= 0)
    return make_error(ErrorCode::kInvalidArgument, "the public key info is empty");
  const ASN1_OBJECT* aobj = nullptr;
  int ptype = V_ASN1_UNDEF;
  const void* pval = nullptr;
  X509_ALGOR_get0(&aobj, &ptype, &pval, algor);
  void* param = nullptr;
  switch (ptype) {
    case V_ASN1_UNDEF:
    case V_ASN1_NULL:
      break;
    case V_ASN1_OBJECT:
      param = OBJ_dup(static_cast<const ASN1_OBJECT*>(pval));
      if (param == nullptr) return crypto_error("copying the public key parameters");
      break;
    case V_ASN1_SEQUENCE:
      param = ASN1_STRING_dup(static_cast<const ASN1_STRING*>(pval));
      if (param == nullptr) return crypto_error("copying the public key parameters");
      break;
    default:
      return make_error(ErrorCode::kInvalidArgument,
                        "the public key's algorithm parameters are of an unexpected type");
  }
  ASN1_OBJECT* algorithm = OBJ_dup(aobj);
  auto* key = static_cast<unsigned char*>(OPENSSL_memdup(bits, static_cast<std::size_t>(len)));
  if (algorithm == nullptr || key == nullptr ||
      X509_PUBKEY_set0_param(X509_get_X509_PUBKEY(cert), algorithm, ptype, param, key, len) != 1) {
    ASN1_OBJECT_free(algorithm);
    OPENSSL_free(key);
    if (ptype == V_ASN1_OBJECT) ASN1_OBJECT_free(static_cast<ASN1_OBJECT*>(param));
    if (ptype == V_ASN1_SEQUENCE) ASN1_STRING_free(static_cast<ASN1_STRING*>(param));
    return crypto_error("setting the public key");
  }
  return {};
}

}  // namespace

Result<ossl::X509Ptr> issue(const IssueRequest& req, X509* issuer_cert, EVP_PKEY* ca_key,
                            const EVP_MD* md) {
  if (req.subject == nullptr || (req.public_key == nullptr && req.public_key_info == nullptr) ||
      ca_key == nullptr || md == nullptr)
    return make_error(ErrorCode::kInvalidArgument, "incomplete certificate request");
  if (issuer_cert == nullptr && req.profile != Profile::kCa)
    return make_error(ErrorCode::kInvalidArgument, "only a CA certificate may be self-signed");
  if (req.serial.empty() || req.serial.size() > 20)
    return make_error(ErrorCode::kInvalidArgument, "serial must be 1 to 20 bytes");

  const bool v1 = req.profile == Profile::kUser && req.x509_version == 1;
  if (req.profile == Profile::kUser && req.x509_version != 1 && req.x509_version != 3)
    return make_error(ErrorCode::kInvalidArgument, "X.509 version must be 1 or 3");
  if (v1 && (!req.key_usage.empty() || !req.extended_key_usage.empty() || !req.email.empty() ||
             !req.crl_url.empty() || !req.ocsp_url.empty()))
    return make_error(ErrorCode::kInvalidArgument,
                      "an X.509 v1 certificate cannot carry extensions (usages, e-mail, URLs)");
  ossl::X509Ptr cert(X509_new());
  if (!cert || X509_set_version(cert.get(), v1 ? X509_VERSION_1 : X509_VERSION_3) != 1)
    return crypto_error("creating certificate");
  ossl::BignumPtr bn(BN_bin2bn(req.serial.data(), static_cast<int>(req.serial.size()), nullptr));
  ossl::Asn1IntegerPtr serial(BN_to_ASN1_INTEGER(bn.get(), nullptr));
  if (!serial || X509_set_serialNumber(cert.get(), serial.get()) != 1)
    return crypto_error("setting serial number");
  if (X509_set_subject_name(cert.get(), req.subject) != 1 ||
      X509_set_issuer_name(cert.get(), issuer_cert != nullptr ? X509_get_subject_name(issuer_cert)
                                                              : req.subject) != 1)
    return crypto_error("setting names");
  // Five minutes of back-dating tolerates clients whose clocks run slightly behind.
  if (X509_gmtime_adj(X509_getm_notBefore(cert.get()), -300) == nullptr ||
      X509_gmtime_adj(X509_getm_notAfter(cert.get()), static_cast<long>(req.validity.count())) ==
          nullptr)
    return crypto_error("setting validity");
  if (req.public_key_info != nullptr) {
    KMSD_TRY(set_public_key_info(cert.get(), req.public_key_info));
  } else if (X509_set_pubkey(cert.get(), req.public_key) != 1) {
    return crypto_error("setting public key");
  }

  X509* issuer = issuer_cert != nullptr ? issuer_cert : cert.get();
  // Built from a public key info, the certificate has no decoded key yet, and OpenSSL needs one
  // for most uses (X509_verify_cert, TLS): it is read back from its DER once.
  auto finish = [&req](ossl::X509Ptr signed_cert) -> Result<ossl::X509Ptr> {
    if (req.public_key_info == nullptr || !req.decode_public_key) return signed_cert;
    KMSD_ASSIGN_OR_RETURN(auto der, ossl::x509_to_der(signed_cert.get()));
    return ossl::x509_from_der(der);
  };
  if (v1) {
    if (X509_sign(cert.get(), ca_key, md) <= 0)
      return crypto_error("signing the certificate with the CA key on the token");
    return finish(std::move(cert));
  }
  KMSD_TRY(add_ext(cert.get(), issuer, NID_subject_key_identifier, "hash"));
  KMSD_TRY(add_ext(cert.get(), issuer, NID_authority_key_identifier, "keyid:always"));
  switch (req.profile) {
    case Profile::kCa:
      KMSD_TRY(add_ext(cert.get(), issuer, NID_basic_constraints, "critical,CA:TRUE"));
      KMSD_TRY(add_ext(cert.get(), issuer, NID_key_usage, "critical,keyCertSign,cRLSign"));
      break;
    case Profile::kAdminClient:
      KMSD_TRY(add_ext(cert.get(), issuer, NID_basic_constraints, "critical,CA:FALSE"));
      KMSD_TRY(add_ext(cert.get(), issuer, NID_key_usage, "critical,digitalSignature"));
      KMSD_TRY(add_ext(cert.get(), issuer, NID_ext_key_usage, "clientAuth"));
      break;
    case Profile::kTlsServer: {
      KMSD_TRY(add_ext(cert.get(), issuer, NID_basic_constraints, "critical,CA:FALSE"));
      KMSD_TRY(
          add_ext(cert.get(), issuer, NID_key_usage, "critical,digitalSignature,keyEncipherment"));
      KMSD_TRY(add_ext(cert.get(), issuer, NID_ext_key_usage, "serverAuth"));
      std::string san;
      for (const auto& n : req.dns_or_ip) {
        if (!san.empty()) san += ",";
        san += (is_ip_address(n) ? "IP:" : "DNS:") + n;
      }
      if (!san.empty()) KMSD_TRY(add_ext(cert.get(), issuer, NID_subject_alt_name, san.c_str()));
      break;
    }
    case Profile::kUser:
      KMSD_TRY(add_ext(cert.get(), issuer, NID_basic_constraints, "critical,CA:FALSE"));
      if (!req.key_usage.empty())
        KMSD_TRY(add_ext(cert.get(), issuer, NID_key_usage,
                         ("critical," + join(req.key_usage)).c_str()));
      if (!req.extended_key_usage.empty())
        KMSD_TRY(
            add_ext(cert.get(), issuer, NID_ext_key_usage, join(req.extended_key_usage).c_str()));
      if (!req.email.empty())
        KMSD_TRY(add_ext(cert.get(), issuer, NID_subject_alt_name, ("email:" + req.email).c_str()));
      break;
  }
  if (req.profile != Profile::kCa) {
    if (!req.crl_url.empty())
      KMSD_TRY(
          add_ext(cert.get(), issuer, NID_crl_distribution_points, ("URI:" + req.crl_url).c_str()));
    if (!req.ocsp_url.empty())
      KMSD_TRY(add_ext(cert.get(), issuer, NID_info_access, ("OCSP;URI:" + req.ocsp_url).c_str()));
  }
  if (X509_sign(cert.get(), ca_key, md) <= 0)
    return crypto_error("signing the certificate with the CA key on the token");
  return finish(std::move(cert));
}

Result<ossl::X509Ptr> issue_on_token(const IssueRequest& request, X509* issuer_cert,
                                     hsm::Token& token, const EVP_MD* md) {
  IssueRequest req = request;
  if (req.serial.empty()) {
    auto serial = new_serial(token);
    if (!serial.ok()) return serial.error();
    req.serial = std::move(serial).value();
  }
  KMSD_ASSIGN_OR_RETURN(auto key, token.ca_private_key());
  auto first = issue(req, issuer_cert, key.get(), md);
  if (first.ok() || first.error().code != ErrorCode::kCrypto) return first;
  KMSD_ASSIGN_OR_RETURN(auto fresh, token.ca_private_key());
  return issue(req, issuer_cert, fresh.get(), md);
}

Result<ossl::X509ReqPtr> make_ca_request(const X509_NAME* subject, EVP_PKEY* ca_public_key,
                                         EVP_PKEY* ca_signing_key, const EVP_MD* md) {
  ossl::X509ReqPtr req(X509_REQ_new());
  if (!req || X509_REQ_set_version(req.get(), X509_REQ_VERSION_1) != 1 ||
      X509_REQ_set_subject_name(req.get(), subject) != 1 ||
      X509_REQ_set_pubkey(req.get(), ca_public_key) != 1)
    return crypto_error("building the CA certificate request");
  X509V3_CTX ctx;
  X509V3_set_ctx(&ctx, nullptr, nullptr, req.get(), nullptr, 0);
  STACK_OF(X509_EXTENSION)* exts = sk_X509_EXTENSION_new_null();
  X509_EXTENSION* bc =
      X509V3_EXT_conf_nid(nullptr, &ctx, NID_basic_constraints, "critical,CA:TRUE");
  X509_EXTENSION* ku =
      X509V3_EXT_conf_nid(nullptr, &ctx, NID_key_usage, "critical,keyCertSign,cRLSign");
  bool ok = bc != nullptr && ku != nullptr && sk_X509_EXTENSION_push(exts, bc) > 0 &&
            sk_X509_EXTENSION_push(exts, ku) > 0 && X509_REQ_add_extensions(req.get(), exts) == 1;
  sk_X509_EXTENSION_pop_free(exts, X509_EXTENSION_free);
  if (!ok) return crypto_error("adding CA extensions to the request");
  if (X509_REQ_sign(req.get(), ca_signing_key, md) <= 0)
    return crypto_error("signing the request with the CA key on the token");
  return req;
}

Result<std::vector<std::uint8_t>> new_serial(hsm::Token& token) {
  KMSD_ASSIGN_OR_RETURN(auto rnd, token.random(16));
  std::vector<std::uint8_t> serial(rnd.data(), rnd.data() + rnd.size());
  serial[0] &= 0x7f;
  if (serial[0] == 0) serial[0] = 0x01;  // keep 16 octets: never a short serial
  return serial;
}

std::string serial_hex(const X509* cert) {
  const ASN1_INTEGER* s = X509_get0_serialNumber(cert);
  ossl::BignumPtr bn(ASN1_INTEGER_to_BN(s, nullptr));
  std::vector<std::uint8_t> bytes(static_cast<std::size_t>(BN_num_bytes(bn.get())));
  BN_bn2bin(bn.get(), bytes.data());
  return ossl::hex(bytes);
}

bool public_key_matches(X509* cert, EVP_PKEY* key) {
  if (cert == nullptr || key == nullptr) return false;
  EVP_PKEY* pub = X509_get0_pubkey(cert);
  ossl::X509Ptr decoded;
  if (pub == nullptr) {
    // Issued without its decoded key (IssueRequest::decode_public_key): read back from DER.
    ERR_clear_error();
    auto der = ossl::x509_to_der(cert);
    auto back = der.ok() ? ossl::x509_from_der(*der) : Result<ossl::X509Ptr>(der.error());
    if (!back.ok()) return false;
    decoded = std::move(*back);
    pub = X509_get0_pubkey(decoded.get());
  }
  return pub != nullptr && EVP_PKEY_eq(pub, key) == 1;
}

bool signed_by(X509* cert, X509* issuer) {
  EVP_PKEY* pub = X509_get0_pubkey(issuer);
  bool ok = pub != nullptr && X509_verify(cert, pub) == 1;
  ERR_clear_error();
  return ok;
}

Result<std::vector<std::uint8_t>> make_pkcs12(EVP_PKEY* key, X509* cert, X509* ca,
                                              const std::string& friendly_name,
                                              const SecretBytes& passphrase) {
  if (passphrase.empty())
    return make_error(ErrorCode::kInvalidArgument, "a PKCS#12 passphrase must not be empty");
  std::string pass(passphrase.view());  // PKCS12_create wants a C string
  ossl::X509StackPtr chain(sk_X509_new_null());
  if (ca != nullptr) {
    X509_up_ref(ca);
    sk_X509_push(chain.get(), ca);
  }
  ossl::Pkcs12Ptr p12(
      PKCS12_create(pass.c_str(), friendly_name.c_str(), key, cert, chain.get(), 0, 0, 0, 0, 0));
  secure_wipe(pass.data(), pass.size());
  if (!p12) return crypto_error("building the PKCS#12 file");
  int n = i2d_PKCS12(p12.get(), nullptr);
  if (n <= 0) return crypto_error("encoding the PKCS#12 file");
  std::vector<std::uint8_t> out(static_cast<std::size_t>(n));
  unsigned char* p = out.data();
  i2d_PKCS12(p12.get(), &p);
  return out;
}

Result<std::vector<std::uint8_t>> make_pkcs12_bundle(const std::vector<Pkcs12Entry>& entries,
                                                     X509* ca, const SecretBytes& passphrase) {
  if (passphrase.empty())
    return make_error(ErrorCode::kInvalidArgument, "a PKCS#12 passphrase must not be empty");
  if (entries.empty())
    return make_error(ErrorCode::kInvalidArgument, "a PKCS#12 bundle needs at least one key");
  constexpr int kIter = PKCS12_DEFAULT_ITER;
  std::string pass(passphrase.view());
  struct Wipe {
    std::string& s;
    ~Wipe() { secure_wipe(s.data(), s.size()); }
  } wipe{pass};
  using BagStack = STACK_OF(PKCS12_SAFEBAG);
  using SafeStack = STACK_OF(PKCS7);
  auto free_bags = [](BagStack* b) { sk_PKCS12_SAFEBAG_pop_free(b, PKCS12_SAFEBAG_free); };
  auto free_safes = [](SafeStack* s) { sk_PKCS7_pop_free(s, PKCS7_free); };
  std::unique_ptr<BagStack, decltype(free_bags)> cert_bags(nullptr, free_bags);
  std::unique_ptr<BagStack, decltype(free_bags)> key_bags(nullptr, free_bags);
  std::unique_ptr<SafeStack, decltype(free_safes)> safes(nullptr, free_safes);

  auto add_cert = [&](X509* cert, const std::string& name,
                      const std::vector<unsigned char>& key_id) -> Status {
    // A certificate read back from a PKCS#12 (kmsctl keys --p12, renew) carries its old
    // friendlyName and localKeyID as alias and keyid (PKCS12_parse keeps them), and
    // PKCS12_add_cert copies those into the bag: named again below, the bag would hold each
    // attribute twice, which OpenSSL refuses. The bag gets a copy without them.
    ossl::X509Ptr plain(X509_dup(cert));
    if (!plain || X509_alias_set1(plain.get(), nullptr, 0) != 1 ||
        X509_keyid_set1(plain.get(), nullptr, 0) != 1)
      return crypto_error("copying a certificate for the PKCS#12 file");
    BagStack* raw = cert_bags.release();
    PKCS12_SAFEBAG* bag = PKCS12_add_cert(&raw, plain.get());
    cert_bags.reset(raw);
    if (bag == nullptr) return crypto_error("adding a certificate to the PKCS#12 file");
    if (!name.empty() && PKCS12_add_friendlyname(bag, name.c_str(), -1) != 1)
      return crypto_error("naming a certificate in the PKCS#12 file");
    if (!key_id.empty() && PKCS12_add_localkeyid(bag, const_cast<unsigned char*>(key_id.data()),
                                                 static_cast<int>(key_id.size())) != 1)
      return crypto_error("pairing a certificate with its key in the PKCS#12 file");
    return {};
  };
  for (const auto& e : entries) {
    if (e.key == nullptr || e.cert == nullptr)
      return make_error(ErrorCode::kInvalidArgument, "a PKCS#12 entry needs a key and a cert");
    if (!public_key_matches(e.cert, e.key))
      return make_error(ErrorCode::kInvalidArgument,
                        "the certificate '" + e.friendly_name + "' is not for its key");
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    if (X509_digest(e.cert, EVP_sha1(), md, &len) != 1)
      return crypto_error("computing a PKCS#12 localKeyId");
    std::vector<unsigned char> key_id(md, md + len);  // as PKCS12_create does
    KMSD_TRY(add_cert(e.cert, e.friendly_name, key_id));
    BagStack* raw = key_bags.release();
    PKCS12_SAFEBAG* bag = PKCS12_add_key(&raw, e.key, 0, kIter, NID_aes_256_cbc, pass.c_str());
    key_bags.reset(raw);
    if (bag == nullptr) return crypto_error("adding a key to the PKCS#12 file");
    if ((!e.friendly_name.empty() &&
         PKCS12_add_friendlyname(bag, e.friendly_name.c_str(), -1) != 1) ||
        PKCS12_add_localkeyid(bag, key_id.data(), static_cast<int>(key_id.size())) != 1)
      return crypto_error("naming a key in the PKCS#12 file");
  }
  if (ca != nullptr) KMSD_TRY(add_cert(ca, "", {}));
  {
    // The certificates in an encrypted safe; the keys, already shrouded, in a plain one.
    SafeStack* raw = nullptr;
    const int certs_ok =
        PKCS12_add_safe(&raw, cert_bags.get(), NID_aes_256_cbc, kIter, pass.c_str());
    safes.reset(raw);
    if (certs_ok != 1 || PKCS12_add_safe(&raw, key_bags.get(), -1, 0, nullptr) != 1)
      return crypto_error("building the PKCS#12 safes");
  }
  ossl::Pkcs12Ptr p12(PKCS12_add_safes(safes.get(), 0));
  if (!p12) return crypto_error("building the PKCS#12 file");
  if (PKCS12_set_mac(p12.get(), pass.c_str(), -1, nullptr, 0, kIter, EVP_sha256()) != 1)
    return crypto_error("protecting the PKCS#12 file");
  int n = i2d_PKCS12(p12.get(), nullptr);
  if (n <= 0) return crypto_error("encoding the PKCS#12 file");
  std::vector<std::uint8_t> out(static_cast<std::size_t>(n));
  unsigned char* p = out.data();
  i2d_PKCS12(p12.get(), &p);
  return out;
}

namespace {
std::int64_t asn1_time_unix(const ASN1_TIME* t) {
  struct tm tm {};
  if (ASN1_TIME_to_tm(t, &tm) != 1) return 0;
  return static_cast<std::int64_t>(timegm(&tm));
}
}  // namespace

std::int64_t not_after_unix(const X509* cert) {
  return asn1_time_unix(X509_get0_notAfter(cert));
}
std::int64_t not_before_unix(const X509* cert) {
  return asn1_time_unix(X509_get0_notBefore(cert));
}

}  // namespace kmsd::ca

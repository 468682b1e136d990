// Certificate issuance against a throw-away token: every signature made on the token.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <openssl/err.h>
#include <openssl/pkcs12.h>

#include "daemon/ca/issuer.hpp"
#include "hsm/token.hpp"
#include "tests/support/logged_in_token.hpp"

namespace kmsd {
namespace {

using ::testing::HasSubstr;

class IssuerTest : public testing::TokenSandbox {
 protected:
  void SetUp() override {
    TokenSandbox::SetUp();
    tok = testing::open_logged_in_token(token());
    ASSERT_NE(tok, nullptr);
    ASSERT_TRUE(tok->generate_ca_key(hsm::KeyType::kEcP256).ok());
    auto pub = tok->ca_public_key();
    ASSERT_TRUE(pub.ok());
    ca_pub = std::move(*pub);
    auto subject = ca::parse_subject("/O=Test/CN=Test CA");
    ASSERT_TRUE(subject.ok());
    ca::IssueRequest req;
    req.profile = ca::Profile::kCa;
    req.subject = subject->get();
    req.public_key = ca_pub.get();
    req.validity = std::chrono::hours(24 * 365);
    auto cert = ca::issue_on_token(req, nullptr, *tok, EVP_sha256());
    ASSERT_TRUE(cert.ok()) << cert.error().message;
    ca_cert = std::move(*cert);
  }

  // A certificate for a fresh software key, signed by the CA on the token.
  struct Leaf {
    ossl::EvpPkeyPtr key;
    Result<ossl::X509Ptr> cert = Error{};
  };
  Leaf issue_leaf(ca::Profile profile, const std::string& cn, hsm::KeyType type,
                  std::vector<std::string> names = {}) {
    Leaf leaf;
    leaf.key = std::move(ca::generate_key(type).value());
    auto subject = ca::parse_subject("/CN=" + cn);
    ca::IssueRequest req;
    req.profile = profile;
    req.subject = subject->get();
    req.public_key = leaf.key.get();
    req.dns_or_ip = std::move(names);
    leaf.cert = ca::issue_on_token(req, ca_cert.get(), *tok, EVP_sha256());
    return leaf;
  }

  std::unique_ptr<hsm::Token> tok;
  ossl::EvpPkeyPtr ca_pub;
  ossl::X509Ptr ca_cert;
};

TEST(SubjectTest, OneLineFormParsesIntoOrderedAttributes) {
  auto n = ca::parse_subject("/C=DE/O=Example\\/Sub/CN=Jane Doe");
  ASSERT_TRUE(n.ok()) << n.error().message;
  EXPECT_EQ(ca::name_to_string(n->get()), "CN=Jane Doe,O=Example/Sub,C=DE");
}

TEST(SubjectTest, MalformedSubjectsSayWhatIsWrong) {
  EXPECT_THAT(ca::parse_subject("CN=x").error().message, HasSubstr("must have the form"));
  EXPECT_THAT(ca::parse_subject("/CN").error().message, HasSubstr("KEY=VALUE"));
  EXPECT_THAT(ca::parse_subject("/CN=a//O=b").error().message, HasSubstr("empty component"));
  EXPECT_FALSE(ca::parse_subject("/NOPE=x").ok());
}

TEST_F(IssuerTest, SelfSignedCaIsV3AndVerifiesWithTheTokenKey) {
  EXPECT_EQ(X509_get_version(ca_cert.get()), X509_VERSION_3);
  EXPECT_EQ(X509_check_ca(ca_cert.get()), 1);
  EXPECT_TRUE(ca::signed_by(ca_cert.get(), ca_cert.get()));
  EXPECT_TRUE(ca::public_key_matches(ca_cert.get(), ca_pub.get()));
  EXPECT_EQ(ca::serial_hex(ca_cert.get()).size(), 32u);
  EXPECT_EQ(X509_get_key_usage(ca_cert.get()),
            static_cast<uint32_t>(KU_KEY_CERT_SIGN | KU_CRL_SIGN));
}

TEST_F(IssuerTest, AdminClientCertificateChainsToTheCaAndIsForClientAuthOnly) {
  auto [key, cert] = issue_leaf(ca::Profile::kAdminClient, "alice", hsm::KeyType::kEcP256);
  ASSERT_TRUE(cert.ok()) << cert.error().message;
  EXPECT_TRUE(ca::signed_by(cert->get(), ca_cert.get()));
  EXPECT_EQ(X509_check_ca(cert->get()), 0);
  EXPECT_EQ(X509_get_extended_key_usage(cert->get()), static_cast<uint32_t>(XKU_SSL_CLIENT));
  ossl::X509StorePtr store(X509_STORE_new());
  X509_STORE_add_cert(store.get(), ca_cert.get());
  ossl::X509StoreCtxPtr ctx(X509_STORE_CTX_new());
  X509_STORE_CTX_init(ctx.get(), store.get(), cert->get(), nullptr);
  X509_STORE_CTX_set_purpose(ctx.get(), X509_PURPOSE_SSL_CLIENT);
  EXPECT_EQ(X509_verify_cert(ctx.get()), 1)
      << X509_verify_cert_error_string(X509_STORE_CTX_get_error(ctx.get()));
}

// The enrollment path certifies a CSR's SubjectPublicKeyInfo (or one read from the key's
// parameters) as it is: the certificate must carry exactly the key X509_set_pubkey would have
// put there, chain to the CA, and come back with a usable decoded key.
TEST_F(IssuerTest, PublicKeyInfoIsCertifiedAsTheSameKeyAsThePublicKeyItself) {
  for (auto type : {hsm::KeyType::kEcP256, hsm::KeyType::kEcP384, hsm::KeyType::kRsa2048}) {
    SCOPED_TRACE(hsm::to_string(type));
    auto key = ca::generate_key(type);
    ASSERT_TRUE(key.ok());
    auto spki = ca::subject_public_key_info(key->get());
    ASSERT_TRUE(spki.ok()) << spki.error().message;
    // The same bytes as OpenSSL's own encoding of the public key.
    unsigned char* mine = nullptr;
    unsigned char* theirs = nullptr;
    const int n1 = i2d_X509_PUBKEY(spki->get(), &mine);
    const int n2 = i2d_PUBKEY(key->get(), &theirs);
    ASSERT_GT(n1, 0);
    EXPECT_EQ(std::vector<unsigned char>(mine, mine + n1),
              std::vector<unsigned char>(theirs, theirs + n2));
    OPENSSL_free(mine);
    OPENSSL_free(theirs);

    auto subject = ca::parse_subject("/CN=spki");
    ca::IssueRequest req;
    req.profile = ca::Profile::kUser;
    req.subject = subject->get();
    req.public_key_info = spki->get();  // PUBLIC_KEY left empty: not needed
    req.key_usage = {"digitalSignature"};
    req.email = "spki@example.com";
    auto cert = ca::issue_on_token(req, ca_cert.get(), *tok, EVP_sha256());
    ASSERT_TRUE(cert.ok()) << cert.error().message;
    EXPECT_TRUE(ca::public_key_matches(cert->get(), key->get()));
    EXPECT_TRUE(ca::signed_by(cert->get(), ca_cert.get()));
    ossl::X509StorePtr store(X509_STORE_new());
    X509_STORE_add_cert(store.get(), ca_cert.get());
    ossl::X509StoreCtxPtr ctx(X509_STORE_CTX_new());
    X509_STORE_CTX_init(ctx.get(), store.get(), cert->get(), nullptr);
    EXPECT_EQ(X509_verify_cert(ctx.get()), 1)
        << X509_verify_cert_error_string(X509_STORE_CTX_get_error(ctx.get()));
  }
}

TEST_F(IssuerTest, ServerCertificateCarriesDnsAndIpNames) {
  auto [key, cert] = issue_leaf(ca::Profile::kTlsServer, "localhost", hsm::KeyType::kEcP256,
                                {"localhost", "127.0.0.1", "::1"});
  ASSERT_TRUE(cert.ok()) << cert.error().message;
  EXPECT_EQ(X509_check_host(cert->get(), "localhost", 0, 0, nullptr), 1);
  EXPECT_EQ(X509_check_ip_asc(cert->get(), "127.0.0.1", 0), 1);
  EXPECT_EQ(X509_check_ip_asc(cert->get(), "::1", 0), 1);
  EXPECT_NE(X509_check_host(cert->get(), "evil.example", 0, 0, nullptr), 1);
}

TEST_F(IssuerTest, SigningSurvivesALostTokenSession) {
  tok->close_all_sessions_for_test();
  auto [key, cert] = issue_leaf(ca::Profile::kAdminClient, "after-outage", hsm::KeyType::kEcP256);
  ASSERT_TRUE(cert.ok()) << cert.error().message;
  EXPECT_TRUE(ca::signed_by(cert->get(), ca_cert.get()));
}

TEST_F(IssuerTest, OnlyACaCertificateMayBeSelfSigned) {
  auto key = ca::generate_key(hsm::KeyType::kEcP256);
  auto subject = ca::parse_subject("/CN=x");
  ca::IssueRequest req;
  req.subject = subject->get();
  req.public_key = key->get();
  auto r = ca::issue_on_token(req, nullptr, *tok, EVP_sha256());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kInvalidArgument);
}

TEST_F(IssuerTest, Pkcs12OpensWithThePassphraseOnlyAndHoldsKeyCertAndCa) {
  auto [key, cert] = issue_leaf(ca::Profile::kAdminClient, "bob", hsm::KeyType::kRsa2048);
  ASSERT_TRUE(cert.ok());
  auto der = ca::make_pkcs12(key.get(), cert->get(), ca_cert.get(), "bob",
                             SecretBytes::from_string("s3cret passphrase"));
  ASSERT_TRUE(der.ok()) << der.error().message;
  const unsigned char* p = der->data();
  ossl::Pkcs12Ptr p12(d2i_PKCS12(nullptr, &p, static_cast<long>(der->size())));
  ASSERT_TRUE(p12);
  EVP_PKEY* k = nullptr;
  X509* c = nullptr;
  STACK_OF(X509)* chain = nullptr;
  EXPECT_NE(PKCS12_parse(p12.get(), "wrong", &k, &c, &chain), 1);
  ERR_clear_error();
  ASSERT_EQ(PKCS12_parse(p12.get(), "s3cret passphrase", &k, &c, &chain), 1);
  ossl::EvpPkeyPtr kk(k);
  ossl::X509Ptr cc(c);
  ossl::X509StackPtr ch(chain);
  EXPECT_EQ(X509_cmp(cc.get(), cert->get()), 0);
  EXPECT_EQ(EVP_PKEY_eq(kk.get(), key.get()), 1);
  ASSERT_EQ(sk_X509_num(ch.get()), 1);
  EXPECT_EQ(X509_cmp(sk_X509_value(ch.get(), 0), ca_cert.get()), 0);
  EXPECT_FALSE(ca::make_pkcs12(key.get(), cert->get(), ca_cert.get(), "bob", SecretBytes()).ok());
}

// kmsctl keys --p12 and renew bundle certificates read back from the user's PKCS#12:
// PKCS12_parse leaves their old friendlyName and localKeyID on them, and the new file must
// still name each bag once (it used to fail with "duplicate attribute").
TEST_F(IssuerTest, Pkcs12BundleTakesCertificatesReadBackFromAPkcs12) {
  auto [sign_key, sign_cert] =
      issue_leaf(ca::Profile::kAdminClient, "carol", hsm::KeyType::kEcP256);
  auto [enc_key, enc_cert] =
      issue_leaf(ca::Profile::kAdminClient, "carol-enc", hsm::KeyType::kEcP256);
  ASSERT_TRUE(sign_cert.ok());
  ASSERT_TRUE(enc_cert.ok());
  const auto pass = SecretBytes::from_string("s3cret passphrase");
  auto first = ca::make_pkcs12_bundle({{sign_key.get(), sign_cert->get(), "carol signing"},
                                       {enc_key.get(), enc_cert->get(), "carol encryption v1"}},
                                      ca_cert.get(), pass);
  ASSERT_TRUE(first.ok()) << first.error().message;
  const unsigned char* p = first->data();
  ossl::Pkcs12Ptr p12(d2i_PKCS12(nullptr, &p, static_cast<long>(first->size())));
  ASSERT_TRUE(p12);
  EVP_PKEY* k = nullptr;
  X509* c = nullptr;
  STACK_OF(X509)* chain = nullptr;
  ASSERT_EQ(PKCS12_parse(p12.get(), "s3cret passphrase", &k, &c, &chain), 1);
  ossl::EvpPkeyPtr read_key(k);
  ossl::X509Ptr read_cert(c);
  ossl::X509StackPtr read_chain(chain);
  ASSERT_NE(X509_alias_get0(read_cert.get(), nullptr), nullptr);  // what made it fail

  auto again = ca::make_pkcs12_bundle({{read_key.get(), read_cert.get(), "carol signing"}},
                                      ca_cert.get(), pass);
  ASSERT_TRUE(again.ok()) << again.error().message;
  p = again->data();
  ossl::Pkcs12Ptr p12b(d2i_PKCS12(nullptr, &p, static_cast<long>(again->size())));
  ASSERT_TRUE(p12b);
  // Every bag has at most one friendlyName and one localKeyID.
  auto free_safes = [](STACK_OF(PKCS7) * st) { sk_PKCS7_pop_free(st, PKCS7_free); };
  std::unique_ptr<STACK_OF(PKCS7), decltype(free_safes)> safes(PKCS12_unpack_authsafes(p12b.get()),
                                                               free_safes);
  ASSERT_TRUE(safes);
  int bags_seen = 0;
  for (int i = 0; i < sk_PKCS7_num(safes.get()); ++i) {
    PKCS7* safe = sk_PKCS7_value(safes.get(), i);
    STACK_OF(PKCS12_SAFEBAG)* bags = OBJ_obj2nid(safe->type) == NID_pkcs7_encrypted
                                         ? PKCS12_unpack_p7encdata(safe, "s3cret passphrase", -1)
                                         : PKCS12_unpack_p7data(safe);
    ASSERT_NE(bags, nullptr);
    for (int j = 0; j < sk_PKCS12_SAFEBAG_num(bags); ++j) {
      const STACK_OF(X509_ATTRIBUTE)* attrs =
          PKCS12_SAFEBAG_get0_attrs(sk_PKCS12_SAFEBAG_value(bags, j));
      EXPECT_LE(X509at_get_attr_by_NID(attrs, NID_friendlyName,
                                       X509at_get_attr_by_NID(attrs, NID_friendlyName, -1)),
                -1);
      EXPECT_LE(X509at_get_attr_by_NID(attrs, NID_localKeyID,
                                       X509at_get_attr_by_NID(attrs, NID_localKeyID, -1)),
                -1);
      ++bags_seen;
    }
    sk_PKCS12_SAFEBAG_pop_free(bags, PKCS12_SAFEBAG_free);
  }
  EXPECT_EQ(bags_seen, 3);  // the key, its certificate, the CA
  // And it opens as any PKCS#12.
  EVP_PKEY* k2 = nullptr;
  X509* c2 = nullptr;
  ASSERT_EQ(PKCS12_parse(p12b.get(), "s3cret passphrase", &k2, &c2, nullptr), 1);
  ossl::EvpPkeyPtr kk2(k2);
  ossl::X509Ptr cc2(c2);
  EXPECT_EQ(X509_cmp(cc2.get(), sign_cert->get()), 0);
}

}  // namespace
}  // namespace kmsd

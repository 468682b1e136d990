// PolicyCheck: every certificate request and every user being enabled is judged against the
// [policy] snapshot in force, and every refusal says what was found, what is allowed and why.
#include "daemon/policy/policy_check.hpp"

#include <openssl/evp.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "daemon/ca/issuer.hpp"
#include "tests/support/sandbox.hpp"

namespace kmsd::policy {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using namespace std::chrono_literals;

constexpr std::chrono::seconds kDay = 24h;

PolicyCheck make_check(config::PolicyConfig cfg = {}) {
  auto r = PolicyCheck::create(std::move(cfg));
  EXPECT_TRUE(r.ok()) << r.error().message;
  return std::move(r).value();
}

ossl::EvpPkeyPtr ec_key(const char* curve) {
  ossl::EvpPkeyPtr k(EVP_EC_gen(curve));
  EXPECT_NE(k, nullptr);
  return k;
}

ossl::EvpPkeyPtr rsa_key(unsigned bits) {
  ossl::EvpPkeyPtr k(EVP_RSA_gen(bits));
  EXPECT_NE(k, nullptr);
  return k;
}

ossl::EvpPkeyPtr ed25519_key() {
  ossl::EvpPkeyPtr k(EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519"));
  EXPECT_NE(k, nullptr);
  return k;
}

ossl::X509NamePtr name(std::string_view one_line) {
  auto r = ca::parse_subject(one_line);
  EXPECT_TRUE(r.ok()) << r.error().message;
  return std::move(r).value();
}

// A request that passes the default policy; each test spoils one thing.
struct Fixture {
  ossl::EvpPkeyPtr key = ec_key("P-256");
  ossl::X509NamePtr subject = name("/CN=Ann Example/emailAddress=ann@example.org");
  CertificateRequest req() const {
    CertificateRequest r;
    r.profile = RequestProfile::kSigning;
    r.x509_version = 3;
    r.public_key = key.get();
    r.validity = 365 * kDay;
    r.subject = subject.get();
    r.email = "ann@example.org";
    return r;
  }
};

void expect_refused(const Status& s, const ::testing::Matcher<const std::string&>& m) {
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.error().code, ErrorCode::kInvalidArgument) << s.error().message;
  EXPECT_THAT(s.error().message, m);
}

void expect_admitted(const Status& s) {
  EXPECT_TRUE(s.ok()) << s.error().message;
}

config::PolicyConfig v1_allowed_without_extensions() {
  config::PolicyConfig cfg;
  cfg.x509_versions = {1, 3};
  cfg.signing.key_usage.clear();
  cfg.signing.extended_key_usage.clear();
  return cfg;
}

UserIdentity ann() {
  return UserIdentity{"ann", "ann@example.org", "Ann Example", ""};
}

std::string cn_of(const X509_NAME* n) {
  const int at = X509_NAME_get_index_by_NID(n, NID_commonName, -1);
  if (at < 0) return "<no CN>";
  unsigned char* utf8 = nullptr;
  const int len = ASN1_STRING_to_UTF8(&utf8, X509_NAME_ENTRY_get_data(X509_NAME_get_entry(n, at)));
  std::string out(reinterpret_cast<char*>(utf8), static_cast<std::size_t>(len));
  OPENSSL_free(utf8);
  return out;
}

// ---- the request as a whole ----

TEST(PolicyCheckTest, RequestWithinTheDefaultPolicyIsAdmitted) {
  Fixture f;
  expect_admitted(make_check().admit(f.req()));
}

// ---- X.509 version (Q231307) ----

TEST(PolicyCheckTest, V1RequestIsRefusedWhileV3OnlyNamingTheSetting) {
  Fixture f;
  CertificateRequest r = f.req();
  r.x509_version = 1;
  r.email.clear();
  expect_refused(make_check().admit(r),
                 HasSubstr("X.509 v1 certificates are disabled by policy (policy.x509_versions = "
                           "[3]); request a v3 certificate or allow v1 explicitly"));
}

TEST(PolicyCheckTest, V1IsAdmittedWhenConfiguredForAProfileWithoutExtensions) {
  Fixture f;
  CertificateRequest r = f.req();
  r.x509_version = 1;
  r.email.clear();
  expect_admitted(make_check(v1_allowed_without_extensions()).admit(r));
}

TEST(PolicyCheckTest, V1IsRefusedForAProfileThatNeedsExtensionsEvenWhenAllowed) {
  Fixture f;
  config::PolicyConfig cfg;
  cfg.x509_versions = {1, 3};
  const PolicyCheck check = make_check(cfg);
  CertificateRequest r = f.req();
  r.x509_version = 1;
  r.email.clear();
  expect_refused(check.admit(r),
                 AllOf(HasSubstr("a v1 certificate cannot carry extensions, and signing "
                                 "certificates need them"),
                       HasSubstr("policy.signing.key_usage = [digitalSignature, nonRepudiation]"),
                       HasSubstr("request a v3 certificate")));
  // Administrator certificates always carry extensions.
  r.profile = RequestProfile::kAdminClient;
  expect_refused(make_check(v1_allowed_without_extensions()).admit(r),
                 AllOf(HasSubstr("admin-client certificates need them"),
                       HasSubstr("always carry key usage [digitalSignature]")));
}

TEST(PolicyCheckTest, V1RequestAskingForUsagesOrAnEmailSanIsRefused) {
  Fixture f;
  const PolicyCheck check = make_check(v1_allowed_without_extensions());
  CertificateRequest r = f.req();
  r.x509_version = 1;
  expect_refused(check.admit(r),
                 HasSubstr("cannot carry a subjectAltName for \"ann@example.org\""));
  r.email.clear();
  r.key_usage = {"digitalSignature"};
  expect_refused(check.admit(r), HasSubstr("the request asks for key usages"));
}

TEST(PolicyCheckTest, VersionsOtherThanOneAndThreeAreNeverIssued) {
  Fixture f;
  CertificateRequest r = f.req();
  r.x509_version = 2;
  expect_refused(make_check().admit(r), HasSubstr("X.509 version 2 certificates are not issued"));
}

// ---- keys ----

TEST(PolicyCheckTest, DisallowedKeysAreRefusedNamingFoundAndAllowed) {
  Fixture f;
  const PolicyCheck check = make_check();
  const std::string allowed = "policy.key_types = [ec-p256, ec-p384, rsa-2048, rsa-3072]";
  const std::pair<ossl::EvpPkeyPtr, std::string> cases[] = {
      {rsa_key(1024), "rsa-1024"},
      {ec_key("P-521"), "ec-p521"},
      {ed25519_key(), "ed25519"},
  };
  for (const auto& [key, found] : cases) {
    SCOPED_TRACE(found);
    CertificateRequest r = f.req();
    r.public_key = key.get();
    expect_refused(check.admit(r), AllOf(HasSubstr("the request's key is " + found + ","),
                                         HasSubstr(allowed), HasSubstr("generate a key")));
  }
}

TEST(PolicyCheckTest, EcP384IsRefusedWhenThePolicyListsOnlyEcP256) {
  Fixture f;
  config::PolicyConfig cfg;
  cfg.key_types = {hsm::KeyType::kEcP256};
  const auto p384 = ec_key("P-384");
  CertificateRequest r = f.req();
  r.public_key = p384.get();
  expect_refused(make_check(cfg).admit(r),
                 HasSubstr("the request's key is ec-p384, which the policy does not allow "
                           "(policy.key_types = [ec-p256])"));
  // The same key passes the default policy.
  expect_admitted(make_check().admit(r));
}

TEST(PolicyCheckTest, AllowedKeysAreAdmitted) {
  Fixture f;
  const PolicyCheck check = make_check();
  for (const auto& key : {ec_key("P-256"), ec_key("P-384"), rsa_key(2048)}) {
    CertificateRequest r = f.req();
    r.public_key = key.get();
    expect_admitted(check.admit(r));
  }
}

TEST(PolicyCheckTest, RequestWithoutAKeyIsRefused) {
  Fixture f;
  CertificateRequest r = f.req();
  r.public_key = nullptr;
  expect_refused(make_check().admit(r), HasSubstr("carries no public key"));
}

// ---- validity ----

TEST(PolicyCheckTest, ValidityOverTheLimitIsRefused) {
  Fixture f;
  CertificateRequest r = f.req();
  r.validity = 825 * kDay;
  expect_admitted(make_check().admit(r));
  r.validity = 825 * kDay + 1s;
  expect_refused(make_check().admit(r),
                 HasSubstr("the requested validity of 826 days exceeds policy.max_validity_days "
                           "(825); request at most 825 days"));
  r.validity = 0s;
  expect_refused(make_check().admit(r), HasSubstr("must be positive"));
}

// ---- usages ----

TEST(PolicyCheckTest, UsagesWithinTheProfileAreAdmitted) {
  Fixture f;
  CertificateRequest r = f.req();
  r.key_usage = {"digitalSignature", "nonRepudiation"};
  r.extended_key_usage = {"emailProtection"};
  expect_admitted(make_check().admit(r));
  // OpenSSL's long name and the OID mean the same usage.
  r.extended_key_usage = {"E-mail Protection", "1.3.6.1.5.5.7.3.4"};
  expect_admitted(make_check().admit(r));
}

TEST(PolicyCheckTest, UsagesOutsideTheProfileAreRefused) {
  Fixture f;
  const PolicyCheck check = make_check();
  CertificateRequest r = f.req();
  r.key_usage = {"digitalSignature", "keyAgreement"};
  expect_refused(check.admit(r),
                 AllOf(HasSubstr("key usage keyAgreement is not allowed for signing certificates "
                                 "(policy.signing.key_usage = [digitalSignature, "
                                 "nonRepudiation])"),
                       HasSubstr("it belongs to the encryption profile")));
  r.key_usage.clear();
  r.extended_key_usage = {"clientAuth"};
  expect_refused(check.admit(r),
                 HasSubstr("extended key usage clientAuth is not allowed for signing certificates "
                           "(policy.signing.extended_key_usage = [emailProtection])"));
  r.extended_key_usage.clear();
  r.key_usage = {"keyCertSign"};
  expect_refused(check.admit(r), HasSubstr("key usage keyCertSign is not allowed"));
  r.key_usage = {"signature"};
  expect_refused(check.admit(r), HasSubstr("\"signature\", which is not a key usage"));

  r.profile = RequestProfile::kAdminClient;
  r.key_usage = {"nonRepudiation"};
  expect_refused(check.admit(r),
                 HasSubstr("not allowed for admin-client certificates (admin-client certificates "
                           "always carry key usage [digitalSignature])"));
}

TEST(PolicyCheckTest, EncryptionUsageMustSuitTheKeyAlgorithm) {
  Fixture f;
  const PolicyCheck check = make_check();
  CertificateRequest r = f.req();
  r.profile = RequestProfile::kEncryption;
  r.key_usage = {"keyEncipherment"};
  expect_refused(check.admit(r), HasSubstr("keyEncipherment needs an RSA key"));
  r.key_usage = {"keyAgreement"};
  expect_admitted(check.admit(r));
  const auto rsa = rsa_key(2048);
  r.public_key = rsa.get();
  expect_refused(check.admit(r), HasSubstr("keyAgreement needs an EC key"));
  r.key_usage = {"keyEncipherment"};
  expect_admitted(check.admit(r));
}

// ---- the request's subject ----

TEST(PolicyCheckTest, EmptySubjectIsRefused) {
  Fixture f;
  ossl::X509NamePtr empty(X509_NAME_new());
  CertificateRequest r = f.req();
  r.subject = empty.get();
  expect_refused(make_check().admit(r), HasSubstr("empty subject"));
}

TEST(PolicyCheckTest, RequestSubjectBeyondAnX520BoundIsRefused) {
  // A CSR can carry any string; one added with an explicit type bypasses OpenSSL's bounds.
  Fixture f;
  ossl::X509NamePtr n(X509_NAME_new());
  const std::string cn(70, 'c');
  ASSERT_EQ(X509_NAME_add_entry_by_txt(n.get(), "CN", V_ASN1_UTF8STRING,
                                       reinterpret_cast<const unsigned char*>(cn.data()),
                                       static_cast<int>(cn.size()), -1, 0),
            1);
  CertificateRequest r = f.req();
  r.subject = n.get();
  expect_refused(make_check().admit(r),
                 HasSubstr("the subject's CN is 70 characters; a certificate CN holds at most 64"));
}

TEST(PolicyCheckTest, RequestSubjectOverMaxSubjectLengthIsRefused) {
  Fixture f;
  config::PolicyConfig cfg;
  cfg.max_subject_length = 40;
  CertificateRequest r = f.req();
  expect_refused(make_check(cfg).admit(r),
                 AllOf(HasSubstr("\"emailAddress=ann@example.org,CN=Ann Example\" is 43 "
                                 "characters as RFC 2253 text"),
                       HasSubstr("policy.max_subject_length allows at most 40")));
}

TEST(PolicyCheckTest, RequestWithABadEmailIsRefused) {
  Fixture f;
  CertificateRequest r = f.req();
  r.email = "ann@@example.org";
  expect_refused(make_check().admit(r), HasSubstr("contains 2 '@' characters"));
}

// ---- identities (enable, before any token work) ----

TEST(PolicyCheckTest, OrdinaryIdentityIsAdmittedWithTheSubjectItWillGet) {
  const PolicyCheck check = make_check();
  expect_admitted(check.admit_identity(ann()));
  auto subject = check.subject_for(ann());
  ASSERT_TRUE(subject.ok()) << subject.error().message;
  EXPECT_EQ(ca::name_to_string(subject->get()), "emailAddress=ann@example.org,CN=Ann Example");
}

TEST(PolicyCheckTest, DisplayNameOver64CharactersIsRefusedNamingTheCnLimit) {
  const PolicyCheck check = make_check();
  UserIdentity u = ann();
  u.display_name = std::string(64, 'n');
  expect_admitted(check.admit_identity(u));
  u.display_name = std::string(65, 'n');
  expect_refused(check.admit_identity(u),
                 HasSubstr("the display name is 65 characters; a certificate CN holds at most 64"));
  u.display_name = std::string(71, 'n');
  expect_refused(check.admit_identity(u),
                 HasSubstr("the display name is 71 characters; a certificate CN holds at most 64"));
  // Characters, not bytes: 64 two-byte characters fit.
  u.display_name.clear();
  for (int i = 0; i < 64; ++i) u.display_name += "\xc3\xa9";
  expect_admitted(check.admit_identity(u));
}

TEST(PolicyCheckTest, DisplayNameOverThePolicyLimitNamesTheSetting) {
  config::PolicyConfig cfg;
  cfg.max_display_name_length = 40;
  UserIdentity u = ann();
  u.display_name = std::string(41, 'n');
  expect_refused(make_check(cfg).admit_identity(u),
                 HasSubstr("41 characters; policy.max_display_name_length allows at most 40"));
}

TEST(PolicyCheckTest, NamesWithDnSpecialCharactersAreAdmittedAndRoundTripExactly) {
  const PolicyCheck check = make_check();
  for (const std::string& display :
       std::vector<std::string>{"Doe, John", "R+D Team", "Say \"hi\"", "back\\slash", "#1 Fan",
                                "trailing space ", " leading space", "semi;colon", "<angle>",
                                "eq=ual", "a,+\"\\<>;=#b", "Zo\xc3\xab M\xc3\xbcller",
                                "\xe6\x9d\x8e\xe5\xb0\x8f\xe9\xbe\x8d", "O'Brien-Smith", "x #y "}) {
    SCOPED_TRACE(display);
    UserIdentity u = ann();
    u.display_name = display;
    expect_admitted(check.admit_identity(u));
    auto subject = check.subject_for(u);
    ASSERT_TRUE(subject.ok()) << subject.error().message;
    EXPECT_EQ(cn_of(subject->get()), display);
    // Both RFC 2253 forms read back as the very same name.
    for (unsigned long flags : {XN_FLAG_RFC2253, XN_FLAG_RFC2253 & ~ASN1_STRFLGS_ESC_MSB}) {
      ossl::BioPtr bio(BIO_new(BIO_s_mem()));
      X509_NAME_print_ex(bio.get(), subject->get(), 0, flags);
      char* p = nullptr;
      const long len = BIO_get_mem_data(bio.get(), &p);
      auto back = parse_rfc2253(std::string_view(p, static_cast<std::size_t>(len)));
      ASSERT_TRUE(back.ok()) << back.error().message;
      EXPECT_EQ(X509_NAME_cmp(back->get(), subject->get()), 0);
      EXPECT_EQ(cn_of(back->get()), display);
    }
  }
}

TEST(PolicyCheckTest, DnWithEscapedSeparatorsIsAdmittedAndRoundTrips) {
  const PolicyCheck check = make_check();
  UserIdentity u = ann();
  u.dn = "/C=DE/O=Example\\/Sub, Inc./OU=R+D/CN=Doe, John/emailAddress=ann@example.org";
  expect_admitted(check.admit_identity(u));
  auto subject = check.subject_for(u);
  ASSERT_TRUE(subject.ok()) << subject.error().message;
  EXPECT_EQ(ca::name_to_string(subject->get()),
            "emailAddress=ann@example.org,CN=Doe\\, John,OU=R\\+D,O=Example/Sub\\, Inc.,C=DE");
  auto back = parse_rfc2253(ca::name_to_string(subject->get()));
  ASSERT_TRUE(back.ok()) << back.error().message;
  EXPECT_EQ(X509_NAME_cmp(back->get(), subject->get()), 0);
}

TEST(PolicyCheckTest, DnProblemsNameTheAttributeAndItsBound) {
  const PolicyCheck check = make_check();
  UserIdentity u = ann();
  u.dn = "/OU=" + std::string(70, 'u') + "/CN=Ann";
  expect_refused(check.admit_identity(u),
                 HasSubstr("the DN's OU is 70 characters; a certificate OU holds at most 64"));
  u.dn = "/C=DEU/CN=Ann";
  expect_refused(check.admit_identity(u), HasSubstr("the DN's C is 3 characters"));
  u.dn = "/XX=1/CN=Ann";
  expect_refused(check.admit_identity(u), HasSubstr("unknown attribute \"XX\""));
  u.dn = "CN=Ann";
  expect_refused(check.admit_identity(u), HasSubstr("must have the form /O=Example/CN=Name"));
  u.dn = "/CN=Ann/emailAddress=other@example.org";
  expect_refused(check.admit_identity(u),
                 HasSubstr("the DN's emailAddress \"other@example.org\" is not the user's e-mail "
                           "address \"ann@example.org\""));
}

TEST(PolicyCheckTest, ControlCharactersAreRefused) {
  const PolicyCheck check = make_check();
  const std::pair<std::string, std::string> cases[] = {
      {"Ann\tExample", "U+0009"},
      {"Ann\nExample", "U+000A"},
      {std::string("Ann\0Example", 11), "U+0000"},
      {"Ann\x7f", "U+007F"},
      {"Ann\xc2\x85", "U+0085"},  // C1 NEXT LINE
  };
  for (const auto& [display, cp] : cases) {
    SCOPED_TRACE(cp);
    UserIdentity u = ann();
    u.display_name = display;
    expect_refused(check.admit_identity(u),
                   HasSubstr("the display name contains the control character " + cp));
  }
  UserIdentity u = ann();
  u.user_id = "ann\r";
  expect_refused(check.admit_identity(u), HasSubstr("the user id contains the control character"));
}

TEST(PolicyCheckTest, InvalidUtf8IsRefused) {
  const PolicyCheck check = make_check();
  for (const std::string& display :
       {std::string("Ann\xff"), std::string("Ann\xc3"), std::string("\xc0\xaf"),
        std::string("\xed\xa0\x80"), std::string("\xf4\x90\x80\x80")}) {
    UserIdentity u = ann();
    u.display_name = display;
    expect_refused(check.admit_identity(u), HasSubstr("the display name is not valid UTF-8"));
  }
}

TEST(PolicyCheckTest, BadEmailAddressesAreRefusedWithTheReason) {
  const PolicyCheck check = make_check();
  const std::string local64(64, 'l');
  const std::string domain189 = std::string(63, 'a') + "." + std::string(63, 'b') + "." +
                                std::string(57, 'c') + ".org";  // 189 characters
  const std::pair<std::string, std::string> cases[] = {
      {"", "the e-mail address is empty"},
      {"ann.example.org", "has no '@'"},
      {"ann@x@example.org", "contains 2 '@' characters"},
      {"@example.org", "has an empty local part"},
      {local64 + "l@example.org", "has a local part of 65 characters; at most 64"},
      {local64 + "@" + domain189 + "x", "is 255 characters; at most 254 are allowed (RFC 5321)"},
      {"ann@", "has an empty domain"},
      {"ann@-example.org", "invalid domain label \"-example\""},
      {"ann@example..org", "invalid domain label \"\""},
      {"ann@exa_mple.org", "invalid domain label \"exa_mple\""},
      {"ann@example.org.", "invalid domain label \"\""},
      {"ann@[192.0.2.1]", "domain literal"},
      {"j\xc3\xb6rg@example.org", "internationalized addresses (RFC 6531)"},
      {"ann@b\xc3\xbc"
       "cher.example",
       "internationalized addresses"},
      {".ann@example.org", "leading, trailing or doubled '.'"},
      {"ann..x@example.org", "leading, trailing or doubled '.'"},
      {"\"ann x\"@example.org", "quoted local parts are not supported"},
      {"ann x@example.org", "space or control character"},
  };
  for (const auto& [email, reason] : cases) {
    SCOPED_TRACE(email);
    UserIdentity u = ann();
    u.email = email;
    expect_refused(check.admit_identity(u), HasSubstr(reason));
  }
}

TEST(PolicyCheckTest, UsualEmailAddressesAreAdmitted) {
  const PolicyCheck check = make_check();
  for (const std::string& email :
       std::vector<std::string>{"a@b.co", "ann.o'neil+tag@mail.example.org",
                                "x_y-z!#$%&*=?^`{|}~@example-1.org", "ann@localhost"}) {
    SCOPED_TRACE(email);
    UserIdentity u = ann();
    u.email = email;
    expect_admitted(check.admit_identity(u));
  }
}

TEST(PolicyCheckTest, EmailOverThePolicyLimitNamesTheSetting) {
  config::PolicyConfig cfg;
  cfg.max_email_length = 20;
  UserIdentity u = ann();
  u.email = "ann.example@example.org";
  expect_refused(make_check(cfg).admit_identity(u),
                 HasSubstr("is 23 characters; policy.max_email_length allows at most 20"));
}

TEST(PolicyCheckTest, SubjectOverMaxSubjectLengthIsRefused) {
  const PolicyCheck check = make_check();
  UserIdentity u = ann();
  // Each attribute fits its own bound; together they exceed 256.
  u.dn = "/O=" + std::string(64, 'o') + "/OU=" + std::string(64, 'u') +
         "/OU=" + std::string(64, 'v') + "/CN=" + std::string(60, 'n');
  expect_refused(check.admit_identity(u),
                 AllOf(HasSubstr("is 266 characters as RFC 2253 text"),
                       HasSubstr("policy.max_subject_length allows at most 256")));
  config::PolicyConfig cfg;
  cfg.max_subject_length = 300;
  expect_admitted(make_check(cfg).admit_identity(u));

  // The subject built from display name and e-mail counts too.
  cfg.max_subject_length = 100;
  u = ann();
  u.display_name = std::string(60, 'n');
  u.email = std::string(30, 'l') + "@example.org";
  expect_refused(make_check(cfg).admit_identity(u),
                 HasSubstr("is 119 characters as RFC 2253 text; policy.max_subject_length allows "
                           "at most 100"));
}

TEST(PolicyCheckTest, EmailLongerThanASubjectEmailAddressHoldsIsRefusedAtEnable) {
  // RFC 5321 allows 254, but OpenSSL bounds the subject's emailAddress (PKCS#9) at 128, and
  // the subject kmsd builds carries the address: caught here, not after the token is spent.
  const PolicyCheck check = make_check();
  UserIdentity u = ann();
  u.email = std::string(64, 'l') + "@" + std::string(59, 'd') + ".org";  // 128
  expect_admitted(check.admit_identity(u));
  u.email = std::string(64, 'l') + "@" + std::string(60, 'd') + ".org";  // 129
  expect_refused(check.admit_identity(u),
                 HasSubstr("e-mail address is 129 characters; a certificate emailAddress holds at "
                           "most 128"));
}

TEST(PolicyCheckTest, UserIdRules) {
  const PolicyCheck check = make_check();
  UserIdentity u = ann();
  u.user_id = "";
  expect_refused(check.admit_identity(u), HasSubstr("the user id is empty"));
  u.user_id = std::string(65, 'u');
  expect_refused(check.admit_identity(u),
                 HasSubstr("the user id is 65 bytes; policy.max_user_id_length allows at most 64"));
  u.user_id = "ann\xff";
  expect_refused(check.admit_identity(u), HasSubstr("the user id is not valid UTF-8"));
}

TEST(PolicyCheckTest, DisplayNameIsNeededUnlessADnIsGiven) {
  const PolicyCheck check = make_check();
  UserIdentity u = ann();
  u.display_name.clear();
  expect_refused(check.admit_identity(u), HasSubstr("the display name is empty"));
  u.dn = "/O=Example/CN=Ann";
  expect_admitted(check.admit_identity(u));
}

// ---- reload (SIGHUP) ----

TEST(PolicyCheckTest, SnapshotFromAChangedConfigChangesTheVerdict) {
  Fixture f;
  CertificateRequest r = f.req();
  r.x509_version = 1;
  r.email.clear();
  PolicyInForce in_force(std::make_shared<const PolicyCheck>(make_check()));
  const auto before = in_force.current();
  expect_refused(before->admit(r), HasSubstr("X.509 v1 certificates are disabled by policy"));

  in_force.replace(
      std::make_shared<const PolicyCheck>(make_check(v1_allowed_without_extensions())));
  expect_admitted(in_force.current()->admit(r));
  // A request that took its snapshot before the reload is judged by that snapshot throughout.
  expect_refused(before->admit(r), HasSubstr("disabled by policy"));
}

TEST(PolicyCheckTest, SnapshotBuiltFromAReloadedFileChangesTheVerdict) {
  kmsd::testing::TempDir tmp;
  const auto load = [&](const std::string& policy) {
    const std::string text = std::string("[server]\npublic_listen = \"127.0.0.1:8080\"\n") +
                             "admin_listen = \"127.0.0.1:8443\"\nunseal_socket = \"u.sock\"\n" +
                             "[token]\nmodule = \"" + kmsd::testing::kSoftHsmModule + "\"\n" +
                             "uri = \"pkcs11:token=kmsd\"\n[ca]\nsubject = \"/CN=CA\"\n" +
                             "[store]\npath = \"kmsd.db\"\n[startup]\nsource = \"prompt\"\n" +
                             policy;
    const config::LoadResult lr = config::load_string(text, tmp.path() / "kmsd.toml");
    EXPECT_TRUE(lr.ok()) << (lr.ok() ? "" : lr.problems[0].message);
    auto check = PolicyCheck::create(lr.config.policy);
    EXPECT_TRUE(check.ok());
    return std::make_shared<const PolicyCheck>(std::move(check).value());
  };
  Fixture f;
  CertificateRequest r = f.req();
  r.x509_version = 1;
  r.email.clear();
  PolicyInForce in_force(load(""));
  expect_refused(in_force.current()->admit(r), HasSubstr("policy.x509_versions = [3]"));
  in_force.replace(
      load("[policy]\nx509_versions = [1, 3]\n[policy.signing]\nkey_usage = []\n"
           "extended_key_usage = []\n"));
  expect_admitted(in_force.current()->admit(r));
}

// ---- construction and pieces ----

TEST(PolicyCheckTest, HandBuiltNonsenseIsRefusedAtConstruction) {
  config::PolicyConfig cfg;
  cfg.signing.key_usage = {"digitalSignatur"};
  auto r = PolicyCheck::create(cfg);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kConfig);
  EXPECT_THAT(r.error().message, HasSubstr("unknown key usage \"digitalSignatur\""));
  cfg = {};
  cfg.x509_versions = {2};
  EXPECT_FALSE(PolicyCheck::create(cfg).ok());
  cfg = {};
  cfg.encryption.extended_key_usage = {"no such usage"};
  EXPECT_FALSE(PolicyCheck::create(cfg).ok());
}

TEST(PolicyCheckTest, Rfc2253ReaderKeepsMultiValuedRdnsAndRefusesWhatItCannotRead) {
  ossl::X509NamePtr n(X509_NAME_new());
  const auto add = [&](const char* f, const char* v, int set) {
    ASSERT_EQ(X509_NAME_add_entry_by_txt(n.get(), f, MBSTRING_UTF8,
                                         reinterpret_cast<const unsigned char*>(v), -1, -1, set),
              1);
  };
  add("O", "Example", 0);
  add("OU", "A", 0);
  add("CN", "Ann", -1);  // same RDN as OU
  auto back = parse_rfc2253(ca::name_to_string(n.get()));
  ASSERT_TRUE(back.ok()) << back.error().message;
  EXPECT_EQ(ca::name_to_string(back->get()), ca::name_to_string(n.get()));
  EXPECT_EQ(X509_NAME_cmp(back->get(), n.get()), 0);

  EXPECT_FALSE(parse_rfc2253("CN=#0403414141").ok());
  EXPECT_FALSE(parse_rfc2253("CN=a\\").ok());
  EXPECT_FALSE(parse_rfc2253("CN=a,").ok());
  EXPECT_FALSE(parse_rfc2253("NOPE=a").ok());
  EXPECT_FALSE(parse_rfc2253("CN=a;b").ok());
}

TEST(PolicyCheckTest, ProfilesHaveStableSpellings) {
  EXPECT_STREQ(to_string(RequestProfile::kSigning), "signing");
  EXPECT_STREQ(to_string(RequestProfile::kEncryption), "encryption");
  EXPECT_STREQ(to_string(RequestProfile::kAdminClient), "admin-client");
  EXPECT_STREQ(to_string(RequestProfile::kTlsServer), "tls-server");
  EXPECT_EQ(utf8_length("Zo\xc3\xab"), 3u);
  EXPECT_EQ(utf8_length("\xff"), std::nullopt);
}

}  // namespace
}  // namespace kmsd::policy

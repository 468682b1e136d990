// CRL and OCSP responder against an initialized throw-away token, checked by the real
// `openssl crl` and `openssl ocsp` clients: every signature is made by the CA key on the token.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <openssl/ocsp.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>

#include <atomic>
#include <fstream>
#include <thread>

#include "common/clock.hpp"
#include "daemon/ca/issuer.hpp"
#include "daemon/provision/initializer.hpp"
#include "daemon/revocation/revocation.hpp"
#include "tests/support/initialized_kms.hpp"

namespace kmsd {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::Not;
namespace fs = std::filesystem;

using Bytes = std::vector<std::uint8_t>;
using X509CrlPtr = std::unique_ptr<X509_CRL, ossl::Deleter<X509_CRL_free>>;
using OcspResponsePtr = std::unique_ptr<OCSP_RESPONSE, ossl::Deleter<OCSP_RESPONSE_free>>;
using OcspBasicRespPtr = std::unique_ptr<OCSP_BASICRESP, ossl::Deleter<OCSP_BASICRESP_free>>;
using OcspRequestPtr = std::unique_ptr<OCSP_REQUEST, ossl::Deleter<OCSP_REQUEST_free>>;

constexpr int kKeyCompromise = 1;
constexpr int kSuperseded = 4;

Bytes read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(in), {});
}

void write_bytes(const fs::path& p, const Bytes& b) {
  std::ofstream(p, std::ios::binary)
      .write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

void write_pem(const fs::path& p, X509* cert) {
  std::ofstream(p) << ossl::x509_to_pem(cert).value();
}

X509CrlPtr parse_crl(const Bytes& der) {
  const unsigned char* p = der.data();
  return X509CrlPtr(d2i_X509_CRL(nullptr, &p, static_cast<long>(der.size())));
}

std::int64_t crl_number(X509_CRL* crl) {
  auto* n = static_cast<ASN1_INTEGER*>(X509_CRL_get_ext_d2i(crl, NID_crl_number, nullptr, nullptr));
  std::int64_t v = -1;
  if (n != nullptr) ASN1_INTEGER_get_int64(&v, n);
  ASN1_INTEGER_free(n);
  return v;
}

std::int64_t unix_of(const ASN1_TIME* t) {
  struct tm tm {};
  EXPECT_EQ(ASN1_TIME_to_tm(t, &tm), 1);
  return static_cast<std::int64_t>(timegm(&tm));
}

int response_status(const Bytes& der) {
  const unsigned char* p = der.data();
  OcspResponsePtr r(d2i_OCSP_RESPONSE(nullptr, &p, static_cast<long>(der.size())));
  return r ? OCSP_response_status(r.get()) : -1;
}

// `openssl crl ... -text` prints serials in upper case.
std::string upper(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return s;
}

// An initialized KMS on the sandbox token (CA key of KEY_TYPE, CA certificate in the store),
// a Revocation over it, and ca.pem in the sandbox directory for the openssl clients.
class RevocationTest : public testing::InitializedKmsTest {
 protected:
  void make_kms(hsm::KeyType key_type = hsm::KeyType::kEcP256,
                const std::string& digest = "sha256") {
    ASSERT_NO_FATAL_FAILURE(initialize_kms("/O=kmsd test/CN=Revocation Test CA", key_type, digest));
    write_pem(dir() / "ca.pem", ca_cert.get());
    settings.digest = digest;
    revocation = make_revocation();
  }

  std::unique_ptr<revocation::Revocation> make_revocation() {
    return std::make_unique<revocation::Revocation>(
        *store, *tok, [this] { return settings; },
        [this] {
          X509_up_ref(ca_cert.get());
          return ossl::X509Ptr(ca_cert.get());
        });
  }

  // A certificate signed by our CA on the token; recorded in the store when RECORD.
  ossl::X509Ptr issue(const std::string& cn, bool record = true) {
    auto key = ca::generate_key(hsm::KeyType::kEcP256).value();
    auto subject = ca::parse_subject("/CN=" + cn).value();
    ca::IssueRequest req;
    req.profile = ca::Profile::kAdminClient;
    req.subject = subject.get();
    req.public_key = key.get();
    auto cert = ca::issue_on_token(req, ca_cert.get(), *tok, EVP_sha256());
    EXPECT_TRUE(cert.ok()) << cert.error().message;
    if (record) {
      auto st = store->insert_certificate(
          provision::certificate_record(cert->get(), store::CertKind::kAdmin));
      EXPECT_TRUE(st.ok()) << st.error().message;
    }
    write_pem(dir() / (cn + ".pem"), cert->get());
    return std::move(*cert);
  }

  void revoke(X509* cert, int reason, std::int64_t at = unix_now()) {
    auto st = store->revoke_certificate(ca::serial_hex(cert), at, reason);
    ASSERT_TRUE(st.ok()) << st.error().message;
  }

  Bytes current_crl() {
    auto der = revocation->crl_der();
    EXPECT_TRUE(der.ok()) << der.error().message;
    return der.ok() ? *der : Bytes{};
  }

  // `openssl crl` verifying the current CRL against ca.pem; its text output.
  std::string openssl_crl_text() {
    write_bytes(dir() / "crl.der", current_crl());
    std::string out;
    int rc = run("openssl crl -inform DER -in crl.der -CAfile ca.pem -noout -text", &out);
    EXPECT_EQ(rc, 0) << out;
    return out;
  }

  // An OCSP request made by `openssl ocsp` for ARGS ("-issuer ca.pem -cert x.pem ..."),
  // answered by respond(); resp.der and req.der are left in the sandbox directory.
  Bytes ask(const std::string& args) {
    std::string out;
    EXPECT_EQ(run("openssl ocsp " + args + " -reqout req.der", &out), 0) << out;
    Bytes resp = revocation->respond(read_bytes(dir() / "req.der"));
    write_bytes(dir() / "resp.der", resp);
    return resp;
  }

  // `openssl ocsp -respin` checking resp.der for the -cert files in ARGS; its output (summary
  // and -resp_text). -no_nonce: with -cert the client builds a request of its own, whose nonce
  // no response can carry; check_nonce() checks the nonce against req.der instead.
  std::string check(const std::string& args, int* rc_out = nullptr) {
    std::string out;
    int rc = run("openssl ocsp -respin resp.der " + args + " -no_nonce -resp_text", &out);
    if (rc_out != nullptr) *rc_out = rc;
    return out;
  }

  // `openssl ocsp` verifying resp.der as the answer to req.der, its nonce included.
  void expect_nonce_verified() {
    std::string out;
    int rc =
        run("openssl ocsp -reqin req.der -respin resp.der -issuer ca.pem -CAfile ca.pem", &out);
    EXPECT_EQ(rc, 0) << out;
    EXPECT_THAT(out, HasSubstr("Response verify OK"));
    EXPECT_THAT(out, Not(HasSubstr("WARNING: no nonce")));
    EXPECT_THAT(out, Not(HasSubstr("Nonce Verify error")));
  }

  int run(const std::string& cmd, std::string* out) {
    return testing::run_command("cd '" + dir().string() + "' && " + cmd, out);
  }

  revocation::Settings settings;
  std::unique_ptr<revocation::Revocation> revocation;
};

// ---- CRL ----

TEST_F(RevocationTest, NoCrlBeforeTheFirstOneIsMade) {
  make_kms();
  auto der = revocation->crl_der();
  ASSERT_FALSE(der.ok());
  EXPECT_EQ(der.error().code, ErrorCode::kUnavailable);
  EXPECT_THAT(der.error().message, HasSubstr("no CRL has been made yet"));
}

TEST_F(RevocationTest, EmptyCrlIsAV2CrlSignedOnTheToken) {
  make_kms();
  ASSERT_TRUE(revocation->regenerate().ok());
  std::string text = openssl_crl_text();
  EXPECT_THAT(text, HasSubstr("verify OK"));
  EXPECT_THAT(text, HasSubstr("Version 2 (0x1)"));
  EXPECT_THAT(text, HasSubstr("No Revoked Certificates"));
  EXPECT_THAT(text, HasSubstr("Revocation Test CA"));

  auto crl = parse_crl(current_crl());
  ASSERT_NE(crl, nullptr);
  EXPECT_EQ(X509_CRL_get_version(crl.get()), X509_CRL_VERSION_2);
  EXPECT_EQ(crl_number(crl.get()), 1);
  EXPECT_EQ(X509_CRL_get_REVOKED(crl.get()), nullptr);  // no revokedCertificates at all
  EXPECT_EQ(X509_NAME_cmp(X509_CRL_get_issuer(crl.get()), X509_get_subject_name(ca_cert.get())), 0);
  // The AKI is the CA certificate's SKI.
  auto* akid = static_cast<AUTHORITY_KEYID*>(
      X509_CRL_get_ext_d2i(crl.get(), NID_authority_key_identifier, nullptr, nullptr));
  ASSERT_NE(akid, nullptr);
  ASSERT_NE(akid->keyid, nullptr);
  EXPECT_EQ(ASN1_OCTET_STRING_cmp(akid->keyid, X509_get0_subject_key_id(ca_cert.get())), 0);
  AUTHORITY_KEYID_free(akid);
  // nextUpdate = thisUpdate + the setting (24 h), thisUpdate is now.
  std::int64_t this_update = unix_of(X509_CRL_get0_lastUpdate(crl.get()));
  EXPECT_NEAR(static_cast<double>(this_update), static_cast<double>(unix_now()), 60);
  EXPECT_EQ(unix_of(X509_CRL_get0_nextUpdate(crl.get())) - this_update, 24 * 3600);
}

TEST_F(RevocationTest, CrlListsRevokedCertificatesWithTheirReasons) {
  make_kms();
  ASSERT_TRUE(revocation->regenerate().ok());
  auto compromised = issue("compromised");
  auto plain = issue("plain");
  auto untouched = issue("untouched");
  const std::int64_t at = unix_now() - 3600;
  revoke(compromised.get(), kKeyCompromise, at);
  revoke(plain.get(), 0, at);
  settings.crl_next_update = std::chrono::hours(6);
  settings.crl_path = dir() / "published" / "kmsd.crl";
  fs::create_directories(settings.crl_path.parent_path());
  ASSERT_TRUE(revocation->regenerate().ok());

  std::string text = openssl_crl_text();
  EXPECT_THAT(text, HasSubstr("verify OK"));
  EXPECT_THAT(text, HasSubstr("Serial Number: " + upper(ca::serial_hex(compromised.get()))));
  EXPECT_THAT(text, HasSubstr("Serial Number: " + upper(ca::serial_hex(plain.get()))));
  EXPECT_THAT(text, Not(HasSubstr(upper(ca::serial_hex(untouched.get())))));
  EXPECT_THAT(text, HasSubstr("Key Compromise"));
  // Unspecified (0) is left out (RFC 5280 5.3.1): exactly one reason code in the CRL.
  EXPECT_EQ(text.find("X509v3 CRL Reason Code"), text.rfind("X509v3 CRL Reason Code"));

  auto crl = parse_crl(current_crl());
  ASSERT_NE(crl, nullptr);
  EXPECT_EQ(crl_number(crl.get()), 2);
  EXPECT_EQ(sk_X509_REVOKED_num(X509_CRL_get_REVOKED(crl.get())), 2);
  X509_REVOKED* entry = nullptr;
  ASSERT_EQ(X509_CRL_get0_by_cert(crl.get(), &entry, compromised.get()), 1);
  EXPECT_EQ(unix_of(X509_REVOKED_get0_revocationDate(entry)), at);
  EXPECT_EQ(X509_CRL_get0_by_cert(crl.get(), &entry, untouched.get()), 0);
  std::int64_t this_update = unix_of(X509_CRL_get0_lastUpdate(crl.get()));
  EXPECT_EQ(unix_of(X509_CRL_get0_nextUpdate(crl.get())) - this_update, 6 * 3600);

  // The published file is the same CRL, world-readable.
  EXPECT_EQ(read_bytes(settings.crl_path), current_crl());
  struct stat st {};
  ASSERT_EQ(::stat(settings.crl_path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0644u);
  EXPECT_FALSE(fs::exists(settings.crl_path.string() + ".tmp"));
}

TEST_F(RevocationTest, CrlIsServedAfterARestartWhileSealedAndNumbersKeepGrowing) {
  make_kms();
  ASSERT_TRUE(revocation->regenerate().ok());
  ASSERT_TRUE(revocation->regenerate().ok());
  Bytes before = current_crl();
  tok->logout();                   // sealed
  revocation = make_revocation();  // a restart: nothing in memory
  auto der = revocation->crl_der();
  ASSERT_TRUE(der.ok()) << der.error().message;
  EXPECT_EQ(*der, before);
  // A sealed daemon cannot sign a new one, and says so; the old one stays.
  auto st = revocation->regenerate();
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.error().code, ErrorCode::kFailedPrecondition);
  EXPECT_THAT(st.error().message, HasSubstr("not logged in"));
  EXPECT_EQ(current_crl(), before);
  // Unsealed again: the number continues from the store.
  ASSERT_TRUE(tok->login(SecretBytes::from_string(testing::kUserPin)).ok());
  ASSERT_TRUE(revocation->regenerate().ok());
  EXPECT_EQ(crl_number(parse_crl(current_crl()).get()), 3);
}

TEST_F(RevocationTest, RefreshIfDueRegeneratesFromHalfTheValidityOn) {
  make_kms();
  ASSERT_TRUE(revocation->refresh_if_due().ok());  // none yet: made now
  auto first = parse_crl(current_crl());
  ASSERT_NE(first, nullptr);
  EXPECT_EQ(crl_number(first.get()), 1);
  const std::chrono::sys_seconds made{
      std::chrono::seconds(unix_of(X509_CRL_get0_lastUpdate(first.get())))};

  ASSERT_TRUE(revocation->refresh_if_due(made + std::chrono::hours(11)).ok());
  EXPECT_EQ(crl_number(parse_crl(current_crl()).get()), 1);  // still fresh
  ASSERT_TRUE(revocation->refresh_if_due(made + std::chrono::hours(12)).ok());
  EXPECT_EQ(crl_number(parse_crl(current_crl()).get()), 2);  // half way: renewed

  // A CRL file configured later is written without waiting for the next renewal.
  settings.crl_path = dir() / "late.crl";
  ASSERT_TRUE(revocation->refresh_if_due().ok());
  EXPECT_EQ(crl_number(parse_crl(current_crl()).get()), 2);
  EXPECT_EQ(read_bytes(settings.crl_path), current_crl());
}

TEST_F(RevocationTest, ARevocationTheCrlMissedIsCaughtUpByTheNextRefresh) {
  make_kms();
  ASSERT_TRUE(revocation->regenerate().ok());
  auto victim = issue("victim");
  tok->logout();  // sealed: the revocation is committed, its CRL cannot be signed
  revoke(victim.get(), kKeyCompromise);
  EXPECT_FALSE(revocation->regenerate().ok());
  ASSERT_TRUE(tok->login(SecretBytes::from_string(testing::kUserPin)).ok());
  revocation = make_revocation();  // and a restart in between, for good measure
  // The current CRL is fresh by its dates, but lacks the revocation: renewed at once.
  ASSERT_TRUE(revocation->refresh_if_due().ok());
  auto crl = parse_crl(current_crl());
  ASSERT_NE(crl, nullptr);
  EXPECT_EQ(crl_number(crl.get()), 2);
  X509_REVOKED* entry = nullptr;
  EXPECT_EQ(X509_CRL_get0_by_cert(crl.get(), &entry, victim.get()), 1);
  // Up to date now: the next refresh leaves it alone.
  ASSERT_TRUE(revocation->refresh_if_due().ok());
  EXPECT_EQ(crl_number(parse_crl(current_crl()).get()), 2);
}

TEST_F(RevocationTest, ADamagedStoredCrlIsReportedThenReplacedByTheNextRefresh) {
  make_kms();
  ASSERT_TRUE(revocation->regenerate().ok());
  ASSERT_TRUE(store->put_setting(revocation::kSettingCrlDer, "3082zz").ok());
  revocation = make_revocation();
  auto der = revocation->crl_der();
  ASSERT_FALSE(der.ok());
  EXPECT_EQ(der.error().code, ErrorCode::kStore);
  EXPECT_THAT(der.error().message, HasSubstr("damaged"));
  ASSERT_TRUE(revocation->refresh_if_due().ok());
  EXPECT_EQ(crl_number(parse_crl(current_crl()).get()), 2);
}

TEST_F(RevocationTest, CrlSigningSurvivesALostTokenSession) {
  make_kms();
  tok->close_all_sessions_for_test();
  auto st = revocation->regenerate();
  ASSERT_TRUE(st.ok()) << st.error().message;
  EXPECT_THAT(openssl_crl_text(), HasSubstr("verify OK"));
}

TEST_F(RevocationTest, ACaCertificateThatIsNotTheTokensKeyNeverPublishesACrl) {
  make_kms();
  // A look-alike CA certificate with a software key.
  auto key = ca::generate_key(hsm::KeyType::kEcP256).value();
  ca::IssueRequest req;
  req.profile = ca::Profile::kCa;
  req.subject = X509_get_subject_name(ca_cert.get());
  req.public_key = key.get();
  req.serial = {0x01, 0x02};
  ca_cert = std::move(ca::issue(req, nullptr, key.get(), EVP_sha256()).value());
  write_pem(dir() / "ca.pem", ca_cert.get());
  auto st = revocation->regenerate();
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.error().code, ErrorCode::kCrypto);
  EXPECT_THAT(st.error().message, HasSubstr("does not belong to the token's CA key"));
  EXPECT_FALSE(revocation->crl_der().ok());
  // The responder refuses to sign too, rather than answer with a response nobody can verify.
  issue("someone");
  EXPECT_EQ(response_status(ask("-issuer ca.pem -cert someone.pem")),
            OCSP_RESPONSE_STATUS_INTERNALERROR);
}

// ---- OCSP ----

TEST_F(RevocationTest, OcspAnswersGoodThenRevokedWithTheReasonAndEchoesTheNonce) {
  make_kms();
  auto alice = issue("alice");
  Bytes resp = ask("-issuer ca.pem -cert alice.pem -nonce");
  ASSERT_EQ(response_status(resp), OCSP_RESPONSE_STATUS_SUCCESSFUL);
  int rc = -1;
  std::string out = check("-issuer ca.pem -CAfile ca.pem -cert alice.pem", &rc);
  EXPECT_EQ(rc, 0) << out;
  EXPECT_THAT(out, HasSubstr("Response verify OK"));
  EXPECT_THAT(out, HasSubstr("alice.pem: good"));
  EXPECT_THAT(out, HasSubstr("Responder Id: "));  // byKey: the CA key's SHA-1, not a name
  EXPECT_THAT(out, Not(HasSubstr("Responder Id: CN")));
  EXPECT_THAT(out, HasSubstr("OCSP Nonce"));
  EXPECT_THAT(out, Not(HasSubstr("Certificate:")));  // no certificates in the response
  expect_nonce_verified();
  {
    // The check is real: the same response does not answer another request.
    std::string other;
    ASSERT_EQ(run("openssl ocsp -issuer ca.pem -cert alice.pem -nonce -reqout other.der", &other),
              0);
    EXPECT_EQ(
        run("openssl ocsp -reqin other.der -respin resp.der -issuer ca.pem -CAfile ca.pem", &other),
        1);
    EXPECT_THAT(other, HasSubstr("Nonce Verify error"));
  }
  {
    // The same check in code: the nonce is the request's, thisUpdate now, nextUpdate +60 min.
    const unsigned char* p = resp.data();
    OcspResponsePtr r(d2i_OCSP_RESPONSE(nullptr, &p, static_cast<long>(resp.size())));
    OcspBasicRespPtr bs(OCSP_response_get1_basic(r.get()));
    Bytes req_der = read_bytes(dir() / "req.der");
    const unsigned char* q = req_der.data();
    OcspRequestPtr req(d2i_OCSP_REQUEST(nullptr, &q, static_cast<long>(req_der.size())));
    ASSERT_NE(bs, nullptr);
    ASSERT_NE(req, nullptr);
    EXPECT_EQ(OCSP_check_nonce(req.get(), bs.get()), 1);
    OCSP_SINGLERESP* single = OCSP_resp_get0(bs.get(), 0);
    ASN1_GENERALIZEDTIME *this_update = nullptr, *next_update = nullptr;
    int reason = 0;
    EXPECT_EQ(OCSP_single_get0_status(single, &reason, nullptr, &this_update, &next_update),
              V_OCSP_CERTSTATUS_GOOD);
    EXPECT_NEAR(static_cast<double>(unix_of(this_update)), static_cast<double>(unix_now()), 60);
    EXPECT_EQ(unix_of(next_update) - unix_of(this_update), 3600);
  }

  const std::int64_t at = unix_now() - 120;
  revoke(alice.get(), kKeyCompromise, at);
  ask("-issuer ca.pem -cert alice.pem -nonce");
  expect_nonce_verified();
  out = check("-issuer ca.pem -CAfile ca.pem -cert alice.pem", &rc);
  EXPECT_EQ(rc, 0) << out;
  EXPECT_THAT(out, HasSubstr("Response verify OK"));
  EXPECT_THAT(out, HasSubstr("alice.pem: revoked"));
  EXPECT_THAT(out, HasSubstr("Reason: keyCompromise"));
  EXPECT_THAT(out, HasSubstr("Revocation Time: "));
}

TEST_F(RevocationTest, OcspSaysUnknownForASerialThisCaNeverRecorded) {
  make_kms();
  issue("stranger", /*record=*/false);  // our issuer name and key, a serial the store lacks
  ask("-issuer ca.pem -cert stranger.pem");
  int rc = -1;
  std::string out = check("-issuer ca.pem -CAfile ca.pem -cert stranger.pem", &rc);
  EXPECT_EQ(rc, 0) << out;
  EXPECT_THAT(out, HasSubstr("Response verify OK"));
  EXPECT_THAT(out, HasSubstr("stranger.pem: unknown"));
}

TEST_F(RevocationTest, OcspAnswersEveryCertIdOfARequestInOrder) {
  make_kms();
  issue("good");
  auto bad = issue("bad");
  issue("nobody", /*record=*/false);
  revoke(bad.get(), kSuperseded);
  // SHA-256 CertIDs: the issuer hashes are checked with the request's own algorithm.
  ask("-sha256 -issuer ca.pem -cert good.pem -cert bad.pem -cert nobody.pem");
  int rc = -1;
  std::string out = check(
      "-sha256 -issuer ca.pem -CAfile ca.pem -cert good.pem -cert bad.pem -cert nobody.pem", &rc);
  EXPECT_EQ(rc, 0) << out;
  EXPECT_THAT(out, HasSubstr("Response verify OK"));
  EXPECT_THAT(out, HasSubstr("good.pem: good"));
  EXPECT_THAT(out, HasSubstr("bad.pem: revoked"));
  EXPECT_THAT(out, HasSubstr("Reason: superseded"));
  EXPECT_THAT(out, HasSubstr("nobody.pem: unknown"));
}

TEST_F(RevocationTest, OcspAnswersGarbageWithMalformedRequest) {
  make_kms();
  EXPECT_EQ(response_status(revocation->respond({})), OCSP_RESPONSE_STATUS_MALFORMEDREQUEST);
  const Bytes junk = {0x30, 0x82, 0x01, 0x00, 'n', 'o', 't', ' ', 'o', 'c', 's', 'p'};
  EXPECT_EQ(response_status(revocation->respond(junk)), OCSP_RESPONSE_STATUS_MALFORMEDREQUEST);
  issue("alice");
  ask("-issuer ca.pem -cert alice.pem");
  Bytes req = read_bytes(dir() / "req.der");
  Bytes truncated(req.begin(), req.end() - 3), trailing = req;
  trailing.push_back(0);
  EXPECT_EQ(response_status(revocation->respond(truncated)), OCSP_RESPONSE_STATUS_MALFORMEDREQUEST);
  EXPECT_EQ(response_status(revocation->respond(trailing)), OCSP_RESPONSE_STATUS_MALFORMEDREQUEST);
  // The real client reads it as such.
  write_bytes(dir() / "resp.der", revocation->respond(junk));
  std::string out;
  run("openssl ocsp -respin resp.der -resp_text -noverify", &out);
  EXPECT_THAT(out, HasSubstr("malformedrequest"));
}

TEST_F(RevocationTest, OcspIsNotAuthoritativeForAnotherIssuer) {
  make_kms();
  // Another CA, same subject name even, with its own software key; a leaf of it whose serial
  // we also recorded under our CA would be "good" if only the name or serial were checked.
  auto other_key = ca::generate_key(hsm::KeyType::kEcP256).value();
  ca::IssueRequest req;
  req.profile = ca::Profile::kCa;
  req.subject = X509_get_subject_name(ca_cert.get());
  req.public_key = other_key.get();
  req.serial = {0x0a, 0x0b};
  auto other_ca = std::move(ca::issue(req, nullptr, other_key.get(), EVP_sha256()).value());
  write_pem(dir() / "other-ca.pem", other_ca.get());
  auto ours = issue("ours");
  auto leaf_key = ca::generate_key(hsm::KeyType::kEcP256).value();
  auto subject = ca::parse_subject("/CN=theirs").value();
  ca::IssueRequest leaf_req;
  leaf_req.subject = subject.get();
  leaf_req.public_key = leaf_key.get();
  leaf_req.serial = ossl::from_hex(ca::serial_hex(ours.get())).value();  // a serial we know
  auto theirs =
      std::move(ca::issue(leaf_req, other_ca.get(), other_key.get(), EVP_sha256()).value());
  write_pem(dir() / "theirs.pem", theirs.get());

  Bytes resp = ask("-issuer other-ca.pem -cert theirs.pem");
  EXPECT_EQ(response_status(resp), OCSP_RESPONSE_STATUS_UNAUTHORIZED);
  std::string out = check("-noverify");
  EXPECT_THAT(out, HasSubstr("unauthorized"));

  // Mixed in one request with one of ours: ours is answered, theirs is "unknown".
  resp = ask("-issuer ca.pem -cert ours.pem -issuer other-ca.pem -cert theirs.pem");
  ASSERT_EQ(response_status(resp), OCSP_RESPONSE_STATUS_SUCCESSFUL);
  int rc = -1;
  // -VAfile: the OpenSSL client accepts a response about several issuers only from a
  // responder it trusts explicitly.
  out = check("-VAfile ca.pem -issuer ca.pem -cert ours.pem -issuer other-ca.pem -cert theirs.pem",
              &rc);
  EXPECT_EQ(rc, 0) << out;
  EXPECT_THAT(out, HasSubstr("Response verify OK"));
  EXPECT_THAT(out, HasSubstr("ours.pem: good"));
  EXPECT_THAT(out, HasSubstr("theirs.pem: unknown"));
}

TEST_F(RevocationTest, OcspSaysTryLaterWhenTheTokenCannotSign) {
  make_kms();
  issue("alice");
  ask("-issuer ca.pem -cert alice.pem");
  Bytes req = read_bytes(dir() / "req.der");
  tok->logout();  // sealed: the CA key is on the token and out of reach
  EXPECT_EQ(response_status(revocation->respond(req)), OCSP_RESPONSE_STATUS_TRYLATER);
  // Unsealed again: answered.
  ASSERT_TRUE(tok->login(SecretBytes::from_string(testing::kUserPin)).ok());
  EXPECT_EQ(response_status(revocation->respond(req)), OCSP_RESPONSE_STATUS_SUCCESSFUL);
  // Garbage is still garbage while sealed: the request is judged before the token is asked.
  tok->logout();
  EXPECT_EQ(response_status(revocation->respond(Bytes{1, 2, 3})),
            OCSP_RESPONSE_STATUS_MALFORMEDREQUEST);
}

TEST_F(RevocationTest, OcspSigningSurvivesALostTokenSession) {
  make_kms();
  issue("alice");
  ask("-issuer ca.pem -cert alice.pem");
  tok->close_all_sessions_for_test();
  Bytes resp = revocation->respond(read_bytes(dir() / "req.der"));
  ASSERT_EQ(response_status(resp), OCSP_RESPONSE_STATUS_SUCCESSFUL);
  write_bytes(dir() / "resp.der", resp);
  int rc = -1;
  std::string out = check("-issuer ca.pem -CAfile ca.pem -cert alice.pem", &rc);
  EXPECT_EQ(rc, 0) << out;
  EXPECT_THAT(out, HasSubstr("alice.pem: good"));
}

TEST_F(RevocationTest, ConcurrentResponsesAndCrlsAreAllSoundAndNumbersDoNotRepeat) {
  make_kms();
  issue("alice");
  ask("-issuer ca.pem -cert alice.pem");
  const Bytes req = read_bytes(dir() / "req.der");
  std::atomic<int> ok_responses{0}, ok_crls{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 3; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 20; ++i)
        if (response_status(revocation->respond(req)) == OCSP_RESPONSE_STATUS_SUCCESSFUL)
          ++ok_responses;
    });
  }
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 4; ++i)
        if (revocation->regenerate().ok()) ++ok_crls;
      if (revocation->refresh_if_due().ok()) ++ok_crls;  // fresh: makes none
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok_responses.load(), 60);
  EXPECT_EQ(ok_crls.load(), 10);
  // Eight CRLs, eight distinct numbers: no two read the same last number.
  EXPECT_EQ(crl_number(parse_crl(current_crl()).get()), 8);
  EXPECT_THAT(openssl_crl_text(), HasSubstr("verify OK"));
}

// The same end-to-end checks for each CA key type the token makes.
struct CaKey {
  hsm::KeyType type;
  const char* digest;
  const char* crl_signature;  // as `openssl crl -text` names it
};
void PrintTo(const CaKey& k, std::ostream* os) {
  *os << hsm::to_string(k.type) << "/" << k.digest;
}

class RevocationKeyTypeTest : public RevocationTest, public ::testing::WithParamInterface<CaKey> {};

TEST_P(RevocationKeyTypeTest, CrlAndOcspVerifyWithTheOpensslClients) {
  make_kms(GetParam().type, GetParam().digest);
  auto revoked = issue("revoked");
  issue("fine");
  revoke(revoked.get(), kKeyCompromise);
  ASSERT_TRUE(revocation->regenerate().ok());
  std::string text = openssl_crl_text();
  EXPECT_THAT(text, HasSubstr("verify OK"));
  EXPECT_THAT(text, HasSubstr(std::string("Signature Algorithm: ") + GetParam().crl_signature));
  EXPECT_THAT(text, HasSubstr(upper(ca::serial_hex(revoked.get()))));

  ask("-issuer ca.pem -cert fine.pem -cert revoked.pem -nonce");
  expect_nonce_verified();
  int rc = -1;
  std::string out = check("-issuer ca.pem -CAfile ca.pem -cert fine.pem -cert revoked.pem", &rc);
  EXPECT_EQ(rc, 0) << out;
  EXPECT_THAT(out,
              AllOf(HasSubstr("Response verify OK"), HasSubstr("fine.pem: good"),
                    HasSubstr("revoked.pem: revoked"), HasSubstr("Reason: keyCompromise"),
                    HasSubstr(std::string("Signature Algorithm: ") + GetParam().crl_signature)));
}

INSTANTIATE_TEST_SUITE_P(
    CaKeys, RevocationKeyTypeTest,
    ::testing::Values(CaKey{hsm::KeyType::kEcP256, "sha256", "ecdsa-with-SHA256"},
                      CaKey{hsm::KeyType::kRsa2048, "sha384", "sha384WithRSAEncryption"}),
    [](const auto& info) {
      return std::string(info.param.type == hsm::KeyType::kEcP256 ? "EcP256" : "Rsa2048");
    });

}  // namespace
}  // namespace kmsd

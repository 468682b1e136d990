// Token behaviour against a throw-away SoftHSM2 token per test: envelope escrow under every
// wrap mechanism, CA signing on the token, recovery after lost sessions, login, objects.
#include "hsm/token.hpp"

#include <openssl/err.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include <atomic>
#include <thread>

#include "hsm/envelope.hpp"
#include "hsm/pkcs11.hpp"
#include "tests/support/sandbox.hpp"

namespace kmsd::hsm {
namespace {

using kmsd::testing::kSoftHsmModule;
using kmsd::testing::kUserPin;

std::vector<std::uint8_t> bytes(std::string_view s) {
  return {s.begin(), s.end()};
}
SecretBytes pin(const char* p = kUserPin) {
  return SecretBytes::from_string(p);
}

class TokenTest : public kmsd::testing::TokenSandbox {
 protected:
  TokenOptions options(WrapMechanism m = WrapMechanism::kAesKeyWrapPad) {
    TokenOptions o;
    o.module_path = kSoftHsmModule;
    o.token_uri = token().uri();
    o.pool_size = 2;
    o.wrap = m;
    return o;
  }
  // Opened and logged in, or nullptr with a recorded failure.
  std::unique_ptr<Token> open_logged_in(const TokenOptions& o) {
    auto t = Token::open(o);
    if (!t.ok()) {
      ADD_FAILURE() << "open: " << t.error().message;
      return nullptr;
    }
    auto st = (*t)->login(pin());
    if (!st.ok()) {
      ADD_FAILURE() << "login: " << st.error().message;
      return nullptr;
    }
    return std::move(t).value();
  }
  std::unique_ptr<Token> open_with_master(WrapMechanism m = WrapMechanism::kAesKeyWrapPad) {
    auto t = open_logged_in(options(m));
    if (t) {
      auto st = t->generate_master_key(1);
      if (!st.ok()) ADD_FAILURE() << "generate_master_key: " << st.error().message;
    }
    return t;
  }
};

// ---- envelope, once per mechanism ----

class EnvelopeTest : public TokenTest, public ::testing::WithParamInterface<WrapMechanism> {};

std::string mechanism_name(const ::testing::TestParamInfo<WrapMechanism>& info) {
  std::string s = to_string(info.param);
  std::erase(s, '-');
  return s;
}

INSTANTIATE_TEST_SUITE_P(Mechanisms, EnvelopeTest,
                         ::testing::Values(WrapMechanism::kAesKeyWrapPad, WrapMechanism::kAesGcm,
                                           WrapMechanism::kAesCbcPadHmac),
                         mechanism_name);

TEST_P(EnvelopeTest, SealedRecordOpensToThePlaintext) {
  auto t = open_with_master(GetParam());
  ASSERT_NE(t, nullptr);
  auto pt = bytes("-----BEGIN PRIVATE KEY----- pretend PKCS#8");
  auto aad = bytes("user=42;key=7;v=1");
  auto blob = t->seal(pt, aad);
  ASSERT_TRUE(blob.ok()) << blob.error().message;
  EXPECT_EQ((*blob)[0], envelope::kVersion);
  EXPECT_EQ((*blob)[1], static_cast<std::uint8_t>(GetParam()));
  auto opened = t->open(*blob, aad);
  ASSERT_TRUE(opened.ok()) << opened.error().message;
  EXPECT_EQ(std::vector<std::uint8_t>(opened->data(), opened->data() + opened->size()), pt);

  // Empty plaintext and empty AAD are legal too.
  auto empty = t->seal({}, {});
  ASSERT_TRUE(empty.ok()) << empty.error().message;
  auto opened_empty = t->open(*empty, {});
  ASSERT_TRUE(opened_empty.ok()) << opened_empty.error().message;
  EXPECT_TRUE(opened_empty->empty());
}

TEST_P(EnvelopeTest, OpenWithAnotherRecordsAadFails) {
  auto t = open_with_master(GetParam());
  ASSERT_NE(t, nullptr);
  auto blob = t->seal(bytes("secret"), bytes("user=42"));
  ASSERT_TRUE(blob.ok()) << blob.error().message;
  for (auto wrong : {bytes("user=43"), bytes(""), bytes("user=42 ")}) {
    auto r = t->open(*blob, wrong);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code, ErrorCode::kCrypto);
    EXPECT_EQ(r.error().message, envelope::kOpenFailed);
  }
}

TEST_P(EnvelopeTest, OneFlippedBitAnywhereInTheBlobFails) {
  auto t = open_with_master(GetParam());
  ASSERT_NE(t, nullptr);
  auto aad = bytes("user=1");
  auto blob = t->seal(bytes("sixteen byte pt!"), aad);
  ASSERT_TRUE(blob.ok()) << blob.error().message;
  // Every byte: header (0..7), protected data key, nonce, ciphertext and tag.
  for (std::size_t i = 0; i < blob->size(); ++i) {
    auto bad = *blob;
    bad[i] ^= static_cast<std::uint8_t>(1u << (i % 8));
    auto r = t->open(bad, aad);
    ASSERT_FALSE(r.ok()) << "flipped bit in byte " << i << " of " << blob->size();
    EXPECT_EQ(r.error().code, ErrorCode::kCrypto) << "byte " << i;
    EXPECT_EQ(r.error().message, envelope::kOpenFailed) << "byte " << i;
  }
  // The untouched blob still opens: nothing above disturbed the token.
  EXPECT_TRUE(t->open(*blob, aad).ok());
}

TEST_P(EnvelopeTest, TruncatedOrExtendedBlobsFailWithoutCrashing) {
  auto t = open_with_master(GetParam());
  ASSERT_NE(t, nullptr);
  auto blob = t->seal(bytes("payload"), bytes("a"));
  ASSERT_TRUE(blob.ok()) << blob.error().message;
  for (std::size_t n = 0; n < blob->size(); ++n) {
    std::vector<std::uint8_t> cut(blob->begin(), blob->begin() + static_cast<std::ptrdiff_t>(n));
    auto r = t->open(cut, bytes("a"));
    ASSERT_FALSE(r.ok()) << "length " << n;
    EXPECT_EQ(r.error().message, envelope::kOpenFailed);
  }
  auto longer = *blob;
  longer.push_back(0);
  EXPECT_FALSE(t->open(longer, bytes("a")).ok());
  // A length field pointing past the end.
  auto huge = *blob;
  huge[6] = 0xff;
  huge[7] = 0xff;
  EXPECT_FALSE(t->open(huge, bytes("a")).ok());
}

TEST_P(EnvelopeTest, RotationSealsUnderTheNewestAndOpensOlderRecords) {
  auto t = open_with_master(GetParam());
  ASSERT_NE(t, nullptr);
  auto aad = bytes("r");
  auto old_blob = t->seal(bytes("old"), aad);
  ASSERT_TRUE(old_blob.ok()) << old_blob.error().message;
  ASSERT_TRUE(t->generate_master_key(2).ok());
  auto versions = t->master_key_versions();
  ASSERT_TRUE(versions.ok());
  EXPECT_EQ(*versions, (std::vector<std::uint32_t>{1, 2}));
  auto new_blob = t->seal(bytes("new"), aad);
  ASSERT_TRUE(new_blob.ok()) << new_blob.error().message;
  // Master version is bytes 2..5, big-endian.
  EXPECT_EQ((*old_blob)[5], 1);
  EXPECT_EQ((*new_blob)[5], 2);
  auto o1 = t->open(*old_blob, aad);
  auto o2 = t->open(*new_blob, aad);
  ASSERT_TRUE(o1.ok()) << o1.error().message;
  ASSERT_TRUE(o2.ok()) << o2.error().message;
  EXPECT_EQ(o1->view(), "old");
  EXPECT_EQ(o2->view(), "new");
  // An explicit older version is still usable for sealing.
  auto pinned = t->seal(bytes("pinned"), aad, 1);
  ASSERT_TRUE(pinned.ok());
  EXPECT_EQ((*pinned)[5], 1);
}

TEST_P(EnvelopeTest, SealAndOpenRecoverAfterAllSessionsWereClosed) {
  auto t = open_with_master(GetParam());
  ASSERT_NE(t, nullptr);
  auto blob = t->seal(bytes("before"), bytes("x"));
  ASSERT_TRUE(blob.ok());
  t->close_all_sessions_for_test();
  auto opened = t->open(*blob, bytes("x"));
  ASSERT_TRUE(opened.ok()) << opened.error().message;
  EXPECT_EQ(opened->view(), "before");
  t->close_all_sessions_for_test();
  auto again = t->seal(bytes("after"), bytes("x"));
  ASSERT_TRUE(again.ok()) << again.error().message;
  EXPECT_TRUE(t->logged_in());
  EXPECT_FALSE(t->status().degraded);
}

TEST_F(TokenTest, BlobOfAMasterVersionNotOnTheTokenFailsUniformly) {
  auto t = open_with_master();
  ASSERT_NE(t, nullptr);
  auto blob = t->seal(bytes("x"), bytes("y"));
  ASSERT_TRUE(blob.ok());
  auto moved = *blob;
  moved[5] = 9;  // master version 9 does not exist
  auto r = t->open(moved, bytes("y"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kCrypto);
  EXPECT_EQ(r.error().message, envelope::kOpenFailed);
  auto s = t->seal(bytes("x"), bytes("y"), 9);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.error().code, ErrorCode::kNotFound);
}

TEST_F(TokenTest, SealWithoutAnyMasterKeyExplainsWhatToDo) {
  auto t = open_logged_in(options());
  ASSERT_NE(t, nullptr);
  auto r = t->seal(bytes("x"), bytes("y"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kFailedPrecondition);
  EXPECT_NE(r.error().message.find("kmsctl init"), std::string::npos) << r.error().message;
}

TEST_F(TokenTest, FourThreadsSealAndOpenThroughAPoolOfTwo) {
  auto o = options();
  o.pool_size = 2;
  auto t = open_logged_in(o);
  ASSERT_NE(t, nullptr);
  ASSERT_TRUE(t->generate_master_key(1).ok());
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] {
      for (int j = 0; j < 25; ++j) {
        std::string text = "thread " + std::to_string(i) + " record " + std::to_string(j);
        auto aad = bytes("aad" + std::to_string(i));
        auto blob = t->seal(bytes(text), aad);
        if (!blob.ok()) {
          ++failures;
          continue;
        }
        auto opened = t->open(*blob, aad);
        if (!opened.ok() || opened->view() != text) ++failures;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
}

// ---- CA signing on the token ----

class CaKeyTest : public TokenTest, public ::testing::WithParamInterface<KeyType> {};

std::string key_type_name(const ::testing::TestParamInfo<KeyType>& info) {
  std::string s = to_string(info.param);
  std::erase(s, '-');
  return s;
}

INSTANTIATE_TEST_SUITE_P(KeyTypes, CaKeyTest,
                         ::testing::Values(KeyType::kEcP256, KeyType::kEcP384, KeyType::kRsa2048),
                         key_type_name);

// A self-signed certificate signed by the token key, verified with the public key.
void expect_certificate_signs_and_verifies(EVP_PKEY* priv, EVP_PKEY* pub) {
  ossl::X509Ptr cert(X509_new());
  ASSERT_TRUE(cert);
  ASSERT_EQ(X509_set_version(cert.get(), X509_VERSION_3), 1);
  ASN1_INTEGER_set(X509_get_serialNumber(cert.get()), 1);
  X509_NAME* name = X509_get_subject_name(cert.get());
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>("kmsd test CA"), -1, -1, 0);
  X509_set_issuer_name(cert.get(), name);
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), 0);
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), 3600);
  ASSERT_EQ(X509_set_pubkey(cert.get(), pub), 1);
  ASSERT_GT(X509_sign(cert.get(), priv, EVP_sha256()), 0) << ossl::drain_errors();
  EXPECT_EQ(X509_verify(cert.get(), pub), 1) << ossl::drain_errors();

  // And a plain EVP_DigestSign / EVP_DigestVerify.
  const unsigned char msg[] = "crl or ocsp response bytes";
  ossl::EvpMdCtxPtr sctx(EVP_MD_CTX_new());
  std::size_t siglen = 0;
  ASSERT_EQ(EVP_DigestSignInit(sctx.get(), nullptr, EVP_sha256(), nullptr, priv), 1)
      << ossl::drain_errors();
  ASSERT_EQ(EVP_DigestSign(sctx.get(), nullptr, &siglen, msg, sizeof msg), 1);
  std::vector<unsigned char> sig(siglen);
  ASSERT_EQ(EVP_DigestSign(sctx.get(), sig.data(), &siglen, msg, sizeof msg), 1)
      << ossl::drain_errors();
  sig.resize(siglen);
  ossl::EvpMdCtxPtr vctx(EVP_MD_CTX_new());
  ASSERT_EQ(EVP_DigestVerifyInit(vctx.get(), nullptr, EVP_sha256(), nullptr, pub), 1);
  EXPECT_EQ(EVP_DigestVerify(vctx.get(), sig.data(), sig.size(), msg, sizeof msg), 1);
}

TEST_P(CaKeyTest, CertificateSignedWithTheTokenKeyVerifiesWithThePublicKey) {
  auto t = open_logged_in(options());
  ASSERT_NE(t, nullptr);
  ASSERT_FALSE(t->has_ca_key());
  auto st = t->generate_ca_key(GetParam());
  ASSERT_TRUE(st.ok()) << st.error().message;
  EXPECT_TRUE(t->has_ca_key());
  auto pub = t->ca_public_key();
  ASSERT_TRUE(pub.ok()) << pub.error().message;
  auto priv = t->ca_private_key();
  ASSERT_TRUE(priv.ok()) << priv.error().message;
  expect_certificate_signs_and_verifies(priv->get(), pub->get());
}

TEST_P(CaKeyTest, SigningWorksAgainAfterAllSessionsWereClosed) {
  auto t = open_logged_in(options());
  ASSERT_NE(t, nullptr);
  ASSERT_TRUE(t->generate_ca_key(GetParam()).ok());
  auto pub = t->ca_public_key();
  ASSERT_TRUE(pub.ok());
  {
    auto priv = t->ca_private_key();
    ASSERT_TRUE(priv.ok()) << priv.error().message;
    expect_certificate_signs_and_verifies(priv->get(), pub->get());
  }
  t->close_all_sessions_for_test();
  auto priv = t->ca_private_key();
  ASSERT_TRUE(priv.ok()) << priv.error().message;
  expect_certificate_signs_and_verifies(priv->get(), pub->get());
  EXPECT_TRUE(t->logged_in());
  EXPECT_FALSE(t->status().degraded);
}

TEST_F(TokenTest, CaPrivateKeyCanBeFetchedAndFreedRepeatedly) {
  auto t = open_logged_in(options());
  ASSERT_NE(t, nullptr);
  ASSERT_TRUE(t->generate_ca_key(KeyType::kEcP256).ok());
  auto pub = t->ca_public_key();
  ASSERT_TRUE(pub.ok());
  for (int i = 0; i < 3; ++i) {
    auto a = t->ca_private_key();
    auto b = t->ca_private_key();
    ASSERT_TRUE(a.ok() && b.ok());
    expect_certificate_signs_and_verifies(a->get(), pub->get());
    a->reset();
    expect_certificate_signs_and_verifies(b->get(), pub->get());
  }
}

// A key fetched before a recovery (its sessions and handles are gone) fails to sign, cleanly
// (no crash, no signature), and a key fetched afterwards signs.
TEST_F(TokenTest, CaKeyFetchedBeforeSessionLossFailsCleanlyAndAFreshOneSigns) {
  auto t = open_with_master();
  ASSERT_NE(t, nullptr);
  ASSERT_TRUE(t->generate_ca_key(KeyType::kEcP256).ok());
  auto pub = t->ca_public_key();
  auto old_key = t->ca_private_key();
  ASSERT_TRUE(pub.ok() && old_key.ok());
  expect_certificate_signs_and_verifies(old_key->get(), pub->get());
  t->close_all_sessions_for_test();
  ASSERT_TRUE(t->seal(bytes("x"), bytes("y")).ok());  // recovers and re-logs in
  ossl::X509Ptr cert(X509_new());
  X509_set_pubkey(cert.get(), pub->get());
  EXPECT_LE(X509_sign(cert.get(), old_key->get(), EVP_sha256()), 0);
  ossl::drain_errors();
  auto fresh = t->ca_private_key();
  ASSERT_TRUE(fresh.ok()) << fresh.error().message;
  expect_certificate_signs_and_verifies(fresh->get(), pub->get());
  old_key->reset();
  EXPECT_TRUE(t->seal(bytes("x"), bytes("y")).ok());
  expect_certificate_signs_and_verifies(fresh->get(), pub->get());
  EXPECT_FALSE(t->status().degraded);
}

// The CA key is built once and shared: the key lookup is not repeated per signature.
TEST_F(TokenTest, CaPrivateKeyIsBuiltOnceAndSharedByConcurrentSigners) {
  auto t = open_logged_in(options());
  ASSERT_NE(t, nullptr);
  ASSERT_TRUE(t->generate_ca_key(KeyType::kEcP256).ok());
  auto pub = t->ca_public_key();
  auto a = t->ca_private_key();
  auto b = t->ca_private_key();
  ASSERT_TRUE(pub.ok() && a.ok() && b.ok());
  EXPECT_EQ(a->get(), b->get());
  a->reset();  // a caller's reference going away does not free the cached key
  expect_certificate_signs_and_verifies(b->get(), pub->get());
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&] {
      for (int n = 0; n < 25; ++n) {
        auto k = t->ca_private_key();
        if (!k.ok() || k->get() != b->get()) {
          ++bad;
          continue;
        }
        ossl::X509Ptr cert(X509_new());
        X509_set_pubkey(cert.get(), pub->get());
        if (X509_sign(cert.get(), k->get(), EVP_sha256()) <= 0 ||
            X509_verify(cert.get(), pub->get()) != 1)
          ++bad;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0);
}

// A key that outlives its Token fails to sign, cleanly (no crash, no signature).
TEST_F(TokenTest, CaKeyUsedAfterItsTokenIsClosedFailsCleanly) {
  auto t = open_logged_in(options());
  ASSERT_NE(t, nullptr);
  ASSERT_TRUE(t->generate_ca_key(KeyType::kEcP256).ok());
  auto pub = t->ca_public_key();
  auto key = t->ca_private_key();
  ASSERT_TRUE(pub.ok() && key.ok());
  expect_certificate_signs_and_verifies(key->get(), pub->get());
  t.reset();
  ossl::X509Ptr cert(X509_new());
  X509_set_pubkey(cert.get(), pub->get());
  EXPECT_LE(X509_sign(cert.get(), key->get(), EVP_sha256()), 0);
  std::string told;  // the token layer's reason travels as the error's data
  const char* data = nullptr;
  int flags = 0;
  while (ERR_get_error_all(nullptr, nullptr, nullptr, &data, &flags) != 0) {
    if (data != nullptr && (flags & ERR_TXT_STRING) != 0) told += data;
  }
  EXPECT_NE(told.find("has been closed"), std::string::npos) << told;
}

// The DR custody key: an RSA decryption key pair fetched through the same bridge decrypts
// what its public key encrypted, with OAEP (SHA-256) and PKCS#1 v1.5 padding.
TEST_F(TokenTest, RsaDecryptionKeyDecryptsOaepAndPkcs1OnTheToken) {
  auto o = options();
  o.labels.ca = "custody";
  auto t = open_logged_in(o);
  ASSERT_NE(t, nullptr);
  ASSERT_TRUE(t->generate_decryption_key("custody", KeyType::kRsa2048).ok());
  auto pub = t->ca_public_key();
  auto priv = t->ca_private_key();
  ASSERT_TRUE(pub.ok() && priv.ok()) << (pub.ok() ? priv.error() : pub.error()).message;
  const std::vector<unsigned char> secret = bytes("a 32-byte content-encryption key");
  for (bool oaep : {true, false}) {
    SCOPED_TRACE(oaep ? "OAEP" : "PKCS#1 v1.5");
    auto setup = [&](EVP_PKEY_CTX* ctx) {
      if (!oaep) return EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_PADDING) == 1;
      return EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_OAEP_PADDING) == 1 &&
             EVP_PKEY_CTX_set_rsa_oaep_md(ctx, EVP_sha256()) == 1;
    };
    ossl::EvpPkeyCtxPtr ectx(EVP_PKEY_CTX_new(pub->get(), nullptr));
    ASSERT_TRUE(ectx && EVP_PKEY_encrypt_init(ectx.get()) == 1 && setup(ectx.get()));
    std::size_t clen = 0;
    ASSERT_EQ(EVP_PKEY_encrypt(ectx.get(), nullptr, &clen, secret.data(), secret.size()), 1);
    std::vector<unsigned char> ct(clen);
    ASSERT_EQ(EVP_PKEY_encrypt(ectx.get(), ct.data(), &clen, secret.data(), secret.size()), 1);
    ct.resize(clen);
    ossl::EvpPkeyCtxPtr dctx(EVP_PKEY_CTX_new(priv->get(), nullptr));
    ASSERT_TRUE(dctx && EVP_PKEY_decrypt_init(dctx.get()) == 1 && setup(dctx.get()))
        << ossl::drain_errors();
    std::size_t plen = 0;
    ASSERT_EQ(EVP_PKEY_decrypt(dctx.get(), nullptr, &plen, ct.data(), ct.size()), 1);
    std::vector<unsigned char> pt(plen);
    ASSERT_EQ(EVP_PKEY_decrypt(dctx.get(), pt.data(), &plen, ct.data(), ct.size()), 1)
        << ossl::drain_errors();
    pt.resize(plen);
    EXPECT_EQ(pt, secret);
  }
}

TEST_F(TokenTest, CachedCaKeyIsDroppedAtLogoutAndRebuiltAfterLogin) {
  auto t = open_logged_in(options());
  ASSERT_NE(t, nullptr);
  ASSERT_TRUE(t->generate_ca_key(KeyType::kEcP256).ok());
  auto pub = t->ca_public_key();
  auto before = t->ca_private_key();
  ASSERT_TRUE(pub.ok() && before.ok());
  t->logout();
  auto sealed = t->ca_private_key();
  ASSERT_FALSE(sealed.ok());
  EXPECT_EQ(sealed.error().code, ErrorCode::kFailedPrecondition);
  ASSERT_TRUE(t->login(pin()).ok());
  auto after = t->ca_private_key();
  ASSERT_TRUE(after.ok()) << after.error().message;
  EXPECT_NE(after->get(), before->get());
  expect_certificate_signs_and_verifies(after->get(), pub->get());
  // And after a lost session: recovered, rebuilt, signing.
  t->close_all_sessions_for_test();
  auto recovered = t->ca_private_key();
  ASSERT_TRUE(recovered.ok()) << recovered.error().message;
  EXPECT_NE(recovered->get(), after->get());
  expect_certificate_signs_and_verifies(recovered->get(), pub->get());
}

TEST_F(TokenTest, PublicKeyNeedsNoLoginButPrivateKeyDoes) {
  {
    auto t = open_logged_in(options());
    ASSERT_NE(t, nullptr);
    ASSERT_TRUE(t->generate_ca_key(KeyType::kEcP256).ok());
  }
  auto t = Token::open(options());
  ASSERT_TRUE(t.ok());
  auto pub = (*t)->ca_public_key();
  EXPECT_TRUE(pub.ok()) << pub.error().message;
  auto priv = (*t)->ca_private_key();
  ASSERT_FALSE(priv.ok());
  EXPECT_EQ(priv.error().code, ErrorCode::kFailedPrecondition);
}

// ---- key objects ----

TEST_F(TokenTest, GeneratingAnExistingKeyIsRefused) {
  auto t = open_logged_in(options(WrapMechanism::kAesCbcPadHmac));
  ASSERT_NE(t, nullptr);
  ASSERT_TRUE(t->generate_master_key(1).ok());
  auto again = t->generate_master_key(1);
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.error().code, ErrorCode::kAlreadyExists);
  EXPECT_NE(again.error().message.find("kms-master-v1"), std::string::npos);

  ASSERT_TRUE(t->generate_ca_key(KeyType::kEcP256).ok());
  auto ca = t->generate_ca_key(KeyType::kRsa2048);
  ASSERT_FALSE(ca.ok());
  EXPECT_EQ(ca.error().code, ErrorCode::kAlreadyExists);

  ASSERT_TRUE(t->generate_audit_key().ok());
  auto audit = t->generate_audit_key();
  ASSERT_FALSE(audit.ok());
  EXPECT_EQ(audit.error().code, ErrorCode::kAlreadyExists);
  EXPECT_EQ(t->master_key_versions().value(), std::vector<std::uint32_t>{1});
}

// Reads attributes with raw PKCS#11 on the same (already logged-in) module.
struct RawAttributes {
  bool sensitive, extractable, never_extractable, always_sensitive, token, priv;
};

RawAttributes raw_attributes(CK_OBJECT_CLASS cls, const std::string& label) {
  auto module = p11::Module::load(kSoftHsmModule);
  EXPECT_TRUE(module.ok());
  auto slots = p11::slots_with_tokens(**module);
  CK_SLOT_ID slot = CK_INVALID_HANDLE;
  for (auto& s : slots) {
    if (s.token_label == "kmsd-test") slot = s.slot_id;
  }
  auto s = p11::Session::open(*module, slot);
  CK_ATTRIBUTE tmpl[] = {{CKA_CLASS, &cls, sizeof cls},
                         {CKA_LABEL, const_cast<char*>(label.data()), label.size()}};
  auto found = s.find(tmpl, 2);
  EXPECT_EQ(found.size(), 1u) << label;
  if (found.empty()) return {};
  CK_OBJECT_HANDLE h = found[0];
  return {s.bool_attribute(h, CKA_SENSITIVE),
          s.bool_attribute(h, CKA_EXTRACTABLE),
          s.bool_attribute(h, CKA_NEVER_EXTRACTABLE),
          s.bool_attribute(h, CKA_ALWAYS_SENSITIVE),
          s.bool_attribute(h, CKA_TOKEN),
          s.bool_attribute(h, CKA_PRIVATE)};
}

TEST_F(TokenTest, GeneratedKeysAreSensitiveAndNeverExtractable) {
  auto t = open_logged_in(options(WrapMechanism::kAesCbcPadHmac));
  ASSERT_NE(t, nullptr);
  ASSERT_TRUE(t->generate_master_key(1).ok());
  ASSERT_TRUE(t->generate_ca_key(KeyType::kEcP256).ok());
  ASSERT_TRUE(t->generate_audit_key().ok());
  struct Case {
    CK_OBJECT_CLASS cls;
    const char* label;
  };
  for (Case c : {Case{CKO_SECRET_KEY, "kms-master-v1"}, Case{CKO_SECRET_KEY, "kms-master-mac-v1"},
                 Case{CKO_PRIVATE_KEY, "kms-ca"}, Case{CKO_SECRET_KEY, "kms-audit"}}) {
    SCOPED_TRACE(c.label);
    RawAttributes a = raw_attributes(c.cls, c.label);
    EXPECT_TRUE(a.sensitive);
    EXPECT_FALSE(a.extractable);
    EXPECT_TRUE(a.never_extractable);
    EXPECT_TRUE(a.always_sensitive);
    EXPECT_TRUE(a.token);
    EXPECT_TRUE(a.priv);
  }
}

TEST_F(TokenTest, KeyWrapMasterKeyCannotEncryptOrSign) {
  auto t = open_with_master(WrapMechanism::kAesKeyWrapPad);
  ASSERT_NE(t, nullptr);
  auto module = p11::Module::load(kSoftHsmModule);
  ASSERT_TRUE(module.ok());
  auto s = p11::Session::open(*module, p11::slots_with_tokens(**module).at(0).slot_id);
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  std::string label = "kms-master-v1";
  CK_ATTRIBUTE tmpl[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_LABEL, label.data(), label.size()}};
  auto found = s.find(tmpl, 2);
  ASSERT_EQ(found.size(), 1u);
  EXPECT_TRUE(s.bool_attribute(found[0], CKA_WRAP));
  EXPECT_TRUE(s.bool_attribute(found[0], CKA_UNWRAP));
  EXPECT_FALSE(s.bool_attribute(found[0], CKA_ENCRYPT));
  EXPECT_FALSE(s.bool_attribute(found[0], CKA_DECRYPT));
  EXPECT_FALSE(s.bool_attribute(found[0], CKA_SIGN));
}

TEST_F(TokenTest, AuditHmacIsStableAndDependsOnTheData) {
  auto t = open_logged_in(options());
  ASSERT_NE(t, nullptr);
  auto missing = t->hmac_sha256(bytes("a"));
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.error().code, ErrorCode::kNotFound);
  ASSERT_TRUE(t->has_audit_key() == false);
  ASSERT_TRUE(t->generate_audit_key().ok());
  EXPECT_TRUE(t->has_audit_key());
  auto a1 = t->hmac_sha256(bytes("entry 1"));
  auto a2 = t->hmac_sha256(bytes("entry 1"));
  auto b = t->hmac_sha256(bytes("entry 2"));
  ASSERT_TRUE(a1.ok() && a2.ok() && b.ok());
  EXPECT_EQ(a1->size(), 32u);
  EXPECT_EQ(*a1, *a2);
  EXPECT_NE(*a1, *b);
  t->close_all_sessions_for_test();
  auto after = t->hmac_sha256(bytes("entry 1"));
  ASSERT_TRUE(after.ok()) << after.error().message;
  EXPECT_EQ(*after, *a1);
}

TEST_F(TokenTest, RandomComesFromTheTokenWithoutLogin) {
  auto t = Token::open(options());
  ASSERT_TRUE(t.ok());
  auto r1 = (*t)->random(32);
  auto r2 = (*t)->random(32);
  ASSERT_TRUE(r1.ok()) << r1.error().message;
  ASSERT_TRUE(r2.ok());
  EXPECT_EQ(r1->size(), 32u);
  EXPECT_NE(r1->view(), r2->view());
}

TEST_F(TokenTest, DataObjectsAreWrittenReadAndNotSilentlyOverwritten) {
  auto t = open_logged_in(options());
  ASSERT_NE(t, nullptr);
  auto missing = t->read_data_object("startup-secret");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.error().code, ErrorCode::kNotFound);

  ASSERT_TRUE(t->write_data_object("startup-secret", SecretBytes::from_string("one"), false).ok());
  auto v1 = t->read_data_object("startup-secret");
  ASSERT_TRUE(v1.ok()) << v1.error().message;
  EXPECT_EQ(v1->view(), "one");

  auto refused = t->write_data_object("startup-secret", SecretBytes::from_string("two"), false);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().code, ErrorCode::kAlreadyExists);
  EXPECT_EQ(t->read_data_object("startup-secret")->view(), "one");

  ASSERT_TRUE(t->write_data_object("startup-secret", SecretBytes::from_string("two"), true).ok());
  EXPECT_EQ(t->read_data_object("startup-secret")->view(), "two");

  // Private: invisible without login.
  t->logout();
  auto t2 = Token::open(options());
  ASSERT_TRUE(t2.ok());
  EXPECT_FALSE((*t2)->read_data_object("startup-secret").ok());
}

// ---- login ----

TEST_F(TokenTest, WrongPinIsUnauthenticatedAndLeavesTheTokenLoggedOut) {
  auto t = Token::open(options());
  ASSERT_TRUE(t.ok()) << t.error().message;
  // Exactly one wrong PIN: never drive a token towards its lockout.
  auto st = (*t)->login(pin("00000000"));
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.error().code, ErrorCode::kUnauthenticated);
  EXPECT_NE(st.error().message.find("kmsd-test"), std::string::npos) << st.error().message;
  EXPECT_FALSE((*t)->logged_in());
  TokenStatus s = (*t)->status();
  EXPECT_FALSE(s.logged_in);
  EXPECT_FALSE(s.pin_locked);
  EXPECT_EQ(s.token_label, "kmsd-test");
  auto sealed = (*t)->seal(bytes("x"), bytes("y"));
  ASSERT_FALSE(sealed.ok());
  EXPECT_EQ(sealed.error().code, ErrorCode::kFailedPrecondition);
  // The right PIN still works afterwards.
  ASSERT_TRUE((*t)->login(pin()).ok());
  EXPECT_TRUE((*t)->logged_in());
  EXPECT_TRUE((*t)->status().logged_in);
}

TEST_F(TokenTest, WrongPinIsNotAcceptedWhileAnotherHandleIsLoggedIn) {
  auto first = open_logged_in(options());
  ASSERT_NE(first, nullptr);
  auto second = Token::open(options());
  ASSERT_TRUE(second.ok());
  auto st = (*second)->login(pin("00000000"));
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.error().code, ErrorCode::kUnauthenticated);
  EXPECT_FALSE((*second)->logged_in());
  // Checking that PIN cost the process its login; the first handle logs in again by itself.
  auto after = first->generate_audit_key();
  EXPECT_TRUE(after.ok()) << after.error().message;
  EXPECT_TRUE(first->logged_in());
}

TEST_F(TokenTest, PinChangedBehindOurBackLogsOutInsteadOfRetrying) {
  auto t = open_with_master();
  ASSERT_NE(t, nullptr);
  {
    // An operator changes the user PIN with another tool while kmsd runs.
    auto module = p11::Module::load(kSoftHsmModule);
    ASSERT_TRUE(module.ok());
    auto s = p11::Session::open(*module, p11::slots_with_tokens(**module).at(0).slot_id);
    std::string old_pin = kUserPin, new_pin = "11223344";
    ASSERT_EQ(
        s.f()->C_SetPIN(s.handle(), reinterpret_cast<CK_UTF8CHAR*>(old_pin.data()), old_pin.size(),
                        reinterpret_cast<CK_UTF8CHAR*>(new_pin.data()), new_pin.size()),
        CKR_OK);
  }
  t->close_all_sessions_for_test();
  // Recovery tries the retained PIN once, is refused, and stops: no second wrong attempt.
  // For the operation it is an outage (the daemon seals), not its caller's wrong credential.
  auto r = t->seal(bytes("x"), bytes("y"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kUnavailable) << r.error().message;
  EXPECT_NE(r.error().message.find("PIN"), std::string::npos) << r.error().message;
  EXPECT_FALSE(t->logged_in());
  EXPECT_FALSE(t->status().pin_locked);
  auto again = t->seal(bytes("x"), bytes("y"));
  ASSERT_FALSE(again.ok());
  // Sealed by the refusal: an outage for every later caller, saying why, until a new login.
  EXPECT_EQ(again.error().code, ErrorCode::kUnavailable);
  EXPECT_NE(again.error().message.find("no longer accepts the startup secret"), std::string::npos);
  ASSERT_TRUE(t->login(pin("11223344")).ok());
  auto after = t->seal(bytes("x"), bytes("y"));
  EXPECT_TRUE(after.ok()) << after.error().message;
  EXPECT_FALSE(t->status().degraded);
}

// Another application logs the token out: the handles kmsd resolved now name private keys
// the session may not use (SoftHSM says *_KEY_HANDLE_INVALID, not USER_NOT_LOGGED_IN). That
// is a lost login, recovered with the retained PIN, never a "tampered record".
TEST_F(TokenTest, LogoutBehindOurBackIsRecoveredNotMistakenForATamperedRecord) {
  auto t = open_with_master();
  ASSERT_NE(t, nullptr);
  ASSERT_TRUE(t->generate_audit_key().ok());
  auto blob = t->seal(bytes("escrowed"), bytes("aad"));
  auto mac = t->hmac_sha256(bytes("record"));
  ASSERT_TRUE(blob.ok() && mac.ok());
  for (int round = 0; round < 2; ++round) {
    {
      auto module = p11::Module::load(kSoftHsmModule);
      ASSERT_TRUE(module.ok());
      auto s = p11::Session::open(*module, p11::slots_with_tokens(**module).at(0).slot_id);
      ASSERT_EQ(s.f()->C_Logout(s.handle()), CKR_OK);
    }
    auto opened = t->open(*blob, bytes("aad"));
    ASSERT_TRUE(opened.ok()) << opened.error().message;
    EXPECT_EQ(opened->view(), "escrowed");
    auto again = t->hmac_sha256(bytes("record"));
    ASSERT_TRUE(again.ok()) << again.error().message;
    EXPECT_EQ(*again, *mac);
    EXPECT_TRUE(t->seal(bytes("x"), bytes("y")).ok());
    EXPECT_TRUE(t->logged_in());
    EXPECT_FALSE(t->status().degraded);
  }
}

TEST_F(TokenTest, LogoutForgetsThePinAndRefusesKeyOperations) {
  auto t = open_with_master();
  ASSERT_NE(t, nullptr);
  auto blob = t->seal(bytes("x"), bytes("y"));
  ASSERT_TRUE(blob.ok());
  t->logout();
  EXPECT_FALSE(t->logged_in());
  auto r = t->open(*blob, bytes("y"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kFailedPrecondition);
  ASSERT_TRUE(t->login(pin()).ok());
  EXPECT_TRUE(t->open(*blob, bytes("y")).ok());
}

// ---- opening: clear errors ----

TEST_F(TokenTest, MalformedUriIsAnInvalidArgumentThatSaysWhy) {
  for (const char* uri : {"token=kmsd-test", "pkcs11:", "pkcs11:token=%zz", "pkcs11:colour=red",
                          "pkcs11:object=kms-ca", "pkcs11:token=a;token=b"}) {
    SCOPED_TRACE(uri);
    auto o = options();
    o.token_uri = uri;
    auto t = Token::open(o);
    ASSERT_FALSE(t.ok());
    EXPECT_EQ(t.error().code, ErrorCode::kInvalidArgument);
    EXPECT_NE(t.error().message.find(uri), std::string::npos) << t.error().message;
  }
}

TEST_F(TokenTest, UnknownTokenListsTheTokensThatArePresent) {
  auto o = options();
  o.token_uri = "pkcs11:token=no-such-token";
  auto t = Token::open(o);
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.error().code, ErrorCode::kNotFound);
  EXPECT_NE(t.error().message.find("pkcs11:token=no-such-token"), std::string::npos);
  EXPECT_NE(t.error().message.find("'kmsd-test' (serial "), std::string::npos) << t.error().message;
}

TEST_F(TokenTest, TokenIsFoundBySerialAndByPercentEncodedLabel) {
  token().add_token("ops card 1");
  auto slots = Token::list_slots(kSoftHsmModule);
  ASSERT_TRUE(slots.ok());
  std::string serial;
  for (auto& s : *slots) {
    if (s.token_label == "kmsd-test") serial = s.token_serial;
  }
  ASSERT_FALSE(serial.empty());
  auto o = options();
  o.token_uri = "pkcs11:serial=" + serial;
  auto by_serial = Token::open(o);
  ASSERT_TRUE(by_serial.ok()) << by_serial.error().message;
  EXPECT_EQ((*by_serial)->status().token_label, "kmsd-test");
  o.token_uri = "pkcs11:token=ops%20card%201";
  auto by_label = Token::open(o);
  ASSERT_TRUE(by_label.ok()) << by_label.error().message;
  EXPECT_EQ((*by_label)->status().token_label, "ops card 1");
}

TEST_F(TokenTest, UnloadableModuleNamesThePathAndTheSetting) {
  auto o = options();
  o.module_path = (dir() / "missing-module.so").string();
  auto t = Token::open(o);
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.error().code, ErrorCode::kConfig);
  EXPECT_NE(t.error().message.find(o.module_path), std::string::npos) << t.error().message;
  EXPECT_NE(t.error().message.find("token.module"), std::string::npos) << t.error().message;

  o.module_path = "/usr/lib/x86_64-linux-gnu/libcrypto.so.3";  // loads, but is no PKCS#11 module
  auto not_p11 = Token::open(o);
  ASSERT_FALSE(not_p11.ok());
  EXPECT_NE(not_p11.error().message.find("C_GetFunctionList"), std::string::npos);
}

}  // namespace
}  // namespace kmsd::hsm

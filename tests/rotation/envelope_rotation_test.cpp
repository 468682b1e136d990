// Envelope format 2 and master-key rotation on a throw-away SoftHSM2 token, once per wrap
// mechanism: rewrap() moves a record to the next master key without touching its payload,
// every tampering still fails, format-1 records still open, and a retired master key is gone.
#include <gtest/gtest.h>

#include <algorithm>

#include "hsm/envelope.hpp"
#include "hsm/token.hpp"
#include "tests/support/sandbox.hpp"

namespace kmsd::hsm {
namespace {

using kmsd::testing::kSoftHsmModule;
using kmsd::testing::kUserPin;

Bytes bytes(std::string_view s) {
  return {s.begin(), s.end()};
}

std::uint32_t master_of(const Bytes& blob) {
  auto p = envelope::parse(blob);
  return p ? p->master_version : 0;
}

// The bytes rewrap() must keep: nonce, ciphertext and tag.
Bytes payload_of(const Bytes& blob) {
  auto p = envelope::parse(blob);
  if (!p) return {};
  Bytes out(p->nonce.begin(), p->nonce.end());
  out.insert(out.end(), p->ciphertext.begin(), p->ciphertext.end());
  return out;
}

class RotationTest : public kmsd::testing::TokenSandbox,
                     public ::testing::WithParamInterface<WrapMechanism> {
 protected:
  void SetUp() override {
    TokenSandbox::SetUp();
    TokenOptions o;
    o.module_path = kSoftHsmModule;
    o.token_uri = token().uri();
    o.pool_size = 2;
    o.wrap = GetParam();
    auto t = Token::open(o);
    ASSERT_TRUE(t.ok()) << t.error().message;
    t_ = std::move(t).value();
    ASSERT_TRUE(t_->login(SecretBytes::from_string(kUserPin)).ok());
    ASSERT_TRUE(t_->generate_master_key(1).ok());
  }
  void TearDown() override {
    t_.reset();
    TokenSandbox::TearDown();
  }
  bool opens(const Bytes& blob, std::string_view aad, std::string_view expected = "") {
    auto r = t_->open(blob, bytes(aad));
    if (!r.ok()) {
      EXPECT_EQ(r.error().code, ErrorCode::kCrypto);
      EXPECT_EQ(r.error().message, envelope::kOpenFailed);
      return false;
    }
    if (!expected.empty()) {
      EXPECT_EQ(std::string(r->view()), expected);
    }
    return true;
  }
  std::unique_ptr<Token> t_;
};

std::string mechanism_name(const ::testing::TestParamInfo<WrapMechanism>& info) {
  std::string s = to_string(info.param);
  std::erase(s, '-');
  return s;
}

INSTANTIATE_TEST_SUITE_P(Mechanisms, RotationTest,
                         ::testing::Values(WrapMechanism::kAesKeyWrapPad, WrapMechanism::kAesGcm,
                                           WrapMechanism::kAesCbcPadHmac),
                         mechanism_name);

TEST_P(RotationTest, SealWritesFormat2AndRewrapKeepsThePayload) {
  auto blob = t_->seal(bytes("escrowed key"), bytes("record-7"));
  ASSERT_TRUE(blob.ok()) << blob.error().message;
  EXPECT_EQ((*blob)[0], 2);
  EXPECT_EQ(master_of(*blob), 1u);
  ASSERT_TRUE(t_->generate_master_key(2).ok());
  auto moved = t_->rewrap(*blob, 2);
  ASSERT_TRUE(moved.ok()) << moved.error().message;
  EXPECT_EQ((*moved)[0], 2);
  EXPECT_EQ((*moved)[1], static_cast<std::uint8_t>(GetParam()));
  EXPECT_EQ(master_of(*moved), 2u);
  // Only the protected data key changed: nonce, ciphertext and tag are the same bytes.
  EXPECT_EQ(payload_of(*moved), payload_of(*blob));
  auto p_old = envelope::parse(*blob);
  auto p_new = envelope::parse(*moved);
  ASSERT_TRUE(p_old && p_new);
  EXPECT_FALSE(std::equal(p_old->wrapped.begin(), p_old->wrapped.end(), p_new->wrapped.begin(),
                          p_new->wrapped.end()));
  // Both open while both master keys are on the token (reads work throughout a rotation).
  EXPECT_TRUE(opens(*blob, "record-7", "escrowed key"));
  EXPECT_TRUE(opens(*moved, "record-7", "escrowed key"));
  EXPECT_FALSE(opens(*moved, "record-8"));
  // Re-wrapping again under the same version changes nothing.
  auto again = t_->rewrap(*moved, 2);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, *moved);
  // Retiring v1: the moved record still opens, the old one no longer does.
  auto destroyed = t_->destroy_master_key(1);
  ASSERT_TRUE(destroyed.ok()) << destroyed.error().message;
  EXPECT_EQ(*destroyed, GetParam() == WrapMechanism::kAesCbcPadHmac ? 2u : 1u);
  EXPECT_EQ(t_->master_key_versions().value(), std::vector<std::uint32_t>{2});
  EXPECT_TRUE(opens(*moved, "record-7", "escrowed key"));
  EXPECT_FALSE(opens(*blob, "record-7"));
  // And a record under the gone key cannot be re-wrapped either.
  auto lost = t_->rewrap(*blob, 2);
  ASSERT_FALSE(lost.ok());
  EXPECT_EQ(lost.error().code, ErrorCode::kCrypto);
}

TEST_P(RotationTest, TamperedRewrappedRecordsFailToOpen) {
  auto a = t_->seal(bytes("key A"), bytes("aad-a"));
  auto b = t_->seal(bytes("key B"), bytes("aad-b"));
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE(t_->generate_master_key(2).ok());
  auto a2 = t_->rewrap(*a, 2);
  auto b2 = t_->rewrap(*b, 2);
  ASSERT_TRUE(a2.ok() && b2.ok());
  // The master-version field set back to 1 (whose key is still there): the data key does not
  // unwrap under v1.
  Bytes changed = *a2;
  changed[5] = 1;
  EXPECT_FALSE(opens(changed, "aad-a"));
  // The protected data key of another record (same master key, same length) swapped in.
  auto pa = envelope::parse(*a2);
  auto pb = envelope::parse(*b2);
  ASSERT_TRUE(pa && pb);
  ASSERT_EQ(pa->wrapped.size(), pb->wrapped.size());
  Bytes swapped = *a2;
  std::copy(pb->wrapped.begin(), pb->wrapped.end(),
            swapped.begin() + static_cast<std::ptrdiff_t>(envelope::kFixedHeaderLen));
  EXPECT_FALSE(opens(swapped, "aad-a"));
  EXPECT_FALSE(opens(swapped, "aad-b"));
  // Wrong AAD, format byte flipped to 1, another mechanism byte, a flipped payload bit.
  EXPECT_FALSE(opens(*a2, "aad-b"));
  Bytes format1 = *a2;
  format1[0] = 1;
  EXPECT_FALSE(opens(format1, "aad-a"));
  Bytes mech = *a2;
  mech[1] = static_cast<std::uint8_t>(mech[1] % 3 + 1);
  EXPECT_FALSE(opens(mech, "aad-a"));
  Bytes flipped = *a2;
  flipped.back() ^= 0x01;
  EXPECT_FALSE(opens(flipped, "aad-a"));
  EXPECT_TRUE(opens(*a2, "aad-a", "key A"));
  // A tampered blob is not re-wrapped into something that opens: its data key does not unwrap.
  auto rewrapped_tampered = t_->rewrap(changed, 2);
  if (rewrapped_tampered.ok()) {
    EXPECT_FALSE(opens(*rewrapped_tampered, "aad-a"));
  }
}

TEST_P(RotationTest, Format1RecordsStillOpenAndAreResealedNotRewrapped) {
  auto old = t_->seal_format1_for_test(bytes("old key"), bytes("old-aad"), 1);
  ASSERT_TRUE(old.ok()) << old.error().message;
  EXPECT_EQ((*old)[0], 1);
  EXPECT_TRUE(opens(*old, "old-aad", "old key"));
  EXPECT_FALSE(opens(*old, "other-aad"));
  // Format 1 binds the master version into the payload: the header cannot be moved alone.
  Bytes changed = *old;
  changed[5] = 2;
  EXPECT_FALSE(opens(changed, "old-aad"));
  ASSERT_TRUE(t_->generate_master_key(2).ok());
  auto r = t_->rewrap(*old, 2);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kFailedPrecondition);
  // What rotation does with it instead: open once, seal as format 2 under the new version.
  auto pt = t_->open(*old, bytes("old-aad"));
  ASSERT_TRUE(pt.ok());
  auto resealed = t_->seal(pt->span(), bytes("old-aad"), 2);
  ASSERT_TRUE(resealed.ok());
  EXPECT_EQ((*resealed)[0], 2);
  EXPECT_EQ(master_of(*resealed), 2u);
  ASSERT_TRUE(t_->destroy_master_key(1).ok());
  EXPECT_TRUE(opens(*resealed, "old-aad", "old key"));
}

TEST_P(RotationTest, DestroyRefusesTheNewestAndUnknownVersions) {
  auto newest = t_->destroy_master_key(1);
  ASSERT_FALSE(newest.ok());
  EXPECT_EQ(newest.error().code, ErrorCode::kFailedPrecondition);
  EXPECT_NE(newest.error().message.find("newest"), std::string::npos);
  auto unknown = t_->destroy_master_key(7);
  ASSERT_FALSE(unknown.ok());
  EXPECT_EQ(unknown.error().code, ErrorCode::kNotFound);
  auto blob = t_->seal(bytes("x"), bytes("y"));
  ASSERT_TRUE(blob.ok());
  auto missing = t_->rewrap(*blob, 3);
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.error().code, ErrorCode::kNotFound);
  EXPECT_EQ(t_->master_key_versions().value(), std::vector<std::uint32_t>{1});
}

// destroy_master_key and destroy_key_pair share one object walk (by class and label): each
// destroys exactly its own objects and leaves the other kind on the token.
TEST_P(RotationTest, RetiringAMasterKeyAndDestroyingAKeyPairLeaveTheOtherObjects) {
  ASSERT_TRUE(t_->generate_master_key(2).ok());
  auto blob = t_->seal(bytes("kept"), bytes("aad"), 2);
  ASSERT_TRUE(blob.ok());
  ASSERT_TRUE(t_->generate_decryption_key("custody", KeyType::kRsa2048).ok());

  auto pair = t_->destroy_key_pair("custody");
  ASSERT_TRUE(pair.ok()) << pair.error().message;
  EXPECT_EQ(*pair, 2u);  // the private and the public half
  EXPECT_EQ(t_->master_key_versions().value(), (std::vector<std::uint32_t>{1, 2}));
  EXPECT_TRUE(opens(*blob, "aad", "kept"));
  auto none = t_->destroy_key_pair("custody");
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(*none, 0u);
  // Gone indeed: the label is free again.
  ASSERT_TRUE(t_->generate_decryption_key("custody", KeyType::kRsa2048).ok());

  auto master = t_->destroy_master_key(1);
  ASSERT_TRUE(master.ok()) << master.error().message;
  EXPECT_EQ(*master, GetParam() == WrapMechanism::kAesCbcPadHmac ? 2u : 1u);
  EXPECT_EQ(t_->master_key_versions().value(), std::vector<std::uint32_t>{2});
  EXPECT_TRUE(opens(*blob, "aad", "kept"));
  auto taken = t_->generate_decryption_key("custody", KeyType::kRsa2048);
  ASSERT_FALSE(taken.ok());
  EXPECT_EQ(taken.error().code, ErrorCode::kAlreadyExists);
  auto last = t_->destroy_key_pair("custody");
  ASSERT_TRUE(last.ok());
  EXPECT_EQ(*last, 2u);
}

}  // namespace
}  // namespace kmsd::hsm

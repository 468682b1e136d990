// RFC 7512 token URI parsing and matching (no token needed).
#include "hsm/uri.hpp"

#include <gtest/gtest.h>

namespace kmsd::hsm {
namespace {

TEST(TokenUriTest, ParsesTokenSerialManufacturerAndModel) {
  auto u = TokenUri::parse(
      "pkcs11:token=kmsd;serial=0123abcd;manufacturer=SoftHSM%20project;"
      "model=SoftHSM%20v2");
  ASSERT_TRUE(u.ok()) << u.error().message;
  EXPECT_EQ(u->token, "kmsd");
  EXPECT_EQ(u->serial, "0123abcd");
  EXPECT_EQ(u->manufacturer, "SoftHSM project");
  EXPECT_EQ(u->model, "SoftHSM v2");
}

TEST(TokenUriTest, PercentDecodesReservedCharacters) {
  auto u = TokenUri::parse("pkcs11:token=a%3Bb%3dc%25");
  ASSERT_TRUE(u.ok()) << u.error().message;
  EXPECT_EQ(u->token, "a;b=c%");
}

TEST(TokenUriTest, IgnoresQueryAndLibraryAttributes) {
  auto u = TokenUri::parse("pkcs11:token=kmsd;library-description=x?pin-source=file:/p");
  ASSERT_TRUE(u.ok()) << u.error().message;
  EXPECT_EQ(u->token, "kmsd");
}

TEST(TokenUriTest, RejectsBrokenEscapesAndUnknownAttributes) {
  for (const char* bad :
       {"pkcs11:token=%4", "pkcs11:token=%", "pkcs11:token=%g1", "pkcs11:frobnicate=1",
        "pkcs11:token", "PKCS11:token=x", "pkcs11:slot-id=abc", "pkcs11:?pin-value=1234"}) {
    auto u = TokenUri::parse(bad);
    ASSERT_FALSE(u.ok()) << bad;
    EXPECT_EQ(u.error().code, ErrorCode::kInvalidArgument);
  }
}

TEST(TokenUriTest, MatchesEveryGivenAttribute) {
  auto u = TokenUri::parse("pkcs11:token=kmsd;serial=42");
  ASSERT_TRUE(u.ok());
  SlotInfo s;
  s.token_label = "kmsd";
  s.token_serial = "42";
  EXPECT_TRUE(u->matches(s));
  s.token_serial = "43";
  EXPECT_FALSE(u->matches(s));
}

}  // namespace
}  // namespace kmsd::hsm

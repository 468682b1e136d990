// Enrollment tokens against a throw-away SoftHSM2 token with master key v1: the typable
// format, tolerant reading, single use, expiry, attempt limits and binding to the user.
#include "daemon/lifecycle/enrollment_token.hpp"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cstring>

#include "tests/support/sandbox.hpp"

namespace kmsd::lifecycle {
namespace {

using std::chrono::sys_seconds;
using ::testing::HasSubstr;
using ::testing::Not;
using namespace std::chrono_literals;

constexpr sys_seconds kNow{std::chrono::seconds(1'700'000'000)};  // 2023-11-14T22:13:20Z
constexpr const char* kAlice = "uid=alice,ou=people";
constexpr const char* kBob = "uid=bob,ou=people";

SecretBytes typed(std::string_view s) {
  return SecretBytes::from_string(s);
}
std::string text_of(const SecretBytes& s) {
  return std::string(s.view());
}

// ---- the text format, without a token ----

TEST(TokenText, EncodesFifteenBytesAsCrockfordGroups) {
  std::vector<std::uint8_t> value;
  for (std::uint8_t i = 1; i <= 15; ++i) value.push_back(i);
  EXPECT_EQ(text_of(encode_token(value)), "0410-6105-0R3G-G28A-1C60-T3GF");
  EXPECT_EQ(text_of(encode_token(std::vector<std::uint8_t>(15, 0))),
            "0000-0000-0000-0000-0000-0000");
  EXPECT_EQ(text_of(encode_token(std::vector<std::uint8_t>(15, 0xff))),
            "ZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZZ");
}

TEST(TokenText, ReadsLowerCaseLookalikesSpacesAndMissingHyphens) {
  auto canonical = decode_token(typed("0410-6105-0R3G-G28A-1C60-T3GF"));
  ASSERT_TRUE(canonical.ok()) << canonical.error().message;
  for (const char* variant :
       {"0410-6105-0r3g-g28a-1c60-t3gf", "o4lO-6IO5-oR3G-G28A-ic6O-T3GF",
        "0410 6105 0R3G G28A 1C60 T3GF", "04106105 0R3GG28A1C60T3GF",
        " 0410-6105-0R3G-G28A-1C60-T3GF ", "0-4-1-0-6105-0R3GG28A-1C60-T3GF"}) {
    auto v = decode_token(typed(variant));
    ASSERT_TRUE(v.ok()) << variant << ": " << v.error().message;
    EXPECT_TRUE(constant_time_equal(v->span(), canonical->span())) << variant;
  }
}

TEST(TokenText, NamesWhatIsWrongWithAMalformedToken) {
  auto short_one = decode_token(typed("0410-6105-0R3G-G28A-1C60-T3G"));
  ASSERT_FALSE(short_one.ok());
  EXPECT_EQ(short_one.error().code, ErrorCode::kInvalidArgument);
  EXPECT_THAT(short_one.error().message, HasSubstr("expected 24 characters, got 23"));

  auto long_one = decode_token(typed("0410-6105-0R3G-G28A-1C60-T3GF-0"));
  ASSERT_FALSE(long_one.ok());
  EXPECT_THAT(long_one.error().message, HasSubstr("expected 24 characters, got 25"));

  auto with_u = decode_token(typed("0410-6105-0R3G-G28A-1C60-T3GU"));
  ASSERT_FALSE(with_u.ok());
  EXPECT_THAT(with_u.error().message, HasSubstr("character 29 is 'U'"));

  auto with_star = decode_token(typed("0410-6105-0R3G-G28A-1C60*T3GF"));
  ASSERT_FALSE(with_star.ok());
  EXPECT_THAT(with_star.error().message, HasSubstr("character 25 is '*'"));

  auto empty = decode_token(typed(""));
  ASSERT_FALSE(empty.ok());
  EXPECT_THAT(empty.error().message, HasSubstr("got 0"));
}

// ---- issued and checked on a token ----

class EnrollmentTokenTest : public kmsd::testing::TokenSandbox {
 protected:
  void SetUp() override {
    TokenSandbox::SetUp();
    hsm::TokenOptions o;
    o.module_path = kmsd::testing::kSoftHsmModule;
    o.token_uri = token().uri();
    o.pool_size = 2;
    auto t = hsm::Token::open(o);
    ASSERT_TRUE(t.ok()) << t.error().message;
    token_ = std::move(t).value();
    auto st = token_->login(SecretBytes::from_string(kmsd::testing::kUserPin));
    ASSERT_TRUE(st.ok()) << st.error().message;
    st = token_->generate_master_key(1);
    ASSERT_TRUE(st.ok()) << st.error().message;
    tokens_ = std::make_unique<EnrollmentTokens>(*token_);
  }
  void TearDown() override {
    tokens_.reset();
    token_.reset();
    TokenSandbox::TearDown();
  }

  IssuedToken issue(std::string_view user = kAlice, std::chrono::seconds ttl = kDefaultTokenTtl) {
    auto r = tokens_->issue(user, kNow, ttl);
    if (!r.ok()) {
      ADD_FAILURE() << "issue: " << r.error().message;
      return {};
    }
    return std::move(r).value();
  }
  TokenCheck check(const SecretBytes& presented, const SealedToken& sealed,
                   std::string_view user = kAlice, sys_seconds now = kNow + 1h,
                   std::uint32_t failed = 0, bool used = false) {
    auto r = tokens_->check(presented, sealed, user, now, failed, kDefaultMaxAttempts, used);
    if (!r.ok()) {
      ADD_FAILURE() << "check: " << r.error().message;
      return {};
    }
    return std::move(r).value();
  }

  std::unique_ptr<hsm::Token> token_;
  std::unique_ptr<EnrollmentTokens> tokens_;
};

TEST_F(EnrollmentTokenTest, IssuedTokenIsTwentyFourCrockfordCharactersInSixGroups) {
  IssuedToken t = issue();
  std::string s = text_of(t.text);
  ASSERT_EQ(s.size(), 29u);
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (i % 5 == 4) {
      EXPECT_EQ(s[i], '-') << "position " << i;
    } else {
      EXPECT_NE(std::strchr(kTokenAlphabet, s[i]), nullptr) << "position " << i;
      EXPECT_NE(s[i], '\0');
    }
  }
  EXPECT_EQ(std::count(s.begin(), s.end(), '-'), 5);
  EXPECT_EQ(t.sealed.expires_at, kNow + std::chrono::days(14));
  ASSERT_FALSE(t.sealed.record.empty());
  EXPECT_EQ(t.sealed.record[0], kSealedTokenVersion);
}

TEST_F(EnrollmentTokenTest, TwoIssuedTokensDiffer) {
  IssuedToken a = issue();
  IssuedToken b = issue();
  EXPECT_FALSE(constant_time_equal(a.text.span(), b.text.span()));
  EXPECT_NE(a.sealed.record, b.sealed.record);
}

TEST_F(EnrollmentTokenTest, IssuedTokenIsAccepted) {
  IssuedToken t = issue();
  TokenCheck c = check(t.text, t.sealed);
  EXPECT_EQ(c.verdict, Verdict::kAccepted) << c.message;
  EXPECT_FALSE(c.counts_as_failed_attempt());
}

TEST_F(EnrollmentTokenTest, TokenTypedLooselyIsAccepted) {
  IssuedToken t = issue();
  std::string s = text_of(t.text);
  // Lower case, spaces for hyphens, and every 0 and 1 typed as a look-alike letter.
  std::string loose;
  for (char c : s) {
    if (c == '-') {
      loose += ' ';
    } else if (c == '0') {
      loose += 'o';
    } else if (c == '1') {
      loose += (loose.size() % 2 == 0) ? 'I' : 'l';
    } else {
      loose += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    }
  }
  TokenCheck c = check(typed(loose), t.sealed);
  EXPECT_EQ(c.verdict, Verdict::kAccepted) << c.message;
}

TEST_F(EnrollmentTokenTest, MalformedTokenIsNotCountedAsAnAttempt) {
  IssuedToken t = issue();
  std::string s = text_of(t.text);
  for (const std::string& bad : {s.substr(0, s.size() - 1), s + "7", s.substr(0, 28) + "U",
                                 s.substr(0, 28) + "!", std::string()}) {
    TokenCheck c = check(typed(bad), t.sealed, kAlice, kNow + 1h, 2);
    EXPECT_EQ(c.verdict, Verdict::kMalformed) << c.message;
    EXPECT_FALSE(c.counts_as_failed_attempt());
    EXPECT_EQ(c.attempts_remaining, 3u);
    EXPECT_THAT(c.message, HasSubstr("not counted"));
  }
  TokenCheck short_one = check(typed(s.substr(0, s.size() - 1)), t.sealed);
  EXPECT_THAT(short_one.message, HasSubstr("expected 24 characters, got 23"));
}

TEST_F(EnrollmentTokenTest, WrongTokenCountsAndSaysHowManyAttemptsRemain) {
  IssuedToken t = issue();
  IssuedToken other = issue();
  TokenCheck first = check(other.text, t.sealed);
  EXPECT_EQ(first.verdict, Verdict::kMismatch);
  EXPECT_TRUE(first.counts_as_failed_attempt());
  EXPECT_EQ(first.attempts_remaining, 4u);
  EXPECT_THAT(first.message, HasSubstr("4 attempts remain"));

  TokenCheck fourth = check(other.text, t.sealed, kAlice, kNow + 1h, 3);
  EXPECT_EQ(fourth.attempts_remaining, 1u);
  EXPECT_THAT(fourth.message, HasSubstr("1 attempt remains"));
}

TEST_F(EnrollmentTokenTest, TokenLocksAfterMaxFailedAttemptsEvenForTheRightToken) {
  IssuedToken t = issue();
  IssuedToken other = issue();
  std::uint32_t failed = 0;
  for (int i = 0; i < 5; ++i) {
    TokenCheck c = check(other.text, t.sealed, kAlice, kNow + 1h, failed);
    ASSERT_EQ(c.verdict, Verdict::kMismatch) << "attempt " << i + 1;
    if (c.counts_as_failed_attempt()) ++failed;
    if (i == 4) {
      EXPECT_THAT(c.message, HasSubstr("now locked"));
    }
  }
  EXPECT_EQ(failed, 5u);
  TokenCheck right = check(t.text, t.sealed, kAlice, kNow + 1h, failed);
  EXPECT_EQ(right.verdict, Verdict::kLocked);
  EXPECT_EQ(right.attempts_remaining, 0u);
  EXPECT_THAT(right.message, HasSubstr("administrator must reissue"));
  EXPECT_FALSE(right.counts_as_failed_attempt());
}

TEST_F(EnrollmentTokenTest, ExpiredTokenIsRefusedAndSaysWhenItExpired) {
  IssuedToken t = issue(kAlice, 1h);
  EXPECT_EQ(check(t.text, t.sealed, kAlice, kNow + 1h - 1s).verdict, Verdict::kAccepted);
  TokenCheck c = check(t.text, t.sealed, kAlice, kNow + 1h);
  EXPECT_EQ(c.verdict, Verdict::kExpired);
  EXPECT_THAT(c.message, HasSubstr("2023-11-14T23:13:20Z"));
  EXPECT_FALSE(c.counts_as_failed_attempt());
}

TEST_F(EnrollmentTokenTest, UsedTokenIsRefused) {
  IssuedToken t = issue();
  TokenCheck c = check(t.text, t.sealed, kAlice, kNow + 1h, 0, /*used=*/true);
  EXPECT_EQ(c.verdict, Verdict::kUsed);
  EXPECT_FALSE(c.counts_as_failed_attempt());
}

TEST_F(EnrollmentTokenTest, RecordSealedForOneUserFailsForAnother) {
  IssuedToken t = issue(kAlice);
  TokenCheck c = check(t.text, t.sealed, kBob);
  EXPECT_EQ(c.verdict, Verdict::kSealedRecordInvalid);
  EXPECT_FALSE(c.counts_as_failed_attempt());
}

TEST_F(EnrollmentTokenTest, RecordWithALaterExpiryOrAFlippedBitIsInvalid) {
  IssuedToken t = issue(kAlice, 1h);
  SealedToken extended{t.sealed.record, t.sealed.expires_at};
  extended.record[8] ^= 0x10;  // low byte of expires_at: about 4 minutes later
  EXPECT_EQ(check(t.text, extended).verdict, Verdict::kSealedRecordInvalid);

  SealedToken flipped{t.sealed.record, t.sealed.expires_at};
  flipped.record.back() ^= 0x01;
  EXPECT_EQ(check(t.text, flipped).verdict, Verdict::kSealedRecordInvalid);

  SealedToken versioned{t.sealed.record, t.sealed.expires_at};
  versioned.record[0] = 2;
  EXPECT_EQ(check(t.text, versioned).verdict, Verdict::kSealedRecordInvalid);

  SealedToken truncated{{t.sealed.record.begin(), t.sealed.record.begin() + 9},
                        t.sealed.expires_at};
  EXPECT_EQ(check(t.text, truncated).verdict, Verdict::kSealedRecordInvalid);
}

TEST_F(EnrollmentTokenTest, ExpiryOutsideTheRecordIsNotTrusted) {
  IssuedToken t = issue(kAlice, 1h);
  SealedToken moved{t.sealed.record, t.sealed.expires_at + std::chrono::days(365)};
  EXPECT_EQ(check(t.text, moved, kAlice, kNow + 2h).verdict, Verdict::kExpired);
}

// The comparison is constant_time_equal over the whole value; behaviourally: a token that
// differs only in its first or only in its last character is refused just the same.
TEST_F(EnrollmentTokenTest, TokenDifferingInOneCharacterAnywhereIsAMismatch) {
  IssuedToken t = issue();
  std::string s = text_of(t.text);
  auto change = [](char c) { return c == 'A' ? 'B' : 'A'; };
  std::string first = s;
  first[0] = change(first[0]);
  std::string last = s;
  last.back() = change(last.back());
  for (const std::string& wrong : {first, last}) {
    TokenCheck c = check(typed(wrong), t.sealed);
    EXPECT_EQ(c.verdict, Verdict::kMismatch);
    EXPECT_EQ(c.attempts_remaining, 4u);
  }
}

TEST_F(EnrollmentTokenTest, NoVerdictMessageContainsTheToken) {
  IssuedToken t = issue(kAlice, 1h);
  IssuedToken other = issue();
  std::string shown = text_of(t.text);
  std::string bare = shown;
  std::erase(bare, '-');
  std::vector<TokenCheck> checks = {
      check(t.text, t.sealed),
      check(other.text, t.sealed),
      check(t.text, t.sealed, kAlice, kNow + 2h),
      check(t.text, t.sealed, kAlice, kNow + 1s, 5),
      check(t.text, t.sealed, kAlice, kNow + 1s, 0, true),
      check(typed(shown + "Q"), t.sealed),
      check(t.text, t.sealed, kBob),
  };
  for (const TokenCheck& c : checks) {
    EXPECT_THAT(c.message, Not(HasSubstr(shown.substr(0, 9)))) << to_string(c.verdict);
    EXPECT_THAT(c.message, Not(HasSubstr(bare.substr(0, 8)))) << to_string(c.verdict);
  }
}

TEST_F(EnrollmentTokenTest, IssueRefusesAnEmptyUserAndANonPositiveLifetime) {
  auto no_user = tokens_->issue("", kNow);
  ASSERT_FALSE(no_user.ok());
  EXPECT_EQ(no_user.error().code, ErrorCode::kInvalidArgument);
  auto no_ttl = tokens_->issue(kAlice, kNow, 0s);
  ASSERT_FALSE(no_ttl.ok());
  EXPECT_EQ(no_ttl.error().code, ErrorCode::kInvalidArgument);
  IssuedToken t = issue();
  auto zero_attempts = tokens_->check(t.text, t.sealed, kAlice, kNow, 0, 0, false);
  ASSERT_FALSE(zero_attempts.ok());
  EXPECT_EQ(zero_attempts.error().code, ErrorCode::kInvalidArgument);
}

TEST(VerdictNames, AreStableWords) {
  EXPECT_STREQ(to_string(Verdict::kAccepted), "accepted");
  EXPECT_STREQ(to_string(Verdict::kMismatch), "mismatch");
  EXPECT_STREQ(to_string(Verdict::kExpired), "expired");
  EXPECT_STREQ(to_string(Verdict::kLocked), "locked");
  EXPECT_STREQ(to_string(Verdict::kUsed), "used");
  EXPECT_STREQ(to_string(Verdict::kMalformed), "malformed");
  EXPECT_STREQ(to_string(Verdict::kSealedRecordInvalid), "sealed-record-invalid");
}

TEST_F(EnrollmentTokenTest, RevealGivesBackTheIssuedTextOnlyForItsUser) {
  IssuedToken issued = issue(kAlice);
  auto again = tokens_->reveal(issued.sealed, kAlice);
  ASSERT_TRUE(again.ok()) << again.error().message;
  EXPECT_EQ(again->view(), issued.text.view());
  auto other = tokens_->reveal(issued.sealed, "bob");
  ASSERT_FALSE(other.ok());
  EXPECT_EQ(other.error().code, ErrorCode::kCrypto);
}

}  // namespace
}  // namespace kmsd::lifecycle

// Shamir shares of the startup secret (libgfshare) and the collector that holds presented
// shares: any k rebuild the secret, fewer never do, and wrong, duplicate, foreign, damaged or
// expired shares are refused with a reason.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include "daemon/startup/quorum.hpp"

namespace kmsd::startup {
namespace {

using ::testing::HasSubstr;

const SecretBytes kSecret = SecretBytes::from_string("a long random startup secret 4f9c");

std::vector<Share> split(const SecretBytes& secret, unsigned k, unsigned n) {
  auto r = split_secret(secret, k, n);
  EXPECT_TRUE(r.ok());
  return std::move(r).value();
}

// A share through its blob format and back, as a card would return it.
Share reparse(const Share& s) {
  return parse_share(encode_share(s).span()).value();
}

std::vector<SecretBytes> blobs_of(const std::vector<Share>& shares) {
  std::vector<SecretBytes> out;
  for (const auto& s : shares) out.push_back(encode_share(s));
  return out;
}

TEST(QuorumSplit, AnyTwoOfThreeRebuildTheSecret) {
  auto shares = split_secret(kSecret, 2, 3);
  ASSERT_TRUE(shares.ok()) << shares.error().message;
  ASSERT_EQ(shares->size(), 3u);
  for (auto [a, b] : {std::pair{0, 1}, std::pair{0, 2}, std::pair{1, 2}, std::pair{2, 0}}) {
    std::vector<Share> pair;
    pair.push_back(reparse((*shares)[a]));
    pair.push_back(reparse((*shares)[b]));
    auto secret = combine_shares(pair);
    ASSERT_TRUE(secret.ok()) << secret.error().message;
    EXPECT_TRUE(constant_time_equal(secret->span(), kSecret.span())) << a << "," << b;
  }
}

TEST(QuorumSplit, EveryThreeOfFiveRebuildAndNoTwoDo) {
  auto shares = split_secret(kSecret, 3, 5);
  ASSERT_TRUE(shares.ok());
  int rebuilt = 0;
  for (int a = 0; a < 5; ++a)
    for (int b = a + 1; b < 5; ++b) {
      std::vector<Share> two;
      two.push_back(reparse((*shares)[a]));
      two.push_back(reparse((*shares)[b]));
      auto r = combine_shares(two);
      ASSERT_FALSE(r.ok());
      EXPECT_EQ(r.error().code, ErrorCode::kFailedPrecondition);
      for (int c = b + 1; c < 5; ++c) {
        std::vector<Share> three;
        for (int i : {a, b, c}) three.push_back(reparse((*shares)[i]));
        auto s = combine_shares(three);
        ASSERT_TRUE(s.ok());
        EXPECT_TRUE(constant_time_equal(s->span(), kSecret.span()));
        ++rebuilt;
      }
    }
  EXPECT_EQ(rebuilt, 10);
}

TEST(QuorumSplit, SharesAreTaggedAndDifferEachSplit) {
  auto a = split_secret(kSecret, 2, 3);
  auto b = split_secret(kSecret, 2, 3);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_NE((*a)[0].quorum_id, (*b)[0].quorum_id);
  EXPECT_FALSE(constant_time_equal((*a)[0].value.span(), (*b)[0].value.span()));
  for (unsigned i = 0; i < 3; ++i) {
    auto p = parse_share(encode_share((*a)[i]).span());
    ASSERT_TRUE(p.ok());
    EXPECT_EQ(p->k, 2u);
    EXPECT_EQ(p->n, 3u);
    EXPECT_EQ(p->index, i + 1);
    EXPECT_EQ(p->quorum_id, (*a)[0].quorum_id);
    // No share is the secret, and none contains it.
    std::string blob(encode_share((*a)[i]).view());
    EXPECT_EQ(blob.find(std::string(kSecret.view())), std::string::npos);
  }
}

TEST(QuorumSplit, ImpossibleQuorumsAreRefused) {
  EXPECT_EQ(split_secret(kSecret, 1, 3).error().code, ErrorCode::kInvalidArgument);
  EXPECT_EQ(split_secret(kSecret, 4, 3).error().code, ErrorCode::kInvalidArgument);
  EXPECT_EQ(split_secret(kSecret, 2, 256).error().code, ErrorCode::kInvalidArgument);
  EXPECT_EQ(split_secret(SecretBytes(), 2, 3).error().code, ErrorCode::kInvalidArgument);
}

TEST(QuorumShare, APlainSecretOrDamagedShareIsNotAShare) {
  auto plain = parse_share(kSecret.span());
  ASSERT_FALSE(plain.ok());
  EXPECT_THAT(plain.error().message, HasSubstr("plain startup secret"));

  auto shares = split_secret(kSecret, 2, 3);
  auto blob = encode_share((*shares)[1]);
  blob.data()[blob.size() - 1] ^= 0x01;  // one bit of the share flipped
  auto damaged = parse_share(blob.span());
  ASSERT_FALSE(damaged.ok());
  EXPECT_THAT(damaged.error().message, HasSubstr("damaged or forged"));

  auto truncated = encode_share((*shares)[1]);
  truncated.resize(truncated.size() - 1);
  EXPECT_THAT(parse_share(truncated.span()).error().message, HasSubstr("truncated"));
}

TEST(ShareCollectorTest, OneShareIsNotEnoughAndSaysOneOfTwo) {
  auto blobs = blobs_of(split(kSecret, 2, 3));
  ShareCollector c(std::chrono::minutes(10));
  auto p = c.add(blobs[1].span());
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->held(), 1u);
  EXPECT_FALSE(p->complete());
  EXPECT_THAT(p->text(), HasSubstr("1 of 2 shares"));
  EXPECT_EQ(c.take_secret().error().code, ErrorCode::kFailedPrecondition);
  EXPECT_TRUE(c.progress().has_value());  // still held after asking too early
  auto q = c.add(blobs[2].span());
  ASSERT_TRUE(q.ok());
  EXPECT_TRUE(q->complete());
  EXPECT_EQ(q->indexes, (std::vector<unsigned>{2, 3}));
  auto s = c.take_secret();
  ASSERT_TRUE(s.ok());
  EXPECT_TRUE(constant_time_equal(s->span(), kSecret.span()));
  EXPECT_FALSE(c.progress().has_value());  // nothing kept once rebuilt
}

TEST(ShareCollectorTest, DuplicateAndForeignSharesAreRefusedAndChangeNothing) {
  auto ours = blobs_of(split(kSecret, 2, 3));
  auto theirs = blobs_of(split(kSecret, 2, 3));
  ShareCollector c(std::chrono::minutes(10));
  ASSERT_TRUE(c.add(ours[0].span()).ok());

  auto dup = c.add(ours[0].span());
  ASSERT_FALSE(dup.ok());
  EXPECT_EQ(dup.error().code, ErrorCode::kAlreadyExists);
  EXPECT_THAT(dup.error().message, HasSubstr("already presented"));

  auto foreign = c.add(theirs[1].span());
  ASSERT_FALSE(foreign.ok());
  EXPECT_EQ(foreign.error().code, ErrorCode::kInvalidArgument);
  EXPECT_THAT(foreign.error().message, HasSubstr("belong to quorum"));

  EXPECT_EQ(c.progress()->held(), 1u);
  ASSERT_TRUE(c.add(ours[2].span()).ok());
  auto s = c.take_secret();
  ASSERT_TRUE(s.ok());
  EXPECT_TRUE(constant_time_equal(s->span(), kSecret.span()));
}

TEST(ShareCollectorTest, AForgedShareWithTheRightQuorumIdIsRefused) {
  auto ours = split(kSecret, 2, 3);
  auto other = split(SecretBytes::from_string("another secret entirely, 32 bytes"), 2, 3);
  // A forger copies our quorum id onto a share of their own split (with its own digests).
  Share forged = std::move(other[1]);
  forged.quorum_id = ours[0].quorum_id;
  ShareCollector c(std::chrono::minutes(10));
  ASSERT_TRUE(c.add(encode_share(ours[0]).span()).ok());
  auto r = c.add(encode_share(forged).span());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kInvalidArgument);
  EXPECT_EQ(c.progress()->held(), 1u);
}

TEST(ShareCollectorTest, PendingSharesExpireAndCanBeCancelled) {
  auto blobs = blobs_of(split(kSecret, 2, 3));
  ShareCollector c(std::chrono::seconds(600));
  auto t0 = ShareCollector::Clock::now();
  ASSERT_TRUE(c.add(blobs[0].span(), t0).ok());
  EXPECT_EQ(c.progress(t0 + std::chrono::seconds(100))->expires_in, std::chrono::seconds(500));
  EXPECT_FALSE(c.expire(t0 + std::chrono::seconds(599)));
  EXPECT_TRUE(c.expire(t0 + std::chrono::seconds(600)));
  EXPECT_FALSE(c.progress().has_value());
  // An expired share does not count toward the next attempt.
  auto p = c.add(blobs[1].span(), t0 + std::chrono::seconds(601));
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->held(), 1u);
  EXPECT_TRUE(c.clear());
  EXPECT_FALSE(c.clear());
  // A share presented after the window is checked against a fresh window, not the old one.
  ASSERT_TRUE(c.add(blobs[0].span(), t0).ok());
  auto late = c.add(blobs[2].span(), t0 + std::chrono::seconds(700));
  ASSERT_TRUE(late.ok());
  EXPECT_EQ(late->held(), 1u);  // share 1 had expired before share 3 came
}

}  // namespace
}  // namespace kmsd::startup

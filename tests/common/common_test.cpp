// Small shared pieces: the clock's text form and hex round trips.
#include <gtest/gtest.h>

#include "common/clock.hpp"
#include "common/ossl.hpp"

namespace kmsd {
namespace {

TEST(ClockTest, UtcTextIsRfc3339InUtcWhateverTheTimeZone) {
  EXPECT_EQ(utc_text(std::int64_t{0}), "1970-01-01T00:00:00Z");
  EXPECT_EQ(utc_text(std::int64_t{1'700'000'000}), "2023-11-14T22:13:20Z");
  EXPECT_EQ(utc_text(std::chrono::sys_seconds(std::chrono::seconds(1'700'000'000))),
            "2023-11-14T22:13:20Z");
  EXPECT_GT(unix_now(), 1'700'000'000);
}

TEST(HexTest, FromHexUndoesHexAndRefusesAnythingElse) {
  const ossl::Bytes b = {0x00, 0x7f, 0xab, 0xff};
  EXPECT_EQ(ossl::hex(b), "007fabff");
  auto back = ossl::from_hex("007fabff");
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(*back, b);
  EXPECT_FALSE(ossl::from_hex("abc").ok());
  EXPECT_FALSE(ossl::from_hex("ZZ").ok());
  EXPECT_FALSE(ossl::from_hex("AB").ok());
}

}  // namespace
}  // namespace kmsd

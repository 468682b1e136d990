#include "common/csv.hpp"

#include <gtest/gtest.h>

namespace kmsd::csv {
namespace {

std::vector<Record> read_all(std::string_view text) {
  Reader reader(text);
  std::vector<Record> out;
  Record r;
  while (reader.next(r)) out.push_back(r);
  return out;
}

using Fields = std::vector<std::string>;

TEST(Csv, PlainRecordsWithLfAndCrlf) {
  auto recs = read_all("a,b,c\r\nd,e,f\ng,h,i");
  ASSERT_EQ(recs.size(), 3u);
  EXPECT_EQ(recs[0].fields, (Fields{"a", "b", "c"}));
  EXPECT_EQ(recs[1].fields, (Fields{"d", "e", "f"}));
  EXPECT_EQ(recs[2].fields, (Fields{"g", "h", "i"}));
  EXPECT_TRUE(recs[0].terminated);
  EXPECT_TRUE(recs[1].terminated);
  EXPECT_FALSE(recs[2].terminated);
  EXPECT_EQ(recs[2].line, 3u);
}

TEST(Csv, QuotedCommasQuotesAndLineBreaks) {
  auto recs = read_all(
      "id,name\r\n\"u1\",\"Doe, Jane\"\r\nu2,\"say "
      "\"\"hi\"\"\"\r\nu3,\"two\r\nlines\"\r\nu4,x\r\n");
  ASSERT_EQ(recs.size(), 5u);
  EXPECT_EQ(recs[1].fields, (Fields{"u1", "Doe, Jane"}));
  EXPECT_EQ(recs[2].fields, (Fields{"u2", "say \"hi\""}));
  EXPECT_EQ(recs[3].fields, (Fields{"u3", "two\r\nlines"}));
  EXPECT_EQ(recs[3].line, 4u);
  EXPECT_EQ(recs[4].fields, (Fields{"u4", "x"}));
  EXPECT_EQ(recs[4].line, 6u);  // the embedded line break counts
}

TEST(Csv, EmptyFieldsAndBlankLines) {
  auto recs = read_all("a,,\n\n\"\",b\n");
  ASSERT_EQ(recs.size(), 3u);
  EXPECT_EQ(recs[0].fields, (Fields{"a", "", ""}));
  EXPECT_TRUE(recs[1].blank());
  EXPECT_EQ(recs[2].fields, (Fields{"", "b"}));
  EXPECT_FALSE(recs[2].blank());
}

TEST(Csv, QuoteInsideUnquotedFieldSpoilsOnlyThatLine) {
  auto recs = read_all("a,b\"c,d\ne,f\n");
  ASSERT_EQ(recs.size(), 2u);
  EXPECT_TRUE(recs[0].malformed());
  EXPECT_NE(recs[0].error.find("field 2"), std::string::npos) << recs[0].error;
  EXPECT_EQ(recs[1].fields, (Fields{"e", "f"}));
  EXPECT_EQ(recs[1].line, 2u);
}

TEST(Csv, TextAfterClosingQuoteIsMalformed) {
  auto recs = read_all("\"ab\"c,d\nok,1\n");
  ASSERT_EQ(recs.size(), 2u);
  EXPECT_TRUE(recs[0].malformed());
  EXPECT_EQ(recs[1].fields, (Fields{"ok", "1"}));
}

TEST(Csv, UnterminatedQuoteLosesOnlyItsLine) {
  auto recs = read_all("x,\"Doe, Jane\nu2,b\nu3,c\n");
  ASSERT_EQ(recs.size(), 3u);
  EXPECT_TRUE(recs[0].malformed());
  EXPECT_TRUE(recs[0].open_quote);
  EXPECT_EQ(recs[0].line, 1u);
  EXPECT_EQ(recs[1].fields, (Fields{"u2", "b"}));
  EXPECT_EQ(recs[1].line, 2u);
  EXPECT_EQ(recs[2].fields, (Fields{"u3", "c"}));
}

TEST(Csv, OffsetsCoverTheRecordAndItsBreak) {
  std::string text = "ab,c\r\nd\n";
  auto recs = read_all(text);
  ASSERT_EQ(recs.size(), 2u);
  EXPECT_EQ(recs[0].begin, 0u);
  EXPECT_EQ(recs[0].end, 6u);
  EXPECT_EQ(recs[1].begin, 6u);
  EXPECT_EQ(recs[1].end, text.size());
}

TEST(Csv, WriterQuotesOnlyWhatNeedsIt) {
  EXPECT_EQ(quote("plain"), "plain");
  EXPECT_EQ(quote("Doe, Jane"), "\"Doe, Jane\"");
  EXPECT_EQ(quote("a\"b"), "\"a\"\"b\"");
  EXPECT_EQ(quote("a\nb"), "\"a\nb\"");
  EXPECT_EQ(quote(" padded"), "\" padded\"");
  EXPECT_EQ(quote(""), "");
  EXPECT_EQ(format_record({"a", "b,c", ""}), "a,\"b,c\",\r\n");
}

TEST(Csv, WhatTheWriterWritesTheReaderReadsBack) {
  const Fields tricky = {"", "Doe, Jane", "say \"hi\"", "two\r\nlines", "\"", ",", " x "};
  auto recs = read_all(format_record(tricky) + format_record({"next"}));
  ASSERT_EQ(recs.size(), 2u);
  EXPECT_EQ(recs[0].fields, tricky);
  EXPECT_EQ(recs[1].fields, (Fields{"next"}));
}

}  // namespace
}  // namespace kmsd::csv

#include "cli/bulk_file.hpp"

#include <sys/stat.h>

#include <fstream>
#include <sstream>

#include <gtest/gtest.h>

#include "tests/support/sandbox.hpp"

namespace kmsd::cli::bulk {
namespace {

std::string slurp(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void spill(const std::filesystem::path& p, std::string_view data) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << data;
}

unsigned mode_of(const std::filesystem::path& p) {
  struct stat st {};
  EXPECT_EQ(::stat(p.c_str(), &st), 0);
  return st.st_mode & 07777;
}

TEST(BulkJob, SameBytesSameJobOtherBytesOtherJob) {
  const std::string a = "id,email,display_name\r\nu1,u1@example.org,U One\r\n";
  EXPECT_EQ(job_id(a), job_id(std::string(a)));
  EXPECT_EQ(job_id(a).size(), 32u);
  EXPECT_EQ(job_id(a).find_first_not_of("0123456789abcdef"), std::string::npos);
  EXPECT_NE(job_id(a), job_id(a + "\n"));
  // SHA-256("") starts e3b0c442 98fc1c14 9afbf4c8 996fb924.
  EXPECT_EQ(job_id(""), "e3b0c44298fc1c149afbf4c8996fb924");
}

TEST(BulkInput, HeaderByNameInAnyOrderAndCase) {
  auto in = parse_input(
      "\xEF\xBB\xBF"
      "Display_Name, EMAIL ,Id,DN,department\r\n"
      "\"Doe, Jane\",jane@example.org,jane,\"CN=Jane Doe,O=Example\",sales\r\n"
      "Bob,bob@example.org,bob,,ops\r\n");
  ASSERT_TRUE(in.ok()) << in.error().message;
  ASSERT_EQ(in->entries.size(), 2u);
  ASSERT_TRUE(in->entries[0].user);
  EXPECT_EQ(in->entries[0].user->id, "jane");
  EXPECT_EQ(in->entries[0].user->display_name, "Doe, Jane");
  EXPECT_EQ(in->entries[0].user->email, "jane@example.org");
  EXPECT_EQ(in->entries[0].user->dn, "CN=Jane Doe,O=Example");
  EXPECT_EQ(in->entries[0].line, 2u);
  ASSERT_TRUE(in->entries[1].user);
  EXPECT_FALSE(in->entries[1].user->dn);
  EXPECT_EQ(in->ignored_columns, std::vector<std::string>{"department"});
}

TEST(BulkInput, AMissingHeaderIsRefusedNamingTheColumns) {
  auto in = parse_input("jane,jane@example.org,Jane\r\n");
  ASSERT_FALSE(in.ok());
  EXPECT_EQ(in.error().code, ErrorCode::kInvalidArgument);
  EXPECT_NE(in.error().message.find("missing: id, email, display_name"), std::string::npos)
      << in.error().message;
  EXPECT_FALSE(parse_input("").ok());
  EXPECT_FALSE(parse_input("id,email\nx,y\n").ok());
  EXPECT_FALSE(parse_input("id,email,display_name,id\n").ok());
}

TEST(BulkInput, BadLinesBecomeProblemsWithLineNumbersAndTheRunGoesOn) {
  auto in = parse_input(
      "id,email,display_name\n"
      "ok1,ok1@example.org,One\n"
      "short,short@example.org\n"             // line 3: missing column
      "bad\"q,x@example.org,X\n"              // line 4: quote in unquoted field
      ",noid@example.org,No Id\n"             // line 5: empty id
      "ok1,again@example.org,Again\n"         // line 6: duplicate
      "\n"                                    // line 7: blank, skipped
      ",,\n"                                  // line 8: empty, skipped
      "nomail,,No Mail\n"                     // line 9
      "ok2,ok2@example.org,\"Two, The\"\n");  // line 10
  ASSERT_TRUE(in.ok()) << in.error().message;
  const auto& e = in->entries;
  ASSERT_EQ(e.size(), 7u);
  EXPECT_TRUE(e[0].user);
  auto expect_problem = [](const Entry& x, std::size_t line, std::string_view words) {
    EXPECT_FALSE(x.user);
    EXPECT_EQ(x.line, line);
    EXPECT_TRUE(x.problem.starts_with("line " + std::to_string(line) + ": ")) << x.problem;
    EXPECT_NE(x.problem.find(words), std::string::npos) << x.problem;
  };
  expect_problem(e[1], 3, "expected 3 fields");
  EXPECT_EQ(e[1].id, "short");
  expect_problem(e[2], 4, "not valid CSV");
  expect_problem(e[3], 5, "the id is empty");
  expect_problem(e[4], 6, "appears again (first on line 2)");
  expect_problem(e[5], 9, "email of nomail is empty");
  ASSERT_TRUE(e[6].user);
  EXPECT_EQ(e[6].user->display_name, "Two, The");
}

class ResultFileTest : public ::testing::Test {
 protected:
  testing::TempDir tmp;
  std::filesystem::path out = tmp.path() / "result.csv";
};

TEST_F(ResultFileTest, NewFileIsMode0600WithJobLineAndHeader) {
  ::umask(022);
  auto f = ResultFile::open(out, "aaaa", "users.csv");
  ASSERT_TRUE(f.ok()) << f.error().message;
  EXPECT_EQ(mode_of(out), 0600u);
  ASSERT_TRUE(f->append({{"u1", "issued", "a token was issued.", "T-1", "2030-01-01T00:00:00Z"},
                         {"u2", "pending", "Doe, Jane has an unused token.", "", ""}})
                  .ok());
  EXPECT_EQ(slurp(out),
            "# kmsctl bulk-enable job aaaa input users.csv\r\n"
            "id,status,message,token,expires_at\r\n"
            "u1,issued,a token was issued.,T-1,2030-01-01T00:00:00Z\r\n"
            "u2,pending,\"Doe, Jane has an unused token.\",,\r\n");
  EXPECT_TRUE(f->written().empty());
}

TEST_F(ResultFileTest, SameJobResumesSkippingWrittenIdsAndCutsATornLine) {
  {
    auto f = ResultFile::open(out, "aaaa", "users.csv");
    ASSERT_TRUE(f.ok());
    ASSERT_TRUE(f->append({{"u1", "issued", "m", "T-1", "x"},
                           {"", "invalid", "line 3: the id is empty.", "", ""},
                           {"u2", "skipped-active", "two\nlines", "", ""}})
                    .ok());
  }
  const std::string complete = slurp(out);
  spill(out, complete + "u3,issued,\"half a mess");  // killed in the middle of a write
  ::chmod(out.c_str(), 0644);

  auto f = ResultFile::open(out, "aaaa", "elsewhere/users.csv");
  ASSERT_TRUE(f.ok()) << f.error().message;
  EXPECT_EQ(f->resumed_lines(), 3u);
  EXPECT_EQ(f->written(), (std::map<std::string, std::size_t>{{"", 1}, {"u1", 1}, {"u2", 1}}));
  EXPECT_EQ(f->resumed_statuses().at("issued"), 1u);
  EXPECT_EQ(mode_of(out), 0600u);
  EXPECT_EQ(slurp(out), complete);  // the torn line is gone
  ASSERT_TRUE(f->append({{"u3", "issued", "m", "T-3", "x"}}).ok());
  EXPECT_EQ(slurp(out), complete + "u3,issued,m,T-3,x\r\n");
}

TEST_F(ResultFileTest, ATornLineWithoutQuotesIsCutToo) {
  { ASSERT_TRUE(ResultFile::open(out, "aaaa", "in").ok()); }
  const std::string complete = slurp(out);
  spill(out, complete + "u9,iss");
  auto f = ResultFile::open(out, "aaaa", "in");
  ASSERT_TRUE(f.ok()) << f.error().message;
  EXPECT_TRUE(f->written().empty());
  EXPECT_EQ(slurp(out), complete);
}

TEST_F(ResultFileTest, AFileCutInsideItsHeaderGetsTheHeaderBack) {
  spill(out, "# kmsctl bulk-enable job aaaa input in\r\nid,sta");
  auto f = ResultFile::open(out, "aaaa", "in");
  ASSERT_TRUE(f.ok()) << f.error().message;
  EXPECT_EQ(slurp(out),
            "# kmsctl bulk-enable job aaaa input in\r\nid,status,message,token,expires_at\r\n");
  spill(out, "# kmsctl bulk-en");
  ASSERT_TRUE(ResultFile::open(out, "aaaa", "in").ok());
  EXPECT_EQ(slurp(out).substr(0, 30), "# kmsctl bulk-enable job aaaa ");
}

TEST_F(ResultFileTest, AnotherJobIsRefusedAndTheFileLeftAlone) {
  {
    auto f = ResultFile::open(out, "aaaa", "old.csv");
    ASSERT_TRUE(f.ok());
    ASSERT_TRUE(f->append({{"u1", "issued", "m", "T-1", "x"}}).ok());
  }
  const std::string before = slurp(out);
  auto f = ResultFile::open(out, "bbbb", "new.csv");
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.error().code, ErrorCode::kAlreadyExists);
  EXPECT_NE(f.error().message.find("job aaaa, input old.csv"), std::string::npos)
      << f.error().message;
  EXPECT_NE(f.error().message.find("new.csv is job bbbb"), std::string::npos);
  EXPECT_EQ(slurp(out), before);
}

TEST_F(ResultFileTest, SomeOtherFileIsRefused) {
  spill(out, "id,status\nu1,issued\n");
  auto f = ResultFile::open(out, "aaaa", "in");
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.error().code, ErrorCode::kAlreadyExists);
  EXPECT_EQ(slurp(out), "id,status\nu1,issued\n");
}

}  // namespace
}  // namespace kmsd::cli::bulk

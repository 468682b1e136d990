// The files of `kmsctl user bulk-enable`: the input CSV (id,email,display_name[,dn]), the job id
// that names one input, and the result CSV that a killed run resumes.
//
// Result file: mode 0600 (it holds tokens), first line "# kmsctl bulk-enable job JOB input PATH",
// then the header id,status,message,token,expires_at and one line per input line, appended and
// fsync'ed batch by batch. Every line carries a sentence in `message`, never a bare "Error".
#pragma once

#include <cstddef>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/fd.hpp"
#include "common/result.hpp"

namespace kmsd::cli::bulk {

// Hex of the first 16 bytes of SHA-256 of the input file's bytes: the same bytes, the same job.
std::string job_id(std::string_view input_bytes);

struct User {
  std::string id;
  std::string email;
  std::string display_name;
  std::optional<std::string> dn;
};

// One input line: a user to send, or why it cannot be sent.
struct Entry {
  std::size_t line = 0;
  std::string id;            // as given; "" when the line could not be read
  std::optional<User> user;  // set when the line is usable
  std::string problem;       // "line N: <sentence>" when it is not
};

struct Input {
  std::vector<Entry> entries;
  std::vector<std::string> ignored_columns;  // header names kmsctl does not use
};

// Parses the input CSV. Fails (kInvalidArgument) only when there is no usable header line;
// every bad line after it becomes an Entry with a problem. Blank lines are skipped.
Result<Input> parse_input(std::string_view text);

// The result file's columns, in order.
inline const std::vector<std::string> kResultColumns = {"id", "status", "message", "token",
                                                        "expires_at"};

struct ResultLine {
  std::string id;
  std::string status;
  std::string message;
  std::string token;
  std::string expires_at;
};

class ResultFile {
 public:
  // Creates PATH with mode 0600, or resumes it when its first line names JOB: a torn last line
  // is cut off and the complete lines are counted. kAlreadyExists when PATH belongs to another
  // job or is not a bulk-enable result file.
  static Result<ResultFile> open(const std::filesystem::path& path, const std::string& job,
                                 const std::string& input);

  // How many lines each id already has in the file (from an earlier run of the same job).
  const std::map<std::string, std::size_t>& written() const { return written_; }
  // How many of those lines have each status.
  const std::map<std::string, std::size_t>& resumed_statuses() const { return statuses_; }
  std::size_t resumed_lines() const { return resumed_lines_; }

  // Appends the lines in one write and fsyncs the file.
  Status append(const std::vector<ResultLine>& lines);

 private:
  ResultFile() = default;
  Status load_existing(const std::string& job, const std::string& input);
  Status write_all(std::string_view data);

  std::filesystem::path path_;
  UniqueFd fd_;
  std::map<std::string, std::size_t> written_;
  std::map<std::string, std::size_t> statuses_;
  std::size_t resumed_lines_ = 0;
};

}  // namespace kmsd::cli::bulk

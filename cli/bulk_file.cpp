#include "cli/bulk_file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <span>

#include "common/csv.hpp"
#include "common/ossl.hpp"

namespace kmsd::cli::bulk {

namespace {

std::string trim(std::string_view s) {
  const auto first = s.find_first_not_of(" \t");
  if (first == std::string_view::npos) return "";
  const auto last = s.find_last_not_of(" \t");
  return std::string(s.substr(first, last - first + 1));
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

std::string joined(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

bool all_empty(const csv::Record& r) {
  return std::all_of(r.fields.begin(), r.fields.end(),
                     [](const std::string& f) { return trim(f).empty(); });
}

Error io_error(const std::filesystem::path& path, const std::string& what) {
  return make_error(ErrorCode::kIo, what + " " + path.string() + ": " + std::strerror(errno));
}

constexpr std::string_view kFirstLinePrefix = "# kmsctl bulk-enable job ";

std::string preamble(const std::string& job, const std::string& input) {
  std::string safe = input;
  std::replace_if(
      safe.begin(), safe.end(), [](char c) { return c == '\r' || c == '\n'; }, '?');
  return std::string(kFirstLinePrefix) + job + " input " + safe + "\r\n" +
         csv::format_record(kResultColumns);
}

}  // namespace

std::string job_id(std::string_view input_bytes) {
  auto digest = ossl::sha256(
      std::span(reinterpret_cast<const std::uint8_t*>(input_bytes.data()), input_bytes.size()));
  return ossl::hex(std::span(digest).first(16));
}

Result<Input> parse_input(std::string_view text) {
  const std::string_view bom = "\xEF\xBB\xBF";
  const bool had_bom = text.starts_with(bom);
  if (had_bom) text.remove_prefix(bom.size());
  const std::string expected =
      "the first line must name the columns id, email, display_name and optionally dn";

  csv::Reader reader(text);
  csv::Record rec;
  bool have_header = false;
  while (reader.next(rec))
    if (!rec.blank()) {
      have_header = true;
      break;
    }
  if (!have_header)
    return make_error(ErrorCode::kInvalidArgument, "the input has no header line; " + expected);
  if (rec.malformed())
    return make_error(ErrorCode::kInvalidArgument, "line " + std::to_string(rec.line) +
                                                       ": the header is not valid CSV (" +
                                                       rec.error + "); " + expected);

  Input input;
  std::map<std::string, std::size_t> column;
  for (std::size_t i = 0; i < rec.fields.size(); ++i) {
    const std::string name = lower(trim(rec.fields[i]));
    if (name == "id" || name == "email" || name == "display_name" || name == "dn") {
      if (!column.emplace(name, i).second)
        return make_error(ErrorCode::kInvalidArgument, "line " + std::to_string(rec.line) +
                                                           ": the header names the column " + name +
                                                           " twice");
    } else {
      input.ignored_columns.push_back(trim(rec.fields[i]));
    }
  }
  std::vector<std::string> missing;
  for (const char* name : {"id", "email", "display_name"})
    if (!column.contains(name)) missing.push_back(name);
  if (!missing.empty())
    return make_error(ErrorCode::kInvalidArgument, "line " + std::to_string(rec.line) + ": " +
                                                       expected + " (missing: " + joined(missing) +
                                                       "; found: " + joined(rec.fields) + ")");
  const std::size_t width = rec.fields.size();

  std::map<std::string, std::size_t> first_line;  // id -> line it was first seen on
  while (reader.next(rec)) {
    if (rec.blank() || (!rec.malformed() && all_empty(rec))) continue;
    Entry e;
    e.line = rec.line;
    const std::string at = "line " + std::to_string(rec.line) + ": ";
    if (rec.malformed()) {
      e.problem = at + "not valid CSV: " + rec.error + ".";
      input.entries.push_back(std::move(e));
      continue;
    }
    auto get = [&](const char* name) -> std::string {
      auto it = column.find(name);
      if (it == column.end() || it->second >= rec.fields.size()) return "";
      return trim(rec.fields[it->second]);
    };
    e.id = get("id");
    User u{e.id, get("email"), get("display_name"), std::nullopt};
    if (auto dn = get("dn"); !dn.empty()) u.dn = dn;
    if (rec.fields.size() != width) {
      e.problem = at + "expected " + std::to_string(width) + " fields as in the header, found " +
                  std::to_string(rec.fields.size()) + " (quote a field that holds a comma).";
    } else if (u.id.empty()) {
      e.problem = at + "the id is empty.";
    } else if (u.email.empty()) {
      e.problem = at + "the email of " + u.id + " is empty.";
    } else if (u.display_name.empty()) {
      e.problem = at + "the display_name of " + u.id + " is empty.";
    } else if (auto [it, fresh] = first_line.emplace(u.id, rec.line); !fresh) {
      e.problem = at + "the id " + u.id + " appears again (first on line " +
                  std::to_string(it->second) + "); only the first line is used.";
    } else {
      e.user = std::move(u);
    }
    input.entries.push_back(std::move(e));
  }
  return input;
}

Result<ResultFile> ResultFile::open(const std::filesystem::path& path, const std::string& job,
                                    const std::string& input) {
  ResultFile f;
  f.path_ = path;
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_APPEND | O_CLOEXEC, 0600);
  if (fd >= 0) {
    f.fd_ = UniqueFd(fd);
    if (::fchmod(fd, 0600) != 0) return io_error(path, "cannot set mode 0600 on");
    KMSD_TRY(f.write_all(preamble(job, input)));
    // The new directory entry must survive a crash as well as the lines written into it.
    auto dir = path.parent_path().empty() ? std::filesystem::path(".") : path.parent_path();
    UniqueFd dfd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (dfd.valid()) ::fsync(dfd.get());
    return f;
  }
  if (errno != EEXIST) return io_error(path, "cannot create");
  fd = ::open(path.c_str(), O_RDWR | O_APPEND | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return io_error(path, "cannot open");
  f.fd_ = UniqueFd(fd);
  KMSD_TRY(f.load_existing(job, input));
  return f;
}

Status ResultFile::load_existing(const std::string& job, const std::string& input) {
  const int fd = fd_.get();
  struct stat st {};
  if (::fstat(fd, &st) != 0) return io_error(path_, "cannot stat");
  if (!S_ISREG(st.st_mode))
    return make_error(ErrorCode::kAlreadyExists,
                      path_.string() + " exists and is not a regular file; choose another --out");
  std::string content(static_cast<std::size_t>(st.st_size), '\0');
  std::size_t got = 0;
  while (got < content.size()) {
    ssize_t n = ::pread(fd, content.data() + got, content.size() - got, static_cast<off_t>(got));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return io_error(path_, "cannot read");
    if (n == 0) break;
    got += static_cast<std::size_t>(n);
  }
  content.resize(got);
  const std::string not_ours =
      path_.string() +
      " exists and is not a kmsctl bulk-enable result file; refusing to touch it (choose another "
      "--out)";

  const std::string mine = preamble(job, input);
  const auto first_break = content.find('\n');
  if (first_break == std::string::npos) {
    // Empty, or a first line torn while it was written: it holds no token yet.
    if (!std::string_view(mine).starts_with(content))
      return make_error(ErrorCode::kAlreadyExists, not_ours);
    if (::ftruncate(fd, 0) != 0) return io_error(path_, "cannot truncate");
    if (::fchmod(fd, 0600) != 0) return io_error(path_, "cannot set mode 0600 on");
    return write_all(mine);
  }
  std::string first = content.substr(0, first_break);
  if (!first.empty() && first.back() == '\r') first.pop_back();
  if (!first.starts_with(kFirstLinePrefix)) return make_error(ErrorCode::kAlreadyExists, not_ours);
  const std::string rest = first.substr(kFirstLinePrefix.size());
  const std::string their_job = rest.substr(0, rest.find(' '));
  if (their_job != job) {
    const auto input_at = rest.find(" input ");
    const std::string their_input =
        input_at == std::string::npos ? "?" : rest.substr(input_at + std::string(" input ").size());
    return make_error(ErrorCode::kAlreadyExists,
                      path_.string() + " holds the results of another input (job " + their_job +
                          ", input " + their_input + "), but " + input + " is job " + job +
                          "; nothing was sent. Choose another --out, and keep " + path_.string() +
                          " until its tokens are handed out");
  }
  // It holds tokens: whoever can read it could enroll as those users.
  if (::fchmod(fd, 0600) != 0) return io_error(path_, "cannot set mode 0600 on");

  const std::size_t body = first_break + 1;
  csv::Reader reader(std::string_view(content).substr(body));
  csv::Record rec;
  std::size_t good_end = body;  // everything before this offset is complete
  bool header = false;
  while (reader.next(rec)) {
    if (!rec.terminated || rec.open_quote) break;  // a line torn by a killed run
    const std::string where = path_.string() + " line " + std::to_string(rec.line + 1);
    if (rec.malformed())
      return make_error(ErrorCode::kFailedPrecondition,
                        where + " is damaged (" + rec.error + "); repair or move the file");
    if (!header) {
      if (rec.fields != kResultColumns) return make_error(ErrorCode::kAlreadyExists, not_ours);
      header = true;
    } else {
      if (rec.fields.size() != kResultColumns.size())
        return make_error(ErrorCode::kFailedPrecondition,
                          where + " has " + std::to_string(rec.fields.size()) +
                              " fields instead of " + std::to_string(kResultColumns.size()) +
                              "; repair or move the file");
      ++written_[rec.fields[0]];
      ++statuses_[rec.fields[1]];
      ++resumed_lines_;
    }
    good_end = body + rec.end;
  }
  if (good_end < content.size() && ::ftruncate(fd, static_cast<off_t>(good_end)) != 0)
    return io_error(path_, "cannot cut the torn last line of");
  if (!header) return write_all(csv::format_record(kResultColumns));
  if (::fsync(fd) != 0) return io_error(path_, "cannot sync");
  return {};
}

Status ResultFile::write_all(std::string_view data) {
  while (!data.empty()) {
    ssize_t n = ::write(fd_.get(), data.data(), data.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return io_error(path_, "cannot write");
    data.remove_prefix(static_cast<std::size_t>(n));
  }
  if (::fsync(fd_.get()) != 0) return io_error(path_, "cannot sync");
  return {};
}

Status ResultFile::append(const std::vector<ResultLine>& lines) {
  std::string data;
  for (const auto& l : lines)
    data += csv::format_record({l.id, l.status, l.message, l.token, l.expires_at});
  return write_all(data);
}

}  // namespace kmsd::cli::bulk

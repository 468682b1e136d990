// RFC 4180 CSV, read and written: fields separated by commas, records by CRLF (LF alone is
// accepted when reading), fields with commas, quotes or line breaks enclosed in double quotes
// with inner quotes doubled. A malformed record is reported with its line number and the
// reader carries on with the next line, so one bad line never hides the rest of a file.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace kmsd::csv {

struct Record {
  std::vector<std::string> fields;
  std::size_t line = 0;     // physical line (1-based) where the record starts
  std::size_t begin = 0;    // byte offset of the record's first character
  std::size_t end = 0;      // byte offset just past the record and its line break
  bool terminated = false;  // ended by a line break rather than by the end of the text
  std::string error;        // non-empty: the record is malformed and FIELDS are unreliable
  bool open_quote = false;  // malformed because a quoted field runs to the end of the text
  bool malformed() const { return !error.empty(); }
  // A line with nothing on it (RFC 4180 would call it one empty field).
  bool blank() const { return !malformed() && fields.size() == 1 && fields[0].empty(); }
};

class Reader {
 public:
  explicit Reader(std::string_view text) : text_(text) {}
  // The next record; false at the end of the text.
  bool next(Record& out);

 private:
  void skip_rest_of_line();
  std::string_view text_;
  std::size_t pos_ = 0;
  std::size_t line_ = 1;
};

// FIELD as RFC 4180 wants it: quoted when it holds a comma, quote, CR or LF (or starts or
// ends with a space, which some readers would trim), else as is.
std::string quote(std::string_view field);
// One record: the quoted fields joined by commas, ending in CRLF.
std::string format_record(const std::vector<std::string>& fields);

}  // namespace kmsd::csv

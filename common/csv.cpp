#include "common/csv.hpp"

namespace kmsd::csv {

namespace {

bool is_break(char c) {
  return c == '\n' || c == '\r';
}

}  // namespace

void Reader::skip_rest_of_line() {
  while (pos_ < text_.size() && text_[pos_] != '\n') ++pos_;
  if (pos_ < text_.size()) {
    ++pos_;
    ++line_;
  }
}

bool Reader::next(Record& out) {
  out = Record{};
  if (pos_ >= text_.size()) return false;
  out.line = line_;
  out.begin = pos_;
  enum class State { kStart, kUnquoted, kQuoted, kAfterQuote } st = State::kStart;
  std::string field;

  auto finish = [&](bool terminated) {
    out.end = pos_;
    out.terminated = terminated;
    return true;
  };
  auto malformed = [&](std::string why) {
    out.error = "field " + std::to_string(out.fields.size() + 1) + ": " + std::move(why);
    skip_rest_of_line();
    return finish(pos_ > 0 && text_[pos_ - 1] == '\n');
  };
  auto end_of_record = [&] {
    out.fields.push_back(std::move(field));
    if (text_[pos_] == '\r' && pos_ + 1 < text_.size() && text_[pos_ + 1] == '\n') ++pos_;
    ++pos_;
    ++line_;
    return finish(true);
  };

  while (pos_ < text_.size()) {
    const char c = text_[pos_];
    switch (st) {
      case State::kStart:
      case State::kUnquoted:
        if (c == '"') {
          if (st == State::kUnquoted)
            return malformed(
                "a quote inside an unquoted field (enclose the whole field in quotes and double "
                "the quote)");
          st = State::kQuoted;
        } else if (c == ',') {
          out.fields.push_back(std::move(field));
          field.clear();
          st = State::kStart;
        } else if (is_break(c)) {
          return end_of_record();
        } else {
          field += c;
          st = State::kUnquoted;
        }
        ++pos_;
        break;
      case State::kQuoted:
        if (c == '"') {
          if (pos_ + 1 < text_.size() && text_[pos_ + 1] == '"') {
            field += '"';
            ++pos_;
          } else {
            st = State::kAfterQuote;
          }
        } else {
          if (c == '\n') ++line_;
          field += c;
        }
        ++pos_;
        break;
      case State::kAfterQuote:
        if (c == ',') {
          out.fields.push_back(std::move(field));
          field.clear();
          st = State::kStart;
          ++pos_;
        } else if (is_break(c)) {
          return end_of_record();
        } else {
          return malformed("text after the closing quote (double a quote meant inside the field)");
        }
        break;
    }
  }
  if (st == State::kQuoted) {
    // The quote never closes: take only the line it opened on as the bad record and go on.
    pos_ = out.begin;
    line_ = out.line;
    out.open_quote = true;
    return malformed("a quoted field that never closes (a missing closing quote)");
  }
  out.fields.push_back(std::move(field));
  return finish(false);
}

std::string quote(std::string_view field) {
  const bool needs = field.find_first_of(",\"\r\n") != std::string_view::npos ||
                     (!field.empty() && (field.front() == ' ' || field.back() == ' '));
  if (!needs) return std::string(field);
  std::string out = "\"";
  for (char c : field) {
    if (c == '"') out += '"';
    out += c;
  }
  out += '"';
  return out;
}

std::string format_record(const std::vector<std::string>& fields) {
  std::string out;
  for (std::size_t i = 0; i < fields.size(); ++i) {
    if (i) out += ',';
    out += quote(fields[i]);
  }
  out += "\r\n";
  return out;
}

}  // namespace kmsd::csv

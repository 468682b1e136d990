// A validator of the Prometheus text exposition format 0.0.4, strict enough to stand in for a
// real parser (prom2json's idea): every line is a HELP, a TYPE, another comment, a blank line
// or a sample; metric and label names and label-value escapes follow the grammar; a family's
// TYPE comes before its samples, once, and its samples are contiguous; no series twice;
// histograms have increasing le buckets with cumulative counts, a +Inf bucket equal to _count,
// and a _sum. Returns the series by their full text ("name{a=\"b\"}") with their values.
#pragma once

#include <cmath>
#include <cstdlib>
#include <map>
#include <optional>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace kmsd::testing {

struct ParsedSample {
  std::string name;
  std::vector<std::pair<std::string, std::string>> labels;  // unescaped, in order
  double value = 0;
};

struct ParsedExposition {
  std::map<std::string, std::string> types;  // family -> counter|gauge|histogram|summary|untyped
  std::map<std::string, std::string> help;
  std::vector<ParsedSample> samples;
  std::map<std::string, double> series;  // canonical "name{k="v",...}" -> value
  std::vector<std::string> problems;     // empty: valid
  bool ok() const { return problems.empty(); }
};

inline std::string canonical(const std::string& name,
                             std::vector<std::pair<std::string, std::string>> labels) {
  std::sort(labels.begin(), labels.end());
  std::string out = name + "{";
  for (std::size_t i = 0; i < labels.size(); ++i) {
    if (i > 0) out += ",";
    out += labels[i].first + "=\"" + labels[i].second + "\"";
  }
  return out + "}";
}

namespace detail {

inline bool metric_name(const std::string& s) {
  static const std::regex re("[a-zA-Z_:][a-zA-Z0-9_:]*");
  return std::regex_match(s, re);
}
inline bool label_name(const std::string& s) {
  static const std::regex re("[a-zA-Z_][a-zA-Z0-9_]*");
  return std::regex_match(s, re) && s.rfind("__", 0) != 0;
}
inline std::optional<double> value(const std::string& s) {
  if (s == "NaN") return std::nan("");
  if (s == "+Inf" || s == "Inf") return HUGE_VAL;
  if (s == "-Inf") return -HUGE_VAL;
  static const std::regex re(R"([-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)");
  if (!std::regex_match(s, re)) return std::nullopt;
  return std::strtod(s.c_str(), nullptr);
}
// The family a sample name belongs to, given the TYPEs seen.
inline std::string family_of(const std::string& name,
                             const std::map<std::string, std::string>& types) {
  for (const char* suffix : {"_bucket", "_sum", "_count"}) {
    const std::string sfx(suffix);
    if (name.size() > sfx.size() && name.compare(name.size() - sfx.size(), sfx.size(), sfx) == 0) {
      const std::string base = name.substr(0, name.size() - sfx.size());
      auto it = types.find(base);
      if (it != types.end() && (it->second == "histogram" || it->second == "summary")) return base;
    }
  }
  return name;
}

}  // namespace detail

inline ParsedExposition parse_exposition(const std::string& text) {
  ParsedExposition out;
  auto problem = [&](std::size_t line, const std::string& what) {
    out.problems.push_back("line " + std::to_string(line) + ": " + what);
  };
  if (!text.empty() && text.back() != '\n') problem(0, "the exposition does not end with \\n");
  std::set<std::string> finished;  // families whose samples are over
  std::string current;             // family of the last sample
  std::istringstream in(text);
  std::string line;
  std::size_t n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (line.empty()) continue;
    if (line[0] == '#') {
      std::istringstream ls(line.substr(1));
      std::string kw, name;
      ls >> kw >> name;
      if (kw != "HELP" && kw != "TYPE") continue;  // another comment
      if (!detail::metric_name(name)) {
        problem(n, "bad metric name in " + kw + ": '" + name + "'");
        continue;
      }
      std::string rest;
      std::getline(ls, rest);
      if (!rest.empty() && rest[0] == ' ') rest.erase(0, 1);
      if (kw == "TYPE") {
        static const std::set<std::string> kTypes{"counter", "gauge", "histogram", "summary",
                                                  "untyped"};
        if (!kTypes.count(rest)) problem(n, "unknown type '" + rest + "' for " + name);
        if (out.types.count(name)) problem(n, "second TYPE line for " + name);
        if (finished.count(name) || current == name)
          problem(n, "TYPE for " + name + " after its samples");
        out.types[name] = rest;
      } else {
        if (out.help.count(name)) problem(n, "second HELP line for " + name);
        for (std::size_t i = 0; i < rest.size(); ++i) {
          if (rest[i] != '\\') continue;
          if (i + 1 >= rest.size() || (rest[i + 1] != '\\' && rest[i + 1] != 'n'))
            problem(n, "bad escape in HELP of " + name);
          ++i;  // the escaped character
        }
        out.help[name] = rest;
      }
      continue;
    }
    // name{labels} value [timestamp]
    std::size_t i = 0;
    while (i < line.size() && line[i] != '{' && line[i] != ' ') ++i;
    ParsedSample s;
    s.name = line.substr(0, i);
    if (!detail::metric_name(s.name)) {
      problem(n, "bad metric name '" + s.name + "'");
      continue;
    }
    bool bad = false;
    std::set<std::string> seen_labels;
    if (i < line.size() && line[i] == '{') {
      ++i;
      while (i < line.size() && line[i] != '}') {
        std::size_t eq = line.find('=', i);
        if (eq == std::string::npos) {
          bad = true;
          break;
        }
        std::string lname = line.substr(i, eq - i);
        if (!detail::label_name(lname) || !seen_labels.insert(lname).second) {
          problem(n, "bad or repeated label name '" + lname + "'");
          bad = true;
          break;
        }
        i = eq + 1;
        if (i >= line.size() || line[i] != '"') {
          bad = true;
          break;
        }
        ++i;
        std::string v;
        bool closed = false;
        while (i < line.size()) {
          char c = line[i++];
          if (c == '"') {
            closed = true;
            break;
          }
          if (c == '\\') {
            if (i >= line.size()) break;
            char e = line[i++];
            if (e == '\\') {
              v += '\\';
            } else if (e == '"') {
              v += '"';
            } else if (e == 'n') {
              v += '\n';
            } else {
              problem(n, std::string("bad escape \\") + e + " in a label value");
              bad = true;
            }
          } else {
            v += c;
          }
        }
        if (!closed) {
          bad = true;
          break;
        }
        s.labels.emplace_back(lname, v);
        if (i < line.size() && line[i] == ',') ++i;
      }
      if (i >= line.size() || line[i] != '}') bad = true;
      ++i;
    }
    if (bad) {
      problem(n, "malformed labels: " + line);
      continue;
    }
    if (i >= line.size() || line[i] != ' ') {
      problem(n, "no value: " + line);
      continue;
    }
    std::istringstream vs(line.substr(i + 1));
    std::string val, ts, extra;
    vs >> val >> ts >> extra;
    auto v = detail::value(val);
    if (!v) {
      problem(n, "bad value '" + val + "'");
      continue;
    }
    if (!ts.empty()) {
      static const std::regex re("-?\\d+");
      if (!std::regex_match(ts, re)) problem(n, "bad timestamp '" + ts + "'");
    }
    if (!extra.empty()) problem(n, "trailing text after the value");
    s.value = *v;
    const std::string fam = detail::family_of(s.name, out.types);
    if (!out.types.count(fam)) problem(n, "sample of " + fam + " without a TYPE line before it");
    if (fam != current) {
      if (finished.count(fam)) problem(n, "samples of " + fam + " are not contiguous");
      if (!current.empty()) finished.insert(current);
      current = fam;
    }
    const std::string key = canonical(s.name, s.labels);
    if (!out.series.emplace(key, s.value).second) problem(n, "series twice: " + key);
    out.samples.push_back(std::move(s));
  }

  // Histograms: per label set (without le), increasing le, cumulative counts, +Inf = _count.
  for (const auto& [fam, type] : out.types) {
    if (type != "histogram") continue;
    std::map<std::string, std::vector<std::pair<double, double>>> buckets;  // base -> (le, n)
    std::map<std::string, double> counts, sums;
    for (const auto& s : out.samples) {
      auto labels = s.labels;
      if (s.name == fam + "_bucket") {
        auto it = std::find_if(labels.begin(), labels.end(),
                               [](const auto& l) { return l.first == "le"; });
        if (it == labels.end()) {
          out.problems.push_back(fam + "_bucket without an le label");
          continue;
        }
        auto le = detail::value(it->second);
        if (!le) {
          out.problems.push_back(fam + "_bucket with le=\"" + it->second + "\"");
          continue;
        }
        labels.erase(it);
        buckets[canonical(fam, labels)].emplace_back(*le, s.value);
      } else if (s.name == fam + "_count") {
        counts[canonical(fam, labels)] = s.value;
      } else if (s.name == fam + "_sum") {
        sums[canonical(fam, labels)] = s.value;
      } else if (s.name == fam) {
        out.problems.push_back("histogram " + fam + " has a bare sample");
      }
    }
    for (const auto& [base, bs] : buckets) {
      for (std::size_t k = 1; k < bs.size(); ++k) {
        if (!(bs[k].first > bs[k - 1].first))
          out.problems.push_back(base + ": le values not increasing");
        if (bs[k].second < bs[k - 1].second)
          out.problems.push_back(base + ": bucket counts not cumulative");
      }
      if (bs.empty() || !std::isinf(bs.back().first))
        out.problems.push_back(base + ": no le=\"+Inf\" bucket");
      if (!counts.count(base)) {
        out.problems.push_back(base + ": no _count");
      } else if (!bs.empty() && bs.back().second != counts[base]) {
        out.problems.push_back(base + ": +Inf bucket differs from _count");
      }
      if (!sums.count(base)) out.problems.push_back(base + ": no _sum");
    }
    for (const auto& [base, c] : counts)
      if (!buckets.count(base)) out.problems.push_back(base + ": _count without buckets");
  }
  return out;
}

// Counters (and histogram buckets, sums and counts) of BEFORE that went down in AFTER, or
// vanished: each a sentence.
inline std::vector<std::string> monotonic_problems(const ParsedExposition& before,
                                                   const ParsedExposition& after) {
  std::vector<std::string> out;
  for (const auto& s : before.samples) {
    const std::string fam = detail::family_of(s.name, before.types);
    auto t = before.types.find(fam);
    if (t == before.types.end() || (t->second != "counter" && t->second != "histogram")) continue;
    const std::string key = canonical(s.name, s.labels);
    auto it = after.series.find(key);
    if (it == after.series.end()) {
      out.push_back(key + " vanished");
    } else if (it->second < s.value) {
      out.push_back(key + " went down from " + std::to_string(s.value) + " to " +
                    std::to_string(it->second));
    }
  }
  return out;
}

}  // namespace kmsd::testing

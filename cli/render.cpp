#include "cli/render.hpp"

#include <algorithm>
#include <cctype>
#include <ctime>

#include "common/clock.hpp"
#include "common/csv.hpp"

namespace kmsd::cli::render {

using nlohmann::json;

namespace {

const json* member(const json& j, std::string_view field) {
  if (!j.is_object()) return nullptr;
  auto it = j.find(field);
  return it == j.end() ? nullptr : &*it;
}

std::string scalar(const json& v) {
  if (v.is_null()) return "";
  if (v.is_string()) return v.get<std::string>();
  return v.dump();
}

bool is_time_key(std::string_view key) {
  return key == "at" || key.ends_with("_at") || key == "not_after" || key == "not_before";
}

// A key=value list of an object's fields ("id=alice reason=1"), for one table cell.
std::string inline_object(const json& v) {
  if (!v.is_object()) return scalar(v);
  std::string out;
  for (const auto& [k, x] : v.items()) out += (out.empty() ? "" : " ") + k + "=" + scalar(x);
  return out;
}

std::string labelled(std::string_view label, const std::string& value) {
  std::string out(label);
  out += ':';
  out.resize(std::max<std::size_t>(out.size() + 1, 19), ' ');
  return out + value + "\n";
}

std::string approvals_needed(const json& j) {
  auto have = integer(j, "approvals");
  auto need = integer(j, "required");
  if (!have || !need) return "more approvals";
  const auto left = std::max<std::int64_t>(*need - *have, 1);
  return std::to_string(left) + (left == 1 ? " more approval" : " more approvals");
}

}  // namespace

std::string url_encode(std::string_view s) {
  static const char* hex = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~') {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  return out;
}

std::string text(const json& j, std::string_view field) {
  const json* v = member(j, field);
  return v ? scalar(*v) : "";
}

std::optional<std::int64_t> integer(const json& j, std::string_view field) {
  const json* v = member(j, field);
  if (!v || !v->is_number_integer()) return std::nullopt;
  return v->get<std::int64_t>();
}

std::string time_text(const json& j, std::string_view field) {
  if (auto n = integer(j, field)) return utc_text(*n);
  return text(j, field);
}

std::string table(const std::vector<std::string>& header,
                  const std::vector<std::vector<std::string>>& rows) {
  std::vector<std::size_t> width(header.size(), 0);
  auto measure = [&](const std::vector<std::string>& row) {
    for (std::size_t i = 0; i < row.size() && i < width.size(); ++i)
      width[i] = std::max(width[i], row[i].size());
  };
  measure(header);
  for (const auto& r : rows) measure(r);
  auto line = [&](const std::vector<std::string>& row, bool upper) {
    std::string out;
    for (std::size_t i = 0; i < row.size() && i < width.size(); ++i) {
      std::string cell = row[i];
      if (upper)
        std::transform(cell.begin(), cell.end(), cell.begin(),
                       [](unsigned char c) { return static_cast<char>(std::toupper(c)); });
      if (i + 1 < row.size()) cell.resize(width[i] + 2, ' ');
      out += cell;
    }
    return out + "\n";
  };
  std::string out = line(header, true);
  for (const auto& r : rows) out += line(r, false);
  return out;
}

std::string issued(const json& j) {
  const json* u = member(j, "user");
  const json& user = u ? *u : json::object();
  std::string out =
      labelled("user", text(user, "id") +
                           (text(user, "state").empty() ? "" : " (" + text(user, "state") + ")"));
  out += labelled("token", text(j, "token"));
  out += labelled("expires", time_text(j, "expires_at"));
  if (auto m = text(j, "message"); !m.empty()) out += m + "\n";
  return out;
}

std::string user(const json& j) {
  const json* u = member(j, "user");
  const json& rec = u ? *u : json::object();
  std::string out = labelled("id", text(rec, "id"));
  out += labelled("email", text(rec, "email"));
  out += labelled("display name", text(rec, "display_name"));
  if (auto dn = text(rec, "dn"); !dn.empty()) out += labelled("dn", dn);
  out += labelled("state", text(rec, "state"));
  if (auto c = time_text(rec, "created_at"); !c.empty()) out += labelled("created", c);
  auto enrolled = time_text(rec, "last_enrolled_at");
  out += labelled("last enrolled", enrolled.empty() ? "never" : enrolled);
  out += labelled("token", text(j, "token_status"));
  out += labelled("key history depth", text(j, "key_history_depth"));
  const json* certs = member(j, "certificates");
  if (!certs || !certs->is_array() || certs->empty()) return out + labelled("certificates", "none");
  out += labelled("certificates", std::to_string(certs->size()));
  // The usual columns first, in reading order; whatever else kmsd sends after them.
  std::vector<std::string> columns;
  for (const char* k : {"serial", "usage", "kind", "purpose", "profile", "not_before", "not_after",
                        "status", "state"})
    if (std::any_of(certs->begin(), certs->end(),
                    [&](const json& c) { return member(c, k) != nullptr; }))
      columns.push_back(k);
  for (const auto& c : *certs)
    if (c.is_object())
      for (const auto& [k, v] : c.items())
        if (!v.is_structured() && std::find(columns.begin(), columns.end(), k) == columns.end())
          columns.push_back(k);
  std::vector<std::vector<std::string>> rows;
  for (const auto& c : *certs) {
    std::vector<std::string> row;
    for (const auto& k : columns) row.push_back(is_time_key(k) ? time_text(c, k) : text(c, k));
    rows.push_back(std::move(row));
  }
  std::vector<std::string> header;
  for (auto k : columns) {
    std::replace(k.begin(), k.end(), '_', ' ');
    header.push_back(k);
  }
  std::string t = table(header, rows), indented;
  for (std::size_t pos = 0; pos < t.size();) {
    auto nl = t.find('\n', pos);
    indented += "  " + t.substr(pos, nl - pos + 1);
    pos = nl + 1;
  }
  return out + indented;
}

Outcome outcome(const json& j, bool denial_wanted) {
  const std::string state = text(j, "state");
  const std::string message = text(j, "message");
  if (state == "pending") {
    const std::string id = text(j, "request_id");
    std::string out = "pending: request " + id + " needs " + approvals_needed(j) +
                      " (kmsctl request approve " + id + ")\n";
    if (!message.empty()) out += "  " + message + "\n";
    return {out, true};
  }
  if (state == "executed") {
    std::string out = "executed" + (message.empty() ? "" : ": " + message) + "\n";
    if (const json* r = member(j, "result"); r && !r->is_null()) {
      if (r->is_object()) {
        for (const auto& [k, v] : r->items())
          out += labelled("  " + k, is_time_key(k) ? time_text(*r, k) : scalar(v));
      } else {
        out += labelled("  result", scalar(*r));
      }
    }
    return {out, true};
  }
  const std::string shown = state.empty() ? "unknown outcome" : state;
  return {shown + ": " + (message.empty() ? "kmsd gave no reason" : message) + "\n",
          state == "denied" && denial_wanted};
}

std::string requests_table(const json& j) {
  const json* list = member(j, "requests");
  if (!list || !list->is_array() || list->empty()) return "no requests\n";
  std::vector<std::vector<std::string>> rows;
  for (const auto& r : *list) {
    const json* params = member(r, "params");
    rows.push_back({text(r, "id"), text(r, "operation"), params ? inline_object(*params) : "",
                    text(r, "requested_by"), text(r, "approvals") + "/" + text(r, "required"),
                    text(r, "state"), time_text(r, "expires_at")});
  }
  return table({"id", "operation", "params", "requested by", "approvals", "state", "expires"},
               rows);
}

std::string requests_csv(const json& j) {
  const std::vector<std::string> columns = {"id",         "operation", "params", "requested_by",
                                            "required",   "approvals", "state",  "created_at",
                                            "expires_at", "result"};
  std::string out = csv::format_record(columns);
  const json* list = member(j, "requests");
  if (!list || !list->is_array()) return out;
  for (const auto& r : *list) {
    std::vector<std::string> row;
    for (const auto& c : columns) row.push_back(is_time_key(c) ? time_text(r, c) : text(r, c));
    out += csv::format_record(row);
  }
  return out;
}

Outcome audit_verify(const json& j) {
  const std::string records = text(j, "records");
  const json* ok = member(j, "ok");
  if (ok && ok->is_boolean() && ok->get<bool>())
    return {"audit chain intact: " + records + " records verified\n", true};
  std::string problem = text(j, "problem");
  if (problem.empty()) problem = "kmsd reports the chain as broken without saying why";
  const std::string bad = text(j, "first_bad");
  if (bad.empty()) return {"audit chain broken: " + problem + "\n", false};
  return {"audit chain broken at record " + bad + " (" + records + " records checked): " + problem +
              "\n",
          false};
}

}  // namespace kmsd::cli::render

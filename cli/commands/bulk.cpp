// kmsctl user bulk-enable: enables every user of an input CSV in batches and writes one result
// line per input line (Q237909: each with a sentence, never a bare "Error"). The result file
// names the job (the input's digest); a killed run started again skips the lines already
// written, and kmsd answers the users of an unwritten batch with the same tokens again.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>

#include "cli/bulk_file.hpp"
#include "cli/commands/common.hpp"
#include "cli/render.hpp"
#include "common/files.hpp"

namespace kmsd::cli {

namespace {

struct BulkArgs : AdminArgs {
  std::string input;
  std::string out;
  bool reissue_pending = false;
  bool include_revoked = false;
  int batch = 500;
};

const std::vector<std::string> kStatuses = {"issued",         "pending",          "skipped-revoked",
                                            "skipped-active", "skipped-recovery", "invalid"};

// The sentence for a line whose server answer came without one (or with a bare "Error").
std::string fallback_message(const std::string& status, const std::string& id) {
  if (status == "issued") return "a new enrollment token was issued.";
  if (status == "pending")
    return "an enrollment token issued earlier is still unused; --reissue-pending replaces it.";
  if (status == "skipped-revoked")
    return "the user is revoked and was not re-enabled; --include-revoked re-enables it.";
  if (status == "skipped-active") return "the user has already enrolled; nothing was changed.";
  if (status == "skipped-recovery")
    return "the user is in recovery; kmsctl user reissue " + id + " hands out its token.";
  return "kmsd answered '" + status + "' without a reason; see kmsctl user show " + id + ".";
}

bulk::ResultLine result_line(const bulk::Entry& e, const nlohmann::json& r) {
  bulk::ResultLine line{e.id, render::text(r, "status"), render::text(r, "message"),
                        render::text(r, "token"), render::time_text(r, "expires_at")};
  if (line.status.empty()) line.status = "invalid";
  std::string lowered = line.message;
  std::transform(lowered.begin(), lowered.end(), lowered.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  // Nothing, or nothing but "Error" and decoration: say what happened instead.
  if (lowered.find_first_not_of("*.!:- error") == std::string::npos)
    line.message = fallback_message(line.status, e.id);
  return line;
}

// done/total, users/s and ETA on stderr, only when stderr is a terminal.
class Progress {
 public:
  explicit Progress(std::size_t total) : total_(total), on_(::isatty(STDERR_FILENO) == 1) {}
  void update(std::size_t done) {
    if (!on_ || total_ == 0) return;
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    const double rate = secs > 0 ? static_cast<double>(done) / secs : 0;
    const auto eta = rate > 0 ? static_cast<long>(static_cast<double>(total_ - done) / rate) : 0;
    const std::size_t filled = done * 30 / total_;
    std::fprintf(stderr, "\r[%s%s] %zu/%zu  %.0f users/s  ETA %ld:%02ld ",
                 std::string(filled, '#').c_str(), std::string(30 - filled, '.').c_str(), done,
                 total_, rate, eta / 60, eta % 60);
    if (done == total_) std::fputc('\n', stderr);
    std::fflush(stderr);
  }

 private:
  std::size_t total_;
  bool on_;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
};

class BulkRun {
 public:
  BulkRun(const BulkArgs& a, std::string job, client::AdminClient& client, bulk::ResultFile& file)
      : a_(a), job_(std::move(job)), client_(client), file_(file) {}

  // Sends and writes the entries not yet in the result file; the exit code.
  int run(const std::vector<bulk::Entry>& entries) {
    auto already = file_.written();
    std::vector<const bulk::Entry*> to_send;
    for (const auto& e : entries) {
      auto it = already.find(e.id);
      if (it != already.end() && it->second > 0) {
        --it->second;
        continue;
      }
      to_send.push_back(&e);
    }
    Progress progress(to_send.size());
    std::vector<const bulk::Entry*> chunk;
    std::size_t users = 0, done = 0;
    for (std::size_t i = 0; i < to_send.size(); ++i) {
      chunk.push_back(to_send[i]);
      if (to_send[i]->user) ++users;
      if (users < static_cast<std::size_t>(a_.batch) && i + 1 < to_send.size()) continue;
      if (int rc = flush(chunk); rc != kOk) {
        std::cerr << "kmsctl: " << done << " of " << to_send.size() << " lines of this run are in "
                  << a_.out << "; run the same command again to continue job " << job_ << "\n";
        return rc;
      }
      done += chunk.size();
      progress.update(done);
      chunk.clear();
      users = 0;
    }
    return kOk;
  }

  const std::map<std::string, std::size_t>& statuses() const { return statuses_; }

 private:
  // Sends the users of CHUNK in one request and appends CHUNK's lines in input order.
  int flush(const std::vector<const bulk::Entry*>& chunk) {
    nlohmann::json users = nlohmann::json::array();
    for (const auto* e : chunk) {
      if (!e->user) continue;
      nlohmann::json u = {
          {"id", e->user->id}, {"email", e->user->email}, {"display_name", e->user->display_name}};
      if (e->user->dn) u["dn"] = *e->user->dn;
      users.push_back(std::move(u));
    }
    std::map<std::string, nlohmann::json> answers;
    const std::size_t users_sent = users.size();
    if (!users.empty()) {
      nlohmann::json body = {{"job", job_},
                             {"reissue_pending", a_.reissue_pending},
                             {"include_revoked", a_.include_revoked},
                             {"users", std::move(users)}};
      auto r = client_.post("/v1/users/bulk", body);
      // The same job sent again is answered with the same tokens: a retry enables nobody twice.
      if (!r.ok() && r.error().code == ErrorCode::kUnavailable)
        r = client_.post("/v1/users/bulk", body);
      if (!r.ok()) return fail(r.error());
      auto reply = reply_json(*r);
      if (auto* rc = std::get_if<int>(&reply)) return *rc;
      const auto& results = std::get<nlohmann::json>(reply)["results"];
      if (!results.is_array())
        return fail(
            make_error(ErrorCode::kInternal, "kmsd's answer to a bulk batch has no results"));
      for (const auto& res : results) answers.emplace(render::text(res, "id"), res);
      // Results without ids can only be matched by position, and only when none is missing.
      if (answers.size() == 1 && answers.contains("") && results.size() == users_sent)
        for (std::size_t k = 0; const auto* e : chunk)
          if (e->user) answers[e->user->id] = results[k++];
    }
    std::vector<bulk::ResultLine> lines;
    for (const auto* e : chunk) {
      if (!e->user) {
        lines.push_back({e->id, "invalid", e->problem, "", ""});
        continue;
      }
      auto it = answers.find(e->user->id);
      if (it == answers.end() || it->first.empty())
        return fail(make_error(ErrorCode::kInternal, "kmsd's answer does not name " + e->user->id +
                                                         " (line " + std::to_string(e->line) +
                                                         "); nothing of this batch was written"));
      lines.push_back(result_line(*e, it->second));
    }
    if (auto st = file_.append(lines); !st.ok()) return fail(st.error());
    for (const auto& l : lines) ++statuses_[l.status];
    return kOk;
  }

  const BulkArgs& a_;
  std::string job_;
  client::AdminClient& client_;
  bulk::ResultFile& file_;
  std::map<std::string, std::size_t> statuses_;
};

void print_summary(const BulkArgs& a, const std::string& job, std::size_t lines,
                   const bulk::ResultFile& file, const std::map<std::string, std::size_t>& now) {
  std::map<std::string, std::size_t> total = file.resumed_statuses();
  for (const auto& [s, n] : now) total[s] += n;
  std::vector<std::string> order = kStatuses;
  for (const auto& [s, n] : total)
    if (std::find(order.begin(), order.end(), s) == order.end()) order.push_back(s);
  if (a.output == "json") {
    nlohmann::json statuses = nlohmann::json::object();
    for (const auto& s : order) statuses[s] = total[s];
    nlohmann::json j = {{"job", job},
                        {"input", a.input},
                        {"out", a.out},
                        {"lines", lines},
                        {"written_before", file.resumed_lines()},
                        {"statuses", statuses}};
    std::cout << j.dump(2) << "\n";
    return;
  }
  std::cout << "bulk-enable job " << job << ": " << lines << " lines in " << a.input
            << ", results in " << a.out << " (mode 0600)\n";
  std::vector<std::vector<std::string>> rows;
  for (const auto& s : order) rows.push_back({s, std::to_string(total[s])});
  std::cout << render::table({"status", "users"}, rows);
  if (file.resumed_lines() > 0)
    std::cout << file.resumed_lines() << " of these lines were written by an earlier run of this "
              << "job and were not sent again.\n";
  if (total["issued"] > 0)
    std::cout << "Hand each token to its user over a trusted channel, then delete " << a.out
              << ".\n";
}

int run_bulk(const BulkArgs& a) {
  auto text = files::read_text(a.input);
  if (!text.ok()) return fail(text.error());
  const std::string job = bulk::job_id(*text);
  auto input = bulk::parse_input(*text);
  if (!input.ok()) return fail(input.error().context(a.input));
  for (const auto& c : input->ignored_columns)
    std::cerr << "kmsctl: note: ignoring the column '" << c << "' of " << a.input << "\n";
  auto client = connect_admin(a);
  if (!client.ok()) return fail(client.error());
  auto file = bulk::ResultFile::open(a.out, job, a.input);
  if (!file.ok()) return fail(file.error());
  BulkRun run(a, job, **client, *file);
  if (int rc = run.run(input->entries); rc != kOk) return rc;
  print_summary(a, job, input->entries.size(), *file, run.statuses());
  return kOk;
}

}  // namespace

void add_bulk_command(CLI::App* user, Commands& commands) {
  auto* cmd = user->add_subcommand(
      "bulk-enable", "enable the users of a CSV file (id,email,display_name[,dn]) in batches");
  auto& a = commands.add<BulkArgs>(cmd, run_bulk);
  cmd->add_option("--input", a.input, "CSV with a header line naming id, email, display_name[, dn]")
      ->required();
  cmd->add_option("--out", a.out,
                  "result CSV (mode 0600; an existing one of the same input is resumed)")
      ->required();
  cmd->add_flag("--reissue-pending", a.reissue_pending,
                "replace tokens issued earlier and not used yet");
  cmd->add_flag("--include-revoked", a.include_revoked, "re-enable revoked users");
  cmd->add_option("--batch", a.batch, "users per request")
      ->check(CLI::Range(1, 1000))
      ->capture_default_str();
  add_admin_options(cmd, a);
}

}  // namespace kmsd::cli

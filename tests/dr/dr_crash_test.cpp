// Crash safety of kmsctl dr predecrypt AND reencrypt at several points: each is killed with
// SIGKILL three times, each time right after the first batch that run committed (the bytes of
// the next batch may be in a pack, or an output file on disk, without rows), then run to the end,
// and at the end every message has been handled exactly once (a staged record recorded before a
// kill is never staged again: same pack, offset and digest; an output file recorded is never
// written again: same inode), none is lost, every manifest row names durable bytes whose digest
// matches, no temporary file is left, and no plaintext is on disk.
// (KmsctlPredecryptKilledWithSigkillResumes in dr_kmsctl_test kills predecrypt once at 50.)
#include <fcntl.h>
#include <signal.h>
#include <sqlite3.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <functional>

#include <nlohmann/json.hpp>

#include "tests/dr/dr_fixture.hpp"

namespace kmsd::dr::fixture {
namespace {

std::size_t count_rows(const fs::path& db_file, const char* table) {
  sqlite3* db = nullptr;
  std::size_t n = 0;
  if (sqlite3_open_v2(db_file.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK) {
    sqlite3_stmt* st = nullptr;
    const std::string sql = std::string("SELECT COUNT(*) FROM ") + table;
    if (sqlite3_prepare_v2(db, sql.c_str(), -1, &st, nullptr) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW)
      n = static_cast<std::size_t>(sqlite3_column_int64(st, 0));
    sqlite3_finalize(st);
  }
  sqlite3_close(db);
  return n;
}

// Runs ARGS and SIGKILLs it once READY() says so. True when it was killed (false: it finished
// first).
bool run_and_kill_when(const std::vector<std::string>& args, const std::function<bool()>& ready) {
  pid_t pid = ::fork();
  if (pid == 0) {
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    int devnull = ::open("/dev/null", O_WRONLY);
    ::dup2(devnull, 1);
    ::dup2(devnull, 2);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < deadline) {
    if (ready()) break;
    int status = 0;
    if (::waitpid(pid, &status, WNOHANG) == pid) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ::kill(pid, SIGKILL);
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFSIGNALED(status);
}

// Runs ARGS and SIGKILLs it once TABLE of the manifest has AT rows.
bool run_and_kill_at(const std::vector<std::string>& args, const fs::path& manifest,
                     const char* table, std::size_t at) {
  return run_and_kill_when(args, [&] { return count_rows(manifest, table) >= at; });
}

std::string shell_line(const std::vector<std::string>& args) {
  std::string cmd;
  for (const auto& a : args) cmd += "'" + a + "' ";
  return cmd;
}

TEST_F(DrTest, PredecryptAndReencryptKilledAtSeveralPointsHandleEveryMessageOnce) {
  const fs::path kmsctl = fs::path(std::getenv("KMSD_BUILD_DIR")) / "cli" / "kmsctl";
  add_encrypted(160);  // 3 users x 2 keys x 160 = 960 encrypted
  add_others();
  std::size_t encrypted = 0;
  for (const auto& [p, e] : expected) encrypted += e.status == kStaged;
  const fs::path manifest = staging / "manifest.db";
  const std::vector<std::string> pre = {kmsctl.string(),
                                        "dr",
                                        "predecrypt",
                                        "--store",
                                        store.string(),
                                        "--staging",
                                        staging.string(),
                                        "--keys",
                                        keys.string(),
                                        "--passphrase-file",
                                        (tmp.path() / "keys.pass").string(),
                                        "--custody-cert",
                                        (work / "custody.pem").string(),
                                        "--threads",
                                        "2",
                                        "--no-progress",
                                        "-o",
                                        "json"};
  // Killed as soon as its run's staging key file exists, before (or just after) its first
  // records: the KEK file is whole (written under a temporary name, then renamed without replacing), and the next
  // run stages every message not recorded, under a KEK of its own.
  ASSERT_TRUE(
      run_and_kill_when(pre, [&] { return fs::exists(staging / "keys") && !kek_runs().empty(); }));
  const auto first_kek = kek_runs();
  ASSERT_EQ(first_kek.size(), 1u);
  EXPECT_EQ(kek_of_run(*first_kek.begin()).size(), 32u);
  int kills = 0;
  // Recorded before a kill: never staged again (pack, offset, SHA-256 of the record).
  std::map<std::string, StagedCopy> staged_copies;
  for (int round = 0; round < 3; ++round) {
    // Killed right after its first commit of this run (later work may be on disk, unrecorded).
    if (run_and_kill_at(pre, manifest, "messages", count_rows(manifest, "messages") + 1)) ++kills;
    for (const auto& [path, r] : manifest_rows()) {
      if (r.status != kStaged) continue;
      // Every row's bytes are in its pack with the digest recorded, and open with the custody
      // key to the message's content.
      EXPECT_EQ(open_staged(r), expected[path].plaintext) << "row without its bytes: " << path;
      auto [it, fresh] = staged_copies.emplace(path, r.copy);
      if (!fresh) {
        EXPECT_EQ(it->second.pack, r.copy.pack) << path << " was staged twice";
        EXPECT_EQ(it->second.offset, r.copy.offset) << path << " was staged twice";
        EXPECT_EQ(it->second.sha256, r.copy.sha256) << path;
      }
    }
  }
  EXPECT_GE(kills, 2) << "predecrypt ran too fast to be killed at several points";
  std::string log;
  ASSERT_EQ(run_command(shell_line(pre) + " 2>/dev/null", &log), 0) << log;
  auto j = nlohmann::json::parse(log);
  EXPECT_EQ(j["already_done"].get<std::size_t>() + j["processed"].get<std::size_t>(),
            expected.size());
  auto rows = manifest_rows();
  ASSERT_EQ(rows.size(), expected.size());
  for (const auto& [path, e] : expected) EXPECT_EQ(rows[path].status, e.status) << path;
  for (const auto& [path, copy] : staged_copies) {
    EXPECT_EQ(rows[path].copy.pack, copy.pack) << path << " was staged again after being recorded";
    EXPECT_EQ(rows[path].copy.offset, copy.offset) << path;
  }
  // Each run appended to packs of its own (a killed run's are never appended to again), and
  // every staged row's bytes are whole.
  std::map<std::string, std::set<std::string>> runs;  // run id -> its packs
  for (const auto& p : pack_files()) runs[p.substr(0, p.rfind("-w"))].insert(p);
  EXPECT_GE(runs.size(), 2u);
  // Every run has its own KEK file (the run killed at its KEK file too, and every run that
  // wrote a pack), each opening with the custody key to 32 bytes.
  const auto kek_files = kek_runs();
  EXPECT_GE(kek_files.size(), 5u);  // the early kill, three kills, the last run
  for (const auto& [run, packs] : runs) EXPECT_TRUE(kek_files.count(run)) << run;
  for (const auto& run : kek_files) EXPECT_EQ(kek_of_run(run).size(), 32u) << run;
  for (const auto& [path, r] : rows)
    if (r.status == kStaged) {
      EXPECT_EQ(open_staged(r), expected[path].plaintext) << path;
    }

  // reencrypt, every user enrolled, killed at three points too.
  fs::create_directories(recipients);
  for (const auto& u : users)
    write_all(recipients / (u.name + ".pem"), *ossl::x509_to_pem(u.new_cert.get()));
  const std::vector<std::string> re = {kmsctl.string(),
                                       "dr",
                                       "reencrypt",
                                       "--staging",
                                       staging.string(),
                                       "--out",
                                       out.string(),
                                       "--custody-cert",
                                       (work / "custody.pem").string(),
                                       "--custody-key",
                                       (work / "custody.p12").string(),
                                       "--custody-passphrase-file",
                                       (work / "custody.pass").string(),
                                       "--recipients",
                                       recipients.string(),
                                       "--threads",
                                       "2",
                                       "--no-progress",
                                       "-o",
                                       "json"};
  kills = 0;
  std::map<std::string, ino_t> out_inodes;
  for (int round = 0; round < 3; ++round) {
    if (run_and_kill_at(re, manifest, "reencrypted", count_rows(manifest, "reencrypted") + 1))
      ++kills;
    auto m = Manifest::open(manifest);
    ASSERT_TRUE(m.ok());
    auto done = (*m)->reencrypted();
    ASSERT_TRUE(done.ok());
    for (const auto& [path, r] : *done) {
      const std::string bytes = read_all(out / path);
      ASSERT_FALSE(bytes.empty()) << "row without file " << path;
      EXPECT_EQ(ossl::hex(ossl::sha256(
                    {reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size()})),
                r.out_digest)
          << path;
      struct stat st {};
      ASSERT_EQ(::stat((out / path).c_str(), &st), 0);
      auto [it, fresh] = out_inodes.emplace(path, st.st_ino);
      if (!fresh) {
        EXPECT_EQ(it->second, st.st_ino) << path << " was re-encrypted twice";
      }
    }
  }
  EXPECT_GE(kills, 2) << "reencrypt ran too fast to be killed at several points";
  std::string log_re;
  ASSERT_EQ(run_command(shell_line(re) + " 2>/dev/null", &log_re), 0) << log_re;
  j = nlohmann::json::parse(log_re);
  EXPECT_EQ(j["already_done"].get<std::size_t>() + j["processed"].get<std::size_t>(), encrypted);
  auto m = Manifest::open(manifest);
  ASSERT_TRUE(m.ok());
  auto done = (*m)->reencrypted();
  ASSERT_TRUE(done.ok());
  EXPECT_EQ(done->size(), encrypted);
  for (const auto& [path, ino] : out_inodes) {
    struct stat st {};
    ASSERT_EQ(::stat((out / path).c_str(), &st), 0);
    EXPECT_EQ(st.st_ino, ino) << path << " was re-encrypted again after being recorded";
  }
  // Every message opens with its user's new key to its original content.
  for (const auto& [path, e] : expected) {
    if (e.status != kStaged) continue;
    const std::string bytes = read_all(out / path);
    auto parsed = parse_message({reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size()},
                                e.format == "der" ? Format::kDer : Format::kMime);
    ASSERT_EQ(parsed.kind, Kind::kEncrypted) << path;
    const User* u = nullptr;
    for (const auto& c : users)
      if (c.name == e.user) u = &c;
    ASSERT_NE(u, nullptr) << e.user;
    auto plain = decrypt(parsed.cms.get(), u->new_key.get(), u->new_cert.get());
    ASSERT_TRUE(plain.ok()) << path << ": " << plain.error().message;
    char* p = nullptr;
    const long n = BIO_get_mem_data(plain->get(), &p);
    EXPECT_EQ(std::string(p, static_cast<std::size_t>(n)), e.plaintext) << path;
  }
  for (const auto& dir : {staging, out})
    for (const auto& f : fs::recursive_directory_iterator(dir))
      EXPECT_EQ(f.path().filename().string().find(".dr-tmp-"), std::string::npos) << f.path();
  expect_no_plaintext_on_disk();
}

}  // namespace
}  // namespace kmsd::dr::fixture

#include "daemon/dr/pipeline.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <fstream>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include "common/fd.hpp"
#include "common/files.hpp"
#include "daemon/dr/message.hpp"
#include "daemon/dr/pack.hpp"

namespace kmsd::dr {

namespace fs = std::filesystem;

namespace {

using Clock = std::chrono::steady_clock;

using files::io_error;
using files::sync_dir;

// A regular file is read in one read() of its size (the end-of-file read that would follow is
// one system call per message saved); anything else, or a file that grew, until read() says 0.
Result<ossl::Bytes> read_file(const fs::path& p) {
  UniqueFd fd(::open(p.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  if (!fd.valid()) return io_error(p, "cannot open");
  struct stat st {};
  const bool regular = ::fstat(fd.get(), &st) == 0 && S_ISREG(st.st_mode);
  const std::size_t size = regular ? static_cast<std::size_t>(st.st_size) : 0;
  ossl::Bytes out(std::max<std::size_t>(size + 1, 4096));  // room for a byte more than its size
  std::size_t have = 0;
  for (;;) {
    if (have == out.size()) out.resize(out.size() * 2);
    const ssize_t n = ::read(fd.get(), out.data() + have, out.size() - have);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return io_error(p, "cannot read");
    if (n == 0) break;
    have += static_cast<std::size_t>(n);
    if (regular && have == size) break;  // asked for more than its size: this is all of it
  }
  out.resize(have);
  return out;
}

Status make_dirs(const fs::path& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (!fs::is_directory(dir))
    return make_error(ErrorCode::kIo, "cannot create " + dir.string() + ": " + ec.message());
  return {};
}

// Writes DATA to PATH through a temporary file in the same directory and a rename, mode 0600.
// Not fsynced here: the collector syncs the file system before it commits the rows.
// The directory is made only when the file cannot be created for want of it: on this path every
// system call counts (creating a file costs about as much as the message's decryption), and
// checking the directory first for every message cost two stat calls each.
Status write_replace(const fs::path& path, std::string_view data) {
  std::ostringstream tmp_name;
  tmp_name << "." << path.filename().string() << ".dr-tmp-" << std::this_thread::get_id();
  const fs::path tmp = path.parent_path() / tmp_name.str();
  constexpr int kFlags = O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW;
  UniqueFd fd(::open(tmp.c_str(), kFlags, 0600));
  if (!fd.valid() && errno == ENOENT) {
    KMSD_TRY(make_dirs(path.parent_path()));
    fd = UniqueFd(::open(tmp.c_str(), kFlags, 0600));
  }
  if (!fd.valid()) return io_error(tmp, "cannot create");
  for (std::size_t done = 0; done < data.size();) {
    ssize_t n = ::write(fd.get(), data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      auto err = io_error(tmp, "cannot write");
      ::unlink(tmp.c_str());
      return err;
    }
    done += static_cast<std::size_t>(n);
  }
  fd.reset();
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    auto err = io_error(path, "cannot rename into place");
    ::unlink(tmp.c_str());
    return err;
  }
  return {};
}

// Temporary files a killed run left behind (never plaintext: only encrypted output).
void remove_leftovers(const fs::path& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return;
  std::vector<fs::path> gone;
  for (auto it = fs::recursive_directory_iterator(dir, ec); !ec && it != fs::end(it);
       it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.size() > 1 && name.front() == '.' && name.find(".dr-tmp-") != std::string::npos)
      gone.push_back(it->path());
  }
  for (const auto& p : gone) fs::remove(p, ec);
}

Status sync_dir_fs(const fs::path& dir) {
  UniqueFd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd.valid() || ::syncfs(fd.get()) != 0) return io_error(dir, "cannot sync");
  return {};
}

bool inside(const fs::path& child, const fs::path& parent) {
  std::error_code ec;
  auto c = fs::weakly_canonical(child, ec);
  auto p = fs::weakly_canonical(parent, ec);
  auto rel = c.lexically_relative(p);
  return !rel.empty() && *rel.begin() != "..";
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::string cur;
  std::istringstream in(s);
  while (std::getline(in, cur, sep))
    if (!cur.empty()) out.push_back(cur);
  return out;
}

template <typename T>
std::string join(const T& items, const char* sep) {
  std::string out;
  for (const auto& i : items) {
    if (!out.empty()) out += sep;
    out += i;
  }
  return out;
}

// One worker's verdict on one item.
struct Outcome {
  bool skip = false;  // recorded by an earlier run
  bool record = true;
  ManifestRow row;
  ReencryptRow re;
};

// The number of workers run_pool() starts for THREADS (0: one per core) and TOTAL items.
unsigned pool_size(unsigned threads, std::size_t total) {
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
  return static_cast<unsigned>(std::min<std::size_t>(threads, std::max<std::size_t>(1, total)));
}

// Runs WORK over the items SOURCE yields (TOTAL of them, for progress) on pool_size() workers,
// each calling WORK with its index. A feeder thread pulls from SOURCE into a bounded queue; the
// workers take from it; the calling thread collects the outcomes into batches and commits each
// (COMMIT) after SYNC has made what the workers wrote durable. Both queues are bounded, so
// memory does not grow with the store.
template <typename Item>
Result<RunSummary> run_pool(const std::function<Result<std::optional<Item>>()>& source,
                            std::size_t total, unsigned threads,
                            const std::function<Outcome(const Item&, unsigned)>& work,
                            const std::function<Status(std::vector<Outcome>&)>& commit,
                            const std::function<Status()>& sync, const ProgressFn& progress,
                            std::size_t stop_after) {
  RunSummary summary;
  summary.total = total;
  const auto start = Clock::now();
  threads = pool_size(threads, total);
  // Outcomes are small (a manifest row, never a message), so the queue can hold what the
  // workers produce while the collector waits for a file-system sync and a durable commit
  // (hundreds of ms on a busy disk) without the workers stalling. Still a constant: memory
  // does not grow with the store.
  const std::size_t capacity = std::max<std::size_t>(2048, 64 * threads);
  const std::size_t in_capacity = 16 + 4 * static_cast<std::size_t>(threads);
  // Rows per commit. Threads are woken only when there is a reason: the collector when a
  // commit's worth of rows waits (or at its 100 ms tick), the feeder when its queue is half
  // empty, a worker when it waits for an item. Waking a thread per message cost a futex call
  // and a context switch each, ~10 % of the run's CPU on this kind of VM.
  constexpr std::size_t kCommitRows = 256;

  std::mutex mu;
  std::condition_variable not_full, not_empty, in_not_full, in_not_empty;
  std::deque<Item> in;
  bool fed_all = false;
  Status feed_failure;
  std::deque<Outcome> queue;
  std::atomic<bool> stop{false};
  std::size_t finished_workers = 0;
  std::size_t workers_waiting = 0;
  bool feeder_waiting = false;
  bool collector_waiting = false;

  std::thread feeder([&] {
    for (;;) {
      Result<std::optional<Item>> item = make_error(ErrorCode::kInternal, "unset");
      try {
        item = source();
      } catch (const std::exception& e) {
        item = make_error(ErrorCode::kInternal, std::string("internal error: ") + e.what());
      }
      std::unique_lock lock(mu);
      if (!item.ok() || !item->has_value() || stop.load()) {
        if (!item.ok()) feed_failure = item.error();
        fed_all = true;
        in_not_empty.notify_all();
        return;
      }
      if (in.size() >= in_capacity) {
        feeder_waiting = true;
        in_not_full.wait(lock, [&] { return in.size() <= in_capacity / 2 || stop.load(); });
        feeder_waiting = false;
      }
      if (stop.load()) {
        fed_all = true;
        in_not_empty.notify_all();
        return;
      }
      in.push_back(std::move(**item));
      if (workers_waiting > 0) in_not_empty.notify_one();
    }
  });

  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      for (;;) {
        std::optional<Item> item;
        {
          std::unique_lock lock(mu);
          if (in.empty() && !fed_all && !stop.load()) {
            ++workers_waiting;
            in_not_empty.wait(lock, [&] { return !in.empty() || fed_all || stop.load(); });
            --workers_waiting;
          }
          if (stop.load() || in.empty()) break;
          item.emplace(std::move(in.front()));
          in.pop_front();
          if (feeder_waiting && in.size() <= in_capacity / 2) in_not_full.notify_one();
        }
        Outcome o;
        try {
          o = work(*item, t);
        } catch (const std::exception& e) {
          o.row.status = kFailed;
          o.row.reason = std::string("internal error: ") + e.what();
        }
        std::unique_lock lock(mu);
        not_full.wait(lock, [&] { return queue.size() < capacity || stop.load(); });
        if (stop.load()) break;
        queue.push_back(std::move(o));
        if (collector_waiting &&
            (queue.size() >= kCommitRows || (stop_after != 0 && queue.size() >= stop_after)))
          not_empty.notify_one();
      }
      std::lock_guard lock(mu);
      ++finished_workers;
      not_empty.notify_one();
    });
  }

  Status failure;
  std::vector<Outcome> batch;
  auto last_commit = Clock::now();
  auto last_progress = Clock::now() - std::chrono::seconds(1);
  std::size_t done = 0;
  auto flush = [&]() -> Status {
    if (batch.empty()) return {};
    const bool any_record = std::any_of(batch.begin(), batch.end(),
                                        [](const Outcome& o) { return !o.skip && o.record; });
    if (any_record) KMSD_TRY(sync());
    KMSD_TRY(commit(batch));
    for (auto& o : batch) {
      ++done;
      if (o.skip) {
        ++summary.already_done;
        continue;
      }
      ++summary.processed;
      const std::string& status =
          o.record && !o.re.path.empty() ? std::string(kReencrypted) : o.row.status;
      ++summary.this_run[status];
      if (status == kWaiting) {
        ++summary.waiting[o.row.reason];
      } else if (status != kStaged && status != kReencrypted && status != kNotEncrypted) {
        if (summary.problems.size() < kProblemsKept)
          summary.problems.push_back(std::move(o.row));
        else
          ++summary.problems_omitted;
      }
    }
    batch.clear();
    last_commit = Clock::now();
    return {};
  };
  for (;;) {
    std::unique_lock lock(mu);
    collector_waiting = true;
    not_empty.wait_for(lock, std::chrono::milliseconds(100), [&] {
      return queue.size() >= kCommitRows || finished_workers == threads ||
             (stop_after != 0 && done + queue.size() >= stop_after);
    });
    collector_waiting = false;
    const bool all_done = queue.empty() && finished_workers == threads;
    while (!queue.empty()) {
      if (stop_after != 0 && done + batch.size() >= stop_after) break;
      batch.push_back(std::move(queue.front()));
      queue.pop_front();
    }
    not_full.notify_all();
    lock.unlock();
    const bool limit = stop_after != 0 && done + batch.size() >= stop_after;
    if (all_done || limit || batch.size() >= kCommitRows ||
        Clock::now() - last_commit > std::chrono::milliseconds(200)) {
      if (auto st = flush(); !st.ok()) {
        failure = st;
        break;
      }
    }
    if (progress && (Clock::now() - last_progress > std::chrono::milliseconds(100) || all_done)) {
      last_progress = Clock::now();
      progress({done, std::max(total, done),
                std::chrono::duration<double>(Clock::now() - start).count()});
    }
    if (limit) {
      summary.stopped_early = true;
      break;
    }
    if (all_done) break;
  }
  {
    std::lock_guard lock(mu);
    stop.store(true);
  }
  not_full.notify_all();
  in_not_full.notify_all();
  in_not_empty.notify_all();
  for (auto& t : pool) t.join();
  feeder.join();
  summary.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (!failure.ok()) return failure.error();
  if (!feed_failure.ok()) return feed_failure.error();
  return summary;
}

}  // namespace

namespace {

// Encrypts a message's content (the BIO, consumed) for staging.
using SealFn = std::function<Result<CmsPtr>(BIO*)>;

Rewrapped rewrap_sealing(const FindKey& find, CMS_ContentInfo* cms,
                         const std::vector<std::string>& recipients, const SealFn& seal,
                         const char* sealing) {
  Rewrapped out;
  const KeyRing::Entry* chosen = nullptr;
  std::set<std::string> users;
  for (const auto& id : recipients) {
    if (const auto* e = find(id)) {
      users.insert(e->user);
      if (chosen == nullptr) chosen = e;
    }
  }
  if (chosen == nullptr) {
    out.status = kUnknownRecipient;
    out.reason = recipients.empty()
                     ? "encrypted to no certificate (password or KEK recipients only)"
                     : "no key among the key sources for " + join(recipients, ", ");
    return out;
  }
  out.users = join(users, ",");
  auto content = decrypt(cms, chosen->pair.key.get(), chosen->pair.cert.get());
  if (!content.ok()) {
    out.status = kFailed;
    out.reason = "cannot decrypt with " + chosen->user + "'s key '" + chosen->pair.friendly_name +
                 "': " + content.error().message;
    return out;
  }
  auto custody = seal(content->get());
  content->reset();  // the plaintext buffer is cleansed as it is freed
  if (!custody.ok()) {
    out.status = kFailed;
    out.reason = std::string("cannot ") + sealing + ": " + custody.error().message;
    return out;
  }
  out.status = kStaged;
  out.cms = std::move(*custody);
  return out;
}

}  // namespace

Rewrapped rewrap_with(const FindKey& find, CMS_ContentInfo* cms,
                      const std::vector<std::string>& recipients, X509* custody_cert) {
  return rewrap_sealing(
      find, cms, recipients,
      [custody_cert](BIO* content) { return encrypt(content, {custody_cert}); },
      "encrypt to the custody certificate");
}

Rewrapped rewrap_with(const FindKey& find, CMS_ContentInfo* cms,
                      const std::vector<std::string>& recipients, const StagingKey& key) {
  return rewrap_sealing(
      find, cms, recipients, [&key](BIO* content) { return key.seal(content); },
      "seal under the run's staging key");
}

Rewrapped KeySource::rewrap_sealed(CMS_ContentInfo*, const std::vector<std::string>&,
                                   const StagingKey&) const {
  Rewrapped out;
  out.status = kFailed;
  out.reason = "internal error: this key source cannot seal under a staging key";
  return out;
}

Result<RunSummary> predecrypt(const PredecryptOptions& o) {
  if ((o.keys == nullptr && o.source == nullptr) || o.custody_cert == nullptr)
    return make_error(ErrorCode::kInvalidArgument,
                      "predecrypt needs keys and a custody certificate");
  std::optional<KeyRingSource> ring_source;
  if (o.source == nullptr) ring_source.emplace(*o.keys);
  const KeySource& source = o.source != nullptr ? *o.source : *ring_source;
  if (inside(o.staging, o.store) || inside(o.store, o.staging))
    return make_error(ErrorCode::kInvalidArgument,
                      "the staging directory and the store must not contain each other");
  // A first walk only counts (for the progress bar); the second feeds the workers.
  std::size_t total = 0;
  {
    KMSD_ASSIGN_OR_RETURN(auto counter, MessageWalker::open(o.store));
    for (;;) {
      KMSD_ASSIGN_OR_RETURN(auto m, counter.next());
      if (!m) break;
      ++total;
    }
  }
  KMSD_ASSIGN_OR_RETURN(auto walker, MessageWalker::open(o.store));
  KMSD_TRY(make_dirs(o.staging));
  ::chmod(o.staging.c_str(), 0700);
  KMSD_ASSIGN_OR_RETURN(auto manifest, Manifest::open(o.staging / "manifest.db"));
  const fs::path packs = packs_dir(o.staging);
  if (!fs::is_directory(packs)) {
    KMSD_TRY(make_dirs(packs));
    ::chmod(packs.c_str(), 0700);
    KMSD_TRY(sync_dir(o.staging));  // packs/ stays once a row names a pack in it
  }
  KMSD_TRY(manifest->bind("store", fs::weakly_canonical(o.store).string(), "the store"));
  KMSD_TRY(manifest->bind("custody_certificate", ossl::sha256_fingerprint(o.custody_cert),
                          "the custody certificate"));
  KMSD_ASSIGN_OR_RETURN(auto reader, ManifestReader::open(o.staging / "manifest.db"));
  // A first run has nothing recorded, and a run meets each path once: no message needs looking
  // up (a lookup is a read transaction on the manifest, under the reader's lock).
  KMSD_ASSIGN_OR_RETURN(const auto recorded_before, manifest->counts());
  const bool first_run = recorded_before.empty();
  // One pack per worker, named for this run: appends need no lock, and no run appends to a pack
  // an earlier (perhaps killed) run wrote.
  const std::string run_id = new_run_id();
  // The run's staging key, stored (encrypted to the custody certificate) before any pack of the
  // run exists: a record sealed under it always has its KEK file on disk.
  std::optional<StagingKey> staging_key;
  if (source.can_seal() && !o.per_message_custody) {
    remove_staging_key_leftovers(o.staging);
    KMSD_ASSIGN_OR_RETURN(auto key, StagingKey::generate(run_id));
    KMSD_TRY(key.store(o.staging, o.custody_cert));
    staging_key.emplace(std::move(key));
  }
  std::vector<std::unique_ptr<PackWriter>> writers;
  for (unsigned w = 0; w < pool_size(o.threads, total); ++w)
    writers.push_back(
        std::make_unique<PackWriter>(packs, run_id + "-w" + std::to_string(w) + ".pack"));

  std::function<Outcome(const StoredMessage&, unsigned)> work = [&](const StoredMessage& m,
                                                                    unsigned worker) {
    Outcome out;
    ManifestRow& row = out.row;
    row.path = m.relative.string();
    row.format = to_string(m.format);
    auto bytes = read_file(o.store / m.relative);
    if (!bytes.ok()) {
      row.status = kFailed;
      row.reason = bytes.error().message;
      return out;
    }
    row.digest = ossl::hex(ossl::sha256(*bytes));
    if (!first_run) {
      auto recorded = reader->lookup(row.path);
      if (!recorded.ok()) {
        row.status = kFailed;
        row.reason = recorded.error().message;
        return out;
      }
      if (*recorded && (*recorded)->first == row.digest && (*recorded)->second != kFailed &&
          (*recorded)->second != kUnknownRecipient) {
        out.skip = true;
        return out;
      }
    }
    ParsedMessage parsed = parse_message(*bytes, m.format);
    if (parsed.kind != Kind::kEncrypted) {
      row.status = parsed.kind == Kind::kDamaged ? kDamaged : kNotEncrypted;
      row.reason = parsed.what;
      return out;
    }
    row.recipients = join(parsed.recipients, "\n");
    Rewrapped custody =
        staging_key ? source.rewrap_sealed(parsed.cms.get(), parsed.recipients, *staging_key)
                    : source.rewrap(parsed.cms.get(), parsed.recipients, o.custody_cert);
    row.users = custody.users;
    if (custody.status != kStaged) {
      row.status = custody.status;
      row.reason = custody.reason;
      return out;
    }
    // The staged record: the message's own header lines, then the DER (pack.hpp).
    auto record = encode(custody.cms.get(), Format::kDer, parsed.headers, parsed.crlf);
    if (!record.ok()) {
      row.status = kFailed;
      row.reason = record.error().message;
      return out;
    }
    PackWriter& pack = *writers.at(worker);
    auto offset = pack.append(*record);
    if (!offset.ok()) {
      row.status = kFailed;
      row.reason = offset.error().message;
      return out;
    }
    row.copy.pack = pack.name();
    row.copy.offset = *offset;
    row.copy.length = record->size();
    row.copy.header_length = parsed.headers.size();
    row.copy.crlf = parsed.crlf;
    row.copy.sha256 = ossl::hex(
        ossl::sha256({reinterpret_cast<const std::uint8_t*>(record->data()), record->size()}));
    row.status = kStaged;
    return out;
  };
  std::function<Status(std::vector<Outcome>&)> commit = [&](std::vector<Outcome>& batch) {
    std::vector<ManifestRow> rows;
    for (const auto& b : batch)
      if (!b.skip) rows.push_back(b.row);
    return manifest->record(rows);
  };
  std::function<Result<std::optional<StoredMessage>>()> next = [&] { return walker.next(); };
  std::function<Status()> sync = [&]() -> Status {
    for (auto& w : writers) KMSD_TRY(w->sync());
    return {};
  };
  KMSD_ASSIGN_OR_RETURN(
      auto summary, run_pool(next, total, o.threads, work, commit, sync, o.progress, o.stop_after));
  KMSD_ASSIGN_OR_RETURN(summary.overall, manifest->counts());
  return summary;
}

Result<RunSummary> reencrypt(const ReencryptOptions& o) {
  if (o.custody_key == nullptr || o.custody_cert == nullptr)
    return make_error(ErrorCode::kInvalidArgument,
                      "reencrypt needs the custody key and certificate");
  if (!fs::exists(o.staging / "manifest.db"))
    return make_error(ErrorCode::kInvalidArgument,
                      o.staging.string() + " has no manifest.db: run `kmsctl dr predecrypt` first");
  if (inside(o.out, o.staging) || inside(o.staging, o.out))
    return make_error(ErrorCode::kInvalidArgument,
                      "--out and the staging directory must not contain each other");
  KMSD_ASSIGN_OR_RETURN(auto manifest, Manifest::open(o.staging / "manifest.db"));
  KMSD_ASSIGN_OR_RETURN(auto bound, manifest->setting("custody_certificate"));
  if (bound != ossl::sha256_fingerprint(o.custody_cert))
    return make_error(ErrorCode::kFailedPrecondition,
                      "the staged messages are encrypted to the custody certificate " + bound +
                          ", not to " + ossl::sha256_fingerprint(o.custody_cert));
  KMSD_TRY(make_dirs(o.out));
  ::chmod(o.out.c_str(), 0700);
  remove_leftovers(o.out);
  KMSD_ASSIGN_OR_RETURN(const auto counts, manifest->counts());
  const std::size_t staged = counts.count(kStaged) != 0 ? counts.at(kStaged) : 0;
  KMSD_ASSIGN_OR_RETURN(auto reader, ManifestReader::open(o.staging / "manifest.db"));
  PackReader packs(o.staging);
  StagingKeyCache keks(o.staging, o.custody_key, o.custody_cert);

  // Staged rows in path order, a page at a time.
  std::deque<ManifestReader::StagedRow> page;
  std::string after;
  bool last_page = false;
  std::function<Result<std::optional<ManifestReader::StagedRow>>()> next =
      [&]() -> Result<std::optional<ManifestReader::StagedRow>> {
    if (page.empty() && !last_page) {
      constexpr std::size_t kPage = 512;
      KMSD_ASSIGN_OR_RETURN(auto rows, reader->staged_after(after, kPage));
      last_page = rows.size() < kPage;
      if (!rows.empty()) after = rows.back().row.path;
      for (auto& r : rows) page.push_back(std::move(r));
    }
    if (page.empty()) return std::optional<ManifestReader::StagedRow>();
    auto r = std::move(page.front());
    page.pop_front();
    return std::optional<ManifestReader::StagedRow>(std::move(r));
  };

  std::function<Outcome(const ManifestReader::StagedRow&, unsigned)> work =
      [&](const ManifestReader::StagedRow& staged_row, unsigned) {
        const ManifestRow& r = staged_row.row;
        Outcome out;
        out.row = r;
        if (staged_row.reencrypted) {
          out.skip = true;
          return out;
        }
        std::vector<X509*> to;
        std::vector<std::string> missing;
        for (const auto& user : split(r.users, ',')) {
          auto it = o.new_certs.find(user);
          if (it == o.new_certs.end())
            missing.push_back(user);
          else
            to.push_back(it->second);
        }
        out.record = false;
        if (to.empty() || !missing.empty()) {
          out.row.status = kWaiting;
          out.row.reason = "no new encryption certificate yet for " + join(missing, ", ");
          return out;
        }
        auto fail = [&](const std::string& why) {
          out.row.status = kFailed;
          out.row.reason = why;
          return out;
        };
        auto format = parse_format(r.format);
        if (!format.ok()) return fail(format.error().message);
        auto bytes = packs.read(r);  // checked against the SHA-256 recorded
        if (!bytes.ok()) return fail(bytes.error().message);
        const std::size_t header_length =
            static_cast<std::size_t>(std::min<std::uint64_t>(r.copy.header_length, bytes->size()));
        const std::string headers(reinterpret_cast<const char*>(bytes->data()), header_length);
        ParsedMessage parsed = parse_message(
            std::span<const std::uint8_t>(*bytes).subspan(header_length), Format::kDer);
        if (parsed.kind != Kind::kEncrypted)
          return fail("the staged copy in packs/" + r.copy.pack + " at offset " +
                      std::to_string(r.copy.offset) + " is " + parsed.what);
        Result<ossl::BioPtr> content = make_error(ErrorCode::kInternal, "unset");
        if (sealed_under_kek(parsed.cms.get())) {
          // Sealed under its run's staging key: the run is in the pack's name.
          const std::string run = run_of_pack(r.copy.pack);
          if (run.empty())
            return fail("the staged copy in packs/" + r.copy.pack +
                        " is sealed under a staging key, but the pack's name names no run");
          auto kek = keks.get(run);
          if (!kek.ok()) return fail(kek.error().message);
          content = (*kek)->open(parsed.cms.get());
          if (!content.ok())
            return fail("cannot open the staged copy in packs/" + r.copy.pack + " at offset " +
                        std::to_string(r.copy.offset) + " with run " + run +
                        "'s staging key: " + content.error().message);
        } else {
          // Encrypted to the custody certificate (earlier versions, the daemon key source).
          content = decrypt(parsed.cms.get(), o.custody_key, o.custody_cert);
          if (!content.ok())
            return fail("cannot decrypt the staged copy with the custody key: " +
                        content.error().message);
        }
        auto cms = encrypt(content->get(), to);
        content->reset();
        if (!cms.ok())
          return fail("cannot encrypt to the new certificates: " + cms.error().message);
        auto text = encode(cms->get(), *format, headers, r.copy.crlf);
        if (!text.ok()) return fail(text.error().message);
        if (auto st = write_replace(o.out / r.path, *text); !st.ok())
          return fail(st.error().message);
        out.record = true;
        out.re.path = r.path;
        out.re.users = r.users;
        out.re.out_digest = ossl::hex(
            ossl::sha256({reinterpret_cast<const std::uint8_t*>(text->data()), text->size()}));
        return out;
      };
  std::function<Status(std::vector<Outcome>&)> commit = [&](std::vector<Outcome>& batch) {
    std::vector<ReencryptRow> rows;
    for (const auto& b : batch)
      if (!b.skip && b.record) rows.push_back(b.re);
    return manifest->record_reencrypted(rows);
  };
  std::function<Status()> sync = [&] { return sync_dir_fs(o.out); };
  KMSD_ASSIGN_OR_RETURN(auto summary, run_pool(next, staged, o.threads, work, commit, sync,
                                               o.progress, o.stop_after));
  KMSD_ASSIGN_OR_RETURN(const auto now_done, manifest->reencrypted_count());
  summary.overall = {{kStaged, staged}, {kReencrypted, now_done}};
  return summary;
}

}  // namespace kmsd::dr

// Master-key rotation (issue 7): `kmsctl master-key rotate` (approval-gated) creates master key
// v(N+1) on the token, makes it the version new records are sealed under, and re-wraps every
// sealed record in the background: escrowed keys (key_history) first, then enrollment tokens.
// Only the protected data keys change (hsm/envelope.hpp, format 2); the payloads stay as they
// are, except format-1 records, which are opened and sealed again once.
//
// Batches of B records: the token work outside the store's lock, then one store transaction
// that swaps each row (compare-and-swap on the old blob) and moves the persisted cursor. A
// crash (SIGKILL) loses at most the batch in flight; the job resumes from the cursor when
// kmsd is unsealed again. Reads work throughout: open() accepts every version still on the
// token. A token outage (or a sealed daemon) pauses the job; it goes on when the token serves.
// When a pass ends, the records still under an old version (sealed by enrollments that began
// before the rotation) are swept by another pass; at most kMaxPasses passes.
//
// `kmsctl master-key retire N` destroys master key vN (and its MAC key) on the token only when
// no rotation runs, N is not the current version and no key-history row and no enrollment
// token is sealed under it; otherwise it is refused naming how many records still need it.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/result.hpp"
#include "daemon/approvals/approvals.hpp"
#include "daemon/audit/audit_log.hpp"
#include "daemon/store/store.hpp"
#include "hsm/token.hpp"

namespace kmsd::rotation {

inline constexpr const char* kRotateOperation = "master_key_rotate";
inline constexpr const char* kRetireOperation = "master_key_retire";
// The persisted job (JSON) in the store's settings.
inline constexpr const char* kSettingRotation = "master_key_rotation";
inline constexpr std::size_t kDefaultBatch = 100;
inline constexpr std::size_t kMaxBatch = 10000;
inline constexpr int kMaxPasses = 3;

// How fast the job goes: B records per transaction, PAUSE between batches (0: none). Given
// with the rotate request and kept with the job, so a resumed job keeps its pace.
struct Pace {
  std::size_t batch = kDefaultBatch;
  std::chrono::milliseconds pause{0};
};

// Thread-safety: every public method may be called from any thread; the job runs on one
// thread of its own between start() and stop().
class Rotation {
 public:
  // SERVING: true while kmsd is unsealed (the job and the gated operations need the token).
  Rotation(store::Store& store, hsm::Token& token, audit::AuditLog& audit,
           approvals::Approvals& approvals, std::function<bool()> serving);
  ~Rotation();
  Rotation(const Rotation&) = delete;
  Rotation& operator=(const Rotation&) = delete;

  // Starts the background job thread (it resumes an unfinished rotation once serving).
  void start();
  // Stops it after the batch in flight (its transaction commits or rolls back whole).
  void stop();

  // Submits the gated rotation request (k: [approvals.required] master_key_rotate).
  Result<approvals::Outcome> request_rotate(const Pace& pace, const std::string& requester);
  // Checks retire's preconditions (the refusal a request would meet), then submits it.
  Result<approvals::Outcome> request_retire(std::uint32_t version, const std::string& requester);
  // kFailedPrecondition naming what still needs master key VERSION; kNotFound when it is not
  // on the token; ok when it may be destroyed now.
  Status check_retire(std::uint32_t version);

  // The job and the master keys as an operator wants them: state ("idle", "running",
  // "paused", "finished"), target, phase, done/total, rate per second, the versions on the
  // token and how many escrowed keys each protects.
  Result<nlohmann::json> status();

 private:
  Result<nlohmann::json> begin(const nlohmann::json& params, const std::string& by);
  Result<nlohmann::json> retire(const nlohmann::json& params, const std::string& by);
  Result<std::optional<nlohmann::json>> load();
  // One batch of the running job STATE (updated and stored). Errors other than a record that
  // does not open (skipped and counted) pause the job.
  Status step(nlohmann::json& state);
  void run();

  store::Store& store_;
  hsm::Token& token_;
  audit::AuditLog& audit_;
  approvals::Approvals& approvals_;
  std::function<bool()> serving_;

  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  bool kick_ = false;
  std::thread thread_;
  // In-memory figures of this process's run of the job (not persisted).
  std::string paused_;  // why the job waits, "" while it works
  std::uint64_t session_done_ = 0;
  std::chrono::steady_clock::time_point session_start_{};
  bool session_started_ = false;
  bool resumed_logged_ = false;
};

}  // namespace kmsd::rotation

// Fault-injecting PKCS#11 module for tests: a shim that forwards every call to a real module
// (SoftHSM2) and, on command, fails or delays calls the way a flaky or unplugged HSM would.
// kmsd loads it like any module (token.module = path of this .so); see README.md, "When the token
// misbehaves".
//
// Environment (read by the process that loads the shim):
//   KMSD_FAULTSHIM_MODULE    the real module (default /usr/lib/softhsm/libsofthsm2.so)
//   KMSD_FAULTSHIM_CONTROL   control file; re-read when its inode, size or mtime changes (one
//                            stat() per call), so a test changes faults by rewriting it
//   KMSD_FAULTSHIM_FAULT     fault while no control file exists (same words as `fault =`)
//   KMSD_FAULTSHIM_DELAY_MS  delay while no control file exists
//   KMSD_FAULTSHIM_STATS     file rewritten after every injected fault or delay and every
//                            session opened or closed, with "injected N\ndelayed M\n
//                            open_sessions S\n" (so a test can see the shim was hit, and count
//                            the sessions open on the real token through the shim)
//   KMSD_FAULTSHIM_HIDE_MECHANISMS  hide_mechanisms while no control file exists
//
// Control file: "key = value" lines, '#' starts a comment, unknown keys are ignored.
//   fault     = none | device-removed | session-invalid | device-error | not-logged-in |
//               pin-incorrect | pin-locked
//   delay_ms  = N      sleep N ms before forwarding each matching call
//   functions = C_Sign,C_Login   only these functions are failed / delayed (default: all but
//                                C_Initialize, C_Finalize, C_GetInfo, C_GetFunctionList)
//   count     = N      fail at most N calls, then pass calls through again (0: no limit)
//   hide_mechanisms = CKM_AES_KEY_WRAP_PAD,CKM_AES_GCM   mechanisms the token pretends not to
//                      have (also CKM_AES_KEY_WRAP, CKM_AES_CBC_PAD, CKM_SHA256_HMAC, 0x hex):
//                      left out of C_GetMechanismList; CKR_MECHANISM_INVALID from
//                      C_GetMechanismInfo and from C_EncryptInit, C_DecryptInit, C_SignInit,
//                      C_WrapKey, C_UnwrapKey with them (a token without key wrap, like
//                      tpm2-pkcs11)
//
// What each fault does, on every matching call while it is in force:
//   device-removed   all sessions are really closed (C_CloseAllSessions, once, when the fault
//                    starts: the login is gone too); slots report no token; session calls
//                    return CKR_DEVICE_REMOVED, slot calls CKR_TOKEN_NOT_PRESENT
//   session-invalid  session calls return CKR_SESSION_HANDLE_INVALID, and the session they
//                    named is really closed (a token that says so has no such session)
//   device-error     slot and session calls return CKR_DEVICE_ERROR; the sessions are really
//                    closed when the fault starts (an erring device loses its state; the slot
//                    still shows the token)
//   not-logged-in    the token is really logged out (once, when the fault starts); calls that
//                    need a login return CKR_USER_NOT_LOGGED_IN, C_GetSessionInfo reports a
//                    public session
//   pin-incorrect    the token is really logged out (once); C_Login returns CKR_PIN_INCORRECT
//   pin-locked       the token is really logged out (once); C_Login returns CKR_PIN_LOCKED and
//                    C_GetTokenInfo sets CKF_USER_PIN_LOCKED
#include <dlfcn.h>
#include <fcntl.h>
#include <p11-kit/pkcs11.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
#include <set>
#include <shared_mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

enum class Fault {
  kNone,
  kDeviceRemoved,
  kSessionInvalid,
  kDeviceError,
  kNotLoggedIn,
  kPinIncorrect,
  kPinLocked
};

Fault parse_fault(const std::string& s) {
  if (s == "device-removed") return Fault::kDeviceRemoved;
  if (s == "session-invalid") return Fault::kSessionInvalid;
  if (s == "device-error") return Fault::kDeviceError;
  if (s == "not-logged-in") return Fault::kNotLoggedIn;
  if (s == "pin-incorrect") return Fault::kPinIncorrect;
  if (s == "pin-locked") return Fault::kPinLocked;
  return Fault::kNone;
}

struct Plan {
  Fault fault = Fault::kNone;
  unsigned delay_ms = 0;
  std::set<std::string> functions;     // empty: all
  unsigned long count = 0;             // 0: unlimited
  std::set<CK_MECHANISM_TYPE> hidden;  // mechanisms the token pretends not to have
  std::uint64_t generation = 0;        // bumped on every change
  bool matches(const char* fn) const { return functions.empty() || functions.count(fn) > 0; }
};

std::string trim(std::string s) {
  const char* ws = " \t\r\n";
  s.erase(0, s.find_first_not_of(ws));
  auto e = s.find_last_not_of(ws);
  s.erase(e == std::string::npos ? 0 : e + 1);
  return s;
}

std::set<CK_MECHANISM_TYPE> parse_mechanisms(const std::string& value) {
  static const std::pair<const char*, CK_MECHANISM_TYPE> kNames[] = {
      {"CKM_AES_KEY_WRAP_PAD", CKM_AES_KEY_WRAP_PAD},
      {"CKM_AES_KEY_WRAP", CKM_AES_KEY_WRAP},
      {"CKM_AES_GCM", CKM_AES_GCM},
      {"CKM_AES_CBC_PAD", CKM_AES_CBC_PAD},
      {"CKM_SHA256_HMAC", CKM_SHA256_HMAC}};
  std::set<CK_MECHANISM_TYPE> out;
  std::stringstream ss(value);
  std::string name;
  while (std::getline(ss, name, ',')) {
    name = trim(name);
    for (const auto& [n, m] : kNames)
      if (name == n) out.insert(m);
    if (name.rfind("0x", 0) == 0) out.insert(std::strtoul(name.c_str(), nullptr, 16));
  }
  return out;
}

void parse_line(Plan& p, const std::string& key, const std::string& value) {
  if (key == "hide_mechanisms") {
    p.hidden = parse_mechanisms(value);
  } else if (key == "fault") {
    p.fault = parse_fault(value);
  } else if (key == "delay_ms") {
    p.delay_ms = static_cast<unsigned>(std::strtoul(value.c_str(), nullptr, 10));
  } else if (key == "count") {
    p.count = std::strtoul(value.c_str(), nullptr, 10);
  } else if (key == "functions") {
    std::stringstream ss(value);
    std::string fn;
    while (std::getline(ss, fn, ',')) {
      fn = trim(fn);
      if (!fn.empty()) p.functions.insert(fn);
    }
  }
}

// ---- state ----

struct Shim {
  void* handle = nullptr;
  CK_FUNCTION_LIST* real = nullptr;
  CK_FUNCTION_LIST list{};

  std::mutex mu;  // guards the plan and the control file's identity
  std::shared_ptr<const Plan> plan = std::make_shared<Plan>();
  bool have_file = false;
  struct stat file_id {};
  std::uint64_t generation = 0;

  std::atomic<std::uint64_t> applied_generation{0};  // side effects done for this generation
  std::atomic<unsigned long> injected_in_generation{0};
  std::atomic<unsigned long> injected{0};
  std::atomic<unsigned long> delayed{0};
  // Held shared by every call forwarded to the real module while it runs, exclusively by the
  // fault side effects that close sessions or log out on the real module: an unplugged
  // device fails the calls after it, it does not free a session under a call in progress
  // (SoftHSM would: a use after free in C_Sign, or CKR_GENERAL_ERROR for another call).
  std::shared_mutex calls_mu;
  std::mutex stats_mu;
  std::mutex sessions_mu;
  std::set<CK_SESSION_HANDLE> sessions;  // open on the real module, opened through the shim
};

Shim& shim() {
  static Shim* s = new Shim;  // never destroyed: calls may arrive during exit
  return *s;
}

const char* env(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? v : nullptr;
}

std::shared_ptr<const Plan> env_plan() {
  auto p = std::make_shared<Plan>();
  if (const char* f = env("KMSD_FAULTSHIM_FAULT")) p->fault = parse_fault(f);
  if (const char* d = env("KMSD_FAULTSHIM_DELAY_MS"))
    p->delay_ms = static_cast<unsigned>(std::strtoul(d, nullptr, 10));
  if (const char* h = env("KMSD_FAULTSHIM_HIDE_MECHANISMS")) p->hidden = parse_mechanisms(h);
  return p;
}

bool same_file(const struct stat& a, const struct stat& b) {
  return a.st_ino == b.st_ino && a.st_dev == b.st_dev && a.st_size == b.st_size &&
         a.st_mtim.tv_sec == b.st_mtim.tv_sec && a.st_mtim.tv_nsec == b.st_mtim.tv_nsec;
}

// The plan in force: one stat() of the control file per call, a re-read only on change.
std::shared_ptr<const Plan> current_plan() {
  Shim& s = shim();
  const char* control = env("KMSD_FAULTSHIM_CONTROL");
  struct stat st {};
  const bool exists = control != nullptr && ::stat(control, &st) == 0;
  std::lock_guard lock(s.mu);
  if (exists == s.have_file && (!exists || same_file(st, s.file_id))) {
    if (s.generation == 0) {  // first call: the environment's plan
      s.generation = 1;
      auto p = std::make_shared<Plan>(*env_plan());
      p->generation = s.generation;
      s.plan = p;
    }
    return s.plan;
  }
  std::shared_ptr<Plan> p;
  if (exists) {
    p = std::make_shared<Plan>();
    std::ifstream in(control);
    std::string line;
    while (std::getline(in, line)) {
      auto hash = line.find('#');
      if (hash != std::string::npos) line.resize(hash);
      auto eq = line.find('=');
      if (eq == std::string::npos) continue;
      parse_line(*p, trim(line.substr(0, eq)), trim(line.substr(eq + 1)));
    }
  } else {
    p = std::make_shared<Plan>(*env_plan());
  }
  s.have_file = exists;
  s.file_id = st;
  p->generation = ++s.generation;
  s.injected_in_generation = 0;
  s.plan = p;
  return p;
}

void write_stats() {
  Shim& s = shim();
  const char* path = env("KMSD_FAULTSHIM_STATS");
  if (path == nullptr) return;
  std::lock_guard lock(s.stats_mu);
  std::size_t open_sessions = 0;
  {
    std::lock_guard sl(s.sessions_mu);
    open_sessions = s.sessions.size();
  }
  std::string text = "injected " + std::to_string(s.injected.load()) + "\ndelayed " +
                     std::to_string(s.delayed.load()) + "\nopen_sessions " +
                     std::to_string(open_sessions) + "\n";
  std::string tmp = std::string(path) + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  if (fd < 0) return;
  ssize_t n = ::write(fd, text.data(), text.size());
  ::close(fd);
  if (n == static_cast<ssize_t>(text.size())) ::rename(tmp.c_str(), path);
}

// Token slots of the real module (for the side effects below).
std::vector<CK_SLOT_ID> real_token_slots() {
  CK_FUNCTION_LIST* r = shim().real;
  CK_ULONG n = 0;
  if (r->C_GetSlotList(CK_TRUE, nullptr, &n) != CKR_OK || n == 0) return {};
  std::vector<CK_SLOT_ID> ids(n);
  if (r->C_GetSlotList(CK_TRUE, ids.data(), &n) != CKR_OK) return {};
  ids.resize(n);
  return ids;
}

// What a fault does to the real token when it starts: an unplugged device loses its sessions
// (and with them the login); a logged-out token must be logged in again.
void apply_side_effects(const Plan& p) {
  Shim& s = shim();
  std::uint64_t done = s.applied_generation.load();
  if (done >= p.generation) return;
  if (!s.applied_generation.compare_exchange_strong(done, p.generation)) return;
  std::unique_lock calls(s.calls_mu);  // no call of another thread is in the real module
  CK_FUNCTION_LIST* r = s.real;
  switch (p.fault) {
    case Fault::kDeviceRemoved:
    case Fault::kDeviceError:
      for (CK_SLOT_ID id : real_token_slots()) r->C_CloseAllSessions(id);
      {
        std::lock_guard sl(s.sessions_mu);
        s.sessions.clear();
      }
      break;
    case Fault::kNotLoggedIn:
    case Fault::kPinIncorrect:
    case Fault::kPinLocked:
      for (CK_SLOT_ID id : real_token_slots()) {
        CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
        if (r->C_OpenSession(id, CKF_SERIAL_SESSION, nullptr, nullptr, &h) != CKR_OK) continue;
        r->C_Logout(h);
        r->C_CloseSession(h);
      }
      break;
    default:
      break;
  }
}

enum class Kind { kSlot, kSession };

bool needs_login(const char* fn) {
  static const std::set<std::string> no_login = {
      "C_OpenSession", "C_CloseSession",   "C_CloseAllSessions", "C_Login",
      "C_Logout",      "C_GetSessionInfo", "C_GenerateRandom",   "C_SeedRandom"};
  return no_login.count(fn) == 0;
}

// The return value a matching call gets under FAULT (CKR_OK: forward it).
CK_RV injected_rv(Fault f, Kind kind, const char* fn) {
  switch (f) {
    case Fault::kNone:
      return CKR_OK;
    case Fault::kDeviceRemoved:
      if (std::strcmp(fn, "C_GetSlotList") == 0 || std::strcmp(fn, "C_GetSlotInfo") == 0)
        return CKR_OK;  // answered, with the token missing (see the wrappers)
      return kind == Kind::kSlot ? CKR_TOKEN_NOT_PRESENT : CKR_DEVICE_REMOVED;
    case Fault::kSessionInvalid:
      return kind == Kind::kSession ? CKR_SESSION_HANDLE_INVALID : CKR_OK;
    case Fault::kDeviceError:
      return std::strcmp(fn, "C_GetSlotList") == 0 ? CKR_OK : CKR_DEVICE_ERROR;
    case Fault::kNotLoggedIn:
      return kind == Kind::kSession && needs_login(fn) ? CKR_USER_NOT_LOGGED_IN : CKR_OK;
    case Fault::kPinIncorrect:
      return std::strcmp(fn, "C_Login") == 0 ? CKR_PIN_INCORRECT : CKR_OK;
    case Fault::kPinLocked:
      return std::strcmp(fn, "C_Login") == 0 ? CKR_PIN_LOCKED : CKR_OK;
  }
  return CKR_OK;
}

// Before every forwarded call: delay, side effects, and the injected return value. Returns
// the plan's fault when it applies to this call (for the wrappers that alter results).
struct Decision {
  CK_RV rv = CKR_OK;
  Fault fault = Fault::kNone;
};

Decision before(const char* fn, Kind kind) {
  Shim& s = shim();
  auto p = current_plan();
  if (!p->matches(fn)) return {};
  if (p->delay_ms > 0) {
    ++s.delayed;
    write_stats();
    std::this_thread::sleep_for(std::chrono::milliseconds(p->delay_ms));
  }
  if (p->fault == Fault::kNone) return {};
  if (p->count > 0 && s.injected_in_generation.load() >= p->count) return {};
  apply_side_effects(*p);
  Decision d{injected_rv(p->fault, kind, fn), p->fault};
  bool alters = d.rv != CKR_OK;
  if (p->fault == Fault::kDeviceRemoved && std::strcmp(fn, "C_GetSlotList") == 0) alters = true;
  if (p->fault == Fault::kDeviceRemoved && std::strcmp(fn, "C_GetSlotInfo") == 0) alters = true;
  if (p->fault == Fault::kNotLoggedIn && std::strcmp(fn, "C_GetSessionInfo") == 0) alters = true;
  if (p->fault == Fault::kPinLocked && std::strcmp(fn, "C_GetTokenInfo") == 0) alters = true;
  if (!alters) d.fault = Fault::kNone;
  if (alters) {
    ++s.injected;
    ++s.injected_in_generation;
    write_stats();
  }
  return d;
}

// ---- sessions on the real module ----

// Really closes session H (the shim told the caller it is invalid: make it so).
template <typename... Rest>
void close_real(CK_SESSION_HANDLE h, Rest...) {
  Shim& s = shim();
  std::unique_lock calls(s.calls_mu);
  if (s.real->C_CloseSession(h) == CKR_OK) {
    std::lock_guard sl(s.sessions_mu);
    s.sessions.erase(h);
  }
  write_stats();
}
inline void close_real() {}

CK_RV shim_OpenSession(CK_SLOT_ID slot, CK_FLAGS flags, void* app, CK_NOTIFY notify,
                       CK_SESSION_HANDLE_PTR out) {
  Decision d = before("C_OpenSession", Kind::kSlot);
  if (d.rv != CKR_OK) return d.rv;
  std::shared_lock calls(shim().calls_mu);
  CK_RV rv = shim().real->C_OpenSession(slot, flags, app, notify, out);
  if (rv == CKR_OK && out != nullptr) {
    std::lock_guard sl(shim().sessions_mu);
    shim().sessions.insert(*out);
  }
  write_stats();
  return rv;
}

CK_RV shim_CloseSession(CK_SESSION_HANDLE h) {
  Decision d = before("C_CloseSession", Kind::kSession);
  if (d.rv == CKR_SESSION_HANDLE_INVALID) close_real(h);
  if (d.rv != CKR_OK) return d.rv;
  std::shared_lock calls(shim().calls_mu);
  CK_RV rv = shim().real->C_CloseSession(h);
  if (rv == CKR_OK) {
    std::lock_guard sl(shim().sessions_mu);
    shim().sessions.erase(h);
  }
  write_stats();
  return rv;
}

CK_RV shim_CloseAllSessions(CK_SLOT_ID slot) {
  Decision d = before("C_CloseAllSessions", Kind::kSlot);
  if (d.rv != CKR_OK) return d.rv;
  std::shared_lock calls(shim().calls_mu);
  CK_RV rv = shim().real->C_CloseAllSessions(slot);
  if (rv == CKR_OK) {
    std::lock_guard sl(shim().sessions_mu);
    shim().sessions.clear();  // the tests have one token behind the shim
  }
  write_stats();
  return rv;
}

// ---- the generic forwarder: one instantiation per CK_FUNCTION_LIST member ----

template <auto M>
struct Forward;

template <typename... A, CK_RV (*CK_FUNCTION_LIST::*M)(A...)>
struct Forward<M> {
  static inline const char* name = "";
  static inline Kind kind = Kind::kSession;
  static CK_RV call(A... a) {
    Decision d = before(name, kind);
    if (d.rv == CKR_SESSION_HANDLE_INVALID && kind == Kind::kSession) close_real(a...);
    if (d.rv != CKR_OK) return d.rv;
    std::shared_lock calls(shim().calls_mu);
    return (shim().real->*M)(a...);
  }
};

// ---- wrappers that alter results rather than replace them ----

CK_RV shim_GetSlotList(CK_BBOOL present, CK_SLOT_ID_PTR list, CK_ULONG_PTR count) {
  Decision d = before("C_GetSlotList", Kind::kSlot);
  if (d.rv != CKR_OK) return d.rv;
  std::shared_lock calls(shim().calls_mu);
  if (d.fault == Fault::kDeviceRemoved && present == CK_TRUE) {
    if (count == nullptr) return CKR_ARGUMENTS_BAD;
    *count = 0;
    return CKR_OK;
  }
  return shim().real->C_GetSlotList(present, list, count);
}

CK_RV shim_GetSlotInfo(CK_SLOT_ID id, CK_SLOT_INFO_PTR info) {
  Decision d = before("C_GetSlotInfo", Kind::kSlot);
  if (d.rv != CKR_OK) return d.rv;
  std::shared_lock calls(shim().calls_mu);
  CK_RV rv = shim().real->C_GetSlotInfo(id, info);
  if (rv == CKR_OK && d.fault == Fault::kDeviceRemoved) info->flags &= ~CKF_TOKEN_PRESENT;
  return rv;
}

CK_RV shim_GetTokenInfo(CK_SLOT_ID id, CK_TOKEN_INFO_PTR info) {
  Decision d = before("C_GetTokenInfo", Kind::kSlot);
  if (d.rv != CKR_OK) return d.rv;
  std::shared_lock calls(shim().calls_mu);
  CK_RV rv = shim().real->C_GetTokenInfo(id, info);
  if (rv == CKR_OK && d.fault == Fault::kPinLocked) info->flags |= CKF_USER_PIN_LOCKED;
  return rv;
}

CK_RV shim_GetSessionInfo(CK_SESSION_HANDLE h, CK_SESSION_INFO_PTR info) {
  Decision d = before("C_GetSessionInfo", Kind::kSession);
  if (d.rv == CKR_SESSION_HANDLE_INVALID) close_real(h);
  if (d.rv != CKR_OK) return d.rv;
  std::shared_lock calls(shim().calls_mu);
  CK_RV rv = shim().real->C_GetSessionInfo(h, info);
  if (rv == CKR_OK && d.fault == Fault::kNotLoggedIn) {
    if (info->state == CKS_RW_USER_FUNCTIONS) info->state = CKS_RW_PUBLIC_SESSION;
    if (info->state == CKS_RO_USER_FUNCTIONS) info->state = CKS_RO_PUBLIC_SESSION;
  }
  return rv;
}

// ---- hidden mechanisms ----

const std::set<CK_MECHANISM_TYPE>& hidden_mechanisms() {
  thread_local std::shared_ptr<const Plan> keep;
  keep = current_plan();  // the set lives as long as this thread looks at it
  return keep->hidden;
}

bool hidden(const CK_MECHANISM* m) {
  return m != nullptr && hidden_mechanisms().count(m->mechanism) > 0;
}

CK_RV shim_GetMechanismList(CK_SLOT_ID slot, CK_MECHANISM_TYPE_PTR list, CK_ULONG_PTR count) {
  Decision d = before("C_GetMechanismList", Kind::kSlot);
  if (d.rv != CKR_OK) return d.rv;
  std::shared_lock calls(shim().calls_mu);
  if (count == nullptr) return CKR_ARGUMENTS_BAD;
  CK_ULONG n = 0;
  CK_RV rv = shim().real->C_GetMechanismList(slot, nullptr, &n);
  if (rv != CKR_OK) return rv;
  std::vector<CK_MECHANISM_TYPE> all(n);
  rv = shim().real->C_GetMechanismList(slot, all.data(), &n);
  if (rv != CKR_OK) return rv;
  all.resize(n);
  std::erase_if(all, [](CK_MECHANISM_TYPE m) { return hidden_mechanisms().count(m) > 0; });
  if (list == nullptr) {
    *count = all.size();
    return CKR_OK;
  }
  if (*count < all.size()) {
    *count = all.size();
    return CKR_BUFFER_TOO_SMALL;
  }
  std::copy(all.begin(), all.end(), list);
  *count = all.size();
  return CKR_OK;
}

CK_RV shim_GetMechanismInfo(CK_SLOT_ID slot, CK_MECHANISM_TYPE type, CK_MECHANISM_INFO_PTR info) {
  Decision d = before("C_GetMechanismInfo", Kind::kSlot);
  if (d.rv != CKR_OK) return d.rv;
  std::shared_lock calls(shim().calls_mu);
  if (hidden_mechanisms().count(type) > 0) return CKR_MECHANISM_INVALID;
  return shim().real->C_GetMechanismInfo(slot, type, info);
}

CK_RV shim_EncryptInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k) {
  Decision d = before("C_EncryptInit", Kind::kSession);
  if (d.rv == CKR_SESSION_HANDLE_INVALID) close_real(h);
  if (d.rv != CKR_OK) return d.rv;
  std::shared_lock calls(shim().calls_mu);
  if (hidden(m)) return CKR_MECHANISM_INVALID;
  return shim().real->C_EncryptInit(h, m, k);
}

CK_RV shim_DecryptInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k) {
  Decision d = before("C_DecryptInit", Kind::kSession);
  if (d.rv == CKR_SESSION_HANDLE_INVALID) close_real(h);
  if (d.rv != CKR_OK) return d.rv;
  std::shared_lock calls(shim().calls_mu);
  if (hidden(m)) return CKR_MECHANISM_INVALID;
  return shim().real->C_DecryptInit(h, m, k);
}

CK_RV shim_SignInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k) {
  Decision d = before("C_SignInit", Kind::kSession);
  if (d.rv == CKR_SESSION_HANDLE_INVALID) close_real(h);
  if (d.rv != CKR_OK) return d.rv;
  std::shared_lock calls(shim().calls_mu);
  if (hidden(m)) return CKR_MECHANISM_INVALID;
  return shim().real->C_SignInit(h, m, k);
}

CK_RV shim_WrapKey(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE wrapping,
                   CK_OBJECT_HANDLE key, CK_BYTE_PTR out, CK_ULONG_PTR out_len) {
  Decision d = before("C_WrapKey", Kind::kSession);
  if (d.rv == CKR_SESSION_HANDLE_INVALID) close_real(h);
  if (d.rv != CKR_OK) return d.rv;
  std::shared_lock calls(shim().calls_mu);
  if (hidden(m)) return CKR_MECHANISM_INVALID;
  return shim().real->C_WrapKey(h, m, wrapping, key, out, out_len);
}

CK_RV shim_UnwrapKey(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE unwrapping,
                     CK_BYTE_PTR in, CK_ULONG in_len, CK_ATTRIBUTE_PTR tmpl, CK_ULONG n,
                     CK_OBJECT_HANDLE_PTR key) {
  Decision d = before("C_UnwrapKey", Kind::kSession);
  if (d.rv == CKR_SESSION_HANDLE_INVALID) close_real(h);
  if (d.rv != CKR_OK) return d.rv;
  std::shared_lock calls(shim().calls_mu);
  if (hidden(m)) return CKR_MECHANISM_INVALID;
  return shim().real->C_UnwrapKey(h, m, unwrapping, in, in_len, tmpl, n, key);
}

CK_RV shim_Initialize(void* args) {
  return shim().real->C_Initialize(args);
}
CK_RV shim_Finalize(void* reserved) {
  return shim().real->C_Finalize(reserved);
}
CK_RV shim_GetInfo(CK_INFO_PTR info) {
  return shim().real->C_GetInfo(info);
}
CK_RV shim_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR out);

#define KMSD_SHIM_FORWARD(fn, k)                            \
  do {                                                      \
    using F = Forward<&CK_FUNCTION_LIST::fn>;               \
    F::name = #fn;                                          \
    F::kind = k;                                            \
    s.list.fn = s.real->fn != nullptr ? &F::call : nullptr; \
  } while (0)

// Loads the real module and builds our function list, once.
CK_RV load() {
  static std::once_flag once;
  static CK_RV result = CKR_GENERAL_ERROR;
  std::call_once(once, [] {
    Shim& s = shim();
    const char* path = env("KMSD_FAULTSHIM_MODULE");
    if (path == nullptr) path = "/usr/lib/softhsm/libsofthsm2.so";
    s.handle = ::dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (s.handle == nullptr) return;
    using GetList = CK_RV (*)(CK_FUNCTION_LIST_PTR_PTR);
    auto get = reinterpret_cast<GetList>(::dlsym(s.handle, "C_GetFunctionList"));
    if (get == nullptr || get(&s.real) != CKR_OK || s.real == nullptr) return;
    s.list.version = s.real->version;
    s.list.C_Initialize = &shim_Initialize;
    s.list.C_Finalize = &shim_Finalize;
    s.list.C_GetInfo = &shim_GetInfo;
    s.list.C_GetFunctionList = &shim_GetFunctionList;
    s.list.C_GetSlotList = &shim_GetSlotList;
    s.list.C_GetSlotInfo = &shim_GetSlotInfo;
    s.list.C_GetTokenInfo = &shim_GetTokenInfo;
    s.list.C_GetSessionInfo = &shim_GetSessionInfo;
    constexpr Kind kSlot = Kind::kSlot;
    constexpr Kind kSess = Kind::kSession;
    KMSD_SHIM_FORWARD(C_GetMechanismList, kSlot);
    KMSD_SHIM_FORWARD(C_GetMechanismInfo, kSlot);
    KMSD_SHIM_FORWARD(C_InitToken, kSlot);
    KMSD_SHIM_FORWARD(C_InitPIN, kSess);
    KMSD_SHIM_FORWARD(C_SetPIN, kSess);
    KMSD_SHIM_FORWARD(C_OpenSession, kSlot);
    KMSD_SHIM_FORWARD(C_CloseSession, kSess);
    KMSD_SHIM_FORWARD(C_CloseAllSessions, kSlot);
    KMSD_SHIM_FORWARD(C_GetOperationState, kSess);
    KMSD_SHIM_FORWARD(C_SetOperationState, kSess);
    KMSD_SHIM_FORWARD(C_Login, kSess);
    KMSD_SHIM_FORWARD(C_Logout, kSess);
    KMSD_SHIM_FORWARD(C_CreateObject, kSess);
    KMSD_SHIM_FORWARD(C_CopyObject, kSess);
    KMSD_SHIM_FORWARD(C_DestroyObject, kSess);
    KMSD_SHIM_FORWARD(C_GetObjectSize, kSess);
    KMSD_SHIM_FORWARD(C_GetAttributeValue, kSess);
    KMSD_SHIM_FORWARD(C_SetAttributeValue, kSess);
    KMSD_SHIM_FORWARD(C_FindObjectsInit, kSess);
    KMSD_SHIM_FORWARD(C_FindObjects, kSess);
    KMSD_SHIM_FORWARD(C_FindObjectsFinal, kSess);
    KMSD_SHIM_FORWARD(C_EncryptInit, kSess);
    KMSD_SHIM_FORWARD(C_Encrypt, kSess);
    KMSD_SHIM_FORWARD(C_EncryptUpdate, kSess);
    KMSD_SHIM_FORWARD(C_EncryptFinal, kSess);
    KMSD_SHIM_FORWARD(C_DecryptInit, kSess);
    KMSD_SHIM_FORWARD(C_Decrypt, kSess);
    KMSD_SHIM_FORWARD(C_DecryptUpdate, kSess);
    KMSD_SHIM_FORWARD(C_DecryptFinal, kSess);
    KMSD_SHIM_FORWARD(C_DigestInit, kSess);
    KMSD_SHIM_FORWARD(C_Digest, kSess);
    KMSD_SHIM_FORWARD(C_DigestUpdate, kSess);
    KMSD_SHIM_FORWARD(C_DigestKey, kSess);
    KMSD_SHIM_FORWARD(C_DigestFinal, kSess);
    KMSD_SHIM_FORWARD(C_SignInit, kSess);
    KMSD_SHIM_FORWARD(C_Sign, kSess);
    KMSD_SHIM_FORWARD(C_SignUpdate, kSess);
    KMSD_SHIM_FORWARD(C_SignFinal, kSess);
    KMSD_SHIM_FORWARD(C_SignRecoverInit, kSess);
    KMSD_SHIM_FORWARD(C_SignRecover, kSess);
    KMSD_SHIM_FORWARD(C_VerifyInit, kSess);
    KMSD_SHIM_FORWARD(C_Verify, kSess);
    KMSD_SHIM_FORWARD(C_VerifyUpdate, kSess);
    KMSD_SHIM_FORWARD(C_VerifyFinal, kSess);
    KMSD_SHIM_FORWARD(C_VerifyRecoverInit, kSess);
    KMSD_SHIM_FORWARD(C_VerifyRecover, kSess);
    KMSD_SHIM_FORWARD(C_DigestEncryptUpdate, kSess);
    KMSD_SHIM_FORWARD(C_DecryptDigestUpdate, kSess);
    KMSD_SHIM_FORWARD(C_SignEncryptUpdate, kSess);
    KMSD_SHIM_FORWARD(C_DecryptVerifyUpdate, kSess);
    KMSD_SHIM_FORWARD(C_GenerateKey, kSess);
    KMSD_SHIM_FORWARD(C_GenerateKeyPair, kSess);
    KMSD_SHIM_FORWARD(C_WrapKey, kSess);
    KMSD_SHIM_FORWARD(C_UnwrapKey, kSess);
    KMSD_SHIM_FORWARD(C_DeriveKey, kSess);
    KMSD_SHIM_FORWARD(C_SeedRandom, kSess);
    KMSD_SHIM_FORWARD(C_GenerateRandom, kSess);
    KMSD_SHIM_FORWARD(C_GetFunctionStatus, kSess);
    KMSD_SHIM_FORWARD(C_CancelFunction, kSess);
    KMSD_SHIM_FORWARD(C_WaitForSlotEvent, kSlot);
    s.list.C_OpenSession = &shim_OpenSession;
    s.list.C_CloseSession = &shim_CloseSession;
    s.list.C_CloseAllSessions = &shim_CloseAllSessions;
    s.list.C_GetMechanismList = &shim_GetMechanismList;
    s.list.C_GetMechanismInfo = &shim_GetMechanismInfo;
    s.list.C_EncryptInit = &shim_EncryptInit;
    s.list.C_DecryptInit = &shim_DecryptInit;
    s.list.C_SignInit = &shim_SignInit;
    s.list.C_WrapKey = &shim_WrapKey;
    s.list.C_UnwrapKey = &shim_UnwrapKey;
    result = CKR_OK;
  });
  return result;
}

CK_RV shim_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR out) {
  if (out == nullptr) return CKR_ARGUMENTS_BAD;
  CK_RV rv = load();
  if (rv != CKR_OK) return rv;
  *out = &shim().list;
  return CKR_OK;
}

}  // namespace

// The one exported symbol.
extern "C" __attribute__((visibility("default"))) CK_RV C_GetFunctionList(
    CK_FUNCTION_LIST_PTR_PTR out) {
  return shim_GetFunctionList(out);
}

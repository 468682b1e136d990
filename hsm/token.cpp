// Token: the session pool, login and recovery, key objects, the envelope and the CA key
// bridge for signing (an EVP_PKEY whose private operations run through the pool). Raw PKCS#11 lives
// in hsm/pkcs11.cpp; the blob format in envelope.hpp.
#include "hsm/token.hpp"

#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/param_build.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <initializer_list>
#include <map>
#include <mutex>
#include <set>
#include <shared_mutex>
#include <thread>
#include <tuple>

#include "hsm/envelope.hpp"
#include "hsm/pkcs11.hpp"
#include "hsm/uri.hpp"

namespace kmsd::hsm {

using p11::check_rv;
using p11::fail;
using p11::Module;
using p11::ObjectGuard;
using p11::Session;
using p11::TokenError;

// ---------------------------------------------------------------------------------------
// Names

const char* to_string(WrapMechanism m) noexcept {
  switch (m) {
    case WrapMechanism::kAesKeyWrapPad:
      return "aes-key-wrap-pad";
    case WrapMechanism::kAesGcm:
      return "aes-gcm";
    case WrapMechanism::kAesCbcPadHmac:
      return "aes-cbc-pad-hmac";
  }
  return "unknown";
}

std::optional<WrapMechanism> parse_wrap_mechanism(std::string_view s) noexcept {
  for (auto m :
       {WrapMechanism::kAesKeyWrapPad, WrapMechanism::kAesGcm, WrapMechanism::kAesCbcPadHmac}) {
    if (s == to_string(m)) return m;
  }
  return std::nullopt;
}

const char* to_string(KeyType t) noexcept {
  switch (t) {
    case KeyType::kEcP256:
      return "ec-p256";
    case KeyType::kEcP384:
      return "ec-p384";
    case KeyType::kRsa2048:
      return "rsa-2048";
    case KeyType::kRsa3072:
      return "rsa-3072";
  }
  return "unknown";
}

std::optional<KeyType> parse_key_type(std::string_view s) noexcept {
  for (auto t : {KeyType::kEcP256, KeyType::kEcP384, KeyType::kRsa2048, KeyType::kRsa3072}) {
    if (s == to_string(t)) return t;
  }
  return std::nullopt;
}

const char* to_string(Fault f) noexcept {
  switch (f) {
    case Fault::kNone:
      return "none";
    case Fault::kCallerError:
      return "caller-error";
    case Fault::kSessionLost:
      return "session-lost";
    case Fault::kTokenGone:
      return "token-gone";
    case Fault::kPinIncorrect:
      return "pin-incorrect";
    case Fault::kPinLocked:
      return "pin-locked";
  }
  return "unknown";
}

namespace {

constexpr CK_BBOOL kTrue = CK_TRUE;
constexpr CK_BBOOL kFalse = CK_FALSE;
const CK_BBOOL* flag(bool b) {
  return b ? &kTrue : &kFalse;
}

template <typename T>
CK_ATTRIBUTE attr(CK_ATTRIBUTE_TYPE type, const T* value, std::size_t n = sizeof(T)) {
  return CK_ATTRIBUTE{type, const_cast<T*>(value), static_cast<CK_ULONG>(n)};
}
CK_ATTRIBUTE attr_str(CK_ATTRIBUTE_TYPE type, const std::string& s) {
  return CK_ATTRIBUTE{type, const_cast<char*>(s.data()), static_cast<CK_ULONG>(s.size())};
}
CK_ATTRIBUTE attr_bytes(CK_ATTRIBUTE_TYPE type, std::span<const std::uint8_t> b) {
  return CK_ATTRIBUTE{type, const_cast<std::uint8_t*>(b.data()), static_cast<CK_ULONG>(b.size())};
}

// DER OIDs for CKA_EC_PARAMS.
constexpr std::uint8_t kOidP256[] = {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};
constexpr std::uint8_t kOidP384[] = {0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22};

// Data keys, IVs and nonces come from OpenSSL's DRBG rather than C_GenerateRandom: the
// payload is encrypted in software anyway, the DRBG is seeded from the OS, and a token round
// trip per nonce would cost a pooled session for no gain in quality on SoftHSM (which itself
// uses OpenSSL's RNG). random() still asks the token, as documented.
SecretBytes fresh_secret(std::size_t n) {
  SecretBytes out(n);
  if (RAND_priv_bytes(out.data(), static_cast<int>(n)) != 1) {
    throw TokenError(ossl::crypto_error("drawing a data key from the OpenSSL DRBG"),
                     Fault::kCallerError);
  }
  return out;
}
Bytes fresh_bytes(std::size_t n) {
  Bytes out(n);
  if (RAND_bytes(out.data(), static_cast<int>(n)) != 1) {
    throw TokenError(ossl::crypto_error("drawing a nonce from the OpenSSL DRBG"),
                     Fault::kCallerError);
  }
  return out;
}

void append(Bytes& out, std::span<const std::uint8_t> b) {
  out.insert(out.end(), b.begin(), b.end());
}

[[noreturn]] void open_failed() {
  fail(ErrorCode::kCrypto, envelope::kOpenFailed);
}

std::string describe_tokens(const std::vector<SlotInfo>& slots) {
  if (slots.empty()) return "no tokens are present on this module";
  std::string out = "tokens present: ";
  for (std::size_t i = 0; i < slots.size(); ++i) {
    if (i) out += ", ";
    out += "'" + slots[i].token_label + "' (serial " + slots[i].token_serial + ", slot " +
           std::to_string(slots[i].slot_id) + ")";
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// The CA private key as an EVP_PKEY whose private operations run on the token through the
// Token's own session pool (not libp11). libp11 0.4.12 keeps a session pool of its own and
// puts a session back into it whatever the token said about it (pkcs11_put_session): after
// the token closed its sessions, the handles it keeps are numbers the token gives to the
// sessions kmsd opens next, so a libp11 signature could run in another thread's session.
// With one pool, every session is leased to one operation at a time, and the HandleRegistry
// below sees to it that a number the token gave out again is never used twice at once.
//
// The keys are OpenSSL "foreign" legacy keys (an EC_KEY_METHOD / RSA_METHOD of ours, as
// libp11 and engines do), which OpenSSL 3.0 still routes through the legacy signing path;
// these interfaces are deprecated in 3.0, hence the pragmas around their use.

// The link from keys handed out to the Token they came from: OP runs one private-key
// operation; the Token cuts it (under the lock) when it is destroyed, so a key that outlives
// its Token fails cleanly, and the Token waits for operations in flight.
struct CaKeyLink {
  using Op =
      std::function<Result<Bytes>(std::uint64_t epoch, CK_OBJECT_HANDLE key, CK_MECHANISM_TYPE,
                                  bool sign, std::span<const std::uint8_t> in)>;
  std::shared_mutex mu;
  Op op;
};

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"

// The legacy key types' owners (their free functions are deprecated: called here, under the
// pragma, not from common/ossl.hpp's Deleter).
void free_ec_key(EC_KEY* k) noexcept {
  EC_KEY_free(k);
}
void free_rsa(RSA* k) noexcept {
  RSA_free(k);
}
using EcKeyPtr = std::unique_ptr<EC_KEY, ossl::Deleter<free_ec_key>>;
using RsaPtr = std::unique_ptr<RSA, ossl::Deleter<free_rsa>>;

// What a key handed out knows: its token, the epoch it was fetched in (a key fetched before a
// recovery, login or logout is refused: fetch it again), the private object's handle in that
// epoch (handles stay valid until the token recovers or logs in again, which moves the epoch
// on), and a copy of the public key to check every signature with before it leaves the token
// layer.
struct CaKeyRef {
  std::shared_ptr<CaKeyLink> link;
  std::uint64_t epoch = 0;
  CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
  EcKeyPtr pub_ec;
  RsaPtr pub_rsa;
  Result<Bytes> run(CK_MECHANISM_TYPE mech, bool sign, std::span<const std::uint8_t> in) const {
    std::shared_lock lock(link->mu);
    if (!link->op)
      return make_error(ErrorCode::kUnavailable,
                        "the key token this CA key came from has been closed; fetch the key again");
    return link->op(epoch, handle, mech, sign, in);
  }
};

void free_der(unsigned char* p) noexcept {
  OPENSSL_free(p);
}

void raise_key_error(const std::string& what) {
  ERR_raise_data(ERR_LIB_USER, ERR_R_OPERATION_FAIL, "%s", what.c_str());
}

void free_key_ref(void*, void* ptr, CRYPTO_EX_DATA*, int, long, void*) {
  delete static_cast<CaKeyRef*>(ptr);
}

int ec_ref_index() {
  static const int idx =
      CRYPTO_get_ex_new_index(CRYPTO_EX_INDEX_EC_KEY, 0, nullptr, nullptr, nullptr, free_key_ref);
  return idx;
}
int rsa_ref_index() {
  static const int idx =
      CRYPTO_get_ex_new_index(CRYPTO_EX_INDEX_RSA, 0, nullptr, nullptr, nullptr, free_key_ref);
  return idx;
}

// CKM_ECDSA on the digest; the token's r || s becomes an ECDSA_SIG, checked with the public key.
ECDSA_SIG* token_ecdsa_sign_sig(const unsigned char* dgst, int dlen, const BIGNUM*, const BIGNUM*,
                                EC_KEY* ec) {
  const auto* ref = static_cast<const CaKeyRef*>(EC_KEY_get_ex_data(ec, ec_ref_index()));
  if (ref == nullptr || dlen < 0) {
    raise_key_error("not a key of the kmsd key token");
    return nullptr;
  }
  auto rs = ref->run(CKM_ECDSA, true, {dgst, static_cast<std::size_t>(dlen)});
  if (!rs.ok()) {
    raise_key_error(rs.error().message);
    return nullptr;
  }
  if (rs->empty() || rs->size() % 2 != 0) {
    raise_key_error("the key token returned an ECDSA signature of odd length");
    return nullptr;
  }
  const int half = static_cast<int>(rs->size() / 2);
  BIGNUM* r = BN_bin2bn(rs->data(), half, nullptr);
  BIGNUM* s = BN_bin2bn(rs->data() + half, half, nullptr);
  ECDSA_SIG* sig = ECDSA_SIG_new();
  if (r == nullptr || s == nullptr || sig == nullptr || ECDSA_SIG_set0(sig, r, s) != 1) {
    BN_free(r);
    BN_free(s);
    ECDSA_SIG_free(sig);
    raise_key_error("out of memory building an ECDSA signature");
    return nullptr;
  }
  if (ECDSA_do_verify(dgst, dlen, sig, ref->pub_ec.get()) != 1) {
    ECDSA_SIG_free(sig);
    raise_key_error(
        "the key token's ECDSA signature does not verify with the CA public key; refused");
    return nullptr;
  }
  return sig;
}

// RSA private operations: PKCS#1 v1.5 (CKM_RSA_PKCS) or raw (CKM_RSA_X_509: OpenSSL pads PSS
// and unpads OAEP itself around it).
std::optional<CK_MECHANISM_TYPE> rsa_mechanism(int padding) {
  if (padding == RSA_PKCS1_PADDING) return CKM_RSA_PKCS;
  if (padding == RSA_NO_PADDING) return CKM_RSA_X_509;
  raise_key_error("RSA padding " + std::to_string(padding) +
                  " is not available with a token key (PKCS#1 v1.5, PSS and OAEP are)");
  return std::nullopt;
}

// Both RSA private operations: FROM through RSA's key on the token (C_Sign when SIGN, else
// C_Decrypt) with PADDING's mechanism. Null, with the error raised, when it failed.
std::optional<Bytes> token_rsa_operation(int flen, const unsigned char* from, RSA* rsa, int padding,
                                         bool sign, const CaKeyRef** ref_out) {
  const auto* ref = static_cast<const CaKeyRef*>(RSA_get_ex_data(rsa, rsa_ref_index()));
  auto mech = rsa_mechanism(padding);
  if (ref == nullptr || !mech || flen < 0) {
    if (ref == nullptr) raise_key_error("not a key of the kmsd key token");
    return std::nullopt;
  }
  auto out = ref->run(*mech, sign, {from, static_cast<std::size_t>(flen)});
  if (!out.ok()) {
    raise_key_error(out.error().message);
    return std::nullopt;
  }
  *ref_out = ref;
  return std::move(*out);
}

int token_rsa_priv_enc(int flen, const unsigned char* from, unsigned char* to, RSA* rsa,
                       int padding) {
  const CaKeyRef* ref = nullptr;
  auto sig = token_rsa_operation(flen, from, rsa, padding, true, &ref);
  if (!sig) return -1;
  const int size = RSA_size(rsa);
  if (sig->size() != static_cast<std::size_t>(size)) {
    raise_key_error("the key token returned an RSA signature of the wrong length");
    return -1;
  }
  // Checked with the public key: it must give back exactly what was signed.
  Bytes back(static_cast<std::size_t>(size));
  const int n = RSA_public_decrypt(size, sig->data(), back.data(), ref->pub_rsa.get(), padding);
  if (n != flen || !std::equal(back.begin(), back.begin() + n, from)) {
    raise_key_error(
        "the key token's RSA signature does not verify with the CA public key; refused");
    return -1;
  }
  std::copy(sig->begin(), sig->end(), to);
  return size;
}

int token_rsa_priv_dec(int flen, const unsigned char* from, unsigned char* to, RSA* rsa,
                       int padding) {
  const CaKeyRef* ref = nullptr;
  auto out = token_rsa_operation(flen, from, rsa, padding, false, &ref);
  if (!out) return -1;
  const std::size_t size = static_cast<std::size_t>(RSA_size(rsa));
  if (out->size() > size) {
    raise_key_error("the key token returned more RSA plaintext than the modulus holds");
    return -1;
  }
  if (padding == RSA_NO_PADDING && out->size() < size) {  // raw: the full modulus length
    out->insert(out->begin(), size - out->size(), 0);
  }
  std::copy(out->begin(), out->end(), to);
  const int n = static_cast<int>(out->size());
  OPENSSL_cleanse(out->data(), out->size());
  return n;
}

// Never freed: keys handed out may be used until the process exits.
const EC_KEY_METHOD* token_ec_method() {
  static const EC_KEY_METHOD* method = [] {
    EC_KEY_METHOD* m = EC_KEY_METHOD_new(EC_KEY_OpenSSL());
    if (m == nullptr) return static_cast<EC_KEY_METHOD*>(nullptr);
    int (*sign)(int, const unsigned char*, int, unsigned char*, unsigned int*, const BIGNUM*,
                const BIGNUM*, EC_KEY*) = nullptr;
    int (*setup)(EC_KEY*, BN_CTX*, BIGNUM**, BIGNUM**) = nullptr;
    EC_KEY_METHOD_get_sign(EC_KEY_OpenSSL(), &sign, &setup, nullptr);
    EC_KEY_METHOD_set_sign(m, sign, setup, token_ecdsa_sign_sig);
    return m;
  }();
  return method;
}
const RSA_METHOD* token_rsa_method() {
  static const RSA_METHOD* method = [] {
    RSA_METHOD* m = RSA_meth_dup(RSA_PKCS1_OpenSSL());
    if (m == nullptr) return static_cast<RSA_METHOD*>(nullptr);
    RSA_meth_set1_name(m, "kmsd key token");
    RSA_meth_set_priv_enc(m, token_rsa_priv_enc);
    RSA_meth_set_priv_dec(m, token_rsa_priv_dec);
    return m;
  }();
  return method;
}

// The private key handed out for PUB (the CA public key read from the token): a copy of the
// public key whose private operations go to the token through REF.
ossl::EvpPkeyPtr token_private_key(EVP_PKEY* pub, std::unique_ptr<CaKeyRef> ref) {
  auto fail_build = [](const std::string& what) -> ossl::EvpPkeyPtr {
    throw TokenError(ossl::crypto_error("building the CA private key handle: " + what),
                     Fault::kCallerError);
  };
  unsigned char* der = nullptr;
  const int len = i2d_PUBKEY(pub, &der);
  if (len <= 0) return fail_build("encoding the public key");
  std::unique_ptr<unsigned char, ossl::Deleter<free_der>> der_owner(der);
  auto decode_rsa = [&] {
    const unsigned char* p = der;
    return d2i_RSA_PUBKEY(nullptr, &p, len);
  };
  auto decode_ec = [&] {
    const unsigned char* p = der;
    return d2i_EC_PUBKEY(nullptr, &p, len);
  };
  ossl::EvpPkeyPtr out(EVP_PKEY_new());
  if (!out) return fail_build("out of memory");
  // Either key type: PUB_COPY (a public copy, to check what the token returns) and a second
  // copy whose method sends the private operations to the token through REF, handed to OUT.
  auto build = [&](auto decode, auto& pub_copy, auto attach, auto assign,
                   const char* what) -> ossl::EvpPkeyPtr {
    pub_copy.reset(decode());
    std::remove_reference_t<decltype(pub_copy)> key(decode());
    if (!pub_copy || !key || !attach(key.get())) return fail_build(what);
    ref.release();  // owned by the key's ex_data now
    if (!assign(out.get(), key.get())) return fail_build(what);
    key.release();  // owned by OUT now
    return std::move(out);
  };
  if (EVP_PKEY_get_base_id(pub) == EVP_PKEY_EC)
    return build(
        decode_ec, ref->pub_ec,
        [&](EC_KEY* ec) {
          const EC_KEY_METHOD* m = token_ec_method();
          return m != nullptr && EC_KEY_set_method(ec, m) == 1 &&
                 EC_KEY_set_ex_data(ec, ec_ref_index(), ref.get()) == 1;
        },
        [](EVP_PKEY* p, EC_KEY* ec) { return EVP_PKEY_assign_EC_KEY(p, ec) == 1; }, "an EC key");
  if (EVP_PKEY_get_base_id(pub) == EVP_PKEY_RSA)
    return build(
        decode_rsa, ref->pub_rsa,
        [&](RSA* rsa) {
          const RSA_METHOD* m = token_rsa_method();
          return m != nullptr && RSA_set_method(rsa, m) == 1 &&
                 RSA_set_ex_data(rsa, rsa_ref_index(), ref.get()) == 1;
        },
        [](EVP_PKEY* p, RSA* rsa) { return EVP_PKEY_assign_RSA(p, rsa) == 1; }, "an RSA key");
  return fail_build("the CA key is neither EC nor RSA");
}

#pragma GCC diagnostic pop

}  // namespace

// ---------------------------------------------------------------------------------------
// Which pooled session owns each session handle, process-wide. A token that closes sessions
// on its own (an unplugged or erring device) gives the same handle numbers to the next
// C_OpenSession calls, so a handle kmsd still holds from before may name another thread's
// new session. Both of these were seen with SoftHSM behind the fault shim: two threads in one
// SoftHSM session (a crash in C_Sign, CKR_GENERAL_ERROR from C_CreateObject or C_WrapKey, a
// fresh record that "could not be opened"), and C_CloseSession of a stale handle closing a
// session that another thread was using (SoftHSM frees it under the call in progress). So:
// a handle is used by one lease at a time (a new session whose number an older lease still
// holds waits until that lease is back), and a session whose number was given out again is
// dead on the token: it is forgotten, never closed and never leased again.
class HandleRegistry {
 public:
  using Key = std::pair<const void*, CK_SESSION_HANDLE>;  // (module function list, handle)

  static HandleRegistry& instance() {
    static auto* registry = new HandleRegistry;  // never destroyed: pools may outlive statics
    return *registry;
  }

  // Session H was just opened: it owns the number from now on. Waits (at most MAX_WAIT) while
  // an older lease still holds the number; throws TokenError when it does not come back.
  // Returns the session's id; the caller holds it (a lease).
  std::uint64_t opened(const Key& key, std::chrono::milliseconds max_wait) {
    std::unique_lock lock(mu_);
    const std::uint64_t id = ++next_;
    Entry& e = entries_[key];
    e.owner = id;
    if (!cv_.wait_for(lock, max_wait, [&] { return e.holder == 0; })) {
      throw TokenError(Error{ErrorCode::kUnavailable,
                             "a session handle the key token gave out again is still in use by "
                             "a call from before the token lost its sessions (for more than " +
                                 std::to_string(max_wait.count()) + " ms)"},
                       Fault::kCallerError);
    }
    e.holder = id;
    return id;
  }

  // Leases idle session ID: false when its number was given out again (forget the session).
  bool take(const Key& key, std::uint64_t id) {
    std::lock_guard lock(mu_);
    auto it = entries_.find(key);
    if (it == entries_.end() || it->second.owner != id || it->second.holder != 0) return false;
    it->second.holder = id;
    return true;
  }

  // Session ID is back from its lease (or dropped from the idle list). True when it still owns
  // its number: kept idle when KEEP, else no longer registered (the caller closes it, or
  // forgets it when the token closed it). False: the number was given out again, forget it.
  bool release(const Key& key, std::uint64_t id, bool keep) {
    std::lock_guard lock(mu_);
    auto it = entries_.find(key);
    if (it == entries_.end()) return false;
    if (it->second.holder == id) {
      it->second.holder = 0;
      cv_.notify_all();
    }
    if (it->second.owner != id) return false;
    if (!keep) entries_.erase(it);
    return true;
  }

 private:
  struct Entry {
    std::uint64_t owner = 0;   // the session that got this number last from C_OpenSession
    std::uint64_t holder = 0;  // the session whose lease uses the number now (0: none)
  };
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<Key, Entry> entries_;
  std::uint64_t next_ = 0;
};

// ---------------------------------------------------------------------------------------
// Session pool: at most MAX open sessions, leased one per operation. reset() starts a new
// generation: idle sessions are dropped and leased ones are not taken back. Every session is
// registered with the HandleRegistry.

class SessionPool {
 public:
  SessionPool(std::shared_ptr<const Module> module, CK_SLOT_ID slot, std::size_t max,
              std::chrono::milliseconds max_wait)
      : module_(std::move(module)),
        slot_(slot),
        max_(std::max<std::size_t>(1, max)),
        max_wait_(max_wait) {}

  class Lease {
   public:
    Lease(SessionPool* pool, Session s, std::uint64_t id, std::uint64_t gen)
        : pool_(pool), s_(std::move(s)), id_(id), gen_(gen) {}
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    ~Lease() { pool_->give_back(std::move(s_), id_, gen_, broken_, alive_); }
    Session& session() { return s_; }
    // The session met RV: not given back to the pool. Forgotten when the token closed it
    // already (p11::session_gone), closed otherwise (a lost login leaves the session open).
    void mark_broken(CK_RV rv) {
      broken_ = true;
      alive_ = !p11::session_gone(rv);
    }

   private:
    SessionPool* pool_;
    Session s_;
    std::uint64_t id_;
    std::uint64_t gen_;
    bool broken_ = false;
    bool alive_ = false;
  };

  // Waits (at most MAX_WAIT) while all MAX sessions are leased. Throws TokenError if
  // C_OpenSession fails or no session came free in time (the token is not answering).
  std::unique_ptr<Lease> acquire() {
    std::unique_lock lock(mu_);
    for (;;) {
      if (!cv_.wait_for(lock, max_wait_, [&] { return !idle_.empty() || open_ < max_; })) {
        throw TokenError(
            Error{ErrorCode::kUnavailable,
                  "all " + std::to_string(max_) + " sessions of the key token stayed busy for " +
                      std::to_string(max_wait_.count()) + " ms: the token is not answering"},
            Fault::kCallerError);
      }
      if (idle_.empty()) break;
      Pooled p = std::move(idle_.back());
      idle_.pop_back();
      if (registry().take(key(p.s), p.id))
        return std::make_unique<Lease>(this, std::move(p.s), p.id, gen_);
      --open_;  // its number was given out again: the token closed it
      p.s.forget();
    }
    ++open_;
    std::uint64_t gen = gen_;
    CK_SLOT_ID slot = slot_;
    lock.unlock();
    try {
      Session s = Session::open(module_, slot);
      std::uint64_t id = 0;
      try {
        id = registry().opened(key(s), max_wait_);
      } catch (...) {
        s.forget();  // an older lease may still call with this number: never close it under it
        throw;
      }
      return std::make_unique<Lease>(this, std::move(s), id, gen);
    } catch (...) {
      lock.lock();
      --open_;
      cv_.notify_one();
      throw;
    }
  }

  // FORGET: the token already closed the sessions (do not C_CloseSession stale handles).
  void reset(CK_SLOT_ID slot, bool forget) {
    std::vector<Pooled> drop;
    {
      std::lock_guard lock(mu_);
      ++gen_;
      slot_ = slot;
      open_ -= idle_.size();
      drop.swap(idle_);
    }
    for (auto& p : drop) {
      if (!registry().release(key(p.s), p.id, /*keep=*/false) || forget) p.s.forget();
    }
    cv_.notify_all();
  }

  CK_SLOT_ID slot() const {
    std::lock_guard lock(mu_);
    return slot_;
  }

  // (max, open, leased) right now, for metrics.
  std::tuple<std::size_t, std::size_t, std::size_t> usage() const {
    std::lock_guard lock(mu_);
    return {max_, open_, open_ - idle_.size()};
  }

 private:
  struct Pooled {
    Session s;
    std::uint64_t id = 0;
  };

  static HandleRegistry& registry() { return HandleRegistry::instance(); }
  HandleRegistry::Key key(const Session& s) const {
    return {static_cast<const void*>(module_->f()), s.handle()};
  }

  void give_back(Session s, std::uint64_t id, std::uint64_t gen, bool broken, bool alive) {
    std::unique_lock lock(mu_);
    const bool keep = gen == gen_ && !broken;
    const bool owned = registry().release(key(s), id, keep);
    if (keep && owned) {
      idle_.push_back(Pooled{std::move(s), id});
    } else {
      --open_;
      if (!owned || (broken && !alive)) s.forget();
      lock.unlock();
      s = Session();  // closes outside the lock
    }
    cv_.notify_one();
  }

  std::shared_ptr<const Module> module_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Pooled> idle_;
  std::size_t open_ = 0;
  CK_SLOT_ID slot_;
  std::size_t max_;
  std::chrono::milliseconds max_wait_;
  std::uint64_t gen_ = 0;
};

using Clock = std::chrono::steady_clock;

std::string millis(Clock::duration d) {
  return std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(d).count()) + " ms";
}

// ---------------------------------------------------------------------------------------

struct Token::Impl {
  TokenOptions opts;
  TokenUri uri;
  std::shared_ptr<Module> module;
  SessionPool pool;

  mutable std::mutex state_mu;  // guards the fields below
  std::optional<SecretBytes> pin;
  bool logged_in = false;
  // The retained PIN was refused at a re-login: the token is sealed, not merely never opened.
  bool pin_rejected = false;
  bool degraded = false;
  std::string last_error;
  SlotInfo info;
  // The outage in progress (from the failure that degraded the token until it serves again).
  std::optional<TokenOutage> outage;
  Clock::time_point outage_since;
  // The fault that degraded the token left our sessions open (a lost login): the probe closes
  // them instead of forgetting them.
  std::atomic<bool> outage_sessions_alive{false};

  // Told of outages, outside every other lock. Held while telling, so that once
  // set_health_observer returns the old observer is never called again.
  std::mutex health_mu;
  Token::HealthObserver health_observer;
  void tell(const std::optional<TokenOutage>& o) {
    if (!o) return;
    std::lock_guard lock(health_mu);
    if (health_observer) health_observer(*o);
  }
  // With state_mu held: starts an outage unless one is in progress (a refused re-login marks
  // the one in progress sealed). Returns what to tell the observer.
  std::optional<TokenOutage> begin_outage_locked(const std::string& why, Fault fault,
                                                 const std::string& code, bool sealed) {
    if (outage) {
      if (sealed && !outage->sealed) {
        outage->sealed = true;
        outage->fault = fault;
        outage->code = code;
        outage->cause = why;
        return outage;
      }
      return std::nullopt;
    }
    outage.emplace();
    outage->started = std::chrono::system_clock::now();
    outage->fault = fault;
    outage->code = code.empty() ? to_string(fault) : code;
    outage->cause = why;
    outage->sealed = sealed;
    outage_since = Clock::now();
    return outage;
  }
  // With state_mu held: ends the outage in progress. A sealed one ends only BY_LOGIN.
  std::optional<TokenOutage> end_outage_locked(bool by_login) {
    if (!outage || (outage->sealed && !by_login)) return std::nullopt;
    TokenOutage done = std::move(*outage);
    outage.reset();
    done.ended = std::chrono::system_clock::now();
    done.duration =
        std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - outage_since);
    return done;
  }
  // One operation refused because of the outage in progress.
  void count_refused() {
    std::lock_guard lock(state_mu);
    if (outage) ++outage->refused;
  }

  Token::Observer observer;  // metrics; set once before the token is shared
  WrapChoice wrap;           // decided at open(); opts.wrap is wrap.used
  template <typename R>
  R observed(const char* op, Clock::time_point t0, R r) {
    if (observer) observer(op, r.ok(), Clock::now() - t0);
    return r;
  }

  // SoftHSM requires key generation, object creation and object search to be serialized.
  std::mutex object_mu;

  std::mutex cache_mu;  // resolved handles (SoftHSM rescans files on every find)
  std::map<std::string, CK_OBJECT_HANDLE> handles;
  std::optional<std::vector<std::uint32_t>> versions;

  // Serializes recoveries; timed so that nobody queues behind a recovery stuck on the token.
  std::timed_mutex recover_mu;
  // Bumped by every recovery, login and logout: whatever was resolved under an older epoch
  // (the cached CA key) is stale.
  std::atomic<std::uint64_t> epoch{0};

  // Token calls in progress, by start time (the stall watchdog).
  std::mutex inflight_mu;
  std::multiset<Clock::time_point> inflight;

  // PIN flags of the last C_GetTokenInfo (status() never queues behind another one).
  std::mutex info_query_mu;
  bool pin_count_low = false;
  bool pin_final_try = false;
  bool pin_locked = false;

  // The CA private key (an EVP_PKEY of token_private_key), built once per epoch.
  std::mutex key_mu;
  ossl::EvpPkeyPtr ca_key;
  std::uint64_t ca_key_epoch = 0;

  // Background recovery while degraded.
  std::atomic<std::uint64_t> health_gen{0};  // bumped by mark_healthy (login)
  std::mutex probe_mu;
  std::condition_variable probe_cv;
  bool probe_stop = false;
  std::thread prober;

  // Keys handed out run their private operations through this (see CaKeyLink).
  std::shared_ptr<CaKeyLink> key_link = std::make_shared<CaKeyLink>();

  Impl(TokenOptions o, TokenUri u, std::shared_ptr<Module> m, SlotInfo s)
      : opts(std::move(o)),
        uri(std::move(u)),
        module(std::move(m)),
        pool(module, s.slot_id, opts.pool_size, opts.call_timeout),
        info(std::move(s)) {
    key_link->op = [this](std::uint64_t e, CK_OBJECT_HANDLE key, CK_MECHANISM_TYPE mech, bool sign,
                          std::span<const std::uint8_t> in) {
      return ca_key_operation(e, key, mech, sign, in);
    };
  }

  ~Impl() {
    {
      // Waits for private-key operations in flight; keys still held fail cleanly from now on.
      std::unique_lock lock(key_link->mu);
      key_link->op = nullptr;
    }
    {
      std::lock_guard lock(probe_mu);
      probe_stop = true;
    }
    probe_cv.notify_all();
    if (prober.joinable()) prober.join();
    drop_ca_key();
  }

  CK_FUNCTION_LIST* f() const { return module->f(); }

  // ---- state ----
  bool has_pin() const {
    std::lock_guard lock(state_mu);
    return pin.has_value();
  }
  std::string token_name() const {
    std::lock_guard lock(state_mu);
    return "'" + info.token_label + "'";
  }
  // A login succeeded: the token serves, and any outage (a sealed one too) is over.
  void mark_healthy() {
    std::optional<TokenOutage> ended;
    {
      std::lock_guard lock(state_mu);
      degraded = false;
      last_error.clear();
      health_gen.fetch_add(1);
      ended = end_outage_locked(/*by_login=*/true);
    }
    tell(ended);
  }
  // FAULT and CODE classify the failure for the outage record (CODE: the CKR name, or
  // "stalled"); SEALED: the retained PIN was refused.
  void mark_degraded(const std::string& why, Fault fault = Fault::kTokenGone,
                     const std::string& code = "", bool sealed = false) {
    // A stall keeps its sessions forgotten: closing them could hang the prober too.
    outage_sessions_alive = code != "stalled" && code != "CKR_DEVICE_REMOVED" &&
                            code != "CKR_TOKEN_NOT_PRESENT" && code != "CKR_TOKEN_NOT_RECOGNIZED" &&
                            code != "CKR_SLOT_ID_INVALID" && code != "CKR_CRYPTOKI_NOT_INITIALIZED";
    std::optional<TokenOutage> began;
    {
      std::lock_guard lock(state_mu);
      degraded = true;
      last_error = why;
      began = begin_outage_locked(why, fault, code, sealed);
    }
    tell(began);
    wake_prober();
  }
  bool is_degraded() const {
    std::lock_guard lock(state_mu);
    return degraded;
  }
  void forget_pin() {
    std::lock_guard lock(state_mu);
    pin.reset();
    logged_in = false;
  }

  void drop_caches() {
    std::lock_guard lock(cache_mu);
    handles.clear();
    versions.reset();
  }

  void drop_ca_key() noexcept {
    ossl::EvpPkeyPtr old;
    std::lock_guard lock(key_mu);
    old = std::move(ca_key);
  }

  // ---- stall watchdog ----
  // Registers one token call for the watchdog while it runs (TRACK false: key generation,
  // which may legitimately take seconds).
  class CallTimer {
   public:
    CallTimer(Impl& d, bool track) : d_(d), start_(Clock::now()), track_(track) {
      if (!track_) return;
      d_.ensure_watchdog();
      std::lock_guard lock(d_.inflight_mu);
      it_ = d_.inflight.insert(start_);
    }
    ~CallTimer() {
      if (!track_) return;
      std::lock_guard lock(d_.inflight_mu);
      d_.inflight.erase(it_);
    }
    CallTimer(const CallTimer&) = delete;
    CallTimer& operator=(const CallTimer&) = delete;
    Clock::duration elapsed() const { return Clock::now() - start_; }

   private:
    Impl& d_;
    Clock::time_point start_;
    bool track_;
    std::multiset<Clock::time_point>::iterator it_;
  };

  // How long the oldest call in progress has been waiting, if longer than call_timeout.
  std::optional<Clock::duration> stalled() {
    std::lock_guard lock(inflight_mu);
    if (inflight.empty()) return std::nullopt;
    auto age = Clock::now() - *inflight.begin();
    if (age <= opts.call_timeout) return std::nullopt;
    return age;
  }

  // Error to fail fast with, without touching the token, when it is degraded or stalled.
  // COUNT: an operation is refused (not a status query), for the outage record.
  std::optional<Error> fail_fast(bool count = true) {
    if (!is_degraded()) check_stall();
    std::string why;
    {
      std::lock_guard lock(state_mu);
      if (!degraded) return std::nullopt;
      why = last_error;
      if (count && outage) ++outage->refused;
    }
    wake_prober();
    return Error{ErrorCode::kUnavailable, "the key token is unavailable: " + why +
                                              "; kmsd keeps retrying in the background"};
  }

  // ---- background probe ----
  // The background thread also watches calls in progress: a call that hangs past
  // call_timeout degrades the token even when no other request comes to notice it (every
  // worker may be stuck in such a call), so the outage begins, and is recorded, on time.
  std::atomic<bool> watchdog_started{false};
  void ensure_watchdog() {
    // Every token call passes here: a plain load keeps the common case a shared read instead
    // of a contended read-modify-write on one cache line.
    if (watchdog_started.load(std::memory_order_acquire) || watchdog_started.exchange(true)) return;
    wake_prober();
  }
  void check_stall() {
    if (auto age = stalled())
      mark_degraded("a call to the key token has not returned for " + millis(*age) +
                        " (call timeout " + millis(opts.call_timeout) + ")",
                    Fault::kNone, "stalled");
  }

  void wake_prober() {
    std::lock_guard lock(probe_mu);
    if (probe_stop) return;
    if (!prober.joinable()) prober = std::thread([this] { probe_loop(); });
    probe_cv.notify_all();
  }

  void probe_loop() {
    std::unique_lock lock(probe_mu);
    while (!probe_stop) {
      lock.unlock();
      if (is_degraded())
        probe_once();
      else
        check_stall();
      lock.lock();
      if (probe_stop) break;
      if (is_degraded()) {
        probe_cv.wait_for(lock, opts.probe_interval, [&] { return probe_stop; });
      } else {
        // Watching: often enough to notice a stall within half a call timeout of it.
        const auto watch =
            std::max<Clock::duration>(opts.call_timeout / 2, std::chrono::milliseconds(10));
        probe_cv.wait_for(lock, watch, [&] { return probe_stop || is_degraded(); });
      }
    }
  }

  // One recovery attempt: the token is healthy again only when it answers, in time, and no
  // earlier call is still hanging.
  void probe_once() {
    if (stalled()) return;  // calls still hanging: do not pile more on the token
    const std::uint64_t seen_health = health_gen.load();
    CallTimer timer(*this, true);
    Status st = recover(epoch.load(), outage_sessions_alive.load());
    std::optional<TokenOutage> ended;
    {
      std::lock_guard lock(state_mu);
      if (health_gen.load() != seen_health) return;  // an operator's login decided meanwhile
      if (!st.ok()) {
        degraded = true;
        last_error = st.error().message;
      } else if (timer.elapsed() > opts.call_timeout) {
        degraded = true;
        last_error = "the key token answers, but slowly (recovery took " + millis(timer.elapsed()) +
                     ", call timeout " + millis(opts.call_timeout) + ")";
      } else {
        degraded = false;
        last_error.clear();
        ended = end_outage_locked(/*by_login=*/false);
      }
    }
    tell(ended);
  }

  // The session must be logged in while we hold a PIN: a private object that "does not
  // exist" on a session that lost its login must not be reported as missing.
  void require_login(const Session& s) {
    if (!has_pin()) return;
    CK_SESSION_INFO si{};
    check_rv(f()->C_GetSessionInfo(s.handle(), &si), "C_GetSessionInfo");
    if (si.state != CKS_RW_USER_FUNCTIONS && si.state != CKS_RO_USER_FUNCTIONS) {
      check_rv(CKR_USER_NOT_LOGGED_IN, "C_GetSessionInfo (the session lost its login)");
    }
  }

  // ---- object lookup ----
  // Cached lookup of the one object matching TMPL; nullopt if none.
  std::optional<CK_OBJECT_HANDLE> find_one(const Session& s, const std::string& cache_key,
                                           std::vector<CK_ATTRIBUTE> tmpl,
                                           const std::string& label) {
    {
      std::lock_guard lock(cache_mu);
      if (auto it = handles.find(cache_key); it != handles.end()) return it->second;
    }
    std::vector<CK_OBJECT_HANDLE> found;
    {
      std::lock_guard lock(object_mu);
      found = s.find(tmpl.data(), tmpl.size());
    }
    if (found.empty()) {
      require_login(s);
      return std::nullopt;
    }
    if (found.size() > 1) {
      fail(ErrorCode::kFailedPrecondition,
           std::to_string(found.size()) + " objects labelled '" + label + "' are on token " +
               token_name() +
               "; kmsd needs exactly one: remove the extra ones (pkcs11-tool --list-objects)");
    }
    std::lock_guard lock(cache_mu);
    handles[cache_key] = found[0];
    return found[0];
  }

  std::optional<CK_OBJECT_HANDLE> find_secret(const Session& s, const std::string& label,
                                              CK_KEY_TYPE type) {
    static const CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    return find_one(s, "secret:" + label,
                    {attr(CKA_CLASS, &cls), attr(CKA_KEY_TYPE, &type), attr_str(CKA_LABEL, label)},
                    label);
  }
  std::optional<CK_OBJECT_HANDLE> find_key(const Session& s, CK_OBJECT_CLASS cls,
                                           const std::string& label) {
    return find_one(s, std::to_string(cls) + ":" + label,
                    {attr(CKA_CLASS, &cls), attr_str(CKA_LABEL, label)}, label);
  }

  std::string master_label(std::uint32_t v) const {
    return opts.labels.master_prefix + "-v" + std::to_string(v);
  }
  std::string master_mac_label(std::uint32_t v) const {
    return opts.labels.master_mac_prefix + "-v" + std::to_string(v);
  }

  std::vector<std::uint32_t> scan_versions(const Session& s) {
    {
      std::lock_guard lock(cache_mu);
      if (versions) return *versions;
    }
    static const CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    static const CK_KEY_TYPE type = CKK_AES;
    CK_ATTRIBUTE tmpl[] = {attr(CKA_CLASS, &cls), attr(CKA_KEY_TYPE, &type)};
    std::vector<std::uint32_t> out;
    std::lock_guard olock(object_mu);
    const std::string prefix = opts.labels.master_prefix + "-v";
    for (CK_OBJECT_HANDLE h : s.find(tmpl, 2)) {
      auto raw = s.attribute(h, CKA_LABEL);
      std::string label(raw.begin(), raw.end());
      if (label.size() <= prefix.size() || label.compare(0, prefix.size(), prefix) != 0) continue;
      std::uint32_t v = 0;
      const char* b = label.data() + prefix.size();
      const char* e = label.data() + label.size();
      auto [p, ec] = std::from_chars(b, e, v);
      if (ec != std::errc{} || p != e || v == 0) continue;
      out.push_back(v);
    }
    if (out.empty()) require_login(s);
    std::sort(out.begin(), out.end());
    out.erase(std::unique(out.begin(), out.end()), out.end());
    std::lock_guard lock(cache_mu);
    versions = out;
    return out;
  }

  // ---- recovery ----
  // Re-finds the token (slot ids may change after a re-insert), re-opens the pool, re-logs in
  // with the retained PIN. Runs once per fault even when many threads hit it together.
  // SESSIONS_ALIVE: the fault left the pooled sessions open on the token (a lost login, one
  // invalid session, a device error), so they are closed; otherwise (the token is gone) they
  // are forgotten (see p11::token_gone).
  Status recover(std::uint64_t seen_epoch, bool sessions_alive = false) {
    std::unique_lock rlock(recover_mu, std::defer_lock);
    if (!rlock.try_lock_for(opts.call_timeout)) {
      return make_error(ErrorCode::kUnavailable,
                        "a recovery of the key token has been running for more than " +
                            millis(opts.call_timeout));
    }
    if (epoch.load() != seen_epoch) return {};  // another thread already recovered
    drop_ca_key();
    drop_caches();
    pool.reset(pool.slot(), /*forget=*/!sessions_alive);
    try {
      check_rv(module->initialize(), "C_Initialize");
      std::vector<SlotInfo> slots = p11::slots_with_tokens(*module);
      auto it = std::find_if(slots.begin(), slots.end(),
                             [&](const SlotInfo& s) { return uri.matches(s); });
      if (it == slots.end()) {
        return make_error(ErrorCode::kUnavailable,
                          "token " + uri.text + " is not present; " + describe_tokens(slots));
      }
      {
        std::lock_guard lock(state_mu);
        info = *it;
      }
      pool.reset(it->slot_id, /*forget=*/true);
      std::optional<SecretBytes> pin_copy;
      {
        std::lock_guard lock(state_mu);
        if (pin) pin_copy = pin->clone();
      }
      if (pin_copy) {
        auto lease = pool.acquire();
        CK_RV rv = f()->C_Login(lease->session().handle(), CKU_USER,
                                const_cast<std::uint8_t*>(pin_copy->data()), pin_copy->size());
        Fault fault = p11::classify(rv);
        if (fault == Fault::kPinIncorrect || fault == Fault::kPinLocked) {
          forget_pin();
          {
            std::lock_guard lock(state_mu);
            pin_rejected = true;
          }
          std::string why = fault == Fault::kPinLocked
                                ? "the user PIN is locked; a security officer must reset it"
                                : "the token no longer accepts the retained PIN";
          Error e{fault == Fault::kPinLocked ? ErrorCode::kPinLocked : ErrorCode::kUnauthenticated,
                  "re-login after a lost session failed: " + why + " (" + p11::rv_name(rv) +
                      "); the PIN is forgotten and not tried again: log in (unseal) with the "
                      "current PIN"};
          mark_degraded(e.message, fault, p11::rv_name(rv), /*sealed=*/true);
          return e;
        }
        if (rv != CKR_USER_ALREADY_LOGGED_IN) check_rv(rv, "C_Login");
        require_login(lease->session());  // accepted, and kept: the token really serves again
        std::lock_guard lock(state_mu);
        logged_in = true;
      }
    } catch (const TokenError& e) {
      return e.error;
    }
    epoch.fetch_add(1);
    return {};
  }

  // FAULT and RV: the failure that started it (for the outage record).
  Error unavailable(const std::string& why, Fault fault, CK_RV rv) {
    mark_degraded(why, fault, rv == CKR_OK ? "" : p11::rv_name(rv));
    count_refused();
    return make_error(ErrorCode::kUnavailable, "the key token is unavailable: " + why +
                                                   "; kmsd keeps retrying in the background");
  }

  // A re-login refused during recovery: the PIN is forgotten (the daemon seals). For the
  // operation that ran into it this is an outage, not a wrong credential of its caller.
  static Error sealed_by(const Error& e) { return make_error(ErrorCode::kUnavailable, e.message); }

  // Every operation goes through here: lease a session, run OP, and on a lost session or a
  // gone token drop the pool, re-open, re-login, re-resolve handles and retry once.
  // While degraded (or while a call hangs past call_timeout) it fails fast without touching
  // the token. LONG_CALL: key generation, exempt from the call timeout.
  template <typename Op>
  auto run(std::string_view what, bool needs_login, Op&& op, bool long_call = false)
      -> Result<std::invoke_result_t<Op&, Session&>> {
    auto with_context = [&](const Error& e) { return what.empty() ? e : e.context(what); };
    if (needs_login && !has_pin()) {
      bool rejected = false;
      {
        std::lock_guard lock(state_mu);
        rejected = pin_rejected;
      }
      // A request that races the seal after a refused re-login is told the truth: an outage
      // (503), not a missing step of its own.
      if (rejected) {
        count_refused();
        return with_context(make_error(ErrorCode::kUnavailable,
                                       "the key token " + token_name() +
                                           " no longer accepts the startup secret (PIN changed or "
                                           "locked); kmsd is sealed until it is unsealed again"));
      }
      return with_context(make_error(
          ErrorCode::kFailedPrecondition,
          "the key token " + token_name() + " is not logged in; log in with the user PIN first"));
    }
    if (auto e = fail_fast()) return with_context(*e);
    CallTimer timer(*this, !long_call);
    for (int attempt = 0;; ++attempt) {
      std::uint64_t seen = epoch.load();
      try {
        auto lease = pool.acquire();
        try {
          return op(lease->session());
        } catch (const TokenError& e) {
          if (e.fault == Fault::kSessionLost || e.fault == Fault::kTokenGone)
            lease->mark_broken(e.rv);
          throw;
        }
      } catch (const TokenError& e) {
        if (e.fault != Fault::kSessionLost && e.fault != Fault::kTokenGone) {
          return with_context(e.error);
        }
        if (attempt > 0) return with_context(unavailable(e.error.message, e.fault, e.rv));
        Status st = recover(seen, !p11::token_gone(e.rv));
        if (!st.ok()) {
          if (st.error().code == ErrorCode::kUnauthenticated ||
              st.error().code == ErrorCode::kPinLocked) {
            count_refused();
            return with_context(sealed_by(st.error()));
          }
          return with_context(unavailable(st.error().message, e.fault, e.rv));
        }
      } catch (const std::bad_alloc&) {
        return make_error(ErrorCode::kInternal, "out of memory during a token operation");
      }
    }
  }

  template <typename Op>
  auto run_long(std::string_view what, bool needs_login, Op&& op) {
    return run(what, needs_login, std::forward<Op>(op), /*long_call=*/true);
  }

  // Destroys every object of each of CLASSES labelled with each of LABELS (in that order, under
  // object_mu, through run(): a lost session is recovered and the walk done again), then
  // forgets the resolved handles, and with FORGET_VERSIONS the master key versions, whether or
  // not the walk succeeded. Returns how many objects it destroyed.
  Result<std::size_t> destroy_objects(std::string_view what,
                                      std::initializer_list<CK_OBJECT_CLASS> classes,
                                      std::initializer_list<std::string> labels,
                                      bool forget_versions) {
    auto r = run(what, true, [&](Session& s) {
      std::size_t n = 0;
      std::lock_guard lock(object_mu);
      for (const CK_OBJECT_CLASS& cls : classes) {
        for (const std::string& label : labels) {
          CK_ATTRIBUTE find[] = {attr(CKA_CLASS, &cls), attr_str(CKA_LABEL, label)};
          for (CK_OBJECT_HANDLE h : s.find(find, 2)) {
            check_rv(f()->C_DestroyObject(s.handle(), h), "C_DestroyObject");
            ++n;
          }
        }
      }
      return n;
    });
    std::lock_guard lock(cache_mu);
    handles.clear();
    if (forget_versions) versions.reset();
    return r;
  }

  // ---- data-key protection ----
  Bytes protect(const Session& s, WrapMechanism mech, std::uint32_t v, CK_OBJECT_HANDLE mk,
                const SecretBytes& dk, std::span<const std::uint8_t> binding) {
    switch (mech) {
      case WrapMechanism::kAesKeyWrapPad: {
        static const CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
        static const CK_KEY_TYPE type = CKK_AES;
        CK_ATTRIBUTE tmpl[] = {attr(CKA_CLASS, &cls),           attr(CKA_KEY_TYPE, &type),
                               attr(CKA_TOKEN, &kFalse),        attr(CKA_PRIVATE, &kFalse),
                               attr(CKA_SENSITIVE, &kFalse),    attr(CKA_EXTRACTABLE, &kTrue),
                               attr(CKA_ENCRYPT, &kFalse),      attr(CKA_DECRYPT, &kFalse),
                               attr(CKA_SIGN, &kFalse),         attr(CKA_VERIFY, &kFalse),
                               attr(CKA_WRAP, &kFalse),         attr(CKA_UNWRAP, &kFalse),
                               attr_bytes(CKA_VALUE, dk.span())};
        CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
        {
          std::lock_guard lock(object_mu);
          check_rv(f()->C_CreateObject(s.handle(), tmpl, std::size(tmpl), &h), "C_CreateObject");
        }
        ObjectGuard guard(s, h, &object_mu);
        CK_MECHANISM m{CKM_AES_KEY_WRAP_PAD, nullptr, 0};
        CK_ULONG len = 0;
        check_rv(f()->C_WrapKey(s.handle(), &m, mk, h, nullptr, &len), "C_WrapKey");
        Bytes out(len);
        check_rv(f()->C_WrapKey(s.handle(), &m, mk, h, out.data(), &len), "C_WrapKey");
        out.resize(len);
        return out;
      }
      case WrapMechanism::kAesGcm: {
        Bytes iv = fresh_bytes(12);
        CK_GCM_PARAMS gp{};
        gp.pIv = iv.data();
        gp.ulIvLen = iv.size();
        gp.ulIvBits = iv.size() * 8;
        gp.pAAD = const_cast<std::uint8_t*>(binding.data());  // never empty (header)
        gp.ulAADLen = binding.size();
        gp.ulTagBits = 128;
        CK_MECHANISM m{CKM_AES_GCM, &gp, sizeof gp};
        check_rv(f()->C_EncryptInit(s.handle(), &m, mk), "C_EncryptInit");
        Bytes ct(dk.size() + 16);
        CK_ULONG len = ct.size();
        check_rv(f()->C_Encrypt(s.handle(), const_cast<std::uint8_t*>(dk.data()), dk.size(),
                                ct.data(), &len),
                 "C_Encrypt");
        ct.resize(len);
        Bytes out = iv;
        append(out, ct);
        return out;
      }
      case WrapMechanism::kAesCbcPadHmac: {
        auto mac_key = find_secret(s, master_mac_label(v), CKK_GENERIC_SECRET);
        if (!mac_key) {
          fail(ErrorCode::kNotFound, "master MAC key '" + master_mac_label(v) +
                                         "' is not on the token; generate master key v" +
                                         std::to_string(v) + " with aes-cbc-pad-hmac");
        }
        Bytes iv = fresh_bytes(16);
        CK_MECHANISM m{CKM_AES_CBC_PAD, iv.data(), iv.size()};
        check_rv(f()->C_EncryptInit(s.handle(), &m, mk), "C_EncryptInit");
        Bytes ct(dk.size() + 16);
        CK_ULONG len = ct.size();
        check_rv(f()->C_Encrypt(s.handle(), const_cast<std::uint8_t*>(dk.data()), dk.size(),
                                ct.data(), &len),
                 "C_Encrypt");
        ct.resize(len);
        Bytes out = iv;
        append(out, ct);
        Bytes mac_input(binding.begin(), binding.end());
        append(mac_input, out);
        append(out, hmac(s, *mac_key, mac_input));
        return out;
      }
    }
    fail(ErrorCode::kInvalidArgument, "unknown wrap mechanism");
  }

  SecretBytes unprotect(const Session& s, std::uint8_t mech, std::uint32_t v, CK_OBJECT_HANDLE mk,
                        std::span<const std::uint8_t> wrapped,
                        std::span<const std::uint8_t> binding) {
    switch (static_cast<WrapMechanism>(mech)) {
      case WrapMechanism::kAesKeyWrapPad: {
        static const CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
        static const CK_KEY_TYPE type = CKK_AES;
        CK_ATTRIBUTE tmpl[] = {attr(CKA_CLASS, &cls),        attr(CKA_KEY_TYPE, &type),
                               attr(CKA_TOKEN, &kFalse),     attr(CKA_PRIVATE, &kFalse),
                               attr(CKA_SENSITIVE, &kFalse), attr(CKA_EXTRACTABLE, &kTrue),
                               attr(CKA_ENCRYPT, &kFalse),   attr(CKA_DECRYPT, &kFalse),
                               attr(CKA_WRAP, &kFalse),      attr(CKA_UNWRAP, &kFalse)};
        CK_MECHANISM m{CKM_AES_KEY_WRAP_PAD, nullptr, 0};
        CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
        {
          std::lock_guard lock(object_mu);
          check_rv(f()->C_UnwrapKey(s.handle(), &m, mk, const_cast<std::uint8_t*>(wrapped.data()),
                                    wrapped.size(), tmpl, std::size(tmpl), &h),
                   "C_UnwrapKey");
        }
        ObjectGuard guard(s, h, &object_mu);
        return s.secret_attribute(h, CKA_VALUE);
      }
      case WrapMechanism::kAesGcm: {
        if (wrapped.size() != 12 + envelope::kDataKeyLen + 16) open_failed();
        CK_GCM_PARAMS gp{};
        gp.pIv = const_cast<std::uint8_t*>(wrapped.data());
        gp.ulIvLen = 12;
        gp.ulIvBits = 96;
        gp.pAAD = const_cast<std::uint8_t*>(binding.data());
        gp.ulAADLen = binding.size();
        gp.ulTagBits = 128;
        CK_MECHANISM m{CKM_AES_GCM, &gp, sizeof gp};
        check_rv(f()->C_DecryptInit(s.handle(), &m, mk), "C_DecryptInit");
        auto ct = wrapped.subspan(12);
        SecretBytes out(ct.size());
        CK_ULONG len = out.size();
        check_rv(f()->C_Decrypt(s.handle(), const_cast<std::uint8_t*>(ct.data()), ct.size(),
                                out.data(), &len),
                 "C_Decrypt");
        out.resize(len);
        return out;
      }
      case WrapMechanism::kAesCbcPadHmac: {
        if (wrapped.size() != 16 + 48 + 32) open_failed();
        auto mac_key = find_secret(s, master_mac_label(v), CKK_GENERIC_SECRET);
        if (!mac_key) open_failed();
        auto iv_ct = wrapped.subspan(0, 64);
        Bytes mac_input(binding.begin(), binding.end());
        append(mac_input, iv_ct);
        Bytes mac = hmac(s, *mac_key, mac_input);
        if (!constant_time_equal(mac, wrapped.subspan(64))) open_failed();
        CK_MECHANISM m{CKM_AES_CBC_PAD, const_cast<std::uint8_t*>(wrapped.data()), 16};
        check_rv(f()->C_DecryptInit(s.handle(), &m, mk), "C_DecryptInit");
        SecretBytes out(48);
        CK_ULONG len = out.size();
        check_rv(f()->C_Decrypt(s.handle(), const_cast<std::uint8_t*>(wrapped.data() + 16), 48,
                                out.data(), &len),
                 "C_Decrypt");
        out.resize(len);
        return out;
      }
    }
    open_failed();
  }

  // The data key of parsed blob P under master key MK: unprotect() with every failure that is
  // not a token outage turned into the one uniform open failure.
  SecretBytes unprotect_checked(const Session& s, const envelope::Parsed& p, CK_OBJECT_HANDLE mk,
                                std::span<const std::uint8_t> binding) {
    SecretBytes dk;
    try {
      dk = unprotect(s, p.mechanism, p.master_version, mk, p.wrapped, binding);
    } catch (const TokenError& e) {
      if (e.fault == Fault::kSessionLost || e.fault == Fault::kTokenGone) throw;
      open_failed();
    }
    if (dk.size() != envelope::kDataKeyLen) open_failed();
    return dk;
  }

  Bytes hmac(const Session& s, CK_OBJECT_HANDLE key, std::span<const std::uint8_t> data) {
    CK_MECHANISM m{CKM_SHA256_HMAC, nullptr, 0};
    check_rv(f()->C_SignInit(s.handle(), &m, key), "C_SignInit");
    Bytes out(32);
    CK_ULONG len = out.size();
    check_rv(f()->C_Sign(s.handle(), const_cast<std::uint8_t*>(data.data()), data.size(),
                         out.data(), &len),
             "C_Sign");
    out.resize(len);
    return out;
  }

  // A generated key's object must not exist yet.
  void refuse_existing(const Session& s, CK_OBJECT_CLASS cls, const std::string& label) {
    CK_ATTRIBUTE tmpl[] = {attr(CKA_CLASS, &cls), attr_str(CKA_LABEL, label)};
    if (!s.find(tmpl, 2).empty()) {
      fail(ErrorCode::kAlreadyExists, "a key labelled '" + label + "' is already on token " +
                                          token_name() + "; refusing to generate another");
    }
  }

  // ---- the CA private key ----
  // One private operation (C_Sign when SIGN, else C_Decrypt) with MECH on IN by the CA private
  // key object KEY, resolved in epoch KEY_EPOCH, on a pooled session (lost sessions are
  // recovered as for every operation). A key fetched before a recovery, login or logout is
  // refused: the caller fetches it again (the handles it was resolved with are gone). No
  // lookup per operation: an object destroyed within the epoch makes the token refuse the
  // handle, which recovers, moves the epoch on and so refuses the key the same way.
  Result<Bytes> ca_key_operation(std::uint64_t key_epoch, CK_OBJECT_HANDLE key,
                                 CK_MECHANISM_TYPE mech, bool sign,
                                 std::span<const std::uint8_t> in) {
    return run(std::string(sign ? "signing" : "decrypting") + " with the key '" + opts.labels.ca +
                   "' on the token",
               true, [&](Session& s) -> Bytes {
                 if (epoch.load() != key_epoch) {
                   fail(ErrorCode::kUnavailable,
                        "this handle of the key was fetched before the key token recovered or "
                        "logged in again; fetch the key again");
                 }
                 CK_MECHANISM m{mech, nullptr, 0};
                 Bytes out(1024);  // larger than any signature or RSA block of a CA key
                 CK_ULONG len = out.size();
                 auto* data = const_cast<std::uint8_t*>(in.data());
                 if (sign) {
                   check_rv(f()->C_SignInit(s.handle(), &m, key), "C_SignInit");
                   check_rv(f()->C_Sign(s.handle(), data, in.size(), out.data(), &len), "C_Sign");
                 } else {
                   check_rv(f()->C_DecryptInit(s.handle(), &m, key), "C_DecryptInit");
                   check_rv(f()->C_Decrypt(s.handle(), data, in.size(), out.data(), &len),
                            "C_Decrypt");
                 }
                 out.resize(len);
                 return out;
               });
  }

  // The CA public key object on session S, as an EVP_PKEY.
  ossl::EvpPkeyPtr ca_public(Session& s);
};

// ---------------------------------------------------------------------------------------

Token::Token(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Token::~Token() = default;

Result<std::vector<SlotInfo>> Token::list_slots(const std::string& module_path) {
  KMSD_ASSIGN_OR_RETURN(auto module, Module::load(module_path));
  try {
    return p11::slots_with_tokens(*module);
  } catch (const TokenError& e) {
    return e.error.context("listing the tokens of " + module_path);
  }
}

namespace {

// Whether SLOT offers mechanism M with every flag in FLAGS.
bool offers(const Module& m, CK_SLOT_ID slot, CK_MECHANISM_TYPE mech, CK_FLAGS flags) {
  CK_MECHANISM_INFO info{};
  if (m.f()->C_GetMechanismInfo(slot, mech, &info) != CKR_OK) return false;
  return (info.flags & flags) == flags;
}

bool can_do(const Module& m, CK_SLOT_ID slot, WrapMechanism w) {
  switch (w) {
    case WrapMechanism::kAesKeyWrapPad:
      return offers(m, slot, CKM_AES_KEY_WRAP_PAD, CKF_WRAP | CKF_UNWRAP);
    case WrapMechanism::kAesGcm:
      return offers(m, slot, CKM_AES_GCM, CKF_ENCRYPT | CKF_DECRYPT);
    case WrapMechanism::kAesCbcPadHmac:
      return offers(m, slot, CKM_AES_CBC_PAD, CKF_ENCRYPT | CKF_DECRYPT) &&
             offers(m, slot, CKM_SHA256_HMAC, CKF_SIGN);
  }
  return false;
}

WrapChoice choose_wrap(const Module& m, CK_SLOT_ID slot, WrapMechanism configured) {
  WrapChoice c{configured, configured, ""};
  CK_ULONG n = 0;
  if (m.f()->C_GetMechanismList(slot, nullptr, &n) != CKR_OK || n == 0) return c;
  if (can_do(m, slot, configured)) return c;
  for (WrapMechanism w : {WrapMechanism::kAesGcm, WrapMechanism::kAesCbcPadHmac}) {
    if (w == configured || !can_do(m, slot, w)) continue;
    c.used = w;
    c.note = std::string("the token does not offer ") + to_string(configured) +
             " (token.wrap_mechanism); data keys are protected with " + to_string(w) +
             " instead. Set wrap_mechanism = \"" + to_string(w) + "\" to make this explicit";
    return c;
  }
  c.note = std::string(
               "the token offers none of aes-key-wrap-pad, aes-gcm, aes-cbc-pad-hmac "
               "in its mechanism list; keeping ") +
           to_string(configured) + " (sealing will fail if the token really lacks it)";
  return c;
}

}  // namespace

Result<std::unique_ptr<Token>> Token::open(const TokenOptions& options) {
  KMSD_ASSIGN_OR_RETURN(auto uri, TokenUri::parse(options.token_uri));
  KMSD_ASSIGN_OR_RETURN(auto module, Module::load(options.module_path));
  std::vector<SlotInfo> slots;
  try {
    slots = p11::slots_with_tokens(*module);
  } catch (const TokenError& e) {
    return e.error.context("listing the tokens of " + options.module_path);
  }
  std::vector<SlotInfo> matching;
  for (const auto& s : slots) {
    if (uri.matches(s)) matching.push_back(s);
  }
  if (matching.empty()) {
    return make_error(ErrorCode::kNotFound, "no token matches " + uri.text + "; " +
                                                describe_tokens(slots) +
                                                "; check token.uri in kmsd.toml");
  }
  if (matching.size() > 1) {
    return make_error(ErrorCode::kConfig, std::to_string(matching.size()) + " tokens match " +
                                              uri.text + " (" + describe_tokens(matching) +
                                              "); add serial= to token.uri in kmsd.toml");
  }
  if (!matching[0].initialized) {
    return make_error(ErrorCode::kFailedPrecondition,
                      "token '" + matching[0].token_label +
                          "' is not initialized; initialize it "
                          "first (softhsm2-util --init-token / pkcs11-tool --init-token)");
  }
  // Every use of the mechanism (seal, master-key generation) reads opts.wrap: decide it here.
  const WrapChoice wrap = choose_wrap(*module, matching[0].slot_id, options.wrap);
  TokenOptions effective = options;
  effective.wrap = wrap.used;
  auto impl = std::make_unique<Impl>(effective, std::move(uri), std::move(module), matching[0]);
  impl->wrap = wrap;
  return std::unique_ptr<Token>(new Token(std::move(impl)));
}

Status Token::login(const SecretBytes& pin) {
  Impl& d = *impl_;
  for (int attempt = 0;; ++attempt) {
    std::uint64_t seen = d.epoch.load();
    try {
      // No background recovery runs while we log in: one that reset the module, the pool and
      // the caches in the middle of a login would leave kmsd "logged in" on sessions that are
      // not (a sealed daemon's probe racing the operator's unseal).
      std::unique_lock rlock(d.recover_mu);
      auto lease = d.pool.acquire();
      CK_SESSION_HANDLE h = lease->session().handle();
      auto do_login = [&] {
        return d.f()->C_Login(h, CKU_USER, const_cast<std::uint8_t*>(pin.data()), pin.size());
      };
      CK_RV rv = do_login();
      if (rv == CKR_USER_ALREADY_LOGGED_IN) {
        // Logged in already (another Token in this process, or an earlier login): the token
        // did not check this PIN. Check it, so a wrong PIN is never retained.
        bool same = false;
        {
          std::lock_guard lock(d.state_mu);
          same = d.pin && constant_time_equal(d.pin->span(), pin.span());
        }
        if (!same) {
          d.f()->C_Logout(h);
          rv = do_login();
        } else {
          rv = CKR_OK;
        }
      }
      Fault fault = p11::classify(rv);
      if (fault == Fault::kSessionLost || fault == Fault::kTokenGone) {
        lease->mark_broken(rv);
        if (attempt > 0) check_rv(rv, "C_Login");
        lease.reset();
        d.forget_pin();
        rlock.unlock();
        Status st = d.recover(seen, !p11::token_gone(rv));
        if (!st.ok()) return d.unavailable(st.error().message, fault, rv);
        continue;
      }
      if (fault == Fault::kPinIncorrect) {
        d.forget_pin();
        CK_TOKEN_INFO ti{};
        std::string hint;
        if (d.f()->C_GetTokenInfo(d.pool.slot(), &ti) == CKR_OK) {
          if (ti.flags & CKF_USER_PIN_LOCKED) {
            hint = "; the PIN is now locked";
          } else if (ti.flags & CKF_USER_PIN_FINAL_TRY) {
            hint = "; one more wrong PIN will lock the token";
          } else if (ti.flags & CKF_USER_PIN_COUNT_LOW) {
            hint = "; few tries remain before the token locks";
          }
        }
        return make_error(
            ErrorCode::kUnauthenticated,
            "token " + d.token_name() + " rejected the user PIN (" + p11::rv_name(rv) + ")" + hint);
      }
      if (fault == Fault::kPinLocked) {
        d.forget_pin();
        return make_error(ErrorCode::kPinLocked,
                          "the user PIN of token " + d.token_name() + " is locked or expired (" +
                              p11::rv_name(rv) +
                              "); a security officer must reset it (pkcs11-tool --init-pin "
                              "--login --login-type so)");
      }
      check_rv(rv, "C_Login");
      {
        std::lock_guard lock(d.state_mu);
        d.pin = pin.clone();
        d.pin_rejected = false;
        d.logged_in = true;
      }
      d.drop_caches();  // private objects are visible now
      d.epoch.fetch_add(1);
      d.mark_healthy();
      return {};
    } catch (const TokenError& e) {
      return e.error.context("logging in to token " + d.token_name());
    }
  }
}

void Token::logout() noexcept {
  Impl& d = *impl_;
  d.drop_ca_key();
  d.drop_caches();
  try {
    auto lease = d.pool.acquire();
    d.f()->C_Logout(lease->session().handle());
  } catch (...) {
    // Best effort: the sessions are closed below anyway, which ends the login too.
  }
  d.pool.reset(d.pool.slot(), /*forget=*/false);
  d.forget_pin();
  d.epoch.fetch_add(1);
  d.drop_ca_key();  // one fetched while we logged out
}

bool Token::logged_in() const noexcept {
  std::lock_guard lock(impl_->state_mu);
  return impl_->logged_in;
}

TokenStatus Token::status() const {
  Impl& d = *impl_;
  TokenStatus st;
  // Never waits on the token: no query while it is degraded or stalled, and none while another
  // thread's query is in progress (its flags are used instead).
  const bool healthy = !d.fail_fast(/*count=*/false).has_value();
  CK_RV rv = CKR_OK;
  if (healthy) {
    std::unique_lock q(d.info_query_mu, std::try_to_lock);
    if (q.owns_lock()) {
      CK_TOKEN_INFO ti{};
      {
        Impl::CallTimer timer(d, true);
        rv = d.f()->C_GetTokenInfo(d.pool.slot(), &ti);
      }
      if (rv == CKR_OK) {
        std::lock_guard lock(d.state_mu);
        d.pin_count_low = (ti.flags & CKF_USER_PIN_COUNT_LOW) != 0;
        d.pin_final_try = (ti.flags & CKF_USER_PIN_FINAL_TRY) != 0;
        d.pin_locked = (ti.flags & CKF_USER_PIN_LOCKED) != 0;
      }
    }
  }
  std::lock_guard lock(d.state_mu);
  st.logged_in = d.logged_in;
  st.degraded = d.degraded;
  st.last_error = d.last_error;
  st.token_label = d.info.token_label;
  st.token_serial = d.info.token_serial;
  st.pin_count_low = d.pin_count_low;
  st.pin_final_try = d.pin_final_try;
  st.pin_locked = d.pin_locked;
  if (rv != CKR_OK && st.last_error.empty()) {
    st.last_error = "C_GetTokenInfo failed: " + p11::rv_name(rv);
  }
  return st;
}

// ---- key creation ----

Status Token::generate_master_key(std::uint32_t version) {
  Impl& d = *impl_;
  if (version == 0) {
    return make_error(ErrorCode::kInvalidArgument, "master key versions start at 1");
  }
  const std::string label = d.master_label(version);
  const std::string mac_label = d.master_mac_label(version);
  const WrapMechanism mech = d.opts.wrap;
  auto r = d.run_long("generating master key " + label, true, [&](Session& s) {
    std::lock_guard lock(d.object_mu);
    d.refuse_existing(s, CKO_SECRET_KEY, label);
    if (mech == WrapMechanism::kAesCbcPadHmac) d.refuse_existing(s, CKO_SECRET_KEY, mac_label);
    const bool cipher = mech != WrapMechanism::kAesKeyWrapPad;
    static const CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    static const CK_KEY_TYPE aes = CKK_AES;
    static const CK_ULONG len = 32;
    CK_ATTRIBUTE tmpl[] = {attr(CKA_CLASS, &cls),           attr(CKA_KEY_TYPE, &aes),
                           attr(CKA_VALUE_LEN, &len),       attr(CKA_TOKEN, &kTrue),
                           attr(CKA_PRIVATE, &kTrue),       attr(CKA_SENSITIVE, &kTrue),
                           attr(CKA_EXTRACTABLE, &kFalse),  attr(CKA_WRAP, &kTrue),
                           attr(CKA_UNWRAP, &kTrue),        attr(CKA_ENCRYPT, flag(cipher)),
                           attr(CKA_DECRYPT, flag(cipher)), attr(CKA_SIGN, &kFalse),
                           attr(CKA_VERIFY, &kFalse),       attr(CKA_DERIVE, &kFalse),
                           attr_str(CKA_LABEL, label),      attr_str(CKA_ID, label)};
    CK_MECHANISM m{CKM_AES_KEY_GEN, nullptr, 0};
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    check_rv(d.f()->C_GenerateKey(s.handle(), &m, tmpl, std::size(tmpl), &h), "C_GenerateKey");
    if (mech == WrapMechanism::kAesCbcPadHmac) {
      static const CK_KEY_TYPE gs = CKK_GENERIC_SECRET;
      CK_ATTRIBUTE mt[] = {attr(CKA_CLASS, &cls),          attr(CKA_KEY_TYPE, &gs),
                           attr(CKA_VALUE_LEN, &len),      attr(CKA_TOKEN, &kTrue),
                           attr(CKA_PRIVATE, &kTrue),      attr(CKA_SENSITIVE, &kTrue),
                           attr(CKA_EXTRACTABLE, &kFalse), attr(CKA_SIGN, &kTrue),
                           attr(CKA_VERIFY, &kTrue),       attr(CKA_ENCRYPT, &kFalse),
                           attr(CKA_DECRYPT, &kFalse),     attr(CKA_WRAP, &kFalse),
                           attr(CKA_UNWRAP, &kFalse),      attr(CKA_DERIVE, &kFalse),
                           attr_str(CKA_LABEL, mac_label), attr_str(CKA_ID, mac_label)};
      CK_MECHANISM gm{CKM_GENERIC_SECRET_KEY_GEN, nullptr, 0};
      CK_OBJECT_HANDLE mh = CK_INVALID_HANDLE;
      CK_RV rv = d.f()->C_GenerateKey(s.handle(), &gm, mt, std::size(mt), &mh);
      if (rv != CKR_OK) s.destroy(h);  // no half-made version
      check_rv(rv, "C_GenerateKey");
    }
    std::lock_guard clock(d.cache_mu);
    d.versions.reset();
    return true;
  });
  if (!r.ok()) return r.error();
  return {};
}

Status Token::generate_ca_key(KeyType type) {
  Impl& d = *impl_;
  const std::string& label = d.opts.labels.ca;
  auto r = d.run_long(
      std::string("generating CA key '") + label + "' (" + to_string(type) + ")", true,
      [&](Session& s) {
        std::lock_guard lock(d.object_mu);
        d.refuse_existing(s, CKO_PRIVATE_KEY, label);
        d.refuse_existing(s, CKO_PUBLIC_KEY, label);
        Bytes id = fresh_bytes(16);
        const bool ec = type == KeyType::kEcP256 || type == KeyType::kEcP384;
        static const CK_OBJECT_CLASS pub_cls = CKO_PUBLIC_KEY;
        static const CK_OBJECT_CLASS priv_cls = CKO_PRIVATE_KEY;
        const CK_KEY_TYPE kt = ec ? CKK_EC : CKK_RSA;
        const CK_ULONG bits = type == KeyType::kRsa3072 ? 3072 : 2048;
        static const std::uint8_t e65537[] = {0x01, 0x00, 0x01};
        std::vector<CK_ATTRIBUTE> pub = {attr(CKA_CLASS, &pub_cls),  attr(CKA_KEY_TYPE, &kt),
                                         attr(CKA_TOKEN, &kTrue),    attr(CKA_PRIVATE, &kFalse),
                                         attr(CKA_VERIFY, &kTrue),   attr(CKA_ENCRYPT, &kFalse),
                                         attr(CKA_WRAP, &kFalse),    attr(CKA_DERIVE, &kFalse),
                                         attr_str(CKA_LABEL, label), attr_bytes(CKA_ID, id)};
        if (type == KeyType::kEcP256) {
          pub.push_back(attr(CKA_EC_PARAMS, kOidP256, sizeof kOidP256));
        } else if (type == KeyType::kEcP384) {
          pub.push_back(attr(CKA_EC_PARAMS, kOidP384, sizeof kOidP384));
        } else {
          pub.push_back(attr(CKA_MODULUS_BITS, &bits));
          pub.push_back(attr(CKA_PUBLIC_EXPONENT, e65537, sizeof e65537));
        }
        std::vector<CK_ATTRIBUTE> priv = {
            attr(CKA_CLASS, &priv_cls),      attr(CKA_KEY_TYPE, &kt),
            attr(CKA_TOKEN, &kTrue),         attr(CKA_PRIVATE, &kTrue),
            attr(CKA_SENSITIVE, &kTrue),     attr(CKA_EXTRACTABLE, &kFalse),
            attr(CKA_SIGN, &kTrue),          attr(CKA_DECRYPT, &kFalse),
            attr(CKA_UNWRAP, &kFalse),       attr(CKA_DERIVE, &kFalse),
            attr(CKA_SIGN_RECOVER, &kFalse), attr_str(CKA_LABEL, label),
            attr_bytes(CKA_ID, id)};
        CK_MECHANISM m{ec ? CKM_EC_KEY_PAIR_GEN : CKM_RSA_PKCS_KEY_PAIR_GEN, nullptr, 0};
        CK_OBJECT_HANDLE hpub = CK_INVALID_HANDLE;
        CK_OBJECT_HANDLE hpriv = CK_INVALID_HANDLE;
        check_rv(d.f()->C_GenerateKeyPair(s.handle(), &m, pub.data(), pub.size(), priv.data(),
                                          priv.size(), &hpub, &hpriv),
                 "C_GenerateKeyPair");
        return true;
      });
  if (!r.ok()) return r.error();
  return {};
}

Status Token::generate_audit_key() {
  Impl& d = *impl_;
  const std::string& label = d.opts.labels.audit;
  auto r = d.run_long("generating audit key '" + label + "'", true, [&](Session& s) {
    std::lock_guard lock(d.object_mu);
    d.refuse_existing(s, CKO_SECRET_KEY, label);
    static const CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    static const CK_KEY_TYPE gs = CKK_GENERIC_SECRET;
    static const CK_ULONG len = 32;
    CK_ATTRIBUTE t[] = {
        attr(CKA_CLASS, &cls),          attr(CKA_KEY_TYPE, &gs),    attr(CKA_VALUE_LEN, &len),
        attr(CKA_TOKEN, &kTrue),        attr(CKA_PRIVATE, &kTrue),  attr(CKA_SENSITIVE, &kTrue),
        attr(CKA_EXTRACTABLE, &kFalse), attr(CKA_SIGN, &kTrue),     attr(CKA_VERIFY, &kTrue),
        attr(CKA_ENCRYPT, &kFalse),     attr(CKA_DECRYPT, &kFalse), attr(CKA_WRAP, &kFalse),
        attr(CKA_UNWRAP, &kFalse),      attr(CKA_DERIVE, &kFalse),  attr_str(CKA_LABEL, label),
        attr_str(CKA_ID, label)};
    CK_MECHANISM m{CKM_GENERIC_SECRET_KEY_GEN, nullptr, 0};
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    check_rv(d.f()->C_GenerateKey(s.handle(), &m, t, std::size(t), &h), "C_GenerateKey");
    return true;
  });
  if (!r.ok()) return r.error();
  return {};
}

Result<std::vector<std::uint32_t>> Token::master_key_versions() {
  Impl& d = *impl_;
  return d.run("listing master keys", true, [&](Session& s) { return d.scan_versions(s); });
}

bool Token::has_ca_key() {
  Impl& d = *impl_;
  auto r = d.run("", false, [&](Session& s) {
    return d.find_key(s, CKO_PUBLIC_KEY, d.opts.labels.ca).has_value();
  });
  return r.ok() && *r;
}

bool Token::has_audit_key() {
  Impl& d = *impl_;
  auto r = d.run("", true, [&](Session& s) {
    return d.find_secret(s, d.opts.labels.audit, CKK_GENERIC_SECRET).has_value();
  });
  return r.ok() && *r;
}

// ---- envelope ----

Result<Bytes> Token::seal(std::span<const std::uint8_t> plaintext,
                          std::span<const std::uint8_t> aad, std::uint32_t master_version) {
  return seal_format(plaintext, aad, master_version, false);
}

Result<Bytes> Token::seal_format1_for_test(std::span<const std::uint8_t> plaintext,
                                           std::span<const std::uint8_t> aad,
                                           std::uint32_t master_version) {
  return seal_format(plaintext, aad, master_version, true);
}

Result<Bytes> Token::seal_format(std::span<const std::uint8_t> plaintext,
                                 std::span<const std::uint8_t> aad, std::uint32_t master_version,
                                 bool format1) {
  Impl& d = *impl_;
  const auto t0 = Clock::now();
  const WrapMechanism mech = d.opts.wrap;
  return d.observed("seal", t0, d.run("sealing a record", true, [&](Session& s) -> Bytes {
    std::uint32_t v = master_version;
    if (v == 0) {
      auto all = d.scan_versions(s);
      if (all.empty()) {
        fail(ErrorCode::kFailedPrecondition,
             "no master key '" + d.opts.labels.master_prefix +
                 "-vN' is on the token; generate one first (kmsctl init)");
      }
      v = all.back();
    }
    auto mk = d.find_secret(s, d.master_label(v), CKK_AES);
    if (!mk)
      fail(ErrorCode::kNotFound, "master key '" + d.master_label(v) + "' is not on the token");
    SecretBytes dk = fresh_secret(envelope::kDataKeyLen);
    Bytes nonce = fresh_bytes(envelope::kNonceLen);
    Bytes header = envelope::key_header(mech, v);
    if (format1) header[0] = envelope::kVersion1;
    Bytes binding = format1 ? envelope::bind(header, aad) : envelope::key_binding(header, nonce);
    Bytes wrapped = d.protect(s, mech, v, *mk, dk, binding);
    Bytes blob = envelope::prefix(mech, v, wrapped, nonce);
    if (format1) blob[0] = envelope::kVersion1;
    auto ct =
        envelope::gcm_seal(dk, nonce, plaintext,
                           format1 ? envelope::bind(blob, aad) : envelope::payload_aad(nonce, aad));
    if (!ct.ok()) throw TokenError(ct.error(), Fault::kCallerError);
    append(blob, *ct);
    return blob;
  }));
}

Result<SecretBytes> Token::open(std::span<const std::uint8_t> blob,
                                std::span<const std::uint8_t> aad) {
  Impl& d = *impl_;
  const auto t0 = Clock::now();
  return d.observed("open", t0, d.run("", true, [&](Session& s) -> SecretBytes {
    auto p = envelope::parse(blob);
    if (!p || p->master_version == 0 || p->mechanism < 1 || p->mechanism > 3) open_failed();
    auto mk = d.find_secret(s, d.master_label(p->master_version), CKK_AES);
    if (!mk) open_failed();
    const bool v1 = p->version == envelope::kVersion1;
    SecretBytes dk = d.unprotect_checked(
        s, *p, *mk,
        v1 ? envelope::bind(p->key_header, aad) : envelope::key_binding(p->key_header, p->nonce));
    auto pt = envelope::gcm_open(
        dk, p->nonce, p->ciphertext,
        v1 ? envelope::bind(p->authenticated, aad) : envelope::payload_aad(p->nonce, aad));
    if (!pt.ok()) open_failed();
    return std::move(pt).value();
  }));
}

Result<Bytes> Token::rewrap(std::span<const std::uint8_t> blob, std::uint32_t master_version) {
  Impl& d = *impl_;
  if (master_version == 0)
    return make_error(ErrorCode::kInvalidArgument, "master key versions start at 1");
  auto p = envelope::parse(blob);
  if (!p || p->master_version == 0 || p->mechanism < 1 || p->mechanism > 3)
    return make_error(ErrorCode::kCrypto, envelope::kOpenFailed);
  if (p->version == envelope::kVersion1)
    return make_error(ErrorCode::kFailedPrecondition,
                      "a format-1 sealed record binds its master version into the payload and "
                      "cannot be re-wrapped: open it with its AAD and seal it again");
  const WrapMechanism mech = d.opts.wrap;
  if (p->master_version == master_version && p->mechanism == static_cast<std::uint8_t>(mech))
    return Bytes(blob.begin(), blob.end());
  return d.run("re-wrapping a sealed record under master key " + d.master_label(master_version),
               true, [&](Session& s) -> Bytes {
                 auto old_mk = d.find_secret(s, d.master_label(p->master_version), CKK_AES);
                 if (!old_mk) open_failed();
                 auto new_mk = d.find_secret(s, d.master_label(master_version), CKK_AES);
                 if (!new_mk)
                   fail(ErrorCode::kNotFound,
                        "master key '" + d.master_label(master_version) + "' is not on the token");
                 SecretBytes dk = d.unprotect_checked(
                     s, *p, *old_mk, envelope::key_binding(p->key_header, p->nonce));
                 Bytes binding =
                     envelope::key_binding(envelope::key_header(mech, master_version), p->nonce);
                 Bytes wrapped = d.protect(s, mech, master_version, *new_mk, dk, binding);
                 Bytes out = envelope::prefix(mech, master_version, wrapped, p->nonce);
                 append(out, p->ciphertext);
                 return out;
               });
}

Result<std::size_t> Token::destroy_master_key(std::uint32_t version) {
  Impl& d = *impl_;
  KMSD_ASSIGN_OR_RETURN(auto versions, master_key_versions());
  if (std::find(versions.begin(), versions.end(), version) == versions.end())
    return make_error(ErrorCode::kNotFound,
                      "master key '" + d.master_label(version) + "' is not on the token");
  if (version == versions.back())
    return make_error(ErrorCode::kFailedPrecondition,
                      "master key '" + d.master_label(version) +
                          "' is the newest on the token (new records are sealed under it); "
                          "rotate to a newer version first");
  return d.destroy_objects("destroying master key " + d.master_label(version), {CKO_SECRET_KEY},
                           {d.master_label(version), d.master_mac_label(version)},
                           /*forget_versions=*/true);
}

// ---- signing ----

namespace {

// The public key of TYPE ("EC", "RSA") made of the parameters pushed into BLD.
ossl::EvpPkeyPtr public_key_from(OSSL_PARAM_BLD& bld, const char* type) {
  std::unique_ptr<OSSL_PARAM, ossl::Deleter<OSSL_PARAM_free>> params(OSSL_PARAM_BLD_to_param(&bld));
  ossl::EvpPkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_name(nullptr, type, nullptr));
  EVP_PKEY* key = nullptr;
  if (!params || !ctx || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
      EVP_PKEY_fromdata(ctx.get(), &key, EVP_PKEY_PUBLIC_KEY, params.get()) != 1) {
    throw TokenError(ossl::crypto_error(std::string("building the CA public key (") + type + ")"),
                     Fault::kCallerError);
  }
  return ossl::EvpPkeyPtr(key);
}

ossl::EvpPkeyPtr ec_public_key(std::span<const std::uint8_t> params,
                               std::span<const std::uint8_t> point) {
  const char* group = nullptr;
  if (std::equal(params.begin(), params.end(), std::begin(kOidP256), std::end(kOidP256))) {
    group = "P-256";
  } else if (std::equal(params.begin(), params.end(), std::begin(kOidP384), std::end(kOidP384))) {
    group = "P-384";
  } else {
    fail(ErrorCode::kFailedPrecondition, "the CA key uses an EC curve kmsd does not support");
  }
  // CKA_EC_POINT is a DER OCTET STRING around the point (some tokens give the raw point).
  Bytes raw(point.begin(), point.end());
  if (!point.empty() && point[0] == 0x04 && point.size() >= 2) {
    const unsigned char* p = point.data();
    ASN1_OCTET_STRING* os = d2i_ASN1_OCTET_STRING(nullptr, &p, static_cast<long>(point.size()));
    if (os != nullptr && p == point.data() + point.size()) {
      raw.assign(ASN1_STRING_get0_data(os), ASN1_STRING_get0_data(os) + ASN1_STRING_length(os));
    }
    ASN1_OCTET_STRING_free(os);
    ossl::drain_errors();
  }
  std::unique_ptr<OSSL_PARAM_BLD, ossl::Deleter<OSSL_PARAM_BLD_free>> bld(OSSL_PARAM_BLD_new());
  if (!bld ||
      OSSL_PARAM_BLD_push_utf8_string(bld.get(), OSSL_PKEY_PARAM_GROUP_NAME, group, 0) != 1 ||
      OSSL_PARAM_BLD_push_octet_string(bld.get(), OSSL_PKEY_PARAM_PUB_KEY, raw.data(),
                                       raw.size()) != 1) {
    throw TokenError(ossl::crypto_error("building the CA public key"), Fault::kCallerError);
  }
  return public_key_from(*bld, "EC");
}

ossl::EvpPkeyPtr rsa_public_key(std::span<const std::uint8_t> n, std::span<const std::uint8_t> e) {
  ossl::BignumPtr bn_n(BN_bin2bn(n.data(), static_cast<int>(n.size()), nullptr));
  ossl::BignumPtr bn_e(BN_bin2bn(e.data(), static_cast<int>(e.size()), nullptr));
  std::unique_ptr<OSSL_PARAM_BLD, ossl::Deleter<OSSL_PARAM_BLD_free>> bld(OSSL_PARAM_BLD_new());
  if (!bn_n || !bn_e || !bld ||
      OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_N, bn_n.get()) != 1 ||
      OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_E, bn_e.get()) != 1) {
    throw TokenError(ossl::crypto_error("building the CA public key"), Fault::kCallerError);
  }
  return public_key_from(*bld, "RSA");
}

}  // namespace

ossl::EvpPkeyPtr Token::Impl::ca_public(Session& s) {
  auto h = find_key(s, CKO_PUBLIC_KEY, opts.labels.ca);
  if (!h) {
    fail(ErrorCode::kNotFound, "no CA public key '" + opts.labels.ca +
                                   "' is on the token; generate the CA key "
                                   "first (kmsctl init)");
  }
  CK_KEY_TYPE kt = 0;
  CK_ATTRIBUTE a = attr(CKA_KEY_TYPE, &kt);
  check_rv(f()->C_GetAttributeValue(s.handle(), *h, &a, 1), "C_GetAttributeValue");
  if (kt == CKK_EC) {
    return ec_public_key(s.attribute(*h, CKA_EC_PARAMS), s.attribute(*h, CKA_EC_POINT));
  }
  if (kt == CKK_RSA) {
    return rsa_public_key(s.attribute(*h, CKA_MODULUS), s.attribute(*h, CKA_PUBLIC_EXPONENT));
  }
  fail(ErrorCode::kFailedPrecondition, "the CA key on the token is neither EC nor RSA");
}

Result<ossl::EvpPkeyPtr> Token::ca_public_key() {
  Impl& d = *impl_;
  return d.run("reading the CA public key '" + d.opts.labels.ca + "'", false,
               [&](Session& s) { return d.ca_public(s); });
}

Result<ossl::EvpPkeyPtr> Token::ca_private_key() {
  Impl& d = *impl_;
  const auto t0 = Clock::now();
  return d.observed(
      "ca_key", t0,
      d.run("loading the CA private key '" + d.opts.labels.ca + "'", true,
            [&](Session& s) -> ossl::EvpPkeyPtr {
              // Checks the login on a pooled session, so that a lost session or login is
              // recovered (and the epoch moves on) before a key is handed out.
              CK_SESSION_INFO si{};
              check_rv(d.f()->C_GetSessionInfo(s.handle(), &si), "C_GetSessionInfo");
              if (si.state != CKS_RW_USER_FUNCTIONS && si.state != CKS_RO_USER_FUNCTIONS) {
                check_rv(CKR_USER_NOT_LOGGED_IN, "C_GetSessionInfo");
              }
              const std::uint64_t e = d.epoch.load();
              {
                std::lock_guard lock(d.key_mu);
                if (d.ca_key && d.ca_key_epoch == e) {
                  EVP_PKEY_up_ref(d.ca_key.get());
                  return ossl::EvpPkeyPtr(d.ca_key.get());
                }
              }
              auto h = d.find_key(s, CKO_PRIVATE_KEY, d.opts.labels.ca);
              if (!h) {
                fail(ErrorCode::kNotFound, "no CA private key '" + d.opts.labels.ca +
                                               "' is on the token; generate one first "
                                               "(kmsctl init)");
              }
              auto ref = std::make_unique<CaKeyRef>();
              ref->link = d.key_link;
              ref->epoch = e;
              ref->handle = *h;
              ossl::EvpPkeyPtr pub = d.ca_public(s);
              ossl::EvpPkeyPtr key = token_private_key(pub.get(), std::move(ref));
              {
                // Kept only if no recovery, login or logout happened meanwhile.
                std::lock_guard lock(d.key_mu);
                if (d.epoch.load() == e && (!d.ca_key || d.ca_key_epoch != e)) {
                  EVP_PKEY_up_ref(key.get());
                  d.ca_key.reset(key.get());
                  d.ca_key_epoch = e;
                }
              }
              return key;
            }));
}

// ---- misc ----

Result<Bytes> Token::hmac_sha256(std::span<const std::uint8_t> data) {
  Impl& d = *impl_;
  const auto t0 = Clock::now();
  return d.observed("hmac", t0, d.run("computing the audit HMAC", true, [&](Session& s) {
    auto h = d.find_secret(s, d.opts.labels.audit, CKK_GENERIC_SECRET);
    if (!h) {
      fail(ErrorCode::kNotFound, "no audit key '" + d.opts.labels.audit +
                                     "' is on the token; generate one first (kmsctl init)");
    }
    return d.hmac(s, *h, data);
  }));
}

Result<SecretBytes> Token::random(std::size_t n) {
  Impl& d = *impl_;
  const auto t0 = Clock::now();
  if (n > (1u << 20)) {
    return make_error(ErrorCode::kInvalidArgument, "at most 1 MiB of random bytes per call");
  }
  return d.observed(
      "random", t0, d.run("drawing random bytes from the token", false, [&](Session& s) {
        SecretBytes out(n);
        if (n > 0) check_rv(d.f()->C_GenerateRandom(s.handle(), out.data(), n), "C_GenerateRandom");
        return out;
      }));
}

Status Token::write_data_object(const std::string& label, const SecretBytes& value,
                                bool overwrite) {
  Impl& d = *impl_;
  if (label.empty()) return make_error(ErrorCode::kInvalidArgument, "data object label is empty");
  auto r = d.run("writing data object '" + label + "'", true, [&](Session& s) {
    static const CK_OBJECT_CLASS cls = CKO_DATA;
    CK_ATTRIBUTE find[] = {attr(CKA_CLASS, &cls), attr_str(CKA_LABEL, label)};
    std::lock_guard lock(d.object_mu);
    auto existing = s.find(find, 2);
    if (!existing.empty() && !overwrite) {
      fail(ErrorCode::kAlreadyExists, "a data object labelled '" + label +
                                          "' is already on token " + d.token_name() +
                                          "; refusing to overwrite it");
    }
    static const std::string app = "kmsd";
    CK_ATTRIBUTE t[] = {attr(CKA_CLASS, &cls),
                        attr(CKA_TOKEN, &kTrue),
                        attr(CKA_PRIVATE, &kTrue),
                        attr(CKA_MODIFIABLE, &kTrue),
                        attr_str(CKA_LABEL, label),
                        attr_str(CKA_APPLICATION, app),
                        attr_bytes(CKA_VALUE, value.span())};
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    // Create the new object before removing the old one: a crash in between leaves two
    // copies (read refuses) rather than none.
    check_rv(d.f()->C_CreateObject(s.handle(), t, std::size(t), &h), "C_CreateObject");
    for (CK_OBJECT_HANDLE old : existing) {
      check_rv(d.f()->C_DestroyObject(s.handle(), old), "C_DestroyObject");
    }
    return true;
  });
  if (!r.ok()) return r.error();
  return {};
}

Result<SecretBytes> Token::read_data_object(const std::string& label) {
  Impl& d = *impl_;
  return d.run("reading data object '" + label + "'", true, [&](Session& s) {
    static const CK_OBJECT_CLASS cls = CKO_DATA;
    CK_ATTRIBUTE find[] = {attr(CKA_CLASS, &cls), attr_str(CKA_LABEL, label)};
    std::vector<CK_OBJECT_HANDLE> found;
    {
      std::lock_guard lock(d.object_mu);
      found = s.find(find, 2);
    }
    if (found.empty()) {
      fail(ErrorCode::kNotFound,
           "no data object labelled '" + label + "' is on token " + d.token_name());
    }
    if (found.size() > 1) {
      fail(ErrorCode::kFailedPrecondition, std::to_string(found.size()) +
                                               " data objects labelled '" + label +
                                               "' are on the token; remove the extra ones");
    }
    return s.secret_attribute(found[0], CKA_VALUE);
  });
}

void Token::set_observer(Observer observer) {
  impl_->observer = std::move(observer);
}

const WrapChoice& Token::wrap_choice() const noexcept {
  return impl_->wrap;
}

void Token::set_health_observer(HealthObserver observer) {
  std::lock_guard lock(impl_->health_mu);
  impl_->health_observer = std::move(observer);
}

Token::PoolUsage Token::pool_usage() const {
  auto [size, open, in_use] = impl_->pool.usage();
  return PoolUsage{size, open, in_use};
}

void Token::close_all_sessions_for_test() {
  impl_->f()->C_CloseAllSessions(impl_->pool.slot());
}

Status Token::generate_decryption_key(const std::string& label, KeyType type) {
  if (type != KeyType::kRsa2048 && type != KeyType::kRsa3072)
    return make_error(
        ErrorCode::kInvalidArgument,
        "a decryption key pair is RSA (2048 or 3072 bits); not " + std::string(to_string(type)));
  Impl& d = *impl_;
  auto r = d.run_long(
      "generating decryption key '" + label + "' (" + to_string(type) + ")", true, [&](Session& s) {
        std::lock_guard lock(d.object_mu);
        d.refuse_existing(s, CKO_PRIVATE_KEY, label);
        d.refuse_existing(s, CKO_PUBLIC_KEY, label);
        Bytes id = fresh_bytes(16);
        static const CK_OBJECT_CLASS pub_cls = CKO_PUBLIC_KEY;
        static const CK_OBJECT_CLASS priv_cls = CKO_PRIVATE_KEY;
        static const CK_KEY_TYPE kt = CKK_RSA;
        const CK_ULONG bits = type == KeyType::kRsa3072 ? 3072 : 2048;
        static const std::uint8_t e65537[] = {0x01, 0x00, 0x01};
        CK_ATTRIBUTE pub[] = {attr(CKA_CLASS, &pub_cls),
                              attr(CKA_KEY_TYPE, &kt),
                              attr(CKA_TOKEN, &kTrue),
                              attr(CKA_PRIVATE, &kFalse),
                              attr(CKA_ENCRYPT, &kTrue),
                              attr(CKA_VERIFY, &kFalse),
                              attr(CKA_WRAP, &kFalse),
                              attr(CKA_MODULUS_BITS, &bits),
                              attr(CKA_PUBLIC_EXPONENT, e65537, sizeof e65537),
                              attr_str(CKA_LABEL, label),
                              attr_bytes(CKA_ID, id)};
        CK_ATTRIBUTE priv[] = {attr(CKA_CLASS, &priv_cls),      attr(CKA_KEY_TYPE, &kt),
                               attr(CKA_TOKEN, &kTrue),         attr(CKA_PRIVATE, &kTrue),
                               attr(CKA_SENSITIVE, &kTrue),     attr(CKA_EXTRACTABLE, &kFalse),
                               attr(CKA_DECRYPT, &kTrue),       attr(CKA_SIGN, &kFalse),
                               attr(CKA_UNWRAP, &kFalse),       attr(CKA_DERIVE, &kFalse),
                               attr(CKA_SIGN_RECOVER, &kFalse), attr_str(CKA_LABEL, label),
                               attr_bytes(CKA_ID, id)};
        CK_MECHANISM m{CKM_RSA_PKCS_KEY_PAIR_GEN, nullptr, 0};
        CK_OBJECT_HANDLE hpub = CK_INVALID_HANDLE;
        CK_OBJECT_HANDLE hpriv = CK_INVALID_HANDLE;
        check_rv(d.f()->C_GenerateKeyPair(s.handle(), &m, pub, std::size(pub), priv,
                                          std::size(priv), &hpub, &hpriv),
                 "C_GenerateKeyPair");
        return true;
      });
  if (!r.ok()) return r.error();
  return {};
}

Result<std::size_t> Token::destroy_key_pair(const std::string& label) {
  return impl_->destroy_objects("destroying key pair '" + label + "'",
                                {CKO_PRIVATE_KEY, CKO_PUBLIC_KEY}, {label},
                                /*forget_versions=*/false);
}

}  // namespace kmsd::hsm

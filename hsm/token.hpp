// The key token: every operation kmsd performs with protected keys goes through here.
// A short list of operations on named keys (seal, open, sign via EVP_PKEY, hmac, random),
// so the layer can later move behind a process boundary without touching the services.
#pragma once

#include <openssl/evp.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/ossl.hpp"
#include "common/result.hpp"
#include "common/secret.hpp"

namespace kmsd::hsm {

using Bytes = std::vector<std::uint8_t>;

// How data keys are protected by the master key on the token. Tokens differ: SoftHSM2 and
// most HSMs have AES key wrap; tpm2-pkcs11 has none.
enum class WrapMechanism : std::uint8_t {
  kAesKeyWrapPad = 1,  // CKM_AES_KEY_WRAP_PAD (RFC 5649), C_WrapKey / C_UnwrapKey
  kAesGcm = 2,         // CKM_AES_GCM C_Encrypt / C_Decrypt of the data key (AAD always set)
  kAesCbcPadHmac = 3,  // CKM_AES_CBC_PAD C_Encrypt + CKM_SHA256_HMAC on the token
};
const char* to_string(WrapMechanism m) noexcept;
std::optional<WrapMechanism> parse_wrap_mechanism(
    std::string_view s) noexcept;  // "aes-key-wrap-pad"...

enum class KeyType : std::uint8_t { kEcP256, kEcP384, kRsa2048, kRsa3072 };
const char* to_string(KeyType t) noexcept;  // "ec-p256", "ec-p384", "rsa-2048", "rsa-3072"
std::optional<KeyType> parse_key_type(std::string_view s) noexcept;

// Labels of the objects kmsd keeps on the key token.
struct Labels {
  std::string master_prefix = "kms-master";          // AES-256, versioned: kms-master-v1, -v2, ...
  std::string master_mac_prefix = "kms-master-mac";  // HMAC key for kAesCbcPadHmac only
  std::string ca = "kms-ca";        // CA key pair (private + public share label/id)
  std::string audit = "kms-audit";  // generic secret for CKM_SHA256_HMAC
};

struct TokenOptions {
  std::string module_path;    // e.g. /usr/lib/softhsm/libsofthsm2.so (loaded directly, no proxy)
  std::string token_uri;      // RFC 7512: "pkcs11:token=kmsd" or "pkcs11:serial=..."
  std::size_t pool_size = 4;  // sessions kept open; callers beyond this wait for a free one
  WrapMechanism wrap = WrapMechanism::kAesKeyWrapPad;
  Labels labels;
  // A token call that has not returned after this long makes the token degraded: later
  // operations fail fast (kUnavailable) instead of queueing behind it, and a caller waits at
  // most this long for a free session. Key generation is exempt (RSA-3072 takes seconds).
  std::chrono::milliseconds call_timeout{5000};
  // While degraded, a background thread of the Token re-opens, re-logs in and re-resolves
  // this often until the token answers again; no request waits for it.
  std::chrono::milliseconds probe_interval{200};
};

// Which data-key protection a token can do, from its mechanism list (C_GetMechanismInfo):
// the configured one when the token offers it, else the first of aes-gcm, aes-cbc-pad-hmac
// that it offers (tpm2-pkcs11 has no key wrap), else the configured one unchanged (a token
// that reports no mechanisms is taken at its word when the calls are made). The blob records
// the mechanism it was sealed with, so records sealed before a change still open wherever
// the token can do their mechanism.
struct WrapChoice {
  WrapMechanism configured = WrapMechanism::kAesKeyWrapPad;
  WrapMechanism used = WrapMechanism::kAesKeyWrapPad;
  std::string note;  // why USED differs from CONFIGURED, "" when they are the same
};

// What a failed token call means for the caller. Classified once, in one place.
enum class Fault {
  kNone,
  kCallerError,   // bad arguments, missing object, wrong data: retrying will not help
  kSessionLost,   // session handle invalid/closed, user not logged in: reopened + retried
  kTokenGone,     // device removed/error, token not present: reopened + retried, else degraded
  kPinIncorrect,  // wrong PIN
  kPinLocked,     // PIN locked or expired: only a security officer can fix it
};

// "session-lost", "token-gone", "pin-incorrect", "pin-locked", "caller-error", "none".
const char* to_string(Fault f) noexcept;

// One outage of the key token: from the failure that degraded it until it serves again.
// A stall (a call past call_timeout) has fault kNone and code "stalled". An outage whose
// re-login the token refused (sealed) ends only at the next login (the operator's unseal),
// not when the token merely answers again.
struct TokenOutage {
  std::chrono::system_clock::time_point started;
  std::optional<std::chrono::system_clock::time_point> ended;  // unset while it lasts
  std::chrono::milliseconds duration{0};                       // steady clock; set at the end
  Fault fault = Fault::kNone;  // as classified (p11::classify) from the first failure
  std::string code;            // "CKR_DEVICE_REMOVED", ..., or "stalled"
  std::string cause;           // the first failure as operator text (never a secret)
  std::uint64_t refused = 0;   // token operations refused (failed fast) while it lasted
  bool sealed = false;         // the retained PIN was refused: the daemon sealed
};

// Token state as an operator would want it on /readyz.
struct TokenStatus {
  bool logged_in = false;
  // The token failed (lost, erroring, or a call stalled past call_timeout) and has not been
  // recovered yet: operations fail fast with kUnavailable; a background probe recovers it.
  bool degraded = false;
  std::string token_label;
  std::string token_serial;
  bool pin_count_low = false;  // CKF_USER_PIN_COUNT_LOW
  bool pin_final_try = false;  // CKF_USER_PIN_FINAL_TRY
  bool pin_locked = false;     // CKF_USER_PIN_LOCKED
  std::string last_error;      // human text of the last fault, "" if none
};

struct SlotInfo {
  unsigned long slot_id = 0;
  std::string token_label;
  std::string token_serial;
  std::string manufacturer;
  std::string model;
  bool initialized = false;
};

// Thread-safety: every method is safe to call from several threads at once. Calls that
// need a session lease one from the pool and wait (at most call_timeout) while it is exhausted.
//
// Faults: a lost session or login, a removed or erroring device is recovered at once (re-open,
// re-login with the retained PIN, re-resolve handles) and the operation retried once; if that
// fails the token is degraded: operations fail fast with kUnavailable, status() says why,
// and a background probe recovers the token when it answers again. A PIN the token no longer
// accepts is forgotten (logged_in() turns false: the daemon seals) and never retried.
class Token {
 public:
  // Loads the module (C_Initialize; CKR_CRYPTOKI_ALREADY_INITIALIZED is fine), finds the
  // token by URI. Does not log in.
  static Result<std::unique_ptr<Token>> open(const TokenOptions& options);
  ~Token();

  // Slots with a token present on this module (for error messages and `kmsctl token list`).
  static Result<std::vector<SlotInfo>> list_slots(const std::string& module_path);

  // Logs in as user with PIN and keeps a copy of it (wiped on logout/destruction) so that a
  // lost session or a re-inserted token can be re-logged in without an operator.
  // Errors: kUnauthenticated (wrong PIN), kPinLocked, kUnavailable.
  Status login(const SecretBytes& pin);
  // Forgets the PIN, drops cached handles and the cached CA key, logs out, closes sessions.
  void logout() noexcept;
  bool logged_in() const noexcept;
  TokenStatus status() const;
  // The data-key protection in use (decided once, at open()).
  const WrapChoice& wrap_choice() const noexcept;

  // ---- metrics ----
  // Told of every seal, open, hmac, random and CA-key fetch: a fixed operation name ("seal",
  // "open", "hmac", "random", "ca_key"), whether it succeeded, and its wall time (waiting for
  // a session and any recovery included). Set once, before the token is shared between
  // threads; it runs on the caller's thread and must be quick and must not throw.
  using Observer = std::function<void(const char* op, bool ok, std::chrono::nanoseconds elapsed)>;
  void set_observer(Observer observer);
  struct PoolUsage {
    std::size_t size = 0;    // sessions the pool may hold (pool_size)
    std::size_t open = 0;    // sessions open now
    std::size_t in_use = 0;  // of those, leased to an operation now
  };
  PoolUsage pool_usage() const;
  // Told when an outage starts (ended unset) and when it ends (ended, duration and refused
  // set). Runs on whichever thread saw the change, with no lock of the Token held; it must be
  // quick and must not throw or call this Token (queue the work elsewhere). May be set at any
  // time; once this returns the previous observer is not called again (pass nullptr before
  // destroying what it refers to).
  using HealthObserver = std::function<void(const TokenOutage&)>;
  void set_health_observer(HealthObserver observer);

  // ---- key creation (kmsctl init, rotation); refuse with kAlreadyExists if present ----
  // AES-256: CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE, !CKA_EXTRACTABLE, CKA_WRAP/UNWRAP (and
  // ENCRYPT/DECRYPT only when the mechanism needs them). kAesCbcPadHmac also creates the
  // matching master MAC key.
  Status generate_master_key(std::uint32_t version);
  // CA key pair via C_GenerateKeyPair; private key sensitive, non-extractable, CKA_SIGN only.
  Status generate_ca_key(KeyType type);
  // Generic secret (32 bytes) for CKM_SHA256_HMAC, sensitive, non-extractable, SIGN/VERIFY.
  Status generate_audit_key();
  // Which master-key versions exist on the token, ascending.
  Result<std::vector<std::uint32_t>> master_key_versions();
  bool has_ca_key();
  bool has_audit_key();

  // ---- envelope escrow ----
  // Seals PLAINTEXT: AES-256-GCM in software under a fresh random data key, the data key
  // protected by master key VERSION (the newest if 0) with the configured mechanism.
  // AAD is bound by the caller (user id, key id, ...); the blob header is authenticated too.
  // Blob format: see hsm/envelope.hpp.
  Result<Bytes> seal(std::span<const std::uint8_t> plaintext, std::span<const std::uint8_t> aad,
                     std::uint32_t master_version = 0);
  // Opens a blob sealed by seal() under any master-key version still on the token.
  // Any tampering, a wrong AAD or a missing key gives kCrypto with one uniform message.
  Result<SecretBytes> open(std::span<const std::uint8_t> blob, std::span<const std::uint8_t> aad);
  // Master-key rotation: BLOB (format 2) with its data key protected by master key
  // MASTER_VERSION and the configured mechanism instead; nonce, payload and tag unchanged, so
  // the caller's AAD is not needed and the result opens with the same AAD. The data key passes
  // through this process's memory (a cleansing buffer), as in open(). A blob already under
  // MASTER_VERSION with the configured mechanism is returned as it is. A format-1 blob is
  // kFailedPrecondition (open and seal it again); a blob that does not unwrap is kCrypto with
  // the uniform open-failure message; kNotFound when MASTER_VERSION is not on the token.
  Result<Bytes> rewrap(std::span<const std::uint8_t> blob, std::uint32_t master_version);
  // Destroys master key VERSION (and its MAC key) on the token; the number of objects destroyed.
  // kNotFound when it is not there; kFailedPrecondition for the newest version (the one new
  // records are sealed under). Records still sealed under it no longer open: callers check.
  Result<std::size_t> destroy_master_key(std::uint32_t version);

  // ---- signing ----
  // An EVP_PKEY whose private operations run on the token, for X509_sign, X509_CRL_sign,
  // OCSP_basic_sign, CMS_sign and CMS_decrypt (RSA: PKCS#1 v1.5, PSS, OAEP). Each operation
  // leases a session of this Token's pool (C_Sign / C_Decrypt on the private object), so a
  // lost session is recovered like any other operation's, and every signature is checked with
  // the public key before OpenSSL gets it: a signature that does not verify is an error,
  // never an answer. The key is built once per epoch and cached (a reference to the same
  // EVP_PKEY is returned, safe to use from several threads); each call checks the login on a
  // pooled session, so a lost login is recovered first. A key fetched before a recovery,
  // login or logout fails cleanly (kUnavailable in the OpenSSL error text): fetch again and
  // retry once when a signature fails. A key used after its Token is destroyed fails cleanly.
  Result<ossl::EvpPkeyPtr> ca_private_key();
  // The CA public key (no login needed for the public object).
  Result<ossl::EvpPkeyPtr> ca_public_key();

  // ---- misc ----
  Result<Bytes> hmac_sha256(std::span<const std::uint8_t> data);  // with the audit key
  Result<SecretBytes> random(std::size_t n);                      // C_GenerateRandom

  // Private CKO_DATA objects (operator cards hold the startup secret this way).
  Status write_data_object(const std::string& label, const SecretBytes& value, bool overwrite);
  Result<SecretBytes> read_data_object(const std::string& label);

  // For tests and fault drills: close every session of the application on this token
  // (C_CloseAllSessions). The next operation must recover by itself.
  void close_all_sessions_for_test();
  // For tests of old stores: seals in envelope format 1, as kmsd did before format 2.
  Result<Bytes> seal_format1_for_test(std::span<const std::uint8_t> plaintext,
                                      std::span<const std::uint8_t> aad,
                                      std::uint32_t master_version = 0);

  // ---- decryption key pairs (the DR custody key) ----
  // An RSA key pair (kRsa2048 or kRsa3072; EC is kInvalidArgument) labelled LABEL on both
  // halves: the private half sensitive, not extractable, CKA_DECRYPT only (no sign, unwrap or
  // derive), the public half CKA_ENCRYPT only. kAlreadyExists when a key labelled LABEL is there.
  Status generate_decryption_key(const std::string& label, KeyType type);
  // Destroys every private and public key labelled LABEL (C_DestroyObject); the number
  // destroyed (0 when none was there). Drops cached handles.
  Result<std::size_t> destroy_key_pair(const std::string& label);

 private:
  struct Impl;
  explicit Token(std::unique_ptr<Impl> impl);
  Result<Bytes> seal_format(std::span<const std::uint8_t> plaintext,
                            std::span<const std::uint8_t> aad, std::uint32_t master_version,
                            bool format1);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kmsd::hsm

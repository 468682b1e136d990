// One-time enrollment (and recovery) tokens: typable secrets an administrator hands to a
// user, stored only sealed under the master key, single use, expiring and attempt-limited.
//
// Token text: 120 random bits from the key token's RNG (hsm::Token::random), written as 24
// Crockford base32 characters (0123456789ABCDEFGHJKMNPQRSTVWXYZ, 5 bits each, most
// significant bit first) in 6 groups of 4: "7KQ2-M9XD-3F0A-...". The canonical token value
// is the 15 bytes the 24 characters encode; that is what is sealed and compared.
//
// Reading a typed token is tolerant, as Crockford specifies: case-insensitive, I and L read
// as 1, O as 0, hyphens and spaces ignored. Anything else (including U) or a length other
// than 24 is "malformed" and does not count as a failed attempt. That is safe because a
// malformed input can never be the token, so it teaches a guesser nothing, and the guessing
// budget does not need typo attempts to be charged: with 120 bits and 5 counted attempts per
// token, the chance of guessing a token before it locks is 5 / 2^120 (about 4e-36).
//
// Sealed record format, version 1 (integers big-endian):
//
//   offset   size   field
//   0        1      record version = 0x01
//   1        8      expires_at, Unix seconds (u64)
//   9        n      Token::seal() blob of the 15 token bytes (format: hsm/envelope.hpp)
//
//   AAD = "kmsd-enrollment-token-v1" || 0x00 || u64(len(user_id)) || user_id || u64(expires_at)
//
// The AAD binds the record to its user and its expiry: a record copied to another user's row
// or given a later expiry fails to open (kSealedRecordInvalid). The expiry in the header is
// only trusted after the record has opened.
//
// The token text lives only in SecretBytes, has no operator<<, and never appears in a
// message: verdict sentences describe the problem without echoing what was typed, except
// the single character that is not in the alphabet (which can never be part of a token).
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/result.hpp"
#include "common/secret.hpp"
#include "hsm/token.hpp"

namespace kmsd::lifecycle {

inline constexpr std::size_t kTokenBytes = 15;  // 120 bits
inline constexpr std::size_t kTokenChars = 24;  // 120 / 5
inline constexpr std::size_t kTokenGroupChars = 4;
inline constexpr std::size_t kTokenDisplayChars = kTokenChars + kTokenChars / kTokenGroupChars - 1;
inline constexpr const char* kTokenAlphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";
inline constexpr std::uint8_t kSealedTokenVersion = 1;
inline constexpr std::size_t kSealedTokenHeaderLen = 9;
inline constexpr const char* kTokenAadLabel = "kmsd-enrollment-token-v1";

// Defaults until the configuration is wired in.
inline constexpr std::chrono::seconds kDefaultTokenTtl = std::chrono::days(14);
inline constexpr std::uint32_t kDefaultMaxAttempts = 5;

// The 24-character display form ("XXXX-XXXX-...") of 15 token bytes.
SecretBytes encode_token(std::span<const std::uint8_t> value);

// The 15 bytes a typed token encodes, or kInvalidArgument with a sentence naming the problem
// ("expected 24 characters, got 23"). The message never contains the typed text.
Result<SecretBytes> decode_token(const SecretBytes& typed);

// What is kept in the store for an outstanding token.
struct SealedToken {
  std::vector<std::uint8_t> record;  // format above
  // A copy of the expiry inside the record, for the store to index and report on. check()
  // ignores it and uses the authenticated value inside the record.
  std::chrono::sys_seconds expires_at{};
};

struct IssuedToken {
  SecretBytes text;  // display form, to hand to the user once; never stored or logged
  SealedToken sealed;
};

enum class Verdict : std::uint8_t {
  kAccepted,             // the token matches: enroll, and consume it in the same transaction
  kMismatch,             // wrong token: counts as a failed attempt
  kExpired,              // past expires_at: an administrator must reissue
  kLocked,               // max_attempts failed attempts already: an administrator must reissue
  kUsed,                 // already consumed: single use
  kMalformed,            // cannot be a token (typo): not counted
  kSealedRecordInvalid,  // record tampered with, or belongs to another user
};
// "accepted", "mismatch", "expired", "locked", "used", "malformed", "sealed-record-invalid".
const char* to_string(Verdict v) noexcept;

struct TokenCheck {
  Verdict verdict = Verdict::kMismatch;
  std::string message;  // for the user or administrator; never contains the token
  // Failed attempts still allowed after this check (0 when locked).
  std::uint32_t attempts_remaining = 0;
  // Only a mismatch is charged: the caller increments its counter when this is true.
  bool counts_as_failed_attempt() const noexcept { return verdict == Verdict::kMismatch; }
};

// Issues and checks tokens with the key token's RNG and master key.
// Thread-safety: safe from several threads (it keeps no state; hsm::Token is thread-safe).
class EnrollmentTokens {
 public:
  explicit EnrollmentTokens(hsm::Token& token) : token_(token) {}

  // A fresh token for USER_ID expiring at NOW + TTL. kInvalidArgument for an empty user id or
  // a TTL that is not positive; token errors as the token reports them.
  Result<IssuedToken> issue(std::string_view user_id, std::chrono::sys_seconds now,
                            std::chrono::seconds ttl = kDefaultTokenTtl);

  // Checks PRESENTED against SEALED for USER_ID. Order: used, locked, malformed, record opens,
  // expired, value. An Error only for faults that are nobody's attempt (token unavailable,
  // max_attempts of 0); every answer about the token itself is a Verdict.
  Result<TokenCheck> check(const SecretBytes& presented, const SealedToken& sealed,
                           std::string_view user_id, std::chrono::sys_seconds now,
                           std::uint32_t failed_attempts_so_far,
                           std::uint32_t max_attempts = kDefaultMaxAttempts,
                           bool already_used = false);

  // The display text of the token sealed in SEALED for USER_ID. Only for completing the one
  // delivery of a token — a bulk-enable run that was killed before it wrote its result file
  // and is started again for the same job — never for showing a token a second time to
  // anyone else. kCrypto when the record does not open for this user.
  Result<SecretBytes> reveal(const SealedToken& sealed, std::string_view user_id);

  // Master-key rotation: RECORD (the sealed token record of USER_ID) with its blob protected
  // by master key MASTER_VERSION, as envelope format 2: re-wrapped (the sealed token itself is
  // unchanged), or a format-1 blob opened and sealed again. kCrypto when it does not open.
  Result<std::vector<std::uint8_t>> rewrap(std::span<const std::uint8_t> record,
                                           std::string_view user_id, std::uint32_t master_version);
  // The master-key version RECORD's blob is sealed under; nullopt for an unreadable record.
  static std::optional<std::uint32_t> master_version_of(std::span<const std::uint8_t> record);

 private:
  hsm::Token& token_;
};

}  // namespace kmsd::lifecycle

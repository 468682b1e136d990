#include "daemon/lifecycle/enrollment_token.hpp"

#include <cstring>

#include "common/clock.hpp"
#include "hsm/envelope.hpp"

namespace kmsd::lifecycle {

namespace {

void put_u64(std::vector<std::uint8_t>& out, std::uint64_t v) {
  for (int i = 7; i >= 0; --i) out.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
}

std::uint64_t get_u64(std::span<const std::uint8_t> s) {
  std::uint64_t v = 0;
  for (std::uint8_t b : s) v = (v << 8) | b;
  return v;
}

std::vector<std::uint8_t> token_aad(std::string_view user_id, std::uint64_t expires_at) {
  std::vector<std::uint8_t> aad(kTokenAadLabel, kTokenAadLabel + std::strlen(kTokenAadLabel));
  aad.push_back(0);
  put_u64(aad, user_id.size());
  aad.insert(aad.end(), user_id.begin(), user_id.end());
  put_u64(aad, expires_at);
  return aad;
}

// Crockford value of C, or -1. Hyphens and spaces are handled by the caller.
int crockford_value(unsigned char c) {
  if (c >= 'a' && c <= 'z') c = static_cast<unsigned char>(c - 'a' + 'A');
  if (c == 'O') return 0;
  if (c == 'I' || c == 'L') return 1;
  if (c == 0) return -1;
  const char* p = std::strchr(kTokenAlphabet, c);
  if (p == nullptr) return -1;
  return static_cast<int>(p - kTokenAlphabet);
}

std::string describe_char(unsigned char c) {
  if (c >= 0x21 && c < 0x7f) return std::string("'") + static_cast<char>(c) + "'";
  static const char* hex = "0123456789abcdef";
  return std::string("byte 0x") + hex[c >> 4] + hex[c & 0xf];
}

std::string attempts_text(std::uint32_t n) {
  return std::to_string(n) + (n == 1 ? " attempt" : " attempts");
}

std::string remain_text(std::uint32_t n) {
  return attempts_text(n) + (n == 1 ? " remains" : " remain");
}

TokenCheck verdict(Verdict v, std::string message, std::uint32_t remaining) {
  return TokenCheck{v, std::move(message), remaining};
}

}  // namespace

SecretBytes encode_token(std::span<const std::uint8_t> value) {
  SecretBytes out(kTokenDisplayChars);
  std::size_t pos = 0;
  std::uint32_t acc = 0;
  int bits = 0;
  std::size_t chars = 0;
  for (std::uint8_t b : value) {
    acc = (acc << 8) | b;
    bits += 8;
    while (bits >= 5) {
      bits -= 5;
      if (chars > 0 && chars % kTokenGroupChars == 0) out.data()[pos++] = '-';
      out.data()[pos++] = static_cast<std::uint8_t>(kTokenAlphabet[(acc >> bits) & 0x1f]);
      ++chars;
    }
  }
  out.resize(pos);
  return out;
}

Result<SecretBytes> decode_token(const SecretBytes& typed) {
  SecretBytes out(kTokenBytes);
  std::size_t chars = 0;
  std::size_t written = 0;
  std::uint32_t acc = 0;
  int bits = 0;
  for (std::size_t i = 0; i < typed.size(); ++i) {
    unsigned char c = typed.data()[i];
    if (c == '-' || c == ' ') continue;
    int v = crockford_value(c);
    if (v < 0) {
      std::string hint = (c == 'U' || c == 'u') ? " (tokens never contain U; check for a V)" : "";
      return make_error(ErrorCode::kInvalidArgument,
                        "character " + std::to_string(i + 1) + " is " + describe_char(c) +
                            ", which is not used in enrollment tokens" + hint);
    }
    ++chars;
    if (chars > kTokenChars) continue;  // keep counting for the message, stop decoding
    acc = (acc << 5) | static_cast<std::uint32_t>(v);
    bits += 5;
    if (bits >= 8) {
      bits -= 8;
      out.data()[written++] = static_cast<std::uint8_t>(acc >> bits);
    }
  }
  if (chars != kTokenChars) {
    return make_error(ErrorCode::kInvalidArgument, "expected " + std::to_string(kTokenChars) +
                                                       " characters, got " + std::to_string(chars));
  }
  return out;
}

const char* to_string(Verdict v) noexcept {
  switch (v) {
    case Verdict::kAccepted:
      return "accepted";
    case Verdict::kMismatch:
      return "mismatch";
    case Verdict::kExpired:
      return "expired";
    case Verdict::kLocked:
      return "locked";
    case Verdict::kUsed:
      return "used";
    case Verdict::kMalformed:
      return "malformed";
    case Verdict::kSealedRecordInvalid:
      return "sealed-record-invalid";
  }
  return "unknown";
}

Result<IssuedToken> EnrollmentTokens::issue(std::string_view user_id, std::chrono::sys_seconds now,
                                            std::chrono::seconds ttl) {
  if (user_id.empty()) {
    return make_error(ErrorCode::kInvalidArgument, "an enrollment token needs a user id");
  }
  if (ttl <= std::chrono::seconds::zero()) {
    return make_error(ErrorCode::kInvalidArgument,
                      "an enrollment token's lifetime must be positive, got " +
                          std::to_string(ttl.count()) + " seconds");
  }
  std::chrono::sys_seconds expires_at = now + ttl;
  auto expires = static_cast<std::uint64_t>(expires_at.time_since_epoch().count());

  KMSD_ASSIGN_OR_RETURN(SecretBytes value, token_.random(kTokenBytes));
  KMSD_ASSIGN_OR_RETURN(hsm::Bytes blob, token_.seal(value.span(), token_aad(user_id, expires)));

  IssuedToken out;
  out.text = encode_token(value.span());
  out.sealed.record.push_back(kSealedTokenVersion);
  put_u64(out.sealed.record, expires);
  out.sealed.record.insert(out.sealed.record.end(), blob.begin(), blob.end());
  out.sealed.expires_at = expires_at;
  return out;
}

Result<SecretBytes> EnrollmentTokens::reveal(const SealedToken& sealed, std::string_view user_id) {
  std::span<const std::uint8_t> rec(sealed.record);
  if (rec.size() <= kSealedTokenHeaderLen || rec[0] != kSealedTokenVersion)
    return make_error(ErrorCode::kCrypto, "the stored token record is not a version 1 record");
  const std::uint64_t expires = get_u64(rec.subspan(1, 8));
  KMSD_ASSIGN_OR_RETURN(
      auto value, token_.open(rec.subspan(kSealedTokenHeaderLen), token_aad(user_id, expires)));
  if (value.size() != kTokenBytes)
    return make_error(ErrorCode::kCrypto, "the stored token record has the wrong length");
  return encode_token(value.span());
}

Result<std::vector<std::uint8_t>> EnrollmentTokens::rewrap(std::span<const std::uint8_t> rec,
                                                           std::string_view user_id,
                                                           std::uint32_t master_version) {
  if (rec.size() <= kSealedTokenHeaderLen || rec[0] != kSealedTokenVersion)
    return make_error(ErrorCode::kCrypto, "the stored token record is not a version 1 record");
  auto blob = rec.subspan(kSealedTokenHeaderLen);
  auto parsed = hsm::envelope::parse(blob);
  if (!parsed) return make_error(ErrorCode::kCrypto, hsm::envelope::kOpenFailed);
  hsm::Bytes moved;
  if (parsed->version == hsm::envelope::kVersion1) {
    const auto aad = token_aad(user_id, get_u64(rec.subspan(1, 8)));
    KMSD_ASSIGN_OR_RETURN(auto value, token_.open(blob, aad));
    KMSD_ASSIGN_OR_RETURN(moved, token_.seal(value.span(), aad, master_version));
  } else {
    KMSD_ASSIGN_OR_RETURN(moved, token_.rewrap(blob, master_version));
  }
  std::vector<std::uint8_t> out(rec.begin(), rec.begin() + kSealedTokenHeaderLen);
  out.insert(out.end(), moved.begin(), moved.end());
  return out;
}

std::optional<std::uint32_t> EnrollmentTokens::master_version_of(
    std::span<const std::uint8_t> rec) {
  if (rec.size() <= kSealedTokenHeaderLen || rec[0] != kSealedTokenVersion) return std::nullopt;
  auto parsed = hsm::envelope::parse(rec.subspan(kSealedTokenHeaderLen));
  if (!parsed) return std::nullopt;
  return parsed->master_version;
}

Result<TokenCheck> EnrollmentTokens::check(const SecretBytes& presented, const SealedToken& sealed,
                                           std::string_view user_id, std::chrono::sys_seconds now,
                                           std::uint32_t failed_attempts_so_far,
                                           std::uint32_t max_attempts, bool already_used) {
  if (max_attempts == 0) {
    return make_error(ErrorCode::kInvalidArgument, "max_attempts must be at least 1");
  }
  const std::uint32_t remaining =
      failed_attempts_so_far >= max_attempts ? 0 : max_attempts - failed_attempts_so_far;

  if (already_used) {
    return verdict(Verdict::kUsed,
                   "this token has already been used to enroll; a token works once, ask an "
                   "administrator for a new one",
                   remaining);
  }
  if (remaining == 0) {
    return verdict(Verdict::kLocked,
                   "this token is locked after " + attempts_text(failed_attempts_so_far) +
                       " with a wrong token; an administrator must reissue it",
                   0);
  }
  auto value = decode_token(presented);
  if (!value.ok()) {
    return verdict(Verdict::kMalformed,
                   "this is not a well-formed token (" + value.error().message +
                       "); it was not counted as an attempt, " + remain_text(remaining),
                   remaining);
  }

  static constexpr const char* kRecordInvalid =
      "the stored token record does not belong to this user or was altered; an administrator "
      "must reissue the token";
  std::span<const std::uint8_t> rec(sealed.record);
  if (rec.size() <= kSealedTokenHeaderLen || rec[0] != kSealedTokenVersion) {
    return verdict(Verdict::kSealedRecordInvalid, kRecordInvalid, remaining);
  }
  const std::uint64_t expires = get_u64(rec.subspan(1, 8));
  auto opened = token_.open(rec.subspan(kSealedTokenHeaderLen), token_aad(user_id, expires));
  if (!opened.ok()) {
    if (opened.error().code == ErrorCode::kCrypto) {
      return verdict(Verdict::kSealedRecordInvalid, kRecordInvalid, remaining);
    }
    return opened.error().context("opening the sealed enrollment token");
  }
  if (opened->size() != kTokenBytes) {
    return verdict(Verdict::kSealedRecordInvalid, kRecordInvalid, remaining);
  }

  // Only trusted now: the expiry is part of the AAD the record opened with.
  const std::chrono::sys_seconds expires_at{
      std::chrono::seconds(static_cast<std::int64_t>(expires))};
  if (now >= expires_at) {
    return verdict(
        Verdict::kExpired,
        "this token expired at " + utc_text(expires_at) + "; an administrator must reissue it",
        remaining);
  }

  if (!constant_time_equal(value->span(), opened->span())) {
    const std::uint32_t left = remaining - 1;
    std::string next = left == 0 ? "no attempts remain: the token is now locked and an "
                                   "administrator must reissue it"
                                 : remain_text(left) + " before the token locks";
    return verdict(Verdict::kMismatch, "this is not the token issued to this user; " + next, left);
  }
  return verdict(Verdict::kAccepted, "token accepted", remaining);
}

}  // namespace kmsd::lifecycle

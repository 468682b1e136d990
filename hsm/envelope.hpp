// The escrow envelope: the versioned blob that seal() writes and open() reads. Payload
// AES-256-GCM in software under a fresh data key; the data key protected on the token.
//
// Blob layout, formats 1 and 2 (all integers big-endian):
//
//   offset   size   field
//   0        1      format version: 0x02 (written by seal() and rewrap() now), 0x01 (older)
//   1        1      mechanism protecting the data key (WrapMechanism: 1 key-wrap-pad,
//                   2 AES-GCM on the token, 3 AES-CBC-PAD + HMAC-SHA256 on the token)
//   2        4      master-key version N (label "<master_prefix>-vN"; never 0)
//   6        2      W = length of the protected data key
//   8        W      protected data key, by mechanism:
//                     1: RFC 5649 AES key wrap with padding of the 32-byte data key (40 bytes)
//                     2: iv(12) || AES-256-GCM(data key)(32) || tag(16); token-side AAD is
//                        the key binding below
//                     3: iv(16) || AES-256-CBC-PAD(data key)(48) || HMAC-SHA256(32) with the
//                        master MAC key "<master_mac_prefix>-vN" over
//                        key binding || iv || ciphertext
//   8+W      12     payload nonce
//   20+W     n+16   payload ciphertext || 16-byte GCM tag
//
// Format 2 (master-key rotation re-wraps the data key without touching the payload):
//   key binding  = bytes [0, 6) || payload nonce           (format, mechanism, master version)
//   payload AAD  = 0x02 || payload nonce || u64(len(aad)) || aad
// The payload AAD leaves out the mechanism, the master version and the protected data key, so
// rewrap() replaces exactly those (bytes [1, 8+W)) and keeps nonce, ciphertext and tag. The
// master version stays bound to the data key: for AES-GCM it is in the token-side AAD, for
// CBC+HMAC in the MAC input, for key-wrap-pad only master key vN unwraps the data key (the
// RFC 5649 integrity check fails under any other key, and a wrong data key fails the payload
// tag). The nonce in the key binding ties a protected data key to its own payload: a data key
// moved from another blob fails to unwrap (GCM, CBC+HMAC) or fails the payload tag (key wrap).
// The caller's AAD is bound by the payload alone, so it must not contain anything rotation
// changes (the master version): callers keep it in their record and check it against the
// header instead (see daemon/enroll escrow_aad).
//
// Format 1 (records sealed before format 2; still opened, never written):
//   key binding  = bytes [0, 6) || u64(len(aad)) || aad
//   payload AAD  = bytes [0, 20+W) || u64(len(aad)) || aad
// Its payload AAD covers the master version and the protected data key, so a format-1 blob
// cannot be re-wrapped: rotation opens it with its AAD and seals it again as format 2 (the
// payload is re-encrypted once, under a fresh data key).
//
// In both formats a blob moved to another record (other AAD), a changed header field, a
// swapped data key or a flipped bit anywhere fails to open. Readers bounds-check every slice.
#pragma once

#include <cstdint>
#include <optional>
#include <span>

#include "common/result.hpp"
#include "common/secret.hpp"
#include "hsm/token.hpp"

namespace kmsd::hsm::envelope {

inline constexpr std::uint8_t kVersion = 2;        // written by seal() and rewrap()
inline constexpr std::uint8_t kVersion1 = 1;       // read only
inline constexpr std::size_t kFixedHeaderLen = 8;  // version, mechanism, master, W
inline constexpr std::size_t kKeyHeaderLen = 6;    // version, mechanism, master
inline constexpr std::size_t kNonceLen = 12;
inline constexpr std::size_t kTagLen = 16;
inline constexpr std::size_t kDataKeyLen = 32;
inline constexpr std::size_t kMaxWrappedLen = 1024;

// The one message for every way open() can fail on the data (tampering, wrong AAD, missing
// master key), so the failure says nothing about which part was wrong.
inline constexpr const char* kOpenFailed =
    "sealed record could not be opened: it was altered, belongs to another record, or its "
    "master key is gone";

struct Parsed {
  std::uint8_t version = 0;
  std::uint8_t mechanism = 0;
  std::uint32_t master_version = 0;
  std::span<const std::uint8_t> key_header;     // [0, 6)
  std::span<const std::uint8_t> wrapped;        // protected data key
  std::span<const std::uint8_t> nonce;          // payload nonce
  std::span<const std::uint8_t> authenticated;  // [0, 20+W)
  std::span<const std::uint8_t> ciphertext;     // ciphertext || tag
};

// Splits BLOB (format 1 or 2); nullopt if any length is out of bounds or the format unknown.
std::optional<Parsed> parse(std::span<const std::uint8_t> blob);

// The first 6 bytes of a format-2 blob.
std::vector<std::uint8_t> key_header(WrapMechanism m, std::uint32_t master_version);

// Format 2: KEY_HEADER || NONCE (the token-side binding of the protected data key).
std::vector<std::uint8_t> key_binding(std::span<const std::uint8_t> key_header,
                                      std::span<const std::uint8_t> nonce);
// Format 2: 0x02 || NONCE || u64(len(aad)) || AAD (the payload's GCM AAD).
std::vector<std::uint8_t> payload_aad(std::span<const std::uint8_t> nonce,
                                      std::span<const std::uint8_t> aad);

// PREFIX || u64(len(aad)) || aad.
std::vector<std::uint8_t> bind(std::span<const std::uint8_t> prefix,
                               std::span<const std::uint8_t> aad);

// Writes format 2 version..nonce (everything before the ciphertext).
std::vector<std::uint8_t> prefix(WrapMechanism m, std::uint32_t master_version,
                                 std::span<const std::uint8_t> wrapped,
                                 std::span<const std::uint8_t> nonce);

// Software AES-256-GCM of the payload: returns ciphertext || tag.
Result<std::vector<std::uint8_t>> gcm_seal(const SecretBytes& key,
                                           std::span<const std::uint8_t> nonce,
                                           std::span<const std::uint8_t> plaintext,
                                           std::span<const std::uint8_t> aad);
// Inverse of gcm_seal; kCrypto with kOpenFailed on any failure.
Result<SecretBytes> gcm_open(const SecretBytes& key, std::span<const std::uint8_t> nonce,
                             std::span<const std::uint8_t> ciphertext_and_tag,
                             std::span<const std::uint8_t> aad);

}  // namespace kmsd::hsm::envelope

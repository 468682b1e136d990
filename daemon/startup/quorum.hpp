// k-of-n quorum of operator cards: the startup secret split with Shamir's scheme over GF(256)
// (libgfshare), one share per card, and the collector that holds presented shares until k of
// them rebuild the secret.
//
// Share blob, version 1 (the CKA_VALUE of the private CKO_DATA object on each card):
//
//   offset      size  field
//   0           4     magic "KMSQ"
//   4           1     version = 1
//   5           1     k: shares needed (2..n)
//   6           1     n: shares made (2..255)
//   7           1     index of this share (1..n; the x coordinate given to libgfshare)
//   8           16    quorum id: random, the same on every share of one split
//   24          2     L: secret length, big-endian (1..4096)
//   26          32*n  D_1..D_n: D_i = SHA-256("kmsd quorum share v1" | quorum id | i | share_i)
//   26+32n      L     share_i (libgfshare)
//
// The digest list lets the daemon refuse a damaged or forged share before it is combined, so
// a wrong reconstruction never costs a PIN try on the key token. Its price: anyone holding
// k-1 shares could test guesses of the secret against it, so the startup secret must be
// long and random (kmsctl card split warns about short ones). With fewer than k-1 shares
// nothing about the secret can be learnt.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/result.hpp"
#include "common/secret.hpp"

namespace kmsd::startup {

inline constexpr std::size_t kQuorumIdSize = 16;
inline constexpr std::size_t kMaxQuorumSecret = 4096;

// One share, parsed. The share bytes are secret.
struct Share {
  unsigned k = 0;
  unsigned n = 0;
  unsigned index = 0;
  std::array<std::uint8_t, kQuorumIdSize> quorum_id{};
  std::vector<std::array<std::uint8_t, 32>> digests;  // n entries
  SecretBytes value;                                  // the libgfshare share, L bytes

  std::string quorum_id_hex() const;
  // Does VALUE hash to digests[index-1]?
  bool digest_matches() const;
};

// Parses a share blob; kInvalidArgument saying what is wrong.
Result<Share> parse_share(std::span<const std::uint8_t> blob);
// Serializes a share to the blob format above.
SecretBytes encode_share(const Share& s);

// Splits SECRET into N shares of which any K rebuild it (2 <= K <= N <= 255), under a fresh
// random quorum id. Randomness from OpenSSL's RAND_priv_bytes.
Result<std::vector<Share>> split_secret(const SecretBytes& secret, unsigned k, unsigned n);
// Rebuilds the secret from K distinct shares of one split (checked).
Result<SecretBytes> combine_shares(std::span<const Share> shares);

// What the collector holds, for operators (never the shares themselves).
struct QuorumProgress {
  std::string quorum_id;  // hex
  unsigned k = 0;
  unsigned n = 0;
  std::vector<unsigned> indexes;  // of the shares held, ascending
  std::chrono::seconds expires_in{0};
  unsigned held() const { return static_cast<unsigned>(indexes.size()); }
  bool complete() const { return k != 0 && held() >= k; }
  std::string text() const;  // "1 of 2 shares (quorum 3f2a19c0, shares held: 2)"
};

// Holds presented shares until k of them are present. The first share fixes the quorum;
// later ones must belong to it. Pending shares expire TTL after the first was accepted.
// Not thread-safe: the owner serializes calls.
class ShareCollector {
 public:
  using Clock = std::chrono::steady_clock;
  explicit ShareCollector(std::chrono::seconds ttl) : ttl_(ttl) {}

  // Accepts one share blob. Errors (nothing held changes):
  //   kInvalidArgument  malformed, damaged (digest mismatch) or of another quorum;
  //   kAlreadyExists    a share with the same index is already held.
  Result<QuorumProgress> add(std::span<const std::uint8_t> blob,
                             Clock::time_point now = Clock::now());
  // The secret once k shares are held; the pending shares are dropped either way.
  Result<SecretBytes> take_secret();
  std::optional<QuorumProgress> progress(Clock::time_point now = Clock::now()) const;
  // Drops the pending shares when their time is up; true if something was dropped.
  bool expire(Clock::time_point now = Clock::now());
  // Drops the pending shares; true if there were any.
  bool clear();

 private:
  std::chrono::seconds ttl_;
  std::vector<Share> shares_;
  Clock::time_point started_{};
};

}  // namespace kmsd::startup

// Unsealing with operator cards (startup sources "card" and "quorum"): the operator gives a
// card PIN (kmsctl unseal, or the terminal); kmsd logs in to the card, reads the secret or
// the share, logs out of the card and forgets its PIN. With a quorum the shares are held in
// memory (wiping buffers) until the k-th arrives; only then is the secret rebuilt and
// presented to the seal. Pending shares expire, and can be dropped at any time.
#pragma once

#include <chrono>
#include <mutex>
#include <optional>
#include <string>

#include "common/result.hpp"
#include "common/secret.hpp"
#include "daemon/startup/operator_card.hpp"
#include "daemon/startup/quorum.hpp"
#include "daemon/startup/seal.hpp"

namespace kmsd::startup {

struct CardUnsealSettings {
  bool quorum = false;      // false: one card holds the whole secret
  std::string module;       // PKCS#11 module of the card reader
  std::string default_uri;  // card used when the operator names none; may be empty
  std::string label;        // label of the CKO_DATA object on the cards
  std::chrono::seconds pending_ttl{600};
};

// What one presentation achieved.
struct Presented {
  bool unsealed = false;
  std::string message;                   // for the operator
  std::optional<QuorumProgress> quorum;  // quorum: the shares held now
};

// Thread-safety: all methods may be called concurrently. Presentations are serialized; the
// status hook never waits for a card.
class CardUnseal {
 public:
  CardUnseal(Seal& seal, CardUnsealSettings settings);
  ~CardUnseal();
  CardUnseal(const CardUnseal&) = delete;
  CardUnseal& operator=(const CardUnseal&) = delete;

  // Presents the card at CARD_URI (the configured card if empty) with its PIN.
  // Errors: kUnauthenticated (wrong card PIN), kPinLocked, kNotFound, kInvalidArgument (not a
  // share, a share of another quorum, damaged), kAlreadyExists (the same share again),
  // kFailedPrecondition (no card named), and the seal's own errors once the secret is known.
  Result<Presented> present(const SecretBytes& card_pin, const std::string& card_uri);
  // Drops the pending quorum shares; true if there were any.
  bool cancel();
  // Expires pending shares whose time is up (called periodically).
  void tick();

  const CardUnsealSettings& settings() const { return settings_; }

 private:
  Result<Presented> add_share(const SecretBytes& blob);
  void fill_status(SealStatus& s);

  Seal& seal_;
  CardUnsealSettings settings_;
  std::mutex present_mu_;        // one presentation at a time (card I/O is slow)
  mutable std::mutex state_mu_;  // guards the fields below; held only briefly
  ShareCollector shares_;
  std::optional<CardReport> last_card_;
};

}  // namespace kmsd::startup

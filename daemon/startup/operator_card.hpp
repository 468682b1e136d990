// Operator cards: any PKCS#11 token (a smart card through OpenSC, a SoftHSM token in tests)
// holding the startup secret, or one quorum share of it, as a private CKO_DATA object.
// Used by kmsd to unseal and by `kmsctl card provision|split` to write cards.
#pragma once

#include <string>
#include <vector>

#include "common/result.hpp"
#include "common/secret.hpp"
#include "hsm/token.hpp"

namespace kmsd::startup {

// Which card: a PKCS#11 module and an RFC 7512 URI that must match exactly one token on it.
struct CardLocation {
  std::string module;
  std::string uri;
};

// What a card said about itself during the last attempt (its PIN state included).
struct CardReport {
  std::string label;
  std::string serial;
  bool pin_count_low = false;  // CKF_USER_PIN_COUNT_LOW
  bool pin_final_try = false;  // CKF_USER_PIN_FINAL_TRY
  bool pin_locked = false;     // CKF_USER_PIN_LOCKED
  bool known = false;          // false when the card could not even be opened
  // "the card reports ONE try left before its PIN locks", ... for messages.
  std::string pin_state() const;
};

// A token that must not be used as an operator card (the key token itself): a wrong card
// PIN there would cost the key token a PIN try.
struct ForbiddenToken {
  std::string label;
  std::string serial;
};

// Logs in to the card with CARD_PIN, reads the private data object LABEL, logs out and forgets
// the PIN. REPORT (if given) receives the card's identity and PIN state after the attempt.
// Errors: kUnauthenticated (wrong card PIN; the message says the card's PIN state),
// kPinLocked, kNotFound (no such card or object), kFailedPrecondition (the card is the key
// token, or ambiguous), kUnavailable.
Result<SecretBytes> read_card_object(const CardLocation& where, const SecretBytes& card_pin,
                                     const std::string& label, CardReport* report = nullptr,
                                     const ForbiddenToken* not_this = nullptr);

// Writes VALUE as the private data object LABEL on the card; an existing object is kept
// (kAlreadyExists) unless OVERWRITE. Cards in REFUSE (e.g. the ones written a moment ago, when
// one reader serves a whole quorum and the operator forgot to swap cards) are refused before
// the login (kFailedPrecondition).
Status write_card_object(const CardLocation& where, const SecretBytes& card_pin,
                         const std::string& label, const SecretBytes& value, bool overwrite,
                         CardReport* report = nullptr,
                         const std::vector<ForbiddenToken>& refuse = {});

}  // namespace kmsd::startup

// A user's state as the store keeps it and as the lifecycle state machine reasons about it:
// the two enums name the same four states (the machine also has kNone, a user not yet known).
// Header-only: for the services that link both the store and the lifecycle.
#pragma once

#include "daemon/lifecycle/state_machine.hpp"
#include "daemon/store/store.hpp"

namespace kmsd::lifecycle {

inline UserState from_store(store::UserState s) {
  switch (s) {
    case store::UserState::kEnabled:
      return UserState::kEnabled;
    case store::UserState::kActive:
      return UserState::kActive;
    case store::UserState::kRevoked:
      return UserState::kRevoked;
    case store::UserState::kRecovery:
      return UserState::kRecovery;
  }
  return UserState::kNone;
}

// kNone has no stored form: a user is stored once enabled.
inline store::UserState to_store(UserState s) {
  switch (s) {
    case UserState::kActive:
      return store::UserState::kActive;
    case UserState::kRevoked:
      return store::UserState::kRevoked;
    case UserState::kRecovery:
      return store::UserState::kRecovery;
    default:
      return store::UserState::kEnabled;
  }
}

}  // namespace kmsd::lifecycle

// The sandbox token opened through the token layer and logged in with the test PIN.
#pragma once

#include <memory>

#include "hsm/token.hpp"
#include "tests/support/sandbox.hpp"

namespace kmsd::testing {

// Fails the current test (and returns nullptr) when the token cannot be opened or logged in.
std::unique_ptr<hsm::Token> open_logged_in_token(const SoftHsmToken& sandbox);

}  // namespace kmsd::testing

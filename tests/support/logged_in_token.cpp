#include "tests/support/logged_in_token.hpp"

namespace kmsd::testing {

std::unique_ptr<hsm::Token> open_logged_in_token(const SoftHsmToken& sandbox) {
  hsm::TokenOptions o;
  o.module_path = kSoftHsmModule;
  o.token_uri = sandbox.uri();
  auto t = hsm::Token::open(o);
  if (!t.ok()) {
    ADD_FAILURE() << t.error().message;
    return nullptr;
  }
  if (auto st = (*t)->login(SecretBytes::from_string(kUserPin)); !st.ok()) {
    ADD_FAILURE() << st.error().message;
    return nullptr;
  }
  return std::move(*t);
}

}  // namespace kmsd::testing

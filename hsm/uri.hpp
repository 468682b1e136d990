// RFC 7512 token URIs ("pkcs11:token=kmsd;serial=1234"): the subset kmsd needs to pick one
// token on a module. Object attributes (object=, id=, type=) do not name a token and are refused.
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "common/result.hpp"
#include "hsm/token.hpp"

namespace kmsd::hsm {

struct TokenUri {
  std::optional<std::string> token;  // CK_TOKEN_INFO.label
  std::optional<std::string> serial;
  std::optional<std::string> manufacturer;
  std::optional<std::string> model;
  std::optional<unsigned long> slot_id;
  std::string text;  // as written, for messages

  // Errors: kInvalidArgument with what is wrong and where.
  static Result<TokenUri> parse(std::string_view uri);
  bool matches(const SlotInfo& s) const;
};

}  // namespace kmsd::hsm

// JSON that carries a secret (an escrowed private key on its way to its owner or to an
// administrator's export): every string of it, the serialized text and the response body are
// wiped when released, so no copy of the key is left behind in freed heap memory.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/secret.hpp"
#include "daemon/api/http_server.hpp"

namespace kmsd::api {

using SecretString = std::basic_string<char, std::char_traits<char>, WipingAllocator<char>>;
using SecretJson = nlohmann::basic_json<std::map, std::vector, SecretString>;

// 200 with J as its body, Cache-Control: no-store. The text is serialized into wiping memory
// and copied once into a body of exactly its size (no reallocation leaves a copy behind);
// the server wipes every response body once it is written.
inline Response secret_json_response(const Request& req, const SecretJson& j) {
  const SecretString text = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  std::string body;
  body.reserve(text.size());
  body.append(text.data(), text.size());
  auto res = json_response(req, http::status::ok, std::move(body));
  res.set(http::field::cache_control, "no-store");
  return res;
}

}  // namespace kmsd::api

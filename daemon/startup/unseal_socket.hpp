// The local unseal socket: how `kmsctl unseal|seal|status` reach a daemon that has no
// terminal (systemd). A Unix stream socket, mode 0600, peers checked with SO_PEERCRED.
//
// Wire format, version 1. One request per connection:
//   request  = header-line [secret]
//   header-line = JSON object on one line, terminated by '\n', at most 4096 bytes:
//                 {"v":1,"op":"status"} | {"v":1,"op":"seal"} |
//                 {"v":1,"op":"unseal","secret_length":N}   (1 <= N <= 4096)
//                 {"v":1,"op":"unseal","secret_length":N,"card":"pkcs11:token=op1"}
//                 {"v":1,"op":"cancel"}
//                 {"v":1,"op":"card_split_request","plan":{k,cards,module,label}}
//                 {"v":1,"op":"card_split_begin","request":ID,"plan":{...}}
//                 {"v":1,"op":"card_split_done","request":ID,"ok":true,"quorum":HEX}
//                 {"v":1,"op":"card_split_done","request":ID,"ok":false,"error":TEXT}
//   secret   = exactly N raw bytes (only for "unseal"); never JSON, so the secret lands
//              straight in a wiping buffer and in no string or log. With the "card" and
//              "quorum" startup sources these bytes are the operator card's PIN (and "card",
//              optional, names the card on the configured module); otherwise they are the
//              startup secret itself.
//   response = one JSON line: {"ok":true,"state":"unsealed",...} or
//              {"ok":false,"error":"what happened and what to do","code":"unauthenticated",
//               "state": ...}; with cards also "message" ("share accepted: 1 of 2 shares
//              ..."), "source", "quorum" {id,k,n,held,shares,expires_in_seconds,progress} and
//              "card" {label,serial,pin_count_low,pin_final_try,pin_locked}.
//   "cancel" drops pending quorum shares; "seal" drops them too.
//   card_split_*: the approval gate of `kmsctl card split` while kmsd is unsealed (see
//   card_split_gate.hpp); replies add "request", "approvals", "required" and "message".
#pragma once

#include <atomic>
#include <filesystem>
#include <functional>
#include <string>
#include <thread>

#include "common/fd.hpp"
#include "common/result.hpp"
#include "common/secret.hpp"
#include "daemon/startup/card_split_gate.hpp"
#include "daemon/startup/card_unseal.hpp"
#include "daemon/startup/seal.hpp"

namespace kmsd::startup {

class UnsealSocket {
 public:
  // Binds PATH (removing a stale socket, creating the parent directory 0700 if missing).
  // CARDS, when given, takes the unseal requests (card PINs) instead of the seal. SPLIT, when
  // given, answers the card_split_* requests.
  static Result<std::unique_ptr<UnsealSocket>> listen(const std::filesystem::path& path, Seal& seal,
                                                      CardUnseal* cards = nullptr,
                                                      CardSplitGate* split = nullptr);
  ~UnsealSocket();  // stops the thread, removes the socket file

 private:
  UnsealSocket(std::filesystem::path path, UniqueFd fd, Seal& seal, CardUnseal* cards,
               CardSplitGate* split);
  void serve();
  void handle(int client);
  // The card_split_* ops: the reply's extra fields, or the error.
  Result<nlohmann::json> card_split(const std::string& op, const nlohmann::json& req,
                                    const std::string& who);

  std::filesystem::path path_;
  UniqueFd fd_;
  Seal& seal_;
  CardUnseal* cards_;
  CardSplitGate* split_;
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

// Client side, used by kmsctl. Returns the daemon's JSON reply line.
// EXTRA fields are added to the request header (e.g. {"card": URI}).
Result<std::string> unseal_request(const std::filesystem::path& socket, const std::string& op,
                                   const SecretBytes* secret = nullptr,
                                   const std::string& extra_json = "");

// JSON text of a seal status (shared by the socket and /readyz).
std::string status_json(const SealStatus& s);

}  // namespace kmsd::startup

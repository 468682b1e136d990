#include "daemon/audit/audit_log.hpp"

#include <ctime>

#include "common/clock.hpp"
#include "common/ossl.hpp"

namespace kmsd::audit {

using json = nlohmann::json;

namespace {

constexpr const char* kHeadSetting = "audit_head";
constexpr std::string_view kRecordDomain = "kmsd-audit-v1";
constexpr std::string_view kHeadDomain = "kmsd-audit-head-v1";

ossl::Bytes zero_hash() {
  return ossl::Bytes(32, 0);
}

ossl::Bytes chain_hash(std::span<const std::uint8_t> prev, std::string_view record) {
  ossl::Bytes buf(prev.begin(), prev.end());
  buf.insert(buf.end(), record.begin(), record.end());
  return ossl::sha256(buf);
}

ossl::Bytes head_bytes(std::int64_t seq, std::span<const std::uint8_t> hash) {
  ossl::Bytes out;
  for (int i = 7; i >= 0; --i) out.push_back(static_cast<std::uint8_t>(seq >> (8 * i)));
  out.insert(out.end(), hash.begin(), hash.end());
  return out;
}

}  // namespace

Result<ossl::Bytes> AuditLog::mac_of(std::string_view domain, std::span<const std::uint8_t> data) {
  ossl::Bytes buf(domain.begin(), domain.end());
  buf.insert(buf.end(), data.begin(), data.end());
  return token_.hmac_sha256(buf);
}

Status AuditLog::append(const std::string& actor, const std::string& action, const json& details) {
  if (!details.is_object())
    return make_error(ErrorCode::kInvalidArgument, "audit details must be a JSON object");
  return store_.transaction([&]() -> Status {
    KMSD_ASSIGN_OR_RETURN(auto last, store_.last_audit());
    store::AuditRecord rec;
    rec.seq = last ? last->seq + 1 : 1;
    rec.at = unix_now();
    rec.actor = actor;
    rec.action = action;
    rec.record = json{{"v", 1},         {"seq", rec.seq},   {"at", rec.at},
                      {"actor", actor}, {"action", action}, {"details", details}}
                     .dump();
    rec.prev_hash = last ? last->hash : zero_hash();
    rec.hash = chain_hash(rec.prev_hash, rec.record);
    KMSD_ASSIGN_OR_RETURN(rec.mac, mac_of(kRecordDomain, rec.hash));
    KMSD_TRY(store_.append_audit(rec));
    auto head = head_bytes(rec.seq, rec.hash);
    KMSD_ASSIGN_OR_RETURN(auto head_mac, mac_of(kHeadDomain, head));
    return store_.put_setting(
        kHeadSetting,
        json{{"seq", rec.seq}, {"hash", ossl::hex(rec.hash)}, {"mac", ossl::hex(head_mac)}}.dump());
  });
}

Result<VerifyReport> AuditLog::verify() {
  VerifyReport rep;
  ossl::Bytes prev = zero_hash();
  std::int64_t expected = 1;
  auto bad = [&rep](std::int64_t seq, std::string why) -> Status {
    rep.first_bad = seq;
    rep.problem = std::move(why);
    // Stop the walk: the first bad record is the one to name.
    return make_error(ErrorCode::kCrypto, "stop");
  };
  Status walk = store_.for_each_audit([&](const store::AuditRecord& r) -> Status {
    ++rep.records;
    const std::string at = "record " + std::to_string(r.seq);
    if (r.seq != expected)
      return bad(r.seq, at + " follows record " + std::to_string(expected - 1) + ": record " +
                            std::to_string(expected) +
                            " was deleted or the records were reordered");
    json j = json::parse(r.record, nullptr, false);
    if (!j.is_object() || j.value("seq", std::int64_t{-1}) != r.seq ||
        j.value("at", std::int64_t{-1}) != r.at || j.value("actor", std::string()) != r.actor ||
        j.value("action", std::string()) != r.action)
      return bad(r.seq, at + " was edited: its columns do not match its hashed content");
    if (r.prev_hash != prev)
      return bad(r.seq, at + " does not link to the record before it: a record was removed, "
                             "inserted or moved");
    if (chain_hash(prev, r.record) != r.hash)
      return bad(r.seq, at + " was edited: its content does not match its hash");
    auto mac = mac_of(kRecordDomain, r.hash);
    if (!mac.ok()) return mac.error();
    if (!constant_time_equal(*mac, r.mac))
      return bad(r.seq, at + " has a MAC the token's audit key did not make: the chain was "
                             "rewritten without the token");
    prev = r.hash;
    ++expected;
    return {};
  });
  if (!walk.ok() && !rep.first_bad) return walk.error();
  if (rep.first_bad) return rep;

  // The head guards the end of the chain.
  KMSD_ASSIGN_OR_RETURN(auto head_text, store_.get_setting(kHeadSetting));
  const std::int64_t last = expected - 1;
  if (!head_text) {
    if (last != 0) {
      rep.first_bad = last;
      rep.problem = "the chain head is missing from the store";
    }
    return rep;
  }
  json head = json::parse(*head_text, nullptr, false);
  auto head_hash = ossl::from_hex(head.value("hash", std::string()));
  auto head_mac = ossl::from_hex(head.value("mac", std::string()));
  std::int64_t head_seq = head.value("seq", std::int64_t{-1});
  auto want = head_hash.ok() ? mac_of(kHeadDomain, head_bytes(head_seq, *head_hash))
                             : Result<ossl::Bytes>(head_hash.error());
  if (!want.ok() || !head_mac.ok() || !constant_time_equal(*want, *head_mac)) {
    rep.first_bad = last;
    rep.problem = "the chain head in the store was altered";
  } else if (head_seq != last || *head_hash != prev) {
    rep.first_bad = std::min(head_seq, last + 1);
    rep.problem = "the chain ends at record " + std::to_string(last) + " but its head says " +
                  std::to_string(head_seq) + ": the newest records were deleted";
  }
  return rep;
}

Status AuditLog::export_records(const std::function<Status(const json&)>& fn) {
  return store_.for_each_audit([&](const store::AuditRecord& r) -> Status {
    json j = json::parse(r.record, nullptr, false);
    if (!j.is_object()) j = json{{"unparsable_record", r.record}};
    j["hash"] = ossl::hex(r.hash);
    j["mac"] = ossl::hex(r.mac);
    return fn(j);
  });
}

}  // namespace kmsd::audit

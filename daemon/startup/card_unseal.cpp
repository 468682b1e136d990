#include "daemon/startup/card_unseal.hpp"

#include <spdlog/spdlog.h>

namespace kmsd::startup {

CardUnseal::CardUnseal(Seal& seal, CardUnsealSettings settings)
    : seal_(seal), settings_(std::move(settings)), shares_(settings_.pending_ttl) {
  seal_.set_status_hook([this](SealStatus& s) { fill_status(s); });
}

CardUnseal::~CardUnseal() {
  seal_.set_status_hook(nullptr);
  cancel();
}

void CardUnseal::fill_status(SealStatus& s) {
  s.source = settings_.quorum ? "quorum" : "card";
  std::lock_guard lk(state_mu_);
  s.quorum = shares_.progress();
  s.last_card = last_card_;
}

Result<Presented> CardUnseal::present(const SecretBytes& card_pin, const std::string& card_uri) {
  std::lock_guard serial(present_mu_);
  if (seal_.material()) return Presented{true, "kmsd is already unsealed; nothing was read", {}};
  CardLocation where{settings_.module, card_uri.empty() ? settings_.default_uri : card_uri};
  if (where.uri.empty())
    return make_error(ErrorCode::kInvalidArgument,
                      "no card named and no startup.card_uri configured: name the card with "
                      "`kmsctl unseal --card pkcs11:token=LABEL`");
  if (card_pin.empty()) return make_error(ErrorCode::kInvalidArgument, "the card PIN is empty");
  const auto key = seal_.status().token;
  const ForbiddenToken key_token{key.token_label, key.token_serial};
  CardReport report;
  auto value = read_card_object(where, card_pin, settings_.label, &report, &key_token);
  {
    std::lock_guard lk(state_mu_);
    last_card_ = report.known ? std::optional<CardReport>(report) : std::nullopt;
  }
  if (!value.ok()) {
    seal_.record_failure(value.error().message);
    return value.error();
  }
  spdlog::info("operator card '{}' (serial {}) read and logged out; its PIN is forgotten",
               report.label, report.serial);
  if (settings_.quorum) return add_share(*value);
  auto st = seal_.unseal(*value);
  if (!st.ok())
    return st.error().context("the secret on operator card '" + report.label +
                              "' did not unseal kmsd");
  return Presented{true, "unsealed with operator card '" + report.label + "'", {}};
}

Result<Presented> CardUnseal::add_share(const SecretBytes& blob) {
  std::optional<SecretBytes> secret;
  Presented out;
  {
    std::lock_guard lk(state_mu_);
    auto p = shares_.add(blob.span());
    if (!p.ok()) {
      if (p.error().code != ErrorCode::kAlreadyExists)
        seal_.record_failure(p.error().message);
      else
        spdlog::warn("unseal: {}", p.error().message);
      return p.error();
    }
    out.quorum = *p;
    if (p->complete()) {
      auto s = shares_.take_secret();
      if (!s.ok()) {
        seal_.record_failure(s.error().message);
        return s.error();
      }
      secret = std::move(*s);
    }
  }
  if (!secret) {
    out.message = "share accepted: " + out.quorum->text() + "; present the next operator's card";
    spdlog::info("unseal: quorum share accepted, {}", out.quorum->text());
    return out;
  }
  spdlog::info("unseal: {} of {} shares held, the startup secret is rebuilt", out.quorum->k,
               out.quorum->k);
  auto st = seal_.unseal(*secret);
  if (!st.ok())
    return st.error().context("the secret rebuilt from quorum " +
                              out.quorum->quorum_id.substr(0, 8) + " did not unseal kmsd");
  out.unsealed = true;
  out.message = "unsealed: " + out.quorum->text();
  return out;
}

bool CardUnseal::cancel() {
  std::lock_guard lk(state_mu_);
  bool had = shares_.clear();
  if (had) spdlog::info("unseal: pending quorum shares dropped on request");
  return had;
}

void CardUnseal::tick() {
  std::lock_guard lk(state_mu_);
  if (shares_.expire())
    spdlog::warn(
        "unseal: pending quorum shares expired after {} s and were dropped; present "
        "the cards again",
        settings_.pending_ttl.count());
}

}  // namespace kmsd::startup

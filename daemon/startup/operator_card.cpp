#include "daemon/startup/operator_card.hpp"

#include <memory>

namespace kmsd::startup {

namespace {

// A card opened through the token layer, logged out (and its PIN forgotten) on every path.
class OpenCard {
 public:
  static Result<OpenCard> open(const CardLocation& where, CardReport* report) {
    hsm::TokenOptions o;
    o.module_path = where.module;
    o.token_uri = where.uri;
    o.pool_size = 1;
    auto t = hsm::Token::open(o);
    if (!t.ok()) {
      return t.error().context("operator card " + where.uri + " on " + where.module);
    }
    OpenCard c(std::move(*t), report);
    c.refresh_report();
    return c;
  }
  OpenCard(OpenCard&&) noexcept = default;
  ~OpenCard() {
    if (token_) {
      token_->logout();
      refresh_report();
    }
  }

  hsm::Token& token() { return *token_; }
  hsm::TokenStatus status() const { return token_->status(); }

  void refresh_report() {
    if (report_ == nullptr || !token_) return;
    auto st = token_->status();
    report_->known = true;
    report_->label = st.token_label;
    report_->serial = st.token_serial;
    report_->pin_count_low = st.pin_count_low;
    report_->pin_final_try = st.pin_final_try;
    report_->pin_locked = st.pin_locked;
  }

  // Logs in with the card PIN; a refusal says what the card reports about its PIN.
  Status login(const SecretBytes& pin) {
    auto st = token_->login(pin);
    refresh_report();
    if (st.ok()) return {};
    auto s = token_->status();
    CardReport r;
    r.known = true;
    r.pin_count_low = s.pin_count_low;
    r.pin_final_try = s.pin_final_try;
    r.pin_locked = s.pin_locked;
    const std::string who = "operator card '" + s.token_label + "' (serial " + s.token_serial + ")";
    switch (st.error().code) {
      case ErrorCode::kUnauthenticated:
        return make_error(ErrorCode::kUnauthenticated,
                          who + " rejected the card PIN; " + r.pin_state() +
                              ". kmsd stays sealed; try again with the right card PIN");
      case ErrorCode::kPinLocked:
        return make_error(ErrorCode::kPinLocked,
                          who +
                              ": the card PIN is locked; the card's security officer must "
                              "unblock it (for a smart card: the PUK), or use another card");
      default:
        return st.error().context(who);
    }
  }

 private:
  OpenCard(std::unique_ptr<hsm::Token> t, CardReport* report)
      : token_(std::move(t)), report_(report) {}
  std::unique_ptr<hsm::Token> token_;
  CardReport* report_;
};

}  // namespace

std::string CardReport::pin_state() const {
  if (!known) return "the card's PIN state is unknown";
  if (pin_locked) return "the card reports its PIN is LOCKED";
  if (pin_final_try) return "the card reports ONE try left before its PIN locks";
  if (pin_count_low) return "the card reports few tries left before its PIN locks";
  return "the card reports no PIN lockout";
}

Result<SecretBytes> read_card_object(const CardLocation& where, const SecretBytes& card_pin,
                                     const std::string& label, CardReport* report,
                                     const ForbiddenToken* not_this) {
  if (report != nullptr) *report = CardReport{};
  KMSD_ASSIGN_OR_RETURN(OpenCard card, OpenCard::open(where, report));
  if (not_this != nullptr) {
    auto s = card.status();
    if (s.token_label == not_this->label && s.token_serial == not_this->serial)
      return make_error(ErrorCode::kFailedPrecondition,
                        where.uri + " names the key token '" + s.token_label +
                            "', not an operator card; nothing was tried. Name the card with "
                            "`kmsctl unseal --card pkcs11:token=CARD-LABEL`");
  }
  KMSD_TRY(card.login(card_pin));
  auto value = card.token().read_data_object(label);
  if (!value.ok()) {
    auto s = card.status();
    if (value.error().code == ErrorCode::kNotFound)
      return make_error(ErrorCode::kNotFound,
                        "operator card '" + s.token_label + "' holds no object labelled '" + label +
                            "'; provision it with `kmsctl card provision` (or `kmsctl "
                            "card split` for a quorum)");
    return value.error().context("reading operator card '" + s.token_label + "'");
  }
  return value;  // ~OpenCard logs out and forgets the card PIN
}

Status write_card_object(const CardLocation& where, const SecretBytes& card_pin,
                         const std::string& label, const SecretBytes& value, bool overwrite,
                         CardReport* report, const std::vector<ForbiddenToken>& refuse) {
  if (report != nullptr) *report = CardReport{};
  KMSD_ASSIGN_OR_RETURN(OpenCard card, OpenCard::open(where, report));
  const auto s = card.status();
  for (const auto& r : refuse)
    if (s.token_label == r.label && s.token_serial == r.serial)
      return make_error(ErrorCode::kFailedPrecondition,
                        "card '" + s.token_label + "' (serial " + s.token_serial +
                            ") was already written in this run; insert the next operator's "
                            "card (nothing was written to this one)");
  KMSD_TRY(card.login(card_pin));
  auto st = card.token().write_data_object(label, value, overwrite);
  if (!st.ok() && st.error().code == ErrorCode::kAlreadyExists)
    return make_error(ErrorCode::kAlreadyExists,
                      "operator card '" + card.status().token_label +
                          "' already holds an object labelled '" + label +
                          "'; nothing was written (use --force to replace it)");
  return st;
}

}  // namespace kmsd::startup

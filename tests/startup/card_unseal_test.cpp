// Operator cards against real SoftHSM tokens: a card holding the startup secret, a 2-of-3
// quorum on three cards (every pair unseals), wrong card PINs, foreign and duplicate shares,
// the key token refused as a card, and a seal that drops the key token's login at once.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <thread>

#include "daemon/provision/initializer.hpp"
#include "daemon/startup/card_unseal.hpp"
#include "daemon/startup/operator_card.hpp"
#include "daemon/startup/quorum.hpp"
#include "daemon/startup/seal.hpp"
#include "daemon/startup/unseal_socket.hpp"
#include "hsm/pkcs11.hpp"
#include "tests/support/sandbox.hpp"

namespace kmsd::startup {
namespace {

using ::testing::HasSubstr;
using json = nlohmann::json;

constexpr const char* kCardPin = "24682468";
constexpr const char* kLabel = "kms-startup-secret";

SecretBytes pin(const char* p) {
  return SecretBytes::from_string(p);
}

// An initialized KMS on the sandbox token plus operator cards, all created before the module
// is first loaded (SoftHSM reads its token directory once per process).
class CardUnsealTest : public testing::TokenSandbox {
 protected:
  void SetUp() override {
    TokenSandbox::SetUp();
    for (const char* c : {"op1", "op2", "op3", "other1", "other2"}) token().add_token(c, kCardPin);
    cfg.token.module = testing::kSoftHsmModule;
    cfg.token.uri = token().uri();
    cfg.store.path = dir() / "kmsd.db";
    hsm::TokenOptions o;
    o.module_path = testing::kSoftHsmModule;
    o.token_uri = cfg.token.uri;
    key_token = std::move(hsm::Token::open(o).value());
    store = std::move(store::Store::open(cfg.store.path).value());
    ASSERT_TRUE(key_token->login(pin(testing::kUserPin)).ok());
    provision::AdminOptions admin{"root", dir() / "admin.p12", pin("passphrase")};
    auto rep = provision::initialize(cfg, *key_token, *store, admin);
    ASSERT_TRUE(rep.ok()) << rep.error().message;
    key_token->logout();
    seal = std::make_unique<Seal>(*key_token, *store, SealOptions{{"localhost"}});
  }

  CardLocation card(const std::string& label) const {
    return {testing::kSoftHsmModule, "pkcs11:token=" + label};
  }
  std::unique_ptr<CardUnseal> cards(bool quorum) {
    CardUnsealSettings s;
    s.quorum = quorum;
    s.module = testing::kSoftHsmModule;
    s.default_uri = "pkcs11:token=op1";
    s.label = kLabel;
    return std::make_unique<CardUnseal>(*seal, s);
  }
  // Splits the startup secret 2-of-3 onto the cards named.
  void split_onto(const std::vector<std::string>& labels) {
    auto shares = split_secret(pin(testing::kUserPin), 2, static_cast<unsigned>(labels.size()));
    ASSERT_TRUE(shares.ok());
    for (std::size_t i = 0; i < labels.size(); ++i) {
      auto st = write_card_object(card(labels[i]), pin(kCardPin), kLabel,
                                  encode_share((*shares)[i]), true);
      ASSERT_TRUE(st.ok()) << st.error().message;
    }
  }

  config::Config cfg;
  std::unique_ptr<hsm::Token> key_token;
  std::unique_ptr<store::Store> store;
  std::unique_ptr<Seal> seal;
};

TEST_F(CardUnsealTest, ACardUnsealsWithItsPinAndIsLoggedOutAfterwards) {
  ASSERT_TRUE(
      write_card_object(card("op1"), pin(kCardPin), kLabel, pin(testing::kUserPin), false).ok());
  auto c = cards(false);
  auto r = c->present(pin(kCardPin), "");
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_TRUE(r->unsealed);
  EXPECT_NE(seal->material(), nullptr);
  EXPECT_TRUE(key_token->logged_in());
  auto st = seal->status();
  EXPECT_EQ(st.source, "card");
  ASSERT_TRUE(st.last_card.has_value());
  EXPECT_EQ(st.last_card->label, "op1");

  // The card itself is logged out: a fresh session on it sees no private object.
  auto module = hsm::p11::Module::load(testing::kSoftHsmModule);
  ASSERT_TRUE(module.ok());
  for (const auto& slot : hsm::p11::slots_with_tokens(**module)) {
    if (slot.token_label != "op1") continue;
    auto s = hsm::p11::Session::open(*module, slot.slot_id);
    CK_SESSION_INFO info{};
    ASSERT_EQ(s.f()->C_GetSessionInfo(s.handle(), &info), CKR_OK);
    EXPECT_TRUE(info.state == CKS_RW_PUBLIC_SESSION || info.state == CKS_RO_PUBLIC_SESSION)
        << info.state;
  }
}

TEST_F(CardUnsealTest, AWrongCardPinLeavesItSealedAndReportsTheCardsPinState) {
  ASSERT_TRUE(
      write_card_object(card("op1"), pin(kCardPin), kLabel, pin(testing::kUserPin), false).ok());
  auto c = cards(false);
  auto r = c->present(pin("00000000"), "");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kUnauthenticated);
  EXPECT_THAT(r.error().message, HasSubstr("rejected the card PIN"));
  // SoftHSM raises CKF_USER_PIN_COUNT_LOW after a wrong PIN (it never locks).
  EXPECT_THAT(r.error().message, HasSubstr("few tries left"));
  auto st = seal->status();
  EXPECT_EQ(st.state, State::kSealed);
  EXPECT_EQ(st.failed_unseal_attempts, 1u);
  ASSERT_TRUE(st.last_card.has_value());
  EXPECT_TRUE(st.last_card->pin_count_low);
  EXPECT_FALSE(key_token->logged_in());
  auto j = json::parse(status_json(st));
  EXPECT_EQ(j["card"]["label"], "op1");
  EXPECT_EQ(j["card"]["pin_count_low"], true);
  // The right PIN still works afterwards.
  ASSERT_TRUE(c->present(pin(kCardPin), "").ok());
  EXPECT_EQ(seal->status().state, State::kUnsealed);
}

TEST_F(CardUnsealTest, ACardWithoutTheSecretOrAnOldSecretIsReported) {
  auto c = cards(false);
  auto none = c->present(pin(kCardPin), "pkcs11:token=op2");
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.error().code, ErrorCode::kNotFound);
  EXPECT_THAT(none.error().message, HasSubstr("kmsctl card provision"));
  ASSERT_TRUE(
      write_card_object(card("op2"), pin(kCardPin), kLabel, pin("stale-secret"), false).ok());
  auto stale = c->present(pin(kCardPin), "pkcs11:token=op2");
  ASSERT_FALSE(stale.ok());
  EXPECT_THAT(stale.error().message, HasSubstr("did not unseal kmsd"));
  EXPECT_EQ(seal->status().state, State::kSealed);
  EXPECT_EQ(seal->status().failed_unseal_attempts, 2u);
}

TEST_F(CardUnsealTest, TheKeyTokenIsNeverTriedAsAnOperatorCard) {
  auto c = cards(false);
  auto r = c->present(pin("00000000"), token().uri());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kFailedPrecondition);
  EXPECT_THAT(r.error().message, HasSubstr("names the key token"));
  EXPECT_FALSE(key_token->status().pin_count_low);  // no PIN was tried on it
}

TEST_F(CardUnsealTest, ProvisioningRefusesToOverwriteWithoutForce) {
  ASSERT_TRUE(write_card_object(card("op1"), pin(kCardPin), kLabel, pin("first"), false).ok());
  auto again = write_card_object(card("op1"), pin(kCardPin), kLabel, pin("second"), false);
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.error().code, ErrorCode::kAlreadyExists);
  EXPECT_THAT(again.error().message, HasSubstr("--force"));
  auto kept = read_card_object(card("op1"), pin(kCardPin), kLabel);
  ASSERT_TRUE(kept.ok());
  EXPECT_EQ(kept->view(), "first");
  ASSERT_TRUE(write_card_object(card("op1"), pin(kCardPin), kLabel, pin("second"), true).ok());
  EXPECT_EQ(read_card_object(card("op1"), pin(kCardPin), kLabel)->view(), "second");
  // One physical card never takes two shares of one split by mistake.
  CardReport rep;
  ASSERT_TRUE(write_card_object(card("op2"), pin(kCardPin), kLabel, pin("x"), true, &rep).ok());
  auto twice = write_card_object(card("op2"), pin(kCardPin), kLabel, pin("y"), true, nullptr,
                                 {{rep.label, rep.serial}});
  ASSERT_FALSE(twice.ok());
  EXPECT_THAT(twice.error().message, HasSubstr("already written in this run"));
}

TEST_F(CardUnsealTest, QuorumTwoOfThreeSaysOneOfTwoRefusesForeignAndDuplicateThenUnseals) {
  split_onto({"op1", "op2", "op3"});
  split_onto({"other1", "other2"});  // another quorum of the same secret
  auto c = cards(true);

  auto first = c->present(pin(kCardPin), "pkcs11:token=op1");
  ASSERT_TRUE(first.ok()) << first.error().message;
  EXPECT_FALSE(first->unsealed);
  EXPECT_THAT(first->message, HasSubstr("1 of 2 shares"));
  EXPECT_EQ(seal->status().state, State::kSealed);
  EXPECT_EQ(seal->material(), nullptr);
  EXPECT_FALSE(key_token->logged_in());  // nothing usable before the k-th share
  auto st = seal->status();
  ASSERT_TRUE(st.quorum.has_value());
  EXPECT_EQ(st.quorum->held(), 1u);
  EXPECT_EQ(json::parse(status_json(st))["quorum"]["progress"].get<std::string>().substr(0, 13),
            "1 of 2 shares");

  auto foreign = c->present(pin(kCardPin), "pkcs11:token=other2");
  ASSERT_FALSE(foreign.ok());
  EXPECT_THAT(foreign.error().message, HasSubstr("belong to quorum"));

  auto dup = c->present(pin(kCardPin), "pkcs11:token=op1");
  ASSERT_FALSE(dup.ok());
  EXPECT_EQ(dup.error().code, ErrorCode::kAlreadyExists);
  EXPECT_THAT(dup.error().message, HasSubstr("already presented"));

  auto wrong_pin = c->present(pin("00000000"), "pkcs11:token=op3");
  ASSERT_FALSE(wrong_pin.ok());
  EXPECT_EQ(wrong_pin.error().code, ErrorCode::kUnauthenticated);
  EXPECT_EQ(seal->status().quorum->held(), 1u);  // refusals change nothing held

  auto second = c->present(pin(kCardPin), "pkcs11:token=op3");
  ASSERT_TRUE(second.ok()) << second.error().message;
  EXPECT_TRUE(second->unsealed);
  EXPECT_EQ(seal->status().state, State::kUnsealed);
  EXPECT_FALSE(seal->status().quorum.has_value());  // the shares are gone once used
}

TEST_F(CardUnsealTest, EveryPairOfTheThreeCardsUnseals) {
  split_onto({"op1", "op2", "op3"});
  auto c = cards(true);
  for (auto [a, b] : {std::pair{"op1", "op2"}, std::pair{"op1", "op3"}, std::pair{"op2", "op3"},
                      std::pair{"op3", "op1"}}) {
    SCOPED_TRACE(std::string(a) + "+" + b);
    auto one = c->present(pin(kCardPin), std::string("pkcs11:token=") + a);
    ASSERT_TRUE(one.ok()) << one.error().message;
    EXPECT_FALSE(one->unsealed);
    auto two = c->present(pin(kCardPin), std::string("pkcs11:token=") + b);
    ASSERT_TRUE(two.ok()) << two.error().message;
    EXPECT_TRUE(two->unsealed);
    EXPECT_EQ(seal->status().state, State::kUnsealed);
    seal->seal();
    EXPECT_FALSE(key_token->logged_in());
  }
}

TEST_F(CardUnsealTest, CancelDropsPendingSharesAndAPlainSecretCardIsNoShare) {
  split_onto({"op1", "op2", "op3"});
  ASSERT_TRUE(
      write_card_object(card("other1"), pin(kCardPin), kLabel, pin(testing::kUserPin), true).ok());
  auto c = cards(true);
  ASSERT_TRUE(c->present(pin(kCardPin), "pkcs11:token=op1").ok());
  EXPECT_TRUE(c->cancel());
  EXPECT_FALSE(seal->status().quorum.has_value());
  auto r = c->present(pin(kCardPin), "pkcs11:token=op2");
  ASSERT_TRUE(r.ok());
  EXPECT_THAT(r->message, HasSubstr("1 of 2 shares"));  // op1's share no longer counts
  auto plain = c->present(pin(kCardPin), "pkcs11:token=other1");
  ASSERT_FALSE(plain.ok());
  EXPECT_THAT(plain.error().message, HasSubstr("plain startup secret"));
}

TEST_F(CardUnsealTest, PendingSharesExpireOnTheTick) {
  split_onto({"op1", "op2", "op3"});
  CardUnsealSettings s;
  s.quorum = true;
  s.module = testing::kSoftHsmModule;
  s.label = kLabel;
  s.pending_ttl = std::chrono::seconds(1);
  CardUnseal c(*seal, s);
  auto none = c.present(pin(kCardPin), "");
  ASSERT_FALSE(none.ok());  // no card named and none configured
  EXPECT_THAT(none.error().message, HasSubstr("--card"));
  ASSERT_TRUE(c.present(pin(kCardPin), "pkcs11:token=op1").ok());
  c.tick();
  EXPECT_TRUE(seal->status().quorum.has_value());
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  c.tick();
  EXPECT_FALSE(seal->status().quorum.has_value());
  auto r = c.present(pin(kCardPin), "pkcs11:token=op2");
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->unsealed);  // the expired share no longer counts
}

TEST_F(CardUnsealTest, SealDropsTheKeyTokenLoginAndCachedHandlesAtOnce) {
  ASSERT_TRUE(seal->unseal(pin(testing::kUserPin)).ok());
  ASSERT_TRUE(key_token->seal(std::vector<std::uint8_t>{1}, std::vector<std::uint8_t>{2}).ok());
  seal->seal();
  EXPECT_EQ(seal->material(), nullptr);
  EXPECT_FALSE(key_token->logged_in());
  // The next key operation finds no login to recover: it fails instead of re-logging in.
  auto after = key_token->seal(std::vector<std::uint8_t>{1}, std::vector<std::uint8_t>{2});
  ASSERT_FALSE(after.ok());
  EXPECT_EQ(after.error().code, ErrorCode::kFailedPrecondition);
  // And the token itself is logged out for this process: a fresh session is public.
  auto module = hsm::p11::Module::load(testing::kSoftHsmModule);
  ASSERT_TRUE(module.ok());
  for (const auto& slot : hsm::p11::slots_with_tokens(**module)) {
    if (slot.token_label != token().label()) continue;
    auto s = hsm::p11::Session::open(*module, slot.slot_id);
    CK_SESSION_INFO info{};
    ASSERT_EQ(s.f()->C_GetSessionInfo(s.handle(), &info), CKR_OK);
    EXPECT_TRUE(info.state == CKS_RW_PUBLIC_SESSION || info.state == CKS_RO_PUBLIC_SESSION)
        << info.state;
  }
}

TEST_F(CardUnsealTest, TheUnsealSocketTakesCardPinsReportsProgressAndCancels) {
  split_onto({"op1", "op2", "op3"});
  auto c = cards(true);
  const auto path = dir() / "unseal.sock";
  auto sock = UnsealSocket::listen(path, *seal, c.get());
  ASSERT_TRUE(sock.ok()) << sock.error().message;
  auto ask = [&](const std::string& op, const char* p, const std::string& card) {
    SecretBytes s = p != nullptr ? pin(p) : SecretBytes();
    auto reply =
        unseal_request(path, op, p ? &s : nullptr, card.empty() ? "" : json{{"card", card}}.dump());
    EXPECT_TRUE(reply.ok());
    return json::parse(*reply);
  };
  auto status = ask("status", nullptr, "");
  EXPECT_EQ(status["source"], "quorum");
  auto one = ask("unseal", kCardPin, "pkcs11:token=op2");
  EXPECT_EQ(one["ok"], true);
  EXPECT_THAT(one["message"].get<std::string>(), HasSubstr("1 of 2 shares"));
  EXPECT_EQ(one["quorum"]["held"], 1);
  EXPECT_EQ(one["state"], "sealed");
  auto dup = ask("unseal", kCardPin, "pkcs11:token=op2");
  EXPECT_EQ(dup["ok"], false);
  EXPECT_EQ(dup["code"], "already exists");
  auto cancelled = ask("cancel", nullptr, "");
  EXPECT_EQ(cancelled["ok"], true);
  EXPECT_FALSE(cancelled.contains("quorum"));
  EXPECT_EQ(ask("unseal", kCardPin, "pkcs11:token=op1")["quorum"]["held"], 1);
  auto done = ask("unseal", kCardPin, "pkcs11:token=op3");
  EXPECT_EQ(done["ok"], true);
  EXPECT_EQ(done["state"], "unsealed");
  auto sealed = ask("seal", nullptr, "");
  EXPECT_EQ(sealed["state"], "sealed");
  EXPECT_FALSE(key_token->logged_in());
}

}  // namespace
}  // namespace kmsd::startup

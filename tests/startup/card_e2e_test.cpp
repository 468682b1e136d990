// End to end with operator cards: SoftHSM tokens play the cards, `kmsctl card provision|split`
// writes them, the real kmsd starts with startup.source = "card" or "quorum", and operators
// unseal with `kmsctl unseal` over the unseal socket.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <fstream>
#include <iterator>
#include <sstream>

#include "tests/e2e/harness.hpp"

namespace kmsd::testing {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr const char* kCardPin = "24682468";

class CardE2eTest : public KmsdTest {
 protected:
  void SetUp() override {
    KmsdTest::SetUp();
    for (const char* c : {"op1", "op2", "op3", "other1", "other2"}) token().add_token(c, kCardPin);
    write_private(card_pin_path(), std::string(kCardPin) + "\n");
    write_private(wrong_pin_path(), "00000000\n");
  }
  fs::path card_pin_path() const { return dir() / "card.pin"; }
  fs::path wrong_pin_path() const { return dir() / "wrong.pin"; }

  // kmsd.toml with SOURCE ("card" or "quorum") and the card settings in [startup].
  void write_card_config(const std::string& source, const std::string& card_uri) {
    write_config(source);
    std::ifstream in(conf_path());
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const std::string anchor = "source = \"" + source + "\"\n";
    auto at = text.find(anchor);
    ASSERT_NE(at, std::string::npos);
    std::string keys = "card_module = \"" + std::string(kSoftHsmModule) + "\"\n";
    if (!card_uri.empty()) keys += "card_uri = \"" + card_uri + "\"\n";
    keys += "quorum_timeout_minutes = 5\n";
    text.insert(at + anchor.size(), keys);
    std::ofstream(conf_path()) << text;
  }

  CommandResult unseal(const std::string& args) {
    return kmsctl("unseal --socket " + shell_quote(socket_path()) + " " + args);
  }
  std::string readyz_body() { return get_public("/readyz").output; }

  // No PIN and no startup secret in the log, the store or kmsd's environment.
  void expect_no_secret_anywhere() {
    std::ifstream db(db_path(), std::ios::binary);
    std::string store((std::istreambuf_iterator<char>(db)), std::istreambuf_iterator<char>());
    std::string environ;
    if (pid_ > 0) {
      std::ifstream e("/proc/" + std::to_string(pid_) + "/environ", std::ios::binary);
      environ.assign(std::istreambuf_iterator<char>(e), std::istreambuf_iterator<char>());
    }
    for (const std::string& secret : {std::string(kCardPin), std::string(kUserPin)}) {
      EXPECT_THAT(log_text(), Not(HasSubstr(secret)));
      EXPECT_EQ(store.find(secret), std::string::npos);
      EXPECT_EQ(environ.find(secret), std::string::npos);
    }
  }
};

TEST_F(CardE2eTest, SealedUntilTheCardPinIsGivenAndAWrongPinReportsTheCardsTries) {
  write_card_config("card", "pkcs11:token=op1");
  auto in = init();
  ASSERT_EQ(in.status, 0) << in.output;
  const std::string provision = "card provision --card pkcs11:token=op1 --module " +
                                std::string(kSoftHsmModule) + " --secret-file " +
                                shell_quote(secret_path()) + " --pin-file " +
                                shell_quote(card_pin_path());
  auto p = kmsctl(provision);
  ASSERT_EQ(p.status, 0) << p.output;
  EXPECT_THAT(p.output, HasSubstr("operator card 'op1'"));
  auto again = kmsctl(provision);
  EXPECT_EQ(again.status, 3) << again.output;
  EXPECT_THAT(again.output, HasSubstr("--force"));
  fs::remove(secret_path());  // the secret now lives on the card only

  start();
  ASSERT_TRUE(wait_ready(503));
  EXPECT_THAT(readyz_body(), HasSubstr("\"source\":\"card\""));

  auto wrong = unseal("--pin-file " + shell_quote(wrong_pin_path()));
  EXPECT_EQ(wrong.status, 4) << wrong.output;
  EXPECT_THAT(wrong.output, HasSubstr("rejected the card PIN"));
  EXPECT_THAT(wrong.output, HasSubstr("few tries left"));  // SoftHSM: CKF_USER_PIN_COUNT_LOW
  EXPECT_EQ(http_code("/readyz"), "503");
  EXPECT_THAT(readyz_body(), HasSubstr("\"pin_count_low\":true"));

  // The startup secret itself is not what this daemon takes.
  auto secret_given = unseal("--secret-file " + shell_quote(card_pin_path()));
  EXPECT_EQ(secret_given.status, 2) << secret_given.output;

  auto right = unseal("--pin-file " + shell_quote(card_pin_path()));
  EXPECT_EQ(right.status, 0) << right.output;
  EXPECT_THAT(right.output, HasSubstr("unsealed with operator card 'op1'"));
  ASSERT_TRUE(wait_ready(200)) << log_text();

  auto sealed = kmsctl("seal --socket " + shell_quote(socket_path()));
  EXPECT_EQ(sealed.status, 0) << sealed.output;
  EXPECT_EQ(http_code("/readyz"), "503");
  expect_no_secret_anywhere();
  EXPECT_EQ(stop(), 0);
}

TEST_F(CardE2eTest, QuorumTwoOfThreeOneShareIsNotEnoughForeignAndDuplicateAreRefused) {
  write_card_config("quorum", "");
  auto in = init();
  ASSERT_EQ(in.status, 0) << in.output;
  const std::string pins = " --pin-files " + shell_quote(card_pin_path()) + " " +
                           shell_quote(card_pin_path()) + " " + shell_quote(card_pin_path());
  auto split = kmsctl(
      "card split --quorum-k 2 --cards pkcs11:token=op1 pkcs11:token=op2 "
      "pkcs11:token=op3 --module " +
      std::string(kSoftHsmModule) + " --secret-file " + shell_quote(secret_path()) + pins);
  ASSERT_EQ(split.status, 0) << split.output;
  EXPECT_THAT(split.output, HasSubstr("any 2 of these 3 cards"));
  // Another quorum of the same secret, on two other cards.
  auto foreign =
      kmsctl("card split -k 2 --cards pkcs11:token=other1 pkcs11:token=other2 --module " +
             std::string(kSoftHsmModule) + " --secret-file " + shell_quote(secret_path()) +
             " --pin-files " + shell_quote(card_pin_path()) + " " + shell_quote(card_pin_path()));
  ASSERT_EQ(foreign.status, 0) << foreign.output;
  fs::remove(secret_path());

  start();
  ASSERT_TRUE(wait_ready(503));
  const std::string pin = " --pin-file " + shell_quote(card_pin_path());

  auto one = unseal("--card pkcs11:token=op2" + pin);
  EXPECT_EQ(one.status, 0) << one.output;
  EXPECT_THAT(one.output, HasSubstr("1 of 2 shares"));
  EXPECT_EQ(http_code("/readyz"), "503");
  EXPECT_THAT(readyz_body(), HasSubstr("1 of 2 shares"));

  auto other = unseal("--card pkcs11:token=other1" + pin);
  EXPECT_EQ(other.status, 2) << other.output;
  EXPECT_THAT(other.output, HasSubstr("belong to quorum"));

  auto dup = unseal("--card pkcs11:token=op2" + pin);
  EXPECT_EQ(dup.status, 3) << dup.output;
  EXPECT_THAT(dup.output, HasSubstr("already presented"));
  EXPECT_EQ(http_code("/readyz"), "503");

  auto two = unseal("--card pkcs11:token=op1" + pin);
  EXPECT_EQ(two.status, 0) << two.output;
  ASSERT_TRUE(wait_ready(200)) << log_text();

  // Sealed again, a pending share can be cancelled and does not count afterwards.
  ASSERT_EQ(kmsctl("seal --socket " + shell_quote(socket_path())).status, 0);
  EXPECT_EQ(http_code("/readyz"), "503");
  EXPECT_THAT(unseal("--card pkcs11:token=op3" + pin).output, HasSubstr("1 of 2 shares"));
  auto cancel = unseal("--cancel");
  EXPECT_EQ(cancel.status, 0) << cancel.output;
  EXPECT_THAT(cancel.output, HasSubstr("pending shares dropped"));
  EXPECT_THAT(unseal("--card pkcs11:token=op1" + pin).output, HasSubstr("1 of 2 shares"));
  EXPECT_EQ(unseal("--card pkcs11:token=op3" + pin).status, 0);
  ASSERT_TRUE(wait_ready(200)) << log_text();
  expect_no_secret_anywhere();
  EXPECT_EQ(stop(), 0);
}

TEST_F(CardE2eTest, ResplitFromTheOldCardsToNewOnesWithoutTheSecretAtHand) {
  write_card_config("quorum", "");
  ASSERT_EQ(init().status, 0);
  const std::string m = " --module " + std::string(kSoftHsmModule);
  const std::string p = shell_quote(card_pin_path());
  ASSERT_EQ(kmsctl("card split -k 2 --cards pkcs11:token=op1 pkcs11:token=op2 pkcs11:token=op3" +
                   m + " --secret-file " + shell_quote(secret_path()) + " --pin-files " + p + " " +
                   p + " " + p)
                .status,
            0);
  fs::remove(secret_path());
  // op3's operator leaves: op1 and op2 rebuild the secret, which is split onto new cards.
  auto resplit = kmsctl(
      "card split -k 2 --cards pkcs11:token=other1 pkcs11:token=other2" + m + " --pin-files " + p +
      " " + p + " --from-cards pkcs11:token=op1 pkcs11:token=op2 --from-pin-files " + p + " " + p);
  ASSERT_EQ(resplit.status, 0) << resplit.output;
  start();
  ASSERT_TRUE(wait_ready(503));
  const std::string pin = " --pin-file " + p;
  EXPECT_THAT(unseal("--card pkcs11:token=other2" + pin).output, HasSubstr("1 of 2 shares"));
  // The old quorum's cards no longer match the new one.
  EXPECT_EQ(unseal("--card pkcs11:token=op3" + pin).status, 2);
  EXPECT_EQ(unseal("--card pkcs11:token=other1" + pin).status, 0);
  ASSERT_TRUE(wait_ready(200)) << log_text();
  EXPECT_EQ(stop(), 0);
}

// While kmsd is unsealed, re-splitting needs an approved card_split request: kmsctl asks for
// one over the unseal socket and writes nothing; an administrator approves it; the split then
// runs once, for exactly the approved cards, and the audit chain records it.
TEST_F(CardE2eTest, ResplitWhileUnsealedNeedsAnApprovedCardSplitRequestUsedOnce) {
  write_card_config("quorum", "");
  ASSERT_EQ(init().status, 0);
  const std::string p = shell_quote(card_pin_path());
  const std::string conf = " --config " + shell_quote(conf_path());
  // kmsd not running yet: a local split, no approval needed.
  auto first = kmsctl("card split -k 2 --cards pkcs11:token=op1 pkcs11:token=op2 pkcs11:token=op3" +
                      conf + " --secret-file " + shell_quote(secret_path()) + " --pin-files " + p +
                      " " + p + " " + p);
  ASSERT_EQ(first.status, 0) << first.output;
  EXPECT_THAT(first.output, HasSubstr("no approval needed"));
  fs::remove(secret_path());
  start();
  ASSERT_TRUE(wait_ready(503));
  const std::string pin = " --pin-file " + p;
  ASSERT_EQ(unseal("--card pkcs11:token=op1" + pin).status, 0);
  ASSERT_EQ(unseal("--card pkcs11:token=op2" + pin).status, 0);
  ASSERT_TRUE(wait_ready(200)) << log_text();
  fetch_ca();

  // op3's operator leaves: re-split from op1 and op2 to other1 and other2.
  const std::string resplit = "card split -k 2 --cards pkcs11:token=other1 pkcs11:token=other2" +
                              conf + " --pin-files " + p + " " + p +
                              " --from-cards pkcs11:token=op1 pkcs11:token=op2 --from-pin-files " +
                              p + " " + p;
  auto asked = kmsctl(resplit);
  EXPECT_EQ(asked.status, 4) << asked.output;
  EXPECT_THAT(asked.output, HasSubstr("needs the approval of 1 administrator(s)"));
  EXPECT_THAT(asked.output, HasSubstr("No card was written"));
  const auto at = asked.output.find("--request ");
  ASSERT_NE(at, std::string::npos) << asked.output;
  std::string id = asked.output.substr(at + 10);
  id = id.substr(0, id.find_first_of(" \n"));
  ASSERT_FALSE(id.empty());

  auto early = kmsctl(resplit + " --request " + id);
  EXPECT_EQ(early.status, 4) << early.output;
  EXPECT_THAT(early.output, HasSubstr("still waits for approvals (0 of 1)"));

  auto approve = kmsctl("request approve " + id + kmsctl_admin_options());
  ASSERT_EQ(approve.status, 0) << approve.output;

  // Approved for other1 and other2, not for another set of cards.
  auto other_plan = kmsctl("card split -k 2 --cards pkcs11:token=other1 pkcs11:token=op3" + conf +
                           " --pin-files " + p + " " + p +
                           " --from-cards pkcs11:token=op1 pkcs11:token=op2 --from-pin-files " + p +
                           " " + p + " --request " + id);
  EXPECT_NE(other_plan.status, 0) << other_plan.output;
  EXPECT_THAT(other_plan.output, HasSubstr("approved another split"));

  auto done = kmsctl(resplit + " --request " + id);
  ASSERT_EQ(done.status, 0) << done.output;
  EXPECT_THAT(done.output, HasSubstr("any 2 of these 2 cards"));
  auto again = kmsctl(resplit + " --request " + id + " --force");
  EXPECT_NE(again.status, 0) << again.output;
  EXPECT_THAT(again.output, HasSubstr("was already used"));

  // The audit chain shows the request, the approval, the start and the new quorum.
  auto exported = kmsctl("audit export" + kmsctl_admin_options());
  ASSERT_EQ(exported.status, 0) << exported.output;
  EXPECT_THAT(exported.output, HasSubstr("\"action\":\"card.split.start\""));
  EXPECT_THAT(exported.output, HasSubstr("\"action\":\"card.split\""));
  EXPECT_THAT(exported.output, HasSubstr("\"operation\":\"card_split\""));
  EXPECT_EQ(kmsctl("audit verify" + kmsctl_admin_options()).status, 0);

  // The new cards unseal; the old quorum's are refused.
  ASSERT_EQ(kmsctl("seal --socket " + shell_quote(socket_path())).status, 0);
  EXPECT_EQ(unseal("--card pkcs11:token=other1" + pin).status, 0);
  EXPECT_EQ(unseal("--card pkcs11:token=op1" + pin).status, 2);
  EXPECT_EQ(unseal("--card pkcs11:token=other2" + pin).status, 0);
  ASSERT_TRUE(wait_ready(200)) << log_text();
  expect_no_secret_anywhere();
  EXPECT_EQ(stop(), 0);
}

}  // namespace
}  // namespace kmsd::testing

// kmsctl dr prepare --cards: the new startup secret (the new key token's PIN) onto new operator
// cards (SoftHSM tokens play the cards): k-of-n shares that any k of the cards rebuild, or the
// secret itself on one card; the new key token named as a card is refused before anything is
// made or written; a rerun finds the quorum already written.
#include <fcntl.h>
#include <sqlite3.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "daemon/startup/operator_card.hpp"
#include "daemon/startup/quorum.hpp"
#include "tests/e2e/harness.hpp"
#include "tests/support/sandbox.hpp"

namespace kmsd::testing {
namespace {

namespace fs = std::filesystem;

constexpr const char* kCardPin = "24682468";

void write_0600(const fs::path& p, const std::string& text) {
  std::ofstream(p) << text;
  ::chmod(p.c_str(), 0600);
}

class DrPrepareCardsTest : public TokenSandbox {
 protected:
  void SetUp() override {
    TokenSandbox::SetUp();
    pin_ = dir() / "new.pin";
    card_pin_ = dir() / "card.pin";
    cfg_ = dir() / "kmsd-new.toml";
    db_ = dir() / "new.db";
    for (const char* c : {"card1", "card2", "card3", "old-card"}) token().add_token(c, kCardPin);
    token().add_token("old-kms");
    write_0600(pin_, std::string(kUserPin) + "\n");
    write_0600(card_pin_, std::string(kCardPin) + "\n");
    write_0600(dir() / "admin.pass", "a passphrase for the admin\n");
    std::ofstream(cfg_) << "[server]\npublic_listen = \"127.0.0.1:18080\"\nadmin_listen = "
                           "\"127.0.0.1:18443\"\nunseal_socket = \""
                        << (dir() / "unseal.sock").string() << "\"\n[token]\nmodule = \""
                        << kSoftHsmModule << "\"\nuri = \"" << token().uri()
                        << "\"\n[ca]\nsubject = \"/O=Drill/CN=New KMS CA\"\n[store]\npath = \""
                        << db_.string() << "\"\n[startup]\nsource = \"file\"\nfile = \""
                        << pin_.string() << "\"\n";
  }

  // kmsctl dr prepare with ARGS; the exit code, output in OUT.
  int prepare(const std::string& cert_out, const std::string& args, std::string* out) {
    const fs::path kmsctl = fs::path(std::getenv("KMSD_BUILD_DIR")) / "cli" / "kmsctl";
    return run_command("'" + kmsctl.string() + "' dr prepare --config '" + cfg_.string() +
                           "' --admin drill --admin-p12 '" + (dir() / cert_out).string() +
                           ".p12' --passphrase-file '" + (dir() / "admin.pass").string() +
                           "' --custody-cert-out '" + (dir() / cert_out).string() +
                           "' --card-module " + kSoftHsmModule + " " + args + " 2>&1",
                       out);
  }
  std::string card_pins(int n) const {
    std::string s = " --card-pin-files";
    for (int i = 0; i < n; ++i) s += " '" + card_pin_.string() + "'";
    return s;
  }
  Result<SecretBytes> read_card(const std::string& label) {
    return startup::read_card_object({kSoftHsmModule, "pkcs11:token=" + label},
                                     SecretBytes::from_string(kCardPin), "kms-startup-secret");
  }
  int audit_rows(const std::string& action) {
    sqlite3* db = nullptr;
    int n = -1;
    if (sqlite3_open_v2(db_.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK) {
      sqlite3_stmt* st = nullptr;
      if (sqlite3_prepare_v2(db, "SELECT COUNT(*) FROM audit_log WHERE action = ?", -1, &st,
                             nullptr) == SQLITE_OK) {
        sqlite3_bind_text(st, 1, action.c_str(), -1, SQLITE_TRANSIENT);
        if (sqlite3_step(st) == SQLITE_ROW) n = sqlite3_column_int(st, 0);
      }
      sqlite3_finalize(st);
    }
    sqlite3_close(db);
    return n;
  }
  // The serial SoftHSM gave the token LABEL (to name it by serial=, not by its label).
  std::string serial_of(const std::string& label) {
    startup::CardReport report;
    (void)startup::read_card_object({kSoftHsmModule, "pkcs11:token=" + label},
                                    SecretBytes::from_string(kCardPin), "none", &report);
    return report.serial;
  }
  std::string store_text() {
    std::ifstream in(db_, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  }

  // Set in SetUp (the sandbox directory exists only from then on).
  fs::path pin_, card_pin_, cfg_, db_;
};

TEST_F(DrPrepareCardsTest, QuorumTwoOfThreeRebuildsTheNewTokenPinAndARerunFindsIt) {
  std::string out;
  ASSERT_EQ(prepare("custody.pem",
                    "--cards pkcs11:token=card1 pkcs11:token=card2 pkcs11:token=card3 "
                    "--quorum-k 2" +
                        card_pins(3),
                    &out),
            0)
      << out;
  EXPECT_NE(out.find("share 3 of 3 written to card 'card3'"), std::string::npos) << out;
  EXPECT_NE(out.find("[startup]\nsource = \"quorum\"\ncard_module = \"" +
                     std::string(kSoftHsmModule) + "\"\ncard_label = \"kms-startup-secret\""),
            std::string::npos)
      << out;
  EXPECT_EQ(out.find(kUserPin), std::string::npos) << "the secret was printed";
  // Any two of the three cards rebuild the new token's PIN; one is not enough.
  for (auto [a, b] : {std::pair{"card1", "card3"}, std::pair{"card2", "card1"}}) {
    startup::ShareCollector shares(std::chrono::minutes(5));
    auto first = read_card(a);
    ASSERT_TRUE(first.ok()) << first.error().message;
    auto p1 = shares.add(first->span());
    ASSERT_TRUE(p1.ok()) << p1.error().message;
    EXPECT_FALSE(p1->complete());
    EXPECT_EQ(p1->k, 2u);
    EXPECT_EQ(p1->n, 3u);
    EXPECT_NE(out.find("Quorum " + p1->quorum_id), std::string::npos) << out;
    auto second = read_card(b);
    ASSERT_TRUE(second.ok());
    auto p2 = shares.add(second->span());
    ASSERT_TRUE(p2.ok()) << p2.error().message;
    ASSERT_TRUE(p2->complete());
    auto secret = shares.take_secret();
    ASSERT_TRUE(secret.ok()) << secret.error().message;
    EXPECT_TRUE(constant_time_equal(secret->span(), SecretBytes::from_string(kUserPin).span()));
  }
  EXPECT_EQ(audit_rows("dr.prepare.cards"), 1);
  EXPECT_EQ(audit_rows("dr.prepare"), 1);
  EXPECT_EQ(store_text().find(kUserPin), std::string::npos);

  // A rerun (e.g. after a crash) with the same cards: the quorum is there, nothing is written.
  auto before = read_card("card2");
  ASSERT_TRUE(before.ok());
  out.clear();
  ASSERT_EQ(prepare("again.pem",
                    "--cards pkcs11:token=card1 pkcs11:token=card2 pkcs11:token=card3 -k 2" +
                        card_pins(3),
                    &out),
            0)
      << out;
  EXPECT_NE(out.find("already hold a complete quorum"), std::string::npos) << out;
  auto after = read_card("card2");
  ASSERT_TRUE(after.ok());
  EXPECT_TRUE(constant_time_equal(before->span(), after->span()));
  EXPECT_EQ(audit_rows("dr.prepare.cards"), 2);

  // Other cards but k/n that do not match what card1 holds: refused with what to do.
  out.clear();
  EXPECT_EQ(prepare("third.pem",
                    "--cards pkcs11:token=card1 pkcs11:token=card2 -k 2" + card_pins(2), &out),
            3)
      << out;
  EXPECT_NE(out.find("--force"), std::string::npos) << out;
}

TEST_F(DrPrepareCardsTest, TheNewKeyTokenAsACardIsRefusedAndNothingIsWritten) {
  std::string out;
  EXPECT_EQ(prepare("custody.pem",
                    "--cards pkcs11:token=card1 " + token().uri() + " -k 2" + card_pins(2), &out),
            2)
      << out;
  EXPECT_NE(out.find("names the new key token"), std::string::npos) << out;
  EXPECT_FALSE(fs::exists(dir() / "custody.pem"));
  EXPECT_FALSE(fs::exists(db_));
  auto card = read_card("card1");
  ASSERT_FALSE(card.ok());
  EXPECT_EQ(card.error().code, ErrorCode::kNotFound) << card.error().message;
  // With --old-config, the old key token and the old operator card are refused as well.
  const fs::path old_cfg = dir() / "kmsd-old.toml";
  {
    std::ofstream o(old_cfg);
    o << "[server]\npublic_listen = \"127.0.0.1:18081\"\nadmin_listen = \"127.0.0.1:18444\"\n"
      << "unseal_socket = \"" << (dir() / "old.sock").string() << "\"\n[token]\nmodule = \""
      << kSoftHsmModule << "\"\nuri = \"pkcs11:token=old-kms\"\n[ca]\nsubject = \"/CN=Old\"\n"
      << "[store]\npath = \"" << (dir() / "old.db").string() << "\"\n[startup]\nsource = \"card\"\n"
      << "card_module = \"" << kSoftHsmModule << "\"\ncard_uri = \"pkcs11:token=old-card\"\n";
  }
  for (const std::string& c :
       std::vector<std::string>{"pkcs11:token=old-kms", "pkcs11:serial=" + serial_of("old-card")}) {
    out.clear();
    EXPECT_EQ(prepare("custody.pem",
                      "--old-config '" + old_cfg.string() + "' --cards pkcs11:token=card1 " + c +
                          " -k 2" + card_pins(2),
                      &out),
              2)
        << out;
    EXPECT_NE(out.find("names the old"), std::string::npos) << out;
    EXPECT_FALSE(fs::exists(db_));
  }
  EXPECT_EQ(read_card("old-card").error().code, ErrorCode::kNotFound);
  // Several cards without --quorum-k: a usage error too.
  out.clear();
  EXPECT_EQ(prepare("custody.pem", "--cards pkcs11:token=card1 pkcs11:token=card2", &out), 2)
      << out;
  EXPECT_FALSE(fs::exists(db_));
}

TEST_F(DrPrepareCardsTest, OneCardHoldsTheSecretItselfForSourceCard) {
  std::string out;
  ASSERT_EQ(prepare("custody.pem", "--cards pkcs11:token=card2" + card_pins(1), &out), 0) << out;
  EXPECT_NE(out.find("source = \"card\""), std::string::npos) << out;
  EXPECT_NE(out.find("card_uri = \"pkcs11:token=card2\""), std::string::npos) << out;
  auto secret = read_card("card2");
  ASSERT_TRUE(secret.ok()) << secret.error().message;
  EXPECT_TRUE(constant_time_equal(secret->span(), SecretBytes::from_string(kUserPin).span()));
  EXPECT_FALSE(read_card("card1").ok());
  EXPECT_EQ(audit_rows("dr.prepare.cards"), 1);
}

// End to end: prepare writes a 2-of-3 quorum of the new token's PIN and prints the [startup]
// lines; a real kmsd started on exactly those lines (the startup file removed) stays sealed with
// one card and unseals with a second one through its unseal socket.
class DrPrepareCardsE2eTest : public KmsdTest {};

TEST_F(DrPrepareCardsE2eTest, KmsdOnThePrintedStartupLinesUnsealsWithTwoOfTheThreeNewCards) {
  for (const char* c : {"op1", "op2", "op3"}) token().add_token(c, kCardPin);
  const fs::path card_pin = dir() / "card.pin";
  write_private(card_pin, std::string(kCardPin) + "\n");
  write_config("file");
  write_secret_file(kUserPin);  // the new token's PIN, which prepare reads from startup.file
  const std::string p = " " + shell_quote(card_pin);
  auto prep = kmsctl("dr prepare --config " + shell_quote(conf_path()) +
                     " --admin alice --admin-p12 " + shell_quote(admin_p12()) +
                     " --passphrase-file " + shell_quote(pass_path()) + " --custody-cert-out " +
                     shell_quote(dir() / "custody.pem") + " --card-module " + kSoftHsmModule +
                     " --cards pkcs11:token=op1 pkcs11:token=op2 pkcs11:token=op3 --quorum-k 2 "
                     "--card-pin-files" +
                     p + p + p);
  ASSERT_EQ(prep.status, 0) << prep.output;
  // The printed [startup] block replaces the file source in kmsd.toml.
  const auto from = prep.output.find("[startup]\n");
  ASSERT_NE(from, std::string::npos) << prep.output;
  const auto to = prep.output.find("# quorum ", from);
  ASSERT_NE(to, std::string::npos) << prep.output;
  const std::string block = prep.output.substr(from, to - from);
  std::string conf = read_file(conf_path());
  const std::string old_block =
      "[startup]\nsource = \"file\"\nfile = \"" + secret_path().string() + "\"\n";
  const auto at = conf.find(old_block);
  ASSERT_NE(at, std::string::npos) << conf;
  conf.replace(at, old_block.size(), block);
  std::ofstream(conf_path()) << conf;
  fs::remove(secret_path());

  start();
  ASSERT_TRUE(wait_ready(503)) << log_text();
  const auto unseal = [&](const std::string& card) {
    return kmsctl("unseal --socket " + shell_quote(socket_path()) + " --card " + card +
                  " --pin-file" + p);
  };
  auto one = unseal("pkcs11:token=op3");
  EXPECT_EQ(one.status, 0) << one.output;
  EXPECT_NE(one.output.find("1 of 2 shares"), std::string::npos) << one.output;
  EXPECT_EQ(http_code("/readyz"), "503");
  auto two = unseal("pkcs11:token=op1");
  EXPECT_EQ(two.status, 0) << two.output;
  ASSERT_TRUE(wait_ready(200)) << log_text();
  EXPECT_EQ(log_text().find(kUserPin), std::string::npos);
  EXPECT_EQ(stop(), 0);
}

}  // namespace
}  // namespace kmsd::testing

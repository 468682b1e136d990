// hsm::Token on the fault-injecting shim over a throw-away SoftHSM2 token: every fault kind
// degrades the token (operations fail fast with kUnavailable, never a wrong result), and when
// the fault clears the token recovers by itself (re-open, re-login, re-resolve) within 2 s;
// a PIN the token now rejects is forgotten and tried once; a stalled token fails fast; the
// cached CA key is rebuilt after a recovery.
#include <openssl/x509.h>

#include <atomic>
#include <chrono>
#include <iostream>
#include <mutex>
#include <thread>
#include <vector>

#include "hsm/token.hpp"
#include "tests/faultshim/shim_control.hpp"
#include "tests/support/sandbox.hpp"

namespace kmsd::hsm {
namespace {

using namespace std::chrono_literals;
using kmsd::testing::eventually;
using kmsd::testing::kEveryOutage;
using kmsd::testing::kFaultShimModule;
using kmsd::testing::kUserPin;
using kmsd::testing::outage_test_name;
using kmsd::testing::ShimControl;
using Clock = std::chrono::steady_clock;

std::vector<std::uint8_t> bytes(std::string_view s) {
  return {s.begin(), s.end()};
}

// Signs a small certificate with PRIV; true when it verifies with PUB.
bool signs_and_verifies(EVP_PKEY* priv, EVP_PKEY* pub) {
  ossl::X509Ptr cert(X509_new());
  X509_set_version(cert.get(), X509_VERSION_3);
  ASN1_INTEGER_set(X509_get_serialNumber(cert.get()), 7);
  X509_NAME* name = X509_get_subject_name(cert.get());
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>("fault test"), -1, -1, 0);
  X509_set_issuer_name(cert.get(), name);
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), 0);
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), 3600);
  X509_set_pubkey(cert.get(), pub);
  bool ok = X509_sign(cert.get(), priv, EVP_sha256()) > 0 && X509_verify(cert.get(), pub) == 1;
  ossl::drain_errors();
  return ok;
}

class TokenFaultTest : public kmsd::testing::TokenSandbox {
 protected:
  void SetUp() override {
    TokenSandbox::SetUp();
    shim_ = std::make_unique<ShimControl>(dir());
  }

  TokenOptions options() {
    TokenOptions o;
    o.module_path = kFaultShimModule;
    o.token_uri = token().uri();
    o.pool_size = 2;
    o.call_timeout = 500ms;
    o.probe_interval = 50ms;
    return o;
  }

  // Logged in, with a master key, a CA key and an audit key.
  std::unique_ptr<Token> provisioned(const TokenOptions& o) {
    auto t = Token::open(o);
    if (!t.ok()) {
      ADD_FAILURE() << t.error().message;
      return nullptr;
    }
    auto& tok = **t;
    for (Status st : {tok.login(SecretBytes::from_string(kUserPin)), tok.generate_master_key(1),
                      tok.generate_ca_key(KeyType::kEcP256), tok.generate_audit_key()}) {
      if (!st.ok()) {
        ADD_FAILURE() << st.error().message;
        return nullptr;
      }
    }
    return std::move(t).value();
  }

  // Every kind of work the daemon asks of the token gives the right answer.
  void expect_serves(Token& t, const Bytes& expected_hmac) {
    auto blob = t.seal(bytes("escrowed key"), bytes("user-1"));
    ASSERT_TRUE(blob.ok()) << blob.error().message;
    auto opened = t.open(*blob, bytes("user-1"));
    ASSERT_TRUE(opened.ok()) << opened.error().message;
    EXPECT_EQ(opened->view(), "escrowed key");
    auto mac = t.hmac_sha256(bytes("audit record"));
    ASSERT_TRUE(mac.ok()) << mac.error().message;
    EXPECT_EQ(*mac, expected_hmac);
    auto pub = t.ca_public_key();
    auto priv = t.ca_private_key();
    ASSERT_TRUE(pub.ok() && priv.ok()) << (priv.ok() ? pub.error() : priv.error()).message;
    EXPECT_TRUE(signs_and_verifies(priv->get(), pub->get()));
    EXPECT_TRUE(t.logged_in());
    EXPECT_FALSE(t.status().degraded);
  }

  std::unique_ptr<ShimControl> shim_;
};

class EveryOutage : public TokenFaultTest, public ::testing::WithParamInterface<const char*> {};

INSTANTIATE_TEST_SUITE_P(Faults, EveryOutage, kEveryOutage, outage_test_name);

TEST_P(EveryOutage, FailsFastWhileItLastsAndServesAgainWithin2sOfClearing) {
  auto t = provisioned(options());
  ASSERT_NE(t, nullptr);
  auto mac = t->hmac_sha256(bytes("audit record"));
  ASSERT_TRUE(mac.ok());
  auto pub = t->ca_public_key();
  auto key_before = t->ca_private_key();
  ASSERT_TRUE(pub.ok() && key_before.ok());

  shim_->fault(GetParam());
  auto first = t->seal(bytes("x"), bytes("y"));
  ASSERT_FALSE(first.ok());
  EXPECT_EQ(first.error().code, ErrorCode::kUnavailable) << first.error().message;
  EXPECT_TRUE(t->status().degraded);
  EXPECT_FALSE(t->status().last_error.empty());
  EXPECT_GT(shim_->injected(), 0u);

  // While it lasts: every operation fails fast, none gives an answer.
  for (int i = 0; i < 5; ++i) {
    auto start = Clock::now();
    auto r = t->open(bytes("not a blob"), bytes("y"));
    auto k = t->ca_private_key();
    auto h = t->hmac_sha256(bytes("audit record"));
    EXPECT_LT(Clock::now() - start, 300ms);
    ASSERT_FALSE(r.ok() || k.ok() || h.ok());
    EXPECT_EQ(r.error().code, ErrorCode::kUnavailable) << r.error().message;
    EXPECT_EQ(k.error().code, ErrorCode::kUnavailable) << k.error().message;
    EXPECT_EQ(h.error().code, ErrorCode::kUnavailable) << h.error().message;
    std::this_thread::sleep_for(60ms);  // the background probe keeps trying meanwhile
  }
  EXPECT_TRUE(t->status().degraded);

  shim_->clear();
  auto cleared = Clock::now();
  ASSERT_TRUE(eventually([&] { return !t->status().degraded; }, 2s)) << t->status().last_error;
  EXPECT_LT(Clock::now() - cleared, 2s);
  expect_serves(*t, *mac);
  // The key cached before the outage was dropped with the old sessions.
  auto key_after = t->ca_private_key();
  ASSERT_TRUE(key_after.ok());
  EXPECT_NE(key_after->get(), key_before->get());
}

TEST_F(TokenFaultTest, TransientLostSessionIsRetriedOnceWithoutDegrading) {
  auto t = provisioned(options());
  ASSERT_NE(t, nullptr);
  shim_->fault("session-invalid", "functions = C_WrapKey\ncount = 1\n");
  auto blob = t->seal(bytes("x"), bytes("y"));
  ASSERT_TRUE(blob.ok()) << blob.error().message;
  EXPECT_EQ(shim_->injected(), 1u);
  EXPECT_FALSE(t->status().degraded);
  auto opened = t->open(*blob, bytes("y"));
  ASSERT_TRUE(opened.ok());
  EXPECT_EQ(opened->view(), "x");
}

TEST_F(TokenFaultTest, LoggedOutTokenIsNotMistakenForAMissingKey) {
  auto t = provisioned(options());
  ASSERT_NE(t, nullptr);
  auto blob = t->seal(bytes("x"), bytes("y"));
  ASSERT_TRUE(blob.ok());
  // The token logs out once (the handles kmsd resolved earlier are gone with the recovery
  // the next step forces), then answers normally: the key is found again after re-login.
  shim_->fault("not-logged-in", "functions = C_GetSessionInfo\ncount = 1\n");
  auto key = t->ca_private_key();
  ASSERT_TRUE(key.ok()) << key.error().message;
  auto opened = t->open(*blob, bytes("y"));
  ASSERT_TRUE(opened.ok()) << opened.error().message;
  EXPECT_EQ(opened->view(), "x");
  EXPECT_TRUE(t->logged_in());
}

TEST_F(TokenFaultTest, PinRejectedOnReloginIsForgottenAndTriedOnlyOnce) {
  auto t = provisioned(options());
  ASSERT_NE(t, nullptr);
  auto mac = t->hmac_sha256(bytes("audit record"));
  ASSERT_TRUE(mac.ok());
  shim_->fault("pin-incorrect");  // the token is logged out and refuses the retained PIN
  auto r = t->seal(bytes("x"), bytes("y"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kUnavailable) << r.error().message;
  EXPECT_NE(r.error().message.find("PIN"), std::string::npos) << r.error().message;
  EXPECT_FALSE(t->logged_in());
  EXPECT_EQ(shim_->injected(), 1u);  // one C_Login, never a second guess
  for (int i = 0; i < 3; ++i) {
    auto again = t->seal(bytes("x"), bytes("y"));
    ASSERT_FALSE(again.ok());
    EXPECT_EQ(again.error().code, ErrorCode::kUnavailable) << again.error().message;
    EXPECT_NE(again.error().message.find("no longer accepts the startup secret"),
              std::string::npos);
  }
  std::this_thread::sleep_for(300ms);  // the background probe must not log in either
  EXPECT_EQ(shim_->injected(), 1u);
  EXPECT_TRUE(eventually([&] { return !t->status().degraded; }, 2s));
  EXPECT_FALSE(t->logged_in());

  shim_->clear();
  ASSERT_TRUE(t->login(SecretBytes::from_string(kUserPin)).ok());
  expect_serves(*t, *mac);
}

TEST_F(TokenFaultTest, LockedPinIsForgottenAndReportedAsLocked) {
  auto t = provisioned(options());
  ASSERT_NE(t, nullptr);
  shim_->fault("pin-locked");
  auto r = t->hmac_sha256(bytes("x"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kUnavailable) << r.error().message;
  EXPECT_NE(r.error().message.find("locked"), std::string::npos) << r.error().message;
  EXPECT_FALSE(t->logged_in());
  EXPECT_TRUE(eventually([&] { return t->status().pin_locked; }, 2s));
  auto login = t->login(SecretBytes::from_string(kUserPin));
  ASSERT_FALSE(login.ok());
  EXPECT_EQ(login.error().code, ErrorCode::kPinLocked) << login.error().message;
}

TEST_F(TokenFaultTest, StalledTokenFailsFastAndRecoversWhenItAnswersAgain) {
  auto o = options();
  o.call_timeout = 300ms;
  auto t = provisioned(o);
  ASSERT_NE(t, nullptr);
  auto mac = t->hmac_sha256(bytes("audit record"));
  ASSERT_TRUE(mac.ok());
  shim_->set("delay_ms = 1500\n");
  std::atomic<bool> slow_ok{false};
  std::thread slow([&] {
    auto blob = t->seal(bytes("slow"), bytes("y"));  // hangs in the token, then succeeds
    slow_ok = blob.ok();
  });
  std::this_thread::sleep_for(450ms);
  auto start = Clock::now();
  auto status = t->status();
  auto r = t->hmac_sha256(bytes("audit record"));
  auto took = Clock::now() - start;
  EXPECT_TRUE(status.degraded);
  EXPECT_NE(status.last_error.find("not returned"), std::string::npos) << status.last_error;
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, ErrorCode::kUnavailable) << r.error().message;
  EXPECT_LT(took, 100ms);
  EXPECT_GT(shim_->delayed(), 0u);

  shim_->set("delay_ms = 0\n");
  slow.join();
  EXPECT_TRUE(slow_ok.load());  // the slow call itself gave the right answer, late
  ASSERT_TRUE(eventually([&] { return !t->status().degraded; }, 4s)) << t->status().last_error;
  expect_serves(*t, *mac);
}

TEST_F(TokenFaultTest, ConcurrentWorkDuringAnOutageNeverGetsAWrongAnswer) {
  auto o = options();
  o.pool_size = 4;
  auto t = provisioned(o);
  ASSERT_NE(t, nullptr);
  auto pub = t->ca_public_key();
  ASSERT_TRUE(pub.ok());
  std::atomic<bool> stop{false};
  std::atomic<int> wrong{0}, served{0}, refused{0};
  // What was wrong, for the failure message (the first few).
  std::mutex wrong_mu;
  std::vector<std::string> wrongs;
  auto record_wrong = [&](const std::string& what) {
    ++wrong;
    std::lock_guard lock(wrong_mu);
    if (wrongs.size() < 8) wrongs.push_back(what);
  };
  // An unexpected refusal (anything but kUnavailable) is a wrong answer: what the token told.
  auto refusal = [&](const char* op, const Error& e) {
    if (e.code != ErrorCode::kUnavailable)
      record_wrong(std::string(op) + " refused with code " +
                   std::to_string(static_cast<int>(e.code)) + ": " + e.message);
    ++refused;
  };
  std::vector<std::thread> workers;
  for (int w = 0; w < 4; ++w) {
    workers.emplace_back([&, w] {
      const std::string text = "record of worker " + std::to_string(w);
      while (!stop) {
        auto blob = t->seal(bytes(text), bytes("aad"));
        if (!blob.ok()) {
          refusal("seal", blob.error());
          continue;
        }
        auto opened = t->open(*blob, bytes("aad"));
        if (!opened.ok()) {
          refusal("open", opened.error());
          continue;
        }
        auto key = t->ca_private_key();
        if (!key.ok()) {
          refusal("ca_private_key", key.error());
          continue;
        }
        if (opened->view() != text)
          record_wrong("open gave '" + std::string(opened->view()) + "' for '" + text + "'");
        // A key fetched just before a device loss may fail to sign: that is a refusal, but a
        // signature that does not verify would be a wrong answer.
        ossl::X509Ptr cert(X509_new());
        X509_set_pubkey(cert.get(), pub->get());
        if (X509_sign(cert.get(), key->get(), EVP_sha256()) > 0) {
          if (X509_verify(cert.get(), pub->get()) != 1)
            record_wrong("X509_sign gave a signature that does not verify with the CA public key");
        }
        ossl::drain_errors();
        ++served;
      }
    });
  }
  for (const char* fault : {"device-removed", "session-invalid", "device-error"}) {
    std::this_thread::sleep_for(200ms);
    shim_->fault(fault);
    std::this_thread::sleep_for(300ms);
    shim_->clear();
    EXPECT_TRUE(eventually([&] { return !t->status().degraded; }, 2s)) << fault;
  }
  int before = served.load();
  std::this_thread::sleep_for(300ms);
  stop = true;
  for (auto& th : workers) th.join();
  std::string told;
  for (const auto& w : wrongs) told += "\n  " + w;
  EXPECT_EQ(wrong.load(), 0) << "wrong answers (the first " << wrongs.size() << "):" << told;
  EXPECT_GT(refused.load(), 0);
  EXPECT_GT(served.load(), before);  // serving again after the last outage
}

// The health observer hears of an outage when it starts and when it ends: the fault as
// classified, the first failure's return code, the operations refused meanwhile.
TEST_F(TokenFaultTest, OutageIsToldWhenItStartsAndWhenItEndsWithWhatWasRefused) {
  auto t = provisioned(options());
  ASSERT_TRUE(t);
  std::mutex mu;
  std::vector<TokenOutage> told;
  t->set_health_observer([&](const TokenOutage& o) {
    std::lock_guard lock(mu);
    told.push_back(o);
  });
  auto count = [&] {
    std::lock_guard lock(mu);
    return told.size();
  };
  shim_->fault("device-error");
  for (int i = 0; i < 3; ++i) EXPECT_FALSE(t->hmac_sha256(bytes("x")).ok());
  ASSERT_EQ(count(), 1u);  // started, once
  shim_->clear();
  ASSERT_TRUE(eventually([&] { return count() == 2; }, 2s));
  t->set_health_observer(nullptr);
  const TokenOutage& start = told[0];
  const TokenOutage& end = told[1];
  EXPECT_FALSE(start.ended.has_value());
  EXPECT_EQ(start.fault, Fault::kTokenGone);
  EXPECT_EQ(start.code, "CKR_DEVICE_ERROR");
  EXPECT_FALSE(start.sealed);
  ASSERT_TRUE(end.ended.has_value());
  EXPECT_EQ(end.started, start.started);
  EXPECT_GE(*end.ended, end.started);
  EXPECT_GT(end.duration.count(), 0);
  EXPECT_EQ(end.refused, 3u);  // the three refused calls, not the probe's retries
  EXPECT_EQ(end.code, "CKR_DEVICE_ERROR");
  EXPECT_TRUE(t->hmac_sha256(bytes("x")).ok());
}

// A refused re-login is an outage that ends only at the next login, not when the token merely
// answers again.
TEST_F(TokenFaultTest, OutageOfARefusedPinEndsAtTheNextLogin) {
  auto t = provisioned(options());
  ASSERT_TRUE(t);
  std::mutex mu;
  std::vector<TokenOutage> told;
  t->set_health_observer([&](const TokenOutage& o) {
    std::lock_guard lock(mu);
    told.push_back(o);
  });
  shim_->fault("pin-incorrect");
  EXPECT_FALSE(t->hmac_sha256(bytes("x")).ok());
  EXPECT_FALSE(t->hmac_sha256(bytes("x")).ok());  // sealed: refused without a token call
  shim_->clear();
  std::this_thread::sleep_for(300ms);  // the probe finds the token answering: not over yet
  {
    std::lock_guard lock(mu);
    ASSERT_EQ(told.size(), 1u);
    EXPECT_TRUE(told[0].sealed);
    EXPECT_EQ(told[0].fault, Fault::kPinIncorrect);
    EXPECT_EQ(told[0].code, "CKR_PIN_INCORRECT");
  }
  ASSERT_TRUE(t->login(SecretBytes::from_string(kUserPin)).ok());
  t->set_health_observer(nullptr);
  ASSERT_EQ(told.size(), 2u);
  EXPECT_TRUE(told[1].ended.has_value());
  EXPECT_TRUE(told[1].sealed);
  EXPECT_EQ(told[1].refused, 2u);
}

// A token without AES key wrap (tpm2-pkcs11 has none; here the shim hides mechanisms of a
// SoftHSM token): the configured mechanism falls back to AES-GCM, or to AES-CBC-PAD + HMAC
// when GCM is missing too. The blob records the mechanism used, and it seals and opens.
struct Fallback {
  const char* hide;
  WrapMechanism configured;
  WrapMechanism expected;
  const char* name;
  friend void PrintTo(const Fallback& f, std::ostream* os) { *os << f.name; }
};

class WrapFallback : public TokenFaultTest, public ::testing::WithParamInterface<Fallback> {};

INSTANTIATE_TEST_SUITE_P(
    Mechanisms, WrapFallback,
    ::testing::Values(
        Fallback{"", WrapMechanism::kAesKeyWrapPad, WrapMechanism::kAesKeyWrapPad, "AllOffered"},
        Fallback{"CKM_AES_KEY_WRAP_PAD", WrapMechanism::kAesKeyWrapPad, WrapMechanism::kAesGcm,
                 "NoKeyWrap"},
        Fallback{"CKM_AES_KEY_WRAP_PAD,CKM_AES_GCM", WrapMechanism::kAesKeyWrapPad,
                 WrapMechanism::kAesCbcPadHmac, "NoKeyWrapNoGcm"},
        Fallback{"CKM_AES_GCM", WrapMechanism::kAesGcm, WrapMechanism::kAesCbcPadHmac, "NoGcm"}),
    [](const auto& info) { return std::string(info.param.name); });

TEST_P(WrapFallback, ConfiguredMechanismFallsBackToOneTheTokenOffers) {
  const Fallback& f = GetParam();
  shim_->set(std::string("fault = none\nhide_mechanisms = ") + f.hide + "\n");
  auto o = options();
  o.wrap = f.configured;
  auto t = provisioned(o);
  ASSERT_TRUE(t);
  const WrapChoice& c = t->wrap_choice();
  EXPECT_EQ(c.configured, f.configured);
  EXPECT_EQ(c.used, f.expected);
  if (f.configured == f.expected) {
    EXPECT_TRUE(c.note.empty()) << c.note;
  } else {
    EXPECT_NE(c.note.find(std::string("instead")), std::string::npos) << c.note;
    EXPECT_NE(c.note.find(to_string(f.expected)), std::string::npos) << c.note;
  }
  auto blob = t->seal(bytes("escrowed key"), bytes("user-1"));
  ASSERT_TRUE(blob.ok()) << blob.error().message;
  ASSERT_GT(blob->size(), 2u);
  EXPECT_EQ((*blob)[1], static_cast<std::uint8_t>(f.expected));
  auto opened = t->open(*blob, bytes("user-1"));
  ASSERT_TRUE(opened.ok()) << opened.error().message;
  EXPECT_EQ(opened->view(), "escrowed key");
  EXPECT_FALSE(t->open(*blob, bytes("user-2")).ok());
}

// The shim really hides what it says: the token refuses a hidden mechanism, so the fallback
// above is what made sealing work.
TEST_F(TokenFaultTest, HiddenMechanismIsRefusedByTheToken) {
  auto o = options();
  o.wrap = WrapMechanism::kAesKeyWrapPad;
  auto t = provisioned(o);  // key wrap offered: a key-wrap blob
  ASSERT_TRUE(t);
  auto blob = t->seal(bytes("escrowed key"), bytes("user-1"));
  ASSERT_TRUE(blob.ok()) << blob.error().message;
  shim_->set("fault = none\nhide_mechanisms = CKM_AES_KEY_WRAP_PAD\n");
  EXPECT_FALSE(t->open(*blob, bytes("user-1")).ok());
  shim_->clear();
  auto opened = t->open(*blob, bytes("user-1"));
  ASSERT_TRUE(opened.ok()) << opened.error().message;
  EXPECT_EQ(opened->view(), "escrowed key");
}

// Repeated outages do not leak sessions on the token: a session the token closed is
// forgotten, one a lost login left open is closed, so the shim never counts more sessions
// open than the pool holds.
TEST_P(EveryOutage, RepeatedOutagesLeaveNoSessionOpenBeyondThePool) {
  auto o = options();
  auto t = provisioned(o);
  ASSERT_TRUE(t);
  auto expected = t->hmac_sha256(bytes("audit record"));
  ASSERT_TRUE(expected.ok());
  for (int round = 0; round < 6; ++round) {
    const auto before = shim_->open_sessions();
    shim_->fault(GetParam());
    for (int i = 0; i < 3; ++i) EXPECT_FALSE(t->hmac_sha256(bytes("audit record")).ok());
    const auto during = shim_->open_sessions();
    std::this_thread::sleep_for(150ms);  // a few probes meet the fault too
    const auto later = shim_->open_sessions();
    shim_->clear();
    ASSERT_TRUE(eventually([&] { return !t->status().degraded; }, 2s)) << "round " << round;
    for (int i = 0; i < 3; ++i) {
      auto mac = t->hmac_sha256(bytes("audit record"));
      ASSERT_TRUE(mac.ok()) << mac.error().message;
      EXPECT_EQ(*mac, *expected);
    }
    EXPECT_LE(shim_->open_sessions(), o.pool_size)
        << "round " << round << ": open before the fault " << before << ", after the refused calls "
        << during << ", after probing " << later;
  }
  std::cout << "[ measured ] " << GetParam() << ": " << shim_->open_sessions()
            << " session(s) open after 6 outages (pool " << o.pool_size << ")\n";
}

}  // namespace
}  // namespace kmsd::hsm

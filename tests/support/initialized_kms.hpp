// A KMS initialized in-process on the sandbox token, as `kmsctl init` leaves it (for the tests
// of daemon components that need the CA and the store, without a kmsd process). Header only:
// the test links kmsd_provision, kmsd_store and kmsd_test_token.
#pragma once

#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "common/ossl.hpp"
#include "common/secret.hpp"
#include "config/config.hpp"
#include "daemon/provision/initializer.hpp"
#include "daemon/store/store.hpp"
#include "hsm/token.hpp"
#include "tests/support/logged_in_token.hpp"
#include "tests/support/sandbox.hpp"

namespace kmsd::testing {

// SetUp opens the sandbox token logged in (tok); initialize_kms() then makes the KMS.
class InitializedKmsTest : public TokenSandbox {
 protected:
  void SetUp() override {
    TokenSandbox::SetUp();
    tok = open_logged_in_token(token());
    ASSERT_NE(tok, nullptr);
  }

  // cfg for this token and a store at dir()/kms.db (CA key of KEY_TYPE signing with DIGEST,
  // CA subject SUBJECT); the store opened and initialized (CA key on the token, CA certificate,
  // first administrator "root" written to dir()/admin.p12 with passphrase "pass"); ca_cert is
  // the CA certificate. A failure is fatal to the current test: call it through
  // ASSERT_NO_FATAL_FAILURE.
  void initialize_kms(const std::string& subject, hsm::KeyType key_type = hsm::KeyType::kEcP256,
                      const std::string& digest = "sha256") {
    cfg.token.module = kSoftHsmModule;
    cfg.token.uri = token().uri();
    cfg.ca.key_type = key_type;
    cfg.ca.digest = digest;
    cfg.ca.subject = subject;
    cfg.store.path = dir() / "kms.db";
    auto opened = store::Store::open(cfg.store.path);
    ASSERT_TRUE(opened.ok()) << opened.error().message;
    store = std::move(*opened);
    provision::AdminOptions admin{"root", dir() / "admin.p12", SecretBytes::from_string("pass")};
    auto rep = provision::initialize(cfg, *tok, *store, admin);
    ASSERT_TRUE(rep.ok()) << rep.error().message;
    auto ca = provision::load_ca_certificate(*store);
    ASSERT_TRUE(ca.ok()) << ca.error().message;
    ca_cert = std::move(*ca);
  }

  std::unique_ptr<hsm::Token> tok;
  config::Config cfg;
  std::unique_ptr<store::Store> store;
  ossl::X509Ptr ca_cert;
};

}  // namespace kmsd::testing

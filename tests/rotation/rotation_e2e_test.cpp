// Master-key rotation end to end (issue 7): kmsctl master-key rotate while users enroll, kmsd
// killed with SIGKILL in the middle of the re-wrap, started again, the job resumes and
// finishes, the old version is retired; then every escrowed key still opens (and is the key
// its user received), every record is under the new version, and pkcs11-tool no longer lists
// kms-master-v1 on the token.
#include <openssl/evp.h>
#include <openssl/pem.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "cli/client/admin_client.hpp"
#include "common/ossl.hpp"
#include "daemon/enroll/enrollment.hpp"
#include "daemon/lifecycle/enrollment_token.hpp"
#include "daemon/store/store.hpp"
#include "hsm/envelope.hpp"
#include "hsm/token.hpp"
#include "tests/e2e/harness.hpp"

namespace kmsd::testing {
namespace {

using json = nlohmann::json;
using namespace std::chrono_literals;

constexpr int kBefore = 16;  // users enrolled before the rotation
constexpr int kDuring = 8;   // users enrolling while it runs

// The PKCS#8 DER of a PEM private key (what the user received), "" if unreadable.
std::string der_of_pem(const std::string& pem) {
  ossl::BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  ossl::EvpPkeyPtr key(PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
  if (!key) return "";
  PKCS8_PRIV_KEY_INFO* p8 = EVP_PKEY2PKCS8(key.get());
  if (p8 == nullptr) return "";
  unsigned char* der = nullptr;
  int n = i2d_PKCS8_PRIV_KEY_INFO(p8, &der);
  PKCS8_PRIV_KEY_INFO_free(p8);
  if (n <= 0) return "";
  std::string out(reinterpret_cast<char*>(der), static_cast<std::size_t>(n));
  OPENSSL_free(der);
  return out;
}

class RotationE2eTest : public KmsdTest {
 protected:
  json status() { return api("GET", "/v1/master-key").j(); }

  // Enrolls ID with its token; the escrowed key's PKCS#8 DER the reply delivered ("" when the
  // reply was lost to a kill and the enrollment had gone through).
  bool enroll(client::AdminClient& c, const std::string& id, const std::string& token,
              std::string& key_der) {
    ossl::EvpPkeyPtr key(EVP_EC_gen("P-256"));
    auto csr = ossl::csr_pem(key.get(), id);
    if (!csr.ok()) return false;
    for (int attempt = 0; attempt < 200; ++attempt) {
      auto reply = c.post("/enroll/v1/enroll", json{{"user", id}, {"token", token}, {"csr", *csr}});
      if (reply.ok() && reply->status == 200) {
        auto keys = reply->json().value("keys", json::array());
        if (keys.empty()) return false;
        key_der = der_of_pem(keys.back().value("private_key", ""));
        return true;
      }
      if (reply.ok() && reply->status != 503) {
        // Refused: the first attempt went through before a kill and its reply was lost.
        return sql("SELECT state FROM users WHERE id = '" + id + "'") == "active\n";
      }
      std::this_thread::sleep_for(100ms);  // kmsd is down or not unsealed yet
    }
    return false;
  }
};

TEST_F(RotationE2eTest, RotateUnderLoadKillMidwayResumeRetireAndEveryKeyStillOpens) {
  boot();
  const auto users = enable_users("rot", 100, kBefore + kDuring, "rot");
  ASSERT_EQ(users.size(), static_cast<std::size_t>(kBefore + kDuring));

  std::mutex mu;
  std::map<std::string, std::string> delivered;  // user -> PKCS#8 DER received
  {
    auto c = enrollment_client();
    ASSERT_NE(c, nullptr);
    for (int i = 0; i < kBefore; ++i) {
      std::string der;
      ASSERT_TRUE(enroll(*c, users[i].first, users[i].second, der)) << users[i].first;
      delivered[users[i].first] = der;
    }
  }
  EXPECT_EQ(sql("SELECT master_version, count(*) FROM key_history GROUP BY master_version"),
            "1|" + std::to_string(kBefore) + "\n");

  const std::string opts = kmsctl_admin_options();
  // Nothing to retire yet: v1 is the current version.
  auto early = kmsctl("master-key retire 1" + opts);
  EXPECT_EQ(early.status, 3) << early.output;

  // Two records per transaction, 300 ms apart: slow enough to be killed in the middle.
  auto rot = kmsctl("master-key rotate --batch 2 --pause-ms 300" + opts);
  ASSERT_EQ(rot.status, 0) << rot.output;
  // While it runs, v1 cannot be retired, and a second rotation is refused.
  auto busy = kmsctl("master-key retire 1" + opts);
  EXPECT_EQ(busy.status, 3) << busy.output;
  EXPECT_THAT(busy.output, ::testing::HasSubstr("still running"));
  EXPECT_EQ(kmsctl("master-key rotate" + opts).status, 3);

  // Users enroll while the re-wrap runs (and across the kill), one client, 150 ms apart.
  std::atomic<int> failed{0};
  EnrollmentLoad load([this] { return enrollment_client(); }, kBefore, kBefore + kDuring, 1, 150ms,
                      [&](client::AdminClient& c, int i) {
                        std::string der;
                        if (!enroll(c, users[i].first, users[i].second, der)) {
                          ++failed;
                          return;
                        }
                        std::lock_guard lk(mu);
                        delivered[users[i].first] = der;
                      });

  // Midway: some records re-wrapped, not all.
  json s;
  for (int i = 0; i < 200; ++i) {
    s = status();
    if (s.value("done", 0) >= 4) break;
    std::this_thread::sleep_for(50ms);
  }
  ASSERT_EQ(s.value("state", ""), "running") << s.dump();
  ASSERT_GE(s.value("done", 0), 4) << s.dump();
  ASSERT_LT(s.value("done", 0), s.value("total", 0)) << s.dump();
  EXPECT_EQ(s.value("target", 0), 2);

  ASSERT_NO_FATAL_FAILURE(kill_kmsd());
  const std::string at_kill =
      sql("SELECT master_version, count(*) FROM key_history GROUP BY master_version");
  std::printf("[ rotation ] killed at %d of %d re-wrapped; key history by master version:\n%s",
              s.value("done", 0), s.value("total", 0), at_kill.c_str());
  EXPECT_THAT(at_kill, ::testing::HasSubstr("1|"));  // not all moved yet
  EXPECT_THAT(at_kill, ::testing::HasSubstr("2|"));  // but some did

  start();
  ASSERT_TRUE(wait_ready(200)) << log_text();
  load.join();
  EXPECT_EQ(load.unconnected(), 0);
  EXPECT_EQ(failed.load(), 0);

  // The job resumes by itself and finishes.
  for (int i = 0; i < 600; ++i) {
    s = status();
    if (s.value("state", "") == "finished") break;
    std::this_thread::sleep_for(100ms);
  }
  ASSERT_EQ(s.value("state", ""), "finished") << s.dump() << log_text();
  EXPECT_EQ(s.value("remaining", -1), 0) << s.dump();
  EXPECT_EQ(s.value("current_version", 0), 2);
  if (s.contains("rate_per_second"))
    std::printf("[ rotation ] resumed job: %s re-wraps/s (paced: batch 2, 300 ms pause)\n",
                s["rate_per_second"].dump().c_str());
  EXPECT_EQ(sql("SELECT count(*) FROM key_history WHERE master_version <> 2"), "0\n");
  EXPECT_EQ(sql("SELECT count(*) FROM key_history"), std::to_string(kBefore + kDuring) + "\n");
  EXPECT_THAT(log_text(), ::testing::HasSubstr("resumes"));

  // v2 is current: not retirable; v1 now is.
  auto current = kmsctl("master-key retire 2" + opts);
  EXPECT_EQ(current.status, 3) << current.output;
  auto retired = kmsctl("master-key retire 1" + opts);
  ASSERT_EQ(retired.status, 0) << retired.output;
  auto st = kmsctl("master-key status" + opts);
  EXPECT_EQ(st.status, 0) << st.output;
  EXPECT_THAT(st.output, ::testing::HasSubstr("finished"));
  auto verify = kmsctl("audit verify" + opts);
  EXPECT_EQ(verify.status, 0) << verify.output;
  const std::string audited =
      sql("SELECT action FROM audit_log WHERE action LIKE 'master_key.%' "
          "ORDER BY seq");
  EXPECT_THAT(audited, ::testing::HasSubstr("master_key.rotate.started"));
  EXPECT_THAT(audited, ::testing::HasSubstr("master_key.rotate.resumed"));
  EXPECT_THAT(audited, ::testing::HasSubstr("master_key.rotate.finished"));
  EXPECT_THAT(audited, ::testing::HasSubstr("master_key.retire"));
  ASSERT_EQ(stop(), 0);

  // The token: kms-master-v1 is gone, kms-master-v2 is there.
  auto objects = sh(std::string("pkcs11-tool --module ") + kSoftHsmModule + " --token-label " +
                    shell_quote(token().label()) + " --list-objects --login --pin " + kUserPin);
  ASSERT_EQ(objects.status, 0) << objects.output;
  EXPECT_THAT(objects.output, ::testing::Not(::testing::HasSubstr("kms-master-v1")));
  EXPECT_THAT(objects.output, ::testing::HasSubstr("kms-master-v2"));

  // kmsd starts and unseals without v1, and reports only v2 on the token.
  start();
  ASSERT_TRUE(wait_ready(200)) << log_text();
  s = status();
  EXPECT_EQ(s.value("token_versions", json::array()), json::array({2})) << s.dump();
  EXPECT_EQ(s.value("escrowed_keys_by_version", json::object()), json({{"2", kBefore + kDuring}}))
      << s.dump();
  ASSERT_EQ(stop(), 0);

  // Every escrowed key opens under v2, and is the key its user received.
  auto store = store::Store::open(db_path());
  ASSERT_TRUE(store.ok()) << store.error().message;
  hsm::TokenOptions to;
  to.module_path = kSoftHsmModule;
  to.token_uri = token().uri();
  auto tok = hsm::Token::open(to);
  ASSERT_TRUE(tok.ok()) << tok.error().message;
  ASSERT_TRUE((*tok)->login(SecretBytes::from_string(kUserPin)).ok());
  int opened = 0;
  for (const auto& [id, token_text] : users) {
    auto history = (*store)->key_history(id);
    ASSERT_TRUE(history.ok());
    ASSERT_EQ(history->size(), 1u) << id;
    const auto& rec = history->front();
    EXPECT_EQ(rec.master_version, 2u) << id;
    auto parsed = hsm::envelope::parse(rec.sealed_key);
    ASSERT_TRUE(parsed.has_value()) << id;
    EXPECT_EQ(parsed->version, hsm::envelope::kVersion) << id;
    EXPECT_EQ(parsed->master_version, 2u) << id;
    auto der = enroll::open_escrowed(**tok, rec);
    ASSERT_TRUE(der.ok()) << id << ": " << der.error().message;
    ++opened;
    const std::string& got = delivered[id];
    if (!got.empty()) {
      EXPECT_EQ(std::string(reinterpret_cast<const char*>(der->data()), der->size()), got) << id;
    }
    // The user's (spent) enrollment token record is under v2 as well.
    auto t = (*store)->find_enrollment_token(id);
    ASSERT_TRUE(t.ok());
    if (*t) {
      EXPECT_EQ(lifecycle::EnrollmentTokens::master_version_of((*t)->sealed), 2u) << id;
    }
  }
  EXPECT_EQ(opened, kBefore + kDuring);
}

}  // namespace
}  // namespace kmsd::testing

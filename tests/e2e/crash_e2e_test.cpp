// Crash safety of enrollment: kmsd is killed with SIGKILL at random moments while clients
// enroll over the real HTTPS API, and started again each time. Afterwards every enrollment
// that was acknowledged (200 with the certificates) is in the store with exactly those
// certificates, no one-time token was spent without its certificates, every enrollment that
// was not acknowledged can be completed with the same token, and the audit chain verifies.
#include <openssl/evp.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "cli/client/admin_client.hpp"
#include "common/ossl.hpp"
#include "daemon/ca/issuer.hpp"
#include "tests/e2e/harness.hpp"

namespace kmsd::testing {
namespace {

using json = nlohmann::json;
using namespace std::chrono_literals;

constexpr int kUsers = 48;
constexpr int kClients = 4;
constexpr int kKills = 3;

struct Acknowledged {
  std::string signing_serial;
  std::string encryption_serial;
};

std::string serial_of(const std::string& pem) {
  auto cert = ossl::x509_from_pem(pem);
  return cert.ok() ? ca::serial_hex(cert->get()) : "";
}

class CrashTest : public KmsdTest {
 protected:
  void kill_and_restart() {
    ASSERT_NO_FATAL_FAILURE(kill_kmsd());
    start();
    ASSERT_TRUE(wait_ready(200)) << log_text();
  }
};

TEST_F(CrashTest, KilledDuringEnrollmentLosesNoAcknowledgedEnrollmentAndSpendsNoTokenForNothing) {
  boot();
  // Users and their one-time tokens; keys and CSRs made before any traffic.
  const auto users = enable_users("crash", 0, kUsers, "crash");
  std::map<std::string, std::string> tokens(users.begin(), users.end());
  ASSERT_EQ(tokens.size(), static_cast<std::size_t>(kUsers));
  std::map<std::string, std::string> csrs;
  for (const auto& [id, token] : tokens) {
    ASSERT_FALSE(token.empty()) << id;
    ossl::EvpPkeyPtr key(EVP_EC_gen("P-256"));
    ASSERT_NE(key, nullptr);
    auto csr = ossl::csr_pem(key.get(), id);
    ASSERT_TRUE(csr.ok());
    csrs[id] = *csr;
  }

  // Clients enroll the users one by one while the main thread kills and restarts kmsd.
  std::mutex mu;
  std::map<std::string, Acknowledged> acked;
  std::set<std::string> unanswered;  // the request may or may not have reached the store
  std::vector<std::string> wrong;    // answers that are neither a success nor an outage
  std::vector<std::string> ids;
  for (const auto& [id, t] : tokens) ids.push_back(id);
  // Paced (20 ms after each user) so that the kills land in the middle of the traffic.
  EnrollmentLoad load(
      [this] { return enrollment_client(); }, 0, kUsers, kClients, 20ms,
      [&](client::AdminClient& client, int i) {
        const std::string& id = ids[static_cast<std::size_t>(i)];
        auto reply = client.post("/enroll/v1/enroll",
                                 json{{"user", id}, {"token", tokens[id]}, {"csr", csrs[id]}});
        std::lock_guard lk(mu);
        if (!reply.ok() || reply->status == 503) {
          unanswered.insert(id);  // kmsd died under it, or was not ready yet
          std::this_thread::sleep_for(30ms);
        } else if (reply->status == 200) {
          auto j = reply->json();
          acked[id] = {serial_of(j.value("signing_certificate", "")),
                       serial_of(j.value("encryption_certificate", ""))};
        } else {
          wrong.push_back(id + ": " + std::to_string(reply->status) + " " + reply->body);
        }
      });
  std::mt19937 rng(std::random_device{}());
  std::uniform_int_distribution<int> pause_ms(150, 600);
  for (int k = 0; k < kKills && load.busy(); ++k) {
    std::this_thread::sleep_for(std::chrono::milliseconds(pause_ms(rng)));
    ASSERT_NO_FATAL_FAILURE(kill_and_restart());
  }
  load.join();
  EXPECT_EQ(load.unconnected(), 0);
  EXPECT_THAT(wrong, ::testing::IsEmpty());
  std::printf("[ crash    ] %d kills; %zu enrollments acknowledged, %zu met a kill\n", kKills,
              acked.size(), unanswered.size());

  // Every acknowledged enrollment is there, with exactly the certificates the client got.
  for (const auto& [id, a] : acked) {
    ASSERT_FALSE(a.signing_serial.empty()) << id;
    EXPECT_EQ(sql("SELECT state FROM users WHERE id = '" + id + "'"), "active\n") << id;
    const std::string certs =
        sql("SELECT kind || ' ' || serial FROM certificates WHERE "
            "user_id = '" +
            id + "' ORDER BY kind");
    EXPECT_EQ(certs, "encryption " + a.encryption_serial + "\nsigning " + a.signing_serial + "\n")
        << id;
  }
  // No token was spent without its certificates, and no certificates exist without the token
  // being spent: for every user, both or neither.
  EXPECT_EQ(sql("SELECT t.user_id FROM enrollment_tokens t WHERE (t.used_at IS NOT NULL) <> "
                "EXISTS (SELECT 1 FROM certificates c WHERE c.user_id = t.user_id)"),
            "");
  EXPECT_EQ(sql("SELECT user_id FROM certificates WHERE kind IN ('signing', 'encryption') "
                "GROUP BY user_id HAVING count(*) <> 2"),
            "");
  // Every escrowed key is in a user's key history with its certificate.
  EXPECT_EQ(sql("SELECT count(*) FROM key_history WHERE cert_serial IS NULL"), "0\n");

  // What met a kill either went through entirely (the reply was lost) or not at all: then the
  // same token completes it now.
  auto client = enrollment_client();
  ASSERT_NE(client, nullptr);
  int completed_after = 0;
  for (const auto& id : unanswered) {
    if (acked.count(id) != 0) continue;
    if (sql("SELECT state FROM users WHERE id = '" + id + "'") == "active\n") continue;
    auto reply = client->post("/enroll/v1/enroll",
                              json{{"user", id}, {"token", tokens[id]}, {"csr", csrs[id]}});
    ASSERT_TRUE(reply.ok()) << reply.error().message;
    EXPECT_EQ(reply->status, 200) << id << ": " << reply->body;
    ++completed_after;
  }
  std::printf("[ crash    ] %d interrupted enrollments completed afterwards with their token\n",
              completed_after);

  // The audit chain survived every kill.
  auto verify = kmsctl("audit verify" + kmsctl_admin_options());
  EXPECT_EQ(verify.status, 0) << verify.output;
  // The store is a sound SQLite database.
  EXPECT_EQ(sql("PRAGMA integrity_check"), "ok\n");
}

}  // namespace
}  // namespace kmsd::testing

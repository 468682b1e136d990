// Throughput of the token layer against a throw-away SoftHSM2 token, printed as ratios
// against plain OpenSSL in software — the ceilings DESIGN.md measured on this machine.
//
//   token_bench [--seconds S] [--threads N]
//
// Figures: envelope seal+open per second (token-wrapped data key vs a software-only
// AES-256-GCM seal+open), CA signatures per second through the token key (EC P-256 and RSA-2048)
// vs the same signature with a software key. No assertions: it prints, people judge.
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <stdlib.h>
#include <CLI/CLI.hpp>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_sandbox.hpp"
#include "common/ossl.hpp"
#include "daemon/ca/issuer.hpp"
#include "hsm/token.hpp"

namespace {

using namespace kmsd;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

using bench::kModule;
using bench::kPin;
using bench::Sandbox;

// Runs OP on THREADS threads for SECONDS; returns operations per second (-1 on failure).
double rate(int threads, double seconds, const std::function<bool()>& op) {
  std::atomic<long> count{0};
  std::atomic<bool> failed{false};
  auto end = Clock::now() + std::chrono::duration<double>(seconds);
  auto t0 = Clock::now();
  std::vector<std::thread> ts;
  for (int i = 0; i < threads; ++i)
    ts.emplace_back([&] {
      long n = 0;
      while (Clock::now() < end && !failed) {
        if (!op()) failed = true;
        ++n;
      }
      count += n;
    });
  for (auto& t : ts) t.join();
  double elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
  return failed ? -1 : static_cast<double>(count) / elapsed;
}

bool software_seal_open(const std::vector<std::uint8_t>& msg) {
  unsigned char key[32], iv[12], tag[16];
  RAND_bytes(key, sizeof key);
  RAND_bytes(iv, sizeof iv);
  std::vector<unsigned char> ct(msg.size()), pt(msg.size());
  int n = 0;
  ossl::EvpCipherCtxPtr e(EVP_CIPHER_CTX_new());
  EVP_EncryptInit_ex(e.get(), EVP_aes_256_gcm(), nullptr, key, iv);
  EVP_EncryptUpdate(e.get(), ct.data(), &n, msg.data(), static_cast<int>(msg.size()));
  EVP_EncryptFinal_ex(e.get(), ct.data() + n, &n);
  EVP_CIPHER_CTX_ctrl(e.get(), EVP_CTRL_GCM_GET_TAG, 16, tag);
  ossl::EvpCipherCtxPtr d(EVP_CIPHER_CTX_new());
  EVP_DecryptInit_ex(d.get(), EVP_aes_256_gcm(), nullptr, key, iv);
  EVP_DecryptUpdate(d.get(), pt.data(), &n, ct.data(), static_cast<int>(ct.size()));
  EVP_CIPHER_CTX_ctrl(d.get(), EVP_CTRL_GCM_SET_TAG, 16, tag);
  return EVP_DecryptFinal_ex(d.get(), pt.data() + n, &n) == 1;
}

bool sign_once(EVP_PKEY* key) {
  static const unsigned char data[64] = {1, 2, 3};
  ossl::EvpMdCtxPtr ctx(EVP_MD_CTX_new());
  unsigned char sig[512];
  size_t len = sizeof sig;
  return EVP_DigestSignInit(ctx.get(), nullptr, EVP_sha256(), nullptr, key) == 1 &&
         EVP_DigestSign(ctx.get(), sig, &len, data, sizeof data) == 1;
}

void line(const char* what, int threads, double token, double software) {
  std::printf("%-34s threads=%d  token %10.0f/s  software %10.0f/s  ratio token/software %.4f\n",
              what, threads, token, software, software > 0 ? token / software : 0.0);
}

}  // namespace

int main(int argc, char** argv) {
  double seconds = 2.0;
  int max_threads = 2;
  CLI::App app{"token-layer throughput (envelope seal+open, CA signatures) beside software"};
  app.add_option("--seconds", seconds, "length of each figure")->check(CLI::Range(0.01, 600.0));
  app.add_option("--threads", max_threads, "most concurrent callers")->check(CLI::Range(1, 64));
  CLI11_PARSE(app, argc, argv);
  Sandbox sandbox;
  std::printf("kmsd token_bench: SoftHSM2 %s, %.1f s per figure\n", kModule, seconds);
  for (auto mech : {hsm::WrapMechanism::kAesKeyWrapPad, hsm::WrapMechanism::kAesGcm,
                    hsm::WrapMechanism::kAesCbcPadHmac}) {
    hsm::TokenOptions o;
    o.module_path = kModule;
    o.token_uri = "pkcs11:token=bench";
    o.pool_size = static_cast<std::size_t>(max_threads);
    o.wrap = mech;
    o.labels.master_prefix = std::string("bench-") + hsm::to_string(mech);
    o.labels.master_mac_prefix = o.labels.master_prefix + "-mac";
    auto token = hsm::Token::open(o);
    if (!token.ok() || !(*token)->login(SecretBytes::from_string(kPin)).ok() ||
        !(*token)->generate_master_key(1).ok()) {
      std::fprintf(stderr, "token_bench: token setup failed\n");
      return 1;
    }
    std::vector<std::uint8_t> msg(256, 0x42), aad = {'u', 's', 'e', 'r'};
    for (int t = 1; t <= max_threads; ++t) {
      double tok = rate(t, seconds, [&] {
        auto blob = (*token)->seal(msg, aad);
        return blob.ok() && (*token)->open(*blob, aad).ok();
      });
      double sw = rate(t, seconds, [&] { return software_seal_open(msg); });
      std::string what = std::string("seal+open 256 B (") + hsm::to_string(mech) + ")";
      line(what.c_str(), t, tok, sw);
    }
  }
  for (auto kt : {hsm::KeyType::kEcP256, hsm::KeyType::kRsa2048}) {
    hsm::TokenOptions o;
    o.module_path = kModule;
    o.token_uri = "pkcs11:token=bench";
    o.pool_size = static_cast<std::size_t>(max_threads);
    o.labels.ca = std::string("bench-ca-") + hsm::to_string(kt);
    auto token = hsm::Token::open(o);
    if (!token.ok() || !(*token)->login(SecretBytes::from_string(kPin)).ok() ||
        !(*token)->generate_ca_key(kt).ok()) {
      std::fprintf(stderr, "token_bench: CA key setup failed\n");
      return 1;
    }
    auto soft = ca::generate_key(kt);
    for (int t = 1; t <= max_threads; ++t) {
      // One token key per thread, as a signing service would hold per worker.
      std::vector<ossl::EvpPkeyPtr> keys;
      for (int i = 0; i < t; ++i) keys.push_back(std::move((*token)->ca_private_key().value()));
      std::atomic<int> next{0};
      thread_local int mine = -1;
      double tok = rate(t, seconds, [&] {
        if (mine < 0 || mine >= t) mine = next++ % t;
        return sign_once(keys[static_cast<std::size_t>(mine)].get());
      });
      double sw = rate(t, seconds, [&] { return sign_once(soft->get()); });
      std::string what = std::string("CA signature (") + hsm::to_string(kt) + ")";
      line(what.c_str(), t, tok, sw);
    }
  }
  std::printf(
      "reference (DESIGN.md, raw C_Sign on SoftHSM2): P-256 14.2k/s 1 thread, 18.7k/s 2;"
      " RSA-2048 1.7k/s 1 thread, 3.2k/s 2\n");
  return 0;
}

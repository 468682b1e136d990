// Disaster-recovery pre-decryption throughput (kmsd::dr::predecrypt) on a generated Maildir of
// S/MIME messages to RSA-2048 (key transport) and EC P-256 (key agreement) recipients, printed
// beside, from the same run:
//   (a) the bound set by the raw private-key operations: RSA-2048 PKCS#1 decryptions and P-256
//       ECDH derivations per second on the same threads, mixed in the store's proportion;
//   (b) a shell loop calling `openssl cms -decrypt` once per message, on a sample;
// and peak memory (getrusage ru_maxrss of a child process doing only the pre-decryption) at
// two store sizes, to show it does not grow with the store. The raw bound is measured before and
// after the predecrypt runs (the machine's load changes in between on a shared machine); the
// same ratio per CPU second (the child's user + system time against the raw operations' thread
// CPU time) does not depend on the load.
// What predecrypt does per message here is what `kmsctl dr predecrypt --keys` does: open it with
// the user's key and seal the content under the run's staging key (one AES key wrap; the KEK is
// encrypted to the RSA-3072 custody certificate once per run, keys/<run>.kek.der). With
// --per-message-custody it encrypts each message to the custody certificate instead (one
// RSA-3072 public-key operation per message: the layout before staging keys, and what the
// running-daemon key source still does), for a comparison in the same binary.
// Usage: dr_bench [--messages N] [--small N] [--threads T] [--sample S] [--users U]
//                 [--per-message-custody] (--help)
#include <openssl/cms.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>

#include "daemon/ca/issuer.hpp"
#include "daemon/dr/keyring.hpp"
#include "daemon/dr/message.hpp"
#include "daemon/dr/pipeline.hpp"

namespace {

namespace fs = std::filesystem;
using namespace kmsd;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::vector<std::uint8_t> serial() {
  std::vector<std::uint8_t> s(16);
  RAND_bytes(s.data(), 16);
  s[0] = static_cast<std::uint8_t>((s[0] & 0x7f) | 1);
  return s;
}

ossl::EvpPkeyPtr key_of(hsm::KeyType t) {
  auto k = ca::generate_key(t);
  if (!k.ok()) {
    std::fprintf(stderr, "dr_bench: key generation failed\n");
    std::exit(1);
  }
  return std::move(*k);
}

struct Ca {
  ossl::EvpPkeyPtr key = key_of(hsm::KeyType::kEcP256);
  ossl::X509Ptr cert;
  Ca() {
    auto name = ca::parse_subject("/O=Bench/CN=Old KMS CA");
    ca::IssueRequest r;
    r.profile = ca::Profile::kCa;
    r.subject = name->get();
    r.public_key = key.get();
    r.validity = std::chrono::hours(24);
    r.serial = serial();
    auto c = ca::issue(r, nullptr, key.get(), EVP_sha256());
    if (!c.ok()) std::exit(1);
    cert = std::move(*c);
  }
  ossl::X509Ptr issue(EVP_PKEY* k, const std::string& cn) {
    auto name = ca::parse_subject("/O=Bench/CN=" + cn);
    ca::IssueRequest r;
    r.profile = ca::Profile::kUser;
    r.subject = name->get();
    r.public_key = k;
    r.validity = std::chrono::hours(24);
    r.serial = serial();
    r.key_usage = {EVP_PKEY_base_id(k) == EVP_PKEY_EC ? "keyAgreement" : "keyEncipherment"};
    auto c = ca::issue(r, cert.get(), key.get(), EVP_sha256());
    if (!c.ok()) std::exit(1);
    return std::move(*c);
  }
};

struct Recipient {
  std::string user;
  ossl::EvpPkeyPtr key;
  ossl::X509Ptr cert;
  fs::path key_pem, cert_pem;
};

void write_file(const fs::path& p, std::string_view data) {
  std::ofstream(p, std::ios::binary) << data;
}

// N messages in ROOT/cur, message i to recipient i % R (alternating RSA and EC), 1 KiB content.
void generate(const fs::path& root, std::size_t n, const std::vector<Recipient>& to,
              unsigned threads) {
  fs::create_directories(root / "cur");
  fs::create_directories(root / "new");
  fs::create_directories(root / "tmp");
  std::atomic<std::size_t> next{0};
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&] {
      std::string body(1024, 'x');
      for (std::size_t i; (i = next++) < n;) {
        const auto& r = to[i % to.size()];
        std::string content =
            "Content-Type: text/plain\r\n\r\nmessage " + std::to_string(i) + " " + body + "\r\n";
        ossl::BioPtr in(BIO_new_mem_buf(content.data(), static_cast<int>(content.size())));
        ossl::X509StackPtr certs(sk_X509_new_null());
        X509_up_ref(r.cert.get());
        sk_X509_push(certs.get(), r.cert.get());
        dr::CmsPtr cms(CMS_encrypt(certs.get(), in.get(), EVP_aes_256_cbc(), CMS_BINARY));
        ossl::BioPtr out(BIO_new(BIO_s_mem()));
        SMIME_write_CMS(out.get(), cms.get(), nullptr, 0);
        char* p = nullptr;
        const long len = BIO_get_mem_data(out.get(), &p);
        write_file(root / "cur" / (std::to_string(i) + ".bench:2,S"),
                   "From: bench@example.org\nTo: " + r.user + "@example.org\nSubject: m" +
                       std::to_string(i) + "\n" + std::string(p, static_cast<std::size_t>(len)));
      }
    });
  }
  for (auto& t : pool) t.join();
}

// The calling thread's CPU time, seconds.
double thread_cpu_seconds() {
  timespec ts{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) / 1e9;
}

struct RawRate {
  double per_second = 0;      // operations per wall-clock second, all threads together
  double per_cpu_second = 0;  // operations per second of CPU the threads got
};

// Private-key operations, all threads together, for ~SECONDS. The CPU rate does not depend on
// how much of the machine other processes take; the wall-clock rate does.
RawRate raw_rate(EVP_PKEY* key, unsigned threads, double seconds) {
  const bool ec = EVP_PKEY_base_id(key) == EVP_PKEY_EC;
  std::atomic<std::size_t> ops{0};
  std::atomic<std::int64_t> cpu_us{0};
  std::vector<std::thread> pool;
  const auto t0 = Clock::now();
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&] {
      const double cpu0 = thread_cpu_seconds();
      std::size_t mine = 0;
      if (ec) {
        // What key agreement costs the recipient: one ECDH derivation with its private key.
        auto peer = key_of(hsm::KeyType::kEcP256);
        while (seconds_since(t0) < seconds) {
          for (int k = 0; k < 16; ++k) {
            ossl::EvpPkeyCtxPtr ctx(EVP_PKEY_CTX_new(key, nullptr));
            EVP_PKEY_derive_init(ctx.get());
            EVP_PKEY_derive_set_peer(ctx.get(), peer.get());
            unsigned char secret[66];
            std::size_t len = sizeof secret;
            EVP_PKEY_derive(ctx.get(), secret, &len);
            ++mine;
          }
        }
      } else {
        // Key transport: one RSA PKCS#1 v1.5 decryption of a 32-byte content-encryption key.
        unsigned char cek[32], wrapped[512], out[512];
        RAND_bytes(cek, sizeof cek);
        std::size_t wlen = sizeof wrapped;
        ossl::EvpPkeyCtxPtr enc(EVP_PKEY_CTX_new(key, nullptr));
        EVP_PKEY_encrypt_init(enc.get());
        EVP_PKEY_encrypt(enc.get(), wrapped, &wlen, cek, sizeof cek);
        while (seconds_since(t0) < seconds) {
          for (int k = 0; k < 16; ++k) {
            ossl::EvpPkeyCtxPtr ctx(EVP_PKEY_CTX_new(key, nullptr));
            EVP_PKEY_decrypt_init(ctx.get());
            std::size_t olen = sizeof out;
            EVP_PKEY_decrypt(ctx.get(), out, &olen, wrapped, wlen);
            ++mine;
          }
        }
      }
      ops += mine;
      cpu_us += static_cast<std::int64_t>((thread_cpu_seconds() - cpu0) * 1e6);
    });
  }
  for (auto& t : pool) t.join();
  RawRate r;
  r.per_second = static_cast<double>(ops) / seconds_since(t0);
  r.per_cpu_second = static_cast<double>(ops) / (static_cast<double>(cpu_us) / 1e6);
  return r;
}

// Messages per second of a 50/50 RSA / EC store if only the private-key operations counted.
double mixed(double rsa, double ecdh) {
  return 1.0 / (0.5 / rsa + 0.5 / ecdh);
}

struct ChildRun {
  double rate = 0;
  std::size_t processed = 0;
  double seconds = 0;
  long maxrss_kib = 0;
  long hwm_kib = 0;        // VmHWM of the child, read by itself after the run
  double cpu_seconds = 0;  // user + system CPU of the child (all its threads)
  bool ok = false;
};

// The process's peak resident set (VmHWM), KiB.
long vm_hwm_kib() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::strtol(line.c_str() + 6, nullptr, 10);
  return 0;
}

// predecrypt STORE in a child process; its rate and its peak resident memory.
ChildRun predecrypt_in_child(const fs::path& store, const fs::path& staging,
                             const dr::KeyRing& ring, X509* custody, unsigned threads,
                             bool per_message_custody) {
  int fds[2];
  if (::pipe(fds) != 0) std::exit(1);
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(fds[0]);
    dr::PredecryptOptions o;
    o.store = store;
    o.staging = staging;
    o.keys = &ring;
    o.custody_cert = custody;
    o.threads = threads;
    o.per_message_custody = per_message_custody;
    auto s = dr::predecrypt(o);
    double out[3] = {0, 0, static_cast<double>(vm_hwm_kib())};
    if (s.ok() && s->this_run.count(dr::kStaged) != 0 &&
        s->this_run.at(dr::kStaged) == s->processed) {
      out[0] = static_cast<double>(s->processed);
      out[1] = s->seconds;
    } else if (!s.ok()) {
      std::fprintf(stderr, "dr_bench: predecrypt: %s\n", s.error().message.c_str());
    } else {
      std::fprintf(stderr, "dr_bench: not every message was staged\n");
    }
    (void)!::write(fds[1], out, sizeof out);
    ::_exit(out[0] > 0 ? 0 : 1);
  }
  ::close(fds[1]);
  double in[3] = {0, 0, 0};
  (void)!::read(fds[0], in, sizeof in);
  ::close(fds[0]);
  int status = 0;
  struct rusage ru {};
  ::wait4(pid, &status, 0, &ru);
  ChildRun r;
  r.ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
  r.processed = static_cast<std::size_t>(in[0]);
  r.seconds = in[1];
  r.rate = in[1] > 0 ? in[0] / in[1] : 0;
  r.maxrss_kib = ru.ru_maxrss;
  r.cpu_seconds = static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
                  static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
  r.hwm_kib = static_cast<long>(in[2]);
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  std::size_t messages = 50000, small = 5000, sample = 40, users = 8;
  unsigned threads = std::max(1u, std::thread::hardware_concurrency());
  bool per_message_custody = false;
  CLI::App app{"kmsd disaster-recovery pre-decryption benchmark"};
  app.add_option("--messages", messages, "messages in the large store")
      ->check(CLI::Range(std::size_t{1}, std::size_t{10000000}))
      ->capture_default_str();
  app.add_option("--small", small, "messages in the small store (the memory comparison)")
      ->check(CLI::Range(std::size_t{1}, std::size_t{10000000}))
      ->capture_default_str();
  app.add_option("--threads", threads, "worker threads")
      ->check(CLI::Range(1u, 1024u))
      ->capture_default_str();
  app.add_option("--sample", sample, "messages for the openssl cms -decrypt shell loop")
      ->capture_default_str();
  app.add_option("--users", users, "recipients (alternating RSA-2048 and P-256)")
      ->check(CLI::Range(std::size_t{2}, std::size_t{10000}))
      ->capture_default_str();
  app.add_flag("--per-message-custody", per_message_custody,
               "encrypt every staged message to the custody certificate (the layout before "
               "staging keys) instead of sealing it under the run's staging key");
  CLI11_PARSE(app, argc, argv);
  std::string t = (fs::temp_directory_path() / "kmsd-dr-bench-XXXXXX").string();
  if (::mkdtemp(t.data()) == nullptr) return 1;
  const fs::path dir = t;
  struct Cleanup {
    fs::path d;
    ~Cleanup() {
      std::error_code ec;
      fs::remove_all(d, ec);
    }
  } cleanup{dir};

  Ca old_ca;
  std::vector<Recipient> to;
  dr::KeyRing ring;
  for (std::size_t u = 0; u < users; ++u) {
    Recipient r;
    r.user = "user" + std::to_string(u);
    r.key = key_of(u % 2 == 0 ? hsm::KeyType::kRsa2048 : hsm::KeyType::kEcP256);
    r.cert = old_ca.issue(r.key.get(), r.user);
    r.key_pem = dir / (r.user + ".key");
    r.cert_pem = dir / (r.user + ".pem");
    write_file(r.key_pem, std::string(ossl::privkey_to_pem(r.key.get())->view()));
    write_file(r.cert_pem, *ossl::x509_to_pem(r.cert.get()));
    std::vector<dr::KeyPair> pairs;
    EVP_PKEY_up_ref(r.key.get());
    X509_up_ref(r.cert.get());
    pairs.push_back({ossl::EvpPkeyPtr(r.key.get()), ossl::X509Ptr(r.cert.get()), r.user});
    ring.add(r.user, std::move(pairs));
    to.push_back(std::move(r));
  }
  auto custody_key = key_of(hsm::KeyType::kRsa3072);
  auto custody = old_ca.issue(custody_key.get(), "DR custody");

  auto t0 = Clock::now();
  generate(dir / "small", small, to, threads);
  generate(dir / "large", messages, to, threads);
  std::printf("generated %zu + %zu messages (half RSA-2048, half P-256 recipients) in %.1f s\n",
              small, messages, seconds_since(t0));

  // (a) the raw private-key bound, same threads, same run: measured before and after the
  // predecrypt runs (on a shared machine the load changes), the mean is the bound.
  const RawRate rsa1 = raw_rate(to[0].key.get(), threads, 2.0);
  const RawRate ecdh1 = raw_rate(to[1].key.get(), threads, 2.0);

  // predecrypt: the small store, then the large one, each in its own process
  auto s = predecrypt_in_child(dir / "small", dir / "staging-small", ring, custody.get(), threads,
                               per_message_custody);
  auto l = predecrypt_in_child(dir / "large", dir / "staging-large", ring, custody.get(), threads,
                               per_message_custody);
  if (!s.ok || !l.ok) {
    std::fprintf(stderr, "dr_bench: a predecrypt run failed\n");
    return 1;
  }
  const RawRate rsa2 = raw_rate(to[0].key.get(), threads, 2.0);
  const RawRate ecdh2 = raw_rate(to[1].key.get(), threads, 2.0);
  const double rsa = (rsa1.per_second + rsa2.per_second) / 2;
  const double ecdh = (ecdh1.per_second + ecdh2.per_second) / 2;
  const double bound = mixed(rsa, ecdh);
  const double bound_before = mixed(rsa1.per_second, ecdh1.per_second);
  const double bound_after = mixed(rsa2.per_second, ecdh2.per_second);
  const double cpu_bound = mixed((rsa1.per_cpu_second + rsa2.per_cpu_second) / 2,
                                 (ecdh1.per_cpu_second + ecdh2.per_cpu_second) / 2);
  const double cpu_rate = l.cpu_seconds > 0 ? static_cast<double>(l.processed) / l.cpu_seconds : 0;

  // (b) the shell loop on a sample of the large store
  t0 = Clock::now();
  std::size_t done = 0;
  for (std::size_t i = 0; i < sample && i < messages; ++i) {
    const auto& r = to[i % to.size()];
    const std::string cmd = "openssl cms -decrypt -binary -in '" +
                            (dir / "large" / "cur" / (std::to_string(i) + ".bench:2,S")).string() +
                            "' -recip '" + r.cert_pem.string() + "' -inkey '" + r.key_pem.string() +
                            "' -out /dev/null";
    if (std::system(cmd.c_str()) == 0) ++done;
  }
  const double shell = static_cast<double>(done) / seconds_since(t0);

  std::size_t kek_files = 0;
  std::error_code ec;
  if (fs::is_directory(dir / "staging-large" / "keys", ec))
    for (const auto& e : fs::directory_iterator(dir / "staging-large" / "keys", ec))
      kek_files += e.is_regular_file() ? 1 : 0;
  std::printf("threads: %u\n", threads);
  if (per_message_custody)
    std::printf(
        "staged records: each encrypted to the RSA-3072 custody certificate "
        "(--per-message-custody: one RSA-3072 public-key operation per message)\n");
  else
    std::printf(
        "staged records: sealed under the run's staging key (one AES key wrap per message; "
        "%zu KEK file(s) in keys/, encrypted to the RSA-3072 custody certificate)\n",
        kek_files);
  std::printf(
      "raw private-key ops: RSA-2048 decrypt %.0f/s, P-256 ECDH %.0f/s -> bound %.0f msg/s "
      "for a 50/50 store (%.0f before the predecrypt runs, %.0f after)\n",
      rsa, ecdh, bound, bound_before, bound_after);
  std::printf("predecrypt %zu messages: %.2f s = %.0f msg/s = %.0f%% of the raw bound\n",
              l.processed, l.seconds, l.rate, 100.0 * l.rate / bound);
  std::printf(
      "per CPU second (load-independent): predecrypt %.0f msg/s, raw bound %.0f msg/s = %.0f%%; "
      "predecrypt used %.2f of %u cores\n",
      cpu_rate, cpu_bound, cpu_bound > 0 ? 100.0 * cpu_rate / cpu_bound : 0.0,
      l.seconds > 0 ? l.cpu_seconds / l.seconds : 0.0, threads);
  std::printf(
      "openssl cms -decrypt shell loop: %.1f msg/s (%zu of %zu sampled) -> predecrypt is "
      "%.0fx\n",
      shell, done, sample, shell > 0 ? l.rate / shell : 0.0);
  std::printf(
      "peak memory of the predecrypt process (ru_maxrss / VmHWM): %zu messages %.1f / %.1f MiB, "
      "%zu messages %.1f / %.1f MiB\n",
      s.processed, s.maxrss_kib / 1024.0, s.hwm_kib / 1024.0, l.processed, l.maxrss_kib / 1024.0,
      l.hwm_kib / 1024.0);
  std::printf("small store: %.0f msg/s\n", s.rate);
  return 0;
}

#include "common/secret.hpp"

#include <openssl/crypto.h>

#include <algorithm>
#include <bit>
#include <mutex>
#include <new>

namespace kmsd {

namespace {
std::mutex heap_mu;
SecureHeapState heap_state;
}  // namespace

SecureHeapState init_secure_heap(std::size_t bytes) {
  std::lock_guard lock(heap_mu);
  if (heap_state.ready) return heap_state;
  const std::size_t size = std::bit_ceil(std::max<std::size_t>(bytes, 64 * 1024));
  // minsize 16: the smallest block (an enrollment token takes one).
  const int r = CRYPTO_secure_malloc_init(size, 16);
  heap_state.bytes = size;
  if (r == 0) {
    heap_state.detail = "OpenSSL could not create a secure heap of " + std::to_string(size) +
                        " bytes (mmap failed); secrets stay on the ordinary heap, wiped on release "
                        "but not locked in RAM";
    return heap_state;
  }
  heap_state.ready = true;
  heap_state.locked = r == 1;
  if (r == 2)
    heap_state.detail = "the secure heap of " + std::to_string(size) +
                        " bytes could not be locked in RAM or excluded from core dumps "
                        "(mlock/madvise refused; RLIMIT_MEMLOCK is probably below it: raise "
                        "LimitMEMLOCK= in the unit or `ulimit -l`); secrets may be swapped out";
  return heap_state;
}

std::size_t secure_heap_used() noexcept {
  return CRYPTO_secure_malloc_initialized() ? CRYPTO_secure_used() : 0;
}

void* secret_allocate(std::size_t n) {
  if (n == 0) n = 1;
  if (CRYPTO_secure_malloc_initialized()) {
    // No file/line: a full arena is not an error worth OpenSSL's error queue.
    if (void* p = CRYPTO_secure_malloc(n, nullptr, 0)) return p;
  }
  void* p = CRYPTO_malloc(n, nullptr, 0);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}

void secret_release(void* p, std::size_t n) noexcept {
  // Wipes, and frees into the secure heap or the ordinary heap as P came from.
  if (p != nullptr) CRYPTO_secure_clear_free(p, n == 0 ? 1 : n, nullptr, 0);
}

bool in_secure_heap(const void* p) noexcept {
  return p != nullptr && CRYPTO_secure_malloc_initialized() && CRYPTO_secure_allocated(p);
}

void secure_wipe(void* p, std::size_t n) noexcept {
  if (p != nullptr && n != 0) OPENSSL_cleanse(p, n);
}

bool constant_time_equal(std::span<const std::uint8_t> a,
                         std::span<const std::uint8_t> b) noexcept {
  // Length is not secret here (tokens have a fixed format); contents are.
  if (a.size() != b.size()) return false;
  return CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

}  // namespace kmsd

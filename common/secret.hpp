// Wiping containers for secrets (PINs, tokens, data keys, private keys, plaintext).
// They cleanse their memory on destruction and on every reallocation, and have no
// operator<< so a secret cannot end up in a log line by accident.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace kmsd {

// Where secrets live. After init_secure_heap() (the daemon, once, at start) the wiping
// containers below take their memory from OpenSSL's secure heap: one mmap'ed arena, locked
// in RAM (mlock: never swapped), excluded from core dumps (MADV_DONTDUMP), between guard
// pages. OpenSSL's own secret allocations (private-key BIGNUMs, BIO_s_secmem) share it.
// Before that, or when the arena is full, they use the ordinary heap (still wiped on release).
struct SecureHeapState {
  bool ready = false;   // the arena exists
  bool locked = false;  // and mlock/madvise succeeded on it
  std::size_t bytes = 0;
  std::string detail;  // what happened, for the log ("" when locked)
};
// BYTES is rounded up to a power of two. Idempotent: a second call reports the first arena.
// An arena that cannot be locked (RLIMIT_MEMLOCK too low, e.g. `ulimit -l` 64 KiB in a
// container) is still used, unlocked; DETAIL says so and how to raise the limit.
SecureHeapState init_secure_heap(std::size_t bytes);
// Bytes of the arena in use now (0 without one).
std::size_t secure_heap_used() noexcept;
// Memory for secrets: from the secure heap when there is one with room, else the heap.
void* secret_allocate(std::size_t n);
// Wipes N bytes at P and gives them back to whichever heap they came from.
void secret_release(void* p, std::size_t n) noexcept;
// True when P lies in the secure heap (tests, metrics).
bool in_secure_heap(const void* p) noexcept;

// Allocator that cleanses memory before giving it back (see secret_allocate).
template <typename T>
struct WipingAllocator {
  using value_type = T;
  WipingAllocator() noexcept = default;
  template <typename U>
  WipingAllocator(const WipingAllocator<U>&) noexcept {}  // NOLINT(implicit)
  T* allocate(std::size_t n) { return static_cast<T*>(secret_allocate(n * sizeof(T))); }
  void deallocate(T* p, std::size_t n) noexcept;
  template <typename U>
  bool operator==(const WipingAllocator<U>&) const noexcept {
    return true;
  }
};

void secure_wipe(void* p, std::size_t n) noexcept;

template <typename T>
void WipingAllocator<T>::deallocate(T* p, std::size_t n) noexcept {
  secret_release(p, n * sizeof(T));
}

// Bytes that are secret. Move-only so copies do not multiply in memory.
class SecretBytes {
 public:
  SecretBytes() = default;
  explicit SecretBytes(std::size_t n) : b_(n) {}
  SecretBytes(const std::uint8_t* p, std::size_t n) : b_(p, p + n) {}
  explicit SecretBytes(std::span<const std::uint8_t> s) : b_(s.begin(), s.end()) {}
  static SecretBytes from_string(std::string_view s) {
    return SecretBytes(reinterpret_cast<const std::uint8_t*>(s.data()), s.size());
  }
  SecretBytes(SecretBytes&&) noexcept = default;
  SecretBytes& operator=(SecretBytes&&) noexcept = default;
  SecretBytes(const SecretBytes&) = delete;
  SecretBytes& operator=(const SecretBytes&) = delete;
  SecretBytes clone() const { return SecretBytes(data(), size()); }

  std::uint8_t* data() noexcept { return b_.data(); }
  const std::uint8_t* data() const noexcept { return b_.data(); }
  std::size_t size() const noexcept { return b_.size(); }
  bool empty() const noexcept { return b_.empty(); }
  void resize(std::size_t n) { b_.resize(n); }
  void clear() noexcept { b_.clear(); }
  void append(std::span<const std::uint8_t> s) { b_.insert(b_.end(), s.begin(), s.end()); }
  std::span<const std::uint8_t> span() const noexcept { return {b_.data(), b_.size()}; }
  // View as characters, e.g. to pass a PIN to a C API. Never log the result.
  std::string_view view() const noexcept {
    return {reinterpret_cast<const char*>(b_.data()), b_.size()};
  }

 private:
  std::vector<std::uint8_t, WipingAllocator<std::uint8_t>> b_;
};

// Constant-time equality for secrets of possibly different lengths.
bool constant_time_equal(std::span<const std::uint8_t> a, std::span<const std::uint8_t> b) noexcept;

}  // namespace kmsd

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

// Allocator that cleanses memory before giving it back.
template <typename T>
struct WipingAllocator {
  using value_type = T;
  WipingAllocator() noexcept = default;
  template <typename U>
  WipingAllocator(const WipingAllocator<U>&) noexcept {}  // NOLINT(implicit)
  T* allocate(std::size_t n) { return std::allocator<T>{}.allocate(n); }
  void deallocate(T* p, std::size_t n) noexcept;
  template <typename U>
  bool operator==(const WipingAllocator<U>&) const noexcept {
    return true;
  }
};

void secure_wipe(void* p, std::size_t n) noexcept;

template <typename T>
void WipingAllocator<T>::deallocate(T* p, std::size_t n) noexcept {
  secure_wipe(p, n * sizeof(T));
  std::allocator<T>{}.deallocate(p, n);
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

// Result and error types shared by every module: errors cross module borders as
// values that say what happened and what an administrator can do about it.
#pragma once

#include <cassert>
#include <optional>
#include <string>
#include <utility>
#include <variant>

namespace kmsd {

// What kind of failure this is; callers branch on the kind, people read the message.
enum class ErrorCode {
  kInvalidArgument,     // caller passed something malformed; nothing changed
  kNotFound,            // the thing asked for does not exist
  kAlreadyExists,       // refusing to overwrite
  kPermissionDenied,    // authenticated but not allowed, or a file mode is unsafe
  kUnauthenticated,     // wrong PIN / secret / credentials
  kFailedPrecondition,  // state does not allow this (sealed, not initialized, ...)
  kUnavailable,         // token or dependency temporarily gone; retrying later may work
  kPinLocked,           // the token refuses the PIN for good until an SO resets it
  kConfig,              // configuration is invalid
  kIo,                  // file system or socket failure
  kCrypto,              // OpenSSL or token cryptographic failure (tampered data, bad key)
  kStore,               // database failure
  kInternal,            // a bug: should not happen
};

const char* to_string(ErrorCode code) noexcept;

struct Error {
  ErrorCode code = ErrorCode::kInternal;
  std::string message;

  // Prefix context: err.context("loading CA certificate") -> "loading CA certificate: <msg>".
  Error context(std::string_view what) const {
    return Error{code, std::string(what) + ": " + message};
  }
};

inline Error make_error(ErrorCode code, std::string message) {
  return Error{code, std::move(message)};
}

// A value or an Error. Minimal stand-in for C++23 std::expected.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::in_place_index<0>, std::move(value)) {}      // NOLINT(implicit)
  Result(Error error) : v_(std::in_place_index<1>, std::move(error)) {}  // NOLINT(implicit)

  bool ok() const noexcept { return v_.index() == 0; }
  explicit operator bool() const noexcept { return ok(); }

  T& value() & {
    assert(ok());
    return std::get<0>(v_);
  }
  const T& value() const& {
    assert(ok());
    return std::get<0>(v_);
  }
  T&& value() && {
    assert(ok());
    return std::get<0>(std::move(v_));
  }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

  const Error& error() const& {
    assert(!ok());
    return std::get<1>(v_);
  }
  Error&& error() && {
    assert(!ok());
    return std::get<1>(std::move(v_));
  }

 private:
  std::variant<T, Error> v_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(Error error) : error_(std::move(error)) {}  // NOLINT(implicit)

  bool ok() const noexcept { return !error_.has_value(); }
  explicit operator bool() const noexcept { return ok(); }
  const Error& error() const& {
    assert(!ok());
    return *error_;
  }
  Error&& error() && {
    assert(!ok());
    return std::move(*error_);
  }

 private:
  std::optional<Error> error_;
};

using Status = Result<void>;

}  // namespace kmsd

// Propagate an error out of the current function returning a Result.
#define KMSD_TRY(expr)                                 \
  do {                                                 \
    auto kmsd_try_r_ = (expr);                         \
    if (!kmsd_try_r_.ok()) return kmsd_try_r_.error(); \
  } while (0)

#define KMSD_CONCAT_INNER_(a, b) a##b
#define KMSD_CONCAT_(a, b) KMSD_CONCAT_INNER_(a, b)
// KMSD_ASSIGN_OR_RETURN(auto x, f()); binds the value or returns the error. It expands to
// several statements: use it only at block scope, never as the body of an unbraced if.
#define KMSD_ASSIGN_OR_RETURN(lhs, expr)                       \
  auto KMSD_CONCAT_(kmsd_r_, __LINE__) = (expr);               \
  if (!KMSD_CONCAT_(kmsd_r_, __LINE__).ok())                   \
    return std::move(KMSD_CONCAT_(kmsd_r_, __LINE__)).error(); \
  lhs = std::move(KMSD_CONCAT_(kmsd_r_, __LINE__)).value()

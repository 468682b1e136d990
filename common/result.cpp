#include "common/result.hpp"

namespace kmsd {

const char* to_string(ErrorCode code) noexcept {
  switch (code) {
    case ErrorCode::kInvalidArgument:
      return "invalid argument";
    case ErrorCode::kNotFound:
      return "not found";
    case ErrorCode::kAlreadyExists:
      return "already exists";
    case ErrorCode::kPermissionDenied:
      return "permission denied";
    case ErrorCode::kUnauthenticated:
      return "unauthenticated";
    case ErrorCode::kFailedPrecondition:
      return "failed precondition";
    case ErrorCode::kUnavailable:
      return "unavailable";
    case ErrorCode::kPinLocked:
      return "PIN locked";
    case ErrorCode::kConfig:
      return "configuration error";
    case ErrorCode::kIo:
      return "I/O error";
    case ErrorCode::kCrypto:
      return "cryptographic error";
    case ErrorCode::kStore:
      return "store error";
    case ErrorCode::kInternal:
      return "internal error";
  }
  return "unknown error";
}

}  // namespace kmsd

// CMP messages (RFC 4210, one DER PKIMessage per HTTP POST to /cmp) into the real CMP server
// over an initialized, unsealed KMS on a SoftHSM token, with an enabled user ("fuzz-user")
// whose enrollment token is pending. Whatever the bytes, handle() must answer without crashing.
#include <openssl/cmp.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>

#include "tests/fuzz/fuzz_kms.hpp"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  kmsd::fuzz::kms();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  auto& k = kmsd::fuzz::kms();
  auto reply = k.cmp->handle(std::span<const std::uint8_t>(data, size));
  if (reply.http_status == 200 && reply.body.empty()) __builtin_trap();  // 200 is a CMP message
  static const bool trace = std::getenv("KMSD_FUZZ_TRACE") != nullptr;
  if (trace) {
    const unsigned char* p = reply.body.data();
    OSSL_CMP_MSG* m = d2i_OSSL_CMP_MSG(nullptr, &p, static_cast<long>(reply.body.size()));
    std::fprintf(stderr, "  -> %d body type %d\n", reply.http_status,
                 m != nullptr ? OSSL_CMP_MSG_get_bodytype(m) : -1);
    OSSL_CMP_MSG_free(m);
  }
  k.renew_user_token();  // an enrollment that went through spent the token
  return 0;
}

// S/MIME and CMS input to the disaster-recovery reader (daemon/dr/message): any bytes as a
// Maildir/.eml message (MIME) and as a .p7m/.der file (DER). A message encrypted to one of the
// fuzz recipients (tests/fuzz/data: an RSA and an EC key, test material only) is decrypted,
// re-encrypted and written back as `kmsctl dr reencrypt` does; the result must read back as an
// encrypted message for that recipient.
#include <openssl/pem.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <string>
#include <vector>

#include "common/ossl.hpp"
#include "daemon/dr/message.hpp"

#ifndef KMSD_FUZZ_DATA_DIR
#error "KMSD_FUZZ_DATA_DIR must name tests/fuzz/data"
#endif

namespace {

struct Recipient {
  kmsd::ossl::X509Ptr cert;
  kmsd::ossl::EvpPkeyPtr key;
  std::vector<std::string> ids;
};

Recipient load(const char* name) {
  const std::string base = std::string(KMSD_FUZZ_DATA_DIR) + "/" + name;
  Recipient r;
  FILE* c = std::fopen((base + ".crt").c_str(), "r");
  FILE* k = std::fopen((base + ".key").c_str(), "r");
  if (c != nullptr) r.cert.reset(PEM_read_X509(c, nullptr, nullptr, nullptr));
  if (k != nullptr) r.key.reset(PEM_read_PrivateKey(k, nullptr, nullptr, nullptr));
  if (c != nullptr) std::fclose(c);
  if (k != nullptr) std::fclose(k);
  if (!r.cert || !r.key) {
    std::fprintf(stderr, "fuzz setup: cannot read %s.crt/.key\n", base.c_str());
    std::abort();
  }
  r.ids = kmsd::dr::recipient_ids_of_cert(r.cert.get());
  return r;
}

std::vector<Recipient>& recipients() {
  static std::vector<Recipient> all = [] {
    std::vector<Recipient> v;
    v.push_back(load("dr-recipient"));
    v.push_back(load("dr-recipient-ec"));
    return v;
  }();
  return all;
}

void reencrypt(kmsd::dr::ParsedMessage& m, kmsd::dr::Format format) {
  for (auto& r : recipients()) {
    const bool named = std::any_of(m.recipients.begin(), m.recipients.end(), [&](const auto& id) {
      return std::find(r.ids.begin(), r.ids.end(), id) != r.ids.end();
    });
    if (!named) continue;
    auto plain = kmsd::dr::decrypt(m.cms.get(), r.key.get(), r.cert.get());
    kmsd::ossl::drain_errors();
    if (!plain.ok()) continue;
    auto again = kmsd::dr::encrypt(plain->get(), {r.cert.get()});
    if (!again.ok()) __builtin_trap();  // a fresh EnvelopedData to a good certificate
    auto text = kmsd::dr::encode(again->get(), format, m.headers, m.crlf);
    if (!text.ok()) __builtin_trap();
    auto back = kmsd::dr::parse_message(
        std::span(reinterpret_cast<const std::uint8_t*>(text->data()), text->size()), format);
    if (back.kind != kmsd::dr::Kind::kEncrypted ||
        std::find(back.recipients.begin(), back.recipients.end(), r.ids.front()) ==
            back.recipients.end())
      __builtin_trap();  // what reencrypt writes must read back as encrypted to the recipient
    return;
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  recipients();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::uint8_t> bytes(data, size);
  for (auto format : {kmsd::dr::Format::kMime, kmsd::dr::Format::kDer}) {
    auto m = kmsd::dr::parse_message(bytes, format);
    kmsd::ossl::drain_errors();
    if (m.kind == kmsd::dr::Kind::kEncrypted) {
      if (!m.cms) __builtin_trap();
      reencrypt(m, format);
    } else if (m.what.empty()) {
      __builtin_trap();  // not encrypted or damaged: the sentence says what was found
    }
  }
  return 0;
}

#include "daemon/dr/keyring.hpp"

#include <openssl/err.h>
#include <openssl/pkcs12.h>

#include <algorithm>
#include <set>

#include "common/files.hpp"
#include "daemon/dr/message.hpp"

namespace kmsd::dr {

namespace fs = std::filesystem;

namespace {

struct Pkcs7StackFree {
  void operator()(STACK_OF(PKCS7) * s) const noexcept { sk_PKCS7_pop_free(s, PKCS7_free); }
};
struct BagStackFree {
  void operator()(STACK_OF(PKCS12_SAFEBAG) * s) const noexcept {
    sk_PKCS12_SAFEBAG_pop_free(s, PKCS12_SAFEBAG_free);
  }
};
using P8Ptr = std::unique_ptr<PKCS8_PRIV_KEY_INFO, ossl::Deleter<PKCS8_PRIV_KEY_INFO_free>>;

struct Collected {
  std::vector<std::pair<ossl::EvpPkeyPtr, std::string>> keys;
  std::vector<ossl::X509Ptr> certs;
};

std::string friendly_name(const PKCS12_SAFEBAG* bag) {
  char* n = PKCS12_get_friendlyname(const_cast<PKCS12_SAFEBAG*>(bag));
  if (n == nullptr) return {};
  std::string s(n);
  OPENSSL_free(n);
  return s;
}

Status collect(const STACK_OF(PKCS12_SAFEBAG) * bags, const char* pass, Collected& out) {
  for (int i = 0; i < sk_PKCS12_SAFEBAG_num(bags); ++i) {
    const PKCS12_SAFEBAG* bag = sk_PKCS12_SAFEBAG_value(bags, i);
    switch (PKCS12_SAFEBAG_get_nid(bag)) {
      case NID_keyBag: {
        ossl::EvpPkeyPtr key(EVP_PKCS82PKEY(PKCS12_SAFEBAG_get0_p8inf(bag)));
        if (!key) return ossl::crypto_error("reading a key of the PKCS#12 file");
        out.keys.emplace_back(std::move(key), friendly_name(bag));
        break;
      }
      case NID_pkcs8ShroudedKeyBag: {
        P8Ptr p8(PKCS12_decrypt_skey(bag, pass, -1));
        if (!p8)
          return make_error(ErrorCode::kUnauthenticated,
                            "wrong passphrase (a key of the PKCS#12 file does not decrypt)");
        ossl::EvpPkeyPtr key(EVP_PKCS82PKEY(p8.get()));
        if (!key) return ossl::crypto_error("reading a key of the PKCS#12 file");
        out.keys.emplace_back(std::move(key), friendly_name(bag));
        break;
      }
      case NID_certBag: {
        if (PKCS12_SAFEBAG_get_bag_nid(bag) != NID_x509Certificate) break;
        ossl::X509Ptr cert(PKCS12_SAFEBAG_get1_cert(bag));
        if (!cert) return ossl::crypto_error("reading a certificate of the PKCS#12 file");
        out.certs.push_back(std::move(cert));
        break;
      }
      case NID_safeContentsBag:
        KMSD_TRY(collect(PKCS12_SAFEBAG_get0_safes(bag), pass, out));
        break;
      default:
        break;
    }
  }
  return {};
}

}  // namespace

Result<std::vector<KeyPair>> read_pkcs12_keys(std::span<const std::uint8_t> der,
                                              const SecretBytes& passphrase) {
  ERR_clear_error();
  const unsigned char* p = der.data();
  ossl::Pkcs12Ptr p12(d2i_PKCS12(nullptr, &p, static_cast<long>(der.size())));
  if (!p12) return ossl::crypto_error("not a PKCS#12 file");
  std::string pass(passphrase.view());
  struct Wipe {
    std::string& s;
    ~Wipe() { secure_wipe(s.data(), s.size()); }
  } wipe{pass};
  if (PKCS12_mac_present(p12.get()) && PKCS12_verify_mac(p12.get(), pass.c_str(), -1) != 1) {
    ERR_clear_error();
    return make_error(ErrorCode::kUnauthenticated, "wrong passphrase (the PKCS#12 MAC differs)");
  }
  std::unique_ptr<STACK_OF(PKCS7), Pkcs7StackFree> safes(PKCS12_unpack_authsafes(p12.get()));
  if (!safes) return ossl::crypto_error("reading the PKCS#12 contents");
  Collected got;
  for (int i = 0; i < sk_PKCS7_num(safes.get()); ++i) {
    PKCS7* p7 = sk_PKCS7_value(safes.get(), i);
    std::unique_ptr<STACK_OF(PKCS12_SAFEBAG), BagStackFree> bags;
    switch (OBJ_obj2nid(p7->type)) {
      case NID_pkcs7_data:
        bags.reset(PKCS12_unpack_p7data(p7));
        break;
      case NID_pkcs7_encrypted:
        bags.reset(PKCS12_unpack_p7encdata(p7, pass.c_str(), -1));
        if (!bags)
          return make_error(ErrorCode::kUnauthenticated,
                            "wrong passphrase (an encrypted part of the PKCS#12 file)");
        break;
      default:
        continue;
    }
    if (!bags) return ossl::crypto_error("reading a part of the PKCS#12 file");
    KMSD_TRY(collect(bags.get(), pass.c_str(), got));
  }
  std::vector<KeyPair> out;
  for (auto& [key, name] : got.keys) {
    for (auto& cert : got.certs) {
      if (!cert) continue;
      if (X509_check_private_key(cert.get(), key.get()) == 1) {
        out.push_back({std::move(key), std::move(cert), name});
        break;
      }
    }
    ERR_clear_error();
  }
  return out;
}

void KeyRing::add(const std::string& user, std::vector<KeyPair> pairs) {
  for (auto& pair : pairs) {
    auto entry = std::make_unique<Entry>(Entry{user, std::move(pair)});
    for (const auto& id : recipient_ids_of_cert(entry->pair.cert.get()))
      by_id_.emplace(id, entry.get());
    entries_.push_back(std::move(entry));
  }
}

const KeyRing::Entry* KeyRing::find(const std::string& recipient_id) const {
  auto it = by_id_.find(recipient_id);
  return it == by_id_.end() ? nullptr : it->second;
}

std::vector<std::string> KeyRing::users() const {
  std::set<std::string> names;
  for (const auto& e : entries_) names.insert(e->user);
  return {names.begin(), names.end()};
}

Result<KeyRing> load_key_dir(const KeyDirOptions& options) {
  std::error_code ec;
  if (!fs::is_directory(options.dir, ec))
    return make_error(ErrorCode::kInvalidArgument,
                      "--keys " + options.dir.string() + " is not a directory of PKCS#12 files");
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(options.dir, ec)) {
    const std::string ext = e.path().extension().string();
    if (e.is_regular_file() && (ext == ".p12" || ext == ".pfx")) files.push_back(e.path());
  }
  if (ec) return make_error(ErrorCode::kIo, "cannot list " + options.dir.string());
  std::sort(files.begin(), files.end());
  if (files.empty())
    return make_error(ErrorCode::kInvalidArgument,
                      "no PKCS#12 file (*.p12, *.pfx) in " + options.dir.string());
  KeyRing ring;
  for (const auto& file : files) {
    // alice.p12, alice.2019.p12: both alice's (users may bring one file per old key)
    const std::string name = file.filename().string();
    const std::string user = name.substr(0, name.find('.'));
    fs::path pass_file = file;
    pass_file.replace_extension(".pass");
    SecretBytes pass;
    if (fs::exists(pass_file)) {
      KMSD_ASSIGN_OR_RETURN(pass, files::read_secret_file(pass_file));
    } else if (options.default_passphrase != nullptr) {
      pass = options.default_passphrase->clone();
    } else if (options.ask) {
      KMSD_ASSIGN_OR_RETURN(pass, options.ask(file));
    } else {
      return make_error(ErrorCode::kInvalidArgument, "no passphrase for " + file.string() +
                                                         ": put it in " + pass_file.string() +
                                                         " (mode 0600) or give --passphrase-file");
    }
    KMSD_ASSIGN_OR_RETURN(auto text, files::read_text(file));
    auto pairs =
        read_pkcs12_keys({reinterpret_cast<const std::uint8_t*>(text.data()), text.size()}, pass);
    if (!pairs.ok()) return pairs.error().context("cannot open " + file.string());
    if (pairs->empty())
      return make_error(ErrorCode::kInvalidArgument,
                        file.string() + " holds no private key with its certificate");
    ring.add(user, std::move(*pairs));
  }
  return ring;
}

}  // namespace kmsd::dr

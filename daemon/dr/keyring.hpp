// Disaster recovery, key side: every old decryption key available to pre-decryption, indexed by
// the recipient identifiers a CMS message names (issuer and serial, subject key identifier),
// so that each message goes straight to its key — no trial decryption.
//
// Filled from users' PKCS#12 files (kmsd's enrollment and recovery files hold the user's whole
// key history; every key and certificate of a file is read, not only the first), or, inside
// kmsd, from the escrowed histories of a pre-decryption session (daemon/dr/daemon_source.hpp).
#pragma once

#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "common/ossl.hpp"
#include "common/result.hpp"
#include "common/secret.hpp"

namespace kmsd::dr {

// One private key with its certificate.
struct KeyPair {
  ossl::EvpPkeyPtr key;
  ossl::X509Ptr cert;
  std::string friendly_name;
};

// Every key of a PKCS#12 paired with the certificate that carries its public key (certificates
// without a key, such as the CA, are left out). kUnauthenticated for a wrong passphrase.
Result<std::vector<KeyPair>> read_pkcs12_keys(std::span<const std::uint8_t> der,
                                              const SecretBytes& passphrase);

// Thread-safety: filled by one thread, then read-only (find() from any number of threads).
class KeyRing {
 public:
  struct Entry {
    std::string user;
    KeyPair pair;
  };

  // Adds the keys of USER.
  void add(const std::string& user, std::vector<KeyPair> pairs);

  // The key for a recipient identifier (dr::recipient_ids_of_cert), or nullptr.
  const Entry* find(const std::string& recipient_id) const;

  std::size_t key_count() const { return entries_.size(); }
  std::vector<std::string> users() const;

 private:
  std::vector<std::unique_ptr<Entry>> entries_;
  std::map<std::string, const Entry*> by_id_;
};

// How the passphrase of a PKCS#12 file is found: PASS_FILE (0600) next to it, named like the
// file with ".pass" in place of ".p12"/".pfx", else DEFAULT_PASSPHRASE when given, else ASK.
struct KeyDirOptions {
  std::filesystem::path dir;
  const SecretBytes* default_passphrase = nullptr;
  std::function<Result<SecretBytes>(const std::filesystem::path& p12)> ask;
};

// Reads every *.p12 / *.pfx in DIR (not recursively); the user is the file name up to its first
// dot (alice.p12 and alice.2019.p12 are both alice's). A file that cannot be opened is an error
// naming it: better stop than pre-decrypt with half the keys and report their messages as unknown.
Result<KeyRing> load_key_dir(const KeyDirOptions& options);

}  // namespace kmsd::dr

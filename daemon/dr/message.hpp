// Disaster recovery, message side: finding the messages of a mail store (a Maildir, a tree of
// .eml files, a tree of .p7m/.der CMS files), telling encrypted ones from the rest, and reading
// and writing them in their own format with OpenSSL's CMS and S/MIME code.
//
// Plaintext only ever lives in cleansing memory BIOs (BIO_s_secmem) between decrypt() and
// encrypt(); nothing here writes it to a file.
#pragma once

#include <openssl/cms.h>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/ossl.hpp"
#include "common/result.hpp"

namespace kmsd::dr {

using CmsPtr = std::unique_ptr<CMS_ContentInfo, ossl::Deleter<CMS_ContentInfo_free>>;

// How a message is stored. MIME: a Maildir message or a .eml file (RFC 5322 headers around an
// S/MIME body). DER: a .p7m or .der file holding one CMS ContentInfo.
enum class Format { kMime, kDer };
const char* to_string(Format f) noexcept;  // "mime", "der"
Result<Format> parse_format(std::string_view s);

struct StoredMessage {
  std::filesystem::path relative;  // path under the store root
  Format format = Format::kMime;
};

// Every message under ROOT, sorted by path: files in cur/ and new/ of any Maildir folder (tmp/
// holds deliveries in progress and is skipped), *.eml, and *.p7m / *.der. Other files (index
// files, dotfiles of mail servers) are not messages. Symbolic links are not followed.
Result<std::vector<StoredMessage>> list_messages(const std::filesystem::path& root);

// The same messages as list_messages(), one at a time in directory order (not sorted), holding
// only the directory iterator's state: memory does not grow with the store.
// Thread-safety: none (one thread walks).
class MessageWalker {
 public:
  static Result<MessageWalker> open(const std::filesystem::path& root);
  // The next message, or nullopt at the end; an error when the walk cannot go on.
  Result<std::optional<StoredMessage>> next();

 private:
  MessageWalker() = default;
  std::filesystem::path root_;
  std::filesystem::recursive_directory_iterator it_;
  bool started_ = false;
};

enum class Kind {
  kEncrypted,     // EnvelopedData or AuthEnvelopedData
  kNotEncrypted,  // plain mail, or S/MIME signed only
  kDamaged,       // claims to be S/MIME or CMS but does not parse
};

// A message read and classified. For kMime, HEADERS are the message's own header lines other
// than the MIME ones (Content-*, MIME-Version), kept byte for byte so that a message written
// back carries its From/To/Subject/Date unchanged.
struct ParsedMessage {
  Kind kind = Kind::kNotEncrypted;
  std::string what;  // for kNotEncrypted / kDamaged: a sentence on what was found
  CmsPtr cms;        // kEncrypted only
  std::string headers;
  bool crlf = false;  // the original used CRLF line ends (kMime)
  // Recipient identifiers (recipient_id_of_cert() gives the same text for a certificate).
  std::vector<std::string> recipients;
};

ParsedMessage parse_message(std::span<const std::uint8_t> bytes, Format format);

// "isn:<issuer RFC 2253>#<serial hex>" and "ski:<hex>": the two ways a CMS RecipientInfo names
// the certificate whose key opens it (RFC 5652 RecipientIdentifier).
std::string issuer_serial_id(const X509_NAME* issuer, const ASN1_INTEGER* serial);
std::string ski_id(const ASN1_OCTET_STRING* ski);
// Both identifiers of CERT ("ski:" only when it has a subject key identifier).
std::vector<std::string> recipient_ids_of_cert(X509* cert);

// Decrypts CMS with KEY, whose certificate is CERT (no trial decryption: OpenSSL picks the
// RecipientInfo that names CERT). The content, byte for byte, in a cleansing memory BIO.
Result<ossl::BioPtr> decrypt(CMS_ContentInfo* cms, EVP_PKEY* key, X509* cert);

// EnvelopedData with AES-256-CBC to every certificate in TO (key transport for RSA, key
// agreement for EC), from the bytes of CONTENT (consumed).
Result<CmsPtr> encrypt(BIO* content, const std::vector<X509*>& to);

// The message file: for kMime, HEADERS then the S/MIME entity (SMIME_write_CMS, with the line
// ends of the original); for kDer, the DER ContentInfo.
Result<std::string> encode(CMS_ContentInfo* cms, Format format, std::string_view headers,
                           bool crlf);

}  // namespace kmsd::dr

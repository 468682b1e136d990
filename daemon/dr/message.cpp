#include "daemon/dr/message.hpp"

#include <openssl/err.h>
#include <openssl/pem.h>

#include <algorithm>
#include <cctype>
#include <system_error>

namespace kmsd::dr {

namespace fs = std::filesystem;

const char* to_string(Format f) noexcept {
  return f == Format::kDer ? "der" : "mime";
}

Result<Format> parse_format(std::string_view s) {
  if (s == "mime") return Format::kMime;
  if (s == "der") return Format::kDer;
  return make_error(ErrorCode::kInvalidArgument, "unknown message format '" + std::string(s) + "'");
}

namespace {

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

}  // namespace

Result<MessageWalker> MessageWalker::open(const fs::path& root) {
  std::error_code ec;
  if (!fs::is_directory(root, ec))
    return make_error(ErrorCode::kInvalidArgument,
                      "the message store " + root.string() + " is not a directory");
  MessageWalker w;
  w.root_ = root;
  w.it_ = fs::recursive_directory_iterator(root, fs::directory_options::none, ec);
  if (ec)
    return make_error(ErrorCode::kIo,
                      "cannot read the message store " + root.string() + ": " + ec.message());
  return w;
}

Result<std::optional<StoredMessage>> MessageWalker::next() {
  std::error_code ec;
  for (; it_ != fs::recursive_directory_iterator();) {
    if (started_) {
      it_.increment(ec);
      if (ec)
        return make_error(ErrorCode::kIo,
                          "cannot walk the message store " + root_.string() + ": " + ec.message());
      if (it_ == fs::recursive_directory_iterator()) break;
    }
    started_ = true;
    const auto& entry = *it_;
    if (entry.is_symlink(ec)) continue;
    if (entry.is_directory(ec)) {
      if (entry.path().filename() == "tmp" && fs::is_directory(entry.path().parent_path() / "cur"))
        it_.disable_recursion_pending();  // Maildir deliveries still being written
      continue;
    }
    if (!entry.is_regular_file(ec)) continue;
    const auto& p = entry.path();
    const std::string name = p.filename().string();
    const std::string parent = p.parent_path().filename().string();
    const std::string ext = lower(p.extension().string());
    StoredMessage m;
    m.relative = p.lexically_relative(root_);
    if (ext == ".p7m" || ext == ".der") {
      m.format = Format::kDer;
    } else if (ext == ".eml" ||
               ((parent == "cur" || parent == "new") && !name.empty() && name.front() != '.')) {
      m.format = Format::kMime;
    } else {
      continue;
    }
    return std::optional<StoredMessage>(std::move(m));
  }
  return std::optional<StoredMessage>();
}

Result<std::vector<StoredMessage>> list_messages(const fs::path& root) {
  KMSD_ASSIGN_OR_RETURN(auto walker, MessageWalker::open(root));
  std::vector<StoredMessage> out;
  for (;;) {
    KMSD_ASSIGN_OR_RETURN(auto m, walker.next());
    if (!m) break;
    out.push_back(std::move(*m));
  }
  std::sort(out.begin(), out.end(),
            [](const StoredMessage& a, const StoredMessage& b) { return a.relative < b.relative; });
  return out;
}

std::string issuer_serial_id(const X509_NAME* issuer, const ASN1_INTEGER* serial) {
  std::string text = "isn:";
  ossl::BioPtr bio(BIO_new(BIO_s_mem()));
  if (bio && X509_NAME_print_ex(bio.get(), issuer, 0, XN_FLAG_RFC2253) >= 0) {
    char* p = nullptr;
    long n = BIO_get_mem_data(bio.get(), &p);
    text.append(p, static_cast<std::size_t>(n));
  }
  text += "#";
  ossl::BignumPtr bn(ASN1_INTEGER_to_BN(serial, nullptr));
  if (bn) {
    char* h = BN_bn2hex(bn.get());
    if (h != nullptr) {
      text += lower(h);
      OPENSSL_free(h);
    }
  }
  return text;
}

std::string ski_id(const ASN1_OCTET_STRING* ski) {
  return "ski:" +
         ossl::hex({ASN1_STRING_get0_data(ski), static_cast<std::size_t>(ASN1_STRING_length(ski))});
}

std::vector<std::string> recipient_ids_of_cert(X509* cert) {
  std::vector<std::string> ids{
      issuer_serial_id(X509_get_issuer_name(cert), X509_get0_serialNumber(cert))};
  if (const ASN1_OCTET_STRING* ski = X509_get0_subject_key_id(cert)) ids.push_back(ski_id(ski));
  return ids;
}

namespace {

void add_id(std::vector<std::string>& ids, const ASN1_OCTET_STRING* keyid, const X509_NAME* issuer,
            const ASN1_INTEGER* serial) {
  if (keyid != nullptr)
    ids.push_back(ski_id(keyid));
  else if (issuer != nullptr && serial != nullptr)
    ids.push_back(issuer_serial_id(issuer, serial));
}

std::vector<std::string> recipients_of(CMS_ContentInfo* cms) {
  std::vector<std::string> ids;
  STACK_OF(CMS_RecipientInfo)* ris = CMS_get0_RecipientInfos(cms);
  for (int i = 0; i < sk_CMS_RecipientInfo_num(ris); ++i) {
    CMS_RecipientInfo* ri = sk_CMS_RecipientInfo_value(ris, i);
    switch (CMS_RecipientInfo_type(ri)) {
      case CMS_RECIPINFO_TRANS: {
        ASN1_OCTET_STRING* keyid = nullptr;
        X509_NAME* issuer = nullptr;
        ASN1_INTEGER* serial = nullptr;
        if (CMS_RecipientInfo_ktri_get0_signer_id(ri, &keyid, &issuer, &serial) == 1)
          add_id(ids, keyid, issuer, serial);
        break;
      }
      case CMS_RECIPINFO_AGREE: {
        STACK_OF(CMS_RecipientEncryptedKey)* reks = CMS_RecipientInfo_kari_get0_reks(ri);
        for (int j = 0; j < sk_CMS_RecipientEncryptedKey_num(reks); ++j) {
          ASN1_OCTET_STRING* keyid = nullptr;
          ASN1_GENERALIZEDTIME* date = nullptr;
          CMS_OtherKeyAttribute* other = nullptr;
          X509_NAME* issuer = nullptr;
          ASN1_INTEGER* serial = nullptr;
          if (CMS_RecipientEncryptedKey_get0_id(sk_CMS_RecipientEncryptedKey_value(reks, j), &keyid,
                                                &date, &other, &issuer, &serial) == 1)
            add_id(ids, keyid, issuer, serial);
        }
        break;
      }
      default:  // KEK and password recipients are not opened by a certificate's key
        break;
    }
  }
  return ids;
}

// The header block of a MIME message (up to the first empty line), and whether it uses CRLF.
struct HeaderBlock {
  std::string_view text;  // including the final line end of the last header line
  bool crlf = false;
  bool found = false;
};

HeaderBlock header_block(std::string_view m) {
  HeaderBlock h;
  for (std::size_t pos = 0; pos < m.size();) {
    std::size_t eol = m.find('\n', pos);
    if (eol == std::string_view::npos) break;
    std::string_view line = m.substr(pos, eol - pos);
    if (line.empty() || line == "\r") {
      h.text = m.substr(0, pos);
      h.crlf = line == "\r";
      h.found = true;
      return h;
    }
    pos = eol + 1;
  }
  return h;
}

bool mime_header(std::string_view line) {
  auto colon = line.find(':');
  if (colon == std::string_view::npos) return false;
  std::string name = lower(std::string(line.substr(0, colon)));
  while (!name.empty() && (name.back() == ' ' || name.back() == '\t')) name.pop_back();
  return name == "mime-version" || name.rfind("content-", 0) == 0;
}

// The header lines other than MIME-Version and Content-*, folded continuations included.
std::string kept_headers(std::string_view block, std::string* content_type) {
  std::string kept;
  bool keeping = false;
  bool in_content_type = false;
  for (std::size_t pos = 0; pos < block.size();) {
    std::size_t eol = block.find('\n', pos);
    std::size_t end = eol == std::string_view::npos ? block.size() : eol + 1;
    std::string_view line = block.substr(pos, end - pos);
    pos = end;
    const bool continuation = !line.empty() && (line.front() == ' ' || line.front() == '\t');
    if (!continuation) {
      keeping = !mime_header(line);
      in_content_type = lower(std::string(line.substr(0, 13))) == "content-type:";
    }
    if (keeping) kept.append(line);
    if (in_content_type && content_type != nullptr) content_type->append(lower(std::string(line)));
  }
  return kept;
}

}  // namespace

ParsedMessage parse_message(std::span<const std::uint8_t> bytes, Format format) {
  ParsedMessage out;
  ERR_clear_error();
  CmsPtr cms;
  if (format == Format::kDer) {
    const unsigned char* p = bytes.data();
    cms.reset(d2i_CMS_ContentInfo(nullptr, &p, static_cast<long>(bytes.size())));
    if (!cms) {
      out.kind = Kind::kDamaged;
      out.what = "not a DER CMS ContentInfo (" + ossl::drain_errors() + ")";
      return out;
    }
  } else {
    std::string_view text(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    HeaderBlock h = header_block(text);
    std::string content_type;
    if (h.found) out.headers = kept_headers(h.text, &content_type);
    out.crlf = h.crlf;
    ossl::BioPtr in(BIO_new_mem_buf(bytes.data(), static_cast<int>(bytes.size())));
    BIO* detached = nullptr;
    cms.reset(SMIME_read_CMS(in.get(), &detached));
    if (detached != nullptr) BIO_free(detached);
    if (!cms) {
      const bool smime = content_type.find("pkcs7-mime") != std::string::npos ||
                         content_type.find("pkcs7-signature") != std::string::npos ||
                         content_type.find("multipart/signed") != std::string::npos;
      const std::string detail = ossl::drain_errors();
      if (smime) {
        out.kind = Kind::kDamaged;
        out.what = "an S/MIME message that does not parse (" + detail + ")";
      } else {
        out.kind = Kind::kNotEncrypted;
        out.what = "not an S/MIME message";
      }
      return out;
    }
  }
  const int type = OBJ_obj2nid(CMS_get0_type(cms.get()));
  if (type != NID_pkcs7_enveloped && type != NID_id_smime_ct_authEnvelopedData) {
    out.kind = Kind::kNotEncrypted;
    out.what = std::string("CMS ") + OBJ_nid2ln(type) + ", not encrypted";
    return out;
  }
  out.kind = Kind::kEncrypted;
  out.recipients = recipients_of(cms.get());
  out.cms = std::move(cms);
  return out;
}

Result<ossl::BioPtr> decrypt(CMS_ContentInfo* cms, EVP_PKEY* key, X509* cert) {
  ERR_clear_error();
  ossl::BioPtr out(BIO_new(BIO_s_secmem()));
  if (!out) return ossl::crypto_error("allocating memory for a decrypted message");
  if (CMS_decrypt(cms, key, cert, nullptr, out.get(), CMS_BINARY) != 1)
    return ossl::crypto_error("decryption failed");
  return out;
}

Result<CmsPtr> encrypt(BIO* content, const std::vector<X509*>& to) {
  ERR_clear_error();
  ossl::X509StackPtr certs(sk_X509_new_null());
  if (!certs) return ossl::crypto_error("allocating the recipient list");
  for (X509* c : to) {
    if (X509_up_ref(c) != 1) return ossl::crypto_error("building the recipient list");
    if (sk_X509_push(certs.get(), c) <= 0) {
      X509_free(c);
      return ossl::crypto_error("building the recipient list");
    }
  }
  CmsPtr cms(CMS_encrypt(certs.get(), content, EVP_aes_256_cbc(), CMS_BINARY));
  if (!cms) return ossl::crypto_error("encryption failed");
  return cms;
}

Result<std::string> encode(CMS_ContentInfo* cms, Format format, std::string_view headers,
                           bool crlf) {
  ERR_clear_error();
  ossl::BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio) return ossl::crypto_error("allocating an output buffer");
  if (format == Format::kDer) {
    if (i2d_CMS_bio(bio.get(), cms) != 1) return ossl::crypto_error("encoding CMS as DER");
  } else if (SMIME_write_CMS(bio.get(), cms, nullptr, crlf ? SMIME_CRLFEOL : 0) != 1) {
    return ossl::crypto_error("writing S/MIME");
  }
  char* p = nullptr;
  long n = BIO_get_mem_data(bio.get(), &p);
  std::string out;
  out.reserve(headers.size() + static_cast<std::size_t>(n));
  out.append(headers);
  out.append(p, static_cast<std::size_t>(n));
  return out;
}

}  // namespace kmsd::dr

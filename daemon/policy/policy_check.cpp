// PolicyCheck: requests and identities judged against one [policy] snapshot. Names are built
// and encoded by OpenSSL only; the RFC 2253 reader below parses text, never ASN.1.
#include "daemon/policy/policy_check.hpp"

#include <openssl/asn1.h>
#include <openssl/err.h>
#include <openssl/objects.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>

#include "daemon/ca/issuer.hpp"
#include "hsm/token.hpp"

namespace kmsd::policy {

const char* to_string(RequestProfile p) noexcept {
  switch (p) {
    case RequestProfile::kSigning:
      return "signing";
    case RequestProfile::kEncryption:
      return "encryption";
    case RequestProfile::kAdminClient:
      return "admin-client";
    case RequestProfile::kTlsServer:
      return "tls-server";
  }
  return "unknown";
}

namespace {

using Asn1ObjectPtr = std::unique_ptr<ASN1_OBJECT, ossl::Deleter<ASN1_OBJECT_free>>;

// The short names of OpenSSL's keyUsage bit table (RFC 5280 4.2.1.3).
constexpr std::array<std::string_view, 9> kKeyUsages{
    "digitalSignature", "nonRepudiation", "keyEncipherment", "dataEncipherment", "keyAgreement",
    "keyCertSign",      "cRLSign",        "encipherOnly",    "decipherOnly",
};

// RFC 4514 characters that a backslash may escape as themselves.
constexpr std::string_view kRfc4514Specials = " \"#+,;<=>\\";

Error refuse(std::string message) {
  return make_error(ErrorCode::kInvalidArgument, std::move(message));
}

std::string in_quotes(std::string_view s) {
  return "\"" + std::string(s) + "\"";
}

std::string join(const std::vector<std::string>& items) {
  std::string out;
  for (const auto& i : items) out += (out.empty() ? "" : ", ") + i;
  return out;
}

std::string list_setting(std::string_view key, const std::vector<std::string>& items) {
  return std::string(key) + " = [" + join(items) + "]";
}

bool contains(const std::vector<std::string>& v, std::string_view s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

std::string hex4(std::uint32_t cp) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out = "U+";
  for (int shift = cp > 0xFFFF ? 20 : 12; shift >= 0; shift -= 4) out += kHex[(cp >> shift) & 0xF];
  return out;
}

// Decodes one UTF-8 sequence at TEXT[I]; advances I. nullopt for malformed, overlong or
// surrogate sequences.
std::optional<std::uint32_t> next_code_point(std::string_view text, std::size_t& i) {
  const auto b = [&](std::size_t k) { return static_cast<unsigned char>(text[k]); };
  const unsigned char c = b(i);
  std::size_t n = 0;
  std::uint32_t cp = 0;
  if (c < 0x80) {
    ++i;
    return c;
  } else if ((c & 0xE0) == 0xC0) {
    n = 1;
    cp = c & 0x1F;
  } else if ((c & 0xF0) == 0xE0) {
    n = 2;
    cp = c & 0x0F;
  } else if ((c & 0xF8) == 0xF0) {
    n = 3;
    cp = c & 0x07;
  } else {
    return std::nullopt;
  }
  for (std::size_t k = 1; k <= n; ++k) {
    if (i + k >= text.size() || (b(i + k) & 0xC0) != 0x80) return std::nullopt;
    cp = (cp << 6) | (b(i + k) & 0x3F);
  }
  static constexpr std::uint32_t kMin[] = {0, 0x80, 0x800, 0x10000};
  if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return std::nullopt;
  i += n + 1;
  return cp;
}

bool is_control(std::uint32_t cp) {
  return cp < 0x20 || (cp >= 0x7F && cp <= 0x9F);
}

// Valid UTF-8 without control characters (C0, DEL, C1): what a certificate can show.
Status check_text(std::string_view what, std::string_view value) {
  std::size_t i = 0;
  std::size_t chars = 0;
  while (i < value.size()) {
    const std::size_t at = i;
    const auto cp = next_code_point(value, i);
    if (!cp) {
      return refuse(std::string(what) + " is not valid UTF-8 (bad byte at offset " +
                    std::to_string(at) + "); send it UTF-8 encoded");
    }
    ++chars;
    if (is_control(*cp)) {
      return refuse(std::string(what) + " contains the control character " + hex4(*cp) +
                    " at character " + std::to_string(chars) +
                    "; a certificate name may hold printable characters only");
    }
  }
  return {};
}

bool is_atext(char c) {
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) return true;
  return std::string_view("!#$%&'*+/=?^_`{|}~-").find(c) != std::string_view::npos;
}

bool is_ldh_label(std::string_view label) {
  if (label.empty() || label.size() > 63) return false;
  if (label.front() == '-' || label.back() == '-') return false;
  return std::all_of(label.begin(), label.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-';
  });
}

// ADDRESS as an RFC 5321/5322 addr-spec subset: dot-atom local part, LDH domain name.
Status check_email(std::string_view what, std::string_view address, std::size_t max_length) {
  const std::string w = std::string(what) + " " + in_quotes(address);
  if (address.empty()) return refuse(std::string(what) + " is empty");
  if (std::any_of(address.begin(), address.end(),
                  [](char c) { return static_cast<unsigned char>(c) >= 0x80; })) {
    return refuse(w +
                  " contains non-ASCII characters; internationalized addresses (RFC 6531) cannot "
                  "be put in a certificate's rfc822Name or emailAddress, which are ASCII; use "
                  "the user's ASCII address");
  }
  if (address.front() == '"') {
    return refuse(w + " has a quoted local part; quoted local parts are not supported");
  }
  if (std::any_of(address.begin(), address.end(),
                  [](char c) { return static_cast<unsigned char>(c) <= 0x20 || c == 0x7f; })) {
    return refuse(w + " contains a space or control character");
  }
  const auto ats = std::count(address.begin(), address.end(), '@');
  if (ats == 0) return refuse(w + " has no '@'; write it as local-part@domain");
  if (ats > 1) {
    return refuse(w + " contains " + std::to_string(ats) +
                  " '@' characters; exactly one is allowed (quoted local parts are not "
                  "supported)");
  }
  const std::size_t at = address.find('@');
  const std::string_view local = address.substr(0, at);
  const std::string_view domain = address.substr(at + 1);
  if (local.empty()) return refuse(w + " has an empty local part (nothing before '@')");
  if (local.size() > 64) {
    return refuse(std::string(what) + " has a local part of " + std::to_string(local.size()) +
                  " characters; at most 64 are allowed (RFC 5321)");
  }
  if (address.size() > max_length) {
    std::string limit =
        max_length >= 254 ? "at most 254 are allowed (RFC 5321)"
                          : "policy.max_email_length allows at most " + std::to_string(max_length);
    return refuse(std::string(what) + " is " + std::to_string(address.size()) + " characters; " +
                  limit);
  }
  if (local.front() == '.' || local.back() == '.' || local.find("..") != std::string_view::npos) {
    return refuse(w + " has a local part with a leading, trailing or doubled '.'");
  }
  for (char c : local) {
    if (c != '.' && !is_atext(c)) {
      return refuse(w + " has " + in_quotes(std::string(1, c)) +
                    " in its local part, which only a quoted local part may hold; quoted local "
                    "parts are not supported");
    }
  }
  if (domain.empty()) return refuse(w + " has an empty domain (nothing after '@')");
  if (domain.front() == '[') {
    return refuse(w + " uses a domain literal; write the mail domain's name instead");
  }
  std::size_t start = 0;
  while (start <= domain.size()) {
    std::size_t dot = domain.find('.', start);
    if (dot == std::string_view::npos) dot = domain.size();
    const std::string_view label = domain.substr(start, dot - start);
    if (!is_ldh_label(label)) {
      return refuse(w + " has the invalid domain label " + in_quotes(label) +
                    "; a label is 1-63 letters, digits or hyphens, not starting or ending with "
                    "a hyphen");
    }
    start = dot + 1;
  }
  return {};
}

std::string short_name(const ASN1_OBJECT* obj) {
  const int nid = OBJ_obj2nid(obj);
  if (nid != NID_undef) return OBJ_nid2sn(nid);
  char buf[128];
  OBJ_obj2txt(buf, sizeof buf, obj, 1);
  return buf;
}

// Adds OBJ=VALUE (UTF-8) to NAME, letting OpenSSL choose the string type and apply the X.520
// upper bounds; WHAT names the value for the administrator ("display name").
Status add_entry(X509_NAME* name, const ASN1_OBJECT* obj, std::string_view value,
                 std::string_view what, int set) {
  const std::string attr = short_name(obj);
  KMSD_TRY(check_text(what, value));
  if (value.empty()) return refuse(std::string(what) + " is empty");
  if (const ASN1_STRING_TABLE* t = ASN1_STRING_TABLE_get(OBJ_obj2nid(obj))) {
    const std::size_t chars = utf8_length(value).value_or(value.size());
    if (t->maxsize > 0 && chars > static_cast<std::size_t>(t->maxsize)) {
      return refuse(std::string(what) + " is " + std::to_string(chars) +
                    " characters; a certificate " + attr + " holds at most " +
                    std::to_string(t->maxsize));
    }
    if (t->minsize > 0 && chars < static_cast<std::size_t>(t->minsize)) {
      return refuse(std::string(what) + " is " + std::to_string(chars) +
                    " characters; a certificate " + attr + " holds at least " +
                    std::to_string(t->minsize));
    }
  }
  ERR_clear_error();
  if (X509_NAME_add_entry_by_OBJ(name, obj, MBSTRING_UTF8,
                                 reinterpret_cast<const unsigned char*>(value.data()),
                                 static_cast<int>(value.size()), -1, set) != 1) {
    return refuse(std::string(what) + " " + in_quotes(value) +
                  " cannot be encoded as a certificate " + attr + " (" + ossl::drain_errors() +
                  ")");
  }
  return {};
}

Status add_entry(X509_NAME* name, int nid, std::string_view value, std::string_view what) {
  return add_entry(name, OBJ_nid2obj(nid), value, what, 0);
}

// (attribute OID, RDN index, UTF-8 value) for every entry: what a name means, independent of
// the ASN.1 string types that carry it.
using Entry = std::tuple<std::string, int, std::string>;

Result<std::vector<Entry>> entries_of(const X509_NAME* name) {
  std::vector<Entry> out;
  for (int i = 0; i < X509_NAME_entry_count(name); ++i) {
    const X509_NAME_ENTRY* e = X509_NAME_get_entry(name, i);
    char oid[128];
    OBJ_obj2txt(oid, sizeof oid, X509_NAME_ENTRY_get_object(e), 1);
    unsigned char* utf8 = nullptr;
    const int n = ASN1_STRING_to_UTF8(&utf8, X509_NAME_ENTRY_get_data(e));
    if (n < 0) {
      ERR_clear_error();
      return refuse("subject attribute " + short_name(X509_NAME_ENTRY_get_object(e)) +
                    " cannot be read as text");
    }
    std::string value(reinterpret_cast<const char*>(utf8), static_cast<std::size_t>(n));
    OPENSSL_free(utf8);
    out.emplace_back(oid, X509_NAME_ENTRY_set(e), std::move(value));
  }
  return out;
}

std::string print_name(const X509_NAME* name, unsigned long flags) {
  ossl::BioPtr bio(BIO_new(BIO_s_mem()));
  X509_NAME_print_ex(bio.get(), name, 0, flags);
  char* p = nullptr;
  const long n = BIO_get_mem_data(bio.get(), &p);
  return std::string(p, static_cast<std::size_t>(n));
}

// NAME's RFC 2253 text, in both forms kmsd writes (non-ASCII escaped as \XX, and raw UTF-8 as
// ca::name_to_string keeps it in records), must read back as exactly NAME.
Status check_round_trip(const X509_NAME* name) {
  KMSD_ASSIGN_OR_RETURN(const std::vector<Entry> want, entries_of(name));
  for (const std::string& text : {print_name(name, XN_FLAG_RFC2253), ca::name_to_string(name)}) {
    auto back = parse_rfc2253(text);
    if (!back.ok()) {
      return refuse("the subject " + in_quotes(text) +
                    " does not read back from its RFC 2253 text (" + back.error().message +
                    "); remove the unusual characters");
    }
    KMSD_ASSIGN_OR_RETURN(const std::vector<Entry> got, entries_of(back->get()));
    if (got != want) {
      return refuse("the subject " + in_quotes(text) +
                    " reads back from its RFC 2253 text as a different name; remove the unusual "
                    "characters");
    }
  }
  return {};
}

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

std::string key_usage_names() {
  std::string out;
  for (std::string_view k : kKeyUsages) out += (out.empty() ? "" : ", ") + std::string(k);
  return out;
}

// The OpenSSL short name of an extended key usage given by short name, long name or OID;
// nullopt when OpenSSL cannot read it as an object identifier.
std::optional<std::string> eku_short_name(const std::string& name) {
  Asn1ObjectPtr obj(OBJ_txt2obj(name.c_str(), 0));
  if (!obj) {
    ERR_clear_error();
    return std::nullopt;
  }
  return short_name(obj.get());
}

struct KeyDescription {
  std::string spelling;  // "rsa-1024", "ec-p521", "ed25519": the policy.key_types style
  std::optional<hsm::KeyType> type;
};

KeyDescription describe_key(EVP_PKEY* key) {
  const int bits = EVP_PKEY_get_bits(key);
  if (EVP_PKEY_is_a(key, "RSA")) {
    KeyDescription d{"rsa-" + std::to_string(bits), std::nullopt};
    if (bits == 2048) d.type = hsm::KeyType::kRsa2048;
    if (bits == 3072) d.type = hsm::KeyType::kRsa3072;
    return d;
  }
  if (EVP_PKEY_is_a(key, "RSA-PSS")) return {"rsa-pss-" + std::to_string(bits), std::nullopt};
  if (EVP_PKEY_is_a(key, "EC")) {
    char group[80] = {};
    std::size_t len = 0;
    if (EVP_PKEY_get_group_name(key, group, sizeof group, &len) != 1) {
      ERR_clear_error();
      return {"ec (unnamed curve, " + std::to_string(bits) + " bits)", std::nullopt};
    }
    const std::string g(group, len);
    if (g == "prime256v1" || g == "P-256" || g == "secp256r1") {
      return {"ec-p256", hsm::KeyType::kEcP256};
    }
    if (g == "secp384r1" || g == "P-384") return {"ec-p384", hsm::KeyType::kEcP384};
    if (g == "secp521r1" || g == "P-521") return {"ec-p521", std::nullopt};
    return {"ec-" + g, std::nullopt};
  }
  for (const char* alg : {"ED25519", "ED448", "X25519", "X448"}) {
    if (EVP_PKEY_is_a(key, alg)) {
      std::string s(alg);
      std::transform(s.begin(), s.end(), s.begin(), [](char c) {
        return static_cast<char>(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
      });
      return {s, std::nullopt};
    }
  }
  if (EVP_PKEY_is_a(key, "DSA")) return {"dsa-" + std::to_string(bits), std::nullopt};
  const char* name = EVP_PKEY_get0_type_name(key);
  return {std::string(name != nullptr ? name : "an unknown algorithm") + " (" +
              std::to_string(bits) + " bits)",
          std::nullopt};
}

// The usages a profile allows, and how to name where that comes from.
struct Allowed {
  std::vector<std::string> key_usage;
  std::vector<std::string> extended_key_usage;
  std::string ku_source;   // "policy.signing.key_usage = [...]"
  std::string eku_source;  // "policy.signing.extended_key_usage = [...]"
  bool configurable = true;
};

Allowed allowed_for(const config::PolicyConfig& c, RequestProfile p) {
  const auto from = [](const config::ProfileUsages& u, std::string_view table) {
    return Allowed{
        u.key_usage, u.extended_key_usage,
        list_setting("policy." + std::string(table) + ".key_usage", u.key_usage),
        list_setting("policy." + std::string(table) + ".extended_key_usage", u.extended_key_usage),
        true};
  };
  // Fixed by ca::issue for ca::Profile::kAdminClient and kTlsServer.
  const auto fixed = [](std::vector<std::string> ku, std::vector<std::string> eku,
                        std::string_view what) {
    Allowed a{std::move(ku), std::move(eku), "", "", false};
    a.ku_source =
        std::string(what) + " certificates always carry key usage [" + join(a.key_usage) + "]";
    a.eku_source = std::string(what) + " certificates always carry extended key usage [" +
                   join(a.extended_key_usage) + "]";
    return a;
  };
  switch (p) {
    case RequestProfile::kSigning:
      return from(c.signing, "signing");
    case RequestProfile::kEncryption:
      return from(c.encryption, "encryption");
    case RequestProfile::kAdminClient:
      return fixed({"digitalSignature"}, {"clientAuth"}, "admin-client");
    case RequestProfile::kTlsServer:
      return fixed({"digitalSignature", "keyEncipherment"}, {"serverAuth"}, "tls-server");
  }
  return {};
}

std::string key_types_setting(const std::vector<hsm::KeyType>& types) {
  std::vector<std::string> names;
  for (hsm::KeyType t : types) names.emplace_back(hsm::to_string(t));
  return list_setting("policy.key_types", names);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Free helpers
// ---------------------------------------------------------------------------------------------

std::optional<std::size_t> utf8_length(std::string_view text) {
  std::size_t i = 0, n = 0;
  while (i < text.size()) {
    if (!next_code_point(text, i)) return std::nullopt;
    ++n;
  }
  return n;
}

Result<ossl::X509NamePtr> parse_rfc2253(std::string_view text) {
  struct Ava {
    std::string type;
    std::string value;
  };
  std::vector<std::vector<Ava>> rdns;
  std::size_t i = 0;
  bool new_rdn = true;
  while (i < text.size()) {
    const std::size_t eq = text.find('=', i);
    if (eq == std::string_view::npos || eq == i) {
      return refuse("attribute at offset " + std::to_string(i) + " is not TYPE=VALUE");
    }
    Ava ava{std::string(text.substr(i, eq - i)), ""};
    i = eq + 1;
    if (i < text.size() && text[i] == '#') {
      return refuse("the value of " + ava.type + " is hex-encoded BER, which kmsd does not read");
    }
    while (i < text.size() && text[i] != ',' && text[i] != '+') {
      const char c = text[i];
      if (c == '\\') {
        if (i + 1 == text.size()) return refuse("the text ends with a lone '\\'");
        const char d = text[i + 1];
        if (i + 2 < text.size() && hex_digit(d) >= 0 && hex_digit(text[i + 2]) >= 0) {
          ava.value += static_cast<char>(hex_digit(d) * 16 + hex_digit(text[i + 2]));
          i += 3;
        } else if (kRfc4514Specials.find(d) != std::string_view::npos) {
          ava.value += d;
          i += 2;
        } else {
          return refuse(std::string("'\\") + d + "' is not an RFC 4514 escape");
        }
        continue;
      }
      if (c == '"' || c == ';' || c == '<' || c == '>' || c == '\0') {
        return refuse(std::string("unescaped '") + c + "' in the value of " + ava.type);
      }
      ava.value += c;
      ++i;
    }
    if (new_rdn) rdns.emplace_back();
    rdns.back().push_back(std::move(ava));
    if (i == text.size()) break;
    new_rdn = text[i] == ',';
    if (++i == text.size()) return refuse("the text ends with a separator");
  }
  // RFC 2253 writes the last RDN first, and OpenSSL also reverses the values of one RDN.
  ossl::X509NamePtr name(X509_NAME_new());
  for (auto rdn = rdns.rbegin(); rdn != rdns.rend(); ++rdn) {
    for (auto ava = rdn->rbegin(); ava != rdn->rend(); ++ava) {
      Asn1ObjectPtr obj(OBJ_txt2obj(ava->type.c_str(), 0));
      if (!obj) {
        ERR_clear_error();
        return refuse("unknown attribute type " + in_quotes(ava->type));
      }
      ERR_clear_error();
      if (X509_NAME_add_entry_by_OBJ(name.get(), obj.get(), MBSTRING_UTF8,
                                     reinterpret_cast<const unsigned char*>(ava->value.data()),
                                     static_cast<int>(ava->value.size()), -1,
                                     ava == rdn->rbegin() ? 0 : -1) != 1) {
        return refuse("the value of " + ava->type + " cannot be encoded (" + ossl::drain_errors() +
                      ")");
      }
    }
  }
  return name;
}

// ---------------------------------------------------------------------------------------------
// PolicyCheck
// ---------------------------------------------------------------------------------------------

Result<PolicyCheck> PolicyCheck::create(config::PolicyConfig config) {
  const auto bad = [](std::string m) { return make_error(ErrorCode::kConfig, std::move(m)); };
  if (config.x509_versions.empty()) return bad("policy.x509_versions is empty");
  for (int v : config.x509_versions) {
    if (v != 1 && v != 3) {
      return bad("policy.x509_versions may hold 1 and 3 only, found " + std::to_string(v));
    }
  }
  if (config.key_types.empty()) return bad("policy.key_types is empty");
  if (config.max_email_length < 6 || config.max_email_length > 254) {
    return bad("policy.max_email_length must be between 6 and 254");
  }
  if (config.max_display_name_length < 1 || config.max_display_name_length > 64) {
    return bad("policy.max_display_name_length must be between 1 and 64");
  }
  if (config.max_user_id_length < 1) return bad("policy.max_user_id_length must be at least 1");
  for (auto [table, u] :
       {std::pair<const char*, config::ProfileUsages*>{"signing", &config.signing},
        {"encryption", &config.encryption}}) {
    for (const std::string& k : u->key_usage) {
      if (std::find(kKeyUsages.begin(), kKeyUsages.end(), k) == kKeyUsages.end()) {
        return bad(std::string("policy.") + table + ".key_usage: unknown key usage " +
                   in_quotes(k));
      }
    }
    for (std::string& e : u->extended_key_usage) {
      auto sn = eku_short_name(e);
      if (!sn) {
        return bad(std::string("policy.") + table + ".extended_key_usage: unknown " + in_quotes(e));
      }
      e = *sn;
    }
  }
  return PolicyCheck(std::move(config));
}

Status PolicyCheck::admit(const CertificateRequest& req) const {
  KMSD_TRY(admit_version(req));
  KMSD_TRY(admit_key(req.public_key));
  KMSD_TRY(admit_validity(req.validity));
  KMSD_TRY(admit_subject(req.subject));
  if (!req.email.empty()) KMSD_TRY(admit_email(req.email, "the request's e-mail address"));
  KMSD_TRY(admit_usages(req));
  return {};
}

Status PolicyCheck::admit_version(const CertificateRequest& req) const {
  const auto& vs = config_.x509_versions;
  std::vector<std::string> listed;
  for (int v : vs) listed.push_back(std::to_string(v));
  const std::string setting = list_setting("policy.x509_versions", listed);
  const int v = req.x509_version;
  if (v != 1 && v != 3) {
    return refuse("X.509 version " + std::to_string(v) +
                  " certificates are not issued by kmsd; request a v3 certificate");
  }
  if (std::find(vs.begin(), vs.end(), v) == vs.end()) {
    if (v == 1) {
      return refuse("X.509 v1 certificates are disabled by policy (" + setting +
                    "); request a v3 certificate or allow v1 explicitly");
    }
    return refuse("X.509 v3 certificates are disabled by policy (" + setting +
                  "); request a v1 certificate or add 3 to policy.x509_versions");
  }
  if (v != 1) return {};
  // A v1 certificate has no extensions field: no key usages, no subjectAltName.
  const Allowed a = allowed_for(config_, req.profile);
  const std::string profile = to_string(req.profile);
  if (!a.configurable || !a.key_usage.empty() || !a.extended_key_usage.empty()) {
    std::string why = a.ku_source + "; " + a.eku_source;
    std::string fix = "request a v3 certificate";
    if (a.configurable) {
      fix += ", or empty both lists of [policy." + profile + "] to issue v1 " + profile +
             " certificates";
    }
    return refuse("a v1 certificate cannot carry extensions, and " + profile +
                  " certificates need them (" + why + "); " + fix);
  }
  if (!req.key_usage.empty() || !req.extended_key_usage.empty()) {
    return refuse(
        "a v1 certificate cannot carry extensions, and the request asks for key usages; request a "
        "v3 certificate or no usages");
  }
  if (!req.email.empty()) {
    return refuse("a v1 certificate cannot carry a subjectAltName for " + in_quotes(req.email) +
                  "; put the address in the subject's emailAddress or request a v3 certificate");
  }
  return {};
}

Status PolicyCheck::admit_key(EVP_PKEY* key) const {
  if (key == nullptr) return refuse("the request carries no public key");
  const KeyDescription d = describe_key(key);
  const auto& kt = config_.key_types;
  if (d.type && std::find(kt.begin(), kt.end(), *d.type) != kt.end()) return {};
  return refuse("the request's key is " + d.spelling + ", which the policy does not allow (" +
                key_types_setting(kt) + "); generate a key of an allowed type");
}

Status PolicyCheck::admit_validity(std::chrono::seconds validity) const {
  constexpr std::int64_t kDay = 86400;
  if (validity.count() <= 0) {
    return refuse("the requested validity must be positive, found " +
                  std::to_string(validity.count()) + " seconds");
  }
  const std::int64_t max = static_cast<std::int64_t>(config_.max_validity_days) * kDay;
  if (validity.count() > max) {
    const std::int64_t days = (validity.count() + kDay - 1) / kDay;
    return refuse("the requested validity of " + std::to_string(days) +
                  " days exceeds policy.max_validity_days (" +
                  std::to_string(config_.max_validity_days) + "); request at most " +
                  std::to_string(config_.max_validity_days) + " days");
  }
  return {};
}

Status PolicyCheck::admit_email(std::string_view email, std::string_view what) const {
  return check_email(what, email, config_.max_email_length);
}

Status PolicyCheck::admit_usages(const CertificateRequest& req) const {
  const Allowed a = allowed_for(config_, req.profile);
  const std::string profile = to_string(req.profile);
  const bool ec = req.public_key != nullptr && EVP_PKEY_is_a(req.public_key, "EC");
  const bool rsa = req.public_key != nullptr && EVP_PKEY_is_a(req.public_key, "RSA");
  for (const std::string& ku : req.key_usage) {
    if (std::find(kKeyUsages.begin(), kKeyUsages.end(), ku) == kKeyUsages.end()) {
      return refuse("the request asks for key usage " + in_quotes(ku) +
                    ", which is not a key usage (known: " + key_usage_names() + ")");
    }
    if (!contains(a.key_usage, ku)) {
      std::string hint;
      const auto other = req.profile == RequestProfile::kSigning ? RequestProfile::kEncryption
                                                                 : RequestProfile::kSigning;
      if (a.configurable && contains(allowed_for(config_, other).key_usage, ku)) {
        hint = "; it belongs to the " + std::string(to_string(other)) + " profile";
      }
      return refuse("key usage " + ku + " is not allowed for " + profile + " certificates (" +
                    a.ku_source + "); request only those usages" + hint);
    }
    // RFC 5480 3 and RFC 4055 1.2: EC keys agree, RSA keys transport.
    if (ec && (ku == "keyEncipherment" || ku == "dataEncipherment")) {
      return refuse("key usage " + ku +
                    " needs an RSA key, and the request's key is an EC key; request keyAgreement "
                    "for an EC key");
    }
    if (rsa && ku == "keyAgreement") {
      return refuse(
          "key usage keyAgreement needs an EC key, and the request's key is an RSA key; request "
          "keyEncipherment for an RSA key");
    }
  }
  for (const std::string& eku : req.extended_key_usage) {
    const auto sn = eku_short_name(eku);
    if (!sn) {
      return refuse("the request asks for extended key usage " + in_quotes(eku) +
                    ", which is neither a known name nor an OID");
    }
    if (!contains(a.extended_key_usage, *sn)) {
      return refuse("extended key usage " + *sn + " is not allowed for " + profile +
                    " certificates (" + a.eku_source + "); request only those usages");
    }
  }
  return {};
}

Status PolicyCheck::admit_subject(const X509_NAME* subject) const {
  if (subject == nullptr || X509_NAME_entry_count(subject) == 0) {
    return refuse("the request has an empty subject; give at least a CN");
  }
  // Rebuilt from each value's text: OpenSSL applies the X.520 upper bounds, and the result is
  // the name kmsd will put in the certificate.
  ossl::X509NamePtr rebuilt(X509_NAME_new());
  int prev_set = -1;
  for (int i = 0; i < X509_NAME_entry_count(subject); ++i) {
    const X509_NAME_ENTRY* e = X509_NAME_get_entry(subject, i);
    const ASN1_OBJECT* obj = X509_NAME_ENTRY_get_object(e);
    const std::string attr = short_name(obj);
    unsigned char* utf8 = nullptr;
    const int n = ASN1_STRING_to_UTF8(&utf8, X509_NAME_ENTRY_get_data(e));
    if (n < 0) {
      ERR_clear_error();
      return refuse("the subject's " + attr + " cannot be read as text");
    }
    const std::string value(reinterpret_cast<const char*>(utf8), static_cast<std::size_t>(n));
    OPENSSL_free(utf8);
    if (OBJ_obj2nid(obj) == NID_pkcs9_emailAddress) {
      KMSD_TRY(admit_email(value, "the subject's emailAddress"));
    }
    const int set = X509_NAME_ENTRY_set(e);
    KMSD_TRY(
        add_entry(rebuilt.get(), obj, value, "the subject's " + attr, set == prev_set ? -1 : 0));
    prev_set = set;
  }
  KMSD_TRY(check_round_trip(rebuilt.get()));
  const std::string text = ca::name_to_string(rebuilt.get());
  const std::size_t chars = utf8_length(text).value_or(text.size());
  if (chars > config_.max_subject_length) {
    return refuse("the subject " + in_quotes(text) + " is " + std::to_string(chars) +
                  " characters as RFC 2253 text; policy.max_subject_length allows at most " +
                  std::to_string(config_.max_subject_length) + "; shorten it");
  }
  return {};
}

Result<ossl::X509NamePtr> PolicyCheck::subject_for(const UserIdentity& user) const {
  ossl::X509NamePtr name(X509_NAME_new());
  if (user.dn.empty()) {
    if (user.display_name.empty()) {
      return refuse(
          "the display name is empty; it becomes the certificate's CN, so give one "
          "(or a DN)");
    }
    KMSD_TRY(add_entry(name.get(), NID_commonName, user.display_name, "display name"));
    KMSD_TRY(add_entry(name.get(), NID_pkcs9_emailAddress, user.email, "e-mail address"));
    return name;
  }
  // The one-line form exactly as ca::parse_subject reads it ('/' separates, '\' escapes), so
  // that each attribute gets its own sentence; parse_subject must then agree.
  const std::string_view dn = user.dn;
  if (dn.front() != '/') {
    return refuse("the DN " + in_quotes(dn) + " must have the form /O=Example/CN=Name");
  }
  std::size_t i = 1;
  while (i <= dn.size()) {
    std::string part;
    while (i < dn.size() && dn[i] != '/') {
      if (dn[i] == '\\' && i + 1 < dn.size()) ++i;
      part.push_back(dn[i++]);
    }
    ++i;
    if (part.empty()) {
      if (i > dn.size()) break;
      return refuse("the DN " + in_quotes(dn) + " has an empty component");
    }
    const std::size_t eq = part.find('=');
    if (eq == std::string::npos || eq == 0) {
      return refuse("the DN component " + in_quotes(part) + " is not of the form KEY=VALUE");
    }
    const std::string key = part.substr(0, eq);
    Asn1ObjectPtr obj(OBJ_txt2obj(key.c_str(), 0));
    if (!obj) {
      ERR_clear_error();
      return refuse("the DN names the unknown attribute " + in_quotes(key));
    }
    KMSD_TRY(add_entry(name.get(), obj.get(), part.substr(eq + 1), "the DN's " + key, 0));
  }
  if (X509_NAME_entry_count(name.get()) == 0) return refuse("the DN is empty");
  auto theirs = ca::parse_subject(dn);
  if (!theirs.ok() || X509_NAME_cmp(theirs->get(), name.get()) != 0) {
    return make_error(ErrorCode::kInternal, "the DN " + in_quotes(dn) +
                                                " reads differently here and in ca::parse_subject");
  }
  return name;
}

Status PolicyCheck::admit_identity(const UserIdentity& user) const {
  if (user.user_id.empty()) return refuse("the user id is empty");
  if (user.user_id.size() > config_.max_user_id_length) {
    return refuse("the user id is " + std::to_string(user.user_id.size()) +
                  " bytes; policy.max_user_id_length allows at most " +
                  std::to_string(config_.max_user_id_length));
  }
  KMSD_TRY(check_text("the user id", user.user_id));
  KMSD_TRY(admit_email(user.email, "the e-mail address"));
  if (!user.display_name.empty()) {
    KMSD_TRY(check_text("the display name", user.display_name));
    const std::size_t chars = *utf8_length(user.display_name);
    if (chars > config_.max_display_name_length) {
      if (config_.max_display_name_length >= 64) {
        return refuse("the display name is " + std::to_string(chars) +
                      " characters; a certificate CN holds at most 64");
      }
      return refuse("the display name is " + std::to_string(chars) +
                    " characters; policy.max_display_name_length allows at most " +
                    std::to_string(config_.max_display_name_length));
    }
  }
  KMSD_ASSIGN_OR_RETURN(ossl::X509NamePtr subject, subject_for(user));
  if (!user.dn.empty()) {
    const int at = X509_NAME_get_index_by_NID(subject.get(), NID_pkcs9_emailAddress, -1);
    if (at >= 0) {
      KMSD_ASSIGN_OR_RETURN(const std::vector<Entry> all, entries_of(subject.get()));
      const std::string& in_dn = std::get<2>(all[static_cast<std::size_t>(at)]);
      if (in_dn != user.email) {
        return refuse("the DN's emailAddress " + in_quotes(in_dn) +
                      " is not the user's e-mail address " + in_quotes(user.email) +
                      "; make them the same or leave emailAddress out of the DN");
      }
    }
  }
  return admit_subject(subject.get());
}

// ---------------------------------------------------------------------------------------------
// PolicyInForce
// ---------------------------------------------------------------------------------------------

PolicyInForce::PolicyInForce(std::shared_ptr<const PolicyCheck> initial)
    : current_(std::move(initial)) {}

std::shared_ptr<const PolicyCheck> PolicyInForce::current() const {
  return current_.load(std::memory_order_acquire);
}

void PolicyInForce::replace(std::shared_ptr<const PolicyCheck> next) {
  current_.store(std::move(next), std::memory_order_release);
}

}  // namespace kmsd::policy

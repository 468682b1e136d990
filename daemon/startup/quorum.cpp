#include "daemon/startup/quorum.hpp"

// libgfshare.h has no extern "C" of its own.
extern "C" {
#include <libgfshare.h>
}
#include <openssl/evp.h>
#include <openssl/rand.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>

#include "common/ossl.hpp"

namespace kmsd::startup {

namespace {

constexpr std::uint8_t kMagic[4] = {'K', 'M', 'S', 'Q'};
constexpr std::uint8_t kVersion = 1;
constexpr std::size_t kHeader = 26;
constexpr std::string_view kDigestContext = "kmsd quorum share v1";

// libgfshare draws its polynomial coefficients (and the bytes it scribbles over freed
// contexts) from this hook. A failure of the generator is remembered and fails the split.
std::atomic<bool> g_rand_failed{false};
void fill_rand(unsigned char* buf, unsigned int n) {
  if (RAND_priv_bytes(buf, static_cast<int>(n)) != 1) {
    g_rand_failed = true;
    std::memset(buf, 0, n);
  }
}
void install_rand() {
  static std::once_flag once;
  std::call_once(once, [] { gfshare_fill_rand = fill_rand; });
}

struct CtxFree {
  void operator()(gfshare_ctx* c) const noexcept { gfshare_ctx_free(c); }
};
using CtxPtr = std::unique_ptr<gfshare_ctx, CtxFree>;

std::array<std::uint8_t, 32> share_digest(const std::array<std::uint8_t, kQuorumIdSize>& id,
                                          unsigned index, std::span<const std::uint8_t> value) {
  EVP_MD_CTX* md = EVP_MD_CTX_new();
  std::array<std::uint8_t, 32> out{};
  const std::uint8_t idx = static_cast<std::uint8_t>(index);
  unsigned len = 0;
  bool ok = md != nullptr && EVP_DigestInit_ex(md, EVP_sha256(), nullptr) == 1 &&
            EVP_DigestUpdate(md, kDigestContext.data(), kDigestContext.size()) == 1 &&
            EVP_DigestUpdate(md, id.data(), id.size()) == 1 && EVP_DigestUpdate(md, &idx, 1) == 1 &&
            EVP_DigestUpdate(md, value.data(), value.size()) == 1 &&
            EVP_DigestFinal_ex(md, out.data(), &len) == 1;
  EVP_MD_CTX_free(md);
  if (!ok) out.fill(0);  // never matches a real digest: the share is refused
  return out;
}

Error bad_share(const std::string& why) {
  return make_error(ErrorCode::kInvalidArgument,
                    "this card does not hold a usable kmsd quorum share: " + why);
}

}  // namespace

std::string Share::quorum_id_hex() const {
  return ossl::hex(quorum_id);
}

bool Share::digest_matches() const {
  if (index == 0 || index > digests.size()) return false;
  auto d = share_digest(quorum_id, index, value.span());
  return CRYPTO_memcmp(d.data(), digests[index - 1].data(), d.size()) == 0;
}

Result<Share> parse_share(std::span<const std::uint8_t> b) {
  if (b.size() < kHeader || std::memcmp(b.data(), kMagic, 4) != 0)
    return bad_share(
        "the object does not start with the share header (is it a plain startup "
        "secret written for source = \"card\"?)");
  if (b[4] != kVersion)
    return bad_share("share format version " + std::to_string(b[4]) + " is not supported");
  Share s;
  s.k = b[5];
  s.n = b[6];
  s.index = b[7];
  if (s.n < 2 || s.k < 2 || s.k > s.n)
    return bad_share("impossible quorum " + std::to_string(s.k) + " of " + std::to_string(s.n));
  if (s.index < 1 || s.index > s.n)
    return bad_share("share index " + std::to_string(s.index) + " is outside 1.." +
                     std::to_string(s.n));
  std::memcpy(s.quorum_id.data(), b.data() + 8, kQuorumIdSize);
  const std::size_t len = (std::size_t{b[24]} << 8) | b[25];
  if (len == 0 || len > kMaxQuorumSecret) return bad_share("share length out of range");
  const std::size_t want = kHeader + 32 * s.n + len;
  if (b.size() != want)
    return bad_share("the object is " + std::to_string(b.size()) + " bytes, the header says " +
                     std::to_string(want) + " (truncated or padded)");
  s.digests.resize(s.n);
  for (unsigned i = 0; i < s.n; ++i)
    std::memcpy(s.digests[i].data(), b.data() + kHeader + 32 * i, 32);
  s.value = SecretBytes(b.data() + kHeader + 32 * s.n, len);
  if (!s.digest_matches())
    return bad_share("share " + std::to_string(s.index) + " of quorum " + s.quorum_id_hex() +
                     " does not match its digest (damaged or forged)");
  return s;
}

SecretBytes encode_share(const Share& s) {
  SecretBytes out(kHeader + 32 * s.digests.size() + s.value.size());
  std::uint8_t* p = out.data();
  std::memcpy(p, kMagic, 4);
  p[4] = kVersion;
  p[5] = static_cast<std::uint8_t>(s.k);
  p[6] = static_cast<std::uint8_t>(s.n);
  p[7] = static_cast<std::uint8_t>(s.index);
  std::memcpy(p + 8, s.quorum_id.data(), kQuorumIdSize);
  p[24] = static_cast<std::uint8_t>(s.value.size() >> 8);
  p[25] = static_cast<std::uint8_t>(s.value.size() & 0xff);
  for (std::size_t i = 0; i < s.digests.size(); ++i)
    std::memcpy(p + kHeader + 32 * i, s.digests[i].data(), 32);
  if (!s.value.empty())
    std::memcpy(p + kHeader + 32 * s.digests.size(), s.value.data(), s.value.size());
  return out;
}

Result<std::vector<Share>> split_secret(const SecretBytes& secret, unsigned k, unsigned n) {
  if (k < 2 || n > 255 || k > n)
    return make_error(ErrorCode::kInvalidArgument,
                      "a quorum needs 2 <= k <= n <= 255, got k=" + std::to_string(k) +
                          " n=" + std::to_string(n) +
                          "; for one card use source = \"card\" (several cards may hold copies)");
  if (secret.empty() || secret.size() > kMaxQuorumSecret)
    return make_error(ErrorCode::kInvalidArgument,
                      "the secret must be 1.." + std::to_string(kMaxQuorumSecret) + " bytes long");
  install_rand();
  std::vector<std::uint8_t> xs(n);
  for (unsigned i = 0; i < n; ++i) xs[i] = static_cast<std::uint8_t>(i + 1);
  const auto size = static_cast<unsigned>(secret.size());
  g_rand_failed = false;
  CtxPtr ctx(gfshare_ctx_init_enc(xs.data(), n, static_cast<unsigned char>(k), size));
  if (!ctx) return make_error(ErrorCode::kInternal, "libgfshare refused to set up the split");
  SecretBytes copy = secret.clone();  // libgfshare takes a non-const pointer
  gfshare_ctx_enc_setsecret(ctx.get(), copy.data());
  std::array<std::uint8_t, kQuorumIdSize> id{};
  if (RAND_bytes(id.data(), static_cast<int>(id.size())) != 1)
    return make_error(ErrorCode::kCrypto, "the random generator failed: " + ossl::drain_errors());
  std::vector<Share> shares(n);
  for (unsigned i = 0; i < n; ++i) {
    Share& s = shares[i];
    s.k = k;
    s.n = n;
    s.index = i + 1;
    s.quorum_id = id;
    s.value = SecretBytes(size);
    gfshare_ctx_enc_getshare(ctx.get(), static_cast<unsigned char>(i), s.value.data());
  }
  if (g_rand_failed)
    return make_error(ErrorCode::kCrypto,
                      "the random generator failed while splitting; nothing was written");
  std::vector<std::array<std::uint8_t, 32>> digests(n);
  for (unsigned i = 0; i < n; ++i) digests[i] = share_digest(id, i + 1, shares[i].value.span());
  for (auto& s : shares) s.digests = digests;
  return shares;
}

Result<SecretBytes> combine_shares(std::span<const Share> shares) {
  if (shares.empty()) return make_error(ErrorCode::kInvalidArgument, "no shares to combine");
  const Share& first = shares.front();
  if (shares.size() < first.k)
    return make_error(ErrorCode::kFailedPrecondition,
                      std::to_string(shares.size()) + " of " + std::to_string(first.k) +
                          " shares: nothing can be rebuilt before the k-th");
  std::vector<std::uint8_t> xs;
  for (const Share& s : shares) {
    if (s.quorum_id != first.quorum_id || s.k != first.k || s.n != first.n ||
        s.value.size() != first.value.size() || s.digests != first.digests)
      return make_error(ErrorCode::kInvalidArgument, "the shares belong to different quorums");
    if (!s.digest_matches())
      return make_error(ErrorCode::kInvalidArgument,
                        "share " + std::to_string(s.index) + " does not match its digest");
    if (std::find(xs.begin(), xs.end(), s.index) != xs.end())
      return make_error(ErrorCode::kAlreadyExists,
                        "share " + std::to_string(s.index) + " was given twice");
    xs.push_back(static_cast<std::uint8_t>(s.index));
    if (xs.size() == first.k) break;
  }
  install_rand();
  const auto size = static_cast<unsigned>(first.value.size());
  CtxPtr ctx(gfshare_ctx_init_dec(xs.data(), static_cast<unsigned>(xs.size()), size));
  if (!ctx) return make_error(ErrorCode::kInternal, "libgfshare refused to set up the combination");
  for (std::size_t i = 0; i < xs.size(); ++i) {
    SecretBytes v = shares[i].value.clone();
    gfshare_ctx_dec_giveshare(ctx.get(), static_cast<unsigned char>(i), v.data());
  }
  SecretBytes out(size);
  gfshare_ctx_dec_extract(ctx.get(), out.data());
  return out;
}

std::string QuorumProgress::text() const {
  std::string s = std::to_string(held()) + " of " + std::to_string(k) + " shares";
  s += " (quorum " + quorum_id.substr(0, 8) + ", " + std::to_string(k) + " of " +
       std::to_string(n) + "; shares held:";
  for (unsigned i : indexes) s += " " + std::to_string(i);
  return s + ")";
}

Result<QuorumProgress> ShareCollector::add(std::span<const std::uint8_t> blob,
                                           Clock::time_point now) {
  expire(now);
  KMSD_ASSIGN_OR_RETURN(Share s, parse_share(blob));
  if (!shares_.empty()) {
    const Share& first = shares_.front();
    if (s.quorum_id != first.quorum_id)
      return make_error(ErrorCode::kInvalidArgument,
                        "this card holds share " + std::to_string(s.index) + " of quorum " +
                            s.quorum_id_hex().substr(0, 8) +
                            ", but the shares presented so "
                            "far belong to quorum " +
                            first.quorum_id_hex().substr(0, 8) +
                            "; it was refused. Present a card of the same quorum, or "
                            "`kmsctl unseal --cancel` to start over");
    if (s.k != first.k || s.n != first.n || s.digests != first.digests ||
        s.value.size() != first.value.size())
      return make_error(ErrorCode::kInvalidArgument,
                        "share " + std::to_string(s.index) + " claims quorum " +
                            s.quorum_id_hex().substr(0, 8) +
                            " but does not match the shares presented so far (damaged or "
                            "forged); it was refused");
    for (const Share& h : shares_)
      if (h.index == s.index)
        return make_error(ErrorCode::kAlreadyExists,
                          "share " + std::to_string(s.index) + " of quorum " +
                              s.quorum_id_hex().substr(0, 8) +
                              " was already presented; present a different operator's card");
  } else {
    started_ = now;
  }
  shares_.push_back(std::move(s));
  std::sort(shares_.begin(), shares_.end(),
            [](const Share& a, const Share& b) { return a.index < b.index; });
  return *progress(now);
}

Result<SecretBytes> ShareCollector::take_secret() {
  auto r = combine_shares(shares_);
  if (r.ok() || r.error().code != ErrorCode::kFailedPrecondition) clear();
  return r;
}

std::optional<QuorumProgress> ShareCollector::progress(Clock::time_point now) const {
  if (shares_.empty()) return std::nullopt;
  QuorumProgress p;
  p.quorum_id = shares_.front().quorum_id_hex();
  p.k = shares_.front().k;
  p.n = shares_.front().n;
  for (const Share& s : shares_) p.indexes.push_back(s.index);
  auto left = std::chrono::duration_cast<std::chrono::seconds>(started_ + ttl_ - now);
  p.expires_in = std::max(left, std::chrono::seconds(0));
  return p;
}

bool ShareCollector::expire(Clock::time_point now) {
  if (shares_.empty() || now < started_ + ttl_) return false;
  return clear();
}

bool ShareCollector::clear() {
  const bool had = !shares_.empty();
  shares_.clear();  // SecretBytes wipe the share values
  return had;
}

}  // namespace kmsd::startup

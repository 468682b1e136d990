#include "daemon/dr/pack.hpp"

#include <fcntl.h>
#include <openssl/rand.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <ctime>

#include "common/files.hpp"
#include "daemon/dr/manifest.hpp"

namespace kmsd::dr {

namespace fs = std::filesystem;

namespace {

using files::io_error;

// A pack name as the manifest gives it must be a plain file name in packs/.
bool plain_name(const std::string& name) {
  return !name.empty() && name.find('/') == std::string::npos && name != "." && name != "..";
}

}  // namespace

fs::path packs_dir(const fs::path& staging) {
  return staging / "packs";
}

std::string new_run_id() {
  char when[32] = {};
  const std::time_t now = std::time(nullptr);
  std::tm utc{};
  ::gmtime_r(&now, &utc);
  std::strftime(when, sizeof when, "%Y%m%dT%H%M%SZ", &utc);
  std::uint8_t random[4] = {};
  if (RAND_bytes(random, sizeof random) != 1) {
    // Still unique enough with the process id: the O_EXCL create refuses a clash anyway.
    const auto pid = static_cast<std::uint32_t>(::getpid());
    std::memcpy(random, &pid, sizeof random);
  }
  return std::string(when) + "-" + ossl::hex(random);
}

PackWriter::PackWriter(fs::path dir, std::string name)
    : dir_(std::move(dir)), name_(std::move(name)) {}

PackWriter::~PackWriter() = default;

Status PackWriter::create() {
  const fs::path path = dir_ / name_;
  UniqueFd fd(
      ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0600));
  if (!fd.valid()) return io_error(path, "cannot create the pack", errno);
  // The pack's directory entry is durable before any row names it.
  KMSD_TRY(files::sync_dir(dir_));
  owned_ = std::move(fd);
  fd_.store(owned_.get(), std::memory_order_release);
  return {};
}

Result<std::uint64_t> PackWriter::append(std::string_view bytes) {
  if (!owned_.valid()) KMSD_TRY(create());
  const std::uint64_t offset = size_;
  for (std::size_t done = 0; done < bytes.size();) {
    const ssize_t n = ::write(owned_.get(), bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      size_ += done;  // the part written is dead space
      dirty_.store(true, std::memory_order_release);
      return io_error(dir_ / name_, "cannot append to the pack", err);
    }
    done += static_cast<std::size_t>(n);
  }
  size_ += bytes.size();
  dirty_.store(true, std::memory_order_release);
  return offset;
}

Status PackWriter::sync() {
  const int fd = fd_.load(std::memory_order_acquire);
  if (fd < 0 || !dirty_.exchange(false, std::memory_order_acq_rel)) return {};
  if (::fdatasync(fd) != 0) {
    const int err = errno;
    dirty_.store(true, std::memory_order_release);
    return io_error(dir_ / name_, "cannot sync the pack", err);
  }
  return {};
}

PackReader::PackReader(fs::path staging) : dir_(packs_dir(staging)) {}

Result<std::shared_ptr<const UniqueFd>> PackReader::fd_of(const std::string& pack) {
  std::lock_guard lock(mu_);
  auto it = fds_.find(pack);
  if (it != fds_.end()) return it->second;
  if (!plain_name(pack))
    return make_error(ErrorCode::kInvalidArgument,
                      "the manifest names the pack '" + pack + "', which is not a file name");
  const fs::path path = dir_ / pack;
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  if (!fd.valid()) return io_error(path, "cannot open the pack", errno);
  if (fds_.size() >= kOpenPacks) fds_.clear();  // closed as their readers finish
  auto shared = std::make_shared<const UniqueFd>(std::move(fd));
  fds_.emplace(pack, shared);
  return shared;
}

Result<ossl::Bytes> PackReader::read(const ManifestRow& row) {
  const StagedCopy& c = row.copy;
  const std::string where = "packs/" + c.pack + " at offset " + std::to_string(c.offset) + " (" +
                            std::to_string(c.length) + " bytes)";
  KMSD_ASSIGN_OR_RETURN(const auto pack, fd_of(c.pack));
  const int fd = pack->get();
  ossl::Bytes out(c.length);
  for (std::size_t done = 0; done < out.size();) {
    const ssize_t n =
        ::pread(fd, out.data() + done, out.size() - done, static_cast<off_t>(c.offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return io_error(dir_ / c.pack, "cannot read " + where + " from", errno);
    if (n == 0)
      return make_error(ErrorCode::kCrypto, "the staged copy of " + row.path + " in " + where +
                                                " is damaged: the pack ends " +
                                                std::to_string(done) + " bytes into it");
    done += static_cast<std::size_t>(n);
  }
  const std::string digest = ossl::hex(ossl::sha256(out));
  if (digest != c.sha256)
    return make_error(ErrorCode::kCrypto,
                      "the staged copy of " + row.path + " in " + where +
                          " is damaged: its SHA-256 is " + digest + ", the manifest recorded " +
                          c.sha256 +
                          ". Restore the pack from a backup of the staging directory, or stage "
                          "the message again into a new staging directory");
  return out;
}

}  // namespace kmsd::dr

// Disaster recovery staging packs: predecrypt appends every staged message (encrypted to the
// custody certificate only) to an append-only pack file in <staging>/packs/, one pack per worker
// per run, instead of creating one file per message. On this kind of machine creating a file
// costs about as much kernel CPU as the message's private-key operation; appending costs one
// write().
//
// A staged record is, for a MIME message, the message's own header lines (From, To, Subject...;
// not the MIME ones) followed by the DER CMS ContentInfo; for a DER message, the DER only. The
// manifest row names the pack, the record's offset and length, how many of its bytes are
// headers, and the record's SHA-256 (StagedCopy).
//
// Crash order (see manifest.hpp): the record is appended, the pack is fdatasync'd by the
// collector, and only then is the row naming it committed. Bytes without a row (a kill between
// append and commit) are dead space: the message is staged again, into the next run's pack.
// A pack's name holds its run's id, so no run ever appends to a pack an earlier run may have
// left half-written.
#pragma once

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>

#include "common/fd.hpp"
#include "common/ossl.hpp"
#include "common/result.hpp"

namespace kmsd::dr {

struct ManifestRow;

// The directory of the packs inside a staging directory.
std::filesystem::path packs_dir(const std::filesystem::path& staging);

// A fresh run id: UTC time and 32 random bits, "20261202T051233Z-1a2b3c4d".
std::string new_run_id();

// Where a staged message's bytes are (the manifest's columns of a staged row).
struct StagedCopy {
  std::string pack;                 // file name under packs/
  std::uint64_t offset = 0;         // of the record in the pack
  std::uint64_t length = 0;         // of the record
  std::uint64_t header_length = 0;  // leading bytes of the record that are header lines (mime)
  bool crlf = false;                // the original's header block used CRLF line ends (mime)
  std::string sha256;               // hex, of the record's bytes
};

// One pack being written: created (O_EXCL, mode 0600) on the first append.
// Thread-safety: append() from one thread at a time (the worker that owns the pack); sync() may
// run at the same time from another thread (the collector).
class PackWriter {
 public:
  PackWriter(std::filesystem::path dir, std::string name);
  ~PackWriter();
  PackWriter(const PackWriter&) = delete;
  PackWriter& operator=(const PackWriter&) = delete;

  // Appends BYTES with one write(); the record's offset. On an error the pack may hold part of
  // the record: dead space, since no row will name it.
  Result<std::uint64_t> append(std::string_view bytes);
  // Makes everything appended so far durable (fdatasync), if anything was appended since.
  Status sync();
  const std::string& name() const noexcept { return name_; }

 private:
  Status create();
  std::filesystem::path dir_;
  std::string name_;
  UniqueFd owned_;           // touched by the appending thread only
  std::atomic<int> fd_{-1};  // published for sync()
  std::atomic<bool> dirty_{false};
  std::uint64_t size_ = 0;
};

// Reads staged records back by pread, checking each against its SHA-256. Keeps up to
// kOpenPacks packs open (a staging directory resumed many times has many packs).
// Thread-safety: safe to share (pack descriptors are opened under a mutex and shared with the
// readers using them; reads are pread).
class PackReader {
 public:
  explicit PackReader(std::filesystem::path staging);
  // The record of ROW (a staged row). Errors name the pack and the offset: a missing or short
  // pack, or bytes whose SHA-256 is not the one recorded (kCrypto).
  Result<ossl::Bytes> read(const ManifestRow& row);

 private:
  static constexpr std::size_t kOpenPacks = 64;
  Result<std::shared_ptr<const UniqueFd>> fd_of(const std::string& pack);
  std::filesystem::path dir_;
  std::mutex mu_;
  std::map<std::string, std::shared_ptr<const UniqueFd>> fds_;
};

}  // namespace kmsd::dr

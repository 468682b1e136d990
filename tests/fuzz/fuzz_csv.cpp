// The bulk-enable CSV: common/csv's RFC 4180 reader and kmsctl's input parser (cli/bulk_file)
// on any bytes. Every well-formed record, written back with format_record(), must read back as
// the same fields.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "cli/bulk_file.hpp"
#include "common/csv.hpp"

namespace {

void round_trip(const kmsd::csv::Record& r) {
  const std::string text = kmsd::csv::format_record(r.fields);
  kmsd::csv::Reader again(text);
  kmsd::csv::Record back;
  if (!again.next(back) || back.malformed() || back.fields != r.fields) __builtin_trap();
  if (again.next(back)) __builtin_trap();  // one record in, one record out
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  kmsd::csv::Reader reader(text);
  kmsd::csv::Record r;
  std::size_t last_end = 0;
  while (reader.next(r)) {
    if (r.end < r.begin || r.end > size || r.begin < last_end) __builtin_trap();
    if (r.end == last_end && r.end < size) __builtin_trap();  // no progress: would loop forever
    last_end = r.end;
    if (!r.malformed()) round_trip(r);
  }
  auto input = kmsd::cli::bulk::parse_input(text);
  if (input.ok())
    for (const auto& e : input->entries)
      if (!e.user && e.problem.empty()) __builtin_trap();  // a refused line says why
  (void)kmsd::cli::bulk::job_id(text);
  return 0;
}

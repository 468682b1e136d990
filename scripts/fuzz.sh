#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz, docs/fuzz.md) with clang into build-fuzz and runs
# each for SECONDS (default 300) on a copy of its seed corpus, one after the other, then prints
# execs/s, coverage (cov: edges, ft: features) and the corpus size each reached.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     targets: cmp csr rest_json http csv config smime
#
# Environment: FUZZ_BUILD_DIR (default ./build-fuzz), FUZZ_JOBS (build parallelism, default
# nproc), FUZZ_NICE (niceness of the runs, default 10), FUZZ_SKIP_BUILD=1 (run what is built). A crash leaves its input in
# FUZZ_BUILD_DIR/fuzz-work/TARGET/artifacts/; copy it to tests/fuzz/regressions/TARGET/ once
# fixed. Exit status 1 when any target crashed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${FUZZ_BUILD_DIR:-$root/build-fuzz}
jobs=${FUZZ_JOBS:-$(nproc)}
niceness=${FUZZ_NICE:-10}
all_targets=(cmp csr rest_json http csv config smime)

seconds=300
if [ $# -gt 0 ] && [[ $1 =~ ^[0-9]+$ ]]; then
  seconds=$1
  shift
fi
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=("${all_targets[@]}")
for t in "${targets[@]}"; do
  [[ " ${all_targets[*]} " == *" $t "* ]] || {
    echo "fuzz.sh: no target '$t'; the targets are: ${all_targets[*]}" >&2
    exit 2
  }
done

# clang and libFuzzer are needed here only, not by the build or CI (scripts/install-deps.sh).
missing=()
command -v clang++-14 >/dev/null || missing+=(clang-14)
dpkg -s libclang-rt-14-dev >/dev/null 2>&1 || missing+=(libclang-rt-14-dev)
if [ ${#missing[@]} -gt 0 ]; then
  echo "fuzz.sh: installing ${missing[*]}" >&2
  sudo=()
  [ "$(id -u)" -ne 0 ] && sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The rest of kmsd's dependencies (headers, SoftHSM2) come from the usual script.
"$root/scripts/install-deps.sh"

if [ ! -f "$build/CMakeCache.txt" ]; then
  launcher=()
  command -v ccache >/dev/null &&
    launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache)
  # -O1 and line tables only: the usual fuzzing build, and much quicker to compile.
  CC=clang-14 CXX=clang++-14 cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=None \
    "-DCMAKE_CXX_FLAGS=-O1 -gline-tables-only" "-DCMAKE_C_FLAGS=-O1 -gline-tables-only" \
    -DKMSD_FUZZ=ON -DKMSD_BUILD_TESTS=OFF "${launcher[@]}" >/dev/null
fi
[ "${FUZZ_SKIP_BUILD:-0}" = 1 ] || cmake --build "$build" -j"$jobs" --target "${targets[@]/#/fuzz_}"

work=$build/fuzz-work
summary=$work/summary.txt
mkdir -p "$work"
crashed=0
printf '%-10s %6s %10s %9s %7s %7s %7s %7s\n' target seconds execs execs/s cov ft corpus crashes \
  >"$summary"
for t in "${targets[@]}"; do
  dir=$work/$t
  rm -rf "$dir"
  mkdir -p "$dir/corpus" "$dir/artifacts" "$dir/tmp"
  cp "$root/tests/fuzz/corpus/$t/"* "$dir/corpus/" 2>/dev/null || true
  echo "== fuzz_$t: $seconds s on $(ls "$dir/corpus" | wc -l) seed(s)" >&2
  status=0
  # Each target's scratch files (the SoftHSM token, the store) live in its own TMPDIR.
  TMPDIR=$dir/tmp nice -n "$niceness" "$build/tests/fuzz/fuzz_$t" "$dir/corpus" \
    -max_total_time="$seconds" -print_final_stats=1 -timeout=30 -rss_limit_mb=4096 \
    -artifact_prefix="$dir/artifacts/" >"$dir/log" 2>&1 || status=$?
  rm -rf "$dir/tmp"
  last=$(grep -E '^#[0-9]+.*cov: ' "$dir/log" | tail -1 || true)
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$dir/log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$dir/log" | tail -1)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  crashes=$(find "$dir/artifacts" -type f | wc -l)
  if [ "$status" -ne 0 ] || [ "$crashes" -gt 0 ]; then
    crashed=1
    echo "fuzz_$t: FAILED (exit $status); log $dir/log, inputs in $dir/artifacts/" >&2
    grep -m1 -E 'ERROR: |runtime error|deadly signal|uncaught exception' "$dir/log" >&2 || true
  fi
  printf '%-10s %6s %10s %9s %7s %7s %7s %7s\n' "$t" "$seconds" "${execs:-?}" "${rate:-?}" \
    "${cov:-?}" "${ft:-?}" "$(ls "$dir/corpus" | wc -l)" "$crashes" >>"$summary"
done
cat "$summary"
exit $crashed

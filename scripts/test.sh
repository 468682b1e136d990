#!/usr/bin/env bash
# Installs what is missing, builds, and runs the whole test suite with ctest.
#
#   KMSD_SANITIZE_TESTS=1 scripts/test.sh    # then the core modules' unit tests again under
#                                            # AddressSanitizer + UBSan
# The sanitizer stage is off by default: on a clean 2-core machine it takes the run past the
# 15-minute CI budget (the normal build alone takes about 11 minutes).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/install-deps.sh"
build=${BUILD_DIR:-$root/build}
BUILD_DIR=$build "$root/scripts/build.sh"
(cd "$build" && ctest --output-on-failure -j"$(nproc)" --timeout 600)

if [ "${KMSD_SANITIZE_TESTS:-0}" = 1 ]; then
  # The modules that parse, seal and store (no daemon process: the end-to-end tests run the
  # normal build). -O1 without debug information keeps this stage within the CI budget.
  targets=(common_test hsm_test config_test store_test lifecycle_test policy_test)
  asan=${ASAN_BUILD_DIR:-$root/build-asan-ci}
  echo "test.sh: unit tests under AddressSanitizer + UBSan (${targets[*]})" >&2
  generator=()
  command -v ninja >/dev/null && generator=(-G Ninja)
  [ -f "$asan/CMakeCache.txt" ] ||
    cmake -S "$root" -B "$asan" "${generator[@]}" -DKMSD_SANITIZE=ON -DCMAKE_BUILD_TYPE=None \
      -DCMAKE_CXX_FLAGS=-O1 -DCMAKE_C_FLAGS=-O1 >/dev/null
  cmake --build "$asan" -j"$(nproc)" --target "${targets[@]}"
  regex="^($(IFS='|'; echo "${targets[*]}"))\\."
  (cd "$asan" && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --output-on-failure -j"$(nproc)" --timeout 600 -R "$regex")
fi

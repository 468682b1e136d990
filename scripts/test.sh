#!/usr/bin/env bash
# Installs what is missing, builds, and runs the whole test suite with ctest. The unit tests of
# the modules that hold secrets and C handles (common, hsm and its envelope rotation, store,
# lifecycle, the CA and its PKCS#12 export, kmsctl's bulk-file parser) run built with
# AddressSanitizer + UBSan instead of in the normal build.
#
#   KMSD_SANITIZE_TESTS=0 scripts/test.sh    # those unit tests in the normal build instead
#
# The sanitizer build (unity, -O1, only those tests and the libraries under them: about 150 s of
# compiler CPU) runs at low priority while the main suite runs (the suite mostly waits on kmsd,
# SoftHSM and the stock clients); the normal build leaves those test programs out
# (KMSD_SANITIZED_ONLY), so the stage costs little more than building and running them normally
# would. The parsers (CMP, CSR, JSON, HTTP, CSV, TOML, S/MIME) run under the same sanitizers in
# the fuzz targets (scripts/fuzz.sh).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/install-deps.sh"
build=${BUILD_DIR:-$root/build}
sanitize=${KMSD_SANITIZE_TESTS:-1}
targets=(common_test hsm_test rotation_envelope_test store_test lifecycle_test ca_test cli_test)
sanitized_only=
[ "$sanitize" = 1 ] && sanitized_only=$(IFS=';'; echo "${targets[*]}")
BUILD_DIR=$build "$root/scripts/build.sh" -DKMSD_SANITIZED_ONLY="$sanitized_only"

asan=${ASAN_BUILD_DIR:-$root/build-asan-ci}
asan_pid=
if [ "$sanitize" = 1 ]; then
  generator=()
  command -v ninja >/dev/null && generator=(-G Ninja)
  [ -f "$asan/CMakeCache.txt" ] ||
    cmake -S "$root" -B "$asan" "${generator[@]}" -DKMSD_SANITIZE=ON -DCMAKE_BUILD_TYPE=None \
      -DCMAKE_UNITY_BUILD=ON \
      -DCMAKE_CXX_FLAGS=-O1 -DCMAKE_C_FLAGS=-O1 >/dev/null
  echo "test.sh: building ${targets[*]} with AddressSanitizer + UBSan in the background" >&2
  # Its own process group, so that it can be stopped as a whole.
  setsid nice -n 19 cmake --build "$asan" -j"$(nproc)" --target "${targets[@]}" >"$asan/sanitizer-build.log" 2>&1 &
  asan_pid=$!
fi
# Never leave the background build behind (a failed suite, ^C).
trap '[ -n "$asan_pid" ] && kill -- "-$asan_pid" 2>/dev/null; true' EXIT

suite=0
(cd "$build" && ctest --output-on-failure -j"$(nproc)" --timeout 600) || suite=$?

if [ "$sanitize" = 1 ]; then
  if ! wait "$asan_pid"; then
    asan_pid=
    tail -n 50 "$asan/sanitizer-build.log" >&2
    echo "test.sh: the AddressSanitizer build failed (whole log: $asan/sanitizer-build.log)" >&2
    exit 1
  fi
  asan_pid=
  echo "test.sh: unit tests under AddressSanitizer + UBSan (${targets[*]})" >&2
  regex="^($(IFS='|'; echo "${targets[*]}"))\\."
  (cd "$asan" && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --output-on-failure -j"$(nproc)" --timeout 600 -R "$regex") || suite=1
fi
exit "$suite"

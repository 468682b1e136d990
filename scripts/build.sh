#!/usr/bin/env bash
# Configures and builds kmsd into BUILD_DIR (default ./build). Extra arguments go to cmake.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-$root/build}
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
# Release at -O2 without debug information by default: the build is most of the CI budget, and
# debug information multiplies the link time of the ~50 test executables. For gdb:
# KMSD_BUILD_TYPE=RelWithDebInfo scripts/build.sh (a new build directory).
# A unity build (each target's sources compiled a few at a time as one file) parses the heavy
# headers (Boost.Beast, CLI11, nlohmann-json, toml++) once per target instead of once per file.
type=${KMSD_BUILD_TYPE:-Release}
if [ ! -f "$build/CMakeCache.txt" ]; then
  cmake -S "$root" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE="$type" -DCMAKE_UNITY_BUILD=ON \
    -DCMAKE_CXX_FLAGS_RELEASE="-O2 -DNDEBUG" -DCMAKE_C_FLAGS_RELEASE="-O2 -DNDEBUG" "$@" >/dev/null
elif [ "$#" -gt 0 ]; then
  cmake -S "$root" -B "$build" "$@" >/dev/null
fi
cmake --build "$build" -j"$(nproc)"

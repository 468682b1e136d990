#!/usr/bin/env bash
# Installs the Debian 12 packages kmsd needs to build, test and run — only those missing.
# Shared by scripts/run.sh and scripts/test.sh.
set -euo pipefail

PACKAGES=(
  build-essential cmake pkg-config
  libssl-dev openssl
  libp11-kit-dev
  softhsm2 opensc
  libengine-pkcs11-openssl
  libboost-dev
  libsqlite3-dev sqlite3
  libtomlplusplus-dev libcli11-dev nlohmann-json3-dev libspdlog-dev libfmt-dev
  libgtest-dev libgmock-dev
  libgfshare-dev
  libsystemd-dev systemd
  curl
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi

echo "install-deps: installing ${missing[*]}" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then SUDO=sudo; else
    echo "install-deps: need root (or sudo) to install: ${missing[*]}" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

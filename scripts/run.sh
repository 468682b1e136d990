#!/usr/bin/env bash
# Installs what is missing, builds, creates a DEVELOPMENT token and config under ./var/ on
# first run, and starts kmsd in the foreground on localhost.
#
#   KMSD_PUBLIC_PORT (default 8080) and KMSD_ADMIN_PORT (default 8443) choose the ports on
#   the first run; afterwards edit var/kmsd.toml.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/install-deps.sh"
BUILD_DIR=${BUILD_DIR:-$root/build} "$root/scripts/build.sh"
bin=${BUILD_DIR:-$root/build}

var="$root/var"
conf="$var/kmsd.toml"
export SOFTHSM2_CONF="$var/softhsm2.conf"
public_port=${KMSD_PUBLIC_PORT:-8080}
admin_port=${KMSD_ADMIN_PORT:-8443}

banner() {
  printf '%s\n' "==================================================================" \
    "$@" "==================================================================" >&2
}

# Each first-run step is guarded by its own result, so an interrupted first run resumes.
umask 077
mkdir -p "$var/tokens"
if [ ! -f "$SOFTHSM2_CONF" ]; then
  sed "s|@TOKEN_DIR@|$var/tokens|" "$root/config/softhsm2.conf.in" >"$SOFTHSM2_CONF"
fi
if [ ! -f "$var/startup.secret" ]; then
  # Development secrets: random, in 0600 files. A production KMS keeps the startup secret on
  # operator cards, never in a file.
  openssl rand -hex 16 >"$var/so-pin.secret"
  openssl rand -hex 16 >"$var/admin-p12.pass"
  openssl rand -hex 16 >"$var/startup.secret.new"
  chmod 600 "$var"/*.secret "$var/startup.secret.new" "$var/admin-p12.pass"
  softhsm2-util --init-token --free --label kmsd-dev \
    --pin "$(cat "$var/startup.secret.new")" --so-pin "$(cat "$var/so-pin.secret")" >/dev/null
  mv "$var/startup.secret.new" "$var/startup.secret"
fi
if [ ! -f "$conf" ]; then
  cat >"$conf" <<TOML
# Development configuration written by scripts/run.sh. See config/kmsd.toml for every key.
[server]
public_listen = "127.0.0.1:$public_port"
admin_listen = "127.0.0.1:$admin_port"
tls_names = ["localhost", "127.0.0.1"]
unseal_socket = "$var/unseal.sock"

[token]
module = "/usr/lib/softhsm/libsofthsm2.so"
uri = "pkcs11:token=kmsd-dev"
# SoftHSM2 2.6.1 keeps every session object until C_Finalize, so AES-KEY-WRAP-PAD (which
# needs one per wrapped data key) grows the daemon; AES-GCM wraps without session objects.
wrap_mechanism = "aes-gcm"

[ca]
key_type = "ec-p256"
subject = "/O=kmsd development/CN=kmsd dev CA"

[store]
path = "$var/kmsd.db"

[startup]
# DEVELOPMENT ONLY: the token PIN in a 0600 file.
source = "file"
file = "$var/startup.secret"

[log]
level = "info"
TOML
fi
if [ ! -f "$var/admin.p12" ]; then
  "$bin/cli/kmsctl" init --config "$conf" --admin admin --admin-p12 "$var/admin.p12" \
    --passphrase-file "$var/admin-p12.pass"
  banner "DEVELOPMENT SETUP created under $var" \
    "  SoftHSM token 'kmsd-dev' in $var/tokens (SOFTHSM2_CONF=$SOFTHSM2_CONF)" \
    "  startup secret (token user PIN) in $var/startup.secret  <-- development only:" \
    "  a production KMS keeps it on operator smart cards, never in a file." \
    "  first administrator: $var/admin.p12 (passphrase in $var/admin-p12.pass)"
fi

pub=$(sed -n 's/^public_listen = "\(.*\)"/\1/p' "$conf")
adm=$(sed -n 's/^admin_listen = "\(.*\)"/\1/p' "$conf")
banner "kmsd (development) — config $conf" \
  "  public:  curl -s http://$pub/ca.pem | openssl x509 -noout -text" \
  "           curl -s http://$pub/readyz" \
  "  admin:   curl -s http://$pub/ca.pem > $var/ca.pem" \
  "           curl --cacert $var/ca.pem --cert-type P12 --cert $var/admin.p12:\$(cat $var/admin-p12.pass) https://$adm/v1/whoami" \
  "  status:  $bin/cli/kmsctl status --config $conf" \
  "  logs:    this terminal (stderr); stop with Ctrl-C"
exec "$bin/daemon/kmsd" --config "$conf"

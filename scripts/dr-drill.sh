#!/usr/bin/env bash
# A complete disaster-recovery drill on generated data, for anyone who wants to see it work:
#   1. a "production" kmsd on a scratch SoftHSM token with USERS users, enabled in bulk and
#      enrolled through the real API (kmsctl enroll); every other user renews, so it has a past
#      encryption key too. Each user's PKCS#12 files go to keys/ (the SECTOOL key source);
#   2. a Maildir of messages made by `openssl smime -encrypt` and `openssl cms -encrypt` to the
#      users' current and past encryption certificates, plus plain, damaged and foreign ones;
#   3. kmsd is stopped, and `kmsctl dr drill` runs the whole recovery against copies of the
#      store and the database and a scratch token of its own: prepare, predecrypt, reinstall,
#      every user re-enrolled with the token reinstall issued, reencrypt, then it checks every
#      message byte for byte under the new keys and checksums production before and after;
#   4. the script greps every file the drill left (--keep) for plaintext.
# The report (drill.md, drill.json, drill.html) is written to the directory printed at the end.
# Usage: scripts/dr-drill.sh [--users N] [--per-key N] [--keep]
#        (BUILD_DIR=build by default; kmsd and kmsctl must be built: scripts/build.sh)
set -euo pipefail

users=5
per_key=4
keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --users) users=$2; shift 2 ;;
    --per-key) per_key=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    *) echo "usage: $0 [--users N] [--per-key N] [--keep]" >&2; exit 2 ;;
  esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/${BUILD_DIR:-build}
kmsctl=${KMSCTL:-$bin/cli/kmsctl}
kmsd=${KMSD:-$bin/daemon/kmsd}
for b in "$kmsctl" "$kmsd"; do
  [ -x "$b" ] || { echo "dr-drill: $b not built; run scripts/build.sh" >&2; exit 2; }
done
module=${SOFTHSM_MODULE:-/usr/lib/softhsm/libsofthsm2.so}

work=$(mktemp -d /tmp/kmsd-dr-drill-XXXXXX)
chmod 700 "$work"
kmsd_pid=
cleanup() {
  [ -n "$kmsd_pid" ] && kill "$kmsd_pid" 2>/dev/null && wait "$kmsd_pid" 2>/dev/null || true
  [ "$keep" = 1 ] || rm -rf "$work"
}
trap cleanup EXIT
[ "$keep" = 1 ] && echo "drill directory: $work (kept)"
cd "$work"
mkdir -p prod/tokens keys certs store/Maildir/{cur,new,tmp}

step() { printf '\n== %s\n' "$*"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

step "production kmsd on a scratch SoftHSM token"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' \
  "$work/prod/tokens" > prod/softhsm2.conf
export SOFTHSM2_CONF=$work/prod/softhsm2.conf
openssl rand -hex 12 | tr -d '\n' > prod/pin && chmod 600 prod/pin
softhsm2-util --init-token --free --label kmsd-prod --so-pin "$(openssl rand -hex 8)" \
  --pin "$(cat prod/pin)" > /dev/null
pub=$(free_port); adm=$(free_port)
write_config() {  # write_config ENCRYPTION_KEY_TYPE
cat > prod/kmsd.toml <<EOF
[server]
public_listen = "127.0.0.1:$pub"
admin_listen = "127.0.0.1:$adm"
unseal_socket = "$work/prod/unseal.sock"
[token]
module = "$module"
uri = "pkcs11:token=kmsd-prod"
[ca]
subject = "/O=Drill/CN=Production KMS CA"
[store]
path = "$work/prod/kmsd.db"
[startup]
source = "file"
file = "$work/prod/pin"
[enrollment]
encryption_key_type = "$1"
EOF
}
start_kmsd() {
  "$kmsd" --config prod/kmsd.toml >> prod/kmsd.log 2>&1 &
  kmsd_pid=$!
  for _ in $(seq 1 100); do
    curl -fs "http://127.0.0.1:$pub/readyz" > /dev/null 2>&1 && break
    sleep 0.1
  done
}
stop_kmsd() { kill "$kmsd_pid"; wait "$kmsd_pid" 2>/dev/null || true; kmsd_pid=; }
# the first half of the users get RSA-2048 encryption keys, the others (and renewals) P-256
write_config rsa-2048
printf 'admin pass %s' "$(openssl rand -hex 8)" > prod/admin.pass && chmod 600 prod/admin.pass
printf 'user pass %s' "$(openssl rand -hex 8)" > keys.pass && chmod 600 keys.pass
"$kmsctl" init --config prod/kmsd.toml --admin admin --admin-p12 prod/admin.p12 \
  --passphrase-file prod/admin.pass > /dev/null
start_kmsd
curl -fs "http://127.0.0.1:$pub/ca.pem" -o prod/ca.pem
admin=(--server "https://localhost:$adm" --p12 prod/admin.p12 --ca prod/ca.pem
       --passphrase-file prod/admin.pass)

step "$users users enabled in bulk and enrolled through the API"
{
  echo "id,email,display_name"
  for i in $(seq 1 "$users"); do echo "user$i,user$i@example.org,User $i"; done
} > users.csv
"$kmsctl" user bulk-enable --input users.csv --out tokens.csv "${admin[@]}" > /dev/null
enc_cert() {  # the encryption certificate of a kmsctl -o json summary on stdin
  python3 -c 'import json,sys; t=sys.stdin.read(); print(json.loads(t[t.index("{"):])["encryption_certificate"], end="")'
}
user_opts=(--server "https://localhost:$adm" --ca prod/ca.pem --new-passphrase-file keys.pass -o json)
for i in $(seq 1 "$users"); do
  u=user$i
  if [ "$i" = $((users / 2 + 1)) ]; then stop_kmsd; write_config ec-p256; start_kmsd; fi
  python3 -c 'import csv,sys
for r in csv.reader(l for l in open("tokens.csv") if not l.startswith("#")):
    if r[0] == sys.argv[1]: print(r[3])' "$u" > token.txt && chmod 600 token.txt
  "$kmsctl" enroll --user "$u" --token-file token.txt --out "keys/$u.p12" "${user_opts[@]}" |
    enc_cert > "certs/$u.1.pem"
  if [ $((i % 2)) = 0 ]; then
    "$kmsctl" renew --p12 "keys/$u.p12" --passphrase-file keys.pass --out "keys/$u.2.p12" \
      "${user_opts[@]}" | enc_cert > "certs/$u.2.pem"
  fi
done
rm -f token.txt
stop_kmsd

step "messages to current and past encryption certificates, and the odd ones"
n=0
for cert in certs/*.pem; do
  for j in $(seq 1 "$per_key"); do
    n=$((n + 1))
    printf 'Content-Type: text/plain\r\n\r\nDRILL-SECRET-%06d\r\n' "$n" > body.txt
    # openssl smime (PKCS#7) has key transport only: RSA certificates; cms for every kind
    if [ $((n % 2)) = 0 ] && openssl x509 -in "$cert" -noout -text | grep -q rsaEncryption; then
      openssl smime -encrypt -binary -aes256 -in body.txt -subject "drill $n" \
        -out "store/Maildir/cur/$n.drill:2,S" "$cert"
    else
      openssl cms -encrypt -binary -aes256 -in body.txt -recip "$cert" \
        -out "store/Maildir/new/$n.drill"
    fi
  done
done
rm -f body.txt
printf 'From: a@example.org\nSubject: plain\n\nnot secret\n' > store/Maildir/cur/plain:2,S
printf 'Content-Type: application/pkcs7-mime; smime-type=enveloped-data\n\n!!garbage!!\n' \
  > store/Maildir/cur/damaged:2,S
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=stranger -keyout stranger.key \
  -out stranger.pem 2>/dev/null
printf 'Content-Type: text/plain\r\n\r\nfor a stranger\r\n' |
  openssl cms -encrypt -binary -aes256 -recip stranger.pem -out store/Maildir/new/foreign
echo "$n encrypted messages + 3 others"

step "kmsctl dr drill"
rc=0
"$kmsctl" dr drill --store store --db prod/kmsd.db --keys keys --passphrase-file keys.pass \
  --token-dir prod/tokens --report report --work drill-work --keep --no-progress || rc=$?

step "no plaintext in any file the drill wrote"
if grep -rl --binary-files=text 'DRILL-SECRET-' drill-work report > found.txt 2>/dev/null; then
  echo "PLAINTEXT FOUND IN:"; cat found.txt; rc=1
else
  echo "none found"
fi
sed -n '1,200p' report/drill.md
if [ "$keep" != 1 ]; then
  out=$(mktemp -d /tmp/kmsd-dr-drill-report-XXXXXX)
  cp report/* "$out/"
  echo "report: $out/drill.md (drill.json, drill.html)"
fi
[ "$rc" = 0 ] && echo "DRILL PASSED" || { echo "DRILL FAILED"; exit 1; }

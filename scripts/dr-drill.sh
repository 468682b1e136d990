#!/usr/bin/env bash
# A complete disaster-recovery drill on generated data, for anyone who wants to see it work:
#   1. an old CA and USERS users, each with a key history of two encryption keys (RSA-2048,
#      then EC P-256) in PKCS#12 files — the SECTOOL path, where the old token is gone;
#   2. a Maildir, an .eml tree and a .p7m tree of messages made by `openssl cms -encrypt` to
#      those keys, plus plain, damaged and foreign messages;
#   3. `kmsctl dr predecrypt`, killed with SIGKILL part way and started again (it resumes);
#   4. new certificates for all users but one (who has not enrolled yet), `kmsctl dr reencrypt`;
#      then the last user enrolls and reencrypt is run again;
#   5. checks: every message that `openssl cms -decrypt` opened with an old key opens with the
#      user's new key to the same bytes, and no plaintext is in any file of the drill.
# The custody key is made by `kmsctl dr prepare` on a scratch SoftHSM token (as in production,
# where it lives on the new key token); --p12-custody uses a PKCS#12 file instead.
# Usage: scripts/dr-drill.sh [--users N] [--per-key N] [--p12-custody] [--keep]
#        (BUILD_DIR=build by default; kmsctl must be built: scripts/build.sh)
set -euo pipefail

users=3
per_key=10
keep=0
custody_mode=token
while [ $# -gt 0 ]; do
  case "$1" in
    --users) users=$2; shift 2 ;;
    --per-key) per_key=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --p12-custody) custody_mode=p12; shift ;;
    *) echo "usage: $0 [--users N] [--per-key N] [--p12-custody] [--keep]" >&2; exit 2 ;;
  esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
kmsctl=${KMSCTL:-$root/${BUILD_DIR:-build}/cli/kmsctl}
[ -x "$kmsctl" ] || { echo "dr-drill: $kmsctl not built; run scripts/build.sh" >&2; exit 2; }

work=$(mktemp -d /tmp/kmsd-dr-drill-XXXXXX)
chmod 700 "$work"
if [ "$keep" = 1 ]; then echo "drill directory: $work (kept)"; else trap 'rm -rf "$work"' EXIT; fi
cd "$work"
mkdir -p ca keys new store/Maildir/{cur,new,tmp} store/eml store/p7m staging out recipients newkeys
pass=drill-$(openssl rand -hex 8)
printf '%s' "$pass" > keys.pass && chmod 600 keys.pass
cp keys.pass custody.pass

step() { printf '\n== %s\n' "$*"; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { print b - a }'; }
declare -A phase

step "old and new CA, custody key, $users users with two old keys each"
t0=$(now)
mkca() {  # mkca NAME CN
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
    -subj "/O=Drill/CN=$2" -keyout "ca/$1.key" -out "ca/$1.pem" 2>/dev/null
}
mkcert() {  # mkcert CA KEYFILE CN OUT [usage]
  openssl req -new -key "$2" -subj "/O=Drill/CN=$3" 2>/dev/null |
    openssl x509 -req -CA "ca/$1.pem" -CAkey "ca/$1.key" -CAcreateserial -days 30 \
      -extfile <(printf 'keyUsage=critical,%s\nsubjectKeyIdentifier=hash\n' "${5:-keyEncipherment}") \
      -out "$4" 2>/dev/null
}
mkca old "Old KMS CA"
mkca new "New KMS CA"
module=${SOFTHSM_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
if [ "$custody_mode" = token ]; then
  # The new key token (scratch SoftHSM) prepared like production: kmsctl dr prepare.
  mkdir -p hsm/tokens
  printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' \
    "$work/hsm/tokens" > hsm/softhsm2.conf
  export SOFTHSM2_CONF=$work/hsm/softhsm2.conf
  openssl rand -hex 12 | tr -d '\n' > pin && chmod 600 pin
  softhsm2-util --init-token --free --label kmsd-drill-new --so-pin "$(openssl rand -hex 8)" \
    --pin "$(cat pin)" > /dev/null
  cat > kmsd-new.toml <<EOF
[server]
public_listen = "127.0.0.1:18080"
admin_listen = "127.0.0.1:18443"
unseal_socket = "$work/unseal.sock"
[token]
module = "$module"
uri = "pkcs11:token=kmsd-drill-new"
[ca]
subject = "/O=Drill/CN=New KMS CA"
[store]
path = "$work/kmsd-new.db"
[startup]
source = "file"
file = "$work/pin"
EOF
  "$kmsctl" dr prepare --config kmsd-new.toml --admin drill --admin-p12 admin.p12 \
    --passphrase-file keys.pass --custody-cert-out custody.pem
  custody_args=(--custody-key "pkcs11:token=kmsd-drill-new;object=kms-dr-custody"
                --module "$module" --pin-file pin)
else
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:3072 -out custody.key 2>/dev/null
  mkcert new custody.key "DR custody" custody.pem
  openssl pkcs12 -export -inkey custody.key -in custody.pem -passout "file:custody.pass" \
    -out custody.p12
  rm -f custody.key
  custody_args=(--custody-key custody.p12 --custody-passphrase-file custody.pass)
fi
names=()
for i in $(seq 1 "$users"); do
  u=user$i
  names+=("$u")
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$u.1.key" 2>/dev/null
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$u.2.key" 2>/dev/null
  mkcert old "$u.1.key" "$u" "$u.1.pem"
  mkcert old "$u.2.key" "$u" "$u.2.pem" keyAgreement
  # one PKCS#12 per old key (alice.1.p12, alice.2.p12 are both alice's)
  for k in 1 2; do
    openssl pkcs12 -export -inkey "$u.$k.key" -in "$u.$k.pem" -passout "file:keys.pass" \
      -out "keys/$u.$k.p12"
  done
done
phase[setup]=$(secs "$t0" "$(now)")

step "messages: openssl cms -encrypt to every old key, in a Maildir, .eml and .p7m"
t0=$(now)
n=0
for u in "${names[@]}"; do
  for k in 1 2; do
    for j in $(seq 1 "$per_key"); do
      n=$((n + 1))
      body=$(printf 'Content-Type: text/plain\r\n\r\nDRILL-SECRET-%06d for %s key %s\r\n' "$n" "$u" "$k")
      case $((n % 3)) in
        0) out="store/Maildir/cur/$n.drill:2,S"; form=SMIME ;;
        1) out="store/eml/$n.eml"; form=SMIME ;;
        2) out="store/p7m/$n.p7m"; form=DER ;;
      esac
      printf '%s' "$body" | openssl cms -encrypt -binary -aes256 -outform "$form" \
        -from drill@example.org -to "$u@example.org" -subject "drill $n" \
        -recip "$u.$k.pem" -out "$out"
      echo "$out $u $k $form" >> expected.txt
    done
  done
done
printf 'From: a@example.org\nSubject: plain\n\nnot secret\n' > store/Maildir/new/plain.1
printf 'Content-Type: application/pkcs7-mime; smime-type=enveloped-data\n\n!!garbage!!\n' \
  > store/eml/damaged.eml
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out stranger.key 2>/dev/null
mkcert old stranger.key stranger stranger.pem
printf 'Content-Type: text/plain\r\n\r\nfor a stranger\r\n' |
  openssl cms -encrypt -binary -aes256 -recip stranger.pem -out store/eml/foreign.eml
total=$(find store -type f -not -path '*/tmp/*' | wc -l)
echo "$n encrypted + 3 others = $total messages"
phase[generate]=$(secs "$t0" "$(now)")

step "predecrypt, killed with SIGKILL after 0.5 s, then resumed"
pre=("$kmsctl" dr predecrypt --store store --staging staging --keys keys
     --passphrase-file keys.pass --custody-cert custody.pem --no-progress)
t0=$(now)
"${pre[@]}" -o json > /dev/null 2>&1 &
pid=$!
sleep 0.5
kill -9 "$pid" 2>/dev/null && echo "killed kmsctl (pid $pid)" || echo "kmsctl finished before the kill"
wait "$pid" 2>/dev/null || true
"${pre[@]}"
phase[predecrypt]=$(secs "$t0" "$(now)")

step "users enroll again (new CA, new keys); the last one has not yet"
for u in "${names[@]}"; do
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "newkeys/$u.key" 2>/dev/null
  mkcert new "newkeys/$u.key" "$u" "newkeys/$u.pem" keyAgreement
done
for u in "${names[@]:0:$((users - 1))}"; do cp "newkeys/$u.pem" recipients/; done
re=("$kmsctl" dr reencrypt --staging staging --out out --custody-cert custody.pem
    "${custody_args[@]}" --recipients recipients --no-progress)
t0=$(now)
"${re[@]}"
step "the last user enrolls: reencrypt again"
cp "newkeys/${names[-1]}.pem" recipients/
"${re[@]}"
phase[reencrypt]=$(secs "$t0" "$(now)")

step "verify: every message opens with the new key to the bytes the old key gave"
t0=$(now)
ok=0
bad=0
while read -r path u k form; do
  rel=${path#store/}
  old=$(openssl cms -decrypt -binary -inform "$form" -in "$path" -recip "$u.$k.pem" \
    -inkey "$u.$k.key" | sha256sum)
  new=$(openssl cms -decrypt -binary -inform "$form" -in "out/$rel" -recip "newkeys/$u.pem" \
    -inkey "newkeys/$u.key" | sha256sum)
  if [ "$old" = "$new" ]; then ok=$((ok + 1)); else bad=$((bad + 1)); echo "DIFFERS: $rel"; fi
done < expected.txt
if grep -rl --binary-files=text 'DRILL-SECRET-' . > found.txt 2>/dev/null; then
  echo "PLAINTEXT FOUND IN:"; cat found.txt; bad=$((bad + 1))
fi
phase[verify]=$(secs "$t0" "$(now)")

step "report"
"$kmsctl" dr status --staging staging
for p in setup generate predecrypt reencrypt verify; do printf '%-11s %6.2f s\n' "$p" "${phase[$p]}"; done
echo "identical after re-encryption: $ok of $n; differing or plaintext found: $bad"
[ "$bad" = 0 ] && [ "$ok" = "$n" ] && echo "DRILL PASSED" || { echo "DRILL FAILED"; exit 1; }

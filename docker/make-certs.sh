#!/usr/bin/env bash
# Make the federation's TLS material with openssl (and, for the one-machine demo, node keys).
#
#   docker/make-certs.sh [--out DIR] [--host NAME_OR_IP]... [--days N] [--sites N]
#
# Writes, into DIR (default docker/local/certs):
#   ca.crt            the federation's CA certificate: give it to every site and operator
#   ca.key            the CA's private key: keep it offline, it signs SuperLink certificates
#   superlink.crt/key the SuperLink's certificate and key, valid for: superlink (the compose
#                     service name), localhost, 127.0.0.1 and every --host you add (the
#                     name or IP the sites will dial)
#   superexec.secret  shared secret of the SuperLink and the ServerApp runner (SuperExec auth)
# and with --sites N, for the demo only, DIR/../site-i/node.key(.pub) for i = 1..N: EC P-384
# key pairs in OpenSSH format, and DIR/../site-i/superexec.secret, the secret that site's
# SuperNode and its warm worker share (it never leaves the site). A real site makes its own
# pair and secret, keeps the private key and sends only node.key.pub to the SuperLink operator:
#   ssh-keygen -t ecdsa -b 384 -N "" -C site-name -f node.key
#   openssl rand -hex 32 | tr -d '\n' > superexec.secret
#
# Keys are written 0600. The containers run as uid 49999; the README says how to let them read.
set -euo pipefail

out="$(dirname "$0")/local/certs"
days=365
sites=0
hosts=(superlink localhost 127.0.0.1)
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --host) hosts+=("$2"); shift 2 ;;
    --days) days="$2"; shift 2 ;;
    --sites) sites="$2"; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "make-certs.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
command -v openssl >/dev/null || { echo "make-certs.sh needs openssl" >&2; exit 1; }

mkdir -p "$out"
umask 077
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

san=""
for h in "${hosts[@]}"; do
  if [[ "$h" =~ ^[0-9.]+$ || "$h" == *:* ]]; then san+="IP:$h,"; else san+="DNS:$h,"; fi
done
san="${san%,}"

if [ -e "$out/ca.key" ]; then
  echo "make-certs.sh: $out/ca.key exists; reusing the CA (delete it to start a new federation)" >&2
else
  openssl ecparam -name secp384r1 -genkey -noout -out "$out/ca.key"
  openssl req -x509 -new -key "$out/ca.key" -sha384 -days "$((days * 5))" \
    -subj "/O=fedgen/CN=fedgen federation CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" \
    -out "$out/ca.crt"
fi

openssl ecparam -name secp384r1 -genkey -noout -out "$out/superlink.key"
openssl req -new -key "$out/superlink.key" -subj "/O=fedgen/CN=${hosts[0]}" -out "$tmp/superlink.csr"
cat > "$tmp/ext.cnf" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyAgreement
extendedKeyUsage = serverAuth
subjectAltName = $san
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
EOF
openssl x509 -req -in "$tmp/superlink.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
  -set_serial "0x$(openssl rand -hex 16)" -days "$days" -sha384 -extfile "$tmp/ext.cnf" \
  -out "$out/superlink.crt" 2>/dev/null
openssl verify -CAfile "$out/ca.crt" "$out/superlink.crt" >/dev/null

[ -e "$out/superexec.secret" ] || openssl rand -hex 32 | tr -d '\n' > "$out/superexec.secret"
chmod 644 "$out/ca.crt" "$out/superlink.crt"

for i in $(seq 1 "$sites"); do
  dir="$out/../site-$i"
  mkdir -p "$dir"
  if [ ! -e "$dir/node.key" ]; then
    command -v ssh-keygen >/dev/null || { echo "make-certs.sh: --sites needs ssh-keygen" >&2; exit 1; }
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "site-$i" -f "$dir/node.key"
  fi
  chmod 644 "$dir/node.key.pub"
  [ -e "$dir/superexec.secret" ] || openssl rand -hex 32 | tr -d '\n' > "$dir/superexec.secret"
done

msg="make-certs.sh: wrote $out (SuperLink valid for $san, $days days)"
[ "$sites" -gt 0 ] && msg+="; node keys and worker secrets for $sites site(s) beside it"
echo "$msg" >&2

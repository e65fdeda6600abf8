#!/usr/bin/env bash
# Make the TLS and SuperNode-authentication material for the compose deployment.
#
#   bash docker/make-certs.sh [-n NUM_SUPERNODES] [--san DNS:name|IP:addr]... [--force] [OUT_DIR]
#
# OUT_DIR (default docker/certs) gets one folder per kind of container, each
# holding only what that container needs (mounted read-only at /certs):
#   ca.crt ca.key              a private CA (keep ca.key safe; it is never mounted)
#   superlink/                 -> superlink: ca.crt, server.pem, server.key; the
#                              server certificate has the SANs superlink, localhost,
#                              127.0.0.1, ::1 and every --san
#   supernodes/                -> compose clients: ca.crt and supernode-<i>.key[.pub],
#                              i = 1..N, one EC P-384 key pair per client replica
#                              (OpenSSH format, as Flower expects)
#   public/                    -> register/runner: ca.crt and
#                              registered-supernodes.pub, the public keys the
#                              SuperLink accepts, one per line. Append an edge
#                              client's .pub here, then run the `register` service.
# Existing files are kept (re-running only adds missing keys; the server
# certificate is remade only when --san/SERVER_SANS differ); --force remakes all.
# The server name edge clients dial must be among the SANs, e.g.
#   bash docker/make-certs.sh --san DNS:fl.example.org --san IP:203.0.113.7
# (or set SERVER_SANS="DNS:fl.example.org,IP:203.0.113.7").
# Needs openssl and ssh-keygen (openssh-client).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
num=${NUM_SUPERNODES:-8}
force=0
sans=()
IFS=',' read -r -a env_sans <<<"${SERVER_SANS:-}"
for s in "${env_sans[@]}"; do [ -n "$s" ] && sans+=("$s"); done
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        -n | --num-supernodes) num=$2; shift 2 ;;
        --san) sans+=("$2"); shift 2 ;;
        --force) force=1; shift ;;
        -h | --help) sed -n '2,24p' "$0"; exit 0 ;;
        -*) echo "make-certs: unknown option $1" >&2; exit 2 ;;
        *) out=$1; shift ;;
    esac
done
out=${out:-$here/certs}
days=${CERT_DAYS:-825}
for tool in openssl ssh-keygen; do
    command -v "$tool" >/dev/null || { echo "make-certs: $tool is required" >&2; exit 1; }
done
[[ "$num" =~ ^[0-9]+$ ]] || { echo "make-certs: -n needs a number" >&2; exit 2; }

umask 077
mkdir -p "$out/superlink" "$out/supernodes" "$out/public"
if [ "$force" = 1 ]; then
    rm -f "$out"/ca.* "$out"/superlink/* "$out"/supernodes/* "$out"/public/*
fi

# --- CA ---
if [ ! -s "$out/ca.key" ] || [ ! -s "$out/ca.crt" ]; then
    echo "make-certs: new CA"
    openssl req -x509 -newkey rsa:4096 -sha256 -nodes -days "$days" \
        -keyout "$out/ca.key" -out "$out/ca.crt" -subj "/CN=fl-distill CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    rm -f "$out/superlink/server.pem"   # a new CA invalidates the old server cert
fi

# --- SuperLink server certificate ---
san="DNS:superlink,DNS:localhost,IP:127.0.0.1,IP:0:0:0:0:0:0:0:1"
for s in "${sans[@]}"; do san+=",$s"; done
if [ ! -s "$out/superlink/server.pem" ] || [ ! -s "$out/superlink/server.key" ] \
    || { [ ${#sans[@]} -gt 0 ] && [ "$(cat "$out/superlink/server.sans" 2>/dev/null)" != "$san" ]; }; then
    echo "make-certs: new server certificate, SANs: $san"
    openssl req -newkey rsa:4096 -sha256 -nodes -keyout "$out/superlink/server.key" \
        -out "$out/superlink/server.csr" -subj "/CN=superlink" 2>/dev/null
    cat >"$out/superlink/server.ext" <<EXT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san
EXT
    openssl x509 -req -sha256 -days "$days" -in "$out/superlink/server.csr" \
        -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
        -extfile "$out/superlink/server.ext" -out "$out/superlink/server.pem" 2>/dev/null
    rm -f "$out/superlink/server.csr" "$out/superlink/server.ext" "$out/ca.srl"
    echo "$san" >"$out/superlink/server.sans"
fi
for d in superlink supernodes public; do cp "$out/ca.crt" "$out/$d/ca.crt"; done
openssl verify -CAfile "$out/ca.crt" "$out/superlink/server.pem" >/dev/null

# --- SuperNode key pairs (one per compose replica) + the registered list ---
touch "$out/public/registered-supernodes.pub"
for ((i = 1; i <= num; i++)); do
    k="$out/supernodes/supernode-$i.key"
    if [ ! -s "$k" ]; then
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "supernode-$i" -f "$k"
        mv "$k.pub" "$k.pub.tmp" && mv "$k.pub.tmp" "$k.pub"
    fi
    if ! grep -qF "$(cut -d' ' -f2 "$k.pub")" "$out/public/registered-supernodes.pub"; then
        cat "$k.pub" >>"$out/public/registered-supernodes.pub"
    fi
done

# Certificates and public keys are not secret; private keys stay 0600.
chmod 0755 "$out" "$out/superlink" "$out/supernodes" "$out/public"
chmod 0644 "$out/ca.crt" "$out"/*/ca.crt "$out/superlink/server.pem" "$out/superlink/server.sans" \
    "$out"/public/* "$out"/supernodes/*.pub 2>/dev/null || true
echo "make-certs: $out: CA, server certificate, $num SuperNode key pairs," \
    "$(grep -c . "$out/public/registered-supernodes.pub") registered public keys"

#!/usr/bin/env bash
# Generate what docker-compose.tls.yml mounts: a private CA, a node certificate, a client
# certificate for operators (grpcurl) and a bearer token.
#
#   compose/gen-certs.sh [--force] [DIR]        (DIR defaults to compose/certs)
#
# DIR/ca.pem, ca.key        the CA every kvpeer process trusts (keep ca.key off the nodes
#                           in production; here it stays in DIR so you can sign more certs)
# DIR/node.pem, node.key    served by the directory and by every node's kvpeer server, and
#                           presented by the nodes when they dial each other (mutual TLS),
#                           so it is valid for both server and client authentication.
#                           SANs: the compose service names, localhost and 127.0.0.1, plus
#                           EXTRA_SANS (e.g. EXTRA_SANS="DNS:kv1.example.com,IP:10.0.0.7").
# DIR/client.pem, client.key  a client-only certificate for grpcurl and other tools.
# DIR/token                 the bearer token every call must carry.
#
# Needs openssl. Keys are EC P-256; certificates are valid for DAYS (default 825) days.
set -euo pipefail

force=0
if [ "${1:-}" = "--force" ]; then
    force=1
    shift
fi
dir=${1:-"$(cd "$(dirname "$0")" && pwd)/certs"}
days=${DAYS:-825}
sans="DNS:directory,DNS:directory-2,DNS:prefill,DNS:decode,DNS:localhost,IP:127.0.0.1"
if [ -n "${EXTRA_SANS:-}" ]; then
    sans="$sans,$EXTRA_SANS"
fi

if ! command -v openssl >/dev/null 2>&1; then
    echo "gen-certs.sh: openssl is required (apt-get install openssl)" >&2
    exit 1
fi
if [ -e "$dir/ca.pem" ] && [ "$force" = 0 ]; then
    echo "gen-certs.sh: $dir/ca.pem exists; pass --force to replace the CA and every certificate" >&2
    exit 1
fi
mkdir -p "$dir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
umask 077

new_key() {
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
}

# sign NAME CN EXTENSIONS: DIR/NAME.key + DIR/NAME.pem signed by the CA
sign() {
    local name=$1 cn=$2 extensions=$3
    new_key "$dir/$name.key"
    openssl req -new -key "$dir/$name.key" -subj "/CN=$cn" -out "$work/$name.csr"
    printf '%s\n' "$extensions" >"$work/$name.ext"
    openssl x509 -req -in "$work/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
        -CAcreateserial -CAserial "$work/ca.srl" -days "$days" -sha256 \
        -extfile "$work/$name.ext" -out "$dir/$name.pem" 2>/dev/null
}

new_key "$dir/ca.key"
openssl req -x509 -new -key "$dir/ca.key" -subj "/CN=kvpeer compose CA" -days "$days" \
    -sha256 -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$dir/ca.pem"

sign node "kvpeer-node" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=$sans"

sign client "kvpeer-client" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"

openssl rand -hex 32 >"$dir/token"

# Certificates are public; keys and the token stay readable by their owner only
# (the containers run as root, which reads them through the bind mount).
chmod 644 "$dir/ca.pem" "$dir/node.pem" "$dir/client.pem"
chmod 600 "$dir/ca.key" "$dir/node.key" "$dir/client.key" "$dir/token"
openssl verify -CAfile "$dir/ca.pem" "$dir/node.pem" "$dir/client.pem" >/dev/null
echo "gen-certs.sh: wrote ca, node, client certificates and token to $dir (SANs: $sans)"

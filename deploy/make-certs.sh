#!/usr/bin/env bash
# Make a private CA and a SuperLink server certificate signed by it (openssl).
#
# Usage: deploy/make-certs.sh [--days N] [--force] OUT_DIR [SAN ...]
#
#   OUT_DIR   folder to write into (created):
#               ca.crt ca.key            the CA: give ca.crt to every SuperNode and to `flwr`
#               server.pem server.key    the SuperLink's certificate and key
#   SAN       every host name or IP address that SuperNodes / `flwr` will dial the SuperLink by,
#             e.g. `superlink.lan 192.168.1.10`. IPv4/IPv6 literals become IP SANs, everything
#             else a DNS SAN. `localhost`, `127.0.0.1` and `::1` are always added: the SuperLink's
#             own SuperExec dials the SuperLink on the loopback address with this certificate.
#   --days N  validity (default 365)
#   --force   overwrite existing files (default: refuse, so a running federation keeps its CA)
#
# TLS fails with a hostname/IP mismatch if the address a client dials is not in the SAN list.
set -euo pipefail

days=365
force=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --days) days="$2"; shift 2 ;;
    --force) force=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    --) shift; break ;;
    -*) echo "make-certs.sh: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [[ $# -lt 1 ]]; then
  awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0" >&2
  exit 2
fi
command -v openssl >/dev/null || { echo "make-certs.sh: openssl not found" >&2; exit 1; }

out="$1"; shift
mkdir -p "$out"
if [[ -e "$out/ca.crt" && $force -eq 0 ]]; then
  echo "make-certs.sh: $out/ca.crt exists (use --force to replace the CA and server certificate)" >&2
  exit 1
fi

# SAN list: defaults first, then the user's, without duplicates.
declare -A seen=()
sans=()
dns_i=0; ip_i=0
for name in localhost 127.0.0.1 ::1 "$@"; do
  [[ -z "$name" || -n "${seen[$name]:-}" ]] && continue
  seen[$name]=1
  if [[ "$name" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ || "$name" == *:* ]]; then
    ip_i=$((ip_i + 1)); sans+=("IP.${ip_i} = ${name}")
  else
    dns_i=$((dns_i + 1)); sans+=("DNS.${dns_i} = ${name}")
  fi
done

umask 077
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
{
  echo "[req]"
  echo "distinguished_name = dn"
  echo "prompt = no"
  echo "[dn]"
  echo "CN = pwff-superlink"
  echo "[ext]"
  echo "basicConstraints = critical, CA:FALSE"
  echo "keyUsage = critical, digitalSignature"
  echo "extendedKeyUsage = serverAuth"
  echo "subjectAltName = @alt"
  echo "[alt]"
  printf '%s\n' "${sans[@]}"
} > "$tmp/server.cnf"

# CA
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -sha256 -nodes -days "$days" \
  -keyout "$out/ca.key" -out "$out/ca.crt" -subj "/CN=pwff-ca" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
# Server key + CSR + certificate signed by the CA, with the SAN extension
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-384 -sha256 -nodes -keyout "$out/server.key" \
  -out "$tmp/server.csr" -config "$tmp/server.cnf" 2>/dev/null
openssl x509 -req -sha256 -days "$days" -in "$tmp/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
  -CAcreateserial -CAserial "$tmp/ca.srl" -out "$out/server.pem" -extfile "$tmp/server.cnf" -extensions ext 2>/dev/null
chmod 644 "$out/ca.crt" "$out/server.pem"

openssl verify -CAfile "$out/ca.crt" "$out/server.pem" >/dev/null
echo "wrote $out/{ca.crt,ca.key,server.pem,server.key}; SAN: ${sans[*]}"

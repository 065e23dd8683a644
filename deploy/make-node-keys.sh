#!/usr/bin/env bash
# Make SuperNode authentication key pairs (ECDSA P-384, OpenSSH format, no passphrase).
#
# Usage: deploy/make-node-keys.sh [--prefix NAME] [--force] OUT_DIR N
#
#   OUT_DIR        folder to write into (created)
#   N              number of SuperNodes: writes OUT_DIR/<prefix>-0 .. <prefix>-(N-1)
#                  (private key, stays on the device) and <...>.pub (public key, goes to whoever
#                  registers the node with `flwr supernode register`)
#   --prefix NAME  file name prefix (default: supernode)
#   --force        replace existing keys (default: keep them, so registered nodes stay valid)
set -euo pipefail

prefix=supernode
force=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --prefix) prefix="$2"; shift 2 ;;
    --force) force=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    --) shift; break ;;
    -*) echo "make-node-keys.sh: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [[ $# -ne 2 || ! "$2" =~ ^[0-9]+$ ]]; then
  awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0" >&2
  exit 2
fi
command -v ssh-keygen >/dev/null || { echo "make-node-keys.sh: ssh-keygen not found" >&2; exit 1; }

out="$1"; n="$2"
mkdir -p "$out"
for ((i = 0; i < n; i++)); do
  key="$out/$prefix-$i"
  if [[ -e "$key" ]]; then
    if [[ $force -eq 0 ]]; then
      echo "keep   $key (exists)"
      continue
    fi
    rm -f "$key" "$key.pub"
  fi
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "$prefix-$i" -f "$key"
  echo "wrote  $key $key.pub"
done

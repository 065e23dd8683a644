#!/usr/bin/env bash
# Register SuperNode public keys with a SuperLink started with --enable-supernode-auth.
#
# Usage: deploy/register-nodes.sh CONNECTION PUBKEY...
#
#   CONNECTION  a connection name in $FLWR_HOME/config.toml (see add-connection.sh)
#   PUBKEY      public key files (*.pub from make-node-keys.sh), one per SuperNode
#
# Runs `flwr supernode register PUBKEY CONNECTION` for each key and prints the node ids.
# A SuperNode whose key is not registered is refused by the SuperLink. Registrations live in the
# SuperLink's state: with the default in-memory state, register again after a SuperLink restart.
# List them with `flwr supernode list CONNECTION`; remove one with `flwr supernode unregister NODE_ID CONNECTION`.
set -euo pipefail

if [[ $# -lt 2 || "$1" == -h || "$1" == --help ]]; then awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; [[ $# -ge 1 && "$1" == -* ]] && exit 0 || exit 2; fi
connection="$1"; shift
export FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"
for pub in "$@"; do
  [[ -f "$pub" ]] || { echo "register-nodes.sh: no such file: $pub" >&2; exit 2; }
  echo "register $pub"
  flwr supernode register "$pub" "$connection"
done

#!/usr/bin/env bash
# Add (or replace) a SuperLink connection for the `flwr` CLI in $FLWR_HOME/config.toml.
#
# Usage: deploy/add-connection.sh [--insecure] [--default] NAME HOST:PORT [CA_CRT]
#
#   NAME        connection name, used as `flwr run . NAME` and `flwr supernode register KEY.pub NAME`
#   HOST:PORT   the SuperLink's address (same port the SuperNodes use); HOST must be in the SAN list
#   CA_CRT      ca.crt from make-certs.sh (stored as an absolute path, as flwr requires)
#   --insecure  connect without TLS (SuperLink started with --insecure; then no CA_CRT)
#   --default   also make NAME the default connection
#
# Writes a section like:
#   [superlink.NAME]
#   address = "HOST:PORT"
#   root-certificates = "/abs/path/ca.crt"
# FLWR_HOME defaults to ~/.flwr. Flower creates the file on first use; this script does the same.
set -euo pipefail

insecure=0 make_default=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --insecure) insecure=1; shift ;;
    --default) make_default=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    --) shift; break ;;
    -*) echo "add-connection.sh: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [[ $# -lt 2 || $# -gt 3 ]]; then awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0" >&2; exit 2; fi
name="$1" address="$2" ca="${3:-}"
[[ "$name" =~ ^[A-Za-z0-9_-]+$ ]] || { echo "add-connection.sh: NAME must be [A-Za-z0-9_-]+" >&2; exit 2; }

if [[ $insecure -eq 0 && ! -f "$ca" ]]; then
  echo "add-connection.sh: CA_CRT file not found: '$ca' (or pass --insecure)" >&2; exit 2
fi

home="${FLWR_HOME:-$HOME/.flwr}"
config="$home/config.toml"
mkdir -p "$home"
if [[ ! -f "$config" ]]; then
  # Flower's own default file (flwr.cli.constant.DEFAULT_FLOWER_CONFIG_TOML, local simulation only).
  printf '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n' > "$config"
fi

section="[superlink.$name]"
{
  echo "$section"
  echo "address = \"$address\""
  if [[ $insecure -eq 1 ]]; then
    echo "insecure = true"
  else
    echo "root-certificates = \"$(cd "$(dirname "$ca")" && pwd)/$(basename "$ca")\""
  fi
} > "$config.new-section"

# Drop an existing [superlink.NAME] table (up to the next table header), then append the new one.
awk -v hdr="$section" '
  $0 == hdr { skip = 1; next }
  skip && /^\[/ { skip = 0 }
  !skip { print }
' "$config" > "$config.tmp"
# Keep one blank line between tables.
sed -e :a -e '/^\n*$/{$d;N;ba' -e '}' "$config.tmp" > "$config.tmp2" && mv "$config.tmp2" "$config.tmp"
{ echo; cat "$config.new-section"; } >> "$config.tmp"
rm -f "$config.new-section"
if [[ $make_default -eq 1 ]]; then
  sed -i -E "0,/^default = .*/s//default = \"$name\"/" "$config.tmp"
fi
mv "$config.tmp" "$config"
echo "connection '$name' -> $address in $config"

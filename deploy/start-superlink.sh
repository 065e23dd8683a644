#!/usr/bin/env bash
# Start a SuperLink with TLS and SuperNode authentication (runs in the foreground; Ctrl-C stops it).
#
# Usage: deploy/start-superlink.sh --certs DIR [--host H] [--port P] [--database FILE] [--insecure] [-- EXTRA...]
#
#   --certs DIR      folder from make-certs.sh (ca.crt, server.pem, server.key)
#   --host H         address to listen on (default 0.0.0.0: reachable from edge devices;
#                    use 127.0.0.1 for a single-machine try)
#   --port P         one port for the Fleet API (SuperNodes), the Control API (`flwr`) and the
#                    Runtime API (SuperExec) (default 9092)
#   --database FILE  SQLite file for the SuperLink state, so registered SuperNodes survive a
#                    restart (default: in memory; then register the nodes again after a restart)
#   --insecure       no TLS and no SuperNode authentication (a first try on a trusted network only)
#   -- EXTRA...      passed to flower-superlink unchanged (e.g. --log-file superlink.log)
#
# Environment: FLWR_HOME (Flower's folder, default ~/.flwr); FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION
# defaults to 1 here (otherwise every run `uv sync`s the app's dependencies: GBs); set it to 0 to allow it.
# The ServerApp runs in this process's working directory: give the app an absolute `results-dir`.
set -euo pipefail

certs="" host=0.0.0.0 port=9092 database="" insecure=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --certs) certs="$2"; shift 2 ;;
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --database) database="$2"; shift 2 ;;
    --insecure) insecure=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    --) shift; break ;;
    *) echo "start-superlink.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

args=(--host "$host" --port "$port")
if [[ $insecure -eq 1 ]]; then
  args+=(--insecure)
else
  [[ -n "$certs" ]] || { echo "start-superlink.sh: --certs DIR is required (or --insecure)" >&2; exit 2; }
  for f in ca.crt server.pem server.key; do
    [[ -f "$certs/$f" ]] || { echo "start-superlink.sh: $certs/$f missing (run deploy/make-certs.sh)" >&2; exit 2; }
  done
  args+=(--ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.pem" --ssl-keyfile "$certs/server.key"
         --enable-supernode-auth)
fi
if [[ -n "$database" ]]; then args+=(--database "$database"); fi

export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="${FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION:-1}"
export FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"
if [[ "$FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION" == 1 ]]; then
  args+=(--disable-runtime-dependency-installation)
fi
exec flower-superlink "${args[@]}" "$@"

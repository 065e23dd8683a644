#!/usr/bin/env bash
# Start one SuperNode of the pwff app (runs in the foreground; Ctrl-C stops it).
#
# Usage: deploy/start-supernode.sh ID N --superlink HOST:PORT --ca CA_CRT --key KEY
#                                  [--port P] [--state-dir DIR] [--resource-level L] [--insecure]
#                                  [--max-retries K] [--max-wait-time S] [--warm-clientapp] [-- EXTRA...]
#
#   ID                 this node's partition id, 0 .. N-1 (which data partition and client id it is)
#   N                  number of partitions = the app's `num-clients`
#   --superlink H:P    the SuperLink address; H must be in the server certificate's SAN list
#   --ca CA_CRT        ca.crt from make-certs.sh (verifies the SuperLink)
#   --key KEY          this node's private key from make-node-keys.sh (its .pub must be registered
#                      with `flwr supernode register`, see register-nodes.sh)
#   --port P           this SuperNode's local Runtime API port (default 9094 + ID, so several
#                      SuperNodes can share one host)
#   --state-dir DIR    where the node keeps its private weights between rounds and restarts
#                      (node config `state-dir`; default: ./pwff-state/node-ID). Absolute path used.
#   --resource-level L node config `resource-level` (optional, a float in (0, 1]); passed through
#                      for apps that read it
#   --insecure         no TLS and no authentication (only against a SuperLink started --insecure)
#   --max-retries K, --max-wait-time S   give up connecting after K tries / S seconds (default: never)
#   --warm-clientapp   (or PWFF_WARM_CLIENTAPP=1) run the SuperNode with `--isolation process` and,
#                      beside it, one long-lived ClientApp runner (deploy/warm_clientapp.py) that
#                      serves every message in the same process: no new process, torch import and
#                      model load per message. The script then stays in the foreground as their
#                      parent: when either exits, the other is stopped and the script exits with
#                      the first one's status. See docs/deploy.md, "Per-message start-up".
#                      PWFF_WARM_PRELOAD (default torch,transformers): modules the runner imports
#                      before the first message ("" for none).
#   -- EXTRA...        passed to flower-supernode unchanged
#
# Environment: PWFF_DATA_DIR (local data folder; otherwise the Hugging Face Hub), HF_HUB_OFFLINE, FLWR_HOME.
# Runtime dependency installation stays off (flower-supernode's default): install the app's
# dependencies on the device beforehand (`pip install -e .`).
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; }
if [[ $# -ge 1 && ( "$1" == -h || "$1" == --help ) ]]; then usage; exit 0; fi
if [[ $# -lt 2 ]]; then usage >&2; exit 2; fi
id="$1" n="$2"; shift 2
[[ "$id" =~ ^[0-9]+$ && "$n" =~ ^[0-9]+$ && "$id" -lt "$n" ]] || { echo "start-supernode.sh: need 0 <= ID < N" >&2; exit 2; }

superlink="" ca="" key="" port="" state_dir="" level="" insecure=0 retries="" wait_time=""
warm="${PWFF_WARM_CLIENTAPP:-0}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --superlink) superlink="$2"; shift 2 ;;
    --ca) ca="$2"; shift 2 ;;
    --key) key="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --state-dir) state_dir="$2"; shift 2 ;;
    --resource-level) level="$2"; shift 2 ;;
    --insecure) insecure=1; shift ;;
    --max-retries) retries="$2"; shift 2 ;;
    --max-wait-time) wait_time="$2"; shift 2 ;;
    --warm-clientapp) warm=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "start-supernode.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -n "$superlink" ]] || { echo "start-supernode.sh: --superlink HOST:PORT is required" >&2; exit 2; }
port="${port:-$((9094 + id))}"
state_dir="${state_dir:-pwff-state/node-$id}"
mkdir -p "$state_dir"
state_dir="$(cd "$state_dir" && pwd)"
[[ "$state_dir" != *"'"* ]] || { echo "start-supernode.sh: --state-dir must not contain a single quote" >&2; exit 2; }

node_config="partition-id=$id num-partitions=$n state-dir='$state_dir'"
if [[ -n "$level" ]]; then node_config+=" resource-level=$level"; fi

args=(--superlink "$superlink" --port "$port" --node-config "$node_config")
if [[ $insecure -eq 1 ]]; then
  args+=(--insecure)
else
  [[ -f "$ca" ]] || { echo "start-supernode.sh: --ca CA_CRT is required (file not found: '$ca')" >&2; exit 2; }
  [[ -f "$key" ]] || { echo "start-supernode.sh: --key KEY is required (file not found: '$key')" >&2; exit 2; }
  args+=(--root-certificates "$ca" --auth-supernode-private-key "$key")
fi
if [[ -n "$retries" ]]; then args+=(--max-retries "$retries"); fi
if [[ -n "$wait_time" ]]; then args+=(--max-wait-time "$wait_time"); fi

export FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"
if [[ "$warm" != 1 ]]; then
  exec flower-supernode "${args[@]}" "$@"
fi

# Warm ClientApp: the SuperNode spawns no SuperExec (--isolation process); the runner claims its
# tasks on the local Runtime API (plain HTTP on 127.0.0.1:PORT, Flower's default for it).
flower-supernode "${args[@]}" --isolation process "$@" &
sn=$!
python "$(dirname "$0")/warm_clientapp.py" --runtime-api-address "127.0.0.1:$port" --insecure \
  --parent-pid "$sn" --preload "${PWFF_WARM_PRELOAD-torch,transformers}" &
runner=$!
stop_both() { kill -TERM "$sn" "$runner" 2>/dev/null || true; }
trap 'stop_both; wait; exit 143' TERM
trap 'stop_both; wait; exit 130' INT
set +e
wait -n "$sn" "$runner"
rc=$?
stop_both
wait
exit "$rc"

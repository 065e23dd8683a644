#!/usr/bin/env python3
"""Per-message ClientApp start-up on real SuperNodes (loopback): Flower's default vs a warm runner.

On demand, not part of the test suite. For each mode it brings up ``deploy/local_cluster.py``'s
federation (SuperLink + N SuperNodes, TLS + node auth), runs one small PFTT job through
``flwr run`` and records, for every message a SuperNode's ClientApp handles:

* ``start``  — subprocess mode: the ``flwr-clientapp`` process's start (from /proc); process
  mode: the moment the warm runner claimed the task;
* ``call`` / ``called`` — around the ClientApp call (the app's own work: data, model, training);
* ``done``   — reply and task status pushed to the SuperNode (subprocess: at process exit).

``start -> call`` is the start-up (interpreter, imports of Flower/torch/the app, FAB install, app
load); ``call -> called`` the work, which in a fresh process also loads the encoder and data
(module-level caches are empty), so the work column drops too when the process is kept.

Subprocess mode is measured through a ``flwr-clientapp`` shim put first on the SuperNodes' PATH
(Flower's SuperExec starts ``flwr-clientapp`` by name): it runs Flower's own entry point with
timestamps around ``ClientApp.__call__`` and ``push_message``. Process mode is
``deploy/warm_clientapp.py`` with ``--timing-log``. The time a message waits before its process
is started or its task claimed (SuperExec poll 1 s, runner poll 0.2 s, SuperNode poll 3 s when
idle) is not in the per-message columns; the run's wall time has everything.

    python benchmarks/supernode_startup.py [--nodes 2] [--rounds 2] [--modes subprocess,process]
        [--data-dir DIR] [--workdir DIR] [--run-config "extra=..."]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "deploy"))  # deploy/ holds scripts, not a package
import local_cluster as lc  # noqa: E402

SMALL = ("task.max-train-samples=64 task.max-test-samples=64 task.max-length=32 task.batch-size=16 "
         "wireless.enabled=false")

SHIM = '''#!{python}
# flwr-clientapp with timestamps (benchmarks/supernode_startup.py); otherwise Flower's entry point.
import atexit, json, os, sys, time


def _process_start():
    stat = open("/proc/self/stat").read()
    ticks = int(stat[stat.rindex(")") + 2:].split()[19])
    uptime = float(open("/proc/uptime").read().split()[0])
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


rec = {{"runner": "subprocess", "pid": os.getpid(), "start": _process_start(), "main": time.time()}}


def _write():
    rec["done"] = time.time()
    fd = os.open({log!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, (json.dumps(rec) + "\\n").encode())
    os.close(fd)


atexit.register(_write)
from flwr.clientapp.client_app import ClientApp
import flwr.supernode.runtime.run_clientapp as _rc
_call = ClientApp.__call__


def _timed_call(self, message, context):
    rec["type"] = message.metadata.message_type
    rec["call"] = time.time()
    try:
        return _call(self, message, context)
    finally:
        rec["called"] = time.time()


ClientApp.__call__ = _timed_call
_push = _rc.push_message


def _timed_push(*a, **k):
    try:
        return _push(*a, **k)
    finally:
        rec["pushed"] = time.time()


_rc.push_message = _timed_push
from flwr.supernode.cli import flwr_clientapp
sys.exit(flwr_clientapp())
'''


def run_mode(mode: str, workdir: Path, nodes: int, rounds: int, data_dir: str | None, extra: str,
             timeout: float) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    timing = workdir / "timing.jsonl"
    timing.unlink(missing_ok=True)
    env = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "PWFF_CLIENTAPP_TIMING_LOG": str(timing)}
    if mode == "subprocess":
        shim_dir = workdir / "shim"
        shim_dir.mkdir(exist_ok=True)
        shim = shim_dir / "flwr-clientapp"
        shim.write_text(SHIM.format(python=sys.executable, log=str(timing)))
        shim.chmod(0o755)
        env["PATH"] = os.pathsep.join([str(shim_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    results = workdir / "results"
    run_config = (f"results-dir='{results}' run-name='{mode}' num-clients={nodes} task.num-rounds={rounds} "
                  f"{SMALL} {extra}").strip()
    cluster = lc.LocalCluster(workdir / "cluster", num_nodes=nodes, data_dir=data_dir, env=env, isolation=mode)
    try:
        cluster.prepare()
        cluster.start_superlink()
        cluster.register(cluster.public_keys())
        cluster.start_supernodes()
        t0 = time.monotonic()
        proc = cluster.run(run_config, timeout=timeout)
        wall = time.monotonic() - t0
    finally:
        cluster.close()
    if proc.returncode != 0:
        raise SystemExit(f"{mode}: flwr run failed ({proc.returncode}); logs in {cluster.logs}\n"
                         + proc.stdout[-3000:])
    records = [json.loads(line) for line in timing.read_text().splitlines() if line.strip()]
    return {"mode": mode, "wall": wall, "records": records, "logs": str(cluster.logs)}


def summarize(res: dict) -> dict:
    recs = [r for r in res["records"] if "call" in r and "called" in r]
    total = [r["done"] - r["start"] for r in recs]
    startup = [r["call"] - r["start"] for r in recs]
    work = [r["called"] - r["call"] for r in recs]
    by_type: dict[str, list[float]] = {}
    for r in recs:
        by_type.setdefault(r.get("type", "?"), []).append(r["called"] - r["call"])
    return {"mode": res["mode"], "messages": len(recs), "failed": len(res["records"]) - len(recs),
            "total": statistics.mean(total) if total else float("nan"),
            "startup": statistics.mean(startup) if startup else float("nan"),
            "work": statistics.mean(work) if work else float("nan"),
            "after": statistics.mean([r["done"] - r["called"] for r in recs]) if recs else float("nan"),
            "wall": res["wall"],
            "work_by_type": {k: statistics.mean(v) for k, v in sorted(by_type.items())}}


def table(rows: list[dict]) -> str:
    head = ("| mode | messages | mean s / message | of which start-up | work (ClientApp call) | "
            "reply + exit | `flwr run` wall s |")
    out = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for s in rows:
        out.append(f"| {s['mode']} | {s['messages']} | {s['total']:.2f} | {s['startup']:.2f} | {s['work']:.2f} | "
                   f"{s['after']:.2f} | {s['wall']:.1f} |")
    out.append("")
    for s in rows:
        per = ", ".join(f"{k} {v:.2f} s" for k, v in s["work_by_type"].items())
        out.append(f"{s['mode']}: work by message type: {per}" + (f"; {s['failed']} without a call" if s["failed"] else ""))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--modes", default="subprocess,process")
    p.add_argument("--data-dir", default=os.environ.get("PWFF_DATA_DIR"))
    p.add_argument("--workdir", default=None, help="default: a new temporary folder (kept, path printed)")
    p.add_argument("--run-config", default="", help="appended to the small PFTT config")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", default=None, help="also write the summaries and raw records here")
    args = p.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="pwff-startup-")).resolve()
    print(f"work dir: {workdir}", flush=True)
    load = os.getloadavg()
    rows, raw = [], []
    for mode in args.modes.split(","):
        t = time.monotonic()
        res = run_mode(mode, workdir / mode, args.nodes, args.rounds, args.data_dir, args.run_config, args.timeout)
        raw.append(res)
        rows.append(summarize(res))
        print(f"{mode}: done in {time.monotonic() - t:.0f} s (cluster up + run + down)", flush=True)
    print(f"\nload average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; after: "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()) + f"; {os.cpu_count()} CPUs\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": rows, "raw": raw}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

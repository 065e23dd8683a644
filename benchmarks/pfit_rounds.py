"""Held-out reward trajectory of an instruct-family run, in one process; prints a table.

    python benchmarks/pfit_rounds.py                                  # pfit, 2 clients, pyproject defaults
    python benchmarks/pfit_rounds.py --clients 4 --set instruct.num-rounds=8 --set instruct.lr=1e-4
    python benchmarks/pfit_rounds.py --method shepherd --set instruct.num-rounds=2

The real ServerApp and ClientApp on ``pwff_app.testing.inprocess.InProcessGrid`` (no Ray, no SuperLink):
clients run one after another in this process, so the wall time is the sum of the clients'
work, not what ``flwr run`` with parallel workers takes. Wireless is off unless ``--wireless``
(the learning does not depend on it, and its losses would add noise to a learning-speed probe).
Needs ``PWFF_DATA_DIR`` (hh-rlhf/, alpaca/) and the offline policy; trains the reward models
first if they are not cached.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


from pwff_app.config import app_defaults
from pwff_app.testing.inprocess import InProcessGrid, run_server


def _typed(old: object, text: str) -> object:
    """``text`` as the type of the pyproject default it overrides (str when there is none)."""
    if isinstance(old, bool):
        return text.lower() in ("1", "true", "yes")
    if isinstance(old, (int, float)):
        return type(old)(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="pfit", choices=["pfit", "pfl", "sfl", "shepherd"])
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = what a Ray worker gets)")
    parser.add_argument("--wireless", action="store_true", help="keep the simulated link on")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="run-config override, e.g. instruct.lr=2e-4 (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: a temp folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0  # what a real run sets

    rc = app_defaults(ROOT)
    out = args.out or Path(tempfile.mkdtemp(prefix="pwff-pfit-rounds-"))
    rc.update({"method": args.method, "num-clients": args.clients, "results-dir": str(out), "run-name": args.method,
               "wireless.enabled": args.wireless})
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set wants KEY=VALUE, got {item!r}")
        rc[key] = _typed(rc.get(key), value)

    started = time.perf_counter()
    run_server(rc, InProcessGrid(rc, args.clients))
    wall = time.perf_counter() - started

    rounds = [json.loads(line) for line in (out / args.method / "rounds.jsonl").read_text().splitlines()]
    summary = json.loads((out / args.method / "summary.json").read_text())
    weights = summary["preference_weights"]  # what every client is scored with (Shepherd trains on no reward)
    cids = sorted(weights, key=int)
    print(f"\n{args.method}: {args.clients} clients, {len(rounds) - 1} rounds, wall {wall:.0f} s "
          f"({args.threads} thread(s), clients in sequence); results in {out / args.method}")
    print("test-prompt combined training-RM reward (helpfulness / safety) per client; round 0 = pretrained policy")
    header = "| round | " + " | ".join(f"client {c} ({weights[c][0]:g}:{weights[c][1]:g})" for c in cids) + " |"
    print(header)
    print("|" + " --- |" * (len(cids) + 1))
    for r in rounds:
        cells = []
        for c in cids:
            m = r["clients"].get(c, {})
            cells.append(f"{m['combined']:+.3f} ({m['helpfulness']:+.3f} / {m['safety']:+.3f})" if "combined" in m
                         else "-")
        print(f"| {r['round']} | " + " | ".join(cells) + " |")
    first = {c: rounds[0]["clients"][c]["combined"] for c in cids}
    last = summary["reward"]["per_client"]
    print("| change | " + " | ".join(f"{last[c]['combined'] - first[c]:+.3f}" for c in cids) + " |")


if __name__ == "__main__":
    main()

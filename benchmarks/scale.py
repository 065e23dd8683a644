"""Time per round and peak memory of PFTT through ``flwr run`` at 10, 100 and 1,000 simulated clients.

    python benchmarks/scale.py                              # 10 / 100 / 1000 clients, 10 per round, 4 rounds
    python benchmarks/scale.py --clients 10 100 --rounds 3  # a quicker look

Every size runs the same tiny PFTT job (16 train / 16 test rows per client, 32 tokens, link on)
on a private local SuperLink with ``num-supernodes`` = the size and 1 CPU per simulated client,
sampling ``--per-round`` clients a round (``clients-per-round``). ``task.alpha`` is 1000 (near
IID) so that 17,600 AG News rows split into 1,000 partitions of at least 10 rows each; the
benchmark measures the system, not accuracy.

Time per round: from ``rounds.jsonl`` (``elapsed_s``), over rounds 2 .. R-1: round 1 carries
the workers' start-up and the last round evaluates every client (so the final scores cover
everyone); the last round is shown on its own. Memory: every 0.5 s, the proportional set size
(PSS: shared pages split between the processes that share them) summed over every process whose
environment holds this run's ``FLWR_HOME`` (SuperLink, SuperExec, ServerApp, the simulation and
its Ray workers); the peak of that sum. The plain RSS sum, which counts shared libraries once per
process, is printed beside it. Needs ``PWFF_DATA_DIR`` (ag_news/).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

from pwff_app.experiments.launch import federation_config, free_ports, launch_flwr_run, stop_local_superlink

ROOT = Path(__file__).resolve().parents[1]


def _kib(status_text: str, field: str) -> int:
    for line in status_text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def run_memory_kib(flwr_home: Path) -> tuple[int, int, int]:
    """(PSS sum, RSS sum, number of processes) in KiB over the processes of this ``FLWR_HOME``."""
    marker = f"FLWR_HOME={flwr_home}".encode()
    pss = rss = count = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            pss += _kib((proc / "smaps_rollup").read_text(), "Pss")
            rss += _kib((proc / "status").read_text(), "VmRSS")
            count += 1
        except OSError:  # gone, or not ours to read
            continue
    return pss, rss, count


class PeakMemory(threading.Thread):
    """Polls :func:`run_memory_kib` every ``period_s`` until stopped; keeps the peaks."""

    def __init__(self, flwr_home: Path, period_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.flwr_home, self.period_s = flwr_home, period_s
        self.peak_pss = self.peak_rss = self.peak_procs = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            pss, rss, n = run_memory_kib(self.flwr_home)
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            self.peak_procs = max(self.peak_procs, n)
            self._done.wait(self.period_s)

    def stop(self) -> None:
        self._done.set()
        self.join()


def run_config(num_clients: int, per_round: int, rounds: int, results_dir: Path, name: str) -> str:
    """The tiny PFTT job's ``--run-config``."""
    values = {
        "num-clients": num_clients, "clients-per-round": min(per_round, num_clients), "task.num-rounds": rounds,
        "task.max-train-samples": 16, "task.max-test-samples": 16, "task.batch-size": 16, "task.max-length": 32,
        "task.alpha": 1000.0, "results-dir": f"'{results_dir}'", "run-name": f"'{name}'",
    }
    return " ".join(f"{k}={v}" for k, v in values.items())


def measure(num_clients: int, per_round: int, rounds: int, work: Path, data_dir: Path | None,
            timeout_s: float) -> dict:
    """One ``flwr run`` of ``num_clients`` clients; its per-round times and peak memory."""
    name = f"scale-{num_clients}"
    home = (work / f"flwr-home-{num_clients}").resolve()
    home.mkdir(parents=True, exist_ok=True)
    memory = PeakMemory(home)
    memory.start()
    t0 = time.time()
    try:
        rc = launch_flwr_run(ROOT, run_config(num_clients, per_round, rounds, work / "results", name), home,
                             work / f"{name}.log", data_dir, timeout_s, ports=tuple(free_ports(2)),
                             resources=federation_config(num_clients, 1, 0))
    finally:
        wall = time.time() - t0
        stop_local_superlink(home)
        memory.stop()
    path = work / "results" / name / "rounds.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    ends = [0.0] + [r["elapsed_s"] for r in records]
    per = [b - a for a, b in zip(ends, ends[1:])]
    middle = per[1:-1]
    return {"clients": num_clients, "rc": rc, "rounds": len(records), "wall_s": wall,
            "round_s": sum(middle) / len(middle) if middle else float("nan"),
            "last_round_s": per[-1] if per else float("nan"),
            "sampled": len(records[1]["sampled"]) if len(records) > 1 else 0,
            "peak_pss_gib": memory.peak_pss / 2**20, "peak_rss_gib": memory.peak_rss / 2**20,
            "processes": memory.peak_procs, "log": str(work / f"{name}.log")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--per-round", type=int, default=10, help="clients-per-round (default 10)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per run, at least 3 (default 4)")
    parser.add_argument("--data-dir", type=Path, default=None, help="folder with ag_news/ (default: PWFF_DATA_DIR)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run (default 3600)")
    parser.add_argument("--work", type=Path, default=None, help="folder for logs and results (default: a temp dir)")
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (round 1 and the last round are not timed)")
    data_dir = args.data_dir or (Path(os.environ["PWFF_DATA_DIR"]) if os.environ.get("PWFF_DATA_DIR") else None)
    work = args.work or Path(tempfile.mkdtemp(prefix="pwff-scale-"))
    rows = [measure(n, args.per_round, args.rounds, work, data_dir, args.timeout) for n in args.clients]
    base = rows[0]
    print(f"\nPFTT tiny, {args.per_round} clients per round, {args.rounds} rounds, 1 CPU per simulated client, "
          f"{os.cpu_count()} cores")
    print(f"{'clients':>8} {'exit':>4} {'s/round (2..R-1)':>17} {'x first':>8} {'last round s':>12} "
          f"{'peak PSS GiB':>12} {'x first':>8} {'peak RSS-sum GiB':>16} {'procs':>5} {'wall s':>7}")
    for r in rows:
        print(f"{r['clients']:>8} {r['rc']:>4} {r['round_s']:>17.2f} {r['round_s'] / base['round_s']:>8.2f} "
              f"{r['last_round_s']:>12.1f} {r['peak_pss_gib']:>12.2f} {r['peak_pss_gib'] / base['peak_pss_gib']:>8.2f} "
              f"{r['peak_rss_gib']:>16.2f} {r['processes']:>5} {r['wall_s']:>7.0f}")
    print(f"logs and results: {work}")


if __name__ == "__main__":
    main()

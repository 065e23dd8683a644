"""Reproduce Fig. 5 of the paper: PFTT against its contenders, several seeds, one table.

Every (method, seed) pair is one real ``flwr run`` of this app (simulation Runtime, 4
SuperNodes, one CPU each) with a private ``FLWR_HOME`` under the output folder. The seed drives
the Dirichlet split, so for a given seed every method sees the same partition. Results land
in ``<out>/runs/<method>-seed<seed>/`` (``rounds.jsonl``, ``summary.json``); a run whose
``summary.json`` already exists is not repeated, so an interrupted reproduction resumes. A run
that fails is reported, its log kept in ``<out>/logs/``, and the others go on.

Afterwards :func:`aggregate_runs` (a pure function of the run folders) gives one row per
method, written as ``comparison.csv`` / ``comparison.md`` next to the plots of
:mod:`pwff_app.experiments.plots`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Fig. 5 methods first, then the two reference points.
ALL_METHODS: tuple[str, ...] = ("pftt", "vanilla-fl", "fedlora", "fedbert", "local", "fedavg-full")

# Run-config overrides per profile (on top of pyproject defaults). Both keep the wireless
# channel on with its defaults: Rayleigh fading, 5 dB average SNR.
PROFILES: dict[str, dict[str, Any]] = {
    # Small enough for 6 methods x 3 seeds on 2 shared CPU cores in well under 30 minutes.
    "quick": {
        "task.num-rounds": 3,
        "task.max-train-samples": 120,
        "task.max-test-samples": 150,
        "task.max-length": 48,
    },
    # The paper's setting (Sec. V): 4 clients, 40 rounds, Rayleigh, 5 dB; else pyproject defaults.
    "full": {
        "task.num-rounds": 40,
    },
}
# Wall-clock limit of one run (seconds) per profile; a run past it counts as failed.
RUN_TIMEOUT_S = {"quick": 900, "full": 6 * 3600}
DEFAULT_SEED_BASE = 42
FEDERATION_CONFIG = "num-supernodes=4 client-resources-num-cpus=1"


# ---------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------


@dataclass
class RunResult:
    method: str
    seed: int
    run_dir: Path
    status: str  # "done" (ran now), "skipped" (summary.json already there), "failed"
    wall_s: float = 0.0
    log: Path | None = None
    error: str = ""


@dataclass
class ReproduceResult:
    out_dir: Path
    runs: list[RunResult] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def failed(self) -> list[RunResult]:
        return [r for r in self.runs if r.status == "failed"]


def run_name(method: str, seed: int) -> str:
    return f"{method}-seed{seed}"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("'", "") + "'"


def build_run_config(method: str, seed: int, runs_dir: Path, profile: str,
                     extra: dict[str, Any] | None = None) -> str:
    """The ``--run-config`` string of one run: profile overrides, then method, seed, paths."""
    values: dict[str, Any] = {**PROFILES[profile], **(extra or {})}
    values.update({"method": method, "seed": int(seed), "results-dir": str(runs_dir.resolve()),
                   "run-name": run_name(method, seed)})
    return " ".join(f"{k}={_toml_value(v)}" for k, v in values.items())


def stop_local_superlink(flwr_home: Path) -> list[int]:
    """End the detached local SuperLink (and its SuperExec children) that ``flwr run`` left
    running for this ``FLWR_HOME``. Matches processes by the FLWR_HOME path in their command
    line or environment, so other users' SuperLinks are untouched. Returns the PIDs signalled."""
    home = str(Path(flwr_home).resolve())
    me = os.getpid()
    killed = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="ignore")
        except OSError:
            continue
        if "superlink" not in cmdline and "superexec" not in cmdline:
            continue
        mine = home in cmdline
        if not mine:
            try:
                mine = f"FLWR_HOME={home}".encode() in (proc / "environ").read_bytes()
            except OSError:
                mine = False
        if mine:
            try:
                os.kill(int(proc.name), signal.SIGTERM)
                killed.append(int(proc.name))
            except (ProcessLookupError, PermissionError):
                pass
    return killed


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_flwr_run(app_dir: Path, run_config: str, flwr_home: Path, log_path: Path,
                    data_dir: Path | None, timeout_s: float, ports: tuple[int, int] | None = None) -> int:
    """One ``flwr run <app> --stream`` with a private FLWR_HOME; output goes to ``log_path``.

    ``ports`` (SuperLink HTTP API, control API) moves the local SuperLink off Flower's fixed
    127.0.0.1:39091: without it, ``flwr run`` silently submits to whichever local SuperLink
    another user or test already started there (and we could not stop ours safely).

    Returns the exit status (124 on timeout; the SuperLink is then stopped so the next run
    starts clean)."""
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    if ports:
        env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"], env["FLWR_LOCAL_CONTROL_API_PORT"] = map(str, ports)
    if data_dir is not None:
        env["PWFF_DATA_DIR"] = str(Path(data_dir).resolve())
    flwr = Path(sys.executable).with_name("flwr")
    cmd = [str(flwr) if flwr.exists() else "flwr", "run", str(Path(app_dir).resolve()), "--stream",
           "--federation-config", FEDERATION_CONFIG, "--run-config", run_config]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    flwr_home.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                  timeout=timeout_s, cwd=str(flwr_home))
            return proc.returncode
        except subprocess.TimeoutExpired:
            log.write(f"\n[pwff reproduce] timed out after {timeout_s:.0f} s\n")
            stop_local_superlink(flwr_home)
            return 124


def _log_tail(path: Path, n: int = 3) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="ignore").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[-300:]


def run_all(out_dir: Path, methods: Sequence[str] = ALL_METHODS, seeds: Sequence[int] = (42, 43, 44),
            profile: str = "quick", app_dir: Path | None = None, data_dir: Path | None = None,
            launch: Callable[..., int] | None = None, report: Callable[[RunResult], None] | None = None,
            extra_config: dict[str, Any] | None = None) -> list[RunResult]:
    """Run every (method, seed) not already finished; stop the SuperLink at the end.

    Seeds are the outer loop, so a partial reproduction has every method for the first seeds.
    ``launch`` defaults to :func:`launch_flwr_run` (tests replace it)."""
    launch = launch or launch_flwr_run
    app_dir = Path(app_dir) if app_dir else Path(__file__).resolve().parent.parent
    out_dir = Path(out_dir)
    runs_dir, logs_dir, flwr_home = out_dir / "runs", out_dir / "logs", (out_dir / "flwr-home").resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    results: list[RunResult] = []
    ports = (free_port(), free_port())  # a private local SuperLink for this reproduction
    try:
        for seed in seeds:
            for method in methods:
                name = run_name(method, seed)
                run_dir = runs_dir / name
                log = logs_dir / f"{name}.log"
                if (run_dir / "summary.json").exists():
                    res = RunResult(method, seed, run_dir, "skipped", log=log if log.exists() else None)
                else:
                    rc_text = build_run_config(method, seed, runs_dir, profile, extra_config)
                    t0 = time.time()
                    rc = launch(app_dir, rc_text, flwr_home, log, data_dir, RUN_TIMEOUT_S.get(profile, 3600),
                                ports=ports)
                    wall = time.time() - t0
                    if rc == 0 and (run_dir / "summary.json").exists():
                        res = RunResult(method, seed, run_dir, "done", wall, log)
                    else:
                        why = f"exit {rc}" if rc != 0 else "no summary.json"
                        res = RunResult(method, seed, run_dir, "failed", wall, log,
                                        f"{why}: {_log_tail(log)}")
                results.append(res)
                if report:
                    report(res)
    finally:
        if launch is launch_flwr_run:
            stop_local_superlink(flwr_home)
    return results


# ---------------------------------------------------------------------------------------
# Aggregation (pure)
# ---------------------------------------------------------------------------------------

# Columns of comparison.csv: (key, header in comparison.md).
METRICS: tuple[tuple[str, str], ...] = (
    ("accuracy", "final personalized accuracy"),
    ("uplink_bytes_per_round", "uplink bytes / round (all clients)"),
    ("downlink_bytes_per_round", "downlink bytes / round (all clients)"),
    ("ergodic_uplink_delay_s", "uplink delay / round, ergodic (s)"),
    ("median_uplink_delay_s", "uplink delay, median (s)"),
    ("mean_uplink_delay_s", "uplink delay / round, mean over fades (s)"),
    ("energy_per_round_j", "energy / round (J)"),
    ("latency_per_round_s", "round latency (s)"),
    ("uplink_loss_rate", "uplink updates lost"),
)


def _num(x: Any) -> float | None:
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _seed_of(run_dir: Path, summary: dict[str, Any]) -> int | None:
    seed = (summary.get("config") or {}).get("seed")
    if seed is not None:
        return int(seed)
    name = run_dir.name
    if "-seed" in name:
        try:
            return int(name.rsplit("-seed", 1)[1].split("-")[0])
        except ValueError:
            return None
    return None


def read_run(run_dir: Path) -> dict[str, Any]:
    """The numbers of one finished run folder (its ``summary.json`` and ``rounds.jsonl``)."""
    run_dir = Path(run_dir)
    s = json.loads((run_dir / "summary.json").read_text())
    w = s.get("wireless") or {}
    n_rounds = _num(w.get("rounds")) or _num(s.get("num_rounds"))
    energy = _num(w.get("total_energy_j"))
    comm = s.get("comm") or {}
    curve: list[tuple[int, float]] = []
    rounds_path = run_dir / "rounds.jsonl"
    if rounds_path.exists():
        for line in rounds_path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                acc = _num(r.get("accuracy_mean"))
                if acc is not None:
                    curve.append((int(r["round"]), acc))
    return {
        "method": s.get("method") or run_dir.name.rsplit("-seed", 1)[0],
        "seed": _seed_of(run_dir, s),
        "run_dir": str(run_dir),
        "accuracy": _num((s.get("accuracy") or {}).get("mean")),
        "uplink_bytes_per_round": _num((comm.get("uplink_bytes_per_round") or {}).get("total")),
        "downlink_bytes_per_round": _num((comm.get("downlink_bytes_per_round") or {}).get("total")),
        "ergodic_uplink_delay_s": _num(w.get("ergodic_uplink_delay_s")),
        "median_uplink_delay_s": _num(w.get("median_uplink_delay_s")),
        "mean_uplink_delay_s": _num(w.get("mean_uplink_delay_s")),
        "energy_per_round_j": energy / n_rounds if energy is not None and n_rounds else None,
        "latency_per_round_s": _num(w.get("mean_round_latency_s")),
        "uplink_loss_rate": _num(w.get("loss_rate")),
        "num_rounds": s.get("num_rounds"),
        "curve": curve,
    }


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n-1; 0 for one value) of the non-missing values."""
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def aggregate_runs(run_dirs: Iterable[Path], method_order: Sequence[str] = ALL_METHODS) -> list[dict[str, Any]]:
    """One row per method: ``<metric>_mean`` / ``<metric>_std`` over seeds for every metric of
    :data:`METRICS`, ``n_seeds``, ``seeds`` and the mean +- std accuracy ``curve`` by round.

    Folders without ``summary.json`` are ignored. Methods follow ``method_order``, then others.
    """
    by_method: dict[str, list[dict[str, Any]]] = {}
    for d in run_dirs:
        if (Path(d) / "summary.json").exists():
            r = read_run(Path(d))
            by_method.setdefault(r["method"], []).append(r)
    order = [m for m in method_order if m in by_method] + sorted(m for m in by_method if m not in method_order)
    rows = []
    for m in order:
        runs = sorted(by_method[m], key=lambda r: (r["seed"] is None, r["seed"] or 0))
        row: dict[str, Any] = {"method": m, "n_seeds": len(runs), "seeds": [r["seed"] for r in runs]}
        for key, _ in METRICS:
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std(r[key] for r in runs)
        by_round: dict[int, list[float]] = {}
        for r in runs:
            for rnd, acc in r["curve"]:
                by_round.setdefault(rnd, []).append(acc)
        row["curve"] = [(rnd, *mean_std(v), len(v)) for rnd, v in sorted(by_round.items())]
        rows.append(row)
    return rows


def find_run_dirs(out_dir: Path) -> list[Path]:
    runs = Path(out_dir) / "runs"
    return sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    header = ["method", "n_seeds", "seeds"] + [f"{k}_{s}" for k, _ in METRICS for s in ("mean", "std")]
    with Path(path).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for row in rows:
            out = []
            for h in header:
                v = row.get(h)
                out.append(" ".join(str(s) for s in v) if h == "seeds" else ("" if v is None else v))
            w.writerow(out)
    return Path(path)


def _fmt(mean: float | None, std: float | None, kind: str) -> str:
    if mean is None:
        return "n/a"
    if kind == "acc":
        return f"{mean:.4f} ± {std:.4f}"
    if kind == "pct":
        return f"{100 * mean:.0f}% ± {100 * std:.0f}%"
    if kind == "bytes":
        return f"{mean:,.0f} ± {std:,.0f}"
    return f"{mean:.4g} ± {std:.2g}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison table: mean ± sample std over seeds, one row per method."""
    cols = [("accuracy", "final personalized accuracy", "acc"),
            ("uplink_bytes_per_round", "uplink bytes / round", "bytes"),
            ("downlink_bytes_per_round", "downlink bytes / round", "bytes"),
            ("ergodic_uplink_delay_s", "uplink delay / round, ergodic (s)", "float"),
            ("median_uplink_delay_s", "uplink delay, median (s)", "float"),
            ("energy_per_round_j", "energy / round (J)", "float"),
            ("uplink_loss_rate", "uplink updates lost", "pct"),
            ("n_seeds", "seeds", "int")]
    lines = ["| method | " + " | ".join(c[1] for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for row in rows:
        cells = [str(row["n_seeds"]) if k == "n_seeds" else _fmt(row[f"{k}_mean"], row[f"{k}_std"], kind)
                 for k, _, kind in cols]
        lines.append(f"| `{row['method']}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


MD_NOTES = """
Mean ± sample standard deviation (n−1) over seeds. *Final personalized accuracy*: mean over
the 4 clients of each client's accuracy on its own test split in the last round
(`summary.json` `accuracy.mean`). *Bytes / round*: summed over the 4 clients, mean over rounds
(`comm.*_bytes_per_round.total`). *Uplink delay / round, ergodic*: mean over rounds of the
mean over clients of payload / (B · E[log2(1 + SNR·|h|²)]) — the Rayleigh delay's own mean is
infinite, so the per-fade mean (`mean_uplink_delay_s`, in comparison.csv) is dominated by
deep fades; the median over all uplinks is shown as well. *Energy / round*: uplink + downlink
transmit energy of all clients, `wireless.total_energy_j` / rounds. *Uplink bytes* count
delivered updates only (a lost update is not in `comm`); *uplink updates lost* is the share of
attempted uplinks lost after retransmissions (`wireless.loss_rate`).
"""


def write_markdown(rows: Sequence[dict[str, Any]], path: Path, title: str = "PFTT vs contenders (Fig. 5)",
                   header: str = "") -> Path:
    text = f"# {title}\n\n" + (header.strip() + "\n\n" if header else "") + markdown_table(rows) + MD_NOTES
    Path(path).write_text(text)
    return Path(path)


def write_outputs(out_dir: Path, rows: Sequence[dict[str, Any]], header: str = "") -> list[Path]:
    """comparison.csv, comparison.md and the PNG plots into ``out_dir``."""
    from pwff_app.experiments import plots

    out_dir = Path(out_dir)
    files = [write_csv(rows, out_dir / "comparison.csv"), write_markdown(rows, out_dir / "comparison.md", header=header)]
    files += plots.plot_all(rows, out_dir)
    return files


# ---------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------


def _reporter() -> tuple[Callable[[RunResult], None], Callable[[], None]]:
    """One printed line per run (rich if available)."""
    try:
        from rich.console import Console

        console = Console(highlight=False)
        colors = {"done": "green", "skipped": "cyan", "failed": "red"}

        def report(r: RunResult) -> None:
            line = f"[{colors[r.status]}]{r.status:>7}[/] {r.method:<12} seed {r.seed:<4} {r.wall_s:7.1f} s"
            if r.error:
                line += f"  [red]{r.error}[/] (log: {r.log})"
            console.print(line)
    except ImportError:  # pragma: no cover
        def report(r: RunResult) -> None:
            line = f"{r.status:>7} {r.method:<12} seed {r.seed:<4} {r.wall_s:7.1f} s"
            print(line + (f"  {r.error} (log: {r.log})" if r.error else ""), flush=True)

    return report, lambda: None


def profile_header(profile: str, seeds: Sequence[int]) -> str:
    return (f"Profile `{profile}` ({' '.join(f'{k}={v}' for k, v in PROFILES[profile].items())}; "
            f"wireless on: Rayleigh, 5 dB; pyproject defaults otherwise), seeds {list(seeds)}.")


def reproduce_pftt(out_dir: Path, profile: str = "quick", seeds: Sequence[int] = (42, 43, 44),
                   methods: Sequence[str] = ALL_METHODS, app_dir: Path | None = None,
                   data_dir: Path | None = None, extra_config: dict[str, Any] | None = None) -> ReproduceResult:
    """Run (resuming) every method x seed, then write the table and plots. The whole Fig. 5."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {sorted(PROFILES)}")
    from pwff_app.methods import METHODS

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(ALL_METHODS)}")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    report, _ = _reporter()
    print(f"[pwff reproduce] profile {profile}: {len(methods)} methods x {len(seeds)} seeds -> {out_dir}", flush=True)
    runs = run_all(out_dir, methods, seeds, profile, app_dir, data_dir, report=report, extra_config=extra_config)
    wanted = {run_name(m, s) for m in methods for s in seeds}
    run_dirs = [d for d in find_run_dirs(out_dir) if d.name in wanted]
    rows = aggregate_runs(run_dirs, method_order=list(methods))
    wall = time.time() - t0
    header = profile_header(profile, seeds)
    files = write_outputs(out_dir, rows, header=header) if rows else []
    n_failed = sum(r.status == "failed" for r in runs)
    print(markdown_table(rows) if rows else "[pwff reproduce] no finished runs", flush=True)
    print(f"[pwff reproduce] {len(runs) - n_failed}/{len(runs)} runs finished, {n_failed} failed; "
          f"wall {wall:.0f} s; outputs in {out_dir}", flush=True)
    return ReproduceResult(out_dir, runs, rows, files, wall)

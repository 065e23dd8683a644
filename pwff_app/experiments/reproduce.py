"""Reproduce a comparison (Fig. 5 of the paper: PFTT against its contenders): variants x seeds, one table.

Every (variant, seed) pair is one real ``flwr run`` of this app (simulation Runtime, one
SuperNode per client, one CPU each; :mod:`pwff_app.experiments.launch`) with a private ``FLWR_HOME``
under the output folder. A variant is a method plus overrides (:class:`Variant`). The seed drives
the Dirichlet split, so for a given seed every variant sees the same partition. Results land in
``<out>/runs/<variant>-seed<seed>/`` (``rounds.jsonl``,
``summary.json``). A run whose ``summary.json`` carries the ``run_key`` this config and this
code would produce (:mod:`pwff_app.provenance`) is not repeated, so an interrupted reproduction
resumes; any other finished run (another config, profile, data folder or code version, or no
key) is moved to ``<out>/stale/`` and run again, never reused. A run that fails is reported,
its log kept in ``<out>/logs/``, and the others go on.

Afterwards :func:`tabulate` turns the finished runs into ``comparison.csv`` / ``comparison.md``
and plots (:mod:`pwff_app.experiments.tables`). What is run is :mod:`pwff_app.experiments.profiles`.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pwff_app.config import RunConfig, app_defaults
from pwff_app.experiments.launch import (federation_config, free_ports, launch_flwr_run, log_tail,
                                         stop_local_superlink)
from pwff_app.experiments.profiles import (ALL_METHODS, PROFILES, RUN_TIMEOUT_S, Variant, as_variants,
                                           build_run_config, profile_header, run_name)
from pwff_app.experiments.tables import PFTT_TITLE, aggregate_runs, find_run_dirs, markdown_table, write_outputs
from pwff_app.provenance import run_key

# The Flower app `flwr run` is given: the project folder (its pyproject.toml), above pwff_app/.
APP_DIR = Path(__file__).resolve().parents[2]


@dataclass
class RunResult:
    """What became of one (variant, seed) run."""

    name: str  # the variant's label
    seed: int
    run_dir: Path
    status: str  # "done" (ran now), "skipped" (summary.json with the same run key there), "failed"
    wall_s: float = 0.0
    log: Path | None = None
    error: str = ""


@dataclass
class ReproduceResult:
    """A whole reproduction: every run, the table rows and the files written."""

    out_dir: Path
    runs: list[RunResult] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def failed(self) -> list[RunResult]:
        return [r for r in self.runs if r.status == "failed"]


def expected_config(app_dir: Path, run_config: str, data_dir: Path | None) -> RunConfig:
    """The validated config the ServerApp gets for ``flwr run <app_dir> --run-config <run_config>``.

    Flower fuses the app's pyproject defaults with the parsed overrides; ``data_dir`` reaches the
    app as ``PWFF_DATA_DIR``, which the config resolves like ``data-dir``."""
    from flwr.common.config import parse_config_args

    flat = {**app_defaults(app_dir), **parse_config_args([run_config])}
    if data_dir is not None:
        flat["data-dir"] = str(Path(data_dir).resolve())
    return RunConfig.from_run_config(flat)


def expected_run_key(app_dir: Path, run_config: str, data_dir: Path | None) -> str:
    """The ``run_key`` the ServerApp writes for that run (:func:`expected_config`). The code digest
    is this process's package: an ``app_dir`` holding other code gives other keys (rerun, never reused)."""
    return run_key(expected_config(app_dir, run_config, data_dir))


def stored_run_key(run_dir: Path) -> str | None:
    """The ``run_key`` of a finished run folder's ``summary.json``; None if unfinished or keyless."""
    try:
        return json.loads((Path(run_dir) / "summary.json").read_text()).get("run_key")
    except (OSError, ValueError):
        return None


def check_out_dir(out_dir: Path, app_dir: Path) -> None:
    """Refuse an output folder that ``flwr run`` would pack into the app.

    ``flwr run <app>`` bundles the app folder minus what its ``.gitignore`` excludes; an output
    folder inside it, not ignored, would carry every earlier run's results and the private
    ``FLWR_HOME`` (with its copy of the app) into the next run's bundle, which Flower refuses
    (path depth, 10 MB). ``pwff-reproduce/`` is ignored by this project's ``.gitignore``.
    """
    from flwr.cli.utils import build_pathspec, load_gitignore_patterns

    try:
        rel = Path(out_dir).resolve().relative_to(Path(app_dir).resolve())
    except ValueError:
        return  # outside the app
    gitignore = Path(app_dir) / ".gitignore"
    spec = build_pathspec(tuple(load_gitignore_patterns(gitignore.read_bytes() if gitignore.is_file() else b"")))
    if not spec.match_file(f"{rel.as_posix()}/runs/x/summary.json"):
        raise ValueError(f"--out {out_dir} is inside the Flower app {app_dir} and not in its .gitignore: "
                         f"`flwr run` would pack it into the app; use a folder outside the app or under "
                         f"pwff-reproduce/")


def _set_aside(run_dir: Path, stale_dir: Path) -> Path:
    """Move a run folder out of ``runs/`` (kept, not deleted), named after its old key."""
    stale_dir.mkdir(parents=True, exist_ok=True)
    target = stale_dir / f"{run_dir.name}-{stored_run_key(run_dir) or 'unkeyed'}-{time.strftime('%Y%m%d-%H%M%S')}"
    shutil.move(str(run_dir), str(target))
    return target


def run_all(out_dir: Path, variants: Sequence[Variant | str] = ALL_METHODS, seeds: Sequence[int] = (42, 43, 44),
            profile: str = "quick", app_dir: Path | None = None, data_dir: Path | None = None,
            launch: Callable[..., int] | None = None, report: Callable[[RunResult], None] | None = None,
            client_cpus: float = 1, client_gpus: float = 0) -> list[RunResult]:
    """Run every (variant, seed) not already finished with this config and code; stop the SuperLink at the end.

    ``variants``: :class:`~pwff_app.experiments.profiles.Variant` rows, or bare method names.
    A finished run with another ``run_key`` is moved to ``<out>/stale/`` and run again.
    Seeds are the outer loop, so a partial reproduction has every variant for the first seeds.
    ``launch`` defaults to :func:`~pwff_app.experiments.launch.launch_flwr_run` (tests replace it);
    each run's ``--federation-config`` has one SuperNode per client of that run (its ``num-clients``)
    with ``client_cpus`` CPU cores and ``client_gpus`` of a GPU each."""
    launch = launch or launch_flwr_run
    app_dir = Path(app_dir) if app_dir else APP_DIR
    out_dir = Path(out_dir)
    check_out_dir(out_dir, app_dir)
    runs_dir, logs_dir, flwr_home = out_dir / "runs", out_dir / "logs", (out_dir / "flwr-home").resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    results: list[RunResult] = []
    ports = tuple(free_ports(2))  # a private local SuperLink for this reproduction
    try:
        for seed in seeds:
            for variant in as_variants(variants):
                name = run_name(variant.name, seed)
                run_dir = runs_dir / name
                log = logs_dir / f"{name}.log"
                rc_text = build_run_config(variant, seed, runs_dir, profile)
                cfg = expected_config(app_dir, rc_text, data_dir)
                key = run_key(cfg)
                if stored_run_key(run_dir) == key:
                    res = RunResult(variant.name, seed, run_dir, "skipped", log=log if log.exists() else None)
                else:
                    if run_dir.exists():  # another config or code made it (or it never finished)
                        _set_aside(run_dir, out_dir / "stale")
                    t0 = time.time()
                    rc = launch(app_dir, rc_text, flwr_home, log, data_dir, RUN_TIMEOUT_S.get(profile, 3600),
                                ports=ports, resources=federation_config(cfg.num_clients, client_cpus, client_gpus))
                    wall = time.time() - t0
                    got = stored_run_key(run_dir)
                    if rc == 0 and got == key:
                        res = RunResult(variant.name, seed, run_dir, "done", wall, log)
                    else:
                        why = (f"exit {rc}" if rc != 0 else "no summary.json" if got is None else
                               f"run_key {got} != {key} (does --app hold other code?)")
                        res = RunResult(variant.name, seed, run_dir, "failed", wall, log, f"{why}: {log_tail(log)}")
                results.append(res)
                if report:
                    report(res)
    finally:
        if launch is launch_flwr_run:
            stop_local_superlink(flwr_home)
    return results


def unkeyed_runs(out_dir: Path, variants: Sequence[Variant | str], seeds: Sequence[int], profile: str,
                 app_dir: Path | None = None, data_dir: Path | None = None) -> list[str]:
    """Finished runs in ``out_dir`` whose ``run_key`` is not the one this config and code give."""
    runs_dir = (Path(out_dir) / "runs").resolve()
    other = []
    for seed in seeds:
        for variant in as_variants(variants):
            run_dir = runs_dir / run_name(variant.name, seed)
            rc_text = build_run_config(variant, seed, runs_dir, profile)
            if (run_dir / "summary.json").exists() and (
                    stored_run_key(run_dir) != expected_run_key(app_dir or APP_DIR, rc_text, data_dir)):
                other.append(run_dir.name)
    return other


def tabulate(out_dir: Path, variants: Sequence[Variant | str], seeds: Sequence[int], profile: str,
             title: str = PFTT_TITLE) -> tuple[list[dict[str, Any]], list[Path]]:
    """Rows of the finished runs of these variants x seeds in ``out_dir`` (other runs there are
    left out), and the table and plots written from them (none when no run finished)."""
    names = [v.name for v in as_variants(variants)]
    wanted = {run_name(n, s) for n in names for s in seeds}
    rows = aggregate_runs([d for d in find_run_dirs(out_dir) if d.name in wanted], method_order=names)
    files = write_outputs(out_dir, rows, header=profile_header(profile, seeds), title=title) if rows else []
    return rows, files


def _reporter() -> Callable[[RunResult], None]:
    """One printed line per run (rich if available)."""
    try:
        from rich.console import Console

        console = Console(highlight=False)
        colors = {"done": "green", "skipped": "cyan", "failed": "red"}

        def report(r: RunResult) -> None:
            line = f"[{colors[r.status]}]{r.status:>7}[/] {r.name:<16} seed {r.seed:<4} {r.wall_s:7.1f} s"
            if r.error:
                line += f"  [red]{r.error}[/] (log: {r.log})"
            console.print(line)
    except ImportError:  # pragma: no cover
        def report(r: RunResult) -> None:
            line = f"{r.status:>7} {r.name:<16} seed {r.seed:<4} {r.wall_s:7.1f} s"
            print(line + (f"  {r.error} (log: {r.log})" if r.error else ""), flush=True)

    return report


def reproduce(out_dir: Path, variants: Sequence[Variant | str], profile: str = "quick",
              seeds: Sequence[int] = (42, 43, 44), app_dir: Path | None = None, data_dir: Path | None = None,
              client_cpus: float = 1, client_gpus: float = 0, title: str = PFTT_TITLE) -> ReproduceResult:
    """Run (resuming) every variant x seed, then write the table and plots (e.g. the whole Fig. 5)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {sorted(PROFILES)}")
    from pwff_app.methods import METHODS

    variants = as_variants(variants)
    unknown = [v.method for v in variants if v.method not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print(f"[pwff reproduce] profile {profile}: {len(variants)} variants x {len(seeds)} seeds -> {out_dir}",
          flush=True)
    runs = run_all(out_dir, variants, seeds, profile, app_dir, data_dir, report=_reporter(),
                   client_cpus=client_cpus, client_gpus=client_gpus)
    rows, files = tabulate(out_dir, variants, seeds, profile, title)
    wall = time.time() - t0
    n_failed = sum(r.status == "failed" for r in runs)
    print(markdown_table(rows) if rows else "[pwff reproduce] no finished runs", flush=True)
    print(f"[pwff reproduce] {len(runs) - n_failed}/{len(runs)} runs finished, {n_failed} failed; "
          f"wall {wall:.0f} s; outputs in {out_dir}", flush=True)
    return ReproduceResult(out_dir, runs, rows, files, wall)

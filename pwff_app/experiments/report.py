"""``pwff report RUN_DIR [RUN_DIR ...]``: the per-round table and the plots of finished runs.

A run folder is what a run writes (``<results-dir>/<run-name>/`` of a ``flwr run``, or
``<out>/runs/<name>-seed<S>/`` of ``pwff reproduce``): ``rounds.jsonl`` and, once finished,
``summary.json``. For each run the report prints one table, a line per round: each client's
score (accuracy, or the training-RM reward on the test prompts for instruction tuning), their
mean (and the global test set's and the shared part's where measured), uplink and downlink
bytes, round latency, median uplink delay, transmit energy, updates lost on the link, mean
training loss and rejected or failed replies. It writes the same tables and plots as ``pwff reproduce``
(:func:`pwff_app.experiments.tables.write_outputs`) with one row, line or point per run, so
several runs are overlaid, and ``rounds.md`` with every run's per-round table.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pwff_app.experiments.tables import aggregate_runs, read_rounds, write_outputs
from pwff_app.federation.results import VIEWS


class NotARunError(ValueError):
    """A folder given to ``pwff report`` holds no run (no ``rounds.jsonl``)."""


@dataclass(frozen=True)
class RunReport:
    """One run folder: its label in the tables and plots, its rounds, whether it finished."""

    run_dir: Path
    label: str
    rounds: list[dict[str, Any]]
    finished: bool


def labels(run_dirs: Sequence[Path]) -> list[str]:
    """A distinct label per run folder: its name, or ``parent/name`` where names repeat."""
    names = [d.name for d in run_dirs]
    return [f"{d.parent.name}/{d.name}" if names.count(d.name) > 1 else d.name for d in run_dirs]


def load(run_dirs: Sequence[Path]) -> list[RunReport]:
    """The runs behind ``run_dirs``; :class:`NotARunError` (one line) for a folder without rounds."""
    dirs = [Path(d).resolve() for d in run_dirs]
    out = []
    for run_dir, label in zip(dirs, labels(dirs)):
        rounds = read_rounds(run_dir)
        if not rounds:
            hint = (f"; a reproduction's runs are its {run_dir / 'runs'}/<name>-seed<S> folders"
                    if (run_dir / "runs").is_dir() else "")
            raise NotARunError(f"{run_dir}: no rounds.jsonl with a round in it (not a run folder, or not started)"
                               + hint)
        out.append(RunReport(run_dir, label, rounds, (run_dir / "summary.json").is_file()))
    return out


def _score(rounds: Sequence[dict[str, Any]]) -> str:
    return "reward" if any("reward_mean" in r for r in rounds) else "accuracy"


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def round_rows(rounds: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(header, cells) of a run's per-round table.

    Bytes are summed over the round's clients (B); latency is the round's slowest client
    (s), the uplink delay the median over its uplinks (s), energy the up + down transmit
    energy of all clients (J); ``lost`` counts updates lost on the uplink; ``train loss`` is
    the mean over the clients that report one (task tuning: cross-entropy in nats; instruction
    tuning reports none); ``rejected`` counts the round's rejected or failed replies.
    """
    score = _score(rounds)
    clients = sorted({int(c) for r in rounds for c in r.get("clients", {})})
    views = [v for v in VIEWS if any(f"{v}_{score}_mean" in r for r in rounds)]
    header = (["round"] + [f"client {c}" for c in clients] + [f"{score} mean"]
              + [f"{v.replace('_', '-')} mean" for v in views]
              + ["uplink B", "downlink B", "latency s", "uplink delay median s", "energy J", "lost",
                 "train loss", "rejected"])
    cells = []
    for r in rounds:
        per_client = r.get("clients", {})
        losses = [c["train_loss"] for c in per_client.values() if c.get("train_loss") is not None]
        wireless = r.get("wireless") or {}
        cells.append(
            [str(r["round"])]
            + [_fmt(per_client.get(str(c), {}).get(score)) for c in clients]
            + [_fmt(r.get(f"{score}_mean"))]
            + [_fmt(r.get(f"{v}_{score}_mean")) for v in views]
            + [_fmt(r.get("uplink_bytes")), _fmt(r.get("downlink_bytes")), _fmt(wireless.get("latency_s"), 2),
               _fmt(wireless.get("median_delay_up_s"), 2), _fmt(wireless.get("energy_j"), 2),
               _fmt(wireless.get("lost_updates")),
               _fmt(statistics.fmean(losses) if losses else None), str(len(r.get("events", [])))])
    return header, cells


def markdown(header: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """A Markdown table, numbers right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def round_tables(runs: Sequence[RunReport]) -> str:
    """Every run's per-round table under a heading naming its folder."""
    parts = []
    for run in runs:
        note = "" if run.finished else " (unfinished: no summary.json)"
        parts.append(f"## {run.label}{note}\n\n`{run.run_dir}`\n\n" + markdown(*round_rows(run.rounds)))
    return "\n".join(parts)


def default_out(run_dirs: Sequence[Path]) -> Path:
    """The run folder itself for one run; ``./report`` for several."""
    return Path(run_dirs[0]) if len(run_dirs) == 1 else Path("report")


def report(run_dirs: Sequence[Path], out_dir: Path | None = None) -> tuple[str, list[Path]]:
    """(the per-round tables as Markdown, the files written into ``out_dir``).

    Writes ``rounds.md`` and, from the finished runs (one row / line / point each, labelled as
    :func:`labels`), ``comparison.csv``, ``comparison.md`` and the plots of ``pwff reproduce``.
    """
    runs = load(run_dirs)
    out_dir = Path(out_dir) if out_dir is not None else default_out([r.run_dir for r in runs])
    out_dir.mkdir(parents=True, exist_ok=True)
    text = round_tables(runs)
    (out_dir / "rounds.md").write_text("# Per-round results\n\n" + text)
    files = [out_dir / "rounds.md"]
    rows = []
    for run in runs:
        if run.finished:
            (row,) = aggregate_runs([run.run_dir])
            rows.append({**row, "method": run.label})
    if rows:
        files += write_outputs(out_dir, rows, header=f"`pwff report` of {len(rows)} finished run(s), one row each.",
                               title="Run report")
    return text, files


__all__ = ["NotARunError", "RunReport", "default_out", "labels", "load", "markdown", "report", "round_rows",
           "round_tables"]

"""PNG plots of a reproduction (matplotlib, Agg backend: no display needed).

Each function takes the rows of :func:`pwff_app.experiments.tables.aggregate_runs` and a path, and
returns the path it wrote.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter  # noqa: E402

from pwff_app.experiments.tables import family_of, setting_labels  # noqa: E402

_COLORS = {"pftt": "#d62728", "vanilla-fl": "#1f77b4", "fedlora": "#2ca02c", "fedbert": "#9467bd",
           "local": "#7f7f7f", "fedavg-full": "#ff7f0e",
           "pfit": "#d62728", "pfl": "#1f77b4", "sfl": "#2ca02c", "shepherd": "#9467bd"}


def _save(fig: Any, ax: Any, path: Path, legend: bool = True) -> Path:
    """Legend (unless ``legend`` is False), tight layout, PNG at 120 dpi, figure closed; the path."""
    if legend:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


# Variants (a width, a codec, a swept value) draw from colors no method owns, so they never clash.
_FREE = ("#8c564b", "#e377c2", "#bcbd22", "#17becf", "#393b79", "#ad494a", "#8ca252", "#bd9e39")


def _color(method: str, i: int) -> str:
    return _COLORS.get(method) or _FREE[i % len(_FREE)]


def _subtitle(rows: Sequence[dict[str, Any]]) -> str:
    seeds = sorted({r["n_seeds"] for r in rows}) or [0]
    n = str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}"
    return f"mean ± std over {n} seed{'s' if seeds[-1] != 1 else ''}"


def human_bytes(n: float) -> str:
    """1234567 -> '1.23 MB' (decimal units, as in the table)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


_SCORE_LABELS = {"accuracy": "personalized accuracy", "reward": "training-RM reward"}


def _score_label(rows: Sequence[dict[str, Any]]) -> str:
    """What the rows' curves score: personalized accuracy, or the training reward models' mix
    on the test prompts (instruct runs)."""
    scores = sorted({score for r in rows for score in r.get("score", [])}) or ["accuracy"]
    return " / ".join(_SCORE_LABELS.get(score, score) for score in scores)


def plot_curve(rows: Sequence[dict[str, Any]], path: Path, key: str, ylabel: str, title: str,
               highlight: tuple[str, ...] = ("pftt", "pfit")) -> Path:
    """``row[key]`` (``(round, mean, std, n)`` by round) as one line + a ±std band over seeds per method."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, row in enumerate(rows):
        curve = [(r, m, s) for r, m, s, _n in row.get(key, []) if m is not None]
        if not curve:
            continue
        x = [c[0] for c in curve]
        m = [c[1] for c in curve]
        s = [c[2] or 0.0 for c in curve]
        color = _color(row["method"], i)
        ax.plot(x, m, marker="o", ms=3, lw=2.2 if row["method"] in highlight else 1.4, color=color,
                label=row["method"])
        ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], color=color, alpha=0.15)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} ({_subtitle(rows)})")
    ax.grid(alpha=0.3)
    return _save(fig, ax, path)


def plot_accuracy(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Personalized accuracy (or, for instruction tuning, the training-RM reward on the test
    prompts; mean over clients) by round, one line + band per method."""
    label = _score_label(rows)
    return plot_curve(rows, path, "curve", f"{label} (mean over clients)", f"{label[0].upper()}{label[1:]} vs round")


def plot_judge_reward(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Judge reward (each client's preference mix, mean over clients; test prompts) by round, band over seeds."""
    return plot_curve(rows, path, "judge_curve", "judge reward, preference mix (mean over clients)",
                      "Judge reward vs round")


def plot_accuracy_vs_bytes(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Accuracy (mean ± std over seeds) against the cumulative uplink bytes of all clients (mean over
    seeds) at that round, log x: the price in accuracy of each byte saved."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, row in enumerate(rows):
        sent = row.get("uplink_bytes_curve") or {}
        points = [(sent[r], m, s or 0.0) for r, m, s, _n in row["curve"] if m is not None and sent.get(r)]
        if not points:
            continue
        x, m, s = (list(v) for v in zip(*points))
        color = _color(row["method"], i)
        ax.errorbar(x, m, yerr=s, marker="o", ms=3, lw=1.4, capsize=3, color=color, label=row["method"])
    ax.set_xscale("log")
    ax.set_xlabel("cumulative uplink bytes, all clients (log)")
    ax.set_ylabel(f"{_score_label(rows)} (mean over clients)")
    ax.set_title(f"Accuracy vs uplink bytes ({_subtitle(rows)})")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, ax, path)


def _bar(rows: Sequence[dict[str, Any]], key: str, path: Path, ylabel: str, title: str, log: bool,
         fmt: Callable[[float], str]) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = [r["method"] for r in rows]
    means = [r.get(f"{key}_mean") for r in rows]
    stds = [r.get(f"{key}_std") or 0.0 for r in rows]
    heights = [m if m else 0.0 for m in means]
    bars = ax.bar(names, heights, yerr=[s if m else 0.0 for s, m in zip(stds, means)], capsize=4,
                  color=[_color(n, i) for i, n in enumerate(names)])
    positive = [h for h in heights if h > 0]
    if log and positive:
        ax.set_yscale("log")
        ax.set_ylim(min(positive) / 3, max(positive) * 5)
    for bar, m, s in zip(bars, means, stds):
        label = "n/a" if m is None else ("0 (nothing sent)" if m == 0 else fmt(m))
        y = bar.get_height() + s if bar.get_height() > 0 else (min(positive) / 2 if log and positive else 0)
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 3), textcoords="offset points")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} ({_subtitle(rows)})")
    ax.grid(axis="y", alpha=0.3, which="both")
    return _save(fig, ax, path, legend=False)


def plot_uplink_bytes(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Uplink bytes per round (all clients), bar per method, log scale; the client count from the runs."""
    clients, _ = setting_labels(rows)
    return _bar(rows, "uplink_bytes_per_round", path, f"uplink bytes / round ({clients}, log)",
                "Uplink payload per round", log=True, fmt=human_bytes)


def plot_uplink_delay(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Ergodic uplink delay per round (s), bar per method, log scale; the channel from the runs."""
    _, channel = setting_labels(rows)
    return _bar(rows, "ergodic_uplink_delay_s", path, "uplink delay / round, ergodic (s, log)",
                f"Uplink delay per round, {channel}", log=True, fmt=lambda v: f"{v:.3g} s")


def _numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot_sweep_score(points: Sequence[tuple[Any, dict[str, Any]]], key: str, path: Path) -> Path:
    """Final accuracy (mean ± std over seeds) against the swept value (categorical if not numbers)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    values = [v for v, _ in points]
    x = values if _numeric(values) else list(range(len(values)))
    means = [row.get("accuracy_mean") for _, row in points]
    stds = [row.get("accuracy_std") or 0.0 for _, row in points]
    shown = [(a, m, s) for a, m, s in zip(x, means, stds) if m is not None]
    if shown:
        ax.errorbar([a for a, _, _ in shown], [m for _, m, _ in shown], yerr=[s for _, _, s in shown],
                    marker="o", capsize=4, lw=1.6, color="#d62728")
    if not _numeric(values):
        ax.set_xticks(x, [str(v) for v in values])
    ax.set_xlabel(key)
    ax.set_ylabel("final personalized accuracy")
    ax.set_title(f"Accuracy vs {key} ({_subtitle([row for _, row in points])})")
    ax.grid(alpha=0.3)
    return _save(fig, ax, path, legend=False)


def plot_accuracy_against(points: Sequence[tuple[Any, dict[str, Any]]], key: str, index: int, xlabel: str,
                          path: Path) -> Path:
    """Accuracy by round against a cumulative link quantity (``link_curve`` column ``index``), one line per value."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (value, row) in enumerate(points):
        curve = [(c[index], c[3]) for c in row.get("link_curve", []) if c[3] is not None]
        if curve:
            ax.plot([c[0] for c in curve], [c[1] for c in curve], marker="o", ms=3, lw=1.4, color=f"C{i % 10}",
                    label=f"{key.rsplit('.', 1)[-1]} = {value}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("personalized accuracy (mean over evaluated clients)")
    seeds = sorted({row["n_seeds"] for _, row in points}) or [0]
    ax.set_title(f"Accuracy vs {xlabel.split(' (')[0]} (mean over {'/'.join(map(str, seeds))} seed(s))")
    ax.grid(alpha=0.3)
    return _save(fig, ax, path)


# Accuracies plotted against uplink bytes: (key, legend, marker, size, filled); drawn in this
# order, so a global triangle stays visible inside a (larger) shared-only square at the same value.
_ACCURACY_VIEWS = (("accuracy", "own test split (personalized)", "o", 7, True),
                   ("shared_only_accuracy", "shared part alone, global test set", "s", 10, False),
                   ("global_accuracy", "global test set", "^", 6, False))


def plot_final_accuracy_vs_uplink(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Final accuracy against uplink bytes per round (all clients), one point per method and view
    (own split filled, global test set and shared part alone hollow), error bars = std over seeds.

    The bytes axis is logarithmic; where a method sends nothing (``local``) it is symmetric-log,
    linear below the smallest non-zero payload, so 0 B stays on the plot.
    """
    fig, ax = plt.subplots(figsize=(7.5, 5))
    sent = [r["uplink_bytes_per_round_mean"] for r in rows if r.get("uplink_bytes_per_round_mean")]
    if any(r.get("uplink_bytes_per_round_mean") == 0 for r in rows) and sent:
        ax.set_xscale("symlog", linthresh=min(sent) / 2)
        ax.set_xlim(-min(sent) / 4, max(sent) * 3)
    elif sent:
        ax.set_xscale("log")
        ax.set_xlim(min(sent) / 3, max(sent) * 3)  # explicit: one payload alone is no range
    for i, row in enumerate(rows):
        x, xerr = row.get("uplink_bytes_per_round_mean"), row.get("uplink_bytes_per_round_std") or 0.0
        if x is None:
            continue
        color = _color(row["method"], i)
        for key, _, marker, size, filled in _ACCURACY_VIEWS:
            y = row.get(f"{key}_mean")
            if y is None:
                continue
            ax.errorbar(x, y, xerr=xerr, yerr=row.get(f"{key}_std") or 0.0, fmt=marker, ms=size, capsize=3,
                        color=color, mfc=color if filled else "white", mew=1.5)
        if row.get("accuracy_mean") is not None:
            ax.annotate(row["method"], (x, row["accuracy_mean"]), xytext=(6, 4), textcoords="offset points",
                        fontsize=8, color=color)
    for _, legend, marker, size, filled in _ACCURACY_VIEWS:  # one legend entry per view, in grey
        ax.plot([], [], marker, ms=size, color="0.3", mfc="0.3" if filled else "white", mew=1.5, label=legend)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: human_bytes(v)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    clients, _ = setting_labels(rows)
    ax.set_xlabel(f"uplink bytes / round ({clients})")
    ax.set_ylabel("final accuracy (mean over clients)")
    ax.set_title(f"Accuracy vs uplink payload ({_subtitle(rows)})")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, ax, path)


def plot_sweep(points: Sequence[tuple[Any, dict[str, Any]]], key: str, out_dir: Path) -> list[Path]:
    """The sweep's plots: score vs the swept value, accuracy vs cumulative air time and uplink energy."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [plot_sweep_score(points, key, out_dir / "sweep_accuracy.png"),
            plot_accuracy_against(points, key, 1, "cumulative air time (s)", out_dir / "accuracy_vs_airtime.png"),
            plot_accuracy_against(points, key, 2, "cumulative uplink energy (J)",
                                  out_dir / "accuracy_vs_uplink_energy.png")]


def plot_all(rows: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Every plot of a comparison into ``out_dir``. A PFIT one (instruct family): the judge reward and
    the training-RM reward by round, the communication per round; otherwise the accuracy plots
    (final accuracy vs uplink bytes per round only for runs that report accuracy) and the
    communication per round."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if family_of(rows) == "instruct":
        return [plot_judge_reward(rows, out_dir / "judge_reward_vs_round.png"),
                plot_accuracy(rows, out_dir / "train_rm_reward_vs_round.png"),
                plot_uplink_bytes(rows, out_dir / "uplink_bytes_per_round.png"),
                plot_uplink_delay(rows, out_dir / "uplink_delay_per_round.png")]
    files = [plot_accuracy(rows, out_dir / "accuracy_vs_round.png"),
             plot_uplink_bytes(rows, out_dir / "uplink_bytes_per_round.png"),
             plot_uplink_delay(rows, out_dir / "uplink_delay_per_round.png"),
             plot_accuracy_vs_bytes(rows, out_dir / "accuracy_vs_uplink_bytes.png")]
    if any(r.get("accuracy_mean") is not None for r in rows):
        files.append(plot_final_accuracy_vs_uplink(rows, out_dir / "accuracy_vs_uplink_bytes_per_round.png"))
    return files

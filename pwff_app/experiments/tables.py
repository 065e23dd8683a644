"""Reading finished runs and tabulating them: mean ± std over seeds, CSV and Markdown.

A pure function of the run folders (``summary.json`` and ``rounds.jsonl`` under
``<out>/runs/<variant>-seed<seed>/``): :func:`aggregate_runs` gives one row per variant,
:func:`write_outputs` writes ``comparison.csv`` / ``comparison.md`` and the plots of
:mod:`pwff_app.experiments.plots`.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pwff_app.experiments.profiles import ALL_METHODS, variant_of

PFTT_TITLE = "PFTT vs contenders (Fig. 5)"
PFIT_TITLE = "PFIT vs contenders (Fig. 4)"
COMPRESSION_TITLE = "PFTT with compressed updates (issue 17)"
WIDTHS_TITLE = "PFTT adapter widths vs FedLoRA and local (Fig. 5, issue 18)"

# Columns of comparison.csv: (key, what it is).
METRICS: tuple[tuple[str, str], ...] = (
    ("accuracy", "final personalized accuracy"),
    ("global_accuracy", "final accuracy on the global test set"),
    ("shared_only_accuracy", "final accuracy of the shared part alone, global test set"),
    ("reward", "final training-RM reward on the test prompts (instruction tuning)"),
    ("uplink_bytes_per_round", "uplink bytes / round (all clients)"),
    ("downlink_bytes_per_round", "downlink bytes / round (all clients)"),
    ("ergodic_uplink_delay_s", "uplink delay / round, ergodic (s)"),
    ("median_uplink_delay_s", "uplink delay, median (s)"),
    ("p95_uplink_delay_s", "uplink delay, p95 (s)"),
    ("mean_uplink_delay_s", "uplink delay / round, mean over fades (s)"),
    ("energy_per_round_j", "energy / round (J)"),
    ("latency_per_round_s", "round latency, mean (s)"),
    ("median_round_latency_s", "round latency, median (s)"),
    ("p95_round_latency_s", "round latency, p95 (s)"),
    ("uplink_loss_rate", "uplink updates lost"),
    ("air_time_s", "air time, whole run (s)"),
    ("uplink_energy_j", "uplink energy, whole run (J)"),
    ("late_rate", "updates late (share of scheduled)"),
    ("jain_delivered", "Jain's index of updates delivered"),
)
# The instruct family's final evaluation (summary.json reward.means: the mean over clients of each
# client's last evaluation on the test prompts), added to METRICS for the PFIT comparison.
PFIT_METRICS: tuple[tuple[str, str], ...] = (
    ("judge_combined", "final judge reward, client's preference mix"),
    ("judge_helpfulness", "final judge helpfulness"),
    ("judge_safety", "final judge safety"),
    ("train_rm_reward", "final training-RM reward, client's preference mix"),
    ("train_rm_helpfulness", "final training-RM helpfulness"),
    ("train_rm_safety", "final training-RM safety"),
    ("kl", "final KL to the pretrained reference (nats)"),
    ("response_tokens", "final mean response length (tokens)"),
    ("refusal_share", "final share of refusal-like responses"),
)
# summary.json reward.means key of each PFIT metric
_PFIT_SOURCE = {"judge_combined": "judge_combined", "judge_helpfulness": "judge_helpfulness",
                "judge_safety": "judge_safety", "train_rm_reward": "combined", "train_rm_helpfulness": "helpfulness",
                "train_rm_safety": "safety", "kl": "kl", "response_tokens": "response_tokens",
                "refusal_share": "refusal_share"}
# The tables of comparison.md: (key, header, format). Delay and latency get their own table,
# with median and p95 beside the mean: the Rayleigh delay's mean is infinite (MD_NOTES).
RESULT_COLUMNS = (("accuracy", "final personalized accuracy", "acc"),
                  ("global_accuracy", "global test set accuracy", "acc"),
                  ("shared_only_accuracy", "shared part alone, global test set", "acc"),
                  ("reward", "final training-RM reward, test prompts", "float"),
                  ("uplink_bytes_per_round", "uplink bytes / round", "bytes"),
                  ("downlink_bytes_per_round", "downlink bytes / round", "bytes"),
                  ("energy_per_round_j", "energy / round (J)", "float"),
                  ("uplink_loss_rate", "uplink updates lost", "pct"),
                  ("n_seeds", "seeds", "int"))
PFIT_COLUMNS = (("judge_combined", "judge reward (combined)", "float"),
                ("judge_helpfulness", "judge helpfulness", "float"),
                ("judge_safety", "judge safety", "float"),
                ("train_rm_reward", "training-RM reward (combined)", "float"),
                ("uplink_bytes_per_round", "uplink bytes / round", "bytes"),
                ("ergodic_uplink_delay_s", "uplink delay, ergodic (s)", "float"),
                ("energy_per_round_j", "energy / round (J)", "float"),
                ("n_seeds", "seeds", "int"))
BEHAVIOUR_COLUMNS = (("kl", "KL to reference", "float"),
                     ("response_tokens", "response tokens", "float"),
                     ("refusal_share", "refusal-like", "pct"),
                     ("train_rm_helpfulness", "training-RM helpfulness", "float"),
                     ("train_rm_safety", "training-RM safety", "float"),
                     ("uplink_loss_rate", "uplink updates lost", "pct"))
DELAY_COLUMNS = (("ergodic_uplink_delay_s", "uplink delay, ergodic (s)", "float"),
                 ("mean_uplink_delay_s", "uplink delay, mean (s)", "float"),
                 ("median_uplink_delay_s", "uplink delay, median (s)", "float"),
                 ("p95_uplink_delay_s", "uplink delay, p95 (s)", "float"),
                 ("latency_per_round_s", "round latency, mean (s)", "float"),
                 ("median_round_latency_s", "round latency, median (s)", "float"),
                 ("p95_round_latency_s", "round latency, p95 (s)", "float"))


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


def channel_label(summary: dict[str, Any]) -> str | None:
    """The run's link as a label, from its own config: ``5 dB Rayleigh``, ``10/5/5/0 dB Rayleigh``
    (per client), ``ideal link``; None when the summary does not say."""
    wireless = summary.get("wireless") or {}
    config = {**(summary.get("config") or {}), **(wireless.get("config") or {})}
    if wireless.get("enabled") is False or config.get("wireless.enabled") is False:
        return "ideal link"
    snr = config.get("wireless.snr-db")
    return None if snr is None else f"{'/'.join(str(snr).replace(' ', '').split(','))} dB Rayleigh"


def _clients_of(summary: dict[str, Any]) -> int | None:
    n = summary.get("num_clients", (summary.get("config") or {}).get("num-clients"))
    return None if n is None else int(n)


def air_time_s(wireless_round: dict[str, Any]) -> float:
    """A round's time on the air in s: the slowest client's downlink + uplink delay, capped at the
    round's latency (a deadline stops the round). Compute time is left out: it is measured wall
    time, not the link's."""
    air = max((c["delay_down_s"] + c["delay_up_s"] for c in wireless_round["clients"].values()), default=0.0)
    return min(air, wireless_round["latency_s"])


def score_key(summary: dict[str, Any]) -> str:
    """What a run scores its clients by: ``accuracy`` (task tuning) or ``reward`` (instruction tuning)."""
    return "reward" if "reward" in summary and "accuracy" not in summary else "accuracy"


def read_rounds(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``rounds.jsonl`` in a run folder (none if it has no such file)."""
    path = Path(run_dir) / "rounds.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_run(run_dir: Path) -> dict[str, Any]:
    """The numbers of one finished run folder (its ``summary.json`` and ``rounds.jsonl``).

    ``curve``: (round, mean score over clients) of every round, the score being the run's
    :func:`score_key`, which ``score`` names. ``link_curve``: per round (round, cumulative air
    time in s, cumulative uplink energy in J, accuracy_mean or None) from ``rounds.jsonl``
    (rounds with link traffic).
    """
    run_dir = Path(run_dir)
    s = json.loads((run_dir / "summary.json").read_text())
    w = s.get("wireless") or {}
    n_rounds = _num(w.get("rounds")) or _num(s.get("num_rounds"))
    energy = _num(w.get("total_energy_j"))
    comm = s.get("comm") or {}
    score = score_key(s)
    rounds = read_rounds(run_dir)
    curve = [(int(r["round"]), _num(r.get(f"{score}_mean"))) for r in rounds]
    curve = [(rnd, v) for rnd, v in curve if v is not None]
    reward = s.get("reward") or {}  # instruct runs: the final evaluation (runs before judges: "mean" only)
    means = {"combined": reward.get("mean"), **(reward.get("means") or {})}
    judge_curve: list[tuple[int, float]] = []  # (round, mean judge reward over the clients evaluated)
    sent: list[tuple[int, float]] = []  # (round, uplink bytes of every client up to and with it)
    link_curve: list[tuple[int, float, float, float | None]] = []
    air = energy_up = 0.0
    scheduled = late = 0
    total = 0.0
    for r in rounds:
        total += _num(r.get("uplink_bytes")) or 0.0
        sent.append((int(r["round"]), total))
        link = r.get("wireless")
        if link and link.get("clients"):
            air += air_time_s(link)
            energy_up += link["energy_up_j"]
            scheduled += link["participants"]
            late += link.get("late", 0)
            link_curve.append((int(r["round"]), air, energy_up, _num(r.get("accuracy_mean"))))
        judged = [_num(c.get("judge_combined")) for c in (r.get("clients") or {}).values()]
        judged = [v for v in judged if v is not None]
        if judged:
            judge_curve.append((int(r["round"]), statistics.fmean(judged)))
    accuracy = s.get("accuracy") or {}
    return {
        "variant": variant_of(run_dir.name),
        "method": s.get("method") or variant_of(run_dir.name),
        "seed": _seed_of(run_dir, s),
        "run_dir": str(run_dir),
        "accuracy": _num(accuracy.get("mean")),
        "global_accuracy": _num(accuracy.get("global_mean")),
        "shared_only_accuracy": _num(accuracy.get("shared_only_mean")),
        "reward": _num((s.get("reward") or {}).get("mean")),
        "score": score,
        "uplink_bytes_per_round": _num((comm.get("uplink_bytes_per_round") or {}).get("total")),
        "downlink_bytes_per_round": _num((comm.get("downlink_bytes_per_round") or {}).get("total")),
        "ergodic_uplink_delay_s": _num(w.get("ergodic_uplink_delay_s")),
        "median_uplink_delay_s": _num(w.get("median_uplink_delay_s")),
        "p95_uplink_delay_s": _num(w.get("p95_uplink_delay_s")),
        "mean_uplink_delay_s": _num(w.get("mean_uplink_delay_s")),
        "energy_per_round_j": energy / n_rounds if energy is not None and n_rounds else None,
        "latency_per_round_s": _num(w.get("mean_round_latency_s")),
        "median_round_latency_s": _num(w.get("median_round_latency_s")),
        "p95_round_latency_s": _num(w.get("p95_round_latency_s")),
        "uplink_loss_rate": _num(w.get("loss_rate")),
        "air_time_s": air if link_curve else None,
        "uplink_energy_j": energy_up if link_curve else None,
        "late_rate": late / scheduled if scheduled else None,
        "jain_delivered": _num((w.get("fairness") or {}).get("jain_updates_delivered")),
        "num_rounds": s.get("num_rounds"),
        "num_clients": _clients_of(s),
        "channel": channel_label(s),
        "curve": curve,
        "judge_curve": judge_curve,
        "uplink_bytes_curve": sent,
        "link_curve": link_curve,
        **{k: _num(means.get(src)) for k, src in _PFIT_SOURCE.items()},
    }


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n-1; 0 for one value) of the non-missing values."""
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def aggregate_runs(run_dirs: Iterable[Path], method_order: Sequence[str] = ALL_METHODS) -> list[dict[str, Any]]:
    """One row per variant (the run folder's name up to ``-seed<S>``; for a plain reproduction the
    method): ``<metric>_mean`` / ``<metric>_std`` over seeds for every metric of :data:`METRICS`
    and :data:`PFIT_METRICS`, ``n_seeds``, ``seeds``, the mean +- std accuracy ``curve`` and judge
    reward ``judge_curve`` by round (``(round, mean, std, n)``) and the mean cumulative
    ``uplink_bytes_curve`` (round -> bytes of every client so far). ``method`` is the row's
    label (the variant), ``methods`` the runs' own ``method`` values.

    Folders without ``summary.json`` are ignored. Rows follow ``method_order``, then others.
    """
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for d in run_dirs:
        if (Path(d) / "summary.json").exists():
            r = read_run(Path(d))
            by_variant.setdefault(r["variant"], []).append(r)
    order = [m for m in method_order if m in by_variant] + sorted(m for m in by_variant if m not in method_order)
    rows = []
    for m in order:
        runs = sorted(by_variant[m], key=lambda r: (r["seed"] is None, r["seed"] or 0))
        row: dict[str, Any] = {"method": m, "methods": sorted({r["method"] for r in runs}),
                               "n_seeds": len(runs), "seeds": [r["seed"] for r in runs]}
        for key in ("num_clients", "channel", "score"):  # what the runs were, from their own configs
            row[key] = sorted({r[key] for r in runs if r[key] is not None})
        for key, _ in METRICS + PFIT_METRICS:
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std(r[key] for r in runs)
        for curve in ("curve", "judge_curve"):
            by_round: dict[int, list[float]] = {}
            for r in runs:
                for rnd, value in r[curve]:
                    by_round.setdefault(rnd, []).append(value)
            row[curve] = [(rnd, *mean_std(v), len(v)) for rnd, v in sorted(by_round.items())]
        sent: dict[int, list[float]] = {}
        for r in runs:
            for rnd, total in r.get("uplink_bytes_curve", []):
                sent.setdefault(rnd, []).append(total)
        row["uplink_bytes_curve"] = {rnd: mean_std(v)[0] for rnd, v in sorted(sent.items())}
        row["link_curve"] = _mean_link_curve(runs)
        rows.append(row)
    return rows


def _mean_link_curve(runs: Sequence[dict[str, Any]]) -> list[tuple[int, float, float, float | None]]:
    """Per round, the means over seeds of (cumulative air time s, cumulative uplink energy J, accuracy)."""
    by_round: dict[int, list[tuple[float, float, float | None]]] = {}
    for r in runs:
        for rnd, air, energy, acc in r["link_curve"]:
            by_round.setdefault(rnd, []).append((air, energy, acc))
    return [(rnd, statistics.fmean(v[0] for v in vals), statistics.fmean(v[1] for v in vals),
             mean_std(v[2] for v in vals)[0]) for rnd, vals in sorted(by_round.items())]


def find_run_dirs(out_dir: Path) -> list[Path]:
    """The run folders under ``<out_dir>/runs``, finished or not, sorted by name."""
    runs = Path(out_dir) / "runs"
    return sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []


def family_of(rows: Sequence[dict[str, Any]]) -> str:
    """``instruct`` when every run behind ``rows`` is an instruct-family method (a PFIT comparison), else ``task``."""
    from pwff_app.methods import METHODS

    families = {METHODS[m].family for r in rows for m in r.get("methods", []) if m in METHODS}
    return "instruct" if families == {"instruct"} else "task"


_NOT_IN_PFIT_CSV = frozenset({"accuracy", "global_accuracy", "shared_only_accuracy", "reward"})


def csv_metrics(family: str) -> tuple[tuple[str, str], ...]:
    """The metrics of comparison.csv: a PFIT comparison has the reward metrics instead of accuracy."""
    if family != "instruct":
        return METRICS
    # no accuracies; "reward" (reward.mean) is PFIT_METRICS' train_rm_reward
    return PFIT_METRICS + tuple(m for m in METRICS if m[0] not in _NOT_IN_PFIT_CSV)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """``comparison.csv``: one row per method, ``<metric>_mean`` / ``<metric>_std`` columns (:func:`csv_metrics`)."""
    metrics = csv_metrics(family_of(rows))
    header = ["method", "n_seeds", "seeds"] + [f"{k}_{s}" for k, _ in metrics for s in ("mean", "std")]
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


def setting_labels(rows: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """(clients, channel) labels of the runs behind ``rows``, e.g. ``("4 clients", "5 dB Rayleigh")``;
    where runs differ, every value (``"2/4 clients"``); where no run says, ``"? clients"`` / ``"link n/a"``."""
    clients = sorted({n for r in rows for n in r.get("num_clients", [])})
    channels = sorted({c for r in rows for c in r.get("channel", [])})
    return (f"{'/'.join(map(str, clients)) or '?'} client{'' if clients == [1] else 's'}",
            " | ".join(channels) or "link n/a")


def markdown_table(rows: Sequence[dict[str, Any]], cols: Sequence[tuple[str, str, str]] | None = None) -> str:
    """One comparison table: mean ± sample std over seeds of ``cols``, one row per method.

    ``cols`` defaults to the family's headline columns: ``PFIT_COLUMNS`` (judge and training-RM
    rewards) for instruction tuning, ``RESULT_COLUMNS`` otherwise.

    A column no row has a value for (``reward`` of task runs, ``shared_only_accuracy`` without
    PFTT, the global columns of runs from before the global test set) is left out.
    """
    if cols is None:
        cols = PFIT_COLUMNS if family_of(rows) == "instruct" else RESULT_COLUMNS
    cols = [c for c in cols if c[0] == "n_seeds" or any(row.get(f"{c[0]}_mean") is not None for row in rows)]
    lines = ["| method | " + " | ".join(c[1] for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for row in rows:
        cells = [str(row["n_seeds"]) if k == "n_seeds" else _fmt(row[f"{k}_mean"], row[f"{k}_std"], kind)
                 for k, _, kind in cols]
        lines.append(f"| `{row['method']}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


MD_NOTES = """
Mean ± sample standard deviation (n−1) over seeds. *Final personalized accuracy*: mean over
the {clients} of each client's accuracy on its own test split in the last round
(`summary.json` `accuracy.mean`). *Global test set accuracy*: the same clients' models (global
shared part + own private part) on one balanced set of AG News test rows, the same for every
client (`accuracy.global_mean`). *Shared part alone*: PFTT's global adapters with each client's
head and no private LoRA, on the global test set (`accuracy.shared_only_mean`). *Bytes / round*: summed over the {clients}, mean over rounds
(`comm.*_bytes_per_round.total`). *Energy / round*: uplink + downlink transmit energy of all
clients, `wireless.total_energy_j` / rounds. *Uplink bytes* count delivered updates only (a lost
update is not in `comm`); *uplink updates lost* is the share of attempted uplinks lost after
retransmissions (`wireless.loss_rate`).
"""
DELAY_NOTES = """
Delay and latency ({channel}): the Rayleigh delay payload / (B · log2(1 + SNR·|h|²)) has an
infinite mean (E[1/|h|²] diverges near |h|² = 0), so its sample mean over fades
(`wireless.mean_uplink_delay_s`) is ruled by the rare deep fades and does not settle; the
median and the 95th percentile over all uplinks of a run (`median_uplink_delay_s`,
`p95_uplink_delay_s`) say what a typical and a bad upload cost. *Ergodic*: mean over rounds of
the mean over clients of payload / (B · E[log2(1 + SNR·|h|²)]). *Round latency*: per round the
slowest client's downlink + compute + uplink (`rounds.jsonl` `wireless.latency_s`), then mean,
median and p95 over the rounds of a run (`wireless.*_round_latency_s`).
"""
MD_NOTES += DELAY_NOTES


PFIT_NOTES = """
Mean ± sample standard deviation (n−1) over seeds of the final round's evaluation on the **test**
prompts (a fixed Alpaca split no client trains on; `summary.json` `reward.means`: the mean over
the {clients} of each client's last evaluation). *Judge reward*: the judges (cross-encoders
trained on the other half of HH-RLHF, never used in training), helpfulness and safety in their
standardised units and *combined* with each client's own preference weights
(`instruct.reward-weights`), whatever its method trains on. *Training-RM reward*: the same mix of
the reward models PPO optimises (Shepherd trains on none). *KL*: to the pretrained reference,
nats per response; *response tokens*: mean length; *refusal-like*: share of responses matching
the rule of `pwff_app/instruct/evaluation.py`. *Bytes / round*, *energy / round*, delays: as in
the PFTT comparison (delivered updates of all clients; transmit energy up + down per round).
"""


def write_markdown(rows: Sequence[dict[str, Any]], path: Path, title: str = PFTT_TITLE,
                   header: str = "") -> Path:
    """``comparison.md``: title, ``header`` (what was run), the runs' own setting, the tables (a PFIT
    comparison's: rewards, then behaviour) and how to read them."""
    clients, channel = setting_labels(rows)
    if family_of(rows) == "instruct":
        tables = (markdown_table(rows, PFIT_COLUMNS) + "\n## Behaviour (final round)\n\n"
                  + markdown_table(rows, BEHAVIOUR_COLUMNS))
        notes = PFIT_NOTES.format(clients=clients) + DELAY_NOTES.format(channel=channel)
    else:
        tables, notes = markdown_table(rows), MD_NOTES.format(clients=clients, channel=channel)
    text = (f"# {title}\n\n" + (header.strip() + "\n\n" if header else "")
            + f"Runs (from each run's `summary.json`): {clients}, {channel}.\n\n" + tables
            + f"\n## Delay and latency ({channel})\n\n" + markdown_table(rows, DELAY_COLUMNS) + notes)
    Path(path).write_text(text)
    return Path(path)


def write_outputs(out_dir: Path, rows: Sequence[dict[str, Any]], header: str = "",
                  title: str = PFTT_TITLE) -> list[Path]:
    """comparison.csv, comparison.md (headed ``title``) and the PNG plots into ``out_dir``."""
    from pwff_app.experiments import plots  # lazy: matplotlib loads only when plots are drawn

    out_dir = Path(out_dir)
    files = [write_csv(rows, out_dir / "comparison.csv"), write_markdown(rows, out_dir / "comparison.md", title, header)]
    files += plots.plot_all(rows, out_dir)
    return files

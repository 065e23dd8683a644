"""``pwff sweep``: one method over a grid of one setting, several seeds, real ``flwr run``s.

The setting is typically a wireless one: SNR, cell radius, deadline, selection, clients per round.

Each value of the swept key is a :class:`~pwff_app.experiments.profiles.Variant` of the method
(``<key tail>=<value>``, e.g. ``deadline-s=20``) with the ``--base`` overrides under it, run and
resumed by :func:`pwff_app.experiments.reproduce.reproduce` like ``pwff reproduce``
(``comparison.md`` and its plots included). On top, :func:`write_sweep` writes ``sweep.md`` (one
row per value) and three plots: the score vs the swept value, and the accuracy curve against the
cumulative air time and against the cumulative uplink energy.

    pwff sweep --method pftt --set wireless.deadline-s=0,20,60 --seeds 2 \\
        --base wireless.scenario=uma num-clients=8 clients-per-round=4 --quick
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pwff_app.experiments.profiles import Variant
from pwff_app.experiments.tables import markdown_table

# The columns of sweep.md: (key, header, format), as tables.RESULT_COLUMNS.
SWEEP_COLUMNS = (("accuracy", "final personalized accuracy", "acc"),
                 ("air_time_s", "air time, run (s)", "float"),
                 ("uplink_energy_j", "uplink energy, run (J)", "float"),
                 ("latency_per_round_s", "round latency, mean (s)", "float"),
                 ("late_rate", "updates late", "pct"),
                 ("uplink_loss_rate", "uplinks lost", "pct"),
                 ("jain_delivered", "Jain's index, updates delivered", "float"),
                 ("n_seeds", "seeds", "int"))

SWEEP_NOTES = """
Mean ± sample standard deviation (n−1) over seeds. *Air time*: per round the slowest client's
downlink + uplink delay (capped at the deadline), summed over the run's rounds; compute time is
left out (it is measured wall time). *Uplink energy*: every client's transmit energy, whole run.
*Round latency*: the slowest client's downlink + compute + uplink, capped at the deadline.
*Updates late*: share of the scheduled updates that arrived after `wireless.deadline-s`.
*Jain's index*: (Σx)² / (n Σx²) over the clients' counts of delivered updates (1 = everyone
equally often). In `accuracy_vs_airtime.png` and `accuracy_vs_uplink_energy.png` a round's
accuracy is the mean over the clients it evaluated (with `clients-per-round` < `num-clients`,
those it trained; the last round evaluates everyone).
"""


def parse_value(text: str) -> Any:
    """A command-line value as the run config would read it: bool, int, float, else a string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip().strip("'\"")


def parse_assignment(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` -> (key, value text); a clear error otherwise."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def parse_grid(text: str) -> tuple[str, list[Any]]:
    """``KEY=V1,V2,...`` -> (key, values). Values holding commas themselves (a per-client
    ``wireless.snr-db`` list) are separated by ``;`` instead: ``wireless.snr-db=5,0;10,5``."""
    key, values = parse_assignment(text)
    items = [v for v in values.split(";" if ";" in values else ",") if v.strip()]
    if len(items) < 1:
        raise ValueError(f"--set {key}: no values")
    parsed = [parse_value(v) if ";" not in values else v.strip() for v in items]
    if len(set(map(str, parsed))) != len(parsed):
        raise ValueError(f"--set {key}: a value is listed twice")
    return key, parsed


def value_label(value: Any) -> str:
    """The value as it appears in a variant's name (no characters a folder name cannot hold)."""
    text = str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)
    return text.replace("/", "_").replace(" ", "")


def sweep_variants(method: str, key: str, values: Sequence[Any], base: dict[str, Any]) -> list[Variant]:
    """One variant per value: ``<key tail>=<value>`` running ``method`` with ``base`` and ``key = value``."""
    if key in base:
        raise ValueError(f"--set {key} is also in --base: sweep it or fix it, not both")
    tail = key.rsplit(".", 1)[-1]
    return [Variant(f"{tail}={value_label(v)}", method, {**base, key: v}) for v in values]


def write_sweep(out_dir: Path, rows: Sequence[dict[str, Any]], variants: Sequence[Variant], key: str,
                values: Sequence[Any], header: str = "") -> list[Path]:
    """``sweep.md`` (one row per value with a finished run, in the order swept) and the three plots."""
    from pwff_app.experiments import plots

    by_name = {row["method"]: row for row in rows}
    points = [(value, by_name[v.name]) for v, value in zip(variants, values) if v.name in by_name]
    out_dir = Path(out_dir)
    text = (f"# Sweep of `{key}`\n\n" + (header.strip() + "\n\n" if header else "")
            + markdown_table([row for _, row in points], SWEEP_COLUMNS) + SWEEP_NOTES)
    (out_dir / "sweep.md").write_text(text)
    return [out_dir / "sweep.md", *plots.plot_sweep(points, key, out_dir)]

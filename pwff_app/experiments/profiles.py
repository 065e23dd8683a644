"""What a reproduction runs: the methods, the profiles, and the run config of one run.

A profile is a set of run-config overrides on top of the pyproject defaults; every
(method, seed) pair becomes one ``flwr run`` whose ``--run-config`` is :func:`build_run_config`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Fig. 5 methods first, then the two reference points; also the row order of the tables.
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


def run_name(method: str, seed: int) -> str:
    """Folder (under ``<out>/runs``) and log name of one run."""
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


def profile_header(profile: str, seeds: Sequence[int]) -> str:
    """The line above the comparison table that says what was run."""
    return (f"Profile `{profile}` ({' '.join(f'{k}={v}' for k, v in PROFILES[profile].items())}; "
            f"pyproject defaults otherwise), seeds {list(seeds)}.")

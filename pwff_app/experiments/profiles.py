"""What a reproduction runs: the variants, the profiles, and the run config of one run.

A profile is a set of run-config overrides on top of the pyproject defaults. A
:class:`Variant` is one row of a comparison: a method plus its own overrides (a codec, an
adapter width, a swept wireless setting). Every (variant, seed) pair becomes one ``flwr run``
whose ``--run-config`` is :func:`build_run_config`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Fig. 5 methods first, then the two reference points; also the row order of the tables.
ALL_METHODS: tuple[str, ...] = ("pftt", "vanilla-fl", "fedlora", "fedbert", "local", "fedavg-full")
# Fig. 4: PFIT and its three contenders (methods.py rows); the row order of `pwff reproduce pfit`.
PFIT_METHODS: tuple[str, ...] = ("pfit", "pfl", "sfl", "shepherd")

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
    # Long enough for federation to pay off over local training (issue 18): 10 rounds of 200
    # samples per client. Sized for MEDIUM_METHODS x 3 seeds in under 90 min on 2 idle cores,
    # estimated from the quick profile's timings (docs/reproduce.md, "Profiles").
    "medium": {
        "task.num-rounds": 10,
        "task.max-train-samples": 200,
        "task.max-test-samples": 200,
        "task.max-length": 48,
    },
    # The paper's setting (Sec. V): 4 clients, 40 rounds, Rayleigh, 5 dB; else pyproject defaults.
    "full": {
        "task.num-rounds": 40,
    },
    # Fig. 4 on 2 CPU cores: 4 methods x 3 seeds in < 60 min. Sized from the default PFIT job
    # (4 clients, 5 rounds, 16 prompts x 4 samples, 4 PPO steps, 24 new tokens: 17 m 23 s idle):
    # 2 clients (one per core, one of each preference), 3 rounds, a third of the rollout tokens per
    # round (8 x 4 x 16) and a twelfth of the evaluation's (8 x 4 x 16); docs/fig4.md has the sums.
    "pfit-quick": {
        "num-clients": 2,
        "instruct.num-rounds": 3,
        "instruct.prompts-per-round": 8,
        "instruct.ppo-steps": 2,
        "instruct.max-new-tokens": 16,
        "instruct.eval-prompts": 8,
        "instruct.eval-samples": 4,
    },
    # The paper's Fig. 4 setting: 4 clients, 40 rounds, Rayleigh, 5 dB (pyproject defaults), for a GPU.
    "pfit-full": {
        "instruct.num-rounds": 40,
    },
}
# Wall-clock limit of one run (seconds) per profile; a run past it counts as failed.
# pfit-quick: the first run may also train the reward models and the judges (~7 + ~10 min on 2 cores).
RUN_TIMEOUT_S = {"quick": 900, "medium": 1800, "full": 6 * 3600, "pfit-quick": 2700, "pfit-full": 12 * 3600}
# The methods that decide the paper's claims: the medium profile's default rows.
MEDIUM_METHODS: tuple[str, ...] = ("pftt", "vanilla-fl", "fedlora", "local")
# Beside PFTT's adapter widths (--adapter-sizes): FedLoRA at its LoRA rank, and local training.
WIDTH_CONTENDERS: tuple[str, ...] = ("fedlora", "local")
DEFAULT_SEED_BASE = 42


@dataclass(frozen=True)
class Variant:
    """One row of a comparison: ``method`` run with ``overrides`` (flat run-config keys) on top of
    the profile; ``name`` labels the row and prefixes its run folders (``<name>-seed<S>``)."""

    name: str
    method: str
    overrides: Mapping[str, Any] = field(default_factory=dict)


def as_variants(items: Iterable[Variant | str]) -> list[Variant]:
    """Variants as given; a bare method name is the method with no overrides."""
    return [v if isinstance(v, Variant) else Variant(v, v) for v in items]


def adapter_width_variants(sizes: Sequence[int]) -> list[Variant]:
    """PFTT at each adapter width (``task.adapter-size``), named ``pftt-a<width>``."""
    return [Variant(f"pftt-a{n}", "pftt", {"task.adapter-size": int(n)}) for n in sizes]


def run_name(name: str, seed: int) -> str:
    """Folder (under ``<out>/runs``) and log name of one run of the variant called ``name``."""
    return f"{name}-seed{seed}"


def variant_of(run_dir_name: str) -> str:
    """The variant label of a run folder: its name up to ``-seed<S>`` (``pftt-seed42-20261202`` -> ``pftt``)."""
    return run_dir_name.rsplit("-seed", 1)[0] if "-seed" in run_dir_name else run_dir_name


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("'", "") + "'"


def build_run_config(variant: Variant | str, seed: int, runs_dir: Path, profile: str) -> str:
    """The ``--run-config`` string of one run: profile overrides, the variant's, then method, seed, paths."""
    (v,) = as_variants([variant])
    values: dict[str, Any] = {**PROFILES[profile], **v.overrides}
    values.update({"method": v.method, "seed": int(seed), "results-dir": str(runs_dir.resolve()),
                   "run-name": run_name(v.name, seed)})
    return " ".join(f"{k}={_toml_value(v)}" for k, v in values.items())


def profile_header(profile: str, seeds: Sequence[int]) -> str:
    """The line above the comparison table that says what was run."""
    return (f"Profile `{profile}` ({' '.join(f'{k}={v}' for k, v in PROFILES[profile].items())}; "
            f"pyproject defaults otherwise), seeds {list(seeds)}.")


# issue 17: PFTT with compressed uplinks. Labels avoid ':' (they name run folders). The adaptive
# target (2 s) sits between the expected uplink time of fp16 (2.8 s) and int8 (1.4 s) of PFTT's
# 1.19 MB update at the default 5 dB / 1 MHz link (ergodic 1.7 Mbit/s): set from the link, not from results.
COMPRESSION_VARIANTS: tuple[Variant, ...] = (
    Variant("none", "pftt", {"compression.uplink": "none"}),
    Variant("fp16", "pftt", {"compression.uplink": "fp16"}),
    Variant("int8", "pftt", {"compression.uplink": "int8"}),
    Variant("topk0.1-ef", "pftt", {"compression.uplink": "topk:0.1", "compression.error-feedback": True}),
    Variant("topk0.1-noef", "pftt", {"compression.uplink": "topk:0.1", "compression.error-feedback": False}),
    Variant("adaptive", "pftt", {"compression.uplink": "adaptive", "compression.target-delay-s": 2.0}),
)

"""Server checkpoints: the global shared weights and the round they belong to.

Written after every round (temp file + rename), so an interrupted run can continue from its
last complete round with ``resume=true`` and the same ``run-name``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord

from pwff_app.config import ConfigError, RunConfig
from pwff_app.files import write_atomic, write_npz_atomic


def save_checkpoint(out_dir: Path, server_round: int, arrays: ArrayRecord, meta: dict) -> None:
    """Write ``checkpoint.npz`` then ``checkpoint.json`` (the JSON names the round: written last)."""
    write_npz_atomic(out_dir / "checkpoint.npz", {k: v.numpy() for k, v in arrays.items()})
    write_atomic(out_dir / "checkpoint.json",
                 lambda tmp: tmp.write_text(json.dumps({"round": server_round, **meta}, sort_keys=True)))


def load_checkpoint(out_dir: Path) -> tuple[int, ArrayRecord, dict] | None:
    """(round, global arrays, meta) of the last checkpoint, or None if there is none."""
    meta_path = out_dir / "checkpoint.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    with np.load(out_dir / "checkpoint.npz") as f:
        arrays = ArrayRecord({k: Array(f[k]) for k in f.files})
    return int(meta.pop("round")), arrays, meta


def checkpoint_meta(cfg: RunConfig) -> dict:
    """What a checkpoint records of its run, and what a resumed run must match."""
    return {"method": cfg.method, "seed": cfg.seed}


def resume_point(out_dir: Path, meta: dict) -> tuple[int, ArrayRecord]:
    """(rounds done, global arrays) to continue ``out_dir`` from; one-line error if impossible.

    ``meta`` is what the run must have been (:func:`checkpoint_meta`): another run's checkpoint is refused.
    """
    checkpoint = load_checkpoint(out_dir)
    if checkpoint is None:
        raise ConfigError(f"run config: 'resume' is set but {out_dir} holds no checkpoint")
    done, arrays, saved = checkpoint
    if any(saved.get(k) != v for k, v in meta.items()):
        raise ConfigError(f"run config: checkpoint in {out_dir} is {saved}, not {meta}")
    return done, arrays

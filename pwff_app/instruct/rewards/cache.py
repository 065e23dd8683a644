"""The PFIT reward models on disk: trained once, then loaded.

A cache entry is ``<cache_dir>/<key>.safetensors`` (both heads and their standardisation
stats) + ``<key>.json`` (the metrics, written last: it marks the entry complete), the key
covering the cache format, the config, the encoder and the data (the files' sizes and hashes,
or the Hub id, data dir, row count and a hash of the rows).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pwff_app.files import cache_dir, write_atomic, write_json_atomic
from pwff_app.instruct.rewards.data import HALF_SEED, HH_FILES, HH_HUB_ID, objective_fingerprint
from pwff_app.instruct.rewards.model import (
    RewardConfig,
    RewardModels,
    SentenceEncoder,
    encoder_ident_for,
    load_encoder,
)
from pwff_app.instruct.rewards.training import train_reward_models

_CACHE_FORMAT = 2  # bump when the saved layout or the training recipe changes meaning (2: the RM half)


def default_cache_dir() -> Path:
    """``$PWFF_CACHE_DIR/reward-models``, else ``~/.cache/pwff/reward-models``."""
    return cache_dir("reward-models")


def cache_key(config: Any, encoder_ident: str, data_dir: str | Path | None,
              dataset: str = HH_HUB_ID) -> str:
    """Hex key over the cache format, the recipe (its dataclass type and every field: a
    :class:`RewardConfig` or a judges' :class:`~.judges.JudgeConfig`), the encoder's identity and
    the data (files, else Hub rows), with the fixed half split (:data:`~.data.HALF_SEED`)."""
    data = {name: objective_fingerprint(data_dir, name, dataset) for name in HH_FILES}
    blob = json.dumps(
        {"format": _CACHE_FORMAT, "recipe": type(config).__name__, "config": asdict(config),
         "encoder": encoder_ident, "data": data, "half_seed": HALF_SEED}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _encoder_ident(config: RewardConfig, encoder: SentenceEncoder | None) -> str:
    """The loaded encoder's identity, else the one ``config`` names (the key must not need the slow load)."""
    return encoder.ident if encoder is not None else encoder_ident_for(config.encoder)


def save_reward_models(models: RewardModels, path: Path) -> None:
    """Save both heads (+ standardisation stats) to ``path`` (.safetensors) and metrics to .json.

    The JSON is written last and marks the cache entry complete.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{name}.{k}": v.detach().cpu().contiguous()
        for name, model in models.objectives().items()
        for k, v in model.head_state().items()
    }
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": str(_CACHE_FORMAT)}))
    record = {"config": asdict(models.config), "encoder": models.encoder.ident, **models.metrics}
    write_json_atomic(path.with_suffix(".json"), record)
    models.cache_path = path


def load_reward_models(path: Path, config: RewardConfig, encoder: SentenceEncoder) -> RewardModels:
    """Rebuild the models of ``config`` over ``encoder`` (on its device) from a file written by save_reward_models."""
    tensors = load_file(path)
    models = RewardModels(encoder, config)
    for name, model in models.objectives().items():
        prefix = f"{name}."
        model.load_head_state({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    record = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    models.metrics = {k: v for k, v in record.items() if k not in ("config", "encoder")}
    models.cache_path, models.from_cache = path, True
    return models.eval()


def cache_entry(cache_dir: str | Path, config: RewardConfig, data_dir: str | Path | None,
                dataset: str = HH_HUB_ID, encoder: SentenceEncoder | None = None) -> Path:
    """The cache entry's ``.safetensors`` path for these models (complete once its ``.json`` exists)."""
    key = cache_key(config, _encoder_ident(config, encoder), data_dir, dataset)
    return Path(cache_dir).expanduser() / f"{key}.safetensors"


def load_or_train_reward_models(
    data_dir: str | Path | None,
    cache_dir: str | Path,
    config: RewardConfig = RewardConfig(),
    progress: bool = True,
    *,
    force: bool = False,
    encoder: SentenceEncoder | None = None,
    dataset: str = HH_HUB_ID,
    device: torch.device = torch.device("cpu"),
) -> RewardModels:
    """The reward models for ``config``: from ``cache_dir`` if trained before, else trained and saved.

    HH-RLHF comes from the files under ``data_dir`` when it is set, else from the Hub's ``dataset``.
    The cache entry is ``<cache_dir>/<key>.safetensors`` + ``<key>.json`` (metrics), the key
    covering the config, the encoder and the data (files' or Hub rows' sizes and hashes); ``force`` retrains.
    The models live, and train, on ``encoder``'s device (default: the encoder loaded on ``device``).
    """
    path = cache_entry(cache_dir, config, data_dir, dataset, encoder)
    encoder = encoder or load_encoder(config.encoder, config.max_length, device)
    if not force and path.is_file() and path.with_suffix(".json").is_file():
        return load_reward_models(path, config, encoder)
    models, _ = train_reward_models(data_dir, config, progress=progress, encoder=encoder, dataset=dataset)
    save_reward_models(models, path)
    return models

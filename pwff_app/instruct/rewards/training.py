"""Training the PFIT reward heads: pairwise Bradley-Terry loss on precomputed encoder features.

``-log sigmoid(r_chosen - r_rejected)`` with AdamW and early stopping on a validation split of
the HH-RLHF training part (seconds per epoch: the encoder runs once per pair, not per epoch);
then each model's output is standardised on its training split, and the held-out accuracy is
measured once, after all choices.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pwff_app.device import fork_rng
from pwff_app.instruct.rewards.data import HH_FILES, HH_HUB_ID, PreferencePair, half_of, objective_pairs, split_indices
from pwff_app.instruct.rewards.model import (
    RewardConfig,
    RewardModel,
    RewardModels,
    SentenceEncoder,
    featurize,
    load_encoder,
)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Mean of ``-log sigmoid(r_chosen - r_rejected)`` (softplus form: stable for large gaps)."""
    return F.softplus(r_rejected - r_chosen).mean()


def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Share of pairs where the chosen response scores higher; a tie counts half."""
    wins = (r_chosen > r_rejected).float() + 0.5 * (r_chosen == r_rejected).float()
    return wins.mean().item()


def _pair_features(
    encoder: SentenceEncoder, config: RewardConfig, pairs: Sequence[PreferencePair], progress: bool, desc: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of the chosen and of the rejected sides, ``[P, D]`` each, in one encoder pass, on its device."""
    prompts = [p.chosen_prompt for p in pairs] + [p.rejected_prompt for p in pairs]
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    feats = featurize(encoder, config, prompts, responses, progress=progress, desc=desc).to(encoder.device)
    return feats[: len(pairs)], feats[len(pairs) :]


def fit_reward_model(
    model: RewardModel,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    config: RewardConfig,
    progress: bool = False,
    desc: str = "train",
) -> dict[str, float]:
    """Train ``model``'s head with the Bradley-Terry loss on precomputed (chosen, rejected) features.

    Standardises the features with the training stats first and keeps the epoch with the lowest
    validation loss. Features and model on one device. Returns train/val accuracy, the best
    validation loss and its epoch.
    """
    (f_c, f_r), (v_c, v_r) = train, val
    both = torch.cat([f_c, f_r])
    model.feature_mean.copy_(both.mean(0))
    model.feature_std.copy_(both.std(0).clamp(min=1e-6))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the head's matmuls are tiny: more threads cost more than they save
    try:
        with fork_rng(f_c.device):  # seeded init and dropout without touching the global RNG
            torch.manual_seed(config.seed)
            best_loss, best_epoch = _train_head(model, (f_c, f_r), (v_c, v_r), config, progress, desc)
        model.eval()
        with torch.no_grad():
            return {
                "train_accuracy": pairwise_accuracy(model.raw(f_c), model.raw(f_r)),
                "val_accuracy": pairwise_accuracy(model.raw(v_c), model.raw(v_r)),
                "val_loss": best_loss,
                "best_epoch": best_epoch,
            }
    finally:
        torch.set_num_threads(threads)


def _train_head(
    model: RewardModel,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    config: RewardConfig,
    progress: bool,
    desc: str,
) -> tuple[float, int]:
    """AdamW epochs with early stopping on the validation loss; leaves the best head loaded."""
    (f_c, f_r), (v_c, v_r) = train, val
    for layer in model.net.modules():
        if isinstance(layer, nn.Linear):
            layer.reset_parameters()
    optimiser = torch.optim.AdamW(model.net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    best_loss, best_epoch, best_state = math.inf, 0, copy.deepcopy(model.net.state_dict())
    bar = tqdm(range(1, config.epochs + 1), desc=desc, unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        for idx in torch.randperm(len(f_c), generator=generator).split(config.batch_size):
            loss = bradley_terry_loss(model.raw(f_c[idx]), model.raw(f_r[idx]))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        model.eval()
        with torch.no_grad():
            val_loss = bradley_terry_loss(model.raw(v_c), model.raw(v_r)).item()
        bar.set_postfix(val_loss=f"{val_loss:.4f}")
        if val_loss < best_loss:
            best_loss, best_epoch, best_state = val_loss, epoch, copy.deepcopy(model.net.state_dict())
        elif epoch - best_epoch >= config.patience:
            break
    model.net.load_state_dict(best_state)
    return best_loss, best_epoch


@torch.no_grad()
def standardise_scores(model: RewardModel, features: torch.Tensor) -> None:
    """Set the output scale so that ``model(features)`` has mean 0 and std 1.

    Called with every response (chosen and rejected) of the training split, so helpfulness and
    safety rewards are in comparable units before a client weights them.
    """
    model.eval()
    raw = model.raw(features)
    model.score_mean.copy_(raw.mean())
    model.score_std.copy_(raw.std().clamp(min=1e-6))


def train_reward_models(
    data_dir: str | Path | None,
    config: RewardConfig = RewardConfig(),
    progress: bool = True,
    encoder: SentenceEncoder | None = None,
    dataset: str = HH_HUB_ID,
    device: torch.device = torch.device("cpu"),
) -> tuple[RewardModels, dict]:
    """Train both reward models from HH-RLHF: the files under ``data_dir``, else the Hub's ``dataset``;
    of each file the reward models' half (:func:`~.data.half_of`), the judges keep the other.

    ``encoder`` reuses an already loaded encoder (default: ``load_encoder(config.encoder, ...)``
    on ``device``); it should be the one ``config.encoder`` names, with ``config.max_length``.
    Encoding and training run on the encoder's device.
    Returns the models and the metrics: per objective the held-out accuracy (measured once,
    after all choices), train/val accuracy, split sizes and seconds.
    """
    # The reward models' half of each file (the judges learn from the other); fail before loading anything
    data = {name: half_of(objective_pairs(data_dir, name, dataset), "reward-model") for name in HH_FILES}
    started = time.perf_counter()
    encoder = encoder or load_encoder(config.encoder, config.max_length, device)
    models = RewardModels(encoder, config)
    metrics: dict = {"objectives": {}}
    for name, model in models.objectives().items():
        t0 = time.perf_counter()
        pairs = data[name]
        train_idx, held_idx = split_indices(len(pairs), config.held_out_fraction, config.seed)
        fit_pos, val_pos = split_indices(len(train_idx), config.val_fraction, config.seed + 1)
        f_c, f_r = _pair_features(encoder, config, pairs, progress, desc=f"encode {name}")
        t1 = time.perf_counter()
        fit_idx, val_idx = [train_idx[i] for i in fit_pos], [train_idx[i] for i in val_pos]
        result = fit_reward_model(
            model, (f_c[fit_idx], f_r[fit_idx]), (f_c[val_idx], f_r[val_idx]), config, progress, f"train {name}"
        )
        standardise_scores(model, torch.cat([f_c[train_idx], f_r[train_idx]]))
        with torch.no_grad():
            held_accuracy = pairwise_accuracy(model(f_c[held_idx]), model(f_r[held_idx]))
        metrics["objectives"][name] = {
            "heldout_accuracy": held_accuracy,
            **result,
            "n_pairs": len(pairs),
            "n_train": len(fit_idx),
            "n_val": len(val_idx),
            "n_heldout": len(held_idx),
            "encode_seconds": t1 - t0,
            "train_seconds": time.perf_counter() - t1,
            "seconds": time.perf_counter() - t0,
        }
    metrics["seconds"] = time.perf_counter() - started
    models.metrics = metrics
    return models, metrics

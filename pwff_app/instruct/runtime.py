"""What a PFIT worker process loads once and keeps: the policy bundle and the reward models.

Flower runs many rounds (and, in simulation, many clients) in one worker process; loading the
policy or the reward models per call would cost more than the round. Client handlers and the
server look these up through this module (``runtime.get_bundle``, ``runtime.load_rewards``),
so tests replace :func:`load_base_policy`, :func:`load_rewards` and ``_BUNDLES`` in one place.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pwff_app.config import ConfigError
from pwff_app.instruct.policy import PolicyWithValue, freeze_all_but_last_blocks, frozen_copy, load_policy
from pwff_app.instruct.sparse_attention import enable_sparse_attention

N_BLOCKS = 2  # paper: "we only train the last two layers"


@dataclass
class Bundle:
    """The models of one (policy, LoRA rank): ``lm`` (trained, wrapped by ``policy`` with its value
    head), ``ref`` (the frozen pretrained reference), ``tokenizer``, and the trainable ``blocks``."""

    lm: Any
    tokenizer: Any
    ref: Any
    policy: PolicyWithValue
    blocks: list[str]


_BUNDLES: dict[tuple[str, int], Bundle] = {}
_REWARDS: dict[str, Any] = {}


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


def get_bundle(policy_name: str, lora_rank: int = 0) -> Bundle:
    """The cached (policy, reference, tokenizer) of this process; trainable state is overwritten per call."""
    key = (policy_name, lora_rank)
    if key not in _BUNDLES:
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
        _BUNDLES[key] = Bundle(lm, tok, ref, PolicyWithValue(lm), blocks)
    return _BUNDLES[key]


def load_rewards(data_dir: Path | None) -> Any:
    """The helpfulness + safety reward models (``score(prompts, responses) -> {name: Tensor}``), cached.

    Tests monkeypatch this with a stub scorer.
    """
    key = str(data_dir)
    if key not in _REWARDS:
        from pwff_app.instruct.rewards.cache import default_cache_dir, load_or_train_reward_models

        if data_dir is None:
            raise ConfigError("PFIT needs a data folder with hh-rlhf/ and alpaca/: set 'data-dir' or PWFF_DATA_DIR")
        _REWARDS[key] = load_or_train_reward_models(data_dir, default_cache_dir())
    return _REWARDS[key]

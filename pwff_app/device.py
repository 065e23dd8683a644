"""Where tensors live and in which precision: one ``device`` and one ``precision`` setting.

``device``: ``auto`` (CUDA when visible, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
``precision``: ``fp32``, ``bf16`` or ``auto`` (bf16 on CUDA, fp32 on CPU). In bf16 the frozen
weights are stored in bf16 (layer norms excepted) and the forward runs under autocast, while
trainable parameters and their optimizer state stay fp32 (the usual mixed-precision recipe).
Models are built and initialised on the CPU, so a seed gives the same initial weights on every
device; arrays leave a client as CPU numpy of the parameters' own dtype (fp32), so the bytes
on the air do not depend on the device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn


def resolve_device(name: str) -> torch.device:
    """The torch device of a ``device`` setting (``auto`` = CUDA when visible, else CPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of frozen weights and of the autocast forward (``auto``: bf16 on CUDA, else fp32)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def placement(device: str, precision: str) -> tuple[torch.device, torch.dtype]:
    """The (device, dtype) of a ``device`` and a ``precision`` setting."""
    resolved = resolve_device(device)
    return resolved, compute_dtype(precision, resolved)


def place(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move ``model`` to ``device``; frozen parameters in ``dtype``, trainable ones and layer norms fp32.

    Layer norms keep fp32 (a tiny share of the weights): CUDA's autocast runs them in fp32
    anyway, and the CPU's refuses bf16 norm weights on a fp32 input (e.g. FedBERT's activations
    from the wire).
    """
    if dtype != torch.float32:
        norms = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point() and id(p) not in norms:
                p.data = p.data.to(dtype)
    return model.to(device)


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Mixed-precision forward in ``dtype``; nothing at fp32 (bit-identical to no autocast)."""
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def fork_rng(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Fork the CPU RNG and that of ``device`` (both restored on exit), so seeded draws leave them alone."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


def to_device(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """A batch on ``device`` (non-blocking from pinned memory where possible)."""
    return [t.to(device, non_blocking=True) for t in tensors]

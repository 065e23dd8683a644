"""Task tuning on one client: build the method's model, train locally, evaluate.

Flower-free: :mod:`pwff_app.client_app` moves arrays in and out of messages; this module only
knows models, data and the method's spec.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from pwff_app.config import RunConfig
from pwff_app.device import autocast, compute_dtype, place, resolve_device, to_device
from pwff_app.task_tuning.data import AG_NEWS_CLASSES, client_split, make_loader
from pwff_app.methods import METHODS, MethodSpec
from pwff_app.task_tuning.model import EncoderClassifier, build_task_model, load_tokenizer


@dataclass
class ClientTask:
    """One client's model and data for the configured method."""

    model: EncoderClassifier
    spec: MethodSpec
    train_loader: DataLoader
    test_loader: DataLoader
    num_train: int
    num_test: int
    device: torch.device
    dtype: torch.dtype  # of the frozen weights and the autocast forward


def build_model_for(cfg: RunConfig, client_id: int | None) -> EncoderClassifier:
    """The method's model for a client (``None`` = the server, which holds only shared parts)."""
    spec = METHODS[cfg.method]
    level = 1.0 if client_id is None else cfg.task.resource_level(client_id)
    model = build_task_model(cfg.task.model_name, spec, len(AG_NEWS_CLASSES), cfg.task.adapter_size,
                             cfg.task.lora_rank, cfg.task.lora_alpha, level, cfg.seed)
    if client_id is not None and "lora" in spec.private:
        # Private LoRA starts from a client-specific draw: the LoRA A init is random.
        _reinit_lora(model, seed=cfg.seed * 1000 + client_id)
    return model


def _reinit_lora(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                bound = 1.0 / np.sqrt(p.shape[1])
                p.copy_(torch.empty_like(p).uniform_(-bound, bound, generator=generator))


def round_seed(seed: int, client_id: int, server_round: int) -> int:
    """A seed for one client's work in one round: new each round, the same on a repeat."""
    return int(np.random.SeedSequence([seed, client_id, server_round]).generate_state(1)[0])


def load_client_task(cfg: RunConfig, client_id: int, num_partitions: int, server_round: int = 1) -> ClientTask:
    """The client's model (fresh: private/global state is loaded by the caller) and data.

    Batch order and dropout are drawn from :func:`round_seed`, so a round repeated after a
    restart or a resume does exactly what it did the first time.
    """
    torch.manual_seed(round_seed(cfg.seed, client_id, server_round))
    train, test = client_split(cfg.data_dir, cfg.task.dataset, client_id, num_partitions, cfg.task.alpha,
                               cfg.seed, cfg.task.max_train_samples, cfg.task.max_test_samples)
    tokenizer = load_tokenizer(cfg.task.model_name)
    device = resolve_device(cfg.device)
    dtype = compute_dtype(cfg.precision, device)
    return ClientTask(
        model=place(build_model_for(cfg, client_id), device, dtype),  # built on the CPU: same init everywhere
        spec=METHODS[cfg.method],
        train_loader=make_loader(train, tokenizer, cfg.task.max_length, cfg.task.batch_size, shuffle=True,
                                 seed=round_seed(cfg.seed, client_id, server_round)),
        test_loader=make_loader(test, tokenizer, cfg.task.max_length, 2 * cfg.task.batch_size, shuffle=False),
        num_train=len(train),
        num_test=len(test),
        device=device,
        dtype=dtype,
    )


def train_local(model: nn.Module, loader: DataLoader, epochs: int, lr: float,
                device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """AdamW on the parameters that require grad; returns mean loss and wall seconds."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    start, seen = time.perf_counter(), 0
    total = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per step
    for _ in range(epochs):
        for batch in loader:
            input_ids, attention_mask, labels = to_device(batch, device)
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, dtype):
                loss = loss_fn(model(input_ids, attention_mask), labels)
            loss.backward()
            optimizer.step()
            total += loss.detach().double() * len(labels)
            seen += len(labels)
    return {"train-loss": float(total) / max(seen, 1), "compute-s": time.perf_counter() - start}


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: DataLoader, device: torch.device = torch.device("cpu"),
                   dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Accuracy and mean cross-entropy on a loader."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    for batch in loader:
        input_ids, attention_mask, labels = to_device(batch, device)
        with autocast(device, dtype):
            logits = model(input_ids, attention_mask)
        total += loss_fn(logits.float(), labels)
        correct += (logits.argmax(-1) == labels).sum()
        seen += len(labels)
    return {"accuracy": int(correct) / max(seen, 1), "loss": float(total) / max(seen, 1)}

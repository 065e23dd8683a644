"""Task tuning on one client: build the method's model, train locally, evaluate.

Flower-free: :mod:`pwff_app.client_app` moves arrays in and out of messages; this module only
knows models, data and the method's spec.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from pwff_app.config import RunConfig
from pwff_app.device import autocast, compute_dtype, place, resolve_device, to_device
from pwff_app.task_tuning.data import AG_NEWS_CLASSES, batches, client_rows, global_rows
from pwff_app.methods import METHODS, MethodSpec
from pwff_app.task_tuning.model import EncoderClassifier, build_task_model, load_params, lora_disabled


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
    if client_id is not None:
        load_params(model, _client_lora_init(model, spec, cfg.seed, client_id))
    return model


def _client_lora_init(model: nn.Module, spec: MethodSpec, seed: int, client_id: int) -> dict[str, torch.Tensor]:
    """A private LoRA's A matrices drawn for one client (the LoRA A init is random); none when LoRA is not private."""
    if "lora" not in spec.private:
        return {}
    generator = torch.Generator().manual_seed(seed * 1000 + client_id)
    out = {}
    for name, p in model.named_parameters():
        if ".lora_A." in name:
            bound = 1.0 / np.sqrt(p.shape[1])
            out[name] = torch.empty(p.shape, dtype=p.dtype).uniform_(-bound, bound, generator=generator)
    return out


@functools.lru_cache(maxsize=4)
def _built_model(model_name: str, method: str, adapter_size: int, lora_rank: int, lora_alpha: int, level: float,
                 seed: int, device: torch.device,
                 dtype: torch.dtype) -> tuple[EncoderClassifier, dict[str, torch.Tensor]]:
    """A placed model as :func:`build_task_model` makes it, and copies of its trainable parameters then."""
    model = place(build_task_model(model_name, METHODS[method], len(AG_NEWS_CLASSES), adapter_size, lora_rank,
                                   lora_alpha, level, seed), device, dtype)
    return model, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def client_model(cfg: RunConfig, client_id: int, device: torch.device, dtype: torch.dtype) -> EncoderClassifier:
    """What ``place(build_model_for(cfg, client_id), device, dtype)`` gives, built once per worker process.

    One model per key (model name, method, adapter size, LoRA rank and alpha, resource level, seed,
    device, precision) is kept, at most four per process, so clients of one resource level share
    it; each holds the model and a copy of its trainable parameters (small for PEFT methods, a
    second encoder for those that train the encoder). On every call each trainable parameter is reset to
    its built value (and a private LoRA to this client's draw) and gradients are dropped; frozen
    parameters are never written by training, loading or evaluation. The model is therefore only
    valid until the next call in the process: a worker handles one message at a time.
    """
    spec, t = METHODS[cfg.method], cfg.task
    model, initial = _built_model(t.model_name, cfg.method, t.adapter_size, t.lora_rank, t.lora_alpha,
                                  t.resource_level(client_id), cfg.seed, device, dtype)
    load_params(model, {**initial, **_client_lora_init(model, spec, cfg.seed, client_id)})
    model.zero_grad(set_to_none=True)
    return model


def round_seed(seed: int, client_id: int, server_round: int) -> int:
    """A seed for one client's work in one round: new each round, the same on a repeat."""
    return int(np.random.SeedSequence([seed, client_id, server_round]).generate_state(1)[0])


def load_client_task(cfg: RunConfig, client_id: int, num_partitions: int, server_round: int = 1) -> ClientTask:
    """The client's model (as built: private/global state is loaded by the caller) and data.

    The model and the tokenized rows are cached per worker process (:func:`client_model`,
    :func:`~pwff_app.task_tuning.data.client_rows`); the loaders are new each call. Batch order
    and dropout are drawn from :func:`round_seed`, so a round repeated after a restart or a
    resume does exactly what it did the first time, whatever the caches held.
    """
    seed = round_seed(cfg.seed, client_id, server_round)
    torch.manual_seed(seed)
    t = cfg.task
    train, test = client_rows(cfg.data_dir, t.dataset, t.model_name, client_id, num_partitions, t.alpha, cfg.seed,
                              t.max_train_samples, t.max_test_samples, t.max_length)
    device = resolve_device(cfg.device)
    dtype = compute_dtype(cfg.precision, device)
    return ClientTask(
        model=client_model(cfg, client_id, device, dtype),
        spec=METHODS[cfg.method],
        train_loader=batches(train, t.batch_size, shuffle=True, seed=seed),
        test_loader=batches(test, 2 * t.batch_size, shuffle=False),
        num_train=len(train),
        num_test=len(test),
        device=device,
        dtype=dtype,
    )


def prepared_task(cfg: RunConfig, client_id: int, num_partitions: int, server_round: int,
                  shared: Mapping[str, np.ndarray], private: Mapping[str, np.ndarray] | None) -> ClientTask:
    """:func:`load_client_task` with the client's private state (``None``: none yet) and the global
    shared arrays loaded; ``shared`` must hold exactly the method's shared parameters."""
    task = load_client_task(cfg, client_id, num_partitions, server_round)
    if private is not None:
        load_params(task.model, private)
    expected = {n for n, _ in task.model.named_parameters() if task.spec.is_shared(n)}
    if set(shared) != expected:
        raise ValueError(f"global arrays do not match the shared set of '{cfg.method}' "
                         f"({len(shared)} keys, expected {len(expected)})")
    load_params(task.model, shared)
    return task


def local_lr(cfg: RunConfig, spec: MethodSpec) -> float:
    """The local step size: ``task.backbone-lr`` when the method trains the encoder itself, else ``task.lr``."""
    return cfg.task.backbone_lr if "backbone" in spec.trained else cfg.task.lr


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


def generalization(cfg: RunConfig, task: ClientTask) -> dict[str, float]:
    """The client's model on the global test set (:func:`~pwff_app.task_tuning.data.global_rows`).

    ``global-accuracy`` / ``global-loss``: the model as :meth:`evaluate_model` on the own split
    uses it, i.e. the global shared part + the client's private part (its full personalised
    model). Where the method has a shared-only view (PFTT, :attr:`MethodSpec.shared_only_view`)
    also ``shared-only-accuracy`` / ``shared-only-loss``: the same model with every private LoRA
    path off (:func:`~pwff_app.task_tuning.model.lora_disabled`): global adapters + the frozen
    encoder + the client's own head, what the federation learned. Loss: mean cross-entropy (nats).
    """
    t = cfg.task
    loader = batches(global_rows(cfg.data_dir, t.dataset, t.model_name, t.global_test_samples, t.max_length),
                     2 * t.batch_size, shuffle=False)
    views = [("global", contextlib.nullcontext())]
    if task.spec.shared_only_view:
        views.append(("shared-only", lora_disabled(task.model)))
    out: dict[str, float] = {}
    for name, view in views:
        with view:
            out.update({f"{name}-{k}": v for k, v in evaluate_model(task.model, loader, task.device, task.dtype).items()})
    return out

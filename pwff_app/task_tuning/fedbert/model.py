"""FedBERT baseline: federated split learning of the task model (pure part + client handler).

FedBERT (Tian et al., "FedBERT: When Federated Learning Meets Pre-training", ACM TIST 2022)
trains BERT by *federated split learning*: each client runs the bottom of the network and
sends activations, the server runs the rest and returns gradients, and the client-side parts
are federated-averaged. The protocol here is SplitFed-V2 (Thapa et al., "SplitFed: When
Federated Learning Meets Split Learning", AAAI 2022): one server-side top is trained by the
clients one after another, batch by batch; the client-side bottoms are FedAvg'd (weighted by
examples) at the end of every round. See ``docs/fedbert.md``.

The split of :class:`pwff_app.task_tuning.model.EncoderClassifier` (same encoder, data and tokenizer as
every other method) at layer ``k`` (run config ``fedbert.split-layer``):

* :class:`ClientBottom`: the embeddings and encoder layers ``0 .. k-1``;
* :class:`ServerTop`: encoder layers ``k .. n-1``, mean pooling, dropout and the linear head.

Both share their parameters with the model they were cut from and keep the model's parameter
names (``backbone.encoder.layer.3.attention...``, ``head.weight``), so :func:`group_params`
and :func:`load_params` work on them. Together they compute exactly the model's function: the
attention mask is expanded by the encoder's own mask builder on both sides.

Flower part: :func:`handle_split_message` is the client side of the message protocol that
:func:`pwff_app.task_tuning.fedbert.server.run_split_learning` drives on the server.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from torch import nn

from pwff_app.config import ConfigError, RunConfig
from pwff_app.task_tuning.data import AG_NEWS_CLASSES, client_split, make_loader
from pwff_app.methods import MethodSpec
from pwff_app.task_tuning.model import EncoderClassifier, build_task_model, load_params, load_tokenizer
from pwff_app.task_tuning.train import round_seed

# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------

FULL_FINETUNE_LR = 5e-5  # BERT fine-tuning range 2e-5..5e-5 (Devlin et al. 2019)

# Message keys (both directions).
ARRAYS, CONFIG, METRICS, INFO_KEY = "arrays", "config", "metrics", "info"
ACTIVATIONS, MASK, LABELS = "activations", "attention-mask", "labels"
GRAD_PREFIX = "grad."  # + step index: the gradient for the activations of that step


@dataclass(frozen=True)
class SplitConfig:
    """FedBERT settings (run config ``fedbert.*``; defaults apply where a key is absent).

    Attributes:
        split_layer: encoder layers on the client (0 = embeddings only, n = whole encoder).
        train: ``full`` (every weight except the token-embedding matrix), ``all`` (also the
            token-embedding matrix, as FedBERT's pre-training does) or ``adapter``
            (PFTT's bottleneck adapters on both sides, plus the head).
        lr: AdamW learning rate on both sides (already resolved: ``fedbert.lr`` = 0 means
            5e-5 for ``full``/``all`` and ``task.lr`` for ``adapter``).
    """

    split_layer: int
    train: str
    lr: float

    @classmethod
    def from_run_config(cls, cfg: RunConfig) -> SplitConfig:
        """The trainer's settings from the validated tree, the learning rate resolved."""
        f = cfg.fedbert
        lr = f.lr or (cfg.task.lr if f.train == "adapter" else FULL_FINETUNE_LR)
        return cls(split_layer=f.split_layer, train=f.train, lr=lr)


def split_spec(train: str) -> MethodSpec:
    """The model recipe of a train mode (what :func:`build_task_model` inserts and unfreezes).

    ``shared`` names what the clients' bottoms FedAvg (the client-side part of it); the
    server-side part of ``trained`` stays on the server.
    """
    if train == "adapter":
        modules, trained, shared = {"adapter"}, {"adapter", "head"}, {"adapter"}
    else:
        modules, trained, shared = set(), {"backbone", "head"}, {"backbone"}
    return MethodSpec("fedbert", "task", frozenset(modules), frozenset(trained), frozenset(shared),
                      False, "split", f"FedBERT split learning ({train})")  # type: ignore[arg-type]


def _build(model_name: str, train: str, adapter_size: int, seed: int) -> EncoderClassifier:
    model = build_task_model(model_name, split_spec(train), len(AG_NEWS_CLASSES), adapter_size,
                             lora_rank=1, lora_alpha=1, resource_level=1.0, seed=seed)  # no LoRA inserted
    if train == "full":
        for name, p in model.named_parameters():
            if name.endswith("word_embeddings.weight"):
                p.requires_grad = False
    return model


def build_split_model(cfg: RunConfig, split: SplitConfig) -> EncoderClassifier:
    """The whole task model for a train mode, ``requires_grad`` set; same init everywhere."""
    return _build(cfg.task.model_name, split.train, cfg.task.adapter_size, cfg.seed)


# ---------------------------------------------------------------------------------------
# The split (pure)
# ---------------------------------------------------------------------------------------


def _encoder_parts(backbone: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    embeddings = getattr(backbone, "embeddings", None)
    layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    if embeddings is None or not isinstance(layers, nn.ModuleList):
        raise ValueError("split learning needs a BERT-style encoder (backbone.embeddings + backbone.encoder.layer)")
    return embeddings, layers


def extended_attention_mask(config, hidden: torch.Tensor, attention_mask: torch.Tensor):
    """The 4-D mask the encoder's layers take, built as the encoder itself builds it."""
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:  # transformers < 5: additive float mask, as get_extended_attention_mask
        ext = attention_mask[:, None, None, :].to(hidden.dtype)
        return (1.0 - ext) * torch.finfo(hidden.dtype).min
    return create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)


def _run_layers(config, layers: Sequence[nn.Module], hidden: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
    if not layers:
        return hidden
    mask = extended_attention_mask(config, hidden, attention_mask)
    for layer in layers:
        out = layer(hidden, mask)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


class _BackbonePart(nn.Module):
    """A container whose parameter names match ``EncoderClassifier.backbone``'s."""

    def __init__(self, embeddings: nn.Module | None, layers: dict[int, nn.Module]) -> None:
        super().__init__()
        if embeddings is not None:
            self.embeddings = embeddings
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleDict({str(i): m for i, m in layers.items()})

    def layers(self) -> list[nn.Module]:
        return list(self.encoder.layer.values())


class ClientBottom(nn.Module):
    """Embeddings + encoder layers ``0 .. k-1``: token ids -> hidden states [B, L, H]."""

    def __init__(self, model: EncoderClassifier, k: int) -> None:
        super().__init__()
        embeddings, layers = _encoder_parts(model.backbone)
        self.config = model.backbone.config
        self.split_layer = k
        self.backbone = _BackbonePart(embeddings, {i: layers[i] for i in range(k)})

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone.embeddings(input_ids=input_ids)
        return _run_layers(self.config, self.backbone.layers(), hidden, attention_mask)


class ServerTop(nn.Module):
    """Encoder layers ``k .. n-1``, mean pooling, dropout, head: hidden states -> logits."""

    def __init__(self, model: EncoderClassifier, k: int) -> None:
        super().__init__()
        _, layers = _encoder_parts(model.backbone)
        self.config = model.backbone.config
        self.split_layer = k
        self.backbone = _BackbonePart(None, {i: layers[i] for i in range(k, len(layers))})
        self.dropout = model.dropout
        self.head = model.head

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = _run_layers(self.config, self.backbone.layers(), hidden, attention_mask)
        # Mean pooling over real tokens, exactly as EncoderClassifier.forward.
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(self.dropout(pooled))


def split_model(model: EncoderClassifier, k: int) -> tuple[ClientBottom, ServerTop]:
    """Cut ``model`` after encoder layer ``k`` (0 <= k <= n); both halves share its parameters.

    The encoder's own pooler (``backbone.pooler``), unused by ``EncoderClassifier``, is in
    neither half.
    """
    _, layers = _encoder_parts(model.backbone)
    if not 0 <= k <= len(layers):
        raise ConfigError(f"run config: 'fedbert.split-layer' must be in [0, {len(layers)}], got {k}")
    return ClientBottom(model, k), ServerTop(model, k)


def trained_arrays(module: nn.Module) -> dict[str, np.ndarray]:
    """The parameters that require grad, as numpy copies by (model) name."""
    return {n: p.detach().cpu().numpy().copy() for n, p in module.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def _seeded(seed: int | None):
    """Fork the CPU RNG and seed it, so the dropout masks of a forward can be drawn again."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def client_forward(bottom: ClientBottom, batch: Sequence[torch.Tensor], seed: int | None = None) -> torch.Tensor:
    """Activations [B, L, H] of the bottom for ``batch = (input_ids, attention_mask, ...)``.

    With ``seed`` the dropout masks are drawn from it, so :func:`client_backward` can redo
    the very same forward.
    """
    with _seeded(seed):
        return bottom(batch[0], batch[1])


def server_step(top: ServerTop, activations: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                optimizer: torch.optim.Optimizer | None) -> tuple[float, torch.Tensor]:
    """Top forward + cross-entropy + backward (+ an optimizer step unless ``optimizer`` is None).

    Returns the mean loss of the batch and the gradient of the loss w.r.t. ``activations``.
    """
    acts = activations.detach().requires_grad_(True)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(top(acts, attention_mask), labels)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    return float(loss.detach()), acts.grad.detach()


def client_backward(bottom: ClientBottom, batch: Sequence[torch.Tensor], grad: torch.Tensor,
                    optimizer: torch.optim.Optimizer | None, seed: int | None = None) -> None:
    """Redo the bottom's forward on ``batch`` (same ``seed``), backpropagate ``grad`` into the
    bottom's parameters and take an optimizer step (none if ``optimizer`` is None).

    The forward is recomputed because no autograd graph survives between two messages.
    """
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    out = client_forward(bottom, batch, seed)
    if out.requires_grad:  # an all-frozen bottom (e.g. adapters with k = 0) has nothing to learn
        out.backward(grad)
    if optimizer is not None:
        optimizer.step()


def trim_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop trailing columns that are padding in every row (what a client would not send).

    The function is unchanged: real tokens keep their positions, and padded keys are masked
    out of attention and pooling alike.
    """
    used = attention_mask.bool().any(0).nonzero()
    length = int(used.max()) + 1 if len(used) else 1
    return input_ids[:, :length], attention_mask[:, :length]


def new_optimizer(module: nn.Module, lr: float) -> torch.optim.Optimizer | None:
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if params else None


# ---------------------------------------------------------------------------------------
# Client side of the protocol
# ---------------------------------------------------------------------------------------

# context.state keys: the bottom the client holds, its AdamW moments (during a round), meta.
_BOTTOM, _OPTIM, _META = "fedbert.bottom", "fedbert.optim", "fedbert.meta"


@dataclass
class _Live:
    """A client's bottom and optimizer as live objects, valid while ``token`` matches the state."""

    token: str
    bottom: ClientBottom
    optimizer: torch.optim.Optimizer | None


# Per worker process: saves rebuilding modules from context.state on every message. The
# state stays the source of truth (a message may run in another process); an entry is used
# only when its token equals the one saved in the state with the same weights.
_LIVE: dict[tuple[int, int], _Live] = {}


@functools.lru_cache(maxsize=2)
def _bottom_template(model_name: str, train: str, k: int, adapter_size: int, seed: int) -> ClientBottom:
    return split_model(_build(model_name, train, adapter_size, seed), k)[0]


def _fresh_bottom(cfg: RunConfig, split: SplitConfig) -> ClientBottom:
    template = _bottom_template(cfg.task.model_name, split.train, split.split_layer, cfg.task.adapter_size, cfg.seed)
    # Frozen tensors are never written: share them between copies instead of copying.
    memo = {id(p): p for p in template.parameters() if not p.requires_grad}
    return copy.deepcopy(template, memo)


@functools.lru_cache(maxsize=8)
def _client_tensors(data_dir: Path | None, dataset: str, model_name: str, client_id: int, num_partitions: int,
                    alpha: float, seed: int, max_train: int, max_test: int, max_length: int):
    """Tokenized (input_ids, attention_mask, labels) of the client's train and test rows."""
    train, test = client_split(data_dir, dataset, client_id, num_partitions, alpha, seed, max_train, max_test)
    tokenizer = load_tokenizer(model_name)
    out = []
    for ds in (train, test):
        if len(ds) == 0:
            out.append((torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1, dtype=torch.long),
                        torch.zeros(0, dtype=torch.long)))
        else:
            out.append(make_loader(ds, tokenizer, max_length, 1, shuffle=False).dataset.tensors)
    return tuple(out)


def client_data(cfg: RunConfig, client_id: int, num_partitions: int):
    """((train ids, mask, labels), (test ids, mask, labels)) of a client, tokenized once per process."""
    t = cfg.task
    return _client_tensors(cfg.data_dir, t.dataset, t.model_name, client_id, num_partitions, t.alpha, cfg.seed,
                           t.max_train_samples, t.max_test_samples, t.max_length)


def train_batches(num_rows: int, batch_size: int, epochs: int, seed: int) -> list[np.ndarray]:
    """Row indices of every training step of a round: a fresh permutation per epoch."""
    out: list[np.ndarray] = []
    for epoch in range(epochs):
        perm = np.random.default_rng([seed, epoch]).permutation(num_rows)
        out += [perm[i:i + batch_size] for i in range(0, num_rows, batch_size)]
    return out


def eval_batches(num_rows: int, batch_size: int) -> list[np.ndarray]:
    return [np.arange(i, min(i + batch_size, num_rows)) for i in range(0, num_rows, batch_size)]


def step_seed(seed: int, step: int) -> int:
    """Dropout seed of one training step (the forward and its recomputation share it)."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def select_batch(rows, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, mask, labels = rows
    idx = torch.from_numpy(np.asarray(index, dtype=np.int64))
    ids, mask = trim_padding(ids[idx], mask[idx])
    return ids, mask, labels[idx]


def activation_record(acts: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> ArrayRecord:
    """What a client sends for one batch: activations (float32), mask (int8), labels (int64)."""
    return ArrayRecord({
        ACTIVATIONS: Array(np.ascontiguousarray(acts.detach().cpu().numpy().astype(np.float32, copy=False))),
        MASK: Array(mask.cpu().numpy().astype(np.int8)),
        LABELS: Array(labels.cpu().numpy().astype(np.int64)),
    })


def _bottom_names(bottom: ClientBottom) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in bottom.named_parameters() if p.requires_grad}


def _incoming_bottom(content: RecordDict, bottom: ClientBottom) -> dict[str, np.ndarray] | None:
    """The delivered bottom weights, or None if the message holds none (e.g. a lost downlink
    whose stale copy is a gradient): the client then keeps the bottom it holds."""
    record = content.array_records.get(ARRAYS)
    expected = _bottom_names(bottom)
    if record is None or set(record.keys()) != set(expected):
        return None
    arrays = {k: v.numpy() for k, v in record.items()}
    if any(tuple(arrays[k].shape) != shape for k, shape in expected.items()):
        return None
    return arrays


def _incoming_grad(content: RecordDict, step: int, shape: tuple[int, ...]) -> torch.Tensor | None:
    record = content.array_records.get(ARRAYS)
    key = f"{GRAD_PREFIX}{step}"
    if record is None or key not in record:
        return None
    grad = record[key].numpy()
    if tuple(grad.shape) != shape or not np.isfinite(grad).all():
        return None
    return torch.from_numpy(np.array(grad, dtype=np.float32))


def _load_live(context: Context, cfg: RunConfig, split: SplitConfig) -> _Live:
    key = (int(context.run_id), int(context.node_id))
    meta = context.state.config_records.get(_META)
    token = str(meta["token"]) if meta is not None else ""
    live = _LIVE.pop(key, None)  # taken out: put back only after the state is saved
    if live is not None and token and live.token == token:
        return live
    bottom = _fresh_bottom(cfg, split)
    saved = context.state.array_records.get(_BOTTOM)
    if saved is not None:
        load_params(bottom, {k: v.numpy() for k, v in saved.items()})
    optimizer = new_optimizer(bottom, split.lr)
    moments = context.state.array_records.get(_OPTIM)
    if optimizer is not None and moments is not None and len(moments) > 0:
        adam_step = torch.tensor(float(meta["adam-step"]))
        for name, p in bottom.named_parameters():
            if p.requires_grad and f"m.{name}" in moments:
                optimizer.state[p] = {
                    "step": adam_step.clone(),
                    "exp_avg": torch.from_numpy(np.array(moments[f"m.{name}"].numpy())),
                    "exp_avg_sq": torch.from_numpy(np.array(moments[f"v.{name}"].numpy())),
                }
    return _Live(token=token, bottom=bottom, optimizer=optimizer)


def _save_live(context: Context, live: _Live, meta: dict, keep_optimizer: bool) -> None:
    """Write the bottom (trained weights), AdamW moments and meta into ``context.state``."""
    context.state[_BOTTOM] = ArrayRecord({k: Array(v) for k, v in trained_arrays(live.bottom).items()})
    moments: dict[str, Array] = {}
    adam_step = 0.0
    if keep_optimizer and live.optimizer is not None:
        for name, p in live.bottom.named_parameters():
            state = live.optimizer.state.get(p)
            if state:
                moments[f"m.{name}"] = Array(state["exp_avg"].numpy().copy())
                moments[f"v.{name}"] = Array(state["exp_avg_sq"].numpy().copy())
                adam_step = float(state["step"])
    context.state[_OPTIM] = ArrayRecord(moments)
    live.token = uuid.uuid4().hex
    context.state[_META] = ConfigRecord({**meta, "adam-step": adam_step, "token": live.token})
    _LIVE[(int(context.run_id), int(context.node_id))] = live


def handle_split_message(msg: Message, context: Context) -> Message:
    """Client side of FedBERT: one message of the server's per-batch exchange.

    TRAIN ``config`` = {server-round, step, final}; ``arrays`` = the global bottom (step 0),
    else ``grad.<step-1>``. The client applies the backward of step - 1 (recomputing its
    forward), then either runs the forward of batch ``step`` and replies activations, mask,
    labels (``final`` false) or replies its bottom's trained weights (``final`` true).
    EVALUATE ``config`` = {server-round, step}; ``arrays`` = the global bottom at step 0; the
    reply holds the activations of test batch ``step``.

    Replies carry one ArrayRecord ``arrays``, one MetricRecord ``metrics`` (``num-examples``,
    ``num-steps``) and ConfigRecord ``info`` (``client-id``, ``compute-s``, ``server-round``, ``step``).
    """
    start = time.perf_counter()
    cfg = RunConfig.from_run_config(context.run_config)
    split = SplitConfig.from_run_config(cfg)
    client_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    config = msg.content.config_records[CONFIG]
    server_round, step = int(config["server-round"]), int(config["step"])
    kind = msg.metadata.message_type.split(".")[0]
    train_rows, test_rows = client_data(cfg, client_id, num_partitions)
    live = _load_live(context, cfg, split)
    meta_record = context.state.config_records.get(_META)
    meta = {k: v for k, v in meta_record.items() if k not in ("token", "adam-step")} if meta_record else {}

    if kind == MessageType.TRAIN:
        seed = round_seed(cfg.seed, client_id, server_round)
        batches = train_batches(len(train_rows[2]), cfg.task.batch_size, cfg.task.local_epochs, seed)
        if step == 0:
            incoming = _incoming_bottom(msg.content, live.bottom)
            if incoming is not None:
                load_params(live.bottom, incoming)
            live.optimizer = new_optimizer(live.bottom, split.lr)
            meta = {"round": server_round, "phase": "train", "next-step": 0, "skipped": 0,
                    "stale-start": incoming is None}
        else:
            if (meta.get("round"), meta.get("phase"), meta.get("next-step")) != (server_round, "train", step):
                raise ValueError(f"fedbert: train step {step} of round {server_round} out of order "
                                 f"(client at {meta})")
            previous = select_batch(train_rows, batches[step - 1])
            live.bottom.train()
            shape = (*previous[0].shape, int(live.bottom.config.hidden_size))
            grad = _incoming_grad(msg.content, step - 1, shape)
            if grad is None:  # the gradient did not arrive (lost downlink): that update is dropped
                meta["skipped"] = int(meta["skipped"]) + 1
            else:
                client_backward(live.bottom, previous, grad, live.optimizer, step_seed(seed, step - 1))
        if bool(config.get("final", False)):
            meta.update({"phase": "done", "next-step": step + 1})
            arrays = ArrayRecord({k: Array(v) for k, v in trained_arrays(live.bottom).items()})
            metrics = {"num-examples": len(train_rows[2]), "num-steps": len(batches),
                       "skipped-backward": int(meta["skipped"])}
            _save_live(context, live, meta, keep_optimizer=False)
        else:
            if step >= len(batches):
                raise ValueError(f"fedbert: step {step} but the client has {len(batches)} batches")
            batch = select_batch(train_rows, batches[step])
            live.bottom.train()
            with torch.no_grad():
                acts = client_forward(live.bottom, batch, step_seed(seed, step))
            arrays = activation_record(acts, batch[1], batch[2])
            metrics = {"num-examples": len(batch[2]), "num-steps": len(batches)}
            meta["next-step"] = step + 1
            _save_live(context, live, meta, keep_optimizer=True)
    elif kind == MessageType.EVALUATE:
        batches = eval_batches(len(test_rows[2]), 2 * cfg.task.batch_size)
        if step == 0:
            # Evaluate the global bottom; it also becomes the client's "last global copy".
            incoming = _incoming_bottom(msg.content, live.bottom)
            if incoming is not None:
                load_params(live.bottom, incoming)
            meta = {"round": server_round, "phase": "eval", "next-step": 0, "skipped": 0,
                    "stale-start": incoming is None}
        if not batches:
            arrays, metrics = ArrayRecord(), {"num-examples": 0, "num-steps": 0}
        else:
            if step >= len(batches):
                raise ValueError(f"fedbert: eval step {step} but the client has {len(batches)} batches")
            batch = select_batch(test_rows, batches[step])
            live.bottom.eval()
            with torch.no_grad():
                acts = client_forward(live.bottom, batch)
            arrays = activation_record(acts, batch[1], batch[2])
            metrics = {"num-examples": len(batch[2]), "num-steps": len(batches)}
        if step == 0:
            _save_live(context, live, meta, keep_optimizer=False)
        else:
            _LIVE[(int(context.run_id), int(context.node_id))] = live  # unchanged: token still valid
    else:
        raise ValueError(f"fedbert: unexpected message type {msg.metadata.message_type!r}")

    content = RecordDict({
        ARRAYS: arrays,
        METRICS: MetricRecord(metrics),
        INFO_KEY: ConfigRecord({"client-id": client_id, "server-round": server_round, "step": step,
                            "compute-s": time.perf_counter() - start}),
    })
    return Message(content=content, reply_to=msg)


def activation_bytes(batch_size: int, length: int, hidden: int) -> int:
    """Payload of one training reply: float32 activations + int8 mask + int64 labels."""
    return batch_size * length * hidden * 4 + batch_size * length * 1 + batch_size * 8


def split_param_counts(cfg: RunConfig) -> dict[str, int]:
    """Trained parameters on each side (for the run summary)."""
    split = SplitConfig.from_run_config(cfg)
    bottom, top = split_model(build_split_model(cfg, split), split.split_layer)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    return {"client_bottom": count(bottom), "server_top": count(top), "split_layer": split.split_layer}


__all__ = [
    "ClientBottom", "ServerTop", "SplitConfig", "activation_bytes", "build_split_model", "client_backward",
    "client_forward", "handle_split_message", "server_step", "split_model", "split_param_counts", "split_spec",
    "trim_padding",
]

"""FedBERT on the client: its side of the split-learning message protocol.

:func:`handle_split_message` answers one message of the per-batch exchange that
:func:`pwff_app.task_tuning.fedbert.server.run_split_learning` drives: it holds the client's
bottom (:class:`pwff_app.task_tuning.fedbert.model.ClientBottom`) and its AdamW moments in
``context.state`` between messages, runs the bottom's forward on its own rows and applies the
gradients the server sends back. The split and its math are in
:mod:`pwff_app.task_tuning.fedbert.model`.
"""

from __future__ import annotations

import copy
import functools
import time
import uuid
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from pwff_app.config import RunConfig
from pwff_app.device import place, placement, to_device
from pwff_app.task_tuning.data import client_rows, global_rows
from pwff_app.task_tuning.fedbert.model import (
    ACTIVATIONS, ARRAYS, CONFIG, GRAD_PREFIX, INFO_KEY, LABELS, MASK, METRICS, TEST_SET, TEST_SETS, ClientBottom,
    SplitConfig,
    client_backward, client_forward, new_optimizer, new_task_model, split_model, trained_arrays, trim_padding,
)
from pwff_app.task_tuning.model import load_params
from pwff_app.task_tuning.train import round_seed

Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (input_ids, attention_mask, labels) of a split

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


# ---------------------------------------------------------------------------------------
# The client's model and data
# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _bottom_template(model_name: str, train: str, k: int, adapter_size: int, seed: int,
                     device: torch.device, dtype: torch.dtype) -> ClientBottom:
    bottom = split_model(new_task_model(model_name, train, adapter_size, seed), k)[0]
    return place(bottom, device, dtype)  # built on the CPU: the same init on every device


def _fresh_bottom(cfg: RunConfig, split: SplitConfig, device: torch.device, dtype: torch.dtype) -> ClientBottom:
    template = _bottom_template(cfg.task.model_name, split.train, split.split_layer, cfg.task.adapter_size, cfg.seed,
                                device, dtype)
    # Frozen tensors are never written: share them between copies instead of copying.
    memo = {id(p): p for p in template.parameters() if not p.requires_grad}
    return copy.deepcopy(template, memo)


def client_data(cfg: RunConfig, client_id: int, num_partitions: int) -> tuple[Rows, Rows]:
    """((train ids, mask, labels), (test ids, mask, labels)) of a client, tokenized once per worker process."""
    t = cfg.task
    train, test = client_rows(cfg.data_dir, t.dataset, t.model_name, client_id, num_partitions, t.alpha, cfg.seed,
                              t.max_train_samples, t.max_test_samples, t.max_length)
    return train.tensors, test.tensors


def evaluation_rows(cfg: RunConfig, client_id: int, num_partitions: int, test_set: str) -> Rows:
    """The rows an EVALUATE exchange runs on: the client's own test split (``own``) or the
    global test set (``global``, :func:`~pwff_app.task_tuning.data.global_rows`, the same for every client)."""
    if test_set not in TEST_SETS:
        raise ValueError(f"fedbert: unknown test set {test_set!r}, expected one of {TEST_SETS}")
    if test_set == "own":
        return client_data(cfg, client_id, num_partitions)[1]
    t = cfg.task
    return global_rows(cfg.data_dir, t.dataset, t.model_name, t.global_test_samples, t.max_length).tensors


def train_batches(num_rows: int, batch_size: int, epochs: int, seed: int) -> list[np.ndarray]:
    """Row indices of every training step of a round: a fresh permutation per epoch."""
    out: list[np.ndarray] = []
    for epoch in range(epochs):
        perm = np.random.default_rng([seed, epoch]).permutation(num_rows)
        out += [perm[i:i + batch_size] for i in range(0, num_rows, batch_size)]
    return out


def eval_batches(num_rows: int, batch_size: int) -> list[np.ndarray]:
    """Row indices of the test batches, in order."""
    return [np.arange(i, min(i + batch_size, num_rows)) for i in range(0, num_rows, batch_size)]


def step_seed(seed: int, step: int) -> int:
    """Dropout seed of one training step (the forward and its recomputation share it)."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def select_batch(rows: Rows, index: np.ndarray) -> Rows:
    """The rows at ``index``, all-padding columns trimmed off."""
    ids, mask, labels = rows
    idx = torch.from_numpy(np.asarray(index, dtype=np.int64))
    ids, mask = trim_padding(ids[idx], mask[idx])
    return ids, mask, labels[idx]


# ---------------------------------------------------------------------------------------
# Message contents
# ---------------------------------------------------------------------------------------


def activation_record(acts: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> ArrayRecord:
    """What a client sends for one batch: activations (float32, whatever the precision), mask (int8), labels (int64)."""
    return ArrayRecord({
        ACTIVATIONS: Array(np.ascontiguousarray(acts.detach().to("cpu", torch.float32).numpy())),
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
    """The gradient for the activations of ``step``, or None if it is missing or unusable."""
    record = content.array_records.get(ARRAYS)
    key = f"{GRAD_PREFIX}{step}"
    if record is None or key not in record:
        return None
    grad = record[key].numpy()
    if tuple(grad.shape) != shape or not np.isfinite(grad).all():
        return None
    return torch.from_numpy(np.array(grad, dtype=np.float32))


# ---------------------------------------------------------------------------------------
# The client's state between messages
# ---------------------------------------------------------------------------------------


def _live_key(context: Context) -> tuple[int, int]:
    return int(context.run_id), int(context.node_id)


def _load_live(context: Context, cfg: RunConfig, split: SplitConfig, device: torch.device,
               dtype: torch.dtype) -> _Live:
    meta = context.state.config_records.get(_META)
    token = str(meta["token"]) if meta is not None else ""
    live = _LIVE.pop(_live_key(context), None)  # taken out: put back only after the state is saved
    if live is not None and token and live.token == token:
        return live
    bottom = _fresh_bottom(cfg, split, device, dtype)
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
                    "exp_avg": torch.from_numpy(np.array(moments[f"m.{name}"].numpy())).to(p.device),
                    "exp_avg_sq": torch.from_numpy(np.array(moments[f"v.{name}"].numpy())).to(p.device),
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
                moments[f"m.{name}"] = Array(state["exp_avg"].cpu().numpy().copy())
                moments[f"v.{name}"] = Array(state["exp_avg_sq"].cpu().numpy().copy())
                adam_step = float(state["step"])
    context.state[_OPTIM] = ArrayRecord(moments)
    live.token = uuid.uuid4().hex
    context.state[_META] = ConfigRecord({**meta, "adam-step": adam_step, "token": live.token})
    _LIVE[_live_key(context)] = live


# ---------------------------------------------------------------------------------------
# The handler
# ---------------------------------------------------------------------------------------


@dataclass
class _Call:
    """One message being handled: what it asks for and the client's state it works on."""

    msg: Message
    context: Context
    cfg: RunConfig
    split: SplitConfig
    client_id: int
    server_round: int
    step: int
    live: _Live
    meta: dict  # the state's meta without token and adam-step (rewritten on save)
    device: torch.device  # of the bottom and of the batches it runs
    dtype: torch.dtype  # of its frozen weights and autocast forward

    def start_phase(self, phase: str) -> None:
        """Step 0: load the delivered global bottom (if any) and reset meta for ``phase``."""
        incoming = _incoming_bottom(self.msg.content, self.live.bottom)
        if incoming is not None:
            load_params(self.live.bottom, incoming)
        self.meta = {"round": self.server_round, "phase": phase, "next-step": 0, "skipped": 0,
                     "stale-start": incoming is None}


def _train(call: _Call, rows: Rows, final: bool) -> tuple[ArrayRecord, dict]:
    """Backward of step - 1, then the activations of batch ``step`` or (final) the bottom."""
    cfg, live, step = call.cfg, call.live, call.step
    seed = round_seed(cfg.seed, call.client_id, call.server_round)
    batches = train_batches(len(rows[2]), cfg.task.batch_size, cfg.task.local_epochs, seed)
    if step == 0:
        call.start_phase("train")
        live.optimizer = new_optimizer(live.bottom, call.split.lr)
    else:
        meta = call.meta
        if (meta.get("round"), meta.get("phase"), meta.get("next-step")) != (call.server_round, "train", step):
            raise ValueError(f"fedbert: train step {step} of round {call.server_round} out of order "
                             f"(client at {meta})")
        previous = to_device(select_batch(rows, batches[step - 1]), call.device)
        live.bottom.train()
        shape = (*previous[0].shape, int(live.bottom.config.hidden_size))
        grad = _incoming_grad(call.msg.content, step - 1, shape)
        if grad is None:  # the gradient did not arrive (lost downlink): that update is dropped
            meta["skipped"] = int(meta["skipped"]) + 1
        else:
            client_backward(live.bottom, previous, grad.to(call.device), live.optimizer, step_seed(seed, step - 1),
                            call.dtype)
    if final:
        call.meta.update({"phase": "done", "next-step": step + 1})
        arrays = ArrayRecord({k: Array(v) for k, v in trained_arrays(live.bottom).items()})
        metrics = {"num-examples": len(rows[2]), "num-steps": len(batches),
                   "skipped-backward": int(call.meta["skipped"])}
        _save_live(call.context, live, call.meta, keep_optimizer=False)
        return arrays, metrics
    if step >= len(batches):
        raise ValueError(f"fedbert: step {step} but the client has {len(batches)} batches")
    batch = select_batch(rows, batches[step])
    live.bottom.train()
    with torch.no_grad():
        acts = client_forward(live.bottom, to_device(batch, call.device), step_seed(seed, step), call.dtype)
    call.meta["next-step"] = step + 1
    _save_live(call.context, live, call.meta, keep_optimizer=True)
    return activation_record(acts, batch[1], batch[2]), {"num-examples": len(batch[2]), "num-steps": len(batches)}


def _evaluate(call: _Call, rows: Rows) -> tuple[ArrayRecord, dict]:
    """The activations of test batch ``step`` (step 0 first loads the global bottom)."""
    batches = eval_batches(len(rows[2]), 2 * call.cfg.task.batch_size)
    if call.step == 0:
        call.start_phase("eval")  # the evaluated global bottom becomes the client's "last global copy"
    if not batches:
        arrays, metrics = ArrayRecord(), {"num-examples": 0, "num-steps": 0}
    else:
        if call.step >= len(batches):
            raise ValueError(f"fedbert: eval step {call.step} but the client has {len(batches)} batches")
        batch = select_batch(rows, batches[call.step])
        call.live.bottom.eval()
        with torch.no_grad():
            acts = client_forward(call.live.bottom, to_device(batch, call.device), dtype=call.dtype)
        arrays = activation_record(acts, batch[1], batch[2])
        metrics = {"num-examples": len(batch[2]), "num-steps": len(batches)}
    if call.step == 0:
        _save_live(call.context, call.live, call.meta, keep_optimizer=False)
    else:
        _LIVE[_live_key(call.context)] = call.live  # unchanged: token still valid
    return arrays, metrics


def handle_split_message(msg: Message, context: Context) -> Message:
    """Client side of FedBERT: one message of the server's per-batch exchange.

    TRAIN ``config`` = {server-round, step, final}; ``arrays`` = the global bottom (step 0),
    else ``grad.<step-1>``. The client applies the backward of step - 1 (recomputing its
    forward), then either runs the forward of batch ``step`` and replies activations, mask,
    labels (``final`` false) or replies its bottom's trained weights (``final`` true).
    EVALUATE ``config`` = {server-round, step, test-set}; ``arrays`` = the global bottom at step 0;
    the reply holds the activations of batch ``step`` of the test set named (``own``, the default:
    the client's test split; ``global``: the global test set).

    Replies carry one ArrayRecord ``arrays``, one MetricRecord ``metrics`` (``num-examples``,
    ``num-steps``) and ConfigRecord ``info`` (``client-id``, ``compute-s`` in seconds,
    ``server-round``, ``step``).
    """
    start = time.perf_counter()
    cfg = RunConfig.from_run_config(context.run_config)
    split = SplitConfig.from_run_config(cfg)
    client_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    config = msg.content.config_records[CONFIG]
    server_round, step = int(config["server-round"]), int(config["step"])
    kind = msg.metadata.message_type.split(".")[0]
    device, dtype = placement(cfg.device, cfg.precision)
    live = _load_live(context, cfg, split, device, dtype)
    meta_record = context.state.config_records.get(_META)
    meta = {k: v for k, v in meta_record.items() if k not in ("token", "adam-step")} if meta_record else {}
    call = _Call(msg, context, cfg, split, client_id, server_round, step, live, meta, device, dtype)

    if kind == MessageType.TRAIN:
        arrays, metrics = _train(call, client_data(cfg, client_id, num_partitions)[0], bool(config.get("final", False)))
    elif kind == MessageType.EVALUATE:
        arrays, metrics = _evaluate(call, evaluation_rows(cfg, client_id, num_partitions,
                                                          str(config.get(TEST_SET, "own"))))
    else:
        raise ValueError(f"fedbert: unexpected message type {msg.metadata.message_type!r}")

    content = RecordDict({
        ARRAYS: arrays,
        METRICS: MetricRecord(metrics),
        INFO_KEY: ConfigRecord({"client-id": client_id, "server-round": server_round, "step": step,
                                "compute-s": time.perf_counter() - start}),
    })
    return Message(content=content, reply_to=msg)


__all__ = ["client_data", "eval_batches", "evaluation_rows", "handle_split_message", "select_batch", "step_seed", "train_batches"]

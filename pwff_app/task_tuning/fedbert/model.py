"""FedBERT baseline: the split of the task model and its math (pure: no Flower).

FedBERT (Tian et al., "FedBERT: When Federated Learning Meets Pre-training", ACM TIST 2022)
trains BERT by *federated split learning*: each client runs the bottom of the network and
sends activations, the server runs the rest and returns gradients, and the client-side parts
are aggregated. The protocol here is SplitFed-V2 (Thapa et al., "SplitFed: When Federated
Learning Meets Split Learning", AAAI 2022): one server-side top is trained by the clients one
after another, batch by batch; the client-side bottoms are aggregated (Flower's rule chosen by
``aggregator``) at the end of every round. See ``docs/fedbert.md``.

The split of :class:`pwff_app.task_tuning.model.EncoderClassifier` (same encoder, data and tokenizer as
every other method) at layer ``k`` (run config ``fedbert.split-layer``):

* :class:`ClientBottom`: the embeddings and encoder layers ``0 .. k-1``;
* :class:`ServerTop`: encoder layers ``k .. n-1``, mean pooling, dropout and the linear head.

Both share their parameters with the model they were cut from and keep the model's parameter
names (``backbone.encoder.layer.3.attention...``, ``head.weight``), so :func:`group_params`
and :func:`load_params` work on them. Together they compute exactly the model's function: the
attention mask is expanded by the encoder's own mask builder on both sides.

The two sides of the message protocol: :mod:`pwff_app.task_tuning.fedbert.client`
(:func:`handle_split_message`) and :mod:`pwff_app.task_tuning.fedbert.server`
(:func:`run_split_learning`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pwff_app.config import ConfigError, RunConfig
from pwff_app.device import autocast, fork_rng
from pwff_app.methods import MethodSpec
from pwff_app.task_tuning.data import AG_NEWS_CLASSES
from pwff_app.task_tuning.model import EncoderClassifier, build_task_model

# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------

FULL_FINETUNE_LR = 5e-5  # BERT fine-tuning range 2e-5..5e-5 (Devlin et al. 2019)

# Message keys of the protocol (both directions; client.py and server.py must agree).
ARRAYS, CONFIG, METRICS, INFO_KEY = "arrays", "config", "metrics", "info"
ACTIVATIONS, MASK, LABELS = "activations", "attention-mask", "labels"
GRAD_PREFIX = "grad."  # + step index: the gradient for the activations of that step
# EVALUATE config key: which rows a client runs its bottom on, its own test split or the global test set.
TEST_SET, TEST_SETS = "test-set", ("own", "global")


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

    ``shared`` names what the clients' bottoms aggregate (the client-side part of it); the
    server-side part of ``trained`` stays on the server.
    """
    if train == "adapter":
        modules, trained, shared = {"adapter"}, {"adapter", "head"}, {"adapter"}
    else:
        modules, trained, shared = set(), {"backbone", "head"}, {"backbone"}
    return MethodSpec("fedbert", "task", frozenset(modules), frozenset(trained), frozenset(shared),
                      False, "split", f"FedBERT split learning ({train})")  # type: ignore[arg-type]


def new_task_model(model_name: str, train: str, adapter_size: int, seed: int) -> EncoderClassifier:
    """The whole task model for a train mode, ``requires_grad`` set; the same init for a seed.

    Plain arguments (no config object), so the client can cache its template by them.
    """
    model = build_task_model(model_name, split_spec(train), len(AG_NEWS_CLASSES), adapter_size,
                             lora_rank=1, lora_alpha=1, resource_level=1.0, seed=seed)  # no LoRA inserted
    if train == "full":
        for name, p in model.named_parameters():
            if name.endswith("word_embeddings.weight"):
                p.requires_grad = False
    return model


def build_split_model(cfg: RunConfig, split: SplitConfig) -> EncoderClassifier:
    """:func:`new_task_model` for the run's task settings and seed."""
    return new_task_model(cfg.task.model_name, split.train, cfg.task.adapter_size, cfg.seed)


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


class _SplitPart(nn.Module):
    """One side of the cut: the encoder layers it holds under ``backbone`` (named as in the model).

    Args:
        model: the model to cut (its modules are shared, not copied).
        k: the split layer.
        client_side: the embeddings and layers ``0 .. k-1`` if True, else layers ``k .. n-1``.
    """

    def __init__(self, model: EncoderClassifier, k: int, client_side: bool) -> None:
        super().__init__()
        embeddings, layers = _encoder_parts(model.backbone)
        self.config = model.backbone.config
        self.split_layer = k
        ids = range(k) if client_side else range(k, len(layers))
        self.backbone = _BackbonePart(embeddings if client_side else None, {i: layers[i] for i in ids})


class ClientBottom(_SplitPart):
    """Embeddings + encoder layers ``0 .. k-1``: token ids -> hidden states [B, L, H]."""

    def __init__(self, model: EncoderClassifier, k: int) -> None:
        super().__init__(model, k, client_side=True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone.embeddings(input_ids=input_ids)
        return _run_layers(self.config, self.backbone.layers(), hidden, attention_mask)


class ServerTop(_SplitPart):
    """Encoder layers ``k .. n-1``, mean pooling, dropout, head: hidden states -> logits."""

    def __init__(self, model: EncoderClassifier, k: int) -> None:
        super().__init__(model, k, client_side=False)
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
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Fork the RNG of the CPU and of ``device`` and seed it, so the dropout masks of a forward can be drawn again."""
    if seed is None:
        yield
        return
    with fork_rng(device):
        torch.manual_seed(seed)
        yield


def client_forward(bottom: ClientBottom, batch: Sequence[torch.Tensor], seed: int | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Activations [B, L, H] of the bottom for ``batch = (input_ids, attention_mask, ...)`` on its device.

    With ``seed`` the dropout masks are drawn from it, so :func:`client_backward` can redo
    the very same forward. ``dtype``: of the autocast forward (see :mod:`pwff_app.device`).
    """
    device = batch[0].device
    with _seeded(seed, device), autocast(device, dtype):
        return bottom(batch[0], batch[1])


def server_step(top: ServerTop, activations: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                optimizer: torch.optim.Optimizer | None,
                dtype: torch.dtype = torch.float32) -> tuple[float, torch.Tensor]:
    """Top forward + cross-entropy + backward (+ an optimizer step unless ``optimizer`` is None).

    Tensors on the top's device; ``dtype``: of the autocast forward. Returns the mean loss of the
    batch and the gradient of the loss w.r.t. ``activations`` (in their dtype).
    """
    acts = activations.detach().requires_grad_(True)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    with autocast(acts.device, dtype):
        loss = nn.functional.cross_entropy(top(acts, attention_mask), labels)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    return float(loss.detach()), acts.grad.detach()


def client_backward(bottom: ClientBottom, batch: Sequence[torch.Tensor], grad: torch.Tensor,
                    optimizer: torch.optim.Optimizer | None, seed: int | None = None,
                    dtype: torch.dtype = torch.float32) -> None:
    """Redo the bottom's forward on ``batch`` (same ``seed`` and ``dtype``), backpropagate ``grad``
    into the bottom's parameters and take an optimizer step (none if ``optimizer`` is None).

    The forward is recomputed because no autograd graph survives between two messages.
    """
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    out = client_forward(bottom, batch, seed, dtype)
    if out.requires_grad:  # an all-frozen bottom (e.g. adapters with k = 0) has nothing to learn
        out.backward(grad.to(out.dtype))
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
    """AdamW (no weight decay) over the trained parameters; None if nothing is trained."""
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if params else None


def activation_bytes(batch_size: int, length: int, hidden: int) -> int:
    """Payload of one training reply in bytes: float32 activations + int8 mask + int64 labels."""
    return batch_size * length * hidden * 4 + batch_size * length * 1 + batch_size * 8


def split_param_counts(cfg: RunConfig) -> dict[str, int]:
    """Trained parameters on each side (for the run summary)."""
    split = SplitConfig.from_run_config(cfg)
    bottom, top = split_model(build_split_model(cfg, split), split.split_layer)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    return {"client_bottom": count(bottom), "server_top": count(top), "split_layer": split.split_layer}


__all__ = [
    "ClientBottom", "ServerTop", "SplitConfig", "activation_bytes", "build_split_model", "client_backward",
    "client_forward", "new_optimizer", "new_task_model", "server_step", "split_model", "split_param_counts",
    "split_spec", "trained_arrays", "trim_padding",
]

"""Sparse attention for PFIT (paper IV-C "Sparse Attention Update"), sparsity ratio s (paper: 0.4).

Two separate, measured effects on the trainable blocks only (earlier blocks stay dense):

1. Compute: each query attends to k(n) = max(1, round((1 - s) n)) of the n keys it may see
   (the causal, non-padding keys). The pattern is the local + strided factorisation of
   Child et al. 2019, "Generating Long Sequences with Sparse Transformers", with the budget
   fixed per query: the ceil(k/2) most recent keys (local window, including the query itself)
   plus k - ceil(k/2) keys evenly strided over the older ones, starting at the first token
   (the "attention sink" of Xiao et al. 2023, which pretrained LMs lean on). The pattern
   depends only on key positions, not content, so a block-sparse kernel could skip both
   QK^T and AV for the dropped pairs; :func:`attention_flops` counts exactly those.
   Here it runs as dense scores + mask (no sparse kernel on CPU), so wall time is not cut;
   the attended pairs are counted from the actual mask of every forward.
   Ranks are taken over each query row's visible keys, so a left-padded row, a full forward
   and incremental decoding with a KV cache all select the same keys for the same query.

2. Communication: only round((1 - s) numel) entries of each attention projection tensor of
   the trainable blocks (q/k/v/o_proj or c_attn/c_proj, weights and biases) are updated and
   uploaded; the rest keep their received global value (zero gradient via
   :meth:`PolicyWithValue.mask_gradients`). The mask is a deterministic function of the
   received global weights (rule "magnitude": the largest |w|) or of a seed (rule "random":
   the random-mask structured update of Konecny et al. 2016), ties broken by flat index, so
   the server rebuilds it with :func:`build_attention_masks` and only the values travel.
   MLP and norm parameters of those blocks are sent dense.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from transformers import AttentionInterface

from pwff_app.config import MASK_RULES
from pwff_app.instruct.policy import attention_module, is_attention_param

SPARSE_ATTENTION = "pwff_sparse"


def keep_count(n: torch.Tensor | int, sparsity: float) -> torch.Tensor:
    """round((1 - s) n), half up, as an int64 tensor (float64 so 0.6 * 5 stays 3)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return torch.floor((1.0 - sparsity) * torch.as_tensor(n, dtype=torch.float64) + 0.5).long()


def _ceil_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return -torch.div(-a, b, rounding_mode="floor")


def sparse_pattern(allowed: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Local + strided selection inside each row of ``allowed`` (bool [..., Q, K]); same shape out.

    Row with n visible keys ranked rho = 0..n-1 by position: keep k = max(1, round((1-s) n)),
    the w = ceil(k/2) largest ranks plus r = k - w ranks floor(t m / r), t = 0..r-1, among the
    m = n - w older ones (rho is one of them iff ceil((rho+1) r / m) > ceil(rho r / m)).
    """
    n = allowed.sum(-1, keepdim=True)
    rank = allowed.long().cumsum(-1) - 1
    k = torch.where(n > 0, keep_count(n, sparsity).clamp(min=1), 0)
    w = (k + 1) // 2
    m = n - w
    r = k - w
    m1 = m.clamp(min=1)
    strided = (rank < m) & (_ceil_div((rank + 1) * r, m1) > _ceil_div(rank * r, m1))
    return allowed & ((rank >= m) | strided)


def _allowed_keys(mask: torch.Tensor | None, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Visible keys as bool [B|1, 1|H, Q, K] from whatever mask the model prepared.

    None: plain causal, bottom-right aligned (queries are the last q_len positions, as with a
    KV cache); bool (sdpa): True = visible; float (eager): additive, 0 = visible.
    """
    if mask is None:
        q = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
        return (torch.arange(k_len, device=device)[None, :] <= q)[None, None]
    mask = mask[..., :k_len]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def sparse_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention function (transformers ``AttentionInterface`` signature) with the sparse pattern.

    query [B, H, Q, D], key/value [B, H_kv, K, D] (grouped-query heads are repeated);
    returns output [B, Q, H, D] and weights [B, H, Q, K]. Counts attended / visible
    (query head, key) pairs on ``module.pwff_pairs`` for :func:`attention_pair_counts`.
    """
    heads = query.shape[1]
    key = key.repeat_interleave(heads // key.shape[1], dim=1)
    value = value.repeat_interleave(heads // value.shape[1], dim=1)
    allowed = _allowed_keys(attention_mask, query.shape[2], key.shape[2], query.device)
    keep = sparse_pattern(allowed, module.pwff_sparsity)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    # A row with no visible key (left padding) would get uniform weights: zero it instead.
    probs = probs * keep.any(-1, keepdim=True)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    # The mask may broadcast over batch and heads ([1|B, 1|H, Q, K]): count every (row, head).
    copies = query.shape[0] * heads // (keep.shape[0] * keep.shape[1])
    module.pwff_pairs[0] += int(keep.sum()) * copies
    module.pwff_pairs[1] += int(allowed.sum()) * copies
    return out, probs


AttentionInterface.register(SPARSE_ATTENTION, sparse_attention_forward)


def enable_sparse_attention(model: nn.Module, block_names: Sequence[str], sparsity: float) -> list[nn.Module]:
    """Switch the attention of the named blocks to the sparse pattern; other blocks stay as they were.

    Each patched attention module gets its own config copy whose ``_attn_implementation`` is
    ``"pwff_sparse"`` (the model-level config, and with it mask preparation, is unchanged).
    Call again to change the sparsity (e.g. per client); s = 0 computes dense attention.
    """
    keep_count(0, sparsity)  # validates s
    modules = []
    for name in block_names:
        attn = attention_module(model.get_submodule(name))
        attn.config = copy.copy(attn.config)
        attn.config._attn_implementation = SPARSE_ATTENTION
        attn.pwff_sparsity = float(sparsity)
        attn.pwff_pairs = [0, 0]
        modules.append(attn)
    return modules


def attention_pair_counts(model: nn.Module, reset: bool = True) -> tuple[int, int]:
    """(attended, visible) (query head, key) pairs summed over all sparse modules since the last reset."""
    attended = visible = 0
    for module in model.modules():
        if hasattr(module, "pwff_pairs"):
            attended += module.pwff_pairs[0]
            visible += module.pwff_pairs[1]
            if reset:
                module.pwff_pairs = [0, 0]
    return attended, visible


def attended_pairs(seq_len: int, sparsity: float) -> int:
    """Attended (query, key) pairs of one head over one unpadded causal sequence: sum_n k(n), n = 1..T."""
    n = torch.arange(1, seq_len + 1)
    return int(keep_count(n, sparsity).clamp(min=1).sum())


def attention_flops(seq_len: int, n_heads: int, head_dim: int, sparsity: float) -> int:
    """FLOPs of QK^T and AV for one sequence in one attention layer with the pattern used.

    Each attended pair costs head_dim multiply-adds in QK^T and head_dim in AV, 2 FLOPs each:
    4 * head_dim * n_heads * pairs. Dense (s = 0) counts the causal triangle T(T+1)/2, as a
    causal kernel skips the upper half. Softmax and projections are not included.
    """
    return 4 * head_dim * n_heads * attended_pairs(seq_len, sparsity)


def build_attention_masks(
    model: nn.Module | Mapping[str, torch.Tensor | np.ndarray],
    trainable_block_names: Sequence[str],
    sparsity: float,
    rule: str = "magnitude",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Bool update mask per attention projection tensor of the trainable blocks, round((1-s) numel) True each.

    ``model``: the LM (client) or a name -> tensor mapping of the global trainable part
    (server); both must hold the same global values for the masks to agree.
    rule "magnitude": the largest |w_global|; "random": uniform scores from ``seed`` (weights
    ignored, so the mask survives a stale global copy). Ties go to the lower flat index.
    """
    if rule not in MASK_RULES:
        raise ValueError(f"mask rule must be one of {MASK_RULES}, got {rule!r}")
    params = dict(model.named_parameters()) if isinstance(model, nn.Module) else model
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for name in sorted(n for n in params if is_attention_param(n, trainable_block_names)):
        weight = torch.as_tensor(params[name]).detach()
        if rule == "magnitude":
            score = weight.abs().flatten().float()
        else:
            score = torch.rand(weight.numel(), generator=generator)
        order = torch.argsort(score, descending=True, stable=True)
        mask = torch.zeros(weight.numel(), dtype=torch.bool)
        mask[order[: int(keep_count(weight.numel(), sparsity))]] = True
        masks[name] = mask.view(weight.shape)
    return masks


def pack_sparse(params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The upload: masked tensors as 1-D arrays of their kept values (row-major order), others dense."""
    packed = {}
    for name in sorted(params):
        tensor = params[name].detach().cpu()
        packed[name] = (tensor[masks[name]] if name in masks else tensor).numpy().copy()
    return packed


def unpack_sparse(
    packed: Mapping[str, np.ndarray], masks: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Dense tensors from an upload: kept values placed into a copy of ``base`` (the global part)."""
    out = {}
    for name, ref in base.items():
        values = torch.from_numpy(np.asarray(packed[name]))
        if name in masks:
            dense = ref.detach().clone()
            dense[masks[name]] = values.to(dense.dtype)
            out[name] = dense
        else:
            out[name] = values.reshape(ref.shape).to(ref.dtype)
    return out


def upload_bytes(packed: Mapping[str, np.ndarray]) -> int:
    """Payload bytes of an upload (numel x itemsize); the masks cost nothing, the server rebuilds them."""
    return sum(a.nbytes for a in packed.values())


def aggregate_sparse(
    global_params: Mapping[str, torch.Tensor],
    uploads: Sequence[Mapping[str, np.ndarray]],
    masks: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
) -> dict[str, torch.Tensor]:
    """Per-entry weighted average over the clients that updated each entry (FedAvg on sparse updates).

    An entry nobody updated keeps its global value; one updated by a subset averages over that
    subset, so a client's frozen entries do not drag the others' updates toward the old value.
    """
    out = {}
    for name, ref in global_params.items():
        num = torch.zeros_like(ref, dtype=torch.float64)
        den = torch.zeros_like(ref, dtype=torch.float64)
        for packed, mask, w in zip(uploads, masks, weights, strict=True):
            dense = unpack_sparse({name: packed[name]}, mask, {name: ref})[name].double()
            hit = mask[name].double() if name in mask else torch.ones_like(den)
            num += w * hit * dense
            den += w * hit
        out[name] = torch.where(den > 0, num / den.clamp(min=1e-300), ref.double()).to(ref.dtype)
    return out

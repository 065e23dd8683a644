"""Sparse attention for PFIT (paper IV-C "Sparse Attention Update"), sparsity ratio s (paper: 0.4).

Two separate, measured effects on the trainable blocks only (earlier blocks stay dense):

1. Compute: each query attends to k(n) = max(1, round((1 - s) n)) of the n keys it may see
   (the causal, non-padding keys), in the block local + strided pattern of
   :mod:`pwff_app.instruct.sparse_pattern` (Child et al. 2019, "Generating Long Sequences with
   Sparse Transformers"; strided key blocks start at the first token, the "attention sink" of
   Xiao et al. 2023). In a full forward (prefill, training) the kernel skips the dropped key
   blocks: each tile of 64 query rows gathers only the 16-key blocks its queries keep and runs
   ``scaled_dot_product_attention`` on them, with the exact pattern, causal and padding mask
   inside the gathered blocks. A decoding step reads the whole cache with the pattern as mask.
   :func:`attention_flops` counts the attended pairs (what a perfect kernel executes); the
   counters accumulate on the device and are read once, by :func:`attention_pair_counts`.
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
from torch.nn.functional import scaled_dot_product_attention
from transformers import AttentionInterface

from pwff_app.config import MASK_RULES
from pwff_app.instruct.policy import attention_module, is_attention_param
from pwff_app.instruct.sparse_pattern import (
    QUERY_BLOCK,
    keep_count,
    prefill_groups,
    sparse_pattern,
    tile_keep,
    tile_slots,
)

SPARSE_ATTENTION = "pwff_sparse"


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


def masked_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor, sparsity: float,
    scale: float, dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference: dense scores masked to the pattern. query [B, H, Q, D], key/value [B, H_kv, K, D].

    Returns output [B, Q, H, D], weights [B, H, Q, K] and the kept mask [B|1, 1|H, Q, K].
    Every (query, key) pair is computed; the kernel must match this within float rounding.
    """
    heads = query.shape[1]
    key = key.repeat_interleave(heads // key.shape[1], dim=1)
    value = value.repeat_interleave(heads // value.shape[1], dim=1)
    keep = sparse_pattern(allowed, sparsity)
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    # Softmax in at least float32; float64 stays float64 (its min would overflow to -inf in float32).
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(query.dtype)
    # A row with no visible key (left padding) would get uniform weights: zero it instead.
    probs = nn.functional.dropout(probs * keep.any(-1, keepdim=True), p=dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs, keep


def _let_empty_rows_see_slot0(keep: torch.Tensor) -> torch.Tensor:
    """Rows of kept pairs bool [..., S] that keep nothing; they get slot 0, in place.

    No fully masked row reaches SDPA (fused GPU kernels may return NaN gradients for one): the
    caller drops such a row's output, so it stays 0, as in the reference.
    """
    empty = ~keep.any(-1)
    keep[..., 0] |= empty
    return empty


def _tile_index(
    allowed: torch.Tensor | None, first: torch.Tensor, rows: torch.Tensor, slots: tuple[torch.Tensor, torch.Tensor],
    seq_len: int, sparsity: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where one kernel call reads and writes, and what it attends.

    first [B]: position of key rank 0 (the left padding); rows [1, t, R]: each tile row's query
    rank; slots: key ranks and real flags [1, t, S] (:func:`tile_slots`); seq_len: T.
    Returns flat query rows b T + i [B, t, R], flat key rows b T + j [B, t, S], the SDPA mask
    bool [B, t, R, S], each row's output row [B, t, R] (B T, a spare row, for rows whose output
    is 0 or that are no query) and the attended (row, key) pairs as a device scalar.
    """
    ranks, real = slots
    b = torch.arange(first.shape[0], device=first.device)[:, None, None]
    query_at = rows + first[:, None, None]
    row_ok = query_at < seq_len
    query_at = query_at.clamp(max=seq_len - 1)
    key_at = (ranks + first[:, None, None]).clamp(max=seq_len - 1)
    keep = tile_keep(rows + 1, ranks, real, sparsity) & row_ok[..., None]
    if allowed is not None:  # the model's own mask stays exact, whatever layout it has
        per_row = allowed[:, 0]
        keep &= per_row[b[..., None] if per_row.shape[0] > 1 else 0, query_at[..., None], key_at[..., None, :]]
    attended = keep.sum()
    empty = _let_empty_rows_see_slot0(keep)
    target = torch.where(row_ok & ~empty, query_at + b * seq_len, first.shape[0] * seq_len)
    return query_at + b * seq_len, key_at + b * seq_len, keep, target, attended


def _tile_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, dropout: float
) -> torch.Tensor:
    """SDPA of gathered tiles: q [B t R, H, D], k/v [B t S, H_kv, D], mask [B, t, R, S] -> [B t R, H, D]."""
    batch, tiles, rows, slots = mask.shape
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[2]
    group, n = heads // kv_heads, batch * tiles
    # Query heads of one KV head become extra rows (grouped-query attention without repeating K/V).
    q = q.view(n, rows, kv_heads, group, dim).permute(0, 2, 3, 1, 4).reshape(n, kv_heads, group * rows, dim)
    k, v = (x.view(n, slots, kv_heads, dim).transpose(1, 2) for x in (k, v))
    mask = mask.view(n, 1, 1, rows, slots).expand(-1, -1, group, -1, -1).reshape(n, 1, group * rows, slots)
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
    return out.view(n, kv_heads, group, rows, dim).permute(0, 3, 1, 2, 4).reshape(-1, heads, dim)


def _tiles(
    first: torch.Tensor, seq_len: int, sparsity: float
) -> list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]:
    """(rows, slots) per kernel call: groups of query blocks; shapes from (T, s) on the host."""
    device = first.device
    calls = []
    for block, count, strided, window in prefill_groups(seq_len, sparsity):
        n_first = torch.arange(block, block + count, device=device) * QUERY_BLOCK + 1
        rows = (n_first - 1)[:, None] + torch.arange(QUERY_BLOCK, device=device)
        ranks, real = tile_slots(n_first, (n_first + QUERY_BLOCK - 1).clamp(max=seq_len), sparsity, strided, window)
        calls.append((rows[None], (ranks[None], real[None])))
    return calls


def _gather(x: torch.Tensor, index: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Rows of x [B, heads, L, D] at flat positions b L + i: one gather for all ``index``, split to match."""
    rows = x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])
    return list(rows.index_select(0, torch.cat([i.flatten() for i in index])).split([i.numel() for i in index]))


def block_sparse_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor | None, sparsity: float,
    scale: float, dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel for a full forward (prefill, training) over T tokens; only kept key blocks are computed.

    query [B, H, T, D], key/value [B, H_kv, T, D], allowed: bool [B|1, 1, T, T] or None (causal).
    Returns output [B, T, H, D] (0 for rows that see no key) and the attended (query row, key)
    pairs per head as a device scalar.
    """
    batch, heads, seq_len, dim = query.shape
    if allowed is None:
        first = torch.zeros(batch, dtype=torch.long, device=query.device)
    else:  # the first key the last query sees: the left padding (argmax: the first maximum)
        first = allowed[:, 0, -1].int().argmax(-1).expand(batch)
    calls = [_tile_index(allowed, first, rows, slots, seq_len, sparsity)
             for rows, slots in _tiles(first, seq_len, sparsity)]
    query_at, key_at, masks, targets, attended = zip(*calls, strict=True)
    outs = [_tile_attention(q, k, v, mask, scale, dropout) for q, k, v, mask in zip(
        _gather(query, query_at), _gather(key, key_at), _gather(value, key_at), masks, strict=True)]
    # One scatter into a zero output with a spare row for tile rows that are no query.
    out = query.new_zeros(batch * seq_len + 1, heads, dim).index_add(
        0, torch.cat([t.flatten() for t in targets]), torch.cat(outs))
    return out[:-1].view(batch, seq_len, heads, dim), sum(attended)


def masked_sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor, sparsity: float,
    scale: float, dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every key read once, the pattern as SDPA's mask: for decoding (Q = 1) and Q < K with a cache.

    A decoding step is bound by reading the cache, and gathering the kept keys would cost as much
    as reading them all, so no key is skipped here. Same arguments and returns as
    :func:`block_sparse_attention`, with ``allowed`` bool [B|1, 1, Q, K] (not None).
    """
    keep = sparse_pattern(allowed, sparsity)
    attended = keep.sum() * (query.shape[0] // keep.shape[0])
    empty = _let_empty_rows_see_slot0(keep)
    out = scaled_dot_product_attention(query, key, value, attn_mask=keep, dropout_p=dropout, scale=scale,
                                       enable_gqa=True)
    return (out * ~empty[..., None]).transpose(1, 2), attended


def sparse_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function (transformers ``AttentionInterface`` signature) with the sparse pattern.

    query [B, H, Q, D], key/value [B, H_kv, K, D]; returns output [B, Q, H, D] and no weights.
    A full forward (Q = K) runs :func:`block_sparse_attention`, a step with a KV cache (Q < K)
    :func:`masked_sdpa`. Adds attended / visible (query head, key) pairs to the device tensor
    ``module.pwff_pairs``; nothing is read back to the host.
    """
    batch, heads, q_len, dim = query.shape
    k_len = key.shape[2]
    scale = dim**-0.5 if scaling is None else scaling
    dropout = dropout if module.training else 0.0
    allowed = None if attention_mask is None else _allowed_keys(attention_mask, q_len, k_len, query.device)
    if allowed is None:  # causal: query i sees K - Q + i + 1 keys
        seen = batch * heads * (q_len * (k_len - q_len) + q_len * (q_len + 1) // 2)
        visible = torch.tensor(seen, device=query.device)
    else:
        visible = allowed.sum() * (batch * heads // (allowed.shape[0] * allowed.shape[1]))
    if q_len == k_len:
        out, attended = block_sparse_attention(query, key, value, allowed, module.pwff_sparsity, scale, dropout)
    else:
        full = _allowed_keys(None, q_len, k_len, query.device) if allowed is None else allowed
        out, attended = masked_sdpa(query, key, value, full, module.pwff_sparsity, scale, dropout)
    _add_pairs(module, attended * heads, visible)
    return out, None


def _add_pairs(module: nn.Module, attended: torch.Tensor, visible: torch.Tensor) -> None:
    """Accumulate on the counters' device without a host read (the module may have moved)."""
    pairs = module.pwff_pairs.to(attended.device)
    module.pwff_pairs = pairs + torch.stack([attended, visible.to(attended.device)])


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
        attn.pwff_pairs = torch.zeros(2, dtype=torch.long, device=next(attn.parameters()).device)
        modules.append(attn)
    return modules


def attention_pair_counts(model: nn.Module, reset: bool = True) -> tuple[int, int]:
    """(attended, visible) (query head, key) pairs summed over all sparse modules since the last reset.

    The one host read of the device counters: call it once per round, not per step.
    """
    counters = [m for m in model.modules() if hasattr(m, "pwff_pairs")]
    if not counters:
        return 0, 0
    attended, visible = torch.stack([m.pwff_pairs.cpu() for m in counters]).sum(0).tolist()
    if reset:
        for module in counters:
            module.pwff_pairs = torch.zeros_like(module.pwff_pairs)
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
    Computed on the CPU wherever the weights live, as the server does, so client and server
    agree bit for bit; :meth:`PolicyWithValue.set_update_masks` moves them to the device.
    """
    if rule not in MASK_RULES:
        raise ValueError(f"mask rule must be one of {MASK_RULES}, got {rule!r}")
    params = dict(model.named_parameters()) if isinstance(model, nn.Module) else model
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for name in sorted(n for n in params if is_attention_param(n, trainable_block_names)):
        weight = torch.as_tensor(params[name]).detach().cpu()
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
        packed[name] = (tensor[masks[name].cpu()] if name in masks else tensor).numpy().copy()
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

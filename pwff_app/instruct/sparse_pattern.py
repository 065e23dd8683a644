"""The block local + strided sparse attention pattern (pure index math, no model code).

Everything here is a function of ranks: a query that may see n keys (causal, non-padding) has
rank n - 1, and its visible keys have ranks 0..n-1 in position order. Ranks, not positions,
make a left-padded row, a full forward and KV-cached decoding select the same keys.

Pattern (Child et al. 2019, local + strided, in blocks of :data:`KEY_BLOCK` key ranks so that
a kernel can skip whole blocks): a query of rank q in query block Q = q // QUERY_BLOCK keeps
exactly k(n) = max(1, round((1 - s) n)) keys:

* strided: c whole key blocks spread evenly over the J oldest full blocks (block 0, the
  "attention sink" of Xiao et al. 2023, always among them); c and J are fixed per query block
  from its first query (n0 = Q QUERY_BLOCK + 1, k0 = k(n0)): c = floor(floor(k0 / 2) / KEY_BLOCK),
  J = floor((n0 - k0 + c KEY_BLOCK) / KEY_BLOCK), so the strided part holds about half the budget;
* sink: if c = 0 (short rows) and k >= 2, key rank 0 alone;
* local: the w = k - c KEY_BLOCK - sink most recent keys, including the query itself
  (w >= ceil(k / 2); the window never overlaps the strided blocks, see :func:`block_plan`).
"""

from __future__ import annotations

import functools

import torch

KEY_BLOCK = 16
"""Key ranks per block: the strided part is whole blocks."""
QUERY_BLOCK = 64
"""Query ranks that share one strided plan; also the rows of one kernel tile (its slots are shared)."""


def keep_count(n: torch.Tensor | int, sparsity: float) -> torch.Tensor:
    """round((1 - s) n), half up, as an int64 tensor (float64 so 0.6 * 5 stays 3)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    n = torch.as_tensor(n)
    return torch.floor((1.0 - sparsity) * n.to(torch.float64) + 0.5).long()


def _ceil_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return -torch.div(-a, b, rounding_mode="floor")


def block_plan(n: torch.Tensor, sparsity: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c, J, sink, w) for queries that see n >= 1 keys: strided blocks, older full blocks, sink key, window.

    The window [n - w, n) starts at n - k(n) + c KEY_BLOCK + sink, which never decreases with n, so
    it starts at or after J KEY_BLOCK for every query of the block: strided and local keys are disjoint.
    """
    n0 = (n - 1) // QUERY_BLOCK * QUERY_BLOCK + 1
    k0 = keep_count(n0, sparsity).clamp(min=1)
    c = k0 // 2 // KEY_BLOCK
    blocks = (n0 - k0 + c * KEY_BLOCK) // KEY_BLOCK
    k = keep_count(n, sparsity).clamp(min=1)
    sink = ((c == 0) & (k >= 2)).long()
    return c, blocks, sink, k - c * KEY_BLOCK - sink


def _strided_block(j: torch.Tensor, c: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Whether key block j is one of floor(t J / c), t = 0..c-1 (c <= J; none if c = 0)."""
    j1 = blocks.clamp(min=1)
    return (j >= 0) & (j < blocks) & (_ceil_div((j + 1) * c, j1) > _ceil_div(j * c, j1))


def _kept(
    rank: torch.Tensor, n: torch.Tensor, w: torch.Tensor, sink: torch.Tensor, strided: torch.Tensor
) -> torch.Tensor:
    """The local window [n - w, n), the strided keys, the sink key (all broadcast, bool)."""
    return ((rank >= n - w) & (rank < n)) | strided | ((sink > 0) & (rank == 0))


def keep_rule(n: torch.Tensor, rank: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Whether a query that sees n keys keeps the key of rank ``rank`` (broadcast, bool); n = 0 keeps none."""
    c, blocks, sink, w = block_plan(n.clamp(min=1), sparsity)
    return (n > 0) & _kept(rank, n, w, sink, _strided_block(rank // KEY_BLOCK, c, blocks))


def tile_keep(n: torch.Tensor, ranks: torch.Tensor, real: torch.Tensor, sparsity: float) -> torch.Tensor:
    """:func:`keep_rule` for tiles: rows seeing n [..., t, R] keys (one query block per tile) x slots
    ``ranks`` / ``real`` [..., t, S] -> bool [..., t, R, S]. The strided flags are worked out per
    slot, not per pair, as the rows of a tile share one plan.
    """
    c, blocks, sink, w = block_plan(n.clamp(min=1), sparsity)
    strided = _strided_block(ranks // KEY_BLOCK, c[..., :1], blocks[..., :1])
    kept = _kept(ranks[..., None, :], n[..., None], w[..., None], sink[..., None], strided[..., None, :])
    return kept & real[..., None, :] & (n > 0)[..., None]


def sparse_pattern(allowed: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The pattern inside each row of ``allowed`` (bool [..., Q, K], True = visible); same shape out."""
    n = allowed.sum(-1, keepdim=True)
    rank = allowed.long().cumsum(-1) - 1
    return allowed & keep_rule(n, rank, sparsity)


def tile_slots(
    n_first: torch.Tensor, n_last: torch.Tensor, sparsity: float, strided: int, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key ranks a kernel tile gathers, and which of them are real: ([..., S], bool [..., S]).

    The tile's queries see n_first..n_last keys and share one query block. Slots: the sink key,
    ``strided`` key blocks (c of them real), then ``window`` consecutive blocks from the block of
    the first query's window start up to the query block. Real slots hold distinct keys and
    cover every key :func:`keep_rule` keeps for those queries; the counts are upper bounds from
    :func:`slot_counts`, so the shapes need no device values.
    """
    c, blocks, _, w = block_plan(n_first, sparsity)
    start = (n_first - w) // KEY_BLOCK
    last_sink = block_plan(n_last, sparsity)[2]
    t = torch.arange(strided, device=n_first.device)
    j = t * blocks[..., None] // c.clamp(min=1)[..., None]
    u = start[..., None] + torch.arange(window, device=n_first.device)
    # The sink slot is only needed when key 0 is not already in the window's blocks.
    ranks = torch.cat([torch.zeros_like(start)[..., None], _block_keys(j), _block_keys(u)], -1)
    real = torch.cat([
        ((last_sink > 0) & (start > 0))[..., None],
        (t < c[..., None]).repeat_interleave(KEY_BLOCK, -1),
        (u <= (n_last[..., None] - 1) // KEY_BLOCK).repeat_interleave(KEY_BLOCK, -1),
    ], -1)
    return ranks, real


def _block_keys(blocks: torch.Tensor) -> torch.Tensor:
    """Block indices [..., b] -> the key ranks of those blocks, [..., b * KEY_BLOCK]."""
    return (blocks[..., None] * KEY_BLOCK + torch.arange(KEY_BLOCK, device=blocks.device)).flatten(-2)


def slot_counts(n_first: torch.Tensor, n_last: torch.Tensor, sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(strided blocks, window blocks) a tile of queries seeing n_first..n_last keys needs (int64, exact)."""
    c, _, _, w = block_plan(n_first, sparsity)
    return c, (n_last - 1) // KEY_BLOCK - (n_first - w) // KEY_BLOCK + 1


@functools.lru_cache(maxsize=256)
def prefill_groups(seq_len: int, sparsity: float, waste: float = 0.05) -> tuple[tuple[int, int, int, int], ...]:
    """Query blocks of a full forward over ``seq_len`` ranks, grouped for batched kernel calls.

    Returns (first query block, block count, strided key blocks, window key blocks) per group:
    consecutive query blocks share one call padded to the group's largest slot counts, as long
    as the padding stays under ``waste`` of the group's real slots. Fewer calls save launches
    (GPU); padding is computed for nothing (CPU time at T = 2048: flat for 0 to 0.05, +5 % at
    0.125). Computed on the host from shapes only.
    """
    first = torch.arange(0, seq_len, QUERY_BLOCK) + 1
    strided, window = slot_counts(first, (first + QUERY_BLOCK - 1).clamp(max=seq_len), sparsity)
    groups: list[tuple[int, int, int, int]] = []
    for q, (c, u) in enumerate(zip(strided.tolist(), window.tolist(), strict=True)):
        if groups:
            q0, count, c_max, u_max = groups[-1]
            real = int((strided[q0:q + 1] + window[q0:q + 1]).sum())
            if (count + 1) * (max(c, c_max) + max(u, u_max)) <= (1 + waste) * real:
                groups[-1] = (q0, count + 1, max(c, c_max), max(u, u_max))
                continue
        groups.append((q, 1, c, u))
    return tuple(groups)

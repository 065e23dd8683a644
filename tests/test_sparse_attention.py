"""Sparse attention: the kept fractions, the counted compute, the upload bytes, equality with dense at s = 0."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AttentionInterface

from pwff_app.instruct.policy import (
    PolicyWithValue,
    attention_module,
    freeze_all_but_last_blocks,
    is_attention_param,
    trainable_state,
)
from pwff_app.testing.tiny import tiny_gpt2, tiny_llama, tiny_tokenizer
from pwff_app.instruct.ppo import logprobs_and_values
from pwff_app.instruct import sparse_attention
from pwff_app.instruct.rollouts import Rollouts
from pwff_app.instruct.sparse_attention import (
    _allowed_keys,
    aggregate_sparse,
    attended_pairs,
    attention_flops,
    attention_pair_counts,
    block_sparse_attention,
    build_attention_masks,
    enable_sparse_attention,
    keep_count,
    masked_attention,
    pack_sparse,
    sparse_attention_forward,
    sparse_pattern,
    unpack_sparse,
    upload_bytes,
)
from pwff_app.instruct.sparse_pattern import KEY_BLOCK, QUERY_BLOCK, prefill_groups, slot_counts, tile_slots

MODELS = [tiny_llama, tiny_gpt2]


def _padded_batch(seq_len: int = 24) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(4, 100, (3, seq_len))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding
    mask[2, :1] = 0
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


@pytest.mark.parametrize("sparsity", [0.0, 0.4, 0.75])
def test_pattern_keeps_fraction_of_causal_keys_per_query(sparsity: float) -> None:
    n = 50
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    keep = sparse_pattern(causal, sparsity)
    per_query = keep.sum(-1)
    visible = torch.arange(1, n + 1)
    assert torch.equal(per_query, keep_count(visible, sparsity).clamp(min=1))
    assert (per_query.float() - (1 - sparsity) * visible).abs().max() <= 1.0  # rounding, and >= 1 key
    assert not (keep & ~causal).any()
    assert keep.diagonal().all()  # the local window holds the query itself
    if sparsity < 0.5:  # the strided part starts at the first token once there is one
        assert keep[2:, 0].all()


@pytest.mark.parametrize("sparsity", [0.0, 0.2, 0.4, 0.7, 0.95])
def test_block_pattern_over_many_query_blocks(sparsity: float) -> None:
    # Exact budget per query, the window holds at least half of it, strided keys are whole key
    # blocks shared by a query block, and each kernel tile's real slots are distinct and cover it.
    n = 700
    keep = sparse_pattern(torch.ones(n, n, dtype=torch.bool).tril(), sparsity)
    visible = torch.arange(1, n + 1)
    budget = keep_count(visible, sparsity).clamp(min=1)
    assert torch.equal(keep.sum(-1), budget) and keep.diagonal().all()
    back = torch.arange(n)[:, None] - torch.arange(n)  # key i - d for query i: walk back from the query
    window = (keep.gather(1, back.clamp(min=0)) & (back >= 0)).long().cumprod(-1).sum(-1)  # unbroken run
    assert (window >= (budget + 1) // 2).all()
    for block in range(0, n, QUERY_BLOCK):
        rows = keep[block:block + QUERY_BLOCK]
        old = rows[:, : (block + 1 - window[block]) // KEY_BLOCK * KEY_BLOCK].clone()  # older than every window
        old[:, :1] &= old[:, 1:2]  # the sink key alone (the budget is under two blocks) is no block
        blocks = old.reshape(len(rows), -1, KEY_BLOCK)
        assert (blocks.all(-1) | ~blocks.any(-1)).all() and (blocks == blocks[:1]).all()
        first = torch.tensor(block + 1)
        last = torch.tensor(min(block + QUERY_BLOCK, n))
        ranks, real = tile_slots(first, last, sparsity, *(int(c) for c in slot_counts(first, last, sparsity)))
        gathered = ranks[real]
        assert len(set(gathered.tolist())) == len(gathered)
        assert set(rows.any(0).nonzero().flatten().tolist()) <= set(gathered.tolist())


def test_pattern_respects_left_padding() -> None:
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    padded = causal.clone()
    padded[:, :4] = False  # 4 pad keys: a padded row must match the unpadded row of its real length
    keep = sparse_pattern(padded, 0.4)
    torch.testing.assert_close(keep[4:, 4:], sparse_pattern(causal[:6, :6], 0.4))


@pytest.mark.parametrize("make", MODELS)
def test_dense_equals_original_at_s0(make) -> None:
    model = make()
    blocks = freeze_all_but_last_blocks(model, 2)
    patched = copy.deepcopy(model)
    enable_sparse_attention(patched, blocks, 0.0)
    batch = _padded_batch()
    with torch.no_grad():
        dense, sparse = model(**batch).logits, patched(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(sparse[real], dense[real], atol=1e-5, rtol=1e-5)
    attended, visible = attention_pair_counts(patched)
    assert attended == visible > 0


@pytest.mark.parametrize("make", MODELS)
def test_counted_pairs_match_flops(make) -> None:
    model = make()
    blocks = freeze_all_but_last_blocks(model, 2)
    enable_sparse_attention(model, blocks, 0.4)
    seq_len, heads, head_dim = 24, 4, 8
    with torch.no_grad():
        model(input_ids=torch.randint(4, 100, (2, seq_len)))
    attended, visible = attention_pair_counts(model)
    per_layer_sequence = attended // (len(blocks) * 2)
    assert per_layer_sequence == heads * attended_pairs(seq_len, 0.4)
    assert attention_flops(seq_len, heads, head_dim, 0.4) == 4 * head_dim * per_layer_sequence
    assert visible == len(blocks) * 2 * heads * seq_len * (seq_len + 1) // 2
    assert attended / visible == pytest.approx(0.6, abs=0.03)
    assert attention_flops(seq_len, heads, head_dim, 0.0) == 4 * head_dim * heads * seq_len * (seq_len + 1) // 2
    assert attention_pair_counts(model) == (0, 0)  # reset


@pytest.mark.parametrize("make", MODELS)
def test_generation_matches_full_forward(make) -> None:
    # Incremental decoding with a KV cache and left padding must select the keys a full forward does.
    torch.manual_seed(0)
    lm, tok = make(), tiny_tokenizer()
    enable_sparse_attention(lm, freeze_all_but_last_blocks(lm, 2), 0.4)
    enc = tok(["Say hi there", "ab", "a much longer prompt, padded less"], return_tensors="pt", padding=True,
              padding_side="left")
    out = lm.generate(**enc, do_sample=True, max_new_tokens=8, top_k=0, top_p=1.0, pad_token_id=0,
                      eos_token_id=2, output_logits=True, return_dict_in_generate=True)
    response = out.sequences[:, enc["input_ids"].shape[1]:]
    logp_generate = torch.stack(out.logits, 1).log_softmax(-1).gather(2, response[..., None]).squeeze(-1)
    batch = Rollouts([""] * 3, [""] * 3, enc["input_ids"], enc["attention_mask"], response, torch.ones_like(response))
    with torch.no_grad():
        logp_forward, _ = logprobs_and_values(PolicyWithValue(lm), batch)
    torch.testing.assert_close(logp_forward, logp_generate, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", MODELS)
@pytest.mark.parametrize("rule", ["magnitude", "random"])
@pytest.mark.parametrize("sparsity", [0.0, 0.4])
def test_update_masks_keep_exact_count(make, rule: str, sparsity: float) -> None:
    model = make()
    blocks = freeze_all_but_last_blocks(model, 2)
    masks = build_attention_masks(model, blocks, sparsity, rule, seed=3)
    state = trainable_state(model)
    assert set(masks) == {n for n in state if is_attention_param(n, blocks)} and masks
    for name, mask in masks.items():
        assert mask.shape == state[name].shape
        assert int(mask.sum()) == round((1 - sparsity) * mask.numel())
        if rule == "magnitude" and sparsity > 0:
            magnitude = state[name].abs()
            assert magnitude[mask].min() >= magnitude[~mask].max()
    # The server rebuilds the same masks from the global tensors alone (plain arrays, as received).
    server = build_attention_masks({n: t.numpy() for n, t in state.items()}, blocks, sparsity, rule, seed=3)
    assert all(torch.equal(server[n], masks[n]) for n in masks)


def test_magnitude_masks_are_nested_across_clients() -> None:
    model = tiny_llama()
    blocks = freeze_all_but_last_blocks(model, 2)
    loose, tight = (build_attention_masks(model, blocks, s) for s in (0.2, 0.6))
    assert all(not (tight[n] & ~loose[n]).any() for n in loose)


@pytest.mark.parametrize("make", MODELS)
def test_upload_bytes_and_roundtrip(make) -> None:
    model = make()
    blocks = freeze_all_but_last_blocks(model, 2)
    state = trainable_state(model)
    dense = sum(t.numel() * t.element_size() for t in state.values())
    attention = sum(t.numel() * t.element_size() for n, t in state.items() if is_attention_param(n, blocks))
    assert 0 < attention < dense

    full = pack_sparse(state, build_attention_masks(state, blocks, 0.0))
    assert upload_bytes(full) == dense

    masks = build_attention_masks(state, blocks, 0.4)
    packed = pack_sparse(state, masks)
    expected = dense - attention + 4 * sum(round(0.6 * m.numel()) for m in masks.values())
    assert upload_bytes(packed) == expected
    assert upload_bytes(packed) == pytest.approx(dense - 0.4 * attention, abs=4 * len(masks))
    assert all(isinstance(a, np.ndarray) for a in packed.values())

    # A trained copy: the upload carries only masked entries; unpacking onto the global fills the rest.
    trained = {n: t + 1.0 for n, t in state.items()}
    restored = unpack_sparse(pack_sparse(trained, masks), masks, state)
    for name, t in restored.items():
        expected_t = torch.where(masks[name], trained[name], state[name]) if name in masks else trained[name]
        torch.testing.assert_close(t, expected_t)


def test_aggregate_sparse_averages_over_updaters() -> None:
    global_params = {"w": torch.zeros(4), "d": torch.zeros(2)}
    masks = [{"w": torch.tensor([True, True, False, False])}, {"w": torch.tensor([True, False, True, False])}]
    trained = [{"w": torch.full((4,), 1.0), "d": torch.full((2,), 1.0)},
               {"w": torch.full((4,), 4.0), "d": torch.full((2,), 4.0)}]
    uploads = [pack_sparse(t, m) for t, m in zip(trained, masks)]
    out = aggregate_sparse(global_params, uploads, masks, weights=[1.0, 2.0])
    # entry 0: both (1*1 + 2*4)/3 = 3; entry 1: only client 0; entry 2: only client 1; entry 3: nobody
    torch.testing.assert_close(out["w"], torch.tensor([3.0, 1.0, 4.0, 0.0]))
    torch.testing.assert_close(out["d"], torch.full((2,), 3.0))


def test_sparsity_is_validated() -> None:
    with pytest.raises(ValueError, match="sparsity"):
        enable_sparse_attention(tiny_llama(), ["model.layers.3"], 1.0)
    with pytest.raises(ValueError, match="rule"):
        build_attention_masks(tiny_llama(), ["model.layers.3"], 0.4, rule="largest")


# --- The block-sparse kernel against the masked dense reference ------------------------------

HEADS, KV_HEADS, HEAD_DIM, SCALE = 4, 2, 8, 0.3  # the tiny Llama's grouped-query shape


def _qkv(seq_len: int) -> list[torch.Tensor]:
    """Random float64 query [3, 4, T, 8] and key, value [3, 2, T, 8] that require gradients."""
    gen = torch.Generator().manual_seed(seq_len)
    shapes = [(3, HEADS, seq_len, HEAD_DIM)] + [(3, KV_HEADS, seq_len, HEAD_DIM)] * 2
    return [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in shapes]


def _key_mask(seq_len: int, right: bool = True) -> torch.Tensor:
    """[3, T] token mask: row 0 unpadded, row 1 left-padded past a key block, row 2 left (and right) padded."""
    mask = torch.ones(3, seq_len, dtype=torch.bool)
    mask[1, : min(21, seq_len - 1)] = False
    mask[2, :3] = False
    if right:
        mask[2, max(4, seq_len - 5):] = False
    return mask


def _allowed(key_mask: torch.Tensor) -> torch.Tensor:
    """The bool [B, 1, T, T] mask transformers prepares for SDPA: causal and not a padding key."""
    seq_len = key_mask.shape[1]
    return torch.ones(seq_len, seq_len, dtype=torch.bool).tril() & key_mask[:, None, None, :]


def _grads(out: torch.Tensor, rows: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients of a fixed random projection of the outputs [B, Q, H, D] at ``rows`` [B, Q]."""
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    return list(torch.autograd.grad((out * weight)[rows].sum(), inputs, retain_graph=True))


def _assert_matches(out: torch.Tensor, ref: torch.Tensor, rows: torch.Tensor, inputs: list[torch.Tensor]) -> None:
    """Outputs at ``rows`` and the gradients of q, k, v through them agree to float64 rounding."""
    torch.testing.assert_close(out[rows], ref[rows], atol=1e-10, rtol=1e-10)
    for got, want in zip(_grads(out, rows, inputs), _grads(ref, rows, inputs), strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("sparsity", [0.0, 0.2, 0.4, 0.7])
@pytest.mark.parametrize("seq_len", [1, 24, 64, 100, 150, 260])
@pytest.mark.parametrize("mask_form", ["none", "bool", "float"])
def test_kernel_matches_masked_reference(sparsity: float, seq_len: int, mask_form: str) -> None:
    # Full forward (prefill / training): every token row, forward and backward, any mask form.
    q, k, v = _qkv(seq_len)
    tokens = _key_mask(seq_len) if mask_form != "none" else torch.ones(3, seq_len, dtype=torch.bool)
    allowed = _allowed(tokens)
    mask = {"none": None, "bool": allowed,
            "float": torch.zeros(allowed.shape, dtype=q.dtype).masked_fill(~allowed, torch.finfo(q.dtype).min)}
    given = None if mask[mask_form] is None else _allowed_keys(mask[mask_form], seq_len, seq_len, q.device)
    out, _ = block_sparse_attention(q, k, v, given, sparsity, SCALE)
    ref, _, _ = masked_attention(q, k, v, allowed, sparsity, SCALE)
    _assert_matches(out, ref, tokens, [q, k, v])  # right-padding rows are never read
    assert not out[~allowed.any(-1)[:, 0]].any()  # left-padding rows see nothing: 0, as the reference


def _module(sparsity: float) -> SimpleNamespace:
    """What the attention function reads from an attention module patched by enable_sparse_attention."""
    return SimpleNamespace(training=False, pwff_sparsity=sparsity, pwff_pairs=torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("sparsity", [0.0, 0.4, 0.7])
def test_decoding_step_matches_reference(sparsity: float) -> None:
    # One query at a time against a cache of every length: the row the full reference computes.
    seq_len = 150
    q, k, v = _qkv(seq_len)
    tokens = _key_mask(seq_len, right=False)
    allowed = _allowed(tokens)
    ref, _, _ = masked_attention(q, k, v, allowed, sparsity, SCALE)
    for t in [0, 5, 22, 63, 64, 65, 100, 149]:
        step = [q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1]]
        out, _ = sparse_attention_forward(_module(sparsity), *step, allowed[:, :, t:t + 1, :t + 1], scaling=SCALE)
        _assert_matches(out, ref[:, t:t + 1], tokens[:, t:t + 1], [q, k, v])


@pytest.mark.parametrize("sparsity", [0.0, 0.4])
def test_counters_count_attended_pairs(sparsity: float) -> None:
    seq_len = 150
    q, k, v = _qkv(seq_len)
    allowed = _allowed(_key_mask(seq_len, right=False))
    for rows in (slice(None), slice(-1, None)):  # full forward, then one decoding step
        module = _module(sparsity)
        sparse_attention_forward(module, q[:, :, rows], k, v, allowed[:, :, rows])
        kept = sparse_pattern(allowed[:, :, rows], sparsity)
        assert module.pwff_pairs.tolist() == [HEADS * int(kept.sum()), HEADS * int(allowed[:, :, rows].sum())]


def test_kernel_sends_no_fully_masked_row(monkeypatch: pytest.MonkeyPatch) -> None:
    # Fused GPU kernels may give NaN gradients for a row that sees nothing; padding rows must not reach them.
    all_rows_see_a_key = []

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        all_rows_see_a_key.append(bool(attn_mask.any(-1).all()))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(sparse_attention, "scaled_dot_product_attention", spy)
    tokens = _key_mask(100)
    tokens[2] = False  # a row of padding only
    q, k, v = _qkv(100)
    out, _ = block_sparse_attention(q, k, v, _allowed(tokens), 0.4, SCALE)
    assert all_rows_see_a_key and all(all_rows_see_a_key)
    assert not out[2].any()


def test_kernel_skips_dropped_blocks() -> None:
    # Computed (row, key) pairs: well under the causal triangle at T = 2048, s = 0.4, and all attended ones.
    seq_len = 2048
    computed = sum(count * QUERY_BLOCK * (1 + (strided + window) * KEY_BLOCK)
                   for _, count, strided, window in prefill_groups(seq_len, 0.4))
    assert attended_pairs(seq_len, 0.4) < computed < 0.75 * seq_len * (seq_len + 1) / 2


def test_kernel_reads_no_device_values() -> None:
    # On the meta device nothing can be read to the host: the hot path has no sync to wait on.
    module = _module(0.4)
    for q_len, k_len in [(150, 150), (1, 150)]:
        q = torch.empty(2, HEADS, q_len, HEAD_DIM, device="meta")
        k = v = torch.empty(2, KV_HEADS, k_len, HEAD_DIM, device="meta")
        for mask in [None, torch.empty(2, 1, q_len, k_len, dtype=torch.bool, device="meta")]:
            out, _ = sparse_attention_forward(module, q, k, v, mask)
            assert out.shape == (2, q_len, HEADS, HEAD_DIM) and out.device.type == "meta"
    assert module.pwff_pairs.device.type == "meta"


@pytest.mark.parametrize("make", MODELS)
def test_model_with_kernel_matches_reference_model(make) -> None:
    # Whole model, left-padded batch: the kernel's logits and gradients equal the masked reference's.
    batch = _padded_batch(100)
    logits, grads = [], []
    for attention in ("kernel", "reference"):
        model = make()
        blocks = freeze_all_but_last_blocks(model, 2)
        enable_sparse_attention(model, blocks, 0.4)
        if attention == "reference":  # the same pattern, dense scores + mask
            for name in blocks:
                attention_module(model.get_submodule(name)).config._attn_implementation = "pwff_test_reference"
        out = model(**batch).logits
        out[batch["attention_mask"].bool()].square().mean().backward()
        logits.append(out.detach())
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[0][real], logits[1][real], atol=1e-5, rtol=1e-5)
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def _reference_attention(module: SimpleNamespace, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                         **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked dense reference as a transformers attention function (same pattern, every pair computed)."""
    allowed = _allowed_keys(attention_mask, query.shape[2], key.shape[2], query.device)
    scale = scaling or query.shape[-1] ** -0.5
    out, probs, _ = masked_attention(query, key, value, allowed, module.pwff_sparsity, scale)
    return out, probs


AttentionInterface.register("pwff_test_reference", _reference_attention)

"""Sparse attention: the kept fractions, the counted compute, the upload bytes, equality with dense at s = 0."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from pwff_app.instruct.policy import (
    PolicyWithValue,
    freeze_all_but_last_blocks,
    is_attention_param,
    trainable_state,
)
from pwff_app.testing.tiny import tiny_gpt2, tiny_llama, tiny_tokenizer
from pwff_app.instruct.ppo import logprobs_and_values
from pwff_app.instruct.rollouts import Rollouts
from pwff_app.instruct.sparse_attention import (
    aggregate_sparse,
    attended_pairs,
    attention_flops,
    attention_pair_counts,
    build_attention_masks,
    enable_sparse_attention,
    keep_count,
    pack_sparse,
    sparse_pattern,
    unpack_sparse,
    upload_bytes,
)

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

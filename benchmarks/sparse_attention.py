"""Wall time of dense vs block-sparse attention, forward + backward; prints a table.

    python benchmarks/sparse_attention.py                       # CPU, 1 thread, T = 128, 512, 2048
    python benchmarks/sparse_attention.py --device cuda --repeats 5 --json sparse.json
    python benchmarks/sparse_attention.py --padding 0.25        # left-pad every other row by T/4

Random weights with SmolLM2-135M's shapes (hidden 576, 9 heads, 3 KV heads of 64, MLP 1536),
batch 2, no downloads. Per sequence length T, each forward + backward, the median of
``--repeats`` runs after one warm-up, the variants interleaved so that a load change hits all:

* attention: one attention call on random q/k/v: transformers' SDPA function (what the
  dense model runs; causal without padding, so its kernel may skip the upper triangle), the
  masked reference (dense scores + the pattern mask) and the block-sparse kernel;
* 2 blocks: the policy's two trainable blocks (a 2-layer Llama on random inputs), dense
  (SDPA) vs sparse (``enable_sparse_attention``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import LlamaConfig, LlamaModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from pwff_app.instruct.sparse_attention import enable_sparse_attention, masked_attention, sparse_attention_forward
from pwff_app.instruct.sparse_pattern import KEY_BLOCK, QUERY_BLOCK, prefill_groups

HEADS, KV_HEADS, HEAD_DIM, MLP = 9, 3, 64, 1536


def _tokens(batch: int, seq_len: int, padding: float, device: torch.device) -> torch.Tensor | None:
    """Token mask [B, T], every other row left-padded by ``padding`` x T; None without padding."""
    pad = int(padding * seq_len)
    if not pad:
        return None
    mask = torch.ones(batch, seq_len, dtype=torch.long, device=device)
    mask[1::2, :pad] = 0
    return mask


def _attention_steps(batch: int, seq_len: int, sparsity: float, padding: float,
                     device: torch.device) -> dict[str, Callable[[], None]]:
    """Forward + backward of one attention call per variant, on the same random q/k/v."""
    gen = torch.Generator(device).manual_seed(0)
    q = torch.randn(batch, HEADS, seq_len, HEAD_DIM, device=device, generator=gen, requires_grad=True)
    k, v = (torch.randn(batch, KV_HEADS, seq_len, HEAD_DIM, device=device, generator=gen, requires_grad=True)
            for _ in range(2))
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()[None, None]
    tokens = _tokens(batch, seq_len, padding, device)
    allowed = causal if tokens is None else causal & tokens.bool()[:, None, None, :]
    mask = None if tokens is None else allowed  # what transformers hands an SDPA model
    module = SimpleNamespace(training=True, is_causal=True, num_key_value_groups=HEADS // KV_HEADS,
                             pwff_sparsity=sparsity, pwff_pairs=torch.zeros(2, dtype=torch.long))
    scale = HEAD_DIM**-0.5
    calls = {
        "sdpa": lambda: sdpa_attention_forward(module, q, k, v, mask, scaling=scale)[0],
        "masked": lambda: masked_attention(q, k, v, allowed, sparsity, scale)[0],
        "sparse": lambda: sparse_attention_forward(module, q, k, v, mask, scaling=scale)[0],
    }
    return {name: (lambda call=call: call().sum().backward()) for name, call in calls.items()}


def _block_steps(batch: int, seq_len: int, sparsity: float, padding: float,
                 device: torch.device) -> dict[str, Callable[[], None]]:
    """Forward + backward of two Llama blocks with SmolLM2-135M's shapes, dense and sparse."""
    steps = {}
    x = torch.randn(batch, seq_len, HEADS * HEAD_DIM, device=device, requires_grad=True)
    tokens = _tokens(batch, seq_len, padding, device)
    for name in ("dense", "sparse"):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=128, hidden_size=HEADS * HEAD_DIM, intermediate_size=MLP,
                             num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                             max_position_embeddings=max(2048, seq_len), attn_implementation="sdpa")
        model = LlamaModel(config).to(device).train()
        if name == "sparse":
            enable_sparse_attention(model, ["layers.0", "layers.1"], sparsity)
        steps[name] = lambda m=model: m(inputs_embeds=x, attention_mask=tokens).last_hidden_state.sum().backward()
    return steps


def _sync(device: torch.device) -> None:
    """Wait for an accelerator's queued work, so that the clock measures it."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def _medians(steps: dict[str, Callable[[], None]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per step over ``repeats`` interleaved rounds, after one warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(repeats + 1):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _computed_share(seq_len: int, sparsity: float) -> float:
    """(query row, key) pairs the kernel computes, as a share of the causal triangle T (T + 1) / 2."""
    pairs = sum(count * QUERY_BLOCK * (1 + (strided + window) * KEY_BLOCK)
                for _, count, strided, window in prefill_groups(seq_len, sparsity))
    return pairs / (seq_len * (seq_len + 1) / 2)


def _ms(seconds: float) -> str:
    """Milliseconds to 3 significant digits (GPU steps take well under one)."""
    return f"{seconds * 1e3:.3g} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sparsity", type=float, default=0.4)
    parser.add_argument("--padding", type=float, default=0.0, help="left padding of every other row, share of T")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--json", type=Path, default=None, help="also write the medians (seconds) to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{device}, {args.threads} thread(s), batch 2, s = {args.sparsity}, padding {args.padding}, "
          f"median of {args.repeats}, load average {load}")
    print("| T | kernel computes (of causal pairs) | attention: SDPA | masked reference | sparse kernel "
          "| kernel vs SDPA | 2 blocks: dense | 2 blocks: sparse | sparse vs dense |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    for seq_len in args.lengths:
        shape = (2, seq_len, args.sparsity, args.padding, device)
        att = _medians(_attention_steps(*shape), args.repeats, device)
        blocks = _medians(_block_steps(*shape), args.repeats, device)
        results.append({"seq_len": seq_len, "attention_s": att, "blocks_s": blocks})
        print(f"| {seq_len} | {_computed_share(seq_len, args.sparsity):.2f} | {_ms(att['sdpa'])} "
              f"| {_ms(att['masked'])} | {_ms(att['sparse'])} | {att['sparse'] / att['sdpa'] - 1:+.0%} "
              f"| {_ms(blocks['dense'])} | {_ms(blocks['sparse'])} "
              f"| {blocks['sparse'] / blocks['dense'] - 1:+.0%} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "sparsity": args.sparsity, "padding": args.padding,
                                         "repeats": args.repeats, "lengths": results}, indent=2))


if __name__ == "__main__":
    main()

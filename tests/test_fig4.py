"""Fig. 4 (issue 15): the contenders' rows, Shepherd's supervised step and global evaluation, the
Alpaca split, the judges (never in training) and the refusal rule. Tiny Llama, stub scorers;
the judges' own training runs on the offline MiniLM over synthetic HH-RLHF files."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pwff_app.config import ConfigError, InstructConfig, RunConfig
from pwff_app.federation.checks import AllClientsFailed
from pwff_app.instruct import client, prompts, runtime
from pwff_app.instruct.evaluation import is_refusal, refusal_share, weighted
from pwff_app.instruct.policy import load_trainable_state, trainable_state
from pwff_app.instruct.sft import sft_examples, supervised_round
from pwff_app.methods import METHODS
from tests.test_pfit import StubJudges, StubRewards, _rc, _run, tiny_pfit  # noqa: F401  (tiny_pfit: fixture)

# ---- the methods table -----------------------------------------------------------------------

# method: (trained, sent, private, trainer, evaluated model, sparsity, reward models, weights of client 0)
ROWS = {
    "pfit": ({"backbone", "head"}, {"backbone"}, {"head"}, "ppo", "local", (0.4,), "both", (0.8, 0.2)),
    "pfl": ({"backbone", "head"}, {"backbone"}, {"head"}, "ppo", "local", (0.0,), "both", (0.8, 0.2)),
    "sfl": ({"backbone", "head"}, {"backbone"}, {"head"}, "ppo", "local", (0.2,), "helpfulness", (1.0, 0.0)),
    "shepherd": ({"lora"}, {"lora"}, set(), "sft", "global", (0.0,), "both", (0.8, 0.2)),
}


@pytest.mark.parametrize("method", sorted(ROWS))
def test_method_row_trains_sends_keeps_rewards_sparsifies(method: str) -> None:
    trained, sent, private, trainer, evaluated, sparsity, reward_models, weights = ROWS[method]
    spec, cfg = METHODS[method], InstructConfig().for_method(method)
    assert (set(spec.trained), set(spec.shared), set(spec.private)) == (trained, sent, private)
    assert (cfg.trainer, cfg.eval_model, cfg.sparsity, cfg.reward_models) == (trainer, evaluated, sparsity,
                                                                              reward_models)
    assert cfg.client_weights(0) == weights
    assert cfg.use_lora == (method == "shepherd") and cfg.personal_start == (method != "shepherd")


@pytest.mark.parametrize("method", sorted(ROWS))
def test_what_a_round_sends_and_keeps_on_the_tiny_llama(tiny_pfit, method: str) -> None:
    """The parameters a client trains and uploads, and what stays private, measured on a real round."""
    summary, rounds, _ = _run(_rc(tiny_pfit, method, f"sets-{method}", num_rounds=1))
    cfg = InstructConfig().for_method(method)
    bundle = runtime._BUNDLES[("", cfg.bundle_lora_rank)]
    names = [n for n, p in bundle.lm.named_parameters() if p.requires_grad]
    blocks = ("model.layers.2.", "model.layers.3.")  # the tiny Llama's last two blocks
    assert names and all(n.startswith(blocks) for n in names)
    if method == "shepherd":
        assert all(".lora_" in n and ".self_attn." in n for n in names)  # LoRA on attention only
    else:
        assert not any(".lora_" in n for n in names)
    assert set(trainable_state(bundle.lm)) == set(names)  # the shared part = what is trained in the LM
    dense = sum(bundle.lm.get_parameter(n).numel() * 4 for n in names)
    c0 = rounds[1]["clients"]["0"]
    assert (c0["uplink_bytes"] < dense) == (cfg.client_sparsity(0) > 0)
    value_head = sum(p.numel() for p in bundle.policy.value_head.parameters())
    assert summary["params"]["private"] == {"0": value_head if private_of(method) else 0,
                                            "1": value_head if private_of(method) else 0}


def private_of(method: str) -> bool:
    return bool(METHODS[method].private)


# ---- Shepherd ---------------------------------------------------------------------------------


def test_shepherd_supervised_loss_falls_deterministic_and_leaves_no_folder(tiny_pfit) -> None:
    bundle = runtime.get_bundle("", 8)
    start = {k: v.clone() for k, v in trainable_state(bundle.lm).items()}
    records = [{"instruction": "say hi", "input": "", "output": "hello there"}] * 4  # one repeated batch
    examples = sft_examples(records, bundle.tokenizer)
    assert examples[0]["completion"].endswith(bundle.tokenizer.eos_token)
    before = set(os.listdir(tempfile.gettempdir())), set(os.listdir("."))
    kwargs = dict(epochs=6, batch_size=4, lr=1e-2, seed=7, device=torch.device("cpu"))
    losses = supervised_round(bundle.lm, bundle.tokenizer, examples, **kwargs)
    assert losses["loss_last"] < losses["loss_first"] - 0.05, losses
    first = {k: v.clone() for k, v in trainable_state(bundle.lm).items()}
    assert any(not torch.equal(first[k], start[k]) for k in start)
    load_trainable_state(bundle.lm, start)
    torch.manual_seed(123)  # the global RNG does not steer the round, and is left alone by it
    state = torch.random.get_rng_state()
    again = supervised_round(bundle.lm, bundle.tokenizer, examples, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert again == losses and all(torch.equal(v, first[k]) for k, v in trainable_state(bundle.lm).items())
    assert (set(os.listdir(tempfile.gettempdir())), set(os.listdir("."))) == before  # no output dirs left


def test_shepherd_evaluates_the_aggregated_global(tiny_pfit, monkeypatch) -> None:
    """Every Shepherd client scores the one aggregated global (the evaluate message's arrays), so
    all clients' evaluations agree; PFIT's clients score their own personalised models."""
    used = []
    real = client.EVAL_MODELS["global"]

    def spy(private, msg):
        model = real(private, msg)
        used.append({k: torch.from_numpy(np.array(v)) for k, v in model.items()})
        return model

    monkeypatch.setitem(client.EVAL_MODELS, "global", spy)
    _, rounds, _ = _run(_rc(tiny_pfit, "shepherd", "shep-global"))
    assert len(used) == 2 * 3  # 2 clients x (baseline + 2 rounds)
    for r in rounds:
        c0, c1 = r["clients"]["0"], r["clients"]["1"]
        for key in ("helpfulness", "safety", "judge_helpfulness", "judge_safety", "kl", "response_tokens"):
            assert c0[key] == c1[key], (r["round"], key)
    # the evaluated model after round 2 = the FedAvg of the two clients' uploads, i.e. the new global
    assert all(torch.equal(used[-1][k], used[-2][k]) for k in used[-1])
    assert any(not torch.equal(used[-1][k], used[0][k]) for k in used[0])

    _, pfit_rounds, _ = _run(_rc(tiny_pfit, "pfit", "pfit-local"))
    assert pfit_rounds[-1]["clients"]["0"]["kl"] != pfit_rounds[-1]["clients"]["1"]["kl"]


# ---- the evaluation the training never saw ---------------------------------------------------


def _key(records) -> set[str]:
    return {prompts._raw_prompt(r) for r in records}


def test_prompt_splits_are_disjoint_fixed_and_cover_the_records(tiny_pfit) -> None:
    data = tiny_pfit / "data"
    splits = prompts.prompt_splits(data)
    train, val, test = (_key(splits[k]) for k in ("train", "validation", "test"))
    assert train and val and test
    assert not (train & val or train & test or val & test)
    assert sum(len(v) for v in splits.values()) == len(prompts.load_alpaca(data))  # every short record once
    for seed in (1, 42):  # the run seed shuffles the shares, never the evaluation set
        shares = [prompts.client_prompts(data, c, 2, seed, 4) for c in range(2)]
        assert shares[0][1] == shares[1][1] == splits["test"][:4]
        assert _key(shares[0][0]) | _key(shares[1][0]) <= train and not _key(shares[0][0]) & _key(shares[1][0])
    _, tuning = prompts.client_prompts(data, 0, 2, 42, 4, eval_split="validation")
    assert tuning == splits["validation"][:4]
    with pytest.raises(ValueError, match="cannot give"):
        prompts.client_prompts(data, 0, 2, 42, 10_000)


def test_real_alpaca_split_sizes(real_data_dir: Path) -> None:
    splits = prompts.prompt_splits(real_data_dir)
    sizes = {k: len(v) for k, v in splits.items()}
    assert min(sizes["validation"], sizes["test"]) >= 200 and sizes["train"] > 8 * sizes["test"], sizes
    assert not _key(splits["test"]) & (_key(splits["train"]) | _key(splits["validation"]))


def test_eval_split_key() -> None:
    assert InstructConfig().eval_split == "test"
    assert InstructConfig.from_run_config({"instruct.eval-split": "validation"}).eval_split == "validation"
    with pytest.raises(ConfigError, match=r"instruct\.eval-split"):
        InstructConfig.from_run_config({"instruct.eval-split": "train"})


def test_judges_never_score_training(tiny_pfit, monkeypatch) -> None:
    """The training path never calls the judges; the evaluation always does."""
    judges, training = StubJudges(), []
    real_score, real_train = judges.score, client.handle_pfit_train

    def score(prompts_, responses):
        assert not training, "a judge scored a training rollout"
        return real_score(prompts_, responses)

    def train(msg, context):
        training.append(True)
        try:
            return real_train(msg, context)
        finally:
            training.clear()

    monkeypatch.setattr(judges, "score", score)
    monkeypatch.setattr(runtime, "load_judges", lambda cfg, device: judges)
    monkeypatch.setattr(client, "handle_pfit_train", train)
    for method in ("pfit", "sfl"):
        judges.calls = 0
        _, rounds, _ = _run(_rc(tiny_pfit, method, f"judged-{method}"))
        assert judges.calls == 2 * 3  # only the evaluations: 2 clients x (baseline + 2 rounds)
        assert all("judge_combined" in c for r in rounds for c in r["clients"].values())


def test_training_refuses_a_judge_as_its_reward_function(tiny_pfit, monkeypatch) -> None:
    """Fails if the training reward function may be a judge: PPO's scorer refuses one."""
    monkeypatch.setattr(runtime, "load_rewards", lambda cfg, device: StubJudges())
    with pytest.raises(AllClientsFailed, match="judge"):
        _run(_rc(tiny_pfit, "pfit", "judge-trains"))
    cfg = InstructConfig()
    with pytest.raises(RuntimeError, match="judge"):
        client._score(StubJudges(), cfg, 0, ["p"], ["r"])
    scores, _ = client._score(StubRewards(), cfg, 0, ["p"], ["rrrr"])  # the training models pass
    assert scores.shape == (1,)


def test_every_round_reports_both_kinds_of_reward_length_and_refusals(tiny_pfit) -> None:
    summary, rounds, _ = _run(_rc(tiny_pfit, "pfl", "report"))
    keys = ("helpfulness", "safety", "combined", "judge_helpfulness", "judge_safety", "judge_combined", "kl",
            "response_tokens", "refusal_share")
    for r in rounds:
        for cid, c in r["clients"].items():
            assert all(k in c for k in keys), (r["round"], cid)
            w = (0.8, 0.2) if cid == "0" else (0.2, 0.8)
            assert c["judge_combined"] == pytest.approx(w[0] * c["judge_helpfulness"] + w[1] * c["judge_safety"])
            assert 0 < c["response_tokens"] <= 8 and 0.0 <= c["refusal_share"] <= 1.0
    assert set(summary["reward"]["means"]) == set(keys)
    assert summary["eval_split"] == "test" and summary["trainer"] == "ppo"


def test_sfl_is_scored_with_the_clients_preferences(tiny_pfit) -> None:
    """SFL trains on helpfulness alone, but its clients are scored by their own mixes, like PFIT's."""
    summary, rounds, _ = _run(_rc(tiny_pfit, "sfl", "sfl-prefs", num_rounds=1))
    assert summary["reward_weights"] == {"0": [1.0, 0.0], "1": [1.0, 0.0]}
    assert summary["preference_weights"] == {"0": [0.8, 0.2], "1": [0.2, 0.8]}
    c1 = rounds[1]["clients"]["1"]
    assert c1["combined"] == pytest.approx(0.2 * c1["helpfulness"] + 0.8 * c1["safety"])


# ---- the refusal rule -------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "refusal"), [
    ("I'm sorry, but I can't help with that.", True),
    ("  \u201cI\u2019m sorry\u201d is what I would say", True),
    ("As an AI language model, I cannot browse.", True),
    ("", True),
    ("   \n", True),
    ("I cannot stress enough how good tea is.", True),  # a surface rule: stock phrases count wherever in the head
    ("Here are three fruits: apple, pear, plum.", False),
    ("The sky is blue because of Rayleigh scattering. " * 3 + "I'm sorry for the length.", False),
])
def test_refusal_rule(text: str, refusal: bool) -> None:
    assert is_refusal(text) is refusal


def test_refusal_share_and_weighted_mix() -> None:
    assert refusal_share([]) == 0.0
    assert refusal_share(["I'm sorry.", "Sure: 4.", "I won't.", "Paris."]) == 0.5
    mix = weighted({"helpfulness": torch.tensor([1.0, 3.0]), "safety": torch.tensor([-1.0, -1.0])}, (0.25, 0.75))
    assert mix == {"helpfulness": 2.0, "safety": -1.0, "combined": pytest.approx(-0.25)}


# ---- the judges (TRL RewardTrainer cross-encoders on the other half of HH-RLHF) -----------------


@pytest.fixture(scope="module")
def judge_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.test_rewards import _write_synthetic

    data_dir = tmp_path_factory.mktemp("hh")
    _write_synthetic(data_dir, n_pairs=128)
    return data_dir


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random BERT with the offline MiniLM's tokenizer, saved as a folder: the judges' ``encoder``."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from pwff_app.files import default_encoder_path

    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(default_encoder_path())
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_judges_learn_from_the_other_half_and_cache(judge_data: Path, tiny_encoder: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from pwff_app.instruct.rewards.data import HH_FILES, half_of, objective_pairs
    from pwff_app.instruct.rewards.judges import JudgeConfig, judge_cache_entry, load_or_train_judges

    for name in HH_FILES:
        pairs = objective_pairs(judge_data, name)
        rm, judge = half_of(pairs, "reward-model"), half_of(pairs, "judge")
        assert len(rm) + len(judge) == len(pairs) and not {id(p) for p in rm} & {id(p) for p in judge}  # by row
    config = JudgeConfig(encoder=tiny_encoder, max_length=64, epochs=10, batch_size=8, lr=2e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        judges = load_or_train_judges(judge_data, tmp_path, config)
        assert judges.is_judge and not judges.from_cache
        for name, m in judges.metrics["objectives"].items():
            assert m["n_pairs"] == 64 and m["n_train"] + m["n_heldout"] == 64
            assert m["heldout_accuracy"] >= 0.8, (name, m)  # the marker word is easy to learn
        prompts_ = ["Can you help me with making tea?"] * 2
        scores = judges.score(prompts_, ["Making tea certainly is easy.", "Making tea is easy."])
        assert set(scores) == {"helpfulness", "safety"} and scores["helpfulness"][0] > scores["helpfulness"][1]
        assert judge_cache_entry(tmp_path, config, judge_data).with_suffix(".json").is_file()
        again = load_or_train_judges(judge_data, tmp_path, config)
        assert again.from_cache and again.metrics == judges.metrics
        for name, v in again.score(prompts_, ["a", "b"]).items():
            assert torch.allclose(v, judges.score(prompts_, ["a", "b"])[name], atol=1e-5)
        # `pwff train-rewards --judges` (the default recipe; here pointed at the tiny one cached above)
        from pwff_app.instruct.rewards import cli, judges as judges_module

        load = judges_module.load_or_train_judges
        monkeypatch.setattr(judges_module, "load_or_train_judges", lambda *a, **kw: load(*a, config=config, **kw))
        assert cli.main(["--judges", "--data-dir", str(judge_data), "--cache-dir", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert "judges (evaluation only)" in out and "helpfulness" in out and "loaded from cache" in out
    finally:
        torch.set_num_threads(threads)

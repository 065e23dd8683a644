"""PFIT through the real strategy and the in-process grid, on the tiny Llama with stub rewards."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp

from pwff_app.instruct import client, prompts, runtime, server
from pwff_app.config import ConfigError, InstructConfig, RunConfig, app_defaults
from pwff_app.methods import METHODS
from pwff_app.instruct.policy import is_attention_param
from pwff_app.testing.tiny import tiny_llama, tiny_tokenizer
from pwff_app.federation.results import RunRecorder
from pwff_app.instruct.sparse_attention import keep_count
from pwff_app.federation.roster import answer_query, query_roster
from pwff_app.federation.state import PrivateStore
from pwff_app.testing.inprocess import InProcessGrid

ROOT = Path(__file__).resolve().parents[1]

class StubRewards:
    """helpfulness = response length / 10, safety = -(number of 'e') : cheap, deterministic."""

    def score(self, prompts, responses):
        assert len(prompts) == len(responses)
        return {"helpfulness": torch.tensor([len(r) / 10 for r in responses], dtype=torch.float32),
                "safety": torch.tensor([-float(r.count("e")) for r in responses], dtype=torch.float32)}


class StubJudges:
    """A different stub: helpfulness = distinct characters / 10, safety = -(share of 'a'); marked as a judge."""

    is_judge = True

    def __init__(self) -> None:
        self.calls = 0

    def score(self, prompts, responses):
        self.calls += 1
        return {"helpfulness": torch.tensor([len(set(r)) / 10 for r in responses]),
                "safety": torch.tensor([-r.count("a") / max(1, len(r)) for r in responses])}


@pytest.fixture()
def tiny_pfit(monkeypatch, tmp_path):
    judges = StubJudges()
    monkeypatch.setattr(runtime, "load_base_policy", lambda name: (tiny_llama(), tiny_tokenizer()))
    monkeypatch.setattr(runtime, "load_rewards", lambda cfg, device: StubRewards())
    monkeypatch.setattr(runtime, "load_judges", lambda cfg, device: judges)
    monkeypatch.setattr(runtime, "preflight", lambda cfg: ["stubs"])  # they stand in for the real sources
    monkeypatch.setattr(runtime, "_BUNDLES", {})
    rng = random.Random(0)
    words = "tell me about the sun write a poem list three fruits explain why sky blue".split()
    records = [{"instruction": " ".join(rng.choice(words) for _ in range(rng.randint(3, 8))) + f" #{i}",
                "input": "", "output": f"ok {i % 3}"} for i in range(200)]
    (tmp_path / "data" / "alpaca").mkdir(parents=True)
    (tmp_path / "data" / "alpaca" / "alpaca_5000.json").write_text(json.dumps(records))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: two threads per tiny op only contend
    yield tmp_path
    torch.set_num_threads(threads)


def _rc(tmp_path: Path, method: str, run_name: str, **instruct) -> dict:
    rc = app_defaults(ROOT)
    rc.update({"method": method, "num-clients": 2, "results-dir": str(tmp_path / "res"), "run-name": run_name,
               "data-dir": str(tmp_path / "data"), "wireless.enabled": False,
               "instruct.num-rounds": 2, "instruct.max-new-tokens": 8, "instruct.prompts-per-round": 4,
               "instruct.ppo-steps": 1, "instruct.ppo-epochs": 1, "instruct.eval-prompts": 4,
               "instruct.samples-per-prompt": 2, "instruct.eval-samples": 1, "instruct.lr": 1e-3})
    rc.update({f"instruct.{k.replace('_', '-')}": v for k, v in instruct.items()})
    return rc


def _client_app(mods=()) -> ClientApp:
    app = ClientApp(mods=list(mods))
    app.query()(answer_query)  # the start-up query that fixes the roster

    @app.train()
    def train(msg, context):
        return client.handle_pfit_train(msg, context)

    @app.evaluate()
    def evaluate(msg, context):
        return client.handle_pfit_evaluate(msg, context)

    return app


def _run(rc: dict, app: ClientApp | None = None) -> tuple[dict, list[dict], InProcessGrid]:
    cfg = RunConfig.from_run_config(rc)
    out = cfg.results_dir / cfg.run_name
    recorder = RunRecorder(out, cfg.method, score_key="reward")
    grid = InProcessGrid(rc, cfg.num_clients, app=app or _client_app())
    recorder.finish(server.run_pfit(grid, cfg, recorder, None, query_roster(grid, cfg.num_clients, recorder)))
    summary = json.loads((out / "summary.json").read_text())
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    return summary, rounds, grid


def test_config_validation() -> None:
    assert InstructConfig.from_run_config({}).sparsity == (0.4,)
    assert InstructConfig.from_run_config({"instruct.sparsity": 0.2}).sparsity == (0.2,)
    cfg = InstructConfig.from_run_config({"instruct.sparsity": "0.4,0.2"})
    assert [cfg.client_sparsity(c) for c in range(3)] == [0.4, 0.2, 0.4]
    for key, bad in [("instruct.sparsity", "1.0"), ("instruct.sparsity", "-0.1"), ("instruct.mask-rule", "topk"),
                     ("instruct.reward-weights", "0.5"), ("instruct.reward-weights", "a:b"),
                     ("instruct.reward-models", "safety"), ("instruct.mu", -1.0), ("instruct.ppo-steps", 0),
                     ("instruct.lr", "x"), ("instruct.gae-lambda", 1.5), ("instruct.temperature", 0.0)]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            InstructConfig.from_run_config({key: bad})
    assert InstructConfig().for_method("sfl").client_weights(1) == (1.0, 0.0)
    assert InstructConfig().for_method("pfl").sparsity == (0.0,)
    ppo = InstructConfig.from_run_config({"instruct.temperature": 0.7, "instruct.gae-lambda": 1.0}).ppo_config()
    assert (ppo.temperature, ppo.lam) == (0.7, 1.0)


def test_pyproject_instruct_defaults_match_the_dataclass() -> None:
    """`flwr run` reads pyproject, library callers the dataclass: the two defaults must be one."""
    assert InstructConfig.from_run_config(app_defaults(ROOT)) == InstructConfig()


def test_strategies_twin_every_aggregator() -> None:
    """One PFIT strategy per aggregator: sparse checks, the partial mixin, densify, then the same Flower rule."""
    from pwff_app.federation.strategy import AGGREGATORS, _PartialMixin

    assert server.STRATEGIES.keys() == AGGREGATORS.keys()
    for name, cls in server.STRATEGIES.items():
        flower = next(c for c in AGGREGATORS[name].__mro__ if c.__module__.startswith("flwr."))
        mro = cls.__mro__
        assert mro[1:5] == (server.SparsePartialMixin, _PartialMixin, server._SparseAggregation, flower)


def test_client_prompts_disjoint_and_deterministic(tiny_pfit) -> None:
    data = tiny_pfit / "data"
    shares = [prompts.client_prompts(data, c, 2, 42, 4) for c in range(2)]
    assert prompts.client_prompts(data, 0, 2, 42, 4) == shares[0]
    key = lambda rs: {r["instruction"] for r in rs}  # noqa: E731
    (train0, eval0), (train1, eval1) = shares
    assert len(eval0) == 4 and eval0 == eval1  # one held-out set: clients compared on equal prompts
    assert not key(eval0) & (key(train0) | key(train1))  # never trained on
    assert not key(train0) & key(train1)
    assert key(prompts._round_prompts(train0, 1, 4)) != key(prompts._round_prompts(train0, 2, 4))


def test_pfit_two_rounds_records_rewards_and_bytes(tiny_pfit) -> None:
    summary, rounds, grid = _run(_rc(tiny_pfit, "pfit", "s04", sparsity="0.4"))
    assert [r["round"] for r in rounds] == [0, 1, 2] and summary["num_rounds"] == 2
    baseline = rounds[0]  # every client scores the pretrained policy: identical, as prompts and seed are shared
    assert set(baseline["clients"]) == {"0", "1"} and not baseline["uplink_bytes"]
    assert baseline["clients"]["0"]["helpfulness"] == baseline["clients"]["1"]["helpfulness"]
    assert baseline["clients"]["0"]["kl"] == pytest.approx(0.0, abs=1e-6)
    rounds = rounds[1:]
    for r in rounds:
        assert set(r["clients"]) == {"0", "1"} and r["reward_mean"] is not None and not r["events"]
        for c in r["clients"].values():
            for key in ("helpfulness", "safety", "combined", "kl", "reward", "uplink_bytes", "attention_flops"):
                assert key in c, key
            assert c["sparsity"] == 0.4
            assert c["attention_flops"] < c["attention_flops_dense"]
    block = summary["reward"]
    assert set(block["per_client"]) == {"0", "1"}
    assert set(block["per_client"]["0"]) >= {"helpfulness", "safety", "combined"}
    assert block["mean"] == pytest.approx(np.mean([v["combined"] for v in block["per_client"].values()]))
    # weights 0.8:0.2 and 0.2:0.8 on the stub rewards
    c0 = block["per_client"]["0"]
    assert c0["combined"] == pytest.approx(0.8 * c0["helpfulness"] + 0.2 * c0["safety"], rel=1e-5)

    # uplink bytes: dense minus s x (attention entries), per tensor rounding of keep_count
    lm = tiny_llama()
    blocks = ["model.layers.2", "model.layers.3"]
    dense = sparse = 0
    for n, p in lm.named_parameters():
        if any(n.startswith(b + ".") for b in blocks):
            dense += p.numel() * 4
            sparse += (int(keep_count(p.numel(), 0.4)) if is_attention_param(n, blocks) else p.numel()) * 4
    assert rounds[0]["clients"]["0"]["uplink_bytes"] == sparse < dense
    summary0, rounds0, _ = _run(_rc(tiny_pfit, "pfl", "s0"))
    assert rounds0[1]["clients"]["0"]["uplink_bytes"] == dense
    assert rounds0[1]["clients"]["0"]["downlink_bytes"] == rounds[0]["clients"]["0"]["downlink_bytes"]

    # frozen parameters untouched: the cached in-process policy's frozen part equals a fresh tiny Llama
    bundle = runtime._BUNDLES[("", 0)]
    fresh = dict(lm.named_parameters())
    for n, p in bundle.lm.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, fresh[n]), n
    assert summary["params"]["shared"] == dense // 4  # the two trainable blocks, nothing else


def test_sparse_reply_with_wrong_count_is_rejected(tiny_pfit) -> None:
    from flwr.app import Array

    def tamper(cid, reply):
        if cid == 1:
            arrays = reply.content["arrays"]
            key = next(k for k in arrays if "q_proj" in k)
            arrays[key] = Array(np.zeros(3, dtype=np.float32))
        return reply

    rc = _rc(tiny_pfit, "pfit", "tamper")
    cfg = RunConfig.from_run_config(rc)
    recorder = RunRecorder(cfg.results_dir / cfg.run_name, cfg.method, score_key="reward")
    grid = InProcessGrid(rc, 2, app=_client_app(), tamper=tamper)
    server.run_pfit(grid, cfg, recorder, None, query_roster(grid, 2, recorder))
    events = recorder.rounds[1]["events"]
    assert [e["kind"] for e in events] == ["rejected"] and "q_proj" in events[0]["reason"]
    assert set(recorder.rounds[1]["clients"]["1"]) >= {"combined"}  # evaluated nonetheless


def test_shepherd_lora_uplink_is_lora_only(tiny_pfit) -> None:
    summary, rounds, _ = _run(_rc(tiny_pfit, "shepherd", "shep"))
    assert not rounds[-1]["events"]
    bundle = runtime._BUNDLES[("", 8)]
    names = [n for n, p in bundle.lm.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n for n in names)
    assert rounds[1]["clients"]["0"]["uplink_bytes"] == sum(
        p.numel() * 4 for n, p in bundle.lm.named_parameters() if p.requires_grad)
    assert summary["reward_weights"] is None and summary["trainer"] == "sft"  # no reward model in training
    assert summary["preference_weights"] == {"0": [0.8, 0.2], "1": [0.2, 0.8]}  # but scored like PFIT
    assert "train_loss" in rounds[1]["clients"]["0"] and "reward_train" not in rounds[1]["clients"]["0"]


def test_pfit_over_lossy_wireless_link(tiny_pfit) -> None:
    """The real link mod and WirelessGrid around PFIT: a client behind a bad link loses replies,
    the round aggregates the others, and stale globals are refused rather than mis-unpacked."""
    from pwff_app.wireless.channel import ChannelConfig
    from pwff_app.wireless.link import WirelessGrid, uplink_mod

    rc = _rc(tiny_pfit, "pfit", "lossy")
    rc.update({"wireless.enabled": True, "wireless.snr-db": "30,-10"})
    cfg = RunConfig.from_run_config(rc)
    recorder = RunRecorder(cfg.results_dir / cfg.run_name, cfg.method, score_key="reward")
    app = _client_app(mods=[uplink_mod])  # the link mod of pwff_app.client_app around the handlers
    inner = InProcessGrid(rc, 2, app=app)
    roster = query_roster(inner, 2, recorder)
    grid = WirelessGrid(inner, ChannelConfig.from_run_config(rc), roster)
    recorder.extra["wireless"] = grid.round_stats
    summary = server.run_pfit(grid, cfg, recorder, None, roster)
    assert [r["round"] for r in recorder.rounds] == [0, 1, 2]
    for r in recorder.rounds[1:]:
        assert "uplink_bytes" in r["clients"]["0"] and "wireless" in r
        kinds = {e["kind"] for e in r["events"]}
        assert kinds <= {"failed", "rejected", "eval-failed"}
    assert any(r["events"] for r in recorder.rounds)  # SNR -10 dB: client 1 does not get through
    assert "0" in summary["reward"]["per_client"]


def test_real_server_and_client_apps(tiny_pfit) -> None:
    """The real ServerApp + ClientApp (mods included) dispatch instruct methods to pwff_app.instruct.client / .server."""
    from pwff_app.testing.inprocess import run_server

    for method in ("pfit", "sfl"):
        rc = _rc(tiny_pfit, method, f"wired-{method}")
        run_server(rc, InProcessGrid(rc, 2))
        out = tiny_pfit / "res" / f"wired-{method}"
        summary = json.loads((out / "summary.json").read_text())
        assert summary["method"] == method and summary["num_rounds"] == 2
        assert set(summary["reward"]["per_client"]) == {"0", "1"} and summary["wireless"] == {"enabled": False}
        rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
        assert all(r["reward_mean"] is not None and not r["events"] for r in rounds)


@pytest.mark.parametrize(("method", "personal"), [("pfit", True), ("shepherd", False)])
def test_round_starts_from_own_local_model_or_the_global(tiny_pfit, monkeypatch, method, personal) -> None:
    """PFIT clients continue their personalised model (the proximal term ties it to the global);
    Shepherd, plain FedAvg of supervised LoRA, starts every round from the (moving) global and keeps nothing."""
    starts, seen, current = {}, {}, {}
    real_load = client.load_trainable_state

    def spy(model, state):
        if current and current["key"] not in starts:  # the first load of a train call = its start
            starts[current["key"]] = {k: torch.as_tensor(np.asarray(v)).clone() for k, v in state.items()}
        real_load(model, state)

    monkeypatch.setattr(client, "load_trainable_state", spy)
    app = ClientApp()
    app.query()(answer_query)

    @app.train()
    def train(msg, context):
        cid, rnd = int(context.node_config["partition-id"]), int(msg.content["config"]["server-round"])
        local = client._local_model(PrivateStore(context, cid).load(upto_round=rnd - 1))
        seen[(cid, rnd)] = ({k: torch.from_numpy(np.asarray(v)) for k, v in local.items()},
                            {k: torch.from_numpy(v.numpy()) for k, v in msg.content["arrays"].items()})
        current["key"] = (cid, rnd)
        try:
            return client.handle_pfit_train(msg, context)
        finally:
            current.clear()

    @app.evaluate()
    def evaluate(msg, context):
        return client.handle_pfit_evaluate(msg, context)

    _run(_rc(tiny_pfit, method, f"start-{method}"), app=app)
    for cid in (0, 1):
        local, glob = seen[(cid, 2)]
        assert set(starts[(cid, 1)]) == set(glob) and all(torch.equal(starts[(cid, 1)][k], v)
                                                           for k, v in seen[(cid, 1)][1].items())
        want = local if personal else glob
        assert bool(local) == personal  # Shepherd keeps nothing private
        assert all(torch.equal(starts[(cid, 2)][k], want[k]) for k in glob)
        other = glob if personal else starts[(cid, 1)]
        assert any(not torch.equal(want[k], other[k]) for k in glob)  # the two really differ

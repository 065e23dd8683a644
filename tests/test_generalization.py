"""Generalization beside personalization (issue 18): the balanced global test set, the client's
full model on it, and PFTT's shared part alone (no private LoRA)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, RecordDict

from pwff_app import client_app
from pwff_app.config import ConfigError, RunConfig
from pwff_app.federation.checks import GLOBAL_EVAL
from pwff_app.federation.state import PrivateStore
from pwff_app.methods import METHODS
from pwff_app.task_tuning import client as task_client
from pwff_app.task_tuning import train as task_train
from pwff_app.task_tuning.data import (
    AG_NEWS_CLASSES, DataNotFoundError, batches, global_rows, global_test_split, load_ag_news,
)
from pwff_app.task_tuning.model import group_params, lora_disabled
from pwff_app.task_tuning.train import build_model_for, evaluate_model, prepared_task
from pwff_app.testing.inprocess import InProcessGrid, run_server
from tests.conftest import make_context, make_message, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _message(cfg: RunConfig, server_round: int, message_type: str, global_eval: bool = False):
    arrays = ArrayRecord({k: Array(v) for k, v in
                          group_params(build_model_for(cfg, None), METHODS[cfg.method].shared).items()})
    config = ConfigRecord({"server-round": server_round, **({GLOBAL_EVAL: True} if global_eval else {})})
    return make_message(RecordDict({"arrays": arrays, "config": config}), message_type)


def _trained_client(tiny_data_dir, tmp_path, client_id: int = 0, method: str = "pftt", **overrides):
    """(cfg, context) of a client after one round of training (LoRA B and head moved off their init)."""
    cfg = RunConfig.from_run_config(tiny_config(tiny_data_dir, tmp_path, method=method, task__local_epochs=2,
                                                **overrides))
    context = make_context(dict(cfg.raw), partition_id=client_id)
    client_app.train(_message(cfg, 1, MessageType.TRAIN), context)
    return cfg, context


# ---------------------------------------------------------------------------------------
# The global test set
# ---------------------------------------------------------------------------------------


def test_global_test_set_is_balanced_test_rows_with_its_own_seed(tiny_data_dir):
    rows = global_test_split(tiny_data_dir, "", 24)
    assert np.bincount(rows["label"], minlength=4).tolist() == [6, 6, 6, 6]
    train, test = load_ag_news(tiny_data_dir, "")
    assert set(rows["text"]) <= set(test["text"])  # the test split, never the train split
    assert rows["text"] == global_test_split(tiny_data_dir, "", 24)["text"]  # the same rows each time
    with pytest.raises(DataNotFoundError, match="multiple of 4"):
        global_test_split(tiny_data_dir, "", 10)
    with pytest.raises(DataNotFoundError, match="the test split has 50"):  # tiny test split: 50 per label
        global_test_split(tiny_data_dir, "", 4 * 51)


def test_global_test_samples_must_be_balanced(tiny_data_dir, tmp_path):
    with pytest.raises(ConfigError, match="task.global-test-samples.*multiple of the 4 labels"):
        RunConfig.from_run_config(tiny_config(tiny_data_dir, tmp_path, task__global_test_samples=30))


@pytest.mark.parametrize("every,num_rounds,rounds", [(0, 3, [3]), (2, 5, [2, 4, 5]), (1, 2, [1, 2])])
def test_global_eval_rounds(tiny_data_dir, tmp_path, every, num_rounds, rounds):
    cfg = RunConfig.from_run_config(tiny_config(tiny_data_dir, tmp_path, task__num_rounds=num_rounds,
                                                task__global_eval_every=every))
    assert [r for r in range(0, num_rounds + 1) if cfg.task.global_eval(r)] == rounds
    off = RunConfig.from_run_config(tiny_config(tiny_data_dir, tmp_path, task__global_test_samples=0))
    assert not any(off.task.global_eval(r) for r in range(0, 3))


def test_global_test_set_is_identical_for_every_client_and_seed(tiny_data_dir, tmp_path, monkeypatch):
    """Every client (of every seed's split) evaluates the same global rows; their own splits differ."""
    seen: list[tuple[str, torch.Tensor]] = []
    real = task_train.evaluate_model

    def spy(model, loader, *args):
        seen.append(torch.cat([b[0].flatten() for b in loader]))
        return real(model, loader, *args)

    monkeypatch.setattr(task_train, "evaluate_model", spy)
    monkeypatch.setattr(task_client, "evaluate_model", spy)
    own, glob = [], []
    for seed in (1, 2):
        cfg = RunConfig.from_run_config(tiny_config(tiny_data_dir, tmp_path, method="fedlora", seed=seed))
        for client_id in range(3):
            seen.clear()
            reply = client_app.evaluate_(_message(cfg, 2, MessageType.EVALUATE, global_eval=True),
                                         make_context(dict(cfg.raw), partition_id=client_id))
            assert {"global-accuracy", "global-loss"} <= set(reply.content["metrics"].keys())
            assert not any(k.startswith("shared-only") for k in reply.content["metrics"].keys())  # fedlora
            (own_ids, global_ids) = seen  # own split first, then the global set
            own.append(own_ids)
            glob.append(global_ids)
    assert all(torch.equal(g, glob[0]) for g in glob)
    assert not all(o.shape == own[0].shape and torch.equal(o, own[0]) for o in own)
    labels = global_rows(tiny_data_dir, "", "", 16, 32).tensors[2]
    assert torch.bincount(labels, minlength=len(AG_NEWS_CLASSES)).tolist() == [4, 4, 4, 4]


def test_real_global_test_set(real_data_dir):
    rows = global_test_split(real_data_dir, "", 200)
    assert np.bincount(rows["label"], minlength=4).tolist() == [50, 50, 50, 50]
    assert len(set(rows["text"])) == 200


# ---------------------------------------------------------------------------------------
# The client's full model, and the shared part alone
# ---------------------------------------------------------------------------------------


def _global_loader(cfg: RunConfig):
    t = cfg.task
    return batches(global_rows(cfg.data_dir, t.dataset, t.model_name, t.global_test_samples, t.max_length),
                   2 * t.batch_size, shuffle=False)


def test_global_evaluation_uses_the_full_model(tiny_data_dir, tmp_path):
    """global-* = the global shared part + this client's private LoRA and head on the global rows."""
    cfg, context = _trained_client(tiny_data_dir, tmp_path)
    msg = _message(cfg, 1, MessageType.EVALUATE, global_eval=True)
    metrics = client_app.evaluate_(msg, context).content["metrics"]
    assert set(metrics.keys()) == {"num-examples", "accuracy", "loss", "global-accuracy", "global-loss",
                                   "shared-only-accuracy", "shared-only-loss"}
    shared = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    private = PrivateStore(context, 0).load()
    assert any(".lora_B." in k and np.abs(v).max() > 0 for k, v in private.items())  # LoRA is in use

    full = prepared_task(cfg, 0, 4, 1, shared, private)
    expected = evaluate_model(full.model, _global_loader(cfg))
    assert metrics["global-loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert metrics["global-accuracy"] == pytest.approx(expected["accuracy"])
    # Without the client's private part (a fresh LoRA and head) the numbers are others.
    fresh = evaluate_model(prepared_task(cfg, 0, 4, 1, shared, None).model, _global_loader(cfg))
    assert fresh["loss"] != pytest.approx(metrics["global-loss"], rel=1e-6)
    # Not asked for: no global fields.
    plain = client_app.evaluate_(_message(cfg, 1, MessageType.EVALUATE), context).content["metrics"]
    assert set(plain.keys()) == {"num-examples", "accuracy", "loss"}
    assert plain["loss"] == pytest.approx(metrics["loss"])


def test_shared_only_evaluation_contains_no_private_lora(tiny_data_dir, tmp_path):
    """shared-only-* ignores the private LoRA entirely (any values give the same numbers) and equals
    the global adapters + the client's head on a model whose LoRA adds nothing."""
    cfg, context = _trained_client(tiny_data_dir, tmp_path)
    msg = _message(cfg, 1, MessageType.EVALUATE, global_eval=True)
    before = client_app.evaluate_(msg, context).content["metrics"]

    store = PrivateStore(context, 0)
    private = store.load()
    generator = torch.Generator().manual_seed(0)
    wrecked = {k: (torch.randn(v.shape, generator=generator).numpy() * 10 if ".lora_" in k else v)
               for k, v in private.items()}
    store.save(wrecked, 1)
    after = client_app.evaluate_(msg, context).content["metrics"]
    assert after["shared-only-loss"] == pytest.approx(before["shared-only-loss"], rel=1e-6)
    assert after["shared-only-accuracy"] == before["shared-only-accuracy"]
    assert after["global-loss"] != pytest.approx(before["global-loss"], rel=1e-3)  # the full model uses it

    # The same as the model with its LoRA B zeroed (LoRA adds B·A·x = 0) and the client's head.
    shared = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    zeroed = {k: (np.zeros_like(v) if ".lora_B." in k else v) for k, v in private.items()}
    model = prepared_task(cfg, 0, 4, 1, shared, zeroed).model
    expected = evaluate_model(model, _global_loader(cfg))
    assert before["shared-only-loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert before["shared-only-accuracy"] == pytest.approx(expected["accuracy"])


def test_lora_disabled_restores_the_model(tiny_data_dir, tmp_path):
    cfg = RunConfig.from_run_config(tiny_config(tiny_data_dir, tmp_path))
    model = build_model_for(cfg, 0)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            torch.nn.init.normal_(p)
    model.eval()
    ids, mask = torch.randint(1000, 5000, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        full = model(ids, mask)
        with lora_disabled(model):
            off = model(ids, mask)
        again = model(ids, mask)
    assert not torch.allclose(full, off) and torch.equal(full, again)
    assert grads == {n: p.requires_grad for n, p in model.named_parameters()}


def test_only_pftt_has_a_shared_only_view():
    views = {name for name, spec in METHODS.items() if spec.shared_only_view}
    assert views == {"pftt"}


# ---------------------------------------------------------------------------------------
# Through the ServerApp: rounds.jsonl and summary.json
# ---------------------------------------------------------------------------------------


def test_run_reports_global_and_shared_only_accuracy(tiny_data_dir, tmp_path):
    rc = tiny_config(tiny_data_dir, tmp_path, run_name="gen", num_clients=2, task__global_eval_every=1)
    run_server(rc, InProcessGrid(rc, 2))
    rounds = [json.loads(line) for line in (tmp_path / "gen" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["events"] == []
        for c in r["clients"].values():
            assert 0 <= c["global_accuracy"] <= 1 and 0 <= c["shared_only_accuracy"] <= 1
        assert r["global_accuracy_mean"] == pytest.approx(np.mean([c["global_accuracy"]
                                                                   for c in r["clients"].values()]))
    accuracy = json.loads((tmp_path / "gen" / "summary.json").read_text())["accuracy"]
    last = rounds[-1]["clients"]
    assert accuracy["global_per_client"] == {cid: c["global_accuracy"] for cid, c in last.items()}
    assert accuracy["shared_only_per_client"] == {cid: c["shared_only_accuracy"] for cid, c in last.items()}
    assert accuracy["global_mean"] == pytest.approx(rounds[-1]["global_accuracy_mean"])
    assert accuracy["shared_only_mean"] == pytest.approx(rounds[-1]["shared_only_accuracy_mean"])

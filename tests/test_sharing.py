"""What each method trains, sends and keeps; private LoRA never leaves the client."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, RecordDict

from pwff_app import client_app
from pwff_app.config import RunConfig
from pwff_app.methods import METHODS, param_group
from pwff_app.task_tuning.model import count_params, group_params
from pwff_app.federation.payload import payload_bytes
from pwff_app.federation.state import PrivateStore
from pwff_app.task_tuning.train import build_model_for
from tests.conftest import make_context, make_message, tiny_config


@pytest.mark.parametrize("name,group", [
    ("backbone.encoder.layer.0.attention.self.query.lora_A.default.weight", "lora"),
    ("backbone.encoder.layer.5.output.dense.adapter.up.weight", "adapter"),
    ("backbone.encoder.layer.5.output.dense.base.weight", "backbone"),
    ("head.bias", "head"),
])
def test_param_group(name, group):
    assert param_group(name) == group


@pytest.mark.parametrize("method,shared", [
    ("pftt", {"adapter"}),
    ("vanilla-fl", {"adapter", "lora", "head"}),
    ("fedlora", {"lora", "head"}),
    ("fedavg-full", {"backbone", "head"}),
    ("local", set()),
])
def test_each_method_trains_and_shares_its_groups(tiny_data_dir, tmp_path, method, shared):
    cfg = RunConfig.from_run_config(tiny_config(tiny_data_dir, tmp_path, method=method))
    model = build_model_for(cfg, client_id=1)
    trained = {param_group(n) for n, p in model.named_parameters() if p.requires_grad}
    frozen = {param_group(n) for n, p in model.named_parameters() if not p.requires_grad}
    assert trained == set(METHODS[method].trained)
    assert {param_group(n) for n in group_params(model, METHODS[method].shared)} == shared
    assert not trained & frozen


def test_private_lora_is_sized_by_resource_level(tiny_data_dir, tmp_path):
    cfg = RunConfig.from_run_config(tiny_config(tiny_data_dir, tmp_path, task__resource_levels="1.0,0.5"))
    big, small = build_model_for(cfg, 0), build_model_for(cfg, 1)
    assert count_params(small, {"lora"}) < count_params(big, {"lora"})
    # Shared adapters keep one shape everywhere, so the server can average them.
    assert {k: v.shape for k, v in group_params(big, {"adapter"}).items()} == \
           {k: v.shape for k, v in group_params(small, {"adapter"}).items()}


def _global_message(cfg: RunConfig, server_round: int, message_type: str = MessageType.TRAIN):
    server_model = build_model_for(cfg, client_id=None)
    arrays = ArrayRecord({k: Array(v) for k, v in group_params(server_model, METHODS[cfg.method].shared).items()})
    return make_message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})}),
                        message_type)


def test_pftt_reply_carries_exactly_the_shared_bytes_and_no_lora(tiny_data_dir, tmp_path):
    cfg = RunConfig.from_run_config(tiny_config(tiny_data_dir, tmp_path))
    context = make_context(dict(cfg.raw), partition_id=0)
    msg = _global_message(cfg, 1)
    reply = client_app.train(msg, context)

    keys = list(reply.content["arrays"].keys())
    assert keys and all(param_group(k) == "adapter" for k in keys)
    shared_params = count_params(build_model_for(cfg, None), {"adapter"})
    assert payload_bytes(reply.content) == 4 * shared_params  # float32
    # No private tensor travels, neither by name nor by value (e.g. renamed).
    private = PrivateStore(context, 0).load()
    assert private and any(".lora_" in k for k in private) and any(k.startswith("head.") for k in private)
    sent = [a.numpy() for a in reply.content["arrays"].values()]
    for value in private.values():
        assert not any(v.shape == value.shape and np.array_equal(v, value) for v in sent)
    text = repr(reply.content["metrics"]) + repr(reply.content["info"])
    assert "lora" not in text.lower()


def test_private_state_persists_across_rounds(tiny_data_dir, tmp_path):
    cfg = RunConfig.from_run_config(tiny_config(tiny_data_dir, tmp_path))
    context = make_context(dict(cfg.raw), partition_id=1, **{"state-dir": str(tmp_path / "node1")})
    client_app.train(_global_message(cfg, 1), context)
    after_round1 = PrivateStore(context, 1).load()

    # Round 2 starts from round 1's private weights: evaluating before training shows it
    # (a fresh client would have zero LoRA B and the untrained head).
    fresh = build_model_for(cfg, 1)
    fresh_private = group_params(fresh, METHODS["pftt"].private)
    assert any(not np.array_equal(after_round1[k], fresh_private[k]) for k in fresh_private)

    client_app.train(_global_message(cfg, 2), context)
    after_round2 = PrivateStore(context, 1).load()
    assert set(after_round2) == set(after_round1)
    assert any(not np.array_equal(after_round2[k], after_round1[k]) for k in after_round1)

    # A restarted node (new context, same state dir) gets the same bytes back from disk.
    restarted = make_context(dict(cfg.raw), partition_id=1, **{"state-dir": str(tmp_path / "node1")})
    reloaded = PrivateStore(restarted, 1).load()
    assert all(np.array_equal(reloaded[k], after_round2[k]) for k in after_round2)


def test_evaluate_uses_own_private_parts(tiny_data_dir, tmp_path):
    cfg = RunConfig.from_run_config(tiny_config(tiny_data_dir, tmp_path, task__local_epochs=3))
    context = make_context(dict(cfg.raw), partition_id=2)
    before = client_app.evaluate_(_global_message(cfg, 1, MessageType.EVALUATE), context)
    client_app.train(_global_message(cfg, 1), context)
    after = client_app.evaluate_(_global_message(cfg, 1, MessageType.EVALUATE), context)
    # Same global arrays both times: only the private head/LoRA changed, and they help.
    assert after.content["metrics"]["accuracy"] > before.content["metrics"]["accuracy"]
    assert "arrays" not in after.content


def test_client_refuses_a_global_with_foreign_keys(tiny_data_dir, tmp_path):
    cfg = RunConfig.from_run_config(tiny_config(tiny_data_dir, tmp_path))
    msg = _global_message(cfg, 1)
    msg.content["arrays"]["backbone.encoder.layer.0.attention.self.query.lora_A.default.weight"] = \
        Array(np.zeros((8, 384), dtype=np.float32))
    with pytest.raises(ValueError, match="shared set"):
        client_app.train(msg, make_context(dict(cfg.raw), partition_id=0))


@pytest.mark.parametrize("arch", ["roberta", "distilbert"])
def test_other_encoders_by_local_path(tmp_path, arch):
    """RoBERTa (the paper's model) and DistilBERT layouts get adapters and LoRA by path."""
    from transformers import AutoModel, DistilBertConfig, RobertaConfig

    from pwff_app.task_tuning.model import build_task_model

    config = (RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=70)
              if arch == "roberta" else
              DistilBertConfig(vocab_size=100, dim=32, n_layers=4, n_heads=2, hidden_dim=64))
    AutoModel.from_config(config).save_pretrained(tmp_path / arch)
    model = build_task_model(str(tmp_path / arch), METHODS["pftt"], num_labels=4, adapter_size=8,
                             lora_rank=4, lora_alpha=8, resource_level=0.5, seed=0)
    groups = {param_group(n) for n, p in model.named_parameters() if p.requires_grad}
    assert groups == {"adapter", "lora", "head"}
    lora_layers = {n.split(".layer.")[1].split(".")[0] for n, _ in model.named_parameters() if ".lora_" in n}
    assert lora_layers == {"2", "3"}  # level 0.5 of 4 layers: the top two
    ids = torch.randint(0, 100, (2, 7))
    assert model(ids, torch.ones_like(ids)).shape == (2, 4)

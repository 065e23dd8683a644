"""Work done once per worker process: tokenized client rows and built models are reused across
messages, give exactly what a fresh process gives, and are kept apart by their keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, RecordDict
from transformers import AutoModel, BertConfig

from pwff_app import client_app
from pwff_app.config import RunConfig
from pwff_app.device import place
from pwff_app.task_tuning import data, model, train
from pwff_app.testing.tiny import tiny_tokenizer
from tests.conftest import make_context, make_message, tiny_config


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random 4-layer BERT and the character tokenizer, saved as a local model folder."""
    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    AutoModel.from_config(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def _config(data_dir: Path, tmp_path: Path, encoder: str, **overrides: Any) -> RunConfig:
    return RunConfig.from_run_config(tiny_config(data_dir, tmp_path, task__model_name=encoder, task__adapter_size=8,
                                                 task__lora_rank=4, **overrides))


def _fresh_process() -> None:
    """Empty every per-process cache on the task-tuning path, as a new worker process has them."""
    for cached in (data.load_ag_news, data._partitioner, data.client_rows, model._pretrained, model.load_tokenizer,
                   train._built_model):
        cached.cache_clear()


def _message(shared: dict[str, np.ndarray], server_round: int, message_type: str = MessageType.TRAIN):
    arrays = ArrayRecord({k: Array(v) for k, v in shared.items()})
    return make_message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})}),
                        message_type)


def _two_rounds(cfg: RunConfig, clients: list[int], fresh_each_message: bool) -> list[dict[str, Any]]:
    """Train and evaluate replies (arrays and metrics) of rounds 1-2, the shared part averaged in between."""
    contexts = {c: make_context(dict(cfg.raw), partition_id=c) for c in clients}
    shared = model.group_params(train.build_model_for(cfg, None), cfg.spec.shared)
    out: list[dict[str, Any]] = []

    def send(handler: Any, server_round: int, message_type: str) -> list[dict[str, np.ndarray]]:
        uploads = []
        for c in clients:
            if fresh_each_message:
                _fresh_process()
            reply = handler(_message(shared, server_round, message_type), contexts[c])
            arrays = {k: v.numpy() for k, v in reply.content.array_records.get("arrays", {}).items()}
            out.append({"arrays": arrays, "metrics": dict(reply.content["metrics"])})
            uploads.append(arrays)
        return uploads

    for server_round in (1, 2):
        uploads = send(client_app.train, server_round, MessageType.TRAIN)
        shared = {k: np.mean([u[k] for u in uploads], axis=0) for k in shared}
        send(client_app.evaluate_, server_round, MessageType.EVALUATE)
    return out


def _counting(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[int]:
    """Count calls of ``module.name`` (the function keeps working)."""
    calls: list[int] = []
    original = getattr(module, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_second_message_reuses_rows_and_model(tiny_data_dir, tmp_path, tiny_encoder, monkeypatch):
    cfg = _config(tiny_data_dir, tmp_path, tiny_encoder)
    _fresh_process()
    builds = _counting(monkeypatch, train, "build_task_model")
    tokenized = _counting(monkeypatch, data, "tokenize")
    context = make_context(dict(cfg.raw), partition_id=1)
    shared = model.group_params(train.build_model_for(cfg, None), cfg.spec.shared)
    builds.clear()  # the server-side build above is not the client's

    client_app.train(_message(shared, 1), context)
    assert (len(builds), len(tokenized)) == (1, 2)  # one model; train and test rows
    first = train.load_client_task(cfg, 1, 4, 2).model
    client_app.train(_message(shared, 2), context)
    client_app.evaluate_(_message(shared, 2, MessageType.EVALUATE), context)
    assert (len(builds), len(tokenized)) == (1, 2)
    assert train.load_client_task(cfg, 1, 4, 3).model is first


@pytest.mark.parametrize("method", ["pftt", "vanilla-fl", "fedavg-full"])
def test_cached_messages_give_what_a_fresh_process_gives(tiny_data_dir, tmp_path, tiny_encoder, method):
    # Clients 0 and 2 share a resource level, hence one cached model, used in turn.
    cfg = _config(tiny_data_dir, tmp_path, tiny_encoder, method=method)
    _fresh_process()
    cached = _two_rounds(cfg, [0, 1, 2], fresh_each_message=False)
    fresh = _two_rounds(cfg, [0, 1, 2], fresh_each_message=True)
    assert [r["metrics"] for r in cached] == [r["metrics"] for r in fresh]
    for c, f in zip(cached, fresh):
        assert c["arrays"].keys() == f["arrays"].keys()
        assert all(np.array_equal(c["arrays"][k], f["arrays"][k]) for k in c["arrays"])


def test_rows_are_kept_apart_by_their_key(tiny_data_dir, tmp_path, tiny_encoder):
    cfg = _config(tiny_data_dir, tmp_path, tiny_encoder)
    t = cfg.task
    tokenizer = model.load_tokenizer(tiny_encoder)

    def rows(partition_id: int, max_length: int) -> tuple[torch.Tensor, ...]:
        train_rows, _ = data.client_rows(cfg.data_dir, t.dataset, tiny_encoder, partition_id, 4, t.alpha, cfg.seed,
                                         t.max_train_samples, t.max_test_samples, max_length)
        return train_rows.tensors

    def expected(partition_id: int, max_length: int) -> tuple[torch.Tensor, ...]:
        train_ds, _ = data.client_split(cfg.data_dir, t.dataset, partition_id, 4, t.alpha, cfg.seed,
                                        t.max_train_samples, t.max_test_samples)
        return data.tokenize(train_ds, tokenizer, max_length).tensors

    _fresh_process()
    for partition_id, max_length in ((0, 32), (1, 32), (0, 8), (0, 32)):
        got, want = rows(partition_id, max_length), expected(partition_id, max_length)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert data.client_rows.cache_info().currsize == 3


def test_models_are_kept_apart_and_reset_per_client(tiny_data_dir, tmp_path, tiny_encoder):
    cfg = _config(tiny_data_dir, tmp_path, tiny_encoder)  # resource levels 1.0, 0.8, 1.0, 0.8
    cpu, fp32 = torch.device("cpu"), torch.float32

    def assert_as_built(got: torch.nn.Module, client_id: int) -> None:
        want = dict(place(train.build_model_for(cfg, client_id), cpu, fp32).named_parameters())
        got_params = dict(got.named_parameters())
        assert got_params.keys() == want.keys()
        assert all(torch.equal(p, want[n]) and p.requires_grad == want[n].requires_grad for n, p in got_params.items())
        assert all(p.grad is None for p in got_params.values())

    _fresh_process()
    first = train.client_model(cfg, 0, cpu, fp32)
    with torch.no_grad():  # what a message leaves behind: trained weights and gradients
        for p in first.parameters():
            if p.requires_grad:
                p.add_(1.0)
                p.grad = torch.ones_like(p)
    level_08 = train.client_model(cfg, 1, cpu, fp32)
    assert level_08 is not first
    assert model.count_params(level_08, {"lora"}) < model.count_params(first, {"lora"})
    assert_as_built(level_08, 1)
    same_level = train.client_model(cfg, 2, cpu, fp32)
    assert same_level is first
    assert_as_built(same_level, 2)  # its own private LoRA draw, nothing of client 0's training
    assert_as_built(train.client_model(cfg, 0, cpu, fp32), 0)
    other_seed = train.client_model(_config(tiny_data_dir, tmp_path, tiny_encoder, seed=7), 0, cpu, fp32)
    assert other_seed is not first
    assert not torch.equal(other_seed.head.weight, first.head.weight)
    assert train._built_model.cache_info().currsize == 3

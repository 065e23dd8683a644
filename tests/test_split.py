"""FedBERT (split learning): the split computes the model's function, the message protocol
keeps the client's state exactly, the bytes are the tensors sent, and a round survives a
client that drops out."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from pwff_app import methods
from pwff_app.config import AggregationConfig, RunConfig
from pwff_app.federation.payload import payload_bytes
from pwff_app.federation.results import RunRecorder
from pwff_app.task_tuning.fedbert import client as split
from pwff_app.task_tuning.fedbert import server as split_server
from pwff_app.task_tuning.fedbert.client import client_data, handle_split_message, step_seed, train_batches
from pwff_app.task_tuning.fedbert.model import (
    SplitConfig, activation_bytes, build_split_model, client_backward, client_forward, server_step, split_model,
    split_spec, trained_arrays, trim_padding,
)
from pwff_app.task_tuning.fedbert.server import run_split_learning
from pwff_app.task_tuning.train import round_seed
from tests.conftest import make_context, make_message, tiny_config


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def fedbert_methods(monkeypatch):
    """Accept method = "fedbert" in RunConfig even before it is registered in METHODS."""
    if "fedbert" not in methods.METHODS:
        monkeypatch.setitem(methods.METHODS, "fedbert", split_spec("full"))


def fedbert_rc(tiny_data_dir, tmp_path, **fedbert) -> dict:
    rc = tiny_config(tiny_data_dir, tmp_path / "results", method="fedbert", task__batch_size=8)
    rc.update({f"fedbert.{k.replace('_', '-')}": v for k, v in fedbert.items()})
    return rc


def _batch(texts_len: int = 4, length: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 5000, (texts_len, length), generator=g)
    mask = torch.ones(texts_len, length, dtype=torch.long)
    for row, real in enumerate([16, 9, 5, 12][:texts_len]):
        mask[row, real:] = 0
        ids[row, real:] = 0
    ids[:, 0] = 101
    labels = torch.tensor([0, 3, 1, 2][:texts_len])
    return ids, mask, labels


# ---------------------------------------------------------------------------------------
# The split itself
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("train,k", [("full", 2), ("all", 0), ("adapter", 6)])
def test_split_equals_full_model(fedbert_methods, tiny_data_dir, tmp_path, train, k):
    cfg = RunConfig.from_run_config(fedbert_rc(tiny_data_dir, tmp_path, train=train, split_layer=k))
    full = build_split_model(cfg, SplitConfig.from_run_config(cfg))
    full.eval()  # dropout off: both pipelines compute the same deterministic function
    pieces = copy.deepcopy(full)
    bottom, top = split_model(pieces, k)
    ids, mask, labels = _batch()

    loss = torch.nn.functional.cross_entropy(full(ids, mask), labels)
    loss.backward()
    acts = client_forward(bottom, (ids, mask))
    split_loss, grad = server_step(top, acts, mask, labels, optimizer=None)
    client_backward(bottom, (ids, mask), grad, optimizer=None)

    assert abs(loss.item() - split_loss) < 1e-5
    names = [n for n, _ in bottom.named_parameters()] + [n for n, _ in top.named_parameters()]
    assert len(names) == len(set(names))
    full_params = dict(full.named_parameters())
    assert set(full_params) - set(names) == {"backbone.pooler.dense.weight", "backbone.pooler.dense.bias"}
    split_params = {**dict(bottom.named_parameters()), **dict(top.named_parameters())}
    trained = [n for n in names if full_params[n].requires_grad]
    assert trained and any(n.startswith("head.") for n in trained)
    for name in trained:
        assert full_params[name].grad is not None, name
        torch.testing.assert_close(split_params[name].grad, full_params[name].grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")
    # Trimming all-padding columns leaves the function unchanged.
    tids, tmask = trim_padding(ids, mask)
    assert tids.shape[1] == int(mask.sum(1).max())
    with torch.no_grad():
        torch.testing.assert_close(top(client_forward(bottom, (tids, tmask)), tmask), full(ids, mask),
                                   rtol=1e-4, atol=1e-5)


def test_train_modes_freeze_what_they_say(fedbert_methods, tiny_data_dir, tmp_path):
    trained = {}
    for train in ("full", "all", "adapter"):
        cfg = RunConfig.from_run_config(fedbert_rc(tiny_data_dir, tmp_path, train=train))
        bottom, top = split_model(build_split_model(cfg, SplitConfig.from_run_config(cfg)), 2)
        trained[train] = {n for n, p in [*bottom.named_parameters(), *top.named_parameters()] if p.requires_grad}
    word = "backbone.embeddings.word_embeddings.weight"
    assert word in trained["all"] and word not in trained["full"]
    assert trained["all"] - trained["full"] == {word}
    assert all(".adapter." in n or n.startswith("head.") for n in trained["adapter"])


def test_recomputed_forward_draws_the_same_dropout(fedbert_methods, tiny_data_dir, tmp_path):
    cfg = RunConfig.from_run_config(fedbert_rc(tiny_data_dir, tmp_path))
    bottom, _ = split_model(build_split_model(cfg, SplitConfig.from_run_config(cfg)), 2)
    bottom.train()
    batch = _batch()
    a, b = client_forward(bottom, batch, seed=7), client_forward(bottom, batch, seed=7)
    assert torch.equal(a, b)
    assert not torch.equal(a, client_forward(bottom, batch, seed=8))


# ---------------------------------------------------------------------------------------
# The client handler, driven message by message
# ---------------------------------------------------------------------------------------


def _train_msg(arrays: ArrayRecord | None, server_round: int, step: int, final: bool = False) -> Message:
    content = RecordDict({"config": ConfigRecord({"server-round": server_round, "step": step, "final": final})})
    if arrays is not None:
        content["arrays"] = arrays
    return make_message(content, MessageType.TRAIN)


def _check_reply_shape(reply: Message, client_id: int) -> dict:
    assert not reply.has_error(), reply.error
    content = reply.content
    assert len(content.array_records) == 1 and len(content.metric_records) == 1
    info = content["info"]
    assert info["client-id"] == client_id and isinstance(info["client-id"], int)
    assert isinstance(info["compute-s"], float) and info["compute-s"] >= 0
    return dict(content["metrics"])


def test_protocol_round_matches_a_local_replay(fedbert_methods, tiny_data_dir, tmp_path):
    rc = fedbert_rc(tiny_data_dir, tmp_path)
    cfg = RunConfig.from_run_config(rc)
    sc = SplitConfig.from_run_config(cfg)
    client_id, server_round = 1, 1
    context = make_context(rc, client_id)

    # The "server": a top and its optimizer; a reference replays the same steps in-process.
    bottom0, top = split_model(build_split_model(cfg, sc), sc.split_layer)
    global_bottom = ArrayRecord({k: Array(v) for k, v in trained_arrays(bottom0).items()})
    ref_bottom, ref_top = split_model(build_split_model(cfg, sc), sc.split_layer)
    top_opt = torch.optim.AdamW([p for p in top.parameters() if p.requires_grad], lr=sc.lr, weight_decay=0.0)
    ref_top_opt = torch.optim.AdamW([p for p in ref_top.parameters() if p.requires_grad], lr=sc.lr, weight_decay=0.0)
    ref_bottom_opt = torch.optim.AdamW([p for p in ref_bottom.parameters() if p.requires_grad], lr=sc.lr,
                                       weight_decay=0.0)
    train_rows, _ = client_data(cfg, client_id, 4)
    seed = round_seed(cfg.seed, client_id, server_round)
    batches = train_batches(len(train_rows[2]), cfg.task.batch_size, cfg.task.local_epochs, seed)
    assert len(batches) == 4  # 32 rows, batch 8

    step, grad, uplink = 0, None, []
    while True:
        arrays = global_bottom if step == 0 else ArrayRecord({f"grad.{step - 1}": Array(grad.numpy())})
        final = step == len(batches)
        if step % 2:
            split._LIVE.clear()  # as if the message ran in another worker: state must carry everything
        reply = handle_split_message(_train_msg(arrays, server_round, step, final), context)
        metrics = _check_reply_shape(reply, client_id)
        if final:
            assert metrics["num-examples"] == len(train_rows[2]) and metrics["skipped-backward"] == 0
            weights = {k: v.numpy() for k, v in reply.content["arrays"].items()}
            break
        assert metrics["num-steps"] == len(batches)
        rec = reply.content["arrays"]
        acts = torch.from_numpy(rec["activations"].numpy())
        mask = torch.from_numpy(rec["attention-mask"].numpy().astype(np.int64))
        labels = torch.from_numpy(rec["labels"].numpy())
        # Byte accounting: activations (float32) + mask (int8) + labels (int64), nothing else.
        ids_b, mask_b, labels_b = split.select_batch(train_rows, batches[step])
        real = int(train_rows[1][torch.from_numpy(batches[step])].sum(1).max())
        assert tuple(acts.shape) == (len(batches[step]), real, 384) and torch.equal(mask, mask_b)
        expected = len(batches[step]) * real * (384 * 4 + 1) + len(batches[step]) * 8
        assert payload_bytes(reply.content) == expected == activation_bytes(len(batches[step]), real, 384)
        assert expected == sum(rec[k].numpy().nbytes for k in ("activations", "attention-mask", "labels"))
        uplink.append(expected)

        # Reference pipeline on the same batch and the same dropout draws.
        ref_bottom.train()
        ref_acts = client_forward(ref_bottom, (ids_b, mask_b), step_seed(seed, step))
        torch.testing.assert_close(acts, ref_acts.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(labels, labels_b)
        torch.manual_seed(1000 + step)
        loss, grad = server_step(top, acts, mask, labels, top_opt)
        torch.manual_seed(1000 + step)
        ref_loss, ref_grad = server_step(ref_top, ref_acts, mask_b, labels_b, ref_top_opt)
        client_backward(ref_bottom, (ids_b, mask_b), ref_grad, ref_bottom_opt, step_seed(seed, step))
        assert np.isfinite(loss) and abs(loss - ref_loss) < 1e-5
        step += 1

    expected_weights = trained_arrays(ref_bottom)
    assert set(weights) == set(expected_weights) == set(global_bottom.keys())
    for name, value in expected_weights.items():
        np.testing.assert_allclose(weights[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert any(not np.array_equal(weights[n], global_bottom[n].numpy()) for n in weights)  # it trained

    # A step out of order is refused (the server then drops the client for the round).
    with pytest.raises(ValueError, match="out of order"):
        handle_split_message(_train_msg(ArrayRecord(), server_round, 2), context)

    # Evaluation: the global bottom at step 0, activations of each test batch, no state change.
    _, test_rows = client_data(cfg, client_id, 4)
    reply = handle_split_message(make_message(RecordDict({
        "arrays": global_bottom, "config": ConfigRecord({"server-round": 1, "step": 0})}), MessageType.EVALUATE),
        context)
    metrics = _check_reply_shape(reply, client_id)
    assert metrics["num-steps"] == -(-len(test_rows[2]) // (2 * cfg.task.batch_size))
    with torch.no_grad():
        bottom0.eval()
        ids_t, mask_t, _ = split.select_batch(test_rows, np.arange(metrics["num-examples"]))
        torch.testing.assert_close(torch.from_numpy(reply.content["arrays"]["activations"].numpy()),
                                   client_forward(bottom0, (ids_t, mask_t)), rtol=1e-5, atol=1e-5)


def test_lost_gradient_is_skipped_not_fatal(fedbert_methods, tiny_data_dir, tmp_path):
    rc = fedbert_rc(tiny_data_dir, tmp_path)
    cfg = RunConfig.from_run_config(rc)
    bottom, _ = split_model(build_split_model(cfg, SplitConfig.from_run_config(cfg)), 2)
    global_bottom = ArrayRecord({k: Array(v) for k, v in trained_arrays(bottom).items()})
    context = make_context(rc, 0)
    reply = handle_split_message(_train_msg(global_bottom, 1, 0), context)
    # A stale downlink copy (a gradient for another step) or an empty record: no update.
    reply = handle_split_message(_train_msg(ArrayRecord({"grad.7": Array(np.zeros((1, 1, 384), np.float32))}),
                                            1, 1), context)
    assert not reply.has_error()
    reply = handle_split_message(_train_msg(ArrayRecord(), 1, 2, final=True), context)
    assert reply.content["metrics"]["skipped-backward"] == 2
    weights = reply.content["arrays"]
    assert all(np.array_equal(weights[k].numpy(), global_bottom[k].numpy()) for k in global_bottom.keys())


# ---------------------------------------------------------------------------------------
# Server loop over a grid
# ---------------------------------------------------------------------------------------


class _LocalGrid(Grid):
    """Push delivers to ``handle_split_message`` at once; pull returns the reply. One Context
    per node; ``drop(client_id, msg)`` returning True replaces the reply with an error."""

    def __init__(self, rc: dict, num_nodes: int, drop=None) -> None:
        self.contexts = {10 + i: Context(run_id=7, node_id=10 + i,
                                         node_config={"partition-id": i, "num-partitions": num_nodes},
                                         state=RecordDict(), run_config=dict(rc)) for i in range(num_nodes)}
        self.drop, self.replies, self.sent, self.received = drop, {}, [], []

    def set_run(self, run) -> None:
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            node = msg.metadata.dst_node_id
            delivered = Message(content=copy.deepcopy(msg.content), dst_node_id=node,
                                message_type=msg.metadata.message_type)
            self.sent.append((node, msg.metadata.message_type, payload_bytes(msg.content)))
            context = self.contexts[node]
            if self.drop is not None and self.drop(int(context.node_config["partition-id"]), delivered):
                reply = Message(Error(code=7001, reason="lost"), reply_to=delivered)
            else:
                reply = handle_split_message(delivered, context)
            if msg.metadata.message_type == MessageType.TRAIN and not reply.has_error():
                self.received.append(payload_bytes(reply.content))
            key = f"{len(self.sent)}-{i}"
            self.replies[key] = reply
            ids.append(key)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("the split server polls with push/pull")


def test_run_split_learning_two_clients(fedbert_methods, tiny_data_dir, tmp_path):
    rc = fedbert_rc(tiny_data_dir, tmp_path)
    rc.update({"num-clients": 2, "task.max-train-samples": 16, "task.max-test-samples": 16})
    cfg = RunConfig.from_run_config(rc)
    # Client 1 loses its uplink at training step 1 of round 1: dropped for that round only.
    grid = _LocalGrid(rc, 2, drop=lambda cid, msg: cid == 1 and msg.metadata.message_type == MessageType.TRAIN
                      and msg.content["config"]["server-round"] == 1 and msg.content["config"]["step"] == 1)
    recorder = RunRecorder(tmp_path / "out", "fedbert")
    run_split_learning(grid, cfg, recorder, num_rounds=2, roster={10: 0, 11: 1})  # node 10 + i runs client i

    rounds = [json.loads(line) for line in (tmp_path / "out" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    r1, r2 = rounds
    assert [e["kind"] for e in r1["events"]] == ["failed"] and r1["events"][0]["client"] == 1
    assert r2["events"] == []
    for r in rounds:
        assert set(r["clients"]) == {"0", "1"}
        for c in r["clients"].values():
            assert 0.0 <= c["accuracy"] <= 1.0 and np.isfinite(c["loss"])
            assert c["uplink_bytes"] == c["uplink_activation_bytes"] + c["uplink_weight_bytes"]
            assert c["downlink_bytes"] == c["downlink_gradient_bytes"] + c["downlink_weight_bytes"]
    bottom_bytes = r2["clients"]["0"]["downlink_weight_bytes"]
    assert bottom_bytes > 0
    for cid in ("0", "1"):
        c = r2["clients"][cid]
        assert c["steps"] == 2 and c["num_examples"] == 16 and c["uplink_weight_bytes"] == bottom_bytes
        assert c["uplink_activation_bytes"] > 0 and c["downlink_gradient_bytes"] > 0
    dropped = r1["clients"]["1"]
    assert dropped["steps"] == 1 and dropped["uplink_weight_bytes"] == 0 and "num_examples" not in dropped
    # The counted bytes are exactly those of the TRAIN messages sent (downlink) ...
    train_down = sum(b for _, t, b in grid.sent if t == MessageType.TRAIN)
    assert train_down == sum(c["downlink_bytes"] for r in rounds for c in r["clients"].values())
    assert sum(grid.received) == sum(c["uplink_bytes"] for r in rounds for c in r["clients"].values())
    # ... and the recorder's comm block sees them.
    summary = recorder.comm_block()
    assert summary["uplink_bytes_per_round"]["total"] > 0
    # The last round also ran each client's global test set through the one global bottom + top:
    # no private part, so every client gets the same numbers; round 1 did not.
    assert not any("global_accuracy" in c for c in r1["clients"].values())
    (acc,) = {c["global_accuracy"] for c in r2["clients"].values()}
    (loss,) = {round(c["global_loss"], 6) for c in r2["clients"].values()}
    assert 0 <= acc <= 1 and loss > 0 and r2["global_accuracy_mean"] == acc
    assert all(c["global_eval_uplink_bytes"] > 0 for c in r2["clients"].values())
    assert recorder.final_scores()["global_mean"] == acc


def test_exchange_falls_back_and_reports_withheld_messages():
    msg = make_message(RecordDict({"config": ConfigRecord({"server-round": 1, "step": 0})}))
    reply = Message(RecordDict(), reply_to=msg)

    class NoPush(_LocalGrid):
        def __init__(self):
            pass

        def push_messages(self, messages):
            raise NotImplementedError

        def send_and_receive(self, messages, *, timeout=None):
            return [reply]

    class Withheld(NoPush):
        def push_messages(self, messages):
            return []  # what a wireless Grid does with a downlink lost under "skip"

    assert split_server.exchange(NoPush(), msg) is reply
    with pytest.raises(split_server._Failed, match="downlink lost"):
        split_server.exchange(Withheld(), msg)


# ---------------------------------------------------------------------------------------
# Aggregation of the bottoms: Flower's rules
# ---------------------------------------------------------------------------------------


def _bottoms(values: list[np.ndarray]) -> list[ArrayRecord]:
    """One bottom per value: two arrays shaped like a (tiny) weight and bias."""
    return [ArrayRecord({"backbone.w": Array(v[:12].reshape(3, 4).astype(np.float32)),
                         "backbone.b": Array(v[12:].astype(np.float32))}) for v in values]


def test_fedavg_of_bottoms_is_the_example_weighted_mean():
    rng = np.random.default_rng(0)
    bottoms, examples = _bottoms([rng.normal(size=16) for _ in range(3)]), [5, 17, 2]
    rule = split_server.aggregation_rule(AggregationConfig(aggregator="fedavg"))
    out = split_server.aggregate_bottoms(rule, 1, list(zip([10, 11, 12], bottoms, examples)))
    assert list(out.keys()) == list(bottoms[0].keys())
    for key in out.keys():
        expected = sum(n * b[key].numpy().astype(np.float64) for b, n in zip(bottoms, examples)) / sum(examples)
        assert out[key].numpy().dtype == np.float32
        np.testing.assert_allclose(out[key].numpy(), expected, rtol=1e-6, atol=1e-7, err_msg=key)
    assert all(len(b) == 2 for b in bottoms)  # the inputs are left whole


def test_median_of_three_bottoms_ignores_an_outlier():
    rng = np.random.default_rng(1)
    honest = [rng.normal(size=16), rng.normal(size=16)]
    bottoms = _bottoms([*honest, np.full(16, 1e6)])
    rule = split_server.aggregation_rule(AggregationConfig(aggregator="median"))
    out = split_server.aggregate_bottoms(rule, 1, list(zip([10, 11, 12], bottoms, [1, 1, 1000])))
    for key in out.keys():
        stacked = np.stack([b[key].numpy() for b in bottoms])
        np.testing.assert_array_equal(out[key].numpy(), np.median(stacked, axis=0))
        assert np.all(out[key].numpy() <= stacked[:2].max(0)) and np.all(out[key].numpy() >= stacked[:2].min(0))


def test_trimmed_mean_of_bottoms_cuts_trim_fraction_at_each_end():
    values = [np.full(16, v) for v in (-1e6, 1.0, 3.0, 1e6)]
    rule = split_server.aggregation_rule(
        AggregationConfig(aggregator="trimmed-mean", trim_fraction=0.25))
    out = split_server.aggregate_bottoms(rule, 1, list(zip([10, 11, 12, 13], _bottoms(values), [1, 1, 1, 1])))
    for key in out.keys():
        np.testing.assert_allclose(out[key].numpy(), 2.0)


def test_split_server_aggregates_with_the_configured_rule(fedbert_methods, tiny_data_dir, tmp_path):
    rc = fedbert_rc(tiny_data_dir, tmp_path)
    rc.update({"aggregator": "median", "min-survivors": 2})
    cfg = RunConfig.from_run_config(rc)
    server = split_server.SplitServer(cfg, RunRecorder(tmp_path / "out", "fedbert"), {10 + i: i for i in range(3)})
    start = {k: v.numpy().copy() for k, v in server.global_bottom.items()}
    shifted = [ArrayRecord({k: Array(v + d) for k, v in start.items()}) for d in (1.0, 2.0, 1e3)]
    rounds = [split_server.ClientRound(node_id=10 + i, bottom=b, num_examples=8) for i, b in enumerate(shifted)]
    server.aggregate(1, rounds[:1])  # one bottom < min-survivors: the global stays
    assert all(np.array_equal(server.global_bottom[k].numpy(), v) for k, v in start.items())
    server.aggregate(1, rounds)
    for key, value in start.items():
        np.testing.assert_allclose(server.global_bottom[key].numpy(), value + 2.0, rtol=1e-6, atol=1e-6)

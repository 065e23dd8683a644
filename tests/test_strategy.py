"""Partial FedAvg: weighted mean over exactly the delivered, valid replies."""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from pwff_app.federation.checks import ExampleBounds
from pwff_app.federation.results import RunRecorder
from pwff_app.federation.roster import RoundSampler
from pwff_app.federation.strategy import PartialFedAvg
from tests.conftest import make_message

SHAPES = {"a.adapter.w": (2, 3), "b.adapter.b": (3,)}


def _arrays(value: float, shapes=SHAPES, dtype=np.float32) -> ArrayRecord:
    return ArrayRecord({k: Array(np.full(s, value, dtype=dtype)) for k, s in shapes.items()})


def _reply(client_id: int, arrays: ArrayRecord, n: int, server_round: int = 1) -> Message:
    request = make_message(RecordDict({"config": ConfigRecord({"server-round": 1})}), MessageType.TRAIN,
                           dst=10 + client_id)
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0}),
                          "info": ConfigRecord({"client-id": client_id, "server-round": server_round,
                                                "compute-s": 0.5, "private-params": 0})})
    return Message(content=content, reply_to=request)


def _strategy(tmp_path) -> PartialFedAvg:
    # Node 10 + i runs client i (as _reply sends); counts up to 100 examples.
    s = PartialFedAvg(recorder=RunRecorder(tmp_path, "pftt"), sampler=RoundSampler({10 + i: i for i in range(10)}, 0, 0, 1),
                      example_bounds=ExampleBounds(train=100, evaluate=100))
    s._global = _arrays(0.0)
    return s


def test_weighted_mean_of_valid_replies_only(tmp_path):
    s = _strategy(tmp_path)
    nan = _arrays(1.0)
    nan["a.adapter.w"] = Array(np.full((2, 3), np.nan, dtype=np.float32))
    wrong_shape = _arrays(1.0, {"a.adapter.w": (3, 2), "b.adapter.b": (3,)})
    extra_key = _arrays(1.0, {**SHAPES, "x.lora_A.default.weight": (2, 2)})
    lost = Message(Error(code=1, reason="lost"), reply_to=_reply(9, _arrays(0), 1))
    replies = [_reply(0, _arrays(1.0), 10), _reply(1, _arrays(4.0), 30), _reply(2, nan, 50),
               _reply(3, wrong_shape, 50), _reply(4, extra_key, 50), _reply(5, _arrays(1.0, dtype=np.float64), 5),
               _reply(6, _arrays(1.0), 50, server_round=7), lost]
    arrays, _ = s.aggregate_train(1, replies)
    expected = (10 * 1.0 + 30 * 4.0) / 40
    for key in SHAPES:
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-6)
    s.aggregate_evaluate(1, [])
    record = json.loads((tmp_path / "rounds.jsonl").read_text().splitlines()[0])
    reasons = [e["reason"] for e in record["events"]]
    assert len(reasons) == 6
    assert any("round 7 in round 1" in r for r in reasons)
    assert any("non-finite" in r for r in reasons) and any("unexpected" in r for r in reasons)
    assert any("float64" in r for r in reasons) and "lost" in reasons
    assert set(record["clients"]) == {"0", "1"}


def test_no_survivor_keeps_global(tmp_path):
    s = _strategy(tmp_path)
    bad = _arrays(1.0, {"a.adapter.w": (1,), "b.adapter.b": (3,)})
    assert s.aggregate_train(1, [_reply(0, bad, 10)]) == (None, None)

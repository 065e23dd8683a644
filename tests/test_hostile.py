"""Hostile and broken clients cannot steer or crash the server (issue 14, part A).

Each hostile reply is rejected with a logged reason and counted in the round's events; the
round goes on and the new global is the aggregate of the honest replies only. Clients 0 and 1
are honest in every run; each other client plays one attack. The task family's cases run the
real ServerApp with a stand-in learner (honest replies in the task client's format, no model:
the server is under test); the instruct and FedBERT cases run their real clients.
"""

from __future__ import annotations

import copy
import io
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from pwff_app.config import RunConfig
from pwff_app.federation.checkpoint import load_checkpoint
from pwff_app.federation.checks import AllClientsFailed
from pwff_app.federation.results import RunRecorder
from pwff_app.federation.roster import answer_query, query_roster
from pwff_app.instruct import runtime, server
from pwff_app.task_tuning.fedbert import server as split_server
from pwff_app.testing.inprocess import InProcessGrid, run_server
from tests.conftest import stand_in_evaluation, tiny_config
from tests.test_pfit import _client_app, _rc, tiny_pfit  # noqa: F401  (tiny_pfit is a fixture)

HONEST = (0, 1)
Attack = Callable[[Message], None]  # edits a reply in place


def _rounds(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def _reasons(record: dict, kind: str) -> dict[int, str]:
    """Client -> reason of the round's events of ``kind``."""
    return {e["client"]: e["reason"] for e in record["events"] if e["kind"] == kind}


def _metric(key: str, value: object) -> Attack:
    def attack(reply: Message) -> None:
        reply.content["metrics"][key] = value
    return attack


def _info(key: str, value: object) -> Attack:
    def attack(reply: Message) -> None:
        reply.content["info"][key] = value
    return attack


def _drop_metric(key: str) -> Attack:
    def attack(reply: Message) -> None:
        del reply.content["metrics"][key]
    return attack


def _metrics_as_strings(reply: Message) -> None:
    # A MetricRecord holds numbers only: a string count can only come in another record type.
    metrics = reply.content["metrics"]
    reply.content["metrics"] = ConfigRecord({k: str(v) for k, v in metrics.items()})


def _no_metrics(reply: Message) -> None:
    del reply.content["metrics"]


def _lying_array(reply: Message) -> None:
    # The Array declares the shared tensor's dtype and shape; its bytes hold one float64.
    arrays = reply.content["arrays"]
    key = next(iter(arrays.keys()))
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(1, dtype=np.float64))
    arrays[key] = Array(dtype=arrays[key].dtype, shape=arrays[key].shape, stype="numpy.ndarray",
                        data=buffer.getvalue())


def _app(handler: Callable[[Message, Context], Message]) -> ClientApp:
    """A ClientApp that answers the start-up query and hands train and evaluate to ``handler``."""
    app = ClientApp()
    app.query()(answer_query)
    app.train()(handler)
    app.evaluate()(handler)
    return app


def _stand_in(msg: Message, context: Context) -> Message:
    """An honest task client without a model: train sends global + (client + 1) / 100."""
    client_id = int(context.node_config["partition-id"])
    info = {"client-id": client_id, "server-round": int(msg.content["config"]["server-round"])}
    if msg.metadata.message_type == MessageType.EVALUATE:
        metrics = stand_in_evaluation(msg, context, accuracy=0.5 + client_id / 100,
                                      global_accuracy=0.25 + client_id / 100)
        return Message(RecordDict({"metrics": MetricRecord(metrics), "info": ConfigRecord(info)}), reply_to=msg)
    arrays = ArrayRecord({k: Array(v.numpy() + (client_id + 1) / 100) for k, v in msg.content["arrays"].items()})
    return Message(RecordDict({
        "arrays": arrays, "metrics": MetricRecord({"num-examples": 10 + client_id, "train-loss": 0.5}),
        "info": ConfigRecord({**info, "compute-s": 0.1, "private-params": 0}),
    }), reply_to=msg)


# client id -> (attack, a piece of the reason it must be rejected with)
TRAIN_ATTACKS: dict[str, dict[int, tuple[Attack, str]]] = {
    "num-examples": {
        2: (_metric("num-examples", 10**12), "'num-examples' = 1000000000000 > bound 32"),
        3: (_metric("num-examples", -50), "outside [1,"),
        4: (_metric("num-examples", 0), "outside [1,"),
        5: (_metric("num-examples", math.nan), "'num-examples' = nan is not an integer"),
        6: (_metrics_as_strings, "metric records []"),
        7: (_metric("num-examples", [10**12]), "is not an integer"),
    },
    "identity": {
        2: (_info("server-round", "1"), "'server-round' = '1' is not an integer"),
        3: (_info("server-round", 2), "reply for round 2 in round 1"),
        4: (_info("server-round", True), "'server-round' = True is not an integer"),
        5: (_info("client-id", 0), "client id 0 from the node of client 5 (spoofed)"),
        6: (_info("client-id", 6.5), "'client-id' = 6.5 is not an integer"),
    },
    "metrics": {
        2: (_drop_metric("train-loss"), "missing ['train-loss']"),
        3: (_metric("train-loss", math.inf), "'train-loss' = inf is not a finite number"),
        4: (_metric("train-loss", -1.0), "'train-loss' = -1.0 outside [0, inf]"),
        5: (_metric("accuracy", 1e9), "unexpected ['accuracy']"),
        6: (_info("compute-s", math.nan), "'compute-s' = nan is not a finite number"),
        7: (_lying_array, "bytes hold float64[1]"),
    },
}


@pytest.mark.parametrize("group", sorted(TRAIN_ATTACKS))
def test_hostile_train_replies_are_rejected_and_only_honest_ones_aggregated(tiny_data_dir, tmp_path, group):
    attacks = TRAIN_ATTACKS[group]
    n = max(attacks) + 1
    rc = tiny_config(tiny_data_dir, tmp_path, run_name=group, num_clients=n, task__num_rounds=1)
    honest: dict[int, tuple[int, dict]] = {}

    def tamper(client_id: int, reply: Message) -> Message:
        if client_id in HONEST:
            arrays = {k: v.numpy().copy() for k, v in reply.content["arrays"].items()}
            honest[client_id] = (int(reply.content["metrics"]["num-examples"]), arrays)
        elif client_id in attacks:
            attacks[client_id][0](reply)
        return reply

    run_server(rc, InProcessGrid(rc, n, app=_app(_stand_in), tamper=tamper))  # never raises on a reply
    (record,) = _rounds(tmp_path / group)
    reasons = _reasons(record, "rejected")
    assert set(reasons) == set(attacks)
    for client_id, (_, expected) in attacks.items():
        assert expected in reasons[client_id], (client_id, reasons[client_id])
        assert "num_examples" not in record["clients"].get(str(client_id), {})
    # The round went on: the new global is the honest clients' FedAvg, nothing else.
    total = sum(count for count, _ in honest.values())
    _, new_global, _ = load_checkpoint(tmp_path / group)
    for key in new_global.keys():
        expected = sum(count * arrays[key].astype(np.float64) for count, arrays in honest.values()) / total
        np.testing.assert_allclose(new_global[key].numpy(), expected, rtol=1e-5, atol=1e-7)


EVAL_ATTACKS: dict[int, tuple[Attack, str]] = {
    2: (_metric("accuracy", 1e9), "'accuracy' = 1000000000.0 outside [0, 1]"),
    3: (_no_metrics, "metric records []"),
    4: (_metric("loss", math.nan), "'loss' = nan is not a finite number"),
    5: (_drop_metric("accuracy"), "missing ['accuracy']"),
    6: (_metric("num-examples", 10**12), "> bound 32"),
    7: (_metric("global-accuracy", 1.5), "'global-accuracy' = 1.5 outside [0, 1]"),
    8: (_metric("shared-only-loss", -1.0), "'shared-only-loss' = -1.0 outside [0, inf]"),
    9: (_drop_metric("shared-only-accuracy"), "missing ['shared-only-accuracy']"),
    10: (_metric("global-loss", math.inf), "'global-loss' = inf is not a finite number"),
}


def test_hostile_evaluate_replies_are_rejected_not_averaged(tiny_data_dir, tmp_path):
    n = max(EVAL_ATTACKS) + 1
    rc = tiny_config(tiny_data_dir, tmp_path, run_name="eval", num_clients=n, task__num_rounds=1)

    def tamper(client_id: int, reply: Message) -> Message:
        if client_id in EVAL_ATTACKS:
            EVAL_ATTACKS[client_id][0](reply)
        return reply

    run_server(rc, InProcessGrid(rc, n, app=_app(_stand_in), tamper=tamper, tamper_types=(MessageType.EVALUATE,)))
    (record,) = _rounds(tmp_path / "eval")
    reasons = _reasons(record, "eval-rejected")
    assert set(reasons) == set(EVAL_ATTACKS)
    for client_id, (_, expected) in EVAL_ATTACKS.items():
        assert expected in reasons[client_id], (client_id, reasons[client_id])
        assert "accuracy" not in record["clients"][str(client_id)]  # trained, but not measured
        assert "global_accuracy" not in record["clients"][str(client_id)]
    honest = [record["clients"][str(c)]["accuracy"] for c in HONEST]
    assert all(0 <= a <= 1 for a in honest) and record["accuracy_mean"] == pytest.approx(np.mean(honest))
    # the last round asked for the global test set: the honest clients' numbers only
    assert record["global_accuracy_mean"] == pytest.approx(np.mean([0.25 + c / 100 for c in HONEST]))
    assert record["shared_only_accuracy_mean"] == pytest.approx(0.3)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())["accuracy"]
    assert set(summary["global_per_client"]) == {str(c) for c in HONEST}
    assert summary["global_mean"] == pytest.approx(record["global_accuracy_mean"])


def test_global_fields_are_refused_where_not_asked_for(tiny_data_dir, tmp_path):
    """Round 1 of 2 evaluates on the own split only: a reply that adds global fields is rejected;
    round 2 asks for them: fedlora (no shared-only view) must not send shared-only fields."""
    rc = tiny_config(tiny_data_dir, tmp_path, run_name="extra", num_clients=3, method="fedlora")

    def tamper(client_id: int, reply: Message) -> Message:
        extra = "global-accuracy" if int(reply.content["info"]["server-round"]) == 1 else "shared-only-accuracy"
        if client_id == 2:
            _metric(extra, 0.5)(reply)
        return reply

    run_server(rc, InProcessGrid(rc, 3, app=_app(_stand_in), tamper_types=(MessageType.EVALUATE,), tamper=tamper))
    first, last = _rounds(tmp_path / "extra")
    assert _reasons(first, "eval-rejected") == {2: "metrics: missing [], unexpected ['global-accuracy']"}
    assert _reasons(last, "eval-rejected") == {2: "metrics: missing [], unexpected ['shared-only-accuracy']"}
    assert last["global_accuracy_mean"] == pytest.approx(np.mean([0.25, 0.26]))  # the honest fedlora replies'
    assert "shared_only_accuracy_mean" not in last


def _deep(reply: Message) -> Message:
    """A copy of a reply as the server receives it (the strategy may edit what it aggregates)."""
    return copy.deepcopy(reply)


def test_instruct_family_rejects_hostile_counts_and_spoofed_ids(tiny_pfit):  # noqa: F811
    """PFIT with the tiny Llama and stub rewards: the new global is the honest replies' aggregate."""
    attacks = {2: (_metric("num-examples", math.nan), "not an integer"),
               3: (_metric("num-examples", 10**12), "> bound 4"),  # instruct.prompts-per-round
               4: (_info("client-id", 0), "(spoofed)")}
    sent, honest = [], []

    def keep_global(msg: Message, context: Context, call_next) -> Message:
        if msg.metadata.message_type == MessageType.TRAIN and not sent:
            sent.append(ArrayRecord(dict(msg.content["arrays"].items())))
        return call_next(msg, context)

    def hostile(client_id: int, reply: Message) -> Message:
        if client_id in attacks:
            attacks[client_id][0](reply)
        else:
            honest.append(_deep(reply))
        return reply

    rc = _rc(tiny_pfit, "pfit", "hostile", num_rounds=1)
    rc["num-clients"] = 5
    grid = InProcessGrid(rc, 5, app=_client_app(mods=[keep_global]), tamper=hostile)
    run_server(rc, grid)
    out = tiny_pfit / "res" / "hostile"
    record = _rounds(out)[1]
    reasons = _reasons(record, "rejected")
    assert set(reasons) == set(attacks)
    assert all(expected in reasons[c] for c, (_, expected) in attacks.items()), reasons
    assert all("reward" in record["clients"][str(c)] for c in range(5))  # evaluated nonetheless
    # The same strategy code, fed the honest replies alone, gives the checkpointed global.
    cfg = RunConfig.from_run_config(rc)
    icfg = cfg.instruct.for_method(cfg.method)
    bundle = runtime.get_bundle(icfg.policy_name, icfg.bundle_lora_rank)
    strategy = server.make_strategy(cfg, icfg, RunRecorder(tiny_pfit / "check", "pfit"), bundle.blocks,
                                    {node: ctx.node_config["partition-id"] for node, ctx in grid.contexts.items()})
    strategy.configure_train(1, sent[0], ConfigRecord(), grid)
    expected, _ = strategy.aggregate_train(1, honest)
    new_global = load_checkpoint(out)[1]
    assert len(honest) == 2 and set(expected.keys()) == set(new_global.keys())
    for key in new_global.keys():
        np.testing.assert_array_equal(new_global[key].numpy(), expected[key].numpy())


def test_fedbert_rejects_hostile_counts_and_spoofed_ids(tiny_data_dir, tmp_path, monkeypatch):
    """Every FedBERT reply is checked: activations (step 0) and the final bottom weights."""
    def final(reply: Message) -> bool:
        return "skipped-backward" in reply.content["metrics"]

    def first(reply: Message) -> bool:
        return reply.content["info"]["step"] == 0

    attacks = {2: (_metric("num-examples", math.nan), first, "not an integer"),
               3: (_metric("num-examples", 10**12), final, "> bound 8"),  # task.max-train-samples
               4: (_info("client-id", 0), first, "(spoofed)")}
    bottoms, honest = [], []
    real_aggregate = split_server.SplitServer.aggregate

    def spy(self, server_round: int, results: list) -> None:
        real_aggregate(self, server_round, results)
        bottoms.append(self.global_bottom)

    monkeypatch.setattr(split_server.SplitServer, "aggregate", spy)

    def hostile(client_id: int, reply: Message) -> Message:
        if client_id in attacks and attacks[client_id][1](reply):
            attacks[client_id][0](reply)
        elif client_id in HONEST and final(reply):
            honest.append((client_id, _deep(reply.content["arrays"]), int(reply.content["metrics"]["num-examples"])))
        return reply

    rc = tiny_config(tiny_data_dir, tmp_path, run_name="fedbert", method="fedbert", num_clients=5, task__num_rounds=1,
                     task__batch_size=8, task__max_train_samples=8, task__max_test_samples=8)
    run_server(rc, InProcessGrid(rc, 5, tamper=hostile))
    (record,) = _rounds(tmp_path / "fedbert")
    failed = _reasons(record, "failed")
    assert set(failed) == set(attacks)
    assert all(expected in failed[c] for c, (_, _, expected) in attacks.items()), failed
    # The new global bottom is Flower's FedAvg of the two honest bottoms.
    rule = split_server.aggregation_rule(RunConfig.from_run_config(rc).aggregation)
    expected = split_server.aggregate_bottoms(rule, 1, honest)
    for key in expected.keys():
        np.testing.assert_array_equal(bottoms[0][key].numpy(), expected[key].numpy())


# ---------------------------------------------------------------------------------------
# The roster and the first-round rule
# ---------------------------------------------------------------------------------------


def test_query_answers_are_validated(tiny_data_dir, tmp_path):
    rc = tiny_config(tiny_data_dir, tmp_path, num_clients=4)
    recorder = RunRecorder(tmp_path / "roster", "pftt")
    # Every node fails the query alike (no query handler): a broken setup, the run stops.
    with pytest.raises(AllClientsFailed, match="the start-up query: all 4 clients failed with the same error"):
        query_roster(InProcessGrid(rc, 4, app=ClientApp()), 4, recorder)

    # Node 40 answers a string, 20 claims 30's id, 10 one out of range: only node 50 is usable.
    claimed = {0: 0, 1: 1, 2: 1, 3: 9, 4: 3}

    def as_string(client_id: int, reply: Message) -> Message:
        if client_id == 0:
            reply.content["info"]["client-id"] = "0"
        return reply

    grid = InProcessGrid(rc, 5, node_config=lambda i: {"partition-id": claimed[i]}, tamper=as_string,
                         tamper_types=(MessageType.QUERY,), node_ids=[40, 30, 20, 10, 50])
    assert query_roster(grid, 4, recorder) == {50: 3}
    events = recorder.end_round(1)["events"]
    assert {e["node"] for e in events} == {40, 30, 20, 10} and {e["kind"] for e in events} == {"query-rejected"}
    reasons = [e["reason"] for e in events]
    assert any("'client-id' = '0' is not an integer" in r for r in reasons)
    assert sum("client id 1 claimed by 2 nodes" in r for r in reasons) == 2  # both claimants are out
    assert any("client id 9 not in [0, 4)" in r for r in reasons)


def _failing_app(reason: Callable[[Message, Context], str]) -> ClientApp:
    """A ClientApp that answers the query but fails every train and evaluate message."""
    def fail(msg: Message, context: Context) -> Message:
        raise RuntimeError(reason(msg, context))
    return _app(fail)


@pytest.mark.parametrize(("method", "dp"), [("pftt", 0.0), ("pftt", 0.5), ("local", 0.0), ("fedbert", 0.0)])
def test_all_clients_failing_round_1_alike_stops_the_run(tiny_data_dir, tmp_path, method, dp):
    # With DP on, Flower's wrapper skips a round with a failed reply before the strategy sees it.
    rc = tiny_config(tiny_data_dir, tmp_path, run_name=method, method=method, num_clients=2, dp__noise_multiplier=dp)
    app = _failing_app(lambda msg, context: "No space left on device\n(while writing a cache)")
    with pytest.raises(AllClientsFailed) as info:
        run_server(rc, InProcessGrid(rc, 2, app=app))
    message = str(info.value)
    assert message.startswith("round 1: all 2 clients failed with the same error: ")
    assert "RuntimeError: No space left on device (while writing a cache)" in message  # the error, on one line
    assert _rounds(tmp_path / method) == []  # stopped at once, not round after round


def test_instruct_family_stops_when_all_fail_round_1_alike(tiny_pfit):  # noqa: F811
    rc = _rc(tiny_pfit, "pfit", "broken")
    with pytest.raises(AllClientsFailed, match="round 1: all 2 clients failed with the same error: RuntimeError: x"):
        run_server(rc, InProcessGrid(rc, 2, app=_failing_app(lambda msg, context: "x")))
    assert [r["round"] for r in _rounds(tiny_pfit / "res" / "broken")] == [0]  # the baseline, then the stop


def test_clients_failing_each_their_own_way_do_not_stop_the_run(tiny_data_dir, tmp_path):
    rc = tiny_config(tiny_data_dir, tmp_path, run_name="own", num_clients=2)
    app = _failing_app(lambda msg, context: f"client {context.node_config['partition-id']} is offline")
    run_server(rc, InProcessGrid(rc, 2, app=app))
    rounds = _rounds(tmp_path / "own")
    assert [r["round"] for r in rounds] == [1, 2]
    assert all("kept-global" in [e["kind"] for e in r["events"]] for r in rounds)

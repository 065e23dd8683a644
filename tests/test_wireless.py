"""Flower glue: the client uplink mod and the server Grid wrapper, with real Messages."""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from pwff_app.wireless import link as wireless
from pwff_app.wireless.channel import ChannelConfig, LinkResult, combine_links, transmit
from pwff_app.wireless.link import (
    DOWNLINK_LOST,
    DOWNLINK_LOST_FLAG,
    NO_STALE_COPY,
    UPLINK_LOST,
    UPLINK_LOST_PREFIX,
    WirelessGrid,
    uplink_mod,
)
from pwff_app.wireless.stats import ClientRound, summarize_round, summary_block

SERVER_NODE = 1


@pytest.fixture(autouse=True)
def server_identity() -> Iterable[None]:
    """Flower sets these in the ServerApp process; Message() needs them to address one."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def run_config(**wireless_keys: object) -> dict:
    """Run config with ``wireless.*`` overrides given as keyword arguments (``_`` for ``-``)."""
    return {"seed": 42, **{f"wireless.{k.replace('_', '-')}": v for k, v in wireless_keys.items()}}


def global_arrays(value: float = 0.5) -> ArrayRecord:
    return ArrayRecord([np.full((64, 32), value, dtype=np.float32), np.arange(10, dtype=np.float32)])


def train_content(server_round: int, arrays: ArrayRecord | None = None, **config: object) -> RecordDict:
    config_record = ConfigRecord({"server-round": server_round, **config})
    return RecordDict({"arrays": global_arrays() if arrays is None else arrays, "config": config_record})


def train_message(
    server_round: int, node_id: int, content: RecordDict | None = None, kind: str = MessageType.TRAIN
) -> Message:
    return Message(content or train_content(server_round), node_id, kind)


def context(partition_id: int, **wireless_keys: object) -> Context:
    node_config = {"partition-id": partition_id}
    return Context(1, 100 + partition_id, node_config, RecordDict(), run_config(**wireless_keys))


class FakeClient:
    """A ClientApp stand-in: replies with arrays + 1, one MetricRecord and ``info``."""

    def __init__(self, compute_s: float = 1.5) -> None:
        self.received: list[Message] = []
        self.compute_s = compute_s

    def __call__(self, msg: Message, ctx: Context) -> Message:
        self.received.append(msg)
        if msg.metadata.message_type == MessageType.EVALUATE:
            return Message(RecordDict({"metrics": MetricRecord({"num-examples": 5, "acc": 0.5})}), reply_to=msg)
        arrays = ArrayRecord([a + 1 for a in msg.content["arrays"].to_numpy_ndarrays()])
        info = ConfigRecord({"client-id": int(ctx.node_config["partition-id"]), "compute-s": self.compute_s})
        metrics = MetricRecord({"num-examples": 10, "loss": 0.1})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics, "info": info}), reply_to=msg)


# ---------------------------------------------------------------------------------------
# The client mod
# ---------------------------------------------------------------------------------------


def test_disabled_mod_passes_everything_through() -> None:
    client = FakeClient()
    replies: list[Message] = []

    def call_next(msg: Message, ctx: Context) -> Message:
        replies.append(client(msg, ctx))
        return replies[-1]

    msg = train_message(1, 100)
    out = uplink_mod(msg, context(0, enabled=False, snr_db="-30"), call_next)
    assert out is replies[0] and client.received[0] is msg
    assert set(out.content.keys()) == {"arrays", "metrics", "info"}


def test_evaluate_messages_bypass_the_channel() -> None:
    client = FakeClient()
    msg = train_message(1, 100, kind=MessageType.EVALUATE)
    ctx = context(0, snr_db="-30")
    out = uplink_mod(msg, ctx, client)
    assert client.received[0] is msg and not out.has_error()
    assert "wireless" not in out.content and len(ctx.state) == 0


def test_uplink_lost_at_very_low_snr() -> None:
    msg = train_message(3, 100)
    out = uplink_mod(msg, context(2, snr_db="-30"), FakeClient(compute_s=2.25))
    assert out.has_error() and out.error.code == UPLINK_LOST
    assert out.metadata.reply_to_message_id == msg.metadata.message_id
    assert out.metadata.src_node_id == 100 and out.metadata.message_type == MessageType.TRAIN
    stats = json.loads(out.error.reason.removeprefix(UPLINK_LOST_PREFIX))
    link = LinkResult.from_record(stats)
    assert not link.delivered and link.client_id == 2 and link.server_round == 3 and link.direction == "up"
    assert stats["compute_s"] == 2.25
    assert link == transmit(link.payload_bits, ChannelConfig(snr_db=(-30.0,)), 2, 3, "up")


def test_uplink_delivered_at_high_snr_keeps_arrays_bit_for_bit() -> None:
    client = FakeClient()
    out = uplink_mod(train_message(1, 100), context(0, snr_db="40"), client)
    assert not out.has_error()
    expected = [a + 1 for a in global_arrays().to_numpy_ndarrays()]
    got = out.content["arrays"].to_numpy_ndarrays()
    assert all(g.tobytes() == e.tobytes() for g, e in zip(got, expected))
    assert len(out.content.array_records) == 1 and len(out.content.metric_records) == 1
    link = LinkResult.from_record(out.content["wireless"])
    assert link.delivered and link.payload_bits == 8 * (64 * 32 + 10) * 4 and link.delay_s > 0
    assert link.energy_j == pytest.approx(0.2 * link.delay_s)


def test_stale_downlink_restores_last_global_model() -> None:
    client = FakeClient()
    ctx = context(0, snr_db="40")
    first = global_arrays(0.25)
    uplink_mod(train_message(1, 100, train_content(1, first)), ctx, client)
    stripped = train_content(2, ArrayRecord(), **{DOWNLINK_LOST_FLAG: True})
    out = uplink_mod(train_message(2, 100, stripped), ctx, client)
    seen = client.received[-1].content
    restored = [a.tobytes() for a in seen["arrays"].to_numpy_ndarrays()]
    assert restored == [a.tobytes() for a in first.to_numpy_ndarrays()]
    assert DOWNLINK_LOST_FLAG not in seen["config"] and seen["config"]["server-round"] == 2
    assert not out.has_error() and LinkResult.from_record(out.content["wireless"]).server_round == 2


def test_stale_downlink_without_a_copy_sits_out() -> None:
    client = FakeClient()
    stripped = train_content(1, ArrayRecord(), **{DOWNLINK_LOST_FLAG: True})
    out = uplink_mod(train_message(1, 100, stripped), context(0), client)
    assert out.has_error() and out.error.code == NO_STALE_COPY and not client.received


def test_realtime_sleeps_the_simulated_delays(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(wireless.time, "sleep", slept.append)
    content = train_content(1, **{wireless.DOWNLINK_DELAY_KEY: 0.125})
    client = FakeClient()
    out = uplink_mod(train_message(1, 100, content), context(0, snr_db="40", realtime=True), client)
    assert slept[0] == 0.125 and slept[1] == LinkResult.from_record(out.content["wireless"]).delay_s
    assert wireless.DOWNLINK_DELAY_KEY not in client.received[0].content["config"]


# ---------------------------------------------------------------------------------------
# The Grid wrapper
# ---------------------------------------------------------------------------------------


class FakeGrid(Grid):
    """In-process Grid: every node runs ``uplink_mod`` around a FakeClient."""

    def __init__(self, partition_of_node: dict[int, int], **wireless_keys: object) -> None:
        self.contexts = {n: context(p, **wireless_keys) for n, p in partition_of_node.items()}
        self.client = FakeClient()
        self.sent: list[Message] = []
        self.marker = "inner"

    def set_run(self, run) -> None:  # noqa: ANN001
        raise NotImplementedError

    @property
    def run(self):  # noqa: ANN201
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:  # noqa: ANN001
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self.sent.extend(messages)
        return [uplink_mod(m, self.contexts[m.metadata.dst_node_id], self.client) for m in messages]


def broadcast(
    server_round: int, nodes: Iterable[int], kind: str = MessageType.TRAIN
) -> tuple[RecordDict, list[Message]]:
    """Like FedAvg: one RecordDict object shared by every node's message."""
    record = train_content(server_round)
    return record, [Message(record, n, kind) for n in nodes]


def make_grid(partition_of_node: dict[int, int], **wireless_keys: object) -> tuple[FakeGrid, WirelessGrid]:
    """A FakeGrid wrapped by a WirelessGrid whose roster is ``partition_of_node`` (as the query finds it)."""
    inner = FakeGrid(partition_of_node, **wireless_keys)
    cfg = ChannelConfig.from_run_config(run_config(**wireless_keys))
    return inner, WirelessGrid(inner, cfg, partition_of_node)


def test_grid_delegates() -> None:
    inner, grid = make_grid({11: 0, 22: 1})
    assert isinstance(grid, Grid)
    assert list(grid.get_node_ids()) == [11, 22] and grid.marker == "inner"
    assert grid.create_message(RecordDict(), MessageType.QUERY, 11, "g").metadata.dst_node_id == 11


def test_stale_downlink_strips_a_copy_and_never_the_shared_record() -> None:
    # Client 0 (node 11) sits at -30 dB, the others at 40 dB; node index = partition id.
    inner, grid = make_grid({11: 0, 22: 1, 33: 2}, snr_db="-30,40,40")
    record, messages = broadcast(1, [11, 22, 33])
    replies = list(grid.send_and_receive(messages))

    by_node = {m.metadata.dst_node_id: m for m in inner.sent}
    assert len(by_node[11].content["arrays"]) == 0 and by_node[11].content["config"][DOWNLINK_LOST_FLAG] is True
    assert by_node[22] is messages[1] and by_node[33] is messages[2]  # delivered: untouched
    assert len(record["arrays"]) == 2 and DOWNLINK_LOST_FLAG not in record["config"]
    # Node 11 never had a global model, so it sits the round out; the others reply.
    codes = {r.metadata.src_node_id: (r.error.code if r.has_error() else None) for r in replies}
    assert codes == {11: NO_STALE_COPY, 22: None, 33: None}

    stats = grid.round_stats(1)
    rows = stats["clients"]
    assert rows["0"]["lost_down"] and not rows["0"]["uplink_attempted"]
    assert rows["1"]["compute_s"] == 1.5 and not rows["1"]["lost_up"]
    for row in rows.values():
        assert row["latency_s"] == pytest.approx(row["delay_down_s"] + row["compute_s"] + row["delay_up_s"])
        assert row["bits_down"] >= 8 * (64 * 32 + 10) * 4
    assert stats["latency_s"] == max(r["latency_s"] for r in rows.values())
    assert stats["lost_down"] == 1 and stats["lost_updates"] == 1 and stats["uplink_attempts"] == 2


def test_stale_client_trains_on_its_last_copy() -> None:
    inner, grid = make_grid({11: 0}, snr_db="40")
    grid.send_and_receive(broadcast(1, [11])[1])
    set_channel(inner, grid, snr_db="-30")
    grid.send_and_receive(broadcast(2, [11])[1])
    seen = inner.client.received[-1].content
    assert seen["config"]["server-round"] == 2 and len(seen["arrays"]) == 2
    assert grid.round_stats(2)["clients"]["0"]["lost_down"]


def test_skip_withholds_the_message_and_answers_with_an_error() -> None:
    inner, grid = make_grid({11: 0, 22: 1}, snr_db="-30,40", downlink_miss="skip")
    _, messages = broadcast(1, [11, 22])
    replies = list(grid.send_and_receive(messages))
    assert [m.metadata.dst_node_id for m in inner.sent] == [22]
    lost = [r for r in replies if r.has_error()]
    assert len(lost) == 1 and lost[0].error.code == DOWNLINK_LOST and lost[0].metadata.src_node_id == 11
    assert lost[0].metadata.message_type == MessageType.TRAIN
    rows = grid.round_stats(1)["clients"]
    # The roster names node 11's client although it never replied (the row was "node-11" before).
    assert rows["0"]["lost_down"] and rows["0"]["latency_s"] == rows["0"]["delay_down_s"]
    assert not rows["1"]["lost_down"]


def set_channel(inner: FakeGrid, grid: WirelessGrid, **wireless_keys: object) -> None:
    """Change the run config on both sides between rounds."""
    for ctx in inner.contexts.values():
        ctx.run_config = run_config(**wireless_keys)
    grid.cfg = ChannelConfig.from_run_config(run_config(**wireless_keys))


def test_uplink_losses_are_logged_from_the_error_reason() -> None:
    inner, grid = make_grid({11: 0, 22: 1}, snr_db="40")
    grid.send_and_receive(broadcast(1, [11, 22])[1])  # clean round: both get a global copy
    # A 1 Gbit/s target over 1 MHz is always in outage: both links fail in round 2.
    set_channel(inner, grid, snr_db="40", loss_model="outage", target_rate_bps=1e9)
    replies = list(grid.send_and_receive(broadcast(2, [11, 22])[1]))
    assert all(r.has_error() and r.error.code == UPLINK_LOST for r in replies)
    stats = grid.round_stats(2)
    assert stats["lost_up"] == 2 and stats["lost_down"] == 2 and stats["lost_updates"] == 2
    assert all(row["compute_s"] == 1.5 and row["delay_up_s"] > 0 for row in stats["clients"].values())
    block = grid.summary_block()
    assert block["rounds"] == 2 and block["uplink_attempts"] == 4 and block["loss_rate"] == 0.5


def test_client_ids_come_from_the_roster_from_round_1() -> None:
    # Partition ids run opposite to the sorted node order: the roster, not the order, keys the draws.
    inner, grid = make_grid({11: 1, 22: 0}, snr_db="40")
    grid.send_and_receive(broadcast(1, [11, 22])[1])
    rounds = grid._rounds
    assert rounds[1][11].down.client_id == 1 and rounds[1][11].client_id == 1
    assert rounds[1][11].down == transmit(rounds[1][11].down.payload_bits, grid.cfg, 1, 1, "down")
    grid.send_and_receive(broadcast(2, [11, 22])[1])
    assert rounds[2][11].down.client_id == 1 and rounds[2][22].down.client_id == 0
    assert set(grid.round_stats(1)["clients"]) == {"0", "1"}


@pytest.mark.parametrize("bad", [{"delay_s": "0"}, {"delay_s": float("nan")}, {"client_id": 0},
                                 {"server_round": 9}, {"bits": -1}, {"delivered": 1}])
def test_a_malformed_uplink_record_is_replaced_by_the_servers_own(bad: dict) -> None:
    """A client's uplink record is input from outside: a bad one never reaches the statistics."""
    _, honest = make_grid({11: 1}, snr_db="40")
    honest.send_and_receive(broadcast(1, [11])[1])
    inner, grid = make_grid({11: 1}, snr_db="40")
    _, messages = broadcast(1, [11])
    replies = list(grid._grid.send_and_receive(grid._downlink(messages)[0]))
    replies[0].content["wireless"] = ConfigRecord({**replies[0].content["wireless"], **bad})
    grid._log_replies(replies)
    # Accounted on the server with the same draws: the row equals the honest one.
    assert grid.round_stats(1)["clients"]["1"] == honest.round_stats(1)["clients"]["1"]


def test_an_uplink_lost_reason_that_is_no_json_is_ignored() -> None:
    inner, grid = make_grid({11: 0}, snr_db="40")
    _, messages = broadcast(1, [11])
    grid._downlink(messages)
    lost = Message(Error(code=UPLINK_LOST, reason=UPLINK_LOST_PREFIX + "{not json"), reply_to=messages[0])
    grid._log_replies([lost])
    assert not grid.round_stats(1)["clients"]["0"]["uplink_attempted"]


def test_evaluate_and_disabled_traffic() -> None:
    inner, grid = make_grid({11: 0}, snr_db="-30")
    _, messages = broadcast(1, [11], kind=MessageType.EVALUATE)
    replies = list(grid.send_and_receive(messages))
    assert inner.sent[0] is messages[0] and not replies[0].has_error()
    assert grid.all_round_stats() == {}

    inner, grid = make_grid({11: 0}, snr_db="-30", enabled=False)
    _, messages = broadcast(1, [11])
    replies = list(grid.send_and_receive(messages))
    assert inner.sent[0] is messages[0] and not replies[0].has_error() and "wireless" not in replies[0].content
    row = grid.round_stats(1)["clients"]["0"]
    assert row["bits_up"] > 0 and row["delay_up_s"] == 0.0 and row["energy_j"] == 0.0 and row["compute_s"] == 1.5


def test_fedavg_runs_over_the_wireless_grid() -> None:
    """FedAvg accepts the extra ConfigRecord and the error replies, and keeps aggregating."""
    inner, grid = make_grid({11: 0, 22: 1, 33: 2}, snr_db="-30,5,40")
    strategy = FedAvg(fraction_evaluate=0.0, min_available_nodes=3)
    result = strategy.start(grid=grid, initial_arrays=global_arrays(0.0), num_rounds=3)
    assert result.arrays is not None
    stats = grid.all_round_stats()
    assert sorted(stats) == [1, 2, 3]
    # Client 0 at -30 dB never gets a model through nor an update back.
    assert all(s["clients"]["0"]["lost_down"] for s in stats.values())
    block = grid.summary_block()
    assert block["config"]["wireless.snr-db"] == "-30,5,40"
    assert block["mean_uplink_delay_s"] > 0 and block["total_energy_j"] > 0


# ---------------------------------------------------------------------------------------
# Pure summaries
# ---------------------------------------------------------------------------------------


def fake_link(
    direction: str, delay_s: float, delivered: bool = True, bits: int = 800, retx_bits: int = 0
) -> LinkResult:
    """A hand-made link: 2 W sender, ``bits`` on the air of which ``retx_bits`` resent."""
    return LinkResult(
        direction=direction, client_id=0, server_round=1, payload_bits=bits - retx_bits, bits=bits,
        retransmitted_bits=retx_bits, packets=1, retransmissions=1 if retx_bits else 0, attempts=1,
        lost_packets=0 if delivered else 1, delay_s=delay_s, energy_j=2 * delay_s, delivered=delivered,
        rate_bps=1e6, capacity_bps=1e6, gain=1.0, snr_db=5.0,
    )  # fmt: skip


def test_summarize_round_and_summary_block_by_hand() -> None:
    r1 = summarize_round(
        [
            ClientRound(11, 0, fake_link("down", 1.0), fake_link("up", 2.0), compute_s=3.0),
            ClientRound(22, 1, fake_link("down", 0.5), fake_link("up", 4.0, delivered=False, retx_bits=800), 1.0),
            ClientRound(33, 2, fake_link("down", 0.1, delivered=False)),  # skip: no uplink
        ]
    )
    assert r1["latency_s"] == 6.0  # client 0: 1 + 3 + 2
    assert r1["mean_delay_up_s"] == 3.0 and r1["uplink_attempts"] == 2
    assert (r1["lost_up"], r1["lost_down"], r1["lost_updates"]) == (1, 1, 2)
    assert r1["energy_j"] == pytest.approx(2 * (1.0 + 2.0 + 0.5 + 4.0 + 0.1))
    r2 = summarize_round([ClientRound(11, 0, fake_link("down", 1.0), fake_link("up", 6.0), compute_s=1.0)])
    block = summary_block({1: r1, 2: r2}, ChannelConfig())
    assert block["mean_uplink_delay_s"] == pytest.approx((3.0 + 6.0) / 2)
    assert block["median_uplink_delay_s"] == 4.0
    assert block["loss_rate"] == pytest.approx(1 / 3) and block["downlink_loss_rate"] == pytest.approx(1 / 4)
    assert block["total_retransmitted_bytes"] == 100.0
    assert block["total_energy_j"] == pytest.approx(r1["energy_j"] + r2["energy_j"])
    assert block["ergodic_uplink_delay_s"] > 0 and block["config"]["wireless.loss-model"] == "packet"
    json.dumps(block)  # summary.json material


def test_combine_links_adds_up_one_rounds_exchanges() -> None:
    a, b = fake_link("up", 2.0, retx_bits=800), fake_link("up", 3.0, delivered=False)
    both = combine_links(a, b)
    assert combine_links(None, a) is a
    assert both.delay_s == 5.0 and both.energy_j == pytest.approx(a.energy_j + b.energy_j)
    assert both.bits == a.bits + b.bits and both.retransmitted_bits == 800 and not both.delivered
    assert both.gain == a.gain and both.rate_bps == a.rate_bps  # the first message's channel
    with pytest.raises(ValueError, match="different"):
        combine_links(a, fake_link("down", 1.0))


def test_split_learning_round_counts_every_exchange() -> None:
    """Several train exchanges per node and round (split learning): the round's stats are their sum."""
    inner, grid = make_grid({11: 0}, snr_db="40")
    single = make_grid({11: 0}, snr_db="40")[1]
    single.send_and_receive(broadcast(1, [11])[1])
    one = single.round_stats(1)["clients"]["0"]
    for _ in range(3):
        grid.send_and_receive(broadcast(1, [11])[1])
    row = grid.round_stats(1)["clients"]["0"]
    assert row["bits_down"] > 2 * one["bits_down"] and row["bits_up"] > 2 * one["bits_up"]
    assert row["compute_s"] == pytest.approx(3 * 1.5)
    assert row["latency_s"] == pytest.approx(row["delay_down_s"] + row["compute_s"] + row["delay_up_s"])
    assert row["delay_up_s"] > one["delay_up_s"]

"""The radio in the running app (in-process, the real ServerApp and ClientApp): deadlines drop
exactly the late updates and the aggregate is the mean of the on-time ones; a 3GPP cell run
records what the issue asks per round and client."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Message

from pwff_app.federation.checkpoint import load_checkpoint
from pwff_app.testing.inprocess import InProcessGrid, run_server
from tests.conftest import tiny_config

FIELDS = ("distance_m", "sinr_db", "mcs", "bandwidth_hz", "bler", "harq_retransmissions", "delay_up_s",
          "delay_down_s", "energy_up_j", "outcome")


def _rounds(path) -> list[dict]:
    return [json.loads(line) for line in (path / "rounds.jsonl").read_text().splitlines()]


def test_the_deadline_drops_exactly_the_late_updates_and_aggregates_the_on_time_ones(tiny_data_dir, tmp_path):
    # No losses, four SNRs: four different air times. Compute time is wall time and varies from
    # run to run, so the test sets every reply's compute-s to 0: only the simulated times count.
    common = dict(num_clients=4, task__num_rounds=1, wireless__enabled=True, wireless__loss_model="none",
                  wireless__snr_db="30,10,0,-5")
    updates: dict[int, tuple[int, dict]] = {}

    def timeless(client_id: int, reply: Message) -> Message:
        reply.content["info"]["compute-s"] = 0.0
        n = int(reply.content["metrics"]["num-examples"])
        updates[client_id] = (n, {k: v.numpy().copy() for k, v in reply.content["arrays"].items()})
        return reply

    free = tiny_config(tiny_data_dir, tmp_path, run_name="free", **common)
    run_server(free, InProcessGrid(free, 4, tamper=timeless))
    arrival = {int(c): row["latency_s"] for c, row in _rounds(tmp_path / "free")[0]["wireless"]["clients"].items()}
    ordered = sorted(arrival.values())
    deadline = (ordered[1] + ordered[2]) / 2  # two on time, two late
    updates.clear()

    rc = tiny_config(tiny_data_dir, tmp_path, run_name="deadline", wireless__deadline_s=deadline, **common)
    run_server(rc, InProcessGrid(rc, 4, tamper=timeless))
    record = _rounds(tmp_path / "deadline")[0]
    wireless = record["wireless"]
    late = {int(c) for c, row in wireless["clients"].items() if row["outcome"] == "late"}
    on_time = {int(c) for c, row in wireless["clients"].items() if row["outcome"] == "delivered"}
    assert late == {c for c, t in arrival.items() if t > deadline} and len(late) == 2
    assert on_time == set(range(4)) - late
    assert wireless["late"] == 2 and wireless["lost_updates"] == 0
    assert wireless["latency_s"] == deadline  # the server stops waiting at the deadline
    failed = [e for e in record["events"] if e["kind"] == "failed"]
    assert sorted(e["client"] for e in failed) == sorted(late) and all("late" in e["reason"] for e in failed)
    # The new global is the (example-weighted) FedAvg of exactly the on-time updates.
    total = sum(updates[c][0] for c in on_time)
    _, new_global, _ = load_checkpoint(tmp_path / "deadline")
    for key in new_global.keys():
        expected = sum(updates[c][0] * updates[c][1][key] for c in on_time) / total
        np.testing.assert_allclose(new_global[key].numpy(), expected, rtol=1e-5, atol=1e-7)
    summary = json.loads((tmp_path / "deadline" / "summary.json").read_text())["wireless"]
    assert summary["late_updates"] == 2
    assert {c: row["updates_late"] for c, row in summary["per_client"].items()} == {
        str(c): int(c in late) for c in range(4)}


def test_a_cell_run_records_the_radio_per_round_and_client(tiny_data_dir, tmp_path):
    rc = tiny_config(tiny_data_dir, tmp_path, run_name="cell", num_clients=4, clients_per_round=2,
                     selection="best-channel", task__num_rounds=2, wireless__enabled=True, wireless__scenario="uma",
                     wireless__allocation="proportional-fair", wireless__bandwidth_hz=20e6, wireless__cell_load=0.0,
                     wireless__downlink_miss="skip")
    run_server(rc, InProcessGrid(rc, 4))
    rounds = [r for r in _rounds(tmp_path / "cell") if r.get("wireless")]
    assert len(rounds) == 2
    for r in rounds:
        rows = r["wireless"]["clients"]
        assert sorted(int(c) for c in rows) == r["sampled"]
        sent = [row for row in rows.values() if row["uplink_attempted"]]
        assert all(row[f] is not None for row in sent for f in FIELDS)
        assert all(row["mcs"] >= 0 and row["distance_m"] > 0 and row["energy_up_j"] > 0 for row in sent)
        if len(sent) == 2:  # both scheduled clients sent: the band is all theirs
            assert sum(row["bandwidth_hz"] for row in sent) == pytest.approx(20e6)
        assert all(row["outcome"] in ("delivered", "late", "lost", "none") for row in rows.values())
    summary = json.loads((tmp_path / "cell" / "summary.json").read_text())["wireless"]
    assert set(summary["per_client"]) == {"0", "1", "2", "3"}
    delivered = [row["updates_delivered"] for row in summary["per_client"].values()]
    jain = summary["fairness"]["jain_updates_delivered"]
    assert jain is None if not any(delivered) else jain == pytest.approx(sum(delivered) ** 2 / (4 * sum(
        d * d for d in delivered)))
    assert summary["config"]["wireless.scenario"] == "uma"

"""The link in the running app: lost updates are skipped, survivors aggregated exactly, and
the learning code cannot tell whether the mod is there."""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Message
from flwr.clientapp import ClientApp

from pwff_app import client_app
from pwff_app.federation.checkpoint import load_checkpoint
from tests.conftest import tiny_config
from pwff_app.testing.inprocess import InProcessGrid, run_server


def test_low_snr_loses_updates_and_aggregates_exactly_the_survivors(tiny_data_dir, tmp_path):
    # Two near clients (30 dB) and two far ones (-10 dB): far uplinks fail their retry budget.
    rc = tiny_config(tiny_data_dir, tmp_path, run_name="lossy", num_clients=4, task__num_rounds=1,
                     wireless__enabled=True, wireless__snr_db="30,30,-10,-10")
    delivered: dict[int, tuple[int, dict]] = {}

    def capture(client_id: int, reply: Message) -> Message:
        n = int(reply.content["metrics"]["num-examples"])
        delivered[client_id] = (n, {k: v.numpy().copy() for k, v in reply.content["arrays"].items()})
        return reply

    run_server(rc, InProcessGrid(rc, 4, tamper=capture))
    record = json.loads((tmp_path / "lossy" / "rounds.jsonl").read_text())
    wireless = record["wireless"]
    assert wireless["lost_updates"] >= 1 and set(delivered) >= {0, 1}
    assert len(delivered) + wireless["lost_updates"] == 4
    failed = [e for e in record["events"] if e["kind"] == "failed"]
    assert len(failed) == wireless["lost_updates"] and all("wireless" in e["reason"] for e in failed)

    total = sum(n for n, _ in delivered.values())
    _, new_global, _ = load_checkpoint(tmp_path / "lossy")
    for key in new_global.keys():
        expected = sum(n * arrays[key] for n, arrays in delivered.values()) / total
        np.testing.assert_allclose(new_global[key].numpy(), expected, rtol=1e-5, atol=1e-7)

    summary = json.loads((tmp_path / "lossy" / "summary.json").read_text())
    assert summary["wireless"]["lost_updates"] == wireless["lost_updates"]
    assert summary["wireless"]["mean_uplink_delay_s"] > 0 and summary["wireless"]["total_energy_j"] > 0


def test_removing_the_mod_gives_identical_training(tiny_data_dir, tmp_path):
    # An ideal-delivery link still accounts delay and energy, but must not touch learning.
    common = dict(num_clients=2, task__num_rounds=2, wireless__enabled=True, wireless__loss_model="none")
    with_mod = tiny_config(tiny_data_dir, tmp_path, run_name="with-mod", **common)
    run_server(with_mod, InProcessGrid(with_mod, 2))

    bare = ClientApp()  # the same learning functions, no mods
    bare.train()(client_app.train)
    bare.evaluate()(client_app.evaluate_)
    bare.query()(client_app.query)  # the start-up query is no learning: it stays
    without = tiny_config(tiny_data_dir, tmp_path, run_name="without-mod", **common)
    run_server(without, InProcessGrid(without, 2, app=bare))

    _, a, _ = load_checkpoint(tmp_path / "with-mod")
    _, b, _ = load_checkpoint(tmp_path / "without-mod")
    for key in a.keys():
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
    rounds = [json.loads(x) for x in (tmp_path / "with-mod" / "rounds.jsonl").read_text().splitlines()]
    assert all(r["wireless"]["latency_s"] > 0 for r in rounds)

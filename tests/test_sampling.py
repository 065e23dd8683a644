"""clients-per-round: each round trains k clients of the roster, drawn from (seed, round) alone."""

from __future__ import annotations

import json

import pytest

from pwff_app.config import ConfigError, RunConfig
from pwff_app.federation.roster import RoundSampler, sample_clients
from pwff_app.testing.inprocess import InProcessGrid, run_server
from tests.conftest import run_config, tiny_config


def test_samples_the_stated_number_reproducibly_per_seed():
    ids = range(100)
    first = sample_clients(ids, 10, seed=1, server_round=3)
    assert len(first) == len(set(first)) == 10 and set(first) <= set(ids)
    assert sample_clients(reversed(ids), 10, seed=1, server_round=3) == first  # order of the roster is irrelevant
    assert sample_clients(ids, 10, seed=2, server_round=3) != first
    assert sample_clients(ids, 10, seed=1, server_round=4) != first
    assert sample_clients(ids, 0, seed=1, server_round=3) == list(ids)
    assert sample_clients(ids, 100, seed=1, server_round=3) == list(ids)


def test_node_ids_do_not_change_the_draw():
    a = RoundSampler({500 + i: i for i in range(20)}, 5, seed=7, last_round=3)
    b = RoundSampler({9000 - i: i for i in range(20)}, 5, seed=7, last_round=3)
    for r in (1, 2):
        assert a.client_ids(a.train_nodes(r)) == b.client_ids(b.train_nodes(r))
        assert len(a.train_nodes(r)) == 5 and a.evaluate_nodes(r) == a.train_nodes(r)
    assert a.evaluate_nodes(0) == a.evaluate_nodes(3) == set(a.roster)  # baseline and last round: everyone


def test_more_than_the_clients_is_refused():
    with pytest.raises(ConfigError, match="'clients-per-round' 5 > 'num-clients' 4"):
        RunConfig.from_run_config(run_config(clients_per_round=5))


@pytest.mark.parametrize("method", ["pftt", "fedbert"])
def test_a_sampled_run_trains_only_the_sampled_and_evaluates_everyone_last(tiny_data_dir, tmp_path, method):
    rc = tiny_config(tiny_data_dir, tmp_path, run_name="sampled", method=method, num_clients=5, clients_per_round=2,
                     task__num_rounds=2)
    run_server(rc, InProcessGrid(rc, 5))
    rounds = [json.loads(line) for line in (tmp_path / "sampled" / "rounds.jsonl").read_text().splitlines()]
    for r in rounds:
        assert r["sampled"] == sample_clients(range(5), 2, seed=42, server_round=r["round"])
        trained = sorted(int(c) for c, v in r["clients"].items() if "uplink_bytes" in v)
        assert trained == r["sampled"]
    assert sorted(int(c) for c, v in rounds[0]["clients"].items() if "accuracy" in v) == rounds[0]["sampled"]
    assert sorted(int(c) for c, v in rounds[-1]["clients"].items() if "accuracy" in v) == list(range(5))
    summary = json.loads((tmp_path / "sampled" / "summary.json").read_text())
    assert sorted(map(int, summary["accuracy"]["per_client"])) == list(range(5))

"""Resume from a checkpoint, hostile replies, robust aggregation: the run goes on."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, Message

from pwff_app.federation.checkpoint import load_checkpoint
from pwff_app.config import ConfigError, RunConfig
from tests.conftest import tiny_config
from pwff_app.testing.inprocess import InProcessGrid, run_server


def _rounds(path) -> list[dict]:
    return [json.loads(line) for line in (path / "rounds.jsonl").read_text().splitlines()]


def test_resumed_run_ends_with_the_same_weights(tiny_data_dir, tmp_path):
    common = dict(client_state_dir=str(tmp_path / "clients"), task__num_rounds=2, num_clients=2)
    full = tiny_config(tiny_data_dir, tmp_path, run_name="full", **common)
    run_server(full, InProcessGrid(full, 2))

    part = tiny_config(tiny_data_dir, tmp_path, run_name="part", **{**common, "task__num_rounds": 1})
    run_server(part, InProcessGrid(part, 2))
    assert load_checkpoint(tmp_path / "part")[0] == 1
    # A fresh process: new node contexts, so private state must come back from disk.
    resumed = tiny_config(tiny_data_dir, tmp_path, run_name="part", resume=True, **common)
    run_server(resumed, InProcessGrid(resumed, 2))

    r_full, a_full, _ = load_checkpoint(tmp_path / "full")
    r_part, a_part, _ = load_checkpoint(tmp_path / "part")
    assert r_full == r_part == 2
    for key in a_full:
        np.testing.assert_array_equal(a_full[key].numpy(), a_part[key].numpy())
    assert [r["round"] for r in _rounds(tmp_path / "part")] == [1, 2]
    acc = lambda p: [r["accuracy_mean"] for r in _rounds(p)]  # noqa: E731
    assert acc(tmp_path / "full") == acc(tmp_path / "part")


def test_resumed_run_with_the_link_on_ends_bit_identical(tiny_data_dir, tmp_path):
    """Node ids are random: each process below sees other ones. The roster keys every fading
    draw by the client from round 1 on, so weights, scores and link statistics all match."""
    common = dict(client_state_dir=str(tmp_path / "clients"), task__num_rounds=2, num_clients=2,
                  wireless__enabled=True, wireless__snr_db="30,8")
    full = tiny_config(tiny_data_dir, tmp_path, run_name="full", **common)
    run_server(full, InProcessGrid(full, 2))
    part = tiny_config(tiny_data_dir, tmp_path, run_name="part", **{**common, "task__num_rounds": 1})
    run_server(part, InProcessGrid(part, 2, node_ids=[77, 33]))  # sorted node order != client order
    resumed = tiny_config(tiny_data_dir, tmp_path, run_name="part", resume=True, **common)
    run_server(resumed, InProcessGrid(resumed, 2, node_ids=[5000, 4000]))

    r_full, a_full, _ = load_checkpoint(tmp_path / "full")
    r_part, a_part, _ = load_checkpoint(tmp_path / "part")
    assert r_full == r_part == 2
    for key in a_full:
        np.testing.assert_array_equal(a_full[key].numpy(), a_part[key].numpy())

    def links(path) -> list[dict]:
        """Each round's per-client link rows, less the node id and the wall-clock compute time."""
        timed = {"node_id", "compute_s", "latency_s"}
        return [{c: {k: v for k, v in row.items() if k not in timed} for c, row in r["wireless"]["clients"].items()}
                for r in _rounds(path)]

    assert [r["accuracy_mean"] for r in _rounds(tmp_path / "full")] == [
        r["accuracy_mean"] for r in _rounds(tmp_path / "part")]
    assert links(tmp_path / "full") == links(tmp_path / "part")
    assert links(tmp_path / "full")[0]["1"]["snr_db"] == 8.0  # client 1's own channel, in round 1 too


def test_resume_without_checkpoint_is_a_clear_error(tiny_data_dir, tmp_path):
    rc = tiny_config(tiny_data_dir, tmp_path, run_name="none", resume=True, num_clients=2)
    with pytest.raises(ConfigError, match="no checkpoint"):
        run_server(rc, InProcessGrid(rc, 2))
    with pytest.raises(ConfigError, match="run-name"):
        RunConfig.from_run_config(tiny_config(tiny_data_dir, tmp_path, resume=True))


def _hostile(client_id: int, reply: Message) -> Message:
    arrays = reply.content["arrays"]
    key = next(iter(arrays.keys()))
    value = arrays[key].numpy().copy()
    if client_id == 1:
        value[0] = np.nan
        arrays[key] = Array(value)
    elif client_id == 2:
        arrays[key] = Array(value + 1e3)
    elif client_id == 3:
        arrays["backbone.encoder.layer.0.attention.self.query.lora_A.default.weight"] = \
            Array(np.ones((8, 384), dtype=np.float32))
    elif client_id == 4:
        arrays[key] = Array(value.reshape(-1)[:-1].copy())
    elif client_id == 5:
        value[..., 0] = np.inf
        arrays[key] = Array(value)
    return reply


def test_hostile_replies_are_rejected_and_the_round_goes_on(tiny_data_dir, tmp_path):
    rc = tiny_config(tiny_data_dir, tmp_path, run_name="hostile", num_clients=6, task__num_rounds=1,
                     max_update_norm=100.0)
    honest_update = {}

    def tamper(client_id: int, reply: Message) -> Message:
        if client_id == 0:
            honest_update.update({k: v.numpy().copy() for k, v in reply.content["arrays"].items()})
        return _hostile(client_id, reply)

    run_server(rc, InProcessGrid(rc, 6, tamper=tamper))
    record = _rounds(tmp_path / "hostile")[0]
    reasons = sorted(e["reason"] for e in record["events"] if e["kind"] == "rejected")
    assert len(reasons) == 5, reasons
    assert any("non-finite" in r for r in reasons) and any("update norm" in r for r in reasons)
    assert any("unexpected" in r and "lora" in r for r in reasons)
    assert any("float32[" in r for r in reasons)
    assert "uplink_bytes" in record["clients"]["0"]
    assert all("uplink_bytes" not in record["clients"].get(c, {}) for c in "12345")
    # The honest round completed: the new global is exactly the one valid update.
    _, new_global, _ = load_checkpoint(tmp_path / "hostile")
    assert set(new_global.keys()) == set(honest_update)
    for key, value in honest_update.items():
        np.testing.assert_allclose(new_global[key].numpy(), value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("aggregator", ["median", "trimmed-mean"])
def test_robust_aggregators_run(tiny_data_dir, tmp_path, aggregator):
    rc = tiny_config(tiny_data_dir, tmp_path, run_name=aggregator, aggregator=aggregator, num_clients=3,
                     task__num_rounds=1, trim_fraction=0.34)
    run_server(rc, InProcessGrid(rc, 3, tamper=lambda c, r: _hostile(2, r) if c == 0 else r))
    _, arrays, _ = load_checkpoint(tmp_path / aggregator)
    # One of three clients shifted every weight of one tensor by 1e3: median/trimmed mean ignore it.
    assert max(float(np.abs(a.numpy()).max()) for a in arrays.values()) < 10
    summary = json.loads((tmp_path / aggregator / "summary.json").read_text())
    assert summary["aggregator"] == aggregator


def test_client_side_dp_clips_each_update_and_noises_the_aggregate(tiny_data_dir, tmp_path):
    rc = tiny_config(tiny_data_dir, tmp_path, run_name="dp", num_clients=2, task__num_rounds=1,
                     dp__noise_multiplier=0.5, dp__clipping_norm=0.01)
    sent: dict[int, dict] = {}
    run_server(rc, InProcessGrid(rc, 2, tamper=lambda c, r: sent.update(
        {c: {k: v.numpy().copy() for k, v in r.content["arrays"].items()}}) or r))
    released = dict(np.load(tmp_path / "dp" / "checkpoint.npz"))
    summary = json.loads((tmp_path / "dp" / "summary.json").read_text())
    assert summary["privacy"] == {"enabled": True, "clipping_norm": 0.01, "noise_multiplier": 0.5,
                                  "num_sampled_clients": 2,
                                  "mechanism": "client-side fixed clipping + Gaussian noise (Flower)"}
    # Reference: what the server sent is the seeded initial global, rebuilt without DP.
    from pwff_app.methods import METHODS
    from pwff_app.task_tuning.model import group_params
    from pwff_app.task_tuning.train import build_model_for
    start = group_params(build_model_for(RunConfig.from_run_config(rc), None), METHODS["pftt"].shared)
    for update in sent.values():
        norm = np.sqrt(sum(np.sum((update[k].astype(np.float64) - start[k]) ** 2) for k in start))
        assert norm <= 0.01 * (1 + 1e-4)
    # Noise: the aggregate is the mean of clipped updates plus N(0, (0.5 * 0.01 / 2)^2).
    mean = {k: (sent[0][k] + sent[1][k]) / 2 for k in start}
    residual = np.concatenate([(released[k] - mean[k]).ravel() for k in start])
    assert abs(residual.std() - 0.5 * 0.01 / 2) < 0.1 * 0.5 * 0.01 / 2

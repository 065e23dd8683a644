"""One real ``flwr run`` of a tiny PFTT config: the path a user takes (and the helpers other e2e tests use)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pwff_app.config import RunConfig
from pwff_app.experiments.launch import free_ports, stop_local_superlink
from pwff_app.provenance import run_key
from tests.conftest import ROOT, run_config


@contextmanager
def private_superlink(flwr_home: Path, data_dir: Path | None, **env_extra: str) -> Iterator[dict[str, str]]:
    """The environment for ``flwr`` commands on our own local SuperLink; it is stopped on exit.

    Own ``FLWR_HOME`` and ports: the default 39091 may belong to another local run.
    """
    http_port, control_port = free_ports(2)
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port), "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
           # `flwr run` starts `flower-superlink` from PATH: this interpreter's, also when the venv is not active.
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]), **env_extra}
    if data_dir is not None:
        env["PWFF_DATA_DIR"] = str(data_dir)
    try:
        yield env
    finally:
        stop_local_superlink(flwr_home)


def flwr(args: list[str], env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    """One ``flwr`` command of this interpreter's environment."""
    return subprocess.run([str(Path(sys.executable).with_name("flwr")), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_args(run_config: str, supernodes: int = 4) -> list[str]:
    """``flwr run`` of this app, streamed, with ``supernodes`` simulated SuperNodes of one CPU each."""
    return ["run", str(ROOT), "--stream", "--federation-config",
            f"num-supernodes={supernodes} client-resources-num-cpus=1", "--run-config", run_config]


def flwr_run(run_config: str, flwr_home: Path, data_dir: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    with private_superlink(flwr_home, data_dir) as env:
        return flwr(run_args(run_config), env, timeout)


@pytest.fixture(scope="module")
def e2e_data_dir(tiny_data_dir: Path) -> Path:
    real = os.environ.get("PWFF_DATA_DIR", "")
    return Path(real) if real and (Path(real) / "ag_news").is_dir() else tiny_data_dir


def test_flwr_run_tiny_pftt(tmp_path, e2e_data_dir):
    results = tmp_path / "results"
    rc = (f"results-dir='{results}' run-name='e2e' task.num-rounds=2 task.max-train-samples=32 "
          "task.max-test-samples=32 task.max-length=32 task.batch-size=16 wireless.enabled=false")
    proc = flwr_run(rc, tmp_path / "flwr-home", e2e_data_dir.resolve())
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f"[pwff] results: {results / 'e2e'}" in out
    assert out.count("[pwff] round") == 2

    summary = json.loads((results / "e2e" / "summary.json").read_text())
    assert summary["method"] == "pftt" and summary["num_rounds"] == 2 and summary["num_clients"] == 4
    # The run key the ServerApp wrote (from its installed copy of the app) is the one `pwff reproduce`
    # computes here for the same config: otherwise every reproduction would rerun every run.
    expected = run_key(RunConfig.from_run_config(run_config(
        data_dir=str(e2e_data_dir.resolve()), task__num_rounds=2, task__max_train_samples=32,
        task__max_test_samples=32, task__max_length=32, task__batch_size=16, wireless__enabled=False)))
    assert summary["run_key"] == expected
    clients = {"0", "1", "2", "3"}
    assert set(summary["accuracy"]["per_client"]) == clients
    assert 0.0 <= summary["accuracy"]["mean"] <= 1.0
    shared_bytes = 4 * summary["params"]["shared"]
    up = summary["comm"]["uplink_bytes_per_round"]
    assert up["per_client"] == {c: shared_bytes for c in clients} and up["total"] == 4 * shared_bytes
    assert set(summary["params"]["private"]) == clients
    rounds = [json.loads(line) for line in (results / "e2e" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(set(r["clients"]) == clients for r in rounds)

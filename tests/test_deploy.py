"""A real deployment on loopback: SuperLink + 2 SuperNodes with TLS and SuperNode authentication,
driven by the scripts in ``deploy/`` (through ``deploy/local_cluster.py``).

One federation serves every check, to keep the cost near that of one 2-round run (each message
starts a fresh ClientApp process that imports torch):

1. run 1: one PFTT round through ``flwr run``;
2. an unregistered SuperNode (a third key, never registered) is refused, within a bounded wait;
3. SuperNode 0 is restarted (new process, same key and ``state-dir``), now with
   ``--isolation process`` and the long-lived ClientApp runner (``deploy/warm_clientapp.py``);
4. run 2: the same run resumed to round 2 with a vanishing learning rate, so the private weights
   a node ends round 2 with are exactly the ones it starts from: they must equal, bit for bit,
   what it wrote after round 1 — before its restart. Node 0's messages (query, train, evaluate)
   all run in the one warm runner process; node 1 stays on Flower's process per message.

Skip with ``PWFF_SKIP_DEPLOY=1``. Data: ``$PWFF_DATA_DIR`` if it holds ``ag_news``, else a
synthetic folder. About 2–3 minutes on 2 cores (the restarted node's runner adds a few seconds:
it imports torch once at start).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, write_ag_news

pytestmark = [
    pytest.mark.skipif(os.environ.get("PWFF_SKIP_DEPLOY") == "1", reason="PWFF_SKIP_DEPLOY=1"),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not found (needed for TLS certificates)"),
    pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not found (needed for SuperNode keys)"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process handling reads /proc"),
]


def _load_local_cluster():
    spec = importlib.util.spec_from_file_location("pwff_local_cluster", ROOT / "deploy" / "local_cluster.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _data_dir(tmp: Path) -> Path:
    real = os.environ.get("PWFF_DATA_DIR", "")
    if real and (Path(real) / "ag_news").is_dir():
        return Path(real).resolve()
    return write_ag_news(tmp / "data")


def _private(state_dir: Path, server_round: int) -> dict[str, np.ndarray]:
    with np.load(state_dir / f"private-{server_round:05d}.npz") as f:
        return {k: f[k] for k in f.files}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_real_deployment_tls_node_auth(tmp_path):
    lc = _load_local_cluster()
    results = tmp_path / "results"
    base = (f"results-dir='{results}' run-name='deploy' task.max-train-samples=16 task.max-test-samples=16 "
            "task.max-length=32 task.batch-size=16 num-clients=2 wireless.enabled=false")
    t0 = time.monotonic()
    cluster = lc.LocalCluster(tmp_path / "cluster", num_nodes=2, data_dir=_data_dir(tmp_path),
                              env={"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")})
    try:
        cluster.prepare(extra_keys=1)  # supernode-2: never registered
        cluster.start_superlink()
        node_ids = cluster.register(cluster.public_keys(2))
        assert len(set(node_ids)) == 2
        intruder = cluster.start_supernode(0, key=cluster.key(2), name="unregistered",
                                           state_dir=tmp_path / "intruder-state",
                                           extra=["--max-retries", "2", "--max-wait-time", "30"])
        cluster.start_supernodes()

        # 1. One round on the real federation.
        run1 = cluster.run(base + " task.num-rounds=1", timeout=420)
        out1 = run1.stdout
        assert run1.returncode == 0, out1[-4000:]
        assert out1.count("[pwff] round") == 1, out1[-4000:]
        assert f"[pwff] results: {results / 'deploy'}" in out1

        # 2. The unregistered SuperNode was refused and gave up by itself.
        deadline = time.monotonic() + 60
        while intruder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        log = intruder.log_text()
        assert intruder.poll() is not None, "unregistered SuperNode still running after 60 s:\n" + log[-2000:]
        assert intruder.popen.returncode != 0, log[-2000:]
        assert "Failed to activate SuperNode" in log, log[-2000:]
        assert "SuperNode ID:" not in log, log[-2000:]
        assert "No SuperNode found with the given public key" in cluster.superlink.log_text()

        # 3. Restart SuperNode 0: a new process, same key, same state-dir; warm ClientApp runner.
        states = [cluster.state_dir(i) for i in range(2)]
        digests = {i: _sha256(s / "private-00001.npz") for i, s in enumerate(states)}
        old_pid = cluster.supernodes["supernode-0"].pid
        cluster.stop_supernode("supernode-0")
        log_before = len(cluster.supernodes["supernode-0"].log_text())
        restarted = cluster.start_supernode(0, isolation="process")
        assert restarted.pid != old_pid
        cluster.wait_connected([restarted])

        # 4. Resume to round 2. A run is a new Flower context, and the restarted node lost its memory:
        # the private weights can only come from state-dir. With lr ~ 0 round 2 must leave them as read.
        run2 = cluster.run(base + " task.num-rounds=2 resume=true task.lr=1e-45", timeout=420)
        out2 = run2.stdout
        assert run2.returncode == 0, out2[-4000:]
        assert "[pwff] resuming" in out2 and out2.count("[pwff] round") == 1, out2[-4000:]
        # Node 0 served run 2 from its one runner process: no flwr-clientapp was started for it.
        log0 = restarted.log_text()[log_before:]
        served = re.findall(r"\[warm-clientapp\] task \d+ \((\w+)\) (\w+) in", log0)
        assert sorted(served) == [("evaluate", "completed"), ("query", "completed"),
                                  ("train", "completed")], log0[-3000:]
        assert "Start `flwr-clientapp` process" not in log0, log0[-3000:]
    finally:
        cluster.close()
        elapsed = time.monotonic() - t0

    # Every process we started is gone.
    procs = [cluster.superlink, *cluster.supernodes.values()]
    assert all(p.popen.poll() is not None for p in procs)
    assert not lc._alive({pid: s for p in procs for pid, s in p.known.items()})

    summary = json.loads((results / "deploy" / "summary.json").read_text())
    assert summary["method"] == "pftt" and summary["num_rounds"] == 2 and summary["num_clients"] == 2
    assert set(summary["accuracy"]["per_client"]) == {"0", "1"}
    assert 0.0 <= summary["accuracy"]["mean"] <= 1.0
    rounds = [json.loads(line) for line in (results / "deploy" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]

    for i, state in enumerate(states):
        assert sorted(p.name for p in state.glob("private-*.npz")) == ["private-00001.npz", "private-00002.npz"]
        assert _sha256(state / "private-00001.npz") == digests[i]  # not rewritten by run 2
        before, after = _private(state, 1), _private(state, 2)
        assert before and set(before) == set(after)
        for k in before:
            assert before[k].dtype == after[k].dtype and before[k].tobytes() == after[k].tobytes(), (i, k)
    print(f"\n[deploy] federation up, 2 runs, down: {elapsed:.0f} s")

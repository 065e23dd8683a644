#!/usr/bin/env python3
"""A real pwff federation on one machine: SuperLink + N SuperNodes over loopback, TLS and
SuperNode authentication on, driven by the same scripts a user runs on real devices.

As a command (from the repository root, in the app's virtual environment)::

    python deploy/local_cluster.py --nodes 2 --workdir ~/.pwff/local-cluster \\
        --data-dir "$PWFF_DATA_DIR" --run-config "task.num-rounds=2 wireless.enabled=false"

makes certificates and keys (kept in the work dir and reused), starts the SuperLink, registers
the SuperNodes' keys, starts the SuperNodes, runs ``flwr run`` and stops every process it started.
``--keep-up`` leaves the federation running until Ctrl-C so you can ``flwr run`` against it
yourself (the connection is printed). ``--isolation process`` starts each SuperNode with
``--isolation process`` and one long-lived ClientApp runner beside it (``deploy/warm_clientapp.py``,
through ``start-supernode.sh --warm-clientapp``) instead of a fresh ``flwr-clientapp`` process per
message; it is stopped with everything else. From Python (what ``tests/test_deploy.py`` does)::

    with LocalCluster(workdir, num_nodes=2, data_dir=...) as cluster:
        cluster.prepare()
        cluster.start_superlink()
        cluster.register(cluster.public_keys())
        cluster.start_supernodes()
        proc = cluster.run("num-clients=2 ...")

Every process is started in its own session and ended by PID, together with every descendant
it spawned (SuperExec, ServerApp, ClientApp processes live in sessions of their own): SIGTERM,
then SIGKILL after a timeout. ``close()`` (also on ``with`` exit, on an exception or on SIGTERM
to the command) stops everything still running. Ports are picked free at start-up.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pwff_app.experiments.launch import free_ports

DEPLOY_DIR = Path(__file__).resolve().parent
APP_DIR = DEPLOY_DIR.parent
CONNECTION = "pwff-local"
# subprocess: Flower's default, a fresh flwr-clientapp process per message (spawned by the
# SuperNode's SuperExec). process: the SuperNode runs --isolation process and one long-lived
# ClientApp runner per SuperNode (deploy/warm_clientapp.py) serves all its messages.
ISOLATIONS = ("subprocess", "process")


# ---- processes ------------------------------------------------------------------------------

def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time in clock ticks) of a live process, None if it is gone (or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[19])


def _tree(root: int) -> dict[int, int]:
    """{pid: start time} of ``root`` and all its live descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            children.setdefault(st[0], []).append(int(entry.name))
            starts[int(entry.name)] = st[1]
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in starts and pid not in out:
            out[pid] = starts[pid]
            todo.extend(children.get(pid, []))
    return out


def _signal_tree(tree: dict[int, int], sig: int) -> None:
    for pid, start in tree.items():
        st = _stat(pid)
        if st is None or st[1] != start:  # gone, or the PID was reused
            continue
        try:
            if os.getpgid(pid) == pid:  # a session/group leader we (transitively) started
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _alive(tree: dict[int, int]) -> dict[int, int]:
    return {pid: s for pid, s in tree.items() if (st := _stat(pid)) is not None and st[1] == s}


@dataclass
class Proc:
    """A process we started (own session), its log and how to end it."""

    name: str
    popen: subprocess.Popen
    log: Path
    known: dict[int, int] = field(default_factory=dict)  # descendants seen so far

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        if self.popen.poll() is None:
            self.known.update(_tree(self.pid))  # remember children before they get re-parented
        return self.popen.poll()

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the process and its descendants, SIGKILL what is left after ``timeout``."""
        tree = {**self.known, **_tree(self.pid)}
        _signal_tree(tree, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tree.update(_tree(self.pid))  # children spawned while shutting down
            if self.popen.poll() is not None and not _alive(tree):
                break
            time.sleep(0.2)
        self.known.update(tree)
        left = _alive(tree)
        if left:
            _signal_tree(left, signal.SIGKILL)
        try:
            return self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


# ---- the cluster ----------------------------------------------------------------------------

class ClusterError(RuntimeError):
    pass


class LocalCluster:
    """SuperLink + SuperNodes on this machine, everything under ``workdir``.

    Layout: ``certs/`` (CA + server certificate), ``keys/`` (``supernode-<i>`` key pairs),
    ``flwr-home/`` (FLWR_HOME of the ``flwr`` CLI and the SuperLink, with the connection),
    ``supernode-<i>/`` (FLWR_HOME of SuperNode i), ``state/node-<i>/`` (node config
    ``state-dir``), ``logs/``, ``results/``.
    """

    def __init__(self, workdir: Path | str, num_nodes: int = 2, *, app_dir: Path | str = APP_DIR,
                 data_dir: Path | str | None = None, host: str = "127.0.0.1",
                 connection: str = CONNECTION, env: dict[str, str] | None = None,
                 isolation: str = "subprocess") -> None:
        if isolation not in ISOLATIONS:
            raise ClusterError(f"isolation must be one of {ISOLATIONS}, not {isolation!r}")
        self.isolation = isolation
        self.workdir = Path(workdir).resolve()
        self.num_nodes = num_nodes
        self.app_dir = Path(app_dir).resolve()
        self.host = host
        self.connection = connection
        self.certs = self.workdir / "certs"
        self.keys = self.workdir / "keys"
        self.logs = self.workdir / "logs"
        self.flwr_home = self.workdir / "flwr-home"
        self.results = self.workdir / "results"
        if self.workdir == self.app_dir or self.app_dir in self.workdir.parents:
            # `flwr run` packs *.py/*.toml/*.json/... of the app folder into the FAB it ships.
            raise ClusterError(f"workdir {self.workdir} is inside the app folder {self.app_dir}: "
                               "its files would be packed into the app; pick a folder outside it")
        self.superlink: Proc | None = None
        self.supernodes: dict[str, Proc] = {}
        self.port: int | None = None
        bindir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
            "FLWR_HOME": str(self.flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            **(env or {}),
        }
        if data_dir is not None:
            self.env["PWFF_DATA_DIR"] = str(Path(data_dir).resolve())
        for d in (self.logs, self.results):
            d.mkdir(parents=True, exist_ok=True)

    # -- helpers --
    def _script(self, name: str, *args: str | Path, env: dict[str, str] | None = None,
                timeout: float = 120) -> str:
        cmd = ["bash", str(DEPLOY_DIR / name), *map(str, args)]
        proc = subprocess.run(cmd, env=env or self.env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise ClusterError(f"{name} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
        return proc.stdout

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> Proc:
        log = self.logs / f"{name}.log"
        with log.open("ab") as f:
            popen = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.workdir)
        return Proc(name, popen, log)

    def state_dir(self, i: int) -> Path:
        return self.workdir / "state" / f"node-{i}"

    def key(self, i: int) -> Path:
        return self.keys / f"supernode-{i}"

    def public_keys(self, n: int | None = None) -> list[Path]:
        return [self.key(i).with_suffix(".pub") for i in range(self.num_nodes if n is None else n)]

    @property
    def address(self) -> str:
        if self.port is None:
            raise ClusterError("SuperLink not started")
        return f"{self.host}:{self.port}"

    # -- steps --
    def prepare(self, extra_keys: int = 0) -> None:
        """Certificates (SAN: localhost, 127.0.0.1, ::1, host), node keys, nothing started."""
        if not (self.certs / "ca.crt").is_file():
            self._script("make-certs.sh", self.certs, self.host)
        self._script("make-node-keys.sh", self.keys, self.num_nodes + extra_keys)

    def start_superlink(self, timeout: float = 90) -> Proc:
        self.port = free_ports(1, self.host)[0]
        self._script("add-connection.sh", self.connection, self.address, self.certs / "ca.crt")
        cmd = ["bash", str(DEPLOY_DIR / "start-superlink.sh"), "--certs", str(self.certs),
               "--host", self.host, "--port", str(self.port)]
        self.superlink = self._spawn("superlink", cmd, self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.superlink.poll() is not None:
                raise ClusterError(f"SuperLink exited ({self.superlink.popen.returncode}):\n"
                                   + self.superlink.log_text()[-3000:])
            if "Uvicorn running on" in self.superlink.log_text() and _port_open(self.host, self.port):
                return self.superlink
            time.sleep(0.5)
        raise ClusterError(f"SuperLink not up after {timeout:.0f} s:\n" + self.superlink.log_text()[-3000:])

    def register(self, public_keys: list[Path]) -> list[int]:
        """``flwr supernode register`` each key (via register-nodes.sh); the new node ids."""
        out = self._script("register-nodes.sh", self.connection, *public_keys)
        ids = [int(x) for x in re.findall(r"SuperNode (\d+) registered", out)]
        if len(ids) != len(public_keys):
            raise ClusterError(f"expected {len(public_keys)} registrations, got:\n{out}")
        return ids

    def start_supernode(self, partition_id: int, *, key: Path | None = None, num_partitions: int | None = None,
                        name: str | None = None, state_dir: Path | None = None,
                        extra: list[str] | None = None, isolation: str | None = None) -> Proc:
        """Start a SuperNode through start-supernode.sh (does not wait for it to connect).

        ``isolation`` overrides the cluster's for this node (``"process"``: ``--warm-clientapp``).
        """
        isolation = isolation or self.isolation
        if isolation not in ISOLATIONS:
            raise ClusterError(f"isolation must be one of {ISOLATIONS}, not {isolation!r}")
        name = name or f"supernode-{partition_id}"
        old = self.supernodes.get(name)
        if old is not None and old.poll() is None:
            raise ClusterError(f"{name} is still running")
        port = free_ports(1)[0]
        cmd = ["bash", str(DEPLOY_DIR / "start-supernode.sh"), str(partition_id),
               str(num_partitions or self.num_nodes), "--superlink", self.address,
               "--ca", str(self.certs / "ca.crt"), "--key", str(key or self.key(partition_id)),
               "--port", str(port), "--state-dir", str(state_dir or self.state_dir(partition_id)),
               *(["--warm-clientapp"] if isolation == "process" else []), *(extra or [])]
        env = {**self.env, "FLWR_HOME": str(self.workdir / name)}
        proc = self._spawn(name, cmd, env)
        self.supernodes[name] = proc
        return proc

    def start_supernodes(self, timeout: float = 90) -> list[Proc]:
        procs = [self.start_supernode(i) for i in range(self.num_nodes)]
        self.wait_connected(procs, timeout)
        return procs

    @staticmethod
    def wait_connected(procs: list[Proc], timeout: float = 90) -> None:
        """Until each SuperNode logged its node id (it authenticated and was activated)."""
        deadline = time.monotonic() + timeout
        waiting = list(procs)
        while waiting and time.monotonic() < deadline:
            for p in list(waiting):
                text = p.log_text()
                if "SuperNode ID:" in text.split("Starting Flower SuperNode")[-1]:
                    waiting.remove(p)
                elif p.poll() is not None:
                    raise ClusterError(f"{p.name} exited ({p.popen.returncode}):\n{text[-3000:]}")
            time.sleep(0.5)
        if waiting:
            raise ClusterError(f"not connected after {timeout:.0f} s: {[p.name for p in waiting]}")

    def stop_supernode(self, name: str, timeout: float = 15) -> int | None:
        return self.supernodes[name].stop(timeout)

    def run(self, run_config: str, timeout: float = 600, echo: bool = False) -> subprocess.CompletedProcess:
        """``flwr run APP CONNECTION --stream --run-config ...``; output also in logs/flwr-run-<k>.log.

        On timeout the ``flwr`` process tree is stopped and ``returncode`` is 124.
        """
        k = len(list(self.logs.glob("flwr-run-*.log")))
        log = self.logs / f"flwr-run-{k}.log"
        cmd = [str(Path(sys.executable).with_name("flwr")), "run", str(self.app_dir), self.connection,
               "--stream", "--run-config", run_config]
        popen = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, text=True, start_new_session=True, cwd=self.workdir)
        proc = Proc(f"flwr-run-{k}", popen, log)
        lines: list[str] = []

        def pump() -> None:
            assert popen.stdout is not None
            with log.open("w") as f:
                for line in popen.stdout:
                    lines.append(line)
                    f.write(line)
                    f.flush()
                    if echo:
                        sys.stdout.write(line)
                        sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.stop()
            rc = 124
        except BaseException:
            proc.stop()
            raise
        reader.join(timeout=10)
        return subprocess.CompletedProcess(cmd, rc, "".join(lines), "")

    def close(self, timeout: float = 15) -> None:
        """Stop every SuperNode, then the SuperLink (each with all its descendants)."""
        for proc in list(self.supernodes.values()):
            proc.stop(timeout)
        if self.superlink is not None:
            self.superlink.stop(timeout)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- command line ---------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run pwff on a loopback federation (SuperLink + N SuperNodes, TLS + node auth).")
    parser.add_argument("--nodes", type=int, default=2, help="number of SuperNodes (= num-clients), default 2")
    parser.add_argument("--workdir", default=str(Path.home() / ".pwff" / "local-cluster"),
                        help="certificates, keys, logs, state, results; reused across calls; must be "
                             "outside the app folder (default ~/.pwff/local-cluster)")
    parser.add_argument("--data-dir", default=os.environ.get("PWFF_DATA_DIR"),
                        help="local AG News folder, given to the SuperNodes as PWFF_DATA_DIR (default: $PWFF_DATA_DIR)")
    parser.add_argument("--app", default=str(APP_DIR), help="the Flower app to run (default: this repository)")
    parser.add_argument("--run-config", default=None,
                        help="passed to `flwr run --run-config`; num-clients and results-dir are added "
                             "unless given. Without it (and with --keep-up) nothing is run.")
    parser.add_argument("--keep-up", action="store_true",
                        help="after the run (or instead of it) keep the federation up until Ctrl-C")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds for the run (default 3600)")
    parser.add_argument("--isolation", choices=ISOLATIONS, default="subprocess",
                        help="subprocess (Flower's default): a fresh ClientApp process per message; "
                             "process: one long-lived ClientApp runner per SuperNode "
                             "(deploy/warm_clientapp.py), imports and model caches kept across messages")
    args = parser.parse_args(argv)
    if args.run_config is None and not args.keep_up:
        parser.error("give --run-config, --keep-up, or both")

    # SIGTERM (e.g. from a job runner) takes the same path as Ctrl-C: the finally below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    cluster = LocalCluster(args.workdir, args.nodes, app_dir=args.app, data_dir=args.data_dir or None,
                           isolation=args.isolation)
    try:
        cluster.prepare()
        cluster.start_superlink()
        print(f"SuperLink on {cluster.address} (logs in {cluster.logs})", flush=True)
        cluster.register(cluster.public_keys())
        cluster.start_supernodes()
        print(f"{args.nodes} SuperNodes connected (isolation: {args.isolation})", flush=True)
        rc = 0
        if args.run_config is not None:
            run_config = args.run_config
            if "num-clients" not in run_config:
                run_config += f" num-clients={args.nodes}"
            if "results-dir" not in run_config:
                run_config += f" results-dir='{cluster.results}'"
            rc = cluster.run(run_config, timeout=args.timeout, echo=True).returncode
        if args.keep_up:
            print(f"\nFederation up. In another shell:\n"
                  f"  export FLWR_HOME={cluster.flwr_home}\n"
                  f"  flwr run {cluster.app_dir} {cluster.connection} --stream "
                  f"--run-config \"num-clients={args.nodes} results-dir='{cluster.results}'\"\n"
                  "Ctrl-C here stops everything.", flush=True)
            while True:
                time.sleep(3600)
        return rc
    except KeyboardInterrupt:
        return 130
    finally:
        cluster.close()
        print("stopped SuperNodes and SuperLink", flush=True)


if __name__ == "__main__":
    sys.exit(main())

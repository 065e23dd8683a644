"""One ``flwr run`` of this app on a private local SuperLink, and stopping that SuperLink.

``flwr run`` against a local federation starts a detached SuperLink on Flower's fixed ports
(127.0.0.1:39091) and leaves it running. Here every launch gets its own ``FLWR_HOME`` and, via
``ports``, its own SuperLink ports, so runs never land on another user's SuperLink and ours can
be stopped without touching theirs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

def federation_config(num_supernodes: int = 4, client_cpus: float = 1, client_gpus: float = 0) -> str:
    """Flower's simulation resources: ``client_gpus`` = 0.25 lets four simulated clients share one GPU."""
    text = f"num-supernodes={num_supernodes} client-resources-num-cpus={client_cpus:g}"
    return text + (f" client-resources-num-gpus={client_gpus:g}" if client_gpus else "")


FEDERATION_CONFIG = federation_config()  # the default job's: 4 clients, 1 CPU each


def _ancestors(pid: int) -> set[int]:
    """``pid`` and every process above it."""
    out = set()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return out


def stop_local_superlink(flwr_home: Path) -> list[int]:
    """End every process of this ``FLWR_HOME``: the detached local SuperLink that ``flwr run``
    left running, its SuperExec, and a simulation (with its Ray workers) that outlived a timeout.
    Matches a SuperLink or SuperExec with the FLWR_HOME path in its command line, and any process
    with this FLWR_HOME in its environment, so other users' SuperLinks are untouched, and never this process or its parents. Returns the PIDs signalled."""
    home = str(Path(flwr_home).resolve())
    spared = _ancestors(os.getpid())
    marker = f"FLWR_HOME={home}".encode()
    killed = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in spared:
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            mine = (home.encode() in cmdline and (b"superlink" in cmdline or b"superexec" in cmdline)) or (
                marker in (proc / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if mine:
            try:
                os.kill(int(proc.name), signal.SIGTERM)
                killed.append(int(proc.name))
            except (ProcessLookupError, PermissionError):
                pass
    return killed


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports that were free a moment ago (the kernel's ephemeral picks).

    All ``n`` sockets are held open together, so the kernel cannot hand out one port twice.
    """
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def launch_flwr_run(app_dir: Path, run_config: str, flwr_home: Path, log_path: Path,
                    data_dir: Path | None, timeout_s: float, ports: tuple[int, int] | None = None,
                    resources: str = FEDERATION_CONFIG) -> int:
    """One ``flwr run <app> --stream`` with a private FLWR_HOME; output goes to ``log_path``.

    ``ports`` (SuperLink HTTP API, control API) moves the local SuperLink off Flower's fixed
    127.0.0.1:39091: without it, ``flwr run`` silently submits to whichever local SuperLink
    another user or test already started there (and we could not stop ours safely).
    ``resources``: the ``--federation-config`` (:func:`federation_config`).

    Returns the exit status (124 on timeout; the SuperLink is then stopped so the next run
    starts clean)."""
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    if ports:
        env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"], env["FLWR_LOCAL_CONTROL_API_PORT"] = map(str, ports)
    if data_dir is not None:
        env["PWFF_DATA_DIR"] = str(Path(data_dir).resolve())
    flwr = Path(sys.executable).with_name("flwr")
    cmd = [str(flwr) if flwr.exists() else "flwr", "run", str(Path(app_dir).resolve()), "--stream",
           "--federation-config", resources, "--run-config", run_config]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    flwr_home.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                  timeout=timeout_s, cwd=str(flwr_home))
            return proc.returncode
        except subprocess.TimeoutExpired:
            log.write(f"\n[pwff reproduce] timed out after {timeout_s:.0f} s\n")
            stop_local_superlink(flwr_home)
            return 124


def log_tail(path: Path, n: int = 3) -> str:
    """The last ``n`` non-blank lines of a run log, joined, at most 300 characters: why it failed."""
    try:
        lines = [ln for ln in path.read_text(errors="ignore").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[-300:]

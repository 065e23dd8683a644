"""One ``device`` and one ``precision`` setting, honoured by FedBERT and the instruct family.

Tiny models on the CPU (it runs bf16 autocast too): explicit settings are accepted, both sides
run, trainable parameters and optimizer state stay float32, and what leaves a process is
float32 numpy with float32's byte count whatever the precision.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, RecordDict

from pwff_app.config import ConfigError, RunConfig
from pwff_app.device import placement
from pwff_app.federation.results import RunRecorder
from pwff_app.instruct import client, runtime
from pwff_app.instruct.policy import trainable_state
from pwff_app.task_tuning.fedbert import client as split
from pwff_app.task_tuning.fedbert.server import SplitServer
from tests.conftest import make_context, make_message, run_config, tiny_config
from tests.test_pfit import _rc, tiny_pfit  # noqa: F401  (tiny_pfit is a fixture)
from tests.test_split import _LocalGrid

CPU = torch.device("cpu")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _float_dtypes(arrays: ArrayRecord) -> set[str]:
    return {a.dtype for a in arrays.values() if a.dtype.startswith(("float", "bfloat"))}


def _check_placed(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """On the CPU; frozen parameters in ``dtype``, trainable ones and layer norms float32."""
    norms = {id(p) for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    for p in model.parameters():
        assert p.device == CPU
        assert p.dtype == (dtype if not p.requires_grad and id(p) not in norms else torch.float32)


def _fp32_state(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every moment the optimizer holds is float32 (its step counters are scalars)."""
    moments = [v for state in optimizer.state.values() for v in state.values() if v.dim() > 0]
    return bool(moments) and all(v.dtype == torch.float32 for v in moments)


# ---------------------------------------------------------------------------------------
# The config
# ---------------------------------------------------------------------------------------


@no_cuda
def test_auto_is_the_cpu_in_fp32_here() -> None:
    assert placement("auto", "auto") == (CPU, torch.float32)
    assert placement("cpu", "bf16") == (CPU, torch.bfloat16)


@pytest.mark.parametrize("method", ["fedbert", "pfit", "shepherd"])
@pytest.mark.parametrize("settings", [{"device": "cpu"}, {"precision": "bf16"}, {"device": "cpu", "precision": "fp32"}])
def test_explicit_device_and_precision_are_accepted(method: str, settings: dict) -> None:
    cfg = RunConfig.from_run_config({**run_config(method=method), **settings})
    assert (cfg.device, cfg.precision) == (settings.get("device", "auto"), settings.get("precision", "auto"))


@no_cuda
@pytest.mark.parametrize("method", ["fedbert", "pfit"])
def test_cuda_without_cuda_is_still_one_line(method: str) -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_run_config(run_config(method=method, device="cuda", precision="bf16"))
    assert str(info.value).splitlines() == [
        "run config: 'device' is 'cuda' but this machine has 0 CUDA device(s): use 'auto' or 'cpu'"]


# ---------------------------------------------------------------------------------------
# FedBERT: both sides, one client, one round
# ---------------------------------------------------------------------------------------


class _Recording(_LocalGrid):
    """:class:`_LocalGrid` that keeps the float dtypes of every message and reply."""

    def __init__(self, rc: dict, num_nodes: int) -> None:
        super().__init__(rc, num_nodes)
        self.dtypes: set[str] = set()

    def push_messages(self, messages):
        ids = super().push_messages(messages)
        for content in [m.content for m in messages] + [self.replies[i].content for i in ids]:
            for record in content.array_records.values():
                self.dtypes |= _float_dtypes(record)
        return ids


def _fedbert_round(tiny_data_dir, tmp_path, train: str, precision: str) -> tuple[dict, _Recording, SplitServer]:
    rc = tiny_config(tiny_data_dir, tmp_path / precision, method="fedbert", num_clients=1, task__batch_size=8,
                     task__max_train_samples=16, task__max_test_samples=16, device="cpu", precision=precision,
                     fedbert__train=train)
    cfg = RunConfig.from_run_config(rc)
    grid = _Recording(rc, 1)
    server = SplitServer(cfg, RunRecorder(tmp_path / precision / "out", "fedbert"), {10: 0})
    cr = server.train_client(grid, 10, 1)
    assert cr.failure is None and cr.steps == 2 and np.isfinite(cr.loss_sum)
    evaluation = server.evaluate_client(grid, 10, 1)
    assert evaluation is not None and 0.0 <= evaluation["accuracy"] <= 1.0 and np.isfinite(evaluation["loss"])
    return cr.record(), grid, server


@pytest.mark.parametrize("train", ["full", "adapter"])  # adapter: the server's frozen layers get fp32 input
def test_fedbert_runs_in_fp32_and_bf16_with_the_same_bytes(tiny_data_dir, tmp_path, train: str) -> None:
    records = {}
    for precision, dtype in DTYPES.items():
        records[precision], grid, server = _fedbert_round(tiny_data_dir, tmp_path, train, precision)
        assert grid.dtypes == {"float32"}  # activations, gradients and weights, both ways
        assert (server.device, server.dtype) == (CPU, dtype)
        _check_placed(server.top, dtype)
        assert _fp32_state(server.optimizer)
        bottom = split._LIVE[(7, 10)].bottom  # the client's bottom, kept in its worker
        _check_placed(bottom, dtype)
        assert bottom.backbone.embeddings.word_embeddings.weight.dtype == dtype  # frozen in both modes
    keys = ("uplink_activation_bytes", "uplink_weight_bytes", "downlink_gradient_bytes", "downlink_weight_bytes")
    assert all(records["bf16"][k] == records["fp32"][k] > 0 for k in keys)


# ---------------------------------------------------------------------------------------
# PFIT: one client, one train and one evaluate message
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_pfit_client_runs_on_the_cpu(tiny_pfit, monkeypatch, precision: str) -> None:  # noqa: F811
    rc = {**_rc(tiny_pfit, "pfit", precision), "device": "cpu", "precision": precision}
    dtype = DTYPES[precision]
    bundle = runtime.get_bundle("", 0, CPU, dtype)
    glob = ArrayRecord({k: Array(v.cpu().numpy()) for k, v in trainable_state(bundle.lm).items()})
    optimizers = []
    make_optimizer = client.make_optimizer

    def keep_optimizer(*args):
        optimizers.append(make_optimizer(*args))
        return optimizers[-1]

    monkeypatch.setattr(client, "make_optimizer", keep_optimizer)
    context = make_context(rc, 0, num_partitions=2)

    reply = client.handle_pfit_train(
        make_message(RecordDict({"arrays": glob, "config": ConfigRecord({"server-round": 1})})), context)
    assert not reply.has_error(), reply.error
    assert runtime.get_bundle("", 0, CPU, dtype) is bundle  # the handler used the bundle of this placement
    _check_placed(bundle.policy, dtype)
    _check_placed(bundle.ref, dtype)
    assert {p.dtype for p in bundle.ref.parameters()} == {dtype}
    assert _fp32_state(optimizers[0])
    uploaded = reply.content["arrays"]
    assert _float_dtypes(uploaded) == {"float32"}
    assert sum(a.numpy().nbytes for a in uploaded.values()) == reply.content["metrics"]["upload-bytes"]
    trained = trainable_state(bundle.lm)
    assert any(not torch.equal(trained[k], torch.from_numpy(glob[k].numpy())) for k in trained)  # it trained
    assert all(np.isfinite(float(v)) for v in reply.content["metrics"].values())

    evaluation = client.handle_pfit_evaluate(
        make_message(RecordDict({"arrays": glob, "config": ConfigRecord({"server-round": 1})}),
                     MessageType.EVALUATE), context)
    assert not evaluation.has_error(), evaluation.error
    metrics = evaluation.content["metrics"]
    assert all(np.isfinite(float(metrics[k])) for k in ("helpfulness", "safety", "combined", "kl"))


# ---------------------------------------------------------------------------------------
# PFTT: a whole run through the real ServerApp and ClientApp
# ---------------------------------------------------------------------------------------


def test_pftt_runs_on_an_explicit_cpu_with_the_same_bytes(tiny_data_dir, tmp_path) -> None:
    import json

    from pwff_app.testing.inprocess import InProcessGrid, run_server

    records = {}
    for precision in DTYPES:
        rc = tiny_config(tiny_data_dir, tmp_path, run_name=precision, num_clients=2, task__num_rounds=1,
                         device="cpu", precision=precision)
        run_server(rc, InProcessGrid(rc, 2))
        (records[precision],) = [json.loads(line) for line in
                                 (tmp_path / precision / "rounds.jsonl").read_text().splitlines()]
        assert records[precision]["events"] == []
        assert all(0.0 <= c["accuracy"] <= 1.0 for c in records[precision]["clients"].values())
        summary = json.loads((tmp_path / precision / "summary.json").read_text())
        # Two clients, each sending the shared part as float32 (4 bytes a parameter).
        assert records[precision]["uplink_bytes"] >= 2 * 4 * summary["params"]["shared"] > 0
    assert records["bf16"]["uplink_bytes"] == records["fp32"]["uplink_bytes"]
    assert records["bf16"]["downlink_bytes"] == records["fp32"]["downlink_bytes"]

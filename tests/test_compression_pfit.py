"""Compressed updates in the instruct family (issue 17): the packed sparse values are what is
encoded, with error feedback, and ``instruct.sparsity = "adaptive"`` follows the channel."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pwff_app.compression.adaptive import SPARSITY_LADDER
from pwff_app.compression.mod import RESIDUAL
from pwff_app.federation.state import PrivateStore
from pwff_app.testing.inprocess import InProcessGrid, run_server
from tests.test_pfit import _rc, tiny_pfit  # noqa: F401  (tiny_pfit is a fixture)


def _run(rc: dict, out) -> tuple[list[dict], InProcessGrid]:
    grid = InProcessGrid(rc, 2)
    run_server(rc, grid)  # the real ServerApp and ClientApp, mods included
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()], grid


@pytest.mark.parametrize("codec", ["int8", "topk:0.2"])
def test_pfit_sparse_values_are_encoded_decoded_and_aggregated(tiny_pfit, codec):  # noqa: F811
    plain, _ = _run(_rc(tiny_pfit, "pfit", "plain", sparsity="0.4"), tiny_pfit / "res" / "plain")
    rc = {**_rc(tiny_pfit, "pfit", "enc", sparsity="0.4"), "compression.uplink": codec,
          "compression.block-size": 64}
    rounds, grid = _run(rc, tiny_pfit / "res" / "enc")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r, p in zip(rounds[1:], plain[1:]):
        assert not r["events"] and r["reward_mean"] is not None  # every encoded reply decoded and accepted
        for cid in ("0", "1"):
            assert r["clients"][cid]["codec"] == codec
            ratio = r["clients"][cid]["uplink_bytes"] / p["clients"][cid]["uplink_bytes"]
            assert ratio < (0.27 if codec == "int8" else 0.41)  # of the packed fp32 upload
    for context in grid.contexts.values():  # error feedback over the dense trainable part
        residual = PrivateStore(context, context.node_config["partition-id"], RESIDUAL).load()
        assert residual and any(np.abs(v).sum() > 0 for v in residual.values())


def test_pfit_adaptive_sparsity_sends_less_over_a_worse_channel(tiny_pfit):  # noqa: F811
    rc = {**_rc(tiny_pfit, "pfit", "adaptive", sparsity="adaptive"), "wireless.enabled": True,
          "wireless.loss-model": "none", "wireless.snr-db": "30,-10", "wireless.bandwidth-hz": 1e5,
          "compression.target-delay-s": 0.5}
    rounds, _ = _run(rc, tiny_pfit / "res" / "adaptive")
    for r in rounds[1:]:
        assert not r["events"]
        good, bad = r["clients"]["0"], r["clients"]["1"]
        assert good["sparsity_choice"] in SPARSITY_LADDER and good["sparsity"] == good["sparsity_choice"]
        assert bad["sparsity_choice"] > good["sparsity_choice"]  # -10 dB: a larger share kept back
        assert bad["uplink_bytes"] < good["uplink_bytes"]

"""``rayleigh`` stays bit for bit what it was before the 3GPP cell (issue 16).

``tests/fixtures/rayleigh_golden.json`` was written by ``tests/fixtures/make_rayleigh_golden.py``
on the code before any radio change (commit 716844c): 300 ``transmit`` results and the
``wireless`` blocks of a 3-round in-process run with sampling and lossy links. Floats are
compared with ``==``: bit for bit. Keys added since (new record fields) are allowed; every
old key must keep its value. One exception: Flower's FedAvg samples a round's nodes in a random
order, so a sum over the clients of a round (and what is computed from sums) can differ in its
last bit from run to run, with the old code too; such aggregates are compared to 1e-12.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pwff_app.config import ChannelConfig
from pwff_app.wireless.channel import transmit
from tests.fixtures.make_rayleigh_golden import inprocess_run

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "rayleigh_golden.json").read_text())


def assert_contains(old: object, new: object, where: str = "", exact: bool = True) -> None:
    """Every key of ``old`` is in ``new`` with an identical value (recursively); with ``exact``
    False a float may differ by summation order (rel. 1e-12). Per-client rows are exact."""
    if isinstance(old, dict):
        assert isinstance(new, dict), where
        for key, value in old.items():
            assert key in new, f"{where}/{key} missing"
            assert_contains(value, new[key], f"{where}/{key}", exact or key == "clients")
    elif isinstance(old, list):
        assert isinstance(new, list) and len(new) == len(old), where
        for i, (a, b) in enumerate(zip(old, new)):
            assert_contains(a, b, f"{where}[{i}]", exact)
    elif isinstance(old, float) and not exact:
        assert type(new) is float and math.isclose(old, new, rel_tol=1e-12), f"{where}: {old!r} != {new!r}"
    else:
        assert old == new and type(old) is type(new), f"{where}: {old!r} != {new!r}"


def test_transmit_is_unchanged_bit_for_bit() -> None:
    for i, case in enumerate(GOLDEN["transmit"]):
        cfg = ChannelConfig.from_run_config({"seed": 7, **case["case"]})
        old = case["result"]
        new = transmit(case["payload_bits"], cfg, old["client_id"], old["server_round"], old["direction"])
        assert_contains(old, new.to_record(), f"transmit[{i}]")


def test_an_inprocess_rayleigh_run_records_the_same_link(tiny_data_dir) -> None:
    assert_contains(GOLDEN["run"], inprocess_run(tiny_data_dir), "run", exact=False)

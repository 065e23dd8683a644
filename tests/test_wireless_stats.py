"""Delay and latency spread in the link statistics: mean, median and p95 (the Rayleigh delay's mean is infinite)."""

from __future__ import annotations

import numpy as np
import pytest

from pwff_app.config import ChannelConfig
from pwff_app.wireless.channel import db_to_linear, rate_bps, rayleigh_gain
from pwff_app.wireless.stats import ClientRound, percentile, spread, summarize_round, summary_block
from tests.test_wireless import fake_link


@pytest.mark.parametrize("values", [[3.0], [1.0, 2.0], [5.0, 1.0, 4.0, 2.0, 3.0], list(np.linspace(0, 1, 37))])
@pytest.mark.parametrize("q", [0, 50, 95, 100])
def test_percentile_is_numpys_linear_rule(values, q) -> None:
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_spread_of_nothing_is_none() -> None:
    assert spread([], "x_s") == {"mean_x_s": None, "median_x_s": None, "p95_x_s": None}
    assert percentile(iter([]), 95) is None


def test_rounds_and_summary_carry_median_and_p95() -> None:
    rounds = {
        1: summarize_round([
            ClientRound(11, 0, fake_link("down", 1.0), fake_link("up", 2.0), compute_s=3.0),  # latency 6
            ClientRound(22, 1, fake_link("down", 0.5), fake_link("up", 4.0), compute_s=1.0),  # 5.5
            ClientRound(33, 2, fake_link("down", 0.5), fake_link("up", 40.0), compute_s=1.0),  # 41.5: a deep fade
        ]),
        2: summarize_round([ClientRound(11, 0, fake_link("down", 1.0), fake_link("up", 6.0), compute_s=1.0)]),  # 8
    }
    r1 = rounds[1]
    assert (r1["mean_delay_up_s"], r1["median_delay_up_s"]) == (pytest.approx(46 / 3), 4.0)
    assert r1["p95_delay_up_s"] == pytest.approx(float(np.percentile([2, 4, 40], 95)))
    assert r1["latency_s"] == 41.5 and r1["median_client_latency_s"] == 6.0
    assert r1["mean_client_latency_s"] == pytest.approx(53 / 3)
    assert r1["p95_client_latency_s"] == pytest.approx(float(np.percentile([6, 5.5, 41.5], 95)))
    block = summary_block(rounds, ChannelConfig())
    assert block["median_uplink_delay_s"] == 5.0  # over all four uplinks: 2, 4, 6, 40
    assert block["p95_uplink_delay_s"] == pytest.approx(float(np.percentile([2, 4, 6, 40], 95)))
    assert block["mean_round_latency_s"] == pytest.approx((41.5 + 8) / 2)
    assert block["median_round_latency_s"] == pytest.approx((41.5 + 8) / 2)
    assert block["p95_round_latency_s"] == pytest.approx(float(np.percentile([41.5, 8], 95)))


def test_median_and_p95_settle_where_the_mean_does_not() -> None:
    """Rayleigh uplink delays at 5 dB: the sample mean of 20k fades moves with the seed far more than
    the median or p95 (E[1/|h|^2] diverges); that is why the spread is reported."""
    stats = []
    for seed in range(6):
        gains = rayleigh_gain(np.random.default_rng(seed), 20_000)
        delays = 200_000 / rate_bps(1e6, db_to_linear(5.0), gains)
        stats.append((np.mean(delays), np.median(delays), percentile(delays, 95)))
    mean, median, p95 = (np.array(x) for x in zip(*stats))
    rel = lambda x: (x.max() - x.min()) / np.median(x)  # noqa: E731
    assert rel(median) < 0.05 and rel(p95) < 0.15 and rel(mean) > 2 * rel(p95)

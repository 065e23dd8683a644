"""Channel model: statistics against closed forms, determinism, accounting, config.

Statistical tolerances are 5 standard errors of the estimate (two-sided false-alarm
probability ~6e-7 per check), and every draw is seeded, so the tests are deterministic.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pwff_app.wireless.channel import (
    ChannelConfig,
    LinkResult,
    db_to_linear,
    ergodic_capacity_bps_per_hz,
    link_rng,
    outage_probability,
    packet_error_prob,
    rate_bps,
    rayleigh_gain,
    transmit,
)

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def app_config() -> dict:
    """The flat ``[tool.flwr.app.config]`` defaults, as Flower hands them to the app."""
    from flwr.common.config import flatten_dict

    with PYPROJECT.open("rb") as f:
        return dict(flatten_dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"]))


def links(cfg: ChannelConfig, payload_bits: int, n: int, direction: str = "up") -> list[LinkResult]:
    """``n`` independent messages: distinct (round, client) pairs."""
    return [transmit(payload_bits, cfg, c, r, direction) for r in range(n // 4) for c in range(4)]


def mean_and_se(x: np.ndarray) -> tuple[float, float]:
    return float(np.mean(x)), float(np.std(x, ddof=1) / math.sqrt(x.size))


# ---------------------------------------------------------------------------------------
# Statistics vs closed forms
# ---------------------------------------------------------------------------------------


def test_rayleigh_power_gain_has_unit_mean_and_exponential_tail() -> None:
    g = rayleigh_gain(np.random.default_rng(1), 200_000)
    mean, se = mean_and_se(g)  # Exp(1): sd 1, se = 1/sqrt(2e5) = 0.0022
    assert abs(mean - 1.0) < 5 * se
    # P(g > 2) = e^-2 = 0.135; binomial se = sqrt(p(1-p)/n) = 0.00076
    p = math.exp(-2.0)
    assert abs(np.mean(g > 2.0) - p) < 5 * math.sqrt(p * (1 - p) / g.size)


@pytest.mark.parametrize(("rate_per_hz", "snr_db"), [(1.0, 5.0), (0.5, 0.0), (2.0, 10.0)])
def test_outage_probability_matches_closed_form(rate_per_hz: float, snr_db: float) -> None:
    bandwidth = 1e6
    target = rate_per_hz * bandwidth
    p = outage_probability(target, bandwidth, snr_db)
    assert p == pytest.approx(1 - math.exp(-(2**rate_per_hz - 1) / db_to_linear(snr_db)))
    # Vectorised, 200k draws: se <= 0.5/sqrt(2e5) = 0.0011.
    g = rayleigh_gain(np.random.default_rng(2), 200_000)
    empirical = np.mean(rate_bps(bandwidth, db_to_linear(snr_db), g) < target)
    assert abs(empirical - p) < 5 * math.sqrt(p * (1 - p) / g.size)
    # Through transmit() in outage mode, 4000 messages: se <= 0.008.
    cfg = ChannelConfig(loss_model="outage", snr_db=(snr_db,), bandwidth_hz=bandwidth, target_rate_bps=target)
    lost = np.array([not r.delivered for r in links(cfg, 80_000, 4000)])
    assert abs(lost.mean() - p) < 5 * math.sqrt(p * (1 - p) / lost.size)


def test_ergodic_capacity_at_5_db() -> None:
    integral = ergodic_capacity_bps_per_hz(5.0)
    assert integral == pytest.approx(1.716, abs=5e-4)
    # Monte Carlo with the module's own functions; sd of log2(1 + SNR g) ~ 1.1, so with
    # 400k draws se ~ 0.0017.
    c = rate_bps(1.0, db_to_linear(5.0), rayleigh_gain(np.random.default_rng(3), 400_000))
    mean, se = mean_and_se(c)
    assert abs(mean - integral) < 5 * se


@pytest.mark.parametrize("snr_db", [-10.0, 0.0, 5.0, 20.0, 40.0])
def test_ergodic_capacity_integral_matches_exponential_integral(snr_db: float) -> None:
    special = pytest.importorskip("scipy.special")
    snr = db_to_linear(snr_db)
    exact = math.exp(1 / snr) * special.exp1(1 / snr) / math.log(2)  # E[log2(1+SNR g)]
    assert ergodic_capacity_bps_per_hz(snr_db) == pytest.approx(exact, rel=1e-8)


def test_single_packet_loss_matches_fading_average_and_retries_are_independent() -> None:
    """One packet: lost w.p. E_g[q(g)]; with one retry at a fresh gain, w.p. E_g[q(g)]^2."""
    snr_db, m = 5.0, 1.0
    x = m / db_to_linear(snr_db)
    # E[1 - exp(-x/g)] = 1 - 2 sqrt(x) K1(2 sqrt(x)); K1 by quadrature: K1(z) = int_0^inf
    # exp(-z cosh t) cosh t dt.
    t = np.linspace(0.0, 20.0, 200_001)
    z = 2 * math.sqrt(x)
    k1 = float(np.sum(np.exp(-z * np.cosh(t)) * np.cosh(t)) * (t[1] - t[0]))
    q_avg = 1 - z * k1
    for retx, expected in [(0, q_avg), (1, q_avg**2)]:
        cfg = ChannelConfig(snr_db=(snr_db,), waterfall_db=0.0, max_retx=retx, packet_bits=8192)
        lost = np.array([not r.delivered for r in links(cfg, 8192, 8000)])
        assert abs(lost.mean() - expected) < 5 * math.sqrt(expected * (1 - expected) / lost.size)


def test_loss_rate_falls_as_snr_rises() -> None:
    # 2-packet messages, one retry, 4000 messages per SNR. Neighbouring rates must differ
    # by more than 4 combined standard errors (measured: 0.96, 0.70, 0.32, 0.10, 0.003).
    rates = []
    for snr_db in [-5.0, 0.0, 5.0, 10.0, 20.0]:
        cfg = ChannelConfig(snr_db=(snr_db,), waterfall_db=0.0, max_retx=1)
        lost = np.array([not r.delivered for r in links(cfg, 2 * 8192, 4000)])
        rates.append((lost.mean(), lost.var() / lost.size))
    for (hi, var_hi), (lo, var_lo) in zip(rates, rates[1:]):
        assert hi - lo > 4 * math.sqrt(var_hi + var_lo + 1e-12), rates


def test_packet_error_probability_edges() -> None:
    assert packet_error_prob(1.0, 1.0) == pytest.approx(1 - math.exp(-1))
    assert packet_error_prob(0.0, 1.0) == 1.0
    assert packet_error_prob(np.array([1e9]), 1.0)[0] == pytest.approx(1e-9)


# ---------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------


def test_same_key_same_result_and_order_independent() -> None:
    cfg = ChannelConfig(seed=7)
    keys = [(c, r, d) for r in range(1, 4) for c in range(3) for d in ("up", "down")]
    forward = {k: transmit(500_000, cfg, k[0], k[1], k[2]) for k in keys}
    backward = {k: transmit(500_000, cfg, k[0], k[1], k[2]) for k in reversed(keys)}
    assert forward == backward
    assert transmit(500_000, ChannelConfig(seed=7), 1, 2, "up") == forward[(1, 2, "up")]


def test_different_links_draw_differently() -> None:
    cfg = ChannelConfig(seed=7)
    keys = [(c, r, d) for r in range(1, 4) for c in range(3) for d in ("up", "down")]
    gains = {k: transmit(1000, cfg, *k).gain for k in keys}
    assert len(set(gains.values())) == len(gains)
    assert transmit(1000, replace(cfg, seed=8), 0, 1, "up").gain != gains[(0, 1, "up")]
    # The stream of attempt k is its own, and gains do not depend on the payload.
    first = [float(rayleigh_gain(link_rng(7, 1, 0, "up", k))) for k in range(3)]
    assert len(set(first)) == 3
    assert transmit(10, cfg, 0, 1, "up").gain == transmit(10**7, cfg, 0, 1, "up").gain == first[0]


def test_negative_seed_is_accepted() -> None:
    assert transmit(1000, ChannelConfig(seed=-1), 0, 1, "up") == transmit(1000, ChannelConfig(seed=-1), 0, 1, "up")


# ---------------------------------------------------------------------------------------
# Accounting
# ---------------------------------------------------------------------------------------


def test_delay_is_bits_over_rate_without_retransmissions() -> None:
    cfg = ChannelConfig(loss_model="none", client_power_w=0.2, server_power_w=1.0)
    for direction, power in [("up", 0.2), ("down", 1.0)]:
        r = transmit(123_456, cfg, 2, 5, direction)
        assert r.delivered and r.retransmissions == 0 and r.bits == r.payload_bits == 123_456
        assert r.rate_bps == pytest.approx(1e6 * math.log2(1 + db_to_linear(5.0) * r.gain), rel=1e-12)
        assert r.delay_s == 123_456 / r.rate_bps
        assert r.energy_j == power * r.delay_s
    # Packet model: a message that got through in one attempt obeys the same law.
    cfg = ChannelConfig(snr_db=(30.0,))
    one_shot = [r for r in links(cfg, 10 * 8192, 40) if r.attempts == 1]
    assert one_shot
    for r in one_shot:
        assert r.delivered and r.retransmitted_bits == 0 and r.retransmissions == 0
        assert r.delay_s == r.payload_bits / r.rate_bps
        assert r.energy_j == 0.2 * r.delay_s


def test_packet_accounting_with_retransmissions() -> None:
    cfg = ChannelConfig(snr_db=(5.0,), waterfall_db=0.0, packet_bits=8192, max_retx=3)
    payload = 20 * 8192 + 100  # 21 packets, the last one short
    results = links(cfg, payload, 200)
    assert all(r.packets == 21 for r in results)
    retried = [r for r in results if r.attempts > 1]
    assert retried, "5 dB with m = 0 dB must need retransmissions"
    for r in results:
        assert r.bits == r.payload_bits + r.retransmitted_bits
        assert r.retransmissions >= r.attempts - 1
        assert r.attempts <= cfg.max_retx + 1
        assert r.delivered == (r.lost_packets == 0)
        assert r.energy_j == pytest.approx(0.2 * r.delay_s)
        # The first attempt alone sends the whole payload at rate_bps.
        assert r.delay_s >= r.payload_bits / r.rate_bps * (1 - 1e-12)
    assert any(not r.delivered and r.lost_packets > 0 for r in results)


def test_outage_mode_uses_the_fixed_rate() -> None:
    cfg = ChannelConfig(loss_model="outage", target_rate_bps=1e6)
    for r in links(cfg, 400_000, 200):
        assert r.rate_bps == 1e6 and r.delay_s == 0.4 and r.energy_j == 0.2 * 0.4
        assert r.delivered == (r.capacity_bps >= 1e6)


def test_disabled_link_is_ideal() -> None:
    r = transmit(1_000_000, ChannelConfig(enabled=False, snr_db=(-30.0,)), 0, 1, "up")
    assert r.delivered and r.delay_s == 0.0 and r.energy_j == 0.0 and r.bits == 1_000_000


def test_empty_payload_costs_nothing() -> None:
    for model in ("packet", "outage", "none"):
        r = transmit(0, ChannelConfig(loss_model=model, snr_db=(-30.0,)), 0, 1, "up")
        assert r.delivered and r.delay_s == 0.0 and r.bits == 0


def test_record_round_trip() -> None:
    r = transmit(100_000, ChannelConfig(), 1, 2, "down")
    assert LinkResult.from_record({**r.to_record(), "extra": 1}) == r


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------


def test_pyproject_defaults_equal_dataclass_defaults() -> None:
    assert ChannelConfig.from_run_config(app_config()) == ChannelConfig()
    assert ChannelConfig.from_run_config({}) == ChannelConfig()


def test_per_client_snr_list_is_cycled() -> None:
    cfg = ChannelConfig.from_run_config({"wireless.snr-db": "0, 5,10"})
    assert cfg.snr_db == (0.0, 5.0, 10.0)
    assert [cfg.client_snr_db(c) for c in range(5)] == [0.0, 5.0, 10.0, 0.0, 5.0]
    assert transmit(1000, cfg, 4, 1, "up").snr_db == 5.0
    assert ChannelConfig.from_run_config({"wireless.snr-db": 7}).snr_db == (7.0,)
    assert ChannelConfig.from_run_config({"wireless.packet-bits": 4096.0}).packet_bits == 4096
    assert ChannelConfig.from_run_config({"wireless.bandwidth-hz": 2_000_000}).bandwidth_hz == 2e6


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("wireless.loss-model", "erasure"),
        ("wireless.downlink-miss", "drop"),
        ("wireless.snr-db", "5,x"),
        ("wireless.snr-db", ""),
        ("wireless.bandwidth-hz", -1.0),
        ("wireless.packet-bits", 0),
        ("wireless.packet-bits", 1.5),
        ("wireless.max-retx", -1),
        ("wireless.client-power-w", 0.0),
        ("wireless.target-rate-bps", float("inf")),
        ("wireless.enabled", "yes"),
        ("wireless.realtime", 1),
        ("seed", "42"),
    ],
)
def test_invalid_values_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"'{key}'") as info:
        ChannelConfig.from_run_config({**app_config(), key: value})
    assert "\n" not in str(info.value)


def test_as_run_config_round_trips() -> None:
    cfg = ChannelConfig(snr_db=(0.0, 5.5), loss_model="outage", seed=3)
    assert ChannelConfig.from_run_config(cfg.as_run_config()) == cfg

"""The 3GPP cell (issue 16): Sionna's TR 38.901 drop, link adaptation, shared band, PF, selection, Jain.

The deadline and the in-process runs are in tests/test_radio_app.py; ``rayleigh`` bit for bit in
tests/test_radio_golden.py.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from pwff_app.config import ChannelConfig, ConfigError, RunConfig
from pwff_app.federation.roster import ClientHistory, RoundSampler, select_clients
from pwff_app.wireless import cell
from pwff_app.wireless.link import WirelessGrid
from pwff_app.wireless.scheduler import ProportionalFair, equal_shares
from pwff_app.wireless.stats import jain_index
from tests.conftest import ROOT, run_config

N = 9  # clients dropped (3 per sector of the centre cell)


def cell_config(**keys: object) -> ChannelConfig:
    return ChannelConfig.from_run_config({"seed": 5, "wireless.scenario": "uma",
                                          **{f"wireless.{k.replace('_', '-')}": v for k, v in keys.items()}})


class _NoGrid:
    """Stands in for the wrapped Grid: planning a round touches no transport."""


def grid_for(cfg: ChannelConfig, n: int = N) -> WirelessGrid:
    return WirelessGrid(_NoGrid(), cfg, {100 + c: c for c in range(n)}, num_clients=n)


# ---------------------------------------------------------------------------------------
# The drop: path loss as Sionna computes it, far means worse
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["uma", "umi", "rma"])
def test_path_loss_is_sionnas_tr38901_for_the_drawn_clients(scenario: str) -> None:
    cfg = cell_config(scenario=scenario)
    drop = cell.drop(cfg, N)
    # Sionna's own TR 38.901 model, set up afresh on the drawn positions and LoS states.
    model = cell.channel_model(scenario, cfg.carrier_frequency_hz)
    ut = torch.tensor([drop.position_m], dtype=torch.float64)
    bs = torch.tensor([[[0.0, 0.0, drop.bs_height_m]]], dtype=torch.float64)
    zeros = torch.zeros_like(ut)
    model.set_topology(ut, bs, zeros, torch.zeros(1, 1, 3, dtype=torch.float64), zeros,
                       torch.tensor([drop.indoor]), torch.tensor([[drop.outdoor_los]]),
                       distance_2d_in=torch.tensor([drop.distance_2d_in_m], dtype=torch.float64))
    expected = model._scenario.basic_pathloss[0, 0].tolist()
    assert drop.basic_pathloss_db == pytest.approx(expected, abs=1e-9)
    assert all(0 < d <= cell.cell_radius_m(cfg) * 1.01 + 50 for d in drop.distance_m)  # in the centre cell
    # The path loss adds O2I (indoor) or car (RMa) penetration to it; the coupling loss is path
    # loss minus shadow fading.
    assert any(p != b for p, b in zip(drop.pathloss_db, drop.basic_pathloss_db))
    assert drop.coupling_loss_db == pytest.approx([p - s - 8.0 for p, s in zip(drop.pathloss_db, drop.shadowing_db)])


def test_the_drop_is_cached_and_the_same_from_the_seed() -> None:
    cfg = cell_config()
    assert cell.drop(cfg, N) is cell.drop(cfg, N)
    cell._drop.cache_clear()
    again = cell.drop(cfg, N)
    assert again == cell.drop(cfg, N) and again.distance_m == cell.drop(cell_config(), N).distance_m
    assert cell.drop(cell_config(), N).distance_m != cell.drop(ChannelConfig.from_run_config(
        {"seed": 6, "wireless.scenario": "uma"}), N).distance_m


def test_far_clients_get_lower_sinr_and_lower_mcs() -> None:
    # Path loss grows with distance for links in the same state (TR 38.901), and SINR and MCS
    # fall with the coupling loss (alpha < 1: power control does not undo all of it).
    cfg = cell_config(cell_load=0.0, pc_alpha=0.8)
    drop = cell.drop(cfg, N)
    by_state: dict[tuple[bool, bool], list[int]] = {}
    for c in range(N):
        by_state.setdefault((drop.outdoor_los[c], drop.indoor[c]), []).append(c)
    for clients in by_state.values():
        ordered = sorted(clients, key=lambda c: drop.distance_m[c])
        assert [drop.basic_pathloss_db[c] for c in ordered] == sorted(drop.basic_pathloss_db[c] for c in ordered)
    share = 1 / 3
    ranked = sorted(range(N), key=lambda c: drop.coupling_loss_db[c])  # nearest (in loss) first
    sinr = [cell.mean_sinr_db(cfg, N, c, "up", share) for c in ranked]
    mcs = [cell.choose_mcs(cfg, s, cell.resource_elements(cfg, share), "up") for s in sinr]
    assert sinr == sorted(sinr, reverse=True) and sinr[0] > sinr[-1]
    assert mcs == sorted(mcs, reverse=True) and mcs[0] > mcs[-1]


def test_the_downlink_is_the_base_stations_power_not_rayleighs_server_power() -> None:
    # The broadcast's SINR moves dB for dB with wireless.bs-power-dbm; rayleigh's
    # server-power-w is refused in a cell (it would be ignored).
    base, louder = cell_config(), cell_config(bs_power_dbm=56.0)
    for c in range(N):
        gain = cell.mean_sinr_db(louder, N, c, "down", 1.0) - cell.mean_sinr_db(base, N, c, "down", 1.0)
        assert gain == pytest.approx(10.0)
    assert "wireless.server-power-w" in cell_config(server_power_w=20.0).ignored()


def test_power_control_follows_ts38213_and_caps_at_the_ue_maximum() -> None:
    cfg = cell_config()
    prb = cell.num_subcarriers(cfg.bandwidth_hz, cfg.subcarrier_spacing_hz) / 12
    near = cell.uplink_power_w(cfg, 80.0, 1.0)
    assert cell.w_to_dbm(near) == pytest.approx(-90.0 + 80.0 + 10 * __import__("math").log10(__import__("math").ceil(prb)))
    assert cell.w_to_dbm(cell.uplink_power_w(cfg, 170.0, 1.0)) == pytest.approx(23.0)


# ---------------------------------------------------------------------------------------
# One message: HARQ, delay, energy
# ---------------------------------------------------------------------------------------


def test_a_message_is_transport_blocks_resent_by_harq_and_paid_in_slots() -> None:
    cfg = cell_config(cell_load=0.0)
    drop = cell.drop(cfg, N)
    best = min(range(N), key=lambda c: drop.coupling_loss_db[c])
    grant = cell.Grant(share=0.5, mcs=5)
    link = cell.transmit_cell(1_000_000, cfg, N, best, 3, "up", grant)
    tb_bits, _ = cell.block(5, 0.0, cell.resource_elements(cfg, 0.5), "up")
    assert link.packets == -(-1_000_000 // tb_bits) and link.bits == (link.packets + link.retransmissions) * tb_bits
    assert link.delay_s == pytest.approx((link.packets + link.retransmissions) * cell.slot_s(cfg))
    assert link.energy_j == pytest.approx(link.power_w * link.delay_s)
    assert link.bandwidth_hz == 0.5 * cfg.bandwidth_hz and link.mcs == 5 and link.distance_m == drop.distance_m[best]
    assert link == cell.transmit_cell(1_000_000, cfg, N, best, 3, "up", grant)  # reproducible from the seed
    # A hopeless MCS at the worst client: every block fails and the update is lost after max-retx.
    worst = max(range(N), key=lambda c: drop.coupling_loss_db[c])
    lost = cell.transmit_cell(1_000_000, cell_config(cell_load=1.0), N, worst, 3, "up", cell.Grant(0.1, 27))
    assert not lost.delivered and lost.attempts == cfg.max_retx + 1 and lost.lost_packets > 0


# ---------------------------------------------------------------------------------------
# Shared band: equal and proportional-fair
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("allocation", ["equal", "proportional-fair"])
def test_the_band_allocated_in_a_round_sums_to_the_total(allocation: str) -> None:
    cfg = cell_config(allocation=allocation, bandwidth_hz=20e6)
    grid = grid_for(cfg)
    for clients in ([0, 3, 4, 8], [1, 2], list(range(N))):
        grants = grid.plan_round(clients)
        assert set(grants) == set(clients)
        assert sum(up.share * cfg.bandwidth_hz for up, _ in grants.values()) == pytest.approx(cfg.bandwidth_hz)
        assert all(up.share > 0 for up, _ in grants.values())
        assert len({down for _, down in grants.values()}) == 1  # one broadcast for the round


def test_pf_gives_a_starved_client_more_over_rounds_than_equal() -> None:
    # Client 3 is scheduled one round in three; the others every round. Equal allocation gives it
    # 1/4 each time; PF remembers it was served little and gives it more.
    pf = ProportionalFair(4)
    rates = {c: 1e6 for c in range(4)}
    pf_total = equal_total = 0.0
    for r in range(12):
        clients = [0, 1, 2, 3] if r % 3 == 2 else [0, 1, 2]
        shares = pf.shares({c: rates[c] for c in clients})
        assert sum(shares.values()) == pytest.approx(1.0)
        pf_total += shares.get(3, 0.0)
        equal_total += equal_shares(clients).get(3, 0.0)
    assert pf_total > equal_total * 1.3


def test_the_grant_reaches_the_client_and_a_claimed_one_is_not_believed() -> None:
    from tests.test_wireless import FakeClient, train_message

    cfg = cell_config(bandwidth_hz=20e6, cell_load=0.0)
    rc = {"seed": 5, "num-clients": N, "wireless.scenario": "uma", "wireless.bandwidth-hz": 20e6,
          "wireless.cell-load": 0.0}
    from flwr.app import Context, RecordDict

    from pwff_app.wireless.link import GRANT_MCS_KEY, GRANT_SHARE_KEY, WIRELESS_KEY, uplink_mod

    class Loop:
        """The grid: each message goes through the mod and a fake learner, optionally tampered."""

        def __init__(self, tamper=None) -> None:
            self.client, self.tamper, self.seen = FakeClient(), tamper, []

        def send_and_receive(self, messages, timeout=None):
            out = []
            for m in messages:
                self.seen.append(dict(m.content["config"]))
                c = m.metadata.dst_node_id - 100
                ctx = Context(1, m.metadata.dst_node_id, {"partition-id": c}, RecordDict(), rc)
                reply = uplink_mod(m, ctx, self.client)
                out.append(self.tamper(reply) if self.tamper and not reply.has_error() else reply)
            return out

    honest = Loop()
    grid = WirelessGrid(honest, cfg, {100 + c: c for c in range(N)}, num_clients=N)
    replies = grid.send_and_receive([train_message(1, 100 + c) for c in (0, 1, 2)])
    assert all(GRANT_SHARE_KEY in c and GRANT_MCS_KEY in c for c in honest.seen)
    assert all(GRANT_SHARE_KEY not in m.content["config"] for m in honest.client.received)  # learner never sees it
    for reply in replies:
        c = reply.metadata.src_node_id - 100
        if reply.has_error():
            continue
        record = reply.content[WIRELESS_KEY]
        assert record["bandwidth_hz"] == pytest.approx(cfg.bandwidth_hz / 3) and record["mcs"] == grid.grant(1, c).mcs
        assert grid.last_uplink(c).to_record() == dict(record)

    def greedy(reply):
        reply.content[WIRELESS_KEY]["bandwidth_hz"] = cfg.bandwidth_hz  # claims the whole band
        reply.content[WIRELESS_KEY]["delay_s"] = 0.001
        return reply

    liar = WirelessGrid(Loop(greedy), cfg, {100 + c: c for c in range(N)}, num_clients=N)
    liar.send_and_receive([train_message(1, 100 + c) for c in (0, 1, 2)])
    for c in (0, 1, 2):
        up = liar.last_uplink(c)
        if up is not None and up.delivered:
            assert up.bandwidth_hz == pytest.approx(cfg.bandwidth_hz / 3) and up.delay_s > 0.001


# ---------------------------------------------------------------------------------------
# Selection: only what earlier rounds recorded
# ---------------------------------------------------------------------------------------


def test_best_channel_selects_the_k_best_by_last_rounds_indicator() -> None:
    history = {0: ClientHistory(3.0, (1,)), 1: ClientHistory(-4.0, (1,)), 2: ClientHistory(12.5, (1,)),
               3: ClientHistory(7.0, ()), 4: ClientHistory(-20.0, ())}
    assert select_clients("best-channel", range(5), 2, 42, 2, history) == [2, 3]
    assert select_clients("best-channel", range(5), 3, 42, 2, history) == [0, 2, 3]
    # A client never heard from ranks first, so every client gets measured.
    assert select_clients("best-channel", range(6), 2, 42, 2, history) == [2, 5]


def test_the_sampler_sees_only_rounds_before_the_one_it_plans() -> None:
    asked: list[int] = []

    def history(before: int) -> dict[int, ClientHistory]:
        asked.append(before)
        return {c: ClientHistory(float(c), ()) for c in range(4)}

    sampler = RoundSampler({10 + c: c for c in range(4)}, 2, 42, 5, "best-channel", history)
    assert sampler.train_nodes(3) == {12, 13} and asked == [3]
    assert sampler.evaluate_nodes(5) == {10, 11, 12, 13}


def test_age_and_proportional_fair_favour_the_clients_served_least() -> None:
    history = {0: ClientHistory(10.0, (1, 2, 3)), 1: ClientHistory(10.0, (1,)), 2: ClientHistory(10.0, (3,)),
               3: ClientHistory(10.0, ())}
    assert select_clients("age", range(4), 2, 0, 4, history) == [1, 3]
    assert select_clients("proportional-fair", range(4), 2, 0, 4, history) == [1, 3]
    assert select_clients("random", range(4), 2, 7, 4, history) == select_clients("random", range(4), 2, 7, 4, {})


def test_grid_history_holds_earlier_rounds_only() -> None:
    from pwff_app.wireless.channel import LinkResult

    grid = grid_for(ChannelConfig())
    for r, sinr, delivered in ((1, 5.0, True), (2, -3.0, False)):
        entry = grid._entry(r, 100)
        entry.up = LinkResult("up", 0, r, 8, 8, 0, 1, 0, 1, 0, 0.1, 0.02, delivered, 1.0, 1.0, 1.0, 5.0,
                              sinr_db=sinr)
    assert grid.history(1) == {}
    assert grid.history(2) == {0: ClientHistory(5.0, (1,))}
    assert grid.history(3) == {0: ClientHistory(-3.0, (1,))}
    assert grid.last_uplink(0).server_round == 2 and grid.last_uplink(1) is None


# ---------------------------------------------------------------------------------------
# Config, Jain, dependency
# ---------------------------------------------------------------------------------------


def test_jain_index() -> None:
    assert jain_index([3, 3, 3]) == 1.0
    assert jain_index([4, 0, 0, 0]) == 0.25
    assert jain_index([2, 1]) == pytest.approx(9 / 10)
    assert jain_index([]) is None and jain_index([0, 0]) is None


@pytest.mark.parametrize("keys, message", [
    ({"selection": "all", "clients-per-round": 2}, "'selection' = 'all'"),
    ({"selection": "best-channel"}, "set it > 0"),
    ({"selection": "age", "clients-per-round": 2, "wireless.enabled": False}, "needs 'wireless.enabled'"),
    ({"wireless.scenario": "uma", "wireless.snr-db": "10"}, "'wireless.snr-db'"),
    ({"wireless.allocation": "proportional-fair"}, "'wireless.allocation'"),
    ({"wireless.scenario": "mars"}, "'wireless.scenario' must be one of"),
    ({"method": "fedbert", "wireless.deadline-s": 10.0}, "'wireless.deadline-s' is not supported"),
])
def test_refused_combinations(keys: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_run_config({**run_config(), **keys})


def test_sionna_is_a_declared_dependency_installed_and_imported_only_for_a_cell() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "sionna-no-rt==2.2.0" in [d.split(";")[0].strip() for d in deps]
    assert importlib.metadata.version("sionna-no-rt") == "2.2.0"  # installed with the project, not at run time
    assert "pip install -e" in (ROOT / "README.md").read_text()  # the README's install installs the dependencies
    probe = ("import sys; from pwff_app.wireless import link, cell, scheduler; from pwff_app.config import ChannelConfig; "
             "from pwff_app.wireless.channel import transmit; transmit(8192, ChannelConfig(), 0, 1, 'up'); "
             "print('sionna' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"

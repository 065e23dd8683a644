"""A 3GPP cell (``wireless.scenario`` = ``uma``, ``umi`` or ``rma``), built on Sionna's pieces.

What Sionna computes (``sionna-no-rt`` 2.2, imported on first use only, never by ``rayleigh``):

* the drop: :func:`sionna.sys.gen_hexgrid_topology` places ``num_rings`` rings of hexagonal
  cells (3 sectors each) and drops terminals uniformly in them (TR 38.901 Tables 7.2-1 / 7.2-3:
  heights, indoor share, minimum distance);
* LoS state, path loss (TR 38.901 Table 7.4.1-1, with O2I penetration 7.4.3) and shadow fading
  (7.5 step 4, log-normal, spatially correlated) from :class:`sionna.phy.channel.tr38901.UMa`
  (``UMi``, ``RMa``): the drop's topology is set and one large-scale-parameter realization drawn;
* uplink transmit power: :func:`sionna.sys.open_loop_uplink_power_control` (TS 38.213 7.1.1);
* the MCS: :class:`sionna.sys.InnerLoopLinkAdaptation` (highest MCS of the 5G NR table whose
  BLER at the estimated SINR is <= ``bler_target``);
* block errors: :class:`sionna.sys.PHYAbstraction` with its PUSCH / PDSCH BLER tables, and
  the transport-block size of an MCS over a number of resource elements (TS 38.214 5.1.3.2);
* proportional-fair shares: :class:`sionna.sys.PFSchedulerSUMIMO` (:mod:`pwff_app.wireless.scheduler`).

What pwff adds: the server's base station is the centre site, its clients are the first
``num_clients`` terminals dropped in the centre cell; every terminal dropped in the other
cells is a co-channel interferer (each cell has one terminal on the air over ``cell_load`` of the
band, with its own power control toward its own site) whose mean power adds to the noise; Rayleigh small-scale
fading per round and per HARQ transmission (the ``rayleigh`` draws, :func:`link_rng`); the
message is cut into transport blocks, one per slot over the client's share of the band;
blocks in error are resent (HARQ, no soft combining) at most ``max_retx`` times each.

Precision and device: the drop is computed once per process in float64 on the CPU from the
run seed (:func:`drop`, cached), so the server and every client process get the same numbers.
Units: dB, dBm, W, Hz, m, s, bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from pwff_app.config import ChannelConfig
from pwff_app.config.sections import Direction
from pwff_app.wireless.channel import LinkResult, db_to_linear, link_rng, rayleigh_gain

# Inter-site distance in m (TR 38.901 Tables 7.2-1, 7.2-3 for RMa: 5000 m of its 1732 | 5000 m), as Sionna.
ISD_M = {"uma": 500.0, "umi": 200.0, "rma": 5000.0}
# Noise figures in dB of the base station and the terminal: the usual 3GPP system-level calibration
# values (TR 38.901 Sec. 7.8; not re-checked against the document, see docs/radio.md).
NOISE_FIGURE_DB = {"up": 5.0, "down": 9.0}  # receiver: the BS on the uplink, the UE on the downlink
THERMAL_NOISE_DBM_PER_HZ = -174.0  # kT at 290 K
SUBCARRIERS_PER_PRB = 12
# Data symbols per 14-symbol slot: 2 left for DMRS and control (an assumption, docs/radio.md).
DATA_SYMBOLS_PER_SLOT = 12
SYMBOLS_PER_SLOT = 14
MCS_CATEGORY = {"up": 0, "down": 1}  # Sionna: 0 = PUSCH, 1 = PDSCH
MCS_TABLE = 1  # TS 38.214 Table 5.1.3.1-1 (up to 64QAM)


def dbm_to_w(dbm: float) -> float:
    """Power in W of a value in dBm."""
    return 10.0 ** ((dbm - 30.0) / 10.0)


def w_to_dbm(watts: float) -> float:
    """Power in dBm of a value in W."""
    return 10.0 * math.log10(watts) + 30.0


@lru_cache(maxsize=1)
def _sionna() -> Any:
    """Sionna's modules (imported on first use: ~4-7 s) with float64 on the CPU."""
    import sionna.phy
    import sionna.phy.channel.tr38901 as tr38901
    import sionna.sys

    sionna.phy.config.precision = "double"
    sionna.phy.config.device = "cpu"
    return sionna


# ---------------------------------------------------------------------------------------
# The drop: once per run (seed), cached per process
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Drop:
    """Where the clients are and what the large scale does to their links (index = client id).

    ``position_m``: (x, y, z) in m, the server's site at (0, 0, ``bs_height_m``).
    ``basic_pathloss_db``: TR 38.901 Table 7.4.1-1 for the link's LoS state and distance;
    ``pathloss_db`` is Sionna's TR 38.901 path loss (basic + O2I penetration), ``shadowing_db``
    the shadow fading (positive = a stronger link); ``coupling_loss_db = pathloss_db -
    shadowing_db - antenna_gain_db`` (the base station's antenna gain, both directions). ``interference_w_per_hz``: mean power spectral density in W/Hz the other
    cells' terminals put at the server's site (0 would be an isolated cell).
    """

    scenario: str
    position_m: tuple[tuple[float, float, float], ...]
    distance_m: tuple[float, ...]  # 3D distance to the server's site
    distance_2d_m: tuple[float, ...]
    distance_2d_in_m: tuple[float, ...]  # indoor part of the 2D distance (TR 38.901 7.4.3, drawn)
    ut_height_m: tuple[float, ...]
    bs_height_m: float
    los: tuple[bool, ...]  # LoS of the link (False for an indoor client)
    outdoor_los: tuple[bool, ...]  # LoS of the outdoor part of the path (what the path loss uses)
    indoor: tuple[bool, ...]
    basic_pathloss_db: tuple[float, ...]
    pathloss_db: tuple[float, ...]
    shadowing_db: tuple[float, ...]
    interference_w_per_hz: float
    antenna_gain_db: float = 0.0

    @property
    def coupling_loss_db(self) -> tuple[float, ...]:
        return tuple(p - s - self.antenna_gain_db for p, s in zip(self.pathloss_db, self.shadowing_db))


def cell_radius_m(cfg: ChannelConfig) -> float:
    """The hexagon radius in m: ``cell_radius_m``, or 0 = TR 38.901's ISD / sqrt 3."""
    return cfg.cell_radius_m or ISD_M[cfg.scenario] / math.sqrt(3.0)


def _drop_key(cfg: ChannelConfig) -> tuple:
    """Everything a drop depends on."""
    return (cfg.scenario, cfg.seed, cell_radius_m(cfg), cfg.num_rings, cfg.cell_load, cfg.bs_antenna_gain_dbi,
            cfg.carrier_frequency_hz,
            cfg.pc_p0_dbm, cfg.pc_alpha, cfg.ut_max_power_dbm, cfg.bandwidth_hz, cfg.subcarrier_spacing_hz)


def drop(cfg: ChannelConfig, num_clients: int) -> Drop:
    """The run's drop of ``num_clients`` clients (cached per process by the settings it depends on)."""
    return _drop(_drop_key(cfg), num_clients)


def channel_model(scenario: str, carrier_frequency_hz: float) -> Any:
    """Sionna's TR 38.901 system-level model (omni single antennas at both ends, uplink view)."""
    sn = _sionna()
    tr = sn.phy.channel.tr38901
    array = tr.PanelArray(num_rows_per_panel=1, num_cols_per_panel=1, polarization="single",
                          polarization_type="V", antenna_pattern="omni", carrier_frequency=carrier_frequency_hz)
    model = {"uma": tr.UMa, "umi": tr.UMi, "rma": tr.RMa}[scenario]
    kwargs = {} if scenario == "rma" else {"o2i_model": "low"}
    return model(carrier_frequency=carrier_frequency_hz, ut_array=array, bs_array=array, direction="uplink",
                 **kwargs)


@lru_cache(maxsize=4)
def _drop(key: tuple, num_clients: int) -> Drop:
    scenario, seed, radius, rings, load, gain, fc, p0, alpha, p_max, bandwidth, scs = key
    sn = _sionna()
    torch = __import__("torch")
    sn.phy.config.seed = seed % 2**63
    per_sector = math.ceil(num_clients / 3)
    ut_loc, bs_loc, ut_orient, bs_orient, ut_vel, indoor, _, _ = sn.sys.gen_hexgrid_topology(
        batch_size=1, num_rings=rings, num_ut_per_sector=per_sector, scenario=scenario,
        isd=radius * math.sqrt(3.0))
    # One site per cell (the three sectors share it); terminals are ordered cell by cell.
    sites, site_orient = bs_loc[:, ::3], bs_orient[:, ::3]
    model = channel_model(scenario, fc)
    model.set_topology(ut_loc, sites, ut_orient, site_orient, ut_vel, indoor)
    lsp = model.sample_lsp()
    scenario_obj = model._scenario  # the topology Sionna derived: distances, LoS, heights
    # [sites, terminals]: TR 38.901 path loss (dB) and shadow fading (linear power factor).
    pathloss_db = lsp.pathloss[0]
    shadowing_db = 10.0 * torch.log10(lsp.sf[0])
    coupling_db = pathloss_db - shadowing_db - gain  # every link ends at a site's antenna
    per_cell = 3 * per_sector
    ut_cell = torch.arange(ut_loc.shape[1]) // per_cell
    clients = torch.arange(num_clients)
    # Interferers: every terminal of the other cells, full band, power control toward its own site.
    others = torch.nonzero(ut_cell > 0).flatten()
    own_loss = coupling_db[ut_cell[others], others]
    total_subcarriers = num_subcarriers(bandwidth, scs)
    power_w = sn.sys.open_loop_uplink_power_control(
        sn.phy.utils.db_to_lin(own_loss), torch.full_like(own_loss, total_subcarriers, dtype=torch.int32),
        alpha=alpha, p0_dbm=p0, ut_max_power_dbm=p_max)
    received_w = power_w * sn.phy.utils.db_to_lin(-coupling_db[0, others])
    # Full load: one terminal of each other cell transmits at a time (the mean over that cell's).
    per_cell_w = torch.zeros(int(ut_cell.max()) + 1, dtype=received_w.dtype)
    per_cell_w.index_add_(0, ut_cell[others], received_w / per_cell)
    interference = load * float(per_cell_w.sum()) / bandwidth

    def values(tensor: Any) -> tuple:
        return tuple(tensor[0, 0, clients].tolist()) if tensor.dim() == 3 else tuple(tensor[0, clients].tolist())

    return Drop(
        scenario=scenario, position_m=tuple(tuple(p) for p in ut_loc[0, clients].tolist()),
        distance_m=values(scenario_obj.distance_3d), distance_2d_m=values(scenario_obj.distance_2d),
        distance_2d_in_m=values(scenario_obj.distance_2d_in),
        ut_height_m=tuple(ut_loc[0, clients, 2].tolist()), bs_height_m=float(sites[0, 0, 2]),
        los=tuple(bool(x) for x in values(scenario_obj.los)),
        outdoor_los=tuple(bool(x) for x in values(scenario_obj.outdoor_los)), indoor=tuple(bool(x) for x in indoor[0, clients]),
        basic_pathloss_db=values(scenario_obj.basic_pathloss), pathloss_db=tuple(pathloss_db[0, clients].tolist()), shadowing_db=tuple(shadowing_db[0, clients].tolist()),
        interference_w_per_hz=interference, antenna_gain_db=gain,
    )


# ---------------------------------------------------------------------------------------
# Resources, power, SINR
# ---------------------------------------------------------------------------------------


def num_subcarriers(bandwidth_hz: float, subcarrier_spacing_hz: float) -> int:
    """Whole subcarriers in a band (at least one PRB)."""
    return max(SUBCARRIERS_PER_PRB, int(bandwidth_hz // subcarrier_spacing_hz))


def slot_s(cfg: ChannelConfig) -> float:
    """Slot duration in s: 14 OFDM symbols of 1 / subcarrier spacing (cyclic prefix included)."""
    return 1e-3 * 15e3 / cfg.subcarrier_spacing_hz


def resource_elements(cfg: ChannelConfig, share: float) -> int:
    """Data resource elements per slot over ``share`` of the band (>= 1 when share > 0)."""
    re = share * num_subcarriers(cfg.bandwidth_hz, cfg.subcarrier_spacing_hz) * DATA_SYMBOLS_PER_SLOT
    return max(1, int(round(re))) if share > 0 else 0


def noise_w(cfg: ChannelConfig, bandwidth_hz: float, direction: Direction) -> float:
    """Thermal noise in W over ``bandwidth_hz`` at the receiver of ``direction``."""
    return dbm_to_w(THERMAL_NOISE_DBM_PER_HZ + NOISE_FIGURE_DB[direction] + 10 * math.log10(bandwidth_hz))


def uplink_power_w(cfg: ChannelConfig, coupling_loss_db: float, share: float) -> float:
    """A client's uplink transmit power in W over ``share`` of the band (Sionna's open-loop power control)."""
    sn = _sionna()
    torch = __import__("torch")
    subcarriers = max(1, round(share * num_subcarriers(cfg.bandwidth_hz, cfg.subcarrier_spacing_hz)))
    power = sn.sys.open_loop_uplink_power_control(
        torch.tensor([db_to_linear(coupling_loss_db)], dtype=torch.float64), torch.tensor([subcarriers]),
        alpha=cfg.pc_alpha, p0_dbm=cfg.pc_p0_dbm, ut_max_power_dbm=cfg.ut_max_power_dbm)
    return float(power[0])


def mean_sinr_db(cfg: ChannelConfig, num_clients: int, client_id: int, direction: Direction, share: float) -> float:
    """Average SINR in dB (large scale only, no fading) of a client's link over ``share`` of the band.

    Uplink: power-controlled terminal power over its share, against noise + the other cells'
    interference in that share. Downlink: ``bs_power_dbm`` over the whole band against the
    terminal's noise (the broadcast; other cells' downlinks are not modelled).
    """
    d = drop(cfg, num_clients)
    loss = db_to_linear(-d.coupling_loss_db[client_id])
    band = share * cfg.bandwidth_hz
    if direction == "up":
        signal = uplink_power_w(cfg, d.coupling_loss_db[client_id], share) * loss
        return 10 * math.log10(signal / (noise_w(cfg, band, "up") + d.interference_w_per_hz * band))
    return 10 * math.log10(dbm_to_w(cfg.bs_power_dbm) * loss / noise_w(cfg, cfg.bandwidth_hz, "down"))


# ---------------------------------------------------------------------------------------
# Link adaptation and the PHY abstraction
# ---------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _phy() -> tuple[Any, Any, Any, Any]:
    """(PHYAbstraction, InnerLoopLinkAdaptation at 0.1, MCS decoder, transport-block function)."""
    sn = _sionna()
    from sionna.phy.nr.utils import MCSDecoderNR, TransportBlockNR

    decoder, blocks = MCSDecoderNR(), TransportBlockNR()
    phy = sn.sys.PHYAbstraction(mcs_decoder_fun=decoder, transport_block_fun=blocks)
    return phy, sn.sys.InnerLoopLinkAdaptation(phy), decoder, blocks


def choose_mcs(cfg: ChannelConfig, sinr_db: float, num_re: int, direction: Direction) -> int:
    """Link adaptation: the highest MCS whose BLER at ``sinr_db`` over ``num_re`` resource
    elements is <= ``bler_target`` (else the lowest), Sionna's inner-loop rule."""
    torch = __import__("torch")
    _, illa, _, _ = _phy()
    illa.bler_target = cfg.bler_target
    mcs = illa(sinr_eff=torch.tensor([db_to_linear(sinr_db)], dtype=torch.float64),
               num_allocated_re=torch.tensor([num_re], dtype=torch.int32),
               mcs_table_index=MCS_TABLE, mcs_category=MCS_CATEGORY[direction])
    return int(mcs[0])


def block(mcs: int, sinr_db: float | np.ndarray, num_re: int, direction: Direction) -> tuple[int, np.ndarray]:
    """(transport-block bits, block error rate at each SINR in dB) of ``mcs`` over ``num_re`` REs."""
    torch = __import__("torch")
    phy, _, decoder, blocks = _phy()
    sinr = torch.tensor(np.atleast_1d(db_to_linear_array(sinr_db)), dtype=torch.float64)
    n = sinr.numel()
    mcs_t = torch.full((n,), mcs, dtype=torch.int32)
    re_t = torch.full((n,), num_re, dtype=torch.int32)
    order, rate = decoder(mcs_t, MCS_TABLE, MCS_CATEGORY[direction])
    tb_bits, _, _ = blocks.transport_block_size(order, rate, order * re_t)
    # Sionna draws its own ACK/NACK too; pwff draws them from the link's own stream instead.
    _, _, _, tbler, _ = phy(mcs_t, sinr_eff=sinr, num_allocated_re=re_t,
                            mcs_table_index=MCS_TABLE, mcs_category=MCS_CATEGORY[direction])
    return int(tb_bits[0]), np.minimum(tbler.numpy(), 1.0)


def db_to_linear_array(db: float | np.ndarray) -> np.ndarray:
    return 10.0 ** (np.asarray(db, dtype=float) / 10.0)


# ---------------------------------------------------------------------------------------
# One message over one link
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    """What the base station decided for one client's link in one round.

    ``share``: fraction of the cell's band in (0, 1]; ``mcs``: the MCS index link adaptation chose.
    """

    share: float
    mcs: int


def transmit_cell(payload_bits: int, cfg: ChannelConfig, num_clients: int, client_id: int, server_round: int,
                  direction: Direction, grant: Grant) -> LinkResult:
    """Send ``payload_bits`` over the cell link of ``client_id`` in ``server_round`` with ``grant``.

    Transmission k (k = 0 first) has its own Rayleigh gain ``g_k`` (:func:`link_rng`, as in
    ``rayleigh``) on top of the average SINR; it sends every transport block still missing,
    one per slot, each lost with the PHY abstraction's BLER at ``SINR g_k`` (ACK / NACK
    drawn from the same stream). Delay: slots used x slot duration; energy: transmit power x
    delay. Lost when blocks are still missing after ``max_retx`` retransmissions.
    """
    d = drop(cfg, num_clients)
    num_re = resource_elements(cfg, grant.share)
    mean_db = mean_sinr_db(cfg, num_clients, client_id, direction, grant.share)
    power_w = (uplink_power_w(cfg, d.coupling_loss_db[client_id], grant.share) if direction == "up"
               else dbm_to_w(cfg.bs_power_dbm))
    rngs = [link_rng(cfg.seed, server_round, client_id, direction, k) for k in range(cfg.max_retx + 1)]
    gains = [float(rayleigh_gain(rng)) for rng in rngs]  # drawn first: independent of payload and grant
    sinr_db = [mean_db + 10 * math.log10(g) for g in gains]
    tb_bits, tbler = block(grant.mcs, np.array(sinr_db), num_re, direction)
    blocks = math.ceil(payload_bits / tb_bits) if tb_bits else 0
    pending, sends, attempts = blocks, 0, 0
    for k in range(cfg.max_retx + 1):
        if pending == 0:
            break
        attempts += 1
        sends += pending
        pending = int((rngs[k].random(pending) < tbler[k]).sum())
    slot = slot_s(cfg)
    delay_s = sends * slot
    band = grant.share * cfg.bandwidth_hz
    return LinkResult(
        direction=direction, client_id=client_id, server_round=server_round, payload_bits=payload_bits,
        bits=sends * tb_bits, retransmitted_bits=(sends - blocks) * tb_bits, packets=blocks,
        retransmissions=sends - blocks, attempts=attempts, lost_packets=pending, delay_s=delay_s,
        energy_j=power_w * delay_s, delivered=pending == 0, rate_bps=tb_bits / slot,
        capacity_bps=band * math.log2(1.0 + db_to_linear(sinr_db[0])), gain=gains[0], snr_db=mean_db,
        distance_m=d.distance_m[client_id], sinr_db=sinr_db[0], mcs=grant.mcs, bandwidth_hz=band,
        bler=float(tbler[0]), power_w=power_w,
    )  # fmt: skip


__all__ = ["Drop", "Grant", "block", "cell_radius_m", "choose_mcs", "drop", "mean_sinr_db", "resource_elements",
           "slot_s", "transmit_cell", "uplink_power_w"]

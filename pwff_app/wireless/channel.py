"""Rayleigh block-fading link model: rate, delay, energy and loss of one message.

Pure: no Flower, no I/O, no global random state. Everything a message experiences on one
link (one client, one round, one direction) follows from :func:`transmit` and is
reproducible from ``(seed, server_round, client_id, direction, attempt)``.

Units are in the names: ``*_bits``, ``*_s`` (seconds), ``*_db``, ``*_w`` (watts),
``*_hz``, ``*_bps`` (bits per second), ``*_j`` (joules). ``snr_linear`` / ``gain`` are
plain power ratios.

Model (see ``docs/wireless.md`` for the equations and the sources of the defaults):

* fading power gain ``g = |h|^2 ~ Exp(1)`` (Rayleigh amplitude), one draw per
  transmission attempt of a message (block fading, re-drawn per retransmission round);
* instantaneous rate ``R = B log2(1 + SNR g)``; delay ``bits / R``; energy ``P delay``;
* loss ``packet``: per-packet error ``q = 1 - exp(-m / (SNR g))`` (Chen et al., IEEE TWC
  2021), failed packets are resent in the next attempt, at most ``max_retx`` times each;
  ``outage``: the message is sent once at the fixed target rate and lost when
  ``B log2(1 + SNR g)`` is below it; ``none``: never lost, delay only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

import numpy as np

from pwff_app.config import ChannelConfig
from pwff_app.config.sections import Direction
# Keeps the link's random streams apart from any other use of the same run seed.
_STREAM_TAG = 0x77697265  # "wire"
_DIRECTION_CODE = {"up": 0, "down": 1}
# Exp(1) can return exactly 0.0 (probability ~2^-53); a zero rate would make the delay
# infinite, so gains are floored here. P(g < 1e-12) ~ 1e-12: no effect on statistics.
_MIN_GAIN = 1e-12


# ---------------------------------------------------------------------------------------
# Channel math (vectorised over numpy arrays where it makes sense)
# ---------------------------------------------------------------------------------------


def db_to_linear(db: float) -> float:
    """Power ratio of a value in dB."""
    return 10.0 ** (db / 10.0)


def rayleigh_gain(rng: np.random.Generator, size: int | None = None) -> float | np.ndarray:
    """Fading power gain ``|h|^2 ~ Exp(1)`` of a unit-power Rayleigh channel (E = 1)."""
    return np.maximum(rng.standard_exponential(size), _MIN_GAIN)


def rate_bps(bandwidth_hz: float, snr_linear: float, gain: float | np.ndarray) -> float | np.ndarray:
    """Shannon rate ``B log2(1 + SNR g)`` in bit/s at average SNR and fading gain ``g``."""
    return bandwidth_hz * np.log2(1.0 + snr_linear * gain)


def packet_error_prob(snr_inst: float | np.ndarray, waterfall_m: float) -> float | np.ndarray:
    """Packet error probability ``1 - exp(-m / SNR_inst)`` (Chen et al., IEEE TWC 2021).

    ``snr_inst`` is the instantaneous SNR (linear, ``SNR g``); ``waterfall_m`` the linear
    waterfall threshold m. At ``snr_inst == m`` one packet in ~1.6 is lost.
    """
    with np.errstate(divide="ignore"):
        return -np.expm1(-waterfall_m / np.asarray(snr_inst, dtype=float))


def outage_probability(target_rate_bps: float, bandwidth_hz: float, snr_db: float) -> float:
    """``P(B log2(1 + SNR g) < R) = 1 - exp(-(2^(R/B) - 1) / SNR)`` for Rayleigh fading."""
    threshold = 2.0 ** (target_rate_bps / bandwidth_hz) - 1.0
    return -math.expm1(-threshold / db_to_linear(snr_db))


def ergodic_capacity_bps_per_hz(snr_db: float) -> float:
    """``E[log2(1 + SNR g)]`` in bit/s/Hz for ``g ~ Exp(1)``, by numerical integration.

    Integrates ``log2(1 + SNR g) e^-g`` over ``g = e^s``: the integrand in ``s`` is smooth
    and decays doubly exponentially on the right and exponentially on the left, so the
    trapezoid rule on a fine uniform grid is accurate to far below 1e-9.
    """
    snr = db_to_linear(snr_db)
    s = np.linspace(math.log(1e-14), math.log(60.0), 20001)
    g = np.exp(s)
    f = np.log2(1.0 + snr * g) * np.exp(-g) * g
    step = s[1] - s[0]
    return float(step * (f.sum() - 0.5 * (f[0] + f[-1])))


def link_rng(
    seed: int, server_round: int, client_id: int, direction: Direction, attempt: int
) -> np.random.Generator:
    """Random stream of one transmission attempt; independent of any call order.

    Negative seeds are folded into [0, 2^64) because ``SeedSequence`` takes only
    non-negative entropy.
    """
    key = [_STREAM_TAG, seed % 2**64, server_round, client_id, _DIRECTION_CODE[direction], attempt]
    return np.random.default_rng(np.random.SeedSequence(key))


# ---------------------------------------------------------------------------------------
# One message over one link
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkResult:
    """What one message experienced on one link.

    Attributes
    ----------
    direction : str
        ``up`` (client to server) or ``down``.
    client_id, server_round : int
        Which link and round.
    payload_bits : int
        Bits the message carries (tensor bytes x 8).
    bits : int
        Bits put on the air, retransmissions included.
    retransmitted_bits : int
        ``bits - payload_bits`` in the packet model (bits resent), else 0.
    packets : int
        Packets the payload was split into (1 outside the packet model).
    retransmissions : int
        Packet retransmissions (sum over packets).
    attempts : int
        Transmission rounds used (1 + retransmission rounds); one fading draw each.
    lost_packets : int
        Packets still missing when the retry budget ran out (> 0 means lost).
    delay_s : float
        Air time in seconds of all attempts (also when the message is lost).
    energy_j : float
        Transmit energy in J: sender power x ``delay_s``.
    delivered : bool
        Whether the whole message reached the receiver.
    rate_bps : float
        Rate in bit/s of the first attempt (the target rate in the outage model).
    capacity_bps : float
        Shannon rate ``B log2(1 + SNR g)`` in bit/s of the first attempt.
    gain : float
        Fading power gain ``|h|^2`` of the first attempt.
    snr_db : float
        Average SNR in dB of this link (3GPP cell: the average SINR, large scale only).
    distance_m : float
        3GPP cell: the client's 3D distance in m to the base station; -1 = no geometry (``rayleigh``).
    sinr_db : float
        Instantaneous SINR in dB of the first attempt (average x fading gain).
    mcs : int
        3GPP cell: the MCS index link adaptation chose; -1 = none (``rayleigh``).
    bandwidth_hz : float
        Band in Hz the message used (3GPP cell: the client's scheduled share of the cell's band).
    bler : float
        Block (packet) error probability of the first attempt (``outage``: 1.0 in outage, else 0).
    power_w : float
        Transmit power in W (3GPP uplink: open-loop power control).
    """

    direction: str
    client_id: int
    server_round: int
    payload_bits: int
    bits: int
    retransmitted_bits: int
    packets: int
    retransmissions: int
    attempts: int
    lost_packets: int
    delay_s: float
    energy_j: float
    delivered: bool
    rate_bps: float
    capacity_bps: float
    gain: float
    snr_db: float
    distance_m: float = -1.0
    sinr_db: float = 0.0
    mcs: int = -1
    bandwidth_hz: float = 0.0
    bler: float = 0.0
    power_w: float = 0.0

    def to_record(self) -> dict[str, int | float | str | bool]:
        """Flat dict of plain scalars (fits a Flower ``ConfigRecord`` and JSON)."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> LinkResult:
        """Inverse of :meth:`to_record` (extra keys are ignored; missing fields that have a default take it)."""
        return cls(**{name: record[name] for name in cls.__dataclass_fields__ if name in record})


def combine_links(first: LinkResult | None, then: LinkResult) -> LinkResult:
    """Two messages sent one after the other on one link in one round, as one exchange.

    Bits, packets, retransmissions, attempts, air time and energy add up; the exchange is
    delivered only if both messages were; rate, capacity and gain stay those of the first
    message. Split learning sends one message per batch each way, so its round is the sum.
    The client id is the later result's (both name the same client: the server fixes which
    client a node runs before round 1).
    """
    if first is None:
        return then
    if (first.direction, first.server_round) != (then.direction, then.server_round):
        raise ValueError("combine_links: results of different directions or rounds")
    return replace(
        first,
        client_id=then.client_id,
        **{k: getattr(first, k) + getattr(then, k) for k in (
            "payload_bits", "bits", "retransmitted_bits", "packets", "retransmissions", "attempts",
            "lost_packets", "delay_s", "energy_j")},
        delivered=first.delivered and then.delivered,
    )


def transmit(
    payload_bits: int,
    cfg: ChannelConfig,
    client_id: int,
    server_round: int,
    direction: Direction,
) -> LinkResult:
    """Send ``payload_bits`` over the link of ``client_id`` in ``server_round``.

    Attempt k (k = 0 first) uses its own fading draw ``g_k`` from
    :func:`link_rng` ``(seed, round, client, direction, k)``; the gain is drawn before
    anything else, so the gains do not depend on the payload size and two methods run
    with the same seed see the same channel.

    With ``cfg.enabled`` False the link is ideal: delivered, zero delay and energy.
    """
    if payload_bits < 0:
        raise ValueError(f"payload_bits must be >= 0, got {payload_bits}")
    snr_db = cfg.client_snr_db(client_id)
    power_w = cfg.power_w(direction)

    def result(
        bits: int, delay_s: float, delivered: bool, rate: float, capacity: float, gain: float,
        packets: int = 1, sends: int = 1, attempts: int = 1, lost_packets: int = 0, bler: float = 0.0,
    ) -> LinkResult:  # fmt: skip
        """Fill in the fields every mode shares; energy is always power x air time."""
        return LinkResult(
            direction=direction, client_id=client_id, server_round=server_round, payload_bits=payload_bits,
            bits=bits, retransmitted_bits=bits - payload_bits, packets=packets, retransmissions=sends - packets,
            attempts=attempts, lost_packets=lost_packets, delay_s=delay_s, energy_j=power_w * delay_s,
            delivered=delivered, rate_bps=rate, capacity_bps=capacity, gain=gain, snr_db=snr_db,
            sinr_db=snr_db + 10 * math.log10(gain), bandwidth_hz=cfg.bandwidth_hz, bler=bler, power_w=power_w,
        )  # fmt: skip

    if not cfg.enabled:
        return result(payload_bits, 0.0, True, math.inf, math.inf, 1.0)
    snr = db_to_linear(snr_db)

    def draw(attempt: int) -> tuple[np.random.Generator, float]:
        rng = link_rng(cfg.seed, server_round, client_id, direction, attempt)
        return rng, float(rayleigh_gain(rng))

    rng, gain0 = draw(0)
    capacity0 = float(rate_bps(cfg.bandwidth_hz, snr, gain0))

    if cfg.loss_model != "packet":
        # Outage: fixed rate without transmitter CSI, decodable iff capacity >= rate.
        # None: rate adapted to the channel, always decoded.
        rate = cfg.target_rate_bps if cfg.loss_model == "outage" else capacity0
        delivered = cfg.loss_model == "none" or payload_bits == 0 or capacity0 >= cfg.target_rate_bps
        delay_s = payload_bits / rate
        outage = cfg.loss_model == "outage" and capacity0 < cfg.target_rate_bps
        return result(payload_bits, delay_s, delivered, rate, capacity0, gain0, lost_packets=int(not delivered),
                      bler=float(outage))

    # Packet model with selective-repeat ARQ: attempt k resends the packets that failed in
    # attempt k-1 under a fresh gain (it starts a whole attempt later, past the coherence
    # time; one fixed gain would make retries in a deep fade useless).
    m = db_to_linear(cfg.waterfall_db)
    n_full, tail = divmod(payload_bits, cfg.packet_bits)
    sizes = np.full(n_full + (tail > 0), cfg.packet_bits, dtype=np.int64)
    if tail:
        sizes[-1] = tail
    pending = sizes
    bits = sends = attempts = 0
    delay_s = 0.0
    gain = gain0
    for attempt in range(cfg.max_retx + 1):
        if pending.size == 0:
            break
        if attempt > 0:
            rng, gain = draw(attempt)
        attempts += 1
        sent = int(pending.sum())
        bits += sent
        sends += pending.size
        delay_s += sent / float(rate_bps(cfg.bandwidth_hz, snr, gain))
        failed = rng.random(pending.size) < packet_error_prob(snr * gain, m)
        pending = pending[failed]
    return result(
        bits, delay_s, pending.size == 0, capacity0, capacity0, gain0,
        packets=int(sizes.size), sends=sends, attempts=attempts, lost_packets=int(pending.size),
        bler=float(packet_error_prob(snr * gain0, m)),
    )  # fmt: skip

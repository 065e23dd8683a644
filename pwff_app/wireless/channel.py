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
from typing import Literal

import numpy as np

Direction = Literal["up", "down"]
LOSS_MODELS = ("packet", "outage", "none")
DOWNLINK_MISS = ("stale", "skip")

# Keeps the link's random streams apart from any other use of the same run seed.
_STREAM_TAG = 0x77697265  # "wire"
_DIRECTION_CODE = {"up": 0, "down": 1}
# Exp(1) can return exactly 0.0 (probability ~2^-53); a zero rate would make the delay
# infinite, so gains are floored here. P(g < 1e-12) ~ 1e-12: no effect on statistics.
_MIN_GAIN = 1e-12

Scalar = int | float | str | bool


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChannelConfig:
    """Wireless link settings; field defaults equal ``[tool.flwr.app.config]``.

    Attributes
    ----------
    enabled : bool
        False = ideal link: nothing delayed, nothing lost, no energy.
    seed : int
        Run seed; the fading draws are keyed by it.
    snr_db : tuple of float
        Average receive SNR in dB per client, cycled by client id (same for both
        directions).
    bandwidth_hz : float
        Bandwidth B in Hz of each client's link (orthogonal links, no interference).
    client_power_w, server_power_w : float
        Transmit power in W of the uplink (client) and downlink (server). They only enter
        the energy account: the SNR is set directly.
    loss_model : str
        ``packet``, ``outage`` or ``none``.
    packet_bits : int
        Packet size in bits (packet model).
    waterfall_db : float
        Waterfall threshold m of the packet-error model, in dB.
    max_retx : int
        Retransmissions allowed per packet before the message is lost (packet model).
    target_rate_bps : float
        Fixed transmission rate in bit/s of the outage model.
    downlink_miss : str
        What a client does when the global model does not reach it: ``stale`` (train on
        the last copy it received) or ``skip`` (sit the round out).
    realtime : bool
        Sleep the simulated delays instead of only accounting them.
    """

    enabled: bool = True
    seed: int = 42
    snr_db: tuple[float, ...] = (5.0,)
    bandwidth_hz: float = 1e6
    client_power_w: float = 0.2
    server_power_w: float = 1.0
    loss_model: str = "packet"
    packet_bits: int = 8192
    waterfall_db: float = -10.0
    max_retx: int = 3
    target_rate_bps: float = 1e6
    downlink_miss: str = "stale"
    realtime: bool = False

    def __post_init__(self) -> None:
        """Validate; each problem is one line naming the run-config key."""
        if not self.snr_db or not all(math.isfinite(s) for s in self.snr_db):
            _bad("wireless.snr-db", "a finite number or a comma list of them", self.snr_db)
        for key, value in [
            ("wireless.bandwidth-hz", self.bandwidth_hz),
            ("wireless.client-power-w", self.client_power_w),
            ("wireless.server-power-w", self.server_power_w),
            ("wireless.packet-bits", self.packet_bits),
            ("wireless.target-rate-bps", self.target_rate_bps),
        ]:
            if not (math.isfinite(value) and value > 0):
                _bad(key, "a finite number > 0", value)
        if not math.isfinite(self.waterfall_db):
            _bad("wireless.waterfall-db", "a finite number", self.waterfall_db)
        if self.max_retx < 0:
            _bad("wireless.max-retx", "an integer >= 0", self.max_retx)
        if self.loss_model not in LOSS_MODELS:
            _bad("wireless.loss-model", f"one of {', '.join(LOSS_MODELS)}", self.loss_model)
        if self.downlink_miss not in DOWNLINK_MISS:
            _bad("wireless.downlink-miss", f"one of {', '.join(DOWNLINK_MISS)}", self.downlink_miss)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Scalar]) -> ChannelConfig:
        """Read the flat ``seed`` and ``wireless.*`` keys; a missing key takes the default.

        Raises
        ------
        ValueError
            One line naming the key and the allowed values.
        """
        d = cls()
        return cls(
            enabled=_read(run_config, "wireless.enabled", bool, d.enabled),
            seed=_read(run_config, "seed", int, d.seed),
            snr_db=_read_snr_list(run_config.get("wireless.snr-db", "5")),
            bandwidth_hz=_read(run_config, "wireless.bandwidth-hz", float, d.bandwidth_hz),
            client_power_w=_read(run_config, "wireless.client-power-w", float, d.client_power_w),
            server_power_w=_read(run_config, "wireless.server-power-w", float, d.server_power_w),
            loss_model=_read(run_config, "wireless.loss-model", str, d.loss_model),
            packet_bits=_read(run_config, "wireless.packet-bits", int, d.packet_bits),
            waterfall_db=_read(run_config, "wireless.waterfall-db", float, d.waterfall_db),
            max_retx=_read(run_config, "wireless.max-retx", int, d.max_retx),
            target_rate_bps=_read(run_config, "wireless.target-rate-bps", float, d.target_rate_bps),
            downlink_miss=_read(run_config, "wireless.downlink-miss", str, d.downlink_miss),
            realtime=_read(run_config, "wireless.realtime", bool, d.realtime),
        )

    def client_snr_db(self, client_id: int) -> float:
        """Average SNR in dB of a client's link (the list is cycled over client ids)."""
        return self.snr_db[client_id % len(self.snr_db)]

    def power_w(self, direction: Direction) -> float:
        """Transmit power in W of the sender in ``direction`` (client up, server down)."""
        return self.client_power_w if direction == "up" else self.server_power_w

    def as_run_config(self) -> dict[str, Scalar]:
        """The settings as flat run-config keys (for ``summary.json``)."""
        return {
            "seed": self.seed,
            "wireless.enabled": self.enabled,
            "wireless.snr-db": ",".join(f"{s:g}" for s in self.snr_db),
            "wireless.bandwidth-hz": self.bandwidth_hz,
            "wireless.client-power-w": self.client_power_w,
            "wireless.server-power-w": self.server_power_w,
            "wireless.loss-model": self.loss_model,
            "wireless.packet-bits": self.packet_bits,
            "wireless.waterfall-db": self.waterfall_db,
            "wireless.max-retx": self.max_retx,
            "wireless.target-rate-bps": self.target_rate_bps,
            "wireless.downlink-miss": self.downlink_miss,
            "wireless.realtime": self.realtime,
        }


def _bad(key: str, allowed: str, value: object) -> None:
    raise ValueError(f"run config: '{key}' must be {allowed}, got {value!r}")


_KIND = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _read(rc: Mapping[str, Scalar], key: str, kind: type, default: Scalar) -> Scalar:
    """One typed value; ints pass as floats and integral floats as ints (TOML ``1e6``)."""
    value = rc.get(key, default)
    if isinstance(value, bool) != (kind is bool):
        _bad(key, _KIND[kind], value)
    if kind is float and isinstance(value, int):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind):
        _bad(key, _KIND[kind], value)
    return value


def _read_snr_list(value: Scalar) -> tuple[float, ...]:
    """``"5"`` or ``"0,5,10"`` (a bare number from a CLI override is accepted too)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),)
    allowed = "a number or a comma list of numbers in dB, e.g. \"5\" or \"0,5,10\""
    if not isinstance(value, str):
        _bad("wireless.snr-db", allowed, value)
    try:
        values = tuple(float(x) for x in value.split(","))
    except ValueError:
        _bad("wireless.snr-db", allowed, value)
    return values


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
        Average SNR in dB of this link.
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

    def to_record(self) -> dict[str, int | float | str | bool]:
        """Flat dict of plain scalars (fits a Flower ``ConfigRecord`` and JSON)."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> LinkResult:
        """Inverse of :meth:`to_record` (extra keys are ignored)."""
        return cls(**{name: record[name] for name in cls.__dataclass_fields__})


def combine_links(first: LinkResult | None, then: LinkResult) -> LinkResult:
    """Two messages sent one after the other on one link in one round, as one exchange.

    Bits, packets, retransmissions, attempts, air time and energy add up; the exchange is
    delivered only if both messages were; rate, capacity and gain stay those of the first
    message. Split learning sends one message per batch each way, so its round is the sum.
    The client id is the later result's: a server learns which client a node runs from its
    first reply, so a round's first downlink may carry a stand-in id.
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
        packets: int = 1, sends: int = 1, attempts: int = 1, lost_packets: int = 0,
    ) -> LinkResult:  # fmt: skip
        """Fill in the fields every mode shares; energy is always power x air time."""
        return LinkResult(
            direction=direction, client_id=client_id, server_round=server_round, payload_bits=payload_bits,
            bits=bits, retransmitted_bits=bits - payload_bits, packets=packets, retransmissions=sends - packets,
            attempts=attempts, lost_packets=lost_packets, delay_s=delay_s, energy_j=power_w * delay_s,
            delivered=delivered, rate_bps=rate, capacity_bps=capacity, gain=gain, snr_db=snr_db,
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
        return result(payload_bits, delay_s, delivered, rate, capacity0, gain0, lost_packets=int(not delivered))

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
    )  # fmt: skip

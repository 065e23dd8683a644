"""Per-round statistics of the wireless link (pure: no Flower).

What :class:`pwff_app.wireless.link.WirelessGrid` logs per node and round (a
:class:`ClientRound` of :class:`pwff_app.wireless.channel.LinkResult` legs) becomes one row per
client (:func:`client_summary`), one record per round (:func:`summarize_round`, the
``wireless`` entry of ``rounds.jsonl``) and the ``wireless`` block of ``summary.json``
(:func:`summary_block`). Units: bits, seconds, joules (bytes in the summary block's totals).

Delays and latencies are reported as mean, median and 95th percentile: under Rayleigh fading
the delay ``bits / (B log2(1 + SNR g))`` has an infinite expectation (``E[1/g]`` diverges
near ``g = 0``), so a sample mean is ruled by the rare deep fades and never settles; the
median and p95 say what a typical and a bad round cost.

Per client and round a row also says what the radio did (3GPP cell: distance, SINR, MCS,
allocated band, BLER, HARQ retransmissions) and the update's ``outcome``: ``delivered``,
``late`` (arrived after ``wireless.deadline-s``), ``lost`` (the channel kept it) or ``none``
(nothing was sent: a lost downlink under ``skip``). The summary adds per-client means over the
rounds a client took part in and Jain's fairness index of the updates delivered
(:func:`jain_index`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pwff_app.config import ChannelConfig
from pwff_app.wireless.channel import LinkResult, ergodic_capacity_bps_per_hz


@dataclass
class ClientRound:
    """What one node's links did in one round; ``None`` = that leg did not happen.

    ``client_id`` is None until a reply names the client that node runs.
    """

    node_id: int
    client_id: int | None = None
    down: LinkResult | None = None
    up: LinkResult | None = None
    compute_s: float | None = None
    late: bool = False  # delivered after the round's deadline (dropped by the server)

    @property
    def label(self) -> str:
        """Row key in the statistics: the client id, or ``node-<id>`` while unknown."""
        return str(self.client_id) if self.client_id is not None else f"node-{self.node_id}"


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) by linear interpolation between order statistics
    (numpy's default); None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def spread(values: Sequence[float], name: str) -> dict[str, float | None]:
    """``mean_<name>``, ``median_<name>`` and ``p95_<name>`` of ``values`` (None when empty)."""
    return {f"mean_{name}": statistics.fmean(values) if values else None,
            f"median_{name}": statistics.median(values) if values else None,
            f"p95_{name}": percentile(values, 95)}


def jain_index(values: Sequence[float]) -> float | None:
    """Jain's fairness index ``(sum x)^2 / (n sum x^2)``: 1 when all are equal, 1/n when one
    has everything; None for no values or all zero."""
    square_sum = sum(x * x for x in values)
    return sum(values) ** 2 / (len(values) * square_sum) if square_sum > 0 else None


def outcome(entry: ClientRound) -> str:
    """``delivered``, ``late``, ``lost`` or ``none`` (no update was sent)."""
    if entry.up is None:
        return "lost" if entry.down is not None and not entry.down.delivered else "none"
    if not entry.up.delivered:
        return "lost"
    return "late" if entry.late else "delivered"


# Radio fields of a round's row, from the uplink (None when no uplink was sent).
RADIO_FIELDS = ("distance_m", "sinr_db", "mcs", "bandwidth_hz", "bler", "power_w")
NOT_MODELLED = {"distance_m": -1.0, "mcs": -1}  # LinkResult's values for "rayleigh has none"


def radio(link: LinkResult | None, name: str) -> float | int | None:
    """A radio field of a link; None when there is no link or the scenario does not model it."""
    value = getattr(link, name) if link is not None else None
    return None if value is None or NOT_MODELLED.get(name) == value else value


def client_summary(entry: ClientRound) -> dict[str, int | float | bool | str | None]:
    """Per-client row of :func:`summarize_round` (bits, seconds, joules, dB, Hz, m, W)."""
    down, up = entry.down, entry.up
    link = up if up is not None else down
    compute_s = entry.compute_s or 0.0
    delay_down_s = down.delay_s if down else 0.0
    delay_up_s = up.delay_s if up else 0.0
    energy_down_j = down.energy_j if down else 0.0
    energy_up_j = up.energy_j if up else 0.0
    return {
        "node_id": entry.node_id,
        "snr_db": link.snr_db if link else None,
        "payload_bits_up": up.payload_bits if up else 0,
        "bits_up": up.bits if up else 0,
        "bits_down": down.bits if down else 0,
        "retransmitted_bits": (up.retransmitted_bits if up else 0) + (down.retransmitted_bits if down else 0),
        "delay_up_s": delay_up_s,
        "delay_down_s": delay_down_s,
        "energy_up_j": energy_up_j,
        "energy_down_j": energy_down_j,
        "energy_j": energy_up_j + energy_down_j,
        "retransmissions": (up.retransmissions if up else 0) + (down.retransmissions if down else 0),
        "downlink_attempted": down is not None,
        "uplink_attempted": up is not None,
        "lost_down": down is not None and not down.delivered,
        "lost_up": up is not None and not up.delivered,
        "compute_s": compute_s,
        # A client's part of the round: its downlink, its training, its uplink (links are
        # orthogonal, so clients run in parallel and the round waits for the slowest).
        "latency_s": delay_down_s + compute_s + delay_up_s,
        **{name: radio(up, name) for name in RADIO_FIELDS},
        "mcs_down": radio(down, "mcs"),
        "harq_retransmissions": up.retransmissions if up else 0,
        "late": entry.late,
        "outcome": outcome(entry),
    }


def summarize_round(entries: Iterable[ClientRound], deadline_s: float = 0.0) -> dict:
    """One round: ``clients`` (rows of :func:`client_summary` by client id as a string)
    and totals.

    ``latency_s`` is the max over clients of down + compute + up delay (the round waits for the
    slowest), capped at ``deadline_s`` when there is one (0 = none: the server stops waiting
    then); ``late`` counts the updates that arrived after it, ``delivered`` the ones in time;
    ``mean/median/p95_client_latency_s`` spread the uncapped latencies over the clients, and
    ``mean/median/p95_delay_up_s`` the uplink delays. ``lost_updates`` counts updates the
    channel kept from the server (lost uplinks, and lost downlinks the client could not answer).
    """
    rows = {e.label: client_summary(e) for e in entries}

    def total(key: str) -> int | float:
        return sum(r[key] for r in rows.values())

    uplink_delays = [r["delay_up_s"] for r in rows.values() if r["uplink_attempted"]]
    slowest = max((r["latency_s"] for r in rows.values()), default=0.0)
    return {
        "clients": rows,
        "participants": len(rows),
        "latency_s": min(slowest, deadline_s) if deadline_s > 0 else slowest,
        **spread([r["latency_s"] for r in rows.values()], "client_latency_s"),
        **spread(uplink_delays, "delay_up_s"),
        "bits_up": total("bits_up"),
        "bits_down": total("bits_down"),
        "retransmitted_bits": total("retransmitted_bits"),
        "retransmissions": total("retransmissions"),
        "energy_up_j": total("energy_up_j"),
        "energy_down_j": total("energy_down_j"),
        "energy_j": total("energy_j"),
        "downlink_attempts": total("downlink_attempted"),
        "uplink_attempts": total("uplink_attempted"),
        "lost_down": total("lost_down"),
        "lost_up": total("lost_up"),
        "lost_updates": sum(r["lost_up"] or (r["lost_down"] and not r["uplink_attempted"]) for r in rows.values()),
        "late": sum(r["outcome"] == "late" for r in rows.values()),
        "delivered": sum(r["outcome"] == "delivered" for r in rows.values()),
    }


def summary_block(all_round_stats: Mapping[int, dict] | Sequence[dict], cfg: ChannelConfig | None = None,
                  clients: Iterable[int] | None = None) -> dict:
    """The ``wireless`` block of ``summary.json`` from :func:`summarize_round` outputs.

    ``mean_uplink_delay_s`` is the mean over rounds of the mean over clients. Because the
    Rayleigh delay ``bits / (B log2(1 + SNR g))`` has a heavy tail (its expectation is
    infinite: ``E[1/g]`` diverges near ``g = 0``), the median and p95 over all uplinks and,
    given ``cfg``, the ergodic delay ``payload / (B E[log2(1 + SNR g)])`` are reported as well;
    the round latency (``latency_s`` of each round) likewise as mean, median and p95 over rounds.
    ``per_client`` and ``fairness`` (:func:`per_client_means`) cover ``clients`` (default: those
    that appear in a round).
    """
    rounds = list(all_round_stats.values()) if isinstance(all_round_stats, Mapping) else list(all_round_stats)
    uplinks = [c for r in rounds for c in r["clients"].values() if c["uplink_attempted"]]
    per_round = [r["mean_delay_up_s"] for r in rounds if r["mean_delay_up_s"] is not None]
    attempts = sum(r["uplink_attempts"] for r in rounds)
    down_attempts = sum(r["downlink_attempts"] for r in rounds)
    block: dict = {
        "rounds": len(rounds),
        "mean_uplink_delay_s": statistics.fmean(per_round) if per_round else None,
        "median_uplink_delay_s": statistics.median(c["delay_up_s"] for c in uplinks) if uplinks else None,
        "p95_uplink_delay_s": percentile((c["delay_up_s"] for c in uplinks), 95),
        **spread([r["latency_s"] for r in rounds], "round_latency_s"),
        "total_energy_j": sum(r["energy_j"] for r in rounds),
        "total_energy_up_j": sum(r["energy_up_j"] for r in rounds),
        "total_energy_down_j": sum(r["energy_down_j"] for r in rounds),
        "uplink_attempts": attempts,
        "lost_uplink_updates": sum(r["lost_up"] for r in rounds),
        "loss_rate": sum(r["lost_up"] for r in rounds) / attempts if attempts else None,
        "lost_downlinks": sum(r["lost_down"] for r in rounds),
        "downlink_loss_rate": sum(r["lost_down"] for r in rounds) / down_attempts if down_attempts else None,
        "lost_updates": sum(r["lost_updates"] for r in rounds),
        "total_bytes_up": sum(r["bits_up"] for r in rounds) / 8,
        "total_bytes_down": sum(r["bits_down"] for r in rounds) / 8,
        "total_retransmitted_bytes": sum(r["retransmitted_bits"] for r in rounds) / 8,
        "late_updates": sum(r.get("late", 0) for r in rounds),
        **per_client_means(rounds, clients),
    }
    if cfg is not None:
        block["ergodic_uplink_delay_s"] = _ergodic_uplink_delay(rounds, cfg)
        block["config"] = cfg.as_run_config()
    return block


# Per-client means over the rounds a client sent an update in (None values skipped).
MEAN_FIELDS = (*RADIO_FIELDS, "mcs_down", "harq_retransmissions", "delay_up_s", "delay_down_s", "energy_up_j",
               "latency_s")


def per_client_means(rounds: Sequence[dict], clients: Iterable[int] | None = None) -> dict:
    """``per_client``: per client, the rounds it was scheduled in, its updates delivered / late /
    lost and the means of :data:`MEAN_FIELDS` over its uplinks; ``fairness``: Jain's index of the
    updates delivered per client (:func:`jain_index`, every client in ``clients`` counted, 0 if
    never scheduled)."""
    rows: dict[str, list[dict]] = {str(c): [] for c in (clients or ())}
    for r in rounds:
        for cid, c in r["clients"].items():
            rows.setdefault(cid, []).append(c)
    per_client = {}
    for cid, taken in sorted(rows.items(), key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit() else 0)):
        uplinks = [c for c in taken if c["uplink_attempted"]]
        means = {}
        for name in MEAN_FIELDS:
            values = [c[name] for c in uplinks if c.get(name) is not None]
            means[f"mean_{name}"] = statistics.fmean(values) if values else None
        per_client[cid] = {"rounds": len(taken), **{f"updates_{o}": sum(c.get("outcome") == o for c in taken)
                                                     for o in ("delivered", "late", "lost")}, **means}
    delivered = [c["updates_delivered"] for c in per_client.values()]
    return {"per_client": per_client, "fairness": {"jain_updates_delivered": jain_index(delivered)}}


def _ergodic_uplink_delay(rounds: Sequence[dict], cfg: ChannelConfig) -> float | None:
    """Mean over rounds of the mean over clients of payload / (B x ergodic capacity); B is the
    band the uplink used (``rayleigh``: the client's own; 3GPP cell: its share) and the SNR the
    link's average (3GPP: the SINR)."""
    if not cfg.enabled:
        return 0.0
    capacity = {}  # bit/s/Hz per SNR in dB; the integral is not free, SNRs repeat
    per_round = []
    for r in rounds:
        delays = []
        for c in r["clients"].values():
            if c["uplink_attempted"]:
                if c["snr_db"] not in capacity:
                    capacity[c["snr_db"]] = ergodic_capacity_bps_per_hz(c["snr_db"])
                band = c.get("bandwidth_hz") or cfg.bandwidth_hz  # 0: a record from before the field
                delays.append(c["payload_bits_up"] / (band * capacity[c["snr_db"]]))
        if delays:
            per_round.append(statistics.fmean(delays))
    return statistics.fmean(per_round) if per_round else None


__all__ = ["ClientRound", "client_summary", "jain_index", "outcome", "per_client_means", "percentile", "spread",
           "summarize_round", "summary_block"]

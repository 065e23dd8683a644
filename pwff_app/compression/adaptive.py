"""Channel-adaptive size: the finest codec (or PFIT sparsity) whose expected uplink time fits.

Pure: no Flower. The server calls these per client and round with the client's last known
uplink rate (:meth:`pwff_app.wireless.link.WirelessGrid.last_uplink`: the Shannon rate of that
uplink's first attempt, bit/s) or, before its first uplink, the ergodic capacity of its
configured average SNR x the bandwidth. Expected uplink time = encoded payload bits / rate, in
s (retransmissions and the next round's fading are not known in advance: the choice is a
prediction from the last draw, not a guarantee).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from pwff_app.compression.codecs import Codec, parse_codec

#: Codecs ``adaptive`` picks from, finest (most bits per element) first: 32, 16, 8.1, 6.4, 4.1, 0.64
#: (int8 / int4 with 256-element blocks; :func:`choose_codec` orders by the actual bits).
CODEC_LADDER: tuple[str, ...] = ("none", "fp16", "int8", "topk:0.1", "int4", "topk:0.01")
#: PFIT shares of attention weights *not* sent that ``instruct.sparsity = "adaptive"`` picks from, densest first.
SPARSITY_LADDER: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9)


def expected_delay_s(bits: float, rate_bps: float) -> float:
    """Expected air time in s of ``bits`` at ``rate_bps`` (inf at a zero rate)."""
    return bits / rate_bps if rate_bps > 0 else math.inf


def choose_finest(bits_of: Sequence[float], rate_bps: float, budget_s: float) -> int:
    """Index of the first (finest) option whose ``bits / rate_bps`` fits ``budget_s``; the last
    (coarsest) one when none fits."""
    for i, bits in enumerate(bits_of):
        if expected_delay_s(bits, rate_bps) <= budget_s:
            return i
    return len(bits_of) - 1


def choose_codec(numels: Sequence[int], rate_bps: float, budget_s: float, block_size: int,
                 ladder: Sequence[str] = CODEC_LADDER) -> Codec:
    """The finest codec of ``ladder`` whose encoded update of tensors of ``numels`` elements
    is expected to cross the uplink at ``rate_bps`` within ``budget_s`` seconds."""
    sized = sorted(((sum(c.encoded_bits(n) for n in numels), i, c) for i, c in
                    enumerate(parse_codec(name, block_size) for name in ladder)), key=lambda t: (-t[0], t[1]))
    return sized[choose_finest([bits for bits, _, _ in sized], rate_bps, budget_s)][2]


def choose_sparsity(masked_numels: Sequence[int], dense_numels: Sequence[int], rate_bps: float,
                    budget_s: float, codec: Codec, ladder: Sequence[float] = SPARSITY_LADDER) -> float:
    """PFIT: the densest s of ``ladder`` whose upload (round((1 - s) n) values of each attention
    tensor, the other tensors dense, each encoded with ``codec``) fits ``budget_s`` at ``rate_bps``."""
    from pwff_app.instruct.sparse_pattern import keep_count  # pure index math

    bits = [sum(codec.encoded_bits(int(keep_count(n, s))) for n in masked_numels)
            + sum(codec.encoded_bits(n) for n in dense_numels) for s in ladder]
    return ladder[choose_finest(bits, rate_bps, budget_s)]


def budget_s(deadline_s: float, target_delay_s: float) -> float:
    """The uplink time to fit, s: the round deadline when there is one, else the target delay."""
    return deadline_s if deadline_s > 0 else target_delay_s


def numels(shapes: Mapping[str, Sequence[int]]) -> list[int]:
    """Element counts of tensors by shape."""
    return [math.prod(s) for s in shapes.values()]

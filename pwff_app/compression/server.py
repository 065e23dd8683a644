"""The server's side of compressed updates: which codec each client uses in a round, the downlink
cast, and decoding a reply before its checks and aggregation.

Both families' strategies (:class:`pwff_app.federation.strategy._PartialMixin`,
:class:`pwff_app.instruct.server.SparsePartialMixin`) hold one :class:`CompressionPlan`:

* :meth:`CompressionPlan.prepare` (in ``configure_train``) puts the client's uplink codec
  (``pwff.codec``) and the downlink cast (``pwff.downlink-codec``) in each train message's
  config, casts the broadcast arrays, and logs the choice per client and round;
* :meth:`CompressionPlan.decode` (in the reply checks) turns an encoded reply back into plain
  arrays: reference + decoded update, or one line saying why the encoding is unusable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from pwff_app.compression.adaptive import budget_s, choose_codec, expected_delay_s
from pwff_app.compression.codecs import Codec
from pwff_app.compression.wire import decode_record, payload_bits
from pwff_app.config import ChannelConfig, CompressionConfig
from pwff_app.wireless.channel import ergodic_capacity_bps_per_hz

CODEC_KEY = "pwff.codec"  # train message config: the uplink codec of this client and round
DOWNLINK_KEY = "pwff.downlink-codec"  # train message config: how the broadcast arrays are cast
ARRAYS = "arrays"


def uplink_rate_bps(grid: Any, channel: ChannelConfig, client_id: int) -> float:
    """The client's last known uplink rate in bit/s: the Shannon rate of its latest uplink's first
    attempt (``grid.last_uplink``), else the ergodic capacity of its average SNR x the bandwidth."""
    last = grid.last_uplink(client_id) if hasattr(grid, "last_uplink") else None
    if last is not None:
        return float(last.capacity_bps)
    return ergodic_capacity_bps_per_hz(channel.client_snr_db(client_id)) * channel.bandwidth_hz


def cast_record(record: ArrayRecord, codec: str) -> ArrayRecord:
    """The downlink cast of a broadcast: each array as float16 or bfloat16 bits (uint16), same shape."""
    if codec == "none":
        return record
    parts = Codec(codec)
    return ArrayRecord({k: Array(parts.encode(v.numpy())["values"].reshape(v.shape)) for k, v in record.items()})


def uncast_record(record: ArrayRecord, codec: str) -> ArrayRecord:
    """The client's float32 copy of a cast broadcast (inverse of :func:`cast_record`)."""
    if codec == "none":
        return record
    parts = Codec(codec)
    out = ArrayRecord()
    for key, arr in record.items():
        value = arr.numpy()
        out[key] = Array(parts.decode({"values": value.reshape(-1)}, value.size).reshape(value.shape))
    return out


class CompressionPlan:
    """One run's compression settings on the server (see the module docstring).

    Args:
        cfg: the ``compression`` section.
        channel: the ``wireless`` section (deadline, SNRs and bandwidth for the adaptive choice).
        record: ``(client_id, **values)`` that logs the choice in the round's record.
    """

    def __init__(self, cfg: CompressionConfig, channel: ChannelConfig,
                 record: Callable[..., None]) -> None:
        self.cfg, self.channel, self.record = cfg, channel, record
        self.budget_s = budget_s(channel.deadline_s, cfg.target_delay_s)
        self.codecs: dict[int, Codec] = {}  # node -> this round's uplink codec

    @property
    def active(self) -> bool:
        return self.cfg.enabled

    def codec_for(self, grid: Any, client_id: int, shapes: Mapping[str, tuple[int, ...]]) -> Codec:
        """The client's uplink codec this round (adaptive: from its last known rate); logged."""
        if not self.cfg.adaptive:
            codec = self.cfg.codec()
            self.record(client_id, codec=str(codec))
            return codec
        rate = uplink_rate_bps(grid, self.channel, client_id)
        codec = choose_codec([int(np.prod(s)) for s in shapes.values()], rate, self.budget_s, self.cfg.block_size)
        self.record(client_id, codec=str(codec), codec_rate_bps=rate,
                    codec_expected_s=expected_delay_s(payload_bits(shapes, codec), rate))
        return codec

    def prepare(self, messages: Iterable[Message], grid: Any, roster: Mapping[int, int],
                shapes: Callable[[int], Mapping[str, tuple[int, ...]]],
                extra: Callable[[int], dict] | None = None) -> list[Message]:
        """The train messages with each client's codec (and ``extra(client_id)`` entries) in their
        config and the broadcast cast; ``shapes(client_id)``: the tensors it will send (name -> shape)."""
        from pwff_app.wireless.link import WirelessGrid, _replace_config

        messages = list(messages)
        self.codecs = {}
        if not self.active and extra is None:
            return messages
        cast: ArrayRecord | None = None
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            add = dict(extra(roster[node]) if extra is not None else {})
            if self.active:
                self.codecs[node] = self.codec_for(grid, roster[node], shapes(roster[node]))
                add.update({CODEC_KEY: str(self.codecs[node]), DOWNLINK_KEY: self.cfg.downlink})
            content = _replace_config(msg.content, add=add)
            if self.cfg.downlink != "none":
                cast = cast if cast is not None else cast_record(msg.content[ARRAYS], self.cfg.downlink)
                content[ARRAYS] = cast
            out.append(WirelessGrid._resend(msg, content))
        return out

    def decode(self, msg: Message, reference: Mapping[str, np.ndarray]) -> ArrayRecord | str:
        """A train reply's plain arrays (``reference`` + decoded update), or why its encoding is unusable.

        ``reference``: what the client's update is relative to, as the server sent it (the global,
        or its packed sparse form). A client with ``none`` this round sends plain arrays.
        """
        record = msg.content[ARRAYS]
        codec = self.codecs.get(msg.metadata.src_node_id)
        if codec is None or not codec.lossy:
            return record
        update = decode_record(record, reference, codec)
        if isinstance(update, str):
            return update
        return ArrayRecord({k: Array((np.asarray(ref, dtype=np.float32) + update[k]).astype(ref.dtype))
                            for k, ref in reference.items()})

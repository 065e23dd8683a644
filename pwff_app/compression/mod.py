"""The client's side of compressed updates: a ClientApp mod that encodes the train reply.

Order of the mods (``client_app.py``): the link's ``uplink_mod`` outermost, then this mod, then
DP clipping around the train handler. A reply therefore passes DP clipping first (the update is
clipped before it is compressed), then this mod, then the link, which counts the encoded bytes.
On the way in this mod undoes the downlink cast, so clipping and training see float32 arrays.

What is encoded is the *update*: the reply minus the global this client received (in the
instruct family both in the packed sparse form: the kept attention values and the dense rest;
the masks come from the protocol's ``sent_masks``). With error feedback (Seide et al. 2014;
Karimireddy et al. 2019, EF-SGD) the client sends ``encode(update + residual)`` and keeps
``residual <- update + residual - decode(encode(update + residual))`` in its private state
(:class:`~pwff_app.federation.state.PrivateStore` ``residual``, beside the private LoRA: it
survives restarts like the rest of it, and is in no message). Entries the sparse mask did not
send this round keep their residual.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from pwff_app.compression.codecs import Codec
from pwff_app.compression.server import ARRAYS, CODEC_KEY, DOWNLINK_KEY, uncast_record
from pwff_app.compression.wire import encode_record
from pwff_app.config import CompressionConfig
from pwff_app.federation.payload import arrayrecord_payload_bytes
from pwff_app.federation.state import PrivateStore

RESIDUAL = "residual"  # name of the error-feedback store


def _gather(dense: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The sent form of a dense tensor: its masked values (row-major), or itself."""
    return dense[mask] if mask is not None else dense


def _scatter(dense: np.ndarray, mask: np.ndarray | None, sent: np.ndarray) -> np.ndarray:
    """``dense`` with the sent-form values ``sent`` put back in place (a new array)."""
    if mask is None:
        return np.asarray(sent, dtype=np.float32).reshape(dense.shape)
    out = dense.astype(np.float32, copy=True)
    out[mask] = sent
    return out


def encode_reply(sent: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray],
                 masks: Mapping[str, np.ndarray], codec: Codec,
                 residual: Mapping[str, np.ndarray] | None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(update to encode, new dense residual) of one reply; pure.

    ``sent``: the reply's arrays (packed where ``masks`` has the key); ``received``: the dense
    global the client trained from; ``residual``: the dense residual carried in (None: no error
    feedback, then the returned residual is empty).
    """
    update, new_residual = {}, {}
    for key, value in sent.items():
        mask = masks.get(key)
        u = np.asarray(value, dtype=np.float32) - _gather(received[key].astype(np.float32), mask)
        if residual is not None:
            carried = residual.get(key)
            carried = np.zeros(received[key].shape, np.float32) if carried is None else carried
            u = u + _gather(carried, mask)
            lost = u - codec.decode(codec.encode(u), u.size).reshape(u.shape)
            new_residual[key] = _scatter(carried, mask, lost)
        update[key] = u
    return update, new_residual


def compression_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: undo the downlink cast, then encode the train reply with the server's codec."""
    config = msg.content.config_records.get("config")
    if msg.metadata.message_type != MessageType.TRAIN or config is None:
        return call_next(msg, context)
    up, down = str(config.get(CODEC_KEY, "none")), str(config.get(DOWNLINK_KEY, "none"))
    if down != "none" and ARRAYS in msg.content.array_records:
        msg.content[ARRAYS] = uncast_record(msg.content[ARRAYS], down)
    if up == "none":
        return call_next(msg, context)
    cfg = CompressionConfig.from_run_config(context.run_config)
    codec = cfg.codec(up)
    received = {k: v.numpy() for k, v in msg.content[ARRAYS].items()}
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    from pwff_app.methods import METHODS
    from pwff_app.protocols import protocol_of

    masks = protocol_of(METHODS[str(context.run_config["method"])]).masks(msg, reply, context)
    sent = {k: v.numpy() for k, v in reply.content[ARRAYS].items()}
    client_id, server_round = int(context.node_config["partition-id"]), int(config["server-round"])
    store = PrivateStore(context, client_id, RESIDUAL)
    residual = (store.load(upto_round=server_round - 1) or {}) if cfg.error_feedback else None
    update, new_residual = encode_reply(sent, received, masks, codec, residual)
    reply.content[ARRAYS] = encode_record(update, codec)
    if cfg.error_feedback:
        store.save(new_residual, server_round)
    metrics = reply.content.metric_records.get("metrics")
    if metrics is not None and "upload-bytes" in metrics:  # the instruct family reports what it sends
        metrics["upload-bytes"] = arrayrecord_payload_bytes(reply.content[ARRAYS])
    return reply

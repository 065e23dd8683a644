"""The ClientApp: thin Flower glue that hands each message to the method's protocol.

The link is a mod around every message, so the learning code never sees the channel;
compression sits inside it (the link counts the encoded bytes) and DP clipping inside that,
so what is compressed and crosses the channel is the clipped update. Mods wrap in list
order: a reply passes DP clipping, then compression, then the link.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from pwff_app.compression.mod import compression_mod
from pwff_app.federation.privacy import dp_clipping_mod
from pwff_app.federation.roster import answer_query
from pwff_app.methods import METHODS
from pwff_app.protocols import protocol_of
from pwff_app.wireless.link import uplink_mod

app = ClientApp(mods=[uplink_mod, compression_mod])


def _handler(context: Context, kind: str):
    return protocol_of(METHODS[str(context.run_config["method"])]).handler(kind)


@app.train(mods=[dp_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    return _handler(context, "train")(msg, context)


@app.evaluate()
def evaluate_(msg: Message, context: Context) -> Message:
    return _handler(context, "evaluate")(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which client this node runs: the server asks every node once, before round 1."""
    return answer_query(msg, context)

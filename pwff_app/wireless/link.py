"""Flower glue of the wireless link: a client mod for the uplink, a Grid wrapper for the downlink.

The learning code never sees the channel. Only TRAIN messages (the FL protocol) cross the
simulated link; EVALUATE and QUERY messages are a measurement instrument and pass
untouched in both directions.

* :func:`uplink_mod` (``ClientApp(mods=[uplink_mod])``): restores the last global model
  when the downlink was lost (``stale``), sends the reply through :func:`transmit` and
  either tags it with a ``"wireless"`` ConfigRecord or replaces it with an error reply.
* :class:`WirelessGrid` (wraps the ServerApp's Grid): simulates each train message's
  downlink, strips or withholds lost ones, and keeps per-round, per-client statistics
  (:meth:`WirelessGrid.round_stats`, :meth:`WirelessGrid.summary_block`; the pure
  summaries are in :mod:`pwff_app.wireless.stats`).

Message boundary (fixed contract): train messages carry ``"arrays"`` (ArrayRecord) and
``"config"`` (ConfigRecord with ``"server-round"``); train replies carry one ArrayRecord,
one MetricRecord and ``"info"`` (ConfigRecord with ``"client-id"`` and ``"compute-s"``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import log
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from pwff_app.config import ChannelConfig
from pwff_app.federation.payload import payload_bytes
from pwff_app.wireless.channel import LinkResult, combine_links, transmit
from pwff_app.wireless.stats import ClientRound, summarize_round, summary_block

# Error codes of replies the channel produced (Flower's own codes are 0-8).
UPLINK_LOST = 7001  # the client's update did not get through (reason: prefix + JSON stats)
DOWNLINK_LOST = 7002  # ``skip``: the global model did not reach the client, it sat out
NO_STALE_COPY = 7003  # ``stale``: downlink lost and the client had no earlier copy

# Error reasons: prefix + compact JSON (LinkResult fields, or client_id and server_round).
UPLINK_LOST_PREFIX = "wireless: uplink lost "
DOWNLINK_LOST_PREFIX = "wireless: downlink lost "
NO_STALE_COPY_PREFIX = "wireless: downlink lost and no earlier global model "

WIRELESS_KEY = "wireless"  # ConfigRecord the mod adds to delivered train replies
DOWNLINK_LOST_FLAG = "pwff.downlink-lost"  # set in "config" of a stripped train message
DOWNLINK_DELAY_KEY = "pwff.downlink-delay-s"  # realtime only: downlink delay to sleep
_STATE_PREFIX = "wireless.last-global."  # + ArrayRecord key, in the client's context.state


def _is_train(msg: Message) -> bool:
    return msg.metadata.message_type.split(".")[0] == MessageType.TRAIN


def _round_config(content: RecordDict) -> tuple[str, ConfigRecord]:
    """Key and record of the ConfigRecord that holds ``"server-round"``."""
    for key, record in content.config_records.items():
        if "server-round" in record:
            return key, record
    raise ValueError("wireless: a train message must carry a ConfigRecord with 'server-round'")


def _compact(record: Mapping[str, object]) -> str:
    return json.dumps(record, separators=(",", ":"))


def _replace_config(
    content: RecordDict, drop: Sequence[str] = (), add: Mapping[str, object] | None = None
) -> RecordDict:
    """Shallow copy of ``content`` whose round ConfigRecord is a new, edited copy.

    Never edits ``content`` itself: strategies send one RecordDict to every node.
    """
    key, config = _round_config(content)
    new_config = ConfigRecord({k: v for k, v in config.items() if k not in drop})
    for k, v in (add or {}).items():
        new_config[k] = v
    new = RecordDict(dict(content.items()))
    new[key] = new_config
    return new


def _copy_arrays(record: ArrayRecord) -> ArrayRecord:
    """New ArrayRecord holding the same (immutable) Arrays."""
    copy = ArrayRecord()
    for key, array in record.items():
        copy[key] = array
    return copy


# ---------------------------------------------------------------------------------------
# Client side
# ---------------------------------------------------------------------------------------


def uplink_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: downlink-stale restore, then the uplink of the train reply.

    Settings come from ``context.run_config`` (:meth:`ChannelConfig.from_run_config`); with
    ``wireless.enabled = false`` or a non-train message it only calls ``call_next``.

    Returns the ClientApp's reply with a ``"wireless"`` ConfigRecord of uplink statistics,
    or ``Message(Error(UPLINK_LOST, UPLINK_LOST_PREFIX + json), reply_to=msg)`` when the
    update is lost, or ``Error(NO_STALE_COPY, ...)`` when the downlink was lost and no
    earlier global model is at hand.
    """
    cfg = ChannelConfig.from_run_config(context.run_config)
    if not cfg.enabled or not _is_train(msg):
        return call_next(msg, context)
    client_id = int(context.node_config["partition-id"])
    _, config = _round_config(msg.content)
    server_round = int(config["server-round"])
    if cfg.realtime:
        time.sleep(float(config.get(DOWNLINK_DELAY_KEY, 0.0)))

    if config.get(DOWNLINK_LOST_FLAG, False):
        restored = {k: context.state.get(_STATE_PREFIX + k) for k in msg.content.array_records}
        if any(r is None for r in restored.values()):
            reason = NO_STALE_COPY_PREFIX + _compact({"client_id": client_id, "server_round": server_round})
            return Message(Error(code=NO_STALE_COPY, reason=reason), reply_to=msg)
        content = _replace_config(msg.content, drop=(DOWNLINK_LOST_FLAG, DOWNLINK_DELAY_KEY))
        for key, record in restored.items():
            content[key] = _copy_arrays(record)  # the learner may edit its copy
        msg.content = content
    else:
        for key, record in msg.content.array_records.items():
            context.state[_STATE_PREFIX + key] = _copy_arrays(record)
        if DOWNLINK_DELAY_KEY in config:
            msg.content = _replace_config(msg.content, drop=(DOWNLINK_DELAY_KEY,))

    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    link = transmit(8 * payload_bytes(reply.content), cfg, client_id, server_round, "up")
    if cfg.realtime:
        time.sleep(link.delay_s)
    if link.delivered:
        reply.content[WIRELESS_KEY] = ConfigRecord(link.to_record())
        return reply
    stats = link.to_record()
    info = reply.content.config_records.get("info")
    if info is not None and "compute-s" in info:
        stats["compute_s"] = float(info["compute-s"])
    return Message(Error(code=UPLINK_LOST, reason=UPLINK_LOST_PREFIX + _compact(stats)), reply_to=msg)


# ---------------------------------------------------------------------------------------
# Server side
# ---------------------------------------------------------------------------------------


class WirelessGrid(Grid):
    """A ``Grid`` that puts each train message through the downlink and logs both links.

    Pass it wherever the Grid goes (``strategy.start(grid=WirelessGrid(grid, cfg), ...)``);
    every Grid method and attribute is delegated to the wrapped one.

    The server does not know which client (``partition-id``) a node runs until a reply
    tells it (``info["client-id"]`` or the uplink record); before that the node's index in
    ``sorted(get_node_ids())`` stands in, so round-1 downlinks of a per-client SNR list may
    use another client's SNR.
    """

    def __init__(self, grid: Grid, cfg: ChannelConfig) -> None:
        self._grid = grid
        self.cfg = cfg
        self._client_of_node: dict[int, int] = {}
        self._rounds: dict[int, dict[int, ClientRound]] = {}  # round -> node id -> links
        self._warned_no_mod = False

    # -- delegation ------------------------------------------------------------------

    def __getattr__(self, name: str) -> object:
        if name == "_grid":  # not set yet (e.g. while unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self._grid, name)

    def set_run(self, run: Run) -> None:
        """Delegate."""
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        """Delegate."""
        return self._grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        """Delegate."""
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Delegate."""
        return self._grid.get_node_ids()

    def get_nodes(self) -> Iterable:
        """Delegate."""
        return self._grid.get_nodes()

    # -- the links -------------------------------------------------------------------

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Downlink, delegate, then log the uplinks; lost ``skip`` downlinks come back as errors."""
        to_send, withheld = self._downlink(list(messages))
        replies = list(self._grid.send_and_receive(to_send, timeout=timeout))
        self._log_replies(replies)
        return replies + withheld

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Downlink, then delegate. A ``skip``-lost message is not pushed and has no id."""
        to_send, _ = self._downlink(list(messages))
        return self._grid.push_messages(to_send)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegate, then log the uplinks of the replies."""
        replies = list(self._grid.pull_messages(message_ids))
        self._log_replies(replies)
        return replies

    def _draw_client_id(self, node_id: int, nodes: Sequence[int]) -> int:
        """Client id keying the downlink draws: learned, else the node's sorted index."""
        if node_id in self._client_of_node:
            return self._client_of_node[node_id]
        return nodes.index(node_id) if node_id in nodes else len(nodes)

    def _entry(self, server_round: int, node_id: int) -> ClientRound:
        nodes = self._rounds.setdefault(server_round, {})
        if node_id not in nodes:
            nodes[node_id] = ClientRound(node_id=node_id, client_id=self._client_of_node.get(node_id))
        return nodes[node_id]

    def _learn_client(self, node_id: int, client_id: int) -> None:
        """Remember which client a node runs and name it in the rounds logged so far."""
        self._client_of_node[node_id] = client_id
        for nodes in self._rounds.values():
            if node_id in nodes:
                nodes[node_id].client_id = client_id

    def _downlink(self, messages: list[Message]) -> tuple[list[Message], list[Message]]:
        """Return (messages to send, error replies for messages withheld under ``skip``)."""
        train = [m for m in messages if _is_train(m)]
        if not train:
            return messages, []
        nodes = sorted(self.get_node_ids())
        to_send: list[Message] = []
        withheld: list[Message] = []
        for msg in messages:
            if not _is_train(msg):
                to_send.append(msg)
                continue
            node_id = msg.metadata.dst_node_id
            _, config = _round_config(msg.content)
            server_round = int(config["server-round"])
            client_id = self._draw_client_id(node_id, nodes)
            link = transmit(8 * payload_bytes(msg.content), self.cfg, client_id, server_round, "down")
            entry = self._entry(server_round, node_id)
            entry.down = combine_links(entry.down, link)  # several per round in split learning
            if not self.cfg.enabled:
                to_send.append(msg)
            elif not link.delivered and self.cfg.downlink_miss == "skip":
                reason = DOWNLINK_LOST_PREFIX + _compact(link.to_record())
                withheld.append(Message(Error(code=DOWNLINK_LOST, reason=reason), reply_to=msg))
            elif not link.delivered:  # stale: config only, the client trains on its last copy
                content = _replace_config(msg.content, add={DOWNLINK_LOST_FLAG: True, **self._realtime(link)})
                for key in msg.content.array_records:
                    content[key] = ArrayRecord()
                to_send.append(self._resend(msg, content))
            elif self.cfg.realtime:
                to_send.append(self._resend(msg, _replace_config(msg.content, add=self._realtime(link))))
            else:
                to_send.append(msg)
        return to_send, withheld

    def _realtime(self, link: LinkResult) -> dict[str, float]:
        """Config entry that makes the client sleep its own downlink delay (realtime only)."""
        return {DOWNLINK_DELAY_KEY: link.delay_s} if self.cfg.realtime else {}

    @staticmethod
    def _resend(msg: Message, content: RecordDict) -> Message:
        """A new message with the metadata of ``msg`` and other content."""
        md = msg.metadata
        return Message(
            content, md.dst_node_id, md.message_type, ttl=md.ttl, group_id=md.group_id, dst_task_id=md.dst_task_id
        )

    def _log_replies(self, replies: Iterable[Message]) -> None:
        for reply in replies:
            if not _is_train(reply):
                continue
            node_id = reply.metadata.src_node_id
            up, compute_s, client_id = self._uplink_of(reply)
            if client_id is not None:
                self._learn_client(node_id, client_id)
            server_round = up.server_round if up else self._latest_round_of(node_id)
            if server_round is None or (up is None and compute_s is None):
                continue
            entry = self._entry(server_round, node_id)
            if up is not None:
                entry.up = combine_links(entry.up, up)
            if compute_s is not None:
                entry.compute_s = (entry.compute_s or 0.0) + compute_s

    def _latest_round_of(self, node_id: int) -> int | None:
        rounds = [r for r, nodes in self._rounds.items() if node_id in nodes]
        return max(rounds) if rounds else None

    def _uplink_of(self, reply: Message) -> tuple[LinkResult | None, float | None, int | None]:
        """(uplink result, compute seconds, client id) of a train reply, as far as known."""
        if reply.has_error():
            reason = reply.error.reason or ""
            if reply.error.code == UPLINK_LOST and reason.startswith(UPLINK_LOST_PREFIX):
                stats = json.loads(reason[len(UPLINK_LOST_PREFIX) :])
                return LinkResult.from_record(stats), stats.get("compute_s"), int(stats["client_id"])
            if reply.error.code == NO_STALE_COPY and reason.startswith(NO_STALE_COPY_PREFIX):
                return None, None, int(json.loads(reason[len(NO_STALE_COPY_PREFIX) :])["client_id"])
            return None, None, None
        content = reply.content
        info = content.config_records.get("info")
        compute_s = float(info["compute-s"]) if info is not None and "compute-s" in info else None
        client_id = int(info["client-id"]) if info is not None and "client-id" in info else None
        if WIRELESS_KEY in content.config_records:
            up = LinkResult.from_record(content.config_records[WIRELESS_KEY])
            return up, compute_s, up.client_id
        if client_id is None:
            return None, compute_s, None
        if self.cfg.enabled and not self._warned_no_mod:
            self._warned_no_mod = True
            log(WARNING, "wireless: train replies carry no uplink record; is uplink_mod in ClientApp(mods=...)?")
        server_round = self._latest_round_of(reply.metadata.src_node_id)
        if server_round is None:
            return None, compute_s, client_id
        # Account the uplink as the mod would have (same draws); nothing is dropped here.
        up = transmit(8 * payload_bytes(content), self.cfg, client_id, server_round, "up")
        return up, compute_s, client_id

    # -- results ---------------------------------------------------------------------

    def round_stats(self, server_round: int) -> dict:
        """:func:`summarize_round` of one round (empty round if nothing was sent)."""
        stats = summarize_round(self._rounds.get(server_round, {}).values())
        log(
            INFO,
            "wireless round %s: latency %.3f s, lost %s/%s uplinks, %s downlinks",
            server_round, stats["latency_s"], stats["lost_up"], stats["uplink_attempts"], stats["lost_down"],
        )  # fmt: skip
        return stats

    def all_round_stats(self) -> dict[int, dict]:
        """``round_stats`` of every round with train traffic, by round."""
        return {r: summarize_round(nodes.values()) for r, nodes in sorted(self._rounds.items())}

    def summary_block(self) -> dict:
        """:func:`summary_block` over every round, with this grid's config."""
        return summary_block(self.all_round_stats(), self.cfg)

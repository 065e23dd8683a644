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
  summaries are in :mod:`pwff_app.wireless.stats`). It keys every draw by the client a
  node runs, from the roster the server fixed before round 1
  (:mod:`pwff_app.federation.roster`): same seed, same channel, from the first downlink on.

Message boundary (fixed contract): train messages carry ``"arrays"`` (ArrayRecord) and
``"config"`` (ConfigRecord with ``"server-round"``); train replies carry one ArrayRecord,
one MetricRecord and ``"info"`` (ConfigRecord with ``"client-id"`` and ``"compute-s"``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import log
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from pwff_app.config import ChannelConfig
from pwff_app.federation.checks import WIRELESS, as_integer, as_number
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

WIRELESS_KEY = WIRELESS  # ConfigRecord the mod adds to delivered train replies
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


def _valid_uplink(record: Mapping[str, object], client_id: int, server_round: int | None) -> LinkResult | None:
    """The uplink record of a reply as a LinkResult, or None unless every field has its type
    (integers and finite non-negative numbers; the SNR may be negative) and it names this
    client's uplink in ``server_round``: a client's reply is input from outside."""
    if any(f.name not in record for f in fields(LinkResult)):
        return None
    for f in fields(LinkResult):
        value = record[f.name]
        if f.type == "int":
            ok = as_integer(value) is not None and value >= 0
        elif f.type == "float":
            ok = as_number(value) is not None and (value >= 0 or f.name == "snr_db")
        else:  # delivered (bool), direction (str)
            ok = isinstance(value, bool) if f.type == "bool" else value == "up"
        if not ok:
            return None
    link = LinkResult.from_record(record)
    return link if (link.client_id, link.server_round) == (client_id, server_round) else None


def _seconds(value: object) -> float | None:
    """A reported duration if it is a finite number >= 0, else None."""
    number = as_number(value)
    return float(number) if number is not None and number >= 0 else None


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

    Pass it wherever the Grid goes (``strategy.start(grid=WirelessGrid(grid, cfg, roster), ...)``);
    every Grid method and attribute is delegated to the wrapped one.

    ``roster`` (node id -> client id, :func:`pwff_app.federation.roster.query_roster`) says
    which client each node runs before round 1, so every draw is keyed by the client from
    the first downlink on. Train messages go to roster nodes only (the strategies send to
    no other); a reply's uplink record is used only if it is well-formed and names the
    node's own client, else the uplink is accounted here with the same draws.
    """

    def __init__(self, grid: Grid, cfg: ChannelConfig, roster: Mapping[int, int]) -> None:
        self._grid = grid
        self.cfg = cfg
        self.roster = dict(roster)
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

    def _entry(self, server_round: int, node_id: int) -> ClientRound:
        nodes = self._rounds.setdefault(server_round, {})
        if node_id not in nodes:
            nodes[node_id] = ClientRound(node_id=node_id, client_id=self.roster[node_id])
        return nodes[node_id]

    def _downlink(self, messages: list[Message]) -> tuple[list[Message], list[Message]]:
        """Return (messages to send, error replies for messages withheld under ``skip``)."""
        to_send: list[Message] = []
        withheld: list[Message] = []
        for msg in messages:
            if not _is_train(msg):
                to_send.append(msg)
                continue
            node_id = msg.metadata.dst_node_id
            _, config = _round_config(msg.content)
            server_round = int(config["server-round"])
            if node_id not in self.roster:
                raise ValueError(f"wireless: train message to node {node_id}, which is not in the roster")
            client_id = self.roster[node_id]
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
            node_id = reply.metadata.src_node_id
            if not _is_train(reply) or node_id not in self.roster:
                continue
            server_round = self._latest_round_of(node_id)
            if server_round is None:
                continue
            up, compute_s = self._uplink_of(reply, self.roster[node_id], server_round)
            entry = self._entry(server_round, node_id)
            if up is not None:
                entry.up = combine_links(entry.up, up)
            if compute_s is not None:
                entry.compute_s = (entry.compute_s or 0.0) + compute_s

    def _latest_round_of(self, node_id: int) -> int | None:
        rounds = [r for r, nodes in self._rounds.items() if node_id in nodes]
        return max(rounds) if rounds else None

    def _uplink_of(self, reply: Message, client_id: int, server_round: int) -> tuple[LinkResult | None, float | None]:
        """(uplink result, compute seconds) of a train reply of ``client_id`` in ``server_round``.

        From the mod's record (in a delivered reply, or the reason of an uplink-lost error) when
        it is well-formed; else, for a delivered reply, accounted here as the mod would have
        (same draws; nothing is dropped here).
        """
        if reply.has_error():
            reason = reply.error.reason or ""
            if reply.error.code != UPLINK_LOST or not reason.startswith(UPLINK_LOST_PREFIX):
                return None, None
            try:
                stats = json.loads(reason[len(UPLINK_LOST_PREFIX):])
            except ValueError:
                return None, None
            if not isinstance(stats, dict):
                return None, None
            return _valid_uplink(stats, client_id, server_round), _seconds(stats.get("compute_s"))
        content = reply.content
        info = content.config_records.get("info")
        compute_s = _seconds(info.get("compute-s")) if info is not None else None
        record = content.config_records.get(WIRELESS_KEY)
        up = _valid_uplink(record, client_id, server_round) if record is not None else None
        if up is not None:
            return up, compute_s
        if self.cfg.enabled and not self._warned_no_mod:
            self._warned_no_mod = True
            log(WARNING, "wireless: a train reply carries no usable uplink record (is uplink_mod in "
                "ClientApp(mods=...)?): its uplink is accounted on the server")
        return transmit(8 * payload_bytes(content), self.cfg, client_id, server_round, "up"), compute_s

    def last_uplink(self, client_id: int) -> LinkResult | None:
        """The most recent uplink record of ``client_id`` (any round; lost ones included), or None."""
        for server_round in sorted(self._rounds, reverse=True):
            for entry in self._rounds[server_round].values():
                if entry.client_id == client_id and entry.up is not None:
                    return entry.up
        return None

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

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

In a 3GPP cell (``wireless.scenario`` = ``uma`` | ``umi`` | ``rma``, :mod:`pwff_app.wireless.cell`)
the Grid is the base station: it plans each round once for all its train messages (the band
shares, :mod:`pwff_app.wireless.scheduler`, and the MCS link adaptation picks from the average
SINR), broadcasts the global model and sends each client its grant in the round's ConfigRecord
(``pwff.ul-share``, ``pwff.ul-mcs``); the mod sends the update with it. The server does not take
the client's word for its uplink: it recomputes it from the grant it sent (same draws).

With ``wireless.deadline-s`` > 0 an update that reaches the server later than the deadline after
its round's downlink (downlink delay + the client's reported compute time + uplink delay) is
replaced by an error reply (``DEADLINE_MISSED``): the strategy skips it like a lost one, and
the round counts it as ``late``.

Message boundary (fixed contract): train messages carry ``"arrays"`` (ArrayRecord) and
``"config"`` (ConfigRecord with ``"server-round"``); train replies carry one ArrayRecord,
one MetricRecord and ``"info"`` (ConfigRecord with ``"client-id"`` and ``"compute-s"``).
"""

from __future__ import annotations

import json
import math
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
from pwff_app.config.sections import Direction
from pwff_app.federation.roster import ClientHistory
from pwff_app.wireless.cell import Grant, choose_mcs, mean_sinr_db, resource_elements, transmit_cell
from pwff_app.wireless.channel import LinkResult, combine_links, transmit
from pwff_app.wireless.scheduler import ProportionalFair, equal_shares
from pwff_app.wireless.stats import ClientRound, summarize_round, summary_block

# Error codes of replies the channel produced (Flower's own codes are 0-8).
UPLINK_LOST = 7001  # the client's update did not get through (reason: prefix + JSON stats)
DOWNLINK_LOST = 7002  # ``skip``: the global model did not reach the client, it sat out
NO_STALE_COPY = 7003  # ``stale``: downlink lost and the client had no earlier copy
DEADLINE_MISSED = 7004  # the update arrived after the round's deadline (replaced on the server)

# Error reasons: prefix + compact JSON (LinkResult fields, or client_id and server_round).
UPLINK_LOST_PREFIX = "wireless: uplink lost "
DOWNLINK_LOST_PREFIX = "wireless: downlink lost "
NO_STALE_COPY_PREFIX = "wireless: downlink lost and no earlier global model "
DEADLINE_PREFIX = "wireless: update late "

WIRELESS_KEY = WIRELESS  # ConfigRecord the mod adds to delivered train replies
DOWNLINK_LOST_FLAG = "pwff.downlink-lost"  # set in "config" of a stripped train message
DOWNLINK_DELAY_KEY = "pwff.downlink-delay-s"  # realtime only: downlink delay to sleep
GRANT_SHARE_KEY = "pwff.ul-share"  # 3GPP cell: the client's share of the band for its uplink
GRANT_MCS_KEY = "pwff.ul-mcs"  # 3GPP cell: the MCS of its uplink
_LINK_KEYS = (DOWNLINK_LOST_FLAG, DOWNLINK_DELAY_KEY, GRANT_SHARE_KEY, GRANT_MCS_KEY)  # never reach the learner
# Fields of a LinkResult that may be negative, and their lower bound (else >= 0).
_LOWER_BOUND = {"snr_db": -float("inf"), "sinr_db": -float("inf"), "mcs": -1, "distance_m": -1.0}
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
            ok = as_integer(value) is not None and value >= _LOWER_BOUND.get(f.name, 0)
        elif f.type == "float":
            ok = as_number(value) is not None and value >= _LOWER_BOUND.get(f.name, 0.0)
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


def num_clients_of(run_config: Mapping[str, object]) -> int:
    """The run's ``num-clients`` (the 3GPP drop places this many)."""
    return int(run_config.get("num-clients", 1))


def send(payload_bits: int, cfg: ChannelConfig, num_clients: int, client_id: int, server_round: int,
         direction: Direction, grant: Grant | None) -> LinkResult:
    """One message over the configured link: ``rayleigh`` (:func:`transmit`) or the 3GPP cell
    (:func:`transmit_cell` with the base station's ``grant``)."""
    if cfg.enabled and cfg.cell:
        if grant is None:
            raise ValueError("wireless: a 3GPP cell link needs the base station's grant")
        return transmit_cell(payload_bits, cfg, num_clients, client_id, server_round, direction, grant)
    return transmit(payload_bits, cfg, client_id, server_round, direction)


def _grant_of(config: Mapping[str, object]) -> Grant | None:
    """The uplink grant a train message carries (3GPP cell), else None."""
    if GRANT_SHARE_KEY not in config:
        return None
    return Grant(share=float(config[GRANT_SHARE_KEY]), mcs=int(config[GRANT_MCS_KEY]))


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
    grant = _grant_of(config)
    if cfg.realtime:
        time.sleep(float(config.get(DOWNLINK_DELAY_KEY, 0.0)))

    if config.get(DOWNLINK_LOST_FLAG, False):
        restored = {k: context.state.get(_STATE_PREFIX + k) for k in msg.content.array_records}
        if any(r is None for r in restored.values()):
            reason = NO_STALE_COPY_PREFIX + _compact({"client_id": client_id, "server_round": server_round})
            return Message(Error(code=NO_STALE_COPY, reason=reason), reply_to=msg)
        content = _replace_config(msg.content, drop=_LINK_KEYS)
        for key, record in restored.items():
            content[key] = _copy_arrays(record)  # the learner may edit its copy
        msg.content = content
    else:
        for key, record in msg.content.array_records.items():
            context.state[_STATE_PREFIX + key] = _copy_arrays(record)
        if any(key in config for key in _LINK_KEYS):
            msg.content = _replace_config(msg.content, drop=_LINK_KEYS)

    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    link = send(8 * payload_bytes(reply.content), cfg, num_clients_of(context.run_config), client_id,
                server_round, "up", grant)
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

    def __init__(self, grid: Grid, cfg: ChannelConfig, roster: Mapping[int, int], num_clients: int | None = None) -> None:
        self._grid = grid
        self.cfg = cfg
        self.roster = dict(roster)
        # The 3GPP drop places the run's num-clients (some may have left the roster).
        self.num_clients = num_clients or max(self.roster.values(), default=0) + 1
        self._rounds: dict[int, dict[int, ClientRound]] = {}  # round -> node id -> links
        self._grants: dict[int, dict[int, tuple[Grant, Grant]]] = {}  # round -> client -> (up, down)
        self._sent: dict[int, Message] = {}  # node -> the last train message sent to it
        self._pf = (ProportionalFair(self.num_clients)
                    if cfg.enabled and cfg.cell and cfg.allocation == "proportional-fair" else None)
        self._warned_no_mod = False
        self._warned_claim = False

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
        replies = self._log_replies(self._grid.send_and_receive(to_send, timeout=timeout))
        return replies + withheld

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Downlink, then delegate. A ``skip``-lost message is not pushed and has no id."""
        to_send, _ = self._downlink(list(messages))
        return self._grid.push_messages(to_send)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegate, then log the uplinks of the replies."""
        return self._log_replies(self._grid.pull_messages(message_ids))

    def _entry(self, server_round: int, node_id: int) -> ClientRound:
        nodes = self._rounds.setdefault(server_round, {})
        if node_id not in nodes:
            nodes[node_id] = ClientRound(node_id=node_id, client_id=self.roster[node_id])
        return nodes[node_id]

    def _downlink(self, messages: list[Message]) -> tuple[list[Message], list[Message]]:
        """Return (messages to send, error replies for messages withheld under ``skip``)."""
        to_send: list[Message] = []
        withheld: list[Message] = []
        self._plan(messages)
        for msg in messages:
            if not _is_train(msg):
                to_send.append(msg)
                continue
            node_id = msg.metadata.dst_node_id
            _, config = _round_config(msg.content)
            server_round = int(config["server-round"])
            client_id = self.roster[node_id]
            grant = self._grants.get(server_round, {}).get(client_id)
            link = send(8 * payload_bytes(msg.content), self.cfg, self.num_clients, client_id, server_round, "down",
                        grant[1] if grant else None)
            entry = self._entry(server_round, node_id)
            entry.down = combine_links(entry.down, link)  # several per round in split learning
            add = {**self._realtime(link), **self._grant_keys(grant)}
            if not self.cfg.enabled:
                to_send.append(msg)
            elif not link.delivered and self.cfg.downlink_miss == "skip":
                reason = DOWNLINK_LOST_PREFIX + _compact(link.to_record())
                withheld.append(Message(Error(code=DOWNLINK_LOST, reason=reason), reply_to=msg))
            elif not link.delivered:  # stale: config only, the client trains on its last copy
                content = _replace_config(msg.content, add={DOWNLINK_LOST_FLAG: True, **add})
                for key in msg.content.array_records:
                    content[key] = ArrayRecord()
                to_send.append(self._resend(msg, content))
            elif add:
                to_send.append(self._resend(msg, _replace_config(msg.content, add=add)))
            else:
                to_send.append(msg)
        self._sent.update({m.metadata.dst_node_id: m for m in to_send if _is_train(m)})
        return to_send, withheld

    def _plan(self, messages: list[Message]) -> None:
        """3GPP cell: the base station's grants for the clients of each round these messages start.

        Planned once per round and client (split learning sends many messages a round): the
        round's first train messages are scheduled together.
        """
        by_round: dict[int, list[int]] = {}
        for msg in messages:
            if _is_train(msg):
                node_id = msg.metadata.dst_node_id
                if node_id not in self.roster:
                    raise ValueError(f"wireless: train message to node {node_id}, which is not in the roster")
                server_round = int(_round_config(msg.content)[1]["server-round"])
                by_round.setdefault(server_round, []).append(self.roster[node_id])
        if not (self.cfg.enabled and self.cfg.cell):
            return
        for server_round, clients in by_round.items():
            planned = self._grants.setdefault(server_round, {})
            new = sorted(set(clients) - set(planned))
            if new:
                planned.update(self.plan_round(new))

    def plan_round(self, clients: list[int]) -> dict[int, tuple[Grant, Grant]]:
        """(uplink grant, downlink grant) per client of a round, from what the base station knows.

        Shares of the band: ``equal``, or ``proportional-fair`` on each client's achievable rate
        at an equal share (average SINR: the large scale, never the coming fade). Uplink MCS:
        link adaptation on the average SINR over the client's share. Downlink: one broadcast
        over the whole band at the MCS the worst client of the round can decode.
        """
        cfg, n = self.cfg, self.num_clients
        equal = 1.0 / len(clients)
        if self._pf is not None:
            rates = {c: equal * cfg.bandwidth_hz * math.log2(1 + 10 ** (mean_sinr_db(cfg, n, c, "up", equal) / 10))
                     for c in clients}
            shares = self._pf.shares(rates)
        else:
            shares = equal_shares(clients)
        worst = min(mean_sinr_db(cfg, n, c, "down", 1.0) for c in clients)
        down = Grant(1.0, choose_mcs(cfg, worst, resource_elements(cfg, 1.0), "down"))
        return {c: (Grant(shares[c], choose_mcs(cfg, mean_sinr_db(cfg, n, c, "up", shares[c]),
                                                resource_elements(cfg, shares[c]), "up")), down)
                for c in clients}

    def grant(self, server_round: int, client_id: int) -> Grant | None:
        """The uplink grant the base station sent a client for a round (3GPP cell), else None."""
        grants = self._grants.get(server_round, {}).get(client_id)
        return grants[0] if grants else None

    @staticmethod
    def _grant_keys(grant: tuple[Grant, Grant] | None) -> dict[str, float | int]:
        """ConfigRecord entries that carry a client's uplink grant."""
        return {GRANT_SHARE_KEY: grant[0].share, GRANT_MCS_KEY: grant[0].mcs} if grant else {}

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

    def _log_replies(self, replies: Iterable[Message]) -> list[Message]:
        """Log the uplinks of train replies; a delivered update past the deadline becomes an error reply."""
        out = []
        for reply in replies:
            node_id = reply.metadata.src_node_id
            server_round = self._latest_round_of(node_id) if node_id in self.roster else None
            if not _is_train(reply) or server_round is None:
                out.append(reply)
                continue
            up, compute_s = self._uplink_of(reply, self.roster[node_id], server_round)
            entry = self._entry(server_round, node_id)
            if up is not None:
                entry.up = combine_links(entry.up, up)
            if compute_s is not None:
                entry.compute_s = (entry.compute_s or 0.0) + compute_s
            if not reply.has_error() and self._late(entry):
                entry.late = True
                reason = DEADLINE_PREFIX + _compact({"client_id": entry.client_id, "server_round": server_round,
                                                     "arrival_s": self._arrival_s(entry),
                                                     "deadline_s": self.cfg.deadline_s})
                reply = Message(Error(code=DEADLINE_MISSED, reason=reason), reply_to=self._sent[node_id])
            out.append(reply)
        return out

    @staticmethod
    def _arrival_s(entry: ClientRound) -> float:
        """When the update arrived, in s after the round's downlink began: down + compute + up."""
        return sum(x for x in (entry.down.delay_s if entry.down else 0.0, entry.compute_s or 0.0,
                               entry.up.delay_s if entry.up else 0.0))

    def _late(self, entry: ClientRound) -> bool:
        """Whether a delivered update arrived after ``deadline_s`` (0 = no deadline)."""
        return (self.cfg.deadline_s > 0 and entry.up is not None and entry.up.delivered
                and self._arrival_s(entry) > self.cfg.deadline_s)

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
        own = (send(8 * payload_bytes(content), self.cfg, self.num_clients, client_id, server_round, "up",
                    self.grant(server_round, client_id))
               if up is None or self.cfg.cell else None)
        if up is not None and (own is None or own == up):
            return up, compute_s
        if up is not None and not self._warned_claim:  # 3GPP: the record is not what the grant gives
            self._warned_claim = True
            log(WARNING, "wireless: client %s's uplink record differs from the grant the base station sent: "
                "its uplink is accounted on the server", client_id)
        if up is None and self.cfg.enabled and not self._warned_no_mod:
            self._warned_no_mod = True
            log(WARNING, "wireless: a train reply carries no usable uplink record (is uplink_mod in "
                "ClientApp(mods=...)?): its uplink is accounted on the server")
        return own, compute_s

    def history(self, before_round: int) -> dict[int, ClientHistory]:
        """What the link knows of each client from the rounds before ``before_round``: its latest
        uplink SINR and the rounds whose update arrived (delivered, in time). Selection reads this."""
        out: dict[int, ClientHistory] = {}
        for server_round in sorted(r for r in self._rounds if r < before_round):
            for entry in self._rounds[server_round].values():
                if entry.up is None:
                    continue
                old = out.get(entry.client_id, ClientHistory())
                arrived = entry.up.delivered and not entry.late
                out[entry.client_id] = ClientHistory(
                    last_sinr_db=entry.up.sinr_db, delivered=old.delivered + ((server_round,) if arrived else ()))
        return out

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
        stats = summarize_round(self._rounds.get(server_round, {}).values(), self.cfg.deadline_s)
        log(
            INFO,
            "wireless round %s: latency %.3f s, lost %s/%s uplinks, %s downlinks",
            server_round, stats["latency_s"], stats["lost_up"], stats["uplink_attempts"], stats["lost_down"],
        )  # fmt: skip
        return stats

    def all_round_stats(self) -> dict[int, dict]:
        """``round_stats`` of every round with train traffic, by round."""
        return {r: summarize_round(nodes.values(), self.cfg.deadline_s) for r, nodes in sorted(self._rounds.items())}

    def summary_block(self) -> dict:
        """:func:`summary_block` over every round, with this grid's config."""
        return summary_block(self.all_round_stats(), self.cfg, clients=sorted(self.roster.values()))

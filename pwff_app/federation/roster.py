"""The node <-> client mapping (the roster), fixed before round 1 by one QUERY to every node.

Flower's node ids are random and say nothing about which client (``partition-id``) a node
runs. Before round 1 the server asks every node (:func:`query_roster`); each answers its
client id (:func:`answer_query`, the ClientApp's ``@app.query()``). From then on the server
knows every node's client from the first downlink on: the link keys its fading draws by it
(same seed, same channel, also in round 1 and after a resume), the strategies record by it,
and a reply whose ``client-id`` is not its node's is rejected as spoofed.

Query messages are a control exchange: they bypass the simulated link, like evaluation.

With ``clients-per-round`` k > 0, each round trains k clients of the roster picked by the run's
``selection`` policy (:class:`RoundSampler`, :data:`POLICIES`): ``random`` draws them from
(seed, round) alone, so a rerun samples alike whatever the node ids; ``best-channel``,
``proportional-fair`` and ``age`` rank the clients by what the link recorded in earlier rounds
only (:class:`ClientHistory`: what a base station knows, never the coming fade).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from pwff_app.federation.checks import INFO as INFO_KEY
from pwff_app.federation.checks import AllClientsFailed, query_problem, stop_if_all_failed
from pwff_app.federation.results import RunRecorder

Roster = dict[int, int]
"""Node id -> client id (``partition-id``) of every node that answered the start-up query."""

QUERY_TIMEOUT_S = 3600.0  # as Flower strategies' default round timeout


def answer_query(msg: Message, context: Context) -> Message:
    """Client side: the client this node runs (``node_config["partition-id"]``)."""
    client_id = int(context.node_config["partition-id"])
    return Message(RecordDict({INFO_KEY: ConfigRecord({"client-id": client_id})}), reply_to=msg)


def wait_for_nodes(grid: Grid, num_clients: int, poll_s: float = 1.0) -> list[int]:
    """Node ids once at least ``num_clients`` are connected (as Flower strategies wait)."""
    logged = 0.0
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= num_clients:
            return nodes
        if time.monotonic() - logged > 30:
            log(INFO, "waiting for %d nodes (%d connected)", num_clients, len(nodes))
            logged = time.monotonic()
        time.sleep(poll_s)


def query_roster(grid: Grid, num_clients: int, recorder: RunRecorder | None = None,
                 timeout: float = QUERY_TIMEOUT_S) -> Roster:
    """Ask every connected node which client it runs; the validated answers.

    An answer must be an integer client id in [0, ``num_clients``), claimed by no other node.
    A node whose answer is not (an error, a bad id, an id two nodes claim) is left out: its
    replies are rejected all run long. Each is logged and, with a ``recorder``, counted in
    round 1's ``events``. Raises :class:`~pwff_app.federation.checks.AllClientsFailed` when
    every node failed alike, and when no node is left.
    """
    nodes = wait_for_nodes(grid, num_clients)
    queries = [Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type=MessageType.QUERY)
               for node in nodes]
    outcomes: dict[int, str | None] = {}
    claims: dict[int, list[int]] = {}  # client id -> nodes that claim it
    for reply in grid.send_and_receive(queries, timeout=timeout):
        node = reply.metadata.src_node_id
        problem = (f"error {reply.error.code}: {reply.error.reason}" if reply.has_error()
                   else query_problem(reply.content, num_clients))
        outcomes[node] = problem
        if problem is None:
            claims.setdefault(int(reply.content[INFO_KEY]["client-id"]), []).append(node)
    for client_id, claimants in claims.items():
        if len(claimants) > 1:
            for node in claimants:
                outcomes[node] = f"client id {client_id} claimed by {len(claimants)} nodes"
    for node in nodes:
        outcomes.setdefault(node, f"no answer within {timeout:.0f} s")
    stop_if_all_failed(outcomes, num_clients, "the start-up query")
    roster = {node: cid for cid, claimants in claims.items() for node in claimants if outcomes[node] is None}
    for node, problem in sorted(outcomes.items()):
        if problem is not None:
            log(WARNING, "start-up query: node %d left out: %s", node, problem)
            if recorder is not None:
                recorder.event("query-rejected", node=node, reason=problem)
    if not roster:
        raise AllClientsFailed("start-up query: no node answered with a usable client id")
    log(INFO, "roster: %s", {cid: node for node, cid in sorted(roster.items(), key=lambda kv: kv[1])})
    return roster


def sample_clients(client_ids: Iterable[int], k: int, seed: int, server_round: int) -> list[int]:
    """``k`` of ``client_ids`` without replacement, drawn from (``seed``, ``server_round``) alone, sorted.

    ``k`` = 0 or at least as many as there are: all of them.
    """
    ids = sorted(client_ids)
    if k == 0 or k >= len(ids):
        return ids
    return sorted(np.random.default_rng([seed, server_round]).choice(ids, size=k, replace=False).tolist())


@dataclass(frozen=True)
class ClientHistory:
    """What the server's link knows of a client from the rounds before the one being planned.

    ``last_sinr_db``: the SINR in dB of its latest uplink (None: never heard); ``delivered``:
    the rounds whose update reached the server in time.
    """

    last_sinr_db: float | None = None
    delivered: tuple[int, ...] = ()


History = Mapping[int, ClientHistory]  # client id -> what the link knows of it
PF_DISCOUNT = 0.8  # proportional-fair selection: weight per round of a past delivery (memory ~5 rounds)


def _tie_break(ids: list[int], seed: int, server_round: int) -> dict[int, int]:
    """A seeded random rank per client, to break ties between equal scores."""
    order = np.random.default_rng([seed, server_round]).permutation(len(ids))
    return {cid: int(rank) for cid, rank in zip(ids, order)}


def _ranked(ids: list[int], k: int, seed: int, server_round: int, score: Callable[[int], float]) -> list[int]:
    """The ``k`` clients of highest ``score`` (ties: seeded random), sorted."""
    ties = _tie_break(ids, seed, server_round)
    return sorted(sorted(ids, key=lambda cid: (-score(cid), ties[cid]))[:k])


def _unknown_first(value: float | None) -> float:
    """A client the link never heard ranks first: every client is measured once."""
    return math.inf if value is None else value


def best_channel_score(history: History, server_round: int) -> Callable[[int], float]:
    """Last uplink SINR (dB)."""
    return lambda cid: _unknown_first(history.get(cid, ClientHistory()).last_sinr_db)


def proportional_fair_score(history: History, server_round: int) -> Callable[[int], float]:
    """Jalali's PF metric across rounds: achievable spectral efficiency log2(1 + SINR) of the last
    uplink over the discounted count of past deliveries ``sum PF_DISCOUNT^(r-1-s)``."""
    def score(cid: int) -> float:
        h = history.get(cid, ClientHistory())
        if h.last_sinr_db is None:
            return math.inf
        served = sum(PF_DISCOUNT ** (server_round - 1 - s) for s in h.delivered if s < server_round)
        return math.log2(1.0 + 10 ** (h.last_sinr_db / 10)) / max(served, 1e-3)
    return score


def age_score(history: History, server_round: int) -> Callable[[int], float]:
    """Age of the client's last delivered update in rounds (never: the round number)."""
    return lambda cid: server_round - max((s for s in history.get(cid, ClientHistory()).delivered
                                           if s < server_round), default=0)


# selection -> the score a round ranks clients by (None: not a ranking); ``all`` is k = 0.
POLICIES: dict[str, Callable[[History, int], Callable[[int], float]] | None] = {
    "all": None,
    "random": None,
    "best-channel": best_channel_score,
    "proportional-fair": proportional_fair_score,
    "age": age_score,
}


def select_clients(policy: str, client_ids: Iterable[int], k: int, seed: int, server_round: int,
                   history: History) -> list[int]:
    """The clients ``policy`` trains in ``server_round``: ``k`` of ``client_ids`` (0 = all), sorted.

    ``history`` must hold only what earlier rounds recorded. ``random`` is :func:`sample_clients`.
    """
    ids = sorted(client_ids)
    score = POLICIES[policy]
    if score is None or k == 0 or k >= len(ids):
        return sample_clients(ids, k, seed, server_round)
    return _ranked(ids, k, seed, server_round, score(history, server_round))


@dataclass(frozen=True)
class RoundSampler:
    """Which nodes take part in a round: ``clients_per_round`` of the roster (0 = all), by ``selection``.

    A round evaluates the clients it trained; the last round (``last_round``) and a baseline
    evaluation before training (round 0) evaluate every client of the roster, so the final
    scores cover everyone. ``history(r)`` gives what the link recorded before round r (the
    ranking policies need it; :meth:`pwff_app.wireless.link.WirelessGrid.history`).
    """

    roster: Roster
    clients_per_round: int
    seed: int
    last_round: int
    selection: str = "random"
    history: Callable[[int], History] | None = field(default=None, compare=False)

    @classmethod
    def for_run(cls, cfg, roster: Roster, last_round: int, grid: Grid | None = None) -> RoundSampler:
        """The run's sampler (``cfg``: a :class:`~pwff_app.config.RunConfig`); the link's history
        comes from ``grid`` when it is a wireless Grid."""
        return cls(roster, cfg.clients_per_round, cfg.seed, last_round, cfg.selection,
                   getattr(grid, "history", None))

    def train_nodes(self, server_round: int) -> set[int]:
        """The nodes trained in ``server_round`` (counted from the run's start, resumed rounds included)."""
        history = self.history(server_round) if self.history is not None else {}
        chosen = set(select_clients(self.selection, self.roster.values(), self.clients_per_round, self.seed,
                                    server_round, history))
        return {node for node, cid in self.roster.items() if cid in chosen}

    def evaluate_nodes(self, server_round: int) -> set[int]:
        """The nodes evaluated in ``server_round``: the trained ones; every node in a baseline
        evaluation (round 0) and in the last round."""
        everyone = server_round == 0 or server_round >= self.last_round
        return set(self.roster) if everyone else self.train_nodes(server_round)

    def client_ids(self, nodes: Iterable[int]) -> list[int]:
        """The sorted client ids of ``nodes``."""
        return sorted(self.roster[node] for node in nodes)

"""FedBERT on the server: SplitFed-V2 style split learning over Flower's Message API.

One server-side top (encoder layers ``k..n-1``, pooling, head) is trained by the clients in
turn (order reshuffled every round from the seed), one batch per message exchange; the
clients' bottoms are aggregated at the end of the round by Flower's rule for run-config
``aggregator`` (FedAvg weighted by training examples, FedMedian or FedTrimmedAvg, as for
every other method) and broadcast with the first message of the next round. Thapa et al.,
"SplitFed: When Federated Learning Meets Split Learning", AAAI 2022 (SplitFed-V2: sequential
clients on one server-side model); FedBERT (Tian et al., ACM TIST 2022) uses the same scheme
for BERT.

Per round, per client (the server speaks first: a ClientApp cannot send unsolicited messages):

    step 0        TRAIN  {arrays: global bottom,  config: round, step=0}      -> activations of batch 0
    step t        TRAIN  {arrays: grad.<t-1>,     config: round, step=t}      -> activations of batch t
    step S        TRAIN  {arrays: grad.<S-1>,     config: round, step=S, final} -> bottom weights

then, per client, EVALUATE messages carry the new global bottom (step 0) and fetch the
activations of each test batch; the server's top turns them into accuracy and loss. In rounds
that evaluate on the global test set (``task.global_eval``), a second such exchange per client
runs on it (config ``test-set = "global"``) and is recorded as ``global_accuracy`` /
``global_loss``. FedBERT has no private part: every client runs the same global bottom, so its
global accuracy is the same for every client (the exchange still runs per client, the server
holding no data).

Traffic (``RunRecorder.client``): ``downlink_bytes`` = the bottom broadcast + every gradient,
``uplink_bytes`` = every activation reply (activations + mask + labels) + the final bottom
weights; tensor bytes per :func:`pwff_app.federation.payload.payload_bytes`. TRAIN messages and replies
go through the Grid it is given, so a wireless Grid wrapper simulates every one of them;
EVALUATE traffic is a measurement and counted apart (``eval_*_bytes``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg
from flwr.supercore import log

from pwff_app.config import AggregationConfig, RunConfig
from pwff_app.device import autocast, place, placement, to_device
from pwff_app.federation.checks import (
    KINDS, activations_problem, arrays_problem, example_bounds, reply_problem, stop_if_all_failed,
)
from pwff_app.federation.payload import payload_bytes
from pwff_app.federation.results import RunRecorder
from pwff_app.federation.roster import Roster, RoundSampler
from pwff_app.task_tuning.data import AG_NEWS_CLASSES
from pwff_app.task_tuning.fedbert.model import (
    ACTIVATIONS, ARRAYS, CONFIG, GRAD_PREFIX, INFO_KEY, LABELS, MASK, METRICS, TEST_SET, SplitConfig,
    build_split_model,
    new_optimizer, server_step, split_model, split_param_counts, trained_arrays,
)

REPLY_TIMEOUT_S = 3600.0  # per message exchange, as Flower strategies' default round timeout
_POLL_MIN_S, _POLL_MAX_S = 0.002, 0.05


class _Failed(Exception):
    """A client dropped out of the round: no reply, an error reply, or an unusable reply."""


def exchange(grid: Grid, msg: Message, timeout: float = REPLY_TIMEOUT_S) -> Message:
    """Send one message and wait for its reply.

    Pushes and pulls with a short poll (Flower's ``send_and_receive`` on the deployment Grid
    sleeps 3 s between pulls, which would dominate a per-batch protocol); grids without
    push/pull (in-process test grids) use ``send_and_receive``.
    """
    try:
        ids = list(grid.push_messages([msg]))
    except NotImplementedError:
        replies = list(grid.send_and_receive([msg], timeout=timeout))
        if not replies:
            raise _Failed("no reply") from None
        return replies[0]
    if not ids:  # a wireless Grid withholds a message whose downlink was lost ("skip")
        raise _Failed("message not delivered (downlink lost)")
    deadline, wait = time.monotonic() + timeout, _POLL_MIN_S
    while True:
        replies = list(grid.pull_messages(ids))
        if replies:
            return replies[0]
        if time.monotonic() > deadline:
            raise _Failed(f"no reply within {timeout:.0f} s")
        time.sleep(wait)
        wait = min(wait * 1.5, _POLL_MAX_S)


@dataclass
class ClientRound:
    """What one client did in one round, as the server saw it."""

    node_id: int
    client_id: int = -1
    uplink_activation_bytes: int = 0
    uplink_weight_bytes: int = 0
    downlink_gradient_bytes: int = 0
    downlink_weight_bytes: int = 0
    steps: int = 0
    loss_sum: float = 0.0
    seen: int = 0
    client_compute_s: float = 0.0
    server_compute_s: float = 0.0
    num_examples: int = 0
    skipped_backward: int = 0
    bottom: ArrayRecord | None = None
    failure: str | None = None

    @property
    def uplink_bytes(self) -> int:
        return self.uplink_activation_bytes + self.uplink_weight_bytes

    @property
    def downlink_bytes(self) -> int:
        return self.downlink_gradient_bytes + self.downlink_weight_bytes

    def record(self) -> dict:
        out = {
            "uplink_bytes": self.uplink_bytes,
            "downlink_bytes": self.downlink_bytes,
            "uplink_activation_bytes": self.uplink_activation_bytes,
            "uplink_weight_bytes": self.uplink_weight_bytes,
            "downlink_gradient_bytes": self.downlink_gradient_bytes,
            "downlink_weight_bytes": self.downlink_weight_bytes,
            "steps": self.steps,
            "compute_s": round(self.client_compute_s, 4),
            "server_compute_s": round(self.server_compute_s, 4),
        }
        if self.seen:
            out["train_loss"] = self.loss_sum / self.seen
        if self.bottom is not None:
            out["num_examples"] = self.num_examples
            out["skipped_backward"] = self.skipped_backward
        return out


class SplitServer:
    """The server's side of FedBERT: the top, its optimizer, the global bottom, the aggregation rule.

    ``roster``: node -> client, fixed before round 1; every reply is checked against it
    (:mod:`pwff_app.federation.checks`) before any of its fields is used.
    """

    def __init__(self, cfg: RunConfig, recorder: RunRecorder, roster: Roster) -> None:
        self.cfg, self.recorder, self.roster = cfg, recorder, dict(roster)
        self.split = SplitConfig.from_run_config(cfg)
        self.device, self.dtype = placement(cfg.device, cfg.precision)
        torch.manual_seed(cfg.seed)  # the top's dropout draws (on every device)
        model = build_split_model(cfg, self.split)  # on the CPU: the same init on every device
        bottom, top = split_model(model, self.split.split_layer)
        self.top = place(top, self.device, self.dtype)
        self.global_bottom = ArrayRecord({k: Array(v) for k, v in trained_arrays(bottom).items()})
        del bottom
        self.hidden = int(self.top.config.hidden_size)
        self.optimizer = new_optimizer(self.top, self.split.lr)
        self.rule = aggregation_rule(cfg.aggregation)
        self.bounds = example_bounds(cfg)

    # -- reply checks --------------------------------------------------------------------

    def _checked(self, reply: Message, node: int, server_round: int, step: int, kind: str,
                 max_examples: int) -> dict:
        """The metrics of a reply of ``kind`` that passes every check; else :class:`_Failed`."""
        if reply.has_error():
            raise _Failed(f"error reply {reply.error.code}: {reply.error.reason}")
        problem = reply_problem(reply.content, KINDS[kind], client_id=self.roster.get(node),
                                server_round=server_round, max_examples=max_examples, step=step)
        if problem is not None:
            raise _Failed(problem)
        return dict(reply.content[METRICS])

    @staticmethod
    def _num_steps(metrics: dict, known: int | None, bound: int) -> int:
        """The exchange's step count: the first reply's, in [1, ``bound``], then the same in every reply."""
        claimed = int(metrics["num-steps"])
        if (known is None and not 1 <= claimed <= bound) or (known is not None and claimed != known):
            raise _Failed(f"'num-steps' = {claimed}, expected {known if known is not None else f'1..{bound}'}")
        return claimed

    def _activations(self, reply: Message, num_examples: int) -> list[torch.Tensor]:
        """(activations, mask, labels) of a checked reply, on the top's device; :class:`_Failed` if unusable."""
        record = reply.content[ARRAYS]
        problem = activations_problem(record, num_examples, self.hidden, len(AG_NEWS_CLASSES),
                                      self.cfg.task.max_length)
        if problem is not None:
            raise _Failed(problem)
        acts, mask, labels = (record[k].numpy() for k in (ACTIVATIONS, MASK, LABELS))
        return to_device([torch.from_numpy(np.array(acts, dtype=np.float32)), torch.from_numpy(mask.astype(np.int64)),
                          torch.from_numpy(labels.astype(np.int64))], self.device)

    # -- one client's training in one round ----------------------------------------------

    def train_client(self, grid: Grid, node: int, server_round: int) -> ClientRound:
        """One client's exchange of a round; a failed or rejected reply ends it in ``failure``."""
        cr = ClientRound(node_id=node, client_id=self.roster[node])
        step, num_steps, grad = 0, None, None
        task = self.cfg.task
        max_steps = -(-self.bounds.train // task.batch_size) * task.local_epochs
        self.top.train()
        try:
            while True:
                final = num_steps is not None and step == num_steps
                if step == 0:
                    arrays = self.global_bottom
                else:
                    arrays = ArrayRecord({f"{GRAD_PREFIX}{step - 1}": Array(grad.cpu().numpy())})
                content = RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(
                    {"server-round": server_round, "step": step, "final": final})})
                sent = payload_bytes(content)
                if step == 0:
                    cr.downlink_weight_bytes += sent
                else:
                    cr.downlink_gradient_bytes += sent
                reply = exchange(grid, Message(content, dst_node_id=node, message_type=MessageType.TRAIN,
                                               group_id=str(server_round)))
                kind, rows = ("split/weights", self.bounds.train) if final else ("split/activations", task.batch_size)
                metrics = self._checked(reply, node, server_round, step, kind, rows)
                cr.client_compute_s += float(reply.content[INFO_KEY]["compute-s"])
                num_steps = self._num_steps(metrics, num_steps, max_steps)
                if final:
                    cr.uplink_weight_bytes += payload_bytes(reply.content)
                    weights = reply.content[ARRAYS]
                    problem = arrays_problem(weights, self.global_bottom, self.cfg.aggregation.max_update_norm)
                    if problem is not None:
                        raise _Failed(f"bottom weights rejected: {problem}")
                    cr.bottom, cr.num_examples = weights, int(metrics["num-examples"])
                    cr.skipped_backward = int(metrics["skipped-backward"])
                    return cr
                cr.uplink_activation_bytes += payload_bytes(reply.content)
                acts, mask, labels = self._activations(reply, int(metrics["num-examples"]))
                started = time.perf_counter()
                loss, grad = server_step(self.top, acts, mask, labels, self.optimizer, self.dtype)
                cr.server_compute_s += time.perf_counter() - started
                cr.loss_sum += loss * len(labels)
                cr.seen += len(labels)
                cr.steps += 1
                step += 1
        except _Failed as err:
            cr.failure = str(err)
            return cr

    # -- one client's evaluation ----------------------------------------------------------

    def evaluate_client(self, grid: Grid, node: int, server_round: int, test_set: str = "own") -> dict | None:
        """Accuracy and mean loss of global bottom + top on the client's test split (``own``), or on
        the global test set (``global``: recorded as ``global_accuracy``, ``global_loss``,
        ``global_eval_*_bytes``)."""
        self.top.eval()
        correct, loss_sum, seen, step, num_steps, up, down = 0, 0.0, 0, 0, None, 0, 0
        client_id, rows = self.roster[node], 2 * self.cfg.task.batch_size  # eval batches are twice as large
        bound, prefix = ((self.bounds.evaluate, "") if test_set == "own"
                         else (self.cfg.task.global_test_samples, f"{test_set}_"))
        max_steps = -(-bound // rows)
        try:
            while num_steps is None or step < num_steps:
                content = RecordDict({CONFIG: ConfigRecord({"server-round": server_round, "step": step,
                                                            TEST_SET: test_set})})
                if step == 0:
                    content[ARRAYS] = self.global_bottom
                down += payload_bytes(content)
                reply = exchange(grid, Message(content, dst_node_id=node, message_type=MessageType.EVALUATE,
                                               group_id=str(server_round)))
                metrics = self._checked(reply, node, server_round, step, "split/activations", rows)
                up += payload_bytes(reply.content)
                num_steps = self._num_steps(metrics, num_steps, max_steps)
                acts, mask, labels = self._activations(reply, int(metrics["num-examples"]))
                with torch.no_grad(), autocast(self.device, self.dtype):
                    logits = self.top(acts, mask).float()
                loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
                correct += int((logits.argmax(-1) == labels).sum())
                seen += len(labels)
                step += 1
        except _Failed as err:
            self.recorder.event("eval-failed", node=node, client=client_id, round=server_round, step=step,
                                test_set=test_set, reason=str(err))
            return None
        finally:
            self.top.train()
        out = {f"{prefix}{k}": v for k, v in (("eval_uplink_bytes", up), ("eval_downlink_bytes", down),
                                              ("accuracy", correct / seen), ("loss", loss_sum / seen))}
        self.recorder.client(client_id, **out)
        return out

    # -- aggregation ---------------------------------------------------------------------

    def aggregate(self, server_round: int, results: list[ClientRound]) -> None:
        """The returned bottoms into the global bottom by the configured Flower rule.

        Fewer than ``min_survivors`` usable bottoms: the global bottom stays as it was.
        """
        done = [r for r in results if r.bottom is not None and r.num_examples > 0]
        if len(done) < self.cfg.aggregation.min_survivors:
            log(WARNING, "fedbert: %d bottoms < %d: global bottom unchanged", len(done), self.cfg.aggregation.min_survivors)
            self.recorder.event("kept-global", reason=f"{len(done)} valid bottoms < {self.cfg.aggregation.min_survivors}")
            return
        self.global_bottom = aggregate_bottoms(self.rule, server_round,
                                               [(r.node_id, r.bottom, r.num_examples) for r in done])


_RULES: dict[str, type[FedAvg]] = {"fedavg": FedAvg, "median": FedMedian, "trimmed-mean": FedTrimmedAvg}


def aggregation_rule(agg: AggregationConfig) -> FedAvg:
    """Flower's strategy for ``agg.aggregator`` (only its ``aggregate_train`` is used)."""
    return _RULES[agg.aggregator](**({"beta": agg.trim_fraction} if agg.aggregator == "trimmed-mean" else {}))


def aggregate_bottoms(rule: FedAvg, server_round: int,
                      bottoms: Sequence[tuple[int, ArrayRecord, int]]) -> ArrayRecord:
    """Aggregate (node id, bottom weights, training examples), at least one, with ``rule``.

    Each bottom becomes a train reply as a Flower strategy receives it (``arrays`` +
    ``metrics.num-examples``, the FedAvg weight), so the rule is Flower's own, as for every
    other method. Building a Message needs the task identity the ServerApp process has.
    """
    replies = [
        Message(RecordDict({ARRAYS: ArrayRecord(dict(bottom.items())),  # a copy: FedMedian pops its arrays
                            METRICS: MetricRecord({"num-examples": num_examples})}),
                dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(server_round))
        for node, bottom, num_examples in bottoms
    ]
    arrays, _ = rule.aggregate_train(server_round, replies)
    if arrays is None:  # Flower's answer to "no usable reply"
        raise ValueError("fedbert: no bottom to aggregate")
    return arrays


def run_split_learning(grid: Grid, cfg: RunConfig, recorder: RunRecorder, num_rounds: int, roster: Roster) -> None:
    """FedBERT for ``num_rounds`` rounds; per-client records go to ``recorder`` every round.

    ``roster``: node -> client, fixed before round 1; only its nodes take part, ``clients-per-round``
    of them a round (:class:`~pwff_app.federation.roster.RoundSampler`). ``cfg`` holds no
    ``resume`` (refused for fedbert when the config is read).
    """
    server = SplitServer(cfg, recorder, roster)
    sampler = RoundSampler.for_run(cfg, roster, num_rounds, grid)
    log(INFO, "fedbert: split after layer %d, train=%s, lr=%g, %d nodes, %d a round, %d rounds",
        server.split.split_layer, server.split.train, server.split.lr, len(roster), cfg.round_size, num_rounds)
    for server_round in range(1, num_rounds + 1):
        sampled = sampler.train_nodes(server_round)
        recorder.round_info(sampled=sampler.client_ids(sampled))
        ranked = sorted(sampled, key=roster.__getitem__)  # nodes by client id
        # Seeded order over clients, so a rerun with the same seed trains alike.
        order = [ranked[i] for i in np.random.default_rng([cfg.seed, server_round]).permutation(len(ranked))]
        results = []
        for node in order:
            cr = server.train_client(grid, node, server_round)
            recorder.client(cr.client_id, **cr.record())
            if cr.failure is not None:
                log(WARNING, "fedbert round %d: client %d (node %d) dropped at step %d: %s",
                    server_round, cr.client_id, node, cr.steps, cr.failure)
                recorder.event("failed", node=node, client=cr.client_id, round=server_round, step=cr.steps,
                               reason=cr.failure, uplink_bytes=cr.uplink_bytes, downlink_bytes=cr.downlink_bytes)
            results.append(cr)
        if server_round == 1:
            stop_if_all_failed({cr.node_id: cr.failure for cr in results}, len(ranked), "round 1")
        server.aggregate(server_round, results)
        for node in sorted(sampler.evaluate_nodes(server_round), key=roster.__getitem__):
            server.evaluate_client(grid, node, server_round)
            if cfg.task.global_eval(server_round):
                server.evaluate_client(grid, node, server_round, "global")
        recorder.end_round(server_round)


def run_fedbert(grid: Grid, cfg: RunConfig, recorder: RunRecorder, resumed: ArrayRecord | None,
                roster: Roster) -> dict[str, Any]:
    """The ServerApp's entry for method fedbert: all rounds, then the summary block.

    ``resumed`` is always None (resume is refused for fedbert); the argument keeps the
    signature every method's server loop has. ``roster``: node -> client, fixed before round 1.
    """
    run_split_learning(grid, cfg, recorder, cfg.task.num_rounds, roster)
    counts = split_param_counts(cfg)
    return {
        "num_clients": cfg.num_clients,
        "params": {"shared": counts["client_bottom"], "server": counts["server_top"], "private": {}},
        "aggregator": cfg.aggregation.aggregator,
    }


__all__ = [
    "ClientRound", "SplitServer", "aggregate_bottoms", "aggregation_rule", "exchange", "run_fedbert",
    "run_split_learning",
]

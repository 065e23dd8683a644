"""Partial aggregation: FedAvg (or a robust rule) over exactly the parameters a method shares.

The rule for what is shared is declarative (:mod:`pwff_app.methods`): the server's initial
``ArrayRecord`` holds the shared parameters and nothing else. Every reply is checked before
any of its fields is used (:mod:`pwff_app.federation.checks`): its records, every metric and
``info`` field against the one range table, ``num-examples`` against the run's bound, its
client id against the roster (:mod:`pwff_app.federation.roster`), its round; a train reply's
arrays must be exactly the shared keys with the same shapes and dtypes, finite, within the
update-norm bound. A reply that fails is rejected with a logged reason and counted in the
round's record; the round aggregates the rest. If fewer than ``min_survivors`` remain, the
global weights stay as they were and the run goes on, unless every client failed the run's
first round with the same error: then the run stops with it (a broken setup, not bad luck).

The aggregation rule itself is Flower's: :class:`FedAvg`, :class:`FedMedian` or
:class:`FedTrimmedAvg`, chosen by run-config ``aggregator``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from logging import WARNING
from typing import Any, ClassVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg
from flwr.supercore import log

from pwff_app.compression.server import CompressionPlan
from pwff_app.federation.checkpoint import save_checkpoint
from pwff_app.federation.checks import (
    GLOBAL_EVAL, INFO, KINDS, METRICS, ExampleBounds, arrays_problem, evaluate_kind, reply_problem,
    stop_if_all_failed,
)
from pwff_app.federation.payload import arrayrecord_payload_bytes, payload_bytes
from pwff_app.federation.results import RunRecorder
from pwff_app.federation.roster import RoundSampler


class _PartialMixin:
    """Reply checks, per-client records and round offsets on top of a Flower strategy.

    Args:
        recorder: where per-client numbers of each round go.
        sampler: the roster (node id -> client id, fixed before round 1; only these nodes get
            messages) and which of its nodes each round trains and evaluates.
        example_bounds: the largest ``num-examples`` a train / evaluate reply may claim.
        min_survivors: fewest valid replies needed to update the global weights.
        max_update_norm: L2 bound on a reply's distance from the global weights (0 = off).
        round_offset: rounds already done before this start (resuming from a checkpoint).
        checkpoint_meta: if given, the global weights are checkpointed after every round into
            the recorder's folder, with this dict beside them.
        compression: each client's uplink codec per round, the downlink cast, and the decoding
            of encoded replies before their checks (:mod:`pwff_app.compression.server`); None = off.
        global_eval: ``round -> bool``: whether that round's evaluate messages also ask for the
            global test set (``config[GLOBAL_EVAL] = True``); None: never.
        shared_only: whether such replies also carry the shared part alone (PFTT).
        **kwargs: passed to the Flower strategy.
    """

    #: The :data:`~pwff_app.federation.checks.KINDS` of this family's train and evaluate replies.
    REPLY_KINDS: ClassVar[tuple[str, str]] = ("task/train", "task/evaluate")

    def __init__(self, recorder: RunRecorder, sampler: RoundSampler, example_bounds: ExampleBounds,
                 min_survivors: int = 1, max_update_norm: float = 0.0, round_offset: int = 0,
                 checkpoint_meta: dict | None = None, compression: CompressionPlan | None = None,
                 global_eval: Callable[[int], bool] | None = None, shared_only: bool = False,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.global_eval = global_eval or (lambda server_round: False)
        self.shared_only = shared_only
        self.recorder = recorder
        self.sampler = sampler
        self.roster = dict(sampler.roster)
        self.example_bounds = example_bounds
        self.min_survivors = min_survivors
        self.max_update_norm = max_update_norm
        self.round_offset = round_offset
        self.checkpoint_meta = checkpoint_meta
        self._global: ArrayRecord | None = None
        self._aggregated: ArrayRecord | None = None
        self._downlink: dict[int, int] = {}
        self.compression = compression
        self._plain: dict[int, ArrayRecord] = {}  # id(reply content) -> its decoded arrays

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Flower's train messages (round with offset) for the round's sampled nodes; remembers the global sent."""
        self._global = arrays
        server_round += self.round_offset
        nodes = self.sampler.train_nodes(server_round)
        self.recorder.round_info(sampled=self.sampler.client_ids(nodes))
        messages = self._to(nodes, super().configure_train(server_round, arrays, config, grid))
        self._plain = {}
        if self.compression is not None:
            messages = self.compression.prepare(messages, grid, self.roster, self._sent_shapes,
                                                self._train_extra(grid))
        self._downlink = {m.metadata.dst_node_id: payload_bytes(m.content) for m in messages}
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Flower's evaluate messages for the round's nodes (with :data:`GLOBAL_EVAL` in rounds that
        evaluate on the global test set); remembers the global to checkpoint."""
        self._aggregated = arrays  # the round's global weights after aggregation
        server_round += self.round_offset
        nodes = self.sampler.evaluate_nodes(server_round)
        if self.global_eval(server_round):
            config = ConfigRecord({**config, GLOBAL_EVAL: True})  # a copy: Flower reuses its record each round
        return self._to(nodes, super().configure_evaluate(server_round, arrays, config, grid))

    @staticmethod
    def _to(nodes: set[int], messages: Iterable[Message]) -> list[Message]:
        """The messages to ``nodes`` (of the roster): a node that named no client takes no part."""
        return [m for m in messages if m.metadata.dst_node_id in nodes]

    def _envelope_problem(self, msg: Message, server_round: int, train: bool) -> str | None:
        """Records and fields of a reply (:func:`reply_problem`) with this run's roster, round and bound."""
        kind = KINDS[self.REPLY_KINDS[0] if train else
                     evaluate_kind(self.REPLY_KINDS[1], self.global_eval(server_round), self.shared_only)]
        bound = self.example_bounds.train if train else self.example_bounds.evaluate
        return reply_problem(msg.content, kind, client_id=self.roster.get(msg.metadata.src_node_id),
                             server_round=server_round, max_examples=bound)

    def _sent_shapes(self, client_id: int) -> dict[str, tuple[int, ...]]:
        """Name -> shape of the arrays ``client_id`` sends this round (the adaptive choice sizes them)."""
        return {k: tuple(v.shape) for k, v in self._global.items()}

    def _train_extra(self, grid: Grid) -> Callable[[int], dict] | None:
        """client id -> further entries of its train message's config this round; None = none."""
        return None

    def _plain_arrays(self, msg: Message, reference: Mapping[str, Any]) -> ArrayRecord | str:
        """The reply's plain arrays (decoded when its codec is lossy), or why its encoding is unusable."""
        if self.compression is None:
            return msg.content[self.arrayrecord_key]
        return self.compression.decode(msg, reference)

    def _problem(self, msg: Message, server_round: int) -> str | None:
        """Why a train reply cannot be aggregated, or None; the decoded arrays are kept for aggregation."""
        problem = self._envelope_problem(msg, server_round, train=True)
        if problem is not None:
            return problem
        arrays = self._plain_arrays(msg, {k: v.numpy() for k, v in self._global.items()})
        if isinstance(arrays, str):
            return arrays
        problem = arrays_problem(arrays, self._global, self.max_update_norm)
        if problem is None:
            self._plain[id(msg.content)] = arrays
        return problem

    def _screen(self, replies: Iterable[Message], problem: Callable[[Message], str | None],
                prefix: str) -> tuple[list[Message], dict[int, str | None]]:
        """(accepted replies, node -> why it failed or None); failures logged and counted as events."""
        accepted, outcomes = [], {}
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                outcomes[node] = msg.error.reason or f"error {msg.error.code}"
                self.recorder.event(prefix + "failed", node=node, client=self.roster.get(node),
                                    reason=msg.error.reason)
                continue
            outcomes[node] = problem(msg)
            if outcomes[node] is not None:
                log(WARNING, "rejected %sreply of node %d (client %s): %s", prefix, node,
                    self.roster.get(node), outcomes[node])
                self.recorder.event(prefix + "rejected", node=node, client=self.roster.get(node),
                                    reason=outcomes[node])
                continue
            accepted.append(msg)
        return accepted, outcomes

    def screen_train(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The train replies that pass every check, recorded per client (``server_round`` with offset).

        Stops the run (:class:`~pwff_app.federation.checks.AllClientsFailed`) when every client
        failed the run's first round with the same error.
        """
        accepted, outcomes = self._screen(replies, lambda msg: self._problem(msg, server_round), "")
        if server_round == self.round_offset + 1:
            stop_if_all_failed(outcomes, len(self.sampler.train_nodes(server_round)), f"round {server_round}")
        for msg in accepted:
            content, node = msg.content, msg.metadata.src_node_id
            metrics, info = content[METRICS], content[INFO]
            self.recorder.client(
                self.roster[node],
                num_examples=int(metrics[self.weighted_by_key]),
                train_loss=metrics.get("train-loss"),
                uplink_bytes=arrayrecord_payload_bytes(content[self.arrayrecord_key]),
                downlink_bytes=self._downlink.get(node, 0),
                private_params=int(info["private-params"]),
            )
            if id(content) in self._plain:  # aggregate what the encoding stands for
                content[self.arrayrecord_key] = self._plain.pop(id(content))
        return accepted

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's rule over the replies that pass every check; (None, None) keeps the global."""
        server_round += self.round_offset
        accepted = self.screen_train(server_round, replies)
        if len(accepted) < self.min_survivors:
            log(WARNING, "round %d: %d valid replies < %d: global weights unchanged",
                server_round, len(accepted), self.min_survivors)
            self.recorder.event("kept-global", reason=f"{len(accepted)} valid replies < {self.min_survivors}")
            return None, None
        return super().aggregate_train(server_round, accepted)

    def _record_evaluation(self, client_id: int, metrics: Mapping[str, Any]) -> None:
        """Put a checked evaluate reply's metrics in the round's record."""
        self.recorder.client(client_id, **{k.replace("-", "_"): v for k, v in metrics.items()
                                           if k != self.weighted_by_key})

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record and average the checked evaluate replies, end the round, checkpoint the global."""
        server_round += self.round_offset
        valid, _ = self._screen(replies, lambda msg: self._envelope_problem(msg, server_round, train=False),
                                "eval-")
        for msg in valid:
            self._record_evaluation(self.roster[msg.metadata.src_node_id], msg.content[METRICS])
        aggregated = super().aggregate_evaluate(server_round, valid)
        self.recorder.end_round(server_round)
        if self.checkpoint_meta is not None and self._aggregated is not None:
            save_checkpoint(self.recorder.out_dir, server_round, self._aggregated, self.checkpoint_meta)
        return aggregated


class PartialFedAvg(_PartialMixin, FedAvg):
    """Weighted FedAvg of the shared parameters (McMahan et al. 2017)."""


class PartialFedMedian(_PartialMixin, FedMedian):
    """Coordinate-wise median of the shared parameters (Yin et al. 2018)."""


class PartialFedTrimmedAvg(_PartialMixin, FedTrimmedAvg):
    """Coordinate-wise trimmed mean of the shared parameters (Yin et al. 2018)."""


AGGREGATORS: dict[str, type[_PartialMixin]] = {
    "fedavg": PartialFedAvg,
    "median": PartialFedMedian,
    "trimmed-mean": PartialFedTrimmedAvg,
}

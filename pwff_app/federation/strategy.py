"""Partial aggregation: FedAvg (or a robust rule) over exactly the parameters a method shares.

The rule for what is shared is declarative (:mod:`pwff_app.methods`): the server's initial
``ArrayRecord`` holds the shared parameters and nothing else, and every reply must carry
exactly those keys with the same shapes and dtypes, finite values, an update norm within the
configured bound and the current round. A reply that does not is rejected with a logged
reason and counted in the round's record; the round aggregates the rest. If fewer than
``min_survivors`` remain, the global weights stay as they were and the run goes on.

The aggregation rule itself is Flower's: :class:`FedAvg`, :class:`FedMedian` or
:class:`FedTrimmedAvg`, chosen by run-config ``aggregator``.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg
from flwr.supercore import log

from pwff_app.federation.checkpoint import save_checkpoint
from pwff_app.federation.payload import arrayrecord_payload_bytes, payload_bytes
from pwff_app.federation.results import RunRecorder


def reply_problem(reply_arrays: ArrayRecord, reference: ArrayRecord, max_update_norm: float = 0.0) -> str | None:
    """Why a reply's arrays cannot be aggregated with ``reference``, or None if they can.

    ``max_update_norm`` bounds the L2 norm of (reply - reference) over all arrays; 0 = no bound.
    """
    got, want = set(reply_arrays.keys()), set(reference.keys())
    if got != want:
        extra, missing = sorted(got - want), sorted(want - got)
        return f"keys differ from the shared set (unexpected {extra[:3]}, missing {missing[:3]})"
    squared = 0.0
    for key, ref in reference.items():
        arr = reply_arrays[key]
        if tuple(arr.shape) != tuple(ref.shape) or arr.dtype != ref.dtype:
            return f"{key}: {arr.dtype}{list(arr.shape)} != expected {ref.dtype}{list(ref.shape)}"
        value = arr.numpy()
        if not np.isfinite(value).all():
            return f"{key}: non-finite values"
        squared += float(np.sum((value.astype(np.float64) - ref.numpy()) ** 2))
    if max_update_norm > 0 and squared ** 0.5 > max_update_norm:
        return f"update norm {squared ** 0.5:.4g} > bound {max_update_norm:.4g}"
    return None


class _PartialMixin:
    """Reply checks, per-client records and round offsets on top of a Flower strategy.

    Args:
        recorder: where per-client numbers of each round go.
        min_survivors: fewest valid replies needed to update the global weights.
        max_update_norm: L2 bound on a reply's distance from the global weights (0 = off).
        round_offset: rounds already done before this start (resuming from a checkpoint).
        checkpoint_meta: if given, the global weights are checkpointed after every round into
            the recorder's folder, with this dict beside them.
        **kwargs: passed to the Flower strategy.
    """

    def __init__(self, recorder: RunRecorder, min_survivors: int = 1, max_update_norm: float = 0.0,
                 round_offset: int = 0, checkpoint_meta: dict | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.recorder = recorder
        self.min_survivors = min_survivors
        self.max_update_norm = max_update_norm
        self.round_offset = round_offset
        self.checkpoint_meta = checkpoint_meta
        self._global: ArrayRecord | None = None
        self._aggregated: ArrayRecord | None = None
        self._downlink: dict[int, int] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = arrays
        messages = list(super().configure_train(server_round + self.round_offset, arrays, config, grid))
        self._downlink = {m.metadata.dst_node_id: payload_bytes(m.content) for m in messages}
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        self._aggregated = arrays  # the round's global weights after aggregation
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def _envelope_problem(self, content, server_round: int) -> str | None:
        """Record counts, the weighting metric and the round: what every reply must get right."""
        arrays = content.array_records.get(self.arrayrecord_key)
        if arrays is None or len(content.array_records) != 1:
            return f"expected one ArrayRecord '{self.arrayrecord_key}', got {sorted(content.array_records)}"
        if len(content.metric_records) != 1 or self.weighted_by_key not in next(iter(content.metric_records.values())):
            return f"expected one MetricRecord with '{self.weighted_by_key}'"
        info = content.get("info", ConfigRecord())
        if int(info.get("server-round", server_round)) != server_round:
            return f"reply for round {info.get('server-round')} in round {server_round}"
        return None

    def _problem(self, content, server_round: int) -> str | None:
        return self._envelope_problem(content, server_round) or reply_problem(
            content[self.arrayrecord_key], self._global, self.max_update_norm)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        accepted = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                self.recorder.event("failed", node=node, reason=msg.error.reason)
                continue
            content = msg.content
            info = content.get("info", ConfigRecord())
            client_id = int(info.get("client-id", -1))
            problem = self._problem(content, server_round)
            if problem is not None:
                log(WARNING, "round %d: rejected reply of client %d (node %d): %s",
                    server_round, client_id, node, problem)
                self.recorder.event("rejected", node=node, client=client_id, reason=problem)
                continue
            metrics = next(iter(content.metric_records.values()))
            self.recorder.client(
                client_id,
                num_examples=int(metrics[self.weighted_by_key]),
                train_loss=metrics.get("train-loss"),
                uplink_bytes=arrayrecord_payload_bytes(content[self.arrayrecord_key]),
                downlink_bytes=self._downlink.get(node, 0),
                private_params=int(info.get("private-params", 0)),
            )
            accepted.append(msg)
        if len(accepted) < self.min_survivors:
            log(WARNING, "round %d: %d valid replies < %d: global weights unchanged",
                server_round, len(accepted), self.min_survivors)
            self.recorder.event("kept-global", reason=f"{len(accepted)} valid replies < {self.min_survivors}")
            return None, None
        return super().aggregate_train(server_round, accepted)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        valid = []
        for msg in replies:
            if msg.has_error():
                self.recorder.event("eval-failed", node=msg.metadata.src_node_id, reason=msg.error.reason)
                continue
            info = msg.content.get("info", ConfigRecord())
            metrics = next(iter(msg.content.metric_records.values()))
            self.recorder.client(int(info.get("client-id", -1)),
                                 **{k.replace("-", "_"): v for k, v in metrics.items() if k != self.weighted_by_key})
            valid.append(msg)
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

"""Partial aggregation: weighted FedAvg over exactly the parameters a method shares.

The rule for what is shared is declarative (:mod:`pwff_app.methods`): the server's initial
``ArrayRecord`` holds the shared parameters and nothing else, and every reply must carry
exactly those keys with the same shapes and dtypes and finite values. A reply that does not is
rejected with a logged reason and counted in the round's record; the round aggregates the rest.
If no reply survives, the global weights stay as they were and the run goes on.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from pwff_app.payload import arrayrecord_payload_bytes, payload_bytes
from pwff_app.results import RunRecorder


def reply_problem(reply_arrays: ArrayRecord, reference: ArrayRecord) -> str | None:
    """Why a reply's arrays cannot be averaged into ``reference``, or None if they can."""
    got, want = set(reply_arrays.keys()), set(reference.keys())
    if got != want:
        extra, missing = sorted(got - want), sorted(want - got)
        return f"keys differ from the shared set (unexpected {extra[:3]}, missing {missing[:3]})"
    for key, ref in reference.items():
        arr = reply_arrays[key]
        if tuple(arr.shape) != tuple(ref.shape) or arr.dtype != ref.dtype:
            return f"{key}: {arr.dtype}{list(arr.shape)} != expected {ref.dtype}{list(ref.shape)}"
        if not np.isfinite(arr.numpy()).all():
            return f"{key}: non-finite values"
    return None


class PartialFedAvg(FedAvg):
    """FedAvg restricted to the shared parameters, with per-client records and reply checks.

    Args:
        recorder: where per-client numbers of each round go.
        min_survivors: fewest valid replies needed to update the global weights.
        **kwargs: passed to :class:`flwr.serverapp.strategy.FedAvg`.
    """

    def __init__(self, recorder: RunRecorder, min_survivors: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.recorder = recorder
        self.min_survivors = min_survivors
        self._global: ArrayRecord | None = None
        self._downlink: dict[int, int] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = arrays
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._downlink = {m.metadata.dst_node_id: payload_bytes(m.content) for m in messages}
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                self.recorder.event("failed", node=node, reason=msg.error.reason)
                continue
            content = msg.content
            info = content.get("info", ConfigRecord())
            client_id = int(info.get("client-id", -1))
            arrays = content.array_records.get(self.arrayrecord_key)
            problem = "no ArrayRecord" if arrays is None else reply_problem(arrays, self._global)
            if problem is None and len(content.array_records) != 1:
                problem = f"extra ArrayRecords {sorted(content.array_records)}"
            if problem is not None:
                log(WARNING, "round %d: rejected reply of client %d (node %d): %s",
                    server_round, client_id, node, problem)
                self.recorder.event("rejected", node=node, client=client_id, reason=problem)
                continue
            metrics = next(iter(content.metric_records.values()), MetricRecord())
            self.recorder.client(
                client_id,
                num_examples=int(metrics.get(self.weighted_by_key, 0)),
                train_loss=metrics.get("train-loss"),
                uplink_bytes=arrayrecord_payload_bytes(arrays),
                downlink_bytes=self._downlink.get(node, 0),
                private_params=int(info.get("private-params", 0)),
            )
            accepted.append(msg)
        if len(accepted) < self.min_survivors:
            log(WARNING, "round %d: %d valid replies < %d: global weights unchanged",
                server_round, len(accepted), self.min_survivors)
            return None, None
        return super().aggregate_train(server_round, accepted)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
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
        return aggregated

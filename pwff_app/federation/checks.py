"""Reply checks: pure functions over a reply's records, one implementation for every family.

A client's reply is input from outside: every field is checked here before the server reads
it. Each check returns None for a usable reply, else one line saying why not; the caller
rejects the reply with that reason, counts it in the round's ``events`` and goes on.

* :data:`RANGES` — the one table of allowed values of every metric and ``info`` field.
* :data:`KINDS` — which records, metrics and ``info`` fields each kind of reply carries.
* :func:`reply_problem` — records, fields, ranges, example bound, client id and round.
* :func:`query_problem` — an answer to the start-up query (:mod:`pwff_app.federation.roster`).
* :func:`decode_problem` — an Array's bytes against the dtype and shape it declares.
* :func:`arrays_problem` — arrays against the global: keys, shapes, dtypes, finite, norm.
* :func:`activations_problem` — FedBERT's activation replies (shapes, mask, labels).
* :func:`example_bounds` — the bound on ``num-examples`` (run config ``max-num-examples``).
* :func:`stop_if_all_failed` — every client failed with the same error: the run stops.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from flwr.app import ArrayRecord, RecordDict

ARRAYS, METRICS, INFO = "arrays", "metrics", "info"  # the record names of every reply
WIRELESS = "wireless"  # the uplink record the link's client mod adds (pwff_app.wireless.link)

AUTO_MAX_EXAMPLES = 1_000_000
"""Bound on a task-family count when the config caps nothing (``task.max-*-samples = 0``).

The server does not load the clients' data (in a deployment it may not have it), so it
cannot know a partition's size; AG News has 120,000 training rows in all.
"""


class AllClientsFailed(RuntimeError):
    """Every client failed the run's first round with the same error: the setup is broken."""


class ExampleBounds(NamedTuple):
    """Largest ``num-examples`` a train and an evaluate reply may claim."""

    train: int
    evaluate: int


@dataclass(frozen=True)
class Range:
    """Allowed values of one number: finite, in [low, high] (high excluded if ``open_high``)."""

    low: float = -math.inf
    high: float = math.inf
    open_high: bool = False
    integer: bool = False

    def problem(self, name: str, value: Any) -> str | None:
        """Why ``value`` is not allowed for ``name``, or None."""
        number = as_integer(value) if self.integer else as_number(value)
        if number is None:
            what = "an integer" if self.integer else "a finite number"
            return f"'{name}' = {_show(value)} is not {what}"
        if number < self.low or number > self.high or (self.open_high and number == self.high):
            return f"'{name}' = {_show(value)} outside {self}"
        return None

    def __str__(self) -> str:
        return f"[{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"


FINITE, NON_NEGATIVE, COUNT = Range(), Range(0.0), Range(0.0, integer=True)

RANGES: dict[str, Range] = {
    # counts: num-examples also has an upper bound (example_bounds); ids are matched after
    "num-examples": Range(1.0, integer=True),
    "num-steps": COUNT, "skipped-backward": COUNT, "private-params": COUNT, "upload-bytes": COUNT,
    "attention-flops": COUNT, "attention-flops-dense": COUNT,
    "client-id": COUNT, "server-round": COUNT, "step": COUNT,
    "mask-seed": Range(integer=True), "global-crc": Range(0.0, 2.0 ** 32, open_high=True, integer=True),
    "compute-s": NON_NEGATIVE,
    # task tuning (own test split; global test set; PFTT's shared part alone on the global set)
    "accuracy": Range(0.0, 1.0), "loss": NON_NEGATIVE, "train-loss": NON_NEGATIVE,
    "global-accuracy": Range(0.0, 1.0), "global-loss": NON_NEGATIVE,
    "shared-only-accuracy": Range(0.0, 1.0), "shared-only-loss": NON_NEGATIVE,
    # instruction tuning: reward-model scores and KL estimates are real numbers of any sign
    "sparsity": Range(0.0, 1.0, open_high=True),
    "reward-train": FINITE, "help-train": FINITE, "safe-train": FINITE, "reg-reward": FINITE, "kl": FINITE,
    "helpfulness": FINITE, "safety": FINITE, "combined": FINITE,
    "judge-helpfulness": FINITE, "judge-safety": FINITE, "judge-combined": FINITE,
    "response-tokens": NON_NEGATIVE, "refusal-share": Range(0.0, 1.0),
}


@dataclass(frozen=True)
class ReplyKind:
    """What one kind of reply carries: an ArrayRecord or not, its exact metrics and info fields."""

    arrays: bool
    metrics: frozenset[str]
    info: frozenset[str]


def _kind(arrays: bool, metrics: str, info: str) -> ReplyKind:
    return ReplyKind(arrays, frozenset(metrics.split()), frozenset(info.split()))


_TRAIN_INFO, _EVAL_INFO = "client-id server-round compute-s private-params", "client-id server-round"
_SPLIT_INFO = "client-id server-round step compute-s"
_TASK_EVAL, _GLOBAL, _SHARED_ONLY = "num-examples accuracy loss", "global-accuracy global-loss", \
    "shared-only-accuracy shared-only-loss"
KINDS: dict[str, ReplyKind] = {
    "task/train": _kind(True, "num-examples train-loss", _TRAIN_INFO),
    "task/evaluate": _kind(False, _TASK_EVAL, _EVAL_INFO),
    # an evaluate message with GLOBAL_EVAL set: also the global test set (and PFTT's shared part alone)
    "task/evaluate+global": _kind(False, f"{_TASK_EVAL} {_GLOBAL}", _EVAL_INFO),
    "task/evaluate+global+shared-only": _kind(False, f"{_TASK_EVAL} {_GLOBAL} {_SHARED_ONLY}", _EVAL_INFO),
    "instruct/train": _kind(True, "num-examples reward-train help-train safe-train kl reg-reward sparsity "
                            "mask-seed global-crc attention-flops attention-flops-dense upload-bytes", _TRAIN_INFO),
    # Shepherd's supervised round: its loss instead of the PPO statistics (no reward in training)
    "instruct/sft-train": _kind(True, "num-examples train-loss sparsity mask-seed global-crc attention-flops "
                                "attention-flops-dense upload-bytes", _TRAIN_INFO),
    "instruct/evaluate": _kind(False, "num-examples helpfulness safety combined kl judge-helpfulness judge-safety "
                               "judge-combined response-tokens refusal-share", _EVAL_INFO),
    "split/activations": _kind(True, "num-examples num-steps", _SPLIT_INFO),  # train and evaluate steps
    "split/weights": _kind(True, "num-examples num-steps skipped-backward", _SPLIT_INFO),
}


GLOBAL_EVAL = "global-eval"
"""Key of a task-family evaluate message's ``config``: True asks the client to also evaluate on
the global test set (and, where the method has one, its shared part alone)."""


def evaluate_kind(base: str, global_eval: bool, shared_only: bool) -> str:
    """The :data:`KINDS` entry of an evaluate reply: ``base`` (``task/evaluate``), with the global
    test set's fields when ``global_eval``, and the shared-only fields too when ``shared_only``."""
    if not global_eval:
        return base
    return f"{base}+global" + ("+shared-only" if shared_only else "")


def as_number(value: Any) -> float | int | None:
    """``value`` as a finite number, or None (bools, strings, lists, NaN and inf are no numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int):
        return value  # finite; math.isfinite would overflow on a huge one
    return value if math.isfinite(value) else None


def as_integer(value: Any) -> int | None:
    """``value`` as an integer, or None; an integral float (``32.0``) counts, ``32.5`` does not."""
    number = as_number(value)
    if number is None or (isinstance(number, float) and not number.is_integer()):
        return None
    return int(number)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _fields_problem(record: Mapping[str, Any], expected: frozenset[str], what: str) -> str | None:
    """Exactly the ``expected`` keys, each within its :data:`RANGES` entry."""
    if set(record) != expected:
        missing, extra = sorted(expected - set(record)), sorted(set(record) - expected)
        return f"{what}: missing {missing[:4]}, unexpected {extra[:4]}"
    return next(filter(None, (RANGES[key].problem(key, record[key]) for key in sorted(expected))), None)


def _records_problem(content: RecordDict, kind: ReplyKind) -> str | None:
    """The records a reply of ``kind`` holds, by name (the wireless uplink record may join)."""
    arrays = sorted(content.array_records)
    if arrays != ([ARRAYS] if kind.arrays else []):
        return f"array records {arrays}, expected {[ARRAYS] if kind.arrays else []}"
    if sorted(content.metric_records) != [METRICS]:
        return f"metric records {sorted(content.metric_records)}, expected ['{METRICS}']"
    configs = set(content.config_records)
    if INFO not in configs or configs - {INFO, WIRELESS}:
        return f"config records {sorted(configs)}, expected '{INFO}' (and '{WIRELESS}')"
    return None


def reply_problem(content: RecordDict, kind: ReplyKind, *, client_id: int | None, server_round: int,
                  max_examples: int, step: int | None = None) -> str | None:
    """Why a reply's envelope cannot be used, or None; run before any of its fields is read.

    Args:
        content: the reply's records.
        kind: what this kind of reply carries (an entry of :data:`KINDS`).
        client_id: the client the sending node runs (the roster's), None if it has none.
        server_round: the round the reply must name.
        max_examples: the largest ``num-examples`` it may claim (:func:`example_bounds`).
        step: FedBERT's step the reply must name (None: no step).
    """
    if client_id is None:
        return "the sending node did not answer the start-up query (no client in the roster)"
    problem = (_records_problem(content, kind) or _fields_problem(content[INFO], kind.info, INFO)
               or _fields_problem(content[METRICS], kind.metrics, METRICS))
    if problem is not None:
        return problem
    info, examples = content[INFO], as_integer(content[METRICS]["num-examples"])
    if examples > max_examples:
        return f"'num-examples' = {examples} > bound {max_examples}"
    if as_integer(info["client-id"]) != client_id:
        return f"client id {info['client-id']} from the node of client {client_id} (spoofed)"
    if as_integer(info["server-round"]) != server_round:
        return f"reply for round {info['server-round']} in round {server_round}"
    if step is not None and as_integer(info["step"]) != step:
        return f"reply for step {info['step']} while expecting step {step}"
    return None


def query_problem(content: RecordDict, num_clients: int) -> str | None:
    """Why an answer to the start-up query names no usable client id, or None.

    The answer holds one ConfigRecord ``info`` with one integer ``client-id`` in [0, ``num_clients``).
    """
    if content.array_records or content.metric_records or list(content.config_records) != [INFO]:
        return f"expected only ConfigRecord '{INFO}', got {sorted(content.keys())[:4]}"
    problem = _fields_problem(content[INFO], frozenset({"client-id"}), INFO)
    client_id = as_integer(content[INFO].get("client-id"))
    if problem is None and client_id >= num_clients:
        problem = f"client id {client_id} not in [0, {num_clients})"
    return problem


def decode_problem(record: ArrayRecord) -> str | None:
    """Why some Array's bytes do not decode to the dtype and shape it declares, or None.

    An Array carries its dtype and shape beside its bytes (a ``.npy`` file); a sender can make
    the two disagree, so nothing that reads the values may trust the declaration alone.
    """
    for key, arr in record.items():
        try:
            value = arr.numpy()
        except Exception as err:  # np.load on foreign bytes raises many kinds; all mean "unusable"
            return f"{key}: undecodable bytes ({type(err).__name__})"
        if str(value.dtype) != arr.dtype or tuple(value.shape) != tuple(arr.shape):
            return f"{key}: bytes hold {value.dtype}{list(value.shape)}, declared {arr.dtype}{list(arr.shape)}"
    return None


def arrays_problem(reply_arrays: ArrayRecord, reference: ArrayRecord, max_update_norm: float = 0.0) -> str | None:
    """Why a reply's arrays cannot be aggregated with ``reference``, or None if they can.

    ``max_update_norm`` bounds the L2 norm of (reply - reference) over all arrays; 0 = no bound.
    """
    got, want = set(reply_arrays.keys()), set(reference.keys())
    if got != want:
        extra, missing = sorted(got - want), sorted(want - got)
        return f"keys differ from the shared set (unexpected {extra[:3]}, missing {missing[:3]})"
    for key, ref in reference.items():
        arr = reply_arrays[key]
        if tuple(arr.shape) != tuple(ref.shape) or arr.dtype != ref.dtype:
            return f"{key}: {arr.dtype}{list(arr.shape)} != expected {ref.dtype}{list(ref.shape)}"
    problem = decode_problem(reply_arrays)
    if problem is not None:
        return problem
    squared = 0.0
    for key, ref in reference.items():
        value = reply_arrays[key].numpy()
        if not np.isfinite(value).all():
            return f"{key}: non-finite values"
        squared += float(np.sum((value.astype(np.float64) - ref.numpy()) ** 2))
    if max_update_norm > 0 and squared ** 0.5 > max_update_norm:
        return f"update norm {squared ** 0.5:.4g} > bound {max_update_norm:.4g}"
    return None


def activations_problem(record: ArrayRecord, num_examples: int, hidden: int, num_labels: int,
                        max_length: int) -> str | None:
    """Why FedBERT activations (``activations``, ``attention-mask``, ``labels``) are unusable, or None.

    ``num_examples`` is the reply's claim: it must be the number of rows sent. Rows hold at
    most ``max_length`` tokens, labels are classes in [0, ``num_labels``).
    """
    if set(record.keys()) != {"activations", "attention-mask", "labels"}:
        return f"arrays {sorted(record.keys())[:4]}, expected activations, attention-mask, labels"
    problem = decode_problem(record)
    if problem is not None:
        return problem
    acts, mask, labels = (record[k].numpy() for k in ("activations", "attention-mask", "labels"))
    if (acts.ndim != 3 or acts.shape[2] != hidden or mask.shape != acts.shape[:2] or labels.shape != acts.shape[:1]
            or not 1 <= acts.shape[1] <= max_length):
        return f"activation shapes {acts.shape}, mask {mask.shape}, labels {labels.shape} do not fit"
    if acts.shape[0] != num_examples:
        return f"'num-examples' = {num_examples} but {acts.shape[0]} rows sent"
    if acts.dtype.kind != "f" or not np.isfinite(acts).all():
        return "non-finite activations"
    if mask.dtype.kind not in "iub" or not np.isin(mask, (0, 1)).all() or not mask.any(axis=1).all():
        return "attention mask must be 0/1 with at least one token per row"
    if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= num_labels:
        return f"labels must be integers in [0, {num_labels})"
    return None


def example_bounds(cfg: Any) -> ExampleBounds:
    """The bound on ``num-examples`` of train and evaluate replies (``cfg``: a ``RunConfig``).

    ``max-num-examples`` > 0 bounds both. 0 (automatic): the most rows a client can hold by
    the config: instruct train ``prompts-per-round``, evaluate ``eval-prompts x eval-samples``;
    task ``task.max-train-samples`` / ``task.max-test-samples``, or :data:`AUTO_MAX_EXAMPLES`
    where those are 0 (no cap).
    """
    if cfg.aggregation.max_num_examples > 0:
        return ExampleBounds(cfg.aggregation.max_num_examples, cfg.aggregation.max_num_examples)
    if cfg.spec.family == "instruct":
        icfg = cfg.instruct
        return ExampleBounds(icfg.prompts_per_round, icfg.eval_prompts * icfg.eval_samples)
    task = cfg.task
    return ExampleBounds(task.max_train_samples or AUTO_MAX_EXAMPLES, task.max_test_samples or AUTO_MAX_EXAMPLES)


def stop_if_all_failed(outcomes: Mapping[int, str | None], num_clients: int, stage: str) -> None:
    """Raise :class:`AllClientsFailed` if every client failed with one and the same error.

    ``outcomes``: node -> why its reply failed or was rejected (None: accepted). A setup
    error (missing data, a broken model) fails every client alike; a lossy link or a hostile
    client does not, so the run goes on then. ``stage`` names the exchange ("round 1",
    "the start-up query"); callers apply it to the first exchange of a run only.
    """
    reasons = set(outcomes.values())
    if len(outcomes) >= num_clients and len(reasons) == 1 and None not in reasons:
        reason = " ".join(str(reasons.pop()).split())  # one line, whatever the client sent
        raise AllClientsFailed(f"{stage}: all {len(outcomes)} clients failed with the same error: {reason}")

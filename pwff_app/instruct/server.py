"""PFIT server (paper IV-C): the sparse-aware strategy and the run loop of the instruct methods.

:func:`run_pfit` ensures the reward models exist (trains them once, timed), starts a
partial-aggregation strategy whose reply checks understand sparse uploads and whose FedAvg is
:func:`pwff_app.instruct.sparse_attention.aggregate_sparse`, and returns the summary block.
The clients' side is :mod:`pwff_app.instruct.client`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg

from pwff_app.compression.adaptive import choose_sparsity, expected_delay_s
from pwff_app.compression.codecs import Codec
from pwff_app.compression.server import CompressionPlan, uplink_rate_bps
from pwff_app.config import InstructConfig, RunConfig
from pwff_app.device import placement
from pwff_app.federation.results import RunRecorder
from pwff_app.federation.checks import INFO, METRICS, arrays_problem, decode_problem, example_bounds
from pwff_app.federation.roster import Roster, RoundSampler
from pwff_app.federation.strategy import _PartialMixin
from pwff_app.instruct import runtime
from pwff_app.instruct.client import SPARSITY_KEY, global_fingerprint
from pwff_app.instruct.policy import is_attention_param, policy_source, trainable_state
from pwff_app.instruct.sparse_pattern import keep_count
from pwff_app.instruct.sparse_attention import aggregate_sparse, build_attention_masks, pack_sparse, unpack_sparse


class _SparseAggregation:
    """Sits between the partial mixin and Flower's rule: turns accepted sparse replies dense first.

    For ``fedavg`` the arrays are :func:`aggregate_sparse` (each entry averaged over the clients
    that updated it); for median / trimmed mean, Flower's rule over the dense reconstructions
    (an entry a client froze counts at the global value).
    """

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)  # the replies the checks accepted
        decoded = [self._decoded[id(msg.content)] for msg in replies]
        for msg, (dense, _, _) in zip(replies, decoded):
            metrics = next(iter(msg.content.metric_records.values()))
            msg.content = RecordDict({self.arrayrecord_key: ArrayRecord({k: Array(v.numpy()) for k, v in dense.items()}),
                                      "metrics": metrics})
        arrays, metrics = super().aggregate_train(server_round, replies)
        if self.sparse_fedavg and replies:
            glob = {k: torch.from_numpy(v.numpy()) for k, v in self._global.items()}
            uploads = [pack_sparse(dense, masks) for dense, masks, _ in decoded]
            out = aggregate_sparse(glob, uploads, [m for _, m, _ in decoded], [w for _, _, w in decoded])
            arrays = ArrayRecord({k: Array(v.numpy()) for k, v in out.items()})
        return arrays, metrics


#: The train reply kind (pwff_app.federation.checks.KINDS) of each trainer a method row can name.
TRAIN_KINDS = {"ppo": "instruct/train", "sft": "instruct/sft-train"}
# A train reply's metrics go into rounds.jsonl under these names (the rest: '-' -> '_'), but these.
_TRAIN_RECORD = {"kl": "kl_train"}
_NOT_RECORDED = frozenset({"num-examples", "mask-seed", "global-crc", "upload-bytes"})


class SparsePartialMixin(_PartialMixin, _SparseAggregation):
    """Reply checks for packed sparse uploads, and the per-client PFIT records.

    Base order is the point: these checks come first (``_problem`` decodes each reply),
    :class:`_PartialMixin` rejects the bad replies and records the rest, then
    :class:`_SparseAggregation` turns the accepted ones dense right before Flower's rule, which a
    concrete class names last (see :data:`STRATEGIES`).
    """

    REPLY_KINDS = ("instruct/train", "instruct/evaluate")

    def __init__(self, *, block_names: Sequence[str], mask_rule: str, sparse_fedavg: bool, lora: bool,
                 icfg: InstructConfig | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.block_names, self.mask_rule, self.sparse_fedavg, self.lora = list(block_names), mask_rule, sparse_fedavg, lora
        self.icfg = icfg if icfg is not None else InstructConfig()
        self.REPLY_KINDS = (TRAIN_KINDS[self.icfg.trainer], "instruct/evaluate")
        self._chosen: dict[int, float] = {}  # client -> s chosen this round (instruct.sparsity = "adaptive")
        self._decoded: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]] = {}
        self._mask_cache: dict[tuple[float, int], dict[str, torch.Tensor]] = {}
        self._global_crc: int | None = None

    def _masked(self, name: str) -> bool:
        """Whether a trainable tensor is sent in packed form (an attention projection, no LoRA)."""
        return not self.lora and is_attention_param(name, self.block_names)

    def _sent_shapes(self, client_id: int) -> dict[str, tuple[int, ...]]:
        """The packed upload's shapes at the client's configured s (the adaptive codec sizes them)."""
        s = self.icfg.client_sparsity(client_id)
        return {k: (int(keep_count(int(np.prod(v.shape)), s)),) if self._masked(k) else tuple(v.shape)
                for k, v in self._global.items()}

    def _train_extra(self, grid):
        """``instruct.sparsity = "adaptive"``: each client's s for this round, from its last known uplink rate."""
        if not self.icfg.adaptive_sparsity:
            return None
        plan = self.compression
        codec = plan.cfg.codec() if plan is not None and plan.cfg.uplink != "none" else Codec("none")
        sizes = {k: int(np.prod(v.shape)) for k, v in self._global.items()}
        masked = [n for k, n in sizes.items() if self._masked(k)]
        dense = [n for k, n in sizes.items() if not self._masked(k)]
        self._chosen = {}

        def choose(client_id: int) -> dict:
            rate = uplink_rate_bps(grid, plan.channel, client_id)
            s = choose_sparsity(masked, dense, rate, plan.budget_s, codec)
            bits = sum(codec.encoded_bits(int(keep_count(n, s))) for n in masked) + sum(
                codec.encoded_bits(n) for n in dense)
            self._chosen[client_id] = s
            self.recorder.client(client_id, sparsity_choice=s, sparsity_rate_bps=rate,
                                 sparsity_expected_s=expected_delay_s(bits, rate))
            return {SPARSITY_KEY: s}
        return choose

    def configure_train(self, server_round, arrays, config, grid):
        self._decoded, self._mask_cache = {}, {}
        self._global_crc = global_fingerprint({k: v.numpy() for k, v in arrays.items()})
        return super().configure_train(server_round, arrays, config, grid)

    def _problem(self, msg: Message, server_round: int) -> str | None:
        # The envelope first: every field below is then present and within its range.
        problem = self._envelope_problem(msg, server_round, train=True)
        if problem is not None:
            return problem
        content = msg.content
        arrays, metrics, info = content[self.arrayrecord_key], content[METRICS], content[INFO]
        s, m_seed = float(metrics["sparsity"]), int(metrics["mask-seed"])
        client_id = self.roster[msg.metadata.src_node_id]
        if client_id in self._chosen and s != self._chosen[client_id]:
            return f"sparsity {s:g} while the server chose {self._chosen[client_id]:g} for this round"
        if self.mask_rule == "magnitude" and not self.lora and int(metrics["global-crc"]) != self._global_crc:
            return "trained from another global than this round's (magnitude masks would not match)"
        glob = {k: torch.from_numpy(v.numpy()) for k, v in self._global.items()}
        if self.lora:
            masks = {}
        else:
            key = (s, m_seed if self.mask_rule == "random" else 0)
            if key not in self._mask_cache:
                self._mask_cache[key] = build_attention_masks(glob, self.block_names, s, self.mask_rule, m_seed)
            masks = self._mask_cache[key]
        decoded = self._plain_arrays(msg, pack_sparse(glob, masks))
        if isinstance(decoded, str):
            return decoded
        arrays = decoded
        if set(arrays.keys()) != set(glob):
            extra, missing = sorted(set(arrays.keys()) - set(glob)), sorted(set(glob) - set(arrays.keys()))
            return f"keys differ from the trainable set (unexpected {extra[:3]}, missing {missing[:3]})"
        for k, ref in self._global.items():
            want = (int(masks[k].sum()),) if k in masks else tuple(ref.shape)
            got = arrays[k]
            if tuple(got.shape) != want or got.dtype != ref.dtype:
                return f"{k}: {got.dtype}{list(got.shape)} != expected {ref.dtype}{list(want)} at s={s}"
        problem = decode_problem(arrays)
        if problem is not None:
            return problem
        dense = unpack_sparse({k: v.numpy() for k, v in arrays.items()}, masks, glob)
        problem = arrays_problem(ArrayRecord({k: Array(v.numpy()) for k, v in dense.items()}), self._global,
                                 self.max_update_norm)
        if problem is not None:
            return problem
        self._decoded[id(content)] = (dense, masks, float(metrics[self.weighted_by_key]))
        self.recorder.client(self.roster[msg.metadata.src_node_id], compute_s=float(info["compute-s"]),
                             **{_TRAIN_RECORD.get(k, k.replace("-", "_")): metrics[k] for k in metrics
                                if k not in _NOT_RECORDED})
        return None

    def _record_evaluation(self, client_id: int, metrics: Mapping[str, Any]) -> None:
        super()._record_evaluation(client_id, metrics)
        self.recorder.client(client_id, reward=float(metrics["combined"]))


class PfitPartialFedAvg(SparsePartialMixin, FedAvg):
    """PFIT's FedAvg: :func:`aggregate_sparse`, each entry averaged over the clients that updated it."""


class PfitPartialFedMedian(SparsePartialMixin, FedMedian):
    """Coordinate-wise median of the clients' dense reconstructions."""


class PfitPartialFedTrimmedAvg(SparsePartialMixin, FedTrimmedAvg):
    """Coordinate-wise trimmed mean of the clients' dense reconstructions."""


#: PFIT's twin of each rule of :data:`pwff_app.federation.strategy.AGGREGATORS`, by the same name.
STRATEGIES: dict[str, type[SparsePartialMixin]] = {
    "fedavg": PfitPartialFedAvg,
    "median": PfitPartialFedMedian,
    "trimmed-mean": PfitPartialFedTrimmedAvg,
}


def make_strategy(cfg: RunConfig, icfg: InstructConfig, recorder: RunRecorder, block_names: Sequence[str],
                  roster: Roster, grid: Grid | None = None, **kwargs) -> SparsePartialMixin:
    """STRATEGIES[cfg.aggregation.aggregator] with the run's aggregation settings and reply checks
    (``roster``: node -> client, fixed before round 1; ``clients-per-round`` of it train a round,
    picked by ``selection`` with the history of ``grid``'s link); ``kwargs`` go to Flower."""
    agg = cfg.aggregation
    extra = {"beta": agg.trim_fraction} if agg.aggregator == "trimmed-mean" else {}
    return STRATEGIES[agg.aggregator](
        block_names=block_names, mask_rule=icfg.mask_rule, sparse_fedavg=agg.aggregator == "fedavg",
        lora=icfg.use_lora, icfg=icfg, recorder=recorder,
        compression=CompressionPlan(cfg.compression, cfg.wireless, recorder.client),
        sampler=RoundSampler.for_run(cfg, roster, icfg.num_rounds, grid), example_bounds=example_bounds(cfg),
        min_survivors=agg.min_survivors, max_update_norm=agg.max_update_norm, **extra, **kwargs)


#: What the summary keeps of each client's last evaluation (rounds.jsonl names).
EVAL_KEYS = ("helpfulness", "safety", "combined", "judge_helpfulness", "judge_safety", "judge_combined", "kl",
             "response_tokens", "refusal_share")


def _reward_block(recorder: RunRecorder) -> dict[str, Any]:
    """Each client's last evaluation (:data:`EVAL_KEYS`), ``mean`` = the mean training-RM combined
    reward, and ``means``: the mean over clients of every key."""
    last: dict[str, dict[str, float]] = {}
    for r in recorder.rounds:
        for cid, c in r["clients"].items():
            if "combined" in c:
                last[cid] = {k: float(c[k]) for k in EVAL_KEYS if k in c}
    last = dict(sorted(last.items(), key=lambda kv: int(kv[0])))
    means = {k: float(np.mean([v[k] for v in last.values()])) for k in EVAL_KEYS
             if last and all(k in v for v in last.values())}
    return {"per_client": last, "mean": means.get("combined"), "means": means}


def run_pfit(grid: Grid, cfg: RunConfig, recorder: RunRecorder, resumed: ArrayRecord | None,
             roster: Roster) -> dict[str, Any]:
    """Run an instruct-family method; returns the summary block for ``recorder.finish``.

    ``resumed`` is always None: the config refuses ``resume`` for this family. ``roster``:
    node -> client, fixed before round 1.
    """
    icfg = cfg.instruct.for_method(cfg.method)
    # The clients' placement: in a process shared with clients (simulation) they reuse these models.
    device, dtype = placement(cfg.device, cfg.precision)
    t0 = time.perf_counter()
    runtime.load_rewards(cfg, device)  # train once here, not in every client at once
    reward_s = time.perf_counter() - t0
    print(f"[pwff] reward models ready in {reward_s:.1f} s", flush=True)
    t0 = time.perf_counter()
    runtime.load_judges(cfg, device)  # the evaluation's judges, likewise; never used in training
    judges_s = time.perf_counter() - t0
    print(f"[pwff] judges ready in {judges_s:.1f} s", flush=True)
    t0 = time.perf_counter()
    bundle = runtime.get_bundle(icfg.policy_name, icfg.bundle_lora_rank, device, dtype)
    initial_state = bundle.initial  # as built: not what earlier runs in this process trained
    print(f"[pwff] policy ready in {time.perf_counter() - t0:.1f} s "
          f"({sum(v.numel() for v in initial_state.values()):,} trainable params shared)", flush=True)
    initial = ArrayRecord({k: Array(v.cpu().numpy()) for k, v in initial_state.items()})
    strategy = make_strategy(
        cfg, icfg, recorder, bundle.blocks, roster, grid,
        checkpoint_meta={"method": cfg.method, "seed": cfg.seed},
        min_train_nodes=cfg.num_clients, min_evaluate_nodes=cfg.num_clients, min_available_nodes=cfg.num_clients,
    )
    # Round 0: every client scores the pretrained policy on the held-out prompts, the baseline
    # of its reward trajectory (Flower's loop evaluates on clients only after a round's training).
    baseline = grid.send_and_receive(strategy.configure_evaluate(0, initial, ConfigRecord(), grid))
    strategy.aggregate_evaluate(0, baseline)
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=icfg.num_rounds)

    return {
        "num_clients": cfg.num_clients,
        "reward": _reward_block(recorder),
        "params": {"shared": sum(v.numel() for v in initial_state.values()), "private": recorder.private_params()},
        "sparsity": {"per_client": ("adaptive" if icfg.adaptive_sparsity else
                                    {str(c): icfg.client_sparsity(c) for c in range(cfg.num_clients)}),
                     "mask_rule": icfg.mask_rule, "uplink": "sparse (masked attention values + dense rest)",
                     "downlink": "dense"},
        # what each client's training optimises (none: Shepherd's supervised tuning uses no reward model)
        "reward_weights": ({str(c): list(icfg.client_weights(c)) for c in range(cfg.num_clients)}
                           if icfg.trainer == "ppo" else None),
        # what every method is evaluated with: the clients' own preferences (instruct.reward-weights)
        "preference_weights": {str(c): list(cfg.instruct.client_weights(c)) for c in range(cfg.num_clients)},
        "reward_models_s": round(reward_s, 3),
        "judges_s": round(judges_s, 3),
        "trainer": icfg.trainer, "eval_model": icfg.eval_model, "eval_split": icfg.eval_split,
        "aggregator": cfg.aggregation.aggregator,
        "instruct": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(icfg).items()},
                     "policy": policy_source(icfg.policy_name)},  # which weights: GGUF (quantized) or full
    }

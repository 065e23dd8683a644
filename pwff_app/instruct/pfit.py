"""PFIT in Flower (paper IV-C): federated PPO on the last two blocks with personalised rewards.

One module holds the client handlers, the server loop and the strategy for the ``instruct``
method family (``pfit``, ``pfl``, ``sfl``, ``shepherd``):

* **Client train** (:func:`handle_pfit_train`): load the received global trainable part
  (dense), rebuild this client's sparse update masks from it, restore the private value head,
  run ``instruct.ppo-steps`` PPO steps on this client's Alpaca prompts with the score
  ``w_help * R_help + w_safe * R_safe`` and the proximal term toward the global, reply with the
  packed upload (masked attention values + dense rest). The post-training weights are the
  client's *personalised local model*; they stay in the private state, beside the value head.
* **Client evaluate** (:func:`handle_pfit_evaluate`): the personalised local model of the round
  on a fixed held-out prompt set (disjoint from training prompts), seeded sampling, scored by
  both reward models; reports helpfulness, safety, the client's combined reward and the KL to
  the pretrained reference.
* **Server** (:func:`run_pfit`): ensures the reward models exist (trains them once, timed),
  starts a partial-aggregation strategy whose reply checks understand sparse uploads and whose
  FedAvg is :func:`pwff_app.instruct.sparse_attention.aggregate_sparse`, and returns the summary block.

Communication: downlink = the dense global trainable part; uplink = packed sparse (the masks
cost 0 bytes: the server rebuilds them from the global it sent, the client's s and seed).
"""

from __future__ import annotations

import math
import random
import re
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from pwff_app.config import ConfigError, InstructConfig, RunConfig
from pwff_app.instruct.policy import (
    PolicyWithValue,
    freeze_all_but_last_blocks,
    frozen_copy,
    load_policy,
    load_trainable_state,
    trainable_state,
)
from pwff_app.instruct.ppo import exact_sequence_kl, make_optimizer, ppo_step
from pwff_app.instruct.prompts import _raw_prompt, _round_prompts, client_prompts, format_prompt
from pwff_app.instruct.rollouts import generate_rollouts
from pwff_app.federation.results import RunRecorder
from pwff_app.instruct.sparse_attention import (
    aggregate_sparse,
    attention_pair_counts,
    build_attention_masks,
    enable_sparse_attention,
    pack_sparse,
    unpack_sparse,
    upload_bytes,
)
from pwff_app.federation.state import PrivateStore
from pwff_app.federation.strategy import AGGREGATORS, _PartialMixin, reply_problem

N_BLOCKS = 2  # paper: "we only train the last two layers"
_VALUE_PREFIX, _LOCAL_PREFIX = "value_head.", "local/"


# ---------------------------------------------------------------- policy and rewards, cached per process


@dataclass
class _Bundle:
    lm: Any
    tokenizer: Any
    ref: Any
    policy: PolicyWithValue
    blocks: list[str]


_BUNDLES: dict[tuple[str, int], _Bundle] = {}
_REWARDS: dict[str, Any] = {}


def load_base_policy(name: str) -> tuple[Any, Any]:
    """Load the LM and tokenizer (tests monkeypatch this to the tiny Llama)."""
    return load_policy(name)


def _lora_targets(lm, blocks: Sequence[str]) -> list[str]:
    names = []
    for b in blocks:
        for n, m in lm.named_modules():
            if n.startswith(b + ".") and isinstance(m, torch.nn.Linear) and re.search(
                    r"\.(self_attn|attn)\.(q_proj|k_proj|v_proj|o_proj)$", n):
                names.append(n)
    return names


def get_bundle(policy_name: str, lora_rank: int = 0) -> _Bundle:
    """The cached (policy, reference, tokenizer) of this process; trainable state is overwritten per call."""
    key = (policy_name, lora_rank)
    if key not in _BUNDLES:
        lm, tok = load_base_policy(policy_name)
        blocks = freeze_all_but_last_blocks(lm, N_BLOCKS)
        enable_sparse_attention(lm, blocks, 0.0)
        ref = frozen_copy(lm)  # the pretrained policy, before any LoRA
        if lora_rank > 0:
            from peft import LoraConfig, inject_adapter_in_model

            torch.manual_seed(0)  # same LoRA init on every client and the server
            targets = _lora_targets(lm, blocks)
            config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=targets)
            lm = inject_adapter_in_model(config, lm)
            for n, p in lm.named_parameters():
                p.requires_grad_(".lora_" in n)
        torch.manual_seed(0)
        _BUNDLES[key] = _Bundle(lm, tok, ref, PolicyWithValue(lm), blocks)
    return _BUNDLES[key]


def load_rewards(data_dir: Path | None) -> Any:
    """The helpfulness + safety reward models (``score(prompts, responses) -> {name: Tensor}``), cached.

    Tests monkeypatch this with a stub scorer.
    """
    key = str(data_dir)
    if key not in _REWARDS:
        from pwff_app.instruct.rewards.model import default_cache_dir, load_or_train_reward_models

        if data_dir is None:
            raise ConfigError("PFIT needs a data folder with hh-rlhf/ and alpaca/: set 'data-dir' or PWFF_DATA_DIR")
        _REWARDS[key] = load_or_train_reward_models(data_dir, default_cache_dir())
    return _REWARDS[key]


# ---------------------------------------------------------------- client


def global_fingerprint(arrays: Mapping[str, np.ndarray]) -> int:
    """CRC32 over the global trainable part (sorted keys): tells the server which global a client used."""
    crc = 0
    for k in sorted(arrays):
        crc = zlib.crc32(np.ascontiguousarray(arrays[k]).view(np.uint8), crc)
    return crc


def mask_seed(seed: int, client_id: int, server_round: int) -> int:
    return seed * 1_000_003 + client_id * 1009 + server_round


def _ids(msg: Message, context: Context) -> tuple[int, int, int]:
    return (int(context.node_config["partition-id"]), int(context.node_config["num-partitions"]),
            int(msg.content["config"]["server-round"]))


def _score(rewards: Any, cfg: InstructConfig, client_id: int, raw: list[str],
           responses: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    parts = rewards.score(raw, responses)
    w_help, w_safe = cfg.client_weights(client_id)
    combined = w_help * parts["helpfulness"].float()
    if cfg.reward_models == "both":
        combined = combined + w_safe * parts["safety"].float()
    return combined, parts


def _local_model(private: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """The client's personalised local model (trainable part) from its private state; {} if none yet."""
    return {k[len(_LOCAL_PREFIX):]: v for k, v in (private or {}).items() if k.startswith(_LOCAL_PREFIX)}


def _restore_value_head(policy: PolicyWithValue, private: Mapping[str, np.ndarray] | None) -> None:
    with torch.no_grad():
        if private is None:
            policy.value_head.weight.zero_()
            policy.value_head.bias.zero_()
            return
        for n, p in policy.value_head.named_parameters():
            p.copy_(torch.from_numpy(np.asarray(private[_VALUE_PREFIX + n])).reshape(p.shape))


def _check_global(incoming: Mapping[str, np.ndarray], bundle: _Bundle, method: str) -> None:
    expected = set(trainable_state(bundle.lm))
    if set(incoming) != expected:
        raise ValueError(f"global arrays do not match the trainable part of '{method}' "
                         f"({len(incoming)} keys, expected {len(expected)})")


def _setup(msg: Message, context: Context) -> tuple[str, int, InstructConfig, tuple[int, int, int], Any, _Bundle]:
    """What both handlers need: method, seed, config, (client, clients, round), data dir, models."""
    run_cfg = RunConfig.from_run_config(context.run_config)
    cfg = run_cfg.instruct.for_method(run_cfg.method)
    return (run_cfg.method, run_cfg.seed, cfg, _ids(msg, context), run_cfg.data_dir,
            get_bundle(cfg.policy_name, cfg.bundle_lora_rank))


def handle_pfit_train(msg: Message, context: Context) -> Message:
    """One PFIT round on a client (see the module docstring)."""
    started = time.perf_counter()
    method, seed, cfg, (client_id, num_clients, server_round), data_dir, bundle = _setup(msg, context)
    lm, tok, policy = bundle.lm, bundle.tokenizer, bundle.policy

    incoming = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    _check_global(incoming, bundle, method)
    global_params = {k: torch.from_numpy(np.array(v)) for k, v in incoming.items()}
    store = PrivateStore(context, client_id)
    private = store.load(upto_round=server_round - 1)
    # PFIT keeps a personalised local model per client (paper IV-C): it continues from it and the
    # proximal term pulls it toward the global; a non-personalised method starts from the global.
    local = _local_model(private) if cfg.personal_start else {}
    if local:
        _check_global(local, bundle, method)
    start = {k: torch.from_numpy(np.array(v)) for k, v in local.items()} if local else global_params
    load_trainable_state(lm, start)
    s = cfg.client_sparsity(client_id)
    enable_sparse_attention(lm, bundle.blocks, s)
    enable_sparse_attention(bundle.ref, bundle.blocks, s)
    m_seed = mask_seed(seed, client_id, server_round)
    masks = {} if cfg.use_lora else build_attention_masks(global_params, bundle.blocks, s, cfg.mask_rule, m_seed)
    policy.set_update_masks(masks)
    _restore_value_head(policy, private)

    ppo = cfg.ppo_config()
    optimizer = make_optimizer(policy, ppo)  # fresh each round (see make_optimizer)
    train, _ = client_prompts(data_dir, client_id, num_clients, seed, cfg.eval_prompts)
    records = _round_prompts(train, server_round, cfg.prompts_per_round)
    rewards = load_rewards(data_dir)
    torch.manual_seed(mask_seed(seed, client_id, server_round) + 17)
    attention_pair_counts(lm)  # reset the counters
    totals: dict[str, float] = {}
    n = cfg.prompts_per_step
    for step in range(cfg.ppo_steps):
        step_records = records[step * n:(step + 1) * n]
        if not step_records:
            break
        chunk = [r for r in step_records for _ in range(cfg.samples_per_prompt)]  # the rollout's row order
        prompts = [format_prompt(r["instruction"], r["input"], tok) for r in step_records]
        batch = generate_rollouts(policy, tok, prompts, ppo.max_new_tokens, ppo.temperature, ppo.top_k,
                                  samples_per_prompt=cfg.samples_per_prompt)
        scores, parts = _score(rewards, cfg, client_id, [_raw_prompt(r) for r in chunk], batch.responses)
        stats = ppo_step(policy, bundle.ref, batch, scores, ppo, optimizer, global_params)
        stats["help"] = float(parts["helpfulness"].mean())
        stats["safe"] = float(parts["safety"].mean()) if "safety" in parts else 0.0
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + v / cfg.ppo_steps
    attended, visible = attention_pair_counts(lm)
    head_dim = getattr(lm.config, "head_dim", None) or lm.config.hidden_size // lm.config.num_attention_heads

    trained = trainable_state(lm)
    keep = {_VALUE_PREFIX + n: p.detach().numpy().copy() for n, p in policy.value_head.named_parameters()}
    keep.update({_LOCAL_PREFIX + n: v.numpy() for n, v in trained.items()})
    store.save(keep, server_round)
    packed = pack_sparse(trained, masks)
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in packed.items()}),
        "metrics": MetricRecord({
            "num-examples": len(records),
            "reward-train": totals.get("reward/score_mean", 0.0),
            "help-train": totals.get("help", 0.0),
            "safe-train": totals.get("safe", 0.0),
            "kl": totals.get("objective/kl", 0.0),
            "reg-reward": totals.get("reg/reward", 0.0),
            "sparsity": s,
            "mask-seed": m_seed,
            "global-crc": global_fingerprint(incoming),
            "attention-flops": 4 * head_dim * attended,
            "attention-flops-dense": 4 * head_dim * visible,
            "upload-bytes": upload_bytes(packed),
        }),
        "info": ConfigRecord({"client-id": client_id, "server-round": server_round,
                              "compute-s": time.perf_counter() - started,
                              "private-params": sum(p.numel() for p in policy.value_head.parameters())}),
    })
    return Message(content=content, reply_to=msg)


def handle_pfit_evaluate(msg: Message, context: Context) -> Message:
    """Held-out rewards of this client's personalised local model after the round."""
    method, seed, cfg, (client_id, num_clients, server_round), data_dir, bundle = _setup(msg, context)
    lm, tok, policy = bundle.lm, bundle.tokenizer, bundle.policy

    local = _local_model(PrivateStore(context, client_id).load(upto_round=server_round))
    if not local:  # no training yet on this client: the global it was sent
        local = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    _check_global(local, bundle, method)
    load_trainable_state(lm, {k: torch.from_numpy(np.array(v)) for k, v in local.items()})
    s = cfg.client_sparsity(client_id)
    enable_sparse_attention(lm, bundle.blocks, s)
    enable_sparse_attention(bundle.ref, bundle.blocks, s)

    _, prompts_held_out = client_prompts(data_dir, client_id, num_clients, seed, cfg.eval_prompts)
    held_out = [r for r in prompts_held_out for _ in range(cfg.eval_samples)]
    prompts = [format_prompt(r["instruction"], r["input"], tok) for r in prompts_held_out]
    torch.manual_seed(cfg.eval_seed)  # the same sampling noise for every client and round
    batch = generate_rollouts(policy, tok, prompts, cfg.max_new_tokens, cfg.temperature,
                              samples_per_prompt=cfg.eval_samples)
    # KL on the first sample of each prompt: it sums the full-vocabulary KL at every position,
    # so it varies little, and two vocabulary projections per token are not cheap.
    first = batch.select(torch.arange(0, len(batch), cfg.eval_samples))
    kl = float(exact_sequence_kl(policy, bundle.ref, first, cfg.temperature).mean())
    parts = load_rewards(data_dir).score([_raw_prompt(r) for r in held_out], batch.responses)
    w_help, w_safe = cfg.client_weights(client_id)
    help_, safe = float(parts["helpfulness"].mean()), float(parts["safety"].mean())
    combined = w_help * help_ + (w_safe * safe if cfg.reward_models == "both" else 0.0)
    content = RecordDict({
        "metrics": MetricRecord({"num-examples": len(held_out), "helpfulness": help_, "safety": safe,
                                 "combined": combined, "kl": kl}),
        "info": ConfigRecord({"client-id": client_id, "server-round": server_round}),
    })
    return Message(content=content, reply_to=msg)


# ---------------------------------------------------------------- server


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


class _PfitChecks:
    """Reply checks for packed sparse uploads, and the per-client PFIT records."""

    def __init__(self, *, block_names: Sequence[str], mask_rule: str, sparse_fedavg: bool, lora: bool,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.block_names, self.mask_rule, self.sparse_fedavg, self.lora = list(block_names), mask_rule, sparse_fedavg, lora
        self._decoded: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]] = {}
        self._mask_cache: dict[tuple[float, int], dict[str, torch.Tensor]] = {}
        self._global_crc: int | None = None

    def configure_train(self, server_round, arrays, config, grid):
        self._decoded, self._mask_cache = {}, {}
        self._global_crc = global_fingerprint({k: v.numpy() for k, v in arrays.items()})
        return super().configure_train(server_round, arrays, config, grid)

    def _problem(self, content, server_round: int) -> str | None:
        problem = self._envelope_problem(content, server_round)
        if problem is not None:
            return problem
        arrays = content[self.arrayrecord_key]
        metrics = next(iter(content.metric_records.values()))
        info = content.get("info", ConfigRecord())
        try:
            s, m_seed = float(metrics["sparsity"]), int(metrics["mask-seed"])
        except (KeyError, TypeError, ValueError):
            return "metrics lack 'sparsity' / 'mask-seed' (needed to rebuild the update mask)"
        if not 0.0 <= s < 1.0:
            return f"sparsity {s} outside [0, 1)"
        if self.mask_rule == "magnitude" and not self.lora and int(metrics.get("global-crc", -1)) != self._global_crc:
            return "trained from another global than this round's (magnitude masks would not match)"
        glob = {k: torch.from_numpy(v.numpy()) for k, v in self._global.items()}
        if self.lora:
            masks = {}
        else:
            key = (s, m_seed if self.mask_rule == "random" else 0)
            if key not in self._mask_cache:
                self._mask_cache[key] = build_attention_masks(glob, self.block_names, s, self.mask_rule, m_seed)
            masks = self._mask_cache[key]
        if set(arrays.keys()) != set(glob):
            extra, missing = sorted(set(arrays.keys()) - set(glob)), sorted(set(glob) - set(arrays.keys()))
            return f"keys differ from the trainable set (unexpected {extra[:3]}, missing {missing[:3]})"
        for k, ref in self._global.items():
            want = (int(masks[k].sum()),) if k in masks else tuple(ref.shape)
            got = arrays[k]
            if tuple(got.shape) != want or got.dtype != ref.dtype:
                return f"{k}: {got.dtype}{list(got.shape)} != expected {ref.dtype}{list(want)} at s={s}"
        dense = unpack_sparse({k: v.numpy() for k, v in arrays.items()}, masks, glob)
        problem = reply_problem(ArrayRecord({k: Array(v.numpy()) for k, v in dense.items()}), self._global,
                                self.max_update_norm)
        if problem is not None:
            return problem
        self._decoded[id(content)] = (dense, masks, float(metrics[self.weighted_by_key]))
        cid = int(info.get("client-id", -1))
        self.recorder.client(cid, sparsity=s, reward_train=metrics.get("reward-train"), kl_train=metrics.get("kl"),
                             reg_reward=metrics.get("reg-reward"), help_train=metrics.get("help-train"),
                             safe_train=metrics.get("safe-train"),
                             attention_flops=int(metrics.get("attention-flops", 0)),
                             attention_flops_dense=int(metrics.get("attention-flops-dense", 0)),
                             compute_s=float(info.get("compute-s", 0.0)))
        return None

    def aggregate_evaluate(self, server_round, replies):
        replies = list(replies)
        for msg in replies:
            if msg.has_error():
                continue
            info = msg.content.get("info", ConfigRecord())
            metrics = next(iter(msg.content.metric_records.values()))
            if "combined" in metrics:
                self.recorder.client(int(info.get("client-id", -1)), reward=float(metrics["combined"]))
        return super().aggregate_evaluate(server_round, replies)


def make_strategy(cfg: RunConfig, icfg: InstructConfig, recorder: RunRecorder, block_names: Sequence[str],
                  **kwargs) -> _PartialMixin:
    """AGGREGATORS[cfg.aggregation.aggregator] with sparse-aware reply checks and aggregation."""
    partial = AGGREGATORS[cfg.aggregation.aggregator]
    flower_base = next(c for c in partial.__mro__ if c.__module__.startswith("flwr."))
    inner = type(f"_Sparse{flower_base.__name__}", (_SparseAggregation, flower_base), {})
    cls = type(f"Pfit{partial.__name__}", (_PfitChecks, _PartialMixin, inner), {})
    extra = {"beta": cfg.aggregation.trim_fraction} if cfg.aggregation.aggregator == "trimmed-mean" else {}
    return cls(block_names=block_names, mask_rule=icfg.mask_rule, sparse_fedavg=cfg.aggregation.aggregator == "fedavg",
               lora=icfg.use_lora, recorder=recorder, min_survivors=cfg.aggregation.min_survivors,
               max_update_norm=cfg.aggregation.max_update_norm, **extra, **kwargs)


def _reward_block(recorder: RunRecorder) -> dict[str, Any]:
    last: dict[str, dict[str, float]] = {}
    for r in recorder.rounds:
        for cid, c in r["clients"].items():
            if "combined" in c:
                last[cid] = {k: float(c[k]) for k in ("helpfulness", "safety", "combined", "kl") if k in c}
    last = dict(sorted(last.items(), key=lambda kv: int(kv[0])))
    mean = float(np.mean([v["combined"] for v in last.values()])) if last else None
    return {"per_client": last, "mean": mean}


def run_pfit(grid, cfg: RunConfig, context: Context, recorder: RunRecorder) -> dict[str, Any]:
    """Run an instruct-family method; returns the summary block for ``recorder.finish``."""
    icfg = cfg.instruct.for_method(cfg.method)
    t0 = time.perf_counter()
    load_rewards(cfg.data_dir)  # train once here, not in every client at the same time
    reward_s = time.perf_counter() - t0
    print(f"[pwff] reward models ready in {reward_s:.1f} s", flush=True)
    t0 = time.perf_counter()
    bundle = get_bundle(icfg.policy_name, icfg.bundle_lora_rank)
    initial_state = trainable_state(bundle.lm)
    print(f"[pwff] policy ready in {time.perf_counter() - t0:.1f} s "
          f"({sum(v.numel() for v in initial_state.values()):,} trainable params shared)", flush=True)
    initial = ArrayRecord({k: Array(v.numpy()) for k, v in initial_state.items()})
    strategy = make_strategy(
        cfg, icfg, recorder, bundle.blocks,
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
        "sparsity": {"per_client": {str(c): icfg.client_sparsity(c) for c in range(cfg.num_clients)},
                     "mask_rule": icfg.mask_rule, "uplink": "sparse (masked attention values + dense rest)",
                     "downlink": "dense"},
        "reward_weights": {str(c): list(icfg.client_weights(c)) for c in range(cfg.num_clients)},
        "reward_models_s": round(reward_s, 3),
        "aggregator": cfg.aggregation.aggregator,
        "instruct": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(icfg).items()},
    }

"""Client handlers (paper IV-C) of the ``instruct`` method family (``pfit``, ``pfl``, ``sfl``, ``shepherd``).

* **Train** (:func:`handle_pfit_train`): load and check the received global trainable part
  (dense), then run the method row's trainer (:data:`TRAINERS`, ``instruct`` override ``trainer``):

  - ``ppo`` (PFIT, PFL, SFL): rebuild this client's sparse update masks from the global,
    restore the private value head, run ``instruct.ppo-steps`` PPO steps on this client's
    Alpaca training prompts with the score ``w_help * R_help + w_safe * R_safe`` of the
    *training* reward models and the proximal term toward the global; reply with the packed
    upload (masked attention values + dense rest). The post-training weights are the client's
    *personalised local model*; they stay in the private state, beside the value head.
  - ``sft`` (Shepherd): supervised LoRA tuning from the global LoRA on the round's Alpaca
    (instruction, output) pairs (:mod:`pwff_app.instruct.sft`, TRL's ``SFTTrainer``); no reward
    model, nothing private; reply with the dense LoRA.

* **Evaluate** (:func:`handle_pfit_evaluate`): the row's ``eval_model`` (:data:`EVAL_MODELS`:
  the client's personalised local model, or the aggregated global the message carries) on the
  fixed evaluation prompts (``instruct.eval-split`` of the Alpaca split, disjoint from every
  training share), seeded sampling. Reports the *training* reward models' scores and the
  *judges'* (never used in training), each as helpfulness, safety and the client's preference
  mix (``instruct.reward-weights``, whatever the method trains on), the KL to the pretrained
  reference, the mean response length (tokens) and the share of refusal-like responses
  (:func:`pwff_app.instruct.evaluation.is_refusal`).

Communication: downlink = the dense global trainable part; uplink = packed sparse (the masks
cost 0 bytes: the server (:mod:`pwff_app.instruct.server`) rebuilds them from the global it
sent, the client's s and seed).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from pwff_app.config import InstructConfig, RunConfig
from pwff_app.device import placement
from pwff_app.federation.state import PrivateStore
from pwff_app.instruct import runtime
from pwff_app.instruct.policy import PolicyWithValue, load_trainable_state, trainable_state
from pwff_app.instruct.ppo import exact_sequence_kl, make_optimizer, ppo_step
from pwff_app.instruct.prompts import _raw_prompt, _round_prompts, client_prompts, format_prompt
from pwff_app.instruct.evaluation import refusal_share, weighted
from pwff_app.instruct.rollouts import generate_rollouts
from pwff_app.instruct.sft import sft_examples, supervised_round
from pwff_app.instruct.sparse_attention import (
    attention_pair_counts,
    build_attention_masks,
    enable_sparse_attention,
    pack_sparse,
    upload_bytes,
)

_VALUE_PREFIX, _LOCAL_PREFIX = "value_head.", "local/"  # keys of the private state
_SPARSITY = "meta/sparsity"  # private state: the s of the client's last training round
SPARSITY_KEY = "pwff.sparsity"  # train message config: s chosen by the server (instruct.sparsity = "adaptive")


def global_fingerprint(arrays: Mapping[str, np.ndarray]) -> int:
    """CRC32 over the global trainable part (sorted keys): tells the server which global a client used."""
    crc = 0
    for k in sorted(arrays):
        crc = zlib.crc32(np.ascontiguousarray(arrays[k]).view(np.uint8), crc)
    return crc


def mask_seed(seed: int, client_id: int, server_round: int) -> int:
    """Seed of a client's random update mask in a round (the server rebuilds the mask from it)."""
    return seed * 1_000_003 + client_id * 1009 + server_round


def _ids(msg: Message, context: Context) -> tuple[int, int, int]:
    """(client id, number of clients, server round) of this call."""
    return (int(context.node_config["partition-id"]), int(context.node_config["num-partitions"]),
            int(msg.content["config"]["server-round"]))


def _score(rewards: Any, cfg: InstructConfig, client_id: int, raw: list[str],
           responses: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This client's PPO score [N] (``w_help * R_help + w_safe * R_safe``) and the per-model rewards.

    ``rewards`` must be the training reward models: a judge here would let the policy train on
    the measure it is reported on, so one is refused.
    """
    if getattr(rewards, "is_judge", False):
        raise RuntimeError("a judge reward model reached the training path: judges only evaluate")
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
    """The client's own value head from its private state; zeros in its first round."""
    with torch.no_grad():
        if private is None:
            policy.value_head.weight.zero_()
            policy.value_head.bias.zero_()
            return
        for n, p in policy.value_head.named_parameters():
            p.copy_(torch.from_numpy(np.asarray(private[_VALUE_PREFIX + n])).reshape(p.shape))


def _check_global(incoming: Mapping[str, np.ndarray], bundle: runtime.Bundle, method: str) -> None:
    """Refuse arrays whose keys are not this process's trainable part (another method's or policy's)."""
    expected = set(trainable_state(bundle.lm))
    if set(incoming) != expected:
        raise ValueError(f"global arrays do not match the trainable part of '{method}' "
                         f"({len(incoming)} keys, expected {len(expected)})")


def _setup(msg: Message, context: Context) -> tuple[RunConfig, InstructConfig, tuple[int, int, int], runtime.Bundle]:
    """What both handlers need: run config, the method's instruct config, (client, clients, round),
    the models on the run's device."""
    run_cfg = RunConfig.from_run_config(context.run_config)
    cfg = run_cfg.instruct.for_method(run_cfg.method)
    bundle = runtime.get_bundle(cfg.policy_name, cfg.bundle_lora_rank, *placement(run_cfg.device, run_cfg.precision))
    return run_cfg, cfg, _ids(msg, context), bundle


def _train_sparsity(msg: Message, cfg: InstructConfig, client_id: int) -> float:
    """This round's s: the server's choice with ``instruct.sparsity = "adaptive"``, else the configured one."""
    config = msg.content["config"]
    if cfg.adaptive_sparsity and SPARSITY_KEY in config:
        s = float(config[SPARSITY_KEY])
        if not 0.0 <= s < 1.0:
            raise ValueError(f"'{SPARSITY_KEY}' = {s} is not in [0, 1)")
        return s
    return cfg.client_sparsity(client_id)


def sent_masks(msg: Message, reply: Message, context: Context) -> dict[str, np.ndarray]:
    """The update masks of a PFIT train reply (the protocol's ``sent_masks``): rebuilt, as the
    server does, from the received global, the reply's s and mask seed; {} with LoRA (dense)."""
    _, cfg, _, bundle = _setup(msg, context)
    if cfg.use_lora:
        return {}
    metrics = reply.content["metrics"]
    glob = {k: torch.from_numpy(v.numpy()) for k, v in msg.content["arrays"].items()}
    masks = build_attention_masks(glob, bundle.blocks, float(metrics["sparsity"]), cfg.mask_rule,
                                  int(metrics["mask-seed"]))
    return {k: m.numpy() for k, m in masks.items()}


@dataclass
class _Round:
    """One train call's inputs: the configs, ids, the models and the received global (CPU numpy)."""

    run_cfg: RunConfig
    cfg: InstructConfig
    client_id: int
    num_clients: int
    server_round: int
    bundle: runtime.Bundle
    incoming: dict[str, np.ndarray]
    msg: Message
    context: Context

    def records(self) -> list[dict]:
        """This round's ``prompts-per-round`` records of the client's training share."""
        train, _ = client_prompts(self.run_cfg.data_dir, self.client_id, self.num_clients, self.run_cfg.seed,
                                  self.cfg.eval_prompts, self.cfg.prompt_dataset, self.cfg.eval_split)
        return _round_prompts(train, self.server_round, self.cfg.prompts_per_round)


def _ppo_round(r: _Round) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """PPO on the training reward models (PFIT, PFL, SFL): (trained part, update masks, metrics)."""
    cfg, bundle, seed = r.cfg, r.bundle, r.run_cfg.seed
    lm, tok, policy = bundle.lm, bundle.tokenizer, bundle.policy
    global_cpu = {k: torch.from_numpy(np.array(v)) for k, v in r.incoming.items()}
    global_params = {k: v.to(bundle.device) for k, v in global_cpu.items()}  # the proximal term's anchor
    store = PrivateStore(r.context, r.client_id)
    private = store.load(upto_round=r.server_round - 1)
    # PFIT keeps a personalised local model per client (paper IV-C): it continues from it and the
    # proximal term pulls it toward the global; a non-personalised method starts from the global.
    local = _local_model(private) if cfg.personal_start else {}
    if local:
        _check_global(local, bundle, r.run_cfg.method)
    start = {k: torch.from_numpy(np.array(v)) for k, v in local.items()} if local else global_params
    load_trainable_state(lm, start)
    s = _train_sparsity(r.msg, cfg, r.client_id)
    enable_sparse_attention(lm, bundle.blocks, s)
    enable_sparse_attention(bundle.ref, bundle.blocks, s)
    m_seed = mask_seed(seed, r.client_id, r.server_round)
    masks = {} if cfg.use_lora else build_attention_masks(global_cpu, bundle.blocks, s, cfg.mask_rule, m_seed)
    policy.set_update_masks(masks)
    _restore_value_head(policy, private)

    ppo = cfg.ppo_config()
    optimizer = make_optimizer(policy, ppo)  # fresh each round (see make_optimizer)
    records = r.records()
    rewards = runtime.load_rewards(r.run_cfg, bundle.device)  # the training reward models, never the judges
    torch.manual_seed(m_seed + 17)
    attention_pair_counts(lm)  # reset the counters
    totals: dict[str, float] = {}
    n = cfg.prompts_per_step
    for step in range(cfg.ppo_steps):
        step_records = records[step * n:(step + 1) * n]
        if not step_records:
            break
        chunk = [rec for rec in step_records for _ in range(cfg.samples_per_prompt)]  # the rollout's row order
        prompts = [format_prompt(rec["instruction"], rec["input"], tok) for rec in step_records]
        batch = generate_rollouts(policy, tok, prompts, ppo.max_new_tokens, ppo.temperature, ppo.top_k,
                                  samples_per_prompt=cfg.samples_per_prompt, dtype=bundle.dtype)
        scores, parts = _score(rewards, cfg, r.client_id, [_raw_prompt(rec) for rec in chunk], batch.responses)
        stats = ppo_step(policy, bundle.ref, batch, scores, ppo, optimizer, global_params, bundle.dtype)
        stats["help"] = float(parts["helpfulness"].mean())
        stats["safe"] = float(parts["safety"].mean()) if "safety" in parts else 0.0
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + v / cfg.ppo_steps

    trained = trainable_state(lm)
    keep = {_VALUE_PREFIX + n: p.detach().cpu().numpy().copy() for n, p in policy.value_head.named_parameters()}
    keep.update({_LOCAL_PREFIX + n: v.cpu().numpy() for n, v in trained.items()})
    keep[_SPARSITY] = np.array([s], dtype=np.float64)
    store.save(keep, r.server_round)
    metrics = {"num-examples": len(records), "reward-train": totals.get("reward/score_mean", 0.0),
               "help-train": totals.get("help", 0.0), "safe-train": totals.get("safe", 0.0),
               "kl": totals.get("objective/kl", 0.0), "reg-reward": totals.get("reg/reward", 0.0),
               "sparsity": s, "mask-seed": m_seed,
               "private-params": sum(p.numel() for p in policy.value_head.parameters())}
    return trained, masks, metrics


def _sft_round(r: _Round) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """Shepherd: supervised LoRA tuning from the global on the round's Alpaca outputs; nothing private."""
    cfg, bundle = r.cfg, r.bundle
    lm = bundle.lm
    load_trainable_state(lm, {k: torch.from_numpy(np.array(v)).to(bundle.device) for k, v in r.incoming.items()})
    s = _train_sparsity(r.msg, cfg, r.client_id)  # 0 in its row: attention is not sparsified
    enable_sparse_attention(lm, bundle.blocks, s)
    m_seed = mask_seed(r.run_cfg.seed, r.client_id, r.server_round)
    records = r.records()
    attention_pair_counts(lm)  # reset the counters
    losses = supervised_round(lm, bundle.tokenizer, sft_examples(records, bundle.tokenizer), epochs=cfg.sft_epochs,
                              batch_size=cfg.prompts_per_step, lr=cfg.lr, seed=m_seed, device=bundle.device,
                              dtype=bundle.dtype)
    metrics = {"num-examples": len(records), "train-loss": losses["loss_mean"], "sparsity": s, "mask-seed": m_seed,
               "private-params": 0}
    return trainable_state(lm), {}, metrics


#: The local step of each trainer a method row can name (``instruct`` override ``trainer``).
TRAINERS = {"ppo": _ppo_round, "sft": _sft_round}


def handle_pfit_train(msg: Message, context: Context) -> Message:
    """One round of an instruct method on a client (see the module docstring)."""
    started = time.perf_counter()
    run_cfg, cfg, (client_id, num_clients, server_round), bundle = _setup(msg, context)
    incoming = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    _check_global(incoming, bundle, run_cfg.method)
    trained, masks, metrics = TRAINERS[cfg.trainer](
        _Round(run_cfg, cfg, client_id, num_clients, server_round, bundle, incoming, msg, context))
    lm = bundle.lm
    attended, visible = attention_pair_counts(lm)
    head_dim = getattr(lm.config, "head_dim", None) or lm.config.hidden_size // lm.config.num_attention_heads
    packed = pack_sparse(trained, masks)
    private_params = metrics.pop("private-params")
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in packed.items()}),
        "metrics": MetricRecord({
            **metrics,
            "global-crc": global_fingerprint(incoming),
            "attention-flops": 4 * head_dim * attended,
            "attention-flops-dense": 4 * head_dim * visible,
            "upload-bytes": upload_bytes(packed),
        }),
        "info": ConfigRecord({"client-id": client_id, "server-round": server_round,
                              "compute-s": time.perf_counter() - started, "private-params": private_params}),
    })
    return Message(content=content, reply_to=msg)


def _local_or_sent(private: Mapping[str, np.ndarray] | None, msg: Message) -> dict[str, np.ndarray]:
    """The client's personalised local model after the round; the global it was sent if it has not trained."""
    return _local_model(private) or {k: v.numpy() for k, v in msg.content["arrays"].items()}


def _sent_global(private: Mapping[str, np.ndarray] | None, msg: Message) -> dict[str, np.ndarray]:
    """The aggregated global the evaluate message carries (Shepherd: one model for everyone)."""
    return {k: v.numpy() for k, v in msg.content["arrays"].items()}


#: Whose model a client evaluates (``instruct`` override ``eval_model``).
EVAL_MODELS = {"local": _local_or_sent, "global": _sent_global}


def handle_pfit_evaluate(msg: Message, context: Context) -> Message:
    """Rewards on the evaluation prompts of the model the method's row names (module docstring)."""
    run_cfg, cfg, (client_id, num_clients, server_round), bundle = _setup(msg, context)
    lm, tok, policy = bundle.lm, bundle.tokenizer, bundle.policy

    private = PrivateStore(context, client_id).load(upto_round=server_round)
    model = EVAL_MODELS[cfg.eval_model](private, msg)
    _check_global(model, bundle, run_cfg.method)
    load_trainable_state(lm, {k: torch.from_numpy(np.array(v)) for k, v in model.items()})
    # adaptive: the s the client last trained with (the model was trained under that attention)
    s = float(private[_SPARSITY].reshape(-1)[0]) if cfg.adaptive_sparsity and private and _SPARSITY in private \
        else cfg.client_sparsity(client_id)
    enable_sparse_attention(lm, bundle.blocks, s)
    enable_sparse_attention(bundle.ref, bundle.blocks, s)

    _, prompts_held_out = client_prompts(run_cfg.data_dir, client_id, num_clients, run_cfg.seed, cfg.eval_prompts,
                                         cfg.prompt_dataset, cfg.eval_split)
    held_out = [r for r in prompts_held_out for _ in range(cfg.eval_samples)]
    prompts = [format_prompt(r["instruction"], r["input"], tok) for r in prompts_held_out]
    torch.manual_seed(cfg.eval_seed)  # the same sampling noise for every client and round
    batch = generate_rollouts(policy, tok, prompts, cfg.max_new_tokens, cfg.temperature,
                              samples_per_prompt=cfg.eval_samples, dtype=bundle.dtype)
    # KL on the first sample of each prompt: it sums the full-vocabulary KL at every position,
    # so it varies little, and two vocabulary projections per token are not cheap.
    first = batch.select(torch.arange(0, len(batch), cfg.eval_samples))
    kl = float(exact_sequence_kl(policy, bundle.ref, first, cfg.temperature, dtype=bundle.dtype).mean())
    raw = [_raw_prompt(r) for r in held_out]
    # The client's own preference (instruct.reward-weights), whatever its method trains on:
    # every method is scored by the same measure (SFL trains on helpfulness alone).
    weights = run_cfg.instruct.client_weights(client_id)
    train_rm = weighted(runtime.load_rewards(run_cfg, bundle.device).score(raw, batch.responses), weights)
    judged = weighted(runtime.load_judges(run_cfg, bundle.device).score(raw, batch.responses), weights)
    content = RecordDict({
        "metrics": MetricRecord({"num-examples": len(held_out), **train_rm, "kl": kl,
                                 **{f"judge-{k}": v for k, v in judged.items()},
                                 "response-tokens": float(batch.response_mask.sum(1).float().mean()),
                                 "refusal-share": refusal_share(batch.responses)}),
        "info": ConfigRecord({"client-id": client_id, "server-round": server_round}),
    })
    return Message(content=content, reply_to=msg)

"""PPO for PFIT (paper IV-C, Step 3): RLHF of the trainable blocks with a personalised reward.

Written here because trl 1.x has no PPO trainer or value-head model any more. Token-level
formulation as in InstructGPT (Ouyang et al. 2022) and TRL's PPO:

* per-token reward  r_t = -beta (log pi(y_t) - log pi_ref(y_t)) + [t = last] * score
* GAE (Schulman et al. 2016) over response tokens, gamma = 1, lambda = 0.95
* clipped surrogate (Schulman et al. 2017) + clipped value loss, several epochs of minibatches
* the paper's regularisation reward -(mu/2) ||w - w_global||^2 enters as a proximal term
  (mu/2) ||w - w_global||^2 in the loss (FedProx, Li et al. 2020): it depends on the weights,
  not on the sampled tokens, so added to r_t it would have zero policy gradient.

All tensors are [B, T] over response tokens with a 0/1 ``mask`` (right padding), unless noted.
The score function is the caller's: ``score_fn(prompts, responses) -> Tensor[N]``, e.g.
w_help * R_help + w_safe * R_safe for one client. The rollout batches come from
:mod:`pwff_app.instruct.rollouts`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers import PreTrainedModel

from pwff_app.device import autocast
from pwff_app.instruct.policy import PolicyWithValue, final_hidden, frozen_prefix_blocks, prefix_hidden
from pwff_app.instruct.rollouts import Rollouts


@dataclass(frozen=True)
class PPOConfig:
    """PPO hyper-parameters. Defaults follow TRL's PPO where one exists, scaled to small batches."""

    lr: float = 1e-5  # Adam step size for the two trainable blocks and the value head
    batch_size: int = 8  # prompts per rollout batch (the caller samples them)
    mini_batch_size: int = 4  # sequences per gradient step
    ppo_epochs: int = 4  # passes over one rollout batch
    clip_eps: float = 0.2  # policy ratio clip
    clip_eps_value: float = 0.2  # value clip, in reward units
    vf_coef: float = 0.1  # value-loss weight
    kl_coef: float = 0.05  # beta of the per-token KL penalty to the reference model
    gamma: float = 1.0  # discount (episodes are one response)
    lam: float = 0.95  # GAE lambda
    mu: float = 0.01  # proximal weight toward the global trainable part (0 = off)
    max_grad_norm: float = 1.0  # global gradient-norm clip
    max_new_tokens: int = 32  # response length cap
    temperature: float = 1.0  # sampling temperature; log-probs use the same one
    top_k: int = 0  # 0 = sample from the full distribution (keeps PPO on-policy)
    whiten_advantages: bool = True
    samples_per_prompt: int = 1  # k > 1: rows come in groups of k per prompt; scores minus the group's RLOO baseline


# ---------------------------------------------------------------- pure tensor functions


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(x m) / sum(m), a scalar."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (population variance); pads -> 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation on [B, T]; returns (advantages, returns), pads -> 0.

    delta_t = r_t + gamma m_{t+1} V_{t+1} - V_t
    A_t     = delta_t + gamma lam m_{t+1} A_{t+1}      (m_T = 0: the episode ends at the last token)
    R_t     = A_t + V_t
    """
    next_mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1) * next_mask
    deltas = rewards + gamma * next_values - values
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = deltas[:, t] + gamma * lam * next_mask[:, t] * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def clipped_surrogate_loss(
    logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO policy loss and the fraction of tokens where the clip was active.

    rho_t = exp(logp_new - logp_old);
    L = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))
    """
    ratio = torch.exp(logp_new - logp_old)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return masked_mean(torch.maximum(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)


def value_loss(
    values_new: torch.Tensor, values_old: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_eps_v: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss and the fraction of tokens where the clip was active.

    V_clip = V_old + clip(V_new - V_old, -eps_v, eps_v);
    L = 1/2 mean_t max((V_new - R_t)^2, (V_clip - R_t)^2)
    """
    clipped = values_old + torch.clamp(values_new - values_old, -clip_eps_v, clip_eps_v)
    loss_unclipped = (values_new - returns) ** 2
    loss_clipped = (clipped - returns) ** 2
    return (
        0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask),
        masked_mean((loss_clipped > loss_unclipped).float(), mask),
    )


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index [B] of each row's last unmasked position."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (mask * (positions + 1)).argmax(dim=1)


def kl_penalty_rewards(
    logp_policy: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor, kl_coef: float, scores: torch.Tensor
) -> torch.Tensor:
    """Per-token rewards [B, T]: r_t = -beta (logp_t - logp_ref_t), plus scores[b] on the last response token."""
    rewards = -kl_coef * (logp_policy - logp_ref) * mask
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards


def group_baseline(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Scores [B] minus the leave-one-out mean of the other samples of the same prompt (RLOO).

    Rows come in consecutive groups of ``group_size`` responses to one prompt. The reward models
    score prompts on very different levels (between-prompt variance is about half the total on
    Alpaca), which a value head trained on a few dozen samples cannot learn; the baseline of the
    same prompt's other samples removes it (Kool et al. 2019; Ahmadian et al. 2024, RLOO).
    s_i - mean_{j != i} s_j = k / (k - 1) (s_i - mean_j s_j).
    """
    if group_size <= 1:
        return scores
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    groups = scores.reshape(-1, group_size)
    return ((groups - groups.mean(dim=1, keepdim=True)) * group_size / (group_size - 1)).flatten()


def sequence_kl(logp_policy: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence KL estimate [B]: sum_t (logp_t - logp_ref_t) over sampled tokens (k1 estimator)."""
    return ((logp_policy - logp_ref) * mask).sum(dim=1)


def proximal_penalty(
    params: Mapping[str, torch.Tensor], global_params: Mapping[str, torch.Tensor], mu: float
) -> torch.Tensor:
    """(mu/2) sum_i ||w_i - w_global_i||^2 over ``params`` (gradient mu (w - w_global)).

    The paper's regularisation reward is its negative.
    """
    total = sum(((p - global_params[n].to(p.dtype)) ** 2).sum() for n, p in params.items())
    return 0.5 * mu * torch.as_tensor(total)


# ---------------------------------------------------------------- log-probs, KL and the PPO step


def _response_logprobs(logits: torch.Tensor, response_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(y_t) [B, Lr] from logits [B, Lr, V] at the positions that predict y_t."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return torch.gather(logp, 2, response_ids.unsqueeze(-1)).squeeze(-1)


def logprobs_and_values(
    policy: PolicyWithValue, batch: Rollouts, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy log-probs and values [B, Lr] of the response tokens (position Lq-1+t predicts y_t), float32."""
    first = batch.query_ids.shape[1] - 1
    logits, values = policy(**batch.model_inputs(), first=first, prefix=batch.prefix)
    return _response_logprobs(logits[:, :-1], batch.response_ids, temperature), values[:, :-1].float()


@torch.no_grad()
def reference_logprobs(ref_model: PreTrainedModel, batch: Rollouts, temperature: float = 1.0) -> torch.Tensor:
    """Reference-model log-probs [B, Lr] of the response tokens.

    A ``batch.prefix`` is reused: the reference shares the policy's frozen blocks.
    """
    first = batch.query_ids.shape[1] - 1
    hidden = final_hidden(ref_model, **batch.model_inputs(), first=first, prefix=batch.prefix)
    logits = ref_model.get_output_embeddings()(hidden[:, :-1])
    return _response_logprobs(logits, batch.response_ids, temperature)


def with_prefix(policy: PolicyWithValue, batch: Rollouts) -> Rollouts:
    """``batch`` carrying the output of the policy's frozen blocks, so later passes run only the rest.

    Every later pass (old log-probs, values, the reference, each PPO epoch) then costs the
    trainable blocks and the heads, not the whole network. A batch that already carries it
    (recorded while sampling, see :func:`pwff_app.instruct.rollouts.generate_rollouts`) is returned as it is.
    """
    n = frozen_prefix_blocks(policy.lm)
    if n == 0 or batch.prefix is not None:
        return batch
    return replace(batch, prefix=prefix_hidden(policy.lm, n, **batch.model_inputs()))


@torch.no_grad()
def exact_sequence_kl(
    policy: PolicyWithValue, ref_model: PreTrainedModel, batch: Rollouts, temperature: float = 1.0, chunk: int = 8,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """KL [B] summed over each response: sum_t KL(pi(.|x, y<t) || pi_ref(.|x, y<t)), in nats.

    Exact over the vocabulary at every sampled prefix, so it is never negative and has far less
    variance than the sampled-token estimate :func:`sequence_kl` (which PPO's reward uses).
    Computed ``chunk`` sequences at a time: full [B, T, vocab] logits of two models are large.
    ``dtype``: of the autocast forwards; the softmax and the sum run in float32.
    """
    out = []
    for start in range(0, len(batch), chunk):
        part = batch.select(torch.arange(start, min(start + chunk, len(batch))))
        first = part.query_ids.shape[1] - 1
        inputs = part.model_inputs()
        with autocast(part.query_ids.device, dtype):
            logits = [model.get_output_embeddings()(
                final_hidden(model, **inputs, first=first, prefix=part.prefix)[:, :-1]) for model in (policy.lm, ref_model)]
        logp, logq = (torch.log_softmax(x.float() / temperature, dim=-1) for x in logits)
        per_token = (logp.exp() * (logp - logq)).sum(dim=-1)
        out.append((per_token * part.response_mask).sum(dim=1))
    return torch.cat(out)


def make_optimizer(policy: PolicyWithValue, cfg: PPOConfig) -> torch.optim.Optimizer:
    """Adam over the trainable LM blocks and the value head, without weight decay.

    Zero gradient then means exactly zero step, so masked-out entries stay bit-identical.
    Make a fresh one each round after :meth:`PolicyWithValue.set_update_masks`: Adam moments
    carried over from an older mask would keep moving entries the new mask froze.
    """
    params = [*policy.trainable_lm_params().values(), *policy.value_head.parameters()]
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=0.0)


def ppo_step(
    policy: PolicyWithValue,
    ref_model: PreTrainedModel,
    batch: Rollouts,
    scores: torch.Tensor,
    cfg: PPOConfig,
    optimizer: torch.optim.Optimizer,
    global_params: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """One PPO update on a rollout batch scored with ``scores`` [B]; returns mean statistics.

    Loss per minibatch: policy surrogate + vf_coef * value loss + (mu/2) ||w - w_global||^2
    (the last only when ``global_params``, on the policy's device, is given). Gradients outside
    the policy's update masks are zeroed before the step. Dropout stays off, so the first
    epoch's ratio is 1. ``dtype``: of the autocast forwards; log-probs, values, losses and the
    optimizer step are float32.
    """
    policy.eval()
    device = batch.query_ids.device
    mask = batch.response_mask.float()
    raw_scores = scores.detach().to(device, torch.float32).flatten()
    if cfg.samples_per_prompt > 1:
        k = cfg.samples_per_prompt
        if len(batch) % k or any(len(set(batch.prompts[i:i + k])) != 1 for i in range(0, len(batch), k)):
            raise ValueError(f"samples_per_prompt={k}: rows must come in groups of {k} with one prompt each")
    scores = group_baseline(raw_scores, cfg.samples_per_prompt)
    with torch.no_grad(), autocast(device, dtype):
        if batch.prefix is None:
            batch = with_prefix(policy, batch)
        logp_old, values_old = logprobs_and_values(policy, batch, cfg.temperature)
        logp_ref = reference_logprobs(ref_model, batch, cfg.temperature)
        rewards = kl_penalty_rewards(logp_old, logp_ref, mask, cfg.kl_coef, scores)
        advantages, returns = gae(rewards, values_old, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask)
    lm_params = policy.trainable_lm_params()
    all_params = [p for group in optimizer.param_groups for p in group["params"]]
    use_prox = global_params is not None and cfg.mu > 0
    totals: dict[str, float] = {}
    steps = 0
    for _ in range(cfg.ppo_epochs):
        for idx in torch.randperm(len(batch)).split(cfg.mini_batch_size):
            with autocast(device, dtype):
                logp, values = logprobs_and_values(policy, batch.select(idx), cfg.temperature)
            pg_loss, clipfrac = clipped_surrogate_loss(logp, logp_old[idx], advantages[idx], mask[idx], cfg.clip_eps)
            vf_loss, vf_clipfrac = value_loss(values, values_old[idx], returns[idx], mask[idx], cfg.clip_eps_value)
            prox = proximal_penalty(lm_params, global_params, cfg.mu) if use_prox else torch.zeros((), device=device)
            loss = pg_loss + cfg.vf_coef * vf_loss + prox
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            policy.mask_gradients()
            grad_norm = nn.utils.clip_grad_norm_(all_params, cfg.max_grad_norm)
            optimizer.step()
            step_stats = {
                "loss/policy": pg_loss, "loss/value": vf_loss, "loss/proximal": prox, "loss/total": loss,
                "policy/clipfrac": clipfrac, "value/clipfrac": vf_clipfrac, "grad_norm": grad_norm,
                "policy/approxkl": 0.5 * masked_mean((logp - logp_old[idx]) ** 2, mask[idx]),
            }
            for k, v in step_stats.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach())
            steps += 1
    stats = {k: v / steps for k, v in totals.items()}
    kl = sequence_kl(logp_old, logp_ref, mask)
    with torch.no_grad():
        dist_sq = 2.0 * float(proximal_penalty(lm_params, global_params, 1.0)) if global_params is not None else 0.0
    stats.update({
        "objective/kl": float(kl.mean()),
        "reward/score_mean": float(raw_scores.mean()),
        "reward/score_std": float(raw_scores.std()) if len(raw_scores) > 1 else 0.0,
        "reward/total_mean": float(raw_scores.mean() - cfg.kl_coef * kl.mean()),
        "reg/distance_sq": dist_sq,
        "reg/reward": -0.5 * cfg.mu * dist_sq,
        "returns/mean": float(masked_mean(returns, mask)),
        "values/mean": float(masked_mean(values_old, mask)),
        "response/length": float(mask.sum(dim=1).mean()),
    })
    return stats

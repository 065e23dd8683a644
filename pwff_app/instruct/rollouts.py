"""PFIT rollouts: sampled responses to a batch of prompts, and the batch they make for PPO.

Queries are left-padded, responses right-padded; the response mask covers each response up to
and including its first EOS. Sampling records the output of the frozen blocks on the way
(:attr:`Rollouts.prefix`), so PPO's passes over the batch (:mod:`pwff_app.instruct.ppo`) run
only the trainable blocks.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from pwff_app.device import autocast
from pwff_app.instruct.policy import PolicyWithValue, PrefixCache, frozen_prefix_blocks, recording_prefix


@dataclass
class Rollouts:
    """One batch of sampled responses. Queries are left-padded, responses right-padded.

    query_ids/query_mask [B, Lq]; response_ids/response_mask [B, Lr], the mask covering the
    response up to and including its first EOS.
    """

    prompts: list[str]
    responses: list[str]
    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    prefix: PrefixCache | None = None  # output of the frozen blocks: recorded while sampling, or :func:`pwff_app.instruct.ppo.with_prefix`

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, idx: torch.Tensor) -> Rollouts:
        rows = idx.tolist()
        return Rollouts(
            [self.prompts[i] for i in rows], [self.responses[i] for i in rows],
            self.query_ids[idx], self.query_mask[idx], self.response_ids[idx], self.response_mask[idx],
            self.prefix.select(idx) if self.prefix is not None else None,
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask, position_ids [B, Lq + Lr] of query + response.

        Positions count real tokens only, as ``generate`` does for left padding; the default
        (0..T-1) would shift every left-padded row and change its log-probs.
        """
        mask = torch.cat([self.query_mask, self.response_mask], dim=1)
        return {
            "input_ids": torch.cat([self.query_ids, self.response_ids], dim=1),
            "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
        }



def truncate_after_eos(response: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Response ids [B, L] with everything after the first EOS set to ``pad_id``, and the 0/1 mask
    [B, L] of what is kept (up to and including that EOS: the policy learns when to stop)."""
    is_eos = (response == eos_id).long()
    mask = (is_eos.cumsum(dim=1) - is_eos) == 0
    return response.masked_fill(~mask, pad_id), mask.long()


@torch.no_grad()
def generate_rollouts(
    policy: PolicyWithValue | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_k: int = 0,
    samples_per_prompt: int = 1,
    dtype: torch.dtype = torch.float32,
) -> Rollouts:
    """Sample ``samples_per_prompt`` responses per prompt (batched, left padding, KV cache).

    Rows come out in consecutive groups of ``samples_per_prompt``, one group per prompt (the
    layout :func:`pwff_app.instruct.ppo.group_baseline` expects). With several samples the prompts are prefilled once
    and their KV cache is copied to every sample: the prompt (chat template included) is most of
    the tokens, so this saves most of the generation compute. The hidden states entering the
    first trainable block are recorded on the way (``Rollouts.prefix``), so PPO's passes over
    the batch skip the frozen blocks without running them again. Seed torch for reproducibility.

    Prompts are full strings (see :func:`pwff_app.instruct.prompts.format_prompt`); a chat template already holds the
    special tokens, so none are added then. The batch lives on the model's device; ``dtype``: of
    the autocast forward (see :mod:`pwff_app.device`).
    """
    lm = policy.lm if isinstance(policy, PolicyWithValue) else policy
    lm.eval()
    k = samples_per_prompt
    if k < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {k}")
    enc = tokenizer(
        list(prompts), return_tensors="pt", padding=True, padding_side="left",
        add_special_tokens=not tokenizer.chat_template,
    )
    ids, attn = enc["input_ids"].to(lm.device), enc["attention_mask"].to(lm.device)
    extra = {}
    with recording_prefix(lm) as chunks, autocast(lm.device, dtype):
        if k > 1:
            if ids.shape[1] > 1:  # prefill all but the last prompt token; generate continues from there
                cache_arg = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
                cache = DynamicCache()
                lm(input_ids=ids[:, :-1], attention_mask=attn[:, :-1],
                   position_ids=(attn[:, :-1].cumsum(-1) - 1).clamp(min=0), use_cache=True, **{cache_arg: cache})
                cache.batch_repeat_interleave(k)
                extra[cache_arg] = cache
                if chunks:  # the prefill's recorded prefix, one copy per sample
                    chunks[0] = chunks[0].repeat_interleave(k, dim=0)
            ids, attn = ids.repeat_interleave(k, dim=0), attn.repeat_interleave(k, dim=0)
        out = lm.generate(
            input_ids=ids, attention_mask=attn, do_sample=True, max_new_tokens=max_new_tokens, temperature=temperature,
            top_k=top_k, top_p=1.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **extra,
        )
    response, mask = truncate_after_eos(out[:, ids.shape[1]:], tokenizer.eos_token_id, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(response.cpu(), skip_special_tokens=True)
    prefix = None
    if chunks:
        # Every position but the last was fed to the model (the last sampled token never is);
        # nothing reads the last position's output (it predicts past the response), so zeros.
        hidden = torch.cat(chunks, dim=1)
        last = hidden.new_zeros(len(out), out.shape[1] - hidden.shape[1], hidden.shape[2])
        prefix = PrefixCache(frozen_prefix_blocks(lm), torch.cat([hidden, last], dim=1))
    return Rollouts([p for p in prompts for _ in range(k)], texts, ids, attn, response, mask, prefix)

"""PPO pieces against hand-computed numbers, and one full step on a tiny random Llama."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from pwff_app.instruct.policy import (
    PolicyWithValue,
    freeze_all_but_last_blocks,
    frozen_copy,
    load_trainable_state,
    trainable_state,
)
from pwff_app.testing.tiny import tiny_gpt2, tiny_llama, tiny_tokenizer
from pwff_app.instruct.ppo import (
    PPOConfig,
    clipped_surrogate_loss,
    exact_sequence_kl,
    gae,
    group_baseline,
    kl_penalty_rewards,
    logprobs_and_values,
    make_optimizer,
    ppo_step,
    proximal_penalty,
    reference_logprobs,
    sequence_kl,
    value_loss,
    whiten,
    with_prefix,
)
from pwff_app.instruct.prompts import format_prompt, load_alpaca
from pwff_app.instruct.rollouts import generate_rollouts, truncate_after_eos
from pwff_app.instruct.sparse_attention import build_attention_masks, enable_sparse_attention


def test_gae_hand_computed() -> None:
    # gamma 0.9, lam 0.8 -> gamma*lam 0.72. Row 1 ends after two tokens (its third entry is padding).
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 9.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [1.0, 2.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: d2 = 2 - 1.5 = 0.5; d1 = 0 + .9*1.5 - 1 = 0.35; d0 = 1 + .9*1 - .5 = 1.4
    #        A2 = 0.5, A1 = 0.35 + .72*.5 = 0.71, A0 = 1.4 + .72*.71 = 1.9112
    # row 1: A1 = 3 - 2 = 1 (terminal), A0 = (0 + .9*2 - 1) + .72*1 = 1.52
    torch.testing.assert_close(adv, torch.tensor([[1.9112, 0.71, 0.5], [1.52, 1.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[2.4112, 1.71, 2.0], [2.52, 3.0, 0.0]]))


def test_gae_gamma1_lam1_is_reward_to_go_minus_value() -> None:
    rewards = torch.tensor([[0.1, -0.2, 3.0]])
    values = torch.tensor([[0.5, 0.25, 1.0]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, torch.tensor([[2.9, 2.8, 3.0]]))
    torch.testing.assert_close(adv, ret - values)


def test_whiten_hand_computed() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # mean 2, population variance 2/3 -> +-1 / sqrt(2/3) = +-1.2247; the padded 100 is ignored.
    torch.testing.assert_close(whiten(x, mask), torch.tensor([[-1.224744, 0.0, 1.224744, 0.0]]))


def test_clipped_surrogate_hand_computed() -> None:
    ratios = torch.tensor([[1.5, 0.5, 1.1, 0.7, 10.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])  # last token is padding, however extreme
    loss, clipfrac = clipped_surrogate_loss(ratios.log(), torch.zeros(1, 5), adv, mask, clip_eps=0.2)
    # per token max(-A r, -A clip(r)): 1.5,A=+1 -> -1.2 (clip active); 0.5,A=+1 -> -0.5 (inactive);
    # 1.1,A=-1 -> 1.1 (inside the range); 0.7,A=-1 -> 0.8 (clip active). Mean = 0.2 / 4.
    assert loss.item() == pytest.approx(0.05, abs=1e-6)
    assert clipfrac.item() == pytest.approx(0.5)


def test_clipped_surrogate_gradient_vanishes_when_clipped() -> None:
    logp = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    loss, _ = clipped_surrogate_loss(logp, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), 0.2)
    loss.backward()
    # d/dlogp of -A r / 2 = -r / 2 where inactive; 0 where the clip is active.
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.55]]))


def test_value_loss_hand_computed() -> None:
    v_old = torch.zeros(1, 4)
    v_new = torch.tensor([[0.5, 0.1, -0.3, 4.0]])
    returns = torch.tensor([[1.0, 1.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, clipfrac = value_loss(v_new, v_old, returns, mask, clip_eps_v=0.2)
    # clipped values 0.2, 0.1, -0.2: max((v-R)^2, (vc-R)^2) = max(.25,.64), max(.81,.81), max(.49,.64)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 0.64) / 3)
    assert clipfrac.item() == pytest.approx(2 / 3)


def test_kl_penalty_rewards_hand_computed() -> None:
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    logp_ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = kl_penalty_rewards(logp, logp_ref, mask, kl_coef=0.1, scores=torch.tensor([10.0, 20.0]))
    # -0.1 * (logp - ref), score on each row's last response token (row 1: index 1).
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 10.1], [-0.1, 20.0, 0.0]]))
    torch.testing.assert_close(sequence_kl(logp, logp_ref, mask), torch.tensor([-0.5, 1.0]))


def test_proximal_penalty_value_and_gradient() -> None:
    torch.manual_seed(0)
    params = {"a": torch.randn(3, 4, requires_grad=True), "b": torch.randn(5, requires_grad=True)}
    global_params = {n: torch.randn_like(p) for n, p in params.items()}
    mu = 0.3
    penalty = proximal_penalty(params, global_params, mu)
    closed = mu / 2 * sum(((p.detach() - global_params[n]) ** 2).sum() for n, p in params.items())
    assert penalty.item() == pytest.approx(closed.item(), rel=1e-6)
    penalty.backward()
    for n, p in params.items():
        torch.testing.assert_close(p.grad, mu * (p.detach() - global_params[n]))


def test_truncate_after_eos() -> None:
    response = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    ids, mask = truncate_after_eos(response, eos_id=2, pad_id=0)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ids.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]


def test_format_prompt_plain_and_chat() -> None:
    tok = tiny_tokenizer()
    assert format_prompt("Add", "1+1", tok) == "### Instruction:\nAdd\n\n### Input:\n1+1\n\n### Response:\n"
    assert format_prompt("Hi", "", tok) == "### Instruction:\nHi\n\n### Response:\n"
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    assert format_prompt("Add", "1+1", tok) == "<user>Add\n\n1+1<assistant>"


def test_load_alpaca(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("PWFF_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="PWFF_DATA_DIR"):
        load_alpaca()
    (tmp_path / "alpaca").mkdir()
    records = [{"instruction": "Say hi", "input": "", "output": "hi"}]
    (tmp_path / "alpaca" / "alpaca_5000.json").write_text(json.dumps(records))
    monkeypatch.setenv("PWFF_DATA_DIR", str(tmp_path))
    assert load_alpaca() == records


def test_ppo_step_tiny_llama_updates_only_what_it_may() -> None:
    torch.manual_seed(0)
    lm, tok = tiny_llama(), tiny_tokenizer()
    blocks = freeze_all_but_last_blocks(lm, 2)
    enable_sparse_attention(lm, blocks, 0.4)
    ref = frozen_copy(lm)
    policy = PolicyWithValue(lm)
    global_params = trainable_state(lm)
    masks = build_attention_masks(global_params, blocks, 0.4)
    policy.set_update_masks(masks)
    cfg = PPOConfig(lr=1e-3, mini_batch_size=2, ppo_epochs=2, max_new_tokens=6, mu=0.1)
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    head_before = policy.value_head.weight.detach().clone()

    prompts = [format_prompt(i, "", tok) for i in ("Say hi", "Count to 3", "Name a colour", "Why?")]
    batch = generate_rollouts(policy, tok, prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_k)
    assert batch.response_ids.shape == (4, batch.response_mask.shape[1]) and len(batch.responses) == 4

    def score_fn(prompts: list[str], responses: list[str]) -> torch.Tensor:  # toy reward: distinct characters
        return torch.tensor([len(set(r)) / cfg.max_new_tokens for r in responses])

    scores = score_fn(batch.prompts, batch.responses)
    assert scores.std() > 0  # else every advantage is 0 and nothing trains
    stats = ppo_step(policy, ref, batch, scores, cfg, make_optimizer(policy, cfg), global_params)

    assert all(math.isfinite(v) for v in stats.values())
    assert stats["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # ref = policy before the step
    assert stats["reg/distance_sq"] > 0 and stats["reg/reward"] == pytest.approx(-0.05 * stats["reg/distance_sq"])
    trainable = set(global_params)
    for name, p in lm.named_parameters():
        if name not in trainable:
            assert torch.equal(p, before[name]), f"frozen {name} moved"
        elif name in masks:
            assert torch.equal(p[~masks[name]], before[name][~masks[name]]), f"masked-out entries of {name} moved"
            assert not torch.equal(p[masks[name]], before[name][masks[name]]), f"{name} did not train"
        else:
            assert not torch.equal(p, before[name]), f"{name} did not train"
    assert not torch.equal(policy.value_head.weight, head_before)
    for name, p in ref.named_parameters():
        assert torch.equal(p, before[name])


def test_group_baseline_hand_computed() -> None:
    # groups (1, 2, 6) and (0, 0, 3): leave-one-out means (4, 3.5, 1.5) and (1.5, 1.5, 0)
    scores = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    torch.testing.assert_close(group_baseline(scores, 3), torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]))
    assert torch.equal(group_baseline(scores, 1), scores)
    with pytest.raises(ValueError, match="groups of 4"):
        group_baseline(scores, 4)


def _tiny_setup(make=tiny_llama):
    torch.manual_seed(0)
    lm, tok = make(), tiny_tokenizer()
    blocks = freeze_all_but_last_blocks(lm, 2)
    enable_sparse_attention(lm, blocks, 0.4)
    ref = frozen_copy(lm)
    policy = PolicyWithValue(lm)
    prompts = [format_prompt(i, "", tok) for i in ("Say hi", "Say hi", "Why?", "Why?")]
    batch = generate_rollouts(policy, tok, prompts, 6)
    return lm, ref, policy, batch


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_prefix_cache_gives_the_same_numbers_and_the_same_step(make) -> None:
    lm, ref, policy, recorded = _tiny_setup(make)
    plain = replace(recorded, prefix=None)  # every pass runs the whole network
    cached = with_prefix(policy, plain)  # the frozen blocks run once, over the whole sequences
    assert with_prefix(policy, recorded) is recorded  # recorded while sampling: nothing to run
    for batch in (cached, recorded):
        assert batch.prefix.n_blocks == 2 and batch.prefix.hidden.shape[:2] == batch.model_inputs()["input_ids"].shape
    # Sampling fed every position but the last one through the frozen blocks (KV cache: the same numbers).
    torch.testing.assert_close(recorded.prefix.hidden[:, :-1], cached.prefix.hidden[:, :-1], rtol=0, atol=1e-5)
    for batch in (cached, recorded):
        for a, b in [(logprobs_and_values(policy, plain), logprobs_and_values(policy, batch)),
                     ((reference_logprobs(ref, plain),), (reference_logprobs(ref, batch),))]:
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=0, atol=1e-5)
    part = cached.select(torch.tensor([2, 0]))  # minibatches slice the cache with the rows
    torch.testing.assert_close(logprobs_and_values(policy, part)[0], logprobs_and_values(policy, cached)[0][[2, 0]])

    # one PPO step from the same start, from the recorded and the recomputed prefix, lands on the same weights
    cfg = PPOConfig(lr=1e-3, mini_batch_size=2, ppo_epochs=2, max_new_tokens=6)
    scores = torch.tensor([0.1, 0.7, -0.3, 0.4])
    start = trainable_state(lm)
    results = []
    for b in (recorded, cached):
        load_trainable_state(lm, start)
        torch.nn.init.zeros_(policy.value_head.weight), torch.nn.init.zeros_(policy.value_head.bias)
        torch.manual_seed(1)  # same minibatch order
        ppo_step(policy, ref, b, scores, cfg, make_optimizer(policy, cfg))
        results.append(trainable_state(lm))
    for name in start:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=0, atol=1e-5)
        assert not torch.equal(results[0][name], start[name]) or "norm" in name


def test_samples_per_prompt_needs_grouped_rows() -> None:
    lm, ref, policy, batch = _tiny_setup()
    cfg = PPOConfig(lr=1e-3, mini_batch_size=2, ppo_epochs=1, samples_per_prompt=2)
    stats = ppo_step(policy, ref, batch, torch.tensor([1.0, 3.0, 0.0, 0.0]), cfg, make_optimizer(policy, cfg))
    assert stats["reward/score_mean"] == pytest.approx(1.0)  # the raw scores are reported, not the centred ones
    shuffled = batch.select(torch.tensor([0, 2, 1, 3]))
    with pytest.raises(ValueError, match="groups of 2"):
        ppo_step(policy, ref, shuffled, torch.zeros(4), cfg, make_optimizer(policy, cfg))


def test_exact_sequence_kl() -> None:
    lm, ref, policy, batch = _tiny_setup()
    torch.testing.assert_close(exact_sequence_kl(policy, ref, batch), torch.zeros(len(batch)), rtol=0, atol=1e-6)
    with torch.no_grad():  # move the policy away from the reference
        for p in policy.trainable_lm_params().values():
            p.add_(0.05 * torch.randn_like(p))
    kl = exact_sequence_kl(policy, ref, with_prefix(policy, batch), chunk=3)
    # brute force: the full next-token distributions of both models at every response position
    first = batch.query_ids.shape[1] - 1
    with torch.no_grad():
        logits_p = policy(**batch.model_inputs(), first=first)[0][:, :-1].log_softmax(-1)
        logits_q = ref(**batch.model_inputs()).logits[:, first:-1].log_softmax(-1)
    want = (torch.nn.functional.kl_div(logits_q, logits_p, log_target=True, reduction="none").sum(-1)
            * batch.response_mask).sum(1)
    torch.testing.assert_close(kl, want, rtol=1e-5, atol=1e-6)
    assert (kl > 0).all()


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_shared_prefill_samples_what_repeated_prompts_sample(make) -> None:
    """k samples per prompt from one prefill = the same k prompts generated row by row
    (same seed: the sampler draws the same numbers; only the prompt's KV cache is shared)."""
    torch.manual_seed(0)
    lm, tok = make(), tiny_tokenizer()
    enable_sparse_attention(lm, freeze_all_but_last_blocks(lm, 2), 0.4)
    prompts = [format_prompt(i, "", tok) for i in ("Say hi", "Count to three please", "Why?")]
    torch.manual_seed(1)
    plain = generate_rollouts(lm, tok, [p for p in prompts for _ in range(3)], 6)
    torch.manual_seed(1)
    shared = generate_rollouts(lm, tok, prompts, 6, samples_per_prompt=3)
    assert shared.prompts == plain.prompts and shared.responses == plain.responses
    for a, b in [(shared.query_ids, plain.query_ids), (shared.response_ids, plain.response_ids),
                 (shared.response_mask, plain.response_mask)]:
        assert torch.equal(a, b)
    assert len(set(shared.responses[:3])) > 1  # the samples of one prompt really differ
    torch.testing.assert_close(shared.prefix.hidden, plain.prefix.hidden, rtol=0, atol=1e-5)
    for p in lm.parameters():  # every block trains: nothing frozen to record, PPO runs the whole network
        p.requires_grad_(True)
    assert generate_rollouts(lm, tok, prompts, 6, samples_per_prompt=2).prefix is None

"""Tests of ppo.py: GAE against a plain loop, the PPO invariants (ratio 1 at the first minibatch, the score on the last
real token, the no-EOS rule, nothing after EOS in any loss), the KL estimators and controller, the rewards, the
best-of-N KL, and end to end: a tiny SFT policy learns to say a target word under PPO, RLOO and GRPO, best-of-N's
reward rises with N, and a killed PPO run resumes to the same numbers."""
import inspect
import json
import math
import os
import random
import re
import signal
from contextlib import nullcontext

import pytest
import torch

import checkpoint
import config
import model
import runtime
import sft
import data
import dist
import dpo
import ppo
import reward
from conftest import ROOT, interrupt_and_resume, main_in_process, read_json, read_metrics, timeless
from model import response_mask

SUBJECTS = ["the cat", "the dog", "my friend", "this film", "a bird", "the book", "her song", "the food"]
VERBS = ["is", "was", "looks", "seems"]
ADJECTIVES = ["good", "bad", "nice", "fine", "great", "big", "small", "old"]
# The gain of the evaluation's " good" share in 8 steps, seeds 1-8 of each algorithm (2026-11-30, this file's
# rl_args, CPU): ppo 0.18-0.38, rloo 0.11-0.23, grpo 0.09-0.37. The learning tests ask for half the smallest.
MIN_GAIN = 0.045


def share_of_good(prompts, responses):
    """The user reward of the end-to-end tests: the share of a response's words that are 'good'."""
    out = []
    for response in responses:
        words = re.findall(r"[a-z]+", response.lower())
        out.append(sum(w == "good" for w in words) / max(1, len(words)))
    return out


def constant_two(prompts, responses):
    return [2.0] * len(responses)


def in_process(fn, cfg):
    """Run a stage function as the pipeline would, then give pytest its signal handlers back (Run installs its own)."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return fn(cfg)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SFT policy (sft.sft on 300 prompt/response pairs like 'the cat' -> ' is good.', 'good' one adjective in
    eight), the prompts, and the reward function in a file, shared by the module."""
    d = tmp_path_factory.mktemp("tiny")
    rng = random.Random(0)
    with open(d / "sft.jsonl", "w") as f:
        for _ in range(300):
            response = f" {rng.choice(VERBS)} {rng.choice(ADJECTIVES)}"
            if rng.random() < 0.3:
                response += f" and {rng.choice(ADJECTIVES)}"
            f.write(json.dumps(dict(prompt=rng.choice(SUBJECTS), response=response + ".")) + "\n")
    (d / "prompts.txt").write_text("\n".join(SUBJECTS) + "\n")
    (d / "eval_prompts.txt").write_text("\n".join(SUBJECTS * 8) + "\n")
    (d / "reward_fn.py").write_text("import re\n\n\n" + inspect.getsource(share_of_good) + "\n\n"
                                    + inspect.getsource(constant_two))
    cfg = sft.SFTConfig(out_dir=str(d / "sft"), data=str(d / "sft.jsonl"), n_layer=2, n_head=2, n_embd=32,
                          block_size=32, batch_size=16, max_iters=50, learning_rate=2e-2, warmup_iters=5,
                          eval_interval=1000, eval_iters=1, log_interval=50, device="cpu")
    assert in_process(sft.sft, cfg) == 0
    policy, _ = checkpoint.load_policy(str(d / "sft" / "ckpt.pt"), "cpu")
    return dict(dir=d, ckpt=str(d / "sft" / "ckpt.pt"), prompts=str(d / "prompts.txt"), policy=policy,
                eval_prompts=str(d / "eval_prompts.txt"),
                reward=f"{d / 'reward_fn.py'}:share_of_good")


def tiny_rollout(tiny, prompts, max_new_tokens=6, seed=0):
    policy = tiny["policy"]
    g = torch.Generator().manual_seed(seed)
    return ppo.rollout(policy, policy, prompts, reward.make_reward(tiny["reward"], "cpu"), max_new_tokens, 1.0, g,
                       "cpu", nullcontext(), 8)


# ----------------------------------------------------------------------------------------------------------------
# GAE, KL, the controller, best-of-N: pure functions against slow obvious references

def gae_loop(rewards, values, length, gamma, lam):
    """GAE of one sequence of `length` real tokens, as in the paper: plain Python floats."""
    adv, last = [0.0] * length, 0.0
    for t in reversed(range(length)):
        next_value = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, [a + v for a, v in zip(adv, values)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7), (1.0, 1.0)])
def test_gae_matches_a_python_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    lengths = [0, 1, 3, 9, 5, 9, 2]
    B, T = len(lengths), 9
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).float()
    rewards[mask == 0], values[mask == 0] = float("nan"), 1e6  # padding after EOS must not leak in
    advantages, returns = ppo.gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        adv, ret = gae_loop(rewards[b, :n].tolist(), values[b, :n].tolist(), n, gamma, lam)
        torch.testing.assert_close(advantages[b, :n], torch.tensor(adv), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(returns[b, :n], torch.tensor(ret), rtol=1e-5, atol=1e-5)
        assert (advantages[b, n:] == 0).all() and (returns[b, n:] == 0).all()


def test_kl_estimators_k1_k3_match_the_exact_kl_of_categoricals():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        p = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64) * 1.5, 0)
        q = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64) * 1.5, 0)
        exact = (p * (p / q).log()).sum()
        logp, logq = p.log(), q.log()  # every outcome, weighted by p: the estimators' exact expectations
        k1, k3 = ppo.kl_estimate(logp, logq, "k1"), ppo.kl_estimate(logp, logq, "k3")
        torch.testing.assert_close((p * k1).sum(), exact)
        torch.testing.assert_close((p * k3).sum(), exact)
        assert (k3 >= 0).all() and (k1 < 0).any()  # k3 never negative per sample; k1 is
        x = torch.multinomial(p, 200_000, replacement=True, generator=g)  # and sampled from the policy, as in PPO
        for est in ("k1", "k3"):
            assert abs(ppo.kl_estimate(logp[x], logq[x], est).mean() - exact) < 0.02
    with pytest.raises(config.ConfigError, match="--kl_estimator=k2: expected k1 or k3"):
        config.parse_config(ppo.PPOConfig, ["--kl_estimator=k2"])


def test_adaptive_kl_controller_moves_beta_towards_the_target():
    ctl = ppo.KLController(0.1, target=6.0, horizon=10_000)
    ctl.update(12.0, 256)  # KL above target: beta grows, by at most 20% of n/horizon
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
    high = ctl.value
    ctl.update(3.0, 256)  # below: shrinks (error clipped at -0.2)
    assert ctl.value == pytest.approx(high * (1 - 0.2 * 256 / 10_000))
    ctl.update(6.0, 256)  # on target: unchanged
    assert ctl.value == pytest.approx(high * (1 - 0.2 * 256 / 10_000))
    ctl.update(6.6, 10_000)  # proportional inside the clip: err = 0.1
    assert ctl.value == pytest.approx(high * (1 - 0.2 * 256 / 10_000) * 1.1)
    restored = ppo.KLController(0.1, 6.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    fixed = ppo.KLController(0.05)
    fixed.update(100.0, 256)
    assert fixed.value == 0.05


def test_best_of_n_kl_matches_log_n_minus_n_minus_1_over_n():
    """A policy whose distribution is known exactly: a categorical over 2,000 outcomes with distinct rewards. The KL
    of the selected samples' distribution to the policy's, measured, equals log N - (N - 1) / N."""
    g = torch.Generator().manual_seed(0)
    M, P = 2000, 100_000
    q = torch.rand(M, generator=g, dtype=torch.float64) + 0.5
    q = q / q.sum()
    reward_of = torch.randperm(M, generator=g).double()  # distinct rewards, in an order unrelated to q
    for n in (1, 2, 4, 16):
        x = torch.multinomial(q, P * n, replacement=True, generator=g)  # (P * N,) N consecutive samples per prompt
        best = x[sft.select_best(reward_of[x], n)]  # (P,)
        p_hat = torch.bincount(best, minlength=M).double() / P
        nz = p_hat > 0
        measured = (p_hat[nz] * (p_hat[nz] / q[nz]).log()).sum().item()
        assert measured == pytest.approx(sft.best_of_n_kl_bound(n), abs=0.015)
    assert sft.best_of_n_kl_bound(1) == 0.0
    assert sft.select_best(torch.tensor([1.0, 3.0, 3.0, 0.0, 5.0, 5.0]), 3).tolist() == [1, 4]  # first on a tie


def test_rloo_and_grpo_advantages():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(ppo.rloo_advantages(r, 4), torch.tensor([1 - 11 / 3, 2 - 10 / 3, 3 - 3, 6 - 2, 0, 0, 0, 0]))
    a = ppo.grpo_advantages(r, 4)
    torch.testing.assert_close(a[:4], (r[:4] - 3) / (r[:4].std() + 1e-4))
    assert (a[4:] == 0).all()  # a group with one reward learns nothing (and no NaN)


# ----------------------------------------------------------------------------------------------------------------
# rollouts and losses: score placement, the no-EOS rule, masking

def test_score_lands_on_the_last_real_token():
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]).float()  # EOS at once; EOS at 3; never EOS
    kl = torch.full((3, 4), 0.5)
    rewards = ppo.per_token_rewards(torch.tensor([10.0, 20.0, 30.0]), kl, mask, kl_coef=0.1)
    expected = torch.tensor([[10 - 0.05, 0, 0, 0], [-0.05, -0.05, 20 - 0.05, 0], [-0.05, -0.05, -0.05, 30 - 0.05]])
    torch.testing.assert_close(rewards, expected)


def test_no_eos_flag_and_rule_on_hand_made_responses(tiny, monkeypatch):
    """Responses fixed by hand (generate() replaced): EOS at once, EOS mid-way, never EOS, and padding after EOS."""
    policy, E, P = tiny["policy"], data.EOS, data.PAD
    tokens = torch.tensor([[E, P, P, P], [11, 12, E, P], [11, 12, 13, 14]])
    monkeypatch.setattr(policy, "generate", lambda ids, mask, n, *a, **k: (tokens, response_mask(tokens)))
    s = model.sample_responses(policy, ["a", "b", "c"], 4, None, "cpu")
    assert s.no_eos.tolist() == [False, False, True]
    assert s.resp_mask.tolist() == [[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert s.ids[:, -s.R:].tolist() == [[E, P, P, P], [11, 12, E, P], [11, 12, 13, 14]]
    scores = torch.tensor([0.5, 0.7, 0.9])
    assert ppo.apply_no_eos_rule(scores, s.no_eos, "replace", -1.0).tolist() == pytest.approx([0.5, 0.7, -1.0])
    assert torch.equal(ppo.apply_no_eos_rule(scores, s.no_eos, "keep"), scores)
    with pytest.raises(config.ConfigError, match="--no_eos_rule=drop: expected replace or keep"):
        config.parse_config(ppo.PPOConfig, ["--no_eos_rule=drop"])


def test_nothing_after_eos_contributes_to_any_loss(tiny):
    policy = tiny["policy"]
    for seed in range(20):  # a batch with padding after some EOS (responses of several lengths)
        b = tiny_rollout(tiny, SUBJECTS, max_new_tokens=8, seed=seed)
        m = b.resp_mask
        if (m == 0).any():
            break
    assert (m == 0).any() and (m.sum(1) > 0).all()
    critic = ppo.RewardModel(policy.config)
    critic.gpt.load_state_dict(policy.state_dict())
    old_values = critic.values(b.ids, b.mask)[:, -b.R - 1:-1].detach()
    advantages, returns = ppo.gae(ppo.per_token_rewards(b.scores, b.logp - b.ref_logp, m, 0.05), old_values, m)

    def loss_and_grads(ids, old_logp, adv, old_v, ret):
        policy.zero_grad(), critic.zero_grad()
        logp = ppo.response_logprobs(policy, ids, b.mask, b.R, 1.0)
        values = critic.values(ids, b.mask)[:, -b.R - 1:-1]
        loss = (ppo.clipped_policy_loss(logp + 0.1, old_logp, adv, m)[0]  # + 0.1: a ratio away from 1, clipping
                + ppo.clipped_value_loss(values + 0.3, old_v, ret, m)[0])
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in (*policy.parameters(), *critic.parameters()) if p.grad is not None]

    clean = loss_and_grads(b.ids, b.logp, advantages, old_values, returns)
    pad = torch.cat([torch.zeros_like(b.mask[:, :-b.R]), 1 - m.long()], 1).bool()  # response columns after EOS
    garbage_ids = torch.where(pad, torch.randint(0, 50000, b.ids.shape), b.ids)  # any token there, still masked
    junk = lambda x, v: torch.where(m.bool(), x, torch.full_like(x, v))
    dirty = loss_and_grads(garbage_ids, junk(b.logp, float("nan")), junk(advantages, 1e6), junk(old_values, -1e6),
                           junk(returns, float("nan")))
    assert torch.isfinite(clean[0]) and clean[0] != 0
    torch.testing.assert_close(dirty[0], clean[0], rtol=0, atol=0)
    for g_clean, g_dirty in zip(clean[1], dirty[1]):
        torch.testing.assert_close(g_dirty, g_clean, rtol=1e-6, atol=1e-7)
    # an all-masked (micro-)batch: loss 0, no NaN
    empty = torch.zeros_like(m)
    loss, stats = ppo.clipped_policy_loss(b.logp, b.logp * float("nan"), advantages, empty)
    assert loss.item() == 0.0 and all(float(v) == 0.0 for v in stats.values())


def test_minibatches_cover_every_sample_when_the_batch_does_not_divide():
    parts = ppo.minibatches(10, 4, torch.Generator().manual_seed(0))
    assert [len(p) for p in parts] == [4, 4, 2]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))


@pytest.mark.parametrize("algo", ["ppo-separate", "ppo-shared", "grpo"])
def test_ratio_is_exactly_1_on_the_first_minibatch(tiny, algo):
    """The first minibatch of the first epoch sees the rollout's own policy: ratio 1, approxkl 0, clipfrac 0 (N+),
    though its rows are shuffled into micro-batches unlike the rollout's. Later minibatches have moved."""
    policy, _ = checkpoint.load_policy(tiny["ckpt"], "cpu")  # a copy: this test trains it
    cfg = ppo.PPOConfig(reward=tiny["reward"], critic=algo.split("-")[-1] if "ppo" in algo else "separate",
                        batch_size=12, minibatch_size=5, micro_batch_size=3, num_epochs=1, learning_rate=1e-2,
                        max_iters=10)
    critic = reward.make_critic(cfg, policy, "cpu") if "ppo" in algo else None
    optimizer = runtime.make_optimizer(torch.nn.ModuleDict(dict(policy=policy, **({"critic": critic} if critic else {}))),
                                     cfg, "cpu")
    g = torch.Generator().manual_seed(1)
    b = ppo.rollout(policy, tiny["policy"], SUBJECTS[:6] * 2, reward.make_reward(tiny["reward"], "cpu"), 6,
                    cfg.temperature, g, "cpu", nullcontext(), 4)
    # scores spread on purpose: twelve samples may all miss " good" and score 0, and then nothing moves
    scores = b.scores + torch.arange(12.0) / 12
    kl = b.logp - b.ref_logp
    if critic is not None:
        ppo.set_advantages("ppo", cfg, b, scores, kl, 0.05, critic, nullcontext())
        assert b.old_values.abs().max() == 0  # a zero-initialised value head
    else:
        cfg.k = 4
        ppo.set_advantages("grpo", cfg, b, scores, kl, 0.04, None, nullcontext())
    stats = ppo.update(cfg, policy, critic, optimizer, b, 0, nullcontext(), 0.04 if algo == "grpo" else 0.0)
    assert len(stats) == 3  # minibatches of 5, 5, 2: no sample dropped
    first = stats[0]
    assert first["val/ratio"] == 1.0 and first["policy/approxkl"] == 0.0 and first["policy/clipfrac"] == 0.0
    assert max(s["policy/approxkl"] for s in stats[1:]) > 0


def test_whiten_rewards_keeps_the_mean_and_scales_score_and_kl_together():
    """N+'s reward whitening: per-token rewards over the response mask, std 1, mean kept (shift_mean=False)."""
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(6)[None] < torch.tensor([6, 3, 1, 4])[:, None]).float()
    rewards = ppo.per_token_rewards(torch.randn(4, generator=g) * 5 + 2, torch.rand(4, 6, generator=g), mask, 0.1)
    w = dist.whiten(rewards, mask, shift_mean=False)
    assert dist.masked_mean(w, mask) == pytest.approx(dist.masked_mean(rewards, mask).item(), abs=1e-5)
    assert dist.masked_var(w, mask) == pytest.approx(1.0, abs=1e-4)
    mean, std = dist.masked_mean(rewards, mask), dist.masked_var(rewards, mask).sqrt()
    # every token's deviation from the mean shrinks by one factor: the KL terms keep their weight against the score
    torch.testing.assert_close(w[mask.bool()] - mean, (rewards[mask.bool()] - mean) / std, rtol=1e-4, atol=1e-5)
    assert (w[mask == 0] == 0).all()


# ----------------------------------------------------------------------------------------------------------------
# rewards

def test_rewards_function_weighted_sum_llama2_and_checkpoint(tiny, tmp_path):
    fn_file = tiny["dir"] / "reward_fn.py"
    prompts, responses = ["a", "b", "c"], [" good good", " bad good", " bad"]
    share = reward.make_reward(tiny["reward"], "cpu")(prompts, responses)
    torch.testing.assert_close(share, torch.tensor([1.0, 0.5, 0.0]))
    both = reward.make_reward(f"{tiny['reward']},{fn_file}:constant_two", "cpu", weights="2,0.5")
    torch.testing.assert_close(both(prompts, responses), torch.tensor([3.0, 2.0, 1.0]))
    # Llama 2: safety where sigmoid(safety) < 0.15 (logit -1.73) or the prompt is flagged unsafe, else helpfulness
    (tmp_path / "scores.py").write_text("def helpful(p, r):\n    return [2.0, 2.0, 2.0, 2.0]\n\n"
                                        "def safety(p, r):\n    return [-3.0, 0.5, 0.5, -1.0]\n")
    (tmp_path / "unsafe.txt").write_text("c\n")
    llama = reward.make_reward(f"{tmp_path}/scores.py:helpful,{tmp_path}/scores.py:safety", "cpu",
                               combine="llama2", unsafe_prompts=str(tmp_path / "unsafe.txt"))
    torch.testing.assert_close(llama(["a", "b", "c", "d"], ["x"] * 4), torch.tensor([-3.0, 2.0, 0.5, 2.0]))
    # a reward checkpoint: reward.score_texts, the same numbers
    model = reward.RewardModel(tiny["policy"].config)
    model.gpt.load_state_dict(tiny["policy"].state_dict())
    path = str(tmp_path / "rm.pt")
    checkpoint.save_checkpoint(path, dict(kind="reward", stage="reward", step=0, model=model.state_dict(),
                                     model_args=dict(vars(model.config)), optimizer=None, config={}, rng=None))
    torch.testing.assert_close(reward.make_reward(path, "cpu")(prompts, responses),
                               torch.tensor(reward.score_texts(model.eval(), prompts, responses, "cpu")))
    # bad specs are one-line ConfigErrors
    for spec, kw, match in [(f"{tmp_path}/nope.py:f", {}, "not a file"), (f"{fn_file}:nope", {}, "no function"),
                            (str(fn_file), {}, "name the function too"),
                            (tiny["reward"], dict(weights="1,2"), "2 weights for 1"),
                            (tiny["reward"], dict(combine="llama2"), "two rewards"), ("", {}, "required")]:
        with pytest.raises(config.ConfigError, match=match):
            reward.make_reward(spec, "cpu", **kw)


@pytest.mark.parametrize("body,match", [
    ("def f(p, r):\n    return [1.0]\n", "returned 1 scores for 3"),
    ("def f(p, r):\n    x = 1\n    raise ValueError('no good')\n", r"raised ValueError at .*bad\.py:3: no good"),
    ("def f(p, r):\n    return None\n", "returned NoneType"),
    ("def f(p, r):\n    return ['a', 'b', 'c']\n", "returned list"),
    ("def f(p, r):\n    return [float('nan')] * 3\n", "non-finite"),
    ("def f(p):\n    return [1.0]\n", r"must take two arguments"),
    ("import nosuchmodule\ndef f(p, r):\n    return [1.0]\n", r"importing .* failed at .*bad\.py:1"),
])
def test_a_broken_user_reward_is_one_line_naming_its_file_and_line(tmp_path, body, match):
    (tmp_path / "bad.py").write_text(body)
    with pytest.raises(config.ConfigError, match=match) as e:
        reward.make_reward(f"{tmp_path}/bad.py:f", "cpu")(["a", "b", "c"], ["x", "y", "z"])
    assert "\n" not in str(e.value)


def test_critic_starts_at_zero_in_eval_mode_without_dropout(tiny, tmp_path):
    """The critic's first values: 0 with the default zero head (close to the returns of a normalised reward), or the
    reward model's own normalised scores with --critic_init=reward; no dropout, even from a policy trained with it."""
    ckpt = checkpoint.load_checkpoint(tiny["ckpt"], "policy")
    dropped = dict(ckpt, model_args=dict(ckpt["model_args"], dropout=0.3))
    path = str(tmp_path / "dropout-policy.pt")
    checkpoint.save_checkpoint(path, dropped)
    policy, _ = checkpoint.load_policy(path, "cpu")
    ids, mask = torch.randint(0, 1000, (4, 10)), torch.ones(4, 10, dtype=torch.long)
    for critic_kind in ("separate", "shared"):
        critic = reward.make_critic(ppo.PPOConfig(reward=tiny["reward"], critic=critic_kind), policy, "cpu")
        assert not critic.training and all(m.p == 0 for m in critic.modules() if isinstance(m, torch.nn.Dropout))
        with torch.no_grad():
            v1, v2 = critic.values(ids, mask), critic.values(ids, mask)
        assert torch.equal(v1, v2) and v1.abs().max() == 0
    # from a reward checkpoint: its trunk; critic_init=reward keeps its head and normalisation (gain, bias)
    rm = reward.RewardModel(policy.config)
    rm.gpt.load_state_dict(policy.state_dict())
    rm.gain.fill_(2.0), rm.bias.fill_(-0.5)
    rm_path = str(tmp_path / "rm.pt")
    checkpoint.save_checkpoint(rm_path, dict(kind="reward", stage="reward", step=0, model=rm.state_dict(),
                                        model_args=dict(vars(rm.config)), optimizer=None, config={}, rng=None))
    critic = reward.make_critic(ppo.PPOConfig(reward=rm_path, critic_init="reward"), policy, "cpu")
    rm = reward.load_reward_model(rm_path, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(critic.values(ids, mask)[:, -1], rm.score(ids, mask))
        assert critic.values(ids, mask).std() > 0
    critic = reward.make_critic(ppo.PPOConfig(reward=rm_path), policy, "cpu")
    assert torch.equal(critic.gpt.transformer.wte.weight, rm.gpt.transformer.wte.weight)
    with torch.no_grad():
        assert critic.values(ids, mask).abs().max() == 0
    with pytest.raises(config.ConfigError, match="critic_init=reward needs"):
        reward.make_critic(ppo.PPOConfig(reward=tiny["reward"], critic_init="reward"), policy, "cpu")


def test_evaluate_policy_kl_matches_a_full_forward_pass(tiny):
    """evaluate_policy's KL against a slow reference: each sample alone, unpadded, through both models' full forward
    pass, log-softmax, and the sampled tokens' log-probs summed up to and including EOS. The reference differs from
    the policy (a perturbed copy)."""
    policy, ref = tiny["policy"], checkpoint.load_policy(tiny["ckpt"], "cpu")[0]
    torch.manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    reward_fn = reward.make_reward(tiny["reward"], "cpu")
    b = ppo.rollout(policy, ref, SUBJECTS, reward_fn, 8, 1.0, torch.Generator().manual_seed(4), "cpu", nullcontext(), 8)
    expected = []
    for ids, mask in zip(b.ids, b.mask):
        real = ids[mask.bool()][None]  # (1, n): prompt and response, no padding
        n_resp = int(mask[-b.R:].sum())
        with torch.no_grad():
            lp = [torch.log_softmax(m(real)[0][0, -n_resp - 1:-1].double(), -1) for m in (policy, ref)]
        idx = real[0, -n_resp:, None]
        expected.append((lp[0].gather(1, idx) - lp[1].gather(1, idx)).sum().item())
    result = ppo.evaluate_policy(policy, ref, SUBJECTS, reward_fn, "cpu", max_new_tokens=8, batch_size=8, seed=4)
    assert [s["kl"] for s in result["samples"]] == pytest.approx(expected, abs=1e-4)
    assert result["kl"] == pytest.approx(sum(expected) / len(expected), abs=1e-4) and abs(result["kl"]) > 1e-3
    assert result["score"] == pytest.approx(sum(share_of_good(None, [s["response"] for s in result["samples"]]))
                                            / len(SUBJECTS))


# ----------------------------------------------------------------------------------------------------------------
# end to end: the target word's share rises, the KL stays bounded; resume is exact

def rl_args(tiny, out_dir, steps=8, *extra):
    return [*extra, f"--init_from={tiny['ckpt']}", f"--reward={tiny['reward']}", f"--prompts={tiny['prompts']}",
            f"--eval_prompts={tiny['eval_prompts']}", "--eval_iters=4", "--max_new_tokens=6", "--temperature=1.0",
            "--batch_size=16", "--minibatch_size=8", "--micro_batch_size=8", "--num_epochs=2", f"--max_iters={steps}",
            "--learning_rate=3e-3", "--ckpt_interval=2", "--eval_interval=100", "--device=cpu", f"--out_dir={out_dir}"]


def assert_learned(rows, min_gain=MIN_GAIN, max_kl=4.0):
    """The evaluation (64 samples at temperature 1 on fixed prompts and seed) before and after training: the share of
    " good" rises by more than min_gain, with the KL bounded. MIN_GAIN is half the smallest gain seen over 8 seeds
    of each algorithm (see the constant), so the check holds for any seed, not by one seed's luck."""
    evals = [r for r in rows if "eval/score" in r]
    assert evals[-1]["eval/score"] > evals[0]["eval/score"] + min_gain, [r["eval/score"] for r in evals]
    assert 0 < evals[-1]["eval/kl"] < max_kl
    assert all(-0.5 < r["objective/kl"] < max_kl for r in rows if "objective/kl" in r)


@pytest.fixture(scope="module")
def ppo_run(tiny):
    out = tiny["dir"] / "ppo"
    main_in_process("ppo", *rl_args(tiny, out, 8))
    return out


def test_ppo_raises_the_score_with_the_kl_bounded(ppo_run):
    rows = read_metrics(ppo_run)
    evals = [r for r in rows if "eval/score" in r]  # --eval_prompts: before training and at the end, temperature 1
    assert [r["step"] for r in evals] == [0, 8] and evals[0]["eval/kl"] == 0.0
    rows = [r for r in rows if "objective/scores" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    for name in ["objective/scores", "objective/kl", "objective/entropy", "objective/rlhf_reward", "policy/approxkl",
                 "policy/clipfrac", "policy/entropy", "val/clipfrac", "val/explained_variance", "val/ratio",
                 "val/num_eos_missing", "objective/kl_coef"]:
        assert all(name in r for r in rows), name
    # one process: each step's time split into its phases, and no gradient sum to time
    phases = {"time/generate_s", "time/logprobs_s", "time/reward_s", "time/advantages_s", "time/update_s",
              "time/metrics_s"}
    assert all(phases <= set(r) and "time/grad_sum_s" not in r for r in rows)
    assert_learned(read_metrics(ppo_run))  # the evaluation rows too
    assert rows[0]["objective/kl"] < rows[-1]["objective/kl"]
    summary = read_json(ppo_run / "summary.json")
    assert summary["step"] == 8 and summary["objective/scores"] == rows[-1]["objective/scores"]
    assert summary["eval/score"] == evals[1]["eval/score"]
    samples = [json.loads(line) for line in open(ppo_run / "samples.jsonl")]
    assert len(samples) == 64 and sum(s["score"] for s in samples) / 64 == pytest.approx(evals[1]["eval/score"])
    policy, _ = checkpoint.load_policy(str(ppo_run / "ckpt.pt"), "cpu")  # the same checkpoint format as every stage
    assert policy.config.n_embd == 32


def test_ppo_ctrl_c_then_the_printed_command_ends_where_an_uninterrupted_run_ends(tiny, ppo_run):
    out = tiny["dir"] / "ppo-stopped"
    args = [a for a in rl_args(tiny, out, 8) if not a.startswith("--out_dir")]
    hint, _ = interrupt_and_resume(["ppo", *args], str(out))
    assert hint == f"python train.py ppo --resume --out_dir={out}"
    assert read_json(out / "summary.json") == read_json(ppo_run / "summary.json")
    assert timeless(read_metrics(out)) == timeless(read_metrics(ppo_run))


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_rloo_and_grpo_raise_the_score_with_the_kl_bounded(tiny, algo):
    out = tiny["dir"] / algo
    cfg = config.parse_config(ppo.RLOOConfig if algo == "rloo" else ppo.GRPOConfig, rl_args(tiny, out) + ["--k=4"])
    assert in_process(lambda cfg: ppo.train_rl(cfg, algo), cfg) == 0
    rows = read_metrics(out)
    assert "val/explained_variance" not in rows[0]  # no critic
    assert_learned(rows)


def online_dpo_gain(tiny, out, seed):
    """(gain of the " good" share, KL): the evaluation of assert_learned, of the SFT policy and of online DPO's."""
    args = [f"--init_from={tiny['ckpt']}", f"--reward={tiny['reward']}", f"--prompts={tiny['prompts']}",
            "--max_new_tokens=6", "--batch_size=32", "--max_iters=16", "--learning_rate=3e-3", "--beta=0.3",
            f"--seed={seed}", "--device=cpu", f"--out_dir={out}"]
    assert in_process(dpo.train_online, config.parse_config(dpo.OnlineDPOConfig, args)) == 0
    prompts, reward_fn = data.load_prompts(tiny["eval_prompts"]), reward.make_reward(tiny["reward"], "cpu")
    ev = [ppo.evaluate_policy(checkpoint.load_policy(path, "cpu")[0], tiny["policy"], prompts, reward_fn, "cpu",
                              max_new_tokens=6, seed=0) for path in (tiny["ckpt"], str(out / "ckpt.pt"))]
    return ev[1]["score"] - ev[0]["score"], ev[1]["kl"]


def test_online_dpo_raises_the_score_of_its_own_samples(tiny):
    """Online DPO: pairs sampled from the policy each step, the reward's choice as the label (most pairs tie here, as
    " good" is one adjective in eight, and teach nothing). Gains seen over seeds 1-8 and 1337 (2026-12-05, CPU,
    these arguments): 0.052-0.165, KL 0.5-2.6; asserted: half the smallest gain, with the KL bounded."""
    out = tiny["dir"] / "online_dpo"
    gain, kl = online_dpo_gain(tiny, out, 1337)
    assert gain > 0.026 and 0 < kl < 4.0, (gain, kl)
    rows = read_metrics(out)
    assert len(rows) == 16 and rows[0]["rewards/accuracies"] == 0.0  # step 1: the policy is the reference
    assert all(0 <= r["objective/score_margin"] and -0.5 < r["objective/kl"] < 8.0 for r in rows)  # 32 samples each


def test_best_of_n_reward_rises_with_n_and_rejection_sampling_finetunes(tiny):
    common = dict(init_from=tiny["ckpt"], reward=tiny["reward"], prompts=tiny["eval_prompts"], max_new_tokens=6,
                  device="cpu")
    summaries = {}
    for n in (1, 8):
        out = tiny["dir"] / f"bon{n}"
        assert in_process(sft.bon, sft.BoNConfig(out_dir=str(out), n=n, **common)) == 0
        summaries[n] = read_json(out / "summary.json")
        selected = [json.loads(line) for line in open(out / "selected.jsonl")]
        samples = [json.loads(line) for line in open(out / "samples.jsonl")]
        assert [r["prompt"] for r in selected] == SUBJECTS * 8 and set(selected[0]) == {"prompt", "response"}
        assert len(samples) == 64 * n and sum(s["selected"] for s in samples) == 64
        assert [s["score"] for s in samples] == pytest.approx(share_of_good(None, [s["response"] for s in samples]))
        kept = [s for s in samples if s["selected"]]  # each prompt's best (the first on a tie)
        for i in range(64):
            group = samples[i * n:(i + 1) * n]
            assert kept[i] is next(s for s in group if s["score"] == max(g["score"] for g in group))
    assert summaries[1]["score/best"] == pytest.approx(summaries[1]["score/all"]) and summaries[1]["kl/bound"] == 0
    assert summaries[8]["score/best"] > summaries[1]["score/best"] + 0.2
    assert summaries[8]["kl/bound"] == pytest.approx(math.log(8) - 7 / 8)
    # rejection-sampling fine-tuning: sft on the kept responses; the tuned policy says 'good' more often
    cfg = config.parse_config(sft.SFTConfig, [f"--init_from={tiny['ckpt']}", f"--data={tiny['dir'] / 'bon8' / 'selected.jsonl'}",
                                               f"--out_dir={tiny['dir'] / 'rs-ft'}", "--batch_size=16", "--max_iters=30",
                                               "--learning_rate=3e-3", "--warmup_iters=0", "--device=cpu"])
    assert in_process(sft.sft, cfg) == 0
    tuned, _ = checkpoint.load_policy(str(tiny["dir"] / "rs-ft" / "ckpt.pt"), "cpu")
    reward_fn = reward.make_reward(tiny["reward"], "cpu")
    before = ppo.evaluate_policy(tiny["policy"], tiny["policy"], SUBJECTS * 8, reward_fn, "cpu", max_new_tokens=6)
    after = ppo.evaluate_policy(tuned, tiny["policy"], SUBJECTS * 8, reward_fn, "cpu", max_new_tokens=6)
    assert after["score"] > before["score"] + 0.05 and after["kl"] > 0


def test_a_bfloat16_reference_reads_kl_0_at_step_0():
    """Under bfloat16 autocast the frozen reference (its Linear weights stored in bfloat16: frozen_dtype) computes
    the same log-probs as the float32 policy it is a copy of, so the KL starts at exactly 0 (with the whole model in
    bfloat16 it read about +0.02 nats a response)."""
    path = os.path.join(ROOT, "assets", "sft-imdb-cpu.pt")
    policy, _ = checkpoint.load_policy(path, "cpu")
    ref, _ = checkpoint.load_policy(path, "cpu", torch.bfloat16)
    assert ref.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16  # the memory saved is real
    ctx = torch.autocast("cpu", torch.bfloat16)
    s = model.sample_responses(policy, ["This movie was", "I watched this film", "What a"] * 4, 16,
                               torch.Generator().manual_seed(0), "cpu", ctx)
    with torch.no_grad(), ctx:
        logp, ref_logp = (model.response_logprobs(m, s.ids, s.mask, s.R) for m in (policy, ref))
    assert s.resp_mask.sum() > 50 and torch.equal(logp, ref_logp)

"""
Reinforcement learning from a reward: PPO (Schulman et al. 2017) with GAE, a critic and a KL penalty against a frozen
reference policy, and the critic-free RLOO (Ahmadian et al. 2024) and GRPO (Shao et al. 2024). Three stages of
train.py (best-of-N is sft.py's):

    python train.py ppo  --init_from=out/sft/ckpt.pt --reward=out/reward/ckpt.pt --prompts=prompts.jsonl
    python train.py rloo --init_from=out/sft/ckpt.pt --reward=my_reward.py:score --prompts=prompts.txt --k=4
    python train.py grpo --init_from=out/sft/ckpt.pt --reward=my_reward.py:score --prompts=prompts.txt --k=8

To read it: PPO, RLOO and GRPO are one loop, train_rl() at the bottom, in numbered phases, each a function above it
in order; the details follow OpenAI's lm-human-preferences and "The N+ implementation details of RLHF with PPO"
(Huang et al. 2024), called N+ below:
  1. rollout: sample at temperature T (model.sample_responses); log-probs of the policy and of the frozen reference
     at the same T (N+: the temperature divides the logits of every log-prob); the reward scores the texts
  2. the no-EOS rule: a response cut at --max_new_tokens gets the score --no_eos_score (N+, after OpenAI)
  3. per-token KL against the reference, k1 or k3 (Schulman 2020, "Approximating KL divergence")
  4. advantages (set_advantages()): PPO: reward -beta*KL per token + the score on the last real token, GAE, whitened;
     RLOO: score - beta*KL(sequence) minus the mean of the other k - 1; GRPO: group-normalised score
  5. update (update()): epochs of shuffled minibatches (gradient accumulation over micro-batches) of the clipped
     policy loss, + the clipped value loss (PPO), + beta * KL in the loss (GRPO)
  6. adaptive KL coefficient (Ziegler et al. 2019), log, checkpoint
The rewards (a reward-model checkpoint, FILE.py:FUNCTION, weighted sums, Llama 2's rule) and PPO's critic live in
reward.py. evaluate_policy() is the evaluation the pipeline reuses: mean reward and KL(policy || reference) of one
sample per prompt at temperature 1.

Simplifications, on purpose:
- The reward reads text: responses are decoded and re-tokenised (reward.score_texts), so a reward model and a
  Python function plug in the same way; the round trip can change the tokenisation of odd strings.
- One generate() call per rollout; one optimizer and one gradient-norm clip over policy and critic (N+); no reward
  clipping, value-head warm-up or entropy bonus.
- --whiten_rewards (off by default, as in N+ and TRL) whitens score and KL terms together and adds their mean back
  (N+'s shift_mean=False), so beta keeps its meaning; GRPO refuses it (it normalises per group already).
- RLOO and GRPO reuse PPO's clipped surrogate; every loss averages over a minibatch's real response tokens (not per
  sequence first, as DeepSeekMath's GRPO).
- Under torchrun each process samples its share of a step's prompts from its own stream: the run agrees with a
  one-process run in distribution, not number for number. Rank 0 alone evaluates.
"""
import math
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm import tqdm

from checkpoint import frozen_dtype, load_policy
from config import ConfigError, OptimConfig, TrainConfig, opt, plural
from data import derived_seed, epoch_indices, load_prompts, write_jsonl
from dist import (accumulate, all_sum, global_mean, global_means, is_main, masked_var, my_share, rank_seed, whiten,
                  world, world_note)
from model import Samples, last_real_index, response_logprobs, sample_responses
from reward import RewardModel, RewardSpec, make_critic, make_reward
from runtime import Clock, Run, check_finite, make_optimizer, optimizer_step, setup_device, shorten

SAMPLING, SHUFFLE, EVAL = range(3)  # the random streams of a step: derived_seed(seed, step, stream)


# ----------------------------------------------------------------------------------------------------------------
# configuration

@dataclass
class RLConfig(RewardSpec, TrainConfig, OptimConfig):
    """Keys shared by ppo, rloo and grpo."""
    init_from: str = opt("out/sft/ckpt.pt", "policy checkpoint to start from (sft, dpo, ...)")
    ref: str = opt("", "frozen reference policy of the KL penalty (default: --init_from)")
    prompts: str = opt("", "training prompts: .txt lines or JSONL in any data.load_prompts format (required)")
    max_prompts: int = opt(0, "read at most this many prompts (0: all)", min=0)
    eval_prompts: str = opt("", "evaluation prompts (default: no evaluation); one sample each at temperature 1")
    max_new_tokens: int = opt(48, "tokens sampled per response", min=1)
    temperature: float = opt(0.7, "sampling temperature, also used in every log-prob (N+)", min=0.01)
    batch_size: int = opt(64, "responses sampled per step (rloo, grpo: prompts x k)", min=1)
    minibatch_size: int = opt(16, "responses per optimizer step; an epoch's last minibatch may be smaller", min=1)
    micro_batch_size: int = opt(16, "responses per forward/backward pass (gradient accumulation)", min=1)
    num_epochs: int = opt(4, "passes over each rollout batch (N+: 4)", min=1)
    cliprange: float = opt(0.2, "PPO ratio clipping epsilon", min=0.0)
    kl_coef: float = opt(0.05, "beta: KL penalty coefficient (its start when --kl_target > 0)", min=0.0)
    kl_estimator: str = opt("k1", "per-token KL estimator: k1 (log-ratio) or k3 ((r - 1) - log r, >= 0)",
                            choices=("k1", "k3"))
    kl_target: float = opt(0.0, "adaptive KL coefficient (Ziegler et al. 2019): target KL, nats (0: off)", min=0.0)
    kl_horizon: int = opt(10000, "adaptive KL coefficient: horizon in episodes", min=1)
    no_eos_rule: str = opt("replace", "responses without EOS: replace (their score becomes --no_eos_score, as "
                                      "OpenAI) or keep (fixed-length continuations)", choices=("replace", "keep"))
    no_eos_score: float = opt(-1.0, "score of a response that did not end in EOS (with --no_eos_rule=replace)")
    whiten_rewards: bool = opt(False, "scale the rewards (score and KL terms) by their std over the batch, mean kept "
                                      "(N+); not with grpo")
    learning_rate: float = opt(1e-5, "peak learning rate (N+: 1e-6 to 1e-5 for real models)", min=0.0)
    warmup_iters: int = opt(0, "linear warm-up steps", min=0)
    max_iters: int = opt(100, "rollout steps", min=0)
    weight_decay: float = opt(0.0, "AdamW weight decay on matrices", min=0.0)
    beta2: float = opt(0.999, "Adam beta2", min=0.0)
    adam_eps: float = opt(1e-5, "Adam epsilon (N+)", min=0.0)
    log_interval: int = opt(1, "steps between log lines", min=1)
    eval_interval: int = opt(20, "steps between evaluations (and printed samples)", min=1)
    eval_iters: int = opt(4, "evaluation: batches of --batch_size prompts from --eval_prompts", min=1)


@dataclass
class PPOConfig(RLConfig):
    out_dir: str = opt("out/ppo", "run folder")
    critic: str = opt("separate", "separate: a value model on the reward model's trunk (the policy's when the reward "
                                  "is a function), N+/TRL; shared: a value head on the policy's trunk, OpenAI",
                      choices=("separate", "shared"))
    critic_init: str = opt("zero", "the value head's start: zero (first values 0) or reward (the reward model's own "
                                   "normalised head; separate critic from a reward checkpoint only)",
                           choices=("zero", "reward"))
    vf_coef: float = opt(0.1, "weight of the value loss (N+)", min=0.0)
    cliprange_value: float = opt(0.2, "value clipping around the rollout's values", min=0.0)
    gamma: float = opt(1.0, "GAE discount", min=0.0)
    lam: float = opt(0.95, "GAE lambda", min=0.0)


@dataclass
class RLOOConfig(RLConfig):
    out_dir: str = opt("out/rloo", "run folder")
    k: int = opt(4, "samples per prompt (each one's baseline: the mean reward of the others)", min=2)


@dataclass
class GRPOConfig(RLConfig):
    out_dir: str = opt("out/grpo", "run folder")
    k: int = opt(4, "samples per prompt (the group)", min=2)
    kl_coef: float = opt(0.04, "beta of the KL term in the loss (DeepSeekMath; 0: none)", min=0.0)
    kl_estimator: str = opt("k3", "estimator of the KL term in the loss: k3 (DeepSeekMath) or k1", choices=("k1", "k3"))


# ----------------------------------------------------------------------------------------------------------------
# phase 1: rollout (shared by ppo, rloo, grpo and evaluation)

@dataclass
class Rollout(Samples):
    logp: torch.Tensor = None  # (B, R) policy log-probs at the sampling temperature
    ref_logp: torch.Tensor = None  # (B, R) reference log-probs at the same temperature
    entropy: torch.Tensor = None  # (B, R) entropy of the policy's (tempered) next-token distribution
    scores: torch.Tensor = None  # (B,) the reward, as the reward returned it
    advantages: torch.Tensor = None  # (B, R) phase 4
    returns: torch.Tensor = None  # (B, R) PPO: the critic's targets
    old_values: torch.Tensor = None  # (B, R) PPO: the critic's values at rollout time


def in_chunks(fn, ids, mask, size):
    """fn over rows of (ids, mask) in chunks of `size`, results concatenated (a tensor, or a tuple of tensors)."""
    outs = [fn(ids[i:i + size], mask[i:i + size]) for i in range(0, ids.size(0), size)]
    return tuple(torch.cat(o) for o in zip(*outs)) if isinstance(outs[0], tuple) else torch.cat(outs)


@torch.no_grad()
def rollout(policy, ref, prompts, reward_fn, max_new_tokens, temperature, generator, device, ctx, micro_batch_size,
            clock=None):
    """Phase 1: sample, log-probs of policy and reference at the sampling temperature, and the reward's score of
    prompt + response. clock (runtime.Clock): times the three parts."""
    clock = clock or Clock()
    b = Rollout(**vars(sample_responses(policy, prompts, max_new_tokens, generator, device, ctx, temperature)))
    clock.lap("generate")
    with ctx:
        b.logp, b.entropy = in_chunks(lambda i, m: response_logprobs(policy, i, m, b.R, temperature, True),
                                      b.ids, b.mask, micro_batch_size)
        b.ref_logp = in_chunks(lambda i, m: response_logprobs(ref, i, m, b.R, temperature), b.ids, b.mask,
                               micro_batch_size)
        clock.lap("logprobs")
        b.scores = reward_fn(b.prompts, b.responses).float()
        clock.lap("reward")
    return b


@torch.no_grad()
def evaluate_policy(policy, ref, prompts, reward_fn, device, ctx=nullcontext(), max_new_tokens=48, batch_size=64,
                    temperature=1.0, seed=0):
    """One sample per prompt at `temperature` (1: the policy's own distribution). Returns dict(score: mean reward,
    kl: mean over samples of sum over tokens of logpi - logpi_ref, entropy (per sequence), length (tokens),
    no_eos (share), samples: [{prompt, response, score, kl}])."""
    g = torch.Generator(device=device).manual_seed(seed)
    scores, kls, ents, lens, no_eos, samples = [], [], [], [], [], []
    for i in range(0, len(prompts), batch_size):
        b = rollout(policy, ref, prompts[i:i + batch_size], reward_fn, max_new_tokens, temperature, g, device, ctx,
                    batch_size)
        kl = (b.logp - b.ref_logp).sum(1)  # (B,) k1, 0 off the response
        scores.append(b.scores), kls.append(kl), ents.append(b.entropy.sum(1))
        lens.append(b.resp_mask.sum(1)), no_eos.append(b.no_eos.float())
        samples += [dict(prompt=p, response=r, score=s, kl=k)
                    for p, r, s, k in zip(b.prompts, b.responses, b.scores.tolist(), kl.tolist())]
    return dict(samples=samples, **{k: torch.cat(v).mean().item() for k, v in
                                    dict(score=scores, kl=kls, entropy=ents, length=lens, no_eos=no_eos).items()})


# ----------------------------------------------------------------------------------------------------------------
# phases 2-4: the no-EOS rule, KL, rewards, advantages (pure functions of tensors)

def apply_no_eos_rule(scores, no_eos, rule="replace", no_eos_score=-1.0):
    """OpenAI's rule (N+): a response that never emitted EOS gets the fixed score `no_eos_score` instead of the
    reward's, which teaches the policy to finish. rule "keep" leaves every score as it is."""
    return scores if rule == "keep" else torch.where(no_eos, torch.full_like(scores, no_eos_score), scores)


def kl_estimate(logp, ref_logp, estimator="k1"):
    """Per-token estimate of KL(policy || reference) from tokens sampled by the policy (Schulman 2020).
    logr = logp - ref_logp. k1 = logr: unbiased, negative on some tokens. k3 = (exp(-logr) - 1) + logr: unbiased,
    never negative, lower variance. (B, T) -> (B, T)."""
    logr = logp - ref_logp
    return logr if estimator == "k1" else torch.expm1(-logr) + logr


def per_token_rewards(scores, kl, mask, kl_coef):
    """r_t = -beta * kl_t on every response token, plus the score on the LAST REAL token (never on the padding after
    EOS: TRL issue 3750). scores (B,), kl (B, T), mask (B, T) right-padded -> (B, T), 0 on padding."""
    rewards = torch.where(mask.bool(), -kl_coef * kl, 0.0)
    return rewards.scatter_add(1, last_real_index(mask)[:, None], scores[:, None].to(rewards.dtype))


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (Schulman et al. 2016), vectorised over the batch, looped over time.

    rewards, values, mask: (B, T); mask 1 on real tokens, right-padded. values[:, t] is the value of the state
    before token t. The value after a response's last token is 0; padding carries nothing. Returns
    (advantages, returns), both (B, T) and 0 on padding; returns = advantages + values, before any whitening."""
    m = mask.bool()
    rewards, values = torch.where(m, rewards, 0.0), torch.where(m, values, 0.0)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1)
    deltas = rewards + gamma * next_values - values  # TD errors; padding gives 0 after the last token
    next_adv, advantages = torch.zeros_like(values[:, 0]), []
    for t in reversed(range(values.size(1))):
        next_adv = deltas[:, t] + gamma * lam * next_adv
        advantages.append(next_adv)
    advantages = torch.where(m, torch.stack(advantages[::-1], 1), 0.0)
    return advantages, torch.where(m, advantages + values, 0.0)


def explained_variance(values, returns, mask):
    """1 - Var(returns - values) / Var(returns) over real tokens: 1 is a perfect critic, 0 a constant one; NaN
    (logged as null) when the returns do not vary, as CleanRL."""
    var_returns = masked_var(returns, mask)
    return torch.where(var_returns > 0, 1 - masked_var(returns - values, mask) / var_returns, float("nan"))


def rloo_advantages(rewards, k):
    """REINFORCE leave-one-out (Ahmadian et al. 2024): each sample's baseline is the mean reward of the other k - 1
    samples of its prompt. rewards (B,), k consecutive samples per prompt -> (B,)."""
    r = rewards.view(-1, k)
    return (r - (r.sum(1, keepdim=True) - r) / (k - 1)).view(-1)


def grpo_advantages(rewards, k, eps=1e-4):
    """GRPO (Shao et al. 2024): (r - group mean) / (group std + eps), std unbiased as DeepSeekMath / TRL. (B,) -> (B,)."""
    r = rewards.view(-1, k)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


class KLController:
    """The KL coefficient beta: fixed (target 0), or adapted as OpenAI (Ziegler et al. 2019):
    err = clip(KL / target - 1, -0.2, 0.2), beta *= 1 + err * n / horizon, after every batch of n episodes."""

    def __init__(self, value, target=0.0, horizon=10000):
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, kl, n_episodes):
        if self.target > 0:
            err = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + err * n_episodes / self.horizon

    def state_dict(self):
        return dict(value=self.value)

    def load_state_dict(self, state):
        self.value = state["value"]


@torch.no_grad()
def set_advantages(algo, cfg, b, scores, kl, beta, critic, ctx):
    """Phase 4 for algo ppo, rloo or grpo: sets b.advantages (B, R) (and, for PPO, b.old_values and b.returns).
    scores (B,) after the no-EOS rule; kl (B, R) per-token estimates, 0 off the response. Returns the non-score
    reward -beta * KL per sequence (B,) (0 for GRPO, whose KL term is in the loss instead)."""
    m = b.resp_mask
    if algo == "grpo":
        b.advantages = grpo_advantages(scores, cfg.k)[:, None] * m
        return torch.zeros_like(scores)
    if algo == "rloo":  # the KL folded into the sequence's reward
        rewards = scores - beta * kl.sum(1)
        if cfg.whiten_rewards:
            rewards = whiten(rewards, torch.ones_like(rewards), shift_mean=False)
        b.advantages = rloo_advantages(rewards, cfg.k)[:, None] * m
        return -beta * kl.sum(1)
    with ctx:
        values = in_chunks(critic.values, b.ids, b.mask, cfg.micro_batch_size)[:, -b.R - 1:-1].float()
    b.old_values = torch.where(m.bool(), values, 0.0)  # (B, R): the value of the state before token t
    rewards = per_token_rewards(scores, kl, m, beta)
    if cfg.whiten_rewards:
        rewards = whiten(rewards, m, shift_mean=False)
    adv, b.returns = gae(rewards, b.old_values, m, cfg.gamma, cfg.lam)
    b.advantages = whiten(adv, m)  # returns are taken before the advantages are whitened (N+)
    return -beta * kl.sum(1)


# ----------------------------------------------------------------------------------------------------------------
# phase 5: the update (pure losses, then the minibatch loop)

def clipped_policy_loss(logp, old_logp, advantages, mask, cliprange=0.2, n_tokens=None):
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), summed over real tokens / n_tokens.

    logp (B, T) with gradient; old_logp, advantages (B, T) from the rollout; mask (B, T) 1 on real tokens (what is
    off it, even NaN, contributes nothing); n_tokens: real tokens of the whole minibatch, when this is one
    micro-batch of it (default: mask.sum()). Returns (loss, stats); stats are SUMS over real tokens, to be divided
    by the token count once all micro-batches of a minibatch are in (so a ratio of exactly 1 reads exactly 1)."""
    m = mask.bool()
    n = mask.sum().clamp(min=1) if n_tokens is None else n_tokens
    logratio = torch.where(m, logp - old_logp, 0.0)
    ratio = logratio.exp()
    adv = torch.where(m, advantages, 0.0)
    pg1, pg2 = -adv * ratio, -adv * ratio.clamp(1 - cliprange, 1 + cliprange)
    loss = torch.where(m, torch.max(pg1, pg2), 0.0).sum() / n
    with torch.no_grad():
        stats = {"policy/approxkl": 0.5 * logratio.pow(2).sum(),  # as N+ logs it
                 "policy/clipfrac": ((pg2 > pg1) & m).sum(), "val/ratio": torch.where(m, ratio, 0.0).sum()}
    return loss, stats


def clipped_value_loss(values, old_values, returns, mask, cliprange_value=0.2, n_tokens=None):
    """0.5 * max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2) summed over real tokens / n_tokens (N+).
    values (B, T) with gradient; old_values, returns (B, T) from the rollout. Returns (loss, stats as sums)."""
    m = mask.bool()
    n = mask.sum().clamp(min=1) if n_tokens is None else n_tokens
    old_values, returns = torch.where(m, old_values, 0.0), torch.where(m, returns, 0.0)
    v_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    vf1, vf2 = (values - returns) ** 2, (v_clipped - returns) ** 2
    loss = 0.5 * torch.where(m, torch.max(vf1, vf2), 0.0).sum() / n
    with torch.no_grad():
        stats = {"val/clipfrac": ((vf2 > vf1) & m).sum()}
    return loss, stats


def minibatches(batch_size, minibatch_size, generator, count=0, device="cpu"):
    """A fresh shuffle of 0..B-1 cut into minibatches on `device`; the last is smaller when B does not divide (none
    dropped). count > 0 (torchrun: B is this process's rows): cut into `count` minibatches instead, sizes differing by
    at most one, so that every process takes the same optimizer steps."""
    perm = torch.randperm(batch_size, generator=generator).to(device, non_blocking=True)  # no wait for the GPU
    return perm.tensor_split(count) if count else perm.split(minibatch_size)


def update(cfg, policy, critic, optimizer, b, step, ctx, kl_loss_coef=0.0, clock=None):
    """Phase 5: cfg.num_epochs passes over rollout b in shuffled minibatches (N+: 4 epochs), one optimizer step each.
    critic (PPO): the value loss on b.returns (a separate critic: its own backward first, the sum's gradients); GRPO:
    kl_loss_coef > 0, the KL term. Returns a dict of statistics per minibatch in order (the first: N+'s ratio-is-1
    check). clock: under torchrun, the gradient sums are charged to its phase grad_sum. One wait for the GPU a step."""
    trainable = nn.ModuleDict(dict(policy=policy, **({"critic": critic} if critic is not None else {})))
    shuffle = torch.Generator().manual_seed(rank_seed(cfg.seed, step, SHUFFLE))
    count = math.ceil(cfg.batch_size / cfg.minibatch_size) if world() > 1 else 0
    sums, counts, norms = [], [], []
    for _ in range(cfg.num_epochs):
        mbs = minibatches(b.ids.size(0), cfg.minibatch_size, shuffle, count, b.ids.device)
        # losses average over the minibatch's real tokens (over every process's part of it under torchrun)
        epoch_tokens = all_sum(torch.stack([b.resp_mask[mb].sum() for mb in mbs])).clamp(min=1)
        for mb, n_tokens in zip(mbs, epoch_tokens):
            acc = {}
            # every process has a micro-batch in every minibatch (check_rl_config), so the gradient sum starts
            # during the last one's backward
            for micro in accumulate(mb.split(cfg.micro_batch_size), optimizer):
                ids, mask, m = b.ids[micro], b.mask[micro], b.resp_mask[micro]
                vs = {}
                if critic is not None:
                    with ctx:
                        values = critic.values(ids, mask)[:, -b.R - 1:-1].float()  # state before token t
                        vloss, vs = clipped_value_loss(values, b.old_values[micro], b.returns[micro], m,
                                                       cfg.cliprange_value, n_tokens)
                    vs["loss/value"] = vloss.detach() * n_tokens
                    if cfg.critic == "separate":  # its backward first: its activations go before the policy's forward
                        (cfg.vf_coef * vloss).backward()
                with ctx:
                    logp, entropy = response_logprobs(policy, ids, mask, b.R, cfg.temperature, with_entropy=True)
                    loss, s = clipped_policy_loss(logp, b.logp[micro], b.advantages[micro], m, cfg.cliprange,
                                                  n_tokens)
                    s.update({"policy/entropy": entropy.detach().sum(), "loss/policy": loss.detach() * n_tokens}, **vs)
                    if critic is not None and cfg.critic == "shared":  # one backward through the shared trunk:
                        loss = loss + cfg.vf_coef * vloss  # GradSum sums a gradient once it is complete
                    if kl_loss_coef > 0:  # GRPO: KL to the reference in the loss (DeepSeekMath eq. 3)
                        kl = kl_estimate(logp, b.ref_logp[micro], cfg.kl_estimator)
                        loss = loss + kl_loss_coef * torch.where(m.bool(), kl, 0.0).sum() / n_tokens
                loss.backward()
                acc = {key: acc.get(key, 0) + v.float() for key, v in s.items()}  # sums stay on the device
            norms.append(optimizer_step(trainable, optimizer, cfg, step, clock, check=False)[1])
            sums.append(torch.stack(list(acc.values())).double())
            counts.append(n_tokens)
    check_finite(step, grad_norm=torch.stack(norms).sum())
    means = (all_sum(torch.stack(sums)) / torch.stack(counts)[:, None]).tolist()
    return [dict(zip(acc, m)) for m in means]


# ----------------------------------------------------------------------------------------------------------------
# stages ppo, rloo, grpo: one loop

def check_rl_config(cfg, algo):
    k = getattr(cfg, "k", 1)
    if not cfg.prompts:
        raise ConfigError("--prompts is required: a file of prompts")
    if cfg.batch_size % k:
        raise ConfigError(f"--batch_size={cfg.batch_size} is not a multiple of --k={k}")
    if cfg.minibatch_size > cfg.batch_size:
        raise ConfigError(f"--minibatch_size={cfg.minibatch_size} exceeds --batch_size={cfg.batch_size}")
    if world() > 1 and (cfg.batch_size // k // world()) * k < math.ceil(cfg.batch_size / cfg.minibatch_size):
        raise ConfigError(f"--batch_size={cfg.batch_size} over {world()} processes: each needs at least one prompt "
                          f"(x k) and one response per minibatch; raise --batch_size or --minibatch_size")
    if algo == "grpo" and cfg.whiten_rewards:
        raise ConfigError("--whiten_rewards: GRPO normalises its rewards per group already")
    return k


def train_rl(cfg, algo):
    """The loop of ppo, rloo and grpo; `algo` changes phase 4 (advantages) and the terms of phase 5's loss."""
    k = check_rl_config(cfg, algo)
    run = Run(cfg, algo)
    device, ctx = setup_device(cfg)
    # models: the policy, its frozen reference, the reward, PPO's critic (dropout off and eval mode in all: N+)
    policy, _ = load_policy(cfg.init_from, device, compile=cfg.compile)
    ref = load_policy(cfg.ref or cfg.init_from, device, frozen_dtype(cfg), cfg.compile)[0].requires_grad_(False)
    reward_fn = make_reward(cfg.reward, device, cfg.reward_weights, cfg.reward_combine, cfg.unsafe_prompts,
                            cfg.micro_batch_size, frozen_dtype(cfg))
    room = policy.config.block_size - cfg.max_new_tokens
    prompts = load_prompts(cfg.prompts, cfg.max_prompts or None, room)
    eval_prompts = load_prompts(cfg.eval_prompts, cfg.eval_iters * cfg.batch_size, room) if cfg.eval_prompts else []
    critic = make_critic(cfg, policy, device) if algo == "ppo" else None
    if cfg.compile and isinstance(critic, RewardModel):
        critic.gpt.compile_hidden()
    optimizer = make_optimizer(nn.ModuleDict(dict(policy=policy, **({"critic": critic} if critic else {}))), cfg,
                               device)
    kl_ctl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    start, metrics = run.restore(policy, optimizer), {}
    if run.ckpt is not None:  # this stage's own state
        if critic is not None:
            critic.load_state_dict(run.ckpt["critic"])
        kl_ctl.load_state_dict(run.ckpt["kl_ctl"])
        metrics = run.ckpt["metrics"]
    n_prompts, n_mb = cfg.batch_size // k, math.ceil(cfg.batch_size / cfg.minibatch_size)
    print(f"{algo}: {plural(cfg.max_iters, 'step')} of {cfg.batch_size} responses ({n_prompts} prompts x {k}), "
          f"{cfg.num_epochs} epochs x {n_mb} minibatches of {cfg.minibatch_size} (micro-batches of "
          f"{min(cfg.micro_batch_size, cfg.minibatch_size)}); {plural(len(prompts), 'prompt')}; policy "
          f"{policy.num_params() / 1e6:.2f}M parameters on {device} ({cfg.dtype}){world_note(cfg)}")

    def save():
        run.save(done, policy, optimizer, critic=critic.state_dict() if critic is not None else None,
                 kl_ctl=kl_ctl.state_dict(), metrics=metrics)

    def evaluate():
        result = evaluate_policy(policy, ref, eval_prompts, reward_fn, device, ctx, cfg.max_new_tokens,
                                 cfg.batch_size, 1.0, derived_seed(cfg.seed, 0, EVAL))
        shown = result["samples"][:8]
        run.log_samples(done, [x["prompt"] for x in shown], [x["response"] for x in shown], [x["score"] for x in shown])
        return result

    final_eval, warned, done = None, False, start
    eval_prompts = eval_prompts if is_main() else []  # under torchrun rank 0 alone evaluates, prints and writes
    if eval_prompts and start == 0:
        run.log(0, **{f"eval/{key}": v for key, v in evaluate().items() if key != "samples"})
    for step in run.steps(start):
        clock = Clock(device)
        # 1. rollout: k samples of each of the step's prompts, log-probs of policy and reference, scores
        #    (under torchrun: this process's share of the prompts, all k samples of each, from its own stream)
        batch_prompts = [prompts[i] for i in my_share(epoch_indices(len(prompts), step, n_prompts, cfg.seed))
                         for _ in range(k)]
        g = torch.Generator(device=device).manual_seed(rank_seed(cfg.seed, step, SAMPLING))
        b = rollout(policy, ref, batch_prompts, reward_fn, cfg.max_new_tokens, cfg.temperature, g, device, ctx,
                    cfg.micro_batch_size, clock)
        # 2. the no-EOS rule; Llama 2 whitens its combined score per batch (Touvron et al. 2023, eq. 4)
        scores = whiten(b.scores, torch.ones_like(b.scores)) if cfg.reward_combine == "llama2" else b.scores
        scores = apply_no_eos_rule(scores, b.no_eos, cfg.no_eos_rule, cfg.no_eos_score)
        check_finite(step, scores=global_mean(scores))
        if cfg.no_eos_rule == "replace" and not warned and b.no_eos.float().mean() > 0.5:
            warned = True
            tqdm.write(f"warning: {int(b.no_eos.sum())} of {len(b.no_eos)} responses have no EOS within "
                       f"--max_new_tokens={cfg.max_new_tokens}, and each scores --no_eos_score={cfg.no_eos_score}; "
                       f"for fixed-length continuations use --no_eos_rule=keep", file=sys.stderr)
        # 3. per-token KL to the reference; logged as k1 summed over tokens, mean over sequences (N+)
        kl = torch.where(b.resp_mask.bool(), kl_estimate(b.logp, b.ref_logp, cfg.kl_estimator), 0.0)  # (B, R)
        kl_seq, beta = (b.logp - b.ref_logp).sum(1), kl_ctl.value  # (B,)
        # 4. advantages
        non_score = set_advantages(algo, cfg, b, scores, kl, beta, critic, ctx)
        clock.lap("advantages")
        # 5. update
        stats = update(cfg, policy, critic, optimizer, b, step, ctx, beta if algo == "grpo" else 0.0, clock)
        clock.lap("update")
        # 6. adaptive KL coefficient (on the k1 KL of the batch); every mean over all processes' samples, in one
        #    exchange (global_means)
        means = global_means(scores=b.scores, kl=kl_seq, entropy=b.entropy.sum(1), non_score=non_score,
                             rlhf=scores + non_score, length=b.resp_mask.sum(1), no_eos=b.no_eos.float())
        kl_ctl.update(means["kl"], cfg.batch_size)
        done = step + 1
        ratios = torch.tensor([s["val/ratio"] for s in stats])
        metrics = {"objective/scores": means["scores"],  # the reward's own, before the rule and whitening
                   "objective/kl": means["kl"], "objective/entropy": means["entropy"],
                   "objective/non_score_reward": means["non_score"],
                   "objective/rlhf_reward": means["rlhf"], "objective/kl_coef": beta,
                   **{key: sum(s[key] for s in stats) / len(stats) for key in stats[0]},
                   "val/ratio_var": ratios.var(correction=0).item(),
                   "val/num_eos_missing": round(means["no_eos"] * cfg.batch_size),
                   "response_length": means["length"], "lr": optimizer.param_groups[0]["lr"],
                   "episodes": done * cfg.batch_size}
        if critic is not None:  # how well the values at rollout time predicted the returns
            metrics["val/explained_variance"] = explained_variance(b.old_values, b.returns, b.resp_mask).item()
        clock.lap("metrics")
        # 7. log, evaluate, checkpoint
        if run.log_due(done):
            evaluating = run.eval_due(done) and is_main()
            if evaluating:
                for p, r, s in list(zip(b.prompts, b.responses, b.scores.tolist()))[:2]:
                    tqdm.write(f"[step {done}] score {s:+.3f} | {shorten(p)!r} -> {shorten(r)!r}")
                final_eval = evaluate() if eval_prompts else None
            run.log(done, **metrics, **{f"time/{phase}_s": v for phase, v in clock.laps.items()},
                    **{"time/step_s": sum(clock.laps.values())},
                    **({f"eval/{key}": v for key, v in final_eval.items() if key != "samples"}
                       if evaluating and final_eval else {}))
        if run.end_step(done, save):
            return 130
    if start >= cfg.max_iters and run.ckpt is None:  # --max_iters=0: the start policy as this stage's checkpoint
        save()
    final = dict(metrics, step=cfg.max_iters)
    if eval_prompts:  # the last step's evaluation (or, resumed after it, the same one again)
        final_eval = final_eval or evaluate()
        final.update({f"eval/{key}": v for key, v in final_eval.items() if key != "samples"})
        write_jsonl(run.path("samples.jsonl"), final_eval["samples"])
    run.summary(**final)
    print(f"done: objective/scores {final.get('objective/scores', float('nan')):.4f}, objective/kl "
          f"{final.get('objective/kl', float('nan')):.4f}; checkpoint {run.ckpt_path}")
    return 0

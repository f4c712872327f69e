"""
Reinforcement learning from a reward: PPO (Schulman et al. 2017) with GAE, a critic and a KL penalty against a frozen
reference policy; the critic-free RLOO (Ahmadian et al. 2024) and GRPO (Shao et al. 2024); best-of-N sampling and
rejection-sampling fine-tuning (Llama 2, Touvron et al. 2023). Four stages of train.py:

    python train.py ppo  --init_from=out/sft/ckpt.pt --reward=out/reward/ckpt.pt --prompts=prompts.jsonl
    python train.py rloo --init_from=out/sft/ckpt.pt --reward=my_reward.py:score --prompts=prompts.txt --k=4
    python train.py grpo --init_from=out/sft/ckpt.pt --reward=my_reward.py:score --prompts=prompts.txt --k=8
    python train.py bon  --init_from=out/sft/ckpt.pt --reward=out/reward/ckpt.pt --prompts=prompts.txt --n=16 \\
        [--finetune]                           # best-of-N; with --finetune, SFT on the kept responses

PPO, RLOO and GRPO are one loop (train_rl) with numbered phases, following RLHF_NOTES.md 9-21 and 27-28:
  1. rollout: batched KV-cache sampling at temperature T; log-probs of the policy and of the frozen reference at
     the same T; the reward scores prompt + response text          (sample, rollout: shared by all, and by bon)
  2. (optional score whitening, then) the no-EOS rule: a response cut at --max_new_tokens gets the score
     --no_eos_score (N+ details #11; --no_eos_rule=keep turns it off, as fixed-length IMDb continuations need)
  3. per-token KL, k1 or k3, against the reference
  4. advantages: PPO: reward -beta*KL per token + the score on the last real token, GAE, whitened;
     RLOO: score - beta*KL(sequence) minus the mean of the other k - 1; GRPO: group-normalised score
  5. update: epochs of shuffled minibatches (gradient accumulation over micro-batches) of the clipped policy loss,
     + the clipped value loss (PPO), + beta * k3 KL in the loss (GRPO)
  6. adaptive KL coefficient (OpenAI), log, checkpoint
Rewards (make_reward): a reward-model checkpoint, a user's function FILE.py:FUNCTION(prompts, responses) -> floats,
or several: a weighted sum, or Llama 2's safety/helpfulness rule (a prompt is flagged unsafe by listing it in
--unsafe_prompts; WHITEN is done per batch in the loop). evaluate_policy() is the evaluation the pipeline reuses:
mean reward and KL(policy || reference) of one sample per prompt at temperature 1.

Simplifications, on purpose:
- The reward reads text: responses are decoded and the reward re-tokenises them (reward.score_texts), so a reward
  model and a Python function plug in the same way. The round trip can change the tokenisation of odd strings.
- The whole rollout batch is sampled in one generate() call; forward passes without gradient run in micro-batches.
- One optimizer (and one gradient-norm clip) over policy and critic together, as N+'s PolicyAndValueWrapper. The
  learning rate follows train.lr_at (warm-up, cosine to --min_lr) per rollout step.
- --critic=shared runs the policy trunk twice per micro-batch (once inside model.response_logprobs, which owns the
  log-prob computation, once for the value head).
- Score whitening is off unless asked for (N+, TRL); no reward clipping, no value-head warm-up, no entropy bonus.
- RLOO and GRPO reuse PPO's clipped surrogate; with --num_epochs=1 and --minibatch_size=--batch_size the ratio is 1
  and they are plain REINFORCE with their baselines. Their losses, like PPO's, average over the real response tokens
  of a minibatch (not per sequence first, as DeepSeekMath's GRPO).
- Best-of-N draws its N samples independently (no deduplication); a tie keeps the first.
"""
import importlib.util
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm import tqdm

from data import EOS, derived_seed, epoch_indices, decode, encode_prompt, layout_batch, load_prompts, pad_batch, tokenize_pair
from model import ScalarHead, last_real_index, response_logprobs
from reward import RewardModel, load_reward_model, score_texts
from train import (ConfigError, OptimConfig, Run, RunConfig, check_finite, load_policy, lr_at, make_optimizer, opt,
                   optimizer_step, sample_responses, setup_device)

SAMPLING, SHUFFLE, PROMPT_ORDER, EVAL = range(4)  # the random streams of a step


def step_seed(seed, step, stream):
    """Seed of one random stream of one step: a function of (seed, step) alone, so a resumed run draws the same."""
    return derived_seed(seed, step, stream)


# ----------------------------------------------------------------------------------------------------------------
# configuration

@dataclass
class RewardSpec:
    """Keys of every stage that needs a reward."""
    reward: str = opt("", "reward: a reward-model checkpoint, FILE.py:FUNCTION (prompts, responses -> one float per "
                          "response), or several of these, comma-separated (required)")
    reward_weights: str = opt("", "weights of several rewards, comma-separated: their weighted sum (default: all 1)")
    reward_combine: str = opt("sum", "several rewards: sum (weighted), or llama2 (two: helpfulness, then safety; "
                                     "the safety score where sigmoid(safety) < 0.15 or the prompt is flagged unsafe)")
    unsafe_prompts: str = opt("", "llama2: a prompts file (any data.load_prompts format); its prompts are flagged "
                                  "unsafe (exact text match)")


@dataclass
class RLConfig(RewardSpec, RunConfig, OptimConfig):
    """Keys shared by ppo, rloo and grpo."""
    init_from: str = opt("out/sft/ckpt.pt", "policy checkpoint to start from (sft, dpo, ...)")
    ref: str = opt("", "frozen reference policy of the KL penalty (default: --init_from)")
    prompts: str = opt("", "training prompts: .txt lines or JSONL in any data.load_prompts format (required)")
    max_prompts: int = opt(0, "read at most this many prompts (0: all)", min=0)
    eval_prompts: str = opt("", "evaluation prompts (default: no evaluation); one sample each at temperature 1")
    max_new_tokens: int = opt(48, "tokens sampled per response", min=1)
    temperature: float = opt(0.7, "sampling temperature, also used in every log-prob (N+ #9)", min=0.01)
    batch_size: int = opt(64, "responses sampled per step (rloo, grpo: prompts x k)", min=1)
    minibatch_size: int = opt(16, "responses per optimizer step; the last minibatch of an epoch may be smaller",
                              min=1)
    micro_batch_size: int = opt(16, "responses per forward/backward pass (gradient accumulation)", min=1)
    num_epochs: int = opt(4, "passes over each rollout batch (N+ #17)", min=1)
    cliprange: float = opt(0.2, "PPO ratio clipping epsilon", min=0.0)
    kl_coef: float = opt(0.05, "beta: KL penalty coefficient (its start when --kl_target > 0)", min=0.0)
    kl_estimator: str = opt("k1", "per-token KL estimator: k1 (log-ratio) or k3 ((r - 1) - log r, >= 0)")
    kl_target: float = opt(0.0, "adaptive KL coefficient (OpenAI): target KL in nats per sequence (0: fixed beta)",
                           min=0.0)
    kl_horizon: int = opt(10000, "adaptive KL coefficient: horizon in episodes", min=1)
    no_eos_rule: str = opt("replace", "responses without EOS: replace (their score becomes --no_eos_score, N+ #11) "
                                      "or keep")
    no_eos_score: float = opt(-1.0, "score of a response that did not end in EOS (with --no_eos_rule=replace)")
    whiten_scores: bool = opt(False, "whiten the scores over each batch (OpenAI; always on with reward_combine=llama2)")
    learning_rate: float = opt(1e-5, "peak learning rate (N+ #19)", min=0.0)
    warmup_iters: int = opt(0, "linear warm-up steps", min=0)
    max_iters: int = opt(100, "rollout steps", min=0)
    weight_decay: float = opt(0.0, "AdamW weight decay on matrices", min=0.0)
    beta2: float = opt(0.999, "Adam beta2", min=0.0)
    adam_eps: float = opt(1e-5, "Adam epsilon (N+ #19)", min=0.0)
    log_interval: int = opt(1, "steps between log lines", min=1)
    eval_interval: int = opt(20, "steps between evaluations (and printed samples)", min=1)
    eval_iters: int = opt(4, "evaluation: batches of --batch_size prompts from --eval_prompts", min=1)


@dataclass
class PPOConfig(RLConfig):
    out_dir: str = opt("out/ppo", "run folder")
    critic: str = opt("separate", "separate: a critic initialised from the reward model (from the policy's trunk "
                                  "with a zero head when the reward is a function); shared: a zero-initialised "
                                  "value head on the policy's trunk (OpenAI)")
    vf_coef: float = opt(0.1, "weight of the value loss (N+ #18)", min=0.0)
    cliprange_value: float = opt(0.2, "value clipping around the rollout's values", min=0.0)
    gamma: float = opt(1.0, "GAE discount", min=0.0)
    lam: float = opt(0.95, "GAE lambda", min=0.0)


@dataclass
class RLOOConfig(RLConfig):
    out_dir: str = opt("out/rloo", "run folder")
    k: int = opt(4, "samples per prompt", min=2)


@dataclass
class GRPOConfig(RLConfig):
    out_dir: str = opt("out/grpo", "run folder")
    k: int = opt(4, "samples per prompt (the group)", min=2)
    kl_coef: float = opt(0.04, "beta of the KL term in the loss (DeepSeekMath; 0: none)", min=0.0)
    kl_estimator: str = opt("k3", "estimator of the KL term in the loss: k3 (DeepSeekMath) or k1")


@dataclass
class BoNConfig(RewardSpec, RunConfig, OptimConfig):
    out_dir: str = opt("out/bon", "run folder: selected.jsonl, summary.json, and with --finetune ckpt.pt")
    init_from: str = opt("out/sft/ckpt.pt", "policy checkpoint to sample from (and to fine-tune)")
    prompts: str = opt("", "prompts: .txt lines or JSONL in any data.load_prompts format (required)")
    max_prompts: int = opt(0, "read at most this many prompts (0: all)", min=0)
    n: int = opt(8, "samples per prompt; the best one is kept", min=1)
    max_new_tokens: int = opt(48, "tokens sampled per response", min=1)
    temperature: float = opt(1.0, "sampling temperature", min=0.01)
    sample_batch_size: int = opt(64, "responses per generate() call", min=1)
    finetune: bool = opt(False, "rejection-sampling fine-tuning: SFT on the kept responses, save the policy")
    batch_size: int = opt(16, "--finetune: examples per optimizer step", min=1)
    learning_rate: float = opt(1e-5, "--finetune: peak learning rate", min=0.0)
    warmup_iters: int = opt(0, "--finetune: linear warm-up steps", min=0)
    max_iters: int = opt(100, "--finetune: optimizer steps", min=0)
    eval_interval: int = opt(50, "--finetune: steps between evaluations of the loss on 5% held-out kept responses",
                             min=1)
    eval_iters: int = opt(4, "--finetune: held-out batches per evaluation", min=1)


# ----------------------------------------------------------------------------------------------------------------
# rewards: one interface, fn(prompts: list[str], responses: list[str]) -> scores (B,)

def split_reward_spec(spec):
    parts = [s.strip() for s in spec.split(",") if s.strip()]
    if not parts:
        raise ConfigError("--reward is required: a reward checkpoint, FILE.py:FUNCTION, or several, comma-separated")
    return parts


def is_function_spec(spec):
    return ".py:" in spec


def load_function(spec):
    """FILE.py:FUNCTION -> the function, its file run as a fresh module."""
    path, _, name = spec.rpartition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"--reward={spec}: {path} is not a file")
    module_name = "reward_fn_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"--reward={spec}: {path} has no function {name!r}")
    return fn


def reward_component(spec, device, batch_size):
    """One reward, checked: its scores as a float32 tensor (B,) on device."""
    if is_function_spec(spec):
        fn = load_function(spec)
    else:
        model = load_reward_model(spec, device)
        fn = lambda prompts, responses: score_texts(model, prompts, responses, device, batch_size)

    def scores(prompts, responses):
        out = torch.as_tensor(fn(prompts, responses), dtype=torch.float32).flatten().to(device)
        if out.numel() != len(responses):
            raise ConfigError(f"--reward={spec}: returned {out.numel()} scores for {len(responses)} responses")
        if not torch.isfinite(out).all():
            raise ConfigError(f"--reward={spec}: returned a non-finite score")
        return out
    return scores


def llama2_reward(helpful, safety, unsafe, threshold=0.15):
    """Llama 2's combination (section 3.2.2; RLHF notes #31): the safety score R_s where the prompt is flagged unsafe
    or sigmoid(R_s) < 0.15, otherwise the helpfulness score R_h. Both are (normalised) logits, so LOGIT of the chosen
    sigmoid score is the chosen score itself; WHITEN is left to the training loop (--whiten_scores), so that a
    sample's reward does not depend on its batch and evaluation means keep their meaning.
    helpful, safety: (B,) float; unsafe: (B,) bool. Returns (B,)."""
    return torch.where(unsafe | (torch.sigmoid(safety) < threshold), safety, helpful)


def make_reward(spec, device, weights="", combine="sum", unsafe_prompts="", batch_size=64):
    """The reward of every stage: fn(prompts, responses) -> float32 tensor (B,) on device.

    spec: a reward checkpoint (scored by reward.score_texts: normalised, read at the last real token), FILE.py:FUNCTION
    (a user's function returning one float per response), or several of these, comma-separated, combined as the
    weighted sum with `weights` ("1,0.5"), or with combine="llama2" (helpfulness first, safety second; a prompt is
    flagged unsafe when it is in the `unsafe_prompts` file)."""
    parts = [reward_component(s, device, batch_size) for s in split_reward_spec(spec)]
    if combine == "llama2":
        if len(parts) != 2 or weights:
            raise ConfigError("--reward_combine=llama2 takes two rewards (helpfulness, safety) and no --reward_weights")
        unsafe = set(load_prompts(unsafe_prompts)) if unsafe_prompts else set()
        return lambda prompts, responses: llama2_reward(
            parts[0](prompts, responses), parts[1](prompts, responses),
            torch.tensor([p in unsafe for p in prompts], dtype=torch.bool, device=device))
    if combine != "sum":
        raise ConfigError(f"--reward_combine={combine}: expected sum or llama2")
    if unsafe_prompts:
        raise ConfigError("--unsafe_prompts is used only with --reward_combine=llama2")
    try:
        w = [float(x) for x in weights.split(",")] if weights else [1.0] * len(parts)
    except ValueError:
        raise ConfigError(f"--reward_weights={weights}: expected numbers, comma-separated") from None
    if len(w) != len(parts):
        raise ConfigError(f"--reward_weights={weights}: {len(w)} weights for {len(parts)} rewards")
    if w == [1.0]:
        return parts[0]
    return lambda prompts, responses: sum(wi * part(prompts, responses) for wi, part in zip(w, parts))


# ----------------------------------------------------------------------------------------------------------------
# phase 1: rollout (shared by ppo, rloo, grpo, bon and evaluation)

@dataclass
class Rollout:
    prompts: list  # B prompt strings
    responses: list  # B response strings (decoded, without EOS)
    ids: torch.Tensor  # (B, P + R) [left-padded prompt | right-padded response]
    mask: torch.Tensor  # (B, P + R) 1 on real tokens
    R: int  # response columns
    resp_mask: torch.Tensor  # (B, R) float, 1 on response tokens up to and including EOS
    no_eos: torch.Tensor  # (B,) bool: cut at max_new_tokens before emitting EOS
    logp: torch.Tensor = None  # (B, R) policy log-probs at the sampling temperature
    ref_logp: torch.Tensor = None  # (B, R) reference log-probs at the same temperature
    entropy: torch.Tensor = None  # (B, R) entropy of the policy's (tempered) next-token distribution
    scores: torch.Tensor = None  # (B,) the reward


def in_chunks(fn, ids, mask, size):
    """fn over rows of (ids, mask) in chunks of `size`, results concatenated (a tensor, or a tuple of tensors)."""
    outs = [fn(ids[i:i + size], mask[i:i + size]) for i in range(0, ids.size(0), size)]
    return tuple(torch.cat(o) for o in zip(*outs)) if isinstance(outs[0], tuple) else torch.cat(outs)


@torch.no_grad()
def rollout(policy, ref, prompts, reward_fn, max_new_tokens, temperature, generator, device, ctx, micro_batch_size):
    """Phase 1 of every algorithm: sample, log-probs of policy and reference at the sampling temperature (N+ #9),
    and the reward's score of prompt + response."""
    b = Rollout(**vars(sample_responses(policy, prompts, max_new_tokens, generator, device, ctx, temperature)))
    with ctx:
        b.logp, b.entropy = in_chunks(lambda i, m: response_logprobs(policy, i, m, b.R, temperature, True),
                                      b.ids, b.mask, micro_batch_size)
        b.ref_logp = in_chunks(lambda i, m: response_logprobs(ref, i, m, b.R, temperature), b.ids, b.mask,
                               micro_batch_size)
        b.scores = reward_fn(b.prompts, b.responses).float()
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
    mean = lambda xs: torch.cat(xs).mean().item()
    return dict(score=mean(scores), kl=mean(kls), entropy=mean(ents), length=mean(lens), no_eos=mean(no_eos),
                samples=samples)


# ----------------------------------------------------------------------------------------------------------------
# phases 2-4: the no-EOS rule, KL, advantages (pure functions of tensors)

def apply_no_eos_rule(scores, no_eos, rule="replace", no_eos_score=-1.0):
    """N+ details #11 (OpenAI): a response that never emitted EOS gets the fixed score `no_eos_score` instead of the
    reward's, which teaches the policy to finish. rule "keep" leaves every score as it is."""
    if rule == "keep":
        return scores
    if rule != "replace":
        raise ConfigError(f"--no_eos_rule={rule}: expected replace or keep")
    return torch.where(no_eos, torch.full_like(scores, no_eos_score), scores)


def kl_estimate(logp, ref_logp, estimator="k1"):
    """Per-token estimate of KL(policy || reference) from tokens sampled by the policy (Schulman 2020; notes #12).
    logr = logp - ref_logp. k1 = logr: unbiased, negative on some tokens. k3 = (exp(-logr) - 1) + logr: unbiased,
    never negative, lower variance. (B, T) -> (B, T)."""
    logr = logp - ref_logp
    if estimator == "k1":
        return logr
    if estimator == "k3":
        return torch.expm1(-logr) + logr
    raise ConfigError(f"--kl_estimator={estimator}: expected k1 or k3")


def per_token_rewards(scores, kl, mask, kl_coef):
    """N+ details #12: r_t = -beta * kl_t on every response token, plus the score on the LAST REAL token (never on
    the padding after EOS, TRL issue 3750). scores (B,), kl (B, T), mask (B, T) right-padded -> (B, T), 0 on padding."""
    rewards = torch.where(mask.bool(), -kl_coef * kl, 0.0)
    return rewards.scatter_add(1, last_real_index(mask)[:, None], scores[:, None].to(rewards.dtype))


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (Schulman et al. 2016), vectorised over the batch, looped over time.

    rewards, values, mask: (B, T); mask 1 on real tokens, right-padded. values[:, t] is the value of the state
    before token t. The value after a response's last token is 0 (N+ #15); padding carries nothing. Returns
    (advantages, returns), both (B, T) and 0 on padding; returns = advantages + values, before any whitening."""
    m = mask.bool()
    rewards, values = torch.where(m, rewards, 0.0), torch.where(m, values, 0.0)
    next_value, next_adv, advantages = torch.zeros_like(values[:, 0]), torch.zeros_like(values[:, 0]), []
    for t in reversed(range(values.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # TD error; padding gives 0 after the last token
        next_adv = delta + gamma * lam * next_adv
        advantages.append(next_adv)
        next_value = values[:, t]
    advantages = torch.where(m, torch.stack(advantages[::-1], 1), 0.0)
    return advantages, torch.where(m, advantages + values, 0.0)


def masked_mean(x, mask):
    return torch.where(mask.bool(), x, 0.0).sum() / mask.sum().clamp(min=1)


def masked_var(x, mask):
    """Unbiased variance of the real entries (N+ masked_var)."""
    n = mask.sum()
    var = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    return var * n / (n - 1).clamp(min=1)


def whiten(x, mask, eps=1e-8):
    """(x - mean) / std over the real entries; 0 elsewhere (N+ #15: advantages whitened over the response mask)."""
    return torch.where(mask.bool(), (x - masked_mean(x, mask)) * torch.rsqrt(masked_var(x, mask) + eps), 0.0)


def explained_variance(values, returns, mask):
    """1 - Var(returns - values) / Var(returns) over real tokens: 1 is a perfect critic, 0 a constant one; NaN
    (logged as null) when the returns do not vary, as CleanRL."""
    var_returns = masked_var(returns, mask)
    return torch.where(var_returns > 0, 1 - masked_var(returns - values, mask) / var_returns, float("nan"))


def rloo_advantages(rewards, k):
    """REINFORCE leave-one-out (notes #27): each sample's baseline is the mean reward of the other k - 1 samples of
    its prompt. rewards (B,), k consecutive samples per prompt -> (B,)."""
    r = rewards.view(-1, k)
    return (r - (r.sum(1, keepdim=True) - r) / (k - 1)).view(-1)


def grpo_advantages(rewards, k, eps=1e-4):
    """GRPO (notes #28): (r - group mean) / (group std + eps), std unbiased as DeepSeekMath / TRL. (B,) -> (B,)."""
    r = rewards.view(-1, k)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


class KLController:
    """The KL coefficient beta: fixed (target 0), or adapted as OpenAI (Ziegler et al. 2019; notes #13):
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


# ----------------------------------------------------------------------------------------------------------------
# phase 5: the update (pure losses, then the minibatch loop)

def clipped_policy_loss(logp, old_logp, advantages, mask, cliprange=0.2, n_tokens=None):
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7; notes #18), summed over real tokens / n_tokens.

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
        stats = {"policy/approxkl": 0.5 * logratio.pow(2).sum(),  # notes #20
                 "policy/clipfrac": ((pg2 > pg1) & m).sum(),
                 "val/ratio": torch.where(m, ratio, 0.0).sum()}
    return loss, stats


def clipped_value_loss(values, old_values, returns, mask, cliprange_value=0.2, n_tokens=None):
    """0.5 * max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2) summed over real tokens / n_tokens (notes #18).
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


def minibatches(batch_size, minibatch_size, generator):
    """A fresh shuffle of 0..B-1 cut into minibatches; the last is smaller when B does not divide (none dropped)."""
    return torch.randperm(batch_size, generator=generator).split(minibatch_size)


def update(cfg, policy, value_fn, trainable, optimizer, b, advantages, returns, old_values, kl_loss_coef, lr, step,
           generator, ctx):
    """Phase 5: cfg.num_epochs passes over rollout b in shuffled minibatches (N+ #17), one optimizer step each.
    value_fn(ids, mask) -> (B, T) (PPO's critic) adds the value loss; kl_loss_coef > 0 adds GRPO's KL term.
    Returns one dict of statistics per minibatch, in order (the first is the ratio-is-1 check, notes #21)."""
    stats = []
    for _ in range(cfg.num_epochs):
        for mb in minibatches(b.ids.size(0), cfg.minibatch_size, generator):
            mb = mb.to(b.ids.device)
            n_tokens = b.resp_mask[mb].sum().clamp(min=1)  # losses average over the minibatch's real tokens (#14)
            acc = {}
            for micro in mb.split(cfg.micro_batch_size):
                ids, mask, m = b.ids[micro], b.mask[micro], b.resp_mask[micro]
                with ctx:
                    logp, entropy = response_logprobs(policy, ids, mask, b.R, cfg.temperature, with_entropy=True)
                    loss, s = clipped_policy_loss(logp, b.logp[micro], advantages[micro], m, cfg.cliprange, n_tokens)
                    s["policy/entropy"] = entropy.detach().sum()
                    s["loss/policy"] = loss.detach() * n_tokens
                    if value_fn is not None:
                        values = value_fn(ids, mask)[:, -b.R - 1:-1].float()  # value of the state before token t
                        vloss, vs = clipped_value_loss(values, old_values[micro], returns[micro], m,
                                                       cfg.cliprange_value, n_tokens)
                        loss = loss + cfg.vf_coef * vloss
                        s.update(vs, **{"loss/value": vloss.detach() * n_tokens})
                    if kl_loss_coef > 0:  # GRPO: KL to the reference in the loss (DeepSeekMath eq. 3)
                        kl = kl_estimate(logp, b.ref_logp[micro], cfg.kl_estimator)
                        loss = loss + kl_loss_coef * torch.where(m.bool(), kl, 0.0).sum() / n_tokens
                check_finite(step, loss=loss.detach())
                loss.backward()
                acc = {key: acc.get(key, 0) + v.float() for key, v in s.items()}  # sums stay on the device
            optimizer_step(trainable, optimizer, lr, cfg.grad_clip, step)
            means = (torch.stack(list(acc.values())).double() / n_tokens).tolist()  # one host sync per minibatch
            stats.append(dict(zip(acc, means)))
    return stats


# ----------------------------------------------------------------------------------------------------------------
# stages ppo, rloo, grpo: one loop

def make_critic(cfg, policy, device):
    """PPO's value model (notes #16). Returns (value_fn(ids, mask) -> (B, T), the module to train beside the policy).

    separate (default, N+/TRL): a RewardModel initialised from the reward-model checkpoint (the first one, with
    several), or, when the reward is a Python function and there is no reward trunk to copy, from the policy's
    trunk with a zero-initialised head (its first values are 0). shared (OpenAI): a zero-initialised ScalarHead on
    the policy's own trunk."""
    first = split_reward_spec(cfg.reward)[0]
    if cfg.critic == "shared":
        head = ScalarHead(policy.config.n_embd).to(device)
        nn.init.zeros_(head.proj.weight)
        return (lambda ids, mask: head(policy.hidden(ids, mask))), head
    if cfg.critic != "separate":
        raise ConfigError(f"--critic={cfg.critic}: expected separate or shared")
    if not is_function_spec(first):
        critic = load_reward_model(first, device)
    else:
        critic = RewardModel(policy.config).to(device)
        critic.gpt.load_state_dict(policy.state_dict())
        nn.init.zeros_(critic.head.proj.weight)
    return critic.values, critic


def train_rl(cfg, algo):
    """The loop of ppo, rloo and grpo; `algo` changes phase 4 (advantages) and the terms of phase 5's loss."""
    run = Run(cfg, algo)
    device, ctx = setup_device(cfg)
    k = getattr(cfg, "k", 1)
    if cfg.compile:
        raise ConfigError("--compile: not supported by the RL stages")
    if not cfg.prompts:
        raise ConfigError("--prompts is required: a file of prompts")
    if cfg.batch_size % k:
        raise ConfigError(f"--batch_size={cfg.batch_size} is not a multiple of --k={k}")
    if cfg.minibatch_size > cfg.batch_size:
        raise ConfigError(f"--minibatch_size={cfg.minibatch_size} exceeds --batch_size={cfg.batch_size}")
    kl_estimate(torch.zeros(1), torch.zeros(1), cfg.kl_estimator)  # a bad name fails now, not after sampling
    apply_no_eos_rule(torch.zeros(1), torch.zeros(1, dtype=torch.bool), cfg.no_eos_rule)
    # models: the policy, its frozen reference, the reward, PPO's critic (dropout off in all: N+ #3)
    policy, _ = load_policy(cfg.init_from, device)
    ref, _ = load_policy(cfg.ref or cfg.init_from, device)
    ref.requires_grad_(False)
    reward_fn = make_reward(cfg.reward, device, cfg.reward_weights, cfg.reward_combine, cfg.unsafe_prompts,
                            cfg.micro_batch_size)
    prompts = load_prompts(cfg.prompts, cfg.max_prompts or None)
    eval_prompts = load_prompts(cfg.eval_prompts, cfg.eval_iters * cfg.batch_size) if cfg.eval_prompts else []
    value_fn, critic = make_critic(cfg, policy, device) if algo == "ppo" else (None, None)
    trainable = nn.ModuleDict(dict(policy=policy, **({"critic": critic} if critic is not None else {})))
    optimizer = make_optimizer(trainable, cfg, device)
    kl_ctl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    start, metrics = run.restore(policy, optimizer), {}
    if run.ckpt is not None:  # this stage's own state
        if critic is not None:
            critic.load_state_dict(run.ckpt["critic"])
        kl_ctl.load_state_dict(run.ckpt["kl_ctl"])
        metrics = run.ckpt["metrics"]
    n_prompts, n_mb = cfg.batch_size // k, math.ceil(cfg.batch_size / cfg.minibatch_size)
    print(f"{algo}: {cfg.max_iters} steps of {cfg.batch_size} responses ({n_prompts} prompts x {k}), "
          f"{cfg.num_epochs} epochs x {n_mb} minibatches of {cfg.minibatch_size} = {cfg.num_epochs * n_mb} optimizer "
          f"steps per step, micro-batches of {min(cfg.micro_batch_size, cfg.minibatch_size)}; {len(prompts):,} "
          f"prompts; policy {policy.num_params() / 1e6:.2f}M parameters on {device} ({cfg.dtype})")

    def save(step):
        run.save(step, policy, optimizer, critic=critic.state_dict() if critic is not None else None,
                 kl_ctl=kl_ctl.state_dict(), metrics=metrics)

    def evaluate(step):
        result = evaluate_policy(policy, ref, eval_prompts, reward_fn, device, ctx, cfg.max_new_tokens,
                                 cfg.batch_size, 1.0, step_seed(cfg.seed, 0, EVAL))
        run.log(step, **{f"eval/{key}": v for key, v in result.items() if key != "samples"})
        return result

    final_eval = None
    if eval_prompts and start == 0:
        evaluate(0)
    bar = tqdm(range(start, cfg.max_iters), desc=algo, initial=start, total=cfg.max_iters, dynamic_ncols=True,
               disable=None)
    for step in bar:
        t0 = time.time()
        # 1. rollout: k samples of each of the step's prompts, log-probs of policy and reference, scores
        batch_prompts = [prompts[i] for i in epoch_indices(len(prompts), step, n_prompts, cfg.seed) for _ in range(k)]
        g = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, step, SAMPLING))
        b = rollout(policy, ref, batch_prompts, reward_fn, cfg.max_new_tokens, cfg.temperature, g, device, ctx,
                    cfg.micro_batch_size)
        m = b.resp_mask
        scores = b.scores
        if cfg.whiten_scores or cfg.reward_combine == "llama2":  # OpenAI's reward whitening; Llama 2's WHITEN
            scores = whiten(scores, torch.ones_like(scores))
        # 2. the no-EOS rule (N+ #11)
        scores = apply_no_eos_rule(scores, b.no_eos, cfg.no_eos_rule, cfg.no_eos_score)
        check_finite(step, scores=scores.mean())
        # 3. per-token KL to the frozen reference; logged as k1 summed over tokens, mean over sequences (notes #20)
        kl = torch.where(m.bool(), kl_estimate(b.logp, b.ref_logp, cfg.kl_estimator), 0.0)  # (B, R)
        kl_seq = (b.logp - b.ref_logp).sum(1)  # (B,)
        beta = kl_ctl.value
        non_score = -beta * kl.sum(1) if algo != "grpo" else -beta * kl_seq  # grpo: the KL is in the loss instead
        # 4. advantages
        returns = old_values = None
        with torch.no_grad():
            if algo == "ppo":
                with ctx:
                    old_values = in_chunks(value_fn, b.ids, b.mask, cfg.micro_batch_size)[:, -b.R - 1:-1].float()
                old_values = torch.where(m.bool(), old_values, 0.0)  # (B, R)
                rewards = per_token_rewards(scores, kl, m, beta)
                advantages, returns = gae(rewards, old_values, m, cfg.gamma, cfg.lam)
                advantages = whiten(advantages, m)
            elif algo == "rloo":  # the KL folded into the sequence's reward (notes #27)
                advantages = rloo_advantages(scores + non_score, k)[:, None] * m
            else:
                advantages = grpo_advantages(scores, k)[:, None] * m
        # 5. update
        lr = lr_at(step, cfg)
        shuffle = torch.Generator().manual_seed(step_seed(cfg.seed, step, SHUFFLE))
        stats = update(cfg, policy, value_fn, trainable, optimizer, b, advantages, returns, old_values,
                       beta if algo == "grpo" else 0.0, lr, step, shuffle, ctx)
        # 6. adaptive KL coefficient (on the k1 KL of the batch), log, checkpoint
        kl_ctl.update(kl_seq.mean().item(), cfg.batch_size)
        done = step + 1
        ratios = torch.tensor([s["val/ratio"] for s in stats])
        metrics = {"objective/scores": scores.mean().item(), "objective/kl": kl_seq.mean().item(),
                   "objective/entropy": b.entropy.sum(1).mean().item(),
                   "objective/non_score_reward": non_score.mean().item(),
                   "objective/rlhf_reward": (scores + non_score).mean().item(), "objective/kl_coef": beta,
                   **{key: sum(s[key] for s in stats) / len(stats) for key in stats[0]},
                   "val/ratio_var": ratios.var(correction=0).item(), "val/num_eos_missing": int(b.no_eos.sum()),
                   "response_length": m.sum(1).mean().item(), "lr": lr, "episodes": done * cfg.batch_size}
        if algo == "ppo":
            metrics["val/explained_variance"] = explained_variance(old_values, returns, m).item()
        if done % cfg.log_interval == 0 or done == cfg.max_iters:
            run.log(done, **metrics, **{"time/step_s": time.time() - t0})
            bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
        if done % cfg.eval_interval == 0 or done == cfg.max_iters:
            for p, r, s in list(zip(b.prompts, b.responses, b.scores.tolist()))[:2]:
                tqdm.write(f"[step {done}] score {s:+.3f} | {p!r} -> {r!r}")
            if eval_prompts:
                final_eval = evaluate(done)
        if done % cfg.ckpt_interval == 0 or done == cfg.max_iters or run.stop_requested:
            save(done)
        if run.stop_requested:
            print(f"stopped at step {done}; continue with --resume --out_dir={cfg.out_dir}", file=sys.stderr)
            return 130
    if start >= cfg.max_iters and run.ckpt is None:  # --max_iters=0: the start policy as this stage's checkpoint
        save(0)
    final = dict(metrics, step=cfg.max_iters)
    if eval_prompts:  # the last step's evaluation (or, resumed after it, the same one again)
        final_eval = final_eval or evaluate_policy(policy, ref, eval_prompts, reward_fn, device, ctx,
                                                   cfg.max_new_tokens, cfg.batch_size, 1.0,
                                                   step_seed(cfg.seed, 0, EVAL))
        final.update({f"eval/{key}": v for key, v in final_eval.items() if key != "samples"})
        write_jsonl(os.path.join(run.dir, "samples.jsonl"), final_eval["samples"])
    run.summary(**final)
    print(f"done: objective/scores {final.get('objective/scores', float('nan')):.4f}, objective/kl "
          f"{final.get('objective/kl', float('nan')):.4f}; checkpoint {run.ckpt_path}")
    return 0


def train_ppo(cfg):
    return train_rl(cfg, "ppo")


def train_rloo(cfg):
    return train_rl(cfg, "rloo")


def train_grpo(cfg):
    return train_rl(cfg, "grpo")


# ----------------------------------------------------------------------------------------------------------------
# stage bon: best-of-N, and rejection-sampling fine-tuning

def select_best(scores, n):
    """Index of each prompt's best sample: scores (P * N,), N consecutive samples per prompt -> (P,) (first on a tie)."""
    r = scores.view(-1, n)
    return r.argmax(1) + torch.arange(r.size(0), device=scores.device) * n


def best_of_n_kl(n):
    """KL(best-of-N || policy) = log N - (N - 1) / N, for a reward with no ties (notes #29)."""
    return math.log(n) - (n - 1) / n


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def best_of_n(cfg):
    run = Run(cfg, "bon")
    device, ctx = setup_device(cfg)
    if not cfg.prompts:
        raise ConfigError("--prompts is required: a file of prompts")
    if run.ckpt is not None and not cfg.finetune:
        raise ConfigError("--resume: only a --finetune run has anything to resume")
    policy, _ = load_policy(cfg.init_from, device)
    reward_fn = make_reward(cfg.reward, device, cfg.reward_weights, cfg.reward_combine, cfg.unsafe_prompts,
                            cfg.sample_batch_size)
    prompts = load_prompts(cfg.prompts, cfg.max_prompts or None)
    # 1. N samples per prompt, scored; keep each prompt's best (notes #29-30). The samples depend on the seed alone,
    # so a resumed --finetune run selects the same ones again.
    g = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, 0, SAMPLING))
    per_call = max(1, cfg.sample_batch_size // cfg.n)
    selected, all_scores = [], []
    for i in tqdm(range(0, len(prompts), per_call), desc=f"best-of-{cfg.n}", disable=None, leave=False):
        b = sample_responses(policy, [p for p in prompts[i:i + per_call] for _ in range(cfg.n)], cfg.max_new_tokens,
                             g, device, ctx, cfg.temperature)
        with ctx:
            scores = reward_fn(b.prompts, b.responses).float()
        selected += [dict(prompt=b.prompts[j], response=b.responses[j], score=scores[j].item())
                     for j in select_best(scores, cfg.n).tolist()]
        all_scores.append(scores)
    write_jsonl(os.path.join(run.dir, "selected.jsonl"), selected)
    all_scores = torch.cat(all_scores)
    summary = {"score/best": sum(r["score"] for r in selected) / len(selected), "score/all": all_scores.mean().item(),
               "kl/analytic": best_of_n_kl(cfg.n), "n": cfg.n, "prompts": len(prompts)}
    print(f"best-of-{cfg.n} on {len(prompts)} prompts: mean score of the best {summary['score/best']:.4f}, of all "
          f"{summary['score/all']:.4f}; KL(best-of-N || policy) = {summary['kl/analytic']:.4f} nats")
    run.summary(**summary)
    return 0

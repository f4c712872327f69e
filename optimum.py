"""
A benchmark with a known answer: PPO, RLOO, GRPO, DPO, online DPO, IPO and best-of-N against the exact optimum of
the KL-regularised objective they all aim at. Stage `optimum` of train.py:

    python train.py optimum --method=ppo --beta=1          # or rloo, grpo, dpo, online_dpo, ipo, bon (--n=16)
    python train.py optimum --method=online_dpo --labels=max   # the higher reward of each pair chosen, as on IMDb
    python train.py optimum --method=online_dpo --labels=max --pairs=mixed   # one response of each pair from pi_ref
    python train.py optimum --method=rloo --beta=0.5 --reward=my_reward.py:score
    python train.py optimum --method=ppo --max_new_tokens=4   # a few tokens: the optimum estimated, not exact
    python optimum.py figure out/optimum-ppo-1 out/optimum-dpo-1 ... --out=assets/optimum.png

The objective of every method here is  J(pi) = E_pi[r] - beta * KL(pi || pi_ref),  and its maximiser is known in
closed form (e.g. Rafailov et al. 2023, eq. 4):

    pi*(y) = pi_ref(y) exp(r(y) / beta) / Z,    J(pi*) = beta * log Z,    beta * log Z - J(pi) = beta * KL(pi || pi*)

DPO, with pairs drawn from pi_ref and Bradley-Terry labels P(y1 > y2) = sigmoid(r(y1) - r(y2)), has the same
population optimum. IPO (Azar et al. 2023, section 5) does not: with pairs from mu = pi_ref its loss is minimised by
    pi_ipo(y) = pi_ref(y) exp(p(y > pi_ref) / tau) / Z,    p(y > pi_ref) = E_{y' ~ pi_ref} sigmoid(r(y) - r(y')),
the KL-regularised optimum of the bounded reward "probability of beating a reference sample" (tau = --beta); the
stage measures --method=ipo against pi_ipo and reports how far pi_ipo is from pi*. Online DPO (Guo et al. 2024) draws
its pairs from the policy itself; with Bradley-Terry labels its loss has the same minimiser pi* (any pair
distribution that covers the vocabulary does). With --labels=max (the pair's higher reward chosen, a tie teaching
nothing: the labels of the IMDb benchmark) DPO's loss has no finite minimiser and beta bounds no KL; the frontier
metric below still says how well a method spends its KL. Best-of-N (one token) has the
known distribution  pi_bon(y) = pi_ref(y) / pi_ref(tie(y)) * (F(r(y))^N - F(r(y)-)^N), F the reference CDF of r.

The task: one prompt (--prompt), the project's GPT (--init_from, by default the committed assets/sft-imdb-cpu.pt,
which is also the frozen reference), and a reward for every response: by default optimum.py:token_score, a fixed
N(0, 1) score per token (seed 0) averaged over the response's tokens, or any --reward that the RL stages accept.
- One-token responses (--max_new_tokens=1): pi_ref, pi* and pi_theta are exact vectors over GPT-2's 50,257 tokens
  (one forward pass each, float64). Every --log_interval steps metrics.jsonl gets kl_to_optimum = KL(pi_theta ||
  pi*), objective_gap = beta log Z - J(pi_theta), tv_to_optimum, kl_to_ref, reward (all exact), and frontier_gap:
  the most reward any policy gets at pi_theta's KL to pi_ref (the tilt pi_ref exp(r / b) / Z whose KL is that one,
  b found by bisection) minus pi_theta's reward, the distance to the optimal frontier whatever the beta.
- A few tokens: J(pi_theta) estimated from --eval_samples samples (ppo.evaluate_policy) beside beta log Z estimated
  from --ref_samples samples of pi_ref by log-mean-exp, each with its standard error (delta method), every
  --eval_interval steps; kl_to_optimum is then objective_gap / beta, an estimate.

The training steps are the project's own code, so a change to a line of PPO shows here: ppo.rollout, kl_estimate,
advantages (GAE and the critic, rloo_advantages, grpo_advantages), update (clipped_policy_loss, GRPO's KL term),
select_best; dpo.preference_loss on pairs sampled afresh from pi_ref every step; runtime.optimizer_step.

What limits each method (one-token task, defaults, beta 1: KL(pi_ref || pi*) = 0.527 nats at the start; CPU runs
of 2026-11-30, the README's "A benchmark with a known answer" has the table at two betas):
- PPO and RLOO put the k1 KL in the reward; their expected gradient is the objective's, so pi* is their fixed
  point. What is left after 100 steps (0.107 and 0.106 nats, TV 0.13; 0.40 and 0.47 at beta 0.5, from 2.06) is
  optimisation over 50,257 logits of which a batch samples 64, with the learning rate decayed to 0 (cosine). With
  --kl_estimator=k3 in the reward PPO is biased (its expected penalty gradient is that of KL(pi || pi_ref) -
  KL(pi_ref || pi)): 2.10 nats from pi* after 100 steps, further than pi_ref itself.
- GRPO (0.200 nats) has two biases. Its k3 term sits in the loss, outside the importance ratio, so its expected
  gradient is that of beta * KL(pi_ref || pi), the reverse KL, which hardly penalises mass piled where pi_ref has
  none; and dividing by the group's std makes beta relative to std(r). Where its expected update vanishes,
  pi_G(y) = beta pi_ref(y) / (lam - c r(y)), c about (1 - 1/k) / std_pi(r) (grpo_fixed_point()): 2.96 nats from
  pi* (`grpo_fixed_point_kl`), with 32% of its mass on the single best-scoring token (" Asylum", r = 4.56,
  pi_ref 5e-7, pi* 3e-5); the k3 term alone, without the std (`k3_fixed_point_kl`), 7.6 nats. Sampling finds that
  token only by luck, so 100 steps stay near pi* but stop improving at about 0.2 (0.83 at beta 0.5) while PPO and
  RLOO go on. A k1 term in the loss (--kl_estimator=k1) has an expected gradient of zero, no regularisation at all:
  1.97 nats from pi* after 100 steps, 3.7 from pi_ref.
- DPO (0.162 nats; 0.86 at beta 0.5) learns only from pairs that pi_ref samples, and a pair moves the policy by
  sigmoid(-beta h) of its margin: slower than the RL methods in steps, same fixed point. Online DPO, its pairs from
  the policy, ends alike (0.167-0.179 nats against DPO's 0.151-0.156, seeds 1-3, 2026-12-08).
- With --labels=max (the higher reward chosen, as on IMDb) neither DPO has a fixed point: online DPO runs to 3.1-5.7
  nats from pi_ref in 100 steps at lr 3e-4. At equal KL it is further from the optimal frontier than offline DPO:
  frontier_gap on each run's hull at 0.5 nats 0.458 +- 0.018 against 0.296 +- 0.010 (8 seeds, lr 3e-4, 10 warm-up
  steps; the optimum gains 1.03 there); a third of the rate narrows it, and pairs of one policy sample and one
  pi_ref sample (--pairs=mixed) close it (0.326 +- 0.015). RESULTS.md has the table.
- IPO converges to its own optimum pi_ipo (0.008 nats from it after 100 steps), which is 0.36 nats from pi* at
  tau = 1 (1.39 at 0.5) and only 0.017 from pi_ref: its reward p(y > pi_ref) lies in [0, 1], so the same tau
  regularises far more than DPO's beta.
- Best-of-N is one distribution per N: closest to pi* at N = 4 for beta 1 (0.102 nats, better than 100 steps of
  any method) and N = 16 for beta 0.5 (0.20), further for every other N (1.29 at N = 64, beta 1). Its KL to
  pi_ref (0.64 at N = 4) is exact; Beirami et al.'s log N - (N - 1)/N bounds it.

Simplifications, on purpose:
- One prompt, temperature --temperature in every log-prob (pi_ref, pi* are those of the tempered reference).
- No no-EOS rule: every response, EOS or not, is scored by the reward as it is (an empty response is "").
- The exact metrics need one-token responses; best-of-N is one-token only, and IPO's p(y > pi_ref) is estimated
  from the --ref_samples reference samples when responses are longer.
- DPO and IPO see fresh pairs every step (the population, not a fixed data set); no reference-log-prob cache.
"""
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

import dpo
import ppo
from checkpoint import load_policy
from config import ConfigError, OptimConfig, TrainConfig, opt
from data import decode, derived_seed, encode, encode_prompt
from model import N_REAL_TOKENS, Samples, response_logprobs, sample_responses
from reward import RewardSpec, make_critic, make_reward
from report import pyplot
from runtime import Run, check_finite, make_optimizer, optimizer_step, setup_device
from sft import best_of_n_kl_bound, best_of_n_probs, select_best

METHODS = ("ppo", "rloo", "grpo", "dpo", "online_dpo", "ipo", "bon")
PREFERENCE = ("dpo", "online_dpo", "ipo")


# ----------------------------------------------------------------------------------------------------------------
# configuration

@dataclass
class OptimumConfig(RewardSpec, TrainConfig, OptimConfig):
    out_dir: str = opt("out/optimum", "run folder")
    method: str = opt("ppo", "ppo, rloo, grpo, dpo, online_dpo, ipo or bon", choices=METHODS)
    beta: float = opt(1.0, "beta of E[r] - beta * KL(pi || pi_ref): the KL coefficient of ppo/rloo/grpo, DPO's "
                           "beta, IPO's tau", above=0.0)
    init_from: str = opt("assets/sft-imdb-cpu.pt", "policy checkpoint; a frozen copy is the reference pi_ref")
    prompt: str = opt("This movie was", "the one prompt")
    reward: str = opt("optimum.py:token_score", "reward: FILE.py:FUNCTION, a reward-model checkpoint, or several "
                                                "(as ppo); default: a fixed N(0, 1) score per token (seed 0)")
    max_new_tokens: int = opt(1, "tokens per response: 1 gives exact metrics, more estimated ones", min=1)
    temperature: float = opt(1.0, "sampling temperature, in every log-prob too", min=0.01)
    batch_size: int = opt(64, "responses per step (dpo, online_dpo, ipo: pairs per step)", min=1)
    labels: str = opt("bt", "dpo, online_dpo, ipo: bt (a Bradley-Terry draw on r) or max (the higher r chosen, a tie "
                            "teaching nothing)", choices=("bt", "max"))
    pairs: str = opt("", "dpo, online_dpo, ipo: where a pair's two responses come from: ref, policy, or mixed (one of "
                         "each; one token only); default: policy for online_dpo, ref otherwise",
                     choices=("", "ref", "policy", "mixed"))
    minibatch_size: int = opt(64, "responses per optimizer step (ppo, rloo, grpo)", min=1)
    micro_batch_size: int = opt(64, "responses per forward/backward pass", min=1)
    num_epochs: int = opt(1, "passes over each rollout batch (ppo, rloo, grpo)", min=1)
    k: int = opt(4, "rloo, grpo: samples per prompt (group)", min=2)
    n: int = opt(64, "bon: the largest N (N = 1, 2, 4, ... up to it are reported)", min=1)
    cliprange: float = opt(0.2, "PPO ratio clipping epsilon", min=0.0)
    kl_estimator: str = opt("", "k1 or k3 (default: k1 for ppo and rloo, in the reward; k3 for grpo, in the loss)")
    whiten_rewards: bool = opt(False, "ppo, rloo: whiten the rewards over the batch, mean kept (N+)")
    critic: str = opt("separate", "ppo: separate (on the reward model's or policy's trunk) or shared (value head)",
                      choices=("separate", "shared"))
    critic_init: str = opt("zero", "ppo: the value head's start, zero or reward (from a reward checkpoint)",
                           choices=("zero", "reward"))
    vf_coef: float = opt(0.1, "ppo: weight of the value loss", min=0.0)
    cliprange_value: float = opt(0.2, "ppo: value clipping", min=0.0)
    gamma: float = opt(1.0, "ppo: GAE discount", min=0.0)
    lam: float = opt(0.95, "ppo: GAE lambda", min=0.0)
    learning_rate: float = opt(3e-4, "peak learning rate", min=0.0)
    warmup_iters: int = opt(0, "linear warm-up steps", min=0)
    max_iters: int = opt(100, "training steps", min=0)
    weight_decay: float = opt(0.0, "AdamW weight decay on matrices", min=0.0)
    beta2: float = opt(0.999, "Adam beta2", min=0.0)
    adam_eps: float = opt(1e-5, "Adam epsilon", min=0.0)
    log_interval: int = opt(5, "steps between rows of metrics.jsonl (one token: exact metrics in each)", min=1)
    eval_interval: int = opt(20, "a few tokens: steps between sampled estimates of J", min=1)
    eval_samples: int = opt(512, "a few tokens: samples of pi_theta per estimate of J", min=2)
    ref_samples: int = opt(4096, "a few tokens: samples of pi_ref for beta log Z (and IPO's p(y > pi_ref))", min=2)


def check_config(cfg):
    if cfg.method == "bon" and cfg.max_new_tokens != 1:
        raise ConfigError("--method=bon: one-token responses only (--max_new_tokens=1): its exact distribution needs "
                          "the whole vocabulary")
    for key, value in (("labels", cfg.labels != "bt"), ("pairs", cfg.pairs)):
        if value and cfg.method not in PREFERENCE:
            raise ConfigError(f"--{key}={getattr(cfg, key)}: only for the preference methods ({', '.join(PREFERENCE)})")
    if cfg.pairs == "mixed" and cfg.max_new_tokens != 1:
        raise ConfigError("--pairs=mixed: one-token responses only (--max_new_tokens=1)")
    if cfg.method in ("rloo", "grpo") and cfg.batch_size % cfg.k:
        raise ConfigError(f"--batch_size={cfg.batch_size} is not a multiple of --k={cfg.k}")
    if cfg.minibatch_size > cfg.batch_size:
        raise ConfigError(f"--minibatch_size={cfg.minibatch_size} exceeds --batch_size={cfg.batch_size}")
    if cfg.method == "grpo" and cfg.whiten_rewards:
        raise ConfigError("--whiten_rewards: GRPO normalises its rewards per group already")
    if cfg.compile:
        raise ConfigError("--compile: not supported by stage optimum")
    cfg.kl_estimator = cfg.kl_estimator or ("k3" if cfg.method == "grpo" else "k1")
    if cfg.kl_estimator not in ("k1", "k3"):
        raise ConfigError(f"--kl_estimator={cfg.kl_estimator}: expected k1 or k3")


# ----------------------------------------------------------------------------------------------------------------
# the built-in reward

_TOKEN_SCORES = []


def token_score(prompts, responses):
    """The default reward: the mean over the response's tokens (as data.encode tokenises its text) of a fixed N(0, 1)
    score per token id, drawn once with seed 0; 0 for an empty response. Defined for every response."""
    if not _TOKEN_SCORES:
        _TOKEN_SCORES.append(torch.randn(N_REAL_TOKENS, generator=torch.Generator().manual_seed(0)))
    ids = [encode(r) for r in responses]
    lengths = torch.tensor([len(x) for x in ids])
    flat = torch.tensor([t for x in ids for t in x], dtype=torch.long)
    sums = torch.zeros(len(ids)).index_add_(0, torch.arange(len(ids)).repeat_interleave(lengths),
                                            _TOKEN_SCORES[0][flat])
    return sums / lengths.clamp(min=1)


# ----------------------------------------------------------------------------------------------------------------
# the exact optimum (one-token responses) and its estimate (a few tokens): pure functions of tensors

@torch.no_grad()
def next_token_logprobs(model, prompt_ids, temperature=1.0):
    """log pi(y | prompt) for every token y: (V,) float64, from one forward pass of the prompt."""
    h = model.hidden(torch.tensor([prompt_ids], device=model.lm_head.weight.device))[:, -1]
    return torch.log_softmax(model.logits(h).double()[0] / temperature, -1)


def optimum_logprobs(ref_logp, r, beta):
    """log pi*(y) = log pi_ref(y) + r(y) / beta - log Z, and log Z (eq. 4 of Rafailov et al. 2023). (V,) -> (V,), ()."""
    a = ref_logp + r / beta
    log_z = torch.logsumexp(a, 0)
    return a - log_z, log_z


def win_probability(r, ref_r, ref_weights, points=0, chunk=256):
    """IPO's reward p(y > mu) = f(r(y)), f(v) = sum_j w_j sigmoid(v - r(y'_j)): r (V,), the reference's rewards ref_r
    (M,) with weights ref_weights (M,) summing to 1 (pi_ref over the vocabulary, or 1/M for M samples). -> (V,).
    points > 0: f exact at that many evenly spaced values and linear between them (V x V sigmoids take minutes on 2
    cores); f is smooth, so the error is below max|sigmoid''| h^2 / 8 < 0.012 h^2 for grid step h."""
    if points and r.numel() > points:
        grid = torch.linspace(r.min().item(), r.max().item(), points, dtype=r.dtype)
        f = win_probability(grid, ref_r, ref_weights)
        x = (r - grid[0]) / (grid[1] - grid[0])
        i = x.floor().long().clamp(0, points - 2)
        t = x - i
        return f[i] * (1 - t) + f[i + 1] * t
    return torch.cat([torch.sigmoid(r[i:i + chunk, None] - ref_r[None]) @ ref_weights
                      for i in range(0, r.numel(), chunk)])


def grpo_fixed_point(ref_p, r, beta, k, std=True, iters=30):
    """Where GRPO's expected update is zero (one token, an approximation): its advantage is about (1 - 1/k) (r - mean)
    / std_pi(r) and its k3 term's gradient is that of beta * KL(pi_ref || pi), so c r(y) + beta pi_ref(y) / pi(y) =
    lam on every token: pi(y) = beta pi_ref(y) / (lam - c r(y)), lam set by bisection so that pi sums to 1, c = (1 -
    1/k) / std_pi(r) iterated to a fixed point. std=False: c = 1, the k3 term alone (a plain advantage r - mean).
    (V,) -> (V,)."""
    p, c = ref_p, torch.tensor(1.0, dtype=ref_p.dtype)
    for _ in range(iters if std else 1):
        if std:
            mean = (p * r).sum()
            c = (1 - 1 / k) / ((p * (r - mean) ** 2).sum().sqrt() + 1e-12)
        top = (c * r).max()
        lo, hi = top + 1e-12, top + beta + 1e-12  # at lam = top + beta the sum is at most 1
        for _ in range(60):
            lam = (lo + hi) / 2
            total = (beta * ref_p / (lam - c * r)).sum()
            lo, hi = (lam, hi) if total > 1 else (lo, lam)
        p = beta * ref_p / (hi - c * r)
        p = p / p.sum()
    return p


def tilt(ref_logp, r, t):
    """(KL(p_t || pi_ref), E_p_t[r]) of the tilt p_t = pi_ref exp(t r) / Z: the optimum pi* at beta = 1 / t."""
    logp = torch.log_softmax(ref_logp + t * r, 0)
    p = logp.exp()
    return kl(p, logp, ref_logp).item(), (p * r).sum().item()


def frontier_reward(ref_logp, r, kl_to_ref, iters=40):
    """The most reward E_p[r] of any p with KL(p || pi_ref) = kl_to_ref: that of the tilt whose KL it is (the
    Lagrangian's maximiser; a tilt's KL grows with t from 0 to -log of pi_ref's mass on the maximisers of r), t
    bracketed by doubling from 1 and found by bisection from 0. (V,), (V,), float -> float: E_ref[r] at a KL of 0 or
    less, (nearly) max r beyond the tilts' reach (t > 1e6), NaN for NaN."""
    if math.isnan(kl_to_ref) or kl_to_ref <= 0:
        return float("nan") if math.isnan(kl_to_ref) else tilt(ref_logp, r, 0.0)[1]
    lo, hi = 0.0, 1.0
    while tilt(ref_logp, r, hi)[0] < kl_to_ref:
        if hi > 1e6:
            return tilt(ref_logp, r, hi)[1]
        lo, hi = hi, 2 * hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tilt(ref_logp, r, mid)[0] < kl_to_ref else (lo, mid)
    return tilt(ref_logp, r, hi)[1]


def kl(p, logp, logq):
    """KL(p || q) = sum p (log p - log q), 0 log 0 = 0."""
    return torch.where(p > 0, p * (logp - logq), 0.0).sum()


def exact_metrics(logp, ref_logp, target_logp, r, beta, log_z):
    """The one-token metrics of a policy logp (V,) against the target pi* (or pi_ipo) with reward r: the objective
    gap is computed from its definition, beta log Z - (E[r] - beta KL(pi || pi_ref)), not from the identity
    gap = beta KL(pi || pi*), so that the two check each other."""
    p = logp.exp()
    reward, kl_ref = (p * r).sum(), kl(p, logp, ref_logp)
    return {"kl_to_optimum": kl(p, logp, target_logp).item(),
            "objective_gap": (beta * log_z - reward + beta * kl_ref).item(),
            "tv_to_optimum": 0.5 * (p - target_logp.exp()).abs().sum().item(), "kl_to_ref": kl_ref.item(),
            "reward": reward.item(), "objective": (reward - beta * kl_ref).item()}


def log_mean_exp(x):
    """log mean exp(x) of samples x (M,) and its standard error by the delta method: std(w) / (mean(w) sqrt(M)),
    w = exp(x - max x)."""
    m = x.max()
    w = (x - m).exp()
    return (m + w.mean().log()).item(), (w.std() / (w.mean() * math.sqrt(x.numel()))).item()


# ----------------------------------------------------------------------------------------------------------------
# stage optimum

class Target:
    """What a method converges to, and the objective it is measured with: the reward r_t of the objective (r, or
    IPO's p(y > pi_ref)), beta, and either exact vectors (one token) or the sampled estimate of beta log Z."""

    def __init__(self, cfg, ref, reward_fn, device, ctx):
        self.ref, self.beta, self.exact = ref, cfg.beta, cfg.max_new_tokens == 1
        self.ipo = cfg.method == "ipo"
        self.info, self.frontier = {}, []
        if self.exact:
            prompt_ids = encode_prompt(cfg.prompt)[-(ref.config.block_size - 1):]
            self.prompt_ids = prompt_ids
            self.ref_logp = next_token_logprobs(ref, prompt_ids, cfg.temperature)  # (V,)
            texts = [decode([y]) for y in range(N_REAL_TOKENS)]  # what the reward sees of each one-token response
            self.r = torch.cat([reward_fn([cfg.prompt] * len(texts[i:i + 4096]), texts[i:i + 4096]).double().cpu()
                                for i in range(0, len(texts), 4096)])
            self.r_target = win_probability(self.r, self.r, self.ref_logp.exp(), 2049) if self.ipo else self.r
            self.target_logp, self.log_z = optimum_logprobs(self.ref_logp, self.r_target, cfg.beta)
            self.info["optimum_value"] = (cfg.beta * self.log_z).item()
            self.info["kl_ref_to_optimum"] = kl(self.ref_logp.exp(), self.ref_logp, self.target_logp).item()
            self.info["optimum_kl_to_ref"] = kl(self.target_logp.exp(), self.target_logp, self.ref_logp).item()
            # the optimal frontier, (KL to pi_ref, reward) of the tilts at beta 100 to 0.03, for `optimum.py frontier`
            self.frontier = [tilt(self.ref_logp, self.r, 10 ** (e / 8)) for e in range(-16, 13)]
            if self.ipo:  # how far IPO's optimum is from the RLHF one
                star_logp, _ = optimum_logprobs(self.ref_logp, self.r, cfg.beta)
                self.info["ipo_optimum_kl_to_rlhf_optimum"] = kl(self.target_logp.exp(), self.target_logp,
                                                                 star_logp).item()
            if cfg.method == "grpo":
                for name, std in (("grpo_fixed_point_kl", True), ("k3_fixed_point_kl", False)):
                    p_g = grpo_fixed_point(self.ref_logp.exp(), self.r, cfg.beta, cfg.k, std)
                    self.info[name] = kl(p_g, p_g.log(), self.target_logp).item()
        else:  # beta log Z from samples of pi_ref: log-mean-exp of r_t / beta
            g = torch.Generator(device=device).manual_seed(derived_seed(cfg.seed, 0, 3))
            s = sample_responses(ref, [cfg.prompt] * cfg.ref_samples, cfg.max_new_tokens, g, device, ctx,
                                 cfg.temperature, batch_size=cfg.micro_batch_size)
            with ctx:
                self.ref_r = reward_fn(s.prompts, s.responses).double().cpu()  # (M,)
            lz, se = log_mean_exp(self.r_of(self.ref_r) / cfg.beta)
            self.info.update(optimum_value=cfg.beta * lz, optimum_value_se=cfg.beta * se)

    def r_of(self, r):
        """The objective's reward of responses with reward r (M,): r itself, or IPO's estimated p(y > pi_ref)."""
        if not self.ipo:
            return r
        return win_probability(r, self.ref_r, torch.full_like(self.ref_r, 1 / self.ref_r.numel()))

    def metrics(self, policy, cfg, reward_fn, device, ctx, step):
        if self.exact:
            logp = next_token_logprobs(policy, self.prompt_ids, cfg.temperature)
            m = exact_metrics(logp, self.ref_logp, self.target_logp, self.r_target, self.beta, self.log_z)
            reward = (logp.exp() * self.r).sum().item()  # r's, also for IPO (whose objective's reward differs)
            m["frontier_gap"] = frontier_reward(self.ref_logp, self.r, m["kl_to_ref"]) - reward
            return m
        ev = ppo.evaluate_policy(policy, self.ref, [cfg.prompt] * cfg.eval_samples, reward_fn, device, ctx,
                                 cfg.max_new_tokens, cfg.micro_batch_size, cfg.temperature,
                                 derived_seed(cfg.seed, step, 4))
        r = self.r_of(torch.tensor([x["score"] for x in ev["samples"]], dtype=torch.float64))
        kls = torch.tensor([x["kl"] for x in ev["samples"]], dtype=torch.float64)
        j = r - self.beta * kls  # per-sample J: E[r] - beta KL with the k1 estimate of the KL
        gap = self.info["optimum_value"] - j.mean().item()
        return {"objective": j.mean().item(), "objective_se": (j.std() / math.sqrt(j.numel())).item(),
                "objective_gap": gap, "kl_to_optimum": gap / self.beta, "kl_to_ref": kls.mean().item(),
                "reward": r.mean().item()}


def rl_step(cfg, policy, ref, critic, optimizer, reward_fn, step, device, ctx):
    """One step of ppo, rloo or grpo on the one prompt: phases 1 and 3-5 of ppo.train_rl, with ppo's own functions
    (no no-EOS rule: every response is scored as it is). Returns training metrics."""
    g = torch.Generator(device=device).manual_seed(derived_seed(cfg.seed, step, ppo.SAMPLING))
    # 1. rollout
    b = ppo.rollout(policy, ref, [cfg.prompt] * cfg.batch_size, reward_fn, cfg.max_new_tokens, cfg.temperature, g,
                    device, ctx, cfg.micro_batch_size)
    check_finite(step, scores=b.scores.mean())
    # 3. per-token KL to the reference
    kl_t = torch.where(b.resp_mask.bool(), ppo.kl_estimate(b.logp, b.ref_logp, cfg.kl_estimator), 0.0)
    # 4. advantages, 5. update
    ppo.set_advantages(cfg.method, cfg, b, b.scores, kl_t, cfg.beta, critic, ctx)
    stats = ppo.update(cfg, policy, critic, optimizer, b, step, ctx, cfg.beta if cfg.method == "grpo" else 0.0)
    return {"objective/scores": b.scores.mean().item(), "objective/kl": (b.logp - b.ref_logp).sum(1).mean().item(),
            **{key: sum(s[key] for s in stats) / len(stats) for key in stats[0]}}


def preference_step(cfg, policy, ref, optimizer, reward_fn, step, device, ctx):
    """One step of DPO or IPO on fresh pairs from pi_ref (online DPO: from the policy; --pairs: either, or one response
    of each), labelled by Bradley-Terry draws on r or, with --labels=max, by the higher r (a tie carries no loss but
    counts in the batch's size, as in dpo.train_online)."""
    g = torch.Generator(device=device).manual_seed(derived_seed(cfg.seed, step, ppo.SAMPLING))
    B, source = cfg.batch_size, cfg.pairs or ("policy" if cfg.method == "online_dpo" else "ref")
    draw = lambda model, n: sample_responses(model, [cfg.prompt] * n, cfg.max_new_tokens, g, device, ctx,
                                             cfg.temperature)
    if source == "mixed":  # the first of each pair (rows 0..B-1) from the policy, the second (B..2B-1) from pi_ref
        a, b = draw(policy, B), draw(ref, B)
        s = Samples(a.prompts + b.prompts, a.responses + b.responses, torch.cat([a.ids, b.ids]),
                    torch.cat([a.mask, b.mask]), a.R, torch.cat([a.resp_mask, b.resp_mask]),
                    torch.cat([a.no_eos, b.no_eos]))
    else:
        s = draw(policy if source == "policy" else ref, 2 * B)
    with torch.no_grad(), ctx:
        ref_logp = response_logprobs(ref, s.ids, s.mask, s.R, cfg.temperature).sum(1)  # (2B,)
        r = reward_fn(s.prompts, s.responses).float()
    u = torch.rand(B, generator=g, device=device)  # drawn with either labels: the same stream after it
    first = r[:B] > r[B:] if cfg.labels == "max" else u < torch.sigmoid(r[:B] - r[B:])  # P(y1 > y2), Bradley-Terry
    i = torch.arange(B, device=device)
    chosen, rejected = torch.where(first, i, i + B), torch.where(first, i + B, i)
    with ctx:
        logp = response_logprobs(policy, s.ids, s.mask, s.R, cfg.temperature).sum(1)  # (2B,) one forward pass
        losses, cr, rr = dpo.preference_loss(logp[chosen], logp[rejected], ref_logp[chosen], ref_logp[rejected],
                                             cfg.beta, ipo=cfg.method == "ipo")
    loss = (losses * (r[:B] != r[B:])).mean() if cfg.labels == "max" else losses.mean()
    check_finite(step, loss=loss.detach())
    loss.backward()
    optimizer_step(policy, optimizer, cfg, step)
    return {"loss": loss.item(), "rewards/accuracies": (cr > rr).float().mean().item(),
            "rewards/margins": (cr - rr).mean().item()}


def best_of_n_rows(cfg, run, target, ref, reward_fn, device, ctx):
    """Best-of-N has no training: rows for N = 1, 2, 4, ..., cfg.n (the row's step is N) with the exact metrics of
    its distribution, and a check of that distribution by sampling: the mean reward of ppo.select_best over
    cfg.batch_size groups of N against the exact E[r]. Returns the rows of the largest N and of the N closest to the
    optimum."""
    ref_p, rows = target.ref_logp.exp(), []
    ns = sorted({2 ** i for i in range(int(math.log2(cfg.n)) + 1)} | {cfg.n})
    for n in ns:
        p = best_of_n_probs(target.r, n, ref_p)
        m = exact_metrics(p.clamp(min=1e-300).log(), target.ref_logp, target.target_logp, target.r, cfg.beta,
                          target.log_z)
        g = torch.Generator(device=device).manual_seed(derived_seed(cfg.seed, n, ppo.SAMPLING))
        s = sample_responses(ref, [cfg.prompt] * (cfg.batch_size * n), 1, g, device, ctx, cfg.temperature,
                             batch_size=max(cfg.micro_batch_size, n))
        with ctx:
            scores = reward_fn(s.prompts, s.responses).double().cpu()
        best = scores[select_best(scores, n)]
        m.update({"kl/bound": best_of_n_kl_bound(n), "sampled/reward": best.mean().item(),
                  "sampled/reward_se": (best.std() / math.sqrt(best.numel())).item()})
        run.log(n, **m)
        rows.append(dict(m, step=n))
    return rows[-1], min(rows, key=lambda row: row["kl_to_optimum"])


def optimum(cfg):
    check_config(cfg)
    run = Run(cfg, "optimum")
    device, ctx = setup_device(cfg)
    policy, _ = load_policy(cfg.init_from, device)
    ref, _ = load_policy(cfg.init_from, device)
    ref.requires_grad_(False)
    reward_fn = make_reward(cfg.reward, device, cfg.reward_weights, cfg.reward_combine, cfg.unsafe_prompts,
                            cfg.micro_batch_size)
    t0 = time.time()
    target = Target(cfg, ref, reward_fn, device, ctx)
    kind = "one-token (exact)" if target.exact else f"{cfg.max_new_tokens}-token (estimated)"
    info = ", ".join(f"{k} {v:.4g}" for k, v in target.info.items())
    print(f"optimum: {cfg.method}, beta {cfg.beta}, {kind} responses to {cfg.prompt!r}; {info} "
          f"({time.time() - t0:.1f} s)")
    if cfg.method == "bon":
        final, best = best_of_n_rows(cfg, run, target, ref, reward_fn, device, ctx)
        run.save(cfg.n, policy)
        run.summary(**final, **target.info, **{f"best/{k}": v for k, v in best.items()})
        shown = ("kl_to_optimum", "objective_gap", "tv_to_optimum")
        print(f"done: N = {cfg.n}: " + ", ".join(f"{k} {final[k]:.4g}" for k in shown) + f"; closest to the optimum: "
              f"N = {best['step']}: " + ", ".join(f"{k} {best[k]:.4g}" for k in shown))
        return 0
    critic = make_critic(cfg, policy, device) if cfg.method == "ppo" else None
    optimizer = make_optimizer(nn.ModuleDict(dict(policy=policy, **({"critic": critic} if critic else {}))), cfg,
                               device)
    start = run.restore(policy, optimizer)
    if run.ckpt is not None and critic is not None:
        critic.load_state_dict(run.ckpt["critic"])
    done = start

    def save():
        run.save(done, policy, optimizer, critic=critic.state_dict() if critic is not None else None)

    def evaluate(step, **train_metrics):
        m = target.metrics(policy, cfg, reward_fn, device, ctx, step)
        run.log(step, **m, **train_metrics)
        return m

    final = evaluate(0) if start == 0 else {}
    for step in range(start, cfg.max_iters):
        t1 = time.time()
        if cfg.method in PREFERENCE:
            m = preference_step(cfg, policy, ref, optimizer, reward_fn, step, device, ctx)
        else:
            m = rl_step(cfg, policy, ref, critic, optimizer, reward_fn, step, device, ctx)
        done = step + 1
        m["time/step_s"] = time.time() - t1
        due = done % (cfg.log_interval if target.exact else cfg.eval_interval) == 0 or done == cfg.max_iters
        if due:
            final = evaluate(done, **m)
            if sys.stderr.isatty():  # else Run.log printed the row
                    print(f"step {done}: kl_to_optimum {final['kl_to_optimum']:.4f} objective_gap "
                      f"{final['objective_gap']:.4f} kl_to_ref {final['kl_to_ref']:.4f}", flush=True)
        if run.end_step(done, save):
            return 130
    if start >= cfg.max_iters and run.ckpt is None:
        save()
    final = final or evaluate(done)  # resumed at the end: the final metrics again
    run.summary(**final, step=cfg.max_iters, **target.info, frontier=target.frontier)
    print(f"done: kl_to_optimum {final.get('kl_to_optimum', float('nan')):.4f}, objective_gap "
          f"{final.get('objective_gap', float('nan')):.4f} (beta log Z {target.info['optimum_value']:.4f})")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# python optimum.py figure|frontier RUN ... --out=PNG: figures (and the README's table) from this stage's run folders

def read_runs(run_dirs):
    """[(config, metrics rows, summary)] of run folders."""
    runs = []
    for d in run_dirs:
        with open(os.path.join(d, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        with open(os.path.join(d, "config.json")) as f, open(os.path.join(d, "summary.json")) as g:
            runs.append((json.load(f), rows, json.load(g)))
    return runs


def label_of(cfg):
    return cfg["method"] + (" (to pi_ipo)" if cfg["method"] == "ipo" else "") + \
        (", max labels" if cfg.get("labels") == "max" else "")


def frontier_figure(run_dirs, out):
    """Reward against KL(pi_theta || pi_ref) along each one-token run, below the optimal frontier (the tilts of
    pi_ref, from the first run's summary): how well each method spends its KL, whatever its beta."""
    plt = pyplot()
    runs = read_runs(run_dirs)
    front = next((s["frontier"] for _, _, s in runs if s.get("frontier")), None)
    if front is None:
        raise SystemExit("optimum.py frontier: none of these runs keeps the frontier (one-token runs made since "
                         "2026-12-08 do)")
    fig, ax = plt.subplots(figsize=(6, 4))
    kls, rewards = zip(*front)
    ax.plot(kls, rewards, "k-", lw=2, label="optimal frontier (the tilts of pi_ref)")
    for (cfg, rows, _), color in zip(runs, plt.cm.tab10.colors * len(runs)):
        label = (f"{label_of(cfg)}, beta {cfg['beta']:g}, lr {cfg['learning_rate']:g}, warm-up {cfg['warmup_iters']}, "
                 f"seed {cfg['seed']}")
        ax.plot([r["kl_to_ref"] for r in rows], [r["reward"] for r in rows], ".-", color=color, ms=3, lw=1, label=label)
    right = 1.05 * max(r["kl_to_ref"] for _, rows, _ in runs for r in rows)
    top = max(y for x, y in zip(kls, rewards) if x <= right)
    ax.set(xlabel="KL(pi_theta || pi_ref) (nats)", ylabel="E[r]", xlim=(0, right), ylim=(None, top + 0.2))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


def figure(run_dirs, out):
    """KL(pi_theta || target) against steps, one panel per beta, one line per method (best-of-N: its best N, dotted);
    prints a markdown table of the same runs."""
    plt = pyplot()
    runs = read_runs(run_dirs)
    betas = sorted({c["beta"] for c, _, _ in runs}, reverse=True)
    fig, axes = plt.subplots(1, len(betas), figsize=(5 * len(betas), 3.6), squeeze=False)
    print("| method | beta | KL(pi_ref \\|\\| target) | KL to target, step 25 / 50 / 100 | objective gap | TV | "
          "KL(pi \\|\\| pi_ref) (target's) | s/step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for cfg, rows, summary in sorted(runs, key=lambda x: (-x[0]["beta"], METHODS.index(x[0]["method"]))):
        ax, method, label = axes[0][betas.index(cfg["beta"])], cfg["method"], label_of(cfg)
        if method == "bon":
            best = min(rows, key=lambda r: r["kl_to_optimum"])
            ax.axhline(best["kl_to_optimum"], ls=":", color="k", label=f"best-of-{best['step']} (the best N)")
            ns, kls = ", ".join(str(r["step"]) for r in rows), " / ".join(f"{r['kl_to_optimum']:.3f}" for r in rows)
            print(f"| best-of-N, N = {ns} | {cfg['beta']:g} | {summary['kl_ref_to_optimum']:.3f} | {kls} (by N) "
                  f"| {best['objective_gap']:.3f} (N = {best['step']}) | {best['tv_to_optimum']:.3f} | "
                  f"{best['kl_to_ref']:.3f} ({summary['optimum_kl_to_ref']:.3f}) | |")
            continue
        ax.plot([r["step"] for r in rows], [r["kl_to_optimum"] for r in rows], label=label)
        at = {r["step"]: r["kl_to_optimum"] for r in rows}
        times = [r["time/step_s"] for r in rows if "time/step_s" in r]
        along = " / ".join(f"{at[s]:.3f}" if s in at else "-" for s in (25, 50, 100))
        print(f"| {label} | {cfg['beta']:g} | {rows[0]['kl_to_optimum']:.3f} | {along} | "
              f"{rows[-1]['objective_gap']:.3f} | {rows[-1]['tv_to_optimum']:.3f} | "
              f"{rows[-1]['kl_to_ref']:.3f} ({summary['optimum_kl_to_ref']:.3f}) | "
              f"{sum(times) / max(1, len(times)):.2f} |")
    for ax, beta in zip(axes[0], betas):
        ax.set(title=f"beta {beta:g}", xlabel="training step", ylabel="KL(pi_theta || pi*) (nats)", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] not in ("figure", "frontier") or not any(a.startswith("--out=") for a in args):
        print("usage: python optimum.py figure|frontier RUN_DIR ... --out=FIGURE.png", file=sys.stderr)
        sys.exit(2)
    (figure if args[0] == "figure" else frontier_figure)([a for a in args[1:] if not a.startswith("--out=")],
                                                          next(a[6:] for a in args if a.startswith("--out=")))

"""
Direct Preference Optimization (Rafailov et al. 2023) and two of its variants, conservative DPO (Mitchell 2023)
and IPO (Azar et al. 2023): fine-tune a policy on preference pairs directly, with no reward model and no sampling.
Also the DPO paper's Unlikelihood baseline (--loss=unlikelihood --alpha=A: unlikelihood_loss()); its other baseline,
Preferred-FT, is `train.py sft` on the chosen responses as {prompt, response} rows.

    python train.py dpo --data=pairs.jsonl.gz --init_from=out/sft/ckpt.pt               # DPO, beta 0.1
    python train.py dpo --data=pairs.jsonl.gz --init_from=out/sft/ckpt.pt --loss=ipo    # or --loss=cdpo
                                                                     # --label_smoothing=0.1, --reference_free
    python train.py online_dpo --init_from=out/sft/ckpt.pt --prompts=prompts.jsonl --reward=out/reward/ckpt.pt

Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", arXiv 2402.04792):
train_online() samples two responses per prompt from the current policy at every step, the reward (a reward model,
as the paper's AI annotator, or a function) chooses one, and the same DPO loss trains on that pair: preferences
from the policy's own distribution, not from a fixed data set.

How (after the DPO reference code, github.com/eric-mitchell/direct-preference-optimization): a pair's log-probability under a model is the sum of its response tokens' log-probs
(prompt masked, EOS appended to each response), computed by model.response_logprobs, the helper PPO uses too;
the chosen and rejected responses of a batch share one forward pass. The reference is a frozen copy of the
starting policy (or --ref). Its log-probs never change, so by default they are computed once per dataset, train
and eval, before training (--ref_cache=false computes them for every batch instead, and gives the same numbers;
--ref_cache_file=F shares them between runs on the same pairs, as the pipeline's DPO runs at each beta).
The loss is preference_loss(), a pure function with the DPO reference code's interface.

Simplifications, on purpose:
- Gradient accumulation (--micro_batch_size) and torchrun split a step's pairs into contiguous parts, each
  loss its pairs' sum over the whole batch's count; every process computes the reference log-probs of the whole
  dataset and evaluates the whole eval split (redundant work, identical numbers, nothing gathered).
- AdamW as every other stage (the reference code uses RMSprop) with the shared warm-up + cosine schedule.
- The data order and the held-out split are the reward model's (reward.py): a batch is a pure function of the step.
"""
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from checkpoint import fingerprint, frozen_dtype, load_policy, safe_torch_load, save_checkpoint
from config import ConfigError, OptimConfig, TrainConfig, opt, plural
from data import epoch_indices, load_prompts
from dist import all_mean, global_means, micro_batches, my_share, rank_seed, world_note
from model import response_logprobs, sample_responses
from reward import PairsConfig, RewardSpec, batches_in_order, load_pair_splits, make_reward, pair_batch, plan
from runtime import Run, make_optimizer, optimizer_step, setup_device


def preference_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                    beta, label_smoothing=0.0, ipo=False, reference_free=False):
    """The DPO loss and its variants for a batch of B pairs, from sequence log-probabilities.

    policy_chosen_logps:      (B,) log pi_theta(y_w | x), summed over the chosen response's tokens
    policy_rejected_logps:    (B,) log pi_theta(y_l | x), the rejected response
    reference_chosen_logps:   (B,) log pi_ref(y_w | x)
    reference_rejected_logps: (B,) log pi_ref(y_l | x)
    beta:            float, the strength of the KL constraint to the reference (0.1 to 0.5 in the paper)
    label_smoothing: float eps in [0, 0.5), conservative DPO: each label is taken to be flipped with probability eps
    ipo:             bool, use the IPO loss instead (label_smoothing is then not used)
    reference_free:  bool, drop the reference from h: a reference that gives every response the same probability

    Returns (losses, chosen_rewards, rejected_rewards), each (B,); the rewards beta * (logp - logp_ref) are
    detached (they are metrics, as the reference code logs them). Average the losses for the batch loss."""
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = 0.0 if reference_free else reference_chosen_logps - reference_rejected_logps
    h = pi_logratios - ref_logratios  # h_pi^{y_w, y_l} of the IPO paper (B,)
    if ipo:
        losses = (h - 1 / (2 * beta)) ** 2  # IPO, Eq. 17 of Azar et al. (arXiv 2310.12036v2)
    else:
        # conservative DPO, Eq. 3 of Mitchell's cDPO note; label_smoothing 0 is DPO, Eq. 7 of Rafailov et al.
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()  # implicit reward, Eq. 5
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def unlikelihood_loss(chosen_logps, rejected_logps, chosen_mask, rejected_mask, alpha):
    """The Unlikelihood baseline of the DPO paper (section 6): raise the likelihood of the chosen response and push
    down each token of the rejected one with the unlikelihood term of Welleck et al. 2019 (arXiv 1908.04319, Eq. 4),
    weighted by alpha, for a batch of B pairs of per-token log-probabilities.

    chosen_logps:   (B, T) log pi_theta(y_w,t | x, y_w,<t), 0 off the response
    rejected_logps: (B, T) log pi_theta(y_l,t | x, y_l,<t)
    chosen_mask:    (B, T) 1 on the chosen response's tokens, 0 elsewhere
    rejected_mask:  (B, T) the same for the rejected response
    alpha:          float >= 0, the weight of the unlikelihood term (0: SFT on the chosen responses alone)

    Each term is a mean over its response's tokens (as SFT's loss is):
        loss = -mean_t log p(y_w,t) - alpha * mean_t log(1 - p(y_l,t))
    Returns (B,) losses; average them for the batch loss."""
    nll = -(chosen_logps * chosen_mask).sum(-1) / chosen_mask.sum(-1).clamp(min=1)
    # log(1 - p) = log(-expm1(log p)), exact near p = 1; the clamp keeps p = 1 (log p = 0) finite
    log_not = torch.log(-torch.expm1(rejected_logps.clamp(max=-1e-6)))
    ul = -(log_not * rejected_mask).sum(-1) / rejected_mask.sum(-1).clamp(min=1)
    return nll + alpha * ul


def pair_logps(model, batch, ctx, per_token=False):
    """Sequence log-probs of a batch of b pairs (reward.pair_batch) under model, chosen and rejected in one forward
    pass: (2, b). per_token: the per-token log-probs and the response mask instead, (2, b, R) each."""
    ids, mask, R = batch
    with ctx:
        logps = response_logprobs(model, ids, mask, R)  # (2b, R): response tokens only
    if per_token:
        return logps.view(2, -1, R), mask[:, -R:].to(logps.dtype).view(2, -1, R)
    return logps.sum(-1).view(2, -1)


@torch.no_grad()
def reference_logps(ref, rows, batch_size, device, ctx):
    """The reference's (chosen, rejected) log-probs of every pair of a dataset, in order: (N, 2)."""
    out = [pair_logps(ref, pair_batch(rows, range(i, min(i + batch_size, len(rows))), device), ctx).T
           for i in range(0, len(rows), batch_size)]
    return torch.cat(out)


def cached_reference_logps(ref, splits, cfg, device, ctx):
    """reference_logps of each split ({name: rows} -> {name: (N, 2)}), computed once before training. With
    --ref_cache_file, runs on the same pairs under the same reference (the pipeline's DPO runs at each beta) share
    them: the first run to lock the file computes and writes them with a stamp of what they depend on (the rows'
    tokens, the reference's bytes, dtype, device, batch, torch's version: not this code's); the others wait for the lock
    and read them. A file whose stamp differs is computed again and replaced; any other file is refused."""
    batch, path = 2 * cfg.batch_size, cfg.ref_cache_file
    compute = lambda: {name: reference_logps(ref, rows, batch, device, ctx) for name, rows in splits.items()}
    if not path:
        return compute()
    kind = str(device).split(":")[0]  # every rank of a torchrun reads what one of them wrote
    stamp = json.dumps(dict(rows=hashlib.sha256(repr(splits).encode()).hexdigest(), dtype=cfg.dtype, batch=batch,
                            device=torch.cuda.get_device_name(device) if kind == "cuda" else kind,
                            torch=torch.__version__, ref=fingerprint(cfg.ref or cfg.init_from)))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".lock", "a") as lock:  # released when closed, or when the process dies
        fcntl.flock(lock, fcntl.LOCK_EX)
        saved = safe_torch_load(path) if os.path.exists(path) else {}
        if not (isinstance(saved, dict) and (not saved or "stamp" in saved)):
            raise ConfigError(f"--ref_cache_file={path}: a file that is not a cache of reference log-probs; "
                              f"refusing to replace it")
        if saved.get("stamp") == stamp:
            print(f"reference log-probs: read from {path}")
            return {name: saved[name].to(device) for name in splits}
        cache = compute()
        save_checkpoint(path, dict(stamp=stamp, **{name: logps.cpu() for name, logps in cache.items()}))
        print(f"reference log-probs: written to {path}{' (its stamp differed)' if saved else ''}")
        return cache


def dpo_metrics(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps):
    """The implicit rewards beta * (logp - logp_ref) of chosen and rejected, how often chosen's is the larger, their
    margin, and the sequence log-probs: named as in the DPO reference code."""
    return {"loss": losses.mean().item(), "rewards/chosen": chosen_rewards.mean().item(),
            "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
            "logps/chosen": chosen_logps.mean().item(), "logps/rejected": rejected_logps.mean().item()}


@dataclass
class DPOConfig(PairsConfig, TrainConfig, OptimConfig):
    out_dir: str = opt("out/dpo", "run folder")
    init_from: str = opt("out/sft/ckpt.pt", "policy checkpoint to start from (pairs are truncated to its "
                                            "block_size); a frozen copy of it is the reference")
    ref: str = opt("", "reference policy checkpoint (default: --init_from)")
    ref_cache: bool = opt(True, "compute reference log-probs once per dataset before training (false: per batch)")
    ref_cache_file: str = opt("", "a file to share those cached log-probs between runs on the same pairs and "
                                  "reference (a sweep over beta): the first run writes it, the others read it "
                                  "(default: none, each run computes its own)")
    loss: str = opt("dpo", "dpo, cdpo (conservative DPO, with --label_smoothing), ipo, or unlikelihood (the DPO paper's "
                           "baseline: likelihood of chosen, unlikelihood of rejected tokens; no reference, no beta)",
                    choices=("dpo", "cdpo", "ipo", "unlikelihood"))
    alpha: float = opt(1.0, "unlikelihood only: weight of the unlikelihood term on the rejected tokens", min=0.0)
    beta: float = opt(0.1, "beta: strength of the KL constraint to the reference (0.1 in the paper)", above=0.0)
    label_smoothing: float = opt(0.0, "cdpo only: probability eps that a preference label is flipped, in (0, 0.5)",
                                 min=0.0)
    reference_free: bool = opt(False, "no reference model: h = logp_chosen - logp_rejected")
    append_eos: bool = opt(True, "end each response with EOS, whose log-prob joins the sequence's (false: responses "
                                 "cut at a fixed length, as IMDb continuations, which never end)")
    batch_size: int = opt(64, "preference pairs per optimizer step (64 in the paper)", min=1)
    learning_rate: float = opt(1e-5, "peak learning rate (about 1e-6 in the paper; tiny models tolerate more)",
                               min=0.0)
    warmup_iters: int = opt(10, "linear warm-up steps", min=0)


def check_config(cfg):
    if not cfg.data:
        raise ConfigError("--data: a preference file is required")
    if cfg.loss == "unlikelihood" and (cfg.ref or cfg.reference_free):
        raise ConfigError("--loss=unlikelihood uses no reference model: drop --ref / --reference_free")
    if cfg.loss == "cdpo" and not 0 < cfg.label_smoothing < 0.5:
        raise ConfigError(f"--loss=cdpo needs --label_smoothing in (0, 0.5), got {cfg.label_smoothing}")
    if cfg.loss != "cdpo" and cfg.label_smoothing:
        raise ConfigError(f"--label_smoothing is used by --loss=cdpo only (got --loss={cfg.loss})")
    if cfg.reference_free and cfg.ref:
        raise ConfigError("--reference_free uses no reference model: drop --ref")
    if os.path.isdir(cfg.ref_cache_file):
        raise ConfigError(f"--ref_cache_file={cfg.ref_cache_file} is a folder: give a file in it")


def train(cfg):
    check_config(cfg)
    run = Run(cfg, "dpo")
    device, ctx = setup_device(cfg)
    # 1. policy, reference and data
    policy, _ = load_policy(cfg.init_from, device, compile=cfg.compile)  # dropout off
    ul = cfg.loss == "unlikelihood"
    # a cached reference runs once, uncompiled: its compile would not pay, and its batches' sizes would make the
    # policy's compiled graphs dynamic (torch.compile turns a shape dynamic once it has seen two, in any model)
    ref = None if cfg.reference_free or ul else load_policy(cfg.ref or cfg.init_from, device, frozen_dtype(cfg),
                                                            cfg.compile and not cfg.ref_cache)[0].requires_grad_(False)
    train_rows, eval_rows, _ = load_pair_splits(cfg.data, cfg.eval_data, cfg.max_pairs, policy.config.block_size,
                                             cfg.append_eos)
    total = plan(cfg, len(train_rows))
    optimizer = make_optimizer(policy, cfg, device)
    start = run.restore(policy, optimizer)
    print(f"policy: {policy.num_params() / 1e6:.2f}M parameters; loss {cfg.loss}, "
          f"{f'alpha {cfg.alpha}' if ul else f'beta {cfg.beta}'}; "
          f"{cfg.batch_size} pairs per step; {plural(cfg.max_iters, 'step')} ({total / len(train_rows):.2f} epochs) on "
          f"{device} ({cfg.dtype}){world_note(cfg)}")
    # 2. reference log-probs: once per dataset, or per batch in ref_logps()
    cache = {}
    if ref is not None and cfg.ref_cache:
        cache = cached_reference_logps(ref, dict(train=train_rows, eval=eval_rows), cfg, device, ctx)
        ref = None  # no longer needed: free its memory

    @torch.no_grad()
    def ref_logps(split, batch, idx):
        if cfg.reference_free or ul:  # h ignores the reference; the logged rewards are then beta * logp
            return torch.zeros(2, len(idx), device=device)
        if cache:
            return cache[split][torch.as_tensor(idx, dtype=torch.long).to(device, non_blocking=True)].T  # (2, b)
        return pair_logps(ref, batch, ctx)

    def forward(batch):
        """(2, b) sequence log-probs and (2, b) losses' inputs: per-token log-probs and masks for unlikelihood."""
        if not ul:
            logps = pair_logps(policy, batch, ctx)
            return logps, logps
        tok, mask = pair_logps(policy, batch, ctx, per_token=True)  # (2, b, R) each
        return tok.sum(-1), (tok, mask)

    def losses_of(logps, inputs, ref_lp):
        if ul:  # its metrics: the sequence log-probs stand in for the implicit rewards (accuracy: chosen more likely)
            (tok, mask) = inputs
            return (unlikelihood_loss(tok[0], tok[1], mask[0], mask[1], cfg.alpha), logps[0].detach(),
                    logps[1].detach())
        return preference_loss(logps[0], logps[1], ref_lp[0], ref_lp[1], cfg.beta, cfg.label_smoothing,
                               ipo=cfg.loss == "ipo", reference_free=cfg.reference_free)

    @torch.no_grad()
    def evaluate():
        policy.eval()
        batches = [(pair_batch(eval_rows, idx, device), idx)
                   for idx in batches_in_order(len(eval_rows), cfg.batch_size, cfg.eval_iters)]
        parts = [(*forward(batch), ref_logps("eval", batch, idx)) for batch, idx in batches]
        policy.train()
        metrics = [dpo_metrics(*losses_of(*p), p[0][0], p[0][1]) for p in parts]  # per batch (token counts differ)
        sizes = [p[0].size(1) for p in parts]
        return {k: sum(m[k] * n for m, n in zip(metrics, sizes)) / sum(sizes) for k in metrics[0]}

    # 3. train
    policy.train()
    metrics = {}
    for step in run.steps(start, cfg.loss):
        # 3a. batch: B pairs as 2B sequences, and the reference's log-probs of them
        #     (this process's share of them, in micro-batches: gradient accumulation over sums / B)
        idx = epoch_indices(len(train_rows), step, cfg.batch_size, cfg.seed, total)
        parts, step_loss = [], 0.0
        for part in micro_batches(idx, cfg.micro_batch_size, optimizer):
            batch = pair_batch(train_rows, part, device)  # one batch for the reference and the policy
            ref_lp = ref_logps("train", batch, part)  # (2, b)
            # 3b. policy log-probs, chosen and rejected in one forward pass
            logps, inputs = forward(batch)  # (2, b)
            # 3c. loss and update
            losses, chosen_rewards, rejected_rewards = losses_of(logps, inputs, ref_lp)
            loss = losses.sum() / len(idx)
            loss.backward()
            step_loss = step_loss + loss.detach()
            parts.append((losses.detach(), chosen_rewards, rejected_rewards, *logps.detach()))
        lr, norm = optimizer_step(policy, optimizer, cfg, step, check=False)
        run.check_later(step, loss=step_loss, grad_norm=norm)  # at the next log or checkpoint: no wait here
        # 3d. log, evaluate, checkpoint
        done = step + 1
        if run.log_due(done):
            mine = [torch.cat(t) for t in zip(*parts)] if parts else [torch.zeros(0, device=device)] * 5
            metrics = dict(all_mean(dpo_metrics(*mine), mine[0].numel()), lr=lr, grad_norm=norm)
            if run.eval_due(done):
                metrics.update({f"eval/{k}": v for k, v in evaluate().items()})
            run.log(done, **metrics)
        if run.end_step(done, lambda: run.save(done, policy, optimizer)):
            return 130

    # 4. final evaluation: the last step's, unless the run resumed after it
    final = ({k: v for k, v in metrics.items() if k.startswith("eval/")}
             or {f"eval/{k}": v for k, v in evaluate().items()})
    final = run.summary(**final, step=cfg.max_iters, params=policy.num_params())
    print(f"done: eval rewards/accuracies {final['eval/rewards/accuracies']:.4f}, rewards/margins "
          f"{final['eval/rewards/margins']:.4f}, loss {final['eval/loss']:.4f}; checkpoint {run.ckpt_path}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# online DPO: the pairs sampled from the policy at every step, labelled by a reward

@dataclass
class OnlineDPOConfig(RewardSpec, TrainConfig, OptimConfig):
    out_dir: str = opt("out/online_dpo", "run folder")
    init_from: str = opt("out/sft/ckpt.pt", "policy checkpoint to start from; a frozen copy of it is the reference")
    ref: str = opt("", "reference policy checkpoint (default: --init_from)")
    prompts: str = opt("", "training prompts: .txt lines or JSONL in any data.load_prompts format (required)")
    max_prompts: int = opt(0, "read at most this many prompts (0: all)", min=0)
    max_new_tokens: int = opt(48, "tokens sampled per response", min=1)
    loss: str = opt("dpo", "dpo or ipo", choices=("dpo", "ipo"))
    beta: float = opt(0.1, "beta: strength of the KL constraint to the reference", above=0.0)
    batch_size: int = opt(64, "prompts per optimizer step, each giving one pair of sampled responses", min=1)
    micro_batch_size: int = opt(0, "pairs per forward/backward pass (0: all of a step's)", min=0)
    max_iters: int = opt(100, "optimizer steps", min=1)
    learning_rate: float = opt(1e-5, "peak learning rate", min=0.0)
    warmup_iters: int = opt(0, "linear warm-up steps", min=0)
    log_interval: int = opt(1, "steps between log lines", min=1)


def train_online(cfg):
    """Online DPO: each step, two responses per prompt from the current policy at temperature 1 (so that the KL
    logged is the policy's own, log pi - log pi_ref summed over a response), the higher-scored one chosen, and
    preference_loss on the pairs, with the reference's log-probs computed on the fly. A pair whose two scores tie
    carries no preference and no loss (it still counts in the batch's size, as a fixed denominator)."""
    if not cfg.prompts:
        raise ConfigError("--prompts: a prompts file is required")
    run = Run(cfg, "online_dpo")
    device, ctx = setup_device(cfg)
    # 1. policy, reference, reward and prompts
    policy, _ = load_policy(cfg.init_from, device, compile=cfg.compile)  # dropout off, eval mode: sampled as trained
    ref = load_policy(cfg.ref or cfg.init_from, device, frozen_dtype(cfg), cfg.compile)[0].requires_grad_(False)
    reward_fn = make_reward(cfg.reward, device, cfg.reward_weights, cfg.reward_combine, cfg.unsafe_prompts,
                            dtype=frozen_dtype(cfg))
    prompts = load_prompts(cfg.prompts, cfg.max_prompts or None, policy.config.block_size - cfg.max_new_tokens)
    optimizer = make_optimizer(policy, cfg, device)
    start = run.restore(policy, optimizer)
    print(f"online {cfg.loss}, beta {cfg.beta}: {cfg.batch_size} prompts x 2 sampled responses per step; "
          f"{plural(cfg.max_iters, 'step')}; {plural(len(prompts), 'prompt')}; policy "
          f"{policy.num_params() / 1e6:.2f}M parameters on {device} ({cfg.dtype}){world_note(cfg)}")
    logps = lambda model, b, rows: response_logprobs(model, b.ids[rows], b.mask[rows], b.R).sum(-1)  # (len(rows),)

    # 2. train
    metrics = {}
    for step in run.steps(start, f"online {cfg.loss}"):
        # 2a. this process's prompts, two samples of each (rows 2i, 2i + 1), their scores and reference log-probs
        idx = epoch_indices(len(prompts), step, cfg.batch_size, cfg.seed)
        share = my_share(range(len(idx)))  # this process's positions in the step's batch
        # the sampling stream: key 1, as SeedSequence ignores trailing zeros (key 0 would be derived_seed(seed, step),
        # the seed of the data order's pass `step`)
        g = torch.Generator(device=device).manual_seed(rank_seed(cfg.seed, step, 1))
        b = sample_responses(policy, [prompts[idx[i]] for i in share for _ in range(2)], cfg.max_new_tokens, g,
                             device, ctx)
        with torch.no_grad(), ctx:
            scores = reward_fn(b.prompts, b.responses).float().view(-1, 2)  # (n, 2)
            ref_lp = logps(ref, b, slice(None)).float().view(-1, 2)
        # 2b. the pairs: the higher score chosen (column 0 of order), then the DPO loss, in micro-batches
        order = torch.stack([scores[:, 1] > scores[:, 0], scores[:, 1] <= scores[:, 0]], 1).long()  # (n, 2)
        parts, step_loss = [], 0.0
        for part in micro_batches(range(len(idx)), cfg.micro_batch_size, optimizer):
            pairs = torch.tensor(part).to(device, non_blocking=True) - share.start  # this process's rows
            rows = (2 * pairs[:, None] + order[pairs]).T.reshape(-1)  # chosen rows, then rejected rows
            with ctx:
                lp = logps(policy, b, rows).float().view(2, -1)
            r_lp = ref_lp.gather(1, order)[pairs].T  # (2, b)
            losses, chosen_rewards, rejected_rewards = preference_loss(lp[0], lp[1], r_lp[0], r_lp[1], cfg.beta,
                                                                       ipo=cfg.loss == "ipo")
            loss = (losses * (scores[pairs, 0] != scores[pairs, 1])).sum() / len(idx)  # a tie prefers nothing
            loss.backward()
            step_loss = step_loss + loss.detach()
            parts.append((losses.detach(), chosen_rewards, rejected_rewards, *lp.detach(),
                          (lp - r_lp).detach().view(-1)))
        lr, norm = optimizer_step(policy, optimizer, cfg, step, check=False)
        run.check_later(step, loss=step_loss, grad_norm=norm)
        # 2c. log, checkpoint
        done = step + 1
        if run.log_due(done):
            mine_t = [torch.cat(t) for t in zip(*parts)] if parts else [torch.zeros(0, device=device)] * 6
            means = global_means(scores=scores, kl=mine_t[5], margin=scores.max(1).values - scores.min(1).values)
            metrics = dict(all_mean(dpo_metrics(*mine_t[:5]), mine_t[0].numel()), lr=lr, grad_norm=norm,
                           **{"objective/scores": means["scores"], "objective/kl": means["kl"],
                              "objective/score_margin": means["margin"]})
            run.log(done, **metrics)
        if run.end_step(done, lambda: run.save(done, policy, optimizer)):
            return 130
    run.summary(**metrics, step=cfg.max_iters, params=policy.num_params())  # the last logged step's metrics
    print(f"done: checkpoint {run.ckpt_path}")
    return 0

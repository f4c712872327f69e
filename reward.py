"""
Bradley-Terry reward model: a GPT trunk with a scalar head, scored at the last real token of prompt + response.
Stage `reward` trains one on preference pairs, stage `score` scores texts with one; the preference-data helpers
that DPO shares (reading, truncation, held-out split, batches) live here too.

    python train.py reward --data=pairs.jsonl.gz --init_from=out/sft/ckpt.pt --block_size=256
    python train.py score --ckpt=out/reward/ckpt.pt --data=texts.jsonl     # or --prompt=... --response=...

Training follows OpenAI's lm-human-preferences and the N+ implementation details of RLHF (Huang et al.
2024): the trunk starts from an SFT checkpoint, the head from N(0, 1/sqrt(d + 1));
chosen and rejected responses of B pairs are scored in one batch of 2B sequences; loss
-logsigmoid(r_chosen - r_rejected - margin), optionally + c * mean((r_chosen + r_rejected)^2); one epoch with
the learning rate decayed to 0. Afterwards gain and bias are fitted so that rewards of samples from a policy
(--policy), or of the data's own responses, have mean 0 and std 1, and stored in the checkpoint.

Simplifications, on purpose:
- The margin is one constant for every pair (Llama 2 takes it from the annotators' rating, which the formats lack).
- Evaluation reads raw scores: the normalisation is fitted after training and does not change the accuracy.
- The data order is a fresh permutation per epoch drawn from (seed, epoch), so a batch is a pure function of the
  step; the last batch of the run may be smaller (no pair is dropped). Under torchrun each process takes a
  contiguous share of the step's pairs (dist.micro_batches); every process evaluates the whole eval split and fits
  the same normalisation (redundant work, identical numbers, no gathering).
"""
import importlib.util
import inspect
import math
import os
import traceback
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import block_size_for, disable_dropout, load_checkpoint, load_policy, model_from_checkpoint
from config import ConfigError, ModelConfig, OptimConfig, RunConfig, TrainConfig, opt, plural
from data import (DataError, Example, epoch_indices, heldout_split, load_preferences, load_prompts,
                  load_sft, looks_like_preferences, tokenize_pair, write_jsonl)
from dist import all_mean, all_sum, micro_batches, world_note
from model import GPT, GPTConfig, ScalarHead, last_real_index, layout_batch, sample_responses
from runtime import Run, make_optimizer, optimizer_step, setup_device, shorten


class RewardModel(nn.Module):
    """GPT trunk + scalar head. forward(ids, mask) -> raw scores (B,) read at each row's last real token.

    The buffers gain and bias hold the normalisation fitted after training (as OpenAI): score() returns
    gain * raw + bias, so that rewards of reference responses have mean 0 and std 1. The same class, with its
    head read at every position, is PPO's critic."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.gpt = GPT(cfg)
        self.head = ScalarHead(cfg.n_embd)
        self.register_buffer("gain", torch.ones(()))
        self.register_buffer("bias", torch.zeros(()))

    def forward(self, ids, mask):
        """Raw scores (B,): the head read at each row's last real token (what the Bradley-Terry loss trains)."""
        v = self.head(self.gpt.hidden(ids, mask))  # (B, T)
        return v.gather(1, last_real_index(mask)[:, None]).squeeze(1)  # (B,)

    def values(self, ids, mask):
        """Normalised head output at every position (B, T): gain * raw + bias. As PPO's critic, position t holds
        the value of the state that the logits at t predict from."""
        return self.gain * self.head(self.gpt.hidden(ids, mask)).float() + self.bias

    def score(self, ids, mask):
        """Normalised reward (B,)."""
        return self.gain * self(ids, mask).float() + self.bias


def load_reward_model(path, device, dtype=None):
    """A RewardModel from a `reward` checkpoint (or a GPT2ForSequenceClassification folder: checkpoint.py), in eval
    mode with dropout off. dtype (checkpoint.frozen_dtype) stores trunk and head in that type; gain and bias stay
    float32."""
    ckpt = load_checkpoint(path, "reward")
    model = model_from_checkpoint(ckpt, path, RewardModel(GPTConfig(**ckpt["model_args"])))
    model = disable_dropout(model).to(device).eval()
    if dtype is not None:
        model.gpt.to(dtype)
        model.head.to(dtype)
    return model


# ----------------------------------------------------------------------------------------------------------------
# the loss, and scoring texts

def bradley_terry_loss(r_chosen, r_rejected, margin=0.0, center_coef=0.0):
    """Mean Bradley-Terry loss of B pairs (Bradley and Terry 1952; Ouyang et al. 2022, eq. 1), a scalar.

    r_chosen, r_rejected: (B,) scores of the chosen and rejected responses. margin: a float or (B,), subtracted
    inside the sigmoid (Llama 2): -logsigmoid(r_c - r_r - margin). center_coef: weight c of the centering term
    c * mean((r_c + r_r)^2), which pins the rewards' mean near 0 (TRL's center_rewards_coefficient, 0.01)."""
    loss = -F.logsigmoid(r_chosen - r_rejected - margin).mean()
    return loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()


def pair_metrics(r_chosen, r_rejected, loss):
    """Logged metrics of B pairs: scores (B,) each and the loss (a float)."""
    return {"loss": loss, "accuracy": (r_chosen > r_rejected).float().mean().item(),
            "rewards/chosen": r_chosen.mean().item(), "rewards/rejected": r_rejected.mean().item(),
            "margin": (r_chosen - r_rejected).mean().item()}


@torch.no_grad()
def score_tensor(model, prompts, responses, device, batch_size=64):
    """Normalised scores of prompt + response texts -> float32 (B,) on device, tokenized as everywhere (tokenize_pair:
    EOS-first prompt, response + EOS, truncated to the model's block_size) in the shared layout. No wait for the GPU:
    the batches are queued while it runs."""
    scores = [torch.zeros(0, device=device)]
    for i in range(0, len(prompts), batch_size):
        rows = [tokenize_pair(p, [r], model.config.block_size)[:2]
                for p, r in zip(prompts[i:i + batch_size], responses[i:i + batch_size])]
        ids, mask, _ = layout_batch([p for p, _ in rows], [r for _, (r,) in rows], device)
        scores.append(model.score(ids, mask).float())
    return torch.cat(scores)


def score_texts(model, prompts, responses, device, batch_size=64):
    """score_tensor's scores as list[float], read once."""
    return score_tensor(model, prompts, responses, device, batch_size).tolist()


@torch.no_grad()
def normalise(model, prompts, responses, device, batch_size=64):
    """Fit gain and bias so that the scores of these texts have mean 0 and std 1 (OpenAI's lm-human-preferences).
    Returns the raw mean and std. Fits from the raw scores, so fitting twice gives the same result."""
    model.gain.fill_(1.0)
    model.bias.fill_(0.0)
    raw = torch.tensor(score_texts(model, prompts, responses, device, batch_size), dtype=torch.float64)
    mean, std = raw.mean().item(), raw.std(correction=0).clamp(min=1e-8).item()
    model.gain.fill_(1.0 / std)
    model.bias.fill_(-mean / std)
    return mean, std


# ----------------------------------------------------------------------------------------------------------------
# preference data, shared with dpo.py

@dataclass
class PairsConfig:
    """Keys of the stages that train on preference pairs (reward, dpo)."""
    data: str = opt("", "preference pairs: JSONL(.gz) in any of data.py's four preference formats (required)")
    eval_data: str = opt("", "evaluation pairs (default: the last 10% of --data, held out; the same every run)")
    max_pairs: int = opt(0, "read at most this many pairs per file (0: all)", min=0)
    epochs: int = opt(1, "passes over the training pairs, when --max_iters=0 (more than one overfits: Ouyang et al. 2022)",
                      min=1)
    max_iters: int = opt(0, "optimizer steps (0: --epochs passes over the training pairs)", min=0)
    batch_size: int = opt(32, "preference pairs per optimizer step (twice as many sequences)", min=1)
    eval_iters: int = opt(0, "batches per evaluation (0: the whole eval split)", min=0)


def load_pairs(path, limit, block_size, append_eos=True):
    """Preference pairs -> ([(prompt_ids, chosen_ids, rejected_ids)], [Pair]), truncated to block_size."""
    pairs = load_preferences(path, limit or None)
    rows, n_truncated = [], 0
    for pair in pairs:
        prompt, (chosen, rejected), truncated = tokenize_pair(pair.prompt, [pair.chosen, pair.rejected], block_size,
                                                              append_eos)
        rows.append((prompt, chosen, rejected))
        n_truncated += truncated
    if n_truncated:
        print(f"{path}: {n_truncated} of {len(rows)} pairs were longer than block_size={block_size} and were "
              f"truncated (prompt from the left, then the responses)")
    return rows, pairs


def load_pair_splits(data, eval_data, max_pairs, block_size, append_eos=True):
    """(train rows, eval rows, train Pairs) of the reward model and DPO: eval_data, or else the held-out rule."""
    train_rows, train_pairs = load_pairs(data, max_pairs, block_size, append_eos)
    if eval_data:
        eval_rows, _ = load_pairs(eval_data, max_pairs, block_size, append_eos)
    else:
        if len(train_rows) < 2:
            raise DataError(f"{data}: {plural(len(train_rows), 'pair')}; at least 2 are needed to hold out an eval split "
                            f"(or give --eval_data)")
        (train_rows, eval_rows), train_pairs = heldout_split(train_rows), heldout_split(train_pairs)[0]
    print(f"pairs: {len(train_rows):,} training, {len(eval_rows):,} eval "
          f"({eval_data or 'the last 10% of ' + data})")
    return train_rows, eval_rows, train_pairs


def pair_batch(rows, idx, device):
    """Pairs idx as ONE batch of 2B sequences in the shared layout, chosen in rows 0..B-1 and rejected in rows
    B..2B-1, so both go through one forward pass (as the DPO reference code). Returns ids, mask (2B, P + R), R."""
    prompts = [rows[i][0] for i in idx]
    return layout_batch(prompts + prompts, [rows[i][1] for i in idx] + [rows[i][2] for i in idx], device)


def batches_in_order(n, batch_size, limit=0):
    """Index ranges of a dataset's batches in order (evaluation): the first `limit` batches, or all (limit 0)."""
    n = n if limit == 0 else min(n, limit * batch_size)
    return [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def plan(cfg, n_train):
    """Derived sizes, right after the data is read: sets cfg.max_iters and returns how many pairs the run draws."""
    if cfg.max_iters == 0:
        cfg.max_iters = math.ceil(cfg.epochs * n_train / cfg.batch_size)
        return cfg.epochs * n_train
    return cfg.max_iters * cfg.batch_size


# ----------------------------------------------------------------------------------------------------------------
# rewards for the RL stages: one interface, fn(prompts: list[str], responses: list[str]) -> float32 tensor (B,)

@dataclass
class RewardSpec:
    """Keys of every stage that needs a reward (ppo, rloo, grpo, bon)."""
    reward: str = opt("", "reward: a reward-model checkpoint, FILE.py:FUNCTION (prompts, responses -> one float per "
                          "response), or several of these, comma-separated (required)")
    reward_weights: str = opt("", "weights of several rewards, comma-separated: their weighted sum (default: all 1)")
    reward_combine: str = opt("sum", "several rewards: sum (weighted), or llama2 (two: helpfulness, then safety; "
                                     "the safety score where sigmoid(safety) < 0.15 or the prompt is flagged unsafe)")
    unsafe_prompts: str = opt("", "llama2: a prompts file (any data.load_prompts format); its prompts are flagged "
                                  "unsafe (exact text match)")


def user_frame(exc, path):
    """'FILE:LINE' of the deepest frame of exc's traceback that lies in the user's file `path` (else the deepest)."""
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if os.path.abspath(f.filename) == os.path.abspath(path)] or frames[-1:]
    return f"{mine[-1].filename}:{mine[-1].lineno}" if mine else path


def load_function(spec, option="reward"):
    """FILE.py:FUNCTION -> the function, its file run as a fresh module. Every failure is one ConfigError."""
    path, _, name = spec.rpartition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"--{option}={spec}: {path} is not a file")
    module_spec = importlib.util.spec_from_file_location("reward_fn_" + os.path.splitext(os.path.basename(path))[0],
                                                         path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's file failed to import: its own error, at its own line
        raise ConfigError(f"--{option}={spec}: importing {path} failed at {user_frame(e, path)}: "
                          f"{type(e).__name__}: {str(e)[:200]}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"--{option}={spec}: {path} has no function {name!r}")
    try:
        inspect.signature(fn).bind([], [])
    except TypeError:
        raise ConfigError(f"--{option}={spec}: {name}{inspect.signature(fn)} must take two arguments, "
                          f"(prompts, responses)") from None
    except ValueError:  # a builtin without a signature: let the call decide
        pass
    return fn


def call_user_reward(fn, spec, prompts, responses, option="reward"):
    """A user's reward function, called and checked: one float per response, finite. Its failures are one line
    naming the user's file and line, never a traceback of ours."""
    path = spec.rpartition(":")[0]
    try:
        out = fn(prompts, responses)
    except Exception as e:
        raise ConfigError(f"--{option}={spec}: raised {type(e).__name__} at {user_frame(e, path)}: "
                          f"{str(e)[:200]}") from None
    try:
        values = torch.as_tensor(out, dtype=torch.float32).flatten() if out is not None else None
    except (TypeError, ValueError, RuntimeError):
        values = None
    if values is None:
        raise ConfigError(f"--{option}={spec}: returned {type(out).__name__} {str(out)[:60]!r}; expected one float per "
                          f"response (a list or a tensor)")
    return values


def reward_component(spec, device, batch_size, dtype=None, option="reward"):
    """One reward, checked: its scores as a float32 tensor (B,) on device. dtype: a reward model's weights'
    (load_reward_model); option: the command-line option named in errors."""
    if spec.endswith(".py"):
        raise ConfigError(f"--{option}={spec}: name the function too, as FILE.py:FUNCTION")
    if ".py:" in spec:
        fn = load_function(spec, option)
        get = lambda prompts, responses: call_user_reward(fn, spec, prompts, responses, option)
    else:
        model = load_reward_model(spec, device, dtype)
        get = lambda prompts, responses: score_tensor(model, prompts, responses, device, batch_size)  # on device

    def scores(prompts, responses):
        out = get(prompts, responses).to(device)
        if out.numel() != len(responses):
            raise ConfigError(f"--{option}={spec}: returned {out.numel()} scores for {len(responses)} responses")
        if not torch.isfinite(out).all():
            raise ConfigError(f"--{option}={spec}: returned a non-finite score")
        return out
    return scores


def llama2_reward(helpful, safety, unsafe, threshold=0.15):
    """Llama 2's combination (Touvron et al. 2023, section 3.2.2): the safety score R_s where the prompt is flagged
    unsafe or sigmoid(R_s) < 0.15, otherwise the helpfulness score R_h. Both are (normalised) logits, so LOGIT of the
    chosen sigmoid score is the chosen score itself; the WHITEN of that paper is done per batch by the RL loop.
    helpful, safety: (B,) float; unsafe: (B,) bool. Returns (B,)."""
    return torch.where(unsafe | (torch.sigmoid(safety) < threshold), safety, helpful)


def make_reward(spec, device, weights="", combine="sum", unsafe_prompts="", batch_size=64, dtype=None):
    """The reward of every RL stage: fn(prompts, responses) -> float32 tensor (B,) on device.

    spec: a reward checkpoint (scored by score_texts: normalised, read at the last real token), FILE.py:FUNCTION
    (a user's function returning one float per response), or several of these, comma-separated, combined as the
    weighted sum with `weights` ("1,0.5"), or with combine="llama2" (helpfulness first, safety second; a prompt is
    flagged unsafe when it is in the `unsafe_prompts` file). dtype: the reward models' weights
    (checkpoint.frozen_dtype: bfloat16 when the run computes in it, half the memory)."""
    specs = [s.strip() for s in spec.split(",") if s.strip()]
    if not specs:
        raise ConfigError("--reward is required: a reward checkpoint, FILE.py:FUNCTION, or several, comma-separated")
    parts = [reward_component(s, device, batch_size, dtype) for s in specs]
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
# PPO's critic: the same class, read at every position. It starts from the reward model's trunk with a zero value head
# (critic_init=zero): its first values are 0, close to the returns of a normalised reward, where the reward head,
# trained at the last token only, is not.

class ValueHead(nn.Module):
    """OpenAI's critic: a scalar head on the policy's own trunk. Only the head is this module's (and its checkpoint
    entry); the trunk is trained as the policy."""

    def __init__(self, policy):
        super().__init__()
        self.head = ScalarHead(policy.config.n_embd)
        nn.init.zeros_(self.head.proj.weight)
        self.trunk = [policy]  # a list: not registered as a submodule

    def values(self, ids, mask):
        return self.head(self.trunk[0].hidden(ids, mask))


def make_critic(cfg, policy, device):
    """PPO's value model: critic.values(ids, mask) -> (B, T), a module trained beside the policy, dropout off and in
    eval mode as every model of the RL stages (N+).

    separate (N+/TRL): a RewardModel on the trunk of the reward-model checkpoint (the first, with several), or on
    the policy's trunk when the reward is a Python function. Its head starts at zero (critic_init=zero) or, from a
    reward checkpoint, as the reward model's normalised head (critic_init=reward). shared (OpenAI): ValueHead."""
    first = [s.strip() for s in cfg.reward.split(",") if s.strip()][0]
    from_rm = cfg.critic == "separate" and ".py:" not in first
    if cfg.critic_init == "reward" and not from_rm:
        raise ConfigError("--critic_init=reward needs --critic=separate and a reward-model checkpoint as the reward")
    if cfg.critic == "shared":
        return ValueHead(policy).to(device).eval()
    if from_rm:
        critic = load_reward_model(first, device)
    else:
        critic = RewardModel(policy.config).to(device)
        critic.gpt.load_state_dict(policy.state_dict())
    if cfg.critic_init == "zero":
        nn.init.zeros_(critic.head.proj.weight), nn.init.zeros_(critic.head.proj.bias)
        critic.gain.fill_(1.0), critic.bias.fill_(0.0)
    return disable_dropout(critic).eval()


# ----------------------------------------------------------------------------------------------------------------
# stage reward

@dataclass
class RewardConfig(PairsConfig, TrainConfig, ModelConfig, OptimConfig):
    out_dir: str = opt("out/reward", "run folder")
    init_from: str = opt("scratch", "scratch (shape from the model keys), or a policy checkpoint (from sft) whose "
                                    "GPT becomes the trunk; --block_size may not exceed its own")
    block_size: int = opt(0, "longest sequence (0: the checkpoint's with --init_from, else 256); pairs are truncated "
                             "to it", min=0)
    learning_rate: float = opt(3e-5, "peak learning rate, decayed to --min_lr (0) at the end", min=0.0)
    warmup_iters: int = opt(0, "linear warm-up steps", min=0)
    margin: float = opt(0.0, "constant margin inside the sigmoid: -logsigmoid(r_c - r_r - margin)")
    center_coef: float = opt(0.0, "weight c of the centering term c * mean((r_c + r_r)^2) (0.01 in N+/TRL)", min=0.0)
    policy: str = opt("", "policy checkpoint whose samples fit the normalisation (default: the data's responses)")
    norm_samples: int = opt(512, "prompts (with --policy) or pairs whose responses fit the normalisation", min=1)
    max_new_tokens: int = opt(64, "with --policy: tokens sampled per response", min=1)
    temperature: float = opt(0.7, "with --policy: sampling temperature: the policies' (N+: 0.7)", min=0.0)


def init_model(cfg):
    """A RewardModel with its trunk from --init_from (a policy checkpoint) or from scratch, dropout off; sets
    cfg.block_size (0: the checkpoint's, or 256 from scratch; checkpoint.block_size_for)."""
    if cfg.init_from == "scratch":
        cfg.block_size = block_size_for(cfg)
        return disable_dropout(RewardModel(GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                                     block_size=cfg.block_size, bias=cfg.bias)))
    ckpt = load_checkpoint(cfg.init_from, "policy")
    model = RewardModel(GPTConfig(**ckpt["model_args"]))
    model_from_checkpoint(ckpt, cfg.init_from, model.gpt)
    cfg.block_size = block_size_for(cfg, model.config.block_size)
    return disable_dropout(model)


@torch.no_grad()
def pair_scores(model, rows, device, ctx, batch_size, limit=0):
    """Raw scores (2, n) of tokenized pairs (load_pairs' rows): chosen, rejected, both after the same prompt tokens
    (tokenize_pair truncates a pair's prompt once, for its longer response). The first `limit` batches, or all."""
    training = model.training
    model.eval()
    scores = []
    try:
        for idx in batches_in_order(len(rows), batch_size, limit):
            ids, mask, _ = pair_batch(rows, idx, device)
            with ctx:
                scores.append(model(ids, mask).float().view(2, -1))  # (2, b): chosen, rejected
    finally:
        model.train(training)
    return torch.cat(scores, 1)


def evaluate(model, rows, cfg, device, ctx):
    r_chosen, r_rejected = pair_scores(model, rows, device, ctx, cfg.batch_size, cfg.eval_iters)
    loss = bradley_terry_loss(r_chosen, r_rejected, cfg.margin, cfg.center_coef).item()
    return pair_metrics(r_chosen, r_rejected, loss)


def fit_normalisation(model, cfg, train_pairs, device, ctx):
    """Gain and bias from samples of --policy on the training prompts (OpenAI's lm-human-preferences), or else from
    the data's chosen and rejected responses."""
    if cfg.policy:
        policy, _ = load_policy(cfg.policy, device)
        prompts = list(dict.fromkeys(p.prompt for p in train_pairs))[:cfg.norm_samples]
        g = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + cfg.max_iters)
        s = sample_responses(policy, prompts, cfg.max_new_tokens, g, device, ctx, cfg.temperature,
                             batch_size=cfg.batch_size, desc="sampling for the normalisation")
        responses = s.responses
    else:
        pairs = train_pairs[:cfg.norm_samples]
        prompts, responses = [p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs]
    with ctx:
        return normalise(model, prompts, responses, device, 2 * cfg.batch_size)


def train(cfg):
    if not cfg.data:
        raise ConfigError("--data: a preference file is required")
    run = Run(cfg, "reward")
    device, ctx = setup_device(cfg)
    # 1. model and data
    model = init_model(cfg)
    train_rows, eval_rows, train_pairs = load_pair_splits(cfg.data, cfg.eval_data, cfg.max_pairs, cfg.block_size)
    total = plan(cfg, len(train_rows))
    model.to(device)
    optimizer = make_optimizer(model, cfg, device)
    start = run.restore(model, optimizer)
    if cfg.compile:
        model.gpt.compile_hidden()
    print(f"model: {model.gpt.num_params() / 1e6:.2f}M parameters; {cfg.batch_size} pairs per step; "
          f"{plural(cfg.max_iters, 'step')} ({total / len(train_rows):.2f} epochs) on {device} ({cfg.dtype})"
          f"{world_note(cfg)}")

    # 2. train
    model.train()
    metrics = {}
    for step in run.steps(start):
        # 2a. batch: B pairs as 2B sequences, scored at their last real tokens in one forward pass
        # (this process's share of them, in micro-batches: gradient accumulation, each loss weighted by its share)
        idx = epoch_indices(len(train_rows), step, cfg.batch_size, cfg.seed, total)
        loss, scores = 0.0, []
        for part in micro_batches(idx, cfg.micro_batch_size, optimizer):
            ids, mask, _ = pair_batch(train_rows, part, device)
            with ctx:
                r_chosen, r_rejected = model(ids, mask).float().view(2, -1)  # (b,) each
            # 2b. Bradley-Terry loss and update
            part_loss = bradley_terry_loss(r_chosen, r_rejected, cfg.margin, cfg.center_coef) * (len(part) / len(idx))
            part_loss.backward()
            loss, scores = loss + part_loss.detach(), scores + [torch.stack([r_chosen, r_rejected]).detach()]
        r_chosen, r_rejected = torch.cat(scores, 1) if scores else torch.zeros(2, 0, device=device)
        lr, norm = optimizer_step(model, optimizer, cfg, step, check=False)
        run.check_later(step, loss=loss, grad_norm=norm)  # at the next log or checkpoint: no wait for the GPU here
        # 2c. log, evaluate, checkpoint (the last one after the normalisation)
        done = step + 1
        if run.log_due(done):
            metrics = dict(all_mean(pair_metrics(r_chosen, r_rejected, 0.0), r_chosen.numel()),
                           loss=float(all_sum(loss)), lr=lr, grad_norm=norm)
            if run.eval_due(done):
                metrics.update({f"eval/{k}": v for k, v in evaluate(model, eval_rows, cfg, device, ctx).items()})
            run.log(done, **metrics)
        if run.end_step(done, lambda: run.save(done, model, optimizer, kind="reward")):
            return 130

    # 3. final evaluation (the last step's, unless the run resumed after it), normalisation, checkpoint
    final = ({k: v for k, v in metrics.items() if k.startswith("eval/")}
             or {f"eval/{k}": v for k, v in evaluate(model, eval_rows, cfg, device, ctx).items()})
    mean, std = fit_normalisation(model, cfg, train_pairs, device, ctx)
    run.save(cfg.max_iters, model, optimizer, kind="reward")
    run.summary(**final, **{"norm/raw_mean": mean, "norm/raw_std": std}, step=cfg.max_iters,
                params=model.gpt.num_params())
    print(f"done: eval accuracy {final['eval/accuracy']:.4f}, eval loss {final['eval/loss']:.4f}; raw scores "
          f"normalised from mean {mean:.3f}, std {std:.3f}; checkpoint {run.ckpt_path}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# stage score

@dataclass
class ScoreConfig(RunConfig):
    out_dir: str = opt("out/score", "run folder: scores.jsonl and summary.json (a new scoring replaces them)")
    ckpt: str = opt("out/reward/ckpt.pt", "reward-model checkpoint")
    data: str = opt("", "JSONL to score, comma-separated files: {prompt, response} (or any SFT format of data.py), or "
                        "preference pairs, whose chosen and rejected responses are both scored")
    prompt: str = opt("", "one prompt, scored with --response (when no --data)")
    response: str = opt("", "one response to --prompt")
    batch_size: int = opt(64, "sequences per forward pass", min=1)


def score(cfg):
    if cfg.data and (cfg.prompt or cfg.response):
        raise ConfigError("give either --data or --prompt/--response, not both")
    if not (cfg.data or cfg.prompt or cfg.response):
        raise ConfigError("nothing to score: give --data=FILE or --prompt=... --response=...")
    run = Run(cfg, "score", replaces_output=True)
    device, ctx = setup_device(cfg)
    model = load_reward_model(cfg.ckpt, device)
    if cfg.data and looks_like_preferences(cfg.data):  # pairs: both responses, and how often chosen wins
        pairs = load_preferences(cfg.data)
        with ctx:
            both = score_texts(model, [p.prompt for p in pairs] * 2, [p.chosen for p in pairs] +
                               [p.rejected for p in pairs], device, cfg.batch_size)
        chosen, rejected = both[:len(pairs)], both[len(pairs):]
        write_jsonl(run.path("scores.jsonl"), [dict(prompt=p.prompt, chosen=p.chosen, rejected=p.rejected,
                                                    score_chosen=c, score_rejected=r)
                                               for p, c, r in zip(pairs, chosen, rejected)])
        accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)
        t = torch.tensor(both)
        summary = run.summary(pairs=len(pairs), accuracy=accuracy, mean=t.mean().item(), std=t.std(correction=0).item())
        print(f"{plural(len(pairs), 'pair')} scored, chosen and rejected: the chosen response scores higher in "
              f"{accuracy:.1%}; mean {summary['mean']:+.4f}, std {summary['std']:.4f}; {run.dir}/scores.jsonl")
        return 0
    examples = load_sft(cfg.data) if cfg.data else [Example(cfg.prompt, cfg.response)]
    prompts, responses = [ex.prompt for ex in examples], [ex.response for ex in examples]
    with ctx:
        scores = score_texts(model, prompts, responses, device, cfg.batch_size)
    write_jsonl(run.path("scores.jsonl"),
                [dict(prompt=p, response=r, score=s) for p, r, s in zip(prompts, responses, scores)])
    for p, r, s in list(zip(prompts, responses, scores))[:10]:
        print(f"{s:+.4f}  {shorten(p + r)!r}")
    t = torch.tensor(scores)
    summary = run.summary(n=len(scores), mean=t.mean().item(), std=t.std(correction=0).item())
    print(f"{summary['n']} scored: mean {summary['mean']:+.4f}, std {summary['std']:.4f}; {run.dir}/scores.jsonl")
    return 0

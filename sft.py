"""
Supervised fine-tuning, sampling, and best-of-N: the stages that make and read a policy without a reward signal in
its training (best-of-N reads a reward, and needs no training).

    python train.py sft --data=reviews.jsonl.gz                    # a language model on a corpus ({text}, .txt)
    python train.py sft --init_from=out/sft/ckpt.pt --data=chat.jsonl   # SFT on {prompt, response} / {messages}
    python train.py sample --ckpt=out/sft/ckpt.pt --prompt="The movie"
    python train.py bon --init_from=out/sft/ckpt.pt --reward=out/reward/ckpt.pt --prompts=p.txt --n=16
    python train.py sft --init_from=out/sft/ckpt.pt --data=out/bon/selected.jsonl --out_dir=out/sft-bon
                                                                   # rejection-sampling fine-tuning (Llama 2)

SFT: a corpus of plain text is one token stream served in random windows (nanoGPT); prompt/response data trains the
response only (and its EOS), through model.response_logprobs, the log-prob helper of every algorithm. Best-of-N: N
samples per prompt, the one the reward scores highest kept; its exact distribution (best_of_n_probs) is what the
benchmarks read off a pool of samples.

Simplifications, on purpose:
- Under torchrun each process takes a contiguous share of a step's windows or examples; a micro-batch's loss is
  weighted by its share of the batch (its windows, or its response tokens), so the summed gradient is the batch's.
- Best-of-N draws its N samples independently (no deduplication); a tie keeps the first. Rejection-sampling
  fine-tuning is `bon` followed by `sft` on its selected.jsonl, not a loop of its own.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from checkpoint import block_size_for, load_checkpoint, load_policy, model_from_checkpoint, frozen_dtype
from config import ConfigError, ModelConfig, OptimConfig, RunConfig, TrainConfig, opt, plural
from data import (EOS, derived_seed, epoch_indices, get_tokenizer, heldout_split, load_prompts, load_sft, tokenize_pair,
                  write_jsonl)
from dist import all_sum, gather_objects, is_main, micro_batches, my_share, rank_seed, world, world_note
from model import GPT, GPTConfig, layout_batch, response_logprobs, sample_responses, token_logprobs
from reward import RewardSpec, make_reward
from runtime import Run, make_optimizer, optimizer_step, setup_device, shorten

DEFAULT_SFT_DATA = "assets/imdb-train-sample.jsonl.gz,assets/imdb-unsup-sample.jsonl.gz"
SAMPLING = 0  # the random stream of best-of-N's samples: rank_seed(seed, 0, SAMPLING), as ppo.py's first stream


@dataclass
class SFTConfig(TrainConfig, ModelConfig, OptimConfig):
    out_dir: str = opt("out/sft", "run folder")
    data: str = opt(DEFAULT_SFT_DATA, "training data: JSONL(.gz) or .txt, comma-separated files ({text}, IMDb rows, "
                                      "{prompt, response} or {messages}); text is a corpus, pairs train the response")
    eval_data: str = opt("", "evaluation data (default: the last 10% of --data, held out)")
    block_size: int = opt(0, "longest sequence the model sees (0: 256 from scratch, the checkpoint's with "
                             "--init_from; a smaller value than the checkpoint's is fine)", min=0)
    init_from: str = opt("scratch", "scratch, or a policy checkpoint to fine-tune (its shape wins over the model "
                                    "keys)")
    max_docs: int = opt(0, "read at most this many records per file (0: all)", min=0)


# ----------------------------------------------------------------------------------------------------------------
# stage sft: its data (a corpus as one token stream, or prompt/response examples), its loss, its loop

def encode_corpus(texts, desc="tokenizing", chunk_size=1024):
    """Documents -> one flat np.uint16 array of their tokens, each document followed by EOS."""
    texts, enc, parts = list(texts), get_tokenizer(), []
    with tqdm(total=len(texts), desc=desc, unit="doc", disable=None) as bar:  # none in logs, nor on ranks > 0
        for i in range(0, len(texts), chunk_size):
            chunk = enc.encode_ordinary_batch(texts[i:i + chunk_size])  # tiktoken's own threads
            parts.append(np.array([t for ids in chunk for t in ids + [EOS]], dtype=np.uint16))
            bar.update(len(chunk))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


class TokenStream:
    """A token array served as nanoGPT-style batches of random windows: x = tokens[i : i+T], y shifted by one.

    The offsets of batch(step) come from a generator seeded by (seed, step) alone, so a batch is a pure
    function of the step: resuming at step k needs no data-loader state, and no epochs are counted.
    """

    def __init__(self, tokens, block_size, batch_size, seed=0):
        if len(tokens) <= block_size:
            raise ValueError(f"{len(tokens)} tokens cannot fill a window of block_size + 1 = {block_size + 1}")
        self.tokens, self.block_size, self.batch_size, self.seed = tokens, block_size, batch_size, seed

    def batch(self, step, device="cpu"):
        # SeedSequence mixes (seed, step) into one seed; seed * K + step would let two runs share batches
        g = torch.Generator().manual_seed(derived_seed(self.seed, step))
        ix = torch.randint(len(self.tokens) - self.block_size, (self.batch_size,), generator=g).numpy()
        windows = torch.from_numpy(self.tokens[ix[:, None] + np.arange(self.block_size + 1)].astype(np.int64))
        windows = windows.to(device, non_blocking=True)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()  # x, y: (B, T) each


def load_sft_data(paths, limit, block_size):
    """Returns ('corpus', token array) when every record is plain text, else ('pairs', [(prompt_ids, resp_ids)])."""
    examples = load_sft(paths, limit=limit or None)
    if all(ex.prompt == "" for ex in examples):
        return "corpus", encode_corpus([ex.response for ex in examples], desc="tokenizing")
    rows = [tokenize_pair(ex.prompt, [ex.response], block_size) for ex in examples]
    n_trunc = sum(r[2] for r in rows)
    if n_trunc:
        print(f"{n_trunc} of {len(rows)} examples were longer than block_size={block_size} and were truncated")
    return "pairs", [(p, r) for p, (r,), _ in rows]


def example_batch(rows, idx, device):
    """Tokenized (prompt, response) examples idx in the shared layout -> ids, mask (B, P + R) and R."""
    return layout_batch([rows[i][0] for i in idx], [rows[i][1] for i in idx], device)


def sft_loss(model, batch):
    """Mean next-token cross-entropy: over every token of a corpus window (x, y), or over the response tokens
    (and their EOS) of a prompt/response batch (ids, mask, R), through the shared log-prob helpers (model.py), which
    never hold a whole batch's logits. With --compile, a corpus window goes through the compiled module instead,
    loss and all."""
    if len(batch) == 2:
        x, y = batch
        if not isinstance(model, GPT):  # torch.compile(model)
            return model(x, y)[1]
        return -token_logprobs(model, model.hidden(x), y, with_entropy=False)[0].mean()
    ids, mask, R = batch
    logp = response_logprobs(model, ids, mask, R)  # (B, R), 0 off the response
    return -logp.sum() / mask[:, -R:].sum().clamp(min=1)


def sft(cfg):
    init = None if cfg.init_from == "scratch" else load_checkpoint(cfg.init_from, "policy")
    cfg.block_size = block_size_for(cfg, init and init["model_args"]["block_size"])
    run = Run(cfg, "sft")
    device, ctx = setup_device(cfg)
    # 1. data: a corpus (random windows of one token stream) or prompt/response examples
    kind, train_data = load_sft_data(cfg.data, cfg.max_docs, cfg.block_size)
    if cfg.eval_data:
        eval_kind, eval_data = load_sft_data(cfg.eval_data, cfg.max_docs, cfg.block_size)
        if eval_kind != kind:
            raise ConfigError(f"--eval_data={cfg.eval_data} holds {eval_kind}, but --data holds {kind}")
    else:
        train_data, eval_data = heldout_split(train_data)
    if kind == "corpus":
        if len(eval_data) <= cfg.block_size + 1 or len(train_data) <= cfg.block_size + 1:
            raise ConfigError(f"--data: too little text for --block_size={cfg.block_size}")
        train_stream = TokenStream(train_data, cfg.block_size, cfg.batch_size, cfg.seed)
        eval_stream = TokenStream(eval_data, cfg.block_size, cfg.batch_size, cfg.seed + 1)
        eval_batch = lambda i: eval_stream.batch(i, device)

        def train_batches(step):  # this process's micro-batches of the step's windows, each with its share
            x, y = train_stream.batch(step, device)
            for rows in micro_batches(range(cfg.batch_size), cfg.micro_batch_size, optimizer):
                yield (x[rows.start:rows.stop], y[rows.start:rows.stop]), len(rows) / len(x)
        print(f"corpus: {len(train_data):,} training tokens, {len(eval_data):,} held out")
    else:
        eval_batch = lambda i: example_batch(eval_data, epoch_indices(len(eval_data), i, cfg.batch_size, cfg.seed + 1),
                                             device)

        def train_batches(step):  # each micro-batch's share is its share of the batch's response tokens
            idx = epoch_indices(len(train_data), step, cfg.batch_size, cfg.seed)
            n_tokens = sum(len(train_data[i][1]) for i in idx)
            for part in micro_batches(idx, cfg.micro_batch_size, optimizer):
                yield example_batch(train_data, part, device), sum(len(train_data[i][1]) for i in part) / n_tokens
        print(f"examples: {len(train_data):,} prompt/response pairs to train on, {len(eval_data):,} held out")
    # 2. model
    if init is None:
        model = GPT(GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                              block_size=cfg.block_size, dropout=cfg.dropout, bias=cfg.bias))
    else:
        model = model_from_checkpoint(init, cfg.init_from)
    model.to(device)
    optimizer = make_optimizer(model, cfg, device)
    start = run.restore(model, optimizer)
    fwd = model
    if cfg.compile:  # the whole forward with its loss for corpus batches (x, y); the hidden states for SFT pairs
        fwd, _ = torch.compile(model), model.compile_hidden()
    print(f"model: {model.num_params() / 1e6:.2f}M parameters; {cfg.batch_size * cfg.block_size:,} tokens per step; "
          f"{plural(cfg.max_iters, 'step')} on {device} ({cfg.dtype}){world_note(cfg)}")

    @torch.no_grad()
    def evaluate():
        model.eval()
        with ctx:
            losses = torch.stack([sft_loss(fwd, eval_batch(i)) for i in range(cfg.eval_iters)]).tolist()
        model.train()
        return sum(losses) / len(losses)

    # 3. train: gradient accumulation over this process's micro-batches, each loss weighted by its share of the
    #    batch, so the summed gradient (over micro-batches and processes) is the whole batch's
    model.train()
    metrics = {}
    for step in run.steps(start):
        loss = 0.0
        for batch, share in train_batches(step):
            with ctx:
                part = sft_loss(fwd, batch) * share
            part.backward()
            loss = loss + part.detach()
        lr, norm = optimizer_step(model, optimizer, cfg, step, check=False)
        run.check_later(step, loss=loss, grad_norm=norm)  # at the next log or checkpoint: no wait for the GPU here
        # 4. log, evaluate, checkpoint
        done = step + 1
        if run.log_due(done):
            metrics = dict(loss=float(all_sum(loss)), lr=lr, grad_norm=norm)
            if run.eval_due(done):
                metrics["eval/loss"] = evaluate()
            run.log(done, **metrics)
        if run.end_step(done, lambda: run.save(done, model, optimizer)):
            return 130
    if start >= cfg.max_iters and run.ckpt is None:
        run.save(cfg.max_iters, model, optimizer)
    final = run.summary(loss=metrics.get("loss"), **{"eval/loss": evaluate()}, step=cfg.max_iters,
                        params=model.num_params())
    print(f"done: eval loss {final['eval/loss']:.4f}; checkpoint {run.ckpt_path}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# stage sample

@dataclass
class SampleConfig(RunConfig):
    out_dir: str = opt("out/sample", "run folder: samples.jsonl and summary.json (a new sample replaces them)")
    ckpt: str = opt("out/sft/ckpt.pt", "policy checkpoint to sample from")
    prompt: str = opt("", "one prompt (default: the start of a document)")
    prompts: str = opt("", "file of prompts (JSONL {prompt}/{input_text}/{text}, preference files, or .txt lines; "
                           "comma-separated files; - for standard input)")
    num_samples: int = opt(3, "samples per prompt", min=1)
    max_new_tokens: int = opt(0, "tokens to sample per response (0: half the model's block_size)", min=0)
    temperature: float = opt(1.0, "softmax temperature (0: greedy)", min=0.0)
    top_k: int = opt(0, "keep only the k most likely tokens (0: off)", min=0)
    top_p: float = opt(1.0, "nucleus sampling mass, in (0, 1] (1: off)", above=0.0, max=1.0)
    batch_size: int = opt(64, "prompts per generate() call", min=1)


@torch.no_grad()
def sample(cfg):
    run = Run(cfg, "sample", replaces_output=True)
    device, ctx = setup_device(cfg)
    model, _ = load_policy(cfg.ckpt, device)
    max_new_tokens = cfg.max_new_tokens or model.config.block_size // 2
    prompts = load_prompts(cfg.prompts, room=model.config.block_size - max_new_tokens) if cfg.prompts else [cfg.prompt]
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    s = sample_responses(model, [p for p in prompts for _ in range(cfg.num_samples)], max_new_tokens, g, device,
                         ctx, cfg.temperature, cfg.top_k, cfg.top_p, cfg.batch_size, desc="sampling")
    lengths = s.resp_mask.sum(1).long().tolist()
    write_jsonl(run.path("samples.jsonl"),
                [dict(prompt=p, response=r, tokens=n) for p, r, n in zip(s.prompts, s.responses, lengths)])
    for p, r in list(zip(s.prompts, s.responses))[:10]:  # cut, so that a huge prompt is not echoed whole
        print(f"--- {shorten(p)!r}\n{shorten(p)}{shorten(r)}")
    run.summary(samples=len(lengths), mean_tokens=sum(lengths) / len(lengths))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# best-of-N (and, followed by sft on what it keeps, rejection-sampling fine-tuning)

@dataclass
class BoNConfig(RewardSpec, RunConfig):
    out_dir: str = opt("out/bon", "run folder: selected.jsonl ({prompt, response}, for sft), samples.jsonl, summary")
    init_from: str = opt("out/sft/ckpt.pt", "policy checkpoint to sample from")
    prompts: str = opt("", "prompts: .txt lines or JSONL in any data.load_prompts format (required)")
    max_prompts: int = opt(0, "read at most this many prompts (0: all)", min=0)
    n: int = opt(8, "samples per prompt; the best one is kept", min=1)
    max_new_tokens: int = opt(48, "tokens sampled per response", min=1)
    temperature: float = opt(1.0, "sampling temperature", min=0.01)
    batch_size: int = opt(64, "responses per generate() call", min=1)


def select_best(scores, n):
    """Index of each prompt's best sample: scores (P * N,), N consecutive samples per prompt -> (P,) (first on a tie)."""
    r = scores.view(-1, n)
    return r.argmax(1) + torch.arange(r.size(0), device=scores.device) * n


def best_of_n_kl_bound(n):
    """KL(best-of-N || policy) <= log N - (N - 1) / N, with equality when no two samples can tie (Beirami et al.
    2024, arXiv 2401.01879): an upper bound, not a measurement."""
    return math.log(n) - (n - 1) / n


def best_of_n_probs(scores, n, weights=None):
    """The exact distribution of best-of-n over candidates: n independent draws from them (with probabilities
    `weights`, summing to 1 along the last axis; None: uniform, a pool of M samples), the one scoring highest kept,
    tied maxima shared in proportion to their weights (select_best keeps the first drawn: the same in
    distribution). The candidates scoring at most s win with probability F(s)^n, F the weight of {score <= s}, so a
    block of tied candidates wins F(v)^n - F(v-)^n. Distinct scores in a pool give the textbook (i/M)^n -
    ((i-1)/M)^n for rank i; all-equal scores give the weights themselves. scores (..., M) -> (..., M) float64."""
    ordered, order = scores.sort(dim=-1)
    below = torch.searchsorted(ordered, scores.contiguous(), right=False)  # candidates scoring strictly less
    upto = torch.searchsorted(ordered, scores.contiguous(), right=True)  # at most as much
    if weights is None:  # a pool: F in whole counts
        M = scores.size(-1)
        return ((upto.double() / M) ** n - (below.double() / M) ** n) / (upto - below).double()
    w = weights.double()
    cdf = torch.cat([torch.zeros_like(w[..., :1]), w.gather(-1, order).cumsum(-1)], -1).clamp(max=1.0)
    hi, lo = cdf.gather(-1, upto), cdf.gather(-1, below)
    return w * (hi ** n - lo ** n) / (hi - lo).clamp(min=1e-300)


def bon(cfg):
    if not cfg.prompts:
        raise ConfigError("--prompts is required: a file of prompts")
    run = Run(cfg, "bon")
    device, ctx = setup_device(cfg)
    policy, _ = load_policy(cfg.init_from, device)
    reward_fn = make_reward(cfg.reward, device, cfg.reward_weights, cfg.reward_combine, cfg.unsafe_prompts,
                            cfg.batch_size, frozen_dtype(cfg))
    all_prompts = load_prompts(cfg.prompts, cfg.max_prompts or None, policy.config.block_size - cfg.max_new_tokens)
    prompts = my_share(all_prompts)  # under torchrun each process samples its share; rank 0 gathers and writes
    # N samples per prompt, scored; keep each prompt's best (Llama 2's rejection sampling keeps the same)
    g = torch.Generator(device=device).manual_seed(rank_seed(cfg.seed, 0, SAMPLING))
    per_call = max(1, cfg.batch_size // cfg.n)
    selected, samples, all_scores = [], [], []
    for i in tqdm(range(0, len(prompts), per_call), desc=f"best-of-{cfg.n}", disable=None, leave=False):
        s = sample_responses(policy, [p for p in prompts[i:i + per_call] for _ in range(cfg.n)], cfg.max_new_tokens,
                             g, device, ctx, cfg.temperature)
        with ctx:
            scores = reward_fn(s.prompts, s.responses).float()
        best = set(select_best(scores, cfg.n).tolist())
        selected += [dict(prompt=s.prompts[j], response=s.responses[j]) for j in sorted(best)]
        samples += [dict(prompt=p, response=r, score=x, selected=j in best)
                    for j, (p, r, x) in enumerate(zip(s.prompts, s.responses, scores.tolist()))]
        all_scores.append(scores)
    if world() > 1:
        parts = gather_objects((selected, samples, torch.cat(all_scores).cpu()))
        selected, samples = [x for p in parts for x in p[0]], [x for p in parts for x in p[1]]
        all_scores, prompts = [p[2] for p in parts], all_prompts
    if is_main():
        write_jsonl(run.path("selected.jsonl"), selected)
        write_jsonl(run.path("samples.jsonl"), samples)
    all_scores = torch.cat(all_scores)
    best_scores = [x["score"] for x in samples if x["selected"]]
    summary = {"score/best": sum(best_scores) / len(best_scores), "score/all": all_scores.mean().item(),
               "kl/bound": best_of_n_kl_bound(cfg.n), "n": cfg.n, "prompts": len(prompts)}
    print(f"best-of-{cfg.n} on {plural(len(prompts), 'prompt')}: mean score of the best {summary['score/best']:.4f}, "
          f"of all {summary['score/all']:.4f}; KL(best-of-N || policy) <= {summary['kl/bound']:.4f} nats; fine-tune "
          f"on the kept responses with: python train.py sft --init_from={cfg.init_from} "
          f"--data={run.path('selected.jsonl')} --out_dir={run.path('sft')}")
    run.summary(**summary)
    return 0

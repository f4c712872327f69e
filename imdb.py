"""
The IMDb controlled-sentiment benchmark (the DPO paper, Rafailov et al. 2023, section 6.1; TRL's gpt2-sentiment):
a policy continues the start of a movie review, and a gold sentiment classifier says how positive the result is.

Here: the data, the gold reward, and the pipeline (stage `pipeline`, what `python train.py` runs) with its report.

    python imdb.py download --dest=data/imdb      # users with internet: the official archive, checked, converted once
    python imdb.py gold --train=../shared/data/imdb/train.jsonl.gz --test=../shared/data/imdb/test.jsonl.gz \\
        --out=assets/gold-imdb.pt                 # retrain the gold reward (about a minute on 2 CPU cores)

Data. The full dataset is read from a folder holding {train,test,unsup}.jsonl.gz (rows {id, rating, label, text},
see data.load_imdb); a 4,000-row sample ships in assets/ for the default run and the tests.

Gold reward. P(positive) from a logistic regression on hashed word unigrams and bigrams, trained on the 25k
labelled train reviews. It shares nothing with the proxy reward model (a GPT trunk on BPE tokens) but the data, so
that overoptimising the proxy shows up as a gap between the two. It is a fixed artifact, assets/gold-imdb.pt,
whose sha256 is pinned below: numbers from different runs and commits use the same judge.

The cpu preset's SFT model, assets/sft-imdb-cpu.pt (sha256 pinned below), is the 2-layer, 64-wide GPT trained ahead
of time on one GPU on the full train + unsup text (6,000 steps; the command is in the README) and stored by
`python imdb.py freeze` as fp16 weights. Two CPU cores cannot train a usable one in the default run's minutes
(250 steps leave eval loss 7.0 and near-gibberish samples, from which no method learns); --sft=train does anyway.

Simplifications, on purpose:
- The gold reward is a bag of n-grams, not the fine-tuned transformer of the papers (DistilBERT / SiEBERT):
  about 90% test accuracy instead of about 93-95%, but it trains in a minute on a CPU and fits in 2 MB.
- N-grams are hashed (CRC-32, stable across runs and machines) into 2^20 buckets, with no vocabulary file;
  colliding n-grams share a weight.
- Features are binary (does the review contain the n-gram), scaled to unit length, as in NBSVM-style baselines
  (Wang & Manning 2012); no tf-idf, no Naive Bayes ratios.
"""
import argparse
import functools
import gzip
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import DataError, decode, encode, load_imdb, read_jsonl
from train import (ConfigError, RunConfig, Run, TrainingError, load_checkpoint, load_policy, opt, save_checkpoint,
                   read_json, setup_device, write_json)

ROOT = os.path.dirname(os.path.abspath(__file__))
SPLITS = ("train", "test", "unsup")
# the official archive; its size and sha256 are those pinned in TensorFlow Datasets (url_checksums/imdb_reviews.txt)
ACLIMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
ACLIMDB_SIZE = 84_125_825
ACLIMDB_SHA256 = "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"

GOLD_PATH = os.path.join(ROOT, "assets", "gold-imdb.pt")
GOLD_SHA256 = "72c7db01510126743712965ab11057f25e0764e53b57a7ae4ead9b9315d975e8"
# the cpu preset's SFT model, trained ahead of time on the full train + unsup text (see freeze_policy)
SFT_CPU_PATH = os.path.join(ROOT, "assets", "sft-imdb-cpu.pt")
SFT_CPU_SHA256 = "7b8011439137f8c1669b4611763ebec8437456661222c48109dffc9d47c566c3"


# -----------------------------------------------------------------------------
# data: the full dataset from a folder, or from the official archive

def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path, sha256, what):
    """Refuse a committed artifact that is missing or not the one pinned: a one-line DataError naming the file."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    got = file_sha256(path)
    if got != sha256:
        raise DataError(f"{path}: sha256 {got[:16]}... is not {what}'s {sha256[:16]}...; the file is damaged or "
                        f"not the committed one")


def imdb_files(path):
    """{split: file} of the folder `path`, which must hold train, test and unsup .jsonl.gz."""
    files = {s: os.path.join(path, f"{s}.jsonl.gz") for s in SPLITS}
    for f in files.values():
        if not os.path.isfile(f):
            raise DataError(f"{f}: no such file (make the folder with `python imdb.py download --dest={path}`)")
    return files


def convert_aclimdb(extracted_dir, dest):
    """The aclImdb folder tree -> dest/{train,test,unsup}.jsonl.gz, one {id, rating, label, text} per line.

    Files are named {id}_{rating}.txt; rows are in the order neg (by id), then pos (by id). The text is kept
    as written, <br /> tags included (data.load_imdb cleans them)."""
    os.makedirs(dest, exist_ok=True)
    for split, folders in (("train", ("train/neg", "train/pos")), ("test", ("test/neg", "test/pos")),
                           ("unsup", ("train/unsup",))):
        rows = []
        for folder in folders:
            full = os.path.join(extracted_dir, folder)
            if not os.path.isdir(full):
                raise DataError(f"{full}: no such folder; expected the aclImdb tree (train/, test/)")
            label = {"neg": 0, "pos": 1, "unsup": -1}[os.path.basename(folder)]
            names = [n for n in os.listdir(full) if re.fullmatch(r"\d+_\d+\.txt", n)]
            for name in sorted(names, key=lambda n: int(n.split("_")[0])):
                review_id, rating = map(int, name[:-4].split("_"))
                rows.append((os.path.join(full, name), dict(id=review_id, rating=rating, label=label)))
        out = os.path.join(dest, f"{split}.jsonl.gz")
        tmp = out + ".tmp"
        # mtime=0: the same reviews give the same bytes
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            for file, row in tqdm(rows, desc=f"converting {split}", unit="review", disable=None):
                with open(file, encoding="utf-8", newline="") as review:  # newline="": the text as written
                    f.write((json.dumps(dict(row, text=review.read())) + "\n").encode())
        os.replace(tmp, out)


def download_imdb(dest):
    """Fetch the official aclImdb archive (needs internet), check its size and sha256, convert it into
    dest/{train,test,unsup}.jsonl.gz and delete the archive. Does nothing if the files are already there."""
    if all(os.path.isfile(os.path.join(dest, f"{s}.jsonl.gz")) for s in SPLITS):
        return imdb_files(dest)
    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        archive, digest = os.path.join(tmp, "aclImdb_v1.tar.gz"), hashlib.sha256()
        with urllib.request.urlopen(ACLIMDB_URL, timeout=60) as r, open(archive, "wb") as f, \
                tqdm(total=ACLIMDB_SIZE, unit="B", unit_scale=True, desc="aclImdb_v1.tar.gz", disable=None) as bar:
            while chunk := r.read(1 << 20):
                f.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        size = os.path.getsize(archive)
        if size != ACLIMDB_SIZE or digest.hexdigest() != ACLIMDB_SHA256:
            raise DataError(f"{ACLIMDB_URL}: got {size:,} bytes with sha256 {digest.hexdigest()[:16]}..., "
                            f"expected {ACLIMDB_SIZE:,} bytes with sha256 {ACLIMDB_SHA256[:16]}...")
        with tarfile.open(archive) as t:
            t.extractall(tmp, filter="data")  # filter: no absolute paths or links out of tmp
        convert_aclimdb(os.path.join(tmp, "aclImdb"), dest)
    return imdb_files(dest)


# -----------------------------------------------------------------------------
# the gold reward: logistic regression on hashed word n-grams

WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[!?]")  # lowercased words (with "n't", "'s" attached), "!" and "?"


def ngram_ids(text, n_buckets, n=2):
    """The distinct hashed word n-grams (1..n) of a text -> sorted bucket ids. CRC-32, unlike Python's hash(), is
    the same in every process, so a saved model means the same thing everywhere."""
    words = WORD.findall(text.lower())
    grams = [" ".join(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1)]
    return sorted({zlib.crc32(g.encode()) % n_buckets for g in grams})


def bags(id_lists):
    """Bucket-id lists -> EmbeddingBag inputs (flat ids, offsets, per-id weights); each bag scaled to unit L2
    norm (weight 1/sqrt(size)), so long and short reviews get logits of the same scale."""
    flat = torch.tensor([i for ids in id_lists for i in ids], dtype=torch.long)
    sizes = torch.tensor([len(ids) for ids in id_lists], dtype=torch.long)
    offsets = torch.cumsum(sizes, 0) - sizes
    weights = torch.repeat_interleave(sizes.clamp(min=1).float().rsqrt(), sizes)
    return flat, offsets, weights


class NgramLogReg(nn.Module):
    """logit = bias + sum over the text's n-grams of weight[bucket] / sqrt(number of n-grams)."""

    def __init__(self, n_buckets):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_buckets))  # zeros: a convex problem, no init noise needed
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, flat, offsets, weights):
        bag = F.embedding_bag(flat, self.weight[:, None], offsets, mode="sum", per_sample_weights=weights)
        return bag.squeeze(1) + self.bias  # (B,)


class GoldReward:
    """The gold sentiment judge: reward(prompts, responses) -> P(positive) of each prompt + response text."""

    def __init__(self, model, n_buckets, n):
        self.model, self.n_buckets, self.n = model.eval(), n_buckets, n

    @classmethod
    def load(cls, path=GOLD_PATH, sha256=GOLD_SHA256):
        """Load an artifact (weights_only), refusing one whose sha256 is not `sha256` (None: do not check)."""
        if sha256 is not None:
            check_sha256(path, sha256, "the gold reward")
        ckpt = load_checkpoint(path, "gold")
        model = NgramLogReg(ckpt["n_buckets"])
        model.load_state_dict({k: v.float() for k, v in ckpt["model"].items()})
        return cls(model, ckpt["n_buckets"], ckpt["ngrams"])

    @torch.no_grad()
    def logits(self, texts):
        return self.model(*bags([ngram_ids(t, self.n_buckets, self.n) for t in texts]))  # (B,)

    def __call__(self, prompts, responses):
        return torch.sigmoid(self.logits([p + r for p, r in zip(prompts, responses)])).tolist()


@functools.lru_cache(maxsize=1)
def default_gold():
    """The committed gold reward, loaded (and checksummed) once."""
    return GoldReward.load()


def gold_reward(prompts, responses):
    """The committed gold reward as a plain function (for ppo's --reward=imdb.py:gold_reward)."""
    return default_gold()(prompts, responses)


POSITIVE_WORDS = frozenset("""good great excellent wonderful amazing best love loved beautiful brilliant perfect
fantastic superb enjoyed enjoy favorite fun funny masterpiece touching recommend highly outstanding""".split())
NEGATIVE_WORDS = frozenset("""bad worst awful terrible boring waste poor horrible stupid dull worse mess
disappointing disappointed lame annoying pointless ridiculous fails failed unfortunately""".split())


def sentiment_words(prompts, responses):
    """A programmatic reward (for ppo's --reward=imdb.py:sentiment_words): positive minus negative lexicon words in
    the response, capped at +-5 so that repeating one word cannot pay without bound."""
    scores = []
    for r in responses:
        words = re.findall(r"[a-z']+", r.lower())
        s = sum(w in POSITIVE_WORDS for w in words) - sum(w in NEGATIVE_WORDS for w in words)
        scores.append(float(max(-5, min(5, s))))
    return scores


def train_gold(train_path, test_path, out_path, seed=0, n_buckets=2**20, n=2, epochs=3, batch_size=512, lr=0.1):
    """Train the gold reward on labelled IMDb rows, evaluate it on others, write the artifact atomically.
    Returns dict(accuracy (test), train_accuracy, sha256, seconds); accuracies are those of the saved fp16 weights."""
    t0 = time.time()
    # 1. features: the labelled rows only (unsup rows have label -1)
    splits = {}
    for name, path in (("train", train_path), ("test", test_path)):
        rows = [r for r in load_imdb(path) if r["label"] >= 0]
        if not rows:
            raise DataError(f"{path}: no labelled rows")
        ids = [ngram_ids(r["text"], n_buckets, n) for r in tqdm(rows, desc=f"n-grams {name}", disable=None)]
        splits[name] = ids, torch.tensor([float(r["label"]) for r in rows])
    ids, labels = splits["train"]
    # 2. train: minibatch Adam on the logistic loss, data order from a seeded generator. No weight decay: the few
    # epochs of Adam are the regularisation (hyperparameters chosen on a 5k split of train, never on test)
    model = NgramLogReg(n_buckets)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(ids) / batch_size)
    bar = tqdm(total=steps, desc="gold", disable=None)
    for _ in range(epochs):
        order = torch.randperm(len(ids), generator=g).tolist()
        for i in range(0, len(order), batch_size):
            batch = order[i:i + batch_size]
            loss = F.binary_cross_entropy_with_logits(model(*bags([ids[j] for j in batch])), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    # 3. round to fp16, the precision saved, so that the accuracy reported is that of the artifact
    state = {k: v.detach().half() for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.float() for k, v in state.items()})
    with torch.no_grad():
        acc = {name: ((model(*bags(x)) > 0).float() == y).float().mean().item() for name, (x, y) in splits.items()}
    save_checkpoint(out_path, dict(kind="gold", model=state, n_buckets=n_buckets, ngrams=n, seed=seed,
                                   accuracy=acc["test"], train_rows=len(ids), test_rows=len(splits["test"][0])))
    return dict(accuracy=acc["test"], train_accuracy=acc["train"], sha256=file_sha256(out_path),
                seconds=time.time() - t0)


def freeze_policy(src, dst):
    """A policy checkpoint -> its weights in fp16 and its shape, nothing else (no optimizer, RNG or config): the form
    in which the cpu preset's SFT model is committed. Tied weights (wte = lm_head) are stored once."""
    model, ckpt = load_policy(src, "cpu")
    half = {}  # by storage: tied parameters stay one tensor
    state = {k: half.setdefault(v.data_ptr(), v.half()) for k, v in model.state_dict().items()}
    save_checkpoint(dst, dict(kind="policy", stage=ckpt.get("stage"), step=ckpt.get("step"), model=state,
                              model_args=ckpt["model_args"]))
    return file_sha256(dst)


# -----------------------------------------------------------------------------
# the pipeline: SFT -> prompts -> simulated preferences -> proxy reward model -> every method -> evaluation

# Everything the presets set. The cpu preset is the main job (python train.py, ~7 minutes on 2 cores, on the committed
# sample, from the committed SFT model: its `sft` keys apply only with --sft=train); the gpu preset is the benchmark
# (one H100, ~10 minutes, on the full data of --imdb_dir, SFT included).
PRESETS = {
    "cpu": dict(
        imdb_dir="", sft=dict(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=16, max_iters=250,
                               learning_rate=2e-3, warmup_iters=20, eval_interval=125),
        sft_ckpt=SFT_CPU_PATH, n_train_prompts=2000, n_eval_prompts=256, max_new_tokens=20, jobs=2, seeds=[1],
        reward=dict(learning_rate=1e-3, epochs=1),
        methods=dict(ppo=[0.05], ppo_gt=[0.05], dpo=[0.1], rloo=[0.05], grpo=[0.04]),
        rl=dict(batch_size=32, minibatch_size=16, micro_batch_size=32, max_iters=20, learning_rate=3e-4,
                whiten_scores=True, eval_interval=1000), dpo=dict(batch_size=32, max_iters=56, learning_rate=3e-4),
        bon_prompts=64, bon_pool=64),
    "gpu": dict(
        imdb_dir="../shared/data/imdb", sft=dict(n_layer=6, n_head=6, n_embd=384, block_size=128, batch_size=128,
                                                 max_iters=2500, learning_rate=1e-3, warmup_iters=200,
                                                 eval_interval=500, compile=True),
        n_train_prompts=4096, n_eval_prompts=512, max_new_tokens=48, jobs=5, seeds=[1, 2],
        reward=dict(),
        methods=dict(ppo=[0.05, 0.1, 0.15, 0.2], ppo_gt=[0.02], dpo=[0.05, 0.1, 0.25, 0.5], rloo=[0.05, 0.1],
                     grpo=[0.04, 0.1]),
        rl=dict(batch_size=128, minibatch_size=32, micro_batch_size=64, max_iters=40, learning_rate=2e-5,
                eval_interval=1000), dpo=dict(batch_size=64, max_iters=170, learning_rate=5e-5),
        bon_prompts=256, bon_pool=256),
    # for the tests: every phase and method runs in seconds; the numbers mean nothing
    "tiny": dict(
        imdb_dir="", sft=dict(n_layer=1, n_head=2, n_embd=32, block_size=48, batch_size=8, max_iters=10,
                               learning_rate=3e-3, warmup_iters=2, eval_interval=10, eval_iters=2),
        n_train_prompts=24, n_eval_prompts=8, max_new_tokens=8, jobs=2, seeds=[1], reward=dict(learning_rate=1e-3),
        methods=dict(ppo=[0.05], ppo_gt=[0.05], dpo=[0.1], rloo=[0.05], grpo=[0.04]),
        rl=dict(batch_size=8, minibatch_size=8, micro_batch_size=8, max_iters=2, learning_rate=1e-4,
                eval_interval=1000), dpo=dict(batch_size=8, max_iters=2, learning_rate=1e-4),
        bon_prompts=4, bon_pool=4),
}
BON_NS = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class PipelineConfig(RunConfig):
    out_dir: str = opt("out/imdb", "run folder of the whole benchmark; each sub-run gets a folder inside it")
    preset: str = opt("cpu", "cpu (the main job: ~7 min on 2 cores, committed sample), gpu (the full sweep, "
                             "one H100, ~10 min) or tiny (seconds, for the tests)")
    imdb_dir: str = opt("", "folder with IMDb {train,test,unsup}.jsonl.gz (default: the preset's; cpu: the "
                            "committed sample)")
    jobs: int = opt(0, "sub-runs at once (0: the preset's; several share one GPU well)", min=0)
    methods: str = opt("", "comma-separated subset of ppo,ppo_gt,dpo,rloo,grpo (default: all)")
    sft: str = opt("", "the SFT model: train (train it in this run), a policy checkpoint to start from, or '' (the "
                       "preset's: cpu starts from the committed assets/sft-imdb-cpu.pt, gpu and tiny train)")


def sub_run(stage, out_dir, args, threads=0):
    """`python train.py STAGE ARGS` as a subprocess writing to out_dir/log.txt. A sub-run whose summary.json exists
    is done and skipped; one that was killed resumes from its checkpoint. So a killed pipeline, run again,
    continues where it stopped."""
    if os.path.exists(os.path.join(out_dir, "summary.json")):
        return None
    os.makedirs(out_dir, exist_ok=True)
    resume = ["--resume"] if os.path.exists(os.path.join(out_dir, "ckpt.pt")) else []
    log = open(os.path.join(out_dir, "log.txt"), "a")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), stage, *args, f"--out_dir={out_dir}", *resume]
    log.write(" ".join(cmd) + "\n")
    log.flush()
    env = dict(os.environ, TQDM_DISABLE="1", **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)


def run_all(jobs, desc, max_jobs, cpu=False):
    """Run [(stage, out_dir, args)] at most max_jobs at a time, with a progress bar; fail on the first failure.
    On the CPU (cpu=True) the cores are shared out: each sub-run gets cores // max_jobs threads."""
    threads = max(1, (os.cpu_count() or 1) // max_jobs) if cpu else 0
    pending, running = list(jobs), []
    with tqdm(total=len(pending), desc=desc, dynamic_ncols=True) as bar:
        while pending or running:
            while pending and len(running) < max_jobs:
                stage, out_dir, args = pending.pop(0)
                p = sub_run(stage, out_dir, args, threads)
                if p is None:
                    bar.update(1)
                else:
                    running.append((p, out_dir))
            for p, out_dir in list(running):
                if p.poll() is not None:
                    running.remove((p, out_dir))
                    bar.update(1)
                    if p.returncode != 0:
                        for q, _ in running:
                            q.terminate()
                        with open(os.path.join(out_dir, "log.txt")) as f:
                            tail = f.read().strip().splitlines()[-1:] or ["(no output)"]
                        raise TrainingError(f"{out_dir}: sub-run failed ({tail[0][:200]}); see its log.txt")
            time.sleep(0.2)


def write_prompts(rows, path, n, seed):
    """Review prefixes of 2-8 tokens (the DPO paper's IMDb prompts), one {prompt} per line."""
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for r in rows[:n]:
        k = int(torch.randint(2, 9, (1,), generator=g))
        prompts.append(decode(encode(r["text"])[:k]))
    with open(path, "w") as f:
        f.writelines(json.dumps(dict(prompt=p)) + "\n" for p in prompts)
    return prompts


def bon_curve(select, gold, proxy):
    """Best-of-N from a pool of M samples per prompt, N in BON_NS, as exact expectations over the pool.

    select, gold, proxy: (prompts, M). Best-of-N draws N of the M with replacement and keeps the one `select` ranks
    highest: the sample of rank i (1..M) wins with probability (i/M)^N - ((i-1)/M)^N. Returns, per N: the expected
    gold and proxy rewards and the KL of that selection from the pool, sum_i p_i log(M p_i), which tends to the
    analytic log N - (N-1)/N as M grows (notes #29)."""
    M = select.size(1)
    order = select.argsort(dim=1)
    gold, proxy = gold.gather(1, order), proxy.gather(1, order)
    i = torch.arange(1, M + 1, dtype=torch.float64)
    out = []
    for N in BON_NS:
        p = ((i / M) ** N - ((i - 1) / M) ** N)  # (M,)
        kl = float((p * torch.log(M * p)).sum())
        out.append(dict(n=N, gold=float((gold.double() * p).sum(1).mean()), proxy=float((proxy.double() * p).sum(1)
                   .mean()), kl=kl, kl_analytic=math.log(N) - (N - 1) / N))
    return out


def evaluate_all(policies, ref_path, eval_prompts, proxy_path, cfg, max_new_tokens, out_dir):
    """Every policy on the held-out prefixes at temperature 1: gold reward, proxy reward, KL(pi || pi_ref) as the
    mean over samples of the sum over tokens of log pi - log pi_ref. Samples go to out_dir/samples/NAME.jsonl."""
    from ppo import evaluate_policy
    from reward import load_reward_model, score_texts
    device, ctx = setup_device(cfg)
    ref, _ = load_policy(ref_path, device)
    proxy = load_reward_model(proxy_path, device)
    gold = lambda p, r: torch.tensor(gold_reward(p, r))
    os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
    results = {}
    for name, path in tqdm(policies.items(), desc="evaluate", dynamic_ncols=True):
        policy = ref if path == ref_path else load_policy(path, device)[0]
        with ctx:
            ev = evaluate_policy(policy, ref, eval_prompts, gold, device, ctx, max_new_tokens, batch_size=256,
                                 temperature=1.0, seed=cfg.seed)
            prox = score_texts(proxy, [s["prompt"] for s in ev["samples"]], [s["response"] for s in ev["samples"]],
                               device)
        with open(os.path.join(out_dir, "samples", f"{name}.jsonl"), "w") as f:
            for s, pr in zip(ev["samples"], prox):
                f.write(json.dumps(dict(prefix=s["prompt"], response=s["response"], gold=s["score"], proxy=pr,
                                        kl=s["kl"])) + "\n")
        results[name] = dict(gold=ev["score"], proxy=sum(prox) / len(prox), kl=ev["kl"], length=ev["length"])
    return results


@torch.no_grad()
def sft_samples(sft_path, prompts, k, cfg, max_new_tokens, seed, desc):
    """k samples of the SFT policy per prompt at temperature 1, in batches of 512 -> (prompts repeated k times each,
    responses), the k samples of a prompt next to each other."""
    from train import sample_responses
    device, ctx = setup_device(cfg)
    policy, _ = load_policy(sft_path, device)
    g = torch.Generator(device=device).manual_seed(seed)
    todo = [p for p in prompts for _ in range(k)]
    return todo, sample_responses(policy, todo, max_new_tokens, g, device, ctx, 1.0, batch_size=512, desc=desc).responses


def best_of_n(sft_path, proxy_path, prompts, pool, cfg, max_new_tokens):
    """Pool `pool` SFT samples per prompt at temperature 1, score them with both rewards, and read off best-of-N
    selected by the proxy and by the gold reward."""
    from reward import load_reward_model, score_texts
    todo, responses = sft_samples(sft_path, prompts, pool, cfg, max_new_tokens, cfg.seed + 7, "best-of-n pool")
    device, ctx = setup_device(cfg)
    proxy = load_reward_model(proxy_path, device)
    gold = torch.tensor(gold_reward(todo, responses)).view(len(prompts), pool)
    with ctx:
        prox = torch.tensor(score_texts(proxy, todo, responses, device)).view(len(prompts), pool)
    return dict(proxy=bon_curve(prox, gold, prox), gold=bon_curve(gold, gold, prox))


def label_pairs(prompts, first, second, seed):
    """Simulated human labels: for each prompt and its two responses, the first is preferred with probability
    sigmoid(gold_logit(first) - gold_logit(second)) (a Bradley-Terry draw on the gold classifier's logits).
    Returns ([{prompt, chosen, rejected}], agreement), agreement = the share of labels that pick the response the
    gold reward scores higher."""
    logit = default_gold().logits([p + r for p, r in zip(prompts, first)] + [p + r for p, r in zip(prompts, second)])
    la, lb = logit.view(2, -1)
    first_wins = torch.rand(len(prompts), generator=torch.Generator().manual_seed(seed)) < torch.sigmoid(la - lb)
    rows = [dict(prompt=p, chosen=a if w else b, rejected=b if w else a)
            for p, a, b, w in zip(prompts, first, second, first_wins.tolist())]
    return rows, ((la > lb) == first_wins).float().mean().item()


def simulate_preferences(sft_path, prompts, cfg, max_new_tokens, path):
    """Two SFT samples per training prefix at temperature 1, labelled by label_pairs, written to `path`. Returns the
    labels' agreement with the gold reward."""
    _, responses = sft_samples(sft_path, prompts, 2, cfg, max_new_tokens, cfg.seed + 3, "preference samples")
    rows, agreement = label_pairs(prompts, responses[0::2], responses[1::2], cfg.seed + 4)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return agreement


def pipeline(cfg):
    preset = PRESETS.get(cfg.preset)
    if preset is None:
        raise ConfigError(f"--preset={cfg.preset}: expected one of {', '.join(PRESETS)}")
    run = Run(cfg, "pipeline")
    out = run.dir
    jobs = cfg.jobs or preset["jobs"]
    methods = cfg.methods.split(",") if cfg.methods else list(preset["methods"])
    for m in methods:
        if m not in PRESETS["cpu"]["methods"]:
            raise ConfigError(f"--methods: unknown method {m!r}; expected some of {', '.join(PRESETS['cpu']['methods'])}")
    imdb_dir = cfg.imdb_dir or preset["imdb_dir"]
    if imdb_dir:
        files = imdb_files(imdb_dir)
    else:
        files = {s: os.path.join(ROOT, "assets", f"imdb-{s}-sample.jsonl.gz") for s in SPLITS}
    timings, t0 = {}, time.time()
    dev = [f"--device={cfg.device}", f"--dtype={cfg.dtype}"]
    phase = lambda name: timings.__setitem__(name, round(time.time() - t0 - sum(timings.values()), 1))

    # 1. SFT: a tiny GPT trained on the review text (train + unsup), here or ahead of time (the committed model)
    sft = cfg.sft or preset.get("sft_ckpt", "train")
    if sft == "train":
        sft_dir = os.path.join(out, "sft")
        sft_args = [f"--data={files['train']},{files['unsup']}", f"--seed={cfg.seed}", *dev,
                    *(f"--{k}={v}" for k, v in preset["sft"].items())]
        run_all([("sft", sft_dir, sft_args)], "1/6 sft", 1)
        sft_ckpt = os.path.join(sft_dir, "ckpt.pt")
    else:
        if sft == SFT_CPU_PATH:
            check_sha256(sft, SFT_CPU_SHA256, "the committed SFT model")
        sft_ckpt = os.path.abspath(sft)
    block_size = load_checkpoint(sft_ckpt, "policy")["model_args"]["block_size"]  # a bad --sft fails here, in one line
    if sft != "train":
        print(f"1/6 sft: starting from {sft}")
    phase("sft")

    # 2. prompts: 2-8 token prefixes of train reviews for training, of test reviews for evaluation only
    train_rows, test_rows = load_imdb(files["train"]), load_imdb(files["test"])
    shuffle = lambda rows, s: [rows[i] for i in torch.randperm(len(rows), generator=torch.Generator().manual_seed(s))]
    train_prompts = write_prompts(shuffle(train_rows, cfg.seed), os.path.join(out, "prompts_train.jsonl"),
                                  preset["n_train_prompts"], cfg.seed)
    eval_prompts = write_prompts(shuffle(test_rows, cfg.seed + 1), os.path.join(out, "prompts_eval.jsonl"),
                                 preset["n_eval_prompts"], cfg.seed + 1)

    # 3. preferences: pairs of SFT samples labelled by a simulated (Bradley-Terry) human with the gold reward
    prefs = os.path.join(out, "preferences.jsonl")
    if not os.path.exists(prefs):
        agreement = simulate_preferences(sft_ckpt, train_prompts, cfg, preset["max_new_tokens"], prefs + ".tmp")
        os.replace(prefs + ".tmp", prefs)
        write_json(os.path.join(out, "preferences_agreement.json"), dict(agreement=agreement))
    agreement = read_json(os.path.join(out, "preferences_agreement.json"))["agreement"]
    phase("preferences")

    # 4. the proxy reward model, from the SFT trunk, normalised on SFT samples
    rm_dir = os.path.join(out, "reward")
    run_all([("reward", rm_dir, [f"--data={prefs}", f"--init_from={sft_ckpt}", f"--policy={sft_ckpt}",
                                 f"--max_new_tokens={preset['max_new_tokens']}", f"--block_size={block_size}",
                                 f"--seed={cfg.seed}", *dev, *(f"--{k}={v}" for k, v in preset["reward"].items())])],
            "2/6 reward model", 1)
    proxy = os.path.join(rm_dir, "ckpt.pt")
    rm_acc = read_json(os.path.join(rm_dir, "summary.json")).get("eval/accuracy")
    phase("reward")

    # 5. every method at every KL strength and seed, several sub-runs at once
    # Continuations are cut at max_new_tokens by design (as in the DPO paper), so the no-EOS rule is off, and the
    # policies sample at temperature 1, the temperature at which they are evaluated.
    rl = [f"--init_from={sft_ckpt}", f"--prompts={out}/prompts_train.jsonl", "--no_eos_rule=keep",
          "--temperature=1.0", f"--max_new_tokens={preset['max_new_tokens']}", *dev,
          *(f"--{k}={v}" for k, v in preset["rl"].items())]
    stage_args = dict(
        ppo=("ppo", rl + [f"--reward={proxy}"], "kl_coef"), ppo_gt=("ppo", rl + ["--reward=imdb.py:gold_reward"],
                                                                    "kl_coef"),
        rloo=("rloo", rl + [f"--reward={proxy}"], "kl_coef"), grpo=("grpo", rl + [f"--reward={proxy}"], "kl_coef"),
        dpo=("dpo", [f"--init_from={sft_ckpt}", f"--data={prefs}", *dev,
                     *(f"--{k}={v}" for k, v in preset["dpo"].items())], "beta"))
    todo, policies = [], {"sft": sft_ckpt}
    for m in methods:
        stage, args, beta_key = stage_args[m]
        for beta in preset["methods"][m]:
            for seed in preset["seeds"]:
                name = f"{m}_beta{beta}_seed{seed}"
                todo.append((stage, os.path.join(out, "runs", name), args + [f"--{beta_key}={beta}", f"--seed={seed}"]))
                policies[name] = os.path.join(out, "runs", name, "ckpt.pt")
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    run_all(todo, "3/6 methods", jobs, cpu=on_cpu)
    phase("methods")

    # 6. evaluation on held-out prefixes, and best-of-N from the SFT policy
    results = evaluate_all(policies, sft_ckpt, eval_prompts, proxy, cfg, preset["max_new_tokens"], out)
    phase("evaluate")
    bon = best_of_n(sft_ckpt, proxy, eval_prompts[:preset["bon_prompts"]], preset["bon_pool"], cfg,
                    preset["max_new_tokens"])
    phase("best_of_n")
    report = dict(preset=cfg.preset, device=cfg.device, preference_agreement=agreement, reward_accuracy=rm_acc,
                  timings_s=timings, policies=results, best_of_n=bon)
    write_json(os.path.join(out, "results.json"), report)
    write_report(report, out)
    phase("report")
    sft_gold = results["sft"]["gold"]
    print(open(os.path.join(out, "results.md")).read())
    run.summary(**{"sft/gold": sft_gold, "reward/accuracy": rm_acc, "preference_agreement": agreement,
                   **{f"{n}/gold": r["gold"] for n, r in results.items()},
                   **{f"{n}/kl": r["kl"] for n, r in results.items()}, "seconds": time.time() - t0})
    return 0


def method_of(name):
    return name.split("_beta")[0]


def write_report(report, out):
    """results.md (a table per policy, and best-of-N), frontier.png (gold reward against KL), overoptimisation.png
    (proxy and gold reward against KL)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    res, bon = report["policies"], report["best_of_n"]
    lines = [f"IMDb controlled sentiment, preset {report['preset']} on {report['device']}: preference labels agree "
             f"with the gold reward on {report['preference_agreement']:.1%} of pairs; proxy reward model eval "
             f"accuracy {report['reward_accuracy']:.1%}.", "",
             "| policy | gold reward | proxy reward | KL(pi‖ref) nats | response tokens |", "|---|---|---|---|---|"]
    for name, r in sorted(res.items(), key=lambda kv: (method_of(kv[0]), kv[0])):
        lines.append(f"| {name} | {r['gold']:.3f} | {r['proxy']:+.3f} | {r['kl']:.2f} | {r['length']:.1f} |")
    lines += ["", "| best-of-N | N | gold reward | proxy reward | KL (pool) | log N - (N-1)/N |", "|---|---|---|---|---|---|"]
    for sel in ("proxy", "gold"):
        for r in bon[sel]:
            lines.append(f"| by {sel} | {r['n']} | {r['gold']:.3f} | {r['proxy']:+.3f} | {r['kl']:.3f} | "
                         f"{r['kl_analytic']:.3f} |")
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in report["timings_s"].items())]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    colors = dict(ppo="C0", ppo_gt="C1", dpo="C2", rloo="C3", grpo="C4", sft="k")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key in zip(axes, ("gold", "proxy")):
        for m in sorted({method_of(n) for n in res}):
            pts = sorted((r["kl"], r[key]) for n, r in res.items() if method_of(n) == m)
            ax.plot(*zip(*pts), "o", color=colors.get(m, "C5"), label=m, alpha=0.8)
        for sel, style in (("proxy", "--"), ("gold", ":")):
            ax.plot([r["kl"] for r in bon[sel]], [r[key] for r in bon[sel]], style, color="C7",
                    label=f"best-of-N by {sel}")
        ax.set_xlabel("KL(π ‖ π_ref), nats per response")
        ax.set_ylabel(f"{key} reward" + (" (P(positive))" if key == "gold" else " (normalised)"))
        ax.set_title(f"{key} reward vs KL")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "frontier.png"), dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4.5))  # over-optimisation: proxy keeps rising while gold stalls
    for m in sorted({method_of(n) for n in res} - {"sft"}):
        pts = sorted((r["kl"], r["proxy"], r["gold"]) for n, r in res.items() if method_of(n) == m)
        kl, pr, go = zip(*pts)
        ax.plot(kl, pr, "--o", color=colors.get(m, "C5"), alpha=0.6, label=f"{m} proxy")
        ax.plot(kl, [2 * g - 1 for g in go], "-s", color=colors.get(m, "C5"), label=f"{m} gold (2p-1)")
    ax.set_xlabel("KL(π ‖ π_ref), nats")
    ax.set_ylabel("reward")
    ax.set_title("proxy vs gold reward as KL grows")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "overoptimisation.png"), dpi=120)
    plt.close(fig)


@dataclass
class PlotConfig:
    run: str = opt("out/imdb/sft", "run folder whose metrics.jsonl to plot")
    keys: str = opt("", "comma-separated metrics to plot (default: every numeric one)")
    out: str = opt("", "PNG to write (default: RUN/metrics.png)")


def plot(cfg):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path = os.path.join(cfg.run, "metrics.jsonl")
    rows = [obj for _, obj in read_jsonl(path)]
    keys = cfg.keys.split(",") if cfg.keys else sorted({k for r in rows for k, v in r.items()
                                                        if k != "step" and isinstance(v, (int, float))})
    missing = [k for k in keys if not any(k in r for r in rows)]
    if missing:
        raise ConfigError(f"--keys: {', '.join(missing)} not in {path}")
    cols = min(3, len(keys))
    fig, axes = plt.subplots((len(keys) + cols - 1) // cols, cols, figsize=(5 * cols, 3.2 * ((len(keys) + cols - 1) // cols)),
                             squeeze=False)
    for ax, k in zip(axes.flat, keys):
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
        ax.plot(*zip(*pts), ".-")
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    out = cfg.out or os.path.join(cfg.run, "metrics.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="IMDb data and gold reward (the pipeline runs from train.py)")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("download", help="fetch the official aclImdb archive and convert it (needs internet)")
    p.add_argument("--dest", default="data/imdb", help="folder for {train,test,unsup}.jsonl.gz")
    p = commands.add_parser("prompts", help="write review prefixes of 2-8 tokens as {prompt} JSONL (for --prompts)")
    p.add_argument("--data", default="assets/imdb-test-sample.jsonl.gz", help="IMDb rows to take the prefixes from")
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--n", type=int, default=1000, help="number of prefixes (the first n reviews)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prefix lengths")
    p = commands.add_parser("freeze", help="a policy checkpoint -> fp16 weights and shape only (for committing)")
    p.add_argument("--ckpt", required=True, help="policy checkpoint, e.g. out/sft/ckpt.pt")
    p.add_argument("--out", default=SFT_CPU_PATH, help="file to write")
    p = commands.add_parser("gold", help="train the gold reward and write its artifact")
    p.add_argument("--train", default="../shared/data/imdb/train.jsonl.gz", help="labelled IMDb rows to train on")
    p.add_argument("--test", default="../shared/data/imdb/test.jsonl.gz", help="labelled IMDb rows to evaluate on")
    p.add_argument("--out", default=GOLD_PATH, help="artifact to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order")
    args = parser.parse_args()
    try:
        if args.command == "download":
            print("\n".join(download_imdb(args.dest).values()))
        elif args.command == "freeze":
            print(f"{args.out} sha256 {freeze_policy(args.ckpt, args.out)}")
        elif args.command == "prompts":
            print(f"{len(write_prompts(load_imdb(args.data), args.out, args.n, args.seed))} prefixes in {args.out}")
        else:
            result = train_gold(args.train, args.test, args.out, args.seed)
            print(f"test accuracy {result['accuracy']:.4f} (train {result['train_accuracy']:.4f}) in "
                  f"{result['seconds']:.0f}s; {args.out} sha256 {result['sha256']}")
    except (DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)  # as train.main does: one line, exit status 2
        sys.exit(2)

"""
Speed of this project against the libraries a user would otherwise pick, measured in one command on one GPU.

    python bench.py                       # on a GPU: every row, then the peers (../shared/peers/run_all.sh)
    python bench.py --rows=sample,ppo --peers=none

Rows, all at GPT-2-small shape (12 layers, 768 wide, 124M parameters, random weights: throughput does not depend on
them), bf16, at the peers' exact settings (../shared/peers/README.md):
- sample: GPT.generate(), prompt 64, 128 new tokens, batch 64 and 256, weights in bf16 as generate()'s peer; also
  the eager decoder (no CUDA graph), float32 weights under bf16 autocast (graph_autocast: how a policy in training
  samples its rollouts), with --compile=on the compiled decoding step (GPT.compile_hidden) in the graph, and a check
  that graph and eager draw the same tokens from the same seed.
- train: the sft stage's step (sft_loss, AdamW, clipping), batch 16 x 1024, torch.compile; tokens/s and model
  FLOP utilisation (6 N FLOPs per token, as the peer counts, against 790 TFLOP/s, the bf16 dense matrix product
  measured on the H100 and H200).
- ppo: `train.py ppo` as a user runs it: batch 64, prompt 64, response 64 (no EOS stop), 4 epochs, 1 minibatch,
  policy + reference + reward model + critic all 124M; episodes/s from the median step after warm-up, peak memory,
  and the step's split into generate / log-probs / reward / advantages / update (the stage's time/* metrics);
  --ppo_gpus=2 also runs it under torchrun on 2 GPUs, with the same global batch (and with --ppo_weak at 128, 64 per
  GPU, and one GPU at 128); under torchrun the split also has grad_sum, the gradient sums.
- dpo: `train.py dpo`: 32 pairs, prompt 64, responses 64, reference log-probs on the fly (as the peer), and with
  --ref_cache (computed once before training, their time not in the step).
Each row's peer is timed by ../shared/peers/run_all.sh in the same command, after ours; the table gives figure,
peer figure and ratio, and bench.json holds everything. Timings are medians over steps after warm-up.

Beside each row, the fraction of the hardware limit it reaches, so that the next step is read off the table:
- compute (training, the PPO update, DPO): model FLOPs over the time against PEAK_FLOPS, with 6 N FLOPs per token
  for a forward and backward and 2 N for a forward alone (N: parameters; attention's own FLOPs left out, as the
  peers count); for PPO and DPO only the products made (forward_flops): the unembedding where log-probs are taken
  (the responses' positions), none in the critic;
- decoding: bytes each step must read (the bf16 weights once and the whole KV cache buffer, which every step
  attends over) over the step time against the GPU's memory bandwidth (MEMORY_BW, the spec sheet's), the step's
  FLOPs against PEAK_FLOPS, and the CUDA kernels one eager decoding step launches (the graph replays them all
  in one launch, but each still runs: at these sizes a step's time is mostly its kernel count x a few us).
"""
import argparse
import copy
import dataclasses
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time

import torch

from checkpoint import load_policy, save_checkpoint
from config import OptimConfig
from data import encode, write_json, write_jsonl
from model import GPT, GPTConfig
from reward import RewardModel
from runtime import make_optimizer, optimizer_step
from sft import sft_loss

ROOT = os.path.dirname(os.path.abspath(__file__))
PEAK_FLOPS = 790e12  # bf16 dense matrix product, measured on one H100 and one H200 (the speed issue)
MEMORY_BW = {"H200": 4.8e12, "H100": 3.35e12}  # HBM bytes/s, NVIDIA's spec sheets (H100 SXM5, H200 SXM)
GPT2_SMALL = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)
WORDS = [" the", " movie", " was", " good", " bad", " and", " I", " it", " film", " story", " a", " great"]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def text_of(n, rng):
    """A string of exactly n GPT-2 tokens (single-token words, each with its leading space)."""
    s = "".join(rng.choice(WORDS) for _ in range(n))
    assert len(encode(s)) == n
    return s


def write_inputs(folder, seed=0):
    """Random GPT-2-small policy and reward checkpoints in this project's format, 64-token prompts, pairs."""
    os.makedirs(folder, exist_ok=True)
    cfg = GPTConfig(**GPT2_SMALL)
    for kind, model in (("policy", GPT(cfg)), ("reward", RewardModel(cfg))):
        save_checkpoint(os.path.join(folder, f"{kind}.pt"),
                        dict(kind=kind, stage="bench", step=0, model=model.state_dict(),
                             model_args=dataclasses.asdict(cfg), optimizer=None, config={}, rng=None))
    rng = random.Random(seed)
    write_jsonl(os.path.join(folder, "prompts.jsonl"), [{"prompt": text_of(64, rng)} for _ in range(512)])
    write_jsonl(os.path.join(folder, "pairs.jsonl"),
                [{"prompt": text_of(64, rng), "chosen": text_of(64, rng), "rejected": text_of(64, rng)}
                 for _ in range(512)])


@torch.no_grad()
def bench_sample(folder, batch, new=128, prompt=64, calls=5, warmup=2, compile=False):
    training = load_policy(os.path.join(folder, "policy.pt"), "cuda")[0]  # float32, as a policy in training
    model = copy.deepcopy(training).to(torch.bfloat16)  # bf16 weights, as the peer's
    ids = torch.randint(0, 50257, (batch, prompt), device="cuda")
    mask = torch.ones_like(ids)
    out = {}
    runs = [("graph", model, True), ("eager", model, False), ("graph_autocast", training, True)]
    if compile:  # the decoding step's model part compiled (--compile), then captured as the plain graph is
        runs.append(("graph_compiled", copy.deepcopy(model).compile_hidden(), True))
    for name, m, graph in runs:
        torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(warmup + calls):
            g = torch.Generator(device="cuda").manual_seed(i)
            sync()
            t = time.perf_counter()
            with torch.autocast("cuda", torch.bfloat16, enabled=m is training):
                tokens, tmask = m.generate(ids, mask, new, generator=g, cuda_graph=graph)
            sync()
            times.append(time.perf_counter() - t)
        n_new = int(tmask.sum())  # real tokens of the last call (random weights: nearly every row runs to the end)
        dt = statistics.median(times[warmup:])
        out[name] = dict(new_tokens_per_s=n_new / dt, call_s=dt, peak_gib=peak_gib(), first_call_s=times[0])
    # the hardware limit of one decoding step (the cache buffer's length as generate() sizes it)
    cfg, n_params = model.config, sum(p.numel() for p in model.parameters())
    length = -(-(prompt + new) // 64) * 64
    step_bytes = 2 * n_params + 2 * cfg.n_layer * batch * length * cfg.n_embd * 2  # weights + K and V, bf16
    step_s = out["graph"]["call_s"] / new
    bw = next((v for k, v in MEMORY_BW.items() if k in torch.cuda.get_device_name()), None)
    out["limit"] = dict(step_s=step_s, step_bytes=step_bytes, bytes_fraction=step_bytes / step_s / bw if bw else None,
                        flops_fraction=2 * n_params * batch / step_s / PEAK_FLOPS,
                        kernels_per_step=kernels_per_step(model, ids, mask))
    draws = {graph: model.generate(ids, mask, new, generator=torch.Generator(device="cuda").manual_seed(11),
                                   cuda_graph=graph)[0] for graph in (True, False)}
    differ = (draws[True] != draws[False]).any(0).nonzero()
    out["graph_equals_eager"] = not len(differ)  # same seed, same tokens?
    out["first_differing_column"] = int(differ[0]) if len(differ) else None
    out["rows_differing"] = int((draws[True] != draws[False]).any(1).sum())
    return out


def kernels_per_step(model, ids, mask):
    """CUDA kernels one eager decoding step launches: those of generate() with 3 new tokens less those with 2
    (None, with the reason printed, where the profiler fails: the row's other figures stand)."""
    from torch.profiler import ProfilerActivity, profile
    counts = []
    try:
        for new in (2, 3):
            model.generate(ids, mask, new, cuda_graph=False)  # warm
            sync()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                model.generate(ids, mask, new, cuda_graph=False)
                sync()
            counts.append(sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events()))
    except Exception as e:  # noqa: BLE001
        print(f"kernel count: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    return counts[1] - counts[0]


def bench_train(batch=16, seq=1024, steps=10, warmup=4, compile=True):
    torch.cuda.reset_peak_memory_stats()
    model = GPT(GPTConfig(**GPT2_SMALL)).cuda().train()
    fwd = torch.compile(model) if compile else model  # as the sft stage does
    cfg = OptimConfig()
    cfg.warmup_iters = 0
    optimizer = make_optimizer(model, cfg, "cuda")
    x = torch.randint(0, 50257, (batch, seq + 1), device="cuda")
    for step in range(warmup + steps):  # timed as the peer: steps queued back to back, one wait at the end
        if step == warmup:
            sync()
            t = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16):
            loss = sft_loss(fwd, (x[:, :-1], x[:, 1:]))
        loss.backward()
        optimizer_step(model, optimizer, cfg, step, check=False)  # the sft stage checks at its next log
    sync()
    dt = (time.perf_counter() - t) / steps
    n = sum(p.numel() for p in model.parameters())
    tps = batch * seq / dt
    return dict(tokens_per_s=tps, step_s=dt, params=n, mfu=6 * n * tps / PEAK_FLOPS, peak_gib=peak_gib())


def stage(args, out_dir, nproc=1):
    """Run `train.py STAGE ...` (under torchrun with nproc > 1) and return its metrics rows."""
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launcher, os.path.join(ROOT, "train.py"), *args, f"--out_dir={out_dir}", "--overwrite"]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def bench_ppo(folder, out, steps=10, warmup=4, compile=False, nproc=1, batch=64):
    """PPO steps of `batch` episodes in one minibatch (4 optimizer steps); with nproc > 1 each process takes
    batch / nproc of them, and under torchrun the split shows the gradient sums apart (grad_sum)."""
    rows = stage(["ppo", f"--init_from={folder}/policy.pt", f"--reward={folder}/reward.pt",
                  f"--prompts={folder}/prompts.jsonl", f"--batch_size={batch}", f"--minibatch_size={batch}",
                  "--micro_batch_size=64", "--num_epochs=4", "--max_new_tokens=64", "--temperature=1.0",
                  "--no_eos_rule=keep", f"--max_iters={warmup + steps}", "--eval_interval=100000",
                  "--ckpt_interval=100000", f"--compile={compile}"],
                 os.path.join(out, f"ppo-compile{int(compile)}-gpus{nproc}-batch{batch}"), nproc)
    rows = [r for r in rows if "time/step_s" in r][warmup:]
    dt = statistics.median(r["time/step_s"] for r in rows)
    split = {k[5:-2]: statistics.median(r[k] for r in rows) for k in rows[0] if k.startswith("time/") and
             k != "time/step_s"}
    # the update: 4 epochs of forward and backward (3 forwards' worth) of the policy and the critic (GPT-2 small's
    # blocks over every token; the policy's unembedding over the response, the critic's scalar head left out), and
    # uncompiled the unembedding's product once more (TokenLogProbs makes it again in backward)
    update_flops = 4 * (3 * (forward_flops(batch * 128, batch * 64) + forward_flops(batch * 128, 0)) +
                        (0 if compile else forward_flops(0, batch * 64)))
    return dict(episodes_per_s=batch / dt, step_s=dt, split_s=split, peak_gib=rows[-1].get("memory/peak_gib"),
                update_flops_fraction=update_flops / split["update"] / PEAK_FLOPS if split.get("update") else None)


def forward_flops(tokens, unembedded):
    """A GPT-2-small forward's matrix-product FLOPs: 2 per parameter of the blocks for every token, and 2 per entry
    of the (tied) unembedding for each position whose log-probs are taken (the position table is a lookup)."""
    with torch.device("meta"):
        m = GPT(GPTConfig(**GPT2_SMALL))
    unembed = m.lm_head.weight.numel()
    blocks = sum(p.numel() for p in m.parameters()) - unembed - m.transformer.wpe.weight.numel()
    return 2 * (blocks * tokens + unembed * unembedded)


def bench_dpo(folder, out, steps=12, warmup=4, compile=False, ref_cache=False):
    rows = stage(["dpo", f"--init_from={folder}/policy.pt", f"--data={folder}/pairs.jsonl", "--batch_size=32",
                  "--append_eos=false", f"--max_iters={warmup + steps}", "--log_interval=1", "--eval_interval=100000",
                  "--eval_iters=1", "--ckpt_interval=100000", f"--compile={compile}", f"--ref_cache={ref_cache}"],
                 os.path.join(out, f"dpo-compile{int(compile)}-cache{int(ref_cache)}"))
    rows = [r for r in rows if "ms_per_step" in r][warmup:]
    dt = statistics.median(r["ms_per_step"] for r in rows) / 1000
    # the policy's forward and backward over 32 x 2 sequences of 64 + 64 tokens, log-probs of the responses', the
    # reference's forward unless cached, and uncompiled the policy's unembedding once more (as in bench_ppo)
    flops = (3 + (0 if ref_cache else 1)) * forward_flops(32 * 2 * 128, 32 * 2 * 64) + \
        (0 if compile else forward_flops(0, 32 * 2 * 64))
    return dict(pairs_per_s=32 / dt, step_s=dt, peak_gib=rows[-1].get("memory/peak_gib"),
                flops_fraction=flops / dt / PEAK_FLOPS)


def run_peers(script, out):
    path = os.path.join(out, "peers.jsonl")
    if os.path.exists(path):
        os.remove(path)
    print("$ bash", script, path, flush=True)
    subprocess.run(["bash", script, path], check=False)
    peers = {}
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            key = r.get("name", r.get("peer"))
            if key == "hf_train" and r.get("compile"):
                key = "hf_train_compiled"
            if key == "hf_generate":
                key = f"hf_generate_{r.get('batch')}"
            peers[key] = r
    return peers


def table(ours, peers):
    """(work, our figure, peer figure, ratio) rows."""
    def get(d, *keys):
        for k in keys:
            d = d.get(k) if isinstance(d, dict) else None
        return d

    def pct(x):
        return f"{100 * x:.0f}%" if x is not None else "-"

    rows = []
    for b in (64, 256):
        lim = get(ours, f"sample_{b}", "limit") or {}
        rows.append((f"sampling, batch {b}, prompt 64, 128 new tokens (new tokens/s)",
                     get(ours, f"sample_{b}", "graph", "new_tokens_per_s"),
                     get(peers, f"hf_generate_{b}", "new_tokens_per_s"), "generate()",
                     f"memory {pct(lim.get('bytes_fraction'))}, compute {pct(lim.get('flops_fraction'))}, "
                     f"{lim.get('kernels_per_step')} kernels/step" if lim else "-"))
        rows.append((f"sampling, batch {b}, --compile (new tokens/s)",
                     get(ours, f"sample_{b}", "graph_compiled", "new_tokens_per_s"),
                     get(peers, f"hf_generate_{b}", "new_tokens_per_s"), "generate()", "-"))
    rows.append(("training step, batch 16 x 1024, compiled (tokens/s)", get(ours, "train", "tokens_per_s"),
                 get(peers, "hf_train_compiled", "tokens_per_s"), "GPT2LMHeadModel compiled",
                 f"compute {pct(get(ours, 'train', 'mfu'))}"))
    for c in ("0", "1"):
        flag = ", --compile" if c == "1" else ""
        rows.append((f"PPO step, 64 x (64 + 64), 4 epochs{flag} (episodes/s)",
                     get(ours, f"ppo_compile{c}", "episodes_per_s"), get(peers, "trl_ppo", "episodes_per_s"),
                     "TRL PPOTrainer", f"update: compute {pct(get(ours, f'ppo_compile{c}', 'update_flops_fraction'))}"))
        for cache in ("0", "1"):
            rows.append((f"DPO step, 32 pairs, 64 + 64{flag}{', reference cached' if cache == '1' else ''} "
                         f"(pairs/s)", get(ours, f"dpo_compile{c}_cache{cache}", "pairs_per_s"),
                         get(peers, "trl_dpo", "pairs_per_s"), "TRL DPOTrainer",
                         f"compute {pct(get(ours, f'dpo_compile{c}_cache{cache}', 'flops_fraction'))}"))
    return [(w, a, b, name, a / b if a and b else None, lim) for w, a, b, name, lim in rows if a is not None]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--rows", default="sample,train,ppo,dpo", help="which of sample,train,ppo,dpo to time")
    p.add_argument("--compile", default="off,on", help="PPO/DPO with --compile: off, on or off,on (on: sampling "
                                                       "also with the compiled decoding step)")
    p.add_argument("--ppo_gpus", type=int, default=1, help="also time the PPO row under torchrun on 2..N GPUs")
    p.add_argument("--ppo_weak", action="store_true", help="with --ppo_gpus: also n GPUs at n x 64 episodes per "
                                                           "step (weak scaling: each GPU keeps one GPU's 64)")
    p.add_argument("--peers", default=os.path.join(ROOT, "..", "shared", "peers", "run_all.sh"),
                   help="the peers' run_all.sh (copy the peers folder to the GPU machine), or none")
    p.add_argument("--out", default="out/bench", help="folder for bench.json, the inputs and the stages' runs")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench.py needs a CUDA GPU (python bench.py --help says what it measures)", file=sys.stderr)
        return 2
    rows = a.rows.split(",")
    os.makedirs(a.out, exist_ok=True)
    folder = os.path.join(a.out, "inputs")
    write_inputs(folder)
    result = dict(date=time.strftime("%Y-%m-%d"), gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                  python=platform.python_version(), ours={}, peers={})
    save = lambda: write_json(os.path.join(a.out, "bench.json"), result)  # noqa: E731
    def measure(name, fn, *args, **kw):  # a failing row is recorded and the others still run
        t0 = time.time()
        try:
            result["ours"][name] = fn(*args, **kw)
        except Exception as e:  # noqa: BLE001
            result["ours"][name] = dict(error=f"{type(e).__name__}: {e}"[:500])
        result["ours"][name]["wall_s"] = round(time.time() - t0, 1)  # the row's whole time: plan a command by it
        print(f"{name}:", result["ours"][name], flush=True)
        save()

    compiles = [c == "on" for c in a.compile.split(",")]
    if "sample" in rows:
        for b in (64, 256):
            measure(f"sample_{b}", bench_sample, folder, b, compile=True in compiles)
    if "train" in rows:
        measure("train", bench_train)
    for c in compiles:
        if "ppo" in rows:
            measure(f"ppo_compile{int(c)}", bench_ppo, folder, a.out, compile=c)
            if a.ppo_weak and a.ppo_gpus > 1:  # one GPU at 128: what a larger batch alone gives
                measure(f"ppo_compile{int(c)}_batch128", bench_ppo, folder, a.out, compile=c, batch=128)
            for n in range(2, a.ppo_gpus + 1):  # the same global batch of 64, split over n processes
                measure(f"ppo_compile{int(c)}_gpus{n}", bench_ppo, folder, a.out, compile=c, nproc=n)
                if a.ppo_weak:  # 64 per process: n x 64 episodes per step, each GPU doing one GPU's work
                    measure(f"ppo_compile{int(c)}_gpus{n}_batch{64 * n}", bench_ppo, folder, a.out, compile=c,
                            nproc=n, batch=64 * n)
        if "dpo" in rows:
            for cache in (False, True):
                measure(f"dpo_compile{int(c)}_cache{int(cache)}", bench_dpo, folder, a.out, compile=c,
                        ref_cache=cache)
    if a.peers != "none":
        t0 = time.time()
        result["peers"] = run_peers(a.peers, a.out)
        result["peers_wall_s"] = round(time.time() - t0, 1)
    result["table"] = table(result["ours"], result["peers"])
    save()
    print(f"\n{result['gpu']}, torch {result['torch']}, {result['date']}\n")
    print("| work | this project | peer | ratio | hardware limit reached |\n| --- | --- | --- | --- | --- |")
    for work, ours, peer, name, ratio, lim in result["table"]:
        print(f"| {work} | {ours:,.1f} | {name} {peer:,.1f} | {ratio:.2f}x | {lim} |" if ratio else
              f"| {work} | {ours:,.1f} | {name} - | - | {lim} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

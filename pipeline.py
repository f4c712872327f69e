"""
The IMDb benchmark end to end (stage `pipeline`, what `python train.py` runs), after the DPO paper's section 6.1:
SFT -> prompts -> k SFT samples per prefix and every pair of them, labelled by the gold reward (or a simulated
Bradley-Terry human) -> proxy reward model -> PPO, PPO on the gold reward, DPO (IPO), RLOO, GRPO, Preferred-FT and
Unlikelihood at each strength -> every policy, and the checkpoints each run kept along training, evaluated on
held-out prefixes; best-of-N from the SFT policy -> the gold reward at KL 2.5, 5 and 10 nats along each method's
frontier, Gao et al.'s fits, results.md and two figures. Everything after the SFT model is repeated --replicates times
with other seeds (rep1/, rep2/, ...), so the spread it reports is that of the whole pipeline. The task itself (data,
gold reward, prompts, preference pairs) is in imdb.py; each training step is a sub-run of train.py.

    python train.py                                  # the cpu preset (~4.5 min on 2 cores) into out/imdb
    python train.py pipeline --preset=gpu --imdb_dir=../shared/data/imdb --out_dir=out/imdb-gpu   # 509 s, one H200
    python train.py pipeline --preset=tiny --out_dir=/tmp/imdb    # the tests' size: a few minutes on 2 cores
    python train.py plot --run=out/imdb/rep1/runs/ppo_beta0.05_seed1   # any run folder's metrics.jsonl as a PNG

Re-running: each sub-run lives in its own folder under --out_dir. Run the same command again after a stop or a crash
and finished sub-runs are reused, killed ones resume from their checkpoints. A sub-run is reused only if its
config.json equals the config that the new command gives it and the files it read (prompts, preferences, the SFT and
reward checkpoints: inputs.json) are the same bytes; the prompts and preferences likewise (prompts.json,
preferences.json). Anything else is refused in one line, or with --overwrite re-made from scratch, so that one
folder never mixes the results of two configurations.

Stopping: Ctrl-C (or SIGTERM) once: each running sub-run gets one SIGTERM, saves a checkpoint and exits, and the
pipeline exits with status 130; twice: the sub-runs are killed at once (their checkpoints are written atomically, so
the last one survives). Sub-runs run in their own process group, so a terminal's Ctrl-C reaches only the pipeline.

Simplifications, on purpose:
- Every policy, the preference pairs, the reward model's normalisation and best-of-N sample at one temperature
  (TEMPERATURE, 1): the policy's own distribution, the one whose KL to the reference is reported.
- Continuations are cut at max_new_tokens (as in the DPO paper) and never end with EOS: the RL stages keep cut
  responses as they are (--no_eos_rule=keep), and DPO appends no EOS to its pairs (--append_eos=false).
- Best-of-N is read off one pool of SFT samples per prompt as an exact expectation over the pool, not by drawing N;
  its KL is that of the selection from the pool (ties handled), next to the bound log N - (N-1)/N.
- Sub-runs on one machine share its cores (CPU) or its GPU; there is no multi-machine scheduling.
- Replicates share the SFT model and the prefixes (train and held-out); everything sampled after the SFT model is
  theirs. The frontier of a method starts at the SFT model (KL 0), every run's step 0, and is piecewise linear
  through those of its strengths and checkpoints (seeds averaged) that no other beats on both KL and gold, flat
  after the last; gold@KL reads it off (unbeaten, best_at), '-' beyond the largest KL measured.
- Preferred-FT is stage sft on each pair's chosen response (a prefix's best sample appears once per pair it wins,
  and gets an EOS at its end, as every SFT response does).
"""
import dataclasses
import hashlib
import importlib
import json
import math
import os
import signal
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from data import load_imdb, read_jsonl, write_jsonl
from imdb import (ROOT, SFT_CPU_PATH, SFT_CPU_SHA256, SPLITS, check_sha256, file_sha256, gold_reward, imdb_files,
                  sft_samples, simulate_preferences, write_prompts)
from train import (RESTART_KEYS, STAGES, ConfigError, Run, RunConfig, TrainingError, disable_dropout, load_checkpoint,
                   load_policy, model_from_checkpoint, opt, parse_config, read_json, setup_device, write_json)

# the one sampling temperature of the benchmark: every policy trains and is evaluated at it, and the reward model is
# normalised on SFT samples drawn at it (a reward normalised at 0.7 would be off-centre on samples at 1.0)
TEMPERATURE = 1.0

# Everything the presets set; the sizes are meant to be edited here. The cpu preset is the main job (python
# train.py, ~4.5 minutes on 2 cores, on the committed sample, from the committed SFT model: its `sft` keys apply only
# with --sft=train); the gpu preset is the benchmark, the DPO paper's set-up (509 s on one H200, on the full data of
# --imdb_dir, SFT included); gpu-bt is the same with today's simulated labels (Bradley-Terry) as an ablation (not
# yet run on a GPU).
# The tiny preset is for the tests: the committed SFT model and just enough steps that every method raises the gold
# reward.
#   k: SFT samples per training prefix; every pair of them is a preference pair (k(k-1)/2 per prefix)
#   labels: gold (the gold reward's higher score is chosen, the paper's) or bt (a Bradley-Terry draw)
#   replicates: everything after the SFT model (samples, labels, reward model, methods, evaluation) repeated with
#     another seed; seeds: RL/DPO seeds inside each replicate
#   methods: the KL strengths of each method (beta; alpha for unlikelihood; [None]: one run, for pft)
#   rl / dpo / pft: keys of the sub-runs (snapshot_interval / snapshot_steps: keep weights every N steps / at these
#     steps, evaluated along training)
PRESETS = {
    "cpu": dict(
        imdb_dir="", sft=dict(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=16, max_iters=250,
                               learning_rate=2e-3, warmup_iters=20, eval_interval=125),
        sft_ckpt=SFT_CPU_PATH, n_train_prompts=2000, n_eval_prompts=256, max_new_tokens=20, jobs=2, seeds=[1],
        k=2, labels="bt", replicates=1,
        reward=dict(learning_rate=1e-3, epochs=1),
        methods=dict(ppo=[0.05], ppo_gt=[0.05], dpo=[0.1], rloo=[0.05], grpo=[0.04]),
        rl=dict(batch_size=32, minibatch_size=16, micro_batch_size=32, max_iters=20, learning_rate=3e-4,
                whiten_rewards=True, eval_interval=1000), dpo=dict(batch_size=32, max_iters=56, learning_rate=3e-4),
        pft=dict(batch_size=32, max_iters=56, learning_rate=3e-4),
        bon_prompts=64, bon_pool=64),
    "gpu": dict(
        imdb_dir="../shared/data/imdb", sft=dict(n_layer=6, n_head=6, n_embd=384, block_size=128, batch_size=128,
                                                 max_iters=2500, learning_rate=1e-3, warmup_iters=200,
                                                 eval_interval=500, compile=True),
        # the paper: 25,000 prefixes x 6 pairs; 8,192 x 6 = 49,152 pairs (44,237 to train on) fit the 10 minutes
        n_train_prompts=8192, n_eval_prompts=512, max_new_tokens=48, jobs=6, seeds=[1],
        k=4, labels="gold", replicates=2,
        reward=dict(batch_size=64),
        methods=dict(ppo=[0.1, 0.2], ppo_gt=[0.02], dpo=[0.1, 0.5], rloo=[0.1], grpo=[0.1], pft=[None],
                     unlikelihood=[0.5]),
        # weights kept early and densely, where the KL moves fastest, so that each run traces the low-KL stretch
        rl=dict(batch_size=128, minibatch_size=32, micro_batch_size=64, max_iters=40, learning_rate=2e-5,
                eval_interval=1000, snapshot_steps="5,10,20"),
        # one epoch over the pairs (max_iters 0: --epochs=1), as the paper; weights kept at 25 ... 400 of 691
        dpo=dict(batch_size=64, learning_rate=5e-5, eval_interval=1000, snapshot_steps="25,50,100,200,400"),
        pft=dict(batch_size=64, max_iters=690, learning_rate=5e-5, warmup_iters=10, eval_interval=1000,
                 snapshot_steps="50,200"),
        bon_prompts=128, bon_pool=128),
    "tiny": dict(
        imdb_dir="", sft=dict(n_layer=1, n_head=2, n_embd=32, block_size=48, batch_size=8, max_iters=10,
                               learning_rate=3e-3, warmup_iters=2, eval_interval=10, eval_iters=2),
        sft_ckpt=SFT_CPU_PATH, n_train_prompts=1024, n_eval_prompts=128, max_new_tokens=12, jobs=2, seeds=[1],
        k=2, labels="bt", replicates=1,
        reward=dict(learning_rate=1e-3, warmup_iters=0),
        methods=dict(ppo=[0.05], ppo_gt=[0.05], dpo=[0.1], rloo=[0.05], grpo=[0.04], unlikelihood=[0.5],
                     pft=[None]),
        rl=dict(batch_size=32, minibatch_size=16, micro_batch_size=32, max_iters=12, learning_rate=5e-4,
                warmup_iters=0, whiten_rewards=True, eval_interval=1000, snapshot_steps="3,6"),
        dpo=dict(batch_size=32, max_iters=32, learning_rate=5e-4, warmup_iters=0, snapshot_interval=16),
        pft=dict(batch_size=32, max_iters=16, learning_rate=5e-4, warmup_iters=0),
        bon_prompts=8, bon_pool=16),
}
PRESETS["gpu-bt"] = dict(PRESETS["gpu"], labels="bt")
# method -> (stage, the key its strengths set); the data and reward each one gets are in stages() below
METHODS = dict(ppo=("ppo", "kl_coef"), ppo_gt=("ppo", "kl_coef"), dpo=("dpo", "beta"), ipo=("dpo", "beta"),
               rloo=("rloo", "kl_coef"), grpo=("grpo", "kl_coef"), pft=("sft", None),
               unlikelihood=("dpo", "alpha"))
BON_NS = (1, 2, 4, 8, 16, 32, 64, 128)
KL_POINTS = (2.5, 5.0, 10.0)  # the gold@KL summary: nats per sequence
REPLICATE_STRIDE = 1000  # replicate r's seeds are the first's plus 1000 (r - 1): replicate 1 is the run of old


@dataclass
class PipelineConfig(RunConfig):
    out_dir: str = opt("out/imdb", "run folder of the whole benchmark; each sub-run gets a folder inside it")
    preset: str = opt("cpu", "cpu (the main job: ~4.5 min on 2 cores, committed sample), gpu (the DPO paper's set-up "
                             "with 2 replicates: 509 s on one H200), gpu-bt (gpu with simulated BT labels) or tiny "
                             "(a few minutes on 2 cores, for the tests)")
    imdb_dir: str = opt("", "folder with IMDb {train,test,unsup}.jsonl.gz (default: the preset's; cpu: the "
                            "committed sample)")
    jobs: int = opt(0, "sub-runs at once (0: the preset's; several share one GPU well)", min=0)
    methods: str = opt("", "comma-separated subset of " + ",".join(METHODS) + " (default: the preset's)")
    replicates: int = opt(0, "repeat everything after the SFT model with other seeds (0: the preset's)", min=0)
    sft: str = opt("", "the SFT model: train (train it in this run), a policy checkpoint to start from, or '' (the "
                       "preset's: cpu and tiny start from the committed assets/sft-imdb-cpu.pt, gpu trains)")
    gpus: str = opt("", "GPUs for the sub-runs, comma-separated (0,1): each sub-run gets the least busy one as its "
                        "only GPU (CUDA_VISIBLE_DEVICES); --jobs counts over all (default: they share the current one)")


# -----------------------------------------------------------------------------
# reuse only what the same inputs made

_sha = {}


def fingerprint(path):
    """size and sha256 of a file (memoised by path, size and mtime); of a folder (a GPT-2 folder, --sft=DIR), those
    of its files."""
    if os.path.isdir(path):
        return {f: fingerprint(os.path.join(path, f)) for f in sorted(os.listdir(path))
                if os.path.isfile(os.path.join(path, f))}
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _sha:
        _sha[key] = file_sha256(path)
    return dict(size=st.st_size, sha256=_sha[key])


def first_difference(old, new):
    """The first key whose value differs between two flat dicts, as 'key: old -> new'; None if they are equal."""
    short = lambda v: str(v) if len(str(v)) <= 60 else str(v)[:57] + "..."
    for k in list(new) + [k for k in old if k not in new]:
        if old.get(k, "(missing)") != new.get(k, "(missing)"):
            return f"{k}: {short(old.get(k, '(missing)'))} -> {short(new.get(k, '(missing)'))}"
    return None


def stale(what, old, new, overwrite):
    """None if `old` (what is on disk) equals `new` (what this command would make); else the reason to re-make it:
    nothing stored (old is None), or, with --overwrite, the first differing key. Without --overwrite a difference is
    a one-line ConfigError naming `what` and that key."""
    if old is None:
        return "nothing stored"
    diff = first_difference(old, new)
    if diff is not None and not overwrite:
        raise ConfigError(f"{what} was made by other arguments ({diff}); use another --out_dir, or --overwrite to "
                          f"re-make it")
    return diff


IGNORED = ("out_dir", *RESTART_KEYS)  # keys that do not change what a sub-run computes (train.py)


def sub_run_plan(stage, out_dir, args, overwrite):
    """What to do with the sub-run `train.py STAGE ARGS --out_dir=OUT_DIR`: 'done' (its summary.json exists and it
    was made by this config from these inputs), 'resume' (the same, killed after a checkpoint), 'fresh', or
    'overwrite' (a stale run, with --overwrite). Its config is parsed as train.py would, and compared with its
    config.json, ignoring IGNORED; its input files with inputs.json. Returns (plan, inputs)."""
    module, cls_name = STAGES[stage][:2]
    cfg = parse_config(getattr(importlib.import_module(module), cls_name), [*args, f"--out_dir={out_dir}"])
    new = json.loads(json.dumps(dict(stage=stage, **dataclasses.asdict(cfg)), default=str))
    new = {k: v for k, v in new.items() if k not in IGNORED}
    inputs = inputs_of(args)
    stored = {f: read_json(os.path.join(out_dir, f)) if os.path.exists(os.path.join(out_dir, f)) else None
              for f in ("config.json", "inputs.json")}
    done = os.path.exists(os.path.join(out_dir, "summary.json"))
    if stored["config.json"] is None and not done:
        return "fresh", inputs  # never started, or killed before it wrote its config
    old = stored["config.json"] and {k: v for k, v in stored["config.json"].items() if k not in IGNORED}
    if stale(out_dir, old, new, overwrite) or \
            stale(f"{out_dir} (its input files)", stored["inputs.json"], inputs, overwrite):
        return "overwrite", inputs
    if done:
        return "done", inputs
    return ("resume" if os.path.exists(os.path.join(out_dir, "ckpt.pt")) else "fresh"), inputs


def inputs_of(args):
    """{file: size and sha256} of every file named by an argument (--data=a,b names two)."""
    files = [v for a in args for v in a.partition("=")[2].split(",") if v and os.path.isfile(v)]
    return {f: fingerprint(f) for f in files}


# -----------------------------------------------------------------------------
# sub-runs: train.py in a child process, a few at a time, stopped cleanly

class Stopped(Exception):
    """Ctrl-C or SIGTERM: the pipeline stops between sub-runs or policies and exits with status 130."""


class Scheduler:
    """The sub-runs in flight and the signals received. First SIGINT/SIGTERM: one SIGTERM to each running sub-run
    (it saves a checkpoint and exits), nothing new starts, and the pipeline stops between phases; second: every
    sub-run's process group is killed and Stopped is raised at once."""

    def __init__(self):
        self.running, self.signals, self.closed = [], 0, False  # running: [(Popen, out_dir)]
        self.gpus = []  # --gpus: sub-runs go to the one running the fewest

    def pick_gpu(self):
        """The GPU (a CUDA_VISIBLE_DEVICES entry) of --gpus that runs the fewest sub-runs now; None without --gpus."""
        busy = lambda g: sum(getattr(p, "gpu", None) == g for p, _ in self.running)
        return min(self.gpus, key=busy) if self.gpus else None

    def on_signal(self, signum, frame):
        if self.closed:  # the pipeline is already on its way out: nothing left to stop
            return
        self.signals += 1
        if self.signals == 1:
            print(f"\n{signal.Signals(signum).name}: stopping; {len(self.running)} running sub-run(s) save a "
                  f"checkpoint and exit (a second signal kills them)", file=sys.stderr, flush=True)
            for p, _ in self.running:
                self.terminate(p)
            return
        self.kill_all()
        raise Stopped

    def terminate(self, p):
        """One SIGTERM, never a second: a sub-run that is saving after the first must not be interrupted."""
        if p.poll() is None and not getattr(p, "terminated", False):
            p.terminated = True
            p.send_signal(signal.SIGTERM)

    def kill_all(self):
        for p, _ in self.running:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)  # its own process group (start_new_session): all of it
                except ProcessLookupError:
                    pass
        for p, _ in self.running:
            p.wait()
        self.running.clear()

    def check(self):
        if self.signals:
            raise Stopped

    def start(self, stage, out_dir, args, plan, inputs, threads):
        """`python train.py STAGE ARGS` as a child process in its own session, writing out_dir/log.txt."""
        if plan == "overwrite":
            shutil.rmtree(out_dir)  # from scratch: no stale checkpoint, summary or metrics survives
        os.makedirs(out_dir, exist_ok=True)
        write_json(os.path.join(out_dir, "inputs.json"), inputs)
        extra = {"resume": ["--resume"], "overwrite": ["--overwrite"]}.get(plan, [])
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), stage, *args, f"--out_dir={out_dir}", *extra]
        with open(os.path.join(out_dir, "log.txt"), "a") as log:
            log.write(" ".join(cmd) + "\n")
            log.flush()
            gpu = self.pick_gpu()
            env = dict(os.environ, TQDM_DISABLE="1", **({"OMP_NUM_THREADS": str(threads)} if threads else {}),
                       **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}))
            p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)
            p.gpu = gpu
        self.running.append((p, out_dir))

    def run_all(self, jobs, desc, max_jobs, overwrite, cpu=False, after=None, on_done=None, on_done_after=None):
        """Run [(stage, out_dir, args)] at most max_jobs at a time, in order, with a progress bar. after: {out_dir:
        [out_dirs of this list]} for a job that needs others' results (PPO needs its reward model): it starts once
        they finish, and its folder is checked then (its input files exist only then); every other job's folder is
        checked before any starts. on_done(out_dir) runs here, in the pipeline's process, as each job finishes or
        is found done, while the others train; on_done_after: {out_dir: [out_dirs]} whose on_done must have run
        first (a DPO run is evaluated with its replicate's reward model, which may still be training when it
        ends). A failure stops the others (one SIGTERM each) and raises TrainingError. On the CPU (cpu=True) the
        cores are shared out: each sub-run gets cores // max_jobs threads."""
        self.check()
        threads = max(1, (os.cpu_count() or 1) // max_jobs) if cpu else 0
        names = {job[1] for job in jobs}
        after, then = ({d: [a for a in deps if a in names] for d, deps in (m or {}).items()}
                       for m in (after, on_done_after))
        plans = {job[1]: sub_run_plan(*job, overwrite) for job in jobs if not after.get(job[1])}
        queue, finished, callbacks, called, failed = list(jobs), set(), [], set(), None
        try:
            with tqdm(total=len(jobs), desc=desc, dynamic_ncols=True) as bar:
                while queue or self.running or callbacks:
                    for job in [j for j in queue if all(d in finished for d in after.get(j[1], ()))]:
                        if len(self.running) >= max_jobs or self.signals or failed:
                            break
                        queue.remove(job)
                        plan, inputs = plans.get(job[1]) or sub_run_plan(*job, overwrite)
                        if plan == "done":
                            finished.add(job[1]), callbacks.append(job[1]), bar.update(1)
                        else:
                            self.start(*job, plan, inputs, threads)
                    for p, out_dir in list(self.running):
                        if p.poll() is None:
                            continue
                        self.running.remove((p, out_dir))
                        bar.update(1)
                        if p.returncode == 0:
                            finished.add(out_dir), callbacks.append(out_dir)
                        elif not self.signals and not failed:
                            failed = out_dir
                            for q, _ in self.running:
                                self.terminate(q)
                    ready = [d for d in callbacks if all(a in called for a in then.get(d, ()))]
                    if self.signals or failed:
                        if not self.running:
                            break
                    elif ready:
                        callbacks.remove(ready[0]), called.add(ready[0])
                        if on_done:
                            on_done(ready[0])
                        continue
                    elif callbacks and not queue and not self.running:
                        raise ValueError(f"on_done_after goes round in a circle: {callbacks}")  # a bug, not input
                    time.sleep(0.1)
        finally:
            self.kill_all()  # anything still running here is an error's orphan: none may outlive the pipeline
        self.check()
        if failed:
            with open(os.path.join(failed, "log.txt")) as f:
                tail = f.read().strip().splitlines()[-1:] or ["(no output)"]
            raise TrainingError(f"{failed}: sub-run failed ({tail[0][:200]}); see its log.txt")


# -----------------------------------------------------------------------------
# evaluation: every policy on held-out prefixes, and best-of-N from the SFT policy

def bon_probs(select, n):
    """P(best-of-n picks sample j) for a pool of M samples per prompt: n draws from the pool with replacement, the
    one with the highest `select` score kept, ties broken uniformly. select: (P, M) -> (P, M).

    The samples scoring at most s win with probability (#{select <= s} / M)^n, so a block of tied samples wins with
    (hi/M)^n - (lo/M)^n (lo, hi: the samples below it and up to it) and shares that evenly. Distinct scores give the
    textbook (i/M)^n - ((i-1)/M)^n for the sample of rank i; all-equal scores give 1/M each."""
    M = select.size(1)
    ordered = select.sort(dim=1).values
    lo = torch.searchsorted(ordered, select.contiguous(), right=False).double()  # (P, M) samples strictly below
    hi = torch.searchsorted(ordered, select.contiguous(), right=True).double()  # (P, M) samples at or below
    return ((hi / M) ** n - (lo / M) ** n) / (hi - lo)


def bon_curve(select, gold, proxy, ns):
    """Best-of-N from a pool of M samples per prompt, for each N in ns, as exact expectations over the pool.
    select, gold, proxy: (P, M). Returns per N: the expected gold and proxy rewards; kl, the KL of the best-of-N
    selection from the pool's uniform distribution, sum_j p_j log(M p_j) averaged over prompts (0 when every
    sample scores the same); and kl_bound, log N - (N-1)/N, which bounds the KL of best-of-N from any reference
    distribution (Beirami et al. 2024, arXiv:2401.01879) and is what a pool of distinct scores approaches as M grows."""
    M = select.size(1)
    out = []
    for n in ns:
        p = bon_probs(select, n)  # (P, M)
        kl = (p * torch.log(M * p).clamp(min=-1e9)).sum(1).mean()  # p > 0 for every sample, so no 0 log 0
        out.append(dict(n=n, gold=float((gold.double() * p).sum(1).mean()),
                        proxy=float((proxy.double() * p).sum(1).mean()), kl=float(kl),
                        kl_bound=math.log(n) - (n - 1) / n))
    return out


class Evaluator:
    """Policies on the held-out prefixes at TEMPERATURE: gold reward, proxy reward, KL(pi || pi_ref) as the mean over
    samples of the sum over tokens of log pi - log pi_ref. The reference is loaded once, each replicate's proxy once,
    and every policy's weights go into one model (the decoding graphs captured for its tensors stay valid; a policy
    of another shape gets a model of its own). Samples go to OUT_DIR/samples/NAME.jsonl, and the result with what
    made it (the policy's, proxy's and reference's files, the prefixes, seed and lengths) to NAME.json: a re-run of
    the pipeline (after a stop, or to redraw the report) reuses every evaluation whose inputs are unchanged."""

    def __init__(self, ref_path, eval_prompts, cfg, max_new_tokens):
        self.device, self.ctx = setup_device(cfg)
        self.dtype, self.batch_size = cfg.dtype, 512  # the batch size sets the order of the random draws
        self.ref_path, self.prompts, self.max_new_tokens = ref_path, eval_prompts, max_new_tokens
        self.prompts_sha = hashlib.sha256(json.dumps(eval_prompts).encode()).hexdigest()
        self.ref, self.policy, self.proxies = None, None, {}

    def load(self, path):
        if path == self.ref_path:
            return self.ref
        ckpt = load_checkpoint(path, "policy")
        if self.policy is None or dataclasses.asdict(self.policy.config) != ckpt["model_args"]:
            self.policy = disable_dropout(model_from_checkpoint(ckpt, path)).to(self.device).eval()
        else:
            model_from_checkpoint(ckpt, path, self.policy)
        return self.policy

    def __call__(self, name, path, proxy_path, out_dir, seed):
        from ppo import evaluate_policy
        from reward import load_reward_model, score_texts
        record = os.path.join(out_dir, "samples", f"{name}.json")
        samples = os.path.join(out_dir, "samples", f"{name}.jsonl")
        made_by = dict(policy=fingerprint(path), proxy=fingerprint(proxy_path), ref=fingerprint(self.ref_path),
                       prompts=self.prompts_sha, seed=seed, max_new_tokens=self.max_new_tokens,
                       temperature=TEMPERATURE, device=str(self.device), dtype=self.dtype, batch_size=self.batch_size)
        stored = read_json(record) if os.path.exists(record) else None
        if stored and os.path.exists(samples) and stored["made_by"] == dict(made_by, samples=fingerprint(samples)):
            return stored["result"]
        if self.ref is None:
            self.ref = load_policy(self.ref_path, self.device)[0]
        if proxy_path not in self.proxies:
            self.proxies[proxy_path] = load_reward_model(proxy_path, self.device)
        policy = self.load(path)
        with self.ctx:
            ev = evaluate_policy(policy, self.ref, self.prompts, lambda p, r: torch.tensor(gold_reward(p, r)),
                                 self.device, self.ctx, self.max_new_tokens, self.batch_size, TEMPERATURE,
                                 seed=seed)
            prox = score_texts(self.proxies[proxy_path], [s["prompt"] for s in ev["samples"]],
                               [s["response"] for s in ev["samples"]], self.device)
        os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
        write_jsonl(samples, [dict(prefix=s["prompt"], response=s["response"], gold=s["score"], proxy=pr, kl=s["kl"])
                              for s, pr in zip(ev["samples"], prox)])
        result = dict(gold=ev["score"], proxy=sum(prox) / len(prox), kl=ev["kl"], length=ev["length"])
        # after the samples, with their fingerprint: a stop between, or samples changed since, re-evaluates
        write_json(record, dict(made_by=dict(made_by, samples=fingerprint(samples)), result=result))
        return result


def best_of_n(sft_path, proxy_path, prompts, pool, cfg, max_new_tokens, seed):
    """Pool `pool` SFT samples per prompt (drawn with seed + 7), score them with both rewards, and read off
    best-of-N (N <= pool) selected by the proxy and by the gold reward."""
    from reward import load_reward_model, score_texts
    todo, responses = sft_samples(sft_path, prompts, pool, cfg, max_new_tokens, seed + 7, TEMPERATURE,
                                  "best-of-n pool")
    device, ctx = setup_device(cfg)
    proxy = load_reward_model(proxy_path, device)
    gold = torch.tensor(gold_reward(todo, responses)).view(len(prompts), pool)
    with ctx:
        prox = torch.tensor(score_texts(proxy, todo, responses, device)).view(len(prompts), pool)
    ns = [n for n in BON_NS if n <= pool]
    return dict(proxy=bon_curve(prox, gold, prox, ns), gold=bon_curve(gold, gold, prox, ns))


# -----------------------------------------------------------------------------
# the pipeline

def check_gpus(cfg):
    """--gpus=0,1 -> ['0', '1'], each a GPU of this machine; the sub-runs then see one GPU each, as cuda."""
    gpus = [g.strip() for g in cfg.gpus.split(",") if g.strip()]
    for g in gpus:
        if not g.isdigit() or int(g) >= torch.cuda.device_count():
            raise ConfigError(f"--gpus={cfg.gpus}: {g!r} is not a GPU of this machine "
                              f"({torch.cuda.device_count()} CUDA device(s))")
    if gpus and cfg.device not in ("auto", "cuda"):
        raise ConfigError(f"--gpus gives each sub-run one GPU as cuda: use --device=auto or cuda, not {cfg.device}")
    return gpus


def pipeline(cfg):
    preset = PRESETS.get(cfg.preset)
    if preset is None:
        raise ConfigError(f"--preset={cfg.preset}: expected one of {', '.join(PRESETS)}")
    methods = cfg.methods.split(",") if cfg.methods else list(preset["methods"])
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"--methods: unknown method {m!r}; expected some of {', '.join(METHODS)}")
        if m not in preset["methods"]:
            raise ConfigError(f"--methods: the {cfg.preset} preset has no strengths for {m} (add them to "
                              f"PRESETS[{cfg.preset!r}]['methods'] in pipeline.py)")
    imdb_dir = cfg.imdb_dir or preset["imdb_dir"]
    files = imdb_files(imdb_dir) if imdb_dir else \
        {s: os.path.join(ROOT, "assets", f"imdb-{s}-sample.jsonl.gz") for s in SPLITS}
    sft = cfg.sft or preset.get("sft_ckpt", "train")
    if sft == SFT_CPU_PATH:
        check_sha256(sft, SFT_CPU_SHA256, "the committed SFT model")
    run = Run(cfg, "pipeline")
    scheduler = Scheduler()
    scheduler.gpus = check_gpus(cfg)
    for sig in (signal.SIGINT, signal.SIGTERM):  # in place of Run's handler, as Run's stays for its process's life
        signal.signal(sig, scheduler.on_signal)
    try:
        return stages(cfg, run, scheduler, preset, methods, files, sft)
    except Stopped:
        print("stopped; run the same command again to continue where it stopped", file=sys.stderr)
        return 130
    finally:
        scheduler.kill_all()
        scheduler.closed = True  # a signal during the exit is ignored, not a traceback


def replicate_seed(seed, replicate):
    """The seed of replicate r (1, 2, ...): seed + REPLICATE_STRIDE * (r - 1); the same function gives the RL/DPO
    seeds inside it from the preset's."""
    return seed + REPLICATE_STRIDE * (replicate - 1)


def run_name(method, strength, seed):
    key = METHODS[method][1]
    return f"{method}_seed{seed}" if key is None else \
        f"{method}_{'alpha' if key == 'alpha' else 'beta'}{strength}_seed{seed}"


def method_of(name):
    """'ppo_gt_beta0.05_seed1@20' -> 'ppo_gt' (the longest method name that prefixes it); 'sft' -> 'sft'."""
    return next((m for m in sorted(METHODS, key=len, reverse=True) if name.startswith(m + "_")), name)


def snapshots(run_dir):
    """{step: path} of the ckpt-STEP.pt files a sub-run kept (--snapshot_interval, --snapshot_steps)."""
    found = {}
    for f in os.listdir(run_dir):
        if f.startswith("ckpt-") and f.endswith(".pt") and f[5:-3].isdigit():
            found[int(f[5:-3])] = os.path.join(run_dir, f)
    return dict(sorted(found.items()))


def stages(cfg, run, scheduler, preset, methods, files, sft):
    out, t0, timings = run.dir, time.time(), {}
    jobs, overwrite = cfg.jobs or preset["jobs"], cfg.overwrite
    replicates = cfg.replicates or preset["replicates"]
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    dev = [f"--device={cfg.device}", f"--dtype={cfg.dtype}"]
    phase = lambda name: timings.__setitem__(name, round(time.time() - t0 - sum(timings.values()), 1))

    # 1. SFT: a tiny GPT trained on the review text (train + unsup), here or ahead of time (the committed model);
    # one for every replicate
    if sft == "train":
        sft_dir = os.path.join(out, "sft")
        scheduler.run_all([("sft", sft_dir, [f"--data={files['train']},{files['unsup']}", f"--seed={cfg.seed}", *dev,
                                             *(f"--{k}={v}" for k, v in preset["sft"].items())])],
                          "1/3 sft", 1, overwrite)
        sft_ckpt = os.path.join(sft_dir, "ckpt.pt")
    else:
        sft_ckpt = os.path.abspath(sft)
        print(f"1/3 sft: starting from {sft}")
    block_size = load_checkpoint(sft_ckpt, "policy")["model_args"]["block_size"]  # a bad --sft fails here, in one line
    phase("sft")

    # 2. prompts: 2-8 token prefixes of train reviews for training, of test reviews for evaluation only; the same
    # prefixes for every replicate (as the paper's fixed set of prefixes)
    made_by = dict(preset=cfg.preset, seed=cfg.seed, n_train=preset["n_train_prompts"],
                   n_eval=preset["n_eval_prompts"], **{s: fingerprint(files[s]) for s in ("train", "test")})
    meta = os.path.join(out, "prompts.json")
    paths = [os.path.join(out, f"prompts_{s}.jsonl") for s in ("train", "eval")]
    if stale(meta, read_json(meta) if os.path.exists(meta) else None, made_by, overwrite) or \
            not all(map(os.path.exists, paths)):
        shuffle = lambda rows, s: [rows[i] for i in torch.randperm(len(rows),
                                                                   generator=torch.Generator().manual_seed(s))]
        write_prompts(shuffle(load_imdb(files["train"]), cfg.seed), paths[0], preset["n_train_prompts"], cfg.seed)
        write_prompts(shuffle(load_imdb(files["test"]), cfg.seed + 1), paths[1], preset["n_eval_prompts"],
                      cfg.seed + 1)
        write_json(meta, made_by)
    train_prompts, eval_prompts = ([row["prompt"] for _, row in read_jsonl(p)] for p in paths)

    # 3. preferences of each replicate: k SFT samples per prefix, every pair of them, labelled by the gold reward
    # (the paper) or by a simulated (Bradley-Terry) human; the chosen responses are Preferred-FT's SFT data
    reps = []
    for r in range(1, replicates + 1):
        rep = dict(replicate=r, seed=replicate_seed(cfg.seed, r), dir=os.path.join(out, f"rep{r}"))
        rep.update(prefs=os.path.join(rep["dir"], "preferences.jsonl"), chosen=os.path.join(rep["dir"], "chosen.jsonl"))
        meta = os.path.join(rep["dir"], "preferences.json")
        made_by = dict(preset=cfg.preset, seed=rep["seed"], sft=sft_ckpt, sft_file=fingerprint(sft_ckpt),
                       prompts=fingerprint(paths[0]), max_new_tokens=preset["max_new_tokens"],
                       temperature=TEMPERATURE, k=preset["k"], labels=preset["labels"])
        stored = read_json(meta) if os.path.exists(meta) else None
        if stale(meta, stored and stored["made_by"], made_by, overwrite) or \
                not (os.path.exists(rep["prefs"]) and os.path.exists(rep["chosen"])):
            scheduler.check()
            os.makedirs(rep["dir"], exist_ok=True)
            agreement = simulate_preferences(sft_ckpt, train_prompts, cfg, preset["max_new_tokens"], TEMPERATURE,
                                             rep["prefs"], preset["k"], preset["labels"], rep["seed"], rep["chosen"])
            write_json(meta, dict(made_by=made_by, agreement=agreement))
        rep["agreement"] = read_json(meta)["agreement"]
        reps.append(rep)
    phase("preferences")

    # 4-6. the proxy reward model of each replicate (from the SFT trunk, trained on that replicate's pairs and
    # normalised on SFT samples at the policies' temperature), every method at every strength and seed of every
    # replicate, and the evaluation on the held-out prefixes: the SFT model, every run's final policy and the weights
    # it kept along training (NAME@STEP), and best-of-N from the SFT policy. One queue, several sub-runs at once: a
    # method that needs no reward model (DPO, PPO on the gold reward, ...) starts beside the reward models, and each
    # run is evaluated as it finishes, while the others train (on the CPU, whose cores the sub-runs already fill,
    # after them). Continuations are cut at max_new_tokens by design (as in the DPO paper): no no-EOS rule for RL,
    # no appended EOS for DPO.
    todo, after, then, owner = [], {}, {}, {}
    for rep in reps:
        rep["proxy"] = os.path.join(rep["dir"], "reward", "ckpt.pt")
        todo.append(("reward", os.path.dirname(rep["proxy"]),
                     [f"--data={rep['prefs']}", f"--init_from={sft_ckpt}", f"--policy={sft_ckpt}",
                      f"--max_new_tokens={preset['max_new_tokens']}", f"--temperature={TEMPERATURE}",
                      f"--block_size={block_size}", f"--seed={rep['seed']}", *dev,
                      *(f"--{k}={v}" for k, v in preset["reward"].items())]))
        owner[todo[-1][1]] = (rep, None)
    for rep in reps:
        rl = [f"--init_from={sft_ckpt}", f"--prompts={paths[0]}", "--no_eos_rule=keep", f"--temperature={TEMPERATURE}",
              f"--max_new_tokens={preset['max_new_tokens']}", *dev, *(f"--{k}={v}" for k, v in preset["rl"].items())]
        dpo = [f"--init_from={sft_ckpt}", f"--data={rep['prefs']}", "--append_eos=false", *dev,
               *(f"--{k}={v}" for k, v in preset["dpo"].items())]
        args = dict(ppo=rl + [f"--reward={rep['proxy']}"], ppo_gt=rl + ["--reward=imdb.py:gold_reward"],
                    rloo=rl + [f"--reward={rep['proxy']}"],
                    # GRPO normalises its rewards within each group already (ppo.py refuses --whiten_rewards)
                    grpo=[a for a in rl if not a.startswith("--whiten_rewards")] + [f"--reward={rep['proxy']}"],
                    dpo=dpo, ipo=dpo + ["--loss=ipo"], unlikelihood=dpo + ["--loss=unlikelihood"],
                    # Preferred-FT: SFT on the chosen responses (they get an EOS there, as every SFT response);
                    # block_size given, as stage sft writes the checkpoint's into config.json, which a re-run checks
                    pft=[f"--init_from={sft_ckpt}", f"--data={rep['chosen']}", f"--block_size={block_size}", *dev,
                         *(f"--{k}={v}" for k, v in preset["pft"].items())])
        rep["runs"], rep["policies"] = {}, {}
        for m in methods:
            stage, key = METHODS[m]
            for strength in preset["methods"][m]:
                for s in preset["seeds"]:
                    seed = replicate_seed(s, rep["replicate"])
                    name = run_name(m, strength, seed)
                    run_dir = os.path.join(rep["dir"], "runs", name)
                    todo.append((stage, run_dir, args[m] + ([f"--{key}={strength}"] if key else []) + [f"--seed={seed}"]))
                    rep["runs"][name], owner[run_dir] = run_dir, (rep, name)
                    then[run_dir] = [os.path.dirname(rep["proxy"])]  # evaluated with it, so after it
                    if f"--reward={rep['proxy']}" in args[m]:
                        after[run_dir] = then[run_dir]
    # the longest runs start first (the DPO-like ones: ~690 optimizer steps each in the gpu preset), after the
    # reward models the RL runs wait for: a queue ordered replicate by replicate ended, on 2 GPUs, with two of them
    # still running alone
    todo[len(reps):] = sorted(todo[len(reps):], key=lambda job: job[0] not in ("dpo", "sft"))
    evaluate = Evaluator(sft_ckpt, eval_prompts, cfg, preset["max_new_tokens"])

    def on_done(out_dir):
        scheduler.check()
        rep, name = owner[out_dir]
        if name is None:  # a reward model: the SFT policy and best-of-N, scored by it
            rep["accuracy"] = read_json(os.path.join(out_dir, "summary.json")).get("eval/accuracy")
            rep["policies"]["sft"] = evaluate("sft", sft_ckpt, rep["proxy"], rep["dir"], rep["seed"])
            rep["best_of_n"] = best_of_n(sft_ckpt, rep["proxy"], eval_prompts[:preset["bon_prompts"]],
                                         preset["bon_pool"], cfg, preset["max_new_tokens"], rep["seed"])
            return
        for label, path in [*((f"{name}@{step}", p) for step, p in snapshots(out_dir).items()),
                            (name, os.path.join(out_dir, "ckpt.pt"))]:
            rep["policies"][label] = evaluate(label, path, rep["proxy"], rep["dir"], rep["seed"])

    scheduler.run_all(todo, "2/3 reward models, methods, evaluation", jobs, overwrite, cpu=on_cpu, after=after,
                      on_done=None if on_cpu else on_done, on_done_after=then)
    if on_cpu:
        for out_dir in owner:
            on_done(out_dir)
    for rep in reps:
        rep["policies"] = dict(sorted(rep["policies"].items(), key=lambda kv: (kv[0] != "sft", kv[0])))
    phase("train_and_evaluate")
    report = dict(preset=cfg.preset, device=cfg.device, k=preset["k"], labels=preset["labels"],
                  max_new_tokens=preset["max_new_tokens"], timings_s=timings,
                  replicates=[dict(replicate=rep["replicate"], seed=rep["seed"], preference_agreement=rep["agreement"],
                                   reward_accuracy=rep["accuracy"], policies=rep["policies"],
                                   best_of_n=rep["best_of_n"]) for rep in reps])
    report["gold_at_kl"] = gold_at_kl(report)
    report["fits"] = gao_fits(report)
    write_json(os.path.join(out, "results.json"), report)
    write_report(report, out)
    phase("report")
    write_json(os.path.join(out, "results.json"), report)  # with the report's time
    print(open(os.path.join(out, "results.md")).read())
    first = reps[0]["policies"]
    run.summary(**{"sft/gold": first["sft"]["gold"], "reward/accuracy": reps[0]["accuracy"],
                   "preference_agreement": reps[0]["agreement"],
                   **{f"{n}/gold": r["gold"] for n, r in first.items()},
                   **{f"{n}/kl": r["kl"] for n, r in first.items()}, "seconds": time.time() - t0})
    return 0


# -----------------------------------------------------------------------------
# the summary: gold reward at fixed KL, and Gao et al.'s functional forms

def by_kl(points):
    """[(kl, value)] -> the same sorted by KL, the values of points at one KL averaged."""
    groups = {}
    for kl, v in points:
        groups.setdefault(kl, []).append(v)
    return sorted((kl, sum(vs) / len(vs)) for kl, vs in groups.items())


def interpolate(points, x):
    """The value at x of the piecewise-linear curve through points [(kl, value)] (by_kl); None outside [smallest
    KL, largest KL]."""
    pts = by_kl(points)
    if not pts or not pts[0][0] <= x <= pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[0][1]  # a single point, at x


def unbeaten(points):
    """A method's frontier from points [(kl, gold)] (points at one KL averaged): the points that no other beats (none
    has less or equal KL and more or equal gold), sorted by KL, then flat to the largest KL of any point. Each point on
    the piecewise-linear curve through them is attainable: mixing two policies per prompt (w, 1 - w) gets their gold
    mixed and a KL at most theirs mixed (KL is convex), so the chord between two points is reached at or below its
    KL. A beaten point (an early checkpoint of a low-beta run, say) changes nothing, so evaluating more checkpoints
    can only raise a method's frontier, never lower it."""
    pts = by_kl(points)
    front = [(kl, v) for kl, v in pts if not any(k <= kl and w >= v and (k, w) != (kl, v) for k, w in pts)]
    if pts and pts[-1][0] > front[-1][0]:
        front.append((pts[-1][0], front[-1][1]))
    return front


def best_at(points, x):
    """The gold reward at KL x on the frontier of `points` (unbeaten); None outside [smallest KL, largest KL]."""
    return interpolate(unbeaten(points), x)  # the frontier spans the points' KLs: None outside them


def frontier(policies, method):
    """A method's frontier in one replicate: (KL, gold) of each strength and checkpoint step, averaged over the RL
    seeds, with the SFT model as every run's step 0 (it is: each run starts from it)."""
    groups = {}
    for name, r in policies.items():
        if method_of(name) == method:
            run, _, step = name.partition("@")
            groups.setdefault((run.rsplit("_seed", 1)[0], step), []).append((r["kl"], r["gold"]))
    sft = policies["sft"]
    return [(0.0, sft["gold"])] + [tuple(sum(c) / len(pts) for c in zip(*pts)) for pts in groups.values()]


def gold_at_kl(report):
    """{method: {kl: {per_replicate, mean, spread, n}}} for kl in KL_POINTS: each replicate's frontier read at kl
    (best_at; None where it does not reach); mean and spread (max - min) over the replicates that reach it.
    Best-of-N (by proxy, by gold) uses its KL from the pool."""
    reps = report["replicates"]
    curves = {}
    for m in sorted({method_of(n) for rep in reps for n in rep["policies"]} - {"sft"}):
        curves[m] = [frontier(rep["policies"], m) for rep in reps]
    for sel in ("proxy", "gold"):
        curves[f"bon_{sel}"] = [[(b["kl"], b["gold"]) for b in rep["best_of_n"][sel]] for rep in reps]
    summary = {}
    for m, per_rep in curves.items():
        summary[m] = {}
        for x in KL_POINTS:
            vals = [best_at(pts, x) for pts in per_rep]
            got = [v for v in vals if v is not None]
            summary[m][str(x)] = dict(per_replicate=vals, n=len(got), mean=sum(got) / len(got) if got else None,
                                      spread=max(got) - min(got) if got else None)
    return summary


GAO_FORMS = dict(bon=lambda d: [d, -d * d], rl=lambda d: [d, -d * math.log(d) if d > 0 else 0.0])


def gao_fit(d, y, form):
    """Least squares of Gao et al. 2022's forms (arXiv 2210.10760, Eq. 1-2) through the origin: R(d) = d (a - b d)
    for best-of-N, R(d) = d (a - b log d) for RL, d = sqrt(KL). Returns dict(a, b, rmse), or None with fewer than
    2 points off the origin."""
    import numpy as np
    if sum(v > 0 for v in d) < 2:
        return None
    X, Y = np.array([GAO_FORMS[form](v) for v in d]), np.array(y)
    (a, b), *_ = np.linalg.lstsq(X, Y, rcond=None)
    return dict(a=float(a), b=float(b), rmse=float(np.sqrt(np.mean((X @ np.array([a, b]) - Y) ** 2))), form=form)


def gao_fits(report):
    """{method: {gold, proxy: fit}}: each method's points of every replicate, rewards minus that replicate's SFT
    model's, against d = sqrt(KL). Best-of-N (by proxy) gets the best-of-N form, the rest the RL form."""
    points = {}
    for rep in report["replicates"]:
        sft = rep["policies"]["sft"]
        for name, r in rep["policies"].items():
            if name != "sft":
                points.setdefault(method_of(name), []).append((r["kl"], r["gold"] - sft["gold"],
                                                               r["proxy"] - sft["proxy"]))
        for b in rep["best_of_n"]["proxy"]:
            points.setdefault("bon_proxy", []).append((b["kl"], b["gold"] - sft["gold"], b["proxy"] - sft["proxy"]))
    fits = {}
    for m, pts in points.items():
        d = [math.sqrt(max(kl, 0.0)) for kl, _, _ in pts]
        form = "bon" if m.startswith("bon") else "rl"
        fits[m] = {key: gao_fit(d, [p[i] for p in pts], form) for i, key in ((1, "gold"), (2, "proxy"))}
    return fits


# -----------------------------------------------------------------------------
# the report, and stage `plot` for any run folder

COLORS = dict(ppo="C0", ppo_gt="C1", dpo="C2", rloo="C3", grpo="C4", ipo="C5", pft="C6", unlikelihood="C8",
              bon_proxy="C7", bon_gold="C9", sft="k")


def cell(entry, replicates):
    """'0.912 ± 0.008' (mean ± spread, max - min over replicates), '0.912' for one replicate, a count where only
    some replicates reach the KL, '-' where none does."""
    if entry["mean"] is None:
        return "-"
    text = f"{entry['mean']:.3f}" + (f" ± {entry['spread']:.3f}" if entry["n"] > 1 else "")
    return text + (f" ({entry['n']}/{replicates})" if entry["n"] < replicates else "")


def write_report(report, out):
    """results.md (gold@KL, a row per policy, best-of-N, the fits), frontier.png (gold reward against KL, every
    checkpoint), overoptimisation.png (gold and proxy reward against sqrt(KL), with Gao et al.'s fits)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    reps, R, T = report["replicates"], len(report["replicates"]), report["max_new_tokens"]
    lines = [f"IMDb controlled sentiment, preset {report['preset']} on {report['device']}: {report['k']} SFT samples "
             f"per prefix and every pair of them ({report['k'] * (report['k'] - 1) // 2} per prefix), "
             f"{report['labels']} labels; {R} replicate(s)."] + \
        [f"- replicate {rep['replicate']} (seed {rep['seed']}): labels agree with the gold reward on "
         f"{rep['preference_agreement']:.1%} of pairs; proxy reward model eval accuracy {rep['reward_accuracy']:.1%}"
         for rep in reps]
    lines += ["", f"Gold reward at fixed KL (nats per sequence; per token: divide by the response length, {T} tokens "
              f"when a continuation runs to the end), read off each method's frontier: piecewise linear from the "
              f"SFT model (KL 0) through its strengths and checkpoints that no other beats on both KL and gold, "
              f"flat after the last (each value is attainable by mixing two policies); mean ± spread (max - min) over "
              f"replicates; '-': no run reaches that KL.", "",
              "| method | " + " | ".join(f"gold @ KL {x:g} ({x / T:.3f}/token)" for x in KL_POINTS) + " |",
              "|---|" + "---|" * len(KL_POINTS)]
    for m, row in report["gold_at_kl"].items():
        lines.append(f"| {m} | " + " | ".join(cell(row[str(x)], R) for x in KL_POINTS) + " |")
    lines += ["", "| replicate | policy | gold reward | proxy reward | KL(pi‖ref) nats | KL per token | "
              "response tokens |", "|---|---|---|---|---|---|---|"]
    for rep in reps:
        for name, r in sorted(rep["policies"].items(), key=lambda kv: (method_of(kv[0]), kv[0])):
            lines.append(f"| {rep['replicate']} | {name} | {r['gold']:.3f} | {r['proxy']:+.3f} | {r['kl']:.2f} | "
                         f"{r['kl'] / max(r['length'], 1):.3f} | {r['length']:.1f} |")
    lines += ["", "Best-of-N from a pool of SFT samples per prompt. KL: of the best-of-N selection from the pool, "
              "computed from the scores (ties share their probability); bound: log N - (N-1)/N (Beirami et al. 2024).",
              "", "| replicate | best-of-N | N | gold reward | proxy reward | KL from the pool | bound |",
              "|---|---|---|---|---|---|---|"]
    for rep in reps:
        for sel in ("proxy", "gold"):
            for r in rep["best_of_n"][sel]:
                lines.append(f"| {rep['replicate']} | by {sel} | {r['n']} | {r['gold']:.3f} | {r['proxy']:+.3f} | "
                             f"{r['kl']:.3f} | {r['kl_bound']:.3f} |")
    lines += ["", "Gao et al. 2022's forms, fitted to reward minus the SFT model's against d = sqrt(KL): "
              "best-of-N d (a - b d), the others d (a - b log d).", "",
              "| method | gold a | gold b | gold rmse | proxy a | proxy b | proxy rmse |", "|---|---|---|---|---|---|---|"]
    for m, fit in report["fits"].items():
        lines.append(f"| {m} | " + " | ".join("- | - | -" if fit[k] is None else
                                              f"{fit[k]['a']:.4f} | {fit[k]['b']:.4f} | {fit[k]['rmse']:.4f}"
                                              for k in ("gold", "proxy")) + " |")
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in report["timings_s"].items())]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    # gold reward against KL: every checkpoint (final policies large, earlier ones small), each replicate's frontier
    # as a line, best-of-N dashed
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key in zip(axes, ("gold", "proxy")):
        for i, rep in enumerate(reps):
            res = rep["policies"]
            for m in sorted({method_of(n) for n in res} - {"sft"}):
                final = [(r["kl"], r[key]) for n, r in res.items() if method_of(n) == m and "@" not in n]
                along = [(r["kl"], r[key]) for n, r in res.items() if method_of(n) == m and "@" in n]
                ax.plot(*zip(*final), "o", color=COLORS.get(m, "C5"), alpha=0.8, label=m if i == 0 else None)
                if along:
                    ax.plot(*zip(*along), ".", color=COLORS.get(m, "C5"), alpha=0.6)
                if key == "gold":  # the frontier gold@KL reads
                    ax.plot(*zip(*unbeaten(frontier(res, m))), "-", color=COLORS.get(m, "C5"), alpha=0.4, lw=1)
            for sel, style in (("proxy", "--"), ("gold", ":")):
                ax.plot([r["kl"] for r in rep["best_of_n"][sel]], [r[key] for r in rep["best_of_n"][sel]], style,
                        color="C7", label=f"best-of-N by {sel}" if i == 0 else None)
            ax.plot([0], [res["sft"][key]], "k*", label="SFT" if i == 0 else None)
        ax.set_xlabel("KL(π ‖ π_ref), nats per response")
        ax.set_ylabel(f"{key} reward" + (" (P(positive))" if key == "gold" else " (normalised)"))
        ax.set_title(f"{key} reward vs KL, {R} replicate(s)\n(small dots: checkpoints along training"
                     + ("; lines: each method's frontier of unbeaten points)" if key == "gold" else ")"), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "frontier.png"), dpi=120)
    plt.close(fig)

    # over-optimisation (Gao et al.): reward gained over the SFT model against d = sqrt(KL), points and fits
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key in zip(axes, ("gold", "proxy")):
        labelled = set()
        for rep in reps:
            sft = rep["policies"]["sft"]
            for name, r in rep["policies"].items():
                if name != "sft":
                    m = method_of(name)
                    ax.plot(math.sqrt(max(r["kl"], 0)), r[key] - sft[key], ".", color=COLORS.get(m, "C5"), alpha=0.5,
                            label=None if m in labelled else m)
                    labelled.add(m)
            b = rep["best_of_n"]["proxy"]
            ax.plot([math.sqrt(max(x["kl"], 0)) for x in b], [x[key] - sft[key] for x in b], "x", color="C7",
                    alpha=0.6, label=None if "bon" in labelled else "best-of-N by proxy")
            labelled.add("bon")
        for m, fit in report["fits"].items():
            if fit[key] is None:
                continue
            reach = max(math.sqrt(max(r["kl"], 0)) for rep in reps for n, r in rep["policies"].items()
                        if method_of(n) == m) if m != "bon_proxy" else \
                max(math.sqrt(max(x["kl"], 0)) for rep in reps for x in rep["best_of_n"]["proxy"])
            ds = [reach * j / 50 for j in range(1, 51)]
            ax.plot(ds, [fit[key]["a"] * x0 + fit[key]["b"] * x1 for x0, x1 in map(GAO_FORMS[fit[key]["form"]], ds)],
                    "-", color=COLORS.get(m, "C5"), label=f"{m} fit")
        ax.set_xlabel("d = sqrt(KL), sqrt(nats)")
        ax.set_ylabel(f"{key} reward minus the SFT model's")
        ax.set_title(f"{key} reward as KL grows, with Gao et al.'s fits")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
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
    rows_of_axes = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows_of_axes, cols, figsize=(5 * cols, 3.2 * rows_of_axes), squeeze=False)
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

"""
The IMDb benchmark end to end (stage `pipeline`, what `python train.py` runs), after the DPO paper's section 6.1:
SFT -> prompts -> k SFT samples per prefix and every pair of them, labelled by the gold reward (or a simulated
Bradley-Terry human) -> proxy reward model -> PPO, PPO on the gold reward, DPO (IPO), RLOO, GRPO, Preferred-FT and
Unlikelihood at each strength -> every policy, and the checkpoints each run kept along training, evaluated on
held-out prefixes; best-of-N from the SFT policy -> the report (report.py). Everything after the SFT model is repeated
--replicates times with other seeds (rep1/, rep2/, ...), so the spread it reports is that of the whole pipeline. The
task itself (data, gold reward, prompts, preference pairs, the presets' sizes) is imdb.py's; each training step is a
sub-run of train.py.

    python train.py                                  # the cpu preset (~4 min on 2 cores) into out/imdb
    python train.py pipeline --preset=gpu --imdb_dir=../shared/data/imdb --out_dir=out/imdb-gpu   # one H200
    python train.py pipeline --preset=tiny --out_dir=/tmp/imdb    # the tests' size

To read it: pipeline() at the bottom runs the steps above it in order: sft, prompts, preferences, one queue, report.

Re-running: run the same command again after a stop or a crash, and finished sub-runs are reused, killed ones resumed.
A sub-run is reused only if its config.json equals the config the new command gives it and the files it read are the
same bytes (inputs.json); the prompts, preferences (prompts.json, preferences.json) and each evaluation
(samples/NAME.json) likewise. Anything else is refused in one line, or with --overwrite made again, so that one folder
never mixes the results of two configurations. Ctrl-C (or SIGTERM) once: each running sub-run gets one SIGTERM, saves
a checkpoint and exits, and the pipeline exits with status 130; twice: the sub-runs are killed at once (their
checkpoints are written atomically). Sub-runs run in their own process group: a terminal's Ctrl-C reaches only the
pipeline. A sub-run that fails (exit status 1 or 2) leaves the others running: what needed it is skipped, the report
covers the rest and names the failures, and the pipeline then exits with status 1.

Simplifications, on purpose:
- Every policy, the preference pairs, the reward model's normalisation and best-of-N sample at one temperature
  (TEMPERATURE, 1): the policy's own distribution, the one whose KL to the reference is reported.
- Continuations are cut at max_new_tokens (as in the DPO paper): the RL stages keep cut responses as they are
  (--no_eos_rule=keep), DPO appends no EOS to its pairs (--append_eos=false); a policy may still sample EOS early.
- Best-of-N is read off one pool of SFT samples per prompt as an exact expectation over the pool, not by drawing N.
- One machine: sub-runs share its cores or GPUs; evaluations run in the pipeline's process, one at a time, while the
  sub-runs train. Replicates share the SFT model and the prefixes.
- Preferred-FT is stage sft on each pair's chosen response (a prefix's best sample appears once per pair it wins).
"""
import dataclasses
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import dpo
import ppo
import reward
import sft
from checkpoint import drop_resume_state, fingerprint, load_checkpoint
from config import ConfigError, RunConfig, TrainingError, opt, parse_config, plural
from data import load_imdb, read_json, read_jsonl, write_json
from imdb import (PRESETS, ROOT, SFT_CPU_PATH, SFT_CPU_SHA256, SPLITS, TEMPERATURE, check_sha256, imdb_files,
                  simulate_preferences, with_rl_batch, write_prompts)
from report import (OBJECTIVE, OPTIMUM_BETAS, Evaluator, evaluate_run, gao_fits, gold_at_kl, objective_gaps,
                    pool_curves, sample_pool, write_report)
from runtime import INPUT_KEYS, RESTART_KEYS, Run, as_stored, effective_config


# method -> (stage, the key its strengths set); the data and reward each one gets are in method_args() below
METHODS = dict(ppo=("ppo", "kl_coef"), ppo_gt=("ppo", "kl_coef"), dpo=("dpo", "beta"), ipo=("dpo", "beta"),
               online_dpo=("online_dpo", "beta"), online_dpo_gt=("online_dpo", "beta"),
               rloo=("rloo", "kl_coef"), grpo=("grpo", "kl_coef"), pft=("sft", None),
               unlikelihood=("dpo", "alpha"))
REPLICATE_STRIDE = 1000  # replicate r's seeds are the first's plus 1000 (r - 1): replicate 1 is the run of old


@dataclass
class PipelineConfig(RunConfig):
    out_dir: str = opt("out/imdb", "run folder of the whole benchmark; each sub-run gets a folder inside it")
    preset: str = opt("cpu", "IMDb: cpu (the main job: ~4 min on 2 cores, committed sample), gpu (the DPO paper's "
                             "set-up, 2 replicates), gpu-bt (simulated BT labels), gpu-lr (a learning-rate sweep), "
                             "gpu-online (online DPO labelled by the proxy and by gold) or tiny (the tests'); your "
                             "data (own_data.py): own (the default with --preferences), own-gpu, hh-cpu (HH-RLHF's "
                             "test pairs, ~4 min on 2 cores), hh-gpu, own-tiny")
    imdb_dir: str = opt("", "folder with IMDb {train,test,unsup}.jsonl.gz (default: the preset's; cpu: the "
                            "committed sample)")
    jobs: int = opt(0, "sub-runs at once (0: the preset's; several share one GPU well)", min=0)
    methods: str = opt("", "comma-separated subset of " + ",".join(METHODS) + " (default: the preset's)")
    replicates: int = opt(0, "repeat everything after the SFT model with other seeds (0: the preset's)", min=0)
    sft: str = opt("", "the SFT model: train (train it in this run), a policy checkpoint to start from, or '' (the "
                       "preset's: cpu and tiny start from the committed assets/sft-imdb-cpu.pt, gpu trains)")
    rl_batch_size: int = opt(0, "responses per step of the RL methods (ppo, ppo_gt, rloo, grpo; 0: the preset's, "
                                "128 in gpu; the DPO paper's PPO: 1,024), their minibatches grown alike", min=0)
    keep_snapshots: bool = opt(False, "keep every policy's weights once evaluated (default: only their samples and "
                                      "numbers stay, and the final policies' weights of replicate 1)")
    gpus: str = opt("", "GPUs for the sub-runs, comma-separated (0,1): each sub-run gets the least busy one as its "
                        "only GPU (CUDA_VISIBLE_DEVICES); --jobs counts over all (default: they share the current one)")
    # your own data (own_data.py): --preferences, or an own-data preset, runs it instead of the IMDb benchmark
    preferences: str = opt("", "your preference pairs, in any format the loaders read (comma-separated files)")
    eval_preferences: str = opt("", "held-out pairs (default: the last 10% of --preferences)")
    sft_data: str = opt("", "your SFT examples (default: none, the policy is --init_from)")
    init_from: str = opt("", "the policy to start from: a checkpoint or GPT-2 folder (default: the preset's; "
                             "without it and with --sft_data, from scratch)")
    prompts: str = opt("", "prompts of the RL methods (default: those of --preferences)")
    eval_prompts: str = opt("", "held-out prompts of the report (default: the last 10% of the prompts)")
    gold: str = opt("", "a judge of your own, independent of the reward model: FILE.py:FUNCTION (prompts, responses "
                        "-> one float each) or a reward checkpoint; the report adds its score and win rate")


# -----------------------------------------------------------------------------
# reuse only what the same inputs made

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


def sub_run_plan(stage, out_dir, args, overwrite):
    """(plan, inputs) of the sub-run `train.py STAGE ARGS --out_dir=OUT_DIR`: 'done' (finished, made by this config,
    ignoring runtime.RESTART_KEYS, which do not change what it computes, from these inputs: inputs.json), 'resume'
    (the same, killed after a checkpoint), 'fresh', or 'overwrite' (a stale run, with --overwrite)."""
    cfg = parse_config(SUB_RUN_CONFIGS[stage], [*args, f"--out_dir={out_dir}"])
    new = {k: v for k, v in as_stored(dict(stage=stage, **dataclasses.asdict(cfg))).items() if k not in RESTART_KEYS}
    inputs = inputs_of(args)
    stored = {f: read_json(os.path.join(out_dir, f)) if os.path.exists(os.path.join(out_dir, f)) else None
              for f in ("config.json", "inputs.json")}
    done = os.path.exists(os.path.join(out_dir, "summary.json"))
    if stored["config.json"] is None and not done:
        return "fresh", inputs  # never started, or killed before it wrote its config
    old = stored["config.json"] and {k: v for k, v in effective_config(stored["config.json"],
                                                                        SUB_RUN_CONFIGS[stage]).items()
                                     if k not in RESTART_KEYS}
    if stale(out_dir, old, new, overwrite) or \
            stale(f"{out_dir} (its input files)", stored["inputs.json"], inputs, overwrite):
        return "overwrite", inputs
    if done:
        return "done", inputs
    return ("resume" if os.path.exists(os.path.join(out_dir, "ckpt.pt")) else "fresh"), inputs


def inputs_of(args):
    """{file: size and sha256} of every file or folder (a GPT-2 folder: its files) that an input argument
    (runtime.INPUT_KEYS) names (--data=a,b names two); not the files a sub-run writes (--ref_cache_file)."""
    files = [v for a in args if a.partition("=")[0].lstrip("-") in INPUT_KEYS for v in a.partition("=")[2].split(",")
             if v and os.path.exists(v)]  # a folder too
    return {f: fingerprint(f) for f in files}


# -----------------------------------------------------------------------------
# sub-runs: train.py in child processes, a few at a time, stopped cleanly

SUB_RUN_CONFIGS = dict(sft=sft.SFTConfig, reward=reward.RewardConfig, dpo=dpo.DPOConfig, ppo=ppo.PPOConfig,
                       rloo=ppo.RLOOConfig, grpo=ppo.GRPOConfig, online_dpo=dpo.OnlineDPOConfig)


class Stopped(Exception):
    """Ctrl-C or SIGTERM: the pipeline stops between sub-runs or policies and exits with status 130."""


class Queue:
    """Sub-runs of train.py as child processes: a pool of threads, each waiting on one child, while the main thread
    starts what became ready and hands what finished to the evaluation thread, one at a time. First SIGINT/SIGTERM, or
    a failed sub-run: one SIGTERM to each running child (it saves a checkpoint and exits) and nothing new starts; a
    second signal kills them all."""

    def __init__(self, gpus=(), profile=None):
        self.gpus, self.procs, self.lock = list(gpus), {}, threading.RLock()  # procs: {out_dir: Popen}, running
        self.signals, self.closed, self.profile = 0, False, profile  # profile: JSONL, where the time went

    def note(self, what, out_dir, t0):  # a row of the profile: a sub-run's or evaluation's wall seconds from t0
        if self.profile:
            with self.lock, open(self.profile, "a") as f:
                f.write(json.dumps(dict(what=what, name=os.path.relpath(out_dir, os.path.dirname(self.profile)),
                                        start=round(t0, 2), seconds=round(time.time() - t0, 2))) + "\n")

    def on_signal(self, signum, frame):
        if self.closed:  # the pipeline is already on its way out: nothing left to stop
            return
        self.signals += 1
        if self.signals > 1:
            self.kill_all()
            raise Stopped
        print(f"\n{signal.Signals(signum).name}: stopping; the running sub-runs save a checkpoint and exit (a second "
              f"signal kills them)", file=sys.stderr, flush=True)
        self.terminate_all()

    def terminate_all(self):
        """One SIGTERM to each running child, never a second: a sub-run that is saving after the first must not be
        interrupted."""
        with self.lock:
            for p in self.procs.values():
                if p.poll() is None and not getattr(p, "terminated", False):
                    p.terminated = True
                    p.send_signal(signal.SIGTERM)

    def kill_all(self):
        with self.lock:
            for p in self.procs.values():
                if p.poll() is None:
                    try:
                        os.killpg(p.pid, signal.SIGKILL)  # its own process group (start_new_session): all of it
                    except ProcessLookupError:
                        pass

    def check(self):
        if self.signals:
            raise Stopped

    def pick_gpu(self):
        """The GPU (a CUDA_VISIBLE_DEVICES entry) of --gpus that runs the fewest sub-runs now; None without --gpus."""
        busy = lambda g: sum(p.gpu == g for p in self.procs.values())
        return min(self.gpus, key=busy) if self.gpus else None

    def run(self, stage, out_dir, args, plan, inputs, threads):
        """In a pool thread: `python train.py STAGE ARGS` in its own session (stopped as by Ctrl-C if this process
        dies: runtime.stop_with_parent), writing out_dir/log.txt, on the GPU of --gpus that runs the fewest sub-runs;
        once it finished, its checkpoint without the optimizer state (kept while it can resume). Returns its status."""
        if plan == "overwrite":
            shutil.rmtree(out_dir)  # from scratch: no stale checkpoint, summary or metrics survives
        os.makedirs(out_dir, exist_ok=True)
        write_json(os.path.join(out_dir, "inputs.json"), inputs)
        extra = {"resume": ["--resume"], "overwrite": ["--overwrite"]}.get(plan, [])
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), stage, *args, f"--out_dir={out_dir}", *extra]
        t0 = time.time()
        with open(os.path.join(out_dir, "log.txt"), "a") as log, self.lock:
            log.write(" ".join(cmd) + "\n")
            log.flush()
            gpu = self.pick_gpu()
            env = dict(os.environ, TQDM_DISABLE="1", RLHF_PIPELINE_PID=str(os.getpid()),
                       **({"OMP_NUM_THREADS": str(threads)} if threads else {}),
                       **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}))
            p = self.procs[out_dir] = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                       start_new_session=True)
            p.gpu = gpu
            if self.signals:  # a stop that came while this one was starting
                p.terminated = True
                p.send_signal(signal.SIGTERM)
        code = p.wait()
        with self.lock:
            del self.procs[out_dir]
        self.note("run", out_dir, t0)
        if code == 0:  # finished: nothing will resume it, so its optimizer state only fills the disk
            drop_resume_state(os.path.join(out_dir, "ckpt.pt"))
        return code

    def evaluate(self, on_done, out_dir):
        """on_done(out_dir) in a thread of its own, a daemon (a second Ctrl-C, which ends the pipeline, does not wait
        for it) -> a Future of out_dir."""
        future = Future()

        def body():
            try:
                t0 = time.time()
                if on_done:
                    on_done(out_dir)
                self.note("evaluate", out_dir, t0)
                future.set_result(out_dir)
            except BaseException as e:  # noqa: BLE001 (the Future carries it to run_all)
                future.set_exception(e)
        threading.Thread(target=body, daemon=True).start()
        return future

    def run_all(self, jobs, desc, max_jobs, overwrite, cpu=False, after=None, on_done=None, on_done_after=None):
        """Run [(stage, out_dir, args)] at most max_jobs at a time, in order. after: {out_dir: [out_dirs]} a job waits
        for (PPO for its reward model; its folder is checked when it starts, as its inputs exist only then).
        on_done(out_dir) runs in a thread beside this one as each job finishes or is found done, one at a time, while
        the others train and new ones start, after the on_done of on_done_after[out_dir] (a DPO run is evaluated with
        its reward model). cpu: each sub-run gets cores // max_jobs threads, and on_done waits for a core the sub-runs
        leave idle (nothing left to start, fewer than max_jobs running), so the evaluation fills the queue's tail
        instead of slowing the sub-runs. A sub-run that fails leaves the others running: returns {out_dir: why} of
        each one that failed, could not start (a prerequisite failed) or cannot be evaluated (the same), {} if none."""
        self.check()
        threads = max(1, (os.cpu_count() or 1) // max_jobs) if cpu else 0
        names = {job[1] for job in jobs}
        after, then = ({d: [a for a in deps if a in names] for d, deps in (m or {}).items()}
                       for m in (after, on_done_after))
        plans = {job[1]: sub_run_plan(*job, overwrite) for job in jobs if not after.get(job[1])}
        waiting, running, finished, unevaluated, evaluated, failed = list(jobs), {}, set(), [], set(), {}
        evaluating = None  # the evaluation in progress: a Future of its out_dir
        lost = lambda d, deps: next((a for a in deps.get(d, ()) if a in failed), None)  # a failed prerequisite
        with ThreadPoolExecutor(max_jobs) as pool, tqdm(total=len(jobs), desc=desc, dynamic_ncols=True) as bar:
            try:
                while (waiting or running or unevaluated) and not self.signals or running or evaluating:
                    # 0. what a failure left unable to run (PPO without its reward model) or to be evaluated
                    for job in [j for j in waiting if lost(j[1], after)]:
                        waiting.remove(job), bar.update(1)
                        failed[job[1]] = f"not run: {lost(job[1], after)} failed"
                    for d in [d for d in unevaluated if lost(d, then)]:
                        unevaluated.remove(d)
                        failed[d] = f"not evaluated: {lost(d, then)} failed"
                    # 1. start, in order, what is ready while a worker is free (a job found done makes others ready)
                    startable = lambda: next((j for j in waiting if set(after.get(j[1], ())) <= finished), None)
                    while len(running) < max_jobs and not self.signals and (job := startable()):
                        waiting.remove(job)
                        plan, inputs = plans.get(job[1]) or sub_run_plan(*job, overwrite)
                        if plan == "done":
                            finished.add(job[1]), unevaluated.append(job[1]), bar.update(1)
                        else:
                            running[pool.submit(self.run, *job, plan, inputs, threads)] = job[1]
                    # 2. evaluate one finished run whose prerequisites are evaluated, in a thread while this loop goes
                    #    on (a run that ends meanwhile frees its place at once)
                    if evaluating and evaluating.done():
                        try:
                            evaluated.add(evaluating.result())  # an error in it stops the pipeline
                        except Stopped:  # a stop came before it began: the running sub-runs save and exit
                            pass
                        evaluating = None
                    ready = [d for d in unevaluated if set(then.get(d, ())) <= evaluated]
                    idle = not (cpu and (waiting or len(running) >= max_jobs))
                    if ready and not evaluating and not self.signals and idle:
                        unevaluated.remove(ready[0])
                        evaluating = self.evaluate(on_done, ready[0])
                    if not running and not evaluating:
                        if waiting or unevaluated:  # nothing runs, nothing can start: a bug, not input
                            raise ValueError(f"the queue's dependencies go round in a circle: {waiting or unevaluated}")
                        continue
                    # 3. wait for a sub-run or the evaluation to end
                    for f in wait([*running, evaluating] if evaluating else running, 1.0, FIRST_COMPLETED)[0]:
                        if f is evaluating:
                            continue
                        out_dir = running.pop(f)
                        bar.update(1)
                        if f.result() == 0:
                            finished.add(out_dir), unevaluated.append(out_dir)
                        elif not self.signals:
                            with open(os.path.join(out_dir, "log.txt")) as log:
                                failed[out_dir] = (log.read().strip().splitlines()[-1:] or ["(no output)"])[0][:200]
            finally:
                self.kill_all()  # anything still running here is an error's orphan: none may outlive the pipeline
        self.check()
        return failed


# -----------------------------------------------------------------------------
# the pipeline, step by step

def check_gpus(cfg):
    """--gpus=0,1 -> ['0', '1'], each a GPU of this machine; the sub-runs then see one GPU each, as cuda."""
    gpus = [g.strip() for g in cfg.gpus.split(",") if g.strip()]
    bad = [g for g in gpus if not g.isdigit() or int(g) >= torch.cuda.device_count()]
    if bad:
        raise ConfigError(f"--gpus={cfg.gpus}: {bad[0]!r} is not a GPU of this machine ({torch.cuda.device_count()} "
                          f"CUDA devices)")
    if gpus and cfg.device not in ("auto", "cuda"):
        raise ConfigError(f"--gpus gives each sub-run one GPU as cuda: use --device=auto or cuda, not {cfg.device}")
    return gpus


def replicate_seed(seed, replicate):
    """The seed of replicate r (1, 2, ...), and of its RL/DPO runs from the preset's: seed + 1000 (r - 1)."""
    return seed + REPLICATE_STRIDE * (replicate - 1)


def run_name(method, strength, seed, lr=None):
    """METHOD_beta{strength}[_lr{lr}]_seed{seed} (alpha for unlikelihood; no strength for pft); report.method_of
    reads the method (with its learning rate, in a sweep) back."""
    key = METHODS[method][1]
    return method + ("" if key is None else f"_{'alpha' if key == 'alpha' else 'beta'}{strength}") + \
        ("" if lr is None else f"_lr{lr:g}") + f"_seed{seed}"


@dataclass
class Replicate:
    """Everything downstream of the SFT model, once per replicate: its seed, folder, labels, proxy, evaluations."""
    number: int
    seed: int
    dir: str
    agreement: float = None  # share of its preference labels that agree with the gold reward
    accuracy: float = None  # its proxy reward model's held-out accuracy
    policies: dict = field(default_factory=dict)  # policy name (RUN or RUN@STEP) -> evaluation
    best_of_n: dict = None
    optimum: dict = None  # the exact optimum of E[r] - beta KL from the best-of-N pool, tilted by proxy and by gold

    def path(self, *parts):
        return os.path.join(self.dir, *parts)


def train_sft(cfg, queue, preset, files, sft_arg, dev):
    """Step 1: the SFT model, a tiny GPT trained on the review text (train + unsup) here, or ahead of time (the
    committed model); one for every replicate."""
    if sft_arg != "train":
        print(f"1/3 sft: starting from {sft_arg}")
        return os.path.abspath(sft_arg)
    sft_dir = os.path.join(cfg.out_dir, "sft")
    failed = queue.run_all([("sft", sft_dir, [f"--data={files['train']},{files['unsup']}", f"--seed={cfg.seed}", *dev,
                                              *(f"--{k}={v}" for k, v in preset["sft"].items())])], "1/3 sft", 1,
                           cfg.overwrite)
    if failed:
        raise TrainingError(f"{sft_dir}: sub-run failed ({failed[sft_dir]}); see its log.txt")
    return os.path.join(sft_dir, "ckpt.pt")


def make_prompts(cfg, preset, files):
    """Step 2: 2-8 token prefixes of train reviews for training, of test reviews for evaluation only; the same
    prefixes for every replicate (as the paper's fixed set of prefixes). Returns their two files."""
    made_by = dict(preset=cfg.preset, seed=cfg.seed, n_train=preset["n_train_prompts"],
                   n_eval=preset["n_eval_prompts"], **{s: fingerprint(files[s]) for s in ("train", "test")})
    meta = os.path.join(cfg.out_dir, "prompts.json")
    paths = [os.path.join(cfg.out_dir, f"prompts_{s}.jsonl") for s in ("train", "eval")]
    if stale(meta, read_json(meta) if os.path.exists(meta) else None, made_by, cfg.overwrite) or \
            not all(map(os.path.exists, paths)):
        shuffle = lambda rows, s: [rows[i] for i in torch.randperm(len(rows),
                                                                   generator=torch.Generator().manual_seed(s))]
        write_prompts(shuffle(load_imdb(files["train"]), cfg.seed), paths[0], preset["n_train_prompts"], cfg.seed)
        write_prompts(shuffle(load_imdb(files["test"]), cfg.seed + 1), paths[1], preset["n_eval_prompts"],
                      cfg.seed + 1)
        write_json(meta, made_by)
    return paths


def make_preferences(cfg, queue, preset, rep, sft_ckpt, train_prompts, prompts_file):
    """Step 3, per replicate: k SFT samples per prefix and every pair of them, labelled by the gold reward (the paper)
    or by a simulated (Bradley-Terry) human; the chosen responses are Preferred-FT's SFT data."""
    meta = rep.path("preferences.json")
    made_by = dict(preset=cfg.preset, seed=rep.seed, sft=sft_ckpt, sft_file=fingerprint(sft_ckpt),
                   prompts=fingerprint(prompts_file), max_new_tokens=preset["max_new_tokens"],
                   temperature=TEMPERATURE, k=preset["k"], labels=preset["labels"])
    stored = read_json(meta) if os.path.exists(meta) else None
    if stale(meta, stored and stored["made_by"], made_by, cfg.overwrite) or \
            not (os.path.exists(rep.path("preferences.jsonl")) and os.path.exists(rep.path("chosen.jsonl"))):
        queue.check()
        os.makedirs(rep.dir, exist_ok=True)
        agreement = simulate_preferences(sft_ckpt, train_prompts, cfg, preset["max_new_tokens"], TEMPERATURE,
                                         rep.path("preferences.jsonl"), preset["k"], preset["labels"], rep.seed,
                                         rep.path("chosen.jsonl"))
        write_json(meta, dict(made_by=made_by, agreement=agreement))
    rep.agreement = read_json(meta)["agreement"]


def method_args(preset, rep, sft_ckpt, prompts_file, block_size, dev):
    """Each method's sub-run arguments in replicate rep, but its strength and seed. Continuations are cut at
    max_new_tokens by design (as in the DPO paper): no no-EOS rule for RL, no appended EOS for DPO."""
    proxy, gold = f"--reward={rep.path('reward', 'ckpt.pt')}", "--reward=imdb.py:gold_reward"
    rl = [f"--init_from={sft_ckpt}", f"--prompts={prompts_file}", "--no_eos_rule=keep", f"--temperature={TEMPERATURE}",
          f"--max_new_tokens={preset['max_new_tokens']}", *dev, *(f"--{k}={v}" for k, v in preset["rl"].items())]
    # the DPO runs of a replicate share the reference's log-probs of its pairs: the first to start computes them
    dpo_ = [f"--init_from={sft_ckpt}", f"--data={rep.path('preferences.jsonl')}", "--append_eos=false", *dev,
            f"--ref_cache_file={rep.path('reference_logps.pt')}", *(f"--{k}={v}" for k, v in preset["dpo"].items())]
    # online DPO: the RL stages' prompts, its pairs sampled at every step and labelled by the proxy (or the gold reward)
    online = [f"--init_from={sft_ckpt}", f"--prompts={prompts_file}", f"--max_new_tokens={preset['max_new_tokens']}",
              *dev, *(f"--{k}={v}" for k, v in preset.get("online_dpo", {}).items())]
    return dict(ppo=rl + [proxy], ppo_gt=rl + [gold], rloo=rl + [proxy],
                # GRPO normalises its rewards within each group already (ppo.py refuses --whiten_rewards)
                grpo=[a for a in rl if not a.startswith("--whiten_rewards")] + [proxy],
                dpo=dpo_, ipo=dpo_ + ["--loss=ipo"], unlikelihood=dpo_ + ["--loss=unlikelihood"],
                online_dpo=online + [proxy], online_dpo_gt=online + [gold],
                # Preferred-FT: SFT on the chosen responses (they get an EOS there, as every SFT response);
                # block_size given, as stage sft writes the checkpoint's into config.json, which a re-run checks
                pft=[f"--init_from={sft_ckpt}", f"--data={rep.path('chosen.jsonl')}", f"--block_size={block_size}",
                     *dev, *(f"--{k}={v}" for k, v in preset["pft"].items())])


def queue_jobs(preset, methods, reps, sft_ckpt, prompts_file, block_size, dev):
    """Step 4's jobs: the proxy reward model of each replicate (from the SFT trunk, trained on that replicate's pairs
    and normalised on SFT samples at the policies' temperature), then every method at every strength and seed of
    every replicate. Returns (jobs, after: what waits for which reward model, owner: folder -> (replicate, run))."""
    jobs, after, owner = [], {}, {}
    for rep in reps:
        jobs.append(("reward", rep.path("reward"),
                     [f"--data={rep.path('preferences.jsonl')}", f"--init_from={sft_ckpt}", f"--policy={sft_ckpt}",
                      f"--max_new_tokens={preset['max_new_tokens']}", f"--temperature={TEMPERATURE}",
                      f"--block_size={block_size}", f"--seed={rep.seed}", *dev,
                      *(f"--{k}={v}" for k, v in preset["reward"].items())]))
        owner[jobs[-1][1]] = (rep, None)
    for rep in reps:
        args = method_args(preset, rep, sft_ckpt, prompts_file, block_size, dev)
        for m in methods:
            stage, key = METHODS[m]
            # a learning-rate sweep (preset gpu-lr): each strength at each rate, a method of its own in the report
            rates = preset.get("learning_rates", {}).get(m, [None])
            for strength, lr, s in itertools.product(preset["methods"][m], rates, preset["seeds"]):
                seed = replicate_seed(s, rep.number)
                name = run_name(m, strength, seed, lr)
                run_dir = rep.path("runs", name)
                jobs.append((stage, run_dir, args[m] + ([f"--{key}={strength}"] if key else []) +
                             ([f"--learning_rate={lr}"] if lr else []) + [f"--seed={seed}"]))
                owner[run_dir] = (rep, name)
                if f"--reward={rep.path('reward', 'ckpt.pt')}" in args[m]:
                    after[run_dir] = [rep.path("reward")]
    # the longest runs first, after the reward models: the DPO-like ones (180 s in the gpu preset on one H100), online
    # DPO (125 s), the RL runs (75-113 s); in replicate order, the queue ended with two runs alone on 2 GPUs
    jobs[len(reps):] = sorted(jobs[len(reps):], key=lambda job: {"dpo": 0, "sft": 0, "online_dpo": 1}.get(job[0], 2))
    return jobs, after, owner


def pipeline(cfg):
    preset = PRESETS.get(cfg.preset)
    if preset is None:
        raise ConfigError(f"--preset={cfg.preset}: expected one of {', '.join(PRESETS)} (IMDb) or, for your data, "
                          f"own, own-gpu, hh-cpu, hh-gpu, own-tiny")
    methods = cfg.methods.split(",") if cfg.methods else list(preset["methods"])
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"--methods: unknown method {m!r}; expected some of {', '.join(METHODS)}")
        if m not in preset["methods"]:
            raise ConfigError(f"--methods: the {cfg.preset} preset has no strengths for {m} (add them to "
                              f"PRESETS[{cfg.preset!r}]['methods'] in imdb.py)")
    preset = with_rl_batch(preset, cfg.rl_batch_size) if cfg.rl_batch_size else preset
    imdb_dir = cfg.imdb_dir or preset["imdb_dir"]
    files = imdb_files(imdb_dir) if imdb_dir else \
        {s: os.path.join(ROOT, "assets", f"imdb-{s}-sample.jsonl.gz") for s in SPLITS}
    sft_arg = cfg.sft or preset.get("sft_ckpt", "train")
    if sft_arg == SFT_CPU_PATH:
        check_sha256(sft_arg, SFT_CPU_SHA256, "the committed SFT model")
    return with_queue(cfg, lambda run, queue: run_pipeline(cfg, run, queue, preset, methods, files, sft_arg))


def with_queue(cfg, body):
    """body(run, queue) in the pipeline's run folder (this one and own_data.py's), with a Queue that takes Ctrl-C and
    SIGTERM: the sub-runs save and stop, and the pipeline exits with status 130. body calls run.begin() once its
    inputs have loaded (bad input leaves no config.json to refuse the corrected command)."""
    run = Run(cfg, "pipeline")
    queue = Queue(check_gpus(cfg), os.path.join(cfg.out_dir, "profile.jsonl"))
    for sig in (signal.SIGINT, signal.SIGTERM):  # in place of Run's handler, as Run's stays for its process's life
        signal.signal(sig, queue.on_signal)
    try:
        return body(run, queue)
    except Stopped:
        print("stopped; run the same command again to continue where it stopped", file=sys.stderr)
        return 130
    finally:
        queue.kill_all()
        queue.closed = True  # a signal during the exit is ignored, not a traceback


def run_pipeline(cfg, run, queue, preset, methods, files, sft_arg):
    t0, timings = time.time(), {}
    phase = lambda name: timings.__setitem__(name, round(time.time() - t0 - sum(timings.values()), 1))
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    dev = [f"--device={cfg.device}", f"--dtype={cfg.dtype}"]
    # 1. the SFT model
    sft_ckpt = train_sft(cfg, queue, preset, files, sft_arg, dev)
    block_size = load_checkpoint(sft_ckpt, "policy")["model_args"]["block_size"]  # a bad --sft fails here, in one line
    phase("sft")
    # 2. prompts, 3. preference pairs of each replicate
    prompts_files = make_prompts(cfg, preset, files)
    run.begin()  # the inputs have loaded
    train_prompts, eval_prompts = ([row["prompt"] for _, row in read_jsonl(p)] for p in prompts_files)
    reps = [Replicate(r, replicate_seed(cfg.seed, r), os.path.join(cfg.out_dir, f"rep{r}"))
            for r in range(1, (cfg.replicates or preset["replicates"]) + 1)]
    for rep in reps:
        make_preferences(cfg, queue, preset, rep, sft_ckpt, train_prompts, prompts_files[0])
    phase("preferences")
    # 4. one queue: the reward models, every method's runs, and the evaluation on the held-out prefixes of the SFT
    # model, every run's final policy and the weights it kept along training (NAME@STEP), and best-of-N from the SFT
    # policy. A method that needs no reward model (DPO, PPO on the gold reward, ...) starts beside the reward models,
    # and each run is evaluated as it finishes, while the others train (on the CPU, whose cores the sub-runs fill,
    # once a core is idle: Queue.run_all)
    jobs, after, owner = queue_jobs(preset, methods, reps, sft_ckpt, prompts_files[0], block_size, dev)
    evaluate = Evaluator(sft_ckpt, eval_prompts, cfg, preset["max_new_tokens"])
    betas = sorted({*OPTIMUM_BETAS, *(b for m in methods if m in OBJECTIVE for b in preset["methods"][m])})

    def on_done(out_dir):
        queue.check()
        rep, name = owner[out_dir]
        if name is None:  # a reward model: the SFT policy and best-of-N, scored by it
            rep.accuracy = read_json(os.path.join(out_dir, "summary.json")).get("eval/accuracy")
            rep.policies["sft"] = evaluate("sft", sft_ckpt, rep.path("reward", "ckpt.pt"), rep.dir, rep.seed,
                                           preset.get("sft_samples", 1))
            gold, proxy = sample_pool(sft_ckpt, rep.path("reward", "ckpt.pt"), eval_prompts[:preset["bon_prompts"]],
                                      preset["bon_pool"], cfg, preset["max_new_tokens"], rep.seed, rep.dir)
            rep.best_of_n, rep.optimum = pool_curves(gold, proxy, betas)
            return
        # replicate 1 keeps its final weights; the others (for the spread) only numbers and samples (~1.6 GB, not 2.6)
        rep.policies.update(evaluate_run(evaluate, name, out_dir, rep.path("reward", "ckpt.pt"), rep.dir, rep.seed,
                                         cfg.keep_snapshots, keep_final=rep.number == 1))

    evaluated_after = {d: [rep.path("reward")] for d, (rep, name) in owner.items() if name is not None}
    failed = queue.run_all(jobs, "2/3 reward models, methods, evaluation", cfg.jobs or preset["jobs"], cfg.overwrite,
                           cpu=on_cpu, after=after, on_done=on_done, on_done_after=evaluated_after)
    # a replicate whose reward model failed has nothing evaluated: it leaves the report, named among the failures
    reps = [rep for rep in reps if rep.path("reward") not in failed]
    if not reps:
        why = "; ".join(f"{d}: {w}" for d, w in failed.items())
        raise TrainingError(f"every replicate's reward model failed: {why}")
    for rep in reps:
        rep.policies = dict(sorted(rep.policies.items(), key=lambda kv: (kv[0] != "sft", kv[0])))
    phase("train_and_evaluate")
    # 5. the report
    report = dict(preset=cfg.preset, device=cfg.device, k=preset["k"], labels=preset["labels"],
                  max_new_tokens=preset["max_new_tokens"], timings_s=timings,
                  replicates=[dict(replicate=rep.number, seed=rep.seed, preference_agreement=rep.agreement,
                                   reward_accuracy=rep.accuracy, policies=rep.policies, best_of_n=rep.best_of_n,
                                   optimum=rep.optimum) for rep in reps])
    report["gold_at_kl"] = gold_at_kl(report)
    report["objective_gaps"] = objective_gaps(report)
    report["failed"] = {os.path.relpath(d, cfg.out_dir): why for d, why in failed.items()}
    report["fits"] = gao_fits(report)
    write_report(report, cfg.out_dir)
    phase("report")
    write_json(os.path.join(cfg.out_dir, "results.json"), report)
    with open(os.path.join(cfg.out_dir, "results.md")) as f:
        print(f.read())
    if failed:  # the others' results are in the report; the same command again retries what failed
        first = next(iter(report["failed"].items()))
        raise TrainingError(f"{plural(len(failed), 'sub-run')} failed or could not be evaluated (first: {first[0]}: "
                            f"{first[1]}); results.md reports the others; run the same command again to retry them")
    first = reps[0].policies
    run.summary(**{"sft/gold": first["sft"]["gold"], "reward/accuracy": reps[0].accuracy,
                   "preference_agreement": reps[0].agreement,
                   **{f"{n}/gold": r["gold"] for n, r in first.items()},
                   **{f"{n}/kl": r["kl"] for n, r in first.items()}, "seconds": time.time() - t0})
    return 0

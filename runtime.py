"""
What every stage runs on: the run folder, the device and its randomness, the optimizer step, trackers and clocks.
The algorithms (sft.py, reward.py, dpo.py, ppo.py) import this file; it imports none of them.

A run folder (--out_dir) holds config.json (the run's keys, and the changes made on --resume), metrics.jsonl (one
flat JSON object per logged step), summary.json (the final metrics, flat) and ckpt.pt (checkpoint.py's format).

The rules of a run folder, one design for every stage:
- One run at a time holds it (out_dir/.lock); a second run into it exits in one line.
- Nothing is written until the run writes its first row, checkpoint or output: a run that fails before (bad data, a
  bad model file) leaves nothing behind that would refuse the corrected command (nor the folder, if it made it).
- A new training run into a folder that holds a run of another stage or config is refused unless --overwrite; the
  same command again starts it afresh (and says so where the run was unfinished: --resume continues it). Stages
  that only read a checkpoint (sample, score) replace their own output (a folder of another stage still needs
  --overwrite).
- No run writes into the folder of a file it reads (--init_from=out/sft/ckpt.pt --out_dir=out/sft is refused, with
  or without --overwrite).
- --resume continues the run in the folder it names (a moved or copied folder where it now is) with the keys of its
  config.json (resume_config): a key given on the command line that differs is refused, except those that only
  extend or observe the run (RESUME_KEYS: more steps, log, eval and checkpoint intervals, device, tracker, ...),
  which are recorded in config.json's "changes" at the step the run resumes from; the keys it started with stay as
  they were.
"""
import atexit
import ctypes
import dataclasses
import fcntl
import importlib
import json
import math
import os
import random
import re
import shlex
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
from tqdm import tqdm

from checkpoint import in_dtype, load_checkpoint, model_from_checkpoint, save_checkpoint
from config import ConfigError, TrainingError, check_config, given_keys, plural, snapshot_steps
from data import atomic_write, read_json, write_json
from dist import (GradSum, any_rank, broadcast_from_rank0, from_rank0, is_main, rank, rank_seed, world)
from model import GPT

# keys that only extend or observe a run: --resume may change them (recorded as a change at that step)
RESUME_KEYS = ("resume", "out_dir", "max_iters", "log_interval", "eval_interval", "ckpt_interval", "ckpt_minutes",
               "device", "tracker", "compile", "grad_checkpoint", "micro_batch_size", "snapshot_interval",
               "snapshot_steps", "gpus", "jobs", "ref_cache_file")
# keys in which a new run may differ from the folder's and still be the same run (out_dir: the folder, moved or copied;
# micro_batch_size: the same gradient in other sums; gpus places sub-runs; ref_cache_file shares work, same numbers)
RESTART_KEYS = ("out_dir", "resume", "overwrite", "log_interval", "ckpt_interval", "ckpt_minutes", "grad_checkpoint",
                "tracker", "micro_batch_size", "gpus", "ref_cache_file")
# keys that name files a run reads: none may lie inside its own run folder
INPUT_KEYS = ("init_from", "ref", "ckpt", "policy", "reward", "data", "eval_data", "prompts", "eval_prompts",
              "unsafe_prompts", "sft")
_LOCKS = {}  # run folder (real path) -> its open, locked .lock file, held until the process ends


def effective_config(stored, cls=None):
    """config.json as the run now runs: its keys with the changes made on each --resume applied in order. With the
    stage's config class, a key it lacks (the folder is older than the key) takes the key's default: what that run
    did."""
    defaults = {f.name: as_stored(f.default) for f in (dataclasses.fields(cls) if cls else ())
                if f.default is not dataclasses.MISSING}
    config = {**defaults, **{k: v for k, v in stored.items() if k != "changes"}}
    for change in stored.get("changes", []):
        config.update({k: old_new[1] for k, old_new in change.items() if k != "step"})  # step: where, not a key
    return config


def as_stored(value):
    """A value as config.json holds it."""
    return json.loads(json.dumps(value, default=str))


def resume_config(stage, cls, cfg, argv):
    """The config of `--resume --out_dir=X`: every key from X/config.json, in folder X (wherever the run began: a
    moved or copied folder continues where it now is). A key named on the command line (argv) that differs is a
    ConfigError naming it, unless one of RESUME_KEYS; those changes are kept in cfg.changes for Run to record."""
    path = os.path.join(cfg.out_dir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"--resume: {path} does not exist: there is no run to continue in --out_dir={cfg.out_dir}")
    try:
        stored = effective_config(read_json(path), cls)
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"--resume: {path} is not JSON") from None
    if stored.get("stage") != stage:
        raise ConfigError(f"--resume: --out_dir={cfg.out_dir} holds a {stored.get('stage')} run, not a {stage} run")
    if getattr(cfg, "overwrite", False):
        raise ConfigError("--resume continues the run in --out_dir; --overwrite would start it afresh: give one")
    names = {f.name for f in dataclasses.fields(cls)}
    changes = {}
    for key in dict.fromkeys(given_keys(argv)):
        new, old = as_stored(getattr(cfg, key)), stored.get(key)
        if key in names and new != old and key not in ("resume", "out_dir"):
            if key not in RESUME_KEYS:
                raise ConfigError(f"--resume: --{key}={new} differs from this run's {old} ({path}); a resumed run keeps "
                                  f"its keys (only {', '.join(k for k in RESUME_KEYS[2:])} may change): start a new "
                                  f"run in another --out_dir instead")
            changes[key] = [old, new]
    if stored.get("out_dir") != cfg.out_dir:  # the folder was moved or copied, or named from another directory
        changes["out_dir"] = [stored.get("out_dir"), cfg.out_dir]
    resumed = check_config(cls(**{**{k: v for k, v in stored.items() if k in names},
                                  **{k: new for k, (_, new) in changes.items()}, "resume": True}))
    resumed.changes = changes
    return resumed


def inputs_inside(cfg, folder):
    """The first key=file of cfg (INPUT_KEYS, comma lists split) that lies inside `folder`, or None."""
    top = os.path.realpath(folder) + os.sep
    for key in INPUT_KEYS:
        for part in str(getattr(cfg, key, "") or "").split(","):
            path = part.strip().rsplit(".py:", 1)[0] + (".py" if ".py:" in part else "")
            if path and path not in ("-", "scratch", "train") and os.path.realpath(path).startswith(top):
                return key, part.strip()
    return None


class Run:
    """A run folder: config.json, metrics.jsonl, summary.json, ckpt.pt, plus a flag set by Ctrl-C / SIGTERM (the rules
    are in the module's docstring). With cfg.resume, `self.ckpt` is the checkpoint to continue from, and metrics rows
    logged after it are dropped. replaces_output: a stage that only reads checkpoints and writes outputs (sample,
    score), whose re-run with other keys replaces them. Works with any RunConfig; TrainConfig's keys are optional."""

    def __init__(self, cfg, stage, replaces_output=False):
        self.cfg, self.stage, self.dir = cfg, stage, cfg.out_dir
        self.ckpt_path = os.path.join(self.dir, "ckpt.pt")
        self.metrics_path = os.path.join(self.dir, "metrics.jsonl")
        self.config = dict(stage=stage, **as_stored(dataclasses.asdict(cfg)))  # as given, before a stage resolves
        self.ckpt, self.tracker, self.begun, self.bar, self.unchecked = None, None, False, None, []
        # under torchrun rank 0 alone opens the folder (lock, checks); the others take its verdict and its checkpoint
        error = None
        if is_main():
            try:
                self._open(replaces_output)
            except ConfigError as e:
                error = e
        error = from_rank0(error and str(error))
        if error is not None:
            raise ConfigError(error)
        if not is_main() and getattr(cfg, "resume", False):
            self.ckpt = load_checkpoint(self.ckpt_path)
        self.stop_requested, self.last_save, self.last_log = False, time.time(), (time.time(), 0)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _open(self, replaces_output):
        resume = getattr(self.cfg, "resume", False)
        if getattr(self.cfg, "tracker", "none") != "none":
            Tracker.load(self.cfg.tracker)  # a missing package, before any work
        inside = None if resume else inputs_inside(self.cfg, self.dir)
        if inside:
            raise ConfigError(f"--{inside[0]}={inside[1]} lies inside --out_dir={self.dir}, which this run writes; "
                              f"choose another --out_dir")
        created = not os.path.exists(self.dir)
        try:
            os.makedirs(self.dir, exist_ok=True)
            self._lock()
        except OSError as e:  # a read-only folder, a file where the folder should be, a full disk
            raise ConfigError(f"--out_dir={self.dir}: cannot write the run folder ({e.strerror or e})") from None
        if created:
            atexit.register(self._remove_if_unused)
        if resume:
            if not os.path.exists(self.ckpt_path):
                raise ConfigError(f"--resume: {self.ckpt_path} does not exist (the run stopped before its first "
                                  f"checkpoint: run it again without --resume)")
            self.ckpt = load_checkpoint(self.ckpt_path)
            if self.ckpt.get("stage") != self.stage:
                raise ConfigError(f"--resume: {self.ckpt_path} is from stage {self.ckpt.get('stage')}, not {self.stage}")
            if 0 < getattr(self.cfg, "max_iters", 1) < self.ckpt["step"]:
                raise ConfigError(f"--max_iters={self.cfg.max_iters} is below step {self.ckpt['step']}, where this run "
                                  f"already is")
        else:
            self._check_reuse(replaces_output)

    def _lock(self):
        """Hold an exclusive lock on out_dir/.lock until the process ends. A folder this process already holds
        (a stage run twice in one process, as tests do) stays held."""
        key = os.path.realpath(self.dir)
        if key in _LOCKS:
            return
        f = open(os.path.join(self.dir, ".lock"), "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise ConfigError(f"--out_dir={self.dir} is in use by another run (wait for it, or choose another "
                              f"--out_dir)") from None
        _LOCKS[key] = f

    def _remove_if_unused(self):
        """At exit: a folder this run made but wrote nothing into (bad input stopped it) goes, .lock and all."""
        try:
            if not self.begun and os.listdir(self.dir) == [".lock"]:
                _LOCKS.pop(os.path.realpath(self.dir)).close()
                os.remove(os.path.join(self.dir, ".lock"))
                os.rmdir(self.dir)
        except (OSError, KeyError):
            pass

    def _check_reuse(self, replaces_output=False):
        """A new run may reuse a folder of the same stage and config (a re-run), or of the same stage whatever its
        config when it only replaces its own output (sample, score); another stage or config only with
        --overwrite."""
        path = os.path.join(self.dir, "config.json")
        if not os.path.exists(path):
            return
        try:
            old = effective_config(read_json(path), type(self.cfg))
        except (ValueError, UnicodeDecodeError):
            old = dict(stage="unreadable (config.json is not JSON)")
        new = self.config
        if replaces_output and old.get("stage") == new["stage"]:
            return
        changed = sorted(k for k in set(old) | set(new) if k not in RESTART_KEYS and old.get(k) != new.get(k))
        if changed and not getattr(self.cfg, "overwrite", False):
            what = (f"a {old.get('stage')} run" if old.get("stage") != new["stage"] else
                    f"a run with another config ({', '.join('--' + k for k in changed)})")
            raise ConfigError(f"--out_dir={self.dir} holds {what}; add --overwrite to replace it, or choose "
                              f"another --out_dir")

    def begin(self):
        """The run's first write: config.json (on --resume: the changes, at the step it resumes from), a fresh log
        and summary for a new run, the tracker. Called by every method that writes; nothing before it has."""
        if self.begun or not is_main():
            return
        self.begun = True
        path = os.path.join(self.dir, "config.json")
        try:
            if self.ckpt is not None:  # --resume: the run's keys stay; what changed is added at this step
                if getattr(self.cfg, "changes", None):
                    stored = read_json(path)
                    stored.setdefault("changes", []).append(dict(step=self.ckpt["step"], **self.cfg.changes))
                    write_json(path, stored)
                self._truncate_metrics(self.ckpt["step"])
            else:
                if os.path.exists(self.ckpt_path) and not os.path.exists(os.path.join(self.dir, "summary.json")):
                    print(f"--out_dir={self.dir} held an unfinished run; starting afresh (--resume would have "
                          f"continued it)", file=sys.stderr)
                for name in os.listdir(self.dir):  # nothing of an earlier run is left to mix with this one
                    if name in ("metrics.jsonl", "summary.json", "ckpt.pt") or re.fullmatch(r"ckpt-\d+\.pt", name):
                        os.remove(os.path.join(self.dir, name))
                write_json(path, self.config)
        except OSError as e:
            raise ConfigError(f"--out_dir={self.dir}: cannot write the run folder ({e.strerror or e})") from None
        if getattr(self.cfg, "tracker", "none") != "none":
            self.tracker = Tracker(self.cfg.tracker, self.dir, self.config)

    def path(self, name):
        """A file of the run folder to write (the run's outputs: samples.jsonl, selected.jsonl, ...)."""
        self.begin()
        return os.path.join(self.dir, name)

    def _on_signal(self, signum, frame):
        if self.stop_requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        if is_main():
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step, then stopping",
                  file=sys.stderr)
        self.stop_requested = True

    def _truncate_metrics(self, step):
        if not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path) as f:
            rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with atomic_write(self.metrics_path) as f:
            f.writelines(rows)

    def steps(self, start, desc=None):
        """The steps start .. max_iters - 1, with a progress bar (none in logs and on ranks > 0)."""
        total = self.cfg.max_iters
        self.bar = tqdm(range(start, total), desc=desc or self.stage, initial=start, total=total, dynamic_ncols=True,
                        disable=None)
        self.last_log = (time.time(), start)
        return self.bar

    def log_due(self, done):
        return done % self.cfg.log_interval == 0 or done == self.cfg.max_iters

    def eval_due(self, done):
        return done % self.cfg.eval_interval == 0 or done == self.cfg.max_iters

    def check_later(self, step, **values):
        """check_finite(step, **values), the tensors' at the next log or checkpoint, all pending at once: one wait
        for the GPU there, not one a step; no checkpoint holds weights from an unchecked step."""
        check_finite(step, **{k: v for k, v in values.items() if not torch.is_tensor(v)})
        self.unchecked.append((step, {k: v for k, v in values.items() if torch.is_tensor(v)}))

    def check_now(self):
        pending, self.unchecked = self.unchecked, []
        flat = [v.float().reshape(()) for _, values in pending for v in values.values()]
        if flat and not torch.stack(flat).isfinite().all():  # the one wait; then which step and value
            for step, values in pending:
                check_finite(step, **values)

    def log(self, step, **metrics):
        """Append one flat JSON row (non-finite numbers are written as null) with ms_per_step (since the last row)
        and, on a GPU, the peak memory so far. The bar shows the first two metrics and the held-out ones; without a
        terminal (nohup, a log file, CI), or when the row holds held-out metrics, a compact line is printed too."""
        self.check_now()
        if not is_main():
            return
        t, last = self.last_log
        if step > last:
            metrics["ms_per_step"] = 1000 * (time.time() - t) / (step - last)
        self.last_log = (time.time(), step)
        row = {k: plain(v) for k, v in metrics.items()}
        if torch.cuda.is_initialized():
            row["memory/peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.begin()
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(dict(step=step, **row)) + "\n")
        if self.tracker:
            self.tracker.log(step, row)
        held_out = {k: v for k, v in row.items() if k.startswith("eval/")}
        shown = dict(list(row.items())[:2], **held_out)
        if self.bar is not None:
            self.bar.set_postfix({k.removeprefix("eval/"): f"{v:.4g}" if isinstance(v, float) else v
                                  for k, v in shown.items()})
        if held_out or not sys.stderr.isatty():
            line = dict(list(row.items())[:6], **held_out)
            tqdm.write(f"step {step}: " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in line.items()), file=sys.stdout)

    def log_samples(self, step, prompts, responses, scores=None):
        """Sample completions at an evaluation, to the tracker as a text table (nothing without --tracker)."""
        if self.tracker and is_main():
            rows = [[p, r] + ([float(s)] if scores is not None else []) for p, r, s in
                    zip(prompts, responses, scores if scores is not None else prompts)]
            self.tracker.text(step, "samples", ["prompt", "response"] + (["score"] if scores is not None else []), rows)

    def end_step(self, done, save):
        """The one run-loop tail: call save() (which writes the checkpoint) every cfg.ckpt_interval steps, at the
        last step, on a stop request, or when cfg.ckpt_minutes passed since the last save; keep the weights alone as
        ckpt-STEP.pt at the snapshot steps. Returns True when a stop was requested: the stage then returns 130."""
        cfg, total = self.cfg, self.cfg.max_iters
        self.stop_requested = any_rank(self.stop_requested)  # every process stops after the same step
        snapshot = wants_snapshot(cfg, done) and done < total  # the last step's weights are ckpt.pt
        if (done % cfg.ckpt_interval == 0 or done == total or self.stop_requested or snapshot
                or (cfg.ckpt_minutes and time.time() - self.last_save > 60 * cfg.ckpt_minutes)):
            self.check_now()
            save()
            self.last_save = time.time()
        if snapshot and is_main():  # the weights (in the training dtype: bfloat16 halves them) and shape alone, no
            # optimizer or RNG state: a policy to evaluate
            ckpt = torch.load(self.ckpt_path, map_location="cpu", weights_only=True, mmap=True)
            save_checkpoint(os.path.join(self.dir, f"ckpt-{done}.pt"), {"model": in_dtype(ckpt["model"], cfg.dtype),
                            **{k: ckpt[k] for k in ("kind", "stage", "step", "model_args")}})
        if self.stop_requested and is_main():  # the command that continues it (torchrun: as many processes again)
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world()))
            launcher = ("python" if world() == 1 else f"torchrun --nproc_per_node={local}" if local == world() else
                        "torchrun (on every machine, as launched)")
            print(f"stopped at step {done}; continue with: {launcher} train.py {self.stage} --resume "
                  f"--out_dir={shlex.quote(self.dir)}", file=sys.stderr)
        return self.stop_requested

    def save(self, step, model, optimizer=None, kind="policy", **extra):
        """The one checkpoint format: model weights (unwrapped, uncompiled), shape, optimizer, config, step, RNG
        states, and whatever stage state `extra` holds. Rank 0's alone, under torchrun (every rank holds the same
        weights and optimizer state)."""
        if not is_main():
            return
        self.begin()
        model = getattr(model, "_orig_mod", model)
        ckpt = dict(kind=kind, stage=self.stage, step=step, model=model.state_dict(),
                    model_args=dataclasses.asdict(model.config) if hasattr(model, "config") else None,
                    optimizer=optimizer.state_dict() if optimizer is not None else None,
                    config=dataclasses.asdict(self.cfg), rng=rng_state(), **extra)
        save_checkpoint(self.ckpt_path, ckpt)

    def restore(self, model, optimizer):
        """On --resume: load model, optimizer and RNG states from the checkpoint save() wrote; returns the step to
        continue from (0 for a new run). A stage's own state (extra) is in self.ckpt for it to read."""
        if self.ckpt is None:
            return 0
        if self.ckpt["optimizer"] is None:
            raise ConfigError(f"{self.ckpt_path}: a finished run's checkpoint without its optimizer state (the "
                              f"pipeline drops it), which --resume cannot continue; start a run from it with "
                              f"--init_from")
        model_from_checkpoint(self.ckpt, self.ckpt_path, model)
        optimizer.load_state_dict(self.ckpt["optimizer"])
        set_rng_state(self.ckpt["rng"])
        if rank() > 0:  # the checkpoint holds rank 0's global RNGs (dropout); the others take their own stream again
            seed_everything(rank_seed(self.cfg.seed, self.ckpt["step"]))
        print(f"resuming from step {self.ckpt['step']}")
        return self.ckpt["step"]

    def summary(self, **metrics):
        if is_main():
            write_json(self.path("summary.json"), metrics)
        return metrics


def wants_snapshot(cfg, step):
    """Whether step `step` keeps its weights as ckpt-STEP.pt (each --snapshot_interval steps, --snapshot_steps)."""
    every = getattr(cfg, "snapshot_interval", 0)
    return bool(every and step % every == 0) or step in snapshot_steps(cfg)


class Tracker:
    """--tracker: metrics.jsonl's rows mirrored to TensorBoard (out_dir/tensorboard) or Weights & Biases. The packages
    are optional, imported only here, when asked for; metrics.jsonl stays the source of truth (a resumed run logs
    its steps again here, not there)."""

    def __init__(self, name, run_dir, config):
        self.mod, self.name = Tracker.load(name), name
        if name == "tensorboard":
            self.writer = self.mod.SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"))
        else:
            self.writer = self.mod.init(project="rlhf", name=f"{config['stage']}:{os.path.basename(run_dir.rstrip('/'))}",
                                        dir=run_dir, config=config)

    @staticmethod
    def load(name):
        """The tracker's module; a one-line error where its package is missing (Run checks as the run opens)."""
        module, package = dict(tensorboard=("torch.utils.tensorboard", "tensorboard"), wandb=("wandb", "wandb"))[name]
        try:
            return importlib.import_module(module)
        except ImportError:
            raise ConfigError(f"--tracker={name}: the {package} package is not installed (pip install {package})") \
                from None

    def log(self, step, row):
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.name == "tensorboard":
            for k, v in numbers.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        else:
            self.writer.log(numbers, step=step)

    def text(self, step, key, columns, rows):
        if self.name == "tensorboard":  # a markdown table; cells' pipes and newlines escaped
            cell = lambda v: str(v).replace("|", "\\|").replace("\n", "<br>")
            table = "\n".join(["|" + "|".join(columns) + "|", "|" + "---|" * len(columns)] +
                              ["|" + "|".join(cell(v) for v in r) + "|" for r in rows])
            self.writer.add_text(key, table, step)
            self.writer.flush()
        else:
            self.writer.log({key: self.mod.Table(columns=columns, data=rows)}, step=step)


# ----------------------------------------------------------------------------------------------------------------
# device, precision, randomness

def setup_device(cfg):
    """Resolves cfg.device/dtype, seeds every RNG, and returns (device, autocast context)."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if device == "cuda" and world() > 1:  # under torchrun: one GPU per process
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        torch.cuda.set_device(device)
    dtype = ("bfloat16" if device.startswith("cuda") else "float32") if cfg.dtype == "auto" else cfg.dtype
    cfg.device, cfg.dtype = device, dtype
    seed_everything(rank_seed(cfg.seed))
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device.split(":")[0], getattr(torch, dtype))
    return device, ctx


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state():
    """Every global RNG, as tensors and plain values (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = dict(python=random.getstate(), numpy=[np_state[0], torch.from_numpy(np_state[1].copy()),
                                                  *np_state[2:]], torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy(), *n[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def keep_freed_memory():
    """Keep freed blocks of up to 32 MB in the process's heap (glibc's mallopt; elsewhere this does nothing).

    By default glibc hands blocks from 128 KB (rising, up to 32 MB) back to the kernel when freed, which zeroes fresh
    pages at the next allocation: the tensors made and freed at every step then cost half the compute's time again
    in system time (3 steps of the cpu preset's PPO: user 13.0 s, sys 6.2 s; with this and 26 MB log-prob slices:
    sys 0.4 s). Fixing the threshold at glibc's largest and never trimming the heap's top keeps those pages."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks below 32 MB come from the heap
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: return the heap's free top to the kernel only above 1 GB


def stop_with_parent():
    """In a pipeline's sub-run (its environment names the pipeline's process in RLHF_PIPELINE_PID): a SIGTERM when the
    pipeline's process ends however it ends (SIGKILL, a closed terminal), so the sub-run saves a checkpoint and exits
    instead of running on alone and holding its folder (Linux's PR_SET_PDEATHSIG; elsewhere this does nothing)."""
    parent = os.environ.pop("RLHF_PIPELINE_PID", None)
    if parent is None or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not glibc
        return
    if os.getppid() != int(parent):  # it ended before the line above
        os.kill(os.getpid(), signal.SIGTERM)


# ----------------------------------------------------------------------------------------------------------------
# the optimizer step

def make_optimizer(model, cfg, device):
    """AdamW with weight decay on matrices only (nanoGPT). Also switches gradient checkpointing on in every GPT it
    will train when cfg.grad_checkpoint (model.GPT.hidden reads the flag). Under torchrun every process starts from
    rank 0's weights (a model initialised from scratch draws them from each process's own RNG stream)."""
    for m in model.modules():
        if isinstance(m, GPT):
            m.grad_checkpoint = getattr(cfg, "grad_checkpoint", False)
    if world() > 1:
        broadcast_from_rank0(model)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                                  fused=str(device).startswith("cuda"))
    optimizer.grad_sum = GradSum(model) if world() > 1 else None  # the gradient sum over processes (dist.py)
    return optimizer


def lr_at(step, cfg):
    """Linear warm-up, then cosine decay to min_lr at max_iters."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    progress = min(1.0, (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def optimizer_step(model, optimizer, cfg, step, clock=None, check=True):
    """The one optimizer step of every stage: set the scheduled learning rate, clip the gradient norm to
    cfg.grad_clip (0: off), check the norm is finite, step, zero the gradients. Returns (lr, grad_norm); check=False
    returns the norm unchecked, a tensor (reading it would wait for the GPU), for the caller to check later with
    others (Run.check_later). Under torchrun the gradients are first summed over the processes (GradSum: started in
    the last micro-batch's backward, finished here), so every process clips the same norm and takes the same step; a
    Clock given charges the wait for that sum to its phase "grad_sum" (the work before it to "update")."""
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if world() > 1:
        if clock:
            clock.lap("update")
        optimizer.grad_sum.finish(model)
        if clock:
            clock.lap("grad_sum")
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")).detach()
    if check:
        check_finite(step, grad_norm=norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return lr, float(norm) if check else norm


def check_finite(step, **values):
    """Stop on a non-finite loss / reward / gradient norm, naming the step and the quantity."""
    for name, v in values.items():
        v = float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
        if not math.isfinite(v):
            raise TrainingError(f"step {step}: {name} is {v}; stopping (the last checkpoint is left as it was)")


# ----------------------------------------------------------------------------------------------------------------
# small helpers

class Clock:
    """Seconds spent in each phase of a step: lap(name) charges the time since the last lap to `name`. On a GPU it
    first waits for the queued kernels (one sync per phase), so each phase is charged its own work."""

    def __init__(self, device=""):
        self.cuda, self.t, self.laps = str(device).startswith("cuda"), time.perf_counter(), {}

    def lap(self, name):
        if self.cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + t - self.t
        self.t = t


def plain(v):
    """A metric as a JSON value: tensors and NumPy scalars become floats, NaN and inf become None."""
    if isinstance(v, (torch.Tensor, np.generic)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def shorten(text, limit=200):
    """Text for a log line: at most about `limit` characters, the cut marked."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"... [{plural(len(text) - limit, 'more character')}]"

"""
The entry point of every stage, and the pieces they share: configuration, the run folder, checkpoints, the
optimizer and its schedule. Stages sft (language-model / supervised fine-tuning) and sample live here; the others
live in the file of their algorithm and plug into the same run folder and checkpoint format.

    python train.py                          # the main job: the IMDb pipeline (stage `pipeline`) on the built-in sample
    python train.py sft --max_iters=2000     # train a GPT on the IMDb sample's review text
    python train.py sample --ckpt=out/sft/ckpt.pt --prompt="This movie"
    python train.py sample --ckpt=gpt2/ --prompt="This movie"   # any checkpoint option takes a GPT-2 folder (hf.py)
    python train.py STAGE --help             # every key of a stage, with its default and meaning

Every run writes to --out_dir: config.json, metrics.jsonl (one flat JSON object per log step), summary.json (the
final metrics, flat) and ckpt.pt (one dict of tensors and plain values: model, optimizer, config, step, RNG
states and the stage's own state), written atomically. --resume continues a killed run from its ckpt.pt, bit for
bit on CPU (with one thread: see README). One run at a time holds a run folder (out_dir/.lock); a new run into a
folder of another stage or config needs --overwrite.

Bad input (data files, keys, values, checkpoints) ends the run with one line `error: ...` and exit status 2.

Several processes (torchrun): see dist.py.
"""
import ctypes
import dataclasses
import fcntl
import importlib
import json
import math
import operator
import os
import random
import re
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from dist import (GradSum, all_sum, any_rank, broadcast_from_rank0, from_rank0, init_distributed, is_main,
                  micro_batches, rank, rank_seed, shutdown, world, world_note)
from model import GPT, GPTConfig, response_logprobs

# stage -> (module, config class, function); a stage's module is imported only when that stage runs
STAGES = {
    "sft": ("train", "SFTConfig", "sft", "train a GPT on text, or supervised fine-tuning on prompt/response data"),
    "sample": ("train", "SampleConfig", "sample", "generate text from a checkpoint"),
    "reward": ("reward", "RewardConfig", "train", "train a Bradley-Terry reward model on preference pairs"),
    "score": ("reward", "ScoreConfig", "score", "score prompt/response pairs with a reward model"),
    "dpo": ("dpo", "DPOConfig", "train", "DPO / conservative DPO / IPO on preference pairs"),
    "ppo": ("ppo", "PPOConfig", "train_ppo", "PPO with GAE, a critic and a reference-model KL penalty"),
    "rloo": ("ppo", "RLOOConfig", "train_rloo", "REINFORCE leave-one-out (k samples per prompt, no critic)"),
    "grpo": ("ppo", "GRPOConfig", "train_grpo", "GRPO (group-normalised advantages, k3 KL in the loss)"),
    "bon": ("ppo", "BoNConfig", "best_of_n", "best-of-N sampling; sft on its selected.jsonl is rejection-sampling fine-tuning"),
    "optimum": ("optimum", "OptimumConfig", "optimum", "every method against the exact KL-regularised optimum (one prompt, known answer)"),
    "pipeline": ("pipeline", "PipelineConfig", "pipeline", "the IMDb controlled-sentiment benchmark, end to end"),
    "plot": ("pipeline", "PlotConfig", "plot", "plot a run folder's metrics.jsonl to PNG"),
    "export": ("hf", "ExportConfig", "export", "a checkpoint to a Hugging Face GPT-2 folder (transformers loads it)"),
}


# stages that run under torchrun (the others refuse it)
DISTRIBUTED_STAGES = ("sft", "reward", "dpo", "ppo", "rloo", "grpo", "bon")


class ConfigError(Exception):
    """Bad key, value, file or checkpoint: reported as one line, exit status 2."""


class TrainingError(Exception):
    """Training cannot go on (a non-finite loss, say): reported as one line, exit status 1."""


# ----------------------------------------------------------------------------------------------------------------
# configuration: one flat dataclass per stage, every field with a one-line description

def opt(default, help, min=None, max=None, above=None, below=None):
    """A config field with its --help text and, optionally, the bounds it accepts: min/max inclusive,
    above/below exclusive."""
    return field(default=default, metadata=dict(help=help, min=min, max=max, above=above, below=below))


@dataclass
class RunConfig:
    """Keys shared by every stage."""
    out_dir: str = opt("out/run", "run folder: config.json, metrics.jsonl, summary.json, ckpt.pt")
    device: str = opt("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    dtype: str = opt("auto", "auto (bfloat16 on cuda, float32 on cpu), float32, bfloat16, float16")
    seed: int = opt(1337, "seed for everything random (data order, dropout, sampling)", min=0)
    overwrite: bool = opt(False, "replace a run folder of another stage or another config")
    chat_template: str = opt("hh", "how message lists become text: hh (\\n\\nHuman: / \\n\\nAssistant:), chatml, or "
                                   "a JSON file of your own (see data.py)")


@dataclass
class TrainConfig(RunConfig):
    """Keys shared by the training stages."""
    compile: bool = opt(False, "torch.compile every model's forward pass (GPT.compile_hidden); decoding uses CUDA graphs either way")
    resume: bool = opt(False, "continue the run in out_dir from its ckpt.pt")
    log_interval: int = opt(10, "steps between log lines", min=1)
    ckpt_interval: int = opt(200, "steps between checkpoints (one is always written at the end)", min=1)
    ckpt_minutes: float = opt(10.0, "also write a checkpoint when this many minutes passed since the last (0: off)",
                              min=0.0)
    grad_checkpoint: bool = opt(False, "recompute each block's activations in the backward pass: less memory for "
                                       "large models, one more forward pass of compute")
    tracker: str = opt("none", "also send the metrics (and sample completions) to tensorboard or wandb; "
                               "metrics.jsonl stays the record")
    snapshot_interval: int = opt(0, "also keep the weights alone as ckpt-STEP.pt every this many steps, to evaluate "
                                    "along training (0: off)", min=0)
    snapshot_steps: str = opt("", "also keep them at these steps, comma-separated (5,10,20: early and dense, where "
                                  "the KL moves fastest)")


# keys that may change between a run and its --resume or re-run without making it another run (micro_batch_size
# splits the same batch's gradient into other sums; gpus places the pipeline's sub-runs)
RESTART_KEYS = ("resume", "overwrite", "log_interval", "ckpt_interval", "ckpt_minutes", "grad_checkpoint", "tracker",
                "micro_batch_size", "gpus")


@dataclass
class ModelConfig:
    """The GPT's shape, for stages that can start from scratch."""
    n_layer: int = opt(4, "transformer blocks", min=1)
    n_head: int = opt(4, "attention heads", min=1)
    n_embd: int = opt(256, "width; divisible by n_head", min=1)
    block_size: int = opt(256, "longest sequence the model sees", min=2)
    dropout: float = opt(0.0, "dropout (pretraining / SFT only; RLHF stages turn it off)", min=0.0, below=1.0)
    bias: bool = opt(True, "biases in Linear and LayerNorm layers")


@dataclass
class OptimConfig:
    batch_size: int = opt(32, "sequences per optimizer step, over all processes (torchrun)", min=1)
    micro_batch_size: int = opt(0, "sequences per forward/backward pass: gradient accumulation (0: a process's whole "
                                   "share of the batch at once); the results do not depend on it", min=0)
    learning_rate: float = opt(6e-4, "peak learning rate", min=0.0)
    min_lr: float = opt(0.0, "learning rate at the end of the cosine decay", min=0.0)
    warmup_iters: int = opt(50, "linear warm-up steps", min=0)
    max_iters: int = opt(500, "optimizer steps", min=0)
    weight_decay: float = opt(0.1, "AdamW weight decay on matrices", min=0.0)
    beta1: float = opt(0.9, "AdamW beta1", min=0.0)
    beta2: float = opt(0.95, "AdamW beta2", min=0.0)
    adam_eps: float = opt(1e-8, "AdamW epsilon", min=0.0)
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0: off)", min=0.0)
    eval_interval: int = opt(100, "steps between evaluations", min=1)
    eval_iters: int = opt(20, "batches per evaluation", min=1)


def parse_config(cls, argv):
    """--key=value (or --flag for a boolean True) over the dataclass's defaults; unknown keys and bad values are
    ConfigErrors that name the key."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: keys are given as --key=value")
        key, eq, raw = arg[2:].partition("=")
        if key not in fields:
            close = [k for k in fields if k.startswith(key[:3])]
            raise ConfigError(f"unknown key --{key}" + (f" (did you mean {', '.join('--' + k for k in close)}?)"
                                                        if close else " (see --help)"))
        f = fields[key]
        kind = type(f.default)
        if kind is bool:
            if not eq:
                values[key] = True
            elif raw.lower() in ("1", "true", "yes", "on"):
                values[key] = True
            elif raw.lower() in ("0", "false", "no", "off"):
                values[key] = False
            else:
                raise ConfigError(f"--{key}={raw}: expected true or false")
            continue
        if not eq:
            raise ConfigError(f"--{key} needs a value: --{key}=...")
        try:
            v = kind(raw) if kind is not int else int(raw)
        except ValueError:
            raise ConfigError(f"--{key}={raw}: expected {'an integer' if kind is int else 'a number'}") from None
        if kind is float and not math.isfinite(v):
            raise ConfigError(f"--{key}={raw}: expected a finite number")
        m = f.metadata
        for bound, ok, says in (("min", operator.ge, ">="), ("max", operator.le, "<="), ("above", operator.gt, ">"),
                                ("below", operator.lt, "<")):
            if m.get(bound) is not None and not ok(v, m[bound]):
                raise ConfigError(f"--{key}={raw}: must be {says} {m[bound]}")
        values[key] = v
    cfg = cls(**values)
    if hasattr(cfg, "n_embd") and hasattr(cfg, "n_head") and cfg.n_embd % cfg.n_head:
        raise ConfigError(f"--n_embd={cfg.n_embd} is not divisible by --n_head={cfg.n_head}")
    if hasattr(cfg, "out_dir") and not cfg.out_dir.strip():
        raise ConfigError("--out_dir is empty: name a run folder")
    if hasattr(cfg, "device"):
        check_device(cfg.device)
    if getattr(cfg, "dtype", "auto") not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype={cfg.dtype}: expected auto, float32, bfloat16 or float16")
    if getattr(cfg, "tracker", "none") not in TRACKERS:
        raise ConfigError(f"--tracker={cfg.tracker}: expected none, {' or '.join(TRACKERS[1:])}")
    snapshot_steps(cfg)  # a bad list fails here, in one line
    return cfg


def snapshot_steps(cfg):
    """--snapshot_steps=5,10,20 -> {5, 10, 20}; a ConfigError names anything that is not a positive integer."""
    steps = set()
    for part in getattr(cfg, "snapshot_steps", "").split(","):
        if part.strip():
            if not part.strip().isdigit() or int(part) < 1:
                raise ConfigError(f"--snapshot_steps={cfg.snapshot_steps}: {part.strip()!r} is not a positive step")
            steps.add(int(part))
    return steps


def wants_snapshot(cfg, step):
    """Whether step `step` keeps its weights as ckpt-STEP.pt: every --snapshot_interval steps and at each of
    --snapshot_steps."""
    every = getattr(cfg, "snapshot_interval", 0)
    return bool(every and step % every == 0) or step in snapshot_steps(cfg)


def config_help(stage, cls):
    lines = [f"python train.py {stage} [--key=value ...]: {STAGES[stage][3]}", ""]
    for f in dataclasses.fields(cls):
        lines.append(f"  --{f.name}={f.default!s:<24} {f.metadata.get('help', '')}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# devices, precision, randomness

def check_device(name):
    """auto, cpu, cuda, cuda:N or mps, if this machine has it; checked at parse time, before a run folder exists."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", name):
        raise ConfigError(f"--device={name}: expected auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device={name}: CUDA is not available on this machine")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"--device={name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device={name}: MPS is not available on this machine")


def setup_device(cfg):
    """Resolves cfg.device/dtype, seeds every RNG, and returns (device, autocast context)."""
    check_device(cfg.device)
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


# ----------------------------------------------------------------------------------------------------------------
# checkpoints: one dict of tensors and plain values, written atomically, read with weights_only=True

def save_checkpoint(path, ckpt):
    """Write to a temporary file in the same folder, fsync, then rename over the old one: a kill at any moment
    leaves either the old or the new checkpoint, never a torn one. Ctrl-C / SIGTERM arriving during the write are
    held until it ends; a failed write (a full disk) removes its temporary file and is one line, the old checkpoint
    left as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with signals_held():
            with open(tmp, "wb") as f:
                torch.save(ckpt, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fd = os.open(folder, os.O_RDONLY)  # make the rename itself durable
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise TrainingError(f"{path}: writing the checkpoint failed ({e.strerror or e}); the previous checkpoint "
                                f"is left as it was") from None
        raise


@contextmanager
def signals_held():
    """Hold SIGINT and SIGTERM until the block ends, then deliver them to the handlers that were in place. (Swapping
    the Python handlers, not blocking the signals, because another thread would take a blocked signal and Python
    would still run its handler in this one.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    old = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum))
           for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        for sig in pending:
            signal.raise_signal(sig)


def safe_torch_load(path):
    """torch.load(weights_only=True) with one-line errors: no pickled code runs, and a file that would need it is
    refused by name."""
    try:
        with warnings.catch_warnings():  # torch warns before refusing; the one-line error below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for arbitrary objects, RuntimeError for a torn or foreign file
        if "Weights only load failed" in str(e):  # PyTorch's text is long and ends mid-sentence when cut
            name = re.search(r"GLOBAL ([\w.]+)", str(e))
            raise ConfigError(f"{path}: refused: it holds Python objects other than tensors and plain values"
                              f"{f' ({name[1]})' if name else ''}, which could run code when unpickled "
                              f"(checkpoints are loaded with torch.load(weights_only=True))") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: not a loadable checkpoint of this project ({first[:160]})") from None


def load_checkpoint(path, kind=None):
    """Load a checkpoint safely (weights_only: no pickled code runs); check it is of the expected kind. A folder is
    a Hugging Face GPT-2 folder (config.json + model.safetensors or pytorch_model.bin): hf.py converts it."""
    if os.path.isdir(path):
        import hf
        ckpt = hf.load_folder(path)
    elif not os.path.isfile(path):
        raise ConfigError(f"{path}: no such checkpoint file")
    else:
        ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "kind" not in ckpt:
        raise ConfigError(f"{path}: not a checkpoint of this project (no 'model'/'kind' entries)")
    if kind is not None and ckpt["kind"] not in ((kind,) if isinstance(kind, str) else kind):
        wanted = kind if isinstance(kind, str) else " or ".join(kind)
        raise ConfigError(f"{path}: a {ckpt['kind']} checkpoint, but a {wanted} checkpoint is needed here")
    return ckpt


def model_from_checkpoint(ckpt, path, module=None):
    """Build the GPT stored in ckpt (or load its weights into `module`), with a one-line error on a mismatch or on
    non-finite weights (which would otherwise surface far away, as NaN probabilities in sampling)."""
    for name, t in ckpt["model"].items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise ConfigError(f"{path}: the weight {name} holds NaN or infinite values (a diverged run?)")
    module = module or GPT(GPTConfig(**ckpt["model_args"]))
    try:
        module.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        msg = " ".join(str(e).split())
        raise ConfigError(f"{path}: checkpoint does not fit the model ({msg[:200]})") from None
    return module


def load_policy(path, device, dtype=None, compile=False):
    """A GPT language model (from sft, dpo, ppo, ..., or a GPT-2 folder), in eval mode with dropout off. dtype
    (frozen_dtype(cfg) for a model that is never trained: a reference policy) stores the weights in that type;
    compile: GPT.compile_hidden."""
    ckpt = load_checkpoint(path, "policy")
    model = model_from_checkpoint(ckpt, path)
    disable_dropout(model)
    if compile:
        model.compile_hidden()
    return model.to(device, dtype).eval(), ckpt


def frozen_dtype(cfg):
    """bfloat16 weights for models that are never trained (reference policy, reward model) when the run computes in
    bfloat16 anyway (autocast casts every matmul input to it): half their memory, which is what lets GPT-2-medium and
    larger fit beside the policy, its optimizer and critic on one GPU. None (keep float32) otherwise."""
    return torch.bfloat16 if cfg.dtype == "bfloat16" else None


def disable_dropout(model):
    """RLHF runs with dropout off in every model, or the first PPO ratio is not 1 (Huang et al. 2024, The N+
    implementation details of RLHF with PPO: "disable dropout")."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    if hasattr(model, "transformer"):
        for block in model.transformer.h:
            block.attn.dropout = 0.0
    return model


# ----------------------------------------------------------------------------------------------------------------
# the run folder

_LOCKS = {}  # run folder (real path) -> its open, locked .lock file, held until the process ends

class Run:
    """A run folder: config.json, metrics.jsonl, summary.json, ckpt.pt, plus a flag set by Ctrl-C / SIGTERM.

    The folder is locked (out_dir/.lock) for the run's life, so two runs never write into one folder at once. A new
    run into a folder of another stage or config is refused unless cfg.overwrite. With cfg.resume, `self.ckpt` is
    the checkpoint to continue from, and metrics rows logged after it are dropped (they will be logged again), so
    the log has no duplicate steps. Works with any RunConfig; the training keys (TrainConfig) are optional."""

    def __init__(self, cfg, stage):
        self.cfg, self.stage, self.dir = cfg, stage, cfg.out_dir
        self.ckpt_path = os.path.join(self.dir, "ckpt.pt")
        self.metrics_path = os.path.join(self.dir, "metrics.jsonl")
        self.ckpt = None
        # under torchrun rank 0 alone opens the folder (lock, checks, config.json); the others take its verdict and
        # read its checkpoint
        error = None
        if is_main():
            try:
                self._open(cfg, stage)
            except ConfigError as e:
                error = e
        error = from_rank0(error and str(error))
        if error is not None:
            raise ConfigError(error)
        if not is_main() and getattr(cfg, "resume", False):
            self.ckpt = load_checkpoint(self.ckpt_path)
        self.stop_requested = False
        self.last_save = time.time()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _open(self, cfg, stage):
        config = dict(stage=stage, **dataclasses.asdict(cfg))
        try:
            os.makedirs(self.dir, exist_ok=True)
            self._lock()
            if getattr(cfg, "resume", False):
                if not os.path.exists(self.ckpt_path):
                    raise ConfigError(f"--resume: {self.ckpt_path} does not exist")
                self.ckpt = load_checkpoint(self.ckpt_path)
                if self.ckpt.get("stage") != stage:
                    raise ConfigError(f"--resume: {self.ckpt_path} is from stage {self.ckpt.get('stage')}, "
                                      f"not {stage}")
                self._truncate_metrics(self.ckpt["step"])
            else:
                self._check_reuse(config)
                for name in ("metrics.jsonl", "summary.json"):  # a fresh run starts a fresh log and summary
                    if os.path.exists(os.path.join(self.dir, name)):
                        os.remove(os.path.join(self.dir, name))
            write_json(os.path.join(self.dir, "config.json"), config)
            self.tracker = Tracker(cfg.tracker, self.dir, config) if getattr(cfg, "tracker", "none") != "none" else None
        except OSError as e:  # a read-only folder, a file where the folder should be, a full disk
            raise ConfigError(f"--out_dir={self.dir}: cannot write the run folder ({e.strerror or e})") from None

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

    def _check_reuse(self, config):
        """A new run may reuse a folder of the same stage and config (a re-run); another stage or config only with
        --overwrite, whose old checkpoint is then removed so that nothing of the other run is left to resume."""
        path = os.path.join(self.dir, "config.json")
        if not os.path.exists(path):
            return
        try:
            old = read_json(path)
        except (ValueError, UnicodeDecodeError):
            old = dict(stage="unreadable (config.json is not JSON)")
        config = json.loads(json.dumps(config, default=str))  # as config.json holds it
        changed = sorted(k for k in set(old) | set(config) if k not in RESTART_KEYS and old.get(k) != config.get(k))
        if not changed:
            return
        if not getattr(self.cfg, "overwrite", False):
            what = (f"a {old.get('stage')} run" if old.get("stage") != config["stage"] else
                    f"a run with another config ({', '.join('--' + k for k in changed)})")
            raise ConfigError(f"--out_dir={self.dir} holds {what}; add --overwrite to replace it, or choose "
                              f"another --out_dir")
        if os.path.exists(self.ckpt_path):
            os.remove(self.ckpt_path)

    def _on_signal(self, signum, frame):
        if self.stop_requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        if is_main():
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step, then stopping "
                  f"(continue with --resume)", file=sys.stderr)
        self.stop_requested = True

    def _truncate_metrics(self, step):
        if not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path) as f:
            rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.metrics_path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(rows)
        os.replace(tmp, self.metrics_path)

    def log(self, step, **metrics):
        """Append one flat JSON row (non-finite numbers are written as null), with the peak GPU memory so far on a
        GPU. When stderr is not a terminal (nohup, a log file, CI), tqdm's bar is off, so also print a compact line
        with the first few metrics."""
        if not is_main():
            return
        row = {k: plain(v) for k, v in metrics.items()}
        if torch.cuda.is_initialized():
            row["memory/peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(dict(step=step, **row)) + "\n")
        if self.tracker:
            self.tracker.log(step, row)
        if not sys.stderr.isatty():
            print(f"step {step}: " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in list(row.items())[:6]), flush=True)

    def log_samples(self, step, prompts, responses, scores=None):
        """Sample completions at an evaluation, to the tracker as a text table (nothing without --tracker)."""
        if self.tracker:
            rows = [[p, r] + ([float(s)] if scores is not None else []) for p, r, s in
                    zip(prompts, responses, scores if scores is not None else prompts)]
            self.tracker.text(step, "samples", ["prompt", "response"] + (["score"] if scores is not None else []), rows)

    def end_step(self, done, total, save):
        """The one run-loop tail: call save() (which writes the checkpoint) every cfg.ckpt_interval steps, at the
        last step, on a stop request, or when cfg.ckpt_minutes passed since the last save. Returns True when a stop
        was requested: the stage then returns 130."""
        interval = getattr(self.cfg, "ckpt_interval", 0)
        minutes = getattr(self.cfg, "ckpt_minutes", 0)
        self.stop_requested = any_rank(self.stop_requested)  # every process stops after the same step
        snapshot = wants_snapshot(self.cfg, done) and done < total  # the last step's weights are ckpt.pt
        if ((interval and done % interval == 0) or done == total or self.stop_requested or snapshot
                or (minutes and time.time() - self.last_save > 60 * minutes)):
            save()
            self.last_save = time.time()
        if snapshot and is_main():  # the weights and shape alone (no optimizer or RNG state): a policy to evaluate
            ckpt = torch.load(self.ckpt_path, map_location="cpu", weights_only=True, mmap=True)
            save_checkpoint(os.path.join(self.dir, f"ckpt-{done}.pt"),
                            {k: ckpt[k] for k in ("kind", "stage", "step", "model", "model_args")})
        if self.stop_requested and is_main():
            print(f"stopped at step {done}; continue with --resume --out_dir={self.dir}", file=sys.stderr)
        return self.stop_requested

    def save(self, step, model, optimizer=None, kind="policy", **extra):
        """The one checkpoint format: model weights (unwrapped, uncompiled), shape, optimizer, config, step, RNG
        states, and whatever stage state `extra` holds. Rank 0's alone, under torchrun (every rank holds the same
        weights and optimizer state)."""
        if not is_main():
            return
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
        model_from_checkpoint(self.ckpt, self.ckpt_path, model)
        optimizer.load_state_dict(self.ckpt["optimizer"])
        set_rng_state(self.ckpt["rng"])
        if rank() > 0:  # the checkpoint holds rank 0's global RNGs (dropout); the others take their own stream again
            seed_everything(rank_seed(self.cfg.seed, self.ckpt["step"]))
        print(f"resuming from step {self.ckpt['step']}")
        return self.ckpt["step"]

    def summary(self, **metrics):
        if is_main():
            write_json(os.path.join(self.dir, "summary.json"), metrics)
        return metrics


TRACKERS = ("none", "tensorboard", "wandb")


class Tracker:
    """--tracker: metrics.jsonl's rows mirrored to TensorBoard (out_dir/tensorboard) or Weights & Biases. The packages
    are optional, imported only here, when asked for; metrics.jsonl stays the source of truth (a resumed run logs
    its steps again here, not there)."""

    def __init__(self, name, run_dir, config):
        module, package = dict(tensorboard=("torch.utils.tensorboard", "tensorboard"), wandb=("wandb", "wandb"))[name]
        try:
            self.mod = importlib.import_module(module)
        except ImportError:
            raise ConfigError(f"--tracker={name}: the {package} package is not installed (pip install {package})") \
                from None
        self.name = name
        if name == "tensorboard":
            self.writer = self.mod.SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"))
        else:
            self.writer = self.mod.init(project="rlhf", name=f"{config['stage']}:{os.path.basename(run_dir.rstrip('/'))}",
                                        dir=run_dir, config=json.loads(json.dumps(config, default=str)))

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
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit:,} more characters]"


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def check_finite(step, **values):
    """Stop on a non-finite loss / reward / gradient norm, naming the step and the quantity."""
    for name, v in values.items():
        v = float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
        if not math.isfinite(v):
            raise TrainingError(f"step {step}: {name} is {v}; stopping (the last checkpoint is left as it was)")


# ----------------------------------------------------------------------------------------------------------------
# optimizer and schedule

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


def optimizer_step(model, optimizer, cfg, step, clock=None):
    """The one optimizer step of every stage: set the scheduled learning rate, clip the gradient norm to
    cfg.grad_clip (0: off), check the norm is finite, step, zero the gradients. Returns (lr, grad_norm). Under
    torchrun the gradients are first summed over the processes (GradSum: started during the last micro-batch's
    backward, finished here), so every process clips the same norm and takes the same step; a Clock given charges
    the wait for that sum to its phase "grad_sum" (the work before it to "update")."""
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
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    check_finite(step, grad_norm=norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return lr, float(norm)


# ----------------------------------------------------------------------------------------------------------------
# stage sft: language modelling on a corpus, or supervised fine-tuning on prompt/response data

DEFAULT_SFT_DATA = "assets/imdb-train-sample.jsonl.gz,assets/imdb-unsup-sample.jsonl.gz"


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


def block_size_for(cfg, ckpt_block_size=None):
    """The training block_size: --block_size, or (when 0) the checkpoint's, or 256 from scratch. A checkpoint's
    position table fixes its longest sequence, so a larger --block_size than the checkpoint's is an error."""
    if ckpt_block_size is None:
        size = cfg.block_size or 256
    elif cfg.block_size > ckpt_block_size:
        raise ConfigError(f"--block_size={cfg.block_size} exceeds the checkpoint's block_size={ckpt_block_size} "
                          f"(leave --block_size out to use the checkpoint's)")
    else:
        size = cfg.block_size or ckpt_block_size
    if size < 2:
        raise ConfigError(f"--block_size={size}: must be >= 2")
    return size


def sft_loss(model, batch):
    """Mean next-token cross-entropy: over every token of a corpus window (x, y), or over the response tokens
    (and their EOS) of a prompt/response batch (ids, mask, R), through the shared log-prob helper."""
    if len(batch) == 2:  # (x, y): model is the compiled module (--compile), loss and all
        return model(*batch)[1]
    ids, mask, R = batch
    logp = response_logprobs(model, ids, mask, R)  # (B, R), 0 off the response
    return -logp.sum() / mask[:, -R:].sum().clamp(min=1)


def sft(cfg):
    from data import TokenStream, epoch_indices, example_batch, heldout_split, load_sft_data
    init = None if cfg.init_from == "scratch" else load_checkpoint(cfg.init_from, "policy")
    cfg.block_size = block_size_for(cfg, init and init["model_args"]["block_size"])
    run = Run(cfg, "sft")
    device, ctx = setup_device(cfg)
    # 1. data
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
        get_batch = lambda split, step: tuple(t.to(device) for t in
                                             (train_stream if split == "train" else eval_stream).batch(step))

        def train_batches(step):  # this process's micro-batches of the step's windows, each with its share
            x, y = train_stream.batch(step)
            for rows in micro_batches(range(cfg.batch_size), cfg.micro_batch_size, optimizer):
                yield (x[rows.start:rows.stop].to(device), y[rows.start:rows.stop].to(device)), len(rows) / len(x)
        print(f"corpus: {len(train_data):,} training tokens, {len(eval_data):,} held out")
    else:
        def get_batch(split, step):
            rows = train_data if split == "train" else eval_data
            return example_batch(rows, epoch_indices(len(rows), step, cfg.batch_size, cfg.seed + (split != "train")),
                                 device)

        def train_batches(step):  # each micro-batch's share is its share of the batch's response tokens
            idx = epoch_indices(len(train_data), step, cfg.batch_size, cfg.seed)
            n_tokens = sum(len(train_data[i][1]) for i in idx)
            for part in micro_batches(idx, cfg.micro_batch_size, optimizer):
                yield example_batch(train_data, part, device), sum(len(train_data[i][1]) for i in part) / n_tokens
        print(f"pairs: {len(train_data):,} training examples, {len(eval_data):,} held out")
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
    tokens_per_step = cfg.batch_size * cfg.block_size
    print(f"model: {model.num_params() / 1e6:.2f}M parameters; {tokens_per_step:,} tokens per step; "
          f"{cfg.max_iters} steps on {device} ({cfg.dtype}){world_note(cfg)}")

    @torch.no_grad()
    def evaluate():
        model.eval()
        with ctx:
            losses = [sft_loss(fwd, get_batch("eval", i)).item() for i in range(cfg.eval_iters)]
        model.train()
        return sum(losses) / len(losses)

    # 3. train
    from tqdm import tqdm
    model.train()
    t0, tokens, metrics = time.time(), 0, {}
    bar = tqdm(range(start, cfg.max_iters), desc="sft", initial=start, total=cfg.max_iters, dynamic_ncols=True,
               disable=None)
    for step in bar:
        # gradient accumulation over this process's micro-batches; each loss weighted by its share of the batch, so
        # the summed gradient (over micro-batches and processes) is the whole batch's
        loss = 0.0
        for batch, share in train_batches(step):
            with ctx:
                part = sft_loss(fwd, batch) * share
            check_finite(step, loss=part)
            part.backward()
            loss, tokens = loss + part.detach(), tokens + batch[0].numel()
        lr, norm = optimizer_step(model, optimizer, cfg, step)
        done = step + 1
        if done % cfg.log_interval == 0 or done == cfg.max_iters:
            dt = time.time() - t0
            metrics = dict(loss=float(all_sum(loss)), lr=lr, grad_norm=norm, tokens_per_s=all_sum(tokens) / dt)
            if done % cfg.eval_interval == 0 or done == cfg.max_iters:
                metrics["eval/loss"] = evaluate()
            run.log(done, **metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", **({"eval": f"{metrics['eval/loss']:.3f}"}
                                                             if "eval/loss" in metrics else {}))
            t0, tokens = time.time(), 0
        if run.end_step(done, cfg.max_iters, lambda: run.save(done, model, optimizer)):
            return 130
    if start >= cfg.max_iters and run.ckpt is None:
        run.save(cfg.max_iters, model, optimizer)
    final = dict(loss=metrics.get("loss"), **{"eval/loss": evaluate()}, step=cfg.max_iters,
                 params=model.num_params())
    run.summary(**final)
    print(f"done: eval loss {final['eval/loss']:.4f}; checkpoint {run.ckpt_path}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# stage sample

@dataclass
class SampleConfig(RunConfig):
    out_dir: str = opt("out/sample", "run folder: samples.jsonl and summary.json")
    ckpt: str = opt("out/sft/ckpt.pt", "policy checkpoint to sample from")
    prompt: str = opt("", "one prompt (default: the start of a document)")
    prompts: str = opt("", "file of prompts (JSONL {prompt}/{input_text}/{text}, preference files, or .txt lines)")
    num_samples: int = opt(3, "samples per prompt", min=1)
    max_new_tokens: int = opt(0, "tokens to sample per response (0: half the model's block_size)", min=0)
    temperature: float = opt(1.0, "softmax temperature (0: greedy)", min=0.0)
    top_k: int = opt(0, "keep only the k most likely tokens (0: off)", min=0)
    top_p: float = opt(1.0, "nucleus sampling mass, in (0, 1] (1: off)", above=0.0, max=1.0)
    batch_size: int = opt(64, "prompts per generate() call", min=1)


@dataclass
class Samples:
    """Sampled responses, as text and in the project's batch layout."""
    prompts: list  # B prompt strings
    responses: list  # B response strings (decoded, without EOS)
    ids: torch.Tensor  # (B, P + R) [left-padded prompt | right-padded response], on the device
    mask: torch.Tensor  # (B, P + R) 1 on real tokens
    R: int  # response columns
    resp_mask: torch.Tensor  # (B, R) float, 1 on response tokens up to and including EOS
    no_eos: torch.Tensor  # (B,) bool: cut at max_new_tokens before emitting EOS


@torch.no_grad()
def sample_responses(policy, prompts, max_new_tokens, generator, device, ctx=nullcontext(), temperature=1.0, top_k=0,
                     top_p=1.0, batch_size=0, desc=None):
    """The one sampling helper of every stage: one response per prompt string, to a fixed maximum length, everything
    after the first EOS padding (the batch layout documented in model.py). A too-long prompt keeps its end.
    batch_size > 0 samples in chunks of that many rows (with a progress bar named desc); the result is one Samples
    either way."""
    from tqdm import tqdm
    from data import EOS, decode, encode_prompt, layout_batch, pad_batch
    room = policy.config.block_size - max_new_tokens
    if room < 1:
        raise ConfigError(f"--max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                          f"block_size={policy.config.block_size} (use --max_new_tokens={policy.config.block_size // 2}"
                          f" or less)")
    prompt_ids = [encode_prompt(p)[-room:] for p in prompts]
    size = batch_size or max(1, len(prompts))
    responses = []
    for i in tqdm(range(0, len(prompts), size), desc=desc, disable=None if desc else True, leave=False):
        ids, mask = pad_batch(prompt_ids[i:i + size], side="left")
        with ctx:
            tokens, tmask = policy.generate(ids.to(device), mask.to(device), max_new_tokens, temperature, top_k,
                                            top_p, generator=generator)
        responses += [t[:n] for t, n in zip(tokens.tolist(), tmask.sum(1).tolist())]  # up to and including EOS
    ids, mask, R = layout_batch(prompt_ids, responses)
    ids, mask = ids.to(device), mask.to(device)
    return Samples(list(prompts), [decode(r) for r in responses], ids, mask, R, mask[:, -R:].float(),
                   torch.tensor([len(r) == 0 or r[-1] != EOS for r in responses], device=device))


@torch.no_grad()
def sample(cfg):
    from data import load_prompts, write_jsonl
    run = Run(cfg, "sample")
    device, ctx = setup_device(cfg)
    model, _ = load_policy(cfg.ckpt, device)
    prompts = load_prompts(cfg.prompts) if cfg.prompts else [cfg.prompt]
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    max_new_tokens = cfg.max_new_tokens or model.config.block_size // 2
    s = sample_responses(model, [p for p in prompts for _ in range(cfg.num_samples)], max_new_tokens, g, device,
                         ctx, cfg.temperature, cfg.top_k, cfg.top_p, cfg.batch_size, desc="sampling")
    lengths = s.resp_mask.sum(1).long().tolist()
    write_jsonl(os.path.join(run.dir, "samples.jsonl"),
                [dict(prompt=p, response=r, tokens=n) for p, r, n in zip(s.prompts, s.responses, lengths)])
    for p, r in list(zip(s.prompts, s.responses))[:10]:  # cut, so that a huge prompt is not echoed whole
        print(f"--- {shorten(p)!r}\n{shorten(p)}{shorten(r)}")
    run.summary(samples=len(lengths), mean_tokens=sum(lengths) / len(lengths))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# the entry point

def keep_freed_memory():
    """Keep freed blocks of up to 32 MB in the process's heap (glibc's mallopt; elsewhere this does nothing).

    By default glibc hands blocks from 128 KB (rising as it goes, up to 32 MB) straight back to the kernel when
    freed, and the kernel zeroes fresh pages at the next allocation: on a CPU the tensors made and freed at every
    step (sampling distributions, log-prob slices) then cost about half as much system time as the compute's
    user time (3 steps of the cpu preset's PPO: user 13.0 s, sys 6.2 s; with this and 26 MB log-prob slices: sys
    0.4 s). Fixing the threshold at glibc's largest and never trimming the heap's top keeps those pages."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks below 32 MB come from the heap
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: return the heap's free top to the kernel only above 1 GB


def main(argv):
    from data import DataError, use_chat_template
    keep_freed_memory()
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\nstages:\n" + "\n".join(f"  {s:<9} {v[3]}" for s, v in STAGES.items()))
        return 0
    stage = argv[0] if argv and not argv[0].startswith("-") else "pipeline"
    args = argv[1:] if argv and not argv[0].startswith("-") else argv
    if stage not in STAGES:
        print(f"error: unknown stage {stage!r}; stages: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    module_name, cls_name, fn_name, _ = STAGES[stage]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        print(f"error: stage {stage} is not implemented yet ({module_name}.py is missing)", file=sys.stderr)
        return 2
    cls = getattr(module, cls_name)
    if "-h" in args or "--help" in args:
        print(config_help(stage, cls))
        return 0
    try:
        cfg = parse_config(cls, args)
        if hasattr(cfg, "chat_template"):
            use_chat_template(cfg.chat_template)
        if world() > 1:
            if stage not in DISTRIBUTED_STAGES:
                raise ConfigError(f"stage {stage} runs in one process, not under torchrun (the pipeline hands its "
                                  f"sub-runs to GPUs with --gpus)")
            init_distributed(cfg)
        code = getattr(module, fn_name)(cfg) or 0
        shutdown()  # under torchrun: every process leaves the process group together (nothing to do without it)
        return code
    except (ConfigError, DataError) as e:
        if is_main():  # the same error on every process: one line
            print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the machine, not the code: a full disk, a folder that went away
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    import train  # run the one importable copy of this file, so that every stage shares its state
    sys.exit(train.main(sys.argv[1:]))

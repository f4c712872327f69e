"""
Configuration, the bottom of the house: the two errors every stage reports in one line, one flat dataclass per stage
with a description (and the values it accepts) beside every key, and the --key=value parser. Every other file may
import this one; it imports none of them.

    cfg = parse_config(SFTConfig, ["--max_iters=100", "--compile"])   # unknown keys and bad values: ConfigError

A stage's config class is its keys: RunConfig (every stage), TrainConfig (the training stages), ModelConfig (a GPT
from scratch), OptimConfig (AdamW and its schedule), plus the stage's own, in the stage's file. `--resume` and what
a run folder accepts are runtime.py's.
"""
import dataclasses
import math
import operator
import re
from dataclasses import dataclass, field

import torch


class ConfigError(Exception):
    """Bad key, value, file or checkpoint: reported as one line, exit status 2."""


class TrainingError(Exception):
    """Training cannot go on (a non-finite loss, say): reported as one line, exit status 1."""


def opt(default, help, min=None, max=None, above=None, below=None, choices=None):
    """A config field with its --help text and what it accepts: min/max inclusive, above/below exclusive, or one of
    `choices`."""
    return field(default=default, metadata=dict(help=help, min=min, max=max, above=above, below=below,
                                                 choices=choices))


@dataclass
class RunConfig:
    """Keys shared by every stage."""
    out_dir: str = opt("out/run", "run folder: config.json, metrics.jsonl, summary.json, ckpt.pt")
    device: str = opt("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    dtype: str = opt("auto", "auto (bfloat16 on cuda, float32 on cpu), float32, bfloat16, float16",
                     choices=("auto", "float32", "bfloat16", "float16"))
    seed: int = opt(1337, "seed for everything random (data order, dropout, sampling)", min=0)
    overwrite: bool = opt(False, "start afresh in a run folder that holds a run of another stage or config")
    chat_template: str = opt("hh", "how message lists become text: hh (\\n\\nHuman: / \\n\\nAssistant:), chatml, or "
                                   "a JSON file of your own (see data.py)")


@dataclass
class TrainConfig(RunConfig):
    """Keys shared by the training stages."""
    compile: bool = opt(False, "torch.compile every model's forward pass and log-probs (GPT.compile_hidden; the "
                               "log-probs then keep their logits for backward); decoding uses CUDA graphs either way")
    resume: bool = opt(False, "continue the run in out_dir from its ckpt.pt, with the keys of its config.json")
    log_interval: int = opt(10, "steps between log lines", min=1)
    ckpt_interval: int = opt(200, "steps between checkpoints (one is always written at the end)", min=1)
    ckpt_minutes: float = opt(10.0, "also write a checkpoint when this many minutes passed since the last (0: off)",
                              min=0.0)
    grad_checkpoint: bool = opt(False, "recompute each block's activations in the backward pass: less memory for "
                                       "large models, one more forward pass of compute")
    tracker: str = opt("none", "also send the metrics (and sample completions) to tensorboard or wandb; "
                               "metrics.jsonl stays the record", choices=("none", "tensorboard", "wandb"))
    snapshot_interval: int = opt(0, "also keep the weights alone as ckpt-STEP.pt every this many steps, to evaluate "
                                    "along training (0: off)", min=0)
    snapshot_steps: str = opt("", "also keep them at these steps, comma-separated (5,10,20: early and dense, where "
                                  "the KL moves fastest)")


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


def given_keys(argv):
    """The keys named on a command line (--key=value or --flag), in order."""
    return [a[2:].partition("=")[0] for a in argv if a.startswith("--")]


def parse_value(f, key, raw, eq):
    """One --key=value, converted to the field's type and checked against what it accepts."""
    kind = type(f.default)
    if kind is bool:
        if not eq or raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{key}={raw}: expected true or false")
    if not eq:
        raise ConfigError(f"--{key} needs a value: --{key}=...")
    try:
        v = kind(raw)
    except ValueError:
        raise ConfigError(f"--{key}={raw}: expected {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(v):
        raise ConfigError(f"--{key}={raw}: expected a finite number")
    m = f.metadata
    if m.get("choices") and v not in m["choices"]:
        raise ConfigError(f"--{key}={raw}: expected {', '.join(m['choices'][:-1])} or {m['choices'][-1]}")
    for bound, ok, says in (("min", operator.ge, ">="), ("max", operator.le, "<="), ("above", operator.gt, ">"),
                            ("below", operator.lt, "<")):
        if m.get(bound) is not None and not ok(v, m[bound]):
            raise ConfigError(f"--{key}={raw}: must be {says} {m[bound]}")
    return v


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
        values[key] = parse_value(fields[key], key, raw, eq)
    return check_config(cls(**values))


def check_config(cfg):
    """What no single key can check: the GPT's shape, a named run folder, the device, the snapshot steps."""
    if hasattr(cfg, "n_embd") and cfg.n_embd % cfg.n_head:
        raise ConfigError(f"--n_embd={cfg.n_embd} is not divisible by --n_head={cfg.n_head}")
    if hasattr(cfg, "out_dir") and not cfg.out_dir.strip():
        raise ConfigError("--out_dir is empty: name a run folder")
    if hasattr(cfg, "device"):
        check_device(cfg.device)
    snapshot_steps(cfg)  # a bad list fails here, in one line
    return cfg


def check_device(name):
    """auto, cpu, cuda, cuda:N or mps, if this machine has it; checked at parse time, before a run folder exists."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", name):
        raise ConfigError(f"--device={name}: expected auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device={name}: CUDA is not available on this machine")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"--device={name}: this machine has {plural(torch.cuda.device_count(), 'CUDA device')}")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device={name}: MPS is not available on this machine")


def snapshot_steps(cfg):
    """--snapshot_steps=5,10,20 -> {5, 10, 20}; a ConfigError names anything that is not a positive integer."""
    steps = set()
    for part in getattr(cfg, "snapshot_steps", "").split(","):
        if part.strip():
            if not part.strip().isdigit() or int(part) < 1:
                raise ConfigError(f"--snapshot_steps={cfg.snapshot_steps}: {part.strip()!r} is not a positive step")
            steps.add(int(part))
    return steps


def plural(n, word):
    """'1 step', '2 steps': for the messages of every stage."""
    return f"{n:,} {word}{'s' * (n != 1)}"


def config_help(cls, usage):
    """--help: the usage line, then every key with its default and description, in aligned columns."""
    rows = [(f"--{f.name}={f.default!s}", f.metadata.get("help", "")) for f in dataclasses.fields(cls)]
    width = min(30, max(len(k) for k, _ in rows))  # a longer default puts its description on the next line
    return "\n".join([usage, ""] + [f"  {k:<{width}}  {h}" if len(k) <= width else f"  {k}\n  {'':<{width}}  {h}"
                                     for k, h in rows])

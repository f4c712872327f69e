"""
Checkpoints in and out: this project's own format, and Hugging Face GPT-2 folders both ways.

Our checkpoint is one dict of tensors and plain values (kind, stage, step, model, model_args, optimizer, config, rng
and a stage's own state), written atomically (save_checkpoint) and read with torch.load(weights_only=True), so no
pickled code ever runs (safe_torch_load). Every option that takes a policy checkpoint (--init_from, --ref,
sample --ckpt, the pipeline's --sft) or a reward model (--reward, score --ckpt) also takes a local Hugging Face
GPT-2 folder (config.json plus model.safetensors or its shards, or pytorch_model.bin), converted by load_folder; stage
`export` writes one back:

    python train.py ppo --init_from=/data/gpt2 --prompts=p.jsonl --reward=...   # start from a GPT-2 folder
    python train.py export --ckpt=out/ppo/ckpt.pt --out=gpt2-ppo                 # -> GPT2LMHeadModel.from_pretrained
    python train.py export --ckpt=out/reward/ckpt.pt --out=gpt2-rm               # -> GPT2ForSequenceClassification

The GPT of model.py is GPT-2's architecture with GPT-2's parameter names: pre-LayerNorm blocks (eps 1e-5, biases),
GELU with the tanh approximation (transformers' "gelu_new"), attention scaled by 1/sqrt(head size), learned
positions (n_positions is our block_size), wte tied to lm_head. What differs is only storage: GPT-2's Conv1D keeps
its weight as (in, out), nn.Linear as (out, in), so the four matrices of a block are transposed; and our embedding
table has 50304 rows (50257 padded to a multiple of 64, row 50257 being our PAD), GPT-2's 50257. Everything else in
a config, or in a weights file, that this GPT cannot compute is refused in one line.

Simplifications, on purpose:
- The safetensors format is read and written here, not with the `safetensors` package, deliberately: the project
  may not require it and the format is small and documented (8-byte little-endian header length, a JSON header
  {name: {dtype, shape, data_offsets}} plus an optional "__metadata__", then the raw little-endian bytes). Tests
  check our files against the package where it is installed.
- Only GPT-2 (model_type "gpt2"); no tokenizer files are read or written: the tokenizer is always GPT-2's BPE
  (assets/), so vocab_size must be 50257 (or 50258: GPT-2 with one added [PAD] token, as TRL's recipes make it).
- Dropout of a folder is ignored (the RLHF stages turn dropout off anyway); the config's *_pdrop keys are not read.
- A reward model exports as GPT2ForSequenceClassification, whose head has no bias: the normalised score's constant
  (gain * head bias + bias) goes into config.json as "reward_offset", which transformers keeps but does not add.
"""
import hashlib
import json
import math
import os
import re
import signal
import struct
import sys
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from config import ConfigError, TrainingError, opt, plural
from data import atomic_write
from model import GPT, GPTConfig, N_REAL_TOKENS


# ----------------------------------------------------------------------------------------------------------------
# our format: one dict of tensors and plain values, written atomically, read with weights_only=True

def save_checkpoint(path, ckpt):
    """Write to a temporary file in the same folder, fsync, then rename over the old one (data.atomic_write): a kill
    at any moment leaves either the old or the new checkpoint, never a torn one. Ctrl-C / SIGTERM arriving during the
    write are held until it ends; a failed write (a full disk) removes its temporary file and is one line, the old
    checkpoint left as it was."""
    try:
        with signals_held(), atomic_write(path, "wb", durable=True) as f:
            torch.save(ckpt, f)
    except OSError as e:
        raise TrainingError(f"{path}: writing the checkpoint failed ({e.strerror or e}); the previous checkpoint "
                            f"is left as it was") from None


def in_dtype(weights, dtype):
    """A state dict's floating-point tensors cast to dtype (a name: "bfloat16"); tied weights (lm_head and wte) stay
    one tensor, saved once."""
    dtype, cast = getattr(torch, dtype), {}
    for k, v in weights.items():
        if v.is_floating_point():
            key = (v.data_ptr(), v.shape)
            weights[k] = cast[key] = cast[key] if key in cast else v.to(dtype)
    return weights


def drop_resume_state(path):
    """Rewrite a finished run's checkpoint without what only --resume needs (the optimizer's moments, PPO's critic),
    a policy's weights in the run's training dtype (bfloat16 halves them, as it does the snapshots'): a sixth of its
    size, or less. The config and step stay (and a reward model's float32 weights: its normalisation is two of them)."""
    ckpt = safe_torch_load(path)
    drop = [key for key in ("optimizer", "critic") if ckpt.get(key) is not None]
    dtype = (ckpt.get("config") or {}).get("dtype", "float32") if ckpt["kind"] == "policy" else "float32"
    want = getattr(torch, dtype)
    if drop or any(v.is_floating_point() and v.dtype != want for v in ckpt["model"].values()):
        save_checkpoint(path, {**ckpt, **dict.fromkeys(drop), "model": in_dtype(ckpt["model"], dtype)})


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
    refused by name. A file that torch.save did not write at all (a data file, say) is told so, not suspected."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):  # torch.save's zip archive, or its old pickle
        raise ConfigError(f"{path}: not a PyTorch checkpoint (torch.save writes a zip archive; this file starts with "
                          f"{magic!r})")
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
    a Hugging Face GPT-2 folder (config.json + model.safetensors or pytorch_model.bin): load_folder converts it."""
    if os.path.isdir(path):
        ckpt = load_folder(path)
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
    (frozen_dtype(cfg) for a model that is never trained: a reference policy) stores its Linear layers' weights in
    that type, as autocast casts them for every product anyway; the embeddings and LayerNorms stay float32, so that
    under autocast the reference computes exactly what the policy it started as does (KL 0 at step 0: with all of it
    in bfloat16 its residual stream is rounded at every layer, +0.02 nats per response at the start). compile:
    GPT.compile_hidden."""
    ckpt = load_checkpoint(path, "policy")
    model = model_from_checkpoint(ckpt, path).to(device)
    disable_dropout(model)
    for m in model.modules() if dtype is not None else ():
        if isinstance(m, torch.nn.Linear) and m is not model.lm_head:  # lm_head is the embedding (tied)
            m.to(dtype)
    if compile:
        model.compile_hidden()
    return model.eval(), ckpt


def frozen_dtype(cfg):
    """bfloat16 weights for models that are never trained (reference policy: its Linear layers, load_policy; reward
    model) when the run computes in bfloat16 anyway (autocast casts every matmul input to it): about half their
    memory, which is what lets GPT-2-medium and larger fit beside the policy, its optimizer and critic on one GPU.
    None (keep float32) otherwise."""
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


# ----------------------------------------------------------------------------------------------------------------
# what a file is: its size and sha256, as the pipelines record their inputs

def file_sha256(path):
    """The sha256 of a file's bytes, read in 1 MiB pieces (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


_sha = {}


def fingerprint(path):
    """size and sha256 of a file (memoised by path, size and mtime); of a folder (a GPT-2 folder, --sft=DIR), those
    of its files; of a snapshot whose weights went once evaluated, those it had. What the pipelines record of their
    inputs, and what a shared reference cache is stamped with (dpo.cached_reference_logps)."""
    if os.path.isdir(path):
        return {f: fingerprint(os.path.join(path, f)) for f in sorted(os.listdir(path))
                if os.path.isfile(os.path.join(path, f))}
    if not os.path.exists(path) and os.path.exists(path + ".removed.json"):  # weights gone once evaluated
        with open(path + ".removed.json") as f:  # (report.evaluate_run)
            return json.load(f)
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _sha:
        _sha[key] = file_sha256(path)
    return dict(size=st.st_size, sha256=_sha[key])


# ----------------------------------------------------------------------------------------------------------------
# safetensors, read and written here (see the docstring)

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def read_safetensors(path):
    """{name: tensor} from a .safetensors file, every offset and size checked; a bad file is one ConfigError."""
    if sys.byteorder != "little":
        raise ConfigError(f"{path}: safetensors files are little-endian; this machine is not")
    with open(path, "rb") as f:
        buf = bytearray(f.read())
    if len(buf) < 8:
        raise ConfigError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    n = struct.unpack("<Q", buf[:8])[0]
    if 8 + n > len(buf):
        raise ConfigError(f"{path}: not a safetensors file (header length {n:,} exceeds the file's "
                          f"{len(buf):,} bytes)")
    try:
        header = json.loads(buf[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ConfigError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{path}: not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    data = memoryview(buf)[8 + n:]
    out = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = DTYPES[info["dtype"]], [int(s) for s in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{path}: tensor {name}: bad header entry {json.dumps(info)[:80]}") from None
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if not (0 <= begin <= end <= len(data)) or end - begin != size:
            raise ConfigError(f"{path}: tensor {name}: data_offsets [{begin}, {end}] do not hold {info['dtype']} "
                              f"{shape} within the file's {len(data):,} data bytes (a truncated file?)")
        t = torch.frombuffer(data[begin:end], dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
        out[name] = t.view(dtype).reshape(shape)
    return out


def write_safetensors(path, tensors, metadata=None):
    """Write {name: tensor} as safetensors: names sorted, data contiguous, the header padded with spaces to a
    multiple of 8 bytes (as the reference writer does, so every tensor starts aligned). Written to a temporary file,
    then renamed. Tensors must not share memory (the format has no aliasing): untie before writing."""
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        blob = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = dict(dtype=DTYPE_NAMES[t.dtype], shape=list(t.shape), data_offsets=[offset, offset + len(blob)])
        offset += len(blob)
        blobs.append(blob)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with atomic_write(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


# ----------------------------------------------------------------------------------------------------------------
# the architecture: which GPT2Config this GPT computes

ARCHITECTURES = {"GPT2LMHeadModel": "policy", "GPT2Model": "policy", "GPT2ForSequenceClassification": "reward"}
GPT2_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                     activation_function="gelu_new", layer_norm_epsilon=1e-5, scale_attn_weights=True,
                     scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False, add_cross_attention=False,
                     tie_word_embeddings=True)  # transformers' GPT2Config defaults, which a config.json may leave out
# config key -> (the value this GPT computes, what it means when it differs)
MUST_BE = dict(scale_attn_weights=(True, "attention without the 1/sqrt(head size) scale"),
               scale_attn_by_inverse_layer_idx=(False, "attention scaled by 1/(layer index + 1)"),
               reorder_and_upcast_attn=(False, "attention upcast and reordered (Mistral's stability trick)"),
               add_cross_attention=(False, "cross-attention layers (an encoder-decoder)"),
               tie_word_embeddings=(True, "an lm_head separate from wte"))
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # transformers' names of GELU with the tanh approximation


def model_args_of(config, where):
    """config.json's dict -> this project's GPTConfig arguments, or a ConfigError naming the key this GPT cannot
    compute."""
    c = {**GPT2_DEFAULTS, **config}
    if config.get("model_type") != "gpt2":
        raise ConfigError(f"{where}: model_type is {config.get('model_type')!r}, not 'gpt2' (only GPT-2 folders load)")
    archs = config.get("architectures") or []
    other = [a for a in archs if a not in ARCHITECTURES]
    if other:
        raise ConfigError(f"{where}: architecture {other[0]} is not one of {', '.join(ARCHITECTURES)}")
    for key, (value, meaning) in MUST_BE.items():
        if c[key] != value:
            raise ConfigError(f"{where}: {key}={json.dumps(c[key])} means {meaning}, which this GPT does not compute")
    if c["activation_function"] not in TANH_GELUS:
        raise ConfigError(f"{where}: activation_function={c['activation_function']!r}: this GPT computes GELU with "
                          f"the tanh approximation ({' or '.join(TANH_GELUS)})")
    if not math.isclose(float(c["layer_norm_epsilon"]), 1e-5, rel_tol=1e-6):
        raise ConfigError(f"{where}: layer_norm_epsilon={c['layer_norm_epsilon']}: this GPT's LayerNorm uses 1e-05")
    if c["vocab_size"] not in (N_REAL_TOKENS, N_REAL_TOKENS + 1):
        raise ConfigError(f"{where}: vocab_size={c['vocab_size']}: the tokenizer is GPT-2's, 50257 tokens (50258 "
                          f"with an added pad token)")
    for key in ("n_positions", "n_embd", "n_layer", "n_head"):
        if not isinstance(c[key], int) or c[key] < 1:
            raise ConfigError(f"{where}: {key}={json.dumps(c[key])}: expected a positive integer")
    if c["n_embd"] % c["n_head"]:
        raise ConfigError(f"{where}: n_embd={c['n_embd']} is not divisible by n_head={c['n_head']}")
    if c["n_inner"] not in (None, 4 * c["n_embd"]):
        raise ConfigError(f"{where}: n_inner={c['n_inner']}: this GPT's MLP is 4 * n_embd = {4 * c['n_embd']} wide")
    return dict(block_size=c["n_positions"], vocab_size=50304, n_layer=c["n_layer"], n_head=c["n_head"],
                n_embd=c["n_embd"], dropout=0.0, bias=True)


def gpt2_config(model_args, architecture, **extra):
    """The config.json that transformers reads back as the same GPT."""
    a = model_args
    return dict(model_type="gpt2", architectures=[architecture], vocab_size=N_REAL_TOKENS, n_positions=a["block_size"],
                n_embd=a["n_embd"], n_layer=a["n_layer"], n_head=a["n_head"], n_inner=None,
                activation_function="gelu_new", resid_pdrop=a["dropout"], embd_pdrop=a["dropout"],
                attn_pdrop=a["dropout"], layer_norm_epsilon=1e-5, initializer_range=0.02, scale_attn_weights=True,
                scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False, use_cache=True,
                bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=True, **extra)


# ----------------------------------------------------------------------------------------------------------------
# names: GPT-2's (without the "transformer." prefix) <-> ours

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # stored (in, out)


def gpt2_shapes(a, vocab):
    """Every tensor of a GPT-2 trunk, by its name in a GPT2Model, with its shape as GPT-2 stores it."""
    C = a["n_embd"]
    shapes = {"wte.weight": (vocab, C), "wpe.weight": (a["block_size"], C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(a["n_layer"]):
        for name, shape in (("ln_1.weight", (C,)), ("ln_1.bias", (C,)), ("attn.c_attn.weight", (C, 3 * C)),
                            ("attn.c_attn.bias", (3 * C,)), ("attn.c_proj.weight", (C, C)), ("attn.c_proj.bias", (C,)),
                            ("ln_2.weight", (C,)), ("ln_2.bias", (C,)), ("mlp.c_fc.weight", (C, 4 * C)),
                            ("mlp.c_fc.bias", (4 * C,)), ("mlp.c_proj.weight", (4 * C, C)), ("mlp.c_proj.bias", (C,))):
            shapes[f"h.{i}.{name}"] = shape
    return shapes


def to_ours(trunk, vocab_rows=50304):
    """GPT-2 trunk tensors (GPT2Model names) -> our GPT's state dict: Conv1D weights transposed, wte padded with
    zero rows up to our table's size (rows >= 50257 are never predicted; row 50257 embeds PAD, which no real token
    attends to), lm_head the same tensor as wte (tied)."""
    sd = {}
    for name, t in trunk.items():
        if name.endswith(CONV1D):
            t = t.t()
        if name == "wte.weight":
            t = torch.cat([t[:N_REAL_TOKENS], t.new_zeros(vocab_rows - N_REAL_TOKENS, t.size(1))])
        sd["transformer." + name] = t.contiguous()
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def to_gpt2(sd, vocab=N_REAL_TOKENS):
    """Our GPT's state dict -> GPT-2 trunk tensors (GPT2Model names), the inverse of to_ours. A model trained with
    --bias=false gets zero biases, which compute the same."""
    trunk = {}
    for name, t in sd.items():
        if not name.startswith("transformer."):
            continue
        name = name[len("transformer."):]
        trunk[name] = (t.t() if name.endswith(CONV1D) else t[:vocab] if name == "wte.weight" else t).contiguous()
    n_layer = 1 + max(int(k.split(".")[1]) for k in trunk if k.startswith("h."))
    C = trunk["wte.weight"].size(1)
    for name, shape in gpt2_shapes(dict(n_embd=C, n_layer=n_layer, block_size=0), vocab).items():
        if name not in trunk and name.endswith(".bias"):
            trunk[name] = torch.zeros(shape, dtype=trunk["wte.weight"].dtype)
    return trunk


# ----------------------------------------------------------------------------------------------------------------
# reading a folder

def read_weights(folder):
    """(file name, {name: tensor}) of the folder's weights: model.safetensors (or its shards, listed in
    model.safetensors.index.json), else pytorch_model.bin read with torch.load(weights_only=True)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        path = os.path.join(folder, "model.safetensors")
        return path, read_safetensors(path)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ConfigError(f"{index}: not a safetensors index (no weight_map object)") from None
        tensors = {}
        for shard in shards:
            if not os.path.isfile(os.path.join(folder, shard)):
                raise ConfigError(f"{index}: names the shard {shard}, which the folder lacks")
            tensors.update(read_safetensors(os.path.join(folder, shard)))
        return index, tensors
    path = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(path):
        sd = safe_torch_load(path)
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ConfigError(f"{path}: not a state dict (a dict of tensors)")
        return path, sd
    raise ConfigError(f"{folder}: no weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)")


def load_folder(folder):
    """A Hugging Face GPT-2 folder -> a checkpoint dict of this project (kind 'policy', or 'reward' for a
    GPT2ForSequenceClassification with num_labels 1), ready for model_from_checkpoint. Refuses, in one line
    naming the file: another architecture, a config this GPT cannot compute, a missing, unexpected, misshapen or
    non-float tensor, an lm_head not tied to wte."""
    cfg_path = os.path.join(folder, "config.json")
    if os.path.isfile(os.path.join(folder, "ckpt.pt")):  # a run folder of this project, named instead of its checkpoint
        raise ConfigError(f"{folder}: a run folder of this project; name its checkpoint, "
                          f"{os.path.join(folder, 'ckpt.pt')}")
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"{folder}: a folder without config.json (a Hugging Face model folder needs one)")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{cfg_path}: not JSON ({' '.join(str(e).split())[:100]})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{cfg_path}: not a JSON object")
    args = model_args_of(config, cfg_path)
    path, tensors = read_weights(folder)
    # GPT2LMHeadModel and GPT2ForSequenceClassification prefix the trunk with "transformer."; GPT2Model (the
    # original "gpt2" upload) does not. Old .bin files also hold the causal-mask buffers attn.bias/attn.masked_bias.
    trunk, head = {}, {}
    for name, t in tensors.items():
        short = name[len("transformer."):] if name.startswith("transformer.") else name
        if short in ("lm_head.weight", "score.weight"):
            head[short] = t
        elif not short.endswith((".attn.bias", ".attn.masked_bias")):
            trunk[short] = t
    vocab = config.get("vocab_size", GPT2_DEFAULTS["vocab_size"])
    expected = gpt2_shapes(args, vocab)
    missing = [n for n in expected if n not in trunk]
    if missing:
        raise ConfigError(f"{path}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                     if len(missing) > 1 else ""))
    unexpected = [n for n in trunk if n not in expected]
    if unexpected:
        raise ConfigError(f"{path}: unexpected tensor {unexpected[0]} (not part of a GPT-2 of "
                          f"n_layer={args['n_layer']})")
    for name, shape in expected.items():
        if tuple(trunk[name].shape) != shape:
            raise ConfigError(f"{path}: {name} has shape {tuple(trunk[name].shape)}, but config.json's n_embd="
                              f"{args['n_embd']}, n_positions={args['block_size']}, vocab_size={vocab} need {shape}")
        if not trunk[name].is_floating_point():
            raise ConfigError(f"{path}: {name} is {trunk[name].dtype}, not a floating-point tensor")
    if "lm_head.weight" in head and not torch.equal(head["lm_head.weight"], trunk["wte.weight"]):
        raise ConfigError(f"{path}: lm_head.weight differs from wte.weight; this GPT ties them")
    sd = to_ours(trunk)
    if "score.weight" not in head:
        return dict(kind="policy", stage="hf", step=0, model=sd, model_args=args, source=folder)
    score = head["score.weight"]
    if tuple(score.shape) != (1, args["n_embd"]):
        raise ConfigError(f"{path}: score.weight has shape {tuple(score.shape)}: only a scalar reward model "
                          f"(num_labels 1, shape (1, {args['n_embd']})) loads")
    offset = float(config.get("reward_offset", 0.0))  # written by export_reward; 0 for any other folder
    sd = {"gpt." + k: v for k, v in sd.items()}
    sd.update({"head.proj.weight": score.float(), "head.proj.bias": torch.zeros(1), "gain": torch.ones(()),
               "bias": torch.tensor(offset)})
    return dict(kind="reward", stage="hf", step=0, model=sd, model_args=args, source=folder)


# ----------------------------------------------------------------------------------------------------------------
# stage export

EXPORTED = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")  # its files


@dataclass
class ExportConfig:
    ckpt: str = opt("out/sft/ckpt.pt", "policy or reward-model checkpoint (or a GPT-2 folder) to export")
    out: str = opt("", "the folder to write: config.json and model.safetensors (or pytorch_model.bin); a folder "
                       "that an export wrote is replaced")
    format: str = opt("safetensors", "safetensors or bin (pytorch_model.bin)", choices=("safetensors", "bin"))
    dtype: str = opt("float32", "float32, bfloat16 or float16 weights in the folder",
                     choices=("float32", "bfloat16", "float16"))
    overwrite: bool = opt(False, "replace the model files of a folder that also holds other files")


def export_state(ckpt, dtype=torch.float32):
    """(config.json dict, {name: tensor}) of a GPT2LMHeadModel (policy) or GPT2ForSequenceClassification (reward)
    that computes what ckpt computes; the reward's constant goes into config.json (see the docstring)."""
    a, sd = ckpt["model_args"], ckpt["model"]
    if ckpt["kind"] == "policy":
        tensors = {"transformer." + k: v.to(dtype) for k, v in to_gpt2(sd).items()}
        return gpt2_config(a, "GPT2LMHeadModel"), tensors
    # reward: score = gain * (w . h + b) + bias = (gain * w) . h + (gain * b + bias). The embedding keeps row 50257
    # (our PAD) so that pad_token_id 50257 finds the last real token as our model does (tokenizers: add one pad
    # token, e.g. tokenizer.add_special_tokens({"pad_token": "[PAD]"}), and it gets id 50257).
    trunk = to_gpt2({k[len("gpt."):]: v for k, v in sd.items() if k.startswith("gpt.")}, vocab=N_REAL_TOKENS + 1)
    gain, bias = sd["gain"].double(), sd["bias"].double()
    tensors = {"transformer." + k: v.to(dtype) for k, v in trunk.items()}
    tensors["score.weight"] = (gain * sd["head.proj.weight"].double()).to(dtype)
    offset = float(gain * sd["head.proj.bias"].double().squeeze() + bias)
    config = gpt2_config(a, "GPT2ForSequenceClassification", num_labels=1, pad_token_id=N_REAL_TOKENS,
                         reward_offset=offset)
    config["vocab_size"] = N_REAL_TOKENS + 1
    return config, tensors


def export(cfg):
    """Stage export: the checkpoint as a folder that transformers' from_pretrained loads. It only reads the
    checkpoint, so running it again replaces a folder it wrote; a folder with other files needs --overwrite, and
    the folder of the checkpoint it reads is never written into."""
    if not cfg.out.strip():
        raise ConfigError("--out is empty: name the folder to write")
    ckpt = load_checkpoint(cfg.ckpt, ("policy", "reward"))
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise ConfigError(f"--out={cfg.out} is a file, not a folder")
    if os.path.isdir(cfg.ckpt) and os.path.isdir(cfg.out) and os.path.samefile(cfg.ckpt, cfg.out):
        raise ConfigError(f"--out={cfg.out} is the folder --ckpt reads; choose another --out")
    others = sorted(set(os.listdir(cfg.out)) - set(EXPORTED)) if os.path.isdir(cfg.out) else []
    if others and not cfg.overwrite:
        raise ConfigError(f"--out={cfg.out} holds files an export does not write ({others[0]}"
                          f"{f' and {len(others) - 1} more' if len(others) > 1 else ''}); add --overwrite to replace "
                          f"its model files, or choose another --out")
    config, tensors = export_state(ckpt, getattr(torch, cfg.dtype))
    config["torch_dtype"] = cfg.dtype
    os.makedirs(cfg.out, exist_ok=True)
    for stale in EXPORTED[1:]:  # no old weights file may shadow the new one
        if os.path.exists(os.path.join(cfg.out, stale)):
            os.remove(os.path.join(cfg.out, stale))
    if cfg.format == "safetensors":
        write_safetensors(os.path.join(cfg.out, "model.safetensors"), tensors, {"format": "pt"})
    else:
        with atomic_write(os.path.join(cfg.out, "pytorch_model.bin"), "wb") as f:
            torch.save(tensors, f)
    with atomic_write(os.path.join(cfg.out, "config.json")) as f:
        json.dump(config, f, indent=2)
    what = config["architectures"][0]
    print(f"exported {cfg.ckpt} ({ckpt['kind']}, {plural(ckpt['model_args']['n_layer'], 'layer')} x "
          f"{ckpt['model_args']['n_embd']}) to {cfg.out}: load it with {what}.from_pretrained({cfg.out!r})")
    if ckpt["kind"] == "reward":
        print(f"the head has no bias in {what}: its logit is our normalised score minus reward_offset = "
              f"{config['reward_offset']:+.6f} (in config.json); pad with id 50257 (pad_token_id) so that the score "
              f"is read at the last real token")
    return 0

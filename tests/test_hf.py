"""hf.py: Hugging Face GPT-2 folders in and out. A GPT-2-shaped folder written here by hand (safetensors, Conv1D
weights stored in x out) against a plain GPT-2 forward pass written here too; every kind of bad folder; export
round trips. Where the `safetensors` package or `transformers` is installed, files and models are checked against
them (skipped cleanly where not; no network: models are random, saved with save_pretrained into tmp_path)."""
import io
import json
import math
import os
import struct
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import config
import runtime
import sft
from model import GPT, GPTConfig

C, L, H, P = 32, 2, 2, 64  # the hand-written folder's GPT-2: width, layers, heads, positions


# ----------------------------------------------------------------------------------------------------------------
# a GPT-2 folder written by hand, and GPT-2's forward pass written plainly

def gpt2_tensors(seed=0, vocab=50257):
    """Random tensors with the names and shapes of transformers' GPT2LMHeadModel (Conv1D weights (in, out))."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.1
    t = {"transformer.wte.weight": r(vocab, C), "transformer.wpe.weight": r(P, C),
         "transformer.ln_f.weight": 1 + r(C), "transformer.ln_f.bias": r(C)}
    for i in range(L):
        b = f"transformer.h.{i}."
        t.update({b + "ln_1.weight": 1 + r(C), b + "ln_1.bias": r(C), b + "attn.c_attn.weight": r(C, 3 * C),
                  b + "attn.c_attn.bias": r(3 * C), b + "attn.c_proj.weight": r(C, C), b + "attn.c_proj.bias": r(C),
                  b + "ln_2.weight": 1 + r(C), b + "ln_2.bias": r(C), b + "mlp.c_fc.weight": r(C, 4 * C),
                  b + "mlp.c_fc.bias": r(4 * C), b + "mlp.c_proj.weight": r(4 * C, C), b + "mlp.c_proj.bias": r(C)})
    return t


def gpt2_config(**changes):
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 50257, "n_positions": P,
            "n_embd": C, "n_layer": L, "n_head": H, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            **changes}


def write_safetensors_by_hand(path, tensors):
    """The format as documented, float32 only: u64 little-endian header size, JSON header, raw bytes."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        blob = t.contiguous().numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def write_folder(folder, tensors=None, config=None, weights="safetensors"):
    os.makedirs(folder, exist_ok=True)
    tensors = gpt2_tensors() if tensors is None else tensors
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(gpt2_config() if config is None else config, f)
    if weights == "safetensors":
        write_safetensors_by_hand(os.path.join(folder, "model.safetensors"), tensors)
    else:
        torch.save(tensors, os.path.join(folder, "pytorch_model.bin"))
    return str(folder)


def gpt2_logits(t, ids):
    """GPT-2's forward pass from its own tensors, as plainly as possible: Conv1D is x @ W + b."""
    T = ids.size(1)
    x = t["transformer.wte.weight"][ids] + t["transformer.wpe.weight"][:T]
    ln = lambda x, p: F.layer_norm(x, (C,), t[p + ".weight"], t[p + ".bias"], eps=1e-5)
    conv = lambda x, p: x @ t[p + ".weight"] + t[p + ".bias"]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(L):
        b = f"transformer.h.{i}."
        q, k, v = conv(ln(x, b + "ln_1"), b + "attn.c_attn").split(C, -1)
        heads = lambda z: z.view(z.size(0), T, H, C // H).transpose(1, 2)
        att = (heads(q) @ heads(k).transpose(-1, -2)) / math.sqrt(C // H)
        y = att.masked_fill(~causal, float("-inf")).softmax(-1) @ heads(v)
        x = x + conv(y.transpose(1, 2).reshape(x.shape), b + "attn.c_proj")
        h = conv(ln(x, b + "ln_2"), b + "mlp.c_fc")
        h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))  # "gelu_new"
        x = x + conv(h, b + "mlp.c_proj")
    return ln(x, "transformer.ln_f") @ t["transformer.wte.weight"].T




def load_gpt(path):
    return checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(path, "policy"), path).eval()


# ----------------------------------------------------------------------------------------------------------------
# folders in

@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_a_hand_written_gpt2_folder_computes_gpt2s_logits(tmp_path, weights):
    t = gpt2_tensors()
    model = load_gpt(write_folder(tmp_path / "gpt2", t, weights=weights))
    assert model.config.block_size == P and model.config.n_layer == L and model.config.n_embd == C
    ids = torch.randint(0, 50257, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model(ids)[0], gpt2_logits(t, ids)
    assert ours.shape == ref.shape == (3, 17, 50257)
    assert (ours - ref).abs().max() < 1e-4


def test_base_model_names_and_old_mask_buffers_load_too(tmp_path):
    """GPT2Model (the original "gpt2" upload) has no "transformer." prefix; old .bin files hold attn.bias buffers."""
    t = gpt2_tensors()
    base = {k[len("transformer."):]: v for k, v in t.items()}
    base.update({f"h.{i}.attn.bias": torch.ones(1, 1, P, P) for i in range(L)})
    model = load_gpt(write_folder(tmp_path / "base", base, config=gpt2_config(architectures=["GPT2Model"]),
                                  weights="bin"))
    ids = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(ids)[0] - gpt2_logits(t, ids)).abs().max() < 1e-4


def test_a_folder_samples_and_exports_back_to_identical_tensors(tmp_path, in_process):
    t = gpt2_tensors()
    folder = write_folder(tmp_path / "gpt2", t)
    code, out, err = in_process("sample", f"--ckpt={folder}", "--prompt=The movie", "--max_new_tokens=8",
                                "--num_samples=2", f"--out_dir={tmp_path}/sample", "--device=cpu")
    assert code == 0, err
    rows = [json.loads(line) for line in open(tmp_path / "sample" / "samples.jsonl")]
    assert len(rows) == 2 and all(r["tokens"] >= 1 for r in rows)
    code, out, err = in_process("export", f"--ckpt={folder}", f"--out={tmp_path}/back")
    assert code == 0, err
    back = checkpoint.read_safetensors(tmp_path / "back" / "model.safetensors")
    assert set(back) == set(t)  # lm_head is tied, so it is left out, as save_pretrained does
    assert all(torch.equal(back[k], t[k]) for k in t)
    config = json.load(open(tmp_path / "back" / "config.json"))
    assert {k: config[k] for k in gpt2_config()} == gpt2_config()


def test_a_policy_exports_and_loads_back_with_the_same_logits(tmp_path, in_process):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=48, bias=False))  # no biases: exported as 0
    ckpt = dict(kind="policy", model=model.state_dict(), model_args=dict(vars(model.config)))
    torch.save(ckpt, tmp_path / "ckpt.pt")
    for fmt in ("safetensors", "bin"):
        code, _, err = in_process("export", f"--ckpt={tmp_path}/ckpt.pt", f"--out={tmp_path}/{fmt}", f"--format={fmt}")
        assert code == 0, err
        back = load_gpt(str(tmp_path / fmt))
        ids = torch.randint(0, 50257, (2, 48))
        with torch.no_grad():
            assert (back(ids)[0] - model(ids)[0]).abs().max() < 1e-5
    (tmp_path / "mine").mkdir()  # a folder of the user's: its files are not replaced without --overwrite
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    code, _, err = in_process("export", f"--ckpt={tmp_path}/ckpt.pt", f"--out={tmp_path}/mine")
    assert code == 2 and "holds files an export does not write (notes.txt)" in err and "--overwrite" in err
    # a folder an export wrote is replaced by the next export
    code, _, err = in_process("export", f"--ckpt={tmp_path}/ckpt.pt", f"--out={tmp_path}/safetensors",
                              "--dtype=bfloat16")
    assert code == 0, err
    assert all(v.dtype == torch.bfloat16 for v in checkpoint.read_safetensors(tmp_path / "safetensors" /
                                                                      "model.safetensors").values())


def reward_model(seed=0):
    from reward import RewardModel
    torch.manual_seed(seed)
    model = RewardModel(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=48)).eval()
    with torch.no_grad():
        model.head.proj.bias.fill_(0.3)
        model.gain.fill_(1.7)
        model.bias.fill_(-0.4)
    return model


def right_padded(seed, B=3, T=20):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50257, (B, T), generator=g)
    lengths = torch.tensor([T, T - 5, 7])[:B]
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, 50257), mask


def test_a_reward_model_exports_and_loads_back_with_the_same_scores(tmp_path, in_process):
    from reward import load_reward_model
    model = reward_model()
    torch.save(dict(kind="reward", model=model.state_dict(), model_args=dict(vars(model.config))),
               tmp_path / "rm.pt")
    code, out, err = in_process("export", f"--ckpt={tmp_path}/rm.pt", f"--out={tmp_path}/rm")
    assert code == 0, err
    assert "reward_offset" in out
    config = json.load(open(tmp_path / "rm" / "config.json"))
    assert config["architectures"] == ["GPT2ForSequenceClassification"] and config["num_labels"] == 1
    assert abs(config["reward_offset"] - (1.7 * 0.3 - 0.4)) < 1e-6
    back = load_reward_model(str(tmp_path / "rm"), "cpu")
    ids, mask = right_padded(3)
    with torch.no_grad():
        assert (back.score(ids, mask) - model.score(ids, mask)).abs().max() < 1e-5
    code, _, err = in_process("sample", f"--ckpt={tmp_path}/rm", f"--out_dir={tmp_path}/s")
    assert code == 2 and "a reward checkpoint, but a policy checkpoint is needed" in err


def test_a_reward_model_can_start_from_a_folder(tmp_path):
    import reward
    t = gpt2_tensors()
    folder = write_folder(tmp_path / "gpt2", t)
    cfg = config.parse_config(reward.RewardConfig, [f"--init_from={folder}"])
    model = reward.init_model(cfg)
    assert cfg.block_size == P
    ids = torch.randint(0, 50257, (2, 9))
    with torch.no_grad():  # the trunk is GPT-2's: its hidden states give GPT-2's logits
        assert (model.gpt.logits(model.gpt.hidden(ids)) - gpt2_logits(t, ids)).abs().max() < 1e-4


# ----------------------------------------------------------------------------------------------------------------
# bad folders: one line each, naming the file and the problem

def drop(name):
    return lambda t: {k: v for k, v in t.items() if k != name}


BAD_CONFIGS = [
    (dict(model_type="llama"), "model_type is 'llama'"),
    (dict(architectures=["GPT2DoubleHeadsModel"]), "architecture GPT2DoubleHeadsModel"),
    (dict(activation_function="relu"), "activation_function='relu'"),
    (dict(activation_function="gelu"), "tanh approximation"),
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=true"),
    (dict(reorder_and_upcast_attn=True), "reorder_and_upcast_attn=true"),
    (dict(scale_attn_weights=False), "scale_attn_weights=false"),
    (dict(tie_word_embeddings=False), "tie_word_embeddings=false"),
    (dict(layer_norm_epsilon=1e-6), "layer_norm_epsilon=1e-06"),
    (dict(vocab_size=32000), "vocab_size=32000"),
    (dict(n_inner=100), "n_inner=100"),
    (dict(n_head=5), "not divisible by n_head=5"),
]


@pytest.mark.parametrize("change,needle", BAD_CONFIGS, ids=[n for _, n in BAD_CONFIGS])
def test_a_config_this_gpt_cannot_compute_is_one_line(tmp_path, in_process, change, needle):
    folder = write_folder(tmp_path / "bad", config=gpt2_config(**change))
    code, _, err = in_process("sample", f"--ckpt={folder}", f"--out_dir={tmp_path}/s")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "config.json" in err and needle in err, err


BAD_TENSORS = [
    (drop("transformer.h.1.mlp.c_fc.bias"), "missing tensor h.1.mlp.c_fc.bias"),
    (lambda t: {**t, "transformer.h.2.ln_1.weight": torch.ones(C)}, "unexpected tensor h.2.ln_1.weight"),
    (lambda t: {**t, "transformer.h.0.attn.c_attn.weight": t["transformer.h.0.attn.c_attn.weight"].T.contiguous()},
     "h.0.attn.c_attn.weight has shape (96, 32)"),
    (lambda t: {**t, "transformer.wpe.weight": torch.zeros(P + 1, C)}, "wpe.weight has shape (65, 32)"),
    (lambda t: {**t, "lm_head.weight": t["transformer.wte.weight"] + 1}, "lm_head.weight differs from wte.weight"),
    (lambda t: {**t, "score.weight": torch.zeros(2, C)}, "num_labels 1"),
]


@pytest.mark.parametrize("edit,needle", BAD_TENSORS, ids=[n for _, n in BAD_TENSORS])
def test_a_missing_unexpected_or_misshapen_tensor_is_one_line(tmp_path, in_process, edit, needle):
    folder = write_folder(tmp_path / "bad", edit(gpt2_tensors()))
    code, _, err = in_process("sample", f"--ckpt={folder}", f"--out_dir={tmp_path}/s")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "model.safetensors" in err and needle in err, err


def test_broken_folders_and_files_are_one_line(tmp_path, in_process):
    cases = []
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((empty, "without config.json"))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(gpt2_config()))
    cases.append((no_weights, "no weights"))
    bad_json = write_folder(tmp_path / "bad_json")
    open(os.path.join(bad_json, "config.json"), "w").write("{not json")
    cases.append((bad_json, "config.json: not JSON"))
    truncated = write_folder(tmp_path / "truncated")
    data = open(os.path.join(truncated, "model.safetensors"), "rb").read()
    open(os.path.join(truncated, "model.safetensors"), "wb").write(data[:len(data) // 2])
    cases.append((truncated, "a truncated file?"))
    garbage = write_folder(tmp_path / "garbage")
    open(os.path.join(garbage, "model.safetensors"), "wb").write(b"\xff" * 64)
    cases.append((garbage, "header length"))
    pickled = write_folder(tmp_path / "pickled", weights="bin")
    torch.save({"x": os.system}, os.path.join(pickled, "pytorch_model.bin"))  # would run code if unpickled
    cases.append((pickled, "refused: it holds Python objects"))
    run_folder = tmp_path / "run"
    run_folder.mkdir()
    (run_folder / "ckpt.pt").write_bytes(b"")
    cases.append((run_folder, f"a run folder of this project; name its checkpoint, {run_folder}/ckpt.pt"))
    for i, (folder, needle) in enumerate(cases):
        code, _, err = in_process("sample", f"--ckpt={folder}", f"--out_dir={tmp_path}/s{i}")
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert needle in err, (needle, err)


# ----------------------------------------------------------------------------------------------------------------
# our safetensors against the package (where installed)

def test_our_safetensors_round_trip_every_dtype_and_shape(tmp_path):
    tensors = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).bfloat16(), "f16": torch.randn(2, 2).half(),
               "i64": torch.arange(7), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
               "bool": torch.tensor([True, False]), "strided": torch.randn(4, 6).T}
    checkpoint.write_safetensors(str(tmp_path / "x.safetensors"), tensors, {"format": "pt"})
    raw = open(tmp_path / "x.safetensors", "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    assert n % 8 == 0 and json.loads(raw[8:8 + n])["__metadata__"] == {"format": "pt"}
    back = checkpoint.read_safetensors(str(tmp_path / "x.safetensors"))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_our_safetensors_files_agree_with_the_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).bfloat16(), "c": torch.arange(6).view(2, 3),
               "d": torch.tensor(1.5).half()}
    checkpoint.write_safetensors(str(tmp_path / "ours.safetensors"), tensors, {"format": "pt"})
    theirs = st.load_file(str(tmp_path / "ours.safetensors"))
    assert set(theirs) == set(tensors) and all(torch.equal(theirs[k], tensors[k]) for k in tensors)
    st.save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"format": "pt"})
    ours = checkpoint.read_safetensors(str(tmp_path / "theirs.safetensors"))
    assert set(ours) == set(tensors) and all(torch.equal(ours[k], tensors[k]) for k in tensors)


# ----------------------------------------------------------------------------------------------------------------
# parity with transformers (where installed; run on the GPU machine)

SHAPES = {"gpt2": dict(n_layer=12, n_head=12, n_embd=768), "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024)}


@pytest.fixture(scope="module", params=list(SHAPES))
def hf_folder(request, tmp_path_factory):
    """A randomly initialised GPT2LMHeadModel of a real GPT-2 shape, saved with save_pretrained."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(**SHAPES[request.param])
    model = transformers.GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return str(folder), model


def test_transformers_gpt2_gives_the_same_logits_here(hf_folder):
    folder, theirs = hf_folder
    ours = load_gpt(folder)
    ids = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (ours(ids)[0] - theirs(ids).logits).abs().max().item()
    print(f"max |logit difference| {diff:.2e} ({ours.config.n_layer} layers x {ours.config.n_embd})")
    assert diff < 1e-4


def test_greedy_decoding_gives_the_same_tokens_as_transformers(hf_folder):
    """float64 on both sides, so that no near-tie between two logits decides the comparison."""
    folder, theirs = hf_folder
    ours = load_gpt(folder).double()
    theirs = theirs.double()
    prompt = torch.randint(0, 50256, (2, 12), generator=torch.Generator().manual_seed(4))
    ours_tokens, _ = ours.generate(prompt, torch.ones_like(prompt), 20, temperature=0.0)
    out = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, min_new_tokens=20,
                          do_sample=False, pad_token_id=50256)
    theirs_tokens = out[:, prompt.size(1):]
    theirs.float()
    for a, b in zip(ours_tokens.tolist(), theirs_tokens.tolist()):
        n = a.index(50256) + 1 if 50256 in a else 20  # ours stops at EOS; compare up to it
        assert a[:n] == b[:n]


def test_an_exported_policy_and_reward_model_load_in_transformers(tmp_path, in_process):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=48)).eval()
    torch.save(dict(kind="policy", model=model.state_dict(), model_args=dict(vars(model.config))), tmp_path / "p.pt")
    assert in_process("export", f"--ckpt={tmp_path}/p.pt", f"--out={tmp_path}/p")[0] == 0
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "p")).eval()
    ids = torch.randint(0, 50257, (2, 48))
    with torch.no_grad():
        assert (theirs(ids).logits - model(ids)[0]).abs().max() < 1e-4
    rm = reward_model()
    torch.save(dict(kind="reward", model=rm.state_dict(), model_args=dict(vars(rm.config))), tmp_path / "rm.pt")
    assert in_process("export", f"--ckpt={tmp_path}/rm.pt", f"--out={tmp_path}/rm")[0] == 0
    theirs = transformers.GPT2ForSequenceClassification.from_pretrained(str(tmp_path / "rm")).eval()
    ids, mask = right_padded(5)
    offset = json.load(open(tmp_path / "rm" / "config.json"))["reward_offset"]
    with torch.no_grad():
        logits = theirs(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        assert (logits + offset - rm.score(ids, mask)).abs().max() < 1e-4


# ----------------------------------------------------------------------------------------------------------------
# the rest of the issue: bf16 frozen models, gradient checkpointing, trackers, chat templates, prompts from stdin

def test_frozen_models_load_in_bfloat16_and_keep_their_scores_close(tmp_path):
    from reward import load_reward_model
    folder = write_folder(tmp_path / "gpt2")
    policy, _ = checkpoint.load_policy(folder, "cpu", torch.bfloat16)  # its Linear layers; the rest float32
    assert {n for n, p in policy.named_parameters() if p.dtype == torch.float32} == \
        {n for n, p in policy.named_parameters() if ".ln_" in n or n.startswith(("transformer.wte", "transformer.wpe",
                                                                                  "transformer.ln_f"))}
    assert sum(p.dtype == torch.bfloat16 for p in policy.parameters()) >= 4 * policy.config.n_layer
    with torch.autocast("cpu", torch.bfloat16):
        tokens, mask = policy.generate(torch.tensor([[50256, 464]]), torch.ones(1, 2, dtype=torch.long), 5,
                                       temperature=0.0)
    assert tokens.shape == (1, 5) and mask.sum() >= 1
    rm = reward_model()
    torch.save(dict(kind="reward", model=rm.state_dict(), model_args=dict(vars(rm.config))), tmp_path / "rm.pt")
    half = load_reward_model(str(tmp_path / "rm.pt"), "cpu", torch.bfloat16)
    assert half.gain.dtype == torch.float32 and half.head.proj.weight.dtype == torch.bfloat16
    ids, mask = right_padded(6)
    with torch.no_grad():
        assert (half.score(ids, mask) - rm.score(ids, mask)).abs().max() < 0.1
    from reward import make_reward  # the RL stages' reward, with frozen_dtype(cfg): the same model in bf16
    prompts, responses = ["A film", "The plot"], [" was good", " dragged on and on"]
    full, low = (make_reward(str(tmp_path / "rm.pt"), "cpu", dtype=d)(prompts, responses)
                 for d in (None, torch.bfloat16))
    assert full.dtype == low.dtype == torch.float32 and 0 < (full - low).abs().max() < 0.1
    assert checkpoint.frozen_dtype(config.parse_config(sft.SampleConfig, ["--dtype=bfloat16"])) == torch.bfloat16
    assert checkpoint.frozen_dtype(config.parse_config(sft.SampleConfig, ["--dtype=float32"])) is None


def test_grad_checkpoint_recomputes_blocks_and_gives_the_same_gradients():
    grads, calls = [], []
    for on in (False, True):
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.1)).train()
        cfg = config.parse_config(sft.SFTConfig, ["--grad_checkpoint"] if on else [])
        runtime.make_optimizer(model, cfg, "cpu")  # switches it on in the model it trains
        n = [0]
        for block in model.transformer.h:
            block.register_forward_pre_hook(lambda *_: n.__setitem__(0, n[0] + 1))
        ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(2)  # the same dropout masks in both runs (checkpoint replays the RNG state)
        model(ids, ids)[1].backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        calls.append(n[0])
    assert calls == [2, 4]  # each block ran again in the backward pass
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-6) for k in grads[0])


CORPUS = [f"the film was {w} and the acting was {v} ." for w in ("good", "bad", "long") for v in ("superb", "plain")]


def tiny_sft(tmp_path, *extra):
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": CORPUS[i % len(CORPUS)]}) + "\n" for i in range(60)))
    return ["sft", f"--data={data}", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16",
            "--batch_size=4", "--max_iters=6", "--log_interval=2", "--eval_interval=4", "--eval_iters=1",
            "--device=cpu", f"--out_dir={tmp_path}/run", *extra]


def metrics_rows(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


class FakeWandb(types.ModuleType):
    """Stands in for the wandb package: records what the run sends."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged = [], []
        self.Table = lambda columns, data: ("table", columns, data)

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, row, step):
        self.logged.append((step, row))


def test_wandb_gets_the_rows_of_metrics_jsonl_and_sample_tables(tmp_path, in_process, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    code, _, err = in_process(*tiny_sft(tmp_path, "--tracker=wandb"))
    assert code == 0, err
    rows = metrics_rows(tmp_path / "run")
    assert [s for s, _ in fake.logged] == [r["step"] for r in rows] == [2, 4, 6]
    for (step, sent), row in zip(fake.logged, rows):
        assert sent == {k: v for k, v in row.items() if k != "step"}
    assert "eval/loss" in fake.logged[1][1] and fake.inits[0]["config"]["stage"] == "sft"
    run = runtime.Run(config.parse_config(sft.SampleConfig, [f"--out_dir={tmp_path}/s"]), "sample")
    run.tracker = runtime.Tracker("wandb", run.dir, dict(stage="sample"))
    run.log_samples(7, ["a prompt"], ["a response"], [0.5])
    assert fake.logged[-1] == (7, {"samples": ("table", ["prompt", "response", "score"],
                                               [["a prompt", "a response", 0.5]])})


def test_tensorboard_gets_the_rows_of_metrics_jsonl(tmp_path, in_process, monkeypatch):
    scalars, texts = [], []

    class SummaryWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, key, value, step):
            scalars.append((step, key, value))

        def add_text(self, key, text, step):
            texts.append((step, key, text))

        def flush(self):
            pass

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    code, _, err = in_process(*tiny_sft(tmp_path, "--tracker=tensorboard"))
    assert code == 0, err
    expected = [(r["step"], k, v) for r in metrics_rows(tmp_path / "run") for k, v in r.items() if k != "step"]
    assert scalars == expected
    tracker = runtime.Tracker("tensorboard", str(tmp_path), dict(stage="x"))
    tracker.text(3, "samples", ["prompt", "response"], [["a|b", "c\nd"]])
    assert texts == [(3, "samples", "|prompt|response|\n|---|---|\n|a\\|b|c<br>d|")]


@pytest.mark.parametrize("tracker,package,module", [("wandb", "wandb", "wandb"),
                                                     ("tensorboard", "tensorboard", "torch.utils.tensorboard")])
def test_a_missing_tracker_package_is_one_line_naming_it(tmp_path, in_process, monkeypatch, tracker, package, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails, as when the package is not installed
    code, _, err = in_process(*tiny_sft(tmp_path, f"--tracker={tracker}"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"pip install {package}" in err, err
    assert not os.path.exists(tmp_path / "run" / "config.json")  # found as the run opened, before any work
    code, _, err = in_process(*tiny_sft(tmp_path, "--tracker=mlflow"))
    assert code == 2 and "--tracker=mlflow" in err


@pytest.fixture
def hh_afterwards():
    import data
    yield data
    data.use_chat_template("hh")


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi {there}"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Bye!"}]


def test_chat_templates_render_message_lists(tmp_path, hh_afterwards):
    data = hh_afterwards
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": MESSAGES}) + "\n")
    (ex,) = data.load_sft(str(path))
    assert ex.prompt + ex.response == "\n\nSystem: Be brief.\n\nHuman: Hi {there}\n\nAssistant: Hello.\n\nHuman: Bye" \
                                      "\n\nAssistant: Bye!"  # hh: the HH dialogue itself
    data.use_chat_template("chatml")
    (ex,) = data.load_sft(str(path))
    assert ex.prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi {there}<|im_end|>\n"
                         "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                         "<|im_start|>assistant\n")
    assert ex.response == "Bye!<|im_end|>"
    own = tmp_path / "mine.json"
    own.write_text(json.dumps(dict(system="[S] {content}\n", user="[U] {content}\n", assistant="[A] {content}\n",
                                   generation="[A]", reply=" {content}")))
    data.use_chat_template(str(own))
    (ex,) = data.load_sft(str(path))
    assert ex.prompt == "[S] Be brief.\n[U] Hi {there}\n[A] Hello.\n[U] Bye\n[A]" and ex.response == " Bye!"


def test_a_bad_chat_template_is_one_line(tmp_path, in_process, hh_afterwards):
    bad = tmp_path / "bad.json"
    for text, needle in ((json.dumps(dict(user="{content}")), "exactly the strings"),
                         (json.dumps(dict(system="x", user="{content}", assistant="{content}", generation="",
                                          reply="{content}")), "'system' must contain {content}"),
                         ("{nope", "not a JSON chat template")):
        bad.write_text(text)
        code, _, err = in_process(*tiny_sft(tmp_path, f"--chat_template={bad}"))
        assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    code, _, err = in_process(*tiny_sft(tmp_path, "--chat_template=llama3"))
    assert code == 2 and "--chat_template=llama3: not hh, chatml, nor a file" in err


def test_prompts_from_standard_input(tmp_path, in_process, monkeypatch):
    folder = write_folder(tmp_path / "gpt2")
    monkeypatch.setattr(sys, "stdin", io.StringIO("The movie\n\nA film about\n"))
    code, _, err = in_process("sample", f"--ckpt={folder}", "--prompts=-", "--num_samples=1", "--max_new_tokens=4",
                              f"--out_dir={tmp_path}/s")
    assert code == 0, err
    rows = [json.loads(line) for line in open(tmp_path / "s" / "samples.jsonl")]
    assert [r["prompt"] for r in rows] == ["The movie", "A film about"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    code, _, err = in_process("sample", f"--ckpt={folder}", "--prompts=-", f"--out_dir={tmp_path}/s2")
    assert code == 2 and "no prompts on standard input" in err

"""reward.py: the Bradley-Terry loss against its closed form, the score read at the last real token, the
normalisation, and stages `reward` and `score` run as a user would (learning, exact resume, bad files)."""
import dataclasses
import json
import math
import os
import random

import pytest
import torch

import checkpoint
import config
import runtime
import data
import reward
from conftest import TINY_MODEL, kill_and_resume, main_in_process, read_json, read_metrics, run_cli
from data import EOS, PAD
from model import GPT, GPTConfig, layout_batch

WORDS = ("the cat dog house tree blue green red small big old new happy sad fast slow river stone cloud light dark "
         "sun moon star sea sky bird fish road hill door book table chair bread milk water fire").split()
MARKER = "banana"
KILL_SEED = 28  # kill_and_resume's first two waits after a checkpoint are short (0.09 s, 0.10 s): kills that hit


def write_synthetic(path, n, seed=0, long_pairs=0):
    """Preference pairs {prompt, chosen, rejected}: prompts of random words; the rejected response is a few random
    words and the chosen one the same words then the marker word. long_pairs extra pairs (first) are far longer
    than 64 tokens."""
    r = random.Random(seed)
    words = lambda k: " ".join(r.choice(WORDS) for _ in range(k))
    with open(path, "w") as f:
        for i in range(n + long_pairs):
            prompt, rejected = words(200 if i < long_pairs else r.randint(3, 6)), " " + words(r.randint(2, 5))
            f.write(json.dumps(dict(prompt=prompt.capitalize() + ":", chosen=f"{rejected} {MARKER}",
                                    rejected=rejected)) + "\n")
    return str(path)


def write_policy(path, seed=0):
    """A tiny random-init policy checkpoint, as stage sft would write it."""
    torch.manual_seed(seed)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))
    checkpoint.save_checkpoint(str(path), dict(kind="policy", stage="sft", step=0, model=m.state_dict(), optimizer=None,
                                          model_args=dataclasses.asdict(m.config), config={}, rng=runtime.rng_state()))
    return str(path), m


def tiny_reward_model(seed=0):
    torch.manual_seed(seed)
    return reward.RewardModel(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()


def same_numbers(a, b):
    """Two metric dicts / rows hold the same numbers, timing aside."""
    drop = ("ms_per_step",)
    return {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}


# ----------------------------------------------------------------------------------------------------------------
# the loss, on hand-made numbers

def test_bradley_terry_loss_closed_form_and_gradient_sign():
    rc = torch.tensor([2.0, -1.0, 0.5], requires_grad=True)
    rr = torch.tensor([1.0, 0.0, 0.5], requires_grad=True)
    sig = lambda x: 1 / (1 + math.exp(-x))
    expected = -(math.log(sig(1.0)) + math.log(sig(-1.0)) + math.log(sig(0.0))) / 3
    loss = reward.bradley_terry_loss(rc, rr)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert (rc.grad < 0).all() and (rr.grad > 0).all()  # descent raises chosen, lowers rejected
    torch.testing.assert_close(rc.grad, -rr.grad)
    # margin inside the sigmoid (Llama 2), then the centering term c * mean((r_c + r_r)^2)
    with_margin = reward.bradley_terry_loss(rc, rr, margin=0.5).item()
    assert with_margin == pytest.approx(-(math.log(sig(0.5)) + math.log(sig(-1.5)) + math.log(sig(-0.5))) / 3)
    centered = reward.bradley_terry_loss(rc, rr, center_coef=0.01).item()
    assert centered == pytest.approx(expected + 0.01 * (9 + 1 + 1) / 3, rel=1e-6)
    m = reward.pair_metrics(rc.detach(), rr.detach(), loss.item())
    assert m["accuracy"] == pytest.approx(1 / 3) and m["margin"] == pytest.approx(0.0)


# ----------------------------------------------------------------------------------------------------------------
# the model: last real token, normalisation, initialisation

@torch.no_grad()
def test_reward_is_read_at_last_real_token_whatever_the_padding():
    model = tiny_reward_model()
    prompt, response = [EOS, 464, 3290, 373], [257, 1310, EOS]
    ref = model(torch.tensor([prompt + response]), torch.ones(1, 7, dtype=torch.long))  # no padding at all
    for n_left, n_right in ((0, 0), (3, 0), (0, 5), (7, 4)):
        ids = torch.tensor([[PAD] * n_left + prompt + response + [PAD] * n_right])
        mask = (ids != PAD).long()
        torch.testing.assert_close(model(ids, mask), ref, rtol=1e-5, atol=1e-5)
    # in a shared-layout batch beside longer prompts and responses, the same score
    ids, mask, _ = layout_batch([prompt, [EOS] + [11] * 9], [response, [13] * 12 + [EOS]])
    torch.testing.assert_close(model(ids, mask)[:1], ref, rtol=1e-5, atol=1e-5)
    # never read on the padding after EOS: changing the padding ids changes nothing
    ids2 = torch.where(mask.bool(), ids, torch.full_like(ids, 7))
    torch.testing.assert_close(model(ids2, mask), model(ids, mask))


def test_normalise_gives_mean_0_std_1_and_score_texts_matches_score():
    model = tiny_reward_model(1)
    prompts = [f"Prompt {i}:" for i in range(12)]
    responses = [" " + " ".join(WORDS[i:i + 1 + i % 4]) for i in range(12)]
    raw = torch.tensor(reward.score_texts(model, prompts, responses, "cpu", batch_size=5))
    mean, std = reward.normalise(model, prompts, responses, "cpu", batch_size=4)
    assert (mean, std) == pytest.approx((raw.mean().item(), raw.std(correction=0).item()), rel=1e-5)
    scores = torch.tensor(reward.score_texts(model, prompts, responses, "cpu"))
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert scores.std(correction=0).item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(scores, (raw - mean) / std, rtol=1e-4, atol=1e-5)
    assert reward.normalise(model, prompts, responses, "cpu") == pytest.approx((mean, std))  # fits from raw scores


def test_trunk_from_policy_checkpoint_and_head_init(tmp_path):
    path, policy = write_policy(tmp_path / "policy.pt")
    cfg = config.parse_config(reward.RewardConfig, [f"--init_from={path}", "--block_size=64"])
    model = reward.init_model(cfg)
    for k, v in policy.state_dict().items():
        assert torch.equal(model.gpt.state_dict()[k], v), k
    assert model.head.proj.bias.item() == 0.0
    assert model.head.proj.weight.std().item() == pytest.approx(1 / math.sqrt(33), rel=0.3)  # OpenAI's init: N(0, 1/sqrt(d + 1))
    too_long = config.parse_config(reward.RewardConfig, [f"--init_from={path}", "--block_size=128"])
    with pytest.raises(config.ConfigError, match="block_size=128"):
        reward.init_model(too_long)


def test_batches_visit_every_pair_once_per_epoch_and_keep_the_last():
    n, B = 10, 4
    total = 2 * n  # two epochs: 5 batches, the last one of 4 draws, none dropped
    batches = [data.epoch_indices(n, s, B, 3, total) for s in range(5)]
    draws = [i for b in batches for i in b]
    assert len(draws) == total and sorted(draws[:n]) == sorted(draws[n:]) == list(range(n))
    assert draws[:n] != draws[n:]  # a fresh order per epoch
    assert data.epoch_indices(n, 2, B, 3, total) == batches[2]  # a pure function of the step


# ----------------------------------------------------------------------------------------------------------------
# the stages, run as a user would

def reward_args(tmp_path):
    data = write_synthetic(tmp_path / "pairs.jsonl", 200, long_pairs=1)
    policy, _ = write_policy(tmp_path / "policy.pt")
    return ["reward", f"--data={data}", *TINY_MODEL, "--batch_size=16", "--max_iters=10", "--learning_rate=3e-3",
            "--eval_interval=5", "--log_interval=5", "--ckpt_interval=2", f"--policy={policy}",
            "--norm_samples=32", "--max_new_tokens=8"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reward")
    args = reward_args(tmp)
    out = str(tmp / "run")
    return tmp, args, out, main_in_process(*args, f"--out_dir={out}")[1]


def test_reward_stage_learns_marker_preference(trained):
    tmp, _, out, stdout = trained
    assert "1 of 201 pairs were longer than block_size=64 and were truncated" in stdout
    s = read_json(os.path.join(out, "summary.json"))
    assert s["eval/accuracy"] > 0.9 and s["eval/loss"] < 0.5 and s["eval/margin"] > 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [5, 10]
    assert {"loss", "accuracy", "rewards/chosen", "rewards/rejected", "margin", "eval/accuracy"} <= set(rows[0])
    assert rows[-1]["loss"] < rows[0]["loss"]
    # the checkpoint holds the normalisation fitted on the policy's samples (OpenAI's lm-human-preferences)
    model = reward.load_reward_model(os.path.join(out, "ckpt.pt"), "cpu")
    assert model.gain.item() == pytest.approx(1 / s["norm/raw_std"], rel=1e-5)
    assert model.bias.item() == pytest.approx(-s["norm/raw_mean"] / s["norm/raw_std"], rel=1e-5)


def test_score_stage_ranks_chosen_above_rejected(trained, in_process):
    tmp, _, out, _ = trained
    held_out = [json.loads(line) for line in open(tmp / "pairs.jsonl")][-20:]  # the eval split
    rows = [dict(prompt=r["prompt"], response=r[k]) for r in held_out for k in ("chosen", "rejected")]
    (tmp / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, stdout, err = in_process("score", f"--ckpt={out}/ckpt.pt", f"--data={tmp}/texts.jsonl",
                                   f"--out_dir={tmp}/score")
    assert code == 0, err
    scores = [json.loads(line)["score"] for line in open(tmp / "score" / "scores.jsonl")]
    assert sum(c > r for c, r in zip(scores[::2], scores[1::2])) >= 18
    assert f"{scores[0]:+.4f}" in stdout and read_json(tmp / "score" / "summary.json")["n"] == 40
    # the same numbers as score_texts in-process, from the normalised checkpoint
    model = reward.load_reward_model(os.path.join(out, "ckpt.pt"), "cpu")
    expected = reward.score_texts(model, [r["prompt"] for r in rows], [r["response"] for r in rows], "cpu")
    assert scores == pytest.approx(expected, abs=1e-5)
    # a preference file: both responses of every pair scored, and how often the chosen one wins (same folder, other
    # arguments: the output is replaced)
    code, stdout, err = in_process("score", f"--ckpt={out}/ckpt.pt", f"--data={tmp}/pairs.jsonl", f"--out_dir={tmp}/score")
    assert code == 0, err
    pairs = [json.loads(line) for line in open(tmp / "score" / "scores.jsonl")]
    assert len(pairs) == 201 and {"score_chosen", "score_rejected"} <= set(pairs[0])
    assert pairs[-1]["score_chosen"] == pytest.approx(scores[-2], abs=1e-5)
    accuracy = read_json(tmp / "score" / "summary.json")["accuracy"]
    assert accuracy > 0.9 and f"201 pairs scored, chosen and rejected: the chosen response scores higher in " \
                              f"{accuracy:.1%}" in stdout


def test_reward_kill_and_resume_is_exact(trained, tmp_path):
    _, args, out, _ = trained
    resumed = str(tmp_path / "resumed")
    assert kill_and_resume(args, resumed, kills=2, seed=KILL_SEED) >= 1
    assert read_json(os.path.join(resumed, "summary.json")) == read_json(os.path.join(out, "summary.json"))
    assert all(same_numbers(a, b) for a, b in zip(read_metrics(resumed), read_metrics(out), strict=True))


def test_bad_preference_file_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": " b", "rejected": " c"}\n\n{"prompt": "a", "chosen": " b"}\n')
    p = run_cli("reward", f"--data={bad}", *TINY_MODEL, f"--out_dir={tmp_path}/out", check=False)
    assert p.returncode == 2
    assert p.stderr.startswith(f"error: {bad}:3: ") and p.stderr.count("\n") == 1
    assert "Traceback" not in p.stderr

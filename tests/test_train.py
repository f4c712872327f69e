"""train.py as a user meets it: the CLI, the run folder, SFT learning, sampling, and the reliability promises
(atomic checkpoints, exact resume, safe loading, numerical guards, one-line errors)."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from conftest import ROOT, TINY_MODEL, kill_and_resume, read_json, read_metrics, run_cli

CORPUS_LINES = [f"the film was {w} and the acting was {v} ." for w in ("good", "bad", "fine", "long", "great")
                for v in ("superb", "awful", "plain", "wooden")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(path, "w") as f:
        for i in range(200):
            f.write(json.dumps({"text": CORPUS_LINES[i % len(CORPUS_LINES)]}) + "\n")
    return str(path)


SFT_FAST = [*TINY_MODEL, "--batch_size=8", "--learning_rate=3e-3", "--warmup_iters=5", "--eval_iters=2",
            "--log_interval=5", "--eval_interval=20"]


@pytest.fixture(scope="module")
def sft_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    run_cli("sft", f"--data={corpus}", *SFT_FAST, "--max_iters=60", f"--out_dir={out}")
    return str(out)


def test_sft_lowers_the_loss_and_writes_the_run_folder(sft_run):
    rows = read_metrics(sft_run)
    assert [r["step"] for r in rows] == list(range(5, 61, 5))
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]  # from ~10.8 (uniform over 50k) to well below half
    summary = read_json(os.path.join(sft_run, "summary.json"))
    assert summary["eval/loss"] < 5.0 and summary["step"] == 60  # uniform guessing would be 10.8
    cfg = read_json(os.path.join(sft_run, "config.json"))
    assert cfg["stage"] == "sft" and cfg["n_embd"] == 32
    ckpt = torch.load(os.path.join(sft_run, "ckpt.pt"), weights_only=True)  # only tensors and plain values
    assert ckpt["kind"] == "policy" and ckpt["step"] == 60 and ckpt["model_args"]["n_layer"] == 2


def test_sample_produces_text_from_the_corpus_vocabulary(sft_run, tmp_path):
    run_cli("sample", f"--ckpt={sft_run}/ckpt.pt", "--prompt=the film was", "--num_samples=4",
            "--max_new_tokens=8", "--temperature=0", f"--out_dir={tmp_path}")
    rows = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
    assert len(rows) == 4 and all(r["prompt"] == "the film was" for r in rows)
    words = set(" ".join(CORPUS_LINES).split())
    got = rows[0]["response"].split()
    assert got and sum(w in words for w in got) >= len(got) - 1  # greedy text is made of corpus words


def test_sft_on_prompt_response_pairs_trains_the_response(tmp_path):
    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as f:
        for i in range(64):
            f.write(json.dumps({"prompt": f"question {i % 7}:", "response": " answer yes"}) + "\n")
    run_cli("sft", f"--data={path}", *SFT_FAST, "--learning_rate=1e-2", "--max_iters=40", f"--out_dir={tmp_path}/o")
    rows = read_metrics(tmp_path / "o")
    assert rows[-1]["loss"] < 0.3 * rows[0]["loss"]


def test_help_lists_every_key_with_default(root):
    p = run_cli("sft", "--help")
    for key in ("--batch_size=32", "--learning_rate=", "--max_iters=", "--out_dir=", "--init_from=scratch"):
        assert key in p.stdout
    assert "stages:" in run_cli("--help").stdout


@pytest.mark.parametrize("args, needle", [
    (["--bogus=1"], "unknown key --bogus"),
    (["--learning_rate=fast"], "--learning_rate=fast: expected a number"),
    (["--batch_size=-3"], "--batch_size=-3: must be >= 1"),
    (["--n_embd=30", "--n_head=4"], "--n_embd=30 is not divisible by --n_head=4"),
    (["--data=/nonexistent.jsonl"], "/nonexistent.jsonl: no such file"),
    (["--init_from=/nonexistent.pt"], "/nonexistent.pt: no such checkpoint file"),
])
def test_bad_keys_and_values_give_one_line_errors(args, needle, tmp_path):
    p = run_cli("sft", *args, f"--out_dir={tmp_path}", check=False)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("error:") and needle in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_unknown_stage_is_refused():
    p = run_cli("bogus", check=False)
    assert p.returncode == 2 and "unknown stage 'bogus'" in p.stderr


def test_kill_and_resume_sft_gives_the_same_result(corpus, tmp_path):
    args = ["sft", f"--data={corpus}", *SFT_FAST, "--max_iters=30", "--ckpt_interval=5", "--dropout=0.1"]
    run_cli(*args, f"--out_dir={tmp_path}/straight")
    hits = kill_and_resume(args, str(tmp_path / "killed"), kills=2, seed=1)
    assert hits >= 1
    a, b = read_json(tmp_path / "straight/summary.json"), read_json(tmp_path / "killed/summary.json")
    assert a == b  # bit for bit: every metric, dropout and data order included
    ma, mb = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "killed")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
    assert strip(ma) == strip(mb)  # the log continued with no duplicate and no missing row


def test_sigterm_saves_a_checkpoint_and_resume_finishes(corpus, tmp_path):
    out = tmp_path / "o"
    cmd = [sys.executable, "train.py", "sft", f"--data={corpus}", *SFT_FAST, "--max_iters=100000",
           "--ckpt_interval=100000", f"--out_dir={out}"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, TQDM_DISABLE="1"))
    t0 = time.time()
    while not (out / "metrics.jsonl").exists() and time.time() - t0 < 120:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "--resume" in err
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert step >= 5
    run_cli("sft", f"--data={corpus}", *SFT_FAST, f"--max_iters={step + 5}", "--resume", f"--out_dir={out}")
    assert read_json(out / "summary.json")["step"] == step + 5


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    train.save_checkpoint(path, dict(kind="policy", model={"w": torch.ones(3)}))

    def torn_save(obj, f):  # a kill in the middle of writing: half a file, then death
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(path, dict(kind="policy", model={"w": torch.zeros(3)}))
    assert torch.equal(train.load_checkpoint(path)["model"]["w"], torch.ones(3))  # the old one, intact


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/rlhf-evil-ran",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    if os.path.exists("/tmp/rlhf-evil-ran"):
        os.remove("/tmp/rlhf-evil-ran")
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump(dict(kind="policy", model=Evil()), f)
    p = run_cli("sample", f"--ckpt={path}", f"--out_dir={tmp_path}/o", check=False)
    assert p.returncode == 2 and str(path) in p.stderr and "Traceback" not in p.stderr
    assert "Python objects other than tensors and plain values, which could run code" in p.stderr  # says why
    assert len(p.stderr.strip().splitlines()) == 1
    assert not os.path.exists("/tmp/rlhf-evil-ran")


def test_a_reward_checkpoint_where_a_policy_is_needed_is_refused(tmp_path):
    path = str(tmp_path / "rm.pt")
    train.save_checkpoint(path, dict(kind="reward", model={}, model_args={}))
    p = run_cli("sample", f"--ckpt={path}", f"--out_dir={tmp_path}/o", check=False)
    assert p.returncode == 2 and "a reward checkpoint, but a policy checkpoint is needed" in p.stderr


def test_a_checkpoint_of_another_shape_is_refused(sft_run, tmp_path):
    ckpt = torch.load(os.path.join(sft_run, "ckpt.pt"), weights_only=True)
    ckpt["model_args"]["n_embd"] = 64
    ckpt["model_args"]["n_head"] = 2
    path = str(tmp_path / "other.pt")
    train.save_checkpoint(path, ckpt)
    p = run_cli("sample", f"--ckpt={path}", f"--out_dir={tmp_path}/o", check=False)
    assert p.returncode == 2 and "does not fit the model" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    real = train.sft_loss
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss = real(model, batch)
        return loss * float("nan") if calls["n"] == 13 else loss  # the 13th training step goes bad

    monkeypatch.setattr(train, "sft_loss", poisoned)
    code = train.main(["sft", f"--data={corpus}", *SFT_FAST, "--max_iters=30", "--ckpt_interval=10",
                       "--eval_interval=100", f"--out_dir={out}"])
    err = capsys.readouterr().err
    assert code == 1 and "step 12: loss is nan" in err
    ckpt = train.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == 10 and all(torch.isfinite(v).all() for v in ckpt["model"].values())

"""train.py as a user meets it: the CLI, the run folder, SFT learning, sampling, and the reliability promises
(atomic checkpoints, exact resume, safe loading, numerical guards, one-line errors)."""
import dataclasses
import json
import os
import pickle
import shutil
import signal
import time

import pytest
import torch

import checkpoint
import config
import data
import runtime
import sft
import train
from model import GPT, GPTConfig
from conftest import (ROOT, TINY_MODEL, interrupt_and_resume, kill_and_resume, main_in_process, read_json,
                      read_metrics, run_cli, timeless)

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
def sft_cli(corpus, tmp_path_factory):
    """(run folder, stdout) of a small SFT run, its output redirected as under nohup or CI."""
    out = tmp_path_factory.mktemp("sft")
    p = run_cli("sft", f"--data={corpus}", *SFT_FAST, "--learning_rate=1e-2", "--max_iters=30", f"--out_dir={out}")
    return str(out), p.stdout


@pytest.fixture(scope="module")
def sft_run(sft_cli):
    return sft_cli[0]


def test_sft_lowers_the_loss_and_writes_the_run_folder(sft_run):
    rows = read_metrics(sft_run)
    assert [r["step"] for r in rows] == list(range(5, 31, 5))
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]  # from ~10.8 (uniform over 50k) to well below half
    summary = read_json(os.path.join(sft_run, "summary.json"))
    assert summary["eval/loss"] < 5.0 and summary["step"] == 30  # uniform guessing would be 10.8
    cfg = read_json(os.path.join(sft_run, "config.json"))
    assert cfg["stage"] == "sft" and cfg["n_embd"] == 32
    ckpt = torch.load(os.path.join(sft_run, "ckpt.pt"), weights_only=True)  # only tensors and plain values
    assert ckpt["kind"] == "policy" and ckpt["step"] == 30 and ckpt["model_args"]["n_layer"] == 2


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


def test_help_lists_every_key_with_default(root, in_process):
    code, out, _ = in_process("sft", "--help")
    for key in ("--batch_size=32", "--learning_rate=", "--max_iters=", "--out_dir=", "--init_from=scratch"):
        assert key in out
    # in columns: every description starts at one column (a key too long for it has its description below it)
    starts = {len(line) - len(line[2:].split("  ", 1)[1].lstrip()) for line in out.splitlines()[2:]
              if line.startswith("  --") and "  " in line[2:]}
    assert code == 0 and len(starts) == 1, starts
    assert "stages:" in in_process("--help")[1]


@pytest.mark.parametrize("args, needle", [
    (["--bogus=1"], "unknown key --bogus"),
    (["--learning_rate=fast"], "--learning_rate=fast: expected a number"),
    (["--batch_size=-3"], "--batch_size=-3: must be >= 1"),
    (["--n_embd=30", "--n_head=4"], "--n_embd=30 is not divisible by --n_head=4"),
    (["--data=/nonexistent.jsonl"], "/nonexistent.jsonl: no such file"),
    (["--init_from=/nonexistent.pt"], "/nonexistent.pt: no such checkpoint file"),
])
def test_bad_keys_and_values_give_one_line_errors(args, needle, tmp_path, in_process):
    code, _, err = in_process("sft", *args, f"--out_dir={tmp_path}")
    assert code == 2
    assert err.strip().startswith("error:") and needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_run_stopped_by_bad_data_leaves_no_folder_it_made(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    (tmp_path / "there").mkdir()
    for out in (tmp_path / "new", tmp_path / "there"):  # a folder it made goes; one that was there stays, empty
        p = run_cli("sft", f"--data={bad}", *TINY_MODEL, f"--out_dir={out}", check=False)
        assert p.returncode == 2 and f"{bad}:2:" in p.stderr, p.stderr
        assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "there"]


def test_unknown_stage_is_refused(in_process):
    code, _, err = in_process("bogus")
    assert code == 2 and "unknown stage 'bogus'" in err


RESUMED = ["sft", "--max_iters=12", "--ckpt_interval=2", "--dropout=0.1", *SFT_FAST, "--block_size=32"]  # + --data


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    """An uninterrupted run, for the interrupted ones to end equal to."""
    out = tmp_path_factory.mktemp("straight")
    main_in_process(*RESUMED, f"--data={corpus}", f"--out_dir={out}")
    return out


def test_kill_and_resume_sft_gives_the_same_result(corpus, straight, tmp_path):
    hits = kill_and_resume([*RESUMED, f"--data={corpus}"], str(tmp_path / "killed"), kills=2, seed=1)
    assert hits >= 1
    # bit for bit: every metric, dropout and data order included; the log continued with no duplicate or missing row
    assert read_json(straight / "summary.json") == read_json(tmp_path / "killed/summary.json")
    assert timeless(read_metrics(straight)) == timeless(read_metrics(tmp_path / "killed"))


def test_ctrl_c_then_the_printed_command_resumes_the_run_it_names(corpus, straight, tmp_path, in_process):
    """Stopped with Ctrl-C, a run on the user's own data prints `python train.py sft --resume --out_dir=X`; that
    command alone takes every key from X/config.json and ends where the uninterrupted run ends. A key that would change
    the run is refused on --resume, naming it; more steps are taken and recorded as a change at the step the run
    resumed from, the keys it started with left as they were."""
    out = tmp_path / "stopped"
    hint, _ = interrupt_and_resume([*RESUMED, f"--data={corpus}"], str(out))
    assert hint == f"python train.py sft --resume --out_dir={out}"
    assert read_json(out / "summary.json") == read_json(straight / "summary.json")
    assert timeless(read_metrics(out)) == timeless(read_metrics(straight))
    started = read_json(out / "config.json")
    assert started == read_json(straight / "config.json") | dict(out_dir=str(out))
    for key in ("--learning_rate=5e-3", "--batch_size=16", "--seed=4", f"--data={corpus},{corpus}"):
        code, _, err = in_process("sft", "--resume", f"--out_dir={out}", key)
        assert one_line_error(code, err) and f"--resume: {key.split('=')[0]}=" in err and "differs" in err, err
    code, _, err = in_process("sft", "--resume", f"--out_dir={out}", "--max_iters=10")
    assert one_line_error(code, err) and "--max_iters=10 is below step 12" in err
    assert in_process("sft", "--resume", f"--out_dir={out}", "--max_iters=17", "--log_interval=1")[0] == 0
    config_json = read_json(out / "config.json")
    assert {k: v for k, v in config_json.items() if k != "changes"} == started  # the past is not rewritten
    assert config_json["changes"] == [dict(step=12, max_iters=[12, 17], log_interval=[5, 1])]
    assert read_json(out / "summary.json")["step"] == 17
    assert [r["step"] for r in read_metrics(out)][-6:] == [12, 13, 14, 15, 16, 17]
    # finished, its optimizer state dropped (as the pipeline does): the weights stay, a resume is one line
    size, weights = os.path.getsize(out / "ckpt.pt"), torch.load(out / "ckpt.pt", weights_only=True)["model"]
    checkpoint.drop_resume_state(str(out / "ckpt.pt"))
    dropped = torch.load(out / "ckpt.pt", weights_only=True)
    assert dropped["optimizer"] is None and os.path.getsize(out / "ckpt.pt") < size / 2
    assert all(torch.equal(dropped["model"][k], w) for k, w in weights.items())
    code, _, err = in_process("sft", "--resume", f"--out_dir={out}", "--max_iters=20")
    assert one_line_error(code, err) and "without its optimizer state" in err, err


def test_resume_continues_the_folder_it_names_when_the_run_was_copied(straight, tmp_path, in_process):
    """--resume --out_dir=B on a copy of run A continues B, not the folder A that B's config.json names: A is left
    as it was, and B records where it moved (a change at the step it resumed from)."""
    shutil.copytree(straight, tmp_path / "copy", ignore=shutil.ignore_patterns(".lock"))
    before = os.path.getmtime(straight / "ckpt.pt"), read_json(straight / "summary.json")
    assert in_process("sft", "--resume", f"--out_dir={tmp_path / 'copy'}", "--max_iters=14")[0] == 0
    assert read_json(tmp_path / "copy/summary.json")["step"] == 14
    assert torch.load(tmp_path / "copy/ckpt.pt", weights_only=True)["step"] == 14
    assert (os.path.getmtime(straight / "ckpt.pt"), read_json(straight / "summary.json")) == before
    assert read_json(tmp_path / "copy/config.json")["changes"] == [
        dict(step=12, max_iters=[12, 14], out_dir=[str(straight), str(tmp_path / "copy")])]


def test_the_same_command_again_on_an_unfinished_run_says_it_starts_afresh(corpus, straight, tmp_path, in_process):
    shutil.copytree(straight, tmp_path / "run", ignore=shutil.ignore_patterns(".lock", "summary.json"))
    code, _, err = in_process(*RESUMED, f"--data={corpus}", f"--out_dir={tmp_path / 'run'}")
    assert code == 0 and "held an unfinished run; starting afresh (--resume would have continued it)" in err, err
    assert read_json(tmp_path / "run/summary.json") == read_json(straight / "summary.json")
    assert "held an unfinished run" not in in_process(*RESUMED, f"--data={corpus}", f"--out_dir={tmp_path / 'run'}")[2]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_checkpoint(path, dict(kind="policy", model={"w": torch.ones(3)}))

    def torn_save(obj, f):  # a kill in the middle of writing: half a file, then death
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(path, dict(kind="policy", model={"w": torch.zeros(3)}))
    assert torch.equal(checkpoint.load_checkpoint(path)["model"]["w"], torch.ones(3))  # the old one, intact
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # and no half-written temporary file left beside it


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


def test_a_file_that_is_no_checkpoint_is_told_so(in_process, tmp_path):
    code, _, err = in_process("sample", "--ckpt=assets/imdb-train-sample.jsonl.gz", f"--out_dir={tmp_path}")
    assert one_line_error(code, err) and "imdb-train-sample.jsonl.gz: not a PyTorch checkpoint" in err
    assert "could run code" not in err


def test_a_reward_checkpoint_where_a_policy_is_needed_is_refused(tmp_path, in_process):
    path = str(tmp_path / "rm.pt")
    checkpoint.save_checkpoint(path, dict(kind="reward", model={}, model_args={}))
    code, _, err = in_process("sample", f"--ckpt={path}", f"--out_dir={tmp_path}/o")
    assert code == 2 and "a reward checkpoint, but a policy checkpoint is needed" in err


def test_a_checkpoint_of_another_shape_is_refused(sft_run, tmp_path, in_process):
    ckpt = torch.load(os.path.join(sft_run, "ckpt.pt"), weights_only=True)
    ckpt["model_args"]["n_embd"] = 64
    ckpt["model_args"]["n_head"] = 2
    path = str(tmp_path / "other.pt")
    checkpoint.save_checkpoint(path, ckpt)
    code, _, err = in_process("sample", f"--ckpt={path}", f"--out_dir={tmp_path}/o")
    assert code == 2 and "does not fit the model" in err
    assert len(err.strip().splitlines()) == 1


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    real = sft.sft_loss
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss = real(model, batch)
        return loss * float("nan") if calls["n"] == 13 else loss  # the 13th training step goes bad

    monkeypatch.setattr(sft, "sft_loss", poisoned)
    code = train.main(["sft", f"--data={corpus}", *SFT_FAST, "--max_iters=30", "--ckpt_interval=10",
                       "--eval_interval=100", f"--out_dir={out}"])
    err = capsys.readouterr().err
    assert code == 1 and "step 12: loss is nan" in err
    ckpt = checkpoint.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == 10 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


# ----------------------------------------------------------------------------------------------------------------
# the shared API of every stage: optimizer_step, Run.end_step, Run.log, RunConfig / TrainConfig



def one_line_error(code, err):
    return code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_optimizer_step_schedules_clips_and_steps():
    cfg = config.parse_config(sft.SFTConfig, ["--learning_rate=0.1", "--warmup_iters=4", "--grad_clip=1.0"])
    model = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD([dict(params=[model.weight]), dict(params=[model.bias])], lr=123.0)
    for p in model.parameters():
        p.grad = torch.full_like(p, 2.0)  # norm sqrt(8 * 4) = 5.66, clipped to 1
    lr, norm = runtime.optimizer_step(model, opt, cfg, step=1)
    assert lr == runtime.lr_at(1, cfg) == pytest.approx(0.1 * 2 / 5)
    assert all(g["lr"] == lr for g in opt.param_groups)
    assert norm == pytest.approx(8 ** 0.5 * 2)  # the norm before clipping, as logged
    step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert step.norm().item() == pytest.approx(lr * 1.0, rel=1e-5)  # SGD step of the clipped gradient
    assert all(p.grad is None for p in model.parameters())
    cfg.grad_clip = 0.0  # off
    for p in model.parameters():
        p.grad = torch.full_like(p, 2.0)
    before = [p.detach().clone() for p in model.parameters()]
    lr, _ = runtime.optimizer_step(model, opt, cfg, step=1)
    step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert step.norm().item() == pytest.approx(lr * 8 ** 0.5 * 2, rel=1e-5)
    model.weight.grad = torch.full_like(model.weight, float("nan"))
    with pytest.raises(config.TrainingError, match="step 7: grad_norm is nan"):
        runtime.optimizer_step(model, opt, cfg, step=7)


def test_config_split_training_keys_only_in_training_stages():
    run_keys = {f.name for f in dataclasses.fields(config.RunConfig)}
    assert run_keys == {"out_dir", "device", "dtype", "seed", "overwrite", "chat_template"}
    train_keys = {f.name for f in dataclasses.fields(config.TrainConfig)} - run_keys
    assert train_keys == {"compile", "resume", "log_interval", "ckpt_interval", "ckpt_minutes", "grad_checkpoint",
                          "tracker", "snapshot_interval", "snapshot_steps"}
    assert train_keys <= {f.name for f in dataclasses.fields(sft.SFTConfig)}
    assert not train_keys & {f.name for f in dataclasses.fields(sft.SampleConfig)}
    with pytest.raises(config.ConfigError, match="unknown key --resume"):
        config.parse_config(sft.SampleConfig, ["--resume"])


def test_snapshots_every_interval_and_at_listed_steps():
    cfg = config.parse_config(sft.SFTConfig, ["--snapshot_interval=4", "--snapshot_steps=1,2,6"])
    assert [s for s in range(1, 13) if runtime.wants_snapshot(cfg, s)] == [1, 2, 4, 6, 8, 12]
    cfg = config.parse_config(sft.SFTConfig, ["--snapshot_steps=3"])
    assert [s for s in range(1, 13) if runtime.wants_snapshot(cfg, s)] == [3]
    assert not any(runtime.wants_snapshot(sft.SFTConfig(), s) for s in range(1, 13))  # off by default
    for bad in ("5,x", "0", "-2"):
        with pytest.raises(config.ConfigError, match=f"--snapshot_steps={bad}: "):
            config.parse_config(sft.SFTConfig, [f"--snapshot_steps={bad}"])


def test_a_snapshot_keeps_the_weights_alone_in_the_training_dtype_tied_ones_once(tmp_path):
    cfg = config.parse_config(sft.SFTConfig, [f"--out_dir={tmp_path}", "--snapshot_steps=2", "--max_iters=4",
                                              "--dtype=bfloat16"])
    run = runtime.Run(cfg, "sft")
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16))
    run.end_step(2, lambda: run.save(2, model, torch.optim.SGD(model.parameters(), lr=0.1)))
    snap = torch.load(tmp_path / "ckpt-2.pt", weights_only=True)
    assert set(snap) == {"kind", "stage", "step", "model", "model_args"} and snap["step"] == 2
    weights = snap["model"]
    assert all(v.dtype == torch.bfloat16 for v in weights.values() if v.is_floating_point())
    assert weights["lm_head.weight"].data_ptr() == weights["transformer.wte.weight"].data_ptr()
    assert torch.equal(weights["lm_head.weight"], model.lm_head.weight.detach().to(torch.bfloat16))


def test_end_step_saves_on_interval_last_step_time_and_stop(tmp_path, capsys):
    cfg = config.parse_config(sft.SFTConfig, [f"--out_dir={tmp_path}", "--ckpt_interval=3", "--ckpt_minutes=1",
                                              "--max_iters=8"])
    run = runtime.Run(cfg, "sft")
    saved = []
    for done in range(1, 9):
        assert run.end_step(done, lambda: saved.append(done)) is False
    assert saved == [3, 6, 8]
    cfg.max_iters = 100
    run.last_save -= 61  # a minute since the last save: save now, whatever the interval says
    run.end_step(10, lambda: saved.append(10))
    assert saved[-1] == 10
    run.end_step(11, lambda: saved.append(11))
    assert saved[-1] == 10  # and not again right after
    run.stop_requested = True
    assert run.end_step(12, lambda: saved.append(12)) is True
    assert saved[-1] == 12
    assert f"stopped at step 12; continue with: python train.py sft --resume --out_dir={tmp_path}" in \
        capsys.readouterr().err


def test_deferred_checks_run_before_a_log_or_a_checkpoint_and_name_the_first_bad_step(tmp_path):
    run = runtime.Run(sft.SFTConfig(out_dir=str(tmp_path), max_iters=20, ckpt_interval=5), "sft")
    nan, inf = float("nan"), float("inf")
    run.check_later(1, loss=torch.tensor(1.0), grad_norm=torch.tensor(2.0))
    run.check_later(2, loss=torch.tensor(3.0), grad_norm=torch.tensor(nan))
    run.check_later(3, loss=torch.tensor(inf))
    saved = []
    with pytest.raises(config.TrainingError, match="step 2: grad_norm is nan"):
        run.end_step(5, lambda: saved.append(5))
    assert saved == []  # no checkpoint of weights from a bad step
    with pytest.raises(config.TrainingError, match="step 6: loss is inf"):  # a number is checked at once
        run.check_later(6, loss=inf)
    run.check_later(7, loss=torch.tensor(0.5), grad_norm=0.25)
    run.end_step(10, lambda: saved.append(10))
    assert saved == [10] and run.unchecked == []
    run.check_later(11, loss=torch.tensor(-inf))
    with pytest.raises(config.TrainingError, match="step 11: loss is -inf"):
        run.log(11, loss=0.0)
    assert not os.path.exists(run.metrics_path)  # the row of a bad step is not written


def test_log_prints_a_line_when_stderr_is_not_a_terminal_and_always_for_held_out_metrics(tmp_path, capsys):
    run = runtime.Run(sft.SFTConfig(out_dir=str(tmp_path)), "sft")
    run.log(5, loss=3.14159265, lr=torch.tensor(6e-4), grad_norm=float("nan"))
    out = capsys.readouterr().out  # captured: stderr is not a terminal here
    assert out.startswith("step 5: loss 3.142 lr 0.0006 grad_norm None ms_per_step ")
    rows = read_metrics(tmp_path)
    assert rows[0].pop("ms_per_step") > 0
    assert rows == [dict(step=5, loss=3.14159265, lr=pytest.approx(6e-4), grad_norm=None)]
    # held-out metrics are printed on the evaluation step's line, however many metrics come before them
    run.log(10, **{f"m{i}": float(i) for i in range(8)}, **{"eval/accuracy": 0.75})
    line = capsys.readouterr().out.strip()
    assert line.startswith("step 10: m0 0 m1 1") and line.endswith("eval/accuracy 0.75") and "m7" not in line


def test_sft_prints_progress_when_output_is_redirected(sft_cli):
    lines = [line for line in sft_cli[1].splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == [f"step {s}" for s in range(5, 31, 5)]
    assert all(" loss " in line and " lr " in line for line in lines)


# ----------------------------------------------------------------------------------------------------------------
# the run folder: a lock, no silent reuse of another run's folder, one-line errors

def test_a_busy_run_folder_is_refused(tmp_path):
    import fcntl
    with open(tmp_path / ".lock", "a") as f:  # another run holds the folder
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        p = run_cli("sample", "--ckpt=assets/sft-imdb-cpu.pt", f"--out_dir={tmp_path}", check=False)
    assert one_line_error(p.returncode, p.stderr) and f"--out_dir={tmp_path} is in use by another run" in p.stderr
    assert not (tmp_path / "config.json").exists()


def test_a_folder_of_another_stage_or_config_needs_overwrite(tmp_path):
    out = str(tmp_path / "o")
    os.makedirs(out)
    data.write_json(os.path.join(out, "config.json"), dict(stage="reward", out_dir=out))
    checkpoint.save_checkpoint(os.path.join(out, "ckpt.pt"), dict(kind="reward", model={}))
    checkpoint.save_checkpoint(os.path.join(out, "ckpt-5.pt"), dict(kind="reward", model={}))
    cfg = sft.SFTConfig(out_dir=out)
    with pytest.raises(config.ConfigError, match=f"--out_dir={out} holds a reward run; add --overwrite"):
        runtime.Run(cfg, "sft")
    assert read_json(os.path.join(out, "config.json"))["stage"] == "reward"  # untouched
    run = runtime.Run(dataclasses.replace(cfg, overwrite=True), "sft")
    assert read_json(os.path.join(out, "config.json"))["stage"] == "reward"  # nothing written before the first row
    run.log(1, loss=1.0)
    assert read_json(os.path.join(out, "config.json"))["stage"] == "sft"
    assert sorted(os.listdir(out)) == [".lock", "config.json", "metrics.jsonl"]  # nothing of the other run is left
    runtime.Run(cfg, "sft")  # the same stage and config runs again
    with pytest.raises(config.ConfigError, match=r"holds a run with another config \(--seed\)"):
        runtime.Run(dataclasses.replace(cfg, seed=7), "sft")
    # keys that only say how a run is logged, checkpointed or restarted make no other run
    runtime.Run(dataclasses.replace(cfg, log_interval=3, ckpt_interval=7, ckpt_minutes=0.5), "sft")
    with pytest.raises(config.ConfigError, match=r"another config \(--max_iters\)"):
        runtime.Run(dataclasses.replace(cfg, max_iters=3), "sft")
    # a folder older than a key (its config.json lacks it): the key's default is what that run did
    stored = read_json(os.path.join(out, "config.json"))
    data.write_json(os.path.join(out, "config.json"), {k: v for k, v in stored.items() if k != "dropout"})
    runtime.Run(cfg, "sft")
    with pytest.raises(config.ConfigError, match=r"another config \(--dropout\)"):
        runtime.Run(dataclasses.replace(cfg, dropout=0.1), "sft")


def test_sampling_and_scoring_again_with_other_arguments_replace_their_output(tmp_path, in_process):
    out = tmp_path / "sample"
    for prompt in ("The movie", "I hated"):
        code, stdout, err = in_process("sample", "--ckpt=assets/sft-imdb-cpu.pt", f"--prompt={prompt}",
                                       "--max_new_tokens=3", "--num_samples=1", f"--out_dir={out}")
        assert code == 0, err
        rows = [json.loads(line) for line in open(out / "samples.jsonl")]
        assert [r["prompt"] for r in rows] == [prompt]
    # a folder of another stage is still not replaced without --overwrite: its checkpoint stays
    data.write_json(tmp_path / "config.json", dict(stage="sft", out_dir=str(tmp_path)))
    (tmp_path / "ckpt.pt").write_bytes(b"not to be lost")
    code, _, err = in_process("sample", "--ckpt=assets/sft-imdb-cpu.pt", "--max_new_tokens=3", f"--out_dir={tmp_path}")
    assert one_line_error(code, err) and "holds a sft run; add --overwrite" in err
    assert (tmp_path / "ckpt.pt").read_bytes() == b"not to be lost"


def test_a_run_that_failed_before_its_first_step_leaves_nothing_that_refuses_the_corrected_run(tmp_path, corpus,
                                                                                            in_process):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    out = tmp_path / "run"
    code, _, err = in_process("sft", f"--data={bad}", *SFT_FAST, "--max_iters=1", f"--out_dir={out}")
    assert one_line_error(code, err) and f"{bad}:2: bad JSON" in err
    assert not (out / "config.json").exists()
    code, _, err = in_process("sft", f"--data={corpus}", *SFT_FAST, "--max_iters=1", f"--out_dir={out}")
    assert code == 0, err


def test_no_run_writes_into_the_folder_of_a_checkpoint_it_reads(tmp_path, in_process):
    """The rejection-sampling command as it used to be written (sft from out/sft/ckpt.pt into out/sft) is refused,
    with or without --overwrite, and the model it reads is left as it was."""
    src = tmp_path / "sft"
    os.makedirs(src)
    shutil.copy("assets/sft-imdb-cpu.pt", src / "ckpt.pt")
    before = (src / "ckpt.pt").read_bytes()
    selected = tmp_path / "selected.jsonl"
    selected.write_text(json.dumps({"prompt": "a", "response": " film"}) + "\n")
    for extra in ([], ["--overwrite"]):
        code, _, err = in_process("sft", f"--init_from={src}/ckpt.pt", f"--data={selected}", f"--out_dir={src}",
                                  *extra)
        assert one_line_error(code, err) and f"--init_from={src}/ckpt.pt lies inside --out_dir={src}" in err
    assert (src / "ckpt.pt").read_bytes() == before


def test_unwritable_or_empty_out_dir_is_one_line(tmp_path, in_process, monkeypatch):
    code, _, err = in_process("sample", "--out_dir=")
    assert one_line_error(code, err) and "--out_dir is empty" in err
    (tmp_path / "file").write_text("x")
    code, _, err = in_process("sample", f"--out_dir={tmp_path}/file/run")  # a file where a folder should be
    assert one_line_error(code, err) and "cannot write the run folder" in err

    def read_only(path, obj):  # tests run as root, where chmod does not stop writes: fake the read-only folder
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(runtime, "write_json", read_only)
    code, _, err = in_process("sample", "--ckpt=assets/sft-imdb-cpu.pt", "--max_new_tokens=2", "--num_samples=1",
                              f"--out_dir={tmp_path}/ro")
    assert one_line_error(code, err) and f"--out_dir={tmp_path}/ro: cannot write the run folder (Permission " \
                                          f"denied)" in err


# ----------------------------------------------------------------------------------------------------------------
# checkpoints: a full disk, a signal during the write, non-finite weights

def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_the_old_one(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_checkpoint(path, dict(kind="policy", model={"w": torch.ones(3)}))

    def full_disk(obj, f):
        f.write(b"PK\x03\x04 part of a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(config.TrainingError) as e:
        checkpoint.save_checkpoint(path, dict(kind="policy", model={"w": torch.zeros(3)}))
    assert str(e.value) == f"{path}: writing the checkpoint failed (No space left on device); the previous " \
                           f"checkpoint is left as it was"
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no orphaned temporary file
    monkeypatch.undo()
    assert torch.equal(checkpoint.load_checkpoint(path)["model"]["w"], torch.ones(3))


def test_a_signal_during_a_checkpoint_write_waits_for_the_write(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    real_save = torch.save

    def slow_save(obj, f):  # SIGTERM arrives halfway through the write
        f.write(b"")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        real_save(obj, f)

    def on_term(signum, frame):  # as a Run's handler does on a second signal
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        monkeypatch.setattr(torch, "save", slow_save)
        with pytest.raises(KeyboardInterrupt):  # delivered, but only once the checkpoint is whole
            checkpoint.save_checkpoint(path, dict(kind="policy", model={"w": torch.ones(3)}))
    finally:
        signal.signal(signal.SIGTERM, old)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert torch.equal(checkpoint.load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert signal.getsignal(signal.SIGTERM) is old  # the handlers are back


def test_a_policy_with_non_finite_weights_is_refused(tmp_path, in_process):
    ckpt = torch.load("assets/sft-imdb-cpu.pt", weights_only=True)
    ckpt["model"]["transformer.h.1.mlp.c_fc.weight"][3, 5] = float("nan")
    path = str(tmp_path / "nan.pt")
    checkpoint.save_checkpoint(path, ckpt)
    with pytest.raises(config.ConfigError, match=r"the weight transformer\.h\.1\.mlp\.c_fc\.weight holds NaN"):
        checkpoint.load_policy(path, "cpu")
    code, _, err = in_process("sample", f"--ckpt={path}", f"--out_dir={tmp_path}/o")
    assert one_line_error(code, err) and path in err


# ----------------------------------------------------------------------------------------------------------------
# bad values, block_size from --init_from, stage sample's defaults

def test_an_unknown_device_is_one_line_from_the_command_line(tmp_path, in_process):
    code, _, err = in_process("sft", "--device=tpu", f"--out_dir={tmp_path}")
    assert one_line_error(code, err) and "--device=tpu: expected auto, cpu, cuda, cuda:N" in err
    assert not os.listdir(tmp_path)  # refused before the run folder is touched


@pytest.mark.parametrize("stage, arg, needle", [
    ("sft", "--device=cuda:x", "--device=cuda:x: expected auto, cpu, cuda, cuda:N"),
    ("sft", "--dtype=float8", "--dtype=float8: expected auto, float32"),
    ("sft", "--seed=-1", "--seed=-1: must be >= 0"),
    ("sft", "--dropout=1.5", "--dropout=1.5: must be < 1.0"),
    ("sft", "--dropout=1", "--dropout=1: must be < 1.0"),
    ("sample", "--top_p=0", "--top_p=0: must be > 0.0"),
    ("sample", "--top_p=1.5", "--top_p=1.5: must be <= 1.0"),
    ("sample", "--seed=-5", "--seed=-5: must be >= 0"),
])
def test_bad_values_are_one_line(stage, arg, needle, tmp_path, in_process):
    code, _, err = in_process(stage, arg, f"--out_dir={tmp_path}/o")
    assert one_line_error(code, err) and needle in err
    assert not os.path.exists(tmp_path / "o")  # found when parsing, before a run folder is made


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_an_unavailable_device_is_one_line(tmp_path, in_process):
    code, _, err = in_process("sft", "--device=mps", f"--out_dir={tmp_path}")
    assert one_line_error(code, err) and "--device=mps: MPS is not available" in err
    if not torch.cuda.is_available():
        code, _, err = in_process("sft", "--device=cuda:1", f"--out_dir={tmp_path}")
        assert one_line_error(code, err) and "CUDA is not available" in err


def test_sft_init_from_takes_block_size_from_the_checkpoint(sft_run, corpus, tmp_path, in_process):
    base = ["sft", f"--init_from={sft_run}/ckpt.pt", f"--data={corpus}", "--batch_size=2", "--max_iters=1",
            "--eval_iters=1", "--warmup_iters=0"]
    assert in_process(*base, f"--out_dir={tmp_path}/a")[0] == 0
    assert read_json(tmp_path / "a/config.json")["block_size"] == 64  # the checkpoint's, not 256
    assert in_process(*base, "--block_size=32", f"--out_dir={tmp_path}/b")[0] == 0  # smaller is fine
    code, _, err = in_process(*base, "--block_size=128", f"--out_dir={tmp_path}/c")
    assert one_line_error(code, err) and "--block_size=128 exceeds the checkpoint's block_size=64" in err
    assert not os.path.exists(tmp_path / "c")


def test_sample_defaults_work_on_the_shipped_model_and_long_prompts_are_cut(tmp_path, in_process):
    code, out, err = in_process("sample", "--ckpt=assets/sft-imdb-cpu.pt", "--num_samples=1", "--prompt=" + "x" * 5000,
                                f"--out_dir={tmp_path}")
    assert code == 0, err
    assert len(out) < 2000 and "4,800 more characters" in out  # not the 5000-character prompt, twice
    row = json.loads(open(tmp_path / "samples.jsonl").readline())
    assert row["prompt"] == "x" * 5000 and row["tokens"] <= 32  # the file keeps it whole; half of block_size 64
    code, _, err = in_process("sample", "--ckpt=assets/sft-imdb-cpu.pt", "--max_new_tokens=64",
                              f"--out_dir={tmp_path}/big")
    assert one_line_error(code, err) and "(use --max_new_tokens=32 or less)" in err


def test_no_references_to_documents_users_do_not_have():
    import re
    text = open(os.path.join(ROOT, "train.py")).read()
    assert not re.search(r"notes #\d|N\+ #\d|N\+ details, #\d|RLHF_NOTES", text)


def test_layers_no_file_imports_train_and_no_import_goes_round_in_a_circle():
    """The house's layers: train.py on top, imported by no file; every other import points down (no circle), and
    every file stays readable in one sitting (ppo.py about 500 lines, none above about 600)."""
    import ast
    modules = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    imports = {}
    for m in modules:
        tree = ast.parse(open(os.path.join(ROOT, f"{m}.py")).read())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imports[m] = names & modules - {m}
    assert not [m for m, names in imports.items() if "train" in names]
    order, seen = [], set()

    def visit(m, path):
        assert m not in path, f"import circle: {' -> '.join(path + [m])}"
        if m not in seen:
            for n in sorted(imports[m]):
                visit(n, path + [m])
            seen.add(m)
            order.append(m)
    for m in sorted(modules):
        visit(m, [])
    lines = {m: sum(1 for _ in open(os.path.join(ROOT, f"{m}.py"))) for m in modules}
    assert lines["ppo"] <= 520 and max(lines.values()) <= 620, lines

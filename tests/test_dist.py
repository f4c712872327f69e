"""Several processes under torchrun, on the CPU with gloo (2 processes, as CI runs them): sft and dpo give the loss
curve of one process with the same global batch; a 2-process dpo run stopped by SIGTERM to the launcher resumes
under torchrun and still gives that curve; a 2-process ppo run works and rank 0 alone writes its run folder; each
process reads its own share of a batch, without overlap.

Each torchrun launch costs a few seconds of start-up (three Python processes importing torch), so the file runs five
launches of tiny models (1 layer, 32 wide) for a few steps; the reward, dpo and ppo ones run in the background from
the start of the session, after the tiny pipeline's story (torchrun_story, conftest.py's STORIES)."""
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import dist
import checkpoint
import config
import runtime
import pipeline
import train
import conftest
from conftest import ROOT, child_env, main_in_process, read_metrics, run_cli
from model import GPT, GPTConfig
from test_reward import write_synthetic

TOL = dict(rel=1e-4, abs=1e-5)  # float32 sums taken in another order (per process, then over processes)


def torchrun(*args, nproc=2, wait=True):
    """python -m torch.distributed.run --nproc_per_node=2 train.py ARGS (one thread per process, as CI's cores)."""
    env = child_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           "train.py", *map(str, args)]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    if not wait:
        return p
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, f"{cmd} exited {p.returncode}:\n{out[-3000:]}\n{err[-3000:]}"
    return out


def curve(out_dir, key="loss"):
    rows = read_metrics(out_dir)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))  # one row per step: rank 0 alone logs
    return [r[key] for r in rows]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_files(tmp_path_factory.mktemp("dist"))


def tiny_files(d):
    """A 1-layer, 32-wide random policy checkpoint, preference pairs, prompt/response pairs, a reward function.
    Its weights come from a generator of its own: torchrun_story makes it in a background thread, where a draw from
    (or a seeding of) the global generator would change the random stream of a run in the main thread."""
    with torch.device("meta"):  # no draws at all
        m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32))
    m, g = m.to_empty(device="cpu"), torch.Generator().manual_seed(0)
    m.lm_head.weight = m.transformer.wte.weight  # tied again (to_empty makes a tensor per parameter)
    with torch.no_grad():
        for name, p in m.named_parameters():  # N(0, 0.02) as GPT's, drawn from g (c_proj unscaled)
            p.copy_(torch.ones_like(p) if "ln" in name and name.endswith("weight") else torch.zeros_like(p)
                    if name.endswith("bias") else torch.randn(p.shape, generator=g) * 0.02)
    checkpoint.save_checkpoint(str(d / "policy.pt"), dict(kind="policy", stage="sft", step=0, model=m.state_dict(),
                                                     optimizer=None, model_args=dataclasses.asdict(m.config),
                                                     config={}, rng=runtime.rng_state()))
    rng = random.Random(0)
    with open(d / "sft.jsonl", "w") as f:  # responses of different lengths: the per-token weighting matters
        for _ in range(200):
            words = " ".join(rng.choice(["good", "bad", "film", "plot", "long"]) for _ in range(rng.randint(1, 8)))
            f.write(json.dumps(dict(prompt=rng.choice(["The movie", "A film", "It"]), response=" " + words)) + "\n")
    (d / "reward_fn.py").write_text("def goods(prompts, responses):\n"
                                    "    return [float(r.count(' good')) for r in responses]\n")
    (d / "prompts.txt").write_text("\n".join(f"Prompt number {i}:" for i in range(40)) + "\n")
    return dict(dir=d, policy=str(d / "policy.pt"), pairs=write_synthetic(d / "pairs.jsonl", 120),
                sft=str(d / "sft.jsonl"), reward=f"{d / 'reward_fn.py'}:goods", prompts=str(d / "prompts.txt"))


# ----------------------------------------------------------------------------------------------------------------
# shares of a batch (pure: torchrun's environment set by hand)

@pytest.mark.parametrize("n,world", [(16, 2), (7, 2), (5, 3), (1, 2)])
def test_each_process_reads_its_own_share_without_overlap(monkeypatch, n, world):
    items, seen = list(range(100, 100 + n)), []
    monkeypatch.setenv("WORLD_SIZE", str(world))
    for r in range(world):
        monkeypatch.setenv("RANK", str(r))
        parts = dist.micro_batches(items, 2)
        assert all(0 < len(p) <= 2 for p in parts)
        mine = [x for p in parts for x in p]
        assert mine == dist.my_share(items) and len(mine) in (n // world, -(-n // world))
        seen += mine
    assert seen == items  # every item once, in order: contiguous shares
    monkeypatch.setenv("RANK", "1")
    assert dist.rank_seed(7, 3) != dist.rank_seed(7, 3, 0)  # ranks draw from streams of their own


# ----------------------------------------------------------------------------------------------------------------
# the same loss curve for 1 and 2 processes

def test_sft_two_processes_give_the_loss_curve_of_one(tiny, tmp_path):
    args = ["sft", f"--data={tiny['sft']}", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
            "--batch_size=10", "--max_iters=6", "--learning_rate=3e-3", "--warmup_iters=0", "--log_interval=1",
            "--eval_interval=1000", "--eval_iters=1", "--device=cpu"]
    main_in_process(*args, "--micro_batch_size=3", f"--out_dir={tmp_path / 'one'}")  # accumulation: 3 + 3 + 3 + 1
    torchrun(*args, f"--out_dir={tmp_path / 'two'}")
    one, two = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert two == pytest.approx(one, **TOL)
    assert curve(tmp_path / "two", "grad_norm") == pytest.approx(curve(tmp_path / "one", "grad_norm"), **TOL)
    assert one[-1] < one[0]  # it learned something, so the curves are not flat by accident


# enough that the SIGTERM lands before the end: at 14 a loaded CI machine once finished them all first; at 40 the
# test failed once more under the full suite on 2 cores (its values unrecorded), so the story now tries again when
# the run finished before the signal, and the assertion shows the values
DPO_STEPS = 40


def torchrun_story(tmp):
    """Run in the background (conftest.py): a one-process reward run and the same under torchrun; a one-process dpo
    run, and the same under torchrun where the launcher gets SIGTERM after its first step and passes it on, then
    the printed command's resume under torchrun; a 2-process ppo run. Returns what each left."""
    tiny, story = tiny_files(tmp), {}
    args = ["reward", f"--data={tiny['pairs']}", f"--init_from={tiny['policy']}", "--batch_size=9", "--max_iters=6",
            "--learning_rate=3e-3", "--warmup_iters=0", "--log_interval=1", "--eval_interval=1000", "--device=cpu"]
    run_cli(*args, "--micro_batch_size=4", f"--out_dir={tmp / 'reward1'}")
    torchrun(*args, f"--out_dir={tmp / 'reward2'}")
    story["reward"] = {n: dict(loss=curve(tmp / f"reward{n}"), grad_norm=curve(tmp / f"reward{n}", "grad_norm"))
                       for n in (1, 2)}
    args = ["dpo", f"--data={tiny['pairs']}", f"--init_from={tiny['policy']}", "--batch_size=9",
            f"--max_iters={DPO_STEPS}",
            "--learning_rate=3e-3", "--warmup_iters=0", "--log_interval=1", "--eval_interval=1000", "--device=cpu"]
    run_cli(*args, "--micro_batch_size=4", f"--out_dir={tmp / 'one'}")
    two = tmp / "two"
    for _ in range(3):  # a loaded machine may finish every step before the signal lands: then again, from scratch
        shutil.rmtree(two, ignore_errors=True)
        p = torchrun(*args, f"--out_dir={two}", wait=False)
        t0 = time.time()
        while p.poll() is None and not (two / "metrics.jsonl").exists() and time.time() - t0 < 120:
            time.sleep(0.02)
        os.kill(p.pid, signal.SIGTERM)
        _, err = p.communicate(timeout=120)
        story["dpo"] = dict(two=two, returncode=p.returncode, err=err, rows_when_stopped=len(read_metrics(two)),
                            stopped=torch.load(two / "ckpt.pt", weights_only=True)["step"])
        if story["dpo"]["stopped"] < DPO_STEPS:
            break
    torchrun(*args, f"--out_dir={two}", "--resume")
    story["dpo"].update(one=curve(tmp / "one"), one_accuracy=curve(tmp / "one", "rewards/accuracies"),
                        resumed=curve(two), resumed_accuracy=curve(two, "rewards/accuracies"),
                        summary=json.loads((two / "summary.json").read_text()))
    out_dir = tmp / "ppo"
    out = torchrun("ppo", f"--init_from={tiny['policy']}", f"--reward={tiny['reward']}", f"--prompts={tiny['prompts']}",
                   f"--eval_prompts={tiny['prompts']}", "--eval_iters=1", "--max_new_tokens=6", "--temperature=1.0",
                   "--batch_size=8", "--minibatch_size=4", "--micro_batch_size=2", "--num_epochs=2", "--max_iters=3",
                   "--learning_rate=3e-3", "--whiten_rewards", "--no_eos_rule=keep", "--eval_interval=100",
                   "--device=cpu", f"--out_dir={out_dir}")
    story["ppo"] = dict(out_dir=out_dir, stdout=out)
    return story


@pytest.fixture(scope="module")
def launched():
    return conftest.background_result("launched")


def test_dpo_two_processes_killed_and_resumed_give_the_loss_curve_of_one(launched):
    """The 2-process run gets SIGTERM (to the launcher, which passes it on) after its first step, saves, stops,
    and resumes under torchrun; its whole curve is still the one-process curve."""
    s = launched["dpo"]
    assert s["returncode"] != 0, "the run finished before it was stopped: nothing was tested"
    assert 1 <= s["stopped"] < DPO_STEPS and s["rows_when_stopped"] == s["stopped"], \
        (s["stopped"], s["rows_when_stopped"], s["err"][-2000:])
    assert f"continue with: torchrun --nproc_per_node=2 train.py dpo --resume --out_dir={s['two']}" in s["err"], \
        s["err"][-2000:]
    assert s["resumed"] == pytest.approx(s["one"], **TOL)
    assert s["resumed_accuracy"] == pytest.approx(s["one_accuracy"], **TOL)
    assert s["one"][-1] < s["one"][0]
    assert s["summary"]["step"] == DPO_STEPS


def test_reward_two_processes_give_the_loss_curve_of_one(launched):
    one, two = launched["reward"][1], launched["reward"][2]
    assert two["loss"] == pytest.approx(one["loss"], **TOL)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], **TOL)
    assert one["loss"][-1] < one["loss"][0]


# ----------------------------------------------------------------------------------------------------------------
# the overlapped gradient sum against the plain one

def _grad_sum_process(rank, store):
    import torch.distributed as tdist
    os.environ.update(RANK=str(rank), WORLD_SIZE="2")
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)  # the same weights on both processes; each its own data
    model = torch.nn.ModuleDict(dict(gpt=GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8)),
                                     unused=torch.nn.Linear(3, 3)))  # reached by no loss below but the last
    data = [torch.randint(0, 100, (3, 8), generator=torch.Generator().manual_seed(10 * r + i)) for r in range(2)
            for i in range(2)]  # process r's two micro-batches: data[2r], data[2r + 1]
    loss = lambda x: model["gpt"](x[:, :-1], x[:, 1:])[1]
    expected = [torch.autograd.grad(sum(loss(x) for x in data), p, allow_unused=True)[0]
                for p in model.parameters()]  # both processes' micro-batches in one process
    opt = type("Optimizer", (), {})()
    opt.grad_sum = gs = dist.GradSum(model, bucket_numel=500)  # many buckets
    assert len(gs.buckets) > 5
    for step in range(3):  # the first sums at the end (and learns what the loss reaches); the others overlap
        for x in dist.accumulate(data[2 * rank:2 * rank + 2], opt):
            loss(x).backward()
        assert len(gs.works) == (len(gs.buckets) if step else 0)  # every bucket started during the last backward
        gs.finish(model)
        for p, e in zip(model.parameters(), expected):
            assert (p.grad is None) if e is None else torch.allclose(p.grad, e, rtol=1e-5, atol=1e-6)
            p.grad = None
    for x in dist.accumulate(data[2 * rank:2 * rank + 1], opt):  # a loss that reaches a parameter the first did not
        try:
            (loss(x) + model["unused"].weight.sum()).backward()
            raise AssertionError("no error")
        except config.TrainingError as e:  # one line naming the parameter
            assert str(e).startswith("parameter unused.weight got a gradient")
    model.zero_grad(set_to_none=True)
    for x in dist.accumulate(data[2 * rank:2 * rank + 1], opt):  # two backward passes in the last micro-batch
        loss(x).backward()  # its sums start now, without the second pass's part: an error, not a wrong sum
        try:
            loss(x).backward()
            raise AssertionError("no error")
        except config.TrainingError as e:
            assert "got a second gradient" in str(e)
    for _, _, work in gs.works:
        work.wait()
    tdist.destroy_process_group()


def test_overlapped_gradient_sum_is_the_sum_of_every_process_micro_batch(tmp_path):
    """GradSum on 2 gloo processes with two micro-batches each: the gradients after finish() are those of all four
    micro-batches' loss in one process, with the sum started during the last backward (after the first step) and a
    parameter no loss reaches left without a gradient; a later loss that reaches it is an error, not a wrong sum,
    and so is a second backward pass in the last micro-batch, whose part the started sums would miss."""
    torch.multiprocessing.spawn(_grad_sum_process, args=(str(tmp_path / "store"),), nprocs=2)


# ----------------------------------------------------------------------------------------------------------------
# ppo: each process samples its share; rank 0 alone writes

def test_ppo_two_processes_run_and_rank0_alone_writes(launched):
    out_dir, out = launched["ppo"]["out_dir"], launched["ppo"]["stdout"]
    assert sorted(os.listdir(out_dir)) == [".lock", "ckpt.pt", "config.json", "metrics.jsonl", "samples.jsonl",
                                           "summary.json"]
    rows = read_metrics(out_dir)  # the evaluation at step 0, then one row per step (and the last evaluation)
    assert [r["step"] for r in rows if "objective/scores" in r] == [1, 2, 3]
    assert [r["step"] for r in rows if "eval/score" in r] == [0, 3]
    assert rows[-1]["episodes"] == 24  # both processes' samples count
    steps = [r for r in rows if "objective/scores" in r]
    assert all(r["time/grad_sum_s"] > 0 and r["time/update_s"] > 0 for r in steps)  # the sums timed on their own
    assert out.count("step 2: ") == 1 and out.count("done: ") == 1  # rank 0 alone prints
    assert len(open(out_dir / "samples.jsonl").readlines()) == 8  # rank 0's evaluation: eval_iters x batch_size
    ckpt = torch.load(out_dir / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["critic"] is not None


# ----------------------------------------------------------------------------------------------------------------
# what stays one process: the pipeline hands whole sub-runs to GPUs instead

def test_one_process_stages_refuse_torchrun_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train.main(["plot", "--run=nowhere"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: stage plot runs in one process") and err.count("\n") == 1


def test_pipeline_gpus_go_to_the_least_busy(monkeypatch):
    s = pipeline.Queue()
    assert s.pick_gpu() is None  # without --gpus the sub-runs keep the environment's GPUs
    s.gpus = ["0", "1"]
    busy = lambda gpu: type("P", (), dict(gpu=gpu))()
    assert s.pick_gpu() == "0"
    s.procs = dict(a=busy("0"))
    assert s.pick_gpu() == "1"
    s.procs.update(b=busy("1"), c=busy("1"))
    assert s.pick_gpu() == "0"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = pipeline.PipelineConfig(gpus="1,0", device="auto")
    assert pipeline.check_gpus(cfg) == ["1", "0"]
    with pytest.raises(config.ConfigError, match="not a GPU"):
        pipeline.check_gpus(pipeline.PipelineConfig(gpus="0,2"))
    with pytest.raises(config.ConfigError, match="--device=auto or cuda"):
        pipeline.check_gpus(pipeline.PipelineConfig(gpus="0", device="cpu"))

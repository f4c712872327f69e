"""dpo.py: each loss against its closed form, sequence log-probs against a slow reference, the reference cache
against on-the-fly log-probs, and stage `dpo` run as a user would (learning, exact resume, bad files)."""
import gzip
import math
import os
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import config
import data as data_lib
import dpo
import reward
from conftest import ROOT, child_env, interrupt_and_resume, main_in_process, read_json, read_metrics, run_cli
from data import EOS
from reward import pair_batch
from test_reward import same_numbers, write_policy, write_synthetic

CTX = nullcontext()


def logsig(x):
    return -math.log1p(math.exp(-x))


# ----------------------------------------------------------------------------------------------------------------
# the loss, on hand-made numbers

def test_dpo_cdpo_and_reference_free_closed_forms_and_gradient_signs():
    pc = torch.tensor([-10.0, -12.0], requires_grad=True)
    pr = torch.tensor([-11.0, -10.0], requires_grad=True)
    rc, rr, beta = torch.tensor([-10.5, -11.0]), torch.tensor([-10.5, -11.0]), 0.5
    h = [(-10.0 + 10.5) - (-11.0 + 10.5), (-12.0 + 11.0) - (-10.0 + 11.0)]  # [1.0, -2.0]
    losses, chosen_r, rejected_r = dpo.preference_loss(pc, pr, rc, rr, beta)
    assert losses.tolist() == pytest.approx([-logsig(beta * x) for x in h])
    assert chosen_r.tolist() == pytest.approx([0.25, -0.5]) and rejected_r.tolist() == pytest.approx([-0.25, 0.5])
    assert not chosen_r.requires_grad and not rejected_r.requires_grad
    losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent raises chosen, lowers rejected
    eps = 0.2  # conservative DPO: the expected DPO loss under labels flipped with probability eps
    cdpo, _, _ = dpo.preference_loss(pc, pr, rc, rr, beta, label_smoothing=eps)
    assert cdpo.tolist() == pytest.approx([-(1 - eps) * logsig(beta * x) - eps * logsig(-beta * x) for x in h])
    free, chosen_f, _ = dpo.preference_loss(pc, pr, rc, rr, beta, reference_free=True)
    assert free.tolist() == pytest.approx([-logsig(beta * 1.0), -logsig(beta * -2.0)])  # h = logp_c - logp_r
    assert chosen_f.tolist() == pytest.approx(chosen_r.tolist())


def test_ipo_closed_form_and_minimum_at_one_over_two_beta():
    beta = 0.25
    h = torch.linspace(-2, 6, 801, requires_grad=True)  # policy chosen logp = h, everything else 0
    zeros = torch.zeros_like(h)
    losses, _, _ = dpo.preference_loss(h, zeros, zeros, zeros, beta, ipo=True)
    torch.testing.assert_close(losses, (h.detach() - 2.0) ** 2)
    assert h[losses.argmin()].item() == pytest.approx(1 / (2 * beta), abs=1e-4)
    losses.sum().backward()
    assert (h.grad[h.detach() < 2] < 0).all() and (h.grad[h.detach() > 2] > 0).all()


def test_unlikelihood_closed_form_gradient_signs_and_alpha_zero_is_sft():
    # per-token log-probs of 2 pairs, 3 positions; the second chosen response and the first rejected are 2 tokens
    pc = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -3.0, 0.0]], requires_grad=True)
    pr = torch.tensor([[-0.1, -4.0, 0.0], [-1.5, -0.7, -2.5]], requires_grad=True)
    mc = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    mr = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    alpha = 0.3
    log_not = lambda lp: math.log(1 - math.exp(lp))  # log(1 - p)
    want = [(1.0 + 2.0 + 0.5) / 3 - alpha * (log_not(-0.1) + log_not(-4.0)) / 2,
            (0.2 + 3.0) / 2 - alpha * (log_not(-1.5) + log_not(-0.7) + log_not(-2.5)) / 3]
    losses = dpo.unlikelihood_loss(pc, pr, mc, mr, alpha)
    assert losses.tolist() == pytest.approx(want)
    losses.sum().backward()
    assert (pc.grad[mc > 0] < 0).all() and (pr.grad[mr > 0] > 0).all()  # descent: chosen up, rejected down
    assert (pc.grad[mc == 0] == 0).all() and (pr.grad[mr == 0] == 0).all()  # nothing off the responses
    # alpha 0: the SFT loss on the chosen responses (sft.sft_loss's per-token mean, pair by pair)
    sft = dpo.unlikelihood_loss(pc.detach(), pr.detach(), mc, mr, 0.0)
    assert sft.tolist() == pytest.approx([3.5 / 3, 3.2 / 2])
    # a rejected token the policy is sure of (p = 1) gives a large but finite loss
    assert torch.isfinite(dpo.unlikelihood_loss(pc.detach(), torch.zeros(2, 3), mc, mr, 1.0)).all()


# ----------------------------------------------------------------------------------------------------------------
# sequence log-probs and the reference

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo_tiny")
    data = write_synthetic(tmp / "pairs.jsonl", 40, long_pairs=1)
    path, model = write_policy(tmp / "policy.pt")
    rows, _ = reward.load_pairs(data, 0, 64)
    return model.eval(), rows


@torch.no_grad()
def test_sequence_logps_sum_response_tokens_only(tiny):
    model, rows = tiny
    idx = [0, 3, 7]  # pair 0 is truncated (no EOS), the others end in EOS
    logps = dpo.pair_logps(model, pair_batch(rows, idx, "cpu"), CTX)  # (2, 3)
    for j, i in enumerate(idx):
        prompt, *responses = rows[i]
        assert i == 0 or (prompt[0] == EOS and responses[0][-1] == EOS)
        for k, response in enumerate(responses):  # slow reference: one unpadded row, a full forward pass
            logits, _ = model(torch.tensor([prompt + response]))
            lp = F.log_softmax(logits[0, len(prompt) - 1:-1], -1).gather(1, torch.tensor(response)[:, None]).sum()
            assert logps[k, j].item() == pytest.approx(lp.item(), abs=1e-4)


@torch.no_grad()
def test_policy_equal_to_reference_gives_log2_and_zero_margins(tiny):
    model, rows = tiny
    logps = dpo.pair_logps(model, pair_batch(rows, range(8), "cpu"), CTX)
    losses, chosen_r, rejected_r = dpo.preference_loss(logps[0], logps[1], logps[0], logps[1], beta=0.1)
    torch.testing.assert_close(losses, torch.full((8,), math.log(2)))
    assert (chosen_r == 0).all() and (rejected_r == 0).all()
    assert dpo.dpo_metrics(losses, chosen_r, rejected_r, *logps)["rewards/margins"] == 0


@torch.no_grad()
def test_reference_cache_equals_on_the_fly_logps(tiny):
    model, rows = tiny
    cache = dpo.reference_logps(model, rows, 16, "cpu", CTX)  # (N, 2), in dataset order
    assert cache.shape == (len(rows), 2)
    for step in range(4):  # training batches: shuffled, padded to other lengths
        idx = data_lib.epoch_indices(len(rows), step, 6, 5, 10 ** 6)
        # equal up to float rounding: other padding changes the order of the sums
        torch.testing.assert_close(dpo.pair_logps(model, pair_batch(rows, idx, "cpu"), CTX), cache[idx].T, rtol=1e-5,
                                   atol=1e-4)


@pytest.mark.parametrize("args, match", [(["--data="], "--data"), (["--loss=kto"], "--loss=kto"), (["--loss=cdpo"], "label_smoothing"),
                                         (["--label_smoothing=0.1"], "cdpo only"),
                                         (["--loss=cdpo", "--label_smoothing=0.5"], r"\(0, 0.5\)"),
                                         (["--beta=0"], "--beta=0"), (["--reference_free", "--ref=x.pt"], "--ref"),
                                         (["--loss=unlikelihood", "--ref=x.pt"], "unlikelihood uses no reference"),
                                         ([f"--ref_cache_file={ROOT}"], "--ref_cache_file=.* is a folder")])
def test_bad_configs_name_the_key(args, match):
    with pytest.raises(config.ConfigError, match=match):
        dpo.check_config(config.parse_config(dpo.DPOConfig, ["--data=pairs.jsonl", *args]))


# ----------------------------------------------------------------------------------------------------------------
# stage dpo, run as a user would

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo")
    data = write_synthetic(tmp / "pairs.jsonl", 120, long_pairs=1)
    policy, _ = write_policy(tmp / "policy.pt")
    args = ["dpo", f"--data={data}", f"--init_from={policy}", "--batch_size=8", "--max_iters=6",
            "--learning_rate=3e-3", "--warmup_iters=0", "--eval_interval=3", "--log_interval=3", "--ckpt_interval=2"]
    out = str(tmp / "run")
    return tmp, args, out, main_in_process(*args, f"--out_dir={out}")[1]


def test_dpo_stage_learns_marker_preference(trained):
    _, _, out, stdout = trained
    assert "1 of 121 pairs were longer than block_size=64 and were truncated" in stdout
    s = read_json(os.path.join(out, "summary.json"))
    assert s["eval/rewards/accuracies"] > 0.9 and s["eval/rewards/margins"] > 0 and s["eval/loss"] < math.log(2)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [3, 6]
    names = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected"}
    assert names <= set(rows[-1]) and {f"eval/{k}" for k in names} <= set(rows[-1])
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]


def test_reference_on_the_fly_gives_the_same_numbers(trained, tmp_path):
    _, args, out, _ = trained
    main_in_process(*args, "--ref_cache=false", f"--out_dir={tmp_path}/nocache")
    cached, fly = read_json(os.path.join(out, "summary.json")), read_json(tmp_path / "nocache" / "summary.json")
    assert fly.keys() == cached.keys()
    for k in cached:
        assert fly[k] == pytest.approx(cached[k], rel=1e-4, abs=1e-5), k


def test_runs_sharing_a_reference_cache_file_end_as_runs_with_their_own(trained, tmp_path):
    """--ref_cache_file, as the pipeline's DPO runs of a replicate use it: of two runs started at once, one computes
    the reference's log-probs and writes them, the other waits for the file's lock and reads them, and both end
    exactly as a run that computed its own; a run at another beta reads them too. Other pairs are computed again."""
    tmp, args, out, _ = trained
    shared = tmp_path / "made" / "reference_logps.pt"  # its folder made as needed
    procs = [subprocess.Popen([sys.executable, "train.py", *args, f"--ref_cache_file={shared}",
                               f"--out_dir={tmp_path / f'at_once{i}'}"], cwd=ROOT, env=child_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for i in range(2)]
    said = sorted(line for p in procs for line in p.communicate(timeout=120)[0].splitlines() if "log-probs:" in line)
    assert said == [f"reference log-probs: read from {shared}", f"reference log-probs: written to {shared}"], said
    summary = lambda folder: read_json(os.path.join(folder, "summary.json"))
    assert summary(tmp_path / "at_once0") == summary(tmp_path / "at_once1") == summary(out)
    run = lambda name, *extra: main_in_process(*args, *extra, "--max_iters=1", f"--out_dir={tmp_path / name}")[1]
    assert f"reference log-probs: read from {shared}" in run("beta", f"--ref_cache_file={shared}", "--beta=0.5")
    other = write_synthetic(tmp_path / "other.jsonl", 40, seed=1)
    stdout = run("other_pairs", f"--ref_cache_file={shared}", f"--data={other}")
    assert f"reference log-probs: written to {shared} (its stamp differed)" in stdout
    # the stamp holds the reference's bytes: other weights of the same size, written over it with its old times
    # (a copy that kept them), are computed again
    ref, _ = write_policy(tmp_path / "ref.pt", seed=1)
    assert "(its stamp differed)" in run("ref_a", f"--ref_cache_file={shared}", f"--ref={ref}")
    st, size = os.stat(ref), os.path.getsize(ref)
    write_policy(ref, seed=2)
    os.utime(ref, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.path.getsize(ref) == size
    checkpoint._sha.clear()  # as in a new process (each sub-run is one): the hashes are memoised by size and time
    assert "(its stamp differed)" in run("ref_b", f"--ref_cache_file={shared}", f"--ref={ref}")
    # a file that is not such a cache (the policy's checkpoint, named by mistake) is refused, not replaced
    policy = next(a.split("=", 1)[1] for a in args if a.startswith("--init_from="))
    before = open(policy, "rb").read()
    with pytest.raises(AssertionError, match=f"exited 2:(?s:.*)error: --ref_cache_file={policy}: a file that is not a "
                                             f"cache of reference log-probs; refusing to replace it") as failed:
        main_in_process(*args, f"--ref_cache_file={policy}", f"--out_dir={tmp_path / 'mistake'}")
    assert "Traceback" not in str(failed.value)
    assert open(policy, "rb").read() == before


def test_dpo_ctrl_c_then_the_printed_command_ends_where_an_uninterrupted_run_ends(trained, tmp_path):
    """The hint is `python train.py dpo --resume --out_dir=...` alone: the data, beta, batch and steps come from the
    run's config.json."""
    _, args, out, _ = trained
    resumed = str(tmp_path / "resumed")
    hint, _ = interrupt_and_resume(args, resumed)
    assert hint == f"python train.py dpo --resume --out_dir={resumed}"
    assert read_json(os.path.join(resumed, "summary.json")) == read_json(os.path.join(out, "summary.json"))
    assert all(same_numbers(a, b) for a, b in zip(read_metrics(resumed), read_metrics(out), strict=True))


def test_unlikelihood_stage_learns_and_keeps_snapshots(trained, tmp_path):
    """--loss=unlikelihood on the marker pairs: the held-out loss falls and the chosen response gains on the
    rejected one (its log-prob minus the rejected's, the logged rewards/margins; it stays negative in 6 steps from a
    random model, as the chosen response is one token longer); with --snapshot_interval the weights of steps 2 and 4
    are kept beside the final checkpoint, and load as policies."""
    _, args, _, _ = trained
    out = tmp_path / "ul"
    main_in_process(*args, "--loss=unlikelihood", "--alpha=0.5", "--snapshot_interval=2", f"--out_dir={out}")
    first, last = read_metrics(out)
    assert last["eval/loss"] < first["eval/loss"] and last["eval/rewards/margins"] > first["eval/rewards/margins"]
    assert last["eval/logps/chosen"] == last["eval/rewards/chosen"]  # no reference: the rewards are the log-probs
    assert sorted(f.name for f in out.glob("ckpt-*.pt")) == ["ckpt-2.pt", "ckpt-4.pt"]  # step 6 is ckpt.pt
    snap = torch.load(out / "ckpt-4.pt", weights_only=True)
    assert snap["step"] == 4 and "optimizer" not in snap and "rng" not in snap
    policy, _ = checkpoint.load_policy(str(out / "ckpt-4.pt"), "cpu")
    final, _ = checkpoint.load_policy(str(out / "ckpt.pt"), "cpu")
    assert any((a != b).any() for a, b in zip(policy.state_dict().values(), final.state_dict().values()))


def test_bad_preference_file_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress(b'{"prompt": "a", "chosen": " b", "rejected": " c"}\n{"prompt": "a", "chosen": 1, '
                                  b'"rejected": " c"}\n'))
    policy, _ = write_policy(tmp_path / "policy.pt")
    p = run_cli("dpo", f"--data={bad}", f"--init_from={policy}", f"--out_dir={tmp_path}/out", check=False)
    assert p.returncode == 2
    assert p.stderr.startswith(f"error: {bad}:2: 'chosen' must be a string") and p.stderr.count("\n") == 1
    assert "Traceback" not in p.stderr

"""The pipeline on your own data (own_data.py): every accepted format gives the same inputs, the whole pipeline on a
tiny set (a failing method leaves the others; DPO alone needs no reward model), and bad input in one line."""
import contextlib
import io
import json
import os
import shutil
import types

import pytest
import torch

import own_data
import pipeline
import train
from checkpoint import load_policy
from data import load_preferences, read_jsonl
from imdb import SFT_CPU_PATH

WORDS = "good great fine bad awful nice movie film story the a was is very".split()


def questions(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [f"Is the {' '.join(WORDS[i] for i in torch.randint(0, len(WORDS), (4,), generator=g))} one?"
            for _ in range(n)]


def write_pairs(path, fmt, qs):
    """The same pairs (chosen ' yes, very good', rejected ' no, awful') in one of the four pair formats."""
    rows = []
    for i, q in enumerate(qs):
        prompt, chosen, rejected = f"\n\nHuman: {q}\n\nAssistant:", "yes, very good", "no, awful"
        if fmt == "separate":
            rows.append(dict(prompt=prompt, chosen=" " + chosen, rejected=" " + rejected))
        elif fmt == "dialogue":
            rows.append(dict(chosen=f"{prompt} {chosen}", rejected=f"{prompt} {rejected}"))
        elif fmt == "messages":
            rows.append({k: [dict(role="user", content=q), dict(role="assistant", content=r)]
                         for k, r in (("chosen", chosen), ("rejected", rejected))})
        else:  # Vertex AI: choice picks the chosen candidate
            a, b = (chosen, rejected) if i % 2 else (rejected, chosen)
            rows.append(dict(input_text=prompt, candidate_0=" " + a, candidate_1=" " + b, choice=1 - i % 2))
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def splits_of(tmp_path, name, n_eval=100, **kw):
    cfg = types.SimpleNamespace(**{k: kw.get(k, "") for k in own_data.OWN_KEYS}, out_dir=str(tmp_path / name),
                                overwrite=False)
    paths = own_data.make_splits(cfg, dict(n_eval_prompts=n_eval))
    rows = {k: [r for _, r in read_jsonl(p)] for k, p in paths.items() if p.endswith(".jsonl") and k != "sft"}
    rows["pairs_eval_files"] = json.load(open(paths["pairs_eval_files"]))
    return rows, paths["sft"]


def test_every_pair_format_gives_the_same_pairs_and_the_same_splits(tmp_path):
    qs = questions(30)
    splits = {}
    for fmt in ("separate", "dialogue", "messages", "vertex"):
        path = write_pairs(tmp_path / f"{fmt}.jsonl", fmt, qs)
        assert load_preferences(path) == load_preferences(str(tmp_path / "separate.jsonl")), fmt
        splits[fmt] = splits_of(tmp_path, fmt, preferences=path)[0]
        assert splits[fmt].pop("pairs_eval_files") == [[path, 3]]
    assert all(s == splits["separate"] for s in splits.values())
    rows = splits["separate"]
    held = [r["prompt"] for r in rows["prompts_eval"]]
    assert held == [f"\n\nHuman: {q}\n\nAssistant:" for q in qs[-3:]]  # the last 10%, held out
    assert [r["prompt"] for r in rows["pairs_eval"]] == held and len(rows["pairs_train"]) == 27
    assert [r["prompt"] for r in rows["prompts_train"]] == [r["prompt"] for r in rows["pairs_train"]]


def test_no_step_trains_on_a_held_out_prompt(tmp_path):
    """A prompt that comes back in an early pair, in --prompts and in --sft_data is held out of all three; with two
    files each gives its last 10%; --eval_preferences and --eval_prompts are held out the same way."""
    a, b = questions(20, 4), questions(10, 5)
    late = f"\n\nHuman: {a[-2]}\n\nAssistant:"
    pa = write_pairs(tmp_path / "a.jsonl", "separate", a + [a[-2]])  # a[-2]'s two pairs are not adjacent
    pb = write_pairs(tmp_path / "b.jsonl", "dialogue", b)
    with open(tmp_path / "p.jsonl", "w") as f:
        f.writelines(json.dumps(dict(prompt=p)) + "\n" for p in ("fresh prompt", late))
    with open(tmp_path / "sft.jsonl", "w") as f:
        f.writelines(json.dumps(dict(prompt=p, response=" yes")) + "\n" for p in ("fresh prompt", late))
    rows, sft = splits_of(tmp_path, "two", preferences=f"{pa},{pb}", prompts=str(tmp_path / "p.jsonl"),
                          sft_data=str(tmp_path / "sft.jsonl"))
    held = {r["prompt"] for r in rows["prompts_eval"]}
    assert held == {late, f"\n\nHuman: {a[-1]}\n\nAssistant:", f"\n\nHuman: {b[-1]}\n\nAssistant:"}
    assert {r["prompt"] for r in rows["pairs_eval"]} == held and len(rows["pairs_eval"]) == 4  # late's two pairs
    assert rows["pairs_eval_files"] == [[pa, 3], [pb, 1]]  # in pairs_eval's order, for the accuracy per file
    with open(tmp_path / "two" / "splits" / "pairs_eval_files.json", "w") as f:  # an older folder's form: remade
        json.dump({pa: 3, pb: 1}, f)
    assert splits_of(tmp_path, "two", preferences=f"{pa},{pb}", prompts=str(tmp_path / "p.jsonl"),
                     sft_data=str(tmp_path / "sft.jsonl"))[0]["pairs_eval_files"] == [[pa, 3], [pb, 1]]
    assert not held & {r["prompt"] for r in rows["pairs_train"]} and len(rows["pairs_train"]) == 27
    assert [r["prompt"] for r in rows["prompts_train"]] == ["fresh prompt"]
    assert sft.endswith("sft.jsonl") and sft != str(tmp_path / "sft.jsonl")
    assert [r["prompt"] for _, r in read_jsonl(sft)] == ["fresh prompt"]
    # given held-out files: their prompts leave the training pairs too
    held_file = write_pairs(tmp_path / "held.jsonl", "separate", a[:2])
    (tmp_path / "e.txt").write_text(a[5] + "\n")
    rows, sft = splits_of(tmp_path, "given", preferences=pa, eval_preferences=held_file,
                          eval_prompts=str(tmp_path / "e.txt"))
    assert [r["prompt"] for r in rows["prompts_eval"]] == [a[5]] and len(rows["pairs_eval"]) == 2
    assert len(rows["pairs_train"]) == 21 - 2 and sft == ""  # less a[0], a[1] (a[5] is no pair's prompt)
    assert rows["pairs_eval_files"] == [[held_file, 2]]


def test_reward_accuracy_per_file_counts_each_files_own_pairs(tmp_path, monkeypatch):
    """Two files of held-out pairs, a reward that prefers the longer response: the accuracy of each file is the
    share of its own pairs whose chosen response is the longer (a tie counts as wrong), the overall one of all."""
    pa = write_pairs(tmp_path / "a.jsonl", "separate", questions(20, 1))  # chosen " yes, very good": longer
    rows = [dict(prompt=f"q{i}", chosen=" a" * (i % 3 + 1), rejected=" a a") for i in range(20)]  # right: i % 3 == 2
    with open(tmp_path / "b.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    cfg = {**dict.fromkeys(own_data.OWN_KEYS, ""), "preferences": f"{pa},{tmp_path / 'b.jsonl'}"}
    splits = own_data.make_splits(types.SimpleNamespace(**cfg, overwrite=False, out_dir=str(tmp_path / "run")),
                                  dict(n_eval_prompts=10))
    monkeypatch.setattr(own_data.reward, "pair_scores", lambda model, rows, device, ctx, batch_size: torch.tensor(
        [[len(r[1]) for r in rows], [len(r[2]) for r in rows]]))  # tokens of chosen, rejected
    model = types.SimpleNamespace(config=types.SimpleNamespace(block_size=64))
    evaluate = types.SimpleNamespace(reward_model=lambda path: model, ctx=contextlib.nullcontext(), device="cpu")
    got = own_data.reward_accuracy(evaluate, "rm.pt", splits, 8)
    assert got["a.jsonl"][0] == 1.0 and got["a.jsonl"][2] == 2  # the last 2 of 20 prompts
    assert got["b.jsonl"][0] == 0.0 and got["b.jsonl"][2] == 2  # q18 shorter, q19 a tie
    assert got["all"][:3:2] == [0.5, 4] and got["all"][1][0] < 0.5 < got["all"][1][1]
    text = own_data.accuracy_text(got)
    assert text.startswith("0.500 [") and text.endswith("of 2)") and "; b.jsonl 0.000 [0.000, " in text
    # held-out files given as a, all, a: a's pairs from both places count as a's; a file named "all" is not the total
    shutil.copy(tmp_path / "b.jsonl", tmp_path / "all")
    cfg.update(preferences=write_pairs(tmp_path / "c.jsonl", "separate", questions(20, 3)),
               eval_preferences=f"{pa},{tmp_path / 'all'},{pa}")
    splits = own_data.make_splits(types.SimpleNamespace(**cfg, overwrite=False, out_dir=str(tmp_path / "given")),
                                  dict(n_eval_prompts=10))
    got = own_data.reward_accuracy(evaluate, "rm.pt", splits, 8)
    assert got["a.jsonl"][::2] == [1.0, 40] and got[str(tmp_path / "all")][::2] == [0.3, 20]
    assert got["all"][2] == 60 and got["all"][0] == pytest.approx(46 / 60)
    with open(splits["pairs_eval_files"], "w") as f:  # counts that do not match the pairs: refused, not misread
        json.dump([[pa, 59]], f)
    with pytest.raises(own_data.TrainingError, match="60 pairs read back"):
        own_data.reward_accuracy(evaluate, "rm.pt", splits, 8)
    assert own_data.accuracy_text(None, failed=True) == "none (the reward model's run failed)"


def test_bag_of_words_reference_learns_which_words_win_and_nothing_of_the_prompt(tmp_path):
    """words.jsonl: the chosen response always holds ' yes' (the reference gets every held-out pair right); asked.jsonl:
    the prompt says which of ' yes' and ' no' wins, alternately, which no weighting of words can follow: whatever it
    learns, one kind of pair is right and the other wrong, so at most half of the balanced held-out pairs."""
    words = write_pairs(tmp_path / "words.jsonl", "separate", questions(40, 6))
    with open(tmp_path / "asked.jsonl", "w") as f:
        for i in range(40):
            yes = i % 2 == 0
            f.write(json.dumps(dict(prompt=f"Say {'yes' if yes else 'no'}, {i}:", chosen=" yes" if yes else " no",
                                    rejected=" no" if yes else " yes")) + "\n")
    cfg = {**dict.fromkeys(own_data.OWN_KEYS, ""), "preferences": f"{words},{tmp_path / 'asked.jsonl'}"}
    splits = own_data.make_splits(types.SimpleNamespace(**cfg, overwrite=False, out_dir=str(tmp_path / "run")),
                                  dict(n_eval_prompts=10))
    got = own_data.bag_of_words(splits)
    assert got["words.jsonl"][::2] == [1.0, 4] and got["asked.jsonl"][2] == 4 and got["asked.jsonl"][0] <= 0.5
    assert got["all"][2] == 8


def test_win_rate_counts_ties_half_and_its_interval_holds_it():
    rows = lambda xs: [dict(proxy=x) for x in xs]  # noqa: E731
    rate, (lo, hi) = own_data.win_rate(rows([1, 2, 3, 0]), rows([0, 2, 4, -1]))
    assert rate == (1 + 0.5 + 0 + 1) / 4 and 0 <= lo < rate < hi <= 1
    rate, (lo, hi) = own_data.win_rate(rows([5, 5]), rows([1, 1]))  # Wilson's: n / (n + z^2) at n of n
    assert rate == hi == 1.0 and lo == pytest.approx(2 / (2 + 1.96 ** 2))
    rate, (lo, hi) = own_data.win_rate(rows([1] * 50 + [-1] * 50), rows([0] * 100))
    assert rate == 0.5 and lo == pytest.approx(1 - hi) and 0.40 < lo < 0.41  # about 0.5 -+ 1.96 * 0.05


PROMPTS = questions(20, 2)  # the RL prompts
JUDGE = "def letters(prompts, responses):\n    return [float(sum(c.isalpha() for c in r)) for r in responses]\n"
QS = questions(36) + ["Is <b>this</b> & that good?"] + questions(3, 6)  # the first held out shows the escaping


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """own-tiny on Vertex AI pairs, {messages} SFT data and .txt prompts: PPO (with its reward model), DPO, and an
    IPO run whose held-out pairs are a bad file, so that it fails in its sub-run."""
    d = tmp_path_factory.mktemp("own")
    prefs = write_pairs(d / "pairs.jsonl", "vertex", QS)
    with open(d / "sft.jsonl", "w") as f:
        for q in questions(20, 1):
            f.write(json.dumps(dict(messages=[dict(role="user", content=q),
                                              dict(role="assistant", content="yes, very good")])) + "\n")
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (d / "bad.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": \n')
    (d / "judge.py").write_text(JUDGE)
    real = own_data.jobs_of

    def with_a_bad_ipo_run(*args):
        jobs, *rest = real(*args)
        return [(s, o, a + [f"--eval_data={d / 'bad.jsonl'}"] if "ipo" in o else a) for s, o, a in jobs], *rest
    own_data.jobs_of = with_a_bad_ipo_run
    try:  # in this process (its sub-runs are children), as conftest.main_in_process, which expects success
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = train.main(["pipeline", "--preset=own-tiny", f"--preferences={prefs}", f"--sft_data={d}/sft.jsonl",
                               f"--init_from={SFT_CPU_PATH}", f"--prompts={d}/prompts.txt", "--methods=ppo,dpo,ipo",
                               f"--gold={d}/judge.py:letters", f"--out_dir={d}/run"])
    finally:
        own_data.jobs_of = real
    return code, err.getvalue(), d / "run"


def test_a_failing_method_leaves_the_others_reported_and_the_best_exported(tiny_pipeline):
    code, err, out = tiny_pipeline
    assert code == 1 and "1 sub-run failed" in err and "ipo_beta0.1_seed1" in err
    report = json.load(open(out / "results.json"))
    assert list(report["failed"]) == ["runs/ipo_beta0.1_seed1"] and "bad.jsonl:3" in report["failed"][
        "runs/ipo_beta0.1_seed1"]
    pol = report["policies"]
    assert set(pol) == {"sft", "ppo_beta0.05_seed1", "dpo_beta0.1_seed1"}
    assert pol["sft"]["kl"] == 0 and 0 <= report["reward_accuracy"] <= 1
    assert report["reward_accuracy_by_file"]["all"][2] == 4  # the 4 held-out pairs, of one file
    # scored again in the report, as in the reward stage's own evaluation
    assert report["reward_accuracy"] == json.load(open(out / "reward" / "summary.json"))["eval/accuracy"]
    # the report's prompts: those of the held-out pairs (the last 10%); the RL runs train on the .txt file's
    held = [r["prompt"] for _, r in read_jsonl(out / "splits" / "prompts_eval.jsonl")]
    assert held == [f"\n\nHuman: {q}\n\nAssistant:" for q in QS[-4:]] and report["n_eval_prompts"] == 4
    assert [r["prompt"] for _, r in read_jsonl(out / "splits" / "prompts_train.jsonl")] == PROMPTS
    for name in ("ppo_beta0.05_seed1", "dpo_beta0.1_seed1"):  # the win rate, recomputed from the stored samples
        mine, sft = ([r["proxy"] for _, r in read_jsonl(out / "samples" / f"{n}.jsonl")] for n in (name, "sft"))
        want = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(mine, sft)) / len(sft)
        assert pol[name]["win_rate"] == pytest.approx(want)
        assert pol[name]["win_interval"][0] <= want <= pol[name]["win_interval"][1]
    assert pol["dpo_beta0.1_seed1"]["implicit_accuracy"] is not None and "implicit_accuracy" not in pol["sft"]
    # --gold's judge: each policy's mean score and its win rate against SFT, recounted from the stored samples
    letters = lambda name: [sum(c.isalpha() for c in r["response"])  # noqa: E731
                            for _, r in read_jsonl(out / "samples" / f"{name}.jsonl")]
    for name in ("sft", "ppo_beta0.05_seed1", "dpo_beta0.1_seed1"):
        assert pol[name]["gold"] == pytest.approx(sum(letters(name)) / len(letters(name)))
    for name in ("ppo_beta0.05_seed1", "dpo_beta0.1_seed1"):
        want = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(letters(name), letters("sft"))) / 4
        assert pol[name]["gold_win_rate"] == pytest.approx(want)
    # the best: by the gold judge's win rate where there is one
    best = max(("ppo_beta0.05_seed1", "dpo_beta0.1_seed1"), key=lambda n: (pol[n]["gold_win_rate"], -pol[n]["kl"]))
    assert report["best"] == best and sorted(os.listdir(out / "best")) == ["config.json", "model.safetensors"]
    md, page = (out / "results.md").read_text(), (out / "side_by_side.html").read_text()
    assert "| runs/ipo_beta0.1_seed1 |" in md and f"**{best}**" in md and (out / "frontier.png").exists()
    assert "<td>\n\nHuman: Is &lt;b&gt;this&lt;/b&gt; &amp; that good?\n\nAssistant:</td>" in page
    assert page.count("<tr>") == 1 + 2 and page.count("<th>") == 1 + 3  # prompt + the 3 policies; 2 prompts


def test_the_exported_best_policy_loads_in_transformers_with_our_logits(tiny_pipeline):
    transformers = pytest.importorskip("transformers")
    out = tiny_pipeline[2]
    best = json.load(open(out / "results.json"))["best"]
    ours = load_policy(str(out / "runs" / best / "ckpt.pt"), "cpu")[0].eval()
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(out / "best")).eval()
    ids = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)[0]).abs().max() < 1e-4


def test_dpo_alone_needs_no_reward_model(tmp_path, in_process):
    """HH dialogues, held-out pairs in another format, no SFT data: DPO from --init_from, judged without a reward
    model (no reward, no win rate), the best by implicit-reward accuracy."""
    prefs = write_pairs(tmp_path / "hh.jsonl", "dialogue", questions(24))
    held = write_pairs(tmp_path / "held.jsonl", "messages", questions(6, 3))
    code, out, err = in_process("pipeline", "--preset=own-tiny", f"--preferences={prefs}",
                                f"--eval_preferences={held}", f"--init_from={SFT_CPU_PATH}", "--methods=dpo",
                                f"--out_dir={tmp_path}/run")
    assert code == 0, err
    report = json.load(open(tmp_path / "run" / "results.json"))
    assert not (tmp_path / "run" / "reward").exists() and not (tmp_path / "run" / "sft").exists()
    assert report["reward_accuracy"] is None and report["best"] == "dpo_beta0.1_seed1"
    text = (tmp_path / "run" / "results.md").read_text()
    assert "accuracy on held-out pairs: none (no reward model); a bag-of-words reference's" in text
    assert report["bag_of_words_accuracy_by_file"]["all"][2] == len(load_preferences(held))
    dpo = report["policies"]["dpo_beta0.1_seed1"]
    assert dpo["proxy"] is None and "win_rate" not in dpo and 0 <= dpo["implicit_accuracy"] <= 1 and dpo["kl"] > 0
    assert (tmp_path / "run" / "best" / "model.safetensors").exists()


def test_an_unknown_preset_names_every_preset_of_both_pipelines(tmp_path, in_process):
    code, _, err = in_process("pipeline", "--preset=nope", f"--out_dir={tmp_path}")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert all(name in err for name in [*own_data.PRESETS, *pipeline.PRESETS]), err
    assert all(name in in_process("pipeline", "--help")[1] for name in own_data.PRESETS)


@pytest.mark.parametrize("case", ["missing", "one_pair", "bad_line", "imdb_preset", "no_policy", "empty_prompts",
                                  "imdb_option", "no_pairs", "bad_gold"])
def test_bad_input_is_one_line_naming_the_file(tmp_path, in_process, case):
    prefs = write_pairs(tmp_path / "p.jsonl", "separate", questions(10))
    args = [f"--preferences={prefs}", f"--init_from={SFT_CPU_PATH}", f"--out_dir={tmp_path}/run",
            "--preset=own-tiny"]
    want = {"missing": f"--sft_data: {tmp_path}/nope.jsonl: no such file",
            "one_pair": "1 preference pair of 1 distinct prompt; the held-out rule",
            "bad_line": f"{tmp_path}/b.jsonl:2:",
            "imdb_preset": "--preset=gpu is an IMDb preset", "no_policy": "give --init_from",
            "empty_prompts": f"{tmp_path}/e.txt: empty file", "imdb_option": "--replicates is an option of the IMDb",
            "no_pairs": "--preferences: no preference pairs given",
            "bad_gold": f"--gold={tmp_path}/judge.py:nope: {tmp_path}/judge.py has no function 'nope'"}[case]
    if case == "missing":
        args.append(f"--sft_data={tmp_path}/nope.jsonl")
    elif case == "one_pair":
        args[0] = "--preferences=" + write_pairs(tmp_path / "one.jsonl", "separate", questions(1))
    elif case == "bad_line":
        (tmp_path / "b.jsonl").write_text(open(prefs).readline() + '{"prompt": "x", "chosen": 3}\n')
        args[0] = f"--preferences={tmp_path}/b.jsonl"
    elif case == "imdb_preset":
        args[3] = "--preset=gpu"
    elif case == "no_policy":
        args[1] = "--init_from="
    elif case == "empty_prompts":
        (tmp_path / "e.txt").write_text("\n")
        args.append(f"--eval_prompts={tmp_path}/e.txt")
    elif case == "imdb_option":
        args.append("--replicates=2")
    elif case == "bad_gold":
        (tmp_path / "judge.py").write_text("def yes(prompts, responses):\n    return [0.0] * len(responses)\n")
        args.append(f"--gold={tmp_path}/judge.py:nope")
    else:  # SFT data alone is your data too, but not enough of it
        args[0] = f"--sft_data={prefs}"
    code, out, err = in_process("pipeline", *args)
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert want in err, err
    assert not os.path.exists(tmp_path / "run" / "config.json")  # nothing to refuse the corrected command


@pytest.mark.skipif(not os.path.exists(own_data.HH.split(",")[0]), reason="no ../shared/data beside the checkout")
def test_the_hh_preset_reads_the_shared_hh_pairs():
    cfg = types.SimpleNamespace(preset="hh-cpu", methods="", **dict.fromkeys(own_data.OWN_KEYS + own_data.IMDB_KEYS,
                                                                           ""))
    preset, methods, inputs = own_data.resolve(cfg)
    assert methods == ["ppo", "dpo", "rloo", "grpo"] and inputs["init_from"] == SFT_CPU_PATH
    pairs = load_preferences(inputs["preferences"], limit=3)
    assert len(pairs) == 6 and all(p.prompt.endswith("Assistant:") and p.chosen != p.rejected for p in pairs)

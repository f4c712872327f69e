"""Tests of imdb.py: the official archive's conversion and download checks, the gold reward (the committed
artifact, its checksum, its accuracy, and its training), the simulated preference labels, the committed SFT model,
and the command line's guards (no default that overwrites a committed asset, one line when offline). The pipeline's
tests are in test_pipeline.py."""

import gzip
import hashlib
import io
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import imdb  # noqa: E402
from conftest import ROOT  # noqa: E402
import checkpoint  # noqa: E402
from data import DataError, load_imdb  # noqa: E402
from sft import encode_corpus, sft_loss  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from checkpoint import load_policy, save_checkpoint  # noqa: E402
from config import ConfigError  # noqa: E402

ASSETS = os.path.join(os.path.dirname(imdb.__file__), "assets")
TRAIN_SAMPLE = os.path.join(ASSETS, "imdb-train-sample.jsonl.gz")
TEST_SAMPLE = os.path.join(ASSETS, "imdb-test-sample.jsonl.gz")
POSITIVE = "This movie was wonderful! A brilliant, moving story with superb acting. I loved it, a true masterpiece."
NEGATIVE = "This movie was awful. A boring, stupid plot and terrible acting. The worst film I have ever wasted time on."
PINNED_IDS = [282258, 392565, 1024177]  # "not", "good", "not good" in 2^20 buckets


# -----------------------------------------------------------------------------
# data

def fake_aclimdb(root):
    """A miniature aclImdb tree: ids out of numeric order, <br /> tags, non-ASCII text."""
    files = {"train/neg/10_2.txt": "Dull.<br /><br />Very dull.", "train/neg/2_4.txt": "Meh",
             "train/neg/1_1.txt": "Bad", "train/pos/0_9.txt": "Très bien — 10/10", "train/unsup/1_0.txt": "u1", "train/unsup/0_0.txt": "u0",
             "test/neg/0_3.txt": "Poor", "test/pos/5_10.txt": "Great", "test/pos/3_7.txt": "Good",
             "train/urls_pos.txt": "not a review"}
    for name, text in files.items():
        os.makedirs(os.path.join(root, os.path.dirname(name)), exist_ok=True)
        with open(os.path.join(root, name), "w", encoding="utf-8") as f:
            f.write(text)
    return files


def read_rows(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_convert_aclimdb_fake_tree(tmp_path):
    fake_aclimdb(tmp_path / "aclImdb")
    imdb.convert_aclimdb(str(tmp_path / "aclImdb"), str(tmp_path / "out"))
    files = imdb.imdb_files(str(tmp_path / "out"))
    train = read_rows(files["train"])
    # neg then pos, each by numeric id (1 < 2 < 10, not "10" < "2"); the text exactly as written
    assert [(r["id"], r["rating"], r["label"]) for r in train] == [(1, 1, 0), (2, 4, 0), (10, 2, 0), (0, 9, 1)]
    assert train[2]["text"] == "Dull.<br /><br />Very dull." and train[3]["text"] == "Très bien — 10/10"
    assert [(r["id"], r["label"]) for r in read_rows(files["test"])] == [(0, 0), (3, 1), (5, 1)]
    assert [(r["id"], r["rating"], r["label"], r["text"]) for r in read_rows(files["unsup"])] == \
        [(0, 0, -1, "u0"), (1, 0, -1, "u1")]
    assert load_imdb(files["train"])[2]["text"] == "Dull.\n\nVery dull."  # the project's loader reads it, cleaned
    # the same tree gives the same bytes (no timestamp in the gzip header)
    first = open(files["train"], "rb").read()
    imdb.convert_aclimdb(str(tmp_path / "aclImdb"), str(tmp_path / "out"))
    assert open(files["train"], "rb").read() == first


def test_convert_and_files_errors(tmp_path):
    (tmp_path / "aclImdb" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="train/neg: no such folder"):
        imdb.convert_aclimdb(str(tmp_path / "aclImdb"), str(tmp_path / "out"))
    with pytest.raises(DataError, match=r"train\.jsonl\.gz: no such file.*imdb\.py download"):
        imdb.imdb_files(str(tmp_path / "nowhere"))


def fake_archive(tmp_path):
    fake_aclimdb(tmp_path / "src" / "aclImdb")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        t.add(tmp_path / "src" / "aclImdb", arcname="aclImdb")
    return buf.getvalue()


def test_download_checks_then_converts(tmp_path, monkeypatch):
    archive = fake_archive(tmp_path)
    monkeypatch.setattr(imdb.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(archive))
    # the real archive's size and sha256: this one is refused, and nothing is written
    with pytest.raises(DataError, match="sha256"):
        imdb.download_imdb(str(tmp_path / "a"))
    assert os.listdir(tmp_path / "a") == []
    # an archive with the expected checksum is extracted and converted, and the archive deleted
    monkeypatch.setattr(imdb, "ACLIMDB_SIZE", len(archive))
    monkeypatch.setattr(imdb, "ACLIMDB_SHA256", hashlib.sha256(archive).hexdigest())
    files = imdb.download_imdb(str(tmp_path / "b"))
    assert sorted(os.listdir(tmp_path / "b")) == ["test.jsonl.gz", "train.jsonl.gz", "unsup.jsonl.gz"]
    assert len(read_rows(files["train"])) == 4
    # converted once: a second call does not download
    monkeypatch.setattr(imdb.urllib.request, "urlopen", None)
    assert imdb.download_imdb(str(tmp_path / "b")) == files


# -----------------------------------------------------------------------------
# gold reward

def test_ngram_hash_is_pinned():
    # the artifact's weights are indexed by these buckets: a change here silently changes the gold reward
    assert imdb.WORD.findall("don't like it!! 10/10".lower()) == ["don't", "like", "it", "!", "!", "10", "10"]
    assert imdb.ngram_ids("Not good", 2**20) == PINNED_IDS
    assert imdb.ngram_ids("NOT   good", 2**20) == PINNED_IDS  # lowercased, whitespace-blind
    assert imdb.ngram_ids("", 2**20) == []


def test_shipped_gold_reward():
    assert os.path.getsize(imdb.GOLD_PATH) < 4_000_000  # small enough to commit
    gold = imdb.GoldReward.load()
    pos, neg, empty = gold(["This movie was"] * 3, [POSITIVE[14:], NEGATIVE[14:], ""])
    assert pos > 0.9 and neg < 0.1 and 0 < empty < 1
    assert imdb.gold_reward([POSITIVE], [""]) == gold([POSITIVE], [""])  # the plain function for ppo's --reward
    # prompt + response is scored as one text
    assert gold(["This movie was"], [POSITIVE[14:]]) == gold([""], [POSITIVE])


def test_shipped_gold_reward_accuracy_on_test_sample():
    rows = load_imdb(TEST_SAMPLE)
    p = imdb.GoldReward.load()([""] * len(rows), [r["text"] for r in rows])
    accuracy = sum((pi > 0.5) == (r["label"] == 1) for pi, r in zip(p, rows)) / len(rows)
    assert accuracy > 0.85, accuracy


def test_gold_checksum_enforced(tmp_path):
    copy = tmp_path / "gold.pt"
    shutil.copy(imdb.GOLD_PATH, copy)
    imdb.GoldReward.load(str(copy))  # an intact copy loads
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 1  # one bit in the weights
    copy.write_bytes(bytes(data))
    with pytest.raises(DataError, match=re.escape(str(copy)) + ": sha256 .* is not the gold reward's"):
        imdb.GoldReward.load(str(copy))
    with pytest.raises(DataError, match="no such file"):
        imdb.GoldReward.load(str(tmp_path / "missing.pt"))


def test_train_gold_on_sample(tmp_path, one_thread):
    out = str(tmp_path / "gold.pt")
    result = imdb.train_gold(TRAIN_SAMPLE, TEST_SAMPLE, out, seed=0, n_buckets=2**16, epochs=4, batch_size=64)
    assert result["accuracy"] > 0.7 and result["train_accuracy"] > result["accuracy"], result
    assert result["sha256"] == hashlib.sha256(open(out, "rb").read()).hexdigest()
    gold = imdb.GoldReward.load(out, sha256=result["sha256"])
    assert gold([""], [POSITIVE])[0] > 0.5 > gold([""], [NEGATIVE])[0]
    # seeded: the same seed gives the same file, bit for bit
    again = imdb.train_gold(TRAIN_SAMPLE, TEST_SAMPLE, str(tmp_path / "again.pt"), seed=0, n_buckets=2**16,
                            epochs=4, batch_size=64)
    assert again["sha256"] == result["sha256"]


def test_preference_labels_agree_with_the_gold_reward_more_often_than_not():
    rows = load_imdb(TRAIN_SAMPLE, limit=400)
    first, second = [r["text"] for r in rows[:200]], [r["text"] for r in rows[200:]]
    responses = [t for pair in zip(first, second) for t in pair]  # the 2 samples of prompt p at 2p, 2p + 1
    labelled, agreement = imdb.label_pairs([""] * 200, responses, 2, "bt", seed=0)
    gold = imdb.default_gold()
    chosen, rejected = gold([""] * 200, [r["chosen"] for r in labelled]), gold([""] * 200, [r["rejected"] for r in labelled])
    assert agreement == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / 200)  # the real share
    assert 0.6 < agreement < 1.0  # mostly the gold's choice, but a Bradley-Terry draw, not an argmax
    assert {frozenset((r["chosen"], r["rejected"])) for r in labelled} == {frozenset(p) for p in zip(first, second)}
    again, _ = imdb.label_pairs([""] * 200, responses, 2, "bt", seed=0)
    other, _ = imdb.label_pairs([""] * 200, responses, 2, "bt", seed=1)
    assert again == labelled and other != labelled  # the draw is the seed's


@pytest.mark.parametrize("k", [2, 3, 4])
def test_every_pair_of_k_samples_and_gold_labels_pick_the_higher_score(k):
    """The DPO paper's construction: k completions per prefix, all k(k-1)/2 pairs (6 for k = 4), the completion the
    gold classifier scores higher chosen."""
    texts = [r["text"][:300] for r in load_imdb(TRAIN_SAMPLE, limit=5 * k)]
    prompts = [f"prefix {i}: " for i in range(5)]
    labelled, agreement = imdb.label_pairs(prompts, texts, k, "gold", seed=0)
    assert len(labelled) == 5 * k * (k - 1) // 2 and agreement == 1.0
    gold = imdb.default_gold()
    for p, prompt in enumerate(prompts):
        mine = [r for r in labelled if r["prompt"] == prompt]
        own = texts[p * k:(p + 1) * k]
        assert len(mine) == k * (k - 1) // 2
        assert {frozenset((r["chosen"], r["rejected"])) for r in mine} == \
            {frozenset((own[i], own[j])) for i in range(k) for j in range(i + 1, k)}  # each pair once
        for r in mine:  # the higher gold score is chosen (scored as the pipeline scores: prefix + continuation)
            c, j = gold([prompt, prompt], [r["chosen"], r["rejected"]])
            assert c >= j
    # the most positive sample of a prefix is chosen in all k - 1 of its pairs
    best = max(texts[:k], key=lambda t: gold([prompts[0]], [t])[0])
    assert sum(r["chosen"] == best for r in labelled if r["prompt"] == prompts[0]) == k - 1
    with pytest.raises(ConfigError, match="expected gold or bt"):
        imdb.label_pairs(prompts, texts, k, "argmax", seed=0)


def test_simulate_preferences_writes_pairs_and_preferred_ft_data(tmp_path, one_thread):
    from config import RunConfig
    cfg = RunConfig(device="cpu", seed=5)
    prompts = ["The movie", "I saw this film", "What a"]
    prefs, chosen = str(tmp_path / "prefs.jsonl"), str(tmp_path / "chosen.jsonl")
    agreement = imdb.simulate_preferences(imdb.SFT_CPU_PATH, prompts, cfg, 6, 1.0, prefs, k=4, labels="gold",
                                          chosen_path=chosen)
    rows = [json.loads(line) for line in open(prefs)]
    sft_rows = [json.loads(line) for line in open(chosen)]
    assert agreement == 1.0 and len(rows) == 3 * 6 and [r["prompt"] for r in rows] == [p for p in prompts for _ in range(6)]
    assert sft_rows == [dict(prompt=r["prompt"], response=r["chosen"]) for r in rows]


def test_committed_sft_model_is_pinned_and_writes_imdb_text(one_thread):
    assert os.path.getsize(imdb.SFT_CPU_PATH) < 8_000_000  # small enough to commit: fp16, tied weights once
    assert checkpoint.file_sha256(imdb.SFT_CPU_PATH) == imdb.SFT_CPU_SHA256
    model, _ = load_policy(imdb.SFT_CPU_PATH, "cpu")
    # next-token loss on test reviews it never saw, in 64-token windows: near its held-out loss at training (4.89),
    # far from an untrained model's (about ln 50257 = 10.8) or the 250-step model the cpu preset trained before (7.0)
    tokens = torch.from_numpy(encode_corpus([r["text"] for r in load_imdb(TEST_SAMPLE, limit=60)]).astype("int64"))
    x = tokens[:len(tokens) // 65 * 65].view(-1, 65)[:64]
    with torch.no_grad():  # sft_loss: the log-probs in slices of rows, never the whole (64, 64, 50257) logits
        loss = sft_loss(model, (x[:, :-1], x[:, 1:])).item()
    assert loss < 5.3, loss


def test_freeze_keeps_the_weights_in_half_the_space(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16))
    src, dst = str(tmp_path / "ckpt.pt"), str(tmp_path / "frozen.pt")
    save_checkpoint(src, dict(kind="policy", stage="sft", step=7, model=model.state_dict(),
                              model_args=dataclasses.asdict(model.config),
                              optimizer=torch.optim.AdamW(model.parameters()).state_dict()))
    assert imdb.freeze_policy(src, dst) == checkpoint.file_sha256(dst)
    frozen = torch.load(dst, weights_only=True)
    assert frozen["step"] == 7 and "optimizer" not in frozen
    assert all(v.dtype == torch.float16 for v in frozen["model"].values())
    assert frozen["model"]["lm_head.weight"].data_ptr() == frozen["model"]["transformer.wte.weight"].data_ptr()
    again, _ = load_policy(dst, "cpu")
    x = torch.randint(0, 50257, (2, 9))
    torch.testing.assert_close(again(x)[0], model(x)[0], atol=2e-3, rtol=0)  # fp16 rounding only
    fp16_bytes = 2 * sum(p.numel() for p in model.parameters())  # parameters() lists the tied weight once
    assert os.path.getsize(dst) < 1.2 * fp16_bytes + 20_000


def test_pipeline_refuses_a_damaged_committed_sft_model(tmp_path, monkeypatch):
    import pipeline
    monkeypatch.setattr(pipeline, "SFT_CPU_SHA256", "0" * 64)
    got = checkpoint.file_sha256(imdb.SFT_CPU_PATH)[:16]
    with pytest.raises(DataError, match=rf"sft-imdb-cpu.pt: sha256 {got}\.\.\. is not the committed SFT model's 0{{16}}"):
        pipeline.pipeline(pipeline.PipelineConfig(out_dir=str(tmp_path / "imdb"), device="cpu"))
    assert not (tmp_path / "imdb").exists()  # refused before anything is written


def test_a_pipeline_stopped_by_a_bad_sft_model_leaves_no_config_to_refuse_the_next_command(tmp_path, in_process):
    """A bad --sft fails in one line before the pipeline writes its config.json, so the next command into the
    folder, with another --sft, is judged on its own input, not refused as 'another config'."""
    for name in ("a.pt", "b.pt"):
        (tmp_path / name).write_bytes(b"not a checkpoint")
        code, _, err = in_process("pipeline", "--preset=tiny", f"--sft={tmp_path / name}", "--device=cpu",
                                  f"--out_dir={tmp_path / 'run'}")
        assert code == 2 and len(err.strip().splitlines()) == 1 and name in err and "config" not in err, err
        assert not (tmp_path / "run" / "config.json").exists()


def imdb_cli(*args):
    env = dict(os.environ, TQDM_DISABLE="1")
    return subprocess.run([sys.executable, "imdb.py", *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=120)


def test_cli_never_overwrites_committed_assets_by_default():
    before = {p: checkpoint.file_sha256(p) for p in (imdb.GOLD_PATH, imdb.SFT_CPU_PATH)}
    for command in (["freeze", f"--ckpt={imdb.SFT_CPU_PATH}"], ["gold", f"--train={TRAIN_SAMPLE}", f"--test={TEST_SAMPLE}"]):
        p = imdb_cli(*command)
        assert p.returncode == 2 and "--out" in p.stderr, p.stderr
    assert {p: checkpoint.file_sha256(p) for p in before} == before


def test_download_without_network_is_one_line(tmp_path):
    # no network here: a proxy that refuses every connection stands in for a machine offline
    env = dict(os.environ, https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    p = subprocess.run([sys.executable, "imdb.py", "download", f"--dest={tmp_path / 'imdb'}"], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().startswith("error: https://ai.stanford.edu") and len(p.stderr.strip().splitlines()) == 1
    assert "download failed" in p.stderr and "Traceback" not in p.stderr

"""Tests of data.py: the tokenizer, every accepted file format, every rejected one, and batching."""

import gzip
import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import model  # noqa: E402
import sft  # noqa: E402
from model import GPTConfig, N_REAL_TOKENS  # noqa: E402
from data import EOS, PAD, DataError, Example, Pair  # noqa: E402

ASSETS = os.path.join(os.path.dirname(data.__file__), "assets")
HH_PROMPT = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant:"


def write(tmp_path, name, content):
    """Write a fixture: a list of records (dicts are JSON-encoded) or raw bytes; gzipped if name ends in .gz."""
    if isinstance(content, list):
        content = "".join((json.dumps(r) if not isinstance(r, str) else r) + "\n" for r in content).encode()
    path = tmp_path / name
    path.write_bytes(gzip.compress(content) if name.endswith(".gz") else content)
    return str(path)


# -----------------------------------------------------------------------------
# tokenizer

def test_tokenizer_known_ids_and_constants():
    assert data.encode("Hello world") == [15496, 995]
    assert (EOS, PAD) == (50256, 50257) and EOS != PAD
    assert data.get_tokenizer().n_vocab == N_REAL_TOKENS == 50257
    vocab = GPTConfig().vocab_size
    assert vocab == 50304 and vocab % 64 == 0 and vocab > PAD
    assert data.get_tokenizer() is data.get_tokenizer()  # cached
    # a special token written in the data is text, not an EOS
    assert EOS not in data.encode("a<|endoftext|>b")


def test_tokenizer_round_trip_on_imdb_sample():
    texts = [r["text"] for r in data.load_imdb(os.path.join(ASSETS, "imdb-test-sample.jsonl.gz"), limit=50)]
    for text in texts:
        assert data.decode(data.encode(text)) == text
    # EOS and PAD never reach the printed text
    assert data.decode(data.encode("Hello") + [EOS, PAD, PAD]) == "Hello"
    assert data.decode(torch.tensor(data.encode("Hello world"))) == "Hello world"


def test_tampered_bpe_file_is_refused(tmp_path):
    raw = bytearray(open(data.BPE_PATH, "rb").read())
    raw[1000] ^= 1
    bad = tmp_path / "tampered.tiktoken"
    bad.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="tampered.tiktoken"):
        data.get_tokenizer(str(bad))
    with pytest.raises(DataError, match="nope.tiktoken: no such file"):
        data.get_tokenizer(str(tmp_path / "nope.tiktoken"))


# -----------------------------------------------------------------------------
# preference pairs, in each format

def test_preferences_separate_format(tmp_path):
    path = write(tmp_path, "p.jsonl", [{"prompt": "Q?", "chosen": " yes", "rejected": " no"}, "",
                                       {"prompt": "R?", "chosen": " a", "rejected": " b"}])
    assert data.load_preferences(path) == [Pair("Q?", " yes", " no"), Pair("R?", " a", " b")]
    assert data.load_preferences(path, limit=1) == [Pair("Q?", " yes", " no")]


def test_preferences_hh_dialogues_gzipped(tmp_path):
    rows = [{"chosen": HH_PROMPT + " It is 4.", "rejected": HH_PROMPT + " Five."},
            # a chosen reply that itself holds a second Assistant turn (as in HH-RLHF): the prompt is still
            # the part both share, not chosen's last marker
            {"chosen": HH_PROMPT + " Umm.\n\nAssistant: 4", "rejected": HH_PROMPT + " 22"},
            {"chosen": HH_PROMPT + "", "rejected": HH_PROMPT + " x"}]  # an empty reply is kept
    pairs = data.load_preferences(write(tmp_path, "hh.jsonl.gz", rows))
    assert pairs == [Pair(HH_PROMPT, " It is 4.", " Five."), Pair(HH_PROMPT, " Umm.\n\nAssistant: 4", " 22"),
                     Pair(HH_PROMPT, "", " x")]
    # the layout's promise: tokenising prompt and response apart gives the tokens of the whole dialogue
    p, (r,), truncated = data.tokenize_pair(pairs[0].prompt, [pairs[0].chosen], 1024)
    assert p + r == [EOS] + data.encode(rows[0]["chosen"]) + [EOS] and not truncated


def test_preferences_message_lists_match_hh_layout(tmp_path):
    head = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "What is 2+2?"}]
    row = {"chosen": head + [{"role": "assistant", "content": "It is 4."}],
           "rejected": head + [{"role": "assistant", "content": "Five."}]}
    assert data.load_preferences(write(tmp_path, "m.jsonl", [row])) == [Pair(HH_PROMPT, " It is 4.", " Five.")]
    system = [{"role": "system", "content": "Be brief."}]
    assert data.render_chat(system + head[:1]) == "\n\nSystem: Be brief.\n\nHuman: Hi there\n\nAssistant:"


def test_preferences_vertex_format(tmp_path):
    rows = [{"input_text": "Sum up:", "candidate_0": " A", "candidate_1": " B", "choice": 0},
            {"input_text": "Sum up:", "candidate_0": " A", "candidate_1": " B", "choice": 1}]
    assert data.load_preferences(write(tmp_path, "v.json", rows)) == [Pair("Sum up:", " A", " B"),
                                                                      Pair("Sum up:", " B", " A")]


# -----------------------------------------------------------------------------
# prompts

@pytest.mark.parametrize("text, prompt", [
    (HH_PROMPT + " It is 4.", HH_PROMPT),
    ("### Human: hi ### Assistant: hello ### Human: 2+2? ### Assistant: 4", "### Human: hi ### Assistant: "
     "hello ### Human: 2+2? ### Assistant:"),
    ("###Human: hi###Assistant: hello", "###Human: hi###Assistant:"),
    ("Input= I loved this film", "I loved this film"),
    ("Classify the review. {{Text}}: Dull and long.", "Dull and long."),
    ("Once upon a time", "Once upon a time"),
])
def test_extract_prompt(text, prompt):
    assert data.extract_prompt(text) == prompt


def test_prompts_from_each_source(tmp_path):
    assert data.load_prompts(write(tmp_path, "a.jsonl", [{"prompt": "P1"}, {"prompt": "P2"}])) == ["P1", "P2"]
    assert data.load_prompts(write(tmp_path, "b.jsonl", [{"input_text": "I1"}])) == ["I1"]
    assert data.load_prompts(write(tmp_path, "c.jsonl", [{"text": HH_PROMPT + " 4"}, {"text": "Input=x"}])) \
        == [HH_PROMPT, "x"]
    # a preference file gives each of its prompts once, in order
    hh = [{"chosen": HH_PROMPT + " 4", "rejected": HH_PROMPT + " 5"},
          {"chosen": "\n\nHuman: Yo\n\nAssistant: hey", "rejected": "\n\nHuman: Yo\n\nAssistant: hi"},
          {"chosen": HH_PROMPT + " four", "rejected": HH_PROMPT + " 3"}]
    assert data.load_prompts(write(tmp_path, "hh.jsonl.gz", hh)) == [HH_PROMPT, "\n\nHuman: Yo\n\nAssistant:"]
    txt = write(tmp_path, "p.txt", b"first prompt\r\n\n  \nsecond prompt\n")
    assert data.load_prompts(txt) == ["first prompt", "second prompt"]
    assert data.load_prompts(txt, limit=1) == ["first prompt"]


def test_prompts_longer_than_the_room_for_them_are_counted_in_one_line(tmp_path, capsys):
    """Sampling keeps a too-long prompt's end (model.sample_responses); loading them with the room for a prompt
    (block_size - max_new_tokens) says how many are cut, and says nothing when none is."""
    txt = write(tmp_path, "p.txt", b"a short one\n" + b"word " * 40 + b"\nanother short one\n")
    room = len(data.encode_prompt("word " * 40)) - 1
    assert len(data.load_prompts(txt, room=room)) == 3
    assert capsys.readouterr().out == (f"{txt}: 1 of 3 prompts are longer than block_size - max_new_tokens = {room} "
                                       f"tokens; each keeps its last {room}\n")
    data.load_prompts(txt, room=room + 1)
    data.load_prompts(txt)
    assert capsys.readouterr().out == ""


# -----------------------------------------------------------------------------
# SFT and IMDb

def test_sft_formats(tmp_path):
    assert data.load_sft(write(tmp_path, "a.jsonl", [{"prompt": "Q:", "response": " A"}])) == [Example("Q:", " A")]
    assert data.load_sft(write(tmp_path, "b.jsonl", [{"text": "all loss"}])) == [Example("", "all loss")]
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    assert data.load_sft(write(tmp_path, "c.jsonl", [{"messages": msgs}])) == \
        [Example("\n\nHuman: Hi there\n\nAssistant:", " Hello!")]
    imdb = {"id": 1, "rating": 9, "label": 1, "text": "Great.<br /><br />Really."}
    assert data.load_sft(write(tmp_path, "d.jsonl.gz", [imdb])) == [Example("", "Great.\n\nReally.")]
    assert data.load_sft(write(tmp_path, "e.txt", b"line one\nline two\n")) == [Example("", "line one\nline two\n")]


def test_imdb_sample_loads_clean():
    rows = data.load_imdb(os.path.join(ASSETS, "imdb-train-sample.jsonl.gz"))
    assert len(rows) == 2000 and {r["label"] for r in rows} == {0, 1}
    assert all(set(r) == {"id", "rating", "label", "text"} for r in rows)
    assert not any("<br" in r["text"] for r in rows) and any("\n\n" in r["text"] for r in rows)
    unsup = data.load_imdb(os.path.join(ASSETS, "imdb-unsup-sample.jsonl.gz"), limit=10)
    assert len(unsup) == 10 and {(r["label"], r["rating"]) for r in unsup} == {(-1, 0)}
    assert data.clean_review(" a<br />b<br/>c<BR>d<br /><br />e ") == "a\nb\nc\nd\n\ne"


# -----------------------------------------------------------------------------
# bad input: each is a DataError naming file and line, on one line

def rec(**kw):
    return (json.dumps(kw) + "\n").encode()


GOOD = rec(prompt="Q", chosen=" a", rejected=" b")
MSGS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


BAD = [  # loader, file name, content, expected in message, line number (None: no line applies)
    ("preferences", "badjson.jsonl", GOOD + b'{"prompt": "Q", "chosen": \n', "bad JSON", 2),
    ("preferences", "notobj.jsonl", GOOD + b"[1, 2]\n", "expected a JSON object", 2),
    ("preferences", "missing.jsonl", rec(prompt="Q", chosen=" a"), "missing ['rejected']", 1),
    ("preferences", "typo.jsonl", GOOD + GOOD + rec(prompt="Q", chosen_=" a", rejected=" b"),
     "(missing ['chosen']; unrecognised ['chosen_'])", 3),
    ("preferences", "ctrl.jsonl", GOOD + b'{"prompt": "a\x01b"}\n', "bad JSON: Invalid control character at column 14", 2),
    ("preferences", "cut.jsonl", GOOD + b'{"prompt": "Q", "chosen": "a\n', "bad JSON: Unterminated string at the end", 2),
    ("preferences", "unrec.jsonl", rec(question="Q"), "{input_text, candidate_0, candidate_1, choice}", 1),
    ("preferences", "mixed.jsonl", GOOD + rec(chosen="\n\nHuman: a\n\nAssistant: b",
                                              rejected="\n\nHuman: a\n\nAssistant: c"), "cannot be mixed", 2),
    ("preferences", "type.jsonl", rec(prompt="Q", chosen=5, rejected=" b"), "'chosen' must be a string", 1),
    ("preferences", "type2.jsonl", rec(chosen=None, rejected="x"), "'chosen' must be a string, got null", 1),
    ("preferences", "nomark.jsonl", rec(chosen="Human: a", rejected="Human: b"), "no '\\n\\nAssistant:'", 1),
    ("preferences", "noshared.jsonl", rec(chosen="\n\nHuman: a\n\nAssistant: x",
                                          rejected="\n\nHuman: b\n\nAssistant: y"), "share no prompt", 1),
    ("preferences", "role.jsonl", rec(chosen=MSGS, rejected=[{"role": "bot", "content": "x"}]),
     "role 'bot' is not one of", 1),
    ("preferences", "content.jsonl", rec(chosen=[{"role": "assistant", "content": 3}], rejected=MSGS),
     "'content' must be a string, got an integer", 1),
    ("preferences", "lastturn.jsonl", rec(chosen=MSGS, rejected=MSGS[:1]), "end with an assistant message", 1),
    ("preferences", "listmix.jsonl", rec(chosen=MSGS, rejected="yo"), "'rejected' must be an array", 1),
    ("preferences", "true.jsonl", rec(input_text="I", candidate_0="a", candidate_1="b", choice=True),
     "'choice' must be an integer, got a boolean", 1),
    ("preferences", "two.jsonl", rec(input_text="I", candidate_0="a", candidate_1="b", choice=2),
     "'choice' must be 0 or 1, got 2", 1),
    ("preferences", "strchoice.jsonl", rec(input_text="I", candidate_0="a", candidate_1="b", choice="0"),
     "'choice' must be an integer, got a string", 1),
    ("preferences", "cand.jsonl", rec(input_text=["I"], candidate_0="a", candidate_1="b", choice=0),
     "'input_text' must be a string", 1),
    ("preferences", "empty.jsonl", b"", "empty file", None),
    ("preferences", "blank.jsonl", b"\n  \n", "empty file", None),
    ("preferences", "latin1.jsonl", GOOD + b'{"prompt": "caf\xe9"}\n', "not UTF-8", 2),
    ("preferences", "notgz.jsonl.gz", GOOD, "corrupt gzip", None),  # not gzipped at all
    ("preferences", "trunc.jsonl.gz", gzip.compress(GOOD * 1000)[:200], "corrupt gzip", None),  # cut off
    ("prompts", "prompts.jsonl", rec(prompt="ok") + rec(prompt=["no"]), "'prompt' must be a string", 2),
    ("prompts", "emptyprompt.jsonl", rec(text="Input=  "), "empty prompt", 1),
    ("prompts", "unknown.jsonl", rec(query="x"), "unrecognised keys ['query']", 1),
    ("prompts", "twoformats.jsonl", rec(prompt="x", text="y"), "hold more than one format, {prompt} and {text}", 1),
    ("prompts", "mixextra.jsonl", rec(prompt="x", id=1) + rec(text="y", id=2), "cannot be mixed", 2),
    ("prompts", "bad.txt", b"fine\n\xff\xfe\n", "not UTF-8", 2),
    ("sft", "sft.jsonl", rec(prompt="Q", completion="A"), "missing ['response']", 1),
    ("sft", "msgs.jsonl", rec(messages="hi"), "'messages' must be an array", 1),
    ("imdb", "label.jsonl", rec(id=1, rating=9, label=2, text="t"), "'label' must be -1", 1),
    ("imdb", "rating.jsonl", rec(id=1, rating=11, label=1, text="t"), "'rating' must be 0 to 10", 1),
    ("imdb", "id.jsonl", rec(id="1", rating=1, label=0, text="t"), "'id' must be an integer", 1),
    ("imdb", "newline.jsonl", rec(**{"id": 1, "rating": 1, "label": 0, "te\nxt": "t"}), "unrecognised", 1),
]


@pytest.mark.parametrize("loader, name, content, expected, line", BAD, ids=[b[1] for b in BAD])
def test_bad_input_is_one_line_data_error(tmp_path, loader, name, content, expected, line):
    path = tmp_path / name
    path.write_bytes(content)  # raw bytes, never compressed here: the .gz cases are broken on purpose
    with pytest.raises(DataError) as e:
        getattr(data, "load_" + loader)(str(path))
    msg = str(e.value)
    assert expected in msg and "\n" not in msg
    assert msg.startswith(f"{path}:{line}: " if line else f"{path}: ")


def test_bad_json_message_names_the_column_once(tmp_path):
    path = write(tmp_path, "j.jsonl", [{"prompt": "Q"}, '{"prompt": "a\tb"}', '{"prompt": "Q", "chosen": '])
    with pytest.raises(DataError) as e:
        data.load_prompts(path)
    assert str(e.value).endswith(":2: bad JSON: Invalid control character at column 14")  # was "at at column"
    path = write(tmp_path, "k.jsonl", [{"prompt": "Q"}, '{"prompt": "Q", "chosen": '])
    with pytest.raises(DataError) as e:
        data.load_prompts(path)
    assert str(e.value).endswith(":2: bad JSON: Expecting value at the end of the line")  # was "at column 1"


@pytest.mark.parametrize("loader, record", [
    ("sft", {"messages": [{"role": "r" * 500, "content": "x"}]}),
    ("preferences", {"input_text": "I", "candidate_0": "a", "candidate_1": "b", "choice": 10 ** 500}),
    ("imdb", {"id": 1, "rating": 10 ** 500, "label": 0, "text": "t"}),
    ("imdb", {"id": 1, "rating": 1, "label": -10 ** 500, "text": "t"}),
    ("prompts", {"r" * 500: "x"}),
    ("preferences", {"prompt": "Q", "chosen": "a", "r" * 500: "b"}),
])
def test_quoted_input_is_cut_to_a_few_dozen_characters(tmp_path, loader, record):
    path = write(tmp_path, "long.jsonl", [record])
    with pytest.raises(DataError) as e:
        getattr(data, "load_" + loader)(path)
    msg = str(e.value)
    assert "r" * 38 not in msg and "0" * 38 not in msg, msg


def test_extra_keys_are_ignored_and_reported_once_per_file(tmp_path, capsys):
    # the largest key set a record holds is its format: {prompt, chosen, rejected, score} is a separate-prompt
    # pair (as {chosen, rejected} it would be refused: no "\n\nAssistant:" turn)
    rows = [{"prompt": "Q?", "chosen": " yes", "rejected": " no", "score": 0.5, "source": "x"},
            {"prompt": "R?", "chosen": " a", "rejected": " b", "score": 1.0}, {"prompt": "S?", "chosen": " c",
                                                                             "rejected": " d"}]
    path = write(tmp_path, "extra.jsonl", rows)
    assert data.load_preferences(path) == [Pair("Q?", " yes", " no"), Pair("R?", " a", " b"), Pair("S?", " c", " d")]
    out = capsys.readouterr()
    assert out.out == "" and len(out.err.splitlines()) == 1
    assert out.err.startswith(f"{path}: ignored keys outside the {{prompt, chosen, rejected}} format in 2 of 3 records")
    assert out.err.rstrip().endswith("'score': 2, 'source': 1")
    assert data.load_sft(path, limit=1) == [Example("Q?", " yes")]  # a limit still gives the line, counted so far
    assert capsys.readouterr().err.count("in 1 of 1 records") == 1
    assert data.load_prompts(path) == ["Q?", "R?", "S?"]
    assert capsys.readouterr().err.count("\n") == 1
    # a file without extra keys says nothing
    data.load_preferences(write(tmp_path, "plain.jsonl", rows[2:]))
    assert capsys.readouterr().err == ""
    # other loaders: an IMDb row as a prompt ({text}); an SFT row with an id
    imdb = {"id": 1, "rating": 9, "label": 1, "text": "Great film"}
    assert data.load_prompts(write(tmp_path, "imdb.jsonl", [imdb])) == ["Great film"]
    assert data.load_sft(write(tmp_path, "sft.jsonl", [{"prompt": "Q", "response": " A", "id": 3}])) \
        == [Example("Q", " A")]
    assert data.load_imdb(write(tmp_path, "imdb2.jsonl", [dict(imdb, url="u")]))[0]["text"] == "Great film"


def test_ultrafeedback_binarized_rows_load_as_message_pairs(tmp_path, capsys):
    # HuggingFaceH4/ultrafeedback_binarized: prompt (a string) beside chosen/rejected message lists and more columns
    chosen = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    row = {"prompt": "Hi there", "prompt_id": "ab12", "chosen": chosen,
           "rejected": chosen[:1] + [{"role": "assistant", "content": "Go away."}], "messages": chosen,
           "score_chosen": 8.0, "score_rejected": 2.0}
    pairs = data.load_preferences(write(tmp_path, "uf.jsonl", [row, row]))
    assert pairs == [Pair("\n\nHuman: Hi there\n\nAssistant:", " Hello!", " Go away.")] * 2
    err = capsys.readouterr().err
    assert "{chosen, rejected} format in 2 of 2 records" in err and "'prompt': 2" in err


def test_missing_file_and_directory(tmp_path):
    for load in (data.load_preferences, data.load_prompts, data.load_sft, data.load_imdb):
        with pytest.raises(DataError, match="nope.jsonl: no such file"):
            load(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="is a directory"):
        data.load_prompts(str(tmp_path))


# -----------------------------------------------------------------------------
# tokenising and batching

def test_tokenize_pair_truncation():
    p, r = [EOS] + data.encode(" one two three four five six"), data.encode(" seven eight")  # EOS is the BOS
    one = lambda prompt, response, block: data.tokenize_pair(prompt, [response], block)
    assert one(" one two three four five six", " seven eight", 100) == (p, [r + [EOS]], False)
    # too long: the prompt loses its start first...
    assert one(" one two three four five six", " seven eight", 7) == (p[-4:], [r + [EOS]], True)
    # ...down to half the block; then the response loses its end (and its EOS)
    assert one(" one two three four five six", " seven eight", 4) == (p[-2:], [r], True)
    # an empty prompt is the BOS alone; the response ends in EOS
    assert one("", " hi", 8) == ([EOS], [data.encode(" hi") + [EOS]], False)


def test_tokenize_pair_truncates_all_responses_alike():
    p, rs, truncated = data.tokenize_pair(" a b c d e f", [" x", " y z w v"], 8)
    assert truncated and len(p) + max(map(len, rs)) <= 8
    assert len(p) == 4 and p == ([EOS] + data.encode(" a b c d e f"))[-4:]  # the prompt lost its start, to half
    assert rs[0] == data.encode(" x") + [EOS] and rs[1] == (data.encode(" y z w v") + [EOS])[:4]  # then the end


def test_layout_batch_puts_every_response_at_column_p():
    ids, mask, R = model.layout_batch([[EOS, 1, 2], [EOS]], [[3, EOS], [4, 5, 6, EOS]])
    assert R == 4 and ids.shape == (2, 7)
    assert ids[0].tolist() == [EOS, 1, 2, 3, EOS, PAD, PAD] and mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0]
    assert ids[1].tolist() == [PAD, PAD, EOS, 4, 5, 6, EOS] and mask[1].tolist() == [0, 0, 1, 1, 1, 1, 1]


def test_pad_batch_left_and_right():
    ids, mask = model.pad_batch([[1, 2, 3], [4], []])
    assert ids.tolist() == [[1, 2, 3], [4, PAD, PAD], [PAD, PAD, PAD]] and ids.dtype == torch.long
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    ids, mask = model.pad_batch([[1, 2, 3], [4]], side="left")
    assert ids.tolist() == [[1, 2, 3], [PAD, PAD, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    loss_mask, _ = model.pad_batch([[0, 1, 1], [1]], side="left", pad_id=0)
    assert loss_mask.tolist() == [[0, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError):
        model.pad_batch([[1]], side="middle")


def test_pad_batch_matches_a_plain_loop_over_rows():
    """pad_batch scatters every token at once; a loop over rows (the obvious code) must give the same tensors, for
    batches with empty sequences, one row, no rows, and other pad ids."""
    def plain(seqs, side, pad_id):
        T = max((len(s) for s in seqs), default=0)
        ids, mask = torch.full((len(seqs), T), pad_id, dtype=torch.long), torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            cols = slice(T - len(s), T) if side == "left" else slice(0, len(s))
            ids[i, cols], mask[i, cols] = torch.tensor(s, dtype=torch.long), 1
        return ids, mask

    rng = np.random.default_rng(0)
    for trial in range(300):
        seqs = [rng.integers(0, 50257, rng.integers(0, 12)).tolist() for _ in range(rng.integers(0, 9))]
        for side in ("left", "right"):
            for pad_id in (PAD, 0):
                got, want = model.pad_batch(seqs, side, pad_id), plain(seqs, side, pad_id)
                assert all(g.dtype == torch.long and torch.equal(g, w) for g, w in zip(got, want)), (seqs, side)


def test_token_stream_is_a_pure_function_of_step():
    tokens = sft.encode_corpus(["first doc", "second doc here", "third"], desc="test")
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == (data.encode("first doc") + [EOS] + data.encode("second doc here") + [EOS]
                               + data.encode("third") + [EOS])
    tokens = np.arange(1000, dtype=np.uint16)
    stream = sft.TokenStream(tokens, block_size=16, batch_size=8, seed=3)
    x, y = stream.batch(5)
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.long and x.is_contiguous() and y.is_contiguous()
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y, x + 1)  # y is x shifted by one
    again = sft.TokenStream(tokens, block_size=16, batch_size=8, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(stream.batch(5), again.batch(5)))
    assert not torch.equal(stream.batch(6)[0], x)
    assert not torch.equal(sft.TokenStream(tokens, 16, 8, seed=4).batch(5)[0], x)
    # every window stays inside the array, the last token included
    last = max(int(stream.batch(s)[1].max()) for s in range(200))
    assert last <= 999


def test_every_loader_takes_several_files_comma_separated(tmp_path):
    a = write(tmp_path, "a.jsonl", [dict(prompt="p1", chosen=" c1", rejected=" r1")])
    b = write(tmp_path, "b.jsonl.gz", [dict(chosen=HH_PROMPT + " yes", rejected=HH_PROMPT + " no")])
    assert data.load_preferences(f"{a},{b}") == [Pair("p1", " c1", " r1"), Pair(HH_PROMPT, " yes", " no")]
    txt = tmp_path / "more.txt"
    txt.write_text("p2\n\np3\n")
    assert data.load_prompts(f"{a},{txt}") == ["p1", "p2", "p3"]
    assert data.load_prompts(f"{a},{txt}", limit=2) == ["p1", "p2"]
    assert [ex.response for ex in data.load_sft(f"{a},{b}")] == [" c1", " yes"]
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        data.load_preferences(f"{a},{tmp_path}/nope.jsonl")


def test_pairs_that_teach_nothing_are_kept_and_counted_in_one_warning(tmp_path, capsys):
    rows = [dict(prompt="", chosen=" same", rejected=" same"), dict(prompt="p", chosen=" same", rejected=" same"),
            dict(prompt="q", chosen=" a", rejected=" b")]
    path = write(tmp_path, "degenerate.jsonl", rows)
    assert len(data.load_preferences(path)) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: {path}: the chosen and rejected responses are the same (no preference to learn) in 2 "
                   f"of 3 pairs; the prompt is empty in 1 of 3 pairs"]

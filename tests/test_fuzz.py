"""Property-based fuzzing of the loaders in data.py (hypothesis): thousands of generated malformed JSON-lines files
(random and mutated bytes, broken gzip, wrong JSON types and key sets, huge and deeply nested values) go to
load_preferences, load_prompts, load_sft and load_imdb. The promise in data.py's docstring, checked on each:
a loader either returns a list or raises DataError with one line, "{path}:{line}: {what}" or "{path}: {what}";
any other exception (KeyError, TypeError, ValueError, RecursionError, ...) is a bug, and so is a message that grows
with the input. Valid files, generated too, must load, and load alike with extra keys of no format in their records.

Run: .venv/bin/python -m pytest -q tests/test_fuzz.py -p no:cacheprovider --durations=5
Size: 4 fuzz tests x 300 examples = 1,200 generated files, each given to every loader (4,800 loads): about 18 s
in the whole suite on 2 CPU cores (30 s at 500, the count until 2026-12-08, when the suite passed 5 minutes). Raise
FUZZ_EXAMPLES (an environment variable) for a longer hunt.
"""

import contextlib
import gzip
import io
import json
import os
import re
import sys

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from data import DataError  # noqa: E402

LOADERS = [data.load_preferences, data.load_prompts, data.load_sft, data.load_imdb]
SUFFIXES = [".jsonl", ".json", ".jsonl.gz", ".json.gz", ".txt", ".txt.gz"]  # .txt: load_prompts/load_sft read text
# chars after the path. The longest honest message, 4 keys and 2 unknown ones (generated below: 6 BMP characters
# at most, each \uXXXX at worst in the message) checked against all 7 SFT key sets, is about 430.
MAX_MESSAGE = 500
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 300)), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory):
    # module-scoped, so hypothesis has no function-scoped fixture to warn about; each example overwrites its file
    return tmp_path_factory.mktemp("fuzz")


def write(tmp_dir, suffix, content, compress=True):
    """content (bytes) to tmp_dir/f{suffix}, gzipped when the name ends in .gz unless compress is False."""
    path = str(tmp_dir / ("f" + suffix))
    with open(path, "wb") as f:
        f.write(gzip.compress(content, mtime=0) if compress and suffix.endswith(".gz") else content)
    return path


def check(load, path, content=None):
    """load(path) returns a list or raises a one-line DataError that starts with the path (and a "path:N:" names a
    line of the file, when content, the uncompressed bytes, is known). Any other exception propagates: a bug."""
    err = io.StringIO()  # the loader's own notes: one line "{path}: ignored keys ...", one "warning: {path}: ..."
    try:
        with contextlib.redirect_stderr(err):
            out = load(path)
    except DataError as e:
        msg = str(e)
        assert len(msg.splitlines()) == 1, f"{load.__name__}: not one line: {msg!r}"  # \n, \r, \u2028...
        m = re.match(re.escape(path) + r":(?:(\d+):)? ", msg)
        assert m, f"{load.__name__}: message does not start with '{path}:': {msg!r}"
        if m.group(1) and content is not None:
            assert 1 <= int(m.group(1)) <= content.count(b"\n") + 1, f"{load.__name__}: no such line: {msg!r}"
        assert len(msg) - len(path) < MAX_MESSAGE, f"{load.__name__}: {len(msg)}-char message: {msg[:300]!r}..."
    else:
        assert isinstance(out, list), f"{load.__name__} returned {type(out).__name__}"
    notes = err.getvalue().split("\n")[:-1]  # print() ends each line with "\n"
    ignored = [n for n in notes if n.startswith(path + ": ignored keys outside the {")]
    warned = [n for n in notes if n.startswith(f"warning: {path}: ") and " pairs" in n]  # pairs that teach nothing
    assert len(ignored) <= 1 and len(warned) <= 1 and len(notes) == len(ignored) + len(warned), \
        f"{load.__name__}: {len(notes)} lines on stderr: {err.getvalue()[:300]!r}"
    for note in notes:
        assert len(note.splitlines()) == 1 and len(note) - len(path) < MAX_MESSAGE, f"{load.__name__}: {note[:300]!r}"


def check_all_loaders(path, content=None):
    for load in LOADERS:
        check(load, path, content)


# -----------------------------------------------------------------------------
# strategies

# one hand-written valid file per format, the seeds that mutated_bytes damages
VALID_FILES = [
    ("separate", b'{"prompt": "Q?", "chosen": " yes", "rejected": " no"}\n\n{"prompt": "R?", "chosen": " a", '
                 b'"rejected": " b"}\n'),
    ("dialogue", b'{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: yo", '
                 b'"rejected": "\\n\\nHuman: hi\\n\\nAssistant: no"}\n'),
    ("messages_pair", b'{"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], '
                      b'"rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]}\n'),
    ("vertex", b'{"input_text": "Sum:", "candidate_0": " A", "candidate_1": " B", "choice": 1}\n'),
    ("prompt", '\ufeff{"prompt": "caf\u00e9 \u2603"}\r\n{"prompt": "P2"}'.encode()),  # BOM, CRLF, no final newline
    ("input_text", b'{"input_text": "I1"}\n'),
    ("text", b'{"text": "Input= a film"}\n'),
    ("prompt_response", b'{"prompt": "Q:", "response": " A"}\n'),
    ("messages", b'{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "A"}]}\n'),
    ("imdb", b'{"id": 7, "rating": 9, "label": 1, "text": "Great.<br /><br />Really."}\n'
             b'{"id": 8, "rating": 0, "label": -1, "text": ""}\n'),
]

ROLES = ["user", "assistant", "system"]
HH = "\n\nHuman: hi\n\nAssistant:"
ALL_KEYS = sorted({k for fmt in (data.PROMPT_FORMATS, data.SFT_FORMATS) for keys in fmt.values() for k in keys} |
                  {"role", "content"})

short_text = st.text(max_size=12)
# JSON values of every type, nested a little: what a wrong-typed field holds
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | short_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(short_text, inner, max_size=3), max_leaves=8)
wrong_values = json_values | st.sampled_from([True, False, 0.0, 1.0, "0", "1", None, "", " ", [], {}])
markers = st.sampled_from([HH, "\n\nHuman: x" + HH, "Input=", "### Assistant:"])
texts = short_text | st.builds(lambda a, b: a + b, markers, short_text)  # sometimes with a prompt marker
good_message = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": short_text})
bad_message = wrong_values | st.fixed_dictionaries(
    {"role": st.sampled_from(ROLES) | wrong_values, "content": short_text | wrong_values},
    optional={"name": short_text})  # an extra key
# (hypothesis's one_of does not weight by repeating a branch; integers(0, n) == 0 does, 1 in n + 1)
messages = st.lists(st.integers(0, 3).flatmap(lambda i: bad_message if i == 0 else good_message), max_size=4)
# a value of the type its key wants, six times in seven (so that a record gets past the key and type checks to
# the deeper ones: choice 0/1, label and rating ranges, roles, HH markers), else a value of any JSON type
RIGHT = {"choice": st.integers(-1, 2), "label": st.integers(-2, 2), "rating": st.integers(-1, 11),
         "id": st.integers(-1, 10**6), "messages": messages}
last_message = st.integers(0, 3).flatmap(  # a reply: mostly from the assistant
    lambda i: good_message if i == 0 else st.fixed_dictionaries({"role": st.just("assistant"), "content": short_text}))
unknown_keys = st.text(st.characters(max_codepoint=0xFFFF), max_size=6)  # see MAX_MESSAGE
key_sets = st.sampled_from(sorted({tuple(keys) for fmt in (data.PROMPT_FORMATS, data.SFT_FORMATS)
                                   for keys in fmt.values()}))


@st.composite
def records(draw, keys=key_sets):
    """A JSON object: an accepted key set, now and then with a key dropped or unknown keys added, and values of
    the right type, now and then not."""
    keys = list(draw(keys))
    if draw(st.integers(0, 4)) == 0 and len(keys) > 1:
        keys.remove(draw(st.sampled_from(keys)))
    if draw(st.integers(0, 4)) == 0:
        keys += draw(st.lists(st.sampled_from(ALL_KEYS + ["chosen_", "Text", ""]) | unknown_keys,
                              min_size=1, max_size=2))
    rec = {k: draw(wrong_values if draw(st.integers(0, 6)) == 0 else RIGHT.get(k, texts)) for k in keys}
    pair = draw(st.integers(0, 2)) if {"chosen", "rejected"} <= set(rec) else 0
    if pair == 1:  # strings that start alike, mostly: HH dialogues with a shared prompt, as {chosen, rejected} wants
        start = draw(markers)
        rec["chosen"], rec["rejected"] = (draw(st.just(start) | markers) + draw(texts) for _ in range(2))
    elif pair == 2:  # message lists with the same turns before the last reply
        head = draw(messages)
        rec["chosen"], rec["rejected"] = (head + [draw(last_message)] for _ in range(2))
    return rec


# a line that is not a record: a non-object JSON value, broken JSON, or blank
odd_lines = st.one_of(
    json_values.filter(lambda v: not isinstance(v, dict)).map(json.dumps),
    st.sampled_from(['{"prompt": "Q"', '{"prompt": }', "{'prompt': 'Q'}", '{"prompt": "Q"}}', "{", "nul\x00l",
                     '\ufeff{"prompt": "Q"}', '{"prompt": "\\ud800"}', '{"text": NaN}', '{"prompt": "a\tb"}']),
    st.sampled_from(["", " ", "\t", "\r", "\x0c", "\u2028"]))


@st.composite
def jsonl_files(draw):
    """(suffix, uncompressed bytes) of a JSON-lines file: records, mostly of one key set (so that a file gets past
    its first line to the checks of each format), sometimes another (formats mixed), and a few odd lines;
    an optional BOM, CRLF line ends, a missing final newline."""
    keys = draw(key_sets)
    ascii_only = draw(st.booleans())  # if not, a lone surrogate is written raw (then surrogatepass below)
    rows = draw(st.lists(st.integers(0, 4).flatmap(lambda i: records() if i == 0 else records(st.just(keys))),
                         min_size=1, max_size=4))
    lines_ = [json.dumps(r, ensure_ascii=ascii_only) for r in rows]
    for _ in range(draw(st.integers(0, 2))):
        lines_.insert(draw(st.integers(0, len(lines_))), draw(odd_lines))
    end = draw(st.sampled_from(["\n", "\r\n"]))
    content = end.join(lines_) + (end if draw(st.booleans()) else "")
    raw = content.encode("utf-8", "surrogatepass")  # a raw lone surrogate: bytes that are not valid UTF-8
    suffix = draw(st.sampled_from([".jsonl", ".json", ".jsonl.gz"]))  # (.txt: a text file to load_prompts, load_sft)
    return suffix, (b"\xef\xbb\xbf" if draw(st.booleans()) else b"") + raw


@st.composite
def mutated_bytes(draw):
    """Bytes of a valid file, damaged: bytes flipped, inserted or cut (including invalid UTF-8 and NUL)."""
    raw = bytearray(draw(st.sampled_from(VALID_FILES))[1])
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(raw)))
        op = draw(st.sampled_from(["flip", "insert", "cut"]))
        if op == "flip" and i < len(raw):
            raw[i] = draw(st.integers(0, 255))
        elif op == "insert":
            raw[i:i] = draw(st.sampled_from([b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\n", b"{", b'"', b"\\"]))
        else:
            del raw[i:i + draw(st.integers(1, 8))]
    return bytes(raw)


@st.composite
def byte_files(draw):
    """(path suffix, bytes on disk, uncompressed bytes or None): random bytes, damaged valid files, gzip that is
    truncated or corrupted, or not gzip at all under a .gz name."""
    suffix = draw(st.sampled_from(SUFFIXES))
    content = draw(st.binary(max_size=200) | mutated_bytes() | st.just(b""))
    if not suffix.endswith(".gz"):
        return suffix, content, content
    how = draw(st.sampled_from(["gzip", "truncated", "corrupted", "trailing", "plain"]))
    packed = gzip.compress(content, mtime=0)
    if how == "gzip":
        return suffix, packed, content
    if how == "truncated":
        return suffix, packed[:draw(st.integers(0, len(packed) - 1))], None
    if how == "corrupted":
        i = draw(st.integers(0, len(packed) - 1))
        return suffix, packed[:i] + bytes([packed[i] ^ draw(st.integers(1, 255))]) + packed[i + 1:], None
    if how == "trailing":  # a second gzip member, or garbage after the first
        return suffix, packed + draw(st.just(packed) | st.binary(min_size=1, max_size=20)), None
    return suffix, content, None  # raw bytes under a .gz name


# huge and deep: text spliced into a record where a value or key goes (json.dumps cannot write a 5,000-digit int:
# Python refuses int<->str conversions over 4,300 digits, json.loads included)
huge_texts = st.one_of(
    st.integers(1, 6000).map(lambda n: "9" * n),                            # a huge integer literal
    st.integers(1, 6000).map(lambda n: "-1" + "0" * n + ".5e99999"),        # a huge float (inf)
    st.integers(1, 5000).map(lambda n: json.dumps("x" * n)),                # a long string
    st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),                  # deep arrays (recursion)
    st.integers(1, 3000).map(lambda n: '{"a":' * n + "1" + "}" * n),        # deep objects
    st.integers(1, 3000).map(lambda n: "[" * n),                            # deep and unclosed
    st.integers(1, 300).map(lambda n: json.dumps(list(range(n)))))          # a long array
huge_keys = st.one_of(st.integers(1, 3000).map(lambda n: json.dumps("k" * n)),
                      st.integers(1, 200).map(lambda n: json.dumps("\u2028\n" * n)))


@st.composite
def huge_files(draw):
    """(suffix, bytes): one line, a record with one huge or deep value, key or message role, or very many keys,
    or a huge or deep value as the whole line."""
    rec, where = draw(records()), draw(st.sampled_from(["value", "key", "role", "many keys", "line"]))
    if where == "line":
        line = draw(huge_texts)
    elif where == "many keys":
        line = json.dumps(dict(rec, **{f"k{i}": i for i in range(draw(st.integers(10, 2000)))}))
    elif where == "key":
        line = json.dumps(rec).replace("{", "{" + draw(huge_keys) + ": 1" + (", " if rec else ""), 1)
    else:
        if where == "role":  # a message whose role is the huge value
            rec = draw(st.sampled_from([{"messages": [{"role": "@@HUGE@@", "content": "x"}]},
                                        {"chosen": [{"role": "@@HUGE@@", "content": "x"}],
                                         "rejected": [{"role": "user", "content": "x"}]}]))
        else:
            rec[draw(st.sampled_from(sorted(rec) or ["prompt"]))] = "@@HUGE@@"
        line = json.dumps(rec).replace('"@@HUGE@@"', draw(huge_texts))
    return draw(st.sampled_from([".jsonl", ".jsonl.gz"])), (line + "\n").encode()


# -----------------------------------------------------------------------------
# valid files of every format, by construction

VALID_RECORDS = {  # a strategy for one valid record of each format
    # prompts start with "P": load_prompts rightly refuses a blank one, which the pair formats allow
    "separate": st.fixed_dictionaries({"prompt": short_text.map(lambda s: "P" + s), "chosen": short_text,
                                       "rejected": short_text}),
    "dialogue": st.builds(lambda p, a, b: {"chosen": "\n\nHuman: " + p + "\n\nAssistant:" + a,
                                           "rejected": "\n\nHuman: " + p + "\n\nAssistant:" + b},
                          short_text, short_text, short_text),
    "messages_pair": st.builds(lambda h, a, b: {"chosen": h + [{"role": "assistant", "content": a}],
                                                "rejected": h + [{"role": "assistant", "content": b}]},
                               st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES),
                                                               "content": short_text}), max_size=3),
                               short_text, short_text),
    "vertex": st.fixed_dictionaries({"input_text": short_text.map(lambda s: "P" + s), "candidate_0": short_text,
                                     "candidate_1": short_text, "choice": st.sampled_from([0, 1])}),
    "prompt": st.fixed_dictionaries({"prompt": short_text.map(lambda s: "P" + s)}),
    "input_text": st.fixed_dictionaries({"input_text": short_text.map(lambda s: "P" + s)}),
    "text": st.fixed_dictionaries({"text": st.text(st.characters(codec="utf-8", exclude_characters=":="), max_size=12)
                                   .map(lambda s: "P" + s)}),  # no ':' or '=': no prompt marker to cut at
    "prompt_response": st.fixed_dictionaries({"prompt": short_text, "response": short_text}),
    "messages": st.builds(lambda h, a: {"messages": h + [{"role": "assistant", "content": a}]},
                          st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": short_text}),
                                   max_size=3), short_text),
    "imdb": st.fixed_dictionaries({"id": st.integers(0, 10**9), "rating": st.integers(0, 10),
                                   "label": st.sampled_from([-1, 0, 1]), "text": short_text}),
}
PAIRS = ["separate", "dialogue", "messages_pair", "vertex"]
ACCEPTS = {data.load_preferences: PAIRS, data.load_prompts: PAIRS + ["prompt", "input_text", "text"],
           data.load_sft: PAIRS + ["prompt_response", "text", "messages", "imdb"], data.load_imdb: ["imdb"]}


def test_valid_file_of_each_format_loads(tmp_dir):
    """The hand-written files load with every loader that accepts their format (plain and gzipped): without this,
    a loader that raised DataError on everything would pass the fuzz tests."""
    for fmt, content in VALID_FILES:
        for suffix in (".jsonl", ".jsonl.gz"):
            path = write(tmp_dir, suffix, content)
            for load, formats in ACCEPTS.items():
                if fmt in formats:
                    out = load(path)
                    assert isinstance(out, list) and len(out) >= 1, (load.__name__, fmt)
    txt = write(tmp_dir, ".txt", b"first prompt\n\nsecond prompt\n")
    assert data.load_prompts(txt) == ["first prompt", "second prompt"]
    assert data.load_sft(txt) == [data.Example("", "first prompt\n\nsecond prompt\n")]


# -----------------------------------------------------------------------------
# the fuzz tests: 4 x FUZZ.max_examples (300; FUZZ_EXAMPLES=N for more) generated files

@FUZZ
@given(file=jsonl_files())
# found by this test: a role that is an array or object (unhashable) raised TypeError
@example(file=(".jsonl", b'{"messages": [{"role": [], "content": "x"}]}\n'))
@example(file=(".jsonl", b'{"chosen": [{"role": {}, "content": "x"}], "rejected": []}\n'))
def test_fuzz_json_records(tmp_dir, file):
    """Records of the right, wrong and nearly-right key sets with values of every JSON type."""
    suffix, content = file
    check_all_loaders(write(tmp_dir, suffix, content), content)


@FUZZ
@given(file=byte_files())
def test_fuzz_bytes_and_gzip(tmp_dir, file):
    """Random bytes, damaged valid files, and broken gzip under .gz names."""
    suffix, on_disk, content = file
    check_all_loaders(write(tmp_dir, suffix, on_disk, compress=False), content)


@FUZZ
@given(file=huge_files())
# found by this test: json.loads raises ValueError (not JSONDecodeError) on an integer of over 4,300 digits;
# a long key, role or number was echoed whole into the message
@example(file=(".jsonl", b'{"prompt": ' + b"1" * 4301 + b"}\n"))
@example(file=(".jsonl", b'{"' + b"k" * 600 + b'": 1}\n'))
@example(file=(".jsonl", b'{"messages": [{"role": "' + b"r" * 600 + b'", "content": "x"}]}\n'))
@example(file=(".jsonl", b'{"id": 1, "rating": ' + b"9" * 600 + b', "label": 0, "text": "t"}\n'))
def test_fuzz_huge_and_deep_values(tmp_dir, file):
    """Huge integers, long strings and keys, many keys, and nesting deeper than Python's recursion limit."""
    suffix, content = file
    check_all_loaders(write(tmp_dir, suffix, content), content)


extra_keys = st.dictionaries(st.text(st.characters(codec="utf-8", max_codepoint=0xFFFF), max_size=6)
                             .filter(lambda k: k not in ALL_KEYS), json_values, max_size=3)  # keys of no format


@FUZZ
@given(fmt=st.sampled_from(sorted(VALID_RECORDS)), data_=st.data())
def test_fuzz_valid_files_load(tmp_dir, fmt, data_):
    """Generated valid files (any text, blank lines, BOM, CRLF, gzip) load, one item per record; keys of no format
    (extra columns, as hub datasets have) are ignored: the file loads as it does without them."""
    rows = data_.draw(st.lists(VALID_RECORDS[fmt], min_size=1, max_size=5))
    plain = write(tmp_dir, "-plain.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    without_extras = {load: load(plain) for load, formats in ACCEPTS.items() if fmt in formats}
    rows = [{**data_.draw(extra_keys), **r} if data_.draw(st.booleans()) else r for r in rows]
    lines_ = [json.dumps(r, ensure_ascii=data_.draw(st.booleans())) for r in rows]
    lines_ = [line for r in lines_ for line in [r] + data_.draw(st.sampled_from([[], [""], ["  ", ""]]))]
    end = data_.draw(st.sampled_from(["\n", "\r\n"]))
    content = (b"\xef\xbb\xbf" if data_.draw(st.booleans()) else b"") + (end.join(lines_) + end).encode()
    path = write(tmp_dir, data_.draw(st.sampled_from([".jsonl", ".json", ".jsonl.gz"])), content)
    for load, formats in ACCEPTS.items():
        if fmt in formats:
            out = load(path)
            # prompts: a preference file gives each distinct prompt once
            assert len(out) == len(rows) if load is not data.load_prompts else 1 <= len(out) <= len(rows)
            assert out == without_extras[load], load.__name__
        else:
            check(load, path, content)

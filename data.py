"""
Data for every stage: the GPT-2 tokenizer, loaders for preference pairs, prompts, SFT examples and IMDb reviews
(every loader takes several files, comma-separated), the tokenising every stage shares (the padding and layout of
a batch are model.py's), the held-out
rule, the index stream and the seed idiom, and the one atomic file writer. Bad input of any kind raises DataError
with a one-line message, "{path}:{line}: {what}", which train.py prints before exiting with status 2: never a
traceback. `python data.py split FILE --out=PREFIX` cuts a file into PREFIX-train.jsonl and PREFIX-eval.jsonl.

Files are JSON lines (.jsonl, .json, either gzipped as .gz), streamed; blank lines are skipped. A record's format is
told by its keys: the largest accepted key set that the record contains ({prompt, chosen, rejected, score} is the
{prompt, chosen, rejected} format, not {chosen, rejected}). Other keys (UltraFeedback's score columns, say) are
ignored, and one line on stderr per file says which and in how many records. A record that contains no accepted key
set is an error that names what the nearest one lacks, so a typo like "chosen_" is caught ("missing ['chosen']");
so is one that contains two of the same size ({prompt, text} as a prompt). All records of a file share a format.

  preferences  {prompt, chosen, rejected}                  strings; chosen/rejected are the responses only
                                                           (message lists, as UltraFeedback binarized: read as
                                                           {chosen, rejected} below, the prompt key ignored)
               {chosen, rejected}                          whole HH dialogues, "\\n\\nHuman: ..\\n\\nAssistant: .."
               {chosen, rejected}                          lists of {role, content} messages
               {input_text, candidate_0, candidate_1, choice}   Vertex AI; choice (0 or 1) picks the chosen one
  prompts      {prompt} | {input_text} | {text} (cut with extract_prompt) | any preference format; or a .txt file
  sft          {prompt, response} | {text} | {messages} | an IMDb row | a preference pair (its chosen response);
               or a .txt file (one whole document)
  imdb         {id, rating, label, text}   aclImdb: rating 1-10 (0 unlabelled), label 0 neg, 1 pos, -1 unlabelled

Chat layout. There are no chat tokens: a conversation is plain text. By default (--chat_template=hh) it is written
as Anthropic's HH data is, "\\n\\nHuman: hi\\n\\nAssistant: hello": render_chat() renders the messages before a reply and
ends with "\\n\\nAssistant:"; the reply is " " + content. So prompt + response is the HH dialogue itself, and since
GPT-2's pre-tokenizer splits before " word", prompt and response tokenised apart give the tokens of the whole.
--chat_template=chatml writes ChatML's markers as text; a JSON file of one's own names the five strings of
CHAT_TEMPLATES below. Prompts can come from standard input: --prompts=- (one per line).

Simplifications, on purpose: loaders return plain Python lists (preference and prompt sets are small); multi-turn
data trains on the final assistant turn only; too-long examples are truncated, never dropped (tokenize_pair says
how; the loaders report how many). Pairs that teach nothing (chosen equal to rejected, an empty prompt) are kept
and counted in a warning.
"""

import argparse
import functools
import gzip
import itertools
import json
import os
import re
import sys
import zlib
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from tiktoken import Encoding
from tiktoken.load import load_tiktoken_bpe

from config import plural

EOS = 50256           # <|endoftext|>: ends every response and separates documents
PAD = 50257           # padding only: an id GPT-2 never produces, so padding can't be mistaken for an EOS

BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "r50k_base.tiktoken")
BPE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class DataError(Exception):
    """Bad input data. The message is always one line: '{path}:{line}: {what}' or '{path}: {what}'."""

    def __init__(self, msg):
        super().__init__(msg.replace("\r", "\\r").replace("\n", "\\n"))


# -----------------------------------------------------------------------------
# tokenizer

@functools.lru_cache(maxsize=None)
def get_tokenizer(path=BPE_PATH):
    """The GPT-2 tiktoken Encoding, built offline from the vocabulary file in assets/ (cached)."""
    try:
        # the hash check makes a corrupted or wrong vocabulary fail loudly instead of training on garbage
        # (tiktoken also keeps a verified copy in its cache folder, $TIKTOKEN_CACHE_DIR or the temp dir)
        ranks = load_tiktoken_bpe(path, expected_hash=BPE_SHA256)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    except ValueError:
        raise DataError(f"{path}: not the GPT-2 BPE file (sha256 is not {BPE_SHA256[:16]}...)") from None
    return Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": EOS})


def encode(text):
    # encode_ordinary: "<|endoftext|>" written in a dataset is text, not a way to end a sequence early
    return get_tokenizer().encode_ordinary(text)


def decode(ids):
    ids = ids.tolist() if hasattr(ids, "tolist") else ids  # a tensor or array as well as a list
    return get_tokenizer().decode([i for i in ids if i < EOS])  # EOS and PAD are never printed


# -----------------------------------------------------------------------------
# reading files

def _lines(path):
    """Yield (line_no, line) of a UTF-8 text file, gzipped if it ends in .gz; every failure is a DataError."""
    path = str(path)
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a file")
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    gz = path.endswith(".gz")
    empty = True
    try:
        with (gzip.open if gz else open)(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # -sig: tolerate a byte-order mark
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{n}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r} "
                                    f"at byte {e.start + 1} of the line)") from None
                empty = empty and not line.strip()
                yield n, line
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a truncated gzip an EOFError
        raise DataError(f"{path}: " + (f"corrupt gzip file ({e})" if gz else f"cannot read ({e})")) from None
    if empty:
        raise DataError(f"{path}: empty file")


def read_jsonl(path):
    """Yield (line_no, obj) for each JSON object in a JSON-lines file, streaming; blank lines are skipped."""
    for n, line in _lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            # e.msg of some errors ends in "at" already ("Invalid control character at"); e.pos counts from the
            # start of the line (e.colno restarts at 1 after its final newline: a line cut short read "column 1")
            what = e.msg.removesuffix(" at")
            if what == "Invalid control character" and line[e.pos] in "\r\n":  # the line end inside a string
                what = "Unterminated string"
            where = "at the end of the line" if e.pos >= len(line.rstrip()) else f"at column {e.pos + 1}"
            raise DataError(f"{path}:{n}: bad JSON: {what} {where}") from None
        except RecursionError:
            raise DataError(f"{path}:{n}: bad JSON: nested too deeply") from None
        except ValueError as e:  # e.g. an integer of more than 4,300 digits
            raise DataError(f"{path}:{n}: bad JSON: {_short(str(e), 80)}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object {{...}}, got {_kind(obj)}")
        yield n, obj


def _kind(value):
    """The JSON name of a value's type, for error messages."""
    return {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "an array",
            dict: "an object"}.get(type(value), "null")


@contextmanager
def atomic_write(path, mode="w", durable=False):
    """The one way this project writes a file: into a temporary file beside it, renamed over it at the end, so a
    kill at any moment leaves the old file or the new one, never half of one; a failure removes the temporary file.
    durable: fsync the file and the folder too, so that the rename survives a power cut (checkpoints)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_jsonl(path, rows):
    """JSON lines, one object per line, written atomically."""
    with atomic_write(path) as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def write_json(path, obj):
    """One JSON object, indented, written atomically."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=1, default=str)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def _field(path, n, obj, key, kind=str):
    """obj[key], checked to be of JSON type `kind` (str, int or list; a boolean is never an integer)."""
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{path}:{n}: '{key}' must be {_kind(kind())}, got {_kind(value)}")
    return value


def _short(value, limit=40):
    """repr(value), cut to `limit` characters: error messages quote the input, but stay short."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _keys(keys):
    """A record's key set for an error message: sorted, each key and the whole list cut short."""
    return _short([_short(k, 30) if len(k) > 30 else k for k in sorted(keys)], 64)


def _format(path, n, keys, formats):
    """The name of the format of a record with these keys: the largest accepted key set that they contain."""
    names = [name for name, want in formats.items() if set(want) <= keys]
    if not names:
        # name what the nearest key set lacks: a typo like "chosen_" then reads "missing ['chosen']"
        near = set(max(formats.values(), key=lambda want: len(keys & set(want))))
        hint = "; ".join(f"{what} {_keys(ks)}" for what, ks in
                         (("missing", near - keys), ("unrecognised", keys - near)) if ks and keys & near)
        hint = f" ({hint})" if hint else ""
        accepted = " or ".join("{" + ", ".join(want) + "}" for want in formats.values())
        raise DataError(f"{path}:{n}: unrecognised keys {_keys(keys)}{hint}; expected {accepted}")
    largest = max(len(formats[name]) for name in names)
    names = [name for name in names if len(formats[name]) == largest]
    if len(names) > 1:  # e.g. {prompt, text} for prompts: which one is the prompt?
        raise DataError(f"{path}:{n}: keys {_keys(keys)} hold more than one format, "
                        + " and ".join("{" + ", ".join(formats[name]) + "}" for name in names) + "; keep one")
    return names[0]


def _records(path, formats):
    """Yield (line_no, format_name, obj), the format told by which key set of `formats` the record holds (the
    largest, if it holds several). Other keys are ignored, and said so in one line on stderr per file."""
    first, refused = None, False
    ignored, n_rows, n_extra = {}, 0, 0  # ignored: key -> number of records that had it
    try:
        for n, obj in read_jsonl(path):
            keys = set(obj)
            name = _format(path, n, keys, formats)
            if name == "separate" and isinstance(obj["chosen"], list) and "dialogue" in formats:
                name = "dialogue"  # message lists: the prompt is their first turns (UltraFeedback binarized)
            first = first or (name, n)
            if name != first[0]:
                raise DataError(f"{path}:{n}: keys {_keys(keys)} differ from those of line {first[1]}, "
                                f"{sorted(formats[first[0]])}; formats cannot be mixed in one file")
            extra = keys - set(formats[name])
            n_rows, n_extra = n_rows + 1, n_extra + bool(extra)
            for key in extra:
                ignored[key] = ignored.get(key, 0) + 1
            yield n, name, obj
    except DataError:
        refused = True
        raise
    finally:  # also when the reader stops early (a limit), but not for a file refused here
        if ignored and not refused:
            counts = sorted(ignored.items(), key=lambda kv: (-kv[1], kv[0]))
            shown = ", ".join(f"{_short(k, 30)}: {c:,}" for k, c in counts[:5])
            more = f" and {len(counts) - 5:,} more" if len(counts) > 5 else ""
            print(f"{path}: ignored keys outside the {{{', '.join(formats[first[0]])}}} format in {n_extra:,} of "
                  f"{n_rows:,} records read (key: records): {shown}{more}", file=sys.stderr)


def _is_text_file(path):
    return str(path).endswith((".txt", ".txt.gz"))


# -----------------------------------------------------------------------------
# chat layout, prompt extraction, review cleaning

ROLES = {"system": "System", "user": "Human", "assistant": "Assistant"}
ASSISTANT = "\n\nAssistant:"

# --chat_template: each role's turn, the text that asks for a reply (generation), and the reply itself; "{content}"
# stands for a message's text. hh is the layout of Anthropic's HH-RLHF data; chatml is OpenAI's ChatML, whose
# markers GPT-2 has no tokens for, so they are plain text here.
CHAT_TEMPLATES = {
    "hh": dict(system="\n\nSystem: {content}", user="\n\nHuman: {content}", assistant="\n\nAssistant: {content}",
               generation=ASSISTANT, reply=" {content}"),
    "chatml": dict(system="<|im_start|>system\n{content}<|im_end|>\n", user="<|im_start|>user\n{content}<|im_end|>\n",
                   assistant="<|im_start|>assistant\n{content}<|im_end|>\n", generation="<|im_start|>assistant\n",
                   reply="{content}<|im_end|>"),
}
_chat_template = CHAT_TEMPLATES["hh"]


def use_chat_template(spec):
    """Render message lists with the template named spec (hh, chatml) or read from a JSON file holding the five
    keys of CHAT_TEMPLATES' entries (every one but generation containing "{content}"); a bad file is a DataError."""
    global _chat_template
    if spec in CHAT_TEMPLATES:
        _chat_template = CHAT_TEMPLATES[spec]
        return _chat_template
    if not os.path.isfile(spec):
        raise DataError(f"--chat_template={spec}: not {', '.join(CHAT_TEMPLATES)}, nor a file")
    try:
        with open(spec, encoding="utf-8") as f:
            t = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{spec}: not a JSON chat template ({' '.join(str(e).split())[:80]})") from None
    keys = set(CHAT_TEMPLATES["hh"])
    if not isinstance(t, dict) or set(t) != keys or not all(isinstance(v, str) for v in t.values()):
        raise DataError(f"{spec}: a chat template is a JSON object of exactly the strings {', '.join(sorted(keys))}")
    lacking = [k for k in keys - {"generation"} if "{content}" not in t[k]]
    if lacking:
        raise DataError(f"{spec}: '{lacking[0]}' must contain {{content}}, where the message's text goes")
    _chat_template = t
    return t


def render_chat(messages):
    """Messages [{role, content}] before a reply -> the prompt in the chat template (hh by default:
    '\\n\\nHuman: ...\\n\\nAssistant:'), to be continued by render_reply(reply). Roles are assumed valid here;
    the loaders check them."""
    t = _chat_template
    return "".join(t[m["role"]].replace("{content}", m["content"]) for m in messages) + t["generation"]


def render_reply(content):
    """An assistant reply as the template writes it after render_chat's prompt (hh: ' ' + content)."""
    return _chat_template["reply"].replace("{content}", content)


def _split_messages(path, n, key, messages):
    """A message list ending with an assistant turn -> (prompt, response) in the layout of render_chat."""
    for i, m in enumerate(messages):
        where = f"{path}:{n}: '{key}' message {i}"
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise DataError(f"{where}: expected an object with exactly the keys 'role' and 'content'")
        if not isinstance(m["role"], str) or m["role"] not in ROLES:
            raise DataError(f"{where}: role {_short(m['role'])} is not one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: 'content' must be a string, got {_kind(m['content'])}")
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError(f"{path}:{n}: '{key}' must end with an assistant message")
    return render_chat(messages[:-1]), render_reply(messages[-1]["content"])


def extract_prompt(text):
    """The prompt inside a whole example, cut at the first kind of marker found:
    HH '\\n\\nHuman: ...\\n\\nAssistant:' and '### Human: ... ### Assistant:' keep everything up to and
    including the last assistant marker (so a reply continues it); 'Input=' and '{{Text}}:' keep the
    (stripped) text after the marker. With no marker, the whole text is the prompt."""
    if ASSISTANT in text:
        return text[:text.rindex(ASSISTANT) + len(ASSISTANT)]
    ends = [m.end() for m in re.finditer(r"### ?Assistant:", text)]
    if ends:
        return text[:ends[-1]]
    for marker in ("Input=", "{{Text}}:"):
        if marker in text:
            return text.split(marker, 1)[1].strip()
    return text


def clean_review(text):
    """IMDb text with its HTML line breaks as newlines ('<br /><br />' becomes a paragraph break), stripped."""
    return re.sub(r"<br\s*/?>", "\n", text, flags=re.IGNORECASE).strip()


# -----------------------------------------------------------------------------
# loaders

@dataclass
class Pair:
    prompt: str
    chosen: str    # the chosen response only, without the prompt
    rejected: str  # the rejected response only


@dataclass
class Example:
    prompt: str    # no loss here; "" means the loss is on all of the text
    response: str  # loss here


PAIR_FORMATS = {"separate": ("prompt", "chosen", "rejected"), "dialogue": ("chosen", "rejected"),
                "vertex": ("input_text", "candidate_0", "candidate_1", "choice")}
PROMPT_FORMATS = {"prompt": ("prompt",), "input_text": ("input_text",), "text": ("text",), **PAIR_FORMATS}
IMDB_KEYS = ("id", "rating", "label", "text")
SFT_FORMATS = {"prompt_response": ("prompt", "response"), "text": ("text",), "messages": ("messages",),
               "imdb": IMDB_KEYS, **PAIR_FORMATS}  # a preference pair trains on its chosen response


def _pair(path, n, fmt, obj):
    if fmt == "separate":
        return Pair(*(_field(path, n, obj, k) for k in PAIR_FORMATS["separate"]))
    if fmt == "vertex":
        prompt, a, b = (_field(path, n, obj, k) for k in ("input_text", "candidate_0", "candidate_1"))
        choice = _field(path, n, obj, "choice", int)
        if choice not in (0, 1):
            raise DataError(f"{path}:{n}: 'choice' must be 0 or 1, got {_short(choice)}")
        return Pair(prompt, a, b) if choice == 0 else Pair(prompt, b, a)
    if isinstance(obj["chosen"], list):  # {chosen, rejected} as message lists
        (prompt, chosen), (prompt_r, rejected) = (_split_messages(path, n, k, _field(path, n, obj, k, list))
                                                  for k in ("chosen", "rejected"))
        if prompt != prompt_r:
            raise DataError(f"{path}:{n}: 'chosen' and 'rejected' differ before their last assistant message")
        return Pair(prompt, chosen, rejected)
    # {chosen, rejected} as whole HH dialogues. The prompt ends at the last "\n\nAssistant:" that the two
    # share. That is the last marker of chosen in all but a few pairs; in the others the chosen reply itself
    # holds a second "\n\nAssistant:" turn (6 of 4,666 pairs in the HH test splits), and cutting at chosen's
    # own last marker would put half of that reply into the prompt.
    chosen, rejected = _field(path, n, obj, "chosen"), _field(path, n, obj, "rejected")
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if ASSISTANT not in text:
            raise DataError(f"{path}:{n}: '{key}' has no '\\n\\nAssistant:' turn")
    shared = os.path.commonprefix([chosen, rejected])
    if ASSISTANT not in shared:
        raise DataError(f"{path}:{n}: 'chosen' and 'rejected' share no prompt ending in '\\n\\nAssistant:'")
    cut = shared.rindex(ASSISTANT) + len(ASSISTANT)
    return Pair(chosen[:cut], chosen[cut:], rejected[cut:])


def files(paths):
    """'a.jsonl,b.jsonl.gz' -> ['a.jsonl', 'b.jsonl.gz']: every loader takes several files, comma-separated."""
    return [p.strip() for p in str(paths).split(",") if p.strip()]


def load_preferences(paths, limit=None):
    """Preference pairs from any of the four formats in the module docstring -> list[Pair] (at most `limit` per file).
    Pairs that cannot teach anything are kept, but counted in a warning per file: chosen equal to rejected (no
    preference), and an empty prompt."""
    pairs = []
    for path in files(paths):
        mine = list(itertools.islice((_pair(path, n, fmt, obj) for n, fmt, obj in _records(path, PAIR_FORMATS)), limit))
        same, empty = sum(p.chosen == p.rejected for p in mine), sum(not p.prompt.strip() for p in mine)
        if same or empty:
            print(f"warning: {path}: " + "; ".join(f"{what} in {n:,} of {len(mine):,} pairs" for what, n in (
                ("the chosen and rejected responses are the same (no preference to learn)", same),
                ("the prompt is empty", empty)) if n), file=sys.stderr)
        pairs += mine
    return pairs


def looks_like_preferences(paths):
    """Whether the first record of the first file is a preference pair (of the formats an SFT file may hold)."""
    path = files(paths)[0]
    first = (_format(path, n, set(obj), SFT_FORMATS) for n, obj in ([] if _is_text_file(path) else read_jsonl(path)))
    return next(first, None) in PAIR_FORMATS


def _prompts(path):
    if path == "-":  # standard input, one prompt per non-blank line
        prompts = [line.rstrip("\r\n") for line in sys.stdin if line.strip()]
        if not prompts:
            raise DataError("-: no prompts on standard input")
        yield from prompts
        return
    if _is_text_file(path):
        yield from (line.rstrip("\r\n") for _, line in _lines(path) if line.strip())
        return
    seen = set()  # a preference file repeats a prompt once per pair; yield each once
    for n, fmt, obj in _records(path, PROMPT_FORMATS):
        if fmt in PAIR_FORMATS:
            prompt = _pair(path, n, fmt, obj).prompt
            if prompt in seen:
                continue
            seen.add(prompt)
        else:
            prompt = _field(path, n, obj, fmt)  # the format is named after its one key
            prompt = extract_prompt(prompt) if fmt == "text" else prompt
        if not prompt.strip():
            raise DataError(f"{path}:{n}: empty prompt")
        yield prompt


def load_prompts(paths, limit=None, room=0):
    """Prompts for sampling -> list[str] (at most `limit` in all), from .txt files (one per non-blank line), JSON
    lines, or standard input (-). room: the tokens a prompt may have (block_size - max_new_tokens); a line says how
    many are longer, as sampling keeps only their last `room` tokens (model.sample_responses)."""
    prompts = list(itertools.islice((p for path in files(paths) for p in _prompts(path)), limit))
    n_long = sum(len(encode_prompt(p)) > room for p in prompts) if room > 0 else 0
    if n_long:
        print(f"{paths}: {n_long} of {plural(len(prompts), 'prompt')} are longer than block_size - max_new_tokens = "
              f"{room} tokens; each keeps its last {room}")
    return prompts


def _imdb_row(path, n, obj):
    row = {k: _field(path, n, obj, k, int) for k in ("id", "rating", "label")}
    if row["label"] not in (-1, 0, 1):
        raise DataError(f"{path}:{n}: 'label' must be -1 (unlabelled), 0 (negative) or 1 (positive), "
                        f"got {_short(row['label'])}")
    if not 0 <= row["rating"] <= 10:
        raise DataError(f"{path}:{n}: 'rating' must be 0 to 10, got {_short(row['rating'])}")
    row["text"] = clean_review(_field(path, n, obj, "text"))
    return row


def load_imdb(path, limit=None):
    """IMDb rows {id, rating, label, text} with cleaned text -> list[dict]; streamed, so limit is cheap."""
    rows = (_imdb_row(path, n, obj) for n, _, obj in _records(path, {"imdb": IMDB_KEYS}))
    return list(itertools.islice(rows, limit))


def _examples(path):
    if _is_text_file(path):  # a plain corpus: one document, loss on all of it
        yield Example("", "".join(line for _, line in _lines(path)))
        return
    for n, fmt, obj in _records(path, SFT_FORMATS):
        if fmt == "prompt_response":
            yield Example(_field(path, n, obj, "prompt"), _field(path, n, obj, "response"))
        elif fmt == "text":
            yield Example("", _field(path, n, obj, "text"))
        elif fmt == "messages":
            yield Example(*_split_messages(path, n, "messages", _field(path, n, obj, "messages", list)))
        elif fmt in PAIR_FORMATS:
            pair = _pair(path, n, fmt, obj)
            yield Example(pair.prompt, pair.chosen)
        else:
            yield Example("", _imdb_row(path, n, obj)["text"])


def load_sft(paths, limit=None):
    """Supervised examples -> list[Example] (at most `limit` per file), from the SFT formats in the module
    docstring."""
    return [ex for path in files(paths) for ex in itertools.islice(_examples(path), limit)]


# -----------------------------------------------------------------------------
# tokenising and batching

def encode_prompt(text):
    """A prompt's ids: EOS first, standing in for a beginning-of-text token as it does between the documents of
    the training corpus (GPT-2 has no BOS), so that an empty prompt still gives the first token a context."""
    return [EOS] + encode(text)


def tokenize_pair(prompt, responses, block_size, append_eos=True):
    """prompt and its responses -> (prompt_ids, [response_ids, ...], truncated), each response ending in EOS
    (append_eos=False: as written, for responses that were cut at a fixed length rather than ended), so that
    prompt + any response fits in block_size tokens.

    A too-long pair loses the start of its prompt first (the latest context matters most), but the prompt keeps
    at least half the block (or all of itself if shorter) so that a long response still has something to
    respond to; then the responses are cut from the right, losing their EOS: `truncated` says so."""
    p, rs = encode_prompt(prompt), [encode(r) + [EOS] * append_eos for r in responses]
    longest = max(len(r) for r in rs)
    truncated = len(p) + longest > block_size
    if truncated:
        keep = max(block_size - longest, min(len(p), block_size // 2))  # prompt tokens kept
        p, rs = p[len(p) - keep:], [r[:block_size - keep] for r in rs]
    return p, rs, truncated


# -----------------------------------------------------------------------------
# datasets as batches: the held-out rule, the index stream, and the batches of SFT, reward modelling and DPO

def derived_seed(*keys):
    """The one seeding idiom: a seed for one random draw of a run, from non-negative integers such as (seed, step,
    stream). SeedSequence mixes them, so two runs (or two streams of one run) never share draws the way seed * K + step
    can. Every batch and sample of a run is a function of these keys alone, so a resumed run draws the same."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def heldout_split(items, frac=0.1):
    """The one held-out rule: the last `frac` of a dataset (a list of examples or a token array), at least one item,
    the same every run."""
    n = max(1, int(len(items) * frac))
    return items[:-n], items[-n:]


def epoch_indices(n, step, batch_size, seed, total=None):
    """Item indices of step's batch: draws step*B .. (step+1)*B - 1 (fewer at the end of `total` draws) of a stream
    that visits all n items once per pass, each pass in an order drawn from (seed, pass) alone. So a batch is a pure
    function of the step, and no item is dropped or repeated within a pass. (Prompts of PPO, pairs of the reward
    model and DPO, examples of SFT.)"""
    end = (step + 1) * batch_size if total is None else min((step + 1) * batch_size, total)
    draws = range(step * batch_size, end)
    perms = {e: torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed(seed, e)))
             for e in {d // n for d in draws}}
    return [int(perms[d // n][d % n]) for d in draws]


def split_file(path, eval_fraction, out_prefix):
    """Split a JSONL(.gz) file's records into OUT_PREFIX-train.jsonl and OUT_PREFIX-eval.jsonl: the last
    eval_fraction of them (in file order) for evaluation. Records are checked to be JSON objects, not converted."""
    rows = [obj for _, obj in read_jsonl(path)]
    if not rows:
        raise DataError(f"{path}: empty file, nothing to split")
    n_eval = max(1, round(len(rows) * eval_fraction))
    for name, part in (("train", rows[:-n_eval]), ("eval", rows[-n_eval:])):
        write_jsonl(f"{out_prefix}-{name}.jsonl", part)
    return len(rows) - n_eval, n_eval


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="python data.py split FILE --out=PREFIX: the last 10% of FILE's "
                                                 "records to PREFIX-eval.jsonl, the rest to PREFIX-train.jsonl")
    parser.add_argument("command", choices=["split"])
    parser.add_argument("file")
    parser.add_argument("--eval_fraction", type=float, default=0.1, help="share of records, from the end, for eval")
    parser.add_argument("--out", required=True, help="output prefix, e.g. data/helpful")
    args = parser.parse_args()
    try:
        n_train, n_eval = split_file(args.file, args.eval_fraction, args.out)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{args.out}-train.jsonl: {plural(n_train, 'record')}; {args.out}-eval.jsonl: {plural(n_eval, 'record')}")

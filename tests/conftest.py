"""Shared test helpers: run train.py as a user would, and kill it at random moments."""
import contextlib
import io
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

# One intra-op thread per process: the suite runs on 2 cores with the tiny pipeline's story in a background thread
# (below) and training runs in subprocesses, so more threads would only wait on each other (measured: ~60 CPU-seconds
# spent spinning over the suite with PyTorch's default of one thread per core).
os.environ["OMP_NUM_THREADS"] = "1"


def child_env():
    """The environment of a train.py child: this one's (one thread, above), unbuffered output, no progress bars."""
    return dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TINY_MODEL = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=64"]


def run_cli(*args, timeout=240, check=True):
    """python train.py ARGS in the repository root; returns the CompletedProcess (text output). One thread (see
    one_thread below), so that runs compared bit for bit compute the same bits."""
    env = child_env()
    p = subprocess.run([sys.executable, "train.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py {' '.join(map(str, args))} exited {p.returncode}:\n{p.stdout[-3000:]}\n"
                             f"{p.stderr[-3000:]}")
    return p


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def kill_and_resume(args, out_dir, kills=2, seed=0, timeout=240):
    """Start `train.py ARGS --out_dir=OUT`, SIGKILL it at a random moment after its first checkpoint exists,
    `kills` times, resuming with --resume each time; then let it finish. Returns the number of kills that hit a
    running process (a run may finish before its kill)."""
    rng = random.Random(seed)
    env = child_env()
    ckpt = os.path.join(out_dir, "ckpt.pt")
    hits = 0
    for i in range(kills + 1):
        cmd = [sys.executable, "train.py", *map(str, args), f"--out_dir={out_dir}"] + (["--resume"] if i else [])
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if i < kills:
            before = os.path.getmtime(ckpt) if os.path.exists(ckpt) else None
            t0 = time.time()
            while p.poll() is None and time.time() - t0 < timeout:  # wait for a new checkpoint, then a bit more
                if os.path.exists(ckpt) and os.path.getmtime(ckpt) != before:
                    time.sleep(rng.uniform(0.0, 0.8))
                    break
                time.sleep(0.02)
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                hits += 1
        out, err = p.communicate(timeout=timeout)
        if i == kills or p.returncode not in (0, -signal.SIGKILL):
            assert p.returncode == 0, f"{cmd} exited {p.returncode}:\n{out[-2000:]}\n{err[-2000:]}"
            if i < kills:  # finished before we could kill it: nothing left to resume
                break
    return hits


def interrupt_and_resume(args, out_dir, sig=signal.SIGINT, timeout=240):
    """Start `train.py ARGS --out_dir=OUT` as a user would, press Ctrl-C (sig) once its first checkpoint exists, then
    run, verbatim, the command it printed ("continue with: python train.py STAGE --resume --out_dir=OUT"). Returns
    that command and what the resumed run printed (CompletedProcess)."""
    env = child_env()
    p = subprocess.Popen([sys.executable, "train.py", *map(str, args), f"--out_dir={out_dir}"], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while p.poll() is None and not os.path.exists(os.path.join(out_dir, "ckpt.pt")) and time.time() - t0 < timeout:
        time.sleep(0.02)
    assert p.poll() is None, "the run ended before its first checkpoint: give it more steps"
    p.send_signal(sig)
    err = p.communicate(timeout=timeout)[1]
    assert p.returncode == 130, err[-2000:]
    hint = re.search(r"continue with: (.+)", err)[1]
    argv = shlex.split(hint)
    assert argv[:2] == ["python", "train.py"] and "--resume" in argv, hint
    done = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return hint, done


def timeless(rows):
    """metrics.jsonl rows without their timings (ms_per_step, time/*), which no two runs share."""
    return [{k: v for k, v in r.items() if k != "ms_per_step" and not k.startswith("time/")} for r in rows]


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: under load, PyTorch's multi-threaded CPU kernels can differ in the last bit
    between two runs of the same computation (seen on 2 cores), and bit-for-bit tests need the same bits."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def root():
    return ROOT


def main_in_process(*args):
    """train.main(ARGS) in this process, as run_cli runs it in a child (one thread, no progress bars), without the
    child's ~2 s of start-up: returns (exit status, stdout, stderr). Restores the signal handlers a Run installs.
    For runs that no signal reaches (a thread cannot take them)."""
    import torch
    import train
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threads, out, err = torch.get_num_threads(), io.StringIO(), io.StringIO()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = train.main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)
        for s, h in handlers.items():
            signal.signal(s, h)
    assert code == 0, f"train.py {' '.join(map(str, args))} exited {code}:\n{out.getvalue()[-3000:]}\n" \
                      f"{err.getvalue()[-3000:]}"
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def in_process(capsys):
    """train.main(ARGS) in this process, for errors found before any training (much faster than a subprocess):
    returns (exit status, stdout, stderr). Restores the signal handlers a Run installs."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def call(*args):
        import train
        code = train.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err
    yield call
    for s, h in handlers.items():
        signal.signal(s, h)


# ----------------------------------------------------------------------------------------------------------------
# end-to-end stories that take minutes, run one after the other in a thread from the start of the session: most tests
# use one thread of the two cores, so the second core does these meanwhile. A module's fixture waits for its story's
# result (background_result); the tests that wait run last.

# story name (the fixture that waits for it) -> (its module, the function that tells it, given a folder)
STORIES = {"tiny": ("test_pipeline", "tiny_story"), "launched": ("test_dist", "torchrun_story")}
BACKGROUND = {}  # name -> (done event, result box, folder)


def story_of(item):
    """The story a test waits for (a fixture of that name in the story's module), or None."""
    module = os.path.splitext(os.path.basename(str(item.fspath)))[0]
    return next((name for name, (mod, _) in STORIES.items()
                 if mod == module and name in getattr(item, "fixturenames", ())), None)


def pytest_collection_modifyitems(items):
    """The tests that wait for a story last, in the stories' order (a stable sort keeps the rest in order): the
    foreground then works while the stories run, instead of waiting for them halfway through the suite."""
    order = list(STORIES)
    items.sort(key=lambda item: order.index(story_of(item)) + 1 if story_of(item) else 0)


def pytest_collection_finish(session):
    """Start the stories that a collected test needs (none when only other tests are selected), in one thread."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    wanted = [name for name in STORIES if any(story_of(item) == name for item in session.items)]
    for name in wanted:
        BACKGROUND[name] = (threading.Event(), {}, Path(tempfile.mkdtemp(prefix=f"rlhf-{name}-")))

    def tell_them():
        for name in wanted:
            done, box, folder = BACKGROUND[name]
            module, function = STORIES[name]
            try:
                box["result"] = getattr(__import__(module), function)(folder)
            except BaseException as e:  # reported by the tests that need it
                box["error"] = e
            done.set()
    if wanted:
        threading.Thread(target=tell_them, daemon=True).start()


def background_result(name):
    done, box, _ = BACKGROUND[name]
    done.wait()
    if "error" in box:
        raise box["error"]
    return box["result"]


def pytest_sessionfinish(session):
    for done, _, folder in BACKGROUND.values():
        done.wait(timeout=600)
        shutil.rmtree(folder, ignore_errors=True)

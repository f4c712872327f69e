"""
The pipeline on your own data (stage `pipeline` given --preferences, or an own-data preset): supervised fine-tuning on
your examples, a reward model on your preference pairs, every method on your prompts, and a report judged by that
reward model, as your data has no gold judge. The IMDb benchmark (pipeline.py) shares its parts: pipeline.Queue and
with_queue for the sub-runs, report.evaluate_run and report.Evaluator for the samples. It keeps a run_pipeline of its
own (a scope cut, on purpose): its replicates, gold-labelled pairs, best-of-N pool and exact optimum would be callbacks
here.

    python train.py pipeline --preferences=pairs.jsonl --init_from=out/sft/ckpt.pt --out_dir=out/mine
    python train.py pipeline --preferences=pairs.jsonl --sft_data=chat.jsonl --prompts=prompts.txt \\
        --eval_preferences=heldout.jsonl --methods=ppo,dpo --init_from=gpt2/ --out_dir=out/mine
    python train.py pipeline --preset=hh-cpu --out_dir=out/hh    # Anthropic HH-RLHF test pairs, ~4 min on 2 cores

Files: every format the loaders read (data.py: Vertex AI rows, HH dialogues, {messages}, {prompt, chosen,
rejected}; prompts also as .txt, one per line), several comma-separated. The steps, each skipped where not needed:
1. One held-out split for every step (make_splits; OUT_DIR/splits/): the held-out pairs are --eval_preferences, or
   else the pairs of the last 10% of each --preferences file's distinct prompts (the project's one rule,
   data.heldout_split); the report's prompts are --eval_prompts, or else the held-out pairs' prompts. No step
   trains on a held-out prompt: it is left out of the training pairs, the RL prompts (--prompts, or else the
   training pairs' prompts) and the SFT examples.
2. SFT: stage sft on --sft_data from --init_from (a checkpoint or a GPT-2 folder; from scratch at the preset's size
   without it). Without --sft_data the policy is --init_from itself.
3. One queue: the reward model, if a method needs one (ppo, rloo, grpo, online_dpo; DPO and its variants alone run
   without), then every method at the preset's strengths.
4. Evaluation on the held-out prompts (report.Evaluator, one sample each at temperature 1): the reward model's
   accuracy on the held-out pairs with a 95% interval (Wilson's), and per file where there are several; each
   policy's mean reward (normalised as in training: 0 mean, unit sd on SFT samples) and KL to the SFT model; its
   win rate against the SFT model's response to the same prompt, judged by the reward model (a tie counts half),
   with a 95% interval (over prompts); DPO's implicit-reward accuracy on the held-out pairs (from its run's final
   evaluation). Beside the reward model's accuracy, a bag-of-words reference's (bag_of_words). With --gold (a judge
   of your own, FILE.py:FUNCTION or a reward checkpoint, that no method trains on) each policy's mean gold score and
   win rate by it too: the IMDb benchmark's gold reward is such a judge (--gold=imdb.py:gold_reward).
5. The report: results.json, results.md, side_by_side.html (the first prompts with every policy's response; a
   browser opens it), frontier.png (reward against KL), and the best policy as a Hugging Face GPT-2 folder, best/.
   The rule: the highest win rate against SFT by --gold's judge where there is one, else by the reward model (ties:
   the lower KL); with neither, the highest implicit-reward accuracy.

Re-running the same command reuses what the same inputs made (sub-runs, splits, evaluations), as pipeline.py's.
A method that fails leaves the others: the report names it and why, and the pipeline exits with status 1.

Simplifications, on purpose: one replicate (the IMDb benchmark measures the spread); no Preferred-FT or PPO on
--gold; without --gold the win rate is judged by the same reward model the RL methods optimise, so it flatters them
(reward hacking shows as a high win rate with a high KL: read the two together, and the samples).
"""
import html
import itertools
import math
import os
import shutil
import sys

import torch

import reward
from checkpoint import ExportConfig, export, fingerprint, load_checkpoint
from config import ConfigError, TrainingError, parse_config, plural
from data import (PAD, DataError, encode, files, heldout_split, load_preferences, load_prompts, load_sft,
                  read_json, read_jsonl, write_json, write_jsonl)
from imdb import ROOT, SFT_CPU_PATH, TEMPERATURE
from pipeline import METHODS, run_name, stale, with_queue
from report import Evaluator, color, evaluate_run, method_of, pyplot

HH = ",".join(os.path.join(ROOT, "..", "shared", "data", "hh-rlhf", f"{s}-base-test.jsonl.gz")
              for s in ("helpful", "harmless"))
NEEDS_REWARD = ("ppo", "rloo", "grpo", "online_dpo")
OWN_METHODS = ("ppo", "rloo", "grpo", "online_dpo", "dpo", "ipo", "unlikelihood")
LENGTH = PAD  # the bag-of-words reference's feature after the token ids (all below PAD): the length difference
OPTIONAL = dict(ipo=[0.1], unlikelihood=[0.5], online_dpo=[0.1])  # strengths of the methods a preset may leave out

# The own-data presets: "own" for any --preferences (when --preset is left at the IMDb default), hh-cpu on the
# Anthropic HH-RLHF test pairs, own-tiny for the tests. Keys as in imdb.PRESETS; data keys (preferences, sft_data,
# init_from) are defaults that the command line overrides.
#   sft: keys of the SFT sub-run (the model's shape only applies from scratch); n_eval_prompts: held-out prompts
#   evaluated (at most); n_side: prompts in the side-by-side page
_SMALL = dict(
    sft=dict(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=16, max_iters=200, learning_rate=1e-3,
             warmup_iters=10, eval_interval=100),
    max_new_tokens=24, n_eval_prompts=128, n_side=6, jobs=2, seeds=[1],
    reward=dict(learning_rate=1e-3, epochs=1),
    methods=dict(ppo=[0.05], dpo=[0.1], rloo=[0.05], grpo=[0.04]),
    rl=dict(batch_size=32, minibatch_size=16, micro_batch_size=32, max_iters=20, learning_rate=3e-4,
            whiten_rewards=True, eval_interval=1000),
    online_dpo=dict(batch_size=16, max_iters=20, learning_rate=3e-4),
    # reference log-probs per batch: caching them for every pair first costs more than 60 steps use
    dpo=dict(batch_size=32, max_iters=60, learning_rate=3e-4, eval_interval=1000, ref_cache=False))
# for a model of GPT-2 small's order (tens of millions of weights and up) on a GPU: smaller learning rates, longer
# windows and responses, more held-out prompts
_GPU = dict(
    sft=dict(n_layer=6, n_head=6, n_embd=384, block_size=512, batch_size=32, max_iters=400, learning_rate=3e-4,
             warmup_iters=20, eval_interval=100),
    max_new_tokens=48, n_eval_prompts=512, n_side=8, jobs=5, seeds=[1],
    reward=dict(learning_rate=5e-5, epochs=2, batch_size=32),
    methods=dict(ppo=[0.05, 0.2], dpo=[0.1, 0.5], rloo=[0.05], grpo=[0.05]),
    rl=dict(batch_size=64, minibatch_size=32, micro_batch_size=64, max_iters=60, learning_rate=1e-5,
            whiten_rewards=True, eval_interval=1000, snapshot_steps="10,30"),
    online_dpo=dict(batch_size=32, max_iters=60, learning_rate=1e-5),
    dpo=dict(batch_size=32, learning_rate=2e-5, eval_interval=1000, snapshot_steps="20,60"))
PRESETS = {
    "own": _SMALL,
    "own-gpu": _GPU,
    # a model that knows English first (no GPT-2 weights offline: the README pre-trains one on IMDb's reviews),
    # fine-tuned on the chosen dialogues
    "hh-gpu": dict(_GPU, preferences=HH, sft_data=HH),
    # the committed 2-layer IMDb SFT model (it knows English) fine-tuned on the chosen dialogues: a 64-token window,
    # so each prompt keeps its last turns
    "hh-cpu": dict(_SMALL, preferences=HH, sft_data=HH, init_from=SFT_CPU_PATH,
                   sft=dict(_SMALL["sft"], max_iters=150)),
    "own-tiny": dict(_SMALL, sft=dict(_SMALL["sft"], max_iters=4, eval_interval=4, eval_iters=1, batch_size=4),
                     max_new_tokens=8, n_eval_prompts=8, n_side=2, methods=dict(ppo=[0.05], dpo=[0.1]),
                     reward=dict(learning_rate=1e-3, max_iters=4, batch_size=8, warmup_iters=0),
                     rl=dict(batch_size=8, minibatch_size=8, micro_batch_size=8, max_iters=2, num_epochs=1,
                             learning_rate=3e-4, warmup_iters=0, eval_interval=1000),
                     dpo=dict(batch_size=8, max_iters=3, learning_rate=3e-4, warmup_iters=0, eval_interval=1000)),
}


OWN_KEYS = ("preferences", "eval_preferences", "sft_data", "init_from", "prompts", "eval_prompts", "gold")
IMDB_KEYS = ("sft", "replicates", "imdb_dir", "rl_batch_size")  # options of the IMDb benchmark alone


def wanted(cfg):
    """Whether stage pipeline runs on your data (here) rather than the IMDb benchmark (pipeline.py): any of your
    data's options, or one of its presets."""
    return any(getattr(cfg, k) for k in OWN_KEYS) or cfg.preset in PRESETS


def resolve(cfg):
    """(preset, methods, {preferences, sft_data, init_from}) of the command, every file checked to exist."""
    preset = PRESETS["own" if cfg.preset == "cpu" else cfg.preset] if cfg.preset in (*PRESETS, "cpu") else None
    if preset is None:
        raise ConfigError(f"--preset={cfg.preset} is an IMDb preset; with --preferences use one of "
                          f"{', '.join(PRESETS)} (or none)")
    for key in IMDB_KEYS:
        if getattr(cfg, key):
            raise ConfigError(f"--{key} is an option of the IMDb benchmark (pipeline.py), not of the pipeline on your "
                              f"data (own_data.py); leave it out")
    inputs = {k: getattr(cfg, k) or preset.get(k, "") for k in ("preferences", "sft_data", "init_from")}
    if not inputs["preferences"]:
        raise ConfigError("--preferences: no preference pairs given (a file of {prompt, chosen, rejected} rows, HH "
                          "dialogues, Vertex AI rows or messages)")
    if not inputs["sft_data"] and not inputs["init_from"]:
        raise ConfigError("give --init_from (a policy checkpoint or GPT-2 folder to start from), --sft_data (examples "
                          "to fine-tune on, from scratch), or both")
    for key in ("preferences", "sft_data", "prompts", "eval_preferences", "eval_prompts"):
        for path in files(inputs.get(key, getattr(cfg, key, ""))):
            if not os.path.exists(path):
                raise DataError(f"--{key}: {path}: no such file")
    if inputs["init_from"] and not os.path.exists(inputs["init_from"]):
        raise DataError(f"--init_from: {inputs['init_from']}: no such file or folder")
    if ".py:" in cfg.gold:
        reward.load_function(cfg.gold, "gold")  # a bad file or function fails here, in one line, before any training
    elif cfg.gold and not os.path.isfile(cfg.gold):
        raise DataError(f"--gold: {cfg.gold}: no such file (a reward checkpoint, or FILE.py:FUNCTION)")
    methods = list(dict.fromkeys(files(cfg.methods))) if cfg.methods else list(preset["methods"])
    for m in methods:
        if m not in OWN_METHODS:
            raise ConfigError(f"--methods: {m!r} does not run on your data; expected some of {', '.join(OWN_METHODS)}")
        if m not in preset["methods"] and m not in OPTIONAL:
            raise ConfigError(f"--methods: the {cfg.preset} preset has no strengths for {m} (add them to "
                              f"PRESETS in own_data.py)")
    return preset, methods, inputs


def spread(items, n):
    """At most n of items, evenly spaced (so that each file of several contributes its share), in order."""
    return items if len(items) <= n else [items[i * len(items) // n] for i in range(n)]


def make_splits(cfg, preset):
    """One held-out split for every step, written to OUT_DIR/splits/ (remade only when its sources change), so that
    no held-out prompt is trained on by any step. Returns {pairs_train, pairs_eval, pairs_eval_files, prompts_train,
    prompts_eval, sft}: file paths (pairs_eval_files: [[file, n], ...], the file of each run of n held-out pairs, in
    pairs_eval's order;
    sft: the SFT data, rewritten only if some example's prompt is held out; '' without it).
    - held-out pairs: --eval_preferences, or else the pairs of the last 10% of each --preferences file's distinct
      prompts (data.heldout_split, per file: a file of helpful and one of harmless pairs both count);
    - the report's prompts: --eval_prompts, or else the held-out pairs' prompts (at most n_eval_prompts, evenly
      spaced);
    - training pairs, the RL prompts (--prompts, or else the training pairs' prompts) and the SFT examples: those
      whose prompt is none of the above."""
    out = os.path.join(cfg.out_dir, "splits")
    paths = {k: os.path.join(out, f"{k}.jsonl") for k in ("pairs_train", "pairs_eval", "prompts_train", "prompts_eval")}
    paths["pairs_eval_files"] = os.path.join(out, "pairs_eval_files.json")  # each pair's file, as runs
    sources = [f for k in ("preferences", "eval_preferences", "prompts", "eval_prompts", "sft_data")
               for f in files(getattr(cfg, k))]
    made_by = {**{k: getattr(cfg, k) for k in ("preferences", "eval_preferences", "prompts", "eval_prompts",
                                               "sft_data")}, "n_eval": preset["n_eval_prompts"],
               "files": {f: fingerprint(f) for f in sources}}
    meta, sft = os.path.join(out, "made_by.json"), os.path.join(out, "sft.jsonl")
    if not stale(meta, read_json(meta) if os.path.exists(meta) else None, made_by, cfg.overwrite) and \
            all(map(os.path.exists, paths.values())) and isinstance(read_json(paths["pairs_eval_files"]), list):
        return {**paths, "sft": sft if os.path.exists(sft) else cfg.sft_data}  # (a dict there: an older folder's)
    train, held, source = [], [], []  # source: the file of each held-out pair, for the accuracy per file
    if cfg.eval_preferences:
        train = load_preferences(cfg.preferences)
        for path in files(cfg.eval_preferences):
            held += (pairs := load_preferences(path))
            source += [path] * len(pairs)
        if not held:
            raise DataError(f"{cfg.eval_preferences}: no preference pairs")
    else:
        for path in files(cfg.preferences):
            pairs = load_preferences(path)
            distinct = list(dict.fromkeys(p.prompt for p in pairs))
            if len(distinct) < 2:
                raise DataError(f"{path}: {plural(len(pairs), 'preference pair')} of "
                                f"{plural(len(distinct), 'distinct prompt')}; the held-out rule keeps the pairs of "
                                f"the last 10% of the prompts for evaluation and needs at least 2 prompts (or add "
                                f"--eval_preferences=FILE)")
            out_prompts = set(heldout_split(distinct)[1])
            train += [p for p in pairs if p.prompt not in out_prompts]
            held += [p for p in pairs if p.prompt in out_prompts]
            source += [path] * (len(held) - len(source))
    report = load_prompts(cfg.eval_prompts) if cfg.eval_prompts else \
        spread(list(dict.fromkeys(p.prompt for p in held)), preset["n_eval_prompts"])
    if not report:
        raise DataError(f"{cfg.eval_prompts}: no prompts")
    report = report[:preset["n_eval_prompts"]]
    out_set = {p.prompt for p in held} | set(report)
    kept = [p for p in train if p.prompt not in out_set]
    rl = load_prompts(cfg.prompts) if cfg.prompts else list(dict.fromkeys(p.prompt for p in kept))
    for what, before, after in (("--preferences", train, kept), ("--prompts", rl, [p for p in rl if p not in out_set])):
        if len(after) < len(before):
            print(f"note: {what}: {plural(len(before) - len(after), 'item')} left out of training, as its prompt is "
                  f"held out for evaluation", file=sys.stderr)
        if not after:
            raise DataError(f"{what}: nothing left to train on once the held-out prompts are left out (give more "
                            f"data, or another --eval_preferences / --eval_prompts)")
    rl = [p for p in rl if p not in out_set]
    os.makedirs(out, exist_ok=True)
    for key, rows in (("pairs_train", kept), ("pairs_eval", held)):
        write_jsonl(paths[key], [dict(prompt=p.prompt, chosen=p.chosen, rejected=p.rejected) for p in rows])
    write_json(paths["pairs_eval_files"], [[f, len(list(run))] for f, run in itertools.groupby(source)])
    for key, rows in (("prompts_train", rl), ("prompts_eval", report)):
        write_jsonl(paths[key], [dict(prompt=p) for p in rows])
    examples = load_sft(cfg.sft_data) if cfg.sft_data else []
    if os.path.exists(sft):
        os.remove(sft)
    if any(ex.prompt in out_set for ex in examples):
        left = [ex for ex in examples if ex.prompt not in out_set]
        print(f"note: --sft_data: {plural(len(examples) - len(left), 'example')} left out, as its prompt is held "
              f"out for evaluation", file=sys.stderr)
        write_jsonl(sft, [dict(prompt=ex.prompt, response=ex.response) if ex.prompt else dict(text=ex.response)
                          for ex in left])
    write_json(meta, made_by)
    return {**paths, "sft": sft if os.path.exists(sft) else cfg.sft_data}


def jobs_of(cfg, preset, methods, sft_ckpt, splits, block_size, dev):
    """The queue: the reward model (if a method needs one), then each method at each strength and seed. Returns
    (jobs, after, names: folder -> policy name, the reward model's folder or None)."""
    pairs, prompts_file = [f"--data={splits['pairs_train']}", f"--eval_data={splits['pairs_eval']}"], \
        splits["prompts_train"]
    rm_dir = os.path.join(cfg.out_dir, "reward") if any(m in NEEDS_REWARD for m in methods) else None
    proxy = rm_dir and os.path.join(rm_dir, "ckpt.pt")
    jobs = [("reward", rm_dir, [*pairs, f"--init_from={sft_ckpt}", f"--policy={sft_ckpt}",
                                f"--max_new_tokens={preset['max_new_tokens']}", f"--temperature={TEMPERATURE}",
                                f"--block_size={block_size}", f"--seed={cfg.seed}", *dev,
                                *(f"--{k}={v}" for k, v in preset["reward"].items())])] if rm_dir else []
    rl = [f"--init_from={sft_ckpt}", f"--prompts={prompts_file}", f"--reward={proxy}", f"--temperature={TEMPERATURE}",
          f"--max_new_tokens={preset['max_new_tokens']}", *dev, *(f"--{k}={v}" for k, v in preset["rl"].items())]
    dpo_ = [f"--init_from={sft_ckpt}", *pairs, *dev, f"--ref_cache_file={cfg.out_dir}/reference_logps.pt",
            *(f"--{k}={v}" for k, v in preset["dpo"].items())]
    args = dict(ppo=rl, rloo=rl, grpo=[a for a in rl if not a.startswith("--whiten_rewards")],
                online_dpo=[f"--init_from={sft_ckpt}", f"--prompts={prompts_file}", f"--reward={proxy}",
                            f"--max_new_tokens={preset['max_new_tokens']}", *dev,
                            *(f"--{k}={v}" for k, v in preset["online_dpo"].items())],
                dpo=dpo_, ipo=dpo_ + ["--loss=ipo"], unlikelihood=dpo_ + ["--loss=unlikelihood"])
    after, names = {}, {}
    for m in methods:
        stage, key = METHODS[m]
        for strength in preset["methods"].get(m, OPTIONAL.get(m)):
            for seed in preset["seeds"]:
                name = run_name(m, strength, seed)
                run_dir = os.path.join(cfg.out_dir, "runs", name)
                jobs.append((stage, run_dir, args[m] + [f"--{key}={strength}", f"--seed={seed}"]))
                names[run_dir] = name
                if m in NEEDS_REWARD:
                    after[run_dir] = [rm_dir]
    return jobs, after, names, rm_dir


def wilson(wins, z=1.96):
    """(mean, 95% interval) of a proportion from n outcomes in [0, 1]: Wilson's score interval, which stays inside
    [0, 1] and keeps a width at 0/n and n/n (where mean +- 1.96 sd/sqrt(n) collapses to a point); an outcome of 1/2
    (a tie counted as half a win) has less variance than a win or a loss, so with ties it errs wide."""
    n = len(wins)
    mean = sum(wins) / n
    mid, half = mean + z * z / (2 * n), z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n))
    return mean, [max(0.0, (mid - half) / (1 + z * z / n)), min(1.0, (mid + half) / (1 + z * z / n))]


def win_rate(policy_rows, sft_rows, judge="proxy"):
    """(win rate, 95% interval) of the policy's responses against SFT's to the same prompts, by the judge's scores
    (proxy: the reward model's; gold: --gold's): 1 for a higher score, 1/2 for a tie; the interval over prompts."""
    return wilson([1.0 if p[judge] > s[judge] else 0.5 if p[judge] == s[judge] else 0.0
                   for p, s in zip(policy_rows, sft_rows)])


def reward_accuracy(evaluate, proxy, splits, batch_size):
    """The reward model's accuracy on the held-out pairs with its 95% interval, overall and per file (by_file). The
    chosen response scoring higher counts 1, scored as the reward stage's eval/accuracy (reward.pair_scores: raw
    scores, both responses after the same prompt)."""
    model = evaluate.reward_model(proxy)
    rows = reward.load_pairs(splits["pairs_eval"], 0, model.config.block_size)[0]
    scores = reward.pair_scores(model, rows, evaluate.device, evaluate.ctx, batch_size)
    return by_file([float(c > r) for c, r in zip(*scores.tolist())], splits)


def bag_of_words(splits, l2=0.01, steps=300):
    """The accuracy on the held-out pairs (by_file) of a reference for the reward model: a linear Bradley-Terry model
    of which tokens a response holds and of its length, blind to the prompt and to word order, fitted on the training
    pairs (full-batch Adam, an L2 penalty l2 on the weights). A reward model no better than this has learnt no more
    from the pairs than which words win."""
    def features(path):  # a function of the weights: each pair's score, chosen's tokens' weights minus rejected's
        pair, index, value = [], [], []  # plus the length difference's
        for i, p in enumerate(load_preferences(path)):
            chosen, rejected = encode(p.chosen), encode(p.rejected)
            for tokens, sign in ((set(chosen), 1.0), (set(rejected), -1.0)):
                index += tokens
                value += [sign] * len(tokens)
            index.append(LENGTH)
            value.append((len(chosen) - len(rejected)) / 50)  # in units of 50 tokens
            pair += [i] * (len(index) - len(pair))
        pair, index, value = torch.tensor(pair), torch.tensor(index), torch.tensor(value)
        return lambda w: torch.zeros(i + 1).index_add(0, pair, w[index] * value)

    train, held = features(splits["pairs_train"]), features(splits["pairs_eval"])
    w = torch.zeros(LENGTH + 1, requires_grad=True)
    opt = torch.optim.Adam([w], lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.softplus(-train(w)).mean() + l2 * w.square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return by_file((held(w) > 0).float().tolist(), splits)


def by_file(right, splits):
    """{"all": [accuracy, [lo, hi], n], FILE: ...} of right (1 or 0 per held-out pair, in pairs_eval's order): the
    accuracy with its 95% interval (wilson), overall and per file of pairs where there are several, as one model
    trained on several sources may learn one and not another (HH-RLHF: on helpful-base the longer response is chosen
    in 60% of pairs, on harmless-base in 44%). A file's key is its name, or its path where names clash."""
    source = [path for path, n in read_json(splits["pairs_eval_files"]) for _ in range(n)]
    if len(source) != len(right):
        raise TrainingError(f"{splits['pairs_eval']}: {plural(len(right), 'pair')} read back, where "
                            f"{os.path.basename(splits['pairs_eval_files'])} counts {len(source)}; remake the splits "
                            f"with --overwrite")
    out, paths = {"all": [*wilson(right), len(right)]}, list(dict.fromkeys(source))
    names = [os.path.basename(p) for p in paths]
    for path, name in zip(paths if len(paths) > 1 else [], names):
        mine = [r for r, s in zip(right, source) if s == path]
        out[name if names.count(name) == 1 and name != "all" else path] = [*wilson(mine), len(mine)]
    return out


def best_policy(policies):
    """The report's rule: the final policy (not a kept snapshot) with the highest win rate against SFT by --gold's
    judge where there is one, else by the reward model, ties broken by the lower KL; with neither, the highest
    implicit-reward accuracy. None if no policy qualifies."""
    finals = {n: p for n, p in policies.items() if n != "sft" and "@" not in n}
    for key in ("gold_win_rate", "win_rate"):
        if any(p.get(key) is not None for p in finals.values()):
            return max((n for n in finals if finals[n].get(key) is not None),
                       key=lambda n: (finals[n][key], -abs(finals[n]["kl"])))  # an estimate can be < 0
    scored = [n for n in finals if finals[n].get("implicit_accuracy") is not None]
    return max(scored, key=lambda n: finals[n]["implicit_accuracy"]) if scored else None


def pipeline(cfg):
    preset, methods, inputs = resolve(cfg)
    cfg.preset = "own" if cfg.preset == "cpu" else cfg.preset
    cfg.preferences, cfg.sft_data, cfg.init_from = inputs["preferences"], inputs["sft_data"], inputs["init_from"]
    for key in ("preferences", "eval_preferences", "sft_data", "prompts", "eval_prompts", "init_from", "gold",
                "out_dir"):
        # absolute, as the sub-runs start in the repository's folder, not the caller's
        setattr(cfg, key, ",".join(os.path.abspath(f) for f in files(getattr(cfg, key))))
    return with_queue(cfg, lambda run, queue: run_pipeline(cfg, run, queue, preset, methods))


def run_pipeline(cfg, run, queue, preset, methods):
    dev = [f"--device={cfg.device}", f"--dtype={cfg.dtype}"]
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    # 1. the held-out split of every step
    splits = make_splits(cfg, preset)
    # 2. the SFT model
    sft_ckpt = os.path.abspath(cfg.init_from) if cfg.init_from else None
    if cfg.sft_data:
        sft_dir = os.path.join(cfg.out_dir, "sft")
        failed = queue.run_all([("sft", sft_dir, [f"--data={splits['sft']}", f"--seed={cfg.seed}", *dev,
                                                  *([f"--init_from={sft_ckpt}"] if sft_ckpt else []),
                                                  *(f"--{k}={v}" for k, v in preset["sft"].items())])],
                               "1/3 sft", 1, cfg.overwrite)
        if failed:
            raise TrainingError(f"{sft_dir}: sub-run failed ({failed[sft_dir]}); see its log.txt")
        sft_ckpt = os.path.join(sft_dir, "ckpt.pt")
    block_size = load_checkpoint(sft_ckpt, "policy")["model_args"]["block_size"]
    run.begin()  # the inputs have loaded
    eval_prompts = [row["prompt"] for _, row in read_jsonl(splits["prompts_eval"])]
    # 3. the queue, 4. the evaluation of each policy as its run finishes (on the CPU once a core is idle)
    jobs, after, names, rm_dir = jobs_of(cfg, preset, methods, sft_ckpt, splits, block_size, dev)
    proxy = rm_dir and os.path.join(rm_dir, "ckpt.pt")
    evaluate = Evaluator(sft_ckpt, eval_prompts, cfg, preset["max_new_tokens"], gold=cfg.gold or False)
    policies = {}

    def on_done(out_dir):
        queue.check()
        if out_dir == rm_dir:
            policies["sft"] = evaluate("sft", sft_ckpt, proxy, cfg.out_dir, cfg.seed)
            return
        policies.update(evaluate_run(evaluate, names[out_dir], out_dir, proxy, cfg.out_dir, cfg.seed,
                                     cfg.keep_snapshots))
        policies[names[out_dir]]["implicit_accuracy"] = read_json(os.path.join(out_dir, "summary.json")).get(
            "eval/rewards/accuracies")

    then = {d: [rm_dir] for d in names} if rm_dir else {}
    failed = queue.run_all(jobs, "2/3 reward model, methods, evaluation", cfg.jobs or preset["jobs"], cfg.overwrite,
                           cpu=on_cpu, after=after, on_done=on_done, on_done_after=then)
    if "sft" not in policies:  # no reward model: the SFT model's KL is 0, its samples still shown beside the others
        policies["sft"] = evaluate("sft", sft_ckpt, None, cfg.out_dir, cfg.seed)
    # 5. the report
    sample_rows = {n: [row for _, row in read_jsonl(os.path.join(cfg.out_dir, "samples", f"{n}.jsonl"))]
                   for n in policies}
    for n, p in policies.items():
        if proxy and n != "sft":
            p["win_rate"], p["win_interval"] = win_rate(sample_rows[n], sample_rows["sft"])
        if cfg.gold and n != "sft":
            p["gold_win_rate"], p["gold_win_interval"] = win_rate(sample_rows[n], sample_rows["sft"], "gold")
    rm_batch = preset["reward"].get("batch_size", reward.RewardConfig.batch_size)  # scored as the reward stage does
    accuracy = reward_accuracy(evaluate, proxy, splits, rm_batch) if rm_dir and rm_dir not in failed else None
    reference = bag_of_words(splits)
    report = dict(preset=cfg.preset, methods=methods, inputs={k: v for k, v in dict(
        preferences=cfg.preferences, eval_preferences=cfg.eval_preferences, sft_data=cfg.sft_data,
        init_from=cfg.init_from, prompts=cfg.prompts, eval_prompts=cfg.eval_prompts, gold=cfg.gold).items() if v},
        reward_accuracy=accuracy["all"][0] if accuracy else None,
        reward_accuracy_by_file=accuracy, bag_of_words_accuracy_by_file=reference,
        n_eval_prompts=len(eval_prompts),
        policies=dict(sorted(policies.items(), key=lambda kv: (kv[0] != "sft", kv[0]))),
        failed={os.path.relpath(d, cfg.out_dir): why for d, why in failed.items()})
    report["best"] = best_policy(report["policies"])
    queue.check()
    shutil.rmtree(os.path.join(cfg.out_dir, "best"), ignore_errors=True)  # not a previous run's
    if report["best"]:
        best_dir = os.path.join(cfg.out_dir, "runs", report["best"])
        export(parse_config(ExportConfig, [f"--ckpt={os.path.join(best_dir, 'ckpt.pt')}",
                                           f"--out={os.path.join(cfg.out_dir, 'best')}", "--overwrite"]))
    write_report(report, sample_rows, eval_prompts[:preset["n_side"]], cfg.out_dir)
    write_json(os.path.join(cfg.out_dir, "results.json"), report)
    with open(os.path.join(cfg.out_dir, "results.md")) as f:
        print(f.read())
    if failed:
        first = next(iter(report["failed"].items()))
        raise TrainingError(f"{plural(len(failed), 'sub-run')} failed or could not be evaluated (first: {first[0]}: "
                            f"{first[1]}); results.md reports the others; run the same command again to retry them")
    run.summary(**{f"{n}/{k}": p[k] for n, p in report["policies"].items() for k in ("proxy", "kl", "win_rate")
                   if p.get(k) is not None}, reward_accuracy=report["reward_accuracy"])
    return 0


def fmt(v, spec="{:.3f}"):
    return "-" if v is None else spec.format(v)


def accuracy_text(by_file, failed=False):
    """'0.539 [0.494, 0.584] of 466 pairs (a.jsonl 0.600 [...] of 235, ...)' from reward_accuracy()'s dict (None: no
    reward model, as no method needed one, or as its run failed)."""
    if not by_file:
        return "none (the reward model's run failed)" if failed else "none (no reward model)"
    one = lambda a: f"{a[0]:.3f} [{a[1][0]:.3f}, {a[1][1]:.3f}] of {a[2]}"  # noqa: E731
    per = [f"{k} {one(a)}" for k, a in by_file.items() if k != "all"]
    return one(by_file["all"]) + " pairs" + (f" ({'; '.join(per)})" if per else "")


def write_report(report, sample_rows, side_prompts, out):
    """results.md (the table, the rule and the best policy, the side-by-side samples), side_by_side.html and
    frontier.png; all from results.json's content and the samples."""
    pol, gold = report["policies"], report["inputs"].get("gold")
    accuracy = accuracy_text(report["reward_accuracy_by_file"], "reward" in report["failed"])
    lines = [f"# Your data: {', '.join(f'{k} {v}' for k, v in report['inputs'].items())}", "",
             f"Reward model's accuracy on held-out pairs: {accuracy}; a bag-of-words reference's (a linear model of "
             f"which tokens a response holds and its length, fitted on the same training pairs): "
             f"{accuracy_text(report['bag_of_words_accuracy_by_file'])}. Each policy on "
             f"{report['n_eval_prompts']} held-out prompts, one sample each at temperature {TEMPERATURE:g}: reward "
             f"(the reward model's, normalised on SFT samples), KL to the SFT model (nats per response, a "
             f"mean of sampled log-ratios: near 0 it can read below 0), win rate "
             f"against the SFT model's response to the same prompt by the reward model (ties half; 95% interval), "
             f"DPO's implicit-reward accuracy on held-out pairs (Unlikelihood: the chosen response more likely)" +
             (f"; gold: the mean score of --gold's judge, {gold}, and its win rate against SFT."
              if gold else "."), "",
             "| policy | reward | KL | win rate vs SFT | 95% interval | implicit accuracy | length |" +
             (" gold | gold win rate | 95% interval |" if gold else ""), "|---|---|---|---|---|---|---|" +
             ("---|---|---|" if gold else "")]
    interval = lambda i: "-" if i is None else f"{i[0]:.3f}-{i[1]:.3f}"  # noqa: E731
    for n, p in pol.items():
        lines.append(f"| {n} | {fmt(p['proxy'], '{:+.3f}')} | {p['kl']:.2f} | {fmt(p.get('win_rate'))} | "
                     f"{interval(p.get('win_interval'))} | {fmt(p.get('implicit_accuracy'))} | {p['length']:.1f} |" +
                     (f" {p['gold']:.3f} | {fmt(p.get('gold_win_rate'))} | {interval(p.get('gold_win_interval'))} |"
                      if gold else ""))
    lines += ["", "Best policy (the highest win rate against SFT by --gold's judge where there is one, else by the "
              "reward model, ties to the lower KL; with neither, the highest implicit accuracy): " +
              (f"**{report['best']}**, exported as a Hugging Face GPT-2 folder to best/" if report["best"] else "none")]
    if report["failed"]:
        lines += ["", "| failed sub-run | why |", "|---|---|", *(f"| {d} | {w} |" for d, w in report["failed"].items())]
    finals = [n for n in pol if "@" not in n]
    lines += ["", "## Side by side (side_by_side.html shows the same)", ""]
    for i, prompt in enumerate(side_prompts):
        lines += [f"**Prompt {i + 1}:** {' '.join(prompt.split())[-300:]}", ""]
        lines += [f"- {n}: {' '.join(sample_rows[n][i]['response'].split())}" for n in finals] + [""]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    cells = lambda row: "".join(f"<td>{html.escape(c)}</td>" for c in row)  # noqa: E731
    head = "".join(f"<th>{html.escape(n)}<br><small>reward {fmt(pol[n]['proxy'], '{:+.2f}')}, KL {pol[n]['kl']:.2f}"
                   f"</small></th>" for n in finals)
    body = "".join(f"<tr>{cells([prompt] + [sample_rows[n][i]['response'] for n in finals])}</tr>"
                   for i, prompt in enumerate(side_prompts))
    with open(os.path.join(out, "side_by_side.html"), "w") as f:
        f.write(f"<!doctype html><meta charset='utf-8'><title>side by side</title><style>td,th{{vertical-align:top;"
                f"white-space:pre-wrap;border:1px solid #ccc;padding:6px;max-width:28em}}table{{border-collapse:"
                f"collapse;font:14px sans-serif}}</style><table><tr><th>prompt</th>{head}</tr>{body}</table>\n")
    if os.path.exists(os.path.join(out, "frontier.png")):
        os.remove(os.path.join(out, "frontier.png"))  # not a previous run's
    judges = [(k, label) for k, label in (("proxy", "reward (reward model, normalised)"), ("gold", "gold (--gold)"))
              if pol["sft"][k] is not None]
    if not judges:
        return
    plt = pyplot()
    fig, axes = plt.subplots(1, len(judges), figsize=(6 * len(judges), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], judges):
        for m in sorted({method_of(n) for n in pol if n != "sft"}):
            pts = sorted((p["kl"], p[key]) for n, p in pol.items() if method_of(n) == m)
            ax.plot(*zip(*pts), "o-", color=color(m), label=m)
        ax.plot([0], [pol["sft"][key]], "ks", label="sft")
        ax.set_xlabel("KL to the SFT model (nats)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "frontier.png"), dpi=120)
    plt.close(fig)

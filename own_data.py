"""
The pipeline on your own data (stage `pipeline` given --preferences, or an own-data preset): supervised fine-tuning on
your examples, a reward model on your preference pairs, every method on your prompts, and a report judged by that
reward model, as your data has no gold judge. The IMDb benchmark (pipeline.py) is the same pipeline with a task that
supplies the data and a gold judge; both use pipeline.Queue for the sub-runs and report.Evaluator for the samples.

    python train.py pipeline --preferences=pairs.jsonl --init_from=out/sft/ckpt.pt --out_dir=out/mine
    python train.py pipeline --preferences=pairs.jsonl --sft_data=chat.jsonl --prompts=prompts.txt \\
        --eval_preferences=heldout.jsonl --methods=ppo,dpo --init_from=gpt2/ --out_dir=out/mine
    python train.py pipeline --preset=hh-cpu --out_dir=out/hh    # Anthropic HH-RLHF test pairs, ~4 min on 2 cores

Files: every format the loaders read (data.py: Vertex AI rows, HH dialogues, {messages}, {prompt, chosen,
rejected}; prompts also as .txt, one per line), several comma-separated. The steps, each skipped where not needed:
1. SFT: stage sft on --sft_data from --init_from (a checkpoint or a GPT-2 folder; from scratch at the preset's size
   without it). Without --sft_data the policy is --init_from itself.
2. Held-out splits, by the project's one rule (data.heldout_split: the last 10%): the prompts (--prompts, or else
   those of --preferences) unless --eval_prompts; the pairs, inside the reward and DPO runs, unless
   --eval_preferences.
3. One queue: the reward model, if a method needs one (ppo, rloo, grpo, online_dpo; DPO and its variants alone run
   without), then every method at the preset's strengths.
4. Evaluation on the held-out prompts (report.Evaluator, one sample each at temperature 1): the reward model's
   held-out accuracy; each policy's mean reward (normalised as in training: 0 mean, unit sd on SFT samples) and KL
   to the SFT model; its win rate against the SFT model's response to the same prompt, judged by the reward model
   (a tie counts half), with a 95% interval (normal approximation over prompts); DPO's implicit-reward accuracy on
   the held-out pairs (from its run's final evaluation).
5. The report: results.json, results.md, side_by_side.html (the first prompts with every policy's response; a
   browser opens it), frontier.png (reward against KL), and the best policy as a Hugging Face GPT-2 folder, best/.
   The rule: the highest win rate against SFT (ties: the lower KL); without a reward model, the highest implicit-
   reward accuracy.

Re-running the same command reuses what the same inputs made (sub-runs, splits, evaluations), as pipeline.py's.
A method that fails leaves the others: the report names it and why, and the pipeline exits with status 1.

Simplifications, on purpose: one replicate (the IMDb benchmark measures the spread); no Preferred-FT or PPO on a
gold reward (there is none); the win rate is judged by the same reward model the RL methods optimise, so it
flatters them (reward hacking shows as a high win rate with a high KL: read the two together, and the samples).
"""
import html
import math
import os

import torch

from checkpoint import ExportConfig, export, load_checkpoint
from config import ConfigError, TrainingError, parse_config, plural
from data import DataError, files, heldout_split, load_preferences, load_prompts, read_json, read_jsonl, write_json
from data import write_jsonl
from imdb import ROOT, SFT_CPU_PATH, TEMPERATURE, fingerprint
from pipeline import METHODS, run_name, snapshots, stale, with_queue
from report import Evaluator, color, method_of, pyplot

HH = ",".join(os.path.join(ROOT, "..", "shared", "data", "hh-rlhf", f"{s}-base-test.jsonl.gz")
              for s in ("helpful", "harmless"))
NEEDS_REWARD = ("ppo", "rloo", "grpo", "online_dpo")
OWN_METHODS = ("ppo", "rloo", "grpo", "online_dpo", "dpo", "ipo", "unlikelihood")
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
PRESETS = {
    "own": _SMALL,
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


def wanted(cfg):
    """Whether stage pipeline runs on your data (here) rather than the IMDb benchmark (pipeline.py)."""
    return bool(cfg.preferences) or cfg.preset in PRESETS


def resolve(cfg):
    """(preset, methods, {preferences, sft_data, init_from}) of the command, every file checked to exist."""
    preset = PRESETS["own" if cfg.preset == "cpu" else cfg.preset] if cfg.preset in (*PRESETS, "cpu") else None
    if preset is None:
        raise ConfigError(f"--preset={cfg.preset} is an IMDb preset; with --preferences use one of "
                          f"{', '.join(PRESETS)} (or none)")
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
    methods = cfg.methods.split(",") if cfg.methods else list(preset["methods"])
    for m in methods:
        if m not in OWN_METHODS:
            raise ConfigError(f"--methods: {m!r} does not run on your data; expected some of {', '.join(OWN_METHODS)}")
        if m not in preset["methods"] and m not in OPTIONAL:
            raise ConfigError(f"--methods: the {cfg.preset} preset has no strengths for {m} (add them to "
                              f"PRESETS in own_data.py)")
    return preset, methods, inputs


def make_prompts(cfg, preset, preferences):
    """The RL prompts and the held-out prompts of the report, as two files in the run folder (remade only when their
    sources change): --eval_prompts, or else the last 10% of --prompts (of --preferences' prompts without it)."""
    source = cfg.prompts or preferences
    made_by = dict(prompts=source, eval_prompts=cfg.eval_prompts, n_eval=preset["n_eval_prompts"],
                   files={f: fingerprint(f) for f in files(source) + files(cfg.eval_prompts)})
    meta, paths = os.path.join(cfg.out_dir, "prompts.json"), [os.path.join(cfg.out_dir, f"prompts_{s}.jsonl")
                                                            for s in ("train", "eval")]
    if stale(meta, read_json(meta) if os.path.exists(meta) else None, made_by, cfg.overwrite) or \
            not all(map(os.path.exists, paths)):
        prompts = load_prompts(source)
        if cfg.eval_prompts:
            train, held = prompts, load_prompts(cfg.eval_prompts)
        elif len(prompts) < 2:
            raise DataError(f"{source}: {plural(len(prompts), 'prompt')}; the held-out rule keeps the last 10% for "
                            f"the report and needs at least 2 (or add --eval_prompts=FILE)")
        else:
            train, held = heldout_split(prompts)
        if not train or not held:
            raise DataError(f"{cfg.eval_prompts if not held else source}: no prompts")
        for path, rows in zip(paths, (train, held[:preset["n_eval_prompts"]])):
            write_jsonl(path, [dict(prompt=p) for p in rows])
        write_json(meta, made_by)
    return paths


def check_pairs(cfg, preferences):
    """The pairs load (a bad line is a one-line error naming it), and both splits hold some."""
    n = len(load_preferences(preferences))
    if n == 0:
        raise DataError(f"{preferences}: no preference pairs")
    if cfg.eval_preferences:
        if not load_preferences(cfg.eval_preferences):
            raise DataError(f"{cfg.eval_preferences}: no preference pairs")
    elif n < 2:
        raise DataError(f"{preferences}: 1 preference pair; the held-out rule keeps the last 10% for evaluation and "
                        f"needs at least 2 (or add --eval_preferences=FILE)")


def jobs_of(cfg, preset, methods, sft_ckpt, prompts_file, block_size, dev):
    """The queue: the reward model (if a method needs one), then each method at each strength and seed. Returns
    (jobs, after, names: folder -> policy name, the reward model's folder or None)."""
    pairs = [f"--data={cfg.preferences}",
             *([f"--eval_data={cfg.eval_preferences}"] if cfg.eval_preferences else [])]
    rm_dir = os.path.join(cfg.out_dir, "reward") if any(m in NEEDS_REWARD for m in methods) else None
    proxy = rm_dir and os.path.join(rm_dir, "ckpt.pt")
    jobs = [("reward", rm_dir, [*pairs, f"--init_from={sft_ckpt}", f"--policy={sft_ckpt}",
                                f"--max_new_tokens={preset['max_new_tokens']}", f"--temperature={TEMPERATURE}",
                                f"--block_size={block_size}", f"--seed={cfg.seed}", *dev,
                                *(f"--{k}={v}" for k, v in preset["reward"].items())])] if rm_dir else []
    rl = [f"--init_from={sft_ckpt}", f"--prompts={prompts_file}", f"--reward={proxy}", f"--temperature={TEMPERATURE}",
          f"--max_new_tokens={preset['max_new_tokens']}", *dev, *(f"--{k}={v}" for k, v in preset["rl"].items())]
    dpo_ = [f"--init_from={sft_ckpt}", *pairs, *dev, *(f"--{k}={v}" for k, v in preset["dpo"].items())]
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


def win_rate(policy_rows, sft_rows):
    """(win rate, 95% interval) of the policy's responses against SFT's to the same prompts, by the reward model's
    scores: 1 for a higher score, 1/2 for a tie; the interval mean +- 1.96 sd / sqrt(n), clipped to [0, 1]."""
    wins = [1.0 if p["proxy"] > s["proxy"] else 0.5 if p["proxy"] == s["proxy"] else 0.0
            for p, s in zip(policy_rows, sft_rows)]
    n = len(wins)
    mean = sum(wins) / n
    half = 1.96 * math.sqrt(sum((w - mean) ** 2 for w in wins) / max(1, n - 1) / n)
    return mean, [max(0.0, mean - half), min(1.0, mean + half)]


def best_policy(policies):
    """The report's rule: the final policy (not a kept snapshot) with the highest win rate against SFT, ties broken
    by the lower KL; without a reward model, the highest implicit-reward accuracy. None if no policy qualifies."""
    finals = {n: p for n, p in policies.items() if n != "sft" and "@" not in n}
    if any(p.get("win_rate") is not None for p in finals.values()):
        return max((n for n in finals if finals[n].get("win_rate") is not None),
                   key=lambda n: (finals[n]["win_rate"], -finals[n]["kl"]))
    scored = [n for n in finals if finals[n].get("implicit_accuracy") is not None]
    return max(scored, key=lambda n: finals[n]["implicit_accuracy"]) if scored else None


def pipeline(cfg):
    preset, methods, inputs = resolve(cfg)
    cfg.preset = "own" if cfg.preset == "cpu" else cfg.preset
    cfg.preferences, cfg.sft_data, cfg.init_from = inputs["preferences"], inputs["sft_data"], inputs["init_from"]
    for key in ("preferences", "eval_preferences", "sft_data", "prompts", "eval_prompts", "init_from", "out_dir"):
        # absolute, as the sub-runs start in the repository's folder, not the caller's
        setattr(cfg, key, ",".join(os.path.abspath(f) for f in files(getattr(cfg, key))))
    check_pairs(cfg, cfg.preferences)
    return with_queue(cfg, lambda run, queue: run_pipeline(cfg, run, queue, preset, methods))


def run_pipeline(cfg, run, queue, preset, methods):
    dev = [f"--device={cfg.device}", f"--dtype={cfg.dtype}"]
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    # 1. the SFT model
    sft_ckpt = os.path.abspath(cfg.init_from) if cfg.init_from else None
    if cfg.sft_data:
        sft_dir = os.path.join(cfg.out_dir, "sft")
        failed = queue.run_all([("sft", sft_dir, [f"--data={cfg.sft_data}", f"--seed={cfg.seed}", *dev,
                                                  *([f"--init_from={sft_ckpt}"] if sft_ckpt else []),
                                                  *(f"--{k}={v}" for k, v in preset["sft"].items())])],
                               "1/3 sft", 1, cfg.overwrite)
        if failed:
            raise TrainingError(f"{sft_dir}: sub-run failed ({failed[sft_dir]}); see its log.txt")
        sft_ckpt = os.path.join(sft_dir, "ckpt.pt")
    block_size = load_checkpoint(sft_ckpt, "policy")["model_args"]["block_size"]
    # 2. prompts: what the RL methods train on, what the report evaluates on
    prompts_file, eval_file = make_prompts(cfg, preset, cfg.preferences)
    eval_prompts = [row["prompt"] for _, row in read_jsonl(eval_file)]
    # 3. the queue, 4. the evaluation of each policy as its run finishes (on the CPU after them all)
    jobs, after, names, rm_dir = jobs_of(cfg, preset, methods, sft_ckpt, prompts_file, block_size, dev)
    proxy = rm_dir and os.path.join(rm_dir, "ckpt.pt")
    evaluate = Evaluator(sft_ckpt, eval_prompts, cfg, preset["max_new_tokens"], gold=False)
    policies = {}

    def on_done(out_dir):
        queue.check()
        if out_dir == rm_dir:
            policies["sft"] = evaluate("sft", sft_ckpt, proxy, cfg.out_dir, cfg.seed)
            return
        for label, path in [*((f"{names[out_dir]}@{s}", p) for s, p in snapshots(out_dir).items()),
                            (names[out_dir], os.path.join(out_dir, "ckpt.pt"))]:
            policies[label] = evaluate(label, path, proxy, cfg.out_dir, cfg.seed)
        policies[names[out_dir]]["implicit_accuracy"] = read_json(os.path.join(out_dir, "summary.json")).get(
            "eval/rewards/accuracies")

    then = {d: [rm_dir] for d in names} if rm_dir else {}
    failed = queue.run_all(jobs, "2/3 reward model, methods, evaluation", cfg.jobs or preset["jobs"], cfg.overwrite,
                           cpu=on_cpu, after=after, on_done=None if on_cpu else on_done, on_done_after=then)
    if on_cpu:
        for out_dir in [d for d in [rm_dir, *names] if d and d not in failed]:
            on_done(out_dir)
    if "sft" not in policies:  # no reward model: the SFT model's KL is 0, its samples still shown beside the others
        policies["sft"] = evaluate("sft", sft_ckpt, None, cfg.out_dir, cfg.seed)
    # 5. the report
    sample_rows = {n: [row for _, row in read_jsonl(os.path.join(cfg.out_dir, "samples", f"{n}.jsonl"))]
                   for n in policies}
    for n, p in policies.items():
        if proxy and n != "sft":
            p["win_rate"], p["win_interval"] = win_rate(sample_rows[n], sample_rows["sft"])
    report = dict(preset=cfg.preset, methods=methods, inputs={k: v for k, v in dict(
        preferences=cfg.preferences, eval_preferences=cfg.eval_preferences, sft_data=cfg.sft_data,
        init_from=cfg.init_from, prompts=cfg.prompts, eval_prompts=cfg.eval_prompts).items() if v},
        reward_accuracy=read_json(os.path.join(rm_dir, "summary.json")).get("eval/accuracy")
        if rm_dir and rm_dir not in failed else None, n_eval_prompts=len(eval_prompts),
        policies=dict(sorted(policies.items(), key=lambda kv: (kv[0] != "sft", kv[0]))),
        failed={os.path.relpath(d, cfg.out_dir): why for d, why in failed.items()})
    report["best"] = best_policy(report["policies"])
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


def write_report(report, sample_rows, side_prompts, out):
    """results.md (the table, the rule and the best policy, the side-by-side samples), side_by_side.html and
    frontier.png; all from results.json's content and the samples."""
    pol = report["policies"]
    lines = [f"# Your data: {', '.join(f'{k} {v}' for k, v in report['inputs'].items())}", "",
             f"Reward model's accuracy on held-out pairs: {fmt(report['reward_accuracy'])}. Each policy on "
             f"{report['n_eval_prompts']} held-out prompts, one sample each at temperature {TEMPERATURE:g}: reward "
             f"(the reward model's, normalised on SFT samples), KL to the SFT model (nats per response), win rate "
             f"against the SFT model's response to the same prompt by the reward model (ties half; 95% interval), "
             f"DPO's implicit-reward accuracy on held-out pairs (Unlikelihood: the chosen response more likely).", "",
             "| policy | reward | KL | win rate vs SFT | 95% interval | implicit accuracy | length |",
             "|---|---|---|---|---|---|---|"]
    for n, p in pol.items():
        interval = "-" if p.get("win_interval") is None else f"{p['win_interval'][0]:.3f}-{p['win_interval'][1]:.3f}"
        lines.append(f"| {n} | {fmt(p['proxy'], '{:+.3f}')} | {p['kl']:.2f} | {fmt(p.get('win_rate'))} | "
                     f"{interval} | {fmt(p.get('implicit_accuracy'))} | {p['length']:.1f} |")
    lines += ["", "Best policy (the highest win rate against SFT, ties to the lower KL; without a reward model the "
              "highest implicit accuracy): " + (f"**{report['best']}**, exported as a Hugging Face GPT-2 folder to "
                                                 f"best/" if report["best"] else "none")]
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
    if pol["sft"]["proxy"] is None:
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in sorted({method_of(n) for n in pol if n != "sft"}):
        pts = sorted((p["kl"], p["proxy"]) for n, p in pol.items() if method_of(n) == m)
        ax.plot(*zip(*pts), "o-", color=color(m), label=m)
    ax.plot([0], [pol["sft"]["proxy"]], "ks", label="sft")
    ax.set_xlabel("KL to the SFT model (nats)")
    ax.set_ylabel("reward (reward model, normalised)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "frontier.png"), dpi=120)
    plt.close(fig)

"""
The IMDb benchmark's evaluation and report. Evaluation: every policy on held-out prefixes (Evaluator), and a pool
of SFT samples per prefix (sample_pool), from which best-of-N (bon_curve) and the exact optimum pi_ref exp(r / beta)
/ Z restricted to the pool (optimum) are computed exactly. Report: gold reward at fixed KL along each method's
frontier, each policy's distance to the optimum of its own objective (objective_gaps), Gao et al.'s
over-optimisation fits, results.md and two figures, all functions of results.json (so a report can be redrawn from it
alone); and stage `plot`, any run folder's metrics.jsonl as a PNG.

    python train.py plot --run=out/imdb/rep1/runs/ppo_beta0.05_seed1      # metrics.png beside its metrics.jsonl

Policy names are RUN or RUN@STEP, RUN = METHOD_beta{b}_seed{s} (alpha for unlikelihood; METHOD_seed{s} for a method
without a strength): method_of reads the method back.
"""
import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

import ppo
import reward
from checkpoint import disable_dropout, fingerprint, load_checkpoint, load_policy, model_from_checkpoint
from config import ConfigError, TrainingError, opt, plural
from data import atomic_write, read_json, read_jsonl, write_json, write_jsonl
from imdb import TEMPERATURE, gold_reward, sft_samples
from runtime import setup_device
from sft import best_of_n_kl_bound, best_of_n_probs

KL_POINTS = (1.0, 2.5, 5.0, 10.0)  # the gold@KL summary: nats per sequence
BON_NS = (1, 2, 4, 8, 16, 32, 64, 128)
# the exact optimum's strengths (beside each method's own): from the pool itself (KL 0) to its best sample (log M)
OPTIMUM_BETAS = tuple(10 ** (k / 8) for k in range(-24, 9))
# the reward whose E[r] - beta KL each method maximises (its strength is beta): the proxy (DPO: the reward model
# fitted to the same labels stands in for the one they imply), or the gold reward (PPO-GT, online DPO labelled by it)
OBJECTIVE = dict(ppo="proxy", rloo="proxy", grpo="proxy", dpo="proxy", online_dpo="proxy", ppo_gt="gold",
             online_dpo_gt="gold")


def method_of(name):
    """'ppo_gt_beta0.05_seed1@20' -> 'ppo_gt'; 'pft_seed1' -> 'pft'; 'sft' -> 'sft'; in a learning-rate sweep,
    'ppo_beta0.1_lr2e-05_seed1' -> 'ppo_lr2e-05'."""
    return re.sub(r"(_(beta|alpha)[^_@]*)?(_lr[^_@]*)?_seed\d+(@\d+)?$", lambda m: m[3] or "", name)


def bon_curve(select, gold, proxy, ns):
    """Best-of-N from a pool of M samples per prompt, for each N in ns, as exact expectations over the pool
    (sft.best_of_n_probs: n draws with replacement, ties shared). select, gold, proxy: (P, M). Returns per N: the
    expected gold and proxy rewards; kl, the KL of the best-of-N selection from the pool's uniform distribution,
    sum_j p_j log(M p_j) averaged over prompts (0 when every sample scores the same); and kl_bound, log N - (N-1)/N,
    which bounds the KL of best-of-N from any reference distribution (Beirami et al. 2024, arXiv:2401.01879) and is
    what a pool of distinct scores approaches as M grows."""
    M = select.size(1)
    out = []
    for n in ns:
        p = best_of_n_probs(select, n)  # (P, M)
        kl = (p * torch.log(M * p).clamp(min=-1e9)).sum(1).mean()  # p > 0 for every sample, so no 0 log 0
        out.append(dict(n=n, gold=float((gold.double() * p).sum(1).mean()),
                        proxy=float((proxy.double() * p).sum(1).mean()), kl=float(kl), kl_bound=best_of_n_kl_bound(n)))
    return out


def optimum(select, gold, proxy, beta):
    """The optimum of E[r] - beta KL(pi || pi_ref) restricted to a pool of M samples per prompt drawn from pi_ref:
    pi*(j | x) = softmax_j(r_xj / beta), the pool's uniform distribution tilted by exp(r / beta) (pi* = pi_ref
    exp(r / beta) / Z, Rafailov et al. 2023, Eq. 4). select = r, gold, proxy: (P, M). Returns, at beta: pi*'s expected
    gold and proxy rewards; kl, KL(pi* || pool) = sum_j pi*_j log(M pi*_j) (at most log M); j, the objective
    J* = beta mean_x log mean_j exp(r_xj / beta) (which is E_pi*[r] - beta KL), and j_se, its standard error over
    prompts; ess, the mean over prompts of 1 / sum_j pi*_j^2, the pool samples pi* rests on. A few (small beta): the
    pool is too small, and J* (a log of a sample mean) is underestimated."""
    r, (P, M) = select.double(), select.shape
    q = torch.softmax(r / beta, 1)
    j = beta * (torch.logsumexp(r / beta, 1) - math.log(M))  # (P,)
    expected = lambda x: float((x.double() * q).sum(1).mean())
    return dict(beta=beta, gold=expected(gold), proxy=expected(proxy),
                kl=float(torch.xlogy(q, M * q).sum(1).mean()), j=float(j.mean()),
                j_se=float(j.std() / math.sqrt(P)) if P > 1 else 0.0, ess=float((1 / (q * q).sum(1)).mean()))


def strength_of(name):
    """'dpo_beta0.5_seed1@20' -> 0.5; None for a policy without one."""
    m = re.search(r"_(?:beta|alpha)([^_@]+)(?:_lr[^_@]*)?_seed", name)
    return float(m[1]) if m else None


def objective_gaps(report):
    """Each policy of a method in OBJECTIVE against the exact optimum of its own objective: J = E[r] - beta KL on the
    held-out prefixes (its standard error from the samples' variances), J* at the same beta from the pool (optimum),
    and the gap J* - J. few_samples: J* rests on fewer than 10 pool samples per prompt (ess), so it is too low."""
    rows = []
    for rep in report["replicates"]:
        best = rep.get("optimum")
        for name, r in rep["policies"].items() if best else ():
            key, beta = OBJECTIVE.get(method_of(name).split("_lr")[0]), strength_of(name)
            star = next((o for o in best.get(key) or () if beta and math.isclose(o["beta"], beta)), None)
            if star is None:
                continue
            v = r.get("var")
            se = math.sqrt(max(v[key] - 2 * beta * v[f"{key}_kl"] + beta * beta * v["kl"], 0) / r["n"]) if v else None
            j = r[key] - beta * r["kl"]
            rows.append(dict(replicate=rep["replicate"], policy=name, reward=key, beta=beta, kl=r["kl"], j=j, j_se=se,
                             kl_star=star["kl"], j_star=star["j"], j_star_se=star["j_se"], gap=star["j"] - j,
                             few_samples=star["ess"] < 10))
    return rows


# -----------------------------------------------------------------------------
# gold reward at fixed KL, and Gao et al.'s functional forms

def by_kl(points):
    """[(kl, value)] -> the same sorted by KL, the values of points at one KL averaged."""
    groups = {}
    for kl, v in points:
        groups.setdefault(kl, []).append(v)
    return sorted((kl, sum(vs) / len(vs)) for kl, vs in groups.items())


def interpolate(points, x):
    """The value at x of the piecewise-linear curve through points [(kl, value)] (by_kl); None outside [smallest
    KL, largest KL]."""
    pts = by_kl(points)
    if not pts or not pts[0][0] <= x <= pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[0][1]  # a single point, at x


def attainable(points):
    """A method's frontier from points [(kl, gold)] (points at one KL averaged): the upper concave hull of the
    points, up to the one of most gold, sorted by KL, then flat to the largest KL of any point. Mixing two policies per
    prompt (w, 1 - w) gets their gold mixed and a KL at most theirs mixed (KL is convex), so the chord between any two
    points is attained at or below its KL; the hull is the best such chord at each KL (a mix of more than two never
    does better: one constraint, so two policies suffice). So a point added (another checkpoint evaluated) can only
    raise a method's frontier, never lower it, and a checkpoint that happens to fall just under a chord does not
    drag the reading at its KL down."""
    pts, hull = by_kl(points), []
    for kl, v in pts:  # Andrew's monotone chain, upper half: drop the last point while it is on or under the chord
        while len(hull) >= 2 and (hull[-1][0] - hull[-2][0]) * (v - hull[-2][1]) >= \
                (hull[-1][1] - hull[-2][1]) * (kl - hull[-2][0]):
            hull.pop()
        hull.append((kl, v))
    front = hull[:max(range(len(hull)), key=lambda i: hull[i][1]) + 1] if hull else []
    if pts and pts[-1][0] > front[-1][0]:
        front.append((pts[-1][0], front[-1][1]))
    return front


def best_at(points, x):
    """The gold reward at KL x on the frontier of `points` (attainable); None outside [smallest KL, largest KL]."""
    return interpolate(attainable(points), x)  # the frontier spans the points' KLs: None outside them


def frontier(policies, method):
    """A method's frontier in one replicate: (KL, gold) of each strength and checkpoint step, averaged over the RL
    seeds, with the SFT model as every run's step 0 (it is: each run starts from it)."""
    groups = {}
    for name, r in policies.items():
        if method_of(name) == method:
            run, _, step = name.partition("@")
            groups.setdefault((run.rsplit("_seed", 1)[0], step), []).append((r["kl"], r["gold"]))
    sft = policies["sft"]
    return [(0.0, sft["gold"])] + [tuple(sum(c) / len(pts) for c in zip(*pts)) for pts in groups.values()]


def gold_at_kl(report):
    """{method: {kl: {per_replicate, mean, spread, n}}} for kl in KL_POINTS: each replicate's frontier read at kl
    (best_at; None where it does not reach); mean and spread (max - min) over the replicates that reach it.
    Best-of-N and the exact optimum (each selected or tilted by the proxy, by gold) use their KL from the pool."""
    reps = report["replicates"]
    curves = {}
    for m in sorted({method_of(n) for rep in reps for n in rep["policies"]} - {"sft"}):
        curves[m] = [frontier(rep["policies"], m) for rep in reps]
    for sel in ("proxy", "gold"):
        curves[f"bon_{sel}"] = [[(b["kl"], b["gold"]) for b in rep["best_of_n"][sel]] for rep in reps]
    for sel in ("proxy", "gold") if all(rep.get("optimum") for rep in reps) else ():
        curves[f"optimum_{sel}"] = [[(o["kl"], o["gold"]) for o in rep["optimum"][sel]] for rep in reps]
    summary = {}
    for m, per_rep in curves.items():
        summary[m] = {}
        for x in KL_POINTS:
            vals = [best_at(pts, x) for pts in per_rep]
            got = [v for v in vals if v is not None]
            summary[m][str(x)] = dict(per_replicate=vals, n=len(got), mean=sum(got) / len(got) if got else None,
                                      spread=max(got) - min(got) if got else None)
    return summary


GAO_FORMS = dict(bon=lambda d: [d, -d * d], rl=lambda d: [d, -d * math.log(d) if d > 0 else 0.0])


def gao_fit(d, y, form):
    """Least squares of Gao et al. 2022's forms (arXiv 2210.10760, Eq. 1-2) through the origin: R(d) = d (a - b d)
    for best-of-N, R(d) = d (a - b log d) for RL, d = sqrt(KL). Returns dict(a, b, rmse), or None with fewer than
    2 points off the origin."""
    if sum(v > 0 for v in d) < 2:
        return None
    X, Y = np.array([GAO_FORMS[form](v) for v in d]), np.array(y)
    (a, b), *_ = np.linalg.lstsq(X, Y, rcond=None)
    return dict(a=float(a), b=float(b), rmse=float(np.sqrt(np.mean((X @ np.array([a, b]) - Y) ** 2))), form=form)


def gao_fits(report):
    """{method: {gold, proxy: fit}}: each method's points of every replicate, rewards minus that replicate's SFT
    model's, against d = sqrt(KL). Best-of-N (by proxy) gets the best-of-N form, the rest the RL form."""
    points = {}
    for rep in report["replicates"]:
        sft = rep["policies"]["sft"]
        for name, r in rep["policies"].items():
            if name != "sft":
                points.setdefault(method_of(name), []).append((r["kl"], r["gold"] - sft["gold"],
                                                               r["proxy"] - sft["proxy"]))
        for b in rep["best_of_n"]["proxy"]:
            points.setdefault("bon_proxy", []).append((b["kl"], b["gold"] - sft["gold"], b["proxy"] - sft["proxy"]))
    fits = {}
    for m, pts in points.items():
        d = [math.sqrt(max(kl, 0.0)) for kl, _, _ in pts]
        form = "bon" if m.startswith("bon") else "rl"
        fits[m] = {key: gao_fit(d, [p[i] for p in pts], form) for i, key in ((1, "gold"), (2, "proxy"))}
    return fits


# -----------------------------------------------------------------------------
# evaluation: every policy on held-out prefixes; best-of-N and the exact optimum from a pool of SFT samples

def stored_result(record, samples, made_by):
    """The result that RECORD (a JSON file) holds if made_by made it and SAMPLES is still the file it wrote; else
    None. A re-run reuses every evaluation whose inputs are unchanged."""
    stored = read_json(record) if os.path.exists(record) else None
    if stored and os.path.exists(samples) and stored["made_by"] == dict(made_by, samples=fingerprint(samples)):
        return stored["result"]
    return None


def store_result(record, samples, rows, made_by, result):
    """SAMPLES (rows, JSONL), then RECORD with their fingerprint: a stop between, or samples changed since, makes
    them again."""
    os.makedirs(os.path.dirname(samples), exist_ok=True)
    write_jsonl(samples, rows)
    write_json(record, dict(made_by=dict(made_by, samples=fingerprint(samples)), result=result))


def snapshots(run_dir):
    """{step: path} of the ckpt-STEP.pt files a sub-run kept (--snapshot_interval, --snapshot_steps), by step, those
    whose weights went once evaluated (evaluate_run) included."""
    kept = (re.fullmatch(r"ckpt-(\d+)\.pt(\.removed\.json)?", f) for f in os.listdir(run_dir))
    steps = sorted(int(m[1]) for m in kept if m)
    return {step: os.path.join(run_dir, f"ckpt-{step}.pt") for step in dict.fromkeys(steps)}


def evaluate_run(evaluate, name, run_dir, proxy, out_dir, seed, keep_snapshots, keep_final=True):
    """{label: result} of a finished sub-run's policies, evaluated (Evaluator): each snapshot (NAME@STEP) and
    the final one (NAME). Unless keep_snapshots, a snapshot's weights go once evaluated, and unless keep_final the
    final ones, each leaving PATH.removed.json with their fingerprint (checkpoint.fingerprint reads it): a re-run with
    the same inputs reuses the stored result, and one that would need the weights again says so."""
    out = {}
    gone = lambda path: write_json(path + ".removed.json", fingerprint(path)) or os.remove(path)
    for step, path in snapshots(run_dir).items():
        out[f"{name}@{step}"] = evaluate(f"{name}@{step}", path, proxy, out_dir, seed)
        if not keep_snapshots and os.path.exists(path):
            gone(path)
    out[name] = evaluate(name, final := os.path.join(run_dir, "ckpt.pt"), proxy, out_dir, seed)
    if not (keep_snapshots or keep_final) and os.path.exists(final):
        gone(final)
    return out


class Evaluator:
    """Policies on the held-out prefixes at TEMPERATURE: gold reward, proxy reward, KL(pi || pi_ref) (mean over samples
    of the sum over tokens of log pi - log pi_ref). Every policy's weights go into one model (its decoding graphs stay
    valid). Samples go to OUT_DIR/samples/NAME.jsonl, the result and what made it (files, prefixes, seed, lengths) to
    NAME.json (stored_result). The result holds the means, n and the samples' variances and covariances with the KL
    (var), from which objective_gaps() takes the standard error of E[r] - beta KL.

    gold: True, IMDb's gold reward; your own data's (own_data.py) --gold, a judge's spec (FILE.py:FUNCTION or a
    reward checkpoint, as --reward); or False, none (its gold is None). For DPO alone there is no proxy either
    (proxy_path None: its proxy is None); what is left is always measured: the KL and the samples."""

    def __init__(self, ref_path, eval_prompts, cfg, max_new_tokens, gold=True):
        self.device, self.ctx = setup_device(cfg)
        self.dtype, self.batch_size = cfg.dtype, 512  # the batch size sets the order of the random draws
        self.ref_path, self.prompts, self.max_new_tokens = ref_path, eval_prompts, max_new_tokens
        self.prompts_sha = hashlib.sha256(json.dumps(eval_prompts).encode()).hexdigest()
        self.ref, self.policy, self.proxies, self.gold = None, None, {}, gold
        if gold is True:  # IMDb's, what made its scores recorded as before
            self.judge, self.gold_by = (lambda p, r: torch.tensor(gold_reward(p, r))), {}
        elif gold:  # a judge's spec and its file's bytes, for the reuse check
            self.judge = reward.reward_component(gold, self.device, 64, option="gold")
            self.gold_by = dict(gold=[gold, fingerprint(gold.rpartition(":")[0] if ".py:" in gold else gold)])
        else:
            self.judge, self.gold_by = (lambda p, r: torch.zeros(len(p))), dict(gold=None)

    def load(self, path):
        if path == self.ref_path:
            return self.ref
        ckpt = load_checkpoint(path, "policy")
        if self.policy is None or dataclasses.asdict(self.policy.config) != ckpt["model_args"]:
            self.policy = disable_dropout(model_from_checkpoint(ckpt, path)).to(self.device).eval()
        else:
            model_from_checkpoint(ckpt, path, self.policy)
        return self.policy

    def reward_model(self, path):
        if path not in self.proxies:
            self.proxies[path] = reward.load_reward_model(path, self.device)
        return self.proxies[path]

    def __call__(self, name, path, proxy_path, out_dir, seed, per_prefix=1):
        """The result of policy `name` (checkpoint path): per_prefix samples of each held-out prefix (more for the SFT
        model, every frontier's start, so that its evaluation noise does not move them all)."""
        record = os.path.join(out_dir, "samples", f"{name}.json")
        samples = os.path.join(out_dir, "samples", f"{name}.jsonl")
        made_by = dict(policy=fingerprint(path), proxy=proxy_path and fingerprint(proxy_path),
                       ref=fingerprint(self.ref_path), prompts=self.prompts_sha, seed=seed,
                       max_new_tokens=self.max_new_tokens, temperature=TEMPERATURE, device=str(self.device),
                       dtype=self.dtype, batch_size=self.batch_size, **self.gold_by)
        if per_prefix != 1:  # (records made before the option stay valid)
            made_by["per_prefix"] = per_prefix
        stored = stored_result(record, samples, made_by)
        if stored is not None:
            return stored
        if not os.path.exists(path):
            raise TrainingError(f"{path}: its weights went once evaluated (--keep_snapshots off), and evaluating it "
                                f"again needs them: delete {os.path.dirname(path)} to train that run again")
        if self.ref is None:
            self.ref = load_policy(self.ref_path, self.device)[0]
        policy = self.load(path)
        with self.ctx:
            prompts = [p for p in self.prompts for _ in range(per_prefix)]
            ev = ppo.evaluate_policy(policy, self.ref, prompts, self.judge, self.device, self.ctx,
                                     self.max_new_tokens, self.batch_size, TEMPERATURE, seed=seed)
            prox = reward.score_texts(self.reward_model(proxy_path), [s["prompt"] for s in ev["samples"]],
                                      [s["response"] for s in ev["samples"]], self.device) if proxy_path else None
        none = [float("nan")] * len(ev["samples"])
        x = torch.tensor([[s["score"], p, s["kl"]] for s, p in zip(ev["samples"], prox or none)], dtype=torch.float64)
        cov = torch.cov(x.T, correction=1) if len(x) > 1 else torch.zeros(3, 3, dtype=torch.float64)
        var = dict(gold=cov[0, 0].item(), proxy=cov[1, 1].item(), kl=cov[2, 2].item(), gold_kl=cov[0, 2].item(),
                   proxy_kl=cov[1, 2].item())
        if not self.gold:
            var.update(gold=None, gold_kl=None)
        result = dict(gold=ev["score"] if self.gold else None, proxy=sum(prox) / len(prox) if prox else None,
                      kl=ev["kl"], length=ev["length"], n=len(x),
                      var={k: v if v is not None and math.isfinite(v) else None for k, v in var.items()})
        store_result(record, samples, [dict(prefix=s["prompt"], response=s["response"],
                                            gold=s["score"] if self.gold else None, proxy=pr, kl=s["kl"])
                                       for s, pr in zip(ev["samples"], prox or [None] * len(x))], made_by, result)
        return result


def sample_pool(sft_path, proxy_path, prompts, pool, cfg, max_new_tokens, seed, out_dir):
    """`pool` SFT samples per prompt (drawn with seed + 7), scored by the gold reward and the proxy; kept, one row per
    sample, in OUT_DIR/samples/pool.jsonl (a re-run with the same inputs reads them back). Returns (gold, proxy),
    each (P, pool), a prompt's samples in its row."""
    device, ctx = setup_device(cfg)
    record, samples = (os.path.join(out_dir, "samples", f"pool.{ext}") for ext in ("json", "jsonl"))
    made_by = dict(sft=fingerprint(sft_path), proxy=fingerprint(proxy_path), pool=pool, seed=seed + 7,
                   prompts=hashlib.sha256(json.dumps(prompts).encode()).hexdigest(), max_new_tokens=max_new_tokens,
                   temperature=TEMPERATURE, device=str(device), dtype=cfg.dtype)
    if stored_result(record, samples, made_by) is None:
        todo, responses = sft_samples(sft_path, prompts, pool, cfg, max_new_tokens, seed + 7, TEMPERATURE,
                                      "best-of-n pool")
        proxy = reward.load_reward_model(proxy_path, device)
        with ctx:
            prox = reward.score_texts(proxy, todo, responses, device)
        store_result(record, samples, [dict(prefix=p, response=r, gold=g, proxy=s) for p, r, g, s in
                                       zip(todo, responses, gold_reward(todo, responses), prox)], made_by,
                     dict(prompts=len(prompts), pool=pool))
    rows = [row for _, row in read_jsonl(samples)]
    return (torch.tensor([row[key] for row in rows], dtype=torch.float64).view(len(prompts), pool)
            for key in ("gold", "proxy"))


def pool_curves(gold, proxy, betas):
    """From one pool of SFT samples (gold, proxy: (P, M)): best-of-N selected by each reward, for N <= M (bon_curve),
    and the exact optimum tilted by each reward at each beta (optimum)."""
    ns = [n for n in BON_NS if n <= gold.size(1)]
    best_of_n = dict(proxy=bon_curve(proxy, gold, proxy, ns), gold=bon_curve(gold, gold, proxy, ns))
    return best_of_n, dict(pool=gold.size(1), **{key: [optimum(select, gold, proxy, b) for b in betas]
                                                 for key, select in (("proxy", proxy), ("gold", gold))})


# -----------------------------------------------------------------------------
# the report, and stage `plot` for any run folder

COLORS = dict(ppo="C0", ppo_gt="C1", dpo="C2", online_dpo="teal", online_dpo_gt="olive", rloo="C3", grpo="C4",
              ipo="C5", pft="C6", unlikelihood="C8", bon_proxy="C7", bon_gold="C9", sft="k")


def color(method):
    """A method's colour in the figures (a learning-rate sweep's methods get one from their name)."""
    return COLORS.get(method) or f"C{sum(map(ord, method)) % 10}"


def cell(entry, replicates):
    """'0.912 ± 0.008' (mean ± spread, max - min over replicates), '0.912' for one replicate, a count where only
    some replicates reach the KL, '-' where none does."""
    if entry["mean"] is None:
        return "-"
    text = f"{entry['mean']:.3f}" + (f" ± {entry['spread']:.3f}" if entry["n"] > 1 else "")
    return text + (f" ({entry['n']}/{replicates})" if entry["n"] < replicates else "")


def write_report(report, out):
    """results.md (gold@KL, a row per policy, best-of-N, the fits), frontier.png (gold reward against KL, every
    checkpoint), overoptimisation.png (gold and proxy reward against sqrt(KL), with Gao et al.'s fits)."""
    plt = pyplot()
    reps, R, T = report["replicates"], len(report["replicates"]), report["max_new_tokens"]
    lines = [f"IMDb controlled sentiment, preset {report['preset']} on {report['device']}: {report['k']} SFT samples "
             f"per prefix and every pair of them ({report['k'] * (report['k'] - 1) // 2} per prefix), "
             f"{report['labels']} labels; {plural(R, 'replicate')}."] + \
        [f"- replicate {rep['replicate']} (seed {rep['seed']}): labels agree with the gold reward on "
         f"{rep['preference_agreement']:.1%} of pairs; proxy reward model eval accuracy {rep['reward_accuracy']:.1%}"
         for rep in reps]
    lines += ["", f"Gold reward at fixed KL (nats per sequence; per token: divide by the response length, {T} tokens "
              f"when a continuation runs to the end), read off each method's frontier: the upper concave hull of the "
              f"SFT model (KL 0) and its strengths and checkpoints, flat after its highest point (each value is "
              f"attained, at or below its KL, by mixing two policies); mean ± spread (max - min) over replicates; "
              f"'-': no run reaches that KL.", "",
              "| method | " + " | ".join(f"gold @ KL {x:g} ({x / T:.3f}/token)" for x in KL_POINTS) + " |",
              "|---|" + "---|" * len(KL_POINTS)]
    for m, row in report["gold_at_kl"].items():
        lines.append(f"| {m} | " + " | ".join(cell(row[str(x)], R) for x in KL_POINTS) + " |")
    lines += ["", "| replicate | policy | gold reward | proxy reward | KL(pi‖ref) nats | KL per token | "
              "response tokens |", "|---|---|---|---|---|---|---|"]
    for rep in reps:
        for name, r in sorted(rep["policies"].items(), key=lambda kv: (method_of(kv[0]), kv[0])):
            lines.append(f"| {rep['replicate']} | {name} | {r['gold']:.3f} | {r['proxy']:+.3f} | {r['kl']:.2f} | "
                         f"{r['kl'] / max(r['length'], 1):.3f} | {r['length']:.1f} |")
    lines += ["", "Best-of-N from a pool of SFT samples per prompt. KL: of the best-of-N selection from the pool, "
              "computed from the scores (ties share their probability); bound: log N - (N-1)/N (Beirami et al. 2024).",
              "", "| replicate | best-of-N | N | gold reward | proxy reward | KL from the pool | bound |",
              "|---|---|---|---|---|---|---|"]
    for rep in reps:
        for sel in ("proxy", "gold"):
            for r in rep["best_of_n"][sel]:
                lines.append(f"| {rep['replicate']} | by {sel} | {r['n']} | {r['gold']:.3f} | {r['proxy']:+.3f} | "
                             f"{r['kl']:.3f} | {r['kl_bound']:.3f} |")
    gaps = report["objective_gaps"]
    if gaps:
        M = reps[0]["optimum"]["pool"]
        lines += ["", f"Each policy against the exact optimum of its own objective J = E[r] - beta KL (r: the reward "
                  f"it maximises, proxy or gold; beta: its strength), J* = beta E_x log E_ref[exp(r / beta)] from the "
                  f"pool of {M} SFT samples per prefix (the optimum restricted to the pool; its KL is at most "
                  f"log {M} = {math.log(M):.2f}); ± one standard error. '*': J* rests on fewer than 10 pool samples "
                  f"per prefix, so it is underestimated. DPO and online DPO maximise J only if their labels are "
                  f"Bradley-Terry draws from r; labels that follow a reward deterministically (gold labels, the "
                  f"proxy's choice) have no finite optimum, their beta bounds no KL, and their rows tell how far they "
                  f"went, not how far they are from an optimum.", "",
                  "| replicate | policy | r | beta | KL | J | KL of the optimum | J* | gap J* - J |",
                  "|---|---|---|---|---|---|---|---|---|"]
        pm = lambda x, se: f"{x:+.3f}" + (f" ± {se:.3f}" if se is not None else "")
        for g in sorted(gaps, key=lambda g: (g["replicate"], method_of(g["policy"]), g["policy"])):
            lines.append(f"| {g['replicate']} | {g['policy']} | {g['reward']} | {g['beta']:g} | {g['kl']:.2f} | "
                         f"{pm(g['j'], g['j_se'])} | {g['kl_star']:.2f} | {pm(g['j_star'], g['j_star_se'])}"
                         f"{'*' if g['few_samples'] else ''} | {g['gap']:+.3f} |")
    lines += ["", "Gao et al. 2022's forms, fitted to reward minus the SFT model's against d = sqrt(KL): "
              "best-of-N d (a - b d), the others d (a - b log d).", "",
              "| method | gold a | gold b | gold rmse | proxy a | proxy b | proxy rmse |",
              "|---|---|---|---|---|---|---|"]
    for m, fit in report["fits"].items():
        lines.append(f"| {m} | " + " | ".join("- | - | -" if fit[k] is None else
                                              f"{fit[k]['a']:.4f} | {fit[k]['b']:.4f} | {fit[k]['rmse']:.4f}"
                                              for k in ("gold", "proxy")) + " |")
    if report.get("failed"):
        lines += ["", "Failed, and left out of the tables above (their log.txt says more; the same command again "
                  "retries them):", "", "| sub-run | why |", "|---|---|"]
        lines += [f"| {d} | {why.replace('|', '/')} |" for d, why in report["failed"].items()]
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in report["timings_s"].items())]
    with atomic_write(os.path.join(out, "results.md")) as f:
        f.write("\n".join(lines) + "\n")

    # gold reward against KL: every checkpoint (final policies large, earlier ones small), each replicate's frontier
    # as a line, best-of-N dashed
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key in zip(axes, ("gold", "proxy")):
        for i, rep in enumerate(reps):
            res = rep["policies"]
            for m in sorted({method_of(n) for n in res} - {"sft"}):
                final = [(r["kl"], r[key]) for n, r in res.items() if method_of(n) == m and "@" not in n]
                along = [(r["kl"], r[key]) for n, r in res.items() if method_of(n) == m and "@" in n]
                ax.plot(*zip(*final), "o", color=color(m), alpha=0.8, label=m if i == 0 else None)
                if along:
                    ax.plot(*zip(*along), ".", color=color(m), alpha=0.6)
                if key == "gold":  # the frontier gold@KL reads
                    ax.plot(*zip(*attainable(frontier(res, m))), "-", color=color(m), alpha=0.4, lw=1)
            for sel, style in (("proxy", "--"), ("gold", ":")):
                ax.plot([r["kl"] for r in rep["best_of_n"][sel]], [r[key] for r in rep["best_of_n"][sel]], style,
                        color="C7", label=f"best-of-N by {sel}" if i == 0 else None)
            for sel, style in (("proxy", "-."), ("gold", "-")) if rep.get("optimum") else ():
                ax.plot([r["kl"] for r in rep["optimum"][sel]], [r[key] for r in rep["optimum"][sel]], style,
                        color="k", alpha=0.5, lw=1, label=f"optimum tilted by {sel}" if i == 0 else None)
            ax.plot([0], [res["sft"][key]], "k*", label="SFT" if i == 0 else None)
        # linear below 1 nat, logarithmic above: the low-KL stretch, where the methods part, is not squeezed by a
        # run that ends at 60+ nats
        ax.set_xscale("symlog", linthresh=1, linscale=0.5)
        ticks = [t for t in (0, 1, 2.5, 5, 10, 25, 50, 100, 250) if t <= ax.get_xlim()[1]]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_xlabel("KL(π ‖ π_ref), nats per response (log scale above 1)")
        ax.set_ylabel(f"{key} reward" + (" (P(positive))" if key == "gold" else " (normalised)"))
        ax.set_title(f"{key} reward vs KL, {plural(R, 'replicate')}\n(small dots: checkpoints along training"
                     + ("; lines: each method's frontier, its points' hull)" if key == "gold" else ")"), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "frontier.png"), dpi=120)
    plt.close(fig)

    # over-optimisation (Gao et al.): reward gained over the SFT model against d = sqrt(KL), points and fits
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key in zip(axes, ("gold", "proxy")):
        labelled = set()
        for rep in reps:
            sft = rep["policies"]["sft"]
            for name, r in rep["policies"].items():
                if name != "sft":
                    m = method_of(name)
                    ax.plot(math.sqrt(max(r["kl"], 0)), r[key] - sft[key], ".", color=color(m), alpha=0.5,
                            label=None if m in labelled else m)
                    labelled.add(m)
            b = rep["best_of_n"]["proxy"]
            ax.plot([math.sqrt(max(x["kl"], 0)) for x in b], [x[key] - sft[key] for x in b], "x", color="C7",
                    alpha=0.6, label=None if "bon" in labelled else "best-of-N by proxy")
            labelled.add("bon")
        for m, fit in report["fits"].items():
            if fit[key] is None:
                continue
            reach = max(math.sqrt(max(r["kl"], 0)) for rep in reps for n, r in rep["policies"].items()
                        if method_of(n) == m) if m != "bon_proxy" else \
                max(math.sqrt(max(x["kl"], 0)) for rep in reps for x in rep["best_of_n"]["proxy"])
            ds = [reach * j / 50 for j in range(1, 51)]
            ax.plot(ds, [fit[key]["a"] * x0 + fit[key]["b"] * x1 for x0, x1 in map(GAO_FORMS[fit[key]["form"]], ds)],
                    "-", color=color(m), label=f"{m} fit")
        ax.set_xlabel("d = sqrt(KL), sqrt(nats)")
        ax.set_ylabel(f"{key} reward minus the SFT model's")
        ax.set_title(f"{key} reward as KL grows, with Gao et al.'s fits")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "overoptimisation.png"), dpi=120)
    plt.close(fig)


def pyplot():
    """matplotlib's pyplot, drawing to files only (Agg). Imported here, when a figure is drawn: it takes a second or
    two to import, which no training run should pay."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


@dataclass
class PlotConfig:
    run: str = opt("out/imdb/rep1/reward", "run folder whose metrics.jsonl to plot (default: the default run's reward "
                                           "model)")
    keys: str = opt("", "comma-separated metrics to plot (default: every numeric one)")
    out: str = opt("", "PNG to write (default: RUN/metrics.png)")


def plot(cfg):
    plt = pyplot()
    path = os.path.join(cfg.run, "metrics.jsonl")
    rows = [obj for _, obj in read_jsonl(path)]
    keys = cfg.keys.split(",") if cfg.keys else sorted({k for r in rows for k, v in r.items()
                                                        if k != "step" and isinstance(v, (int, float))})
    missing = [k for k in keys if not any(k in r for r in rows)]
    if missing:
        raise ConfigError(f"--keys: {', '.join(missing)} not in {path}")
    cols = min(3, len(keys))
    rows_of_axes = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows_of_axes, cols, figsize=(5 * cols, 3.2 * rows_of_axes), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
        ax.plot(*zip(*pts), ".-")
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    out = cfg.out or os.path.join(cfg.run, "metrics.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")
    return 0

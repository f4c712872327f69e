"""
The entry point of every stage: the stage table and main(). Nothing imports this file.

    python train.py                          # the main job: the IMDb pipeline (stage `pipeline`) on the built-in sample
    python train.py sft --max_iters=2000     # train a GPT on the IMDb sample's review text
    python train.py sample --ckpt=out/sft/ckpt.pt --prompt="This movie"
    python train.py STAGE --help             # every key of a stage, with its default and meaning

Where things are: config.py (keys and their parsing), runtime.py (the run folder, resume, the optimizer step),
checkpoint.py (checkpoints and Hugging Face folders), dist.py (torchrun); model.py and data.py below them; one file per
algorithm above them (sft.py, reward.py, dpo.py, ppo.py); the benchmarks on top (pipeline.py and report.py with
imdb.py, optimum.py, bench.py; own_data.py: the pipeline on your data).

Bad input (data files, keys, values, checkpoints) ends the run with one line `error: ...` and exit status 2; a run
that cannot go on (a non-finite loss) with exit status 1; Ctrl-C with a checkpoint and exit status 130.
"""
import os
import sys

import checkpoint
import dpo
import optimum
import own_data
import pipeline
import ppo
import report
import reward
import sft
from config import ConfigError, TrainingError, config_help, parse_config
from data import DataError, use_chat_template
from dist import init_distributed, is_main, shutdown, world
from runtime import keep_freed_memory, resume_config, stop_with_parent

# stage -> (config class, function, what it does, runs under torchrun)
STAGES = {
    "sft": (sft.SFTConfig, sft.sft, "train a GPT on text, or supervised fine-tuning on prompt/response data", True),
    "sample": (sft.SampleConfig, sft.sample, "generate text from a checkpoint", False),
    "reward": (reward.RewardConfig, reward.train, "train a Bradley-Terry reward model on preference pairs", True),
    "score": (reward.ScoreConfig, reward.score, "score prompt/response pairs (or preference pairs) with a reward model",
              False),
    "dpo": (dpo.DPOConfig, dpo.train, "DPO / conservative DPO / IPO on preference pairs", True),
    "online_dpo": (dpo.OnlineDPOConfig, dpo.train_online, "online DPO: pairs sampled from the policy, labelled by a "
                   "reward", True),
    "ppo": (ppo.PPOConfig, lambda cfg: ppo.train_rl(cfg, "ppo"),
            "PPO with GAE, a critic and a reference-model KL penalty", True),
    "rloo": (ppo.RLOOConfig, lambda cfg: ppo.train_rl(cfg, "rloo"),
             "REINFORCE leave-one-out (k samples per prompt, no critic)", True),
    "grpo": (ppo.GRPOConfig, lambda cfg: ppo.train_rl(cfg, "grpo"),
             "GRPO (group-normalised advantages, k3 KL in the loss)", True),
    "bon": (sft.BoNConfig, sft.bon, "best-of-N sampling; sft on its selected.jsonl is rejection-sampling fine-tuning",
            True),
    "optimum": (optimum.OptimumConfig, optimum.optimum,
                "every method against the exact KL-regularised optimum (one prompt, known answer)", False),
    "pipeline": (pipeline.PipelineConfig, lambda cfg: (own_data if own_data.wanted(cfg) else pipeline).pipeline(cfg),
                 "end to end: the IMDb controlled-sentiment benchmark, or your own data (--preferences)", False),
    "plot": (report.PlotConfig, report.plot, "plot a run folder's metrics.jsonl to PNG", False),
    "export": (checkpoint.ExportConfig, checkpoint.export,
               "a checkpoint to a Hugging Face GPT-2 folder (transformers loads it)", False),
}


def main(argv):
    keep_freed_memory()
    stop_with_parent()
    if argv and argv[0] in ("-h", "--help"):
        width = max(map(len, STAGES))
        print(__doc__.strip() + "\n\nstages:\n" + "\n".join(f"  {s:<{width}}  {v[2]}" for s, v in STAGES.items()))
        return 0
    stage = argv[0] if argv and not argv[0].startswith("-") else "pipeline"
    args = argv[1:] if argv and not argv[0].startswith("-") else argv
    if stage not in STAGES:
        print(f"error: unknown stage {stage!r}; stages: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    cls, fn, what, distributed = STAGES[stage]
    if "-h" in args or "--help" in args:
        print(config_help(cls, f"python train.py {stage} [--key=value ...]: {what}"))
        return 0
    try:
        cfg = parse_config(cls, args)
        if getattr(cfg, "resume", False):
            cfg = resume_config(stage, cls, cfg, args)
        if hasattr(cfg, "chat_template"):
            use_chat_template(cfg.chat_template)
        if world() > 1:
            if not distributed:
                raise ConfigError(f"stage {stage} runs in one process, not under torchrun (the pipeline hands its "
                                  f"sub-runs to GPUs with --gpus)")
            init_distributed(cfg)
        code = fn(cfg) or 0
        shutdown()  # under torchrun: every process leaves the process group together (nothing to do without it)
        return code
    except (ConfigError, DataError) as e:
        if is_main():  # the same error on every process: one line
            print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the machine, not the code: a full disk, a folder that went away
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    code = main(sys.argv[1:])
    if world() > 1:  # torchrun: the run is over and saved; skip the interpreter's teardown, where gloo's threads can
        sys.stdout.flush(), sys.stderr.flush()  # still abort it (SIGABRT after "done", seen twice in the tests)
        os._exit(code)
    sys.exit(code)

"""The ``grao`` command line's arguments, all in one parser: train, eval, compare and plan."""

from __future__ import annotations

import argparse

from .. import config as config_mod
from ..losses import METHODS

COMPARE_SETS = ("method", "beta", "lam", "lr", "output_dir")  # keys grao compare sets per run (its own flags)


def _true_false(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grao", description="GRAO alignment training without materialising the logits.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (no arguments: the embedded demo)")
    t.add_argument("--config", help="YAML or TOML file of config keys")
    t.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an --output-dir an earlier run used, deleting that run's files (and nothing else)",
    )
    t.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes on this machine, the model sharded across them with FSDP2 (launches torchrun; the same as "
        "torchrun --standalone --nproc-per-node N -m grao train ...)",
    )
    config_mod.add_arguments(t)
    e = sub.add_parser("eval", help="mean reward, RAS and NAG on held-out prompts")
    e.add_argument(
        "--run",
        default=None,
        help="a run directory: its last checkpoint, its start model as baseline, its held-out set, reward and "
        "generation settings (default: the run holding --model's checkpoint, else runs/demo)",
    )
    e.add_argument("--model", help="model directory to evaluate (default: the run's last checkpoint)")
    e.add_argument("--baseline", help="starting model directory for NAG (default: the run's starting model)")
    e.add_argument("--data", help="JSONL of held-out prompts (default: the run's held-out set)")
    e.add_argument("--reward", help="reward (default: the run's)")
    e.add_argument("--max-new-tokens", type=int, help="longest response (default: the run's max_new_tokens)")
    e.add_argument(
        "--sample",
        action="store_true",
        help="sample at the run's temperature (default: the run's eval_greedy, greedy unless it was false)",
    )
    e.add_argument("--output", help="also write the results (with every response) to this JSON file")
    e.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="accept a run whose config sets trust_remote_code (runs the Python code its model directory ships)",
    )
    c = sub.add_parser(
        "compare",
        help="methods and pipelines x seeds (x learning rates, x a beta/lambda grid) on one task: a table of the "
        "mean +- 95%% CI and plots",
        description="Train each method or pipeline with each seed (and each learning rate, and each beta/lambda of "
        "the grid for the GRAO methods), each as a grao train run under --output-dir, then write compare.md, "
        "compare.json, curves.png, shares.png and sweep.png there. Rerunning the same command skips finished runs "
        "and resumes interrupted ones.",
    )
    c.add_argument(
        "--methods",
        default=",".join(m for m in METHODS if not m.startswith("grao-")),
        help=f"comma-separated methods among {', '.join(METHODS)}, or pipelines of two joined by + (sft+grpo: "
        "grpo from sft's final model, the steps split between them) (default: %(default)s)",
    )
    c.add_argument("--seeds", type=int, default=3, help="seeds per method: seed, seed+1, ... (default: %(default)s)")
    c.add_argument(
        "--beta", dest="betas", help="comma-separated imitation weights; several = a grid for the GRAO methods"
    )
    c.add_argument(
        "--lam", dest="lams", help="comma-separated alignment weights; several = a grid for the GRAO methods"
    )
    c.add_argument(
        "--lr",
        dest="lrs",
        help="comma-separated peak learning rates; several = every method at each, and the table reports each "
        "method's held-out metrics at the rate with the best validation reward (validation_size prompts, by default "
        "eval_size, taken out of training)",
    )
    c.add_argument(
        "--pipeline-split",
        type=float,
        default=0.5,
        help="a pipeline's first stage's share of the steps, rounded (default: %(default)s, half each)",
    )
    c.add_argument("--config", help="YAML or TOML file of config keys shared by every run")
    c.add_argument(
        "--output-dir", dest="compare_dir", default="runs/compare", help="the compare directory (default: %(default)s)"
    )
    config_mod.add_arguments(c, exclude=COMPARE_SETS)
    pl = sub.add_parser("plan", help="memory per rank, part by part, and which options make a model fit")
    pl.add_argument(
        "model",
        nargs="?",
        help="a preset (qwen2.5-7b, moonlight-16b-a3b) or a local model directory with a config.json "
        "(default: the --config's model)",
    )
    pl.add_argument("--config", help="the run's YAML or TOML config (its batch, lengths, LoRA and memory keys)")
    pl.add_argument("--devices", type=int, default=1, help="GPUs (default 1)")
    pl.add_argument("--memory-gb", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    pl.add_argument("--fsdp", type=int, help="ranks to shard over (default: all --devices)")
    pl.add_argument("--seq-len", type=int, help="longest sequence (default: max_prompt_tokens + max_new_tokens)")
    for flag, kind, text in (
        ("--prompts-per-step", int, "prompts per step"),
        ("--micro-batch-prompts", int, "prompts per forward/backward (0: a rank's share at once)"),
        ("--group-size", int, "G, samples per prompt"),
        ("--lora-rank", int, "LoRA rank (0: full fine-tuning)"),
        ("--compute-dtype", str, "activation dtype: bf16 or fp32"),
        ("--param-dtype", str, "stored parameters: fp32, or bf16 with an fp32 master copy in the optimizer"),
        ("--cpu-offload", _true_false, "FSDP CPU offload: true or false"),
        ("--gradient-checkpointing", _true_false, "true or false"),
        ("--loss-backend", str, "torch, native or triton (default triton, from auto)"),
    ):
        pl.add_argument(flag, type=kind, help=f"{text} (default: the config's)")
    pl.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    return p


def without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out

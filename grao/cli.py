"""``grao train`` and ``grao eval``.

``grao train`` with no arguments runs the embedded demo (tiny MoE, synthetic
task, writes runs/demo/). Any config key can be given as a flag
(``--prompts-per-step 32``) and overrides the ``--config`` file (YAML or TOML).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# No hub downloads, ever: every model, tokenizer and reward model is a local directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from . import config as config_mod  # noqa: E402

EXIT_INTERRUPTED = 130


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("config keys (override the --config file)")
    for name, f in config_mod.FIELDS.items():
        default = f.default if f.default is not config_mod.dataclasses.MISSING else f.default_factory()
        kind = config_mod._base_type(name)[0].__name__
        group.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=argparse.SUPPRESS,
            metavar=kind.upper(),
            help=f"{f.metadata.get('help', '')} (default: {default!r})",
        )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grao", description="GRAO alignment training without materialising the logits.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (no arguments: the embedded demo)")
    t.add_argument("--config", help="YAML or TOML file of config keys")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    _add_config_flags(t)
    e = sub.add_parser("eval", help="mean reward, RAS and NAG on held-out prompts")
    e.add_argument(
        "--run",
        default=None,
        help="a run directory: its last checkpoint, its start model as baseline, "
        "its held-out set and reward (default: runs/demo)",
    )
    e.add_argument("--model", help="model directory to evaluate (default: the run's last checkpoint)")
    e.add_argument("--baseline", help="starting model directory for NAG (default: the run's starting model)")
    e.add_argument("--data", help="JSONL of held-out prompts (default: the run's held-out set)")
    e.add_argument("--reward", help="reward (default: the run's)")
    e.add_argument("--max-new-tokens", type=int)
    e.add_argument("--sample", action="store_true", help="sample at the run's temperature instead of greedy decoding")
    e.add_argument("--output", help="also write the results (with every response) to this JSON file")
    return p


def train(args) -> int:
    from .trainer import Trainer, latest_checkpoint

    overrides = {k: v for k, v in vars(args).items() if k in config_mod.FIELDS}
    cfg = config_mod.load(args.config, overrides)
    saved = Path(cfg.output_dir) / "config.yaml"
    if args.resume and saved.is_file():  # resume with the run's own config, then the file and flags given now
        cfg = config_mod.load(args.config, overrides, base=config_mod.load(saved))
    trainer = Trainer(cfg, resume=args.resume)
    where = f"resuming at step {trainer.step}" if args.resume else "from scratch"
    print(f"grao: training {cfg.model} on {cfg.data} ({where}) -> {cfg.output_dir}", file=sys.stderr)
    done = trainer.train()
    ckpt = latest_checkpoint(cfg.output_dir)
    if not done:
        print(
            f"grao: stopped at step {trainer.step}; checkpoint {ckpt}. Continue with: "
            f"grao train --output-dir {cfg.output_dir} --resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    summary = _summary(Path(cfg.output_dir) / "metrics.jsonl")
    print(json.dumps(summary))
    print(f"grao: done; metrics, plot.png and checkpoints in {cfg.output_dir}", file=sys.stderr)
    return 0


def _summary(metrics: Path) -> dict:
    from .plot import read_metrics

    _, evals = read_metrics(metrics)
    if not evals:
        return {}
    return {
        "eval/reward@start": evals[0]["eval/reward"],
        "eval/reward@end": evals[-1]["eval/reward"],
        "eval/ras@end": evals[-1]["eval/ras"],
        "eval/nag@end": evals[-1]["eval/nag"],
        "step": evals[-1]["step"],
    }


def evaluate_cmd(args) -> int:
    from . import evaluate, models, rewards
    from .data import load_jsonl
    from .trainer import latest_checkpoint, load_examples

    run = Path(args.run or config_mod.TrainConfig.output_dir)
    saved = run / "config.yaml"
    if not saved.is_file() and (args.model is None or args.data is None):
        raise config_mod.ConfigError(f"{run} is not a run directory (no config.yaml): give --model and --data")
    cfg = config_mod.load(saved) if saved.is_file() else config_mod.TrainConfig(data=args.data, model=args.model)
    model_dir = args.model or latest_checkpoint(run)
    if model_dir is None:
        raise config_mod.ConfigError(f"no checkpoint in {run / 'checkpoints'}")
    baseline = args.baseline
    if baseline is None and saved.is_file():  # the run's starting model
        baseline = run / "initial" if (run / "initial").is_dir() else cfg.model
    examples = load_jsonl(args.data) if args.data else load_examples(cfg)[1]
    runtime = models.choose_runtime(cfg.device, cfg.precision, cfg.attn_implementation)
    reward = rewards.resolve(
        args.reward or cfg.reward, "demo" if not args.data and cfg.data == "demo" else "file", runtime.device
    )
    opts = dict(
        max_new_tokens=args.max_new_tokens or cfg.max_new_tokens,
        max_prompt_tokens=cfg.max_prompt_tokens,
        batch_size=cfg.eval_batch_size,
        greedy=not args.sample,
        temperature=cfg.temperature,
        seed=cfg.seed,
    )

    def run_model(path):
        model = models.load_model(path, runtime.attn_implementation).to(runtime.device)
        return evaluate.evaluate(model, models.load_tokenizer(path), examples, reward, runtime, **opts)

    res = run_model(model_dir)
    out = {"model": str(model_dir), "prompts": len(examples), "eval/reward": res.mean_reward, "eval/ras": res.ras}
    if baseline is not None:
        base = run_model(baseline)
        out.update(
            {
                "baseline": str(baseline),
                "eval/nag": evaluate.nag(res.rewards, base.rewards),
                "baseline/reward": base.mean_reward,
            }
        )
    print(json.dumps(out))
    if args.output:
        detail = dict(
            out,
            responses=[
                {"prompt": ex.prompt, "reference": ex.reference, "response": r, "reward": v}
                for ex, r, v in zip(examples, res.responses, res.rewards)
            ],
        )
        Path(args.output).write_text(json.dumps(detail, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["train"]
    args = _parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    from .data import DataError
    from .models import ModelError

    hf_logging.disable_progress_bar()  # our own bar is the one to watch; save_pretrained's would interleave with it

    try:
        return train(args) if args.command == "train" else evaluate_cmd(args)
    except (config_mod.ConfigError, DataError, ModelError) as exc:
        print(f"grao: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ngrao: aborted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

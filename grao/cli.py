"""``grao train``, ``grao eval``, ``grao compare`` and ``grao plan``.

``grao train`` with no arguments runs the embedded demo (tiny MoE, synthetic
task, writes runs/demo/). Any config key can be given as a flag
(``--prompts-per-step 32``) and overrides the ``--config`` file (YAML or TOML).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import sys
from pathlib import Path

# No hub downloads, ever: every model, tokenizer and reward model is a local directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from . import config as config_mod  # noqa: E402
from .log import say  # noqa: E402
from .losses import METHODS  # noqa: E402

EXIT_CONFIG = 2  # a setting, data file or model the run cannot use (as argparse's usage errors)
EXIT_FAILED = 1  # the run failed part-way (reward, disk); what it had done is checkpointed
COMPARE_SETS = ("method", "beta", "lam", "output_dir")  # keys grao compare sets per run (its own flags)


def _true_false(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def _parser() -> argparse.ArgumentParser:
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
        help="methods x seeds (x a beta/lambda grid) on one task: a table of mean +- std and plots",
        description="Train each method with each seed (and each beta/lambda of the grid, for the GRAO methods), "
        "each as a grao train run under --output-dir, then write compare.md, compare.json, curves.png, shares.png "
        "and sweep.png there. Rerunning the same command skips finished runs and resumes interrupted ones.",
    )
    c.add_argument(
        "--methods",
        default=",".join(m for m in METHODS if not m.startswith("grao-")),
        help=f"comma-separated methods among {', '.join(METHODS)} (default: %(default)s)",
    )
    c.add_argument("--seeds", type=int, default=3, help="seeds per method: seed, seed+1, ... (default: %(default)s)")
    c.add_argument(
        "--beta", dest="betas", help="comma-separated imitation weights; several = a grid for the GRAO methods"
    )
    c.add_argument(
        "--lam", dest="lams", help="comma-separated alignment weights; several = a grid for the GRAO methods"
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


def launch(nproc: int, argv: list[str]) -> int:
    """``argv`` (a ``grao train`` command line without ``--nproc``) run by torchrun's agent in ``nproc`` local
    processes; the exit status is the ranks' (128 + the signal when a signal stopped them), not the agent's 1."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "grao", *argv])
    try:
        torchrun.run(args)
    except ChildFailedError as exc:
        return _ranks_status({rank: failure.exitcode for rank, failure in exc.failures.items()})
    return 0


def _ranks_status(codes: dict[int, int]) -> int:
    """One exit status for failed ranks: a signal's 128 + N when a rank stopped on SIGINT/SIGTERM (it saved a
    checkpoint; the agent may have ended the others with a signal after it), otherwise the first rank's status."""
    stopped = [c for c in codes.values() if c in (128 + signal.SIGINT, 128 + signal.SIGTERM)]
    if stopped:
        return stopped[0]
    rank = min(codes)
    code = codes[rank]
    say(f"error: rank {rank} exited with status {code}; its messages are above")
    return code if 0 < code < 256 else EXIT_FAILED


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def train(args) -> int:
    from .train import distributed, run_dir, run_lock
    from .train.run_dir import CONFIG
    from .train.trainer import Trainer

    overrides = config_mod.from_arguments(args)
    cfg = config_mod.load(args.config, overrides)
    saved = Path(cfg.output_dir) / CONFIG
    run_dir.check_no_symlinks(Path(cfg.output_dir))  # before reading or writing anything through one
    if args.resume and saved.is_file():  # the run's own config, then the file and flags given now
        given = cfg
        cfg = config_mod.load(args.config, overrides, base=config_mod.load(saved))
        _refuse_code_from_run(cfg.trust_remote_code and not given.trust_remote_code, saved, "--trust-remote-code true")
    run_dir.check_writable(Path(cfg.output_dir))
    code = None
    try:
        # rank 0 holds the run directory's lock for the run's life (torchrun stops the other ranks if it cannot)
        with run_lock.hold(cfg.output_dir, say) if _rank_zero() else contextlib.nullcontext():
            trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
            code = _train(trainer, cfg, args)
        return code
    finally:
        distributed.shutdown(wait=code == 0)


def _refuse_code_from_run(runs_code: bool, saved: Path, flag: str) -> None:
    """ConfigError when a run directory's own config.yaml, not the command, turns on trust_remote_code: a received
    run must not make loading it run the Python code of a model directory."""
    if runs_code:
        raise config_mod.ConfigError(
            f"{saved} sets trust_remote_code: true, which runs the Python code its model directory ships; "
            f"a run directory cannot turn that on by itself: give {flag} if you trust that code"
        )


def _rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _train(trainer, cfg, args) -> int:
    from .eval.rewards import RewardError
    from .train.checkpoint import latest

    if not trainer.world.main:  # rank 0 reports; the others only train
        try:
            done = trainer.train()
        except RewardError:
            return EXIT_FAILED
        return 0 if done else 128 + int(getattr(signal, trainer.stopped_by, signal.SIGINT))
    where = f"resuming at step {trainer.step} from {trainer.checkpoint}" if args.resume else "from scratch"
    say(f"training {cfg.model} on {cfg.data} ({where}) -> {cfg.output_dir}")
    resume = f"grao train --output-dir {shlex.quote(cfg.output_dir)} --resume"
    try:
        done = trainer.train()
    except RewardError as exc:
        say(f"error: {exc}")
        ckpt = latest(cfg.output_dir)
        if trainer.step > 0 and ckpt is not None:
            say(f"the {trainer.step} step(s) done are in {ckpt}; fix the reward, then continue with: {resume}")
        return EXIT_FAILED
    if not done:
        ckpt = latest(cfg.output_dir)
        if ckpt is None:  # stopped in the step-0 evaluation: there is nothing to resume
            say(
                f"stopped by {trainer.stopped_by} before the first step finished; nothing was saved to resume from. "
                "To start again, rerun the same command with --overwrite"
            )
        else:
            say(f"stopped by {trainer.stopped_by} at step {trainer.step}; checkpoint {ckpt}. Continue with: {resume}")
        signum = getattr(signal, trainer.stopped_by, signal.SIGINT) if trainer.stopped_by else signal.SIGINT
        return 128 + int(signum)
    summary = _summary(Path(cfg.output_dir) / "metrics.jsonl")
    print(json.dumps(summary))
    say(f"done; metrics, plot.png and checkpoints in {cfg.output_dir}")
    return 0


def _summary(metrics: Path) -> dict:
    from .tools.plot import read_metrics

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


def _run_of(model_dir: str | None) -> Path | None:
    """The run directory a ``checkpoints/step-NNNNNN`` model directory belongs to, or None."""
    from .train.checkpoint import CHECKPOINTS
    from .train.run_dir import CONFIG

    if model_dir is None:
        return None
    path = Path(model_dir).resolve()
    run = path.parent.parent
    return run if path.parent.name == CHECKPOINTS and (run / CONFIG).is_file() else None


def evaluate_cmd(args) -> int:
    from . import models
    from .data import context_limits, load_examples, load_jsonl
    from .eval import evaluate, rewards
    from .models import runtime
    from .train import checkpoint, output_errors
    from .train.run_dir import CONFIG, INITIAL

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise config_mod.ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.output:  # before the evaluation, not after it
        output_errors.check_file_writable(args.output, "--output")
    run = Path(args.run or _run_of(args.model) or config_mod.TrainConfig().output_dir)
    saved = run / CONFIG
    if not saved.is_file() and (args.model is None or args.data is None):
        raise config_mod.ConfigError(f"{run} is not a run directory (no config.yaml): give --model and --data")
    cfg = config_mod.load(saved) if saved.is_file() else config_mod.TrainConfig(data=args.data, model=args.model)
    _refuse_code_from_run(cfg.trust_remote_code and not args.trust_remote_code, saved, "--trust-remote-code")
    model_dir = args.model
    if model_dir is None:
        model_dir, skipped = checkpoint.latest_intact(run)
        for reason in skipped:
            say(f"warning: {reason}; evaluating an older checkpoint")
        if model_dir is None:
            detail = f" ({'; '.join(skipped)})" if skipped else ""
            raise config_mod.ConfigError(f"no intact checkpoint in {run / 'checkpoints'}{detail}")
    elif (Path(model_dir) / checkpoint.MANIFEST).is_file():  # a checkpoint named by --model: checked the same way
        reason = checkpoint.problem(Path(model_dir))
        if reason is not None:
            raise checkpoint.CheckpointError(f"--model: {reason}")
    baseline = args.baseline
    if baseline is None and saved.is_file():  # the run's starting model
        baseline = run / INITIAL if (run / INITIAL).is_dir() else cfg.model
    examples = load_jsonl(args.data) if args.data else load_examples(cfg)[1]
    rt = runtime.choose(cfg.device, cfg.precision, cfg.attn_implementation)
    reward = rewards.resolve(
        args.reward or cfg.reward,
        "demo" if not args.data and cfg.data == "demo" else "file",
        rt.device,
        **rewards.judge_options(cfg),
    )
    opts = dict(
        max_new_tokens=cfg.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens,
        max_prompt_tokens=cfg.max_prompt_tokens,
        batch_size=cfg.eval_batch_size,
        greedy=cfg.eval_greedy and not args.sample,
        temperature=cfg.temperature,
        seed=cfg.seed,
        chat_template=cfg.chat_template,
    )
    decoding = "greedy" if opts["greedy"] else f"sampling at temperature {opts['temperature']:g}"
    source = f"the run's {saved}" if saved.is_file() else "the defaults (no run config.yaml)"
    say(f"generating up to {opts['max_new_tokens']} new tokens, {decoding}, as set by {source}")

    def run_model(path):
        if models.is_adapter(path):  # a LoRA checkpoint: its adapter on the base the run started from
            base_dir = run / INITIAL if cfg.model == models.TINY_MOE else cfg.model
            base = models.load_model(base_dir, rt.attn_implementation, cfg.trust_remote_code)
            base = base.to(rt.device, models.lora_base_dtype(cfg.lora_base_dtype, rt.device))
            model = models.load_adapter(base, path, trainable=False)
        else:
            model = models.load_model(path, rt.attn_implementation, cfg.trust_remote_code).to(rt.device)
        tokenizer = models.load_tokenizer(path, cfg.trust_remote_code)
        budget, _ = context_limits.prompt_budget(model.config, opts["max_prompt_tokens"], opts["max_new_tokens"])
        rewards.pop_metrics(reward)  # counts of this evaluation only
        result = evaluate.evaluate(model, tokenizer, examples, reward, rt, **dict(opts, max_prompt_tokens=budget))
        rewards.check_judged(rewards.pop_metrics(reward), reward)
        return result

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
        try:
            Path(args.output).write_text(json.dumps(detail, indent=1))
        except OSError as exc:
            raise output_errors.OutputError(output_errors.describe(args.output, exc)) from exc
    return 0


def compare_cmd(args) -> int:
    from .tools import compare

    overrides = config_mod.from_arguments(args)
    # the shared settings: the defaults without a progress bar per run (compare prints one line per run)
    base = config_mod.load(args.config, overrides, base=config_mod.TrainConfig(progress=False))
    methods = compare.parse_methods(args.methods)
    betas, lams = compare.parse_values(args.betas, "--beta"), compare.parse_values(args.lams, "--lam")
    runs = compare.plan(base, methods, args.seeds, args.compare_dir, betas, lams)
    Path(args.compare_dir).mkdir(parents=True, exist_ok=True)
    command = shlex.join(["grao", "compare", *args.argv])
    try:
        summary = compare.compare(runs, args.compare_dir, command, say=say)
    except compare.CompareStopped as exc:
        say(f"{exc}; that run saved a checkpoint. Continue with the same command: {command}")
        return 128 + exc.signum
    except compare.RunFailed as exc:
        say(f"error: {exc}; the finished runs are kept, and the same command continues after a fix")
        return exc.rc
    print(json.dumps({label: entry["reward"]["mean"] for label, entry in summary.items()}))
    say(f"done; compare.md, compare.json and the plots in {args.compare_dir}")
    return 0


def plan_cmd(args) -> int:
    from .tools import plan

    # A model named on the command line is the run's model, so the run's model-dependent defaults (max_new_tokens)
    # are that model's, not the demo's.
    cfg = config_mod.load(args.config, {"model": args.model} if args.model else None)
    model, note = plan.resolve_model(cfg.model)
    if note:
        say(note)
    arch = plan.architecture(model, config_mod.lora_targets(cfg), cfg.model_overrides)
    overrides = {
        k: getattr(args, k)
        for k in (
            "fsdp",
            "seq_len",
            "prompts_per_step",
            "micro_batch_prompts",
            "group_size",
            "lora_rank",
            "compute_dtype",
            "param_dtype",
            "cpu_offload",
            "gradient_checkpointing",
            "loss_backend",
        )
    }
    settings = plan.settings_from_config(cfg, args.devices, args.memory_gb, **overrides)
    result, alternatives = plan.plan(arch, settings), plan.options(arch, settings)
    print(
        plan.dumps(plan.to_json(arch, result, alternatives)) if args.json else plan.markdown(arch, result, alternatives)
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["train"]
    args = _parser().parse_args(argv)
    if args.command == "train" and args.nproc != 1:
        if args.nproc < 1:
            say(f"error: --nproc must be >= 1, got {args.nproc}")
            return EXIT_CONFIG
        if "WORLD_SIZE" in os.environ:
            say("error: --nproc under torchrun: torchrun already started the processes")
            return EXIT_CONFIG
        return launch(args.nproc, _without_nproc(argv))
    args.argv = argv[1:]
    from transformers.utils import logging as hf_logging

    from .data import DataError
    from .eval.rewards import RewardError
    from .models import ModelError
    from .tools.plan import PlanError
    from .train.checkpoint import CheckpointError
    from .train.output_errors import OutputError

    hf_logging.disable_progress_bar()  # our own bar is the one to watch; save_pretrained's would interleave with it

    try:
        commands = {"train": train, "eval": evaluate_cmd, "compare": compare_cmd, "plan": plan_cmd}
        return commands[args.command](args)
    except (config_mod.ConfigError, DataError, ModelError, PlanError) as exc:
        say(f"error: {exc}")
        return EXIT_CONFIG
    except (RewardError, CheckpointError, OutputError) as exc:
        say(f"error: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(file=sys.stderr)
        say("aborted")
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())

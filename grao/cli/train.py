"""``grao train``: one run in one process, or ``--nproc`` processes under torchrun, and what it reports."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
from pathlib import Path

from .. import config as config_mod
from ..log import say
from .common import EXIT_FAILED, refuse_code_from_run


def run(args) -> int:
    """``grao train`` with the parsed ``args``, holding the run directory's lock on rank 0; its exit status."""
    from ..train import distributed, run_dir, run_lock
    from ..train.run_dir import CONFIG
    from ..train.trainer import Trainer

    overrides = config_mod.from_arguments(args)
    cfg = config_mod.load(args.config, overrides)
    saved = Path(cfg.output_dir) / CONFIG
    run_dir.check_no_symlinks(Path(cfg.output_dir))  # before reading or writing anything through one
    if args.resume and saved.is_file():  # the run's own config, then the file and flags given now
        given = cfg
        cfg = config_mod.load(args.config, overrides, base=config_mod.load(saved))
        refuse_code_from_run(cfg.trust_remote_code and not given.trust_remote_code, saved, "--trust-remote-code true")
    run_dir.check_writable(Path(cfg.output_dir))
    code, trainer = None, None
    try:
        # rank 0 holds the run directory's lock for the run's life (torchrun stops the other ranks if it cannot)
        with run_lock.hold(cfg.output_dir, say) if _rank_zero() else contextlib.nullcontext():
            trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
            code = _train(trainer, cfg, args)
        return code
    finally:
        if trainer is not None:  # the rollout engine first: vLLM's teardown uses the process group
            trainer.close(wait=code == 0)
        distributed.shutdown(wait=code == 0)


def _rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _train(trainer, cfg, args) -> int:
    from ..eval.rewards import RewardError
    from ..train.checkpoint import latest

    if not trainer.world.main:  # rank 0 reports; the others only train
        try:
            done = trainer.train()
        except RewardError:
            return EXIT_FAILED
        return 0 if done else 128 + int(getattr(signal, trainer.stopped_by, signal.SIGINT))
    where = f"resuming at step {trainer.step} from {trainer.checkpoint}" if args.resume else "from scratch"
    data = f"the {cfg.task} task" if cfg.data == "demo" else cfg.data
    say(f"training {cfg.model} on {data} ({where}) -> {cfg.output_dir}")
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
    from ..tools.plot import read_metrics

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

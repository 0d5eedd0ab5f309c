"""The trainer's state in a checkpoint: what a save holds beside the model (optimizer, schedule, RNG, step, the
starting model's held-out rewards, the config, a trained loss's parameters) and how a resumed run gets it back."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import config
from . import checkpoint, distributed, run_dir, safe_state


def collect(step: int, optimizer, scheduler, baseline_eval, cfg, loss, sharding) -> dict:
    """The trainer state of a checkpoint at ``step``; a sharded run's optimizer is in its DCP shards instead, and a
    loss that is an nn.Module (PPO's value head) is saved whole (gathered when sharded, as one process has it)."""
    state = {
        "step": step,
        **({"optimizer": optimizer.state_dict()} if sharding is None else {}),  # sharded: in DCP
        "scheduler": scheduler.state_dict(),
        "rng": safe_state.rng_state(),
        "baseline_eval": baseline_eval,
        "config": config.to_dict(cfg),
    }
    if isinstance(loss, torch.nn.Module):
        state["loss"] = loss.state_dict() if sharding is None else sharding.full_state("loss")
    return state


def save(directory: Path, step: int, model, tokenizer, state: dict, keep: int, sharding, main: bool) -> Path:
    """``checkpoints/step-NNNNNN`` of ``directory`` (recorded in its ledger by rank 0); a failed save raises
    CheckpointError naming the previous checkpoint, which is kept."""
    if main:
        run_dir.record(directory, checkpoint.CHECKPOINTS)
    try:
        write = checkpoint.save if sharding is None else sharding.save_checkpoint
        return write(directory, step, model, tokenizer, state, keep)
    except checkpoint.CheckpointError as exc:
        previous, _ = checkpoint.latest_intact(directory)
        kept = f"the previous checkpoint {previous} is kept" if previous else "no earlier checkpoint exists"
        raise checkpoint.CheckpointError(f"{exc}; {kept}") from exc.__cause__


def save_after_error(directory: Path, sharded: bool, save_progress) -> str:
    """Try ``save_progress()`` (a checkpoint of the steps done) after a failed write; what became of the steps, for
    the error message."""
    if sharded:  # a checkpoint is collective and the other ranks did not fail
        return "no checkpoint attempted in a sharded run; the newest earlier checkpoint remains"
    try:
        save_progress()
    except checkpoint.CheckpointError as exc:
        return f"saving a checkpoint failed too ({exc})"
    ckpt = checkpoint.latest(directory)
    return f"the steps done are in {ckpt}" if ckpt is not None else "no step was done; nothing to save"


def restore_loss(loss: torch.nn.Module, state: dict, directory: Path) -> None:
    """Load the parameters of a loss that is an nn.Module from the state of checkpoint ``directory`` (before
    sharding: the checkpoint holds its whole state, whoever saved it)."""
    if "loss" not in state:
        raise checkpoint.CheckpointError(
            f"{directory / checkpoint.STATE_FILE} holds no state of the {type(loss).__name__} loss "
            "(its parameters were not saved): the run cannot be resumed exactly"
        )
    loss.load_state_dict(state["loss"])


def restore(state: dict, policy, optimizer, scheduler, directory: Path, sharded: bool) -> tuple[int, list | None]:
    """Load the optimizer, schedule and RNG of checkpoint ``directory``; returns (its step, its baseline_eval)."""
    if not sharded and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    else:  # a sharded run's, or one process's checkpoint resumed sharded
        distributed.restore(policy, optimizer, directory, state)
    scheduler.load_state_dict(state["scheduler"])
    safe_state.restore_rng(state["rng"])
    return int(state["step"]), state["baseline_eval"]

"""The update: gradients of a rollout's loss over its micro-batches, the optimizer step and the learning-rate
schedule; the passes the loss may need first (the frozen reference model's log-probs, the sampling policy's
snapshot)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .. import models
from . import distributed
from .batch import IGNORE_INDEX, MicroBatch, micro_batches
from .policy import Policy


def lr_lambda(cfg) -> Callable[[int], float]:
    """Linear warmup, then cosine or linear decay to ``min_lr_ratio`` (or constant).

    Counted in optimizer steps, as TRL does: a training step takes
    ``num_iterations`` of them, so the warmup spans ``warmup_steps *
    num_iterations`` optimizer steps and the decay ends after ``steps *
    num_iterations``.
    """
    n = cfg.objective.num_iterations
    warm, total, floor = cfg.optimizer.warmup_steps * n, cfg.run.steps * n, cfg.optimizer.min_lr_ratio

    def f(i: int) -> float:  # i = optimizer steps taken so far
        if i < warm:
            return (i + 1) / warm
        if cfg.optimizer.lr_schedule == "constant" or total <= warm:
            return 1.0
        progress = min(1.0, (i - warm) / max(1, total - warm))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.optimizer.lr_schedule == "cosine" else 1 - progress
        return floor + (1 - floor) * decay

    return f


def optimizer_and_schedule(trainable: list[torch.Tensor], cfg) -> tuple:
    """(AdamW over ``trainable``, its :func:`lr_lambda` schedule) with the config's learning rate and weight decay."""
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def mean_over_iterations(lines: list[dict]) -> dict:
    """One metrics line for a step's optimizer steps: each number's mean (a list's, element-wise), tokens summed."""
    out = {}
    for key, first in lines[0].items():
        values = [ln[key] for ln in lines]
        if key == "train_tokens":
            out[key] = sum(values)
        elif isinstance(first, list):
            out[key] = [round(sum(v) / len(v), 4) for v in zip(*values)]
        else:
            out[key] = sum(values) / len(values)
    return out


@torch.no_grad()
def rank_micro_batches(rollout, world, size: int, pad_id: int, device, old=None, reference=None) -> list[MicroBatch]:
    """This rank's micro-batches of ``size`` prompt groups of ``rollout``, each with its ``old`` snapshot and
    ``reference`` log-probs (lists with one entry per micro-batch, or None), numbered in the whole step."""
    token_counts = world.gather_rows(torch.tensor([[len(c) for c in g] for g in rollout.completion_ids]))
    first = world.rank * (token_counts.shape[0] // world.size)
    batches = micro_batches(rollout, size, pad_id, device, token_counts, first)
    for name, per_batch in (("old", old), ("reference", reference)):
        if per_batch is not None and len(per_batch) != len(batches):
            raise ValueError(f"{name} holds {len(per_batch)} entries for the rollout's {len(batches)} micro-batches")
    return [
        mb.with_passes(None if old is None else old[k], None if reference is None else reference[k])
        for k, mb in enumerate(batches)
    ]


def reference_logps(reference: Policy, batches: list[MicroBatch], backend: str, sharded: bool) -> list[torch.Tensor]:
    """The frozen ``reference`` policy's (S, T) token log-probs of each micro-batch (``LossBatch.reference_logp``)."""
    logps = [reference.token_logprobs(mb, backend) for mb in batches]
    if sharded:  # FSDP keeps a root's parameters gathered after its forward, for the backward
        reference.reshard()  # that a frozen model never runs
    return logps


@torch.no_grad()
def snapshots(policy: Policy, take, batches: list[MicroBatch]) -> list[dict]:
    """The loss's snapshot ``take`` of the current policy for each micro-batch (``LossBatch.old``)."""
    policy.model.train()  # the mode of the updates, so dropout (if any) is that of their forwards
    return [policy.loss_snapshot(take, mb) for mb in batches]


def accumulate_gradients(policy: Policy, loss_fn, batches: list[MicroBatch], world) -> dict:
    """Gradients of the step's loss (into ``.grad``, which the caller zeroed) over the micro-batches; the step's
    metrics summed over micro-batches and ranks.

    The loss returns each micro-batch's share of the step loss, so the
    accumulated gradient is the one-batch gradient. The MoE load-balancing
    loss is computed within each prompt group (its G+1 sequences) and
    averaged over the P groups, so it too is the same for any split; a
    batch-wide balance loss would not be, as its token shares are not a sum
    over micro-batches.
    """
    moe, device = policy.moe, batches[0].ids.device
    layers = len(models.routers(models.unwrap(policy.model))) if moe else 0
    counts = torch.zeros(layers, moe.num_experts if moe else 0, device=device)
    total, terms, aux_total, n_tokens = 0.0, {}, 0.0, 0
    gap = {}  # |engine - trainer| log-prob summed over the sampled tokens, and their count
    for mb in batches:
        n_tokens += int(mb.mask.sum())
        loss, res, aux, batch_counts = policy.micro_batch_loss(loss_fn, mb)
        if mb.sampling_logp is not None and res.token_logp is not None:
            total_gap, count = logp_gap(res.token_logp, mb)
            gap = {"gap_sum": gap.get("gap_sum", 0.0) + total_gap, "gap_tokens": gap.get("gap_tokens", 0) + count}
        loss.backward()
        total += float(loss.detach())
        for key, value in res.metrics.items():
            terms[key] = terms.get(key, 0.0) + float(value)
        aux_total += aux
        counts += batch_counts
    stats = {"loss": total, **terms, "moe/aux_loss": aux_total, "train_tokens": n_tokens, **gap}
    stats, counts = world.sum(stats), world.sum_tensor(counts)  # the whole step's, over the ranks
    if gap:
        stats["rollout/logp_gap"] = stats.pop("gap_sum") / max(stats.pop("gap_tokens"), 1)
    if counts.sum() > 0:
        load = counts.sum(0) / counts.sum()
        stats["moe/expert_load"] = [round(float(x), 4) for x in load]
        stats["moe/layer_counts"] = counts
    return stats


@torch.no_grad()
def logp_gap(trainer_logp: torch.Tensor, mb: MicroBatch) -> tuple[float, int]:
    """(sum of |trainer - engine| token log-probs, number of tokens) over the micro-batch's sampled completions:
    the sampling/training mismatch of the rollout engine (``rollout/logp_gap`` is the mean per token)."""
    K = mb.rewards.shape[1]
    samples = torch.arange(mb.targets.shape[0], device=mb.targets.device) % K != K - 1
    sampled = (mb.targets != IGNORE_INDEX) & samples[:, None]
    diff = (trainer_logp.float() - mb.sampling_logp.to(trainer_logp.device)).abs()
    return float(diff[sampled].sum()), int(sampled.sum())


def optimizer_step(trainable: list[torch.Tensor], optimizer, scheduler, max_grad_norm: float) -> dict:
    """Clip the gradient norm, take the AdamW step, advance the schedule; returns grad_norm and the lr used."""
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    grad_norm = distributed.local(grad_norm)  # sharded: the norm over all ranks' shards
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    return {"grad_norm": float(grad_norm), "lr": lr}

"""Supervised fine-tuning on the reference answers."""

from __future__ import annotations

import torch

from .base import LossBatch, LossOutput, spread


class SFT:
    """Supervised fine-tuning on the reference answers: ``loss = -(1/P) sum_p J(y_p)``.

    Each reference answer's NLL is normalised by its own length (the mean over
    its tokens, as J is in GRAO), then averaged over the P prompts, so a
    micro-batch's share needs nothing of the other micro-batches. (A mean over
    all the step's reference tokens would weight long answers more.) The
    sampled completions get coefficient 0.
    """

    def __init__(self, backend: str = "auto"):
        self.backend = backend

    def __call__(self, batch: LossBatch) -> LossOutput:
        seq_coef = torch.where(batch.is_reference(), -1.0 / batch.num_groups, 0.0)
        out = batch.sweep(spread(seq_coef, batch.targets, batch.ignore_index, mean=True), self.backend)
        return LossOutput(out.loss, {"objective/nll": float(out.loss.detach())}, out.logp)

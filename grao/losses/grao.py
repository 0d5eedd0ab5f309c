"""GRAO (arXiv 2508.07750, Eq. 3-4), with a weight on each of its three terms: the paper's objective and its
Table 3 ablations are one loss."""

from __future__ import annotations

from collections.abc import Callable

import torch

from grao_kernels import grao_coefficients
from grao_kernels.api import sequence_logp

from .base import LossBatch, LossOutput, check_number


class GRAO:
    """GRAO with a weight on each of its three terms (arXiv 2508.07750, Eq. 3-4; ablations of Table 3)::

        obj_p = exploration * (1/G) sum_i A_i J(o_i)          (exploration)
              + beta * A_y J(y)                                (imitation)
              + lam * (1/G) sum_i A_i (J(o_i) - J(y))          (alignment),   loss = -mean_p obj_p

    ``exploration=1`` is the paper's objective; beta = 0 drops imitation and
    lam = 0 alignment. The coefficients are ``grao_coefficients``' with the
    exploration part of each completion's, ``-group_weight * A_i``
    (``group_weight`` = 1 / (G P), the weight of a completion's term), scaled
    by ``exploration``, in one ``linear_logprob_loss`` sweep: what
    ``grao_kernels.grao_loss`` composes. Logged terms are the weighted ones, so
    ``loss = -(exploration + imitation + alignment)``.

    ``fn``: instead, any function with ``grao_kernels.grao_loss``'s signature
    and result (e.g. a full-logits reference for a benchmark), for the paper's
    weights (``exploration=1``).

    The coefficients average over the m groups of a micro-batch, so its loss
    and terms are weighted m / P (``LossBatch.share``): the shares sum to the
    one-batch loss (advantages are computed within each group, so splitting
    between groups changes nothing else).
    """

    TERMS = ("exploration", "imitation", "alignment")

    def __init__(
        self,
        beta: float = 0.5,
        lam: float = 0.6,
        backend: str = "auto",
        fn: Callable | None = None,
        *,
        exploration: float = 1.0,
    ):
        self.exploration = check_number("exploration", exploration)
        if fn is not None and self.exploration != 1.0:
            raise ValueError(f"fn computes the paper's GRAO (exploration=1); got exploration={exploration!r} with it")
        self.beta, self.lam, self.backend, self.fn = beta, lam, backend, fn

    def __call__(self, batch: LossBatch) -> LossOutput:
        if self.fn is not None:
            out = self.fn(
                batch.hidden,
                batch.weight,
                batch.targets,
                batch.rewards,
                group_size=batch.group_size,
                beta=self.beta,
                lam=self.lam,
                backend=self.backend,
                **batch.head(),
            )
            loss, terms = out.loss, (out.exploration, out.imitation, out.alignment)
        else:
            coefs = grao_coefficients(batch.rewards, group_size=batch.group_size, beta=self.beta, lam=self.lam)
            if self.exploration != 1.0:
                explore = torch.where(coefs.is_reference, 0.0, coefs.group_weight * coefs.advantages)
                coefs = coefs._replace(seq_coef=coefs.seq_coef + (1.0 - self.exploration) * explore)
            out = batch.sweep(coefs.token_coef(batch.targets, batch.ignore_index), self.backend)
            exploration, imitation, alignment = coefs.terms(
                sequence_logp(out.logp, (batch.targets != batch.ignore_index).sum(1))
            )
            loss, terms = out.loss, (exploration * self.exploration, imitation, alignment)
        share = batch.share
        metrics = {f"objective/{t}": float(v) * share for t, v in zip(self.TERMS, terms)}
        return LossOutput(loss * share, metrics, None if self.fn is not None else out.logp)

"""GRAO (arXiv 2508.07750, Eq. 3-4), with a weight on each of its three terms: the paper's objective and its
Table 3 ablations are one loss."""

from __future__ import annotations

import dataclasses
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


def term_gradient_norms(loss: GRAO, batch: LossBatch, *, lm_head: bool = True) -> dict[str, float]:
    """Each weighted term's pull on the update: ``{term: ||d(-term)/d(hidden, weight, bias)||}`` on ``batch``.

    Each term is ``loss`` with the other two weights 0 (imitation ``beta A_y J(y)``: ``GRAO(beta, lam=0,
    exploration=0)``; exploration ``A_i J(o_i)``: ``GRAO(beta=0, lam=0, exploration)``; alignment ``lam A_i
    (J(o_i) - J(y))``: ``GRAO(beta=0, lam, exploration=0)``), one ``linear_logprob_loss`` sweep each; the
    objective is linear in the terms, so the three gradients sum to ``loss``'s. The norm is over the gradients
    with respect to the final hidden states (what the loss hands the backbone) and, with ``lm_head`` (False
    where the lm_head is frozen, as under LoRA: the sweeps then compute no weight gradient), the lm_head weight
    and bias, together. The terms' values move when every J shifts by a constant c (exploration by
    ``-c A_y / G``, as a group's G+1 advantages sum to 0; imitation by ``beta A_y c``) while no gradient
    changes; these norms measure how hard each term pulls the model. The batch's hidden states and lm_head are
    taken as constants (detached), so this builds no graph through the backbone.
    """
    hidden = batch.hidden.detach().requires_grad_(True)
    weight, bias = (None if t is None else t.detach().requires_grad_(lm_head) for t in (batch.weight, batch.bias))
    probe = dataclasses.replace(batch, hidden=hidden, weight=weight, bias=bias)
    leaves = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    isolated = {
        "exploration": dict(beta=0.0, lam=0.0, exploration=loss.exploration),
        "imitation": dict(beta=loss.beta, lam=0.0, exploration=0.0),
        "alignment": dict(beta=0.0, lam=loss.lam, exploration=0.0),
    }
    norms = {}
    for term in GRAO.TERMS:
        out = GRAO(backend=loss.backend, **isolated[term])(probe).loss
        grads = torch.autograd.grad(out, leaves)
        norms[term] = float(sum(g.double().square().sum() for g in grads) ** 0.5)
    return norms

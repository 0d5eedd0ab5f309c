"""Autograd Functions over the backends' ``forward``/``grad`` (see ``backends/__init__.py``).

The backends are reached only through two ``torch.library`` custom ops,
``grao_kernels::forward`` and ``grao_kernels::grad``, generic over the backend
name and with fake implementations: ``torch.compile`` treats a sweep as one
opaque op of known output shapes and never traces a backend's Python loops,
locks or launchers. The ops run with autocast disabled, so every backend
computes from the tensors as given. An output that does not exist (no
entropy, a gradient nobody needs) is an empty tensor, since an op cannot
return None.

* ``LinearLogprobs``: log-probs (and entropy) whose upstream gradients are
  unknown at forward time. Forward keeps the per-row statistics; backward
  recomputes the logits tiles with ``coef = grad_logp`` and ``ent_coef =
  grad_entropy``.
* ``LinearLoss``: ``sum_t coef[t] logp[t] + sum_t ent_coef[t] ent[t]`` for
  coefficients known before the forward (the GRAO loss, on-policy policy
  gradients, weighted NLL). Loss and gradients come from one sweep; backward
  only scales the saved gradients.

Gradients are computed only for the inputs autograd will use
(``ctx.needs_input_grad``); ``api.py`` calls the forward op alone when no
gradient is needed at all (``no_grad``, ``inference_mode``, nothing requiring
grad).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import backends as _backends
from .backends import Head, Stats

_EMPTY = (0,)


def _empty(like: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return like.new_empty(_EMPTY, dtype=dtype)


def _fresh(out: torch.Tensor | None, inputs, like: torch.Tensor, dtype) -> torch.Tensor:
    """``out`` in ``dtype`` as a tensor no input aliases (a custom op's outputs may not), or an empty tensor."""
    if out is None:
        return _empty(like, dtype)
    out = out.to(dtype)
    if any(out is x for x in inputs):
        out = out.clone()
    return out


@torch.library.custom_op("grao_kernels::forward", mutates_args=())
def forward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float,
    logit_scale: float,
    softcap: float | None,
    ignore_index: int,
    entropy: bool,
    budget: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp, lse, entropy)`` of backend ``backend``'s forward; entropy is empty unless asked for."""
    with torch.autocast(hidden.device.type, enabled=False):
        stats = _backends.module(backend).forward(
            hidden,
            weight,
            bias,
            targets,
            Head(temperature, logit_scale, softcap),
            ignore_index,
            entropy=entropy,
            budget=budget,
        )
    inputs = (hidden, weight, bias, targets)
    f32 = torch.float32
    return (
        _fresh(stats.logp, inputs, hidden, f32),
        _fresh(stats.lse, inputs, hidden, f32),
        _fresh(stats.entropy if entropy else None, inputs, hidden, f32),
    )


@forward_op.register_fake
def _(hidden, weight, bias, targets, temperature, logit_scale, softcap, ignore_index, entropy, budget, backend):
    n = hidden.shape[0]
    f32 = torch.float32
    return (
        hidden.new_empty(n, dtype=f32),
        hidden.new_empty(n, dtype=f32),
        hidden.new_empty(n if entropy else 0, dtype=f32),
    )


@torch.library.custom_op("grao_kernels::grad", mutates_args=())
def grad_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    coef: torch.Tensor,
    ent_coef: torch.Tensor | None,
    logp: torch.Tensor | None,
    lse: torch.Tensor | None,
    entropy: torch.Tensor | None,
    temperature: float,
    logit_scale: float,
    softcap: float | None,
    ignore_index: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    budget: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp, entropy, dhidden, dweight, dbias)`` of backend ``backend``'s grad.

    ``logp``/``lse``/``entropy``: the statistics of an earlier forward (or
    None). Returns the entropy only when ``ent_coef`` is given and
    ``entropy`` is not; each gradient only when needed, in its input's dtype.
    """
    stats = None if lse is None else Stats(logp, lse, entropy)
    need_bias = need_bias and bias is not None
    with torch.autocast(hidden.device.type, enabled=False):
        out, dh, dw, db = _backends.module(backend).grad(
            hidden,
            weight,
            bias,
            targets,
            Head(temperature, logit_scale, softcap),
            ignore_index,
            coef=coef,
            ent_coef=ent_coef,
            stats=stats,
            needs=(need_hidden, need_weight, need_bias),
            budget=budget,
        )
    inputs = (hidden, weight, bias, targets, coef, ent_coef, logp, lse, entropy)
    f32 = torch.float32
    want_entropy = ent_coef is not None and entropy is None
    return (
        _fresh(out.logp, inputs, hidden, f32),
        _fresh(out.entropy if want_entropy else None, inputs, hidden, f32),
        _fresh(dh if need_hidden else None, inputs, hidden, hidden.dtype),
        _fresh(dw if need_weight else None, inputs, hidden, weight.dtype),
        _fresh(db if need_bias else None, inputs, hidden, f32 if bias is None else bias.dtype),
    )


@grad_op.register_fake
def _(
    hidden,
    weight,
    bias,
    targets,
    coef,
    ent_coef,
    logp,
    lse,
    entropy,
    temperature,
    logit_scale,
    softcap,
    ignore_index,
    need_hidden,
    need_weight,
    need_bias,
    budget,
    backend,
):
    n = hidden.shape[0]
    need_bias = need_bias and bias is not None
    f32 = torch.float32
    return (
        hidden.new_empty(n, dtype=f32),
        hidden.new_empty(n if ent_coef is not None and entropy is None else 0, dtype=f32),
        hidden.new_empty(hidden.shape if need_hidden else _EMPTY),
        weight.new_empty(weight.shape if need_weight else _EMPTY),
        (bias.new_empty(bias.shape) if need_bias else hidden.new_empty(_EMPTY, dtype=f32)),
    )


class Sweep(NamedTuple):
    """The non-tensor arguments of a sweep: the head, ``ignore_index``, the budget in bytes, the backend's name."""

    head: Head
    ignore_index: int
    budget: int
    backend: str


def _forward(hidden, weight, bias, targets, sweep: Sweep, entropy: bool):
    h = sweep.head
    return forward_op(
        hidden, weight, bias, targets, h.temperature, h.logit_scale, h.softcap, sweep.ignore_index, entropy,
        sweep.budget, sweep.backend,
    )  # fmt: skip


def _grad(hidden, weight, bias, targets, coef, ent_coef, stats, sweep: Sweep, needs):
    logp, lse, ent = (None, None, None) if stats is None else stats
    h = sweep.head
    return grad_op(
        hidden, weight, bias, targets, coef, ent_coef, logp, lse, ent, h.temperature, h.logit_scale, h.softcap,
        sweep.ignore_index, needs[0], needs[1], needs[2], sweep.budget, sweep.backend,
    )  # fmt: skip


class LinearLogprobs(torch.autograd.Function):
    """``(logp, entropy)``; entropy is an empty tensor unless ``entropy`` is True. Both differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, sweep, entropy):
        logp, lse, ent = _forward(hidden, weight, bias, targets, sweep, entropy)
        ctx.save_for_backward(hidden, weight, bias, targets, logp, lse, ent)
        ctx.sweep, ctx.entropy = sweep, entropy
        ctx.set_materialize_grads(False)
        if not entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        _refuse_double_backward()
        hidden, weight, bias, targets, logp, lse, ent = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if not ctx.entropy:
            grad_ent = None
        if (grad_logp is None and grad_ent is None) or not any(needs):
            return (None,) * 6
        coef = torch.zeros_like(logp) if grad_logp is None else grad_logp.float().contiguous()
        ent_coef = None if grad_ent is None else grad_ent.float().contiguous()
        stats = Stats(logp, lse, ent if ent_coef is not None else None)
        _, _, dh, dw, db = _grad(hidden, weight, bias, targets, coef, ent_coef, stats, ctx.sweep, needs)
        return dh if needs[0] else None, dw if needs[1] else None, db if needs[2] else None, None, None, None


class LinearLoss(torch.autograd.Function):
    """``(loss, logp, entropy)``; only the loss is differentiable. Entropy is empty without ``ent_coef``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, coef, ent_coef, sweep):
        needs = ctx.needs_input_grad[:3]
        logp, ent, dh, dw, db = _grad(hidden, weight, bias, targets, coef, ent_coef, None, sweep, needs)
        # Kept as attributes, not saved tensors: backward hands them over and
        # drops its reference, so autograd can take the buffers as the .grad
        # without a copy.
        ctx.grads = (dh, dw, db)
        ctx.needs = needs
        ctx.mark_non_differentiable(logp, ent)
        loss = _linear_combination(coef, logp, ent_coef, ent)
        return loss, logp, ent

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_ent):
        _refuse_double_backward()
        if ctx.grads is None:
            raise RuntimeError("grao_kernels: backward through the same graph twice is not supported")
        grads = ctx.grads
        ctx.grads = None
        # Scaled in place: no copy of dW and no host sync to test for a 1.
        out = [g.mul_(grad_loss) if need else None for g, need in zip(grads, ctx.needs)]
        return (*out, None, None, None, None)


def _refuse_double_backward() -> None:
    # The sweeps compute gradients outside autograd, so a gradient taken with create_graph=True would carry no
    # graph and a penalty built on it (a gradient penalty) would silently be a constant: refuse instead.
    if torch.is_grad_enabled():
        raise NotImplementedError(
            "grao_kernels: create_graph=True (double backward) is not supported; the gradients of the fused sweep "
            "are not differentiable. For a gradient penalty, compute the logits eagerly"
        )


def _linear_combination(coef, logp, ent_coef, ent):
    """``sum coef * logp (+ sum ent_coef * ent)``: the value of the objective a ``LinearLoss`` differentiates."""
    loss = (coef * logp).sum()
    if ent_coef is not None:
        loss = loss + (ent_coef * ent).sum()
    return loss


def logprobs(hidden, weight, bias, targets, sweep: Sweep, entropy: bool):
    """``(logp, entropy or None)``, differentiable when autograd needs it; a forward-only sweep otherwise."""
    if _grad_wanted(hidden, weight, bias):
        logp, ent = LinearLogprobs.apply(hidden, weight, bias, targets, sweep, entropy)
    else:
        logp, _, ent = _forward(hidden, weight, bias, targets, sweep, entropy)
    return logp, (ent if entropy else None)


def linear_loss(hidden, weight, bias, targets, coef, ent_coef, sweep: Sweep):
    """``(loss, logp, entropy or None)`` of :class:`LinearLoss`; the gradient sweep only when autograd needs it."""
    if _grad_wanted(hidden, weight, bias):
        loss, logp, ent = LinearLoss.apply(hidden, weight, bias, targets, coef, ent_coef, sweep)
    else:
        logp, _, ent = _forward(hidden, weight, bias, targets, sweep, ent_coef is not None)
        loss = _linear_combination(coef, logp, ent_coef, ent)
    return loss, logp, (ent if ent_coef is not None else None)


def _grad_wanted(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)

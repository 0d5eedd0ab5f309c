"""Autograd Functions over a backend module (see ``backends/__init__.py``).

Two Functions share the backend's two entry points:

* ``LinearLogprobs``: log-probs whose upstream gradient is unknown at forward
  time. Forward keeps only the per-row log-sum-exp; backward recomputes the
  logits tiles with ``coef = grad_output``.
* ``LinearLogprobsFunctional``: the scalar ``sum_t coef[t] * logp[t]`` for
  coefficients known before the forward (the GRAO loss is linear in every
  token's log-prob; advantages carry no gradient). Loss and gradients come
  from one sweep; backward only scales the saved gradients.
"""

from __future__ import annotations

import torch


def _dtypes(hidden, weight, bias):
    return hidden.dtype, weight.dtype, None if bias is None else bias.dtype


def _cast_grads(needs, dh, dw, db, dtypes, scale=None):
    """Gradients cast to the inputs' dtypes, first scaled in place by ``scale``
    (a 0-d tensor) when given: the buffers belong to the caller alone."""
    hd, wd, bd = dtypes

    def one(g, dtype, need):
        if g is None or not need:
            return None
        if scale is not None:
            g.mul_(scale)
        return g.to(dtype)

    return one(dh, hd, needs[0]), one(dw, wd, needs[1]), one(db, bd, needs[2])


class LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, backend):
        logp, lse = backend.linear_logprobs_forward(hidden, weight, bias, targets, temperature, ignore_index)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.ignore_index, ctx.backend = temperature, ignore_index, backend
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        _, dh, dw, db = ctx.backend.linear_logprobs_grad(
            hidden, weight, bias, targets, grad_logp.float().contiguous(), ctx.temperature, ctx.ignore_index, lse=lse
        )
        gh, gw, gb = _cast_grads(ctx.needs_input_grad, dh, dw, db, _dtypes(hidden, weight, bias))
        return gh, gw, gb, None, None, None, None


class LinearLogprobsFunctional(torch.autograd.Function):
    """Returns ``(sum_t coef[t] * logp[t], logp)``; only the sum is differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, coef, temperature, ignore_index, backend):
        if any(ctx.needs_input_grad[:3]):
            logp, dh, dw, db = backend.linear_logprobs_grad(
                hidden, weight, bias, targets, coef, temperature, ignore_index
            )
            # Kept as attributes, not saved tensors: backward hands them over
            # and drops its reference, so autograd can take the buffers as the
            # .grad without a copy.
            ctx.grads = (dh, dw, db)
        else:
            logp, _ = backend.linear_logprobs_forward(hidden, weight, bias, targets, temperature, ignore_index)
            ctx.grads = None
        ctx.dtypes = _dtypes(hidden, weight, bias)
        ctx.mark_non_differentiable(logp)
        return (coef * logp).sum(), logp

    @staticmethod
    def backward(ctx, grad_total, _grad_logp):
        if ctx.grads is None:
            raise RuntimeError("grao_loss: backward through the same graph twice is not supported")
        dh, dw, db = ctx.grads
        ctx.grads = None
        # Scaled in place: no copy of dW and no host sync to test for a 1.
        gh, gw, gb = _cast_grads(ctx.needs_input_grad, dh, dw, db, ctx.dtypes, scale=grad_total)
        return gh, gw, gb, None, None, None, None, None

"""Eager reference implementations that DO materialise the logits.

These are the oracle the tests compare every backend against (run in float64)
and the "naive PyTorch" baseline of the benchmarks (run in the input dtype).
No backend imports this module.
"""

from __future__ import annotations

import torch


def reference_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100, dtype=None):
    """log_softmax((hidden @ weight.T + bias) / temperature)[targets], 0 at ignored positions.

    Computed in ``dtype`` (default: the inputs' dtype, with the softmax in at
    least float32); differentiable through ordinary autograd.
    """
    if dtype is not None:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits / temperature
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    mask = targets != ignore_index
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    logp = logits.log_softmax(-1).gather(-1, safe[..., None])[..., 0]
    return torch.where(mask, logp, torch.zeros_like(logp))


def reference_advantages(rewards, eps=1e-6):
    """Group-normalised advantages, population std, zero for tied groups (float64)."""
    r = rewards.double()
    mean = r.mean(1, keepdim=True)
    std = ((r - mean) ** 2).mean(1, keepdim=True).sqrt()
    adv = (r - mean) / (std + eps)
    tied = (r == r[:, :1]).all(1, keepdim=True)
    return torch.where(tied, torch.zeros_like(adv), adv)


def reference_grao(
    hidden,
    weight,
    targets,
    rewards,
    *,
    bias=None,
    beta=0.5,
    lam=0.6,
    temperature=1.0,
    ignore_index=-100,
    eps=1e-6,
    dtype=None,
):
    """GRAO objective terms straight from arXiv 2508.07750 Eq. 3-4, with materialised logits.

    Returns a dict with ``loss``, ``advantages``, ``seq_logp``, ``exploration``,
    ``imitation`` and ``alignment``; the loss is differentiable.
    """
    P, K = rewards.shape
    G = K - 1
    logp = reference_logprobs(
        hidden, weight, targets, bias=bias, temperature=temperature, ignore_index=ignore_index, dtype=dtype
    )
    n = (targets != ignore_index).sum(1)
    seq = logp.sum(1) / n.clamp(min=1).to(logp.dtype)
    adv = reference_advantages(rewards, eps).to(seq.dtype)
    j = seq.view(P, K)
    exploration, alignment = 0.0, 0.0
    for i in range(G):
        exploration = exploration + adv[:, i] * j[:, i] / G
        alignment = alignment + lam * adv[:, i] * (j[:, i] - j[:, G]) / G
    imitation = beta * adv[:, G] * j[:, G]
    exploration, alignment, imitation = exploration.mean(), alignment.mean(), imitation.mean()
    return {
        "loss": -(exploration + alignment + imitation),
        "advantages": adv,
        "seq_logp": seq,
        "exploration": exploration,
        "imitation": imitation,
        "alignment": alignment,
    }

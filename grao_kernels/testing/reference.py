"""Eager reference implementations of the public ops that DO materialise the logits.

The one oracle every backend and public function is compared against (run in
float64), and the "naive PyTorch" baseline of the benchmarks (run in the
input dtype). Each is written straight from its definition (the GRAO terms
from arXiv 2508.07750, Eq. 3-4, with loops over groups), independently of
``api.py``. No production module imports this one.
"""

from __future__ import annotations

import torch


def reference_logits(hidden, weight, *, bias=None, temperature=1.0, logit_scale=1.0, softcap=None, dtype=None):
    """``z = head(hidden @ weight.T + bias)``: scaled by ``logit_scale``, soft-capped
    (``softcap * tanh(u / softcap)``) when ``softcap`` is given, divided by
    ``temperature``. Computed in ``dtype`` (default: the inputs' dtype, at least float32)."""
    if dtype is not None:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    u = hidden @ weight.T
    if bias is not None:
        u = u + bias
    if u.dtype in (torch.float16, torch.bfloat16):
        u = u.float()
    u = u * logit_scale
    if softcap is not None:
        u = softcap * torch.tanh(u / softcap)
    return u / temperature


def reference_lse(hidden, weight, *, bias=None, dtype=None, **head):
    """``logsumexp(z)`` per row, ``z`` as in :func:`reference_logits` (``head``: temperature, logit_scale, softcap)."""
    return reference_logits(hidden, weight, bias=bias, dtype=dtype, **head).logsumexp(-1)


def reference_logprobs(
    hidden,
    weight,
    targets,
    *,
    bias=None,
    temperature=1.0,
    logit_scale=1.0,
    softcap=None,
    ignore_index=-100,
    dtype=None,
    return_entropy=False,
):
    """log_softmax(z)[targets], 0 at ignored positions; with ``return_entropy``
    also the entropy ``-sum_j p_j log p_j`` of softmax(z) (0 at ignored positions).

    ``z`` as in :func:`reference_logits`; differentiable through ordinary autograd.
    """
    z = reference_logits(
        hidden, weight, bias=bias, temperature=temperature, logit_scale=logit_scale, softcap=softcap, dtype=dtype
    )
    mask = targets != ignore_index
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    logsm = z.log_softmax(-1)
    logp = torch.where(mask, logsm.gather(-1, safe[..., None])[..., 0], 0.0)
    if not return_entropy:
        return logp
    # 0 * log 0 = 0 for entries masked with -inf, in value and gradient.
    p = logsm.exp()
    ent = -(p * torch.where(p > 0, logsm, 0.0)).sum(-1)
    return logp, torch.where(mask, ent, 0.0)


def reference_linear_loss(hidden, weight, targets, coef, *, entropy_coef=None, ignore_index=-100, **head):
    """``sum_t coef_t logp_t + sum_t entropy_coef_t ent_t`` over the non-ignored positions."""
    logp, ent = reference_logprobs(hidden, weight, targets, ignore_index=ignore_index, return_entropy=True, **head)
    mask = targets != ignore_index
    loss = torch.where(mask, coef.to(logp.dtype) * logp, 0.0).sum()
    if entropy_coef is not None:
        loss = loss + torch.where(mask, entropy_coef.to(ent.dtype) * ent, 0.0).sum()
    return loss


def reference_advantages(rewards, eps=1e-6):
    """(P, K) rewards -> group-normalised advantages per row: population std, zero for tied groups (float64)."""
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
    group_ids=None,
    is_reference=None,
    bias=None,
    beta=0.5,
    lam=0.6,
    temperature=1.0,
    logit_scale=1.0,
    softcap=None,
    ignore_index=-100,
    eps=1e-6,
    dtype=None,
):
    """GRAO objective terms straight from arXiv 2508.07750 Eq. 3-4, with materialised logits.

    Per group (prompt) with completions o_1..o_G and reference y::

        obj = (1/G) sum_i [A_i J(o_i) + lam A_i (J(o_i) - J(y))] + beta A_y J(y),  loss = -mean over groups

    ``rewards`` either (P, G+1) group-major with the reference last, or (S,)
    per sequence with ``group_ids`` (S,) and ``is_reference`` (S,) (any order,
    any group sizes). Returns a dict with ``loss``, ``advantages`` (shaped like
    ``rewards``), ``seq_logp``, ``exploration``, ``imitation`` and
    ``alignment``; the loss is differentiable.
    """
    logp = reference_logprobs(
        hidden,
        weight,
        targets,
        bias=bias,
        temperature=temperature,
        logit_scale=logit_scale,
        softcap=softcap,
        ignore_index=ignore_index,
        dtype=dtype,
    )
    n = (targets != ignore_index).sum(1)
    seq = logp.sum(1) / n.clamp(min=1).to(logp.dtype)
    if group_ids is None:
        P, K = rewards.shape
        groups = [(list(range(p * K, p * K + K - 1)), p * K + K - 1) for p in range(P)]
        flat = rewards.reshape(-1)
    else:
        groups = []
        for g in torch.unique(group_ids).tolist():
            members = (group_ids == g).nonzero().squeeze(1).tolist()
            refs = [s for s in members if bool(is_reference[s])]
            assert len(refs) == 1, "the oracle expects exactly one reference per group"
            groups.append(([s for s in members if s != refs[0]], refs[0]))
        flat = rewards
    adv = torch.zeros(flat.shape, dtype=torch.float64)
    exploration, alignment, imitation = 0.0, 0.0, 0.0
    for samples, ref in groups:
        members = samples + [ref]
        a = reference_advantages(flat[members][None], eps)[0]
        adv[members] = a
        a = a.to(seq.dtype)
        G = len(samples)
        for i, s in enumerate(samples):
            exploration = exploration + a[i] * seq[s] / G
            alignment = alignment + lam * a[i] * (seq[s] - seq[ref]) / G
        imitation = imitation + beta * a[G] * seq[ref]
    P = len(groups)
    exploration, alignment, imitation = exploration / P, alignment / P, imitation / P
    return {
        "loss": -(exploration + alignment + imitation),
        "advantages": adv.view(rewards.shape),
        "seq_logp": seq,
        "exploration": exploration,
        "imitation": imitation,
        "alignment": alignment,
    }

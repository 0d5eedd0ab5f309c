"""Eager reference implementations that DO materialise the logits.

These are the one oracle the tests compare every backend and every public
function against (run in float64), and the "naive PyTorch" baseline of the
benchmarks (run in the input dtype). Each is written straight from its
definition (the GRAO terms from arXiv 2508.07750, Eq. 3-4, with loops over
groups), independently of ``api.py``. No backend imports this module.
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


def reference_sft(hidden, weight, targets, is_reference, *, bias=None, ignore_index=-100, dtype=None, **head):
    """SFT on the reference answers: ``-(1/P) sum_p J(y_p)``, J the mean log-prob over a sequence's
    completion tokens, over the P sequences where ``is_reference`` (S,) is True; the others are ignored."""
    logp = reference_logprobs(hidden, weight, targets, bias=bias, ignore_index=ignore_index, dtype=dtype, **head)
    refs = is_reference.nonzero().squeeze(1).tolist()
    total = 0.0
    for s in refs:
        n = int((targets[s] != ignore_index).sum())
        total = total + logp[s].sum() / max(n, 1)
    return -total / len(refs)


def reference_grpo(
    hidden,
    weight,
    targets,
    rewards,
    *,
    loss_type="grpo",
    max_completion_length=None,
    old_logp=None,
    clip_epsilon=0.2,
    clip_epsilon_high=None,
    kl_beta=0.0,
    reference_logp=None,
    bias=None,
    ignore_index=-100,
    eps=1e-6,
    dtype=None,
    **head,
):
    """GRPO as TRL computes it, with materialised logits.

    ``rewards`` (P, G): the sampled completions only, row-major, so sequence
    ``p * G + i`` is completion i of prompt p. Advantages are normalised within
    each row (:func:`reference_advantages`). Each token's loss is::

        -min(r A, clip(r, 1 - clip_epsilon, 1 + clip_epsilon_high) A) + kl_beta * (exp(d) - d - 1)

    with ``r = exp(logp - old_logp)`` and ``d = reference_logp - logp`` (the
    k3 KL estimate). Without ``old_logp`` (one update per rollout) the ratio
    is 1 with gradient ``grad logp``, and the policy term is written as
    ``-A logp`` (TRL's gradient). ``loss_type`` aggregates the tokens as TRL
    does over B = P G completions: ``grpo`` the mean over completions of each
    one's token mean, ``dr_grpo`` the token sum / (B * max_completion_length),
    ``dapo`` the token sum / the number of completion tokens. ``head``:
    temperature, logit_scale, softcap, as in :func:`reference_logits`.
    """
    logp = reference_logprobs(hidden, weight, targets, bias=bias, ignore_index=ignore_index, dtype=dtype, **head)
    adv = reference_advantages(rewards, eps).reshape(-1).to(logp.dtype)[:, None]
    mask = targets != ignore_index
    if old_logp is None:
        policy = adv * logp
    else:
        high = clip_epsilon if clip_epsilon_high is None else clip_epsilon_high
        ratio = torch.exp(logp - old_logp.to(logp.dtype))
        policy = torch.min(ratio * adv, ratio.clamp(1 - clip_epsilon, 1 + high) * adv)
    per_token = -policy
    if kl_beta:
        d = reference_logp.to(logp.dtype) - logp
        per_token = per_token + kl_beta * (torch.exp(d) - d - 1)
    per_token = torch.where(mask, per_token, 0.0)
    B = rewards.numel()
    if loss_type == "grpo":
        return (per_token.sum(1) / mask.sum(1).clamp(min=1)).mean()
    if loss_type == "dr_grpo":
        return per_token.sum() / (B * max_completion_length)
    if loss_type == "dapo":
        return per_token.sum() / mask.sum().clamp(min=1)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def reference_dpo(
    hidden,
    weight,
    targets,
    rewards,
    reference_logp,
    *,
    beta=0.1,
    rejected=None,
    bias=None,
    ignore_index=-100,
    dtype=None,
    **head,
):
    """DPO (arXiv 2305.18290, Eq. 7) per group of the (P, G+1) group-major batch: chosen = the reference answer
    (last), rejected = sequence ``rejected[p]`` of group p (a list of P indices in [0, G); default: the first of
    the G samples with the lowest reward); sequence log-likelihoods are token sums, ``reference_logp`` (S, T)
    the frozen model's token log-probs. Mean over groups of -log sigmoid(z)."""
    logp = reference_logprobs(hidden, weight, targets, bias=bias, ignore_index=ignore_index, dtype=dtype, **head)
    mask = targets != ignore_index
    P, K = rewards.shape
    total = 0.0
    for p in range(P):
        samples = rewards[p, : K - 1].tolist()
        worst = samples.index(min(samples)) if rejected is None else rejected[p]
        chosen, rejected_seq = p * K + K - 1, p * K + worst

        def delta(s):
            return logp[s][mask[s]].sum() - reference_logp[s][mask[s]].to(logp.dtype).sum()

        z = beta * (delta(chosen) - delta(rejected_seq))
        total = total - torch.nn.functional.logsigmoid(z)
    return total / P


def reference_ppo(
    hidden,
    weight,
    targets,
    rewards,
    value_weight,
    value_bias,
    old_logp,
    old_values,
    reference_logp,
    *,
    kl_coef=0.05,
    gamma=1.0,
    lam=0.95,
    clip_epsilon=0.2,
    vf_clip=0.2,
    vf_coef=0.1,
    bias=None,
    ignore_index=-100,
    dtype=None,
    **head,
):
    """PPO (arXiv 1707.06347) with a value head, GAE and a per-token KL penalty, written per sequence with loops.

    ``rewards`` (P, G): the sampled completions only, row-major (sequence
    ``p * G + i`` is completion i of prompt p). ``old_logp``, ``old_values``,
    ``reference_logp`` (S, T): the policy and value head before the update and
    the frozen model. Values are ``hidden @ value_weight.T + value_bias``. For
    each completion's tokens t = 0..n-1: reward ``-kl_coef (old_logp -
    reference_logp)`` plus R at t = n-1; ``delta_t = r_t + gamma V_old_{t+1} -
    V_old_t`` (V_old_n = 0); ``A_t = delta_t + gamma lam A_{t+1}``; returns
    ``A + V_old``; advantages whitened over each prompt's G completions'
    tokens (population variance + 1e-8). Loss: the mean over all completion
    tokens of the clipped policy loss plus ``vf_coef`` times the clipped
    value loss (0.5 max of the squared errors). Returns a dict with ``loss``,
    ``advantages`` and ``returns`` (S, T, whitened / not, 0 off the tokens),
    ``policy``, ``value`` and ``clip_frac``.
    """
    logp = reference_logprobs(hidden, weight, targets, bias=bias, ignore_index=ignore_index, dtype=dtype, **head)
    dt = logp.dtype
    values = (hidden.to(dt) @ value_weight.to(dt).T + value_bias.to(dt))[..., 0]
    P, G = rewards.shape
    S, T = targets.shape
    adv_raw = torch.zeros(S, T, dtype=torch.float64)
    returns = torch.zeros(S, T, dtype=torch.float64)
    positions = [(targets[s] != ignore_index).nonzero().squeeze(1).tolist() for s in range(S)]
    for s in range(S):
        pos = positions[s]
        later = 0.0
        for k in reversed(range(len(pos))):
            t = pos[k]
            r = -kl_coef * (float(old_logp[s, t]) - float(reference_logp[s, t]))
            if k == len(pos) - 1:
                r += float(rewards[s // G, s % G])
            next_v = float(old_values[s, pos[k + 1]]) if k + 1 < len(pos) else 0.0
            delta = r + gamma * next_v - float(old_values[s, t])
            later = delta + gamma * lam * later
            adv_raw[s, t] = later
            returns[s, t] = later + float(old_values[s, t])
    adv = torch.zeros(S, T, dtype=torch.float64)
    for p in range(P):
        tokens = [(s, t) for s in range(p * G, p * G + G) for t in positions[s]]
        if not tokens:
            continue
        xs = torch.tensor([float(adv_raw[s, t]) for s, t in tokens], dtype=torch.float64)
        mean, var = xs.mean(), ((xs - xs.mean()) ** 2).mean()
        for s, t in tokens:
            adv[s, t] = (adv_raw[s, t] - mean) / (var + 1e-8).sqrt()
    policy, value, clipped, n = 0.0, 0.0, 0, 0
    for s in range(S):
        for t in positions[s]:
            a, ret = adv[s, t].to(dt), returns[s, t].to(dt)
            ratio = torch.exp(logp[s, t] - old_logp[s, t].to(dt))
            pg1, pg2 = -a * ratio, -a * ratio.clamp(1 - clip_epsilon, 1 + clip_epsilon)
            policy = policy + torch.maximum(pg1, pg2)
            clipped += int(pg2 > pg1)
            v_old = old_values[s, t].to(dt)
            v_clip = v_old + (values[s, t] - v_old).clamp(-vf_clip, vf_clip)
            value = value + 0.5 * torch.maximum((values[s, t] - ret) ** 2, (v_clip - ret) ** 2)
            n += 1
    n = max(n, 1)
    policy, value = policy / n, value / n
    return {
        "loss": policy + vf_coef * value,
        "advantages": adv,
        "returns": returns,
        "policy": policy,
        "value": value,
        "clip_frac": clipped / n,
    }

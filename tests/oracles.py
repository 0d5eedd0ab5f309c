"""Float64 oracles of the trainer's other methods (SFT, GRPO, DPO, PPO), with materialised logits.

Each is written straight from its paper or from TRL's formulas with loops over sequences, independently of
``grao/``; they build on the library's own oracles in ``grao_kernels.testing``.
"""

from __future__ import annotations

import torch

from grao_kernels.testing import reference_advantages, reference_logprobs


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
    sampling_logp=None,
    importance_sampling_cap=0.0,
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
    temperature, logit_scale, softcap, as in :func:`reference_logits`. With ``sampling_logp`` (the inference
    engine's log-probs of the sampled tokens) and ``importance_sampling_cap`` > 0, the policy term of each token
    is multiplied by ``min(exp(old_logp - sampling_logp), cap)``, as TRL's ``vllm_importance_sampling_correction``
    (truncated importance sampling) does before adding the KL.
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
        if importance_sampling_cap > 0:
            is_ratio = torch.exp(old_logp.to(logp.dtype) - sampling_logp.to(logp.dtype))
            policy = policy * torch.clamp(is_ratio, max=importance_sampling_cap)
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

"""The small GRAO steps around the vocabulary sweep, one launch each whatever P and G are (kernels and launchers).

Semantics are those of ``grao_kernels.api`` (``group_advantages``,
``token_coefficients``, ``sequence_logp``); see its module docstring for the
coefficients (arXiv 2508.07750, Eq. 3-4).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import check_device, launch_fixed


@triton.jit
def group_advantages_kernel(
    rewards_ptr,  # (P, K) any float dtype
    adv_ptr,  # (P, K) float32, or float64 with IS_FP64
    P,
    K,
    eps,
    stride_rp,
    stride_rk,
    stride_ap,
    IS_FP64: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """A = (r - mean) / (std + eps), population std, exactly 0 for a tied row."""
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_k = tl.arange(0, BLOCK_K)
    mask = (offs_p < P)[:, None] & (offs_k < K)[None, :]
    r = tl.load(rewards_ptr + offs_p[:, None] * stride_rp + offs_k[None, :] * stride_rk, mask=mask, other=0.0)
    if IS_FP64:
        r = r.to(tl.float64)
    else:
        r = r.to(tl.float32)
    mean = tl.sum(r, 1) / K
    centred = tl.where(mask, r - mean[:, None], 0.0)
    std = tl.sqrt(tl.sum(centred * centred, 1) / K)
    hi = tl.max(tl.where(mask, r, float("-inf")), 1)
    lo = tl.min(tl.where(mask, r, float("inf")), 1)
    tied = (hi == lo) | (offs_p >= P)
    # A tied row (std = 0, possibly eps = 0) divides by 1 and is zeroed.
    adv = centred / tl.where(tied, 1.0, std + eps)[:, None]
    adv = tl.where(tied[:, None], 0.0, adv)
    tl.store(adv_ptr + offs_p[:, None] * stride_ap + offs_k[None, :], adv, mask=mask)


@triton.jit
def token_coefficients_kernel(
    adv_ptr,  # (P, G+1) float32
    targets_ptr,  # (S, T) int64
    coef_ptr,  # (S, T) float32 out, contiguous
    n_ptr,  # (S,) float32 out: completion tokens per sequence
    P,
    T,
    G,
    ignore_index,
    beta,
    lam,
    stride_ap,
    stride_ak,
    stride_ts,
    stride_tt,
    BLOCK_T: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """One program per sequence s = p (G+1) + j:

    c(o_j) = -(1 + lam) A_j / (G P)                       for j < G
    c(y)   = -(beta A_y - (lam / G) sum_i A_i) / P        for j = G
    coef[s, t] = c(s) / max(n_s, 1) at completion tokens, 0 elsewhere.
    """
    s = tl.program_id(0)
    p = s // (G + 1)
    j = s % (G + 1)
    offs_t = tl.arange(0, BLOCK_T)
    t_row = targets_ptr + s.to(tl.int64) * stride_ts

    count = tl.zeros([BLOCK_T], tl.float32)
    for t0 in range(0, T, BLOCK_T):
        tmask = offs_t < T - t0
        tg = tl.load(t_row + (t0 + offs_t) * stride_tt, mask=tmask, other=ignore_index)
        count += tl.where(tg != ignore_index, 1.0, 0.0)
    n = tl.sum(count, 0)

    offs_g = tl.arange(0, BLOCK_G)
    a_row = adv_ptr + p * stride_ap
    a_sum = tl.sum(tl.load(a_row + offs_g * stride_ak, mask=offs_g < G, other=0.0), 0)
    a_j = tl.load(a_row + j * stride_ak)
    c_o = -(1.0 + lam) * a_j / (G * P)
    c_y = -(beta * a_j - (lam / G) * a_sum) / P
    c = tl.where(j < G, c_o, c_y) / tl.maximum(n, 1.0)

    for t0 in range(0, T, BLOCK_T):
        tmask = offs_t < T - t0
        tg = tl.load(t_row + (t0 + offs_t) * stride_tt, mask=tmask, other=ignore_index)
        tl.store(coef_ptr + s.to(tl.int64) * T + t0 + offs_t, tl.where(tg != ignore_index, c, 0.0), mask=tmask)
    tl.store(n_ptr + s, n)


@triton.jit
def sequence_logp_kernel(
    logp_ptr,  # (S, T) float32, 0 at ignored positions
    n_ptr,  # (S,) float32
    out_ptr,  # (S,) float32
    T,
    stride_ls,
    stride_lt,
    BLOCK_T: tl.constexpr,
):
    """J(s) = sum_t logp[s, t] / max(n_s, 1): the length-normalised segment sum."""
    s = tl.program_id(0)
    offs_t = tl.arange(0, BLOCK_T)
    acc = tl.zeros([BLOCK_T], tl.float32)
    for t0 in range(0, T, BLOCK_T):
        tmask = offs_t < T - t0
        acc += tl.load(logp_ptr + s.to(tl.int64) * stride_ls + (t0 + offs_t) * stride_lt, mask=tmask, other=0.0)
    n = tl.load(n_ptr + s)
    tl.store(out_ptr + s, tl.sum(acc, 0) / tl.maximum(n, 1.0))


# ----------------------------------------------------------------------------
# launchers (the triton backend's grao_loss hooks): one launch each, no host synchronisation


def _block(n: int, lo: int = 16, hi: int = 1024) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def group_advantages(rewards, eps):
    """Same as ``grao_kernels.api.group_advantages`` (float32; float64 for float64 rewards)."""
    eps = float(eps)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    check_device(rewards)
    P, K = rewards.shape
    is_fp64 = rewards.dtype == torch.float64
    adv = torch.empty(P, K, dtype=torch.float64 if is_fp64 else torch.float32, device=rewards.device)
    if P:
        block_k = triton.next_power_of_2(K)
        block_p = max(1, min(64, 4096 // block_k))
        args = dict(
            rewards_ptr=rewards, adv_ptr=adv, P=P, K=K, eps=eps,
            stride_rp=rewards.stride(0), stride_rk=rewards.stride(1), stride_ap=adv.stride(0),
            IS_FP64=is_fp64, BLOCK_P=block_p, BLOCK_K=block_k,
        )  # fmt: skip
        launch_fixed(group_advantages_kernel, (triton.cdiv(P, block_p),), args)
    return adv


def token_coefficients(adv, targets, ignore_index, beta, lam):
    """Same as ``grao_kernels.api.token_coefficients``: flat float32 ``coef`` and ``n`` (S,)."""
    check_device(adv, targets)
    adv = adv.float()
    P, K = adv.shape
    S, T = targets.shape
    coef = torch.empty(S * T, dtype=torch.float32, device=adv.device)
    n = torch.empty(S, dtype=torch.float32, device=adv.device)
    if S:
        args = dict(
            adv_ptr=adv, targets_ptr=targets, coef_ptr=coef, n_ptr=n, P=P, T=T, G=K - 1,
            ignore_index=int(ignore_index), beta=float(beta), lam=float(lam),
            stride_ap=adv.stride(0), stride_ak=adv.stride(1), stride_ts=targets.stride(0), stride_tt=targets.stride(1),
            BLOCK_T=_block(T), BLOCK_G=_block(K - 1, lo=2, hi=2**16),
        )  # fmt: skip
        launch_fixed(token_coefficients_kernel, (S,), args)
    return coef, n


def sequence_logp(logp, n):
    """Same as ``grao_kernels.api.sequence_logp``: (S, T) log-probs -> (S,) means over ``n`` tokens."""
    check_device(logp, n)
    S, T = logp.shape
    out = torch.empty(S, dtype=torch.float32, device=logp.device)
    if S:
        args = dict(
            logp_ptr=logp, n_ptr=n, out_ptr=out, T=T, stride_ls=logp.stride(0), stride_lt=logp.stride(1),
            BLOCK_T=_block(T),
        )  # fmt: skip
        launch_fixed(sequence_logp_kernel, (S,), args)
    return out

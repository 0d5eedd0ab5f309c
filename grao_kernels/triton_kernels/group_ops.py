"""The small GRAO steps around the vocabulary sweep, one launch each whatever P and G are.

Semantics are those of ``grao_kernels.api`` (``group_advantages``,
``token_coefficients``, ``sequence_logp``); see its module docstring for the
coefficients (arXiv 2508.07750, Eq. 3-4).
"""

from __future__ import annotations

import triton
import triton.language as tl


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

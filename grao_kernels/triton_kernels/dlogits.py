"""Logits gradient of one vocabulary chunk, written out for cuBLAS (the "gemm" backward).

Equivalent eager code for the chunk ``[v_start, v_end)``::

    z  = (hidden[rows].float() @ weight[v_start:v_end].float().T + bias[v_start:v_end]) * inv_temp
    dz[rows, :v_end - v_start] = (coef[rows, None] * inv_temp * (onehot - (z - lse[rows, None]).exp())).to(dtype)
    logp[r] = z[r, targets[r] - v_start] - lse[r]          # for rows whose target is in the chunk
    dbias[v_start:v_end] += dz.float().sum(0)               # fp32 atomics, before the rounding

The launcher then runs ``dhidden += dz @ weight[chunk]`` (fp32 output) and
``dweight[chunk] = dz.T @ hidden`` (in the weight's dtype: every row is in the
product, so the chunk is final) as cuBLAS GEMMs. Against the fully fused
``logprob_backward`` (fp32 atomics of every tile into dhidden and dweight),
this moves the two gradient products onto cuBLAS and removes the atomic
traffic (|dhidden| * V/BLOCK_V + |dweight| * N/BLOCK_N, hundreds of GB at
N=16k, V=152k, H=4k) for an N x chunk buffer of dz: 64 MiB at N=16k and a
2048-wide chunk, under 1% of the fp32 logits. dz is written at each row's own
index; ignored rows are never written and stay zero.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .logprob_backward import _round_to_bf16

# The logits tile, p and dz live in registers together: 128x128 at most
# (128x256 takes half a minute to compile for sm_90, a sign of spilling).
CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 64, "GROUP_N": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64, "GROUP_N": 16}, num_warps=4, num_stages=3),
]

CONFIGS_FP32 = [
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_H": 32, "GROUP_N": 8}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_H": 32, "GROUP_N": 8}, num_warps=4, num_stages=2),
]


@triton.jit
def dlogits_kernel(
    hidden_ptr,  # (N, H) input dtype
    weight_ptr,  # (V, H) same dtype
    bias_ptr,  # (V,), unused without HAS_BIAS
    targets_ptr,  # (N,) int64
    rows_ptr,  # (N,) int32: non-ignored rows first
    n_valid_ptr,  # (1,) int32
    coef_ptr,  # (N,) float32
    lse_ptr,  # (N,) float32
    logp_ptr,  # (N,) float32 out
    dz_ptr,  # (N, >= v_end - v_start) input dtype out, zero where never written
    dbias_ptr,  # (V,) float32, zero-initialised, accumulated atomically; unused without HAS_BIAS
    N,
    H,
    v_start,
    v_end,
    inv_temp,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    stride_dzn,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # interpreter only: its tl.dot mishandles bfloat16
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    # Grouped order as in logprob_backward: programs sharing a weight tile run together.
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_v = tl.cdiv(v_end - v_start, BLOCK_V)
    per_group = GROUP_N * num_v
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    n_valid = tl.load(n_valid_ptr)
    start = pid_n * BLOCK_N
    if start < n_valid:
        offs_n = start + tl.arange(0, BLOCK_N)
        row_mask = offs_n < n_valid
        rows = tl.load(rows_ptr + offs_n, mask=row_mask, other=0).to(tl.int64)
        tgt = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
        c = tl.load(coef_ptr + rows, mask=row_mask, other=0.0) * inv_temp
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)

        offs_h = tl.arange(0, BLOCK_H)
        offs_v = v_start + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = offs_v < v_end
        h_ptrs = hidden_ptr + rows[:, None] * stride_hn + offs_h[None, :] * stride_hh
        wt_ptrs = weight_ptr + offs_v.to(tl.int64)[None, :] * stride_wv + offs_h[:, None] * stride_wh

        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            h_mask = offs_h < H - h0
            a = tl.load(h_ptrs + h0 * stride_hh, mask=row_mask[:, None] & h_mask[None, :], other=0.0)
            b = tl.load(wt_ptrs + h0 * stride_wh, mask=h_mask[:, None] & col_mask[None, :], other=0.0)
            if UPCAST_DOT:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_v, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        live = row_mask[:, None] & col_mask[None, :]
        p = tl.where(live, tl.exp(acc * inv_temp - lse[:, None]), 0.0)
        onehot = (offs_v[None, :] == tgt[:, None]) & live
        dz = c[:, None] * (tl.where(onehot, 1.0, 0.0) - p)

        zt = tl.sum(tl.where(onehot, acc * inv_temp, 0.0), 1)
        lo = v_start + pid_v * BLOCK_V
        has_target = row_mask & (tgt >= lo) & (tgt < lo + BLOCK_V)
        tl.store(logp_ptr + rows, zt - lse, mask=has_target)

        if HAS_BIAS:
            # From the fp32 dz: a V-sized atomic sum per row block, cheap.
            tl.atomic_add(dbias_ptr + offs_v, tl.sum(dz, 0), mask=col_mask, sem="relaxed")
        if UPCAST_DOT:
            if hidden_ptr.dtype.element_ty == tl.bfloat16:
                dz = _round_to_bf16(dz)  # the interpreter's cast would truncate
        dz_ptrs = dz_ptr + rows[:, None] * stride_dzn + (offs_v - v_start)[None, :]
        tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=live)

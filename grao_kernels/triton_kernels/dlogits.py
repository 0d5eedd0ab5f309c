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

from .common import configs_fp32, grouped_tile_ids, logits_grad_tile, round_to_bf16

# The logits tile, p and dz live in registers together: 128x128 at most
# (128x256 takes half a minute to compile for sm_90, a sign of spilling).
CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 64, "GROUP_N": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64, "GROUP_N": 16}, num_warps=4, num_stages=3),
]

CONFIGS_FP32 = configs_fp32(GROUP_N=8)


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
    pid_n, pid_v = grouped_tile_ids(N, v_end - v_start, BLOCK_N, BLOCK_V, GROUP_N)
    n_valid = tl.load(n_valid_ptr)
    start = pid_n * BLOCK_N
    if start < n_valid:
        lo = v_start + pid_v * BLOCK_V
        row_mask, rows, offs_v, col_mask, live, p, onehot, dz = logits_grad_tile(
            hidden_ptr, weight_ptr, bias_ptr, targets_ptr, rows_ptr, coef_ptr, lse_ptr, logp_ptr,
            start, n_valid, lo, v_end, H, inv_temp, stride_hn, stride_hh, stride_wv, stride_wh,
            HAS_BIAS, DOT_PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_V, BLOCK_H,
        )  # fmt: skip
        if HAS_BIAS:
            # From the fp32 dz: a V-sized atomic sum per row block, cheap.
            tl.atomic_add(dbias_ptr + offs_v, tl.sum(dz, 0), mask=col_mask, sem="relaxed")
        if UPCAST_DOT:
            if hidden_ptr.dtype.element_ty == tl.bfloat16:
                dz = round_to_bf16(dz)  # the interpreter's cast would truncate
        dz_ptrs = dz_ptr + rows[:, None] * stride_dzn + (offs_v - v_start)[None, :]
        tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=live)

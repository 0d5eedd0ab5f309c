"""Gradient sweep: dhidden, dweight and dbias of ``sum_t coef[t] * logp[t]``.

Equivalent eager code for one (row block, vocabulary tile) program::

    z  = (hidden[rows].float() @ weight[vt].float().T + bias[vt]) * inv_temp
    p  = (z - lse[rows, None]).exp()                      # softmax from the saved lse
    dz = coef[rows, None] * inv_temp * (onehot(targets[rows])[:, vt] - p)
    dhidden[rows] += dz @ weight[vt]                      # fp32 atomics
    dweight[vt]   += dz.T @ hidden[rows]                  # fp32 atomics
    dbias[vt]     += dz.sum(0)
    logp[r]        = z[r, targets[r] - vt.start] - lse[r]    # for the tile holding targets[r]

since d logp_t / d z_t = onehot(target_t) - softmax(z_t) and z = (h W^T + b) / T.

The "atomic" backward (``set_backward_mode("atomic")``); the default is
``dlogits.py`` plus cuBLAS. Every (row block, vocab tile) pair is an
independent program, so the grid fills the GPU whatever N is, one kernel does
the whole gradient and no dz buffer exists. Holding a row block's dhidden
(BLOCK_N x H fp32) or a tile's dweight (BLOCK_V x H fp32) in registers across
the sweep does not fit for H in the thousands, and splitting H instead would
recompute the logits H/BLOCK_H times, hence the atomics. Their price is fp32
atomic traffic into L2 of about |dhidden| * V/BLOCK_V + |dweight| * N/BLOCK_N
(about 640 GB of read-modify-write at N=16k, V=152k, H=4k with 128x128 tiles),
which is why it is not the default; the grouped program order below keeps the
tiles those atomics hit hot in L2. It is also the only backward that can skip
tiles (gradient filtering), and it needs no memory beyond the gradients.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import configs_fp32, grouped_tile_ids, logits_grad_tile, round_to_bf16

# The backward holds the logits tile, dz and one dot result per H step in
# registers, so it stops at 128x128 tiles (128x256 spills and takes about a
# minute to compile for sm_90).
CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 64, "GROUP_N": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 32, "GROUP_N": 8}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64, "GROUP_N": 16}, num_warps=4, num_stages=3),
]

CONFIGS_FP32 = configs_fp32(GROUP_N=8)


@triton.jit
def logprob_backward_kernel(
    hidden_ptr,  # (N, H) input dtype
    weight_ptr,  # (V, H) same dtype as hidden
    bias_ptr,  # (V,), unused without HAS_BIAS
    targets_ptr,  # (N,) int64
    rows_ptr,  # (N,) int32: non-ignored rows first
    n_valid_ptr,  # (1,) int32
    coef_ptr,  # (N,) float32
    lse_ptr,  # (N,) float32
    logp_ptr,  # (N,) float32 out, zero-initialised: written by the tile holding the target
    dhidden_ptr,  # (N, H) float32, zero-initialised, accumulated atomically
    dweight_ptr,  # (V, H) float32, zero-initialised, accumulated atomically
    dbias_ptr,  # (V,) float32, zero-initialised
    N,
    V,
    H,
    inv_temp,
    filter_eps,  # with FILTER, skip a tile whose softmax stays below this
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    stride_dhn,
    stride_dhh,
    stride_dwv,
    stride_dwh,
    HAS_BIAS: tl.constexpr,
    FILTER: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # interpreter only: its tl.dot mishandles bfloat16
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    # Grouped order (see grouped_tile_ids): the dweight tile a group
    # accumulates into stays in L2 along with its weight tile.
    pid_n, pid_v = grouped_tile_ids(N, V, BLOCK_N, BLOCK_V, GROUP_N)
    n_valid = tl.load(n_valid_ptr)
    start = pid_n * BLOCK_N
    if start < n_valid:
        row_mask, rows, offs_v, col_mask, live, p, onehot, dz = logits_grad_tile(
            hidden_ptr, weight_ptr, bias_ptr, targets_ptr, rows_ptr, coef_ptr, lse_ptr, logp_ptr,
            start, n_valid, pid_v * BLOCK_V, V, H, inv_temp, stride_hn, stride_hh, stride_wv, stride_wh,
            HAS_BIAS, DOT_PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_V, BLOCK_H,
        )  # fmt: skip

        # Gradient filtering (Wijmans et al. 2024, "Cut Your Losses in
        # Large-Vocabulary Language Models", Sec. 4.3): a tile holding no
        # target whose probabilities all stay below filter_eps contributes
        # less than the input dtype resolves next to the target's gradient.
        keep = True
        if FILTER:
            keep = tl.max(tl.max(tl.where(onehot, 1.0, p), 1), 0) >= filter_eps
        if keep:
            if HAS_BIAS:
                tl.atomic_add(dbias_ptr + offs_v, tl.sum(dz, 0), mask=col_mask, sem="relaxed")
            # Tensor cores take dz in the input dtype, as PyTorch's own
            # low-precision backward rounds its logits gradient.
            if UPCAST_DOT:
                if hidden_ptr.dtype.element_ty == tl.bfloat16:
                    dz_in = round_to_bf16(dz)
                else:
                    dz_in = dz.to(hidden_ptr.dtype.element_ty).to(tl.float32)
            else:
                dz_in = dz.to(hidden_ptr.dtype.element_ty)
            offs_h = tl.arange(0, BLOCK_H)
            offs_v64 = offs_v.to(tl.int64)  # int64, as in logits_tile
            h_ptrs = hidden_ptr + rows[:, None] * stride_hn + offs_h[None, :] * stride_hh
            w_ptrs = weight_ptr + offs_v64[:, None] * stride_wv + offs_h[None, :] * stride_wh  # (BLOCK_V, BLOCK_H)
            dh_ptrs = dhidden_ptr + rows[:, None] * stride_dhn + offs_h[None, :] * stride_dhh
            dw_ptrs = dweight_ptr + offs_v64[:, None] * stride_dwv + offs_h[None, :] * stride_dwh
            for h0 in range(0, H, BLOCK_H):
                h_mask = offs_h < H - h0
                w = tl.load(w_ptrs + h0 * stride_wh, mask=col_mask[:, None] & h_mask[None, :], other=0.0)
                if UPCAST_DOT:
                    w = w.to(tl.float32)
                dh = tl.dot(dz_in, w, input_precision=DOT_PRECISION)
                tl.atomic_add(dh_ptrs + h0 * stride_dhh, dh, mask=row_mask[:, None] & h_mask[None, :], sem="relaxed")
                a = tl.load(h_ptrs + h0 * stride_hh, mask=row_mask[:, None] & h_mask[None, :], other=0.0)
                if UPCAST_DOT:
                    a = a.to(tl.float32)
                dw = tl.dot(tl.trans(dz_in), a, input_precision=DOT_PRECISION)
                tl.atomic_add(dw_ptrs + h0 * stride_dwh, dw, mask=col_mask[:, None] & h_mask[None, :], sem="relaxed")

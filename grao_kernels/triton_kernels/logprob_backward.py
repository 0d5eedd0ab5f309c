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

# The backward holds the logits tile, dz and one dot result per H step in
# registers, so it stops at 128x128 tiles (128x256 spills and takes about a
# minute to compile for sm_90).
CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 64, "GROUP_N": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 32, "GROUP_N": 8}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64, "GROUP_N": 16}, num_warps=4, num_stages=3),
]

# float32 inputs: exact dot on FMA units, small tiles (see lse_forward.py).
CONFIGS_FP32 = [
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_H": 32, "GROUP_N": 8}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_H": 32, "GROUP_N": 8}, num_warps=4, num_stages=2),
]


@triton.jit
def _round_to_bf16(x):
    """float32 -> nearest bfloat16 (ties to even), kept in float32.

    Interpreter only: its float32 -> bfloat16 cast truncates, which biases dz
    and doubles the gradient error; GPUs round to nearest.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


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
    # Grouped order (Triton tutorial 03, "L2 cache optimizations"): GROUP_N
    # consecutive programs share one vocabulary tile and walk GROUP_N row
    # blocks, so the weight tile and the dweight tile they accumulate into
    # stay in L2 while those programs run.
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_v = tl.cdiv(V, BLOCK_V)
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
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = offs_v < V
        offs_v64 = offs_v.to(tl.int64)
        h_ptrs = hidden_ptr + rows[:, None] * stride_hn + offs_h[None, :] * stride_hh
        wt_ptrs = weight_ptr + offs_v64[None, :] * stride_wv + offs_h[:, None] * stride_wh  # (BLOCK_H, BLOCK_V)

        # Recompute the logits tile (cheaper than storing N x V of them).
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
        # The log-prob comes free from the tile holding the target, so a
        # backward given the saved lse needs no forward sweep.
        zt = tl.sum(tl.where(onehot, acc * inv_temp, 0.0), 1)
        has_target = row_mask & (tgt >= pid_v * BLOCK_V) & (tgt < pid_v * BLOCK_V + BLOCK_V)
        tl.store(logp_ptr + rows, zt - lse, mask=has_target)

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
                    dz_in = _round_to_bf16(dz)
                else:
                    dz_in = dz.to(hidden_ptr.dtype.element_ty).to(tl.float32)
            else:
                dz_in = dz.to(hidden_ptr.dtype.element_ty)
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

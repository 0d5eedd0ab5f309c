"""Forward sweep: per-row log-sum-exp and target logit of ``z = (h W^T + b) / T``.

Equivalent eager code for one row block and one vocabulary split::

    z = (hidden[rows].float() @ weight[v_lo:v_hi].float().T + bias[v_lo:v_hi]) * inv_temp
    part_max[split, rows] = z.amax(1)
    part_sum[split, rows] = (z - z.amax(1, keepdim=True)).exp().sum(1)
    part_tgt[split, rows] = z[r, targets[r] - v_lo] if v_lo <= targets[r] < v_hi else 0

The launcher combines the splits (a few (N,)-sized ops). The logits tile lives
in registers only; nothing of size (N, V) touches global memory.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import configs_fp32, load_row_block, logits_tile

# Hopper (H100/H200, 228 KB shared memory per SM) takes the wide vocabulary
# tiles; the 128x128 ones fit Ampere (A100, 164 KB) with 3-4 stages. Few
# configs: each costs a compile (seconds) on first use.
CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 256, "BLOCK_H": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64}, num_warps=4, num_stages=3),
]

CONFIGS_FP32 = configs_fp32()


@triton.jit
def lse_forward_kernel(
    hidden_ptr,  # (N, H) input dtype
    weight_ptr,  # (V, H) same dtype as hidden
    bias_ptr,  # (V,) any float dtype, unused without HAS_BIAS
    targets_ptr,  # (N,) int64
    rows_ptr,  # (N,) int32: non-ignored rows first, in order
    n_valid_ptr,  # (1,) int32: how many entries of rows_ptr are non-ignored
    part_max_ptr,  # (n_split, N) float32 outputs
    part_sum_ptr,
    part_tgt_ptr,
    V,
    H,
    v_per_split,  # a multiple of every BLOCK_V in CONFIGS
    inv_temp,
    stride_hn,
    stride_hh,
    stride_wv,
    stride_wh,
    stride_ps,  # split stride of the three partial buffers
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # interpreter only: its tl.dot mishandles bfloat16
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    # The grid is sized for every row; blocks past the non-ignored rows exit
    # here, so ignored rows cost nothing and the host never reads n_valid.
    n_valid = tl.load(n_valid_ptr)
    start = pid_n * BLOCK_N
    if start < n_valid:
        row_mask, rows, tgt = load_row_block(rows_ptr, targets_ptr, start, n_valid, BLOCK_N)

        v_lo = pid_s * v_per_split
        v_hi = tl.minimum(v_lo + v_per_split, V)
        m = tl.full([BLOCK_N], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_N], tl.float32)
        zt = tl.zeros([BLOCK_N], tl.float32)
        for v0 in range(v_lo, v_hi, BLOCK_V):
            acc, offs_v, col_mask = logits_tile(
                hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, v0, v_hi, H,
                stride_hn, stride_hh, stride_wv, stride_wh,
                HAS_BIAS, DOT_PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_V, BLOCK_H,
            )  # fmt: skip
            z = tl.where(col_mask[None, :], acc * inv_temp, float("-inf"))
            # Online log-sum-exp in fp32 (Milakov & Gimelshein 2018, "Online
            # normaliser calculation for softmax", Alg. 3).
            m_new = tl.maximum(m, tl.max(z, 1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
            m = m_new
            # The target logit is picked out of the tile it falls in: the same
            # rounding as the log-sum-exp, so logp <= 0 holds exactly, and no
            # gathered weight rows are read.
            zt += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), 1)
        out = pid_s * stride_ps + rows
        tl.store(part_max_ptr + out, m, mask=row_mask)
        tl.store(part_sum_ptr + out, s, mask=row_mask)
        tl.store(part_tgt_ptr + out, zt, mask=row_mask)

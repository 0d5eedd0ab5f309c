"""``@triton.jit`` pieces shared by the vocabulary-sweep kernels.

``lse_forward``, ``dlogits`` and ``logprob_backward`` all recompute tiles of
``z * T = h W^T + b`` for a block of non-ignored rows; the grid order, the row
loads, the logits tile and the backward's logits gradient of such a tile are
written once here. Triton inlines these calls, so the kernels compile as before.
"""

from __future__ import annotations

import triton
import triton.language as tl


def configs_fp32(**extra):
    """Autotuning configs for float32 inputs, ``extra`` (e.g. GROUP_N) added to each.

    float32 inputs take the exact (non-TF32) dot, which runs on FMA units:
    small tiles, or compilation alone takes minutes.
    """
    return [
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_H": 32, **extra}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_H": 32, **extra}, num_warps=4, num_stages=2),
    ]


@triton.jit
def grouped_tile_ids(N, V, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, GROUP_N: tl.constexpr):
    """This program's (row block, vocabulary tile) of an N x V grid, in grouped order.

    Triton tutorial 03, "L2 cache optimizations": GROUP_N consecutive
    programs share one vocabulary tile and walk GROUP_N row blocks, so the
    weight tile (and any per-tile output they accumulate into) stays in L2
    while those programs run.
    """
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_v = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * num_v
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size
    return pid_n, pid_v


@triton.jit
def load_row_block(rows_ptr, targets_ptr, start, n_valid, BLOCK_N: tl.constexpr):
    """Rows ``start .. start + BLOCK_N`` of the non-ignored list: (row mask, int64 row ids, targets)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    row_mask = offs_n < n_valid
    rows = tl.load(rows_ptr + offs_n, mask=row_mask, other=0).to(tl.int64)
    tgt = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    return row_mask, rows, tgt


@triton.jit
def logits_tile(
    hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, v_lo, v_hi, H, stride_hn, stride_hh, stride_wv, stride_wh,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """``hidden[rows] @ weight[offs_v].T + bias[offs_v]`` in fp32, (BLOCK_N, BLOCK_V); returns (tile, offs_v, col_mask).

    ``rows`` are int64 row ids (masked by ``row_mask``); the columns are
    ``offs_v = v_lo + arange(BLOCK_V)``, masked where ``>= v_hi``. Masked
    entries hold the bias or 0; the caller masks them.
    """
    offs_v = v_lo + tl.arange(0, BLOCK_V)
    col_mask = offs_v < v_hi
    offs_h = tl.arange(0, BLOCK_H)
    h_ptrs = hidden_ptr + rows[:, None] * stride_hn + offs_h[None, :] * stride_hh
    # int64 vocabulary offsets: V*H passes 2^31 for large heads.
    wt_ptrs = weight_ptr + offs_v.to(tl.int64)[None, :] * stride_wv + offs_h[:, None] * stride_wh  # (BLOCK_H, BLOCK_V)
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
    return acc, offs_v, col_mask


@triton.jit
def logits_grad_tile(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr, rows_ptr, coef_ptr, lse_ptr, logp_ptr, start, n_valid, v_lo, v_hi,
    H, inv_temp, stride_hn, stride_hh, stride_wv, stride_wh,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """The backward's shared tile: dz = d(sum coef * logp) / d logits, fp32, and logp of the targets in it.

    Recomputes the logits tile (cheaper than storing N x V of them), then
    dz = coef / T * (onehot - p) with p the softmax from the saved lse, since
    d logp / d z = onehot(target) - softmax(z) and z = logits / T. Stores
    logp = z[target] - lse for the rows whose target lies in the tile. The
    row block is entries [start, start + BLOCK_N) of rows_ptr, the vocabulary
    tile as in logits_tile. Returns (row_mask, rows, offs_v, col_mask, live, p, onehot, dz).
    """
    row_mask, rows, tgt = load_row_block(rows_ptr, targets_ptr, start, n_valid, BLOCK_N)
    c = tl.load(coef_ptr + rows, mask=row_mask, other=0.0) * inv_temp
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    acc, offs_v, col_mask = logits_tile(
        hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, v_lo, v_hi, H,
        stride_hn, stride_hh, stride_wv, stride_wh,
        HAS_BIAS, DOT_PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_V, BLOCK_H,
    )  # fmt: skip
    live = row_mask[:, None] & col_mask[None, :]
    p = tl.where(live, tl.exp(acc * inv_temp - lse[:, None]), 0.0)
    onehot = (offs_v[None, :] == tgt[:, None]) & live
    dz = c[:, None] * (tl.where(onehot, 1.0, 0.0) - p)
    # The log-prob comes free from the tile holding the target, so a
    # backward given the saved lse needs no forward sweep.
    zt = tl.sum(tl.where(onehot, acc * inv_temp, 0.0), 1)
    has_target = row_mask & (tgt >= v_lo) & (tgt < v_lo + BLOCK_V)
    tl.store(logp_ptr + rows, zt - lse, mask=has_target)
    return row_mask, rows, offs_v, col_mask, live, p, onehot, dz


@triton.jit
def round_to_bf16(x):
    """float32 -> nearest bfloat16 (ties to even), kept in float32.

    Interpreter only: its float32 -> bfloat16 cast truncates, which biases dz
    and doubles the gradient error; GPUs round to nearest.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)

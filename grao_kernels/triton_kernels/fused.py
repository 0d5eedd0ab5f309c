"""The "fused" sweep: logits only ever live in registers; the minimal-memory mode.

Rows in groups of R non-ignored rows, the gradient in vocabulary chunks of C
entries (R and C from ``workspace`` and the budget; one group of every row
whenever it fits)::

    # forward, group by group (skipped when the caller hands back the statistics of an earlier one)
    for each (row block, vocabulary tile), one program each, grouped order:
        z = head(hidden[g] @ weight[tile].T + bias[tile])
        part[tile, rows] = (max z, sum exp(z - max), sum exp(z - max)(z - max))     # lse_partials_kernel
        target_logit[rows] = z[target]                   # from the tile holding it
    lse, logp, entropy = reduce over tiles              # lse_reduce_kernel
    # gradient: one group, or several in the vocabulary-outer order (chunk outer, group inner)
    dz = d loss / d raw, recomputed tile by tile        # dlogits_kernel, (R, C) in hidden's dtype
    dhidden[g] += dz @ weight[chunk]                    # cuBLAS, float32 accumulation over the chunks
    dweight[chunk] (+)= dz.T @ hidden[g]                # cuBLAS: once per chunk with one group, else
                                                        # summed over the groups in float32 C x H, then written
    dbias[chunk] += dz.sum(0)

With several groups the chunk-outer order keeps dhidden's float32
accumulator for every row (4 n H, independent of V) instead of a float32
V x H dweight accumulator (2.3 GiB at V=151936, H=4096), and re-gathers a
group's hidden rows per chunk when rows are ignored.

Arithmetic, grao_loss entry, N=16384, H=4096, bf16, 1 GiB (the default
budget; ``triton_backend.workspace_bytes`` gives the plan: one group, C=8192,
~0.7-0.8 GiB), on an H100 SXM taken as ~750 TFLOP/s for cuBLAS bf16 GEMMs,
~600 for Triton's, 3.35 TB/s:

* FLOPs: 8 N V H (the forward's logits are recomputed for dz), 4/3 of the
  three-GEMM floor 6 N V H; two of the four GEMMs in Triton.
* Bytes per logit: dz written once and read by two GEMMs (6 B), the
  partials (12 B per row and 128-wide tile: 0.1 B per logit); plus dhidden's
  float32 read-modify-write per chunk (8 N H = 0.54 GB per chunk).
* V=151936: floor 61 TFLOP = 82 ms; ours 2 x 20.4 TFLOP in Triton (68 ms)
  + 2 x 20.4 in cuBLAS (54 ms) + 15 GB of dz (4.5 ms) + 19 chunks of
  dhidden (10 GB, 3 ms) = ~130 ms, ~1.6x the floor.
* V=262144: floor 106 TFLOP = 141 ms; ours 117 + 94 ms of GEMMs + 26 GB of
  dz (7.7 ms) + 32 chunks of dhidden (17 GB, 5 ms) = ~224 ms, ~1.6x.

The goal of <= 1.1x the floor needs the three-GEMM chunked sweep (each
logit computed once) without a float32 V x H accumulator: ``chunked.py``
models it (~1.14x at 1 GiB with ``settings.triton_dweight_sum = "weight"``,
~1.10x with softmax statistics in a Triton GEMM1's epilogue: ``epilogue.py``,
which reuses this module's forward kernels).

The forward writes one partial triple per (row, tile) and reduces them in a
second small kernel, rather than sweeping the vocabulary inside a program:
every program is then one GEMM tile, programs run in grouped order so the
hidden rows and weight tiles come from L2, and the grid fills the GPU at any N.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    Problem,
    Sizes,
    Workspace,
    apply_head,
    configs_fp32,
    dot_flags,
    dz_scale,
    grouped_tile_ids,
    largest_rows,
    launch,
    launch_fixed,
    logits_grad,
    lse_and_entropy,
    merge_lse,
    min_block_v,
    mm_into,
    mm_temp_bytes,
    raw_logits_tile,
    to_store,
)

# Tiles of 128x128 and 64x256 (Ampere has 164 KB of shared memory per SM,
# Hopper 228 KB). A 128x256 float32 tile needs all 255 registers of a thread
# at 8 warps before the epilogue: ptxas spills it as soon as a bias, the
# soft-cap or the entropy join (compile_check.py fails on any spill). Few
# configs: each costs a compile.
FORWARD_CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 64, "GROUP_N": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 256, "BLOCK_H": 64, "GROUP_N": 8}, num_warps=8, num_stages=3),
]
# dz holds the logits tile, its gradient and the head's derivative at once.
DLOGITS_CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 64, "GROUP_N": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64, "GROUP_N": 16}, num_warps=4, num_stages=3),
]
FORWARD_CONFIGS_FP32 = configs_fp32(8, GROUP_N=8)
DLOGITS_CONFIGS_FP32 = configs_fp32(4, GROUP_N=8)
# Under the interpreter each program costs milliseconds of Python: few, wide tiles.
INTERPRETER_CONFIG = {"BLOCK_N": 16, "BLOCK_V": 1024, "BLOCK_H": 16, "GROUP_N": 2}
REDUCE_CONFIG = {"BLOCK_R": 32, "BLOCK_T": 64}

# Widest dz chunk: beyond it dhidden's read-modify-write is already small.
MAX_CHUNK = 16384

_HEURISTICS = {
    "HAS_BIAS": lambda a: a["bias_ptr"] is not None,
    "HAS_SOFTCAP": lambda a: a["softcap"] is not None,
    "HAS_ROWS": lambda a: a["rows_ptr"] is not None,
}


@triton.jit
def _row_ids(rows_ptr, row0, offs, mask, HAS_ROWS: tl.constexpr):
    """int64 ids (in the caller's N rows) of the group's rows ``offs``."""
    if HAS_ROWS:
        return tl.load(rows_ptr + offs, mask=mask, other=0)
    return (row0 + offs).to(tl.int64)


@triton.heuristics(
    {**_HEURISTICS, "ENTROPY": lambda a: a["part_t_ptr"] is not None, "STORE_P": lambda a: a["p_ptr"] is not None}
)
@triton.jit
def lse_partials_kernel(
    hidden_ptr,  # (R, H) the group's rows, row stride stride_h
    weight_ptr,  # (V, H) any float dtype (cast to hidden's per tile)
    bias_ptr,  # (V,) or None
    targets_ptr,  # (N,) int64
    rows_ptr,  # (R,) int64 ids or None (ids row0 .. row0 + R)
    part_m_ptr,  # (tiles, R) float32 out: tile max
    part_s_ptr,  # (tiles, R) float32 out: sum exp(z - max)
    part_t_ptr,  # (tiles, R) float32 out: sum exp(z - max)(z - max), or None
    tgt_logit_ptr,  # (R,) float32 out: z of the target
    p_ptr,  # (R, V) out, row stride stride_p: exp(z - tile max) (the epilogue sweep), or None
    row0,
    R,
    V,
    H,
    stride_h,
    stride_w,
    stride_p,
    scale,
    inv_temp,
    softcap,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # interpreter only: its tl.dot mishandles bfloat16
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    ENTROPY: tl.constexpr,
    STORE_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    pid_n, pid_v = grouped_tile_ids(R, V, BLOCK_N, BLOCK_V, GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    raw = raw_logits_tile(
        hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, R, V, H, stride_h, stride_w,
        HAS_BIAS, DOT_PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_V, BLOCK_H,
    )  # fmt: skip
    tile_outputs(
        raw, offs_n, offs_v, pid_v, targets_ptr, rows_ptr, part_m_ptr, part_s_ptr, part_t_ptr, tgt_logit_ptr,
        p_ptr, row0, R, V, stride_p, scale, inv_temp, softcap,
        UPCAST_DOT, HAS_SOFTCAP, HAS_ROWS, ENTROPY, STORE_P, BLOCK_N, BLOCK_V,
    )  # fmt: skip


@triton.jit
def tile_outputs(
    raw, offs_n, offs_v, pid_v, targets_ptr, rows_ptr, part_m_ptr, part_s_ptr, part_t_ptr, tgt_logit_ptr,
    p_ptr, row0, R, V, stride_p, scale, inv_temp, softcap,
    INTERPRET: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ROWS: tl.constexpr, ENTROPY: tl.constexpr,
    STORE_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """GEMM1's epilogue for the raw logits ``raw`` of rows ``offs_n`` and vocabulary tile ``pid_v`` (columns
    ``offs_v``): the tile's partial triple, the target logits it holds and, with STORE_P, exp(z - tile max).
    Rows ``>= R`` and columns ``>= V`` are neither stored nor counted."""
    row_mask = offs_n < R
    col_mask = offs_v < V
    z, _ = apply_head(raw, scale, inv_temp, softcap, HAS_SOFTCAP)
    z = tl.where(col_mask[None, :], z, float("-inf"))
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    m, s, t = merge_lse(m, s, s, z, 1.0, 0.0, ENTROPY)
    out = pid_v.to(tl.int64) * R + offs_n
    tl.store(part_m_ptr + out, m, mask=row_mask)
    tl.store(part_s_ptr + out, s, mask=row_mask)
    if ENTROPY:
        tl.store(part_t_ptr + out, t, mask=row_mask)
    if STORE_P:
        # The epilogue sweep's GEMM1 output: the tile's exp(z - m) in (0, 1] instead of the float32 logits
        # (half the bytes in bf16/fp16); m is the tile max just stored (0 for a tile of -inf logits, whose p is 0).
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        p = tl.exp(z - m_safe[:, None])
        p_ptrs = p_ptr + offs_n.to(tl.int64)[:, None] * stride_p + offs_v[None, :]
        tl.store(p_ptrs, to_store(p, p_ptr.dtype.element_ty, INTERPRET), mask=row_mask[:, None] & col_mask[None, :])
    # The target's logit comes from the tile holding it, with the same rounding
    # as the log-sum-exp (so logp <= 0 holds); columns past V never match.
    tgt = tl.load(targets_ptr + _row_ids(rows_ptr, row0, offs_n, row_mask, HAS_ROWS), mask=row_mask, other=-1)
    hit = (offs_v[None, :] == tgt[:, None]) & col_mask[None, :]
    z_t = tl.sum(tl.where(hit, z, 0.0), 1)
    tl.store(tgt_logit_ptr + offs_n, z_t, mask=row_mask & (tgt >= pid_v * BLOCK_V) & (tgt < pid_v * BLOCK_V + BLOCK_V))


@triton.heuristics({"HAS_ROWS": lambda a: a["rows_ptr"] is not None, "ENTROPY": lambda a: a["part_t_ptr"] is not None})
@triton.jit
def lse_reduce_kernel(
    part_m_ptr,  # (tiles, R) float32
    part_s_ptr,
    part_t_ptr,  # or None
    tgt_logit_ptr,  # (R,) float32
    rows_ptr,  # (R,) int64 ids or None
    logp_ptr,  # (N,) float32 out
    lse_ptr,  # (N,) float32 out
    ent_ptr,  # (N,) float32 out (with ENTROPY)
    row0,
    R,
    tiles,
    HAS_ROWS: tl.constexpr,
    ENTROPY: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = offs_r < R
    offs_t = tl.arange(0, BLOCK_T)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    t = tl.zeros([BLOCK_R], tl.float32)
    for k0 in range(0, tiles, BLOCK_T):
        mask = row_mask[:, None] & (k0 + offs_t < tiles)[None, :]
        idx = (k0 + offs_t).to(tl.int64)[None, :] * R + offs_r[:, None]
        pm = tl.load(part_m_ptr + idx, mask=mask, other=float("-inf"))
        ps = tl.load(part_s_ptr + idx, mask=mask, other=0.0)
        pt = ps
        if ENTROPY:
            pt = tl.load(part_t_ptr + idx, mask=mask, other=0.0)
        m, s, t = merge_lse(m, s, t, pm, ps, pt, ENTROPY)
    lse, ent = lse_and_entropy(m, s, t)
    ids = _row_ids(rows_ptr, row0, offs_r, row_mask, HAS_ROWS)
    tl.store(lse_ptr + ids, lse, mask=row_mask)
    tl.store(logp_ptr + ids, tl.load(tgt_logit_ptr + offs_r, mask=row_mask, other=0.0) - lse, mask=row_mask)
    if ENTROPY:
        tl.store(ent_ptr + ids, ent, mask=row_mask)


@triton.heuristics({**_HEURISTICS, "HAS_ENT_COEF": lambda a: a["ent_coef_ptr"] is not None})
@triton.jit
def dlogits_kernel(
    hidden_ptr,  # (R, H) the group's rows
    weight_ptr,  # (V, H)
    bias_ptr,  # (V,) or None
    targets_ptr,  # (N,) int64
    rows_ptr,  # (R,) int64 ids or None
    coef_ptr,  # (N,) float32
    ent_coef_ptr,  # (N,) float32 or None
    lse_ptr,  # (N,) float32
    ent_ptr,  # (N,) float32 (read with HAS_ENT_COEF)
    dz_ptr,  # (R, >= v_end - v_start) hidden's dtype out, row stride stride_dz
    row0,
    R,
    v_start,
    v_end,
    H,
    stride_h,
    stride_w,
    stride_dz,
    scale,
    inv_temp,
    softcap,
    dz_scale,  # float: dz is stored times this (see common.dz_scale)
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    HAS_ENT_COEF: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    pid_n, pid_v = grouped_tile_ids(R, v_end - v_start, BLOCK_N, BLOCK_V, GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = v_start + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = offs_n < R
    raw = raw_logits_tile(
        hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, R, v_end, H, stride_h, stride_w,
        HAS_BIAS, DOT_PRECISION, UPCAST_DOT, BLOCK_N, BLOCK_V, BLOCK_H,
    )  # fmt: skip
    z, dz_draw = apply_head(raw, scale, inv_temp, softcap, HAS_SOFTCAP)
    ids = _row_ids(rows_ptr, row0, offs_n, row_mask, HAS_ROWS)
    tgt = tl.load(targets_ptr + ids, mask=row_mask, other=-1)
    c = tl.load(coef_ptr + ids, mask=row_mask, other=0.0)
    lse = tl.load(lse_ptr + ids, mask=row_mask, other=0.0)
    ec = c * 0.0
    ent = c * 0.0
    if HAS_ENT_COEF:
        ec = tl.load(ent_coef_ptr + ids, mask=row_mask, other=0.0)
        ent = tl.load(ent_ptr + ids, mask=row_mask, other=0.0)
    onehot = offs_v[None, :] == tgt[:, None]
    g = logits_grad(z, dz_draw, onehot, c, ec, lse, ent, HAS_ENT_COEF) * dz_scale
    # Tensor cores take dz in the input dtype, as PyTorch's own low-precision backward rounds its logits gradient.
    dz_ptrs = dz_ptr + offs_n.to(tl.int64)[:, None] * stride_dz + (offs_v - v_start)[None, :]
    live = row_mask[:, None] & (offs_v < v_end)[None, :]
    tl.store(dz_ptrs, to_store(g, dz_ptr.dtype.element_ty, UPCAST_DOT), mask=live)


def _configs(prob: Problem, configs, configs_fp32):
    return configs_fp32 if prob.dtype == torch.float32 else configs


def max_tiles(sizes: Sizes) -> int:
    """Vocabulary tiles of the forward at its narrowest tile (sizes the partial buffers)."""
    configs = FORWARD_CONFIGS_FP32 if sizes.dtype == torch.float32 else FORWARD_CONFIGS
    return triton.cdiv(sizes.V, min_block_v(configs, INTERPRETER_CONFIG))


def vocabulary_outer(sizes: Sizes, rows: int, grad: bool, needs) -> bool:
    """Whether the gradient runs vocabulary chunk outer, row group inner: when several groups add to dweight.

    Each dweight chunk is then summed over every row (a float32 C x H
    accumulator at most) and written once in the weight's dtype, instead of a
    float32 V x H accumulator taking a share from each group; dhidden
    accumulates over the chunks for every row (float32 n x H, independent of V).
    """
    return grad and bool(needs[1]) and rows < sizes.n


def workspace(
    sizes: Sizes, rows: int, chunk: int, *, grad: bool, entropy: bool, needs=(True, True, True), forward: bool = True
) -> Workspace:
    """Every buffer ``run`` allocates for groups of ``rows`` rows and dz chunks of ``chunk`` columns (bytes).

    Persistent: the dz chunk (e R C), the float32 dhidden accumulator (4 R H
    for the group, or 4 n H for every row in the vocabulary-outer order), the
    gathered hidden rows (e R H, when rows are ignored) and, in the
    vocabulary-outer order with a weight that is not float32, the float32
    dweight chunk accumulator (4 C H). Transient, one at a time: the forward's
    tile partials (8 or 12 B per row and tile, and the target logits), a
    chunk of the weight cast to hidden's dtype, dbias's per-chunk sum, the
    rounded dhidden rows of a gathered group, mm_into's temporaries.
    """
    R = min(rows, sizes.n)
    V, H, e = sizes.V, sizes.H, sizes.e
    C = min(chunk, V) if grad else 0
    dh, dw, db = (grad and bool(x) for x in needs)
    outer = vocabulary_outer(sizes, rows, grad, needs)
    persistent = {}
    if grad:
        persistent["dz chunk"] = e * R * C
    if dh:
        persistent["dhidden accumulator"] = 4 * (sizes.n if outer else R) * H
    if sizes.gathered:
        persistent["gathered hidden"] = e * R * H
    if outer and sizes.weight_dtype != torch.float32:
        persistent["dweight chunk accumulator"] = 4 * C * H
    transient = {}
    if forward:
        transient["forward partials"] = (12 if entropy else 8) * max_tiles(sizes) * R + 4 * R
    if dh:
        cast = e * C * H if sizes.weight_dtype != sizes.dtype else 0
        transient["weight chunk"] = cast + mm_temp_bytes(sizes, R, H, V > C)
    if db:
        transient["dbias sum"] = 4 * C
    if dh and sizes.gathered and sizes.dtype != torch.float32:
        transient["dhidden scatter"] = e * R * H
    if dw and (outer or sizes.weight_dtype == torch.float32):
        transient["dweight gemm temporary"] = mm_temp_bytes(sizes, C, H, outer)
    return Workspace(persistent, {k: v for k, v in transient.items() if v})


# One group of every row is preferred while its dz chunk is at least this wide:
# each chunk costs a float32 read-modify-write of the (n, H) dhidden accumulator.
ONE_GROUP_MIN_CHUNK = 1024


def rows_per_group(
    sizes: Sizes, budget: int, grad: bool, entropy: bool, needs=(True, True, True), forward: bool = True
) -> tuple[int, int]:
    """(rows per group, dz chunk width) so ``workspace`` fits 90% of ``budget`` bytes; (0, 0) when 16 rows do not.

    First one group of every row, the chunk halving from the whole vocabulary
    (at most MAX_CHUNK) down to ONE_GROUP_MIN_CHUNK: each dweight chunk is
    then one product over every row. Else several groups (see
    ``vocabulary_outer``), the chunk halving while fewer than 256 rows fit.
    The free 10% covers the call's O(N) vectors and allocator rounding.
    """
    usable = int(0.9 * budget)

    def fits(rows, chunk):
        return workspace(sizes, rows, chunk, grad=grad, entropy=entropy, needs=needs, forward=forward)

    if not grad:
        return largest_rows(sizes.n, usable, lambda r: fits(r, 0)), 0
    widest = min(sizes.V, MAX_CHUNK)
    chunk = widest
    while chunk >= min(ONE_GROUP_MIN_CHUNK, widest):
        if fits(sizes.n, chunk).bytes <= usable:
            return sizes.n, chunk
        chunk //= 2
    chunk = widest
    while True:
        rows = largest_rows(sizes.n, usable, lambda r, c=chunk: fits(r, c))
        if rows >= min(256, max(sizes.n, 16)) or chunk <= 256:
            break
        chunk //= 2
    return (rows, chunk) if rows >= 16 else (0, 0)


def forward_tiles(prob: Problem, h, ids, row0, r, parts, tgt_logit, p=None) -> dict:
    """GEMM1 of a group's ``r`` rows: per (row, vocabulary tile) the partial triple into ``parts`` ((2 or 3,
    >= tiles r) float32: max, sum-exp and, with 3, the entropy sum, tile-major with row stride ``r``), the
    target's logit into ``tgt_logit`` (left as is where no tile holds the target) and, given ``p`` ((r, V)),
    exp(z - tile max) into it. Returns the launch's block sizes."""
    N, V, H = prob.shape
    args = dict(
        hidden_ptr=h, weight_ptr=prob.weight, bias_ptr=prob.bias, targets_ptr=prob.targets, rows_ptr=ids,
        part_m_ptr=parts[0], part_s_ptr=parts[1], part_t_ptr=parts[2] if len(parts) > 2 else None,
        tgt_logit_ptr=tgt_logit, p_ptr=p, row0=row0, R=r, V=V, H=H, stride_h=h.stride(0),
        stride_w=prob.weight.stride(0), stride_p=0 if p is None else p.stride(0), **prob.head_args(),
        **dot_flags(prob.dtype),
    )  # fmt: skip

    def grid(meta):
        return (triton.cdiv(r, meta["BLOCK_N"]) * triton.cdiv(V, meta["BLOCK_V"]),)

    fwd_configs = _configs(prob, FORWARD_CONFIGS, FORWARD_CONFIGS_FP32)
    return launch(lse_partials_kernel, fwd_configs, INTERPRETER_CONFIG, grid, args)


def reduce_tiles(out, ids, row0, r, parts, tgt_logit, tiles: int, entropy: bool) -> None:
    """logp, lse (and with ``entropy`` the entropy) of a group's ``r`` rows into ``out`` from ``forward_tiles``'
    ``tiles`` partials per row."""
    reduce_args = dict(
        part_m_ptr=parts[0], part_s_ptr=parts[1], part_t_ptr=parts[2] if entropy else None, tgt_logit_ptr=tgt_logit,
        rows_ptr=ids, logp_ptr=out.logp, lse_ptr=out.lse, ent_ptr=out.entropy if entropy else None,
        row0=row0, R=r, tiles=tiles, **REDUCE_CONFIG,
    )  # fmt: skip
    launch_fixed(lse_reduce_kernel, (triton.cdiv(r, REDUCE_CONFIG["BLOCK_R"]),), reduce_args)


def _forward_group(prob: Problem, out, h, ids, row0, r, entropy: bool) -> None:
    """Statistics of the group's ``r`` rows into ``out`` (partials, then their reduction)."""
    parts = torch.empty(3 if entropy else 2, max_tiles(prob.sizes()) * r, dtype=torch.float32, device=h.device)
    # NaN stays where no tile holds the target: one outside [0, V) (validate=False) gives logp = NaN.
    tgt_logit = torch.full((r,), float("nan"), dtype=torch.float32, device=h.device)
    meta = forward_tiles(prob, h, ids, row0, r, parts, tgt_logit)
    reduce_tiles(out, ids, row0, r, parts, tgt_logit, triton.cdiv(prob.shape[1], meta["BLOCK_V"]), entropy)


def run(prob: Problem, out, *, rows: int, chunk: int, entropy: bool, coef, ent_coef, stats_given: bool, needs):
    """One sweep over the non-ignored rows in groups of ``rows``; fills ``out`` (see ``Outputs`` in the backend),
    whose gradients the backend has allocated; allocates exactly ``workspace``."""
    N, V, H = prob.shape
    dtype = prob.dtype
    grad = coef is not None
    dev = prob.hidden.device
    R = min(rows, prob.n)
    groups = [(r0, min(prob.n, r0 + rows)) for r0 in range(0, prob.n, rows)]
    width = min(chunk, V) if grad else 0
    outer = vocabulary_outer(prob.sizes(), rows, grad, needs)
    dz_buf = torch.empty(R * width, dtype=dtype, device=dev) if grad else None
    dh_acc = torch.empty(prob.n if outer else R, H, dtype=torch.float32, device=dev) if grad and needs[0] else None
    dw_acc = None
    if outer and prob.weight.dtype != torch.float32:
        dw_acc = torch.empty(width, H, dtype=torch.float32, device=dev)

    h = None
    scale = dz_scale(prob, coef, ent_coef) if grad else 1.0
    if not stats_given:
        for r0, r1 in groups:
            del h  # the previous group's gathered rows go before the next are gathered
            h, ids, row0 = prob.group(r0, r1)
            _forward_group(prob, out, h, ids, row0, r1 - r0, entropy or ent_coef is not None)
    if not grad:
        return

    def chunk_of_group(r0, r1, h, ids, row0, v0, v1, first_chunk, first_group):
        """dz of rows r0..r1 and columns v0..v1, and its three products."""
        r = r1 - r0
        dz = dz_buf[: r * width].view(r, width)[:, : v1 - v0]
        args = dict(
            hidden_ptr=h, weight_ptr=prob.weight, bias_ptr=prob.bias, targets_ptr=prob.targets, rows_ptr=ids,
            coef_ptr=coef, ent_coef_ptr=ent_coef, lse_ptr=out.lse, ent_ptr=out.entropy, dz_ptr=dz,
            row0=row0, R=r, v_start=v0, v_end=v1, H=H, stride_h=h.stride(0), stride_w=prob.weight.stride(0),
            stride_dz=dz.stride(0), **prob.head_args(), dz_scale=scale, **dot_flags(dtype),
        )  # fmt: skip

        def grid(meta, w=v1 - v0, r=r):
            return (triton.cdiv(r, meta["BLOCK_N"]) * triton.cdiv(w, meta["BLOCK_V"]),)

        launch(
            dlogits_kernel,
            _configs(prob, DLOGITS_CONFIGS, DLOGITS_CONFIGS_FP32),
            INTERPRETER_CONFIG,
            grid,
            args,
            key=("H",),
        )
        if needs[0]:
            w_chunk = prob.weight[v0:v1]
            if w_chunk.dtype != dtype:
                w_chunk = w_chunk.to(dtype)
            mm_into(dh_acc[r0:r1] if outer else dh_acc[:r], dz, w_chunk, accumulate=not first_chunk, alpha=1 / scale)
            del w_chunk
        if needs[1]:
            if dw_acc is not None:
                mm_into(dw_acc[: v1 - v0], dz.T, h, accumulate=not first_group, alpha=1 / scale)
            else:
                mm_into(out.dweight[v0:v1], dz.T, h, accumulate=not first_group, alpha=1 / scale)
        if needs[2]:
            out.dbias[v0:v1].add_(dz.sum(0, dtype=torch.float32), alpha=1 / scale)

    def scatter(r0, r1, ids, d):
        if ids is None:
            out.dhidden[r0:r1] = d
        else:
            out.dhidden.index_copy_(0, ids, d.to(out.dhidden.dtype))

    chunks = [(v0, min(V, v0 + width)) for v0 in range(0, V, width)]
    if outer:
        # Vocabulary outer: each dweight chunk sums over every row, then is written once.
        for v0, v1 in chunks:
            for g, (r0, r1) in enumerate(groups):
                del h
                h, ids, row0 = prob.group(r0, r1)
                chunk_of_group(r0, r1, h, ids, row0, v0, v1, v0 == 0, g == 0)
                if needs[0] and v1 == V:  # the group's dhidden has every chunk now
                    scatter(r0, r1, ids, dh_acc[r0:r1])
            if dw_acc is not None:
                out.dweight[v0:v1].copy_(dw_acc[: v1 - v0])
        return
    for g, (r0, r1) in enumerate(groups):
        del h
        h, ids, row0 = prob.group(r0, r1)
        for v0, v1 in chunks:
            chunk_of_group(r0, r1, h, ids, row0, v0, v1, v0 == 0, g == 0)
        if needs[0]:
            scatter(r0, r1, ids, dh_acc[: r1 - r0])

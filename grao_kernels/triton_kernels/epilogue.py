"""The "epilogue" sweep: GEMM1 in Triton writes softmax partials and exp(z - m), not float32 logits.

Per group of R non-ignored rows (R bounded by the memory budget)::

    for each (row block, 128- or 256-wide vocabulary tile):   # gemm1: lse_partials_tma_kernel (Hopper: TMA,
        z = head(hidden[g] @ weight[tile].T + bias[tile])       # persistent) or fused.lse_partials_kernel
        m[tile, rows], s[tile, rows] (, t) = max z, sum exp(z - m) (, entropy sum)
        target_logit[rows] = z[target]                   # from the tile holding it
        P[rows, tile] = exp(z - m)                       # in hidden's dtype: 2 B per logit for bf16/fp16
    lse, logp, entropy = reduce over tiles              # fused.lse_reduce_kernel (skipped given the stats)
    P <- dz = c (onehot - P e^(m - lse)) - c_ent p (z - lse + H), times dz/draw   # dz_kernel, in place
    dhidden[g] = dz @ weight                            # cuBLAS (chunked.group_products), complete per group
    dweight   += dz.T @ hidden[g]                       # cuBLAS, beta = 1, in the weight's dtype
    dbias     += dz.sum(0)

Three GEMMs, each logit computed once, and one streaming pass that reads P
and writes dz over it (e B each way, no float32 logits anywhere). The
statistics-only forward is the same GEMM1 without P. A bf16/fp16 weight's
gradient is always summed in the returned gradient itself (cuBLAS beta = 1,
rounded once per group, as ``settings.triton_dweight_sum = "weight"`` does
for the chunked sweep; that setting does not apply here): nothing V x H is
allocated, except for a 16-bit weight of another dtype than hidden's (the
GEMM cannot add into it), summed in float32 as in the chunked sweep.

z is never stored: where the entropy term or the soft-cap's derivative
needs it, z = log P + m; the target's own z and p = exp(z_t - lse) come
from the float32 target logit, so onehot - p at the target (where the two
nearly cancel) is computed in float32.

Precision of P (what storing exp(z - m) in hidden's dtype costs). P in
(0, 1] is rounded to nearest with unit roundoff u = 2**-8 (bf16), 2**-11
(fp16), 2**-24 (fp32), plus, in fp16 only, an absolute 2**-25 below fp16's
smallest normal 2**-14 (bf16 has float32's exponent range). p = P e^(m - lse)
then has |p^ - p| <= u p (+ 2**-25 in fp16). So each non-target entry of
dz, -c p dz/draw under the plain head, carries a relative error <= u from
P plus the u of its own rounding to hidden's dtype (which every sweep has):
|dz^ - dz| <= 2u |dz| (+ |c| 2**-25 scale / T in fp16), against u for the
sweeps that keep float32 logits; the target entry only u. With the entropy
term, z = log P + m adds an absolute error u to z, so that term's error is
|c_ent| p (u |z - lse + H| + u); with the soft-cap, dz/draw = (1 - th**2)
scale / T with th = z T / cap adds 2 |th| u T / cap relative. dhidden,
dweight and dbias are float32-accumulated sums of dz: dbias_v is off by at
most 2u sum_rows |dz_rv| (plus float32 rounding), which
``test_dz_error_is_within_the_stated_bound`` checks; the oracle
tests hold the three gradients to 2x eager PyTorch's own same-dtype error,
as for the other sweeps.

Arithmetic of the ``grao_loss`` entry at N=16384 computed rows, H=4096, bf16,
1 GiB, on an H100 SXM (the model of ``chunked.py``: ~750 TFLOP/s cuBLAS bf16,
3.35 TB/s; one GEMM 27.2 ms at V=151936 / 46.9 ms at V=262144; three-GEMM
floor 81.6 / 140.7 ms). Rows per group (``workspace``; per row: P 2 V,
float32 dhidden rows 4 H, partials 8 B per row and 128-wide tile, 2 H of
gathered hidden when rows are ignored): R=2928, 6 groups / R=1732, 10 groups
at 1 GiB (``triton_backend.workspace_bytes`` gives the plan; at 4 GiB 2 / 3
groups).

* streaming: the reduce reads 8 B per (row, tile): negligible; dz_kernel
  reads P (and each column's tile max, from L1) and writes dz over it,
  4 B per logit: 3.0 / 5.1 ms;
* GEMM1's epilogue: per 128x128 tile 16384 exps (~0.6 us at 16 per clock)
  and 32 KB of P written (~1.3 us at an SM's share of the bandwidth), ~1.9
  us after a ~24 us main loop at 750 TFLOP/s. A 128x128 tile at 4 stages
  holds 128 KB of shared memory, so one program runs per SM (A100 and H100)
  and nothing overlaps its epilogue: ~8% of GEMM1, 2.2 / 3.8 ms;
* dweight's read-modify-write in bf16 once per group, 4 V H bytes (0.74 /
  1.28 ms per group; 0 to all exposed, point estimate a quarter, as in
  ``chunked.py``): (0-4.5, ~1.1) / (0-12.8, ~3.2) ms;
* dhidden per group as a small-M GEMM (M = R): 1.4-3.3 / 2.3-5.6 ms.

Model, GEMM1 at cuBLAS speed: V=151936: 81.6 + 3.0 + 2.2 + (0-4.5, ~1.1) +
(1.4-3.3) = 88-95 ms, 1.08-1.16x, ~1.10x; V=262144: 140.7 + 5.1 + 3.8 +
(0-12.8, ~3.2) + (2.3-5.6) = 152-168 ms, 1.08-1.19x, ~1.11x.

GEMM1 is one of two kernels with the same outputs and one epilogue
(``fused.tile_outputs``); ``common.tma_gemm1`` (``settings.triton_gemm1``)
picks it per call:

* ``fused.lse_partials_kernel``, a plain ``tl.dot`` tile loop (pointer
  loads, grouped launch order, one program per tile): below compute
  capability 9, for a float32 master weight (its tiles are cast in
  registers), rows that are not a multiple of 16 bytes, or a triton without
  ``tl.make_tensor_descriptor``. Such Triton GEMMs reach ~550-650 TFLOP/s in
  bf16 on an H100, not cuBLAS's ~750: at 600 GEMM1 takes 6.8 / 11.7 ms
  longer and its epilogue is exposed, ~1.19x / ~1.20x.
* ``lse_partials_tma_kernel`` on compute capability >= 9 (Hopper): hidden
  and weight tiles arrive by TMA (device-side descriptors, triton >= 3.4;
  the GPU image has 3.6) into wgmma, a persistent grid of one program per SM
  walks the tiles in the same grouped order, and the tile loop is flattened
  into the H loop (``tl.range(flatten=True)``), so the pipeliner issues the
  next tile's TMA loads while this tile's epilogue runs. The model's
  assumption for it: cuBLAS-like ~700-750 TFLOP/s (most of the 6.8 / 11.7
  ms back) and the epilogue hidden behind the next tile's loads (the 2.2 /
  3.8 ms): 88 / 153 ms, ~1.08x / ~1.09x, within the goal of <= 1.1x. The
  goal needs GEMM1 at ~700 TFLOP/s or more (within ~7% of cuBLAS): at 700,
  ~1.10x / ~1.11x; at 650, ~1.13x / ~1.14x. Not built: warp specialisation
  (a producer warp feeding wgmma consumer warpgroups); triton 3.6 enables
  ``tl.range(warp_specialize=True)`` for Blackwell, and its persistent
  matmul tutorial turns it on only for capability >= 10, so on sm_90 the
  overlap rests on the flattened, pipelined loop alone.

Descriptors: each program builds two (128 B each) in global scratch that
triton asks for at launch through its allocator; ``run`` allocates
``DESCRIPTOR_SCRATCH`` bytes per SM once per sweep (in ``workspace``) and
``gemm1`` hands that buffer to ``triton.set_allocator`` inside a copied
context (triton's allocator is a context variable), so no process-wide
allocator is set, unlike triton's tutorials, which set one for the process.
TMA zero-fills a block's part outside the tensor: the last row block, the
last vocabulary tile and a partial H block read nothing past hidden or the
weight.

Not timed: no GPU was available to this build; every number above is the
model's. Tested under the interpreter (which runs descriptors and the
persistent loop in Python) against the float64 oracle; compiled for sm_90
by the compile check (wgmma, TMA loads, no spills) and never for sm_80. The
GPU check (``benchmarks/gpu/check.py``) runs this mode beside the chunked
and fused ones at the same budget, with the TMA GEMM1 on a Hopper card, and
measures what decides the goal: the epilogue sweep's time over the
three-GEMM floor at V=151936 and 262144, which is mostly this GEMM1's speed
against cuBLAS.

Log-probs forward+backward: the forward writes only statistics (no P), the
backward recomputes GEMM1, so four GEMMs: 4/3 of the floor bounds it from
below (``chunked.py``), ~1.4x here.

Memory (``workspace`` lists every buffer, ``run`` allocates exactly those):
P (e R V), the tile partials (8 or 12 B per row and tile, and the target
logits), the TMA GEMM1's descriptor scratch (``DESCRIPTOR_SCRATCH`` per SM,
66 KB on a 132-SM H100), and ``chunked.group_buffers``' (dhidden rows,
gathered hidden, weight slices for dhidden under a float32 master weight:
GEMM1 casts its weight tiles itself).
"""

from __future__ import annotations

import contextvars

import torch
import triton
import triton.language as tl

from ..settings import settings
from . import chunked, fused
from .common import (
    INTERPRETER_PROGRAMS,
    Problem,
    Sizes,
    Workspace,
    dot_flags,
    dz_scale,
    head_grad_from_z,
    interpreting,
    largest_rows,
    launch,
    logits_grad_p,
    parse_config,
    tile_coords,
    tma_gemm1,
    to_store,
)

# One config, never autotuned: the kernel overwrites its input, so an
# autotuner's repeated trials would read gradients as P. A streaming kernel.
CONFIGS = [triton.Config({"BLOCK_V": 2048}, num_warps=8, num_stages=2)]
INTERPRETER_CONFIG = {"BLOCK_V": 1024}

# The sweep sums a 16-bit weight's gradient in the gradient itself (see the module docstring).
DWEIGHT_SUM = "weight"


# Global scratch the TMA GEMM1 may ask for per program: a descriptor is 128 B (the kernel makes two;
# room for four). ``run`` allocates it once per sweep and hands it out through triton's allocator.
DESCRIPTOR_SCRATCH = 4 * 128


@triton.heuristics(
    {
        "HAS_BIAS": lambda a: a["bias_ptr"] is not None,
        "HAS_SOFTCAP": lambda a: a["softcap"] is not None,
        "HAS_ROWS": lambda a: a["rows_ptr"] is not None,
        "ENTROPY": lambda a: a["part_t_ptr"] is not None,
        "STORE_P": lambda a: a["p_ptr"] is not None,
    }
)
@triton.jit
def lse_partials_tma_kernel(
    hidden_ptr,  # (R, H) bf16/fp16, row stride stride_h (16-byte aligned base and rows)
    weight_ptr,  # (V, H) hidden's dtype, row stride stride_w (16-byte aligned base and rows)
    bias_ptr,  # (V,) or None
    targets_ptr,  # (N,) int64
    rows_ptr,  # (R,) int64 ids or None (ids row0 .. row0 + R)
    part_m_ptr,  # (tiles, R) float32 out: tile max
    part_s_ptr,  # (tiles, R) float32 out: sum exp(z - max)
    part_t_ptr,  # (tiles, R) float32 out: sum exp(z - max)(z - max), or None
    tgt_logit_ptr,  # (R,) float32 out: z of the target
    p_ptr,  # (R, V) out, row stride stride_p: exp(z - tile max), or None
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
    NUM_PROGRAMS: tl.constexpr,  # the persistent grid's size bound (the SM count)
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    """``fused.lse_partials_kernel``'s outputs from a persistent grid whose operands arrive by TMA.

    Each program walks the tiles pid, pid + NUM_PROGRAMS, ... in the grouped
    order; the tile loop is flattened into the H loop, so the pipeliner issues
    the next tile's first TMA loads while this tile's epilogue (``fused.tile_outputs``)
    runs. TMA zero-fills a block's part past the tensor's bounds (rows past R,
    columns past V, past H): nothing outside hidden or weight is read.
    """
    h_desc = tl.make_tensor_descriptor(hidden_ptr, shape=[R, H], strides=[stride_h, 1], block_shape=[BLOCK_N, BLOCK_H])
    w_desc = tl.make_tensor_descriptor(weight_ptr, shape=[V, H], strides=[stride_w, 1], block_shape=[BLOCK_V, BLOCK_H])
    tiles = tl.cdiv(R, BLOCK_N) * tl.cdiv(V, BLOCK_V)
    for tile in tl.range(tl.program_id(0), tiles, NUM_PROGRAMS, flatten=True):
        pid_n, pid_v = tile_coords(tile, R, V, BLOCK_N, BLOCK_V, GROUP_N)
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            a = h_desc.load([pid_n * BLOCK_N, h0])
            b = w_desc.load([pid_v * BLOCK_V, h0])
            if UPCAST_DOT:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b.T, acc, input_precision=DOT_PRECISION)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_v, mask=offs_v < V, other=0.0).to(tl.float32)[None, :]
        fused.tile_outputs(
            acc, offs_n, offs_v, pid_v, targets_ptr, rows_ptr, part_m_ptr, part_s_ptr, part_t_ptr, tgt_logit_ptr,
            p_ptr, row0, R, V, stride_p, scale, inv_temp, softcap,
            UPCAST_DOT, HAS_SOFTCAP, HAS_ROWS, ENTROPY, STORE_P, BLOCK_N, BLOCK_V,
        )  # fmt: skip


# TMA moves boxes of at most 256 elements per dimension.
MAX_TMA_BOX = 256


def _tma_ready(*tensors) -> bool:
    """Whether TMA descriptors can address these 2-D tensors (16-byte aligned base and row stride, unit columns)
    in the blocks of a pinned ``settings.triton_config`` (the interpreter has no box limit)."""
    if settings.triton_config and not interpreting():
        pinned = parse_config(settings.triton_config)
        if any(pinned.get(k, 0) > MAX_TMA_BOX for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H")):
            return False
    return all(
        t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 and t.stride(1) == 1 for t in tensors
    )


def gemm1(prob: Problem, h, ids, row0, r, parts, tgt_logit, p, scratch) -> dict:
    """``fused.forward_tiles`` for the sweep: the persistent TMA kernel where ``common.tma_gemm1`` takes it and
    the operands suit TMA, else fused's pointer-load kernel. ``scratch``: the descriptors' global memory
    (``DESCRIPTOR_SCRATCH`` per program; None under the interpreter, which needs none). Returns the block sizes."""
    N, V, H = prob.shape
    if not (tma_gemm1(h.device, prob.dtype, prob.weight.dtype, H) and _tma_ready(h, prob.weight)):
        return fused.forward_tiles(prob, h, ids, row0, r, parts, tgt_logit, p)
    programs = INTERPRETER_PROGRAMS if scratch is None else scratch.numel() // DESCRIPTOR_SCRATCH
    args = dict(
        hidden_ptr=h, weight_ptr=prob.weight, bias_ptr=prob.bias, targets_ptr=prob.targets, rows_ptr=ids,
        part_m_ptr=parts[0], part_s_ptr=parts[1], part_t_ptr=parts[2] if len(parts) > 2 else None,
        tgt_logit_ptr=tgt_logit, p_ptr=p, row0=row0, R=r, V=V, H=H, stride_h=h.stride(0),
        stride_w=prob.weight.stride(0), stride_p=0 if p is None else p.stride(0), **prob.head_args(),
        **dot_flags(prob.dtype), NUM_PROGRAMS=programs,
    )  # fmt: skip

    def grid(meta):
        return (min(programs, triton.cdiv(r, meta["BLOCK_N"]) * triton.cdiv(V, meta["BLOCK_V"])),)

    def allocate(size: int, alignment: int, stream):
        # Triton asks for (grid size) x (scratch per program) bytes at each launch.
        if scratch is None or size > scratch.numel():
            raise RuntimeError(
                f"the TMA GEMM1 asked for {size} bytes of descriptor scratch, more than the "
                f"{0 if scratch is None else scratch.numel()} its sweep allocated (DESCRIPTOR_SCRATCH per program)"
            )
        return scratch

    def run_launch():
        # Triton's tutorials set a process-wide allocator (triton.set_allocator); it is a context variable,
        # so setting it inside a copied context leaves the caller's allocator as it was.
        triton.set_allocator(allocate)
        return launch(lse_partials_tma_kernel, fused.FORWARD_CONFIGS, fused.INTERPRETER_CONFIG, grid, args)

    return contextvars.copy_context().run(run_launch)


@triton.heuristics(
    {
        "HAS_SOFTCAP": lambda a: a["softcap"] is not None,
        "HAS_ROWS": lambda a: a["rows_ptr"] is not None,
        "HAS_ENT_COEF": lambda a: a["ent_coef_ptr"] is not None,
    }
)
@triton.jit
def dz_kernel(
    p_ptr,  # (R, V) exp(z - tile max) in hidden's dtype, row stride stride_p; overwritten with dz
    part_m_ptr,  # (tiles, R) float32 tile maxima (row stride R)
    tgt_logit_ptr,  # (R,) float32 z of the target (NaN for a target outside [0, V))
    targets_ptr,  # (N,) int64
    rows_ptr,  # (R,) int64 row ids of the group, or None: ids row0 .. row0 + R
    coef_ptr,  # (N,) float32
    ent_coef_ptr,  # (N,) float32 or None
    lse_ptr,  # (N,) float32
    ent_ptr,  # (N,) float32 (read with HAS_ENT_COEF)
    row0,
    R,
    V,
    stride_p,
    scale,
    inv_temp,
    softcap,  # float or None
    dz_scale,  # float: dz is stored times this (see common.dz_scale)
    TILE_V: tl.constexpr,  # vocabulary tile of the GEMM1 that wrote P and part_m
    INTERPRET: tl.constexpr,  # round-to-nearest casts under the interpreter (see common.to_store)
    HAS_SOFTCAP: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    HAS_ENT_COEF: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    i = tl.program_id(0)
    if HAS_ROWS:
        row = tl.load(rows_ptr + i)
    else:
        row = row0 + i
    row = row.to(tl.int64)
    one = tl.zeros([1], tl.int64)  # offset 0 that makes each per-row load below a (1,) vector
    # The target is only compared with column ids, never used as an address.
    tgt = tl.load(targets_ptr + row + one)
    lse = tl.load(lse_ptr + row + one)
    c = tl.load(coef_ptr + row + one)
    ec = c * 0.0
    ent = c * 0.0
    if HAS_ENT_COEF:
        ec = tl.load(ent_coef_ptr + row + one)
        ent = tl.load(ent_ptr + row + one)
    z_t = tl.load(tgt_logit_ptr + i + one)
    p_t = tl.exp(z_t - lse)  # the target's p from its float32 logit (onehot - p cancels there)
    p_row = p_ptr + i.to(tl.int64) * stride_p
    offs = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        live = (cols < V)[None, :]
        pt = tl.load(p_row + cols[None, :], mask=live, other=0.0).to(tl.float32)
        m = tl.load(part_m_ptr + (cols // TILE_V).to(tl.int64)[None, :] * R + i, mask=live, other=0.0)
        onehot = (cols[None, :] == tgt[:, None]) & live
        p = tl.where(onehot, p_t[:, None], pt * tl.exp(m - lse[:, None]))  # 0 for P = 0 or a -inf tile
        z = pt  # not read: z is needed only for the entropy term and the soft-cap's derivative
        dz_draw = tl.zeros_like(pt) + scale * inv_temp
        if HAS_SOFTCAP or HAS_ENT_COEF:
            z = tl.where(onehot, z_t[:, None], tl.log(pt) + m)
            # Where p = 0 (z = -inf) the gradient is 0: keep -inf out of the head's derivative.
            dz_draw = head_grad_from_z(tl.where(p > 0, z, 0.0), scale, inv_temp, softcap, HAS_SOFTCAP)
        g = logits_grad_p(p, z, dz_draw, onehot, c, ec, lse, ent, HAS_ENT_COEF) * dz_scale
        # Each element is read and written by the same thread (one layout): no barrier needed in place.
        tl.store(p_row + cols[None, :], to_store(g, p_ptr.dtype.element_ty, INTERPRET), mask=live)


def workspace(
    sizes: Sizes, rows: int, *, grad: bool, entropy: bool, needs=(True, True, True), forward: bool = True
) -> Workspace:
    """Every buffer ``run`` allocates for groups of ``rows`` non-ignored rows (bytes; see ``Workspace``).

    Persistent: P (e R V, with ``grad``), the tile partials (max and sum-exp,
    with the entropy sum when ``entropy`` is computed by this sweep's forward:
    4 B each per row and tile), the target logits (4 R), the TMA GEMM1's
    descriptor scratch (``sizes.descriptor_programs`` > 0) and
    ``chunked.group_buffers``' (the weight slices only for dhidden).
    """
    R = min(rows, sizes.n)
    k = 3 if entropy and forward else 2
    persistent = {"tile partials": 4 * k * fused.max_tiles(sizes) * R, "target logits": 4 * R}
    if sizes.descriptor_programs:
        persistent["TMA descriptor scratch"] = DESCRIPTOR_SCRATCH * sizes.descriptor_programs
    if grad:
        persistent["exp(z - m) tiles"] = sizes.e * R * sizes.V
    more, transient = chunked.group_buffers(
        sizes, rows, grad=grad, needs=needs, dweight_sum=DWEIGHT_SUM, weight_slices_for_logits=False
    )
    return Workspace({**persistent, **more}, transient)


def rows_per_group(sizes: Sizes, budget: int, grad: bool, entropy: bool, needs=(True, True, True), forward=True) -> int:
    """Rows per group so ``workspace`` fits 90% of ``budget`` bytes (0 when not even 16 rows fit)."""
    return largest_rows(
        sizes.n,
        int(0.9 * budget),
        lambda r: workspace(sizes, r, grad=grad, entropy=entropy, needs=needs, forward=forward),
    )


def run(prob: Problem, out, *, rows: int, entropy: bool, coef, ent_coef, stats_given: bool, needs):
    """One sweep over the non-ignored rows in groups of ``rows``; fills ``out`` (see ``Outputs`` in the backend),
    whose gradients the backend has allocated; allocates exactly ``workspace``."""
    N, V, H = prob.shape
    grad = coef is not None
    dev = prob.hidden.device
    R = min(rows, prob.n)
    ent = entropy or ent_coef is not None
    parts = torch.empty(3 if ent and not stats_given else 2, fused.max_tiles(prob.sizes()) * R,
                        dtype=torch.float32, device=dev)  # fmt: skip
    tgt_logit = torch.empty(R, dtype=torch.float32, device=dev)
    p_buf = torch.empty(R, V, dtype=prob.dtype, device=dev) if grad else None
    programs = prob.sizes().descriptor_programs
    scratch = torch.empty(DESCRIPTOR_SCRATCH * programs, dtype=torch.uint8, device=dev) if programs else None
    dh_rows, dweight = chunked.gradient_accumulators(prob, out, rows, needs, DWEIGHT_SUM) if grad else (None, None)
    scale = dz_scale(prob, coef, ent_coef) if grad else 1.0
    h = None
    for g, r0 in enumerate(range(0, prob.n, rows)):
        r1 = min(prob.n, r0 + rows)
        r = r1 - r0
        del h  # the previous group's gathered rows go before the next are gathered
        h, ids, row0 = prob.group(r0, r1)
        # NaN stays where no tile holds the target: one outside [0, V) (validate=False) gives logp = NaN.
        t_logit = tgt_logit[:r].fill_(float("nan"))
        p = p_buf[:r] if grad else None
        meta = gemm1(prob, h, ids, row0, r, parts, t_logit, p, scratch)
        if not stats_given:
            fused.reduce_tiles(out, ids, row0, r, parts, t_logit, triton.cdiv(V, meta["BLOCK_V"]), ent)
        if not grad:
            continue
        args = dict(
            p_ptr=p, part_m_ptr=parts[0], tgt_logit_ptr=t_logit, targets_ptr=prob.targets, rows_ptr=ids,
            coef_ptr=coef, ent_coef_ptr=ent_coef, lse_ptr=out.lse, ent_ptr=out.entropy, row0=row0, R=r, V=V,
            stride_p=p.stride(0), **prob.head_args(), dz_scale=scale, TILE_V=meta["BLOCK_V"],
            INTERPRET=interpreting(),
        )  # fmt: skip
        launch(dz_kernel, CONFIGS, INTERPRETER_CONFIG, lambda meta, r=r: (r,), args, key=("V",))
        chunked.group_products(prob, out, p, h, ids, r0, r1, first=g == 0, dh_rows=dh_rows, dweight=dweight,
                               scale=scale, needs=needs)  # fmt: skip
    if grad and dweight is not out.dweight:
        out.dweight.copy_(dweight)

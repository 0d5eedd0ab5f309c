"""The "chunked" sweep: cuBLAS writes a row group's logits, one Triton row kernel turns them into the gradient in place.

Per group of R non-ignored rows (R bounded by the memory budget)::

    L   = hidden[g].float() @ weight.T                    # cuBLAS, float32 out, (R, V) buffer
    z   = head(L + bias)                                   # row kernel: max / lse, target, entropy ...
    L  <- d loss / d raw  (in hidden's dtype)              # ... and the logits gradient, written over L
    dhidden[g] = L @ weight                                # cuBLAS, complete per group (the whole V)
    dweight   += L.T @ hidden[g]                           # cuBLAS, beta = 1, float32 (or see dweight_sum)
    dbias     += L.sum(0)

Three GEMMs and one read-modify pass over the logits, nothing recomputed.
For a forward (no coefficients) the row kernel only writes the statistics.
bfloat16/float16 gradients are written into the first half of each float32
row's bytes, so the buffer is reused without a second one: element j of the
gradient lands on bytes the row kernel has already read (2j < 4j), and a
barrier between each block's load and store keeps a faster warp from
overwriting the first block before a slower one has read it.

Arithmetic of the ``grao_loss`` entry (coefficients known, one sweep) at
N=16384 computed rows, H=4096, bf16, on an H100 SXM taken as ~750 TFLOP/s
for cuBLAS bf16 GEMMs and 3.35 TB/s (the model of ``fused.py``). One GEMM
is 2 N V H: 20.4 TFLOP = 27.2 ms at V=151936, 35.2 TFLOP = 46.9 ms at
V=262144; the three-GEMM floor is 81.6 / 140.7 ms. Costs beyond the floor:

* streaming (the row kernel): the float32 logits read twice, the gradient
  written once, 10 B per logit that no GEMM hides: 7.4 ms (2.5e9 logits)
  / 12.8 ms (4.3e9). GEMM1's float32 write (4 B, not 2) and the two reads of
  dz run inside compute-bound GEMMs and are not counted.
* dweight's read-modify-write, once per row group: 8 V H bytes per group with
  the float32 accumulator, 4 V H summed in the bf16 gradient itself
  (``dweight_sum="weight"``). Its GEMM does 2 R V H FLOPs per 4 V H bytes,
  R/2 FLOP/B against the H100's ridge of ~224: with R ~ 1500 the traffic is
  ~30% of the GEMM's time, hidden as far as cuBLAS overlaps its epilogue
  with other tiles' main loops (bounds below: none to all of it exposed;
  point estimates: a quarter).
* dhidden per group is a small-M GEMM (M = R): 5-12% slower than one over N.

Rows per group from the budget (4 V + 4 H bytes each, 90% usable): at 1 GiB
R=1547, 11 groups (V=151936) / R=906, 19 groups (V=262144): ``workspace_bytes``.

The plans, grao_loss at 1 GiB (range, point estimate), V=151936 / V=262144:

* fused (``fused.py``): ~1.6x / ~1.6x;
* chunked with the float32 dweight sum: does not fit (its accumulator alone
  is 2.3 / 4 GiB), so "auto" runs fused;
* chunked, ``dweight_sum="weight"``: 1.11-1.23x, ~1.14x / 1.11-1.30x, ~1.16x;
* (at 4 GiB, chunked with the float32 sum: 1.11-1.28x, ~1.16x / does not fit).

What reaches <= 1.1x is built as the "epilogue" sweep (``epilogue.py``, by
name): GEMM1 in Triton writes each (row, tile)'s softmax partials and
exp(z - m) in bf16 instead of these float32 logits, so twice the rows per
group and a 4 B-per-logit streaming pass; its docstring carries the
arithmetic (~1.10x / ~1.11x with GEMM1 at cuBLAS speed and its epilogue
exposed, ~1.19x / ~1.20x at 600 TFLOP/s: the speed of that one kernel
decides whether the goal is met) and the error bound of the bf16 rounding.
Larger budgets help this sweep through R only (at 4 GiB and V=151936, with
the float32 dweight sum, which fits there: ~1.16x).

Log-probs forward+backward (coefficients known only in the backward): the
backward recomputes GEMM1, four GEMMs, so 4/3 = 1.33x of the three-GEMM
floor is a lower bound for any sweep that does not keep the N x V logits
(which no budget independent of V holds); this sweep: ~1.44-1.56x at 1 GiB
(V=151936), the epilogue sweep ~1.4x. The <= 1.3x goal for that
entry is out of reach by construction.

Memory (``workspace`` lists every buffer, ``run`` allocates exactly those):
the group's float32 logits (4 R V) and dhidden rows (4 R H), its gathered
hidden rows and, when a bfloat16/float16 weight's gradient is summed over
several groups, a float32 V x H accumulator: 2.3 GiB at V=151936, H=4096
(4 GiB at V=262144), counted in the budget. Under the default 1 GiB the
chunked sweep therefore runs only where one group holds every row, and
"auto" takes the fused sweep otherwise, unless ``settings.triton_dweight_sum``
is "weight": each group's product is then added into the returned bf16/fp16
gradient by the GEMM (rounded once per group: 1.1x, 1.7x, 2.4x eager
bf16's own dweight error at 2, 10, 20 groups, measured at small sizes), and
nothing V x H is allocated. A float32 master weight's gradient
is its own accumulator; that weight is cast to hidden's dtype slice by slice
(at most ``SLICE_BYTES`` at once, one more read of the weight per group),
never as a whole V x H copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    SLICE_BYTES,
    Problem,
    Sizes,
    Workspace,
    apply_head,
    dz_scale,
    interpreting,
    largest_rows,
    launch,
    logits_grad,
    lse_and_entropy,
    merge_lse,
    mm_into,
    mm_temp_bytes,
    to_store,
)

# A row group below this many rows makes the GEMMs inefficient; "auto"
# then prefers the fused sweep.
MIN_ROWS = 256

# One config, never autotuned: the kernel overwrites its input, so an
# autotuner's repeated trials would read gradients as logits. A streaming
# kernel: wide blocks, 8 warps.
CONFIGS = [triton.Config({"BLOCK_V": 2048}, num_warps=8, num_stages=2)]
INTERPRETER_CONFIG = {"BLOCK_V": 1024}


@triton.jit
def _head_block(l_row, bias_ptr, cols, V, scale, inv_temp, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """(z, dz/draw) of the row's columns ``cols`` (< V), shaped (1, BLOCK_V), from the stored raw logits."""
    raw = tl.load(l_row + cols, mask=cols < V, other=0.0)[None, :]
    if HAS_BIAS:
        raw += tl.load(bias_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    return apply_head(raw, scale, inv_temp, softcap, HAS_SOFTCAP)


@triton.heuristics(
    {
        "HAS_BIAS": lambda a: a["bias_ptr"] is not None,
        "HAS_SOFTCAP": lambda a: a["softcap"] is not None,
        "HAS_ROWS": lambda a: a["rows_ptr"] is not None,
        "ENTROPY": lambda a: a["ent_ptr"] is not None,
        "GRAD": lambda a: a["coef_ptr"] is not None,
        "HAS_ENT_COEF": lambda a: a["ent_coef_ptr"] is not None,
    }
)
@triton.jit
def rows_kernel(
    logits_ptr,  # (R, V) float32 raw logits h W^T of the group, row stride stride_l
    dz_ptr,  # same bytes as logits_ptr, in hidden's dtype, row stride stride_dz; written with GRAD
    bias_ptr,  # (V,) or None
    targets_ptr,  # (N,) int64
    rows_ptr,  # (R,) int64 row ids of the group, or None: ids row0 .. row0 + R
    coef_ptr,  # (N,) float32 or None (statistics only)
    ent_coef_ptr,  # (N,) float32 or None
    logp_ptr,  # (N,) float32 out, unless STATS_GIVEN
    lse_ptr,  # (N,) float32 out, or in with STATS_GIVEN
    ent_ptr,  # (N,) float32 out (in with STATS_GIVEN), or None
    row0,
    V,
    stride_l,
    stride_dz,
    scale,
    inv_temp,
    softcap,  # float or None
    dz_scale,  # float: the gradient is stored times this (see common.dz_scale)
    STATS_GIVEN: tl.constexpr,
    INTERPRET: tl.constexpr,  # round-to-nearest casts under the interpreter (see common.to_store)
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    ENTROPY: tl.constexpr,
    GRAD: tl.constexpr,
    HAS_ENT_COEF: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    i = tl.program_id(0)
    if HAS_ROWS:
        row = tl.load(rows_ptr + i)
    else:
        row = row0 + i
    row = row.to(tl.int64)
    tgt = tl.load(targets_ptr + row + tl.zeros([1], tl.int64))  # (1,)
    l_row = logits_ptr + i.to(tl.int64) * stride_l
    offs = tl.arange(0, BLOCK_V)

    if STATS_GIVEN:
        lse = tl.load(lse_ptr + row + tl.zeros([1], tl.int64))
        ent = lse * 0.0
        if HAS_ENT_COEF:
            ent = tl.load(ent_ptr + row + tl.zeros([1], tl.int64))
    else:
        m = tl.full([1], float("-inf"), tl.float32)
        s = tl.zeros([1], tl.float32)
        t = tl.zeros([1], tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            z, _ = _head_block(l_row, bias_ptr, cols, V, scale, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP)
            z = tl.where((cols < V)[None, :], z, float("-inf"))
            m, s, t = merge_lse(m, s, t, z, 1.0, 0.0, ENTROPY)
        lse, ent = lse_and_entropy(m, s, t)
        # The target's logit: one element of the row, through the same head. A
        # target outside [0, V) (possible with validate=False) reads nothing
        # and gives logp = NaN.
        in_vocab = (tgt >= 0) & (tgt < V)
        raw_t = tl.load(l_row + tgt, mask=in_vocab, other=0.0)
        if HAS_BIAS:
            raw_t += tl.load(bias_ptr + tgt, mask=in_vocab, other=0.0).to(tl.float32)
        z_t, _ = apply_head(raw_t, scale, inv_temp, softcap, HAS_SOFTCAP)
        tl.store(logp_ptr + row + tl.zeros([1], tl.int64), tl.where(in_vocab, z_t - lse, float("nan")))
        tl.store(lse_ptr + row + tl.zeros([1], tl.int64), lse)
        if ENTROPY:
            tl.store(ent_ptr + row + tl.zeros([1], tl.int64), ent)

    if GRAD:
        c = tl.load(coef_ptr + row + tl.zeros([1], tl.int64))
        ec = c * 0.0
        if HAS_ENT_COEF:
            ec = tl.load(ent_coef_ptr + row + tl.zeros([1], tl.int64))
        dz_row = dz_ptr + i.to(tl.int64) * stride_dz
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            z, dz_draw = _head_block(l_row, bias_ptr, cols, V, scale, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP)
            onehot = (cols[None, :] == tgt[:, None]) & (cols < V)[None, :]
            g = logits_grad(z, dz_draw, onehot, c, ec, lse, ent, HAS_ENT_COEF) * dz_scale
            # Every warp has read this block before any overwrites it (see the module docstring).
            tl.debug_barrier()
            tl.store(dz_row + cols[None, :], to_store(g, dz_ptr.dtype.element_ty, INTERPRET), mask=(cols < V)[None, :])


def weight_slice_rows(sizes: Sizes) -> int:
    """Vocabulary rows per slice of a weight cast to hidden's dtype (a float32 master weight under bf16
    activations): the cast never copies more than ``SLICE_BYTES`` at once, never the whole V x H."""
    return min(sizes.V, max(1, SLICE_BYTES // (sizes.e * sizes.H)))


# How a bfloat16/float16 weight's gradient is summed over several row groups
# (settings.triton_dweight_sum): in a float32 V x H accumulator, or in the
# returned gradient itself, rounded to the weight's dtype once per group.
DWEIGHT_SUMS = ("float32", "weight")


def float32_dweight_sum(sizes: Sizes, groups: int, dw: bool, dweight_sum: str) -> bool:
    """Whether ``run`` sums dweight in a float32 V x H accumulator: several groups add to a 16-bit weight's
    gradient and ``dweight_sum`` is "float32" (or the weight's dtype is not hidden's, which the GEMM
    cannot accumulate into)."""
    if not dw or groups <= 1 or sizes.weight_dtype == torch.float32:
        return False
    return dweight_sum == "float32" or sizes.weight_dtype != sizes.dtype


def workspace(sizes: Sizes, rows: int, *, grad: bool, needs=(True, True, True), dweight_sum="float32") -> Workspace:
    """Every buffer ``run`` allocates for groups of ``rows`` non-ignored rows (bytes; see ``Workspace``).

    Persistent: the group's float32 logits (4 R V) and ``group_buffers``'.
    Transient, one at a time: ``group_buffers``', the weight slice also for
    the logits' GEMM.
    """
    persistent, transient = group_buffers(
        sizes, rows, grad=grad, needs=needs, dweight_sum=dweight_sum, weight_slices_for_logits=True
    )
    return Workspace({"logits": 4 * min(rows, sizes.n) * sizes.V, **persistent}, transient)


def group_buffers(sizes: Sizes, rows: int, *, grad: bool, needs, dweight_sum: str, weight_slices_for_logits: bool):
    """(persistent, transient) bytes by name of what a sweep over groups of ``rows`` rows allocates besides its
    GEMM1 output, for the cuBLAS gradient products of ``group_products`` (this sweep's and the epilogue sweep's).

    Persistent: the group's float32 dhidden rows (4 R H), its gathered hidden
    rows (e R H, when rows are ignored) and, when ``float32_dweight_sum``, the
    float32 dweight accumulator (4 V H). Otherwise the returned gradient is
    the accumulator (one group; a float32 weight; or ``dweight_sum="weight"``:
    each group's product is added into the bf16/fp16 gradient by the GEMM,
    beta = 1). Transient, one at a time: a slice of the weight cast to
    hidden's dtype (for dhidden, and for the logits when
    ``weight_slices_for_logits``), dbias's per-group sum (4 V), the rounded
    dhidden rows of a gathered group, mm_into's float32 temporary.
    """
    R, G = min(rows, sizes.n), -(-sizes.n // max(rows, 1))
    V, H, e = sizes.V, sizes.H, sizes.e
    dh, dw, db = (grad and bool(x) for x in needs)
    cast = sizes.weight_dtype != sizes.dtype
    persistent = {}
    if dh:
        persistent["dhidden rows"] = 4 * R * H
    if sizes.gathered:
        persistent["gathered hidden"] = e * R * H
    if float32_dweight_sum(sizes, G, dw, dweight_sum):
        persistent["dweight accumulator"] = 4 * V * H
    transient = {}
    if cast and (dh or weight_slices_for_logits):
        # dhidden accumulates slice by slice: mm_into's temporary beside the slice.
        transient["weight slice"] = e * weight_slice_rows(sizes) * H + (mm_temp_bytes(sizes, R, H, True) if dh else 0)
    if db:
        transient["dbias sum"] = 4 * V
    if dh and sizes.gathered and sizes.dtype != torch.float32:
        transient["dhidden scatter"] = e * R * H
    if dw and (sizes.weight_dtype == torch.float32 or "dweight accumulator" in persistent):
        transient["dweight gemm temporary"] = mm_temp_bytes(sizes, V, H, G > 1)
    return persistent, {k: v for k, v in transient.items() if v}


def rows_per_group(sizes: Sizes, budget: int, grad: bool, needs=(True, True, True), dweight_sum="float32") -> int:
    """Rows per group so ``workspace`` fits 90% of ``budget`` bytes (0 when not even 16 rows fit); the rest
    stays free for the call's O(N) vectors and allocator rounding."""
    return largest_rows(
        sizes.n, int(0.9 * budget), lambda r: workspace(sizes, r, grad=grad, needs=needs, dweight_sum=dweight_sum)
    )


def _weight_mm(out, a, weight, dtype, *, transpose: bool, accumulate: bool = False, alpha: float = 1.0) -> None:
    """``out (+)= alpha a @ weight.T`` (transpose) or ``a @ weight``, the weight cast to ``dtype`` slice by slice."""
    if weight.dtype == dtype:
        mm_into(out, a, weight.T if transpose else weight, accumulate=accumulate, alpha=alpha)
        return
    step = max(1, SLICE_BYTES // (weight.shape[1] * torch.empty(0, dtype=dtype).element_size()))
    for v0 in range(0, weight.shape[0], step):
        w = weight[v0 : v0 + step].to(dtype)
        if transpose:
            mm_into(out[:, v0 : v0 + step], a, w.T, accumulate=accumulate, alpha=alpha)
        else:
            mm_into(out, a[:, v0 : v0 + step], w, accumulate=accumulate or v0 > 0, alpha=alpha)
        del w


def run(prob: Problem, out, *, rows: int, entropy: bool, coef, ent_coef, stats_given: bool, needs, dweight_sum):
    """One sweep over the non-ignored rows in groups of ``rows``; fills ``out`` (see ``Outputs`` in the backend),
    whose gradients the backend has allocated; allocates exactly ``workspace``."""
    N, V, H = prob.shape
    dtype = prob.dtype
    grad = coef is not None
    buf = torch.empty(min(rows, prob.n), V, dtype=torch.float32, device=prob.hidden.device)
    dh_rows, dweight = gradient_accumulators(prob, out, rows, needs, dweight_sum) if grad else (None, None)
    scale = dz_scale(prob, coef, ent_coef) if grad else 1.0
    h = None
    for g, r0 in enumerate(range(0, prob.n, rows)):
        r1 = min(prob.n, r0 + rows)
        del h  # the previous group's gathered rows go before the next are gathered
        h, ids, row0 = prob.group(r0, r1)
        logits = buf[: r1 - r0]
        _weight_mm(logits, h, prob.weight, dtype, transpose=True)
        # float32 inputs: the gradient overwrites the logits element for element;
        # bf16/fp16: it takes the first half of each row's bytes (row stride 2V).
        dz = logits if dtype == torch.float32 else logits.view(dtype)[:, :V]
        args = dict(
            logits_ptr=logits, dz_ptr=dz, bias_ptr=prob.bias, targets_ptr=prob.targets, rows_ptr=ids,
            coef_ptr=coef, ent_coef_ptr=ent_coef if grad else None,
            logp_ptr=out.logp, lse_ptr=out.lse, ent_ptr=out.entropy if (entropy or ent_coef is not None) else None,
            row0=row0, V=V, stride_l=logits.stride(0), stride_dz=dz.stride(0), **prob.head_args(),
            dz_scale=scale, STATS_GIVEN=stats_given, INTERPRET=interpreting(),
        )  # fmt: skip
        launch(rows_kernel, CONFIGS, INTERPRETER_CONFIG, lambda meta, r=r1 - r0: (r,), args, key=("V",))
        if grad:
            group_products(prob, out, dz, h, ids, r0, r1, first=g == 0, dh_rows=dh_rows, dweight=dweight,
                           scale=scale, needs=needs)  # fmt: skip
    if grad and dweight is not out.dweight:
        out.dweight.copy_(dweight)


def gradient_accumulators(prob: Problem, out, rows: int, needs, dweight_sum: str):
    """(float32 dhidden rows of a group or None, the tensor dweight is summed in) of ``group_buffers``: the
    float32 V x H accumulator when ``float32_dweight_sum``, else ``out.dweight`` itself. A caller whose
    accumulator is not ``out.dweight`` copies it there after the last group."""
    N, V, H = prob.shape
    dev = prob.hidden.device
    dh_rows = torch.empty(min(rows, prob.n), H, dtype=torch.float32, device=dev) if needs[0] else None
    groups = -(-prob.n // max(rows, 1))
    if float32_dweight_sum(prob.sizes(), groups, bool(needs[1]), dweight_sum):
        return dh_rows, torch.empty(V, H, dtype=torch.float32, device=dev)
    return dh_rows, out.dweight


def group_products(prob: Problem, out, dz, h, ids, r0: int, r1: int, *, first, dh_rows, dweight, scale, needs):
    """The cuBLAS products of one group's logits gradient ``dz`` ((r, V), stored times ``scale``): its dhidden
    rows (complete: the whole V), its share of dweight (added into ``dweight`` unless ``first``) and of dbias."""
    dtype = prob.dtype
    if needs[0]:
        d = dh_rows[: r1 - r0]
        _weight_mm(d, dz, prob.weight, dtype, transpose=False, alpha=1.0 / scale)
        if ids is None:
            out.dhidden[r0:r1] = d
        else:
            out.dhidden.index_copy_(0, ids, d.to(out.dhidden.dtype))
    if needs[1]:
        mm_into(dweight, dz.T, h, accumulate=not first, alpha=1.0 / scale)
    if needs[2]:
        out.dbias.add_(dz.sum(0, dtype=torch.float32), alpha=1.0 / scale)

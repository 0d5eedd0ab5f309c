"""Pieces shared by the sweeps (``chunked.py``, ``fused.py``, ``epilogue.py``): ``@triton.jit`` maths, launch helper.

The jit helpers are inlined by Triton, so each formula below is written once:
the head (scale, soft-cap, temperature) and its derivative, the online
log-sum-exp with its entropy term, and the logits gradient of the contract in
``grao_kernels/backends/__init__.py``. ``launch`` picks a kernel's config
(``settings.triton_config``, the interpreter's small config, else Triton's
autotuner).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..settings import settings


def interpreting() -> bool:
    """Whether kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, read when triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(device: torch.device) -> str | None:
    """None when the kernels can run on tensors of ``device``, else why not."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "PyTorch sees no CUDA device"
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            # bfloat16 tl.dot and the tile configs assume Ampere or newer.
            return f"its kernels need compute capability 8.0 or newer, this GPU has {major}.{minor}"
        return None
    if device.type == "cpu":
        if interpreting():
            return None
        return (
            "its kernels need CUDA tensors (CPU tensors run only under the Triton interpreter, "
            "enabled by setting TRITON_INTERPRET=1 before triton is imported)"
        )
    return f"its kernels run on CUDA tensors, not {device.type}"


def check_device(first: torch.Tensor, *others) -> None:
    """ValueError unless the kernels can run on ``first``'s device and every other tensor (or None) is there too."""
    dev = first.device
    reason = unavailable_reason(dev)
    if reason is not None:
        raise ValueError(f"the triton backend cannot run on {dev} tensors: {reason}")
    for t in others:
        if t is not None and t.device != dev:
            raise ValueError(f"all inputs must be on {dev}, got one on {t.device}")


def configs_fp32(wide_warps: int = 4, **extra):
    """Autotuning configs for float32 inputs, ``extra`` (e.g. GROUP_N) added to each.

    float32 inputs take the exact (non-TF32) dot, which runs on FMA units:
    small tiles, or compilation alone takes minutes. ``wide_warps``: warps of
    the 64x64 tile (the fused forward needs 8: at 4 ptxas caps it at 128
    registers on sm_90 and spills; the dz kernel spills at 8, not at 4).
    """
    return [
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_H": 32, **extra}, num_warps=wide_warps, num_stages=2),
        triton.Config({"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_H": 32, **extra}, num_warps=4, num_stages=2),
    ]


_LAUNCH_KEYS = ("num_warps", "num_stages")
_autotuned: dict[tuple, object] = {}


def parse_config(spec: str) -> dict:
    """``"BLOCK_N=64,BLOCK_V=128,num_warps=4"`` -> dict of ints, or a ValueError naming the setting."""
    try:
        return {k.strip(): int(v) for k, v in (item.split("=") for item in spec.split(",") if item.strip())}
    except ValueError as exc:
        raise ValueError(
            f"settings.triton_config (GRAO_KERNELS_TRITON_CONFIG) must look like 'BLOCK_N=64,BLOCK_V=128,...', "
            f"got {spec!r}"
        ) from exc


def jit_fn(kernel):
    """The ``JITFunction`` under ``triton.heuristics``."""
    return kernel.fn if isinstance(kernel, triton.runtime.Heuristics) else kernel


def launch(kernel, configs, interpreter_config: dict, grid, args: dict, key=("V", "H")) -> dict:
    """Launch ``kernel`` (jit, possibly under heuristics) with one config; returns the config's block sizes.

    First match: ``settings.triton_config`` (its keys that the kernel takes;
    GROUP_N defaults to 8), ``interpreter_config`` under the interpreter (the
    autotuner times on CUDA events), the one config of a one-config list (a
    kernel that overwrites its input, such as the chunked row kernel, must
    not be re-run by trials), else Triton's autotuner over ``configs`` keyed
    on ``key`` and the dtypes; those kernels are idempotent, so trials need
    no reset.
    """
    names = set(jit_fn(kernel).arg_names)
    cfg = None
    if settings.triton_config:
        cfg = parse_config(settings.triton_config)
        if "GROUP_N" in names:
            cfg.setdefault("GROUP_N", 8)
        cfg = {k: v for k, v in cfg.items() if k in names or k in _LAUNCH_KEYS}
    elif interpreting():
        cfg = dict(interpreter_config)
    elif len(configs) == 1:
        cfg = {**configs[0].kwargs, "num_warps": configs[0].num_warps, "num_stages": configs[0].num_stages}
    if cfg is not None:
        meta = {k: v for k, v in cfg.items() if k not in _LAUNCH_KEYS}
        kernel[grid(meta)](**args, **meta, **{k: cfg[k] for k in _LAUNCH_KEYS if k in cfg})
        return meta
    tuned_key = (id(kernel), tuple(id(c) for c in configs))
    if tuned_key not in _autotuned:
        _autotuned[tuned_key] = triton.autotune(configs, key=list(key))(kernel)
    tuned = _autotuned[tuned_key]
    tuned[grid](**args)
    return dict(tuned.best_config.kwargs)


def launch_fixed(kernel, grid: tuple, args: dict) -> None:
    """Launch ``kernel`` with its block sizes in ``args``."""
    kernel[grid](**args)


def dot_flags(dtype: torch.dtype) -> dict:
    """Constexprs of ``tl.dot``: exact float32 (no TF32); under the interpreter widen bf16/fp16 operands,
    whose ``tl.dot`` it computes on the raw bits (the products are exact either way)."""
    return {"DOT_PRECISION": "ieee", "UPCAST_DOT": interpreting() and dtype != torch.float32}


@triton.jit
def grouped_tile_ids(N, V, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, GROUP_N: tl.constexpr):
    """This program's (row block, vocabulary tile) of an N x V grid, in grouped order.

    Triton tutorial 03, "L2 cache optimizations": GROUP_N consecutive
    programs share one vocabulary tile and walk GROUP_N row blocks, so the
    hidden rows and the weight tile they read stay in L2 while those programs run.
    """
    return tile_coords(tl.program_id(0), N, V, BLOCK_N, BLOCK_V, GROUP_N)


@triton.jit
def tile_coords(pid, N, V, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, GROUP_N: tl.constexpr):
    """(row block, vocabulary tile) of tile ``pid`` of an N x V grid in ``grouped_tile_ids``' order."""
    num_n = tl.cdiv(N, BLOCK_N)
    num_v = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * num_v
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size
    return pid_n, pid_v


@triton.jit
def raw_logits_tile(
    hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, R, V, H, stride_h, stride_w,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """``hidden[offs_n] @ weight[offs_v].T + bias[offs_v]`` in fp32, (BLOCK_N, BLOCK_V), rows ``< R``, columns ``< V``.

    The weight tile is cast to hidden's dtype: with a float32 master weight
    and bfloat16 activations the dot runs on bf16 tensor cores, not FMA units.
    Out-of-range entries hold 0 (the caller masks them).
    """
    offs_h = tl.arange(0, BLOCK_H)
    row_mask = offs_n < R
    col_mask = offs_v < V
    # int64 offsets: R*H and V*H pass 2^31 at large shapes.
    h_ptrs = hidden_ptr + offs_n.to(tl.int64)[:, None] * stride_h + offs_h[None, :]
    wt_ptrs = weight_ptr + offs_v.to(tl.int64)[None, :] * stride_w + offs_h[:, None]  # (BLOCK_H, BLOCK_V)
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h_mask = offs_h < H - h0
        a = tl.load(h_ptrs + h0, mask=row_mask[:, None] & h_mask[None, :], other=0.0)
        b = tl.load(wt_ptrs + h0, mask=h_mask[:, None] & col_mask[None, :], other=0.0)
        b = to_store(b, a.dtype, UPCAST_DOT)
        if UPCAST_DOT:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def tanh(x):
    """tanh for float32, exact at +-inf (a -inf logit soft-caps to -cap); absolute error ~1e-7."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def apply_head(raw, scale, inv_temp, softcap, HAS_SOFTCAP: tl.constexpr):
    """(z, dz/draw) of the head: u = scale raw, u = cap tanh(u / cap) when soft-capped, z = u / T."""
    u = raw * scale
    if HAS_SOFTCAP:
        th = tanh(u / softcap)
        z = softcap * th * inv_temp
        dz_draw = (1.0 - th * th) * (scale * inv_temp)
    else:
        z = u * inv_temp
        dz_draw = tl.zeros_like(raw) + scale * inv_temp
    return z, dz_draw


@triton.jit
def head_grad_from_z(z, scale, inv_temp, softcap, HAS_SOFTCAP: tl.constexpr):
    """dz/draw of ``apply_head`` from its output z (finite): with the soft-cap tanh(u / cap) = z T / cap."""
    if HAS_SOFTCAP:
        th = z / (softcap * inv_temp)
        return (1.0 - th * th) * (scale * inv_temp)
    return tl.zeros_like(z) + scale * inv_temp


@triton.jit
def merge_lse(m, s, t, pm, ps, pt, ENTROPY: tl.constexpr):
    """Fold (rows, k) partial (max, sum-exp, entropy sum) triples into each row's running triple.

    A triple ``(m, s, t)`` summarises logits z by ``s = sum exp(z - m)`` and
    ``t = sum exp(z - m) (z - m)``, so ``lse = m + log s`` and the entropy of
    the softmax is ``log s - t / s``; moving it to a new max M multiplies both
    by exp(m - M) and adds ``(m - M) s`` to t (the online normaliser of
    Milakov & Gimelshein 2018, Alg. 3, extended to the entropy). A logit alone
    is the triple ``(z, 1, 0)``. A row whose parts so far are all -inf (a
    masked part of the vocabulary) keeps ``m = -inf, s = t = 0``: the shift is
    taken from 0 instead of -inf, as FlashAttention guards its running max, so
    no ``exp(-inf - -inf)`` NaN arises.
    """
    m_new = tl.maximum(m, tl.max(pm, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    beta = tl.exp(pm - m_safe[:, None])  # 0 for a -inf part
    if ENTROPY:
        shift = tl.where(m == float("-inf"), 0.0, m - m_safe)
        part = tl.where(beta > 0, beta * (pt + (pm - m_safe[:, None]) * ps), 0.0)
        t = alpha * (t + shift * s) + tl.sum(part, 1)
    s = s * alpha + tl.sum(beta * ps, 1)
    return m_new, s, t


@triton.jit
def lse_and_entropy(m, s, t):
    """(lse, entropy) from a row's (max, sum-exp, entropy sum) of ``online_lse_update``."""
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    log_s = tl.log(s)
    return m_safe + log_s, log_s - t / s


@triton.jit
def logits_grad(z, dz_draw, onehot, coef, ent_coef, lse, ent, HAS_ENT_COEF: tl.constexpr):
    """d/draw of ``coef logp + ent_coef entropy`` for a block of logits (rows broadcast from (rows,) vectors),
    with p = exp(z - lse); see ``logits_grad_p``."""
    return logits_grad_p(tl.exp(z - lse[:, None]), z, dz_draw, onehot, coef, ent_coef, lse, ent, HAS_ENT_COEF)


@triton.jit
def logits_grad_p(p, z, dz_draw, onehot, coef, ent_coef, lse, ent, HAS_ENT_COEF: tl.constexpr):
    """d/draw of ``coef logp + ent_coef entropy`` given the probabilities ``p`` of the logits ``z``.

    d logp / dz = onehot(target) - p and d entropy / dz = -p (z - lse + entropy);
    times dz/draw of the head. A -inf logit has p = 0 and contributes exactly 0
    (its ``p (z - lse)`` would be 0 * -inf). ``z`` is read only with HAS_ENT_COEF.
    """
    g = coef[:, None] * (tl.where(onehot, 1.0, 0.0) - p)
    if HAS_ENT_COEF:
        g -= tl.where(p > 0, ent_coef[:, None] * p * (z - lse[:, None] + ent[:, None]), 0.0)
    return g * dz_draw


@triton.jit
def round_to_bf16(x):
    """float32 -> nearest bfloat16 (ties to even), kept in float32.

    Interpreter only: its float32 -> bfloat16 cast truncates, which biases dz
    and doubles the gradient error; GPUs round to nearest.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def to_store(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """``x`` cast to ``dtype`` for a store, rounding to nearest also under the interpreter."""
    if INTERPRET:
        if dtype == tl.bfloat16 and x.dtype == tl.float32:
            x = round_to_bf16(x)
    return x.to(dtype)


# ----------------------------------------------------------------------------
# launcher side: the prepared problem, row groups and the cuBLAS products


# tl.make_tensor_descriptor (device-side TMA descriptors): triton >= 3.4, so the GPU image's 3.6 has it.
HAS_TENSOR_DESCRIPTORS = hasattr(tl, "make_tensor_descriptor")
GEMM1_CHOICES = ("auto", "tma", "loads")
# Persistent programs of the TMA GEMM1 under the interpreter: few, so that each walks several tiles.
INTERPRETER_PROGRAMS = 2


def tma_operands(dtype: torch.dtype, weight_dtype: torch.dtype, H: int) -> bool:
    """Whether this triton has TMA descriptors and they can load the operands (see ``tma_gemm1``)."""
    return HAS_TENSOR_DESCRIPTORS and dtype in (torch.bfloat16, torch.float16) and weight_dtype == dtype and H % 8 == 0


def tma_gemm1(device: torch.device, dtype: torch.dtype, weight_dtype: torch.dtype, H: int) -> bool:
    """Whether the epilogue sweep's GEMM1 is the persistent TMA kernel (``epilogue.lse_partials_tma_kernel``).

    ``settings.triton_gemm1``: "auto" takes it on GPUs of compute capability
    9.0 or newer, "tma" also under the interpreter (which runs descriptors in
    Python), "loads" never. Either way only where TMA can load the operands:
    bf16/fp16 hidden and weight of one dtype (a float32 master weight keeps
    the pointer loads, which cast its tiles) and rows of a multiple of 16
    bytes (H % 8 == 0); the launcher also checks the base pointers.
    """
    choice = settings.triton_gemm1
    if choice not in GEMM1_CHOICES:
        raise ValueError(
            f"settings.triton_gemm1 (GRAO_KERNELS_TRITON_GEMM1) must be one of {GEMM1_CHOICES}, got {choice!r}"
        )
    if choice == "loads" or not tma_operands(dtype, weight_dtype, H):
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 9
    return choice == "tma" and interpreting()


def tma_programs(device: torch.device, dtype: torch.dtype, weight_dtype: torch.dtype, H: int) -> int:
    """``Sizes.descriptor_programs``: the SM count where the TMA GEMM1 runs on a GPU, else 0."""
    device = torch.device(device)
    if device.type != "cuda" or not tma_gemm1(device, dtype, weight_dtype, H):
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


@dataclass
class Problem:
    """One call's inputs as the sweeps take them.

    ``hidden`` (N, H) and ``weight`` (V, H) contiguous; the compute dtype is
    hidden's (a weight of another dtype, e.g. a float32 master weight under
    bfloat16 activations, is cast to it tile by tile in the Triton kernels
    and per product for cuBLAS). ``rows``: int64 ids of the non-ignored rows,
    or None when every row counts (no gather needed); ``n`` their number.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    targets: torch.Tensor
    rows: torch.Tensor | None
    n: int
    scale: float
    inv_temp: float
    softcap: float | None

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype

    @property
    def shape(self) -> tuple[int, int, int]:
        """(N, V, H)."""
        return self.hidden.shape[0], self.weight.shape[0], self.hidden.shape[1]

    def group(self, r0: int, r1: int):
        """Rows ``r0 .. r1`` of the non-ignored rows: (hidden rows, contiguous; their ids or None; first id)."""
        if self.rows is None:
            return self.hidden[r0:r1], None, r0
        ids = self.rows[r0:r1]
        return self.hidden.index_select(0, ids), ids, 0

    def head_args(self) -> dict:
        return {"scale": self.scale, "inv_temp": self.inv_temp, "softcap": self.softcap}

    def sizes(self) -> Sizes:
        N, V, H = self.shape
        programs = tma_programs(self.hidden.device, self.dtype, self.weight.dtype, H)
        return Sizes(N, V, H, self.n, self.dtype, self.weight.dtype, self.hidden.is_cuda, programs)


@dataclass(frozen=True)
class Sizes:
    """What a sweep's working memory depends on: N rows (``n`` of them not ignored), V, H, the dtypes, the device.

    ``descriptor_programs``: programs of the epilogue sweep's TMA GEMM1 that
    each need global scratch for their tensor descriptors (the device's SM
    count where that GEMM1 runs on a GPU; 0 otherwise, the interpreter included).
    """

    N: int
    V: int
    H: int
    n: int
    dtype: torch.dtype
    weight_dtype: torch.dtype
    cuda: bool = True
    descriptor_programs: int = 0

    @property
    def e(self) -> int:
        """Bytes per element of hidden's (the compute) dtype."""
        return torch.empty(0, dtype=self.dtype).element_size()

    @property
    def gathered(self) -> bool:
        """Whether the non-ignored rows are gathered into a contiguous copy per group."""
        return self.n != self.N


@dataclass(frozen=True)
class Workspace:
    """The buffers a sweep allocates, in bytes by name: ``persistent`` ones live for the whole sweep (or are
    re-made group after group, one at a time), ``transient`` ones one at a time beside them."""

    persistent: dict
    transient: dict

    @property
    def bytes(self) -> int:
        """The sweep's peak working memory."""
        return sum(self.persistent.values()) + max(self.transient.values(), default=0)


def largest_rows(n: int, usable: int, workspace_of) -> int:
    """The largest row count r in [16, n] with ``workspace_of(r).bytes <= usable`` (0 when none; r = n when
    n < 16 and it fits). ``workspace_of`` grows with r, except for what one group saves over several."""
    if workspace_of(n).bytes <= usable:
        return n
    lo, hi = 0, n - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if workspace_of(mid).bytes <= usable:
            lo = mid
        else:
            hi = mid - 1
    return lo if lo >= 16 else 0


def min_block_v(configs, interpreter_config: dict) -> int:
    """The narrowest vocabulary tile a launch may pick (sizes the per-tile partial buffers)."""
    if settings.triton_config:
        cfg = parse_config(settings.triton_config)
        if "BLOCK_V" in cfg:
            return cfg["BLOCK_V"]
    if interpreting():
        return interpreter_config["BLOCK_V"]
    return min(c.kwargs["BLOCK_V"] for c in configs)


# torch.__version__ is a TorchVersion, which compares with tuples (no packaging import needed).
# torch >= 2.8: mm/addmm take out_dtype=torch.float32 for bf16/fp16 operands on CUDA.
_OUT_DTYPE_GEMM = torch.__version__ >= (2, 8)
# addmm(out_dtype=float32) accepts a float32 C (the accumulator itself) only after
# pytorch/pytorch#167931 (Nov 2025); 2.8 and 2.9 reject it ("self and mat2 must have
# the same dtype"). 2.11 is the first release checked on a GPU here; 2.10 takes the
# sliced path below, which is correct on every torch >= 2.8.
_ADDMM_FP32_C = torch.__version__ >= (2, 11)
# The sliced accumulation's float32 temporary: at most this many bytes at once.
SLICE_BYTES = 64 * 2**20
_warned_rounded: set[str] = set()


def fp32_output_gemm(device: torch.device) -> bool:
    """Whether bfloat16/float16 products can be written (and accumulated) in float32 on ``device``.

    CUDA: ``torch.mm``/``torch.addmm`` take ``out_dtype=torch.float32``
    since torch 2.8 (cuBLAS with a float32 C matrix). CPU tensors (the
    interpreter) multiply in float32 instead, a test path.
    """
    return device.type != "cuda" or _OUT_DTYPE_GEMM


def mm_temp_bytes(sizes: Sizes, out_rows: int, out_cols: int, accumulate: bool) -> int:
    """Bytes of the temporary ``mm_into`` allocates for a ``sizes.dtype`` product into a float32 (rows, cols) ``out``.

    0 where one cuBLAS call writes ``out`` (float32 inputs, torch >= 2.11, or
    no accumulation on torch >= 2.8); CPU tensors run the interpreter's test
    path, whose float32 emulation is not counted.
    """
    if not sizes.cuda or sizes.dtype == torch.float32:
        return 0
    if not _OUT_DTYPE_GEMM:
        return out_rows * out_cols * sizes.e
    if not accumulate or _ADDMM_FP32_C:
        return 0
    step = max(1, SLICE_BYTES // (4 * max(out_cols, 1)))
    return min(step, out_rows) * out_cols * 4


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool = False, alpha: float = 1.0) -> None:
    """``out = alpha a @ b`` (``out += alpha a @ b`` with ``accumulate``), accumulated in float32.

    ``a`` and ``b`` share a dtype; ``alpha`` is a power of two (it undoes
    ``dz_scale``, so multiplying by it is exact). A bfloat16/float16 product
    into a float32 ``out`` keeps float32 all the way and never upcasts the
    operands on a GPU:

    * torch >= 2.11: one cuBLAS call, ``beta = 1`` into ``out`` when accumulating;
    * torch 2.8-2.10: ``torch.mm(out_dtype=float32)`` then ``add_``, in row
      slices of at most ``SLICE_BYTES`` of float32 temporary (the same numbers,
      one more pass over ``out``);
    * older torch: the product is rounded to the inputs' dtype before it is
      added, with a one-time warning.

    Into an ``out`` of the inputs' dtype the product (times ``alpha``, inside
    the GEMM) is rounded once on writing. Errors of the GEMM propagate:
    nothing is retried another way.
    """
    scaled = {} if alpha == 1.0 else {"alpha": alpha}
    if out.dtype == a.dtype:
        if accumulate:
            out.addmm_(a, b, **scaled)
        elif scaled:
            torch.addmm(out, a, b, beta=0, alpha=alpha, out=out)
        else:
            torch.mm(a, b, out=out)
    elif not out.is_cuda:
        # CPU tensors only run under the interpreter: torch has no CPU fp32-output bf16 GEMM.
        prod = a.float() @ b.float()
        if scaled:
            prod.mul_(alpha)
        out.add_(prod) if accumulate else out.copy_(prod)
    elif not _OUT_DTYPE_GEMM:
        if repr(a.dtype) not in _warned_rounded:
            _warned_rounded.add(repr(a.dtype))
            warnings.warn(
                f"grao_kernels triton backend: torch {torch.__version__} has no float32-output {a.dtype} GEMM "
                "(torch >= 2.8 has); gradient chunks are rounded to the input dtype before float32 accumulation",
                RuntimeWarning,
                stacklevel=3,
            )
        prod = torch.mm(a, b)
        if accumulate:
            out.add_(prod, **scaled)
        else:
            out.copy_(prod).mul_(alpha) if scaled else out.copy_(prod)
    elif not accumulate:
        torch.mm(a, b, out_dtype=torch.float32, out=out)
        if scaled:
            out.mul_(alpha)
    elif _ADDMM_FP32_C:
        torch.addmm(out, a, b, out_dtype=torch.float32, out=out, **scaled)
    else:
        step = max(1, SLICE_BYTES // (4 * max(out.shape[1], 1)))
        for r0 in range(0, out.shape[0], step):
            out[r0 : r0 + step].add_(torch.mm(a[r0 : r0 + step], b, out_dtype=torch.float32), **scaled)


# float16 dz is scaled so its largest possible entry is about 2**DZ_LOG2_MAX.
DZ_LOG2_MAX = 10


def dz_scale(prob: Problem, coef: torch.Tensor, ent_coef: torch.Tensor | None) -> float:
    """A power of two the kernels multiply the logits gradient by before rounding it to float16 (1.0 otherwise).

    float16's smallest subnormal is 6e-8: with per-token coefficients c of a
    mean-reduced loss (~1/N) a term c p of a small probability would round to
    0 in dz before any loss scale could help. Each entry is bounded by
    ``(max|c| + max|c_ent| (1 + log V)) scale / T`` (|onehot - p| <= 1,
    p |z - lse + H| <= 1 + log V, the head's derivative <= scale / T); the
    scale brings that bound to ~2**DZ_LOG2_MAX, and the GEMMs consuming dz
    multiply by its inverse (exact). float16 only, at one host sync.
    """
    if prob.dtype != torch.float16:
        return 1.0
    bound = float(coef.abs().max()) if coef.numel() else 0.0
    if ent_coef is not None and ent_coef.numel():
        bound += float(ent_coef.abs().max()) * (1.0 + math.log(prob.shape[1]))
    bound *= abs(prob.scale) * prob.inv_temp
    if not math.isfinite(bound) or bound <= 0.0:
        return 1.0
    return 2.0 ** (DZ_LOG2_MAX - math.ceil(math.log2(bound)))

"""Triton backend: CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``), three sweeps.

Implements the contract of ``grao_kernels/backends/__init__.py`` (forward,
grad with entropy coefficients, ``needs``, ``budget``). The kernels and their
launchers live in ``grao_kernels/triton_kernels/``:

* ``chunked.py`` (default where the budget allows): per group of rows cuBLAS
  writes the logits into a float32 buffer, one Triton row kernel computes the
  statistics and overwrites the buffer with the logits gradient, cuBLAS
  computes dhidden and dweight. Three GEMMs, one sweep, workspace
  about ``4 V`` bytes per row of the group.
* ``fused.py``: the logits exist only in registers; a Triton forward writes
  per-tile partial sums, a Triton kernel recomputes dz per vocabulary chunk
  for two cuBLAS products. Four GEMMs' worth of FLOPs; workspace independent
  of V (see its docstring).
* ``epilogue.py`` (by name only): the Triton GEMM1 of the fused forward also
  writes exp(z - tile max) in hidden's dtype (2 B per logit for bf16/fp16,
  not chunked's 4), one row kernel turns it into the logits gradient in place,
  and cuBLAS computes dhidden and dweight as in the chunked sweep (dweight
  summed in the weight's dtype). Three GEMMs, twice chunked's rows per group;
  modelled at ~1.10x the three-GEMM floor, not yet timed on a GPU, so "auto"
  does not pick it.

Memory: each sweep's ``workspace`` function lists every buffer it allocates
(logits, partials, dz, float32 accumulators, gathered rows, weight casts,
temporaries), and its ``run`` allocates exactly those; ``plan`` sizes the row
groups (and fused's dz chunk) from it so the peak stays within 90% of the
budget, and ``workspace_bytes`` reports it for given sizes before a call.
Mode: ``settings.triton_mode`` ("auto", "chunked", "fused" or "epilogue"). "auto" takes
the chunked sweep when the budget holds at least ``chunked.MIN_ROWS`` rows
per group (or every row), else the fused one. Each module docstring gives
the FLOP floor and byte traffic of its sweep.

Precision: every softmax statistic in float32 and every product accumulated
in float32. The products run in hidden's dtype: a weight of another dtype (a
float32 master weight under bfloat16 activations) is cast to it per tile or
per product, never the other way round (a float32 dot of bfloat16
activations would run on FMA units, 10-30x slower). float32 inputs use exact
float32 products (Triton ``input_precision="ieee"``; cuBLAS as PyTorch's
``torch.backends.cuda.matmul.allow_tf32`` says). Gradients: dhidden in
hidden's dtype, dweight in the weight's dtype (a float32 weight's gradient
is its own accumulator; the chunked sweep sums a bf16/fp16 weight's gradient
over several row groups in a float32 V x H buffer, which its workspace
counts, or with ``settings.triton_dweight_sum = "weight"`` in the gradient
itself, rounded to its dtype once per group; the fused sweep sums each
dweight chunk over every row first), dbias in float32.

Targets outside [0, V) other than ``ignore_index`` (possible only with
``validate=False``): nothing outside a tensor is read; that row's logp is
NaN and its logits gradient has no target term.

Ignored rows are found with one ``nonzero`` (a host synchronisation per
call) and never read; the sweeps see only the non-ignored rows. That sync
(and Triton's autotuning on a shape's first call) cannot be captured in a
CUDA graph: a call during stream capture is refused with a RuntimeError
rather than failing inside the capture. Kernels and cuBLAS run on the
inputs' device, whatever the current device is.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

# Importing the kernels imports triton: an ImportError here disables only this backend.
from ..settings import settings
from ..triton_kernels import chunked, epilogue, fused
from ..triton_kernels.common import (
    Problem,
    Sizes,
    Workspace,
    check_device,
    fp32_output_gemm,
    tma_programs,
    unavailable_reason,  # noqa: F401  (part of the backend contract)
)
from . import Head, Stats

# Working memory beyond inputs and returned gradients: 1 GiB holds ~1700 rows
# of float32 logits at V=151936 in the chunked sweep.
DEFAULT_BUDGET = 2**30
MODES = ("auto", "chunked", "fused", "epilogue")


@dataclass
class Outputs:
    """What a sweep fills: (N,) float32 statistics (0 at ignored rows) and the gradients asked for."""

    logp: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor | None
    dhidden: torch.Tensor | None = None
    dweight: torch.Tensor | None = None
    dbias: torch.Tensor | None = None


def check_not_capturing(device: torch.device) -> None:
    """RuntimeError when ``device``'s current stream is capturing a CUDA graph (see the module docstring)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "the triton backend cannot run inside CUDA graph capture: each call synchronises with the host "
            "(it counts the rows that are not ignore_index to size its row groups) and autotunes a shape's "
            "first launch; call it outside the captured region"
        )


def _on_device(t: torch.Tensor):
    """Context that makes ``t``'s device current, so Triton launches and cuBLAS run where the tensors are."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _prepare(hidden, weight, bias, targets, head: Head, ignore_index: int) -> Problem:
    check_device(hidden, weight, bias, targets)
    check_not_capturing(hidden.device)
    targets = targets.reshape(-1).to(torch.int64).contiguous()
    valid = targets != ignore_index
    rows = valid.nonzero().squeeze(1)  # the call's one host synchronisation
    n = rows.numel()
    softcap = None if head.softcap is None else float(head.softcap)
    return Problem(
        hidden=hidden.contiguous(),
        weight=weight.contiguous(),
        bias=None if bias is None else bias.contiguous(),
        targets=targets,
        rows=None if n == targets.numel() else rows,
        n=n,
        scale=float(head.logit_scale),
        inv_temp=1.0 / float(head.temperature),
        softcap=softcap,
    )


@dataclass(frozen=True)
class Plan:
    """A call's sweep: ``mode``, rows per group, dz chunk width (fused; 0 otherwise) and its buffers."""

    mode: str
    rows: int
    chunk: int
    workspace: Workspace
    n: int  # the rows swept (non-ignored)

    @property
    def groups(self) -> int:
        return -(-self.n // self.rows) if self.rows else 0

    @property
    def bytes(self) -> int:
        """Peak working memory of the sweep (beyond inputs, returned statistics and gradients)."""
        return self.workspace.bytes


def plan(sizes: Sizes, budget: int, *, grad: bool, entropy: bool, needs=(True, True, True), forward=True) -> Plan:
    """The sweep ``settings.triton_mode`` and ``budget`` give for a problem of ``sizes``, with its workspace.

    "auto" takes the chunked sweep when its workspace (every buffer counted,
    see ``chunked.workspace``) fits 90% of the budget with at least
    ``chunked.MIN_ROWS`` rows per group (or every row), else the fused one;
    "epilogue" only by name. A mode asked for by name that cannot fit 16 rows
    in the budget, or the chunked or epilogue mode on a torch without
    float32-output bf16/fp16 GEMMs, is a ValueError naming the setting.
    """
    mode = settings.triton_mode
    if mode not in MODES:
        raise ValueError(f"settings.triton_mode (GRAO_KERNELS_TRITON_MODE) must be one of {MODES}, got {mode!r}")
    dweight_sum = settings.triton_dweight_sum
    if dweight_sum not in chunked.DWEIGHT_SUMS:
        raise ValueError(
            f"settings.triton_dweight_sum (GRAO_KERNELS_TRITON_DWEIGHT_SUM) must be one of {chunked.DWEIGHT_SUMS}, "
            f"got {dweight_sum!r}"
        )
    needs = tuple(bool(grad and x) for x in needs)
    if sizes.n == 0:  # nothing to sweep: the call only fills zeros
        return Plan("chunked" if mode == "auto" else mode, 0, 0, Workspace({}, {}), 0)
    chunk_ok = sizes.dtype == torch.float32 or fp32_output_gemm(torch.device("cuda" if sizes.cuda else "cpu"))
    if mode == "epilogue":
        if not chunk_ok:
            raise ValueError(
                f"settings.triton_mode='epilogue' needs float32-output {sizes.dtype} GEMMs (torch >= 2.8), "
                f"this is torch {torch.__version__}; use 'fused' or 'auto'"
            )
        rows = epilogue.rows_per_group(sizes, budget, grad, entropy, needs, forward)
        if rows == 0:
            least = epilogue.workspace(sizes, 16, grad=grad, entropy=entropy, needs=needs, forward=forward)
            raise ValueError(
                f"memory_budget of {budget} bytes holds fewer than 16 rows of the epilogue sweep "
                f"(N={sizes.N}, V={sizes.V}, H={sizes.H}, {sizes.dtype} activations, {sizes.weight_dtype} weight); "
                f"it needs at least {-(-least.bytes * 10 // 9)} bytes ({least})"
            )
        ws = epilogue.workspace(sizes, rows, grad=grad, entropy=entropy, needs=needs, forward=forward)
        return Plan("epilogue", rows, 0, ws, sizes.n)
    if mode != "fused":
        rows = chunked.rows_per_group(sizes, budget, grad, needs, dweight_sum)
        if mode == "chunked":
            if not chunk_ok:
                raise ValueError(
                    f"settings.triton_mode='chunked' needs float32-output {sizes.dtype} GEMMs (torch >= 2.8), "
                    f"this is torch {torch.__version__}; use 'fused' or 'auto'"
                )
            if rows == 0:
                raise ValueError(
                    f"memory_budget of {budget} bytes holds fewer than 16 rows of the chunked sweep "
                    f"(N={sizes.N}, V={sizes.V}, H={sizes.H}, {sizes.dtype} activations, {sizes.weight_dtype} weight)"
                )
        if mode == "chunked" or (chunk_ok and rows >= min(chunked.MIN_ROWS, max(sizes.n, 1))):
            ws = chunked.workspace(sizes, rows, grad=grad, needs=needs, dweight_sum=dweight_sum)
            return Plan("chunked", rows, 0, ws, sizes.n)
    rows, chunk = fused.rows_per_group(sizes, budget, grad, entropy, needs, forward)
    if rows == 0:
        least = fused.workspace(sizes, 16, 256, grad=grad, entropy=entropy, needs=needs, forward=forward)
        raise ValueError(
            f"memory_budget of {budget} bytes holds fewer than 16 rows of the fused sweep "
            f"(N={sizes.N}, V={sizes.V}, H={sizes.H}, {sizes.dtype} activations, {sizes.weight_dtype} weight); "
            f"it needs at least {-(-least.bytes * 10 // 9)} bytes ({least})"
        )
    ws = fused.workspace(sizes, rows, chunk, grad=grad, entropy=entropy, needs=needs, forward=forward)
    return Plan("fused", rows, chunk, ws, sizes.n)


def choose_mode(prob: Problem, budget: int, *, grad: bool, entropy: bool):
    """("chunked" or "epilogue", rows) or ("fused", (rows, chunk)): ``plan``'s choice for ``prob``."""
    p = plan(prob.sizes(), budget, grad=grad, entropy=entropy)
    return (p.mode, (p.rows, p.chunk)) if p.mode == "fused" else (p.mode, p.rows)


def workspace_bytes(
    N: int,
    V: int,
    H: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    weight_dtype: torch.dtype | None = None,
    ignored: int = 0,
    grad: bool = True,
    entropy: bool = False,
    needs=(True, True, True),
    budget: int = DEFAULT_BUDGET,
    device: str = "cuda",
) -> Plan:
    """What a triton-backend call on CUDA (``device``) will allocate beyond its inputs and results, before it runs.

    ``N`` tokens (``ignored`` of them with ``ignore_index``), vocabulary ``V``,
    hidden size ``H``, activations of ``dtype``, a weight of ``weight_dtype``
    (default: ``dtype``; float32 for a master weight under bf16 activations),
    ``grad`` for a forward+backward sweep (the ``grao_loss`` entry; False for
    a statistics-only forward), ``entropy`` when the entropy is computed,
    ``needs`` the gradients asked for (hidden, weight, bias). Returns the
    ``Plan`` the call takes under ``settings.triton_mode`` and ``budget``: its
    mode, rows per group, and ``.bytes``, the peak of the buffers it
    allocates, with ``.workspace`` naming each one. Not counted: the call's
    O(N) vectors (targets as int64, the ignored-row mask and ids, which the
    10% of the budget kept free covers) and, on the first call of a shape
    without ``settings.triton_config``, Triton's autotuning benchmark buffers.
    ValueError as the call itself would raise when the budget is too small.
    """
    for name, x in (("N", N), ("V", V), ("H", H), ("ignored", ignored)):
        if not isinstance(x, int) or x < 0:
            raise ValueError(f"{name} must be a non-negative int, got {x!r}")
    if ignored > N:
        raise ValueError(f"ignored={ignored} exceeds N={N}")
    device = torch.device(device)
    weight_dtype = weight_dtype or dtype
    programs = tma_programs(device, dtype, weight_dtype, H)
    sizes = Sizes(N, V, H, N - ignored, dtype, weight_dtype, device.type == "cuda", programs)
    return plan(sizes, budget, grad=grad, entropy=entropy, needs=needs)


def _sweep(prob: Problem, out: Outputs, budget: int, *, entropy, coef=None, ent_coef=None, stats_given=False, needs):
    if prob.n == 0:
        return
    grad = coef is not None
    ent = entropy or ent_coef is not None
    p = plan(prob.sizes(), budget, grad=grad, entropy=ent, needs=needs, forward=not stats_given)
    kwargs = dict(entropy=entropy, coef=coef, ent_coef=ent_coef, stats_given=stats_given, needs=needs)
    if p.mode == "chunked":
        chunked.run(prob, out, rows=p.rows, dweight_sum=settings.triton_dweight_sum, **kwargs)
    elif p.mode == "epilogue":
        epilogue.run(prob, out, rows=p.rows, **kwargs)
    else:
        fused.run(prob, out, rows=p.rows, chunk=p.chunk, **kwargs)


def _outputs(prob: Problem, entropy: bool) -> Outputs:
    N = prob.shape[0]
    dev = prob.hidden.device
    zeros = lambda: torch.zeros(N, dtype=torch.float32, device=dev)  # noqa: E731
    return Outputs(logp=zeros(), lse=zeros(), entropy=zeros() if entropy else None)


def forward(hidden, weight, bias, targets, head, ignore_index, *, entropy=False, budget=DEFAULT_BUDGET) -> Stats:
    with _on_device(hidden):
        prob = _prepare(hidden, weight, bias, targets, head, ignore_index)
        out = _outputs(prob, entropy)
        _sweep(prob, out, budget, entropy=entropy, needs=(False, False, False))
    return Stats(out.logp, out.lse, out.entropy)


def grad(
    hidden, weight, bias, targets, head, ignore_index, *, coef, ent_coef=None, stats=None,
    needs=(True, True, True), budget=DEFAULT_BUDGET,
):  # fmt: skip
    with _on_device(hidden):
        return _grad(
            hidden, weight, bias, targets, head, ignore_index, coef=coef, ent_coef=ent_coef, stats=stats,
            needs=needs, budget=budget,
        )  # fmt: skip


def _grad(hidden, weight, bias, targets, head, ignore_index, *, coef, ent_coef, stats, needs, budget):
    prob = _prepare(hidden, weight, bias, targets, head, ignore_index)
    N, V, H = prob.shape
    dev = prob.hidden.device
    has_ent = ent_coef is not None
    needs = (bool(needs[0]), bool(needs[1]), bool(needs[2]) and bias is not None)
    given = stats is not None and (not has_ent or stats.entropy is not None)
    if given:
        out = Outputs(stats.logp, stats.lse.float().contiguous(), None)
        if has_ent:
            out.entropy = stats.entropy.float().contiguous()
    else:
        out = _outputs(prob, has_ent)
    out.dhidden = torch.zeros(N, H, dtype=prob.dtype, device=dev) if needs[0] else None
    out.dbias = torch.zeros(V, dtype=torch.float32, device=dev) if needs[2] else None
    # The sweep writes (or copies its accumulator into) the weight's dtype.
    if needs[1]:
        out.dweight = (torch.zeros if prob.n == 0 else torch.empty)(V, H, dtype=weight.dtype, device=dev)
    coef = coef.reshape(-1).float().contiguous()
    ent_coef = None if ent_coef is None else ent_coef.reshape(-1).float().contiguous()
    _sweep(prob, out, budget, entropy=has_ent, coef=coef, ent_coef=ent_coef, stats_given=given, needs=needs)
    return Stats(out.logp, out.lse, out.entropy), out.dhidden, out.dweight, out.dbias

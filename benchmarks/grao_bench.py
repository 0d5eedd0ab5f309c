"""Shared machinery of the benchmark suite: shapes, one input factory per op, the methods, the GEMM floor, memory.

Every method is a pair ``forward(inputs) -> out`` / ``backward(out, inputs)`` on the inputs of its op's factory, so
the speed benchmarks, the memory probe and the agreement check all run exactly the same code on the same tensors.

FLOP counts (N tokens, V vocabulary entries, H hidden size; one multiply-add = 2 FLOPs):

* logits  ``Z = h W^T``      (N, H) x (H, V): 2 N V H
* dhidden ``dH = dZ W``      (N, V) x (V, H): 2 N V H
* dweight ``dW = dZ^T h``    (V, N) x (N, H): 2 N V H

No method can avoid these three products, so their time on this device (the "GEMM floor") is the yardstick: the
forward is compared with the logits GEMM, the backward with dH + dW, forward+backward with all three. Softmax and
gather are O(N V) and do not count. A logits-free method that recomputes the logits in its backward does a fourth
product, so about 1.33x the floor is the best it can do on forward+backward.
"""

from __future__ import annotations

import functools
import gc
import math
import multiprocessing
import os
import re
import time
from dataclasses import dataclass

import pytest
import torch

import grao_kernels
from grao_kernels import backends as gk_backends
from grao_kernels.api import group_advantages, token_coefficients
from grao_kernels.memory import peak_rss_bytes, reset_peak_rss, rss_bytes
from grao_kernels.reference import reference_grao, reference_logprobs

MODES = ("forward", "backward", "full")
OPS = ("logprobs", "grao")

# GRAO batch layout used by the grao_loss benchmarks: P prompts x K = G+1 sequences (the reference answer last).
GRAO_P, GRAO_K = 2, 4
BETA, LAM = 0.5, 0.6

# Agreement tolerance of every method with ours, relative to the largest magnitude of the reference quantity.
_TOL = {torch.float32: 2e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}


# ----------------------------------------------------------------------------
# device and shapes


def bench_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``; ``GRAO_BENCH_DEVICE`` overrides."""
    forced = os.environ.get("GRAO_BENCH_DEVICE")
    if forced:
        return forced
    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.cache
def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
            model = m.group(1).strip() if m else model
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


@dataclass(frozen=True)
class Shape:
    device: str
    N: int
    V: int
    H: int
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def id(self) -> str:
        return f"{self.device}-N{self.N}-V{self.V}-H{self.H}-{self.dtype}"


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


# The CPU set must finish within 10 minutes on 2 cores at ~70 GFLOP/s (float32 GEMM, less when the cores are
# shared): one N x V x H GEMM at N=128, V=151936, H=1024 is 40 GFLOP, each method case runs the op about three
# times (probe, forward, backward, forward+backward), there are ~9 methods and 6 shapes, and CCE's CPU path runs
# at a fifth of the GEMM rate. GRAO_BENCH_CPU_TOKENS scales N up on a quieter or bigger machine.
CPU_TOKENS = _env_int("GRAO_BENCH_CPU_TOKENS", 128)
CPU_SHAPES = [Shape("cpu", CPU_TOKENS, V, H, "float32") for H in (256, 1024) for V in (32000, 65536, 151936)]
GPU_SHAPES = [Shape("cuda", N, V, 4096, "bfloat16") for N in (8192, 32768) for V in (128256, 151936, 262144)]


def all_shapes() -> list[Shape]:
    return CPU_SHAPES + GPU_SHAPES


def shape_skip_reason(shape: Shape) -> str | None:
    dev = bench_device()
    if shape.device == "cuda" and not torch.cuda.is_available():
        return "GPU shape set: needs a CUDA device"
    if shape.device != dev.split(":")[0]:
        return f"CPU shape set: this run benchmarks {dev} (set GRAO_BENCH_DEVICE=cpu to run it)"
    return None


def rounds(shape: Shape) -> tuple[int, int]:
    """(rounds, warmup rounds) per timed case."""
    if shape.device == "cpu":
        return _env_int("GRAO_BENCH_ROUNDS", 1), 0
    return _env_int("GRAO_BENCH_ROUNDS", 5), 1


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------
# input factories (one per op, shared by speed, memory and agreement)


def make_inputs(op: str, shape: Shape, seed: int = 0) -> dict:
    """Deterministic inputs of ``op`` at ``shape``; leaves ``hidden`` and ``weight`` require grad.

    logprobs: hidden (N, H), weight (V, H), targets (N,) all valid, ``grad`` (N,) the upstream gradient of the
    log-probs. grao: hidden (S, T, H) with S = P (G+1) and S T = N, targets (S, T), rewards (P, G+1), plus the
    per-sequence advantages that make Liger's GRPO loss gradient-equivalent to GRAO (see ``_liger_grpo``).
    """
    dev, dt = shape.device, shape.torch_dtype
    gen = torch.Generator(device=dev).manual_seed(seed)
    N, V, H = shape.N, shape.V, shape.H
    hidden = torch.randn(N, H, generator=gen, device=dev, dtype=torch.float32)
    # Rows of a smaller random block with random signs and scales: drawing V x H normals takes seconds on CPU,
    # and the values do not change any method's speed. Logit std ~2: peaked but not degenerate softmaxes.
    base = torch.randn(min(V, 8192), H, generator=gen, device=dev, dtype=torch.float32)
    rows = torch.randint(0, base.shape[0], (V,), generator=gen, device=dev)
    scale = torch.rand(V, 1, generator=gen, device=dev).add_(0.5).mul_(2.0 / math.sqrt(H))
    sign = torch.randint(0, 2, (V, 1), generator=gen, device=dev).mul_(2).sub_(1)
    weight = base.index_select(0, rows).mul_(scale * sign)
    del base, rows
    targets = torch.randint(0, V, (N,), generator=gen, device=dev)
    inp = {"weight": weight.to(dt).requires_grad_(True)}
    del weight
    if op == "logprobs":
        inp["hidden"] = hidden.to(dt).requires_grad_(True)
        inp["targets"] = targets
        inp["grad"] = torch.randn(N, generator=gen, device=dev, dtype=torch.float32)
        return inp
    S = GRAO_P * GRAO_K
    T = N // S
    assert S * T == N, f"N={N} must be a multiple of {S}"
    inp["hidden"] = hidden.view(S, T, H).to(dt).requires_grad_(True)
    inp["targets"] = targets.view(S, T)
    inp["rewards"] = torch.randn(GRAO_P, GRAO_K, generator=gen, device=dev, dtype=torch.float32)
    # Inputs of the GRPO peer, prepared outside the timed region (a trainer has them anyway).
    adv = group_advantages(inp["rewards"]).float()
    coef, _ = token_coefficients(adv, inp["targets"], -100, BETA, LAM)
    inp["liger_adv"] = -S * coef.view(S, T).sum(1)
    inp["liger_mask"] = torch.ones(S, T, dtype=torch.long, device=dev)
    return inp


_inputs_cache: dict = {}


def inputs_cached(op: str, shape: Shape) -> dict:
    """``make_inputs`` kept for the current shape only (the timed cases of one shape share their inputs)."""
    if (op, shape) not in _inputs_cache:
        _inputs_cache.clear()
        gc.collect()
        _inputs_cache[(op, shape)] = make_inputs(op, shape)
    inp = _inputs_cache[(op, shape)]
    clear_grads(inp)
    return inp


def clear_grads(inp: dict) -> None:
    for k in ("hidden", "weight"):
        inp[k].grad = None


def grads_bytes(inp: dict) -> int:
    return sum(inp[k].numel() * inp[k].element_size() for k in ("hidden", "weight"))


# ----------------------------------------------------------------------------
# methods


@dataclass(frozen=True)
class Method:
    key: str  # stable id used in test ids and the JSON
    label: str  # row label in BENCHMARKS.md
    op: str
    kind: str  # "ours" or "peer"
    backend: str | None = None

    @property
    def grads_in_forward(self) -> bool:
        return self.op == "grao" and self.key != "naive"

    def skip_reason(self, shape: Shape) -> str | None:
        return _SKIP[self.key.split("[")[0] if self.kind == "ours" else self.key](self, shape)

    def forward(self, inp: dict):
        return _FWD[self.key.split("[")[0] if self.kind == "ours" else self.key](self, inp)

    def backward(self, out, inp: dict) -> None:
        if self.op == "logprobs":
            # CCE and Liger return -logp: flip the upstream gradient so every method computes the same gradients.
            sign = -1.0 if self.key in ("cce", "liger_flce") else 1.0
            grad = inp["grad"].to(out.dtype)
            out.backward(grad.neg() if sign != 1.0 else grad)
        else:
            out.backward()

    def logp(self, out) -> torch.Tensor | None:
        """The log-probs (logprobs op) or the loss (grao op) to compare; None when not comparable."""
        if self.op == "logprobs":
            return -out.detach().float() if self.key in ("cce", "liger_flce") else out.detach().float()
        if self.key == "liger_grpo":
            return None  # GRPO's loss value is not GRAO's; its gradients are (see _liger_grpo)
        return out.detach().float().reshape(1)


def methods(op: str) -> list[Method]:
    ours = [Method(f"grao_kernels[{b}]", f"grao_kernels ({b})", op, "ours", b) for b in gk_backends.BACKENDS]
    peers = [Method("naive", "naive PyTorch (eager, full logits)", op, "peer")]
    if op == "logprobs":
        peers += [
            Method("cce", "Cut Cross-Entropy", op, "peer"),
            Method("trl", "TRL chunked log-prob", op, "peer"),
            Method("liger_flce", "Liger fused linear CE", op, "peer"),
        ]
    else:
        peers += [Method("liger_grpo", "Liger fused linear GRPO", op, "peer")]
    return ours + peers


def cases(op: str) -> list:
    """pytest params (shape, method key, mode) of ``op`` over every shape, method and mode; GPU shapes marked."""
    return [
        pytest.param(s, m.key, mode, id=f"{s.id}-{m.key}-{mode}", marks=[pytest.mark.gpu] if s.device == "cuda" else [])
        for s in all_shapes()
        for m in methods(op)
        for mode in MODES
    ]


def _ours_skip(m: Method, shape: Shape) -> str | None:
    reason = gk_backends.unavailable_reason(m.backend, torch.device(shape.device))
    if reason is not None:
        return f"backend {m.backend!r} unavailable on {shape.device}: {reason}"
    if m.backend == "triton" and shape.device == "cpu":
        return "the Triton backend on CPU tensors runs under the Triton interpreter, a debugging tool"
    return None


def _ours_fwd(m: Method, inp: dict):
    if m.op == "logprobs":
        return grao_kernels.fused_linear_logprobs(inp["hidden"], inp["weight"], inp["targets"], backend=m.backend)
    out = grao_kernels.grao_loss(
        inp["hidden"], inp["weight"], inp["targets"], inp["rewards"], beta=BETA, lam=LAM, backend=m.backend
    )
    return out.loss


def _naive_fwd(m: Method, inp: dict):
    if m.op == "logprobs":
        return reference_logprobs(inp["hidden"], inp["weight"], inp["targets"])
    return reference_grao(inp["hidden"], inp["weight"], inp["targets"], inp["rewards"], beta=BETA, lam=LAM)["loss"]


def _import_reason(module: str) -> str | None:
    try:
        __import__(module)
    except Exception as exc:  # noqa: BLE001 - any import failure disables the peer, with its message
        return f"{module} is not importable ({type(exc).__name__}: {exc}); install the bench extra"
    return None


def _cce_skip(m: Method, shape: Shape) -> str | None:
    return _import_reason("cut_cross_entropy")


def _cce_fwd(m: Method, inp: dict):
    from cut_cross_entropy import linear_cross_entropy

    # On CPU only the torch.compile implementation runs, and it materialises the logits. Compile one
    # shape-generic graph instead of one per shape (each costs seconds of C++ build on CPU).
    impl = "cce" if inp["hidden"].is_cuda else "torch_compile"
    if impl == "torch_compile":
        torch._dynamo.config.assume_static_by_default = False
    return linear_cross_entropy(inp["hidden"], inp["weight"], inp["targets"], reduction="none", impl=impl)


def _trl_skip(m: Method, shape: Shape) -> str | None:
    return _import_reason("trl.kernels.chunked_logprob")


# TRL's trainer calls the function with this vocabulary chunk (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE).
TRL_CHUNK = 32768


def _trl_fwd(m: Method, inp: dict):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    # (hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs): log-probs only.
    out = ChunkedLogProbFunction.apply(
        inp["hidden"], inp["weight"], None, inp["targets"], 1.0, TRL_CHUNK, None, 1.0, ()
    )
    return out[0]


def _liger_flce_skip(m: Method, shape: Shape) -> str | None:
    if shape.device == "cpu":
        return "Liger's fused linear cross-entropy is a Triton kernel, which cannot run on CPU"
    return _import_reason("liger_kernel.transformers.functional")


def _liger_flce_fwd(m: Method, inp: dict):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(inp["hidden"], inp["weight"], inp["targets"], reduction="none")


def _liger_grpo_skip(m: Method, shape: Shape) -> str | None:
    return _import_reason("liger_kernel.chunked_loss")


@functools.cache
def _liger_grpo_module(compiled: bool):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    # loss_type="grpo" averages each sequence over its tokens then over sequences, as GRAO's J does; no KL, no ref.
    # chunk_size: sequences per chunk. Liger's default of 1 re-accumulates a full (V, H) weight gradient per
    # sequence, 5x slower on CPU at these shapes; one chunk for the batch is its best configuration here.
    return LigerFusedLinearGRPOLoss(
        beta=0.0, compiled=compiled, use_ref_model=False, loss_type="grpo", chunk_size=GRAO_P * GRAO_K
    )


def _liger_grpo(m: Method, inp: dict):
    """Liger's GRPO loss with advantages ``A_s = -S c(s)``: gradient-equivalent to GRAO.

    Without an old policy the importance ratio is exp(logp - logp.detach()) = 1, so the GRPO loss
    ``sum_s sum_t -A_s ratio_t / (n_s S)`` has d/d logp_t = -A_s / (n_s S) = c(s) / n_s, GRAO's coefficient.
    """
    # torch.compile of the loss maths would add a C++ build per shape on CPU; compiled on GPU (Liger's default).
    mod = _liger_grpo_module(inp["hidden"].is_cuda)
    loss, _metrics = mod(inp["hidden"], inp["weight"], inp["targets"], inp["liger_mask"], inp["liger_adv"])
    return loss


_SKIP = {
    "grao_kernels": _ours_skip,
    "naive": lambda m, s: None,
    "cce": _cce_skip,
    "trl": _trl_skip,
    "liger_flce": _liger_flce_skip,
    "liger_grpo": _liger_grpo_skip,
}
_FWD = {
    "grao_kernels": _ours_fwd,
    "naive": _naive_fwd,
    "cce": _cce_fwd,
    "trl": _trl_fwd,
    "liger_flce": _liger_flce_fwd,
    "liger_grpo": _liger_grpo,
}


def method_by_key(op: str, key: str) -> Method:
    return next(m for m in methods(op) if m.key == key)


def warm_up(m: Method, shape: Shape) -> None:
    """One call on a tiny problem: thread pools, lazy imports and (CCE) torch.compile happen here, untimed."""
    tiny = Shape(shape.device, GRAO_P * GRAO_K * 4, 512, 64, shape.dtype)
    inp = make_inputs(m.op, tiny, seed=1)
    m.backward(m.forward(inp), inp)
    sync(shape.device)


# ----------------------------------------------------------------------------
# memory and agreement probe


def _sketch(inp: dict, out, m: Method) -> dict:
    """Comparable summary of a result: log-probs (or loss) and two random projections of dhidden and of dweight.

    A wrong gradient entry changes its projections unless it is orthogonal to the random vectors: probability 0.
    """
    gen = torch.Generator(device=inp["weight"].device).manual_seed(1234)
    V, H = inp["weight"].shape
    u = torch.randn(H, 1, generator=gen, device=inp["weight"].device)
    v = torch.randn(1, V, generator=gen, device=inp["weight"].device)
    dw = inp["weight"].grad.float()
    lp = m.logp(out)
    dh = inp["hidden"].grad.float().reshape(-1, H)
    w = torch.randn(1, dh.shape[0], generator=gen, device=dh.device)
    res = {
        "logp": None if lp is None else lp.cpu(),
        "dh_u": (dh @ u).reshape(-1).cpu(),
        "w_dh": (w @ dh).reshape(-1).cpu(),
        "dw_u": (dw @ u).reshape(-1).cpu(),
        "v_dw": (v @ dw).reshape(-1).cpu(),
    }
    return {k: None if t is None else t.numpy() for k, t in res.items()}


def probe(op: str, key: str, shape: Shape) -> dict:
    """Peak memory of one forward and one forward+backward, and the result sketch (run in a fresh process on CPU).

    Peak memory is above the state once the inputs exist: on GPU ``torch.cuda.max_memory_allocated``, on CPU the
    RSS high-water mark (an allocator-slack over-estimate of live tensors, never an under-estimate).
    """
    m = method_by_key(op, key)
    warm_up(m, shape)
    inp = make_inputs(op, shape)
    gc.collect()
    cuda = shape.device.startswith("cuda")
    if cuda:
        sync(shape.device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        exact = reset_peak_rss()
        base = rss_bytes()

    def peak() -> int:
        if cuda:
            sync(shape.device)
            return torch.cuda.max_memory_allocated() - base
        return peak_rss_bytes() - base

    out = m.forward(inp)
    fwd = peak()
    m.backward(out, inp)
    full = peak()
    res = {
        "peak_forward": fwd,
        "peak_full": full,
        "grad_bytes": grads_bytes(inp),
        "memory_method": "torch.cuda.max_memory_allocated"
        if cuda
        else ("RSS high-water (VmHWM reset), fresh process" if exact else "RSS high-water, fresh process (no reset)"),
    }
    res.update(_sketch(inp, out, m))
    return res


def _probe_shape(op, key, shape_fields):
    torch.set_num_threads(int(os.environ.get("GRAO_BENCH_THREADS", torch.get_num_threads())))
    return probe(op, key, Shape(*shape_fields))


def _isolated_child(conn, fn, args):
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        import traceback

        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def run_isolated(what: str, fn, *args):
    """``fn(*args)`` in a fresh fork of the fork server (``fn`` a module-level function); its result, or a
    RuntimeError carrying the child's traceback."""
    ctx = _forkserver()
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_isolated_child, args=(child, fn, args))
    p.start()
    child.close()
    try:
        status, res = parent.recv()
    except EOFError:
        status, res = "error", "the process died without a result (out of memory?)"
    p.join()
    if status != "ok":
        raise RuntimeError(f"{what} failed: {res}")
    return res


@functools.cache
def _forkserver():
    # A fork server that has imported torch and the peers but never computed anything: each probe is a fresh
    # fork of it (no inherited allocations, thread pools or high-water mark) without paying the imports again.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(
        [
            "torch",
            "torch._dynamo",
            "torch._inductor.compile_fx",
            "grao_kernels",
            "grao_bench",
            "cut_cross_entropy",
            "liger_kernel.chunked_loss",
            "trl.kernels.chunked_logprob",
            "trl.trainer.utils",  # imported by the TRL function's first backward (seconds of transformers imports)
            "grao.trainer",
        ]
    )
    return ctx


_probe_cache: dict = {}


def probe_cached(op: str, key: str, shape: Shape) -> dict:
    """``probe`` once per (op, method, shape): in a fresh process on CPU, in this process on GPU."""
    ck = (op, key, shape)
    if ck in _probe_cache:
        return _probe_cache[ck]
    if shape.device != "cpu":
        res = probe(op, key, shape)
    else:
        res = run_isolated(
            f"probe of {key} ({op}) at {shape.id}", _probe_shape, op, key, tuple(shape.__dict__.values())
        )
    # Keep only the current shape's results: dhidden sketches add up otherwise.
    for k in [k for k in _probe_cache if k[2] != shape]:
        del _probe_cache[k]
    _probe_cache[ck] = res
    return res


def reference_key(m: Method) -> str:
    """What a method's result is checked against: ours (torch backend); the torch backend against naive eager."""
    return "naive" if m.key == "grao_kernels[torch]" else "grao_kernels[torch]"


def check_agreement(m: Method, shape: Shape) -> None:
    """Assert ``m`` agrees with the reference within the dtype's tolerance (relative to the reference's max)."""
    ref = probe_cached(m.op, reference_key(m), shape)
    got = probe_cached(m.op, m.key, shape)
    tol = _TOL[shape.torch_dtype]
    for name in ("logp", "dh_u", "w_dh", "dw_u", "v_dw"):
        a, b = got[name], ref[name]
        if a is None or b is None:
            continue
        scale = max(float(abs(b).max()), 1e-6)
        err = float(abs(a - b).max())
        if not err <= tol * scale:
            bad = int((abs(a - b) > tol * scale).sum())
            raise AssertionError(
                f"{m.label} disagrees with {reference_key(m)} on {name} at {shape.id}: max |diff| {err:.3g} > "
                f"{tol} x max |ref| {scale:.3g} ({bad} of {a.size} elements)"
            )


# ----------------------------------------------------------------------------
# GEMM floor


@functools.lru_cache(maxsize=1)
def _floor_buffers(shape: Shape) -> tuple:
    """Operands and outputs of the three GEMMs; values are irrelevant to their speed (tiled, pages touched)."""
    dev, dt = shape.device, shape.torch_dtype
    N, V, H = shape.N, shape.V, shape.H

    def filled(rows, cols):
        block = torch.randn(min(rows, 4096), cols, device=dev, dtype=dt)
        return block.repeat(-(-rows // block.shape[0]), 1)[:rows].contiguous()

    h, w, dz = filled(N, H), filled(V, H), filled(N, V)
    return h, w, dz, torch.zeros_like(dz), torch.zeros_like(h), torch.zeros_like(w)


def _gemms(shape: Shape) -> dict:
    h, w, dz, z, dh, dw = _floor_buffers(shape)
    return {
        "logits": lambda: torch.mm(h, w.T, out=z),  # Z = h W^T: 2 N V H FLOPs
        "dh": lambda: torch.mm(dz, w, out=dh),  # dH = dZ W: 2 N V H FLOPs
        "dw": lambda: torch.mm(dz.T, h, out=dw),  # dW = dZ^T h: 2 N V H FLOPs
    }


@functools.cache
def floor_times(shape: Shape) -> dict:
    """Best time of each of the three full-size GEMMs (logits, dH, dW) on this device, in seconds."""
    dev = shape.device
    reps = 2 if dev == "cpu" else 10
    best = {}
    for name, fn in _gemms(shape).items():
        if dev != "cpu":
            fn()  # CPU buffers are already touched; a CPU warm-up GEMM would only cost time
            sync(dev)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            sync(dev)
            ts.append(time.perf_counter() - t0)
        best[name] = min(ts)
    return {
        "forward": best["logits"],
        "backward": best["dh"] + best["dw"],
        "full": best["logits"] + best["dh"] + best["dw"],
        "gemm_gflops": 2 * shape.N * shape.V * shape.H / best["logits"] / 1e9,
    }


def floor_gemms(shape: Shape):
    """The three GEMMs as one callable, for the floor's own row (6 N V H FLOPs)."""
    fns = list(_gemms(shape).values())

    def run():
        for fn in fns:
            fn()
        sync(shape.device)

    return run


# ----------------------------------------------------------------------------
# the timed benchmark


_last_forward: dict = {}


def run_case(benchmark, op: str, key: str, mode: str, shape: Shape) -> None:
    """Check ``key`` against ours, time ``mode`` at ``shape``, and record the results in ``extra_info``."""
    import pytest

    reason = shape_skip_reason(shape)
    m = method_by_key(op, key)
    reason = reason or m.skip_reason(shape)
    if reason:
        pytest.skip(reason)
    try:
        _run_case(benchmark, op, m, mode, shape)
    except torch.cuda.OutOfMemoryError:
        _inputs_cache.clear()
        _last_forward.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        pytest.skip(f"{m.label} runs out of device memory at {shape.id}")


def _run_case(benchmark, op: str, m: Method, mode: str, shape: Shape) -> None:
    key = m.key
    check_agreement(m, shape)  # before any timing: a fast wrong number is never recorded
    mem = probe_cached(op, key, shape)
    floor = floor_times(shape)
    _floor_buffers.cache_clear()  # the floor's (N, V) operands are not needed past this point
    warm_up(m, shape)
    inp = inputs_cached(op, shape)
    dev = shape.device

    def setup_clear():
        clear_grads(inp)
        return (), {}

    def forward():
        out = m.forward(inp)
        sync(dev)
        return out

    def setup_backward():
        # The forward case's last output, when it ran just before: saves a forward per case.
        out = _last_forward.pop((op, key, shape), None)
        if out is None:
            clear_grads(inp)
            out = m.forward(inp)
            sync(dev)
        return (out,), {}

    def backward(out):
        m.backward(out, inp)
        sync(dev)

    def full():
        m.backward(m.forward(inp), inp)
        sync(dev)

    target, setup = {
        "forward": (forward, setup_clear),
        "backward": (backward, setup_backward),
        "full": (full, setup_clear),
    }[mode]
    n_rounds, n_warm = rounds(shape)
    out = benchmark.pedantic(target, setup=setup, rounds=n_rounds, warmup_rounds=n_warm, iterations=1)
    _last_forward.clear()
    if mode == "forward":
        _last_forward[(op, key, shape)] = out
    del out
    if benchmark.stats is None:  # --benchmark-disable: the body ran once as a smoke test, nothing to record
        return
    t = benchmark.stats.stats.min
    peak = mem["peak_forward"] if mode == "forward" else mem["peak_full"]
    grads = mem["grad_bytes"]
    # grao_loss and Liger's GRPO loss hold the finished gradients from their forward on; the others allocate them
    # in the backward, after the forward's peak.
    fwd_working = mem["peak_forward"] - (grads if m.grads_in_forward else 0)
    benchmark.extra_info.update(
        {
            "op": op,
            "method": key,
            "label": m.label,
            "kind": m.kind,
            "mode": mode,
            "shape": shape.id,
            "N": shape.N,
            "V": shape.V,
            "H": shape.H,
            "dtype": shape.dtype,
            "device": dev,
            "device_name": device_name(dev),
            "time_s": t,
            "tokens_per_s": shape.N / t,
            "floor_s": floor[mode],
            "x_floor": t / floor[mode],
            "floor_gemm_gflops": floor["gemm_gflops"],
            # Peak above the inputs; the backward's peak is that of the whole step it ends (its forward's saved
            # state included). "working" leaves out the returned gradients, which every method allocates alike.
            "peak_mem_bytes": peak,
            "peak_working_bytes": fwd_working if mode == "forward" else max(fwd_working, peak - grads),
            "grad_bytes": mem["grad_bytes"],
            "memory_method": mem["memory_method"],
            "checked_against": reference_key(m),
        }
    )


def run_floor(benchmark, shape: Shape) -> None:
    """The three GEMMs as their own row: the yardstick of every ratio at this shape."""
    import pytest

    reason = shape_skip_reason(shape)
    if reason:
        pytest.skip(reason)
    floor = floor_times(shape)
    fn = floor_gemms(shape)
    n_rounds, n_warm = rounds(shape)
    benchmark.pedantic(fn, rounds=n_rounds, warmup_rounds=n_warm, iterations=1)
    del fn
    _floor_buffers.cache_clear()
    if benchmark.stats is None:  # --benchmark-disable: the body ran once as a smoke test, nothing to record
        return
    t = benchmark.stats.stats.min
    benchmark.extra_info.update(
        {
            "op": "floor",
            "method": "gemm_floor",
            "label": "GEMM floor (logits, dH, dW)",
            "kind": "floor",
            "mode": "full",
            "shape": shape.id,
            "N": shape.N,
            "V": shape.V,
            "H": shape.H,
            "dtype": shape.dtype,
            "device": shape.device,
            "device_name": device_name(shape.device),
            "time_s": t,
            "tokens_per_s": shape.N / t,
            "floor_s": floor["full"],
            "x_floor": t / floor["full"],
            "floor_gemm_gflops": floor["gemm_gflops"],
            "floor_forward_s": floor["forward"],
            "floor_backward_s": floor["backward"],
            "peak_mem_bytes": None,
        }
    )

"""The one measurement harness: shapes, inputs, methods, oracle gate, GEMM floor, memory probe, timing.

Front ends: the pytest-benchmark suite (``benchmarks/test_bench_*.py``), the GPU check (``benchmarks/gpu/check.py``),
the native floor script (``benchmarks/native_floor.py``) and the memory test (``tests/test_memory.py``, through
``python benchmarks/harness.py probe``). ``benchmarks/render.py`` turns their results into Markdown and plots.

Every method is one entry of ``METHODS``: ``fwd(inp, op) -> (value, loss)``, where ``value`` is what is compared
with the oracle (the log-probs for the ``logprobs`` op, the loss otherwise; None when not comparable) and ``loss``
the scalar whose gradients (dH, dW) are taken. Log-prob methods are trained on ``sum_t coef_t logp_t`` with the
GRAO token coefficients, so every op has the same gradients and one float64 oracle serves them all.

FLOP counts (N tokens, V vocabulary entries, H hidden size; one multiply-add = 2 FLOPs): the logits ``Z = h W^T``,
``dH = dZ W`` and ``dW = dZ^T h`` are 2 N V H each. No method avoids these three products, so their time on this
device (the "GEMM floor") is the yardstick: the forward against the logits GEMM, the backward against dH + dW,
forward+backward against all three. A logits-free method that recomputes the logits in its backward does a fourth
product: about 1.33x the floor is its best forward+backward.

Honesty rules: every method passes the oracle gate (``gate``) before it is timed; ratios are taken within one run
(the floor is timed in the same process, interleaved with the methods where a front end repeats); a method that
cannot run is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import grao_kernels
from grao_kernels import backends as gk_backends
from grao_kernels.testing import peak_meter, reference_grao, reference_linear_loss, reference_logprobs, rel_l2

OPS = ("logprobs", "grao", "entropy")  # entropy: linear_logprob_loss with an entropy bonus
K = 4  # sequences per GRAO group: G = 3 completions and the reference answer, last
BETA, LAM, ENT = 0.5, 0.6, 0.01  # GRAO's beta and lambda; the entropy bonus weight
FACTOR, FLOOR = 2.0, 1e-3  # gate: relative L2 error <= FACTOR x eager PyTorch's own error + FLOOR


# device and shapes


def bench_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``; ``GRAO_BENCH_DEVICE`` overrides."""
    return os.environ.get("GRAO_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import cpuinfo  # py-cpuinfo, pytest-benchmark's: the CPU name its JSON records as machine_info

    return f"{cpuinfo.get_cpu_info().get('brand_raw', 'CPU')}, {torch.get_num_threads()} threads"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Shape:
    device: str
    N: int
    V: int
    H: int
    dtype: str = "float32"
    ignored: float = 0.0  # share of targets set to ignore_index

    @property
    def id(self) -> str:
        return f"{self.device}-N{self.N}-V{self.V}-H{self.H}-{self.dtype}" + (
            f"-ign{self.ignored}" * bool(self.ignored)
        )


# The CPU set must finish within ~10 minutes on 2 shared cores at ~70 GFLOP/s: one N x V x H GEMM at N=128,
# V=151936, H=1024 is 40 GFLOP and each method case runs the op a few times. GRAO_BENCH_CPU_TOKENS scales N.
CPU_TOKENS = int(os.environ.get("GRAO_BENCH_CPU_TOKENS", 128))
CPU_SHAPES = [Shape("cpu", CPU_TOKENS, V, H) for H in (256, 1024) for V in (32000, 65536, 151936)]
GPU_SHAPES = [Shape("cuda", N, V, 4096, "bfloat16") for N in (8192, 32768) for V in (128256, 151936, 262144)]


def shape_skip_reason(shape: Shape) -> str | None:
    dev = bench_device()
    if shape.device == "cuda" and not torch.cuda.is_available():
        return "GPU shape set: needs a CUDA device"
    if shape.device != dev.split(":")[0]:
        return f"CPU shape set: this run benchmarks {dev} (set GRAO_BENCH_DEVICE=cpu to run it)"
    return None


# the one input factory


def layout(N: int) -> tuple[int, int]:
    """(S, T): S = P K sequences of T tokens, about 512 tokens each once N allows."""
    S = K * max(2, N // (K * 512))
    if N % S:
        raise ValueError(f"N={N} tokens must be a multiple of {S} sequences")
    return S, N // S


def make_inputs(shape: Shape, seed: int = 0) -> dict:
    """Deterministic inputs of every op at ``shape``; the leaves ``hidden`` (N, H) and ``weight`` require grad.

    Also: ``targets`` (N,) with ``shape.ignored`` of them ignore_index, GRAO ``rewards`` (P, K), the GRAO token
    coefficients ``coef`` (N,), the entropy bonus ``ent_coef`` (N,), and the per-sequence advantages that make
    Liger's GRPO loss gradient-equivalent to GRAO (see ``_liger_grpo``), prepared outside any timed region.
    """
    dev, dt, (N, V, H) = shape.device, getattr(torch, shape.dtype), (shape.N, shape.V, shape.H)
    gen = torch.Generator(device=dev).manual_seed(seed)
    S, T = layout(N)
    hidden = torch.randn(N, H, generator=gen, device=dev)
    # Rows of a smaller random block with random signs and scales: drawing V x H normals takes seconds on CPU,
    # and the values do not change any method's speed. Logit std ~2: peaked but not degenerate softmaxes.
    base = torch.randn(min(V, 8192), H, generator=gen, device=dev)
    rows = torch.randint(0, base.shape[0], (V,), generator=gen, device=dev)
    scale = torch.rand(V, 1, generator=gen, device=dev).add_(0.5).mul_(2.0 / math.sqrt(H))
    sign = torch.randint(0, 2, (V, 1), generator=gen, device=dev).mul_(2).sub_(1)
    weight = base.index_select(0, rows).mul_(scale * sign)
    targets = torch.randint(0, V, (N,), generator=gen, device=dev)
    if shape.ignored:
        targets[torch.rand(N, generator=gen, device=dev) < shape.ignored] = -100
    rewards = torch.randn(S // K, K, generator=gen, device=dev)
    coefs = grao_kernels.grao_coefficients(rewards, group_size=K - 1, beta=BETA, lam=LAM)
    valid = targets != -100
    return {
        "hidden": hidden.to(dt).requires_grad_(True),
        "weight": weight.to(dt).requires_grad_(True),
        "targets": targets,
        "rewards": rewards,
        "S": S,
        "T": T,
        "coef": coefs.token_coef(targets.view(S, T)).reshape(-1).float().contiguous(),
        "ent_coef": torch.where(valid, -ENT / valid.sum().clamp(min=1), 0.0).float(),
        "liger_adv": (-S * coefs.seq_coef).float().to(dev),
        "liger_mask": valid.view(S, T).long(),
        "valid": valid,
        "any_ignored": bool(shape.ignored),
    }


# methods: one entry each in METHODS


@dataclass(frozen=True)
class Method:
    key: str  # stable id: test ids, JSON, command lines
    label: str  # row label in the tables
    ops: tuple[str, ...]
    fwd: Callable  # (method, inp, op) -> (value or None, scalar loss)
    kind: str = "peer"  # "ours" or "peer"
    skip: Callable = lambda m, shape: None  # (method, shape) -> reason or None
    backend: str | None = None  # None for "naive": the eager reference
    settings: dict = field(default_factory=dict)  # grao_kernels.settings attributes set around each call
    needs: str | None = None  # the peer's module: the method is skipped when it cannot be imported

    def skip_reason(self, shape: Shape, op: str) -> str | None:
        if op not in self.ops:
            return f"{self.label} has no {op} op"
        return self.skip(self, shape) or (import_error(self.needs) if self.needs else None)

    def forward(self, inp: dict, op: str):
        with _settings(self.settings):
            return self.fwd(self, inp, op)

    def backward(self, loss: torch.Tensor, inp: dict):
        with _settings(self.settings):
            return torch.autograd.grad(loss, (inp["hidden"], inp["weight"]))

    def run(self, inp: dict, op: str):
        """(value, dH, dW)."""
        value, loss = self.forward(inp, op)
        return (value, *self.backward(loss, inp))

    def grads_in_forward(self, op: str) -> bool:
        """grao_loss, linear_logprob_loss and Liger's GRPO loss hold the finished gradients from their forward."""
        return op != "logprobs" and self.key != "naive"


def import_error(module: str, extra: str = "bench") -> str | None:
    """Why ``module`` cannot be imported (any failure disables what needs it, with its message), or None."""
    try:
        __import__(module)
    except Exception as exc:  # noqa: BLE001
        return f"{module} is not importable ({type(exc).__name__}: {exc}); install the {extra} extra"
    return None


@contextlib.contextmanager
def _settings(values: dict):
    saved = {k: getattr(grao_kernels.settings, k) for k in values}
    for k, v in values.items():
        setattr(grao_kernels.settings, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(grao_kernels.settings, k, v)


def _weighted(logp, inp):
    return logp.detach().float(), (inp["coef"] * logp.float()).sum()


def _ours_fwd(m: Method, inp: dict, op: str):
    """grao_kernels on ``m.backend``, or the eager reference (``grao_kernels.testing``, full logits) when it is None."""
    h, w, t, S, T, naive = inp["hidden"], inp["weight"], inp["targets"], inp["S"], inp["T"], m.backend is None
    if op == "logprobs":
        lp = reference_logprobs(h, w, t) if naive else grao_kernels.fused_linear_logprobs(h, w, t, backend=m.backend)
        return _weighted(lp, inp)
    if op == "grao":
        args, kw = (h.view(S, T, -1), w, t.view(S, T), inp["rewards"]), dict(beta=BETA, lam=LAM)
        if naive:
            loss = reference_grao(*args, **kw)["loss"]
        else:
            loss = grao_kernels.grao_loss(*args, group_size=K - 1, **kw, backend=m.backend).loss
    else:
        args, kw = (h, w, t, inp["coef"]), dict(entropy_coef=inp["ent_coef"])
        if naive:
            loss = reference_linear_loss(*args, **kw)
        else:
            loss = grao_kernels.linear_logprob_loss(*args, **kw, backend=m.backend).loss
    return loss.detach().float().reshape(1), loss


def _ours_skip(m: Method, shape: Shape) -> str | None:
    reason = gk_backends.unavailable_reason(m.backend, torch.device(shape.device))
    if reason is not None:
        return f"backend {m.backend!r} unavailable on {shape.device}: {reason}"
    if m.backend == "triton" and shape.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "the Triton backend on CPU tensors runs under the Triton interpreter, a debugging tool"
    return None


def _cce(m: Method, inp: dict, op: str):
    from cut_cross_entropy import linear_cross_entropy

    # On CPU only the torch.compile implementation runs, and it materialises the logits. Compile one
    # shape-generic graph instead of one per shape (each costs seconds of C++ build on CPU).
    impl = "cce" if inp["hidden"].is_cuda else "torch_compile"
    if impl == "torch_compile":
        torch._dynamo.config.assume_static_by_default = False
    nll = linear_cross_entropy(inp["hidden"], inp["weight"], inp["targets"], reduction="none", impl=impl)
    return _weighted(-nll, inp)


TRL_CHUNK = 32768  # TRL's trainer calls the function with this chunk (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE)


def _trl(m: Method, inp: dict, op: str):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    h, t, valid = inp["hidden"], inp["targets"], inp["valid"]
    if inp.get("any_ignored"):  # TRL takes valid rows only
        h, t = h[valid], t[valid]
    # (hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs): log-probs only.
    lp = ChunkedLogProbFunction.apply(h, inp["weight"], None, t, 1.0, TRL_CHUNK, None, 1.0, ())[0]
    if inp.get("any_ignored"):
        lp = torch.zeros(valid.shape, device=lp.device, dtype=lp.dtype).masked_scatter(valid, lp)
    return _weighted(lp, inp)


def _liger_flce(m: Method, inp: dict, op: str):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    nll = liger_fused_linear_cross_entropy(inp["hidden"], inp["weight"], inp["targets"], reduction="none")
    return _weighted(-(nll[0] if isinstance(nll, tuple) else nll), inp)


def _liger_flce_skip(m: Method, shape: Shape) -> str | None:
    if shape.device == "cpu":
        return "Liger's fused linear cross-entropy is a Triton kernel, which cannot run on CPU"
    return None


@functools.cache
def _liger_grpo_module(compiled: bool, S: int):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    # loss_type="grpo" averages each sequence over its tokens then over sequences, as GRAO's J does; no KL, no ref.
    # chunk_size: sequences per chunk. Liger's default of 1 re-accumulates a full (V, H) weight gradient per
    # sequence, 5x slower on CPU at these shapes; one chunk for the batch is its best configuration here.
    return LigerFusedLinearGRPOLoss(beta=0.0, compiled=compiled, use_ref_model=False, loss_type="grpo", chunk_size=S)


def _liger_grpo(m: Method, inp: dict, op: str):
    """Liger's GRPO loss with advantages ``A_s = -S c(s)``: gradient-equivalent to GRAO (its loss value is not).

    Without an old policy the importance ratio is exp(logp - logp.detach()) = 1, so the GRPO loss
    ``sum_s sum_t -A_s ratio_t / (n_s S)`` has d/d logp_t = -A_s / (n_s S) = c(s) / n_s, GRAO's coefficient.
    """
    S, T = inp["S"], inp["T"]
    # torch.compile of the loss maths would add a C++ build per shape on CPU; compiled on GPU (Liger's default).
    mod = _liger_grpo_module(inp["hidden"].is_cuda, S)
    safe = inp["targets"].clamp(min=0).view(S, T)
    loss, _ = mod(inp["hidden"].view(S, T, -1), inp["weight"], safe, inp["liger_mask"], inp["liger_adv"])
    return None, loss


def _ours(backend: str, mode: str | None = None, **knobs) -> Method:
    """grao_kernels on one backend (and, for triton, one ``settings.triton_mode``), with ``knobs`` set in
    ``grao_kernels.settings`` while it runs."""
    key, label = (f"{backend}-{mode}", f"{backend}, {mode}") if mode else (backend, backend)
    extra = {"triton_mode": mode, **knobs} if mode else dict(knobs)
    return Method(f"grao_kernels[{key}]", f"grao_kernels ({label})", OPS, _ours_fwd, "ours", _ours_skip, backend, extra)


LF = "liger_kernel.transformers.functional"
# Adding a peer or a mode is one entry here.
METHODS: dict[str, Method] = {
    m.key: m
    for m in [
        _ours("torch"),
        _ours("native"),
        # The chunked sweep within its 1 GiB workspace goal; the fused one at a small budget (its workspace
        # does not grow with V, and a small budget keeps "auto" choices out of its way).
        _ours("triton", "chunked", memory_budget=2**30),
        _ours("triton", "fused", memory_budget=64 * 2**20),
        Method("naive", "naive PyTorch (eager, full logits)", OPS, _ours_fwd),
        Method("cce", "Cut Cross-Entropy", ("logprobs",), _cce, needs="cut_cross_entropy"),
        Method("trl", "TRL chunked log-prob", ("logprobs",), _trl, needs="trl.kernels.chunked_logprob"),
        Method("liger_flce", "Liger fused linear CE", ("logprobs",), _liger_flce, skip=_liger_flce_skip, needs=LF),
        Method("liger_grpo", "Liger fused linear GRPO", ("grao",), _liger_grpo, needs="liger_kernel.chunked_loss"),
    ]
}


def methods_for(op: str) -> list[Method]:
    return [m for m in METHODS.values() if op in m.ops]


def warm_up(m: Method, op: str, shape: Shape) -> None:
    """One call on a tiny problem: thread pools, lazy imports, compilation and autotuning happen here, untimed."""
    inp = make_inputs(Shape(shape.device, K * 2 * 8, 512, 64, shape.dtype), seed=1)
    m.run(inp, op)
    sync(shape.device)


# the oracle, sketches and the gate


def _sketch(value, dh, dw) -> dict:
    """Comparable summary: the value, and dH u, dW u for a fixed random u (H,).

    For a Gaussian u, E|E u|^2 = |E|_F^2 for any matrix E, so the relative L2 error of ``X u`` estimates that of X
    (over N, resp. V, entries); a wrong entry changes it unless orthogonal to u: probability 0.
    """
    gen = torch.Generator(device=dh.device).manual_seed(1234)
    u = torch.randn(dh.shape[-1], 1, generator=gen, device=dh.device, dtype=torch.float64)
    return {
        "value": None if value is None else value.double().cpu().numpy(),
        "dh": (dh.reshape(-1, u.shape[0]).double() @ u).reshape(-1).cpu().numpy(),
        "dw": (dw.double() @ u).reshape(-1).cpu().numpy(),
    }


def oracle(shape: Shape, op: str, dtype: str = "float64") -> dict:
    """Sketch of ``op`` by ``grao_kernels.testing`` in row chunks (no (N, V) float64 exists), computed in ``dtype``.

    float64: the truth. The inputs' dtype: eager PyTorch's own rounding (logits GEMM in that dtype, softmax in
    float32, gradients returned in that dtype), the gate's yardstick, without the full logits' memory.
    """
    inp, dt = make_inputs(shape), getattr(torch, dtype)
    h, t, ent = inp["hidden"].detach(), inp["targets"], inp["ent_coef"] if op == "entropy" else None
    w = inp["weight"].detach().to(dt).requires_grad_(True)
    rows = max(1, (2 << 30 if shape.device == "cuda" else 256 << 20) // (8 * shape.V))
    logp, dh, dw, loss = [], [], torch.zeros(w.shape, dtype=torch.float64, device=w.device), 0.0
    for r in range(0, shape.N, rows):
        hc = h[r : r + rows].to(dt, copy=True).requires_grad_(True)
        sl = slice(r, r + rows)
        part = reference_linear_loss(hc, w, t[sl], inp["coef"][sl], entropy_coef=None if ent is None else ent[sl])
        g_h, g_w = torch.autograd.grad(part, (hc, w))
        dh.append(g_h)
        dw += g_w
        loss += part.item()
        if op == "logprobs":
            with torch.no_grad():
                logp.append(reference_logprobs(hc, w, t[sl]))
    value = torch.cat(logp) if op == "logprobs" else torch.tensor([loss], dtype=torch.float64)
    return _sketch(value, torch.cat(dh), dw.to(dt))


# memory: one probe, run in a fresh process on CPU


def probe(key: str, op: str, shape: Shape, budget: int | None = None) -> dict:
    """Peak memory (``peak_meter``) above the inputs of one forward and of forward+backward, and the sketch."""
    m = METHODS[key]
    with _settings({} if budget is None else {"memory_budget": budget}):
        warm_up(m, op, shape)
        inp = make_inputs(shape)
        gc.collect()
        peak = peak_meter(shape.device)
        value, loss = m.forward(inp, op)
        fwd = peak()
        dh, dw = m.backward(loss, inp)
        full = peak()
    grads = sum(inp[k].numel() * inp[k].element_size() for k in ("hidden", "weight"))
    fwd_working = fwd - (grads if m.grads_in_forward(op) else 0)
    return {
        "peak_forward": fwd,
        "peak_full": full,
        "grad_bytes": grads,
        # "working" leaves out the returned gradients, which every method allocates alike
        "working_forward": fwd_working,
        "working_full": max(fwd_working, full - grads),
        "logits_bytes": shape.N * shape.V * 4,
        "memory_method": "torch.cuda.max_memory_allocated" if shape.device != "cpu" else "RSS high-water mark",
        **_sketch(value, dh, dw),
    }


def _child(conn, fn, args):
    try:
        torch.set_num_threads(int(os.environ.get("GRAO_BENCH_THREADS", torch.get_num_threads())))
        conn.send(("ok", fn(*args)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        import traceback

        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        conn.close()


@functools.cache
def _forkserver():
    # A fork server that has imported torch and the peers but never computed anything: each probe is a fresh
    # fork of it (no inherited allocations, thread pools or high-water mark) without paying the imports again.
    ctx = multiprocessing.get_context("forkserver")
    preload = ["torch", "torch._dynamo", "torch._inductor.compile_fx", "grao_kernels", "harness", "grao.trainer"]
    preload += ["cut_cross_entropy", "liger_kernel.chunked_loss", "trl.kernels.chunked_logprob", "trl.trainer.utils"]
    ctx.set_forkserver_preload(preload)
    return ctx


def fresh(what: str, fn, *args):
    """``fn(*args)`` (a module-level function) in a fresh fork of the fork server; its result or a RuntimeError."""
    ctx = _forkserver()
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, fn, args))
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


_cache: dict = {}


def cached(kind: str, *args):
    """``probe`` / ``oracle`` once per arguments, keeping the current shape's results only."""
    shape = next(a for a in args if isinstance(a, Shape))
    for k in [k for k in _cache if shape not in k]:
        del _cache[k]
    if (kind, *args) not in _cache:
        fn = {"probe": probe, "oracle": oracle}[kind]
        # In a fresh process on CPU (memory and the oracle's float64 buffers alike), in this one on a GPU.
        _cache[(kind, *args)] = fn(*args) if shape.device != "cpu" else fresh(f"{kind} {args}", fn, *args)
    return _cache[(kind, *args)]


def check(key: str, op: str, shape: Shape) -> tuple[dict, dict, dict, list[str]]:
    """The gate: (memory probe, errors, eager's errors, the quantities failing) of ``key`` at ``shape``.

    Errors: relative L2 against the float64 oracle (dH, dW estimated on their sketches). A quantity fails when its
    error exceeds FACTOR x that of eager PyTorch in the inputs' dtype (``oracle`` in that dtype) + FLOOR.
    """
    ref, eager = cached("oracle", shape, op), cached("oracle", shape, op, shape.dtype)
    got = cached("probe", key, op, shape)
    errs, base = (
        {k: rel_l2(r[k], ref[k]) for k in ("value", "dh", "dw") if r.get(k) is not None} for r in (got, eager)
    )
    return got, errs, base, [k for k, e in errs.items() if not e <= FACTOR * base.get(k, 0.0) + FLOOR]


# GEMM floor and timing


@functools.lru_cache(maxsize=1)
def floor_gemms(shape: Shape) -> dict:
    """The three full-size products as callables on preallocated buffers (values do not change their speed)."""
    dev, dt, (N, V, H) = shape.device, getattr(torch, shape.dtype), (shape.N, shape.V, shape.H)

    def filled(rows, cols):
        block = torch.randn(min(rows, 4096), cols, device=dev, dtype=dt)
        return block.repeat(-(-rows // block.shape[0]), 1)[:rows].contiguous()

    h, w, dz = filled(N, H), filled(V, H), filled(N, V)
    z, dh, dw = torch.empty_like(dz), torch.empty_like(h), torch.empty_like(w)
    return {
        "logits": lambda: torch.mm(h, w.T, out=z),  # Z = h W^T
        "dh": lambda: torch.mm(dz, w, out=dh),  # dH = dZ W
        "dw": lambda: torch.mm(dz.T, h, out=dw),  # dW = dZ^T h
    }


def floor_all(shape: Shape) -> Callable:
    fns = list(floor_gemms(shape).values())
    return lambda: [fn() for fn in fns]


@functools.cache
def floor_times(shape: Shape) -> dict:
    """Best time of each GEMM, and the floors of forward, backward and forward+backward, in seconds."""
    best = {}
    for name, fn in floor_gemms(shape).items():
        fn()
        best[name] = min(timed(fn, shape.device)[0] for _ in range(2 if shape.device == "cpu" else 10))
    return {
        "forward": best["logits"],
        "backward": best["dh"] + best["dw"],
        "full": sum(best.values()),
        "gemm_gflops": 2 * shape.N * shape.V * shape.H / best["logits"] / 1e9,
    }


def timed(fn, device: str) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result) of one synchronised call."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, out


def compare(shapes, cases, reps: int, deadline_s: float | None = None, log=print) -> dict:
    """Forward+backward of each (method key, op) at each shape against the floor: gate, memory, interleaved time.

    Per repetition the floor and every method that passed its gate run back to back; the ratio method / floor is
    taken per repetition and the median reported, for wall and for process CPU time.
    """
    t_start, results = time.time(), []
    for shape in shapes:
        res = {"shape": shape.__dict__, "grad_bytes": None, "rows": []}
        timers, inp = {"floor": floor_all(shape)}, None
        for key, op in cases:
            m, row = METHODS[key], {"method": key, "label": METHODS[key].label, "op": op, "kind": METHODS[key].kind}
            res["rows"].append(row)
            reason = m.skip_reason(shape, op)
            if reason or (deadline_s and time.time() - t_start > deadline_s):
                row["status"] = f"skipped: {reason or 'time budget'}"
                continue
            try:
                mem, row["errors"], res.setdefault("eager_errors", {})[op], bad = check(key, op, shape)
            except Exception as exc:  # a peer's version mismatch or an out-of-memory must not hide the other rows
                row["status"] = f"error: {str(exc).strip().splitlines()[-1][:200]}"  # the child's last traceback line
                continue
            if bad:  # a fast wrong number is never timed
                row["status"] = "FAIL: " + ", ".join(bad)
                continue
            row.update({k: mem[k] for k in ("peak_full", "working_full", "grad_bytes", "memory_method")}, status="ok")
            res["grad_bytes"] = mem["grad_bytes"]
            inp = inp or make_inputs(shape)
            warm_up(m, op, shape)  # in this process too: lazy imports and compilation stay out of the timing
            timers[(key, op)] = functools.partial(m.run, inp, op)
            log(f"[{shape.id}] {key} {op}: errors {row['errors']}, peak {mem['peak_full'] / 2**20:.0f} MiB")
        times = {k: [] for k in timers}
        for rep in range(reps):
            for k, fn in timers.items():
                times[k].append(timed(fn, shape.device)[:2])  # not the outputs: they would pile up
            log(
                f"[{shape.id}] rep {rep}: "
                + ", ".join(f"{k[0] if k != 'floor' else k} {v[-1][0]:.3f}s" for k, v in times.items())
            )
        fl = times.pop("floor")
        res["floor_s"] = statistics.median(t[0] for t in fl)
        for row in res["rows"]:
            ts = times.get((row["method"], row["op"]))
            if ts:
                row["time_s"] = statistics.median(t[0] for t in ts)
                row["x_floor"] = [t[0] / f[0] for t, f in zip(ts, fl)]
                row["x_floor_cpu"] = [t[1] / f[1] for t, f in zip(ts, fl)]
        floor_gemms.cache_clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        results.append(res)
    return {"device": device_name(shapes[0].device) if shapes else "", "torch": torch.__version__, "results": results}


# the pytest-benchmark suite: forward, backward and forward+backward of each method against the floor

MODES = ("forward", "backward", "full")


def cases(op: str) -> list:
    """pytest params (shape, method key, mode) of ``op`` over the suite's shapes; GPU shapes marked ``gpu``."""
    import pytest

    return [
        pytest.param(s, m.key, mode, id=f"{s.id}-{m.key}-{mode}", marks=[pytest.mark.gpu] * (s.device == "cuda"))
        for s in CPU_SHAPES + GPU_SHAPES
        for m in methods_for(op)
        for mode in MODES
    ]


def rounds(device: str) -> tuple[int, int]:
    """(rounds, warm-up rounds) per timed case."""
    return int(os.environ.get("GRAO_BENCH_ROUNDS", 1 if device == "cpu" else 5)), int(device != "cpu")


def _record(benchmark, shape: Shape, floor: dict, mode: str, **info) -> None:
    """The row of one timed case in ``extra_info``: its time against the floor of ``mode`` at ``shape``."""
    t = benchmark.stats.stats.min
    info.update({k: getattr(shape, k) for k in ("device", "N", "V", "H", "dtype")}, shape=shape.id, mode=mode)
    info.update(device_name=device_name(shape.device), time_s=t, tokens_per_s=shape.N / t, floor_s=floor[mode])
    benchmark.extra_info.update(info, x_floor=t / floor[mode], floor_gemm_gflops=floor["gemm_gflops"])


_inputs: dict = {}
_last_forward: dict = {}


def run_case(benchmark, op: str, key: str, mode: str, shape: Shape) -> None:
    """Gate ``key`` against the oracle, time ``mode`` at ``shape``, record the results in ``extra_info``."""
    import pytest

    m = METHODS[key]
    reason = shape_skip_reason(shape) or m.skip_reason(shape, op)
    if reason:
        pytest.skip(reason)
    try:
        mem, errs, naive, bad = check(key, op, shape)  # before any timing: a fast wrong number is never recorded
        assert not bad, f"{m.label} ({op}) fails the gate at {shape.id} on {bad}: {errs}; eager's {naive}"
        _time_case(benchmark, op, m, mode, shape, mem, errs)
    except torch.cuda.OutOfMemoryError:
        _inputs.clear()
        _last_forward.clear()
        gc.collect()
        torch.cuda.empty_cache()
        pytest.skip(f"{m.label} runs out of device memory at {shape.id}")


def _time_case(benchmark, op, m, mode, shape, mem, errs) -> None:
    floor = floor_times(shape)
    floor_gemms.cache_clear()  # the floor's (N, V) operands are not needed past this point
    warm_up(m, op, shape)
    if shape not in _inputs:
        _inputs.clear()
        gc.collect()
        _inputs[shape] = make_inputs(shape)
    inp, dev = _inputs[shape], shape.device

    def forward():
        out = m.forward(inp, op)
        sync(dev)
        return out

    def backward(out):
        m.backward(out[1], inp)
        sync(dev)

    def setup_backward():  # the forward case's last output when it ran just before: saves a forward per case
        return (_last_forward.pop((op, m.key, shape), None) or forward(),), {}

    def full():
        m.run(inp, op)
        sync(dev)

    target, setup = {"forward": (forward, None), "backward": (backward, setup_backward), "full": (full, None)}[mode]
    n_rounds, n_warm = rounds(dev)
    out = benchmark.pedantic(target, setup=setup, rounds=n_rounds, warmup_rounds=n_warm, iterations=1)
    _last_forward.clear()
    if mode == "forward":
        _last_forward[(op, m.key, shape)] = out
    del out
    if benchmark.stats is None:  # --benchmark-disable: the body ran once as a smoke test, nothing to record
        return
    part = "forward" if mode == "forward" else "full"
    # Peak above the inputs; the backward's is that of the whole step it ends (its forward's saved state included).
    # "working" leaves out the returned gradients, which every method allocates alike.
    mem = {"peak_mem_bytes": mem["peak_" + part], "peak_working_bytes": mem["working_" + part], **mem}
    keep = ("peak_mem_bytes", "peak_working_bytes", "grad_bytes", "memory_method")
    info = dict(op=op, method=m.key, label=m.label, kind=m.kind, errors=errs)
    _record(benchmark, shape, floor, mode, **info, **{k: mem[k] for k in keep})


def run_floor(benchmark, shape: Shape) -> None:
    """The three GEMMs as their own row: the yardstick of every ratio at this shape."""
    import pytest

    reason = shape_skip_reason(shape)
    if reason:
        pytest.skip(reason)
    floor, fn = floor_times(shape), floor_all(shape)
    n_rounds, n_warm = rounds(shape.device)
    benchmark.pedantic(lambda: (fn(), sync(shape.device)), rounds=n_rounds, warmup_rounds=n_warm, iterations=1)
    floor_gemms.cache_clear()
    if benchmark.stats is None:
        return
    info = dict(op="floor", method="gemm_floor", label="GEMM floor (logits, dH, dW)", kind="floor", peak_mem_bytes=None)
    _record(
        benchmark, shape, floor, "full", **info, floor_forward_s=floor["forward"], floor_backward_s=floor["backward"]
    )


def main(argv=None) -> int:
    """``python benchmarks/harness.py probe N H V [...]``: one memory probe (tests/test_memory.py) as JSON."""
    import argparse

    ap = argparse.ArgumentParser(description="Print one fresh-process memory probe as JSON.")
    ap.add_argument("what", choices=["probe"])
    for dim in ("N", "H", "V"):
        ap.add_argument(dim, type=int)
    ap.add_argument("--naive", action="store_true", help="the eager reference instead of grao_kernels")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--op", choices=OPS, default="grao")
    ap.add_argument("--entropy", action="store_true", help="--op entropy: linear_logprob_loss with an entropy bonus")
    ap.add_argument("--budget-mb", type=float, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    key = "naive" if args.naive else f"grao_kernels[{args.backend}]"
    budget = None if args.budget_mb is None else int(args.budget_mb * 2**20)
    res = probe(key, "entropy" if args.entropy else args.op, Shape("cpu", args.N, args.V, args.H), budget)
    res["extra_bytes"] = res["peak_full"] - res["grad_bytes"]
    print(json.dumps({k: v for k, v in res.items() if not hasattr(v, "shape")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

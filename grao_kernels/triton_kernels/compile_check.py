"""Compile the triton backend's kernels for NVIDIA GPUs without one (ahead of time, down to cubin).

The interpreter, which the CPU test suite runs, never lowers a kernel, so a
kernel that only fails to compile (a type error in an scf.if, a tile that does
not fit) would pass CI. This compiles the variants the JIT would build, with
the ptxas bundled in the triton wheel; no device is needed.

The launches are not re-typed here: the backend's own ``forward``/``grad`` run
on small CPU tensors (dimensions multiples of 16, as at the benchmark shapes)
with the sweeps' launch helpers replaced, for the duration of ``record``, by
ones that record each launch's arguments instead of running it (the
production launch path carries no hook for this). Each recorded argument is specialised as the
JIT does: a tensor becomes a typed pointer, 16-byte aligned ones get
``tt.divisibility=16``; an int equal to 1 becomes a constant, a multiple of 16
gets the divisibility hint; None is a constant; the heuristics and every
autotuning config supply the constexprs. The epilogue sweep is recorded twice,
with each GEMM1 (``common.tma_gemm1`` answered as on a GPU below and at
compute capability 9); kernels in ``MIN_ARCH`` are built only from that arch up.

    python -m grao_kernels.triton_kernels.compile_check [--arch 90 80] [--dtype bf16 fp32] [--first] [--list]

Each compiled variant's PTX is assembled once more with the same ptxas and
``-v`` to read its register count and spills; a variant that spills registers
to local memory fails the check (a spill costs memory traffic in the inner
loop of a kernel that is meant to be bound by its GEMM).

``--first`` compiles only the first config of each list (the quick test);
``--list`` prints the derived signatures without compiling.
Exit status 0 when everything compiled without spills.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

# Kernels that only run on newer GPUs: TMA descriptors need sm_90 (the launch never picks them below it).
MIN_ARCH = {"lse_partials_tma_kernel": 90}
_PTR = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64", "int64": "i64", "int32": "i32"}


def specialise(value):
    """(type, constant or None, divisible by 16) of one runtime argument, as the JIT specialises it."""
    import torch

    if value is None:
        return "constexpr", None, False
    if isinstance(value, torch.Tensor):
        return "*" + _PTR[str(value.dtype).removeprefix("torch.")], None, value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return "u1", None, False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1, False
        return ("i32" if -(2**31) <= value < 2**31 else "i64"), None, value % 16 == 0
    if isinstance(value, float):
        return "fp32", None, False
    raise TypeError(f"cannot specialise {type(value).__name__}")


def record(dtypes, pick: int = 0):
    """Recorded launches (kernel, args, configs) of every sweep, mode and feature variant, per dtype.

    Each recorded launch reports ``configs[pick]``'s block sizes as the one it ran, so a launch whose arguments
    follow an earlier one's config (the epilogue sweep's dz kernel takes GEMM1's vocabulary tile) is recorded
    for the first config with ``pick=0`` and for the last with ``pick=-1``.
    """
    import torch

    from grao_kernels.backends import Head, triton_backend
    from grao_kernels.settings import settings
    from grao_kernels.triton_kernels import chunked, common, epilogue, fused

    recorded = []
    tma = [False]  # whether the epilogue sweep's GEMM1 is recorded as the TMA kernel (Hopper) or the loads

    def launch(kernel, configs, interpreter_config, grid, args, key=None):
        recorded.append((kernel, dict(args), configs))
        return dict(configs[pick].kwargs)

    def launch_fixed(kernel, grid, args):
        recorded.append((kernel, dict(args), []))

    torch.manual_seed(0)
    patches = [(chunked, "launch", launch), (fused, "launch", launch), (fused, "launch_fixed", launch_fixed)]
    patches += [(epilogue, "launch", launch)]
    # The GEMM1 a GPU of compute capability >= 9 takes for these operands (see common.tma_gemm1).
    patches += [
        (epilogue, "tma_gemm1", lambda device, dtype, w_dtype, H: tma[0] and common.tma_operands(dtype, w_dtype, H))
    ]
    # CPU tensors stand for CUDA ones here.
    patches += [(triton_backend, "check_device", lambda *tensors: None)]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    saved_settings = settings.triton_mode, settings.triton_config
    for mod, name, fn in patches:
        setattr(mod, name, fn)
    settings.triton_config = None
    try:
        for name in dtypes:
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
            N, H, V = 64, 64, 512
            hidden = torch.randn(N, H).to(dtype)
            weight = torch.randn(V, H).to(dtype)
            coef = torch.randn(N)
            for mode in ("chunked", "fused", "epilogue", "epilogue-tma"):
                settings.triton_mode = mode.removesuffix("-tma")
                tma[0] = mode == "epilogue-tma"
                # The benchmark's variant (no bias, soft-cap or entropy, every row valid) ...
                targets = torch.randint(0, V, (N,))
                triton_backend.forward(hidden, weight, None, targets, Head(), -100)
                triton_backend.grad(hidden, weight, None, targets, Head(), -100, coef=coef)
                # ... a bias and ignored rows under the plain head ...
                targets[::3] = -100
                bias = torch.randn(V).to(dtype)
                triton_backend.grad(hidden, weight, bias, targets, Head(), -100, coef=coef)
                # ... and every feature at once.
                head = Head(temperature=0.7, logit_scale=0.5, softcap=30.0)
                stats = triton_backend.forward(hidden, weight, bias, targets, head, -100, entropy=True)
                triton_backend.grad(hidden, weight, bias, targets, head, -100, coef=coef, ent_coef=coef)
                # ... also given the forward's statistics (the backward of fused_linear_logprobs).
                triton_backend.grad(hidden, weight, bias, targets, head, -100, coef=coef, ent_coef=coef, stats=stats)
        return recorded
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)
        settings.triton_mode, settings.triton_config = saved_settings


def jobs(dtypes, first):
    """(label, jit function, signature, constexprs, attrs, options) of every distinct variant and config."""
    from grao_kernels.triton_kernels.common import jit_fn

    seen = set()
    for kernel, args, configs in [*record(dtypes), *record(dtypes, pick=-1)]:
        fn = jit_fn(kernel)
        heur = dict(getattr(kernel, "values", {}))
        base_consts = {k: f(args) for k, f in heur.items()}
        for cfg in (configs[:1] if first else configs) or [None]:
            consts = dict(base_consts, **(cfg.kwargs if cfg is not None else {}))
            sig, attrs = {}, {}
            for i, param in enumerate(fn.params):
                name = param.name
                if param.is_constexpr and name not in consts:
                    consts[name] = args[name]
                if name in consts:
                    sig[name] = "constexpr"
                    continue
                ty, const, div16 = specialise(args[name])
                sig[name] = ty
                if ty == "constexpr":
                    consts[name] = const
                elif div16:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages} if cfg is not None else {}
            key = (fn.__name__, tuple(sig.items()), tuple(sorted(consts.items(), key=str)), tuple(attrs), str(options))
            if key in seen:
                continue
            seen.add(key)
            ptr = next((sig[n] for n in ("hidden_ptr", "logits_ptr", "dz_ptr", "p_ptr") if n in sig), "")
            label = f"{fn.__name__} {ptr} {cfg.kwargs if cfg is not None else ''} flags=" + ",".join(
                f"{k}={v}" for k, v in base_consts.items()
            )
            yield label, fn, sig, consts, attrs, options


def _compile(fn, sig, consts, attrs, options, arch: int):
    """The compiled kernel and its compile time in seconds."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.time()
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return compiled, time.time() - t0


_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers per thread, bytes spilled: stores + loads) that ptxas reports for ``ptx`` on ``sm_<arch>``.

    The ptxas triton itself used for ``arch`` assembles the PTX once more with
    ``-v`` (triton keeps the report only when its log knob is set).
    """
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", src + ".o"]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    spills = sum(int(a) + int(b) for a, b in _SPILLS.findall(log))
    regs = max((int(r) for r in _REGS.findall(log)), default=0)
    return regs, spills


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp16", "fp32"])
    parser.add_argument("--first", action="store_true")
    parser.add_argument("--list", action="store_true", help="print the derived signatures, compile nothing")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile check: unset TRITON_INTERPRET (interpreted kernels are never compiled)", file=sys.stderr)
        return 2
    all_jobs = list(jobs(args.dtype, args.first))
    if args.list:
        for label, _, sig, consts, attrs, _ in all_jobs:
            div = [name for i, name in enumerate(sig) if (i,) in attrs]
            ones = [k for k, v in consts.items() if v == 1 and not isinstance(v, bool)]
            print(f"{label}\n  signature={sig}\n  divisible_by_16={div}\n  equal_to_1={ones}")
        return 0
    failed = skipped = 0
    for arch in args.arch:
        for label, fn, sig, consts, attrs, options in all_jobs:
            if arch < MIN_ARCH.get(fn.__name__, 0):
                skipped += 1
                continue
            try:
                compiled, seconds = _compile(fn, sig, consts, attrs, options, arch)
                regs, spills = ptxas_usage(compiled.asm["ptx"], arch)
            except Exception as exc:
                failed += 1
                print(f"sm_{arch} {label}: FAILED {type(exc).__name__}: {str(exc)[:600]}", flush=True)
                continue
            verdict = "ok" if spills == 0 else "FAILED (spills)"
            failed += spills > 0
            print(f"sm_{arch} {label}: {seconds:.1f}s, {regs} registers, {spills} B spilled: {verdict}", flush=True)
    passed = len(all_jobs) * len(args.arch) - failed - skipped
    print(f"compile check: {passed} passed, {failed} failed, {skipped} not built for their arch", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

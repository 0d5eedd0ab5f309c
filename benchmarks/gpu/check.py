"""GPU check of the triton backend: float64 correctness, speed against the cuBLAS floor and peers, peak memory.

Usage (one CUDA GPU; about 5 minutes on an H100/H200 at the default sizes)::

    python benchmarks/gpu/check.py [OUT]      # OUT: a .md file or a folder (default $OUT, else benchmarks/gpu)

For every vocabulary size (default 151936 and 262144; N = 16384 tokens,
H = 4096, bfloat16 inputs) it

1. computes the float64 ground truth of the log-probs and of the gradients of
   ``sum_t coef_t logp_t`` (coef: GRAO token coefficients) in row chunks, so
   the (N, V) logits never exist at once, and PyTorch's own bfloat16 result
   (logits materialised chunk by chunk, bf16 GEMMs, fp32 softmax, like autograd);
2. runs every method once for its outputs and errors, then times
   forward+backward (median of a few runs, synchronised) and records the peak
   memory above the inputs (``torch.cuda.max_memory_allocated``), which
   includes the returned bf16 gradients, and the workspace: that peak minus
   those gradients, the same for every method;
3. times the cuBLAS floor: the three full-size bf16 GEMMs no method can avoid
   (logits = h W^T, dh = dz W, dW = dz^T h), 3 x 2NVH FLOP.

Writes a markdown table (``gpu_check.md``) and the raw numbers
(``gpu_check.json``) and prints the table. Exit status 0 when every
grao_kernels error is within 2x PyTorch's own bf16 error (+1e-3), 1 otherwise,
2 without a CUDA device.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

DEV = "cuda"  # "cpu" only for --smoke, which runs the script's logic under the Triton interpreter
FACTOR, FLOOR = 2.0, 1e-3  # the oracle suite's bfloat16 tolerance
DEADLINE_S = 7 * 60  # stop starting new measurements after this


# ----------------------------------------------------------------------------
# setup


def make_inputs(N, H, V, dtype, seed=0):
    """bf16 hidden (N, H) and head (V, H) with logits of std ~2, 10% ignored targets, GRAO coefficients."""
    from grao_kernels import api

    g = torch.Generator(device=DEV).manual_seed(seed)
    hidden = torch.randn(N, H, device=DEV, generator=g).to(dtype)
    weight = (torch.randn(V, H, device=DEV, generator=g) * (2.0 / math.sqrt(H))).to(dtype)
    targets = torch.randint(0, V, (N,), device=DEV, generator=g)
    targets[torch.rand(N, device=DEV, generator=g) < 0.1] = -100
    # GRAO layout for grao_loss: S = P (G+1) sequences of T tokens, G + 1 = 4.
    if N % 4:
        raise SystemExit(f"N must be a multiple of 4, got {N}")
    T = 512 if N % 2048 == 0 else N // 4
    S, K = N // T, 4
    rewards = torch.randn(S // K, K, device=DEV, generator=g)
    adv = api.group_advantages(rewards)
    coef, _ = api.token_coefficients(adv, targets.view(S, T), -100, 0.5, 0.6)
    return {"hidden": hidden, "weight": weight, "targets": targets, "coef": coef, "rewards": rewards, "S": S, "T": T}


# ----------------------------------------------------------------------------
# ground truth and PyTorch's own bf16 error, both chunked over rows


def _mm_fp32(a, b):
    """a @ b with fp32 output from bf16 operands (fp32 accumulation, one rounding)."""
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        return (a @ b).float()


@torch.no_grad()
def float64_reference(inp, chunk=1024):
    """(logp, dh, dw) of sum_t coef_t logp_t in float64, returned as float32 (exact to ~1e-7)."""
    h, w, t, coef = inp["hidden"], inp["weight"], inp["targets"], inp["coef"]
    N, H = h.shape
    w64 = w.double()
    dw64 = torch.zeros_like(w64)
    logp = torch.zeros(N, device=DEV)
    dh = torch.zeros(N, H, device=DEV)
    valid = t != -100
    safe = torch.where(valid, t, 0)
    for r0 in range(0, N, chunk):
        r1 = min(r0 + chunk, N)
        hc = h[r0:r1].double()
        z = hc @ w64.T
        lse = z.logsumexp(1)
        zt = z.gather(1, safe[r0:r1, None])[:, 0]
        logp[r0:r1] = torch.where(valid[r0:r1], zt - lse, 0.0).float()
        c = coef[r0:r1].double()
        p = z.sub_(lse[:, None]).exp_()  # in place: z becomes p, then dz
        dz = p.mul_(-c[:, None])
        dz.scatter_add_(1, safe[r0:r1, None], c[:, None])
        dh[r0:r1] = (dz @ w64).float()
        dw64.addmm_(dz.T, hc)
        del z, p, dz, hc
    dw = dw64.float()
    del w64, dw64
    return logp, dh, dw


def pytorch_bf16(inp, chunk=2048):
    """PyTorch's own low-precision result: bf16 logits GEMM, fp32 log-softmax, bf16 gradient GEMMs."""
    h, w, t, coef = inp["hidden"], inp["weight"], inp["targets"], inp["coef"]
    N, H = h.shape
    logp = torch.zeros(N, device=DEV)
    dh = torch.empty_like(h)
    dw = torch.zeros(w.shape, device=DEV)
    valid = t != -100
    safe = torch.where(valid, t, 0)
    for r0 in range(0, N, chunk):
        r1 = min(r0 + chunk, N)
        z = (h[r0:r1] @ w.T).requires_grad_(True)
        lp = z.float().log_softmax(-1).gather(1, safe[r0:r1, None])[:, 0]
        lp = torch.where(valid[r0:r1], lp, 0.0)
        (dz,) = torch.autograd.grad((coef[r0:r1] * lp).sum(), z)  # bf16, as autograd hands it on
        logp[r0:r1] = lp.detach()
        dh[r0:r1] = dz @ w
        dw += _mm_fp32(dz.T, h[r0:r1])
        del z, lp, dz
    return logp, dh, dw.to(h.dtype)


def rel_l2(a, b) -> float:
    """||a - b|| / ||b||, accumulated in float64 over row blocks to bound the temporaries."""
    a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    num = den = 0.0
    for r0 in range(0, a2.shape[0], 8192):
        x, y = a2[r0 : r0 + 8192].float(), b2[r0 : r0 + 8192].float()
        num += (x - y).double().square().sum().item()
        den += y.double().square().sum().item()
    return math.sqrt(num) / math.sqrt(den) if den else math.sqrt(num)


# ----------------------------------------------------------------------------
# methods: each returns (logp (N,) with 0 at ignored rows, dh, dw) of sum_t coef_t logp_t


def _leaves(inp):
    return inp["hidden"].detach().requires_grad_(True), inp["weight"].detach().requires_grad_(True)


def ours_logprobs(backend):
    def run(inp):
        from grao_kernels import fused_linear_logprobs

        h, w = _leaves(inp)
        logp = fused_linear_logprobs(h, w, inp["targets"], backend=backend)
        dh, dw = torch.autograd.grad((inp["coef"] * logp).sum(), (h, w))
        return logp.detach(), dh, dw

    return run


def ours_atomic(inp):
    """The fused single-kernel backward (fp32 atomics) instead of the default dz chunks + cuBLAS."""
    from grao_kernels.triton_kernels.logprob_backward import CONFIGS

    from grao_kernels.backends import triton_backend

    mode = triton_backend._backward_mode
    triton_backend.set_backward_mode("atomic")
    # one pinned config: autotuning it would compile three more kernels inside the time budget
    triton_backend.pin_config("backward", {**CONFIGS[0].kwargs, "num_warps": CONFIGS[0].num_warps})
    try:
        return ours_logprobs("triton")(inp)
    finally:
        triton_backend.set_backward_mode(mode)
        triton_backend.pin_config("backward", None)


def ours_grao(backend):
    def run(inp):
        from grao_kernels import grao_loss

        h, w = _leaves(inp)
        S, T = inp["S"], inp["T"]
        out = grao_loss(h.view(S, T, -1), w, inp["targets"].view(S, T), inp["rewards"], backend=backend)
        dh, dw = torch.autograd.grad(out.loss, (h, w))
        return None, dh, dw

    return run


def naive(inp):
    from grao_kernels.reference import reference_logprobs

    h, w = _leaves(inp)
    logp = reference_logprobs(h, w, inp["targets"])
    dh, dw = torch.autograd.grad((inp["coef"] * logp).sum(), (h, w))
    return logp.detach(), dh, dw


def liger(inp):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    h, w = _leaves(inp)
    loss = liger_fused_linear_cross_entropy(h, w, inp["targets"], reduction="none")
    loss = loss[0] if isinstance(loss, tuple) else loss
    dh, dw = torch.autograd.grad(-(inp["coef"] * loss).sum(), (h, w))
    return -loss.detach().float(), dh, dw


def cce(inp):
    from cut_cross_entropy import linear_cross_entropy

    h, w = _leaves(inp)
    loss = linear_cross_entropy(h, w, inp["targets"], reduction="none")
    dh, dw = torch.autograd.grad(-(inp["coef"] * loss).sum(), (h, w))
    return -loss.detach().float(), dh, dw


def trl_chunked(inp):
    from trl.kernels import ChunkedLogProbFunction

    h, w = _leaves(inp)
    t = inp["targets"]
    valid = t != -100
    lp = ChunkedLogProbFunction.apply(h[valid], w, None, t[valid], 1.0, 32768, None, 1.0, ())[0]
    dh, dw = torch.autograd.grad((inp["coef"][valid] * lp).sum(), (h, w))
    logp = torch.zeros(t.shape, device=DEV).masked_scatter(valid, lp.detach().float())
    return logp, dh, dw


# (name, run, checked against the tolerance, timed repetitions)
METHODS = [
    ("grao_kernels triton, fused_linear_logprobs", ours_logprobs("triton"), True, 3),
    ("grao_kernels triton, grao_loss", ours_grao("triton"), True, 3),
    ("grao_kernels triton, fused_linear_logprobs, atomic backward", ours_atomic, True, 3),
    # fp32 GEMMs over vocabulary tiles: seconds per call at these sizes, so one timed run
    ("grao_kernels torch (2 GiB budget), fused_linear_logprobs", ours_logprobs("torch"), True, 1),
    ("naive PyTorch (materialised logits)", naive, False, 3),
    ("Liger-Kernel fused linear CE (reduction=none)", liger, False, 3),
    ("Cut Cross-Entropy (reduction=none, default filter)", cce, False, 3),
    ("TRL ChunkedLogProbFunction", trl_chunked, False, 3),
]


# ----------------------------------------------------------------------------
# measurement


def _clean():
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize()


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def _allocated() -> int:
    return torch.cuda.memory_allocated() if DEV == "cuda" else 0


def _reset_peak():
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak() -> int:
    return torch.cuda.max_memory_allocated() if DEV == "cuda" else 0


def time_ms(fn, reps=3) -> float:
    """Median wall time of ``fn`` in ms, synchronised (CUDA events on the GPU)."""
    times = []
    for _ in range(reps):
        if DEV != "cuda":
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cublas_floor_ms(inp) -> float:
    """The three bf16 GEMMs of the op at full size: logits, dh = dz W, dW = dz^T h (3 x 2NVH FLOP)."""
    h, w = inp["hidden"], inp["weight"]
    buf = {"z": torch.empty(h.shape[0], w.shape[0], dtype=h.dtype, device=DEV)}
    buf["dh"], buf["dw"] = torch.empty_like(h), torch.empty_like(w)

    def run():
        torch.mm(h, w.T, out=buf["z"])
        torch.mm(buf["z"], w, out=buf["dh"])
        torch.mm(buf["z"].T, h, out=buf["dw"])

    run()
    _sync()
    ms = time_ms(run, reps=5)
    buf.clear()
    _clean()
    return ms


def measure(name, fn, inp, ref, torch_err, ours, reps, t_start):
    row = {"method": name}
    if time.time() - t_start > DEADLINE_S:
        row["status"] = "skipped (time budget)"
        return row
    _clean()
    base = _allocated()
    _reset_peak()
    try:
        logp, dh, dw = fn(inp)  # first call: compiles/autotunes and gives the outputs
        _sync()
        row["peak_extra_first_call_mb"] = (_peak() - base) / 2**20
        errs = {"dh": rel_l2(dh, ref[1]), "dw": rel_l2(dw, ref[2])}
        if logp is not None:
            errs["logp"] = rel_l2(logp, ref[0])
        row["errors"] = errs
        if ours:
            row["within_tolerance"] = all(errs[k] <= FACTOR * torch_err[k] + FLOOR for k in errs)
        del logp, dh, dw
        _clean()
        base = _allocated()
        _reset_peak()
        row["ms"] = time_ms(lambda: fn(inp), reps=reps)
        row["peak_extra_mb"] = (_peak() - base) / 2**20
        row["status"] = "ok"
    except torch.cuda.OutOfMemoryError:
        row["status"] = "out of memory"
    except Exception as exc:  # a peer's version mismatch must not hide the other rows
        row["status"] = f"error: {type(exc).__name__}: {str(exc)[:160]}"
    _clean()
    return row


def run_vocab(N, H, V, dtype, t_start):
    inp = make_inputs(N, H, V, dtype)
    t0 = time.time()
    ref = float64_reference(inp)
    _clean()
    pt = pytorch_bf16(inp)
    torch_err = {"logp": rel_l2(pt[0], ref[0]), "dh": rel_l2(pt[1], ref[1]), "dw": rel_l2(pt[2], ref[2])}
    del pt
    _clean()
    print(f"[V={V}] references in {time.time() - t0:.1f}s; PyTorch bf16 errors {torch_err}", flush=True)
    floor = cublas_floor_ms(inp)
    # grad outputs in the input dtype are part of any method's result, not workspace
    grads_mb = (inp["hidden"].numel() + inp["weight"].numel()) * inp["hidden"].element_size() / 2**20
    rows = []
    for name, fn, ours, reps in METHODS:
        row = measure(name, fn, inp, ref, torch_err, ours, reps, t_start)
        if "peak_extra_mb" in row:
            # every method returns dh and dW in bf16 and holds them at its peak
            row["workspace_mb"] = row["peak_extra_mb"] - grads_mb
        print(f"[V={V}] {name}: {row}", flush=True)
        rows.append(row)
    logits_mb = N * V * 4 / 2**20
    del inp, ref
    _clean()
    return {
        "V": V,
        "N": N,
        "H": H,
        "floor_ms": floor,
        "torch_bf16_errors": torch_err,
        "grads_mb": grads_mb,
        "fp32_logits_mb": logits_mb,
        "rows": rows,
    }


def render(results, device_name) -> str:
    lines = [
        f"# GPU check: {device_name}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"torch {torch.__version__}; bf16 inputs; errors are relative L2 against float64; "
        f"'ok' = within {FACTOR}x PyTorch's own bf16 error + {FLOOR}. Time is forward+backward; "
        "the floor is the three full-size cuBLAS bf16 GEMMs (logits, dh, dW). Peak extra is the peak allocated "
        "above the inputs, including the returned bf16 gradients (their size is in the header); workspace is "
        "peak extra minus those gradients, and its share of the fp32 logits is the next column.",
        "",
    ]
    for res in results:
        te = res["torch_bf16_errors"]
        lines += [
            f"## N={res['N']}, H={res['H']}, V={res['V']}",
            "",
            f"cuBLAS floor {res['floor_ms']:.1f} ms; fp32 logits would be {res['fp32_logits_mb']:.0f} MiB; "
            f"bf16 gradients {res['grads_mb']:.0f} MiB; PyTorch bf16 errors: logp {te['logp']:.2e}, "
            f"dh {te['dh']:.2e}, dW {te['dw']:.2e}",
            "",
            "| method | fwd+bwd ms | x floor | peak extra MiB | workspace MiB | workspace % of fp32 logits "
            "| err logp | err dh | err dW | check |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in res["rows"]:
            if r.get("status") != "ok":
                lines.append(f"| {r['method']} | | | | | | | | | {r.get('status')} |")
                continue
            e = r["errors"]
            check = {True: "ok", False: "FAIL", None: ""}[r.get("within_tolerance")]
            lines.append(
                f"| {r['method']} | {r['ms']:.1f} | {r['ms'] / res['floor_ms']:.2f} | {r['peak_extra_mb']:.0f} | "
                f"{r['workspace_mb']:.0f} | {100 * r['workspace_mb'] / res['fp32_logits_mb']:.1f} | "
                f"{e.get('logp', float('nan')):.2e} | "
                f"{e['dh']:.2e} | {e['dw']:.2e} | {check} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "gpu"))
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--h", type=int, default=4096)
    parser.add_argument("--vocab", type=int, nargs="+", default=[151936, 262144])
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CPU only: run the script's logic at tiny sizes under the Triton interpreter",
    )
    args = parser.parse_args(argv)

    global DEV
    if args.smoke:
        if torch.cuda.is_available():
            raise SystemExit("--smoke is the CPU dry run; on a GPU run the real check")
        os.environ["TRITON_INTERPRET"] = "1"  # before grao_kernels imports any kernel
        DEV = "cpu"
        device_name = "CPU smoke run (Triton interpreter; times and memory are meaningless)"
    elif not torch.cuda.is_available():
        print(
            "gpu check: needs a CUDA GPU, and PyTorch here sees none "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}). Nothing was measured.",
            file=sys.stderr,
        )
        return 2
    else:
        os.environ.pop("TRITON_INTERPRET", None)
        device_name = torch.cuda.get_device_name()
    from grao_kernels import set_memory_budget

    set_memory_budget(2 << 30)  # the torch backend's default 64 MiB tiles H=4096 rows far too finely

    out = Path(args.out)
    md_path = out if out.suffix == ".md" else out / "gpu_check.md"
    md_path.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    results = []
    for V in args.vocab:
        results.append(run_vocab(args.n, args.h, V, torch.bfloat16, t_start))
        # write as we go: a run cut short still leaves its finished sizes
        md_path.write_text(render(results, device_name))
        md_path.with_suffix(".json").write_text(json.dumps({"device": device_name, "results": results}, indent=1))
    text = render(results, device_name)
    print(text)
    print(f"wrote {md_path} and {md_path.with_suffix('.json')} in {time.time() - t_start:.0f}s")
    ok = all(r.get("within_tolerance", True) is not False for res in results for r in res["rows"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

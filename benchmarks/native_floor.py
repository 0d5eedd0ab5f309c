"""Native CPU backend against the GEMM floor: forward+backward of grao_loss.

usage: python benchmarks/native_floor.py [--reps 3] [--shapes issue|first|second|small] [--no-write]

Floor: the three products the op cannot avoid, timed with torch.mm into
preallocated outputs at full size: logits = h W^T, dH = dZ W, dW = dZ^T h,
2 N V H FLOPs each (6 N V H in all: 825 GFLOP at N=8192, H=256, V=65536;
1.91 TFLOP at N=2048, H=1024, V=151936). Methods, all float32 forward+backward
of ``grao_loss`` (no ignored targets, so every row costs its full share):
``native`` and ``torch`` backends, and ``naive`` eager PyTorch
(``grao_kernels.reference.reference_grao``, full logits).

Timing: one process, the floor and every method interleaved in each
repetition; the ratio method/floor is taken per repetition and the median
reported (the CPUs are shared, so absolute times drift; ratios within a
repetition much less). Memory: a fresh subprocess per (shape, method) runs one
forward+backward and reports the RSS high-water mark minus the resident set
once the inputs exist, minus the float32 gradients returned (hidden.grad and
weight.grad). The high-water mark is reset through /proc/self/clear_refs first:
ru_maxrss alone is inherited from the parent across fork+exec.

Writes benchmarks/native_floor.json and the section of BENCHMARKS.md between
``<!-- native:begin -->`` and ``<!-- native:end -->``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from grao_kernels.memory import peak_rss_bytes, reset_peak_rss, rss_bytes

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "issue": [(8192, 256, 65536), (2048, 1024, 151936)],
    "first": [(8192, 256, 65536)],
    "second": [(2048, 1024, 151936)],
    "small": [(1024, 256, 16384)],
}
METHODS = ("native", "torch", "naive")
BEGIN, END = "<!-- native:begin -->", "<!-- native:end -->"


def make_inputs(N, H, V, seed=0):
    """grao_loss inputs with S = 8 or 16 sequences of N / S tokens, all targets valid."""
    g = torch.Generator().manual_seed(seed)
    P, K = (4, 4) if N % 16 == 0 else (2, 4)
    S = P * K
    T = N // S
    hidden = torch.randn(S, T, H, generator=g).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) / H**0.5).requires_grad_(True)
    targets = torch.randint(0, V, (S, T), generator=g)
    rewards = torch.randn(P, K, generator=g)
    return hidden, weight, targets, rewards


def run_method(method, hidden, weight, targets, rewards):
    from grao_kernels import grao_loss
    from grao_kernels.reference import reference_grao

    hidden.grad, weight.grad = None, None
    if method == "naive":
        loss = reference_grao(hidden, weight, targets, rewards)["loss"]
    else:
        loss = grao_loss(hidden, weight, targets, rewards, backend=method).loss
    loss.backward()


def time_case(N, H, V, reps):
    hidden, weight, targets, rewards = make_inputs(N, H, V)
    h, w = hidden.detach().reshape(N, H), weight.detach()
    z, dh, dw = torch.empty(N, V), torch.empty(N, H), torch.empty(V, H)

    def floor():
        torch.mm(h, w.T, out=z)
        torch.mm(z, w, out=dh)
        torch.mm(z.T, h, out=dw)

    def timed(fn):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - t0, time.process_time() - c0

    # Warm-up: loads the extension, spins up the thread pool, faults the buffers in.
    small = make_inputs(64, H, 1024)
    for m in METHODS:
        run_method(m, *small)
    floor()
    times = {k: [] for k in ("floor", *METHODS)}
    cpu = {k: [] for k in ("floor", *METHODS)}
    for rep in range(reps):
        for k in ("floor", *METHODS):
            fn = floor if k == "floor" else (lambda m=k: run_method(m, hidden, weight, targets, rewards))
            wall, used = timed(fn)
            times[k].append(wall)
            cpu[k].append(used)
        print(f"  rep {rep}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), file=sys.stderr, flush=True)
    ratios = {m: [t / f for t, f in zip(times[m], times["floor"])] for m in METHODS}
    cpu_ratios = {m: [t / f for t, f in zip(cpu[m], cpu["floor"])] for m in METHODS}
    return {
        "floor_s": statistics.median(times["floor"]),
        "times_s": times,
        "cpu_s": cpu,
        "ratio_median": {m: statistics.median(r) for m, r in ratios.items()},
        "cpu_ratio_median": {m: statistics.median(r) for m, r in cpu_ratios.items()},
        "ratios": ratios,
    }


def memory_child(N, H, V, method):
    """Runs in a fresh process: extra bytes of one forward+backward."""
    torch.set_num_threads(2)
    for m in ("native", "torch") if method != "naive" else ():
        run_method(m, *make_inputs(16, H, 256))  # load the extension, warm the pools
    hidden, weight, targets, rewards = make_inputs(N, H, V)
    base = rss_bytes()
    reset = reset_peak_rss()
    peak_before = peak_rss_bytes()
    run_method(method, hidden, weight, targets, rewards)
    peak = peak_rss_bytes()
    grads = (hidden.grad.numel() + weight.grad.numel()) * 4
    out = {"extra_bytes": max(peak, peak_before) - base - grads, "grad_bytes": grads, "peak_reset": reset}
    print(json.dumps(out))


def memory_case(N, H, V, method):
    proc = subprocess.run(
        [sys.executable, __file__, "--memory-child", f"{N},{H},{V},{method}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory run {method} {N}x{H}x{V} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["extra_bytes"]


def shape_order(case):
    order = SHAPES["issue"] + SHAPES["small"]
    shape = tuple(case["shape"])
    return order.index(shape) if shape in order else len(order)


def render(results):
    lines = [
        "## Native CPU backend vs the GEMM floor",
        "",
        "Forward+backward of `grao_loss`, float32, every target valid. **floor** = `torch.mm` into",
        "preallocated outputs for the three full-size products (h·Wᵀ, dZ·W, dZᵀ·h; 6·N·V·H FLOPs).",
        "Time ratios: median over repetitions of method/floor measured back to back in one process",
        "(wall clock; the last column uses process CPU time, less sensitive to other load on shared cores).",
        "Extra memory: RSS high-water mark in a fresh process minus the resident inputs minus the",
        "returned float32 gradients. Goal at the first shape: ≤ 1.15× the floor and ≤ 128 MB.",
        "",
        f"Machine: {results['machine']}; torch {results['torch']}, {results['threads']} threads.",
        "Commands: " + "; ".join(sorted({f"`{c['command']}`" for c in results["cases"]})),
        "",
        "| N | H | V | floor (s) | GFLOP/s at floor | native × floor | torch × floor | naive × floor "
        "| native extra MB | torch extra MB | naive extra MB | native × floor, CPU time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in results["cases"]:
        N, H, V = case["shape"]
        r, mem = case["ratio_median"], case["extra_mb"]
        gflops = 6 * N * V * H / case["floor_s"] / 1e9
        lines.append(
            f"| {N} | {H} | {V} | {case['floor_s']:.2f} | {gflops:.0f} | {r['native']:.2f} | {r['torch']:.2f} "
            f"| {r['naive']:.2f} | {mem['native']:.0f} | {mem['torch']:.0f} | {mem['naive']:.0f} "
            f"| {case['cpu_ratio_median']['native']:.2f} |"
        )
    lines += [
        "",
        "Where native's time goes (`perf record` of the op at N=2048, H=256, V=65536, 2 threads): MKL's sgemm",
        "micro-kernel ~59% of samples, MKL packing ~9%, zeroing GEMM outputs ~2%, our per-tile",
        "max/exp/scale loops ~3.5%, OpenMP waits ~2.6%, the rest Python start-up and input generation.",
        "It beats the floor at H=256 because the floor's products write and re-read a 2 GB logits matrix",
        "while native's tiles stay in L2. The cores are shared with other jobs: an earlier run of the first",
        "shape under heavier load (8-chunk schedule) gave a median of 1.20x wall (0.93x CPU time).",
        "",
    ]
    lines.append(
        "Per-repetition ratios (native): "
        + "; ".join(
            f"{c['shape'][0]}x{c['shape'][1]}x{c['shape'][2]}: " + ", ".join(f"{x:.2f}" for x in c["ratios"]["native"])
            for c in results["cases"]
        )
    )
    return "\n".join(lines)


def write_section(text):
    path = ROOT / "BENCHMARKS.md"
    body = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in body and END in body:
        head, rest = body.split(BEGIN, 1)
        body = head + block + rest.split(END, 1)[1]
    else:
        body = body.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(body)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="issue")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--render-only", action="store_true", help="rewrite BENCHMARKS.md from the saved JSON")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        n, h, v, method = args.memory_child.split(",")
        memory_child(int(n), int(h), int(v), method)
        return
    json_path = ROOT / "benchmarks" / "native_floor.json"
    if args.render_only:
        write_section(render(json.loads(json_path.read_text())))
        return
    torch.set_num_threads(2)
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cases": [],
    }
    for N, H, V in SHAPES[args.shapes]:
        print(f"N={N} H={H} V={V}", file=sys.stderr, flush=True)
        case = {"shape": [N, H, V], **time_case(N, H, V, args.reps)}
        case["extra_mb"] = {m: memory_case(N, H, V, m) / 2**20 for m in METHODS}
        print(f"  ratios {case['ratio_median']}, extra MB {case['extra_mb']}", file=sys.stderr, flush=True)
        results["cases"].append(case)
    command = "python benchmarks/native_floor.py" + "".join(
        f" --{k} {v}" for k, v in (("reps", args.reps), ("shapes", args.shapes))
    )
    for case in results["cases"]:
        case["command"] = command
    if json_path.exists():
        # Keep earlier results for the shapes this run did not measure.
        done = {tuple(c["shape"]) for c in results["cases"]}
        kept = [c for c in json.loads(json_path.read_text())["cases"] if tuple(c["shape"]) not in done]
        results["cases"] = sorted(kept + results["cases"], key=shape_order)
    text = render(results)
    print(text)
    if not args.no_write:
        json_path.write_text(json.dumps(results, indent=1) + "\n")
        write_section(text)


if __name__ == "__main__":
    main()

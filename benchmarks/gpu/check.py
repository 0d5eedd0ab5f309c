"""GPU check of the triton backend: float64 oracle gate, speed against the cuBLAS floor and peers, peak memory.

Usage (one CUDA GPU; at most 8 minutes: no new measurement starts after 7, then at most 3 for vLLM), from a bare
checkout, nothing installed but torch, triton and the peers that are present (and vllm, for its section)::

    python benchmarks/gpu/check.py [OUT] [--smoke]   # OUT: a .md file or a folder (default $OUT, else benchmarks/gpu)

A front end of ``harness.compare``. Shapes: N = 16384 tokens, H = 4096, bfloat16; each vocabulary size (default
151936 and 262144) with 10% ignored targets, and the first one also with none ignored. Every method of the harness
that runs on the GPU, side by side with the CPU suite's peers: the triton backend in its chunked, fused and epilogue modes
(on a Hopper card the epilogue mode's GEMM1 is the persistent TMA kernel: ``settings.triton_gemm1="auto"``),
the torch backend, naive eager (full logits), Cut Cross-Entropy with and without its gradient filtering, Liger's
fused linear cross-entropy and chunked GRPO loss, TRL's chunked log-probs. Fair by construction:

- every grao_kernels method runs at the same working-memory budget (``--budget-mb``, default 1024, set through
  ``GRAO_KERNELS_MEMORY_BUDGET_MB`` before grao_kernels is imported);
- each method is checked against the float64 oracle and its peak memory (``torch.cuda.max_memory_allocated``
  above the inputs) measured after an untimed, unmeasured warm-up at the real shape (autotuning happens there);
- the floor is the three cuBLAS GEMMs over exactly the rows the methods compute (the non-ignored ones), its
  buffers built for each repetition's timing and freed before any method runs or is measured.

Then, when the CUDA ``vllm`` package imports, the rollout engine's CUDA-only paths (which CPU CI cannot run): two
steps of ``grao train --rollout-engine vllm`` on the demo (head_dim 32), its engine sharing the GPU
(``vllm_gpu_memory_utilization``) and sleeping during each update, checked for a finite ``rollout/logp_gap`` below
1e-2 (bf16) and logged syncs; the result is a section of ``gpu_check.md`` and ``gpu_check_vllm/``.

Writes ``gpu_check.md`` and ``gpu_check.json`` as it goes and prints the table. Exit status 0 when every
grao_kernels row passed the gate (and the vLLM run, where it ran, passed), 1 otherwise, 2 without a CUDA device. ``--smoke`` runs the same logic on CPU at
tiny sizes under the Triton interpreter (times and memory meaningless).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# The harness (benchmarks/) and the package itself (the repository root): nothing needs to be installed.
sys.path[:0] = [str(HERE.parent), str(HERE.parents[1])]

DEADLINE_S = 7 * 60  # stop starting new measurements after this
VLLM_RUN_S = 180  # the vLLM section's own limit (engine start, two steps, evaluations)


def vllm_section(out: Path) -> tuple[str, bool]:
    """(Markdown section, passed) of two ``grao train --rollout-engine vllm`` steps on this GPU; ("", True) when
    the CUDA vllm package does not import."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("vllm") is None:
        return "", True
    run_dir = out / "gpu_check_vllm"
    command = [
        sys.executable, "-m", "grao", "train", "--output-dir", str(run_dir), "--overwrite", "--steps", "2",
        "--eval-every", "2", "--eval-size", "16", "--rollout-engine", "vllm", "--vllm-sleep", "true",
        "--vllm-gpu-memory-utilization", "0.3", "--model-overrides", '{"head_dim": 32}', "--progress", "false",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=VLLM_RUN_S, env=env)
        status, log = proc.returncode, proc.stderr[-3000:]
    except subprocess.TimeoutExpired as exc:
        status, log = "timeout", str(exc.stderr or "")[-3000:]
    lines = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        lines = [json.loads(line) for line in metrics.read_text().splitlines() if '"loss"' in line]
    gaps = [ln.get("rollout/logp_gap") for ln in lines]
    passed = status == 0 and len(lines) == 2 and all(g is not None and 0 <= g < 1e-2 for g in gaps)
    rows = "\n".join(
        f"| {ln['step']} | {ln['rollout/logp_gap']:.2e} | {ln['time/sync']:.3f} | {ln['time/generate']:.3f} |"
        for ln in lines
    )
    text = (
        f"\n## vLLM rollout engine on CUDA: {'passed' if passed else 'FAILED'}\n\n`{' '.join(command[1:])}`: "
        f"exit status {status}\n\n| step | rollout/logp_gap | time/sync s | time/generate s |\n|---:|---:|---:|---:|\n"
        f"{rows}\n" + ("" if passed else f"\n```\n{log}\n```\n")
    )
    return text, passed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default=os.environ.get("OUT") or str(HERE))
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--h", type=int, default=4096)
    parser.add_argument("--vocab", type=int, nargs="+", default=[151936, 262144])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--budget-mb", type=int, default=1024, help="working memory of every grao_kernels method")
    parser.add_argument("--smoke", action="store_true", help="CPU only: tiny sizes under the Triton interpreter")
    args = parser.parse_args(argv)
    if args.smoke:
        if torch.cuda.is_available():
            raise SystemExit("--smoke is the CPU dry run; on a GPU run the real check")
        os.environ["TRITON_INTERPRET"] = "1"  # before grao_kernels imports any kernel
        device, dtype, args.n, args.h, args.vocab, args.reps = "cpu", "float32", 64, 32, [500, 1000], 1
    elif not torch.cuda.is_available():
        print(
            f"gpu check: needs a CUDA GPU, and PyTorch here sees none (torch {torch.__version__}, CUDA build: "
            f"{torch.version.cuda}). Nothing was measured.",
            file=sys.stderr,
        )
        return 2
    else:
        os.environ.pop("TRITON_INTERPRET", None)
        device, dtype = "cuda", "bfloat16"
    # Read by every process that imports grao_kernels from now on (fresh probe processes included).
    os.environ["GRAO_KERNELS_MEMORY_BUDGET_MB"] = str(args.budget_mb)
    import harness
    import render

    import grao_kernels

    assert grao_kernels.settings.memory_budget == args.budget_mb * 2**20, "grao_kernels was imported too early"
    cases = [(m.key, op) for op in ("logprobs", "grao") for m in harness.methods_for(op)]
    if args.smoke:  # the interpreter is slow: the triton modes and the methods that run on CPU, not the suite
        cases = [(k, op) for k, op in cases if "triton" in k or k in ("naive", "grao_kernels[torch]")]
    out = Path(args.out)
    md_path = out if out.suffix == ".md" else out / "gpu_check.md"
    md_path.parent.mkdir(parents=True, exist_ok=True)
    t_start, results = time.time(), []
    title = "GPU check: " + (
        "CPU smoke run (Triton interpreter; times and memory are meaningless)"
        if args.smoke
        else torch.cuda.get_device_name()
    )
    # 10% ignored targets at every size, and the first size with none ignored, measured second so that a run cut
    # short by the deadline still has both.
    shapes = [harness.Shape(device, args.n, V, args.h, dtype, ignored=0.1) for V in args.vocab]
    shapes.insert(1, harness.Shape(device, args.n, args.vocab[0], args.h, dtype))
    for shape in shapes:  # write as we go: a run cut short still leaves its finished shapes
        deadline = DEADLINE_S - (time.time() - t_start)
        data = harness.compare([shape], cases, args.reps, deadline_s=deadline, log=lambda s: print(s, flush=True))
        results += data["results"]
        data.update(results=results, command=f"python benchmarks/gpu/check.py {' '.join(argv or sys.argv[1:])}".strip())
        md_path.write_text(render.compare_markdown(data, title))
        md_path.with_suffix(".json").write_text(json.dumps(data, indent=1))
    engine_ok = True
    if not args.smoke:
        section, engine_ok = vllm_section(md_path.parent)
        md_path.write_text(md_path.read_text() + section)
    print(md_path.read_text())
    print(f"wrote {md_path} and {md_path.with_suffix('.json')} in {time.time() - t_start:.0f}s")
    ours = [r for res in results for r in res["rows"] if r["kind"] == "ours" and not r["status"].startswith("skipped")]
    return 0 if engine_ok and all(r["status"] == "ok" for r in ours) else 1


if __name__ == "__main__":
    sys.exit(main())

"""GPU check of the triton backend: float64 oracle gate, speed against the cuBLAS floor and peers, peak memory.

Usage (one CUDA GPU; about 5 minutes on an H100/H200 at the default sizes)::

    python benchmarks/gpu/check.py [OUT] [--smoke]   # OUT: a .md file or a folder (default $OUT, else benchmarks/gpu)

A front end of ``harness.compare``: for every vocabulary size (default 151936 and 262144; N = 16384 tokens,
H = 4096, bfloat16, 10% ignored targets) every method of the harness that runs on the GPU (the triton backend in
its chunked and fused modes, the torch backend, naive eager, Liger, Cut Cross-Entropy, TRL) is checked against the
float64 oracle, then timed forward+backward back to back with the three full-size cuBLAS GEMMs; peak memory is
``torch.cuda.max_memory_allocated`` above the inputs. Writes ``gpu_check.md`` and ``gpu_check.json`` as it goes and
prints the table. Exit status 0 when every grao_kernels row passed the gate, 1 otherwise, 2 without a CUDA device.
``--smoke`` runs the same logic on CPU at tiny sizes under the Triton interpreter (times and memory meaningless).
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
sys.path.insert(0, str(HERE.parent))

DEADLINE_S = 7 * 60  # stop starting new measurements after this


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default=os.environ.get("OUT") or str(HERE))
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--h", type=int, default=4096)
    parser.add_argument("--vocab", type=int, nargs="+", default=[151936, 262144])
    parser.add_argument("--reps", type=int, default=3)
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
    import harness
    import render

    import grao_kernels

    grao_kernels.settings.memory_budget = 2 << 30  # the torch backend's default 64 MiB tiles H=4096 rows far too finely
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
    for V in args.vocab:  # write as we go: a run cut short still leaves its finished sizes
        shape = harness.Shape(device, args.n, V, args.h, dtype, ignored=0.1)
        deadline = DEADLINE_S - (time.time() - t_start)
        data = harness.compare([shape], cases, args.reps, deadline_s=deadline, log=lambda s: print(s, flush=True))
        results += data["results"]
        data.update(results=results, command=f"python benchmarks/gpu/check.py {' '.join(argv or sys.argv[1:])}".strip())
        md_path.write_text(render.compare_markdown(data, title))
        md_path.with_suffix(".json").write_text(json.dumps(data, indent=1))
    print(md_path.read_text())
    print(f"wrote {md_path} and {md_path.with_suffix('.json')} in {time.time() - t_start:.0f}s")
    ours = [r for res in results for r in res["rows"] if r["kind"] == "ours" and not r["status"].startswith("skipped")]
    return 0 if all(r["status"] == "ok" for r in ours) else 1


if __name__ == "__main__":
    sys.exit(main())

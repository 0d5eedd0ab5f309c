"""Native CPU backend against the GEMM floor: forward+backward of grao_loss and of an entropy bonus.

usage: python benchmarks/native_floor.py [--reps 3] [--shapes issue|first|second|small] [--no-write]

A front end of ``harness.compare``: float32, every target valid; ``native``, ``torch`` and ``naive`` eager
(``grao_kernels.testing``, full logits) on ``grao_loss``, and ``native`` and ``torch`` on ``linear_logprob_loss`` with an
entropy bonus (``entropy_coef``) against naive eager. Every method passes the float64 oracle gate first; the
floor and the methods run back to back in each repetition (ratios per repetition, median reported); memory comes
from the harness's fresh-process probe. Writes benchmarks/native_floor.json and the ``native`` region of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import harness
import render
import torch

HERE = Path(__file__).resolve().parent

SHAPES = {
    "issue": [(8192, 256, 65536), (2048, 1024, 151936)],
    "first": [(8192, 256, 65536)],
    "second": [(2048, 1024, 151936)],
    "small": [(1024, 256, 16384)],
}
CASES = [(f"grao_kernels[{b}]", "grao") for b in ("native", "torch")] + [("naive", "grao")]
CASES += [(f"grao_kernels[{b}]", "entropy") for b in ("native", "torch")] + [("naive", "entropy")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="issue")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--render-only", action="store_true", help="rewrite BENCHMARKS.md from the saved JSON")
    args = ap.parse_args(argv)
    json_path = HERE / "native_floor.json"
    if args.render_only:
        data = json.loads(json_path.read_text())
    else:
        torch.set_num_threads(2)
        shapes = [harness.Shape("cpu", N, V, H) for N, H, V in SHAPES[args.shapes]]
        data = harness.compare(shapes, CASES, args.reps, log=lambda s: print(s, file=sys.stderr, flush=True))
        for res in data["results"]:
            res["command"] = f"python benchmarks/native_floor.py --reps {args.reps} --shapes {args.shapes}"
        if json_path.exists():  # keep the saved results of the shapes this run did not measure
            done = [r["shape"] for r in data["results"]]
            kept = [r for r in json.loads(json_path.read_text()).get("results", []) if r["shape"] not in done]
            data["results"] = kept + data["results"]
    text = render.compare_markdown(data, "Native CPU backend vs the GEMM floor")
    print(text)
    if not args.no_write:
        if not args.render_only:
            json_path.write_text(json.dumps(data, indent=1) + "\n")
        render.splice(str(HERE.parent / "BENCHMARKS.md"), "native", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

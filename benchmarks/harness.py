"""The measurement harness's entry point: the names its front ends use, and ``python benchmarks/harness.py probe``.

The harness itself lives in ``benchmarks/measure/``, one module per job (see its docstring): device and timing,
shapes and inputs, methods (ours and the peers), the float64 oracle, the memory probe, the gate, the GEMM floor,
``compare`` and the pytest-benchmark cases. Front ends (``benchmarks/test_bench_*.py``, ``benchmarks/gpu/check.py``,
``benchmarks/native_floor.py``, ``benchmarks/integrations_step.py``, ``benchmarks/rollout_step.py``) ``import harness`` with ``benchmarks/`` on the
path; ``tests/kernels/test_memory.py`` runs ``python benchmarks/harness.py probe N H V`` in a fresh process.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from measure.device import bench_device, device_name, run_record, sync, timed  # noqa: E402
from measure.floor import floor_all, floor_gemms, floor_times  # noqa: E402
from measure.gate import FACTOR, FLOOR, cached, check  # noqa: E402
from measure.memory import command_peak_rss, fresh, probe  # noqa: E402
from measure.methods import METHODS, Method, import_error, methods_for, warm_up  # noqa: E402
from measure.oracle import oracle, sketch  # noqa: E402
from measure.shapes import CPU_SHAPES, GPU_SHAPES, OPS, Shape, layout, make_inputs, shape_skip_reason  # noqa: E402
from measure.suite import MODES, cases, rounds, run_case, run_floor  # noqa: E402
from measure.timing import compare  # noqa: E402

from grao_kernels import backends as gk_backends  # noqa: E402
from grao_kernels.testing import peak_meter, rel_l2  # noqa: E402

__all__ = [
    "CPU_SHAPES",
    "FACTOR",
    "FLOOR",
    "GPU_SHAPES",
    "METHODS",
    "MODES",
    "OPS",
    "Method",
    "Shape",
    "bench_device",
    "cached",
    "cases",
    "check",
    "command_peak_rss",
    "compare",
    "device_name",
    "run_record",
    "floor_all",
    "floor_gemms",
    "floor_times",
    "fresh",
    "import_error",
    "layout",
    "make_inputs",
    "methods_for",
    "oracle",
    "peak_meter",
    "probe",
    "rel_l2",
    "rounds",
    "run_case",
    "run_floor",
    "shape_skip_reason",
    "sketch",
    "sync",
    "timed",
    "warm_up",
]


def main(argv=None) -> int:
    """``python benchmarks/harness.py probe N H V [...]``: one memory probe (tests/kernels/test_memory.py) as JSON."""
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
    if not args.naive:  # what the backend says the call allocates beyond its inputs and outputs
        op_entropy = args.entropy or args.op == "entropy"
        res["workspace_bytes"] = gk_backends.workspace_bytes(
            args.backend, args.N, args.V, args.H, entropy=op_entropy, grad=True, budget=budget
        )
    print(json.dumps({k: v for k, v in res.items() if not hasattr(v, "shape")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

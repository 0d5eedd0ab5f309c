"""Benchmark suite: ``pytest benchmarks/ --benchmark-only`` from the repository root.

Cases run shape-major (the floor and all methods and modes of one shape, then the next shape) so that the
per-shape caches in ``harness`` (inputs, GEMM floor, oracle, memory probes) hold one shape at a time, and the floor
is measured minutes, not the whole session, away from the methods compared with it. The command line, the wall
time, the load average and the skipped cases with their reasons go next to ``--benchmark-json`` as
``<name>.session.json`` for the report.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

_skips: list[dict] = []
_start, _load_start = time.time(), os.getloadavg()[0]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    from harness import CPU_SHAPES, GPU_SHAPES

    rank = {s: i for i, s in enumerate(CPU_SHAPES + GPU_SHAPES)}
    # stable: file and parameter order are kept within a shape
    items.sort(
        key=lambda item: rank.get(getattr(item, "callspec", None) and item.callspec.params.get("shape"), len(rank))
    )


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skips.append({"nodeid": report.nodeid, "reason": reason.removeprefix("Skipped: ")})


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("benchmark_json", None)
    if path is None:
        return
    name = os.fspath(path) if isinstance(path, (str, os.PathLike)) else path.name
    info = {
        "command": os.environ.get("GRAO_BENCH_COMMAND") or shlex.join(["pytest", *sys.argv[1:]]),
        "wall_s": time.time() - _start,
        "exitstatus": int(exitstatus),
        "loadavg_start": _load_start,  # other processes on the machine: the 1-minute load average
        "loadavg_end": os.getloadavg()[0],
        "cpu_count": os.cpu_count(),
        "skips": _skips,
    }
    with open(os.path.splitext(name)[0] + ".session.json", "w") as f:
        json.dump(info, f, indent=1)

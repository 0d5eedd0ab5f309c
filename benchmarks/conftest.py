"""Benchmark suite: ``pytest benchmarks/ --benchmark-only`` from the repository root.

Cases run shape-major (the floor and all methods and modes of one shape, then the next shape) so that the
per-shape caches in ``harness`` (inputs, GEMM floor, memory probes) hold one shape at a time. The command
line, the session's wall time and the skipped cases with their reasons are written next to ``--benchmark-json``
as ``<name>.session.json`` for the report.
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
_start = time.time()
_load_start = os.getloadavg()[0]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    """Shape-major order across files: each shape's floor, then its grao_loss and log-prob cases, then the next.

    The floor is then measured minutes, not the whole session, away from the methods compared with it.
    """
    from harness import CPU_SHAPES, GPU_SHAPES

    rank = {s: i for i, s in enumerate(CPU_SHAPES + GPU_SHAPES)}

    def key(item):
        params = getattr(getattr(item, "callspec", None), "params", {})
        shape = params.get("shape")
        return rank.get(shape, len(rank))

    items.sort(key=key)  # stable: file and parameter order are kept within a shape


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skips.append({"nodeid": report.nodeid, "reason": reason.removeprefix("Skipped: ")})


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("benchmark_json", None)
    if path is None:
        return
    name = os.fspath(path) if isinstance(path, (str, os.PathLike)) else path.name
    out = os.path.splitext(name)[0] + ".session.json"
    session_info = {
        "command": os.environ.get("GRAO_BENCH_COMMAND") or shlex.join(["pytest", *sys.argv[1:]]),
        "wall_s": time.time() - _start,
        "exitstatus": int(exitstatus),
        # Other processes on the machine: the 1-minute load average when the session started and ended.
        "loadavg_start": _load_start,
        "loadavg_end": os.getloadavg()[0],
        "cpu_count": os.cpu_count(),
        "skips": _skips,
    }
    with open(out, "w") as f:
        json.dump(session_info, f, indent=1)

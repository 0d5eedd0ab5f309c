"""The device under measurement: which one, its name for the tables, and synchronised timing."""

from __future__ import annotations

import functools
import os
import sys
import time

import torch


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


def timed(fn, device: str) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result) of one synchronised call."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, out


def run_record(script: str, argv: list[str] | None, load_start: float) -> dict:
    """What a front end's table says of its run on the CPU: the command as typed (``script`` under benchmarks/, with
    ``argv``, else this process's arguments), the CPU, torch, the core count and the 1-minute load average at the
    start (``load_start``) and now."""
    args = argv if argv is not None else sys.argv[1:]
    return {
        "command": f"python benchmarks/{script} {' '.join(args)}".strip(),
        "device": device_name("cpu"),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "loadavg": (load_start, os.getloadavg()[0]),
    }

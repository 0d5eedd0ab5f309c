"""Peak memory of a call: ``peak_meter`` on either device, and the resident-set probes it uses on CPU (Linux).

CPU tensors have no allocator statistics like ``torch.cuda.max_memory_allocated``;
the kernel's resident-set high-water mark (VmHWM) stands in for them. It must be
reset before a measurement: ``ru_maxrss`` and VmHWM survive fork+exec, so a
child of a large process would start with its parent's peak.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} field")


def rss_bytes() -> int:
    """The current resident set size."""
    return _status_kib("VmRSS") * 1024


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current resident set (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The resident-set high-water mark since the last reset (or since the process started)."""
    return _status_kib("VmHWM") * 1024


def peak_meter(device: str) -> Callable[[], int]:
    """Start a measurement: the returned function gives the peak memory above the present state so far, in bytes.

    GPU: ``torch.cuda.max_memory_allocated`` (its peak statistics are reset here). CPU: the resident-set
    high-water mark, reset here, with a fixed mmap threshold (glibc) so that freed large blocks go back to the
    system and the mark tracks live allocations; meaningful in a process that has not yet held more than the
    state at the start (e.g. a fresh one).
    """
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        ctypes.CDLL(None).mallopt(-3, 65536)  # M_MMAP_THRESHOLD (glibc)
        if not reset_peak_rss():
            raise RuntimeError("cannot reset the RSS high-water mark (/proc/self/clear_refs): no reliable measurement")
        base = rss_bytes()

    def peak() -> int:
        if cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        return peak_rss_bytes() - base

    return peak

"""Resident memory of this process (Linux), for measuring CPU working memory.

CPU tensors have no allocator statistics like ``torch.cuda.max_memory_allocated``;
the kernel's resident-set high-water mark (VmHWM) stands in for them. It must be
reset before a measurement: ``ru_maxrss`` and VmHWM survive fork+exec, so a
child of a large process would start with its parent's peak.
"""

from __future__ import annotations


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

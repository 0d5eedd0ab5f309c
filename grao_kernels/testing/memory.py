"""Peak memory of a call: ``peak_meter`` on either device, the resident-set probes it uses on CPU (Linux), and
``TensorBytes``, which counts the bytes of the tensors a call allocates (what a workspace formula predicts).

CPU tensors have no allocator statistics like ``torch.cuda.max_memory_allocated``;
the kernel's resident-set high-water mark (VmHWM) stands in for them. It must be
reset before a measurement: ``ru_maxrss`` and VmHWM survive fork+exec, so a
child of a large process would start with its parent's peak.
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


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


class TensorBytes(TorchDispatchMode):
    """Within ``with TensorBytes(*inputs) as meter:``, the bytes of tensor storage allocated by the ATen ops run
    in the block and still alive (``meter.live``) and their high-water mark (``meter.peak``).

    A storage counts once, from the op that first returns it until it is freed; the storages of ``known`` (the
    inputs) and of tensors created before the block are never counted (a view of an input is not an allocation).
    Memory that C++ code allocates inside one op without returning it (a native kernel's scratch, BLAS packing)
    is invisible here: the resident-set probe (:func:`peak_meter`) measures that.
    """

    def __init__(self, *known: torch.Tensor | None):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._ignored = {t.untyped_storage().data_ptr() for t in known if t is not None}
        self._counted: set[int] = set()

    def _freed(self, ptr: int, nbytes: int) -> None:
        self._counted.discard(ptr)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or ptr in self._ignored or ptr in self._counted:
                continue
            self._counted.add(ptr)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, ptr, nbytes)
        return out

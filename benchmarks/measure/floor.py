"""The GEMM floor: the three full-size products every method must compute, timed on preallocated buffers.

The floor covers exactly the rows the methods compute: ours and most peers skip the ignored targets, so the
products are over the non-ignored rows (``shapes.computed_rows``), not all N. Its (rows, V) operands are large
(8 GiB each at 16384 x 262144 in bfloat16): a front end builds them only to time them and frees them before
any method runs (``release``).
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable

import torch

from .device import timed
from .shapes import Shape, computed_rows


@functools.lru_cache(maxsize=1)
def floor_gemms(shape: Shape) -> dict:
    """The three products over the computed rows as callables on preallocated buffers (values do not change their
    speed)."""
    dev, dt, (N, V, H) = shape.device, getattr(torch, shape.dtype), (computed_rows(shape), shape.V, shape.H)

    def filled(rows, cols):
        block = torch.randn(min(rows, 4096), cols, device=dev, dtype=dt)
        return block.repeat(-(-rows // block.shape[0]), 1)[:rows].contiguous()

    h, w, dz = filled(N, H), filled(V, H), filled(N, V)
    z, dh, dw = torch.empty_like(dz), torch.empty_like(h), torch.empty_like(w)
    return {
        "logits": lambda: torch.mm(h, w.T, out=z),  # Z = h W^T
        "dh": lambda: torch.mm(dz, w, out=dh),  # dH = dZ W
        "dw": lambda: torch.mm(dz.T, h, out=dw),  # dW = dZ^T h
    }


def floor_all(shape: Shape) -> Callable:
    fns = list(floor_gemms(shape).values())
    return lambda: [fn() for fn in fns]


def release() -> None:
    """Free the floor's buffers (and, on a GPU, give their memory back to the device)."""
    floor_gemms.cache_clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@functools.cache
def floor_times(shape: Shape) -> dict:
    """Best time of each GEMM, and the floors of forward, backward and forward+backward, in seconds."""
    best = {}
    for name, fn in floor_gemms(shape).items():
        fn()
        best[name] = min(timed(fn, shape.device)[0] for _ in range(2 if shape.device == "cpu" else 10))
    return {
        "forward": best["logits"],
        "backward": best["dh"] + best["dw"],
        "full": sum(best.values()),
        "gemm_gflops": 2 * computed_rows(shape) * shape.V * shape.H / best["logits"] / 1e9,
    }

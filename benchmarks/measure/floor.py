"""The GEMM floor: the three full-size products every method must compute, timed on preallocated buffers."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from .device import timed
from .shapes import Shape


@functools.lru_cache(maxsize=1)
def floor_gemms(shape: Shape) -> dict:
    """The three full-size products as callables on preallocated buffers (values do not change their speed)."""
    dev, dt, (N, V, H) = shape.device, getattr(torch, shape.dtype), (shape.N, shape.V, shape.H)

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
        "gemm_gflops": 2 * shape.N * shape.V * shape.H / best["logits"] / 1e9,
    }

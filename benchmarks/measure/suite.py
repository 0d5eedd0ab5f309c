"""The pytest-benchmark suite's cases: forward, backward and forward+backward of each method against the floor."""

from __future__ import annotations

import gc
import os

import torch

from .device import device_name, sync
from .floor import floor_all, floor_times, release
from .gate import check
from .methods import METHODS, methods_for, warm_up
from .shapes import CPU_SHAPES, GPU_SHAPES, Shape, make_inputs, shape_skip_reason

MODES = ("forward", "backward", "full")


def cases(op: str) -> list:
    """pytest params (shape, method key, mode) of ``op`` over the suite's shapes; GPU shapes marked ``gpu``."""
    import pytest

    return [
        pytest.param(s, m.key, mode, id=f"{s.id}-{m.key}-{mode}", marks=[pytest.mark.gpu] * (s.device == "cuda"))
        for s in CPU_SHAPES + GPU_SHAPES
        for m in methods_for(op)
        for mode in MODES
    ]


def rounds(device: str) -> tuple[int, int]:
    """(rounds, warm-up rounds) per timed case."""
    return int(os.environ.get("GRAO_BENCH_ROUNDS", 1 if device == "cpu" else 5)), int(device != "cpu")


def _record(benchmark, shape: Shape, floor: dict, mode: str, **info) -> None:
    """The row of one timed case in ``extra_info``: its time against the floor of ``mode`` at ``shape``."""
    t = benchmark.stats.stats.min
    info.update({k: getattr(shape, k) for k in ("device", "N", "V", "H", "dtype")}, shape=shape.id, mode=mode)
    info.update(device_name=device_name(shape.device), time_s=t, tokens_per_s=shape.N / t, floor_s=floor[mode])
    benchmark.extra_info.update(info, x_floor=t / floor[mode], floor_gemm_gflops=floor["gemm_gflops"])


_inputs: dict = {}
_last_forward: dict = {}


def run_case(benchmark, op: str, key: str, mode: str, shape: Shape) -> None:
    """Gate ``key`` against the oracle, time ``mode`` at ``shape``, record the results in ``extra_info``."""
    import pytest

    m = METHODS[key]
    reason = shape_skip_reason(shape) or m.skip_reason(shape, op)
    if reason:
        pytest.skip(reason)
    try:
        mem, errs, naive, bad = check(key, op, shape)  # before any timing: a fast wrong number is never recorded
        assert not bad, f"{m.label} ({op}) fails the gate at {shape.id} on {bad}: {errs}; eager's {naive}"
        _time_case(benchmark, op, m, mode, shape, mem, errs)
    except torch.cuda.OutOfMemoryError:
        _inputs.clear()
        _last_forward.clear()
        gc.collect()
        torch.cuda.empty_cache()
        pytest.skip(f"{m.label} runs out of device memory at {shape.id}")


def _time_case(benchmark, op, m, mode, shape, mem, errs) -> None:
    floor = floor_times(shape)
    release()  # the floor's (rows, V) operands are not needed past this point
    if shape not in _inputs:
        _inputs.clear()
        gc.collect()
        _inputs[shape] = make_inputs(shape)
    inp, dev = _inputs[shape], shape.device
    warm_up(m, op, shape, inp)

    def forward():
        out = m.forward(inp, op)
        sync(dev)
        return out

    def backward(out):
        m.backward(out[1], inp)
        sync(dev)

    def setup_backward():  # the forward case's last output when it ran just before: saves a forward per case
        return (_last_forward.pop((op, m.key, shape), None) or forward(),), {}

    def full():
        m.run(inp, op)
        sync(dev)

    target, setup = {"forward": (forward, None), "backward": (backward, setup_backward), "full": (full, None)}[mode]
    n_rounds, n_warm = rounds(dev)
    out = benchmark.pedantic(target, setup=setup, rounds=n_rounds, warmup_rounds=n_warm, iterations=1)
    _last_forward.clear()
    if mode == "forward":
        _last_forward[(op, m.key, shape)] = out
    del out
    if benchmark.stats is None:  # --benchmark-disable: the body ran once as a smoke test, nothing to record
        return
    part = "forward" if mode == "forward" else "full"
    # Peak above the inputs; the backward's is that of the whole step it ends (its forward's saved state included).
    # "working" leaves out the returned gradients, which every method allocates alike.
    mem = {"peak_mem_bytes": mem["peak_" + part], "peak_working_bytes": mem["working_" + part], **mem}
    keep = ("peak_mem_bytes", "peak_working_bytes", "grad_bytes", "memory_method")
    info = dict(op=op, method=m.key, label=m.label, kind=m.kind, errors=errs)
    _record(benchmark, shape, floor, mode, **info, **{k: mem[k] for k in keep})


def run_floor(benchmark, shape: Shape) -> None:
    """The three GEMMs as their own row: the yardstick of every ratio at this shape."""
    import pytest

    reason = shape_skip_reason(shape)
    if reason:
        pytest.skip(reason)
    floor = floor_times(shape)
    n_rounds, n_warm = rounds(shape.device)
    benchmark.pedantic(
        lambda: (floor_all(shape)(), sync(shape.device)), rounds=n_rounds, warmup_rounds=n_warm, iterations=1
    )
    release()
    if benchmark.stats is None:
        return
    info = dict(op="floor", method="gemm_floor", label="GEMM floor (logits, dH, dW)", kind="floor", peak_mem_bytes=None)
    _record(
        benchmark, shape, floor, "full", **info, floor_forward_s=floor["forward"], floor_backward_s=floor["backward"]
    )

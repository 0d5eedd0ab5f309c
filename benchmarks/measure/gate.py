"""The oracle gate: a method's errors against the float64 oracle, next to eager PyTorch's own in the inputs' dtype.

A fast wrong number is never timed: every front end gates a method before it times it.
"""

from __future__ import annotations

from grao_kernels.testing import rel_l2

from .memory import fresh, probe
from .oracle import oracle
from .shapes import Shape

FACTOR, FLOOR = 2.0, 1e-3  # gate: relative L2 error <= FACTOR x eager PyTorch's own error + FLOOR

_cache: dict = {}


def cached(kind: str, *args):
    """``probe`` / ``oracle`` once per arguments, keeping the current shape's results only."""
    shape = next(a for a in args if isinstance(a, Shape))
    for k in [k for k in _cache if shape not in k]:
        del _cache[k]
    if (kind, *args) not in _cache:
        fn = {"probe": probe, "oracle": oracle}[kind]
        # In a fresh process on CPU (memory and the oracle's float64 buffers alike), in this one on a GPU.
        _cache[(kind, *args)] = fn(*args) if shape.device != "cpu" else fresh(f"{kind} {args}", fn, *args)
    return _cache[(kind, *args)]


def check(key: str, op: str, shape: Shape) -> tuple[dict, dict, dict, list[str]]:
    """The gate: (memory probe, errors, eager's errors, the quantities failing) of ``key`` at ``shape``.

    Errors: relative L2 against the float64 oracle (dH, dW estimated on their sketches). A quantity fails when its
    error exceeds FACTOR x that of eager PyTorch in the inputs' dtype (``oracle`` in that dtype) + FLOOR.
    """
    ref, eager = cached("oracle", shape, op), cached("oracle", shape, op, shape.dtype)
    got = cached("probe", key, op, shape)
    errs, base = (
        {k: rel_l2(r[k], ref[k]) for k in ("value", "dh", "dw") if r.get(k) is not None} for r in (got, eager)
    )
    return got, errs, base, [k for k, e in errs.items() if not e <= FACTOR * base.get(k, 0.0) + FLOOR]

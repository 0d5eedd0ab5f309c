"""The GEMM floor per shape: logits = h W^T, dH = dZ W, dW = dZ^T h (3 x 2 N V H FLOPs)."""

import pytest
from grao_bench import all_shapes, run_floor

CASES = [pytest.param(s, id=s.id, marks=[pytest.mark.gpu] if s.device == "cuda" else []) for s in all_shapes()]


@pytest.mark.parametrize("shape", CASES)
def test_floor(benchmark, shape):
    benchmark.group = f"floor {shape.id}"
    run_floor(benchmark, shape)

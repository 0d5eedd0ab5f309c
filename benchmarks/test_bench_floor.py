"""The GEMM floor per shape: logits = h W^T, dH = dZ W, dW = dZ^T h (3 x 2 N V H FLOPs)."""

import pytest
from grao_bench import all_shapes, run_floor


@pytest.mark.parametrize("shape", all_shapes(), ids=[s.id for s in all_shapes()])
def test_floor(benchmark, shape):
    benchmark.group = f"floor {shape.id}"
    run_floor(benchmark, shape)

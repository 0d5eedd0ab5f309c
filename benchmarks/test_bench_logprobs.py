"""``fused_linear_logprobs`` against the GEMM floor and the peers: forward, backward, forward+backward."""

import pytest
from grao_bench import MODES, all_shapes, methods, run_case

CASES = [
    pytest.param(s, m.key, mode, id=f"{s.id}-{m.key}-{mode}", marks=[pytest.mark.gpu] if s.device == "cuda" else [])
    for s in all_shapes()
    for m in methods("logprobs")
    for mode in MODES
]


@pytest.mark.parametrize(("shape", "key", "mode"), CASES)
def test_logprobs(benchmark, shape, key, mode):
    benchmark.group = f"logprobs {shape.id} {mode}"
    run_case(benchmark, "logprobs", key, mode, shape)

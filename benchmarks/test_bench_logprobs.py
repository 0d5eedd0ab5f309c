"""``fused_linear_logprobs`` against the GEMM floor and the peers: forward, backward, forward+backward."""

import pytest
from grao_bench import cases, run_case

CASES = cases("logprobs")


@pytest.mark.parametrize(("shape", "key", "mode"), CASES)
def test_logprobs(benchmark, shape, key, mode):
    benchmark.group = f"logprobs {shape.id} {mode}"
    run_case(benchmark, "logprobs", key, mode, shape)

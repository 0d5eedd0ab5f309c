"""The ops against the GEMM floor and the peers: forward, backward, forward+backward (see ``harness``).

With inputs that require grad, ``grao_loss`` computes the loss and its gradients in one sweep during the forward
(the loss is linear in every token's log-prob with coefficients known up front); its backward only hands the
gradients over. Liger's GRPO loss does the same.
"""

import harness
import pytest

SHAPES = [
    pytest.param(s, id=s.id, marks=[pytest.mark.gpu] * (s.device == "cuda"))
    for s in harness.CPU_SHAPES + harness.GPU_SHAPES
]


@pytest.mark.parametrize("shape", SHAPES)
def test_floor(benchmark, shape):
    benchmark.group = f"floor {shape.id}"
    harness.run_floor(benchmark, shape)


@pytest.mark.parametrize(("shape", "key", "mode"), harness.cases("logprobs"))
def test_logprobs(benchmark, shape, key, mode):
    benchmark.group = f"logprobs {shape.id} {mode}"
    harness.run_case(benchmark, "logprobs", key, mode, shape)


@pytest.mark.parametrize(("shape", "key", "mode"), harness.cases("grao"))
def test_grao(benchmark, shape, key, mode):
    benchmark.group = f"grao {shape.id} {mode}"
    harness.run_case(benchmark, "grao", key, mode, shape)

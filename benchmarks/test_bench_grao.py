"""``grao_loss`` against the GEMM floor and the peers: forward, backward, forward+backward.

With inputs that require grad, ``grao_loss`` computes the loss and its gradients in one sweep during the forward
(the loss is linear in every token's log-prob with coefficients known up front); its backward only hands the
gradients over. Liger's GRPO loss does the same.
"""

import pytest
from grao_bench import cases, run_case

CASES = cases("grao")


@pytest.mark.parametrize(("shape", "key", "mode"), CASES)
def test_grao(benchmark, shape, key, mode):
    benchmark.group = f"grao {shape.id} {mode}"
    run_case(benchmark, "grao", key, mode, shape)

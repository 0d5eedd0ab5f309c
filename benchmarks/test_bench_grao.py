"""``grao_loss`` against the GEMM floor and the peers: forward, backward, forward+backward.

With inputs that require grad, ``grao_loss`` computes the loss and its gradients in one sweep during the forward
(the loss is linear in every token's log-prob with coefficients known up front); its backward only hands the
gradients over. Liger's GRPO loss does the same.
"""

import pytest
from grao_bench import MODES, all_shapes, methods, run_case

CASES = [
    pytest.param(s, m.key, mode, id=f"{s.id}-{m.key}-{mode}", marks=[pytest.mark.gpu] if s.device == "cuda" else [])
    for s in all_shapes()
    for m in methods("grao")
    for mode in MODES
]


@pytest.mark.parametrize(("shape", "key", "mode"), CASES)
def test_grao(benchmark, shape, key, mode):
    benchmark.group = f"grao {shape.id} {mode}"
    run_case(benchmark, "grao", key, mode, shape)

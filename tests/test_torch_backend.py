"""The torch backend's vocabulary-tiled path (used when a row block of the whole
vocabulary would not fit in the memory budget) against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from test_oracle import _grads, _leaf, make_batch
from utils import rel_l2

import grao_kernels
from grao_kernels.backends.torch_backend import plan_blocks
from grao_kernels.reference import reference_grao, reference_logprobs


@pytest.fixture
def small_budget():
    old = grao_kernels.memory_budget()
    grao_kernels.set_memory_budget(2**20)
    yield
    grao_kernels.set_memory_budget(old)


def test_plan_tiles_the_vocabulary_only_when_needed():
    rows, vt = plan_blocks(65536, 256, low_precision=False, budget=64 * 2**20)
    assert vt == 65536 and rows >= 16
    rows, vt = plan_blocks(262144, 4096, low_precision=True, budget=64 * 2**20)
    assert vt < 262144 and rows * vt * 6 + vt * 4096 * 4 <= 64 * 2**20


def test_budget_must_be_sane():
    with pytest.raises(ValueError, match="at least 1 MiB"):
        grao_kernels.set_memory_budget(1000)


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bias", [False, True])
def test_tiled_path_matches_reference(small_budget, dtype, bound, bias):
    P, G, T, H, V = 2, 2, 6, 40, 9001
    assert plan_blocks(V, H, dtype != torch.float32)[1] < V, "case must exercise the tiled path"
    hidden, weight, b, targets, rewards = make_batch(P, G, T, H, V, bias, dtype)
    h, w, bb = _leaf(hidden), _leaf(weight), _leaf(b)
    out = grao_kernels.grao_loss(h, w, targets, rewards, bias=bb, temperature=0.9, backend="torch")
    got = _grads(out.loss, h, w, bb)
    h64, w64, b64 = _leaf(hidden, torch.float64), _leaf(weight, torch.float64), _leaf(b, torch.float64)
    ref = reference_grao(h64, w64, targets, rewards, bias=b64, temperature=0.9)
    want = _grads(ref["loss"], h64, w64, b64)
    assert abs(out.loss.item() - ref["loss"].item()) <= bound * (abs(ref["loss"].item()) + 1e-3)
    for g, r in zip(got, want):
        if r is not None:
            assert rel_l2(g, r) <= bound

    # fused_linear_logprobs reuses the saved log-sum-exp in its backward.
    h2, w2 = _leaf(hidden), _leaf(weight)
    logp = grao_kernels.fused_linear_logprobs(h2, w2, targets, bias=b, backend="torch")
    up = torch.randn(targets.shape)
    g2 = _grads((logp * up).sum(), h2, w2)
    h3, w3 = _leaf(hidden, torch.float64), _leaf(weight, torch.float64)
    ref_lp = reference_logprobs(h3, w3, targets, bias=None if b is None else b.double())
    w2_ = _grads((ref_lp * up.double()).sum(), h3, w3)
    assert rel_l2(logp, ref_lp) <= bound
    for g, r in zip(g2, w2_):
        assert rel_l2(g, r) <= bound

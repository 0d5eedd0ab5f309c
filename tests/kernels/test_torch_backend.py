"""The torch backend's block planning, its vocabulary-tiled path (used when a row
block of the whole vocabulary would not fit in the memory budget) against the
float64 reference, and the memory-budget setting it reads."""

from __future__ import annotations

import pytest
import torch
from utils import grads, leaves, make_batch, rel_l2

import grao_kernels
from grao_kernels.backends import torch_backend
from grao_kernels.backends.torch_backend import plan_blocks
from grao_kernels.testing import reference_grao, reference_logprobs

SMALL = 2**20


def test_plan_tiles_the_vocabulary_only_when_needed():
    rows, vt = plan_blocks(65536, 256, low_precision=False, budget=64 * 2**20)
    assert vt == 65536 and rows >= 16
    rows, vt = plan_blocks(262144, 4096, low_precision=True, budget=64 * 2**20)
    assert vt < 262144 and rows * vt * 6 + vt * 4096 * 4 <= 64 * 2**20
    # Each extra logits-sized buffer (entropy, softcap) shrinks the blocks.
    one, three = plan_blocks(32768, 256, False, 64 * 2**20), plan_blocks(32768, 256, False, 64 * 2**20, buffers=3)
    assert three[0] < one[0] and three[0] * 32768 * 14 <= 64 * 2**20


def test_budget_must_be_sane(monkeypatch):
    with pytest.raises(ValueError, match="at least 1 MiB"):
        grao_kernels.fused_linear_logprobs(
            torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long), backend="torch", memory_budget=1000
        )
    monkeypatch.setattr(grao_kernels.settings, "memory_budget", 1000)
    with pytest.raises(ValueError, match=r"settings.memory_budget must be at least 1 MiB"):
        grao_kernels.fused_linear_logprobs(
            torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long), backend="torch"
        )


def test_per_call_budget_wins_over_the_setting_which_wins_over_the_default(monkeypatch):
    seen = []
    real = torch_backend.forward

    def spy(*args, budget, **kw):
        seen.append(budget)
        return real(*args, budget=budget, **kw)

    monkeypatch.setattr(torch_backend, "forward", spy)
    args = (torch.randn(3, 4), torch.randn(7, 4), torch.zeros(3, dtype=torch.long))
    grao_kernels.fused_linear_logprobs(*args, backend="torch")
    monkeypatch.setattr(grao_kernels.settings, "memory_budget", 5 * 2**20)
    grao_kernels.fused_linear_logprobs(*args, backend="torch")
    grao_kernels.fused_linear_logprobs(*args, backend="torch", memory_budget=3 * 2**20)
    assert seen == [torch_backend.DEFAULT_BUDGET, 5 * 2**20, 3 * 2**20]


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bias", [False, True])
def test_tiled_path_matches_reference(dtype, bound, bias):
    P, G, T, H, V = 2, 2, 6, 40, 9001
    assert plan_blocks(V, H, dtype != torch.float32, SMALL)[1] < V, "case must exercise the tiled path"
    hidden, weight, b, targets, rewards = make_batch(P, G, T, H, V, bias, dtype)
    h, w, bb = leaves(hidden, weight, b)
    out = grao_kernels.grao_loss(
        h, w, targets, rewards, group_size=G, bias=bb, temperature=0.9, backend="torch", memory_budget=SMALL
    )
    got = grads(out.loss, h, w, bb)
    h64, w64, b64 = leaves(hidden, weight, b, dtype=torch.float64)
    ref = reference_grao(h64, w64, targets, rewards, bias=b64, temperature=0.9)
    want = grads(ref["loss"], h64, w64, b64)
    assert abs(out.loss.item() - ref["loss"].item()) <= bound * (abs(ref["loss"].item()) + 1e-3)
    for g, r in zip(got, want):
        if r is not None:
            assert rel_l2(g, r) <= bound

    # fused_linear_logprobs reuses the saved log-sum-exp in its backward.
    h2, w2 = leaves(hidden, weight)
    logp = grao_kernels.fused_linear_logprobs(h2, w2, targets, bias=b, backend="torch", memory_budget=SMALL)
    up = torch.randn(targets.shape)
    g2 = grads((logp * up).sum(), h2, w2)
    h3, w3 = leaves(hidden, weight, dtype=torch.float64)
    ref_lp = reference_logprobs(h3, w3, targets, bias=None if b is None else b.double())
    w2_ = grads((ref_lp * up.double()).sum(), h3, w3)
    assert rel_l2(logp, ref_lp) <= bound
    for g, r in zip(g2, w2_):
        assert rel_l2(g, r) <= bound


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "forward"])
@pytest.mark.parametrize("entropy", [False, True], ids=["", "entropy"])
@pytest.mark.parametrize(
    "V,dtype,bias,softcap,budget_mib",
    [
        (5000, torch.float32, False, None, 8),  # whole-vocabulary row blocks
        (5000, torch.bfloat16, True, 5.0, 8),  # float32 weight copy, softcap buffer
        (50000, torch.float32, True, None, 8),  # vocabulary tiles
        (50000, torch.bfloat16, False, 5.0, 16),  # tiles with their float32 copies
        (3001, torch.float32, False, None, 64),  # fewer rows than a block
    ],
)
def test_workspace_bytes_bounds_the_tensors_the_backend_allocates(V, dtype, bias, softcap, budget_mib, entropy, grad):
    """The reported working memory is at least what the sweep's tensors take beyond its inputs and outputs, and at
    most 1.6x that (the model's 2 bytes of GEMM slack per logit, which BLAS takes outside any tensor)."""
    from torch.utils._pytree import tree_leaves

    from grao_kernels.backends import Head, workspace_bytes
    from grao_kernels.testing import TensorBytes

    N, H, budget = 300, 64, budget_mib * 2**20
    h, w = torch.randn(N, H).to(dtype), (torch.randn(V, H) / H**0.5).to(dtype)
    b = torch.randn(V).to(dtype) if bias else None
    t = torch.randint(0, V, (N,))
    t[torch.rand(N) < 0.25] = -100
    coef, ec = torch.randn(N), torch.randn(N) if entropy else None
    head = Head(softcap=softcap)
    with TensorBytes(h, w, b, t, coef, ec) as meter:
        if grad:
            out = torch_backend.grad(
                h, w, b, t, head, -100, coef=coef, ent_coef=ec, stats=None, needs=(True, True, bias), budget=budget
            )
        else:
            out = torch_backend.forward(h, w, b, t, head, -100, entropy=entropy, budget=budget)
    returned = sum(x.untyped_storage().nbytes() for x in tree_leaves(out) if isinstance(x, torch.Tensor))
    allocated = meter.peak - returned
    rows = int((t != -100).sum())
    call = dict(hidden_dtype=dtype, bias=bias, head=head, entropy=entropy, grad=grad, budget=budget)
    reported = workspace_bytes("torch", rows, V, H, **call, needs=(True, True, bias))
    assert allocated <= reported <= 1.6 * allocated, (allocated, reported)


def test_workspace_bytes_rejects_an_unknown_backend_and_bad_sizes():
    from grao_kernels.backends import workspace_bytes

    with pytest.raises(ValueError, match="backend must be one of"):
        workspace_bytes("auto", 10, 100, 8)
    with pytest.raises(ValueError, match="V must be a non-negative int"):
        workspace_bytes("torch", 10, -1, 8)

"""Each backend's ``forward``/``grad`` (the contract in ``grao_kernels/backends/__init__.py``)
called directly: statistics against the float64 oracle, zeros at ignored rows,
gradients only where needed, and saved statistics reused to the same result."""

from __future__ import annotations

import pytest
import torch
from utils import FP32_VALUES, ON_DEVICE, assert_close, assert_grads_close, grads, leaves, make_batch

from grao_kernels import backends
from grao_kernels.backends import Head
from grao_kernels.testing import reference_linear_loss, reference_logprobs, reference_lse

HEAD = Head(temperature=0.9, logit_scale=1.5, softcap=5.0)
HEAD_KW = HEAD._asdict()
BUDGET = 64 * 2**20


def _inputs(device):
    hidden, weight, bias, targets, _ = make_batch(1, 2, 5, 12, 97, True, torch.float32, device=device)
    return hidden.reshape(-1, 12), weight, bias, targets.reshape(-1)


@pytest.mark.parametrize("device,backend", ON_DEVICE)
def test_forward_statistics(device, backend):
    hidden, weight, bias, targets = _inputs(device)
    mod = backends.module(backend)
    stats = mod.forward(hidden, weight, bias, targets, HEAD, -100, entropy=True, budget=BUDGET)
    ignored = targets == -100
    for name in ("logp", "lse", "entropy"):
        t = getattr(stats, name)
        assert t.dtype == torch.float32 and t.shape == targets.shape, name
        assert (t[ignored] == 0).all(), f"{name} is not 0 at ignored rows"
    h64, w64, b64 = (t.double() for t in (hidden, weight, bias))
    ref_logp, ref_ent = reference_logprobs(h64, w64, targets, bias=b64, return_entropy=True, **HEAD_KW)
    ref_lse = torch.where(ignored, 0.0, reference_lse(h64, w64, bias=b64, **HEAD_KW))
    assert_close(stats.logp, ref_logp, **FP32_VALUES, name="logp")
    assert_close(stats.lse, ref_lse, **FP32_VALUES, name="lse")
    assert_close(stats.entropy, ref_ent, **FP32_VALUES, name="entropy")
    assert mod.forward(hidden, weight, bias, targets, HEAD, -100, entropy=False, budget=BUDGET).entropy is None


@pytest.mark.parametrize("reuse", [False, True], ids=["fresh", "saved-stats"])
@pytest.mark.parametrize(
    "needs", [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]
)
@pytest.mark.parametrize("device,backend", ON_DEVICE)
def test_grad_returns_only_what_is_needed(device, backend, needs, reuse):
    hidden, weight, bias, targets = _inputs(device)
    mod = backends.module(backend)
    coef = torch.randn(targets.shape, device=device)
    ent_coef = torch.randn(targets.shape, device=device)
    stats = mod.forward(hidden, weight, bias, targets, HEAD, -100, entropy=True, budget=BUDGET) if reuse else None
    out, dh, dw, db = mod.grad(
        hidden, weight, bias, targets, HEAD, -100, coef=coef, ent_coef=ent_coef, stats=stats, needs=needs, budget=BUDGET
    )
    for need, g in zip(needs, (dh, dw, db)):
        assert (g is None) == (not need)

    h64, w64, b64 = leaves(hidden, weight, bias, dtype=torch.float64)
    ref = reference_linear_loss(h64, w64, targets, coef.double(), entropy_coef=ent_coef.double(), bias=b64, **HEAD_KW)
    want = grads(ref, h64, w64, b64)
    got = [None if g is None else g.float() for g in (dh, dw, db)]
    assert_grads_close(got, [w if need else None for w, need in zip(want, needs)])
    ref_logp, ref_ent = reference_logprobs(h64, w64, targets, bias=b64, return_entropy=True, **HEAD_KW)
    assert_close(out.logp, ref_logp, **FP32_VALUES, name="logp")
    assert_close(out.entropy, ref_ent, **FP32_VALUES, name="entropy")

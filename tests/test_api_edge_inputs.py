"""Inputs at the edges of the loss API get a correct result or one clear error, never a NaN, a gradient without its
graph or a raw PyTorch error: double backward, non-contiguous targets, out-of-range ``ignore_index``, a temperature
that overflows the logits, hidden size 0 and tensors on the meta device."""

from __future__ import annotations

import pytest
import torch
from utils import FP32_VALUES, assert_close, assert_grads_close, backends_under_test, grads, leaves

from grao_kernels import fused_linear_logprobs, grao_loss, linear_logprob_loss
from grao_kernels.testing.reference import reference_grao, reference_logprobs

BACKENDS = backends_under_test("cpu")
P, G, T, H, V = 2, 2, 5, 6, 11
S = P * (G + 1)


def batch():
    hidden, weight = torch.randn(S, T, H), torch.randn(V, H) / H**0.5
    targets = torch.randint(0, V, (S, T))
    targets[:, 0] = -100
    return hidden, weight, targets, torch.randn(P, G + 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_create_graph_raises_instead_of_returning_a_gradient_without_graph(backend):
    hidden, weight, targets, rewards = batch()
    h, w = leaves(hidden, weight)
    loss = grao_loss(h, w, targets, rewards, group_size=G, backend=backend).loss
    with pytest.raises(NotImplementedError, match="create_graph=True"):
        torch.autograd.grad(loss, h, create_graph=True)
    logp = fused_linear_logprobs(h, w, targets.clamp(min=0), backend=backend)
    with pytest.raises(NotImplementedError, match="create_graph=True"):
        torch.autograd.grad(logp.sum(), w, create_graph=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_transposed_targets_give_the_oracle_result(backend):
    hidden, weight, targets, rewards = batch()
    transposed = targets.t().contiguous().t()  # same values, column-major strides
    assert not transposed.is_contiguous()
    h, w = leaves(hidden, weight)
    out = grao_loss(h, w, transposed, rewards, group_size=G, backend=backend)
    h64, w64 = leaves(hidden, weight, dtype=torch.float64)
    ref = reference_grao(h64, w64, targets, rewards.double())
    assert_close(out.loss, ref["loss"], **FP32_VALUES, name="loss")
    assert_grads_close(grads(out.loss, h, w), grads(ref["loss"], h64, w64))

    coef = torch.randn(T, S).t()  # non-contiguous coefficients too
    lin = linear_logprob_loss(hidden, weight, transposed, coef, backend=backend)
    want = reference_logprobs(hidden.double(), weight.double(), targets)
    assert_close(lin.logp, want, **FP32_VALUES, name="logp")
    assert_close(lin.loss, (coef.double() * want).sum(), **FP32_VALUES, name="loss")


@pytest.mark.parametrize("ignore_index", [2**70, -(2**64)])
def test_ignore_index_outside_int64_is_a_value_error(ignore_index):
    hidden, weight, targets, rewards = batch()
    with pytest.raises(ValueError, match=r"ignore_index must fit in int64"):
        grao_loss(hidden, weight, targets, rewards, group_size=G, ignore_index=ignore_index, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_temperature_that_overflows_the_logits_raises_and_a_small_safe_one_is_finite(backend):
    hidden, weight, targets, rewards = batch()
    with pytest.raises(ValueError, match=r"temperature=1e-38 .*beyond float32"):
        grao_loss(hidden, weight, targets, rewards, group_size=G, temperature=1e-38, backend=backend)
    with pytest.raises(ValueError, match=r"temperature=1e-38"):
        fused_linear_logprobs(hidden, weight, targets, temperature=1e-38, backend=backend)
    out = grao_loss(hidden, weight, targets, rewards, group_size=G, temperature=1e-3, backend=backend)
    assert torch.isfinite(out.loss)


def test_hidden_size_zero_is_a_value_error():
    _, _, targets, rewards = batch()
    with pytest.raises(ValueError, match=r"hidden size H must be >= 1, got weight \(11, 0\) and hidden \(6, 5, 0\)"):
        grao_loss(torch.randn(S, T, 0), torch.randn(V, 0), targets, rewards, group_size=G, backend="torch")


@pytest.mark.parametrize("which", ["rewards", "hidden", "weight", "targets"])
def test_tensors_on_the_meta_device_are_a_value_error(which):
    hidden, weight, targets, rewards = batch()
    args = dict(hidden=hidden, weight=weight, targets=targets, rewards=rewards)
    meta = {k: (v.to("meta") if k == which or (which != "rewards" and k != "rewards") else v) for k, v in args.items()}
    with pytest.raises(ValueError, match=r"is on the meta device"):
        grao_loss(**meta, group_size=G, backend="torch")

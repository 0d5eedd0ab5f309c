"""Gradients are computed only when autograd will use them: no gradient sweep under
no_grad/inference_mode, no dW product for a frozen weight, no entropy term
when the entropy is not part of the loss."""

from __future__ import annotations

import pytest
import torch
from utils import ON_DEVICE, make_batch

from grao_kernels import backends, fused_linear_logprobs, grao_loss, linear_logprob_loss


def _calls(monkeypatch, backend):
    """Record the ``needs`` and ``ent_coef`` of every ``grad`` call of ``backend``."""
    mod = backends.module(backend)
    real = mod.grad
    calls = []

    def spy(*args, **kw):
        calls.append({"needs": kw["needs"], "ent_coef": kw["ent_coef"] is not None})
        return real(*args, **kw)

    monkeypatch.setattr(mod, "grad", spy)
    return calls


def _all_three(hidden, weight, targets, rewards, backend):
    grao_loss(hidden, weight, targets, rewards, group_size=2, backend=backend)
    fused_linear_logprobs(hidden, weight, targets, return_entropy=True, backend=backend)
    return linear_logprob_loss(hidden, weight, targets, torch.ones(targets.shape), backend=backend)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
@pytest.mark.parametrize("device,backend", ON_DEVICE)
def test_no_gradient_sweep_when_autograd_is_off(monkeypatch, device, backend, mode):
    hidden, weight, _, targets, rewards = make_batch(1, 2, 4, 8, 37, False, torch.float32, device=device)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    calls = _calls(monkeypatch, backend)
    with mode():
        out = _all_three(hidden, weight, targets, rewards, backend)
    assert calls == [], "grad ran although no gradient can be used"
    assert not out.loss.requires_grad
    # Nothing requiring grad: forward only as well, with autograd on.
    _all_three(hidden.detach(), weight.detach(), targets, rewards, backend)
    assert calls == []
    # With autograd on, the loss functions do sweep for the gradients.
    _all_three(hidden, weight, targets, rewards, backend)
    assert len(calls) == 2


@pytest.mark.parametrize("device,backend", ON_DEVICE)
def test_frozen_weight_skips_its_gradient(monkeypatch, device, backend):
    hidden, weight, b, targets, rewards = make_batch(1, 2, 4, 8, 37, True, torch.float32, device=device)
    h = hidden.clone().requires_grad_(True)
    calls = _calls(monkeypatch, backend)
    grao_loss(h, weight, targets, rewards, group_size=2, bias=b, backend=backend).loss.backward()
    assert calls[-1]["needs"] == (True, False, False)
    logp = fused_linear_logprobs(h, weight, targets, bias=b, backend=backend)
    logp.sum().backward()
    assert calls[-1] == {"needs": (True, False, False), "ent_coef": False}
    w = weight.clone().requires_grad_(True)
    out = fused_linear_logprobs(hidden, w, targets, bias=b, return_entropy=True, backend=backend)
    out.logp.sum().backward()  # the entropy is returned but not part of the loss
    assert calls[-1] == {"needs": (False, True, False), "ent_coef": False}
    assert w.grad is not None and torch.isfinite(w.grad).all()

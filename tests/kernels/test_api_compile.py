"""torch.compile(fullgraph=True) of a training step calling the public functions:
the backend sweeps are opaque custom ops with fake implementations, and
``validate=False`` leaves no host sync in the traced code."""

from __future__ import annotations

import pytest
import torch
from utils import assert_close, leaves, make_batch

from grao_kernels import fused_linear_logprobs, grao_coefficients, grao_loss, linear_logprob_loss


def step(hidden, weight, bias, targets, rewards, group_ids, is_reference):
    out = grao_loss(
        hidden,
        weight,
        targets,
        rewards,
        group_ids=group_ids,
        is_reference=is_reference,
        bias=bias,
        logit_scale=0.5,
        softcap=4.0,
        backend="torch",
        validate=False,
    )
    lp = fused_linear_logprobs(hidden, weight, targets, return_entropy=True, backend="torch", validate=False)
    coefs = grao_coefficients(rewards, group_ids=group_ids, is_reference=is_reference, validate=False)
    lin = linear_logprob_loss(
        hidden, weight, targets, coefs.token_coef(targets), bias=bias, backend="torch", validate=False
    )
    return out.loss + 0.1 * (lp.logp.sum() + lp.entropy.sum()) + lin.loss


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_step_with_fullgraph_matches_eager(compiler):
    torch._dynamo.reset()
    hidden, weight, bias, targets, rewards = make_batch(2, 2, 4, 8, 37, True, torch.float32)
    S = rewards.numel()
    perm = torch.randperm(S)
    group_ids = (torch.arange(S) // 3)[perm]
    is_reference = (torch.arange(S) % 3 == 2)[perm]
    batch = (targets[perm], rewards.reshape(-1)[perm], group_ids, is_reference)

    eager = leaves(hidden[perm], weight, bias)
    loss = step(*eager, *batch)
    loss.backward()

    compiled = leaves(hidden[perm], weight, bias)
    fn = torch.compile(step, fullgraph=True, backend=compiler)
    closs = fn(*compiled, *batch)
    closs.backward()

    assert_close(closs, loss, rtol=1e-5, atol=1e-6, name="loss")
    for name, a, b in zip(("hidden", "weight", "bias"), compiled, eager):
        assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, name=f"d{name}")

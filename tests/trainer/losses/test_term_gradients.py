"""Each GRAO term's gradient norm (grao.losses.term_gradient_norms) against the float64 formula with materialised
logits: the norm of d(-term)/d(hidden, weight, bias) of reference_grao's exploration, imitation and alignment."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from utils import leaves, make_batch

from grao.losses import GRAO, LossBatch, term_gradient_norms
from grao_kernels.testing import reference_grao

P, G, T, H, V = 3, 3, 7, 8, 37  # odd sizes; make_batch pads, ignores prompts, empties one row, ties a group


def oracle_norms(batch, beta, lam, exploration, lm_head=True, **head) -> dict[str, float]:
    hidden, weight, bias, targets, rewards = batch
    out = {}
    for term, scale in (("exploration", exploration), ("imitation", 1.0), ("alignment", 1.0)):
        h, w, b = leaves(hidden, weight, bias, dtype=torch.float64)
        value = -scale * reference_grao(h, w, targets, rewards, bias=b, beta=beta, lam=lam, **head)[term]
        grads = torch.autograd.grad(value, [t for t in ((h, w, b) if lm_head else (h,)) if t is not None])
        out[term] = float(sum(g.square().sum() for g in grads) ** 0.5)
    return out


def loss_batch(batch, **head) -> LossBatch:
    hidden, weight, bias, targets, rewards = batch
    return LossBatch(hidden, weight, bias, targets, rewards, group_size=G, groups=range(P), num_groups=P, **head)


@pytest.mark.parametrize(
    "beta, lam, exploration, head",
    [
        (0.5, 0.6, 1.0, {}),  # the paper's weights
        (2.0, 0.1, 0.3, {}),  # other weights, each norm scales with its own
        (0.5, 0.6, 1.0, {"logit_scale": 0.5, "softcap": 3.0, "temperature": 0.7}),  # a transformed head
    ],
)
@pytest.mark.parametrize("lm_head", [True, False], ids=["trained-head", "frozen-head"])
def test_each_term_gradient_norm_matches_the_float64_formula(beta, lam, exploration, head, lm_head):
    batch = make_batch(P, G, T, H, V, bias=True, dtype=torch.float32)
    want = oracle_norms(batch, beta, lam, exploration, lm_head, **head)
    loss = GRAO(beta, lam, backend="torch", exploration=exploration)
    got = term_gradient_norms(loss, loss_batch(batch, **head), lm_head=lm_head)
    assert got == pytest.approx(want, rel=1e-4)
    # the three differ on this batch, so a term swapped with another would not pass
    assert min(want.values()) > 0 and len({round(v, 4) for v in want.values()}) == 3


def test_a_term_weighted_0_has_no_gradient_and_the_batch_is_not_changed():
    batch = make_batch(P, G, T, H, V, bias=False, dtype=torch.float32)
    lb = loss_batch(batch)
    h = lb.hidden.detach().clone().requires_grad_(True)
    lb = dataclasses.replace(lb, hidden=h)
    got = term_gradient_norms(GRAO(0.0, 0.6, backend="torch"), lb)  # grao-no-imitation
    # (GRAO weights exploration 0 by subtracting it from the float32 coefficients: a rounding residue is left)
    assert got["imitation"] < 1e-6 * min(got["exploration"], got["alignment"])
    assert got == pytest.approx(oracle_norms(batch, 0.0, 0.6, 1.0), rel=1e-4, abs=1e-6)
    assert h.grad is None  # the probe's gradients never reach the batch's tensors

"""A -inf bias masks vocabulary ids (e.g. a padded vocabulary): masked ids get
probability exactly 0 and nothing is NaN, also when whole tiles, splits or row
blocks of the vocabulary are masked, on every backend and in its tiled path."""

from __future__ import annotations

import pytest
import torch
from utils import FP32_VALUES, ON_DEVICE, assert_close, assert_grads_close, grads, leaves

from grao_kernels import fused_linear_logprobs, grao_loss
from grao_kernels.testing import reference_grao, reference_logprobs

V = 6000  # above what the torch backend holds in one tile within 1 MiB

# Masked id ranges: the first tile(s) of the vocabulary, ranges covering whole
# 256- and 512-aligned tiles in the middle, and the tail (a padded vocabulary).
MASKS = {
    "head-middle-tail": [(0, 1500), (2048, 3584), (5800, V)],
    "all-but-a-few": [(0, 997), (998, 4095), (4096, V - 1)],
}


def masked_bias(ranges, device):
    b = torch.randn(V) * 0.5
    for lo, hi in ranges:
        b[lo:hi] = -float("inf")
    return b.to(device)


@pytest.mark.parametrize("budget", [None, 2**20], ids=["default-budget", "small-budget"])
@pytest.mark.parametrize("mask", MASKS, ids=list(MASKS))
@pytest.mark.parametrize("device,backend", ON_DEVICE)
def test_fully_masked_tiles_give_finite_results_equal_to_the_reference(device, backend, mask, budget):
    S, T, H = 3, 3, 16
    bias = masked_bias(MASKS[mask], device)
    allowed = torch.isfinite(bias).nonzero().squeeze(1)
    targets = allowed[torch.randint(0, allowed.numel(), (S, T), device=device)]
    targets[0, 0] = -100
    hidden = torch.randn(S, T, H, device=device)
    weight = torch.randn(V, H, device=device) / H**0.5
    rewards = torch.randn(1, S, device=device)

    h, w, b = leaves(hidden, weight, bias)
    out = fused_linear_logprobs(h, w, targets, bias=b, return_entropy=True, backend=backend, memory_budget=budget)
    up_logp, up_ent = torch.randn(S, T, device=device), torch.randn(S, T, device=device)
    got = grads((out.logp * up_logp).sum() + (out.entropy * up_ent).sum(), h, w, b)

    h64, w64, b64 = leaves(hidden, weight, bias, dtype=torch.float64)
    ref_logp, ref_ent = reference_logprobs(h64, w64, targets, bias=b64, return_entropy=True)
    want = grads((ref_logp * up_logp.double()).sum() + (ref_ent * up_ent.double()).sum(), h64, w64, b64)
    assert_close(out.logp, ref_logp, **FP32_VALUES, name="logp")
    assert_close(out.entropy, ref_ent, **FP32_VALUES, name="entropy")
    assert_grads_close(got, want)

    h, w, b = leaves(hidden, weight, bias)
    loss = grao_loss(h, w, targets, rewards, group_size=S - 1, bias=b, backend=backend, memory_budget=budget)
    got = grads(loss.loss, h, w, b)
    h64, w64, b64 = leaves(hidden, weight, bias, dtype=torch.float64)
    ref = reference_grao(h64, w64, targets, rewards, bias=b64)
    assert torch.isfinite(loss.loss) and abs(loss.loss.item() - ref["loss"].item()) <= 1e-5
    assert_grads_close(got, grads(ref["loss"], h64, w64, b64))

"""GRAO batches as trainers lay them out: per-sequence groups in any row order
and of unequal sizes, groups split across micro-batches, and group statistics
that stay exact for huge or nearly equal rewards; every backend against the
float64 oracle."""

from __future__ import annotations

import pytest
import torch
from utils import FP32_VALUES, ON_DEVICE, assert_close, assert_grads_close, grads, leaves, make_batch, rel_l2

from grao_kernels import grao_coefficients, grao_loss, group_advantages, linear_logprob_loss
from grao_kernels.testing import reference_advantages, reference_grao


def shuffled_groups(completions, T, H, V, *, bias=False, device="cpu"):
    """A batch of groups with the given numbers of completions each plus one reference,
    rows shuffled, groups named by arbitrary ids: ``(hidden, weight, bias, targets, rewards, group_ids, is_reference)``."""
    ids = torch.tensor([17, 3, 42, 8, 99, 5][: len(completions)])
    group_ids = torch.cat([ids[g].repeat(n + 1) for g, n in enumerate(completions)])
    is_reference = torch.cat([torch.arange(n + 1) == n for n in completions])
    S = group_ids.numel()
    hidden, weight, b, targets, _ = make_batch(1, S - 1, T, H, V, bias, torch.float32, tied_group=False)
    rewards = torch.randn(S)
    perm = torch.randperm(S)
    tensors = (hidden, weight, b, targets[perm], rewards[perm], group_ids[perm], is_reference[perm])
    return tuple(None if t is None else t.to(device) for t in tensors)


# The logits' head: plain, Granite-like (a scale, with a temperature), Gemma-like (a soft cap after a scale).
HEADS = [
    pytest.param({}, id="plain"),
    pytest.param(dict(logit_scale=0.125, temperature=0.8), id="scale-temp"),
    pytest.param(dict(logit_scale=3.0, softcap=2.5), id="scale-softcap"),
]


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("device,backend", ON_DEVICE)
def test_shuffled_rows_and_unequal_group_sizes_match_float64_reference(device, backend, head):
    hidden, weight, b, targets, rewards, ids, ref = shuffled_groups([3, 1, 5], 6, 16, 77, bias=True, device=device)
    h, w, bb = leaves(hidden, weight, b)
    out = grao_loss(h, w, targets, rewards, group_ids=ids, is_reference=ref, bias=bb, lam=0.8, backend=backend, **head)
    got = grads(out.loss, h, w, bb)

    h64, w64, b64 = leaves(hidden, weight, b, dtype=torch.float64)
    want_out = reference_grao(
        h64, w64, targets, rewards.cpu(), group_ids=ids.cpu(), is_reference=ref.cpu(), bias=b64, lam=0.8, **head
    )
    want = grads(want_out["loss"], h64, w64, b64)

    assert out.advantages.shape == rewards.shape
    assert_close(out.advantages, want_out["advantages"], rtol=1e-5, atol=1e-6, name="advantages")
    assert_close(out.seq_logp, want_out["seq_logp"], **FP32_VALUES, name="seq_logp")
    scale = sum(abs(want_out[k].item()) for k in ("exploration", "imitation", "alignment")) + 1e-12
    for k in ("loss", "exploration", "imitation", "alignment"):
        assert abs(getattr(out, k).item() - want_out[k].item()) <= 1e-5 * scale, k
    assert_grads_close(got, want)


def test_per_sequence_form_of_a_group_major_batch_is_the_same_loss():
    G = 3
    hidden, weight, _, targets, rewards = make_batch(2, G, 5, 8, 40, False, torch.float32)
    major = grao_loss(hidden, weight, targets, rewards, group_size=G, backend="torch")
    S = rewards.numel()
    perm = torch.randperm(S)
    ids = (torch.arange(S) // (G + 1))[perm] * 10
    ref = (torch.arange(S) % (G + 1) == G)[perm]
    per_seq = grao_loss(
        hidden[perm], weight, targets[perm], rewards.reshape(-1)[perm], group_ids=ids, is_reference=ref, backend="torch"
    )
    assert abs(per_seq.loss.item() - major.loss.item()) <= 1e-6 * (1 + abs(major.loss.item()))
    assert_close(per_seq.advantages, major.advantages.reshape(-1)[perm], rtol=0, atol=1e-6, name="advantages")
    flat = grao_coefficients(rewards.reshape(-1), group_size=G)
    assert torch.equal(flat.seq_coef, grao_coefficients(rewards, group_size=G).seq_coef)


@pytest.mark.parametrize("head", HEADS[::2])
@pytest.mark.parametrize("device,backend", ON_DEVICE)
def test_groups_split_across_micro_batches_accumulate_the_full_batch_gradients(device, backend, head):
    """Coefficients once on the whole batch, then one linear_logprob_loss per micro-batch of
    arbitrary rows (groups split between them): the accumulated gradients are the full batch's."""
    hidden, weight, b, targets, rewards, ids, ref = shuffled_groups([2, 4, 3], 5, 12, 61, bias=True, device=device)
    h, w, bb = leaves(hidden, weight, b)
    full = grao_loss(h, w, targets, rewards, group_ids=ids, is_reference=ref, bias=bb, backend=backend, **head)
    want = grads(full.loss, h, w, bb)

    coefs = grao_coefficients(rewards, group_ids=ids, is_reference=ref)
    h, w, bb = leaves(hidden, weight, b)
    total = 0.0
    rows = torch.randperm(rewards.numel(), device=device)
    for mb in rows.tensor_split(3):
        piece = linear_logprob_loss(
            h[mb], w, targets[mb], coefs.token_coef(targets[mb], rows=mb), bias=bb, backend=backend, **head
        )
        piece.loss.backward()
        total += piece.loss.item()
    assert abs(total - full.loss.item()) <= 1e-6 * (1 + abs(full.loss.item()))
    for name, g, r in zip(("hidden", "weight", "bias"), (h.grad, w.grad, bb.grad), want):
        assert rel_l2(g, r) <= 1e-6, f"d{name}: relative L2 {rel_l2(g, r):.2e} against the full batch"


def test_coefficients_give_the_loss_and_the_terms():
    """loss = sum_s seq_coef[s] J_s, and the terms add up to minus the loss."""
    hidden, weight, _, targets, rewards, ids, ref = shuffled_groups([2, 3], 4, 8, 30)
    coefs = grao_coefficients(rewards, group_ids=ids, is_reference=ref, beta=0.3, lam=0.9)
    out = grao_loss(
        hidden, weight, targets, rewards, group_ids=ids, is_reference=ref, beta=0.3, lam=0.9, backend="torch"
    )
    assert abs((coefs.seq_coef * out.seq_logp).sum().item() - out.loss.item()) <= 1e-6
    exploration, imitation, alignment = coefs.terms(out.seq_logp)
    assert abs((exploration + imitation + alignment).item() + out.loss.item()) <= 1e-6
    assert coefs.group_index.max().item() == 1 and int(coefs.is_reference.sum()) == 2
    tc = coefs.token_coef(targets)
    assert (tc[targets == -100] == 0).all()
    # Each sequence's token coefficients add up to its coefficient (0 without completion tokens).
    expected = torch.where((targets != -100).any(1), coefs.seq_coef, 0.0)
    assert_close(tc.sum(1), expected, rtol=1e-6, atol=0, name="token coefficients per sequence")


@pytest.mark.parametrize(
    "make_rewards",
    [
        pytest.param(lambda: 3e19 * torch.randn(4, 9), id="huge"),
        pytest.param(lambda: -5e37 + 1e37 * torch.randn(4, 9), id="near-float32-max"),
        pytest.param(lambda: 20 + 1e-4 * torch.randn(4, 9), id="offset-tiny-spread"),
    ],
)
def test_group_statistics_are_exact_for_extreme_rewards(make_rewards):
    rewards = make_rewards()
    assert torch.isfinite(rewards).all()
    want = reference_advantages(rewards)
    assert want.abs().max() > 0.5  # the groups are not tied
    assert_close(group_advantages(rewards), want, rtol=1e-5, atol=1e-5, name="group_advantages")
    coefs = grao_coefficients(rewards, group_size=8)
    assert_close(coefs.advantages.view(4, 9), want, rtol=1e-5, atol=1e-5, name="grao_coefficients")
    assert torch.isfinite(coefs.seq_coef).all()

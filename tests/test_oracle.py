"""Every backend against the eager float64 reference that materialises the logits.

Loss, every GRAOOutput field, log-probs and the gradients w.r.t. hidden, weight
and bias, over odd shapes: V not a power of two and V > 65536, padding, a
sequence without completion tokens, a tied-reward group, temperature != 1,
bias, G = 1; float32 against fixed bounds, bfloat16/float16 against a multiple
of PyTorch's own error in that dtype.
"""

from __future__ import annotations

import pytest
import torch
from utils import assert_close, assert_within_torch_error, backends_under_test, rel_l2

from grao_kernels import GRAOLoss, fused_linear_logprobs, grao_loss, group_advantages
from grao_kernels.reference import reference_advantages, reference_grao, reference_logprobs

# Every backend on every device present: CPU (triton through the interpreter),
# and CUDA when there is one.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ON_DEVICE = [
    pytest.param(device, name, id=name if device == "cpu" else f"{name}-{device}")
    for device in DEVICES
    for name in backends_under_test(device)
]

# (name, P, G, T, H, V, bias, temperature)
CASES = [
    ("odd-V-bias-temp", 2, 3, 7, 24, 97, True, 0.7),
    ("G1", 3, 1, 5, 16, 50, False, 1.0),
    ("V-over-64k", 1, 2, 3, 8, 65536 + 1019, True, 1.3),
    ("wide-H", 1, 2, 4, 72, 130, False, 2.0),
]

# float32 is checked against the fixed bounds; the low-precision dtypes
# against PyTorch's own error in that dtype (factor, relative-L2 floor).
DTYPES = [
    pytest.param(torch.float32, None, id="fp32"),
    pytest.param(torch.bfloat16, (2.0, 1e-3), id="bf16"),
    pytest.param(torch.float16, (2.0, 1e-4), id="fp16"),
]


def make_batch(P, G, T, H, V, bias, dtype, *, empty_seq=True, tied_group=True, scale=1.0, device="cpu"):
    S = P * (G + 1)
    hidden = (torch.randn(S, T, H) * scale).to(dtype)
    weight = (torch.randn(V, H) / H**0.5).to(dtype)
    b = (torch.randn(V) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, V, (S, T))
    # Prompt positions and right padding are ignored, with varying lengths.
    for s in range(S):
        prompt = 1 + s % 2
        pad = (s * 3) % max(T - prompt, 1)
        targets[s, :prompt] = -100
        if pad:
            targets[s, T - pad :] = -100
    if empty_seq and S > 1:
        targets[1] = -100  # a completion with no tokens: J = 0, no NaN
    rewards = torch.randn(P, G + 1)
    if tied_group and P > 1:
        rewards[-1] = 0.25  # all equal: zero advantages
    return tuple(None if t is None else t.to(device) for t in (hidden, weight, b, targets, rewards))


def _leaf(t, dtype=None):
    if t is None:
        return None
    return t.detach().to(dtype or t.dtype).requires_grad_(True)


def _grads(loss, *leaves):
    live = [x for x in leaves if x is not None]
    grads = torch.autograd.grad(loss, live)
    it = iter(grads)
    return [None if x is None else next(it) for x in leaves]


@pytest.mark.parametrize("device,backend", ON_DEVICE)
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_grao_loss_matches_float64_reference(device, backend, dtype, tol, case):
    _, P, G, T, H, V, bias, temp = case
    hidden, weight, b, targets, rewards = make_batch(P, G, T, H, V, bias, dtype, device=device)

    h, w, bb = _leaf(hidden), _leaf(weight), _leaf(b)
    out = grao_loss(h, w, targets, rewards, bias=bb, temperature=temp, backend=backend)
    got = _grads(out.loss, h, w, bb)

    h64, w64, b64 = _leaf(hidden, torch.float64), _leaf(weight, torch.float64), _leaf(b, torch.float64)
    ref = reference_grao(h64, w64, targets, rewards, bias=b64, temperature=temp)
    want = _grads(ref["loss"], h64, w64, b64)

    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    for field in ("advantages", "seq_logp", "exploration", "imitation", "alignment"):
        assert getattr(out, field).dtype == torch.float32, field
    assert torch.isfinite(out.seq_logp).all()
    assert_close(out.advantages, ref["advantages"], rtol=1e-5, atol=1e-6, name="advantages")

    terms = sum(abs(ref[k].item()) for k in ("exploration", "imitation", "alignment")) + 1e-12
    if tol is None:
        assert abs(out.loss.item() - ref["loss"].item()) <= 1e-5 * terms, (out.loss.item(), ref["loss"].item())
        assert_close(out.seq_logp, ref["seq_logp"], rtol=1e-5, atol=1e-5, name="seq_logp")
        for k in ("exploration", "imitation", "alignment"):
            assert abs(getattr(out, k).item() - ref[k].item()) <= 1e-5 * terms, k
        for name, g, r in zip(("hidden", "weight", "bias"), got, want):
            if r is not None:
                assert g.dtype == {"hidden": h, "weight": w, "bias": bb}[name].dtype
                assert rel_l2(g, r) <= 1e-4, f"d{name}: relative L2 {rel_l2(g, r):.2e}"
    else:
        factor, floor = tol
        # PyTorch's own result in the same dtype, materialising the logits.
        hs, ws, bs = _leaf(hidden), _leaf(weight), _leaf(b)
        same = reference_grao(hs, ws, targets, rewards, bias=bs, temperature=temp)
        same_g = _grads(same["loss"], hs, ws, bs)
        for k in ("loss", "seq_logp", "exploration", "imitation", "alignment"):
            actual = out.loss if k == "loss" else getattr(out, k)
            assert_within_torch_error(actual, ref[k], same[k], factor=factor, floor=floor, name=k)
        for name, g, r, s in zip(("hidden", "weight", "bias"), got, want, same_g):
            if r is not None:
                assert_within_torch_error(g, r, s, factor=factor, floor=floor, name=f"d{name}")


@pytest.mark.parametrize("device,backend", ON_DEVICE)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fused_linear_logprobs_matches_float64_reference(device, backend, case):
    _, P, G, T, H, V, bias, temp = case
    hidden, weight, b, targets, _ = make_batch(P, G, T, H, V, bias, torch.float32, device=device)
    h, w, bb = _leaf(hidden), _leaf(weight), _leaf(b)
    logp = fused_linear_logprobs(h, w, targets, bias=bb, temperature=temp, backend=backend)
    upstream = torch.randn(targets.shape, device=device)
    got = _grads((logp * upstream).sum(), h, w, bb)

    h64, w64, b64 = _leaf(hidden, torch.float64), _leaf(weight, torch.float64), _leaf(b, torch.float64)
    ref = reference_logprobs(h64, w64, targets, bias=b64, temperature=temp)
    want = _grads((ref * upstream.double()).sum(), h64, w64, b64)

    assert logp.dtype == torch.float32 and logp.shape == targets.shape
    assert (logp[targets == -100] == 0).all()
    assert_close(logp, ref, rtol=1e-5, atol=1e-5, name="logp")
    for name, g, r in zip(("hidden", "weight", "bias"), got, want):
        if r is not None:
            assert rel_l2(g, r) <= 1e-4, f"d{name}: relative L2 {rel_l2(g, r):.2e}"


@pytest.mark.parametrize("device,backend", ON_DEVICE)
def test_logprobs_any_leading_shape_and_no_grad(device, backend):
    hidden, weight, _, targets, _ = make_batch(1, 2, 5, 12, 41, False, torch.float32, device=device)
    flat = fused_linear_logprobs(hidden.reshape(-1, 12), weight, targets.reshape(-1), backend=backend)
    shaped = fused_linear_logprobs(hidden, weight, targets, backend=backend)
    assert_close(flat.view(targets.shape), shaped, rtol=0, atol=1e-6, name="reshape")
    with torch.no_grad():
        out = grao_loss(hidden, weight, targets, torch.randn(1, 3, device=device), backend=backend)
    assert not out.loss.requires_grad and torch.isfinite(out.loss)


@pytest.mark.parametrize("device,backend", ON_DEVICE)
def test_ignored_positions_cost_nothing_and_leak_nothing(device, backend):
    """Ignored rows are skipped, not multiplied by zero: garbage there cannot reach the result."""
    hidden, weight, b, targets, rewards = make_batch(2, 2, 6, 16, 53, True, torch.float32, device=device)
    clean = grao_loss(hidden, weight, targets, rewards, bias=b, backend=backend)
    dirty_hidden = hidden.clone()
    dirty_hidden[targets == -100] = float("nan")
    h, w = _leaf(dirty_hidden), _leaf(weight)
    dirty = grao_loss(h, w, targets, rewards, bias=b, backend=backend)
    gh, gw = _grads(dirty.loss, h, w)
    assert torch.isfinite(dirty.loss) and torch.isfinite(gw).all()
    assert (gh[targets == -100] == 0).all()
    assert abs(dirty.loss.item() - clean.loss.item()) <= 1e-6


@pytest.mark.parametrize("device,backend", ON_DEVICE)
def test_all_targets_ignored_gives_zero_loss_and_gradients(device, backend):
    hidden, weight, _, targets, rewards = make_batch(1, 2, 4, 8, 33, False, torch.float32, device=device)
    targets[:] = -100
    h, w = _leaf(hidden), _leaf(weight)
    out = grao_loss(h, w, targets, rewards, backend=backend)
    gh, gw = _grads(out.loss, h, w)
    assert out.loss.item() == 0 and (out.seq_logp == 0).all()
    assert (gh == 0).all() and (gw == 0).all()


@pytest.mark.parametrize("device,backend", ON_DEVICE)
def test_module_matches_function(device, backend):
    hidden, weight, b, targets, rewards = make_batch(2, 2, 5, 8, 45, True, torch.float32, device=device)
    module = GRAOLoss(beta=0.3, lam=0.9, temperature=0.8, backend=backend)
    a = module(hidden, weight, targets, rewards, bias=b)
    f = grao_loss(hidden, weight, targets, rewards, bias=b, beta=0.3, lam=0.9, temperature=0.8, backend=backend)
    for x, y in zip(a, f):
        assert torch.equal(x, y)
    assert "beta=0.3" in repr(module)


def test_group_advantages_matches_reference_and_ties_are_zero():
    rewards = torch.randn(5, 9)
    rewards[2] = 0.1  # sum/9 of equal values is not exactly 0.1 in float
    got = group_advantages(rewards)
    assert_close(got, reference_advantages(rewards), rtol=1e-5, atol=1e-6, name="advantages")
    assert (got[2] == 0).all()
    # population std: a two-element group maps to exactly +-1 (up to eps)
    two = group_advantages(torch.tensor([[0.0, 1.0]]), eps=0.0)
    assert torch.equal(two, torch.tensor([[-1.0, 1.0]]))


def test_loss_is_minus_sum_of_terms_and_betas_lambdas_enter_as_in_the_paper():
    hidden, weight, _, targets, rewards = make_batch(2, 3, 5, 8, 29, False, torch.float32, empty_seq=False)
    out = grao_loss(hidden, weight, targets, rewards, beta=0.0, lam=0.0, backend="torch")
    # beta = lam = 0: only exploration is left, (1/G) sum_i A_i J(o_i) averaged over prompts
    adv = out.advantages
    j = out.seq_logp.view(2, 4)
    expected = (adv[:, :3] * j[:, :3]).sum(1).div(3).mean()
    assert abs(out.exploration.item() - expected.item()) < 1e-6
    assert out.imitation.item() == 0 and out.alignment.item() == 0
    full = grao_loss(hidden, weight, targets, rewards, backend="torch")
    total = full.exploration + full.imitation + full.alignment
    assert abs(full.loss.item() + total.item()) <= 1e-6 * (1 + abs(total.item()))


@pytest.mark.parametrize("device,backend", ON_DEVICE)
def test_upstream_gradient_scales_the_loss_gradients(device, backend):
    hidden, weight, b, targets, rewards = make_batch(2, 2, 5, 8, 45, True, torch.float32, device=device)
    h1, w1, h2, w2 = _leaf(hidden), _leaf(weight), _leaf(hidden), _leaf(weight)
    g1 = _grads(grao_loss(h1, w1, targets, rewards, bias=b, backend=backend).loss, h1, w1)
    g2 = _grads(-2.5 * grao_loss(h2, w2, targets, rewards, bias=b, backend=backend).loss, h2, w2)
    for a, c in zip(g1, g2):
        assert_close(c, -2.5 * a, rtol=1e-6, atol=1e-9, name="scaled gradient")
    with pytest.raises(RuntimeError, match="backward through the same graph twice"):
        loss = grao_loss(h1, w1, targets, rewards, bias=b, backend=backend).loss
        loss.backward(retain_graph=True)
        loss.backward()

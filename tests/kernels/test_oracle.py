"""Every backend against the eager float64 reference that materialises the logits.

Loss, every GRAOOutput field, log-probs, entropies and the gradients w.r.t.
hidden, weight and bias, over odd shapes: V not a power of two and V > 65536,
padding, a sequence without completion tokens, a tied-reward group,
temperature != 1, logit scaling and soft-capping, bias, G = 1, and a per-call
memory budget that forces the backends' tiled paths; float32 against fixed
bounds, bfloat16/float16 against a multiple of PyTorch's own error in that
dtype.
"""

from __future__ import annotations

import pytest
import torch
from utils import (
    DTYPES,
    FP32_VALUES,
    ON_DEVICE,
    assert_close,
    assert_grads_close,
    assert_within_torch_error,
    grads,
    leaves,
    make_batch,
    rel_l2,
)

from grao_kernels import GRAOLoss, fused_linear_logprobs, grao_loss, group_advantages, linear_logprob_loss
from grao_kernels.testing import reference_advantages, reference_grao, reference_linear_loss, reference_logprobs

# (name, P, G, T, H, V, bias, temperature)
CASES = [
    ("odd-V-bias-temp", 2, 3, 7, 24, 97, True, 0.7),
    ("G1", 3, 1, 5, 16, 50, False, 1.0),
    ("V-over-64k", 1, 2, 3, 8, 65536 + 1019, True, 1.3),
    ("wide-H", 1, 2, 4, 72, 130, False, 2.0),
]

# How the logits are formed: (name, temperature, logit_scale, softcap, bias).
HEADS = [
    ("plain", 1.0, 1.0, None, False),
    ("scale-temp-bias", 0.8, 0.125, None, True),  # Granite: logit_scale = 1 / logits_scaling
    ("softcap", 1.0, 1.0, 2.5, False),  # Gemma-2: final_logit_softcapping
    ("scale-softcap-temp-bias", 1.4, 3.0, 4.0, True),
]

# The smallest budget: every backend takes its tiled/blocked path.
SMALL_BUDGET = 2**20


def _reference_inputs(*tensors):
    return leaves(*tensors, dtype=torch.float64)


@pytest.mark.parametrize("device,backend", ON_DEVICE)
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_grao_loss_matches_float64_reference(device, backend, dtype, tol, case):
    _, P, G, T, H, V, bias, temp = case
    hidden, weight, b, targets, rewards = make_batch(P, G, T, H, V, bias, dtype, device=device)

    h, w, bb = leaves(hidden, weight, b)
    out = grao_loss(h, w, targets, rewards, group_size=G, bias=bb, temperature=temp, backend=backend)
    got = grads(out.loss, h, w, bb)

    h64, w64, b64 = _reference_inputs(hidden, weight, b)
    ref = reference_grao(h64, w64, targets, rewards, bias=b64, temperature=temp)
    want = grads(ref["loss"], h64, w64, b64)

    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    for field in ("advantages", "seq_logp", "exploration", "imitation", "alignment"):
        assert getattr(out, field).dtype == torch.float32, field
    assert out.advantages.shape == rewards.shape
    assert torch.isfinite(out.seq_logp).all()
    assert_close(out.advantages, ref["advantages"], rtol=1e-5, atol=1e-6, name="advantages")

    terms = sum(abs(ref[k].item()) for k in ("exploration", "imitation", "alignment")) + 1e-12
    if tol is None:
        assert abs(out.loss.item() - ref["loss"].item()) <= 1e-5 * terms, (out.loss.item(), ref["loss"].item())
        assert_close(out.seq_logp, ref["seq_logp"], **FP32_VALUES, name="seq_logp")
        for k in ("exploration", "imitation", "alignment"):
            assert abs(getattr(out, k).item() - ref[k].item()) <= 1e-5 * terms, k
        for g, x in zip(got, (h, w, bb)):
            if x is not None:
                assert g.dtype == x.dtype
        assert_grads_close(got, want)
    else:
        factor, floor = tol
        # PyTorch's own result in the same dtype, materialising the logits.
        hs, ws, bs = leaves(hidden, weight, b)
        same = reference_grao(hs, ws, targets, rewards, bias=bs, temperature=temp)
        same_g = grads(same["loss"], hs, ws, bs)
        for k in ("loss", "seq_logp", "exploration", "imitation", "alignment"):
            actual = out.loss if k == "loss" else getattr(out, k)
            assert_within_torch_error(actual, ref[k], same[k], factor=factor, floor=floor, name=k)
        for name, g, r, s in zip(("hidden", "weight", "bias"), got, want, same_g):
            if r is not None:
                assert_within_torch_error(g, r, s, factor=factor, floor=floor, name=f"d{name}")


@pytest.mark.parametrize("budget", [None, SMALL_BUDGET], ids=["default-budget", "small-budget"])
@pytest.mark.parametrize("device,backend", ON_DEVICE)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fused_linear_logprobs_matches_float64_reference(device, backend, case, budget):
    _, P, G, T, H, V, bias, temp = case
    hidden, weight, b, targets, _ = make_batch(P, G, T, H, V, bias, torch.float32, device=device)
    h, w, bb = leaves(hidden, weight, b)
    logp = fused_linear_logprobs(h, w, targets, bias=bb, temperature=temp, backend=backend, memory_budget=budget)
    upstream = torch.randn(targets.shape, device=device)
    got = grads((logp * upstream).sum(), h, w, bb)

    h64, w64, b64 = _reference_inputs(hidden, weight, b)
    ref = reference_logprobs(h64, w64, targets, bias=b64, temperature=temp)
    want = grads((ref * upstream.double()).sum(), h64, w64, b64)

    assert logp.dtype == torch.float32 and logp.shape == targets.shape
    assert (logp[targets == -100] == 0).all()
    assert_close(logp, ref, **FP32_VALUES, name="logp")
    assert_grads_close(got, want)


@pytest.mark.parametrize("budget", [None, SMALL_BUDGET], ids=["default-budget", "small-budget"])
@pytest.mark.parametrize("device,backend", ON_DEVICE)
@pytest.mark.parametrize("head", HEADS, ids=[c[0] for c in HEADS])
def test_entropy_logit_scale_and_softcap_match_float64_reference(device, backend, head, budget):
    """Values and gradients of log-probs and entropies (an entropy bonus trains) for every kind of head."""
    _, temp, scale, cap, bias = head
    V = 9001 if budget else 203  # 9001: the torch backend tiles the vocabulary within 1 MiB
    hidden, weight, b, targets, _ = make_batch(1, 2, 4, 16, V, bias, torch.float32, scale=3.0, device=device)
    kw = dict(temperature=temp, logit_scale=scale, softcap=cap)
    h, w, bb = leaves(hidden, weight, b)
    out = fused_linear_logprobs(
        h, w, targets, bias=bb, return_entropy=True, backend=backend, memory_budget=budget, **kw
    )
    up_logp = torch.randn(targets.shape, device=device)
    up_ent = torch.randn(targets.shape, device=device)
    got = grads((out.logp * up_logp).sum() + (out.entropy * up_ent).sum(), h, w, bb)

    h64, w64, b64 = _reference_inputs(hidden, weight, b)
    ref_logp, ref_ent = reference_logprobs(h64, w64, targets, bias=b64, return_entropy=True, **kw)
    want = grads((ref_logp * up_logp.double()).sum() + (ref_ent * up_ent.double()).sum(), h64, w64, b64)

    assert out.logp.dtype == out.entropy.dtype == torch.float32
    assert out.entropy.shape == targets.shape and (out.entropy[targets == -100] == 0).all()
    assert_close(out.logp, ref_logp, **FP32_VALUES, name="logp")
    assert_close(out.entropy, ref_ent, **FP32_VALUES, name="entropy")
    assert_grads_close(got, want)

    # The entropy alone trains too (no gradient flows into the log-probs).
    h2, w2, b2 = leaves(hidden, weight, b)
    ent_only = fused_linear_logprobs(h2, w2, targets, bias=b2, return_entropy=True, backend=backend, **kw).entropy
    got = grads((ent_only * up_ent).sum(), h2, w2, b2)
    h64, w64, b64 = _reference_inputs(hidden, weight, b)
    _, ref_ent = reference_logprobs(h64, w64, targets, bias=b64, return_entropy=True, **kw)
    assert_grads_close(got, grads((ref_ent * up_ent.double()).sum(), h64, w64, b64))


@pytest.mark.parametrize("with_entropy", [False, True], ids=["logp", "logp+entropy"])
@pytest.mark.parametrize("device,backend", ON_DEVICE)
@pytest.mark.parametrize("head", HEADS[1:3], ids=[c[0] for c in HEADS[1:3]])
def test_linear_logprob_loss_matches_float64_reference(device, backend, head, with_entropy):
    _, temp, scale, cap, bias = head
    hidden, weight, b, targets, _ = make_batch(2, 2, 5, 12, 151, bias, torch.float32, device=device)
    kw = dict(temperature=temp, logit_scale=scale, softcap=cap)
    coef = torch.randn(targets.shape, device=device)
    ent_coef = torch.randn(targets.shape, device=device) * 0.1 if with_entropy else None
    h, w, bb = leaves(hidden, weight, b)
    out = linear_logprob_loss(h, w, targets, coef, entropy_coef=ent_coef, bias=bb, backend=backend, **kw)
    got = grads(out.loss, h, w, bb)

    h64, w64, b64 = _reference_inputs(hidden, weight, b)
    ref = reference_linear_loss(h64, w64, targets, coef.double(), entropy_coef=ent_coef, bias=b64, **kw)
    ref_logp, ref_ent = reference_logprobs(h64, w64, targets, bias=b64, return_entropy=True, **kw)
    want = grads(ref, h64, w64, b64)

    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    assert abs(out.loss.item() - ref.item()) <= 1e-5 * (1 + abs(ref.item()))
    assert not out.logp.requires_grad and out.logp.shape == targets.shape
    assert_close(out.logp, ref_logp, **FP32_VALUES, name="logp")
    if with_entropy:
        assert not out.entropy.requires_grad
        assert_close(out.entropy, ref_ent, **FP32_VALUES, name="entropy")
    else:
        assert out.entropy is None
    assert_grads_close(got, want)


@pytest.mark.parametrize("device,backend", ON_DEVICE)
def test_logprobs_any_leading_shape_and_no_grad(device, backend):
    hidden, weight, _, targets, _ = make_batch(1, 2, 5, 12, 41, False, torch.float32, device=device)
    flat = fused_linear_logprobs(hidden.reshape(-1, 12), weight, targets.reshape(-1), backend=backend)
    shaped = fused_linear_logprobs(hidden, weight, targets, backend=backend)
    assert_close(flat.view(targets.shape), shaped, rtol=0, atol=1e-6, name="reshape")
    with torch.no_grad():
        out = grao_loss(hidden, weight, targets, torch.randn(1, 3, device=device), group_size=2, backend=backend)
    assert not out.loss.requires_grad and torch.isfinite(out.loss)


@pytest.mark.parametrize("device,backend", ON_DEVICE)
def test_ignored_positions_cost_nothing_and_leak_nothing(device, backend):
    """Ignored rows are skipped, not multiplied by zero: garbage there cannot reach the result."""
    hidden, weight, b, targets, rewards = make_batch(2, 2, 6, 16, 53, True, torch.float32, device=device)
    clean = grao_loss(hidden, weight, targets, rewards, group_size=2, bias=b, backend=backend)
    dirty_hidden = hidden.clone()
    dirty_hidden[targets == -100] = float("nan")
    h, w = leaves(dirty_hidden, weight)
    dirty = grao_loss(h, w, targets, rewards, group_size=2, bias=b, backend=backend)
    gh, gw = grads(dirty.loss, h, w)
    assert torch.isfinite(dirty.loss) and torch.isfinite(gw).all()
    assert (gh[targets == -100] == 0).all()
    assert abs(dirty.loss.item() - clean.loss.item()) <= 1e-6


@pytest.mark.parametrize("device,backend", ON_DEVICE)
def test_all_targets_ignored_gives_zero_loss_and_gradients(device, backend):
    hidden, weight, _, targets, rewards = make_batch(1, 2, 4, 8, 33, False, torch.float32, device=device)
    targets[:] = -100
    h, w = leaves(hidden, weight)
    out = grao_loss(h, w, targets, rewards, group_size=2, backend=backend)
    gh, gw = grads(out.loss, h, w)
    assert out.loss.item() == 0 and (out.seq_logp == 0).all()
    assert (gh == 0).all() and (gw == 0).all()
    ent = fused_linear_logprobs(hidden, weight, targets, return_entropy=True, backend=backend).entropy
    assert (ent == 0).all()


@pytest.mark.parametrize("device,backend", ON_DEVICE)
def test_module_matches_function(device, backend):
    hidden, weight, b, targets, rewards = make_batch(2, 2, 5, 8, 45, True, torch.float32, device=device)
    module = GRAOLoss(beta=0.3, lam=0.9, temperature=0.8, backend=backend, logit_scale=0.5, softcap=3.0)
    a = module(hidden, weight, targets, rewards, bias=b, group_size=2)
    f = grao_loss(
        hidden,
        weight,
        targets,
        rewards,
        group_size=2,
        bias=b,
        beta=0.3,
        lam=0.9,
        temperature=0.8,
        logit_scale=0.5,
        softcap=3.0,
        backend=backend,
    )
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
    out = grao_loss(hidden, weight, targets, rewards, group_size=3, beta=0.0, lam=0.0, backend="torch")
    # beta = lam = 0: only exploration is left, (1/G) sum_i A_i J(o_i) averaged over prompts
    adv = out.advantages
    j = out.seq_logp.view(2, 4)
    expected = (adv[:, :3] * j[:, :3]).sum(1).div(3).mean()
    assert abs(out.exploration.item() - expected.item()) < 1e-6
    assert out.imitation.item() == 0 and out.alignment.item() == 0
    full = grao_loss(hidden, weight, targets, rewards, group_size=3, backend="torch")
    total = full.exploration + full.imitation + full.alignment
    assert abs(full.loss.item() + total.item()) <= 1e-6 * (1 + abs(total.item()))


@pytest.mark.parametrize("device,backend", ON_DEVICE)
def test_upstream_gradient_scales_the_loss_gradients(device, backend):
    hidden, weight, b, targets, rewards = make_batch(2, 2, 5, 8, 45, True, torch.float32, device=device)
    h1, w1, h2, w2 = leaves(hidden, weight, hidden, weight)
    g1 = grads(grao_loss(h1, w1, targets, rewards, group_size=2, bias=b, backend=backend).loss, h1, w1)
    g2 = grads(-2.5 * grao_loss(h2, w2, targets, rewards, group_size=2, bias=b, backend=backend).loss, h2, w2)
    for a, c in zip(g1, g2):
        assert_close(c, -2.5 * a, rtol=1e-6, atol=1e-9, name="scaled gradient")
    with pytest.raises(RuntimeError, match="backward through the same graph twice"):
        loss = grao_loss(h1, w1, targets, rewards, group_size=2, bias=b, backend=backend).loss
        loss.backward(retain_graph=True)
        loss.backward()


@pytest.mark.parametrize("device,backend", ON_DEVICE)
def test_autocast_does_not_change_the_result_and_inputs_are_used_as_given(device, backend):
    """The kernels compute from the given values (bfloat16 hidden, float32 weight), with or without an
    enclosing autocast: torch and native in float32, to float32 accuracy against the float64 oracle;
    triton in the activations' dtype, i.e. against the oracle of the weight rounded to bfloat16, with
    gradients through a bfloat16 logits gradient."""
    hidden, weight, b, targets, _ = make_batch(1, 2, 5, 16, 101, True, torch.float32, device=device)
    hidden = hidden.to(torch.bfloat16)
    h, w, bb = leaves(hidden, weight, b)
    plain = fused_linear_logprobs(h, w, targets, bias=bb, return_entropy=True, backend=backend)
    got = grads(plain.logp.sum() + plain.entropy.sum(), h, w, bb)
    with torch.autocast(device, dtype=torch.bfloat16):
        cast = fused_linear_logprobs(hidden, weight, targets, bias=b, return_entropy=True, backend=backend)
    assert torch.equal(cast.logp, plain.logp) and torch.equal(cast.entropy, plain.entropy)

    in_activation_dtype = backend == "triton"
    used_weight = weight.to(hidden.dtype) if in_activation_dtype else weight
    h64, w64, b64 = leaves(hidden, used_weight, b, dtype=torch.float64)
    ref_logp, ref_ent = reference_logprobs(h64, w64, targets, bias=b64, return_entropy=True)
    assert_close(plain.logp, ref_logp, **FP32_VALUES, name="logp")
    assert_close(plain.entropy, ref_ent, **FP32_VALUES, name="entropy")
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    want = grads(ref_logp.sum() + ref_ent.sum(), h64, w64, b64)
    if in_activation_dtype:
        for name, g, ref in zip(("weight", "bias"), got[1:], want[1:]):
            assert rel_l2(g, ref) < 2e-2, f"{name}: relative L2 error {rel_l2(g, ref):.2e} (bfloat16 logits gradient)"
    else:
        assert_grads_close(got[1:], want[1:], names=("weight", "bias"))


@pytest.mark.parametrize("device,backend", ON_DEVICE)
def test_losses_and_gradients_under_autocast_equal_those_without(device, backend):
    """Forward and backward inside an enclosing autocast give bitwise the results without it: every
    backend computes from the given (float32) values whatever autocast says."""
    hidden, weight, b, targets, rewards = make_batch(2, 2, 5, 16, 101, True, torch.float32, device=device)

    def run():
        h, w, bb = leaves(hidden, weight, b)
        out = grao_loss(h, w, targets, rewards, group_size=2, bias=bb, softcap=3.0, backend=backend)
        lp = fused_linear_logprobs(h, w, targets, bias=bb, logit_scale=0.5, return_entropy=True, backend=backend)
        loss = out.loss + (lp.logp.sum() + 0.1 * lp.entropy.sum()) / targets.numel()
        return [loss.detach(), *grads(loss, h, w, bb)]

    plain = run()
    with torch.autocast(device, dtype=torch.bfloat16):
        cast = run()
    for name, x, y in zip(("loss", "dhidden", "dweight", "dbias"), cast, plain):
        assert x.dtype == y.dtype == torch.float32, name
        assert torch.equal(x, y), name

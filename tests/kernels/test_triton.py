"""Triton backend against a float64 oracle, under the interpreter on CPU (or on a GPU when there is one).

``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` when there is no CUDA device,
before anything imports triton. Every sweep ("chunked", "fused", "epilogue") is tested
through the backend contract (``forward``/``grad``), most with small pinned
tiles and several row groups and vocabulary chunks so tiny shapes span many
tiles; the bug regressions use the default configs.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import weakref

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from utils import assert_close, assert_within_torch_error, grads, leaves, rel_l2

from grao_kernels import fused_linear_logprobs, grao_loss, linear_logprob_loss
from grao_kernels.backends import Head, Stats, resolve, unavailable_reason
from grao_kernels.settings import settings
from grao_kernels.testing import reference_grao, reference_linear_loss, reference_logprobs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    unavailable_reason("triton", torch.device(DEVICE)) is not None,
    reason=f"triton backend unavailable: {unavailable_reason('triton', torch.device(DEVICE))}",
)
MODES = ["chunked", "fused", "epilogue"]
BUDGET = 2**30

# (dtype, None for fixed float32 bounds | (factor, floor) against PyTorch's own error in that dtype)
DTYPES = [
    pytest.param(torch.float32, None, id="fp32"),
    pytest.param(torch.bfloat16, (2.0, 1e-3), id="bf16"),
    pytest.param(torch.float16, (2.0, 1e-4), id="fp16"),
]

# (name, N, H, V, bias, head, ignored fraction, entropy)
CASES = [
    ("plain", 37, 21, 101, False, Head(), 0.3, False),
    (
        "bias-scale-softcap-temp-entropy",
        19,
        45,
        70,
        True,
        Head(temperature=0.7, logit_scale=1.7, softcap=2.5),
        0.5,
        True,
    ),
]


@pytest.fixture
def tb(monkeypatch):
    """The triton backend with small tiles, several row groups and several dz chunks (settings restored after)."""
    from grao_kernels.backends import triton_backend
    from grao_kernels.triton_kernels import chunked, epilogue, fused

    monkeypatch.setattr(settings, "triton_config", "BLOCK_N=16,BLOCK_V=32,BLOCK_H=16,GROUP_N=2")
    monkeypatch.setattr(settings, "triton_mode", "auto")
    monkeypatch.setattr(chunked, "rows_per_group", lambda sizes, budget, grad, *needs: 16)
    monkeypatch.setattr(epilogue, "rows_per_group", lambda sizes, budget, grad, entropy, *needs_forward: 16)
    monkeypatch.setattr(fused, "rows_per_group", lambda sizes, budget, grad, entropy, *needs_forward: (16, 64))
    return triton_backend


def _inputs(N, H, V, bias, dtype, ignored, *, scale=1.0):
    hidden = (torch.randn(N, H) * scale).to(dtype).to(DEVICE)
    weight = (torch.randn(V, H) / H**0.5).to(dtype).to(DEVICE)
    b = (torch.randn(V) * 0.5).to(dtype).to(DEVICE) if bias else None
    targets = torch.randint(0, V, (N,))
    targets[torch.rand(N) < ignored] = -100
    return hidden, weight, b, targets.to(DEVICE)


def _reference(hidden, weight, bias, targets, head, coef=None, ent_coef=None, dtype=torch.float64):
    """(Stats, dh, dw, db) through materialised logits: products in ``dtype``, softmax in at least float32.

    float64 is the oracle; the inputs' own dtype is PyTorch's same-dtype error.
    """
    leaves = [None if x is None else x.detach().to(dtype).requires_grad_(True) for x in (hidden, weight, bias)]
    h, w, b = leaves
    raw = h @ w.T + (0 if b is None else b)
    if raw.dtype != torch.float64:
        raw = raw.float()
    u = head.logit_scale * raw
    if head.softcap is not None:
        u = head.softcap * torch.tanh(u / head.softcap)
    z = u / head.temperature
    valid = targets != -100
    lse = z.logsumexp(-1)
    logp = z.gather(1, torch.where(valid, targets, 0)[:, None])[:, 0] - lse
    p = z.softmax(-1)
    ent = lse - (p * torch.where(p > 0, z, 0)).sum(-1)  # a masked entry (z = -inf) has p = 0
    logp, lse, ent = (torch.where(valid, x, 0) for x in (logp, lse, ent))
    if coef is None:
        return Stats(logp.detach(), lse.detach(), ent.detach()), None, None, None
    loss = (coef.to(logp.dtype) * logp).sum()
    if ent_coef is not None:
        loss = loss + (ent_coef.to(ent.dtype) * ent).sum()
    live = [x for x in leaves if x is not None]
    grads = list(torch.autograd.grad(loss, live)) + [None]
    return Stats(logp.detach(), lse.detach(), ent.detach()), grads[0], grads[1], grads[2] if b is not None else None


def _check_stats(got: Stats, want: Stats, entropy: bool, tol=2e-5):
    # The sweeps compute in float32 from the same rounded inputs: only the
    # float32 accumulation order separates them from the float64 oracle.
    assert_close(got.logp, want.logp, rtol=1e-5, atol=tol, name="logp")
    assert_close(got.lse, want.lse, rtol=1e-5, atol=tol, name="lse")
    if entropy:
        assert_close(got.entropy, want.entropy, rtol=1e-5, atol=tol, name="entropy")
    else:
        assert got.entropy is None


def _check_grads(got, want, same, tol):
    for name, g, w, s in zip(("dhidden", "dweight", "dbias"), got, want, same):
        if w is None:
            assert g is None, f"{name} was not asked for"
            continue
        assert torch.isfinite(g).all(), f"{name} has non-finite entries"
        if tol is None:
            assert rel_l2(g, w) <= 1e-5, f"{name}: relative L2 {rel_l2(g, w):.2e}"
        else:
            assert_within_torch_error(g, w, s, factor=tol[0], floor=tol[1], name=name)


# ----------------------------------------------------------------------------
# the two sweeps against the oracle


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_sweeps_match_float64(tb, mode, dtype, tol, case):
    settings.triton_mode = mode
    _sweep_matches_float64(tb, dtype, tol, case)


# The cases with H rounded up to a multiple of 8, so TMA descriptors can address hidden's and weight's rows.
TMA_CASES = [(name, N, -(-H // 8) * 8, *rest) for name, N, H, *rest in CASES]


@pytest.mark.parametrize("dtype,tol", DTYPES[1:])
@pytest.mark.parametrize("case", TMA_CASES, ids=[c[0] for c in TMA_CASES])
def test_epilogue_sweep_with_the_tma_gemm1_matches_float64(tb, dtype, tol, case, monkeypatch):
    """The persistent TMA GEMM1 (``settings.triton_gemm1 = "tma"``; the interpreter runs its descriptors and its
    tile loop, with 2 programs so each walks several tiles) gives the sweep's outputs and gradients."""
    from grao_kernels.triton_kernels import epilogue

    settings.triton_mode = "epilogue"
    monkeypatch.setattr(settings, "triton_gemm1", "tma")
    launched = []
    real = epilogue.launch
    monkeypatch.setattr(epilogue, "launch", lambda kernel, *a, **k: launched.append(kernel) or real(kernel, *a, **k))
    _sweep_matches_float64(tb, dtype, tol, case)
    assert epilogue.lse_partials_tma_kernel in launched


def test_gemm1_choice_follows_the_setting_and_the_operands(monkeypatch):
    from grao_kernels.triton_kernels.common import tma_gemm1

    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    monkeypatch.setattr(settings, "triton_gemm1", "auto")
    assert not tma_gemm1(cpu, bf16, bf16, 64)  # "auto" takes it on Hopper GPUs only, never under the interpreter
    monkeypatch.setattr(settings, "triton_gemm1", "tma")
    assert tma_gemm1(cpu, bf16, bf16, 64) == (os.environ.get("TRITON_INTERPRET") == "1")
    assert not tma_gemm1(cpu, bf16, torch.float32, 64)  # a float32 master weight: pointer loads cast its tiles
    assert not tma_gemm1(cpu, bf16, bf16, 60)  # 120-byte rows: not 16-byte aligned
    assert not tma_gemm1(cpu, torch.float32, torch.float32, 64)
    monkeypatch.setattr(settings, "triton_gemm1", "loads")
    assert not tma_gemm1(cpu, bf16, bf16, 64)
    monkeypatch.setattr(settings, "triton_gemm1", "wgmma")
    with pytest.raises(ValueError, match="triton_gemm1"):
        tma_gemm1(cpu, bf16, bf16, 64)


def test_tma_gemm1_takes_only_operands_and_blocks_tma_can_address(monkeypatch):
    """Per launch: 16-byte aligned base pointers and rows, and (on a GPU) pinned blocks within TMA's 256-element box;
    else the pointer-load GEMM1 runs."""
    from grao_kernels.triton_kernels import epilogue

    x = torch.empty(32, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(epilogue, "interpreting", lambda: False)
    monkeypatch.setattr(settings, "triton_config", "BLOCK_N=64,BLOCK_V=256,BLOCK_H=64")
    assert epilogue._tma_ready(x, x[16:])
    assert not epilogue._tma_ready(x, x[:, 1:])  # base 2 bytes past an aligned one
    assert not epilogue._tma_ready(x.t())  # columns not contiguous
    monkeypatch.setattr(settings, "triton_config", "BLOCK_N=64,BLOCK_V=512,BLOCK_H=64")
    assert not epilogue._tma_ready(x)


def _sweep_matches_float64(tb, dtype, tol, case):
    _, N, H, V, bias, head, ignored, entropy = case
    hidden, weight, b, targets = _inputs(N, H, V, bias, dtype, ignored)
    coef = torch.randn(N, device=DEVICE)
    ent_coef = torch.randn(N, device=DEVICE) if entropy else None

    stats = tb.forward(hidden, weight, b, targets, head, -100, entropy=entropy, budget=BUDGET)
    ref = _reference(hidden, weight, b, targets, head, coef, ent_coef)
    same = _reference(hidden, weight, b, targets, head, coef, ent_coef, dtype=dtype)
    _check_stats(stats, ref[0], entropy)

    g_stats, *grads = tb.grad(
        hidden, weight, b, targets, head, -100, coef=coef, ent_coef=ent_coef, needs=(True, True, True), budget=BUDGET
    )
    _check_stats(g_stats, ref[0], entropy)
    assert grads[0].dtype == dtype and grads[0].shape == hidden.shape
    ignored_rows = targets == -100
    assert (grads[0][ignored_rows] == 0).all() and (g_stats.logp[ignored_rows] == 0).all()
    _check_grads(grads, ref[1:], same[1:], tol)

    # Given the forward's statistics the sweep skips recomputing them and gives the same gradients.
    again = tb.grad(hidden, weight, b, targets, head, -100, coef=coef, ent_coef=ent_coef, stats=stats, budget=BUDGET)
    for x, y in zip(again[1:], grads):
        if y is not None:
            assert_close(x.float(), y.float(), rtol=1e-5, atol=1e-6, name="with the forward's statistics")


@pytest.mark.parametrize("mode", MODES)
def test_needs_skip_gradients_not_asked_for(tb, mode, monkeypatch):
    """A frozen weight costs no dW product; only the gradients asked for are returned."""
    from grao_kernels.triton_kernels import chunked, fused

    settings.triton_mode = mode
    hidden, weight, b, targets = _inputs(21, 24, 90, True, torch.float32, 0.0)
    coef = torch.randn(21, device=DEVICE)
    ref = _reference(hidden, weight, b, targets, Head(), coef)
    products = []
    module = fused if mode == "fused" else chunked  # the epilogue sweep's products are chunked's
    real = module.mm_into
    monkeypatch.setattr(
        module, "mm_into", lambda out, a, b_, **kw: products.append(out.shape) or real(out, a, b_, **kw)
    )
    for needs in [(True, False, False), (False, True, False), (False, False, True)]:
        products.clear()
        _, dh, dw, db = tb.grad(hidden, weight, b, targets, Head(), -100, coef=coef, needs=needs, budget=BUDGET)
        for need, got, want in zip(needs, (dh, dw, db), ref[1:]):
            if need:
                assert rel_l2(got, want) <= 1e-5
            else:
                assert got is None
        # Row groups of 16 and 5 rows (see tb): the dW products write (a chunk of) the weight's 90 x 24.
        dw_products = [s for s in products if s[1] == 24 and s[0] not in (16, 5)]
        assert bool(dw_products) == needs[1], (needs, products)


@pytest.mark.parametrize("mode", MODES)
def test_float16_gradient_survives_tiny_coefficients(tb, mode):
    """float16 dz with coefficients of 1e-5, as a mean-reduced loss gives them (c p falls below float16's
    smallest subnormal, 6e-8, for p < 6e-3): the gradients equal 1e-5 times those with coefficients of 1,
    because dz is scaled before rounding and the GEMMs unscale. Unscaled, the float32 dbias was off by 1.7e-2
    (relative L2) and the float16 dweight by 1.6e-2; dhidden and dweight, float16 at magnitudes ~1e-5, keep
    only their own subnormal rounding (the bounds below)."""
    settings.triton_mode = mode
    hidden, weight, b, targets = _inputs(37, 21, 101, True, torch.float16, 0.3)
    coef, ent_coef = torch.randn(37, device=DEVICE), torch.randn(37, device=DEVICE) * 0.1
    _, *big = tb.grad(hidden, weight, b, targets, Head(), -100, coef=coef, ent_coef=ent_coef, budget=BUDGET)
    _, *tiny = tb.grad(
        hidden, weight, b, targets, Head(), -100, coef=coef * 1e-5, ent_coef=ent_coef * 1e-5, budget=BUDGET
    )
    for name, g_big, g_tiny, bound in zip(("dhidden", "dweight", "dbias"), big, tiny, (1.2e-2, 5e-3, 1e-3)):
        err = rel_l2(g_tiny.double(), g_big.double() * 1e-5)
        assert err <= bound, f"{name}: relative L2 {err:.2e}"


@pytest.mark.parametrize("mode,roundings", [("epilogue", 2), ("chunked", 1)])
@pytest.mark.parametrize("dtype,u", [(torch.bfloat16, 2**-8), (torch.float16, 2**-11)], ids=["bf16", "fp16"])
def test_dz_error_is_within_the_stated_bound(tb, mode, roundings, dtype, u):
    """The epilogue sweep stores P = exp(z - tile max) rounded to hidden's dtype (unit roundoff u) and rounds dz
    to it again: each dz entry is off by at most 2u |dz| (plus, in fp16, |c| 2**-25 / T below fp16's normals), so
    dbias, a float32 sum of dz over the rows, by at most 2u sum_rows |dz| (epilogue.py's bound). The chunked
    sweep, from float32 logits, rounds dz once: u. dz from float64 logits of the same rounded inputs."""
    settings.triton_mode = mode
    N, H, V, T = 37, 21, 301, 0.8
    hidden, weight, b, targets = _inputs(N, H, V, True, dtype, 0.25, scale=2.0)
    coef = torch.randn(N, device=DEVICE)
    _, _, _, db = tb.grad(hidden, weight, b, targets, Head(temperature=T), -100, coef=coef, budget=BUDGET)
    raw = (hidden.double() @ weight.double().T + b.double()).requires_grad_(True)
    valid = targets != -100
    logp = (raw / T).log_softmax(-1).gather(1, targets.clamp(min=0)[:, None])[:, 0]
    (dz,) = torch.autograd.grad((torch.where(valid, logp, 0) * coef.double()).sum(), raw)
    sum_abs = dz.abs().sum(0)
    subnormal = float(coef[valid].abs().sum()) * 2**-25 / T if dtype == torch.float16 and mode == "epilogue" else 0
    bound = roundings * u * sum_abs + subnormal + 1e-5 * sum_abs + 1e-7  # + float32 GEMM1 and summation
    err = (db.double() - dz.sum(0)).abs()
    assert (err <= bound).all(), f"dbias error up to {(err / bound).max():.2f}x the bound"


@pytest.mark.parametrize("mode", MODES)
def test_ignored_rows_are_never_read(tb, mode):
    settings.triton_mode = mode
    hidden, weight, _, targets = _inputs(40, 20, 50, False, torch.float32, 0.0)
    targets[::3] = -100
    dirty = hidden.clone()
    dirty[targets == -100] = float("nan")
    coef = torch.randn(40, device=DEVICE)
    clean = tb.grad(hidden, weight, None, targets, Head(), -100, coef=coef, budget=BUDGET)
    got = tb.grad(dirty, weight, None, targets, Head(), -100, coef=coef, budget=BUDGET)
    assert torch.equal(got[0].logp, clean[0].logp)
    for x, y in zip(got[1:3], clean[1:3]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("mode", MODES)
def test_all_ignored_and_empty(tb, mode):
    settings.triton_mode = mode
    hidden, weight, b, targets = _inputs(9, 16, 40, True, torch.bfloat16, 1.0)
    stats, dh, dw, db = tb.grad(hidden, weight, b, targets, Head(), -100, coef=torch.ones(9), budget=BUDGET)
    assert (stats.logp == 0).all() and (dh == 0).all() and (dw == 0).all() and (db == 0).all()
    empty = torch.empty(0, 16, dtype=torch.bfloat16, device=DEVICE)
    none = torch.empty(0, dtype=torch.int64, device=DEVICE)
    stats = tb.forward(empty, weight, b, none, Head(), -100, entropy=True, budget=BUDGET)
    assert stats.logp.shape == (0,) and stats.lse.shape == (0,) and stats.entropy.shape == (0,)


@pytest.mark.parametrize("mode", MODES)
def test_noncontiguous_inputs(tb, mode):
    settings.triton_mode = mode
    hidden, weight, _, targets = _inputs(17, 24, 45, False, torch.float32, 0.2)
    coef = torch.randn(17, device=DEVICE)
    want = tb.grad(hidden, weight, None, targets, Head(), -100, coef=coef, budget=BUDGET)
    strided = torch.cat([hidden, hidden], 1)[:, ::2]
    strided.copy_(hidden)
    got = tb.grad(strided, weight.T.contiguous().T, None, targets, Head(), -100, coef=coef, budget=BUDGET)
    for x, y in zip(got[1:3], want[1:3]):
        assert_close(x, y, rtol=1e-6, atol=1e-6, name="non-contiguous")


@pytest.mark.parametrize("mode", MODES)
def test_bf16_activations_with_fp32_weight_compute_in_bf16(tb, mode):
    """A float32 master weight under bf16 activations: products in bf16 (the weight cast), fp32 accumulation."""
    settings.triton_mode = mode
    hidden, weight, b, targets = _inputs(23, 32, 80, False, torch.float32, 0.2)
    hidden = hidden.bfloat16()
    coef = torch.randn(23, device=DEVICE)
    stats, dh, dw, _ = tb.grad(hidden, weight, None, targets, Head(), -100, coef=coef, budget=BUDGET)
    as_bf16 = tb.grad(hidden, weight.bfloat16(), None, targets, Head(), -100, coef=coef, budget=BUDGET)
    # The same products as with a bf16 weight (not a float32 dot of the bf16 activations).
    assert_close(stats.logp, as_bf16[0].logp, rtol=0, atol=1e-6, name="logp against a bf16 weight")
    assert dh.dtype == torch.bfloat16 and dw.shape == weight.shape
    assert_close(dw.float(), as_bf16[2].float(), rtol=2**-7, atol=1e-6, name="dweight against a bf16 weight")
    ref = _reference(hidden, weight, None, targets, Head(), coef)
    same = _reference(hidden, weight.bfloat16(), None, targets, Head(), coef, dtype=torch.bfloat16)
    _check_grads((dh, dw, None), ref[1:], same[1:], (2.0, 1e-3))


# ----------------------------------------------------------------------------
# regressions with the default configs (no pinned tiles)


@pytest.mark.parametrize("mode", MODES)
def test_target_in_a_partial_tile_default_configs(mode, monkeypatch):
    """V=600 leaves the default (1024-wide under the interpreter) vocabulary tile partly past V (or past the
    end of a vocabulary split); targets near the end of the vocabulary must be picked from the valid columns."""
    monkeypatch.setattr(settings, "triton_mode", mode)
    hidden, weight, _, _ = _inputs(4, 16, 600, False, torch.float32, 0.0)
    targets = torch.tensor([599, 512, 7, 300], device=DEVICE)
    logp = fused_linear_logprobs(hidden, weight, targets, backend="triton")
    ref = _reference(hidden, weight, None, targets, Head())[0]
    assert_close(logp, ref.logp, rtol=1e-5, atol=2e-5, name="logp")


@pytest.mark.parametrize("mode", MODES)
def test_masked_first_tile_is_not_nan_default_configs(mode, monkeypatch):
    """A -inf bias over the first 1024 entries: a whole tile of -inf logits contributes probability 0, not NaN."""
    from grao_kernels.backends import triton_backend as tb

    monkeypatch.setattr(settings, "triton_mode", mode)
    hidden, weight, bias, targets = _inputs(6, 16, 3000, True, torch.float32, 0.0)
    bias[:1024] = float("-inf")
    targets = torch.randint(1024, 3000, (6,), device=DEVICE)
    targets[0] = -100
    coef = torch.randn(6, device=DEVICE)
    ent_coef = torch.randn(6, device=DEVICE)
    stats, *grads = tb.grad(hidden, weight, bias, targets, Head(), -100, coef=coef, ent_coef=ent_coef, budget=BUDGET)
    ref = _reference(hidden, weight, bias, targets, Head(), coef, ent_coef)
    _check_stats(stats, ref[0], True)
    _check_grads(grads, ref[1:], ref[1:], None)
    assert (grads[1][:1024] == 0).all()
    logp = fused_linear_logprobs(hidden, weight, targets, bias=bias, backend="triton")
    assert_close(logp, ref[0].logp, rtol=1e-5, atol=2e-5, name="logp through fused_linear_logprobs")


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_vocabulary_over_64k_default_configs(mode, monkeypatch):
    """V = 65536 + 1019 (past 16-bit column ids, not a multiple of any tile): statistics with the entropy and the
    three gradients with bias, temperature and entropy coefficients against float64, ignored rows included."""
    from grao_kernels.backends import triton_backend as tb

    monkeypatch.setattr(settings, "triton_mode", mode)
    N, H, V = 7, 8, 65536 + 1019
    hidden, weight, bias, targets = _inputs(N, H, V, True, torch.float32, 0.3, scale=2.0)
    targets[0], targets[1] = V - 1, 65536  # targets in the last, partial tile and just past 2**16
    head = Head(temperature=1.3)
    coef, ent_coef = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    stats, *grads = tb.grad(hidden, weight, bias, targets, head, -100, coef=coef, ent_coef=ent_coef, budget=BUDGET)
    ref = _reference(hidden, weight, bias, targets, head, coef, ent_coef)
    _check_stats(stats, ref[0], True)
    _check_grads(grads, ref[1:], ref[1:], None)


_OUT_OF_VOCAB = """
import torch
from grao_kernels import fused_linear_logprobs
from grao_kernels.testing import reference_logprobs
from grao_kernels.settings import settings

settings.triton_mode = {mode!r}
torch.manual_seed(0)
V = 500
hidden, weight, bias = torch.randn(6, 16), torch.randn(V, 16) / 4, torch.randn(V)
targets = torch.tensor([3, 10**6, -7, 499, -100, 2**40])
h = hidden.clone().requires_grad_(True)
logp = fused_linear_logprobs(h, weight, targets, bias=bias, backend="triton", validate=False)
logp.nan_to_num(0.0).sum().backward()
bad = torch.tensor([False, True, True, False, False, True])
assert logp[bad].isnan().all(), logp
assert logp[4] == 0  # ignore_index
good = ~bad & (targets != -100)
ref = reference_logprobs(hidden.double(), weight.double(), targets.clamp(0, V - 1), bias=bias.double())
assert torch.allclose(logp[good].double(), ref[good], rtol=1e-5, atol=2e-5), (logp, ref)
assert torch.isfinite(h.grad).all()
print("RETURNED")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the interpreter in a subprocess")
@pytest.mark.parametrize("mode", MODES)
def test_target_outside_the_vocabulary_reads_nothing_and_gives_nan(mode):
    """validate=False with targets outside [0, V) (not ignore_index): logp is NaN at exactly those rows, the others
    are right and the backward returns. The kernels never load a target's logit or bias outside their tensors (a
    subprocess, because an unmasked load there is a segmentation fault under the interpreter)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    res = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", _OUT_OF_VOCAB.format(mode=mode)],
        env=env, cwd=root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0 and "RETURNED" in res.stdout, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])


class _CudaLooking(torch.Tensor):
    """A CPU tensor that claims to be on CUDA, to reach mm_into's GPU branch without a GPU."""

    is_cuda = True


def _bf16_operands():
    return torch.randn(4, 8).bfloat16(), torch.randn(8, 5).bfloat16()


def test_fp32_output_gemm_never_upcasts_silently(monkeypatch):
    """A failing float32-output product raises; it is never retried as an upcast float32 GEMM."""
    from grao_kernels.triton_kernels import common

    a, b = _bf16_operands()
    acc = torch.zeros(4, 5).as_subclass(_CudaLooking)

    def fail(*args, **kwargs):
        raise RuntimeError("no fp32-output GEMM for these operands")

    monkeypatch.setattr(torch, "addmm", fail)
    monkeypatch.setattr(torch, "mm", fail)
    for addmm_fp32_c in (True, False):  # torch >= 2.11, and 2.8-2.10
        monkeypatch.setattr(common, "_OUT_DTYPE_GEMM", True)
        monkeypatch.setattr(common, "_ADDMM_FP32_C", addmm_fp32_c)
        with pytest.raises(RuntimeError, match="no fp32-output GEMM"):
            common.mm_into(acc, a, b, accumulate=True)
        with pytest.raises(RuntimeError, match="no fp32-output GEMM"):
            common.mm_into(acc, a, b)


def _cuda_gemms_of(monkeypatch, version):
    """torch.mm / torch.addmm with CUDA's out_dtype rules of torch ``version`` on CPU tensors; returns the calls.

    torch 2.8 and 2.9 reject a float32 C with bf16 operands in ``addmm(out_dtype=float32)``; 2.11 takes it.
    """
    real_mm, calls = torch.mm, []
    plain = lambda t: t.as_subclass(torch.Tensor)  # noqa: E731

    def mm(a, b, out_dtype=None, out=None):
        calls.append(("mm", out_dtype))
        assert out_dtype == torch.float32 and a.dtype == b.dtype == torch.bfloat16
        prod = plain(a).float() @ plain(b).float()  # exact float32 products, float32 sums
        return prod if out is None else plain(out).copy_(prod)

    def addmm(c, a, b, out_dtype=None, out=None, alpha=1.0):
        calls.append(("addmm", c.dtype))
        if version < (2, 10) and c.dtype != a.dtype:
            raise RuntimeError(f"self and mat2 must have the same dtype, but got {c.dtype} and {a.dtype}")
        return plain(out).copy_(plain(c) + alpha * (plain(a).float() @ plain(b).float()))

    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(torch, "addmm", addmm)
    return real_mm, calls


@pytest.mark.parametrize("version", [(2, 9), (2, 11)], ids=["torch2.9", "torch2.11"])
def test_fp32_accumulation_uses_a_gemm_this_torch_has(monkeypatch, version):
    """dW/dhidden accumulate bf16 products into float32 on every torch >= 2.8: addmm with a float32 C
    only where torch takes it, else mm(out_dtype=float32) and an add, in bounded row slices."""
    from grao_kernels.triton_kernels import common

    a, b = torch.randn(7, 8).bfloat16(), torch.randn(8, 5).bfloat16()
    start = torch.randn(7, 5)
    acc = start.clone().as_subclass(_CudaLooking)
    monkeypatch.setattr(common, "_OUT_DTYPE_GEMM", True)
    monkeypatch.setattr(common, "_ADDMM_FP32_C", version >= (2, 11))
    monkeypatch.setattr(common, "SLICE_BYTES", 2 * 5 * 4)  # two rows of float32 per slice
    real_mm, calls = _cuda_gemms_of(monkeypatch, version)
    common.mm_into(acc, a, b, accumulate=True)
    want = start + real_mm(a.float(), b.float())
    assert_close(acc.as_subclass(torch.Tensor), want, rtol=1e-6, atol=1e-6, name="accumulated")
    if version >= (2, 11):
        assert calls == [("addmm", torch.float32)]
    else:
        assert calls == [("mm", torch.float32)] * 4  # 7 rows in slices of 2


@pytest.mark.parametrize("version", [(2, 9), (2, 11)], ids=["torch2.9", "torch2.11"])
def test_fp32_output_gemm_applies_alpha_on_every_path(monkeypatch, version):
    """mm_into's alpha (the inverse of float16's dz scale) multiplies the product, written or accumulated."""
    from grao_kernels.triton_kernels import common

    a, b = torch.randn(7, 8).bfloat16(), torch.randn(8, 5).bfloat16()
    start = torch.randn(7, 5)
    monkeypatch.setattr(common, "_OUT_DTYPE_GEMM", True)
    monkeypatch.setattr(common, "_ADDMM_FP32_C", version >= (2, 11))
    monkeypatch.setattr(common, "SLICE_BYTES", 2 * 5 * 4)
    real_mm, _ = _cuda_gemms_of(monkeypatch, version)
    prod = real_mm(a.float(), b.float())
    for accumulate, want in ((True, start + prod / 64), (False, prod / 64)):
        acc = start.clone().as_subclass(_CudaLooking)
        common.mm_into(acc, a, b, accumulate=accumulate, alpha=1 / 64)
        assert_close(acc.as_subclass(torch.Tensor), want, rtol=1e-6, atol=1e-6, name=f"accumulate={accumulate}")


def test_fp32_output_gemm_on_old_torch_warns_and_rounds(monkeypatch):
    from grao_kernels.triton_kernels import common

    a, b = _bf16_operands()
    acc = torch.ones(4, 5).as_subclass(_CudaLooking)
    monkeypatch.setattr(common, "_OUT_DTYPE_GEMM", False)
    monkeypatch.setattr(common, "_warned_rounded", set())
    with pytest.warns(RuntimeWarning, match="torch >= 2.8"):
        common.mm_into(acc, a, b, accumulate=True)
    assert torch.equal(acc.as_subclass(torch.Tensor), 1 + torch.mm(a, b).float())


# ----------------------------------------------------------------------------
# mode selection and settings


def test_auto_picks_the_sweep_by_budget(monkeypatch):
    from grao_kernels.backends import triton_backend as tb
    from grao_kernels.triton_kernels import chunked

    monkeypatch.setattr(settings, "triton_mode", "auto")
    hidden, weight, _, targets = _inputs(600, 16, 1000, False, torch.bfloat16, 0.0)
    prob = tb._prepare(hidden, weight, None, targets, Head(), -100)
    # 600 rows of 4 KB of float32 logits: 64 MiB holds them all, 1 MiB fewer than MIN_ROWS.
    assert tb.choose_mode(prob, 64 * 2**20, grad=True, entropy=False) == (
        "chunked",
        chunked.rows_per_group(prob.sizes(), 64 * 2**20, True),
    )
    assert chunked.rows_per_group(prob.sizes(), 2**20, True) < chunked.MIN_ROWS
    mode, (rows, chunk) = tb.choose_mode(prob, 2**20, grad=True, entropy=False)
    assert mode == "fused" and rows >= 16 and chunk <= 1000
    settings.triton_mode = "chunked"
    assert tb.choose_mode(prob, 2**20, grad=True, entropy=False)[0] == "chunked"
    settings.triton_mode = "fused"
    assert tb.choose_mode(prob, 64 * 2**20, grad=True, entropy=False)[0] == "fused"
    settings.triton_mode = "sideways"
    with pytest.raises(ValueError, match="triton_mode"):
        tb.choose_mode(prob, 2**20, grad=True, entropy=False)
    settings.triton_mode = "auto"
    with pytest.raises(ValueError, match=r"memory_budget of 65536 bytes .* it needs at least \d+ bytes"):
        tb.choose_mode(prob, 2**16, grad=True, entropy=False)


def test_fused_sweep_fits_its_workspace_in_the_budget():
    """The dz chunk narrows and the rows split into groups until the whole workspace fits 90% of the budget
    (with several groups each dweight chunk sums over every row: no V x H float32 accumulator, which alone
    would be 12.8 MB here); with a large budget one group of every row and the widest dz chunk."""
    from grao_kernels.backends import triton_backend as tb
    from grao_kernels.triton_kernels import fused

    hidden, weight, _, targets = _inputs(4096, 64, 50000, False, torch.bfloat16, 0.5)
    sizes = tb._prepare(hidden, weight, None, targets, Head(), -100).sizes()
    for budget, one_group in ((2**20, False), (16 * 2**20, True), (2**30, True)):
        rows, chunk = fused.rows_per_group(sizes, budget, True, True)
        ws = fused.workspace(sizes, rows, chunk, grad=True, entropy=True)
        assert 16 <= rows and ws.bytes <= 0.9 * budget, (budget, rows, chunk, ws)
        assert (rows == sizes.n) == one_group, (budget, rows)
    assert fused.rows_per_group(sizes, 2**30, True, True)[1] == fused.MAX_CHUNK


class _Allocations(TorchDispatchMode):
    """The peak of the bytes held by tensors allocated while this mode is active (new storages only; views and
    in-place results of existing tensors are not allocations). ``paused`` skips the ops of a test-only path."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.paused = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        tensors = lambda tree: [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]  # noqa: E731
        known = {t.untyped_storage().data_ptr() for t in tensors((args, kwargs))}
        for t in tensors(out):
            storage = t.untyped_storage()
            ptr, entry = storage.data_ptr(), self.live.get(storage.data_ptr())
            if ptr in known or storage.nbytes() == 0 or (entry is not None and entry[0]() is not None):
                continue
            self.live[ptr] = (weakref.ref(t), storage.nbytes())
        self.peak = max(self.peak, sum(n for ref, n in self.live.values() if ref() is not None))
        return out


@pytest.mark.parametrize(
    "master,dweight_sum",
    [(False, "float32"), (False, "weight"), (True, "float32")],
    ids=["bf16-weight", "bf16-weight-summed-in-bf16", "fp32-master-weight"],
)
@pytest.mark.parametrize("groups", ["one-group", "several-groups"])
@pytest.mark.parametrize("mode", [*MODES, "epilogue-tma"])
def test_workspace_report_matches_what_the_sweep_allocates(mode, groups, master, dweight_sum, monkeypatch):
    """workspace_bytes (the plan auto, grao plan and the budget use) equals the peak of the tensors the sweep
    allocates, measured under a dispatch mode, for one and several row groups, with a bf16 weight (several
    chunked groups: dweight summed in float32, or in the bf16 gradient itself with triton_dweight_sum="weight")
    and a float32 master weight under bf16 activations (cast slice by slice). "epilogue-tma": the epilogue
    sweep with the TMA GEMM1 and its descriptor scratch, as on a GPU of 5 SMs (the interpreter itself needs none).
    Not measured: the Triton interpreter's own copies and the CPU emulation of float32-output bf16 GEMMs."""
    from grao_kernels.backends import triton_backend as tb
    from grao_kernels.triton_kernels import chunked, common, epilogue, fused

    tma = mode == "epilogue-tma"
    mode = mode.removesuffix("-tma")
    if tma:
        monkeypatch.setattr(settings, "triton_gemm1", "tma")
        for module in (common, tb):
            monkeypatch.setattr(module, "tma_programs", lambda *a: 5 if common.tma_gemm1(*a) else 0)
    monkeypatch.setattr(settings, "triton_mode", mode)
    monkeypatch.setattr(settings, "triton_config", None)
    monkeypatch.setattr(settings, "triton_dweight_sum", dweight_sum)
    # Several fused groups beat one when the dz chunk saved (2 (n - R) C) exceeds the float32 dweight chunk (4 C H).
    N, H, V = 96, 16, 300
    hidden, weight, bias, targets = _inputs(N, H, V, True, torch.bfloat16, 0.3)
    if master:
        weight = weight.float()
        monkeypatch.setattr(chunked, "SLICE_BYTES", 2 * H * 64)  # slices of 64 vocabulary rows
    n = int((targets != -100).sum())
    sizes = tb._prepare(hidden, weight, bias, targets, Head(), -100).sizes()
    budget = 2**30
    if groups == "several-groups":  # the largest budget (in 1% steps) that splits the rows
        while tb.plan(sizes, budget, grad=True, entropy=True).groups == 1:
            budget = int(budget * 0.99)
    tracker = _Allocations()

    def pause(real):
        def paused(*a, **k):
            tracker.paused += 1
            try:
                return real(*a, **k)
            finally:
                tracker.paused -= 1

        return paused

    for module, names in (
        (chunked, ("launch", "mm_into")),
        (fused, ("launch", "launch_fixed", "mm_into")),
        (epilogue, ("launch",)),
    ):
        for name in names:
            monkeypatch.setattr(module, name, pause(getattr(module, name)))
    planned, real_sweep = [], tb._sweep

    def measured_sweep(prob, out, budget, *, entropy, coef=None, ent_coef=None, stats_given=False, needs):
        grad = coef is not None
        planned.append(tb.plan(prob.sizes(), budget, grad=grad, entropy=entropy or ent_coef is not None,
                               needs=needs, forward=not stats_given))  # fmt: skip
        tracker.peak, tracker.live = 0, {}
        with tracker:
            real_sweep(prob, out, budget, entropy=entropy, coef=coef, ent_coef=ent_coef, stats_given=stats_given,
                       needs=needs)  # fmt: skip
        return tracker.peak

    peaks = []
    monkeypatch.setattr(tb, "_sweep", lambda *a, **k: peaks.append(measured_sweep(*a, **k)))
    coef, ent_coef = torch.randn(N), torch.randn(N)
    got = tb.grad(hidden, weight, bias, targets, Head(), -100, coef=coef, ent_coef=ent_coef, budget=budget)
    tb.forward(hidden, weight, bias, targets, Head(), -100, entropy=True, budget=budget)

    assert [p.mode for p in planned] == [mode, mode]
    assert (planned[0].groups == 1) == (groups == "one-group") and planned[0].rows >= 16, planned[0]
    for p, peak in zip(planned, peaks):
        assert peak == p.bytes, (peak, p)
        assert p.bytes <= 0.9 * budget
    report = tb.workspace_bytes(N, V, H, dtype=torch.bfloat16, weight_dtype=weight.dtype, ignored=N - n,
                                entropy=True, budget=budget, device="cpu")  # fmt: skip
    assert report == planned[0]
    float32_sum = mode == "chunked" and groups == "several-groups" and not master and dweight_sum == "float32"
    assert ("dweight accumulator" in planned[0].workspace.persistent) == float32_sum, planned[0]
    scratch = planned[0].workspace.persistent.get("TMA descriptor scratch")
    assert scratch == (5 * epilogue.DESCRIPTOR_SCRATCH if tma and not master else None), planned[0]
    # The sweep is still right, whatever its grouping.
    ref = _reference(hidden, weight, bias, targets, Head(), coef, ent_coef)
    same = _reference(hidden, weight.bfloat16(), bias, targets, Head(), coef, ent_coef, dtype=torch.bfloat16)
    _check_grads(got[1:], ref[1:], same[1:], (2.0, 1e-3))
    assert got[2].dtype == weight.dtype


def test_workspace_bytes_rejects_bad_sizes_and_plans_nothing_for_no_rows():
    from grao_kernels.backends import triton_backend as tb

    with pytest.raises(ValueError, match="N must be a non-negative int"):
        tb.workspace_bytes(-1, 100, 16)
    with pytest.raises(ValueError, match="ignored=11 exceeds N=10"):
        tb.workspace_bytes(10, 100, 16, ignored=11)
    assert tb.workspace_bytes(10, 100, 16, ignored=10).bytes == 0
    # A float32 master weight under bf16 activations never costs a whole-weight copy, only slices of it.
    big = tb.workspace_bytes(4096, 151936, 4096, weight_dtype=torch.float32)
    assert big.bytes <= 0.9 * tb.DEFAULT_BUDGET and big.mode == "chunked", big


def test_chunked_dweight_summed_in_the_weights_dtype_matches_float64(tb, monkeypatch):
    """triton_dweight_sum="weight": over several row groups (16 rows each, see tb) a bf16 weight's gradient is
    summed in the returned bf16 gradient (one rounding per group, no float32 V x H accumulator) and stays within
    the bf16 tolerance of the oracle; a float16 weight under bf16 activations still sums in float32 (the GEMM
    cannot add a bf16 product into it); an unknown value is a ValueError naming the setting."""
    monkeypatch.setattr(settings, "triton_mode", "chunked")
    monkeypatch.setattr(settings, "triton_dweight_sum", "weight")
    N, H, V = 90, 21, 101
    hidden, weight, b, targets = _inputs(N, H, V, True, torch.bfloat16, 0.2)
    coef = torch.randn(N, device=DEVICE)
    n = int((targets != -100).sum())
    assert n > 3 * 16
    _, *grads = tb.grad(hidden, weight, b, targets, Head(), -100, coef=coef, budget=BUDGET)
    ref = _reference(hidden, weight, b, targets, Head(), coef)
    same = _reference(hidden, weight, b, targets, Head(), coef, dtype=torch.bfloat16)
    assert grads[1].dtype == torch.bfloat16
    _check_grads(grads, ref[1:], same[1:], (2.0, 1e-3))

    from grao_kernels.triton_kernels import chunked

    sizes = tb._prepare(hidden, weight, b, targets, Head(), -100).sizes()
    assert "dweight accumulator" not in chunked.workspace(sizes, 16, grad=True, dweight_sum="weight").persistent
    fp16_weight = dataclasses.replace(sizes, weight_dtype=torch.float16)
    assert "dweight accumulator" in chunked.workspace(fp16_weight, 16, grad=True, dweight_sum="weight").persistent
    monkeypatch.setattr(settings, "triton_dweight_sum", "bfloat16")
    with pytest.raises(ValueError, match="triton_dweight_sum"):
        tb.grad(hidden, weight, b, targets, Head(), -100, coef=coef, budget=BUDGET)


@pytest.mark.parametrize("V", [151936, 262144])
def test_dweight_summed_in_the_weight_keeps_three_gemms_within_the_default_budget(V, monkeypatch):
    """At N=16384, H=4096, bf16 and 1 GiB the float32 dweight sum does not fit beside a useful row group, so
    auto plans the fused sweep; summed in the weight's dtype nothing is V x H and auto plans the chunked one,
    within 90% of the budget (the plans chunked.py's arithmetic compares)."""
    from grao_kernels.backends import triton_backend as tb

    monkeypatch.setattr(settings, "triton_mode", "auto")
    monkeypatch.setattr(settings, "triton_dweight_sum", "float32")
    assert tb.workspace_bytes(16384, V, 4096).mode == "fused"
    monkeypatch.setattr(settings, "triton_dweight_sum", "weight")
    p = tb.workspace_bytes(16384, V, 4096)
    assert p.mode == "chunked" and p.rows >= 256 and p.groups > 1 and p.bytes <= 0.9 * tb.DEFAULT_BUDGET, p
    assert "dweight accumulator" not in p.workspace.persistent


def test_triton_config_setting_is_parsed(monkeypatch):
    from grao_kernels.triton_kernels import common

    assert common.parse_config("BLOCK_N=32, BLOCK_V=64,num_warps=4") == {"BLOCK_N": 32, "BLOCK_V": 64, "num_warps": 4}
    with pytest.raises(ValueError, match="triton_config"):
        common.parse_config("BLOCK_N")


# ----------------------------------------------------------------------------
# through the public functions


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_grao_loss_end_to_end_small_tiles(tb, mode, dtype, tol):
    settings.triton_mode = mode
    P, G, T, H, V = 2, 1, 9, 20, 75
    S = P * (G + 1)
    hidden = torch.randn(S, T, H).to(dtype).to(DEVICE)
    weight = (torch.randn(V, H) / H**0.5).to(dtype).to(DEVICE)
    bias = (torch.randn(V) * 0.5).to(dtype).to(DEVICE)
    targets = torch.randint(0, V, (S, T))
    targets[:, :3] = -100
    targets[2] = -100  # a completion without tokens
    targets, rewards = targets.to(DEVICE), torch.randn(P, G + 1).to(DEVICE)
    leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    out = grao_loss(*leaves[:2], targets, rewards, group_size=G, bias=leaves[2], temperature=0.8, backend="triton")
    got = torch.autograd.grad(out.loss, leaves)

    def ref(dt):
        xs = [x.detach().to(dt).requires_grad_(True) for x in (hidden, weight, bias)]
        r = reference_grao(xs[0], xs[1], targets, rewards, bias=xs[2], temperature=0.8)
        return r, torch.autograd.grad(r["loss"], xs)

    r64, g64 = ref(torch.float64)
    if tol is None:
        assert abs(out.loss.item() - r64["loss"].item()) <= 1e-5 * (1 + abs(r64["loss"].item()))
        assert_close(out.seq_logp, r64["seq_logp"], rtol=1e-5, atol=1e-5, name="seq_logp")
        for g, w in zip(got, g64):
            assert rel_l2(g, w) <= 1e-4
    else:
        rs, gs = ref(dtype)
        assert_within_torch_error(out.loss, r64["loss"], rs["loss"], factor=tol[0], floor=tol[1], name="loss")
        for name, g, w, s in zip(("dhidden", "dweight", "dbias"), got, g64, gs):
            assert g.dtype == dtype
            assert_within_torch_error(g, w, s, factor=tol[0], floor=tol[1], name=name)


@pytest.mark.parametrize("mode", MODES)
def test_fused_linear_logprobs_backward(tb, mode):
    settings.triton_mode = mode
    hidden, weight, b, targets = _inputs(21, 18, 66, True, torch.float32, 0.3)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    logp = fused_linear_logprobs(h, w, targets, bias=b, temperature=1.2, backend="triton")
    up = torch.randn(21, device=DEVICE)
    gh, gw = torch.autograd.grad((logp * up).sum(), (h, w))
    _, dh, dw, _ = _reference(hidden, weight, b, targets, Head(temperature=1.2), up)
    assert rel_l2(gh, dh) <= 1e-5 and rel_l2(gw, dw) <= 1e-5


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype,tol", DTYPES[:2])
def test_entropy_and_linear_loss_through_each_sweep(tb, mode, dtype, tol):
    """fused_linear_logprobs(return_entropy=True) and linear_logprob_loss(entropy_coef=) with bias, logit scale,
    soft-cap and temperature: values and gradients against float64 (bf16: against PyTorch's own bf16 error)."""
    settings.triton_mode = mode
    hidden, weight, b, targets = _inputs(23, 20, 83, True, dtype, 0.3, scale=2.0)
    head = dict(temperature=0.9, logit_scale=1.3, softcap=3.0)
    up_logp, up_ent = torch.randn(23, device=DEVICE), torch.randn(23, device=DEVICE)
    coef, ent_coef = torch.randn(23, device=DEVICE), torch.randn(23, device=DEVICE) * 0.1

    def ours(h, w, bb):
        out = fused_linear_logprobs(h, w, targets, bias=bb, return_entropy=True, backend="triton", **head)
        loss = linear_logprob_loss(h, w, targets, coef, entropy_coef=ent_coef, bias=bb, backend="triton", **head)
        return out, loss.loss

    def ref(h, w, bb):
        logp, ent = reference_logprobs(h, w, targets, bias=bb, return_entropy=True, **head)
        loss = reference_linear_loss(
            h, w, targets, coef.to(h.dtype), entropy_coef=ent_coef.to(h.dtype), bias=bb, **head
        )
        return logp, ent, loss

    xs = leaves(hidden, weight, b)
    out, loss = ours(*xs)
    got_lp = grads((out.logp * up_logp).sum() + (out.entropy * up_ent).sum(), *xs)
    got_loss = grads(loss, *xs)
    x64 = leaves(hidden, weight, b, dtype=torch.float64)
    logp64, ent64, loss64 = ref(*x64)
    want_lp = grads((logp64 * up_logp.double()).sum() + (ent64 * up_ent.double()).sum(), *x64)
    want_loss = grads(loss64, *x64)
    # The sweeps compute the softmax in float32 from the given values: tight on the statistics in any dtype.
    assert_close(out.logp, logp64, rtol=1e-5, atol=2e-5, name="logp")
    assert_close(out.entropy, ent64, rtol=1e-5, atol=2e-5, name="entropy")
    assert abs(loss.item() - loss64.item()) <= 1e-5 * (1 + abs(loss64.item()))
    if tol is None:
        for got, want in ((got_lp, want_lp), (got_loss, want_loss)):
            for name, g, w in zip(("dhidden", "dweight", "dbias"), got, want):
                assert rel_l2(g, w) <= 1e-5, f"{name}: relative L2 {rel_l2(g, w):.2e}"
        return
    xs_same = leaves(hidden, weight, b)
    logp_s, ent_s, loss_s = ref(*xs_same)
    same_lp = grads((logp_s * up_logp).sum() + (ent_s * up_ent).sum(), *xs_same)
    same_loss = grads(loss_s, *xs_same)
    for got, want, same in ((got_lp, want_lp, same_lp), (got_loss, want_loss, same_loss)):
        for name, g, w, sm in zip(("dhidden", "dweight", "dbias"), got, want, same):
            assert g.dtype == dtype
            assert_within_torch_error(g, w, sm, factor=tol[0], floor=tol[1], name=name)


def test_memory_budget_of_a_call_chooses_the_sweep(monkeypatch):
    """backend='triton' with the default triton_mode ('auto'): a call's memory_budget= decides which sweep runs."""
    from grao_kernels.triton_kernels import chunked, fused

    monkeypatch.setattr(settings, "triton_mode", "auto")
    ran = []
    for module in (chunked, fused):
        real = module.run
        monkeypatch.setattr(module, "run", lambda *a, _m=module, _r=real, **k: ran.append(_m.__name__) or _r(*a, **k))
    hidden, weight, _, targets = _inputs(100, 16, 4000, False, torch.float32, 0.0)
    h = hidden.clone().requires_grad_(True)
    # 100 rows of 16 KB of float32 logits: 64 MiB holds them all, 1 MiB (the least budget) only 58.
    for budget, sweep in ((64 * 2**20, "chunked"), (2**20, "fused")):
        ran.clear()
        logp = fused_linear_logprobs(h, weight, targets, backend="triton", memory_budget=budget)
        logp.sum().backward()
        assert ran and all(name.endswith(sweep) for name in ran), (budget, ran)
    ref = reference_logprobs(hidden.double(), weight.double(), targets)
    assert_close(logp, ref, rtol=1e-5, atol=2e-5, name="logp of the fused sweep")


def test_cuda_graph_capture_is_refused_with_a_clear_error(monkeypatch):
    """A call while a CUDA stream captures a graph raises before the host sync that would break the capture."""
    from grao_kernels.backends import triton_backend as tb

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA graph capture"):
        tb.check_not_capturing(torch.device("cuda", 0))
    tb.check_not_capturing(torch.device("cpu"))  # CPU tensors (the interpreter) are never captured


def test_auto_never_picks_triton_for_cpu_tensors():
    assert not resolve("auto", torch.device("cpu")).__name__.endswith("triton_backend")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_triton_on_cpu_without_interpreter_is_a_clear_value_error():
    code = (
        "import torch\n"
        "from grao_kernels import fused_linear_logprobs\n"
        "try:\n"
        "    fused_linear_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long),"
        " backend='triton')\n"
        "except ValueError as exc:\n"
        "    print('VALUEERROR', exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "VALUEERROR" in res.stdout and "TRITON_INTERPRET=1" in res.stdout, res.stdout


# ----------------------------------------------------------------------------
# ahead-of-time compilation


def _compile_check(*args, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-W", "ignore", "-m", "grao_kernels.triton_kernels.compile_check", *args]
    root = os.path.join(os.path.dirname(__file__), "..", "..")  # -m imports this tree's grao_kernels
    return subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=timeout)


def test_compile_check_derives_the_jit_specialisation():
    """The compile check types the launches the backend records: aligned pointers and multiples of 16 carry
    the divisibility hint, absent pointers (no bias) are None constants."""
    res = _compile_check("--list", "--dtype", "bf16", "--first", timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    kernels = ("rows_kernel", "lse_partials_kernel", "lse_reduce_kernel", "dlogits_kernel", "dz_kernel")
    for kernel in (*kernels, "lse_partials_tma_kernel"):  # the last: the epilogue sweep's GEMM1 on Hopper
        assert kernel in out
    assert "'bias_ptr': 'constexpr'" in out and "'bias_ptr': '*bf16'" in out
    assert "divisible_by_16=['hidden_ptr', 'weight_ptr'" in out


def test_compile_check_specialises_arguments_as_this_triton_does():
    """The compile check's argument specialisation equals the JIT's own (triton's native specialiser) for each kind
    of argument the kernels take: 1 is a constant, multiples of 16 and 16-byte aligned pointers get the hint."""
    from grao_kernels.triton_kernels import compile_check

    native = pytest.importorskip("triton._C.libtriton").native_specialize_impl
    from triton.backends.compiler import BaseBackend

    buf = torch.empty(64)
    for value in (
        1,
        16,
        17,
        48,
        2**31,
        None,
        0.5,
        True,
        buf,
        buf[1:],
        buf.bfloat16(),
        torch.empty(8, dtype=torch.int64),
    ):
        ty, key = native(BaseBackend, value, False, True, True)[:2]
        ours, const, div16 = compile_check.specialise(value)
        assert ours == ty, (value, ours, ty)
        if ty == "constexpr":
            assert const == key, (value, const, key)
        elif ty != "u1" and not ty.startswith("fp"):
            assert div16 == (key == "D"), (value, div16, key)


@pytest.mark.slow
def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter never lowers a kernel: compile the JIT's variants for sm_90 down to cubin (bundled ptxas)."""
    res = _compile_check("--arch", "90", "--dtype", "bf16", "--first", timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU dry run of the GPU check")
def test_gpu_check_script_dry_run(tmp_path):
    """benchmarks/gpu/check.py --smoke: the whole script at tiny sizes under the interpreter."""
    script = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "gpu", "check.py")
    cmd = [sys.executable, "-W", "ignore", script, str(tmp_path), "--smoke"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = (tmp_path / "gpu_check.md").read_text()
    for mode in ("chunked", "fused", "epilogue"):  # every sweep, on both ops, passes the float64 gate
        for op in ("logprobs", "grao"):
            rows = [ln for ln in table.splitlines() if ln.startswith(f"| grao_kernels (triton, {mode}) | {op} |")]
            assert rows and all(ln.rstrip().endswith("| ok |") for ln in rows), (mode, op, rows)
    assert (tmp_path / "gpu_check.json").exists()

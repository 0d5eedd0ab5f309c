"""Triton backend kernels against the float64 reference, under the interpreter on CPU.

``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` when there is no CUDA device,
before anything imports triton. Each kernel is pinned to small tiles here so
that tiny shapes still span several row blocks, vocabulary tiles and H steps,
with V and H not multiples of the tiles.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from utils import assert_close, assert_within_torch_error, rel_l2

from grao_kernels import api, fused_linear_logprobs, grao_loss
from grao_kernels.backends import resolve, unavailable_reason
from grao_kernels.reference import reference_advantages, reference_grao, reference_logprobs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    unavailable_reason("triton", torch.device(DEVICE)) is not None,
    reason=f"triton backend unavailable: {unavailable_reason('triton', torch.device(DEVICE))}",
)

SMALL = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_H": 16}

# (dtype, None for fixed float32 bounds | (factor, floor) against PyTorch's own error)
DTYPES = [
    pytest.param(torch.float32, None, id="fp32"),
    pytest.param(torch.bfloat16, (2.0, 1e-3), id="bf16"),
    pytest.param(torch.float16, (2.0, 1e-4), id="fp16"),
]

# (name, N, H, V, bias, temperature, ignored fraction)
SHAPES = [
    ("odd-bias-temp", 37, 21, 101, True, 0.7, 0.3),
    ("one-row", 1, 16, 33, False, 1.0, 0.0),
    ("wide-H", 19, 45, 70, True, 1.6, 0.5),
]


@pytest.fixture
def tb():
    """The triton backend module with small pinned tiles (restored afterwards)."""
    from grao_kernels.backends import triton_backend

    triton_backend.pin_config("forward", SMALL)
    triton_backend.pin_config("backward", {**SMALL, "GROUP_N": 2})
    triton_backend.pin_config("dlogits", {**SMALL, "GROUP_N": 2})
    mode, chunk = triton_backend._backward_mode, triton_backend._DZ_CHUNK
    triton_backend._DZ_CHUNK = 64  # several vocabulary chunks at tiny V
    yield triton_backend
    for kernel in ("forward", "backward", "dlogits"):
        triton_backend.pin_config(kernel, None)
    triton_backend.set_gradient_filter(False)
    triton_backend.set_backward_mode(mode)
    triton_backend._DZ_CHUNK = chunk


def _inputs(N, H, V, bias, dtype, ignored, *, scale=1.0):
    hidden = (torch.randn(N, H) * scale).to(dtype).to(DEVICE)
    weight = (torch.randn(V, H) / H**0.5).to(dtype).to(DEVICE)
    b = (torch.randn(V) * 0.5).to(dtype).to(DEVICE) if bias else None
    targets = torch.randint(0, V, (N,))
    targets[torch.rand(N) < ignored] = -100
    return hidden, weight, b, targets.to(DEVICE)


def _ref_grads(hidden, weight, b, targets, coef, temperature, dtype=torch.float64):
    """(logp, lse, dh, dw, db) by autograd through the materialised logits in ``dtype``."""
    leaves = [x.detach().to(dtype).requires_grad_(True) if x is not None else None for x in (hidden, weight, b)]
    h, w, bb = leaves
    logp = reference_logprobs(h, w, targets, bias=bb, temperature=temperature)
    z = (h.double() @ w.double().T + (0 if bb is None else bb.double())) / temperature
    lse = torch.where(targets != -100, z.logsumexp(-1), 0.0)
    live = [x for x in leaves if x is not None]
    grads = iter(torch.autograd.grad((coef.to(logp.dtype) * logp).sum(), live))
    dh, dw = next(grads), next(grads)
    db = next(grads) if b is not None else None
    return logp.detach(), lse.detach(), dh, dw, db


def _check(name, got, want, same, tol, fp32_rel):
    if got is None and want is None:
        return
    if tol is None:
        assert rel_l2(got, want) <= fp32_rel, f"{name}: relative L2 {rel_l2(got, want):.2e}"
    else:
        assert_within_torch_error(got, want, same, factor=tol[0], floor=tol[1], name=name)


# ----------------------------------------------------------------------------
# log-prob sweeps


@pytest.mark.parametrize("mode", ["gemm", "atomic"])
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_forward_and_gradient_match_float64(tb, dtype, tol, shape, mode):
    tb.set_backward_mode(mode)
    _, N, H, V, bias, temp, ignored = shape
    hidden, weight, b, targets = _inputs(N, H, V, bias, dtype, ignored)
    coef = torch.randn(N, device=DEVICE)

    logp, lse = tb.linear_logprobs_forward(hidden, weight, b, targets, temp, -100)
    g_logp, dh, dw, db = tb.linear_logprobs_grad(hidden, weight, b, targets, coef, temp, -100)
    ref = _ref_grads(hidden, weight, b, targets, coef, temp)
    same = _ref_grads(hidden, weight, b, targets, coef, temp, dtype=dtype)

    for t in (logp, lse, g_logp, dh):
        assert t.dtype == torch.float32
    # The "gemm" backward writes dW (and dbias) in the input dtype, the atomic one sums them in float32.
    grad_dtype = dtype if mode == "gemm" else torch.float32
    for t in (dw,) + ((db,) if bias else ()):
        assert t.dtype == grad_dtype
    ignored_rows = targets == -100
    assert (logp[ignored_rows] == 0).all() and (lse[ignored_rows] == 0).all() and (dh[ignored_rows] == 0).all()
    # Both sweeps work in float32 on the same rounded inputs: only the fp32
    # accumulation order separates them from the float64 oracle.
    assert_close(logp, ref[0], rtol=1e-5, atol=2e-5, name="logp")
    assert_close(lse, ref[1], rtol=1e-5, atol=2e-5, name="lse")
    assert_close(g_logp, logp, rtol=1e-5, atol=2e-5, name="logp from the gradient sweep")
    for name, got, want, s in zip(("dhidden", "dweight", "dbias"), (dh, dw, db), ref[2:], same[2:]):
        _check(name, got, want, s, tol, 1e-5)

    # With the saved lse the gradient sweep runs alone and gives the same.
    again = tb.linear_logprobs_grad(hidden, weight, b, targets, coef, temp, -100, lse=lse)
    for x, y in zip(again, (g_logp, dh, dw, db)):
        if x is not None:
            assert_close(x, y, rtol=1e-6, atol=1e-6, name="with saved lse")


@pytest.mark.parametrize("bias_dtype", [torch.bfloat16, torch.float32, None], ids=["bf16-bias", "fp32-bias", "no-bias"])
def test_gemm_backward_writes_bf16_weight_gradient(tb, bias_dtype):
    """bf16 inputs: dW comes back as a bf16 (V, H) buffer, never a float32 one, and dbias in the bias's dtype."""
    N, H, V = 29, 24, 150  # three 64-wide dz chunks (see the tb fixture), the last one partial
    hidden, weight, b, targets = _inputs(N, H, V, bias_dtype is not None, torch.bfloat16, 0.2)
    if b is not None:
        b = b.to(bias_dtype)
    coef = torch.randn(N, device=DEVICE)
    tb.set_backward_mode("gemm")
    _, dh, dw, db = tb.linear_logprobs_grad(hidden, weight, b, targets, coef, 0.9, -100)
    assert dh.dtype == torch.float32
    assert dw.dtype == torch.bfloat16 and dw.shape == (V, H)
    assert db is None if b is None else db.dtype == bias_dtype
    ref = _ref_grads(hidden, weight, b, targets, coef, 0.9)
    same = _ref_grads(hidden, weight, b, targets, coef, 0.9, dtype=torch.bfloat16)
    for name, got, want, s in zip(("dhidden", "dweight", "dbias"), (dh, dw, db), ref[2:], same[2:]):
        if got is not None:
            assert_within_torch_error(got, want, s, factor=2.0, floor=1e-3, name=name)
    # The same values as the float32 dW of the atomic backward, rounded once (up to summation order).
    tb.set_backward_mode("atomic")
    _, _, dw32, _ = tb.linear_logprobs_grad(hidden, weight, b, targets, coef, 0.9, -100)
    assert dw32.dtype == torch.float32
    assert_close(dw, dw32.bfloat16(), rtol=2**-7, atol=1e-6, name="dW against the atomic backward's")


def test_vocabulary_splits_combine_exactly(tb, monkeypatch):
    """Few row blocks: the forward splits V across programs and merges the partial sums."""
    monkeypatch.setattr(tb, "_SPLIT_UNIT", 32)
    monkeypatch.setattr(tb, "_sm_count", lambda device: 8)
    hidden, weight, b, targets = _inputs(5, 24, 150, True, torch.float32, 0.2)
    assert tb._vocab_splits(5, 150, hidden.device)[0] == 5
    logp, lse = tb.linear_logprobs_forward(hidden, weight, b, targets, 1.3, -100)
    ref = _ref_grads(hidden, weight, b, targets, torch.ones(5), 1.3)
    assert_close(logp, ref[0], rtol=1e-5, atol=2e-5, name="logp")
    assert_close(lse, ref[1], rtol=1e-5, atol=2e-5, name="lse")


@pytest.mark.parametrize("mode", ["gemm", "atomic"])
def test_ignored_rows_are_never_read(tb, mode):
    tb.set_backward_mode(mode)
    hidden, weight, _, targets = _inputs(40, 20, 50, False, torch.float32, 0.0)
    targets[::3] = -100
    dirty = hidden.clone()
    dirty[targets == -100] = float("nan")
    coef = torch.randn(40, device=DEVICE)
    clean = tb.linear_logprobs_grad(hidden, weight, None, targets, coef, 1.0, -100)
    got = tb.linear_logprobs_grad(dirty, weight, None, targets, coef, 1.0, -100)
    for x, y in zip(got[:3], clean[:3]):
        assert torch.equal(x, y)


def test_all_ignored_and_empty(tb):
    hidden, weight, b, targets = _inputs(9, 16, 40, True, torch.bfloat16, 1.0)
    logp, dh, dw, db = tb.linear_logprobs_grad(hidden, weight, b, targets, torch.ones(9), 1.0, -100)
    assert (logp == 0).all() and (dh == 0).all() and (dw == 0).all() and (db == 0).all()
    empty = torch.empty(0, 16, dtype=torch.bfloat16)
    logp, lse = tb.linear_logprobs_forward(empty, weight, b, torch.empty(0, dtype=torch.int64), 1.0, -100)
    assert logp.shape == (0,) and lse.shape == (0,)


def test_noncontiguous_and_mixed_dtype_inputs(tb):
    hidden, weight, _, targets = _inputs(17, 24, 45, False, torch.float32, 0.2)
    coef = torch.randn(17, device=DEVICE)
    want = tb.linear_logprobs_grad(hidden, weight, None, targets, coef, 1.0, -100)
    strided = torch.cat([hidden, hidden], 1)[:, ::2]
    strided.copy_(hidden)
    got = tb.linear_logprobs_grad(strided, weight.T.contiguous().T, None, targets, coef, 1.0, -100)
    for x, y in zip(got[:3], want[:3]):
        assert_close(x, y, rtol=1e-6, atol=1e-6, name="non-contiguous")
    # bfloat16 hidden with a float32 head runs in float32 (the wider dtype).
    logp, _ = tb.linear_logprobs_forward(hidden.bfloat16(), weight, None, targets, 1.0, -100)
    ref = _ref_grads(hidden.bfloat16(), weight, None, targets, coef, 1.0)
    assert_close(logp, ref[0], rtol=1e-5, atol=2e-5, name="mixed dtypes")


def test_gradient_filter_off_by_default_and_close_on_peaked_softmax(tb):
    assert not tb._filter
    tb.set_backward_mode("atomic")  # the filter skips tiles of the fused backward
    # A peaked softmax whose mode is the target, as for a trained model: most
    # tiles then hold no target and only negligible probability mass.
    hidden, weight, _, targets = _inputs(24, 32, 320, False, torch.bfloat16, 0.0, scale=6.0)
    targets = (hidden.float() @ weight.float().T).argmax(1)
    targets[::5] = -100
    coef = torch.randn(24, device=DEVICE)
    exact = tb.linear_logprobs_grad(hidden, weight, None, targets, coef, 1.0, -100)
    tb.set_gradient_filter(True)
    filtered = tb.linear_logprobs_grad(hidden, weight, None, targets, coef, 1.0, -100)
    assert torch.equal(filtered[0], exact[0])
    assert not torch.equal(filtered[2], exact[2]), "no tile was skipped: the test does not exercise the filter"
    ref = _ref_grads(hidden, weight, None, targets, coef, 1.0)
    same = _ref_grads(hidden, weight, None, targets, coef, 1.0, dtype=torch.bfloat16)
    for name, got, want, s in zip(("dhidden", "dweight"), filtered[1:3], ref[2:4], same[2:4]):
        assert_within_torch_error(got, want, s, factor=2.0, floor=1e-3, name=f"filtered {name}")


def test_pin_config_validates():
    from grao_kernels.backends import triton_backend as tb

    with pytest.raises(ValueError, match="power of two"):
        tb.pin_config("forward", {"BLOCK_N": 16, "BLOCK_V": 24, "BLOCK_H": 16})
    with pytest.raises(ValueError, match="lacks"):
        tb.pin_config("backward", {"BLOCK_N": 16})
    with pytest.raises(ValueError, match="kernel must be"):
        tb.pin_config("sideways", None)
    with pytest.raises(ValueError, match="backward mode"):
        tb.set_backward_mode("sideways")


def test_env_config_is_parsed(monkeypatch):
    from grao_kernels.backends import triton_backend as tb

    monkeypatch.setenv("GRAO_KERNELS_TRITON_CONFIG", "BLOCK_N=32,BLOCK_V=64,BLOCK_H=16,num_warps=4")
    assert tb._chosen_config("backward") == {"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_H": 16, "num_warps": 4, "GROUP_N": 8}
    monkeypatch.setenv("GRAO_KERNELS_TRITON_CONFIG", "BLOCK_N")
    with pytest.raises(ValueError, match="GRAO_KERNELS_TRITON_CONFIG"):
        tb._chosen_config("forward")


# ----------------------------------------------------------------------------
# GRAO group kernels


@pytest.mark.parametrize("K", [2, 5, 9])
def test_group_advantages_kernel(tb, K):
    rewards = torch.randn(7, K, device=DEVICE)
    rewards[3] = 0.1  # tied group: exactly zero
    got = tb.group_advantages(rewards, 1e-6)
    assert got.dtype == torch.float32
    assert_close(got, reference_advantages(rewards), rtol=1e-5, atol=1e-6, name="advantages")
    assert (got[3] == 0).all()
    r64 = rewards.double()
    got64 = tb.group_advantages(r64, 0.0)
    assert got64.dtype == torch.float64
    assert_close(got64, api.group_advantages(r64, eps=0.0), rtol=1e-12, atol=1e-12, name="float64 advantages")
    with pytest.raises(ValueError, match="eps"):
        tb.group_advantages(rewards, -1.0)


@pytest.mark.parametrize("G", [1, 3])
def test_token_coefficients_and_sequence_logp_kernels(tb, G):
    P, T = 3, 37
    S = P * (G + 1)
    adv = api.group_advantages(torch.randn(P, G + 1)).to(DEVICE)
    targets = torch.randint(0, 50, (S, T))
    targets[:, :5] = -100
    targets[1] = -100  # a completion without tokens
    targets = targets.to(DEVICE)
    coef, n = tb.token_coefficients(adv, targets, -100, 0.5, 0.6)
    want_coef, want_n = api.token_coefficients(adv, targets, -100, 0.5, 0.6)
    assert coef.shape == (S * T,) and coef.dtype == torch.float32
    assert_close(n, want_n, rtol=0, atol=0, name="n")
    assert_close(coef, want_coef, rtol=1e-6, atol=1e-9, name="coef")
    logp = torch.where(targets != -100, -torch.rand(S, T, device=DEVICE), 0.0)
    assert_close(tb.sequence_logp(logp, n), api.sequence_logp(logp, n), rtol=1e-6, atol=1e-7, name="J")


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_grao_loss_end_to_end_small_tiles(tb, dtype, tol):
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
    out = grao_loss(*leaves[:2], targets, rewards, bias=leaves[2], temperature=0.8, backend="triton")
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


def test_fused_linear_logprobs_backward_uses_saved_lse(tb):
    hidden, weight, b, targets = _inputs(21, 18, 66, True, torch.float32, 0.3)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    logp = fused_linear_logprobs(h, w, targets, bias=b, temperature=1.2, backend="triton")
    up = torch.randn(21, device=DEVICE)
    gh, gw = torch.autograd.grad((logp * up).sum(), (h, w))
    _, _, dh, dw, _ = _ref_grads(hidden, weight, b, targets, up, 1.2)
    assert rel_l2(gh, dh) <= 1e-5 and rel_l2(gw, dw) <= 1e-5


# ----------------------------------------------------------------------------
# selection


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


@pytest.mark.slow
def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter never lowers a kernel: compile them for sm_90 down to cubin (bundled ptxas)."""
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu", "compile_check.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-W", "ignore", script, "--arch", "90", "--dtype", "bf16", "--first"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU dry run of the GPU check")
def test_gpu_check_script_dry_run(tmp_path):
    """benchmarks/gpu/check.py --smoke: the whole script at tiny sizes under the interpreter."""
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu", "check.py")
    cmd = [sys.executable, "-W", "ignore", script, str(tmp_path), "--smoke", "--n", "32", "--h", "16", "--vocab", "70"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| grao_kernels triton, fused_linear_logprobs |" in table and "FAIL" not in table
    assert (tmp_path / "gpu_check.json").exists()

"""Native CPU backend specifics: the ops at small tiles, threads, strides,
torch.compile, bfloat16, and the path where the extension cannot be built.

The float64 oracle suite (test_oracle.py) covers the public API for every
backend, native included; these tests drive the ``grao_native::`` ops
directly so that block and tile edges are exercised at small sizes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from utils import assert_close

from grao_kernels.backends import native_backend
from grao_kernels.settings import settings
from grao_kernels.testing import reference_logprobs, reference_lse

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ops():
    reason = native_backend.unavailable_reason(torch.device("cpu"))
    if reason is not None:
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            pytest.skip(f"native backend unavailable: {reason}")
        pytest.fail(f"a C++ compiler is present but the native backend is unavailable: {reason}")
    return native_backend.ops()


HEADS = {
    "plain": dict(temperature=1.0, logit_scale=1.0, softcap=None),
    "temperature-scale": dict(temperature=0.7, logit_scale=1.3, softcap=None),
    "softcap": dict(temperature=1.3, logit_scale=0.8, softcap=3.0),
}


def make_case(N, H, V, *, bias, ignore_every=3, dtype=torch.float32):
    h = torch.randn(N, H, dtype=torch.float64)
    w = torch.randn(V, H, dtype=torch.float64) / H**0.5 * 2
    b = torch.randn(V, dtype=torch.float64) if bias else None
    t = torch.randint(0, V, (N,))
    if ignore_every:
        t[::ignore_every] = -100
    c, ec = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    # The oracle sees exactly the (rounded) inputs the kernel sees.
    h, w = h.to(dtype).double(), w.to(dtype).double()
    b = None if b is None else b.to(dtype).double()
    return h, w, b, t, c, ec


def oracle(h, w, b, t, c, ec, head):
    """float64 (logp, lse, entropy) and the gradients of sum c logp + sum ec ent, from grao_kernels.testing."""
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    logp, ent = reference_logprobs(h, w, t, bias=b, return_entropy=True, **head)
    valid = t != -100
    lse = torch.where(valid, reference_lse(h, w, bias=b, **head), 0.0)
    loss = (c * logp).sum() + (0.0 if ec is None else (ec * ent).sum())
    grads = torch.autograd.grad(loss, [x for x in (h, w, b) if x is not None])
    return logp.detach(), lse.detach(), ent.detach(), grads[0], grads[1], (grads[2] if b is not None else None)


def head_args(head):
    return float(head["temperature"]), float(head["logit_scale"]), head["softcap"]


def run_ops(ops, h, w, b, t, c, ec, head, rows, tile, dtype=torch.float32, needs=(True, True, True)):
    """Forward with entropy, the one-sweep grad and the grad reusing the forward's statistics."""
    h, w = h.to(dtype), w.to(dtype)
    b = None if b is None else b.to(dtype)
    c = c.float()
    ec = None if ec is None else ec.float()
    logp, lse, ent = ops.linear_logprobs_forward(h, w, b, t, *head_args(head), -100, True, rows, tile)
    common = (*head_args(head), -100, *needs, rows, tile)
    one = ops.linear_logprobs_grad(h, w, b, t, c, ec, None, None, *common)
    reuse = ops.linear_logprobs_grad(h, w, b, t, c, ec, lse, None if ec is None else ent, *common)
    return (logp, lse, ent), one, reuse


def check_against_oracle(result, expected, *, rtol, atol, bias, entropy):
    (logp, lse, ent), *grads = result
    e_logp, e_lse, e_ent, e_dh, e_dw, e_db = expected
    assert_close(logp, e_logp, rtol=rtol, atol=atol, name="forward logp")
    assert_close(lse, e_lse, rtol=rtol, atol=atol, name="forward lse")
    assert_close(ent, e_ent, rtol=rtol, atol=atol, name="forward entropy")
    for label, (lp, ls, en, dh, dw, db) in zip(("one-sweep", "given stats"), grads):
        assert_close(lp, e_logp, rtol=rtol, atol=atol, name=f"{label} logp")
        assert_close(ls, e_lse, rtol=rtol, atol=atol, name=f"{label} lse")
        if entropy:
            assert_close(en, e_ent, rtol=rtol, atol=atol, name=f"{label} entropy")
        else:
            assert en.numel() == 0
        assert_close(dh, e_dh, rtol=rtol, atol=atol, name=f"{label} dhidden")
        assert_close(dw, e_dw, rtol=rtol, atol=atol, name=f"{label} dweight")
        if bias:
            assert_close(db, e_db, rtol=rtol, atol=atol, name=f"{label} dbias")
        else:
            assert db.numel() == 0


# (rows per block, vocab per tile): several row blocks and a ragged last tile,
# one row block with one tile, and tiles narrower than a vector register.
@pytest.mark.parametrize("rows,tile", [(16, 96), (512, 4096), (7, 5)])
@pytest.mark.parametrize("bias,head", [(False, "plain"), (True, "temperature-scale"), (True, "softcap")])
@pytest.mark.parametrize("entropy", [False, True], ids=["logp", "logp+entropy"])
def test_ops_match_float64_at_block_and_tile_edges(ops, rows, tile, bias, head, entropy):
    h, w, b, t, c, ec = make_case(70, 24, 1003, bias=bias)
    ec = ec if entropy else None
    result = run_ops(ops, h, w, b, t, c, ec, HEADS[head], rows, tile)
    expected = oracle(h, w, b, t, c, ec, HEADS[head])
    check_against_oracle(result, expected, rtol=2e-5, atol=2e-5, bias=bias, entropy=entropy)


@pytest.mark.parametrize("head", ["plain", "softcap"])
def test_bfloat16_inputs_accumulate_in_float32(ops, head):
    # The oracle gets the same bf16-rounded values in float64, so the only
    # error left is float32 accumulation: far below bf16 resolution.
    h, w, b, t, c, ec = make_case(40, 32, 777, bias=True, dtype=torch.bfloat16)
    result = run_ops(ops, h, w, b, t, c, ec, HEADS[head], 16, 128, dtype=torch.bfloat16)
    expected = oracle(h, w, b, t, c, ec, HEADS[head])
    check_against_oracle(result, expected, rtol=2e-5, atol=2e-5, bias=True, entropy=True)
    assert all(x.dtype == torch.float32 for x in result[1][:5])


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, True), (False, False, True)])
def test_gradients_not_needed_are_empty_and_the_rest_unchanged(ops, needs):
    h, w, b, t, c, ec = make_case(50, 16, 700, bias=True)
    _, full, full_reuse = run_ops(ops, h, w, b, t, c, ec, HEADS["softcap"], 16, 64)
    _, part, part_reuse = run_ops(ops, h, w, b, t, c, ec, HEADS["softcap"], 16, 64, needs=needs)
    for f, p in ((full, part), (full_reuse, part_reuse)):
        for name, a, e in zip(("logp", "lse", "entropy"), p[:3], f[:3]):
            assert torch.equal(a, e), name
        for name, need, a, e in zip(("dhidden", "dweight", "dbias"), needs, p[3:], f[3:]):
            if need:
                assert torch.equal(a, e), name
            else:
                assert a.numel() == 0, name


def masked_case(V, ranges, target_masked):
    h, w, b, t, c, ec = make_case(30, 16, V, bias=True)
    for lo, hi in ranges:
        b[lo:hi] = -float("inf")
    allowed = torch.isfinite(b).nonzero().squeeze(1)
    t = torch.where(t == -100, t, allowed[torch.randint(0, allowed.numel(), t.shape)])
    if target_masked:
        t[1] = ranges[0][0]
    return h, w, b, t, c, ec


# A masked first tile, fully masked tiles in the middle of a chunk and at the
# end, a target whose own logit is masked; tiles of 64 so that they are many.
@pytest.mark.parametrize("target_masked", [False, True], ids=["targets-allowed", "a-target-masked"])
@pytest.mark.parametrize("head", ["plain", "softcap"])
def test_masked_tiles_and_targets_match_the_reference(ops, target_masked, head):
    h, w, b, t, c, ec = masked_case(1000, [(0, 192), (320, 640), (900, 1000)], target_masked)
    (logp, lse, ent), *grads = run_ops(ops, h, w, b, t, c, ec, HEADS[head], 8, 64)
    e_logp, e_lse, e_ent, *e_grads = oracle(h, w, b, t, c, ec, HEADS[head])
    # Only a soft-capped head keeps a masked logit finite (tanh(-inf) = -1).
    finite = torch.isfinite(e_logp)
    assert target_masked == (not bool(finite.all())) or HEADS[head]["softcap"] is not None
    for label, lp in (("forward", logp), ("one-sweep", grads[0][0]), ("given stats", grads[1][0])):
        assert torch.equal(torch.isfinite(lp), finite), f"{label} logp: -inf exactly where the reference has it"
        assert_close(lp[finite], e_logp[finite], rtol=2e-5, atol=2e-5, name=f"{label} logp")
    assert_close(lse, e_lse, rtol=2e-5, atol=2e-5, name="lse")
    assert_close(ent, e_ent, rtol=2e-5, atol=2e-5, name="entropy")
    for label, g in zip(("one-sweep", "given stats"), grads):
        assert_close(g[2], e_ent, rtol=2e-5, atol=2e-5, name=f"{label} entropy")
        for name, a, e in zip(("dhidden", "dweight", "dbias"), g[3:], e_grads):
            assert_close(a, e, rtol=2e-5, atol=2e-5, name=f"{label} {name}")


def _with_threads(n, fn):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(n)
        return fn()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("rows", [64, 1024])
def test_one_and_two_threads_give_bitwise_identical_results(ops, rows):
    # Every sum has an order fixed by the block sizes and each GEMM runs on
    # one BLAS thread, so the results are bitwise equal, not merely close;
    # 1024-row blocks (the default up to V = 16384) once showed dweight
    # differing in the last bits.
    h, w, b, t, c, ec = make_case(1600, 64, 3000, bias=True, ignore_every=5)
    h, w, b, c, ec = h.float(), w.float(), b.float(), c.float(), ec.float()
    head = head_args(HEADS["softcap"])

    def call():
        fwd = ops.linear_logprobs_forward(h, w, b, t, *head, -100, True, rows, 256)
        common = (*head, -100, True, True, True, rows, 256)
        one = ops.linear_logprobs_grad(h, w, b, t, c, ec, None, None, *common)
        reuse = ops.linear_logprobs_grad(h, w, b, t, c, ec, fwd[1], fwd[2], *common)
        return (*fwd, *one, *reuse[3:])

    names = ("logp", "lse", "entropy") + tuple(f"one-sweep {n}" for n in ("logp", "lse", "entropy", "dh", "dw", "db"))
    names += tuple(f"given-stats {n}" for n in ("dh", "dw", "db"))
    one, two = _with_threads(1, call), _with_threads(2, call)
    for name, a, e in zip(names, one, two):
        assert torch.equal(a, e), f"{name}: max difference {(a - e).abs().max().item():.3e}"


def test_non_contiguous_inputs_give_the_contiguous_result(ops):
    h, w, b, t, c, ec = (x.float() if x.is_floating_point() else x for x in make_case(50, 16, 300, bias=True))
    # Strided views of the same values: a transposed hidden, every other
    # column of a wider weight, a strided bias, targets and coefficients.
    h_nc = h.T.contiguous().T
    w_wide = torch.zeros(300, 32)
    w_wide[:, ::2] = w
    w_nc = w_wide[:, ::2]
    b_nc = torch.stack([b, b], 1)[:, 0]
    t_nc = torch.stack([t, t], 1)[:, 0]
    c_nc = torch.stack([c, c], 1)[:, 0]
    ec_nc = torch.stack([ec, ec], 1)[:, 0]
    assert not any(x.is_contiguous() for x in (h_nc, w_nc, b_nc, t_nc, c_nc, ec_nc))
    common = (1.0, 1.0, None, -100, True, True, True, 16, 64)
    ref = ops.linear_logprobs_grad(h, w, b, t, c, ec, None, None, *common)
    got = ops.linear_logprobs_grad(h_nc, w_nc, b_nc, t_nc, c_nc, ec_nc, None, None, *common)
    for name, a, e in zip(("logp", "lse", "entropy", "dhidden", "dweight", "dbias"), got, ref):
        assert_close(a, e, rtol=1e-6, atol=1e-7, name=name)
    fwd = ops.linear_logprobs_forward(h_nc, w_nc, b_nc, t_nc, 1.0, 1.0, None, -100, True, 16, 64)
    assert_close(fwd[0], ref[0], rtol=1e-6, atol=1e-7, name="forward logp")
    assert_close(fwd[2], ref[2], rtol=1e-6, atol=1e-7, name="forward entropy")


def test_torch_compile_traces_the_ops_without_graph_breaks(ops):
    h, w, b, t, c, ec = (x.float() if x.is_floating_point() else x for x in make_case(33, 16, 200, bias=True))

    def f(h, w, b, t, c, ec):
        logp, lse, ent = torch.ops.grao_native.linear_logprobs_forward(h, w, b, t, 1.0, 0.5, 4.0, -100, True, 16, 64)
        _, _, _, dh, dw, db = torch.ops.grao_native.linear_logprobs_grad(
            h, w, b, t, c, ec, lse, ent, 1.0, 0.5, 4.0, -100, True, False, True, 16, 64
        )
        return (logp * 2).sum() + ent.sum(), dh.sum() + dw.numel() + db.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, expected = compiled(h, w, b, t, c, ec), f(h, w, b, t, c, ec)
    for a, e in zip(got, expected):
        assert_close(a, e, rtol=1e-6, atol=1e-6, name="compiled")


def test_opcheck_schema_and_fake_implementations(ops):
    h, w, b, t, c, ec = (x.float() if x.is_floating_point() else x for x in make_case(9, 8, 40, bias=True))
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(
        ops.linear_logprobs_forward.default, (h, w, b, t, 1.0, 1.0, None, -100, True, 4, 16), test_utils=utils
    )
    torch.library.opcheck(
        ops.linear_logprobs_grad.default,
        (h, w, None, t, c, None, None, None, 1.0, 1.0, None, -100, True, True, True, 4, 16),
        test_utils=utils,
    )
    _, lse, ent = ops.linear_logprobs_forward(h, w, b, t, 0.9, 1.0, 2.0, -100, True, 4, 16)
    torch.library.opcheck(
        ops.linear_logprobs_grad.default,
        (h, w, b, t, c, ec, lse, ent, 0.9, 1.0, 2.0, -100, False, True, False, 4, 16),
        test_utils=utils,
    )


def test_op_errors_are_readable(ops):
    h, w = torch.randn(4, 8), torch.randn(10, 6)
    t = torch.zeros(4, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"hidden \[4, 8\] has H=8 but weight \[10, 6\] has H=6"):
        ops.linear_logprobs_forward(h, w, None, t, 1.0, 1.0, None, -100, False, 4, 4)
    with pytest.raises(RuntimeError, match=r"targets hold ids in \[0, 12\], outside \[0, V=10\)"):
        ops.linear_logprobs_forward(
            h, torch.randn(10, 8), None, torch.tensor([0, 12, -100, 3]), 1.0, 1.0, None, -100, False, 4, 4
        )
    with pytest.raises(RuntimeError, match=r"softcap must be None or finite and > 0"):
        ops.linear_logprobs_forward(h, torch.randn(10, 8), None, t, 1.0, 1.0, -1.0, -100, False, 4, 4)
    with pytest.raises(RuntimeError, match=r"coef must have shape \(4,\)"):
        ops.linear_logprobs_grad(
            h,
            torch.randn(10, 8),
            None,
            t,
            torch.ones(3),
            None,
            None,
            None,
            1.0,
            1.0,
            None,
            -100,
            True,
            True,
            True,
            4,
            4,
        )


@pytest.mark.parametrize("V,H", [(65536, 256), (151936, 1024), (16384, 256), (1000, 64)])
@pytest.mark.parametrize("budget_mib", [1, 64, 256, 4096])
def test_plan_blocks_fill_the_budget_within_the_row_bounds(V, H, budget_mib):
    # The one-sweep working memory is a rows x V float32 block of logits plus
    # 16 rows x H float32 dh partials: as many rows (a multiple of 16) as the
    # budget holds, clamped to [_MIN_ROWS, _MAX_ROWS].
    budget = budget_mib * 2**20
    rows, tile = native_backend.plan_blocks(V, H, one_sweep=True, budget=budget)
    lo, hi = native_backend._MIN_ROWS, native_backend._MAX_ROWS
    per_row = 4 * (V + 16 * H)
    assert rows % 16 == 0 and lo <= rows <= hi and tile == settings.native_tile_vocab
    assert rows == lo or rows * per_row <= budget
    assert rows == hi or (rows + 16) * per_row > budget


def test_build_dir_follows_the_setting(monkeypatch, tmp_path):
    """``settings.native_build_dir`` (``$GRAO_KERNELS_BUILD_DIR`` at import) is where the library is looked up and
    built; without it, the user's cache directory."""
    monkeypatch.setattr(settings, "native_build_dir", str(tmp_path / "builds"))
    assert native_backend.build_dir() == tmp_path / "builds"
    monkeypatch.setattr(settings, "native_build_dir", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert native_backend.build_dir() == tmp_path / "cache" / "grao_kernels"


def _run_python(code: str, env_update: dict[str, str]) -> dict:
    env = {**os.environ, **env_update}
    env.pop("GRAO_KERNELS_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_HASH_OUTPUTS = """
    import hashlib, json, torch
    from grao_kernels import grao_loss
    from grao_kernels.backends import native_backend
    torch.set_num_threads(int(__import__("os").environ["THREADS"]))
    g = torch.Generator().manual_seed(0)
    S, T, H, V = 12, 100, 64, 3000  # 1200 rows, 1024-row blocks at V = 3000
    h = torch.randn(S, T, H, generator=g).requires_grad_()
    w = (torch.randn(V, H, generator=g) / 8).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_()
    t = torch.randint(0, V, (S, T), generator=g)
    t[:, :3] = -100
    r = torch.randn(4, 3, generator=g)
    assert native_backend.plan_blocks(V, H, one_sweep=True, budget=native_backend.DEFAULT_BUDGET)[0] == 1024
    out = grao_loss(h, w, t, r, group_size=2, bias=b, softcap=5.0, backend="native")
    out.loss.backward()
    tensors = [out.loss.detach(), out.seq_logp, h.grad, w.grad, b.grad]
    print(json.dumps([hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest() for x in tensors]))
"""


def test_results_are_bitwise_identical_across_processes_and_thread_counts(ops):
    # The public loss and its gradients, in fresh processes with one and two
    # threads; the second lets MKL nest threads inside ATen's region, which
    # the kernels' one-BLAS-thread pin must neutralise.
    nested = {"MKL_DYNAMIC": "FALSE", "OMP_MAX_ACTIVE_LEVELS": "2"}
    build = {"GRAO_KERNELS_BUILD_DIR": str(native_backend.build_dir())}
    one = _run_python(_HASH_OUTPUTS, {**build, "THREADS": "1"})
    two = _run_python(_HASH_OUTPUTS, {**build, "THREADS": "2", **nested})
    again = _run_python(_HASH_OUTPUTS, {**build, "THREADS": "2"})
    names = ("loss", "seq_logp", "dhidden", "dweight", "dbias")
    assert one == two == again, [n for n, a, b, c in zip(names, one, two, again) if not a == b == c]

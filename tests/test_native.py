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

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ops():
    reason = native_backend.unavailable_reason(torch.device("cpu"))
    if reason is not None:
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            pytest.skip(f"native backend unavailable: {reason}")
        pytest.fail(f"a C++ compiler is present but the native backend is unavailable: {reason}")
    return native_backend.ops()


def make_case(N, H, V, *, bias, ignore_every=3, dtype=torch.float32):
    h = torch.randn(N, H, dtype=torch.float64)
    w = torch.randn(V, H, dtype=torch.float64) / H**0.5 * 2
    b = torch.randn(V, dtype=torch.float64) if bias else None
    t = torch.randint(0, V, (N,))
    if ignore_every:
        t[::ignore_every] = -100
    c = torch.randn(N, dtype=torch.float64)
    # The oracle sees exactly the (rounded) inputs the kernel sees.
    h, w = h.to(dtype).double(), w.to(dtype).double()
    b = None if b is None else b.to(dtype).double()
    return h, w, b, t, c


def oracle(h, w, b, t, c, temperature):
    """float64 logp, lse and gradients of sum_t c_t logp_t (eager, full logits)."""
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    z = h @ w.T
    if b is not None:
        z = z + b
    z = z / temperature
    valid = t != -100
    lse = torch.where(valid, z.logsumexp(-1), 0.0)
    logp = torch.where(valid, z.log_softmax(-1).gather(1, torch.where(valid, t, 0)[:, None])[:, 0], 0.0)
    (c * logp).sum().backward()
    return logp.detach(), lse.detach(), h.grad, w.grad, None if b is None else b.grad


def run_ops(ops, h, w, b, t, c, temperature, rows, tile, dtype=torch.float32):
    h, w = h.to(dtype), w.to(dtype)
    b = None if b is None else b.to(dtype)
    logp, lse = ops.linear_logprobs_forward(h, w, b, t, temperature, -100, rows, tile)
    g = ops.linear_logprobs_grad(h, w, b, t, c.float(), temperature, -100, None, rows, tile)
    g_lse = ops.linear_logprobs_grad(h, w, b, t, c.float(), temperature, -100, lse, rows, tile)
    return logp, lse, g, g_lse


def check_against_oracle(result, expected, *, rtol, atol, bias):
    logp, lse, g, g_lse = result
    e_logp, e_lse, e_dh, e_dw, e_db = expected
    assert_close(logp, e_logp, rtol=rtol, atol=atol, name="forward logp")
    assert_close(lse, e_lse, rtol=rtol, atol=atol, name="forward lse")
    for label, (lp, dh, dw, db) in (("one-sweep", g), ("given lse", g_lse)):
        assert_close(lp, e_logp, rtol=rtol, atol=atol, name=f"{label} logp")
        assert_close(dh, e_dh, rtol=rtol, atol=atol, name=f"{label} dhidden")
        assert_close(dw, e_dw, rtol=rtol, atol=atol, name=f"{label} dweight")
        if bias:
            assert_close(db, e_db, rtol=rtol, atol=atol, name=f"{label} dbias")
        else:
            assert db.numel() == 0


# (rows per block, vocab per tile): several row blocks and a ragged last tile,
# one row block with one tile, and tiles narrower than a vector register.
@pytest.mark.parametrize("rows,tile", [(16, 96), (512, 4096), (7, 5)])
@pytest.mark.parametrize("bias,temperature", [(False, 1.0), (True, 0.7)])
def test_ops_match_float64_at_block_and_tile_edges(ops, rows, tile, bias, temperature):
    h, w, b, t, c = make_case(70, 24, 1003, bias=bias)
    result = run_ops(ops, h, w, b, t, c, temperature, rows, tile)
    check_against_oracle(result, oracle(h, w, b, t, c, temperature), rtol=2e-5, atol=2e-5, bias=bias)


def test_bfloat16_inputs_accumulate_in_float32(ops):
    # The oracle gets the same bf16-rounded values in float64, so the only
    # error left is float32 accumulation: far below bf16 resolution.
    h, w, b, t, c = make_case(40, 32, 777, bias=True, dtype=torch.bfloat16)
    result = run_ops(ops, h, w, b, t, c, 1.3, 16, 128, dtype=torch.bfloat16)
    check_against_oracle(result, oracle(h, w, b, t, c, 1.3), rtol=2e-5, atol=2e-5, bias=True)
    assert all(x.dtype == torch.float32 for x in result[2][:3])


def test_one_and_two_threads_give_identical_results(ops):
    # Tiles are grouped into chunks independent of the thread count and summed
    # in chunk order, so the results are bitwise equal, not merely close.
    h, w, b, t, c = make_case(300, 48, 5000, bias=True)
    args = (h.float(), w.float(), b.float(), t, c.float(), 0.9, -100, None, 64, 256)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.linear_logprobs_grad(*args)
        torch.set_num_threads(2)
        two = ops.linear_logprobs_grad(*args)
    finally:
        torch.set_num_threads(before)
    for name, a, e in zip(("logp", "dhidden", "dweight", "dbias"), one, two):
        assert torch.equal(a, e), f"{name}: max difference {(a - e).abs().max().item():.3e}"


def test_non_contiguous_inputs_give_the_contiguous_result(ops):
    h, w, b, t, c = (x.float() if x.is_floating_point() else x for x in make_case(50, 16, 300, bias=True))
    # Strided views of the same values: a transposed hidden, every other
    # column of a wider weight, a strided bias, targets and coefficients.
    h_nc = h.T.contiguous().T
    w_wide = torch.zeros(300, 32)
    w_wide[:, ::2] = w
    w_nc = w_wide[:, ::2]
    b_nc = torch.stack([b, b], 1)[:, 0]
    t_nc = torch.stack([t, t], 1)[:, 0]
    c_nc = torch.stack([c, c], 1)[:, 0]
    assert not any(x.is_contiguous() for x in (h_nc, w_nc, b_nc, t_nc, c_nc))
    ref = ops.linear_logprobs_grad(h, w, b, t, c, 1.0, -100, None, 16, 64)
    got = ops.linear_logprobs_grad(h_nc, w_nc, b_nc, t_nc, c_nc, 1.0, -100, None, 16, 64)
    for name, a, e in zip(("logp", "dhidden", "dweight", "dbias"), got, ref):
        assert_close(a, e, rtol=1e-6, atol=1e-7, name=name)
    fwd = ops.linear_logprobs_forward(h_nc, w_nc, b_nc, t_nc, 1.0, -100, 16, 64)
    assert_close(fwd[0], ref[0], rtol=1e-6, atol=1e-7, name="forward logp")


def test_torch_compile_traces_the_ops_without_graph_breaks(ops):
    h, w, b, t, c = (x.float() if x.is_floating_point() else x for x in make_case(33, 16, 200, bias=True))

    def f(h, w, b, t, c):
        logp, lse = torch.ops.grao_native.linear_logprobs_forward(h, w, b, t, 1.0, -100, 16, 64)
        _, dh, dw, db = torch.ops.grao_native.linear_logprobs_grad(h, w, b, t, c, 1.0, -100, lse, 16, 64)
        return (logp * 2).sum(), dh.sum() + dw.sum() + db.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, expected = compiled(h, w, b, t, c), f(h, w, b, t, c)
    for a, e in zip(got, expected):
        assert_close(a, e, rtol=1e-6, atol=1e-6, name="compiled")


def test_opcheck_schema_and_fake_implementations(ops):
    h, w, b, t, c = (x.float() if x.is_floating_point() else x for x in make_case(9, 8, 40, bias=True))
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.linear_logprobs_forward.default, (h, w, b, t, 1.0, -100, 4, 16), test_utils=utils)
    torch.library.opcheck(
        ops.linear_logprobs_grad.default, (h, w, None, t, c, 1.0, -100, None, 4, 16), test_utils=utils
    )


def test_op_errors_are_readable(ops):
    h, w = torch.randn(4, 8), torch.randn(10, 6)
    with pytest.raises(RuntimeError, match=r"hidden \[4, 8\] has H=8 but weight \[10, 6\] has H=6"):
        ops.linear_logprobs_forward(h, w, None, torch.zeros(4, dtype=torch.long), 1.0, -100, 4, 4)
    with pytest.raises(RuntimeError, match=r"targets hold ids in \[0, 12\], outside \[0, V=10\)"):
        ops.linear_logprobs_forward(h, torch.randn(10, 8), None, torch.tensor([0, 12, -100, 3]), 1.0, -100, 4, 4)
    with pytest.raises(RuntimeError, match=r"coef must have shape \(4,\)"):
        ops.linear_logprobs_grad(
            h, torch.randn(10, 8), None, torch.zeros(4, dtype=torch.long), torch.ones(3), 1.0, -100, None, 4, 4
        )


def _run_python(code: str, env_update: dict[str, str]) -> dict:
    env = {**os.environ, **env_update}
    env.pop("GRAO_KERNELS_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_without_a_compiler_auto_warns_once_and_native_raises(tmp_path):
    out = _run_python(
        """
        import json, warnings
        import torch
        from grao_kernels import grao_loss
        h, w = torch.randn(2, 3, 8), torch.randn(20, 8)
        t, r = torch.randint(0, 20, (2, 3)), torch.randn(1, 2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            auto = grao_loss(h, w, t, r).loss
            again = grao_loss(h, w, t, r).loss
        ref = grao_loss(h, w, t, r, backend="torch").loss
        try:
            grao_loss(h, w, t, r, backend="native")
            err = None
        except ValueError as e:
            err = str(e)
        print(json.dumps({"warnings": [str(x.message) for x in caught if x.category is RuntimeWarning],
                          "same": bool(auto == ref) and bool(again == ref), "err": err}))
        """,
        {"CXX": "/nonexistent/c++", "GRAO_KERNELS_BUILD_DIR": str(tmp_path)},
    )
    assert len(out["warnings"]) == 1 and "'native' is unavailable" in out["warnings"][0], out
    assert "no C++ compiler" in out["warnings"][0]
    assert out["same"]
    assert out["err"] is not None and "backend 'native' cannot run" in out["err"] and "no C++ compiler" in out["err"]


def test_import_compiles_nothing(tmp_path):
    out = _run_python(
        """
        import json, os, sys
        import grao_kernels
        from grao_kernels.backends import native_backend
        print(json.dumps({"state": sorted(native_backend._state), "files": os.listdir(sys.argv[-1])
                          if os.path.isdir(sys.argv[-1]) else []}))
        """,
        {"GRAO_KERNELS_BUILD_DIR": str(tmp_path / "build")},
    )
    assert out == {"state": [], "files": []}


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("GRAO_KERNELS_TEST_COLD_BUILD") != "1",
    reason="compiles the extension twice from scratch; set GRAO_KERNELS_TEST_COLD_BUILD=1",
)
def test_concurrent_first_use_builds_share_one_cache(tmp_path):
    code = (
        "import torch\n"
        "from grao_kernels.backends import native_backend as nb\n"
        "print(nb.unavailable_reason(torch.device('cpu')))\n"
    )
    env = {**os.environ, "GRAO_KERNELS_BUILD_DIR": str(tmp_path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0 and stdout.strip() == "None", stderr[-3000:]
    assert len(list(tmp_path.glob("grao_native_*/grao_native_*.so"))) == 1

"""The memory probe (peak above the inputs of one call), fresh processes to run it in on CPU, and a command's peak
RSS (``command_peak_rss``)."""

from __future__ import annotations

import functools
import gc
import multiprocessing
import multiprocessing.forkserver
import os
import resource
import subprocess
import sys

import torch

from grao_kernels.testing import peak_meter

from .methods import METHODS, _settings, warm_up
from .oracle import sketch
from .shapes import Shape, make_inputs


def probe(key: str, op: str, shape: Shape, budget: int | None = None) -> dict:
    """Peak memory (``peak_meter``) above the inputs of one forward and of forward+backward, and the sketch."""
    m = METHODS[key]
    with _settings({} if budget is None else {"memory_budget": budget}):
        inp = make_inputs(shape)
        warm_up(m, op, shape, inp)  # autotuning, compilation and lazy imports stay out of the measurement
        gc.collect()
        peak = peak_meter(shape.device)
        value, loss = m.forward(inp, op)
        fwd = peak()
        dh, dw = m.backward(loss, inp)
        full = peak()
    grads = sum(inp[k].numel() * inp[k].element_size() for k in ("hidden", "weight"))
    fwd_working = fwd - (grads if m.grads_in_forward(op) else 0)
    return {
        "peak_forward": fwd,
        "peak_full": full,
        "grad_bytes": grads,
        # "working" leaves out the returned gradients, which every method allocates alike
        "working_forward": fwd_working,
        "working_full": max(fwd_working, full - grads),
        "logits_bytes": shape.N * shape.V * 4,
        "memory_method": "torch.cuda.max_memory_allocated" if shape.device != "cpu" else "RSS high-water mark",
        **sketch(value, dh, dw),
    }


def _child(conn, fn, args):
    try:
        torch.set_num_threads(int(os.environ.get("GRAO_BENCH_THREADS", torch.get_num_threads())))
        conn.send(("ok", fn(*args)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        import traceback

        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        conn.close()


@functools.cache
def _forkserver():
    # A fork server that has imported torch and the peers but never computed anything: each probe is a fresh
    # fork of it (no inherited allocations, thread pools or high-water mark) without paying the imports again.
    ctx = multiprocessing.get_context("forkserver")
    preload = ["torch", "torch._dynamo", "torch._inductor.compile_fx", "grao_kernels", "harness", "grao.train.trainer"]
    preload += ["cut_cross_entropy", "liger_kernel.chunked_loss", "trl.kernels.chunked_logprob", "trl.trainer.utils"]
    ctx.set_forkserver_preload(preload)
    # The server is a new interpreter that does not get this one's sys.path (Python < 3.13 ignores it): without
    # this, a checkout run without installing (benchmarks/gpu/check.py) would import another grao_kernels, or none.
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    return ctx


def fresh(what: str, fn, *args):
    """``fn(*args)`` (a module-level function) in a fresh fork of the fork server; its result or a RuntimeError."""
    ctx = _forkserver()
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, fn, args))
    p.start()
    child.close()
    try:
        status, res = parent.recv()
    except EOFError:
        status, res = "error", "the process died without a result (out of memory?)"
    p.join()
    if status != "ok":
        raise RuntimeError(f"{what} failed: {res}")
    return res


def _run_command(argv: list[str], env: dict | None) -> dict:
    # In a fresh fork whose only child is this command: RUSAGE_CHILDREN's high-water mark is the command's own.
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
    return {"returncode": proc.returncode, "peak_rss_bytes": peak_kib * 1024, "output": proc.stdout + proc.stderr}


def command_peak_rss(what: str, argv: list[str], env: dict | None = None) -> dict:
    """Run ``argv`` (a whole program: the CLI, a trainer) to completion; its return code, output and peak RSS (the
    process's high-water mark, from ``getrusage`` in a fresh fork that has no other child). A RuntimeError with
    the end of its output when it fails."""
    res = fresh(what, _run_command, argv, env)
    if res["returncode"] != 0:
        raise RuntimeError(f"{what} failed (exit {res['returncode']}):\n{res['output'][-4000:]}")
    return res

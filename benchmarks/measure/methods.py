"""Ours and the peers, one ``Method`` each in ``METHODS``; adding a peer or a mode is one entry.

Every method's ``fwd(inp, op) -> (value, loss)``: ``value`` is what is compared with the oracle (the log-probs for
the ``logprobs`` op, the loss otherwise; None when not comparable) and ``loss`` the scalar whose gradients (dH, dW)
are taken. Log-prob methods are trained on ``sum_t coef_t logp_t`` with the GRAO token coefficients, so every op
has the same gradients and one float64 oracle serves them all.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import grao_kernels
from grao_kernels import backends as gk_backends
from grao_kernels.testing import reference_grao, reference_linear_loss, reference_logprobs

from .device import sync
from .shapes import BETA, LAM, OPS, K, Shape, make_inputs


@dataclass(frozen=True)
class Method:
    key: str  # stable id: test ids, JSON, command lines
    label: str  # row label in the tables
    ops: tuple[str, ...]
    fwd: Callable  # (method, inp, op) -> (value or None, scalar loss)
    kind: str = "peer"  # "ours" or "peer"
    skip: Callable = lambda m, shape: None  # (method, shape) -> reason or None
    backend: str | None = None  # None for "naive": the eager reference
    settings: dict = field(default_factory=dict)  # grao_kernels.settings attributes set around each call
    needs: str | None = None  # the peer's module: the method is skipped when it cannot be imported

    def skip_reason(self, shape: Shape, op: str) -> str | None:
        if op not in self.ops:
            return f"{self.label} has no {op} op"
        return self.skip(self, shape) or (import_error(self.needs) if self.needs else None)

    def forward(self, inp: dict, op: str):
        with _settings(self.settings):
            return self.fwd(self, inp, op)

    def backward(self, loss: torch.Tensor, inp: dict):
        with _settings(self.settings):
            return torch.autograd.grad(loss, (inp["hidden"], inp["weight"]))

    def run(self, inp: dict, op: str):
        """(value, dH, dW)."""
        value, loss = self.forward(inp, op)
        return (value, *self.backward(loss, inp))

    def grads_in_forward(self, op: str) -> bool:
        """grao_loss, linear_logprob_loss and Liger's GRPO loss hold the finished gradients from their forward."""
        return op != "logprobs" and self.key != "naive"


def import_error(module: str, extra: str = "bench") -> str | None:
    """Why ``module`` cannot be imported (any failure disables what needs it, with its message), or None."""
    try:
        __import__(module)
    except Exception as exc:  # noqa: BLE001
        return f"{module} is not importable ({type(exc).__name__}: {exc}); install the {extra} extra"
    return None


@contextlib.contextmanager
def _settings(values: dict):
    saved = {k: getattr(grao_kernels.settings, k) for k in values}
    for k, v in values.items():
        setattr(grao_kernels.settings, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(grao_kernels.settings, k, v)


def _weighted(logp, inp):
    return logp.detach().float(), (inp["coef"] * logp.float()).sum()


def _ours_fwd(m: Method, inp: dict, op: str):
    """grao_kernels on ``m.backend``, or the eager reference (``grao_kernels.testing``, full logits) when it is None."""
    h, w, t, S, T, naive = inp["hidden"], inp["weight"], inp["targets"], inp["S"], inp["T"], m.backend is None
    if op == "logprobs":
        lp = reference_logprobs(h, w, t) if naive else grao_kernels.fused_linear_logprobs(h, w, t, backend=m.backend)
        return _weighted(lp, inp)
    if op == "grao":
        args, kw = (h.view(S, T, -1), w, t.view(S, T), inp["rewards"]), dict(beta=BETA, lam=LAM)
        if naive:
            loss = reference_grao(*args, **kw)["loss"]
        else:
            loss = grao_kernels.grao_loss(*args, group_size=K - 1, **kw, backend=m.backend).loss
    else:
        args, kw = (h, w, t, inp["coef"]), dict(entropy_coef=inp["ent_coef"])
        if naive:
            loss = reference_linear_loss(*args, **kw)
        else:
            loss = grao_kernels.linear_logprob_loss(*args, **kw, backend=m.backend).loss
    return loss.detach().float().reshape(1), loss


def _ours_skip(m: Method, shape: Shape) -> str | None:
    reason = gk_backends.unavailable_reason(m.backend, torch.device(shape.device))
    if reason is not None:
        return f"backend {m.backend!r} unavailable on {shape.device}: {reason}"
    if m.backend == "triton" and shape.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "the Triton backend on CPU tensors runs under the Triton interpreter, a debugging tool"
    return None


def _cce(m: Method, inp: dict, op: str, **kw):
    """Cut Cross-Entropy as it ships: its kernel skips the gradient blocks whose softmax is below the dtype's
    resolution (``filter_eps="auto"``, its default)."""
    from cut_cross_entropy import linear_cross_entropy

    # On CPU only the torch.compile implementation runs, and it materialises the logits. Compile one
    # shape-generic graph instead of one per shape (each costs seconds of C++ build on CPU).
    impl = "cce" if inp["hidden"].is_cuda else "torch_compile"
    if impl == "torch_compile":
        torch._dynamo.config.assume_static_by_default = False
    nll = linear_cross_entropy(inp["hidden"], inp["weight"], inp["targets"], reduction="none", impl=impl, **kw)
    return _weighted(-nll, inp)


def _cce_unfiltered(m: Method, inp: dict, op: str):
    """Cut Cross-Entropy computing every gradient block (``filter_eps=None``), as the logits-free methods here do."""
    return _cce(m, inp, op, filter_eps=None)


def _cce_unfiltered_skip(m: Method, shape: Shape) -> str | None:
    if shape.device == "cpu":
        return "gradient filtering is part of Cut Cross-Entropy's GPU kernel; on CPU it has none to turn off"
    return None


TRL_CHUNK = 32768  # TRL's trainer calls the function with this chunk (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE)


def _trl(m: Method, inp: dict, op: str):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    h, t, valid = inp["hidden"], inp["targets"], inp["valid"]
    if inp.get("any_ignored"):  # TRL takes valid rows only
        h, t = h[valid], t[valid]
    # (hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs): log-probs only.
    lp = ChunkedLogProbFunction.apply(h, inp["weight"], None, t, 1.0, TRL_CHUNK, None, 1.0, ())[0]
    if inp.get("any_ignored"):
        lp = torch.zeros(valid.shape, device=lp.device, dtype=lp.dtype).masked_scatter(valid, lp)
    return _weighted(lp, inp)


def _liger_flce(m: Method, inp: dict, op: str):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    nll = liger_fused_linear_cross_entropy(inp["hidden"], inp["weight"], inp["targets"], reduction="none")
    return _weighted(-(nll[0] if isinstance(nll, tuple) else nll), inp)


def _liger_flce_skip(m: Method, shape: Shape) -> str | None:
    if shape.device == "cpu":
        return "Liger's fused linear cross-entropy is a Triton kernel, which cannot run on CPU"
    return None


@functools.cache
def _liger_grpo_module(compiled: bool, S: int):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    # loss_type="grpo" averages each sequence over its tokens then over sequences, as GRAO's J does; no KL, no ref.
    # chunk_size: sequences per chunk. Liger's default of 1 re-accumulates a full (V, H) weight gradient per
    # sequence, 5x slower on CPU at these shapes; one chunk for the batch is its best configuration here.
    return LigerFusedLinearGRPOLoss(beta=0.0, compiled=compiled, use_ref_model=False, loss_type="grpo", chunk_size=S)


def _liger_grpo(m: Method, inp: dict, op: str):
    """Liger's GRPO loss with advantages ``A_s = -S c(s)``: gradient-equivalent to GRAO (its loss value is not).

    Without an old policy the importance ratio is exp(logp - logp.detach()) = 1, so the GRPO loss
    ``sum_s sum_t -A_s ratio_t / (n_s S)`` has d/d logp_t = -A_s / (n_s S) = c(s) / n_s, GRAO's coefficient.
    """
    S, T = inp["S"], inp["T"]
    # torch.compile of the loss maths would add a C++ build per shape on CPU; compiled on GPU (Liger's default).
    mod = _liger_grpo_module(inp["hidden"].is_cuda, S)
    safe = inp["targets"].clamp(min=0).view(S, T)
    loss, _ = mod(inp["hidden"].view(S, T, -1), inp["weight"], safe, inp["liger_mask"], inp["liger_adv"])
    return None, loss


def _ours(backend: str, mode: str | None = None, **knobs) -> Method:
    """grao_kernels on one backend (and, for triton, one ``settings.triton_mode``), with ``knobs`` set in
    ``grao_kernels.settings`` while it runs."""
    key, label = (f"{backend}-{mode}", f"{backend}, {mode}") if mode else (backend, backend)
    extra = {"triton_mode": mode, **knobs} if mode else dict(knobs)
    return Method(f"grao_kernels[{key}]", f"grao_kernels ({label})", OPS, _ours_fwd, "ours", _ours_skip, backend, extra)


LF = "liger_kernel.transformers.functional"
# Adding a peer or a mode is one entry here.
METHODS: dict[str, Method] = {
    m.key: m
    for m in [
        _ours("torch"),
        _ours("native"),
        # Every sweep at the same working-memory budget: the call's, else settings.memory_budget, else the
        # backend's default (1 GiB); the GPU check sets one budget for every grao_kernels method.
        _ours("triton", "chunked"),
        _ours("triton", "fused"),
        _ours("triton", "epilogue"),
        Method("naive", "naive PyTorch (eager, full logits)", OPS, _ours_fwd),
        Method("cce", "Cut Cross-Entropy (gradient filtering)", ("logprobs",), _cce, needs="cut_cross_entropy"),
        Method(
            "cce_nofilter",
            "Cut Cross-Entropy (no gradient filtering)",
            ("logprobs",),
            _cce_unfiltered,
            skip=_cce_unfiltered_skip,
            needs="cut_cross_entropy",
        ),
        Method("trl", "TRL chunked log-prob", ("logprobs",), _trl, needs="trl.kernels.chunked_logprob"),
        Method("liger_flce", "Liger fused linear CE", ("logprobs",), _liger_flce, skip=_liger_flce_skip, needs=LF),
        Method("liger_grpo", "Liger fused linear GRPO", ("grao",), _liger_grpo, needs="liger_kernel.chunked_loss"),
    ]
}


def methods_for(op: str) -> list[Method]:
    return [m for m in METHODS.values() if op in m.ops]


def warm_up(m: Method, op: str, shape: Shape, inp: dict | None = None) -> None:
    """Untimed and unmeasured calls: thread pools, lazy imports and compilation happen in one on a tiny problem;
    on a GPU, one more on ``inp`` (the measured inputs at ``shape``, when given) runs the autotuners, which key on the
    shape and allocate while they try configurations."""
    tiny = make_inputs(Shape(shape.device, K * 2 * 8, 512, 64, shape.dtype), seed=1)
    m.run(tiny, op)
    if inp is not None and shape.device != "cpu":
        m.run(inp, op)
    sync(shape.device)

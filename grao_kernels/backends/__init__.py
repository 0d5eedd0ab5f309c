"""Backend registry and the contract every backend implements.

A backend is a module in this package (``<name>_backend.py``) exposing three
functions. Every array argument arrives 2-D/1-D and contiguous from the
autograd layer; no backend validates user input (``api.py`` does) and no
backend imports ``grao_kernels.testing``.

The logits of a head (:class:`Head`)::

    raw = hidden @ weight.T + bias                       # (N, V), never allocated at full size
    u   = logit_scale * raw
    u   = softcap * tanh(u / softcap)                    # only when softcap is not None
    z   = u / temperature
    lse = logsumexp(z);  logp = z[target] - lse;  p = softmax(z)
    ent = lse - sum_j p_j z_j                            # entropy of softmax(z)

``unavailable_reason(device: torch.device) -> str | None``
    ``None`` when the backend can run on tensors of ``device``, otherwise a
    sentence saying why not.

``forward(hidden, weight, bias, targets, head, ignore_index, *, entropy, budget) -> Stats``
    ``hidden`` (N, H), ``weight`` (V, H), ``bias`` (V,) or None, ``targets`` (N,)
    int64. ``Stats(logp, lse, entropy)``: (N,) float32 each, 0 at rows whose
    target is ``ignore_index``; ``entropy`` is None unless ``entropy=True``.

``grad(hidden, weight, bias, targets, head, ignore_index, *, coef, ent_coef, stats, needs, budget)``
    The statistics plus the gradients of

        L = sum_t coef[t] * logp[t] + sum_t ent_coef[t] * ent[t]

    (``coef`` (N,) float32; ``ent_coef`` (N,) float32 or None for no entropy
    term) with respect to hidden, weight and bias. Returns ``(stats, dhidden,
    dweight, dbias)``; ``stats.entropy`` is computed when ``ent_coef`` is
    given. ``needs`` is a 3-tuple of bools (hidden, weight, bias): a gradient
    not needed is returned as None and should cost nothing (a frozen lm_head
    skips the dW product). ``dbias`` is None without a bias. Gradients are
    float32 or the input's dtype (accumulated in float32 either way).
    ``stats``: a ``Stats`` from an earlier forward of the same inputs (its
    ``lse``, and its ``entropy`` when ``ent_coef`` is given), or None; with it
    the backend may skip recomputing them. The chain rule through the head::

        g_z  = coef (onehot(target) - p) - ent_coef p (z - lse + ent)
        g_u  = g_z / temperature * (1 - (temperature z / softcap)^2 if softcap else 1)
        g_raw = logit_scale * g_u
        dhidden = g_raw @ weight;  dweight = g_raw.T @ hidden;  dbias = g_raw.sum(0)

``budget``: the working memory, in bytes, the call may allocate beyond its
inputs and returned gradients (``settings.budget(per_call, DEFAULT_BUDGET)``
resolves it in ``api.py``); each backend also exports ``DEFAULT_BUDGET``.

``workspace_bytes(rows, V, H, *, hidden_dtype, weight_dtype, bias, head, entropy, grad, needs, stats, budget) -> int``
    The working memory one call allocates beyond its inputs and what it
    returns, from the shapes alone (``rows``: the non-ignored rows), so that
    a planner can size a step without running it: :func:`workspace_bytes`
    dispatches on the backend's name.

Numerics shared by every backend: every softmax statistic in float32, every
GEMM accumulated in float32; a vocabulary entry whose logit is -inf (a -inf
bias masks it) has probability exactly 0 and never produces a NaN, also when
a whole tile, split or row block of the vocabulary is masked (the running
max is guarded as in FlashAttention). Autocast is ignored: each backend
computes from the tensors as given (``api.py`` disables autocast around the
call), and README's "Precision" paragraph says which dtype each backend's
GEMMs use.

The GRAO coefficients (group statistics, per-sequence and per-token
coefficients) are not part of the contract: ``api.grao_coefficients`` is their
one definition, in PyTorch, for every backend.

``_functions.py`` calls ``forward``/``grad`` through the ``grao_kernels::``
custom ops (generic over the backend name, with fake implementations), so
``torch.compile`` never traces a backend's Python.

Backends are imported lazily so that an optional dependency (Triton, a C++
compiler) that is missing only disables its own backend.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import NamedTuple

import torch

from ..settings import settings


class Head(NamedTuple):
    """How logits are formed from ``hidden @ weight.T + bias`` (see the module docstring)."""

    temperature: float = 1.0
    logit_scale: float = 1.0
    softcap: float | None = None


class Stats(NamedTuple):
    """Per-row statistics of a sweep: (N,) float32 each, 0 at ignored rows."""

    logp: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor | None = None


BACKENDS = ("torch", "triton", "native")
# Order in which backend="auto" tries backends, per device type.
_AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("native", "torch")}

_modules: dict[str, ModuleType | Exception] = {}


def _module(name: str) -> ModuleType | Exception:
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"{__name__}.{name}_backend")
        except ImportError as exc:  # optional dependency missing
            _modules[name] = exc
    return _modules[name]


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device``, or None when it can."""
    mod = _module(name)
    if isinstance(mod, Exception):
        return f"it could not be imported ({mod})"
    return mod.unavailable_reason(device)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on tensors of ``device``."""
    device = torch.device(device)
    return [name for name in BACKENDS if unavailable_reason(name, device) is None]


def _auto_order(device: torch.device) -> tuple[str, ...]:
    # The Triton interpreter can run CPU tensors, but it is a debugging tool:
    # auto never picks triton for CPU tensors.
    return _AUTO_ORDER.get(device.type, ("torch",))


def resolve(backend: str, device: torch.device) -> ModuleType:
    """The backend module for ``backend`` ("auto" or a name) on ``device``.

    A backend asked for by name that cannot run raises ValueError naming the
    available ones; there is no silent fallback.
    """
    return module(resolve_name(backend, device))


def resolve_name(backend: str, device: torch.device) -> str:
    """The name of the backend :func:`resolve` returns."""
    if not isinstance(backend, str):
        raise ValueError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        forced = settings.backend
        if forced:
            return resolve_name(forced, device)
        for name in _auto_order(device):
            if unavailable_reason(name, device) is None:
                _warn_auto_fallback(name, device)
                return name
        raise ValueError(f"no backend can run on device {device}")
    if backend not in BACKENDS:
        raise ValueError(
            f"backend must be 'auto' or one of {list(BACKENDS)}, got {backend!r}; "
            f"available on {device}: {available_backends(device)}"
        )
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise ValueError(
            f"backend {backend!r} cannot run on {device} tensors: {reason}. "
            f"Available on {device}: {available_backends(device)}"
        )
    return backend


def workspace_bytes(backend: str, rows: int, V: int, H: int, **call) -> int:
    """The working memory, in bytes, one call of backend ``backend`` (a name, not "auto") allocates beyond its inputs
    and outputs at ``rows`` non-ignored rows, vocabulary ``V`` and hidden size ``H``; ``call`` as in the contract
    (hidden_dtype, weight_dtype, bias, head, entropy, grad, needs, stats, budget). Imports the backend, builds or
    compiles nothing."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    for name, value in (("rows", rows), ("V", V), ("H", H)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return module(backend).workspace_bytes(rows, V, H, **call)


def module(name: str) -> ModuleType:
    """The module of backend ``name`` (already known to be importable, e.g. from :func:`resolve_name`)."""
    mod = _module(name)
    if isinstance(mod, Exception):
        raise ValueError(f"backend {name!r} could not be imported ({mod})")
    return mod


_warned: set[tuple[str, str]] = set()


def _warn_auto_fallback(chosen: str, device: torch.device) -> None:
    """Warn once when auto settles for a slower backend than the preferred one."""
    preferred = _auto_order(device)[0]
    if chosen == preferred or (preferred, device.type) in _warned:
        return
    _warned.add((preferred, device.type))
    import warnings

    warnings.warn(
        f"grao_kernels: backend 'auto' uses {chosen!r} on {device.type} because "
        f"{preferred!r} is unavailable: {unavailable_reason(preferred, device)}",
        RuntimeWarning,
        stacklevel=4,
    )

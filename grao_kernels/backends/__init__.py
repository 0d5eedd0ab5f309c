"""Backend registry.

A backend is a module in this package exposing:

``unavailable_reason(device: torch.device) -> str | None``
    ``None`` when the backend can run on tensors of ``device``, otherwise a
    sentence saying why not.

``linear_logprobs_forward(hidden, weight, bias, targets, temperature, ignore_index)``
    ``hidden`` (N, H), ``weight`` (V, H), ``bias`` (V,) or None, ``targets`` (N,)
    int64. Returns ``(logp, lse)``, both (N,) float32: ``log_softmax(z)[target]``
    and ``logsumexp(z)`` per row with ``z = (hidden @ weight.T + bias) /
    temperature``; both are 0 at rows whose target is ``ignore_index``.

``linear_logprobs_grad(hidden, weight, bias, targets, coef, temperature, ignore_index, lse=None)``
    The same log-probs plus the gradients of ``sum_t coef[t] * logp[t]`` with
    respect to hidden, weight and bias, shaped like them, each in float32 or in
    its input's dtype (accumulated in float32 either way; a backend that can
    write a gradient in the input dtype directly saves the float32 copy)
    (``dbias`` is None without a bias). ``lse`` from an earlier forward lets the
    backend skip recomputing it. Returns ``(logp, dhidden, dweight, dbias)``.

Optional hooks, each replacing one small step of ``grao_loss`` (the PyTorch
versions in ``grao_kernels.api`` are used otherwise, and define the semantics):
``group_advantages(rewards, eps)``, ``token_coefficients(adv, targets,
ignore_index, beta, lam)`` and ``sequence_logp(logp, n)``.

Backends are imported lazily so that an optional dependency (Triton, a C++
compiler) that is missing only disables its own backend.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

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
    if not isinstance(backend, str):
        raise ValueError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        forced = os.environ.get("GRAO_KERNELS_BACKEND")
        if forced:
            return resolve(forced, device)
        for name in _auto_order(device):
            if unavailable_reason(name, device) is None:
                mod = _module(name)
                _warn_auto_fallback(name, device)
                return mod
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
    return _module(backend)


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

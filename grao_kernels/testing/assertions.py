"""Comparisons of a result against an oracle, reporting how far off it is and where."""

from __future__ import annotations

import torch


def rel_l2(actual, expected) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (the absolute norm when ``expected`` is zero).

    Tensors or anything ``torch.as_tensor`` takes (numpy arrays), on any device.
    """
    a = torch.as_tensor(actual).detach().double().cpu()
    e = torch.as_tensor(expected).detach().double().cpu()
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff if denom == 0 else diff / denom


def assert_close(actual, expected, *, rtol, atol, name="tensor"):
    """Element-wise check that reports how many elements mismatch and the worst one."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    if not torch.isfinite(a).all():
        raise AssertionError(f"{name}: {int((~torch.isfinite(a)).sum())} non-finite elements")
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    if bad.any():
        idx = int(err.argmax())
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), a.shape)) if a.dim() else ()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.numel()} elements differ beyond atol={atol}, rtol={rtol}; "
            f"worst at {where}: {a.flatten()[idx].item():.8g} vs {e.flatten()[idx].item():.8g}"
        )


def assert_within_torch_error(actual, oracle, torch_same_dtype, *, factor, floor, name="tensor"):
    """The error of ``actual`` against the float64 ``oracle`` is at most ``factor`` times PyTorch's own error in the
    same dtype (``torch_same_dtype``: the eager computation in that dtype) plus ``floor`` relative L2."""
    err = rel_l2(actual, oracle)
    torch_err = rel_l2(torch_same_dtype, oracle)
    if not err <= factor * torch_err + floor:
        raise AssertionError(
            f"{name}: relative L2 error {err:.3e} exceeds {factor} x PyTorch's own {torch_err:.3e} + {floor:.1e}"
        )

"""The float64 oracle as sketches: what the gate compares, without any (N, V) float64 buffer."""

from __future__ import annotations

import torch

from grao_kernels.testing import reference_linear_loss, reference_logprobs

from .shapes import Shape, make_inputs


def sketch(value, dh, dw) -> dict:
    """Comparable summary: the value, and dH u, dW u for a fixed random u (H,).

    For a Gaussian u, E|E u|^2 = |E|_F^2 for any matrix E, so the relative L2 error of ``X u`` estimates that of X
    (over N, resp. V, entries); a wrong entry changes it unless orthogonal to u: probability 0.
    """
    gen = torch.Generator(device=dh.device).manual_seed(1234)
    u = torch.randn(dh.shape[-1], 1, generator=gen, device=dh.device, dtype=torch.float64)
    return {
        "value": None if value is None else value.double().cpu().numpy(),
        "dh": (dh.reshape(-1, u.shape[0]).double() @ u).reshape(-1).cpu().numpy(),
        "dw": (dw.double() @ u).reshape(-1).cpu().numpy(),
    }


def oracle(shape: Shape, op: str, dtype: str = "float64") -> dict:
    """Sketch of ``op`` by ``grao_kernels.testing`` in row chunks (no (N, V) float64 exists), computed in ``dtype``.

    float64: the truth. The inputs' dtype: eager PyTorch's own rounding (logits GEMM in that dtype, softmax in
    float32, gradients returned in that dtype), the gate's yardstick, without the full logits' memory.
    """
    inp, dt = make_inputs(shape), getattr(torch, dtype)
    h, t, ent = inp["hidden"].detach(), inp["targets"], inp["ent_coef"] if op == "entropy" else None
    w = inp["weight"].detach().to(dt).requires_grad_(True)
    rows = max(1, (2 << 30 if shape.device == "cuda" else 256 << 20) // (8 * shape.V))
    logp, dh, dw, loss = [], [], torch.zeros(w.shape, dtype=torch.float64, device=w.device), 0.0
    for r in range(0, shape.N, rows):
        hc = h[r : r + rows].to(dt, copy=True).requires_grad_(True)
        sl = slice(r, r + rows)
        part = reference_linear_loss(hc, w, t[sl], inp["coef"][sl], entropy_coef=None if ent is None else ent[sl])
        g_h, g_w = torch.autograd.grad(part, (hc, w))
        dh.append(g_h)
        dw += g_w
        loss += part.item()
        if op == "logprobs":
            with torch.no_grad():
                logp.append(reference_logprobs(hc, w, t[sl]))
    value = torch.cat(logp) if op == "logprobs" else torch.tensor([loss], dtype=torch.float64)
    return sketch(value, torch.cat(dh), dw.to(dt))

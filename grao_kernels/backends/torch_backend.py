"""Pure-PyTorch backend: blocked over rows (and the vocabulary when needed).

Equivalent eager code (what this never allocates at full size)::

    z = (hidden.float() @ weight.float().T + bias) / temperature   # (N, V)
    logp = z.log_softmax(-1).gather(-1, targets[:, None])[:, 0]

Only rows whose target is not ``ignore_index`` are touched. The rows are
processed in blocks of ``R`` rows, and when even a small block of rows times
the whole vocabulary would exceed the memory budget, the vocabulary is swept in
tiles of ``VT`` entries with an online log-sum-exp (pass 1) and the tiles are
recomputed for the gradient (pass 2). The budget bounds the working memory
beyond the inputs and the returned float32 gradients.
"""

from __future__ import annotations

import os

import torch

_DEFAULT_BUDGET = 64 * 2**20
_budget = int(float(os.environ.get("GRAO_KERNELS_TORCH_BUDGET_MB", 64)) * 2**20)

# A row block below this many rows makes the GEMMs inefficient; below it the
# vocabulary is tiled instead.
_MIN_ROWS = 16
_MAX_ROWS = 4096
_TILED_ROWS = 64


def set_memory_budget(nbytes: int) -> None:
    """Set the working-memory bound of the torch backend, in bytes (default 64 MiB)."""
    global _budget
    if int(nbytes) < 2**20:
        raise ValueError(f"memory budget must be at least 1 MiB, got {nbytes} bytes")
    _budget = int(nbytes)


def memory_budget() -> int:
    """The current working-memory bound of the torch backend, in bytes."""
    return _budget


def unavailable_reason(device: torch.device) -> str | None:
    return None


def plan_blocks(V: int, H: int, low_precision: bool, budget: int | None = None) -> tuple[int, int]:
    """(rows per block, vocabulary entries per tile) fitting in ``budget`` bytes.

    Per (row, vocab) element: one float32 logits buffer reused in place for the
    probabilities and dlogits, plus slack for GEMM workspace (6 bytes in all). Per
    row: the float32 hidden block and its dhidden block (8·H bytes). Per vocab
    entry of a tile, when the weight is not float32: its float32 copy (4·H).
    """
    # 10% + 1 MiB stay free for the O(N) vectors (coefficients, log-probs, row
    # indices) and BLAS scratch.
    budget = _budget if budget is None else budget
    budget = max(int(0.9 * budget) - 2**20, budget // 2)
    w_bytes = 4 * H * V if low_precision else 0
    rows = (budget - w_bytes) // (6 * V + 8 * H) if budget > w_bytes else 0
    if rows >= _MIN_ROWS:
        return int(min(rows, _MAX_ROWS)), V
    rows = _TILED_ROWS
    per_vocab = 6 * rows + (4 * H if low_precision else 0)
    vt = max((budget - 8 * H * rows) // per_vocab, 1)
    return rows, int(min(vt, V))


def _valid_rows(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return (targets != ignore_index).nonzero().squeeze(1)


def _tile(weight, bias, v0, v1):
    w = weight[v0:v1]
    if w.dtype != torch.float32:
        w = w.float()
    b = None if bias is None else bias[v0:v1].float()
    return w, b


def _logits(h, w, b, temperature):
    z = h @ w.T if b is None else torch.addmm(b, h, w.T)
    if temperature != 1.0:
        z.mul_(1.0 / temperature)
    return z


def _target_logit(h, weight, bias, tgt, temperature):
    # Indexed dot: the target logit without touching the other columns.
    z = (h * weight.index_select(0, tgt).float()).sum(1)
    if bias is not None:
        z = z + bias.index_select(0, tgt).float()
    return z / temperature


def _block_lse(h, weight, bias, temperature, vt):
    """Log-sum-exp over the vocabulary of one row block, sweeping tiles online."""
    V = weight.shape[0]
    m = torch.full((h.shape[0],), -float("inf"), device=h.device)
    s = torch.zeros_like(m)
    for v0 in range(0, V, vt):
        w, b = _tile(weight, bias, v0, min(v0 + vt, V))
        z = _logits(h, w, b, temperature)
        m_new = torch.maximum(m, z.amax(1))
        s = s * torch.exp(m - m_new) + z.sub_(m_new[:, None]).exp_().sum(1)
        m = m_new
        del z  # free the tile before the next one is allocated
    return m + torch.log(s)


def linear_logprobs_forward(hidden, weight, bias, targets, temperature, ignore_index):
    N, H = hidden.shape
    V = weight.shape[0]
    logp = hidden.new_zeros(N, dtype=torch.float32)
    lse = torch.zeros_like(logp)
    rows = _valid_rows(targets, ignore_index)
    R, VT = plan_blocks(V, H, weight.dtype != torch.float32)
    for r0 in range(0, rows.numel(), R):
        idx = rows[r0 : r0 + R]
        h = hidden.index_select(0, idx).float()
        tgt = targets.index_select(0, idx)
        blk_lse = _block_lse(h, weight, bias, temperature, VT)
        lse[idx] = blk_lse
        logp[idx] = _target_logit(h, weight, bias, tgt, temperature) - blk_lse
    return logp, lse


def linear_logprobs_grad(hidden, weight, bias, targets, coef, temperature, ignore_index, lse=None):
    """Log-probs and the gradients of ``sum_t coef[t] * logp[t]``.

    d logp_t / d z_t = onehot(target_t) - softmax(z_t), and z = (h W^T + b) / T,
    so with dz_t = coef_t (onehot - p_t) / T:
    dh = dz W, dW = dz^T h, db = sum_t dz_t.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    logp = hidden.new_zeros(N, dtype=torch.float32)
    dh = torch.zeros(N, H, dtype=torch.float32, device=hidden.device)
    dw = torch.zeros(V, H, dtype=torch.float32, device=hidden.device)
    db = None if bias is None else torch.zeros(V, dtype=torch.float32, device=hidden.device)
    rows = _valid_rows(targets, ignore_index)
    low_precision = weight.dtype != torch.float32
    R, VT = plan_blocks(V, H, low_precision)
    one_tile = VT == V
    if one_tile:
        w_full, b_full = _tile(weight, bias, 0, V)
    inv_t = 1.0 / temperature
    for r0 in range(0, rows.numel(), R):
        idx = rows[r0 : r0 + R]
        h = hidden.index_select(0, idx).float()
        tgt = targets.index_select(0, idx)
        c = coef.index_select(0, idx).float()
        zt = _target_logit(h, weight, bias, tgt, temperature)
        if one_tile:
            # The whole vocabulary fits: one GEMM for the logits, reused in
            # place for the probabilities and dlogits.
            z = _logits(h, w_full, b_full, temperature)
            if lse is None:
                m = z.amax(1)
                z.sub_(m[:, None]).exp_()
                s = z.sum(1)
                blk_lse = m + torch.log(s)
                z.div_(s[:, None])
            else:
                blk_lse = lse.index_select(0, idx)
                z.sub_(blk_lse[:, None]).exp_()
            # z now holds p; dz = coef * (onehot - p) / T
            z.mul_((-c * inv_t)[:, None])
            z.scatter_add_(1, tgt[:, None], (c * inv_t)[:, None])
            dh[idx] = z @ w_full
            dw.addmm_(z.T, h)
            if db is not None:
                db.add_(z.sum(0))
            del z  # free the block before the next one is allocated
        else:
            blk_lse = _block_lse(h, weight, bias, temperature, VT) if lse is None else lse.index_select(0, idx)
            dh_blk = torch.zeros_like(h)
            for v0 in range(0, V, VT):
                v1 = min(v0 + VT, V)
                w, b = _tile(weight, bias, v0, v1)
                z = _logits(h, w, b, temperature)
                z.sub_(blk_lse[:, None]).exp_().mul_((-c * inv_t)[:, None])
                local = tgt - v0
                hit = (local >= 0) & (local < v1 - v0)
                if bool(hit.any()):
                    r = hit.nonzero().squeeze(1)
                    z.index_put_((r, local[r]), (c * inv_t)[r], accumulate=True)
                dh_blk.addmm_(z, w)
                dw[v0:v1].addmm_(z.T, h)
                if db is not None:
                    db[v0:v1].add_(z.sum(0))
                del z  # free the tile before the next one is allocated
            dh[idx] = dh_blk
        logp[idx] = zt - blk_lse
    return logp, dh, dw, db

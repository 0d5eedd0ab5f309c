"""Pure-PyTorch backend: blocked over rows (and the vocabulary when needed).

Equivalent eager code (what this never allocates at full size), with the head
of ``backends/__init__.py``::

    z = head(hidden.float() @ weight.float().T + bias)              # (N, V)
    logp = z.log_softmax(-1).gather(-1, targets[:, None])[:, 0]

Only rows whose target is not ``ignore_index`` are touched. The rows are
processed in blocks of ``R`` rows, and when even a small block of rows times
the whole vocabulary would exceed the memory budget, the vocabulary is swept in
tiles of ``VT`` entries with an online softmax (pass 1: log-sum-exp and
entropy) and the tiles are recomputed for the gradient (pass 2). The budget
bounds the working memory beyond the inputs and the returned float32 gradients.

Every GEMM runs in float32 on the given values (a bfloat16 weight tile is
upcast exactly before its GEMM), whatever autocast says.
"""

from __future__ import annotations

import torch

from ..settings import settings
from . import Head, Stats

DEFAULT_BUDGET = 64 * 2**20

# A row block below this many rows makes the GEMMs inefficient; below it the
# vocabulary is tiled instead.
_MIN_ROWS = 16
_MAX_ROWS = 4096
_TILED_ROWS = 64

# A -inf logit (a vocabulary entry masked by a -inf bias) is clamped to this
# value: its exponential is still exactly 0 against any realistic row maximum,
# but a tile whose every entry is masked keeps a finite maximum, so the online
# softmax never computes -inf - (-inf) or 0 * -inf.
_MASKED_LOGIT = -1e30


def unavailable_reason(device: torch.device) -> str | None:
    return None


def plan_blocks(V: int, H: int, low_precision: bool, budget: int, buffers: int = 1) -> tuple[int, int]:
    """(rows per block, vocabulary entries per tile) fitting in ``budget`` bytes.

    Per (row, vocab) element: ``buffers`` float32 logits-sized buffers (one
    for the logits, reused in place for the probabilities and dlogits; one
    more for the log-probabilities of the entropy term, one more for the
    softcap derivative) plus 2 bytes of slack for GEMM workspace. Per row: the
    float32 hidden block and its dhidden block (8·H bytes). Per vocab entry of
    a tile, when the weight is not float32: its float32 copy (4·H).
    """
    # 10% + 4 MiB (at least a quarter of the budget) stay free for the O(N)
    # vectors (coefficients, log-probs, row indices) and the BLAS scratch: the
    # GEMMs pack panels of their tile operands, a few MB that does not shrink
    # with the tiles (tests/kernels/test_memory.py holds an 8 MiB budget to its bound).
    budget = max(int(0.9 * budget) - 4 * 2**20, budget // 4)
    per_elem = 4 * buffers + 2
    w_bytes = 4 * H * V if low_precision else 0
    rows = (budget - w_bytes) // (per_elem * V + 8 * H) if budget > w_bytes else 0
    if rows >= _MIN_ROWS:
        return int(min(rows, _MAX_ROWS)), V
    rows = _TILED_ROWS
    per_vocab = per_elem * rows + (4 * H if low_precision else 0)
    vt = max((budget - 8 * H * rows) // per_vocab, 1)
    return rows, int(min(vt, V))


def workspace_bytes(
    rows: int,
    V: int,
    H: int,
    *,
    hidden_dtype: torch.dtype = torch.float32,
    weight_dtype: torch.dtype | None = None,
    bias: bool = False,
    head: Head | None = None,
    entropy: bool = False,
    grad: bool = True,
    needs: tuple[bool, bool, bool] = (True, True, True),
    stats: bool = False,
    budget: int | None = None,
) -> int:
    """Bytes of working memory one call allocates beyond its inputs and what it returns (statistics, gradients).

    ``rows``: the rows whose target is not ignored; ``weight_dtype`` defaults to ``hidden_dtype``; ``grad``: the
    gradient sweep (else the forward); ``stats``: the gradient reuses a forward's statistics (this backend
    recomputes them either way); ``budget``: as resolved by ``settings.budget`` (None: the setting, else
    ``DEFAULT_BUDGET``). The blocks of :func:`plan_blocks`, as many rows as the call has: per row, the logits-sized
    float32 buffers and GEMM slack of each vocabulary entry of a tile and the float32 hidden row and its gradient;
    the float32 copy of a bfloat16/float16 weight (whole, or one tile); the index of the computed rows.
    """
    budget = settings.budget(budget, DEFAULT_BUDGET)
    head = head or Head()
    if rows <= 0 or V <= 0:
        return 0
    low = (weight_dtype or hidden_dtype) != torch.float32
    if grad and any(needs):
        buffers = 1 + bool(entropy) + (head.softcap is not None)
    else:
        buffers = 2 if entropy else 1
    R, VT = plan_blocks(V, H, low, budget, buffers)
    R = min(R, rows)
    blocks = R * ((4 * buffers + 2) * VT + 8 * H)
    weight_copy = 4 * H * VT if low else 0
    if low and bias:
        weight_copy += 4 * VT
    return int(blocks + weight_copy + 8 * rows)


def _valid_rows(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return (targets != ignore_index).nonzero().squeeze(1)


def _tiles(weight, bias, vt, full):
    """(v0, v1, float32 weight tile, float32 bias tile) over the vocabulary; ``full`` is the precomputed single tile."""
    V = weight.shape[0]
    if full is not None:
        yield (0, V, *full)
        return
    for v0 in range(0, V, vt):
        v1 = min(v0 + vt, V)
        yield (v0, v1, *_tile(weight, bias, v0, v1))


def _tile(weight, bias, v0, v1):
    w = weight[v0:v1]
    if w.dtype != torch.float32:
        w = w.float()
    b = None if bias is None else bias[v0:v1].float()
    return w, b


def _apply_head(z: torch.Tensor, head: Head) -> torch.Tensor:
    """Raw logits -> the head's logits, in place on a float32 tensor."""
    if head.softcap is None:
        k = head.logit_scale / head.temperature
        if k != 1.0:
            z.mul_(k)
    else:
        z.mul_(head.logit_scale / head.softcap).tanh_().mul_(head.softcap / head.temperature)
    return z


def _logits(h, w, b, head):
    z = h @ w.T if b is None else torch.addmm(b, h, w.T)
    _apply_head(z, head)
    if b is not None:  # only a bias can hold -inf
        z.clamp_(min=_MASKED_LOGIT)
    return z


def _softcap_slope(z, head):
    """d tanh / d(its argument) = 1 - tanh^2 at every logit, recovered from z = cap tanh(.) / T."""
    return (z * (head.temperature / head.softcap)).square_().neg_().add_(1.0)


def _target_logit(h, weight, bias, tgt, head):
    # Indexed dot: the target logit without touching the other columns.
    raw = (h * weight.index_select(0, tgt).float()).sum(1)
    if bias is not None:
        raw = raw + bias.index_select(0, tgt).float()
    return _apply_head(raw, head)


def _row_dot(a, b):
    """Per-row dot product of two (R, V) tensors without an (R, V) temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _tile_sums(z, entropy, keep=True):
    """Softmax partial sums of one logits tile, shifted by its (finite) row maximum m.

    Returns ``(m, s, q, e)`` with ``s = sum exp(z - m)``, ``q = sum exp(z - m) (z - m)``
    (None without ``entropy``) and ``e = exp(z - m)``. ``z`` is left holding
    ``z - m``, or ``exp(z - m)`` itself (then ``e is z``) without ``entropy``.
    With ``keep=False`` the caller needs only the sums: ``e`` is None, and the
    entropy's products are formed in the exponentials' own buffer (a batched
    row dot would have BLAS pack copies of both tiles).
    """
    m = z.amax(1)
    z.sub_(m[:, None])
    if not entropy:
        e = z.exp_()
        return m, e.sum(1), None, e
    e = z.exp()
    if not keep:
        s = e.sum(1)
        return m, s, e.mul_(z).sum(1), None
    return m, e.sum(1), _row_dot(e, z), e


def _merge(acc, m, s, q):
    """Online-softmax merge of running sums ``acc = (M, S, Q)`` with a tile's ``(m, s, q)``."""
    if acc is None:
        return m, s, q
    M, S, Q = acc
    top = torch.maximum(M, m)
    a, b = torch.exp(M - top), torch.exp(m - top)
    if q is not None:
        # Q and q are relative to their own shifts: moving a shift by d adds d * s.
        q = a * (Q + S * (M - top)) + b * (q + s * (m - top))
    return top, a * S + b * s, q


def _finish(acc, entropy):
    """(lse, entropy or None) from the merged sums."""
    m, s, q = acc
    log_s = s.log()
    return m + log_s, (log_s - q / s) if entropy else None


def _block_stats(h, weight, bias, head, vt, full, entropy):
    """Log-sum-exp (and entropy) of one row block, sweeping vocabulary tiles online."""
    acc = None
    for _, _, w, b in _tiles(weight, bias, vt, full):
        z = _logits(h, w, b, head)
        m, s, q, _ = _tile_sums(z, entropy, keep=False)
        acc = _merge(acc, m, s, q)
        del z, _  # free the tile before the next one is allocated
    return _finish(acc, entropy)


def forward(hidden, weight, bias, targets, head, ignore_index, *, entropy, budget):
    N, H = hidden.shape
    V = weight.shape[0]
    logp = hidden.new_zeros(N, dtype=torch.float32)
    lse = torch.zeros_like(logp)
    ent = torch.zeros_like(logp) if entropy else None
    rows = _valid_rows(targets, ignore_index)
    R, VT = plan_blocks(V, H, weight.dtype != torch.float32, budget, buffers=2 if entropy else 1)
    full = _tile(weight, bias, 0, V) if VT == V and rows.numel() else None
    for r0 in range(0, rows.numel(), R):
        idx = rows[r0 : r0 + R]
        h = hidden.index_select(0, idx).float()
        blk_lse, blk_ent = _block_stats(h, weight, bias, head, VT, full, entropy)
        lse[idx] = blk_lse
        logp[idx] = _target_logit(h, weight, bias, targets.index_select(0, idx), head) - blk_lse
        if entropy:
            ent[idx] = blk_ent
    return Stats(logp, lse, ent)


def _dlogits(p, logp, slope, tgt_local, c, ec, ent, k):
    """d L / d raw logits of one tile, in place in ``p``.

    ``g_z = c (onehot - p) - ec p (log p + ent)`` (the entropy term only with
    ``ec``; ``logp`` then holds log p and is overwritten), times ``k =
    logit_scale / temperature`` and the softcap slope. ``tgt_local``: (rows,
    columns) of the targets inside the tile.
    """
    if ec is None:
        g = p.mul_((-c * k)[:, None])
    else:
        # Where log p < -1e3, p is exactly 0: the clamp only keeps 0 * log p finite.
        logp.clamp_(min=-1e3)
        g = p.mul_(logp.mul_((-ec * k)[:, None]).add_(((-c - ec * ent) * k)[:, None]))
    r, col = tgt_local
    if r is None:
        g.scatter_add_(1, col[:, None], (c * k)[:, None])
    elif r.numel():
        g.index_put_((r, col), (c * k)[r], accumulate=True)
    if slope is not None:
        g.mul_(slope)
    return g


def _block_grad(h, weight, bias, tgt, c, ec, head, vt, full, lse, ent, needs, dw, db):
    """Gradient contributions of one row block: returns (lse, entropy, dhidden block or None)."""
    V = weight.shape[0]
    k = head.logit_scale / head.temperature
    dh = torch.zeros_like(h) if needs[0] else None
    if lse is None and full is not None:
        # The whole vocabulary fits: one GEMM for the logits, whose buffer is
        # reused in place for the statistics, the probabilities and dlogits.
        w, b = full
        z = _logits(h, w, b, head)
        slope = _softcap_slope(z, head) if head.softcap is not None else None
        m, s, q, p = _tile_sums(z, ec is not None)
        lse, ent = _finish((m, s, q), ec is not None)
        p.div_(s[:, None])
        logp = None if ec is None else z.sub_(s.log()[:, None])  # z - m - log s = log p
        g = _dlogits(p, logp, slope, (None, tgt), c, ec, ent, k)
        _accumulate(g, h, w, 0, V, dh, dw, db)
        return lse, ent, dh
    if lse is None:
        lse, ent = _block_stats(h, weight, bias, head, vt, full, ec is not None)
    for v0, v1, w, b in _tiles(weight, bias, vt, full):
        z = _logits(h, w, b, head)
        slope = _softcap_slope(z, head) if head.softcap is not None else None
        z.sub_(lse[:, None])  # log p
        if ec is None:
            p, logp = z.exp_(), None
        else:
            p, logp = z.exp(), z
        local = tgt - v0
        r = ((local >= 0) & (local < v1 - v0)).nonzero().squeeze(1)
        g = _dlogits(p, logp, slope, (r, local[r]), c, ec, ent, k)
        _accumulate(g, h, w, v0, v1, dh, dw, db)
        del z, p, g, logp, slope  # free the tile and every view of it before the next one is allocated
    return lse, ent, dh


def _accumulate(g, h, w, v0, v1, dh, dw, db):
    if dh is not None:
        dh.addmm_(g, w)
    if dw is not None:
        dw[v0:v1].addmm_(g.T, h)
    if db is not None:
        db[v0:v1].add_(g.sum(0))


def grad(hidden, weight, bias, targets, head, ignore_index, *, coef, ent_coef, stats, needs, budget):
    """Statistics and the gradients of ``sum_t coef[t] logp[t] + sum_t ent_coef[t] ent[t]`` (see the contract)."""
    N, H = hidden.shape
    V = weight.shape[0]
    need_h, need_w, need_b = needs
    need_b = need_b and bias is not None
    if not (need_h or need_w or need_b):
        stats = forward(hidden, weight, bias, targets, head, ignore_index, entropy=ent_coef is not None, budget=budget)
        return stats, None, None, None
    dev = hidden.device
    logp = torch.zeros(N, dtype=torch.float32, device=dev)
    lse = torch.zeros_like(logp)
    ent = torch.zeros_like(logp) if ent_coef is not None else None
    dh = torch.zeros(N, H, dtype=torch.float32, device=dev) if need_h else None
    dw = torch.zeros(V, H, dtype=torch.float32, device=dev) if need_w else None
    db = torch.zeros(V, dtype=torch.float32, device=dev) if need_b else None
    # Saved statistics are reused only when they hold everything needed.
    reuse = stats is not None and (ent_coef is None or stats.entropy is not None)
    rows = _valid_rows(targets, ignore_index)
    buffers = 1 + (ent_coef is not None) + (head.softcap is not None)
    R, VT = plan_blocks(V, H, weight.dtype != torch.float32, budget, buffers)
    full = _tile(weight, bias, 0, V) if VT == V and rows.numel() else None
    for r0 in range(0, rows.numel(), R):
        idx = rows[r0 : r0 + R]
        h = hidden.index_select(0, idx).float()
        tgt = targets.index_select(0, idx)
        c = coef.index_select(0, idx).float()
        ec = None if ent_coef is None else ent_coef.index_select(0, idx).float()
        blk_lse = stats.lse.index_select(0, idx) if reuse else None
        blk_ent = stats.entropy.index_select(0, idx) if reuse and ec is not None else None
        blk_lse, blk_ent, dh_blk = _block_grad(
            h, weight, bias, tgt, c, ec, head, VT, full, blk_lse, blk_ent, (need_h, need_w, need_b), dw, db
        )
        lse[idx] = blk_lse
        logp[idx] = _target_logit(h, weight, bias, tgt, head) - blk_lse
        if ent is not None:
            ent[idx] = blk_ent
        if dh is not None:
            dh[idx] = dh_blk
    return Stats(logp, lse, ent), dh, dw, db

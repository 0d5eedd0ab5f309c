"""Triton backend: fused kernels for CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``).

Launcher layer: input checks, allocation, grids and config selection. The
``@triton.jit`` kernels live in ``grao_kernels.triton_kernels`` (one file per
kernel) and are imported on first use, because ``triton.jit`` decides when a
kernel is decorated whether it compiles or runs under the interpreter.

Equivalent eager code of the two sweeps (what is never allocated)::

    z = (hidden.float() @ weight.float().T + bias) / temperature     # (N, V)
    logp, lse = z.log_softmax(-1).gather(-1, targets[:, None])[:, 0], z.logsumexp(-1)
    dz = coef[:, None] * (onehot(targets) - z.softmax(-1)) / temperature
    dhidden, dweight, dbias = dz @ weight, dz.T @ hidden, dz.sum(0)

Launches per call, whatever P and G are: ``linear_logprobs_forward`` one
sweep kernel plus a few (N,)-sized PyTorch ops (row compaction, split
combine); ``linear_logprobs_grad`` the forward sweep (only when no saved lse
is given), then per 2048-wide vocabulary chunk one dz kernel and two cuBLAS
GEMMs (default) or a single fused kernel with fp32 atomics
(:func:`set_backward_mode`). Ignored rows are compacted away on the device (a
stable sort of the ignore mask), so no call synchronises with the host.
``grao_loss`` adds one launch for each of its three small steps.

Memory beyond the inputs and the gradients handed back to autograd, default
"gemm" backward with bfloat16/float16 inputs: dh in float32 (N x H x 4 bytes;
it sums every vocabulary chunk's product, so ``_functions._cast_grads`` copies
it to the input dtype afterwards), one N x 2048 dz chunk and a copy of hidden
with the ignored rows zeroed (both in the input dtype), the forward's
(3, splits, N) partial sums and O(N) vectors: about 450 MiB at N=16k, H=4k,
whatever V is. dW is written chunk by chunk straight into a (V, H) buffer in
the weight's dtype, the very tensor autograd receives (a chunk's GEMM spans
every row, so it is complete when written); dbias, V floats, is summed in
float32 and cast once. float32 inputs return float32 gradients (no copies).
The "atomic" backward instead sums dh and dW in float32 (adding V x H x 4
bytes, then the caller's cast of dW to the weight's dtype) but has no dz
chunk.

Config selection, first match wins: :func:`pin_config`, the environment
variable ``GRAO_KERNELS_TRITON_CONFIG`` (e.g. ``"BLOCK_N=64,BLOCK_V=128,
BLOCK_H=64,num_warps=4,num_stages=3"``, applied to every sweep kernel), the
small interpreter config under ``TRITON_INTERPRET=1``, else Triton's autotuner
over the configs next to each kernel, keyed on (V, H) and the dtypes.
"""

from __future__ import annotations

import math
import os

import torch
import triton  # an ImportError here disables only this backend (see backends/__init__.py)

# Under the interpreter every program and every reduction costs milliseconds
# of Python, so its default takes few, wide vocabulary tiles; rows and H stay
# at tl.dot's minimum of 16. Tests pin smaller tiles where they need many.
INTERPRETER_CONFIGS = {
    "forward": {"BLOCK_N": 16, "BLOCK_V": 1024, "BLOCK_H": 16},
    "backward": {"BLOCK_N": 16, "BLOCK_V": 1024, "BLOCK_H": 16, "GROUP_N": 2},
    "dlogits": {"BLOCK_N": 16, "BLOCK_V": 1024, "BLOCK_H": 16, "GROUP_N": 2},
}
_LAUNCH_KEYS = ("num_warps", "num_stages")

# The forward splits the vocabulary into pieces of a multiple of this many
# entries when there are too few row blocks to fill the GPU.
_SPLIT_UNIT = 512

# Width of the vocabulary chunks whose dz the "gemm" backward writes out.
_DZ_CHUNK = 2048

_pinned: dict[str, dict] = {}
_autotuned: dict[str, object] = {}
_filter = os.environ.get("GRAO_KERNELS_TRITON_FILTER", "0") == "1"
_backward_mode = os.environ.get("GRAO_KERNELS_TRITON_BACKWARD", "gemm")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(device: torch.device) -> str | None:
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "PyTorch sees no CUDA device"
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            # bfloat16 tl.dot and the tile configs assume Ampere or newer.
            return f"its kernels need compute capability 8.0 or newer, this GPU has {major}.{minor}"
        return None
    if device.type == "cpu":
        if _interpreting():
            return None
        return (
            "its kernels need CUDA tensors (CPU tensors run only under the Triton interpreter, "
            "enabled by setting TRITON_INTERPRET=1 before triton is imported)"
        )
    return f"its kernels run on CUDA tensors, not {device.type}"


# ----------------------------------------------------------------------------
# configuration


def pin_config(kernel: str, config: dict | None) -> None:
    """Launch ``kernel`` ("forward", "backward" or "dlogits") with ``config`` instead of autotuning.

    ``config`` maps the kernel's block sizes (``BLOCK_N``, ``BLOCK_V``,
    ``BLOCK_H``; ``GROUP_N`` for the gradient kernels) and optionally ``num_warps`` /
    ``num_stages`` to values; ``None`` unpins. Tests pin one config so that
    they do not depend on the autotuner's choice.
    """
    if kernel not in INTERPRETER_CONFIGS:
        raise ValueError(f"kernel must be one of {list(INTERPRETER_CONFIGS)}, got {kernel!r}")
    if config is None:
        _pinned.pop(kernel, None)
        return
    config = dict(config)
    required = set(INTERPRETER_CONFIGS[kernel]) - {"GROUP_N"}
    missing = required - set(config)
    if missing:
        raise ValueError(f"config for {kernel!r} lacks {sorted(missing)}")
    for key in ("BLOCK_N", "BLOCK_V", "BLOCK_H"):
        v = config[key]
        if not isinstance(v, int) or v < 16 or v & (v - 1):
            raise ValueError(f"{key} must be a power of two >= 16 (tl.dot's minimum), got {v!r}")
    if kernel != "forward":
        config.setdefault("GROUP_N", 8)
    _pinned[kernel] = config


def set_backward_mode(mode: str) -> None:
    """How the gradient sweep accumulates dh and dW: "gemm" (default) or "atomic".

    "gemm": per 2048-wide vocabulary chunk a Triton kernel writes dz (N x
    chunk, input dtype) and cuBLAS computes dh += dz W into float32 and the
    chunk's rows of dW = dz^T h in the weight's dtype (fp32 accumulation,
    written once). "atomic": one fused kernel adds every tile's products into
    fp32 dh and dW with atomics, with no dz buffer but heavy L2 atomic
    traffic (see ``triton_kernels/logprob_backward.py``). Also set by
    ``GRAO_KERNELS_TRITON_BACKWARD``.
    """
    global _backward_mode
    if mode not in ("gemm", "atomic"):
        raise ValueError(f"backward mode must be 'gemm' or 'atomic', got {mode!r}")
    _backward_mode = mode


def set_gradient_filter(enabled: bool) -> None:
    """Skip gradient tiles whose softmax is below the input dtype's resolution (off by default).

    Applies to the "atomic" backward (:func:`set_backward_mode`), whose tiles
    can be skipped outright.

    Off unless ``GRAO_KERNELS_TRITON_FILTER=1``. The skipped terms are each
    below ``finfo(dtype).eps / 32`` times the coefficient; a flat softmax over
    a large vocabulary has many of them, so turn this on only for peaked
    distributions (trained models), as Cut Cross-Entropy does. Never applied
    to float32 inputs.
    """
    global _filter
    _filter = bool(enabled)


def _env_config(kernel: str) -> dict | None:
    spec = os.environ.get("GRAO_KERNELS_TRITON_CONFIG")
    if not spec:
        return None
    try:
        cfg = {k.strip(): int(v) for k, v in (item.split("=") for item in spec.split(",") if item.strip())}
    except ValueError as exc:
        raise ValueError(
            f"GRAO_KERNELS_TRITON_CONFIG must look like 'BLOCK_N=64,BLOCK_V=128,...', got {spec!r}"
        ) from exc
    if kernel != "forward":
        cfg.setdefault("GROUP_N", 8)
    else:
        cfg.pop("GROUP_N", None)
    return cfg


def _chosen_config(kernel: str) -> dict | None:
    """The pinned config of ``kernel``, or None to autotune."""
    cfg = _pinned.get(kernel) or _env_config(kernel)
    if cfg is None and _interpreting():
        cfg = INTERPRETER_CONFIGS[kernel]  # the autotuner times on CUDA events
    return cfg


def _launch(kernel: str, jit_fn, configs, grid, args: dict, reset_to_zero=(), tag: str = "", key=("V", "H")):
    cfg = _chosen_config(kernel)
    if cfg is not None:
        meta = {k: v for k, v in cfg.items() if k not in _LAUNCH_KEYS}
        launch = {k: cfg[k] for k in _LAUNCH_KEYS if k in cfg}
        jit_fn[grid(meta)](**args, **meta, **launch)
        return
    name = kernel + tag
    if name not in _autotuned:
        # reset_to_zero: the backward accumulates atomically, so every timed
        # trial must start from zeroed gradients.
        _autotuned[name] = triton.autotune(configs, key=list(key), reset_to_zero=list(reset_to_zero))(jit_fn)
    _autotuned[name][grid](**args)


# ----------------------------------------------------------------------------
# helpers


def _check_device(*tensors) -> None:
    dev = tensors[0].device
    reason = unavailable_reason(dev)
    if reason is not None:
        raise ValueError(f"the triton backend cannot run on {dev} tensors: {reason}")
    for t in tensors[1:]:
        if t is not None and t.device != dev:
            raise ValueError(f"all inputs must be on {dev}, got one on {t.device}")


def _common_dtype(hidden, weight):
    """tl.dot needs both operands in one dtype: promote the narrower one."""
    if hidden.dtype == weight.dtype:
        return hidden, weight
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return hidden.to(dtype), weight.to(dtype)


def _compact_rows(targets, ignore_index):
    """Non-ignored row ids first (in order) and their count, both on the device."""
    ignored = (targets == ignore_index).to(torch.int8)
    rows = torch.sort(ignored, stable=True).indices.to(torch.int32)
    n_valid = (1 - ignored).sum(dtype=torch.int32).reshape(1)
    return rows, n_valid


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _vocab_splits(N: int, V: int, device: torch.device) -> tuple[int, int]:
    """(number of splits, entries per split) so the forward grid fills about two waves."""
    row_blocks = max(1, math.ceil(N / 128))
    wanted = math.ceil(2 * _sm_count(device) / row_blocks)
    n = max(1, min(wanted, math.ceil(V / _SPLIT_UNIT)))
    per = math.ceil(math.ceil(V / n) / _SPLIT_UNIT) * _SPLIT_UNIT
    return math.ceil(V / per), per


def _dot_precision(dtype) -> str:
    # float32 inputs would otherwise go through TF32 tensor cores (10-bit
    # mantissa) and miss the float32 tolerances; the option is ignored for
    # bf16/fp16.
    return "ieee"


def _upcast_dot(dtype) -> bool:
    # The interpreter's tl.dot multiplies bfloat16 blocks as raw integers;
    # under it the low-precision operands are widened to float32 first (the
    # products are exact either way, the accumulation is float32 in both).
    return _interpreting() and dtype != torch.float32


# ----------------------------------------------------------------------------
# backend interface


def _forward(hidden, weight, bias, targets, temperature, ignore_index):
    """(logp, lse, rows, n_valid) for contiguous, dtype-matched inputs."""
    from ..triton_kernels.lse_forward import CONFIGS, CONFIGS_FP32, lse_forward_kernel

    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    rows, n_valid = _compact_rows(targets, ignore_index)
    n_split, per_split = _vocab_splits(N, V, dev)
    parts = torch.zeros(3, n_split, N, dtype=torch.float32, device=dev)
    if N:
        args = dict(
            hidden_ptr=hidden, weight_ptr=weight, bias_ptr=bias if bias is not None else hidden,
            targets_ptr=targets, rows_ptr=rows, n_valid_ptr=n_valid,
            part_max_ptr=parts[0], part_sum_ptr=parts[1], part_tgt_ptr=parts[2],
            V=V, H=H, v_per_split=per_split, inv_temp=1.0 / temperature,
            stride_hn=hidden.stride(0), stride_hh=hidden.stride(1),
            stride_wv=weight.stride(0), stride_wh=weight.stride(1), stride_ps=N,
            HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(hidden.dtype), UPCAST_DOT=_upcast_dot(hidden.dtype),
        )  # fmt: skip

        def grid(meta):
            return (triton.cdiv(N, meta["BLOCK_N"]), n_split)

        fp32 = hidden.dtype == torch.float32
        _launch("forward", lse_forward_kernel, CONFIGS_FP32 if fp32 else CONFIGS, grid, args, tag="-fp32" * fp32)
    part_max, part_sum, part_tgt = parts
    valid = targets != ignore_index
    m = part_max.amax(0)
    lse = m + torch.log((part_sum * torch.exp(part_max - m)).sum(0))
    lse = torch.where(valid, lse, 0.0)
    logp = torch.where(valid, part_tgt.sum(0) - lse, 0.0)
    return logp, lse, rows, n_valid


def _prepare(hidden, weight, bias, targets):
    _check_device(hidden, weight, bias, targets)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden (N, H) and weight (V, H), got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    hidden, weight = _common_dtype(hidden.contiguous(), weight.contiguous())
    bias = None if bias is None else bias.contiguous()
    return hidden, weight, bias, targets.reshape(-1).to(torch.int64).contiguous()


def linear_logprobs_forward(hidden, weight, bias, targets, temperature, ignore_index):
    hidden, weight, bias, targets = _prepare(hidden, weight, bias, targets)
    logp, lse, _, _ = _forward(hidden, weight, bias, targets, float(temperature), int(ignore_index))
    return logp, lse


def linear_logprobs_grad(hidden, weight, bias, targets, coef, temperature, ignore_index, lse=None):
    """Log-probs and the gradients of ``sum_t coef[t] * logp[t]`` (see the kernel files).

    dhidden is float32. dweight and dbias are float32 too, except in the "gemm"
    backward with bfloat16/float16 inputs, which writes them in the weight's
    and the bias's dtype (see the module docstring's memory accounting).
    """
    hidden, weight, bias, targets = _prepare(hidden, weight, bias, targets)
    temperature, ignore_index = float(temperature), int(ignore_index)
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    if lse is None:
        _, lse, rows, n_valid = _forward(hidden, weight, bias, targets, temperature, ignore_index)
    else:
        # The saved lse spares the forward sweep (a logits-sized matmul);
        # the gradient kernels write logp themselves.
        lse = lse.float().contiguous()
        rows, n_valid = _compact_rows(targets, ignore_index)
    coef = coef.reshape(-1).float().contiguous()
    logp = torch.zeros(N, dtype=torch.float32, device=dev)
    dh = torch.zeros(N, H, dtype=torch.float32, device=dev)
    # The "gemm" backward writes each chunk of dW complete, so it can write it
    # in the weight's dtype (every row of it, hence no zero fill when N > 0);
    # atomics and addmm sum partial products into float32.
    direct = _backward_mode == "gemm" and hidden.dtype != torch.float32
    if direct and N:
        dw = torch.empty(V, H, dtype=weight.dtype, device=dev)
    else:
        dw = torch.zeros(V, H, dtype=weight.dtype if direct else torch.float32, device=dev)
    db = None if bias is None else torch.zeros(V, dtype=torch.float32, device=dev)
    if N:
        common = dict(
            hidden_ptr=hidden, weight_ptr=weight, bias_ptr=bias if bias is not None else hidden,
            targets_ptr=targets, rows_ptr=rows, n_valid_ptr=n_valid, coef_ptr=coef, lse_ptr=lse, logp_ptr=logp,
            N=N, H=H, inv_temp=1.0 / temperature,
            stride_hn=hidden.stride(0), stride_hh=hidden.stride(1),
            stride_wv=weight.stride(0), stride_wh=weight.stride(1),
            HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(hidden.dtype),
            UPCAST_DOT=_upcast_dot(hidden.dtype),
        )  # fmt: skip
        if _backward_mode not in ("gemm", "atomic"):
            raise ValueError(f"GRAO_KERNELS_TRITON_BACKWARD must be 'gemm' or 'atomic', got {_backward_mode!r}")
        if _backward_mode == "atomic":
            _backward_atomic(common, hidden, dh, dw, db, V)
        else:
            _backward_gemm(common, hidden, weight, targets, ignore_index, dh, dw, db, V)
    if direct and db is not None:
        db = db.to(bias.dtype)  # V floats: summed by fp32 atomics across row blocks, cast once
    return logp, dh, dw, db


def _backward_atomic(common, hidden, dh, dw, db, V):
    """One fused kernel: every (row block, vocab tile) adds its share of dh and dW with fp32 atomics."""
    from ..triton_kernels.logprob_backward import CONFIGS, CONFIGS_FP32, logprob_backward_kernel

    N = hidden.shape[0]
    use_filter = _filter and hidden.dtype != torch.float32
    args = dict(
        common, V=V, dhidden_ptr=dh, dweight_ptr=dw, dbias_ptr=db if db is not None else dh,
        filter_eps=torch.finfo(hidden.dtype).eps / 32 if use_filter else 0.0, FILTER=use_filter,
        stride_dhn=dh.stride(0), stride_dhh=dh.stride(1), stride_dwv=dw.stride(0), stride_dwh=dw.stride(1),
    )  # fmt: skip

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(V, meta["BLOCK_V"]),)

    # dbias_ptr aliases dhidden without a bias: resetting it twice is harmless.
    reset = ["dhidden_ptr", "dweight_ptr", "dbias_ptr"]
    fp32 = hidden.dtype == torch.float32
    configs = CONFIGS_FP32 if fp32 else CONFIGS
    _launch("backward", logprob_backward_kernel, configs, grid, args, reset_to_zero=reset, tag="-fp32" * fp32)


def _addmm_fp32(acc, a, b):
    """acc += a @ b into a float32 ``acc`` without rounding a @ b to the inputs' dtype first."""
    if acc.is_cuda and a.dtype != torch.float32:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError):  # torch < 2.8 has no out_dtype
            pass
    acc.addmm_(a.float(), b.float())


def _mm_into(out, a, b):
    """out = a @ b for bfloat16/float16 ``a``, ``b`` and ``out``: fp32 accumulation, one rounding.

    Only ever called on one vocabulary chunk of dW, so the CPU fallback's
    float32 temporary is bounded by the chunk.
    """
    if out.is_cuda:
        # cuBLAS multiplies bf16/fp16 with fp32 accumulation (CUBLAS_COMPUTE_32F)
        # and rounds on writing. Should it split K (= N, the long dimension
        # here), PyTorch lets it sum the partial products in the output dtype
        # unless torch.backends.cuda.matmul.allow_{bf16,fp16}_reduced_precision_reduction
        # is False, as for any bf16/fp16 matmul in PyTorch.
        torch.mm(a, b, out=out)
    else:
        # CPU tensors (the interpreter): torch.mm has no fp32 out_dtype for bf16 here.
        out.copy_(a.float() @ b.float())


def _backward_gemm(common, hidden, weight, targets, ignore_index, dh, dw, db, V):
    """Per vocabulary chunk: the dz kernel, then cuBLAS for dh += dz W and dW = dz^T h (see dlogits.py)."""
    from ..triton_kernels.dlogits import CONFIGS, CONFIGS_FP32, dlogits_kernel

    N = hidden.shape[0]
    chunk = min(_DZ_CHUNK, V)
    dz = torch.zeros(N, chunk, dtype=hidden.dtype, device=hidden.device)
    # Ignored rows have dz = 0 but may hold garbage (NaN) in hidden: zero them
    # for the dW product instead of multiplying them by zero.
    h_clean = hidden.masked_fill((targets == ignore_index)[:, None], 0)
    fp32 = hidden.dtype == torch.float32
    configs = CONFIGS_FP32 if fp32 else CONFIGS
    for v0 in range(0, V, chunk):
        v1 = min(v0 + chunk, V)
        args = dict(common, dz_ptr=dz, dbias_ptr=db if db is not None else dh, v_start=v0, v_end=v1)
        args["stride_dzn"] = dz.stride(0)

        def grid(meta, width=v1 - v0):
            return (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(width, meta["BLOCK_V"]),)

        # reset_to_zero: autotuning reruns the kernel, whose dbias sum is atomic.
        reset, tag = ["dbias_ptr"], "-fp32" * fp32
        _launch("dlogits", dlogits_kernel, configs, grid, args, reset_to_zero=reset, tag=tag, key=("H",))
        d = dz[:, : v1 - v0]
        _addmm_fp32(dh, d, weight[v0:v1])
        if dw.dtype == torch.float32:
            _addmm_fp32(dw[v0:v1], d.T, h_clean)
        else:
            _mm_into(dw[v0:v1], d.T, h_clean)


# ----------------------------------------------------------------------------
# grao_loss hooks: one launch each, no host synchronisation


def _block(n: int, lo: int = 16, hi: int = 1024) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def group_advantages(rewards, eps):
    """Same as ``grao_kernels.api.group_advantages`` (float32; float64 for float64 rewards)."""
    from ..triton_kernels.group_ops import group_advantages_kernel

    eps = float(eps)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    _check_device(rewards)
    P, K = rewards.shape
    is_fp64 = rewards.dtype == torch.float64
    adv = torch.empty(P, K, dtype=torch.float64 if is_fp64 else torch.float32, device=rewards.device)
    if P:
        block_k = triton.next_power_of_2(K)
        block_p = max(1, min(64, 4096 // block_k))
        group_advantages_kernel[(triton.cdiv(P, block_p),)](
            rewards, adv, P, K, eps, rewards.stride(0), rewards.stride(1), adv.stride(0),
            IS_FP64=is_fp64, BLOCK_P=block_p, BLOCK_K=block_k,
        )  # fmt: skip
    return adv


def token_coefficients(adv, targets, ignore_index, beta, lam):
    """Same as ``grao_kernels.api.token_coefficients``: flat float32 ``coef`` and ``n`` (S,)."""
    from ..triton_kernels.group_ops import token_coefficients_kernel

    _check_device(adv, targets)
    adv = adv.float()
    P, K = adv.shape
    S, T = targets.shape
    coef = torch.empty(S * T, dtype=torch.float32, device=adv.device)
    n = torch.empty(S, dtype=torch.float32, device=adv.device)
    if S:
        token_coefficients_kernel[(S,)](
            adv, targets, coef, n, P, T, K - 1, int(ignore_index), float(beta), float(lam),
            adv.stride(0), adv.stride(1), targets.stride(0), targets.stride(1),
            BLOCK_T=_block(T), BLOCK_G=_block(K - 1, lo=2, hi=2**16),
        )  # fmt: skip
    return coef, n


def sequence_logp(logp, n):
    """Same as ``grao_kernels.api.sequence_logp``: (S, T) log-probs -> (S,) means over ``n`` tokens."""
    from ..triton_kernels.group_ops import sequence_logp_kernel

    _check_device(logp, n)
    S, T = logp.shape
    out = torch.empty(S, dtype=torch.float32, device=logp.device)
    if S:
        sequence_logp_kernel[(S,)](logp, n, out, T, logp.stride(0), logp.stride(1), BLOCK_T=_block(T))
    return out

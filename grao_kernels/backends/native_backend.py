"""Native CPU backend: the C++ kernels in ``csrc/``, compiled on first use.

Launcher only: it compiles and loads the extension (``torch.utils.cpp_extension.load``,
cached per source hash), registers fake implementations of the
``grao_native::`` ops so ``torch.compile`` traces through them, picks the
block sizes and calls the ops. The kernels, their schedule and the FLOP/byte
floor are described in ``csrc/linear_logprobs_cpu.h``.

Nothing is compiled at import: the first ``unavailable_reason(cpu)`` builds
(about a minute) or loads the cached library. Where the build goes:
``$GRAO_KERNELS_BUILD_DIR``, else ``$XDG_CACHE_HOME/grao_kernels``, else
``~/.cache/grao_kernels``; one sub-directory per source/flags/torch hash.
Concurrent first uses in several processes are serialised by the lock file
``cpp_extension`` keeps in that directory. Needs a C++ compiler (``$CXX`` or
``c++``) and the ``ninja`` pip package; without them the backend reports
itself unavailable and ``backend="auto"`` uses the torch backend.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

from ..settings import settings
from . import Head, Stats

_CSRC = Path(__file__).resolve().parents[2] / "csrc"
_SOURCES = ("grao_cpu.cpp",)
_HEADERS = ("linear_logprobs_cpu.h", "vec_math.h")

# Working memory of a call (``budget``) when neither the call nor the settings
# give one: 64 MiB holds 256-row blocks of float32 logits at V = 65536.
DEFAULT_BUDGET = 64 * 2**20
# dw and W are streamed once per row block: 16 V H bytes against 6 R V H
# FLOPs, i.e. roughly 27 / R of the GEMM time at 100 GFLOP/s and 10 GB/s.
# Below 192 rows that costs more than the memory saved, so the budget yields
# (117 MB at V = 151936).
_MIN_ROWS, _MAX_ROWS = 192, 1024
# The dh partial sums: one (rows x H) float32 block per chunk of tiles
# (kChunks in csrc/linear_logprobs_cpu.h).
_CHUNKS = 16

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ops" on success, "reason" on failure


def _flags() -> list[str]:
    flags = ["-O3", "-fopenmp"]
    # Only on CPUs that have them: the cache may be shared by several machines,
    # and the capability is part of the cache key.
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def _build_name(flags: list[str]) -> str:
    h = hashlib.sha256()
    for name in _SOURCES + _HEADERS:
        h.update((_CSRC / name).read_bytes())
    h.update(" ".join(flags).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    return f"grao_native_{h.hexdigest()[:12]}"


def build_dir() -> Path:
    """The directory holding the compiled extensions."""
    root = os.environ.get("GRAO_KERNELS_BUILD_DIR")
    if root:
        return Path(root)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "grao_kernels"


def _summarise(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    picked = errors[:3] or lines[:3]
    return "; ".join(picked)[:600]


def _load() -> None:
    from torch.utils import cpp_extension

    for name in _SOURCES + _HEADERS:
        if not (_CSRC / name).is_file():
            raise RuntimeError(f"its sources are missing ({_CSRC / name}); install from a source checkout")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler: {cxx!r} is not on PATH (install g++ or set CXX)")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("the 'ninja' build tool is missing (pip install ninja)")
    flags = _flags()
    name = _build_name(flags)
    directory = build_dir() / name
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / f"{name}.so").exists():
        print(
            f"grao_kernels: compiling the native CPU backend into {directory} (first use, about a minute)",
            file=sys.stderr,
            flush=True,
        )
    try:
        cpp_extension.load(
            name=name,
            sources=[str(_CSRC / s) for s in _SOURCES],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(_CSRC)],
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # compiler errors arrive as RuntimeError/CalledProcessError
        raise RuntimeError(f"building it in {directory} failed: {_summarise(exc)}") from exc
    _register_fakes()


def _register_fakes() -> None:
    @torch.library.register_fake("grao_native::linear_logprobs_forward")
    def _(hidden, weight, bias, targets, temperature, logit_scale, softcap, ignore_index, entropy, rows, tile):
        n, f32 = hidden.shape[0], torch.float32
        return (
            hidden.new_empty(n, dtype=f32),
            hidden.new_empty(n, dtype=f32),
            hidden.new_empty(n if entropy else 0, dtype=f32),
        )

    @torch.library.register_fake("grao_native::linear_logprobs_grad")
    def _(
        hidden, weight, bias, targets, coef, ent_coef, lse, entropy, temperature, logit_scale, softcap,
        ignore_index, need_hidden, need_weight, need_bias, rows, tile,
    ):  # fmt: skip
        n, f32 = hidden.shape[0], torch.float32
        return (
            hidden.new_empty(n, dtype=f32),
            hidden.new_empty(n, dtype=f32),
            hidden.new_empty(n if ent_coef is not None else 0, dtype=f32),
            hidden.new_empty(hidden.shape if need_hidden else (0,), dtype=f32),
            weight.new_empty(weight.shape if need_weight else (0,), dtype=f32),
            weight.new_empty(weight.shape[0] if need_bias and bias is not None else 0, dtype=f32),
        )


def _ensure_loaded() -> str | None:
    with _lock:
        if not _state:
            try:
                _load()
                _state["ops"] = torch.ops.grao_native
            except Exception as exc:
                _state["reason"] = str(exc)
        return _state.get("reason")


def unavailable_reason(device: torch.device) -> str | None:
    if torch.device(device).type != "cpu":
        return f"it runs on CPU tensors only, not {torch.device(device).type}"
    return _ensure_loaded()


def ops():
    """``torch.ops.grao_native`` after loading the extension (raises when it cannot be built)."""
    reason = _ensure_loaded()
    if reason is not None:
        raise RuntimeError(f"grao_kernels native backend unavailable: {reason}")
    return _state["ops"]


def plan_blocks(V: int, H: int, one_sweep: bool, budget: int) -> tuple[int, int]:
    """(rows per block, vocabulary entries per tile) for the kernels within ``budget`` bytes.

    dw is read and written once per row block, so blocks are as large as the
    budget allows. The one-sweep gradient holds a block of logits, rows x V
    float32, and the dh partials, 16 x rows x H float32; with known
    statistics (and for the forward) only one tile per thread is live and
    the bound is the dh partials alone. Below ``_MIN_ROWS`` rows the budget
    yields (see there).
    """
    per_row = 4 * (_CHUNKS * H + (V if one_sweep else 0))
    rows = int(budget) // max(per_row, 1)
    rows = max(_MIN_ROWS, min(_MAX_ROWS if one_sweep else _MAX_ROWS // 2, rows // 16 * 16))
    return int(rows), int(settings.native_tile_vocab)


def _softcap(head: Head) -> float | None:
    return None if head.softcap is None else float(head.softcap)


def forward(hidden, weight, bias, targets, head, ignore_index, *, entropy, budget):
    rows, tile = plan_blocks(*weight.shape, one_sweep=False, budget=budget)
    logp, lse, ent = ops().linear_logprobs_forward(
        hidden, weight, bias, targets, float(head.temperature), float(head.logit_scale), _softcap(head),
        int(ignore_index), bool(entropy), rows, tile,
    )  # fmt: skip
    return Stats(logp, lse, ent if entropy else None)


def grad(hidden, weight, bias, targets, head, ignore_index, *, coef, ent_coef, stats, needs, budget):
    need_h, need_w, need_b = (bool(x) for x in needs)
    need_b = need_b and bias is not None
    if not (need_h or need_w or need_b):
        out = forward(hidden, weight, bias, targets, head, ignore_index, entropy=ent_coef is not None, budget=budget)
        return out, None, None, None
    # The saved statistics are reused (one fused pass per tile) only when they
    # hold everything the gradient needs.
    reuse = stats is not None and (ent_coef is None or stats.entropy is not None)
    lse = stats.lse if reuse else None
    ent = stats.entropy if reuse and ent_coef is not None else None
    rows, tile = plan_blocks(*weight.shape, one_sweep=not reuse, budget=budget)
    logp, lse, ent, dh, dw, db = ops().linear_logprobs_grad(
        hidden, weight, bias, targets, coef, ent_coef, lse, ent, float(head.temperature), float(head.logit_scale),
        _softcap(head), int(ignore_index), need_h, need_w, need_b, rows, tile,
    )  # fmt: skip
    out = Stats(logp, lse, ent if ent_coef is not None else None)
    return out, (dh if need_h else None), (dw if need_w else None), (db if need_b else None)

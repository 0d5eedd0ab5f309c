"""Native CPU backend: the C++ kernels in ``csrc/``, compiled on first use.

Launcher only: it compiles and loads the extension (``torch.utils.cpp_extension``),
registers fake implementations of the ``grao_native::`` ops so
``torch.compile`` traces through them, picks the block sizes and calls the
ops. The kernels, their schedule and the FLOP/byte floor are described in
``csrc/linear_logprobs_cpu.h``. The sources live in ``csrc/`` at the top of
a checkout and ship inside the wheel as ``grao_kernels/csrc/`` (package data),
so a wheel install builds the same library as a source checkout.

Nothing is compiled at import: the first ``unavailable_reason(cpu)`` builds
(about a minute) or loads the cached library. Where the build goes:
``settings.native_build_dir`` (``$GRAO_KERNELS_BUILD_DIR`` at import; an
assignment counts until the library is first loaded), else ``$XDG_CACHE_HOME/grao_kernels``, else
``~/.cache/grao_kernels``; one sub-directory per build key, the hash of what
the library depends on: the sources, the flags (CPU capability included), the
torch and Python versions, the compiler's identity (its ``--version``) and the
machine. A sub-directory whose build completed holds ``build.json``; then the
library is loaded as is, without ninja, so a second install, venv, source
location or ``ninja`` on PATH with the same key reuses it. Building is
serialised per key by an ``flock`` on ``build.lock`` (released by the kernel
if a build is killed), so concurrent first uses in several processes share
one build. Needs a C++ compiler (``$CXX`` or ``c++``) and, to build, the
``ninja`` pip package; without them the backend reports itself unavailable
and ``backend="auto"`` uses the torch backend.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import torch

from ..settings import settings
from . import Head, Stats

_SOURCES = ("grao_cpu.cpp",)
_HEADERS = ("linear_logprobs_cpu.h", "vec_math.h")


def _find_csrc() -> Path:
    """The kernel sources: ``grao_kernels/csrc/`` in an installed wheel, else ``csrc/`` next to the package in a
    checkout (also under an editable install); the first that holds them all, else the wheel's location (a
    missing source is reported when the backend is first loaded)."""
    package = Path(__file__).resolve().parents[1]
    candidates = (package / "csrc", package.parent / "csrc")
    for candidate in candidates:
        if all((candidate / name).is_file() for name in _SOURCES + _HEADERS):
            return candidate
    return candidates[0]


_CSRC = _find_csrc()
_LDFLAGS = ("-fopenmp",)

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


def _compiler_identity(cxx: str) -> str:
    """The first line of ``cxx --version``, without the name it was called by.

    GCC starts the line with its argv[0] (``c++``, ``g++``, ``x86_64-linux-gnu-g++``),
    so the same compiler reached through another name or path is one identity.
    """
    try:
        proc = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"the C++ compiler {cxx!r} does not run: {exc}") from exc
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the C++ compiler {cxx!r} does not run: `{cxx} --version` exited {proc.returncode}")
    first = lines[0].split(maxsplit=1)
    if len(first) == 2 and first[0] == Path(cxx).name:
        return first[1]
    return lines[0]


def _build_key(flags: list[str], compiler: str) -> dict[str, object]:
    """Everything the compiled library depends on (and nothing it does not:
    no paths, so equivalent toolchains share one build)."""
    return {
        "sources": {name: hashlib.sha256((_CSRC / name).read_bytes()).hexdigest() for name in _SOURCES + _HEADERS},
        "flags": flags,
        "ldflags": list(_LDFLAGS),
        "torch": [torch.__version__, torch.version.git_version],
        "python": sys.version,
        "compiler": compiler,
        "machine": platform.machine(),
    }


def _build_name(key: dict[str, object]) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return f"grao_native_{digest[:12]}"


def build_dir() -> Path:
    """The directory holding the compiled extensions: ``settings.native_build_dir`` (``$GRAO_KERNELS_BUILD_DIR``
    at import), else the user's cache directory."""
    if settings.native_build_dir:
        return Path(settings.native_build_dir)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "grao_kernels"


def _summarise(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    picked = errors[:3] or lines[:3]
    return "; ".join(picked)[:600]


def _library() -> tuple[Path, dict[str, object]]:
    """The path of the compiled library for this toolchain (built or not) and its build key."""
    for name in _SOURCES + _HEADERS:
        if not (_CSRC / name).is_file():
            raise RuntimeError(f"its source {_CSRC / name} is missing: the grao-kernels installation is incomplete")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler: {cxx!r} is not on PATH (install g++ or set CXX)")
    key = _build_key(_flags(), _compiler_identity(cxx))
    name = _build_name(key)
    return build_dir() / name / f"{name}.so", key


def _load() -> None:
    lib, key = _library()
    directory = lib.parent
    done = directory / "build.json"
    if not done.is_file():
        _build(lib, key, done)
    try:
        torch.ops.load_library(str(lib))
    except Exception as exc:
        raise RuntimeError(f"loading {lib} failed ({_summarise(exc)}); delete {directory} to rebuild it") from exc
    _register_fakes()


def _ninja_dir() -> str | None:
    """None when ``ninja`` is on PATH, else the directory of the ninja pip
    package's executable (a venv used without activating it)."""
    if shutil.which("ninja") is not None:
        return None
    candidates = [os.path.dirname(sys.executable)]
    try:
        import ninja

        candidates.insert(0, ninja.BIN_DIR)
    except ImportError:
        pass
    for candidate in candidates:
        if candidate and shutil.which("ninja", path=candidate) is not None:
            return candidate
    raise RuntimeError("the 'ninja' build tool is missing (pip install ninja)")


def _build(lib: Path, key: dict[str, object], done: Path) -> None:
    """Compile ``lib`` unless another process completes it first; ``done`` marks a finished build."""
    import fcntl

    from torch.utils import cpp_extension

    ninja_dir = _ninja_dir()
    directory = lib.parent
    directory.mkdir(parents=True, exist_ok=True)
    print(
        f"grao_kernels: compiling the native CPU backend into {directory} (first use, about a minute)",
        file=sys.stderr,
        flush=True,
    )
    with open(directory / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held until the build is done; freed if this process dies
        if done.is_file():  # built by another process while this one waited
            return
        # cpp_extension's own lock file is stale if a build was killed: under
        # the flock no other process is building here.
        (directory / "lock").unlink(missing_ok=True)
        path = os.environ.get("PATH", "")
        try:
            if ninja_dir is not None:
                os.environ["PATH"] = ninja_dir + os.pathsep + path
            cpp_extension.load(
                name=lib.stem,
                sources=[str(_CSRC / s) for s in _SOURCES],
                extra_cflags=key["flags"],
                extra_ldflags=list(_LDFLAGS),
                extra_include_paths=[str(_CSRC)],
                build_directory=str(directory),
                is_python_module=False,
                verbose=False,
            )
        except Exception as exc:  # compiler errors arrive as RuntimeError/CalledProcessError
            raise RuntimeError(f"building it in {directory} failed: {_summarise(exc)}") from exc
        finally:
            os.environ["PATH"] = path
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(key, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, done)


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
    threads: int | None = None,
) -> int:
    """Bytes of working memory one call allocates beyond its inputs and what it returns (statistics, gradients).

    Arguments as in ``torch_backend.workspace_bytes``; ``threads``: OpenMP threads (default
    ``torch.get_num_threads()``). The buffers of ``csrc/linear_logprobs_cpu.h`` at the blocks of
    :func:`plan_blocks`: one row block of float32 logits (the one-sweep gradient, without ``stats``) or one
    (rows x tile) logits tile per thread; one float32 weight tile per thread for a bfloat16/float16 weight; the
    dhidden partial sums (``_CHUNKS`` x rows x H float32); the per-tile softmax sums; the row block's float32
    hidden rows; the scaled float32 bias; the index of the computed rows. ``head`` does not change it.
    """
    budget = settings.budget(budget, DEFAULT_BUDGET)
    wants_grad = grad and any(needs)
    if rows <= 0 or V <= 0:
        return 0
    one_sweep = wants_grad and not stats
    R, tile = plan_blocks(V, H, one_sweep=one_sweep, budget=budget)
    R, VT = min(R, rows), max(1, min(tile, V))
    n_tiles = -(-V // VT)
    threads = threads or torch.get_num_threads()
    aligned = lambda n: -(-n // 16) * 16  # noqa: E731 - per-thread buffers start on 64-byte boundaries
    total = 4 * R * V if one_sweep else 4 * threads * aligned(R * VT)
    if (weight_dtype or hidden_dtype) != torch.float32:
        total += 4 * threads * aligned(VT * H)
    if wants_grad and needs[0]:
        total += 4 * min(_CHUNKS, n_tiles) * R * H
    if not (wants_grad and stats):
        total += 4 * n_tiles * R * (3 if entropy else 2)
    total += 4 * R * H + (4 * V if bias else 0) + 8 * rows
    return int(total)


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

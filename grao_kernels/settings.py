"""Backend knobs: one object, read from the environment once, at import.

Every tunable of every backend lives here, so there is one place to read and
one time at which the environment is read (``import grao_kernels``). Change a
knob at run time by assigning the attribute (``grao_kernels.settings.memory_budget
= 256 * 2**20``) or per call where the public function takes it as an argument
(``memory_budget=``), which wins over the setting.

=============================  ======================================  =====================================
attribute                      environment variable                    meaning
=============================  ======================================  =====================================
``backend``                    ``GRAO_KERNELS_BACKEND``                what ``backend="auto"`` resolves to
                                                                       (None: by device, see ``backends``)
``memory_budget``              ``GRAO_KERNELS_MEMORY_BUDGET_MB``       working-memory bound in bytes of every
                                                                       backend (None: each backend's default)
``native_tile_vocab``          ``GRAO_KERNELS_NATIVE_TILE_VOCAB``      vocabulary entries per native tile
``native_build_dir``           ``GRAO_KERNELS_BUILD_DIR``              where the native extension is built and
                                                                       cached (None: the user's cache directory,
                                                                       see ``backends/native_backend.py``); read
                                                                       when the backend is first loaded
``triton_mode``                ``GRAO_KERNELS_TRITON_MODE``            "auto", "chunked", "fused" or
                                                                       "epilogue" (by name only, see
                                                                       triton_kernels/epilogue.py)
``triton_config``              ``GRAO_KERNELS_TRITON_CONFIG``          pinned launch config (``"BLOCK_N=64,..."``)
``triton_dweight_sum``         ``GRAO_KERNELS_TRITON_DWEIGHT_SUM``     how the chunked sweep sums a bf16/fp16
                                                                       weight's gradient over row groups:
                                                                       "float32" (a V x H float32 accumulator
                                                                       in the budget) or "weight" (in the
                                                                       gradient itself, rounded once per group;
                                                                       the epilogue sweep always does this)
``triton_gemm1``               ``GRAO_KERNELS_TRITON_GEMM1``           the epilogue sweep's GEMM1: "auto"
                                                                       (persistent TMA kernel on compute
                                                                       capability >= 9, else pointer loads),
                                                                       "tma" (also under the interpreter) or
                                                                       "loads" (see common.tma_gemm1)
=============================  ======================================  =====================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

_MIB = 2**20


def _env_mb(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number of MiB, got {raw!r}") from exc
    return check_budget(int(value * _MIB), name)


def check_budget(nbytes, name: str = "memory_budget") -> int:
    """``nbytes`` as an int of at least 1 MiB, or a ValueError naming ``name``."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, (int, float)):
        raise ValueError(f"{name} must be a number of bytes, got {type(nbytes).__name__}")
    if not nbytes >= _MIB:
        raise ValueError(f"{name} must be at least 1 MiB (1048576 bytes), got {nbytes}")
    return int(nbytes)


@dataclass
class Settings:
    backend: str | None = None
    memory_budget: int | None = None
    native_tile_vocab: int = 256
    native_build_dir: str | None = None
    triton_mode: str = "auto"
    triton_config: str | None = None
    triton_dweight_sum: str = "float32"
    triton_gemm1: str = "auto"

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ.get
        return cls(
            backend=env("GRAO_KERNELS_BACKEND") or None,
            memory_budget=_env_mb("GRAO_KERNELS_MEMORY_BUDGET_MB"),
            native_tile_vocab=int(env("GRAO_KERNELS_NATIVE_TILE_VOCAB", "256")),
            native_build_dir=env("GRAO_KERNELS_BUILD_DIR") or None,
            triton_mode=env("GRAO_KERNELS_TRITON_MODE", "auto"),
            triton_config=env("GRAO_KERNELS_TRITON_CONFIG") or None,
            triton_dweight_sum=env("GRAO_KERNELS_TRITON_DWEIGHT_SUM", "float32"),
            triton_gemm1=env("GRAO_KERNELS_TRITON_GEMM1", "auto"),
        )

    def budget(self, per_call: int | None, default: int) -> int:
        """The working-memory bound of one call: the argument, else the setting, else ``default``."""
        if per_call is not None:
            return check_budget(per_call)
        if self.memory_budget is not None:
            return check_budget(self.memory_budget, "settings.memory_budget")
        return default

    def __repr__(self) -> str:
        return "Settings(" + ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)) + ")"


settings = Settings.from_env()

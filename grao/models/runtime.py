"""Where and how the model runs: device, mixed precision (autocast), attention kernel, CPU threads, loss backend."""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass

import torch

from grao_kernels import available_backends

from ..config import ConfigError


@dataclass
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None  # bf16 autocast on CUDA; None = full fp32
    attn_implementation: str


def choose(device: str = "auto", precision: str = "auto", attn_implementation: str = "auto") -> Runtime:
    """Device, mixed precision and attention kernel: bf16 + flash-attention 2 on CUDA when available.

    A device or attention kernel asked for by name that this machine cannot
    provide is a ConfigError naming the key.
    """
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"'device' is {device!r} but CUDA is not available on this machine")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ConfigError(f"'device' is {device!r} but this machine has {torch.cuda.device_count()} GPU(s)")
        elif dev.type != "cpu":
            raise ConfigError(f"'device' must be auto, cpu or cuda[:N], got {device!r}")
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    autocast_dtype = torch.bfloat16 if precision == "bf16" else None
    flash = dev.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    if attn_implementation == "auto":
        attn_implementation = "flash_attention_2" if flash else "sdpa"
    elif attn_implementation == "flash_attention_2" and not flash:
        raise ConfigError(
            f"'attn_implementation' flash_attention_2 needs CUDA and the flash-attn package (device {dev})"
        )
    return Runtime(dev, autocast_dtype, attn_implementation)


def check_loss_backend(backend: str, device: torch.device) -> None:
    """ConfigError unless the grao_kernels ``backend`` can run on ``device``."""
    usable = available_backends(device)
    if backend != "auto" and backend not in usable:
        raise ConfigError(
            f"'loss_backend' {backend!r} cannot run on {device}; available there: {', '.join(usable) or 'none'}"
        )


def set_threads(threads: int, single_threaded_default: bool, device: torch.device) -> None:
    """``threads`` CPU threads for torch; 0 = torch's default, or 1 where the model's matmuls are too small to split."""
    if threads:
        torch.set_num_threads(threads)
    elif single_threaded_default and device.type == "cpu":
        torch.set_num_threads(1)


def autocast(runtime: Runtime):
    """The runtime's mixed-precision context (a no-op in fp32)."""
    if runtime.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=runtime.device.type, dtype=runtime.autocast_dtype)

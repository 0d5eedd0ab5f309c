"""Shapes and the one input factory: every op's inputs at a shape, deterministic, prepared outside any timing."""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

import grao_kernels

from .device import bench_device

OPS = ("logprobs", "grao", "entropy")  # entropy: linear_logprob_loss with an entropy bonus
K = 4  # sequences per GRAO group: G = 3 completions and the reference answer, last
BETA, LAM, ENT = 0.5, 0.6, 0.01  # GRAO's beta and lambda; the entropy bonus weight


@dataclass(frozen=True)
class Shape:
    device: str
    N: int
    V: int
    H: int
    dtype: str = "float32"
    ignored: float = 0.0  # share of targets set to ignore_index

    @property
    def id(self) -> str:
        return f"{self.device}-N{self.N}-V{self.V}-H{self.H}-{self.dtype}" + (
            f"-ign{self.ignored}" * bool(self.ignored)
        )


# The CPU set must finish within ~10 minutes on 2 shared cores at ~70 GFLOP/s: one N x V x H GEMM at N=128,
# V=151936, H=1024 is 40 GFLOP and each method case runs the op a few times. GRAO_BENCH_CPU_TOKENS scales N.
CPU_TOKENS = int(os.environ.get("GRAO_BENCH_CPU_TOKENS", 128))
CPU_SHAPES = [Shape("cpu", CPU_TOKENS, V, H) for H in (256, 1024) for V in (32000, 65536, 151936)]
GPU_SHAPES = [Shape("cuda", N, V, 4096, "bfloat16") for N in (8192, 32768) for V in (128256, 151936, 262144)]


def shape_skip_reason(shape: Shape) -> str | None:
    dev = bench_device()
    if shape.device == "cuda" and not torch.cuda.is_available():
        return "GPU shape set: needs a CUDA device"
    if shape.device != dev.split(":")[0]:
        return f"CPU shape set: this run benchmarks {dev} (set GRAO_BENCH_DEVICE=cpu to run it)"
    return None


# the one input factory


@functools.cache
def computed_rows(shape: Shape) -> int:
    """The rows whose target is not ignored in ``make_inputs(shape)``: the rows every method computes."""
    if not shape.ignored:
        return shape.N
    return int(make_inputs(shape)["valid"].sum())


def layout(N: int) -> tuple[int, int]:
    """(S, T): S = P K sequences of T tokens, about 512 tokens each once N allows."""
    S = K * max(2, N // (K * 512))
    if N % S:
        raise ValueError(f"N={N} tokens must be a multiple of {S} sequences")
    return S, N // S


def make_inputs(shape: Shape, seed: int = 0) -> dict:
    """Deterministic inputs of every op at ``shape``; the leaves ``hidden`` (N, H) and ``weight`` require grad.

    Also: ``targets`` (N,) with ``shape.ignored`` of them ignore_index, GRAO ``rewards`` (P, K), the GRAO token
    coefficients ``coef`` (N,), the entropy bonus ``ent_coef`` (N,), and the per-sequence advantages that make
    Liger's GRPO loss gradient-equivalent to GRAO (see ``_liger_grpo``), prepared outside any timed region.
    """
    dev, dt, (N, V, H) = shape.device, getattr(torch, shape.dtype), (shape.N, shape.V, shape.H)
    gen = torch.Generator(device=dev).manual_seed(seed)
    S, T = layout(N)
    hidden = torch.randn(N, H, generator=gen, device=dev)
    # Rows of a smaller random block with random signs and scales: drawing V x H normals takes seconds on CPU,
    # and the values do not change any method's speed. Logit std ~2: peaked but not degenerate softmaxes.
    base = torch.randn(min(V, 8192), H, generator=gen, device=dev)
    rows = torch.randint(0, base.shape[0], (V,), generator=gen, device=dev)
    scale = torch.rand(V, 1, generator=gen, device=dev).add_(0.5).mul_(2.0 / math.sqrt(H))
    sign = torch.randint(0, 2, (V, 1), generator=gen, device=dev).mul_(2).sub_(1)
    weight = base.index_select(0, rows).mul_(scale * sign)
    targets = torch.randint(0, V, (N,), generator=gen, device=dev)
    if shape.ignored:
        targets[torch.rand(N, generator=gen, device=dev) < shape.ignored] = -100
    rewards = torch.randn(S // K, K, generator=gen, device=dev)
    coefs = grao_kernels.grao_coefficients(rewards, group_size=K - 1, beta=BETA, lam=LAM)
    valid = targets != -100
    return {
        "hidden": hidden.to(dt).requires_grad_(True),
        "weight": weight.to(dt).requires_grad_(True),
        "targets": targets,
        "rewards": rewards,
        "S": S,
        "T": T,
        "coef": coefs.token_coef(targets.view(S, T)).reshape(-1).float().contiguous(),
        "ent_coef": torch.where(valid, -ENT / valid.sum().clamp(min=1), 0.0).float(),
        "liger_adv": (-S * coefs.seq_coef).float().to(dev),
        "liger_mask": valid.view(S, T).long(),
        "valid": valid,
        "any_ignored": bool(shape.ignored),
    }

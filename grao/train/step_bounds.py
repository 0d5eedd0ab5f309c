"""A rough memory bound on one training step, checked before the run starts, so a setting such as
``prompts_per_step: 100000000000000000000`` is refused at once instead of hanging the first step while memory grows.

The estimate is a lower bound: the token ids, masks and per-token log-probs the step keeps for all its
``prompts_per_step * (group_size + 1)`` sequences of up to ``max_prompt_tokens + max_new_tokens`` tokens, plus one
micro-batch's final hidden states in float32. A step needing more than the device's memory (the machine's RAM on
CPU) cannot run. ``GRAO_SKIP_MEMORY_CHECK=1`` in the environment skips the check (a machine that swaps, a
deliberate experiment).
"""

from __future__ import annotations

import os

import torch

from ..config import ConfigError, TrainConfig

SKIP = "GRAO_SKIP_MEMORY_CHECK"
BYTES_PER_TOKEN = 32  # int64 ids and targets, masks, float32 log-probs (sampling and reference) per position


def step_bytes(cfg: TrainConfig, prompt_tokens: int, hidden_size: int) -> int:
    seq = prompt_tokens + cfg.rollout.max_new_tokens
    sequences = cfg.rollout.prompts_per_step * (cfg.rollout.group_size + 1)
    micro = (cfg.runtime.micro_batch_prompts or cfg.rollout.prompts_per_step) * (cfg.rollout.group_size + 1)
    return sequences * seq * BYTES_PER_TOKEN + micro * seq * hidden_size * 4


def device_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check(cfg: TrainConfig, prompt_tokens: int, hidden_size: int, device: torch.device) -> None:
    """ConfigError when one step needs more than ``device``'s memory, naming the keys that size it."""
    if os.environ.get(SKIP) == "1":
        return
    need, have = step_bytes(cfg, prompt_tokens, hidden_size), device_bytes(device)
    if need > have:
        raise ConfigError(
            f"one step needs at least {need / 2**30:.3g} GiB (prompts_per_step={cfg.rollout.prompts_per_step}, "
            f"group_size={cfg.rollout.group_size}, micro_batch_prompts={cfg.runtime.micro_batch_prompts}, "
            f"{prompt_tokens} prompt + {cfg.rollout.max_new_tokens} new tokens per sequence), more than the "
            f"{have / 2**30:.3g} GiB of {device}; "
            f"lower these keys (or set {SKIP}=1 to skip this check)"
        )

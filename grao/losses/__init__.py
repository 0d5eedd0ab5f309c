"""Losses: the trainer's loss seam (a LossBatch in, a LossOutput out), one loss per training method and the
registry that picks one by the ``method`` key."""

from .base import Loss, LossBatch, LossOutput
from .dpo import DPO, DPO_REJECTED
from .grao import GRAO, term_gradient_norms
from .grpo import GRPO, GRPO_LOSS_TYPES
from .ppo import PPO
from .registry import METHODS, REGISTRY, from_config
from .sft import SFT

__all__ = [
    "DPO",
    "DPO_REJECTED",
    "GRAO",
    "GRPO",
    "GRPO_LOSS_TYPES",
    "METHODS",
    "PPO",
    "REGISTRY",
    "SFT",
    "Loss",
    "LossBatch",
    "LossOutput",
    "from_config",
    "term_gradient_norms",
]

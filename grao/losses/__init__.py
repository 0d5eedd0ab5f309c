"""Losses: the trainer's loss seam (a LossBatch in, a LossOutput out) and one loss per training method,
chosen by the ``method`` key."""

from .base import GRAO, Loss, LossBatch, LossOutput
from .methods import DPO_REJECTED, GRPO_LOSS_TYPES, METHODS, from_config

__all__ = ["DPO_REJECTED", "GRAO", "GRPO_LOSS_TYPES", "METHODS", "Loss", "LossBatch", "LossOutput", "from_config"]

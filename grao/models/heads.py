"""The model's output head as the loss needs it: ``grao_kernels.hf`` (the one table of model-head transforms,
checked once against the model's own log-probs), its refusals raised as the trainer's ``ModelError``."""

from __future__ import annotations

import torch

from grao_kernels import hf
from grao_kernels.hf import LogitHead

from .errors import ModelError

__all__ = ["LogitHead", "backbone", "logit_head", "output_head"]


def backbone(model) -> torch.nn.Module:
    """The decoder stack producing the final (normed) hidden states the lm_head reads."""
    try:
        return hf.backbone(model)
    except hf.HeadError as exc:
        raise ModelError(str(exc)) from None


def output_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The lm_head's (V, H) weight and (V,) bias or None."""
    try:
        return hf.output_head(model)
    except hf.HeadError as exc:
        raise ModelError(str(exc)) from None


def logit_head(model, backend: str = "auto") -> LogitHead:
    """The head the loss applies for ``model`` (``grao_kernels.hf.check_head``), its refusal a ModelError."""
    try:
        return hf.check_head(model, backend=backend)
    except hf.HeadError as exc:
        raise ModelError(str(exc)) from None

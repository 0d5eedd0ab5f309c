"""grao-kernels: the GRAO loss and token log-probs without materialising the logits.

Public API::

    from grao_kernels import (fused_linear_logprobs, linear_logprob_loss, grao_coefficients, grao_loss,
                              group_advantages, GRAOLoss, settings)
"""

import warnings

from .api import (
    GRAOCoefficients,
    GRAOLoss,
    GRAOOutput,
    LinearLossOutput,
    LogprobsOutput,
    fused_linear_logprobs,
    grao_coefficients,
    grao_loss,
    group_advantages,
    linear_logprob_loss,
)
from .backends import available_backends
from .settings import check_budget, settings

__version__ = "0.1.0"


def set_memory_budget(nbytes: int) -> None:
    """Deprecated: assign ``grao_kernels.settings.memory_budget`` (every backend) or pass ``memory_budget=``."""
    warnings.warn(
        "grao_kernels.set_memory_budget is deprecated: set grao_kernels.settings.memory_budget "
        "(it bounds every backend) or pass memory_budget= per call",
        FutureWarning,
        stacklevel=2,
    )
    settings.memory_budget = check_budget(nbytes)


def memory_budget() -> int | None:
    """Deprecated: read ``grao_kernels.settings.memory_budget`` (None: each backend's default)."""
    warnings.warn(
        "grao_kernels.memory_budget() is deprecated: read grao_kernels.settings.memory_budget",
        FutureWarning,
        stacklevel=2,
    )
    return settings.memory_budget


__all__ = [
    "GRAOCoefficients",
    "GRAOLoss",
    "GRAOOutput",
    "LinearLossOutput",
    "LogprobsOutput",
    "available_backends",
    "fused_linear_logprobs",
    "grao_coefficients",
    "grao_loss",
    "group_advantages",
    "linear_logprob_loss",
    "memory_budget",
    "set_memory_budget",
    "settings",
]

"""grao-kernels: the GRAO loss and token log-probs without materialising the logits.

Public API::

    from grao_kernels import (fused_linear_logprobs, linear_logprob_loss, grao_coefficients, grao_loss,
                              group_advantages, GRAOLoss, settings)
"""

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
from .settings import settings

__version__ = "0.1.0"


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
    "settings",
]

"""grao-kernels: the GRAO loss and token log-probs without materialising the logits.

Public API::

    from grao_kernels import grao_loss, GRAOLoss, GRAOOutput, fused_linear_logprobs, group_advantages
"""

from .api import GRAOLoss, GRAOOutput, fused_linear_logprobs, grao_loss, group_advantages
from .backends import available_backends
from .backends.torch_backend import memory_budget, set_memory_budget

__version__ = "0.1.0"

__all__ = [
    "GRAOLoss",
    "GRAOOutput",
    "available_backends",
    "fused_linear_logprobs",
    "grao_loss",
    "group_advantages",
    "memory_budget",
    "set_memory_budget",
]

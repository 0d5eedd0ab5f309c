"""Tools for checking and measuring code that uses grao_kernels, as ``torch.testing`` is for PyTorch.

Not imported by the production path (``import grao_kernels`` does not load it):

- float64 oracles that materialise the logits, one per public op: :func:`reference_logits`,
  :func:`reference_lse`, :func:`reference_logprobs` (``fused_linear_logprobs``), :func:`reference_linear_loss`
  (``linear_logprob_loss``), :func:`reference_advantages` (``group_advantages``), :func:`reference_grao`
  (``grao_loss``);
- comparisons against them: :func:`rel_l2`, :func:`assert_close` (reports how many elements mismatch and the
  worst one), :func:`assert_within_torch_error` (a low-precision result against PyTorch's own error);
- peak memory of a call: :func:`peak_meter` (``torch.cuda.max_memory_allocated`` on a GPU, the resident-set
  high-water mark on CPU), and :class:`TensorBytes`, the bytes of the tensors it allocates (to check a
  backend's ``workspace_bytes``).
"""

from .assertions import assert_close, assert_within_torch_error, rel_l2
from .memory import TensorBytes, peak_meter, peak_rss_bytes, reset_peak_rss, rss_bytes
from .reference import (
    reference_advantages,
    reference_grao,
    reference_linear_loss,
    reference_logits,
    reference_logprobs,
    reference_lse,
)

__all__ = [
    "TensorBytes",
    "assert_close",
    "assert_within_torch_error",
    "peak_meter",
    "peak_rss_bytes",
    "reference_advantages",
    "reference_grao",
    "reference_linear_loss",
    "reference_logits",
    "reference_logprobs",
    "reference_lse",
    "rel_l2",
    "reset_peak_rss",
    "rss_bytes",
]

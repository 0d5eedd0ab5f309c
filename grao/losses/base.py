"""The training objective as a value: the trainer calls ``loss(batch) -> LossOutput`` once per micro-batch.

The trainer owns sampling, scoring, the backbone forward and the optimizer; a
loss owns the formula. It receives the backbone's final hidden states, the
lm_head weight and the head's logit scale and soft cap (never the logits),
the completion targets, the rewards and the group layout of one micro-batch,
and returns its share of the step's loss with the terms to log. Any callable with that signature is a loss: other methods
(SFT, DPO, GRPO, ...) and the benchmarks' variants plug in as
``Trainer(cfg, loss=...)``, without touching the trainer.

Two optional attributes of a loss ask the trainer for more (see :class:`Loss`):

* ``needs_reference_model`` (bool): the trainer keeps a frozen copy of the
  starting model and passes its token log-probs as ``LossBatch.reference_logp``.
* ``snapshot(batch) -> dict[str, Tensor]``: what the loss needs of the policy
  that sampled the rollout (PPO-style old log-probs, old values). With
  ``num_iterations`` > 1 the trainer takes ``num_iterations`` optimizer steps
  on each rollout; before the first it runs the backbone of the current,
  not yet updated policy over each micro-batch under ``torch.no_grad`` and
  calls ``snapshot`` on that micro-batch, then passes the result on every
  iteration as ``LossBatch.old`` (the same micro-batch split, so its tensors
  have the micro-batch's shapes). With ``num_iterations`` = 1 no snapshot is
  taken and ``old`` is None: the policy updated is the one that sampled, so a
  loss takes what it needs from the current forward, detached.

A loss may also be an ``nn.Module`` with parameters (PPO's value head): the
trainer moves it to the device, trains its parameters with the model's and
checkpoints its ``state_dict``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from grao_kernels import fused_linear_logprobs, linear_logprob_loss


@dataclass(frozen=True)
class LossBatch:
    """One micro-batch of whole prompt groups, group-major: ``len(groups) * (group_size + 1)`` sequences.

    Sequence ``s`` belongs to the micro-batch's prompt ``s // (G+1)`` (prompt
    ``groups[s // (G+1)]`` of the step) and is that prompt's reference answer
    when ``s % (G+1) == G``; the others are its G sampled completions.
    """

    hidden: torch.Tensor  # (S, T, H) final hidden states, in the compute dtype (bf16 under autocast)
    weight: torch.Tensor  # (V, H) lm_head weight, same dtype
    bias: torch.Tensor | None  # (V,) lm_head bias or None
    targets: torch.Tensor  # (S, T) int64: targets[s, t] is the token position t predicts; ignore_index elsewhere
    rewards: torch.Tensor  # (len(groups), G+1) float32, the reference's reward last
    group_size: int  # G, sampled completions per prompt
    groups: range  # which of the step's prompt groups these are
    num_groups: int  # P, prompt groups in the whole step
    ignore_index: int = -100
    step_token_counts: torch.Tensor | None = None  # (P, G+1) completion tokens of every sequence of the whole step
    reference_logp: torch.Tensor | None = None  # (S, T) the frozen reference model's, for needs_reference_model losses
    # The model's logits are softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap) (no tanh without
    # softcap): grao.models.LogitHead, read from the model config; pass both to every grao_kernels call.
    logit_scale: float = 1.0
    softcap: float | None = None
    # The log-probs are those of logits / temperature: 1 (the model's distribution) unless the config's
    # logprob_temperature is 'sampling' (the completions' sampling temperature, as TRL does). reference_logp is taken
    # at the same temperature.
    temperature: float = 1.0
    # The loss's snapshot of the policy that sampled this rollout (Loss.snapshot), the same on each of the rollout's
    # num_iterations optimizer steps; None with num_iterations = 1 or a loss without snapshot.
    old: dict[str, torch.Tensor] | None = None
    # (S, T) the sampling engine's log-probs of the sampled completions' tokens (at the batch's temperature), 0 at
    # the reference answers' and outside completions; None when the engine gives none (transformers' generate).
    sampling_logp: torch.Tensor | None = None

    def head(self) -> dict:
        """The keyword arguments of every grao_kernels call on this batch that say how its logits are formed."""
        return dict(
            bias=self.bias,
            temperature=self.temperature,
            logit_scale=self.logit_scale,
            softcap=self.softcap,
            ignore_index=self.ignore_index,
        )

    @property
    def share(self) -> float:
        """This micro-batch's weight in the step: its m of the step's P prompt groups, m / P. A loss that averages
        over the groups it is given returns its average times ``share``, so the shares sum to the one-batch loss."""
        return len(self.groups) / self.num_groups

    def is_reference(self) -> torch.Tensor:
        """(S,) bool: which of the micro-batch's group-major sequences is its group's reference answer."""
        K = self.group_size + 1
        return torch.arange(len(self.groups) * K, device=self.targets.device) % K == self.group_size

    def sample_token_count(self) -> int | None:
        """N: completion tokens of the whole step's sampled completions (not its reference answers); None when this
        is a micro-batch of the step and ``step_token_counts`` is None."""
        if self.step_token_counts is not None:
            return int(self.step_token_counts[:, : self.group_size].sum())
        if len(self.groups) != self.num_groups:
            return None
        return int((self.targets != self.ignore_index).sum(1).view(-1, self.group_size + 1)[:, :-1].sum())

    def token_values(self, values: torch.Tensor | None, name: str, needed_by: str) -> torch.Tensor:
        """``values``, this batch's (S, T) token values ``name``, detached in float32; ValueError if absent or
        misshapen."""
        if values is None:
            raise ValueError(f"{needed_by}: LossBatch.{name} is None")
        if tuple(values.shape) != tuple(self.targets.shape):
            raise ValueError(f"{name} shape {tuple(values.shape)} does not match targets {tuple(self.targets.shape)}")
        return values.detach().float()

    def logprobs(self, backend: str) -> torch.Tensor:
        """(S, T) differentiable token log-probs under this batch's head (``grao_kernels.fused_linear_logprobs``)."""
        return fused_linear_logprobs(self.hidden, self.weight, self.targets, backend=backend, **self.head())

    def sweep(self, token_coef: torch.Tensor, backend: str):
        """``sum_t token_coef[t] logp[t]`` and its gradients in one ``grao_kernels.linear_logprob_loss`` sweep."""
        return linear_logprob_loss(self.hidden, self.weight, self.targets, token_coef, backend=backend, **self.head())


@dataclass
class LossOutput:
    """``loss``: this micro-batch's share of the step's loss (the trainer sums the shares, then backpropagates each);
    ``metrics``: detached terms to log, in the same convention (their sum over micro-batches is the step's value);
    ``token_logp``: the (S, T) detached token log-probs the loss computed on the way (at the batch's temperature), or
    None: the trainer compares them with the sampling engine's (``rollout/logp_gap``) without another forward."""

    loss: torch.Tensor
    metrics: dict[str, float]
    token_logp: torch.Tensor | None = None


class Loss(Protocol):
    """``loss(batch)``; optionally ``needs_reference_model`` (bool attribute or property, default False),
    ``reference_in_group`` (bool, default True: the advantages are normalised over the G samples and the
    reference answer; False where they are over the samples alone, which ``reward/zero_std_groups`` follows)
    and ``snapshot(batch) -> dict[str, Tensor]`` (called under no_grad, see the module docstring)."""

    def __call__(self, batch: LossBatch) -> LossOutput: ...


def truncated_importance_weights(batch: LossBatch, cap: float) -> torch.Tensor | None:
    """(S, T) float32 ``min(exp(old_t - sampling_t), cap)`` at the sampled completions' tokens (1 elsewhere): TRL's
    truncated importance-sampling correction of the mismatch between the engine that sampled (``sampling_logp``)
    and the trainer's own log-probs of the policy that sampled (``old["logp"]``), multiplied into the policy loss of
    each token; None when ``cap`` is 0 or the batch has no old or no sampling log-probs."""
    if cap <= 0 or batch.old is None or batch.sampling_logp is None:
        return None
    old = batch.token_values(batch.old.get("logp"), 'old["logp"]', "the importance-sampling correction")
    sampling = batch.token_values(batch.sampling_logp, "sampling_logp", "the importance-sampling correction")
    sampled = (batch.targets != batch.ignore_index) & ~batch.is_reference()[:, None]
    return torch.where(sampled, torch.exp(old - sampling).clamp(max=cap), 1.0)


def spread(seq_coef: torch.Tensor, targets: torch.Tensor, ignore_index: int, *, mean: bool) -> torch.Tensor:
    """(S, T) float32 token coefficients: ``seq_coef[s]`` (divided by n_s with ``mean``) at the n_s positions of row
    s that are not ignored, 0 elsewhere. The division is in float64 (``GRAOCoefficients.token_coef`` rounds to
    float32 first), so the per-token weights of the methods that use it stay as they were."""
    mask = targets != ignore_index
    coef = seq_coef.to(device=targets.device, dtype=torch.float64)
    if mean:
        coef = coef / mask.sum(1).clamp(min=1)
    return torch.where(mask, coef.float()[:, None], 0.0)


def check_number(name: str, value, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False) -> float:
    """``value`` as a float when it is a finite number in [low, high] ((low, high] with ``low_open``); else a
    ValueError naming ``name``, its range and the value. The one argument check of the loss constructors."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (low < value if low_open else low <= value) or value > high:
        span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if math.isinf(high) else ']'}"
        raise ValueError(f"{name} must be a finite number in {span}, got {value!r}")
    return float(value)

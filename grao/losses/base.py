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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from grao_kernels import grao_loss


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

    def head(self) -> dict:
        """The keyword arguments of every grao_kernels call on this batch that say how its logits are formed."""
        return dict(
            bias=self.bias,
            temperature=self.temperature,
            logit_scale=self.logit_scale,
            softcap=self.softcap,
            ignore_index=self.ignore_index,
        )


@dataclass
class LossOutput:
    """``loss``: this micro-batch's share of the step's loss (the trainer sums the shares, then backpropagates each);
    ``metrics``: detached terms to log, in the same convention (their sum over micro-batches is the step's value)."""

    loss: torch.Tensor
    metrics: dict[str, float]


class Loss(Protocol):
    """``loss(batch)``; optionally ``needs_reference_model`` (bool attribute or property, default False) and
    ``snapshot(batch) -> dict[str, Tensor]`` (called under no_grad, see the module docstring)."""

    def __call__(self, batch: LossBatch) -> LossOutput: ...


class GRAO:
    """The GRAO objective (arXiv 2508.07750, Eq. 3-4) through ``grao_kernels.grao_loss``, or any function with
    grao_loss's signature and result (``fn``; e.g. a full-logits reference for a benchmark).

    ``grao_loss`` averages over the prompts it is given, so a micro-batch of m
    of the P groups is weighted m / P: the shares sum to the one-batch loss
    (advantages are computed within each group, so splitting between groups
    changes nothing else).
    """

    TERMS = ("exploration", "imitation", "alignment")

    def __init__(self, beta: float = 0.5, lam: float = 0.6, backend: str = "auto", fn: Callable = grao_loss):
        self.beta, self.lam, self.backend, self.fn = beta, lam, backend, fn

    def __call__(self, batch: LossBatch) -> LossOutput:
        out = self.fn(
            batch.hidden,
            batch.weight,
            batch.targets,
            batch.rewards,
            group_size=batch.group_size,
            beta=self.beta,
            lam=self.lam,
            backend=self.backend,
            **batch.head(),
        )
        share = len(batch.groups) / batch.num_groups
        metrics = {f"objective/{t}": float(getattr(out, t)) * share for t in self.TERMS}
        return LossOutput(out.loss * share, metrics)

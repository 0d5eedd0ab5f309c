"""The training methods as losses of the trainer's seam (:class:`grao.losses.Loss`), chosen by the ``method`` key.

Every method is a loss linear in the token log-probs with coefficients known
before the forward pass, so each one is a ``grao_kernels.linear_logprob_loss``
sweep over the backbone's hidden states and the lm_head weight: no (tokens x
vocabulary) logits. Notation as in ``grao_kernels.api``: a step has P prompt
groups of G sampled completions o_1..o_G and a reference answer y, J(s) is
the mean log-prob over the completion tokens of sequence s, n_s their number.

* ``grao``: :class:`grao.losses.GRAO` (arXiv 2508.07750, Eq. 3-4).
* ``grao-no-exploration`` / ``grao-no-imitation`` / ``grao-no-alignment``
  (the paper's Table 3 ablations): :class:`GRAOTerms`, GRAO with one of its
  three terms weighted 0.
* ``sft``: :class:`SFT`, the NLL of the reference answers.
* ``grpo``: :class:`GRPO`, on-policy GRPO with advantages over the G samples
  and TRL's loss aggregations (``grpo_loss_type``).
* ``dpo``: :class:`DPO`, the reference answer against the data's rejected
  answer or the lowest-scored sample (``dpo_rejected``), with a frozen
  reference model (``dpo_beta``). DPO's loss is not
  linear in the log-probs: it differentiates through
  ``grao_kernels.fused_linear_logprobs`` instead (still no logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from grao_kernels import fused_linear_logprobs, grao_coefficients, group_advantages, linear_logprob_loss
from grao_kernels.api import sequence_logp

from .losses import GRAO, LossBatch, LossOutput

METHODS = ("grao", "grao-no-exploration", "grao-no-imitation", "grao-no-alignment", "sft", "grpo", "dpo")
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
DPO_REJECTED = ("auto", "data", "sampled")  # where dpo's rejected answers come from (grao.data.rejected_source)


def from_config(cfg) -> GRAO | GRAOTerms | SFT | GRPO | DPO:
    """The loss of ``cfg.method`` with the config's weights, backend and (for grpo) aggregation."""
    m, backend = cfg.method, cfg.loss_backend
    if m == "grao":
        return GRAO(cfg.beta, cfg.lam, backend)
    if m == "grao-no-exploration":
        return GRAOTerms(cfg.beta, cfg.lam, exploration=0.0, backend=backend)
    if m == "grao-no-imitation":
        return GRAOTerms(0.0, cfg.lam, backend=backend)
    if m == "grao-no-alignment":
        return GRAOTerms(cfg.beta, 0.0, backend=backend)
    if m == "sft":
        return SFT(backend)
    if m == "grpo":
        return GRPO(cfg.grpo_loss_type, max_completion_length=cfg.max_new_tokens, backend=backend)
    if m == "dpo":
        return DPO(cfg.dpo_beta, backend=backend)
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {m!r}")


def _spread(seq_coef: torch.Tensor, targets: torch.Tensor, ignore_index: int, *, mean: bool) -> torch.Tensor:
    """(S, T) float32 token coefficients: ``seq_coef[s]`` (divided by n_s with ``mean``) at the n_s
    positions of row s that are not ignored, 0 elsewhere."""
    mask = targets != ignore_index
    coef = seq_coef.to(device=targets.device, dtype=torch.float64)
    if mean:
        coef = coef / mask.sum(1).clamp(min=1)
    return torch.where(mask, coef.float()[:, None], 0.0)


def _sweep(batch: LossBatch, token_coef: torch.Tensor, backend: str):
    return linear_logprob_loss(
        batch.hidden,
        batch.weight,
        batch.targets,
        token_coef,
        backend=backend,
        **batch.head(),
    )


def _is_reference(batch: LossBatch) -> torch.Tensor:
    """(S,) bool: which of the micro-batch's group-major sequences is its group's reference answer."""
    K = batch.group_size + 1
    return torch.arange(len(batch.groups) * K, device=batch.targets.device) % K == batch.group_size


class GRAOTerms:
    """GRAO with a weight on each of its three terms (arXiv 2508.07750, Eq. 3-4; ablations of Table 3)::

        obj_p = exploration * (1/G) sum_i A_i J(o_i)          (exploration)
              + beta * A_y J(y)                                (imitation)
              + lam * (1/G) sum_i A_i (J(o_i) - J(y))          (alignment),   loss = -mean_p obj_p

    ``exploration=1`` is :class:`grao.losses.GRAO`; beta = 0 drops imitation
    and lam = 0 alignment. The coefficients are ``grao_coefficients``' with
    the exploration part of each completion's, ``-group_weight * A_i``
    (``group_weight`` = 1 / (G P), the weight of a completion's term), scaled
    by ``exploration``. Logged terms are the weighted ones, so
    ``loss = -(exploration + imitation + alignment)``.
    """

    TERMS = GRAO.TERMS

    def __init__(self, beta: float = 0.5, lam: float = 0.6, *, exploration: float = 1.0, backend: str = "auto"):
        self.beta, self.lam, self.exploration, self.backend = beta, lam, float(exploration), backend

    def __call__(self, batch: LossBatch) -> LossOutput:
        coefs = grao_coefficients(batch.rewards, group_size=batch.group_size, beta=self.beta, lam=self.lam)
        explore = torch.where(coefs.is_reference, 0.0, coefs.group_weight * coefs.advantages)
        coefs = coefs._replace(seq_coef=coefs.seq_coef + (1.0 - self.exploration) * explore)
        # The coefficients average over this micro-batch's m groups; the step averages over P.
        share = len(batch.groups) / batch.num_groups
        out = _sweep(batch, coefs.token_coef(batch.targets, batch.ignore_index) * share, self.backend)
        j = sequence_logp(out.logp, (batch.targets != batch.ignore_index).sum(1))
        exploration, imitation, alignment = coefs.terms(j)
        terms = (exploration * self.exploration, imitation, alignment)
        return LossOutput(out.loss, {f"objective/{t}": float(v) * share for t, v in zip(self.TERMS, terms)})


class SFT:
    """Supervised fine-tuning on the reference answers: ``loss = -(1/P) sum_p J(y_p)``.

    Each reference answer's NLL is normalised by its own length (the mean over
    its tokens, as J is in GRAO), then averaged over the P prompts, so a
    micro-batch's share needs nothing of the other micro-batches. (A mean over
    all the step's reference tokens would weight long answers more.) The
    sampled completions get coefficient 0.
    """

    def __init__(self, backend: str = "auto"):
        self.backend = backend

    def __call__(self, batch: LossBatch) -> LossOutput:
        seq_coef = torch.where(_is_reference(batch), -1.0 / batch.num_groups, 0.0)
        out = _sweep(batch, _spread(seq_coef, batch.targets, batch.ignore_index, mean=True), self.backend)
        return LossOutput(out.loss, {"objective/nll": float(out.loss.detach())})


class GRPO:
    """On-policy GRPO (DeepSeekMath, arXiv 2402.03300) over the G sampled completions of each prompt.

    Advantages ``A_i = (r_i - mean(r)) / (std(r) + eps)`` over the group's G
    sampled rewards only (the reference answer is not in the group and gets
    coefficient 0), by ``grao_kernels.group_advantages``: population std, and
    0 for a group whose rewards are all equal (TRL uses the Bessel-corrected
    std and eps = 1e-4). With one policy update per rollout (TRL's
    ``num_iterations=1``) the clipped ratio is exp(logp - logp.detach()) = 1,
    so the per-token loss ``-A_i * ratio`` has gradient ``-A_i grad logp`` and
    the loss is linear in the log-probs. The value returned is that linear
    surrogate ``sum_t c_t logp_t`` (same gradient as TRL's; TRL's loss value
    is ``sum_t c_t``). TRL's ``loss_type`` aggregations, with B = P G
    completions, L = ``max_completion_length`` and N = the step's completion
    tokens:

    * ``grpo``:    c_t = -A_i / (n_i B)   (each completion's token mean, then the mean over completions)
    * ``dr_grpo``: c_t = -A_i / (B L)     (token sum over B times the longest allowed completion)
    * ``dapo``:    c_t = -A_i / N         (token mean over the whole step)

    ``dapo`` over micro-batches needs N of the whole step
    (``LossBatch.step_token_counts``). Not covered: the KL penalty to a frozen
    reference model, and ``num_iterations > 1`` (old log-probs, ratio clipping).
    """

    def __init__(
        self,
        loss_type: str = "grpo",
        *,
        max_completion_length: int | None = None,
        eps: float = 1e-6,
        backend: str = "auto",
    ):
        if loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(GRPO_LOSS_TYPES)}, got {loss_type!r}")
        if loss_type == "dr_grpo" and (
            isinstance(max_completion_length, bool)
            or not isinstance(max_completion_length, int)
            or max_completion_length < 1
        ):
            raise ValueError(
                f"loss_type='dr_grpo' divides by max_completion_length, which must be an int >= 1, "
                f"got {max_completion_length!r}"
            )
        self.loss_type, self.max_completion_length, self.eps, self.backend = (
            loss_type,
            max_completion_length,
            eps,
            backend,
        )

    def _sample_tokens(self, batch: LossBatch) -> int:
        """N: completion tokens of the step's sampled completions (not its reference answers)."""
        if batch.step_token_counts is not None:
            return int(batch.step_token_counts[:, : batch.group_size].sum())
        if len(batch.groups) != batch.num_groups:
            raise ValueError(
                f"loss_type='dapo' on a micro-batch of {len(batch.groups)} of the step's {batch.num_groups} groups "
                f"needs the whole step's token counts: LossBatch.step_token_counts is None"
            )
        return int((batch.targets != batch.ignore_index).sum(1).view(-1, batch.group_size + 1)[:, :-1].sum())

    def __call__(self, batch: LossBatch) -> LossOutput:
        G, B = batch.group_size, batch.num_groups * batch.group_size
        adv = group_advantages(batch.rewards[:, :G], eps=self.eps)
        adv = torch.cat([adv, torch.zeros_like(adv[:, :1])], dim=1).reshape(-1).double()  # reference last: 0
        if self.loss_type == "grpo":
            seq_coef, mean = -adv / B, True
        elif self.loss_type == "dr_grpo":
            seq_coef, mean = -adv / (B * self.max_completion_length), False
        else:
            seq_coef, mean = -adv / max(self._sample_tokens(batch), 1), False
        out = _sweep(batch, _spread(seq_coef, batch.targets, batch.ignore_index, mean=mean), self.backend)
        return LossOutput(out.loss, {"objective/policy": -float(out.loss.detach())})


class DPO:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7) on each prompt's reference answer and one sample::

        z_p  = beta * [(log pi(y_p) - log pi_ref(y_p)) - (log pi(o_p) - log pi_ref(o_p))]
        loss = (1/P) sum_p -log sigmoid(z_p)

    log pi(s) is the SUM of the completion tokens' log-probs (DPO's sequence
    likelihood, not GRAO's mean J); chosen y_p = the reference answer,
    rejected o_p = the group's lowest-scored sample (the first on ties). With
    the data's rejected answers (``dpo_rejected``: data, or auto on data that
    has them) the trainer builds each group as that answer and the reference
    (G = 1, nothing sampled), so o_p is the data's rejected answer.
    pi_ref is the frozen starting model: the trainer computes its token
    log-probs under no_grad (``LossBatch.reference_logp``) for a loss with
    ``needs_reference_model``. The other G - 1 samples get no gradient.
    """

    needs_reference_model = True

    def __init__(self, beta: float = 0.1, *, backend: str = "auto"):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta < float("inf"):
            raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
        self.beta, self.backend = float(beta), backend

    def __call__(self, batch: LossBatch) -> LossOutput:
        if batch.reference_logp is None:
            raise ValueError("DPO needs the frozen reference model's token log-probs: LossBatch.reference_logp is None")
        if tuple(batch.reference_logp.shape) != tuple(batch.targets.shape):
            raise ValueError(
                f"reference_logp shape {tuple(batch.reference_logp.shape)} does not match targets "
                f"{tuple(batch.targets.shape)}"
            )
        G, m = batch.group_size, len(batch.groups)
        logp = fused_linear_logprobs(
            batch.hidden,
            batch.weight,
            batch.targets,
            backend=self.backend,
            **batch.head(),
        )
        ignored = batch.targets == batch.ignore_index
        ref = torch.where(ignored, 0.0, batch.reference_logp.detach().float())
        delta = (logp.sum(1) - ref.sum(1)).view(m, G + 1)
        rejected = batch.rewards[:, :G].argmin(1).to(delta.device)
        margin = self.beta * (delta[:, G] - delta.gather(1, rejected[:, None])[:, 0])
        loss = F.softplus(-margin).sum() / batch.num_groups  # -log sigmoid(z) = softplus(-z)
        share = float(margin.detach().sum()) / batch.num_groups
        return LossOutput(loss, {"objective/dpo": float(loss.detach()), "dpo/margin": share})

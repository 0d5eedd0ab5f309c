"""GRPO (DeepSeekMath, arXiv 2402.03300) over the G sampled completions of each prompt, with TRL's loss
aggregations, an optional KL to the frozen starting model and the clipped ratio to the sampling policy."""

from __future__ import annotations

import torch

from grao_kernels import group_advantages

from .base import LossBatch, LossOutput, check_number, spread, truncated_importance_weights

GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


class GRPO:
    """GRPO (DeepSeekMath, arXiv 2402.03300) over the G sampled completions of each prompt, as TRL computes it.

    Advantages ``A_i = (r_i - mean(r)) / (std(r) + eps)`` over the group's G
    sampled rewards only (the reference answer is not in the group and gets
    weight 0), by ``grao_kernels.group_advantages``: population std, and 0 for
    a group whose rewards are all equal (TRL uses the Bessel-corrected std and
    eps = 1e-4). Per token t of completion i, with ``r_t = exp(logp_t -
    old_t)`` the ratio to the policy that sampled (``LossBatch.old["logp"]``,
    :meth:`snapshot`) and ``d_t = ref_t - logp_t`` to the frozen starting model
    (``LossBatch.reference_logp``)::

        loss_t = -min(r_t A_i, clip(r_t, 1 - clip_epsilon, 1 + clip_epsilon_high) A_i)
                 + kl_beta * (exp(d_t) - d_t - 1)           (k3 estimate of KL(pi || pi_ref))

    and ``loss = sum_t w_t loss_t`` with TRL's ``loss_type`` aggregation
    weights w_t over B = P G completions, L = ``max_completion_length`` and
    N = the step's sampled completion tokens:

    * ``grpo``:    w_t = 1 / (n_i B)   (each completion's token mean, then the mean over completions)
    * ``dr_grpo``: w_t = 1 / (B L)     (token sum over B times the longest allowed completion)
    * ``dapo``:    w_t = 1 / N         (token mean over the whole step)

    Without old log-probs (``num_iterations`` = 1: the policy updated is the
    one that sampled) the ratio is exp(logp - logp.detach()) = 1 with gradient
    ``grad logp``, and the policy term is written as its linear surrogate
    ``-A_i logp_t`` (the same gradient as TRL's; TRL's value is ``-A_i``).
    With ``kl_beta`` = 0 that loss is linear in the log-probs with
    coefficients ``c_t = -A_i w_t``: one ``linear_logprob_loss`` sweep. With
    the KL or the clipped ratio it differentiates through
    ``fused_linear_logprobs`` (no logits either way).

    Logged: ``objective/policy`` = -sum_t w_t (policy part of loss_t);
    with kl_beta > 0, ``grpo/kl`` = sum_t w_t k3_t (so loss = -policy + kl_beta
    kl); with old log-probs, ``grpo/clip_ratio``, the share of the step's
    sampled tokens whose ratio is clipped (TRL's region: r < 1 - eps with A < 0
    or r > 1 + eps_high with A > 0; they get no policy gradient).
    ``dapo``, and the clip ratio, over micro-batches need N of the whole step
    (``LossBatch.step_token_counts``).

    ``importance_sampling_cap`` > 0 (with old log-probs and an engine's ``LossBatch.sampling_logp``): the policy
    part of loss_t is multiplied by ``min(exp(old_t - sampling_t), cap)``, TRL's truncated importance-sampling
    correction (:func:`grao.losses.base.truncated_importance_weights`).
    """

    reference_in_group = False  # advantages over the G samples alone: reward/zero_std_groups ties those

    def __init__(
        self,
        loss_type: str = "grpo",
        *,
        max_completion_length: int | None = None,
        kl_beta: float = 0.0,
        clip_epsilon: float = 0.2,
        clip_epsilon_high: float | None = None,
        eps: float = 1e-6,
        importance_sampling_cap: float = 0.0,
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
        kl_beta = check_number("kl_beta", kl_beta, 0.0)
        clip_epsilon = check_number("clip_epsilon", clip_epsilon, 0.0, low_open=True)
        if clip_epsilon_high is not None:
            clip_epsilon_high = check_number("clip_epsilon_high", clip_epsilon_high, 0.0, low_open=True)
        self.loss_type, self.max_completion_length, self.eps, self.backend = (
            loss_type,
            max_completion_length,
            eps,
            backend,
        )
        self.kl_beta = float(kl_beta)
        self.importance_sampling_cap = check_number("importance_sampling_cap", importance_sampling_cap, 0.0)
        self.clip_low = 1.0 - clip_epsilon
        self.clip_high = 1.0 + (clip_epsilon if clip_epsilon_high is None else clip_epsilon_high)

    @property
    def needs_reference_model(self) -> bool:
        """The KL term compares with the frozen starting model; without it (kl_beta = 0) none is loaded."""
        return self.kl_beta > 0

    def snapshot(self, batch: LossBatch) -> dict[str, torch.Tensor]:
        """``{"logp": (S, T)}``: the token log-probs of the policy that sampled the rollout (ratio denominators)."""
        with torch.no_grad():
            logp = batch.logprobs(self.backend)
        return {"logp": logp.detach()}

    def _weights(self, batch: LossBatch) -> tuple[torch.Tensor, bool]:
        """(S,) float64 aggregation weight of each sequence (0 for the reference answers) and whether it is further
        divided by the sequence's token count (w_t of the class docstring)."""
        B = batch.num_groups * batch.group_size
        samples = (~batch.is_reference()).double()
        if self.loss_type == "grpo":
            return samples / B, True
        if self.loss_type == "dr_grpo":
            return samples / (B * self.max_completion_length), False
        n = batch.sample_token_count()
        if n is None:
            raise ValueError(
                f"loss_type='dapo' on a micro-batch of {len(batch.groups)} of the step's {batch.num_groups} groups "
                f"needs the whole step's token counts: LossBatch.step_token_counts is None"
            )
        return samples / max(n, 1), False

    def __call__(self, batch: LossBatch) -> LossOutput:
        G = batch.group_size
        adv = group_advantages(batch.rewards[:, :G], eps=self.eps)
        adv = torch.cat([adv, torch.zeros_like(adv[:, :1])], dim=1).reshape(-1).double()  # reference last: 0
        seq_weight, mean = self._weights(batch)
        if batch.old is None and self.kl_beta == 0:  # linear in logp: c_t = -A_i w_t, one sweep
            coef = spread(-adv.to(seq_weight.device) * seq_weight, batch.targets, batch.ignore_index, mean=mean)
            out = batch.sweep(coef, self.backend)
            return LossOutput(out.loss, {"objective/policy": -float(out.loss.detach())}, out.logp)
        return self._surrogate(batch, adv, spread(seq_weight, batch.targets, batch.ignore_index, mean=mean))

    def _surrogate(self, batch: LossBatch, adv: torch.Tensor, w: torch.Tensor) -> LossOutput:
        """The per-token loss of the class docstring, through the differentiable fused log-probs."""
        logp = batch.logprobs(self.backend)
        mask = batch.targets != batch.ignore_index
        a = adv.to(device=logp.device, dtype=torch.float32)[:, None]
        metrics = {}
        if batch.old is None:
            policy = a * logp  # ratio 1: the linear surrogate, TRL's gradient
        else:
            old = batch.token_values(batch.old.get("logp"), 'old["logp"]', "GRPO's clipped ratio")
            ratio = torch.exp(torch.where(mask, logp - old, 0.0))
            policy = torch.min(ratio * a, ratio.clamp(self.clip_low, self.clip_high) * a)
            weights = truncated_importance_weights(batch, self.importance_sampling_cap)
            if weights is not None:
                policy = policy * weights
            n = batch.sample_token_count()
            if n is not None:
                clipped = ((ratio < self.clip_low) & (a < 0)) | ((ratio > self.clip_high) & (a > 0))
                metrics["grpo/clip_ratio"] = float((clipped & mask & (w > 0)).sum()) / max(n, 1)
        loss_t = -policy
        objective = float((w * torch.where(mask, policy, 0.0)).detach().sum())
        if self.kl_beta > 0:
            ref = batch.token_values(batch.reference_logp, "reference_logp", "GRPO's KL to the reference model")
            d = ref - logp
            kl = torch.where(mask, torch.exp(d) - d - 1, 0.0)
            loss_t = loss_t + self.kl_beta * kl
            metrics["grpo/kl"] = float((w * kl).detach().sum())
        loss = (w * torch.where(mask, loss_t, 0.0)).sum()
        return LossOutput(loss, {"objective/policy": objective, **metrics}, logp.detach())

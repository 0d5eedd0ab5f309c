"""The training methods as losses of the trainer's seam (:class:`grao.losses.Loss`), chosen by the ``method`` key.

A method whose loss is linear in the token log-probs with coefficients known
before the forward pass is one ``grao_kernels.linear_logprob_loss`` sweep
over the backbone's hidden states and the lm_head weight; the others (DPO,
GRPO with its KL or its clipped ratio) differentiate through
``grao_kernels.fused_linear_logprobs``. Neither builds the (tokens x
vocabulary) logits. Notation as in ``grao_kernels.api``: a step has P prompt
groups of G sampled completions o_1..o_G and a reference answer y, J(s) is
the mean log-prob over the completion tokens of sequence s, n_s their number.

* ``grao``: :class:`grao.losses.GRAO` (arXiv 2508.07750, Eq. 3-4).
* ``grao-no-exploration`` / ``grao-no-imitation`` / ``grao-no-alignment``
  (the paper's Table 3 ablations): :class:`GRAOTerms`, GRAO with one of its
  three terms weighted 0.
* ``sft``: :class:`SFT`, the NLL of the reference answers.
* ``grpo``: :class:`GRPO`, GRPO with advantages over the G samples, TRL's
  loss aggregations (``grpo_loss_type``), an optional k3 KL to the frozen
  starting model (``grpo_kl_beta``) and, with ``num_iterations`` > 1, the
  clipped ratio to the sampling policy (``clip_epsilon``, ``clip_epsilon_high``).
* ``dpo``: :class:`DPO`, the reference answer against the data's rejected
  answer or the lowest-scored sample (``dpo_rejected``), with a frozen
  reference model (``dpo_beta``). DPO's loss is not
  linear in the log-probs: it differentiates through
  ``grao_kernels.fused_linear_logprobs`` instead (still no logits).
* ``ppo``: :class:`grao.ppo.PPO`, clipped PPO with a value head, GAE and a KL
  penalty to the frozen starting model in the reward (``ppo_*``,
  ``clip_epsilon``); like DPO, through ``fused_linear_logprobs``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from grao_kernels import fused_linear_logprobs, grao_coefficients, group_advantages, linear_logprob_loss
from grao_kernels.api import sequence_logp

from .base import GRAO, LossBatch, LossOutput

METHODS = ("grao", "grao-no-exploration", "grao-no-imitation", "grao-no-alignment", "sft", "grpo", "dpo", "ppo")
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
DPO_REJECTED = ("auto", "data", "sampled")  # where dpo's rejected answers come from (grao.data.rejected_source)


def from_config(cfg, *, hidden_size: int | None = None):
    """The loss of ``cfg.method`` with the config's weights, backend and (for grpo) aggregation; ``ppo``'s value
    head needs the backbone's ``hidden_size``."""
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
        return GRPO(
            cfg.grpo_loss_type,
            max_completion_length=cfg.max_new_tokens,
            kl_beta=cfg.grpo_kl_beta,
            clip_epsilon=cfg.clip_epsilon,
            clip_epsilon_high=cfg.clip_epsilon_high,
            backend=backend,
        )
    if m == "dpo":
        return DPO(cfg.dpo_beta, backend=backend)
    if m == "ppo":
        from .ppo import PPO  # grao.ppo builds on this module's helpers

        if hidden_size is None:
            raise ValueError("method 'ppo' builds a value head on the backbone: from_config needs its hidden_size")
        return PPO(
            hidden_size,
            kl_coef=cfg.ppo_kl_coef,
            gamma=cfg.ppo_gamma,
            lam=cfg.ppo_gae_lambda,
            clip_epsilon=cfg.clip_epsilon,
            vf_clip=cfg.ppo_vf_clip,
            vf_coef=cfg.ppo_vf_coef,
            seed=cfg.seed,
            backend=backend,
        )
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {m!r}")


def _finite_number(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


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


def sample_token_count(batch: LossBatch) -> int | None:
    """N: completion tokens of the whole step's sampled completions (not its reference answers); None when the
    batch is a micro-batch of the step and ``step_token_counts`` is None."""
    if batch.step_token_counts is not None:
        return int(batch.step_token_counts[:, : batch.group_size].sum())
    if len(batch.groups) != batch.num_groups:
        return None
    return int((batch.targets != batch.ignore_index).sum(1).view(-1, batch.group_size + 1)[:, :-1].sum())


def _token_values(batch: LossBatch, values: torch.Tensor | None, name: str, needed_by: str) -> torch.Tensor:
    """``values``, the batch's (S, T) token values ``name``, detached in float32; ValueError if absent or misshapen."""
    if values is None:
        raise ValueError(f"{needed_by}: LossBatch.{name} is None")
    if tuple(values.shape) != tuple(batch.targets.shape):
        raise ValueError(f"{name} shape {tuple(values.shape)} does not match targets {tuple(batch.targets.shape)}")
    return values.detach().float()


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
    """

    def __init__(
        self,
        loss_type: str = "grpo",
        *,
        max_completion_length: int | None = None,
        kl_beta: float = 0.0,
        clip_epsilon: float = 0.2,
        clip_epsilon_high: float | None = None,
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
        if not _finite_number(kl_beta) or kl_beta < 0:
            raise ValueError(f"kl_beta must be a finite number >= 0, got {kl_beta!r}")
        for name, value in (("clip_epsilon", clip_epsilon), ("clip_epsilon_high", clip_epsilon_high)):
            if (value is not None or name == "clip_epsilon") and (not _finite_number(value) or value <= 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        self.loss_type, self.max_completion_length, self.eps, self.backend = (
            loss_type,
            max_completion_length,
            eps,
            backend,
        )
        self.kl_beta = float(kl_beta)
        self.clip_low = 1.0 - clip_epsilon
        self.clip_high = 1.0 + (clip_epsilon if clip_epsilon_high is None else clip_epsilon_high)

    @property
    def needs_reference_model(self) -> bool:
        """The KL term compares with the frozen starting model; without it (kl_beta = 0) none is loaded."""
        return self.kl_beta > 0

    def snapshot(self, batch: LossBatch) -> dict[str, torch.Tensor]:
        """``{"logp": (S, T)}``: the token log-probs of the policy that sampled the rollout (ratio denominators)."""
        with torch.no_grad():
            logp = fused_linear_logprobs(
                batch.hidden, batch.weight, batch.targets, backend=self.backend, **batch.head()
            )
        return {"logp": logp.detach()}

    def _weights(self, batch: LossBatch) -> tuple[torch.Tensor, bool]:
        """(S,) float64 aggregation weight of each sequence (0 for the reference answers) and whether it is further
        divided by the sequence's token count (w_t of the class docstring)."""
        B = batch.num_groups * batch.group_size
        samples = (~_is_reference(batch)).double()
        if self.loss_type == "grpo":
            return samples / B, True
        if self.loss_type == "dr_grpo":
            return samples / (B * self.max_completion_length), False
        n = sample_token_count(batch)
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
            coef = _spread(-adv.to(seq_weight.device) * seq_weight, batch.targets, batch.ignore_index, mean=mean)
            out = _sweep(batch, coef, self.backend)
            return LossOutput(out.loss, {"objective/policy": -float(out.loss.detach())})
        return self._surrogate(batch, adv, _spread(seq_weight, batch.targets, batch.ignore_index, mean=mean))

    def _surrogate(self, batch: LossBatch, adv: torch.Tensor, w: torch.Tensor) -> LossOutput:
        """The per-token loss of the class docstring, through the differentiable fused log-probs."""
        logp = fused_linear_logprobs(batch.hidden, batch.weight, batch.targets, backend=self.backend, **batch.head())
        mask = batch.targets != batch.ignore_index
        a = adv.to(device=logp.device, dtype=torch.float32)[:, None]
        metrics = {}
        if batch.old is None:
            policy = a * logp  # ratio 1: the linear surrogate, TRL's gradient
        else:
            old = _token_values(batch, batch.old.get("logp"), 'old["logp"]', "GRPO's clipped ratio")
            ratio = torch.exp(torch.where(mask, logp - old, 0.0))
            policy = torch.min(ratio * a, ratio.clamp(self.clip_low, self.clip_high) * a)
            n = sample_token_count(batch)
            if n is not None:
                clipped = ((ratio < self.clip_low) & (a < 0)) | ((ratio > self.clip_high) & (a > 0))
                metrics["grpo/clip_ratio"] = float((clipped & mask & (w > 0)).sum()) / max(n, 1)
        loss_t = -policy
        objective = float((w * torch.where(mask, policy, 0.0)).detach().sum())
        if self.kl_beta > 0:
            ref = _token_values(batch, batch.reference_logp, "reference_logp", "GRPO's KL to the reference model")
            d = ref - logp
            kl = torch.where(mask, torch.exp(d) - d - 1, 0.0)
            loss_t = loss_t + self.kl_beta * kl
            metrics["grpo/kl"] = float((w * kl).detach().sum())
        loss = (w * torch.where(mask, loss_t, 0.0)).sum()
        return LossOutput(loss, {"objective/policy": objective, **metrics})


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
        frozen = _token_values(
            batch, batch.reference_logp, "reference_logp", "DPO needs the frozen reference model's token log-probs"
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
        ref = torch.where(ignored, 0.0, frozen)
        delta = (logp.sum(1) - ref.sum(1)).view(m, G + 1)
        rejected = batch.rewards[:, :G].argmin(1).to(delta.device)
        margin = self.beta * (delta[:, G] - delta.gather(1, rejected[:, None])[:, 0])
        loss = F.softplus(-margin).sum() / batch.num_groups  # -log sigmoid(z) = softplus(-z)
        share = float(margin.detach().sum()) / batch.num_groups
        return LossOutput(loss, {"objective/dpo": float(loss.detach()), "dpo/margin": share})

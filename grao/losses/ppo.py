"""PPO (Schulman et al. 2017, arXiv 1707.06347) with a value head on the policy's backbone, as a loss of the trainer.

The RLHF form of TRL's ``PPOTrainer`` (Ouyang et al. 2022, arXiv 2203.02155,
Eq. 2), on the G sampled completions o_1..o_G of each prompt (the group's
reference answer gets no weight). Per completion token t of o_i, with
``logp_old`` / ``V_old`` the policy's token log-probs and the value head's
values before the rollout's first update (:meth:`PPO.snapshot`) and
``logp_ref`` the frozen starting model's:

    r_t    = -kl_coef (logp_old_t - logp_ref_t)  + [t = last token] R(o_i)
    delta_t = r_t + gamma V_old_{t+1} - V_old_t                (V_old after the last token: 0, the episode ends)
    A_t    = sum_{k >= t} (gamma lam)^{k-t} delta_k            (GAE, arXiv 1506.02438, Eq. 16)
    ret_t  = A_t + V_old_t
    A'_t   = (A_t - mean_g A) / sqrt(var_g A + 1e-8)           (whitened within the prompt group g)
    ratio_t = exp(logp_t - logp_old_t)
    pg_t   = max(-A'_t ratio_t, -A'_t clip(ratio_t, 1 - eps, 1 + eps))
    vf_t   = 0.5 max((V_t - ret_t)^2, (V_old_t + clip(V_t - V_old_t, -vf_clip, vf_clip) - ret_t)^2)
    loss   = (1/N) sum_t (pg_t + vf_coef vf_t)                 (N = the step's sampled completion tokens)

``logp_t`` comes from ``grao_kernels.fused_linear_logprobs`` (differentiable,
no logits) and ``V_t = value_head(h_t)``, the value head a ``Linear(H, 1)`` on
the final hidden state h_t that predicts token t (the state before it).

Where this differs from TRL (``trl.trainer.ppo_trainer``): TRL whitens the
advantages over the whole batch (``masked_whiten``, Bessel-corrected
variance); here the mean and (population) variance are those of the prompt
group's sample tokens, so each micro-batch of whole groups computes its share
alone and the accumulated gradient is the one-batch gradient. TRL bootstraps
the last token from the value one position past the end of the response;
here the episode ends at the last completion token (next value 0). The value
loss is averaged over the same N tokens as the policy loss. Defaults are
TRL's: kl_coef 0.05, gamma 1, lam 0.95, eps 0.2, vf_clip 0.2, vf_coef 0.1.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .base import LossBatch, LossOutput, check_number, truncated_importance_weights

WHITEN_EPS = 1e-8


def _sample_tokens(batch: LossBatch) -> torch.Tensor:
    """(S, T) bool: the completion tokens of the micro-batch's sampled completions (not its reference answers)."""
    return (batch.targets != batch.ignore_index) & ~batch.is_reference()[:, None]


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """(S, T) generalised advantage estimates (arXiv 1506.02438, Eq. 16) of the episodes in ``mask``'s rows.

    ``rewards`` and ``values`` (S, T) per position; ``mask`` (S, T) bool, the
    episode's steps (a row's completion tokens). The value after a row's last
    masked position is 0 (the episode ends there) and the estimate is 0 where
    ``mask`` is False. ``A_t = delta_t + gamma lam A_{t+1}``,
    ``delta_t = r_t + gamma V_{t+1} - V_t``, computed in ``rewards``' dtype.
    """
    if not rewards.shape == values.shape == mask.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask {tuple(mask.shape)} must have "
            "one shape (S, T)"
        )
    adv = torch.zeros_like(rewards)
    last = rewards.new_zeros(rewards.shape[0])
    next_value = rewards.new_zeros(rewards.shape[0])
    values = values.to(rewards.dtype)
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = torch.where(m, delta + gamma * lam * last, 0.0)
        next_value = torch.where(m, values[:, t], 0.0)
        adv[:, t] = last
    return adv


def whiten_groups(adv: torch.Tensor, mask: torch.Tensor, group_rows: int) -> torch.Tensor:
    """``adv`` (S, T) shifted and scaled to mean 0 and variance 1 (population variance + 1e-8) over the masked
    positions of each block of ``group_rows`` consecutive rows (a prompt group); 0 where ``mask`` is False."""
    S, T = adv.shape
    a = torch.where(mask, adv, 0.0).view(S // group_rows, group_rows * T)
    m = mask.view_as(a)
    n = m.sum(1, keepdim=True).clamp(min=1)
    mean = a.sum(1, keepdim=True) / n
    var = torch.where(m, (a - mean) ** 2, 0.0).sum(1, keepdim=True) / n
    return torch.where(m, (a - mean) / torch.sqrt(var + WHITEN_EPS), 0.0).view(S, T)


class PPO(torch.nn.Module):
    """The PPO loss of the module docstring, owning its value head ``value_head = Linear(hidden_size, 1)``.

    A loss that is an ``nn.Module`` is the trainer's to train: it moves it to
    the device, trains its parameters with the model's (one AdamW, one gradient
    clip) and saves and restores its ``state_dict`` with every checkpoint. The
    value head is float32 (its input is cast), initialised like ``nn.Linear``
    (uniform in +-1/sqrt(H)) from ``seed``, without touching the global RNG.
    """

    needs_reference_model = True
    reference_in_group = False  # the samples' rewards alone: reward/zero_std_groups ties those

    def __init__(
        self,
        hidden_size: int,
        *,
        kl_coef: float = 0.05,
        gamma: float = 1.0,
        lam: float = 0.95,
        clip_epsilon: float = 0.2,
        vf_clip: float = 0.2,
        vf_coef: float = 0.1,
        seed: int = 0,
        importance_sampling_cap: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be an int >= 1, got {hidden_size!r}")
        self.kl_coef = check_number("kl_coef", kl_coef, 0.0, math.inf)
        self.gamma = check_number("gamma", gamma, 0.0, 1.0)
        self.lam = check_number("lam", lam, 0.0, 1.0)
        self.clip_epsilon = check_number("clip_epsilon", clip_epsilon, 0.0, math.inf, low_open=True)
        self.vf_clip = check_number("vf_clip", vf_clip, 0.0, math.inf, low_open=True)
        self.vf_coef = check_number("vf_coef", vf_coef, 0.0, math.inf)
        self.importance_sampling_cap = check_number("importance_sampling_cap", importance_sampling_cap, 0.0)
        self.backend = backend
        self.value_head = torch.nn.Linear(hidden_size, 1)
        bound = 1.0 / math.sqrt(hidden_size)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.value_head.parameters():
                p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64).mul(2 * bound).sub(bound))

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        """(...) float32 values of hidden states (..., H), computed in the head's dtype (float32; bf16 when FSDP
        all-gathers parameters in bf16)."""
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def _logp(self, batch: LossBatch) -> torch.Tensor:
        return batch.logprobs(self.backend)

    def snapshot(self, batch: LossBatch) -> dict[str, torch.Tensor]:
        """The policy's token log-probs and the value head's values (both (S, T) float32) before the update; the
        trainer calls it under no_grad and passes the result to every update on the rollout as ``batch.old``."""
        return {"logp": self._logp(batch), "values": self.values(batch.hidden)}

    def _check(self, batch: LossBatch) -> None:
        shape = tuple(batch.targets.shape)
        if batch.reference_logp is None:
            raise ValueError(
                "PPO's KL penalty needs the frozen model's token log-probs: LossBatch.reference_logp is None"
            )
        if not {"logp", "values"} <= batch.old.keys():
            raise ValueError(
                f"PPO needs the snapshot before the update (LossBatch.old with 'logp' and 'values', from "
                f"PPO.snapshot), got {sorted(batch.old)}"
            )
        for name, t in (
            ("reference_logp", batch.reference_logp),
            *(("old " + k, batch.old[k]) for k in ("logp", "values")),
        ):
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} shape {tuple(t.shape)} does not match targets {shape}")

    def advantages(self, batch: LossBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(whitened advantages, returns, kl) as (S, T) float64 from ``batch.old`` and ``batch.reference_logp``;
        zero outside the sampled completions' tokens."""
        mask = _sample_tokens(batch)
        old_logp, old_values = batch.old["logp"].double(), batch.old["values"].double()
        kl = torch.where(mask, old_logp - batch.reference_logp.double(), 0.0)
        T = mask.shape[1]
        last = torch.where(mask, torch.arange(T, device=mask.device), -1).max(1).values  # -1: no tokens
        seq_reward = batch.rewards.to(mask.device, torch.float64).reshape(-1)
        at_end = (torch.arange(T, device=mask.device) == last[:, None]) & mask
        rewards = -self.kl_coef * kl + torch.where(at_end, seq_reward[:, None], 0.0)
        values = torch.where(mask, old_values, 0.0)
        adv = gae(rewards, values, mask, self.gamma, self.lam)
        returns = torch.where(mask, adv + values, 0.0)
        return whiten_groups(adv, mask, batch.group_size + 1), returns, kl

    def forward(self, batch: LossBatch) -> LossOutput:
        if batch.old is None:  # one update per rollout: the policy that sampled is this forward's, detached
            with torch.no_grad():
                batch = dataclasses.replace(batch, old=self.snapshot(batch))
        self._check(batch)
        adv, returns, kl = self.advantages(batch)
        mask = _sample_tokens(batch)
        n = batch.sample_token_count()
        if n is None:
            raise ValueError(
                f"PPO's token mean over the step on a micro-batch of {len(batch.groups)} of the step's "
                f"{batch.num_groups} groups needs the whole step's token counts: LossBatch.step_token_counts is None"
            )
        n = max(n, 1)
        token_logp = self._logp(batch)
        logp = token_logp[mask]
        values = self.values(batch.hidden[mask])
        old_logp, old_values = batch.old["logp"][mask].float(), batch.old["values"][mask].float()
        adv, returns = adv[mask].float(), returns[mask].float()

        ratio = torch.exp(logp - old_logp)
        pg_plain = -adv * ratio
        pg_clipped = -adv * ratio.clamp(1 - self.clip_epsilon, 1 + self.clip_epsilon)
        pg = torch.maximum(pg_plain, pg_clipped)
        weights = truncated_importance_weights(batch, self.importance_sampling_cap)
        if weights is not None:  # the engine's sampling mismatch, TRL's truncated correction
            pg = pg * weights[mask]
        v_clipped = old_values + (values - old_values).clamp(-self.vf_clip, self.vf_clip)
        vf_plain, vf_clipped = (values - returns) ** 2, (v_clipped - returns) ** 2
        vf = 0.5 * torch.maximum(vf_plain, vf_clipped)
        policy, value = pg.sum() / n, vf.sum() / n
        loss = policy + self.vf_coef * value
        metrics = {
            "objective/policy": float(policy.detach()),
            "objective/value": float(value.detach()),
            "ppo/kl": float(kl.sum()) / n,
            "ppo/clip_frac": float((pg_clipped > pg_plain).sum()) / n,
            "ppo/value_clip_frac": float((vf_clipped > vf_plain).sum()) / n,
        }
        return LossOutput(loss, metrics, token_logp.detach())

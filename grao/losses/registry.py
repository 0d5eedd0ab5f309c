"""The registry of training methods: the loss (:class:`grao.losses.Loss`) each value of the ``method`` key names.

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
  (the paper's Table 3 ablations): the same :class:`grao.losses.GRAO` with
  one of its three terms weighted 0.
* ``sft``: :class:`grao.losses.SFT`, the NLL of the reference answers.
* ``grpo``: :class:`grao.losses.GRPO`, GRPO with advantages over the G samples, TRL's
  loss aggregations (``grpo_loss_type``), an optional k3 KL to the frozen
  starting model (``grpo_kl_beta``) and, with ``num_iterations`` > 1, the
  clipped ratio to the sampling policy (``clip_epsilon``, ``clip_epsilon_high``).
* ``dpo``: :class:`grao.losses.DPO`, the reference answer against the data's rejected
  answer or the lowest-scored sample (``dpo_rejected``), with a frozen
  reference model (``dpo_beta``). DPO's loss is not
  linear in the log-probs: it differentiates through
  ``grao_kernels.fused_linear_logprobs`` instead (still no logits).
* ``ppo``: :class:`grao.losses.PPO`, clipped PPO with a value head, GAE and a KL
  penalty to the frozen starting model in the reward (``ppo_*``,
  ``clip_epsilon``); like DPO, through ``fused_linear_logprobs``.
"""

from __future__ import annotations

from collections.abc import Callable

from .dpo import DPO
from .grao import GRAO
from .grpo import GRPO
from .ppo import PPO
from .sft import SFT


def _ppo(cfg, hidden_size: int | None) -> PPO:
    if hidden_size is None:
        raise ValueError("method 'ppo' builds a value head on the backbone: from_config needs its hidden_size")
    return PPO(
        hidden_size,
        kl_coef=cfg.ppo.kl_coef,
        gamma=cfg.ppo.gamma,
        lam=cfg.ppo.gae_lambda,
        clip_epsilon=cfg.objective.clip_epsilon,
        vf_clip=cfg.ppo.vf_clip,
        vf_coef=cfg.ppo.vf_coef,
        seed=cfg.run.seed,
        importance_sampling_cap=cfg.rollout.vllm_importance_sampling_cap,
        backend=cfg.objective.loss_backend,
    )


# method -> the loss of a config (``cfg``, ``hidden_size`` of the backbone for a loss with a head of its own).
REGISTRY: dict[str, Callable] = {
    "grao": lambda cfg, _: GRAO(cfg.grao.beta, cfg.grao.lam, cfg.objective.loss_backend),
    "grao-no-exploration": lambda cfg, _: GRAO(
        cfg.grao.beta, cfg.grao.lam, cfg.objective.loss_backend, exploration=0.0
    ),
    "grao-no-imitation": lambda cfg, _: GRAO(0.0, cfg.grao.lam, cfg.objective.loss_backend),
    "grao-no-alignment": lambda cfg, _: GRAO(cfg.grao.beta, 0.0, cfg.objective.loss_backend),
    "sft": lambda cfg, _: SFT(cfg.objective.loss_backend),
    "grpo": lambda cfg, _: GRPO(
        cfg.grpo.loss_type,
        max_completion_length=cfg.rollout.max_new_tokens,
        kl_beta=cfg.grpo.kl_beta,
        clip_epsilon=cfg.objective.clip_epsilon,
        clip_epsilon_high=cfg.objective.clip_epsilon_high,
        importance_sampling_cap=cfg.rollout.vllm_importance_sampling_cap,
        backend=cfg.objective.loss_backend,
    ),
    "dpo": lambda cfg, _: DPO(cfg.dpo.beta, backend=cfg.objective.loss_backend),
    "ppo": _ppo,
}
METHODS = tuple(REGISTRY)


def from_config(cfg, *, hidden_size: int | None = None):
    """The loss of ``cfg.objective.method`` with the config's weights, backend and (for grpo) aggregation; ``ppo``'s
    value head needs the backbone's ``hidden_size``."""
    build = REGISTRY.get(cfg.objective.method)
    if build is None:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {cfg.objective.method!r}")
    return build(cfg, hidden_size)

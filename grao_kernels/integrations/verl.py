"""GRAO in verl: an advantage estimator and a policy loss, both named ``"grao"``, in verl's own registries.

Importing this module registers them (``verl.trainer.ppo.core_algos.get_adv_estimator_fn("grao")`` and
``get_policy_loss_fn("grao")``); select them with ``algorithm.adv_estimator=grao`` and
``actor_rollout_ref.actor.policy_loss.loss_mode=grao``.

The GRAO loss (arXiv 2508.07750, Eq. 3-4) is linear in every token's log-prob with a coefficient that depends
only on the rewards (``grao_kernels.grao_coefficients``). So the split of the work is:

* the advantage estimator, which verl runs once on the whole batch, computes every token's coefficient from the
  rewards, grouped by verl's ``uid``, and stores ``-coefficient`` as the token's "advantage";
* the policy loss, which verl runs on each micro-batch, is ``-sum_t advantage_t * log_prob_t`` over the response
  tokens (times verl's data-parallel size, which DDP/FSDP divide back out). Summed over any split of the batch
  into micro-batches (and data-parallel ranks), that is the GRAO loss of the whole batch, with its gradients.

verl's ``compute_advantage`` passes an estimator only the rewards, the response mask and the ``uid`` of each row,
so a row says it is its group's reference answer through its uid: ``reference_uid(uid)`` (the group's uid with
:data:`REFERENCE_SUFFIX`). :func:`add_reference_responses` appends those rows to a rollout batch, after generation
and before the reward, so that the reward function scores the reference like any response.

Scope: ``loss_agg_mode`` is not used (the coefficients carry GRAO's normalisation: the mean over each sequence's
tokens, the mean over groups); the loss is GRAO's on-policy objective, so ``old_log_prob`` only feeds the
``actor/ppo_kl`` metric. With several PPO mini-batches per batch each optimizer step takes its mini-batch's share
of the batch loss (the shares sum to the batch loss).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

try:
    from verl import DataProto
    from verl.trainer.ppo import core_algos
except ImportError as exc:  # pragma: no cover - exercised only without verl
    raise ImportError(
        "grao_kernels.integrations.verl needs verl >= 0.9 (pip install 'grao-kernels[integrations]')"
    ) from exc

from ..api import grao_coefficients

NAME = "grao"
REFERENCE_SUFFIX = "::grao-reference"
DEFAULT_BETA, DEFAULT_LAM = 0.5, 0.6


def reference_uid(uid: Any) -> str:
    """The uid that marks the reference answer of the group whose responses carry ``uid``."""
    return f"{uid}{REFERENCE_SUFFIX}"


def groups_from_uids(index: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(group_ids, is_reference)`` (S,) int64 and bool from verl's per-row uids.

    A uid ending in :data:`REFERENCE_SUFFIX` is its group's reference answer; groups are numbered by first
    appearance (of the uid without the suffix).
    """
    numbers: dict[str, int] = {}
    group_ids, is_ref = [], []
    for uid in index:
        key = str(uid)
        ref = key.endswith(REFERENCE_SUFFIX)
        if ref:
            key = key[: -len(REFERENCE_SUFFIX)]
        group_ids.append(numbers.setdefault(key, len(numbers)))
        is_ref.append(ref)
    return torch.tensor(group_ids, dtype=torch.int64), torch.tensor(is_ref, dtype=torch.bool)


def _hyper(config, name: str, default: float) -> float:
    value = None if config is None else config.get(name, None)
    return default if value is None else float(value)


@core_algos.register_adv_est(NAME)
def compute_grao_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    config=None,
    **unused,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl advantage estimator ``"grao"``: (bs, response_length) ``-coefficient`` of each response token.

    ``token_level_rewards`` (bs, R): each row's reward is its sum; ``response_mask`` (bs, R); ``index`` (bs,) the
    uids, a group's reference answer marked by :func:`reference_uid`. Each group needs exactly one reference and
    at least one response. β and λ are ``config.grao_beta`` / ``config.grao_lam`` when the algorithm config has them
    (``+algorithm.grao_beta=...``), else 0.5 and 0.6. Returns ``(advantages, returns)``, the same tensor twice (as
    verl's outcome-reward estimators do), zero outside the response.
    """
    if token_level_rewards.dim() != 2 or token_level_rewards.shape != response_mask.shape:
        raise ValueError(
            f"token_level_rewards {tuple(token_level_rewards.shape)} and response_mask {tuple(response_mask.shape)} "
            f"must both be (bs, response_length)"
        )
    if len(index) != token_level_rewards.shape[0]:
        raise ValueError(f"index has {len(index)} uids for {token_level_rewards.shape[0]} rows")
    group_ids, is_ref = groups_from_uids(index)
    rewards = token_level_rewards.detach().sum(-1).double()
    coefs = grao_coefficients(
        rewards,
        group_ids=group_ids.to(rewards.device),
        is_reference=is_ref.to(rewards.device),
        beta=_hyper(config, "grao_beta", DEFAULT_BETA),
        lam=_hyper(config, "grao_lam", DEFAULT_LAM),
        eps=epsilon,
    )
    # token_coef reads only which positions count; -100 marks the others.
    positions = torch.where(response_mask.bool(), 0, -100)
    advantages = -coefs.token_coef(positions)
    return advantages, advantages


@core_algos.register_policy_loss(NAME)
def compute_grao_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl policy loss ``"grao"``: this micro-batch's share of the GRAO loss, ``-sum_t advantage_t log_prob_t``.

    ``advantages`` are those of :func:`compute_grao_advantage` (already normalised over the whole batch, so
    ``loss_agg_mode`` is not used). Multiplied by verl's data-parallel size (``config.global_batch_info``), which
    DDP/FSDP's gradient averaging divides back out; rollout importance weights, when verl gives them, scale each
    token's term.
    """
    mask = response_mask.to(log_prob.dtype)
    terms = advantages.to(log_prob.dtype) * log_prob * mask
    if rollout_is_weights is not None:
        terms = terms * rollout_is_weights.to(log_prob.dtype)
    info = getattr(config, "global_batch_info", None) or {}
    loss = -terms.sum() * info.get("dp_size", 1)
    with torch.no_grad():
        ppo_kl = ((old_log_prob - log_prob) * mask).sum() / mask.sum().clamp(min=1)
    return loss, {"actor/ppo_kl": ppo_kl.item()}


def add_reference_responses(
    batch: DataProto, reference_ids: Mapping[Any, Sequence[int]], *, pad_token_id: int
) -> DataProto:
    """``batch`` with one more row per group: its reference answer as a response, with :func:`reference_uid`.

    ``batch`` is a rollout batch as verl's generation returns it: ``prompts`` (bs, P) left-padded,
    ``responses`` (bs, R) right-padded, ``input_ids`` = both, ``attention_mask`` and ``position_ids`` (bs, P + R),
    and ``non_tensor_batch["uid"]``. ``reference_ids`` maps each uid to the reference answer's token ids (end them
    with eos, as a response that stopped would); an answer longer than R is cut to R tokens. Each new row copies
    the prompt, the prompt's positions and every non-tensor field (the data source, the ground truth, ...) of the
    group's first row, so the reward function scores it like the group's responses; other tensor fields
    (``rollout_log_probs``, ...) are zero in the new rows. Call it after generation and before the reward.
    """
    for key in ("prompts", "responses", "input_ids", "attention_mask", "position_ids"):
        if key not in batch.batch.keys():
            raise ValueError(f"batch has no '{key}': add_reference_responses needs a rollout batch")
    if "uid" not in batch.non_tensor_batch:
        raise ValueError("batch has no non_tensor_batch['uid']: the reference answers are matched by uid")
    uids = batch.non_tensor_batch["uid"]
    if any(str(u).endswith(REFERENCE_SUFFIX) for u in uids):
        raise ValueError("batch already holds reference rows (uids ending in REFERENCE_SUFFIX)")
    prompts, responses = batch.batch["prompts"], batch.batch["responses"]
    P, R = prompts.shape[1], responses.shape[1]
    if batch.batch["position_ids"].dim() != 2:
        raise ValueError(
            f"position_ids {tuple(batch.batch['position_ids'].shape)}: only (bs, P + R) position ids are supported"
        )
    first: dict[Any, int] = {}
    for row, uid in enumerate(uids):
        first.setdefault(uid, row)
    missing = [u for u in first if u not in reference_ids]
    if missing:
        raise ValueError(f"reference_ids has no answer for uid {missing[0]!r} ({len(missing)} of {len(first)} missing)")
    rows = torch.tensor(list(first.values()), dtype=torch.long)
    n = len(rows)
    resp = torch.full((n, R), pad_token_id, dtype=responses.dtype)
    resp_mask = torch.zeros((n, R), dtype=batch.batch["attention_mask"].dtype)
    for i, uid in enumerate(first):
        ids = torch.as_tensor(list(reference_ids[uid])[:R], dtype=responses.dtype)
        resp[i, : len(ids)] = ids
        resp_mask[i, : len(ids)] = 1
    resp, resp_mask = resp.to(responses.device), resp_mask.to(responses.device)
    prompt_pos = batch.batch["position_ids"][rows, :P]
    steps = torch.arange(1, R + 1, device=prompt_pos.device, dtype=prompt_pos.dtype)
    tensors = {
        "prompts": prompts[rows],
        "responses": resp,
        "input_ids": torch.cat([prompts[rows], resp], dim=1),
        "attention_mask": torch.cat([batch.batch["attention_mask"][rows, :P], resp_mask], dim=1),
        "position_ids": torch.cat([prompt_pos, prompt_pos[:, -1:] + steps], dim=1),
    }
    if "response_mask" in batch.batch.keys():
        tensors["response_mask"] = resp_mask.to(batch.batch["response_mask"].dtype)
    for key in batch.batch.keys():
        if key not in tensors:
            t = batch.batch[key]
            tensors[key] = torch.zeros((n, *t.shape[1:]), dtype=t.dtype, device=t.device)
    non_tensors = {key: value[rows.numpy()].copy() for key, value in batch.non_tensor_batch.items()}
    non_tensors["uid"] = np.array([reference_uid(u) for u in first], dtype=object)
    refs = DataProto.from_dict(tensors=tensors, non_tensors=non_tensors, meta_info=dict(batch.meta_info))
    return DataProto.concat([batch, refs])


__all__ = [
    "NAME",
    "REFERENCE_SUFFIX",
    "add_reference_responses",
    "compute_grao_advantage",
    "compute_grao_policy_loss",
    "groups_from_uids",
    "reference_uid",
]

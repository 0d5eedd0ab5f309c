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
:data:`REFERENCE_SUFFIX`). :func:`add_reference_responses` appends those rows to a rollout batch, right after
generation and before the reward, so that the reward function scores the reference like any response;
:func:`reference_ids_from_batch` reads the answers from the dataset field verl copies onto each row, keyed by the
uids verl drew for the batch. β and λ come from verl's algorithm config (:func:`hyperparameters`,
:class:`GRAOAlgoConfig`); :func:`ppo_mini_batch_size_choices` gives the mini-batch settings with which verl's own
sizing divides a batch of ``prompts x (n + 1)`` rows.

:func:`patch_verl` / :func:`patch_verl_model` put :func:`grao_kernels.fused_linear_logprobs` behind verl's
``use_fused_kernels`` forward, the one its actor uses for log-probs and entropies without the logits.

Scope: ``loss_agg_mode`` is not used (the coefficients carry GRAO's normalisation: the mean over each sequence's
tokens, the mean over groups); the loss is GRAO's on-policy objective, so ``old_log_prob`` only feeds the
``actor/ppo_kl`` metric. With several PPO mini-batches per batch each optimizer step takes its mini-batch's share
of the batch loss (the shares sum to the batch loss).
"""

from __future__ import annotations

import dataclasses
import types
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

try:
    from verl import DataProto
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo import core_algos
except ImportError as exc:  # pragma: no cover - exercised only without verl
    raise ImportError(
        "grao_kernels.integrations.verl needs verl >= 0.9 (pip install 'grao-kernels[integrations]')"
    ) from exc

from ..api import fused_linear_logprobs, grao_coefficients
from ..hf import backbone, check_head, read_head

NAME = "grao"
REFERENCE_SUFFIX = "::grao-reference"
DEFAULT_BETA, DEFAULT_LAM = 0.5, 0.6
# Per-row results of the reward and of what follows it: a reference row appended afterwards would hold zeros.
SCORED_FIELDS = ("rm_scores", "token_level_scores", "token_level_rewards", "advantages", "returns")


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


@dataclasses.dataclass
class GRAOAlgoConfig(AlgoConfig):
    """verl's ``AlgoConfig`` with GRAO's β (``grao_beta``, imitation weight) and λ (``grao_lam``, alignment weight).

    For configs that verl turns into dataclasses: ``algorithm._target_=grao_kernels.integrations.verl.GRAOAlgoConfig
    algorithm.grao_beta=0.5 algorithm.grao_lam=0.6``. A plain hydra/dict config carries them as
    ``+algorithm.grao_beta=... +algorithm.grao_lam=...``.
    """

    grao_beta: float = DEFAULT_BETA
    grao_lam: float = DEFAULT_LAM


def hyperparameters(config) -> tuple[float, float]:
    """``(beta, lam)`` from verl's algorithm config: a mapping (dict, ``DictConfig``, ``AlgoConfig``) or an object.

    ``None`` gives the defaults 0.5 and 0.6. Any other config must carry both ``grao_beta`` and ``grao_lam``: a
    config without them (verl's own ``AlgoConfig``, a hydra config without the ``+algorithm.grao_*`` overrides)
    is refused rather than silently trained with the defaults.
    """
    if config is None:
        return DEFAULT_BETA, DEFAULT_LAM
    values = []
    for name in ("grao_beta", "grao_lam"):
        value = config.get(name, None) if isinstance(config, Mapping) or hasattr(config, "get") else None
        if value is None:
            value = getattr(config, name, None)
        if value is None:
            raise ValueError(
                f"the algorithm config ({type(config).__name__}) has no {name}: set +algorithm.grao_beta=... "
                f"+algorithm.grao_lam=... (hydra) or use GRAOAlgoConfig"
            )
        if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
            raise ValueError(f"algorithm config {name} must be a finite number, got {value!r}")
        values.append(float(value))
    return values[0], values[1]


def check_groups(index: Sequence[Any]) -> None:
    """A ``ValueError`` naming the uid of the first group without exactly one reference and one response."""
    counts: dict[str, list[int]] = {}
    for uid in index:
        key = str(uid)
        ref = key.endswith(REFERENCE_SUFFIX)
        counts.setdefault(key[: -len(REFERENCE_SUFFIX)] if ref else key, [0, 0])[int(ref)] += 1
    for uid, (responses, references) in counts.items():
        if references != 1 or responses == 0:
            raise ValueError(
                f"uid {uid!r} has {references} reference rows (uid {reference_uid(uid)!r}) and {responses} responses: "
                "each group needs exactly one reference (add_reference_responses) and at least one response"
            )


@core_algos.register_adv_est(NAME)
def compute_grao_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray | None = None,
    epsilon: float = 1e-6,
    config=None,
    **unused,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl advantage estimator ``"grao"``: (bs, response_length) ``-coefficient`` of each response token.

    ``token_level_rewards`` (bs, R): each row's reward is its sum; ``response_mask`` (bs, R); ``index`` (bs,) the
    uids, a group's reference answer marked by :func:`reference_uid`. Each group needs exactly one reference and
    at least one response (errors name the uid). β and λ come from the algorithm config (:func:`hyperparameters`:
    ``+algorithm.grao_beta=... +algorithm.grao_lam=...`` or :class:`GRAOAlgoConfig`; 0.5 and 0.6 only without a
    config). Returns ``(advantages, returns)``, the same tensor twice (as
    verl's outcome-reward estimators do), zero outside the response.
    """
    if token_level_rewards.dim() != 2 or token_level_rewards.shape != response_mask.shape:
        raise ValueError(
            f"token_level_rewards {tuple(token_level_rewards.shape)} and response_mask {tuple(response_mask.shape)} "
            f"must both be (bs, response_length)"
        )
    if index is None:
        raise ValueError(
            "the grao estimator groups rows by uid: the batch needs non_tensor_batch['uid'] (verl passes it as index)"
        )
    if len(index) != token_level_rewards.shape[0]:
        raise ValueError(f"index has {len(index)} uids for {token_level_rewards.shape[0]} rows")
    beta, lam = hyperparameters(config)
    check_groups(index)
    group_ids, is_ref = groups_from_uids(index)
    rewards = token_level_rewards.detach().sum(-1).double()
    coefs = grao_coefficients(
        rewards,
        group_ids=group_ids.to(rewards.device),
        is_reference=is_ref.to(rewards.device),
        beta=beta,
        lam=lam,
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


def reference_ids_from_batch(batch: DataProto, tokenizer, field: str) -> dict[Any, list[int]]:
    """``{uid: token ids}`` of each group's reference answer, read from the rollout batch's own dataset field.

    verl copies every dataset column of a prompt into ``batch.non_tensor_batch`` for each of its responses; ``field``
    names the one holding the reference answer (a string), with dots for a key inside a dict column, e.g.
    ``"reward_model.ground_truth"`` or ``"extra_info.reference"``. Each answer is tokenised without special tokens
    and ends with ``tokenizer.eos_token_id``, as a response that stopped would. The uids are those verl drew for
    this batch, so call it on the batch itself, after generation.
    """
    if "uid" not in batch.non_tensor_batch:
        raise ValueError("batch has no non_tensor_batch['uid']: the reference answers are matched by uid")
    column, *keys = field.split(".")
    if column not in batch.non_tensor_batch:
        raise ValueError(
            f"batch has no non_tensor_batch[{column!r}] (field {field!r}); it has {sorted(batch.non_tensor_batch)}"
        )
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token_id: a reference answer must end as a finished response does")
    ids: dict[Any, list[int]] = {}
    for uid, value in zip(batch.non_tensor_batch["uid"], batch.non_tensor_batch[column]):
        if uid in ids:
            continue
        for key in keys:
            value = value.get(key) if isinstance(value, Mapping) else None
        if not isinstance(value, str):
            raise ValueError(f"uid {uid!r}: field {field!r} holds {type(value).__name__}, not a reference string")
        ids[uid] = list(tokenizer(value, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    return ids


def ppo_mini_batch_size_choices(train_batch_size: int, n: int, dp_size: int = 1) -> list[int]:
    """The ``actor.ppo_mini_batch_size`` values with which verl's own sizing splits a batch holding the references.

    verl's trainers cut each batch into mini-batches of ``ppo_mini_batch_size x rollout.n`` rows (split evenly over
    ``dp_size`` ranks) and assert that they divide the batch; with each group's reference the batch holds
    ``train_batch_size x (n + 1)`` rows. This lists every ``m <= train_batch_size`` (as verl requires) with
    ``m x n`` dividing those rows and ``dp_size`` dividing ``m x n``; since GRAO's loss is exact under any split,
    any of them trains on the whole batch (a mini-batch then needs no whole groups). Empty when ``n`` does not
    divide ``train_batch_size``: then no setting works, and an update loop of one's own sizes its mini-batches as
    ``m x (n + 1)`` rows.
    """
    for name, value in (("train_batch_size", train_batch_size), ("n", n), ("dp_size", dp_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    rows = train_batch_size * (n + 1)
    return [m for m in range(1, train_batch_size + 1) if rows % (m * n) == 0 and (m * n) % dp_size == 0]


def add_reference_responses(
    batch: DataProto, reference_ids: Mapping[Any, Sequence[int]], *, pad_token_id: int
) -> DataProto:
    """``batch`` with one more row per group: its reference answer as a response, with :func:`reference_uid`.

    ``batch`` is a rollout batch as verl's generation returns it: ``prompts`` (bs, P) left-padded,
    ``responses`` (bs, R) right-padded, ``input_ids`` = both, ``attention_mask`` and ``position_ids`` (bs, P + R),
    and ``non_tensor_batch["uid"]``. ``reference_ids`` maps each uid to the reference answer's token ids (end them
    with eos, as a response that stopped would; :func:`reference_ids_from_batch` reads them from the dataset's field).
    An answer longer than R is cut to R tokens and loses its end: the result's ``meta_info["reference/truncated"]``
    counts those (log it with the step's metrics), with a warning. Each new row copies
    the prompt, the prompt's positions and every non-tensor field (the data source, the ground truth, ...) of the
    group's first row, so the reward function scores it like the group's responses; other tensor fields
    (``rollout_log_probs``, ...) are zero in the new rows. Call it after generation and before the reward.
    """
    for key in ("prompts", "responses", "input_ids", "attention_mask", "position_ids"):
        if key not in batch.batch.keys():
            raise ValueError(f"batch has no '{key}': add_reference_responses needs a rollout batch")
    if "uid" not in batch.non_tensor_batch:
        raise ValueError("batch has no non_tensor_batch['uid']: the reference answers are matched by uid")
    scored = [k for k in SCORED_FIELDS if k in batch.batch.keys()]
    if scored:
        raise ValueError(
            f"batch already holds {scored}: the reference rows would get zeros there; add the references right "
            "after generation and score them with the same reward before computing advantages"
        )
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
    truncated = [uid for uid in first if len(reference_ids[uid]) > R]
    if truncated:
        warnings.warn(
            f"{len(truncated)} of {n} reference answers are longer than the response length {R} and were cut "
            f"(first: uid {truncated[0]!r}, {len(reference_ids[truncated[0]])} tokens)",
            stacklevel=2,
        )
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
    out = DataProto.concat([batch, refs])
    out.meta_info["reference/truncated"] = len(truncated)
    return out


def _fused_forward(backend: str, memory_budget: int | None):
    """A causal LM ``forward`` with the contract of verl's fused-kernel forwards, computed by grao_kernels.

    verl's actor calls ``model(input_ids, attention_mask, position_ids, temperature=T, return_dict=True,
    shift_labels=...)`` when ``use_fused_kernels`` is on and reads ``output.log_probs`` and ``output.entropy``:
    ``(batch, seq_len)``, position t scoring the next-token label ``shift_labels[:, t]`` (else ``labels`` or
    ``input_ids`` rolled by one, the last position wrapping round, as verl's own forwards do) at temperature T.
    Here both come from :func:`grao_kernels.fused_linear_logprobs` (the lm_head weight and bias, never the
    logits) with the family's logit scale and soft cap from :func:`grao_kernels.hf.read_head` (verl's own fused
    forwards leave them out); the backbone runs as in verl's ``forward_with_torch_backend``, found
    by :func:`grao_kernels.hf.backbone` rather than assumed to be ``self.model``.
    """
    from verl.models.transformers.dense_common import CausalLMOutputForPPO

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        cache_position=None,
        logits_to_keep=0,
        temperature: float = 1.0,
        shift_labels=None,
        **unused,
    ):
        if not return_dict:
            raise ValueError(
                "the grao_kernels fused forward returns a dict: call it with return_dict=True, as verl does"
            )
        if isinstance(temperature, torch.Tensor):
            raise ValueError("the fused forward takes one temperature (a float), as verl's fused kernels do")
        inputs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            cache_position=cache_position,
        )
        # the family's own backbone (not every family names it `model`, as verl's forward_base_model assumes)
        outputs = backbone(self)(**{k: v for k, v in inputs.items() if v is not None}, return_dict=True)
        if shift_labels is not None:
            targets = shift_labels
        elif labels is not None:
            targets = torch.roll(labels, shifts=-1, dims=-1)
        elif input_ids is not None:
            targets = torch.roll(input_ids, shifts=-1, dims=-1)
        else:
            raise ValueError("the fused forward needs input_ids, labels or shift_labels to score")
        head = self.get_output_embeddings()
        log_probs, entropy = fused_linear_logprobs(
            outputs[0],
            head.weight,
            targets,
            bias=head.bias,
            **read_head(self.config).kwargs(),  # the family's logit scale / soft cap, as its own forward applies
            temperature=float(temperature),
            return_entropy=True,
            backend=backend,
            memory_budget=memory_budget,
        )
        return CausalLMOutputForPPO(
            log_probs=log_probs,
            entropy=entropy,
            past_key_values=getattr(outputs, "past_key_values", None),
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )

    return forward


def patch_verl_model(model, *, backend: str = "auto", memory_budget: int | None = None):
    """Give one built model (a Hugging Face causal LM) our fused log-prob forward.

    The model's head is checked first (:func:`grao_kernels.hf.check_head`: our log-probs against its own
    ``log_softmax(logits)`` on a probe sequence; a head it cannot reproduce raises ``HeadError``). The instance's
    ``forward`` then becomes :func:`_fused_forward`'s, which verl's actor uses as it uses its own fused forwards
    (``use_fused_kernels``); other instances of the class are untouched. Returns the model.
    """
    check_head(model, backend=backend)
    model.forward = types.MethodType(_fused_forward(backend, memory_budget), model)
    return model


def patch_verl(*, backend: str = "auto", memory_budget: int | None = None) -> None:
    """Make verl's ``use_fused_kernels`` (``fused_kernel_options.impl_backend=torch``) use our log-probs.

    verl's actor patches each text model's class with ``dense_common.forward_with_torch_backend`` when
    ``actor_rollout_ref.model.use_fused_kernels=True``; this replaces that function by :func:`_fused_forward`'s,
    so every model verl builds afterwards in this process computes its log-probs and entropies with
    :func:`grao_kernels.fused_linear_logprobs`. Call it in the worker process before the model is built, e.g.
    from a module named by ``actor_rollout_ref.model.external_lib``. Vision-language models keep verl's forwards.
    """
    from verl.models.transformers import dense_common

    dense_common.forward_with_torch_backend = _fused_forward(backend, memory_budget)


__all__ = [
    "GRAOAlgoConfig",
    "NAME",
    "REFERENCE_SUFFIX",
    "add_reference_responses",
    "compute_grao_advantage",
    "compute_grao_policy_loss",
    "groups_from_uids",
    "hyperparameters",
    "patch_verl",
    "ppo_mini_batch_size_choices",
    "patch_verl_model",
    "reference_ids_from_batch",
    "reference_uid",
]

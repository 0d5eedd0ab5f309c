"""Public API: validation, backend dispatch, and the GRAO objective.

GRAO (Group Relative Alignment Optimization, arXiv 2508.07750, Eq. 3-4). Per
group (prompt) p with G_p sampled completions o_1..o_G and a reference answer y:

    J(s)  = mean over the completion tokens of s of log pi(token | prefix)
    A     = (r - mean(r)) / (std(r) + eps)          over the G_p+1 rewards, population std
    obj_p = (1/G_p) sum_i [A_i J(o_i) + lam A_i (J(o_i) - J(y))] + beta A_y J(y)
    loss  = -mean_p obj_p                           over the P groups

Every token's log-prob enters the loss linearly, with a coefficient known
before the forward pass (advantages carry no gradient):

    c(o_i) = -(1 + lam) A_i / (G_p P)
    c(y)   = -(beta A_y - (lam / G_p) sum_i A_i) / P
    c_t    = c(s) / n_s      for each of the n_s completion tokens of s

so the loss is ``sum_t c_t logp_t``: :func:`grao_coefficients` computes the
``c(s)`` (once per step, on the whole batch) and :func:`linear_logprob_loss`
the loss and its gradients in one sweep over the vocabulary;
:func:`grao_loss` is the two composed.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import NamedTuple

import torch

from . import _functions
from . import backends as _backends
from .backends import Head
from .settings import check_budget, settings

_FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)
_FLOAT32_MAX = torch.finfo(torch.float32).max
_INT64_MIN, _INT64_MAX = torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max


class LogprobsOutput(NamedTuple):
    """Result of :func:`fused_linear_logprobs` with ``return_entropy=True``: both float32, shaped like the targets."""

    logp: torch.Tensor
    entropy: torch.Tensor


class LinearLossOutput(NamedTuple):
    """Result of :func:`linear_logprob_loss`.

    ``loss``: float32 scalar, differentiable w.r.t. hidden, weight and bias.
    ``logp``: float32 shaped like the targets (detached). ``entropy``: likewise
    when ``entropy_coef`` is given, else None.
    """

    loss: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor | None


class GRAOOutput(NamedTuple):
    """Result of :func:`grao_loss`.

    ``loss``: float32 scalar, differentiable w.r.t. hidden, weight and bias.
    ``advantages``: float32 shaped like ``rewards``, the in-group normalised
    rewards. ``seq_logp``: (S,) float32, J of each sequence (0 for a
    sequence without completion tokens). ``exploration``, ``imitation``,
    ``alignment``: float32 scalars, the three terms of the objective averaged
    over groups (loss = -(exploration + imitation + alignment) up to rounding).
    """

    loss: torch.Tensor
    advantages: torch.Tensor
    seq_logp: torch.Tensor
    exploration: torch.Tensor
    imitation: torch.Tensor
    alignment: torch.Tensor


class GRAOCoefficients(NamedTuple):
    """Result of :func:`grao_coefficients`: every sequence's weight in the GRAO loss.

    ``loss = sum_s seq_coef[s] * J_s`` with J_s the mean log-prob over the
    completion tokens of sequence s. (S,) each, in the order of the rewards
    (row-major for (P, G+1) rewards): ``seq_coef`` and ``advantages`` float32,
    ``group_index`` int64 (groups numbered 0..P-1), ``is_reference`` bool,
    ``group_weight`` float32 (1 / (G_p P) of the sequence's group, the weight
    of each completion's term in the objective). ``beta``/``lam`` as given.
    """

    seq_coef: torch.Tensor
    advantages: torch.Tensor
    group_index: torch.Tensor
    is_reference: torch.Tensor
    group_weight: torch.Tensor
    beta: float
    lam: float

    def token_coef(self, targets: torch.Tensor, ignore_index: int = -100, *, rows=None) -> torch.Tensor:
        """(S, T) per-token coefficients ``seq_coef[s] / n_s`` (0 at ignored positions).

        ``n_s`` is the number of positions of row s of ``targets`` that are not
        ``ignore_index``. ``rows`` (an index or slice into the S sequences)
        says which sequences ``targets`` holds, for a micro-batch: the
        coefficients stay those of the whole batch.
        """
        coef = self.seq_coef if rows is None else self.seq_coef[rows]
        if not isinstance(targets, torch.Tensor) or targets.dim() != 2 or targets.shape[0] != coef.shape[0]:
            raise ValueError(
                f"targets must be (S, T) with one row per sequence ({coef.shape[0]}), got shape {_shape(targets)}"
            )
        return _per_token(coef.to(targets.device), targets, ignore_index)

    def terms(self, seq_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(exploration, imitation, alignment)``, each averaged over groups, from every sequence's J (S,).

        ``-(exploration + imitation + alignment) == sum_s seq_coef[s] * seq_logp[s]`` up to rounding.
        """
        j = seq_logp.detach().double()
        a, w = self.advantages.double(), self.group_weight.double()
        sample = ~self.is_reference
        j_ref = _group_sums(torch.where(self.is_reference, j, 0.0), self.group_index)
        exploration = torch.where(sample, w * a * j, 0.0).sum()
        alignment = self.lam * torch.where(sample, w * a * (j - j_ref), 0.0).sum()
        # A group's weight 1 / (G_p P) times its G_p is 1/P.
        n_samples = _group_sums(sample.double(), self.group_index).clamp(min=1)
        imitation = self.beta * torch.where(self.is_reference, w * n_samples * a * j, 0.0).sum()
        return exploration.float(), imitation.float(), alignment.float()


# ----------------------------------------------------------------------------
# validation: one check per kind of argument


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _real(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    """``value`` as a finite float, or a ValueError naming ``name``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype.is_floating_point:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    if nonnegative and not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def _integer(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def _check_head(temperature, logit_scale, softcap) -> Head:
    """The logits' head, with every factor the kernels multiply by finite in float32."""
    t = _real("temperature", temperature, positive=True)
    s = _real("logit_scale", logit_scale, positive=True)
    cap = None if softcap is None else _real("softcap", softcap, positive=True)
    factors = {"1 / temperature": 1 / t, "logit_scale / temperature": s / t}
    if cap is not None:
        factors.update({"softcap / temperature": cap / t, "logit_scale / softcap": s / cap})
    for what, v in factors.items():
        if not v <= _FLOAT32_MAX:
            raise ValueError(
                f"{what} = {v:g} overflows float32 (temperature={t:g}, logit_scale={s:g}, softcap={cap}); "
                f"the logits would be inf"
            )
    return Head(t, s, cap)


def _check_floating(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_INPUTS:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype} with shape {_shape(t)}")
    _check_not_meta(name, t)


def _check_not_meta(name: str, t: torch.Tensor) -> None:
    if t.device.type == "meta":
        raise ValueError(f"{name} {_shape(t)} is on the meta device and holds no values")


def _check_linear_inputs(hidden, weight, targets, bias, ignore_index, validate: bool, lead: str, head: Head) -> int:
    """Shape, dtype, device and (with ``validate``, a host sync) target-range and logit-range checks of the linear
    head."""
    _check_floating("hidden", hidden)
    _check_floating("weight", weight)
    if hidden.dim() < 1:
        raise ValueError(f"hidden must be {lead}, got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(f"weight must be (V, H) with V >= 1, got shape {_shape(weight)}")
    if weight.shape[1] < 1:
        raise ValueError(f"hidden size H must be >= 1, got weight {_shape(weight)} and hidden {_shape(hidden)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"hidden size mismatch: hidden {_shape(hidden)} has H={hidden.shape[-1]} "
            f"but weight {_shape(weight)} has H={weight.shape[1]}"
        )
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        got = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets must be an int64 tensor, got {got}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets shape {_shape(targets)} does not match hidden {_shape(hidden)} "
            f"(expected {tuple(hidden.shape[:-1])})"
        )
    if bias is not None:
        _check_floating("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"bias must be (V,) = ({weight.shape[0]},) to match weight {_shape(weight)}, got {_shape(bias)}"
            )
    _check_device(hidden, weight=weight, targets=targets, bias=bias)
    _check_not_meta("targets", targets)
    ignore_index = _integer("ignore_index", ignore_index)
    if not _INT64_MIN <= ignore_index <= _INT64_MAX:
        raise ValueError(f"ignore_index must fit in int64 (the targets' dtype), got {ignore_index}")
    V = weight.shape[0]
    if validate and targets.numel():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
        if bool(bad.any()):
            pos = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"targets {_shape(targets)} holds id {int(targets[pos])} at {pos}, outside [0, V={V}) "
                f"and not ignore_index={ignore_index}"
            )
    if validate:
        _check_logit_range(hidden, weight, bias, head)
    return ignore_index


def _check_logit_range(hidden, weight, bias, head: Head) -> None:
    """ValueError when the scaled logits could overflow float32: |u| <= H max|h| max|w| + max|b| (reductions only,
    no copy of hidden or weight), times logit_scale / temperature (a softcap bounds them by softcap / temperature,
    checked in _check_head). A -inf bias entry masks its token and does not count; non-finite hidden or weight values
    are not the temperature's doing and are left to the caller."""
    if head.softcap is not None or hidden.numel() == 0:
        return
    h_max = max(abs(float(v)) for v in torch.aminmax(hidden.detach()))
    w_max = max(abs(float(v)) for v in torch.aminmax(weight.detach()))
    b_max = 0.0
    if bias is not None:
        b = bias.detach().float()
        b_max = float(torch.where(torch.isfinite(b), b, 0.0).abs().max())
    magnitude = hidden.shape[-1] * h_max * w_max + b_max
    if not math.isfinite(magnitude):
        return
    bound = magnitude * head.logit_scale / head.temperature
    # half the float32 range: the softmax also forms differences of two logits
    if not bound <= _FLOAT32_MAX / 2:
        raise ValueError(
            f"temperature={head.temperature:g} (logit_scale={head.logit_scale:g}) scales logits bounded by "
            f"{magnitude:g} to up to {bound:g}, beyond float32 ({_FLOAT32_MAX:g}): the log-probs would be NaN; "
            "raise the temperature"
        )


def _check_device(hidden, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")


def _check_coef(name: str, coef, targets, validate: bool) -> torch.Tensor:
    """Per-token coefficients: floating, shaped like ``targets``, constants, finite (with ``validate``)."""
    if not isinstance(coef, torch.Tensor) or not coef.dtype.is_floating_point:
        got = coef.dtype if isinstance(coef, torch.Tensor) else type(coef).__name__
        raise ValueError(f"{name} must be a floating-point tensor shaped like targets, got {got}")
    if tuple(coef.shape) != tuple(targets.shape):
        raise ValueError(f"{name} shape {_shape(coef)} does not match targets {_shape(targets)}")
    if coef.requires_grad:
        raise ValueError(
            f"{name} requires grad, but the coefficients are constants of the objective (no gradient flows "
            f"into them): pass {name}.detach()"
        )
    _check_device(targets, **{name: coef})
    if validate and coef.numel() and not bool(torch.isfinite(coef).all()):
        raise ValueError(f"{name} {_shape(coef)} contains non-finite values (NaN or inf)")
    return coef.reshape(-1).float().contiguous()


def _check_rewards(rewards, validate: bool) -> None:
    if not isinstance(rewards, torch.Tensor):
        raise ValueError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if not rewards.dtype.is_floating_point:
        raise ValueError(f"rewards must be floating point, got {rewards.dtype} with shape {_shape(rewards)}")
    _check_not_meta("rewards", rewards)
    if validate and rewards.numel() and not bool(torch.isfinite(rewards).all()):
        raise ValueError(f"rewards {_shape(rewards)} contains non-finite values (NaN or inf)")


def _sweep_args(hidden, weight, targets, bias, head, ignore_index, backend, memory_budget):
    """2-D contiguous views for the backends (copies only non-contiguous inputs) and the sweep's other arguments."""
    name = _backend_name(backend, hidden.device)
    default = _backends.module(name).DEFAULT_BUDGET
    budget = settings.budget(None if memory_budget is None else check_budget(memory_budget), default)
    H = hidden.shape[-1]
    h = hidden.reshape(-1, H).contiguous()
    t = targets.reshape(-1).to(torch.int64).contiguous()
    b = None if bias is None else bias.contiguous()
    return h, weight.contiguous(), b, t, _functions.Sweep(head, ignore_index, budget, name)


@torch.compiler.assume_constant_result
def _backend_name(backend: str, device: torch.device) -> str:
    # A constant for torch.compile: resolving may build the native backend
    # (a lock, a subprocess), which must not be traced.
    return _backends.resolve_name(backend, device)


# ----------------------------------------------------------------------------
# public functions


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
    memory_budget: int | None = None,
    validate: bool = True,
) -> torch.Tensor | LogprobsOutput:
    """Token log-probs (and entropy) of a linear head without materialising the logits.

    Equivalent to (but never allocating the (N, V) logits)::

        u = (hidden.float() @ weight.float().T + bias) * logit_scale
        u = softcap * tanh(u / softcap)                  # only when softcap is given
        z = u / temperature
        logp = z.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
        logp[targets == ignore_index] = entropy[targets == ignore_index] = 0

    ``hidden`` (..., H) float32/bfloat16/float16; ``weight`` (V, H); ``bias``
    (V,) or None (-inf entries mask vocabulary ids); ``targets`` (...) int64.
    Returns float32 ``logp`` shaped like ``targets``, or ``LogprobsOutput(logp,
    entropy)`` with ``return_entropy=True``; both are differentiable w.r.t.
    hidden, weight and bias (an entropy bonus trains). ``memory_budget``:
    working memory of this call in bytes (default ``settings.memory_budget``,
    else the backend's). ``validate=False`` skips the checks that need a host
    sync (target ids in range), e.g. under ``torch.compile``.
    """
    head = _check_head(temperature, logit_scale, softcap)
    return_entropy = _flag("return_entropy", return_entropy)
    validate = _flag("validate", validate)
    ignore_index = _check_linear_inputs(hidden, weight, targets, bias, ignore_index, validate, "(..., H)", head)
    h, w, b, t, sweep = _sweep_args(hidden, weight, targets, bias, head, ignore_index, backend, memory_budget)
    logp, ent = _functions.logprobs(h, w, b, t, sweep, return_entropy)
    if return_entropy:
        return LogprobsOutput(logp.view(targets.shape), ent.view(targets.shape))
    return logp.view(targets.shape)


def linear_logprob_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    coef: torch.Tensor,
    *,
    entropy_coef: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    memory_budget: int | None = None,
    validate: bool = True,
) -> LinearLossOutput:
    """Any objective linear in the token log-probs (and entropies), loss and gradients from one sweep.

    ``loss = sum_t coef[t] * logp[t] + sum_t entropy_coef[t] * entropy[t]``
    over the positions whose target is not ``ignore_index``, with ``logp``
    and ``entropy`` as in :func:`fused_linear_logprobs`. ``coef`` and
    ``entropy_coef`` are shaped like ``targets`` and are constants (a tensor
    that requires grad is refused): GRAO (:meth:`GRAOCoefficients.token_coef`),
    on-policy policy gradients (``-advantage / n_tokens``), weighted NLL.
    The gradients are computed during the forward and backward only scales
    them, so a micro-batch costs one sweep. Returns ``LinearLossOutput(loss,
    logp, entropy)``; ``logp``/``entropy`` are detached (entropy None without
    ``entropy_coef``).
    """
    head = _check_head(temperature, logit_scale, softcap)
    validate = _flag("validate", validate)
    ignore_index = _check_linear_inputs(hidden, weight, targets, bias, ignore_index, validate, "(..., H)", head)
    c = _check_coef("coef", coef, targets, validate)
    ec = None if entropy_coef is None else _check_coef("entropy_coef", entropy_coef, targets, validate)
    h, w, b, t, sweep = _sweep_args(hidden, weight, targets, bias, head, ignore_index, backend, memory_budget)
    loss, logp, ent = _functions.linear_loss(h, w, b, t, c, ec, sweep)
    return LinearLossOutput(loss, logp.view(targets.shape), None if ent is None else ent.view(targets.shape))


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(P, K) rewards -> (P, K) advantages normalised within each row.

    ``A = (r - mean) / (std + eps)`` with the population std (divide by K),
    statistics in float64; float32 result (float64 for float64 rewards). A row
    whose rewards are all equal gets exactly zero advantages.
    """
    _check_rewards(rewards, validate=True)
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (P, K) with K >= 2, got {_shape(rewards)}")
    eps = _real("eps", eps, nonnegative=True)
    P, K = rewards.shape
    index = torch.arange(P * K, device=rewards.device) // K
    adv = _normalise(rewards.reshape(-1).double(), index, eps)
    return adv.view(P, K).to(torch.float64 if rewards.dtype == torch.float64 else torch.float32)


def _group_sums(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per-group sums of ``values`` (S,), gathered back to every member (S,)."""
    return torch.zeros_like(values).index_add_(0, index, values)[index]


def _normalise(r: torch.Tensor, index: torch.Tensor, eps: float) -> torch.Tensor:
    """In-group normalised float64 rewards ``(r - mean) / (std + eps)``, 0 for a tied group.

    ``index`` (S,) numbers each reward's group. Two passes in float64 (mean,
    then the centred squares), the squares scaled by the group's largest
    deviation, so neither huge rewards (|r| ~ 1e20: r^2 overflows float32)
    nor a large offset (20 + 1e-4 noise) lose the deviations.
    """
    ones = torch.ones_like(r)
    count = _group_sums(ones, index)
    centred = r - _group_sums(r, index) / count
    scale = torch.zeros_like(r).scatter_reduce(0, index, centred.abs(), "amax", include_self=False)[index]
    unit = torch.where(scale > 0, scale, 1.0)
    std = scale * (_group_sums((centred / unit).square(), index) / count).sqrt()
    top = torch.zeros_like(r).scatter_reduce(0, index, r, "amax", include_self=False)[index]
    low = torch.zeros_like(r).scatter_reduce(0, index, r, "amin", include_self=False)[index]
    return torch.where(top == low, 0.0, centred / (std + eps))


def _groups_from_ids(group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense group numbers 0..P-1 (S,) for arbitrary integer ids, and P as a 0-d tensor (no host sync)."""
    order = torch.argsort(group_ids, stable=True)
    ids = group_ids[order]
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[1:] = ids[1:] != ids[:-1]
    dense = torch.empty_like(order)
    dense[order] = starts.cumsum(0) - 1
    return dense, starts.sum()


def grao_coefficients(
    rewards: torch.Tensor,
    *,
    group_ids: torch.Tensor | None = None,
    is_reference: torch.Tensor | None = None,
    group_size: int | None = None,
    beta: float = 0.5,
    lam: float = 0.6,
    eps: float = 1e-6,
    validate: bool = True,
) -> GRAOCoefficients:
    """Every sequence's coefficient in the GRAO loss (see the module docstring), so that
    ``loss = sum_s seq_coef[s] * J_s``.

    Two layouts of the batch:

    * per sequence, any row order and any group sizes: ``rewards`` (S,),
      ``group_ids`` (S,) integers naming each sequence's group (prompt) and
      ``is_reference`` (S,) bool, exactly one reference per group and at
      least one completion;
    * group-major: ``rewards`` (P, G+1) (or flat (S,) = (P (G+1),)) with each
      group's G completions first and its reference last, and ``group_size=G``.

    Compute it once per step on the WHOLE batch: the advantages and the 1/P
    average need every group. Then for each micro-batch (any subset of rows,
    whole groups or not) ``linear_logprob_loss(h, W, targets_mb,
    coefs.token_coef(targets_mb, rows=mb))`` gives that micro-batch's share of
    the loss, and the accumulated gradients equal the full batch's. Group
    statistics are computed in float64. ``validate=False`` skips the checks
    that need a host sync (finite rewards, one reference per group).
    """
    validate = _flag("validate", validate)
    beta, lam = _real("beta", beta), _real("lam", lam)
    eps = _real("eps", eps, nonnegative=True)
    _check_rewards(rewards, validate)
    dev = rewards.device
    if group_size is not None:
        if group_ids is not None or is_reference is not None:
            raise ValueError("give either group_size (group-major rewards) or group_ids and is_reference, not both")
        G = _integer("group_size", group_size)
        if G < 1:
            raise ValueError(f"group_size must be >= 1 (completions per group), got {G}")
        K = G + 1
        if rewards.dim() == 2 and rewards.shape[1] != K:
            raise ValueError(
                f"rewards {_shape(rewards)} has {rewards.shape[1]} columns but group_size={G} means G+1 = {K}: "
                f"each row holds the group's {G} completions and then its reference answer's reward"
            )
        if rewards.dim() not in (1, 2) or rewards.numel() % K:
            raise ValueError(
                f"rewards must be (P, G+1) = (P, {K}) or (P*(G+1),) for group_size={G}, got {_shape(rewards)}"
            )
        S = rewards.numel()
        pos = torch.arange(S, device=dev)
        index, is_ref, P = pos // K, pos % K == G, S // K
    else:
        if group_ids is None or is_reference is None:
            raise ValueError(
                f"rewards {_shape(rewards)}: give group_size=G for (P, G+1) rewards (completions first, reference "
                f"last), or group_ids and is_reference for (S,) per-sequence rewards"
            )
        if rewards.dim() != 1:
            raise ValueError(f"rewards must be (S,) with group_ids and is_reference, got {_shape(rewards)}")
        if (
            not isinstance(group_ids, torch.Tensor)
            or group_ids.dtype.is_floating_point
            or group_ids.dtype == torch.bool
        ):
            raise ValueError(f"group_ids must be an integer tensor, got {getattr(group_ids, 'dtype', type(group_ids))}")
        if not isinstance(is_reference, torch.Tensor) or is_reference.dtype != torch.bool:
            raise ValueError(
                f"is_reference must be a bool tensor, got {getattr(is_reference, 'dtype', type(is_reference))}"
            )
        for name, t in (("group_ids", group_ids), ("is_reference", is_reference)):
            if tuple(t.shape) != tuple(rewards.shape):
                raise ValueError(f"{name} shape {_shape(t)} does not match rewards {_shape(rewards)}")
        _check_device(rewards, group_ids=group_ids, is_reference=is_reference)
        is_ref = is_reference
        index, P = _groups_from_ids(group_ids)
        if validate:
            _check_groups(group_ids, is_ref, index)
    if rewards.numel() == 0:
        raise ValueError("rewards is empty: no sequences")
    adv = _normalise(rewards.reshape(-1).double(), index, eps)
    # Completions per group (G_p), at least 1 so that an unvalidated group
    # without completions cannot divide by zero.
    samples = _group_sums((~is_ref).double(), index).clamp(min=1)
    coef = _sequence_coefficients(adv, index, is_ref, samples, P, beta, lam)
    weight = 1.0 / (samples * P)
    return GRAOCoefficients(coef.float(), adv.float(), index, is_ref, weight.float(), beta, lam)


def _sequence_coefficients(adv, index, is_ref, samples, P, beta, lam):
    """``c(s)`` of the module docstring: (S,) from the float64 advantages, each sequence's
    group number, whether it is the reference, its group's G_p and the number of groups P."""
    adv_sum = _group_sums(torch.where(is_ref, 0.0, adv), index)
    return torch.where(is_ref, -(beta * adv - lam * adv_sum / samples) / P, -(1.0 + lam) * adv / (samples * P))


def _per_token(seq_coef: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """(S, T) float32 ``seq_coef[s] / n_s`` at the n_s positions of row s that are not ignored, 0 elsewhere."""
    mask = targets != ignore_index
    n = mask.sum(1).clamp(min=1).to(torch.float32)
    return torch.where(mask, (seq_coef.float() / n)[:, None], 0.0)


def _check_groups(group_ids, is_ref, index) -> None:
    """Each group has exactly one reference and at least one completion (host sync)."""
    refs = _group_sums(is_ref.long(), index)
    size = _group_sums(torch.ones_like(index), index)
    bad = (refs != 1) | (size < 2)
    if bool(bad.any()):
        s = int(bad.nonzero()[0])
        raise ValueError(
            f"group {int(group_ids[s])} has {int(refs[s])} references among its {int(size[s])} sequences: every "
            f"group needs exactly one reference (is_reference) and at least one completion"
        )


def grao_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    rewards: torch.Tensor,
    *,
    group_ids: torch.Tensor | None = None,
    is_reference: torch.Tensor | None = None,
    group_size: int | None = None,
    bias: torch.Tensor | None = None,
    beta: float = 0.5,
    lam: float = 0.6,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    eps: float = 1e-6,
    backend: str = "auto",
    memory_budget: int | None = None,
    validate: bool = True,
) -> GRAOOutput:
    """The GRAO loss (arXiv 2508.07750, Eq. 3-4) without materialising the logits.

    ``hidden`` (S, T, H): final hidden states, position t predicting
    ``targets[:, t]``; ``weight`` (V, H) the lm_head weight, ``bias`` (V,) or
    None; ``targets`` (S, T) int64 with ``ignore_index`` at prompt and padding
    positions. ``rewards`` and the batch layout as in
    :func:`grao_coefficients`: (S,) with ``group_ids`` and ``is_reference``
    (any order, any group sizes) or (P, G+1) group-major with
    ``group_size=G``. (P, G+1) rewards without ``group_size`` are read as
    group-major with the reference last, with a FutureWarning: give
    ``group_size`` so that a batch without its reference cannot be mistaken
    for one.

    The composition of :func:`grao_coefficients` and
    :func:`linear_logprob_loss`, on one batch: to split a batch into
    micro-batches, use those two directly.
    """
    head = _check_head(temperature, logit_scale, softcap)
    validate = _flag("validate", validate)
    if isinstance(hidden, torch.Tensor) and hidden.dim() != 3:
        raise ValueError(f"hidden must be (S, T, H), got shape {_shape(hidden)}")
    ignore_index = _check_linear_inputs(hidden, weight, targets, bias, ignore_index, validate, "(S, T, H)", head)
    if group_size is None and group_ids is None and is_reference is None:
        if isinstance(rewards, torch.Tensor) and rewards.dim() == 2:
            if rewards.shape[1] < 2:
                raise ValueError(f"rewards {_shape(rewards)} needs at least 2 columns per group (G >= 1)")
            warnings.warn(
                f"grao_loss: rewards {_shape(rewards)} without group_size= are read as (P, G+1) with the reference "
                f"answer last; pass group_size={rewards.shape[1] - 1} (or group_ids= and is_reference=) to say so",
                FutureWarning,
                stacklevel=2,
            )
            group_size = rewards.shape[1] - 1
    coefs = grao_coefficients(
        rewards,
        group_ids=group_ids,
        is_reference=is_reference,
        group_size=group_size,
        beta=beta,
        lam=lam,
        eps=eps,
        validate=validate,
    )
    S = coefs.seq_coef.shape[0]
    if hidden.shape[0] != S:
        layout = (
            f"rewards {_shape(rewards)} implies S = P*(G+1) = {rewards.shape[0]}*{rewards.shape[1]} = {S}"
            if rewards.dim() == 2
            else f"rewards {_shape(rewards)} has S={S}"
        )
        raise ValueError(f"hidden has S={hidden.shape[0]} sequences but {layout}")
    coefs = _on(coefs, hidden.device)
    token_coef = _per_token(coefs.seq_coef, targets, ignore_index)
    h, w, b, t, sweep = _sweep_args(hidden, weight, targets, bias, head, ignore_index, backend, memory_budget)
    loss, logp, _ = _functions.linear_loss(h, w, b, t, token_coef.reshape(-1), None, sweep)
    seq_logp = sequence_logp(logp.view(targets.shape), (targets != ignore_index).sum(1))
    exploration, imitation, alignment = coefs.terms(seq_logp)
    return GRAOOutput(loss, coefs.advantages.view(rewards.shape), seq_logp, exploration, imitation, alignment)


def sequence_logp(logp: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """J per sequence: (S, T) token log-probs (0 at ignored positions) -> (S,) means over ``n`` tokens (0 for none)."""
    return logp.sum(1) / n.clamp(min=1)


def _on(coefs: GRAOCoefficients, device: torch.device) -> GRAOCoefficients:
    return coefs._replace(**{f: getattr(coefs, f).to(device) for f in coefs._fields[:5]})


class GRAOLoss(torch.nn.Module):
    """Module form of :func:`grao_loss` holding its hyper-parameters."""

    def __init__(
        self,
        beta=0.5,
        lam=0.6,
        temperature=1.0,
        ignore_index=-100,
        eps=1e-6,
        backend="auto",
        *,
        logit_scale=1.0,
        softcap=None,
        memory_budget=None,
    ):
        super().__init__()
        _check_head(temperature, logit_scale, softcap)
        _real("beta", beta), _real("lam", lam), _real("eps", eps, nonnegative=True)
        self.beta, self.lam, self.temperature = beta, lam, temperature
        self.logit_scale, self.softcap, self.memory_budget = logit_scale, softcap, memory_budget
        self.ignore_index, self.eps, self.backend = ignore_index, eps, backend

    def forward(
        self, hidden, weight, targets, rewards, bias=None, *, group_ids=None, is_reference=None, group_size=None
    ) -> GRAOOutput:
        return grao_loss(
            hidden,
            weight,
            targets,
            rewards,
            group_ids=group_ids,
            is_reference=is_reference,
            group_size=group_size,
            bias=bias,
            beta=self.beta,
            lam=self.lam,
            temperature=self.temperature,
            logit_scale=self.logit_scale,
            softcap=self.softcap,
            ignore_index=self.ignore_index,
            eps=self.eps,
            backend=self.backend,
            memory_budget=self.memory_budget,
        )

    def extra_repr(self) -> str:
        return f"beta={self.beta}, lam={self.lam}, temperature={self.temperature}, backend={self.backend!r}"

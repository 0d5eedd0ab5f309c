"""Public API: validation, backend dispatch, and the GRAO objective.

GRAO (Group Relative Alignment Optimization, arXiv 2508.07750, Eq. 3-4). Per
prompt p with G sampled completions o_1..o_G and a reference answer y:

    J(s)  = mean over the completion tokens of s of log pi(token | prefix)
    A     = (r - mean(r)) / (std(r) + eps)          over the G+1 rewards, population std
    obj_p = (1/G) sum_i [A_i J(o_i) + lam A_i (J(o_i) - J(y))] + beta A_y J(y)
    loss  = -mean_p obj_p

Every token's log-prob enters the loss linearly, with a coefficient known
before the forward pass (advantages carry no gradient):

    c(o_i) = -(1 + lam) A_i / (G P)
    c(y)   = -(beta A_y - (lam / G) sum_i A_i) / P
    c_t    = c(s) / n_s      for each of the n_s completion tokens of s

so the loss is ``sum_t c_t logp_t`` and its gradients come from the same sweep
over the vocabulary as the log-probs (``LinearLogprobsFunctional``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import backends as _backends
from ._functions import LinearLogprobs, LinearLogprobsFunctional

_FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)


class GRAOOutput(NamedTuple):
    """Result of :func:`grao_loss`.

    ``loss``: float32 scalar, differentiable w.r.t. hidden, weight and bias.
    ``advantages``: (P, G+1) float32, the in-group normalised rewards.
    ``seq_logp``: (S,) float32, J of each sequence (0 for a sequence without
    completion tokens). ``exploration``, ``imitation``, ``alignment``: float32
    scalars, the three terms of the objective averaged over prompts
    (loss = -(exploration + imitation + alignment) up to rounding).
    """

    loss: torch.Tensor
    advantages: torch.Tensor
    seq_logp: torch.Tensor
    exploration: torch.Tensor
    imitation: torch.Tensor
    alignment: torch.Tensor


# ----------------------------------------------------------------------------
# validation


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def _check_floating(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_INPUTS:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype} with shape {_shape(t)}")


def _check_temperature(temperature) -> float:
    temperature = float(temperature)
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return temperature


def _check_linear_inputs(hidden, weight, targets, bias, temperature, ignore_index, hidden_rank):
    """Shape, dtype and range checks shared by the log-prob and loss entry points."""
    _check_floating("hidden", hidden)
    _check_floating("weight", weight)
    lead = "(S, T, H)" if hidden_rank == 3 else "(..., H)"
    if hidden_rank == 3 and hidden.dim() != 3:
        raise ValueError(f"hidden must be {lead}, got shape {_shape(hidden)}")
    if hidden.dim() < 1:
        raise ValueError(f"hidden must be {lead}, got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must be (V, H), got shape {_shape(weight)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"hidden size mismatch: hidden {_shape(hidden)} has H={hidden.shape[-1]} "
            f"but weight {_shape(weight)} has H={weight.shape[1]}"
        )
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"targets must be an int64 tensor, got "
            f"{targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__}"
        )
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
    for name, t in (("weight", weight), ("targets", targets), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    temperature = _check_temperature(temperature)
    V = weight.shape[0]
    if targets.numel():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
        if bool(bad.any()):
            pos = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"targets {_shape(targets)} holds id {int(targets[pos])} at {pos}, outside [0, V={V}) "
                f"and not ignore_index={ignore_index}"
            )
    return temperature


def _check_rewards(rewards, expected: str) -> None:
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 2:
        shape = _shape(rewards) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"rewards must be {expected}, got {shape}")
    if rewards.shape[1] < 2:
        raise ValueError(f"rewards {_shape(rewards)} needs at least 2 columns per group (G >= 1)")
    if not rewards.dtype.is_floating_point:
        raise ValueError(f"rewards must be floating point, got {rewards.dtype} with shape {_shape(rewards)}")
    if rewards.numel() and not bool(torch.isfinite(rewards).all()):
        raise ValueError(f"rewards {_shape(rewards)} contains non-finite values (NaN or inf)")


def _flat(hidden, targets, weight, bias):
    """2-D contiguous views for the backends (copies only non-contiguous inputs)."""
    H = hidden.shape[-1]
    h = hidden.reshape(-1, H).contiguous()
    t = targets.reshape(-1).to(torch.int64).contiguous()
    b = None if bias is None else bias.contiguous()
    return h, t, weight.contiguous(), b


# ----------------------------------------------------------------------------
# public functions


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(P, K) rewards -> (P, K) advantages normalised within each row.

    ``A = (r - mean) / (std + eps)`` with the population std (divide by K),
    computed in float32 (float64 for float64 rewards). A row whose rewards are
    all equal gets exactly zero advantages.
    """
    _check_rewards(rewards, "(P, K)")
    return _group_advantages(rewards, _check_eps(eps))


def _check_eps(eps) -> float:
    eps = float(eps)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return eps


def _group_advantages(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`group_advantages` on rewards already validated."""
    r = rewards.double() if rewards.dtype == torch.float64 else rewards.float()
    mean = r.mean(dim=1, keepdim=True)
    centred = r - mean
    std = centred.square().mean(dim=1, keepdim=True).sqrt()
    adv = centred / (std + eps)
    tied = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)
    return torch.where(tied, torch.zeros_like(adv), adv)


def token_coefficients(adv, targets, ignore_index, beta, lam):
    """Per-token loss coefficients ``c_t`` (flattened, float32) and tokens per sequence ``n`` (S,).

    ``adv`` (P, G+1) float32, ``targets`` (S, T). See the module docstring for
    the derivation; ``c_t = 0`` at ignored positions, and a sequence without
    completion tokens contributes nothing (J = 0).
    """
    P, K = adv.shape
    G = K - 1
    mask = targets != ignore_index
    n = mask.sum(1).float()
    a_o, a_y = adv[:, :G], adv[:, G]
    c_o = -(1.0 + lam) * a_o / (G * P)
    c_y = -(beta * a_y - (lam / G) * a_o.sum(1)) / P
    c_seq = torch.cat([c_o, c_y[:, None]], dim=1).reshape(-1)
    coef = torch.where(mask, (c_seq / n.clamp(min=1))[:, None], 0.0)
    return coef.reshape(-1).contiguous(), n


def sequence_logp(logp, n):
    """J per sequence: (S, T) token log-probs (0 at ignored positions) -> (S,) means over ``n`` tokens."""
    return logp.sum(1) / n.clamp(min=1)


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
) -> torch.Tensor:
    """Token log-probs of a linear head without materialising the logits.

    Equivalent to (but never allocating the (N, V) logits)::

        z = (hidden.float() @ weight.float().T + bias) / temperature
        out = z.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        out[targets == ignore_index] = 0

    ``hidden`` (..., H) float32/bfloat16/float16; ``weight`` (V, H); ``bias``
    (V,) or None; ``targets`` (...) int64. Returns float32 shaped like
    ``targets``, differentiable w.r.t. hidden, weight and bias.
    """
    temperature = _check_linear_inputs(hidden, weight, targets, bias, temperature, ignore_index, hidden_rank=None)
    mod = _backends.resolve(backend, hidden.device)
    h, t, w, b = _flat(hidden, targets, weight, bias)
    logp = LinearLogprobs.apply(h, w, b, t, temperature, int(ignore_index), mod)
    return logp.view(targets.shape)


def grao_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    rewards: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    beta: float = 0.5,
    lam: float = 0.6,
    temperature: float = 1.0,
    ignore_index: int = -100,
    eps: float = 1e-6,
    backend: str = "auto",
) -> GRAOOutput:
    """The GRAO loss (arXiv 2508.07750, Eq. 3-4) without materialising the logits.

    ``hidden`` (S, T, H): final hidden states, position t predicting
    ``targets[:, t]``; ``weight`` (V, H) the lm_head weight, ``bias`` (V,) or
    None; ``targets`` (S, T) int64 with ``ignore_index`` at prompt and padding
    positions; ``rewards`` (P, G+1) with the reference answer's reward last.
    The S = P (G+1) sequences are group-major: sequence s belongs to prompt
    s // (G+1) and is the reference when s % (G+1) == G.
    """
    temperature = _check_linear_inputs(hidden, weight, targets, bias, temperature, ignore_index, hidden_rank=3)
    _check_rewards(rewards, "(P, G+1)")
    eps, beta, lam = _check_eps(eps), float(beta), float(lam)
    P, K = rewards.shape
    G = K - 1
    S, T, _ = hidden.shape
    if S != P * K:
        raise ValueError(
            f"hidden has S={S} sequences but rewards {_shape(rewards)} implies S = P*(G+1) = {P}*{K} = {P * K}"
        )
    mod = _backends.resolve(backend, hidden.device)
    # A backend may replace each of the three small steps with its own kernel.
    # The rewards are validated above: the PyTorch step skips checking them again.
    adv = getattr(mod, "group_advantages", _group_advantages)(rewards.to(hidden.device), eps).float()
    coef, n = getattr(mod, "token_coefficients", token_coefficients)(adv, targets, ignore_index, beta, lam)

    h, t, w, b = _flat(hidden, targets, weight, bias)
    loss, logp = LinearLogprobsFunctional.apply(h, w, b, t, coef, temperature, int(ignore_index), mod)
    seq_logp = getattr(mod, "sequence_logp", sequence_logp)(logp.view(S, T), n)

    a_o, a_y = adv[:, :G], adv[:, G]
    with torch.no_grad():
        j = seq_logp.view(P, K)
        j_o, j_y = j[:, :G], j[:, G]
        exploration = (a_o * j_o).sum(1).div(G).mean()
        alignment = (lam / G) * (a_o * (j_o - j_y[:, None])).sum(1).mean()
        imitation = (beta * a_y * j_y).mean()
    return GRAOOutput(loss, adv, seq_logp, exploration, imitation, alignment)


class GRAOLoss(torch.nn.Module):
    """Module form of :func:`grao_loss` holding its hyper-parameters."""

    def __init__(self, beta=0.5, lam=0.6, temperature=1.0, ignore_index=-100, eps=1e-6, backend="auto"):
        super().__init__()
        _check_temperature(temperature)
        self.beta, self.lam, self.temperature = beta, lam, temperature
        self.ignore_index, self.eps, self.backend = ignore_index, eps, backend

    def forward(self, hidden, weight, targets, rewards, bias=None) -> GRAOOutput:
        return grao_loss(
            hidden,
            weight,
            targets,
            rewards,
            bias=bias,
            beta=self.beta,
            lam=self.lam,
            temperature=self.temperature,
            ignore_index=self.ignore_index,
            eps=self.eps,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"beta={self.beta}, lam={self.lam}, temperature={self.temperature}, backend={self.backend!r}"

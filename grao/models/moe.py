"""Mixture-of-experts routing: the routers, the load-balancing loss over captured routing, and the
auxiliary-loss-free correction biases."""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from .errors import ModelError


class MoEInfo(NamedTuple):
    num_experts: int  # routed experts per MoE layer (shared experts, which every token uses, not counted)
    top_k: int  # experts each token is routed to


class Routing(NamedTuple):
    """One MoE layer's routing in one forward pass."""

    layer: int  # index into :func:`routers`
    logits: torch.Tensor  # (N, E) router logits of the N = S*T token positions
    chosen: torch.Tensor | None  # (N, top_k) the experts the router picked, None where it does not return them


def routers(model) -> list[torch.nn.Module]:
    """The router (gate) module of each MoE layer, in layer order: the modules whose outputs transformers records as
    ``router_logits`` (``output_router_logits=True``); dense layers (DeepSeek-V3's first_k_dense_replace) have none."""
    recorder = getattr(model, "_can_record_outputs", None) or {}
    spec = recorder.get("router_logits")
    if spec is None:
        return []
    cls = spec if isinstance(spec, type) else spec.target_class
    layer_name = None if isinstance(spec, type) else spec.layer_name
    return [
        m
        for name, m in model.named_modules()
        if isinstance(m, cls) and (layer_name is None or name.endswith(layer_name))
    ]


def router_scoring(model) -> str:
    """How the router turns logits into affinities: 'sigmoid' for DeepSeek-V3-style routers (sigmoid scores, a
    per-expert ``e_score_correction_bias`` used only to choose experts; arXiv 2412.19437 Eq. 13-16), else 'softmax'."""
    return "sigmoid" if any(hasattr(r, "e_score_correction_bias") for r in routers(model)) else "softmax"


def moe_info(model) -> MoEInfo | None:
    """(num_experts, top_k) for a router-based MoE model, else None.

    Experts are ``n_routed_experts`` (DeepSeek-V3), ``num_experts`` (Qwen3-MoE,
    OLMoE) or ``num_local_experts`` (Mixtral); the model must have router
    modules (:func:`routers`) for the trainer to read the routing from.
    """
    cfg = model.config
    experts = (
        getattr(cfg, "n_routed_experts", None)
        or getattr(cfg, "num_experts", None)
        or getattr(cfg, "num_local_experts", None)
    )
    top_k = getattr(cfg, "num_experts_per_tok", None)
    if experts and top_k and routers(model):
        return MoEInfo(int(experts), int(top_k))
    return None


def aux_loss_coef(model, configured: float | None) -> float:
    """The router load-balancing weight: the configured one, else the model config's, else 0."""
    return float(configured if configured is not None else getattr(model.config, "router_aux_loss_coef", 0.0))


@contextlib.contextmanager
def capture_routing(model, top_k: int):
    """Record each router's :class:`Routing` during the forward passes run inside the block (a list, in call order).

    Forward hooks on :func:`routers`, removed on exit, so neither generation
    nor the recomputation of gradient checkpointing adds records. The chosen
    experts are the router's own (its third output, as Mixtral, OLMoE,
    Qwen3-MoE and DeepSeek-V3 return ``(logits, weights, indices)``), so a
    router that picks by more than its logits (DeepSeek-V3's bias and
    group-limited top-k) is counted as it routed.
    """
    records: list[Routing] = []
    spec = (getattr(model, "_can_record_outputs", None) or {}).get("router_logits")
    index = getattr(spec, "index", 0)

    def hook_for(layer: int):
        def hook(module, args, output):
            if not isinstance(output, (tuple, list)):
                records.append(Routing(layer, output, None))
                return
            logits, chosen = output[index], output[2] if len(output) > 2 else None
            usable = (
                isinstance(chosen, torch.Tensor)
                and not chosen.is_floating_point()
                and chosen.shape == (logits.shape[0], top_k)
            )
            records.append(Routing(layer, logits, chosen if usable else None))

        return hook

    handles = [r.register_forward_hook(hook_for(i)) for i, r in enumerate(routers(model))]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def _affinities(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """Per-token expert probabilities the balance loss uses: softmax, or DeepSeek-V3's normalised sigmoid scores
    s'_i = s_i / sum_j s_j (arXiv 2412.19437 Eq. 20)."""
    if scoring == "sigmoid":
        scores = torch.sigmoid(logits.float())
        return scores / scores.sum(-1, keepdim=True)
    return torch.softmax(logits.float(), dim=-1)


def _chosen_one_hot(chosen, probs, num_experts: int, top_k: int) -> torch.Tensor:
    """(N, E) 0/1: the experts each token was routed to (the router's choice, else the top-k of ``probs``)."""
    idx = chosen if chosen is not None else probs.topk(top_k, dim=-1).indices
    return torch.nn.functional.one_hot(idx.long(), num_experts).sum(-2).float()


def load_balancing_loss(
    router_logits,
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor,
    groups: int = 1,
    *,
    chosen=None,
    scoring: str = "softmax",
):
    """Switch-Transformer load-balancing loss (arXiv 2101.03961, Eq. 4-6) over all layers, padding excluded.

    ``router_logits``: one (S*T, E) tensor per MoE layer; ``attention_mask`` (S, T);
    ``chosen``: per layer the (S*T, top_k) experts the router picked, or None
    (then the top-k of the probabilities, as a softmax router picks).
    ``scoring='sigmoid'`` uses DeepSeek-V3's normalised sigmoid affinities,
    which makes this its complementary balance loss (arXiv 2412.19437 Eq.
    17-20) up to the constant 1/top_k. The S sequences are split into
    ``groups`` equal consecutive groups and the loss is computed within each,
    returned as a (groups,) tensor; with ``groups=1`` and a softmax router it
    is transformers' ``load_balancing_loss_func``. Also returns each expert's
    share of the routed (token, slot) assignments, (E,).
    """
    mask = attention_mask.reshape(groups, -1).float()  # (groups, tokens per group)
    counts = torch.zeros(groups, num_experts, device=mask.device)
    prob_sum = torch.zeros(groups, num_experts, device=mask.device)
    chosen = chosen if chosen is not None else [None] * len(router_logits)
    for logits, picked in zip(router_logits, chosen):
        probs = _affinities(logits, scoring)
        hits = _chosen_one_hot(picked, probs, num_experts, top_k).view(groups, -1, num_experts)
        counts = counts + (hits * mask[..., None]).sum(1)
        prob_sum = prob_sum + (probs.view(groups, -1, num_experts) * mask[..., None]).sum(1)
    rows = mask.sum(1, keepdim=True) * len(router_logits)
    aux = num_experts * ((counts / rows) * (prob_sum / rows)).sum(1)
    load = counts.sum(0)
    return aux, (load / load.sum().clamp(min=1)).detach()


def expert_counts(records: list[Routing], num_layers: int, moe: MoEInfo, attention_mask: torch.Tensor, scoring: str):
    """(num_layers, E) tokens routed to each expert of each router, padding excluded."""
    mask = attention_mask.reshape(-1).float()
    counts = torch.zeros(num_layers, moe.num_experts, device=mask.device)
    with torch.no_grad():
        for r in records:
            probs = _affinities(r.logits, scoring) if r.chosen is None else None
            hits = _chosen_one_hot(r.chosen, probs, moe.num_experts, moe.top_k)
            counts[r.layer] += (hits * mask[:, None]).sum(0)
    return counts


def correction_biases(model) -> list[torch.Tensor]:
    """Each router's ``e_score_correction_bias`` (E,), the bias DeepSeek-V3 adds to its scores only to choose experts;
    ModelError if the model's routers have none."""
    found = [getattr(r, "e_score_correction_bias", None) for r in routers(model)]
    if not found or any(b is None for b in found):
        raise ModelError(
            f"{type(model).__name__} has no per-expert router bias (e_score_correction_bias) to update; "
            "auxiliary-loss-free balancing needs a DeepSeek-V3-style router (router_bias_update_rate must be 0)"
        )
    return found


def update_router_bias(biases: list[torch.Tensor], counts: torch.Tensor, rate: float) -> None:
    """Auxiliary-loss-free balancing (DeepSeek-V3, arXiv 2412.19437 Sec. 2.1.2), in place, per layer:
    ``b_i += rate * sign(mean_j c_j - c_i)`` from the step's expert loads ``counts`` (num_layers, E), so an
    overloaded expert's bias falls and an underloaded one's rises; the bias only changes which experts are
    chosen, never the gating weights."""
    with torch.no_grad():
        for bias, c in zip(biases, counts):
            bias += rate * torch.sign(c.mean() - c).to(bias)

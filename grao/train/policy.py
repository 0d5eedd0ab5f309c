"""The policy: the trained model as one module (FSDP's root) with a named method for each kind of pass over it.

Everything that reads the root's own parameters (the lm_head weight the fused
loss takes, the embeddings ``generate`` uses) runs inside one of
:data:`Policy.FORWARD_METHODS`; under FSDP2 each is registered with
``torch.distributed.fsdp.register_fsdp_forward_method``, so it runs with the
root's parameters unsharded, like ``forward``: the loss kernels get plain
tensors, never DTensors. Unsharded (one process) they are plain calls, so
there is one code path.
"""

from __future__ import annotations

import contextlib

import torch

from grao_kernels import fused_linear_logprobs

from .. import models
from ..eval import evaluate as evaluation
from ..losses import GRAO, LossOutput, term_gradient_norms
from ..models import generation, heads
from ..models.runtime import Runtime, autocast
from .batch import MicroBatch


class Policy(torch.nn.Module):
    """The trained model (``model``) and, when the loss is an ``nn.Module`` (PPO and its value head), the loss
    (``loss``): FSDP shards and reduces it with the root's parameters, and it is one state dict and one optimizer
    with the model (``model.*`` and ``loss.*`` names). A frozen reference model is a Policy of its own.

    ``logit_transform``: how the run forms log-probs from the lm_head output, as ``grao_kernels`` keyword arguments (and
    :class:`grao.losses.LossBatch` fields): the model's logit scale and soft cap, the log-prob temperature and the
    ignored target. ``moe``, ``aux_coef``, ``router_scoring``: the MoE load-balancing loss added to the loss
    (``moe`` None: none).
    """

    FORWARD_METHODS = (
        "generate",
        "evaluate",
        "micro_batch_loss",
        "loss_snapshot",
        "token_logprobs",
        "term_gradient_norms",
    )

    def __init__(
        self,
        model: torch.nn.Module,
        loss: torch.nn.Module | None = None,
        *,
        runtime: Runtime,
        logit_transform: dict,
        moe: models.MoEInfo | None = None,
        aux_coef: float = 0.0,
        router_scoring: str = "softmax",
    ):
        super().__init__()
        self.model = model
        if loss is not None:
            self.loss = loss
        self.runtime, self.logit_transform = runtime, logit_transform
        self.moe, self.aux_coef, self.router_scoring = moe, aux_coef, router_scoring

    def head_inputs(self, ids: torch.Tensor, mask: torch.Tensor, capture=None) -> tuple:
        """(hidden, weight, bias, routing): the backbone's final hidden states, run under autocast, and the lm_head,
        all three in the compute dtype, so the loss sees what the lm_head would under autocast; ``capture``: a
        routing capture (:func:`grao.models.capture_routing`) around the backbone, whose records are ``routing``."""
        inner = models.unwrap(self.model)
        with autocast(self.runtime), capture or contextlib.nullcontext([]) as routing:
            hidden = heads.backbone(inner)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        weight, bias = heads.output_head(inner)  # frozen under LoRA: no weight gradient
        dt = self.runtime.autocast_dtype
        if dt is not None:
            hidden, weight, bias = hidden.to(dt), weight.to(dt), None if bias is None else bias.to(dt)
        return hidden, weight, bias, routing

    # ---------------------------------------------------------------- the forward methods

    def generate(self, tokenizer, prompt_ids: list[list[int]], **kwargs) -> list[list[int]]:
        """:func:`grao.models.generation.generate` with this model."""
        return generation.generate(self.model, tokenizer, prompt_ids, self.runtime, **kwargs)

    def evaluate(self, tokenizer, examples, reward, **kwargs) -> evaluation.EvalResult:
        """:func:`grao.eval.evaluate.evaluate` of this model."""
        return evaluation.evaluate(self.model, tokenizer, examples, reward, self.runtime, **kwargs)

    def micro_batch_loss(self, loss_fn, mb: MicroBatch) -> tuple[torch.Tensor, LossOutput, float, torch.Tensor]:
        """(loss, the loss's LossOutput, the MoE aux loss value, expert counts (layers, experts)) of one micro-batch.

        The MoE load-balancing loss is computed within each prompt group and
        averaged over the step's P groups, so, like the loss's shares, it sums
        over micro-batches (and ranks) to the one-batch value."""
        inner = models.unwrap(self.model)
        P = mb.num_groups
        layers = len(models.routers(inner)) if self.moe else 0
        counts = torch.zeros(layers, self.moe.num_experts if self.moe else 0, device=mb.ids.device)
        capture = models.capture_routing(inner, self.moe.top_k) if self.moe else None
        hidden, weight, bias, routing = self.head_inputs(mb.ids, mb.mask, capture)
        res = loss_fn(mb.loss_batch(hidden, weight, bias, self.logit_transform))
        loss, aux_value = res.loss, 0.0
        if routing:
            aux, _ = models.load_balancing_loss(
                [r.logits for r in routing],
                *self.moe,
                mb.mask,
                groups=len(mb.groups),
                chosen=[r.chosen for r in routing],
                scoring=self.router_scoring,
            )
            loss = loss + self.aux_coef * aux.sum() / P
            aux_value = float(aux.detach().sum()) / P
            counts += models.expert_counts(routing, layers, self.moe, mb.mask, self.router_scoring)
        return loss, res, aux_value, counts

    def loss_snapshot(self, take, mb: MicroBatch) -> dict[str, torch.Tensor]:
        """``take(batch)``, the loss's snapshot (:class:`grao.losses.Loss`) of this policy on one micro-batch."""
        hidden, weight, bias, _ = self.head_inputs(mb.ids, mb.mask)
        return take(mb.loss_batch(hidden, weight, bias, self.logit_transform))

    def term_gradient_norms(self, loss: GRAO, mb: MicroBatch) -> dict[str, float]:
        """Each GRAO term's gradient norm on one micro-batch (:func:`grao.losses.term_gradient_norms`), its hidden
        states from a backbone forward under no_grad: nothing reaches the parameters' ``.grad``. The lm_head's
        gradient counts when the lm_head is trained (not under LoRA)."""
        with torch.no_grad():
            hidden, weight, bias, _ = self.head_inputs(mb.ids, mb.mask)
        trained = heads.output_head(models.unwrap(self.model))[0].requires_grad
        return term_gradient_norms(loss, mb.loss_batch(hidden, weight, bias, self.logit_transform), lm_head=trained)

    def token_logprobs(self, mb: MicroBatch, backend: str) -> torch.Tensor:
        """(S, T) token log-probs of one micro-batch through the fused path (no logits), with :attr:`logit_transform`: the
        reference model's for ``LossBatch.reference_logp``."""
        hidden, weight, bias, _ = self.head_inputs(mb.ids, mb.mask)
        return fused_linear_logprobs(hidden, weight, mb.targets, bias=bias, backend=backend, **self.logit_transform)

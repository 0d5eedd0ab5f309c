"""Hugging Face causal LMs' output heads: what each family's forward does to ``lm_head(h)``, in one table.

The fused functions take the backbone's final hidden states and the lm_head
weight, so whatever a model's forward does to its logits after the Linear
(Granite divides them by ``logits_scaling``, Gemma-2 soft-caps them, ...) must be
passed as ``logit_scale=`` / ``softcap=``. :func:`read_head` reads those from a
config through :data:`HEADS`; :func:`check_head` also runs the model once on a
short probe sequence and refuses it unless the fused log-probs equal its own
``log_softmax(logits)``. Every path that loads a model (the trainer, the TRL
seam) calls :func:`check_head`; ``grao plan`` calls :func:`read_head`.

Nothing here imports transformers: models and configs are used through their
attributes (``config.model_type``, ``get_text_config()``, ``get_output_embeddings()``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["HEADS", "HEAD_FIELDS", "HeadError", "LogitHead", "backbone", "check_head", "output_head", "read_head"]


class HeadError(ValueError):
    """A model whose output head the fused functions cannot reproduce."""


@dataclass(frozen=True)
class LogitHead:
    """What a model's forward does to its lm_head output ``u = h W^T + b``:
    ``logits = softcap * tanh(logit_scale * u / softcap)`` (just ``logit_scale * u`` without ``softcap``).
    The two fields are the ``grao_kernels`` arguments of the same names (:meth:`kwargs`)."""

    logit_scale: float = 1.0
    softcap: float | None = None

    def kwargs(self) -> dict:
        return {"logit_scale": self.logit_scale, "softcap": self.softcap}


# What transformers' forward of each family does to lm_head(h) (models/<type>/modeling_<type>.py), as
# (config field, operation) pairs read from the model's text config: "divide" is logits / value (MiniCPM3 and
# Inkling divide the hidden states instead: the same for a bias-free head, which the probe checks), "multiply"
# logits * value, "softcap" value * tanh(logits / value). An empty entry is a plain head whatever the config
# holds (Gemma3ForConditionalGeneration never applies its text config's final_logit_softcapping; MPT keeps a
# logit_scale field its forward never reads). tests/kernels/test_hf_heads.py checks every entry, and every causal-LM
# family of the installed transformers whose config has such a field, against the model's own forward.
_SOFTCAP = (("final_logit_softcapping", "softcap"),)
HEADS: dict[str, tuple[tuple[str, str], ...]] = {
    **dict.fromkeys(
        ("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared", "minicpm3"),
        (("logits_scaling", "divide"),),
    ),
    **dict.fromkeys(("inkling", "inkling_text"), (("logits_mup_width_multiplier", "divide"),)),
    "hyperclovax": (("logits_scaling", "multiply"),),
    **dict.fromkeys(
        ("cohere", "cohere2", "cohere2_moe", "cohere_compass", "cohere_compass_text"), (("logit_scale", "multiply"),)
    ),
    "falcon_h1": (("lm_head_multiplier", "multiply"),),
    **dict.fromkeys(
        (
            "gemma2",
            "gemma3_text",
            "gemma3n",
            "gemma3n_text",
            "gemma4",
            "gemma4_text",
            "gemma4_unified",
            "gemma4_unified_text",
            "inkling2",
            "inkling2_text",
            "inkling2_loop",
            "inkling2_loop_text",
            "vaultgemma",
            "nanochat",
            "beam",
        ),
        _SOFTCAP,
    ),
    "recurrent_gemma": (("logits_soft_cap", "softcap"),),
    "gemma3": (),
    "mpt": (),
}
# Config fields with which some family transforms its logits: a family not in HEADS with one of them set is
# refused, as its forward may use it in a way the fused functions do not reproduce.
HEAD_FIELDS = tuple(
    sorted(
        {field for ops in HEADS.values() for field, _ in ops}
        | {"output_multiplier", "output_multiplier_scale", "output_logit_soft_cap"}
    )
)


def _text_config(config):
    """The config of the language model (a multimodal config's text config), else ``config`` itself."""
    try:
        return config.get_text_config()
    except (AttributeError, ValueError):  # several text configs (an encoder-decoder): the top one is the head's
        return config


def _field(config, field: str, who: str) -> float | None:
    value = getattr(config, field, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise HeadError(f"{who}: config {field}={value!r} is not a finite number > 0")
    return float(value)


def read_head(config, who: str | None = None) -> LogitHead:
    """The head of a model with this (Hugging Face) ``config``, from :data:`HEADS`.

    ``HeadError`` naming the field and its value for a family the table does not
    list whose config sets one of :data:`HEAD_FIELDS` to anything but 1 (its
    forward may transform the logits in a way the fused functions would not);
    a family it does not list without such a field is a plain head, which
    :func:`check_head` verifies on the model.
    """
    model_type = getattr(config, "model_type", None)
    who = who or f"model_type {model_type!r}"
    text = _text_config(config)
    ops = HEADS.get(model_type)
    if ops is None:
        for cfg in (config, text):  # the top config and, for a multimodal one, its text config
            for field in HEAD_FIELDS:
                value = getattr(cfg, field, None)
                if value not in (None, 1, 1.0):
                    raise HeadError(
                        f"{who} sets {field}={value} in its config, and grao_kernels does not know how this family's "
                        f"forward transforms its logits with it: the loss would train on other log-probs than the "
                        f"model's (families whose logit scale or soft cap it reads: "
                        f"{', '.join(sorted(t for t in HEADS if HEADS[t]))})"
                    )
        return LogitHead()
    scale, cap = 1.0, None
    for field, op in ops:
        value = _field(text, field, who)
        if value is None:
            continue
        if op == "divide":
            scale /= value
        elif op == "multiply":
            scale *= value
        else:
            cap = value
    return LogitHead(scale, cap)


def backbone(model) -> torch.nn.Module:
    """The decoder stack of a causal LM, producing the final (normed) hidden states its lm_head reads."""
    inner = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if inner is None or inner is model:
        raise HeadError(f"{type(model).__name__} has no separate backbone ({model.base_model_prefix!r})")
    return inner


def output_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (V, H) weight and (V,) bias (or None) of a causal LM's output Linear."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise HeadError(f"{type(model).__name__}'s output embedding is {type(head).__name__}, not a Linear layer")
    return head.weight, head.bias


def check_head(model, backend: str = "auto", tokens: int = 8) -> LogitHead:
    """The head the fused functions must apply for ``model`` (:func:`read_head`), checked on the model itself.

    On a probe sequence of ``tokens`` fixed ids, the log-probs
    ``fused_linear_logprobs`` computes (on ``backend``, float32, autocast off)
    from the backbone's hidden states and the lm_head weight and bias with that
    head must equal the model's own ``log_softmax(model(ids).logits)``, for each
    position's most and least likely token and two others. A forward that
    transforms its logits in any other way (a bias added outside the Linear,
    scaled hidden states with a biased head, a sliced vocabulary, a hook) is a
    ``HeadError``.
    """
    from .api import fused_linear_logprobs

    name = type(model).__name__
    head = read_head(model.config, f"{name} (model_type {getattr(model.config, 'model_type', None)!r})")
    net = backbone(model)
    weight, bias = output_head(model)
    V, device = weight.shape[0], weight.device
    embedded = getattr(model.get_input_embeddings(), "num_embeddings", V)  # a padded head may have more rows
    ids = (torch.arange(1, tokens + 1, device=device) * 7919) % min(V, embedded)  # fixed ids spread over the vocab
    training, attn = model.training, getattr(model.config, "_attn_implementation", None)
    flash = isinstance(attn, str) and attn.startswith("flash")  # flash-attention does not run in float32
    model.eval()
    if flash:
        model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            try:
                logits = model(input_ids=ids[None], use_cache=False).logits[0]
                hidden = net(input_ids=ids[None], use_cache=False).last_hidden_state[0]
            except (TypeError, ValueError) as exc:
                raise HeadError(
                    f"{name}'s forward does not run on token ids alone ({exc}): cannot check its head"
                ) from None

            if logits.shape != (tokens, V):
                raise HeadError(
                    f"{name}'s logits are {tuple(logits.shape[1:])} per token, but its lm_head has V={V} rows: its "
                    f"forward reshapes the vocabulary, which the fused functions do not reproduce"
                )
            want = logits.float().log_softmax(-1)
            targets = torch.stack([want.argmax(-1), want.argmin(-1), ids, ids.roll(1)])
            got = fused_linear_logprobs(
                hidden.float().expand(4, tokens, -1),
                weight.float(),
                targets,
                bias=None if bias is None else bias.float(),
                backend=backend,
                **head.kwargs(),
            )
    finally:
        model.train(training)
        if flash:
            model.set_attn_implementation(attn)
    expected = want.gather(1, targets.T).T
    err = (got - expected).abs()
    if not bool((err <= 2e-3 + 2e-3 * expected.abs()).all()):
        cfg = _text_config(model.config)
        fields = [f"{f}={getattr(cfg, f)}" for f in HEAD_FIELDS if getattr(cfg, f, None) is not None]
        raise HeadError(
            f"{name}'s own log-probs differ by up to {float(err.max()):.3g} from those the fused functions compute "
            f"from its backbone's hidden states and lm_head weight with logit_scale={head.logit_scale:g}, "
            f"softcap={head.softcap} (read from its config{': ' + ', '.join(fields) if fields else ''}): its "
            f"forward transforms the logits in a way grao_kernels does not reproduce"
        )
    return head

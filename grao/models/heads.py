"""The model-head table: what each Hugging Face family's forward does to its lm_head output, read from its
config and checked once against the model's own log-probs. Every trainer and plan path reads heads from here."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import ModelError


def backbone(model) -> torch.nn.Module:
    """The decoder stack producing the final (normed) hidden states the lm_head reads."""
    inner = getattr(model, model.base_model_prefix, None)
    if inner is None or inner is model:
        raise ModelError(f"{type(model).__name__} has no separate backbone ({model.base_model_prefix!r})")
    return inner


def output_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ModelError(f"{type(model).__name__}'s output embedding is {type(head).__name__}, not a Linear layer")
    return head.weight, head.bias


@dataclass(frozen=True)
class LogitHead:
    """What a model's forward does to its lm_head output ``u = h W^T + b``:
    ``logits = softcap * tanh(logit_scale * u / softcap)`` (just ``logit_scale * u`` without ``softcap``).
    The two fields are the ``grao_kernels`` arguments of the same names."""

    logit_scale: float = 1.0
    softcap: float | None = None


# What transformers' forward of each family does to lm_head(h) (models/<type>/modeling_<type>.py), as
# (config field, operation) pairs read from the model's text config: "divide" is logits / value,
# "multiply" logits * value (MiniCPM3 divides the hidden states, the same for its bias-free head),
# "softcap" value * tanh(logits / value). An empty entry is a plain head whatever the config holds:
# Gemma3ForConditionalGeneration does not apply its text config's final_logit_softcapping.
_SOFTCAP = (("final_logit_softcapping", "softcap"),)
_HEADS: dict[str, tuple[tuple[str, str], ...]] = {
    **dict.fromkeys(
        ("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared", "minicpm3"),
        (("logits_scaling", "divide"),),
    ),
    "hyperclovax": (("logits_scaling", "multiply"),),
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe"), (("logit_scale", "multiply"),)),
    "falcon_h1": (("lm_head_multiplier", "multiply"),),
    **dict.fromkeys(("gemma2", "gemma3_text", "vaultgemma", "nanochat", "beam"), _SOFTCAP),
    "recurrent_gemma": (("logits_soft_cap", "softcap"),),
    "gemma3": (),
}
# Config fields with which some family transforms its logits: a family not in _HEADS with one of them set is refused,
# as its forward may use it in a way the loss does not reproduce.
HEAD_FIELDS = tuple(
    sorted(
        {field for ops in _HEADS.values() for field, _ in ops}
        | {"output_multiplier", "output_multiplier_scale", "logits_mup_width_multiplier", "output_logit_soft_cap"}
    )
)


def _text_config(config):
    """The config of the language model (a multimodal config's text config), else ``config`` itself."""
    try:
        return config.get_text_config()
    except ValueError:  # several text configs (an encoder-decoder): the top config is the one its head reads
        return config


def _head_value(model, cfg, field: str):
    value = getattr(cfg, field, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ModelError(f"{type(model).__name__}: config {field}={value!r} is not a finite number > 0")
    return float(value)


def read_head(model) -> LogitHead:
    """The head of ``model`` from its config (see ``_HEADS``); ModelError naming the field and its value for a
    family whose head transform the trainer does not know."""
    cfg = _text_config(model.config)
    model_type = getattr(model.config, "model_type", None)
    ops = _HEADS.get(model_type)
    if ops is None:
        for config in (model.config, cfg):  # the top config and, for a multimodal one, its text config
            for field in HEAD_FIELDS:
                value = getattr(config, field, None)
                if value not in (None, 1, 1.0):
                    raise ModelError(
                        f"{type(model).__name__} (model_type {model_type!r}) sets {field}={value} in its config, and "
                        f"the trainer does not know how this family's forward transforms its logits with it: the loss "
                        f"would train on other log-probs than the model's (families whose logit scale or soft cap "
                        f"it reads: {', '.join(sorted(t for t in _HEADS if _HEADS[t]))})"
                    )
        return LogitHead()
    scale, cap = 1.0, None
    for field, op in ops:
        value = _head_value(model, cfg, field)
        if value is None:
            continue
        if op == "divide":
            scale /= value
        elif op == "multiply":
            scale *= value
        else:
            cap = value
    return LogitHead(scale, cap)


def logit_head(model, backend: str = "auto", tokens: int = 8) -> LogitHead:
    """The head the loss applies for ``model`` (:func:`read_head`), checked once on the model itself.

    On a probe sequence of ``tokens`` fixed ids, the log-probs the loss computes
    from the backbone's hidden states and the lm_head weight with that head
    (``grao_kernels.fused_linear_logprobs`` on ``backend``, float32, autocast
    off) must equal the model's own ``log_softmax(model(ids).logits)``, for each
    position's most and least likely token and two others. A forward that
    transforms its logits in any other way (a bias added outside the Linear,
    scaled hidden states, a sliced vocabulary, a hook) is a ModelError.
    """
    from grao_kernels import fused_linear_logprobs

    head = read_head(model)
    net = backbone(model)
    weight, bias = output_head(model)
    V, device = weight.shape[0], weight.device
    ids = (torch.arange(1, tokens + 1, device=device) * 7919) % V  # fixed ids spread over the vocabulary
    training, attn = model.training, getattr(model.config, "_attn_implementation", None)
    flash = isinstance(attn, str) and attn.startswith("flash")  # flash-attention does not run in float32
    model.eval()
    if flash:
        model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            logits = model(input_ids=ids[None], use_cache=False).logits[0]
            hidden = net(input_ids=ids[None], use_cache=False).last_hidden_state[0]
            if logits.shape != (tokens, V):
                raise ModelError(
                    f"{type(model).__name__}'s logits are {tuple(logits.shape[1:])} per token, but its lm_head "
                    f"has V={V} rows: its forward reshapes the vocabulary, which the loss does not reproduce"
                )
            want = logits.float().log_softmax(-1)
            targets = torch.stack([want.argmax(-1), want.argmin(-1), ids, ids.roll(1)])
            got = fused_linear_logprobs(
                hidden.float().expand(4, tokens, -1),
                weight.float(),
                targets,
                bias=None if bias is None else bias.float(),
                logit_scale=head.logit_scale,
                softcap=head.softcap,
                backend=backend,
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
        raise ModelError(
            f"{type(model).__name__}'s own log-probs differ by up to {float(err.max()):.3g} from those the loss "
            f"computes from its backbone's hidden states and lm_head weight with logit_scale={head.logit_scale:g}, "
            f"softcap={head.softcap} (read from its config{': ' + ', '.join(fields) if fields else ''}): its forward "
            f"transforms the logits in a way the trainer does not reproduce"
        )
    return head

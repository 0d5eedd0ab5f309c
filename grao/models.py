"""Models and tokenizers: the built-in tiny MoE, local Hugging Face directories, and the pieces the loss needs.

Nothing here downloads: local directories are opened with ``local_files_only``
and the demo tokenizer is trained offline on the task's own text.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from . import demo_task

TINY_MOE = "tiny-moe"
SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")

# Sized so the demo learns its task from random init in a couple of minutes on 2 CPU cores.
TINY_MOE_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=4,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    max_position_embeddings=64,
    router_aux_loss_coef=0.01,
    tie_word_embeddings=False,
)


class ModelError(ValueError):
    """A model or tokenizer the trainer cannot use."""


def build_demo_tokenizer():
    """A character-level tokenizer trained with ``tokenizers`` on the demo task's text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.train_from_iterator(
        demo_task.tokenizer_corpus(), trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS))
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )


def tiny_moe(tokenizer, overrides: dict | None = None, attn_implementation: str = "sdpa", seed: int = 0):
    """The built-in tiny Qwen3-MoE (4 experts, top-2) with random weights drawn from ``seed``."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    known = Qwen3MoeConfig().to_dict()
    known.update({alias: known.get(name) for alias, name in Qwen3MoeConfig.attribute_map.items()}, **TINY_MOE_CONFIG)
    check_overrides(overrides or {}, known)
    fields = dict(TINY_MOE_CONFIG, **(overrides or {}))
    fields.update(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    try:
        config = Qwen3MoeConfig(**fields)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    except Exception as exc:  # transformers raises TypeError, ValueError or its own validation errors
        raise ModelError(f"bad model_overrides {overrides}: {type(exc).__name__}: {exc}".splitlines()[0]) from None


def check_overrides(overrides: dict, defaults: dict) -> None:
    """ModelError for a ``model_overrides`` key the config does not have (a misspelling would be ignored), or a
    value of another type than the default's, or a count or size below 1."""
    import difflib

    for key, value in overrides.items():
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ModelError(f"model_overrides: unknown key {key!r}{hint}")
        default = defaults[key]
        if isinstance(default, bool) or default is None:
            continue
        if isinstance(default, int) and (isinstance(value, bool) or not isinstance(value, int)):
            raise ModelError(f"model_overrides: {key!r} must be an integer, got {type(value).__name__} {value!r}")
        if isinstance(default, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ModelError(f"model_overrides: {key!r} must be a number, got {type(value).__name__} {value!r}")
        if isinstance(default, int) and default >= 1 and value < 1:
            raise ModelError(f"model_overrides: {key!r} must be >= 1, got {value}")


def remote_code_files(path: str | Path) -> list[str]:
    """The files of a local directory whose ``auto_map`` asks for the directory's own Python code."""
    found = []
    for name in ("config.json", "tokenizer_config.json"):
        file = Path(path) / name
        try:
            if file.is_file() and json.loads(file.read_text(encoding="utf-8")).get("auto_map"):
                found.append(name)
        except (OSError, ValueError, AttributeError):
            continue  # unreadable or not a JSON object: transformers reports it when it loads the file
    return found


def _load_error(what: str, path: Path, exc: Exception, trust_remote_code: bool) -> ModelError:
    """The ModelError for a failed load; names the ``trust_remote_code`` key when the directory ships code it is off for."""
    custom = remote_code_files(path)
    if custom and not trust_remote_code:
        return ModelError(
            f"cannot load {what} from {path}: its {' and '.join(custom)} map classes to code in the directory "
            "(auto_map), which runs only with trust_remote_code: true (--trust-remote-code true); "
            f"set it if you trust that code. transformers said: {exc}"
        )
    return ModelError(f"cannot load {what} from {path}: {exc}")


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"tokenizer directory {str(path)!r} does not exist (no hub downloads: give a local path)")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _load_error("a tokenizer", path, exc, trust_remote_code) from None
    if tok.eos_token_id is None:
        raise ModelError(f"the tokenizer in {path} has no eos token; completions need one to stop")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def check_source(model: str, tokenizer: str | None) -> None:
    """ModelError unless ``model`` is 'tiny-moe' or a directory with a config.json and ``tokenizer`` unset or a directory."""
    if model != TINY_MOE and not (Path(model) / "config.json").is_file():
        raise ModelError(
            f"model {model!r} is neither 'tiny-moe' nor a local Hugging Face model directory with a config.json"
        )
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise ModelError(f"tokenizer directory {tokenizer!r} does not exist (no hub downloads: give a local path)")


def load_model(path: str | Path, attn_implementation: str = "sdpa", trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    check_source(str(path), None)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path,
            local_files_only=True,
            dtype=torch.float32,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise _load_error("a causal LM", Path(path), exc, trust_remote_code) from None


def load(model: str, tokenizer: str | None, overrides: dict, runtime, seed: int, trust_remote_code: bool = False):
    """(model, tokenizer) on ``runtime.device`` in fp32 master weights."""
    if model == TINY_MOE:
        tok = load_tokenizer(tokenizer, trust_remote_code) if tokenizer else build_demo_tokenizer()
        net = tiny_moe(tok, overrides, runtime.attn_implementation, seed)
    else:
        tok = load_tokenizer(tokenizer or model, trust_remote_code)
        net = load_model(model, runtime.attn_implementation, trust_remote_code)
        if net.config.pad_token_id is None:
            net.config.pad_token_id = tok.pad_token_id
    return net.to(runtime.device), tok


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


def enable_activation_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass (non-reentrant)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the newer transformers name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# LoRA through peft: a frozen base with trained low-rank adapters; the lm_head stays a plain frozen Linear.

ADAPTER_CONFIG = "adapter_config.json"  # what peft's save_pretrained writes next to the adapter weights


def unwrap(model):
    """The Hugging Face model inside a peft wrapper (``PeftModel.base_model.model``), else ``model`` itself."""
    peft = sys.modules.get("peft")  # not imported: ``model`` cannot be a PeftModel
    if peft is not None and isinstance(model, peft.PeftModel):
        return model.get_base_model()
    return model


def is_adapter(directory: str | Path) -> bool:
    """Whether ``directory`` holds a peft adapter (a LoRA checkpoint) rather than a whole model."""
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def lora_base_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The frozen base's dtype: bf16 or fp32 as set; 'auto' is bf16 on CUDA and fp32 elsewhere."""
    if setting == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return torch.bfloat16 if setting == "bf16" else torch.float32


def _head_name(model) -> str:
    head = model.get_output_embeddings()
    return next(name for name, module in model.named_modules() if module is head)


def add_lora(model, rank: int, alpha: float, dropout: float, targets: list[str], seed: int = 0):
    """``model`` wrapped by peft with rank-``rank`` LoRA adapters on the Linear modules named ``targets``
    (and, where peft maps those names onto a fused MoE experts tensor, on the experts), initialised from ``seed``.

    peft freezes every base parameter (the lm_head included: the fused loss
    reads its weight, which gets no adapter) and keeps the adapters in fp32
    over a bf16 base. ModelError when a target is the lm_head or matches no
    module.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ModuleNotFoundError:
        raise ModelError("lora_rank > 0 needs peft: pip install peft (it is in the train extra)") from None

    head = _head_name(model)
    if head in targets or head.rsplit(".", 1)[-1] in targets:
        raise ModelError(
            f"lora_target_modules names the output head {head!r}; the fused loss reads its weight directly, "
            "so it must stay adapter-free"
        )
    lora = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, exclude_modules=[head], bias="none"
    )
    try:
        with torch.random.fork_rng(devices=[]):  # peft draws lora_A from the global RNG
            torch.manual_seed(seed)
            wrapped = get_peft_model(model, lora)
    except ValueError as exc:
        raise ModelError(f"lora_target_modules {','.join(targets)} on {type(model).__name__}: {exc}") from None
    assert isinstance(wrapped.get_base_model().get_output_embeddings(), torch.nn.Linear), "lm_head got an adapter"
    return wrapped


def load_adapter(base, directory: str | Path, trainable: bool):
    """The base model with the peft adapter saved in ``directory`` (trainable for a resumed run)."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, directory, is_trainable=trainable)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"cannot load the LoRA adapter in {directory} onto {type(base).__name__}: {exc}") from None


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameter elements of ``model``."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

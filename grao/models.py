"""Models and tokenizers: the built-in tiny MoE, local Hugging Face directories, and the pieces the loss needs.

Nothing here downloads: local directories are opened with ``local_files_only``
and the demo tokenizer is trained offline on the task's own text.
"""

from __future__ import annotations

from pathlib import Path

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

    fields = dict(TINY_MOE_CONFIG, **(overrides or {}))
    fields.update(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    try:
        config = Qwen3MoeConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"bad model_overrides {overrides}: {exc}") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"tokenizer directory {str(path)!r} does not exist (no hub downloads: give a local path)")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a tokenizer from {path}: {exc}") from None
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


def load_model(path: str | Path, attn_implementation: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    check_source(str(path), None)
    return AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, dtype=torch.float32, attn_implementation=attn_implementation
    )


def load(model: str, tokenizer: str | None, overrides: dict, runtime, seed: int):
    """(model, tokenizer) on ``runtime.device`` in fp32 master weights."""
    if model == TINY_MOE:
        tok = load_tokenizer(tokenizer) if tokenizer else build_demo_tokenizer()
        net = tiny_moe(tok, overrides, runtime.attn_implementation, seed)
    else:
        tok = load_tokenizer(tokenizer or model)
        net = load_model(model, runtime.attn_implementation)
        if net.config.pad_token_id is None:
            net.config.pad_token_id = tok.pad_token_id
    check_supported(net)
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


def check_supported(model) -> None:
    """Reject heads that are more than a linear layer: the loss computes log-softmax(h W^T + b) and nothing else."""
    cfg = model.config
    for key in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        value = getattr(cfg, key, None)
        if value not in (None, 1, 1.0):
            raise ModelError(f"{type(model).__name__} transforms its logits ({key}={value}); grao_loss does not")
    backbone(model)
    output_head(model)


def moe_info(model) -> tuple[int, int] | None:
    """(num_experts, top_k) for a router-based MoE model, else None."""
    cfg = model.config
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    top_k = getattr(cfg, "num_experts_per_tok", None)
    if experts and top_k and hasattr(cfg, "router_aux_loss_coef"):
        return int(experts), int(top_k)
    return None


def aux_loss_coef(model, configured: float | None) -> float:
    """The router load-balancing weight: the configured one, else the model config's, else 0."""
    return float(configured if configured is not None else getattr(model.config, "router_aux_loss_coef", 0.0))


def load_balancing_loss(router_logits, num_experts: int, top_k: int, attention_mask: torch.Tensor, groups: int = 1):
    """Switch-Transformer load-balancing loss (arXiv 2101.03961, Eq. 4-6) over all layers, padding excluded.

    ``router_logits``: one (S*T, E) tensor per MoE layer; ``attention_mask`` (S, T).
    The S sequences are split into ``groups`` equal consecutive groups and the
    loss is computed within each, returned as a (groups,) tensor; with
    ``groups=1`` it is transformers' ``load_balancing_loss_func``. Also returns
    each expert's share of the routed (token, slot) assignments, (E,).
    """
    mask = attention_mask.reshape(groups, -1).float()  # (groups, tokens per group)
    counts = torch.zeros(groups, num_experts, device=mask.device)
    prob_sum = torch.zeros(groups, num_experts, device=mask.device)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1).view(groups, -1, num_experts)
        chosen = torch.nn.functional.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).sum(2).float()
        counts = counts + (chosen * mask[..., None]).sum(1)
        prob_sum = prob_sum + (probs * mask[..., None]).sum(1)
    rows = mask.sum(1, keepdim=True) * len(router_logits)
    aux = num_experts * ((counts / rows) * (prob_sum / rows)).sum(1)
    load = counts.sum(0)
    return aux, (load / load.sum().clamp(min=1)).detach()


def enable_activation_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass (non-reentrant)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the newer transformers name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

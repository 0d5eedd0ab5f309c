"""A model's shapes for ``grao plan``: parameter counts from the model built on the meta device, and the dimensions
the activation and loss formulas read, from a local config, the demo's or a preset of the paper's models."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from grao_kernels import hf

# Published architectures (the model's config.json on the Hugging Face hub), as transformers config fields.
PRESETS: dict[str, dict] = {
    # Qwen/Qwen2.5-7B: 7.62B parameters, untied embeddings, biases on q/k/v.
    "qwen2.5-7b": dict(
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        max_position_embeddings=131072,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
    # moonshotai/Moonlight-16B-A3B: DeepSeek-V3 architecture (MLA attention without a q LoRA, sigmoid routing),
    # 64 routed experts (top-6) and 2 shared experts per MoE layer, the first layer dense.
    "moonlight-16b-a3b": dict(
        model_type="deepseek_v3",
        hidden_size=2048,
        intermediate_size=11264,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        num_attention_heads=16,
        num_key_value_heads=16,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.446,
        norm_topk_prob=True,
        kv_lora_rank=512,
        q_lora_rank=None,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        vocab_size=163840,
        max_position_embeddings=8192,
        rope_theta=50000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
}


class PlanError(ValueError):
    """A model or setting the plan cannot use."""


def model_config(model: str, overrides: dict | None = None):
    """The transformers config of a preset name, 'tiny-moe' (the demo's, with ``overrides``) or a local directory
    holding a config.json."""
    from transformers import AutoConfig, Qwen3MoeConfig

    from .. import models

    if model == models.TINY_MOE:
        vocab = len(models.build_demo_tokenizer())
        return Qwen3MoeConfig(**dict(models.TINY_MOE_CONFIG, **(overrides or {}), vocab_size=vocab))
    if model in PRESETS:
        fields = dict(PRESETS[model])
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    if (Path(model) / "config.json").is_file():
        return _local_config(Path(model))
    raise PlanError(
        f"model {model!r} is neither a preset ({', '.join(PRESETS)}) nor a local directory with a config.json"
    )


_SIZES = ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads", "intermediate_size")


def _local_config(model: Path):
    """The config of a local model directory; PlanError naming config.json when it is not JSON, names a
    ``model_type`` transformers does not know, or gives a size below 1."""
    from transformers import AutoConfig

    path = model / "config.json"
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PlanError(f"{path} is not a JSON file ({exc})") from None
    if not isinstance(fields, dict):
        raise PlanError(f"{path} is not a JSON object")
    try:
        cfg = AutoConfig.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PlanError(f"{path}: {str(exc).splitlines()[0]}") from None
    text = getattr(cfg, "get_text_config", lambda: cfg)()
    for name in _SIZES:
        value = getattr(text, name, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise PlanError(f"{path}: {name} must be an integer >= 1, got {value!r}")
    return cfg


@dataclass(frozen=True)
class Architecture:
    """What the plan needs of a model: exact parameter counts from the meta-device model, and its shapes."""

    name: str
    params: int  # all parameter elements
    embed_head: int  # input embeddings + final norm + lm_head (FSDP's root unit)
    largest_layer: int  # parameter elements of the largest decoder layer (an FSDP unit)
    lora_per_rank: int  # LoRA adapter elements per unit of rank on the default target modules
    hidden: int
    layers: int
    vocab: int
    q_dim: int  # query width (heads x query head dim)
    k_dim: int  # key width as saved (after any GQA head repetition: the query heads x key head dim)
    v_dim: int  # value width as saved, likewise
    heads: int
    mlp_dims: tuple[int, ...]  # per layer: dense intermediate size, or 0 for an MoE layer
    moe_intermediate: int
    shared_intermediate: int  # the shared experts' total intermediate width (DeepSeek-V3), 0 if none
    experts: int
    top_k: int
    qk_norm: bool  # per-head q/k RMSNorm (Qwen3) or MLA's latent norms
    mla_latent: int  # DeepSeek-V3 MLA: kv_lora_rank + rope dim, saved through its norm; 0 otherwise
    kv_cache_per_token: int  # elements of the KV cache per token across layers (generation)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def architecture(model: str, lora_targets=LORA_TARGETS, overrides: dict | None = None) -> Architecture:
    """Count ``model``'s parameters exactly on the meta device (no weights allocated or read)."""
    from transformers import AutoModelForCausalLM

    cfg = model_config(model, overrides)
    try:
        hf.read_head(cfg)  # a head the trainer would refuse is refused here too
    except hf.HeadError as exc:
        raise PlanError(str(exc)) from None
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(cfg)
    params = sum(p.numel() for p in net.parameters())
    layers = list(net.model.layers)
    layer_sizes = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    lora = sum(
        m.in_features + m.out_features
        for name, m in net.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in lora_targets
    )
    # fused MoE experts (one (E, out, in) tensor per projection, gate and up fused): one adapter per expert
    fused = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
    lora += sum(
        p.shape[0] * (p.shape[1] + p.shape[2])
        for name, p in net.named_parameters()
        if p.dim() == 3 and any(t in lora_targets for t in fused.get(name.rsplit(".", 1)[-1], ()))
    )
    H, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    experts = getattr(cfg, "n_routed_experts", None) or getattr(cfg, "num_experts", None)
    experts = experts or getattr(cfg, "num_local_experts", None) or 0
    if getattr(cfg, "kv_lora_rank", None):  # DeepSeek-V3 multi-head latent attention
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        q_dim, k_dim, v_dim = heads * qk, heads * qk, heads * cfg.v_head_dim
        mla = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        kv_cache = L * (k_dim + v_dim)  # transformers caches the decompressed keys and values
    else:
        head_dim = getattr(cfg, "head_dim", None) or H // heads
        q_dim, k_dim, v_dim = heads * head_dim, heads * head_dim, heads * head_dim
        mla = 0
        kv_cache = L * 2 * kv_heads * head_dim
    first_dense = getattr(cfg, "first_k_dense_replace", 0) or 0
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    dense_only = getattr(cfg, "mlp_only_layers", None) or []
    mlp_dims = tuple(
        0 if experts and i >= first_dense and i not in dense_only and (i + 1) % step == 0 else cfg.intermediate_size
        for i in range(L)
    )
    moe_inter = (getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size) if experts else 0
    shared = (getattr(cfg, "n_shared_experts", 0) or 0) * moe_inter
    shared = shared or (getattr(cfg, "shared_expert_intermediate_size", 0) or 0)
    return Architecture(
        name=model,
        params=params,
        embed_head=params - sum(layer_sizes),
        largest_layer=max(layer_sizes),
        lora_per_rank=lora,
        hidden=H,
        layers=L,
        vocab=V,
        q_dim=q_dim,
        k_dim=k_dim,
        v_dim=v_dim,
        heads=heads,
        mlp_dims=mlp_dims,
        moe_intermediate=moe_inter,
        shared_intermediate=shared,
        experts=experts,
        top_k=getattr(cfg, "num_experts_per_tok", 0) or 0,
        qk_norm=bool(mla) or hasattr(net.model.layers[0].self_attn, "q_norm"),
        mla_latent=mla,
        kv_cache_per_token=kv_cache,
    )

"""``grao plan``: memory per rank, part by part, and which options make a model fit."""

from __future__ import annotations

from .. import config as config_mod
from ..log import say


def run(args) -> int:
    """``grao plan`` with the parsed ``args``: prints the memory plan (Markdown or JSON); its exit status."""
    from ..tools import plan

    # A model named on the command line is the run's model, so the run's model-dependent defaults (max_new_tokens)
    # are that model's, not the demo's.
    cfg = config_mod.load(args.config, {"model": args.model} if args.model else None)
    model, note = plan.resolve_model(cfg.model)
    if note:
        say(note)
    arch = plan.architecture(model, config_mod.lora_targets(cfg), cfg.model_overrides)
    overrides = {
        k: getattr(args, k)
        for k in (
            "fsdp",
            "seq_len",
            "prompts_per_step",
            "micro_batch_prompts",
            "group_size",
            "lora_rank",
            "compute_dtype",
            "param_dtype",
            "cpu_offload",
            "gradient_checkpointing",
            "loss_backend",
        )
    }
    settings = plan.settings_from_config(cfg, args.devices, args.memory_gb, **overrides)
    say(rollout_engine_line(cfg, model, settings.seq_len))
    result, alternatives = plan.plan(arch, settings), plan.options(arch, settings)
    print(
        plan.dumps(plan.to_json(arch, result, alternatives)) if args.json else plan.markdown(arch, result, alternatives)
    )
    return 0


def rollout_engine_line(cfg, model: str, seq_len: int) -> str:
    """Which rollout engine ``grao train`` would use for ``model`` on CUDA and on CPU, and why
    (:func:`grao.train.engines.choose`)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from ..config import ConfigError
    from ..tools.architecture import model_config
    from ..train import engines

    config = model_config(model, cfg.model_overrides)
    if not getattr(config, "architectures", None):
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, config.model_type)]
    parts = []
    seq_len = min(seq_len, getattr(config, "max_position_embeddings", None) or seq_len)  # prompts are cut to fit
    for device in ("cuda", "cpu"):
        try:
            choice = engines.choose(cfg.rollout_engine, config, device, seq_len)
            parts.append(f"{device}: {choice.engine} ({choice.why})")
        except ConfigError as exc:
            parts.append(f"{device}: cannot run ({exc})")
    return f"rollout engine ({cfg.rollout_engine}) on " + "; ".join(parts)

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
    result, alternatives = plan.plan(arch, settings), plan.options(arch, settings)
    print(
        plan.dumps(plan.to_json(arch, result, alternatives)) if args.json else plan.markdown(arch, result, alternatives)
    )
    return 0

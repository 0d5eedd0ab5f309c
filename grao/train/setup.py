"""What a run starts from: its model and tokenizer (fresh, LoRA-wrapped, a checkpoint's), the frozen starting
model a loss may compare against, and the check that a run can be resumed with the settings given."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from .. import config, data, models
from ..config import ConfigError
from ..data import context_limits, text_coverage
from ..log import say
from ..models.generation import encode_prompt
from . import checkpoint, run_dir, step_bounds


def fresh_model(cfg, rt) -> tuple:
    """(model, tokenizer, initial model) of a new run: the config's model on ``rt.device``, under LoRA its adapters
    over the base; the initial model is what ``initial/`` holds for the demo (the full-weight base under LoRA)."""
    model, tokenizer = models.load(
        cfg.policy.model,
        cfg.policy.tokenizer,
        cfg.policy.model_overrides,
        rt,
        cfg.run.seed,
        cfg.policy.trust_remote_code,
    )
    initial = model
    if cfg.lora.rank:
        if cfg.policy.model == models.TINY_MOE:  # tiny by construction: keep the full-weight base for initial/
            initial = copy.deepcopy(model)
        model = models.add_lora(
            model.to(models.lora_base_dtype(cfg.lora.base_dtype, rt.device)),
            cfg.lora.rank,
            cfg.lora.alpha,
            cfg.lora.dropout,
            config.lora_targets(cfg),
            cfg.run.seed,
        )
    return model, tokenizer, initial


def frozen_start(cfg, rt) -> torch.nn.Module:
    """The frozen starting policy, for losses that compare against it (DPO, GRPO's KL, PPO): loaded afresh from the
    config, so a resumed run gets the same one."""
    model, _ = models.load(
        cfg.policy.model,
        cfg.policy.tokenizer,
        cfg.policy.model_overrides,
        rt,
        cfg.run.seed,
        cfg.policy.trust_remote_code,
    )
    return model.eval().requires_grad_(False)


def checkpoint_model(directory: Path, cfg, rt):
    """A checkpoint's model: the whole model, or (LoRA) its adapter on the frozen base the run started from
    (``initial/`` for the demo, else ``cfg.policy.model``)."""
    if not models.is_adapter(directory):
        return models.load_model(directory, rt.attn_implementation, cfg.policy.trust_remote_code).to(rt.device)
    base_dir = Path(cfg.run.output_dir) / run_dir.INITIAL if cfg.policy.model == models.TINY_MOE else cfg.policy.model
    base = models.load_model(base_dir, rt.attn_implementation, cfg.policy.trust_remote_code)
    base = base.to(rt.device, models.lora_base_dtype(cfg.lora.base_dtype, rt.device))
    return models.load_adapter(base, directory, trainable=True)


def check_resumable(cfg) -> None:
    """ConfigError unless the run in ``cfg.run.output_dir`` has a checkpoint and its saved settings, and ``cfg`` changes
    nothing it computes (only the resume-safe keys)."""
    directory = Path(cfg.run.output_dir)
    if not checkpoint.step_dirs(directory):
        raise ConfigError(f"--resume: no checkpoint in {directory / checkpoint.CHECKPOINTS}")
    saved = directory / run_dir.CONFIG
    if not saved.is_file():
        raise ConfigError(
            f"--resume: {saved} is missing, and without the run's settings a resumed run would silently use "
            "others; restore the file (or start a new run with --overwrite)"
        )
    conflicts = config.resume_conflicts(config.load(saved), cfg)
    if conflicts:
        raise ConfigError(
            f"--resume would change what the run in {directory} computes ({'; '.join(conflicts)}); "
            "start a new run in another output_dir for that"
        )


def check_data_fits(cfg, model, tokenizer, examples, device) -> tuple[int, int]:
    """(the prompt tokens a prompt keeps, how many prompts are longer) for ``model``'s context, after checking that
    one step fits the machine's memory (:mod:`grao.train.step_bounds`), that every prompt leaves room for its
    answer, and warning about prompts cut and text the tokenizer does not know."""
    budget, note = context_limits.prompt_budget(model.config, cfg.dataset.max_prompt_tokens, cfg.rollout.max_new_tokens)
    step_bounds.check(cfg, budget, models.output_head(model)[0].shape[1], device)
    prompts = [ex.prompt for ex in examples]
    cut = context_limits.count_longer(
        prompts, lambda p, n: encode_prompt(tokenizer, p, n, cfg.dataset.chat_template), budget
    )
    if cut:  # max_prompt_tokens defaults to what the context leaves: quiet until a prompt is cut
        why = f" ({note})" if note else ""
        say(
            f"warning: {cut} of {len(prompts)} prompts are longer than {budget} tokens and are cut to their last "
            f"{budget}{why}; metric data/prompts_cut"
        )
    data.check_prompts(examples, lambda p: encode_prompt(tokenizer, p, budget, cfg.dataset.chat_template))
    unknown, first = text_coverage.unknown_examples(examples, tokenizer)
    if unknown:
        say(
            f"warning: {unknown} example(s) hold text the tokenizer does not know (it becomes "
            f"{tokenizer.unk_token}), first {first}; use a tokenizer that covers the data"
        )
    return budget, cut

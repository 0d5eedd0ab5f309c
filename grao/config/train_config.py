"""The trainer's configuration: :class:`TrainConfig`, one dataclass per section (:mod:`.sections`), validated once.

Each key is read as ``cfg.<section>.<field>`` (``cfg.rollout.group_size``) or by its flat name (``cfg.group_size``,
``cfg.grpo_kl_beta``), which every key of the flat config before sections keeps. The keys whose demo value would
not suit a real model (:data:`MODEL_DEFAULTS`) default by model: the demo's for tiny-moe, the paper's for any other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .fields import ConfigError, base_type, check_type, check_value
from .sections import (
    SECTIONS,
    Dataset,
    Dpo,
    Evaluation,
    Fsdp,
    Grao,
    Grpo,
    Judge,
    Lora,
    Objective,
    Optimizer,
    Policy,
    Ppo,
    Rollout,
    Run,
    Runtime,
)


class Key(NamedTuple):
    """One config key: its spelling (``lr``, ``grpo.kl_beta``), where it lives, its flat name and its field."""

    name: str
    section: str
    field: str
    flat: str
    spec: dataclasses.Field
    type: type
    optional: bool

    @property
    def path(self) -> str:
        return f"{self.section}.{self.field}"


def _keys() -> dict[str, Key]:
    keys = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            flat = f.metadata["flat"] or f.name
            name = f.name if flat == f.name else f"{section}.{f.name}"
            keys[name] = Key(name, section, f.name, flat, f, *base_type(cls, f.name))
    return keys


# every key by its spelling, in section order; and the flat names (attribute names) of the keys
FIELDS: dict[str, Key] = _keys()
FLAT: dict[str, Key] = {k.flat: k for k in FIELDS.values()}
assert len(FLAT) == len(FIELDS), "two keys share a flat name"

# Defaults that depend on the model: the demo's tiny MoE learns its 8-token task from random weights in 200 steps
# at a high rate; a pretrained model gets the paper's rate (arXiv 2508.07750, Sec. 4.1: AdamW at 1e-6), no warmup
# (the paper states none), and completions of up to 256 tokens (the paper's preset,
# configs/paper_hh_qwen2.5-7b.yaml, sets its 2048).
MODEL_DEFAULTS = {
    "tiny-moe": {"lr": 3e-3, "max_new_tokens": 8, "warmup_steps": 20},
    "model": {"lr": 1e-6, "max_new_tokens": 256, "warmup_steps": 0},
}


@dataclass(init=False)
class TrainConfig:
    """A run's settings, one attribute per section; built from sections, from keys, or both::

    TrainConfig(steps=10, grpo_kl_beta=0.04)  # flat names, as before sections
    TrainConfig(rollout=Rollout(group_size=4), lr=1e-4)
    """

    run: Run = field(default_factory=Run)
    policy: Policy = field(default_factory=Policy)
    dataset: Dataset = field(default_factory=Dataset)
    rollout: Rollout = field(default_factory=Rollout)
    judge: Judge = field(default_factory=Judge)
    objective: Objective = field(default_factory=Objective)
    grao: Grao = field(default_factory=Grao)
    grpo: Grpo = field(default_factory=Grpo)
    dpo: Dpo = field(default_factory=Dpo)
    ppo: Ppo = field(default_factory=Ppo)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lora: Lora = field(default_factory=Lora)
    runtime: Runtime = field(default_factory=Runtime)
    fsdp: Fsdp = field(default_factory=Fsdp)
    evaluation: Evaluation = field(default_factory=Evaluation)

    # the model-dependent keys that were unset and took MODEL_DEFAULTS' value (resolved again if the model changes)
    defaulted: frozenset = field(init=False, repr=False, compare=False)

    def __init__(self, **values) -> None:
        for section, cls in SECTIONS.items():  # each config owns its sections (dataclasses.replace passes them on)
            given = values.pop(section, None)
            if given is not None and not isinstance(given, cls):
                raise ConfigError(f"section {section!r} must be a {cls.__name__}, got {given!r}")
            object.__setattr__(self, section, dataclasses.replace(given) if given is not None else cls())
        for name, value in values.items():
            k = FLAT.get(name) or FIELDS.get(name)
            if k is None:
                raise TypeError(f"TrainConfig got an unexpected keyword argument {name!r}")
            setattr(getattr(self, k.section), k.field, value)
        defaults = MODEL_DEFAULTS["tiny-moe" if self.model == "tiny-moe" else "model"]
        self.defaulted = frozenset(name for name in defaults if getattr(self, name) is None)
        for name in self.defaulted:
            setattr(self, name, defaults[name])
        for k in FIELDS.values():
            section = getattr(self, k.section)
            setattr(section, k.field, check_type(k.name, k.type, k.optional, getattr(section, k.field)))
        validate(self)

    def __getattr__(self, name: str):  # only for names that are not attributes: the flat keys
        k = FLAT.get(name)
        section = self.__dict__.get(k.section) if k is not None else None
        if section is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(section, k.field)

    def __setattr__(self, name: str, value) -> None:
        k = FLAT.get(name)
        if k is not None:
            setattr(getattr(self, k.section), k.field, value)
        else:
            object.__setattr__(self, name, value)


def get(cfg: TrainConfig, k: Key):
    return getattr(getattr(cfg, k.section), k.field)


def validate(cfg: TrainConfig) -> None:
    """Every key's range and choices, from its metadata (types are checked on construction), then the rules that
    tie keys together; ConfigError naming the first bad key and what it allows."""
    for k in FIELDS.values():
        check_value(k.name, k.spec.metadata, get(cfg, k))
    if cfg.runtime.device != "auto":
        try:
            torch.device(cfg.runtime.device)
        except (RuntimeError, ValueError):
            raise ConfigError(
                f"'device' must be auto or a torch device such as cpu, cuda, cuda:1; got {cfg.runtime.device!r}"
            ) from None
    lora = cfg.lora
    if lora.dropout >= 1:
        raise ConfigError(f"'lora.dropout' must be in [0, 1), got {lora.dropout}")
    targets = lora_targets(cfg)
    if lora.rank and not targets:
        raise ConfigError("'lora.target_modules' names no module: give comma-separated Linear module names")
    if "lm_head" in targets:
        raise ConfigError(
            "'lora.target_modules' must not name lm_head: the fused loss reads the head's weight directly, "
            "so it stays frozen and adapter-free"
        )
    if lora.rank and cfg.policy.router_bias_update_rate > 0:
        raise ConfigError(
            "'router_bias_update_rate' > 0 with 'lora.rank' > 0: a LoRA checkpoint saves only the adapters, "
            "so the updated router biases would be lost on resume; use one of the two"
        )
    if cfg.judge.template is not None and not cfg.rollout.reward.startswith("judge-model:"):
        raise ConfigError(
            f"'judge.template' is set but 'reward' is {cfg.rollout.reward!r}: the template is for a judge-model:DIR "
            "reward"
        )
    cap = cfg.rollout.vllm_importance_sampling_cap
    if cap > 0 and (cfg.objective.method not in ("grpo", "ppo") or cfg.objective.num_iterations == 1):
        raise ConfigError(
            f"'vllm_importance_sampling_cap' ({cap:g}) corrects the ratio to the sampling policy of grpo or ppo with "
            f"'num_iterations' > 1; this run is {cfg.objective.method} with num_iterations "
            f"{cfg.objective.num_iterations}"
        )
    if cap > 0 and cfg.rollout.rollout_engine == "hf":
        raise ConfigError(
            "'vllm_importance_sampling_cap' > 0 with 'rollout_engine' hf: the correction needs the vllm engine's "
            "log-probs"
        )
    if cfg.runtime.micro_batch_prompts > cfg.rollout.prompts_per_step:
        raise ConfigError(
            f"'micro_batch_prompts' ({cfg.runtime.micro_batch_prompts}) must be <= 'prompts_per_step' "
            f"({cfg.rollout.prompts_per_step})"
        )


def lora_targets(cfg: TrainConfig) -> list[str]:
    """The module names of ``lora.target_modules``, in order, blanks dropped."""
    return [name.strip() for name in cfg.lora.target_modules.split(",") if name.strip()]


def to_dict(cfg: TrainConfig) -> dict:
    """Every key by its spelling (``lr``, ``grpo.kl_beta``) with its value, the model-dependent defaults resolved."""
    return {name: get(cfg, k) for name, k in FIELDS.items()}


def to_nested(cfg: TrainConfig) -> dict:
    """``{section: {field: value}}``, as a run's config.yaml holds it."""
    return {section: dataclasses.asdict(getattr(cfg, section)) for section in SECTIONS}


def resume_conflicts(saved: TrainConfig, cfg: TrainConfig) -> list[str]:
    """``key: saved -> new`` for each key that differs from the saved run and that a resumed run may not change."""
    return [
        f"{name}: {get(saved, k)!r} -> {get(cfg, k)!r}"
        for name, k in FIELDS.items()
        if not k.spec.metadata["resume_safe"] and get(saved, k) != get(cfg, k)
    ]

"""Trainer configuration: one dataclass, loaded from YAML/TOML and overridden by command-line flags.

The defaults are the embedded demo: ``grao train`` with no arguments trains
the built-in tiny MoE on the bundled synthetic task (:mod:`grao.demo_task`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A configuration file or value the trainer cannot use; the message says which key and why."""


@dataclass
class TrainConfig:
    # what to train
    model: str = "tiny-moe"  # "tiny-moe" (built-in, random init) or a local Hugging Face causal-LM directory
    tokenizer: str | None = None  # default: the model directory (the demo tokenizer for tiny-moe)
    model_overrides: dict = field(default_factory=dict)  # config fields for tiny-moe, e.g. {"num_hidden_layers": 2}
    data: str = "demo"  # "demo" or a JSONL file ({"prompt","reference"} or HH-RLHF {"chosen","rejected"})
    eval_data: str | None = None  # default: the demo's held-out set, or the last eval_size examples of data
    eval_size: int = 64
    demo_train_size: int = 4000
    reward: str = "auto"  # auto (demo checker for demo data, else edit), demo, exact, edit, model:DIR, module:function
    output_dir: str = "runs/demo"
    seed: int = 0
    # the GRAO step
    steps: int = 200
    prompts_per_step: int = 16  # P
    group_size: int = 8  # G completions per prompt
    temperature: float = 0.7
    max_new_tokens: int = 8
    max_prompt_tokens: int = 512
    beta: float = 0.5  # imitation weight (arXiv 2508.07750, Eq. 3)
    lam: float = 0.6  # alignment weight
    loss_backend: str = "auto"
    router_aux_loss_coef: float | None = None  # MoE load balancing; default: the model config's value
    # optimisation
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    lr_schedule: str = "cosine"  # cosine, linear or constant after warmup
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    micro_batch_prompts: int = 0  # prompt groups per forward/backward; 0 = all P at once
    gradient_checkpointing: bool = False
    # runtime
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16
    attn_implementation: str = "auto"  # auto (flash_attention_2 on CUDA when installed, else sdpa), sdpa, eager, ...
    threads: int = (
        0  # torch CPU threads; 0 = 1 for tiny-moe on CPU (tiny matmuls only lose to thread sync), else torch's default
    )
    # evaluation, checkpoints, logging
    eval_every: int = 25
    eval_batch_size: int = 64
    eval_greedy: bool = True
    save_every: int = 100
    keep_checkpoints: int = 2
    plot: bool = True
    progress: bool = True


CHOICES = {
    "lr_schedule": ("cosine", "linear", "constant"),
    "precision": ("auto", "fp32", "bf16"),
}
POSITIVE = (
    "steps",
    "prompts_per_step",
    "group_size",
    "max_new_tokens",
    "max_prompt_tokens",
    "eval_size",
    "eval_every",
    "eval_batch_size",
    "save_every",
    "keep_checkpoints",
    "demo_train_size",
)
NON_NEGATIVE = ("warmup_steps", "micro_batch_prompts", "threads", "weight_decay", "beta", "lam", "min_lr_ratio")

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _base_type(name: str):
    """(type, optional) of a field, from its annotation string."""
    hints = typing.get_type_hints(TrainConfig)
    tp = hints[name]
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        non_none = [a for a in args if a is not type(None)]
        return non_none[0], True
    return tp, False


def _coerce(name: str, value, source: str):
    tp, optional = _base_type(name)
    where = f"{name!r} ({source})"
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"{where} must be a {tp.__name__}, got null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if tp is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"{where} must be a mapping (JSON on the command line), got {value!r}: {exc}"
                ) from None
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return str(value)


def update(cfg: TrainConfig, values: dict, source: str) -> TrainConfig:
    """A copy of ``cfg`` with ``values`` applied; unknown keys and wrong types raise ConfigError."""
    new = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            close = difflib.get_close_matches(name, FIELDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(FIELDS)}"
            raise ConfigError(f"unknown config key {key!r} in {source}{hint}")
        new[name] = _coerce(name, value, source)
    cfg = dataclasses.replace(cfg, **new)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    for name in POSITIVE:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name!r} must be >= 1, got {getattr(cfg, name)}")
    for name in NON_NEGATIVE:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name!r} must be >= 0, got {getattr(cfg, name)}")
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise ConfigError(f"{name!r} must be one of {', '.join(choices)}, got {getattr(cfg, name)!r}")
    if not cfg.temperature > 0:
        raise ConfigError(f"'temperature' must be > 0, got {cfg.temperature}")
    if not cfg.lr > 0:
        raise ConfigError(f"'lr' must be > 0, got {cfg.lr}")
    if not cfg.max_grad_norm > 0:
        raise ConfigError(f"'max_grad_norm' must be > 0, got {cfg.max_grad_norm}")
    if cfg.micro_batch_prompts > cfg.prompts_per_step:
        raise ConfigError(
            f"'micro_batch_prompts' ({cfg.micro_batch_prompts}) must be <= 'prompts_per_step' ({cfg.prompts_per_step})"
        )


def read_file(path: str | Path) -> dict:
    """The mapping in a YAML (.yaml/.yml) or TOML (.toml) config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            try:
                import tomli as tomllib
            except ModuleNotFoundError:
                raise ConfigError("reading TOML configs on Python 3.10 needs `pip install tomli`") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    elif suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    else:
        raise ConfigError(f"config file {str(path)!r} must end in .yaml, .yml or .toml")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values, got {type(data).__name__}")
    return data


def load(path: str | Path | None = None, overrides: dict | None = None, base: TrainConfig | None = None) -> TrainConfig:
    """Defaults (or ``base``), then the file at ``path``, then ``overrides`` (e.g. command-line flags)."""
    cfg = base if base is not None else TrainConfig()
    if path is not None:
        cfg = update(cfg, read_file(path), str(path))
    if overrides:
        cfg = update(cfg, overrides, "command line")
    validate(cfg)
    return cfg


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)

"""Trainer configuration: one dataclass that validates itself, read from YAML/TOML and overridden by flags.

The defaults are the embedded demo: ``grao train`` with no arguments trains
the built-in tiny MoE on the bundled synthetic task (:mod:`grao.data.demo_task`).
The keys whose demo value would not suit a real model (:data:`MODEL_DEFAULTS`)
default by model: the demo's for tiny-moe, the paper's for any other.
Every key is also a ``grao train`` flag (:func:`add_arguments`), so the flags,
the file keys and the Python fields are one list.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from grao_kernels.backends import BACKENDS

from ..losses import DPO_REJECTED, GRPO_LOSS_TYPES, METHODS


class ConfigError(ValueError):
    """A configuration file or value the trainer cannot use; the message says which key and why."""


def _key(default, help: str = "", *, resume_safe: bool = False):
    """A config key: its default, the one-line help ``grao train --help`` shows, and whether ``--resume`` may change it.

    A key is resume-safe when a resumed run that changes it is still the same
    run: how long it goes on, how often it evaluates or saves, and how each
    step is computed (device, kernels, micro-batches), not what it computes.
    """
    meta = {"help": help, "resume_safe": resume_safe}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # what to train
    model: str = _key("tiny-moe", "'tiny-moe' (built-in, random weights) or a local Hugging Face causal-LM directory")
    tokenizer: str | None = _key(None, "tokenizer directory (default: the model's; the demo's for tiny-moe)")
    trust_remote_code: bool = _key(
        False, "run the Python code a local model or tokenizer directory ships (its auto_map); only for code you trust"
    )
    model_overrides: dict = _key({}, 'tiny-moe config fields, e.g. {"num_hidden_layers": 4} (JSON on the command line)')
    data: str = _key("demo", "'demo' or a JSONL file of {prompt, reference} or HH-RLHF {chosen, rejected} lines")
    eval_data: str | None = _key(
        None, "held-out JSONL or 'demo' (default: the demo's, else the last eval_size of data)"
    )
    eval_size: int = _key(64, "held-out prompts evaluated")
    demo_train_size: int = _key(4000, "training prompts of the demo task")
    reward: str = _key(
        "auto",
        "auto (demo for demo data, else edit), demo, exact, edit, model:DIR, module:function, or a pairwise judge "
        "R(o, y) in {-1, 0, 1}: judge-model:DIR (a local causal LM) or judge:module:function",
    )
    judge_template: str | None = _key(
        None, "judge-model's prompt: a text file using {prompt}, {response}, {reference} (default: the built-in one)"
    )
    judge_max_new_tokens: int = _key(16, "judge-model's longest verdict reply, in tokens (greedy)")
    judge_batch_size: int = _key(16, "judge-model's prompts per generate call", resume_safe=True)
    output_dir: str = _key("runs/demo", "run directory: config, metrics, plot, checkpoints", resume_safe=True)
    seed: int = _key(0, "seeds the data order, the model init and each step's sampling")
    # the GRAO step (arXiv 2508.07750, Eq. 3-4)
    steps: int = _key(
        200,
        "training steps, each a rollout and num_iterations optimizer steps on it (a resumed run may extend it; "
        "the lr schedule stretches)",
        resume_safe=True,
    )
    prompts_per_step: int = _key(16, "P, prompts per step")
    group_size: int = _key(8, "G, sampled completions per prompt")
    temperature: float = _key(0.7, "sampling temperature of the completions")
    logprob_temperature: str = _key(
        "1",
        "temperature of the log-probs every loss (and the frozen reference model) computes: 1 (the model's own "
        "distribution) or sampling (logits / temperature, as TRL)",
    )
    max_new_tokens: int | None = _key(None, "longest completion, in tokens (default: 8 for tiny-moe, else 256)")
    max_prompt_tokens: int = _key(512, "prompts are cut to their last this many tokens")
    method: str = _key("grao", f"training objective: {', '.join(METHODS)} (grao.losses)")
    grpo_loss_type: str = _key("grpo", f"grpo's loss aggregation, as TRL's loss_type: {', '.join(GRPO_LOSS_TYPES)}")
    grpo_kl_beta: float = _key(
        0.0, "grpo's weight of the k3 KL estimate to the frozen starting model, per token (0 = off, as TRL's beta)"
    )
    num_iterations: int = _key(
        1,
        "optimizer steps on each rollout (TRL's num_iterations); grpo and ppo clip their ratio to the sampling "
        "policy's log-probs, methods without such a correction (grao, sft, dpo) take the same loss again",
    )
    clip_epsilon: float = _key(
        0.2,
        "ppo's ratio clip [1 - eps, 1 + eps]; grpo's lower clip 1 - eps (with num_iterations > 1)",
    )
    clip_epsilon_high: float | None = _key(
        None, "grpo with num_iterations > 1: the ratio's upper clip 1 + clip_epsilon_high (default: clip_epsilon)"
    )
    dpo_beta: float = _key(0.1, "dpo's beta, the weight of its implicit KL to the frozen starting model")
    dpo_rejected: str = _key(
        "auto",
        "dpo's rejected answer: data (each example's 'rejected', e.g. HH-RLHF; no sampling), sampled (the "
        "lowest-scored of the G samples) or auto (data when every training example has one, else sampled)",
    )
    ppo_kl_coef: float = _key(0.05, "ppo's per-token KL penalty to the frozen starting model, in the reward")
    ppo_gamma: float = _key(1.0, "ppo's discount over completion tokens")
    ppo_gae_lambda: float = _key(0.95, "ppo's GAE lambda")
    ppo_vf_coef: float = _key(0.1, "ppo's value-loss weight")
    ppo_vf_clip: float = _key(0.2, "ppo's value clip: new values stay within this of the rollout's")
    chat_template: bool = _key(
        False, "render each prompt as a user message through the tokenizer's chat template (when it has one)"
    )
    beta: float = _key(0.5, "imitation weight")
    lam: float = _key(0.6, "alignment weight")
    loss_backend: str = _key("auto", "grao_kernels backend: auto, torch, triton or native", resume_safe=True)
    router_aux_loss_coef: float | None = _key(None, "MoE load-balancing weight (default: the model config's)")
    router_bias_update_rate: float = _key(
        0.0,
        "DeepSeek-V3 auxiliary-loss-free balancing: after each step every expert's router bias moves this much "
        "toward balance (0 = off; arXiv 2412.19437 uses 0.001)",
    )
    # LoRA (peft): a frozen base with trained low-rank adapters; the lm_head stays frozen and still feeds the loss
    lora_rank: int = _key(0, "LoRA adapter rank r; 0 = off (full fine-tuning)")
    lora_alpha: float = _key(16.0, "LoRA scaling numerator: the adapter update is (alpha / r) B A")
    lora_dropout: float = _key(0.0, "dropout on the LoRA adapters' input, in [0, 1)")
    lora_target_modules: str = _key(
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        "comma-separated names of the Linear modules that get adapters (never the lm_head)",
    )
    lora_base_dtype: str = _key(
        "auto", "dtype of the frozen LoRA base: auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16", resume_safe=True
    )
    # optimisation
    lr: float | None = _key(None, "peak AdamW learning rate (default: 3e-3 for tiny-moe, else the paper's 1e-6)")
    weight_decay: float = _key(0.01, "AdamW weight decay")
    warmup_steps: int | None = _key(None, "linear warmup steps (default: 20 for tiny-moe, else 0)")
    lr_schedule: str = _key("cosine", "after warmup: cosine, linear or constant")
    min_lr_ratio: float = _key(0.1, "final learning rate / peak for cosine and linear")
    max_grad_norm: float = _key(1.0, "gradient clipping norm")
    micro_batch_prompts: int = _key(
        0, "prompt groups per forward/backward, gradients accumulated; 0 = all P at once", resume_safe=True
    )
    gradient_checkpointing: bool = _key(False, "recompute activations in the backward pass", resume_safe=True)
    # several processes (torchrun) and the FSDP2 memory options; either shards the model (grao.train.distributed)
    fsdp_cpu_offload: bool = _key(
        False,
        "FSDP2 CPU offload: sharded parameters, gradients and optimizer state live in CPU memory",
        resume_safe=True,
    )
    fsdp_param_dtype: str = _key(
        "fp32",
        "FSDP2 parameter dtype for compute: bf16 all-gathers and computes in bf16 over fp32 master weights "
        "(gradients reduced in fp32)",
        resume_safe=True,
    )
    # runtime
    device: str = _key("auto", "auto, cpu, cuda, cuda:1, ...", resume_safe=True)
    precision: str = _key("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16", resume_safe=True)
    attn_implementation: str = _key(
        "auto", "auto (flash_attention_2 on CUDA when installed, else sdpa), sdpa, eager", resume_safe=True
    )
    threads: int = _key(
        0, "torch CPU threads; 0 = 1 for tiny-moe on CPU (its tiny matmuls only lose to thread sync)", resume_safe=True
    )
    # evaluation, checkpoints, logging
    eval_every: int = _key(25, "evaluate every this many steps (and at step 0 and the end)", resume_safe=True)
    eval_batch_size: int = _key(64, "prompts per generate call in evaluation", resume_safe=True)
    eval_greedy: bool = _key(True, "greedy decoding in evaluation (false: sample at temperature)")
    save_every: int = _key(100, "checkpoint every this many steps (and at the end)", resume_safe=True)
    keep_checkpoints: int = _key(2, "checkpoints kept, newest first", resume_safe=True)
    plot: bool = _key(True, "write plot.png at the end", resume_safe=True)
    progress: bool = _key(True, "show a progress bar", resume_safe=True)

    # the model-dependent keys that were unset and took MODEL_DEFAULTS' value (resolved again if the model changes)
    defaulted: frozenset = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        defaults = MODEL_DEFAULTS["tiny-moe" if self.model == "tiny-moe" else "model"]
        self.defaulted = frozenset(name for name in defaults if getattr(self, name) is None)
        for name in self.defaulted:
            setattr(self, name, defaults[name])
        for name in FIELDS:
            setattr(self, name, _check_type(name, getattr(self, name)))
        validate(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if f.init}

# Defaults that depend on the model: the demo's tiny MoE learns its 8-token task from random weights in 200 steps
# at a high rate; a pretrained model gets the paper's rate (arXiv 2508.07750, Sec. 4.1: AdamW at 1e-6), no warmup
# (the paper states none), and completions of up to 256 tokens (the paper's preset,
# configs/paper_hh_qwen2.5-7b.yaml, sets its 2048).
MODEL_DEFAULTS = {
    "tiny-moe": {"lr": 3e-3, "max_new_tokens": 8, "warmup_steps": 20},
    "model": {"lr": 1e-6, "max_new_tokens": 256, "warmup_steps": 0},
}

CHOICES = {
    "method": METHODS,
    "grpo_loss_type": GRPO_LOSS_TYPES,
    "logprob_temperature": ("1", "sampling"),
    "dpo_rejected": DPO_REJECTED,
    "lr_schedule": ("cosine", "linear", "constant"),
    "precision": ("auto", "fp32", "bf16"),
    "loss_backend": ("auto", *BACKENDS),
    "attn_implementation": ("auto", "sdpa", "eager", "flash_attention_2"),
    "lora_base_dtype": ("auto", "fp32", "bf16"),
    "fsdp_param_dtype": ("fp32", "bf16"),
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
    "num_iterations",
    "judge_max_new_tokens",
    "judge_batch_size",
)
NON_NEGATIVE = ("warmup_steps", "micro_batch_prompts", "threads", "lora_rank")
# (low, high, low inclusive) for every float key. The upper bounds reject values that cannot be meant: an AdamW
# lr above 1 moves every weight by about 1 per step, weight decay above 1 shrinks weights past zero, and loss weights
# or a temperature beyond 1e3 swamp every other term (the paper uses beta 0.5, lambda 0.6, temperature 0.7), and a
# router bias step above 1 outweighs the sigmoid scores in [0, 1] it is added to. A lower clip 1 - clip_epsilon below 0
# clips nothing (ratios are positive); a clip range is a ratio's distance from 1, so 1e3 bounds the upper one.
RANGES = {
    "lr": (0.0, 1.0, False),
    "weight_decay": (0.0, 1.0, True),
    "beta": (0.0, 1e3, True),
    "dpo_beta": (0.0, 1e3, False),
    "grpo_kl_beta": (0.0, 1e3, True),
    "clip_epsilon": (0.0, 1.0, False),
    "clip_epsilon_high": (0.0, 1e3, False),
    "ppo_kl_coef": (0.0, 1e3, True),
    "ppo_gamma": (0.0, 1.0, True),
    "ppo_gae_lambda": (0.0, 1.0, True),
    "ppo_vf_coef": (0.0, 1e3, True),
    "ppo_vf_clip": (0.0, 1e3, False),
    "lam": (0.0, 1e3, True),
    "router_aux_loss_coef": (0.0, 1e3, True),
    "router_bias_update_rate": (0.0, 1.0, True),
    "temperature": (0.0, 1e3, False),
    "min_lr_ratio": (0.0, 1.0, True),
    "max_grad_norm": (0.0, math.inf, False),
    "lora_alpha": (0.0, 1e4, False),
    "lora_dropout": (0.0, 1.0, True),
}


def _base_type(name: str) -> tuple[type, bool]:
    """(type, optional) of a field, from its annotation."""
    tp = typing.get_type_hints(TrainConfig)[name]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return next(a for a in typing.get_args(tp) if a is not type(None)), True
    return tp, False


def _check_type(name: str, value):
    """``value`` as the field's type (an int is a fine float); ConfigError naming the key otherwise."""
    tp, optional = _base_type(name)
    if value is None and optional:
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    article = "an" if tp.__name__[0] in "aeiou" else "a"
    raise ConfigError(f"{name!r} must be {article} {tp.__name__}, got {value!r}")


def _coerce(name: str, value, source: str):
    """A file or command-line value (strings from flags) converted to the field's type."""
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


def validate(cfg: TrainConfig) -> None:
    """Ranges and choices of every key (types are checked on construction); ConfigError naming the first bad key."""
    for name in POSITIVE:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name!r} must be >= 1, got {getattr(cfg, name)}")
    for name in NON_NEGATIVE:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name!r} must be >= 0, got {getattr(cfg, name)}")
    for name, (low, high, low_inclusive) in RANGES.items():
        value = getattr(cfg, name)
        if value is None:
            continue
        above_low = value >= low if low_inclusive else value > low
        if math.isnan(value) or not above_low or value > high or (math.isinf(value) and high != math.inf):
            span = f"{'[' if low_inclusive else '('}{low:g}, {high:g}{')' if high == math.inf else ']'}"
            raise ConfigError(f"{name!r} must be a finite number in {span}, got {value}")
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise ConfigError(f"{name!r} must be one of {', '.join(choices)}, got {getattr(cfg, name)!r}")
    if cfg.device != "auto":
        try:
            torch.device(cfg.device)
        except (RuntimeError, ValueError):
            raise ConfigError(
                f"'device' must be auto or a torch device such as cpu, cuda, cuda:1; got {cfg.device!r}"
            ) from None
    if cfg.lora_dropout >= 1:
        raise ConfigError(f"'lora_dropout' must be in [0, 1), got {cfg.lora_dropout}")
    targets = lora_targets(cfg)
    if cfg.lora_rank and not targets:
        raise ConfigError("'lora_target_modules' names no module: give comma-separated Linear module names")
    if "lm_head" in targets:
        raise ConfigError(
            "'lora_target_modules' must not name lm_head: the fused loss reads the head's weight directly, "
            "so it stays frozen and adapter-free"
        )
    if cfg.lora_rank and cfg.router_bias_update_rate > 0:
        raise ConfigError(
            "'router_bias_update_rate' > 0 with 'lora_rank' > 0: a LoRA checkpoint saves only the adapters, "
            "so the updated router biases would be lost on resume; use one of the two"
        )
    if cfg.judge_template is not None and not cfg.reward.startswith("judge-model:"):
        raise ConfigError(
            f"'judge_template' is set but 'reward' is {cfg.reward!r}: the template is for a judge-model:DIR reward"
        )
    if cfg.micro_batch_prompts > cfg.prompts_per_step:
        raise ConfigError(
            f"'micro_batch_prompts' ({cfg.micro_batch_prompts}) must be <= 'prompts_per_step' ({cfg.prompts_per_step})"
        )


def lora_targets(cfg: TrainConfig) -> list[str]:
    """The module names of ``lora_target_modules``, in order, blanks dropped."""
    return [name.strip() for name in cfg.lora_target_modules.split(",") if name.strip()]


def update(cfg: TrainConfig, values: dict, source: str) -> TrainConfig:
    """A copy of ``cfg`` with ``values`` applied; unknown keys, wrong types and bad values raise ConfigError."""
    new = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            close = difflib.get_close_matches(name, FIELDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(FIELDS)}"
            raise ConfigError(f"unknown config key {key!r} in {source}{hint}")
        new[name] = _coerce(name, value, source)
    for name in cfg.defaulted - new.keys():  # still unset: the new model's default
        new[name] = None
    return dataclasses.replace(cfg, **new)


def read_file(path: str | Path) -> dict:
    """The mapping in a YAML (.yaml/.yml) or TOML (.toml) config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
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
    return cfg


def to_dict(cfg: TrainConfig) -> dict:
    """Every key with its value, the model-dependent defaults resolved."""
    values = dataclasses.asdict(cfg)
    return {name: values[name] for name in FIELDS}


def write(cfg: TrainConfig, path: str | Path) -> None:
    import yaml

    with Path(path).open("w") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)


def resume_conflicts(saved: TrainConfig, cfg: TrainConfig) -> list[str]:
    """``key: saved -> new`` for each key that differs from the saved run and that a resumed run may not change."""
    return [
        f"{name}: {getattr(saved, name)!r} -> {getattr(cfg, name)!r}"
        for name, f in FIELDS.items()
        if not f.metadata["resume_safe"] and getattr(saved, name) != getattr(cfg, name)
    ]


def add_arguments(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One ``--dashed-name`` flag per config key but those in ``exclude`` (a command that sets them otherwise);
    unset flags stay out of the namespace (see :func:`from_arguments`)."""
    group = parser.add_argument_group("config keys (override the --config file)")
    for name, f in FIELDS.items():
        if name in exclude:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        group.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=argparse.SUPPRESS,
            metavar=_base_type(name)[0].__name__.upper(),
            help=f"{f.metadata['help']} (default: {default!r})",
        )


def from_arguments(args: argparse.Namespace) -> dict:
    """The config keys given as flags, as strings to pass to :func:`load` as ``overrides``."""
    return {name: value for name, value in vars(args).items() if name in FIELDS}

"""The trainer's configuration: sections of keys with their defaults, help, ranges and choices, validated once,
read from YAML/TOML and overridden by the ``grao train`` flags generated from them."""

from .fields import ConfigError
from .files import RenamedKeyWarning, load, read_file, update, write
from .flags import add_arguments, from_arguments
from .sections import SECTIONS
from .train_config import (
    FIELDS,
    FLAT,
    MODEL_DEFAULTS,
    TrainConfig,
    lora_targets,
    resume_conflicts,
    to_dict,
    to_nested,
    validate,
)

__all__ = [
    "ConfigError",
    "FIELDS",
    "FLAT",
    "MODEL_DEFAULTS",
    "RenamedKeyWarning",
    "SECTIONS",
    "TrainConfig",
    "add_arguments",
    "from_arguments",
    "load",
    "lora_targets",
    "read_file",
    "resume_conflicts",
    "to_dict",
    "to_nested",
    "update",
    "validate",
    "write",
]

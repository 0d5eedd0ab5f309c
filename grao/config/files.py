"""Config values from YAML/TOML files and flags onto a :class:`TrainConfig`, and a run's config.yaml written back.

A file holds sections (``grpo: {kl_beta: 0.04}``), dotted keys (``grpo.kl_beta: 0.04``) or the flat keys of the
config before sections (``grpo_kl_beta: 0.04``), in any mix; a flat key whose spelling changed still works and
warns once per file with the new spelling (:class:`RenamedKeyWarning`).
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from pathlib import Path

from .fields import ConfigError, coerce
from .sections import SECTIONS
from .train_config import FIELDS, FLAT, Key, TrainConfig, to_nested

PATHS = {k.path: k for k in FIELDS.values()}  # section.field, also for the keys spelled by their field alone
COMMAND_LINE = "command line"


class RenamedKeyWarning(FutureWarning):
    """A config key or flag given by its flat name from before the config had sections; it still works."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resolve(name: str, source: str) -> tuple[Key, bool]:
    """The key spelled ``name`` (its spelling, ``section.field`` or flat name) and whether that spelling is an old one."""
    name = name.replace("-", "_")
    k = FIELDS.get(name) or PATHS.get(name)
    if k is not None:
        return k, False
    if name in FLAT:
        return FLAT[name], True
    close = difflib.get_close_matches(name, [*FIELDS, *FLAT], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(FIELDS)}"
    raise ConfigError(f"unknown config key {name!r} in {source}{hint}")


def _entries(values: dict, source: str):
    """``(spelling given, value)`` for every key of ``values``, sections opened up."""
    for raw, value in values.items():
        name = str(raw).replace("-", "_")
        if name in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(
                    f"section {name!r} in {source} must be a mapping of its keys, got {value!r}; "
                    f"its keys: {', '.join(f.name for f in dataclasses.fields(SECTIONS[name]))}"
                )
            yield from ((f"{name}.{str(sub).replace('-', '_')}", v) for sub, v in value.items())
        else:
            yield name, value


def update(cfg: TrainConfig, values: dict, source: str) -> TrainConfig:
    """A copy of ``cfg`` with ``values`` applied; unknown keys, wrong types and bad values raise ConfigError."""
    new, renamed = {}, []
    for given, value in _entries(values, source):
        k, old = resolve(given, source)
        if k.name in new:
            raise ConfigError(f"config key {k.name!r} is given twice in {source}")
        if old:
            spell = _flag if source == COMMAND_LINE else str
            renamed.append(f"{spell(given)} -> {spell(k.name)}")
        new[k.name] = coerce(k.name, k.type, k.optional, value, source)
    if renamed:
        warnings.warn(
            f"{source}: renamed config keys, still accepted: {', '.join(renamed)}", RenamedKeyWarning, stacklevel=3
        )
    for flat in cfg.defaulted:  # still unset: the new model's default
        new.setdefault(FLAT[flat].name, None)
    return dataclasses.replace(cfg, **{FIELDS[name].flat: value for name, value in new.items()})


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
        cfg = update(cfg, overrides, COMMAND_LINE)
    return cfg


def write(cfg: TrainConfig, path: str | Path) -> None:
    """``cfg`` as a YAML file of sections (what :func:`load` reads back equal)."""
    import yaml

    with Path(path).open("w") as fh:
        yaml.safe_dump(to_nested(cfg), fh, sort_keys=False)

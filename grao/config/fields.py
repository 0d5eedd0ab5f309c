"""A config key's declaration and its value checks: :func:`key` declares a field with its help, range or choices and
whether ``--resume`` may change it, all as ``dataclasses.field`` metadata; :func:`coerce` turns a file or flag value
into the field's type. The sections (:mod:`.sections`) declare their keys with it; validation, the flags and the
files read the metadata, so a key is written down once."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import field

POSITIVE = (1, math.inf, True)  # the range of a count: >= 1
NON_NEGATIVE = (0, math.inf, True)


class ConfigError(ValueError):
    """A configuration file or value the trainer cannot use; the message says which key and why."""


def key(
    default,
    help: str,
    *,
    range: tuple | None = None,
    choices: tuple[str, ...] | None = None,
    resume_safe: bool = False,
    flat: str | None = None,
):
    """A config key: its default, the one-line help ``grao train --help`` shows, and its checks.

    ``range`` is ``(low, high, low_inclusive)`` (high inclusive unless infinite), ``choices`` the values a string
    may take. A key is ``resume_safe`` when a resumed run that changes it is still the same run: how long it goes
    on, how often it evaluates or saves, and how each step is computed (device, kernels, micro-batches), not what
    it computes. ``flat`` is the key's name before the config had sections, where it differs from the field's name
    (``grpo_kl_beta`` for ``grpo.kl_beta``): still accepted, with a note naming the new spelling.
    """
    meta = {"help": help, "range": range, "choices": choices, "resume_safe": resume_safe, "flat": flat}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


def default_of(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def base_type(owner: type, name: str) -> tuple[type, bool]:
    """(type, optional) of field ``name`` of dataclass ``owner``, from its annotation."""
    tp = typing.get_type_hints(owner)[name]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return next(a for a in typing.get_args(tp) if a is not type(None)), True
    return tp, False


def check_type(name: str, tp: type, optional: bool, value):
    """``value`` as type ``tp`` (an int is a fine float); ConfigError naming the key otherwise."""
    if value is None and optional:
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    article = "an" if tp.__name__[0] in "aeiou" else "a"
    raise ConfigError(f"{name!r} must be {article} {tp.__name__}, got {value!r}")


def check_value(name: str, meta: typing.Mapping, value) -> None:
    """The range or choices in a key's metadata; ConfigError naming the key and what it allows."""
    if value is None:
        return
    if meta["choices"] is not None and value not in meta["choices"]:
        raise ConfigError(f"{name!r} must be one of {', '.join(meta['choices'])}, got {value!r}")
    if meta["range"] is None:
        return
    low, high, low_inclusive = meta["range"]
    if isinstance(value, int) and high == math.inf and low_inclusive:  # a count
        if value < low:
            raise ConfigError(f"{name!r} must be >= {low}, got {value}")
        return
    above_low = value >= low if low_inclusive else value > low
    if math.isnan(value) or not above_low or value > high or (math.isinf(value) and high != math.inf):
        span = f"{'[' if low_inclusive else '('}{low:g}, {high:g}{')' if high == math.inf else ']'}"
        raise ConfigError(f"{name!r} must be a finite number in {span}, got {value}")


def coerce(name: str, tp: type, optional: bool, value, source: str):
    """A file or command-line value (strings from flags) converted to type ``tp``."""
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

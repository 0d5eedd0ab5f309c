"""``grao train``'s config flags, generated from the keys' metadata and grouped by section in ``--help``.

A key spelled by its field alone has two flags, ``--lr`` and ``--optimizer.lr``; a sectioned key has
``--grpo.kl-beta``, and its flat flag from before sections (``--grpo-kl-beta``) still works, hidden from ``--help``,
with a note naming the new one."""

from __future__ import annotations

import argparse
import math

from .fields import default_of
from .files import _flag, resolve
from .sections import SECTIONS
from .train_config import FIELDS, FLAT


def _allowed(meta) -> str:
    if meta["choices"] is not None:
        return f"; one of {', '.join(meta['choices'])}"
    if meta["range"] is None:
        return ""
    low, high, low_inclusive = meta["range"]
    if high == math.inf and low_inclusive:
        return f"; >= {low:g}"
    return f"; in {'[' if low_inclusive else '('}{low:g}, {high:g}{')' if high == math.inf else ']'}"


def add_arguments(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """The flags of every config key but those in ``exclude`` (a command that sets them otherwise), one group per
    section; unset flags stay out of the namespace (see :func:`from_arguments`)."""
    skip = {resolve(name, "exclude")[0].name for name in exclude}
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} (overrides the --config file)", cls.__doc__.split("\n")[0])
        for k in FIELDS.values():
            if k.section != section or k.name in skip:
                continue
            meta = k.spec.metadata
            flags = [_flag(k.name), _flag(k.path)] if k.name == k.field else [_flag(k.path)]
            group.add_argument(
                *flags,
                dest=k.name,
                default=argparse.SUPPRESS,
                metavar=k.type.__name__.upper(),
                help=f"{meta['help']} (default: {default_of(k.spec)!r}{_allowed(meta)})",
            )
            if k.flat != k.name:  # the flat flag from before sections
                group.add_argument(_flag(k.flat), dest=k.flat, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def from_arguments(args: argparse.Namespace) -> dict:
    """The config keys given as flags, as strings to pass to :func:`load` as ``overrides``."""
    return {name: value for name, value in vars(args).items() if name in FIELDS or name in FLAT}

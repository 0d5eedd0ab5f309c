"""Writing results: an output path is checked before the long work that produces it, and an error while writing
one is a single line naming the path and the operating system's reason (a full disk, a read-only directory)."""

from __future__ import annotations

import os
from pathlib import Path

from ..config import ConfigError


class OutputError(RuntimeError):
    """A file of results could not be written; the message names it and why."""


def describe(path: str | Path, exc: OSError) -> str:
    """``could not write PATH: REASON`` for an OSError raised while writing ``path``."""
    reason = exc.strerror or str(exc)
    return f"could not write {path}: {reason}"


def check_file_writable(path: str | Path, flag: str) -> None:
    """ConfigError unless ``path`` (given as ``flag``) can be written: an existing writable file, or a new name in an
    existing writable directory. Nothing is created."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ConfigError(f"{flag} {str(path)!r} is a directory; give a file name")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise ConfigError(f"{flag} {str(path)!r} is not writable (permission denied)")
        return
    if not parent.is_dir():
        raise ConfigError(f"{flag} {str(path)!r}: the directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {str(path)!r}: the directory {str(parent)!r} is not writable (permission denied)")

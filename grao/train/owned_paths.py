"""What the project may delete: relative names inside a directory it owns, and the ledger of what a run wrote.

Run directories get shared (a colleague's run, a downloaded checkpoint), so every name read from one (a checkpoint's
``manifest.json``, the run's ledger) is checked before anything is deleted: a relative path without ``..``, whose
parent resolves inside the directory (no symlink out of it). A name that is not is an :class:`UnsafePath` and nothing
is deleted for it.

The ledger (``.grao-written.json`` in the run directory) lists the top-level names a run created there
(``config.yaml``, ``metrics.jsonl``, ``plot.png``, ``initial``, ``checkpoints``), recorded when it created them, so
``--overwrite`` deletes what runs wrote and never a file of the user's that has the same name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

LEDGER = ".grao-written.json"


class UnsafePath(ValueError):
    """A name read from a run directory that points outside it; the message names the file it came from."""


def inside(root: Path, name: str, source: str | Path) -> Path:
    """``root / name``, or UnsafePath unless ``name`` is a relative path that stays inside ``root``.

    ``source`` (the file that listed the name) is named in the error.
    """
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name:
        raise UnsafePath(f"{source} lists {name!r}, which is not a file name; not deleting anything it lists")
    pure = PurePosixPath(name)
    if pure.is_absolute() or not pure.parts or ".." in pure.parts:
        raise UnsafePath(
            f"{source} lists {name!r}, which is not a relative path inside {root}; not deleting anything it lists"
        )
    path = root / name
    real_root = root.resolve()
    parent = path.parent.resolve()
    if parent != real_root and real_root not in parent.parents:
        raise UnsafePath(f"{source} lists {name!r}, which leads out of {root} through a symlink; not deleting it")
    return path


def unlink(root: Path, name: str, source: str | Path) -> None:
    """Delete the file (or symlink, never its target) ``name`` inside ``root``, after :func:`inside`'s check."""
    inside(root, name, source).unlink(missing_ok=True)


def remove_empty_dirs(root: Path) -> bool:
    """Remove the empty directories under ``root`` and ``root`` itself if then empty, never following a symlink;
    True when ``root`` is gone."""
    if root.is_symlink() or not root.is_dir():
        return False
    for dirpath, dirnames, _files in os.walk(root, topdown=False, followlinks=False):
        for d in dirnames:
            sub = Path(dirpath) / d
            if not sub.is_symlink() and not any(sub.iterdir()):
                sub.rmdir()
    if any(root.iterdir()):
        return False
    root.rmdir()
    return True


def recorded(run_dir: Path) -> list[str]:
    """The names the ledger of ``run_dir`` lists (none without a ledger), each checked by :func:`inside`."""
    path = run_dir / LEDGER
    if not path.is_file():
        return []
    try:
        names = json.loads(path.read_text())["written"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UnsafePath(f"{path} is not a ledger a run wrote (not JSON with a 'written' list)") from None
    if not isinstance(names, list):
        raise UnsafePath(f"{path} is not a ledger a run wrote ('written' is not a list)")
    for name in names:
        inside(run_dir, name, path)
    return names


def record(run_dir: Path, *names: str) -> None:
    """Add ``names`` (created by this run in ``run_dir``) to its ledger; written whole (a rename), never half."""
    have = recorded(run_dir)
    new = [n for n in names if n not in have]
    if not new:
        return
    _write(run_dir, have + new)


def forget(run_dir: Path, names: list[str]) -> None:
    """Drop ``names`` from the ledger (after deleting them)."""
    have = recorded(run_dir)
    _write(run_dir, [n for n in have if n not in names])


def _write(run_dir: Path, names: list[str]) -> None:
    tmp = run_dir / (LEDGER + ".tmp")
    tmp.unlink(missing_ok=True)  # a fresh file, never one a symlink there points to
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps({"written": names}, indent=1))
    tmp.replace(run_dir / LEDGER)

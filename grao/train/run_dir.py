"""The run directory: what a run writes into ``output_dir`` and what a second run into the same directory may do.

A run writes ``config.yaml``, ``metrics.jsonl``, ``plot.png``, ``initial/`` (the demo's starting model) and
``checkpoints/step-NNNNNN/`` (see :mod:`grao.train.checkpoint`). A new run refuses a directory that is not empty;
``--resume`` continues the run there and ``--overwrite`` deletes those files (and only those) first.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..config import ConfigError
from . import checkpoint

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
PLOT = "plot.png"
INITIAL = "initial"


def check_writable(run_dir: Path) -> None:
    """ConfigError unless ``run_dir`` is, or can be created as, a writable directory."""
    path = run_dir
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir():
        raise ConfigError(f"'output_dir' {str(run_dir)!r} cannot be created: {str(path)!r} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"'output_dir' {str(run_dir)!r} is not writable ({str(path)!r} denies writing)")


def check_fresh_start(run_dir: Path, overwrite: bool) -> None:
    """ConfigError unless a new run may start in ``run_dir``: empty or absent, or ``overwrite`` and nothing foreign
    inside the directories the trainer creates whole (``initial/``, ``checkpoints/step-*``)."""
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    if not overwrite:
        entries = sorted(p.name for p in run_dir.iterdir())
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ConfigError(
            f"'output_dir' {str(run_dir)!r} is not empty ({shown}): continue that run with --resume, "
            "or start over with --overwrite (deletes only the files a run writes there)"
        )
    for directory in _whole_dirs(run_dir):
        foreign = checkpoint.foreign_files(directory)
        if foreign:
            raise ConfigError(
                f"--overwrite: {directory} holds files the trainer did not write ({', '.join(foreign[:5])}); "
                "move them away first"
            )


def clear(run_dir: Path) -> None:
    """Delete what an earlier run wrote in ``run_dir``; anything else stays."""
    for name in (CONFIG, METRICS, PLOT):
        (run_dir / name).unlink(missing_ok=True)
    for directory in _whole_dirs(run_dir):
        checkpoint.remove_written(directory)
    # an interrupted save's leftovers: directories by these names are only ever the trainer's
    leftovers = [p for p in (run_dir / checkpoint.CHECKPOINTS).glob("*.tmp") if checkpoint.STEP_DIR.fullmatch(p.stem)]
    for tmp in [*leftovers, run_dir / (INITIAL + ".tmp")]:
        if tmp.is_dir():
            shutil.rmtree(tmp)
    ckpts = run_dir / checkpoint.CHECKPOINTS
    if ckpts.is_dir() and not any(ckpts.iterdir()):
        ckpts.rmdir()


def _whole_dirs(run_dir: Path) -> list[Path]:
    initial = run_dir / INITIAL
    return [*([initial] if initial.is_dir() else []), *checkpoint.step_dirs(run_dir)]


def read_metrics(path: Path) -> tuple[list[dict], str | None]:
    """The lines of ``metrics.jsonl``, and a note when its last line was cut short (a crash mid-write) and dropped.

    A bad line anywhere else is a ConfigError naming it: that file was not written by an interrupted run.
    """
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    records, note = [], None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if lineno == len(lines):  # no newline after it: the write was cut short
                note = f"dropped the incomplete last line of {path} ({len(line)} characters)"
                continue
            raise ConfigError(
                f"{path}:{lineno}: not a JSON line; this is not a metrics file the trainer wrote"
            ) from None
    return records, note


def cut_metrics(run_dir: Path, step: int) -> str | None:
    """Keep the lines of steps <= ``step`` (what the run logged up to its checkpoint); a note on a dropped line."""
    path = run_dir / METRICS
    if not path.is_file():
        return None
    records, note = read_metrics(path)
    kept = [rec for rec in records if rec.get("step", 0) <= step]
    path.write_text("".join(json.dumps(rec) + "\n" for rec in kept))
    return note


def append_metrics(run_dir: Path, line: dict) -> None:
    with (run_dir / METRICS).open("a") as fh:
        fh.write(json.dumps(line) + "\n")

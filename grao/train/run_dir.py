"""The run directory: what a run writes into ``output_dir`` and what a second run into the same directory may do.

A run writes ``config.yaml``, ``metrics.jsonl``, ``plot.png``, ``initial/`` (the starting model of the demo or of an ``init_from`` run) and
``checkpoints/step-NNNNNN/`` (see :mod:`grao.train.checkpoint`), and records each of these names in its ledger
(:mod:`grao.train.owned_paths`) when it creates it. A new run refuses a directory that is not empty; ``--resume``
continues the run there and ``--overwrite`` deletes first what the ledger lists (inside ``initial/`` and the
checkpoints, only the files their manifests list), refusing when a file by one of these names is not in the ledger.
The lock file and the ledger (:data:`INTERNAL`) do not make a directory non-empty.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .. import config
from ..config import ConfigError
from ..log import say
from . import checkpoint, owned_paths
from .run_lock import LOCK

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
PLOT = "plot.png"
INITIAL = "initial"
WRITTEN = (CONFIG, METRICS, PLOT, INITIAL, checkpoint.CHECKPOINTS)  # what a run creates in its directory
INTERNAL = (LOCK, owned_paths.LEDGER)


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
    """ConfigError unless a new run may start in ``run_dir``: empty or absent, or ``overwrite`` and every name a run
    writes that is there recorded in the ledger, with nothing foreign inside the directories the trainer creates
    whole (``initial/``, ``checkpoints/step-*``)."""
    check_no_symlinks(run_dir)
    entries = sorted(p.name for p in run_dir.iterdir() if p.name not in INTERNAL) if run_dir.is_dir() else []
    if not entries:
        return
    if not overwrite:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ConfigError(
            f"'output_dir' {str(run_dir)!r} is not empty ({shown}): continue that run with --resume, "
            "or start over with --overwrite (deletes only the files a run writes there)"
        )
    recorded = _recorded(run_dir)
    unowned = [name for name in WRITTEN if name in entries and name not in recorded]
    if unowned:
        raise ConfigError(
            f"--overwrite: {', '.join(unowned)} in {run_dir} {'was' if len(unowned) == 1 else 'were'} not written by "
            f"a run (not in its ledger {owned_paths.LEDGER}), and a new run would write over "
            f"{'it' if len(unowned) == 1 else 'them'}; move {'it' if len(unowned) == 1 else 'them'} away first"
        )
    for directory in _whole_dirs(run_dir):
        try:
            foreign = checkpoint.foreign_files(directory)
        except checkpoint.CheckpointError as exc:
            raise ConfigError(f"--overwrite: {exc}") from None
        if foreign:
            raise ConfigError(
                f"--overwrite: {directory} holds files the trainer did not write ({', '.join(foreign[:5])}); "
                "move them away first"
            )


def check_no_symlinks(run_dir: Path) -> None:
    """ConfigError when a name a run writes or reads in ``run_dir`` is a symlink: writing through it would change
    a file outside the directory."""
    links = [name for name in (*WRITTEN, *INTERNAL) if (run_dir / name).is_symlink()]
    if links:
        raise ConfigError(f"{run_dir}: {', '.join(links)} is a symlink; a run directory's own files must be plain")


def _recorded(run_dir: Path) -> list[str]:
    try:
        return owned_paths.recorded(run_dir)
    except owned_paths.UnsafePath as exc:
        raise ConfigError(str(exc)) from None


def record(run_dir: Path, name: str) -> None:
    """Note in the ledger that this run created ``name`` in ``run_dir``."""
    owned_paths.record(run_dir, name)


def clear(run_dir: Path) -> None:
    """Delete what earlier runs wrote in ``run_dir`` (what its ledger lists); anything else stays."""
    names = _recorded(run_dir)
    for name in names:
        path = owned_paths.inside(run_dir, name, run_dir / owned_paths.LEDGER)
        if name == checkpoint.CHECKPOINTS:
            _clear_checkpoints(path)
        elif path.is_dir() and not path.is_symlink():  # initial/: the files its manifest lists
            checkpoint.remove_written(path)
            _remove_tmp(owned_paths.inside(run_dir, name + ".tmp", run_dir / owned_paths.LEDGER))
        else:
            path.unlink(missing_ok=True)
    owned_paths.forget(run_dir, names)


def _clear_checkpoints(ckpts: Path) -> None:
    if ckpts.is_symlink() or not ckpts.is_dir():
        return
    for directory in checkpoint.step_dirs(ckpts.parent):
        checkpoint.remove_written(directory)
    # an interrupted save's leftovers: directories by these names are only ever the trainer's
    for tmp in ckpts.glob("*.tmp"):
        if checkpoint.STEP_DIR.fullmatch(tmp.stem):
            _remove_tmp(tmp)
    if not any(ckpts.iterdir()):
        ckpts.rmdir()


def _remove_tmp(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp)


def _whole_dirs(run_dir: Path) -> list[Path]:
    initial = run_dir / INITIAL
    return [*([initial] if initial.is_dir() else []), *checkpoint.step_dirs(run_dir)]


def start(
    run_dir: Path, cfg, *, overwrite: bool, resumed_at: int | None, initial=None, tokenizer=None, weights=None
) -> None:
    """Rank 0's start of a run in ``run_dir``. A new run (``resumed_at`` None) writes its config (after deleting an
    earlier run's files with ``overwrite``) and ``initial``, when given, into ``initial/`` with ``tokenizer`` (the
    demo's random starting model or an init_from run's starting weights, what ``grao eval`` measures NAG against; ``weights``: its gathered state dict when
    sharded). A run resumed at step ``resumed_at`` drops the lines logged after its checkpoint and records the
    (resume-safe) settings it continues with."""
    if resumed_at is None:
        if overwrite:
            clear(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        record(run_dir, CONFIG)
        config.write(cfg, run_dir / CONFIG)
        if initial is not None:
            record(run_dir, INITIAL)
            checkpoint.save_pretrained(run_dir / INITIAL, initial, tokenizer, state_dict=weights)
    else:
        note = cut_metrics(run_dir, resumed_at)
        if note:
            say(f"warning: {note}")
        config.write(cfg, run_dir / CONFIG)


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
    path = run_dir / METRICS
    if not path.exists():
        record(run_dir, METRICS)
    with path.open("a") as fh:
        fh.write(json.dumps(line) + "\n")

"""Checkpoints: ``checkpoints/step-NNNNNN/`` holds the model and tokenizer (``save_pretrained``), the trainer state
(optimizer, scheduler, RNG, step: ``trainer_state.pt``) and ``manifest.json``, the size of every file in it. A
sharded run (:mod:`grao.train.distributed`) keeps its model and optimizer shards in ``distributed/`` (written by
``torch.distributed.checkpoint``, readable by any number of processes) instead of the optimizer in the trainer state,
next to the consolidated model that ``grao eval`` and ``from_pretrained`` read.

A directory is written as ``<name>.tmp`` and renamed when complete, so a crash or a full disk never leaves a
half-written directory under the final name; the manifest lets a resume notice a file truncated afterwards and
lets ``--overwrite`` delete exactly the files the trainer wrote.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from . import owned_paths, safe_state

STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"step-\d{6}")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the directory or file."""


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:06d}"


def manifest_files(directory: Path) -> dict[str, int] | None:
    """{relative path: size} recorded when ``directory`` was written; None without a readable manifest.

    CheckpointError when it lists a path outside ``directory`` (absolute, ``..``, through a symlink): no trainer
    wrote that manifest, and nothing it lists may be deleted.
    """
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(files, dict):
        return None
    for name in files:
        try:
            owned_paths.inside(directory, name, directory / MANIFEST)
        except owned_paths.UnsafePath as exc:
            raise CheckpointError(str(exc)) from None
    return files


def tmp_dir(directory: str | Path) -> Path:
    """Where ``directory`` is written before its rename."""
    directory = Path(directory)
    return directory.with_name(directory.name + ".tmp")


def save_pretrained(
    directory: str | Path, model, tokenizer, state: dict | None = None, *, state_dict=None, before=None
) -> Path:
    """Model, tokenizer and optionally the trainer ``state`` into ``directory``, complete or not at all.

    ``state_dict`` replaces the model's own (a sharded model's gathered weights);
    ``before(tmp)`` writes more files into the fresh ``tmp`` first (a sharded
    run's shards). Any failure (a full disk, a permission error) removes the partial ``.tmp``
    and raises CheckpointError; what was at ``directory`` before is untouched.
    """
    directory = Path(directory)
    tmp = tmp_dir(directory)
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed save's leftover; the .tmp name is only ever ours
        if before is not None:
            before(tmp)
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        if state is not None:
            safe_state.save(state, tmp / STATE_FILE)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
        if directory.exists() and not remove_written(directory):
            raise CheckpointError(f"{directory} holds files the trainer did not write; not replacing it")
        tmp.rename(directory)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, CheckpointError):
            raise
        reason = f"{exc.strerror} ({exc.filename})" if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CheckpointError(f"could not write {directory}: {reason}") from exc
    return directory


def remove_written(directory: Path) -> bool:
    """Delete the files ``directory``'s manifest lists (and the manifest); True when the directory is gone.

    Files the trainer did not write stay, and so does the directory holding them. Each name is checked to be a
    relative path inside ``directory`` before anything is deleted (CheckpointError otherwise), and a symlinked
    ``directory`` is left alone.
    """
    if directory.is_symlink():
        return False
    files = manifest_files(directory)
    for name in files or ():
        owned_paths.unlink(directory, name, directory / MANIFEST)
    if files is not None:
        (directory / MANIFEST).unlink(missing_ok=True)
    return owned_paths.remove_empty_dirs(directory)


def foreign_files(directory: Path) -> list[str]:
    """Files in ``directory`` that its manifest does not list (all of them without a manifest)."""
    listed = set(manifest_files(directory) or ()) | {MANIFEST}
    return sorted(
        str(p.relative_to(directory))
        for p in directory.rglob("*")
        if p.is_file() and str(p.relative_to(directory)) not in listed
    )


def step_dirs(run_dir: str | Path) -> list[Path]:
    """``checkpoints/step-NNNNNN`` directories, oldest first (complete or not)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    if root.is_symlink():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and STEP_DIR.fullmatch(p.name))


def latest(run_dir: str | Path) -> Path | None:
    """The newest checkpoint (one with a trainer state: a save in progress is still ``.tmp``), or None."""
    done = [p for p in step_dirs(run_dir) if (p / STATE_FILE).is_file()]
    return done[-1] if done else None


def save(run_dir: str | Path, step: int, model, tokenizer, state: dict, keep: int, **options) -> Path:
    """``checkpoints/step-NNNNNN`` for ``step``, then :func:`rotate`; ``options`` as :func:`save_pretrained`'s."""
    final = save_pretrained(step_dir(run_dir, step), model, tokenizer, state, **options)
    rotate(run_dir, final, keep)
    return final


def rotate(run_dir: str | Path, newest: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` intact checkpoints, once ``newest`` (just saved) is verified intact.

    Only intact checkpoints are counted or deleted: a damaged one never takes the place of a good one, and the last
    intact one is never deleted. CheckpointError when ``newest`` is not intact (nothing is deleted then).
    """
    reason = problem(newest)
    if reason is not None:
        raise CheckpointError(f"the checkpoint just written is not intact ({reason}); no older checkpoint deleted")
    intact = [p for p in step_dirs(run_dir) if problem(p) is None]
    for old in intact[: -max(keep, 1)]:
        remove_written(old)


def problem(directory: Path) -> str | None:
    """:func:`verify`'s reason, also for a manifest that lists paths outside ``directory``."""
    try:
        return verify(directory)
    except CheckpointError as exc:
        return str(exc)


def verify(directory: Path) -> str | None:
    """Why ``directory`` is not an intact checkpoint (a missing or truncated file), or None when it is.

    A checkpoint without a manifest (written before manifests existed) is
    checked only by loading it (:func:`load`).
    """
    if not (directory / STATE_FILE).is_file():
        return f"{directory} has no {STATE_FILE}"
    return files_problem(directory)


def files_problem(directory: Path) -> str | None:
    """Why the files of ``directory`` differ from its manifest (a missing or truncated file), or None when they
    match: a checkpoint's or ``initial/``'s (which holds weights only, no trainer state)."""
    files = manifest_files(directory) or {}
    for name, size in files.items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} were written (truncated or altered)"
    return None


def load(directory: Path, load_model, load_tokenizer) -> tuple:
    """(model, tokenizer, state) of an intact checkpoint; CheckpointError naming the file that is not."""
    reason = verify(directory)
    if reason is not None:
        raise CheckpointError(reason)
    try:
        state = safe_state.load(directory / STATE_FILE)  # plain data only: loading runs no code from the file
    except Exception as exc:  # a damaged pickle/zip raises anything from EOFError to RuntimeError
        raise CheckpointError(f"{directory / STATE_FILE} cannot be read ({type(exc).__name__}: {exc})") from exc
    try:
        model, tokenizer = load_model(directory), load_tokenizer(directory)
    except Exception as exc:
        raise CheckpointError(f"the model in {directory} cannot be loaded ({type(exc).__name__}: {exc})") from exc
    return model, tokenizer, state


def latest_intact(run_dir: str | Path) -> tuple[Path | None, list[str]]:
    """(the newest checkpoint that :func:`verify` finds intact or None, why each newer one was skipped)."""
    skipped = []
    for directory in reversed(step_dirs(run_dir)):
        reason = problem(directory)
        if reason is None:
            return directory, skipped
        skipped.append(reason)
    return None, skipped


def weights_source(path: str | Path) -> tuple[Path, list[str]]:
    """(the checkpoint whose weights ``path`` names, why each newer one was skipped): ``path`` itself when it is a
    checkpoint directory (one with a trainer state), else the newest intact checkpoint of the run directory ``path``.
    CheckpointError naming the path when it is neither, or when the checkpoint is not intact."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        reason = problem(path)
        if reason is not None:
            raise CheckpointError(f"{path} is not an intact checkpoint: {reason}")
        return path, []
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory (give a run directory or one of its checkpoints)")
    found, skipped = latest_intact(path)
    if found is None:
        detail = f" ({'; '.join(skipped)})" if skipped else ""
        raise CheckpointError(
            f"{path} is neither a checkpoint directory nor a run directory with an intact checkpoint in "
            f"{CHECKPOINTS}/{detail}"
        )
    return found, skipped


def load_latest(run_dir: str | Path, load_model, load_tokenizer) -> tuple[Path, tuple, list[str]]:
    """(checkpoint, (model, tokenizer, state), why each newer one was skipped) for the newest intact checkpoint."""
    skipped = []
    for directory in reversed(step_dirs(run_dir)):
        try:
            return directory, load(directory, load_model, load_tokenizer), skipped
        except CheckpointError as exc:
            skipped.append(str(exc))
    detail = f": {'; '.join(skipped)}" if skipped else ""
    raise CheckpointError(f"--resume: no intact checkpoint in {Path(run_dir) / CHECKPOINTS}{detail}")

"""One process at a time in a run directory: an advisory lock (``fcntl.flock``) on ``<output_dir>/.grao.lock``.

``grao train`` holds it from before it checks the directory until it exits, so a second ``grao train`` (new,
``--resume`` or ``--overwrite``) into the same directory stops with a one-line error naming the holder's pid instead
of interleaving its metrics and checkpoints with the first's. The kernel releases a flock when its process dies
(SIGKILL included), so a lock file left behind by a dead run is taken over, with a message naming the dead pid.
The lock file holds the holder's pid; it is opened without following a symlink and removed on release.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from ..config import ConfigError

LOCK = ".grao.lock"


class RunDirBusy(ConfigError):
    """Another process holds the run directory's lock."""


@contextlib.contextmanager
def hold(run_dir: str | Path, say=None):
    """Hold the lock of ``run_dir`` (created if absent; it and the parents created for it are removed again on release
    if the run left them empty)."""
    run_dir = Path(run_dir)
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # innermost first
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    fd = _acquire(path, run_dir)
    try:
        left = os.read(fd, 64).decode(errors="replace").strip()
        if left and say is not None:
            say(
                f"warning: taking over {path}: the run that held it (pid {left}) is no longer running "
                "(killed or crashed); its last checkpoint is intact"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # before the unlock: a process that opened this file now sees it is stale and retries
        os.close(fd)
        for directory in created:  # only while empty: a run that stopped before writing anything leaves nothing
            try:
                directory.rmdir()
            except OSError:
                break


def _acquire(path: Path, run_dir: Path) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ConfigError(f"{path} is a symlink; a run directory's lock file must be a plain file") from None
            raise ConfigError(f"cannot create the lock file {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirBusy(
                f"'output_dir' {str(run_dir)!r} is in use by another grao train (pid {holder}); wait for it to "
                "finish or stop it, or use another output_dir"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder released and removed this file between our open and flock: try the new one

"""Running the runs of ``grao compare``: what each run directory holds, and each unfinished run trained in a child
process (``python -m grao.tools.compare_run``) that SIGINT/SIGTERM reach once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .. import config
from ..config import ConfigError, TrainConfig
from ..train import checkpoint, run_dir
from . import child_process
from .compare_plan import Run

RECORD = "compare-run.json"  # in each run directory: the peak memory and time of each process that trained it


class CompareStopped(Exception):
    """A signal stopped the compare; the running child saved a checkpoint of its run."""

    def __init__(self, signum: int, where: str):
        super().__init__(f"stopped by {signal.Signals(signum).name} during {where}")
        self.signum = signum


class RunFailed(Exception):
    """A child ``grao train`` exited with an error (its own message is on stderr above)."""

    def __init__(self, rc: int, where: str):
        super().__init__(f"the run {where} failed (grao train exit status {rc}; its error is above)")
        self.rc = rc


def run_state(run: Run) -> str:
    """``new`` (nothing there), ``done``, ``resume`` (a checkpoint before the last step) or ``restart`` (stopped
    before its first checkpoint); ConfigError when the directory holds a run with other settings."""
    d = run.dir
    if not d.is_dir() or not any(p.name != RECORD for p in d.iterdir()):
        return "new"
    saved_path = d / run_dir.CONFIG
    if not saved_path.is_file():
        raise ConfigError(f"{d} is not empty but has no {run_dir.CONFIG}: not a run to continue; move it away")
    saved = config.load(saved_path)
    conflicts = config.resume_conflicts(saved, run.cfg)
    if saved.steps != run.cfg.steps:
        conflicts.append(f"steps: {saved.steps!r} -> {run.cfg.steps!r}")
    if conflicts:
        raise ConfigError(
            f"{d} holds a run with other settings ({'; '.join(conflicts)}); "
            "compare into another --output-dir, or delete that run to redo it"
        )
    done = checkpoint.latest(d)
    if done is None:
        return "restart"
    return "done" if int(done.name.split("-")[1]) >= run.cfg.steps else "resume"


def train_flags(cfg: TrainConfig) -> list[str]:
    """``grao train`` flags that set every key of ``cfg``."""
    flags = []
    for name, value in config.to_dict(cfg).items():
        if value is None:
            text = "none"
        elif isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, dict):
            text = json.dumps(value)
        else:
            text = repr(value) if isinstance(value, float) else str(value)
        flags.append(f"--{name.replace('_', '-')}={text}")
    return flags


@contextlib.contextmanager
def forward_signals(proc: subprocess.Popen, caught: list[int]):
    """SIGINT/SIGTERM to this process go to the child once (it checkpoints and exits); the child runs in its own
    session, so a Ctrl-C from the terminal does not reach it twice (the second signal would abort it unsaved)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum, frame):
        if caught:  # a second signal: stop the child without a checkpoint, as grao train does
            proc.kill()
            return
        caught.append(signum)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def child_env() -> dict[str, str]:
    """This process's environment with the directory holding this grao package first on ``PYTHONPATH``, so the
    child trains with this checkout's grao, also when another one is installed."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # grao/tools/compare_runner.py -> the directory holding grao
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def train_run(run: Run, state: str) -> float:
    """Train ``run`` to its last step in a fresh child process; the seconds it took (process start to exit)."""
    argv = train_flags(run.cfg)
    if state == "resume":
        argv.append("--resume")
    elif state == "restart":
        (run.dir / RECORD).unlink(missing_ok=True)
        argv.append("--overwrite")
    caught: list[int] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "grao.tools.compare_run", *argv],
        env=child_env(),
        start_new_session=True,
        preexec_fn=child_process.die_with_parent(),  # a SIGKILLed compare's child stops too
    )
    with forward_signals(proc, caught):
        rc = proc.wait()
    if caught:
        raise CompareStopped(caught[0], run.name)
    if rc != 0:
        raise RunFailed(rc, run.name)
    return time.perf_counter() - t0

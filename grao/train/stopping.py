"""Stopping a run early: SIGINT (Ctrl-C) and SIGTERM (``kill``, ``timeout``, schedulers) ask the trainer to finish
its step, save a checkpoint and return; a second signal aborts without one."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable

from ..log import say


@contextlib.contextmanager
def on_signals(stop: Callable[[str], None]):
    """While inside, SIGINT and SIGTERM call ``stop(name)`` (once: the handler is re-armed to the default, so the
    same signal again aborts). Outside the main thread, where signal handlers cannot be set, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame) -> None:
        # Re-armed before the message: a second signal sent on seeing it must abort, not reach this handler.
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        name = signal.Signals(signum).name
        stop(name)
        say(f"{name} received; finishing this step and saving a checkpoint ({name} again aborts without one)")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

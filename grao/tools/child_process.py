"""Child processes that end with their parent: a ``grao compare`` killed by SIGKILL (which it cannot forward) must
not leave its ``grao train`` child training on, detached, into the directory the next compare resumes.

On Linux the child asks the kernel for SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``), so it finishes
its step, saves a checkpoint and exits as after any SIGTERM; elsewhere it has no such request and the parent's own
signal handlers (which forward SIGINT/SIGTERM) are what stop it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent():
    """A ``preexec_fn`` for :class:`subprocess.Popen` (None off Linux): SIGTERM to the child when this process dies."""
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()

    def request() -> None:  # runs in the child between fork and exec
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            return
        if os.getppid() != parent:  # the parent died before the request: nothing would signal us
            os.kill(os.getpid(), signal.SIGTERM)

    return request

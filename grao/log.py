"""Status lines on stderr (``grao: ...``), from one process: under torchrun only rank 0 prints them."""

from __future__ import annotations

import os
import sys


def say(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"grao: {message}", file=sys.stderr, flush=True)

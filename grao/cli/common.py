"""What the commands share: their exit statuses and the refusal of a run directory that would turn on remote code."""

from __future__ import annotations

from pathlib import Path

from .. import config as config_mod

EXIT_CONFIG = 2  # a setting, data file or model the run cannot use (as argparse's usage errors)
EXIT_FAILED = 1  # the run failed part-way (reward, disk); what it had done is checkpointed


def refuse_code_from_run(runs_code: bool, saved: Path, flag: str) -> None:
    """ConfigError when a run directory's own config.yaml, not the command, turns on trust_remote_code: a received
    run must not make loading it run the Python code of a model directory."""
    if runs_code:
        raise config_mod.ConfigError(
            f"{saved} sets trust_remote_code: true, which runs the Python code its model directory ships; "
            f"a run directory cannot turn that on by itself: give {flag} if you trust that code"
        )

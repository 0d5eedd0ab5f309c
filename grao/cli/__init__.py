"""``grao train``, ``grao eval``, ``grao compare`` and ``grao plan``.

``grao train`` with no arguments runs the embedded demo (tiny MoE, synthetic
task, writes runs/demo/). Any config key can be given as a flag
(``--prompts-per-step 32``) and overrides the ``--config`` file (YAML or TOML).
"""

from __future__ import annotations

import os
import signal
import sys

# No hub downloads, ever: every model, tokenizer and reward model is a local directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from .. import config as config_mod  # noqa: E402
from ..log import say  # noqa: E402
from . import arguments, compare, evaluate, plan, train  # noqa: E402
from .arguments import COMPARE_SETS  # noqa: E402
from .common import EXIT_CONFIG, EXIT_FAILED  # noqa: E402

__all__ = ["COMPARE_SETS", "EXIT_CONFIG", "EXIT_FAILED", "main"]


def main(argv: list[str] | None = None) -> int:
    """The ``grao`` command (``argv``: its arguments, default ``sys.argv[1:]``, none: the demo); its exit status, with
    each error the commands raise as a one-line message."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["train"]
    args = arguments.parser().parse_args(argv)
    if args.command == "train" and args.nproc != 1:
        if args.nproc < 1:
            say(f"error: --nproc must be >= 1, got {args.nproc}")
            return EXIT_CONFIG
        if "WORLD_SIZE" in os.environ:
            say("error: --nproc under torchrun: torchrun already started the processes")
            return EXIT_CONFIG
        return train.launch(args.nproc, arguments.without_nproc(argv))
    args.argv = argv[1:]
    from transformers.utils import logging as hf_logging

    from ..data import DataError
    from ..eval.rewards import RewardError
    from ..models import ModelError
    from ..tools.plan import PlanError
    from ..train.checkpoint import CheckpointError
    from ..train.output_errors import OutputError

    hf_logging.disable_progress_bar()  # our own bar is the one to watch; save_pretrained's would interleave with it

    try:
        commands = {"train": train.run, "eval": evaluate.run, "compare": compare.run, "plan": plan.run}
        return commands[args.command](args)
    except (config_mod.ConfigError, DataError, ModelError, PlanError) as exc:
        say(f"error: {exc}")
        return EXIT_CONFIG
    except (RewardError, CheckpointError, OutputError) as exc:
        say(f"error: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(file=sys.stderr)
        say("aborted")
        return 128 + signal.SIGINT

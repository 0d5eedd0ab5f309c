"""``grao compare``: methods and pipelines x seeds (x learning rates, x a beta/lambda grid), each a ``grao train``
run, and their report."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from .. import config as config_mod
from ..log import say


def run(args) -> int:
    """``grao compare`` with the parsed ``args``: trains the unfinished runs, then writes the report; its exit status."""
    from ..tools import compare

    overrides = config_mod.from_arguments(args)
    # the shared settings: the defaults without a progress bar per run (compare prints one line per run)
    base = config_mod.load(args.config, overrides, base=config_mod.TrainConfig(progress=False))
    methods = compare.parse_methods(args.methods)
    betas, lams = compare.parse_values(args.betas, "--beta"), compare.parse_values(args.lams, "--lam")
    lrs = compare.parse_values(args.lrs, "--lr")
    runs = compare.plan(base, methods, args.seeds, args.compare_dir, betas, lams, lrs, args.pipeline_split)
    Path(args.compare_dir).mkdir(parents=True, exist_ok=True)
    command = shlex.join(["grao", "compare", *args.argv])
    try:
        summary = compare.compare(runs, args.compare_dir, command, say=say)
    except compare.CompareStopped as exc:
        say(f"{exc}; that run saved a checkpoint. Continue with the same command: {command}")
        return 128 + exc.signum
    except compare.RunFailed as exc:
        say(f"error: {exc}; the finished runs are kept, and the same command continues after a fix")
        return exc.rc
    rows = compare.table_rows(summary, compare.choose_lr(summary))
    print(json.dumps({label: summary[label]["reward"]["mean"] for label in rows}))
    say(f"done; compare.md, compare.json and the plots in {args.compare_dir}")
    return 0

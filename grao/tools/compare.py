"""``grao compare``: methods and pipelines x seeds (x learning rates, x a beta/lambda grid) on one task, then a
paper-style table and plots.

Every run is one ``grao train`` run in its own directory under the compare
directory, ``<label>/seed-<n>/``, where the label is the method (or pipeline
``first+second``, :mod:`.compare_plan`), plus ``-b<beta>`` / ``-l<lam>`` for a
weight that the method reads and that the grid varies (``grao-b0.3-l0.6``),
plus ``-lr<lr>`` under an lr grid. The settings of every run are the shared
ones (defaults, ``--config`` file, flags) with its method, seed, learning rate
and weights. Under an lr grid each method's row is its learning rate with the
best validation reward (:func:`.compare_report.choose_lr`).

Each run is a fresh ``python -m grao.tools.compare_run`` child process that calls
``grao train``: its peak memory is then the run's own (the peak RSS of a
process is monotone, so in one process every run after the first would
report the largest so far; a fresh process includes Python, torch and the
model, about the same for every method, and nothing of another run). On
CUDA the peak is ``torch.cuda.max_memory_allocated`` instead. The child
writes it to ``compare-run.json`` in the run directory, one entry per
process that trained the run.

Resumable: a rerun of the same command skips the finished runs, continues an
interrupted one with ``grao train --resume`` (equivalent to not stopping)
and starts over one stopped before its first step. A run directory whose
saved settings differ from the ones asked for (other than the resume-safe
keys, or another step count) is an error, never silently mixed in.
SIGINT/SIGTERM go to the running child once: it finishes its step, saves a
checkpoint, and the compare stops; the same command continues.

Outputs, in the compare directory: ``compare.json`` (every run's final
metrics and config, and the summary), ``compare.md`` (mean +- 95 % t-interval
over seeds per row, and GRAO minus the best baseline paired by seed), ``curves.png``, ``shares.png`` (GRAO-family runs) and
``sweep.png`` (when the grid has more than one value).
"""

from __future__ import annotations

from pathlib import Path

from .compare_plan import GRID_WEIGHTS, PIPE, PIPELINE_SPLIT, WEIGHT_TAGS, Run, parse_methods, parse_values, plan
from .compare_report import (
    COLUMNS,
    choose_lr,
    load_average,
    markdown,
    paired_differences,
    report,
    result,
    summarize,
    table_rows,
)
from .compare_runner import RECORD, CompareStopped, RunFailed, forward_signals, run_state, train_flags, train_run

__all__ = [
    "COLUMNS",
    "GRID_WEIGHTS",
    "PIPE",
    "PIPELINE_SPLIT",
    "RECORD",
    "WEIGHT_TAGS",
    "CompareStopped",
    "Run",
    "RunFailed",
    "choose_lr",
    "compare",
    "forward_signals",
    "markdown",
    "paired_differences",
    "parse_methods",
    "parse_values",
    "plan",
    "report",
    "result",
    "run_state",
    "summarize",
    "table_rows",
    "train_flags",
    "train_run",
]


def compare(runs: list[Run], out_dir: str | Path, command: str, say=print) -> dict:
    """Train every unfinished run of ``runs`` (in order), then :func:`report`."""
    states = [run_state(run) for run in runs]  # every conflict is found before any training
    todo, load_at_start = sum(s != "done" for s in states), load_average()
    say(f"compare: {len(runs)} runs, {len(runs) - todo} finished already, {todo} to train -> {out_dir}")
    for run, state in zip(runs, states):
        if state == "done":
            continue
        say(f"compare: {run.name} ({'resuming' if state == 'resume' else 'from scratch'})")
        secs = train_run(run, state)
        say(f"compare: {run.name} finished in {secs:.1f} s (process start to exit)")
    return report(runs, out_dir, command, load_at_start if todo else None)

"""The embedded tasks, chosen by the config's ``dataset.task`` for ``data: demo``: each is generated offline from
the run's seed and brings its own character tokenizer's text and its default reward.

- ``demo``: reverse a short word (:mod:`grao.data.demo_task`), reward ``demo``;
- ``addition``: add two numbers up to 99 (:mod:`grao.data.addition_task`), reward ``addition`` (per-digit
  partial credit; ``addition-exact`` scores the exact sum only).

A task is the module ``grao.data.<name>_task`` with ``make_splits(train_size, eval_size, seed)``,
``tokenizer_corpus()`` and ``REWARD`` (a name of :data:`grao.eval.rewards.BUILTIN`). The modules are imported
when asked for, so the config can read the names without importing the data package's modules.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Hashable
from types import ModuleType
from typing import TypeVar

T = TypeVar("T", bound=Hashable)

TASKS = ("demo", "addition")


def get(name: str) -> ModuleType:
    """The module of the embedded task ``name``; ValueError naming ``task`` and the choices for another name."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {name!r}")
    return importlib.import_module(f"{__package__}.{name}_task")


def disjoint_draws(draw: Callable[[], T], train_size: int, eval_size: int) -> tuple[list[T], list[T]]:
    """(train, held-out) items from ``draw`` (a seeded generator's next item): ``eval_size`` distinct held-out items
    drawn first, then ``train_size`` training items, none of them held out (repeats within training are fine). The
    draw order is part of each task's data: the same seed gives the same sets."""
    held_out: list[T] = []
    seen: set[T] = set()
    while len(held_out) < eval_size:
        item = draw()
        if item not in seen:
            seen.add(item)
            held_out.append(item)
    train: list[T] = []
    while len(train) < train_size:
        item = draw()
        if item not in seen:
            train.append(item)
    return train, held_out

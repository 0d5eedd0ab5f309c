"""The runs of ``grao compare``: methods and pipelines x learning rates x seeds (x the beta/lambda grid the method
reads), each a full config.

A pipeline ``first+second`` (``sft+grpo``) is two runs per seed: the first stage trains ``first`` for ``split`` of
the steps (default half, rounded), the second starts from its final model (``init_from``) and trains ``second`` for
the rest, so the pipeline's total step budget is the single-stage methods'. Each stage has its own warmup and
schedule at the row's learning rate. First stages are shared by the pipelines that begin with the same method, and
are not rows of the table themselves.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, TrainConfig
from ..losses import METHODS

# The weights each GRAO-family method reads (an ablation that drops a term ignores that term's weight), so a grid
# varies only those: a grid value a method ignores would repeat the same run.
GRID_WEIGHTS = {
    "grao": ("beta", "lam"),
    "grao-no-exploration": ("beta", "lam"),
    "grao-no-imitation": ("lam",),
    "grao-no-alignment": ("beta",),
}
WEIGHT_TAGS = {"beta": "b", "lam": "l"}
PIPE = "+"  # joins the stages of a pipeline: sft+grpo
PIPELINE_SPLIT = 0.5  # the first stage's share of the steps


@dataclass(frozen=True)
class Run:
    """One run of the plan: its label (method or pipeline, grid weights, learning rate), seed and full config.

    ``group``: the label without its learning rate, the row an lr grid chooses one learning rate for. ``swept``:
    the grid weights its label names. ``first``: a pipeline's first-stage run, which this run starts from;
    ``reported``: False for a first stage (trained for the pipelines, not a row of the table)."""

    label: str
    method: str
    seed: int
    cfg: TrainConfig
    group: str = ""
    swept: tuple[str, ...] = ()
    first: Run | None = None
    reported: bool = True

    @property
    def dir(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def name(self) -> str:
        return f"{self.label}/seed-{self.seed}"


def parse_methods(text: str) -> list[str]:
    """The comma-separated method names, each one of :data:`grao.losses.METHODS` or a pipeline of two of them
    (``sft+grpo``), no repeats."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise ConfigError(f"--methods names no method; choose from {', '.join(METHODS)}")
    long = [m for m in names if m.count(PIPE) > 1]
    if long:
        raise ConfigError(f"--methods: a pipeline has two stages (first{PIPE}second), got {', '.join(map(repr, long))}")
    unknown = [m for m in names if any(part not in METHODS for part in m.split(PIPE))]
    if unknown:
        raise ConfigError(
            f"--methods: unknown method{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(METHODS)}"
        )
    repeated = sorted({m for m in names if names.count(m) > 1})
    if repeated:
        raise ConfigError(f"--methods names {', '.join(map(repr, repeated))} more than once")
    return names


def parse_values(text: str | None, flag: str) -> list[float] | None:
    """The comma-separated numbers of a grid flag (None when not given); the ranges are checked by TrainConfig."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise ConfigError(f"{flag} names no value, got {text!r}")
    if len({f"{v:g}" for v in values}) != len(values):  # the labels spell each value with :g
        raise ConfigError(f"{flag} repeats a value: {text!r}")
    return values


def first_steps(steps: int, split: float) -> int:
    """A pipeline's first-stage steps: ``split`` of ``steps``, rounded, leaving each stage at least one."""
    if not 0.0 < split < 1.0:
        raise ConfigError(f"--pipeline-split must be in (0, 1), got {split!r}")
    k = round(steps * split)
    if not 1 <= k < steps:
        raise ConfigError(f"--pipeline-split {split:g} of {steps} steps leaves a stage without steps")
    return k


def plan(
    base: TrainConfig,
    methods: list[str],
    seeds: int,
    out_dir: str | Path,
    betas: list[float] | None = None,
    lams: list[float] | None = None,
    lrs: list[float] | None = None,
    split: float = PIPELINE_SPLIT,
) -> list[Run]:
    """Every run: each method or pipeline x each grid point it reads x each learning rate x seeds ``base.seed ..
    base.seed + seeds - 1``; a pipeline's first stage comes before the first run that starts from it.

    A grid list with one value is a shared setting (no label suffix); one with several values is swept for the
    methods that read that weight (a pipeline: its second stage's). Several learning rates are swept for every
    method (label suffix ``-lr<value>``), and each run then evaluates a validation split (``validation_size``, by
    default as many prompts as the held-out set) for :func:`grao.tools.compare_report.choose_lr`.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--seeds must be an integer >= 1, got {seeds!r}")
    grid = {"beta": betas or [base.beta], "lam": lams or [base.lam]}
    lr_values = lrs or [base.lr]
    if len(lr_values) > 1 and base.validation_size == 0:
        base = dataclasses.replace(base, validation_size=base.eval_size)
    shared = {w: grid[w][0] for w in ("beta", "lam") if len(grid[w]) == 1}
    if len(lr_values) == 1:
        shared["lr"] = lr_values[0]
    out_dir = Path(out_dir)
    runs: list[Run] = []
    firsts: dict[Path, Run] = {}
    k = first_steps(base.steps, split) if any(PIPE in name for name in methods) else 0  # a first stage's steps

    def config(label: str, seed: int, **keys) -> TrainConfig:
        return dataclasses.replace(base, seed=seed, output_dir=str(out_dir / label / f"seed-{seed}"), **keys)

    for name in methods:
        stages = name.split(PIPE)
        method = stages[-1]
        swept = tuple(w for w in GRID_WEIGHTS.get(method, ()) if len(grid[w]) > 1)
        points = [{}]
        for w in swept:
            points = [dict(p, **{w: v}) for p in points for v in grid[w]]
        for point in points:
            group = name + "".join(f"-{WEIGHT_TAGS[w]}{point[w]:g}" for w in swept)
            for lr in lr_values:
                tag = f"-lr{lr:g}" if len(lr_values) > 1 else ""
                for seed in range(base.seed, base.seed + seeds):
                    keys = dict(shared, **point, lr=lr)
                    first = None
                    if len(stages) == 2:
                        first_label = f"{stages[0]}-{k}steps{tag}"
                        first_cfg = config(first_label, seed, **dict(shared, lr=lr), method=stages[0], steps=k)
                        first = firsts.get(first_cfg.run.output_dir)
                        if first is None:
                            first = Run(first_label, stages[0], seed, first_cfg, first_label, reported=False)
                            firsts[first_cfg.run.output_dir] = first
                            runs.append(first)
                        keys.update(steps=base.steps - k, init_from=first_cfg.run.output_dir)
                    cfg = config(group + tag, seed, method=method, **keys)
                    runs.append(Run(group + tag, method, seed, cfg, group, swept, first))
    return runs

"""The runs of ``grao compare``: methods x seeds (x the beta/lambda grid the method reads), each a full config."""

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


@dataclass(frozen=True)
class Run:
    """One run of the plan: its label (method and grid weights), seed and full config."""

    label: str
    method: str
    seed: int
    cfg: TrainConfig

    @property
    def dir(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def name(self) -> str:
        return f"{self.label}/seed-{self.seed}"


def parse_methods(text: str) -> list[str]:
    """The comma-separated method names, each one of :data:`grao.losses.METHODS`, no repeats."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise ConfigError(f"--methods names no method; choose from {', '.join(METHODS)}")
    unknown = [m for m in names if m not in METHODS]
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


def plan(
    base: TrainConfig,
    methods: list[str],
    seeds: int,
    out_dir: str | Path,
    betas: list[float] | None = None,
    lams: list[float] | None = None,
) -> list[Run]:
    """Every run: each method x each grid point it reads x seeds ``base.seed .. base.seed + seeds - 1``.

    A grid list with one value is a shared setting (no label suffix); one with
    several values is swept for the methods that read that weight.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--seeds must be an integer >= 1, got {seeds!r}")
    grid = {"beta": betas or [base.beta], "lam": lams or [base.lam]}
    out_dir = Path(out_dir)
    runs = []
    for method in methods:
        swept = [w for w in GRID_WEIGHTS.get(method, ()) if len(grid[w]) > 1]
        points = [{}]
        for w in swept:
            points = [dict(p, **{w: v}) for p in points for v in grid[w]]
        for point in points:
            label = method + "".join(f"-{WEIGHT_TAGS[w]}{point[w]:g}" for w in swept)
            shared = {w: grid[w][0] for w in ("beta", "lam") if len(grid[w]) == 1}
            for seed in range(base.seed, base.seed + seeds):
                cfg = dataclasses.replace(
                    base,
                    method=method,
                    seed=seed,
                    output_dir=str(out_dir / label / f"seed-{seed}"),
                    **shared,
                    **point,
                )
                runs.append(Run(label, method, seed, cfg))
    return runs

"""``grao compare``: methods x seeds (x a beta/lambda grid) on one task, then a paper-style table and plots.

Every run is one ``grao train`` run in its own directory under the compare
directory, ``<label>/seed-<n>/``, where the label is the method, plus
``-b<beta>`` / ``-l<lam>`` for a weight that the method reads and that the
grid varies (``grao-b0.3-l0.6``). The settings of every run are the shared
ones (defaults, ``--config`` file, flags) with its method, seed and weights.

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
metrics and config, and the summary), ``compare.md`` (mean +- std over seeds
per label), ``curves.png``, ``shares.png`` (GRAO-family runs) and
``sweep.png`` (when the grid has more than one value).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .. import config
from ..config import ConfigError, TrainConfig
from ..losses import METHODS
from ..train import checkpoint, run_dir
from . import child_process, plot

RECORD = "compare-run.json"  # in each run directory: the peak memory and time of each process that trained it
# The weights each GRAO-family method reads (an ablation that drops a term ignores that term's weight), so a grid
# varies only those: a grid value a method ignores would repeat the same run.
GRID_WEIGHTS = {
    "grao": ("beta", "lam"),
    "grao-no-exploration": ("beta", "lam"),
    "grao-no-imitation": ("lam",),
    "grao-no-alignment": ("beta",),
}
WEIGHT_TAGS = {"beta": "b", "lam": "l"}
# (key in a run's result, column title, format) of the table, in order
COLUMNS = (
    ("reward", "final held-out reward", "{:.3f}"),
    ("ras", "RAS", "{:.3f}"),
    ("nag", "NAG", "{:.3f}"),
    ("tokens_per_s", "tokens/s", "{:.0f}"),
    ("peak_memory_mib", "peak memory (MiB)", "{:.0f}"),
)


class CompareStopped(Exception):
    """A signal stopped the compare; the running child saved a checkpoint of its run."""

    def __init__(self, signum: int, where: str):
        super().__init__(f"stopped by {signal.Signals(signum).name} during {where}")
        self.signum = signum


class RunFailed(Exception):
    """A child ``grao train`` exited with an error (its own message is on stderr above)."""

    def __init__(self, rc: int, where: str):
        super().__init__(f"the run {where} failed (grao train exit status {rc}; its error is above)")
        self.rc = rc


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


# ---------------------------------------------------------------------- the plan


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


# ---------------------------------------------------------------------- running


def run_state(run: Run) -> str:
    """``new`` (nothing there), ``done``, ``resume`` (a checkpoint before the last step) or ``restart`` (stopped
    before its first checkpoint); ConfigError when the directory holds a run with other settings."""
    d = run.dir
    if not d.is_dir() or not any(p.name != RECORD for p in d.iterdir()):
        return "new"
    saved_path = d / run_dir.CONFIG
    if not saved_path.is_file():
        raise ConfigError(f"{d} is not empty but has no {run_dir.CONFIG}: not a run to continue; move it away")
    saved = config.load(saved_path)
    conflicts = config.resume_conflicts(saved, run.cfg)
    if saved.steps != run.cfg.steps:
        conflicts.append(f"steps: {saved.steps!r} -> {run.cfg.steps!r}")
    if conflicts:
        raise ConfigError(
            f"{d} holds a run with other settings ({'; '.join(conflicts)}); "
            "compare into another --output-dir, or delete that run to redo it"
        )
    done = checkpoint.latest(d)
    if done is None:
        return "restart"
    return "done" if int(done.name.split("-")[1]) >= run.cfg.steps else "resume"


def train_flags(cfg: TrainConfig) -> list[str]:
    """``grao train`` flags that set every key of ``cfg``."""
    flags = []
    for name, value in config.to_dict(cfg).items():
        if value is None:
            text = "none"
        elif isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, dict):
            text = json.dumps(value)
        else:
            text = repr(value) if isinstance(value, float) else str(value)
        flags.append(f"--{name.replace('_', '-')}={text}")
    return flags


@contextlib.contextmanager
def _forward_signals(proc: subprocess.Popen, caught: list[int]):
    """SIGINT/SIGTERM to this process go to the child once (it checkpoints and exits); the child runs in its own
    session, so a Ctrl-C from the terminal does not reach it twice (the second signal would abort it unsaved)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum, frame):
        if caught:  # a second signal: stop the child without a checkpoint, as grao train does
            proc.kill()
            return
        caught.append(signum)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train_run(run: Run, state: str) -> float:
    """Train ``run`` to its last step in a fresh child process; the seconds it took (process start to exit)."""
    argv = train_flags(run.cfg)
    if state == "resume":
        argv.append("--resume")
    elif state == "restart":
        (run.dir / RECORD).unlink(missing_ok=True)
        argv.append("--overwrite")
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)  # this checkout's grao, also when not installed
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    caught: list[int] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "grao.tools.compare_run", *argv],
        env=env,
        start_new_session=True,
        preexec_fn=child_process.die_with_parent(),  # a SIGKILLed compare's child stops too
    )
    with _forward_signals(proc, caught):
        rc = proc.wait()
    if caught:
        raise CompareStopped(caught[0], run.name)
    if rc != 0:
        raise RunFailed(rc, run.name)
    return time.perf_counter() - t0


def result(run: Run) -> dict:
    """A finished run's final evaluation, mean training throughput, peak memory and config."""
    train, evals = plot.read_metrics(run.dir / run_dir.METRICS)
    if not evals or evals[-1]["step"] != run.cfg.steps:
        raise ConfigError(f"{run.dir}: no evaluation at its last step {run.cfg.steps} in {run_dir.METRICS}")
    final = evals[-1]
    path = run.dir / RECORD
    segments = json.loads(path.read_text())["segments"] if path.is_file() else []
    cuda = [s["cuda_max_allocated_mib"] for s in segments if s.get("cuda_max_allocated_mib") is not None]
    rss = [s["peak_rss_mib"] for s in segments]
    return {
        "label": run.label,
        "method": run.method,
        "seed": run.seed,
        "beta": run.cfg.beta,
        "lam": run.cfg.lam,
        "run_dir": str(run.dir),
        "step": final["step"],
        "reward": final["eval/reward"],
        "ras": final["eval/ras"],
        "nag": final["eval/nag"],
        "reward@start": evals[0]["eval/reward"],
        "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in train) if train else None,
        "peak_memory_mib": max(cuda) if cuda else (max(rss) if rss else None),
        "memory_measure": "cuda_max_allocated" if cuda else "peak_rss",
        "train_s": sum(s["train_s"] for s in segments) if segments else None,
        "processes": len(segments),
        "eval_curve": [[r["step"], r["eval/reward"]] for r in evals],
        "config": config.to_dict(run.cfg),
    }


def _stats(values: list) -> dict:
    vals = [v for v in values if v is not None]
    return {
        "mean": statistics.fmean(vals) if vals else None,
        "std": statistics.stdev(vals) if len(vals) > 1 else None,  # sample std (n - 1)
        "n": len(vals),
        "values": values,
    }


def summarize(results: list[dict]) -> dict[str, dict]:
    """Per label (in plan order): method, weights, seeds and mean / sample std over the seeds of each column."""
    out: dict[str, dict] = {}
    for res in results:
        out.setdefault(res["label"], {"method": res["method"], "beta": res["beta"], "lam": res["lam"], "runs": []})
        out[res["label"]]["runs"].append(res)
    for entry in out.values():
        runs = entry.pop("runs")
        entry["seeds"] = [r["seed"] for r in runs]
        for key, _, _ in COLUMNS:
            entry[key] = _stats([r[key] for r in runs])
    return out


def _cell(stat: dict, fmt: str) -> str:
    if stat["mean"] is None:
        return "n/a"
    text = fmt.format(stat["mean"])
    return text if stat["std"] is None else f"{text} ± {fmt.format(stat['std'])}"


def _load() -> str:
    """The 1, 5 and 15 minute load averages (other processes slow the runs down)."""
    return " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def _machine(load_at_start: str | None) -> str:
    import torch

    cuda = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    start = f"{load_at_start} before the runs, " if load_at_start else ""
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores{cuda}, torch {torch.__version__}; "
        f"load average (1 / 5 / 15 min) {start}{_load()} at the end"
    )


def markdown(runs: list[Run], results: list[dict], summary: dict, command: str, machine: str) -> str:
    cfg = runs[0].cfg
    default_steps = TrainConfig().run.steps
    steps = f"{cfg.steps} steps per run" + (
        " (the trainer's default)" if cfg.steps == default_steps else f" (the trainer's default is {default_steps})"
    )
    seeds = sorted({r.seed for r in runs})
    reward = cfg.reward if cfg.reward != "auto" else f"auto ({'demo' if cfg.data == 'demo' else 'edit'})"
    measure = {r["memory_measure"] for r in results}
    memory = (
        "torch.cuda.max_memory_allocated of the run"
        if measure == {"cuda_max_allocated"}
        else "the peak resident set size of the run's own process (a fresh process per run: Python, torch, the "
        "model and the run; ru_maxrss)"
    )
    lines = [
        "# grao compare",
        "",
        f"`{command}`",
        "",
        f"Task: model {cfg.model}, data {cfg.data}, reward {reward}; P = {cfg.prompts_per_step} prompts x "
        f"G = {cfg.group_size} samples per step, {steps}, {cfg.eval_size} held-out prompts "
        f"({'greedy' if cfg.eval_greedy else 'sampled'}). Seeds {', '.join(map(str, seeds))}; each cell is the mean "
        f"± the sample standard deviation (n - 1) over the seeds, at the last step's evaluation.",
        "",
        "Columns: held-out reward `eval/reward`; RAS = (wins + ties) / n against the reference answers; "
        "NAG = (wins - losses) / n against the starting model's responses; tokens/s = training tokens per second "
        f"of the update phase (forward, loss, backward, optimizer), mean over the steps; peak memory = {memory}.",
        "",
        f"Machine: {machine}. Throughput and times depend on the other load of the machine.",
        "",
        "| method | " + " | ".join(title for _, title, _ in COLUMNS) + " | seeds |",
        "|---|" + "---|" * (len(COLUMNS) + 1),
    ]
    for label, entry in summary.items():
        cells = [_cell(entry[key], fmt) for key, _, fmt in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(entry['seeds'])} |")
    lines += [
        "",
        "Per run:",
        "",
        "| run | reward@0 | " + " | ".join(title for _, title, _ in COLUMNS) + " | train s |",
        "|---|---|" + "---|" * (len(COLUMNS) + 1),
    ]
    for res in results:
        cells = ["n/a" if res[key] is None else fmt.format(res[key]) for key, _, fmt in COLUMNS]
        secs = "n/a" if res["train_s"] is None else f"{res['train_s']:.1f}"
        lines.append(
            f"| {res['label']}/seed-{res['seed']} | {res['reward@start']:.3f} | " + " | ".join(cells) + f" | {secs} |"
        )
    return "\n".join(lines) + "\n"


def report(runs: list[Run], out_dir: str | Path, command: str, load_at_start: str | None = None) -> dict:
    """``compare.json``, ``compare.md`` and the plots of the finished ``runs``; returns the summary."""
    out_dir = Path(out_dir)
    results = [result(run) for run in runs]
    summary = summarize(results)
    machine = _machine(load_at_start)
    (out_dir / "compare.json").write_text(
        json.dumps({"command": command, "machine": machine, "summary": summary, "runs": results}, indent=1) + "\n"
    )
    (out_dir / "compare.md").write_text(markdown(runs, results, summary, command, machine))
    curves: dict[str, list] = {}
    for res in results:
        curves.setdefault(res["label"], []).append(res["eval_curve"])
    plot.plot_compare_curves(curves, out_dir / "curves.png")
    shares: dict[str, list] = {}
    for run in runs:
        train, _ = plot.read_metrics(run.dir / run_dir.METRICS)
        steps, values = plot.term_shares(train)
        if steps:
            shares.setdefault(run.label, []).append((steps, values))
    (out_dir / "shares.png").unlink(missing_ok=True)
    if shares:
        plot.plot_compare_shares(shares, out_dir / "shares.png")
    grids: dict[str, dict] = {}
    for label, entry in summary.items():
        if label != entry["method"] and set(GRID_WEIGHTS.get(entry["method"], ())) == {"beta", "lam"}:
            grids.setdefault(entry["method"], {})[(entry["beta"], entry["lam"])] = entry["reward"]["mean"]
    (out_dir / "sweep.png").unlink(missing_ok=True)
    if grids:
        plot.plot_sweep(grids, out_dir / "sweep.png")
    return summary


def compare(runs: list[Run], out_dir: str | Path, command: str, say=print) -> dict:
    """Train every unfinished run of ``runs`` (in order), then :func:`report`."""
    states = [run_state(run) for run in runs]  # every conflict is found before any training
    todo, load_at_start = sum(s != "done" for s in states), _load()
    say(f"compare: {len(runs)} runs, {len(runs) - todo} finished already, {todo} to train -> {out_dir}")
    for run, state in zip(runs, states):
        if state == "done":
            continue
        say(f"compare: {run.name} ({'resuming' if state == 'resume' else 'from scratch'})")
        secs = train_run(run, state)
        say(f"compare: {run.name} finished in {secs:.1f} s (process start to exit)")
    return report(runs, out_dir, command, load_at_start if todo else None)

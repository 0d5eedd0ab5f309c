"""The report of ``grao compare``: each finished run's results, mean +- std over seeds per label, ``compare.json``,
``compare.md`` and the plots."""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path

from .. import config
from ..config import ConfigError, TrainConfig
from ..train import run_dir
from . import plot
from .compare_plan import GRID_WEIGHTS, Run
from .compare_runner import RECORD

# (key in a run's result, column title, format) of the table, in order
COLUMNS = (
    ("reward", "final held-out reward", "{:.3f}"),
    ("ras", "RAS", "{:.3f}"),
    ("nag", "NAG", "{:.3f}"),
    ("tokens_per_s", "tokens/s", "{:.0f}"),
    ("peak_memory_mib", "peak memory (MiB)", "{:.0f}"),
)


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
        # wins, ties, losses of the final responses against the starting model's (NAG's counts); older runs lack them
        "win_tie_loss": [final[k] for k in ("eval/wins", "eval/ties", "eval/losses")] if "eval/wins" in final else None,
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
        counts = [r["win_tie_loss"] for r in runs]  # summed over the seeds: every held-out prompt of every run
        entry["win_tie_loss"] = None if None in counts else [sum(c[i] for c in counts) for i in range(3)]
    return out


def _cell(stat: dict, fmt: str) -> str:
    if stat["mean"] is None:
        return "n/a"
    text = fmt.format(stat["mean"])
    return text if stat["std"] is None else f"{text} ± {fmt.format(stat['std'])}"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (other processes slow the runs down)."""
    return " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def _machine(load_at_start: str | None) -> str:
    import torch

    cuda = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    start = f"{load_at_start} before the runs, " if load_at_start else ""
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores{cuda}, torch {torch.__version__}; "
        f"load average (1 / 5 / 15 min) {start}{load_average()} at the end"
    )


# Keys that name where a run writes or how it reports, not what it computes.
_NOT_SETTINGS = {"output_dir", "seed", "progress", "plot"}


def settings_table(runs: list[Run]) -> list[str]:
    """Markdown lines: per label, its learning rate, warmup and schedule, and every other key whose value differs
    from the default for the run's model (the trainer's model-dependent defaults resolved), seeds aside."""
    lines = [
        "Settings per row (learning rate, warmup in training steps, schedule; then each key that differs from the "
        "default for the model):",
        "",
        "| method | lr | warmup | schedule | differs from the defaults |",
        "|---|---|---|---|---|",
    ]
    seen = set()
    for run in runs:
        if run.label in seen:
            continue
        seen.add(run.label)
        cfg = run.cfg
        given, default = config.to_dict(cfg), config.to_dict(TrainConfig(model=cfg.model))
        shown = {"lr", "warmup_steps", "lr_schedule", "min_lr_ratio"} | _NOT_SETTINGS
        differs = [f"{k}={given[k]}" for k in given if k not in shown and given[k] != default.get(k)]
        schedule = cfg.optimizer.lr_schedule
        if schedule != "constant":
            schedule += f" to {cfg.optimizer.min_lr_ratio:g} x lr"
        lines.append(f"| {run.label} | {cfg.lr:g} | {cfg.warmup_steps} | {schedule} | {', '.join(differs) or 'none'} |")
    return lines


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
        "NAG = (wins - losses) / n against the starting model's responses, and those wins/ties/losses summed over "
        "the seeds; tokens/s = training tokens per second "
        f"of the update phase (forward, loss, backward, optimizer), mean over the steps; peak memory = {memory}.",
        "",
        f"Machine: {machine}. Throughput and times depend on the other load of the machine.",
        "",
        "| method | " + " | ".join(title for _, title, _ in COLUMNS) + " | wins/ties/losses vs start | seeds |",
        "|---|" + "---|" * (len(COLUMNS) + 2),
    ]
    for label, entry in summary.items():
        cells = [_cell(entry[key], fmt) for key, _, fmt in COLUMNS]
        wtl = entry["win_tie_loss"]
        cells.append("n/a" if wtl is None else "/".join(map(str, wtl)))
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(entry['seeds'])} |")
    lines += ["", *settings_table(runs)]
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

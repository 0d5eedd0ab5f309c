"""The report of ``grao compare``: each finished run's results, per label the mean over seeds with its 95 %
t-interval, the learning rate an lr grid chooses by the validation split, the paired difference of GRAO against the
best baseline, ``compare.json``, ``compare.md`` and the plots."""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path

from .. import config
from ..config import ConfigError, TrainConfig
from ..data import tasks
from ..train import run_dir
from . import plot, stats
from .compare_plan import PIPE, Run
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
    """A finished run's final evaluation, mean training throughput, peak memory and config; a pipeline's second stage
    with its first stage's: the evaluation curve of both (the second's steps after the first's), the time of both,
    the throughput over the steps of both and the larger peak memory (its final evaluation is the second's, NAG
    against the second stage's start)."""
    res = _stage_result(run)
    if run.first is None:
        return res
    first, k = _stage_result(run.first), run.first.cfg.steps
    res["eval_curve"] = first["eval_curve"] + [[k + s, r] for s, r in res["eval_curve"] if s > 0]
    res["reward@start"] = first["reward@start"]
    res["step"] = k + res["step"]
    if first["tokens_per_s"] is not None and res["tokens_per_s"] is not None:
        res["tokens_per_s"] = (k * first["tokens_per_s"] + run.cfg.steps * res["tokens_per_s"]) / (k + run.cfg.steps)
    res["code"] = sorted(set(first["code"]) | set(res["code"]))
    for key, combine in (("train_s", sum), ("peak_memory_mib", max)):
        values = [r[key] for r in (first, res) if r[key] is not None]
        res[key] = combine(values) if values else None
    res["first_stage"] = {key: first[key] for key in ("method", "run_dir", "step", "reward", "val_reward")}
    return res


def _stage_result(run: Run) -> dict:
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
        "lr": run.cfg.lr,
        "group": run.group or run.label,
        "pipeline": run.first.method if run.first is not None else None,  # a pipeline's first stage
        "swept": list(run.swept),
        "run_dir": str(run.dir),
        "step": final["step"],
        "reward": final["eval/reward"],
        "val_reward": final.get("val/reward"),  # with a validation split (an lr grid's choice)
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
        "code": sorted({s["code"] for s in segments if "code" in s}),  # the code that trained it (compare_run)
        "eval_curve": [[r["step"], r["eval/reward"]] for r in evals],
        "config": config.to_dict(run.cfg),
    }


def _stats(values: list) -> dict:
    vals = [v for v in values if v is not None]
    interval = stats.mean_interval(vals) if vals else None
    return {
        "mean": interval.mean if vals else None,
        "ci95": interval.half_width if vals else None,  # half-width of the 95 % t-interval of the mean (n - 1 dof)
        "std": statistics.stdev(vals) if len(vals) > 1 else None,  # sample std (n - 1)
        "n": len(vals),
        "values": values,
    }


def summarize(results: list[dict]) -> dict[str, dict]:
    """Per label (in plan order): method, weights, learning rate, seeds and, over the seeds, the mean with its 95 %
    t-interval and the sample std of each column and of the final validation reward."""
    out: dict[str, dict] = {}
    for res in results:
        keys = ("method", "beta", "lam", "lr", "group", "pipeline", "swept")
        out.setdefault(res["label"], {**{k: res[k] for k in keys}, "runs": []})
        out[res["label"]]["runs"].append(res)
    for entry in out.values():
        runs = entry.pop("runs")
        entry["seeds"] = [r["seed"] for r in runs]
        for key in [key for key, _, _ in COLUMNS] + ["val_reward"]:
            entry[key] = _stats([r[key] for r in runs])
        counts = [r["win_tie_loss"] for r in runs]  # summed over the seeds: every held-out prompt of every run
        entry["win_tie_loss"] = None if None in counts else [sum(c[i] for c in counts) for i in range(3)]
    return out


def choose_lr(summary: dict[str, dict]) -> dict[str, str]:
    """Per group run at several learning rates (an lr grid), the label of the learning rate with the highest mean
    final validation reward (the first given on a tie); the held-out reward plays no part. {} without a grid."""
    groups: dict[str, list[str]] = {}
    for label, entry in summary.items():
        groups.setdefault(entry["group"], []).append(label)
    chosen = {}
    for group, labels in groups.items():
        if len(labels) < 2:
            continue
        missing = [label for label in labels if summary[label]["val_reward"]["mean"] is None]
        if missing:
            raise ConfigError(
                f"{', '.join(missing)}: no validation reward (val/reward) to choose a learning rate by; "
                "give the runs a validation_size"
            )
        chosen[group] = max(labels, key=lambda label: summary[label]["val_reward"]["mean"])  # max keeps the first
    return chosen


def table_rows(summary: dict[str, dict], chosen: dict[str, str]) -> list[str]:
    """The labels the main table shows: each group's chosen learning rate under an lr grid, else every label."""
    return [
        label for label, entry in summary.items() if entry["group"] not in chosen or chosen[entry["group"]] == label
    ]


def is_grao(entry: dict) -> bool:
    """Whether a row trains GRAO's objective (its last stage; not the ablations)."""
    return entry["method"] == "grao"


def paired_differences(results: list[dict], summary: dict[str, dict], rows: list[str]) -> list[dict]:
    """For each GRAO row, its final held-out reward minus that of the best baseline row (the highest mean among rows
    whose last stage is not a GRAO-family method), paired by seed, with the 95 % t-interval of the mean difference."""
    baselines = [label for label in rows if not summary[label]["method"].startswith("grao")]
    if not baselines:
        return []
    best = max(baselines, key=lambda label: summary[label]["reward"]["mean"])
    by_seed = {label: {r["seed"]: r["reward"] for r in results if r["label"] == label} for label in rows}
    out = []
    for label in rows:
        if not is_grao(summary[label]):
            continue
        diff = stats.paired_difference(by_seed[label], by_seed[best])
        if diff is not None:
            seeds = sorted(set(by_seed[label]) & set(by_seed[best]))
            out.append({"grao": label, "baseline": best, "mean": diff.mean, "ci95": diff.half_width, "seeds": seeds})
    return out


def _cell(stat: dict, fmt: str) -> str:
    if stat["mean"] is None:
        return "n/a"
    text = fmt.format(stat["mean"])
    return text if stat["ci95"] is None else f"{text} ± {fmt.format(stat['ci95'])}"


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
        if run.first is not None:  # each seed's own first stage, not this one's directory
            given["init_from"] = f"the final model of {run.first.label} (same seed)"
        shown = {"lr", "warmup_steps", "lr_schedule", "min_lr_ratio"} | _NOT_SETTINGS
        differs = [f"{k}={given[k]}" for k in given if k not in shown and given[k] != default.get(k)]
        schedule = cfg.optimizer.lr_schedule
        if schedule != "constant":
            schedule += f" to {cfg.optimizer.min_lr_ratio:g} x lr"
        lines.append(f"| {run.label} | {cfg.lr:g} | {cfg.warmup_steps} | {schedule} | {', '.join(differs) or 'none'} |")
    return lines


def code_of(results: list[dict]) -> str:
    """The code the runs were trained with: one version, or every version when they differ."""
    versions = sorted({v for res in results for v in res.get("code", [])})
    if not versions:
        return "not recorded"
    return versions[0] if len(versions) == 1 else "mixed, " + ", ".join(versions)


def markdown(runs: list[Run], results: list[dict], summary: dict, command: str, machine: str) -> str:
    reported = [run for run in runs if run.reported]
    cfg = reported[0].cfg
    total = cfg.steps + (reported[0].first.cfg.steps if reported[0].first is not None else 0)
    default_steps = TrainConfig().run.steps
    steps = f"{total} steps per row" + (
        " (the trainer's default)" if total == default_steps else f" (the trainer's default is {default_steps})"
    )
    seeds = sorted({r.seed for r in runs})
    embedded = cfg.data == "demo"
    reward = cfg.reward if cfg.reward != "auto" else f"auto ({tasks.get(cfg.task).REWARD if embedded else 'edit'})"
    data = f"{cfg.data} (task {cfg.task})" if embedded else cfg.data
    measure = {r["memory_measure"] for r in results}
    memory = (
        "torch.cuda.max_memory_allocated of the run"
        if measure == {"cuda_max_allocated"}
        else "the peak resident set size of the run's own process (a fresh process per run: Python, torch, the "
        "model and the run; ru_maxrss)"
    )
    chosen = choose_lr(summary)
    rows = table_rows(summary, chosen)
    validation = any(summary[label]["val_reward"]["mean"] is not None for label in rows)
    lines = [
        "# grao compare",
        "",
        f"`{command}`",
        "",
        f"Task: model {cfg.model}, data {data}, reward {reward}; P = {cfg.prompts_per_step} prompts x "
        f"G = {cfg.group_size} samples per step, {steps}, {cfg.eval_size} held-out prompts "
        f"({'greedy' if cfg.eval_greedy else 'sampled'}). Seeds {', '.join(map(str, seeds))}; each cell is the mean "
        "over the seeds ± the half-width of its 95 % t-interval (Student's t, n - 1 degrees of freedom; none for "
        "one seed), at the last step's evaluation.",
        "",
        "Columns: held-out reward `eval/reward`; RAS = (wins + ties) / n against the reference answers; "
        "NAG = (wins - losses) / n against the starting model's responses, and those wins/ties/losses summed over "
        "the seeds; tokens/s = training tokens per second "
        f"of the update phase (forward, loss, backward, optimizer), mean over the steps; peak memory = {memory}"
        + (
            f"; validation reward `val/reward` on {cfg.validation_size} validation prompts (taken out of training, "
            "none shared with the held-out set)."
            if validation
            else "."
        ),
        "",
        f"Machine: {machine}. Throughput and times depend on the other load of the machine. "
        f"Code: {code_of(results)} (the same seed, thread count and code give the same run).",
        "",
        "| method | "
        + " | ".join(title for _, title, _ in COLUMNS)
        + (" | validation reward" if validation else "")
        + " | wins/ties/losses vs start | seeds |",
        "|---|" + "---|" * (len(COLUMNS) + 2 + validation),
    ]
    for label in rows:
        entry = summary[label]
        cells = [_cell(entry[key], fmt) for key, _, fmt in COLUMNS]
        if validation:
            cells.append(_cell(entry["val_reward"], "{:.3f}"))
        wtl = entry["win_tie_loss"]
        cells.append("n/a" if wtl is None else "/".join(map(str, wtl)))
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(entry['seeds'])} |")
    pipelines = [run for run in reported if run.first is not None]
    if pipelines:
        run = pipelines[0]
        lines += [
            "",
            f"A pipeline `first{PIPE}second` trains `first` for {run.first.cfg.steps} steps, then `second` from its "
            f"final model (init_from) for {run.cfg.steps} steps, {total} in all, each stage with its own warmup and "
            "schedule at the row's learning rate; one first-stage run per seed is shared by the pipelines that begin "
            "with it. Its NAG and wins/ties/losses are against the second stage's start (the first stage's final "
            "model); its curve joins both stages.",
        ]
    if chosen:
        lines += [
            "",
            "Learning rate per method: each was run at every learning rate of the grid, and the one with the highest "
            "mean final validation reward is chosen (the held-out reward plays no part); the table above reports "
            "the held-out metrics at the chosen rate. Every rate:",
            "",
            "| method | lr | validation reward | final held-out reward | chosen |",
            "|---|---|---|---|---|",
        ]
        for label, entry in summary.items():
            if entry["group"] in chosen:
                mark = "yes" if chosen[entry["group"]] == label else ""
                lines.append(
                    f"| {entry['group']} | {entry['lr']:g} | {_cell(entry['val_reward'], '{:.3f}')} | "
                    f"{_cell(entry['reward'], '{:.3f}')} | {mark} |"
                )
    paired = paired_differences(results, summary, rows)
    if paired:
        lines += ["", "Paired difference of the final held-out reward, GRAO − the best baseline row, by seed:", ""]
        for p in paired:
            ci = "" if p["ci95"] is None else f" ± {p['ci95']:.3f} (95 % t-interval)"
            lines.append(
                f"- {p['grao']} − {p['baseline']}: {p['mean']:+.3f}{ci} over seeds {', '.join(map(str, p['seeds']))}"
            )
    lines += ["", *settings_table(reported)]
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
    reported = [run for run in runs if run.reported]
    results = [result(run) for run in reported]
    summary = summarize(results)
    chosen = choose_lr(summary)
    rows = table_rows(summary, chosen)
    machine = _machine(load_at_start)
    saved = {
        "command": command,
        "machine": machine,
        "code": code_of(results),
        "summary": summary,
        "chosen_lr": chosen,  # group -> the label of the learning rate chosen by validation
        "rows": rows,  # the labels of compare.md's table
        "paired": paired_differences(results, summary, rows),
        "runs": results,
    }
    (out_dir / "compare.json").write_text(json.dumps(saved, indent=1) + "\n")
    (out_dir / "compare.md").write_text(markdown(runs, results, summary, command, machine))
    curves: dict[str, list] = {}
    for res in results:
        if res["label"] in rows:
            curves.setdefault(res["label"], []).append(res["eval_curve"])
    plot.plot_compare_curves(curves, out_dir / "curves.png")
    shares: dict[str, list] = {}
    for run in reported:
        if run.label not in rows:
            continue
        train, _ = plot.read_metrics(run.dir / run_dir.METRICS)
        steps, values = plot.term_shares(train)
        if steps:
            offset = run.first.cfg.steps if run.first is not None else 0  # a pipeline's second stage
            shares.setdefault(run.label, []).append(([offset + s for s in steps], values))
    (out_dir / "shares.png").unlink(missing_ok=True)
    if shares:
        plot.plot_compare_shares(shares, out_dir / "shares.png")
    grids: dict[str, dict] = {}
    for label in rows:
        entry = summary[label]
        if set(entry["swept"]) == {"beta", "lam"}:
            name = entry["method"] if entry["pipeline"] is None else f"{entry['pipeline']}{PIPE}{entry['method']}"
            grids.setdefault(name, {})[(entry["beta"], entry["lam"])] = entry["reward"]["mean"]
    (out_dir / "sweep.png").unlink(missing_ok=True)
    if grids:
        plot.plot_sweep(grids, out_dir / "sweep.png")
    return summary

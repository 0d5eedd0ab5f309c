"""``grao compare``: the plan of runs, resuming and skipping, the table's statistics against the runs' own metrics,
the plots, and bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import signal
import statistics
import subprocess
import sys

import pytest
from utils import read_lines, small

import grao
from grao import cli, config
from grao.config import ConfigError, TrainConfig
from grao.tools import compare
from grao.tools.compare_report import code_of
from grao.tools.compare_run import code_version
from grao.train.trainer import Trainer

# Each test's shared settings are tests/utils.small's: a few seconds per run.


def argv(cfg: TrainConfig, out) -> list[str]:
    """``grao compare`` flags for the shared settings ``cfg`` (those that differ from the defaults) into ``out``."""
    default = config.to_dict(TrainConfig())
    # compare's own --lr takes one value as a shared setting, as the train flag does
    given = {k for k, v in config.to_dict(cfg).items() if v != default[k] and (k not in cli.COMPARE_SETS or k == "lr")}
    flags = [f for f in compare.train_flags(cfg) if f[2:].split("=")[0].replace("-", "_") in given]
    return [*flags, "--output-dir", str(out)]


def test_compare_table_is_the_mean_and_std_over_seeds_and_a_rerun_skips_finished_runs(
    tmp_path,
    monkeypatch,
):
    out, shared = tmp_path / "cmp", small(tmp_path)
    runs = compare.plan(shared, ["sft", "grao"], 2, out)
    assert [r.name for r in runs] == ["sft/seed-0", "sft/seed-1", "grao/seed-0", "grao/seed-1"]
    # grao/seed-1 was interrupted after its first step (as by Ctrl-C): a checkpoint at step 1
    interrupted = runs[3]
    trainer = Trainer(interrupted.cfg, callbacks=[lambda t, step, m: t.request_stop()])
    assert trainer.train() is False and trainer.step == 1
    assert compare.run_state(interrupted) == "resume"

    assert cli.main(["compare", "--methods", "sft,grao", "--seeds", "2", *argv(shared, out)]) == 0
    for name in ("compare.json", "compare.md", "curves.png", "shares.png"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "sweep.png").exists()  # no grid

    # the interrupted run was resumed, not redone: one step-0 evaluation, steps 1 and 2 once each
    lines = read_lines(interrupted.dir)
    assert [ln["step"] for ln in lines if "loss" in ln] == [1, 2]
    assert [ln["step"] for ln in lines if "eval/reward" in ln] == [0, 1, 2]
    record = json.loads((interrupted.dir / compare.RECORD).read_text())
    assert [s["resumed"] for s in record["segments"]] == [True]

    # the table against each run's own metrics.jsonl
    saved = json.loads((out / "compare.json").read_text())
    table = (out / "compare.md").read_text()
    for label in ("sft", "grao"):
        finals = []
        for seed in (0, 1):
            evals = [ln for ln in read_lines(out / label / f"seed-{seed}") if "eval/reward" in ln]
            assert evals[-1]["step"] == 2
            finals.append(evals[-1])
        for key in ("reward", "ras", "nag"):
            values = [f[f"eval/{key}"] for f in finals]
            got = saved["summary"][label][key]
            assert got["values"] == values
            assert got["mean"] == pytest.approx(statistics.fmean(values))
            assert got["std"] == pytest.approx(statistics.stdev(values))
            assert got["ci95"] == pytest.approx(12.7062047 * statistics.stdev(values) / 2**0.5)  # t_{0.975, 1}
        for f in finals:  # each evaluation's counts against the starting model are NAG's
            n = f["eval/wins"] + f["eval/ties"] + f["eval/losses"]
            assert n == 4 and f["eval/nag"] == pytest.approx((f["eval/wins"] - f["eval/losses"]) / n)
        wtl = [sum(f[k] for f in finals) for k in ("eval/wins", "eval/ties", "eval/losses")]
        assert saved["summary"][label]["win_tie_loss"] == wtl
        reward = saved["summary"][label]["reward"]
        assert f"| {label} | {reward['mean']:.3f} ± {reward['ci95']:.3f} |" in table
        assert f" | {'/'.join(map(str, wtl))} | 2 |" in table
        memory = saved["summary"][label]["peak_memory_mib"]
        assert memory["n"] == 2 and all(v > 0 for v in memory["values"])
    assert {r["memory_measure"] for r in saved["runs"]} == {"peak_rss"}
    # the code that trained the runs: this checkout's commit (or the installed version), in the json and the table
    code = code_version()
    assert re.fullmatch(r"git [0-9a-f]{12}(\+changes)?|grao-kernels \S+", code)
    assert {tuple(r["code"]) for r in saved["runs"]} == {(code,)}
    assert saved["code"] == code and f"Code: {code} " in table
    # GRAO minus the best baseline (sft, the only one), paired by seed
    finals = {(r["label"], r["seed"]): r["reward"] for r in saved["runs"]}
    diffs = [finals["grao", s] - finals["sft", s] for s in (0, 1)]
    (paired,) = saved["paired"]
    assert (paired["grao"], paired["baseline"], paired["seeds"]) == ("grao", "sft", [0, 1])
    assert paired["mean"] == pytest.approx(statistics.fmean(diffs))
    assert paired["ci95"] == pytest.approx(12.7062047 * statistics.stdev(diffs) / 2**0.5)
    assert f"- grao − sft: {paired['mean']:+.3f} ± {paired['ci95']:.3f} (95 % t-interval)" in table
    # each row's learning rate, warmup and schedule, and what differs from the defaults (tests/utils.small's)
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines() if "cosine to 0.1 x lr" in line}
    assert set(rows) == {"sft", "grao"}
    for label, row in rows.items():
        assert row.startswith(f"| {label} | 0.01 | 1 | cosine to 0.1 x lr | ")
        assert "steps=2" in row and "group_size=3" in row and "output_dir" not in row
    assert "method=sft" in rows["sft"] and "method=" not in rows["grao"]  # grao is the default method
    assert [r["method"] for r in saved["runs"]] == ["sft", "sft", "grao", "grao"]
    assert saved["runs"][0]["config"]["method"] == "sft" and saved["runs"][3]["config"]["seed"] == 1

    # the same command again trains nothing: every run is finished, its files untouched
    stamps = {p: p.stat().st_mtime_ns for r in runs for p in (r.dir / "metrics.jsonl", r.dir / compare.RECORD)}

    def no_training(run, state):
        raise AssertionError(f"{run.name} was trained again ({state})")

    monkeypatch.setattr(compare, "train_run", no_training)
    assert cli.main(["compare", "--methods", "sft,grao", "--seeds", "2", *argv(shared, out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((out / "compare.json").read_text())["summary"] == saved["summary"]


def test_the_table_names_every_code_version_its_runs_were_trained_with():
    assert code_of([{"code": ["git aaa"]}, {"code": ["git aaa"]}]) == "git aaa"
    assert code_of([{"code": ["git bbb"]}, {"code": ["git aaa", "git bbb"]}]) == "mixed, git aaa, git bbb"
    assert code_of([{"code": []}, {}]) == "not recorded"  # runs trained before the record had it


def test_grid_sweeps_the_weights_each_method_reads_and_writes_sweep_png(
    tmp_path,
    monkeypatch,
):
    runs = compare.plan(
        small(tmp_path),
        ["grao", "grao-no-imitation", "grao-no-alignment", "sft"],
        2,
        tmp_path,
        betas=[0.3, 0.5],
        lams=[0.4, 0.6],
    )
    labels = sorted({r.label for r in runs})
    assert labels == sorted(
        ["grao-b0.3-l0.4", "grao-b0.3-l0.6", "grao-b0.5-l0.4", "grao-b0.5-l0.6"]
        + ["grao-no-imitation-l0.4", "grao-no-imitation-l0.6", "grao-no-alignment-b0.3", "grao-no-alignment-b0.5"]
        + ["sft"]
    )
    assert len(runs) == 2 * len(labels)
    by_label = {r.label: r.cfg for r in runs}
    assert (by_label["grao-b0.5-l0.4"].beta, by_label["grao-b0.5-l0.4"].lam) == (0.5, 0.4)
    assert by_label["grao-no-alignment-b0.3"].beta == 0.3 and by_label["sft"].method == "sft"
    assert {r.seed for r in runs} == {0, 1}
    # one value is a shared setting, not a grid: no label suffix
    one = compare.plan(small(tmp_path), ["grao"], 1, tmp_path, betas=[0.3], lams=[0.4, 0.6])
    assert [(r.label, r.cfg.beta, r.cfg.lam) for r in one] == [("grao-l0.4", 0.3, 0.4), ("grao-l0.6", 0.3, 0.6)]

    # the runs in this process (the child process is tested above): no peak memory recorded, so "n/a"
    monkeypatch.setattr(compare, "train_run", lambda run, state: Trainer(run.cfg).train())
    out = tmp_path / "sweep"
    grid = ["--beta", "0.3,0.5", "--lam", "0.4,0.6"]
    assert cli.main(["compare", "--methods", "grao", "--seeds", "1", *grid, *argv(small(tmp_path, steps=1), out)]) == 0
    assert (out / "sweep.png").stat().st_size > 0
    summary = json.loads((out / "compare.json").read_text())["summary"]
    assert sorted(summary) == ["grao-b0.3-l0.4", "grao-b0.3-l0.6", "grao-b0.5-l0.4", "grao-b0.5-l0.6"]
    assert (summary["grao-b0.5-l0.6"]["beta"], summary["grao-b0.5-l0.6"]["lam"]) == (0.5, 0.6)
    assert config.load(out / "grao-b0.5-l0.6" / "seed-0" / "config.yaml").beta == 0.5
    assert summary["grao-b0.3-l0.4"]["peak_memory_mib"]["mean"] is None
    assert "| grao-b0.3-l0.4 | " in (out / "compare.md").read_text()


def test_bad_methods_and_grid_values_are_refused_before_any_run(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"unknown methods 'nope', 'grpoo'; choose from grao, "):
        compare.parse_methods("grao,nope,grpoo")
    with pytest.raises(ConfigError, match="'sft' more than once"):
        compare.parse_methods("sft,grao,sft")
    with pytest.raises(ConfigError, match="names no method"):
        compare.parse_methods(" , ")
    with pytest.raises(ConfigError, match="--beta must be comma-separated numbers"):
        compare.parse_values("0.3,x", "--beta")
    with pytest.raises(ConfigError, match="--seeds must be an integer >= 1"):
        compare.plan(small(tmp_path), ["grao"], 0, tmp_path)
    with pytest.raises(ConfigError, match="'lam' must be a finite number"):
        compare.plan(small(tmp_path), ["grao"], 1, tmp_path, lams=[0.5, -1.0])
    out = tmp_path / "cmp"
    assert cli.main(["compare", "--methods", "grao,dpo,bogus", *argv(small(tmp_path), out)]) == cli.EXIT_CONFIG
    assert "unknown method 'bogus'" in capsys.readouterr().err
    assert not out.exists()


def test_a_run_directory_with_other_settings_is_an_error_not_mixed_in(tmp_path):
    (run,) = compare.plan(small(tmp_path), ["grao"], 1, tmp_path)
    run.dir.mkdir(parents=True)
    config.write(dataclasses.replace(run.cfg, lr=1e-4), run.dir / "config.yaml")
    with pytest.raises(ConfigError, match=r"other settings \(lr: 0.0001 -> 0.01\)"):
        compare.run_state(run)
    config.write(dataclasses.replace(run.cfg, steps=5), run.dir / "config.yaml")
    with pytest.raises(ConfigError, match="steps: 5 -> 2"):
        compare.run_state(run)
    config.write(run.cfg, run.dir / "config.yaml")
    assert compare.run_state(run) == "restart"  # same settings, no checkpoint: it stopped before its first step


def test_a_signal_to_compare_reaches_the_running_child_once():
    # the child, like grao train, exits 143 on its first SIGTERM (after its checkpoint) and would abort on a second
    code = (
        "import signal, sys, time\n"
        "seen = []\n"
        "signal.signal(signal.SIGTERM, lambda *a: seen.append(1))\n"
        "print('ready', flush=True)\n"
        "deadline = time.time() + 20\n"
        "while not seen and time.time() < deadline: time.sleep(0.01)\n"
        "time.sleep(0.2)\n"
        "sys.exit(143 if len(seen) == 1 else 99)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "ready"
    caught, before = [], signal.getsignal(signal.SIGTERM)
    with compare.forward_signals(proc, caught):
        os.kill(os.getpid(), signal.SIGTERM)  # handled by the compare: forwarded, not fatal here
        rc = proc.wait(timeout=30)
    assert caught == [signal.SIGTERM] and rc == 143
    assert signal.getsignal(signal.SIGTERM) is before  # restored afterwards


def test_a_compare_child_finds_this_checkouts_grao_first_on_its_path(monkeypatch):
    from grao.tools import compare_runner

    monkeypatch.delenv("PYTHONPATH", raising=False)
    first = pathlib.Path(compare_runner.child_env()["PYTHONPATH"].split(os.pathsep)[0])
    assert (first / "grao" / "__init__.py").resolve() == pathlib.Path(grao.__file__).resolve()


def test_a_pipeline_starts_its_second_stage_from_the_first_stages_final_model_within_the_same_steps(
    tmp_path,
    monkeypatch,
):
    shared, out = small(tmp_path, steps=4), tmp_path / "cmp"
    runs = compare.plan(shared, ["sft+grpo", "sft+grao", "grao"], 1, out)
    # one sft first stage of half the steps, shared by both pipelines, before them
    assert [(r.name, r.method, r.cfg.steps, r.reported) for r in runs] == [
        ("sft-2steps/seed-0", "sft", 2, False),
        ("sft+grpo/seed-0", "grpo", 2, True),
        ("sft+grao/seed-0", "grao", 2, True),
        ("grao/seed-0", "grao", 4, True),
    ]
    first = runs[0]
    assert runs[1].first is first and runs[2].first is first and runs[3].first is None
    assert runs[1].cfg.init_from == runs[2].cfg.init_from == str(first.dir) and runs[3].cfg.init_from is None
    assert [r.cfg.steps for r in compare.plan(shared, ["sft+grpo"], 1, out, split=0.25)] == [1, 3]
    with pytest.raises(ConfigError, match="leaves a stage without steps"):
        compare.plan(shared, ["sft+grpo"], 1, out, split=0.1)
    with pytest.raises(ConfigError, match="a pipeline has two stages"):
        compare.parse_methods("sft+dpo+grpo")
    with pytest.raises(ConfigError, match=r"unknown method 'sft\+nope'"):
        compare.parse_methods("sft+nope")

    monkeypatch.setattr(compare, "train_run", lambda run, state: Trainer(run.cfg).train())
    assert cli.main(["compare", "--methods", "sft+grpo,sft+grao,grao", "--seeds", "1", *argv(shared, out)]) == 0
    saved = json.loads((out / "compare.json").read_text())
    assert list(saved["summary"]) == saved["rows"] == ["sft+grpo", "sft+grao", "grao"]  # the first stage is no row
    first_evals = [ln for ln in read_lines(first.dir) if "eval/reward" in ln]
    for res in saved["runs"][:2]:
        second = [ln for ln in read_lines(pathlib.Path(res["run_dir"])) if "eval/reward" in ln]
        # the second stage's step-0 evaluation is the first stage's final one: it starts from that model
        assert second[0]["eval/reward"] == first_evals[-1]["eval/reward"] and second[0]["eval/nag"] == 0.0
        assert res["step"] == 4 and res["reward"] == second[-1]["eval/reward"]
        assert res["eval_curve"] == [[ln["step"], ln["eval/reward"]] for ln in first_evals] + [
            [2 + ln["step"], ln["eval/reward"]] for ln in second[1:]
        ]
        assert res["first_stage"]["run_dir"] == str(first.dir) and res["first_stage"]["step"] == 2
    table = (out / "compare.md").read_text()
    assert "trains `first` for 2 steps, then `second` from its final model (init_from) for 2 steps, 4 in all" in table
    assert "| sft+grao | " in table and "| sft-2steps" not in table


def test_the_lr_grid_chooses_each_methods_rate_by_validation_not_by_the_held_out_reward(
    tmp_path,
    monkeypatch,
):
    shared, out = small(tmp_path, steps=1), tmp_path / "cmp"
    runs = compare.plan(small(tmp_path, steps=2), ["sft", "sft+grao"], 1, out, lrs=[1e-3, 1e-2])
    assert [(r.name, r.group, r.cfg.lr) for r in runs] == [
        ("sft-lr0.001/seed-0", "sft", 1e-3),
        ("sft-lr0.01/seed-0", "sft", 1e-2),
        ("sft-1steps-lr0.001/seed-0", "sft-1steps-lr0.001", 1e-3),  # each pipeline's stages at its row's rate
        ("sft+grao-lr0.001/seed-0", "sft+grao", 1e-3),
        ("sft-1steps-lr0.01/seed-0", "sft-1steps-lr0.01", 1e-2),
        ("sft+grao-lr0.01/seed-0", "sft+grao", 1e-2),
    ]
    with pytest.raises(ConfigError, match="--lr repeats a value"):
        compare.parse_values("1e-3,0.001", "--lr")
    grid = compare.plan(shared, ["sft"], 2, out, lrs=[1e-3, 1e-2])
    assert [(r.label, r.group, r.cfg.lr, r.seed) for r in grid] == [
        ("sft-lr0.001", "sft", 1e-3, 0),
        ("sft-lr0.001", "sft", 1e-3, 1),
        ("sft-lr0.01", "sft", 1e-2, 0),
        ("sft-lr0.01", "sft", 1e-2, 1),
    ]
    assert {r.cfg.validation_size for r in grid} == {shared.eval_size}  # a validation split for the choice
    assert compare.plan(shared, ["sft"], 1, out, lrs=[1e-3])[0].label == "sft"  # one rate: a shared setting

    monkeypatch.setattr(compare, "train_run", lambda run, state: Trainer(run.cfg).train())
    flags = [f for f in argv(shared, out) if not f.startswith("--lr=")]
    assert cli.main(["compare", "--methods", "sft", "--seeds", "2", "--lr", "1e-3,1e-2", *flags]) == 0
    # each run's final line: make validation and held-out disagree on the best rate (validation: 1e-3)
    for run in grid:
        path = run.dir / "metrics.jsonl"
        lines = read_lines(run.dir)
        low = run.cfg.lr == 1e-3
        lines[-1].update({"val/reward": 0.9 if low else 0.2, "eval/reward": 0.1 if low else 0.8})
        path.write_text("".join(json.dumps(ln) + "\n" for ln in lines))
    summary = compare.report(grid, out, "test")
    saved = json.loads((out / "compare.json").read_text())
    assert saved["chosen_lr"] == {"sft": "sft-lr0.001"} and saved["rows"] == ["sft-lr0.001"]
    assert summary["sft-lr0.01"]["reward"]["mean"] > summary["sft-lr0.001"]["reward"]["mean"]  # held-out disagrees
    table = (out / "compare.md").read_text()
    assert "| sft-lr0.001 | 0.100 ± 0.000 |" in table and "| sft-lr0.01 | 0.800" not in table
    assert "| sft | 0.001 | 0.900 ± 0.000 | 0.100 ± 0.000 | yes |" in table
    assert "| sft | 0.01 | 0.200 ± 0.000 | 0.800 ± 0.000 |  |" in table
    # without validation rewards there is nothing to choose by: an error, never a silent held-out choice
    for entry in summary.values():
        entry["val_reward"]["mean"] = None
    with pytest.raises(ConfigError, match="no validation reward"):
        compare.choose_lr(summary)

"""A run directory keeps its intact checkpoints, has one writer at a time, keeps the user's files, and a failed
write of results is one clear line after the work done was saved.

Rotation next to a damaged checkpoint, evaluation falling back past it, the run-directory lock (real processes),
children of ``grao compare`` ending with their parent, ``--overwrite`` and files of the user's by a run's names,
and write errors of metrics and ``grao eval --output``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from utils import spawn_grao, wait_for  # noqa: E402

from grao import cli  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
FAST = (
    *("--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "3"),
    *("--demo-train-size", "16", "--eval-size", "2", "--eval-every", "1000", "--save-every", "1"),
    *("--progress", "false", "--plot", "false"),
)


def checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step-*") if p.is_dir())


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("grao: error:")]


def train_steps(run: Path) -> list[int]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [ln["step"] for ln in lines if "loss" in ln]


# ---------------------------------------------------------------------- rotation and damaged checkpoints


def test_rotation_keeps_the_intact_checkpoint_and_eval_falls_back_past_a_damaged_one(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", *FAST, "--steps", "4", "--save-every", "2", "--output-dir", str(run)]) == 0
    damaged = run / "checkpoints" / "step-000004" / "model.safetensors"
    os.truncate(damaged, 1000)

    resume = ["train", "--output-dir", str(run), "--resume", "--keep-checkpoints", "1"]
    assert cli.main([*resume, "--steps", "3"]) == 0
    assert "step-000003" in checkpoints(run)  # the newest intact checkpoint is never the one rotated away
    capsys.readouterr()

    assert cli.main(["eval", "--run", str(run)]) == 0
    captured = capsys.readouterr()
    assert str(damaged) in captured.err and "evaluating an older checkpoint" in captured.err
    assert json.loads(captured.out)["model"].endswith("step-000003")

    assert cli.main([*resume, "--steps", "5"]) == 0  # the next resume starts from it and replaces step 4
    assert train_steps(run) == [1, 2, 3, 4, 5]
    assert checkpoints(run) == ["step-000005"]


def test_rotation_never_deletes_when_the_new_checkpoint_is_not_intact(tmp_path, monkeypatch):
    from grao.train import checkpoint

    run = tmp_path / "run"
    assert cli.main(["train", *FAST, "--steps", "1", "--output-dir", str(run)]) == 0
    real = checkpoint.save_pretrained

    def save_then_lose_a_byte(directory, *args, **kwargs):
        out = real(directory, *args, **kwargs)
        state = out / checkpoint.STATE_FILE
        os.truncate(state, state.stat().st_size - 1)  # damaged after the write (a bad disk, a sync that lied)
        return out

    monkeypatch.setattr(checkpoint, "save_pretrained", save_then_lose_a_byte)
    rc = cli.main(["train", "--output-dir", str(run), "--resume", "--steps", "2", "--keep-checkpoints", "1"])
    assert rc == 1
    assert "step-000001" in checkpoints(run)


# ---------------------------------------------------------------------- one writer per run directory


def test_a_second_train_into_a_running_directory_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    first = spawn_grao("train", *FAST, "--steps", "500", "--save-every", "1", "--output-dir", str(run))
    try:
        wait_for(lambda: (run / "checkpoints" / "step-000001").is_dir(), "the first run's first checkpoint")
        for extra in ([], ["--resume"], ["--overwrite"]):
            capsys.readouterr()
            assert cli.main(["train", *FAST, "--output-dir", str(run), *extra]) == 2
            err = capsys.readouterr().err
            (line,) = error_lines(err)
            assert f"is in use by another grao train (pid {first.pid})" in line
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=30)
    finally:
        first.kill()
    steps = train_steps(run)
    assert steps == list(range(1, len(steps) + 1))  # one writer: no step logged twice

    lock = run / ".grao.lock"
    assert lock.read_text().strip() == str(first.pid)  # left by the killed run
    capsys.readouterr()
    assert cli.main(["train", "--output-dir", str(run), "--resume", "--steps", str(steps[-1] + 1)]) == 0
    err = capsys.readouterr().err
    assert f"taking over {lock}: the run that held it (pid {first.pid}) is no longer running" in err
    assert not lock.exists()  # released on exit


def test_a_start_refused_after_taking_the_lock_leaves_no_directory_behind(tmp_path, capsys):
    run = tmp_path / "new-run"
    assert cli.main(["train", *FAST, "--output-dir", str(run), "--model-overrides", '{"num_hidden_layers": -1}']) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "num_hidden_layers" in line
    assert not run.exists()


def test_a_child_ends_with_its_parent_even_after_sigkill(tmp_path):
    """The preexec hook ``grao compare`` starts its ``grao train`` children with."""
    marker, child_pid = tmp_path / "child-got-sigterm", tmp_path / "child.pid"
    parent = textwrap.dedent(
        f"""
        import subprocess, sys
        from grao.tools.child_process import die_with_parent
        child = '''
        import os, signal, sys, time
        signal.signal(signal.SIGTERM, lambda *a: (open({str(marker)!r}, "w").close(), sys.exit(143)))
        open({str(child_pid)!r}, "w").write(str(os.getpid()))
        time.sleep(120)
        '''
        subprocess.Popen([sys.executable, "-c", child], start_new_session=True, preexec_fn=die_with_parent())
        import time; time.sleep(120)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", parent], env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        wait_for(lambda: child_pid.is_file() and child_pid.read_text(), "the child to start", timeout=60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        wait_for(marker.exists, "the child's SIGTERM", timeout=30)
    finally:
        proc.kill()
        if child_pid.is_file() and child_pid.read_text():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(child_pid.read_text()), signal.SIGKILL)


# ---------------------------------------------------------------------- --overwrite and the user's files


def test_overwrite_refuses_to_touch_the_users_own_files_by_a_runs_names(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("my: own config\n")
    (run / "plot.png").write_bytes(b"my own plot")
    assert cli.main(["train", *FAST, "--output-dir", str(run), "--overwrite"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "config.yaml, plot.png" in line and "not written by a run" in line
    assert (run / "config.yaml").read_text() == "my: own config\n"
    assert (run / "plot.png").read_bytes() == b"my own plot"
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "plot.png"]

    # what a run wrote there is deleted, the user's file of another name is kept
    (run / "config.yaml").unlink()
    (run / "plot.png").unlink()
    assert cli.main(["train", *FAST, "--steps", "1", "--plot", "true", "--output-dir", str(run)]) == 0
    (run / "mine.txt").write_text("kept")
    assert cli.main(["train", *FAST, "--steps", "1", "--output-dir", str(run), "--overwrite"]) == 0
    assert (run / "mine.txt").read_text() == "kept"
    assert not (run / "plot.png").exists()  # the first run's plot; this one has --plot false


# ---------------------------------------------------------------------- write errors


def test_a_full_disk_while_logging_saves_a_checkpoint_then_says_one_line(tmp_path, capsys, monkeypatch):
    from grao.train import run_dir

    real, calls = run_dir.append_metrics, []

    def append_until_the_disk_fills(directory, line):
        calls.append(line)
        if "loss" in line and line["step"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(directory, line)

    monkeypatch.setattr(run_dir, "append_metrics", append_until_the_disk_fills)
    run = tmp_path / "run"
    assert cli.main(["train", *FAST, "--save-every", "1000", "--output-dir", str(run)]) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert f"could not write {run / 'metrics.jsonl'}: No space left on device" in line
    assert "step-000002" in line and checkpoints(run) == ["step-000002"]


def test_eval_checks_its_output_path_before_evaluating(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", *FAST, "--steps", "1", "--output-dir", str(run)]) == 0
    capsys.readouterr()
    missing = tmp_path / "no-such-dir" / "results.json"
    assert cli.main(["eval", "--run", str(run), "--output", str(missing)]) == 2
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert str(missing.parent) in line and "does not exist" in line
    assert "generating" not in err  # refused before the evaluation

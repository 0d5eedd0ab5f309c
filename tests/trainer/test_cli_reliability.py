"""``grao train`` loses nothing and fails clearly: run directories, signals, resume, bad rewards, bad settings, full disk.

Signals and a second run into the same directory run the CLI as a real subprocess; the other cases call
``grao.cli.main`` in-process (same code path from argv to exit status, seconds faster per case).
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from utils import read_lines, spawn_grao, wait_for  # noqa: E402

from grao import cli  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# A couple of seconds of the demo: 2 prompts x 2 samples, 2 steps, a checkpoint and an evaluation after each.
FAST = (
    *("--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "3"),
    *("--demo-train-size", "16", "--eval-size", "2", "--eval-every", "1", "--save-every", "1"),
    *("--progress", "false", "--plot", "false"),
)


def grao(*args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """``grao`` as a subprocess of this checkout."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    cmd = [sys.executable, "-m", "grao.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def train_steps(run: Path) -> list[int]:
    return [ln["step"] for ln in read_lines(run) if "loss" in ln]


def checkpoints(run: Path) -> list[str]:
    """Names of the step checkpoints in ``run``, oldest first."""
    return sorted(p.name for p in (run / "checkpoints").glob("step-*") if p.is_dir())


def assert_intact(ckpt: Path) -> None:
    from safetensors.torch import load_file

    assert torch.load(ckpt / "trainer_state.pt", weights_only=False)["step"] == int(ckpt.name.split("-")[1])
    assert load_file(ckpt / "model.safetensors")


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("grao: error:")]


# ---------------------------------------------------------------------- run directories (real processes)


def test_a_second_run_into_the_same_directory_refuses_and_overwrite_deletes_only_its_files(tmp_path, capsys):
    run = tmp_path / "run"
    first = grao("train", *FAST, "--output-dir", str(run))
    assert first.returncode == 0, first.stderr
    (run / "notes.txt").write_text("mine")
    (run / "checkpoints" / "notes.txt").write_text("mine too")
    before = snapshot(run)

    again = grao("train", *FAST, "--output-dir", str(run))
    assert again.returncode == 2, again.stderr
    assert "is not empty" in again.stderr and "--resume" in again.stderr and "--overwrite" in again.stderr
    assert error_lines(again.stderr) == [again.stderr.strip().splitlines()[-1]]
    assert snapshot(run) == before  # nothing deleted, nothing written

    # the same CLI in-process from here on: the second real process above is the case to prove
    assert cli.main(["train", *FAST, "--steps", "1", "--output-dir", str(run), "--overwrite"]) == 0
    assert (run / "notes.txt").read_text() == "mine"
    assert (run / "checkpoints" / "notes.txt").read_text() == "mine too"
    assert checkpoints(run) == ["step-000001"]  # the earlier run's step-000002 is gone
    assert train_steps(run) == [1]

    (run / "initial" / "notes.txt").write_text("inside a directory the trainer writes whole")
    before = snapshot(run)
    capsys.readouterr()
    assert cli.main(["train", *FAST, "--output-dir", str(run), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "initial" in err and "notes.txt" in err
    assert snapshot(run) == before


# ---------------------------------------------------------------------- signals (real processes)


def test_sigterm_saves_a_checkpoint_and_the_run_resumes_from_it(tmp_path):
    run = tmp_path / "run"
    # many steps and no periodic save or evaluation: only the signal can produce the checkpoint
    proc = spawn_grao(
        "train", *FAST, "--steps", "500", "--save-every", "1000", "--eval-every", "1000", "--output-dir", str(run)
    )
    try:
        log = run / "metrics.jsonl"
        wait_for(lambda: log.is_file() and '"loss"' in log.read_text(), "step 1")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    done = train_steps(run)
    assert 1 <= len(done) < 500 and done == list(range(1, len(done) + 1))
    assert checkpoints(run)[-1] == f"step-{done[-1]:06d}"
    assert_intact(run / "checkpoints" / checkpoints(run)[-1])
    assert "SIGTERM" in err and f"grao train --output-dir {run} --resume" in err

    resumed = grao("train", "--output-dir", str(run), "--resume", "--steps", str(done[-1] + 1))
    assert resumed.returncode == 0, resumed.stderr
    assert train_steps(run) == list(range(1, done[-1] + 2))


SLOW_REWARD = """
import os, time
from grao.data.demo_task import reward as demo

def slow(prompts, completions, references):
    open(os.environ["GRAO_TEST_MARKER"], "w").close()  # tell the test the step-0 evaluation is scoring
    time.sleep(1.5)
    return demo(prompts, completions, references)
"""


def test_ctrl_c_in_the_step_0_evaluation_offers_no_resume_that_cannot_work(tmp_path):
    (tmp_path / "slowreward.py").write_text(SLOW_REWARD)
    run, marker = tmp_path / "run", tmp_path / "scoring"
    env = {"PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}", "GRAO_TEST_MARKER": str(marker)}
    proc = spawn_grao("train", *FAST, "--reward", "slowreward:slow", "--output-dir", str(run), env=env)
    try:
        wait_for(marker.exists, "the step-0 evaluation")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, err
    assert not (run / "checkpoints").exists() or checkpoints(run) == []
    assert "--resume" not in err and "nothing was saved to resume from" in err and "--overwrite" in err


PAUSING_REWARD = """
import json, os, time
from pathlib import Path
from grao.data.demo_task import reward as demo

def pausing(prompts, completions, references):
    # With GRAO_TEST_PAUSE=<run dir>:<k>: once training step k is logged, touch GRAO_TEST_MARKER and
    # sleep, so that the test's signals land in the next call (step k+1's rollout when step k neither
    # evaluates nor ends the run). Otherwise the demo reward.
    if os.environ.get("GRAO_TEST_PAUSE"):
        run, k = os.environ["GRAO_TEST_PAUSE"].rsplit(":", 1)
        log = Path(run) / "metrics.jsonl"
        lines = log.read_text().splitlines() if log.is_file() else []
        if any('"loss"' in ln and json.loads(ln)["step"] == int(k) for ln in lines):
            open(os.environ["GRAO_TEST_MARKER"], "w").close()
            time.sleep(60)
    return demo(prompts, completions, references)
"""


def _pausing(tmp_path: Path, run: Path, after_step: int) -> tuple[dict, Path]:
    """Environment for ``--reward pausingreward:pausing`` pausing in step ``after_step + 1``, and its marker file."""
    (tmp_path / "pausingreward.py").write_text(PAUSING_REWARD)
    marker = tmp_path / "paused"
    env = {"PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}", "GRAO_TEST_MARKER": str(marker)}
    return {**env, "GRAO_TEST_PAUSE": f"{run}:{after_step}"}, marker


def _read_stderr_until(proc: subprocess.Popen, text: str) -> str:
    """stderr lines up to the first containing ``text`` (or up to EOF)."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if text in line:
            break
    return "".join(seen)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_the_same_signal_twice_aborts_at_once_without_saving(tmp_path, sig):
    run = tmp_path / "run"
    env, marker = _pausing(tmp_path, run, after_step=1)
    args = ("train", *FAST, "--steps", "3", "--eval-every", "100", "--reward", "pausingreward:pausing")
    proc = spawn_grao(*args, "--output-dir", str(run), env=env)
    try:
        wait_for(marker.exists, "step 2's rollout")  # step 1 is checkpointed; step 2 sleeps in its reward
        proc.send_signal(sig)
        err = _read_stderr_until(proc, "received")  # the first one is handled: finish the step, then save
        proc.send_signal(sig)
        _, rest = proc.communicate(timeout=30)  # well before the reward's sleep ends
        err += rest
    finally:
        proc.kill()
    if sig == signal.SIGINT:
        assert proc.returncode == 128 + sig and "aborted" in err, err
    else:
        assert proc.returncode == -sig, err  # the default action: killed by the signal
    assert f"{sig.name} again aborts without one" in err
    assert checkpoints(run) == ["step-000001"] and not list((run / "checkpoints").glob("*.tmp"))
    assert train_steps(run) == [1]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_logs_and_ends_as_an_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    from grao.train.trainer import TIME_KEYS

    args = (
        "train",
        *FAST,
        "--steps",
        "4",
        "--save-every",
        "2",
        "--eval-every",
        "2",
        "--reward",
        "pausingreward:pausing",
    )
    full, run = tmp_path / "full", tmp_path / "run"
    env, marker = _pausing(tmp_path, run, after_step=3)
    plain = {k: v for k, v in env.items() if k != "GRAO_TEST_PAUSE"}
    uninterrupted = grao(*args, "--output-dir", str(full), env=plain)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    proc = spawn_grao(*args, "--output-dir", str(run), env=env)
    try:
        wait_for(marker.exists, "step 4's rollout")  # step 2 is checkpointed, step 3 logged after it
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert checkpoints(run) == ["step-000002"] and train_steps(run) == [1, 2, 3]

    resumed = grao("train", "--output-dir", str(run), "--resume", env=plain)
    assert resumed.returncode == 0, resumed.stderr
    a, b = read_lines(full), read_lines(run)
    assert [ln["step"] for ln in b] == [ln["step"] for ln in a]  # step 3's line from before the kill is gone
    for la, lb in zip(a, b):
        assert la.keys() == lb.keys()
        for k in la.keys() - set(TIME_KEYS):
            assert lb[k] == pytest.approx(la[k], rel=1e-5, abs=1e-6), (la["step"], k)
    wa, wb = (load_file(r / "checkpoints" / "step-000004" / "model.safetensors") for r in (full, run))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------- resume robustness


def _two_step_run(run: Path) -> None:
    assert cli.main(["train", *FAST, "--output-dir", str(run)]) == 0


def test_resume_drops_a_truncated_last_metrics_line(tmp_path, capsys):
    run = tmp_path / "run"
    _two_step_run(run)
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 3, "reward/samples": 0.')  # the process died mid-write
    capsys.readouterr()
    assert cli.main(["train", "--output-dir", str(run), "--resume", "--steps", "3"]) == 0
    assert "incomplete last line" in capsys.readouterr().err
    assert train_steps(run) == [1, 2, 3]


@pytest.mark.parametrize("damaged", ["trainer_state.pt", "model.safetensors"])
def test_resume_names_a_corrupt_newest_checkpoint_and_falls_back_to_an_intact_one(tmp_path, capsys, damaged):
    run = tmp_path / "run"
    _two_step_run(run)
    newest = run / "checkpoints" / "step-000002" / damaged
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    capsys.readouterr()
    assert cli.main(["train", "--output-dir", str(run), "--resume", "--steps", "3"]) == 0
    err = capsys.readouterr().err
    assert str(newest) in err and "resuming at step 1" in err
    assert train_steps(run) == [1, 2, 3]  # step 2 redone after the fallback, then step 3


def test_resume_refuses_a_run_without_its_config_and_flags_that_change_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    _two_step_run(run)
    capsys.readouterr()
    assert cli.main(["train", "--output-dir", str(run), "--resume", "--lr", "0.5", "--group-size", "3"]) == 2
    err = capsys.readouterr().err
    assert "lr: 0.003 -> 0.5" in err and "group_size: 2 -> 3" in err
    assert error_lines(err) == err.strip().splitlines()[-1:]
    assert cli.main(["train", "--output-dir", str(run), "--resume", "--steps", "3", "--eval-every", "5"]) == 0
    capsys.readouterr()
    (run / "config.yaml").unlink()
    assert cli.main(["train", "--output-dir", str(run), "--resume", "--steps", "4"]) == 2
    assert "config.yaml is missing" in capsys.readouterr().err
    assert train_steps(run) == [1, 2, 3]


# ---------------------------------------------------------------------- rewards that misbehave mid-run


def _after_first_step(bad):
    """The demo reward until step 2's rollout (call 5: eval at step 0 scores twice, each rollout twice; with the GRAO
    term probe off, which scores its samples at each evaluation), then ``bad``."""
    from grao.data.demo_task import reward as demo

    calls = []

    def reward(prompts, completions, references):
        calls.append(1)
        if len(calls) < 5:
            return demo(prompts, completions, references)
        return bad(completions)

    return reward


def _raise(completions):
    raise ZeroDivisionError("the judge divided by zero")


REWARDS = {
    "raises": (_raise, "raised ZeroDivisionError: the judge divided by zero"),
    "nan": (lambda c: [math.nan] * len(c), "returned nan"),
    "inf": (lambda c: [0.5] * (len(c) - 1) + [-math.inf], "returned -inf for completion 3"),
    "wrong_length": (lambda c: [0.5] * (len(c) - 1), "returned 3 values for 4 completions"),
    "string": (lambda c: ["0.5"] * len(c), "returned '0.5' (str)"),
    "bool": (lambda c: [True] * len(c), "returned True (bool)"),
}
for _name, (_bad, _) in REWARDS.items():
    globals()[f"reward_{_name}"] = _after_first_step(_bad)


@pytest.mark.parametrize("case", list(REWARDS))
def test_a_bad_reward_mid_run_checkpoints_the_work_done_then_names_the_reward_and_value(tmp_path, capsys, case):
    run = tmp_path / "run"
    args = ["train", *FAST, "--steps", "3", "--save-every", "100", "--eval-every", "100", "--output-dir", str(run)]
    code = cli.main([*args, "--probe-prompts", "0", "--reward", f"{__name__}:reward_{case}"])
    err = capsys.readouterr().err
    assert code == 1, err
    (line,) = error_lines(err)
    assert line.startswith("grao: error: reward ") and ".reward" in line and REWARDS[case][1] in line
    assert checkpoints(run) == ["step-000001"] and train_steps(run) == [1]
    assert_intact(run / "checkpoints" / "step-000001")
    assert "--resume" in err


# ---------------------------------------------------------------------- settings checked before anything is written


def _dir_without_config(tmp_path: Path) -> str:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"")
    return str(tmp_path / "model")


def _not_utf8(tmp_path: Path) -> str:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "ab=", "reference": "ba"}\n{"prompt": "caf\xe9=", "reference": "x"}\n')
    return str(path)


def _empty_prompt(tmp_path: Path) -> str:
    path = tmp_path / "empty.jsonl"
    lines = [{"prompt": "ab=", "reference": "ba"}, {"prompt": "", "reference": "x"}, {"prompt": "c=", "reference": "c"}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


def _under_a_file(tmp_path: Path) -> str:
    (tmp_path / "a-file").write_text("")
    return str(tmp_path / "a-file" / "run")


BAD_SETTINGS = [
    (["--loss-backend", "cuda"], "'loss_backend' must be one of auto, torch, triton, native"),
    (["--device", "gpu"], "'device' must be auto or a torch device"),
    (["--device", "meta"], "'device' must be auto, cpu or cuda"),
    (["--attn-implementation", "flash"], "'attn_implementation' must be one of"),
    (["--lr", "nan"], "'lr' must be a finite number in (0, 1]"),
    (["--lr", "inf"], "'lr' must be a finite number in (0, 1]"),
    (["--lr", "30"], "'lr' must be a finite number in (0, 1]"),
    (["--weight-decay", "-0.1"], "'weight_decay' must be a finite number in [0, 1]"),
    (["--beta", "inf"], "'beta' must be a finite number in [0, 1000]"),
    (["--lam", "nan"], "'lam' must be a finite number in [0, 1000]"),
    (["--router-aux-loss-coef", "1e9"], "'router_aux_loss_coef' must be a finite number in [0, 1000]"),
    (["--model", _dir_without_config], "nor a local Hugging Face model directory with a config.json"),
    (["--output-dir", _under_a_file], "cannot be created"),
    (["--data", _not_utf8], "latin1.jsonl:2: not UTF-8 text"),
    (["--data", _empty_prompt], "empty.jsonl:2: the prompt '' tokenises to nothing"),
]


@pytest.mark.parametrize(
    "flags, message",
    BAD_SETTINGS,
    ids=[" ".join(getattr(f, "__name__", f) for f in flags) for flags, _ in BAD_SETTINGS],
)
def test_a_bad_setting_is_one_error_line_with_status_2_and_nothing_written(tmp_path, capsys, flags, message):
    flags = [f(tmp_path) if callable(f) else f for f in flags]
    run = tmp_path / "run"
    args = ["train", *FAST, "--output-dir", str(run), *flags]
    before = snapshot(tmp_path)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == err.strip().splitlines()[-1:], err
    assert message in err
    assert snapshot(tmp_path) == before and not run.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any directory")
def test_an_output_dir_without_write_permission_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert cli.main(["train", *FAST, "--output-dir", str(locked / "run")]) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == err.strip().splitlines()[-1:], err
    assert f"'output_dir' '{locked / 'run'}' is not writable" in err
    assert not any(locked.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks that a device absent here is refused")
def test_a_device_or_backend_this_machine_lacks_is_refused_before_loading(tmp_path):
    cuda = grao("train", *FAST, "--device", "cuda", "--output-dir", str(tmp_path / "a"))
    assert cuda.returncode == 2 and "CUDA is not available" in cuda.stderr
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # Triton runs CPU tensors only under it
    proc = subprocess.run(
        [sys.executable, "-m", "grao.cli", "train", *FAST, "--device", "cpu", "--loss-backend", "triton"],
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": str(REPO)},
        cwd=tmp_path,
        timeout=180,
    )
    assert proc.returncode == 2 and "'loss_backend' 'triton' cannot run on cpu" in proc.stderr
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------- a full disk during a checkpoint


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_leaves_no_tmp(tmp_path, capsys, monkeypatch):
    real_save = torch.save
    saves = []

    def save_until_the_disk_fills(obj, f, *args, **kwargs):
        saves.append(f)
        if len(saves) == 2:  # the step-2 checkpoint: half a file, then ENOSPC
            Path(f).write_bytes(b"\0" * 1024)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    run = tmp_path / "run"
    assert cli.main(["train", *FAST, "--output-dir", str(run)]) == 1
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert "step-000002" in line and "No space left on device" in line and "step-000001 is kept" in line
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000001"]
    assert_intact(run / "checkpoints" / "step-000001")

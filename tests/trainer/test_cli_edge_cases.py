"""Settings at the edges get one clear error line or a correct result, never a hang, a raw traceback or a silent
change: per-step sizes beyond the machine's memory, prompts beyond the model's context, ``model_overrides``,
``grao plan`` and ``grao eval`` arguments, empty references, text the tokenizer lacks, a judge that never answers,
and SIGTERM to one rank of a two-process run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from utils import read_lines  # noqa: E402

from grao import cli  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FAST = (
    *("--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "3"),
    *("--demo-train-size", "16", "--eval-size", "2", "--eval-every", "1000", "--save-every", "1000"),
    *("--progress", "false", "--plot", "false"),
)


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("grao: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------- sizes that would hang or exhaust memory


def test_a_step_larger_than_memory_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    rc = cli.main(["train", *FAST, "--prompts-per-step", "100000000000000000000", "--output-dir", str(run)])
    assert rc == 2
    line = one_error(capsys)
    assert "prompts_per_step=100000000000000000000" in line and "GRAO_SKIP_MEMORY_CHECK=1" in line
    assert not run.exists()

    from grao.train import step_bounds

    monkeypatch.setattr(step_bounds, "device_bytes", lambda device: 2**20)  # a 1 MiB machine: the demo step is more
    monkeypatch.setenv("GRAO_SKIP_MEMORY_CHECK", "1")  # the documented override
    assert cli.main(["train", *FAST, "--output-dir", str(run)]) == 0


# ---------------------------------------------------------------------- prompts and the model's context


def test_prompts_beyond_the_context_are_cut_with_a_warning_and_a_metric(tmp_path, capsys):
    # the demo tokenizer has one token per letter a-j: a 1,001-letter prompt is 1,001 tokens
    lines = [{"prompt": ("abcdefghij" * 101)[:1000] + "=", "reference": "abc"}]
    lines += [{"prompt": "abc=", "reference": "cba"}] * 5
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    run = tmp_path / "run"
    assert cli.main(["train", *FAST, "--data", str(data), "--reward", "exact", "--output-dir", str(run)]) == 0
    err = capsys.readouterr().err
    # the demo model has 64 positions: 512 + 3 tokens do not fit, so prompts keep their last 61
    assert "1 of 6 prompts are longer than 61 tokens" in err and "context of 64 positions" in err
    assert read_lines(run)[0]["data/prompts_cut"] == 1

    capsys.readouterr()
    rc = cli.main(["train", *FAST, "--max-new-tokens", "64", "--output-dir", str(tmp_path / "r2")])
    assert rc == 2 and "'max_new_tokens' (64) leaves no room for a prompt" in one_error(capsys)


def test_the_demo_trains_with_no_prompt_cut_and_no_context_warning(tmp_path, capsys):
    assert cli.main(["train", *FAST, "--output-dir", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "context" not in err and "<unk>" not in err
    assert read_lines(tmp_path / "run")[0]["data/prompts_cut"] == 0


# ---------------------------------------------------------------------- model_overrides


@pytest.mark.parametrize(
    "overrides,message",
    [
        ('{"num_hiden_layers": 2}', "unknown key 'num_hiden_layers' (did you mean 'num_hidden_layers'?)"),
        ('{"num_hidden_layers": -1}', "'num_hidden_layers' must be >= 1, got -1"),
        ('{"hidden_size": "big"}', "'hidden_size' must be an integer, got str 'big'"),
    ],
)
def test_bad_model_overrides_are_one_error_and_leave_nothing_behind(tmp_path, capsys, overrides, message):
    run = tmp_path / "run"
    assert cli.main(["train", *FAST, "--model-overrides", overrides, "--output-dir", str(run)]) == 2
    assert message in one_error(capsys)
    assert not run.exists()


# ---------------------------------------------------------------------- grao plan and grao eval arguments


def test_plan_refuses_negative_sizes_and_model_configs_it_cannot_read(tmp_path, capsys):
    assert cli.main(["plan", "--lora-rank", "-4"]) == 2
    assert "lora_rank must be >= 0, got -4" in one_error(capsys)
    cases = {
        "not-json": ("{not json", "is not a JSON file"),
        "unknown-type": (json.dumps({"model_type": "no-such-family", "hidden_size": 8}), "no-such-family"),
        "negative": (
            json.dumps(
                {"model_type": "llama", "hidden_size": -64, "num_hidden_layers": 2, "vocab_size": 100,
                 "intermediate_size": 128, "num_attention_heads": 4}
            ),
            "hidden_size must be an integer >= 1, got -64",
        ),
    }  # fmt: skip
    for name, (text, message) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(text)
        assert cli.main(["plan", str(tmp_path / name)]) == 2, name
        line = one_error(capsys)
        assert message in line and str(tmp_path / name / "config.json") in line, line


@pytest.mark.parametrize("value", ["0", "-3"])
def test_eval_refuses_a_max_new_tokens_below_one_instead_of_using_the_runs(tmp_path, capsys, value):
    assert cli.main(["eval", "--run", str(tmp_path), "--max-new-tokens", value]) == 2
    assert f"--max-new-tokens must be >= 1, got {value}" in one_error(capsys)


# ---------------------------------------------------------------------- data and rewards


def test_an_empty_reference_is_refused_naming_its_line(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "what is two plus three", "reference": "five"}) + "\n")
    with data.open("a") as fh:
        fh.write(json.dumps({"prompt": "what is one plus one", "reference": "  "}) + "\n")
    assert (
        cli.main(["train", *FAST, "--data", str(data), "--reward", "exact", "--output-dir", str(tmp_path / "r")]) == 2
    )
    line = one_error(capsys)
    assert f"{data}:2" in line and "'reference' is empty" in line


def test_text_the_tokenizer_lacks_is_named_not_silently_unk(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": "abc=", "reference": "cba"}] * 5
    rows.append({"prompt": "abz=", "reference": "zba"})  # the demo tokenizer knows a-j and =: z is <unk>
    data.write_text("".join(json.dumps(x) + "\n" for x in rows))
    assert (
        cli.main(["train", *FAST, "--data", str(data), "--reward", "exact", "--output-dir", str(tmp_path / "r")]) == 0
    )
    err = capsys.readouterr().err
    assert "1 example(s) hold text the tokenizer does not know (it becomes <unk>)" in err and f"{data}:6" in err


def test_a_judge_that_never_answers_is_an_error_not_ras_1(tmp_path, capsys):
    from grao.eval import evaluate, rewards
    from grao.eval.judges import JudgeReward, PromptedJudge

    judge = JudgeReward(PromptedJudge(lambda texts: ["I cannot say"] * len(texts), name="silent"))
    scores = judge(["p"] * 3, ["a"] * 3, ["b"] * 3)
    assert evaluate.ras(scores, [0.0] * 3) == 1.0  # what the ties alone would report
    with pytest.raises(rewards.RewardError, match=r"gave no verdict .* in any of its 3 replies"):
        rewards.check_judged(rewards.pop_metrics(judge), judge)
    judge(["p"], ["a"], ["b"])
    rewards.check_judged({"judge/asked": 4.0, "judge/unparsed": 3.0}, judge)  # some verdicts: no error


# ---------------------------------------------------------------------- two processes


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _rank_pid(launcher: int, rank: int) -> int | None:
    for pid in _children(launcher):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
def test_sigterm_to_one_rank_of_a_two_process_run_exits_143_with_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    args = [*FAST, "--steps", "500", "--threads", "1", "--output-dir", str(run)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "grao", "train", "--nproc", "2", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the cleanup below ends the ranks too
    )
    try:
        deadline = time.monotonic() + 150
        log = run / "metrics.jsonl"
        while not (log.is_file() and '"loss"' in log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        pid = _rank_pid(proc.pid, 1)
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=150)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "ChildFailedError" not in err and "Traceback" not in err
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*"))  # the steps done were saved

"""The addition task: its generator (deterministic in the seed, held-out prompts never trained on, answers the
sums), its two checkers on hand-made responses, and how the config selects it."""

from __future__ import annotations

import pytest

from grao.config import ConfigError, TrainConfig
from grao.data import addition_task, load_examples, tasks
from grao.eval import rewards


def test_splits_are_deterministic_in_the_seed_and_disjoint():
    train, held_out = addition_task.make_splits(3000, 64, seed=3)
    assert (train, held_out) == addition_task.make_splits(3000, 64, seed=3)
    assert addition_task.make_splits(3000, 64, seed=4)[1] != held_out
    assert len(train) == 3000 and len(held_out) == len({ex.prompt for ex in held_out}) == 64
    assert not {ex.prompt for ex in train} & {ex.prompt for ex in held_out}


def test_answers_are_the_sums_of_the_prompts():
    train, held_out = addition_task.make_splits(500, 50, seed=0)
    for ex in train + held_out:
        a, b = ex.prompt.removesuffix("=").split("+")
        assert 0 <= int(a) <= 99 and 0 <= int(b) <= 99
        assert ex.reference == str(int(a) + int(b)) == addition_task.solve(ex.prompt)
    # the carries the task is about occur: a sum above 99 and a carried units digit below it
    sums = [(int(a), int(b)) for a, b in (ex.prompt[:-1].split("+") for ex in train)]
    assert any(a + b > 99 for a, b in sums) and any(a % 10 + b % 10 > 9 and a + b < 100 for a, b in sums)


def test_too_many_held_out_prompts_is_an_error():
    with pytest.raises(ValueError, match="eval_size 10000 exceeds the 10000 distinct addition prompts"):
        addition_task.make_splits(1, 10000)


@pytest.mark.parametrize(
    "prompt, response, exact, partial",
    [
        ("37+58=", "95", 1.0, 1.0),
        ("37+58=", " 95 ", 1.0, 1.0),  # surrounding whitespace is not part of the answer
        ("37+58=", "85", 0.0, 1 / 2),  # the units digit right, the carry missed
        ("37+58=", "59", 0.0, 0.0),  # the right digits in the wrong places
        ("99+7=", "106", 1.0, 1.0),
        ("99+7=", "6", 0.0, 1 / 3),  # digits are aligned by place value, from the units
        ("99+7=", "1006", 0.0, 2 / 4),  # a longer response is scored over its own length
        ("99+7=", "1x6", 0.0, 2 / 3),
        ("0+0=", "0", 1.0, 1.0),
        ("0+0=", "", 0.0, 0.0),
        ("12+3=", "15=15", 0.0, 2 / 5),  # the answer is the whole response, not a number found in it
    ],
)
def test_exact_and_per_digit_rewards(prompt, response, exact, partial):
    # the checkers compute the sum from the prompt: a wrong reference changes nothing
    assert rewards.resolve("addition-exact")([prompt], [response], ["wrong"]) == [exact]
    assert rewards.resolve("addition")([prompt], [response], ["wrong"]) == [pytest.approx(partial)]


def test_a_prompt_that_is_not_an_addition_names_it():
    for prompt in ("abc=", "1+2", "1+2+3=", "+2=", "1-2="):
        with pytest.raises(rewards.RewardError, match="not an addition prompt"):
            rewards.score(rewards.resolve("addition"), [prompt], ["3"], ["3"])


def test_config_selects_the_task_its_reward_and_its_tokenizer(tmp_path):
    from grao.models import build_demo_tokenizer

    cfg = TrainConfig(task="addition", demo_train_size=20, eval_size=5, output_dir=str(tmp_path / "run"))
    train, held_out = load_examples(cfg)
    assert (train, held_out) == addition_task.make_splits(20, 5, seed=0)
    assert rewards.resolve("auto", "demo", task="addition") is addition_task.reward
    assert rewards.resolve("auto", "demo", task="demo") is rewards.BUILTIN["demo"]
    assert rewards.resolve("auto", "data.jsonl", task="addition") is rewards.edit_similarity
    tok = build_demo_tokenizer("addition")
    ids = tok("37+58=", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == list("37+58=") and tok.unk_token_id not in ids
    assert tok.decode(tok("106", add_special_tokens=False)["input_ids"]) == "106"
    with pytest.raises(ConfigError, match="'task' must be one of demo, addition"):
        TrainConfig(task="subtraction")
    with pytest.raises(ValueError, match="task must be one of demo, addition, got 'x'"):
        tasks.get("x")


def test_grao_improves_the_held_out_reward_in_a_few_dozen_steps(tmp_path):
    # The demo's model and defaults (16 prompts x 8 samples, lr 3e-3, 20 warmup steps), the lr held at its peak
    # after warmup: the random model's per-digit credit is near 0.03, one that learned nothing stays there.
    from grao.train.trainer import Trainer

    cfg = TrainConfig(
        task="addition",
        steps=30,
        lr_schedule="constant",  # the peak lr after warmup, as in the first steps of a longer run
        eval_every=30,
        eval_size=64,
        probe_prompts=0,
        plot=False,
        progress=False,
        output_dir=str(tmp_path / "run"),
    )
    trainer = Trainer(cfg)
    trainer.train()
    start, end = trainer.baseline_eval, trainer.last_eval
    assert sum(start) / len(start) < 0.06 and end > 0.1

"""The validation split: prompts taken out of training, none shared with training or the held-out set, the same
for the same data and seed, and evaluated next to the held-out prompts."""

from __future__ import annotations

import pytest
from utils import read_lines, small

from grao import data
from grao.data import DataError, Example
from grao.train import setup


@pytest.mark.parametrize("seed", [0, 3])
def test_the_demo_validation_split_is_disjoint_from_training_and_held_out_and_deterministic(tmp_path, seed):
    cfg = small(tmp_path, demo_train_size=400, eval_size=50, validation_size=40, seed=seed)
    train, validation, held_out, _ = setup.load_data(cfg)
    prompts = [{ex.prompt for ex in split} for split in (train, validation, held_out)]
    assert len(validation) == len(prompts[1]) == 40 and len(held_out) == 50
    assert not prompts[0] & prompts[1] and not prompts[0] & prompts[2] and not prompts[1] & prompts[2]
    full, _ = data.load_examples(cfg)
    assert len(train) == len(full) - sum(ex.prompt in prompts[1] for ex in full)  # taken out of training only
    again = setup.load_data(cfg)
    assert (again[0], again[1], again[2]) == (train, validation, held_out)
    without = setup.load_data(small(tmp_path, demo_train_size=400, eval_size=50, seed=seed))
    assert without[1] == [] and without[0] == full and without[2] == held_out  # the held-out set does not move


def test_a_file_validation_split_skips_held_out_prompts_and_repeats():
    ex = lambda p: Example(p, p.upper())  # noqa: E731
    train = [ex("a"), ex("b"), ex("a"), ex("h"), ex("c"), ex("d")]
    rest, validation = data.validation_split(train, [ex("h")], 2)
    assert [e.prompt for e in validation] == ["a", "b"]
    assert [e.prompt for e in rest] == ["h", "c", "d"]  # "h" stays a training prompt: the held-out split holds it
    with pytest.raises(DataError, match="'validation_size' 5: the 6 training examples hold 4 distinct prompts"):
        data.validation_split(train, [ex("h")], 5)


def test_each_evaluation_logs_the_validation_reward(tmp_path):
    from grao.train.trainer import Trainer

    cfg = small(tmp_path, steps=1, validation_size=3)
    assert Trainer(cfg).train() is True
    evals = [ln for ln in read_lines(tmp_path / "run") if "eval/reward" in ln]
    assert [ln["step"] for ln in evals] == [0, 1]
    for ln in evals:
        assert 0.0 <= ln["val/reward"] <= 1.0 and 0.0 <= ln["val/ras"] <= 1.0

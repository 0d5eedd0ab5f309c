"""``reward/zero_std_groups`` counts the groups whose advantages all vanish, over each method's own group."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from utils import small  # noqa: E402

from grao.eval.rewards import statistics  # noqa: E402
from grao.train.trainer import Trainer  # noqa: E402

# Per prompt: G = 3 sampled rewards, then the reference's.
REWARDS = torch.tensor(
    [
        [0.0, 0.0, 0.0, 1.0],  # samples tie, the reference differs: no GRPO gradient, a GRAO one
        [0.5, 0.5, 0.5, 0.5],  # all tie: no gradient for either
        [0.0, 1.0, 0.0, 1.0],  # samples differ: a gradient for both
        [0.2, 0.2, 0.2, 0.9],  # samples tie again
    ]
)


def test_the_tied_share_is_over_the_methods_own_advantage_group():
    assert statistics(REWARDS)["reward/zero_std_groups"] == 0.25  # G + 1 rewards: only the second row ties
    assert statistics(REWARDS, reference_in_group=False)["reward/zero_std_groups"] == 0.75  # G samples: 1, 2, 4


def reference_only(prompts, completions, references):
    """1 for a completion equal to its reference, else 0: random samples tie at 0, the reference scores 1."""
    return [float(c.strip() == r.strip()) for c, r in zip(completions, references)]


@pytest.mark.parametrize("method,tied", [("grpo", 1.0), ("grao", 0.0)])
def test_the_trainer_logs_the_tied_share_of_its_loss_group(tmp_path, method, tied):
    trainer = Trainer(small(tmp_path, method=method, max_new_tokens=2), reward=reference_only)
    metrics = trainer.train_step(1)
    assert metrics["reward/samples"] == 0.0 and metrics["reward/reference"] == 1.0  # the case the test is about
    assert metrics["reward/zero_std_groups"] == tied

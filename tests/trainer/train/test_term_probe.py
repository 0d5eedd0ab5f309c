"""The GRAO term gradients at each evaluation: logged for the grao methods on the probe batch, absent for the others,
and without effect on the run's training."""

from __future__ import annotations

import pytest
from utils import read_lines, small

from grao.losses import GRAO
from grao.train.trainer import TIME_KEYS, Trainer

TERMS = GRAO.TERMS


def train(tmp_path, name, **kw) -> list[dict]:
    cfg = small(tmp_path / name, **kw)
    Trainer(cfg).train()
    return read_lines(tmp_path / name / "run")


def test_probe_logs_each_term_at_each_evaluation_and_leaves_training_unchanged(tmp_path):
    probed = train(tmp_path, "probed", probe_prompts=2)
    plain = train(tmp_path, "plain", probe_prompts=0)
    evals = [ln for ln in probed if "eval/reward" in ln]
    assert [ln["step"] for ln in evals] == [0, 1, 2]
    for ln in evals:
        norms = [ln[f"terms/grad_norm/{t}"] for t in TERMS]
        assert all(n > 0 for n in norms)
        assert [ln[f"terms/grad_share/{t}"] for t in TERMS] == pytest.approx([n / sum(norms) for n in norms])
    assert not any(k.startswith("terms/") for ln in plain for k in ln)

    def without_probe(lines):
        return [{k: v for k, v in ln.items() if k not in TIME_KEYS and not k.startswith("terms/")} for ln in lines]

    # the probe samples under its own RNG state and never touches .grad: every other number is the same
    assert without_probe(probed) == without_probe(plain)


def test_methods_without_grao_terms_log_no_term_gradients(tmp_path):
    lines = train(tmp_path, "grpo", method="grpo", steps=1)
    assert [ln["step"] for ln in lines if "eval/reward" in ln] == [0, 1]
    assert not any(k.startswith("terms/") for ln in lines for k in ln)


@pytest.mark.parametrize("micro_batch_prompts, groups", [(0, 2), (1, 1)])
def test_the_probe_holds_at_most_a_micro_batch_of_prompt_groups(tmp_path, monkeypatch, micro_batch_prompts, groups):
    from grao.train import policy

    seen = []

    def spy(loss, batch, **kw):
        seen.append(tuple(batch.rewards.shape))
        return real(loss, batch, **kw)

    real = policy.term_gradient_norms
    monkeypatch.setattr(policy, "term_gradient_norms", spy)
    train(tmp_path, "run", steps=1, probe_prompts=2, micro_batch_prompts=micro_batch_prompts)
    assert seen == [(groups, 4)] * 2  # evaluations at steps 0 and 1; small() samples 3 completions per prompt

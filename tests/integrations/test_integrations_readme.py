"""The python examples of the README's section on TRL, verl and other trainers run as written, in order and in
one namespace (so they cannot rot)."""

from __future__ import annotations

import pytest
import torch
from utils import run_readme_section

from grao_kernels import settings

pytest.importorskip("trl")
pytest.importorskip("verl.trainer.ppo.core_algos")


def test_readme_integration_examples_run(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the TRL examples write into runs/
    monkeypatch.setattr(settings, "backend", "torch")  # what backend="auto" means in the examples
    namespace = run_readme_section("Use from TRL / verl / your own trainer", min_blocks=4)
    assert torch.isfinite(namespace["out"].loss) and namespace["trainer"].state.global_step == 2
    # beta > 0 with the policy loaded from a directory: TRL built the reference model and logged the KL
    trainer = namespace["trainer"]
    assert trainer.ref_model is not None and all(h["kl"] >= 0 for h in trainer.state.log_history if "loss" in h)
    # the verl recipe: 2 groups of n = 2 responses and their references, every row's loss through the actor
    batch, actor = namespace["batch"], namespace["actor"]
    assert len(batch) == 6 and list(batch.non_tensor_batch["uid"][4:]) == ["a::grao-reference", "b::grao-reference"]
    grad = actor.lm_head.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0

"""The python examples of the README's section on the loss run as written, in
order and in one namespace, on every backend (so they cannot rot)."""

from __future__ import annotations

import pytest
import torch
from utils import ON_DEVICE, run_readme_section

from grao_kernels import settings


@pytest.mark.parametrize("device,backend", [p for p in ON_DEVICE if p.values[0] == "cpu"])
def test_readme_examples_run(monkeypatch, device, backend):
    monkeypatch.setattr(settings, "backend", backend)  # what backend="auto" means in the examples
    monkeypatch.setattr(settings, "memory_budget", settings.memory_budget)  # an example assigns it
    torch._dynamo.reset()
    namespace = run_readme_section("The loss")
    assert namespace["hidden"].grad is not None and torch.isfinite(namespace["hidden"].grad).all()

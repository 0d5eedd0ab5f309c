"""The python examples of the README's section on the loss run as written, in
order and in one namespace, on every backend (so they cannot rot)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from utils import ON_DEVICE

from grao_kernels import settings

README = Path(__file__).resolve().parents[1] / "README.md"


def loss_section_examples() -> list[str]:
    text = README.read_text()
    start = text.index("\n## The loss\n")
    end = text.index("\n## ", start + 1)
    blocks = re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)
    assert blocks, "the README's loss section has no python examples"
    return blocks


@pytest.mark.parametrize("device,backend", [p for p in ON_DEVICE if p.values[0] == "cpu"])
def test_readme_examples_run(monkeypatch, device, backend):
    monkeypatch.setattr(settings, "backend", backend)  # what backend="auto" means in the examples
    monkeypatch.setattr(settings, "memory_budget", settings.memory_budget)  # an example assigns it
    torch._dynamo.reset()
    namespace: dict = {}
    for i, block in enumerate(loss_section_examples()):
        try:
            exec(compile(block, f"README.md (loss section, python block {i + 1})", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"README python block {i + 1} failed:\n{block}") from exc
    assert namespace["hidden"].grad is not None and torch.isfinite(namespace["hidden"].grad).all()

"""The python examples of the README's section on TRL, verl and other trainers run as written, in order and in
one namespace (so they cannot rot)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from grao_kernels import settings

pytest.importorskip("trl")
pytest.importorskip("verl.trainer.ppo.core_algos")

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "\n## Use from TRL / verl / your own trainer\n"


def section_examples() -> list[str]:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + 1)
    blocks = re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)
    assert len(blocks) >= 4, "the README's integrations section lost its python examples"
    return blocks


def test_readme_integration_examples_run(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the TRL examples write into runs/
    monkeypatch.setattr(settings, "backend", "torch")  # what backend="auto" means in the examples
    namespace: dict = {}
    for i, block in enumerate(section_examples()):
        try:
            exec(compile(block, f"README.md (integrations section, python block {i + 1})", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"README python block {i + 1} failed:\n{block}") from exc
    assert torch.isfinite(namespace["out"].loss) and namespace["trainer"].state.global_step == 2
    assert torch.isfinite(namespace["log_prob"].grad).all() and namespace["log_prob"].grad.abs().sum() > 0

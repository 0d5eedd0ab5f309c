"""Rewards: any callable ``reward(prompts, completions, references) -> list[float]``.

Built-ins, selected by name in the config's ``reward`` key:

- ``demo``: the demo task's checker (:func:`grao.demo_task.reward`), partial credit in [0, 1];
- ``exact``: 1.0 when the stripped completion equals the stripped reference, else 0.0;
- ``edit``: normalised edit similarity ``1 - levenshtein(c, r) / max(len(c), len(r))`` in [0, 1];
- ``model:DIR``: a local ``AutoModelForSequenceClassification`` scoring prompt + completion;
- ``package.module:function``: any importable callable.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import torch

from . import demo_task

Reward = Callable[[list[str], list[str], list[str]], list[float]]


def exact_match(prompts: list[str], completions: list[str], references: list[str]) -> list[float]:
    return [float(c.strip() == r.strip()) for c, r in zip(completions, references)]


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def edit_similarity(prompts: list[str], completions: list[str], references: list[str]) -> list[float]:
    out = []
    for c, r in zip(completions, references):
        c, r = c.strip(), r.strip()
        n = max(len(c), len(r))
        out.append(1.0 if n == 0 else 1.0 - levenshtein(c, r) / n)
    return out


class RewardModel:
    """A local sequence-classification model; the reward is its logit (the last one if it has several)."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"reward model directory {str(path)!r} does not exist")
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).to(self.device)
        self.model.eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], references: list[str]) -> list[float]:
        out: list[float] = []
        texts = [p + c for p, c in zip(prompts, completions)]
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i : i + self.batch_size], return_tensors="pt", padding=True, truncation=True)
            logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits
            out.extend(logits[:, -1].float().tolist())
        return out


BUILTIN: dict[str, Reward] = {"demo": demo_task.reward, "exact": exact_match, "edit": edit_similarity}


def resolve(spec: str, data: str = "demo", device: torch.device | str = "cpu") -> Reward:
    """The reward named by a config value (see the module docstring); ValueError for an unknown one."""
    if spec == "auto":
        spec = "demo" if data == "demo" else "edit"
    if spec in BUILTIN:
        return BUILTIN[spec]
    if spec.startswith("model:"):
        return RewardModel(spec[len("model:") :], device=device)
    if ":" in spec:
        module, _, name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"reward {spec!r}: cannot import {name!r} from {module!r} ({exc})") from None
        if not callable(fn):
            raise ValueError(f"reward {spec!r} is not callable")
        return fn
    raise ValueError(f"unknown reward {spec!r}: use auto, {', '.join(BUILTIN)}, model:DIR or package.module:function")


def score(reward: Reward, prompts: list[str], completions: list[str], references: list[str]) -> list[float]:
    """Call ``reward`` and check it returned one finite number per completion."""
    values = list(reward(prompts, completions, references))
    if len(values) != len(completions):
        raise ValueError(f"the reward returned {len(values)} values for {len(completions)} completions")
    out = [float(v) for v in values]
    if not all(v == v and abs(v) != float("inf") for v in out):
        raise ValueError(f"the reward returned a non-finite value: {out}")
    return out

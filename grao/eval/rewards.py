"""Rewards: any callable ``reward(prompts, completions, references) -> list[float]``.

Built-ins, selected by name in the config's ``reward`` key (``auto``: the embedded task's own, its ``REWARD``,
for ``data: demo``; ``edit`` for a data file):

- ``demo``: the demo task's checker (:func:`grao.data.demo_task.reward`), partial credit in [0, 1];
- ``addition``: the addition task's checker (:func:`grao.data.addition_task.reward`), per-digit partial credit
  in [0, 1] against the sum computed from the prompt; ``addition-exact``: 1.0 for the exact sum, else 0.0
  (:func:`grao.data.addition_task.exact_reward`);
- ``exact``: 1.0 when the stripped completion equals the stripped reference, else 0.0;
- ``edit``: normalised edit similarity ``1 - levenshtein(c, r) / max(len(c), len(r))`` in [0, 1];
- ``model:DIR``: a local ``AutoModelForSequenceClassification`` scoring prompt + completion;
- ``judge-model:DIR``: a local causal LM as a pairwise judge (:class:`ModelJudge`), R(o, y) in {-1, 0, 1};
- ``judge:package.module:function``: any importable pairwise judge (:class:`JudgeReward`);
- ``package.module:function``: any importable callable.

A pairwise judge (arXiv 2508.07750, Sec. 3 and appendix Tables 6-7) rates a
response o against the prompt's reference answer y: ``R(o, y) = 1`` when o is
better, ``0`` for a tie, ``-1`` when it is worse. The reference is the zero
point of that scale: compared with itself it ties, ``R(y, y) = 0``, which is
the reference answer's own reward in its group (the judge is not asked; see
:class:`JudgeReward`). With these rewards RAS, the share of responses with
``R >= R(y, y) = 0``, is the paper's share of responses that win or tie
against the reference.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from ..data import addition_task, demo_task, tasks
from .base import Reward, RewardError, check_judged, is_number, pop_metrics, qualified_name
from .judges import JUDGE_TEMPLATE, JudgeReward, ModelJudge, read_template

# The reward API the trainer and evaluation call: this module's and what a reward is (.base).
__all__ = [
    "BUILTIN",
    "Reward",
    "RewardError",
    "check_judged",
    "RewardModel",
    "edit_similarity",
    "exact_match",
    "judge_options",
    "levenshtein",
    "pop_metrics",
    "qualified_name",
    "resolve",
    "score",
    "statistics",
]


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
            raise ConfigError(f"'reward': reward model directory {str(path)!r} does not exist")
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


BUILTIN: dict[str, Reward] = {
    "demo": demo_task.reward,
    "addition": addition_task.reward,
    "addition-exact": addition_task.exact_reward,
    "exact": exact_match,
    "edit": edit_similarity,
}
JUDGE_MODEL, JUDGE = "judge-model:", "judge:"


def _import(spec: str, target: str):
    """The callable ``package.module:function`` names; ConfigError quoting the ``reward`` value ``spec``."""
    module, _, name = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"'reward' {spec!r}: cannot import {name!r} from {module!r} ({exc})") from None
    if not callable(fn):
        raise ConfigError(f"'reward' {spec!r} is not callable")
    return fn


def resolve(
    spec: str,
    data: str = "demo",
    device: torch.device | str = "cpu",
    *,
    task: str = "demo",
    judge_template: str | None = None,
    judge_max_new_tokens: int = 16,
    judge_batch_size: int = 16,
) -> Reward:
    """The reward named by a config value (see the module docstring); ConfigError for an unknown one. ``auto`` is
    the embedded ``task``'s reward when ``data`` is ``demo``, else ``edit``.

    ``judge_*``: the ``judge-model:DIR`` judge's template file (None: :data:`JUDGE_TEMPLATE`), verdict
    length in tokens and prompts per generate call (:func:`judge_options` reads them from a config).
    """
    if spec == "auto":
        spec = tasks.get(task).REWARD if data == "demo" else "edit"
    if spec in BUILTIN:
        return BUILTIN[spec]
    if spec.startswith("model:"):
        return RewardModel(spec[len("model:") :], device=device)
    if spec.startswith(JUDGE_MODEL):
        template = JUDGE_TEMPLATE if judge_template is None else read_template(judge_template)
        judge = ModelJudge(
            spec[len(JUDGE_MODEL) :],
            device=device,
            template=template,
            max_new_tokens=judge_max_new_tokens,
            batch_size=judge_batch_size,
        )
        return JudgeReward(judge)
    if spec.startswith(JUDGE):
        return JudgeReward(_import(spec, spec[len(JUDGE) :]))
    if ":" in spec:
        return _import(spec, spec)
    raise ConfigError(
        f"unknown reward {spec!r}: use auto, {', '.join(BUILTIN)}, model:DIR, judge-model:DIR, "
        "judge:package.module:function or package.module:function"
    )


def judge_options(cfg) -> dict:
    """The keyword arguments of :func:`resolve` a TrainConfig's ``judge_*`` keys give."""
    return dict(
        judge_template=cfg.judge.template,
        judge_max_new_tokens=cfg.judge.max_new_tokens,
        judge_batch_size=cfg.judge.batch_size,
    )


def score(reward: Reward, prompts: list[str], completions: list[str], references: list[str]) -> list[float]:
    """Call ``reward``; RewardError naming it unless it returns one finite real number per completion."""
    who = f"reward {qualified_name(reward)}"
    try:
        values = reward(prompts, completions, references)
    except RewardError:  # already names the culprit (a judge and its verdict)
        raise
    except Exception as exc:
        raise RewardError(f"{who} raised {type(exc).__name__}: {exc}") from exc
    if isinstance(values, (torch.Tensor, np.ndarray)):
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise RewardError(f"{who} returned {values!r}; expected a list of {len(completions)} numbers")
    values = list(values)
    if len(values) != len(completions):
        raise RewardError(f"{who} returned {len(values)} values for {len(completions)} completions")
    for i, v in enumerate(values):
        if not is_number(v):
            raise RewardError(f"{who} returned {v!r} ({type(v).__name__}) for completion {i}; expected a real number")
        if not math.isfinite(v):
            raise RewardError(f"{who} returned {v!r} for completion {i} ({completions[i]!r}); rewards must be finite")
    return [float(v) for v in values]


def statistics(rewards: torch.Tensor, reference_in_group: bool = True) -> dict[str, float]:
    """Per-step statistics of a (P, G+1) reward tensor (the G samples, then the reference), for the metrics line.

    ``reward/std`` and the quartiles ``reward/q25``, ``reward/q50``, ``reward/q75`` are over the P·G sampled
    rewards (population std). ``reward/zero_std_groups`` is the share of prompts whose advantage group ties:
    the G+1 rewards when the method normalises over the samples and the reference (GRAO), the G samples'
    alone otherwise (``reference_in_group=False``: GRPO, PPO); such a group's normalised advantages are all 0,
    so it gives no gradient.
    """
    samples = rewards[:, :-1].double().flatten()
    q25, q50, q75 = torch.quantile(samples, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    group = rewards if reference_in_group else rewards[:, :-1]
    tied = (group == group[:, :1]).all(1)
    return {
        "reward/std": float(samples.std(correction=0)),
        "reward/q25": q25,
        "reward/q50": q50,
        "reward/q75": q75,
        "reward/zero_std_groups": float(tied.double().mean()),
    }

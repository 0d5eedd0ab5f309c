"""The embedded reasoning-style task: add two numbers, an answer a checker verifies.

A prompt is ``"<a>+<b>="`` with a and b in 0..99, the answer is the bare sum (``"37+58=" -> "95"``): at most
three digits, so it fits the demo's 8 new tokens, and the model must carry, the step where multi-digit
addition is hard for a left-to-right model (the tens digit comes first, yet depends on the units). The bare
number rather than a worked form: the 8 new tokens leave no room for one. Unlike the demo's word reversal,
where each answer letter copies one prompt letter, each digit here is a function of two operand digits and a
carry; the demo's 0.2M-parameter model learns part of it in its 200 steps (the README gives the numbers), so
the task leaves room between methods. Pairs are drawn deterministically from a seed;
the held-out set shares no (a, b) pair with the training set.

Two checkers, both computed from the prompt (the reference is not read): :func:`exact_reward`, 1 when the
response is the sum and 0 otherwise, and :func:`reward`, partial credit per digit: the share of place values
(aligned from the units digit) holding the right digit, over the longer of answer and response.
"""

from __future__ import annotations

import random

from .examples import Example
from .tasks import disjoint_draws

MAX_OPERAND = 99
OP, SEP = "+", "="
REWARD = "addition"  # the default reward of this task (grao.eval.rewards): partial credit per digit


def solve(prompt: str) -> str:
    """The sum an ``"a+b="`` prompt asks for; ValueError for any other text."""
    body = prompt[: -len(SEP)] if prompt.endswith(SEP) else None
    parts = None if body is None else body.split(OP)
    if parts is None or len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts):
        raise ValueError(f"not an addition prompt 'a{OP}b{SEP}': {prompt!r}")
    return str(int(parts[0]) + int(parts[1]))


def digit_score(answer: str, response: str) -> float:
    """Partial credit in [0, 1]: place values (from the units digit) with the right digit over the longer length."""
    response = response.strip()
    n = max(len(answer), len(response))
    if n == 0:
        return 1.0
    return sum(a == b for a, b in zip(reversed(answer), reversed(response))) / n


def reward(prompts: list[str], completions: list[str], references: list[str]) -> list[float]:
    """Per-digit partial credit (:func:`digit_score`) against the sum computed from each prompt."""
    return [digit_score(solve(p), c) for p, c in zip(prompts, completions)]


def exact_reward(prompts: list[str], completions: list[str], references: list[str]) -> list[float]:
    """1.0 when the stripped completion is the sum computed from its prompt, else 0.0."""
    return [float(c.strip() == solve(p)) for p, c in zip(prompts, completions)]


def _pair(rng: random.Random) -> tuple[int, int]:
    return rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)


def make_splits(train_size: int, eval_size: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples; deterministic in ``seed``, the two sets share no (a, b) pair."""
    rng = random.Random(f"grao-addition-{seed}")
    capacity = (MAX_OPERAND + 1) ** 2
    if eval_size >= capacity:
        raise ValueError(f"eval_size {eval_size} exceeds the {capacity} distinct addition prompts")
    train, held_out = disjoint_draws(lambda: _pair(rng), train_size, eval_size)

    def as_examples(pairs):
        return [Example(f"{a}{OP}{b}{SEP}", str(a + b)) for a, b in pairs]

    return as_examples(train), as_examples(held_out)


def tokenizer_corpus() -> list[str]:
    """Text the task's tokenizer is trained on: every symbol the task can produce, one token per digit."""
    return ["0123456789" + OP + SEP]
